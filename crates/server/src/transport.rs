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
use tokio::sync::{mpsc, Notify};
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

/// Outgoing side: one stream per destination store, which the raft loop
/// pushes its frames straight into (built on its own thread: no task
/// between it and the stream), and a task per destination that (re)connects.
pub struct GrpcTransport {
    local: Arc<OnceLock<Local>>,
    peers: Mutex<HashMap<u64, Arc<Peer>>>,
    rt: tokio::runtime::Handle,
}

/// The way to one other store.
#[derive(Default)]
struct Peer {
    /// The open stream's sending half, once connected.
    stream: Mutex<Option<mpsc::Sender<RaftMessageBatch>>>,
    /// Messages sent while no stream was open, for the next one (bounded:
    /// raft sends again what is dropped).
    backlog: Mutex<Vec<Vec<RaftMsg>>>,
    /// Wakes the connecting task: something waits to be sent.
    wake: Notify,
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

/// One frame of messages to `to_store`, stamped with this node's identity,
/// address and clock now.
fn frame(l: &Local, to_store: u64, messages: Vec<RaftMsg>) -> RaftMessageBatch {
    let ident = l.store.ident();
    RaftMessageBatch {
        cluster_id: ident.cluster_id.clone(),
        from_node: ident.node_id,
        from_store: ident.store_id,
        from_addr: l.addr.clone(),
        to_store,
        sender_clock: Some(l.store.clock().last().into()),
        sender_physical_nanos: l.store.clock().physical(),
        messages,
    }
}

impl GrpcTransport {
    pub fn new(local: Arc<OnceLock<Local>>, rt: tokio::runtime::Handle) -> Self {
        GrpcTransport {
            local,
            peers: Mutex::new(HashMap::new()),
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

    /// The task that keeps a stream open to `to_store` while there is
    /// something to send to it.
    async fn connect_loop(local: Arc<OnceLock<Local>>, to_store: u64, peer: Arc<Peer>) {
        let mut backoff = Duration::from_millis(50);
        loop {
            peer.wake.notified().await;
            let Some(l) = local.get().cloned() else {
                peer.backlog.lock().clear();
                continue;
            };
            let Some(addr) = Self::addr_of(&l, to_store) else {
                // Unknown address: drop what waits (raft retries).
                peer.backlog.lock().clear();
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            let ch = match connect(&addr).await {
                Ok(c) => c,
                Err(_) => {
                    peer.backlog.lock().clear();
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
            let mut client = RaftTransportClient::new(ch);
            let (tx, out) = mpsc::channel::<RaftMessageBatch>(QUEUE);
            l.store.metrics().raft_streams_opened.inc();
            for msgs in std::mem::take(&mut *peer.backlog.lock()) {
                let _ = tx.try_send(frame(&l, to_store, msgs));
            }
            *peer.stream.lock() = Some(tx);
            backoff = Duration::from_millis(50);
            // The call lives as long as the stream: its response resolves as
            // soon as the peer accepts, so read the peer's answers until it
            // closes or refuses (another cluster).
            let call = async {
                let mut answers = client.raft_messages(ReceiverStream::new(out)).await?.into_inner();
                while answers.message().await?.is_some() {}
                Ok::<(), Status>(())
            };
            let _ = call.await;
            *peer.stream.lock() = None;
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

impl GrpcTransport {
    /// Keeps `msgs` for the stream being opened to `peer` (bounded: raft
    /// sends again what is dropped) and wakes its connecting task.
    fn park(&self, peer: &Peer, msgs: Vec<RaftMsg>) {
        let mut backlog = peer.backlog.lock();
        if backlog.len() < QUEUE {
            backlog.push(msgs);
        }
        drop(backlog);
        peer.wake.notify_one();
    }
}

impl Transport for GrpcTransport {
    fn send(&self, to_store: u64, msgs: Vec<RaftMsg>) {
        let peer = {
            let mut peers = self.peers.lock();
            peers
                .entry(to_store)
                .or_insert_with(|| {
                    let peer = Arc::new(Peer::default());
                    self.rt
                        .spawn(Self::connect_loop(self.local.clone(), to_store, peer.clone()));
                    peer
                })
                .clone()
        };
        let stream = peer.stream.lock().clone();
        match (stream, self.local.get()) {
            (Some(tx), Some(l)) => match tx.try_send(frame(l, to_store, msgs)) {
                Ok(()) => {}
                // Full: dropped, raft sends again.
                Err(mpsc::error::TrySendError::Full(_)) => {}
                Err(mpsc::error::TrySendError::Closed(b)) => {
                    *peer.stream.lock() = None;
                    self.park(&peer, b.messages);
                }
            },
            _ => self.park(&peer, msgs),
        }
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
                // The address book changes rarely: look under the shared lock.
                if !batch.from_addr.is_empty()
                    && local.store.known_stores().read().get(&batch.from_store) != Some(&batch.from_addr)
                {
                    local
                        .store
                        .known_stores()
                        .write()
                        .insert(batch.from_store, batch.from_addr.clone());
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
