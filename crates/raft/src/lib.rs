//! Raft consensus as a deterministic state machine, in the style of etcd's raft
//! package: inputs are `tick()`, `step(message)`, `propose(data)` and calls for
//! membership change, leader transfer, read index and snapshots; outputs come in
//! a [`Ready`]; persistence is reported back asynchronously with
//! [`RawNode::on_persisted`].
//!
//! Features: leader election with randomized timeouts, pre-vote and
//! check-quorum, log replication with fast backtracking and flow control,
//! commit by quorum of durable copies of an entry of the leader's term,
//! leader-lease support safe under pauses, ReadIndex, learners, joint-consensus
//! membership change, snapshots, log compaction and leader transfer.
//!
//! This crate must never do I/O, read a clock, spawn threads or use async:
//! everything it does is a function of its inputs and a seeded RNG, which is
//! what lets the simulator (`sim`, compiled only for tests) explore thousands of
//! fault schedules reproducibly.

mod confchange;
mod fortify;
mod log;
mod node;
mod progress;
mod quorum;
mod raft;
mod read;
mod replication;
mod status;
mod storage;
pub mod support;
mod types;

#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;

pub use confchange::{apply_to as apply_conf_change_to, enter_joint, leave_joint, ConfChangeRefused};
pub use fortify::{Fortification, LeaseBasis};
pub use node::{RawNode, Ready};
pub use progress::ProgressState;
pub use raft::{Config, ProposeError, RaftCounters};
pub use status::{FollowerProgress, Status};
pub use storage::{MemStorage, Storage, StorageError, BOOTSTRAP_INDEX, BOOTSTRAP_TERM};
pub use types::*;
