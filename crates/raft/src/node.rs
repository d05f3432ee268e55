//! The interface a node drives a Raft group through: inputs (tick, step,
//! propose, ...) and a `Ready` of outputs, with persistence reported back
//! asynchronously.
//!
//! The node's loop:
//! 1. feed inputs; when `has_ready()`, take `ready()`;
//! 2. send `messages` at once;
//! 3. persist `hard_state`, `entries` and `snapshot` (in `Ready` order; the next
//!    `Ready` may be taken before this one is durable, to pipeline disk writes);
//! 4. once durable, call `on_persisted(number)` and only then send
//!    `persisted_messages` (answers that promise durable state);
//! 5. apply `committed_entries` (already durable locally), calling
//!    `apply_conf_change` for configuration entries, then `on_applied(index)`.

use std::collections::VecDeque;

use crate::confchange::ConfChangeRefused;
use crate::raft::{Config, ProposeError, Raft};
use crate::storage::{Storage, StorageError};
use crate::types::{ConfChange, ConfState, Entry, HardState, Message, NodeId, ReadState, Role, Snapshot, SoftState};

/// The outputs of one step of a Raft group.
#[derive(Debug, Default)]
pub struct Ready {
    /// Report this number to `on_persisted` once the writes below are durable.
    pub number: u64,
    pub soft_state: Option<SoftState>,
    /// Persist if `Some`.
    pub hard_state: Option<HardState>,
    /// Install and persist if `Some` (replaces the log and the state machine).
    pub snapshot: Option<Snapshot>,
    /// Append to the log (the first may overwrite a suffix).
    pub entries: Vec<Entry>,
    /// Send now.
    pub messages: Vec<Message>,
    /// Send only after this `Ready` is durable.
    pub persisted_messages: Vec<Message>,
    /// Apply, in order. They are durable locally.
    pub committed_entries: Vec<Entry>,
    pub read_states: Vec<ReadState>,
}

impl Ready {
    /// Whether anything must be written (and synced) before `on_persisted`.
    pub fn must_persist(&self) -> bool {
        self.hard_state.is_some() || self.snapshot.is_some() || !self.entries.is_empty()
    }
}

struct InFlight {
    number: u64,
    last: Option<(u64, u64)>,
    hard_state: Option<HardState>,
    snapshot_index: Option<u64>,
}

/// A Raft group member with the `Ready` interface.
pub struct RawNode<S: Storage> {
    pub(crate) raft: Raft<S>,
    prev_hs: HardState,
    prev_ss: SoftState,
    next_number: u64,
    in_flight: VecDeque<InFlight>,
}

impl<S: Storage> RawNode<S> {
    pub fn new(cfg: Config, storage: S) -> Result<Self, StorageError> {
        let raft = Raft::new(cfg, storage)?;
        let prev_hs = raft.hard_state();
        let prev_ss = raft.soft_state();
        Ok(RawNode {
            raft,
            prev_hs,
            prev_ss,
            next_number: 1,
            in_flight: VecDeque::new(),
        })
    }

    pub fn tick(&mut self) {
        self.raft.tick();
    }

    pub fn step(&mut self, m: Message) {
        self.raft.step(m);
    }

    pub fn campaign(&mut self) {
        self.raft.campaign_now();
    }

    /// Lets this member vote at once rather than after an election timeout
    /// from its start. That wait keeps a restarted member from voting while
    /// a leader may still count on a lease promise it made before; only a
    /// member that certainly has no such promise outstanding may skip it:
    /// one that never acknowledged a leader of this group (its term is still
    /// the group's initial one) in a process that has run for at least an
    /// election timeout (a promise of an earlier process has expired).
    pub fn forgo_start_wait(&mut self) {
        self.raft.ticks_since_start = self.raft.cfg.election_ticks;
    }

    pub fn propose(&mut self, data: Vec<u8>) -> Result<(u64, u64), ProposeError> {
        self.raft.propose(data)
    }

    pub fn propose_conf_change(&mut self, cc: ConfChange) -> Result<(u64, u64), ProposeError> {
        self.raft.propose_conf_change(cc)
    }

    /// Applies a committed membership change; a change that does not fit the
    /// configuration is refused (identically on every member) and changes
    /// nothing.
    pub fn apply_conf_change(&mut self, cc: &ConfChange) -> Result<ConfState, ConfChangeRefused> {
        self.raft.apply_conf_change(cc)
    }

    pub fn transfer_leader(&mut self, to: NodeId) {
        self.raft.transfer_leader(to);
    }

    pub fn read_index(&mut self, ctx: Vec<u8>) {
        self.raft.read_index(ctx);
    }

    pub fn report_unreachable(&mut self, to: NodeId) {
        self.raft.report_unreachable(to);
    }

    pub fn report_snapshot(&mut self, to: NodeId, ok: bool) {
        self.raft.report_snapshot(to, ok);
    }

    pub fn storage(&self) -> &S {
        &self.raft.log.storage
    }

    /// The node writes what a `Ready` asks to its storage through this.
    pub fn storage_mut(&mut self) -> &mut S {
        &mut self.raft.log.storage
    }

