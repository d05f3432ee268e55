//! MVCC reads: point gets and forward/reverse scans at a timestamp.
//!
//! Rules, per user key:
//! 1. An intent of the reading transaction, in its current epoch, is read as the
//!    key's value. An intent of an older epoch of the same transaction is ignored.
//! 2. An intent of another transaction at or below the uncertainty limit (which is
//!    at least the read timestamp) is a conflict; above it, it is ignored.
//! 3. Otherwise the newest committed version at or below the limit decides: above
//!    the read timestamp it is uncertain (an error); at or below it, it is the
//!    value (a tombstone reads as absent).
//!
//! Reads never write; conflicts are reported for the layers above to resolve.

use crate::cursor::{Cursor, Reader};
use crate::engine::Cf;
use crate::error::{Error, Result};
use crate::keys;
use crate::mvcc::value::{self, IntentRecord};
use crate::mvcc::{Intent, KeyValue, ReadOptions};
use crate::timestamp::Timestamp;

/// What one user key reads as.
pub(crate) enum KeyRead {
    Value(KeyValue),
    Absent,
    Conflict(Intent),
}

/// Reads one user key. The cursor must be over the `mvcc` column family and
/// include the key's records; it is left anywhere.
pub(crate) fn read_key(c: &mut dyn Cursor, user_key: &[u8], opts: &ReadOptions) -> Result<KeyRead> {
    let meta = keys::mvcc_meta_key(user_key);
    let limit = opts.limit();
    c.seek_ge(&meta)?;
    if let Some((k, v)) = c.entry() {
        if k == &meta[..] {
            let intent = value::decode_intent(v)?;
            if let Some(r) = own_or_conflict(user_key, intent, opts, limit)? {
                return Ok(r);
            }
        }
    }
    let mut vkey = meta.clone();
    keys::push_desc_ts(&mut vkey, limit);
    c.seek_ge(&vkey)?;
    let Some((k, v)) = c.entry() else {
        return Ok(KeyRead::Absent);
    };
    if k.len() != meta.len() + keys::TS_LEN || !k.starts_with(&meta) {
        return Ok(KeyRead::Absent);
    }
    let ts = keys::decode_desc_ts(&k[meta.len()..])?;
    if ts > opts.ts {
        return Err(Error::ReadWithinUncertainty {
            key: user_key.to_vec(),
            read_ts: opts.ts,
            value_ts: ts,
            limit,
        });
    }
    Ok(match value::decode_version(v)? {
        Some(val) => KeyRead::Value(KeyValue {
            key: user_key.to_vec(),
            value: val.to_vec(),
            ts,
        }),
        None => KeyRead::Absent,
    })
}

/// Applies rules 1 and 2 to an intent; `None` means "read the committed versions".
fn own_or_conflict(
    user_key: &[u8],
    intent: IntentRecord,
    opts: &ReadOptions,
    limit: crate::Timestamp,
) -> Result<Option<KeyRead>> {
    if let Some(txn) = &opts.txn {
        if txn.id == intent.txn.id {
            if intent.txn.epoch > txn.epoch {
                return Err(Error::TxnState(format!(
                    "intent on {user_key:?} has epoch {} above the reader's {}",
                    intent.txn.epoch, txn.epoch
                )));
            }
            if intent.txn.epoch < txn.epoch {
                return Ok(None);
            }
            return Ok(Some(match intent.value {
                Some(v) => KeyRead::Value(KeyValue {
                    key: user_key.to_vec(),
                    value: v,
                    ts: intent.ts,
                }),
                None => KeyRead::Absent,
            }));
        }
    }
    if intent.ts <= limit && !opts.ignore_intents {
        return Ok(Some(KeyRead::Conflict(Intent {
            key: user_key.to_vec(),
            txn: intent.txn,
            ts: intent.ts,
            anchor: intent.anchor,
        })));
    }
    Ok(None)
}

/// Reads `key` at `opts`: the value, `None` if absent or deleted, or an error for
/// a conflicting intent or an uncertain value.
pub fn get(reader: &dyn Reader, key: &[u8], opts: &ReadOptions) -> Result<Option<KeyValue>> {
    let (lower, upper) = keys::mvcc_span_bounds(key, &keys::next_user_key(key));
    let mut c = reader.cursor(Cf::Mvcc, &lower, upper.as_deref())?;
    match read_key(c.as_mut(), key, opts)? {
        KeyRead::Value(kv) => Ok(Some(kv)),
        KeyRead::Absent => Ok(None),
        KeyRead::Conflict(i) => Err(Error::WriteIntent { intents: vec![i] }),
    }
}

