//! What a leaseholder does about other transactions' intents: a request
//! that met some waits for their transactions to finish (pushing them at
//! their records, breaking deadlocks) and resolves them; a finished
//! transaction's intents on other ranges are resolved in the background.
//!
//! Every request it sends (PushTxn, QueryTxn, ResolveIntent) goes through a
//! `TxnRouter`, which the node implements with its DistSender: this crate
//! never routes by itself.
//!
//! Deadlocks: each round of a pusher's wait first asks its own record's
//! leaseholder who waits for it (`txnwait`, transitively). If its pushee is
//! among them, the two wait for each other; the one with the higher
//! priority as the records say (a transaction with no record yet counts 0;
//! equal priorities: the lower id wins) aborts the other with a forced
//! push, and the other goes on waiting until it is aborted. Both sides
//! compute the same winner, so exactly one transaction of a cycle dies.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::kvpb::{self, request_union::Value as Req, response_union::Value as Resp, TxnStatus};
use storage::mvcc::Intent;
use storage::Timestamp;

use crate::metrics::Metrics;

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Sends native KV batches to whichever ranges hold their keys.
pub trait TxnRouter: Send + Sync {
    fn send(&self, req: kvpb::BatchRequest) -> BoxFuture<Result<kvpb::BatchResponse, String>>;
}

/// How long a record's leaseholder holds one push of a live transaction.
const PUSH_WAIT_MS: u32 = 200;
/// How many times a background resolution is tried before leaving the
/// intents to whoever meets them.
const RESOLVE_ATTEMPTS: usize = 20;

/// How a wait for conflicting intents ended.
#[derive(Debug)]
pub enum Waited {
    /// Every conflicting intent was resolved: evaluate again.
    Resolved,
    /// The waiting transaction itself was aborted meanwhile.
    PusherAborted(kvpb::TxnError),
    /// No outcome before the deadline, or a failure on the way.
    Failed(String),
}

/// Whether transaction `a` beats `b` in a deadlock.
pub fn wins(a_priority: i32, a_id: &[u8], b_priority: i32, b_id: &[u8]) -> bool {
    (a_priority, std::cmp::Reverse(a_id)) > (b_priority, std::cmp::Reverse(b_id))
}

async fn call(router: &dyn TxnRouter, txn: Option<kvpb::Transaction>, reqs: Vec<Req>) -> Result<Vec<Resp>, String> {
    let resp = router
        .send(kvpb::BatchRequest {
            header: Some(kvpb::Header {
                txn,
                ..Default::default()
            }),
            requests: reqs
                .into_iter()
                .map(|r| kvpb::RequestUnion { value: Some(r) })
                .collect(),
        })
        .await?;
    if let Some(e) = resp.error {
        return Err(e.message);
    }
    Ok(resp.responses.into_iter().filter_map(|r| r.value).collect())
}

fn aborted(reason: &str) -> kvpb::TxnError {
    kvpb::TxnError {
        kind: kvpb::txn_error::Kind::Aborted as i32,
        retry_timestamp: None,
        reason: reason.into(),
    }
}

