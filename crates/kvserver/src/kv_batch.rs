//! The leaseholder's side of native KV batches and meta lookups: evaluation
//! before proposal.
//!
//! A batch for a user range is checked against the range's span (a mismatch
//! is answered `RangeKeyMismatch` with the descriptors this store knows) and
//! the lease, takes its latches (`concurrency`), picks its timestamp (a
//! write goes above every earlier read of its keys the timestamp cache
//! remembers, and above newer versions), is evaluated once (`batcheval`),
//! and its writes are proposed as a `WriteBatch` that every replica applies
//! as it is; the answer comes once it applied, and only then are the latches
//! released. Reads are answered if the lease still holds after they read.
//!
//! Like `evaluator`, it never routes and never retries elsewhere.

use std::time::Instant;

use proto::kvpb::{self, request_union::Value as Req};
use proto::kvserver::{
    batch_error, batch_response, raft_command, BatchError, BatchResponse, RaftCommand, RangeKeyMismatch,
    RangeLookupRequest, RangeLookupResponse,
};
use proto::storage::RangeDescriptor;
use storage::Timestamp;

use crate::batcheval::{self, request_span, EvalError};
use crate::etcd::grpc_code;
use crate::evaluator::{not_leaseholder, EvalOptions};
use crate::replica::{ApplyOutcome, ProposeError};
use crate::spanlatch::{Latch, Span};
use crate::store::StoreHandle;

/// How many times a batch is evaluated again above a newer version.
const MAX_WRITE_TOO_OLD_RETRIES: usize = 10;

fn error(kind: batch_error::Kind) -> BatchResponse {
    BatchResponse {
        response: Some(batch_response::Response::Error(BatchError { kind: Some(kind) })),
    }
}

fn kv_answer(r: kvpb::BatchResponse) -> BatchResponse {
    BatchResponse {
        response: Some(batch_response::Response::Kv(r)),
    }
}

fn kv_error(code: i32, message: String) -> BatchResponse {
    kv_answer(kvpb::BatchResponse {
        error: Some(kvpb::Error {
            code,
            message,
            ..Default::default()
        }),
        ..Default::default()
    })
}

fn in_desc(d: &RangeDescriptor, start: &[u8], end: &[u8]) -> bool {
    let end_ok = if end.is_empty() {
        d.end_key.is_empty() || start < d.end_key.as_slice()
    } else {
        d.end_key.is_empty() || end <= d.end_key.as_slice()
    };
    start >= d.start_key.as_slice() && end_ok
}

/// The descriptors this store holds that overlap `[start, end)`.
fn overlapping(store: &StoreHandle, start: &[u8], end: &[u8]) -> Vec<RangeDescriptor> {
    store
        .statuses()
        .into_iter()
        .map(|s| s.desc)
        .filter(|d| !d.end_key.is_empty() && start < d.end_key.as_slice() && d.start_key.as_slice() < end)
        .collect()
}

/// `RangeKeyMismatch` if some request of `reqs` is not all in `desc`: with
/// the descriptors this store holds overlapping it (the halves of a split
/// the sender has not heard of).
fn mismatch(store: &StoreHandle, desc: &RangeDescriptor, reqs: &[&Req]) -> Option<BatchResponse> {
    let r = reqs.iter().find(|r| {
        let (s, e) = request_span(r);
        !in_desc(desc, s, e)
    })?;
    let (s, e) = request_span(r);
    let end = if e.is_empty() {
        storage::keys::next_user_key(s)
    } else {
        e.to_vec()
    };
    let mut descriptors = overlapping(store, s, &end);
    if !descriptors.iter().any(|d| d.range_id == desc.range_id) && !desc.end_key.is_empty() {
        descriptors.push(desc.clone());
    }
    Some(error(batch_error::Kind::RangeKeyMismatch(RangeKeyMismatch {
        descriptors,
    })))
}

/// A frozen range serves nothing: the sender retries until it is merged
/// away (then it looks the keys up again) or unfrozen.
fn frozen_answer(range_id: u64, merge_id: u64) -> BatchResponse {
    error(batch_error::Kind::Unavailable(format!(
        "range {range_id} is being merged (attempt {merge_id}); try again"
    )))
}

