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
        let me = store.ident().store_id;
        let now = std::time::Instant::now();
        let wall = store.clock().physical() as i64;
        let records = store.liveness();
        let window = kvserver::scheduler::LIVENESS_WINDOW;
        let nodes = store
            .known_stores()
            .read()
            .iter()
            .map(|(&id, addr)| {
                let heard = if id == me { Some(now) } else { store.last_heard(id) };
                let record = records
                    .as_ref()
                    .and_then(|r| r.iter().find(|l| l.node_id == id).cloned());
                // Live: by its liveness record; without a replica of the system
                // range here, by whether this node hears from it.
                let live = match &records {
                    Some(_) => record.as_ref().is_some_and(|l| l.expiration_nanos > wall),
                    None => heard.is_some_and(|t| now.duration_since(t) < window),
                };
                NodeStatus {
                    node_id: id,
                    store_id: id,
                    addr: if addr.is_empty() {
                        self.shared.advertise.clone()
                    } else {
                        addr.clone()
                    },
                    live,
                    last_heard_ms: heard.map_or(u64::MAX, |t| now.duration_since(t).as_millis() as u64),
                    liveness_epoch: record.as_ref().map_or(0, |l| l.epoch),
                    liveness_expires_in_ms: record.map_or(0, |l| (l.expiration_nanos - wall) / 1_000_000),
                }
            })
            .collect();
        Ok(Response::new(NodesStatusResponse {
            node_id: store.ident().node_id,
            cluster_id: store.ident().cluster_id.clone(),
            nodes,
        }))
    }
}
