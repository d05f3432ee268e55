//! etcd's coordination tools against a 3-node cluster: `etcdctl lease`,
//! `put --lease`, `watch --rev --prefix`, `elect` and `lock`, and a lease
//! kept alive through a failover of the etcd range's leaseholder.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::cluster::{wait, Cluster};
use etcd_client::{Client, GetOptions, PutOptions, WatchOptions};

fn etcdctl_installed() -> bool {
    std::path::Path::new("/usr/bin/etcdctl").exists()
}

/// Runs etcdctl to completion: (exit code, stdout + stderr).
fn etcdctl(endpoints: &str, args: &[&str]) -> (i32, String) {
    let o = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoints}"))
        .args(args)
        .output()
        .expect("etcdctl runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.code().unwrap_or(-1), text)
}

/// Starts a long-running etcdctl; its stdout lines arrive on the channel.
fn etcdctl_bg(endpoints: &str, args: &[&str]) -> (Child, std::sync::mpsc::Receiver<String>) {
    let mut child = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoints}"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("etcdctl runs");
    let out = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    (child, rx)
}

/// The next `n` lines, or what came before `timeout`.
fn lines(rx: &std::sync::mpsc::Receiver<String>, n: usize, timeout: Duration) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    while out.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => out.push(l),
            Err(_) => break,
        }
    }
    out
}

