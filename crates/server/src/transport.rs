//! The raft transport over gRPC: one long-lived stream to each other store
//! carrying batches of raft messages for every range, and snapshots streamed
//! in chunks on their own RPC so they never hold up heartbeats.
//!
//! Sending never blocks the raft loop: messages go into a bounded queue per
//! destination (dropped when full: raft retries), drained by a task that
//! connects, and reconnects with backoff when the peer is down, without
//! holding up the others. Receiving checks the cluster id, records the
//! sender's address and clock, and hands the messages to the store.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use kvserver::transport::{SnapshotDone, Transport};
use kvserver::StoreHandle;
use parking_lot::Mutex;
use prost::Message as _;
use proto::transport::raft_transport_client::RaftTransportClient;
use proto::transport::raft_transport_server::RaftTransport;
use proto::transport::{raft_msg, BatchAck, RaftMessageBatch, RaftMsg, SnapshotAck, SnapshotChunk, SnapshotHandle};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

use crate::clock_check::ClockCheck;

/// Who this node is, once known (a joining node learns it late).
#[derive(Clone)]
pub struct Local {
    pub store: StoreHandle,
    pub addr: String,
}

/// Outgoing side: queues per destination store, drained by one task each.
pub struct GrpcTransport {
    local: Arc<OnceLock<Local>>,
    queues: Mutex<HashMap<u64, mpsc::Sender<Vec<RaftMsg>>>>,
    rt: tokio::runtime::Handle,
}

const QUEUE: usize = 1024;
const CHUNK: usize = 1 << 20;
/// The longest a snapshot may take to send and apply.
const SNAPSHOT_DEADLINE: Duration = Duration::from_secs(120);

/// A connection to another node, for raft traffic and every other call
/// between nodes.
pub(crate) async fn connect(addr: &str) -> Result<Channel, String> {
    Channel::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true)
        // A peer that stops answering (paused, partitioned) is found out and
        // the stream reopened, instead of waiting for TCP to give up.
        .http2_keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(Duration::from_secs(3))
        .keep_alive_while_idle(true)
        .connect()
        .await
        .map_err(|e| e.to_string())
}

impl GrpcTransport {
    pub fn new(local: Arc<OnceLock<Local>>, rt: tokio::runtime::Handle) -> Self {
        GrpcTransport {
            local,
            queues: Mutex::new(HashMap::new()),
            rt,
        }
    }

    fn addr_of(local: &Local, store: u64) -> Option<String> {
        local
            .store
            .known_stores()
            .read()
            .get(&store)
            .filter(|a| !a.is_empty())
            .cloned()
    }

