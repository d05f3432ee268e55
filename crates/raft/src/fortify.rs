//! Leader leases on store liveness, and quiescence.
//!
//! A leader *fortifies* its term: it asks each voter to promise not to vote
//! for anyone else while the voter's store supports the leader's store at
//! the leader's store epoch (`support`). The node delivers `Fortify` only
//! when its store does support that epoch, and tells the core when that
//! support is withdrawn (`support_withdrawn`), which releases the promise. The
//! leader's lease holds while a quorum of voters that promised (itself
//! included) are still supported by, as the leader's store counts it; the
//! node computes that from [`LeaseBasis`] and its store's support, with no
//! per-range message.
//!
//! A leader that steps down releases its followers (`Defortify`, repeated
//! each heartbeat tick until it hears of a leader); a store restart raises
//! its epoch, and a withdrawn epoch is never supported again, so a promise
//! never blocks elections for good.
//!
//! *Quiescence*: a leader whose followers all hold every entry, know the
//! commit index and promised, stops ticking and sending; its fortified
//! followers need no ticks either (they do not campaign while they support
//! the leader). Any proposal, message or change of epoch wakes it.
//!
//! No clock here: expirations are numbers the node's store liveness keeps.

use std::collections::BTreeMap;

use crate::quorum::JointConfig;
use crate::raft::Raft;
use crate::storage::Storage;
use crate::support::incarnation;
use crate::types::{MessageBody, NodeId, Role, NONE};

/// A follower's promise to a leader.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fortification {
    pub leader: NodeId,
    pub term: u64,
    /// The leader's store epoch the promise lasts for.
    pub epoch: u64,
}

/// What a leader's lease rests on: the voters that promised, under the
/// configuration that needs a quorum of them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseBasis {
    pub term: u64,
    /// The leader's store epoch the promises are for.
    pub epoch: u64,
    pub leader: NodeId,
    voters: JointConfig,
    /// Voter -> the incarnation of its store that promised.
    fortified: BTreeMap<NodeId, u64>,
}

impl LeaseBasis {
    /// Until when the lease holds, given this store's `store_epoch` and, for
    /// a voter, until when its store supports this store's current epoch and
    /// which incarnation of it granted that (`None`: no support). `None`
    /// when no quorum of promises is supported at all.
    pub fn expiration(&self, store_epoch: u64, support: impl Fn(NodeId) -> Option<(u64, u64)>) -> Option<u64> {
        if store_epoch != self.epoch {
            return None;
        }
        let until = self.voters.committed_index(|id| {
            if id == self.leader {
                return Some(u64::MAX);
            }
            let inc = *self.fortified.get(&id)?;
            support(id).filter(|&(_, i)| i == inc).map(|(u, _)| u)
        });
        (until != 0).then_some(until)
    }

    /// The incarnation of `id`'s store that promised, if it did.
    pub fn promise_of(&self, id: NodeId) -> Option<u64> {
        self.fortified.get(&id).copied()
    }

    /// The voters whose promises count (the leader included).
    pub fn promised(&self) -> impl Iterator<Item = NodeId> + '_ {
        std::iter::once(self.leader).chain(self.fortified.keys().copied())
    }
}

impl<S: Storage> Raft<S> {
    /// The node's store epoch (0: no store liveness, so no fortification
    /// and no lease). A leader whose epoch changed fortifies again.
    pub(crate) fn set_store_epoch(&mut self, epoch: u64) {
        if epoch == self.store_epoch {
            return;
        }
        self.store_epoch = epoch;
        if self.role == Role::Leader {
            for p in self.trk.progress.values_mut() {
                p.fortified = None;
            }
            self.lease_changed = true;
            self.unquiesce();
            self.bcast_fortify();
        }
    }

    /// Asks every voter that has not promised for this epoch.
    pub(crate) fn bcast_fortify(&mut self) {
        if self.store_epoch == 0 || self.role != Role::Leader {
            return;
        }
        let me = self.id;
        let ids: Vec<NodeId> = self
            .trk
            .voters
            .ids()
            .into_iter()
            .filter(|&id| id != me && self.trk.progress.get(&id).is_some_and(|p| p.fortified.is_none()))
            .collect();
        let (t, epoch) = (self.term, self.store_epoch);
        for id in ids {
            self.send(id, t, MessageBody::Fortify { epoch });
        }
    }

    /// A follower promises (the node delivered this only because its store
    /// supports the leader's at `epoch`).
    pub(crate) fn handle_fortify(&mut self, from: NodeId, epoch: u64) {
        self.fortified = Some(crate::fortify::Fortification {
            leader: from,
            term: self.term,
            epoch,
        });
        let (t, inc) = (self.term, incarnation(self.store_epoch));
        self.send(
            from,
            t,
            MessageBody::FortifyResponse {
                epoch,
                incarnation: inc,
            },
        );
    }

    pub(crate) fn handle_fortify_response(&mut self, from: NodeId, epoch: u64, inc: u64) {
        if epoch != self.store_epoch {
            return; // for an epoch this store left
        }
        if let Some(p) = self.trk.progress.get_mut(&from) {
            if p.fortified != Some(inc) {
                p.fortified = Some(inc);
                // The node republishes what the lease rests on.
                self.lease_changed = true;
            }
        }
    }

