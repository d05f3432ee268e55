//! One Tardigrade node: it opens (or bootstraps) the store, then serves etcd's
//! v3 gRPC API and Tardigrade's admin API on the listen address, and health and
//! metrics over HTTP.
//!
//! This crate wires parts together; it holds no storage or consensus logic.

pub mod admin_api;
pub mod errors;
pub mod etcd_api;
pub mod http;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use kvserver::{Store, StoreConfig, StoreHandle};
use proto::admin::admin_server::AdminServer;
use proto::etcdserverpb::{cluster_server::ClusterServer, kv_server::KvServer, maintenance_server::MaintenanceServer};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Settings of a node.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub store_dir: PathBuf,
    pub listen_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub tick: Duration,
    pub election_ticks: u64,
    pub request_timeout: Duration,
}

impl NodeConfig {
    pub fn new(store_dir: impl Into<PathBuf>) -> Self {
        NodeConfig {
            store_dir: store_dir.into(),
            listen_addr: ([127, 0, 0, 1], 2379).into(),
            http_addr: ([127, 0, 0, 1], 8080).into(),
            tick: Duration::from_millis(100),
            election_ticks: 10,
            request_timeout: Duration::from_secs(5),
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

/// A running node.
pub struct Node {
    store: Store,
    grpc_addr: SocketAddr,
    http_addr: SocketAddr,
    stop_grpc: Option<oneshot::Sender<()>>,
    stop_http: Option<oneshot::Sender<()>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Node {
    /// Starts the node; returns once it listens (it may still be electing).
    pub async fn start(cfg: NodeConfig) -> Result<Node, NodeError> {
        let grpc_listener = tokio::net::TcpListener::bind(cfg.listen_addr)
            .await
            .map_err(|err| NodeError::Listen {
                addr: cfg.listen_addr,
                err,
            })?;
        let http_listener = tokio::net::TcpListener::bind(cfg.http_addr)
            .await
            .map_err(|err| NodeError::Listen {
                addr: cfg.http_addr,
                err,
            })?;
        let grpc_addr = grpc_listener.local_addr().map_err(|err| NodeError::Listen {
            addr: cfg.listen_addr,
            err,
        })?;
        let http_addr = http_listener.local_addr().map_err(|err| NodeError::Listen {
            addr: cfg.http_addr,
            err,
        })?;

        let mut scfg = StoreConfig::new(&cfg.store_dir);
        scfg.tick = cfg.tick;
        scfg.election_ticks = cfg.election_ticks;
        let store_dir = cfg.store_dir.clone();
        let store = tokio::task::spawn_blocking(move || Store::start(scfg))
            .await
            .map_err(|e| {
                kvserver::StoreError::Io(format!("store start-up task failed: {e} ({})", store_dir.display()))
            })??;
        let handle = store.handle();
        let ident = handle.ident().clone();
        let api = etcd_api::EtcdApi {
            store: handle.clone(),
            cluster_id: u64::from_str_radix(&ident.cluster_id, 16).unwrap_or(1),
            member_id: ident.node_id,
            name: format!("tardigrade-{}", ident.node_id),
            client_url: format!("http://{grpc_addr}"),
            request_timeout: cfg.request_timeout,
        };
        let limit = 4 << 20;
        let grpc = tonic::transport::Server::builder()
            .add_service(KvServer::new(api.clone()).max_decoding_message_size(limit))
            .add_service(MaintenanceServer::new(api.clone()))
            .add_service(ClusterServer::new(api.clone()))
            .add_service(AdminServer::new(admin_api::AdminApi { store: handle.clone() }));
        let (stop_grpc, grpc_stopped) = oneshot::channel::<()>();
        let incoming = tonic::transport::server::TcpIncoming::from(grpc_listener).with_nodelay(Some(true));
        let mut tasks = Vec::new();
        tasks.push(tokio::spawn(async move {
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
        let app = http::router(handle.clone());
        tasks.push(tokio::spawn(async move {
            let served = axum::serve(http_listener, app).with_graceful_shutdown(async {
                let _ = http_stopped.await;
            });
            if let Err(e) = served.await {
                tracing::error!(error = %e, "HTTP server stopped");
            }
        }));
        tracing::info!(%grpc_addr, %http_addr, cluster = %ident.cluster_id, "node started");
        Ok(Node {
            store,
            grpc_addr,
            http_addr,
            stop_grpc: Some(stop_grpc),
            stop_http: Some(stop_http),
            tasks,
        })
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    pub fn store(&self) -> StoreHandle {
        self.store.handle()
    }

    /// Stops serving, then stops the store.
    pub async fn shutdown(mut self) {
        if let Some(s) = self.stop_grpc.take() {
            let _ = s.send(());
        }
        if let Some(s) = self.stop_http.take() {
            let _ = s.send(());
        }
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
        let mut store = self.store;
        let _ = tokio::task::spawn_blocking(move || store.stop()).await;
    }
}
