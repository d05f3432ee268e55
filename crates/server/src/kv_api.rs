//! The native KV API (`tardigrade.kvpb.KV/Batch`): a batch of reads and
//! writes on raw keys of the user keyspace, sent by this node's DistSender
//! (`kv::DistSender`, over `RangeSender` below) to the leaseholders of the
//! ranges it spans. Also the node's side of meta addressing: lookups in the
//! meta range and publishing descriptors there (`kvserver::meta`).
//!
//! This wires the client crate to the node; it evaluates nothing.

use std::sync::{Arc, Weak};
use std::time::Duration;

use kv::dist_sender::{DistError, DistSender, RangeError};
use kvserver::keyspace::SYSTEM_RANGE_ID;
use kvserver::StoreHandle;
use proto::kvpb::kv_server::Kv;
use proto::kvpb::{BatchRequest, BatchResponse};
use proto::kvserver::{batch_request, batch_response, raft_command, MetaUpdate, RaftCommand, RangeLookupRequest};
use proto::storage::RangeDescriptor;
use tonic::{Request, Response, Status};

use crate::dist_sender::SendError;
use crate::Shared;

/// Sends one range's part of a batch through the node's router (to the
/// local store or over `Internal.Batch`), which finds the leaseholder among
/// the descriptor's replicas. It holds the node weakly: the node owns its
/// DistSender (`Shared::dist`).
pub struct NodeRangeSender(pub Weak<Shared>);

impl NodeRangeSender {
    fn node(&self) -> Result<Arc<Shared>, RangeError> {
        self.0
            .upgrade()
            .ok_or_else(|| RangeError::Unavailable("the node is shutting down".into()))
    }
}

fn range_error(e: SendError) -> RangeError {
    match e {
        SendError::Ambiguous => RangeError::Ambiguous,
        SendError::KeyMismatch(d) => RangeError::KeyMismatch(d),
        SendError::RangeNotFound => RangeError::RangeNotFound,
        e => RangeError::Unavailable(e.to_string()),
    }
}

impl kv::RangeSender for NodeRangeSender {
    async fn send(&self, desc: RangeDescriptor, req: BatchRequest) -> Result<BatchResponse, RangeError> {
        let node = self.node()?;
        let range_id = desc.range_id;
        node.ranges.learn(desc);
        match node.send(range_id, batch_request::Request::Kv(req)).await {
            Ok(batch_response::Response::Kv(r)) => Ok(r),
            Ok(other) => Err(RangeError::Unavailable(format!("unexpected answer {other:?}"))),
            Err(e) => Err(range_error(e)),
        }
    }

    async fn lookup(&self, key: Vec<u8>, prefetch: u32) -> Result<Vec<RangeDescriptor>, RangeError> {
        let req = batch_request::Request::RangeLookup(RangeLookupRequest { key, prefetch });
        match self.node()?.send(SYSTEM_RANGE_ID, req).await {
            Ok(batch_response::Response::RangeLookup(r)) => Ok(r.descriptors),
            Ok(other) => Err(RangeError::Unavailable(format!("unexpected answer {other:?}"))),
            Err(e) => Err(range_error(e)),
        }
    }
}

#[derive(Clone)]
pub struct KvApi {
    pub shared: Arc<Shared>,
    pub sender: DistSender<NodeRangeSender>,
}

impl KvApi {
    pub fn new(shared: Arc<Shared>) -> KvApi {
        let sender = shared.dist.clone();
        KvApi { shared, sender }
    }
}

/// The node's DistSender as kvserver's `TxnRouter`: pushes, queries and
/// intent resolutions go wherever their keys are.
pub struct NodeTxnRouter(pub Weak<Shared>);

impl kvserver::intent_resolver::TxnRouter for NodeTxnRouter {
    fn send(&self, req: BatchRequest) -> kvserver::intent_resolver::BoxFuture<Result<BatchResponse, String>> {
        let node = self.0.upgrade();
        Box::pin(async move {
            let node = node.ok_or_else(|| "the node is shutting down".to_string())?;
            node.dist.send(req).await.map_err(|e| e.to_string())
        })
    }
}

