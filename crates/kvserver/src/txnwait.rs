//! The store's transaction wait queue (CockroachDB's `txnwait`): pushes of
//! a pending transaction wait here, at the leaseholder of the range holding
//! its record, until it finishes; and it knows who waits for whom, which is
//! what deadlock detection reads.
//!
//! A push against P registers its pusher Q (and the transactions Q said wait
//! for it) under P. A `QueryTxn` for P answers with everyone registered
//! under P, directly or through others, so a pusher that finds its own
//! pushee among the transactions waiting for it has found a cycle. Pushers
//! re-register on every attempt, and entries not renewed within
//! `FORGET_AFTER` are forgotten, so the picture follows the waits as they
//! change and a moved lease loses nothing it cannot relearn.
//!
//! It holds memory only and decides nothing: the push (`txn_eval`) decides,
//! the pusher's loop (`intent_resolver`) breaks cycles.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::Notify;

/// A waiter not heard from for this long is forgotten.
const FORGET_AFTER: Duration = Duration::from_secs(2);
/// At most this many transactions are named as waiting for one (bounds the
/// answer of a query in a pile-up).
const MAX_WAITERS: usize = 1024;

type Id = [u8; 16];

#[derive(Default)]
struct Pushee {
    notify: Arc<Notify>,
    /// pusher -> (the transactions waiting for the pusher, last renewed)
    waiters: HashMap<Id, (Vec<Id>, Instant)>,
}

#[derive(Default)]
pub struct TxnWait {
    pushees: Mutex<HashMap<Id, Pushee>>,
}

impl TxnWait {
    pub fn new() -> TxnWait {
        TxnWait::default()
    }

    /// Registers a push of `pushee` by `pusher` (if the push is a
    /// transaction's) and returns what to wait on: notified when `pushee`
    /// finishes here.
    pub fn enqueue(&self, pushee: Id, pusher: Option<(Id, Vec<Id>)>) -> Arc<Notify> {
        let mut g = self.pushees.lock();
        let p = g.entry(pushee).or_default();
        if let Some((id, mut theirs)) = pusher {
            theirs.truncate(MAX_WAITERS);
            p.waiters.insert(id, (theirs, Instant::now()));
        }
        p.notify.clone()
    }

    /// `pushee` finished (committed or aborted): wakes its pushers.
    pub fn finish(&self, pushee: Id) {
        if let Some(p) = self.pushees.lock().remove(&pushee) {
            p.notify.notify_waiters();
        }
    }

    /// Stops counting `pusher` as waiting for `pushee`.
    pub fn dequeue(&self, pushee: Id, pusher: Id) {
        let mut g = self.pushees.lock();
        if let Some(p) = g.get_mut(&pushee) {
            p.waiters.remove(&pusher);
            if p.waiters.is_empty() && Arc::strong_count(&p.notify) == 1 {
                g.remove(&pushee);
            }
        }
    }

    /// Every transaction known to wait for `id`, directly or through others.
    pub fn waiters(&self, id: Id) -> Vec<Id> {
        let mut g = self.pushees.lock();
        let now = Instant::now();
        let mut out: HashSet<Id> = HashSet::new();
        if let Some(p) = g.get_mut(&id) {
            p.waiters.retain(|_, (_, at)| now.duration_since(*at) < FORGET_AFTER);
            for (w, (theirs, _)) in &p.waiters {
                out.insert(*w);
                out.extend(theirs.iter().copied());
            }
        }
        out.remove(&id);
        let mut v: Vec<Id> = out.into_iter().collect();
        v.sort_unstable();
        v.truncate(MAX_WAITERS);
        v
    }

    /// How many transactions have pushes waiting here.
    pub fn len(&self) -> usize {
        self.pushees.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waiters_are_known_transitively_and_finishing_wakes_pushers() {
        let q = TxnWait::new();
        let (a, b, c) = ([1u8; 16], [2u8; 16], [3u8; 16]);
        // b waits for a, and c was known to wait for b.
        let n = q.enqueue(a, Some((b, vec![c])));
        assert_eq!(q.waiters(a), vec![b, c]);
        assert!(q.waiters(b).is_empty(), "nobody registered under b here");
        // A transaction is never its own waiter.
        q.enqueue(a, Some((c, vec![a])));
        assert_eq!(q.waiters(a), vec![b, c]);
        let woken = n.notified();
        q.finish(a);
        tokio::time::timeout(Duration::from_secs(1), woken)
            .await
            .expect("woken");
        assert!(q.waiters(a).is_empty());
        q.enqueue(b, Some((a, vec![])));
        q.dequeue(b, a);
        assert!(q.waiters(b).is_empty());
        assert!(q.is_empty());
    }
}
