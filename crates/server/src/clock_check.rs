//! The clock check: every raft batch carries its sender's physical clock; a
//! node whose clock is off from a quorum of its peers by more than the maximum
//! offset stops serving, and says why in its log and on `/health`.
//!
//! The estimate ignores network delay (loopback and LAN delays are far below
//! the 500 ms default), so it errs towards trusting a clock.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

pub struct ClockCheck {
    max_offset_nanos: i64,
    seen: Mutex<HashMap<u64, (i64, Instant)>>,
    /// Whether the last verdict was a problem (to log changes once).
    failing: AtomicBool,
}

/// Offsets older than this are not counted.
const FRESH: Duration = Duration::from_secs(10);

impl ClockCheck {
    pub fn new(max_offset: Duration) -> Self {
        ClockCheck {
            max_offset_nanos: max_offset.as_nanos().min(i64::MAX as u128) as i64,
            seen: Mutex::new(HashMap::new()),
            failing: AtomicBool::new(false),
        }
    }

    /// Records that `peer`'s clock read `remote` when ours read `local`.
    pub fn observe(&self, peer: u64, remote: u64, local: u64) {
        let offset = remote as i128 - local as i128;
        let offset = offset.clamp(i64::MIN as i128, i64::MAX as i128) as i64;
        self.seen.lock().insert(peer, (offset, Instant::now()));
    }

    /// Whether a peer's clock reading `remote` when ours read `local` is
    /// within the maximum offset.
    pub fn within_max_offset(&self, remote: u64, local: u64) -> bool {
        (remote as i128 - local as i128).abs() <= self.max_offset_nanos as i128
    }

    /// Why this node must not serve, if its clock is off from a quorum of the
    /// `peers` other nodes it should hear from. Logs when that starts and ends.
    pub fn problem(&self, peers: usize) -> Option<String> {
        let p = self.verdict(peers);
        let was = self.failing.swap(p.is_some(), Ordering::Relaxed);
        match (&p, was) {
            (Some(why), false) => tracing::error!("stopped serving: {why}"),
            (None, true) => tracing::info!("clock agrees with the peers again: serving"),
            _ => {}
        }
        p
    }

    fn verdict(&self, peers: usize) -> Option<String> {
        if peers == 0 {
            return None;
        }
        let now = Instant::now();
        let seen = self.seen.lock();
        let off: Vec<(u64, i64)> = seen
            .iter()
            .filter(|(_, (o, t))| now.duration_since(*t) < FRESH && o.abs() > self.max_offset_nanos)
            .map(|(&p, (o, _))| (p, *o))
            .collect();
        // With us, a quorum of the peers + 1 nodes: more than half the peers.
        if off.len() * 2 > peers {
            return Some(format!(
                "clock is off from {} of {} peers by more than {} ms (offsets in ms: {:?})",
                off.len(),
                peers,
                self.max_offset_nanos / 1_000_000,
                off.iter().map(|(p, o)| (p, o / 1_000_000)).collect::<Vec<_>>()
            ));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clock_off_from_a_quorum_is_reported_and_one_bad_peer_is_not_enough() {
        let c = ClockCheck::new(Duration::from_millis(500));
        let base = 1_000_000_000_000u64;
        c.observe(2, base + 2_000_000_000, base);
        assert!(c.problem(2).is_none(), "one of two peers off: not a quorum");
        c.observe(3, base + 1_900_000_000, base);
        assert!(c.problem(2).unwrap().contains("2 of 2 peers"));
        c.observe(3, base + 100_000_000, base);
        assert!(c.problem(2).is_none());
        assert!(c.problem(0).is_none());
    }
}
