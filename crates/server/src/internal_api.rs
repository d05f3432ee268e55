//! The server side of the internal batch RPC: another node's DistSender asks
//! this node to evaluate a request for a range it holds the lease of, as one
//! unary call or on a long-lived stream of requests answered by id
//! (`forward`). This only checks the caller's cluster and hands the request
//! to the store; it never forwards (a wrong target gets a not-leaseholder
//! answer with a hint).

use std::pin::Pin;
use std::sync::Arc;

use proto::kvserver::internal_server::Internal;
use proto::kvserver::{
    batch_error, batch_response, BatchError, BatchRequest, BatchResponse, BatchStreamRequest, BatchStreamResponse,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::Shared;

/// Answers a stream holds before its requests' tasks wait to send theirs.
const ANSWERS: usize = 1024;

#[derive(Clone)]
pub struct InternalApi {
    pub shared: Arc<Shared>,
}

/// Evaluates one request. Every refusal is an answer, never a gRPC error:
/// the caller treats a gRPC error on a write as "it may have arrived".
async fn answer(shared: &Shared, req: BatchRequest) -> BatchResponse {
    let refuse = |why: String| BatchResponse {
        response: Some(batch_response::Response::Error(BatchError {
            kind: Some(batch_error::Kind::Unavailable(why)),
        })),
    };
    let store = match shared.store() {
        Ok(s) => s,
        Err(s) => return refuse(s.message().to_string()),
    };
    if req.cluster_id != store.ident().cluster_id {
        return refuse(format!(
            "this node belongs to cluster {}, not {:?}",
            store.ident().cluster_id,
            req.cluster_id
        ));
    }
    let opts = shared.eval_options();
    kvserver::evaluator::evaluate(&store, req, &opts).await
}

type AnswerStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<BatchStreamResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Internal for InternalApi {
    async fn batch(&self, req: Request<BatchRequest>) -> Result<Response<BatchResponse>, Status> {
        Ok(Response::new(answer(&self.shared, req.into_inner()).await))
    }

    type BatchStreamStream = AnswerStream;

    async fn batch_stream(
        &self,
        req: Request<Streaming<BatchStreamRequest>>,
    ) -> Result<Response<AnswerStream>, Status> {
        let mut incoming = req.into_inner();
        let (tx, rx) = mpsc::channel(ANSWERS);
        let shared = self.shared.clone();
        tokio::spawn(async move {
            // Each request is evaluated by a task of its own: a slow one (a
            // write waiting for its entry) holds up no other.
            while let Ok(Some(m)) = incoming.message().await {
                let (shared, tx) = (shared.clone(), tx.clone());
                tokio::spawn(async move {
                    let response = answer(&shared, m.request.unwrap_or_default()).await;
                    let _ = tx
                        .send(Ok(BatchStreamResponse {
                            id: m.id,
                            response: Some(response),
                        }))
                        .await;
                });
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
