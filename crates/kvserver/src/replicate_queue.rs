//! The replicate queue: on each range this store leads, keep the number of
//! voters at `min(3, live stores)`. A learner is added on a live store that
//! has no replica, sent a snapshot, and promoted once caught up; every change
//! goes through a joint configuration that raft leaves by itself, and carries
//! the descriptor it leads to (written when the change applies).
//!
//! It only decides and proposes; it never waits, and never removes replicas
//! (replacing dead ones and rebalancing come later).

use prost::Message as _;
use proto::storage::{replica_descriptor, RangeDescriptor, ReplicaDescriptor};
use raft::{ConfChange, ConfChangeKind, ConfChangeSingle, Role, Status};

use crate::replica::Replica;

/// A learner whose match index is within this many entries of the leader's
/// last index is caught up.
const CAUGHT_UP_SLACK: u64 = 2;

/// Proposes at most one change on `r` (whose raft status is `st`), if this
/// store leads it and it may change; `live` are the stores worth a replica.
pub fn consider(r: &mut Replica, st: &Status, live: &[u64]) {
    if !r.may_change_replicas() {
        return; // a merge needs its replicas where they are
    }
    let target = live.len().min(3);
    let Some(cc) = next_change(st, &r.desc, live, target) else {
        return;
    };
    let what = format!("{:?}", cc.changes);
    match r.propose_conf_change(cc) {
        Ok(()) => tracing::info!(range = r.range_id, change = %what, "replicate queue"),
        Err(e) => tracing::debug!(range = r.range_id, error = %e, "replicate queue: change refused"),
    }
}

/// Whether a range with configuration `cs` has nothing for the queue to do
/// with `live` stores: as many voters as it should have, no learner, not
/// joint (checked without building a `Status`).
pub fn fully_replicated(cs: &raft::ConfState, live: usize) -> bool {
    !cs.is_joint() && cs.learners.is_empty() && cs.voters.len() >= live.min(3)
}

/// The change a range needs, if it is led here and free to change: promote a
/// caught-up learner, or add a learner while short of `target` voters.
pub fn next_change(st: &Status, desc: &RangeDescriptor, live: &[u64], target: usize) -> Option<ConfChange> {
    if st.role != Role::Leader || !st.leader_ready || st.conf_change_pending {
        return None;
    }
    let cs = &st.conf_state;
    if cs.is_joint() {
        return None;
    }
    let caught_up = cs.learners.iter().copied().find(|id| {
        st.progress
            .get(id)
            .is_some_and(|p| p.matched + CAUGHT_UP_SLACK >= st.last_index)
    });
    let mut desc = desc.clone();
    if let Some(id) = caught_up {
        for rep in &mut desc.replicas {
            if rep.replica_id == id {
                rep.r#type = replica_descriptor::Type::Voter as i32;
            }
        }
        return Some(change(ConfChangeKind::AddVoter, id, &desc));
    }
    if cs.voters.len() >= target || !cs.learners.is_empty() {
        return None;
    }
    let have: Vec<u64> = desc.replicas.iter().map(|x| x.store_id).collect();
    let &store = live.iter().find(|s| !have.contains(s))?;
    let id = desc.next_replica_id.max(1);
    desc.next_replica_id = id + 1;
    desc.replicas.push(ReplicaDescriptor {
        node_id: store,
        store_id: store,
        replica_id: id,
        r#type: replica_descriptor::Type::Learner as i32,
    });
    Some(change(ConfChangeKind::AddLearner, id, &desc))
}

fn change(kind: ConfChangeKind, node: u64, desc: &RangeDescriptor) -> ConfChange {
    ConfChange {
        changes: vec![ConfChangeSingle { kind, node }],
        context: desc.encode_to_vec(),
    }
}
