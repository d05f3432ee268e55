//! Several stores in one process, joined by an in-memory transport: ranges
//! up-replicate to every store, writes reach every replica, the cluster
//! keeps working when the leader's store stops, a leader transfer gives up
//! the lease before its TimeoutNow leaves; and a store whose engine fails
//! while applying stops instead of diverging.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use kvserver::keyspace::ETCD_RANGE_ID;
use kvserver::{ApplyOutcome, Bootstrap, Store, StoreOptions};
use proto::etcdserverpb::PutRequest;
use proto::kvserver::{raft_command, RaftCommand};
use proto::transport::{raft_msg, RaftMsg};

#[test]
fn ranges_up_replicate_and_writes_reach_every_store() {
    let c = start(3);
    wait_for(
        "every range to have three voters on every store",
        Duration::from_secs(30),
        || {
            c.handles.read().values().all(|h| {
                let st = h.statuses();
                st.len() == 3 && st.iter().all(|s| all_voters(s) && s.applied.index > 1)
            })
        },
    );
    let h1 = c.handles.read()[&leader_store(&c, ETCD_RANGE_ID).unwrap()].clone();
    let rev = put(&h1, "k", "v").unwrap();
    assert!(rev > 1);
    wait_for("the write to apply everywhere", Duration::from_secs(10), || {
        c.handles.read().values().all(|h| {
            h.status(ETCD_RANGE_ID).is_some_and(|s| {
                let snap = h.engine().snapshot();
                h.rev_state(&snap).map(|r| r.rev).unwrap_or(0) == rev && s.applied.index > 2
            })
        })
    });
}

#[test]
fn the_cluster_survives_losing_the_leaders_store() {
    let mut c = start(3);
    wait_for("three voters", Duration::from_secs(30), || {
        c.handles
            .read()
            .values()
            .all(|h| h.statuses().len() == 3 && h.statuses().iter().all(all_voters))
    });
    let old = leader_store(&c, ETCD_RANGE_ID).unwrap();
    put(&c.handles.read()[&old].clone(), "before", "1").unwrap();
    c.handles.write().remove(&old);
    let mut s = c.stores.remove(&old).unwrap();
    s.stop();
    wait_for("a new leader", Duration::from_secs(20), || {
        leader_store(&c, ETCD_RANGE_ID).is_some_and(|l| l != old)
    });
    let new = leader_store(&c, ETCD_RANGE_ID).unwrap();
    let h = c.handles.read()[&new].clone();
    put(&h, "after", "2").unwrap();
}

#[test]
fn a_store_behind_the_truncated_log_catches_up_by_snapshot() {
    let mut c = start_with(3, 20);
    wait_for("three voters", Duration::from_secs(30), || {
        c.handles
            .read()
            .values()
            .all(|h| h.statuses().len() == 3 && h.statuses().iter().all(all_voters))
    });
    let leader = leader_store(&c, ETCD_RANGE_ID).unwrap();
    let down = (1..=3).find(|&s| s != leader).unwrap();
    // Stop one follower, keeping its directory.
    c.handles.write().remove(&down);
    let mut s = c.stores.remove(&down).unwrap();
    s.stop();
    drop(s);
    let h = c.handles.read()[&leader].clone();
    for i in 0..200 {
        put(&h, &format!("k{i}"), "v").unwrap();
    }
    wait_for("the leader to truncate its log", Duration::from_secs(10), || {
        h.statuses().iter().any(|st| st.desc.range_id == ETCD_RANGE_ID) && {
            let t = storage::raftlog::truncated_state(h.engine(), ETCD_RANGE_ID).unwrap();
            t.index > 50
        }
    });
    // Restart the follower on its old directory.
    let dir = c._dirs[(down - 1) as usize].path().to_path_buf();
    let opts = StoreOptions {
        transport: Arc::new(LocalTransport {
            me: down,
            handles: c.handles.clone(),
            timeout_now: c.timeout_now.clone(),
            isolated: c.isolated.clone(),
        }),
        bootstrap: Bootstrap::Existing,
        ..Default::default()
    };
    let store = Store::start_with(cfg(&dir), opts).unwrap();
    let hd = store.handle();
    for id in 1..=3 {
        hd.known_stores().write().insert(id, format!("store-{id}"));
    }
    c.handles.write().insert(down, hd.clone());
    c.stores.insert(down, store);
    let want = h.status(ETCD_RANGE_ID).unwrap().applied.index;
    wait_for("the restarted follower to catch up", Duration::from_secs(20), || {
        hd.status(ETCD_RANGE_ID).is_some_and(|s| s.applied.index >= want)
    });
    assert!(hd.metrics().snapshots_applied.get() >= 1, "it caught up by a snapshot");
    let snap = hd.engine().snapshot();
    assert_eq!(hd.rev_state(&snap).unwrap().rev, {
        let s2 = h.engine().snapshot();
        h.rev_state(&s2).unwrap().rev
    });
}

