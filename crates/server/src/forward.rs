//! Requests a gateway sends to another node's leaseholders, on one long-lived
//! stream per node (`Internal.BatchStream`) instead of a unary call each: a
//! forwarded write costs one message each way on a stream that is already
//! open, and many requests in flight share its frames.
//!
//! Each request carries an id; the node answers in any order and a reader
//! task hands each answer to its waiting caller. A stream that breaks fails
//! every request still waiting on it (the caller decides whether that may
//! have taken effect); the next request opens a new one. This module only
//! carries requests: where to send and what to retry is the DistSender's.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use proto::kvserver::internal_client::InternalClient;
use proto::kvserver::{BatchRequest, BatchResponse, BatchStreamRequest};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// Requests queued for one stream before a sender waits.
const QUEUE: usize = 4096;
/// The largest message either way (as the unary call allows).
const MAX_MESSAGE: usize = 64 << 20;

/// Why a forwarded request got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ForwardError {
    /// Certainly not sent: no stream could be opened, or it was already
    /// closed when the request was queued.
    #[error("not sent: {0}")]
    NotSent(String),
    /// Sent (or queued to be), and the stream broke before its answer came:
    /// it may have taken effect.
    #[error("the stream to {0} broke before the answer came")]
    Broken(String),
}

type Waiters = Mutex<HashMap<u64, oneshot::Sender<BatchResponse>>>;

/// One open stream to a node.
struct Stream {
    tx: mpsc::Sender<BatchStreamRequest>,
    waiting: Arc<Waiters>,
    next_id: AtomicU64,
    /// Set by the reader once the stream ended: no answer comes any more.
    broken: Arc<AtomicBool>,
}

impl Stream {
    fn usable(&self) -> bool {
        !self.tx.is_closed() && !self.broken.load(Ordering::SeqCst)
    }
}

/// The streams of this node to the others, by address.
#[derive(Default)]
pub struct Forwarder {
    streams: Mutex<HashMap<String, Arc<Stream>>>,
}

/// Forgets a request's waiter when its caller stops waiting (a timeout), so
/// an answer that never comes leaves nothing behind.
struct WaitGuard {
    waiting: Arc<Waiters>,
    id: u64,
}

impl Drop for WaitGuard {
    fn drop(&mut self) {
        self.waiting.lock().remove(&self.id);
    }
}

impl Forwarder {
    /// Sends `req` to the node at `addr` over its stream (opened on `channel`
    /// if there is none) and waits for the answer.
    pub async fn call(&self, addr: &str, channel: Channel, req: BatchRequest) -> Result<BatchResponse, ForwardError> {
        let stream = self.stream(addr, channel).await?;
        let id = stream.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        stream.waiting.lock().insert(id, tx);
        let _guard = WaitGuard {
            waiting: stream.waiting.clone(),
            id,
        };
        // The reader marks the stream broken before it drops the waiters: a
        // waiter added after that is seen here, before anything is sent.
        if stream.broken.load(Ordering::SeqCst) {
            self.forget(addr, &stream);
            return Err(ForwardError::NotSent(format!("the stream to {addr} ended")));
        }
        let msg = BatchStreamRequest { id, request: Some(req) };
        if stream.tx.send(msg).await.is_err() {
            // The stream's sending half is gone: this request never left.
            self.forget(addr, &stream);
            return Err(ForwardError::NotSent(format!("the stream to {addr} is closed")));
        }
        match rx.await {
            Ok(resp) => Ok(resp),
            Err(_) => {
                self.forget(addr, &stream);
                Err(ForwardError::Broken(addr.to_string()))
            }
        }
    }

    /// Drops the stream to `addr` (it failed), if it is still `stream`.
    fn forget(&self, addr: &str, stream: &Arc<Stream>) {
        let mut s = self.streams.lock();
        if s.get(addr).is_some_and(|cur| Arc::ptr_eq(cur, stream)) {
            s.remove(addr);
        }
    }

