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
//! A transaction's batch reads at its read timestamp and writes intents at
//! its write timestamp (see `batcheval`, `txn_eval`).
//!
//! A batch that meets other transactions' intents releases its latches,
//! waits for those transactions (`intent_resolver`, which pushes them) and
//! is evaluated again; a lone push of a live transaction waits here in the
//! store's `txnwait` queue. Like `evaluator`, it never routes by itself:
//! what it sends elsewhere goes through `EvalOptions::router`.

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
/// How far ahead of this node's clock a transaction's timestamp may be (at
/// least; ten maximum offsets if that is more).
const MAX_TXN_AHEAD_NANOS: u64 = 60_000_000_000;

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

/// What one evaluation came to.
enum Once {
    Answer(Box<BatchResponse>),
    /// Intents of other transactions are in the way (latches released).
    Conflict(Vec<storage::mvcc::Intent>),
}

fn txn_answer(e: kvpb::TxnError, txn: Option<kvpb::Transaction>) -> BatchResponse {
    kv_answer(kvpb::BatchResponse {
        error: Some(kvpb::Error {
            code: grpc_code::ABORTED,
            message: e.reason.clone(),
            txn_error: Some(e),
            ..Default::default()
        }),
        txn,
        ..Default::default()
    })
}

/// Waits until this node's clock passed `at` (at most a bounded time: a
/// timestamp further ahead than the transaction bound was refused before).
async fn commit_wait(clock: &crate::hlc::Clock, at: Timestamp, max_offset: u64) {
    let bound = max_offset.saturating_mul(10).max(MAX_TXN_AHEAD_NANOS);
    let ahead = at.wall.saturating_sub(clock.physical()).min(bound);
    if ahead > 0 {
        tokio::time::sleep(std::time::Duration::from_nanos(ahead)).await;
    }
}

/// A batch that waited for other transactions until its deadline: for a
/// transaction, a retryable error (it restarts, its intents stay its own);
/// otherwise unavailable.
fn waited_too_long(why: String, txn: Option<kvpb::Transaction>) -> BatchResponse {
    match txn {
        Some(t) => txn_answer(
            kvpb::TxnError {
                kind: kvpb::txn_error::Kind::Retry as i32,
                retry_timestamp: t.write_timestamp,
                reason: why,
            },
            Some(t),
        ),
        None => kv_error(grpc_code::UNAVAILABLE, why),
    }
}

/// The lone push of a batch, if it is one that may wait.
fn lone_push(req: &kvpb::BatchRequest) -> Option<&kvpb::PushTxnRequest> {
    match req.requests.as_slice() {
        [kvpb::RequestUnion {
            value: Some(Req::PushTxn(p)),
        }] if p.wait_ms > 0 => Some(p),
        _ => None,
    }
}

fn push_pending(a: &BatchResponse) -> bool {
    let Some(batch_response::Response::Kv(kv)) = &a.response else {
        return false;
    };
    matches!(
        kv.responses.first().and_then(|r| r.value.as_ref()),
        Some(kvpb::response_union::Value::PushTxn(p)) if p.status == kvpb::TxnStatus::Pending as i32
    )
}

