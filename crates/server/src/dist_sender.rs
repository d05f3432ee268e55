//! The node's router: every node is a gateway, and this sends a request for
//! a range (by range id) to that range's leaseholder, wherever it is:
//! evaluated in place when the leaseholder is local, over the internal
//! `Internal.BatchStream` stream to its node otherwise (`forward`). The native API's key-based DistSender
//! (`kv::DistSender`) finds ranges by key and sends each part through this.
//!
//! It keeps a cache of leaseholders (and of the descriptors other nodes or
//! the meta records gave), starting from what the local replicas know; a
//! node with no replica of a range and no descriptor of it (the fixed system
//! and etcd ranges) asks the nodes it knows in turn until one names the
//! leaseholder. It retries, within the request's deadline, whatever certainly
//! did not take effect: not-leaseholder answers, a leader being elected, a
//! node it could not connect to. A write that may have been received but got
//! no answer is never retried: it returns `Ambiguous`, so nothing applies twice.
//! It never evaluates anything itself.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use kvserver::evaluator::{self, EvalOptions};
use kvserver::StoreHandle;
use parking_lot::Mutex;
use proto::kvserver::{batch_error, batch_request, batch_response, BatchRequest, EtcdError};
use proto::storage::RangeDescriptor;

use crate::forward::ForwardError;
use crate::Shared;

/// How long a read waits on one leaseholder before looking again (it may be
/// paused; a read is safe to send elsewhere).
const READ_ATTEMPT: Duration = Duration::from_millis(300);
/// Pause between attempts while no leaseholder is known.
const BACKOFF: Duration = Duration::from_millis(10);

/// Why a request got no answer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SendError {
    /// The request may or may not have taken effect.
    #[error("outcome unknown")]
    Ambiguous,
    /// Certainly not evaluated: no leaseholder answered before the deadline.
    #[error("no leaseholder for range {range_id}: {last}")]
    NoLeaseholder { range_id: u64, last: String },
    /// Evaluated and refused (etcd's error; nothing changed).
    #[error("{}", .0.message)]
    Etcd(EtcdError),
    /// This node cannot send at all (not initialized, unhealthy).
    #[error("{0}")]
    NotReady(String),
    /// Not evaluated: the range does not hold the request's keys (native KV
    /// requests only); the descriptors the answering store knows.
    #[error("range key mismatch")]
    KeyMismatch(Vec<RangeDescriptor>),
    /// Not evaluated: the store sent to has no such range (native KV
    /// requests only: their sender looks the range up again).
    #[error("range not found")]
    RangeNotFound,
}

/// What the DistSender remembers between requests.
#[derive(Default)]
pub struct RangeCache {
    /// range id -> (store id of its leaseholder as last seen, the local
    /// replica's raft term then, 0 without one). An entry older than the local
    /// replica's term is stale: an election happened since.
    leaseholders: Mutex<HashMap<u64, (u64, u64)>>,
    /// Descriptors of ranges this node has no replica of, as others sent them.
    descriptors: Mutex<HashMap<u64, RangeDescriptor>>,
}

impl RangeCache {
    /// The store last seen holding `range_id`'s lease.
    pub fn leaseholder(&self, range_id: u64) -> Option<u64> {
        self.leaseholders.lock().get(&range_id).map(|e| e.0)
    }
    /// The cached leaseholder unless the local replica (in `local_term`) has
    /// seen an election since it was cached.
    fn fresh_leaseholder(&self, range_id: u64, local_term: u64) -> Option<u64> {
        let e = *self.leaseholders.lock().get(&range_id)?;
        (local_term <= e.1).then_some(e.0)
    }
    fn set(&self, range_id: u64, store: u64, local_term: u64) {
        self.leaseholders.lock().insert(range_id, (store, local_term));
    }
    fn forget(&self, range_id: u64) {
        self.leaseholders.lock().remove(&range_id);
    }
    /// A descriptor from the meta range (or a client's cache): where to look
    /// for the range when this node has no replica of it.
    pub fn learn(&self, desc: RangeDescriptor) {
        let mut d = self.descriptors.lock();
        let newer = d
            .get(&desc.range_id)
            .is_none_or(|old| old.generation <= desc.generation);
        if newer {
            d.insert(desc.range_id, desc);
        }
    }
}

/// The store of `range_id`'s leader replica as the local replica knows it.
fn local_leader(store: &StoreHandle, range_id: u64) -> Option<(u64, u64, u64)> {
    store
        .with_status(range_id, |st| {
            let rep = st
                .desc
                .replicas
                .iter()
                .find(|r| st.leader != 0 && r.replica_id == st.leader)?;
            Some((rep.store_id, st.leader, st.term))
        })
        .flatten()
}

