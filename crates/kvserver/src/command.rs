//! How raft entries and commands are stored: the bytes kvserver puts into the
//! storage crate's raft log, and the command a normal entry carries.
//!
//! ```text
//! entry payload: 01 kind(1) data...    kind 0 empty, 1 normal, 2 conf change (proto)
//! ```
//!
//! Bytes read back from disk that do not decode are an error, never a panic.

use prost::Message as _;
use proto::kvserver::{conf_change_single, ConfChange as PbConfChange, ConfChangeSingle as PbSingle};
use raft::{ConfChange, ConfChangeKind, ConfChangeSingle, Entry, EntryPayload};
use storage::raftlog::RaftEntry;

const V1: u8 = 0x01;
const EMPTY: u8 = 0;
const NORMAL: u8 = 1;
const CONF: u8 = 2;

#[derive(Debug, thiserror::Error)]
#[error("corrupt raft entry {index}: {detail}")]
pub struct DecodeError {
    pub index: u64,
    pub detail: String,
}

pub fn conf_change_to_proto(cc: &ConfChange) -> PbConfChange {
    PbConfChange {
        changes: cc
            .changes
            .iter()
            .map(|c| PbSingle {
                kind: match c.kind {
                    ConfChangeKind::AddVoter => conf_change_single::Kind::AddVoter as i32,
                    ConfChangeKind::AddLearner => conf_change_single::Kind::AddLearner as i32,
                    ConfChangeKind::Remove => conf_change_single::Kind::Remove as i32,
                },
                node: c.node,
            })
            .collect(),
        context: cc.context.clone(),
    }
}

pub fn conf_change_from_proto(p: &PbConfChange) -> Result<ConfChange, String> {
    let mut changes = Vec::with_capacity(p.changes.len());
    for c in &p.changes {
        let kind = match conf_change_single::Kind::try_from(c.kind) {
            Ok(conf_change_single::Kind::AddVoter) => ConfChangeKind::AddVoter,
            Ok(conf_change_single::Kind::AddLearner) => ConfChangeKind::AddLearner,
            Ok(conf_change_single::Kind::Remove) => ConfChangeKind::Remove,
            Err(_) => return Err(format!("unknown change kind {}", c.kind)),
        };
        changes.push(ConfChangeSingle { kind, node: c.node });
    }
    Ok(ConfChange {
        changes,
        context: p.context.clone(),
    })
}

/// The storage form of a raft entry.
pub fn encode_entry(e: &Entry) -> RaftEntry {
    let mut payload = Vec::with_capacity(
        2 + match &e.payload {
            EntryPayload::Normal(d) => d.len(),
            _ => 16,
        },
    );
    payload.push(V1);
    match &e.payload {
        EntryPayload::Empty => payload.push(EMPTY),
        EntryPayload::Normal(d) => {
            payload.push(NORMAL);
            payload.extend_from_slice(d);
        }
        EntryPayload::ConfChange(cc) => {
            payload.push(CONF);
            conf_change_to_proto(cc).encode(&mut payload).ok();
        }
    }
    RaftEntry {
        index: e.index,
        term: e.term,
        payload,
    }
}

/// A raft entry from its storage form.
pub fn decode_entry(e: RaftEntry) -> Result<Entry, DecodeError> {
    let err = |detail: String| DecodeError { index: e.index, detail };
    let p = &e.payload;
    if p.len() < 2 || p[0] != V1 {
        return Err(err(format!("bad header {:?}", &p[..p.len().min(2)])));
    }
    let payload = match p[1] {
        EMPTY => EntryPayload::Empty,
        NORMAL => EntryPayload::Normal(p[2..].to_vec()),
        CONF => {
            let pb = PbConfChange::decode(&p[2..]).map_err(|x| err(x.to_string()))?;
            EntryPayload::ConfChange(conf_change_from_proto(&pb).map_err(err)?)
        }
        k => return Err(err(format!("unknown kind {k}"))),
    };
    Ok(Entry {
        term: e.term,
        index: e.index,
        payload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_garbage_is_an_error() {
        for payload in [
            EntryPayload::Empty,
            EntryPayload::Normal(b"cmd".to_vec()),
            EntryPayload::ConfChange(ConfChange {
                context: b"desc".to_vec(),
                changes: vec![ConfChangeSingle {
                    kind: ConfChangeKind::AddLearner,
                    node: 4,
                }],
            }),
        ] {
            let e = Entry {
                term: 3,
                index: 9,
                payload,
            };
            assert_eq!(decode_entry(encode_entry(&e)).unwrap(), e);
        }
        for bad in [vec![], vec![1], vec![2, 1], vec![1, 9], vec![1, 2, 0xff, 0xff]] {
            assert!(decode_entry(RaftEntry {
                index: 1,
                term: 1,
                payload: bad
            })
            .is_err());
        }
    }
}
