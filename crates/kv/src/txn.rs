//! The transaction coordinator (CockroachDB's TxnCoordSender): drives one
//! serializable transaction over any `BatchSender` (the node's DistSender,
//! or a gRPC client of the native KV API).
//!
//! A transaction takes its timestamps from the gateway's clock with its
//! first batch; reads happen at its read timestamp, writes lay intents at
//! its write timestamp. It remembers the spans it read (to refresh them)
//! and the keys it wrote (its lock spans, condensed past a bound, which the
//! commit hands to the record for intent resolution). The first batch that
//! writes names the anchor key (the first key written) and, unless it also
//! commits, creates the record there with a heartbeat, renewed every
//! `HEARTBEAT_INTERVAL` while the transaction runs.
//!
//! When a range moves the write timestamp up (an earlier read of a key it
//! writes, a newer version) or a read meets a value inside the uncertainty
//! interval, the coordinator refreshes its read spans to the new timestamp
//! (checks nothing was written there since it read) and carries on there;
//! if the refresh fails, the transaction restarts (epoch + 1, keeping its
//! intents and heartbeating its record) and the caller's closure runs
//! again (`run`). An aborted transaction (expired, or a deadlock's victim)
//! starts over as a new one. Errors that reach a
//! caller who retries by hand say whether they are retryable
//! (`TxnError::is_retryable`: SQLSTATE 40001 in the SQL layer).
//!
//! It never evaluates anything itself and never talks to a store except
//! through its sender.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use proto::kvpb::{self, request_union::Value as Req, response_union::Value as Resp, txn_error::Kind};

use crate::dist_sender::{DistError, DistSender, RangeSender};

/// How often a running transaction heartbeats its record.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// Past this many lock (or read) spans, neighbours are merged into
/// covering spans, so a commit stays small whatever the transaction wrote.
pub const MAX_TRACKED_SPANS: usize = 1_000;
/// How many times `run` tries a transaction before giving up.
pub const MAX_ATTEMPTS: usize = 100;

/// Sends one native KV batch and returns the answer.
pub trait BatchSender: Send + Sync + 'static {
    fn send_batch(
        &self,
        req: kvpb::BatchRequest,
    ) -> impl Future<Output = Result<kvpb::BatchResponse, DistError>> + Send;
}

impl<S: RangeSender> BatchSender for DistSender<S> {
    async fn send_batch(&self, req: kvpb::BatchRequest) -> Result<kvpb::BatchResponse, DistError> {
        self.send(req).await
    }
}

impl BatchSender for kvpb::kv_client::KvClient<tonic::transport::Channel> {
    async fn send_batch(&self, req: kvpb::BatchRequest) -> Result<kvpb::BatchResponse, DistError> {
        let mut c = self.clone();
        match c.batch(req).await {
            Ok(r) => Ok(r.into_inner()),
            Err(s) => Err(match s.code() {
                tonic::Code::Unknown | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => DistError::Ambiguous,
                tonic::Code::InvalidArgument => DistError::InvalidArgument(s.message().into()),
                _ => DistError::Unavailable(s.message().into()),
            }),
        }
    }
}

/// Why a transaction (or one of its requests) failed.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum TxnError {
    /// The transaction must run again (a conflict, a moved timestamp whose
    /// reads did not hold, an abort): SQLSTATE 40001.
    #[error("restart transaction: {0}")]
    Retry(String),
    /// The commit may or may not have happened.
    #[error("result is ambiguous: {0}")]
    Ambiguous(String),
    /// A request was refused (a failed condition, bad input): nothing of it
    /// applied; the transaction can go on or roll back.
    #[error("{message}")]
    Refused {
        code: i32,
        message: String,
        condition_failed: Option<kvpb::ConditionFailed>,
    },
    /// No answer (no leaseholder, timeouts); nothing is known to have
    /// committed.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The transaction already committed or rolled back.
    #[error("the transaction is finished")]
    Finished,
}

impl TxnError {
    /// Whether running the transaction again may succeed (SQLSTATE 40001).
    pub fn is_retryable(&self) -> bool {
        matches!(self, TxnError::Retry(_))
    }
}