/// Takes a write latch on the whole span of `range_id` at timestamp zero
/// (every request of the range waits, none is in flight) for a command that
/// changes the range itself (a split, a freeze, a merge): returns the
/// range's status once held, with the lease still held in the same term and
/// the span latched still the range's whole span (latched again if a merge
/// grew it meanwhile).
pub(crate) async fn latch_whole_range(
    store: &StoreHandle,
    range_id: u64,
    opts: &EvalOptions,
) -> Result<(crate::ReplicaStatus, crate::spanlatch::Guard), BatchResponse> {
    for _ in 0..5 {
        let Some(st) = store.status(range_id) else {
            return Err(error(batch_error::Kind::RangeNotFound(range_id)));
        };
        if !st.can_serve(Instant::now()) {
            return Err(not_leaseholder(store, range_id));
        }
        let whole = Span::range(&st.desc.start_key, &st.desc.end_key);
        let latched = tokio::time::timeout(
            opts.write_timeout,
            st.conc.latches.acquire(vec![Latch::write(whole, Timestamp::ZERO)]),
        )
        .await;
        let Ok(guard) = latched else {
            return Err(error(batch_error::Kind::Unavailable(
                "timed out waiting for the range's requests (latches)".into(),
            )));
        };
        let Some(now) = store
            .status(range_id)
            .filter(|s| s.term == st.term && s.can_serve(Instant::now()))
        else {
            return Err(not_leaseholder(store, range_id));
        };
        if now.desc.start_key == st.desc.start_key && now.desc.end_key == st.desc.end_key {
            return Ok((now, guard));
        }
    }
    Err(error(batch_error::Kind::Unavailable(format!(
        "range {range_id} keeps changing"
    ))))
}

/// The answer for a proposal that produced no outcome.
pub(crate) fn propose_error(store: &StoreHandle, range_id: u64, e: ProposeError) -> BatchResponse {
    match e {
        ProposeError::NotLeader { .. } | ProposeError::Dropped | ProposeError::LeaseChanged => {
            not_leaseholder(store, range_id)
        }
        ProposeError::NoSuchRange(r) => error(batch_error::Kind::RangeNotFound(r)),
        ProposeError::Clock(c) => error(batch_error::Kind::Unavailable(format!("clock: {c}"))),
        // It may have applied.
        ProposeError::Ambiguous | ProposeError::Stopped => {
            error(batch_error::Kind::Ambiguous(proto::kvserver::Ambiguous {}))
        }
    }
}

/// Proposes an evaluated command and keeps `guard` (its latches) until the
/// command applied or certainly will not, however long that takes: a
/// caller that stops waiting (`wait` passed, the client went away) must not
/// let a conflicting request evaluate while this one may still apply.
pub(crate) async fn propose_holding<G: Send + 'static>(
    store: &StoreHandle,
    range_id: u64,
    cmd: RaftCommand,
    guard: G,
    wait: std::time::Duration,
) -> Result<ApplyOutcome, ProposeError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let s = store.clone();
    tokio::spawn(async move {
        let r = s.propose_evaluated(range_id, cmd).await;
        drop(guard);
        let _ = tx.send(r);
    });
    match tokio::time::timeout(wait, rx).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => Err(ProposeError::Stopped),
        Err(_) => Err(ProposeError::Ambiguous),
    }
}

