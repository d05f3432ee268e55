//! Store liveness: support that one store grants another for an interval,
//! renewed by one message per store pair, on which leader leases rest (as
//! CockroachDB's leader leases rest on its store liveness).
//!
//! A store asks each peer for support of its current *epoch*; the peer
//! (the supporter) grants it until `now + interval` on its own clock and
//! promises not to withdraw it before then. The requester counts on it only
//! until `sent_at + interval * (1 - r) / (1 + r)` on *its* clock, measured
//! from when it sent the request, so its belief ends first whatever the two
//! clocks' rates (within `r`) and the network delay. A supporter that hears
//! no renewal withdraws its support once the grant expires, and from then on
//! refuses that epoch: the requester learns it must take a higher epoch,
//! which makes every promise given to its old one worthless. An epoch also
//! rises when a store restarts: its high 32 bits are the store's
//! *incarnation* (its restart count), so a promise of a forgotten process
//! never counts for a new one.
//!
//! A supporter forgets its grants when it restarts; it then refuses to vote
//! for one interval (raft's restart quiet period), by which time every grant
//! it made has expired on the requester's side.
//!
//! Pure: time is a number the caller passes (nanoseconds of a monotonic
//! clock in the node, time units in the simulator). No I/O, no clock.

use std::collections::BTreeMap;

/// A store (in a raft group: the store of a member).
pub type StoreId = u64;

/// The incarnation of a store epoch: the restart count it was taken in.
pub fn incarnation(epoch: u64) -> u64 {
    epoch >> 32
}

/// The first epoch of incarnation `n` (a store's restart count).
pub fn first_epoch(n: u64) -> u64 {
    n << 32
}

/// A message between two stores' support managers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SupportMsg {
    /// `from` asks `to` to support its `epoch`; `sent_at` is `from`'s time.
    Request {
        from: StoreId,
        to: StoreId,
        epoch: u64,
        sent_at: u64,
    },
    /// `from` granted `epoch` (echoing the request's `sent_at`), or refused
    /// it (`granted: false`) because it withdrew that epoch: `epoch` is then
    /// the lowest it will support.
    Response {
        from: StoreId,
        to: StoreId,
        epoch: u64,
        granted: bool,
        sent_at: u64,
        /// The supporter's incarnation (its restart count).
        incarnation: u64,
    },
}

impl SupportMsg {
    pub fn to(&self) -> StoreId {
        match *self {
            SupportMsg::Request { to, .. } | SupportMsg::Response { to, .. } => to,
        }
    }
    pub fn from(&self) -> StoreId {
        match *self {
            SupportMsg::Request { from, .. } | SupportMsg::Response { from, .. } => from,
        }
    }
}

/// How long support lasts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SupportConfig {
    /// How long a grant lasts on the supporter's clock.
    pub interval: u64,
    /// How long the requester counts on it, from its send time: the interval
    /// shrunk by the clock-rate bound, `interval * (1 - r) / (1 + r)`.
    pub requester_interval: u64,
}

/// Planted bugs for the simulator's mutation tests (test builds only).
#[cfg(test)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SupportMutations {
    /// The requester counts on a grant for twice the supporter's interval.
    pub extend_past_interval: bool,
}

/// A support this store granted a requester.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Grant {
    epoch: u64,
    expiration: u64,
    /// Withdrawn: `epoch` is then the lowest epoch it will grant again.
    withdrawn: bool,
}

/// One store's support state: what it has from its peers and what it gives.
#[derive(Clone, Debug)]
pub struct SupportManager {
    id: StoreId,
    epoch: u64,
    cfg: SupportConfig,
    /// Support this store has: peer -> (epoch, expiration on this clock,
    /// the peer's incarnation that granted it).
    from: BTreeMap<StoreId, (u64, u64, u64)>,
    /// Support this store gives: requester -> its grant.
    given: BTreeMap<StoreId, Grant>,
    #[cfg(test)]
    pub mutations: SupportMutations,
}

impl SupportManager {
    /// A manager for store `id` starting at `epoch` (take
    /// `first_epoch(restart count)`).
    pub fn new(id: StoreId, epoch: u64, cfg: SupportConfig) -> Self {
        SupportManager {
            id,
            epoch,
            cfg,
            from: BTreeMap::new(),
            given: BTreeMap::new(),
            #[cfg(test)]
            mutations: SupportMutations::default(),
        }
    }

    pub fn id(&self) -> StoreId {
        self.id
    }

