//! The layout of the global keyspace: which prefixes hold what, and the spans
//! of the ranges a new store is bootstrapped with.
//!
//! ```text
//! [ \x00        , \x10 )   system range (also the meta range):
//!     [ \x01 , \x02 )        meta records: \x01 ++ end key -> RangeDescriptor
//! [ \x10        , \x11 )   etcd's keyspace: etcd key k is stored at \x10 k
//! [ \x11        , \xff\xff ) user data: the native KV API's raw keys (SQL, later)
//! ```
//!
//! No etcd client can name a key outside `\x10...`, and the native API only
//! keys of the user keyspace, so neither can reach system data. Only the
//! user keyspace splits. This module only computes bytes.

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

/// Prefix of the meta records (one per range, addressed by its end key).
pub const META_PREFIX: &[u8] = b"\x01";
/// End of the meta records.
pub const META_END: &[u8] = b"\x02";
/// Start of the user keyspace (the native KV API's keys).
pub const USER_START: &[u8] = ETCD_END;

/// The meta record key of a range ending at `end_key`.
pub fn meta_key(end_key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(META_PREFIX.len() + end_key.len());
    k.extend_from_slice(META_PREFIX);
    k.extend_from_slice(end_key);
    k
}

/// The end key a meta record key names, if it is one.
pub fn end_key_of_meta(meta: &[u8]) -> Option<&[u8]> {
    meta.strip_prefix(META_PREFIX)
}

/// Where a lookup of `key` starts: the first meta record whose end key is
/// above `key` is the range holding it (ends are exclusive).
pub fn meta_lookup_start(key: &[u8]) -> Vec<u8> {
    let mut k = meta_key(key);
    k.push(0);
    k
}

/// Whether `[start, end)` (an empty `end`: the single key `start`) lies in
/// the user keyspace, where the native API may read and write.
pub fn in_user_keyspace(start: &[u8], end: &[u8]) -> bool {
    let end_ok = if end.is_empty() {
        start < KEY_MAX
    } else {
        end <= KEY_MAX
    };
    start >= USER_START && end_ok
}

/// A key as people read it: printable ASCII as is, other bytes as `\xNN`
/// (the form `tardigrade debug split --key` and `debug ranges` take).
pub fn pretty(k: &[u8]) -> String {
    k.iter()
        .map(|&b| {
            if b.is_ascii_graphic() && b != b'\\' {
                (b as char).to_string()
            } else {
                format!("\\x{b:02x}")
            }
        })
        .collect()
}

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

/// Whether ranges of this id may split or merge (only user ranges do; the
/// system/meta and etcd ranges never).
pub fn splittable(range_id: u64) -> bool {
    range_id != SYSTEM_RANGE_ID && range_id != ETCD_RANGE_ID
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_lookup_finds_the_first_end_above_the_key() {
        // A range [a, c) has its record at \x01 c: a lookup of any key in it
        // starts at or below that record and above the record of [.., a).
        assert!(meta_lookup_start(b"a") > meta_key(b"a"));
        assert!(meta_lookup_start(b"a") <= meta_key(b"c"));
        assert!(meta_lookup_start(b"b\xff") <= meta_key(b"c"));
        assert!(meta_lookup_start(b"c") > meta_key(b"c"));
        assert_eq!(end_key_of_meta(&meta_key(b"xyz")), Some(&b"xyz"[..]));
        assert!(meta_key(KEY_MAX) < META_END.to_vec());
        assert!(in_user_keyspace(b"foo", b""));
        assert!(in_user_keyspace(b"\x11", b"\xff\xff"));
        assert!(!in_user_keyspace(b"\x10a", b""));
        assert!(!in_user_keyspace(b"a", b"\xff\xff\x00"));
        assert!(!in_user_keyspace(b"\xff\xff", b""));
        assert_eq!(pretty(b"m\x10 \\"), "m\\x10\\x20\\x5c");
    }
}
