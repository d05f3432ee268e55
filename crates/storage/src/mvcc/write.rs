//! MVCC writes: put, delete (a tombstone), and intent resolution.
//!
//! A write at `ts` fails with `WriteTooOld` if a committed version at or above
//! `ts` exists, and with `WriteIntent` if another transaction's intent is on the
//! key. A transactional write lays (or replaces) the transaction's intent; a
//! non-transactional one writes a committed version directly. Every function adds
//! the statistics delta it causes to the `stats` it is given.

use crate::batch::Batch;
use crate::cursor::Reader;
use crate::engine::Cf;
use crate::error::{Error, Result};
use crate::keys;
use crate::mvcc::stats::{apply_summary_delta, KeySummary, Record};
use crate::mvcc::value::{self, IntentRecord};
use crate::mvcc::{Intent, MvccStats, TxnMeta};
use crate::timestamp::Timestamp;

/// The records of one user key that writes depend on.
pub(crate) struct KeyState {
    pub intent: Option<(IntentRecord, Record)>,
    pub newest: Option<(Timestamp, Record)>,
}

impl KeyState {
    pub(crate) fn summary(&self) -> KeySummary {
        KeySummary {
            intent: self.intent.as_ref().map(|(_, r)| *r),
            newest: self.newest.map(|(_, r)| r),
            any: self.intent.is_some() || self.newest.is_some(),
        }
    }
}

pub(crate) fn load_key_state(reader: &dyn Reader, user_key: &[u8]) -> Result<KeyState> {
    let meta = keys::mvcc_meta_key(user_key);
    let upper = keys::mvcc_meta_key(&keys::next_user_key(user_key));
    let mut c = reader.cursor(Cf::Mvcc, &meta, Some(&upper))?;
    c.seek_ge(&meta)?;
    let mut st = KeyState {
        intent: None,
        newest: None,
    };
    if let Some((k, v)) = c.entry() {
        if k == &meta[..] {
            let rec = value::decode_intent(v)?;
            let r = Record::new(k.len(), v.len(), rec.value.is_none());
            st.intent = Some((rec, r));
            c.next()?;
        }
    }
    if let Some((k, v)) = c.entry() {
        let mk = keys::decode_mvcc_key(k)?;
        let ts = mk
            .ts
            .ok_or_else(|| Error::corrupt("mvcc key", format!("second meta key for {user_key:?}")))?;
        st.newest = Some((ts, Record::new(k.len(), v.len(), value::version_is_tombstone(v)?)));
    }
    Ok(st)
}

/// Writes `value` (`None`: a tombstone) to `key` at `ts`, as `txn` if given.
pub fn put(
    batch: &mut Batch,
    stats: &mut MvccStats,
    key: &[u8],
    ts: Timestamp,
    value: Option<&[u8]>,
    txn: Option<&TxnMeta>,
) -> Result<()> {
    put_anchored(batch, stats, key, ts, value, txn, &[]).map(|_| ())
}

/// Lays (or replaces) `txn`'s intent on `key` at `ts`, naming the key whose
/// range holds the transaction's record. Returns the timestamp the intent
/// is at (its own earlier intent's, if that was higher).
pub fn put_txn(
    batch: &mut Batch,
    stats: &mut MvccStats,
    key: &[u8],
    ts: Timestamp,
    value: Option<&[u8]>,
    txn: &TxnMeta,
    anchor: &[u8],
) -> Result<Timestamp> {
    put_anchored(batch, stats, key, ts, value, Some(txn), anchor)
}

fn put_anchored(
    batch: &mut Batch,
    stats: &mut MvccStats,
    key: &[u8],
    ts: Timestamp,
    value: Option<&[u8]>,
    txn: Option<&TxnMeta>,
    anchor: &[u8],
) -> Result<Timestamp> {
    if key.is_empty() {
        return Err(Error::InvalidArgument("empty key".into()));
    }
    let st = load_key_state(batch, key)?;
    let mut write_ts = ts;
    if let Some((intent, _)) = &st.intent {
        match txn {
            Some(t) if t.id == intent.txn.id => {
                if intent.txn.epoch > t.epoch {
                    return Err(Error::TxnState(format!(
                        "writing {key:?} at epoch {} over own intent of epoch {}",
                        t.epoch, intent.txn.epoch
                    )));
                }
                // A transaction's write timestamp never moves backwards.
                write_ts = write_ts.max(intent.ts);
            }
            _ => {
                return Err(Error::WriteIntent {
                    intents: vec![Intent {
                        key: key.to_vec(),
                        txn: intent.txn,
                        ts: intent.ts,
                        anchor: intent.anchor.clone(),
                    }],
                })
            }
        }
    }
    if let Some((existing, _)) = st.newest {
        if existing >= write_ts {
            return Err(Error::WriteTooOld {
                key: key.to_vec(),
                write_ts,
                existing_ts: existing,
                retry_ts: existing.next(),
            });
        }
    }
    let before = st.summary();
    let mut after = before;
    after.any = true;
    if let Some((_, old)) = st.intent {
        stats.remove_record(old);
        after.intent = None;
    }
    match txn {
        Some(t) => {
            let k = keys::mvcc_meta_key(key);
            let v = value::encode_intent_anchored(t, write_ts, value, anchor);
            let r = Record::new(k.len(), v.len(), value.is_none());
            batch.put(Cf::Mvcc, &k, &v)?;
            stats.add_record(r);
            after.intent = Some(r);
        }
        None => {
            let k = keys::mvcc_version_key(key, write_ts);
            let v = value::encode_version(value);
            let r = Record::new(k.len(), v.len(), value.is_none());
            batch.put(Cf::Mvcc, &k, &v)?;
            stats.add_record(r);
            after.newest = Some(r);
        }
    }
    apply_summary_delta(stats, &before, &after);
    Ok(write_ts)
}

