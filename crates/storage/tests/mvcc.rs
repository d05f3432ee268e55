//! MVCC rules, one at a time: WriteTooOld, uncertainty, own-intent reads,
//! commit at a higher timestamp, GC, statistics, scans, corrupt data.

mod common;

use common::temp_engine;
use storage::mvcc::{self, MvccStats, ReadOptions, Resolution, ScanOptions, TxnId, TxnMeta};
use storage::{Cf, Engine, Error, Timestamp};

fn ts(w: u64) -> Timestamp {
    Timestamp::new(w, 0)
}

fn put(
    e: &Engine,
    st: &mut MvccStats,
    k: &[u8],
    t: Timestamp,
    v: Option<&[u8]>,
    txn: Option<&TxnMeta>,
) -> storage::Result<()> {
    let mut b = e.batch();
    mvcc::put(&mut b, st, k, t, v, txn)?;
    e.write(b, false)
}

fn get(e: &Engine, k: &[u8], t: Timestamp) -> Option<Vec<u8>> {
    mvcc::get(e, k, &ReadOptions::at(t)).unwrap().map(|kv| kv.value)
}

const T1: TxnMeta = TxnMeta {
    id: TxnId([1; 16]),
    epoch: 0,
};
const T2: TxnMeta = TxnMeta {
    id: TxnId([2; 16]),
    epoch: 0,
};

#[test]
fn reads_see_newest_version_at_or_below_their_timestamp() {
    let (_d, e) = temp_engine();
    let mut st = MvccStats::default();
    put(&e, &mut st, b"k", ts(10), Some(b"v10"), None).unwrap();
    put(&e, &mut st, b"k", ts(20), Some(b"v20"), None).unwrap();
    put(&e, &mut st, b"k", ts(30), None, None).unwrap();
    assert_eq!(get(&e, b"k", ts(5)), None);
    assert_eq!(get(&e, b"k", ts(10)), Some(b"v10".to_vec()));
    assert_eq!(get(&e, b"k", ts(25)), Some(b"v20".to_vec()));
    assert_eq!(get(&e, b"k", ts(30)), None, "a tombstone reads as absent");
}

#[test]
fn write_below_or_at_existing_version_is_write_too_old_with_retry_timestamp() {
    let (_d, e) = temp_engine();
    let mut st = MvccStats::default();
    put(&e, &mut st, b"k", ts(20), Some(b"a"), None).unwrap();
    for w in [ts(10), ts(20)] {
        match put(&e, &mut st, b"k", w, Some(b"b"), None) {
            Err(Error::WriteTooOld {
                existing_ts, retry_ts, ..
            }) => {
                assert_eq!(existing_ts, ts(20));
                assert_eq!(retry_ts, Timestamp::new(20, 1));
            }
            other => panic!("expected WriteTooOld, got {other:?}"),
        }
    }
    put(&e, &mut st, b"k", Timestamp::new(20, 1), Some(b"b"), None).unwrap();
    assert_eq!(get(&e, b"k", ts(21)), Some(b"b".to_vec()));
}

#[test]
fn values_inside_the_uncertainty_interval_are_reported() {
    let (_d, e) = temp_engine();
    let mut st = MvccStats::default();
    put(&e, &mut st, b"k", ts(10), Some(b"old"), None).unwrap();
    put(&e, &mut st, b"k", ts(15), Some(b"new"), None).unwrap();
    let o = ReadOptions {
        ts: ts(12),
        uncertainty_limit: ts(16),
        txn: None,
        ignore_intents: false,
    };
    match mvcc::get(&e, b"k", &o) {
        Err(Error::ReadWithinUncertainty { value_ts, .. }) => assert_eq!(value_ts, ts(15)),
        other => panic!("expected uncertainty error, got {other:?}"),
    }
    // Above the limit, the newer value is simply in the future.
    let o = ReadOptions {
        ts: ts(12),
        uncertainty_limit: ts(14),
        txn: None,
        ignore_intents: false,
    };
    assert_eq!(mvcc::get(&e, b"k", &o).unwrap().unwrap().value, b"old");
    // Scans report it as well.
    let s = ScanOptions {
        start: b"a".to_vec(),
        end: b"z".to_vec(),
        read: ReadOptions {
            ts: ts(12),
            uncertainty_limit: ts(15),
            txn: None,
            ignore_intents: false,
        },
        max_keys: 0,
        reverse: false,
    };
    assert!(matches!(mvcc::scan(&e, &s), Err(Error::ReadWithinUncertainty { .. })));
}

