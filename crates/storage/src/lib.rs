//! The storage engine of a Tardigrade store: one RocksDB per store.
//!
//! It holds, in separate column families, the MVCC data of every range, the
//! raft log and hard state of every range, and range-local state; it encodes keys
//! so that order is preserved; it implements MVCC reads and writes with intents,
//! uncertainty and statistics, garbage collection, raft log persistence, and
//! crash-safe range snapshots built from and ingested as SST files.
//!
//! This crate must never know about raft's logic, the network, or the layers
//! above: it stores and reads bytes with the rules of MVCC, and every error is a
//! typed value, never a panic on what it reads from disk.

pub mod batch;
pub mod cursor;
pub mod engine;
pub mod error;
pub mod keys;
pub mod mvcc;
pub mod raftlog;
pub mod rangestate;
pub mod snapshot;
pub mod timestamp;

pub use batch::Batch;
pub use cursor::{Cursor, Reader};
pub use engine::{Cf, Engine, EngineOptions, EngineSnapshot};
pub use error::{Error, Result};
pub use proto::storage::{RangeDescriptor, ReplicaDescriptor, SnapshotMeta};
pub use timestamp::Timestamp;
