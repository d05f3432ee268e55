//! The client side of KV (the `kv` crate of the design): what a gateway needs
//! to send requests to the right ranges. Today it holds the range cache;
//! the DistSender moves here from the server with issue 10, then the
//! transaction coordinator.
//!
//! It talks to stores only through their RPC API and must never depend on
//! `kvserver`, `storage` or `raft`.

pub mod range_cache;

pub use range_cache::{CachedRange, Piece, RangeCache};
