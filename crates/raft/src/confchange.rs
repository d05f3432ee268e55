//! Membership change by joint consensus. A change enters a joint configuration
//! (old and new voters must both agree on everything) and the leader then leaves
//! it by proposing an empty change. One change is pending at a time; a change
//! takes effect on each member when that member applies it.

use std::collections::BTreeSet;

use crate::raft::{ProposeError, Raft};
use crate::storage::Storage;
use crate::types::{ConfChange, ConfChangeKind, ConfState, EntryPayload, NodeId, Role, NONE};

/// The configuration after entering the joint configuration `cc` describes.
pub fn enter_joint(cs: &ConfState, cc: &ConfChange) -> Result<ConfState, String> {
    if cs.is_joint() {
        return Err("already in a joint configuration".into());
    }
    if cc.changes.is_empty() {
        return Err("no changes".into());
    }
    let outgoing: BTreeSet<NodeId> = cs.voters.iter().copied().collect();
    let mut incoming = outgoing.clone();
    let mut learners: BTreeSet<NodeId> = cs.learners.iter().copied().collect();
    let mut learners_next = BTreeSet::new();
    for ch in &cc.changes {
        if ch.node == NONE {
            return Err("node id 0".into());
        }
        match ch.kind {
            ConfChangeKind::AddVoter => {
                incoming.insert(ch.node);
                learners.remove(&ch.node);
                learners_next.remove(&ch.node);
            }
            ConfChangeKind::AddLearner => {
                incoming.remove(&ch.node);
                if outgoing.contains(&ch.node) {
                    // A demoted voter stays a voter of the outgoing half.
                    learners_next.insert(ch.node);
                } else {
                    learners.insert(ch.node);
                }
            }
            ConfChangeKind::Remove => {
                incoming.remove(&ch.node);
                learners.remove(&ch.node);
                learners_next.remove(&ch.node);
            }
        }
    }
    if incoming.is_empty() {
        return Err("the change removes every voter".into());
    }
    Ok(ConfState {
        voters: incoming.into_iter().collect(),
        voters_outgoing: outgoing.into_iter().collect(),
        learners: learners.into_iter().collect(),
        learners_next: learners_next.into_iter().collect(),
    })
}

/// The configuration after leaving a joint one.
pub fn leave_joint(cs: &ConfState) -> Result<ConfState, String> {
    if !cs.is_joint() {
        return Err("not in a joint configuration".into());
    }
    let mut learners: BTreeSet<NodeId> = cs.learners.iter().copied().collect();
    learners.extend(cs.learners_next.iter().copied());
    Ok(ConfState {
        voters: cs.voters.clone(),
        voters_outgoing: Vec::new(),
        learners: learners.into_iter().collect(),
        learners_next: Vec::new(),
    })
}

/// The configuration `cc` leads to from `cs`.
pub fn apply_to(cs: &ConfState, cc: &ConfChange) -> Result<ConfState, String> {
    if cc.is_leave() {
        leave_joint(cs)
    } else {
        enter_joint(cs, cc)
    }
}

/// A committed membership change that did not fit the configuration it met
/// (the reason says why); it was applied as a no-op.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfChangeRefused(pub String);

impl std::fmt::Display for ConfChangeRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "configuration change refused: {}", self.0)
    }
}

impl std::error::Error for ConfChangeRefused {}

impl<S: Storage> Raft<S> {
    /// Proposes a membership change; returns the (index, term) it will have.
    pub fn propose_conf_change(&mut self, cc: ConfChange) -> Result<(u64, u64), ProposeError> {
        if self.role != Role::Leader {
            return Err(ProposeError::NotLeader { leader: self.leader });
        }
        if self.pending_conf_index > self.log.applied {
            return Err(ProposeError::ConfChangePending);
        }
        apply_to(&self.trk.conf_state(), &cc).map_err(ProposeError::InvalidConfChange)?;
        let r = self.propose_payload(EntryPayload::ConfChange(cc))?;
        self.pending_conf_index = r.0;
        Ok(r)
    }

