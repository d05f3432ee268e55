//! What a leader knows of each follower: how far its log matches, what to send
//! next, how much is in flight (flow control), and the membership configuration
//! these followers form.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::quorum::{JointConfig, MajorityConfig, VoteResult};
use crate::types::{ConfState, NodeId};

/// How the leader replicates to a follower.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgressState {
    /// Position unknown: one append at a time until one is accepted.
    Probe,
    /// Position known: appends are pipelined, bounded by the in-flight limits.
    Replicate,
    /// A snapshot at `pending` is on its way; nothing else is sent.
    Snapshot { pending: u64 },
}

/// In-flight append messages to one follower: their last indexes and sizes.
#[derive(Clone, Debug, Default)]
pub struct Inflights {
    queue: VecDeque<(u64, u64)>,
    bytes: u64,
}

impl Inflights {
    pub fn add(&mut self, last_index: u64, bytes: u64) {
        self.queue.push_back((last_index, bytes));
        self.bytes += bytes;
    }
    /// Frees every message whose last index is at or below `index`.
    pub fn free_to(&mut self, index: u64) {
        while let Some(&(i, b)) = self.queue.front() {
            if i > index {
                break;
            }
            self.queue.pop_front();
            self.bytes -= b;
        }
    }
    pub fn free_first(&mut self) {
        if let Some(&(i, _)) = self.queue.front() {
            self.free_to(i);
        }
    }
    pub fn reset(&mut self) {
        self.queue.clear();
        self.bytes = 0;
    }
    pub fn count(&self) -> usize {
        self.queue.len()
    }
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// The leader's view of one follower (or of itself).
#[derive(Clone, Debug)]
pub struct Progress {
    pub matched: u64,
    pub next: u64,
    pub state: ProgressState,
    /// In probe state: an append was sent and no answer came yet.
    pub probe_sent: bool,
    pub inflights: Inflights,
    /// Heard from since the last check-quorum round.
    pub recent_active: bool,
    pub is_learner: bool,
    /// The latest heartbeat round it acknowledged in this term.
    pub acked_seq: u64,
    /// It promised (fortified) this leader's term for the store epoch in
    /// force: the incarnation of its store that promised.
    pub fortified: Option<u64>,
}

impl Progress {
    pub fn new(next: u64, is_learner: bool) -> Self {
        Progress {
            matched: 0,
            next,
            state: ProgressState::Probe,
            probe_sent: false,
            inflights: Inflights::default(),
            recent_active: false,
            is_learner,
            acked_seq: 0,
            fortified: None,
        }
    }

    fn reset_state(&mut self, state: ProgressState) {
        self.probe_sent = false;
        self.state = state;
        self.inflights.reset();
    }

    pub fn become_probe(&mut self) {
        if let ProgressState::Snapshot { pending } = self.state {
            self.reset_state(ProgressState::Probe);
            self.next = (self.matched + 1).max(pending + 1);
        } else {
            self.reset_state(ProgressState::Probe);
            self.next = self.matched + 1;
        }
    }

    pub fn become_replicate(&mut self) {
        self.reset_state(ProgressState::Replicate);
        self.next = self.matched + 1;
    }

    pub fn become_snapshot(&mut self, index: u64) {
        self.reset_state(ProgressState::Snapshot { pending: index });
    }

    /// Records that the follower has `index`; returns whether it moved forward.
    pub fn maybe_update(&mut self, index: u64) -> bool {
        let updated = index > self.matched;
        if updated {
            self.matched = index;
            self.probe_sent = false;
        }
        self.next = self.next.max(index + 1);
        updated
    }

    /// Handles a rejection of the append at `rejected`, with the follower's hint
    /// `match_hint`; returns whether the rejection was news (not stale).
    pub fn maybe_decr_to(&mut self, rejected: u64, match_hint: u64) -> bool {
        if self.state == ProgressState::Replicate {
            if rejected <= self.matched {
                return false; // stale
            }
            self.next = self.matched + 1;
            return true;
        }
        if self.next != rejected + 1 {
            return false; // stale: not the probe we sent last
        }
        self.next = (match_hint + 1).min(rejected).max(self.matched + 1).max(1);
        self.probe_sent = false;
        true
    }

