//! The store's raft tick timer.
//!
//! The leader lease rests on it: a follower refuses votes until it has
//! counted `election_ticks` ticks since it last heard its leader, and the
//! leader claims a lease of `(election_ticks - 1)` ticks of real time (less the
//! clock-rate bound) from the send time of a round the follower answered. That
//! holds only if consecutive ticks are at least one tick interval apart in
//! real time. So after every tick, the next is due one interval after the
//! moment this one was taken, however late this one came; a tick late after a
//! slow fsync or a long apply is never followed by a "catch-up" tick sooner
//! than one interval later. The tick rate only ever errs slow, which delays
//! elections and heartbeats a little and never shortens a promise.
//!
//! Time is passed in, so tests drive it with any sequence of instants.

use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct TickTimer {
    interval: Duration,
    next: Instant,
}

impl TickTimer {
    /// A timer whose first tick is due one interval after `now`.
    pub fn new(interval: Duration, now: Instant) -> TickTimer {
        TickTimer {
            interval,
            next: now + interval,
        }
    }

    /// How long from `now` until the next tick is due (zero if due).
    pub fn wait(&self, now: Instant) -> Duration {
        self.next.saturating_duration_since(now)
    }

    /// Whether a tick is due at `now`; if so, takes it: the next one is due
    /// one interval after `now`. At most one tick per call.
    pub fn take(&mut self, now: Instant) -> bool {
        if now < self.next {
            return false;
        }
        self.next = now + self.interval;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TICK: Duration = Duration::from_millis(100);

    /// Runs the timer over `polls` (offsets from the start, in ms) and returns
    /// when ticks were taken.
    fn ticks_at(polls: &[u64]) -> Vec<u64> {
        let t0 = Instant::now();
        let mut t = TickTimer::new(TICK, t0);
        polls
            .iter()
            .copied()
            .filter(|&ms| t.take(t0 + Duration::from_millis(ms)))
            .collect()
    }

    #[test]
    fn on_time_ticks_keep_their_cadence() {
        assert_eq!(ticks_at(&[50, 100, 150, 200, 300, 399, 400]), vec![100, 200, 300, 400]);
    }

    #[test]
    fn a_late_tick_is_never_followed_by_one_less_than_an_interval_later() {
        // The tick due at 200 comes at 290 (a slow fsync); the loop then polls
        // at 300, on the old cadence. A catch-up timer ticks there, 10 ms after
        // the late one, and a follower's election timeout would end ~90 ms
        // early while the leader's lease still runs.
        let got = ticks_at(&[100, 290, 300, 350, 389, 390, 480, 490]);
        assert_eq!(got, vec![100, 290, 390, 490]);
        for w in got.windows(2) {
            assert!(
                w[1] - w[0] >= 100,
                "ticks {} and {} closer than an interval",
                w[0],
                w[1]
            );
        }
    }

    #[test]
    fn after_a_long_stall_one_tick_then_the_cadence_resumes() {
        // A paused process resumes at 1000: one tick, not a burst of nine.
        assert_eq!(ticks_at(&[100, 1000, 1000, 1050, 1100]), vec![100, 1000, 1100]);
    }

    #[test]
    fn wait_says_how_long_until_the_next_tick() {
        let t0 = Instant::now();
        let mut t = TickTimer::new(TICK, t0);
        assert_eq!(t.wait(t0), TICK);
        assert!(t.take(t0 + Duration::from_millis(130)));
        assert_eq!(t.wait(t0 + Duration::from_millis(130)), TICK);
        assert_eq!(t.wait(t0 + Duration::from_millis(500)), Duration::ZERO);
    }
}