impl From<DistError> for TxnError {
    fn from(e: DistError) -> Self {
        match e {
            DistError::Ambiguous => TxnError::Ambiguous("a request's outcome is unknown".into()),
            DistError::Unavailable(m) => TxnError::Unavailable(m),
            DistError::InvalidArgument(m) => TxnError::Refused {
                code: 3,
                message: m,
                condition_failed: None,
            },
        }
    }
}

fn ts_key(t: &Option<proto::storage::Timestamp>) -> (u64, u32) {
    t.map_or((0, 0), |t| (t.wall_nanos, t.logical))
}

/// A key or span: `end` empty for one key.
type Span = (Vec<u8>, Vec<u8>);

fn to_proto(s: &Span) -> kvpb::Span {
    kvpb::Span {
        start_key: s.0.clone(),
        end_key: s.1.clone(),
    }
}

/// Sorts and merges `spans`, then merges neighbours until at most `max`.
pub fn condense(spans: &mut Vec<(Vec<u8>, Vec<u8>)>, max: usize) {
    let end_of = |s: &Span| {
        if s.1.is_empty() {
            let mut e = s.0.clone();
            e.push(0);
            e
        } else {
            s.1.clone()
        }
    };
    spans.sort();
    let mut out: Vec<Span> = Vec::with_capacity(spans.len());
    for s in spans.drain(..) {
        if let Some(last) = out.last_mut() {
            let le = end_of(last);
            if s.0 < le || (s.0 == le && !last.1.is_empty()) {
                // Overlapping, or a span touching the next: one span.
                let e = end_of(&s).max(le);
                *last = (last.0.clone(), e);
                continue;
            }
            if s.0 == last.0 && s.1.is_empty() {
                continue;
            }
        }
        out.push(s);
    }
    // Too many: merge runs of neighbours into spans covering them.
    if out.len() > max && max > 0 {
        let group = out.len().div_ceil(max);
        out = out
            .chunks(group)
            .map(|c| {
                if c.len() == 1 {
                    c[0].clone()
                } else {
                    (c[0].0.clone(), end_of(&c[c.len() - 1]))
                }
            })
            .collect();
    }
    *spans = out;
}

/// Shared with the heartbeat task: the transaction as last known.
struct Shared {
    proto: kvpb::Transaction,
    /// Set when a heartbeat found the record aborted.
    aborted: bool,
}

/// One transaction. Dropping it without `commit` or `rollback` leaves its
/// intents until its record expires and someone meets them.
pub struct Txn<S: BatchSender> {
    sender: Arc<S>,
    shared: Arc<Mutex<Shared>>,
    reads: Vec<Span>,
    locks: Vec<Span>,
    /// Whether a batch with writes was sent (so no 1PC any more).
    wrote: bool,
    heartbeat: Option<tokio::task::JoinHandle<()>>,
    finished: bool,
    /// Writes to send with the commit (`write_at_commit`).
    deferred: Vec<Req>,
    /// Refreshes this transaction made (they moved it, and it went on).
    pub refreshes: u64,
}

impl<S: BatchSender> Drop for Txn<S> {
    fn drop(&mut self) {
        if let Some(h) = self.heartbeat.take() {
            h.abort();
        }
    }
}

fn random_bytes() -> [u8; 16] {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut out = [0u8; 16];
    for (i, chunk) in out.chunks_mut(8).enumerate() {
        let mut h = RandomState::new().build_hasher();
        h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        h.write_usize(i);
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        chunk.copy_from_slice(&h.finish().to_le_bytes());
    }
    out
}

impl<S: BatchSender> Txn<S> {
    /// Begins a transaction (no request is sent until its first one).
    pub fn begin(sender: Arc<S>) -> Txn<S> {
        Self::begin_with_priority(sender, 0)
    }

    /// Begins a transaction whose priority is at least `min_priority`.
    pub fn begin_with_priority(sender: Arc<S>, min_priority: i32) -> Txn<S> {
        let id = random_bytes();
        let priority = (i32::from_le_bytes([id[0], id[1], id[2], 0]) & 0xF_FFFF)
            .max(1)
            .max(min_priority);
        Txn {
            sender,
            shared: Arc::new(Mutex::new(Shared {
                proto: kvpb::Transaction {
                    id: id.to_vec(),
                    priority,
                    ..Default::default()
                },
                aborted: false,
            })),
            reads: Vec::new(),
            locks: Vec::new(),
            wrote: false,
            heartbeat: None,
            finished: false,
            deferred: Vec::new(),
            refreshes: 0,
        }
    }

