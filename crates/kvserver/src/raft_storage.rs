//! `raft::Storage` over the store's engine: a replica's raft log, hard state
//! and configuration as the raft core reads them.
//!
//! The scheduler writes what a `Ready` asks through the storage crate in its
//! one batch per cycle, then updates the cached log bounds here. Reads never
//! write.

use proto::storage::{replica_descriptor, RangeDescriptor};
use raft::{ConfState, Entry, HardState, Snapshot, StorageError};
use storage::raftlog::{self, TruncatedState};
use storage::Engine;

use crate::command;

/// The configuration a range descriptor describes: its replicas by replica id.
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
        let truncated = raftlog::truncated_state(&engine, range_id)?;
        let last_index = raftlog::last_index(&engine, range_id)?;
        Ok(ReplicaStorage {
            engine,
            range_id,
            conf,
            last_index,
            truncated,
        })
    }

    /// The scheduler appended entries ending at `last`.
    pub fn appended(&mut self, last: u64) {
        self.last_index = last;
    }

    pub fn set_conf(&mut self, conf: ConfState) {
        self.conf = conf;
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

    fn snapshot(&self, _request_index: u64, _to: u64) -> Result<Snapshot, StorageError> {
        // Single-node stores never send snapshots; the cluster issue adds them.
        Err(StorageError::SnapshotTemporarilyUnavailable)
    }
}
