//! etcd's v3 gRPC services on a node: `KV` (Range, Put, DeleteRange, Txn,
//! Compact), and enough of `Maintenance.Status` and `Cluster.MemberList` for
//! `etcdctl endpoint status` and `etcdctl member list`.
//!
//! Reads are served from the etcd range's leaseholder state at a revision;
//! writes are proposed to raft and answered once applied. Nothing here panics
//! on a request: every bad input is one of etcd's errors.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvserver::etcd::{self, EtcdError, EtcdWriteResponse};
use kvserver::keyspace::ETCD_RANGE_ID;
use kvserver::{ApplyOutcome, StoreHandle};
use prost::Message as _;
use proto::etcdserverpb::kv_client::KvClient;
use proto::etcdserverpb::{
    cluster_server::Cluster, kv_server::Kv, maintenance_server::Maintenance, CompactionRequest, CompactionResponse,
    DeleteRangeRequest, DeleteRangeResponse, Member, MemberListRequest, MemberListResponse, PutRequest, PutResponse,
    RangeRequest, RangeResponse, ResponseHeader, StatusRequest, StatusResponse, TxnRequest, TxnResponse,
};
use proto::kvserver::{raft_command, RaftCommand};
use tonic::transport::Channel;
use tonic::Code;
use tonic::{Request, Response, Status};

use crate::errors::{etcd_status, propose_status};
use crate::Shared;

/// The version `Maintenance.Status` reports: the etcd API level served.
pub const API_VERSION: &str = "3.5.0";

/// How long a forwarded read waits for the leaseholder before looking again.
const FORWARD_READ_WAIT: Duration = Duration::from_millis(300);

/// Metadata key marking a request forwarded by another node (never forwarded again).
pub const FORWARDED: &str = "x-tardigrade-forwarded";

/// The address of the node holding the leader replica of `range_id`, as this
/// store knows it (`None` if unknown or local).
pub fn leader_addr(store: &StoreHandle, range_id: u64) -> Option<String> {
    let st = store.status(range_id)?;
    if st.leader == 0 {
        return None;
    }
    let rep = st.desc.replicas.iter().find(|r| r.replica_id == st.leader)?;
    if rep.store_id == store.ident().store_id {
        return None;
    }
    store
        .known_stores()
        .read()
        .get(&rep.store_id)
        .filter(|a| !a.is_empty())
        .cloned()
}

/// `TARDIGRADE_UNSAFE_FOLLOWER_READS=1` lets followers serve reads (unsafe:
/// only to prove the linearizability checker catches stale reads).
fn unsafe_follower_reads() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("TARDIGRADE_UNSAFE_FOLLOWER_READS").is_ok_and(|v| v == "1"))
}

/// Where a request for a range goes now.
enum Route {
    Here,
    /// To the node at this address, which holds the leader replica (this
    /// replica id) in this term as far as this node knows.
    There {
        addr: String,
        leader: u64,
        term: u64,
    },
    Wait,
}

/// The etcd services of a node.
#[derive(Clone)]
pub struct EtcdApi {
    pub shared: Arc<Shared>,
}

/// Whether a failed forward certainly did not apply (safe to try again).
fn definite(s: &Status) -> bool {
    s.code() == Code::Unavailable
        && (s.message().contains("no leader")
            || s.message().contains("leader changed")
            || s.message().contains("not initialized")
            || s.message().starts_with("cannot reach"))
}

impl EtcdApi {
    fn header(&self, store: &StoreHandle, revision: i64, raft_term: u64) -> ResponseHeader {
        let ident = store.ident();
        ResponseHeader {
            cluster_id: u64::from_str_radix(&ident.cluster_id, 16).unwrap_or(1),
            member_id: ident.node_id,
            revision,
            raft_term,
        }
    }

    fn timeout(&self) -> Duration {
        self.shared.cfg.request_timeout
    }

    fn observe(&self, store: &StoreHandle, method: &str, t0: Instant) {
        if let Some(h) = store.metrics().request_latency(method) {
            h.observe_duration(t0.elapsed());
        }
    }

    fn check_size(&self, len: usize) -> Result<(), Status> {
        if len > etcd::MAX_REQUEST_BYTES {
            return Err(etcd_status(&EtcdError::TooLarge));
        }
        Ok(())
    }

