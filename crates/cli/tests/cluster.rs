//! Three-node clusters of real `tardigrade` processes on 127.0.0.1 (ports free
//! at run time, stopped by PID): formation, reads and writes through any node,
//! failover after SIGKILL, no stale read from a paused leaseholder, catch-up by
//! snapshot, the register workload under the nemesis, and clear errors for bad
//! input. Tick 50 ms, election timeout 10 ticks (0.5 s); waits give up after at
//! least 10 election timeouts.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::cluster::*;
use common::{free_port, http_get, tardigrade};
use proto::admin::{admin_client::AdminClient, RangesRequest};
use proto::etcdserverpb::RangeRequest;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_form_a_cluster_and_serve_through_any_node() {
    let c = Cluster::start(3, &[]);
    c.wait_replicated().await;
    for (i, n) in c.nodes.iter().enumerate() {
        put(&n.grpc, &format!("from-{i}"), &format!("v{i}")).await.unwrap();
    }
    for n in &c.nodes {
        for i in 0..3 {
            assert_eq!(get(&n.grpc, &format!("from-{i}")).await.unwrap(), Some(format!("v{i}")));
        }
    }
    let (code, out, err) = tardigrade(&["node", "status", "--host", &c.nodes[1].grpc]);
    assert_eq!(code, 0, "{err}");
    let live = out
        .lines()
        .skip(2)
        .filter(|l| l.split_whitespace().nth(2) == Some("live"))
        .count();
    assert_eq!(live, 3, "{out}");
    // One long-lived raft stream per peer: a stream reopened for every few
    // batches would add a connection setup to every write.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for n in &c.nodes {
        let m = http_get(&n.http, "/metrics").expect("metrics").1;
        let opened: u64 = m
            .lines()
            .find_map(|l| l.strip_prefix("tardigrade_raft_streams_opened_total "))
            .and_then(|v| v.trim().parse().ok())
            .expect("tardigrade_raft_streams_opened_total");
        assert!((2..=6).contains(&opened), "{opened} raft streams opened by {}", n.grpc);
    }
    for n in &c.nodes {
        let (_, out, _) = tardigrade(&["debug", "ranges", "--host", &n.grpc]);
        assert_eq!(out.matches("n1,n2,n3").count(), 3, "{out}");
        assert_eq!(http_get(&n.http, "/health").map(|x| x.0), Some(200));
    }
    // A fourth node holds no replica (three are enough) yet serves reads and
    // writes: its DistSender finds the leaseholder.
    let mut c = c;
    let four = c.add_node();
    let addr = c.nodes[four].grpc.clone();
    wait("the fourth node to serve", 10 * ELECTION * 4, || async {
        put(&addr, "from-3", "v3").await.is_ok()
    })
    .await;
    assert_eq!(get(&addr, "from-0").await.unwrap(), Some("v0".into()));
    assert_eq!(get(&c.nodes[0].grpc, "from-3").await.unwrap(), Some("v3".into()));
    assert_eq!(
        c.ranges(four).await.map(|r| r.len()),
        Some(0),
        "no replica on the fourth node"
    );
    let host = c.nodes[0].grpc.clone();
    wait("node status to show four live nodes", 10 * ELECTION * 2, || async {
        let (_, out, _) = tardigrade(&["node", "status", "--host", &host]);
        out.lines()
            .skip(2)
            .filter(|l| l.split_whitespace().nth(2) == Some("live"))
            .count()
            == 4
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_moves_on_request_and_the_cluster_serves_on() {
    let c = Cluster::start(3, &[]);
    c.wait_replicated().await;
    put(&c.nodes[0].grpc, "k", "0").await.unwrap();
    for round in 1..=3 {
        let from = c.etcd_leaseholder().await.expect("a leaseholder");
        let to = (from + 1) % 3;
        let to_node = {
            let mut a = AdminClient::connect(format!("http://{}", c.nodes[to].grpc))
                .await
                .unwrap();
            a.ranges(RangesRequest {}).await.unwrap().into_inner().node_id
        };
        // Asked through the third node, which is neither end.
        let via = &c.nodes[(from + 2) % 3].grpc;
        let (code, out, err) = tardigrade(&[
            "debug",
            "transfer-lease",
            "--range",
            "2",
            "--to-node",
            &to_node.to_string(),
            "--host",
            via,
        ]);
        assert_eq!(code, 0, "{out}{err}");
        assert!(out.contains(&format!("to node {to_node}")), "{out}");
        wait("the new leaseholder to serve", 10 * ELECTION * 2, || async {
            c.etcd_leaseholder().await == Some(to)
        })
        .await;
        put(&c.nodes[from].grpc, "k", &round.to_string()).await.unwrap();
        for n in &c.nodes {
            assert_eq!(get(&n.grpc, "k").await.unwrap(), Some(round.to_string()));
        }
    }
    // Clear refusals.
    let host = &c.nodes[0].grpc;
    let (code, _, err) = tardigrade(&[
        "debug",
        "transfer-lease",
        "--range",
        "2",
        "--to-node",
        "9",
        "--host",
        host,
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("node 9 has no voting replica of range 2"), "{err}");
    let (code, _, err) = tardigrade(&[
        "debug",
        "transfer-lease",
        "--range",
        "77",
        "--to-node",
        "1",
        "--host",
        host,
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("no replica of range 77"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_after_sigkill_loses_no_acknowledged_write() {
    let mut c = Cluster::start(3, &[]);
    c.wait_replicated().await;
    let victim = c.busiest().await;
    let others: Vec<String> = (0..3)
        .filter(|&i| i != victim)
        .map(|i| c.nodes[i].grpc.clone())
        .collect();
    // Writers through every node.
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for (w, n) in c.nodes.iter().enumerate() {
        let (addr, acked, stop) = (n.grpc.clone(), acked.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let k = format!("w{w}-{i}");
                if put(&addr, &k, "x").await.is_ok() {
                    acked.lock().unwrap().push(k);
                }
                i += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.nodes[victim].proc.kill9();
    let killed = Instant::now();
    let mut first = None;
    while first.is_none() && killed.elapsed() < 10 * ELECTION * 2 {
        for o in &others {
            if put(o, "after-kill", "y").await.is_ok() {
                first = Some(killed.elapsed());
                break;
            }
        }
    }
    let pause = first.expect("writes resume through the surviving nodes");
    println!("failover: first successful write {pause:?} after SIGKILL of the busiest node");
    assert!(pause < 10 * ELECTION, "writes resumed only after {pause:?}");
    // Its liveness lapses (4.5 s TTL) and `node status` says so; back, it
    // heartbeats in a new epoch.
    let (host, victim_addr) = (others[0].clone(), c.nodes[victim].grpc.clone());
    let row = |out: &str| -> Option<(String, String)> {
        let l = out
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(victim_addr.as_str()))?;
        let f: Vec<&str> = l.split_whitespace().collect();
        Some((f.get(2)?.to_string(), f.get(3)?.to_string()))
    };
    wait(
        "node status to show the killed node dead",
        10 * ELECTION * 2,
        || async { row(&tardigrade(&["node", "status", "--host", &host]).1).is_some_and(|(live, _)| live == "dead") },
    )
    .await;
    c.restart(victim);
    wait(
        "the restarted node live again in epoch 2",
        10 * ELECTION * 2,
        || async {
            row(&tardigrade(&["node", "status", "--host", &host]).1)
                .is_some_and(|(live, epoch)| live == "live" && epoch == "2")
        },
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        let _ = w.await;
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 20);
    // Every acknowledged write, read through the restarted node once it caught up.
    let node = c.nodes[victim].grpc.clone();
    wait("the restarted node to serve", 10 * ELECTION * 4, || async {
        get(&node, "after-kill").await.is_ok()
    })
    .await;
    for k in &acked {
        assert_eq!(
            get(&node, k).await.unwrap(),
            Some("x".into()),
            "acknowledged write {k} lost"
        );
    }
    println!("{} acknowledged writes all present after the restart", acked.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leaseholder_never_serves_a_stale_read() {
    let c = Cluster::start(3, &[]);
    c.wait_replicated().await;
    put(&c.nodes[0].grpc, "reg", "old").await.unwrap();
    let lh = c.etcd_leaseholder().await.expect("a leaseholder");
    signal(&c.nodes[lh].proc, libc::SIGSTOP);
    let other = c.nodes[(lh + 1) % 3].grpc.clone();
    // Once a new leaseholder serves, write the new value.
    wait("a new leaseholder to take the write", 10 * ELECTION * 2, || async {
        put(&other, "reg", "new").await.is_ok()
    })
    .await;
    signal(&c.nodes[lh].proc, libc::SIGCONT);
    // Read through the old leaseholder at once.
    let v = get(&c.nodes[lh].grpc, "reg").await;
    assert_eq!(
        v,
        Ok(Some("new".into())),
        "the old leaseholder must not answer from its stale state"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_behind_the_truncated_log_catches_up_by_snapshot() {
    let mut c = Cluster::start(3, &["--raft-log-truncation-threshold", "40"]);
    c.wait_replicated().await;
    eprintln!("replicated");
    let down = c.etcd_leaseholder().await.map_or(2, |lh| (lh + 1) % 3);
    c.nodes[down].proc.kill9();
    let up = c.nodes[(down + 1) % 3].grpc.clone();
    for i in 0..300 {
        let mut tries = 0;
        while put(&up, &format!("s{i:03}"), &i.to_string()).await.is_err() {
            tries += 1;
            assert!(tries < 100, "writes with one node down keep failing");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    eprintln!("written");
    tokio::time::sleep(Duration::from_secs(1)).await; // the leader truncates its log
    c.restart(down);
    eprintln!("restarted");
    let metrics_addr = c.nodes[down].http.clone();
    wait(
        "the restarted node to install a snapshot",
        10 * ELECTION * 4,
        || async {
            http_get(&metrics_addr, "/metrics").is_some_and(|(_, m)| {
                m.lines()
                    .find_map(|l| l.strip_prefix("tardigrade_snapshots_applied_total "))
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .is_some_and(|n| n >= 1)
            })
        },
    )
    .await;
    let node = c.nodes[down].grpc.clone();
    for i in (0..300).step_by(37) {
        assert_eq!(get(&node, &format!("s{i:03}")).await.unwrap(), Some(i.to_string()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_register_workload_under_the_nemesis_is_linearizable() {
    let c = Cluster::start(3, &[]);
    c.wait_replicated().await;
    let pids: Vec<String> = c.nodes.iter().map(|n| n.proc.pid().to_string()).collect();
    let hosts: Vec<String> = c.nodes.iter().map(|n| n.grpc.clone()).collect();
    let out = Command::new(env!("CARGO_BIN_EXE_tardigrade"))
        .args([
            "workload",
            "register",
            "--hosts",
            &hosts.join(","),
            "--clients",
            "6",
            "--keys",
            "3",
        ])
        .args([
            "--duration",
            "20",
            "--nemesis",
            "--pids",
            &pids.join(","),
            "--seed",
            "11",
            "--check-seconds",
            "30",
            "--lease-transfers",
            "1.5",
        ])
        .output()
        .expect("run the workload");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    // A second run against the same cluster starts from fresh registers (it
    // once read the first run's values as if they came from nowhere).
    let again = Command::new(env!("CARGO_BIN_EXE_tardigrade"))
        .args(["workload", "register", "--hosts", &hosts.join(","), "--duration", "2"])
        .output()
        .expect("run the workload again");
    let again = String::from_utf8_lossy(&again.stdout).into_owned();
    kill_restarted(&stdout);
    println!("{stdout}");
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("LINEARIZABLE over"), "{stdout}");
    assert!(stdout.contains(", 0 lost"), "{stdout}");
    assert!(stdout.contains("nemesis: "), "the nemesis did something: {stdout}");
    assert!(
        stdout.contains("lease of the etcd range moved"),
        "leases moved during the run: {stdout}"
    );
    assert!(
        again.contains("LINEARIZABLE over") && !again.contains("NOT"),
        "second run: {again}"
    );
    // Stated bounds (election timeout 0.5 s, faults of 2 s): no fault stalls
    // every client while it lasts (the cluster answers within 2 s of losing
    // any node), and no operation waits longer than a paused gateway's pause
    // plus 4 election timeouts, well under the 5 s operation timeout.
    let secs = |label: &str| -> f64 {
        let at = stdout.find(label).unwrap_or_else(|| panic!("{label} in {stdout}")) + label.len();
        stdout[at..]
            .split('s')
            .next()
            .and_then(|x| x.trim().parse().ok())
            .expect("seconds")
    };
    assert!(secs("longest unavailability ") < 2.0, "{stdout}");
    assert!(secs("longest operation ") < 4.0, "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_clock_is_off_stops_serving_and_says_why() {
    let mut c = Cluster::start(3, &[]);
    c.wait_replicated().await;
    c.nodes[2].proc.kill9();
    // Back with its clock 2 s ahead (the maximum offset is 500 ms).
    c.extra_args.push("env:TARDIGRADE_TESTING_CLOCK_SKEW_MS=2000".into());
    c.restart(2);
    let http = c.nodes[2].http.clone();
    wait("the skewed node to say so on /health", 10 * ELECTION * 2, || async {
        http_get(&http, "/health").is_some_and(|(code, body)| code == 503 && body.contains("clock is off"))
    })
    .await;
    let err = put(&c.nodes[2].grpc, "k", "v").await.unwrap_err();
    assert!(err.contains("clock is off"), "{err}");
    let log = std::fs::read_to_string(c.nodes[2].store.with_extension("log")).unwrap();
    assert!(log.contains("stopped serving: clock is off"), "{log}");
    // One bad peer is not a quorum: the others keep serving.
    put(&c.nodes[0].grpc, "k", "v").await.unwrap();
    assert_eq!(get(&c.nodes[1].grpc, "k").await.unwrap(), Some("v".into()));
    assert_eq!(http_get(&c.nodes[0].http, "/health").map(|x| x.0), Some(200));
}

/// The proof that the register test bites: with followers allowed to answer
/// reads from their own state, the checker reports a violation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checker_catches_follower_reads_when_the_knob_is_on() {
    let c = Cluster::start(3, &["env:TARDIGRADE_UNSAFE_FOLLOWER_READS=1"]);
    c.wait_replicated().await;
    let pids: Vec<String> = c.nodes.iter().map(|n| n.proc.pid().to_string()).collect();
    let hosts: Vec<String> = c.nodes.iter().map(|n| n.grpc.clone()).collect();
    let out = Command::new(env!("CARGO_BIN_EXE_tardigrade"))
        .args([
            "workload",
            "register",
            "--hosts",
            &hosts.join(","),
            "--duration",
            "5",
            "--nemesis",
        ])
        .args(["--pids", &pids.join(","), "--seed", "3", "--check-seconds", "20"])
        .output()
        .expect("run the workload");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    kill_restarted(&stdout);
    println!("{stdout}");
    assert!(!out.status.success(), "{stdout}");
    assert!(stdout.contains("NOT LINEARIZABLE"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_on_a_second_node_founds_no_second_cluster() {
    // `init` run again at once on another node, before it has joined: it
    // must not bootstrap a second cluster (which made both first nodes stop,
    // each seeing a peer of another cluster).
    let c = Cluster::start(3, &[]);
    let (code, out, err) = tardigrade(&["init", "--host", &c.nodes[1].grpc]);
    assert_eq!(code, 1, "a second init succeeded: {out}{err}");
    assert!(err.contains("already initialized"), "{err}");
    // As the one-shot init of docker-compose runs it at every start: an
    // existing cluster is success, and nothing changes.
    for n in [0, 1] {
        let (code, out, err) = tardigrade(&["init", "--host", &c.nodes[n].grpc, "--ok-if-initialized"]);
        assert_eq!(code, 0, "{out}{err}");
        assert!(
            out.contains("already initialized") && out.contains("nothing to do"),
            "{out}"
        );
    }
    // A node that does not answer yet is waited for, up to --wait-secs.
    let nobody = format!("127.0.0.1:{}", common::free_port());
    let t = std::time::Instant::now();
    let (code, _, err) = tardigrade(&["init", "--host", &nobody, "--wait-secs", "2"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("does not answer") && t.elapsed() >= Duration::from_secs(2),
        "{err}"
    );
    c.wait_replicated().await;
    put(&c.nodes[1].grpc, "one", "cluster").await.unwrap();
    for n in &c.nodes {
        assert_eq!(get(&n.grpc, "one").await.unwrap(), Some("cluster".into()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_peer_of_another_cluster_does_not_stop_a_healthy_node() {
    // Node 3's address comes back as a one-node cluster of its own. Nodes 1
    // and 2 still hear from each other: they say so in their logs and serve
    // on (they used to stop, as if their own stores were the strays).
    let mut c = Cluster::start(3, &[]);
    c.wait_replicated().await;
    c.nodes[2].proc.kill9();
    std::fs::remove_dir_all(&c.nodes[2].store).unwrap();
    let (grpc, http, store) = (
        c.nodes[2].grpc.clone(),
        c.nodes[2].http.clone(),
        c.nodes[2].store.clone(),
    );
    c.nodes[2].proc = spawn(&store, &grpc, &http, &grpc, &[]);
    wait("the new node to answer /health", 10 * ELECTION * 2, || async {
        http_get(&http, "/health").is_some()
    })
    .await;
    let (code, out, err) = tardigrade(&["init", "--host", &grpc]);
    assert_eq!(code, 0, "{out}{err}");
    // Several address-book exchanges (every 2 s).
    tokio::time::sleep(Duration::from_secs(5)).await;
    for i in 0..2 {
        assert!(
            c.nodes[i].proc.child.try_wait().unwrap().is_none(),
            "node {} stopped",
            i + 1
        );
    }
    let log = std::fs::read_to_string(c.nodes[0].store.with_extension("log")).unwrap();
    assert!(log.contains("another cluster"), "{log}");
    wait("nodes 1 and 2 to take a write", 10 * ELECTION * 2, || async {
        put(&c.nodes[0].grpc, "still", "one").await.is_ok()
    })
    .await;
    assert_eq!(get(&c.nodes[1].grpc, "still").await.unwrap(), Some("one".into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_errors_and_no_panic() {
    let dir = tempfile::tempdir().unwrap();
    // A node whose --join address answers nothing waits, and says why.
    let grpc = format!("127.0.0.1:{}", free_port());
    let http = format!("127.0.0.1:{}", free_port());
    let nowhere = format!("127.0.0.1:{}", free_port());
    let mut lonely = spawn(&dir.path().join("lonely"), &grpc, &http, &nowhere, &[]);
    wait("the lonely node to answer /health", 10 * ELECTION * 2, || async {
        http_get(&http, "/health").is_some()
    })
    .await;
    let (code, body) = http_get(&http, "/health").unwrap();
    assert_eq!(code, 503);
    assert!(body.contains("not initialized"), "{body}");
    assert!(lonely.child.try_wait().unwrap().is_none(), "still running");
    lonely.kill9();

    let c = Cluster::start(3, &[]);
    c.wait_replicated().await;
    // init twice.
    let (code, _, err) = tardigrade(&["init", "--host", &c.nodes[1].grpc]);
    assert_eq!(code, 1);
    assert!(err.contains("already initialized"), "{err}");
    // A store of this cluster pointed at another cluster.
    let other = Cluster::start(1, &[]);
    wait("the other cluster to serve", 10 * ELECTION * 2, || async {
        get(&other.nodes[0].grpc, "x").await.is_ok()
    })
    .await;
    let stranger_grpc = format!("127.0.0.1:{}", free_port());
    let stranger_http = format!("127.0.0.1:{}", free_port());
    // Copy node 3's store while the node is stopped.
    let mut c = c;
    c.nodes[2].proc.kill9();
    let copy = dir.path().join("stranger");
    copy_dir(&c.nodes[2].store, &copy);
    let out = Command::new(env!("CARGO_BIN_EXE_tardigrade"))
        .args(["start", "--store"])
        .arg(&copy)
        .args([
            "--listen-addr",
            &stranger_grpc,
            "--http-addr",
            &stranger_http,
            "--join",
            &other.nodes[0].grpc,
        ])
        .args(["--tick-ms", "50"])
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("another cluster"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // A malformed internal RPC: raft messages from a wrong cluster, and with no body.
    let mut t =
        proto::transport::raft_transport_client::RaftTransportClient::connect(format!("http://{}", c.nodes[0].grpc))
            .await
            .unwrap();
    let bad = proto::transport::RaftMessageBatch {
        cluster_id: "nope".into(),
        messages: vec![proto::transport::RaftMsg {
            range_id: 2,
            from: 9,
            to: 1,
            term: 1,
            body: None,
        }],
        ..Default::default()
    };
    let r = t.raft_messages(tokio_stream::iter(vec![bad])).await;
    if let Ok(resp) = r {
        let mut s = resp.into_inner();
        let first = s.message().await;
        assert!(first.is_err(), "a batch from another cluster is refused");
    }
    let garbage = proto::transport::RaftMessageBatch {
        cluster_id: String::new(),
        to_store: 1,
        messages: vec![proto::transport::RaftMsg {
            range_id: 2,
            from: 9,
            to: 1,
            term: 1,
            body: None,
        }],
        ..Default::default()
    };
    let _ = t.raft_messages(tokio_stream::iter(vec![garbage])).await;
    // Malformed internal batch requests: typed refusals, never a panic.
    use proto::kvserver::{batch_error::Kind, batch_response::Response as R, internal_client::InternalClient};
    let cluster_id = AdminClient::connect(format!("http://{}", c.nodes[0].grpc))
        .await
        .unwrap()
        .nodes(proto::admin::NodesStatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .cluster_id;
    let mut internal = InternalClient::connect(format!("http://{}", c.nodes[0].grpc))
        .await
        .unwrap();
    let kind = |r: proto::kvserver::BatchResponse| match r.response {
        Some(R::Error(e)) => e.kind,
        other => panic!("expected an error, got {other:?}"),
    };
    let wrong_cluster = proto::kvserver::BatchRequest {
        cluster_id: "nope".into(),
        range_id: 2,
        request: None,
    };
    let r = internal.batch(wrong_cluster).await.unwrap().into_inner();
    assert!(matches!(kind(r), Some(Kind::Unavailable(m)) if m.contains("cluster")));
    let empty = proto::kvserver::BatchRequest {
        cluster_id: cluster_id.clone(),
        range_id: 2,
        request: None,
    };
    let r = internal.batch(empty).await.unwrap().into_inner();
    assert!(matches!(kind(r), Some(Kind::Etcd(e)) if e.message.contains("empty")));
    let nowhere_cluster = cluster_id.clone();
    let nowhere = proto::kvserver::BatchRequest {
        cluster_id,
        range_id: 999,
        request: Some(proto::kvserver::batch_request::Request::EtcdRange(
            RangeRequest::default(),
        )),
    };
    let r = internal.batch(nowhere).await.unwrap().into_inner();
    assert!(matches!(kind(r), Some(Kind::RangeNotFound(999))));
    // A liveness heartbeat sent to the etcd range is refused, not applied there.
    let misdirected = proto::kvserver::BatchRequest {
        cluster_id: nowhere_cluster.clone(),
        range_id: 2,
        request: Some(proto::kvserver::batch_request::Request::Write(
            proto::kvserver::RaftCommand {
                op: Some(proto::kvserver::raft_command::Op::Heartbeat(
                    proto::kvserver::Heartbeat {
                        node_id: 1,
                        expiration_nanos: i64::MAX,
                    },
                )),
                ..Default::default()
            },
        )),
    };
    let r = internal.batch(misdirected).await.unwrap().into_inner();
    assert!(matches!(kind(r), Some(Kind::Etcd(e)) if e.message.contains("does not serve")));
    // Still serving.
    put(&c.nodes[0].grpc, "still", "ok").await.unwrap();
    assert_eq!(get(&c.nodes[1].grpc, "still").await.unwrap(), Some("ok".into()));
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else if e.file_name() != "LOCK" {
            std::fs::copy(&p, to.join(e.file_name())).unwrap();
        }
    }
}
