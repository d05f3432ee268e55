//! A range's lock wait queues: requests that met another transaction's
//! intent on a key line up behind it, in arrival order. Every waiter
//! pushes the intent's transaction (so expiry and deadlocks are found
//! whoever is first), but once the intent is gone they evaluate again one
//! at a time, first come first: the next waits until the one before it
//! evaluated (and, if it writes, laid its own intent, which the next then
//! meets and waits for in turn). Without it, the waiters of a hot key would
//! race on every release and the unlucky ones could starve.
//!
//! A request holds at most one ticket at a time (it gives it up before it
//! waits for anything else), so the queues add no cycles of their own. It
//! only orders requests; it never evaluates or pushes.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::Notify;

#[derive(Default)]
struct Queue {
    /// The next ticket to hand out.
    next: u64,
    /// Tickets handed out and not yet dropped: the lowest has its turn.
    live: BTreeSet<u64>,
    notify: Arc<Notify>,
}

/// The wait queues of one range, by key.
#[derive(Default)]
pub struct LockTable {
    queues: Mutex<HashMap<Vec<u8>, Queue>>,
}

/// A place in the line of one key; its turn ends when it is dropped.
pub struct Ticket {
    table: Arc<LockTable>,
    key: Vec<u8>,
    n: u64,
}

impl LockTable {
    /// Takes a place at the end of `key`'s line.
    pub fn enqueue(self: &Arc<Self>, key: &[u8]) -> Ticket {
        let mut g = self.queues.lock();
        let q = g.entry(key.to_vec()).or_default();
        let n = q.next;
        q.next += 1;
        q.live.insert(n);
        Ticket {
            table: self.clone(),
            key: key.to_vec(),
            n,
        }
    }

    /// How many keys have someone waiting.
    pub fn len(&self) -> usize {
        self.queues.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Ticket {
    /// The key whose line it is in.
    pub fn key(&self) -> &[u8] {
        &self.key
    }

    /// Waits until every ticket taken before this one on its key was dropped.
    pub async fn turn(&self) {
        loop {
            let notify = {
                let g = self.table.queues.lock();
                match g.get(&self.key) {
                    Some(q) if q.live.first().is_some_and(|&f| f < self.n) => q.notify.clone(),
                    _ => return,
                }
            };
            let woken = notify.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            // Checked again after registering, so a drop in between is seen.
            {
                let g = self.table.queues.lock();
                if g.get(&self.key)
                    .is_none_or(|q| q.live.first().is_none_or(|&f| f >= self.n))
                {
                    return;
                }
            }
            woken.await;
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut g = self.table.queues.lock();
        let Some(q) = g.get_mut(&self.key) else { return };
        // Its turn is over, or it gave up before: either way it leaves.
        q.live.remove(&self.n);
        q.notify.notify_waiters();
        if q.live.is_empty() {
            g.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn waiters_take_their_turns_in_arrival_order() {
        let t = Arc::new(LockTable::default());
        let a = t.enqueue(b"k");
        let b = t.enqueue(b"k");
        let c = t.enqueue(b"k");
        let other = t.enqueue(b"j");
        // The first (and another key's) go at once.
        tokio::time::timeout(Duration::from_secs(1), a.turn()).await.unwrap();
        tokio::time::timeout(Duration::from_secs(1), other.turn())
            .await
            .unwrap();
        // The second waits for the first; the third for both.
        assert!(tokio::time::timeout(Duration::from_millis(50), b.turn()).await.is_err());
        let order = Arc::new(Mutex::new(Vec::new()));
        let (o1, o2) = (order.clone(), order.clone());
        let hc = tokio::spawn(async move {
            c.turn().await;
            o2.lock().push("c");
        });
        let hb = tokio::spawn(async move {
            b.turn().await;
            o1.lock().push("b");
            tokio::time::sleep(Duration::from_millis(30)).await;
            drop(b);
        });
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(order.lock().is_empty(), "nobody passes the first");
        drop(a);
        hb.await.unwrap();
        hc.await.unwrap();
        assert_eq!(*order.lock(), vec!["b", "c"]);
        drop(other);
        assert!(t.is_empty(), "lines with nobody left are gone");
    }

    #[tokio::test]
    async fn a_waiter_that_gives_up_leaves_the_line() {
        let t = Arc::new(LockTable::default());
        let a = t.enqueue(b"k");
        let b = t.enqueue(b"k");
        let c = t.enqueue(b"k");
        drop(b); // gave up before its turn
        assert!(
            tokio::time::timeout(Duration::from_millis(50), c.turn()).await.is_err(),
            "the first still has its turn"
        );
        drop(a);
        tokio::time::timeout(Duration::from_secs(1), c.turn()).await.unwrap();
    }
}
