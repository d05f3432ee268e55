//! MVCC statistics of a range and their exact definitions.
//!
//! For every user key with at least one record (version or intent):
//! - `key_count` counts it once;
//! - every record adds its encoded key length to `key_bytes`, its stored value
//!   length to `val_bytes`, and one to `val_count`;
//! - its newest record (the intent if there is one, else the newest version) makes
//!   the key live unless it is a tombstone: `live_count` += 1 and `live_bytes` +=
//!   that record's key and value lengths;
//! - an intent adds one to `intent_count` and its key and value lengths to
//!   `intent_bytes`.
//!
//! Writers compute deltas with the same rules ([`KeySummary`]) and a full
//! recomputation ([`compute_stats`]) must always agree with their sum.

use std::ops::{AddAssign, SubAssign};

use crate::cursor::Reader;
use crate::engine::Cf;
use crate::error::Result;
use crate::keys;
use crate::mvcc::value;

/// Statistics of the MVCC data of one range.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MvccStats {
    pub live_bytes: i64,
    pub live_count: i64,
    pub key_bytes: i64,
    pub key_count: i64,
    pub val_bytes: i64,
    pub val_count: i64,
    pub intent_bytes: i64,
    pub intent_count: i64,
}

impl MvccStats {
    /// Key plus value bytes of every record.
    pub fn total_bytes(&self) -> i64 {
        self.key_bytes + self.val_bytes
    }

    pub(crate) fn add_record(&mut self, r: Record) {
        self.key_bytes += r.key_len;
        self.val_bytes += r.val_len;
        self.val_count += 1;
    }

    pub(crate) fn remove_record(&mut self, r: Record) {
        self.key_bytes -= r.key_len;
        self.val_bytes -= r.val_len;
        self.val_count -= 1;
    }
}

impl AddAssign for MvccStats {
    fn add_assign(&mut self, o: MvccStats) {
        self.live_bytes += o.live_bytes;
        self.live_count += o.live_count;
        self.key_bytes += o.key_bytes;
        self.key_count += o.key_count;
        self.val_bytes += o.val_bytes;
        self.val_count += o.val_count;
        self.intent_bytes += o.intent_bytes;
        self.intent_count += o.intent_count;
    }
}

impl SubAssign for MvccStats {
    fn sub_assign(&mut self, o: MvccStats) {
        self.live_bytes -= o.live_bytes;
        self.live_count -= o.live_count;
        self.key_bytes -= o.key_bytes;
        self.key_count -= o.key_count;
        self.val_bytes -= o.val_bytes;
        self.val_count -= o.val_count;
        self.intent_bytes -= o.intent_bytes;
        self.intent_count -= o.intent_count;
    }
}

impl From<MvccStats> for proto::storage::MvccStats {
    fn from(s: MvccStats) -> Self {
        proto::storage::MvccStats {
            live_bytes: s.live_bytes,
            live_count: s.live_count,
            key_bytes: s.key_bytes,
            key_count: s.key_count,
            val_bytes: s.val_bytes,
            val_count: s.val_count,
            intent_bytes: s.intent_bytes,
            intent_count: s.intent_count,
        }
    }
}

impl From<proto::storage::MvccStats> for MvccStats {
    fn from(s: proto::storage::MvccStats) -> Self {
        MvccStats {
            live_bytes: s.live_bytes,
            live_count: s.live_count,
            key_bytes: s.key_bytes,
            key_count: s.key_count,
            val_bytes: s.val_bytes,
            val_count: s.val_count,
            intent_bytes: s.intent_bytes,
            intent_count: s.intent_count,
        }
    }
}

/// Sizes of one stored record (a version or an intent).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Record {
    pub key_len: i64,
    pub val_len: i64,
    pub tombstone: bool,
}

impl Record {
    pub(crate) fn new(key_len: usize, val_len: usize, tombstone: bool) -> Self {
        Record {
            key_len: key_len as i64,
            val_len: val_len as i64,
            tombstone,
        }
    }
}

/// The key-level part of the statistics of one user key: what depends on its
/// intent, its newest version and whether it has any record at all.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct KeySummary {
    pub intent: Option<Record>,
    pub newest: Option<Record>,
    pub any: bool,
}

impl KeySummary {
    pub(crate) fn stats(&self) -> MvccStats {
        let mut s = MvccStats::default();
        if self.any {
            s.key_count = 1;
        }
        if let Some(i) = self.intent {
            s.intent_count = 1;
            s.intent_bytes = i.key_len + i.val_len;
        }
        if let Some(top) = self.intent.or(self.newest) {
            if !top.tombstone {
                s.live_count = 1;
                s.live_bytes = top.key_len + top.val_len;
            }
        }
        s
    }
}

/// Adds to `stats` the change from `before` to `after` of one key's summary.
pub(crate) fn apply_summary_delta(stats: &mut MvccStats, before: &KeySummary, after: &KeySummary) {
    *stats -= before.stats();
    *stats += after.stats();
}

/// Recomputes from scratch the statistics of user keys in `[start, end)`
/// (`end` empty: to the end of the keyspace).
pub fn compute_stats(reader: &dyn Reader, start: &[u8], end: &[u8]) -> Result<MvccStats> {
    let (lower, upper) = keys::mvcc_span_bounds(start, end);
    let mut c = reader.cursor(Cf::Mvcc, &lower, upper.as_deref())?;
    c.seek_ge(&lower)?;
    let mut total = MvccStats::default();
    let mut cur_key: Option<Vec<u8>> = None;
    let mut sum = KeySummary::default();
    while let Some((k, v)) = c.entry() {
        let mk = keys::decode_mvcc_key(k)?;
        if cur_key.as_deref() != Some(&mk.user_key[..]) {
            total += sum.stats();
            sum = KeySummary::default();
            cur_key = Some(mk.user_key.clone());
        }
        sum.any = true;
        match mk.ts {
            None => {
                let i = value::decode_intent(v)?;
                let r = Record::new(k.len(), v.len(), i.value.is_none());
                total.add_record(r);
                sum.intent = Some(r);
            }
            Some(_) => {
                let r = Record::new(k.len(), v.len(), value::version_is_tombstone(v)?);
                total.add_record(r);
                // Versions come newest first: the first one seen is the newest.
                if sum.newest.is_none() {
                    sum.newest = Some(r);
                }
            }
        }
        c.next()?;
    }
    total += sum.stats();
    Ok(total)
}
