//! etcd's v3 gRPC services on a node: `KV` (Range, Put, DeleteRange, Txn,
//! Compact), and enough of `Maintenance.Status` and `Cluster.MemberList` for
//! `etcdctl endpoint status` and `etcdctl member list`.
//!
//! Every KV request is validated here and sent by the DistSender to the etcd
//! range's leaseholder, which reads under its lease or proposes the write to
//! raft and answers once applied. Nothing here panics on a request: every bad
//! input is one of etcd's errors.

use std::sync::Arc;
use std::time::Instant;

use kvserver::etcd::{self, EtcdError};
use kvserver::keyspace::ETCD_RANGE_ID;
use kvserver::StoreHandle;
use prost::Message as _;
use proto::etcdserverpb::{
    cluster_server::Cluster, kv_server::Kv, maintenance_server::Maintenance, CompactionRequest, CompactionResponse,
    DeleteRangeRequest, DeleteRangeResponse, Member, MemberListRequest, MemberListResponse, PutRequest, PutResponse,
    RangeRequest, RangeResponse, ResponseHeader, StatusRequest, StatusResponse, TxnRequest, TxnResponse,
};
use proto::kvserver::{batch_request, batch_response, raft_command, RaftCommand};
use tonic::Code;
use tonic::{Request, Response, Status};

use crate::dist_sender::SendError;
use crate::errors::{etcd_status, propose_status};
use crate::Shared;

/// The version `Maintenance.Status` reports: the etcd API level served.
pub const API_VERSION: &str = "3.5.0";

/// `TARDIGRADE_UNSAFE_FOLLOWER_READS=1` lets followers serve reads (unsafe:
/// only to prove the linearizability checker catches stale reads).
pub fn unsafe_follower_reads() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("TARDIGRADE_UNSAFE_FOLLOWER_READS").is_ok_and(|v| v == "1"))
}

/// The etcd services of a node.
#[derive(Clone)]
pub struct EtcdApi {
    pub shared: Arc<Shared>,
}

/// etcd's answer to a request the DistSender could not get answered.
fn send_status(e: SendError) -> Status {
    match e {
        SendError::Ambiguous => propose_status(&kvserver::ProposeError::Ambiguous),
        SendError::NoLeaseholder { last, .. } => {
            tracing::debug!(%last, "no leaseholder answered");
            Status::unavailable("etcdserver: no leader")
        }
        SendError::Etcd(e) => Status::new(Code::from(e.code), e.message),
        SendError::NotReady(m) => Status::unavailable(m),
        // Native KV answers only; the etcd range never splits.
        SendError::KeyMismatch(_) | SendError::RangeNotFound => Status::unavailable("etcdserver: no leader"),
    }
}

impl EtcdApi {
    fn header(&self, store: &StoreHandle, revision: i64, raft_term: u64) -> ResponseHeader {
        self.shared.header(store, revision, raft_term)
    }

    fn observe(&self, method: &str, t0: Instant) {
        if let Some(l) = self.shared.local.get() {
            if let Some(h) = l.store.metrics().request_latency(method) {
                h.observe_duration(t0.elapsed());
            }
        }
    }

    fn check_size(&self, len: usize) -> Result<(), Status> {
        if len > etcd::MAX_REQUEST_BYTES {
            return Err(etcd_status(&EtcdError::TooLarge));
        }
        Ok(())
    }

    /// Sends to the etcd range's leaseholder (wherever it is) and times it.
    pub(crate) async fn send(
        &self,
        method: &str,
        request: batch_request::Request,
    ) -> Result<batch_response::Response, Status> {
        let t0 = Instant::now();
        let mut r = self.shared.send(ETCD_RANGE_ID, request).await.map_err(send_status);
        self.observe(method, t0);
        if let Ok(resp) = &mut r {
            self.fix_term(resp);
        }
        r
    }

    /// Keeps the raft term a client sees from going down (see `Shared::fix_term`).
    fn fix_term(&self, r: &mut batch_response::Response) {
        use batch_response::Response as R;
        let h = match r {
            R::EtcdRange(x) => &mut x.header,
            R::EtcdPut(x) => &mut x.header,
            R::EtcdDeleteRange(x) => &mut x.header,
            R::EtcdTxn(x) => &mut x.header,
            R::EtcdCompact(x) => &mut x.header,
            R::EtcdLeaseGrant(x) => &mut x.header,
            R::EtcdLeaseRevoke(x) => &mut x.header,
            R::EtcdLeaseKeepAlive(x) => &mut x.header,
            R::EtcdLeaseTimeToLive(x) => &mut x.header,
            R::EtcdLeaseLeases(x) => &mut x.header,
            _ => return,
        };
        if let Some(h) = h {
            self.shared.fix_term(h);
        }
    }

    pub(crate) async fn write(&self, method: &str, op: raft_command::Op) -> Result<batch_response::Response, Status> {
        let cmd = RaftCommand {
            proposer_term: 0,
            max_lease_index: 0,
            proposer_ts: None,
            op: Some(op),
        };
        self.send(method, batch_request::Request::Write(cmd)).await
    }
}

pub(crate) fn unexpected(r: batch_response::Response) -> Status {
    Status::internal(format!("unexpected answer {r:?}"))
}

#[tonic::async_trait]
impl Kv for EtcdApi {
    async fn range(&self, req: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
        let r = req.into_inner();
        etcd::validate_range(&r).map_err(|e| etcd_status(&e))?;
        match self.send("range", batch_request::Request::EtcdRange(r)).await? {
            batch_response::Response::EtcdRange(resp) => Ok(Response::new(resp)),
            other => Err(unexpected(other)),
        }
    }

    async fn put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let r = req.into_inner();
        etcd::validate_put(&r).map_err(|e| etcd_status(&e))?;
        self.check_size(r.encoded_len())?;
        match self.write("put", raft_command::Op::EtcdPut(r)).await? {
            batch_response::Response::EtcdPut(resp) => Ok(Response::new(resp)),
            other => Err(unexpected(other)),
        }
    }

    async fn delete_range(&self, req: Request<DeleteRangeRequest>) -> Result<Response<DeleteRangeResponse>, Status> {
        let r = req.into_inner();
        etcd::validate_delete(&r).map_err(|e| etcd_status(&e))?;
        self.check_size(r.encoded_len())?;
        match self.write("delete_range", raft_command::Op::EtcdDeleteRange(r)).await? {
            batch_response::Response::EtcdDeleteRange(resp) => Ok(Response::new(resp)),
            other => Err(unexpected(other)),
        }
    }

    async fn txn(&self, req: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let r = req.into_inner();
        etcd::validate_txn(&r).map_err(|e| etcd_status(&e))?;
        self.check_size(r.encoded_len())?;
        match self.write("txn", raft_command::Op::EtcdTxn(r)).await? {
            batch_response::Response::EtcdTxn(resp) => Ok(Response::new(resp)),
            other => Err(unexpected(other)),
        }
    }

    async fn compact(&self, req: Request<CompactionRequest>) -> Result<Response<CompactionResponse>, Status> {
        let r = req.into_inner();
        match self.write("compact", raft_command::Op::EtcdCompact(r)).await? {
            batch_response::Response::EtcdCompact(resp) => Ok(Response::new(resp)),
            other => Err(unexpected(other)),
        }
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
        // etcd's cluster answers carry no revision.
        let mut header = self.header(&store, 0, st.map_or(0, |s| s.term));
        header.revision = 0;
        Ok(Response::new(MemberListResponse {
            header: Some(header),
            members,
        }))
    }
}
