//! Administrative client calls that need more than one node's answer: moving
//! a range's lease asks any node where the lease is, then the leaseholder.
//! Used by `tardigrade debug transfer-lease` and the workload's nemesis.

use std::time::Duration;

use proto::admin::{admin_client::AdminClient, NodesStatusRequest, RangesRequest, TransferLeaseRequest};
use proto::storage::replica_descriptor;
use tonic::transport::Channel;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot connect to {addr}: {why}")]
    Connect { addr: String, why: String },
    #[error("{0}")]
    Refused(String),
}

/// Where a range's lease is, as one node sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RangeLease {
    pub leaseholder_node: u64,
    pub leaseholder_addr: String,
    /// The nodes with a voting replica, the leaseholder's included.
    pub voter_nodes: Vec<u64>,
}

/// A channel to a node's gRPC port (`host:port` or a URL), with the
/// timeouts every client call of ours uses.
pub async fn connect(addr: &str) -> Result<Channel, AdminError> {
    let url = if addr.starts_with("http") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    let err = |why: String| AdminError::Connect {
        addr: addr.to_string(),
        why,
    };
    let ch = Channel::from_shared(url)
        .map_err(|e| err(e.to_string()))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(15))
        .connect()
        .await
        .map_err(|e| err(e.to_string()))?;
    Ok(ch)
}

async fn admin(addr: &str) -> Result<AdminClient<Channel>, AdminError> {
    Ok(AdminClient::new(connect(addr).await?))
}

/// Where `range`'s lease is, asking the node at `host`.
pub async fn find_lease(host: &str, range: u64) -> Result<RangeLease, AdminError> {
    let mut a = admin(host).await?;
    let ranges = a
        .ranges(RangesRequest {})
        .await
        .map_err(|s| AdminError::Refused(format!("cannot list ranges on {host}: {}", s.message())))?
        .into_inner();
    let Some(info) = ranges
        .ranges
        .iter()
        .find(|r| r.descriptor.as_ref().is_some_and(|d| d.range_id == range))
    else {
        return Err(AdminError::Refused(format!(
            "node {} has no replica of range {range}; ask a node that does (see `debug ranges`)",
            ranges.node_id
        )));
    };
    let desc = info.descriptor.clone().unwrap_or_default();
    let Some(leader) = desc
        .replicas
        .iter()
        .find(|r| info.raft_leader != 0 && r.replica_id == info.raft_leader)
    else {
        return Err(AdminError::Refused(format!(
            "range {range} has no leader now; try again"
        )));
    };
    let nodes = a
        .nodes(NodesStatusRequest {})
        .await
        .map_err(|s| AdminError::Refused(format!("cannot list nodes on {host}: {}", s.message())))?
        .into_inner();
    let leaseholder_addr = nodes
        .nodes
        .iter()
        .find(|n| n.node_id == leader.node_id && !n.addr.is_empty())
        .map_or_else(|| host.to_string(), |n| n.addr.clone());
    Ok(RangeLease {
        leaseholder_node: leader.node_id,
        leaseholder_addr,
        voter_nodes: desc
            .replicas
            .iter()
            .filter(|r| r.r#type == replica_descriptor::Type::Voter as i32)
            .map(|r| r.node_id)
            .collect(),
    })
}

/// Moves `range`'s lease to `to_node`, finding the leaseholder through
/// `host`; returns the nodes it moved from and to (the same when `to_node`
/// held it already).
pub async fn transfer_lease(host: &str, range: u64, to_node: u64) -> Result<(u64, u64), AdminError> {
    let lease = find_lease(host, range).await?;
    if lease.leaseholder_node == to_node {
        return Ok((to_node, to_node));
    }
    let r = admin(&lease.leaseholder_addr)
        .await?
        .transfer_lease(TransferLeaseRequest {
            range_id: range,
            to_node,
        })
        .await
        .map_err(|s| AdminError::Refused(format!("transfer of range {range}'s lease failed: {}", s.message())))?
        .into_inner();
    Ok((lease.leaseholder_node, r.leaseholder))
}
