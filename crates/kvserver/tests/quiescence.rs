//! Leases on store liveness and quiescence, with several stores in one
//! process: idle ranges go quiet (no range sends or ticks) while their
//! leases stay valid on store-level support alone; a proposal wakes a
//! range; a quiesced range fails over when its leader's store dies; and a
//! leader whose store restarts never blocks an election.

mod common;

use std::time::{Duration, Instant};

use common::*;
use kvserver::keyspace::ETCD_RANGE_ID;
use kvserver::StoreHandle;

const USER: u64 = 3;

/// Every replica of every store is quiet: leaders quiesced, followers
/// holding their promise (none was ticked at the last tick).
fn all_quiescent(c: &Cluster) -> bool {
    c.handles.read().values().all(|h| {
        let n = h.statuses().len() as u64;
        n > 0 && h.metrics().ranges_quiescent.get() == n
    })
}

/// Messages of ranges sent by every store so far (store liveness excluded).
fn range_messages(c: &Cluster) -> u64 {
    c.handles
        .read()
        .values()
        .map(|h| h.metrics().raft_messages_sent.get() - h.metrics().support_messages_sent.get())
        .sum()
}

fn leaseholders_serving(c: &Cluster, ranges: &[u64]) -> bool {
    let now = Instant::now();
    ranges.iter().all(|&r| {
        c.handles
            .read()
            .values()
            .any(|h| h.status(r).is_some_and(|s| s.can_serve(now)))
    })
}

fn three_voters_everywhere(c: &Cluster, ranges: usize) {
    wait_for(
        "every range to have three voters on every store",
        Duration::from_secs(60),
        || {
            c.handles.read().values().all(|h| {
                let st = h.statuses();
                st.len() == ranges && st.iter().all(all_voters)
            })
        },
    );
}

fn leader(c: &Cluster, range: u64) -> StoreHandle {
    let id = leader_store(c, range).expect("a leader");
    c.handle(id)
}

/// A 3-store cluster with `splits` more ranges split off the user range,
/// every range replicated on every store and quiesced; and every range id.
fn quiet_cluster(splits: u64) -> (Cluster, Vec<u64>) {
    let c = start(3);
    three_voters_everywhere(&c, 3);
    let mut ranges = vec![1, ETCD_RANGE_ID, USER];
    for i in 0..splits {
        let h = leader(&c, USER);
        wait_for("the user range's lease", Duration::from_secs(10), || {
            h.status(USER).is_some_and(|s| s.can_serve(Instant::now()))
        });
        split_at(&h, USER, &[0x11, 0xf0 - i as u8], 100 + i);
        ranges.push(100 + i);
    }
    three_voters_everywhere(&c, ranges.len());
    wait_for("every range to quiesce", Duration::from_secs(30), || all_quiescent(&c));
    (c, ranges)
}

#[test]
fn idle_ranges_quiesce_keep_their_leases_and_wake_on_a_proposal() {
    // Twenty more ranges, split off the user range, all quiet.
    let (c, ranges) = quiet_cluster(20);
    // Quiet: no range sends anything for a second, and every lease holds
    // throughout on store liveness alone.
    let before = range_messages(&c);
    let ticks_before: u64 = c
        .handles
        .read()
        .values()
        .map(|h| h.metrics().raft_replica_ticks.get())
        .sum();
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        assert!(leaseholders_serving(&c, &ranges), "a lease lapsed while quiesced");
        std::thread::sleep(Duration::from_millis(50));
    }
    let ticks_after: u64 = c
        .handles
        .read()
        .values()
        .map(|h| h.metrics().raft_replica_ticks.get())
        .sum();
    assert!(all_quiescent(&c), "nothing woke them");
    assert_eq!(range_messages(&c), before, "a quiesced range sent messages");
    assert_eq!(ticks_after, ticks_before, "a quiesced replica was ticked");
    let support: u64 = c
        .handles
        .read()
        .values()
        .map(|h| h.metrics().support_messages_sent.get())
        .sum();
    assert!(support > 0, "store liveness is what keeps the leases");
    // A proposal wakes its range, commits, and the range goes quiet again.
    let h = leader(&c, ETCD_RANGE_ID);
    let rev = put(&h, "wake", "1").unwrap();
    assert!(rev > 1);
    wait_for("the write to apply everywhere", Duration::from_secs(10), || {
        c.handles.read().values().all(|h| {
            let snap = h.engine().snapshot();
            h.rev_state(&snap).map(|r| r.rev).unwrap_or(0) == rev
        })
    });
    wait_for("quiet again", Duration::from_secs(10), || all_quiescent(&c));
}

