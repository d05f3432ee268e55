//! A cluster of real `tardigrade start` processes on 127.0.0.1 (ports free
//! at run time, stopped by PID) and the helpers process tests share: tick
//! 50 ms, election timeout 10 ticks (0.5 s); waits give up after at least 10
//! election timeouts.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, http_get, tardigrade, Proc};
use proto::admin::{admin_client::AdminClient, RangesRequest};
use proto::etcdserverpb::{kv_client::KvClient, PutRequest, RangeRequest};
use proto::storage::replica_descriptor;

pub const TICK_MS: u64 = 50;
pub const ELECTION: Duration = Duration::from_millis(500);

pub struct Node {
    pub proc: Proc,
    pub store: PathBuf,
    pub grpc: String,
    pub http: String,
}

pub struct Cluster {
    pub _dir: tempfile::TempDir,
    pub nodes: Vec<Node>,
    pub join: String,
    pub extra_args: Vec<String>,
}

pub fn spawn(store: &Path, grpc: &str, http: &str, join: &str, extra: &[String]) -> Proc {
    let log = std::fs::File::create(store.with_extension("log")).expect("log");
    let child = Command::new(env!("CARGO_BIN_EXE_tardigrade"))
        .envs(extra.iter().filter_map(|a| a.strip_prefix("env:")?.split_once('=')))
        .args(["start", "--store"])
        .arg(store)
        .args(["--listen-addr", grpc, "--http-addr", http, "--join", join])
        .args(["--tick-ms", &TICK_MS.to_string()])
        .args(extra.iter().filter(|a| !a.starts_with("env:")))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn tardigrade start");
    Proc {
        child,
        grpc: grpc.into(),
        health: http.into(),
    }
}

impl Drop for Cluster {
    /// A failed test shows the end of every node's log (they live in a
    /// temporary directory that goes with the cluster).
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for (i, n) in self.nodes.iter().enumerate() {
            let log = std::fs::read_to_string(n.store.with_extension("log")).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!("---- node {} ({}) log, last 60 lines ----", i + 1, n.grpc);
            for l in &lines[lines.len().saturating_sub(60)..] {
                eprintln!("{l}");
            }
        }
    }
}