/// Evaluates a native KV batch for `range_id` here: once, or again after
/// waiting for the transactions whose intents were in its way. A lone
/// push of a live transaction waits here (in `txnwait`) up to its
/// `wait_ms` for the pushee to finish.
pub async fn evaluate(
    store: &StoreHandle,
    range_id: u64,
    req: kvpb::BatchRequest,
    opts: &EvalOptions,
) -> BatchResponse {
    let deadline = Instant::now() + opts.write_timeout;
    let pusher = req.header.as_ref().and_then(|h| h.txn.clone());
    let push = lone_push(&req).cloned();
    let push_until = push
        .as_ref()
        .map(|p| Instant::now() + std::time::Duration::from_millis(u64::from(p.wait_ms.min(5_000))));
    // A push registers in the wait queue (who waits for whom) while it waits.
    let registered = push.as_ref().and_then(|p| {
        let pushee = crate::txn_record::txn_id(&p.pushee.as_ref()?.id).ok()?;
        let pusher = p
            .pusher
            .as_ref()
            .and_then(|t| crate::txn_record::txn_id(&t.id).ok())
            .map(|id| {
                let theirs = p
                    .pusher_waiters
                    .iter()
                    .filter_map(|w| crate::txn_record::txn_id(w).ok())
                    .collect();
                (id, theirs)
            });
        Some(store.txnwait().enqueue(pushee, pusher))
    });
    // A place in the line of a key whose intent this batch waited for:
    // its turn ends when it evaluated again.
    let mut ticket: Option<crate::lock_table::Ticket> = None;
    let answer = loop {
        let once = evaluate_once(store, range_id, &req, opts).await;
        // The turn is over, unless the same key is in the way again: then
        // the place in its line is kept.
        let keep = matches!(
            (&once, &ticket),
            (Once::Conflict(i), Some(t)) if i.first().is_some_and(|i| i.key == t.key())
        );
        if !keep {
            drop(ticket.take());
        }
        match once {
            Once::Answer(a) => {
                if let (Some(until), Some(notify)) = (push_until, &registered) {
                    let now = Instant::now();
                    if push_pending(&a) && now < until {
                        let nap = (until - now).min(std::time::Duration::from_millis(50));
                        let _ = tokio::time::timeout(nap, notify.notified()).await;
                        continue;
                    }
                }
                break *a;
            }
            Once::Conflict(intents) => {
                let Some(router) = &opts.router else {
                    break kv_error(
                        grpc_code::UNAVAILABLE,
                        format!("{} keys hold other transactions' intents", intents.len()),
                    );
                };
                // In line behind the first intent met, then push its owner
                // (every waiter does: expiry and deadlocks are found by
                // whoever is first), then evaluate again in turn.
                let line = match ticket.take() {
                    Some(t) => Some(t),
                    None => store
                        .with_status(range_id, |st| st.conc.locks.clone())
                        .map(|locks| locks.enqueue(&intents[0].key)),
                };
                match crate::intent_resolver::wait_and_resolve(
                    router.as_ref(),
                    store.metrics(),
                    intents,
                    pusher.as_ref(),
                    deadline,
                )
                .await
                {
                    crate::intent_resolver::Waited::Resolved => {
                        if let Some(t) = line {
                            let left = deadline.saturating_duration_since(Instant::now());
                            if tokio::time::timeout(left, t.turn()).await.is_err() {
                                break waited_too_long(
                                    "timed out waiting in line for a key other transactions held".into(),
                                    pusher.clone(),
                                );
                            }
                            ticket = Some(t);
                        }
                        continue;
                    }
                    crate::intent_resolver::Waited::PusherAborted(e) => break txn_answer(e, pusher.clone()),
                    crate::intent_resolver::Waited::Failed(m) => break waited_too_long(m, pusher.clone()),
                }
            }
        }
    };
    // The push stays registered after it answered: its pusher comes back
    // within the round (renewing it), and deadlock detection must see it
    // in between; `txnwait` forgets entries nobody renews.
    answer
}

/// Evaluates a native KV batch for `range_id` here, once.
async fn evaluate_once(store: &StoreHandle, range_id: u64, req: &kvpb::BatchRequest, opts: &EvalOptions) -> Once {
    match evaluate_inner(store, range_id, req, opts).await {
        Ok(a) => a,
        Err(a) => Once::Answer(Box::new(a)),
    }
}

