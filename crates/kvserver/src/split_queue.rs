//! Deciding automatic splits: by size and by load. Every leaseholder looks
//! at its user ranges on a cadence; a range whose MVCC bytes pass the size
//! limit splits at the key that halves its bytes, and a range whose request
//! rate stays above the load threshold for a whole window splits at the
//! sampled key that best halves its requests (CockroachDB's load-based
//! splitter: a reservoir of candidate keys, each counting the requests that
//! fell left and right of it), if that leaves each side at least a quarter.
//!
//! This module decides and finds keys; the split itself is `split`, reached
//! through a `SplitSender` (the server finds the range's leaseholder and a
//! new range id).

use std::future::Future;
use std::time::{Duration, Instant};

use storage::{keys, Cf, Reader};

use crate::keyspace::splittable;
use crate::store::StoreHandle;

/// How often leaseholders look at their ranges.
const CHECK_EVERY: Duration = Duration::from_millis(500);
/// How many candidate split keys a range's load sampler keeps.
const CANDIDATES: usize = 20;
/// A range must be this loaded for this long before it splits by load.
pub const LOAD_WINDOW: Duration = Duration::from_secs(5);

/// When to split.
#[derive(Clone, Debug)]
pub struct SplitPolicy {
    /// Split a range whose MVCC bytes (keys and values, every version) pass this.
    pub max_bytes: u64,
    /// Split a range serving more requests per second than this for a
    /// whole window (0: never by load).
    pub load_qps: u64,
}

/// Asks for a split at a key (the server implements it: meta lookup, a new
/// range id, the leaseholder).
pub trait SplitSender: Send + Sync {
    fn store(&self) -> Option<StoreHandle>;
    fn split(&self, key: Vec<u8>) -> impl Future<Output = Result<(), String>> + Send;
}

/// One candidate split key and how many requests fell on each side of it.
#[derive(Clone, Debug)]
struct Candidate {
    key: Vec<u8>,
    left: u64,
    right: u64,
}

/// A range's request sampler for load-based splitting (kept by the
/// leaseholder, next to its latches).
#[derive(Debug)]
pub struct LoadSampler {
    window_start: Instant,
    count: u64,
    candidates: Vec<Candidate>,
    /// A simple LCG for reservoir sampling: deterministic, no dependency.
    rng: u64,
}

impl Default for LoadSampler {
    fn default() -> Self {
        LoadSampler {
            window_start: Instant::now(),
            count: 0,
            candidates: Vec::new(),
            rng: 0x2545_f491_4f6c_dd1d,
        }
    }
}

impl LoadSampler {
    fn next_rand(&mut self) -> u64 {
        self.rng = self
            .rng
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.rng >> 33
    }

    /// Records one request at `key`.
    pub fn record(&mut self, key: &[u8]) {
        self.count += 1;
        for c in &mut self.candidates {
            if key < c.key.as_slice() {
                c.left += 1;
            } else {
                c.right += 1;
            }
        }
        if self.candidates.len() < CANDIDATES {
            self.candidates.push(Candidate {
                key: key.to_vec(),
                left: 0,
                right: 0,
            });
        } else {
            let r = self.next_rand() % self.count;
            if (r as usize) < CANDIDATES {
                self.candidates[r as usize] = Candidate {
                    key: key.to_vec(),
                    left: 0,
                    right: 0,
                };
            }
        }
    }

    /// At the end of a window: the key to split at if the window's rate was
    /// above `qps` and some candidate leaves at least a quarter of the
    /// requests it saw on each side. Starts a new window either way.
    pub fn decide(&mut self, now: Instant, qps: u64) -> Option<Vec<u8>> {
        let elapsed = now.duration_since(self.window_start);
        if elapsed < LOAD_WINDOW {
            return None;
        }
        let rate = self.count as f64 / elapsed.as_secs_f64();
        let best = self
            .candidates
            .iter()
            .filter(|c| {
                let total = c.left + c.right;
                total > 0 && c.left * 4 >= total && c.right * 4 >= total
            })
            .min_by_key(|c| c.left.abs_diff(c.right))
            .map(|c| c.key.clone());
        *self = LoadSampler {
            window_start: now,
            rng: self.rng,
            ..Default::default()
        };
        (qps > 0 && rate > qps as f64).then_some(best).flatten()
    }
}

/// The key that halves the MVCC bytes of `[start, end)` (every version
/// counted), if it is not the range's first key.
pub fn size_split_key(r: &dyn Reader, start: &[u8], end: &[u8]) -> Result<Option<Vec<u8>>, storage::Error> {
    let (lower, upper) = keys::mvcc_span_bounds(start, end);
    let mut total = 0u64;
    {
        let mut c = r.cursor(Cf::Mvcc, &lower, upper.as_deref())?;
        c.seek_ge(&lower)?;
        while let Some((k, v)) = c.entry() {
            total += (k.len() + v.len()) as u64;
            c.next()?;
        }
    }
    let mut c = r.cursor(Cf::Mvcc, &lower, upper.as_deref())?;
    c.seek_ge(&lower)?;
    let mut seen = 0u64;
    while let Some((k, v)) = c.entry() {
        seen += (k.len() + v.len()) as u64;
        if seen * 2 >= total {
            let (user, _) = keys::unescape(k)?;
            // Split after this key's versions: at the next user key.
            c.seek_ge(&keys::mvcc_meta_key(&keys::next_user_key(&user)))?;
            return Ok(match c.entry() {
                Some((k, _)) => Some(keys::unescape(k)?.0).filter(|key| key.as_slice() > start),
                None => None,
            });
        }
        c.next()?;
    }
    Ok(None)
}

