//! A range's concurrency control for requests evaluated before proposal:
//! its span latches (`spanlatch`), its timestamp cache (`tscache`) and its
//! lock wait queues (`lock_table`), in one place that request tasks reach
//! through the replica's status (the replica itself belongs to the raft
//! loop).
//!
//! Both are the leaseholder's and live only in memory. A new lease starts
//! with the cache's low-water mark at the lease's start: the clock at the
//! first request of the lease plus the maximum clock offset (`enter_lease`).
//! No read the previous leaseholder served can be above that (see
//! `docs/architecture.md`, "Latches and the timestamp cache"), so no write of
//! the new lease lands below one.
//!
//! It also keeps the range's request sampler for load-based splits
//! (`split_queue::LoadSampler`), which request tasks feed.
//!
//! This module holds state and answers questions; it never evaluates.

use std::fmt;

use parking_lot::Mutex;
use storage::Timestamp;

use crate::spanlatch::{self, Span};
use crate::split_queue::LoadSampler;
use crate::tscache::{Read, TsCache};
use storage::mvcc::TxnId;

/// How many read spans the timestamp cache keeps before forgetting the older
/// half (raising its low-water mark).
const TSCACHE_SPANS: usize = 64 * 1024;

pub struct Concurrency {
    pub latches: spanlatch::Manager,
    /// Requests waiting for other transactions' intents, by key.
    pub locks: std::sync::Arc<crate::lock_table::LockTable>,
    state: Mutex<State>,
    /// Requests sampled for load-based splitting.
    load: Mutex<LoadSampler>,
    /// Requests evaluated here (as leaseholder), for `debug ranges`.
    requests: std::sync::atomic::AtomicU64,
}

struct State {
    tscache: TsCache,
    /// The raft term of the lease the cache belongs to (0: none yet).
    lease_term: u64,
}

impl Default for Concurrency {
    fn default() -> Self {
        Concurrency {
            latches: spanlatch::Manager::new(),
            locks: Default::default(),
            state: Mutex::new(State {
                tscache: TsCache::new(Timestamp::ZERO, TSCACHE_SPANS),
                lease_term: 0,
            }),
            load: Mutex::new(LoadSampler::default()),
            requests: Default::default(),
        }
    }
}

impl fmt::Debug for Concurrency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.state.lock();
        f.debug_struct("Concurrency")
            .field("latched", &self.latches.len())
            .field("lease_term", &s.lease_term)
            .field("low_water", &s.tscache.low_water())
            .finish()
    }
}

impl Concurrency {
    /// Called by every request under the lease of raft term `term`: the
    /// first of a newer lease raises the low-water mark to `start()`.
    /// Returns the low-water mark.
    pub fn enter_lease<E>(&self, term: u64, start: impl FnOnce() -> Result<Timestamp, E>) -> Result<Timestamp, E> {
        let mut s = self.state.lock();
        if term > s.lease_term {
            // Only a start that was read marks the lease entered.
            let t = start()?;
            s.tscache.raise_low_water(t);
            s.lease_term = term;
        }
        Ok(s.tscache.low_water())
    }

    /// The lowest timestamp a write of `spans` may take: above every read
    /// of them the cache remembers (and above the low-water mark).
    pub fn min_write_ts(&self, spans: &[Span]) -> Timestamp {
        self.min_txn_write_ts(spans, None)
    }

    /// [`Concurrency::min_write_ts`] for a write of transaction `txn`: its
    /// own reads do not move it.
    pub fn min_txn_write_ts(&self, spans: &[Span], txn: Option<TxnId>) -> Timestamp {
        let s = self.state.lock();
        let above = |r: Read| {
            if r.txn.is_some() && r.txn == txn {
                r.ts
            } else {
                r.ts.next()
            }
        };
        spans
            .iter()
            .map(|sp| above(s.tscache.get_max_read(sp)))
            .max()
            .unwrap_or_else(|| s.tscache.low_water().next())
    }

    /// Records reads of `spans` at `ts`.
    pub fn record_reads(&self, spans: &[Span], ts: Timestamp) {
        self.record_txn_reads(spans, ts, None)
    }

    /// Records reads of `spans` at `ts` by `txn`.
    pub fn record_txn_reads(&self, spans: &[Span], ts: Timestamp, txn: Option<TxnId>) {
        let mut s = self.state.lock();
        for sp in spans {
            s.tscache.add_read(sp, Read { ts, txn });
        }
    }

    /// Counts a request at `key` toward load-based splitting.
    pub fn record_load(&self, key: &[u8]) {
        self.load.lock().record(key);
        self.requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Requests counted by `record_load`.
    pub fn requests(&self) -> u64 {
        self.requests.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// At the end of a load window: where to split, if the range was loaded
    /// above `qps` (see `split_queue::LoadSampler`).
    pub fn decide_load_split(&self, now: std::time::Instant, qps: u64) -> Option<Vec<u8>> {
        self.load.lock().decide(now, qps)
    }

    /// Raises the low-water mark (a merge: the right range's reads).
    pub fn raise_low_water(&self, ts: Timestamp) {
        self.state.lock().tscache.raise_low_water(ts);
    }

    /// The cache's low-water mark.
    pub fn low_water(&self) -> Timestamp {
        self.state.lock().tscache.low_water()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_lease_raises_the_low_water_mark_once_and_writes_go_above_reads() {
        let c = Concurrency::default();
        let at = |t: u64| move || Ok::<_, ()>(Timestamp::new(t, 0));
        // A start that cannot be read leaves the lease not entered.
        assert_eq!(c.enter_lease(3, || Err("clock")), Err("clock"));
        assert_eq!(c.enter_lease(3, at(100)), Ok(Timestamp::new(100, 0)));
        // Later requests of the same lease do not move it.
        assert_eq!(c.enter_lease(3, at(900)), Ok(Timestamp::new(100, 0)));
        let k = [Span::key(b"k")];
        assert_eq!(c.min_write_ts(&k), Timestamp::new(100, 0).next());
        c.record_reads(&[Span::range(b"a", b"z")], Timestamp::new(500, 0));
        assert_eq!(c.min_write_ts(&k), Timestamp::new(500, 1));
        assert_eq!(c.min_write_ts(&[Span::key(b"zz")]), Timestamp::new(100, 1));
        // A newer lease: the mark rises to its start.
        assert_eq!(c.enter_lease(5, at(700)), Ok(Timestamp::new(700, 0)));
        assert_eq!(c.min_write_ts(&[Span::key(b"zz")]), Timestamp::new(700, 1));
        // A stale term never lowers it.
        assert_eq!(c.enter_lease(4, at(1)), Ok(Timestamp::new(700, 0)));
    }
}
