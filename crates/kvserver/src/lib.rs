//! A Tardigrade store: one engine, the replicas of ranges on it, the MultiRaft
//! scheduler that drives all their raft groups from one thread with one synced
//! write per cycle, the node's hybrid logical clock, node liveness, and the
//! evaluation of requests (etcd's KV API, applied in log order). One
//! mechanism per module: see the module map in `docs/architecture.md`.
//!
//! This crate joins `raft` and `storage`; it must never speak gRPC or HTTP
//! (that is `server`). It reaches time only through `hlc::WallClock`,
//! `std::time::Instant` (the scheduler's tick timer and leases) and tokio's
//! timers (waiting for proposals, the liveness heartbeat loop), so a
//! simulation can replace them.

mod apply;
pub mod batcheval;
pub mod command;
pub mod concurrency;
mod cycle;
pub mod etcd;
pub mod etcd_history;
pub mod etcd_lease;
pub mod evaluator;
pub mod hlc;
pub mod intent_resolver;
pub mod keyspace;
pub mod kv_batch;
pub mod liveness;
pub mod lock_table;
pub mod log_truncation;
mod log_writer;
pub mod merge;
pub mod meta;
pub mod metrics;
pub mod node_ids;
pub mod raft_storage;
pub mod replica;
pub mod replicate_queue;
mod router;
mod scheduler;
pub mod spanlatch;
pub mod split;
pub mod split_queue;
pub mod store;
pub mod store_liveness;
pub mod ticker;
pub mod transport;
pub mod tscache;
pub mod txn_eval;
pub mod txn_record;
pub mod txnwait;

pub use replica::{ApplyOutcome, ProposeError, ReplicaStatus};
pub use store::{Bootstrap, Store, StoreConfig, StoreHandle, StoreOptions};

/// Why a store cannot start or go on.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage: {0}")]
    Storage(#[from] storage::Error),
    #[error("corrupt store: {0}")]
    Corrupt(String),
    #[error("raft: {0}")]
    Raft(String),
    /// Applying a committed entry failed: the replica can no longer follow
    /// its log, so the store stops.
    #[error("apply: {0}")]
    Apply(String),
    #[error("io: {0}")]
    Io(String),
    #[error("this store belongs to cluster {store}, not to cluster {cluster}")]
    WrongCluster { store: String, cluster: String },
    #[error("the store is empty and was not asked to bootstrap or join a cluster")]
    NotInitialized,
}
