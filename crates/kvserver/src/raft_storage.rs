//! `raft::Storage` over the store's engine: a replica's raft log, hard state
//! and configuration as the raft core reads them, and snapshots built on
//! demand from the engine.
//!
//! The scheduler writes what a `Ready` asks through the storage crate in its
//! one batch per cycle, then updates the cached log bounds here, and hands
//! over the entries it wrote: the entries not yet applied (and always the
//! last one) stay in memory, so the hot path (terms for the log-matching
//! check, entries to apply, to send to a follower just behind) reads no
//! RocksDB. Reads never write, except that building a snapshot writes its
//! SST files to a directory.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use prost::Message as _;
use proto::storage::{replica_descriptor, RangeDescriptor};
use proto::transport::{ConfState as PbConfState, SnapshotHandle};
use raft::{ConfState, Entry, HardState, Snapshot, SnapshotMeta, StorageError};
use storage::raftlog::{self, TruncatedState};
use storage::rangestate;
use storage::Engine;

use crate::command;

/// Range-local record suffix of the raft configuration (kvserver's own).
pub const CONF_STATE_SUFFIX: u8 = b'C';

/// The configuration a range descriptor describes: its replicas by replica id
/// (used only for a range bootstrapped without a configuration record).
pub fn conf_state_of(desc: &RangeDescriptor) -> ConfState {
    let mut cs = ConfState::default();
    for r in &desc.replicas {
        if r.r#type == replica_descriptor::Type::Learner as i32 {
            cs.learners.push(r.replica_id);
        } else {
            cs.voters.push(r.replica_id);
        }
    }
    cs
}

pub fn conf_to_record(c: &ConfState) -> Vec<u8> {
    PbConfState {
        voters: c.voters.clone(),
        voters_outgoing: c.voters_outgoing.clone(),
        learners: c.learners.clone(),
        learners_next: c.learners_next.clone(),
    }
    .encode_to_vec()
}

/// The stored configuration of `range_id`, if it has one.
pub fn load_conf(engine: &dyn storage::Reader, range_id: u64) -> Result<Option<ConfState>, storage::Error> {
    let Some(b) = rangestate::local_record(engine, range_id, CONF_STATE_SUFFIX)? else {
        return Ok(None);
    };
    let p = PbConfState::decode(&b[..]).map_err(|e| storage::Error::Corruption {
        what: "conf state",
        detail: e.to_string(),
    })?;
    Ok(Some(ConfState {
        voters: p.voters,
        voters_outgoing: p.voters_outgoing,
        learners: p.learners,
        learners_next: p.learners_next,
    }))
}

static SNAPSHOT_SEQ: AtomicU64 = AtomicU64::new(0);

/// One replica's raft storage.
pub struct ReplicaStorage {
    engine: Engine,
    range_id: u64,
    conf: ConfState,
    /// Cached log bounds, kept current by the scheduler.
    last_index: u64,
    truncated: TruncatedState,
    /// Entries written and not yet applied here, and the last one: a
    /// contiguous run ending at `last_index` (or empty).
    cache: VecDeque<Entry>,
}

fn map_err(e: storage::Error) -> StorageError {
    match e {
        storage::Error::LogCompacted { .. } => StorageError::Compacted,
        storage::Error::LogUnavailable { .. } => StorageError::Unavailable,
        other => StorageError::Other(other.to_string()),
    }
}

impl ReplicaStorage {
    pub fn open(engine: Engine, range_id: u64, conf: ConfState) -> Result<Self, storage::Error> {
        let mut s = ReplicaStorage {
            engine,
            range_id,
            conf,
            last_index: 0,
            truncated: TruncatedState::default(),
            cache: VecDeque::new(),
        };
        s.reload()?;
        Ok(s)
    }

    /// Re-reads the log's start after a truncation. Its end stays as the
    /// appends left it: appends may still be on their way to the engine.
    pub fn truncated_again(&mut self) -> Result<(), storage::Error> {
        self.truncated = raftlog::truncated_state(&self.engine, self.range_id)?;
        let first = self.truncated.index + 1;
        while self.cache.len() > 1 && self.cache.front().is_some_and(|e| e.index < first) {
            self.cache.pop_front();
        }
        Ok(())
    }

