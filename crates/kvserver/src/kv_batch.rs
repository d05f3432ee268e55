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

use proto::kvpb;
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
use crate::spanlatch::Latch;
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
    let outside = reqs.iter().find(|r| {
        let (s, e) = request_span(r);
        !in_desc(&st.desc, s, e)
    });
    if let Some(r) = outside {
        let (s, e) = request_span(r);
        let end = if e.is_empty() {
            storage::keys::next_user_key(s)
        } else {
            e.to_vec()
        };
        let mut descriptors = overlapping(store, s, &end);
        if !descriptors.iter().any(|d| d.range_id == range_id) && !st.desc.end_key.is_empty() {
            descriptors.push(st.desc.clone());
        }
        return error(batch_error::Kind::RangeKeyMismatch(RangeKeyMismatch { descriptors }));
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
    for r in &reqs {
        st.conc.record_load(request_span(r).0);
    }
    let clock = store.clock();
    let max_offset = opts.max_offset.as_nanos() as u64;
    let term = st.term;
    let conc = st.conc.clone();
    // The first request of a lease sets the cache's low-water mark.
    let mut clock_failed = None;
    conc.enter_lease(term, || match clock.now() {
        Ok(t) => Timestamp::new(t.wall.saturating_add(max_offset), 0),
        Err(e) => {
            clock_failed = Some(e.to_string());
            Timestamp::MAX
        }
    });
    if let Some(e) = clock_failed {
        return error(batch_error::Kind::Unavailable(format!("clock: {e}")));
    }
    let mut ts = match req.header.as_ref().and_then(|h| h.timestamp) {
        Some(t) => {
            let t = Timestamp::from(t);
            if t.wall > clock.physical().saturating_add(max_offset) {
                return kv_error(
                    grpc_code::INVALID_ARGUMENT,
                    format!("timestamp {t} is more than the maximum clock offset ahead of this node's clock"),
                );
            }
            if let Err(e) = clock.update(t) {
                return error(batch_error::Kind::Unavailable(format!("clock: {e}")));
            }
            t
        }
        None => match clock.now() {
            Ok(t) => t,
            Err(e) => return error(batch_error::Kind::Unavailable(format!("clock: {e}"))),
        },
    };
    let limit = req.header.as_ref().map_or(0, |h| h.max_span_request_keys);
    let (reads, writes) = batcheval::latch_spans(&reqs);
    let latches: Vec<Latch> = reads
        .iter()
        .map(|s| Latch::read(s.clone(), ts))
        .chain(writes.iter().map(|s| Latch::write(s.clone(), ts)))
        .collect();
    let Ok(_guard) = tokio::time::timeout(opts.write_timeout, conc.latches.acquire(latches)).await else {
        return error(batch_error::Kind::Unavailable(
            "timed out waiting for conflicting requests (latches)".into(),
        ));
    };
    // The lease may have moved while it waited.
    if !store
        .status(range_id)
        .is_some_and(|s| s.term == term && s.can_serve(Instant::now()))
    {
        return not_leaseholder(store, range_id);
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
                return kv_answer(kvpb::BatchResponse {
                    error: Some(e),
                    ..Default::default()
                })
            }
            Err(e) => return kv_error(grpc_code::UNAVAILABLE, e.to_string()),
        }
    };
    conc.record_reads(&reads, ts);
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
    match store.propose(range_id, cmd, opts.write_timeout).await {
        Ok(ApplyOutcome::Kv(Ok(()))) => kv_answer(answer),
        Ok(ApplyOutcome::Kv(Err(why))) => kv_error(grpc_code::UNAVAILABLE, why),
        Ok(other) => kv_error(grpc_code::INTERNAL, format!("unexpected outcome {other:?}")),
        Err(ProposeError::NotLeader { .. } | ProposeError::Dropped | ProposeError::LeaseChanged) => {
            not_leaseholder(store, range_id)
        }
        Err(ProposeError::NoSuchRange(r)) => error(batch_error::Kind::RangeNotFound(r)),
        Err(ProposeError::Clock(c)) => error(batch_error::Kind::Unavailable(format!("clock: {c}"))),
        Err(ProposeError::Ambiguous | ProposeError::Stopped) => {
            error(batch_error::Kind::Ambiguous(proto::kvserver::Ambiguous {}))
        }
    }
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
