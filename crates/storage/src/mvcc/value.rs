//! Encoding of what the `mvcc` column family stores: committed versions and
//! intent records. Each starts with a version byte, and decoding anything else is
//! a `Corruption` error, never a panic.
//!
//! ```text
//! version:  0x01 value...          (a value)
//!           0x02                   (a tombstone)
//! intent:   0x11 txn_id(16) epoch(4) wall(8) logical(4) kind(1) value...
//!           0x12 txn_id(16) epoch(4) wall(8) logical(4) anchor_len(4) anchor kind(1) value...
//!           kind = 0x01 value, 0x02 tombstone; the anchor is the key whose
//!           range holds the transaction's record (0x11: none)
//! ```

use crate::error::{Error, Result};
use crate::mvcc::{TxnId, TxnMeta};
use crate::timestamp::Timestamp;

const VERSION_VALUE: u8 = 0x01;
const VERSION_TOMBSTONE: u8 = 0x02;
const INTENT_V1: u8 = 0x11;
const INTENT_V2: u8 = 0x12;
const INTENT_HEADER: usize = 1 + 16 + 4 + 8 + 4 + 1;

/// Encodes a committed version: `Some(value)` or `None` for a tombstone.
pub fn encode_version(value: Option<&[u8]>) -> Vec<u8> {
    match value {
        Some(v) => {
            let mut out = Vec::with_capacity(1 + v.len());
            out.push(VERSION_VALUE);
            out.extend_from_slice(v);
            out
        }
        None => vec![VERSION_TOMBSTONE],
    }
}

/// Decodes a committed version into `Some(value)` or `None` for a tombstone.
pub fn decode_version(b: &[u8]) -> Result<Option<&[u8]>> {
    match b.first() {
        Some(&VERSION_VALUE) => Ok(Some(&b[1..])),
        Some(&VERSION_TOMBSTONE) if b.len() == 1 => Ok(None),
        Some(&VERSION_TOMBSTONE) => Err(Error::corrupt("mvcc version", "tombstone with payload")),
        Some(v) => Err(Error::corrupt("mvcc version", format!("unknown version byte {v:#04x}"))),
        None => Err(Error::corrupt("mvcc version", "empty value")),
    }
}

/// Whether a stored version is a tombstone (without copying the value).
pub fn version_is_tombstone(b: &[u8]) -> Result<bool> {
    Ok(decode_version(b)?.is_none())
}

/// A decoded intent record: a provisional value of a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IntentRecord {
    pub txn: TxnMeta,
    pub ts: Timestamp,
    /// `None` for a provisional delete.
    pub value: Option<Vec<u8>>,
    /// The transaction's anchor key (where its record lives); empty if the
    /// writer named none.
    pub anchor: Vec<u8>,
}

pub fn encode_intent(txn: &TxnMeta, ts: Timestamp, value: Option<&[u8]>) -> Vec<u8> {
    encode_intent_anchored(txn, ts, value, &[])
}

/// An intent naming its transaction's anchor key.
pub fn encode_intent_anchored(txn: &TxnMeta, ts: Timestamp, value: Option<&[u8]>, anchor: &[u8]) -> Vec<u8> {
    let vlen = value.map_or(0, <[u8]>::len);
    let mut out = Vec::with_capacity(INTENT_HEADER + 4 + anchor.len() + vlen);
    out.push(if anchor.is_empty() { INTENT_V1 } else { INTENT_V2 });
    out.extend_from_slice(&txn.id.0);
    out.extend_from_slice(&txn.epoch.to_be_bytes());
    out.extend_from_slice(&ts.wall.to_be_bytes());
    out.extend_from_slice(&ts.logical.to_be_bytes());
    if !anchor.is_empty() {
        out.extend_from_slice(&(anchor.len() as u32).to_be_bytes());
        out.extend_from_slice(anchor);
    }
    match value {
        Some(v) => {
            out.push(VERSION_VALUE);
            out.extend_from_slice(v);
        }
        None => out.push(VERSION_TOMBSTONE),
    }
    out
}

