//! etcd's `Lease` service: grant, revoke, keep-alive (a stream), time to
//! live and the list of leases, and the loop that expires leases.
//!
//! A grant or revoke is a raft command on the etcd range; a keep-alive and
//! the time left are answered by the range's leaseholder from its lease
//! clock (`kvserver::etcd_lease::Lessor`), without a raft write. Only the
//! leaseholder expires leases: its expiry loop revokes each expired lease
//! through raft, so its keys go in one revision on every replica. Nothing
//! here panics on a request.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use kvserver::keyspace::ETCD_RANGE_ID;
use proto::etcdserverpb::{
    lease_server::Lease, LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveRequest, LeaseKeepAliveResponse,
    LeaseLeasesRequest, LeaseLeasesResponse, LeaseRevokeRequest, LeaseRevokeResponse, LeaseTimeToLiveRequest,
    LeaseTimeToLiveResponse,
};
use proto::kvserver::{batch_request, batch_response, raft_command, BatchRequest};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::etcd_api::{unexpected, EtcdApi};
use crate::Shared;

/// How often the leaseholder looks for expired leases.
const EXPIRY_INTERVAL: Duration = Duration::from_millis(250);

type KeepAliveStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<LeaseKeepAliveResponse, Status>> + Send>>;

/// A lease id nobody asked for: positive, never 0, unlikely to collide
/// (node id in the high bits, the HLC below).
fn new_lease_id(shared: &Shared) -> i64 {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let (node, wall) = match shared.local.get() {
        Some(l) => (
            l.store.ident().node_id,
            l.store.clock().now().map(|t| t.wall).unwrap_or(0),
        ),
        None => (0, 0),
    };
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mixed = (wall ^ seq.rotate_left(32)).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 16;
    let id = ((node & 0x7FFF) << 48 | mixed) & (i64::MAX as u64);
    (id as i64).max(1)
}

impl EtcdApi {
    /// One keep-alive, answered by the leaseholder.
    pub async fn keep_alive_once(&self, id: i64) -> Result<LeaseKeepAliveResponse, Status> {
        let req = batch_request::Request::EtcdLeaseKeepAlive(LeaseKeepAliveRequest { id });
        match self.send("lease_keep_alive", req).await? {
            batch_response::Response::EtcdLeaseKeepAlive(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }
}

#[tonic::async_trait]
impl Lease for EtcdApi {
    async fn lease_grant(&self, req: Request<LeaseGrantRequest>) -> Result<Response<LeaseGrantResponse>, Status> {
        let mut r = req.into_inner();
        let chosen = r.id == 0;
        for _ in 0..5 {
            if chosen {
                r.id = new_lease_id(&self.shared);
            }
            match self.write("lease_grant", raft_command::Op::EtcdLeaseGrant(r)).await {
                Ok(batch_response::Response::EtcdLeaseGrant(resp)) => return Ok(Response::new(resp)),
                Ok(other) => return Err(unexpected(other)),
                // An id we chose that exists already: choose again.
                Err(s) if chosen && s.code() == tonic::Code::FailedPrecondition => continue,
                Err(s) => return Err(s),
            }
        }
        Err(Status::internal("etcdserver: could not choose a free lease id"))
    }

    async fn lease_revoke(&self, req: Request<LeaseRevokeRequest>) -> Result<Response<LeaseRevokeResponse>, Status> {
        let r = req.into_inner();
        match self.write("lease_revoke", raft_command::Op::EtcdLeaseRevoke(r)).await? {
            batch_response::Response::EtcdLeaseRevoke(resp) => Ok(Response::new(resp)),
            other => Err(unexpected(other)),
        }
    }

    type LeaseKeepAliveStream = KeepAliveStream;

    async fn lease_keep_alive(
        &self,
        req: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        let mut inbound = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let api = self.clone();
        tokio::spawn(async move {
            loop {
                let msg = match inbound.message().await {
                    Ok(Some(m)) => m,
                    Ok(None) => return,
                    Err(e) => {
                        tracing::debug!(error = %e, "keep-alive stream broke");
                        return;
                    }
                };
                let answer = api.keep_alive_once(msg.id).await;
                let failed = answer.is_err();
                if tx.send(answer).await.is_err() || failed {
                    // An error ends the stream, as etcd's does; the client
                    // opens another.
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn lease_time_to_live(
        &self,
        req: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        let r = batch_request::Request::EtcdLeaseTimeToLive(req.into_inner());
        match self.send("lease_time_to_live", r).await? {
            batch_response::Response::EtcdLeaseTimeToLive(resp) => Ok(Response::new(resp)),
            other => Err(unexpected(other)),
        }
    }

    async fn lease_leases(&self, _req: Request<LeaseLeasesRequest>) -> Result<Response<LeaseLeasesResponse>, Status> {
        let r = batch_request::Request::EtcdLeaseLeases(LeaseLeasesRequest {});
        match self.send("lease_leases", r).await? {
            batch_response::Response::EtcdLeaseLeases(resp) => Ok(Response::new(resp)),
            other => Err(unexpected(other)),
        }
    }
}

/// Expires leases while this node holds the etcd range's lease: each
/// expired one is revoked by a raft command proposed here (never sent
/// elsewhere: only the holder of the range's lease may decide an expiry).
pub async fn expiry_loop(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(EXPIRY_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(store) = shared.local.get().map(|l| l.store.clone()) else {
            continue;
        };
        let expired = match kvserver::evaluator::expired_leases(&store) {
            Ok(e) => e,
            Err(why) => {
                tracing::warn!(%why, "cannot read etcd leases");
                continue;
            }
        };
        for id in expired {
            let cmd = proto::kvserver::RaftCommand {
                proposer_term: 0,
                max_lease_index: 0,
                proposer_ts: None,
                op: Some(raft_command::Op::EtcdLeaseRevoke(LeaseRevokeRequest { id })),
            };
            let req = BatchRequest {
                cluster_id: store.ident().cluster_id.clone(),
                range_id: ETCD_RANGE_ID,
                request: Some(batch_request::Request::Write(cmd)),
            };
            let resp = kvserver::evaluator::evaluate(&store, req, &shared.eval_options()).await;
            match resp.response {
                Some(batch_response::Response::EtcdLeaseRevoke(_)) => {
                    tracing::debug!(lease = id, "lease expired and revoked")
                }
                other => tracing::debug!(lease = id, answer = ?other, "lease expiry not applied"),
            }
        }
    }
}
