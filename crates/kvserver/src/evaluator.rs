//! The leaseholder's side of the internal batch RPC: evaluates one request for
//! one range on this store, a read under the lease or a write proposed
//! through raft and answered once applied, and says (typed) why not when it
//! cannot: not the leaseholder (with a hint), no such range, outcome unknown.
//!
//! It never routes and never retries: finding the leaseholder is the
//! DistSender's job (in the server crate), which calls this directly when the
//! leaseholder is local and over the `Internal.Batch` RPC otherwise.

use std::time::{Duration, Instant};

use prost::Message as _;
use proto::etcdserverpb::{CompactionResponse, ResponseHeader};
use proto::kvserver::{
    batch_error, batch_request, batch_response, Ambiguous, BatchError, BatchRequest, BatchResponse,
    EtcdError as PbEtcdError, NotLeaseholder,
};

use crate::etcd::{self, grpc_code, EtcdError, EtcdFailure, EtcdWriteResponse};
use crate::etcd_lease;
use crate::keyspace::{ETCD_RANGE_ID, SYSTEM_RANGE_ID};
use crate::replica::{ApplyOutcome, ProposeError};
use crate::store::StoreHandle;

/// How a store evaluates.
#[derive(Clone)]
pub struct EvalOptions {
    /// How long a write may wait for its entry to apply.
    pub write_timeout: Duration,
    /// Testing knob, never on in production: answer reads from this replica's
    /// state without a lease (stale reads; the register workload must catch it).
    pub unsafe_follower_reads: bool,
    /// The maximum clock offset between nodes (`--max-offset-ms`): a new
    /// lease's timestamp cache starts this far above its clock, and no request
    /// may name a timestamp further ahead of it.
    pub max_offset: Duration,
    /// Where requests about transactions (pushes, intent resolution) are
    /// sent: the node's DistSender. None: a request meeting an intent fails.
    pub router: Option<std::sync::Arc<dyn crate::intent_resolver::TxnRouter>>,
    /// Testing knobs of transactions (off in production).
    pub txn_knobs: crate::batcheval::TxnKnobs,
}

impl std::fmt::Debug for EvalOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EvalOptions")
            .field("write_timeout", &self.write_timeout)
            .field("unsafe_follower_reads", &self.unsafe_follower_reads)
            .field("max_offset", &self.max_offset)
            .field("router", &self.router.is_some())
            .field("txn_knobs", &self.txn_knobs)
            .finish()
    }
}

fn error(kind: batch_error::Kind) -> BatchResponse {
    BatchResponse {
        response: Some(batch_response::Response::Error(BatchError { kind: Some(kind) })),
    }
}

fn etcd_error(e: &EtcdError) -> BatchResponse {
    error(batch_error::Kind::Etcd(PbEtcdError {
        code: e.grpc_code(),
        message: e.to_string(),
    }))
}

fn etcd_error_msg(code: i32, message: String) -> BatchResponse {
    error(batch_error::Kind::Etcd(PbEtcdError { code, message }))
}

