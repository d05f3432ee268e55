//! Generated protobuf types for Tardigrade, compiled from `proto/*.proto` by
//! `build.rs` with the pure-Rust `protox` compiler (no system `protoc`).
//!
//! Modules mirror the protobuf packages (prost's generated code refers across
//! packages by relative paths). This crate holds generated code only: no
//! logic, and it depends on nothing of ours.

// prost's oneofs hold messages by value; their sizes are the wire format's.
#![allow(clippy::large_enum_variant)]

/// Tardigrade's own packages.
pub mod tardigrade {
    /// On-disk records of the storage crate (`proto/storage.proto`).
    pub mod storage {
        include!(concat!(env!("OUT_DIR"), "/tardigrade.storage.rs"));
    }

    /// Raft commands and store records of kvserver (`proto/kvserver.proto`).
    pub mod kvserver {
        include!(concat!(env!("OUT_DIR"), "/tardigrade.kvserver.rs"));
    }

    /// Raft messages between stores (`proto/transport.proto`).
    pub mod transport {
        include!(concat!(env!("OUT_DIR"), "/tardigrade.transport.rs"));
    }

    /// Cluster membership: init, join, address books (`proto/cluster.proto`).
    pub mod cluster {
        include!(concat!(env!("OUT_DIR"), "/tardigrade.cluster.rs"));
    }

    /// The native KV API (`proto/kvpb.proto`).
    pub mod kvpb {
        include!(concat!(env!("OUT_DIR"), "/tardigrade.kvpb.rs"));
    }

    /// Tardigrade's administrative API (`proto/admin.proto`).
    pub mod admin {
        include!(concat!(env!("OUT_DIR"), "/tardigrade.admin.rs"));
    }
}

pub use tardigrade::{admin, cluster, kvpb, kvserver, storage, transport};

/// etcd's v3 API messages and services (`proto/etcdserverpb.proto`).
pub mod etcdserverpb {
    include!(concat!(env!("OUT_DIR"), "/etcdserverpb.rs"));
}

/// etcd's key-value record (`proto/mvccpb.proto`).
pub mod mvccpb {
    include!(concat!(env!("OUT_DIR"), "/mvccpb.rs"));
}