#[test]
fn intents_conflict_for_others_and_are_read_by_their_own_transaction() {
    let (_d, e) = temp_engine();
    let mut st = MvccStats::default();
    put(&e, &mut st, b"k", ts(5), Some(b"committed"), None).unwrap();
    put(&e, &mut st, b"k", ts(10), Some(b"mine"), Some(&T1)).unwrap();
    // Its own transaction reads it, even at a lower read timestamp.
    let own = ReadOptions {
        ts: ts(8),
        uncertainty_limit: ts(8),
        txn: Some(T1),
        ignore_intents: false,
    };
    assert_eq!(mvcc::get(&e, b"k", &own).unwrap().unwrap().value, b"mine");
    // Another reader at or above the intent conflicts with it.
    match mvcc::get(&e, b"k", &ReadOptions::at(ts(10))) {
        Err(Error::WriteIntent { intents }) => {
            assert_eq!(intents.len(), 1);
            assert_eq!(intents[0].txn, T1);
            assert_eq!(intents[0].ts, ts(10));
        }
        other => panic!("expected conflict, got {other:?}"),
    }
    // A reader below the intent (and its uncertainty limit) reads the committed value.
    assert_eq!(get(&e, b"k", ts(9)), Some(b"committed".to_vec()));
    // Other writers conflict, whatever their timestamp.
    assert!(matches!(
        put(&e, &mut st, b"k", ts(50), Some(b"x"), Some(&T2)),
        Err(Error::WriteIntent { .. })
    ));
    assert!(matches!(
        put(&e, &mut st, b"k", ts(50), Some(b"x"), None),
        Err(Error::WriteIntent { .. })
    ));
    // A later epoch of the same transaction does not see the stale intent.
    let t1e1 = TxnMeta { epoch: 1, ..T1 };
    let o = ReadOptions {
        ts: ts(10),
        uncertainty_limit: ts(10),
        txn: Some(t1e1),
        ignore_intents: false,
    };
    assert_eq!(mvcc::get(&e, b"k", &o).unwrap().unwrap().value, b"committed");
}

#[test]
fn commit_at_a_higher_timestamp_rewrites_the_version_and_abort_removes_it() {
    let (_d, e) = temp_engine();
    let mut st = MvccStats::default();
    put(&e, &mut st, b"a", ts(10), Some(b"A"), Some(&T1)).unwrap();
    put(&e, &mut st, b"b", ts(10), Some(b"B"), Some(&T2)).unwrap();
    let mut b = e.batch();
    assert!(mvcc::resolve_intent(
        &mut b,
        &mut st,
        b"a",
        T1.id,
        Resolution::Commit { ts: ts(14), epoch: 0 }
    )
    .unwrap());
    assert!(mvcc::resolve_intent(&mut b, &mut st, b"b", T2.id, Resolution::Abort).unwrap());
    // Resolving again, or for the wrong transaction, does nothing.
    assert!(!mvcc::resolve_intent(&mut b, &mut st, b"a", T1.id, Resolution::Abort).unwrap());
    e.write(b, true).unwrap();
    assert_eq!(
        get(&e, b"a", ts(13)),
        None,
        "the value moved up to the commit timestamp"
    );
    assert_eq!(get(&e, b"a", ts(14)), Some(b"A".to_vec()));
    assert_eq!(get(&e, b"b", ts(100)), None);
    assert_eq!(mvcc::compute_stats(&e, b"", b"").unwrap(), st);
    // Committing below the intent is refused.
    put(&e, &mut st, b"c", ts(20), Some(b"C"), Some(&T1)).unwrap();
    let mut b = e.batch();
    assert!(matches!(
        mvcc::resolve_intent(
            &mut b,
            &mut st,
            b"c",
            T1.id,
            Resolution::Commit { ts: ts(19), epoch: 0 }
        ),
        Err(Error::TxnState(_))
    ));
}