    /// Writes `reqs` with the commit, in the same batch: one round fewer,
    /// and one raft command (1PC) when they are the transaction's only
    /// writes and lie on one range. Later reads in the transaction do not
    /// see them.
    pub fn write_at_commit(&mut self, reqs: Vec<Req>) {
        self.deferred.extend(reqs);
    }

    /// The transaction as it stands (id, epoch, timestamps).
    pub fn proto(&self) -> kvpb::Transaction {
        self.shared.lock().proto.clone()
    }

    pub fn priority(&self) -> i32 {
        self.shared.lock().proto.priority
    }

    /// Sends `reqs` in the transaction: the answers, one per request.
    pub async fn send(&mut self, reqs: Vec<Req>) -> Result<Vec<Resp>, TxnError> {
        self.send_inner(reqs, false).await
    }

    async fn send_inner(&mut self, mut reqs: Vec<Req>, committing: bool) -> Result<Vec<Resp>, TxnError> {
        if self.finished {
            return Err(TxnError::Finished);
        }
        if self.shared.lock().aborted {
            return Err(TxnError::Retry("the transaction was aborted".into()));
        }
        let writes: Vec<Span> = reqs
            .iter()
            .filter(|r| is_write(r))
            .map(|r| {
                let (s, e) = r.span();
                (s.to_vec(), e.to_vec())
            })
            .collect();
        // The first write names the anchor (and creates the record, unless
        // this batch commits too: then a record is made only if needed).
        let mut heartbeat_added = false;
        if !writes.is_empty() {
            let mut g = self.shared.lock();
            if g.proto.key.is_empty() {
                g.proto.key = writes[0].0.clone();
            }
            if !committing && self.heartbeat.is_none() {
                reqs.insert(
                    0,
                    Req::HeartbeatTxn(kvpb::HeartbeatTxnRequest {
                        key: g.proto.key.clone(),
                    }),
                );
                heartbeat_added = true;
            }
        }
        // Every write is a lock span from the moment it is sent: if its
        // outcome is unknown, the cleanup must still cover it.
        self.locks.extend(writes.iter().cloned());
        condense(&mut self.locks, MAX_TRACKED_SPANS);
        if committing {
            let one_phase = !self.wrote;
            let no_reads = self.reads.is_empty() && !reqs.iter().any(is_read);
            let key = self.shared.lock().proto.key.clone();
            reqs.push(Req::EndTxn(kvpb::EndTxnRequest {
                key,
                commit: true,
                lock_spans: self.locks.iter().map(to_proto).collect(),
                one_phase,
                no_reads,
            }));
        }
        if !writes.is_empty() {
            // From now on intents may exist: no 1PC any more.
            self.wrote = true;
        }
        let mut tries = 0;
        let out = loop {
            tries += 1;
            let txn = self.shared.lock().proto.clone();
            let req = kvpb::BatchRequest {
                header: Some(kvpb::Header {
                    txn: Some(txn),
                    ..Default::default()
                }),
                requests: reqs
                    .iter()
                    .map(|r| kvpb::RequestUnion { value: Some(r.clone()) })
                    .collect(),
            };
            let resp = match self.sender.send_batch(req).await {
                Ok(r) => r,
                Err(DistError::Ambiguous) if committing => {
                    return Err(TxnError::Ambiguous("the commit's outcome is unknown".into()))
                }
                Err(DistError::Ambiguous) => {
                    // Its intents may or may not be there (they are in the
                    // lock spans either way): start the next epoch.
                    self.restart(None);
                    return Err(TxnError::Retry("a write's outcome is unknown".into()));
                }
                Err(e) => return Err(e.into()),
            };
            self.adopt(resp.txn.as_ref());
            let Some(err) = resp.error else {
                break resp.responses;
            };
            let Some(te) = err.txn_error.clone() else {
                // A refused condition still read its key (the server put
                // the read in its timestamp cache): refresh it like any.
                for r in &reqs {
                    if is_read(r) {
                        let (s, e) = r.span();
                        self.reads.push((s.to_vec(), e.to_vec()));
                    }
                }
                condense(&mut self.reads, MAX_TRACKED_SPANS);
                return Err(TxnError::Refused {
                    code: err.code,
                    message: err.message,
                    condition_failed: err.condition_failed,
                });
            };
            let retry_ts = te.retry_timestamp;
            match Kind::try_from(te.kind) {
                Ok(Kind::WriteTooOld) | Ok(Kind::Uncertain) | Ok(Kind::Retry) if tries < 20 && resend_safe(&reqs) => {
                    // Move to the timestamp the range asked for, if the
                    // reads so far still hold there.
                    let to = {
                        let g = self.shared.lock();
                        let w = g.proto.write_timestamp;
                        if ts_key(&retry_ts) > ts_key(&w) {
                            retry_ts
                        } else {
                            w
                        }
                    };
                    if let Err(e) = self.refresh(to).await {
                        self.restart(to);
                        return Err(e);
                    }
                }
                Ok(Kind::Aborted) => {
                    self.shared.lock().aborted = true;
                    return Err(TxnError::Retry(te.reason));
                }
                _ => {
                    self.restart(retry_ts);
                    return Err(TxnError::Retry(te.reason));
                }
            }
        };
        if heartbeat_added {
            self.start_heartbeat();
        }
        let mut out = out
            .into_iter()
            .map(|r| r.value.unwrap_or(Resp::Get(Default::default())));
        if heartbeat_added {
            out.next();
        }
        let out: Vec<Resp> = out.collect();
        for r in &reqs {
            if is_read(r) {
                let (s, e) = r.span();
                self.reads.push((s.to_vec(), e.to_vec()));
            }
        }
        condense(&mut self.reads, MAX_TRACKED_SPANS);
        Ok(out)
    }

