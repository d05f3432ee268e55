//! The layout of the global keyspace: which prefixes hold what, and the spans
//! of the ranges a new store is bootstrapped with.
//!
//! ```text
//! [ \x00        , \x10 )   system range: meta records, node and store records
//! [ \x10        , \x11 )   etcd's keyspace: etcd key k is stored at \x10 k
//! [ \x11        , \xff\xff ) user data (SQL, later)
//! ```
//!
//! No etcd client can name a key outside `\x10...`, so none can reach system
//! or SQL data. This module only computes bytes.

/// The smallest key of the keyspace.
pub const KEY_MIN: &[u8] = b"";
/// The end of the keyspace: every range has a finite end, at most this.
pub const KEY_MAX: &[u8] = b"\xff\xff";
/// Prefix of the system keyspace (meta and node records).
pub const SYSTEM_PREFIX: &[u8] = b"\x02";
/// Prefix of etcd's keyspace.
pub const ETCD_PREFIX: &[u8] = b"\x10";
/// End of etcd's keyspace.
pub const ETCD_END: &[u8] = b"\x11";

/// The stored key of etcd key `k`.
pub fn etcd_key(k: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(ETCD_PREFIX.len() + k.len());
    v.extend_from_slice(ETCD_PREFIX);
    v.extend_from_slice(k);
    v
}

/// The exclusive end of etcd's keyspace.
pub fn etcd_span_end() -> Vec<u8> {
    ETCD_END.to_vec()
}

/// A range a new store starts with: (range id, start, end, name).
pub const BOOTSTRAP_RANGES: &[(u64, &[u8], &[u8], &str)] = &[
    (1, KEY_MIN, ETCD_PREFIX, "system"),
    (2, ETCD_PREFIX, ETCD_END, "etcd"),
    (3, ETCD_END, KEY_MAX, "user"),
];

/// The name a range is shown by: its bootstrap name, else `r<id>`.
pub fn range_name(range_id: u64) -> String {
    BOOTSTRAP_RANGES
        .iter()
        .find(|(id, ..)| *id == range_id)
        .map_or_else(|| format!("r{range_id}"), |(.., n)| n.to_string())
}

/// The system range (meta and node records).
pub const SYSTEM_RANGE_ID: u64 = 1;

/// The range that holds etcd's keyspace.
pub const ETCD_RANGE_ID: u64 = 2;
