//! The DistSender: sends one native KV batch over as many ranges as its keys
//! fall in. It cuts the batch per range with the range cache (looking up
//! what the cache lacks in the meta range), sends the parts in parallel,
//! and merges the answers: scan rows in key order, counts summed. A batch
//! with a key limit is sent range after range in key order (backwards for
//! reverse scans) until the limit is spent, and each request the limit
//! stopped carries the span still to do.
//!
//! A part answered `RangeKeyMismatch` (the range split or merged, or the
//! cache was stale) corrects the cache with the descriptors the answer
//! carries and is cut and sent again; `RangeNotFound` evicts and looks up
//! again. Neither reaches the caller. A batch that spans ranges is atomic
//! per range only: if one part is refused (a failed condition), the others
//! may have applied, and the error says so.
//!
//! Finding a range's leaseholder among its replicas (and following
//! not-leaseholder hints) is the `RangeSender`'s job: the node implements
//! it (locally, or over the internal RPC). This module never does I/O
//! itself.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use proto::kvpb::{self, request_union::Value as Req, response_union::Value as Resp};
use proto::storage::RangeDescriptor;

use crate::range_cache::RangeCache;

/// How many times one part is cut and sent again after its range moved.
const MAX_ATTEMPTS: usize = 32;
/// How many descriptors after the one looked up a lookup brings back.
const PREFETCH: u32 = 8;

/// Why one range's part of a batch got no answer.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum RangeError {
    /// Not evaluated: the range does not hold these keys; what the store
    /// that answered knows of the ranges there.
    #[error("range key mismatch")]
    KeyMismatch(Vec<RangeDescriptor>),
    /// Not evaluated: the range is not where it was sent (merged away).
    #[error("range not found")]
    RangeNotFound,
    /// It may or may not have applied.
    #[error("outcome unknown")]
    Ambiguous,
    /// Not evaluated: no leaseholder answered in time.
    #[error("{0}")]
    Unavailable(String),
}

/// Why a batch got no answer.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum DistError {
    /// Some part may have applied, and no answer says whether.
    #[error("outcome unknown")]
    Ambiguous,
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

/// Sends one range's part of a batch to its leaseholder; finds ranges in
/// the meta range.
pub trait RangeSender: Send + Sync + 'static {
    fn send(
        &self,
        desc: RangeDescriptor,
        req: kvpb::BatchRequest,
    ) -> impl Future<Output = Result<kvpb::BatchResponse, RangeError>> + Send;
    /// The descriptor of the range holding `key`, then up to `prefetch`
    /// ranges after it, as the meta records say.
    fn lookup(
        &self,
        key: Vec<u8>,
        prefetch: u32,
    ) -> impl Future<Output = Result<Vec<RangeDescriptor>, RangeError>> + Send;
}

/// What a DistSender counts.
#[derive(Debug, Default)]
pub struct DistMetrics {
    /// Lookups in the meta range (the cache did not hold a key).
    pub cache_misses: AtomicU64,
    /// Parts answered `RangeKeyMismatch` or `RangeNotFound` and re-sent.
    pub stale_corrections: AtomicU64,
}

pub struct DistSender<S> {
    sender: Arc<S>,
    cache: Arc<Mutex<RangeCache>>,
    pub metrics: Arc<DistMetrics>,
}