    /// This store's current epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The request to send peer `to` now.
    pub fn request(&self, to: StoreId, now: u64) -> SupportMsg {
        SupportMsg::Request {
            from: self.id,
            to,
            epoch: self.epoch,
            sent_at: now,
        }
    }

    /// Handles a message addressed to this store. Returns the answer to
    /// send, if any, and the support this withdrew on the way (a requester
    /// that moved to a higher epoch gave up its old one), if any.
    pub fn handle(&mut self, m: SupportMsg, now: u64) -> (Option<SupportMsg>, Option<(StoreId, u64)>) {
        match m {
            SupportMsg::Request {
                from, epoch, sent_at, ..
            } => {
                let mut ended = None;
                let grant = match self.given.get(&from).copied() {
                    Some(g) if epoch < g.epoch => {
                        // Below what it withdrew (or moved past): refused.
                        let answer = SupportMsg::Response {
                            from: self.id,
                            to: from,
                            epoch: g.epoch,
                            granted: false,
                            sent_at,
                            incarnation: incarnation(self.epoch),
                        };
                        return (Some(answer), None);
                    }
                    Some(g) if g.epoch == epoch && !g.withdrawn => Grant {
                        epoch,
                        expiration: g.expiration.max(now + self.cfg.interval),
                        withdrawn: false,
                    },
                    other => {
                        if let Some(g) = other {
                            if !g.withdrawn {
                                // The requester moved to a higher epoch.
                                ended = Some((from, g.epoch));
                            }
                        }
                        Grant {
                            epoch,
                            expiration: now + self.cfg.interval,
                            withdrawn: false,
                        }
                    }
                };
                self.given.insert(from, grant);
                let answer = SupportMsg::Response {
                    from: self.id,
                    to: from,
                    epoch,
                    granted: true,
                    sent_at,
                    incarnation: incarnation(self.epoch),
                };
                (Some(answer), ended)
            }
            SupportMsg::Response {
                from,
                epoch,
                granted,
                sent_at,
                incarnation: inc,
                ..
            } => {
                if !granted {
                    if epoch > self.epoch {
                        // Our epoch was withdrawn: every promise to it is
                        // void; leaders must fortify their ranges again.
                        self.epoch = epoch;
                        self.from.clear();
                    }
                    return (None, None);
                }
                if epoch != self.epoch {
                    return (None, None); // for an epoch this store left
                }
                #[cfg(test)]
                let len = if self.mutations.extend_past_interval {
                    2 * self.cfg.interval
                } else {
                    self.cfg.requester_interval
                };
                #[cfg(not(test))]
                let len = self.cfg.requester_interval;
                let until = sent_at + len;
                let e = self.from.entry(from).or_insert((epoch, 0, inc));
                if inc < e.2 {
                    // A late answer of a process that has since restarted:
                    // it must not displace the newer incarnation's support.
                    return (None, None);
                }
                if e.2 != inc {
                    // A restarted supporter: nothing of its earlier grants
                    // carries over (it forgot them).
                    *e = (epoch, 0, inc);
                }
                e.1 = e.1.max(until);
                (None, None)
            }
        }
    }

    /// Withdraws every grant that expired by `now`; returns them as
    /// (requester, epoch). Followers that promised not to vote while they
    /// support a leader at one of these epochs are released.
    pub fn withdraw_expired(&mut self, now: u64) -> Vec<(StoreId, u64)> {
        let mut out = Vec::new();
        for (&s, g) in self.given.iter_mut() {
            if !g.withdrawn && g.expiration <= now {
                out.push((s, g.epoch));
                g.withdrawn = true;
                g.epoch += 1;
            }
        }
        out
    }

    /// Whether this store supports `store` at `epoch` (granted, not
    /// withdrawn: it keeps its promise until it withdraws).
    pub fn supports(&self, store: StoreId, epoch: u64) -> bool {
        self.given.get(&store).is_some_and(|g| g.epoch == epoch && !g.withdrawn)
    }

    /// Until when (this store's clock) `store` supports this store's
    /// current epoch, as far as this store may count on it, and the
    /// incarnation of `store` that granted it.
    pub fn support_from(&self, store: StoreId) -> Option<(u64, u64)> {
        if store == self.id {
            return Some((u64::MAX, incarnation(self.epoch)));
        }
        self.from
            .get(&store)
            .filter(|(e, ..)| *e == self.epoch)
            .map(|&(_, until, inc)| (until, inc))
    }