impl Cluster {
    /// `n` nodes started with the `extra` flags (`env:K=V` sets a variable).
    pub fn start(n: usize, extra: &[&str]) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let addrs: Vec<(String, String)> = (0..n)
            .map(|_| {
                (
                    format!("127.0.0.1:{}", free_port()),
                    format!("127.0.0.1:{}", free_port()),
                )
            })
            .collect();
        let join = addrs.iter().map(|(g, _)| g.clone()).collect::<Vec<_>>().join(",");
        let extra_args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let nodes = addrs
            .into_iter()
            .enumerate()
            .map(|(i, (grpc, http))| {
                let store = dir.path().join(format!("n{}", i + 1));
                Node {
                    proc: spawn(&store, &grpc, &http, &join, &extra_args),
                    store,
                    grpc,
                    http,
                }
            })
            .collect();
        let c = Cluster {
            _dir: dir,
            nodes,
            join,
            extra_args,
        };
        let first = &c.nodes[0];
        let deadline = Instant::now() + 10 * ELECTION * 2;
        while http_get(&first.http, "/health").is_none() {
            assert!(Instant::now() < deadline, "node 1 never answered /health");
            std::thread::sleep(Duration::from_millis(20));
        }
        let (code, out, err) = tardigrade(&["init", "--host", &first.grpc]);
        assert_eq!(code, 0, "init: {out}{err}");
        c
    }

    /// Starts one more node joining the cluster.
    pub fn add_node(&mut self) -> usize {
        let grpc = format!("127.0.0.1:{}", free_port());
        let http = format!("127.0.0.1:{}", free_port());
        let store = self._dir.path().join(format!("n{}", self.nodes.len() + 1));
        let proc = spawn(&store, &grpc, &http, &self.join, &self.extra_args);
        self.nodes.push(Node {
            proc,
            store,
            grpc,
            http,
        });
        self.nodes.len() - 1
    }

    pub fn restart(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        n.proc = spawn(&n.store, &n.grpc, &n.http, &self.join, &self.extra_args);
    }

    pub async fn ranges(&self, i: usize) -> Option<Vec<proto::admin::RangeInfo>> {
        let mut a = AdminClient::connect(format!("http://{}", self.nodes[i].grpc))
            .await
            .ok()?;
        Some(a.ranges(RangesRequest {}).await.ok()?.into_inner().ranges)
    }

    /// Waits until every node holds every range with three voters.
    pub async fn wait_replicated(&self) {
        wait(
            "every range on every node with three voters",
            10 * ELECTION * 4,
            || async {
                for i in 0..self.nodes.len() {
                    let Some(rs) = self.ranges(i).await else { return false };
                    let ok = rs.len() >= 3
                        && rs.iter().all(|r| {
                            let d = r.descriptor.clone().unwrap_or_default();
                            d.replicas.len() == 3
                                && d.replicas
                                    .iter()
                                    .all(|x| x.r#type == replica_descriptor::Type::Voter as i32)
                        });
                    if !ok {
                        return false;
                    }
                }
                true
            },
        )
        .await;
    }

    /// The node holding the most valid leases.
    pub async fn busiest(&self) -> usize {
        let mut best = (0, 0);
        for i in 0..self.nodes.len() {
            let leases = self
                .ranges(i)
                .await
                .map_or(0, |rs| rs.iter().filter(|r| r.lease_valid).count());
            if leases > best.1 {
                best = (i, leases);
            }
        }
        best.0
    }

    /// The node holding the etcd range's lease.
    pub async fn etcd_leaseholder(&self) -> Option<usize> {
        for i in 0..self.nodes.len() {
            if let Some(rs) = self.ranges(i).await {
                if rs
                    .iter()
                    .any(|r| r.descriptor.as_ref().is_some_and(|d| d.range_id == 2) && r.lease_valid)
                {
                    return Some(i);
                }
            }
        }
        None
    }
}

/// The nemesis restarts nodes as its own children, which the cluster's
/// guards do not know: stop the ones the workload's output names.
pub fn kill_restarted(workload_stdout: &str) {
    let pids: Vec<i32> = workload_stdout
        .lines()
        .filter_map(|l| l.strip_prefix("restarted pids: "))
        .flat_map(|line| line.split(',').filter_map(|p| p.trim().parse::<i32>().ok()))
        .collect();
    for &p in &pids {
        // SAFETY: plain libc call on a pid this test caused to exist.
        unsafe { libc::kill(p, libc::SIGKILL) };
    }
    // Gone for good (their ports free) before a test restarts a node there.
    let deadline = Instant::now() + Duration::from_secs(10);
    // SAFETY: signal 0 only asks whether the pid exists.
    while pids.iter().any(|&p| unsafe { libc::kill(p, 0) } == 0) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub async fn wait<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !f().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn kv(addr: &str) -> Option<KvClient<tonic::transport::Channel>> {
    let ch = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .ok()?
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(3))
        .connect()
        .await
        .ok()?;
    Some(KvClient::new(ch))
}

pub async fn put(addr: &str, k: &str, v: &str) -> Result<i64, String> {
    let mut c = kv(addr).await.ok_or("no connection")?;
    c.put(PutRequest {
        key: k.into(),
        value: v.into(),
        ..Default::default()
    })
    .await
    .map(|r| r.into_inner().header.map_or(0, |h| h.revision))
    .map_err(|s| s.message().to_string())
}

pub async fn get(addr: &str, k: &str) -> Result<Option<String>, String> {
    let mut c = kv(addr).await.ok_or("no connection")?;
    c.range(RangeRequest {
        key: k.into(),
        ..Default::default()
    })
    .await
    .map(|r| {
        r.into_inner()
            .kvs
            .first()
            .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
    })
    .map_err(|s| s.message().to_string())
}

pub fn signal(p: &Proc, sig: libc::c_int) {
    // SAFETY: plain libc call on our own child.
    unsafe { libc::kill(p.pid(), sig) };
}
