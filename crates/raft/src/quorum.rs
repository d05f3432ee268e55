//! Quorum arithmetic: the committed index and the outcome of a vote under a
//! majority configuration and under a joint one (both majorities must agree).

use std::collections::BTreeSet;

use crate::types::NodeId;

/// The outcome of a vote so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VoteResult {
    Pending,
    Lost,
    Won,
}

/// A set of voters deciding by simple majority.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MajorityConfig {
    pub voters: BTreeSet<NodeId>,
}

impl MajorityConfig {
    pub fn new(voters: impl IntoIterator<Item = NodeId>) -> Self {
        MajorityConfig {
            voters: voters.into_iter().collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.voters.is_empty()
    }

    /// The largest index that a majority has reached (`u64::MAX` for an empty
    /// configuration, so that it never holds back a joint configuration).
    pub fn committed_index(&self, acked: impl Fn(NodeId) -> Option<u64>) -> u64 {
        let n = self.voters.len();
        if n == 0 {
            return u64::MAX;
        }
        let mut v: Vec<u64> = self.voters.iter().map(|&id| acked(id).unwrap_or(0)).collect();
        v.sort_unstable_by(|a, b| b.cmp(a));
        v[n / 2]
    }

    pub fn vote_result(&self, votes: impl Fn(NodeId) -> Option<bool>) -> VoteResult {
        if self.voters.is_empty() {
            return VoteResult::Won;
        }
        let (mut yes, mut missing) = (0, 0);
        for &id in &self.voters {
            match votes(id) {
                Some(true) => yes += 1,
                Some(false) => {}
                None => missing += 1,
            }
        }
        let q = self.voters.len() / 2 + 1;
        if yes >= q {
            VoteResult::Won
        } else if yes + missing >= q {
            VoteResult::Pending
        } else {
            VoteResult::Lost
        }
    }
}

/// An incoming and an outgoing majority configuration; the outgoing one is empty
/// unless a membership change is in progress.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JointConfig {
    pub incoming: MajorityConfig,
    pub outgoing: MajorityConfig,
}

impl JointConfig {
    pub fn is_joint(&self) -> bool {
        !self.outgoing.is_empty()
    }

    pub fn contains(&self, id: NodeId) -> bool {
        self.incoming.voters.contains(&id) || self.outgoing.voters.contains(&id)
    }

    /// Every voter of either half.
    pub fn ids(&self) -> BTreeSet<NodeId> {
        self.incoming.voters.union(&self.outgoing.voters).copied().collect()
    }

    pub fn committed_index(&self, acked: impl Fn(NodeId) -> Option<u64>) -> u64 {
        let i = self.incoming.committed_index(&acked);
        let o = self.outgoing.committed_index(&acked);
        i.min(o)
    }

    pub fn vote_result(&self, votes: impl Fn(NodeId) -> Option<bool>) -> VoteResult {
        let i = self.incoming.vote_result(&votes);
        let o = self.outgoing.vote_result(&votes);
        match (i, o) {
            (VoteResult::Won, VoteResult::Won) => VoteResult::Won,
            (VoteResult::Lost, _) | (_, VoteResult::Lost) => VoteResult::Lost,
            _ => VoteResult::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn majority_committed_index_is_the_median_from_the_top() {
        let c = MajorityConfig::new([1, 2, 3]);
        let m: HashMap<u64, u64> = [(1, 5), (2, 7), (3, 2)].into();
        assert_eq!(c.committed_index(|id| m.get(&id).copied()), 5);
        let c = MajorityConfig::new([1, 2, 3, 4]);
        let m: HashMap<u64, u64> = [(1, 5), (2, 7), (3, 2), (4, 9)].into();
        assert_eq!(c.committed_index(|id| m.get(&id).copied()), 5);
        assert_eq!(MajorityConfig::default().committed_index(|_| None), u64::MAX);
    }

    #[test]
    fn joint_needs_both_halves() {
        let j = JointConfig {
            incoming: MajorityConfig::new([1, 2, 3]),
            outgoing: MajorityConfig::new([3, 4, 5]),
        };
        let m: HashMap<u64, u64> = [(1, 9), (2, 9), (3, 4), (4, 3), (5, 1)].into();
        assert_eq!(j.committed_index(|id| m.get(&id).copied()), 3);
        let v: HashMap<u64, bool> = [(1, true), (2, true)].into();
        assert_eq!(j.vote_result(|id| v.get(&id).copied()), VoteResult::Pending);
        let v: HashMap<u64, bool> = [(1, true), (2, true), (4, false), (5, false)].into();
        assert_eq!(j.vote_result(|id| v.get(&id).copied()), VoteResult::Lost);
        let v: HashMap<u64, bool> = [(1, true), (2, true), (3, true), (4, true)].into();
        assert_eq!(j.vote_result(|id| v.get(&id).copied()), VoteResult::Won);
    }
}
