//! Span latches: the leaseholder's short-term isolation of requests that
//! evaluate before they are proposed (CockroachDB's `spanlatch` manager).
//!
//! A request declares the key spans it reads and writes, each at an MVCC
//! timestamp, and acquires them all at once before it evaluates; it holds
//! them until its write has applied (or its read is answered). Requests are
//! ordered by arrival: each waits for every *earlier* request whose latches
//! conflict with its own, and for nothing else, so conflicting requests run
//! in arrival order, disjoint ones in parallel, and there is no deadlock (a
//! request only ever waits on older ones).
//!
//! Two latches conflict when their spans overlap and:
//! - both write (whatever their timestamps: two writes of one key must be
//!   evaluated one after the other);
//! - one reads at `r` and the other writes at `w <= r` (the read must see
//!   that write, or the write must not slip under the read). A write above
//!   the read's timestamp does not concern the read: they proceed together.
//!
//! Reads never conflict with reads. A read of everything (non-MVCC) uses
//! `Timestamp::MAX`; a write that must exclude every read uses
//! `Timestamp::ZERO`.
//!
//! This module knows nothing of raft, storage or the network. Dropping a
//! guard, or the future that waits for one, releases the request's latches.
//! Lookup is a scan of the latches held (fine for the number of requests in
//! flight on one range; an interval tree can replace it without changing the
//! interface).

use std::collections::BTreeMap;
use std::sync::Arc;

use parking_lot::Mutex;
use storage::Timestamp;
use tokio::sync::watch;

/// A key span `[start, end)`; an empty `end` means the single key `start`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Span {
    pub start: Vec<u8>,
    pub end: Vec<u8>,
}

impl Span {
    pub fn key(k: &[u8]) -> Span {
        Span {
            start: k.to_vec(),
            end: Vec::new(),
        }
    }

    pub fn range(start: &[u8], end: &[u8]) -> Span {
        Span {
            start: start.to_vec(),
            end: end.to_vec(),
        }
    }

    /// The exclusive end: the key right after `start` for a single key.
    fn end_exclusive(&self) -> Vec<u8> {
        if self.end.is_empty() {
            let mut e = self.start.clone();
            e.push(0);
            e
        } else {
            self.end.clone()
        }
    }

    pub fn overlaps(&self, other: &Span) -> bool {
        self.start < other.end_exclusive() && other.start < self.end_exclusive()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

/// One latch a request asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Latch {
    pub span: Span,
    pub access: Access,
    pub ts: Timestamp,
}

impl Latch {
    pub fn read(span: Span, ts: Timestamp) -> Latch {
        Latch {
            span,
            access: Access::Read,
            ts,
        }
    }

    pub fn write(span: Span, ts: Timestamp) -> Latch {
        Latch {
            span,
            access: Access::Write,
            ts,
        }
    }

    /// Whether a request holding `self` and one holding `other` must not
    /// evaluate at the same time.
    pub fn conflicts(&self, other: &Latch) -> bool {
        if !self.span.overlaps(&other.span) {
            return false;
        }
        match (self.access, other.access) {
            (Access::Read, Access::Read) => false,
            (Access::Write, Access::Write) => true,
            (Access::Read, Access::Write) => other.ts <= self.ts,
            (Access::Write, Access::Read) => self.ts <= other.ts,
        }
    }
}

struct Held {
    latches: Vec<Latch>,
    /// Turns true when the request releases its latches.
    released: watch::Receiver<bool>,
}

#[derive(Default)]
struct State {
    next_seq: u64,
    /// Every request that holds or waits for latches, by arrival.
    requests: BTreeMap<u64, Held>,
}

/// The latches of one range.
#[derive(Clone, Default)]
pub struct Manager {
    state: Arc<Mutex<State>>,
}

/// Held latches; dropping it releases them.
pub struct Guard {
    seq: u64,
    state: Arc<Mutex<State>>,
    release: watch::Sender<bool>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.state.lock().requests.remove(&self.seq);
        let _ = self.release.send(true);
    }
}

impl Manager {
    pub fn new() -> Manager {
        Manager::default()
    }

    /// Acquires `latches` for one request: waits until every earlier
    /// request with a conflicting latch has released its own. Cancelling
    /// the wait (dropping the future) gives up the place in line.
    pub async fn acquire(&self, latches: Vec<Latch>) -> Guard {
        let (tx, rx) = watch::channel(false);
        let (guard, mut waits) = {
            let mut st = self.state.lock();
            let seq = st.next_seq;
            st.next_seq += 1;
            let waits: Vec<watch::Receiver<bool>> = st
                .requests
                .values()
                .filter(|h| h.latches.iter().any(|a| latches.iter().any(|b| a.conflicts(b))))
                .map(|h| h.released.clone())
                .collect();
            st.requests.insert(seq, Held { latches, released: rx });
            (
                Guard {
                    seq,
                    state: self.state.clone(),
                    release: tx,
                },
                waits,
            )
        };
        for w in &mut waits {
            // An error means the sender is gone: released as well.
            let _ = w.wait_for(|released| *released).await;
        }
        guard
    }