    /// Whether sending must wait (probe in flight, snapshot pending, window full).
    pub fn is_paused(&self, max_msgs: usize, max_bytes: u64) -> bool {
        match self.state {
            ProgressState::Probe => self.probe_sent,
            ProgressState::Replicate => self.inflights.count() >= max_msgs || self.inflights.bytes() >= max_bytes,
            ProgressState::Snapshot { .. } => true,
        }
    }
}

/// The membership configuration and the progress of every member.
#[derive(Clone, Debug, Default)]
pub struct Tracker {
    pub voters: JointConfig,
    pub learners: BTreeSet<NodeId>,
    pub learners_next: BTreeSet<NodeId>,
    pub progress: BTreeMap<NodeId, Progress>,
    /// Votes received in the current election.
    pub votes: BTreeMap<NodeId, bool>,
}

impl Tracker {
    pub fn conf_state(&self) -> ConfState {
        ConfState {
            voters: self.voters.incoming.voters.iter().copied().collect(),
            voters_outgoing: self.voters.outgoing.voters.iter().copied().collect(),
            learners: self.learners.iter().copied().collect(),
            learners_next: self.learners_next.iter().copied().collect(),
        }
    }

    /// Replaces the configuration; progress of members that stay is kept, new
    /// members start probing at `next`.
    pub fn set_conf(&mut self, cs: &ConfState, next: u64) {
        self.voters = JointConfig {
            incoming: MajorityConfig::new(cs.voters.iter().copied()),
            outgoing: MajorityConfig::new(cs.voters_outgoing.iter().copied()),
        };
        self.learners = cs.learners.iter().copied().collect();
        self.learners_next = cs.learners_next.iter().copied().collect();
        let members: BTreeSet<NodeId> = self
            .voters
            .ids()
            .into_iter()
            .chain(self.learners.iter().copied())
            .chain(self.learners_next.iter().copied())
            .collect();
        self.progress.retain(|id, _| members.contains(id));
        for &id in &members {
            let learner = !self.voters.contains(id);
            self.progress
                .entry(id)
                .and_modify(|p| p.is_learner = learner)
                .or_insert_with(|| Progress::new(next, learner));
        }
    }

    pub fn is_voter(&self, id: NodeId) -> bool {
        self.voters.contains(id)
    }

    pub fn is_single_voter(&self, id: NodeId) -> bool {
        !self.voters.is_joint() && self.voters.incoming.voters.len() == 1 && self.voters.incoming.voters.contains(&id)
    }

    pub fn committed_index(&self) -> u64 {
        self.voters
            .committed_index(|id| self.progress.get(&id).map(|p| p.matched))
    }

    /// The newest heartbeat round acknowledged by a quorum.
    pub fn quorum_acked_seq(&self) -> u64 {
        let q = self
            .voters
            .committed_index(|id| self.progress.get(&id).map(|p| p.acked_seq));
        if q == u64::MAX {
            0
        } else {
            q
        }
    }

    pub fn reset_votes(&mut self) {
        self.votes.clear();
    }

    pub fn record_vote(&mut self, id: NodeId, granted: bool) {
        self.votes.entry(id).or_insert(granted);
    }

    pub fn tally(&self) -> VoteResult {
        self.voters.vote_result(|id| self.votes.get(&id).copied())
    }

    /// Whether a quorum was heard from since the last check; resets the marks
    /// (except the leader's own).
    pub fn quorum_active(&mut self, me: NodeId) -> bool {
        let active: BTreeMap<NodeId, bool> = self
            .progress
            .iter()
            .filter(|(id, _)| self.voters.contains(**id))
            .map(|(&id, p)| (id, id == me || p.recent_active))
            .collect();
        for (id, p) in self.progress.iter_mut() {
            if *id != me {
                p.recent_active = false;
            }
        }
        self.voters.vote_result(|id| active.get(&id).copied()) == VoteResult::Won
    }
}
