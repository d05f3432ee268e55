//! Load generators (and, later, consistency checkers) that drive a cluster
//! through its public client APIs, with hdrhistogram latency reports.
//!
//! A workload never reaches inside a node: what it measures is what a client
//! sees. Every run is bounded in time and count and stops by itself.

pub mod append;
pub mod bank;
pub mod coordination;
pub mod kv;
pub mod linearizability;
pub mod list_append;
pub mod nemesis;
pub mod put;
pub mod register;
pub mod register_client;
pub mod splits;
pub mod txn_setup;