    /// Takes the timestamps a range gave the transaction (the first batch
    /// sets them; later ones may move the write timestamp up).
    fn adopt(&self, t: Option<&kvpb::Transaction>) {
        let Some(t) = t else { return };
        let mut g = self.shared.lock();
        if g.proto.read_timestamp.is_none() {
            g.proto.read_timestamp = t.read_timestamp;
            g.proto.uncertainty_limit = t.uncertainty_limit;
            g.proto.min_timestamp = t.min_timestamp;
        }
        if ts_key(&t.write_timestamp) > ts_key(&g.proto.write_timestamp) {
            g.proto.write_timestamp = t.write_timestamp;
        }
    }

    /// Re-checks every span read so far at `to`, and moves there.
    async fn refresh(&mut self, to: Option<proto::storage::Timestamp>) -> Result<(), TxnError> {
        let mut next = self.shared.lock().proto.clone();
        let from = next.read_timestamp;
        if ts_key(&to) <= ts_key(&from) {
            return Ok(());
        }
        next.read_timestamp = to;
        if ts_key(&to) > ts_key(&next.write_timestamp) {
            next.write_timestamp = to;
        }
        if !self.reads.is_empty() {
            let req = kvpb::BatchRequest {
                header: Some(kvpb::Header {
                    txn: Some(next.clone()),
                    ..Default::default()
                }),
                requests: self
                    .reads
                    .iter()
                    .map(|(s, e)| kvpb::RequestUnion {
                        value: Some(Req::Refresh(kvpb::RefreshRequest {
                            key: s.clone(),
                            end_key: e.clone(),
                            from,
                        })),
                    })
                    .collect(),
            };
            let resp = self.sender.send_batch(req).await?;
            if let Some(e) = resp.error {
                return Err(TxnError::Retry(format!("refresh failed: {}", e.message)));
            }
        }
        self.refreshes += 1;
        let mut g = self.shared.lock();
        g.proto.read_timestamp = next.read_timestamp;
        g.proto.write_timestamp = next.write_timestamp;
        Ok(())
    }

    /// Starts the next epoch at `ts` (or the write timestamp): earlier
    /// intents are ignored from now on and discarded at commit.
    fn restart(&mut self, ts: Option<proto::storage::Timestamp>) {
        let mut g = self.shared.lock();
        let at = if ts_key(&ts) > ts_key(&g.proto.write_timestamp) {
            ts
        } else {
            g.proto.write_timestamp
        };
        g.proto.epoch += 1;
        g.proto.read_timestamp = at;
        g.proto.write_timestamp = at;
        self.reads.clear();
    }

    /// Heartbeats at once (creating the record if the transaction has
    /// none yet), then every `HEARTBEAT_INTERVAL`.
    fn start_heartbeat_now(&mut self) {
        self.start_heartbeat_after(Duration::ZERO)
    }