    /// The stores this store currently supports, with their epochs.
    pub fn supported(&self) -> Vec<(StoreId, u64)> {
        self.given
            .iter()
            .filter(|(_, g)| !g.withdrawn)
            .map(|(&s, g)| (s, g.epoch))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: SupportConfig = SupportConfig {
        interval: 100,
        requester_interval: 90,
    };

    fn exchange(a: &mut SupportManager, b: &mut SupportManager, t_send: u64, t_recv: u64, t_back: u64) {
        let req = a.request(b.id(), t_send);
        let (resp, _) = b.handle(req, t_recv);
        a.handle(resp.expect("answer"), t_back);
    }

    #[test]
    fn grant_renew_and_requester_counts_less_than_the_supporter_promises() {
        let mut a = SupportManager::new(1, first_epoch(0), CFG);
        let mut b = SupportManager::new(2, first_epoch(0), CFG);
        exchange(&mut a, &mut b, 10, 15, 20);
        assert_eq!(a.support_from(2), Some((100, 0)));
        assert!(b.supports(1, a.epoch()));
        // The supporter's promise (15 + 100) outlasts the requester's belief.
        assert!(b.withdraw_expired(100).is_empty());
        exchange(&mut a, &mut b, 50, 55, 60);
        assert_eq!(a.support_from(2), Some((140, 0)));
        assert!(b.withdraw_expired(154).is_empty());
        assert_eq!(b.withdraw_expired(155), vec![(1, a.epoch())]);
        assert!(!b.supports(1, a.epoch()));
    }

    #[test]
    fn a_withdrawn_epoch_is_refused_and_the_requester_moves_on() {
        let mut a = SupportManager::new(1, first_epoch(0), CFG);
        let mut b = SupportManager::new(2, first_epoch(0), CFG);
        exchange(&mut a, &mut b, 0, 1, 2);
        b.withdraw_expired(200);
        // A late request of the old epoch is refused, and the requester
        // drops every support of its old epoch.
        exchange(&mut a, &mut b, 210, 211, 212);
        assert_eq!(a.epoch(), first_epoch(0) + 1);
        assert_eq!(a.support_from(2), None);
        assert!(!b.supports(1, first_epoch(0)));
        exchange(&mut a, &mut b, 220, 221, 222);
        assert!(b.supports(1, first_epoch(0) + 1));
        assert_eq!(a.support_from(2), Some((310, 0)));
    }

    #[test]
    fn a_new_epoch_ends_the_old_grant() {
        let mut a = SupportManager::new(1, first_epoch(0), CFG);
        let mut b = SupportManager::new(2, first_epoch(0), CFG);
        exchange(&mut a, &mut b, 0, 1, 2);
        // Store 1 restarted: incarnation 1.
        let a2 = SupportManager::new(1, first_epoch(1), CFG);
        let req = a2.request(2, 5);
        let (_, ended) = b.handle(req, 6);
        assert_eq!(ended, Some((1, first_epoch(0))));
        assert!(b.supports(1, first_epoch(1)));
        assert_eq!(incarnation(a2.epoch()), 1);
    }

    #[test]
    fn a_late_answer_of_a_restarted_supporter_does_not_displace_the_new_one() {
        let mut a = SupportManager::new(1, first_epoch(0), CFG);
        let mut old_b = SupportManager::new(2, first_epoch(0), CFG);
        let late = old_b.handle(a.request(2, 0), 1).0.expect("answer");
        let mut new_b = SupportManager::new(2, first_epoch(1), CFG);
        exchange(&mut a, &mut new_b, 10, 11, 12);
        assert_eq!(a.support_from(2), Some((100, 1)));
        a.handle(late, 13);
        assert_eq!(
            a.support_from(2),
            Some((100, 1)),
            "the newer incarnation's support stays"
        );
    }

    #[test]
    fn stale_grants_for_an_old_epoch_do_not_count() {
        let mut a = SupportManager::new(1, first_epoch(0), CFG);
        let mut b = SupportManager::new(2, first_epoch(0), CFG);
        let old = a.request(2, 0);
        exchange(&mut a, &mut b, 1, 2, 3);
        b.withdraw_expired(500);
        exchange(&mut a, &mut b, 501, 502, 503); // refused: a moves to epoch +1
        let (resp, _) = b.handle(old, 504);
        // Granted? No: the old epoch is withdrawn.
        assert!(matches!(resp, Some(SupportMsg::Response { granted: false, .. })));
        a.handle(resp.expect("answer"), 505);
        assert_eq!(a.support_from(2), None);
    }
}
