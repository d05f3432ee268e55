//! Raft log truncation: a replica whose log holds more than a threshold of
//! applied entries drops its prefix, never past its durably applied index,
//! and, on a leader, never past what a live follower still needs unless that
//! follower lags so far that it will be sent a snapshot anyway. The truncated
//! index and term are persisted with the truncation.

use raft::{Role, Status};

use crate::replica::Replica;

/// Truncates `r`'s log (whose raft status is `st`) if it needs it.
pub fn consider(r: &mut Replica, st: &Status, threshold: u64) {
    let Some(to) = target(st, r.durable_applied, threshold) else {
        return;
    };
    match r.truncate_log(to) {
        Ok(()) => tracing::debug!(range = r.range_id, index = to, "raft log truncated"),
        Err(e) => tracing::warn!(range = r.range_id, error = %e, "raft log truncation failed"),
    }
}

/// The index to truncate the log to, if it holds enough to be worth it.
pub fn target(st: &Status, durable_applied: u64, threshold: u64) -> Option<u64> {
    let first = st.first_index;
    let mut target = durable_applied.min(st.applied);
    if target < first || target - first < threshold {
        return None;
    }
    if st.role == Role::Leader {
        for (&id, p) in &st.progress {
            if id != st.id && p.recent_active && p.matched + threshold >= target {
                target = target.min(p.matched);
            }
        }
    }
    if target < first || target - first < threshold / 2 {
        return None;
    }
    Some(target)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use raft::{ConfState, FollowerProgress, HardState, ProgressState, Role, Status};

    use super::target;

    fn status(role: Role, first: u64, applied: u64, followers: &[(u64, u64, bool)]) -> Status {
        let progress: BTreeMap<u64, FollowerProgress> = followers
            .iter()
            .map(|&(id, matched, recent_active)| {
                (
                    id,
                    FollowerProgress {
                        matched,
                        next: matched + 1,
                        state: ProgressState::Replicate,
                        recent_active,
                        is_learner: false,
                    },
                )
            })
            .collect();
        Status {
            id: 1,
            hard_state: HardState::default(),
            role,
            leader: 1,
            first_index: first,
            last_index: applied,
            applied,
            conf_state: ConfState::default(),
            leader_ready: role == Role::Leader,
            conf_change_pending: false,
            progress,
        }
    }

    #[test]
    fn truncates_only_past_the_threshold_and_what_is_durable() {
        let st = status(Role::Follower, 1, 500, &[]);
        assert_eq!(target(&st, 500, 100), Some(500));
        assert_eq!(target(&st, 50, 100), None, "not durably applied that far");
        assert_eq!(target(&status(Role::Follower, 450, 500, &[]), 500, 100), None);
    }

    #[test]
    fn a_leader_keeps_what_a_live_follower_still_needs_unless_it_is_far_behind() {
        // Follower 2 is live at 420: keep its entries. Follower 3 is silent.
        let st = status(Role::Leader, 1, 500, &[(1, 500, true), (2, 420, true), (3, 10, false)]);
        assert_eq!(target(&st, 500, 100), Some(420));
        // Follower 2 lags by more than the threshold: it will get a snapshot.
        let st = status(Role::Leader, 1, 500, &[(1, 500, true), (2, 300, true)]);
        assert_eq!(target(&st, 500, 100), Some(500));
        // Keeping a live follower's entries leaves too little to truncate.
        let st = status(Role::Leader, 400, 500, &[(1, 500, true), (2, 420, true)]);
        assert_eq!(target(&st, 500, 100), None);
    }
}