#[test]
fn a_leader_transfer_gives_up_the_lease_before_its_timeout_now_leaves() {
    let c = start(3);
    wait_for("three voters", Duration::from_secs(30), || {
        c.handles
            .read()
            .values()
            .all(|h| h.statuses().len() == 3 && h.statuses().iter().all(all_voters))
    });
    for round in 0..3 {
        let old = leader_store(&c, ETCD_RANGE_ID).unwrap();
        let h = c.handles.read()[&old].clone();
        put(&h, &format!("before-{round}"), "1").unwrap();
        wait_for("the leader to hold its lease", Duration::from_secs(10), || {
            h.status(ETCD_RANGE_ID).is_some_and(|s| s.can_serve(Instant::now()))
        });
        let to = (1..=3).find(|&s| s != old).unwrap();
        let seen = c.timeout_now.lock().len();
        h.transfer_leader(ETCD_RANGE_ID, to).unwrap();
        wait_for("leadership to move", Duration::from_secs(10), || {
            leader_store(&c, ETCD_RANGE_ID) == Some(to)
        });
        let probes = c.timeout_now.lock()[seen..].to_vec();
        assert!(!probes.is_empty(), "a TimeoutNow was sent");
        assert!(
            probes.iter().all(|&(_, serving)| !serving),
            "the old leader still published a valid lease when its TimeoutNow left: {probes:?}"
        );
        assert!(!h.status(ETCD_RANGE_ID).unwrap().can_serve(Instant::now()));
        put(&c.handles.read()[&to].clone(), &format!("after-{round}"), "2").unwrap();
    }
}

