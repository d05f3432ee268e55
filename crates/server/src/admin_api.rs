//! Tardigrade's administrative gRPC API: what `tardigrade debug ranges` shows.

use kvserver::StoreHandle;
use proto::admin::{admin_server::Admin, RangeInfo, RangesRequest, RangesResponse};
use tonic::{Request, Response, Status};

#[derive(Clone)]
pub struct AdminApi {
    pub store: StoreHandle,
}

#[tonic::async_trait]
impl Admin for AdminApi {
    async fn ranges(&self, _req: Request<RangesRequest>) -> Result<Response<RangesResponse>, Status> {
        let now = std::time::Instant::now();
        let ranges = self
            .store
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
            node_id: self.store.ident().node_id,
            ranges,
        }))
    }
}
