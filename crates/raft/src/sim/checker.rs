//! The safety properties the simulator checks after every step, kept apart
//! from the world so that they can be tested on hand-made histories.
//!
//! - election safety: at most one leader per term;
//! - log matching: an (index, term) pair identifies the whole log prefix up to
//!   it (checked with chained hashes of every entry any node ever held);
//! - leader completeness: a new leader holds every entry known committed;
//! - state machine safety: no two nodes apply different entries at one index,
//!   and no node applies a command twice;
//! - lease safety: at no instant do two nodes believe they hold a valid lease;
//! - read safety: a read index is at least the commit index known when the
//!   read was requested.

use std::collections::{BTreeMap, HashMap};

use crate::types::{Entry, EntryPayload, NodeId};

/// Mixes an entry into the hash of the log prefix before it.
pub fn chain(prev: u64, e: &Entry) -> u64 {
    let payload = match &e.payload {
        EntryPayload::Empty => 0x1234_5678,
        EntryPayload::Normal(d) => d.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
        }),
        EntryPayload::ConfChange(cc) => cc
            .changes
            .iter()
            .fold(0x9e37u64, |h, c| h.rotate_left(7) ^ c.node ^ ((c.kind as u64) << 40)),
    };
    let mut z = prev ^ e.term.rotate_left(17) ^ payload ^ e.index.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// What the checker remembers across the whole run.
#[derive(Default)]
pub struct Checker {
    leaders: HashMap<u64, NodeId>,
    /// (index, term) -> hash of the log prefix ending there.
    prefixes: HashMap<(u64, u64), u64>,
    /// index -> hash of the applied prefix ending there.
    applied: HashMap<u64, u64>,
    /// index -> (hash of the committed prefix ending there, the lowest term
    /// of a node seen holding it committed: at or after the term it was
    /// committed in).
    committed: BTreeMap<u64, (u64, u64)>,
}

impl Checker {
    pub fn leader_elected(&mut self, term: u64, id: NodeId) -> Result<(), String> {
        match self.leaders.insert(term, id) {
            Some(other) if other != id => Err(format!(
                "election safety: nodes {other} and {id} both leader in term {term}"
            )),
            _ => Ok(()),
        }
    }

    /// A node's log holds an entry at (index, term) whose prefix hashes to `h`.
    pub fn log_entry(&mut self, node: NodeId, index: u64, term: u64, h: u64) -> Result<(), String> {
        match self.prefixes.get(&(index, term)) {
            Some(&known) if known != h => Err(format!(
                "log matching: node {node} holds entry ({index}, term {term}) with a different log before it"
            )),
            Some(_) => Ok(()),
            None => {
                self.prefixes.insert((index, term), h);
                Ok(())
            }
        }
    }

    /// A node applied the entry at `index`; `h` hashes the applied prefix.
    pub fn applied(&mut self, node: NodeId, index: u64, h: u64) -> Result<(), String> {
        match self.applied.get(&index) {
            Some(&known) if known != h => Err(format!(
                "state machine safety: node {node} applied a different entry at index {index}"
            )),
            Some(_) => Ok(()),
            None => {
                self.applied.insert(index, h);
                Ok(())
            }
        }
    }

    /// A node in `term` considers `index` committed, its log prefix hashing to `h`.
    pub fn committed(&mut self, node: NodeId, term: u64, index: u64, h: u64) -> Result<(), String> {
        match self.committed.get_mut(&index) {
            Some((known, _)) if *known != h => Err(format!(
                "commit safety: node {node} committed a different entry at index {index}"
            )),
            Some((_, t)) => {
                *t = (*t).min(term);
                Ok(())
            }
            None => {
                self.committed.insert(index, (h, term));
                Ok(())
            }
        }
    }

    /// The highest index known committed.
    pub fn highest_committed(&self) -> Option<u64> {
        self.committed.keys().next_back().copied()
    }