/// Why `req` must not be evaluated at all: an operation sent to a range that
/// does not hold its kind of data, or a write larger than etcd accepts.
fn misdirected(req: &BatchRequest) -> Option<String> {
    use proto::kvserver::raft_command::Op;
    let wants = match &req.request {
        None => return None, // answered as an empty request
        Some(
            batch_request::Request::EtcdRange(_)
            | batch_request::Request::EtcdLeaseKeepAlive(_)
            | batch_request::Request::EtcdLeaseTimeToLive(_)
            | batch_request::Request::EtcdLeaseLeases(_),
        ) => ETCD_RANGE_ID,
        Some(batch_request::Request::RangeLookup(_)) => SYSTEM_RANGE_ID,
        // Checked against the range's span by `kv_batch` and `split`.
        Some(
            batch_request::Request::Kv(_)
            | batch_request::Request::AdminSplit(_)
            | batch_request::Request::Subsume(_)
            | batch_request::Request::WaitApplied(_)
            | batch_request::Request::MergeCommit(_)
            | batch_request::Request::ResolveMerge(_)
            | batch_request::Request::Unfreeze(_),
        ) => return None,
        Some(batch_request::Request::Write(cmd)) => {
            if cmd.encoded_len() > etcd::MAX_REQUEST_BYTES + 1024 {
                return Some(EtcdError::TooLarge.to_string());
            }
            match &cmd.op {
                None => return Some("a write without an operation".into()),
                Some(
                    Op::EtcdPut(_)
                    | Op::EtcdDeleteRange(_)
                    | Op::EtcdTxn(_)
                    | Op::EtcdCompact(_)
                    | Op::EtcdLeaseGrant(_)
                    | Op::EtcdLeaseRevoke(_),
                ) => ETCD_RANGE_ID,
                Some(Op::AllocateNode(_) | Op::Heartbeat(_) | Op::MetaUpdate(_) | Op::AllocateRangeId(_)) => {
                    SYSTEM_RANGE_ID
                }
                // Only a leaseholder's own evaluation makes these.
                Some(
                    Op::WriteBatch(_)
                    | Op::Split(_)
                    | Op::Freeze(_)
                    | Op::Unfreeze(_)
                    | Op::Merge(_)
                    | Op::AbortMerge(_),
                ) => return Some("evaluated commands are not accepted from outside".into()),
            }
        }
    };
    (wants != req.range_id).then(|| {
        format!(
            "range {} does not serve this request (range {wants} does)",
            req.range_id
        )
    })
}

fn internal(msg: String) -> BatchResponse {
    error(batch_error::Kind::Etcd(PbEtcdError {
        code: grpc_code::INTERNAL,
        message: msg,
    }))
}

/// "Not here": names the store of the leader replica if this store knows it.
pub fn not_leaseholder(store: &StoreHandle, range_id: u64) -> BatchResponse {
    let Some(st) = store.status(range_id) else {
        return error(batch_error::Kind::RangeNotFound(range_id));
    };
    let leader_store = st
        .desc
        .replicas
        .iter()
        .find(|r| st.leader != 0 && r.replica_id == st.leader)
        .map_or(0, |r| r.store_id);
    error(batch_error::Kind::NotLeaseholder(NotLeaseholder {
        leader_store,
        descriptor: Some(st.desc),
    }))
}

/// The header etcd puts on every answer.
pub fn header(store: &StoreHandle, revision: i64, raft_term: u64) -> ResponseHeader {
    let ident = store.ident();
    ResponseHeader {
        cluster_id: u64::from_str_radix(&ident.cluster_id, 16).unwrap_or(1),
        member_id: ident.node_id,
        revision,
        raft_term,
    }
}

/// Evaluates `req` here.
pub async fn evaluate(store: &StoreHandle, req: BatchRequest, opts: &EvalOptions) -> BatchResponse {
    let range_id = req.range_id;
    // A store whose raft loop stopped serves nothing, testing knobs or not:
    // the sender looks elsewhere.
    if let Some(why) = store.stopped() {
        return error(batch_error::Kind::Unavailable(why));
    }
    // A range this store lacks is answered RangeNotFound (the sender looks
    // elsewhere); one it has refuses what it does not hold.
    if store.has_range(range_id) {
        if let Some(why) = misdirected(&req) {
            return etcd_error_msg(grpc_code::INVALID_ARGUMENT, why);
        }
    }
    match req.request {
        None => internal("empty batch request".into()),
        Some(batch_request::Request::EtcdRange(r)) => read(store, range_id, &r, opts),
        Some(
            r @ (batch_request::Request::EtcdLeaseKeepAlive(_)
            | batch_request::Request::EtcdLeaseTimeToLive(_)
            | batch_request::Request::EtcdLeaseLeases(_)),
        ) => lease_request(store, range_id, r),
        Some(batch_request::Request::Kv(b)) => crate::kv_batch::evaluate(store, range_id, b, opts).await,
        Some(batch_request::Request::RangeLookup(l)) => crate::kv_batch::range_lookup(store, range_id, &l),
        Some(batch_request::Request::AdminSplit(s)) => crate::split::admin_split(store, range_id, s, opts).await,
        Some(batch_request::Request::Subsume(r)) => crate::merge::subsume(store, range_id, r, opts).await,
        Some(batch_request::Request::WaitApplied(r)) => crate::merge::wait_applied(store, range_id, r, opts).await,
        Some(batch_request::Request::MergeCommit(r)) => crate::merge::commit(store, range_id, r, opts).await,
        Some(batch_request::Request::ResolveMerge(r)) => crate::merge::resolve(store, range_id, r, opts).await,
        Some(batch_request::Request::Unfreeze(r)) => crate::merge::unfreeze(store, range_id, r, opts).await,
        Some(batch_request::Request::Write(cmd)) => {
            let me = store.ident().store_id;
            let Some(here) = store.with_status(range_id, |st| {
                st.leader != 0
                    && st
                        .desc
                        .replicas
                        .iter()
                        .any(|r| r.replica_id == st.leader && r.store_id == me)
            }) else {
                return error(batch_error::Kind::RangeNotFound(range_id));
            };
            if !here {
                return not_leaseholder(store, range_id);
            }
            match store.propose(range_id, cmd, opts.write_timeout).await {
                Ok(outcome) => answer(store, outcome),
                Err(ProposeError::NotLeader { .. } | ProposeError::Dropped | ProposeError::LeaseChanged) => {
                    not_leaseholder(store, range_id)
                }
                Err(ProposeError::NoSuchRange(r)) => error(batch_error::Kind::RangeNotFound(r)),
                Err(ProposeError::Clock(c)) => error(batch_error::Kind::Unavailable(format!("clock: {c}"))),
                // Stopped while it waited: it may have applied.
                Err(ProposeError::Ambiguous | ProposeError::Stopped) => {
                    error(batch_error::Kind::Ambiguous(Ambiguous {}))
                }
            }
        }
    }
}

