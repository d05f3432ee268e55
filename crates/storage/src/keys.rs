//! Key encodings of every column family.
//!
//! MVCC keys (column family `mvcc`):
//!
//! ```text
//! meta key (intent):  escape(user_key) 0x00 0x01
//! version key:        escape(user_key) 0x00 0x01 !wall(8, BE) !logical(4, BE)
//! ```
//!
//! `escape` replaces every 0x00 byte with 0x00 0xFF and the terminator 0x00 0x01
//! ends the user key, so the encoding preserves bytewise order of user keys and no
//! encoded key is a prefix of another user key's keys. The timestamp is stored
//! bit-inverted, so the versions of one key sort newest first, and the meta key,
//! being a prefix of them all, sorts before every version.
//!
//! Raft keys (column family `raft`): `range_id(8, BE)` followed by `h` (hard state),
//! `l index(8, BE)` (log entry) or `t` (truncated state).
//!
//! Local keys (column family `local`): `r range_id(8, BE) suffix` for range-local
//! state, `s name...` for store-local records, and `k escape(anchor)
//! txn_id(16)` for transaction records, addressed by key: the records
//! anchored in a range's keys form one span that goes with them (snapshots
//! carry it; splits and merges move nothing).
//!
//! This module only builds and parses bytes: it never touches the engine.

use crate::error::{Error, Result};
use crate::timestamp::Timestamp;

const ESCAPE: u8 = 0x00;
const ESCAPED_00: u8 = 0xFF;
const TERMINATOR: u8 = 0x01;
/// Length of an encoded timestamp suffix.
pub const TS_LEN: usize = 12;

/// Appends the order-preserving escape encoding of `user_key`, with its terminator.
pub fn escape_into(out: &mut Vec<u8>, user_key: &[u8]) {
    out.reserve(user_key.len() + 2 + TS_LEN);
    for &b in user_key {
        if b == ESCAPE {
            out.push(ESCAPE);
            out.push(ESCAPED_00);
        } else {
            out.push(b);
        }
    }
    out.push(ESCAPE);
    out.push(TERMINATOR);
}

/// Encodes the meta (intent) key of `user_key`: the key with no timestamp.
pub fn mvcc_meta_key(user_key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(user_key.len() + 2 + TS_LEN);
    escape_into(&mut out, user_key);
    out
}

/// Appends a timestamp so that newer timestamps sort first.
pub fn push_desc_ts(out: &mut Vec<u8>, ts: Timestamp) {
    out.extend_from_slice(&(!ts.wall).to_be_bytes());
    out.extend_from_slice(&(!ts.logical).to_be_bytes());
}

/// Encodes the key of the version of `user_key` at `ts`.
pub fn mvcc_version_key(user_key: &[u8], ts: Timestamp) -> Vec<u8> {
    let mut out = mvcc_meta_key(user_key);
    push_desc_ts(&mut out, ts);
    out
}

/// A decoded MVCC key: the user key and, for a version, its timestamp.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MvccKey {
    pub user_key: Vec<u8>,
    /// `None` for the meta (intent) key.
    pub ts: Option<Timestamp>,
}

/// Decodes an MVCC key; bytes that this module cannot have written are `Corruption`.
pub fn decode_mvcc_key(enc: &[u8]) -> Result<MvccKey> {
    let (user_key, rest) = unescape(enc)?;
    let ts = match rest.len() {
        0 => None,
        TS_LEN => Some(decode_desc_ts(rest)?),
        n => {
            return Err(Error::corrupt(
                "mvcc key",
                format!("timestamp suffix of {n} bytes in {enc:?}"),
            ))
        }
    };
    Ok(MvccKey { user_key, ts })
}

/// Splits an encoded key into its user key and the bytes after the terminator.
pub fn unescape(enc: &[u8]) -> Result<(Vec<u8>, &[u8])> {
    let mut user = Vec::with_capacity(enc.len());
    let mut i = 0;
    while i < enc.len() {
        let b = enc[i];
        if b != ESCAPE {
            user.push(b);
            i += 1;
            continue;
        }
        match enc.get(i + 1) {
            Some(&ESCAPED_00) => {
                user.push(0);
                i += 2;
            }
            Some(&TERMINATOR) => return Ok((user, &enc[i + 2..])),
            other => {
                return Err(Error::corrupt(
                    "mvcc key",
                    format!("bad escape {other:?} at {i} in {enc:?}"),
                ))
            }
        }
    }
    Err(Error::corrupt("mvcc key", format!("no terminator in {enc:?}")))
}