/// Evaluates a native KV batch for `range_id` here.
pub async fn evaluate(
    store: &StoreHandle,
    range_id: u64,
    req: kvpb::BatchRequest,
    opts: &EvalOptions,
) -> BatchResponse {
    let Some(st) = store.status(range_id) else {
        return error(batch_error::Kind::RangeNotFound(range_id));
    };
    let reqs = match batcheval::validate(&req.requests) {
        Ok(r) => r,
        Err(EvalError::Refused(e)) => {
            return kv_answer(kvpb::BatchResponse {
                error: Some(e),
                ..Default::default()
            })
        }
        Err(e) => return kv_error(grpc_code::INTERNAL, e.to_string()),
    };
    if reqs.is_empty() {
        return kv_answer(kvpb::BatchResponse::default());
    }
    // Every key must be this range's: else the sender's cache is stale.
    if let Some(answer) = mismatch(store, &st.desc, &reqs) {
        return answer;
    }
    if !crate::keyspace::splittable(range_id) {
        return kv_error(
            grpc_code::INVALID_ARGUMENT,
            format!("range {range_id} does not serve the native KV API"),
        );
    }
    if !st.can_serve(Instant::now()) {
        return not_leaseholder(store, range_id);
    }
    if let Some(f) = &st.frozen {
        return frozen_answer(range_id, f.merge_id);
    }
    for r in &reqs {
        st.conc.record_load(request_span(r).0);
    }
    let clock = store.clock();
    let max_offset = opts.max_offset.as_nanos() as u64;
    let term = st.term;
    let conc = st.conc.clone();
    // The first request of a lease sets the cache's low-water mark.
    let entered = conc.enter_lease(term, || {
        clock
            .now()
            .map(|t| Timestamp::new(t.wall.saturating_add(max_offset), 0))
    });
    if let Err(e) = entered {
        return error(batch_error::Kind::Unavailable(format!("clock: {e}")));
    }
    let mut ts = match clock.now() {
        Ok(now) => match req.header.as_ref().and_then(|h| h.timestamp) {
            // A timestamp from the client: never above this leaseholder's
            // clock (no read here may be above what the next lease's
            // low-water mark will cover).
            Some(t) if Timestamp::from(t) > now => {
                return kv_error(
                    grpc_code::INVALID_ARGUMENT,
                    format!(
                        "timestamp {} is ahead of the leaseholder's clock ({now}): ask again without one, or later",
                        Timestamp::from(t)
                    ),
                )
            }
            Some(t) => Timestamp::from(t),
            None => now,
        },
        Err(e) => return error(batch_error::Kind::Unavailable(format!("clock: {e}"))),
    };
    let limit = req.header.as_ref().map_or(0, |h| h.max_span_request_keys);
    let (reads, writes) = batcheval::latch_spans(&reqs);
    // A batch that writes may be moved to a later timestamp after it
    // latched; its reads then happen there: latch them at every timestamp.
    let read_latch_ts = if writes.is_empty() { ts } else { Timestamp::MAX };
    let latches: Vec<Latch> = reads
        .iter()
        .map(|s| Latch::read(s.clone(), read_latch_ts))
        .chain(writes.iter().map(|s| Latch::write(s.clone(), ts)))
        .collect();
    let Ok(guard) = tokio::time::timeout(opts.write_timeout, conc.latches.acquire(latches)).await else {
        return error(batch_error::Kind::Unavailable(
            "timed out waiting for conflicting requests (latches)".into(),
        ));
    };
    // While it waited, the lease may have moved, or the range split (a
    // split holds every latch of the range until it applied).
    let Some(st) = store
        .status(range_id)
        .filter(|s| s.term == term && s.can_serve(Instant::now()))
    else {
        return not_leaseholder(store, range_id);
    };
    if let Some(answer) = mismatch(store, &st.desc, &reqs) {
        return answer;
    }
    if let Some(f) = &st.frozen {
        return frozen_answer(range_id, f.merge_id);
    }
    if !writes.is_empty() {
        ts = ts.max(conc.min_write_ts(&writes));
    }
    let mut tries = 0;
    let ev = loop {
        match batcheval::evaluate(store.engine().batch(), &reqs, ts, limit) {
            Ok(ev) => break ev,
            Err(EvalError::WriteTooOld(retry)) if tries < MAX_WRITE_TOO_OLD_RETRIES => {
                tries += 1;
                ts = ts.max(retry);
            }
            Err(EvalError::Refused(e)) => {
                // A failed condition read its key: later writes go above.
                conc.record_reads(&read_spans(&reqs), ts);
                return kv_answer(kvpb::BatchResponse {
                    error: Some(e),
                    ..Default::default()
                });
            }
            Err(e) => return kv_error(grpc_code::UNAVAILABLE, e.to_string()),
        }
    };
    conc.record_reads(&read_spans(&reqs), ts);
    let answer = kvpb::BatchResponse {
        timestamp: Some(ts.into()),
        responses: ev.responses,
        error: None,
    };
    let Some(write) = ev.write else {
        // A read: served only if the lease held to the end of it.
        if !store
            .status(range_id)
            .is_some_and(|s| s.term == term && s.can_serve(Instant::now()))
        {
            return not_leaseholder(store, range_id);
        }
        return kv_answer(answer);
    };
    let cmd = RaftCommand {
        proposer_term: term,
        op: Some(raft_command::Op::WriteBatch(write)),
        ..Default::default()
    };
    match propose_holding(store, range_id, cmd, guard, opts.write_timeout).await {
        Ok(ApplyOutcome::Kv(Ok(()))) => kv_answer(answer),
        Ok(ApplyOutcome::Kv(Err(why))) => kv_error(grpc_code::UNAVAILABLE, why),
        Ok(other) => kv_error(grpc_code::INTERNAL, format!("unexpected outcome {other:?}")),
        Err(e) => propose_error(store, range_id, e),
    }
}

/// The spans a batch read, for the timestamp cache: its Gets and scans,
/// the keys its conditions and increments read, and the spans its range
/// deletes found empty or not (a later write there must go above them).
fn read_spans(reqs: &[&Req]) -> Vec<Span> {
    reqs.iter()
        .filter(|r| !matches!(r, Req::Put(_) | Req::Delete(_)))
        .map(|r| {
            let (s, e) = request_span(r);
            if e.is_empty() {
                Span::key(s)
            } else {
                Span::range(s, e)
            }
        })
        .collect()
}

/// Answers a meta lookup on the system range, under its lease.
pub fn range_lookup(store: &StoreHandle, range_id: u64, req: &RangeLookupRequest) -> BatchResponse {
    let Some(st) = store.status(range_id) else {
        return error(batch_error::Kind::RangeNotFound(range_id));
    };
    if !st.can_serve(Instant::now()) {
        return not_leaseholder(store, range_id);
    }
    let ts = match store.clock().now() {
        Ok(t) => t,
        Err(e) => return error(batch_error::Kind::Unavailable(format!("clock: {e}"))),
    };
    let found = crate::meta::lookup(store.engine(), &req.key, req.prefetch.min(64), ts);
    if !store
        .status(range_id)
        .is_some_and(|s| s.term == st.term && s.can_serve(Instant::now()))
    {
        return not_leaseholder(store, range_id);
    }
    match found {
        Ok(descriptors) => BatchResponse {
            response: Some(batch_response::Response::RangeLookup(RangeLookupResponse {
                descriptors,
            })),
        },
        Err(e) => error(batch_error::Kind::Unavailable(format!("meta lookup: {e}"))),
    }
}
