//! `splits`: makes many ranges and measures what they cost. Creates N user
//! ranges by administrative splits (at four-hex-digit keys spread evenly over
//! 0000..ffff, where `workload kv --api native` spreads its keys; from the
//! highest key down, so each split lands on the range that already holds a
//! lease),
//! waits until every node lists them all, writes random keys across all of
//! them through the native API, then measures, while the cluster idles,
//! each node's raft messages and fsyncs per second (from `/metrics`) and
//! CPU (from `/proc/<pid>/stat`, if the node's pid is given).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use proto::admin::{admin_client::AdminClient, RangesRequest, SplitRequest};
use proto::kvpb::{self, kv_client::KvClient, request_union::Value as Req};
use tonic::transport::Channel;

#[derive(Clone, Debug)]
pub struct SplitsConfig {
    /// host:port of each node's gRPC API.
    pub hosts: Vec<String>,
    /// host:port of each node's HTTP endpoint (same order).
    pub http: Vec<String>,
    /// Each node's pid, for its CPU time (same order; empty: not measured).
    pub pids: Vec<u32>,
    pub ranges: usize,
    pub writes: usize,
    pub idle: Duration,
}

#[derive(Debug, Default)]
pub struct NodeIdle {
    pub host: String,
    pub messages_per_sec: f64,
    /// Frames of raft messages (one per destination store per cycle).
    pub frames_per_sec: f64,
    pub fsyncs_per_sec: f64,
    /// CPU used, as a share of one core.
    pub cpu: Option<f64>,
}

#[derive(Debug, Default)]
pub struct SplitsReport {
    pub created: usize,
    pub create_time: Duration,
    pub listed: Vec<usize>,
    pub writes_ok: usize,
    pub writes_failed: usize,
    pub write_time: Duration,
    pub idle: Vec<NodeIdle>,
}

async fn channel(addr: &str) -> Option<Channel> {
    Channel::from_shared(format!("http://{addr}"))
        .ok()?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .ok()
}

fn http_get(addr: &str, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

fn counter(body: &str, name: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

pub async fn run(cfg: SplitsConfig, progress: impl Fn(&str)) -> Result<SplitsReport, String> {
    let mut report = SplitsReport::default();
    let n = cfg.ranges.min(65_535);
    let keys: Vec<String> = (1..=n).map(|i| format!("{:04x}", i * 65_536 / (n + 1))).collect();
    let started = Instant::now();
    for (n, key) in keys.iter().enumerate().rev() {
        let mut last = String::new();
        let mut ok = false;
        for attempt in 0..20 {
            let host = &cfg.hosts[(n + attempt) % cfg.hosts.len()];
            let Some(ch) = channel(host).await else { continue };
            match AdminClient::new(ch)
                .split(SplitRequest {
                    split_key: key.clone().into_bytes(),
                })
                .await
            {
                Ok(_) => {
                    ok = true;
                    break;
                }
                Err(s) if s.message().contains("already a range boundary") => {
                    ok = true;
                    break;
                }
                Err(s) => last = s.message().to_string(),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if !ok {
            return Err(format!("split at {key} failed: {last}"));
        }
        report.created += 1;
        if report.created % 100 == 0 {
            progress(&format!("{} splits in {:.1?}", report.created, started.elapsed()));
        }
    }
    report.create_time = started.elapsed();
    // Every node lists every range (the user ranges and the three fixed ones).
    let want = cfg.ranges + 3;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let mut listed = Vec::new();
        for h in &cfg.hosts {
            let n = match channel(h).await {
                Some(ch) => AdminClient::new(ch)
                    .ranges(RangesRequest {})
                    .await
                    .map_or(0, |r| r.into_inner().ranges.len()),
                None => 0,
            };
            listed.push(n);
        }
        let done = listed.iter().all(|&n| n >= want);
        report.listed = listed;
        if done {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "after 120 s the nodes list {:?} ranges, not {want}",
                report.listed
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    progress(&format!("every node lists {want} ranges"));
    // Writes to random keys over all the ranges, through every node.
    let mut clients = Vec::new();
    for h in &cfg.hosts {
        clients.push(KvClient::new(channel(h).await.ok_or(format!("cannot reach {h}"))?));
    }
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let started = Instant::now();
    for i in 0..cfg.writes {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let key = format!("{:04x}/w{i}", (x >> 33) & 0xffff);
        let c = &mut clients[i % cfg.hosts.len()];
        let r = c
            .batch(kvpb::BatchRequest {
                header: None,
                requests: vec![kvpb::RequestUnion {
                    value: Some(Req::Put(kvpb::PutRequest {
                        key: key.into_bytes(),
                        value: b"v".to_vec(),
                    })),
                }],
            })
            .await;
        match r {
            Ok(r) if r.get_ref().error.is_none() => report.writes_ok += 1,
            _ => report.writes_failed += 1,
        }
    }
    report.write_time = started.elapsed();
    progress(&format!(
        "{} writes to random keys: {} ok in {:.1?}",
        cfg.writes, report.writes_ok, report.write_time
    ));
    // Idle: counters and CPU over the window.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let sample = |i: usize| {
        let body = http_get(&cfg.http[i], "/metrics").unwrap_or_default();
        (
            counter(&body, "tardigrade_raft_messages_sent_total"),
            counter(&body, "tardigrade_raft_fsyncs_total"),
            cfg.pids.get(i).and_then(|&p| cpu_ticks(p)),
            counter(&body, "tardigrade_raft_frames_sent_total"),
        )
    };
    let before: Vec<_> = (0..cfg.hosts.len()).map(sample).collect();
    let t0 = Instant::now();
    tokio::time::sleep(cfg.idle).await;
    let secs = t0.elapsed().as_secs_f64();
    for (i, b) in before.iter().enumerate() {
        let a = sample(i);
        report.idle.push(NodeIdle {
            host: cfg.hosts[i].clone(),
            messages_per_sec: (a.0 - b.0) / secs,
            frames_per_sec: (a.3 - b.3) / secs,
            fsyncs_per_sec: (a.1 - b.1) / secs,
            cpu: match (b.2, a.2) {
                (Some(x), Some(y)) => Some(y.saturating_sub(x) as f64 / ticks_per_sec() / secs),
                _ => None,
            },
        });
    }
    Ok(report)
}