    /// Whether a membership change is proposed and not yet applied (or this
    /// leader has not applied its term's first entry): no other may start.
    pub fn conf_change_pending(&self) -> bool {
        self.pending_conf_index > self.log.applied
    }

    /// Applies a committed membership change (the node calls this when it
    /// applies the entry) and returns the new configuration. A change that
    /// does not fit the configuration is refused, identically on every
    /// member, and the configuration stays as it was.
    pub fn apply_conf_change(&mut self, cc: &ConfChange) -> Result<ConfState, ConfChangeRefused> {
        let cs = self.trk.conf_state();
        let new = match apply_to(&cs, cc) {
            Ok(n) => n,
            Err(why) => {
                self.counters.invalid_conf_changes += 1;
                return Err(ConfChangeRefused(why));
            }
        };
        self.counters.conf_changes_applied += 1;
        let next = self.log.last_index() + 1;
        self.trk.set_conf(&new, next);
        if self.role == Role::Leader {
            if !self.trk.is_voter(self.id) {
                // Removed (or demoted): step down and let the others elect.
                let t = self.term;
                self.become_follower(t, NONE);
                return Ok(new);
            }
            if self.lead_transferee != NONE && !self.trk.is_voter(self.lead_transferee) {
                self.lead_transferee = NONE;
            }
            if self.maybe_commit() {
                self.bcast_append();
            } else {
                // New members start probing; the rest learn nothing new yet.
                let ids: Vec<NodeId> = self
                    .trk
                    .progress
                    .iter()
                    .filter(|(&id, p)| id != self.id && p.matched == 0)
                    .map(|(&id, _)| id)
                    .collect();
                for id in ids {
                    self.send_append(id);
                }
            }
        }
        Ok(new)
    }

    /// A leader in a joint configuration proposes to leave it once the joint
    /// configuration (and its own term's first entry) is applied.
    pub(crate) fn maybe_auto_leave(&mut self) {
        if self.role == Role::Leader
            && self.trk.voters.is_joint()
            && self.pending_conf_index <= self.log.applied
            && self.lead_transferee == NONE
        {
            let _ = self.propose_conf_change(ConfChange::leave_joint());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::ConfChangeSingle;

    fn cc(ch: &[(ConfChangeKind, NodeId)]) -> ConfChange {
        ConfChange {
            context: Vec::new(),
            changes: ch.iter().map(|&(kind, node)| ConfChangeSingle { kind, node }).collect(),
        }
    }

    #[test]
    fn enter_and_leave_joint() {
        let cs = ConfState::with_voters(&[1, 2, 3]);
        let j = enter_joint(&cs, &cc(&[(ConfChangeKind::AddVoter, 4), (ConfChangeKind::Remove, 1)])).unwrap();
        assert_eq!(j.voters, vec![2, 3, 4]);
        assert_eq!(j.voters_outgoing, vec![1, 2, 3]);
        assert!(enter_joint(&j, &cc(&[(ConfChangeKind::AddVoter, 5)])).is_err());
        let l = leave_joint(&j).unwrap();
        assert_eq!(l, ConfState::with_voters(&[2, 3, 4]));
        assert!(leave_joint(&l).is_err());
    }

    #[test]
    fn demotion_goes_through_learners_next() {
        let cs = ConfState::with_voters(&[1, 2, 3]);
        let j = enter_joint(&cs, &cc(&[(ConfChangeKind::AddLearner, 3)])).unwrap();
        assert_eq!(j.voters, vec![1, 2]);
        assert_eq!(j.learners_next, vec![3]);
        assert!(j.learners.is_empty());
        let l = leave_joint(&j).unwrap();
        assert_eq!(l.learners, vec![3]);
        assert!(enter_joint(
            &cs,
            &cc(&[
                (ConfChangeKind::Remove, 1),
                (ConfChangeKind::Remove, 2),
                (ConfChangeKind::Remove, 3)
            ])
        )
        .is_err());
    }
}
