//! The clock check: every raft batch carries its sender's physical clock; a
//! node whose clock is off from a quorum of its peers by more than the maximum
//! offset stops serving, and says why in its log and on `/health`.
//!
//! A batch's stamp is older than its arrival by the delay it met (the network,
//! the sender's queue, a receiver that was paused and reads its backlog), so
//! one reading can make a good clock look behind; the estimate per peer is
//! the largest offset read within a short window, the one that met the least
//! delay. It ignores the remaining delay (loopback and LAN delays are far
//! below the 500 ms default), so it errs towards trusting a clock.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

pub struct ClockCheck {
    max_offset_nanos: i64,
    seen: Mutex<HashMap<u64, Estimate>>,
    /// Whether the last verdict was a problem (to log changes once).
    failing: AtomicBool,
}

/// Peers not heard from for this long are not counted.
const FRESH: Duration = Duration::from_secs(10);
/// How long the least-delayed reading stands for a peer's offset before a
/// later one may replace it even if it reads lower.
const WINDOW: Duration = Duration::from_secs(2);

/// One peer's offset as far as its batches tell.
#[derive(Debug, Clone, Copy)]
struct Estimate {
    /// The largest offset (remote minus local, nanoseconds) read since `since`.
    offset: i64,
    since: Instant,
    /// When the peer's last batch arrived.
    heard: Instant,
}

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
        self.observe_at(peer, remote, local, Instant::now());
    }

    fn observe_at(&self, peer: u64, remote: u64, local: u64, now: Instant) {
        let offset = remote as i128 - local as i128;
        let offset = offset.clamp(i64::MIN as i128, i64::MAX as i128) as i64;
        let mut seen = self.seen.lock();
        let e = seen.entry(peer).or_insert(Estimate {
            offset,
            since: now,
            heard: now,
        });
        if offset >= e.offset || now.duration_since(e.since) >= WINDOW {
            e.offset = offset;
            e.since = now;
        }
        e.heard = now;
    }

    /// Whether a peer's clock reading `remote` when ours read `local` is
    /// within the maximum offset.
    pub fn within_max_offset(&self, remote: u64, local: u64) -> bool {
        (remote as i128 - local as i128).abs() <= self.max_offset_nanos as i128
    }

    /// Why this node must not serve, if its clock is off from a quorum of the
    /// `peers` other nodes it should hear from. Logs when that starts and ends.
    pub fn problem(&self, peers: usize) -> Option<String> {
        let p = self.verdict_at(peers, Instant::now(), self.failing.load(Ordering::Relaxed));
        let was = self.failing.swap(p.is_some(), Ordering::Relaxed);
        match (&p, was) {
            (Some(why), false) => tracing::error!("stopped serving: {why}"),
            (None, true) => tracing::info!("clock agrees with the peers again: serving"),
            _ => {}
        }
        p
    }

    /// The verdict now. A node already failing counts a peer it has not heard
    /// from yet (it just learned of it) as disagreeing: no reading is no
    /// proof its clock is fine.
    fn verdict_at(&self, peers: usize, now: Instant, failing: bool) -> Option<String> {
        if peers == 0 {
            return None;
        }
        let seen = self.seen.lock();
        let fresh = |e: &&Estimate| now.duration_since(e.heard) < FRESH;
        let off: Vec<(u64, i64)> = seen
            .iter()
            .filter(|(_, e)| fresh(e) && e.offset.abs() > self.max_offset_nanos)
            .map(|(&p, e)| (p, e.offset))
            .collect();
        let agree = seen
            .values()
            .filter(|e| fresh(e) && e.offset.abs() <= self.max_offset_nanos)
            .count();
        // A node already failing counts the peers it has not heard from
        // with the ones that disagree: it resumes only on readings.
        let unheard = if failing {
            peers.saturating_sub(off.len() + agree)
        } else {
            0
        };
        // With us, a quorum of the peers + 1 nodes: more than half the peers.
        if (off.len() + unheard) * 2 > peers {
            let unheard_note = if unheard > 0 {
                format!("; {unheard} not heard from since")
            } else {
                String::new()
            };
            return Some(format!(
                "clock is off from {} of {} peers by more than {} ms (offsets in ms: {:?}){unheard_note}",
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
        // Fixed: the good reading counts once the bad one is a window old.
        let later = Instant::now() + WINDOW;
        c.observe_at(3, base + 100_000_000, base, later);
        assert!(c.verdict_at(2, later, true).is_none());
        assert!(c.problem(0).is_none());
    }

    /// A stopped node whose clock is fine again resumes with one peer down
    /// for good and the other agreeing: peers that are down never wedge it.
    #[test]
    fn a_stopped_node_resumes_with_a_peer_down_and_the_other_agreeing() {
        let c = ClockCheck::new(Duration::from_millis(500));
        let base = 1_000_000_000_000u64;
        let t0 = Instant::now();
        c.observe_at(1, base, base, t0);
        assert!(c.verdict_at(2, t0, true).is_none(), "one agreeing, one never heard");
        assert!(c.verdict_at(1, t0, true).is_none());
    }

    /// A node whose clock is off, and which learns of a new peer before it
    /// hears from it, stays stopped: it used to read "1 of 2 peers off, not
    /// a quorum" and serve again (a process test caught it under load).
    #[test]
    fn a_failing_node_resumes_only_when_a_quorum_of_peers_agrees() {
        let c = ClockCheck::new(Duration::from_millis(500));
        let base = 1_000_000_000_000u64;
        c.observe(1, base - 2_000_000_000, base);
        assert!(c.problem(1).is_some(), "off from its only peer");
        assert!(c.problem(2).is_some(), "a second peer, not heard yet");
        c.observe(3, base - 2_000_000_000, base);
        assert!(c.problem(2).unwrap().contains("2 of 2"));
        // Every peer silent (a partition): no readings, no resuming.
        let silent = Instant::now() + FRESH + WINDOW;
        assert!(c.verdict_at(2, silent, true).is_some(), "resumed on no readings");
        // Its clock is fixed: readings agree again.
        let later = Instant::now() + WINDOW;
        c.observe_at(1, base, base, later);
        c.observe_at(3, base, base, later);
        assert!(c.verdict_at(2, later, true).is_none());
    }

    #[test]
    fn a_backlog_read_after_a_pause_does_not_make_good_clocks_look_off() {
        // This node was paused for 3 s: the batches waiting in its socket
        // carry stamps from before the pause, read against a clock that went
        // on; the peers' readings from just before the pause still stand.
        let c = ClockCheck::new(Duration::from_millis(500));
        let t0 = Instant::now();
        let base = 1_000_000_000_000u64;
        c.observe_at(2, base, base, t0);
        c.observe_at(3, base, base, t0);
        let resumed = t0 + Duration::from_millis(1500);
        c.observe_at(2, base, base + 1_500_000_000, resumed);
        c.observe_at(3, base + 10_000_000, base + 1_500_000_000, resumed);
        assert!(
            c.verdict_at(2, resumed, false).is_none(),
            "delayed batches read as clock offsets"
        );
        // A peer whose clock really is behind is still found, by every
        // reading, as soon as it reads behind for a whole window.
        let mut t = resumed;
        for i in 0..30u64 {
            t += Duration::from_millis(100);
            let local = base + 1_600_000_000 + i * 100_000_000;
            c.observe_at(2, local - 2_000_000_000, local, t);
            c.observe_at(3, local - 2_000_000_000, local, t);
        }
        assert!(c.verdict_at(2, t, false).unwrap().contains("2 of 2 peers"));
    }
}
