//! The timestamp cache: for each key span, the highest timestamp at which it
//! was read by this leaseholder (CockroachDB's `tscache`). A write evaluated
//! at or below a read of its key must move above it, so no read ever sees a
//! value that a later write changes underneath it: that is what makes reads
//! serializable against writes without locks held for a read.
//!
//! It keeps disjoint spans, each with the highest read timestamp over it, and
//! a low-water mark: every key was read at the low-water mark at most, as far
//! as the cache can say. A new lease starts the cache at the lease's start
//! time (earlier leaseholders' reads are below it). To bound memory the cache
//! may forget entries, raising the low-water mark to the highest timestamp it
//! forgets, so an answer can be too high (a write moves up for no reason)
//! but never too low.
//!
//! Each span also keeps the reading transaction when one alone read it at
//! its highest timestamp, so a transaction writes over its own reads
//! without moving (its other reads are at the same read timestamp, and any
//! read hidden under a higher one is below that). Two readers at one
//! timestamp keep no transaction: a write moves above both.
//! This module knows nothing of raft, storage or the network.

use std::collections::BTreeMap;

use storage::mvcc::TxnId;
use storage::Timestamp;

use crate::spanlatch::Span;

/// The highest read of a span: its timestamp and the transaction that read
/// there, if exactly one did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Read {
    pub ts: Timestamp,
    pub txn: Option<TxnId>,
}

impl Read {
    fn max(self, o: Read) -> Read {
        match self.ts.cmp(&o.ts) {
            std::cmp::Ordering::Greater => self,
            std::cmp::Ordering::Less => o,
            std::cmp::Ordering::Equal => Read {
                ts: self.ts,
                txn: if self.txn == o.txn { self.txn } else { None },
            },
        }
    }
}

/// The cache of one range's leaseholder.
#[derive(Debug)]
pub struct TsCache {
    low_water: Timestamp,
    /// start -> (exclusive end, highest read); spans never overlap.
    spans: BTreeMap<Vec<u8>, (Vec<u8>, Read)>,
    max_spans: usize,
}

impl TsCache {
    /// An empty cache whose every key reads as `low_water`, keeping at most
    /// `max_spans` spans before it forgets the oldest reads.
    pub fn new(low_water: Timestamp, max_spans: usize) -> TsCache {
        TsCache {
            low_water,
            spans: BTreeMap::new(),
            max_spans: max_spans.max(2),
        }
    }

    pub fn low_water(&self) -> Timestamp {
        self.low_water
    }

    /// Raises the low-water mark (never lowers it), forgetting what it covers.
    pub fn raise_low_water(&mut self, ts: Timestamp) {
        if ts > self.low_water {
            self.low_water = ts;
            self.spans.retain(|_, (_, r)| r.ts > ts);
        }
    }

    /// Records a read of `span` at `ts` (by no transaction).
    pub fn add(&mut self, span: &Span, ts: Timestamp) {
        self.add_read(span, Read { ts, txn: None })
    }

    /// Records a read of `span` at `read.ts` by `read.txn`.
    pub fn add_read(&mut self, span: &Span, ts: Read) {
        if ts.ts <= self.low_water {
            return;
        }
        let (start, end) = bounds(span);
        if start >= end {
            return;
        }
        // Split the spans that straddle `start` or `end`, so every stored span
        // is either inside [start, end) or outside it.
        self.split_at(&start);
        self.split_at(&end);
        // Within [start, end): raise the covered pieces, fill the gaps.
        let inside: Vec<(Vec<u8>, Vec<u8>, Read)> = self
            .spans
            .range(start.clone()..end.clone())
            .map(|(s, (e, t))| (s.clone(), e.clone(), *t))
            .collect();
        let mut cursor = start.clone();
        for (s, e, t) in inside {
            if cursor < s {
                self.spans.insert(cursor.clone(), (s.clone(), ts));
            }
            self.spans.insert(s, (e.clone(), t.max(ts)));
            cursor = e;
        }
        if cursor < end {
            self.spans.insert(cursor, (end.clone(), ts));
        }
        self.coalesce(&start, &end);
        if self.spans.len() > self.max_spans {
            self.forget_older_half();
        }
    }

