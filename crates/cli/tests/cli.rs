//! The `tardigrade` binary as a user runs it: `--help` everywhere, `kv`
//! commands, `debug ranges`, `/health` and `/metrics`, and clear errors (no
//! panic) for a taken port or an unusable store.

mod common;

use std::time::Duration;

use common::{http_get, start_tardigrade, tardigrade};

#[test]
fn every_command_has_help() {
    for args in [
        vec!["--help"],
        vec!["start-single-node", "--help"],
        vec!["kv", "--help"],
        vec!["kv", "put", "--help"],
        vec!["kv", "get", "--help"],
        vec!["kv", "del", "--help"],
        vec!["kv", "scan", "--help"],
        vec!["kv", "cas", "--help"],
        vec!["debug", "ranges", "--help"],
        vec!["workload", "put", "--help"],
        vec!["workload", "check-append", "--help"],
        vec!["workload", "register", "--help"],
        vec!["node", "health", "--help"],
        vec!["init", "--help"],
    ] {
        let (code, out, _) = tardigrade(&args);
        assert_eq!(code, 0, "{args:?}");
        assert!(out.contains("Usage:"), "{args:?}: {out}");
    }
}

#[test]
fn check_append_judges_a_history_file_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    // Write skew: each read the other's key empty, then appended to it.
    let skew = [
        r#"{"type":"invoke","process":0,"value":[["r","x",null],["append","y",1]]}"#,
        r#"{"type":"invoke","process":1,"value":[["r","y",null],["append","x",1]]}"#,
        r#"{"type":"ok","process":0,"value":[["r","x",[]],["append","y",1]]}"#,
        r#"{"type":"ok","process":1,"value":[["r","y",[]],["append","x",1]]}"#,
        r#"{"type":"invoke","process":0,"value":[["r","x",null],["r","y",null]]}"#,
        r#"{"type":"ok","process":0,"value":[["r","x",[1]],["r","y",[1]]]}"#,
    ];
    let bad = dir.path().join("skew.jsonl");
    std::fs::write(&bad, skew.join("\n")).unwrap();
    let (code, out, _) = tardigrade(&["workload", "check-append", bad.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("NOT SERIALIZABLE") && out.contains("G2-item: T0 -rw(x)-> T1 -rw(y)-> T0"),
        "{out}"
    );
    // Without the last read nothing orders the appends: no cycle to see.
    let good = dir.path().join("good.jsonl");
    std::fs::write(&good, skew[..4].join("\n")).unwrap();
    let (code, out, _) = tardigrade(&["workload", "check-append", good.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("SERIALIZABLE: 2 transactions"), "{out}");
    let junk = dir.path().join("junk.jsonl");
    std::fs::write(&junk, "{\"type\": \"ok\"}\n").unwrap();
    let (code, _, err) = tardigrade(&["workload", "check-append", junk.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("line 1"), "{err}");
}

#[test]
fn kv_commands_debug_ranges_health_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = start_tardigrade(&dir.path().join("store"));
    node.wait_healthy(Duration::from_secs(30));
    let h = node.grpc.clone();
    let (code, out, err) = tardigrade(&["kv", "put", "greeting", "hello", "--host", &h]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("OK (revision "), "{out}");
    let (_, out, _) = tardigrade(&["kv", "get", "greeting", "--host", &h]);
    assert_eq!(out, "greeting\nhello\n");
    let (code, _, _) = tardigrade(&["kv", "cas", "greeting", "hello", "bye", "--host", &h]);
    assert_eq!(code, 0);
    let (code, _, err) = tardigrade(&["kv", "cas", "greeting", "hello", "again", "--host", &h]);
    assert_eq!(code, 1);
    assert!(err.contains("not swapped"), "{err}");
    assert!(!err.contains("panicked"));
    tardigrade(&["kv", "put", "g2", "x", "--host", &h]);
    let (_, out, _) = tardigrade(&["kv", "scan", "g", "--host", &h]);
    assert!(out.contains("greeting\tbye") && out.contains("g2\tx"), "{out}");
    let (_, out, _) = tardigrade(&["kv", "del", "g", "--prefix", "--host", &h]);
    assert_eq!(out.trim(), "2");
    let (code, out, err) = tardigrade(&["debug", "ranges", "--host", &h]);
    assert_eq!(code, 0, "{err}");
    for name in ["system", "etcd", "user"] {
        assert!(out.contains(name), "{out}");
    }
    assert!(out.contains("valid"), "leases are held: {out}");
    assert!(out.contains("3 of 3 ranges on node 1 shown"), "{out}");
    // Filtered by key span (escapes as the span column prints them).
    let (code, out, err) = tardigrade(&["debug", "ranges", "--host", &h, "--start", "\\x10", "--end", "\\x10a"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("etcd") && !out.contains("system") && !out.contains("user"),
        "{out}"
    );
    assert!(out.contains("1 of 3 ranges"), "{out}");
    let (_, out, _) = tardigrade(&["debug", "ranges", "--host", &h, "--start", "\\x11", "--summary"]);
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(
        out.starts_with("1 of 3 ranges on node 1 shown; 1 leases held here"),
        "{out}"
    );
    let (code, _, err) = tardigrade(&["debug", "ranges", "--host", &h, "--start", "\\xZZ"]);
    assert_eq!(code, 1);
    assert!(err.contains("bad escape"), "{err}");
    let (code, body) = http_get(&node.health, "/health").unwrap();
    assert_eq!((code, body.trim()), (200, "{\"health\":\"true\"}"));
    let (code, metrics) = http_get(&node.health, "/metrics").unwrap();
    assert_eq!(code, 200);
    let fsyncs: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("tardigrade_raft_fsyncs_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("fsync counter");
    assert!(fsyncs >= 4, "{fsyncs} syncs after 4 writes");
    assert!(metrics.contains("tardigrade_request_duration_seconds_bucket{method=\"put\""));
    assert!(metrics.contains("tardigrade_ranges 3"));
    // The container health check: 0 when healthy, 1 and a reason otherwise.
    let (code, out, err) = tardigrade(&["node", "health", "--http-addr", &node.health]);
    assert_eq!((code, out.trim()), (0, "{\"health\":\"true\"}"), "{err}");
    let nobody = format!("127.0.0.1:{}", common::free_port());
    let (code, _, err) = tardigrade(&["node", "health", "--http-addr", &nobody, "--timeout-ms", "500"]);
    assert_eq!(code, 1);
    assert!(err.contains("cannot reach") && !err.contains("panicked"), "{err}");
}

#[test]
fn a_node_stops_cleanly_on_sigterm() {
    // `docker stop` sends SIGTERM to the container's first process, which
    // had no handler for it and was killed after the grace period.
    let dir = tempfile::tempdir().unwrap();
    let mut node = start_tardigrade(&dir.path().join("store"));
    node.wait_healthy(Duration::from_secs(30));
    // SAFETY: plain libc call on our own child.
    unsafe { libc::kill(node.pid(), libc::SIGTERM) };
    let deadline = std::time::Instant::now() + Duration::from_secs(8);
    let status = loop {
        if let Some(s) = node.child.try_wait().unwrap() {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "still running 8 s after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "a clean exit: {status}");
}

#[test]
fn start_up_errors_are_clear_and_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    // A taken port.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, _, err) = tardigrade(&[
        "start-single-node",
        "--store",
        dir.path().join("s").to_str().unwrap(),
        "--listen-addr",
        &addr,
        "--http-addr",
        "127.0.0.1:0",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("cannot listen on"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // A store path that is a file.
    let file = dir.path().join("file");
    std::fs::write(&file, b"not a directory").unwrap();
    let (code, _, err) = tardigrade(&[
        "start-single-node",
        "--store",
        file.to_str().unwrap(),
        "--listen-addr",
        "127.0.0.1:0",
        "--http-addr",
        "127.0.0.1:0",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("cannot start a node"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // A client pointed at nothing (a port no one listens on).
    drop(taken);
    let (code, _, err) = tardigrade(&["kv", "get", "x", "--host", &addr]);
    assert_eq!(code, 1);
    assert!(err.contains("cannot connect") || err.contains("failed"), "{err}");
}