    fn start_heartbeat(&mut self) {
        self.start_heartbeat_after(HEARTBEAT_INTERVAL)
    }

    fn start_heartbeat_after(&mut self, first: Duration) {
        if self.heartbeat.is_some() {
            return;
        }
        let sender = self.sender.clone();
        let shared = self.shared.clone();
        self.heartbeat = Some(tokio::spawn(async move {
            let mut wait = first;
            loop {
                tokio::time::sleep(wait).await;
                wait = HEARTBEAT_INTERVAL;
                let txn = shared.lock().proto.clone();
                let req = kvpb::BatchRequest {
                    header: Some(kvpb::Header {
                        txn: Some(txn.clone()),
                        ..Default::default()
                    }),
                    requests: vec![kvpb::RequestUnion {
                        value: Some(Req::HeartbeatTxn(kvpb::HeartbeatTxnRequest { key: txn.key })),
                    }],
                };
                if let Ok(r) = sender.send_batch(req).await {
                    if r.error.and_then(|e| e.txn_error).map(|t| t.kind) == Some(Kind::Aborted as i32) {
                        shared.lock().aborted = true;
                        return;
                    }
                }
            }
        }));
    }

    pub async fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, TxnError> {
        match self
            .send(vec![Req::Get(kvpb::GetRequest { key: key.to_vec() })])
            .await?
            .pop()
        {
            Some(Resp::Get(g)) => Ok(g.kv.map(|kv| kv.value)),
            other => Err(TxnError::Unavailable(format!("unexpected answer {other:?}"))),
        }
    }

    pub async fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), TxnError> {
        self.send(vec![put(key, value)]).await.map(|_| ())
    }

    pub async fn delete(&mut self, key: &[u8]) -> Result<(), TxnError> {
        self.send(vec![Req::Delete(kvpb::DeleteRequest { key: key.to_vec() })])
            .await
            .map(|_| ())
    }

    /// Writes `value` if the key's value is `expected` (None: absent).
    pub async fn cput(&mut self, key: &[u8], value: &[u8], expected: Option<&[u8]>) -> Result<(), TxnError> {
        self.send(vec![Req::ConditionalPut(kvpb::ConditionalPutRequest {
            key: key.to_vec(),
            value: value.to_vec(),
            exp_value: expected.unwrap_or_default().to_vec(),
            exp_absent: expected.is_none(),
        })])
        .await
        .map(|_| ())
    }

    /// Deletes every key in `[start, end)`; returns how many there were.
    pub async fn delete_range(&mut self, start: &[u8], end: &[u8]) -> Result<i64, TxnError> {
        match self
            .send(vec![Req::DeleteRange(kvpb::DeleteRangeRequest {
                start_key: start.to_vec(),
                end_key: end.to_vec(),
                return_keys: false,
            })])
            .await?
            .pop()
        {
            Some(Resp::DeleteRange(d)) => Ok(d.deleted),
            other => Err(TxnError::Unavailable(format!("unexpected answer {other:?}"))),
        }
    }

    /// Every key and value in `[start, end)`.
    pub async fn scan(&mut self, start: &[u8], end: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>, TxnError> {
        match self
            .send(vec![Req::Scan(kvpb::ScanRequest {
                start_key: start.to_vec(),
                end_key: end.to_vec(),
            })])
            .await?
            .pop()
        {
            Some(Resp::Scan(s)) => Ok(s.rows.into_iter().map(|kv| (kv.key, kv.value)).collect()),
            other => Err(TxnError::Unavailable(format!("unexpected answer {other:?}"))),
        }
    }

    /// Commits.
    pub async fn commit(self) -> Result<(), TxnError> {
        self.commit_with(Vec::new()).await.map(|_| ())
    }

    /// Sends `reqs` and commits in the same batch: with no earlier writes
    /// and every key on one range, that is one raft command (1PC). Returns
    /// the answers to `reqs`.
    pub async fn commit_with(mut self, mut reqs: Vec<Req>) -> Result<Vec<Resp>, TxnError> {
        if self.finished {
            return Err(TxnError::Finished);
        }
        let deferred = std::mem::take(&mut self.deferred);
        reqs.extend(deferred);
        let read_only = !self.wrote && !reqs.iter().any(is_write);
        if read_only {
            // Nothing to commit: the reads held at the read timestamp.
            let out = if reqs.is_empty() {
                Vec::new()
            } else {
                self.send(reqs).await?
            };
            self.finished = true;
            return Ok(out);
        }
        let n = reqs.len();
        let out = self.send_inner(reqs, true).await;
        self.finished = true;
        if let Some(h) = self.heartbeat.take() {
            h.abort();
        }
        let mut out = match out {
            Ok(o) => o,
            Err(e) => {
                if !matches!(e, TxnError::Ambiguous(_)) {
                    self.finished = false;
                    self.rollback_inner().await;
                }
                return Err(e);
            }
        };
        out.truncate(n);
        Ok(out)
    }

    /// Rolls back: the record is marked ABORTED and the intents removed.
    pub async fn rollback(mut self) {
        self.rollback_inner().await
    }

    async fn rollback_inner(&mut self) {
        if let Some(h) = self.heartbeat.take() {
            h.abort();
        }
        if self.finished || self.locks.is_empty() {
            self.finished = true;
            return;
        }
        self.finished = true;
        let txn = self.shared.lock().proto.clone();
        if txn.key.is_empty() || txn.read_timestamp.is_none() {
            return;
        }
        let req = kvpb::BatchRequest {
            header: Some(kvpb::Header {
                txn: Some(txn.clone()),
                ..Default::default()
            }),
            requests: vec![kvpb::RequestUnion {
                value: Some(Req::EndTxn(kvpb::EndTxnRequest {
                    key: txn.key,
                    commit: false,
                    lock_spans: self.locks.iter().map(to_proto).collect(),
                    one_phase: false,
                    no_reads: true,
                })),
            }],
        };
        // Best effort: if it fails, the record expires and whoever meets
        // the intents cleans them up.
        let _ = self.sender.send_batch(req).await;
    }

    /// Prepares this transaction to run again after a retryable error: a
    /// restart (next epoch at the timestamp it was pushed to, keeping its
    /// intents, and so its place, until it overwrites or commits them) or,
    /// if it was aborted, a new transaction with at least its priority.
    async fn next_attempt(mut self) -> Txn<S> {
        if let Some(h) = self.heartbeat.take() {
            h.abort();
        }
        self.deferred.clear();
        let aborted = self.shared.lock().aborted;
        if aborted || self.finished {
            let prio = self.priority();
            return Txn::begin_with_priority(self.sender.clone(), prio);
        }
        // Its intents stay: a record and heartbeats keep it from being
        // taken for dead while it runs again.
        if self.wrote {
            self.start_heartbeat_now();
        }
        self
    }
}

