//! `raft::Storage` over the store's engine: a replica's raft log, hard state
//! and configuration as the raft core reads them, and snapshots built on
//! demand from the engine.
//!
//! The scheduler writes what a `Ready` asks through the storage crate in its
//! one batch per cycle, then updates the cached log bounds here. Reads never
//! write, except that building a snapshot writes its SST files to a directory.

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
        };
        s.reload()?;
        Ok(s)
    }

    /// Re-reads the log bounds (after a snapshot replaced the log).
    pub fn reload(&mut self) -> Result<(), storage::Error> {
        self.truncated = raftlog::truncated_state(&self.engine, self.range_id)?;
        self.last_index = raftlog::last_index(&self.engine, self.range_id)?;
        Ok(())
    }

    /// The scheduler appended entries ending at `last`.
    pub fn appended(&mut self, last: u64) {
        self.last_index = last;
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