    /// Reads are served here only with a valid lease; writes wherever the
    /// leader is.
    fn route(&self, store: &StoreHandle, read: bool) -> Route {
        let Some(st) = store.status(ETCD_RANGE_ID) else {
            return Route::Wait;
        };
        let here = if read {
            // Testing knob, off by default: any replica answers reads from its
            // own state (stale reads; the register workload must catch it).
            st.can_serve(Instant::now()) || (unsafe_follower_reads() && st.applied.index > 1)
        } else {
            st.leader != 0
                && st
                    .desc
                    .replicas
                    .iter()
                    .any(|r| r.replica_id == st.leader && r.store_id == store.ident().store_id)
        };
        if here {
            return Route::Here;
        }
        match leader_addr(store, ETCD_RANGE_ID) {
            Some(addr) => Route::There {
                addr,
                leader: st.leader,
                term: st.term,
            },
            None => Route::Wait,
        }
    }

    async fn client(&self, addr: &str) -> Result<KvClient<Channel>, Status> {
        let ch = self.shared.channel(addr).await?;
        Ok(KvClient::new(ch)
            .max_decoding_message_size(8 << 20)
            .max_encoding_message_size(8 << 20))
    }

    async fn read_local(&self, store: &StoreHandle, r: &RangeRequest) -> Result<RangeResponse, Status> {
        let unsafe_reads = unsafe_follower_reads();
        let st = if unsafe_reads {
            store
                .status(ETCD_RANGE_ID)
                .ok_or_else(|| propose_status(&kvserver::ProposeError::NotLeader { leader: 0 }))?
        } else {
            store
                .wait_readable(ETCD_RANGE_ID, Duration::from_millis(1))
                .await
                .map_err(|e| propose_status(&e))?
        };
        let snap = store.engine().snapshot();
        // The lease must still hold now that the view is taken.
        if !unsafe_reads && !store.status(ETCD_RANGE_ID).is_some_and(|s| s.can_serve(Instant::now())) {
            return Err(propose_status(&kvserver::ProposeError::NotLeader { leader: 0 }));
        }
        let rev = store.rev_state(&snap).map_err(|e| Status::internal(e.to_string()))?;
        let mut resp = etcd::range(&snap, &rev, r).map_err(|e| etcd_status(&e))?;
        resp.header = Some(self.header(store, rev.rev, st.term));
        Ok(resp)
    }

    async fn write_local(
        &self,
        store: &StoreHandle,
        op: raft_command::Op,
    ) -> Result<(EtcdWriteResponse, ResponseHeader), Status> {
        let cmd = RaftCommand {
            max_lease_index: 0,
            proposer_ts: None,
            op: Some(op),
        };
        match store.propose(ETCD_RANGE_ID, cmd, self.timeout()).await {
            Ok(ApplyOutcome::Etcd { result, rev, term }) => match result {
                Ok(resp) => Ok((resp, self.header(store, rev, term))),
                Err(e) => Err(etcd_status(&e)),
            },
            Ok(other) => Err(Status::internal(format!("unexpected outcome {other:?}"))),
            Err(e) => Err(propose_status(&e)),
        }
    }

