//! Garbage collection of old MVCC versions below a threshold.
//!
//! For each user key: the newest version at or below the threshold is kept unless
//! it is a tombstone; every older version is removed; versions above the
//! threshold and intents are never touched. Reads at or above the threshold see
//! the same data before and after.

use crate::batch::Batch;
use crate::cursor::Reader;
use crate::engine::Cf;
use crate::error::Result;
use crate::keys;
use crate::mvcc::stats::{apply_summary_delta, KeySummary, Record};
use crate::mvcc::{value, MvccStats};
use crate::timestamp::Timestamp;

/// What a GC pass removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GcResult {
    pub keys_seen: u64,
    pub versions_removed: u64,
}

struct KeyVersions {
    user_key: Vec<u8>,
    intent: Option<Record>,
    /// Newest first: (encoded key, timestamp, record).
    versions: Vec<(Vec<u8>, Timestamp, Record)>,
}

/// Removes versions of user keys in `[start, end)` (`end` empty: no end) that no
/// read at or above `threshold` can see.
pub fn gc(
    batch: &mut Batch,
    stats: &mut MvccStats,
    start: &[u8],
    end: &[u8],
    threshold: Timestamp,
) -> Result<GcResult> {
    let (lower, upper) = keys::mvcc_span_bounds(start, end);
    let mut todo: Vec<KeyVersions> = Vec::new();
    let mut res = GcResult::default();
    {
        let mut c = batch.cursor(Cf::Mvcc, &lower, upper.as_deref())?;
        c.seek_ge(&lower)?;
        while let Some((k, v)) = c.entry() {
            let mk = keys::decode_mvcc_key(k)?;
            if todo.last().is_none_or(|kv| kv.user_key != mk.user_key) {
                res.keys_seen += 1;
                todo.push(KeyVersions {
                    user_key: mk.user_key.clone(),
                    intent: None,
                    versions: Vec::new(),
                });
            }
            let Some(kv) = todo.last_mut() else { break };
            match mk.ts {
                None => {
                    let i = value::decode_intent(v)?;
                    kv.intent = Some(Record::new(k.len(), v.len(), i.value.is_none()));
                }
                Some(ts) => {
                    let r = Record::new(k.len(), v.len(), value::version_is_tombstone(v)?);
                    kv.versions.push((k.to_vec(), ts, r));
                }
            }
            c.next()?;
        }
    }
    for kv in todo {
        let Some(first_below) = kv.versions.iter().position(|(_, ts, _)| *ts <= threshold) else {
            continue;
        };
        let keep_first = !kv.versions[first_below].2.tombstone;
        let from = if keep_first { first_below + 1 } else { first_below };
        if from >= kv.versions.len() {
            continue;
        }
        let before = KeySummary {
            intent: kv.intent,
            newest: kv.versions.first().map(|v| v.2),
            any: true,
        };
        for (k, _, r) in &kv.versions[from..] {
            batch.delete(Cf::Mvcc, k)?;
            stats.remove_record(*r);
            res.versions_removed += 1;
        }
        let after = KeySummary {
            intent: kv.intent,
            newest: kv.versions[..from].first().map(|v| v.2),
            any: kv.intent.is_some() || from > 0,
        };
        apply_summary_delta(stats, &before, &after);
    }
    Ok(res)
}
