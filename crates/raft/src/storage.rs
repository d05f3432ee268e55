//! The log storage Raft reads from: a small trait the node implements (over
//! RocksDB, through the storage crate) and an in-memory implementation for the
//! simulator and tests.
//!
//! Raft only reads through this trait. The node writes to its storage what a
//! `Ready` hands it (entries, hard state, snapshot) before telling Raft they are
//! durable, and compacts the log when it chooses.

use crate::types::{ConfState, Entry, HardState, Snapshot, SnapshotMeta};

/// Why storage could not answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StorageError {
    /// The entry was compacted away; a snapshot is needed.
    Compacted,
    /// The entry does not exist (yet).
    Unavailable,
    /// A snapshot cannot be produced right now; Raft will ask again later.
    SnapshotTemporarilyUnavailable,
    /// The storage failed; the message says how. Raft treats the node as unable
    /// to proceed with that operation.
    Other(String),
}

impl std::fmt::Display for StorageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StorageError::Compacted => write!(f, "log compacted"),
            StorageError::Unavailable => write!(f, "log entry unavailable"),
            StorageError::SnapshotTemporarilyUnavailable => write!(f, "snapshot temporarily unavailable"),
            StorageError::Other(s) => write!(f, "storage: {s}"),
        }
    }
}

impl std::error::Error for StorageError {}

/// What Raft needs to read from durable storage.
pub trait Storage {
    /// The durable hard state and configuration, read once at start.
    fn initial_state(&self) -> Result<(HardState, ConfState), StorageError>;
    /// Entries `[lo, hi)`, at most `max_bytes` of them (but at least one).
    fn entries(&self, lo: u64, hi: u64, max_bytes: u64) -> Result<Vec<Entry>, StorageError>;
    /// The term of the entry at `index` (the snapshot's index is answered too).
    fn term(&self, index: u64) -> Result<u64, StorageError>;
    /// The first index still in the log (the snapshot's index + 1).
    fn first_index(&self) -> Result<u64, StorageError>;
    /// The last index in the log (the snapshot's index if the log is empty).
    fn last_index(&self) -> Result<u64, StorageError>;
    /// A snapshot at or after `request_index`, to send to `to`.
    fn snapshot(&self, request_index: u64, to: u64) -> Result<Snapshot, StorageError>;
}

/// The index of the snapshot a new group starts from: log entries before it
/// never exist, so a new member must be sent a snapshot.
pub const BOOTSTRAP_INDEX: u64 = 1;
/// The term of that snapshot.
pub const BOOTSTRAP_TERM: u64 = 1;

/// An in-memory Raft log, for the simulator and tests.
#[derive(Clone, Debug, Default)]
pub struct MemStorage {
    pub hard_state: HardState,
    /// The configuration as of the last applied change (the node keeps it
    /// durable with its state machine).
    pub conf_state: ConfState,
    /// The snapshot the log starts after (index 0 for a new group).
    pub snapshot: Snapshot,
    /// Entries `snapshot.meta.index + 1 ..`.
    pub entries: Vec<Entry>,
    /// The index the node's state machine has applied, with `conf_state`
    /// current there: `snapshot()` is taken at it (on demand), so that it holds
    /// every member added before it.
    pub applied: u64,
}

impl MemStorage {
    /// A new group's storage, bootstrapped as if from a snapshot at
    /// (`BOOTSTRAP_INDEX`, `BOOTSTRAP_TERM`) holding the initial configuration.
    /// Members added later start empty (`MemStorage::default()`) and are
    /// initialized by a snapshot, never by replaying the log from index 1.
    pub fn new_with_conf(conf: ConfState) -> Self {
        MemStorage {
            hard_state: HardState {
                term: BOOTSTRAP_TERM,
                vote: 0,
                commit: BOOTSTRAP_INDEX,
            },
            conf_state: conf.clone(),
            snapshot: Snapshot {
                meta: SnapshotMeta {
                    index: BOOTSTRAP_INDEX,
                    term: BOOTSTRAP_TERM,
                    conf_state: conf,
                },
                data: Vec::new(),
            },
            entries: Vec::new(),
            applied: BOOTSTRAP_INDEX,
        }
    }