/// Whether a batch may be sent again in the same epoch after part of it
/// may have applied (on other ranges): only if doing it twice reads and
/// writes the same, i.e. its writes are blind puts and deletes and none of
/// its reads is of a key it writes. Otherwise the transaction restarts.
fn resend_safe(reqs: &[Req]) -> bool {
    let written: Vec<(&[u8], &[u8])> = reqs.iter().filter(|r| is_write(r)).map(|r| r.span()).collect();
    reqs.iter().all(|r| match r {
        Req::Put(_) | Req::Delete(_) | Req::EndTxn(_) | Req::HeartbeatTxn(_) => true,
        Req::Get(_) | Req::Scan(_) | Req::ReverseScan(_) => {
            let (s, e) = r.span();
            !written.iter().any(|(ws, we)| {
                let w_end = if we.is_empty() {
                    [*ws, &[0u8][..]].concat()
                } else {
                    we.to_vec()
                };
                let r_end = if e.is_empty() {
                    [s, &[0u8][..]].concat()
                } else {
                    e.to_vec()
                };
                *ws < r_end.as_slice() && s < w_end.as_slice()
            })
        }
        _ => false,
    })
}

fn is_write(r: &Req) -> bool {
    matches!(
        r,
        Req::Put(_) | Req::ConditionalPut(_) | Req::Delete(_) | Req::Increment(_) | Req::DeleteRange(_)
    )
}

fn is_read(r: &Req) -> bool {
    matches!(
        r,
        Req::Get(_)
            | Req::Scan(_)
            | Req::ReverseScan(_)
            | Req::ConditionalPut(_)
            | Req::Increment(_)
            | Req::DeleteRange(_)
    )
}

