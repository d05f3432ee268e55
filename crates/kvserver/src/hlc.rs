//! The hybrid logical clock of a node: wall nanoseconds plus a logical counter.
//!
//! `now()` never goes backwards and never repeats; `update()` pulls the clock
//! forward to any timestamp seen in a message or an applied write. A restarted
//! node must never issue a timestamp below one it issued before: the clock
//! keeps a persisted upper bound on the wall times it may issue, raised (and
//! made durable by the caller's `persist` function) before it is reached, and a
//! restarting node starts above the last bound it persisted.
//!
//! The physical clock is injected, so tests and simulations control time.

use std::sync::Arc;

use parking_lot::Mutex;
use storage::Timestamp;

/// Where wall time comes from.
pub trait WallClock: Send + Sync {
    /// Nanoseconds since the Unix epoch.
    fn now_nanos(&self) -> u64;
}

/// The system's real-time clock.
pub struct SystemClock;

impl WallClock for SystemClock {
    fn now_nanos(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    }
}

/// Persists a new upper bound on issued wall times; must be durable on return.
pub type PersistBound = Box<dyn Fn(u64) -> Result<(), String> + Send + Sync>;

struct State {
    last: Timestamp,
    /// Wall times at or above this may not be issued until it is raised.
    bound: u64,
}

/// A node's hybrid logical clock.
pub struct Clock {
    wall: Arc<dyn WallClock>,
    state: Mutex<State>,
    persist: PersistBound,
    /// How far ahead of the physical clock each persisted bound reaches.
    window: u64,
}

/// The clock could not persist its upper bound: it must not issue timestamps.
#[derive(Debug, thiserror::Error)]
#[error("clock: cannot persist its upper bound: {0}")]
pub struct ClockError(String);

impl Clock {
    /// A clock that starts above `persisted_bound` (read from the store).
    pub fn new(wall: Arc<dyn WallClock>, persisted_bound: u64, persist: PersistBound) -> Clock {
        Clock {
            wall,
            state: Mutex::new(State {
                last: Timestamp::new(persisted_bound, 0),
                bound: persisted_bound,
            }),
            persist,
            window: 2_000_000_000,
        }
    }

    /// The physical time, for lease-free uses (metrics, logs).
    pub fn physical(&self) -> u64 {
        self.wall.now_nanos()
    }

    /// A new timestamp, above every one issued or seen before.
    pub fn now(&self) -> Result<Timestamp, ClockError> {
        let phys = self.wall.now_nanos();
        let mut s = self.state.lock();
        let next = if phys > s.last.wall {
            Timestamp::new(phys, 0)
        } else {
            s.last.next()
        };
        self.ensure_bound(&mut s, next.wall)?;
        s.last = next;
        Ok(next)
    }

    /// Pulls the clock up to `seen` (from a message or an applied write).
    pub fn update(&self, seen: Timestamp) -> Result<(), ClockError> {
        let mut s = self.state.lock();
        if seen > s.last {
            self.ensure_bound(&mut s, seen.wall)?;
            s.last = seen;
        }
        Ok(())
    }

    fn ensure_bound(&self, s: &mut State, wall: u64) -> Result<(), ClockError> {
        if wall < s.bound {
            return Ok(());
        }
        let new_bound = wall.saturating_add(self.window);
        (self.persist)(new_bound).map_err(ClockError)?;
        s.bound = new_bound;
        Ok(())
    }

    /// The last timestamp issued or seen.
    pub fn last(&self) -> Timestamp {
        self.state.lock().last
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    struct Manual(AtomicU64);
    impl WallClock for Manual {
        fn now_nanos(&self) -> u64 {
            self.0.load(Ordering::SeqCst)
        }
    }

    fn clock(start: u64, bound: u64) -> (Arc<Manual>, Arc<AtomicU64>, Clock) {
        let wall = Arc::new(Manual(AtomicU64::new(start)));
        let persisted = Arc::new(AtomicU64::new(bound));
        let p = persisted.clone();
        let c = Clock::new(
            wall.clone(),
            bound,
            Box::new(move |b| {
                p.store(b, Ordering::SeqCst);
                Ok(())
            }),
        );
        (wall, persisted, c)
    }

    #[test]
    fn timestamps_strictly_increase_even_when_the_wall_clock_stalls_or_jumps_back() {
        let (wall, _, c) = clock(1_000, 0);
        let a = c.now().unwrap();
        let b = c.now().unwrap();
        assert!(b > a);
        wall.0.store(500, Ordering::SeqCst);
        let d = c.now().unwrap();
        assert!(d > b);
        c.update(Timestamp::new(9_000, 3)).unwrap();
        assert!(c.now().unwrap() > Timestamp::new(9_000, 3));
    }

    #[test]
    fn a_restarted_clock_never_issues_below_what_it_issued_before() {
        let (wall, persisted, c) = clock(10_000, 0);
        let mut last = Timestamp::ZERO;
        for i in 0..100 {
            wall.0.store(10_000 + i * 7, Ordering::SeqCst);
            last = c.now().unwrap();
        }
        assert!(
            persisted.load(Ordering::SeqCst) > last.wall,
            "the bound covers what was issued"
        );
        // Restart with the wall clock set back an hour: still above `last`.
        let bound = persisted.load(Ordering::SeqCst);
        let (_, _, c2) = clock(1, bound);
        assert!(c2.now().unwrap() > last);
    }

    #[test]
    fn a_clock_that_cannot_persist_its_bound_refuses_to_issue() {
        let wall = Arc::new(Manual(AtomicU64::new(5)));
        let c = Clock::new(wall, 0, Box::new(|_| Err("disk full".into())));
        assert!(c.now().is_err());
    }
}
