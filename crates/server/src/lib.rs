//! One Tardigrade node: it opens (or bootstraps, or joins) the store, then
//! serves etcd's v3 gRPC API, the admin API, cluster membership and the raft
//! transport on the listen address, and health and metrics over HTTP.
//!
//! A node is a gateway: its DistSender sends a request for a range to the
//! range's leaseholder, wherever it is. This crate wires parts together; it
//! holds no storage or consensus logic.

pub mod admin_api;
pub mod client_port;
pub mod clock_check;
pub mod dist_sender;
pub mod errors;
pub mod etcd_api;
pub mod etcd_lease_api;
pub mod etcd_watch_api;
pub mod forward;
pub mod gateway;
pub mod http;
pub mod internal_api;
pub mod kv_api;
pub mod liveness;
pub mod membership;
pub mod transport;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use kvserver::{Bootstrap, Store, StoreConfig, StoreHandle, StoreOptions};
use parking_lot::Mutex;
use proto::admin::admin_server::AdminServer;
use proto::cluster::membership_server::MembershipServer;
use proto::etcdserverpb::{
    cluster_server::ClusterServer, kv_server::KvServer, lease_server::LeaseServer,
    maintenance_server::MaintenanceServer, watch_server::WatchServer, ResponseHeader,
};
use proto::kvpb::kv_server::KvServer as NativeKvServer;
use proto::kvserver::internal_server::InternalServer;
use proto::transport::raft_transport_server::RaftTransportServer;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic::Status;

use crate::clock_check::ClockCheck;
use crate::transport::{GrpcTransport, Local, RaftService};

/// How a node becomes part of a cluster.
#[derive(Clone, Debug)]
pub enum Mode {
    /// A one-node cluster that bootstraps itself.
    SingleNode,
    /// A member of a multi-node cluster: joins through these addresses, or
    /// waits for `tardigrade init` if the cluster does not exist yet.
    Cluster { join: Vec<String> },
}

/// Settings of a node.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub store_dir: PathBuf,
    pub listen_addr: SocketAddr,
    /// The address other nodes reach this one at (default: the listen address).
    pub advertise_addr: Option<String>,
    pub http_addr: SocketAddr,
    pub tick: Duration,
    pub election_ticks: u64,
    pub request_timeout: Duration,
    pub max_clock_offset: Duration,
    pub log_truncation_threshold: u64,
    /// User ranges split once their MVCC bytes pass this.
    pub range_max_bytes: u64,
    /// ... or once they serve more requests per second than this (0: never).
    pub load_split_qps: u64,
    /// Neighbouring user ranges both smaller than this merge (0: never).
    pub range_min_bytes: u64,
    pub mode: Mode,
}