    async fn stream(&self, addr: &str, channel: Channel) -> Result<Arc<Stream>, ForwardError> {
        if let Some(s) = self.streams.lock().get(addr) {
            if s.usable() {
                return Ok(s.clone());
            }
        }
        let (tx, rx) = mpsc::channel(QUEUE);
        let mut client = InternalClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        let mut answers = client
            .batch_stream(ReceiverStream::new(rx))
            .await
            .map_err(|s| ForwardError::NotSent(s.message().to_string()))?
            .into_inner();
        let waiting: Arc<Waiters> = Arc::default();
        let broken = Arc::new(AtomicBool::new(false));
        let stream = Arc::new(Stream {
            tx,
            waiting: waiting.clone(),
            next_id: AtomicU64::new(1),
            broken: broken.clone(),
        });
        tokio::spawn(async move {
            while let Ok(Some(a)) = answers.message().await {
                if let Some(w) = waiting.lock().remove(&a.id) {
                    let _ = w.send(a.response.unwrap_or_default());
                }
            }
            // Broken or closed: every caller still waiting hears of it.
            broken.store(true, Ordering::SeqCst);
            waiting.lock().clear();
        });
        let mut s = self.streams.lock();
        // Another caller may have opened one meanwhile: keep the first.
        match s.get(addr) {
            Some(cur) if cur.usable() => Ok(cur.clone()),
            _ => {
                s.insert(addr.to_string(), stream.clone());
                Ok(stream)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::time::Duration;

    use proto::kvserver::internal_server::{Internal, InternalServer};
    use proto::kvserver::{batch_response, BatchStreamResponse};
    use tonic::{Request, Response, Status, Streaming};

    use super::*;

    /// Answers request `range_id` N with node id N after (10 - N) ms, so
    /// later requests are answered first; `range_id` 99 ends the stream
    /// with an error.
    struct Echo;

    type Answers = Pin<Box<dyn tokio_stream::Stream<Item = Result<BatchStreamResponse, Status>> + Send>>;

    #[tonic::async_trait]
    impl Internal for Echo {
        async fn batch(&self, _: Request<BatchRequest>) -> Result<Response<BatchResponse>, Status> {
            Err(Status::unimplemented("stream only"))
        }

        type BatchStreamStream = Answers;

        async fn batch_stream(&self, req: Request<Streaming<BatchStreamRequest>>) -> Result<Response<Answers>, Status> {
            let mut incoming = req.into_inner();
            let (tx, rx) = mpsc::channel(16);
            tokio::spawn(async move {
                while let Ok(Some(m)) = incoming.message().await {
                    let n = m.request.map_or(0, |r| r.range_id);
                    if n == 99 {
                        // Ends the stream (answers still being made are lost).
                        let _ = tx.send(Err(Status::aborted("going away"))).await;
                        return;
                    }
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(10u64.saturating_sub(n))).await;
                        let response = BatchResponse {
                            response: Some(batch_response::Response::NodeId(n)),
                        };
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

    fn req(range_id: u64) -> BatchRequest {
        BatchRequest {
            range_id,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn answers_reach_their_callers_and_a_broken_stream_fails_only_what_waited_on_it() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(InternalServer::new(Echo))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        let ch = crate::transport::connect(&addr).await.unwrap();
        let f = Arc::new(Forwarder::default());
        // Answered in reverse order, each to its own caller.
        let calls: Vec<_> = (1..=8)
            .map(|n| {
                let (f, addr, ch) = (f.clone(), addr.clone(), ch.clone());
                tokio::spawn(async move { f.call(&addr, ch, req(n)).await })
            })
            .collect();
        for (n, call) in (1..=8).zip(calls) {
            let a = call.await.unwrap().unwrap();
            assert_eq!(a.response, Some(batch_response::Response::NodeId(n)));
        }
        // The stream breaks under a request still waiting: that one may have
        // arrived (Broken); the next call opens a new stream.
        let slow = f.call(&addr, ch.clone(), req(1));
        let breaker = f.call(&addr, ch.clone(), req(99));
        let (slow, breaker) = tokio::join!(slow, breaker);
        assert_eq!(breaker, Err(ForwardError::Broken(addr.clone())));
        assert_eq!(slow, Err(ForwardError::Broken(addr.clone())));
        let again = f.call(&addr, ch.clone(), req(3)).await.unwrap();
        assert_eq!(again.response, Some(batch_response::Response::NodeId(3)));
        assert!(f.streams.lock().get(&addr).is_some_and(|s| s.waiting.lock().is_empty()));
    }
}
