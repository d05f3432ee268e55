//! Node and range ids: the list of the cluster's nodes on the system range
//! (range-local record `N` of range 1), to which a joining node is added by
//! an `AllocateNode` command applied in log order, so two joins never get one
//! id; and the next range id (record `R`), given out by `AllocateRangeId`
//! the same way, so two splits never create one range id.

use prost::Message as _;
use proto::kvserver::{AllocateNode, NodeRecord, NodesRecord};
use storage::{rangestate, Batch, Reader};

use crate::keyspace::SYSTEM_RANGE_ID;
use crate::StoreError;

/// Range-local record suffix of the node list (system range only).
pub const NODES_SUFFIX: u8 = b'N';
/// Range-local record suffix of the next range id (system range only).
pub const NEXT_RANGE_ID_SUFFIX: u8 = b'R';

/// Gives out the next range id (the first after the bootstrap ranges when
/// none was given yet).
pub fn apply_allocate_range_id(batch: &mut Batch) -> Result<u64, StoreError> {
    let next = match rangestate::local_record(&*batch, SYSTEM_RANGE_ID, NEXT_RANGE_ID_SUFFIX)? {
        Some(b) => {
            let a: [u8; 8] = b[..]
                .try_into()
                .map_err(|_| StoreError::Corrupt(format!("next range id record of {} bytes", b.len())))?;
            u64::from_be_bytes(a)
        }
        None => crate::keyspace::BOOTSTRAP_RANGES.iter().map(|r| r.0).max().unwrap_or(0) + 1,
    };
    rangestate::set_local_record(batch, SYSTEM_RANGE_ID, NEXT_RANGE_ID_SUFFIX, &(next + 1).to_be_bytes())?;
    Ok(next)
}

/// Every node the cluster gave an id to, as `reader` holds the list.
pub fn records(reader: &dyn Reader) -> Result<Vec<NodeRecord>, StoreError> {
    match rangestate::local_record(reader, SYSTEM_RANGE_ID, NODES_SUFFIX)? {
        Some(b) => NodesRecord::decode(&b[..])
            .map(|r| r.nodes)
            .map_err(|e| StoreError::Corrupt(format!("nodes record: {e}"))),
        None => Ok(Vec::new()),
    }
}

/// Writes the node list of a new cluster: node `first` at `addr`.
pub fn bootstrap(batch: &mut Batch, first: u64, addr: &str) -> Result<(), StoreError> {
    let nodes = NodesRecord {
        nodes: vec![NodeRecord {
            node_id: first,
            addr: addr.to_string(),
        }],
    };
    rangestate::set_local_record(batch, SYSTEM_RANGE_ID, NODES_SUFFIX, &nodes.encode_to_vec())?;
    Ok(())
}

/// Applies an allocation into `batch` (which reads through to the engine):
/// the next id after the largest given, recorded with the node's address.
pub fn apply_allocate(batch: &mut Batch, a: &AllocateNode) -> Result<u64, StoreError> {
    let mut nodes = NodesRecord {
        nodes: records(&*batch)?,
    };
    let id = nodes.nodes.iter().map(|n| n.node_id).max().unwrap_or(0) + 1;
    nodes.nodes.push(NodeRecord {
        node_id: id,
        addr: a.addr.clone(),
    });
    rangestate::set_local_record(batch, SYSTEM_RANGE_ID, NODES_SUFFIX, &nodes.encode_to_vec())?;
    Ok(id)
}