#[tonic::async_trait]
impl Kv for KvApi {
    async fn batch(&self, req: Request<BatchRequest>) -> Result<Response<BatchResponse>, Status> {
        let store = self.shared.store()?;
        let started = std::time::Instant::now();
        let mut req = req.into_inner();
        // A transaction's first batch takes its timestamps from this
        // gateway's clock; values up to the maximum clock offset above it
        // may have been written before it began (its uncertainty interval).
        if let Some(t) = req.header.as_mut().and_then(|h| h.txn.as_mut()) {
            if t.read_timestamp.is_none() {
                let now = store
                    .clock()
                    .now()
                    .map_err(|e| Status::unavailable(format!("clock: {e}")))?;
                let limit = storage::Timestamp::new(
                    now.wall
                        .saturating_add(self.shared.cfg.max_clock_offset.as_nanos() as u64),
                    0,
                );
                t.read_timestamp = Some(now.into());
                t.write_timestamp = Some(now.into());
                t.min_timestamp = Some(now.into());
                t.uncertainty_limit = Some(limit.into());
            }
        }
        let out = self.sender.send(req).await;
        if let Ok(store) = self.shared.store() {
            if let Some(h) = store.metrics().request_latency("kv_batch") {
                h.observe_duration(started.elapsed());
            }
        }
        match out {
            Ok(r) => Ok(Response::new(r)),
            Err(DistError::Ambiguous) => Err(Status::unknown(
                "ambiguous result: the batch (or part of it) may or may not have applied",
            )),
            Err(DistError::Unavailable(m)) => Err(Status::unavailable(m)),
            Err(DistError::InvalidArgument(m)) => Err(Status::invalid_argument(m)),
        }
    }
}

/// Publishes meta records through the node's router.
struct MetaSender(Arc<Shared>);

impl kvserver::meta::MetaSender for MetaSender {
    fn store(&self) -> Option<StoreHandle> {
        self.0.local.get().map(|l| l.store.clone())
    }

