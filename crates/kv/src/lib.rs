//! The client side of KV (the `kv` crate of the design): what a gateway needs
//! to send requests to the right ranges. Today it holds the range cache;
//! the DistSender moves here from the server with issue 10, then the
//! transaction coordinator. `admin` holds the client calls that need more
//! than one node's answer (moving a lease).
//!
//! It talks to stores only through their RPC API and must never depend on
//! `kvserver`, `storage` or `raft`.

pub mod admin;
pub mod range_cache;

pub use range_cache::{CachedRange, Piece, RangeCache};
