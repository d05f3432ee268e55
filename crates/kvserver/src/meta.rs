//! Meta addressing: every range's descriptor is an MVCC record of the system
//! range at `\x01 ++ end key` (`keyspace::meta_key`), so the range holding
//! any key is the first record whose end key is above it: one ordered read
//! (`lookup`). One level, in the system range, which never splits.
//!
//! Records are written by `MetaUpdate` commands applied on the system range
//! in log order (`apply_update`): a descriptor replaces the record at its end
//! key only if that record is of an older generation (or absent), and
//! deletes older records whose end key lies strictly inside its span (the
//! ranges a merge swallowed). Generations order overlapping descriptors (both
//! halves of a split take the parent's plus one, a merge the larger plus
//! one), so publishing is idempotent and a late, stale update changes
//! nothing. Each range's leaseholder publishes its own descriptor whenever
//! it holds a generation it has not published (`publish_loop`): after a
//! split, a merge or a replica change, and once after every restart or
//! lease change, which is what resumes a fix-up a crash interrupted.
//!
//! This module reads and writes meta records; it must never decide a split
//! or a merge.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use prost::Message as _;
use proto::kvserver::MetaUpdate;
use proto::storage::RangeDescriptor;
use storage::mvcc::{self, MvccStats, ReadOptions, ScanOptions};
use storage::{Batch, Reader, Timestamp};

use crate::keyspace::{end_key_of_meta, meta_key, meta_lookup_start, META_END};
use crate::store::StoreHandle;
use crate::StoreError;

/// How many descriptors one `MetaUpdate` carries at most.
const MAX_PER_UPDATE: usize = 256;
/// How often leaseholders look for descriptors to publish.
const PUBLISH_EVERY: Duration = Duration::from_millis(100);
/// Every this many publishing passes, a scan even if no status changed.
const FULL_SCAN_EVERY: u64 = 20;

fn decode(key: &[u8], value: &[u8]) -> Result<RangeDescriptor, StoreError> {
    RangeDescriptor::decode(value).map_err(|e| StoreError::Corrupt(format!("meta record {key:?}: {e}")))
}

/// Writes `value` (`None`: a tombstone) at `ts`, or just above the key's
/// newest version if that is at or above `ts` (meta records are written in
/// log order, so the newest write must be the newest version).
fn put_above(
    batch: &mut Batch,
    stats: &mut MvccStats,
    key: &[u8],
    mut ts: Timestamp,
    value: Option<&[u8]>,
) -> Result<(), StoreError> {
    for _ in 0..3 {
        match mvcc::put(batch, stats, key, ts, value, None) {
            Err(storage::Error::WriteTooOld { retry_ts, .. }) => ts = retry_ts,
            r => return Ok(r?),
        }
    }
    Err(StoreError::Corrupt(format!(
        "meta record {key:?}: cannot write above its newest version"
    )))
}

/// Writes `descs`' records into a batch at `ts` (bootstrap: the batch also
/// holds the system range's applied state, with `stats`).
pub fn bootstrap_records(
    batch: &mut Batch,
    stats: &mut MvccStats,
    descs: &[RangeDescriptor],
    ts: Timestamp,
) -> Result<(), StoreError> {
    for d in descs {
        mvcc::put(batch, stats, &meta_key(&d.end_key), ts, Some(&d.encode_to_vec()), None)?;
    }
    Ok(())
}

