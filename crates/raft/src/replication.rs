//! Log replication: the leader's appends, heartbeats and snapshots with flow
//! control, the follower's log-matching check with fast backtracking, and the
//! leader's commit rule (a quorum of durable copies of an entry of its term).

use crate::progress::ProgressState;
use crate::raft::Raft;
use crate::storage::{Storage, StorageError};
use crate::types::{Message, MessageBody, NodeId, Role, Snapshot, NONE};

impl<S: Storage> Raft<S> {
    /// Sends appends (or snapshots) to every other member, filling each
    /// replicating follower's flow-control window.
    pub(crate) fn bcast_append(&mut self) {
        let ids: Vec<NodeId> = self.trk.progress.keys().copied().filter(|&id| id != self.id).collect();
        for id in ids {
            if self.maybe_send_append(id, true) {
                while self.maybe_send_append(id, false) {}
            }
        }
    }

    pub(crate) fn send_append(&mut self, to: NodeId) {
        self.maybe_send_append(to, true);
    }

    /// Sends the next append to `to` if flow control allows; with
    /// `send_if_empty`, even one without entries (to carry the commit index or
    /// probe). Returns whether a message was sent.
    pub(crate) fn maybe_send_append(&mut self, to: NodeId, send_if_empty: bool) -> bool {
        let (max_msgs, max_bytes, max_msg) = (
            self.cfg.max_inflight_msgs,
            self.cfg.max_inflight_bytes,
            self.cfg.max_msg_bytes,
        );
        let Some(pr) = self.trk.progress.get(&to) else {
            return false;
        };
        if pr.is_paused(max_msgs, max_bytes) {
            return false;
        }
        let next = pr.next;
        let prev = next - 1;
        let last = self.log.last_index();
        let log_term = self.log.term(prev);
        let ents = self.log.slice(next, last + 1, max_msg);
        let (log_term, ents) = match (log_term, ents) {
            (Ok(t), Ok(e)) => (t, e),
            (Err(StorageError::Unavailable), _) | (_, Err(StorageError::Unavailable)) => return false,
            _ => return self.send_snapshot(to),
        };
        if ents.is_empty() && !send_if_empty {
            return false;
        }
        let bytes: u64 = ents.iter().map(|e| e.size()).sum();
        let last_sent = ents.last().map(|e| e.index);
        let commit = self.log.committed;
        let Some(pr) = self.trk.progress.get_mut(&to) else {
            return false;
        };
        match pr.state {
            ProgressState::Replicate => {
                if let Some(l) = last_sent {
                    pr.next = l + 1;
                    pr.inflights.add(l, bytes);
                }
            }
            ProgressState::Probe => pr.probe_sent = true,
            ProgressState::Snapshot { .. } => return false,
        }
        let t = self.term;
        self.send(
            to,
            t,
            MessageBody::Append {
                log_term,
                index: prev,
                entries: ents,
                commit,
            },
        );
        true
    }

    /// Sends a snapshot to a follower that needs compacted entries.
    fn send_snapshot(&mut self, to: NodeId) -> bool {
        let Some(pr) = self.trk.progress.get(&to) else {
            return false;
        };
        if !pr.recent_active {
            return false; // don't ship a snapshot to a member that may be down
        }
        let snap = match self.log.storage.snapshot(pr.next.saturating_sub(1), to) {
            Ok(s) => s,
            Err(_) => return false, // temporarily unavailable: try again later
        };
        if snap.meta.index == 0 {
            return false;
        }
        let idx = snap.meta.index;
        if let Some(pr) = self.trk.progress.get_mut(&to) {
            pr.become_snapshot(idx);
        }
        self.counters.snapshots_sent += 1;
        let t = self.term;
        self.send(to, t, MessageBody::Snapshot { snapshot: snap });
        true
    }

    /// Starts a heartbeat round (lease and read-index confirmation).
    pub(crate) fn bcast_heartbeat(&mut self) {
        self.hb_seq += 1;
        let seq = self.hb_seq;
        if let Some(p) = self.trk.progress.get_mut(&self.id) {
            p.acked_seq = seq;
        }
        let commit = self.log.committed;
        #[cfg(test)]
        let full = self.cfg.mutations.heartbeat_full_commit;
        #[cfg(not(test))]
        let full = false;
        // Never more than the follower is known to hold: it could otherwise
        // commit entries of its own that the leader's log does not have.
        let targets: Vec<(NodeId, u64)> = self
            .trk
            .progress
            .iter()
            .filter(|(&id, _)| id != self.id)
            .map(|(&id, p)| (id, if full { commit } else { p.matched.min(commit) }))
            .collect();
        let t = self.term;
        for (id, c) in targets {
            self.send(id, t, MessageBody::Heartbeat { commit: c, seq });
        }
        self.release_confirmed_reads();
    }