    /// Whether this follower holds `from`'s fortification of the current term.
    pub(crate) fn fortified_by(&self, from: NodeId) -> bool {
        self.fortified.is_some_and(|f| f.leader == from && f.term == self.term)
    }

    /// The leader of `term` (`from`) releases this follower's promise.
    pub(crate) fn handle_defortify(&mut self, from: NodeId, term: u64) {
        if self.fortified.is_some_and(|f| f.leader == from && f.term == term) {
            self.fortified = None;
        }
    }

    /// The node's store withdrew its support of `leader`'s store at `epoch`:
    /// a promise to it is over, and a failover may start at once (within a
    /// random part of an election timeout, so candidates do not collide).
    pub(crate) fn support_withdrawn(&mut self, leader: NodeId, epoch: u64) {
        if !self.fortified.is_some_and(|f| f.leader == leader && f.epoch == epoch) {
            return;
        }
        self.fortified = None;
        // The leader's lease is over: nothing of the older "heard a leader
        // recently" rule needs to hold votes back either.
        self.lease_elapsed = u64::MAX;
        if self.role != Role::Leader {
            self.election_elapsed = self.election_elapsed.max(self.cfg.election_ticks);
        }
    }

    /// A leader that stepped down, on its ticks: releases the promises made to
    /// it until it hears of a leader.
    pub(crate) fn tick_defortify(&mut self) {
        if self.defortify_term == 0 {
            return;
        }
        if self.leader != NONE || self.role == Role::Leader {
            self.defortify_term = 0;
            return;
        }
        if !self.election_elapsed.is_multiple_of(self.cfg.heartbeat_ticks.max(1)) {
            return;
        }
        let (me, t, term) = (self.id, self.term, self.defortify_term);
        let ids: Vec<NodeId> = self.trk.voters.ids().into_iter().filter(|&id| id != me).collect();
        for id in ids {
            self.send(id, t, MessageBody::Defortify { term });
        }
    }

    /// What the lease rests on, for a leader that may claim one.
    pub fn lease_basis(&self) -> Option<LeaseBasis> {
        if self.role != Role::Leader || self.store_epoch == 0 || self.lease_disabled_term == self.term {
            return None;
        }
        let voters = self.trk.voters.clone();
        let fortified = self
            .trk
            .progress
            .iter()
            .filter(|(&id, _)| id != self.id && voters.contains(id))
            .filter_map(|(&id, p)| p.fortified.map(|inc| (id, inc)))
            .collect();
        Some(LeaseBasis {
            term: self.term,
            epoch: self.store_epoch,
            leader: self.id,
            voters,
            fortified,
        })
    }

    // ---- quiescence ------------------------------------------------------------

    /// Whether the node must keep ticking this member: not a quiesced
    /// leader, and not a follower that promised (it may not campaign).
    pub fn needs_tick(&self) -> bool {
        match self.role {
            Role::Leader => !self.quiesced,
            Role::Follower => self.fortified.is_none() || self.defortify_term != 0,
            _ => true,
        }
    }

    /// Wakes a quiesced leader.
    pub(crate) fn unquiesce(&mut self) {
        if !self.quiesced {
            return;
        }
        self.quiesced = false;
        self.quiesce_round = None;
        self.election_elapsed = 0;
        // Check-quorum starts afresh: nobody was expected to speak.
        for p in self.trk.progress.values_mut() {
            p.recent_active = true;
        }
    }

    /// Whether everything this leader has is held and committed everywhere
    /// and promised by every voter, with nothing waiting.
    fn all_settled(&self) -> bool {
        let last = self.log.last_index();
        self.role == Role::Leader
            && self.store_epoch != 0
            && self.log.committed == last
            && self.log.applied == last
            && self.lead_transferee == NONE
            && self.lease_disabled_term != self.term
            && !self.trk.voters.is_joint()
            && self.pending_reads.is_empty()
            && self.reads_waiting_commit.is_empty()
            && self
                .trk
                .progress
                .iter()
                .all(|(&id, p)| id == self.id || (p.matched == last && (p.is_learner || p.fortified.is_some())))
    }

    /// On a heartbeat tick: quiesces if a heartbeat round sent when all was
    /// settled (so carrying the final commit index) was answered by every
    /// member and nothing changed since. Returns whether it is quiesced.
    pub(crate) fn maybe_quiesce(&mut self) -> bool {
        if !self.all_settled() {
            self.quiesce_round = None;
            return false;
        }
        if let Some((seq, index)) = self.quiesce_round {
            let last = self.log.last_index();
            let acked = self
                .trk
                .progress
                .iter()
                .all(|(&id, p)| id == self.id || p.acked_seq >= seq);
            if index != last {
                self.quiesce_round = None;
            } else if acked {
                self.quiesced = true;
                self.counters.quiesced += 1;
                return true;
            }
        }
        false
    }

    /// After a heartbeat round went out: if all was settled, it is the round
    /// quiescence waits for.
    pub(crate) fn note_quiesce_round(&mut self) {
        if self.quiesce_round.is_none() && self.all_settled() {
            self.quiesce_round = Some((self.hb_seq, self.log.last_index()));
        }
    }
}