/// Applies a `MetaUpdate` at `ts` (the proposer's clock): returns how many
/// records it wrote or deleted. Deterministic given the replicated state, so
/// every replica of the system range does the same.
pub fn apply_update(
    batch: &mut Batch,
    stats: &mut MvccStats,
    update: &MetaUpdate,
    ts: Timestamp,
) -> Result<u32, StoreError> {
    let latest = ReadOptions::at(Timestamp::MAX);
    let mut changed = 0;
    for d in &update.descriptors {
        if d.end_key.is_empty() || d.start_key >= d.end_key {
            tracing::warn!(range = d.range_id, "a meta update for a malformed descriptor ignored");
            continue;
        }
        // Every record overlapping the span: those ending inside or at its
        // end, and the first ending after it if it starts before its end.
        let mut overlapping = mvcc::scan(
            &*batch,
            &ScanOptions {
                start: meta_lookup_start(&d.start_key),
                end: meta_lookup_start(&d.end_key),
                read: latest,
                max_keys: 0,
                reverse: false,
            },
        )?
        .kvs;
        if let Some(next) = mvcc::scan(
            &*batch,
            &ScanOptions {
                start: meta_lookup_start(&d.end_key),
                end: META_END.to_vec(),
                read: latest,
                max_keys: 1,
                reverse: false,
            },
        )?
        .kvs
        .pop()
        {
            if decode(&next.key, &next.value)?.start_key < d.end_key {
                overlapping.push(next);
            }
        }
        let mut older = Vec::with_capacity(overlapping.len());
        let mut stale = false;
        for kv in overlapping {
            let o = decode(&kv.key, &kv.value)?;
            stale |= o.generation >= d.generation;
            older.push((kv.key, o));
        }
        if stale {
            continue; // as new or newer already (or swallowed since)
        }
        // Records ending strictly inside the span: ranges a merge swallowed.
        // (A record ending past it, a split's parent, stays until the other
        // half replaces it: lookups then reach a range that corrects them.)
        let key = meta_key(&d.end_key);
        for (k, o) in older {
            if o.end_key < d.end_key && o.end_key > d.start_key {
                put_above(batch, stats, &k, ts, None)?;
                changed += 1;
            }
        }
        put_above(batch, stats, &key, ts, Some(&d.encode_to_vec()))?;
        changed += 1;
    }
    Ok(changed)
}

/// The descriptor of the range holding `key`, then up to `prefetch` of the
/// ranges after it, as the meta records say at `ts`.
pub fn lookup(r: &dyn Reader, key: &[u8], prefetch: u32, ts: Timestamp) -> Result<Vec<RangeDescriptor>, StoreError> {
    let found = mvcc::scan(
        r,
        &ScanOptions {
            start: meta_lookup_start(key),
            end: META_END.to_vec(),
            read: ReadOptions::at(ts),
            max_keys: 1 + prefetch as usize,
            reverse: false,
        },
    )?;
    found.kvs.iter().map(|kv| decode(&kv.key, &kv.value)).collect()
}

/// Every meta record at `ts`, in key order (for checks and listings).
pub fn all(r: &dyn Reader, ts: Timestamp) -> Result<Vec<RangeDescriptor>, StoreError> {
    let found = mvcc::scan(
        r,
        &ScanOptions {
            start: crate::keyspace::META_PREFIX.to_vec(),
            end: META_END.to_vec(),
            read: ReadOptions::at(ts),
            max_keys: 0,
            reverse: false,
        },
    )?;
    found
        .kvs
        .iter()
        .filter(|kv| end_key_of_meta(&kv.key).is_some())
        .map(|kv| decode(&kv.key, &kv.value))
        .collect()
}

/// Sends a `MetaUpdate` to the system range's leaseholder (the server
/// implements it with its router).
pub trait MetaSender: Send + Sync {
    fn store(&self) -> Option<StoreHandle>;
    fn send(&self, update: MetaUpdate, timeout: Duration) -> impl Future<Output = Result<u32, String>> + Send;
}