/// A put request.
pub fn put(key: &[u8], value: &[u8]) -> Req {
    Req::Put(kvpb::PutRequest {
        key: key.to_vec(),
        value: value.to_vec(),
    })
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What `run` reports besides the closure's result.
#[derive(Clone, Copy, Debug, Default)]
pub struct RunStats {
    /// Attempts beyond the first.
    pub retries: u64,
    pub refreshes: u64,
}

/// Runs `body` in a transaction and commits, running it again (with
/// backoff) while the error is retryable. `body` must not commit.
pub async fn run<S, T, F>(sender: Arc<S>, mut body: F) -> (Result<T, TxnError>, RunStats)
where
    S: BatchSender,
    T: Send,
    F: for<'a> FnMut(&'a mut Txn<S>) -> BoxFuture<'a, Result<T, TxnError>>,
{
    let mut txn = Txn::begin(sender);
    let mut stats = RunStats::default();
    let mut backoff = Duration::from_millis(2);
    for attempt in 0..MAX_ATTEMPTS {
        let r = body(&mut txn).await;
        stats.refreshes += txn.refreshes;
        txn.refreshes = 0;
        let e = match r {
            Ok(v) => {
                let t = txn;
                let refreshes_before = t.refreshes;
                let committed = t.commit_with_stats().await;
                stats.refreshes += committed.1.saturating_sub(refreshes_before);
                match committed.0 {
                    Ok(()) => return (Ok(v), stats),
                    Err(e) if e.is_retryable() => {
                        txn = committed.2;
                        e
                    }
                    Err(e) => {
                        if !matches!(e, TxnError::Ambiguous(_)) {
                            let mut t = committed.2;
                            t.finished = false;
                            t.rollback_inner().await;
                        }
                        return (Err(e), stats);
                    }
                }
            }
            Err(e) if e.is_retryable() => e,
            Err(e) => {
                txn.rollback().await;
                return (Err(e), stats);
            }
        };
        if attempt + 1 == MAX_ATTEMPTS {
            txn.rollback().await;
            return (Err(e), stats);
        }
        stats.retries += 1;
        txn = txn.next_attempt().await;
        let jitter = u64::from(random_bytes()[0]) % (backoff.as_millis() as u64 + 1);
        tokio::time::sleep(backoff / 2 + Duration::from_millis(jitter)).await;
        backoff = (backoff * 2).min(Duration::from_millis(200));
    }
    (Err(TxnError::Retry("too many attempts".into())), stats)
}

impl<S: BatchSender> Txn<S> {
    /// Commits; on a retryable failure hands the transaction back (to run
    /// again) with its refresh count.
    async fn commit_with_stats(mut self) -> (Result<(), TxnError>, u64, Txn<S>) {
        let deferred = std::mem::take(&mut self.deferred);
        if !self.wrote && deferred.is_empty() {
            self.finished = true;
            let r = self.refreshes;
            return (Ok(()), r, self);
        }
        let r = self.send_inner(deferred, true).await;
        if let Some(h) = self.heartbeat.take() {
            h.abort();
        }
        let refreshes = self.refreshes;
        match r {
            Ok(_) => {
                self.finished = true;
                (Ok(()), refreshes, self)
            }
            Err(e) => (Err(e), refreshes, self),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(a: &str, b: &str) -> Span {
        (a.as_bytes().to_vec(), b.as_bytes().to_vec())
    }

    #[test]
    fn condensing_merges_overlaps_and_bounds_the_count() {
        let mut v = vec![s("c", ""), s("a", "b"), s("a", ""), s("b", "c"), s("x", ""), s("c", "")];
        condense(&mut v, 100);
        // [a, b) and [b, c) touch; the point c is just after: [a, c\0).
        assert_eq!(v, vec![s("a", "c\0"), s("x", "")]);
        let mut many: Vec<Span> = (0..10_000u32)
            .map(|i| (format!("k{i:05}").into_bytes(), Vec::new()))
            .collect();
        condense(&mut many, 100);
        assert!(many.len() <= 100, "{}", many.len());
        // Still covering every key.
        for i in (0..10_000u32).step_by(37) {
            let k = format!("k{i:05}").into_bytes();
            assert!(
                many.iter()
                    .any(|(a, b)| (b.is_empty() && *a == k) || (*a <= k && k < *b)),
                "{i} not covered"
            );
        }
    }
}
