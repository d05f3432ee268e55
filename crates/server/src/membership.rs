//! Cluster membership: `Init` bootstraps a new cluster on one node, `Join`
//! gives a new node an id (allocated through the system range, so two joins
//! never get the same one), and `Nodes` exchanges address books and refuses a
//! node of another cluster.
//!
//! `maintain` runs on every cluster node: an empty node keeps asking the
//! `--join` addresses for an identity until the cluster exists; every node
//! keeps exchanging address books with them and with the nodes it knows.

use std::sync::Arc;
use std::time::Duration;

use kvserver::keyspace::SYSTEM_RANGE_ID;
use kvserver::Bootstrap;
use proto::cluster::membership_client::MembershipClient;
use proto::cluster::membership_server::Membership;
use proto::cluster::{InitRequest, InitResponse, JoinRequest, JoinResponse, NodeInfo, NodesRequest, NodesResponse};
use proto::kvserver::{batch_request, batch_response, raft_command, AllocateNode, RaftCommand, StoreIdent};
use tonic::{Request, Response, Status};

use crate::Shared;

/// How long a membership call to another node may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Clone)]
pub struct MembershipApi {
    pub shared: Arc<Shared>,
}

fn book(shared: &Shared) -> Vec<NodeInfo> {
    let Some(l) = shared.local.get() else { return Vec::new() };
    l.store
        .known_stores()
        .read()
        .iter()
        .filter(|(_, a)| !a.is_empty())
        .map(|(&s, a)| NodeInfo {
            node_id: s,
            store_id: s,
            addr: a.clone(),
        })
        .collect()
}

fn merge(shared: &Shared, nodes: &[NodeInfo]) {
    let Some(l) = shared.local.get() else { return };
    let me = l.store.ident().store_id;
    let mut b = l.store.known_stores().write();
    for n in nodes {
        if n.store_id != 0 && n.store_id != me && !n.addr.is_empty() {
            b.insert(n.store_id, n.addr.clone());
        }
    }
}

#[tonic::async_trait]
impl Membership for MembershipApi {
    async fn init(&self, _req: Request<InitRequest>) -> Result<Response<InitResponse>, Status> {
        if self.shared.local.get().is_some() {
            return Err(Status::already_exists("the cluster is already initialized"));
        }
        let join = match &self.shared.cfg.mode {
            crate::Mode::SingleNode => {
                return Err(Status::failed_precondition("a single node initializes itself"));
            }
            crate::Mode::Cluster { join } => join.clone(),
        };
        // A node still waiting to join must not found a second cluster
        // beside one its --join addresses already serve (init run on the
        // wrong node): it joins that one instead.
        if let Some((addr, cluster)) = initialized_peer(&self.shared, &join).await {
            return Err(Status::already_exists(format!(
                "the cluster is already initialized: {addr} serves cluster {cluster}, which this node joins"
            )));
        }
        let h = self
            .shared
            .start_store(Bootstrap::NewCluster {
                addr: self.shared.advertise.clone(),
            })
            .await
            .map_err(Status::internal)?;
        if h.ident().node_id != 1 {
            return Err(Status::already_exists("the cluster is already initialized"));
        }
        Ok(Response::new(InitResponse {
            cluster_id: h.ident().cluster_id.clone(),
        }))
    }

    async fn join(&self, req: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        let r = req.into_inner();
        if r.addr.is_empty() {
            return Err(Status::invalid_argument("a joining node must say where it serves"));
        }
        let store = self.shared.store()?;
        let cmd = RaftCommand {
            proposer_term: 0,
            max_lease_index: 0,
            proposer_ts: None,
            op: Some(raft_command::Op::AllocateNode(AllocateNode { addr: r.addr.clone() })),
        };
        // Node ids come from the system range, wherever its leaseholder is.
        let id = match self
            .shared
            .send(SYSTEM_RANGE_ID, batch_request::Request::Write(cmd))
            .await
        {
            Ok(batch_response::Response::NodeId(id)) => id,
            Ok(other) => return Err(Status::internal(format!("unexpected answer {other:?}"))),
            Err(e) => return Err(Status::unavailable(format!("cannot allocate a node id: {e}"))),
        };
        store.known_stores().write().insert(id, r.addr.clone());
        tracing::info!(node = id, addr = %r.addr, "a node joined");
        Ok(Response::new(JoinResponse {
            cluster_id: store.ident().cluster_id.clone(),
            node_id: id,
            store_id: id,
            nodes: book(&self.shared),
        }))
    }

