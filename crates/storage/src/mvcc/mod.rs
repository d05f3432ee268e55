//! Multi-version concurrency control over the `mvcc` column family.
//!
//! Every user key holds committed versions (a value or a tombstone at an HLC
//! timestamp) and at most one intent: a transaction's provisional value, kept at
//! the key's meta position. Reads see the newest version at or below their
//! timestamp; writes below an existing version fail with `WriteTooOld`; intents of
//! other transactions are conflicts; a read that finds a version inside its
//! uncertainty interval says so instead of skipping it.
//!
//! Every write takes an `&mut MvccStats` and adds to it the delta it causes, so
//! the caller can record it in the same batch. This module decides nothing about
//! which transaction wins a conflict: it reports, the layers above act.

mod gc;
mod read;
mod stats;
pub mod value;
mod write;

pub use gc::{gc, GcResult};
pub use read::{changed_since, get, scan, Changed, ScanOptions, ScanResult};
pub use stats::{compute_stats, MvccStats};
pub use write::{delete, intents_in_span, put, put_txn, resolve_intent, Resolution};

use crate::timestamp::Timestamp;

/// A transaction's identity (a UUID's 16 bytes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TxnId(pub [u8; 16]);

/// What an intent records of its transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TxnMeta {
    pub id: TxnId,
    /// Incremented at each restart of the transaction; intents of older epochs
    /// are stale and are neither read by it nor committed.
    pub epoch: u32,
}

/// An intent met by a request: the key, its transaction and its timestamp.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Intent {
    pub key: Vec<u8>,
    pub txn: TxnMeta,
    pub ts: Timestamp,
    /// Where the transaction's record lives (empty: unknown).
    pub anchor: Vec<u8>,
}

/// How to read: at `ts`, reporting values up to `uncertainty_limit`, as `txn`.
#[derive(Clone, Copy, Debug)]
pub struct ReadOptions {
    pub ts: Timestamp,
    /// Values in `(ts, uncertainty_limit]` are reported as uncertain. A limit at
    /// or below `ts` means no uncertainty interval.
    pub uncertainty_limit: Timestamp,
    /// The reading transaction: its own intents are visible to it.
    pub txn: Option<TxnMeta>,
    /// Testing knob, never on in production: read past other transactions'
    /// intents as if they were not there (a dirty-read bug on purpose, for
    /// proving that the transaction checkers catch one).
    pub ignore_intents: bool,
}

impl ReadOptions {
    /// A plain read at `ts`, no uncertainty, no transaction.
    pub fn at(ts: Timestamp) -> Self {
        ReadOptions {
            ts,
            uncertainty_limit: ts,
            txn: None,
            ignore_intents: false,
        }
    }

    pub(crate) fn limit(&self) -> Timestamp {
        self.uncertainty_limit.max(self.ts)
    }
}

/// A value read from MVCC: its bytes and the timestamp it was written at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub ts: Timestamp,
}
