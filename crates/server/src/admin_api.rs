//! Tardigrade's administrative gRPC API: what `tardigrade debug ranges` and
//! `node status` show, and `debug transfer-lease`.

use std::sync::Arc;

use std::time::{Duration, Instant};

use proto::admin::{
    admin_server::Admin, MergeRequest, MergeResponse, NodeStatus, NodesStatusRequest, NodesStatusResponse, RangeInfo,
    RangesRequest, RangesResponse, SplitRequest, SplitResponse, TransferLeaseRequest, TransferLeaseResponse,
};
use proto::storage::replica_descriptor;
use tonic::{Request, Response, Status};

use crate::Shared;

#[derive(Clone)]
pub struct AdminApi {
    pub shared: Arc<Shared>,
}

/// How long a lease transfer may take before the caller is told it did not.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(5);

#[tonic::async_trait]
impl Admin for AdminApi {
    async fn merge(&self, req: Request<MergeRequest>) -> Result<Response<MergeResponse>, Status> {
        let key = req.into_inner().key;
        let merged = crate::kv_api::merge(&self.shared, key).await?;
        Ok(Response::new(MergeResponse { merged: Some(merged) }))
    }

    async fn split(&self, req: Request<SplitRequest>) -> Result<Response<SplitResponse>, Status> {
        let key = req.into_inner().split_key;
        let (left, right) = crate::kv_api::split(&self.shared, key).await?;
        Ok(Response::new(SplitResponse {
            left: Some(left),
            right: Some(right),
        }))
    }

    async fn transfer_lease(
        &self,
        req: Request<TransferLeaseRequest>,
    ) -> Result<Response<TransferLeaseResponse>, Status> {
        let store = self.shared.store()?;
        let TransferLeaseRequest { range_id, to_node } = req.into_inner();
        let me = store.ident().node_id;
        let st = store
            .status(range_id)
            .ok_or_else(|| Status::not_found(format!("node {me} has no replica of range {range_id}")))?;
        let leader_node = |st: &kvserver::ReplicaStatus| {
            st.desc
                .replicas
                .iter()
                .find(|r| st.leader != 0 && r.replica_id == st.leader)
                .map(|r| r.node_id)
        };
        match leader_node(&st) {
            Some(n) if n == me && st.leader_ready => {}
            Some(n) if n == me => {
                return Err(Status::unavailable(format!(
                    "node {me} was just elected leader of range {range_id} and does not serve yet; try again"
                )))
            }
            Some(n) => {
                return Err(Status::failed_precondition(format!(
                    "node {me} does not hold the lease of range {range_id}: node {n} does; ask it"
                )))
            }
            None => {
                return Err(Status::unavailable(format!(
                    "range {range_id} has no leader now; try again"
                )))
            }
        }
        if to_node == me {
            return Ok(Response::new(TransferLeaseResponse { leaseholder: me }));
        }
        let Some(target) = st
            .desc
            .replicas
            .iter()
            .find(|r| r.node_id == to_node && r.r#type == replica_descriptor::Type::Voter as i32)
        else {
            return Err(Status::invalid_argument(format!(
                "node {to_node} has no voting replica of range {range_id}"
            )));
        };
        store
            .transfer_leader(range_id, target.store_id)
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let deadline = Instant::now() + TRANSFER_TIMEOUT;
        loop {
            tokio::time::sleep(Duration::from_millis(10)).await;
            if let Some(n) = store.status(range_id).as_ref().and_then(leader_node) {
                if n == to_node {
                    return Ok(Response::new(TransferLeaseResponse { leaseholder: n }));
                }
            }
            if Instant::now() >= deadline {
                return Err(Status::deadline_exceeded(format!(
                    "the lease of range {range_id} did not move to node {to_node} within {}s (is it behind or unreachable?)",
                    TRANSFER_TIMEOUT.as_secs()
                )));
            }
        }
    }

    async fn ranges(&self, _req: Request<RangesRequest>) -> Result<Response<RangesResponse>, Status> {
        let store = self.shared.store()?;
        let now = std::time::Instant::now();
        let ranges = store
            .statuses()
            .into_iter()
            .map(|s| RangeInfo {
                lease_valid: s.can_serve(now),
                lease: s.lease_detail(now),
                descriptor: Some(s.desc.clone()),
                name: s.name.clone(),
                raft_leader: s.leader,
                raft_term: s.term,
                commit_index: s.commit,
                applied_index: s.applied.index,
                stats: Some(s.applied.stats.into()),
                requests: s.conc.requests(),
            })
            .collect();
        Ok(Response::new(RangesResponse {
            node_id: store.ident().node_id,
            ranges,
        }))
    }

    async fn nodes(&self, _req: Request<NodesStatusRequest>) -> Result<Response<NodesStatusResponse>, Status> {
        let store = self.shared.store()?;
        let now = std::time::Instant::now();
        let wall = store.clock().physical() as i64;
        let addrs = store.known_stores().read().clone();
        let nodes = store
            .node_liveness()
            .into_iter()
            .map(|n| NodeStatus {
                node_id: n.store,
                store_id: n.store,
                addr: match addrs.get(&n.store) {
                    Some(a) if !a.is_empty() => a.clone(),
                    _ => self.shared.advertise.clone(),
                },
                live: n.live,
                last_heard_ms: n
                    .last_heard
                    .map_or(u64::MAX, |t| now.saturating_duration_since(t).as_millis() as u64),
                liveness_epoch: n.record.as_ref().map_or(0, |l| l.epoch),
                liveness_expires_in_ms: n.record.map_or(0, |l| (l.expiration_nanos - wall) / 1_000_000),
            })
            .collect();
        Ok(Response::new(NodesStatusResponse {
            node_id: store.ident().node_id,
            cluster_id: store.ident().cluster_id.clone(),
            nodes,
        }))
    }
}
