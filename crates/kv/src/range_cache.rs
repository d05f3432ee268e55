//! The range cache: what a gateway believes about the ranges it sends to,
//! their descriptors and leaseholders, ordered by end key so that the range
//! of any key is one ordered lookup (as meta records are addressed).
//!
//! A descriptor is only a belief: a split, a merge or a replica change may
//! have made it stale, and the store that answers says so (the request's
//! span no longer matches, no such range, not the leaseholder). The cache
//! then drops or corrects what it holds. A newer descriptor (higher
//! generation) replaces every cached one it overlaps; an older one never
//! replaces a newer one. That needs overlapping descriptors to be ordered by
//! generation whatever their range ids, so splits and merges must keep this
//! rule (CockroachDB's): both halves of a split take the parent's generation
//! plus one, a merged range the larger of the two plus one.
//!
//! It never does I/O: looking up a missing range in the meta range is the
//! caller's job, which `cover` makes plain by naming the first key no cached
//! range holds.

use std::collections::BTreeMap;

use proto::storage::RangeDescriptor;

/// A cached range: its descriptor and the store believed to hold its lease.
#[derive(Clone, Debug, PartialEq)]
pub struct CachedRange {
    pub desc: RangeDescriptor,
    /// 0 when unknown.
    pub leaseholder_store: u64,
}

/// The part `[start, end)` of a span that one cached range holds.
#[derive(Clone, Debug, PartialEq)]
pub struct Piece {
    pub range: CachedRange,
    pub start: Vec<u8>,
    pub end: Vec<u8>,
}

/// The ranges a gateway knows, by end key.
#[derive(Clone, Debug, Default)]
pub struct RangeCache {
    by_end: BTreeMap<Vec<u8>, CachedRange>,
}

/// Whether `[start, end)` and `[s2, e2)` share a key (an empty end is the
/// end of the keyspace).
fn overlaps(start: &[u8], end: &[u8], s2: &[u8], e2: &[u8]) -> bool {
    (e2.is_empty() || start < e2) && (end.is_empty() || s2 < end)
}

impl RangeCache {
    pub fn new() -> RangeCache {
        RangeCache::default()
    }

    /// The cached range holding `key`.
    pub fn lookup(&self, key: &[u8]) -> Option<&CachedRange> {
        // The first range ending after `key`; an empty end (the keyspace's
        // last range) sorts first in a BTreeMap and is checked apart.
        let after = self
            .by_end
            .range::<[u8], _>((std::ops::Bound::Excluded(key), std::ops::Bound::Unbounded))
            .next()
            .map(|(_, r)| r);
        let candidate = after.or_else(|| self.by_end.get(&Vec::new()));
        candidate.filter(|r| {
            r.desc.start_key.as_slice() <= key && (r.desc.end_key.is_empty() || key < r.desc.end_key.as_slice())
        })
    }

    /// Adds what a store or the meta range said of a range. Cached ranges it
    /// overlaps are dropped, unless one of them is newer (a higher
    /// generation): then this one is stale and ignored. Returns whether it
    /// was taken.
    pub fn insert(&mut self, desc: RangeDescriptor, leaseholder_store: u64) -> bool {
        let overlapping: Vec<Vec<u8>> = self
            .by_end
            .iter()
            .filter(|(_, r)| overlaps(&desc.start_key, &desc.end_key, &r.desc.start_key, &r.desc.end_key))
            .map(|(k, _)| k.clone())
            .collect();
        let newer = overlapping
            .iter()
            .any(|k| self.by_end[k].desc.generation > desc.generation);
        if newer {
            return false;
        }
        for k in overlapping {
            self.by_end.remove(&k);
        }
        self.by_end.insert(
            desc.end_key.clone(),
            CachedRange {
                desc,
                leaseholder_store,
            },
        );
        true
    }

    /// The store that answered is the leaseholder of `range_id` (or
    /// named `store` as the leaseholder).
    pub fn set_leaseholder(&mut self, range_id: u64, store: u64) {
        if let Some(r) = self.by_end.values_mut().find(|r| r.desc.range_id == range_id) {
            r.leaseholder_store = store;
        }
    }

    /// Drops the range holding `key` (the answer said the cache is wrong).
    pub fn evict(&mut self, key: &[u8]) -> Option<CachedRange> {
        let end = self.lookup(key)?.desc.end_key.clone();
        self.by_end.remove(&end)
    }

    /// A store answered that a request's span did not match its range and
    /// sent the descriptors it knows now: they replace what they overlap.
    pub fn correct(&mut self, stale_key: &[u8], fresh: Vec<RangeDescriptor>) {
        self.evict(stale_key);
        for d in fresh {
            self.insert(d, 0);
        }
    }

