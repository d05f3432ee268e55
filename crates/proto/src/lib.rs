//! Generated protobuf types for Tardigrade, compiled from `proto/*.proto` by
//! `build.rs` with the pure-Rust `protox` compiler (no system `protoc`).
//!
//! This crate holds generated code only: no logic, and it depends on nothing of ours.

/// On-disk records of the storage crate (`proto/storage.proto`).
pub mod storage {
    include!(concat!(env!("OUT_DIR"), "/tardigrade.storage.rs"));
}
