//! etcd's gRPC errors: the codes and messages etcd's clients recognise.

use kvserver::etcd::EtcdError;
use kvserver::ProposeError;
use tonic::{Code, Status};

pub fn etcd_status(e: &EtcdError) -> Status {
    Status::new(Code::from(e.grpc_code()), e.to_string())
}

/// A proposal that produced no outcome. Only `Dropped` and `NotLeader` are
/// definite; everything else may have been applied, and says so the way etcd
/// does (`request timed out`, on which etcd's clients do not retry writes).
pub fn propose_status(e: &ProposeError) -> Status {
    match e {
        ProposeError::NotLeader { leader: 0 } => Status::unavailable("etcdserver: no leader"),
        ProposeError::NotLeader { .. } => Status::unavailable("etcdserver: leader changed"),
        ProposeError::Dropped | ProposeError::LeaseChanged => Status::unavailable("etcdserver: leader changed"),
        ProposeError::Ambiguous => Status::unavailable("etcdserver: request timed out"),
        ProposeError::Stopped => Status::unavailable("etcdserver: server stopped"),
        ProposeError::NoSuchRange(r) => Status::internal(format!("etcdserver: range {r} is not on this node")),
        ProposeError::Clock(c) => Status::unavailable(format!("etcdserver: unhealthy cluster ({c})")),
    }
}