pub fn decode_intent(b: &[u8]) -> Result<IntentRecord> {
    let anchored = match b.first() {
        Some(&INTENT_V1) => false,
        Some(&INTENT_V2) => true,
        Some(v) => return Err(Error::corrupt("intent", format!("unknown version byte {v:#04x}"))),
        None => return Err(Error::corrupt("intent", "empty record")),
    };
    if b.len() < INTENT_HEADER {
        return Err(Error::corrupt(
            "intent",
            format!("{} bytes, header needs {INTENT_HEADER}", b.len()),
        ));
    }
    let mut id = [0u8; 16];
    id.copy_from_slice(&b[1..17]);
    let epoch = u32::from_be_bytes([b[17], b[18], b[19], b[20]]);
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[21..29]);
    let logical = u32::from_be_bytes([b[29], b[30], b[31], b[32]]);
    let (anchor, rest) = if anchored {
        if b.len() < INTENT_HEADER + 4 {
            return Err(Error::corrupt(
                "intent",
                format!("{} bytes, an anchored header needs more", b.len()),
            ));
        }
        let n = u32::from_be_bytes([b[33], b[34], b[35], b[36]]) as usize;
        let end = 37usize.saturating_add(n);
        if b.len() < end + 1 {
            return Err(Error::corrupt("intent", format!("anchor of {n} bytes past the end")));
        }
        (b[37..end].to_vec(), &b[end..])
    } else {
        (Vec::new(), &b[33..])
    };
    let value = match rest[0] {
        VERSION_VALUE => Some(rest[1..].to_vec()),
        VERSION_TOMBSTONE if rest.len() == 1 => None,
        k => return Err(Error::corrupt("intent", format!("bad value kind {k:#04x}"))),
    };
    Ok(IntentRecord {
        txn: TxnMeta { id: TxnId(id), epoch },
        ts: Timestamp::new(u64::from_be_bytes(w), logical),
        value,
        anchor,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_garbage() {
        assert_eq!(decode_version(&encode_version(Some(b"x"))).unwrap(), Some(&b"x"[..]));
        assert_eq!(decode_version(&encode_version(None)).unwrap(), None);
        assert!(decode_version(&[0x07, 1]).is_err());
        assert!(decode_version(&[]).is_err());
        let txn = TxnMeta {
            id: TxnId([7; 16]),
            epoch: 3,
        };
        let ts = Timestamp::new(10, 2);
        let r = decode_intent(&encode_intent(&txn, ts, Some(b"v"))).unwrap();
        assert_eq!((r.txn, r.ts, r.value), (txn, ts, Some(b"v".to_vec())));
        let r = decode_intent(&encode_intent(&txn, ts, None)).unwrap();
        assert_eq!(r.value, None);
        let r = decode_intent(&encode_intent_anchored(&txn, ts, Some(b"v"), b"anchor")).unwrap();
        assert_eq!(
            (r.txn, r.ts, r.value, r.anchor),
            (txn, ts, Some(b"v".to_vec()), b"anchor".to_vec())
        );
        let r = decode_intent(&encode_intent_anchored(&txn, ts, None, b"a")).unwrap();
        assert_eq!((r.value, r.anchor), (None, b"a".to_vec()));
        let mut bad = encode_intent_anchored(&txn, ts, None, b"anchor");
        bad.truncate(38);
        assert!(decode_intent(&bad).is_err());
        // Cut inside the anchor's length (the fuzz test found this one).
        for n in 34..=37 {
            assert!(decode_intent(&bad[..n]).is_err(), "{n} bytes");
        }
        let mut bad = encode_intent(&txn, ts, None);
        bad.truncate(10);
        assert!(decode_intent(&bad).is_err());
        assert!(decode_intent(&[0x12; 40]).is_err());
    }
}