fn answer(store: &StoreHandle, outcome: ApplyOutcome) -> BatchResponse {
    use batch_response::Response as R;
    let response = match outcome {
        ApplyOutcome::NodeId(id) => R::NodeId(id),
        ApplyOutcome::Liveness(l) => R::Liveness(l),
        ApplyOutcome::MetaUpdated(changed) => R::MetaUpdated(proto::kvserver::MetaUpdated { changed }),
        ApplyOutcome::RangeId(id) => R::RangeId(id),
        ApplyOutcome::Kv(_)
        | ApplyOutcome::Split(_)
        | ApplyOutcome::Frozen(_)
        | ApplyOutcome::Unfrozen(_)
        | ApplyOutcome::Merged(_)
        | ApplyOutcome::MergeResolved(_) => return internal("an evaluated command proposed outside its path".into()),
        ApplyOutcome::Etcd { result: Err(e), .. } => return etcd_error(&e),
        ApplyOutcome::Etcd {
            result: Ok(resp),
            rev,
            term,
        } => match etcd::with_header(resp, header(store, rev, term)) {
            EtcdWriteResponse::Put(p) => R::EtcdPut(p),
            EtcdWriteResponse::DeleteRange(d) => R::EtcdDeleteRange(d),
            EtcdWriteResponse::Txn(t) => R::EtcdTxn(t),
            EtcdWriteResponse::Compact => R::EtcdCompact(CompactionResponse {
                header: Some(header(store, rev, term)),
            }),
            EtcdWriteResponse::LeaseGrant(g) => {
                // Its clock starts now, at the leaseholder that granted it.
                store.lessor().lock().deadline(term, g.id, g.ttl, Instant::now());
                R::EtcdLeaseGrant(g)
            }
            EtcdWriteResponse::LeaseRevoke(r) => R::EtcdLeaseRevoke(r),
        },
    };
    BatchResponse {
        response: Some(response),
    }
}