#[test]
fn an_engine_error_while_applying_stops_the_store_and_never_advances_the_applied_index() {
    use storage::{keys, rangestate, Cf, Timestamp};
    let dir = tempfile::tempdir().unwrap();
    let store = Store::start(cfg(dir.path())).unwrap();
    let h = store.handle();
    wait_for("the etcd range to serve", Duration::from_secs(10), || {
        h.status(ETCD_RANGE_ID).is_some_and(|s| s.leader_ready)
    });
    let rev = put(&h, "k", "v1").unwrap();
    // The version just written becomes bytes the engine cannot read: the
    // next put of "k" reads it (for its create revision and version).
    let key = keys::mvcc_version_key(&kvserver::keyspace::etcd_key(b"k"), Timestamp::new(rev as u64, 0));
    let mut b = h.engine().batch();
    b.put(Cf::Mvcc, &key, &[0x7f, 0xde, 0xad]).unwrap();
    h.engine().write(b, true).unwrap();
    let before = rangestate::applied_state(h.engine(), ETCD_RANGE_ID).unwrap();

    let answer = put(&h, "k", "v2");
    // Not a definite etcd error: the outcome is unknown to the client.
    let answer = answer.expect_err("the write cannot succeed");
    assert!(
        answer.contains("Stopped") || answer.contains("Ambiguous"),
        "a failed apply must not answer a definite etcd error: {answer}"
    );
    let after = rangestate::applied_state(h.engine(), ETCD_RANGE_ID).unwrap();
    assert_eq!(
        after.index, before.index,
        "the applied index must not move past an entry that failed to apply"
    );
    // The store has stopped: nothing more is served or acknowledged.
    wait_for("the store to stop serving", Duration::from_secs(5), || {
        !h.status(ETCD_RANGE_ID).unwrap().leader_ready
    });
    let again = put(&h, "other", "x").expect_err("a stopped store acknowledges nothing");
    assert!(again.contains("Stopped"), "{again}");
    let why = h.stopped().expect("the store says why it stopped");
    assert!(why.contains("entry") && why.contains("range 2"), "{why}");
    // Asked anyway (even with the stale-read testing knob on), it answers
    // unavailable, so a sender looks elsewhere.
    let req = proto::kvserver::BatchRequest {
        range_id: ETCD_RANGE_ID,
        request: Some(proto::kvserver::batch_request::Request::EtcdRange(
            proto::etcdserverpb::RangeRequest {
                key: b"k".to_vec(),
                ..Default::default()
            },
        )),
        ..Default::default()
    };
    let opts = kvserver::evaluator::EvalOptions {
        write_timeout: Duration::from_secs(1),
        unsafe_follower_reads: true,
        max_offset: Duration::from_millis(500),
        router: None,
        txn_knobs: Default::default(),
    };
    let answer = block_on(kvserver::evaluator::evaluate(&h, req, &opts));
    assert!(
        matches!(
            answer.response,
            Some(proto::kvserver::batch_response::Response::Error(
                proto::kvserver::BatchError {
                    kind: Some(proto::kvserver::batch_error::Kind::Unavailable(_))
                }
            ))
        ),
        "{answer:?}"
    );
}