    /// Cuts `[start, end)` into the cached ranges that hold it, in key
    /// order, each with the part of the span it holds; or names the first
    /// key no cached range holds (to be looked up in the meta range).
    pub fn cover(&self, start: &[u8], end: &[u8]) -> Result<Vec<Piece>, Vec<u8>> {
        let mut out = Vec::new();
        let mut at = start.to_vec();
        loop {
            let Some(r) = self.lookup(&at) else {
                return Err(at);
            };
            let r_end = r.desc.end_key.clone();
            let piece_end = if r_end.is_empty() || (!end.is_empty() && end < r_end.as_slice()) {
                end.to_vec()
            } else {
                r_end.clone()
            };
            out.push(Piece {
                range: r.clone(),
                start: at.clone(),
                end: piece_end.clone(),
            });
            if piece_end == end || r_end.is_empty() {
                return Ok(out);
            }
            at = r_end;
        }
    }

    /// The smallest start key of a cached range above `key`.
    pub fn next_start_after(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.by_end
            .values()
            .map(|r| &r.desc.start_key)
            .filter(|s| s.as_slice() > key)
            .min()
            .cloned()
    }

    pub fn len(&self) -> usize {
        self.by_end.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_end.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(id: u64, start: &str, end: &str, generation: u64) -> RangeDescriptor {
        RangeDescriptor {
            range_id: id,
            start_key: start.as_bytes().to_vec(),
            end_key: end.as_bytes().to_vec(),
            generation,
            ..Default::default()
        }
    }

    fn id_at(c: &RangeCache, key: &str) -> Option<u64> {
        c.lookup(key.as_bytes()).map(|r| r.desc.range_id)
    }

    #[test]
    fn finds_the_range_of_a_key_by_end_key() {
        let mut c = RangeCache::new();
        c.insert(d(1, "", "c", 1), 1);
        c.insert(d(2, "c", "m", 1), 2);
        c.insert(d(3, "m", "", 1), 3);
        assert_eq!(id_at(&c, ""), Some(1));
        assert_eq!(id_at(&c, "b"), Some(1));
        assert_eq!(id_at(&c, "c"), Some(2), "a range's start belongs to it");
        assert_eq!(id_at(&c, "lzz"), Some(2));
        assert_eq!(id_at(&c, "m"), Some(3), "an end belongs to the next range");
        assert_eq!(id_at(&c, "zzz"), Some(3));
        c.evict(b"d");
        assert_eq!(id_at(&c, "d"), None, "a gap after eviction");
        assert_eq!(id_at(&c, "m"), Some(3));
    }

    #[test]
    fn a_split_replaces_the_stale_range_and_an_old_answer_never_wins() {
        let mut c = RangeCache::new();
        c.insert(d(2, "c", "m", 1), 2);
        // Range 2 split at "g": the left half keeps the id; both halves take
        // the next generation.
        assert!(c.insert(d(2, "c", "g", 2), 2));
        assert!(c.insert(d(7, "g", "m", 2), 0));
        assert_eq!(id_at(&c, "d"), Some(2));
        assert_eq!(id_at(&c, "h"), Some(7));
        // A late answer carrying the pre-split descriptor is stale, even
        // where it overlaps only the new right-hand range.
        assert!(!c.insert(d(2, "c", "m", 1), 2));
        c.evict(b"d");
        assert!(!c.insert(d(2, "c", "m", 1), 2));
        assert_eq!(id_at(&c, "h"), Some(7));
        assert!(c.insert(d(2, "c", "g", 2), 2));
        // A merge (newer generation of 2) swallows 7.
        c.correct(b"h", vec![d(2, "c", "m", 3)]);
        assert_eq!(id_at(&c, "h"), Some(2));
        assert_eq!(c.len(), 1);
        c.set_leaseholder(2, 5);
        assert_eq!(c.lookup(b"h").unwrap().leaseholder_store, 5);
    }

    #[test]
    fn cover_cuts_a_span_per_range_or_names_the_first_missing_key() {
        let mut c = RangeCache::new();
        c.insert(d(1, "", "c", 1), 0);
        c.insert(d(2, "c", "m", 1), 0);
        let pieces = c.cover(b"a", b"f").unwrap();
        let got: Vec<(u64, String, String)> = pieces
            .iter()
            .map(|p| {
                (
                    p.range.desc.range_id,
                    String::from_utf8_lossy(&p.start).into_owned(),
                    String::from_utf8_lossy(&p.end).into_owned(),
                )
            })
            .collect();
        assert_eq!(got, vec![(1, "a".into(), "c".into()), (2, "c".into(), "f".into())]);
        assert_eq!(c.cover(b"d", b"z"), Err(b"m".to_vec()), "nothing cached from m on");
        c.insert(d(3, "m", "", 1), 0);
        let all = c.cover(b"", b"").unwrap();
        assert_eq!(
            all.iter().map(|p| p.range.desc.range_id).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert_eq!(all.last().unwrap().end, Vec::<u8>::new(), "to the end of the keyspace");
    }
}