    /// The highest timestamp at which any key of `span` may have been read.
    pub fn get_max(&self, span: &Span) -> Timestamp {
        self.get_max_read(span).ts
    }

    /// The highest read of any key of `span`, with its reader if only one
    /// transaction read there at that timestamp.
    pub fn get_max_read(&self, span: &Span) -> Read {
        let (start, end) = bounds(span);
        let mut max = Read {
            ts: self.low_water,
            txn: None,
        };
        if start >= end {
            return max; // an empty (or inverted) span holds no key
        }
        // The span starting at or before `start` may reach into it.
        if let Some((_, (e, t))) = self.spans.range(..=start.clone()).next_back() {
            if *e > start {
                max = max.max(*t);
            }
        }
        for (_, (_, t)) in self.spans.range(start..end) {
            max = max.max(*t);
        }
        max
    }

    /// How many disjoint spans it holds.
    pub fn len(&self) -> usize {
        self.spans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// Splits the span holding `at` (if one straddles it) into two.
    fn split_at(&mut self, at: &[u8]) {
        let Some((s, (e, t))) = self
            .spans
            .range(..at.to_vec())
            .next_back()
            .map(|(s, v)| (s.clone(), v.clone()))
        else {
            return;
        };
        if e.as_slice() > at {
            self.spans.insert(s, (at.to_vec(), t));
            self.spans.insert(at.to_vec(), (e, t));
        }
    }

    /// Merges touching neighbours with one timestamp in and around
    /// `[from, to]`, to stay small.
    fn coalesce(&mut self, from: &[u8], to: &[u8]) {
        let first = self
            .spans
            .range(..from.to_vec())
            .next_back()
            .map(|(s, _)| s.clone())
            .unwrap_or_else(|| from.to_vec());
        let keys: Vec<Vec<u8>> = self.spans.range(first..=to.to_vec()).map(|(s, _)| s.clone()).collect();
        let mut prev: Option<Vec<u8>> = None;
        for k in keys {
            let Some((e, t)) = self.spans.get(&k).cloned() else {
                continue;
            };
            if let Some(p) = &prev {
                let (pe, pt) = self.spans[p].clone();
                if pe == k && pt == t {
                    self.spans.insert(p.clone(), (e, t));
                    self.spans.remove(&k);
                    continue;
                }
                if pe > k {
                    break; // cannot happen: spans are disjoint
                }
            }
            prev = Some(k);
        }
    }

    /// Forgets the reads at the lower half of the timestamps, raising the
    /// low-water mark to the highest one forgotten.
    fn forget_older_half(&mut self) {
        let mut ts: Vec<Timestamp> = self.spans.values().map(|(_, r)| r.ts).collect();
        ts.sort_unstable();
        let cut = ts[ts.len() / 2];
        self.raise_low_water(cut);
    }
}

/// `[start, end)` of a span, a single key ending right after it.
fn bounds(span: &Span) -> (Vec<u8>, Vec<u8>) {
    let end = if span.end.is_empty() {
        let mut e = span.start.clone();
        e.push(0);
        e
    } else {
        span.end.clone()
    };
    (span.start.clone(), end)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(w: u64) -> Timestamp {
        Timestamp::new(w, 0)
    }

    #[test]
    fn reads_raise_what_later_writes_see_and_nothing_else() {
        let mut c = TsCache::new(ts(10), 100);
        assert_eq!(c.get_max(&Span::key(b"k")), ts(10), "the low-water mark");
        c.add(&Span::key(b"k"), ts(20));
        c.add(&Span::range(b"m", b"p"), ts(30));
        c.add(&Span::range(b"n", b"o"), ts(25)); // lower, inside: no change
        assert_eq!(c.get_max(&Span::key(b"k")), ts(20));
        assert_eq!(c.get_max(&Span::key(b"k\x00")), ts(10), "the next key was not read");
        assert_eq!(c.get_max(&Span::key(b"n")), ts(30));
        assert_eq!(c.get_max(&Span::range(b"a", b"z")), ts(30));
        assert_eq!(c.get_max(&Span::range(b"p", b"z")), ts(10), "the end is exclusive");
        c.add(&Span::range(b"l", b"n"), ts(40));
        assert_eq!(c.get_max(&Span::key(b"m")), ts(40));
        assert_eq!(c.get_max(&Span::key(b"o")), ts(30));
        assert_eq!(
            c.get_max(&Span::range(b"z", b"a")),
            ts(10),
            "an inverted span holds nothing"
        );
        c.add(&Span::key(b"x"), ts(5)); // below the low-water mark: nothing to keep
        assert_eq!(c.get_max(&Span::key(b"x")), ts(10));
        c.raise_low_water(ts(35));
        assert_eq!(c.get_max(&Span::key(b"o")), ts(35));
        assert_eq!(c.get_max(&Span::key(b"m")), ts(40));
    }

    #[test]
    fn a_transaction_is_named_only_where_it_alone_read_highest() {
        let (t1, t2) = (Some(TxnId([1; 16])), Some(TxnId([2; 16])));
        let mut c = TsCache::new(ts(10), 100);
        c.add_read(&Span::range(b"a", b"m"), Read { ts: ts(20), txn: t1 });
        assert_eq!(c.get_max_read(&Span::key(b"c")), Read { ts: ts(20), txn: t1 });
        // Another transaction at the same timestamp: neither is named.
        c.add_read(&Span::key(b"c"), Read { ts: ts(20), txn: t2 });
        assert_eq!(c.get_max_read(&Span::key(b"c")), Read { ts: ts(20), txn: None });
        assert_eq!(c.get_max_read(&Span::key(b"b")), Read { ts: ts(20), txn: t1 });
        // A span covering both: the highest read is shared, so no one.
        assert_eq!(c.get_max_read(&Span::range(b"b", b"d")).txn, None);
        // A higher read by t2 takes over; a lower one by t1 changes nothing.
        c.add_read(&Span::key(b"b"), Read { ts: ts(30), txn: t2 });
        c.add_read(&Span::key(b"b"), Read { ts: ts(25), txn: t1 });
        assert_eq!(c.get_max_read(&Span::key(b"b")), Read { ts: ts(30), txn: t2 });
        // Below the low-water mark, nobody.
        assert_eq!(c.get_max_read(&Span::key(b"z")), Read { ts: ts(10), txn: None });
    }

    /// Against a model that remembers every read: never lower, and exact
    /// while nothing was forgotten.
    #[test]
    fn answers_are_never_below_a_read_and_exact_until_it_forgets() {
        for (max_spans, seed) in [(10_000usize, 1u64), (8, 2), (3, 3)] {
            let mut c = TsCache::new(ts(0), max_spans);
            let mut reads: Vec<(Span, Timestamp)> = Vec::new();
            let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let mut next = |n: u64| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng % n
            };
            let span = |next: &mut dyn FnMut(u64) -> u64| {
                let a = b'a' + next(12) as u8;
                if next(3) == 0 {
                    Span::key(&[a])
                } else {
                    Span::range(&[a], &[a + 1 + next(5) as u8])
                }
            };
            for _ in 0..2000 {
                let s = span(&mut next);
                let t = ts(1 + next(1000));
                c.add(&s, t);
                reads.push((s, t));
                let q = span(&mut next);
                let want = reads
                    .iter()
                    .filter(|(r, _)| r.overlaps(&q))
                    .map(|(_, t)| *t)
                    .max()
                    .unwrap_or(ts(0));
                let got = c.get_max(&q);
                assert!(got >= want, "{q:?}: cache says {got:?}, a read was at {want:?}");
                if c.low_water() == ts(0) {
                    assert_eq!(got, want, "{q:?}");
                }
                // No reads by a transaction here: none is named.
                assert_eq!(c.get_max_read(&q).txn, None);
                assert!(c.len() <= 2 * max_spans.max(2) + 16, "{} spans", c.len());
            }
            if max_spans < 100 {
                assert!(c.low_water() > ts(0), "a small cache forgot and raised its low water");
            }
        }
    }
}