    /// How many requests hold or wait for latches.
    pub fn len(&self) -> usize {
        self.state.lock().requests.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use super::*;

    fn ts(w: u64) -> Timestamp {
        Timestamp::new(w, 0)
    }

    /// Whether `acquire(latches)` completes within a short while.
    async fn gets(m: &Manager, latches: Vec<Latch>) -> Option<Guard> {
        tokio::time::timeout(Duration::from_millis(50), m.acquire(latches))
            .await
            .ok()
    }

    #[test]
    fn the_conflict_rule() {
        let k = Span::key(b"k");
        assert!(!Latch::read(k.clone(), ts(5)).conflicts(&Latch::read(k.clone(), ts(5))));
        assert!(Latch::write(k.clone(), ts(5)).conflicts(&Latch::write(k.clone(), ts(9))));
        // A read must see a write at or below its timestamp...
        assert!(Latch::read(k.clone(), ts(5)).conflicts(&Latch::write(k.clone(), ts(5))));
        assert!(Latch::write(k.clone(), ts(3)).conflicts(&Latch::read(k.clone(), ts(5))));
        // ...and does not care about one above it.
        assert!(!Latch::read(k.clone(), ts(5)).conflicts(&Latch::write(k.clone(), ts(6))));
        // Spans: a key, its extension, a range holding it, and disjoint ones.
        assert!(Span::range(b"a", b"c").overlaps(&Span::key(b"b")));
        assert!(!Span::range(b"a", b"b").overlaps(&Span::key(b"b")));
        assert!(!Span::key(b"k").overlaps(&Span::key(b"k\x00")));
        assert!(Span::key(b"k").overlaps(&Span::range(b"k", b"k\x00")));
        assert!(!Latch::write(Span::key(b"a"), ts(1)).conflicts(&Latch::write(Span::key(b"b"), ts(1))));
    }

    #[tokio::test]
    async fn conflicting_requests_wait_in_arrival_order_and_disjoint_ones_do_not() {
        let m = Manager::new();
        let w1 = gets(&m, vec![Latch::write(Span::key(b"k"), ts(1))]).await.unwrap();
        // Disjoint and non-conflicting requests proceed at once.
        let other = gets(&m, vec![Latch::write(Span::key(b"zz"), ts(1))]).await;
        assert!(other.is_some());
        let above = gets(&m, vec![Latch::read(Span::key(b"k"), ts(0))]).await;
        assert!(above.is_some(), "a read below the write does not wait");
        drop(above);
        // A read at or above the write waits, and so does a later write
        // behind it, in order.
        let order = Arc::new(Mutex::new(Vec::new()));
        let (m2, o2) = (m.clone(), order.clone());
        let r2 = tokio::spawn(async move {
            let g = m2.acquire(vec![Latch::read(Span::range(b"a", b"z"), ts(5))]).await;
            o2.lock().push("r2");
            tokio::time::sleep(Duration::from_millis(20)).await;
            drop(g);
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        let (m3, o3) = (m.clone(), order.clone());
        let w3 = tokio::spawn(async move {
            let _g = m3.acquire(vec![Latch::write(Span::key(b"m"), ts(2))]).await;
            o3.lock().push("w3");
        });
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(order.lock().is_empty(), "both wait behind w1 (w3 behind r2)");
        drop(w1);
        r2.await.unwrap();
        w3.await.unwrap();
        assert_eq!(*order.lock(), vec!["r2", "w3"]);
        drop(other);
        assert!(m.is_empty());
    }

    #[tokio::test]
    async fn a_cancelled_wait_gives_up_its_place() {
        let m = Manager::new();
        let w1 = gets(&m, vec![Latch::write(Span::key(b"k"), ts(1))]).await.unwrap();
        // Waits behind w1, then its caller gives up.
        assert!(gets(&m, vec![Latch::write(Span::key(b"k"), ts(2))]).await.is_none());
        drop(w1);
        assert!(
            gets(&m, vec![Latch::write(Span::key(b"k"), ts(3))]).await.is_some(),
            "a request that gave up blocks nobody"
        );
        assert!(m.is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_two_conflicting_latches_are_ever_held_at_once() {
        let m = Manager::new();
        let held: Arc<Mutex<Vec<(u64, Latch)>>> = Arc::default();
        let broken = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for i in 0..64u64 {
            let (m, held, broken) = (m.clone(), held.clone(), broken.clone());
            tasks.push(tokio::spawn(async move {
                let mut rng = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                let mut next = || {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng
                };
                for round in 0..20 {
                    let a = b'a' + (next() % 6) as u8;
                    let b = a + 1 + (next() % 3) as u8;
                    let span = if next() % 2 == 0 {
                        Span::key(&[a])
                    } else {
                        Span::range(&[a], &[b])
                    };
                    let t = ts(next() % 4);
                    let latch = if next() % 2 == 0 {
                        Latch::read(span, t)
                    } else {
                        Latch::write(span, t)
                    };
                    let g = m.acquire(vec![latch.clone()]).await;
                    let id = i * 1000 + round;
                    {
                        let mut h = held.lock();
                        if h.iter().any(|(_, l)| l.conflicts(&latch)) {
                            broken.store(true, Ordering::SeqCst);
                        }
                        h.push((id, latch));
                    }
                    tokio::task::yield_now().await;
                    held.lock().retain(|(x, _)| *x != id);
                    drop(g);
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert!(
            !broken.load(Ordering::SeqCst),
            "two conflicting latches were held at once"
        );
        assert!(m.is_empty());
    }
}