impl<S> Clone for DistSender<S> {
    fn clone(&self) -> Self {
        DistSender {
            sender: self.sender.clone(),
            cache: self.cache.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

fn span(r: &Req) -> (&[u8], &[u8]) {
    r.span()
}

fn is_span(r: &Req) -> bool {
    r.is_span()
}

fn clipped(r: &Req, start: &[u8], end: &[u8]) -> Req {
    r.clipped(start, end)
}

fn key_after(k: &[u8]) -> Vec<u8> {
    let mut v = k.to_vec();
    v.push(0);
    v
}

/// One range's part: the range and (original index, clipped request).
struct Part {
    desc: RangeDescriptor,
    reqs: Vec<(usize, Req)>,
}

/// The answers gathered for each original request, with the start key of
/// the range each came from (to merge scans in key order).
type Gathered = BTreeMap<usize, Vec<(Vec<u8>, Resp)>>;

impl<S: RangeSender> DistSender<S> {
    pub fn new(sender: S) -> DistSender<S> {
        Self::with_metrics(sender, Arc::default())
    }

    /// A DistSender counting into `metrics` (the node's, for `/metrics`).
    pub fn with_metrics(sender: S, metrics: Arc<DistMetrics>) -> DistSender<S> {
        DistSender {
            sender: Arc::new(sender),
            cache: Arc::new(Mutex::new(RangeCache::new())),
            metrics,
        }
    }

    /// How many ranges the cache holds.
    pub fn cached_ranges(&self) -> usize {
        self.cache.lock().len()
    }

    /// Cuts `[start, end)` into the ranges holding it, looking up what the
    /// cache lacks. A range the meta records name for a key but the cache
    /// refuses (it knows a newer range overlapping it: the records lag a
    /// split) is still sent its part: it answers with what it knows now.
    async fn cover(&self, start: &[u8], end: &[u8]) -> Result<Vec<(RangeDescriptor, Vec<u8>, Vec<u8>)>, DistError> {
        let mut out = Vec::new();
        let mut at = start.to_vec();
        for _ in 0..MAX_ATTEMPTS * 4 {
            let missing = {
                let c = self.cache.lock();
                match c.cover(&at, end) {
                    Ok(pieces) => {
                        out.extend(pieces.into_iter().map(|p| (p.range.desc, p.start, p.end)));
                        return Ok(out);
                    }
                    Err(missing) => {
                        if missing > at {
                            let before = c.cover(&at, &missing).unwrap_or_default();
                            out.extend(before.into_iter().map(|p| (p.range.desc, p.start, p.end)));
                        }
                        missing
                    }
                }
            };
            at = missing;
            self.metrics.cache_misses.fetch_add(1, Ordering::Relaxed);
            let found = self.sender.lookup(at.clone(), PREFETCH).await.map_err(|e| match e {
                RangeError::Ambiguous => DistError::Unavailable("meta lookup: no answer".into()),
                e => DistError::Unavailable(format!("meta lookup: {e}")),
            })?;
            let holder = found
                .first()
                .filter(|d| {
                    d.start_key.as_slice() <= at.as_slice()
                        && (d.end_key.is_empty() || at.as_slice() < d.end_key.as_slice())
                })
                .cloned();
            // What to do next, decided under the cache's lock.
            let (piece, wait) = {
                let mut c = self.cache.lock();
                let mut taken = true;
                for (i, d) in found.into_iter().enumerate() {
                    let t = c.insert(d, 0);
                    if i == 0 {
                        taken = t;
                    }
                }
                match holder {
                    Some(d) if !taken => {
                        // Stale in the records but it holds the key: send
                        // it the part up to the next range the cache knows.
                        let mut piece_end = d.end_key.clone();
                        if let Some(n) = c.next_start_after(&at) {
                            if piece_end.is_empty() || n < piece_end {
                                piece_end = n;
                            }
                        }
                        if !end.is_empty() && (piece_end.is_empty() || end < piece_end.as_slice()) {
                            piece_end = end.to_vec();
                        }
                        (Some((d, piece_end)), false)
                    }
                    Some(_) => (None, false),
                    // The meta records are being fixed up (a split or
                    // merge just happened): look again shortly.
                    None => (None, true),
                }
            };
            if let Some((d, piece_end)) = piece {
                let last = piece_end.as_slice() == end || piece_end.is_empty();
                out.push((d, at.clone(), piece_end.clone()));
                if last {
                    return Ok(out);
                }
                at = piece_end;
            }
            if wait {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Err(DistError::Unavailable(format!(
            "no range found holding [{start:?}, {end:?}) in the meta records"
        )))
    }

    /// Cuts `reqs` into parts, one per range, in key order.
    async fn plan(&self, reqs: &[(usize, Req)]) -> Result<Vec<Part>, DistError> {
        let mut parts: BTreeMap<Vec<u8>, Part> = BTreeMap::new();
        for (i, r) in reqs {
            let (s, e) = span(r);
            let e = if e.is_empty() { key_after(s) } else { e.to_vec() };
            for (desc, ps, pe) in self.cover(s, &e).await? {
                let piece = if is_span(r) { clipped(r, &ps, &pe) } else { r.clone() };
                parts
                    .entry(desc.start_key.clone())
                    .or_insert_with(|| Part {
                        desc: desc.clone(),
                        reqs: Vec::new(),
                    })
                    .reqs
                    .push((*i, piece));
            }
        }
        Ok(parts.into_values().collect())
    }

    /// Sends a batch: answers in request order, or why not. A
    /// transaction's commit (EndTxn) in a batch that spans ranges is sent
    /// only once the rest of the batch succeeded: a commit must never be
    /// evaluated before the writes it commits were laid.
    pub async fn send(&self, req: kvpb::BatchRequest) -> Result<kvpb::BatchResponse, DistError> {
        let in_txn = req.header.as_ref().is_some_and(|h| h.txn.is_some());
        let end = req
            .requests
            .iter()
            .position(|r| matches!(r.value, Some(Req::EndTxn(_))));
        if let (true, Some(pos), true) = (in_txn, end, req.requests.len() > 1) {
            let reqs: Vec<(usize, Req)> = req
                .requests
                .iter()
                .enumerate()
                .filter_map(|(i, r)| r.value.clone().map(|v| (i, v)))
                .collect();
            if self.plan(&reqs).await?.len() > 1 {
                return self.send_commit_last(req, pos).await;
            }
        }
        self.send_parts(req).await
    }

    /// Sends `req` without its EndTxn (at `pos`), then the EndTxn with the
    /// transaction as the first part left it.
    async fn send_commit_last(
        &self,
        mut req: kvpb::BatchRequest,
        pos: usize,
    ) -> Result<kvpb::BatchResponse, DistError> {
        let end = req.requests.remove(pos);
        let header = req.header.clone().unwrap_or_default();
        let first = match self.send_parts(req).await {
            // The commit was not sent: the transaction did not commit, and
            // restarts (its writes are in its lock spans either way). Never
            // a retry in the same epoch: a write still in flight could land
            // after the commit, above its timestamp, and never resolve.
            Err(DistError::Ambiguous) => {
                return Ok(kvpb::BatchResponse {
                    error: Some(kvpb::Error {
                        code: 10,
                        message: "a write's outcome is unknown; the commit was not sent".into(),
                        index: 0,
                        condition_failed: None,
                        txn_error: Some(kvpb::TxnError {
                            kind: kvpb::txn_error::Kind::Restart as i32,
                            retry_timestamp: None,
                            reason: "a write's outcome is unknown; the commit was not sent".into(),
                        }),
                    }),
                    txn: header.txn,
                    ..Default::default()
                })
            }
            other => other?,
        };
        if first.error.is_some() {
            return Ok(first);
        }
        let txn = merge_txn(header.txn.clone(), first.txn.clone());
        let second = self
            .send_parts(kvpb::BatchRequest {
                header: Some(kvpb::Header {
                    txn: txn.clone(),
                    ..header
                }),
                requests: vec![end],
            })
            .await?;
        if let Some(mut e) = second.error {
            e.index = pos as u32;
            return Ok(kvpb::BatchResponse {
                error: Some(e),
                txn: merge_txn(txn, second.txn),
                ..Default::default()
            });
        }
        let mut responses = first.responses;
        responses.insert(
            pos.min(responses.len()),
            second.responses.into_iter().next().unwrap_or_default(),
        );
        Ok(kvpb::BatchResponse {
            timestamp: [first.timestamp, second.timestamp]
                .into_iter()
                .flatten()
                .max_by_key(|t| (t.wall_nanos, t.logical)),
            responses,
            error: None,
            txn: merge_txn(txn, second.txn),
        })
    }

    async fn send_parts(&self, req: kvpb::BatchRequest) -> Result<kvpb::BatchResponse, DistError> {
        let mut header = req.header.unwrap_or_default();
        let mut reqs = Vec::with_capacity(req.requests.len());
        for (i, r) in req.requests.into_iter().enumerate() {
            let v = r
                .value
                .ok_or_else(|| DistError::InvalidArgument(format!("request {i} is empty")))?;
            let (s, e) = span(&v);
            if is_span(&v) && (e.is_empty() || s >= e) {
                return Err(DistError::InvalidArgument(format!(
                    "request {i}: the span [{s:?}, {e:?}) is empty or inverted"
                )));
            }
            reqs.push((i, v));
        }
        let n = reqs.len();
        if header.max_span_request_keys > 0 {
            return self.send_limited(header, reqs).await;
        }
        let mut gathered = Gathered::new();
        let mut ts = None;
        let mut txn = header.txn.clone();
        let mut failure: Option<kvpb::Error> = None;
        let mut parts_sent = 0usize;
        let mut todo = vec![reqs];
        let mut attempts = 0;
        // A transaction's commit held back until the rest of its batch
        // landed (ranges split under a batch that was one part at first).
        let mut held_commit: Vec<(usize, Req)> = Vec::new();
        loop {
            while let Some(mut batch) = todo.pop() {
                attempts += 1;
                if attempts > MAX_ATTEMPTS * 8 {
                    return Err(DistError::Unavailable("ranges kept moving under the batch".into()));
                }
                let parts = self.plan(&batch).await?;
                if header.txn.is_some() && parts.len() > 1 {
                    if let Some(pos) = batch.iter().position(|(_, r)| matches!(r, Req::EndTxn(_))) {
                        held_commit.push(batch.remove(pos));
                        todo.push(batch);
                        continue;
                    }
                }
                let mut tasks = tokio::task::JoinSet::new();
                for part in parts {
                    let sender = self.sender.clone();
                    let hdr = header.clone();
                    tasks.spawn(async move {
                        let req = kvpb::BatchRequest {
                            header: Some(hdr),
                            requests: part
                                .reqs
                                .iter()
                                .map(|(_, r)| kvpb::RequestUnion { value: Some(r.clone()) })
                                .collect(),
                        };
                        let answer = sender.send(part.desc.clone(), req).await;
                        (part, answer)
                    });
                }
                let mut ambiguous = false;
                let mut unavailable = None;
                while let Some(done) = tasks.join_next().await {
                    let Ok((part, answer)) = done else {
                        ambiguous = true;
                        continue;
                    };
                    match answer {
                        Ok(resp) => {
                            parts_sent += 1;
                            txn = merge_txn(txn, resp.txn);
                            if let Some(mut e) = resp.error {
                                e.index = part.reqs.get(e.index as usize).map_or(0, |(i, _)| *i as u32);
                                failure.get_or_insert(e);
                                continue;
                            }
                            ts = ts.max(resp.timestamp.map(|t| (t.wall_nanos, t.logical)));
                            for ((i, _), r) in part.reqs.iter().zip(resp.responses) {
                                if let Some(v) = r.value {
                                    gathered.entry(*i).or_default().push((part.desc.start_key.clone(), v));
                                }
                            }
                        }
                        Err(RangeError::KeyMismatch(descs)) => {
                            self.metrics.stale_corrections.fetch_add(1, Ordering::Relaxed);
                            let first = part.reqs.first().map(|(_, r)| span(r).0.to_vec()).unwrap_or_default();
                            let mut c = self.cache.lock();
                            c.evict(&first);
                            for d in descs {
                                c.insert(d, 0);
                            }
                            drop(c);
                            todo.push(part.reqs);
                        }
                        Err(RangeError::RangeNotFound) => {
                            self.metrics.stale_corrections.fetch_add(1, Ordering::Relaxed);
                            let first = part.reqs.first().map(|(_, r)| span(r).0.to_vec()).unwrap_or_default();
                            self.cache.lock().evict(&first);
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            todo.push(part.reqs);
                        }
                        Err(RangeError::Ambiguous) => ambiguous = true,
                        Err(RangeError::Unavailable(m)) => unavailable = Some(m),
                    }
                }
                if ambiguous {
                    return Err(DistError::Ambiguous);
                }
                if let Some(m) = unavailable {
                    // Other parts may have applied: only a batch of one part
                    // certainly did not.
                    return Err(if parts_sent > 0 && has_writes(&gathered) {
                        DistError::Ambiguous
                    } else {
                        DistError::Unavailable(m)
                    });
                }
            }
            // Everything else landed: now the commit, with the transaction as
            // the writes left it.
            if held_commit.is_empty() || failure.is_some() {
                break;
            }
            header.txn = txn.clone();
            todo.push(std::mem::take(&mut held_commit));
        }
        if let Some(mut e) = failure {
            if parts_sent > 1 {
                e.message = format!(
                    "{} (the batch spans ranges: its parts on other ranges may have applied)",
                    e.message
                );
            }
            return Ok(kvpb::BatchResponse {
                error: Some(e),
                txn,
                ..Default::default()
            });
        }
        Ok(kvpb::BatchResponse {
            timestamp: ts.map(|(w, l)| proto::storage::Timestamp {
                wall_nanos: w,
                logical: l,
            }),
            responses: (0..n).map(|i| merge(gathered.remove(&i).unwrap_or_default())).collect(),
            error: None,
            txn,
        })
    }

    /// A batch with a key limit: span requests only, all in one direction,
    /// sent range by range until the limit is spent.
    async fn send_limited(
        &self,
        header: kvpb::Header,
        reqs: Vec<(usize, Req)>,
    ) -> Result<kvpb::BatchResponse, DistError> {
        let reverse = reqs.iter().any(|(_, r)| matches!(r, Req::ReverseScan(_)));
        let mixed = reqs
            .iter()
            .any(|(_, r)| !is_span(r) || (reverse != matches!(r, Req::ReverseScan(_))));
        if mixed {
            return Err(DistError::InvalidArgument(
                "a batch with a key limit may hold only scans and range deletes, all forward or all reverse".into(),
            ));
        }
        let start = reqs.iter().map(|(_, r)| span(r).0.to_vec()).min().unwrap_or_default();
        let end = reqs.iter().map(|(_, r)| span(r).1.to_vec()).max().unwrap_or_default();
        let mut budget = header.max_span_request_keys;
        let mut txn = header.txn.clone();
        let mut gathered = Gathered::new();
        // Per request: where it stopped inside a range (the resume span).
        let mut stopped: BTreeMap<usize, kvpb::Span> = BTreeMap::new();
        let mut ts = None;
        // The part of [start, end) still to visit: [lo, hi).
        let (mut lo, mut hi) = (start.clone(), end.clone());
        let mut attempts = 0;
        while budget > 0 && lo < hi {
            attempts += 1;
            if attempts > MAX_ATTEMPTS * 64 {
                return Err(DistError::Unavailable("ranges kept moving under the batch".into()));
            }
            let pieces = self.cover(&lo, &hi).await?;
            let piece = if reverse { pieces.last() } else { pieces.first() };
            let Some((desc, ps, pe)) = piece.cloned() else { break };
            let part: Vec<(usize, Req)> = reqs
                .iter()
                .filter(|(i, r)| {
                    let (s, e) = span(r);
                    !stopped.contains_key(i) && s < pe.as_slice() && ps.as_slice() < e
                })
                .map(|(i, r)| {
                    let (s, e) = span(r);
                    (*i, clipped(r, s.max(&ps), e.min(&pe)))
                })
                .collect();
            if !part.is_empty() {
                let sub = kvpb::BatchRequest {
                    header: Some(kvpb::Header {
                        max_span_request_keys: budget,
                        txn: txn.clone(),
                        ..header.clone()
                    }),
                    requests: part
                        .iter()
                        .map(|(_, r)| kvpb::RequestUnion { value: Some(r.clone()) })
                        .collect(),
                };
                match self.sender.send(desc.clone(), sub).await {
                    Ok(resp) => {
                        txn = merge_txn(txn, resp.txn);
                        if let Some(mut e) = resp.error {
                            e.index = part.get(e.index as usize).map_or(0, |(i, _)| *i as u32);
                            return Ok(kvpb::BatchResponse {
                                error: Some(e),
                                txn,
                                ..Default::default()
                            });
                        }
                        ts = ts.max(resp.timestamp.map(|t| (t.wall_nanos, t.logical)));
                        for ((i, _), r) in part.iter().zip(resp.responses) {
                            let Some(v) = r.value else { continue };
                            let (count, resume) = span_result(&v);
                            budget -= count.min(budget);
                            if let Some(rs) = resume {
                                // The range saw the request cut at its
                                // bounds: what is left runs to the end of
                                // the original span (its start, reversed).
                                let (s, e) = reqs
                                    .iter()
                                    .find(|(j, _)| j == i)
                                    .map_or((&[][..], &[][..]), |(_, r)| span(r));
                                let widened = if reverse {
                                    kvpb::Span {
                                        start_key: s.to_vec(),
                                        end_key: rs.end_key,
                                    }
                                } else {
                                    kvpb::Span {
                                        start_key: rs.start_key,
                                        end_key: e.to_vec(),
                                    }
                                };
                                stopped.insert(*i, widened);
                            }
                            gathered.entry(*i).or_default().push((desc.start_key.clone(), v));
                        }
                    }
                    Err(RangeError::KeyMismatch(descs)) => {
                        self.metrics.stale_corrections.fetch_add(1, Ordering::Relaxed);
                        let mut c = self.cache.lock();
                        c.evict(&ps);
                        for d in descs {
                            c.insert(d, 0);
                        }
                        continue;
                    }
                    Err(RangeError::RangeNotFound) => {
                        self.metrics.stale_corrections.fetch_add(1, Ordering::Relaxed);
                        self.cache.lock().evict(&ps);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                    Err(RangeError::Ambiguous) => return Err(DistError::Ambiguous),
                    Err(RangeError::Unavailable(m)) => {
                        return Err(if gathered.is_empty() {
                            DistError::Unavailable(m)
                        } else {
                            DistError::Ambiguous
                        })
                    }
                }
            }
            if reverse {
                hi = ps;
            } else {
                lo = pe;
            }
        }
        // What no range was asked for: the resume spans.
        let responses = reqs
            .iter()
            .map(|(i, r)| {
                let (s, e) = span(r);
                let mut out = merge(gathered.remove(i).unwrap_or_default());
                let resume = stopped.remove(i).or_else(|| {
                    if reverse {
                        (s < hi.as_slice()).then(|| kvpb::Span {
                            start_key: s.to_vec(),
                            end_key: e.min(&hi).to_vec(),
                        })
                    } else {
                        (lo.as_slice() < e).then(|| kvpb::Span {
                            start_key: s.max(&lo).to_vec(),
                            end_key: e.to_vec(),
                        })
                    }
                });
                set_resume(&mut out, r, resume);
                out
            })
            .collect();
        Ok(kvpb::BatchResponse {
            timestamp: ts.map(|(w, l)| proto::storage::Timestamp {
                wall_nanos: w,
                logical: l,
            }),
            responses,
            error: None,
            txn,
        })
    }
}

/// The transaction as the parts of a batch left it: the highest write
/// timestamp any part moved it to.
fn merge_txn(a: Option<kvpb::Transaction>, b: Option<kvpb::Transaction>) -> Option<kvpb::Transaction> {
    match (a, b) {
        (Some(mut a), Some(b)) => {
            let key = |t: &Option<proto::storage::Timestamp>| t.map(|t| (t.wall_nanos, t.logical));
            if key(&b.write_timestamp) > key(&a.write_timestamp) {
                a.write_timestamp = b.write_timestamp;
            }
            Some(a)
        }
        (a, b) => a.or(b),
    }
}

fn has_writes(g: &Gathered) -> bool {
    g.values()
        .flatten()
        .any(|(_, r)| !matches!(r, Resp::Get(_) | Resp::Scan(_) | Resp::ReverseScan(_)))
}

/// How many keys a span answer holds, and where it stopped.
fn span_result(r: &Resp) -> (i64, Option<kvpb::Span>) {
    match r {
        Resp::Scan(s) => (s.rows.len() as i64, s.resume_span.clone()),
        Resp::ReverseScan(s) => (s.rows.len() as i64, s.resume_span.clone()),
        Resp::DeleteRange(d) => (d.deleted, d.resume_span.clone()),
        _ => (0, None),
    }
}

fn set_resume(out: &mut kvpb::ResponseUnion, r: &Req, resume: Option<kvpb::Span>) {
    let v = out.value.get_or_insert_with(|| match r {
        Req::DeleteRange(_) => Resp::DeleteRange(Default::default()),
        Req::ReverseScan(_) => Resp::ReverseScan(Default::default()),
        _ => Resp::Scan(Default::default()),
    });
    match v {
        Resp::Scan(s) => s.resume_span = resume,
        Resp::ReverseScan(s) => s.resume_span = resume,
        Resp::DeleteRange(d) => d.resume_span = resume,
        _ => {}
    }
}

/// One request's answers from the ranges it spanned, as one answer: rows in
/// key order (descending for a reverse scan), counts summed.
fn merge(mut parts: Vec<(Vec<u8>, Resp)>) -> kvpb::ResponseUnion {
    parts.sort_by(|a, b| a.0.cmp(&b.0));
    let mut it = parts.into_iter().map(|(_, r)| r);
    let Some(first) = it.next() else {
        return kvpb::ResponseUnion { value: None };
    };
    let merged = match first {
        Resp::Scan(mut s) => {
            for r in it {
                if let Resp::Scan(x) = r {
                    s.rows.extend(x.rows);
                    s.resume_span = s.resume_span.or(x.resume_span);
                }
            }
            Resp::Scan(s)
        }
        Resp::ReverseScan(s) => {
            let mut all = vec![s];
            all.extend(it.filter_map(|r| match r {
                Resp::ReverseScan(x) => Some(x),
                _ => None,
            }));
            let mut out = kvpb::ReverseScanResponse::default();
            for x in all.into_iter().rev() {
                out.rows.extend(x.rows);
                out.resume_span = out.resume_span.or(x.resume_span);
            }
            Resp::ReverseScan(out)
        }
        Resp::DeleteRange(mut d) => {
            for r in it {
                if let Resp::DeleteRange(x) = r {
                    d.deleted += x.deleted;
                    d.keys.extend(x.keys);
                    d.resume_span = d.resume_span.or(x.resume_span);
                }
            }
            Resp::DeleteRange(d)
        }
        Resp::ResolveIntent(mut d) => {
            for r in it {
                if let Resp::ResolveIntent(x) = r {
                    d.resolved += x.resolved;
                    d.resume_span = d.resume_span.or(x.resume_span);
                }
            }
            Resp::ResolveIntent(d)
        }
        other => other,
    };
    kvpb::ResponseUnion { value: Some(merged) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap as Map;

    /// Ranges as they are, a meta range that may lag, and the data.
    #[derive(Default)]
    struct Fake {
        ranges: Mutex<Vec<RangeDescriptor>>,
        meta: Mutex<Vec<RangeDescriptor>>,
        data: Mutex<Map<Vec<u8>, Vec<u8>>>,
        /// Every part received: (range, the kinds of its requests).
        log: Mutex<Vec<(u64, Vec<&'static str>)>>,
        /// The transaction epoch of every part received, in the same order.
        epochs: Mutex<Vec<u32>>,
        /// The next part holding a put on this range gets no answer
        /// (ambiguous), once.
        ambiguous_put_on: Mutex<Option<u64>>,
        /// Parts being answered now, and the most at once.
        in_flight: AtomicU64,
        max_in_flight: AtomicU64,
    }

    fn d(id: u64, s: &[u8], e: &[u8], generation: u64) -> RangeDescriptor {
        RangeDescriptor {
            range_id: id,
            start_key: s.to_vec(),
            end_key: e.to_vec(),
            generation,
            ..Default::default()
        }
    }

    fn rows(
        data: &Map<Vec<u8>, Vec<u8>>,
        s: &[u8],
        e: &[u8],
        reverse: bool,
        budget: &mut i64,
    ) -> (Vec<kvpb::KeyValue>, Option<kvpb::Span>) {
        let mut keys: Vec<&Vec<u8>> = data.range(s.to_vec()..e.to_vec()).map(|(k, _)| k).collect();
        if reverse {
            keys.reverse();
        }
        let mut out = Vec::new();
        for k in keys {
            if *budget == 0 {
                let resume = if reverse {
                    kvpb::Span {
                        start_key: s.to_vec(),
                        end_key: key_after(k),
                    }
                } else {
                    kvpb::Span {
                        start_key: k.clone(),
                        end_key: e.to_vec(),
                    }
                };
                return (out, Some(resume));
            }
            *budget -= 1;
            out.push(kvpb::KeyValue {
                key: k.clone(),
                value: data[k].clone(),
                timestamp: None,
            });
        }
        (out, None)
    }

    impl RangeSender for Fake {
        async fn send(
            &self,
            desc: RangeDescriptor,
            req: kvpb::BatchRequest,
        ) -> Result<kvpb::BatchResponse, RangeError> {
            let ranges = self.ranges.lock().clone();
            let Some(real) = ranges.iter().find(|r| r.range_id == desc.range_id) else {
                return Err(RangeError::RangeNotFound);
            };
            for r in &req.requests {
                let (s, e) = span(r.value.as_ref().unwrap());
                let e = if e.is_empty() { key_after(s) } else { e.to_vec() };
                if s < real.start_key.as_slice() || e > real.end_key {
                    // As a store answers: what it holds overlapping the
                    // request, and the range addressed as it is now.
                    let mut over: Vec<RangeDescriptor> = ranges
                        .iter()
                        .filter(|x| x.start_key < e && s < x.end_key.as_slice())
                        .cloned()
                        .collect();
                    if !over.iter().any(|x| x.range_id == real.range_id) {
                        over.push(real.clone());
                    }
                    return Err(RangeError::KeyMismatch(over));
                }
            }
            let kinds: Vec<&'static str> = req
                .requests
                .iter()
                .map(|r| match r.value {
                    Some(Req::Put(_)) => "put",
                    Some(Req::EndTxn(_)) => "end",
                    _ => "other",
                })
                .collect();
            let has_put = kinds.contains(&"put");
            self.log.lock().push((desc.range_id, kinds));
            self.epochs
                .lock()
                .push(req.header.as_ref().and_then(|h| h.txn.as_ref()).map_or(0, |t| t.epoch));
            if has_put && *self.ambiguous_put_on.lock() == Some(desc.range_id) {
                *self.ambiguous_put_on.lock() = None;
                return Err(RangeError::Ambiguous);
            }
            // Parts sent together overlap here.
            let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_in_flight.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            // A write on range 8 moves the transaction's write timestamp.
            let mut txn = req.header.as_ref().and_then(|h| h.txn.clone());
            if let Some(t) = txn.as_mut().filter(|_| desc.range_id == 8) {
                t.write_timestamp = Some(proto::storage::Timestamp {
                    wall_nanos: 99,
                    logical: 0,
                });
            }
            let limit = req.header.as_ref().map_or(0, |h| h.max_span_request_keys);
            let mut budget = if limit > 0 { limit } else { -1 };
            let mut data = self.data.lock();
            let mut responses = Vec::new();
            for r in req.requests {
                let v = match r.value.unwrap() {
                    Req::Put(p) => {
                        data.insert(p.key, p.value);
                        Resp::Put(Default::default())
                    }
                    Req::Get(g) => Resp::Get(kvpb::GetResponse {
                        kv: data.get(&g.key).map(|v| kvpb::KeyValue {
                            key: g.key.clone(),
                            value: v.clone(),
                            timestamp: None,
                        }),
                    }),
                    Req::Scan(x) => {
                        let (rows, resume_span) = rows(&data, &x.start_key, &x.end_key, false, &mut budget);
                        Resp::Scan(kvpb::ScanResponse { rows, resume_span })
                    }
                    Req::ReverseScan(x) => {
                        let (rows, resume_span) = rows(&data, &x.start_key, &x.end_key, true, &mut budget);
                        Resp::ReverseScan(kvpb::ReverseScanResponse { rows, resume_span })
                    }
                    Req::DeleteRange(x) => {
                        let (rows, resume_span) = rows(&data, &x.start_key, &x.end_key, false, &mut budget);
                        for kv in &rows {
                            data.remove(&kv.key);
                        }
                        Resp::DeleteRange(kvpb::DeleteRangeResponse {
                            deleted: rows.len() as i64,
                            keys: Vec::new(),
                            resume_span,
                        })
                    }
                    Req::EndTxn(_) => Resp::EndTxn(kvpb::EndTxnResponse::default()),
                    other => panic!("not modelled: {other:?}"),
                };
                responses.push(kvpb::ResponseUnion { value: Some(v) });
            }
            Ok(kvpb::BatchResponse {
                timestamp: None,
                responses,
                error: None,
                txn,
            })
        }

        async fn lookup(&self, key: Vec<u8>, prefetch: u32) -> Result<Vec<RangeDescriptor>, RangeError> {
            let meta = self.meta.lock();
            Ok(meta
                .iter()
                .filter(|r| r.end_key > key)
                .take(1 + prefetch as usize)
                .cloned()
                .collect())
        }
    }

    fn batch(reqs: Vec<Req>, limit: i64) -> kvpb::BatchRequest {
        kvpb::BatchRequest {
            header: Some(kvpb::Header {
                max_span_request_keys: limit,
                ..Default::default()
            }),
            requests: reqs
                .into_iter()
                .map(|r| kvpb::RequestUnion { value: Some(r) })
                .collect(),
        }
    }

    fn scan(s: &str, e: &str, reverse: bool) -> Req {
        if reverse {
            Req::ReverseScan(kvpb::ReverseScanRequest {
                start_key: s.into(),
                end_key: e.into(),
            })
        } else {
            Req::Scan(kvpb::ScanRequest {
                start_key: s.into(),
                end_key: e.into(),
            })
        }
    }

    fn keys(r: &kvpb::ResponseUnion) -> (String, Option<kvpb::Span>) {
        let (rows, resume) = match r.value.as_ref().unwrap() {
            Resp::Scan(s) => (&s.rows, s.resume_span.clone()),
            Resp::ReverseScan(s) => (&s.rows, s.resume_span.clone()),
            other => panic!("{other:?}"),
        };
        (
            rows.iter()
                .map(|kv| String::from_utf8(kv.key.clone()).unwrap())
                .collect(),
            resume,
        )
    }

    #[tokio::test]
    async fn a_batch_is_cut_per_range_merged_in_key_order_and_a_stale_cache_is_corrected() {
        let fake = Fake::default();
        // The meta range still has the range before its two splits.
        *fake.meta.lock() = vec![d(3, b"\x11", b"\xff\xff", 0)];
        *fake.ranges.lock() = vec![d(3, b"\x11", b"g", 2), d(7, b"g", b"p", 2), d(8, b"p", b"\xff\xff", 1)];
        let ds = DistSender::new(fake);
        let puts = ('a'..='z')
            .map(|c| {
                Req::Put(kvpb::PutRequest {
                    key: vec![c as u8],
                    value: vec![c as u8],
                })
            })
            .collect();
        let r = ds.send(batch(puts, 0)).await.unwrap();
        assert_eq!(r.responses.len(), 26);
        assert!(
            ds.metrics.stale_corrections.load(Ordering::Relaxed) >= 1,
            "the stale range answered a mismatch"
        );
        assert!(ds.metrics.cache_misses.load(Ordering::Relaxed) >= 1);
        assert_eq!(ds.cached_ranges(), 3, "the cache now holds the real ranges");
        let abc: String = ('a'..='z').collect();
        let r = ds
            .send(batch(vec![scan("a", "zz", false), scan("a", "zz", true)], 0))
            .await
            .unwrap();
        assert_eq!(keys(&r.responses[0]), (abc.clone(), None));
        assert_eq!(keys(&r.responses[1]), (abc.chars().rev().collect(), None));
        // A limit stops in the second range; the resume span says where.
        let r = ds.send(batch(vec![scan("a", "zz", false)], 10)).await.unwrap();
        let (got, resume) = keys(&r.responses[0]);
        assert_eq!(got, "abcdefghij");
        let resume = resume.unwrap();
        assert_eq!(
            (resume.start_key.as_slice(), resume.end_key.as_slice()),
            (&b"k"[..], &b"zz"[..])
        );
        // A limit that ends exactly at a range boundary: the rest is to resume.
        let r = ds.send(batch(vec![scan("a", "zz", false)], 6)).await.unwrap();
        let (got, resume) = keys(&r.responses[0]);
        assert_eq!(got, "abcdef");
        assert_eq!(resume.unwrap().start_key, b"g");
        let r = ds.send(batch(vec![scan("a", "zz", true)], 5)).await.unwrap();
        let (got, resume) = keys(&r.responses[0]);
        assert_eq!(got, "zyxwv");
        let resume = resume.unwrap();
        assert_eq!(
            (resume.start_key.as_slice(), resume.end_key.as_slice()),
            (&b"a"[..], &b"u\x00"[..])
        );
        // Mixed directions with a limit are refused.
        assert!(ds
            .send(batch(vec![scan("a", "c", false), scan("a", "c", true)], 5))
            .await
            .is_err());
        // A range delete over all three ranges sums its counts.
        let r = ds
            .send(batch(
                vec![Req::DeleteRange(kvpb::DeleteRangeRequest {
                    start_key: b"c".to_vec(),
                    end_key: b"r".to_vec(),
                    return_keys: false,
                })],
                0,
            ))
            .await
            .unwrap();
        assert!(matches!(&r.responses[0].value, Some(Resp::DeleteRange(x)) if x.deleted == 15));
        let r = ds.send(batch(vec![scan("a", "zz", false)], 0)).await.unwrap();
        assert_eq!(keys(&r.responses[0]).0, "abrstuvwxyz");
    }

    #[tokio::test]
    async fn a_commit_spanning_ranges_goes_after_its_writes_with_the_moved_timestamp() {
        let fake = Fake::default();
        let ranges = vec![d(3, b"\x11", b"g", 1), d(7, b"g", b"p", 1), d(8, b"p", b"\xff\xff", 1)];
        *fake.meta.lock() = ranges.clone();
        *fake.ranges.lock() = ranges;
        let ds = DistSender::new(fake);
        let put = |k: &str| {
            Req::Put(kvpb::PutRequest {
                key: k.into(),
                value: b"v".to_vec(),
            })
        };
        let ts = |w| {
            Some(proto::storage::Timestamp {
                wall_nanos: w,
                logical: 0,
            })
        };
        let txn = kvpb::Transaction {
            id: vec![1; 16],
            key: b"a".to_vec(),
            read_timestamp: ts(10),
            write_timestamp: ts(10),
            ..Default::default()
        };
        let req = |reqs: Vec<Req>| kvpb::BatchRequest {
            header: Some(kvpb::Header {
                txn: Some(txn.clone()),
                ..Default::default()
            }),
            requests: reqs
                .into_iter()
                .map(|v| kvpb::RequestUnion { value: Some(v) })
                .collect(),
        };
        let end = Req::EndTxn(kvpb::EndTxnRequest {
            key: b"a".to_vec(),
            commit: true,
            ..Default::default()
        });
        let r = ds.send(req(vec![put("a"), end.clone(), put("q")])).await.unwrap();
        assert_eq!(r.responses.len(), 3);
        assert!(
            matches!(r.responses[1].value, Some(Resp::EndTxn(_))),
            "answers stay in request order"
        );
        assert_eq!(
            r.txn.unwrap().write_timestamp,
            ts(99),
            "the highest write timestamp of the parts"
        );
        let log = ds.sender.log.lock().clone();
        // Both writes (in parallel, in either order), then the commit alone:
        // two rounds one after the other, not three.
        assert_eq!(log.len(), 3, "{log:?}");
        assert_eq!(
            ds.sender.max_in_flight.load(Ordering::SeqCst),
            2,
            "the writes went together"
        );
        assert_eq!(log[2], (3, vec!["end"]), "{log:?}");
        assert!(log[..2].iter().all(|(_, k)| k == &vec!["put"]), "{log:?}");
        // All on one range: one part, the commit with its writes (1PC).
        ds.sender.log.lock().clear();
        ds.send(req(vec![put("a"), put("b"), end])).await.unwrap();
        assert_eq!(*ds.sender.log.lock(), vec![(3, vec!["put", "put", "end"])]);
    }

    #[tokio::test]
    async fn a_commit_is_held_back_when_a_split_turns_one_part_into_two() {
        let fake = Fake::default();
        // The meta records (and so the cache) still show one range; the
        // range has split at "m".
        *fake.meta.lock() = vec![d(3, b"\x11", b"\xff\xff", 0)];
        *fake.ranges.lock() = vec![d(3, b"\x11", b"m", 1), d(8, b"m", b"\xff\xff", 1)];
        let ds = DistSender::new(fake);
        let put = |k: &str| {
            Req::Put(kvpb::PutRequest {
                key: k.into(),
                value: b"v".to_vec(),
            })
        };
        let req = kvpb::BatchRequest {
            header: Some(kvpb::Header {
                txn: Some(kvpb::Transaction {
                    id: vec![1; 16],
                    key: b"a".to_vec(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            requests: [
                put("a"),
                put("q"),
                Req::EndTxn(kvpb::EndTxnRequest {
                    key: b"a".to_vec(),
                    commit: true,
                    ..Default::default()
                }),
            ]
            .into_iter()
            .map(|v| kvpb::RequestUnion { value: Some(v) })
            .collect(),
        };
        let r = ds.send(req).await.unwrap();
        assert!(matches!(r.responses[2].value, Some(Resp::EndTxn(_))));
        let log = ds.sender.log.lock().clone();
        // The commit is the last part sent, alone, after both writes.
        assert_eq!(log.last(), Some(&(3, vec!["end"])), "{log:?}");
        assert!(log.iter().filter(|(_, k)| k.contains(&"end")).count() == 1, "{log:?}");
        assert_eq!(
            r.txn.unwrap().write_timestamp.map(|t| t.wall_nanos),
            Some(99),
            "the commit carried the moved timestamp"
        );
    }

    #[tokio::test]
    async fn writes_whose_outcome_is_unknown_are_never_sent_again_in_the_same_epoch() {
        // A commit batch spanning two ranges: the write on range 8 gets no
        // answer, so the commit is held back. That write may still land
        // later; sent again in the same epoch and committed, the late copy
        // would land above the commit timestamp and never resolve (the
        // container soak wedged two bank accounts this way).
        let fake = Fake::default();
        *fake.meta.lock() = vec![d(3, b"\x11", b"m", 1), d(8, b"m", b"\xff\xff", 1)];
        *fake.ranges.lock() = fake.meta.lock().clone();
        *fake.ambiguous_put_on.lock() = Some(8);
        let ds = Arc::new(DistSender::new(fake));
        let t = crate::txn::Txn::begin(ds.clone());
        let r = t
            .commit_with(vec![crate::txn::put(b"a", b"1"), crate::txn::put(b"q", b"2")])
            .await;
        assert!(r.as_ref().is_err_and(|e| e.is_retryable()), "{r:?}");
        let log = ds.sender.log.lock().clone();
        let epochs = ds.sender.epochs.lock().clone();
        let puts_in_first_epoch = log
            .iter()
            .zip(&epochs)
            .filter(|((_, kinds), e)| kinds.contains(&"put") && **e == 0)
            .count();
        assert_eq!(
            puts_in_first_epoch, 2,
            "one part per range, never again: {log:?} {epochs:?}"
        );
        assert!(
            log.iter().all(|(_, k)| !k.contains(&"end")) || epochs.iter().any(|&e| e > 0),
            "no commit in the first epoch: {log:?} {epochs:?}"
        );
    }

    #[tokio::test]
    async fn a_merged_away_range_is_looked_up_again() {
        let fake = Fake::default();
        *fake.meta.lock() = vec![d(3, b"\x11", b"g", 1), d(7, b"g", b"\xff\xff", 1)];
        *fake.ranges.lock() = fake.meta.lock().clone();
        let ds = DistSender::new(fake);
        let put = |k: &str| {
            Req::Put(kvpb::PutRequest {
                key: k.into(),
                value: b"v".to_vec(),
            })
        };
        ds.send(batch(vec![put("a"), put("x")], 0)).await.unwrap();
        // Range 7 merges into 3; the meta range says so; the cache does not.
        let merged = d(3, b"\x11", b"\xff\xff", 2);
        *ds.sender.ranges.lock() = vec![merged.clone()];
        *ds.sender.meta.lock() = vec![merged];
        ds.send(batch(vec![put("y")], 0)).await.unwrap();
        let r = ds.send(batch(vec![scan("a", "zz", false)], 0)).await.unwrap();
        assert_eq!(keys(&r.responses[0]).0, "axy");
        assert_eq!(ds.cached_ranges(), 1);
    }
}
