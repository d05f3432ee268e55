//! Raft log persistence: append with overwrite, reads, truncation, hard state,
//! and a snapshot round trip between two engines.

mod common;

use common::temp_engine;
use storage::mvcc::{self, MvccStats, ReadOptions, ScanOptions};
use storage::raftlog::{self, HardState, RaftEntry};
use storage::rangestate::{self, AppliedState};
use storage::snapshot;
use storage::{Error, RangeDescriptor, Timestamp};

fn ents(lo: u64, hi: u64, term: u64) -> Vec<RaftEntry> {
    (lo..=hi)
        .map(|i| RaftEntry {
            index: i,
            term,
            payload: format!("e{i}t{term}").into_bytes(),
        })
        .collect()
}

#[test]
fn append_overwrites_a_conflicting_suffix() {
    let (_d, e) = temp_engine();
    let mut b = e.batch();
    raftlog::append(&mut b, 7, &ents(1, 10, 1)).unwrap();
    e.write(b, true).unwrap();
    assert_eq!(raftlog::last_index(&e, 7).unwrap(), 10);
    // A new leader overwrites from 6 with fewer entries of term 2.
    let mut b = e.batch();
    raftlog::append(&mut b, 7, &ents(6, 8, 2)).unwrap();
    // The batch already sees its own overwrite.
    assert_eq!(raftlog::last_index(&b, 7).unwrap(), 8);
    e.write(b, true).unwrap();
    assert_eq!(raftlog::last_index(&e, 7).unwrap(), 8);
    assert_eq!(raftlog::term(&e, 7, 5).unwrap(), 1);
    assert_eq!(raftlog::term(&e, 7, 6).unwrap(), 2);
    assert!(matches!(raftlog::term(&e, 7, 9), Err(Error::LogUnavailable { .. })));
    let got = raftlog::entries(&e, 7, 4, 9, u64::MAX).unwrap();
    assert_eq!(
        got.iter().map(|x| (x.index, x.term)).collect::<Vec<_>>(),
        vec![(4, 1), (5, 1), (6, 2), (7, 2), (8, 2)]
    );
    assert_eq!(got[2].payload, b"e6t2");
    // Byte limit: at least one entry, stopping once past the limit.
    assert_eq!(raftlog::entries(&e, 7, 1, 9, 0).unwrap().len(), 1);
    assert_eq!(raftlog::entries(&e, 7, 1, 9, 5).unwrap().len(), 2);
    // A gap is refused.
    let mut b = e.batch();
    assert!(matches!(
        raftlog::append(&mut b, 7, &ents(10, 11, 2)),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn truncation_persists_index_and_term_and_ranges_are_independent() {
    let (_d, e) = temp_engine();
    let mut b = e.batch();
    raftlog::append(&mut b, 1, &ents(1, 20, 3)).unwrap();
    raftlog::append(&mut b, 2, &ents(1, 5, 1)).unwrap();
    e.write(b, true).unwrap();
    let mut b = e.batch();
    raftlog::truncate(&mut b, 1, 12).unwrap();
    e.write(b, true).unwrap();
    assert_eq!(raftlog::first_index(&e, 1).unwrap(), 13);
    assert_eq!(
        raftlog::term(&e, 1, 12).unwrap(),
        3,
        "the truncated entry's term is kept"
    );
    assert!(matches!(raftlog::term(&e, 1, 11), Err(Error::LogCompacted { .. })));
    assert!(matches!(
        raftlog::entries(&e, 1, 12, 15, u64::MAX),
        Err(Error::LogCompacted { .. })
    ));
    assert_eq!(raftlog::entries(&e, 1, 13, 21, u64::MAX).unwrap().len(), 8);
    assert_eq!(raftlog::last_index(&e, 2).unwrap(), 5);
    assert_eq!(raftlog::first_index(&e, 2).unwrap(), 1);
    // Truncating everything leaves last_index at the truncated index.
    let mut b = e.batch();
    raftlog::truncate(&mut b, 1, 20).unwrap();
    e.write(b, true).unwrap();
    assert_eq!(raftlog::last_index(&e, 1).unwrap(), 20);
    // Appending after a full truncation continues the log.
    let mut b = e.batch();
    raftlog::append(&mut b, 1, &ents(21, 22, 4)).unwrap();
    e.write(b, true).unwrap();
    assert_eq!(raftlog::last_index(&e, 1).unwrap(), 22);
}

#[test]
fn hard_state_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let e = storage::Engine::open(dir.path(), Default::default()).unwrap();
        assert_eq!(raftlog::hard_state(&e, 3).unwrap(), HardState::default());
        let mut b = e.batch();
        raftlog::save_hard_state(
            &mut b,
            3,
            HardState {
                term: 5,
                vote: 2,
                commit: 9,
            },
        )
        .unwrap();
        raftlog::append(&mut b, 3, &ents(1, 9, 5)).unwrap();
        e.write(b, true).unwrap();
    }
    let e = storage::Engine::open(dir.path(), Default::default()).unwrap();
    assert_eq!(
        raftlog::hard_state(&e, 3).unwrap(),
        HardState {
            term: 5,
            vote: 2,
            commit: 9
        }
    );
    assert_eq!(raftlog::last_index(&e, 3).unwrap(), 9);
}

fn scan_all(e: &dyn storage::Reader, start: &[u8], end: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let s = ScanOptions {
        start: start.to_vec(),
        end: end.to_vec(),
        read: ReadOptions::at(Timestamp::MAX),
        max_keys: 0,
        reverse: false,
    };
    mvcc::scan(e, &s)
        .unwrap()
        .kvs
        .into_iter()
        .map(|kv| (kv.key, kv.value))
        .collect()
}

#[test]
fn snapshot_round_trip_between_two_engines_replaces_the_span_only() {
    let (_da, a) = temp_engine();
    let (db_dir, b) = temp_engine();
    let desc = RangeDescriptor {
        range_id: 5,
        start_key: b"m".to_vec(),
        end_key: b"t".to_vec(),
        ..Default::default()
    };
    // Sender: range 5 holds keys in [m, t) at applied index 40.
    let mut st = MvccStats::default();
    let mut w = a.batch();
    for i in 0..50u64 {
        let k = format!("n{i:03}");
        mvcc::put(
            &mut w,
            &mut st,
            k.as_bytes(),
            Timestamp::new(i + 1, 0),
            Some(k.as_bytes()),
            None,
        )
        .unwrap();
    }
    let mut st_other = MvccStats::default();
    mvcc::put(
        &mut w,
        &mut st_other,
        b"zz-outside",
        Timestamp::new(1, 0),
        Some(b"no"),
        None,
    )
    .unwrap();
    rangestate::set_descriptor(&mut w, &desc).unwrap();
    rangestate::set_applied_state(
        &mut w,
        5,
        AppliedState {
            index: 40,
            term: 3,
            stats: st,
            ..Default::default()
        },
    )
    .unwrap();
    a.write(w, true).unwrap();
    // Receiver: stale data of range 5 in the span, a raft log, and a neighbour's data outside it.
    let mut w = b.batch();
    let mut st_b = MvccStats::default();
    mvcc::put(
        &mut w,
        &mut st_b,
        b"n999-stale",
        Timestamp::new(1, 0),
        Some(b"stale"),
        None,
    )
    .unwrap();
    mvcc::put(
        &mut w,
        &mut st_b,
        b"a-neighbour",
        Timestamp::new(1, 0),
        Some(b"keep"),
        None,
    )
    .unwrap();
    raftlog::append(&mut w, 5, &ents(1, 7, 1)).unwrap();
    rangestate::set_applied_state(
        &mut w,
        5,
        AppliedState {
            index: 7,
            term: 1,
            stats: st_b,
            ..Default::default()
        },
    )
    .unwrap();
    b.write(w, true).unwrap();

    let snap_dir = tempfile::tempdir().unwrap();
    let meta = snapshot::build_snapshot(&a, 5, b"m", b"t", snap_dir.path()).unwrap();
    assert_eq!(meta.applied.unwrap().applied_index, 40);
    // The receiver copies the files into its store, as the transport will.
    let _ = db_dir;
    let recv = snapshot::new_incoming_dir(&b, 5).unwrap();
    for f in std::fs::read_dir(snap_dir.path()).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), recv.join(f.file_name())).unwrap();
    }
    // A directory that climbs out of the store's snapshots with `..` is
    // refused, even when it holds the right files.
    let outside = b.dir().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    for f in std::fs::read_dir(snap_dir.path()).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), outside.join(f.file_name())).unwrap();
    }
    let climbing = b.dir().join("snapshots").join("..").join("outside");
    assert!(matches!(
        snapshot::apply_snapshot(&b, &climbing, &meta, None),
        Err(Error::InvalidArgument(_))
    ));
    snapshot::apply_snapshot(
        &b,
        &recv,
        &meta,
        Some(HardState {
            term: 3,
            vote: 0,
            commit: 40,
        }),
    )
    .unwrap();

    assert_eq!(scan_all(&b, b"m", b"t"), scan_all(&a, b"m", b"t"));
    assert_eq!(scan_all(&b, b"m", b"t").len(), 50, "the stale key is gone");
    assert_eq!(
        scan_all(&b, b"a", b"b"),
        vec![(b"a-neighbour".to_vec(), b"keep".to_vec())]
    );
    assert!(
        scan_all(&b, b"t", b"").is_empty(),
        "nothing outside the span was copied"
    );
    let applied = rangestate::applied_state(&b, 5).unwrap();
    assert_eq!((applied.index, applied.term, applied.stats), (40, 3, st));
    assert_eq!(mvcc::compute_stats(&b, b"m", b"t").unwrap(), st);
    assert_eq!(rangestate::descriptor(&b, 5).unwrap(), Some(desc));
    assert_eq!(raftlog::first_index(&b, 5).unwrap(), 41);
    assert_eq!(raftlog::last_index(&b, 5).unwrap(), 40);
    assert_eq!(raftlog::term(&b, 5, 40).unwrap(), 3);
    assert_eq!(raftlog::hard_state(&b, 5).unwrap().commit, 40);
    assert!(!recv.exists(), "the snapshot directory is removed once applied");
}
