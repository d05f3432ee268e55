//! The cluster in containers (`deploy/docker-compose.yml`, on an image built
//! here from this build's binary): the persistence contract (down and up,
//! a node killed while clients write, a container recreated on its volume)
//! and the register workload under the container nemesis (kill, pause,
//! partition), plus a check that stale reads (the follower-reads testing
//! knob) are caught through containers under partitions.
//!
//! Skipped, saying so, without a Docker engine; `.ci/run` makes that skip a
//! failure. Clients reach the containers only through ports published on
//! 127.0.0.1.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cluster::put;
use common::compose::{docker, Compose, NODES};
use proto::etcdserverpb::RangeRequest;

const HEALTHY: Duration = Duration::from_secs(120);

/// Puts through any node until one acknowledges (a few tries).
async fn put_anywhere(c: &Compose, k: &str, v: &str) -> bool {
    for attempt in 0..20 {
        if put(&c.etcd[attempt % 3], k, v).await.is_ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    false
}

/// Every key of `want` reads back with its value through node `i`, in one
/// range read of the prefix (with a few tries for a node that just came
/// back).
async fn assert_all_there(c: &Compose, i: usize, want: &BTreeMap<String, String>, when: &str) {
    let mut got = BTreeMap::new();
    for _ in 0..40 {
        if let Some(mut kv) = common::cluster::kv(&c.etcd[i]).await {
            let r = kv
                .range(RangeRequest {
                    key: b"persist/".to_vec(),
                    range_end: b"persist0".to_vec(),
                    ..Default::default()
                })
                .await;
            if let Ok(r) = r {
                got = r
                    .into_inner()
                    .kvs
                    .into_iter()
                    .map(|kv| {
                        (
                            String::from_utf8_lossy(&kv.key).into_owned(),
                            String::from_utf8_lossy(&kv.value).into_owned(),
                        )
                    })
                    .collect();
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let missing: Vec<String> = want
        .iter()
        .filter(|(k, v)| got.get(*k) != Some(*v))
        .map(|(k, v)| format!("{k}={v}: {:?}", got.get(k)))
        .collect();
    assert!(
        missing.is_empty(),
        "{when}: {} of {} acknowledged keys wrong or missing through node{}: {:?}",
        missing.len(),
        want.len(),
        i + 1,
        &missing[..missing.len().min(10)]
    );
}

/// Waits until every node's replica of the etcd range has applied the same
/// index and holds the same live keys: each node has every write itself.
async fn wait_replicas_equal(c: &Compose, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut seen = Vec::new();
        for i in 0..3 {
            seen.push(
                c.etcd_range(i)
                    .await
                    .map(|r| (r.applied_index, r.stats.map_or(-1, |s| s.live_count))),
            );
        }
        if seen.iter().all(|s| s.is_some() && *s == seen[0]) {
            eprintln!("{what}: every replica at {:?}", seen[0]);
            return;
        }
        assert!(Instant::now() < deadline, "{what}: replicas still differ: {seen:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn data_survives_down_up_a_killed_node_and_a_recreated_container() {
    let Some(c) = Compose::new_or_skip("containers::persistence", &[]) else {
        return;
    };
    let t0 = Instant::now();
    c.must(&["up", "-d"]);
    c.wait_healthy(&NODES, HEALTHY);

    // 1. Keys written, then the whole project down (volumes kept) and up.
    let mut want = BTreeMap::new();
    for i in 0..60 {
        let (k, v) = (format!("persist/a/{i:03}"), format!("v{i}"));
        assert!(put_anywhere(&c, &k, &v).await, "no node acknowledged {k}");
        want.insert(k, v);
    }
    c.must(&["down", "-t", "5"]);
    c.must(&["up", "-d"]);
    c.wait_healthy(&NODES, HEALTHY);
    for i in 0..3 {
        assert_all_there(&c, i, &want, "after down and up").await;
    }
    eprintln!(
        "down and up: {} keys kept ({:.0}s in)",
        want.len(),
        t0.elapsed().as_secs_f64()
    );

    // 2. node3 killed while clients write through node1 and node2, then
    // started again: it rejoins and catches up.
    let acked = Arc::new(Mutex::new(BTreeMap::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..4usize)
        .map(|w| {
            let (addr, acked, stop) = (c.etcd[w % 2].clone(), acked.clone(), stop.clone());
            tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let (k, v) = (format!("persist/b/{w}/{n:05}"), format!("w{w}n{n}"));
                    if put(&addr, &k, &v).await.is_ok() {
                        acked.lock().unwrap().insert(k, v);
                    }
                    n += 1;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let node3 = c.container("node3");
    docker(&["kill", &node3]).unwrap();
    let at_kill = acked.lock().unwrap().len();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let during_kill = acked.lock().unwrap().len() - at_kill;
    docker(&["start", &node3]).unwrap();
    c.wait_healthy(&["node3"], HEALTHY);
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    let b = acked.lock().unwrap().clone();
    assert!(during_kill > 0, "writes went on while node3 was down: {during_kill}");
    wait_replicas_equal(&c, "after node3 was killed and started").await;
    want.extend(b.clone());
    eprintln!(
        "kill and start: {} writes acknowledged, {during_kill} while node3 was down",
        b.len()
    );

    // 3. node2's container removed and a new one made on the same volume:
    // the same node, found again by name.
    let (id_before, _) = c.node_id_and_members(1).await.expect("node2 answers");
    let old = c.container_id("node2");
    let old_ip = c.peer_ip("node2");
    c.must(&["rm", "-s", "-f", "node2"]);
    // Something else takes node2's address on the peers network, so the new
    // container gets another: the others must find it again by name.
    let squatter = format!("{}_squatter", c.project);
    docker(&[
        "run",
        "-d",
        "--rm",
        "--name",
        &squatter,
        "--network",
        &c.peers_network(),
        &c.image(),
        "start-single-node",
        "--store",
        "/data/s",
        "--listen-addr",
        "127.0.0.1:2379",
        "--http-addr",
        "127.0.0.1:8080",
    ])
    .unwrap();
    c.must(&["up", "-d", "--no-deps", "node2"]);
    let new = c.container_id("node2");
    assert_ne!(old, new, "a new container");
    let new_ip = c.peer_ip("node2");
    let _ = docker(&["rm", "-f", "-v", &squatter]);
    assert_ne!(old_ip, new_ip, "the new container has a new address");
    eprintln!("node2 recreated: {old_ip} became {new_ip}");
    c.wait_healthy(&NODES, HEALTHY);
    let (id_after, members) = c.node_id_and_members(1).await.expect("node2 answers");
    assert_eq!(id_before, id_after, "the recreated container is the same node");
    assert_eq!(members, 3, "no new member was added");
    let k = "persist/c/after-recreate";
    assert!(put_anywhere(&c, k, "x").await);
    want.insert(k.into(), "x".into());
    wait_replicas_equal(&c, "after node2 was recreated").await;

    // 4. Every acknowledged write, through every node.
    for i in 0..3 {
        assert_all_there(&c, i, &want, "at the end").await;
    }
    eprintln!(
        "{} acknowledged keys on every node; {:.0}s in all",
        want.len(),
        t0.elapsed().as_secs_f64()
    );
}

fn workload(c: &Compose, secs: u64, faults: &str, interval: &str, seed: &str) -> (bool, String, String) {
    let containers: Vec<String> = NODES.iter().map(|s| c.container(s)).collect();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tardigrade"))
        .args([
            "workload",
            "register",
            "--hosts",
            &c.etcd[..3].join(","),
            "--clients",
            "6",
            "--keys",
            "3",
            "--duration",
            &secs.to_string(),
            "--nemesis",
            "--containers",
            &containers.join(","),
            "--network",
            &c.peers_network(),
            "--faults",
            faults,
            "--fault-interval",
            interval,
            "--fault-duration",
            "3",
            "--seed",
            seed,
        ])
        .output()
        .expect("run the workload");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn register_under_the_container_nemesis_is_linearizable_and_partitions_catch_follower_reads() {
    let Some(mut c) = Compose::new_or_skip("containers::nemesis", &[]) else {
        return;
    };
    c.must(&["up", "-d"]);
    c.wait_healthy(&NODES, HEALTHY);

    // 35 s of kills, pauses and partitions, each at least once (the nemesis
    // deals them in rounds holding each kind once).
    let t = Instant::now();
    let (ok, out, err) = workload(&c, 35, "kill,pause,partition", "5", "7");
    eprintln!("{out}\n{err}");
    assert!(ok, "register under the container nemesis failed:\n{out}\n{err}");
    let faults: Vec<&str> = out.lines().filter(|l| l.starts_with("nemesis: ")).collect();
    for kind in ["docker kill", "docker pause", "cut "] {
        assert!(
            faults.iter().any(|l| l.contains(kind)),
            "the nemesis dealt `{kind}`: {faults:?}"
        );
    }
    assert!(
        faults
            .iter()
            .all(|l| !l.contains("failed") && !l.contains("not started")),
        "every fault was dealt and undone: {faults:?}"
    );
    assert!(
        out.contains("LINEARIZABLE") && !out.contains("NOT LINEARIZABLE"),
        "{out}"
    );
    assert!(out.contains(", 0 lost"), "no acknowledged insert lost: {out}");
    eprintln!("nemesis run: {:.0}s", t.elapsed().as_secs_f64());
    // Every node serves again by itself.
    c.wait_healthy(&NODES, HEALTHY);

    // The same run with followers serving reads (testing knob): partitions
    // make an isolated follower serve stale values, which the checker must
    // catch. The containers are recreated on their volumes with the knob.
    c.set_env("TARDIGRADE_UNSAFE_FOLLOWER_READS", "1");
    c.must(&["up", "-d"]);
    c.wait_healthy(&NODES, HEALTHY);
    let t = Instant::now();
    let (ok, out, err) = workload(&c, 12, "partition", "3", "11");
    eprintln!("{out}\n{err}");
    assert!(out.contains(": cut "), "partitions were dealt: {out}");
    assert!(!ok, "a partition with follower reads went unnoticed:\n{out}");
    assert!(
        out.contains("NOT LINEARIZABLE"),
        "reported as a linearizability failure: {out}"
    );
    eprintln!("the knob was caught in a {:.0}s run", t.elapsed().as_secs_f64());
}