    // ---- follower side -------------------------------------------------------

    /// Accepts appends up to `index` (sent once that is durable).
    fn send_append_ack(&mut self, to: NodeId, index: u64) {
        let t = self.term;
        self.send(
            to,
            t,
            MessageBody::AppendResponse {
                index,
                reject: false,
                hint_index: 0,
                hint_term: 0,
            },
        );
    }

    pub(crate) fn handle_append(&mut self, m: Message) {
        let MessageBody::Append {
            log_term,
            index,
            entries,
            commit,
        } = m.body
        else {
            return;
        };
        let t = self.term;
        if index < self.log.committed {
            let c = self.log.committed;
            self.send_append_ack(m.from, c);
            return;
        }
        #[cfg(test)]
        if self.cfg.mutations.skip_log_matching && index <= self.log.last_index() {
            // Planted bug: take the entries without checking that our log
            // matches the leader's at `index`.
            let last_new = index + entries.len() as u64;
            if !entries.is_empty() && entries[0].index > self.log.committed {
                self.log.append(&entries);
            }
            self.log.commit_to(commit.min(last_new));
            self.send_append_ack(m.from, last_new);
            return;
        }
        match self.log.maybe_append(index, log_term, commit, &entries) {
            Some(last_new) => self.send_append_ack(m.from, last_new),
            None => {
                let (hint_index, hint_term) = self
                    .log
                    .find_conflict_by_term(index.min(self.log.last_index()), log_term);
                self.send(
                    m.from,
                    t,
                    MessageBody::AppendResponse {
                        index,
                        reject: true,
                        hint_index,
                        hint_term,
                    },
                );
            }
        }
    }

    pub(crate) fn handle_heartbeat(&mut self, from: NodeId, commit: u64, seq: u64) {
        let c = commit.min(self.log.last_index());
        self.log.commit_to(c);
        let t = self.term;
        let fortified = self.fortified_by(from);
        self.send(from, t, MessageBody::HeartbeatResponse { seq, fortified });
    }

    pub(crate) fn handle_snapshot(&mut self, from: NodeId, snap: Snapshot) {
        let index = if self.restore(snap) {
            self.counters.snapshots_restored += 1;
            self.log.last_index()
        } else {
            self.log.committed
        };
        self.send_append_ack(from, index);
    }

    /// Installs a snapshot if it is news; returns whether it was installed.
    fn restore(&mut self, snap: Snapshot) -> bool {
        if snap.meta.index <= self.log.committed {
            return false;
        }
        let cs = &snap.meta.conf_state;
        let member = cs
            .voters
            .iter()
            .chain(&cs.voters_outgoing)
            .chain(&cs.learners)
            .chain(&cs.learners_next)
            .any(|&id| id == self.id);
        if !member {
            return false; // a snapshot of a configuration we are not part of
        }
        if self.log.match_term(snap.meta.index, snap.meta.term) {
            // We already have the log up to it: just commit.
            self.log.commit_to(snap.meta.index);
            return false;
        }
        let cs = cs.clone();
        self.log.restore(snap);
        let next = self.log.last_index() + 1;
        self.trk.set_conf(&cs, next);
        true
    }

    // ---- leader side ---------------------------------------------------------

    pub(crate) fn handle_append_response(
        &mut self,
        from: NodeId,
        index: u64,
        reject: bool,
        hint_index: u64,
        hint_term: u64,
    ) {
        if reject {
            let mut probe = hint_index;
            if hint_term > 0 {
                probe = self.log.find_conflict_by_term(hint_index, hint_term).0;
            }
            let Some(pr) = self.trk.progress.get_mut(&from) else {
                return;
            };
            if pr.maybe_decr_to(index, probe) {
                if pr.state == ProgressState::Replicate {
                    pr.become_probe();
                }
                self.send_append(from);
            }
            return;
        }
        let first_index = self.log.first_index();
        let (max_msgs, max_bytes) = (self.cfg.max_inflight_msgs, self.cfg.max_inflight_bytes);
        let Some(pr) = self.trk.progress.get_mut(&from) else {
            return;
        };
        let was_paused = pr.is_paused(max_msgs, max_bytes);
        if !pr.maybe_update(index) {
            return;
        }
        match pr.state {
            ProgressState::Probe => pr.become_replicate(),
            ProgressState::Snapshot { pending } => {
                if pr.matched >= pending || pr.matched + 1 >= first_index {
                    pr.become_probe();
                    pr.become_replicate();
                }
            }
            ProgressState::Replicate => pr.inflights.free_to(index),
        }
        let matched = pr.matched;
        if self.maybe_commit() {
            self.bcast_append();
        } else if was_paused {
            self.send_append(from);
        }
        while self.maybe_send_append(from, false) {}
        if from == self.lead_transferee && matched == self.log.last_index() {
            self.send_timeout_now(from);
        }
    }