/// A scan of user keys in `[start, end)`.
#[derive(Clone, Debug)]
pub struct ScanOptions {
    pub start: Vec<u8>,
    /// Exclusive end; empty means no end.
    pub end: Vec<u8>,
    pub read: ReadOptions,
    /// At most this many keys are returned; 0 means no limit.
    pub max_keys: usize,
    /// Newest-key-first order: from `end` down to `start`.
    pub reverse: bool,
}

/// The result of a scan: the keys found and, if the limit stopped it, where to
/// resume (as the new `start` of a forward scan, or the new `end` of a reverse one).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScanResult {
    pub kvs: Vec<KeyValue>,
    pub resume_key: Option<Vec<u8>>,
}

/// Scans `[start, end)`. Conflicting intents met before the limit is reached are
/// all reported together in one `WriteIntent` error.
pub fn scan(reader: &dyn Reader, opts: &ScanOptions) -> Result<ScanResult> {
    if !opts.end.is_empty() && opts.start >= opts.end {
        return Ok(ScanResult::default());
    }
    let (lower, upper) = keys::mvcc_span_bounds(&opts.start, &opts.end);
    let mut c = reader.cursor(Cf::Mvcc, &lower, upper.as_deref())?;
    let mut out = ScanResult::default();
    let mut conflicts = Vec::new();
    let full = |n: usize| opts.max_keys > 0 && n >= opts.max_keys;
    if !opts.reverse {
        c.seek_ge(&lower)?;
        while let Some((k, _)) = c.entry() {
            let (user_key, _) = keys::unescape(k)?;
            if full(out.kvs.len()) {
                out.resume_key = Some(user_key);
                break;
            }
            match read_key(c.as_mut(), &user_key, &opts.read)? {
                KeyRead::Value(kv) => out.kvs.push(kv),
                KeyRead::Absent => {}
                KeyRead::Conflict(i) => conflicts.push(i),
            }
            c.seek_ge(&keys::mvcc_meta_key(&keys::next_user_key(&user_key)))?;
        }
    } else {
        c.seek_last()?;
        while let Some((k, _)) = c.entry() {
            let (user_key, _) = keys::unescape(k)?;
            if full(out.kvs.len()) {
                out.resume_key = Some(keys::next_user_key(&user_key));
                break;
            }
            match read_key(c.as_mut(), &user_key, &opts.read)? {
                KeyRead::Value(kv) => out.kvs.push(kv),
                KeyRead::Absent => {}
                KeyRead::Conflict(i) => conflicts.push(i),
            }
            c.seek_lt(&keys::mvcc_meta_key(&user_key))?;
        }
    }
    if !conflicts.is_empty() {
        return Err(Error::WriteIntent { intents: conflicts });
    }
    Ok(out)
}

/// What a refresh found in its span: a reason the reads there no longer hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Changed {
    /// A committed version of `key` at `ts`, inside the refreshed interval.
    Version { key: Vec<u8>, ts: Timestamp },
    /// Another transaction's intent on `key` at or below the new timestamp.
    Intent(Intent),
}

/// Checks that no user key in `[start, end)` got a committed version in
/// `(from, to]` and that no transaction other than `own` holds an intent at
/// or below `to`: a read of the span at `from` still reads the same at `to`.
/// Returns the first change found.
pub fn changed_since(
    reader: &dyn Reader,
    start: &[u8],
    end: &[u8],
    from: Timestamp,
    to: Timestamp,
    own: Option<crate::mvcc::TxnId>,
) -> Result<Option<Changed>> {
    let (lower, upper) = keys::mvcc_span_bounds(start, end);
    let mut c = reader.cursor(Cf::Mvcc, &lower, upper.as_deref())?;
    c.seek_ge(&lower)?;
    while let Some((k, _)) = c.entry() {
        let (user_key, _) = keys::unescape(k)?;
        let meta = keys::mvcc_meta_key(&user_key);
        c.seek_ge(&meta)?;
        if let Some((k, v)) = c.entry() {
            if k == &meta[..] {
                let i = value::decode_intent(v)?;
                if Some(i.txn.id) != own && i.ts <= to {
                    return Ok(Some(Changed::Intent(Intent {
                        key: user_key,
                        txn: i.txn,
                        ts: i.ts,
                        anchor: i.anchor,
                    })));
                }
            }
        }
        let mut vkey = meta.clone();
        keys::push_desc_ts(&mut vkey, to);
        c.seek_ge(&vkey)?;
        if let Some((k, _)) = c.entry() {
            if k.len() == meta.len() + keys::TS_LEN && k.starts_with(&meta) {
                let ts = keys::decode_desc_ts(&k[meta.len()..])?;
                if ts > from {
                    return Ok(Some(Changed::Version { key: user_key, ts }));
                }
            }
        }
        c.seek_ge(&keys::mvcc_meta_key(&keys::next_user_key(&user_key)))?;
    }
    Ok(None)
}