/// Waits until the transactions of `intents` finished, pushing them as
/// `pusher` (None: a request outside any transaction), and resolves the
/// intents met.
pub async fn wait_and_resolve(
    router: &dyn TxnRouter,
    metrics: &Metrics,
    intents: Vec<Intent>,
    pusher: Option<&kvpb::Transaction>,
    deadline: Instant,
) -> Waited {
    let mut by_txn: BTreeMap<[u8; 16], Vec<Intent>> = BTreeMap::new();
    for i in intents {
        by_txn.entry(i.txn.id.0).or_default().push(i);
    }
    for (id, intents) in by_txn {
        let first = &intents[0];
        if first.anchor.is_empty() {
            return Waited::Failed(format!(
                "an intent on {} names no transaction record",
                crate::keyspace::pretty(&first.key)
            ));
        }
        let pushee = kvpb::TxnMeta {
            id: id.to_vec(),
            key: first.anchor.clone(),
            epoch: first.txn.epoch,
            write_timestamp: Some(first.ts.into()),
        };
        // Their priority, once a push told it: no deadlock is decided before.
        let mut their_priority = None;
        let outcome = loop {
            if Instant::now() >= deadline {
                return Waited::Failed(format!(
                    "timed out waiting for transaction {} (intent on {})",
                    hex(&id),
                    crate::keyspace::pretty(&first.key)
                ));
            }
            // Who waits for the pusher: if the pushee does, it is a cycle.
            let mut waiters = Vec::new();
            let mut force = false;
            // Priorities as the records say (none yet: 0), the same on
            // both sides of a cycle.
            let mut my_priority = 0;
            if let Some(p) = pusher.filter(|p| !p.key.is_empty()) {
                match call(
                    router,
                    None,
                    vec![Req::QueryTxn(kvpb::QueryTxnRequest {
                        key: p.key.clone(),
                        id: p.id.clone(),
                    })],
                )
                .await
                {
                    Ok(r) => {
                        if let Some(Resp::QueryTxn(q)) = r.first() {
                            if q.status == TxnStatus::Aborted as i32 {
                                return Waited::PusherAborted(aborted(
                                    "the transaction was aborted while it waited (a deadlock chose it, or it expired)",
                                ));
                            }
                            waiters = q.waiters.clone();
                            my_priority = if q.found { p.priority } else { 0 };
                        }
                    }
                    Err(e) => tracing::debug!("query of the pusher's record: {e}"),
                }
                let cycle = waiters.iter().any(|w| w.as_slice() == id);
                if cycle && their_priority.is_some_and(|t| wins(my_priority, &p.id, t, &id)) {
                    force = true;
                    metrics.txn.deadlocks.inc();
                }
            }
            metrics.txn.pushes.inc();
            let pushed = call(
                router,
                None,
                vec![Req::PushTxn(kvpb::PushTxnRequest {
                    key: pushee.key.clone(),
                    pushee: Some(pushee.clone()),
                    pusher: pusher.cloned(),
                    pusher_waiters: waiters,
                    force,
                    wait_ms: PUSH_WAIT_MS,
                })],
            )
            .await;
            match pushed {
                Ok(r) => match r.into_iter().next() {
                    Some(Resp::PushTxn(p)) => {
                        their_priority = Some(p.pushee_priority);
                        match TxnStatus::try_from(p.status) {
                            Ok(TxnStatus::Committed) | Ok(TxnStatus::Aborted) => break p,
                            _ => continue,
                        }
                    }
                    other => return Waited::Failed(format!("unexpected answer to a push: {other:?}")),
                },
                Err(e) => {
                    tracing::debug!("push of {}: {e}", hex(&id));
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        let meta = outcome.pushee.unwrap_or(pushee);
        let reqs = intents
            .iter()
            .map(|i| {
                Req::ResolveIntent(kvpb::ResolveIntentRequest {
                    key: i.key.clone(),
                    end_key: Vec::new(),
                    txn_id: id.to_vec(),
                    epoch: meta.epoch,
                    status: outcome.status,
                    commit_timestamp: meta.write_timestamp,
                })
            })
            .collect();
        if let Err(e) = call(router, None, reqs).await {
            return Waited::Failed(format!("resolving intents of {}: {e}", hex(&id)));
        }
        metrics.txn.intents_resolved_by_conflict.add(intents.len() as u64);
    }
    Waited::Resolved
}

/// Resolves, in the background, the intents a finished transaction left in
/// `spans` (as `status` at `commit_ts`), range by range.
pub fn resolve_in_background(
    router: Arc<dyn TxnRouter>,
    metrics: Arc<Metrics>,
    id: [u8; 16],
    status: TxnStatus,
    epoch: u32,
    commit_ts: Timestamp,
    spans: Vec<kvpb::Span>,
) {
    if spans.is_empty() {
        return;
    }
    tokio::spawn(async move {
        let mut todo = spans;
        let mut attempts = 0;
        while !todo.is_empty() {
            let reqs: Vec<Req> = todo
                .iter()
                .map(|s| {
                    Req::ResolveIntent(kvpb::ResolveIntentRequest {
                        key: s.start_key.clone(),
                        end_key: s.end_key.clone(),
                        txn_id: id.to_vec(),
                        epoch,
                        status: status as i32,
                        commit_timestamp: Some(commit_ts.into()),
                    })
                })
                .collect();
            match call(router.as_ref(), None, reqs).await {
                Ok(resps) => {
                    let mut next = Vec::new();
                    for r in resps {
                        if let Resp::ResolveIntent(r) = r {
                            metrics.txn.intents_resolved_async.add(r.resolved.max(0) as u64);
                            next.extend(r.resume_span);
                        }
                    }
                    todo = next;
                }
                Err(e) => {
                    attempts += 1;
                    if attempts >= RESOLVE_ATTEMPTS {
                        tracing::warn!(
                            "left intents of transaction {} to be resolved by whoever meets them: {e}",
                            hex(&id)
                        );
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(50 * attempts as u64)).await;
                }
            }
        }
    });
}

pub fn hex(id: &[u8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// How often the sweep visits this store's leased ranges.
const SWEEP_EVERY: Duration = Duration::from_secs(10);
/// Intents younger than this are left to their transactions.
const SWEEP_MIN_AGE_NANOS: u64 = 10_000_000_000;
/// At most this many intents are looked at per range and pass.
const SWEEP_MAX_INTENTS: usize = 500;

/// For as long as the node runs: every `SWEEP_EVERY`, looks at the old
/// intents of the ranges this store holds the lease of (those whose
/// statistics count any), asks each one's transaction's record once (a
/// push that waits for nothing: an expired transaction is aborted then),
/// and resolves the intents of transactions that finished. So intents a
/// dead coordinator or a failed background resolution left are cleaned up
/// even if nobody meets them.
pub async fn sweep_loop(store: impl Fn() -> Option<crate::StoreHandle> + Send, router: Arc<dyn TxnRouter>) {
    loop {
        tokio::time::sleep(SWEEP_EVERY).await;
        let Some(store) = store() else { continue };
        if store.stopped().is_some() {
            continue;
        }
        let now = match store.clock().now() {
            Ok(t) => t,
            Err(_) => continue,
        };
        let leased: Vec<(Vec<u8>, Vec<u8>)> = store
            .statuses()
            .into_iter()
            .filter(|s| s.applied.stats.intent_count > 0 && s.can_serve(Instant::now()))
            .filter(|s| crate::keyspace::splittable(s.desc.range_id))
            .map(|s| (s.desc.start_key.clone(), s.desc.end_key.clone()))
            .collect();
        for (start, end) in leased {
            let found = match storage::mvcc::intents_in_span(store.engine(), &start, &end, SWEEP_MAX_INTENTS) {
                Ok((found, _)) => found,
                Err(e) => {
                    tracing::warn!("intent sweep: {e}");
                    continue;
                }
            };
            let old: Vec<Intent> = found
                .into_iter()
                .filter(|(_, r)| r.ts.wall.saturating_add(SWEEP_MIN_AGE_NANOS) < now.wall && !r.anchor.is_empty())
                .map(|(key, r)| Intent {
                    key,
                    txn: r.txn,
                    ts: r.ts,
                    anchor: r.anchor,
                })
                .collect();
            if old.is_empty() {
                continue;
            }
            // One round: a live transaction is left alone until next time.
            let deadline = Instant::now() + Duration::from_millis(500);
            if let Waited::Failed(e) = wait_and_resolve(router.as_ref(), store.metrics(), old, None, deadline).await {
                tracing::debug!("intent sweep left some: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exactly_one_side_of_a_cycle_wins() {
        let (a, b) = ([1u8; 16], [2u8; 16]);
        for (pa, pb) in [(1, 1), (5, 1), (1, 5), (0, 0)] {
            assert_ne!(wins(pa, &a, pb, &b), wins(pb, &b, pa, &a), "{pa} {pb}");
        }
        assert!(wins(5, &b, 1, &a), "the higher priority wins");
        assert!(wins(1, &a, 1, &b), "equal priorities: the lower id wins");
    }
}