    /// A node became leader of `term` with log `chain` (index -> (term, prefix
    /// hash)), compacted below `first`: it must hold every entry committed in
    /// an earlier term.
    pub fn leader_complete(
        &self,
        node: NodeId,
        term: u64,
        first: u64,
        chain: &BTreeMap<u64, (u64, u64)>,
    ) -> Result<(), String> {
        let Some((c, h)) = self
            .committed
            .iter()
            .rev()
            .find(|(_, &(_, t))| t < term)
            .map(|(&i, &(h, _))| (i, h))
        else {
            return Ok(());
        };
        if c < first {
            return Ok(()); // in its snapshot: state machine safety covers it
        }
        match chain.get(&c) {
            Some(&(_, lh)) if lh == h => Ok(()),
            Some(_) => Err(format!(
                "leader completeness: leader {node} holds a different entry at committed index {c}"
            )),
            None => Err(format!("leader completeness: leader {node} lacks committed index {c}")),
        }
    }

    /// Nodes believing they hold a valid lease at this instant.
    pub fn lease_holders(&self, holders: &[NodeId], now: u64) -> Result<(), String> {
        if holders.len() > 1 {
            return Err(format!(
                "lease safety: nodes {holders:?} all believe they hold the lease at time {now}"
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_leaders_in_one_term_are_flagged() {
        let mut c = Checker::default();
        c.leader_elected(3, 1).unwrap();
        c.leader_elected(3, 1).unwrap();
        c.leader_elected(4, 2).unwrap();
        assert!(c.leader_elected(3, 2).unwrap_err().contains("election safety"));
    }

    #[test]
    fn diverging_applied_entries_are_flagged() {
        let mut c = Checker::default();
        let e1 = Entry {
            term: 1,
            index: 1,
            payload: EntryPayload::Normal(vec![1]),
        };
        let e1b = Entry {
            term: 1,
            index: 1,
            payload: EntryPayload::Normal(vec![2]),
        };
        c.applied(1, 1, chain(0, &e1)).unwrap();
        c.applied(2, 1, chain(0, &e1)).unwrap();
        assert!(c
            .applied(3, 1, chain(0, &e1b))
            .unwrap_err()
            .contains("state machine safety"));
    }

    #[test]
    fn same_index_and_term_with_different_prefix_breaks_log_matching() {
        let mut c = Checker::default();
        let a = Entry {
            term: 1,
            index: 1,
            payload: EntryPayload::Normal(vec![1]),
        };
        let b = Entry {
            term: 1,
            index: 1,
            payload: EntryPayload::Normal(vec![9]),
        };
        let x = Entry {
            term: 2,
            index: 2,
            payload: EntryPayload::Empty,
        };
        let ha = chain(chain(0, &a), &x);
        let hb = chain(chain(0, &b), &x);
        c.log_entry(1, 2, 2, ha).unwrap();
        assert!(c.log_entry(2, 2, 2, hb).unwrap_err().contains("log matching"));
    }

    #[test]
    fn a_leader_missing_a_committed_entry_is_flagged() {
        let mut c = Checker::default();
        c.committed(1, 3, 5, 55).unwrap();
        let mut chain = BTreeMap::new();
        chain.insert(4, (1, 44));
        assert!(c.leader_complete(2, 4, 1, &chain).unwrap_err().contains("lacks"));
        // A leader of an earlier term need not hold what a later term committed.
        c.leader_complete(2, 3, 1, &chain).unwrap();
        chain.insert(5, (2, 56));
        assert!(c.leader_complete(2, 4, 1, &chain).unwrap_err().contains("different"));
        chain.insert(5, (1, 55));
        c.leader_complete(2, 4, 1, &chain).unwrap();
        assert!(c.committed(3, 3, 5, 57).is_err());
    }

    #[test]
    fn two_lease_holders_are_flagged() {
        let c = Checker::default();
        c.lease_holders(&[1], 10).unwrap();
        assert!(c.lease_holders(&[1, 3], 10).unwrap_err().contains("lease safety"));
    }
}
