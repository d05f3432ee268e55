//! Serializable transactions on three-node clusters of real processes: the
//! bank and list-append workloads under the kill/pause nemesis with splits,
//! each testing knob caught by a checker, a 100,000-write transaction, an
//! abandoned transaction cleaned up (by a writer, and by the sweep), 1PC,
//! and commit wait.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::*;
use common::http_get;
use kv::txn::{self, Txn, TxnError};
use proto::kvpb;

fn run_workload(args: Vec<String>) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tardigrade"))
        .args(&args)
        .output()
        .expect("run the workload");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn hosts(c: &Cluster) -> (String, String, String) {
    let grpc: Vec<String> = c.nodes.iter().map(|n| n.grpc.clone()).collect();
    let http: Vec<String> = c.nodes.iter().map(|n| n.http.clone()).collect();
    let pids: Vec<String> = c.nodes.iter().map(|n| n.proc.pid().to_string()).collect();
    (grpc.join(","), http.join(","), pids.join(","))
}

fn counter(c: &Cluster, name: &str) -> u64 {
    c.nodes
        .iter()
        .filter_map(|n| http_get(&n.http, "/metrics"))
        .map(|(_, body)| {
            body.lines()
                .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
                .unwrap_or(0)
        })
        .sum()
}

async fn sender(c: &Cluster, i: usize) -> Arc<kvpb::kv_client::KvClient<tonic::transport::Channel>> {
    Arc::new(workload::txn_setup::client(&c.nodes[i].grpc).await.expect("client"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bank_and_append_under_the_nemesis_and_splits_stay_serializable() {
    // Small ranges: the lists grow and split by size while the nemesis
    // kills and pauses nodes; the accounts and keys were split by hand first.
    let c = Cluster::start(3, &["--range-max-bytes", "32768"]);
    c.wait_replicated().await;
    let (grpc, http, pids) = hosts(&c);
    let bank = {
        let args: Vec<String> = [
            "workload",
            "bank",
            "--hosts",
            &grpc,
            "--http-hosts",
            &http,
            "--accounts",
            "30",
            "--clients",
            "6",
            "--duration",
            "25",
            "--seed",
            "3",
            "--nemesis",
            "--pids",
            &pids,
            "--fault-interval",
            "6",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        tokio::task::spawn_blocking(move || run_workload(args))
    };
    let append = {
        let args: Vec<String> = [
            "workload",
            "append",
            "--hosts",
            &grpc,
            "--http-hosts",
            &http,
            "--keys",
            "8",
            "--clients",
            "6",
            "--duration",
            "25",
            "--seed",
            "5",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        tokio::task::spawn_blocking(move || run_workload(args))
    };
    // Splits while the transactions run (and the nemesis strikes): inside
    // the accounts' and the lists' ranges, once the workloads split them.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let hosts: Vec<String> = c.nodes.iter().map(|n| n.grpc.clone()).collect();
    let mut split_during = 0;
    for (i, key) in (0..30)
        .step_by(3)
        .map(|a| format!("bank/acct/{a:04}/x"))
        .chain((0..8).map(|k| format!("append/{k:03}/x")))
        .enumerate()
    {
        let one = [key.into_bytes()];
        let h = [hosts[i % hosts.len()].clone()];
        if tokio::time::timeout(
            Duration::from_secs(3),
            workload::txn_setup::split_and_spread(&h, &one, &|_| {}),
        )
        .await
        .is_ok_and(|r| r.is_ok())
        {
            split_during += 1;
        }
    }
    let (bank_ok, bank_out, bank_err) = bank.await.unwrap();
    let (append_ok, append_out, append_err) = append.await.unwrap();
    kill_restarted(&bank_out);
    eprintln!("---- bank ----\n{bank_out}{bank_err}\n---- append ----\n{append_out}{append_err}");
    assert!(bank_ok, "bank: {bank_out}{bank_err}");
    assert!(append_ok, "append: {append_out}{append_err}");
    assert!(bank_out.contains("bank: consistent"), "{bank_out}");
    assert!(bank_out.contains("nemesis: "), "the nemesis did something: {bank_out}");
    assert!(append_out.contains("append: serializable"), "{append_out}");
    assert!(split_during > 0, "some ranges split while transactions ran");
    eprintln!("{split_during} of 18 splits done during the run");
    // Transactions really spanned ranges: records, pushes and background
    // resolution all happened.
    for what in ["commits ", "pushes ", "intents_resolved_async "] {
        let n: u64 = bank_out
            .lines()
            .find_map(|l| l.strip_prefix("transaction counters (all nodes): "))
            .and_then(|l| l.split(", ").find_map(|p| p.strip_prefix(what)?.parse().ok()))
            .unwrap_or(0);
        assert!(n > 0, "{what}: {bank_out}");
    }
}

/// Each testing knob, with the bank's reads of every balance racing its
/// transfers, must be caught.
async fn knob_is_caught(knob: &str) -> String {
    let env = format!("env:{knob}=1");
    let c = Cluster::start(3, &[&env]);
    c.wait_replicated().await;
    let (grpc, http, _) = hosts(&c);
    let args: Vec<String> = [
        "workload",
        "bank",
        "--hosts",
        &grpc,
        "--http-hosts",
        &http,
        "--accounts",
        "20",
        "--clients",
        "6",
        "--duration",
        "6", // every knob is caught within the first second
        "--read-percent",
        "50",
        "--seed",
        "11",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (ok, out, err) = tokio::task::spawn_blocking(move || run_workload(args)).await.unwrap();
    eprintln!("---- {knob} ----\n{out}{err}");
    assert!(!ok, "{knob} on: the bank must report an inconsistency\n{out}{err}");
    assert!(out.contains("BAD READ") || err.contains("not consistent"), "{out}{err}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn skipping_the_read_refresh_is_caught() {
    knob_is_caught("TARDIGRADE_TESTING_SKIP_REFRESH").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn skipping_the_timestamp_cache_is_caught() {
    knob_is_caught("TARDIGRADE_TESTING_SKIP_TSCACHE").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_that_ignore_intents_are_caught() {
    knob_is_caught("TARDIGRADE_TESTING_DIRTY_READS").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_transaction_of_100000_writes_commits_and_is_resolved_range_by_range() {
    let c = Cluster::start(3, &[]);
    c.wait_replicated().await;
    // Four ranges under the keys written.
    let hosts: Vec<String> = c.nodes.iter().map(|n| n.grpc.clone()).collect();
    let keys: Vec<Vec<u8>> = ["big/1", "big/4", "big/7"]
        .iter()
        .map(|k| k.as_bytes().to_vec())
        .collect();
    workload::txn_setup::split_and_spread(&hosts, &keys, &|_| {})
        .await
        .expect("splits");
    let s = sender(&c, 0).await;
    let started = Instant::now();
    let mut t = Txn::begin(s.clone());
    for chunk in 0..100 {
        let reqs = (0..1000)
            .map(|i| txn::put(format!("big/{:06}", chunk * 1000 + i).as_bytes(), b"v"))
            .collect();
        t.send(reqs).await.expect("writes");
    }
    let lock_spans = t.proto();
    assert!(!lock_spans.key.is_empty());
    t.commit().await.expect("commit");
    let committed = started.elapsed();
    // Every key reads back (a reader meeting a leftover intent resolves it),
    // and the background resolution leaves none.
    // Right after the commit the background resolution of 100,000 intents
    // loads every node, and a scan that meets them resolves them itself:
    // it may time out (Unavailable, or an unknown outcome) and is retried,
    // as a client retries a read. Seen in about one `make test` in three
    // under load; see the closing note of issue 14.
    let mut tries = 0;
    let rows = loop {
        tries += 1;
        let mut r = Txn::begin(s.clone());
        match r.scan(b"big/", b"big0").await {
            Ok(rows) => {
                r.commit().await.unwrap();
                break rows;
            }
            Err(e @ (TxnError::Retry(_) | TxnError::Unavailable(_))) if tries < 5 => {
                eprintln!("scan try {tries}: {e}; again");
            }
            Err(e) => panic!("scan: {e:?}"),
        }
    };
    assert_eq!(rows.len(), 100_000);
    // No intent is left on any range (the statistics count them).
    wait("no intents left", Duration::from_secs(60), || async {
        let ranges = c.ranges(0).await.unwrap_or_default();
        !ranges.is_empty()
            && ranges
                .iter()
                .all(|r| r.stats.as_ref().map_or(0, |s| s.intent_count) == 0)
    })
    .await;
    let resolved_async = counter(&c, "tardigrade_txn_intents_resolved_async_total");
    let resolved_by_readers = counter(&c, "tardigrade_txn_intents_resolved_by_conflict_total");
    assert!(resolved_async > 0, "resolved in the background: {resolved_async}");
    eprintln!(
        "{resolved_async} intents resolved in the background, {resolved_by_readers} by the reader, the rest by the commit"
    );
    eprintln!("100,000 writes committed in {committed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_abandoned_transaction_expires_and_its_intents_are_cleaned_up() {
    let c = Cluster::start(3, &[]);
    c.wait_replicated().await;
    let hosts: Vec<String> = c.nodes.iter().map(|n| n.grpc.clone()).collect();
    workload::txn_setup::split_and_spread(&hosts, &[b"ab/m".to_vec()], &|_| {})
        .await
        .expect("split");
    let s = sender(&c, 1).await;
    // A coordinator that writes on two ranges and dies: its heartbeats stop.
    let mut dead = Txn::begin(s.clone());
    dead.put(b"ab/a", b"dead").await.unwrap();
    dead.put(b"ab/z", b"dead").await.unwrap();
    drop(dead);
    let started = Instant::now();
    // A writer of the same key waits for the record to expire, aborts it,
    // cleans its intent up and commits.
    let (r, _) = txn::run(sender(&c, 2).await, |t| {
        Box::pin(async move {
            t.put(b"ab/a", b"alive").await?;
            Ok(())
        })
    })
    .await;
    r.expect("the writer commits");
    let waited = started.elapsed();
    assert!(waited >= Duration::from_secs(2), "it waited for the expiry: {waited:?}");
    assert!(waited < Duration::from_secs(30), "{waited:?}");
    // The other intent is no obstacle either: a reader resolves it.
    let mut r = Txn::begin(s.clone());
    assert_eq!(r.get(b"ab/a").await.unwrap().as_deref(), Some(&b"alive"[..]));
    assert_eq!(
        r.get(b"ab/z").await.unwrap(),
        None,
        "the dead transaction's write is gone"
    );
    r.commit().await.unwrap();
    assert!(counter(&c, "tardigrade_txn_pushes_aborted_total") >= 1);
    // Intents nobody meets are found by the background sweep: another
    // coordinator dies, and no request touches its keys again.
    let mut dead = Txn::begin(s.clone());
    dead.put(b"ab/b", b"dead").await.unwrap();
    dead.put(b"ab/y", b"dead").await.unwrap();
    drop(dead);
    wait(
        "the sweep cleaned the abandoned intents up",
        Duration::from_secs(60),
        || async {
            let ranges = c.ranges(0).await.unwrap_or_default();
            !ranges.is_empty()
                && ranges
                    .iter()
                    .all(|r| r.stats.as_ref().map_or(0, |s| s.intent_count) == 0)
        },
    )
    .await;
}

/// The applied index of node 1's replica of the range holding `key`.
async fn applied(c: &Cluster, key: &[u8]) -> u64 {
    let ranges = c.ranges(0).await.unwrap_or_default();
    ranges
        .iter()
        .filter(|r| {
            r.descriptor
                .as_ref()
                .is_some_and(|d| d.start_key.as_slice() <= key && (d.end_key.is_empty() || key < d.end_key.as_slice()))
        })
        .map(|r| r.applied_index)
        .max()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_one_range_transaction_commits_in_one_raft_command() {
    let c = Cluster::start(3, &[]);
    c.wait_replicated().await;
    let s = sender(&c, 0).await;
    // Warm the caches.
    let (r, _) = txn::run(s.clone(), |t| {
        Box::pin(async move {
            t.write_at_commit(vec![txn::put(b"one/warm", b"x")]);
            Ok(())
        })
    })
    .await;
    r.unwrap();
    // The user range's applied index counts its raft commands.
    let before = (
        applied(&c, b"one/k").await,
        counter(&c, "tardigrade_txn_commits_one_phase_total"),
    );
    let t = Txn::begin(s.clone());
    t.commit_with(vec![txn::put(b"one/k", b"v")]).await.unwrap();
    // Node 1 applies it (it may lag the leaseholder a little).
    let mut after = (0, 0);
    for _ in 0..250 {
        after = (
            applied(&c, b"one/k").await,
            counter(&c, "tardigrade_txn_commits_one_phase_total"),
        );
        if after.0 > before.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(after.1 - before.1, 1, "committed in one phase");
    assert_eq!(after.0 - before.0, 1, "one raft command on the range");
    let mut r = Txn::begin(s);
    assert_eq!(r.get(b"one/k").await.unwrap().as_deref(), Some(&b"v"[..]));
}

/// The range holding `key`, as node 1 lists it.
async fn range_of(c: &Cluster, key: &[u8]) -> u64 {
    let ranges = c.ranges(0).await.unwrap_or_default();
    ranges
        .iter()
        .filter_map(|r| r.descriptor.as_ref())
        .find(|d| d.start_key.as_slice() <= key && (d.end_key.is_empty() || key < d.end_key.as_slice()))
        .map_or(0, |d| d.range_id)
}

/// A write committed on a fresh lease lands up to the maximum offset ahead
/// of the leaseholder's clock (the timestamp cache's low-water mark): it is
/// acknowledged only once that clock passed it (commit wait), so a
/// transaction that begins afterwards on a node whose clock is behind still
/// sees it (within its uncertainty interval). The 600 s soak lost appends
/// this way before commit wait existed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_commit_on_a_fresh_lease_is_seen_by_the_next_transaction_anywhere() {
    let mut c = Cluster::start(3, &[]);
    c.wait_replicated().await;
    // Node 1 runs 250 ms ahead (within the 500 ms maximum offset).
    c.nodes[0].proc.kill9();
    let n = &c.nodes[0];
    let extra = vec!["env:TARDIGRADE_TESTING_CLOCK_SKEW_MS=250".to_string()];
    let proc = spawn(&n.store, &n.grpc, &n.http, &c.join, &extra);
    c.nodes[0].proc = proc;
    c.nodes[0].proc.wait_healthy(10 * ELECTION * 4);
    c.wait_replicated().await;
    let hosts: Vec<String> = c.nodes.iter().map(|n| n.grpc.clone()).collect();
    workload::txn_setup::split_and_spread(&hosts, &[b"cw/".to_vec()], &|_| {})
        .await
        .expect("split");
    let range = range_of(&c, b"cw/k").await;
    assert!(range > 0);
    // The reader's gateway holds no replica, so no applied write pulls its
    // clock up: only the uncertainty interval can show it the value.
    let fourth = c.add_node();
    c.nodes[fourth].proc.wait_healthy(10 * ELECTION * 4);
    let (fast, slow) = (sender(&c, 0).await, sender(&c, fourth).await);
    for round in 0..5u32 {
        // A fresh lease on the fast node: away from it, then back.
        let lease = kv::admin::find_lease(&hosts[1], range).await.expect("lease");
        for &to in &lease.voter_nodes {
            let _ = kv::admin::transfer_lease(&hosts[1], range, to).await;
            let now = kv::admin::find_lease(&hosts[1], range).await.expect("lease");
            if now.leaseholder_addr != hosts[0] {
                break;
            }
        }
        let mut on_fast = false;
        for &to in &lease.voter_nodes {
            let _ = kv::admin::transfer_lease(&hosts[1], range, to).await;
            if kv::admin::find_lease(&hosts[1], range)
                .await
                .expect("lease")
                .leaseholder_addr
                == hosts[0]
            {
                on_fast = true;
                break;
            }
        }
        assert!(on_fast, "the lease moved to the fast node");
        let value = format!("v{round}");
        let (r, _) = txn::run(fast.clone(), |t| {
            let value = value.clone();
            Box::pin(async move {
                t.write_at_commit(vec![txn::put(b"cw/k", value.as_bytes())]);
                Ok(())
            })
        })
        .await;
        r.expect("the write commits");
        // At once, through a node whose clock is behind.
        let mut t = Txn::begin(slow.clone());
        let got = t.get(b"cw/k").await.expect("read");
        assert_eq!(
            got.as_deref(),
            Some(value.as_bytes()),
            "round {round}: a committed write must be seen"
        );
    }
}
