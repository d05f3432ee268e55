//! What a node may know of its group member without reaching into the core:
//! a copy of its term, roles, log positions and (on a leader) each follower's
//! replication progress, as etcd/raft's `Status`.
//!
//! The progress tracker and the log stay private to this crate; everything a
//! store needs to decide (promote a learner, truncate the log, show a range)
//! comes through here, so the core's invariants cannot be broken from outside.

use std::collections::BTreeMap;

use crate::node::RawNode;
use crate::progress::{Progress, ProgressState};
use crate::storage::Storage;
use crate::types::{ConfState, HardState, NodeId, Role};

/// A follower's replication progress as its leader sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FollowerProgress {
    /// The highest index known to match the leader's log.
    pub matched: u64,
    /// The next index to send.
    pub next: u64,
    pub state: ProgressState,
    /// Heard from since the last check-quorum round.
    pub recent_active: bool,
    pub is_learner: bool,
}

impl From<&Progress> for FollowerProgress {
    fn from(p: &Progress) -> Self {
        FollowerProgress {
            matched: p.matched,
            next: p.next,
            state: p.state,
            recent_active: p.recent_active,
            is_learner: p.is_learner,
        }
    }
}

/// A snapshot of one member's state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    pub id: NodeId,
    pub hard_state: HardState,
    pub role: Role,
    pub leader: NodeId,
    pub first_index: u64,
    pub last_index: u64,
    pub applied: u64,
    pub conf_state: ConfState,
    /// A leader that applied its term's first entry (see `leader_ready`).
    pub leader_ready: bool,
    /// A membership change is proposed and not yet applied.
    pub conf_change_pending: bool,
    /// On a leader, every member's progress (itself included); empty otherwise.
    pub progress: BTreeMap<NodeId, FollowerProgress>,
}

impl<S: Storage> RawNode<S> {
    /// A copy of this member's state.
    pub fn status(&self) -> Status {
        let r = &self.raft;
        let progress = if r.role == Role::Leader {
            r.trk
                .progress
                .iter()
                .map(|(&id, p)| (id, FollowerProgress::from(p)))
                .collect()
        } else {
            BTreeMap::new()
        };
        Status {
            id: r.id,
            hard_state: r.hard_state(),
            role: r.role,
            leader: r.leader,
            first_index: r.log.first_index(),
            last_index: r.log.last_index(),
            applied: r.log.applied,
            conf_state: r.trk.conf_state(),
            leader_ready: r.leader_ready(),
            conf_change_pending: r.conf_change_pending(),
            progress,
        }
    }

    /// The term, vote and commit index (the hard state as it is now, durable
    /// or not).
    pub fn hard_state(&self) -> HardState {
        self.raft.hard_state()
    }

    /// The first index still in the log (after compaction).
    pub fn first_index(&self) -> u64 {
        self.raft.log.first_index()
    }

    pub fn last_index(&self) -> u64 {
        self.raft.log.last_index()
    }

    pub fn committed(&self) -> u64 {
        self.raft.log.committed
    }

    /// Whether a membership change is proposed and not yet applied.
    pub fn conf_change_pending(&self) -> bool {
        self.raft.conf_change_pending()
    }

    /// The leader's view of one member's progress (`None` when not leader or
    /// not a member).
    pub fn progress(&self, id: NodeId) -> Option<FollowerProgress> {
        if self.raft.role != Role::Leader {
            return None;
        }
        self.raft.trk.progress.get(&id).map(FollowerProgress::from)
    }

    /// What this member has been through.
    pub fn counters(&self) -> crate::raft::RaftCounters {
        self.raft.counters
    }
}