fn interrupt(c: &mut Child) {
    unsafe {
        libc::kill(c.id() as i32, libc::SIGINT);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = c.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = c.kill();
    let _ = c.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_leases_watches_elections_and_locks_work_against_a_cluster() {
    if !etcdctl_installed() {
        if std::env::var("TARDIGRADE_REQUIRE_ETCD").is_ok_and(|v| v == "1") {
            panic!("etcdctl is not installed and TARDIGRADE_REQUIRE_ETCD=1");
        }
        println!("SKIPPED: etcdctl is not installed (`scripts/setup.sh test` installs it)");
        return;
    }
    let c = Cluster::start(3, &[]);
    c.wait_replicated().await;
    let all = c.nodes.iter().map(|n| n.grpc.clone()).collect::<Vec<_>>().join(",");
    let n2 = c.nodes[1].grpc.clone();
    wait("a put through node 2", Duration::from_secs(20), || {
        let n2 = n2.clone();
        async move { etcdctl(&n2, &["put", "ready", "1"]).0 == 0 }
    })
    .await;

    // Leases with etcdctl.
    let (code, out) = etcdctl(&all, &["lease", "grant", "30"]);
    assert_eq!(code, 0, "{out}");
    // "lease 694d5a3b9f0e4a0c granted with TTL(30s)"
    let id = out.split_whitespace().nth(1).expect("a lease id").to_string();
    assert!(out.contains("granted with TTL(30s)"), "{out}");
    let (code, out) = etcdctl(&all, &["put", "--lease", &id, "leased", "v"]);
    assert_eq!(code, 0, "{out}");
    let (code, out) = etcdctl(&n2, &["lease", "timetolive", &id, "--keys"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("granted with TTL(30s)") && out.contains("attached keys([leased])"),
        "{out}"
    );
    let (code, out) = etcdctl(&n2, &["lease", "keep-alive", "--once", &id]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("lease {id} keepalived with TTL(30)")), "{out}");
    let (code, out) = etcdctl(&all, &["lease", "list"]);
    assert!(code == 0 && out.contains(&id), "{out}");
    let (code, out) = etcdctl(&all, &["lease", "revoke", &id]);
    assert!(code == 0 && out.contains("revoked"), "{out}");
    let (_, out) = etcdctl(&all, &["get", "leased"]);
    assert!(out.trim().is_empty(), "revoked lease's key still there: {out}");
    let (code, out) = etcdctl(&all, &["lease", "timetolive", &id]);
    assert!(code == 0 && out.contains("already expired"), "{out}");

    // Watch from a past revision, with a prefix: every event, in order.
    let mut cl = Client::connect([c.nodes[0].grpc.as_str()], None).await.unwrap();
    let first = cl.put("w/1", "a", None).await.unwrap().header().unwrap().revision();
    cl.put("w/2", "b", None).await.unwrap();
    cl.delete("w/1", None).await.unwrap();
    let (mut watcher, rx) = etcdctl_bg(
        &c.nodes[2].grpc,
        &["watch", "--prefix", "--rev", &first.to_string(), "w/"],
    );
    // etcdctl prints type, key and value per event (a delete's value empty).
    let got = lines(&rx, 9, Duration::from_secs(10));
    assert_eq!(
        got,
        ["PUT", "w/1", "a", "PUT", "w/2", "b", "DELETE", "w/1", ""],
        "{got:?}"
    );
    cl.put("w/3", "live", None).await.unwrap();
    assert_eq!(lines(&rx, 3, Duration::from_secs(10)), ["PUT", "w/3", "live"]);
    interrupt(&mut watcher);

    // Elections: one leader at a time; the next takes over on resign.
    let (mut e1, rx1) = etcdctl_bg(&c.nodes[0].grpc, &["elect", "ballot", "p1"]);
    let l1 = lines(&rx1, 2, Duration::from_secs(10));
    assert!(l1.len() == 2 && l1[0].starts_with("ballot/") && l1[1] == "p1", "{l1:?}");
    let (mut e2, rx2) = etcdctl_bg(&c.nodes[1].grpc, &["elect", "ballot", "p2"]);
    assert!(lines(&rx2, 1, Duration::from_secs(2)).is_empty(), "two leaders at once");
    interrupt(&mut e1);
    let l2 = lines(&rx2, 2, Duration::from_secs(10));
    assert!(l2.len() == 2 && l2[1] == "p2", "p2 never became leader: {l2:?}");
    interrupt(&mut e2);

    // Locks: two holders never overlap.
    let script = "echo start $(date +%s%N); sleep 1; echo end $(date +%s%N)";
    let run = |node: &str| {
        Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={node}"))
            .args(["lock", "mutex", "--", "sh", "-c", script])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("etcdctl lock")
    };
    let a = run(&c.nodes[0].grpc);
    let b = run(&c.nodes[2].grpc);
    let span = |o: std::process::Output| -> (u128, u128) {
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        let num = |w: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(w))
                .and_then(|n| n.trim().parse::<u128>().ok())
                .unwrap_or_else(|| panic!("no {w} in {text:?} ({})", String::from_utf8_lossy(&o.stderr)))
        };
        (num("start "), num("end "))
    };
    let (sa, ea) = span(a.wait_with_output().unwrap());
    let (sb, eb) = span(b.wait_with_output().unwrap());
    assert!(
        ea < sb || eb < sa,
        "lock holders overlapped: [{sa}, {ea}] and [{sb}, {eb}]"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_kept_alive_survives_the_loss_of_the_leaseholder_and_expires_once_let_go() {
    let mut c = Cluster::start(3, &[]);
    c.wait_replicated().await;
    let lh = loop {
        if let Some(i) = c.etcd_leaseholder().await {
            break i;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let other = (lh + 1) % 3;
    let third = (lh + 2) % 3;
    let mut cl = Client::connect([c.nodes[other].grpc.as_str()], None).await.unwrap();
    let ttl = 3;
    let lease = cl.lease_grant(ttl, None).await.unwrap().id();
    cl.put("owned", "x", Some(PutOptions::new().with_lease(lease)))
        .await
        .unwrap();
    // Keep it alive every second through a node that stays up, as a
    // client does (reconnecting after errors).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let keeper = {
        let addr = c.nodes[other].grpc.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut failures = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(mut cl) = Client::connect([addr.as_str()], None).await {
                    if let Ok((mut k, mut s)) = cl.lease_keep_alive(lease).await {
                        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                            if k.keep_alive().await.is_err() {
                                break;
                            }
                            match tokio::time::timeout(Duration::from_secs(1), s.message()).await {
                                Ok(Ok(Some(m))) => assert!(m.ttl() > 0, "a kept-alive lease expired"),
                                _ => {
                                    failures += 1;
                                    break;
                                }
                            }
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            failures
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    c.nodes[lh].proc.kill9();
    let t0 = Instant::now();
    // For three TTLs after the failover, the key stays.
    while t0.elapsed() < Duration::from_secs(3 * ttl as u64) {
        let r = cl.get("owned", None).await;
        if let Ok(r) = r {
            assert_eq!(
                r.kvs().len(),
                1,
                "the kept-alive lease expired {:?} after the kill",
                t0.elapsed()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let failures = keeper.await.unwrap();
    println!("keep-alive streams broken by the failover: {failures}");
    // Let go: it expires within its TTL and a little more.
    let let_go = Instant::now();
    let mut cl3 = Client::connect([c.nodes[third].grpc.as_str()], None).await.unwrap();
    wait(
        "the abandoned lease's key to go",
        Duration::from_secs(ttl as u64 + 5),
        || {
            let mut cl3 = cl3.clone();
            async move { cl3.get("owned", None).await.is_ok_and(|r| r.kvs().is_empty()) }
        },
    )
    .await;
    println!("expired {:?} after its last keep-alive", let_go.elapsed());
    let left = cl3.get("", Some(GetOptions::new().with_prefix())).await.unwrap();
    assert!(left.kvs().iter().all(|kv| kv.key() != b"owned"));
    let _ = &mut cl3;
}

/// The coordination workload under the kill/pause nemesis: watchers see
/// every acknowledged write once and in order, a lease kept alive in time
/// never expires, and no guarded write of a lock holder that had lost the
/// lock applies (fencing on the lock key's revision, as Jepsen checks
/// etcd's locks).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_leases_and_fenced_locks_hold_under_the_nemesis() {
    let c = Cluster::start(3, &[]);
    c.wait_replicated().await;
    let pids: Vec<String> = c.nodes.iter().map(|n| n.proc.pid().to_string()).collect();
    let hosts: Vec<String> = c.nodes.iter().map(|n| n.grpc.clone()).collect();
    let out = Command::new(env!("CARGO_BIN_EXE_tardigrade"))
        .args(["workload", "coordination", "--hosts", &hosts.join(",")])
        .args(["--duration", "15", "--seed", "5", "--lease-ttl", "4"])
        .args(["--nemesis", "--pids", &pids.join(","), "--faults", "kill,pause"])
        .args(["--fault-interval", "2.5", "--fault-duration", "2"])
        .output()
        .expect("run the workload");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    common::cluster::kill_restarted(&stdout);
    println!("{stdout}");
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("nemesis: "), "the nemesis did something: {stdout}");
    assert!(stdout.contains("every watch complete and in order"), "{stdout}");
    // The checks had something to check.
    let num = |label: &str| -> u64 {
        let at = stdout.find(label).unwrap_or_else(|| panic!("{label} in {stdout}"));
        stdout[..at]
            .split_whitespace()
            .last()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    assert!(num(" writes acknowledged") > 50, "{stdout}");
    assert!(num(" keep-alives answered") > 20, "{stdout}");
    assert!(num(" taken;") >= 3, "locks taken: {stdout}");
}

/// A watcher that does not read holds back neither the writes nor another
/// watcher of the same keys, and once it reads it gets every event, in
/// order, caught up from storage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_watcher_holds_back_neither_writes_nor_other_watchers() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = common::start_tardigrade(&dir.path().join("n"));
    // Once failed after 32 s in a full run and never again: a failure now
    // shows the node's log.
    let _log = LogOnPanic(dir.path().join("n.log"));
    node.wait_healthy(Duration::from_secs(30));
    // Each watcher on its own connection (HTTP/2 flow control is shared by
    // a connection's streams: one unread stream would stall the client's
    // other streams, whatever the server does).
    let mut slow_cl = Client::connect([node.grpc.as_str()], None).await.unwrap();
    let mut fast_cl = Client::connect([node.grpc.as_str()], None).await.unwrap();
    let mut cl = Client::connect([node.grpc.as_str()], None).await.unwrap();
    let mut slow = slow_cl
        .watch("s/", Some(WatchOptions::new().with_prefix()))
        .await
        .unwrap();
    let mut fast = fast_cl
        .watch("s/", Some(WatchOptions::new().with_prefix()))
        .await
        .unwrap();
    // ~24 MB of events: far more than the stream's buffers and gRPC's
    // windows hold, so the slow watcher's task must stop and catch up.
    let n = 1500usize;
    let value = vec![b'x'; 16 * 1024];
    let keys_of = |evs: &[etcd_client::Event]| -> Vec<String> {
        evs.iter()
            .filter_map(|e| e.kv().map(|kv| String::from_utf8_lossy(kv.key()).into_owned()))
            .collect()
    };
    let fast_reader = tokio::spawn(async move {
        let mut keys = Vec::new();
        while keys.len() < n {
            match fast.message().await {
                Ok(Some(m)) => keys.extend(keys_of(m.events())),
                other => panic!("the fast watcher's stream ended: {other:?}"),
            }
        }
        keys
    });
    let t0 = Instant::now();
    for i in 0..n {
        cl.put(format!("s/{i:05}"), value.clone(), None).await.unwrap();
    }
    let wrote = t0.elapsed();
    let fast_keys = tokio::time::timeout(Duration::from_secs(30), fast_reader)
        .await
        .expect("the fast watcher kept up")
        .unwrap();
    let want: Vec<String> = (0..n).map(|i| format!("s/{i:05}")).collect();
    assert_eq!(fast_keys, want, "the fast watcher's events");
    let mut slow_keys = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while slow_keys.len() < n {
        assert!(
            Instant::now() < deadline,
            "the slow watcher got {} of {n}",
            slow_keys.len()
        );
        match tokio::time::timeout(Duration::from_secs(10), slow.message()).await {
            Ok(Ok(Some(m))) => slow_keys.extend(keys_of(m.events())),
            other => panic!("the slow watcher's stream ended: {other:?}"),
        }
    }
    assert_eq!(slow_keys, want, "the slow watcher's events");
    println!("{n} puts of 16 KiB in {wrote:?} with one watcher not reading; it then caught up in order");
}

/// Prints the tail of a node's log if the test panics.
struct LogOnPanic(std::path::PathBuf);

impl Drop for LogOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.0).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!("---- {} (last 60 lines) ----", self.0.display());
            for l in &lines[lines.len().saturating_sub(60)..] {
                eprintln!("{l}");
            }
        }
    }
}