/// Resolves once the local replica sees a leader other than `leader` in a
/// term after `term`: a leader deposed while a write was sent to it, whose
/// outcome is then unknown but no longer worth waiting for. Never resolves on
/// a node without a replica of the range.
async fn leader_moved(store: &StoreHandle, range_id: u64, leader: u64, term: u64) {
    loop {
        if store
            .with_status(range_id, |st| st.term > term && st.leader != 0 && st.leader != leader)
            .unwrap_or(false)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl Shared {
    pub fn eval_options(&self) -> EvalOptions {
        EvalOptions {
            write_timeout: self.cfg.request_timeout,
            unsafe_follower_reads: crate::etcd_api::unsafe_follower_reads(),
            max_offset: self.cfg.max_clock_offset,
            router: Some(self.txn_router.clone()),
            txn_knobs: kvserver::batcheval::TxnKnobs::from_env(),
        }
    }

    /// Sends `request` for `range_id` to its leaseholder and returns the
    /// leaseholder's answer, retrying what certainly did not take effect until
    /// the request timeout.
    pub async fn send(
        &self,
        range_id: u64,
        request: batch_request::Request,
    ) -> Result<batch_response::Response, SendError> {
        self.send_within(range_id, request, self.cfg.request_timeout).await
    }

    /// [`Shared::send`] with its own deadline.
    pub async fn send_within(
        &self,
        range_id: u64,
        request: batch_request::Request,
        timeout: Duration,
    ) -> Result<batch_response::Response, SendError> {
        let kv = matches!(request, batch_request::Request::Kv(_));
        let in_txn =
            matches!(&request, batch_request::Request::Kv(b) if b.header.as_ref().is_some_and(|h| h.txn.is_some()));
        let read = match &request {
            batch_request::Request::EtcdRange(_) | batch_request::Request::RangeLookup(_) => true,
            batch_request::Request::Kv(b) => b
                .requests
                .iter()
                .all(|r| r.value.as_ref().is_some_and(|v| !kvserver::batcheval::is_write(v))),
            _ => false,
        };
        let deadline = Instant::now() + timeout;
        let opts = self.eval_options();
        let mut probe = 0usize;
        let mut last = String::from("no attempt");
        loop {
            if Instant::now() >= deadline {
                return Err(SendError::NoLeaseholder { range_id, last });
            }
            let store = self.store().map_err(|s| SendError::NotReady(s.message().to_string()))?;
            let me = store.ident().store_id;
            let local = local_leader(&store, range_id);
            let local_term = store.with_status(range_id, |st| st.term).unwrap_or(0);
            // Where to send: the cached leaseholder, else the local replica's
            // leader, else (no replica here) the known stores in turn.
            let target = if read && opts.unsafe_follower_reads && store.has_range(range_id) {
                me
            } else if let Some(t) = self.ranges.fresh_leaseholder(range_id, local_term) {
                t
            } else if let Some((s, ..)) = local {
                s
            } else if store.has_range(range_id) {
                // A replica here that knows no leader: an election is on.
                last = "no leader".into();
                tokio::time::sleep(BACKOFF).await;
                continue;
            } else {
                let known = self.ranges.descriptors.lock().get(&range_id).cloned();
                let mut stores: Vec<u64> = match known {
                    Some(d) if !d.replicas.is_empty() => d.replicas.iter().map(|r| r.store_id).collect(),
                    _ => store
                        .known_stores()
                        .read()
                        .keys()
                        .copied()
                        .filter(|&s| s != me)
                        .collect(),
                };
                stores.sort_unstable();
                if stores.is_empty() {
                    return Err(SendError::NoLeaseholder {
                        range_id,
                        last: "no replica here and no other node known".into(),
                    });
                }
                probe += 1;
                stores[probe % stores.len()]
            };
            let req = BatchRequest {
                cluster_id: store.ident().cluster_id.clone(),
                range_id,
                request: Some(request.clone()),
            };
            let answer = if target == me {
                let opts = EvalOptions {
                    write_timeout: deadline.saturating_duration_since(Instant::now()),
                    ..opts.clone()
                };
                evaluator::evaluate(&store, req, &opts).await
            } else {
                let addr = store
                    .known_stores()
                    .read()
                    .get(&target)
                    .filter(|a| !a.is_empty())
                    .cloned();
                let Some(addr) = addr else {
                    self.ranges.forget(range_id);
                    last = format!("no address for store {target}");
                    tokio::time::sleep(BACKOFF).await;
                    continue;
                };
                let ch = match self.channel(&addr).await {
                    Ok(c) => c,
                    Err(s) => {
                        // Not connected: certainly not sent.
                        self.ranges.forget(range_id);
                        last = s.message().to_string();
                        tokio::time::sleep(BACKOFF).await;
                        continue;
                    }
                };
                let left = deadline.saturating_duration_since(Instant::now());
                let (leader, term) = local.map_or((0, 0), |(_, l, t)| (l, t));
                let call = self.forwarder.call(&addr, ch, req);
                // A read that does not answer soon is tried elsewhere (its
                // leaseholder may be paused), unless it is a transaction's:
                // those wait for other transactions' intents as long as
                // they must.
                let sent = if read && !in_txn {
                    match tokio::time::timeout(left.min(READ_ATTEMPT), call).await {
                        Ok(r) => r,
                        Err(_) => Err(ForwardError::NotSent(format!("{addr} did not answer"))),
                    }
                } else {
                    tokio::select! {
                        r = call => r,
                        () = leader_moved(&store, range_id, leader, term), if leader != 0 => {
                            self.ranges.forget(range_id);
                            return Err(SendError::Ambiguous);
                        }
                        () = tokio::time::sleep(left) => {
                            self.ranges.forget(range_id);
                            return Err(SendError::Ambiguous);
                        }
                    }
                };
                match sent {
                    Ok(r) => r,
                    Err(e) => {
                        self.ranges.forget(range_id);
                        self.drop_channel(&addr);
                        if !read && matches!(e, ForwardError::Broken(_)) {
                            // It may have arrived before the stream broke.
                            return Err(SendError::Ambiguous);
                        }
                        last = e.to_string();
                        tokio::time::sleep(BACKOFF).await;
                        continue;
                    }
                }
            };
            use batch_error::Kind;
            match answer.response {
                Some(batch_response::Response::Error(e)) => match e.kind {
                    Some(Kind::NotLeaseholder(nl)) => {
                        if nl.leader_store != 0 && nl.leader_store != target {
                            self.ranges.set(range_id, nl.leader_store, local_term);
                        } else {
                            self.ranges.forget(range_id);
                            tokio::time::sleep(BACKOFF).await;
                        }
                        if let Some(d) = nl.descriptor {
                            if !store.has_range(range_id) {
                                self.ranges.descriptors.lock().insert(range_id, d);
                            }
                        }
                        last = format!("store {target} does not hold the lease");
                    }
                    Some(Kind::RangeKeyMismatch(m)) => return Err(SendError::KeyMismatch(m.descriptors)),
                    Some(Kind::RangeNotFound(_)) if kv && !store.has_range(range_id) => {
                        self.ranges.forget(range_id);
                        return Err(SendError::RangeNotFound);
                    }
                    Some(Kind::RangeNotFound(_)) => {
                        self.ranges.forget(range_id);
                        last = format!("store {target} has no replica of range {range_id}");
                        tokio::time::sleep(BACKOFF).await;
                    }
                    Some(Kind::Ambiguous(_)) => return Err(SendError::Ambiguous),
                    Some(Kind::Etcd(e)) => return Err(SendError::Etcd(e)),
                    Some(Kind::Unavailable(m)) => {
                        self.ranges.forget(range_id);
                        last = m;
                        tokio::time::sleep(BACKOFF).await;
                    }
                    None if read => return Err(SendError::NotReady("an empty error came back".into())),
                    None => return Err(SendError::Ambiguous),
                },
                Some(ok) => {
                    self.ranges.set(range_id, target, local_term);
                    return Ok(ok);
                }
                None if read => return Err(SendError::NotReady("an empty answer came back".into())),
                // Something answered, but not what: the write may have applied.
                None => return Err(SendError::Ambiguous),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cached_leaseholder_is_dropped_once_the_local_replica_sees_an_election() {
        let c = RangeCache::default();
        c.set(2, 7, 3);
        assert_eq!(c.fresh_leaseholder(2, 3), Some(7));
        // The local replica learned of term 4: whoever led in 3 may be gone
        // (paused); ask the local replica's leader instead.
        assert_eq!(c.fresh_leaseholder(2, 4), None);
        // Without a local replica (term 0) the entry is all there is.
        c.set(5, 9, 0);
        assert_eq!(c.fresh_leaseholder(5, 0), Some(9));
        c.forget(5);
        assert_eq!(c.leaseholder(5), None);
    }
}