    /// The task that owns the stream to `to_store`.
    async fn drain(local: Arc<OnceLock<Local>>, to_store: u64, mut rx: mpsc::Receiver<Vec<RaftMsg>>) {
        let mut backoff = Duration::from_millis(50);
        loop {
            let Some(l) = local.get().cloned() else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let Some(addr) = Self::addr_of(&l, to_store) else {
                // Unknown address: drop what is queued (raft retries) and wait.
                while rx.try_recv().is_ok() {}
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            let ch = match connect(&addr).await {
                Ok(c) => c,
                Err(_) => {
                    while rx.try_recv().is_ok() {}
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
            let mut client = RaftTransportClient::new(ch);
            let (tx, out) = mpsc::channel::<RaftMessageBatch>(QUEUE);
            l.store.metrics().raft_streams_opened.inc();
            // The call lives as long as the stream: its response resolves as
            // soon as the peer accepts, so read the peer's answers until it
            // closes or refuses (another cluster) before calling it over.
            let call = tokio::spawn(async move {
                let mut answers = client.raft_messages(ReceiverStream::new(out)).await?.into_inner();
                while answers.message().await?.is_some() {}
                Ok::<(), Status>(())
            });
            backoff = Duration::from_millis(50);
            // Forward batches until the stream breaks.
            loop {
                let Some(msgs) = rx.recv().await else { return };
                let ident = l.store.ident();
                let batch = RaftMessageBatch {
                    cluster_id: ident.cluster_id.clone(),
                    from_node: ident.node_id,
                    from_store: ident.store_id,
                    from_addr: l.addr.clone(),
                    to_store,
                    sender_clock: Some(l.store.clock().last().into()),
                    sender_physical_nanos: l.store.clock().physical(),
                    messages: msgs,
                };
                if tx.send(batch).await.is_err() || call.is_finished() {
                    break;
                }
            }
            call.abort();
            tokio::time::sleep(backoff).await;
        }
    }

    async fn send_snapshot_task(
        local: Arc<OnceLock<Local>>,
        to_store: u64,
        msg: RaftMsg,
        meta: proto::storage::SnapshotMeta,
        dir: PathBuf,
    ) -> Result<bool, String> {
        let l = local.get().cloned().ok_or("not started")?;
        let addr = Self::addr_of(&l, to_store).ok_or("no address")?;
        let mut client = RaftTransportClient::new(connect(&addr).await?)
            .max_encoding_message_size(4 * CHUNK)
            .max_decoding_message_size(4 * CHUNK);
        let ident = l.store.ident().clone();
        let (tx, rx) = mpsc::channel::<SnapshotChunk>(4);
        let send = async move {
            tx.send(SnapshotChunk {
                cluster_id: ident.cluster_id.clone(),
                from_store: ident.store_id,
                to_store,
                message: Some(msg),
                meta: Some(meta),
                file: String::new(),
                data: Vec::new(),
            })
            .await
            .map_err(|e| e.to_string())?;
            let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
                .map_err(|e| e.to_string())?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .collect();
            files.sort();
            for f in files {
                let name = f
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let bytes = tokio::fs::read(&f).await.map_err(|e| e.to_string())?;
                for piece in bytes.chunks(CHUNK).chain(std::iter::once(&[][..])) {
                    tx.send(SnapshotChunk {
                        file: name.clone(),
                        data: piece.to_vec(),
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| e.to_string())?;
                }
            }
            Ok::<(), String>(())
        };
        let (sent, resp) = tokio::join!(send, client.raft_snapshot(ReceiverStream::new(rx)));
        sent?;
        Ok(resp.map_err(|e| e.to_string())?.into_inner().applied)
    }
}

impl Transport for GrpcTransport {
    fn send(&self, to_store: u64, msgs: Vec<RaftMsg>) {
        let mut q = self.queues.lock();
        let tx = q.entry(to_store).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(QUEUE);
            self.rt.spawn(Self::drain(self.local.clone(), to_store, rx));
            tx
        });
        let _ = tx.try_send(msgs); // full: dropped, raft sends again
    }

    fn send_snapshot(
        &self,
        to_store: u64,
        msg: RaftMsg,
        meta: proto::storage::SnapshotMeta,
        dir: PathBuf,
        done: SnapshotDone,
    ) {
        let local = self.local.clone();
        self.rt.spawn(async move {
            // Bounded, so that raft always hears back and can try again.
            let sent = tokio::time::timeout(
                SNAPSHOT_DEADLINE,
                Self::send_snapshot_task(local, to_store, msg, meta, dir),
            );
            let ok = match sent.await.unwrap_or_else(|_| Err("timed out".into())) {
                Ok(ok) => ok,
                Err(e) => {
                    tracing::warn!(to_store, error = %e, "snapshot send failed");
                    false
                }
            };
            done(ok);
        });
    }
}

/// Whether a message may arrive on the message stream. A snapshot may not:
/// only `RaftSnapshot` stages snapshot files, and the handle in a streamed one
/// would name a directory the sender chose (a bad one stopped the raft loop).
fn admissible_in_stream(m: &RaftMsg) -> bool {
    !matches!(m.body, Some(raft_msg::Body::Snapshot(_)))
}

/// Incoming side of the raft transport.
#[derive(Clone)]
pub struct RaftService {
    pub local: Arc<OnceLock<Local>>,
    pub clock_check: Arc<ClockCheck>,
}

impl RaftService {
    fn local(&self) -> Result<Local, Status> {
        self.local
            .get()
            .cloned()
            .ok_or_else(|| Status::unavailable("node not initialized yet"))
    }
}

type AckStream = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<BatchAck, Status>> + Send>>;

#[tonic::async_trait]
impl RaftTransport for RaftService {
    type RaftMessagesStream = AckStream;

    async fn raft_messages(&self, req: Request<Streaming<RaftMessageBatch>>) -> Result<Response<AckStream>, Status> {
        let local = self.local()?;
        let clock_check = self.clock_check.clone();
        let mut incoming = req.into_inner();
        let (tx, rx) = mpsc::channel::<Result<BatchAck, Status>>(1);
        tokio::spawn(async move {
            loop {
                let batch = match incoming.message().await {
                    Ok(Some(b)) => b,
                    Ok(None) | Err(_) => return,
                };
                let ident = local.store.ident();
                if batch.cluster_id != ident.cluster_id {
                    let _ = tx
                        .send(Err(Status::failed_precondition(format!(
                            "this node belongs to cluster {}, not {}",
                            ident.cluster_id, batch.cluster_id
                        ))))
                        .await;
                    return;
                }
                if batch.to_store != ident.store_id {
                    continue;
                }
                if !batch.from_addr.is_empty() {
                    let mut book = local.store.known_stores().write();
                    if book.get(&batch.from_store) != Some(&batch.from_addr) {
                        book.insert(batch.from_store, batch.from_addr.clone());
                    }
                }
                let mut trusted = true;
                if batch.sender_physical_nanos > 0 {
                    let ours = local.store.clock().physical();
                    clock_check.observe(batch.from_store, batch.sender_physical_nanos, ours);
                    trusted = clock_check.within_max_offset(batch.sender_physical_nanos, ours);
                    let peers = local.store.known_stores().read().len().saturating_sub(1);
                    let _ = clock_check.problem(peers); // logs when this node stops or resumes serving
                }
                // A clock beyond the maximum offset must not drag ours along.
                if let Some(ts) = batch.sender_clock.filter(|_| trusted) {
                    let _ = local.store.clock().update(ts.into());
                }
                // Snapshots come only over RaftSnapshot, which stages their
                // files here; one in a message stream names nothing of ours.
                let msgs: Vec<RaftMsg> = batch.messages.into_iter().filter(admissible_in_stream).collect();
                local.store.deliver(batch.from_store, msgs);
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn raft_snapshot(&self, req: Request<Streaming<SnapshotChunk>>) -> Result<Response<SnapshotAck>, Status> {
        let local = self.local()?;
        let mut incoming = req.into_inner();
        let head = incoming
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty snapshot stream"))?;
        let ident = local.store.ident().clone();
        if head.cluster_id != ident.cluster_id {
            return Err(Status::failed_precondition("snapshot from another cluster"));
        }
        let mut msg = head
            .message
            .ok_or_else(|| Status::invalid_argument("snapshot without its raft message"))?;
        let meta = head
            .meta
            .ok_or_else(|| Status::invalid_argument("snapshot without meta"))?;
        if head.to_store != ident.store_id {
            return Err(Status::failed_precondition(format!(
                "snapshot for store {}, this is store {}",
                head.to_store, ident.store_id
            )));
        }
        if meta.range_id != msg.range_id {
            return Err(Status::invalid_argument(
                "snapshot meta and message name different ranges",
            ));
        }
        let staged = storage::snapshot::new_incoming_dir(local.store.engine(), msg.range_id)
            .map_err(|e| Status::internal(e.to_string()))?;
        let mut files: HashMap<String, Vec<u8>> = HashMap::new();
        while let Some(chunk) = incoming.message().await? {
            // File names are single path components: nothing escapes the staging dir.
            if chunk.file.is_empty() || chunk.file.contains('/') || chunk.file.contains("..") {
                return Err(Status::invalid_argument(format!(
                    "bad snapshot file name {:?}",
                    chunk.file
                )));
            }
            files.entry(chunk.file).or_default().extend_from_slice(&chunk.data);
        }
        for (name, bytes) in files {
            std::fs::write(staged.join(name), bytes).map_err(|e| Status::internal(e.to_string()))?;
        }
        match &mut msg.body {
            Some(raft_msg::Body::Snapshot(s)) => {
                s.data = SnapshotHandle {
                    meta: Some(meta),
                    dir: staged.to_string_lossy().into_owned(),
                }
                .encode_to_vec();
            }
            _ => return Err(Status::invalid_argument("snapshot stream without a snapshot message")),
        }
        local.store.deliver(head.from_store, vec![msg]);
        Ok(Response::new(SnapshotAck {
            applied: true,
            error: String::new(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_are_refused_on_the_message_stream() {
        let snap = RaftMsg {
            range_id: 2,
            from: 2,
            to: 1,
            term: 5,
            body: Some(raft_msg::Body::Snapshot(Default::default())),
        };
        assert!(!admissible_in_stream(&snap));
        let beat = RaftMsg {
            body: Some(raft_msg::Body::Heartbeat(Default::default())),
            ..snap
        };
        assert!(admissible_in_stream(&beat));
        assert!(admissible_in_stream(&RaftMsg::default()));
    }
}