    async fn nodes(&self, req: Request<NodesRequest>) -> Result<Response<NodesResponse>, Status> {
        let r = req.into_inner();
        let Some(l) = self.shared.local.get() else {
            return Err(Status::failed_precondition("the cluster is not initialized yet"));
        };
        let ours = l.store.ident().cluster_id.clone();
        if !r.cluster_id.is_empty() && r.cluster_id != ours {
            return Err(Status::failed_precondition(format!(
                "this node belongs to cluster {ours}, not {}",
                r.cluster_id
            )));
        }
        if let Some(me) = r.me {
            merge(&self.shared, &[me]);
        }
        Ok(Response::new(NodesResponse {
            cluster_id: ours,
            nodes: book(&self.shared),
        }))
    }
}

/// The first of the `join` addresses (other than this node) that answers as
/// a member of an initialized cluster, with that cluster's id.
async fn initialized_peer(shared: &Shared, join: &[String]) -> Option<(String, String)> {
    for addr in join.iter().filter(|a| **a != shared.advertise) {
        let Ok(ch) = shared.channel(addr).await else { continue };
        let mut client = MembershipClient::new(ch);
        if let Ok(Ok(r)) = tokio::time::timeout(CALL_TIMEOUT, client.nodes(NodesRequest::default())).await {
            let cluster = r.into_inner().cluster_id;
            if !cluster.is_empty() {
                return Some((addr.clone(), cluster));
            }
        }
    }
    None
}

/// Joins (if the store is empty) and keeps the address book fresh.
pub async fn maintain(shared: Arc<Shared>, join: Vec<String>) {
    let mut warned = false;
    loop {
        if shared.local.get().is_none() {
            for addr in &join {
                if *addr == shared.advertise {
                    continue;
                }
                let Ok(ch) = shared.channel(addr).await else { continue };
                let mut client = MembershipClient::new(ch);
                let call = client.join(JoinRequest {
                    addr: shared.advertise.clone(),
                });
                // The receiver allocates through the system range within its
                // request timeout; a silent receiver is given up on after it.
                let wait = shared.cfg.request_timeout + CALL_TIMEOUT;
                match tokio::time::timeout(wait, call)
                    .await
                    .unwrap_or_else(|_| Err(Status::deadline_exceeded(format!("{addr} did not answer"))))
                {
                    Ok(resp) => {
                        let r = resp.into_inner();
                        let ident = StoreIdent {
                            cluster_id: r.cluster_id.clone(),
                            node_id: r.node_id,
                            store_id: r.store_id,
                        };
                        match shared.start_store(Bootstrap::Join(ident)).await {
                            Ok(_) => merge(&shared, &r.nodes),
                            Err(e) => tracing::error!(error = %e, "cannot start the store after joining"),
                        }
                        break;
                    }
                    Err(s) => {
                        shared.drop_channel(addr);
                        if !warned {
                            tracing::info!(%addr, reason = %s.message(), "waiting to join (is the cluster initialized? run `tardigrade init`)");
                            warned = true;
                        }
                    }
                }
            }
        } else {
            exchange(&shared, &join).await;
        }
        tokio::time::sleep(Duration::from_millis(if shared.local.get().is_some() {
            2000
        } else {
            300
        }))
        .await;
    }
}

/// Swaps address books with the join addresses and every known node.
async fn exchange(shared: &Shared, join: &[String]) {
    let Some(l) = shared.local.get() else { return };
    let ident = l.store.ident().clone();
    let mut targets: Vec<String> = join.to_vec();
    targets.extend(book(shared).into_iter().map(|n| n.addr));
    targets.sort();
    targets.dedup();
    // Peers that say they belong to another cluster. Who is wrong cannot be
    // told from one answer: this node gives up only when most of its --join
    // peers say so (it is the stray one); otherwise it says so and serves on.
    let peers = join.iter().filter(|a| **a != shared.advertise).count();
    let mut strangers = Vec::new();
    for addr in targets {
        if addr == shared.advertise {
            continue;
        }
        let Ok(ch) = shared.channel(&addr).await else { continue };
        let req = NodesRequest {
            cluster_id: ident.cluster_id.clone(),
            me: Some(NodeInfo {
                node_id: ident.node_id,
                store_id: ident.store_id,
                addr: shared.advertise.clone(),
            }),
        };
        let answer = tokio::time::timeout(CALL_TIMEOUT, MembershipClient::new(ch).nodes(req))
            .await
            .unwrap_or_else(|_| Err(Status::deadline_exceeded(format!("{addr} did not answer"))));
        match answer {
            Ok(r) => merge(shared, &r.into_inner().nodes),
            Err(s) if s.code() == tonic::Code::FailedPrecondition && s.message().contains("belongs to cluster") => {
                let msg = format!(
                    "this node's store belongs to another cluster than {addr}: {}",
                    s.message()
                );
                tracing::error!("{msg}");
                if join.contains(&addr) {
                    strangers.push(msg);
                }
            }
            Err(_) => shared.drop_channel(&addr),
        }
    }
    if strangers.len() * 2 > peers {
        *shared.fatal.lock() = strangers.pop();
    }
}
