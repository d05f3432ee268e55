//! etcd's v3 gRPC services on a node: `KV` (Range, Put, DeleteRange, Txn,
//! Compact), and enough of `Maintenance.Status` and `Cluster.MemberList` for
//! `etcdctl endpoint status` and `etcdctl member list`.
//!
//! Reads are served from the etcd range's leaseholder state at a revision;
//! writes are proposed to raft and answered once applied. Nothing here panics
//! on a request: every bad input is one of etcd's errors.

use std::time::{Duration, Instant};

use kvserver::etcd::{self, EtcdError, EtcdWriteResponse};
use kvserver::keyspace::ETCD_RANGE_ID;
use kvserver::{ApplyOutcome, StoreHandle};
use prost::Message as _;
use proto::etcdserverpb::{
    cluster_server::Cluster, kv_server::Kv, maintenance_server::Maintenance, CompactionRequest, CompactionResponse,
    DeleteRangeRequest, DeleteRangeResponse, Member, MemberListRequest, MemberListResponse, PutRequest, PutResponse,
    RangeRequest, RangeResponse, ResponseHeader, StatusRequest, StatusResponse, TxnRequest, TxnResponse,
};
use proto::kvserver::{raft_command, RaftCommand};
use tonic::{Request, Response, Status};

use crate::errors::{etcd_status, propose_status};

/// The version `Maintenance.Status` reports: the etcd API level served.
pub const API_VERSION: &str = "3.5.0";

/// What the etcd services share.
#[derive(Clone)]
pub struct EtcdApi {
    pub store: StoreHandle,
    pub cluster_id: u64,
    pub member_id: u64,
    pub name: String,
    pub client_url: String,
    /// How long a request may wait before it is answered `request timed out`.
    pub request_timeout: Duration,
}

impl EtcdApi {
    fn header(&self, revision: i64, raft_term: u64) -> ResponseHeader {
        ResponseHeader {
            cluster_id: self.cluster_id,
            member_id: self.member_id,
            revision,
            raft_term,
        }
    }

    fn observe(&self, method: &str, t0: Instant) {
        if let Some(h) = self.store.metrics().request_latency(method) {
            h.observe_duration(t0.elapsed());
        }
    }

    fn check_size(&self, len: usize) -> Result<(), Status> {
        if len > etcd::MAX_REQUEST_BYTES {
            return Err(etcd_status(&EtcdError::TooLarge));
        }
        Ok(())
    }

    async fn write(&self, op: raft_command::Op) -> Result<(EtcdWriteResponse, ResponseHeader), Status> {
        let cmd = RaftCommand {
            max_lease_index: 0,
            proposer_ts: None,
            op: Some(op),
        };
        match self.store.propose(ETCD_RANGE_ID, cmd, self.request_timeout).await {
            Ok(ApplyOutcome::Etcd { result, rev, term }) => match result {
                Ok(resp) => Ok((resp, self.header(rev, term))),
                Err(e) => Err(etcd_status(&e)),
            },
            Err(e) => Err(propose_status(&e)),
        }
    }
}

#[tonic::async_trait]
impl Kv for EtcdApi {
    async fn range(&self, req: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
        let t0 = Instant::now();
        let r = req.into_inner();
        etcd::validate_range(&r).map_err(|e| etcd_status(&e))?;
        let st = self
            .store
            .wait_readable(ETCD_RANGE_ID, self.request_timeout)
            .await
            .map_err(|e| propose_status(&e))?;
        let snap = self.store.engine().snapshot();
        // The lease must still hold now that the view is taken.
        if !self
            .store
            .status(ETCD_RANGE_ID)
            .is_some_and(|s| s.can_serve(Instant::now()))
        {
            return Err(propose_status(&kvserver::ProposeError::Ambiguous));
        }
        let rev = self
            .store
            .rev_state(&snap)
            .map_err(|e| Status::internal(e.to_string()))?;
        let mut resp = etcd::range(&snap, &rev, &r).map_err(|e| etcd_status(&e))?;
        resp.header = Some(self.header(rev.rev, st.term));
        self.observe("range", t0);
        Ok(Response::new(resp))
    }

