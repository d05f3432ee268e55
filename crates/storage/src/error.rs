//! Typed errors of the storage crate.
//!
//! MVCC conflicts (`WriteTooOld`, `WriteIntent`, `ReadWithinUncertainty`) are
//! ordinary answers that callers act on; `Corruption` means bytes on disk are not
//! what this code wrote, and is never turned into a panic.

use crate::mvcc::Intent;
use crate::timestamp::Timestamp;

/// Result alias of the storage crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// RocksDB reported an error (I/O, corruption it detected itself, bad options).
    #[error("rocksdb: {0}")]
    Engine(#[from] rocksdb::Error),

    /// Filesystem error outside RocksDB (snapshot files, directories).
    #[error("io: {0}")]
    Io(#[from] std::io::Error),

    /// Bytes read from disk do not decode: a bad key, an unknown version byte, a
    /// truncated record.
    #[error("corrupt {what}: {detail}")]
    Corruption { what: &'static str, detail: String },

    /// A write at `write_ts` found a committed version at `existing_ts >= write_ts`;
    /// it may be retried at `retry_ts` (just above the existing version).
    #[error("write too old: write at {write_ts} on key {key:?} below existing version at {existing_ts}; retry at {retry_ts}")]
    WriteTooOld {
        key: Vec<u8>,
        write_ts: Timestamp,
        existing_ts: Timestamp,
        retry_ts: Timestamp,
    },

    /// The request met intents of other transactions.
    #[error("conflicting intents on {} key(s), first {:?}", intents.len(), intents.first().map(|i| &i.key))]
    WriteIntent { intents: Vec<Intent> },

    /// A read at `read_ts` found a value at `value_ts` with
    /// `read_ts < value_ts <= uncertainty_limit`: the value may have been written
    /// before the read in real time, so the read must restart above it.
    #[error("read within uncertainty interval: key {key:?} value at {value_ts}, read at {read_ts}, limit {limit}")]
    ReadWithinUncertainty {
        key: Vec<u8>,
        read_ts: Timestamp,
        value_ts: Timestamp,
        limit: Timestamp,
    },

    /// A transaction met its own intent from a later epoch than its own, or asked
    /// to commit below the intent's timestamp: the caller's transaction state is wrong.
    #[error("transaction state error: {0}")]
    TxnState(String),

    /// Raft log entries that were asked for are below the truncated index.
    #[error("raft log compacted: index {index} <= truncated index {truncated}")]
    LogCompacted { index: u64, truncated: u64 },

    /// Raft log entries that were asked for are past the last index.
    #[error("raft log unavailable: index {index} > last index {last}")]
    LogUnavailable { index: u64, last: u64 },

    /// A caller passed arguments that cannot be honoured (an empty key, an inverted span).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl Error {
    pub fn corrupt(what: &'static str, detail: impl Into<String>) -> Self {
        Error::Corruption {
            what,
            detail: detail.into(),
        }
    }
}