    pub fn has_ready(&self) -> bool {
        let r = &self.raft;
        r.proposals_unsent
            || !r.msgs.is_empty()
            || !r.msgs_after_persist.is_empty()
            || r.hard_state() != self.prev_hs
            || r.soft_state() != self.prev_ss
            || !r.log.unstable_to_persist().is_empty()
            || r.log.snapshot_to_persist().is_some()
            || r.log.has_next_committed()
            || !r.read_states.is_empty()
            || r.lease_changed
    }

    /// Takes the pending outputs.
    pub fn ready(&mut self) -> Ready {
        self.raft.flush_proposals();
        let number = self.next_number;
        self.next_number += 1;
        let r = &mut self.raft;
        let hs = r.hard_state();
        let ss = r.soft_state();
        let entries = r.log.unstable_to_persist().to_vec();
        let snapshot = r.log.snapshot_to_persist().cloned();
        r.log.accept_unstable();
        r.lease_changed = false;
        let committed_entries = r.log.next_committed(r.cfg.max_apply_bytes);
        if let Some(e) = committed_entries.last() {
            r.log.applying = e.index;
        }
        let ready = Ready {
            number,
            soft_state: (ss != self.prev_ss).then_some(ss),
            hard_state: (hs != self.prev_hs).then_some(hs),
            snapshot,
            entries,
            messages: std::mem::take(&mut r.msgs),
            persisted_messages: std::mem::take(&mut r.msgs_after_persist),
            committed_entries,
            read_states: std::mem::take(&mut r.read_states),
        };
        self.prev_hs = hs;
        self.prev_ss = ss;
        self.in_flight.push_back(InFlight {
            number,
            last: ready.entries.last().map(|e| (e.index, e.term)),
            hard_state: ready.hard_state,
            snapshot_index: ready.snapshot.as_ref().map(|s| s.meta.index),
        });
        ready
    }

    /// Every `Ready` up to `number` is durable (its writes are in storage).
    pub fn on_persisted(&mut self, number: u64) {
        while self.in_flight.front().is_some_and(|f| f.number <= number) {
            let Some(f) = self.in_flight.pop_front() else { break };
            let r = &mut self.raft;
            if let Some(idx) = f.snapshot_index {
                r.log.stable_snap_to(idx);
                // Installing the snapshot applied it to the state machine.
                r.log.applied_to(idx);
            }
            if let Some((i, t)) = f.last {
                r.log.stable_to(i, t);
            }
            if let Some(hs) = f.hard_state {
                if r.self_vote_pending && r.role == Role::Candidate && hs.term == r.term && hs.vote == r.id {
                    r.self_vote_pending = false;
                    let id = r.id;
                    r.trk.record_vote(id, true);
                    r.poll_and_act();
                }
            }
            self.raft.on_local_durable();
        }
    }

    /// The state machine applied everything up to `index`.
    pub fn on_applied(&mut self, index: u64) {
        self.raft.log.applied_to(index);
        self.raft.maybe_auto_leave();
    }

    pub fn role(&self) -> Role {
        self.raft.role
    }

    pub fn leader(&self) -> NodeId {
        self.raft.leader
    }

    pub fn term(&self) -> u64 {
        self.raft.term
    }

    pub fn conf_state(&self) -> ConfState {
        self.raft.trk.conf_state()
    }

    /// See [`Raft::leader_ready`].
    pub fn leader_ready(&self) -> bool {
        self.raft.leader_ready()
    }

    // ---- store liveness (see `fortify`) ----------------------------------------

    /// The node's store epoch (`support`); 0, the default, means no store
    /// liveness: no fortification, no lease.
    pub fn set_store_epoch(&mut self, epoch: u64) {
        self.raft.set_store_epoch(epoch);
    }

    /// The node's store withdrew its support of the store of `leader` at
    /// `epoch`: a promise this member made to it ends.
    pub fn support_withdrawn(&mut self, leader: NodeId, epoch: u64) {
        self.raft.support_withdrawn(leader, epoch);
    }

    /// What a leader's lease rests on (`None`: no lease to claim).
    pub fn lease_basis(&self) -> Option<crate::fortify::LeaseBasis> {
        self.raft.lease_basis()
    }

    /// Whether this member is a leader that may claim a lease (cheap: no
    /// [`crate::LeaseBasis`] is built).
    pub fn may_claim_lease(&self) -> bool {
        let r = &self.raft;
        r.role == Role::Leader && r.store_epoch != 0 && r.lease_disabled_term != r.term
    }

    /// The promise this member holds to a fortified leader, if any.
    pub fn fortification(&self) -> Option<crate::fortify::Fortification> {
        self.raft.fortified
    }

    /// Whether the next `Ready` will carry a snapshot to install (a node
    /// that pipelines its writes lets earlier ones land first).
    pub fn has_pending_snapshot(&self) -> bool {
        self.raft.log.snapshot_to_persist().is_some()
    }

    /// Whether the node must keep ticking this member (see `fortify`).
    pub fn needs_tick(&self) -> bool {
        self.raft.needs_tick()
    }

    /// A leader that stopped ticking and sending until something happens.
    pub fn quiesced(&self) -> bool {
        self.raft.quiesced
    }
}