    /// Re-reads the log bounds (after a snapshot replaced the log); the
    /// cache keeps only what is still in the log.
    pub fn reload(&mut self) -> Result<(), storage::Error> {
        self.truncated = raftlog::truncated_state(&self.engine, self.range_id)?;
        self.last_index = raftlog::last_index(&self.engine, self.range_id)?;
        let (first, last) = (self.truncated.index + 1, self.last_index);
        self.cache.retain(|e| e.index >= first && e.index <= last);
        if self.cache.back().is_some_and(|e| e.index != last) {
            self.cache.clear();
        }
        Ok(())
    }

    /// The scheduler durably appended `entries` (contiguous; the first may
    /// replace a suffix of the log).
    pub fn appended(&mut self, entries: &[Entry]) {
        let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
            return;
        };
        while self.cache.back().is_some_and(|e| e.index >= first.index) {
            self.cache.pop_back();
        }
        if self.cache.back().is_some_and(|e| e.index + 1 != first.index) {
            self.cache.clear();
        }
        self.cache.extend(entries.iter().cloned());
        self.last_index = last.index;
    }

    /// Entries up to `index` were applied: the cache lets them go (all but
    /// the last entry of the log, whose term every append checks).
    pub fn applied(&mut self, index: u64) {
        while self.cache.len() > 1 && self.cache.front().is_some_and(|e| e.index <= index) {
            self.cache.pop_front();
        }
    }

    /// The log's bounds: `(truncated index, last index)`.
    pub fn bounds(&self) -> (u64, u64) {
        (self.truncated.index, self.last_index)
    }

    /// The cached entry at `index`, if it is cached.
    fn cached(&self, index: u64) -> Option<&Entry> {
        let first = self.cache.front()?.index;
        if index < first {
            return None;
        }
        self.cache.get((index - first) as usize)
    }

    pub fn set_conf(&mut self, conf: ConfState) {
        self.conf = conf;
    }

    pub fn conf(&self) -> &ConfState {
        &self.conf
    }
}

impl raft::Storage for ReplicaStorage {
    fn initial_state(&self) -> Result<(HardState, ConfState), StorageError> {
        let hs = raftlog::hard_state(&self.engine, self.range_id).map_err(map_err)?;
        Ok((
            HardState {
                term: hs.term,
                vote: hs.vote,
                commit: hs.commit,
            },
            self.conf.clone(),
        ))
    }

    fn entries(&self, lo: u64, hi: u64, max_bytes: u64) -> Result<Vec<Entry>, StorageError> {
        if lo < hi && self.cached(lo).is_some() && self.cached(hi - 1).is_some() {
            let mut out = Vec::new();
            let mut bytes = 0;
            // As the log in RocksDB answers: the entry that passes
            // `max_bytes` is the last one.
            for i in lo..hi {
                let Some(e) = self.cached(i) else { break };
                bytes += e.size().saturating_sub(16);
                out.push(e.clone());
                if bytes > max_bytes {
                    break;
                }
            }
            return Ok(out);
        }
        let raw = raftlog::entries(&self.engine, self.range_id, lo, hi, max_bytes).map_err(map_err)?;
        raw.into_iter()
            .map(|e| command::decode_entry(e).map_err(|x| StorageError::Other(x.to_string())))
            .collect()
    }

    fn term(&self, index: u64) -> Result<u64, StorageError> {
        if index == self.truncated.index {
            return Ok(self.truncated.term);
        }
        if index < self.truncated.index {
            return Err(StorageError::Compacted);
        }
        if index > self.last_index {
            return Err(StorageError::Unavailable);
        }
        if let Some(e) = self.cached(index) {
            return Ok(e.term);
        }
        raftlog::term(&self.engine, self.range_id, index).map_err(map_err)
    }

    fn first_index(&self) -> Result<u64, StorageError> {
        Ok(self.truncated.index + 1)
    }