/// Deletes `key` at `ts` by writing a tombstone, as `txn` if given.
pub fn delete(
    batch: &mut Batch,
    stats: &mut MvccStats,
    key: &[u8],
    ts: Timestamp,
    txn: Option<&TxnMeta>,
) -> Result<()> {
    put(batch, stats, key, ts, None, txn)
}

/// The fate of a transaction, applied to its intents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// Committed at `ts` in `epoch`: intents of that epoch become versions at
    /// `ts`; intents of older epochs are discarded.
    Commit { ts: Timestamp, epoch: u32 },
    /// Aborted: its intents are removed.
    Abort,
}

/// Resolves `txn`'s intent on `key`, if there is one. Returns whether an intent
/// of that transaction was found. Resolving twice is harmless.
pub fn resolve_intent(
    batch: &mut Batch,
    stats: &mut MvccStats,
    key: &[u8],
    txn: crate::mvcc::TxnId,
    resolution: Resolution,
) -> Result<bool> {
    let st = load_key_state(batch, key)?;
    let Some((intent, irec)) = &st.intent else {
        return Ok(false);
    };
    if intent.txn.id != txn {
        return Ok(false);
    }
    // Check everything before writing anything, so an error leaves the batch as it was.
    let commit_ts = match resolution {
        Resolution::Commit { ts, epoch } => {
            if intent.txn.epoch > epoch {
                return Err(Error::TxnState(format!(
                    "committing {key:?} at epoch {epoch} below its intent's epoch {}",
                    intent.txn.epoch
                )));
            }
            if intent.txn.epoch < epoch {
                None // a stale intent of an earlier epoch: discarded
            } else {
                if ts < intent.ts {
                    return Err(Error::TxnState(format!(
                        "committing {key:?} at {ts} below its intent at {}",
                        intent.ts
                    )));
                }
                if let Some((newest, _)) = st.newest {
                    if newest >= ts {
                        return Err(Error::TxnState(format!(
                            "committing {key:?} at {ts} at or below committed version {newest}"
                        )));
                    }
                }
                Some(ts)
            }
        }
        Resolution::Abort => None,
    };
    let before = st.summary();
    let mut after = before;
    after.intent = None;
    batch.delete(Cf::Mvcc, &keys::mvcc_meta_key(key))?;
    stats.remove_record(*irec);
    if let Some(ts) = commit_ts {
        let k = keys::mvcc_version_key(key, ts);
        let v = value::encode_version(intent.value.as_deref());
        let r = Record::new(k.len(), v.len(), intent.value.is_none());
        batch.put(Cf::Mvcc, &k, &v)?;
        stats.add_record(r);
        after.newest = Some(r);
    }
    after.any = after.newest.is_some();
    apply_summary_delta(stats, &before, &after);
    Ok(true)
}

/// Intents found in a span, each with its user key, and where to resume
/// if the walk stopped at its bound.
pub type FoundIntents = (Vec<(Vec<u8>, IntentRecord)>, Option<Vec<u8>>);

/// The intents in user keys `[start, end)`, in key order, at most `max`
/// of them (0: no limit): for resolving a transaction's intents over a span.
/// Returns them and, if `max` stopped the walk, the key to resume from.
pub fn intents_in_span(reader: &dyn Reader, start: &[u8], end: &[u8], max: usize) -> Result<FoundIntents> {
    let (lower, upper) = keys::mvcc_span_bounds(start, end);
    let mut c = reader.cursor(Cf::Mvcc, &lower, upper.as_deref())?;
    c.seek_ge(&lower)?;
    let mut out = Vec::new();
    while let Some((k, v)) = c.entry() {
        let (user_key, rest) = keys::unescape(k)?;
        if rest.is_empty() {
            if max > 0 && out.len() >= max {
                return Ok((out, Some(user_key)));
            }
            out.push((user_key.clone(), value::decode_intent(v)?));
        }
        c.seek_ge(&keys::mvcc_meta_key(&keys::next_user_key(&user_key)))?;
    }
    Ok((out, None))
}
