//! Tardigrade's administrative gRPC API: what `tardigrade debug ranges` shows.

use std::sync::Arc;

use proto::admin::{
    admin_server::Admin, NodeStatus, NodesStatusRequest, NodesStatusResponse, RangeInfo, RangesRequest, RangesResponse,
};
use tonic::{Request, Response, Status};

use crate::Shared;

#[derive(Clone)]
pub struct AdminApi {
    pub shared: Arc<Shared>,
}

#[tonic::async_trait]
impl Admin for AdminApi {
    async fn ranges(&self, _req: Request<RangesRequest>) -> Result<Response<RangesResponse>, Status> {
        let store = self.shared.store()?;
        let now = std::time::Instant::now();
        let ranges = store
            .statuses()
            .into_iter()
            .map(|s| RangeInfo {
                lease_valid: s.can_serve(now),
                descriptor: Some(s.desc.clone()),
                name: s.name.clone(),
                raft_leader: s.leader,
                raft_term: s.term,
                commit_index: s.commit,
                applied_index: s.applied.index,
                stats: Some(s.applied.stats.into()),
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
            .map(|(id, live, record, heard)| NodeStatus {
                node_id: id,
                store_id: id,
                addr: match addrs.get(&id) {
                    Some(a) if !a.is_empty() => a.clone(),
                    _ => self.shared.advertise.clone(),
                },
                live,
                last_heard_ms: heard.map_or(u64::MAX, |t| now.duration_since(t).as_millis() as u64),
                liveness_epoch: record.as_ref().map_or(0, |l| l.epoch),
                liveness_expires_in_ms: record.map_or(0, |l| (l.expiration_nanos - wall) / 1_000_000),
            })
            .collect();
        Ok(Response::new(NodesStatusResponse {
            node_id: store.ident().node_id,
            cluster_id: store.ident().cluster_id.clone(),
            nodes,
        }))
    }
}
