//! Raft persistence of each range: log entries, hard state and truncated state,
//! in the `raft` column family.
//!
//! Entries are opaque to this module (the raft crate's encoding is the caller's
//! business) apart from their index and term. The log of a range holds the
//! entries `(truncated.index, last_index]`; `term(truncated.index)` is answered
//! from the truncated state. Everything is written through a [`Batch`], so appends
//! of many ranges become one write and one sync.

use crate::batch::Batch;
use crate::cursor::Reader;
use crate::engine::Cf;
use crate::error::{Error, Result};
use crate::keys;

/// One raft log entry as stored: its position and opaque payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RaftEntry {
    pub index: u64,
    pub term: u64,
    pub payload: Vec<u8>,
}

/// Raft's durable vote and commit state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HardState {
    pub term: u64,
    pub vote: u64,
    pub commit: u64,
}

/// The last entry removed from the log by truncation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TruncatedState {
    pub index: u64,
    pub term: u64,
}

const ENTRY_V1: u8 = 0x01;

fn encode_entry(e: &RaftEntry) -> Vec<u8> {
    let mut v = Vec::with_capacity(9 + e.payload.len());
    v.push(ENTRY_V1);
    v.extend_from_slice(&e.term.to_be_bytes());
    v.extend_from_slice(&e.payload);
    v
}

fn decode_term(v: &[u8]) -> Result<u64> {
    match v.first() {
        Some(&ENTRY_V1) if v.len() >= 9 => {
            let mut t = [0u8; 8];
            t.copy_from_slice(&v[1..9]);
            Ok(u64::from_be_bytes(t))
        }
        Some(&ENTRY_V1) => Err(Error::corrupt("raft entry", format!("{} bytes", v.len()))),
        Some(b) => Err(Error::corrupt("raft entry", format!("unknown version byte {b:#04x}"))),
        None => Err(Error::corrupt("raft entry", "empty")),
    }
}

fn decode_entry(index: u64, v: &[u8]) -> Result<RaftEntry> {
    let term = decode_term(v)?;
    Ok(RaftEntry {
        index,
        term,
        payload: v[9..].to_vec(),
    })
}

fn decode_proto<M: prost::Message + Default>(what: &'static str, b: &[u8]) -> Result<M> {
    M::decode(b).map_err(|e| Error::corrupt(what, e.to_string()))
}

/// The truncated state of `range_id` (zero for a log never truncated).
pub fn truncated_state(r: &dyn Reader, range_id: u64) -> Result<TruncatedState> {
    match r.get(Cf::Raft, &keys::raft_truncated_key(range_id))? {
        None => Ok(TruncatedState::default()),
        Some(b) => {
            let p: proto::storage::RaftTruncatedState = decode_proto("truncated state", &b)?;
            Ok(TruncatedState {
                index: p.index,
                term: p.term,
            })
        }
    }
}

pub(crate) fn put_truncated_state(b: &mut Batch, range_id: u64, t: TruncatedState) -> Result<()> {
    let p = proto::storage::RaftTruncatedState {
        index: t.index,
        term: t.term,
    };
    b.put(
        Cf::Raft,
        &keys::raft_truncated_key(range_id),
        &prost::Message::encode_to_vec(&p),
    )
}

/// The hard state of `range_id` (zero if never saved).
pub fn hard_state(r: &dyn Reader, range_id: u64) -> Result<HardState> {
    match r.get(Cf::Raft, &keys::raft_hard_state_key(range_id))? {
        None => Ok(HardState::default()),
        Some(b) => {
            let p: proto::storage::RaftHardState = decode_proto("hard state", &b)?;
            Ok(HardState {
                term: p.term,
                vote: p.vote,
                commit: p.commit,
            })
        }
    }
}

/// Saves the hard state of `range_id`.
pub fn save_hard_state(b: &mut Batch, range_id: u64, hs: HardState) -> Result<()> {
    let p = proto::storage::RaftHardState {
        term: hs.term,
        vote: hs.vote,
        commit: hs.commit,
    };
    b.put(
        Cf::Raft,
        &keys::raft_hard_state_key(range_id),
        &prost::Message::encode_to_vec(&p),
    )
}

/// The index of the last entry in the log, or the truncated index if it is empty.
pub fn last_index(r: &dyn Reader, range_id: u64) -> Result<u64> {
    let (lo, hi) = keys::raft_log_bounds(range_id);
    let mut c = r.cursor(Cf::Raft, &lo, Some(&hi))?;
    c.seek_last()?;
    match c.entry() {
        Some((k, _)) => keys::decode_raft_log_key(range_id, k),
        None => Ok(truncated_state(r, range_id)?.index),
    }
}

/// The index of the first entry the log can hold: truncated index + 1.
pub fn first_index(r: &dyn Reader, range_id: u64) -> Result<u64> {
    Ok(truncated_state(r, range_id)?.index + 1)
}