    fn offset(&self) -> u64 {
        self.snapshot.meta.index + 1
    }

    /// Appends entries, replacing any conflicting suffix.
    pub fn append(&mut self, ents: &[Entry]) {
        let Some(first) = ents.first() else { return };
        let off = self.offset();
        if first.index + ents.len() as u64 <= off {
            return; // all already compacted into the snapshot
        }
        let skip = off.saturating_sub(first.index) as usize;
        let ents = &ents[skip..];
        let start = (ents[0].index - off) as usize;
        assert!(
            start <= self.entries.len(),
            "append leaves a gap: {} after {}",
            ents[0].index,
            self.last()
        );
        self.entries.truncate(start);
        self.entries.extend_from_slice(ents);
    }

    fn last(&self) -> u64 {
        self.snapshot.meta.index + self.entries.len() as u64
    }

    /// Replaces the whole log with a snapshot.
    pub fn apply_snapshot(&mut self, snap: Snapshot) {
        self.entries.clear();
        if self.hard_state.commit < snap.meta.index {
            self.hard_state.commit = snap.meta.index;
        }
        self.conf_state = snap.meta.conf_state.clone();
        self.applied = self.applied.max(snap.meta.index);
        self.snapshot = snap;
    }

    /// Drops entries up to `index` (at most the last index), keeping `data` as
    /// the snapshot taken there with configuration `conf`.
    pub fn compact(&mut self, index: u64, conf: ConfState, data: Vec<u8>) {
        if index <= self.snapshot.meta.index || index > self.last() {
            return;
        }
        let term = self.entries[(index - self.offset()) as usize].term;
        self.entries.drain(..(index - self.snapshot.meta.index) as usize);
        self.snapshot = Snapshot {
            meta: SnapshotMeta {
                index,
                term,
                conf_state: conf,
            },
            data,
        };
    }
}

impl Storage for MemStorage {
    fn initial_state(&self) -> Result<(HardState, ConfState), StorageError> {
        Ok((self.hard_state, self.conf_state.clone()))
    }

    fn entries(&self, lo: u64, hi: u64, max_bytes: u64) -> Result<Vec<Entry>, StorageError> {
        if lo < self.offset() {
            return Err(StorageError::Compacted);
        }
        if hi > self.last() + 1 {
            return Err(StorageError::Unavailable);
        }
        let mut out = Vec::new();
        let mut size = 0;
        for e in &self.entries[(lo - self.offset()) as usize..(hi - self.offset()) as usize] {
            size += e.size();
            if !out.is_empty() && size > max_bytes {
                break;
            }
            out.push(e.clone());
        }
        Ok(out)
    }

    fn term(&self, index: u64) -> Result<u64, StorageError> {
        if index == self.snapshot.meta.index {
            return Ok(self.snapshot.meta.term);
        }
        if index < self.offset() {
            return Err(StorageError::Compacted);
        }
        if index > self.last() {
            return Err(StorageError::Unavailable);
        }
        Ok(self.entries[(index - self.offset()) as usize].term)
    }

    fn first_index(&self) -> Result<u64, StorageError> {
        Ok(self.offset())
    }

    fn last_index(&self) -> Result<u64, StorageError> {
        Ok(self.last())
    }

    fn snapshot(&self, _request_index: u64, _to: u64) -> Result<Snapshot, StorageError> {
        if self.applied <= self.snapshot.meta.index {
            return Ok(self.snapshot.clone());
        }
        Ok(Snapshot {
            meta: SnapshotMeta {
                index: self.applied,
                term: self.term(self.applied)?,
                conf_state: self.conf_state.clone(),
            },
            data: self.snapshot.data.clone(),
        })
    }
}