async fn evaluate_inner(
    store: &StoreHandle,
    range_id: u64,
    req: &kvpb::BatchRequest,
    opts: &EvalOptions,
) -> Result<Once, BatchResponse> {
    let Some(st) = store.status(range_id) else {
        return Err(error(batch_error::Kind::RangeNotFound(range_id)));
    };
    let reqs = match batcheval::validate(&req.requests) {
        Ok(r) => r,
        Err(EvalError::Refused(e)) => {
            return Err(kv_answer(kvpb::BatchResponse {
                error: Some(e),
                ..Default::default()
            }))
        }
        Err(e) => return Err(kv_error(grpc_code::INTERNAL, e.to_string())),
    };
    if reqs.is_empty() {
        return Err(kv_answer(kvpb::BatchResponse::default()));
    }
    // Every key must be this range's: else the sender's cache is stale.
    if let Some(answer) = mismatch(store, &st.desc, &reqs) {
        return Err(answer);
    }
    if !crate::keyspace::splittable(range_id) {
        return Err(kv_error(
            grpc_code::INVALID_ARGUMENT,
            format!("range {range_id} does not serve the native KV API"),
        ));
    }
    if !st.can_serve(Instant::now()) {
        return Err(not_leaseholder(store, range_id));
    }
    if let Some(f) = &st.frozen {
        return Err(frozen_answer(range_id, f.merge_id));
    }
    let txn = match req
        .header
        .as_ref()
        .and_then(|h| h.txn.as_ref())
        .map(batcheval::TxnCtx::new)
    {
        None => None,
        Some(Ok(t)) => Some(t),
        Some(Err(m)) => return Err(kv_error(grpc_code::INVALID_ARGUMENT, m)),
    };
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
        return Err(error(batch_error::Kind::Unavailable(format!("clock: {e}"))));
    }
    let now = match clock.now() {
        Ok(now) => now,
        Err(e) => return Err(error(batch_error::Kind::Unavailable(format!("clock: {e}")))),
    };
    let (mut read_ts, mut ts) = match (&txn, req.header.as_ref().and_then(|h| h.timestamp)) {
        // A transaction's timestamps come from its gateway's clock, moved
        // up by the ranges it wrote on (a new lease's timestamp cache starts
        // the maximum offset ahead): this clock moves up to them. One far
        // ahead of any of those is refused (a client's garbage).
        (Some(t), _) => {
            let w = t.write_ts();
            let bound = max_offset.saturating_mul(10).max(MAX_TXN_AHEAD_NANOS);
            if w.wall > clock.physical().saturating_add(bound) {
                return Err(kv_error(
                    grpc_code::INVALID_ARGUMENT,
                    format!("transaction timestamp {w} is far ahead of this node's clock"),
                ));
            }
            if let Err(e) = clock.update(w) {
                return Err(error(batch_error::Kind::Unavailable(format!("clock: {e}"))));
            }
            (t.read_ts(), w)
        }
        // A timestamp from the client: never above this leaseholder's
        // clock (no read here may be above what the next lease's
        // low-water mark will cover).
        (None, Some(t)) if Timestamp::from(t) > now => {
            return Err(kv_error(
                grpc_code::INVALID_ARGUMENT,
                format!(
                    "timestamp {} is ahead of the leaseholder's clock ({now}): ask again without one, or later",
                    Timestamp::from(t)
                ),
            ))
        }
        (None, Some(t)) => (Timestamp::from(t), Timestamp::from(t)),
        (None, None) => (now, now),
    };
    let limit = req.header.as_ref().map_or(0, |h| h.max_span_request_keys);
    let (reads, writes) = batcheval::latch_spans(&reqs);
    // A batch that writes may be moved to a later timestamp after it
    // latched; its reads then happen there: latch them at every timestamp.
    let read_latch_ts = if writes.is_empty() { read_ts } else { Timestamp::MAX };
    let latches: Vec<Latch> = reads
        .iter()
        .map(|s| Latch::read(s.clone(), read_latch_ts))
        .chain(writes.iter().map(|s| Latch::write(s.clone(), ts)))
        .collect();
    let Ok(guard) = tokio::time::timeout(opts.write_timeout, conc.latches.acquire(latches)).await else {
        return Err(error(batch_error::Kind::Unavailable(
            "timed out waiting for conflicting requests (latches)".into(),
        )));
    };
    // While it waited, the lease may have moved, or the range split (a
    // split holds every latch of the range until it applied).
    let Some(st) = store
        .status(range_id)
        .filter(|s| s.term == term && s.can_serve(Instant::now()))
    else {
        return Err(not_leaseholder(store, range_id));
    };
    if let Some(answer) = mismatch(store, &st.desc, &reqs) {
        return Err(answer);
    }
    if let Some(f) = &st.frozen {
        return Err(frozen_answer(range_id, f.merge_id));
    }
    let txn_id = txn.as_ref().map(|t| t.meta.id);
    let mvcc_writes: Vec<Span> = reqs
        .iter()
        .filter(|r| batcheval::is_mvcc_write(r))
        .map(|r| {
            let (s, e) = request_span(r);
            if e.is_empty() {
                Span::key(s)
            } else {
                Span::range(s, e)
            }
        })
        .collect();
    if !mvcc_writes.is_empty() && !opts.txn_knobs.skip_tscache {
        ts = ts.max(conc.min_txn_write_ts(&mvcc_writes, txn_id));
    }
    if txn.is_none() {
        read_ts = ts;
    }
    let mut tries = 0;
    let ev = loop {
        let cx = batcheval::EvalCtx {
            read_ts,
            write_ts: ts,
            limit,
            txn: txn.as_ref(),
            now,
            range_start: &st.desc.start_key,
            range_end: &st.desc.end_key,
            knobs: opts.txn_knobs,
        };
        match batcheval::evaluate_in(store.engine().batch(), &reqs, &cx) {
            Ok(ev) => break ev,
            Err(EvalError::WriteTooOld(retry)) if tries < MAX_WRITE_TOO_OLD_RETRIES => {
                tries += 1;
                ts = ts.max(retry);
                read_ts = ts;
            }
            Err(EvalError::Refused(e)) => {
                // A failed condition read its key: later writes go above.
                conc.record_txn_reads(&read_spans(&reqs), read_ts, txn_id);
                return Err(kv_answer(kvpb::BatchResponse {
                    error: Some(e),
                    ..Default::default()
                }));
            }
            Err(EvalError::Conflict(intents)) => {
                drop(guard);
                return Ok(Once::Conflict(intents));
            }
            Err(EvalError::Txn(e)) => {
                if e.kind == kvpb::txn_error::Kind::Retry as i32 && reqs.iter().any(|r| matches!(r, Req::Refresh(_))) {
                    store.metrics().txn.refreshes_failed.inc();
                }
                return Err(txn_answer(e, txn.as_ref().map(|t| t.proto.clone())));
            }
            Err(e) => return Err(kv_error(grpc_code::UNAVAILABLE, e.to_string())),
        }
    };
    conc.record_txn_reads(&read_spans(&reqs), read_ts, txn_id);
    let out_txn = txn.as_ref().map(|t| {
        let mut p = t.proto.clone();
        p.write_timestamp = Some(ts.max(ev.txn_write_ts).into());
        p
    });
    let metrics = store.metrics().clone();
    for r in &ev.responses {
        match &r.value {
            Some(kvpb::response_union::Value::EndTxn(e)) if e.one_phase => metrics.txn.commits_one_phase.inc(),
            Some(kvpb::response_union::Value::EndTxn(e)) if e.status == kvpb::TxnStatus::Committed as i32 => {
                metrics.txn.commits.inc()
            }
            Some(kvpb::response_union::Value::EndTxn(_)) => metrics.txn.rollbacks.inc(),
            _ => {}
        }
    }
    if reqs.iter().any(|r| matches!(r, Req::Refresh(_))) {
        metrics.txn.refreshes.inc();
    }
    let mut responses = ev.responses;
    for (r, q) in responses.iter_mut().zip(&reqs) {
        if let (Some(kvpb::response_union::Value::QueryTxn(out)), Req::QueryTxn(q)) = (&mut r.value, q) {
            if let Ok(id) = crate::txn_record::txn_id(&q.id) {
                out.waiters = store.txnwait().waiters(id).into_iter().map(|w| w.to_vec()).collect();
            }
        }
    }
    let answer = kvpb::BatchResponse {
        timestamp: Some(ts.into()),
        responses,
        error: None,
        txn: out_txn,
    };
    let Some(write) = ev.write else {
        // A read: served only if the lease held to the end of it.
        if !store
            .status(range_id)
            .is_some_and(|s| s.term == term && s.can_serve(Instant::now()))
        {
            return Err(not_leaseholder(store, range_id));
        }
        return Ok(Once::Answer(Box::new(kv_answer(answer))));
    };
    let cmd = RaftCommand {
        proposer_term: term,
        op: Some(raft_command::Op::WriteBatch(write)),
        ..Default::default()
    };
    Ok(Once::Answer(Box::new(
        match propose_holding(store, range_id, cmd, guard, opts.write_timeout).await {
            Ok(ApplyOutcome::Kv(Ok(()))) => {
                for f in ev.finished {
                    if f.status == kvpb::TxnStatus::Aborted && !matches!(reqs[0], Req::EndTxn(_)) {
                        metrics.txn.pushes_aborted.inc();
                    }
                    store.txnwait().finish(f.id);
                    if let Some(router) = &opts.router {
                        crate::intent_resolver::resolve_in_background(
                            router.clone(),
                            metrics.clone(),
                            f.id,
                            f.status,
                            f.epoch,
                            f.commit_ts,
                            f.unresolved,
                        );
                    }
                }
                // Commit wait: a write committed above this clock (a new
                // lease's timestamp cache starts the maximum offset ahead)
                // is acknowledged only once the clock passed it, so any
                // transaction that begins after the acknowledgement, on any
                // node, reads above it or within its uncertainty interval.
                // (A plain write needs none: reads of its keys go to this
                // leaseholder, whose clock the write pulled up.)
                let committed_at = if txn.is_none() {
                    None
                } else {
                    answer.responses.iter().find_map(|r| match &r.value {
                        Some(kvpb::response_union::Value::EndTxn(e))
                            if e.status == kvpb::TxnStatus::Committed as i32 =>
                        {
                            Some(ts.max(ev.txn_write_ts))
                        }
                        _ => None,
                    })
                };
                if let Some(at) = committed_at {
                    commit_wait(clock, at, max_offset).await;
                }
                kv_answer(answer)
            }
            Ok(ApplyOutcome::Kv(Err(why))) => kv_error(grpc_code::UNAVAILABLE, why),
            Ok(other) => kv_error(grpc_code::INTERNAL, format!("unexpected outcome {other:?}")),
            Err(e) => propose_error(store, range_id, e),
        },
    )))
}

/// The spans a batch read, for the timestamp cache: its Gets and scans,
/// the keys its conditions and increments read, and the spans its range
/// deletes found empty or not (a later write there must go above them).
fn read_spans(reqs: &[&Req]) -> Vec<Span> {
    reqs.iter()
        .filter(|r| batcheval::is_mvcc_read(r))
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