    /// Serves a request here or at the leaseholder, retrying while the
    /// leadership is unknown or moving, until the request timeout.
    async fn serve<T, L, F, LF, FF>(&self, forwarded: bool, read: bool, local: L, forward: F) -> Result<T, Status>
    where
        L: Fn(StoreHandle) -> LF,
        LF: std::future::Future<Output = Result<T, Status>>,
        F: Fn(KvClient<Channel>) -> FF,
        FF: std::future::Future<Output = Result<T, Status>>,
    {
        let deadline = Instant::now() + self.timeout();
        loop {
            let store = self.shared.store()?;
            let outcome = match self.route(&store, read) {
                Route::Here => local(store).await,
                Route::There { addr, leader, term } if !forwarded => match self.client(&addr).await {
                    Ok(c) => {
                        let r = if read {
                            // A read may be retried elsewhere: don't wait long on
                            // a leaseholder that stopped answering (it may be paused).
                            let left = deadline.saturating_duration_since(Instant::now());
                            match tokio::time::timeout(left.min(FORWARD_READ_WAIT), forward(c)).await {
                                Ok(r) => r,
                                Err(_) => Err(Status::unavailable(format!("cannot reach {addr}: no answer"))),
                            }
                        } else {
                            // A write may not be retried, but once another replica
                            // leads in a later term the caller need not wait on a
                            // deposed (perhaps paused) leader: its outcome is unknown.
                            tokio::select! {
                                r = forward(c) => r,
                                () = leader_moved(&store, leader, term) => {
                                    Err(propose_status(&kvserver::ProposeError::Ambiguous))
                                }
                            }
                        };
                        if r.as_ref()
                            .err()
                            .is_some_and(|s| s.code() == Code::Unavailable && s.message().contains("transport"))
                        {
                            self.shared.drop_channel(&addr);
                        }
                        r
                    }
                    Err(e) => Err(e),
                },
                Route::There { .. } => Err(propose_status(&kvserver::ProposeError::NotLeader { leader: 1 })),
                Route::Wait => Err(propose_status(&kvserver::ProposeError::NotLeader { leader: 0 })),
            };
            match outcome {
                Err(s) if (read || definite(&s)) && !forwarded && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(s)
                    if !read
                        && !definite(&s)
                        && s.code() == Code::Unavailable
                        && !s.message().starts_with("etcdserver:") =>
                {
                    // The forward broke after it may have been sent: unknown outcome.
                    return Err(propose_status(&kvserver::ProposeError::Ambiguous));
                }
                other => return other,
            }
        }
    }
}

