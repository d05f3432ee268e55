//! etcd's change history, which watches are fed from: which keys each
//! revision changed, written in the batch of the write that made the
//! revision, and the events of a span of revisions read back from it and
//! the MVCC versions.
//!
//! ```text
//! range-local 'V' ++ revision    -> the etcd keys it changed, in write order
//! ```
//!
//! The history goes back to the compaction revision: compaction removes
//! the entries below it with the versions they name. Every replica of the
//! etcd range holds the same history (it is applied state), so a watch can
//! be served from any of them. Once the etcd keyspace spans several ranges,
//! each range's history is its own feed and a watch merges them in
//! revision order below their closed timestamps.
//!
//! This module reads and writes storage only; it never waits or sends.

use proto::mvccpb::{event::EventType, Event, KeyValue};
use storage::mvcc::{self, ReadOptions};
use storage::{keys, Batch, Cf, Reader, Timestamp};

use crate::etcd::EtcdFailure;
use crate::keyspace::{etcd_key, ETCD_RANGE_ID};

const HISTORY_SUFFIX: u8 = b'V';

fn history_key(rev: i64) -> Vec<u8> {
    let mut k = keys::range_local_key(ETCD_RANGE_ID, HISTORY_SUFFIX);
    k.extend_from_slice(&(rev.max(0) as u64).to_be_bytes());
    k
}

/// Records that revision `rev` changed `changed` (etcd keys, in write order).
pub fn record(b: &mut Batch, rev: i64, changed: &[Vec<u8>]) -> Result<(), EtcdFailure> {
    let mut v = Vec::with_capacity(changed.iter().map(|k| k.len() + 4).sum());
    for k in changed {
        v.extend_from_slice(&(k.len() as u32).to_be_bytes());
        v.extend_from_slice(k);
    }
    b.put(Cf::Local, &history_key(rev), &v).map_err(EtcdFailure::Engine)
}

/// Drops the history below `rev` (a compaction to `rev`).
pub fn compact(b: &mut Batch, rev: i64) -> Result<(), EtcdFailure> {
    b.delete_range(Cf::Local, &history_key(0), &history_key(rev))
        .map_err(EtcdFailure::Engine)
}

fn decode_keys(v: &[u8]) -> Result<Vec<Vec<u8>>, EtcdFailure> {
    let mut out = Vec::new();
    let mut rest = v;
    while !rest.is_empty() {
        let (len, tail) = rest
            .split_first_chunk::<4>()
            .ok_or_else(|| EtcdFailure::Corrupt("history entry cut short".into()))?;
        let len = u32::from_be_bytes(*len) as usize;
        if tail.len() < len {
            return Err(EtcdFailure::Corrupt("history entry cut short".into()));
        }
        out.push(tail[..len].to_vec());
        rest = &tail[len..];
    }
    Ok(out)
}

fn kv_at(r: &dyn Reader, key: &[u8], rev: i64) -> Result<Option<KeyValue>, EtcdFailure> {
    let k = etcd_key(key);
    match mvcc::get(r, &k, &ReadOptions::at(Timestamp::new(rev.max(0) as u64, 0)))? {
        Some(v) => {
            let mut kv: KeyValue = prost::Message::decode(v.value.as_slice())
                .map_err(|e: prost::DecodeError| EtcdFailure::Corrupt(e.to_string()))?;
            kv.key = key.to_vec();
            Ok(Some(kv))
        }
        None => Ok(None),
    }
}

/// The events of one revision.
#[derive(Clone, Debug, PartialEq)]
pub struct Revision {
    pub rev: i64,
    pub events: Vec<Event>,
}

/// The events of revisions in `[from, to]`, oldest first, at most
/// `max_revs` revisions of them; each carries its previous version if
/// `prev_kv`. A key whose version at its revision is gone (compacted away
/// under it) yields no event.
pub fn read(r: &dyn Reader, from: i64, to: i64, max_revs: usize, prev_kv: bool) -> Result<Vec<Revision>, EtcdFailure> {
    let mut out = Vec::new();
    if from > to {
        return Ok(out);
    }
    let lo = history_key(from);
    let hi = history_key(to.saturating_add(1));
    let mut c = r.cursor(Cf::Local, &lo, Some(&hi)).map_err(EtcdFailure::Engine)?;
    c.seek_ge(&lo).map_err(EtcdFailure::Engine)?;
    while let Some((k, v)) = c.entry() {
        if out.len() >= max_revs {
            break;
        }
        let tail: [u8; 8] = k
            .get(lo.len() - 8..)
            .and_then(|t| t.try_into().ok())
            .ok_or_else(|| EtcdFailure::Corrupt(format!("history key {k:?}")))?;
        let rev = u64::from_be_bytes(tail) as i64;
        let mut events = Vec::new();
        for key in decode_keys(v)? {
            let prev = if prev_kv { kv_at(r, &key, rev - 1)? } else { None };
            let ev = match kv_at(r, &key, rev)? {
                Some(kv) if kv.mod_revision == rev => Event {
                    r#type: EventType::Put as i32,
                    kv: Some(kv),
                    prev_kv: prev,
                },
                Some(_) => continue,
                None => Event {
                    r#type: EventType::Delete as i32,
                    kv: Some(KeyValue {
                        key,
                        mod_revision: rev,
                        ..Default::default()
                    }),
                    prev_kv: prev,
                },
            };
            events.push(ev);
        }
        out.push(Revision { rev, events });
        c.next().map_err(EtcdFailure::Engine)?;
    }
    Ok(out)
}