/// For as long as the node runs: publishes the descriptor of every range
/// this store holds the lease of whose generation it has not published in
/// that lease (so once after every restart and lease change, and after every
/// split, merge or replica change), retrying until it is done.
pub async fn publish_loop(sender: impl MetaSender) {
    // range id -> (term, generation) published.
    let mut published: HashMap<u64, (u64, u64)> = HashMap::new();
    let mut failing = false;
    // Scans are skipped while no replica's status changed; a lease can
    // become valid without one (support arriving), so a full scan still
    // runs every FULL_SCAN_EVERY passes.
    let mut scanned_version = None;
    let mut passes = 0u64;
    loop {
        tokio::time::sleep(PUBLISH_EVERY).await;
        let Some(store) = sender.store() else { continue };
        if store.stopped().is_some() {
            continue;
        }
        passes += 1;
        let version = store.status_version();
        if !failing && scanned_version == Some(version) && !passes.is_multiple_of(FULL_SCAN_EVERY) {
            continue;
        }
        scanned_version = Some(version);
        let now = std::time::Instant::now();
        let due: Vec<(u64, u64, RangeDescriptor)> = store
            .statuses_where(|st| {
                // Cheap tests first: the lease check reads store liveness.
                st.leader_ready
                    && !st.desc.end_key.is_empty()
                    && published.get(&st.desc.range_id) != Some(&(st.term, st.desc.generation))
                    && st.can_serve(now)
            })
            .into_iter()
            .map(|st| (st.term, st.desc.generation, st.desc))
            .collect();
        for chunk in due.chunks(MAX_PER_UPDATE) {
            let update = MetaUpdate {
                descriptors: chunk.iter().map(|(.., d)| d.clone()).collect(),
            };
            match sender.send(update, Duration::from_secs(5)).await {
                Ok(changed) => {
                    if failing || changed > 0 {
                        tracing::debug!(ranges = chunk.len(), changed, "published meta records");
                    }
                    failing = false;
                    for (term, generation, d) in chunk {
                        published.insert(d.range_id, (*term, *generation));
                    }
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %e, "publishing meta records failed (will retry)");
                    }
                    failing = true;
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use storage::{Engine, EngineOptions};

    fn desc(id: u64, start: &[u8], end: &[u8], generation: u64) -> RangeDescriptor {
        RangeDescriptor {
            range_id: id,
            start_key: start.to_vec(),
            end_key: end.to_vec(),
            generation,
            ..Default::default()
        }
    }

    fn update(e: &Engine, stats: &mut MvccStats, descs: Vec<RangeDescriptor>, wall: u64) -> u32 {
        let mut b = e.batch();
        let n = apply_update(
            &mut b,
            stats,
            &MetaUpdate { descriptors: descs },
            Timestamp::new(wall, 0),
        )
        .unwrap();
        e.write(b, false).unwrap();
        n
    }

    fn ids(e: &Engine) -> Vec<(u64, Vec<u8>, u64)> {
        all(e, Timestamp::MAX)
            .unwrap()
            .into_iter()
            .map(|d| (d.range_id, d.end_key, d.generation))
            .collect()
    }

    #[test]
    fn splits_and_merges_publish_idempotently_and_stale_updates_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let e = Engine::open(dir.path(), EngineOptions::default()).unwrap();
        let mut stats = MvccStats::default();
        let mut b = e.batch();
        bootstrap_records(
            &mut b,
            &mut stats,
            &[desc(3, b"\x11", b"\xff\xff", 0)],
            Timestamp::new(1, 0),
        )
        .unwrap();
        e.write(b, false).unwrap();
        // Split at m: the left half republished first, then the right.
        let left = desc(3, b"\x11", b"m", 1);
        let right = desc(4, b"m", b"\xff\xff", 1);
        assert_eq!(update(&e, &mut stats, vec![left.clone()], 10), 1);
        // Until the right half is published, a key above m still finds the
        // parent's stale record (the range answers RangeKeyMismatch).
        assert_eq!(lookup(&e, b"x", 0, Timestamp::MAX).unwrap()[0].range_id, 3);
        assert_eq!(update(&e, &mut stats, vec![right.clone()], 11), 1);
        assert_eq!(lookup(&e, b"x", 0, Timestamp::MAX).unwrap()[0].range_id, 4);
        assert_eq!(lookup(&e, b"a", 5, Timestamp::MAX).unwrap().len(), 2);
        // Again (a retry after a crash): nothing changes.
        assert_eq!(update(&e, &mut stats, vec![left.clone(), right.clone()], 12), 0);
        // A stale parent record published late changes nothing.
        assert_eq!(update(&e, &mut stats, vec![desc(3, b"\x11", b"\xff\xff", 0)], 13), 0);
        assert_eq!(ids(&e), vec![(3, b"m".to_vec(), 1), (4, b"\xff\xff".to_vec(), 1)]);
        // Merge: the left range absorbs the right; the record at m goes.
        let merged = desc(3, b"\x11", b"\xff\xff", 2);
        assert_eq!(update(&e, &mut stats, vec![merged.clone()], 14), 2);
        assert_eq!(ids(&e), vec![(3, b"\xff\xff".to_vec(), 2)]);
        assert_eq!(update(&e, &mut stats, vec![left, right, merged], 15), 0);
        assert_eq!(lookup(&e, b"a", 0, Timestamp::MAX).unwrap()[0].generation, 2);
        // Stats follow every write: exactly what the data holds.
        let computed = mvcc::compute_stats(&e, b"\x01", b"\x02").unwrap();
        assert_eq!(computed, stats);
        // A lookup at a time before the merge sees the split.
        assert_eq!(lookup(&e, b"x", 0, Timestamp::new(12, 0)).unwrap()[0].range_id, 4);
    }
}
