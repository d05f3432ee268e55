//! The client side of KV (the `kv` crate of the design): what a gateway needs
//! to send requests to the right ranges: the range cache and the DistSender
//! (native KV batches cut per range, found through the meta range), and the
//! transaction coordinator (`txn`) over either of them. `admin` holds the client calls that need more
//! than one node's answer (moving a lease).
//!
//! It talks to stores only through their RPC API and must never depend on
//! `kvserver`, `storage` or `raft`.

pub mod admin;
pub mod dist_sender;
pub mod range_cache;
pub mod txn;

pub use dist_sender::{DistError, DistSender, RangeError, RangeSender};
pub use range_cache::{CachedRange, Piece, RangeCache};
pub use txn::{BatchSender, Txn, TxnError};
