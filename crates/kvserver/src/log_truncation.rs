//! Raft log truncation: a replica whose log holds more than a threshold of
//! applied entries drops its prefix, never past its durably applied index,
//! and, on a leader, never past what a live follower still needs unless that
//! follower lags so far that it will be sent a snapshot anyway. The truncated
//! index and term are persisted with the truncation.

use raft::{Role, Status};

use crate::replica::Replica;
use crate::StoreError;

/// Truncates the log of every replica that needs it.
pub fn run<'a>(replicas: impl Iterator<Item = &'a mut Replica>, threshold: u64) {
    for r in replicas {
        match maybe_truncate(r, threshold) {
            Ok(Some(i)) => tracing::debug!(range = r.range_id, index = i, "raft log truncated"),
            Ok(None) => {}
            Err(e) => tracing::warn!(range = r.range_id, error = %e, "raft log truncation failed"),
        }
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

fn maybe_truncate(r: &mut Replica, threshold: u64) -> Result<Option<u64>, StoreError> {
    let st = r.raw.status();
    // What the state machine applied, not what raft was told: the same here.
    let Some(to) = target(&st, r.durable_applied.min(r.applied_index()), threshold) else {
        return Ok(None);
    };
    r.truncate_log(to)?;
    Ok(Some(to))
}