    pub(crate) fn handle_heartbeat_response(&mut self, from: NodeId, seq: u64) {
        let last = self.log.last_index();
        let Some(pr) = self.trk.progress.get_mut(&from) else {
            return;
        };
        if seq > pr.acked_seq && seq <= self.hb_seq {
            pr.acked_seq = seq;
        }
        match pr.state {
            ProgressState::Probe => pr.probe_sent = false,
            // Appends that filled the window may all have been lost: free one
            // slot so that an append goes out and finds out.
            ProgressState::Replicate if pr.is_paused(self.cfg.max_inflight_msgs, self.cfg.max_inflight_bytes) => {
                pr.inflights.free_first()
            }
            _ => {}
        }
        let behind = pr.matched < last;
        if behind {
            self.send_append(from);
        }
        self.release_confirmed_reads();
    }

    /// Advances the commit index to what a quorum holds durably, if that entry
    /// is of this leader's term. Returns whether it advanced.
    pub(crate) fn maybe_commit(&mut self) -> bool {
        let mci = self.trk.committed_index();
        if mci == u64::MAX {
            return false;
        }
        #[cfg(test)]
        if self.cfg.mutations.commit_old_term {
            // Planted bug: count replicas of an older term's entry.
            let to = mci.min(self.log.last_index());
            if to > self.log.committed {
                self.log.commit_to(to);
                self.after_commit();
                return true;
            }
            return false;
        }
        let t = self.term;
        if self.log.maybe_commit(mci, t) {
            self.after_commit();
            return true;
        }
        false
    }

    fn after_commit(&mut self) {
        // Reads that waited for this leader's first commit can go now.
        if self.committed_in_current_term() && !self.reads_waiting_commit.is_empty() {
            let waiting = std::mem::take(&mut self.reads_waiting_commit);
            for (ctx, from) in waiting {
                self.handle_read_index(ctx, from);
            }
        }
    }

    /// The node made entries durable: a leader counts itself for them.
    pub(crate) fn on_local_durable(&mut self) {
        if self.role != Role::Leader {
            return;
        }
        let durable = self.log.durable_index();
        let Some(p) = self.trk.progress.get_mut(&self.id) else {
            return;
        };
        if p.maybe_update(durable) && self.maybe_commit() {
            self.bcast_append();
        }
    }

    /// The transport could not reach `to`: stop pipelining to it.
    pub fn report_unreachable(&mut self, to: NodeId) {
        if let Some(pr) = self.trk.progress.get_mut(&to) {
            if pr.state == ProgressState::Replicate {
                pr.become_probe();
            }
        }
    }

    /// The transport finished sending a snapshot to `to` (or failed to).
    pub fn report_snapshot(&mut self, to: NodeId, ok: bool) {
        if self.role != Role::Leader {
            return;
        }
        if let Some(pr) = self.trk.progress.get_mut(&to) {
            if let ProgressState::Snapshot { .. } = pr.state {
                if !ok {
                    // Forget the snapshot: probing restarts from what it has.
                    pr.state = ProgressState::Snapshot { pending: 0 };
                }
                pr.become_probe();
                // Wait for the follower's answer (or the next heartbeat) before probing.
                pr.probe_sent = true;
            }
        }
    }

    pub(crate) fn send_timeout_now(&mut self, to: NodeId) {
        // From here on this leader must not serve lease reads in this term: the
        // transferee may win without waiting for anyone's lease.
        self.lease_disabled_term = self.term;
        // A full election timeout from now for the transferee to win before
        // this leader gives up (see `tick_heartbeat`).
        self.election_elapsed = 0;
        let t = self.term;
        self.send(to, t, MessageBody::TimeoutNow);
    }

    /// Starts transferring leadership to `to` (a voter). Proposals are refused
    /// until it ends (leadership changes, or an election timeout passes).
    pub fn transfer_leader(&mut self, to: NodeId) {
        if self.role != Role::Leader || to == self.id || to == NONE || !self.trk.is_voter(to) {
            return;
        }
        if self.lead_transferee == to {
            return;
        }
        self.unquiesce();
        self.lead_transferee = to;
        self.election_elapsed = 0;
        self.counters.transfers_started += 1;
        let caught_up = self
            .trk
            .progress
            .get(&to)
            .is_some_and(|p| p.matched == self.log.last_index());
        if caught_up {
            self.send_timeout_now(to);
        } else {
            self.send_append(to);
        }
    }
}