    async fn send(&self, update: MetaUpdate, timeout: Duration) -> Result<u32, String> {
        let cmd = RaftCommand {
            op: Some(raft_command::Op::MetaUpdate(update)),
            ..Default::default()
        };
        match self
            .0
            .send_within(SYSTEM_RANGE_ID, batch_request::Request::Write(cmd), timeout)
            .await
        {
            Ok(batch_response::Response::MetaUpdated(m)) => Ok(m.changed),
            Ok(other) => Err(format!("unexpected answer to a meta update: {other:?}")),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// Publishes descriptors a split or merge just made, so that lookups find
/// them at once (the leaseholders' publish loop would, a lease later; it
/// stays the way a crash is recovered from). Best effort.
async fn publish_now(shared: &Arc<Shared>, descriptors: Vec<RangeDescriptor>) {
    use kvserver::meta::MetaSender as _;
    if let Err(e) = MetaSender(shared.clone())
        .send(MetaUpdate { descriptors }, Duration::from_secs(2))
        .await
    {
        tracing::debug!(error = %e, "publishing new descriptors now failed; the leaseholders will");
    }
}

/// Splits ranges through the node (see `split`).
struct Splitter(Arc<Shared>);

impl kvserver::split_queue::SplitSender for Splitter {
    fn store(&self) -> Option<StoreHandle> {
        self.0.local.get().map(|l| l.store.clone())
    }

    async fn split(&self, key: Vec<u8>) -> Result<(), String> {
        split(&self.0, key)
            .await
            .map(|_| ())
            .map_err(|s| s.message().to_string())
    }
}

/// Splits this node's leaseholders' user ranges by size and load, for as
/// long as the node runs.
pub async fn split_loop(shared: Arc<Shared>) {
    let policy = kvserver::split_queue::SplitPolicy {
        max_bytes: shared.cfg.range_max_bytes,
        load_qps: shared.cfg.load_split_qps,
    };
    kvserver::split_queue::split_loop(Splitter(shared), policy).await
}

/// Publishes the descriptors of ranges this node holds leases of, for as
/// long as the node runs.
pub async fn publish_loop(shared: Arc<Shared>) {
    kvserver::meta::publish_loop(MetaSender(shared)).await
}

fn status_of(e: SendError) -> Status {
    match e {
        SendError::Etcd(e) => Status::new(tonic::Code::from_i32(e.code), e.message),
        SendError::Ambiguous => Status::unknown("ambiguous result: it may or may not have happened"),
        e => Status::unavailable(e.to_string()),
    }
}

/// Splits the user range holding `key` at `key`: finds it in the meta
/// records, takes a new range id from the system range, and asks the
/// range's leaseholder, which answers once the split applied.
pub async fn split(shared: &Arc<Shared>, key: Vec<u8>) -> Result<(RangeDescriptor, RangeDescriptor), Status> {
    use kv::RangeSender as _;
    shared.store()?;
    if !kvserver::keyspace::in_user_keyspace(&key, &[]) {
        return Err(Status::invalid_argument(format!(
            "split key {} is outside the user keyspace [\\x11, \\xff\\xff): only user ranges split",
            kvserver::keyspace::pretty(&key)
        )));
    }
    let sender = NodeRangeSender(Arc::downgrade(shared));
    let contains =
        |d: &RangeDescriptor| d.start_key.as_slice() <= key.as_slice() && key.as_slice() < d.end_key.as_slice();
    let mut known: Option<RangeDescriptor> = None;
    let mut new_range_id: Option<u64> = None;
    for _ in 0..40 {
        let desc = match known.take() {
            Some(d) => d,
            None => sender
                .lookup(key.clone(), 0)
                .await
                .map_err(|e| Status::unavailable(format!("meta lookup: {e}")))?
                .into_iter()
                .next()
                .ok_or_else(|| Status::unavailable("no range found for the key in the meta records"))?,
        };
        if contains(&desc) {
            if desc.start_key == key {
                return Err(Status::already_exists(format!(
                    "{} is already a range boundary (range {} starts there)",
                    kvserver::keyspace::pretty(&key),
                    desc.range_id
                )));
            }
            if let Some(why) = kvserver::split::check_split_key(&desc, &key) {
                return Err(Status::invalid_argument(why));
            }
        }
        // One new range id per split, whatever the retries.
        let new_range_id = match new_range_id {
            Some(id) => id,
            None => {
                let alloc = RaftCommand {
                    op: Some(raft_command::Op::AllocateRangeId(Default::default())),
                    ..Default::default()
                };
                match shared.send(SYSTEM_RANGE_ID, batch_request::Request::Write(alloc)).await {
                    Ok(batch_response::Response::RangeId(id)) => *new_range_id.insert(id),
                    Ok(other) => return Err(Status::internal(format!("unexpected answer {other:?}"))),
                    Err(e) => return Err(status_of(e)),
                }
            }
        };
        shared.ranges.learn(desc.clone());
        let req = batch_request::Request::AdminSplit(proto::kvserver::AdminSplitRequest {
            split_key: key.clone(),
            new_range_id,
        });
        match shared.send(desc.range_id, req).await {
            Ok(batch_response::Response::AdminSplit(r)) => {
                let (Some(l), Some(r)) = (r.left, r.right) else {
                    return Err(Status::internal("a split answer without its halves"));
                };
                publish_now(shared, vec![l.clone(), r.clone()]).await;
                return Ok((l, r));
            }
            Ok(other) => return Err(Status::internal(format!("unexpected answer {other:?}"))),
            // The range moved under the lookup: look again (the range id
            // allocated is simply not used).
            Err(SendError::KeyMismatch(descs)) => {
                known = descs.into_iter().find(|d| contains(d));
                if known.is_none() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            Err(SendError::RangeNotFound) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(SendError::Etcd(e)) if e.message.contains("changed since") => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(status_of(e)),
        }
    }
    Err(Status::unavailable("the range kept changing; try again"))
}

/// Sends `request` for `range_id` to one store (not to the range's
/// leaseholder): locally, or over `Internal.Batch` to its address.
async fn send_to_store(
    shared: &Arc<Shared>,
    store_id: u64,
    range_id: u64,
    request: batch_request::Request,
) -> Result<batch_response::Response, String> {
    let store = shared.store().map_err(|s| s.message().to_string())?;
    let req = proto::kvserver::BatchRequest {
        cluster_id: store.ident().cluster_id.clone(),
        range_id,
        request: Some(request),
    };
    let answer = if store_id == store.ident().store_id {
        kvserver::evaluator::evaluate(&store, req, &shared.eval_options()).await
    } else {
        let addr = store
            .known_stores()
            .read()
            .get(&store_id)
            .cloned()
            .filter(|a| !a.is_empty())
            .ok_or_else(|| format!("no address for store {store_id}"))?;
        let ch = shared.channel(&addr).await.map_err(|s| s.message().to_string())?;
        proto::kvserver::internal_client::InternalClient::new(ch)
            .batch(req)
            .await
            .map_err(|s| s.message().to_string())?
            .into_inner()
    };
    match answer.response {
        Some(batch_response::Response::Error(e)) => Err(format!("store {store_id}: {:?}", e.kind)),
        Some(r) => Ok(r),
        None => Err(format!("store {store_id} sent no answer")),
    }
}

/// Merges the user range holding `key` with its right-hand neighbour (see
/// `kvserver::merge` for the steps). Answers the merged descriptor, or why
/// not; a merge that cannot complete is rolled back (fenced off on the left
/// range, then the right one unfrozen) before this answers.
pub async fn merge(shared: &Arc<Shared>, key: Vec<u8>) -> Result<RangeDescriptor, Status> {
    use kv::RangeSender as _;
    let store = shared.store()?;
    if !kvserver::keyspace::in_user_keyspace(&key, &[]) {
        return Err(Status::invalid_argument(format!(
            "{} is outside the user keyspace: only user ranges merge",
            kvserver::keyspace::pretty(&key)
        )));
    }
    let sender = NodeRangeSender(Arc::downgrade(shared));
    let lookup = |k: Vec<u8>| {
        let sender = &sender;
        async move {
            sender
                .lookup(k, 1)
                .await
                .map_err(|e| Status::unavailable(format!("meta lookup: {e}")))
        }
    };
    // The meta records may lag a split or merge just done: a descriptor this
    // node holds a newer generation of wins.
    let fresher = |d: RangeDescriptor| match store.status(d.range_id) {
        Some(st) if st.desc.generation > d.generation && !st.desc.end_key.is_empty() => st.desc,
        _ => d,
    };
    let found: Vec<RangeDescriptor> = lookup(key.clone()).await?.into_iter().map(fresher).collect();
    let Some(left) = found.first().cloned() else {
        return Err(Status::unavailable("no range found for the key"));
    };
    if key.as_slice() >= left.end_key.as_slice() || key.as_slice() < left.start_key.as_slice() {
        return Err(Status::unavailable("the meta records are being updated; try again"));
    }
    if left.end_key.as_slice() >= kvserver::keyspace::KEY_MAX {
        return Err(Status::failed_precondition(format!(
            "range {} is the last one: nothing to its right to merge",
            left.range_id
        )));
    }
    let right = match found.get(1).filter(|d| d.start_key == left.end_key) {
        Some(d) => d.clone(),
        None => {
            let next: Vec<RangeDescriptor> = lookup(left.end_key.clone()).await?.into_iter().map(fresher).collect();
            next.first()
                .filter(|d| d.start_key == left.end_key)
                .cloned()
                .ok_or_else(|| {
                    let show = |d: &RangeDescriptor| {
                        format!(
                            "r{} [{}, {}) gen {}",
                            d.range_id,
                            kvserver::keyspace::pretty(&d.start_key),
                            kvserver::keyspace::pretty(&d.end_key),
                            d.generation
                        )
                    };
                    Status::unavailable(format!(
                        "the meta records are being updated (after range {} they name {}); try again",
                        show(&left),
                        next.first().map_or("nothing".into(), show)
                    ))
                })?
        }
    };
    if let Some(why) = kvserver::merge::check_mergeable(&left, &right) {
        return Err(Status::failed_precondition(why));
    }
    shared.ranges.learn(left.clone());
    shared.ranges.learn(right.clone());
    let merge_id = store
        .clock()
        .now()
        .map_err(|e| Status::unavailable(e.to_string()))?
        .wall;
    // 1. The right range stops serving.
    let subsume = batch_request::Request::Subsume(proto::kvserver::SubsumeRequest {
        left_range_id: left.range_id,
        left_end_key: left.end_key.clone(),
        merge_id,
    });
    let sub = match shared.send(right.range_id, subsume).await {
        Ok(batch_response::Response::Subsume(s)) => s,
        Ok(other) => return Err(Status::internal(format!("unexpected answer {other:?}"))),
        // Refused before freezing: nothing to undo.
        Err(SendError::Etcd(e)) => return Err(Status::failed_precondition(e.message)),
        Err(e @ (SendError::NoLeaseholder { .. } | SendError::NotReady(_))) => {
            return Err(Status::unavailable(e.to_string()))
        }
        // It may have frozen: roll back.
        Err(e) => return roll_back(shared, &left, &right, merge_id, e.to_string()).await,
    };
    let right_now = sub.right.clone().unwrap_or_default();
    // 2. Every replica of it applied the freeze.
    for r in &right_now.replicas {
        let wait = batch_request::Request::WaitApplied(proto::kvserver::WaitAppliedRequest {
            index: sub.freeze_index,
        });
        if let Err(e) = send_to_store(shared, r.store_id, right.range_id, wait).await {
            return roll_back(
                shared,
                &left,
                &right,
                merge_id,
                format!("waiting for the freeze to apply: {e}"),
            )
            .await;
        }
    }
    // 3. The left range absorbs it.
    let commit = batch_request::Request::MergeCommit(proto::kvserver::MergeCommitRequest {
        right: Some(right_now),
        freeze_index: sub.freeze_index,
        right_stats: sub.right_stats,
        freeze_ts: sub.freeze_ts,
        merge_id,
    });
    match shared.send(left.range_id, commit).await {
        Ok(batch_response::Response::Merged(d)) => {
            publish_now(shared, vec![d.clone()]).await;
            Ok(d)
        }
        Ok(other) => Err(Status::internal(format!("unexpected answer {other:?}"))),
        Err(e) => roll_back(shared, &left, &right, merge_id, e.to_string()).await,
    }
}

/// Fences merge attempt `merge_id` off on the left range and, unless it
/// merged before the fence, unfreezes the right range: the merged range if
/// it merged after all, else why not.
async fn roll_back(
    shared: &Arc<Shared>,
    left: &RangeDescriptor,
    right: &RangeDescriptor,
    merge_id: u64,
    why: String,
) -> Result<RangeDescriptor, Status> {
    use kv::RangeSender as _;
    match resolve(shared, left.range_id, right, merge_id).await {
        Ok(true) => NodeRangeSender(Arc::downgrade(shared))
            .lookup(left.start_key.clone(), 0)
            .await
            .ok()
            .and_then(|d| d.into_iter().next())
            .filter(|d| d.range_id == left.range_id)
            .ok_or_else(|| Status::unknown("merged, but the merged range could not be read back")),
        Ok(false) => Err(Status::aborted(format!(
            "the merge did not complete and was rolled back: {why}"
        ))),
        Err(e) => Err(Status::unavailable(format!(
            "the merge did not complete ({why}) and could not be rolled back yet ({e}); the right range stays frozen until it is"
        ))),
    }
}

/// The fence: whether the merge applied; if not, the right range is unfrozen.
async fn resolve(
    shared: &Arc<Shared>,
    left_range_id: u64,
    right: &RangeDescriptor,
    merge_id: u64,
) -> Result<bool, String> {
    let fence = batch_request::Request::ResolveMerge(proto::kvserver::ResolveMergeRequest {
        merge_id,
        right_range_id: right.range_id,
        right_end_key: right.end_key.clone(),
    });
    let merged = match shared.send(left_range_id, fence).await {
        Ok(batch_response::Response::MergeApplied(m)) => m,
        Ok(other) => return Err(format!("unexpected answer {other:?}")),
        // The left range was merged away itself: where it is tombstoned it
        // applied all it ever will, and the right range is still here, so
        // it was never absorbed (see kvserver::merge).
        Err(_) if left_merged_away(shared, left_range_id, right.range_id) => false,
        Err(e) => return Err(e.to_string()),
    };
    if merged {
        return Ok(true);
    }
    let thaw = batch_request::Request::Unfreeze(proto::kvserver::UnfreezeRequest { merge_id });
    match shared.send(right.range_id, thaw).await {
        Ok(batch_response::Response::Unfrozen(_)) => Ok(false),
        Ok(other) => Err(format!("unexpected answer {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

/// Whether this store tombstoned `left_range_id` while it still holds
/// `right_range_id`.
fn left_merged_away(shared: &Arc<Shared>, left_range_id: u64, right_range_id: u64) -> bool {
    let Some(store) = shared.local.get().map(|l| l.store.clone()) else {
        return false;
    };
    store.has_range(right_range_id)
        && !store.has_range(left_range_id)
        && kvserver::merge::tombstoned(store.engine(), left_range_id).unwrap_or(false)
}

/// For as long as the node runs: resolves merges left half done (a right
/// range frozen here for a while whose driver is gone), and, with
/// `--range-min-bytes`, merges small neighbouring user ranges.
pub async fn merge_loop(shared: Arc<Shared>) {
    const EVERY: Duration = Duration::from_secs(1);
    const STUCK: Duration = Duration::from_secs(10);
    let mut frozen_since: std::collections::HashMap<(u64, u64), std::time::Instant> = Default::default();
    loop {
        tokio::time::sleep(EVERY).await;
        let Some(store) = shared.local.get().map(|l| l.store.clone()) else {
            continue;
        };
        let now = std::time::Instant::now();
        // Frozen ranges, and (with automatic merges on) small ones: copied
        // out of every status only when they may matter.
        let min = shared.cfg.range_min_bytes;
        let bytes_of =
            |s: &kvserver::ReplicaStatus| (s.applied.stats.key_bytes + s.applied.stats.val_bytes).max(0) as u64;
        let statuses = store.statuses_where(|s| {
            s.frozen.is_some() || (min > 0 && kvserver::keyspace::splittable(s.desc.range_id) && bytes_of(s) < min)
        });
        frozen_since.retain(|(r, m), _| {
            statuses
                .iter()
                .any(|s| s.desc.range_id == *r && s.frozen.as_ref().is_some_and(|f| f.merge_id == *m))
        });
        for st in statuses.iter().filter(|s| s.can_serve(now)) {
            let Some(f) = &st.frozen else { continue };
            let since = *frozen_since.entry((st.desc.range_id, f.merge_id)).or_insert(now);
            if now.duration_since(since) < STUCK {
                continue;
            }
            match resolve(&shared, f.left_range_id, &st.desc, f.merge_id).await {
                Ok(merged) => tracing::info!(range = st.desc.range_id, merged, "resolved a merge left half done"),
                Err(e) => tracing::debug!(range = st.desc.range_id, error = %e, "cannot resolve a frozen range yet"),
            }
        }
        if min == 0 {
            continue;
        }
        let bytes = |s: &kvserver::ReplicaStatus| (s.applied.stats.key_bytes + s.applied.stats.val_bytes).max(0) as u64;
        // One merge per pass: the leaseholder of a small user range whose
        // right neighbour (here too) is small.
        let candidate = statuses.iter().find(|l| {
            kvserver::keyspace::splittable(l.desc.range_id)
                && l.can_serve(now)
                && l.frozen.is_none()
                && bytes(l) < min
                && statuses.iter().any(|r| {
                    r.desc.start_key == l.desc.end_key
                        && !r.desc.start_key.is_empty()
                        && r.frozen.is_none()
                        && bytes(r) < min
                        && bytes(l) + bytes(r) < shared.cfg.range_max_bytes / 2
                        && kvserver::merge::check_mergeable(&l.desc, &r.desc).is_none()
                })
        });
        if let Some(l) = candidate {
            match merge(&shared, l.desc.start_key.clone()).await {
                Ok(d) => tracing::info!(range = d.range_id, "merged a small neighbour"),
                Err(e) => tracing::debug!(range = l.desc.range_id, error = %e.message(), "merge did not happen"),
            }
        }
    }
}