/// Resolves once the range has a leader other than `leader`, in a term after
/// `term` (a leader deposed while a write was forwarded to it).
async fn leader_moved(store: &StoreHandle, leader: u64, term: u64) {
    loop {
        if store
            .status(ETCD_RANGE_ID)
            .is_some_and(|st| st.term > term && st.leader != 0 && st.leader != leader)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn forwarded<T>(r: &Request<T>) -> bool {
    r.metadata().get(FORWARDED).is_some()
}

fn mark<T>(t: T) -> Request<T> {
    let mut r = Request::new(t);
    r.metadata_mut().insert(FORWARDED, "1".parse().expect("ascii"));
    r
}

#[tonic::async_trait]
impl Kv for EtcdApi {
    async fn range(&self, req: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
        let t0 = Instant::now();
        let fwd = forwarded(&req);
        let r = req.into_inner();
        etcd::validate_range(&r).map_err(|e| etcd_status(&e))?;
        let resp = self
            .serve(
                fwd,
                true,
                |store| {
                    let r = r.clone();
                    async move {
                        let out = self.read_local(&store, &r).await;
                        self.observe(&store, "range", t0);
                        out
                    }
                },
                |mut c| {
                    let r = r.clone();
                    async move { c.range(mark(r)).await.map(|x| x.into_inner()) }
                },
            )
            .await?;
        Ok(Response::new(resp))
    }

    async fn put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let t0 = Instant::now();
        let fwd = forwarded(&req);
        let r = req.into_inner();
        etcd::validate_put(&r).map_err(|e| etcd_status(&e))?;
        self.check_size(r.encoded_len())?;
        let resp = self
            .serve(
                fwd,
                false,
                |store| {
                    let r = r.clone();
                    async move {
                        let (resp, header) = self.write_local(&store, raft_command::Op::EtcdPut(r)).await?;
                        self.observe(&store, "put", t0);
                        match resp {
                            EtcdWriteResponse::Put(mut p) => {
                                p.header = Some(header);
                                Ok(p)
                            }
                            _ => Err(Status::internal("put answered with another response")),
                        }
                    }
                },
                |mut c| {
                    let r = r.clone();
                    async move { c.put(mark(r)).await.map(|x| x.into_inner()) }
                },
            )
            .await?;
        Ok(Response::new(resp))
    }

    async fn delete_range(&self, req: Request<DeleteRangeRequest>) -> Result<Response<DeleteRangeResponse>, Status> {
        let t0 = Instant::now();
        let fwd = forwarded(&req);
        let r = req.into_inner();
        etcd::validate_delete(&r).map_err(|e| etcd_status(&e))?;
        self.check_size(r.encoded_len())?;
        let resp = self
            .serve(
                fwd,
                false,
                |store| {
                    let r = r.clone();
                    async move {
                        let (resp, header) = self.write_local(&store, raft_command::Op::EtcdDeleteRange(r)).await?;
                        self.observe(&store, "delete_range", t0);
                        match resp {
                            EtcdWriteResponse::DeleteRange(mut d) => {
                                d.header = Some(header);
                                Ok(d)
                            }
                            _ => Err(Status::internal("delete answered with another response")),
                        }
                    }
                },
                |mut c| {
                    let r = r.clone();
                    async move { c.delete_range(mark(r)).await.map(|x| x.into_inner()) }
                },
            )
            .await?;
        Ok(Response::new(resp))
    }

    async fn txn(&self, req: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let t0 = Instant::now();
        let fwd = forwarded(&req);
        let r = req.into_inner();
        etcd::validate_txn(&r).map_err(|e| etcd_status(&e))?;
        self.check_size(r.encoded_len())?;
        let resp = self
            .serve(
                fwd,
                false,
                |store| {
                    let r = r.clone();
                    async move {
                        let (resp, header) = self.write_local(&store, raft_command::Op::EtcdTxn(r)).await?;
                        self.observe(&store, "txn", t0);
                        match etcd::with_header(resp, header) {
                            EtcdWriteResponse::Txn(t) => Ok(t),
                            _ => Err(Status::internal("txn answered with another response")),
                        }
                    }
                },
                |mut c| {
                    let r = r.clone();
                    async move { c.txn(mark(r)).await.map(|x| x.into_inner()) }
                },
            )
            .await?;
        Ok(Response::new(resp))
    }

    async fn compact(&self, req: Request<CompactionRequest>) -> Result<Response<CompactionResponse>, Status> {
        let t0 = Instant::now();
        let fwd = forwarded(&req);
        let r = req.into_inner();
        let resp = self
            .serve(
                fwd,
                false,
                |store| async move {
                    let (_, header) = self.write_local(&store, raft_command::Op::EtcdCompact(r)).await?;
                    self.observe(&store, "compact", t0);
                    Ok(CompactionResponse { header: Some(header) })
                },
                |mut c| async move { c.compact(mark(r)).await.map(|x| x.into_inner()) },
            )
            .await?;
        Ok(Response::new(resp))
    }
}

#[tonic::async_trait]
impl Maintenance for EtcdApi {
    async fn status(&self, _req: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let store = self.shared.store()?;
        let st = store
            .status(ETCD_RANGE_ID)
            .ok_or_else(|| Status::unavailable("etcdserver: no leader"))?;
        let snap = store.engine().snapshot();
        let rev = store.rev_state(&snap).map_err(|e| Status::internal(e.to_string()))?;
        let size = store.engine().disk_usage_bytes().unwrap_or(0) as i64;
        let leader_node = st
            .desc
            .replicas
            .iter()
            .find(|r| r.replica_id == st.leader)
            .map_or(0, |r| r.node_id);
        Ok(Response::new(StatusResponse {
            header: Some(self.header(&store, rev.rev, st.term)),
            version: API_VERSION.to_string(),
            db_size: size,
            leader: leader_node,
            raft_index: st.commit,
            raft_term: st.term,
            raft_applied_index: st.applied.index,
            errors: self.shared.health_problem().into_iter().collect(),
            db_size_in_use: size,
            is_learner: false,
        }))
    }
}

#[tonic::async_trait]
impl Cluster for EtcdApi {
    async fn member_list(&self, _req: Request<MemberListRequest>) -> Result<Response<MemberListResponse>, Status> {
        let store = self.shared.store()?;
        let st = store.status(ETCD_RANGE_ID);
        let snap = store.engine().snapshot();
        let rev = store.rev_state(&snap).map(|r| r.rev).unwrap_or(0);
        let members = store
            .known_stores()
            .read()
            .iter()
            .map(|(&id, addr)| {
                let addr = if addr.is_empty() {
                    self.shared.advertise.clone()
                } else {
                    addr.clone()
                };
                Member {
                    id,
                    name: format!("tardigrade-{id}"),
                    peer_ur_ls: vec![format!("http://{addr}")],
                    client_ur_ls: vec![format!("http://{addr}")],
                    is_learner: false,
                }
            })
            .collect();
        Ok(Response::new(MemberListResponse {
            header: Some(self.header(&store, rev, st.map_or(0, |s| s.term))),
            members,
        }))
    }
}
