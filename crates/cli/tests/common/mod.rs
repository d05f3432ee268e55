//! Helpers for tests that run real processes: the `tardigrade` binary and, as
//! an anchor, Debian's etcd. Everything listens on 127.0.0.1 on ports chosen
//! free at run time, and every process is stopped by PID when its guard drops.
#![allow(dead_code)]

pub mod cluster;
pub mod compose;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Runs `tardigrade args...` to completion: (exit code, stdout, stderr).
pub fn tardigrade(args: &[&str]) -> (i32, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_tardigrade"))
        .args(args)
        .output()
        .expect("run tardigrade");
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// A port free now, picked at random below Linux's ephemeral range
/// (32768 and up): a port the kernel handed out for `bind(0)` can be taken
/// by any outgoing connection before the node binds it (it happened after
/// the container tests, whose clients reconnect by the thousand).
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
        ^ (u64::from(std::process::id()) << 32);
    for _ in 0..1000 {
        let mut x = seed.wrapping_add(NEXT.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed));
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 33;
        let port = 10_000 + (x % 22_000) as u16;
        // Never the same port twice in one process (nothing holds it).
        static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if !given.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
    panic!("no free port below 32000 after 1000 tries")
}

/// A child process, killed (SIGKILL) when dropped.
pub struct Proc {
    pub child: Child,
    /// host:port of its gRPC (client) endpoint.
    pub grpc: String,
    /// host:port serving GET /health.
    pub health: String,
}

impl Proc {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn kill9(&mut self) {
        // SAFETY: plain libc call on our own child's pid.
        unsafe { libc::kill(self.pid(), libc::SIGKILL) };
        let _ = self.child.wait();
    }

    /// Waits until GET /health answers 200.
    pub fn wait_healthy(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("process exited early: {status}");
            }
            if http_get(&self.health, "/health").is_some_and(|(code, _)| code == 200) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} not healthy after {timeout:?}",
                self.health
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill9();
        }
    }
}

/// A minimal HTTP/1.0 GET: (status code, body).
pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let code = out.split_whitespace().nth(1)?.parse().ok()?;
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    Some((code, body))
}

pub fn start_tardigrade(store: &Path) -> Proc {
    let grpc = format!("127.0.0.1:{}", free_port());
    let health = format!("127.0.0.1:{}", free_port());
    start_tardigrade_at(store, &grpc, &health)
}

pub fn start_tardigrade_at(store: &Path, grpc: &str, health: &str) -> Proc {
    let log = std::fs::File::create(store.with_extension("log")).expect("log file");
    let child = Command::new(env!("CARGO_BIN_EXE_tardigrade"))
        .args(["start-single-node", "--store"])
        .arg(store)
        .args(["--listen-addr", grpc, "--http-addr", health, "--tick-ms", "50"])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn tardigrade");
    Proc {
        child,
        grpc: grpc.to_string(),
        health: health.to_string(),
    }
}

/// Starts Debian's etcd (the anchor), or returns `None` if it is not installed.
pub fn start_etcd(dir: &Path) -> Option<Proc> {
    let etcd = ["/usr/bin/etcd", "/usr/local/bin/etcd"]
        .into_iter()
        .find(|p| Path::new(p).exists())?;
    let client = format!("127.0.0.1:{}", free_port());
    let peer = format!("127.0.0.1:{}", free_port());
    let log = std::fs::File::create(dir.join("etcd.log")).expect("log file");
    let child = Command::new(etcd)
        .args(["--name", "anchor", "--data-dir"])
        .arg(dir.join("etcd-data"))
        .args(["--listen-client-urls", &format!("http://{client}")])
        .args(["--advertise-client-urls", &format!("http://{client}")])
        .args(["--listen-peer-urls", &format!("http://{peer}")])
        .args(["--initial-advertise-peer-urls", &format!("http://{peer}")])
        .args(["--initial-cluster", &format!("anchor=http://{peer}")])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .ok()?;
    Some(Proc {
        child,
        grpc: client.clone(),
        health: client,
    })
}