#[test]
fn gc_keeps_what_reads_at_or_above_the_threshold_see_and_never_removes_intents() {
    let (_d, e) = temp_engine();
    let mut st = MvccStats::default();
    for (k, t, v) in [
        (&b"a"[..], 1, Some(&b"a1"[..])),
        (b"a", 2, Some(b"a2")),
        (b"a", 3, Some(b"a3")),
        (b"a", 9, Some(b"a9")),
        (b"b", 1, Some(b"b1")),
        (b"b", 4, None), // newest at or below the threshold is a tombstone
        (b"c", 1, Some(b"c1")),
    ] {
        put(&e, &mut st, k, ts(t), v, None).unwrap();
    }
    put(&e, &mut st, b"c", ts(3), Some(b"intent"), Some(&T1)).unwrap();
    let mut b = e.batch();
    let r = mvcc::gc(&mut b, &mut st, b"", b"", ts(5)).unwrap();
    e.write(b, false).unwrap();
    assert_eq!(r.versions_removed, 4, "a1, a2, and b's tombstone and b1");
    assert_eq!(get(&e, b"a", ts(5)), Some(b"a3".to_vec()));
    assert_eq!(get(&e, b"a", ts(9)), Some(b"a9".to_vec()));
    assert_eq!(get(&e, b"a", ts(2)), None, "versions below the threshold are gone");
    assert_eq!(get(&e, b"b", ts(100)), None);
    let own = ReadOptions {
        ts: ts(5),
        uncertainty_limit: ts(5),
        txn: Some(T1),
        ignore_intents: false,
    };
    assert_eq!(mvcc::get(&e, b"c", &own).unwrap().unwrap().value, b"intent");
    assert_eq!(mvcc::compute_stats(&e, b"", b"").unwrap(), st);
    assert_eq!(st.key_count, 2, "b has no record left");
    assert_eq!(st.intent_count, 1);
}

#[test]
fn stats_deltas_match_recomputation_and_mean_what_they_say() {
    let (_d, e) = temp_engine();
    let mut st = MvccStats::default();
    put(&e, &mut st, b"x", ts(1), Some(b"12345"), None).unwrap();
    assert_eq!(
        (st.live_count, st.key_count, st.val_count, st.intent_count),
        (1, 1, 1, 0)
    );
    put(&e, &mut st, b"x", ts(2), None, None).unwrap();
    assert_eq!((st.live_count, st.live_bytes, st.key_count, st.val_count), (0, 0, 1, 2));
    put(&e, &mut st, b"y", ts(3), Some(b"v"), Some(&T1)).unwrap();
    assert_eq!((st.live_count, st.intent_count, st.key_count), (1, 1, 2));
    assert!(st.intent_bytes > 0 && st.intent_bytes == st.live_bytes);
    assert_eq!(mvcc::compute_stats(&e, b"", b"").unwrap(), st);
    assert_eq!(st.total_bytes(), st.key_bytes + st.val_bytes);
}