/// The term of the entry at `index`: from the log, or from the truncated state
/// when `index` is the truncated index.
pub fn term(r: &dyn Reader, range_id: u64, index: u64) -> Result<u64> {
    let t = truncated_state(r, range_id)?;
    if index == t.index {
        return Ok(t.term);
    }
    if index < t.index {
        return Err(Error::LogCompacted {
            index,
            truncated: t.index,
        });
    }
    match r.get(Cf::Raft, &keys::raft_log_key(range_id, index))? {
        Some(v) => decode_term(&v),
        None => Err(Error::LogUnavailable {
            index,
            last: last_index(r, range_id)?,
        }),
    }
}

/// Entries `[lo, hi)`, stopping once their payloads pass `max_bytes` (at least
/// one entry is always returned when `lo < hi`).
pub fn entries(r: &dyn Reader, range_id: u64, lo: u64, hi: u64, max_bytes: u64) -> Result<Vec<RaftEntry>> {
    let t = truncated_state(r, range_id)?;
    if lo <= t.index {
        return Err(Error::LogCompacted {
            index: lo,
            truncated: t.index,
        });
    }
    let mut out = Vec::new();
    if lo >= hi {
        return Ok(out);
    }
    let lower = keys::raft_log_key(range_id, lo);
    let upper = keys::raft_log_key(range_id, hi);
    let mut c = r.cursor(Cf::Raft, &lower, Some(&upper))?;
    c.seek_ge(&lower)?;
    let mut bytes = 0u64;
    let mut expect = lo;
    while let Some((k, v)) = c.entry() {
        let idx = keys::decode_raft_log_key(range_id, k)?;
        if idx != expect {
            return Err(Error::corrupt(
                "raft log",
                format!("range {range_id}: hole at index {expect}, next entry is {idx}"),
            ));
        }
        let e = decode_entry(idx, v)?;
        bytes += e.payload.len() as u64;
        out.push(e);
        expect += 1;
        if bytes > max_bytes {
            break;
        }
        c.next()?;
    }
    if out.is_empty() || (expect < hi && bytes <= max_bytes) {
        return Err(Error::LogUnavailable {
            index: expect,
            last: last_index(r, range_id)?,
        });
    }
    Ok(out)
}

/// Appends `entries` (contiguous indexes) to the log of `range_id`, replacing any
/// existing entries from the first new index on: a conflicting suffix is removed.
pub fn append(b: &mut Batch, range_id: u64, entries: &[RaftEntry]) -> Result<()> {
    let t = truncated_state(b, range_id)?;
    let last = last_index(b, range_id)?;
    append_within(b, range_id, entries, t.index, last)
}

/// [`append`] for a caller that knows the log's bounds, `(truncated, last]`
/// (the raft loop keeps them): no read of the log on the write path.
pub fn append_within(b: &mut Batch, range_id: u64, entries: &[RaftEntry], truncated: u64, last: u64) -> Result<()> {
    let Some(first) = entries.first() else { return Ok(()) };
    for w in entries.windows(2) {
        if w[1].index != w[0].index + 1 {
            return Err(Error::InvalidArgument(format!(
                "range {range_id}: entries not contiguous ({} then {})",
                w[0].index, w[1].index
            )));
        }
    }
    if first.index <= truncated || first.index > last + 1 {
        return Err(Error::InvalidArgument(format!(
            "range {range_id}: append at {} to a log holding ({truncated}, {last}]",
            first.index
        )));
    }
    let new_last = first.index + entries.len() as u64 - 1;
    for e in entries {
        b.put(Cf::Raft, &keys::raft_log_key(range_id, e.index), &encode_entry(e))?;
    }
    for idx in new_last + 1..=last {
        b.delete(Cf::Raft, &keys::raft_log_key(range_id, idx))?;
    }
    Ok(())
}

/// Removes every entry at or below `index` and records `(index, term(index))` as
/// the truncated state. Truncating at or below the current point does nothing.
pub fn truncate(b: &mut Batch, range_id: u64, index: u64) -> Result<()> {
    let t = truncated_state(b, range_id)?;
    if index <= t.index {
        return Ok(());
    }
    let term = term(b, range_id, index)?;
    let (lo, _) = keys::raft_log_bounds(range_id);
    b.delete_range(Cf::Raft, &lo, &keys::raft_log_key(range_id, index + 1))?;
    put_truncated_state(b, range_id, TruncatedState { index, term })
}

/// Removes the whole log of `range_id` and sets its truncated state, as when a
/// snapshot at `(index, term)` replaces it.
pub fn reset(b: &mut Batch, range_id: u64, index: u64, term: u64) -> Result<()> {
    let (lo, hi) = keys::raft_log_bounds(range_id);
    b.delete_range(Cf::Raft, &lo, &hi)?;
    put_truncated_state(b, range_id, TruncatedState { index, term })
}
