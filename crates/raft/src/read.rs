//! Linearizable reads without a log write: ReadIndex (confirm leadership with a
//! heartbeat round acknowledged by a quorum). Leases are `fortify`'s.

use crate::raft::{PendingRead, Raft};
use crate::storage::Storage;
use crate::types::{MessageBody, NodeId, ReadState, Role, NONE};

impl<S: Storage> Raft<S> {
    pub(crate) fn committed_in_current_term(&self) -> bool {
        self.log.term_or_zero(self.log.committed) == self.term
    }

    /// Asks for a read index on behalf of `ctx`; the answer comes back as a
    /// `ReadState` in a later `Ready` (or never, if leadership is lost).
    pub fn read_index(&mut self, ctx: Vec<u8>) {
        self.unquiesce();
        match self.role {
            Role::Leader => self.handle_read_index(ctx, self.id),
            Role::Follower if self.leader != NONE => {
                let (leader, t) = (self.leader, self.term);
                self.send(leader, t, MessageBody::ReadIndex { ctx });
            }
            _ => {} // dropped: no leader to ask
        }
    }

    pub(crate) fn handle_read_index(&mut self, ctx: Vec<u8>, from: NodeId) {
        if self.role != Role::Leader {
            return;
        }
        if self.trk.is_single_voter(self.id) {
            let index = self.log.committed;
            self.respond_read(ctx, index, from);
            return;
        }
        if !self.committed_in_current_term() {
            // The commit index of a new leader may be stale until it commits
            // an entry of its own term.
            self.reads_waiting_commit.push((ctx, from));
            return;
        }
        let index = self.log.committed;
        self.bcast_heartbeat();
        let seq = self.hb_seq;
        self.pending_reads.push(PendingRead { ctx, index, seq, from });
        self.release_confirmed_reads();
    }

    fn respond_read(&mut self, ctx: Vec<u8>, index: u64, from: NodeId) {
        if from == self.id {
            self.read_states.push(ReadState { index, ctx });
        } else {
            let t = self.term;
            self.send(from, t, MessageBody::ReadIndexResponse { ctx, index });
        }
    }

    /// Answers every pending read whose heartbeat round a quorum acknowledged.
    pub(crate) fn release_confirmed_reads(&mut self) {
        if self.pending_reads.is_empty() {
            return;
        }
        let acked = self.trk.quorum_acked_seq();
        let (ready, waiting): (Vec<PendingRead>, Vec<PendingRead>) = std::mem::take(&mut self.pending_reads)
            .into_iter()
            .partition(|r| r.seq <= acked);
        self.pending_reads = waiting;
        for r in ready {
            self.respond_read(r.ctx, r.index, r.from);
        }
    }
}
