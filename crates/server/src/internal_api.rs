//! The server side of the internal batch RPC: another node's DistSender asks
//! this node to evaluate a request for a range it holds the lease of. This
//! only checks the caller's cluster and hands the request to the store; it
//! never forwards (a wrong target gets a not-leaseholder answer with a hint).

use std::sync::Arc;

use proto::kvserver::internal_server::Internal;
use proto::kvserver::{batch_error, batch_response, BatchError, BatchRequest, BatchResponse};
use tonic::{Request, Response, Status};

use crate::Shared;

#[derive(Clone)]
pub struct InternalApi {
    pub shared: Arc<Shared>,
}

#[tonic::async_trait]
impl Internal for InternalApi {
    async fn batch(&self, req: Request<BatchRequest>) -> Result<Response<BatchResponse>, Status> {
        // Every refusal is an answer, never a gRPC error: the caller treats a
        // gRPC error on a write as "it may have arrived".
        let refuse = |why: String| {
            Ok(Response::new(BatchResponse {
                response: Some(batch_response::Response::Error(BatchError {
                    kind: Some(batch_error::Kind::Unavailable(why)),
                })),
            }))
        };
        let store = match self.shared.store() {
            Ok(s) => s,
            Err(s) => return refuse(s.message().to_string()),
        };
        let req = req.into_inner();
        if req.cluster_id != store.ident().cluster_id {
            return refuse(format!(
                "this node belongs to cluster {}, not {:?}",
                store.ident().cluster_id,
                req.cluster_id
            ));
        }
        let opts = self.shared.eval_options();
        Ok(Response::new(kvserver::evaluator::evaluate(&store, req, &opts).await))
    }
}
