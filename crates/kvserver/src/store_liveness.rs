//! Store liveness in the node: the raft crate's `SupportManager` (one per
//! store) on the monotonic clock, and the lease check readers make with it.
//!
//! Every other tick the raft loop asks every known store for support of this
//! store's epoch (one message per store pair, riding that cycle's frame);
//! answers extend the support this store counts on, requests extend what it
//! grants, and each tick withdraws grants that expired, releasing the
//! followers here that promised a leader on that store. A range leader's lease
//! is valid while a quorum of the voters that promised it are supported by,
//! as this store counts it (`lease_valid`): no per-range message keeps a
//! lease alive, which is what lets idle ranges quiesce.
//!
//! The epoch's incarnation (its high 32 bits) is the store's start count,
//! persisted and raised with a synced write before the store serves, so a
//! promise made to an earlier process never counts for this one.
//!
//! It never blocks on anything but its own short lock, and never sends: the
//! raft loop carries its messages.

use std::collections::BTreeMap;
use std::time::Instant;

use parking_lot::RwLock;
use raft::support::{first_epoch, SupportConfig, SupportManager, SupportMsg};
use raft::LeaseBasis;
use storage::Engine;

use crate::store::StoreConfig;
use crate::StoreError;

const INCARNATION_KEY: &[u8] = b"slincarnation";

/// What a leader's lease rests on, with the store of each replica named.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub basis: LeaseBasis,
    /// Replica id -> store id, for the replicas that promised.
    pub stores: BTreeMap<u64, u64>,
}

/// One store's liveness: what it is supported by and what it supports.
#[derive(Debug)]
pub struct StoreLiveness {
    base: Instant,
    sm: RwLock<SupportManager>,
}

impl StoreLiveness {
    /// Raises the store's persisted start count (synced) and starts its
    /// store liveness at the first epoch of that incarnation.
    pub fn open(engine: &Engine, store_id: u64, cfg: &StoreConfig) -> Result<StoreLiveness, StoreError> {
        let prev = match storage::rangestate::store_record(engine, INCARNATION_KEY)? {
            Some(b) => u64::from_be_bytes(
                b.as_slice()
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("store liveness incarnation record".into()))?,
            ),
            None => 0,
        };
        let inc = prev + 1;
        let mut b = engine.batch();
        storage::rangestate::set_store_record(&mut b, INCARNATION_KEY, &inc.to_be_bytes())?;
        engine.write(b, true)?;
        Ok(Self::new(store_id, inc, cfg))
    }

    /// Store liveness of incarnation `inc` (tests; `open` persists it).
    pub fn new(store_id: u64, inc: u64, cfg: &StoreConfig) -> StoreLiveness {
        let interval = cfg.support_interval();
        let r = cfg.clock_rate_error;
        let scfg = SupportConfig {
            interval: interval.as_nanos() as u64,
            requester_interval: interval.mul_f64((1.0 - r) / (1.0 + r)).as_nanos() as u64,
        };
        StoreLiveness {
            base: Instant::now(),
            sm: RwLock::new(SupportManager::new(store_id, first_epoch(inc), scfg)),
        }
    }

    /// `t` as the support manager's time (nanoseconds since this started).
    fn time(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.base).as_nanos() as u64
    }

    pub fn epoch(&self) -> u64 {
        self.sm.read().epoch()
    }

    /// The support manager's whole state, for debugging.
    pub fn dump(&self) -> String {
        format!("{:?}", *self.sm.read())
    }

    /// Requests for support to send to `peers` now.
    pub fn requests(&self, peers: impl Iterator<Item = u64>, now: Instant) -> Vec<SupportMsg> {
        let t = self.time(now);
        let sm = self.sm.read();
        peers.filter(|&p| p != sm.id()).map(|p| sm.request(p, t)).collect()
    }

    /// Handles a message from another store: the answer to send, and a
    /// support it ended (a requester that moved to a higher epoch).
    pub fn handle(&self, m: SupportMsg, now: Instant) -> (Option<SupportMsg>, Option<(u64, u64)>) {
        let t = self.time(now);
        self.sm.write().handle(m, t)
    }

    /// Withdraws the support that expired: (store, epoch) released.
    pub fn withdraw_expired(&self, now: Instant) -> Vec<(u64, u64)> {
        let t = self.time(now);
        self.sm.write().withdraw_expired(t)
    }

    /// Whether this store supports `store` at `epoch` now.
    pub fn supports(&self, store: u64, epoch: u64) -> bool {
        self.sm.read().supports(store, epoch)
    }

    /// What `lease` rests on at `now`, for operators: the epochs and, per
    /// voter that promised, its store and how long that store's support
    /// still runs (or why it does not count).
    pub fn describe(&self, lease: &Lease, now: Instant) -> String {
        let t = self.time(now);
        let sm = self.sm.read();
        let mut out = format!(
            "term {} epoch {:#x} (store now {:#x});",
            lease.basis.term,
            lease.basis.epoch,
            sm.epoch()
        );
        for r in lease.basis.promised() {
            let Some(&store) = lease.stores.get(&r) else {
                out.push_str(&format!(" r{r}: store unknown;"));
                continue;
            };
            if r == lease.basis.leader {
                out.push_str(&format!(" r{r}@s{store}: leader;"));
                continue;
            }
            let promised = lease.basis.promise_of(r);
            match sm.support_from(store) {
                None => out.push_str(&format!(" r{r}@s{store}: no support;")),
                Some((_, inc)) if Some(inc) != promised => out.push_str(&format!(
                    " r{r}@s{store}: support from incarnation {inc}, promise from {promised:?};"
                )),
                Some((until, _)) if until <= t => out.push_str(&format!(
                    " r{r}@s{store}: support ended {} ms ago;",
                    (t - until) / 1_000_000
                )),
                Some((until, _)) => out.push_str(&format!(
                    " r{r}@s{store}: supported for {} ms;",
                    (until - t) / 1_000_000
                )),
            }
        }
        out
    }

    /// Whether `lease` holds at `now`.
    pub fn lease_valid(&self, lease: &Lease, now: Instant) -> bool {
        let t = self.time(now);
        let sm = self.sm.read();
        let until = lease.basis.expiration(sm.epoch(), |replica| {
            let store = *lease.stores.get(&replica)?;
            sm.support_from(store)
        });
        until.is_some_and(|u| t < u)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn support_between_two_stores_and_its_withdrawal() {
        let cfg = StoreConfig::new("/nonexistent");
        let a = StoreLiveness::new(1, 1, &cfg);
        let b = StoreLiveness::new(2, 1, &cfg);
        let now = Instant::now();
        for req in a.requests([1, 2].into_iter(), now) {
            let (resp, _) = b.handle(req, now);
            a.handle(resp.expect("answer"), now);
        }
        assert!(b.supports(1, a.epoch()));
        let later = now + cfg.support_interval() * 2;
        assert_eq!(b.withdraw_expired(later), vec![(1, a.epoch())]);
        assert!(!b.supports(1, a.epoch()));
    }
}