impl NodeConfig {
    pub fn new(store_dir: impl Into<PathBuf>) -> Self {
        NodeConfig {
            store_dir: store_dir.into(),
            listen_addr: ([127, 0, 0, 1], 2379).into(),
            advertise_addr: None,
            http_addr: ([127, 0, 0, 1], 8080).into(),
            tick: Duration::from_millis(100),
            election_ticks: 10,
            request_timeout: Duration::from_secs(5),
            max_clock_offset: Duration::from_millis(500),
            log_truncation_threshold: 10_000,
            range_max_bytes: 512 << 20,
            load_split_qps: 2500,
            range_min_bytes: 0,
            mode: Mode::SingleNode,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("store: {0}")]
    Store(#[from] kvserver::StoreError),
    #[error("cannot listen on {addr}: {err}")]
    Listen { addr: SocketAddr, err: std::io::Error },
}

/// What every service of the node shares.
pub struct Shared {
    pub cfg: NodeConfig,
    /// Where this node is reached by the others.
    pub advertise: String,
    pub local: Arc<OnceLock<Local>>,
    pub transport: Arc<GrpcTransport>,
    pub clock_check: Arc<ClockCheck>,
    store: Mutex<Option<Store>>,
    start_lock: tokio::sync::Mutex<()>,
    /// Set when the node must stop serving for good (e.g. a store of another cluster).
    pub fatal: Mutex<Option<String>>,
    channels: Mutex<HashMap<String, Channel>>,
    /// Streams to other nodes for the requests this gateway forwards.
    pub forwarder: forward::Forwarder,
    /// The DistSender's leaseholder and descriptor cache.
    pub ranges: dist_sender::RangeCache,
    /// What the native API's DistSender counts (range cache misses).
    pub kv_metrics: Arc<kv::dist_sender::DistMetrics>,
    /// The node's DistSender: the native API's, and the one its leaseholders
    /// push transactions and resolve intents through.
    pub dist: kv::DistSender<kv_api::NodeRangeSender>,
    /// `dist` as kvserver sees it (`EvalOptions::router`).
    pub txn_router: Arc<dyn kvserver::intent_resolver::TxnRouter>,
    /// The highest raft term this node put in an etcd header: no header it
    /// sends carries a lower one (clients such as Patroni refuse a term
    /// that goes down).
    max_term: std::sync::atomic::AtomicU64,
}

impl Shared {
    /// The store, if this node is part of a cluster yet and healthy.
    pub fn store(&self) -> Result<StoreHandle, Status> {
        if let Some(f) = self.fatal.lock().clone() {
            return Err(Status::unavailable(format!("etcdserver: unhealthy cluster ({f})")));
        }
        let l = self.local.get().ok_or_else(|| {
            Status::unavailable("etcdserver: the cluster is not initialized yet (run tardigrade init)")
        })?;
        let peers = l.store.known_stores().read().len().saturating_sub(1);
        if let Some(p) = self.clock_check.problem(peers) {
            return Err(Status::unavailable(format!("etcdserver: unhealthy cluster ({p})")));
        }
        Ok(l.store.clone())
    }

    /// The header of an etcd answer from this node (`raft_term` never below
    /// one it sent before).
    pub fn header(&self, store: &StoreHandle, revision: i64, raft_term: u64) -> ResponseHeader {
        let mut h = kvserver::evaluator::header(store, revision, raft_term);
        self.fix_term(&mut h);
        h
    }

    /// Raises `h.raft_term` to the highest this node has sent.
    pub fn fix_term(&self, h: &mut ResponseHeader) {
        let prev = self
            .max_term
            .fetch_max(h.raft_term, std::sync::atomic::Ordering::Relaxed);
        h.raft_term = h.raft_term.max(prev);
    }

    /// Why the node cannot serve, if it cannot.
    pub fn health_problem(&self) -> Option<String> {
        if let Some(f) = self.fatal.lock().clone() {
            return Some(f);
        }
        let Some(l) = self.local.get() else {
            return Some("the cluster is not initialized yet".into());
        };
        if let Some(why) = l.store.stopped() {
            return Some(why);
        }
        let peers = l.store.known_stores().read().len().saturating_sub(1);
        self.clock_check.problem(peers)
    }

    /// Starts the store (once), bootstrapping or joining as `plan` says.
    pub async fn start_store(&self, plan: Bootstrap) -> Result<StoreHandle, String> {
        let _g = self.start_lock.lock().await;
        if let Some(l) = self.local.get() {
            return Ok(l.store.clone());
        }
        let mut scfg = StoreConfig::new(&self.cfg.store_dir);
        scfg.tick = self.cfg.tick;
        scfg.election_ticks = self.cfg.election_ticks;
        scfg.log_truncation_threshold = self.cfg.log_truncation_threshold;
        if let Some(us) = env_u64("TARDIGRADE_RAFT_PIPELINE_MIN_SYNC_US") {
            scfg.pipeline_min_sync = Duration::from_micros(us);
        }
        if let Some(us) = env_u64("TARDIGRADE_TESTING_SYNC_DELAY_US") {
            tracing::warn!(delay_us = us, "testing knob: every synced raft write is slowed down");
            scfg.testing_sync_delay = Duration::from_micros(us);
        }
        let mut opts = StoreOptions {
            transport: self.transport.clone(),
            bootstrap: plan,
            ..Default::default()
        };
        if let Some(skew) = testing_clock_skew() {
            tracing::warn!(skew_ms = skew, "testing knob: this node's clock is skewed");
            opts.wall = Arc::new(SkewedClock(skew.saturating_mul(1_000_000)));
        }
        let store = tokio::task::spawn_blocking(move || Store::start_with(scfg, opts))
            .await
            .map_err(|e| format!("store start-up task failed: {e}"))?
            .map_err(|e| e.to_string())?;
        let handle = store.handle();
        handle
            .known_stores()
            .write()
            .insert(handle.ident().store_id, self.advertise.clone());
        *self.store.lock() = Some(store);
        let _ = self.local.set(Local {
            store: handle.clone(),
            addr: self.advertise.clone(),
        });
        tracing::info!(node = handle.ident().node_id, cluster = %handle.ident().cluster_id, "store started");
        Ok(handle)
    }

    /// A (cached) channel to another node.
    pub async fn channel(&self, addr: &str) -> Result<Channel, Status> {
        if let Some(c) = self.channels.lock().get(addr).cloned() {
            return Ok(c);
        }
        let c = transport::connect(addr)
            .await
            .map_err(|e| Status::unavailable(format!("cannot reach {addr}: {e}")))?;
        self.channels.lock().insert(addr.to_string(), c.clone());
        Ok(c)
    }

    /// Forgets a channel that failed.
    pub fn drop_channel(&self, addr: &str) {
        self.channels.lock().remove(addr);
    }
}

/// A number from the environment: `TARDIGRADE_RAFT_PIPELINE_MIN_SYNC_US=N`
/// (tuning: the raft loop hands its batches to its log writer while work
/// waits only once syncs take N microseconds on average; 0: always, as tests
/// do) and `TARDIGRADE_TESTING_SYNC_DELAY_US=N` (testing knob, off by
/// default: every synced raft write takes N microseconds longer).
fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok()?.parse().ok()
}

/// `TARDIGRADE_TESTING_CLOCK_SKEW_MS=N` (testing knob, off by default) runs
/// the node with its wall clock N ms off, to exercise the clock check.
fn testing_clock_skew() -> Option<i64> {
    std::env::var("TARDIGRADE_TESTING_CLOCK_SKEW_MS").ok()?.parse().ok()
}

/// The system clock, shifted.
struct SkewedClock(i64);

impl kvserver::hlc::WallClock for SkewedClock {
    fn now_nanos(&self) -> u64 {
        kvserver::hlc::SystemClock.now_nanos().saturating_add_signed(self.0)
    }
}

/// A running node.
/// How long `shutdown` lets open connections finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

pub struct Node {
    shared: Arc<Shared>,
    grpc_addr: SocketAddr,
    http_addr: SocketAddr,
    stop_grpc: Option<oneshot::Sender<()>>,
    stop_http: Option<oneshot::Sender<()>>,
    stop_gateway: Option<oneshot::Sender<()>>,
    /// The gRPC and HTTP servers: stopped gracefully, so that no connection
    /// still holds the store when `shutdown` returns.
    servers: Vec<JoinHandle<()>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Node {
    /// Starts the node; returns once it listens (it may still be electing,
    /// joining, or waiting for `init`).
    pub async fn start(cfg: NodeConfig) -> Result<Node, NodeError> {
        let listen = |addr: SocketAddr, err| NodeError::Listen { addr, err };
        let grpc_listener = tokio::net::TcpListener::bind(cfg.listen_addr)
            .await
            .map_err(|e| listen(cfg.listen_addr, e))?;
        let http_listener = tokio::net::TcpListener::bind(cfg.http_addr)
            .await
            .map_err(|e| listen(cfg.http_addr, e))?;
        let grpc_addr = grpc_listener.local_addr().map_err(|e| listen(cfg.listen_addr, e))?;
        let http_addr = http_listener.local_addr().map_err(|e| listen(cfg.http_addr, e))?;
        let advertise = cfg.advertise_addr.clone().unwrap_or_else(|| grpc_addr.to_string());
        let local = Arc::new(OnceLock::new());
        let transport = Arc::new(GrpcTransport::new(local.clone(), tokio::runtime::Handle::current()));
        let kv_metrics: Arc<kv::dist_sender::DistMetrics> = Default::default();
        let shared = Arc::new_cyclic(|me: &std::sync::Weak<Shared>| Shared {
            dist: kv::DistSender::with_metrics(kv_api::NodeRangeSender(me.clone()), kv_metrics.clone()),
            txn_router: Arc::new(kv_api::NodeTxnRouter(me.clone())),
            advertise,
            local,
            transport,
            clock_check: Arc::new(ClockCheck::new(cfg.max_clock_offset)),
            store: Mutex::new(None),
            start_lock: tokio::sync::Mutex::new(()),
            fatal: Mutex::new(None),
            channels: Mutex::new(HashMap::new()),
            forwarder: forward::Forwarder::default(),
            ranges: Default::default(),
            kv_metrics,
            cfg: cfg.clone(),
            max_term: Default::default(),
        });
        let mut tasks = Vec::new();
        match &cfg.mode {
            Mode::SingleNode => {
                shared
                    .start_store(Bootstrap::NewCluster {
                        addr: shared.advertise.clone(),
                    })
                    .await
                    .map_err(kvserver::StoreError::Io)?;
            }
            Mode::Cluster { join } => {
                // An existing store restarts at once; an empty one joins (or
                // waits for init) in the background.
                let engine_has_ident = {
                    let dir = cfg.store_dir.clone();
                    tokio::task::spawn_blocking(move || -> Result<bool, kvserver::StoreError> {
                        if !dir.join("db").exists() {
                            return Ok(false);
                        }
                        let e = storage::Engine::open(&dir, storage::EngineOptions::default())?;
                        Ok(kvserver::store::read_ident(&e)?.is_some())
                    })
                    .await
                    .map_err(|e| kvserver::StoreError::Io(e.to_string()))??
                };
                if engine_has_ident {
                    shared
                        .start_store(Bootstrap::Existing)
                        .await
                        .map_err(kvserver::StoreError::Io)?;
                }
                tasks.push(tokio::spawn(membership::maintain(shared.clone(), join.clone())));
            }
        }
        tasks.push(tokio::spawn(liveness::heartbeat_loop(shared.clone())));
        tasks.push(tokio::spawn(kv_api::publish_loop(shared.clone())));
        tasks.push(tokio::spawn(kv_api::split_loop(shared.clone())));
        {
            let me = shared.clone();
            tasks.push(tokio::spawn(kvserver::intent_resolver::sweep_loop(
                move || me.local.get().map(|l| l.store.clone()),
                shared.txn_router.clone(),
            )));
        }
        tasks.push(tokio::spawn(kv_api::merge_loop(shared.clone())));
        tasks.push(tokio::spawn(etcd_lease_api::expiry_loop(shared.clone())));
        let etcd = etcd_api::EtcdApi { shared: shared.clone() };
        let limit = 4 << 20;
        let grpc = tonic::transport::Server::builder()
            .add_service(KvServer::new(etcd.clone()).max_decoding_message_size(limit))
            .add_service(MaintenanceServer::new(etcd.clone()))
            .add_service(LeaseServer::new(etcd.clone()))
            .add_service(WatchServer::new(etcd.clone()).max_decoding_message_size(limit))
            .add_service(NativeKvServer::new(kv_api::KvApi::new(shared.clone())).max_decoding_message_size(limit))
            .add_service(ClusterServer::new(etcd.clone()))
            .add_service(
                InternalServer::new(internal_api::InternalApi { shared: shared.clone() })
                    .max_decoding_message_size(64 << 20),
            )
            .add_service(AdminServer::new(admin_api::AdminApi { shared: shared.clone() }))
            .add_service(MembershipServer::new(membership::MembershipApi {
                shared: shared.clone(),
            }))
            .add_service(
                RaftTransportServer::new(RaftService {
                    local: shared.local.clone(),
                    clock_check: shared.clock_check.clone(),
                })
                .max_decoding_message_size(64 << 20),
            );
        let (stop_grpc, grpc_stopped) = oneshot::channel::<()>();
        // gRPC and etcd's JSON gateway share the client port.
        let (incoming, http1, accept) = client_port::split(grpc_listener);
        tasks.push(tokio::spawn(accept));
        let mut servers = Vec::new();
        let (stop_gateway, gateway_stopped) = oneshot::channel::<()>();
        let gateway_app = gateway::router(etcd.clone());
        servers.push(tokio::spawn(async move {
            let served = axum::serve(http1, gateway_app).with_graceful_shutdown(async {
                let _ = gateway_stopped.await;
            });
            if let Err(e) = served.await {
                tracing::error!(error = %e, "JSON gateway stopped");
            }
        }));
        servers.push(tokio::spawn(async move {
            if let Err(e) = grpc
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = grpc_stopped.await;
                })
                .await
            {
                tracing::error!(error = %e, "gRPC server stopped");
            }
        }));
        let (stop_http, http_stopped) = oneshot::channel::<()>();
        let app = http::router(shared.clone());
        servers.push(tokio::spawn(async move {
            let served = axum::serve(http_listener, app).with_graceful_shutdown(async {
                let _ = http_stopped.await;
            });
            if let Err(e) = served.await {
                tracing::error!(error = %e, "HTTP server stopped");
            }
        }));
        tracing::info!(%grpc_addr, %http_addr, advertise = %shared.advertise, "node listening");
        Ok(Node {
            shared,
            grpc_addr,
            http_addr,
            stop_grpc: Some(stop_grpc),
            stop_http: Some(stop_http),
            stop_gateway: Some(stop_gateway),
            servers,
            tasks,
        })
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The store, once the node has one.
    pub fn store(&self) -> Option<StoreHandle> {
        self.shared.local.get().map(|l| l.store.clone())
    }

    /// Why the node cannot serve, if it cannot.
    pub fn health_problem(&self) -> Option<String> {
        self.shared.health_problem()
    }

    /// Stops serving, then stops the store.
    pub async fn shutdown(mut self) {
        if let Some(s) = self.stop_grpc.take() {
            let _ = s.send(());
        }
        if let Some(s) = self.stop_http.take() {
            let _ = s.send(());
        }
        if let Some(s) = self.stop_gateway.take() {
            let _ = s.send(());
        }
        for t in self.tasks.drain(..) {
            t.abort();
            let _ = t.await;
        }
        // Graceful: open connections are told to go away and finish; one that
        // lingers (a client holding a stream) is cut after a while.
        for mut t in self.servers.drain(..) {
            if tokio::time::timeout(SHUTDOWN_GRACE, &mut t).await.is_err() {
                t.abort();
                let _ = t.await;
            }
        }
        let store = self.shared.store.lock().take();
        if let Some(mut store) = store {
            let _ = tokio::task::spawn_blocking(move || store.stop()).await;
        }
    }
}
