//! The native KV API (`tardigrade.kvpb.KV/Batch`): a batch of reads and
//! writes on raw keys of the user keyspace, sent by this node's DistSender
//! (`kv::DistSender`, over `RangeSender` below) to the leaseholders of the
//! ranges it spans. Also the node's side of meta addressing: lookups in the
//! meta range and publishing descriptors there (`kvserver::meta`).
//!
//! This wires the client crate to the node; it evaluates nothing.

use std::sync::Arc;
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
/// the descriptor's replicas.
pub struct NodeRangeSender(pub Arc<Shared>);

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
        let range_id = desc.range_id;
        self.0.ranges.learn(desc);
        match self.0.send(range_id, batch_request::Request::Kv(req)).await {
            Ok(batch_response::Response::Kv(r)) => Ok(r),
            Ok(other) => Err(RangeError::Unavailable(format!("unexpected answer {other:?}"))),
            Err(e) => Err(range_error(e)),
        }
    }

    async fn lookup(&self, key: Vec<u8>, prefetch: u32) -> Result<Vec<RangeDescriptor>, RangeError> {
        let req = batch_request::Request::RangeLookup(RangeLookupRequest { key, prefetch });
        match self.0.send(SYSTEM_RANGE_ID, req).await {
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
        let sender = DistSender::with_metrics(NodeRangeSender(shared.clone()), shared.kv_metrics.clone());
        KvApi { shared, sender }
    }
}

#[tonic::async_trait]
impl Kv for KvApi {
    async fn batch(&self, req: Request<BatchRequest>) -> Result<Response<BatchResponse>, Status> {
        self.shared.store()?;
        let started = std::time::Instant::now();
        let out = self.sender.send(req.into_inner()).await;
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
    let sender = NodeRangeSender(shared.clone());
    let contains =
        |d: &RangeDescriptor| d.start_key.as_slice() <= key.as_slice() && key.as_slice() < d.end_key.as_slice();
    let mut known: Option<RangeDescriptor> = None;
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
        let alloc = RaftCommand {
            op: Some(raft_command::Op::AllocateRangeId(Default::default())),
            ..Default::default()
        };
        let new_range_id = match shared.send(SYSTEM_RANGE_ID, batch_request::Request::Write(alloc)).await {
            Ok(batch_response::Response::RangeId(id)) => id,
            Ok(other) => return Err(Status::internal(format!("unexpected answer {other:?}"))),
            Err(e) => return Err(status_of(e)),
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