#[test]
fn scans_honour_limits_order_and_resume_keys() {
    let (_d, e) = temp_engine();
    let mut st = MvccStats::default();
    for k in [&b"a"[..], b"b", b"c", b"d", b"e"] {
        put(&e, &mut st, k, ts(1), Some(k), None).unwrap();
    }
    put(&e, &mut st, b"c", ts(2), None, None).unwrap();
    let mut s = ScanOptions {
        start: b"a".to_vec(),
        end: b"e".to_vec(),
        read: ReadOptions::at(ts(5)),
        max_keys: 2,
        reverse: false,
    };
    let r = mvcc::scan(&e, &s).unwrap();
    assert_eq!(
        r.kvs.iter().map(|kv| kv.key.clone()).collect::<Vec<_>>(),
        vec![b"a".to_vec(), b"b".to_vec()]
    );
    assert_eq!(r.resume_key, Some(b"c".to_vec()));
    s.start = b"c".to_vec();
    let r = mvcc::scan(&e, &s).unwrap();
    assert_eq!(
        r.kvs.iter().map(|kv| kv.key.clone()).collect::<Vec<_>>(),
        vec![b"d".to_vec()],
        "c is deleted, e is past the end"
    );
    assert_eq!(r.resume_key, None);
    let s = ScanOptions {
        start: b"a".to_vec(),
        end: Vec::new(),
        read: ReadOptions::at(ts(5)),
        max_keys: 3,
        reverse: true,
    };
    let r = mvcc::scan(&e, &s).unwrap();
    assert_eq!(
        r.kvs.iter().map(|kv| kv.key.clone()).collect::<Vec<_>>(),
        vec![b"e".to_vec(), b"d".to_vec(), b"b".to_vec()]
    );
    assert_eq!(r.resume_key, Some(b"a\x00".to_vec()));
}

#[test]
fn a_batch_reads_its_own_writes() {
    let (_d, e) = temp_engine();
    let mut st = MvccStats::default();
    put(&e, &mut st, b"k", ts(1), Some(b"old"), None).unwrap();
    let mut b = e.batch();
    mvcc::put(&mut b, &mut st, b"k", ts(2), Some(b"new"), None).unwrap();
    assert_eq!(
        mvcc::get(&b, b"k", &ReadOptions::at(ts(3))).unwrap().unwrap().value,
        b"new"
    );
    assert_eq!(
        get(&e, b"k", ts(3)),
        Some(b"old".to_vec()),
        "not visible before the write"
    );
    assert!(matches!(
        mvcc::put(&mut b, &mut st, b"k", ts(2), Some(b"x"), None),
        Err(Error::WriteTooOld { .. })
    ));
    e.write(b, false).unwrap();
    assert_eq!(get(&e, b"k", ts(3)), Some(b"new".to_vec()));
}

#[test]
fn corrupt_data_is_an_error_not_a_panic() {
    let (_d, e) = temp_engine();
    let mut b = e.batch();
    b.put(Cf::Mvcc, &storage::keys::mvcc_version_key(b"k", ts(1)), &[0x7f, 1, 2])
        .unwrap();
    b.put(Cf::Mvcc, &storage::keys::mvcc_meta_key(b"m"), &[0x11, 1])
        .unwrap();
    b.put(Cf::Mvcc, b"garbage-without-terminator", b"").unwrap();
    e.write(b, false).unwrap();
    assert!(matches!(
        mvcc::get(&e, b"k", &ReadOptions::at(ts(5))),
        Err(Error::Corruption { .. })
    ));
    assert!(matches!(
        mvcc::get(&e, b"m", &ReadOptions::at(ts(5))),
        Err(Error::Corruption { .. })
    ));
    let s = ScanOptions {
        start: Vec::new(),
        end: Vec::new(),
        read: ReadOptions::at(ts(5)),
        max_keys: 0,
        reverse: false,
    };
    assert!(matches!(mvcc::scan(&e, &s), Err(Error::Corruption { .. })));
    let mut st = MvccStats::default();
    assert!(mvcc::compute_stats(&e, b"", b"").is_err());
    let mut b = e.batch();
    assert!(mvcc::put(&mut b, &mut st, b"k", ts(9), Some(b"v"), None).is_err());
}