#[test]
fn a_txn_writing_one_key_twice_through_a_nested_txn_is_refused_and_the_store_serves_on() {
    use proto::etcdserverpb::{request_op, RequestOp, TxnRequest};
    let dir = tempfile::tempdir().unwrap();
    let store = Store::start(cfg(dir.path())).unwrap();
    let h = store.handle();
    wait_for("the etcd range to serve", Duration::from_secs(10), || {
        h.status(ETCD_RANGE_ID).is_some_and(|s| s.leader_ready)
    });
    let put_op = |v: &str| RequestOp {
        request: Some(request_op::Request::RequestPut(PutRequest {
            key: b"dup".to_vec(),
            value: v.into(),
            ..Default::default()
        })),
    };
    // Proposed as is (no gRPC-side validation): apply must refuse it as etcd
    // does, never take the MVCC layer's answer for an engine failure.
    let txn = TxnRequest {
        compare: vec![],
        success: vec![
            put_op("1"),
            RequestOp {
                request: Some(request_op::Request::RequestTxn(TxnRequest {
                    compare: vec![],
                    success: vec![put_op("2")],
                    failure: vec![],
                })),
            },
        ],
        failure: vec![],
    };
    let cmd = RaftCommand {
        proposer_term: 0,
        max_lease_index: 0,
        proposer_ts: None,
        op: Some(raft_command::Op::EtcdTxn(txn)),
    };
    match block_on(h.propose(ETCD_RANGE_ID, cmd, Duration::from_secs(5))) {
        Ok(ApplyOutcome::Etcd { result: Err(e), .. }) => {
            assert_eq!(e.to_string(), "etcdserver: duplicate key given in txn request")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(h.stopped(), None);
    put(&h, "after", "1").unwrap();
}

/// CockroachDB's replica tombstones, for merged ranges: a store that merged
/// range 42 away (its tombstone written by the merge's apply) never lets a
/// late message for it create a replica again, across restarts; a message
/// for a range it never had still creates one (the usual way a new replica
/// begins).
#[test]
fn a_late_message_for_a_merged_away_range_never_brings_it_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::start(cfg(dir.path())).unwrap();
    s.stop();
    drop(s);
    {
        let e = storage::Engine::open(dir.path(), storage::EngineOptions::default()).unwrap();
        let mut b = e.batch();
        storage::rangestate::set_store_record(&mut b, &kvserver::merge::tombstone_key(42), &u64::MAX.to_be_bytes())
            .unwrap();
        e.write(b, true).unwrap();
    }
    let s = Store::start_with(
        cfg(dir.path()),
        StoreOptions {
            bootstrap: Bootstrap::Existing,
            ..Default::default()
        },
    )
    .unwrap();
    let h = s.handle();
    let vote = |range_id: u64| RaftMsg {
        range_id,
        from: 2,
        to: 3,
        term: 5,
        body: Some(raft_msg::Body::Vote(proto::transport::Vote {
            last_term: 9,
            last_index: 9,
            ..Default::default()
        })),
    };
    h.deliver(2, vec![vote(42), vote(43)]);
    wait_for("a replica for range 43", Duration::from_secs(5), || h.has_range(43));
    assert!(!h.has_range(42), "the merged-away range came back");
}

/// A range frozen for a merge refuses, identically on every replica and
/// at apply (the freeze is replicated state), any write, split or second
/// freeze that reaches its log after the freeze, and serves again once
/// unfrozen. (A write proposed just after the freeze used to apply, and the
/// merge then lost it on replicas that had not applied it.)
#[test]
fn a_frozen_range_applies_no_write_split_or_other_freeze() {
    use proto::kvserver::{FreezeForMerge, RawWrite, Unfreeze, WriteBatch};
    let dir = tempfile::tempdir().unwrap();
    let s = Store::start(cfg(dir.path())).unwrap();
    let h = s.handle();
    let user = 3;
    wait_for("the user range serves", Duration::from_secs(5), || {
        h.status(user).is_some_and(|st| st.can_serve(Instant::now()))
    });
    let propose = |op| {
        block_on(h.propose(
            user,
            RaftCommand {
                op: Some(op),
                ..Default::default()
            },
            Duration::from_secs(5),
        ))
    };
    let write = || {
        raft_command::Op::WriteBatch(WriteBatch {
            writes: vec![RawWrite {
                key: storage::keys::mvcc_version_key(b"k", storage::Timestamp::new(10, 0)),
                value: storage::mvcc::value::encode_version(Some(b"v")),
                delete: false,
                local: false,
            }],
            delta: None,
            ts: Some(storage::Timestamp::new(10, 0).into()),
            start_key: b"k".to_vec(),
            end_key: b"k\x00".to_vec(),
        })
    };
    let freeze = |id| {
        raft_command::Op::Freeze(FreezeForMerge {
            merge_id: id,
            left_range_id: 99,
            freeze_index: 0,
        })
    };
    assert!(matches!(propose(freeze(7)), Ok(ApplyOutcome::Frozen(Ok(_)))));
    assert!(
        matches!(propose(write()), Ok(ApplyOutcome::Kv(Err(_)))),
        "a write after the freeze"
    );
    assert!(
        matches!(propose(freeze(8)), Ok(ApplyOutcome::Frozen(Err(_)))),
        "another attempt's freeze"
    );
    let desc = h.status(user).unwrap().desc;
    let (left, right) = kvserver::split::halves(&desc, b"m", 50);
    let split = raft_command::Op::Split(proto::kvserver::SplitTrigger {
        left: Some(left),
        right: Some(right),
        ..Default::default()
    });
    assert!(
        matches!(propose(split), Ok(ApplyOutcome::Split(Err(_)))),
        "a split after the freeze"
    );
    assert!(!h.has_range(50));
    let got = storage::mvcc::get(
        h.engine(),
        b"k",
        &storage::mvcc::ReadOptions::at(storage::Timestamp::MAX),
    )
    .unwrap();
    assert!(got.is_none(), "nothing written while frozen");
    // Unfrozen (its merge fenced off): it takes writes again.
    assert!(matches!(
        propose(raft_command::Op::Unfreeze(Unfreeze { merge_id: 7 })),
        Ok(ApplyOutcome::Unfrozen(true))
    ));
    assert!(matches!(propose(write()), Ok(ApplyOutcome::Kv(Ok(())))));
}
