//! Transaction records: one per transaction that wrote on more than one
//! range (or in more than one batch), on the range holding its anchor key,
//! in the local column family (`storage::keys::txn_record_key`), so it goes
//! wherever that key's range goes.
//!
//! ```text
//!            heartbeat          EndTxn(commit)
//!   (none) ──────────► PENDING ───────────────► COMMITTED
//!      │                  │
//!      │ push: expired    │ push: expired, or a deadlock's victim;
//!      │ or forced        │ EndTxn(abort)
//!      └──────────────────┴───────────────────► ABORTED
//! ```
//!
//! COMMITTED and ABORTED are final: no request changes them again (a
//! heartbeat or commit of an aborted transaction is refused). STAGING is
//! reserved for parallel commits. Records are kept after the transaction
//! ends (nothing garbage-collects them yet), which is what makes "absent"
//! safe to read as "not finished".
//!
//! This module reads and writes records and says when one expired; what a
//! request does with them is `txn_eval`'s.

use prost::Message;
use proto::kvpb::TxnStatus;
use proto::kvserver::TxnRecord;
use storage::{Batch, Cf, Reader, Timestamp};

/// A pending transaction whose coordinator has not heartbeated its record
/// for this long (by the record's leaseholder's clock) may be aborted by
/// anyone who meets one of its intents. The coordinator heartbeats every
/// `HEARTBEAT_INTERVAL` of the `kv` crate (1 s).
pub const TXN_EXPIRY_NANOS: u64 = 5_000_000_000;

/// A transaction id from the wire: exactly 16 bytes.
pub fn txn_id(b: &[u8]) -> Result<[u8; 16], String> {
    b.try_into()
        .map_err(|_| format!("a transaction id has 16 bytes, not {}", b.len()))
}

/// Reads the record of `id` anchored at `anchor`.
pub fn read(r: &dyn Reader, anchor: &[u8], id: &[u8; 16]) -> Result<Option<TxnRecord>, storage::Error> {
    let Some(v) = r.get(Cf::Local, &storage::keys::txn_record_key(anchor, id))? else {
        return Ok(None);
    };
    TxnRecord::decode(v.as_slice())
        .map(Some)
        .map_err(|e| storage::Error::corrupt("txn record", e.to_string()))
}

/// Writes the record of `id` anchored at `anchor`.
pub fn write(b: &mut Batch, anchor: &[u8], id: &[u8; 16], rec: &TxnRecord) -> Result<(), storage::Error> {
    b.put(
        Cf::Local,
        &storage::keys::txn_record_key(anchor, id),
        &rec.encode_to_vec(),
    )
}

/// The status of a record (an unknown number reads as PENDING, the
/// cautious answer: nobody resolves intents on it).
pub fn status(rec: &TxnRecord) -> TxnStatus {
    TxnStatus::try_from(rec.status).unwrap_or(TxnStatus::Pending)
}

/// Whether a transaction last heard of at `last` has expired at `now`.
pub fn expired(last: Timestamp, now: Timestamp) -> bool {
    last.wall.saturating_add(TXN_EXPIRY_NANOS) < now.wall
}

/// Whether a status is final.
pub fn finished(s: TxnStatus) -> bool {
    matches!(s, TxnStatus::Committed | TxnStatus::Aborted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use storage::{Engine, EngineOptions};

    #[test]
    fn records_round_trip_and_expire_by_the_clock() {
        let dir = tempfile::tempdir().unwrap();
        let e = Engine::open(dir.path(), EngineOptions::default()).unwrap();
        let id = [9u8; 16];
        assert_eq!(read(&e, b"k", &id).unwrap(), None);
        let rec = TxnRecord {
            status: TxnStatus::Committed as i32,
            epoch: 2,
            write_timestamp: Some(Timestamp::new(7, 1).into()),
            ..Default::default()
        };
        let mut b = e.batch();
        write(&mut b, b"k", &id, &rec).unwrap();
        e.write(b, false).unwrap();
        assert_eq!(read(&e, b"k", &id).unwrap(), Some(rec.clone()));
        assert_eq!(status(&rec), TxnStatus::Committed);
        // Another anchor, another id: not the same record.
        assert_eq!(read(&e, b"k\x00", &id).unwrap(), None);
        assert_eq!(read(&e, b"k", &[8u8; 16]).unwrap(), None);
        let t = |s: u64| Timestamp::new(s * 1_000_000_000, 0);
        assert!(!expired(t(10), t(15)));
        assert!(expired(t(10), t(16)));
        assert!(txn_id(&[1; 15]).is_err());
        assert_eq!(txn_id(&[1; 16]).unwrap(), [1; 16]);
    }
}