    fn last_index(&self) -> Result<u64, StorageError> {
        Ok(self.last_index)
    }

    /// Builds a snapshot of the range as it is now (its SST files go to a
    /// directory of the store; the raft snapshot's data is a handle to them).
    fn snapshot(&self, _request_index: u64, _to: u64) -> Result<Snapshot, StorageError> {
        let other = |e: storage::Error| StorageError::Other(e.to_string());
        let desc = rangestate::descriptor(&self.engine, self.range_id)
            .map_err(other)?
            .ok_or(StorageError::SnapshotTemporarilyUnavailable)?;
        let seq = SNAPSHOT_SEQ.fetch_add(1, Ordering::Relaxed);
        let dir: PathBuf =
            self.engine
                .dir()
                .join("snapshots-out")
                .join(format!("r{}-{}-{seq}", self.range_id, std::process::id()));
        let meta = storage::snapshot::build_snapshot(&self.engine, self.range_id, &desc.start_key, &desc.end_key, &dir)
            .map_err(other)?;
        // The raft thread is the only writer, so the configuration read now is
        // the one as of the snapshot's applied index.
        let conf = load_conf(&self.engine, self.range_id)
            .map_err(other)?
            .unwrap_or_else(|| conf_state_of(&desc));
        let applied = meta.applied.unwrap_or_default();
        Ok(Snapshot {
            meta: SnapshotMeta {
                index: applied.applied_index,
                term: applied.applied_term,
                conf_state: conf,
            },
            data: SnapshotHandle {
                meta: Some(meta),
                dir: dir.to_string_lossy().into_owned(),
            }
            .encode_to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::{EntryPayload, Storage as _};

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            term,
            index,
            payload: EntryPayload::Normal(vec![index as u8; 10]),
        }
    }

    fn write(engine: &Engine, st: &mut ReplicaStorage, es: &[Entry]) {
        let mut b = engine.batch();
        let raw: Vec<_> = es.iter().map(command::encode_entry).collect();
        raftlog::append(&mut b, 7, &raw).unwrap();
        engine.write(b, false).unwrap();
        st.appended(es);
    }

    #[test]
    fn the_entry_cache_answers_as_the_log_does_through_appends_overwrites_and_applies() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(dir.path(), Default::default()).unwrap();
        let mut st = ReplicaStorage::open(engine.clone(), 7, ConfState::default()).unwrap();
        write(&engine, &mut st, &(1..=5).map(|i| entry(i, 1)).collect::<Vec<_>>());
        assert_eq!(st.cache.len(), 5);
        // An overwrite from index 4 with a newer term replaces the suffix.
        write(&engine, &mut st, &[entry(4, 2), entry(5, 2), entry(6, 2)]);
        let from_cache: Vec<_> = (1..=6).map(|i| st.term(i).unwrap()).collect();
        assert_eq!(from_cache, [1, 1, 1, 2, 2, 2]);
        assert_eq!(st.entries(2, 7, u64::MAX).unwrap(), {
            let mut v: Vec<_> = (2..=3).map(|i| entry(i, 1)).collect();
            v.extend((4..=6).map(|i| entry(i, 2)));
            v
        });
        // Byte limits as the log's: the entry that passes the limit is the last.
        assert_eq!(st.entries(1, 7, 15).unwrap().len(), 2);
        // Applied entries leave the cache (the last stays); the log answers.
        st.applied(6);
        assert_eq!(st.cache.len(), 1);
        assert_eq!(st.term(6).unwrap(), 2);
        assert_eq!(st.term(3).unwrap(), 1, "from RocksDB");
        assert_eq!(st.entries(3, 5, u64::MAX).unwrap(), vec![entry(3, 1), entry(4, 2)]);
        // A gap (a snapshot in between) restarts the cache.
        st.cache.clear();
        write(&engine, &mut st, &[entry(7, 3)]);
        assert_eq!(st.cache.len(), 1);
        assert_eq!(st.term(7).unwrap(), 3);
    }
}