/// Decodes a bit-inverted timestamp suffix.
pub fn decode_desc_ts(b: &[u8]) -> Result<Timestamp> {
    if b.len() != TS_LEN {
        return Err(Error::corrupt("timestamp", format!("{} bytes", b.len())));
    }
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[..8]);
    let mut l = [0u8; 4];
    l.copy_from_slice(&b[8..12]);
    Ok(Timestamp::new(!u64::from_be_bytes(w), !u32::from_be_bytes(l)))
}

/// The length of the encoded user-key part (escape plus terminator) of `user_key`.
pub fn escaped_len(user_key: &[u8]) -> usize {
    user_key.len() + user_key.iter().filter(|&&b| b == 0).count() + 2
}

/// The smallest user key greater than `k` (its immediate successor).
pub fn next_user_key(k: &[u8]) -> Vec<u8> {
    let mut n = Vec::with_capacity(k.len() + 1);
    n.extend_from_slice(k);
    n.push(0);
    n
}

/// Encoded bounds `[lower, upper)` of every MVCC key of user keys in `[start, end)`.
/// An empty `end` means "no upper bound" (`None`).
pub fn mvcc_span_bounds(start: &[u8], end: &[u8]) -> (Vec<u8>, Option<Vec<u8>>) {
    let lower = mvcc_meta_key(start);
    let upper = if end.is_empty() { None } else { Some(mvcc_meta_key(end)) };
    (lower, upper)
}

// ---- raft column family -------------------------------------------------

const RAFT_HARD_STATE: u8 = b'h';
const RAFT_LOG: u8 = b'l';
const RAFT_TRUNCATED: u8 = b't';

fn range_prefix(tag: Option<u8>, range_id: u64, cap: usize) -> Vec<u8> {
    let mut k = Vec::with_capacity(cap);
    if let Some(t) = tag {
        k.push(t);
    }
    k.extend_from_slice(&range_id.to_be_bytes());
    k
}

pub fn raft_hard_state_key(range_id: u64) -> Vec<u8> {
    let mut k = range_prefix(None, range_id, 9);
    k.push(RAFT_HARD_STATE);
    k
}

pub fn raft_truncated_key(range_id: u64) -> Vec<u8> {
    let mut k = range_prefix(None, range_id, 9);
    k.push(RAFT_TRUNCATED);
    k
}

pub fn raft_log_key(range_id: u64, index: u64) -> Vec<u8> {
    let mut k = range_prefix(None, range_id, 17);
    k.push(RAFT_LOG);
    k.extend_from_slice(&index.to_be_bytes());
    k
}

/// Bounds `[lower, upper)` of the log entries of `range_id`.
pub fn raft_log_bounds(range_id: u64) -> (Vec<u8>, Vec<u8>) {
    let mut lower = range_prefix(None, range_id, 9);
    lower.push(RAFT_LOG);
    let mut upper = range_prefix(None, range_id, 9);
    upper.push(RAFT_LOG + 1);
    (lower, upper)
}

/// Bounds of every raft key (log, hard state, truncated state) of `range_id`.
pub fn raft_range_bounds(range_id: u64) -> (Vec<u8>, Vec<u8>) {
    let lower = range_prefix(None, range_id, 9);
    let mut upper = lower.clone();
    upper.push(0xFF);
    (lower, upper)
}

/// Parses the index out of a log key of `range_id`.
pub fn decode_raft_log_key(range_id: u64, key: &[u8]) -> Result<u64> {
    let prefix = raft_log_bounds(range_id).0;
    if key.len() != prefix.len() + 8 || !key.starts_with(&prefix) {
        return Err(Error::corrupt("raft log key", format!("{key:?}")));
    }
    let mut b = [0u8; 8];
    b.copy_from_slice(&key[prefix.len()..]);
    Ok(u64::from_be_bytes(b))
}

// ---- local column family -------------------------------------------------