    async fn put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let t0 = Instant::now();
        let r = req.into_inner();
        etcd::validate_put(&r).map_err(|e| etcd_status(&e))?;
        self.check_size(r.encoded_len())?;
        let (resp, header) = self.write(raft_command::Op::EtcdPut(r)).await?;
        self.observe("put", t0);
        match resp {
            EtcdWriteResponse::Put(mut p) => {
                p.header = Some(header);
                Ok(Response::new(p))
            }
            _ => Err(Status::internal("put answered with another response")),
        }
    }

    async fn delete_range(&self, req: Request<DeleteRangeRequest>) -> Result<Response<DeleteRangeResponse>, Status> {
        let t0 = Instant::now();
        let r = req.into_inner();
        etcd::validate_delete(&r).map_err(|e| etcd_status(&e))?;
        self.check_size(r.encoded_len())?;
        let (resp, header) = self.write(raft_command::Op::EtcdDeleteRange(r)).await?;
        self.observe("delete_range", t0);
        match resp {
            EtcdWriteResponse::DeleteRange(mut d) => {
                d.header = Some(header);
                Ok(Response::new(d))
            }
            _ => Err(Status::internal("delete answered with another response")),
        }
    }

    async fn txn(&self, req: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let t0 = Instant::now();
        let r = req.into_inner();
        etcd::validate_txn(&r).map_err(|e| etcd_status(&e))?;
        self.check_size(r.encoded_len())?;
        let (resp, header) = self.write(raft_command::Op::EtcdTxn(r)).await?;
        self.observe("txn", t0);
        match etcd::with_header(resp, header) {
            EtcdWriteResponse::Txn(t) => Ok(Response::new(t)),
            _ => Err(Status::internal("txn answered with another response")),
        }
    }

    async fn compact(&self, req: Request<CompactionRequest>) -> Result<Response<CompactionResponse>, Status> {
        let t0 = Instant::now();
        let r = req.into_inner();
        let (_, header) = self.write(raft_command::Op::EtcdCompact(r)).await?;
        self.observe("compact", t0);
        Ok(Response::new(CompactionResponse { header: Some(header) }))
    }
}

#[tonic::async_trait]
impl Maintenance for EtcdApi {
    async fn status(&self, _req: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let st = self
            .store
            .status(ETCD_RANGE_ID)
            .ok_or_else(|| Status::unavailable("etcdserver: no leader"))?;
        let snap = self.store.engine().snapshot();
        let rev = self
            .store
            .rev_state(&snap)
            .map_err(|e| Status::internal(e.to_string()))?;
        let size = self.store.engine().disk_usage_bytes().unwrap_or(0) as i64;
        let leader_member = if st.leader != 0 { self.member_id } else { 0 };
        Ok(Response::new(StatusResponse {
            header: Some(self.header(rev.rev, st.term)),
            version: API_VERSION.to_string(),
            db_size: size,
            leader: leader_member,
            raft_index: st.commit,
            raft_term: st.term,
            raft_applied_index: st.applied.index,
            errors: Vec::new(),
            db_size_in_use: size,
            is_learner: false,
        }))
    }
}

#[tonic::async_trait]
impl Cluster for EtcdApi {
    async fn member_list(&self, _req: Request<MemberListRequest>) -> Result<Response<MemberListResponse>, Status> {
        let st = self.store.status(ETCD_RANGE_ID);
        let rev = st.as_ref().map_or(0, |_| {
            let snap = self.store.engine().snapshot();
            self.store.rev_state(&snap).map(|r| r.rev).unwrap_or(0)
        });
        Ok(Response::new(MemberListResponse {
            header: Some(self.header(rev, st.map_or(0, |s| s.term))),
            members: vec![Member {
                id: self.member_id,
                name: self.name.clone(),
                peer_ur_ls: vec![self.client_url.clone()],
                client_ur_ls: vec![self.client_url.clone()],
                is_learner: false,
            }],
        }))
    }
}
