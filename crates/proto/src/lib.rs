//! Generated protobuf types for Tardigrade, compiled from `proto/*.proto` by
//! `build.rs` with the pure-Rust `protox` compiler (no system `protoc`).
//!
//! Modules mirror the protobuf packages (prost's generated code refers across
//! packages by relative paths). This crate holds generated code and one
//! fact both sides of the native KV API need (the key span of a request);
//! no other logic, and it depends on nothing of ours.

// prost's oneofs hold messages by value; their sizes are the wire format's.
#![allow(clippy::large_enum_variant)]

/// Every message of `proto/*.proto` described (a `FileDescriptorSet`), for
/// mapping them to JSON as etcd's gateway does.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptor.bin"));

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

impl kvpb::request_union::Value {
    /// The key span a request touches: `(start, end)`, `end` empty for one
    /// key. Transaction requests are addressed to their anchor key.
    pub fn span(&self) -> (&[u8], &[u8]) {
        use kvpb::request_union::Value as R;
        match self {
            R::Get(x) => (&x.key, &[]),
            R::Put(x) => (&x.key, &[]),
            R::ConditionalPut(x) => (&x.key, &[]),
            R::Delete(x) => (&x.key, &[]),
            R::Increment(x) => (&x.key, &[]),
            R::DeleteRange(x) => (&x.start_key, &x.end_key),
            R::Scan(x) => (&x.start_key, &x.end_key),
            R::ReverseScan(x) => (&x.start_key, &x.end_key),
            R::EndTxn(x) => (&x.key, &[]),
            R::HeartbeatTxn(x) => (&x.key, &[]),
            R::PushTxn(x) => (&x.key, &[]),
            R::QueryTxn(x) => (&x.key, &[]),
            R::ResolveIntent(x) => (&x.key, &x.end_key),
            R::Refresh(x) => (&x.key, &x.end_key),
        }
    }

    /// Whether it covers a span (cut at range bounds) rather than one key.
    pub fn is_span(&self) -> bool {
        use kvpb::request_union::Value as R;
        match self {
            R::DeleteRange(_) | R::Scan(_) | R::ReverseScan(_) => true,
            R::ResolveIntent(x) => !x.end_key.is_empty(),
            R::Refresh(x) => !x.end_key.is_empty(),
            _ => false,
        }
    }

    /// `self` with its span cut to `[start, end)` (a span request; any other
    /// is returned as it is).
    pub fn clipped(&self, start: &[u8], end: &[u8]) -> Self {
        use kvpb::request_union::Value as R;
        let mut r = self.clone();
        if !self.is_span() {
            return r;
        }
        let (s, e) = match &mut r {
            R::DeleteRange(x) => (&mut x.start_key, &mut x.end_key),
            R::Scan(x) => (&mut x.start_key, &mut x.end_key),
            R::ReverseScan(x) => (&mut x.start_key, &mut x.end_key),
            R::ResolveIntent(x) => (&mut x.key, &mut x.end_key),
            R::Refresh(x) => (&mut x.key, &mut x.end_key),
            _ => return r,
        };
        *s = start.to_vec();
        *e = end.to_vec();
        r
    }
}