const LOCAL_BY_KEY: u8 = b'k';
const LOCAL_RANGE: u8 = b'r';
const LOCAL_STORE: u8 = b's';
const RANGE_APPLIED: u8 = b'a';
const RANGE_DESCRIPTOR: u8 = b'd';
const RANGE_GC_THRESHOLD: u8 = b'g';

/// The key of range-local record `suffix` of `range_id`. Suffixes in use:
/// `a` applied state, `d` descriptor, `g` GC threshold (this crate); `e` etcd
/// revision state (kvserver). Upper-case letters are reserved for layers above.
pub fn range_local_key(range_id: u64, suffix: u8) -> Vec<u8> {
    let mut k = range_prefix(Some(LOCAL_RANGE), range_id, 10);
    k.push(suffix);
    k
}

/// The key of the record of transaction `id` anchored at `anchor`.
pub fn txn_record_key(anchor: &[u8], id: &[u8; 16]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + anchor.len() + 2 + 16);
    out.push(LOCAL_BY_KEY);
    escape_into(&mut out, anchor);
    out.extend_from_slice(id);
    out
}

/// Encoded bounds `[lower, upper)` of the records anchored in user keys
/// `[start, end)` (an empty `end`: no upper bound).
pub fn txn_record_span(start: &[u8], end: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let mut lower = vec![LOCAL_BY_KEY];
    escape_into(&mut lower, start);
    let upper = if end.is_empty() {
        vec![LOCAL_BY_KEY + 1]
    } else {
        let mut u = vec![LOCAL_BY_KEY];
        escape_into(&mut u, end);
        u
    };
    (lower, upper)
}

pub fn range_applied_state_key(range_id: u64) -> Vec<u8> {
    range_local_key(range_id, RANGE_APPLIED)
}

pub fn range_descriptor_key(range_id: u64) -> Vec<u8> {
    range_local_key(range_id, RANGE_DESCRIPTOR)
}

pub fn range_gc_threshold_key(range_id: u64) -> Vec<u8> {
    range_local_key(range_id, RANGE_GC_THRESHOLD)
}

/// Bounds of every range-local key of `range_id`.
pub fn range_local_bounds(range_id: u64) -> (Vec<u8>, Vec<u8>) {
    let lower = range_prefix(Some(LOCAL_RANGE), range_id, 10);
    let mut upper = lower.clone();
    upper.push(0xFF);
    (lower, upper)
}

/// The key of store-local record `name` (names must not start with `snapmark`).
pub fn store_local_key(name: &[u8]) -> Vec<u8> {
    let mut k = vec![LOCAL_STORE];
    k.extend_from_slice(name);
    k
}

const SNAPSHOT_MARKER: &[u8] = b"snapmark";

pub fn snapshot_marker_key(range_id: u64) -> Vec<u8> {
    let mut k = vec![LOCAL_STORE];
    k.extend_from_slice(SNAPSHOT_MARKER);
    k.extend_from_slice(&range_id.to_be_bytes());
    k
}

/// Bounds of every snapshot marker key.
pub fn snapshot_marker_bounds() -> (Vec<u8>, Vec<u8>) {
    let mut lower = vec![LOCAL_STORE];
    lower.extend_from_slice(SNAPSHOT_MARKER);
    let mut upper = lower.clone();
    upper.push(0xFF);
    (lower, upper)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_key_sorts_before_versions_and_versions_newest_first() {
        let m = mvcc_meta_key(b"a");
        let v9 = mvcc_version_key(b"a", Timestamp::new(9, 0));
        let v5 = mvcc_version_key(b"a", Timestamp::new(5, 3));
        let v5b = mvcc_version_key(b"a", Timestamp::new(5, 2));
        assert!(m < v9 && v9 < v5 && v5 < v5b);
        assert!(v5b < mvcc_meta_key(b"a\x00"));
        assert!(v5b < mvcc_meta_key(b"b"));
    }

    #[test]
    fn corrupt_keys_are_errors() {
        assert!(decode_mvcc_key(b"abc").is_err());
        assert!(decode_mvcc_key(b"a\x00\x02").is_err());
        assert!(decode_mvcc_key(b"a\x00\x01xyz").is_err());
        assert!(decode_mvcc_key(b"a\x00").is_err());
    }
}