/// A lease request answered by the leaseholder from its lease clock and
/// the lease records, without raft.
fn lease_request(store: &StoreHandle, range_id: u64, req: batch_request::Request) -> BatchResponse {
    use batch_request::Request as Q;
    use batch_response::Response as R;
    let Some(serving) = store.with_status(range_id, |st| st.can_serve(Instant::now())) else {
        return error(batch_error::Kind::RangeNotFound(range_id));
    };
    if !serving {
        return not_leaseholder(store, range_id);
    }
    let snap = store.engine().snapshot();
    let now = Instant::now();
    let Some((term, true)) = store.with_status(range_id, |s| (s.term, s.can_serve(now))) else {
        return not_leaseholder(store, range_id);
    };
    let rev = match store.rev_state(&snap) {
        Ok(r) => r.rev,
        Err(e) => return internal(e.to_string()),
    };
    let hdr = Some(header(store, rev, term));
    let answer = (|| -> Result<R, EtcdFailure> {
        Ok(match req {
            Q::EtcdLeaseKeepAlive(k) => {
                let ttl = match etcd_lease::granted_ttl(&snap, k.id)? {
                    Some(ttl) if store.lessor().lock().renew(term, k.id, ttl, now) => ttl,
                    // Unknown or expired: etcd answers a TTL of 0.
                    _ => 0,
                };
                R::EtcdLeaseKeepAlive(proto::etcdserverpb::LeaseKeepAliveResponse {
                    header: hdr,
                    id: k.id,
                    ttl,
                })
            }
            Q::EtcdLeaseTimeToLive(t) => {
                let mut resp = proto::etcdserverpb::LeaseTimeToLiveResponse {
                    header: hdr,
                    id: t.id,
                    ttl: -1,
                    ..Default::default()
                };
                if let Some(ttl) = etcd_lease::granted_ttl(&snap, t.id)? {
                    resp.ttl = store.lessor().lock().remaining(term, t.id, ttl, now);
                    resp.granted_ttl = ttl;
                    if t.keys {
                        resp.keys = etcd_lease::keys_of(&snap, t.id)?;
                    }
                }
                R::EtcdLeaseTimeToLive(resp)
            }
            Q::EtcdLeaseLeases(_) => R::EtcdLeaseLeases(proto::etcdserverpb::LeaseLeasesResponse {
                header: hdr,
                leases: etcd_lease::all(&snap)?
                    .into_iter()
                    .map(|(id, _)| proto::etcdserverpb::LeaseStatus { id })
                    .collect(),
            }),
            other => return Err(EtcdFailure::Corrupt(format!("not a lease request: {other:?}"))),
        })
    })();
    match answer {
        Ok(r) => BatchResponse { response: Some(r) },
        Err(EtcdFailure::Refused(e)) => etcd_error(&e),
        Err(e) => internal(e.to_string()),
    }
}

/// The leases this store, holding the etcd range's lease, finds expired
/// now (empty when it does not hold that lease): the expiry loop revokes
/// them through raft.
pub fn expired_leases(store: &StoreHandle) -> Result<Vec<i64>, String> {
    let now = Instant::now();
    let Some((term, true)) = store.with_status(ETCD_RANGE_ID, |s| (s.term, s.can_serve(now))) else {
        return Ok(Vec::new());
    };
    let snap = store.engine().snapshot();
    let leases = etcd_lease::all(&snap).map_err(|e| e.to_string())?;
    Ok(store.lessor().lock().expired(term, &leases, now))
}

fn read(
    store: &StoreHandle,
    range_id: u64,
    r: &proto::etcdserverpb::RangeRequest,
    opts: &EvalOptions,
) -> BatchResponse {
    let Some((applied, term, serving)) =
        store.with_status(range_id, |st| (st.applied.index, st.term, st.can_serve(Instant::now())))
    else {
        return error(batch_error::Kind::RangeNotFound(range_id));
    };
    let unsafe_reads = opts.unsafe_follower_reads && applied > 1;
    if !unsafe_reads && !serving {
        return not_leaseholder(store, range_id);
    }
    let snap = store.engine().snapshot();
    // The lease must still hold now that the view is taken.
    if !unsafe_reads
        && !store
            .with_status(range_id, |s| s.can_serve(Instant::now()))
            .unwrap_or(false)
    {
        return not_leaseholder(store, range_id);
    }
    let rev = match store.rev_state(&snap) {
        Ok(r) => r,
        Err(e) => return internal(e.to_string()),
    };
    match etcd::range(&snap, &rev, r) {
        Ok(mut resp) => {
            resp.header = Some(header(store, rev.rev, term));
            BatchResponse {
                response: Some(batch_response::Response::EtcdRange(resp)),
            }
        }
        Err(EtcdFailure::Refused(e)) => etcd_error(&e),
        Err(e) => internal(e.to_string()),
    }
}