#[test]
fn a_quiesced_range_fails_over_when_its_leaders_store_stops() {
    let mut c = start(3);
    three_voters_everywhere(&c, 3);
    wait_for("every range to quiesce", Duration::from_secs(30), || all_quiescent(&c));
    let old = leader_store(&c, ETCD_RANGE_ID).unwrap();
    put(&c.handle(old), "before", "1").unwrap();
    wait_for("quiet again", Duration::from_secs(10), || all_quiescent(&c));
    let t0 = Instant::now();
    c.stop(old);
    wait_for("a new leader", Duration::from_secs(10), || {
        leader_store(&c, ETCD_RANGE_ID).is_some_and(|l| l != old)
    });
    let took = t0.elapsed();
    // Support ends 9 ticks after the last request the dead store sent (20 ms
    // ticks here), then an election takes one to two election timeouts.
    println!("failover of a quiesced range took {took:?}");
    assert!(took < Duration::from_secs(3), "failover took {took:?}");
    let h = leader(&c, ETCD_RANGE_ID);
    put(&h, "after", "2").unwrap();
}

#[test]
fn a_leader_whose_store_restarts_never_blocks_an_election() {
    let mut c = start(3);
    three_voters_everywhere(&c, 3);
    wait_for("every range to quiesce", Duration::from_secs(30), || all_quiescent(&c));
    let old = leader_store(&c, ETCD_RANGE_ID).unwrap();
    // Restart at once, while the others still support its old epoch: the
    // new incarnation's epoch ends that support and releases its followers.
    c.stop(old);
    let h = c.restart(old);
    assert!(h.status(ETCD_RANGE_ID).is_some());
    wait_for("a leaseholder of the etcd range", Duration::from_secs(10), || {
        leaseholders_serving(&c, &[ETCD_RANGE_ID])
    });
    let h = leader(&c, ETCD_RANGE_ID);
    put(&h, "after-restart", "1").unwrap();
}

#[test]
fn every_range_regains_its_lease_after_two_of_three_stores_restart() {
    let (mut c, ranges) = quiet_cluster(10);
    // The store holding most leases stays; the other two die and come back.
    let keep = leader_store(&c, USER).unwrap();
    let others: Vec<u64> = (1..=3).filter(|&s| s != keep).collect();
    for &s in &others {
        c.stop(s);
    }
    std::thread::sleep(Duration::from_millis(300));
    for &s in &others {
        c.restart(s);
    }
    wait_for("a leaseholder for every range", Duration::from_secs(20), || {
        leaseholders_serving(&c, &ranges)
    });
    wait_for("quiet again", Duration::from_secs(20), || all_quiescent(&c));
}

#[test]
fn leases_come_back_after_a_partition_raises_store_epochs() {
    let (c, ranges) = quiet_cluster(10);
    // A follower store is cut off for longer than support lasts: it
    // withdraws its support of the others' epochs, and when it comes back
    // their requests are refused, so they move to new epochs and every
    // leader must fortify its range again.
    let keep = leader_store(&c, USER).unwrap();
    let cut = (1..=3).find(|&s| s != keep).unwrap();
    let epoch = |s: u64| {
        c.handle(s)
            .status(USER)
            .and_then(|st| st.liveness.map(|l| l.epoch()))
            .unwrap()
    };
    let before = epoch(keep);
    c.isolated.write().insert(cut);
    std::thread::sleep(Duration::from_millis(600));
    c.isolated.write().clear();
    wait_for(
        "the leader's store to move to a new epoch",
        Duration::from_secs(10),
        || epoch(keep) > before,
    );
    wait_for("a leaseholder for every range", Duration::from_secs(20), || {
        leaseholders_serving(&c, &ranges)
    });
    for r in &ranges {
        let h = c.handle(keep);
        if let Some(l) = h.status(*r).and_then(|s| s.lease) {
            assert_eq!(l.basis.epoch, epoch(keep), "range {r}'s lease rests on the new epoch");
        }
    }
    wait_for("quiet again", Duration::from_secs(20), || all_quiescent(&c));
}