/// For as long as the node runs: splits this store's leaseholders' user
/// ranges that are too large or too loaded.
pub async fn split_loop(sender: impl SplitSender, policy: SplitPolicy) {
    loop {
        tokio::time::sleep(CHECK_EVERY).await;
        let Some(store) = sender.store() else { continue };
        if store.stopped().is_some() {
            continue;
        }
        let now = Instant::now();
        // Only the ranges this store leads that are too large or too loaded
        // are copied out (the load sampler decides in place).
        let mut loaded: std::collections::HashMap<u64, Vec<u8>> = Default::default();
        // Cheapest checks first: most ranges are idle, and the lease check
        // (store liveness) is the dearest.
        let due = store.statuses_where(|st| {
            if !splittable(st.desc.range_id) || !st.leader_ready || st.desc.end_key.is_empty() {
                return false;
            }
            let stats = st.applied.stats;
            let too_big = (stats.key_bytes + stats.val_bytes).max(0) as u64 > policy.max_bytes;
            let load_key = if too_big {
                None
            } else {
                st.conc.decide_load_split(now, policy.load_qps)
            };
            if !too_big && load_key.is_none() {
                return false;
            }
            if !st.can_serve(now) {
                return false;
            }
            if let Some(k) = load_key {
                loaded.insert(st.desc.range_id, k);
            }
            true
        });
        for st in due {
            let stats = st.applied.stats;
            let bytes = (stats.key_bytes + stats.val_bytes).max(0) as u64;
            let key = if bytes > policy.max_bytes {
                match size_split_key(store.engine(), &st.desc.start_key, &st.desc.end_key) {
                    Ok(k) => k,
                    Err(e) => {
                        tracing::warn!(range = st.desc.range_id, error = %e, "cannot find a split key");
                        None
                    }
                }
            } else {
                loaded.remove(&st.desc.range_id)
            };
            let Some(key) = key else { continue };
            let why = if bytes > policy.max_bytes { "size" } else { "load" };
            match sender.split(key.clone()).await {
                Ok(()) => tracing::info!(range = st.desc.range_id, ?key, why, "split"),
                Err(e) => tracing::debug!(range = st.desc.range_id, ?key, why, error = %e, "split did not happen"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use storage::mvcc::{self, MvccStats};
    use storage::{Engine, EngineOptions, Timestamp};

    #[test]
    fn the_load_sampler_finds_a_key_that_halves_the_load_only_when_loaded() {
        let mut s = LoadSampler::default();
        let t0 = s.window_start;
        for i in 0..10_000u32 {
            // Uniform over 100 keys.
            s.record(format!("k{:03}", i % 100).as_bytes());
        }
        // Before the window ends: nothing.
        assert_eq!(s.decide(t0 + Duration::from_secs(1), 10), None);
        let key = s.decide(t0 + LOAD_WINDOW, 10).expect("2000 qps > 10");
        let k: u32 = std::str::from_utf8(&key[1..]).unwrap().parse().unwrap();
        assert!(
            (25..=75).contains(&k),
            "split key {key:?} leaves a quarter on each side"
        );
        // A new window below the threshold: no split.
        let t1 = t0 + LOAD_WINDOW;
        for i in 0..100u32 {
            s.record(format!("k{:03}", i % 100).as_bytes());
        }
        assert_eq!(s.decide(t1 + LOAD_WINDOW, 1000), None);
        // One hot key: no candidate leaves a quarter on both sides.
        let t2 = t1 + LOAD_WINDOW;
        for _ in 0..10_000 {
            s.record(b"hot");
        }
        assert_eq!(s.decide(t2 + LOAD_WINDOW, 10), None);
    }

    #[test]
    fn the_size_split_key_halves_the_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let e = Engine::open(dir.path(), EngineOptions::default()).unwrap();
        let mut b = e.batch();
        let mut st = MvccStats::default();
        for i in 0..100u32 {
            let k = format!("k{i:03}");
            mvcc::put(
                &mut b,
                &mut st,
                k.as_bytes(),
                Timestamp::new(10, 0),
                Some(&[7u8; 100]),
                None,
            )
            .unwrap();
        }
        e.write(b, false).unwrap();
        let key = size_split_key(&e, b"\x11", b"\xff\xff").unwrap().unwrap();
        assert!(
            key.as_slice() >= b"k045".as_slice() && key.as_slice() <= b"k055".as_slice(),
            "{key:?}"
        );
        // One key: nothing to split.
        let dir2 = tempfile::tempdir().unwrap();
        let e2 = Engine::open(dir2.path(), EngineOptions::default()).unwrap();
        let mut b = e2.batch();
        mvcc::put(&mut b, &mut st, b"only", Timestamp::new(10, 0), Some(b"v"), None).unwrap();
        e2.write(b, false).unwrap();
        assert_eq!(size_split_key(&e2, b"\x11", b"\xff\xff").unwrap(), None);
    }
}
