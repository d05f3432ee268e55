//! `append`: Jepsen/Elle's list-append workload over Tardigrade's
//! transactions. Each key (`append/KK`, split one range per key with
//! leases on every node, if asked) holds a list, stored as comma-separated
//! numbers. Clients run transactions of a few micro-operations, reads of a
//! key's list and appends of a value unique to the key (a read of the list
//! then a write of it with the value added, in the transaction), and write
//! the history in Elle's JSON lines: an `invoke`, then `ok` (with what the
//! reads saw), `fail` (certainly not committed) or `info` (unknown). The
//! history is then judged by `list_append::check`.
//!
//! A transaction's writes are sent with its commit (one batch: one raft
//! command when its keys share a range). It talks to the cluster only
//! through the native KV API and the admin API.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kv::txn::{self, Txn, TxnError};
use proto::kvpb::kv_client::KvClient;
use proto::kvpb::{self, request_union::Value as Req, response_union::Value as Resp};
use serde_json::json;
use tonic::transport::Channel;

use crate::list_append;
use crate::nemesis::{nemesis, NemesisConfig, Rng};
use crate::txn_setup;

#[derive(Clone, Debug)]
pub struct AppendConfig {
    pub hosts: Vec<String>,
    pub http: Vec<String>,
    pub keys: usize,
    pub clients: usize,
    pub duration: Duration,
    /// Micro-operations per transaction: 1 to this many.
    pub max_ops: usize,
    pub split: bool,
    pub seed: u64,
    pub nemesis: Option<NemesisConfig>,
}

#[derive(Debug, Default)]
pub struct AppendReport {
    /// The history, one JSON object per line.
    pub history: String,
    pub check: Option<list_append::Report>,
    pub ok: u64,
    pub failed: u64,
    pub unknown: u64,
    pub retries: u64,
    pub faults: Vec<String>,
    pub restarted_pids: Vec<u32>,
    pub elapsed: Duration,
    pub metrics: Vec<(String, u64)>,
}

impl AppendReport {
    pub fn valid(&self) -> bool {
        self.check.as_ref().is_some_and(|c| c.valid())
    }
}

fn key(k: usize) -> Vec<u8> {
    format!("append/{k:03}").into_bytes()
}

fn parse_list(v: &[u8]) -> Vec<i64> {
    std::str::from_utf8(v)
        .unwrap_or_default()
        .split(',')
        .filter(|s| !s.is_empty())
        .filter_map(|s| s.parse().ok())
        .collect()
}

#[derive(Clone, Debug)]
enum Op {
    Append(usize, i64),
    Read(usize),
}

type Sender = KvClient<Channel>;

/// Runs one transaction's operations; returns what each read saw.
async fn execute(t: &mut Txn<Sender>, ops: &[Op]) -> Result<Vec<Option<Vec<i64>>>, TxnError> {
    // The lists as this transaction sees them: read once, then its own.
    let mut lists: HashMap<usize, Vec<i64>> = HashMap::new();
    let mut needed: Vec<usize> = ops
        .iter()
        .map(|o| match o {
            Op::Append(k, _) | Op::Read(k) => *k,
        })
        .collect();
    needed.sort_unstable();
    needed.dedup();
    let resps = t
        .send(
            needed
                .iter()
                .map(|&k| Req::Get(kvpb::GetRequest { key: key(k) }))
                .collect(),
        )
        .await?;
    for (k, r) in needed.iter().zip(resps) {
        let list = match r {
            Resp::Get(g) => g.kv.map(|kv| parse_list(&kv.value)).unwrap_or_default(),
            other => return Err(TxnError::Unavailable(format!("unexpected answer {other:?}"))),
        };
        lists.insert(*k, list);
    }
    let mut seen = Vec::with_capacity(ops.len());
    let mut written: Vec<usize> = Vec::new();
    for o in ops {
        match o {
            Op::Read(k) => seen.push(Some(lists[k].clone())),
            Op::Append(k, v) => {
                if let Some(l) = lists.get_mut(k) {
                    l.push(*v);
                }
                if !written.contains(k) {
                    written.push(*k);
                }
                seen.push(None);
            }
        }
    }
    let puts: Vec<Req> = written
        .iter()
        .map(|k| {
            let s: Vec<String> = lists[k].iter().map(|v| v.to_string()).collect();
            txn::put(&key(*k), s.join(",").as_bytes())
        })
        .collect();
    t.write_at_commit(puts);
    Ok(seen)
}

fn mops(ops: &[Op], seen: Option<&[Option<Vec<i64>>]>) -> serde_json::Value {
    serde_json::Value::Array(
        ops.iter()
            .enumerate()
            .map(|(i, o)| match o {
                Op::Append(k, v) => json!(["append", k, v]),
                Op::Read(k) => {
                    let got = seen.and_then(|s| s.get(i).cloned().flatten());
                    json!(["r", k, got])
                }
            })
            .collect(),
    )
}

pub async fn run(cfg: AppendConfig, progress: impl Fn(&str)) -> Result<AppendReport, String> {
    let nkeys = cfg.keys.max(1);
    let mut report = AppendReport::default();
    if cfg.split {
        let keys: Vec<Vec<u8>> = (0..nkeys).map(key).collect();
        let moved = txn_setup::split_and_spread(&cfg.hosts, &keys, &progress).await?;
        progress(&format!("{nkeys} keys on their own ranges, {moved} leases moved"));
    }
    let started = Instant::now();
    let deadline = started + cfg.duration;
    let faults = Arc::new(Mutex::new(Vec::new()));
    let nem = cfg
        .nemesis
        .clone()
        .map(|nc| tokio::spawn(nemesis(nc, cfg.seed, deadline, faults.clone())));
    let history = Arc::new(Mutex::new(Vec::<String>::new()));
    let next_value = Arc::new(AtomicU64::new(1));
    let counts: Arc<[AtomicU64; 4]> = Arc::new(Default::default());
    let mut tasks = Vec::new();
    for c in 0..cfg.clients.max(1) {
        let sender = Arc::new(txn_setup::client(&cfg.hosts[c % cfg.hosts.len()]).await?);
        let (history, next_value, counts) = (history.clone(), next_value.clone(), counts.clone());
        let max_ops = cfg.max_ops.max(1);
        let mut rng = Rng(cfg.seed ^ (c as u64 + 7).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let n = 1 + rng.below(max_ops as u64) as usize;
                let ops: Vec<Op> = (0..n)
                    .map(|_| {
                        let k = rng.below(nkeys as u64) as usize;
                        if rng.below(2) == 0 {
                            Op::Read(k)
                        } else {
                            Op::Append(k, next_value.fetch_add(1, Ordering::Relaxed) as i64)
                        }
                    })
                    .collect();
                let line = |kind: &str, value: serde_json::Value| {
                    json!({"type": kind, "process": c, "value": value}).to_string()
                };
                history
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(line("invoke", mops(&ops, None)));
                let ops2 = ops.clone();
                let (r, st) = txn::run(sender.clone(), |t| {
                    let ops = ops2.clone();
                    Box::pin(async move { execute(t, &ops).await })
                })
                .await;
                counts[3].fetch_add(st.retries, Ordering::Relaxed);
                let (kind, value, slot) = match &r {
                    Ok(seen) => ("ok", mops(&ops, Some(seen)), 0),
                    Err(TxnError::Ambiguous(_)) => ("info", mops(&ops, None), 2),
                    Err(_) => ("fail", mops(&ops, None), 1),
                };
                counts[slot].fetch_add(1, Ordering::Relaxed);
                history
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(line(kind, value));
                if slot != 0 {
                    tokio::time::sleep(crate::bank::FAILURE_BACKOFF).await;
                }
            }
        }));
    }
    let mut last = Instant::now();
    while tasks.iter().any(|t| !t.is_finished()) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if last.elapsed() >= Duration::from_secs(5) {
            last = Instant::now();
            progress(&format!(
                "{:.0}s: {} ok, {} failed, {} unknown, {} retries",
                started.elapsed().as_secs_f64(),
                counts[0].load(Ordering::Relaxed),
                counts[1].load(Ordering::Relaxed),
                counts[2].load(Ordering::Relaxed),
                counts[3].load(Ordering::Relaxed),
            ));
        }
    }
    for t in tasks {
        let _ = t.await;
    }
    report.elapsed = started.elapsed();
    if let Some(h) = nem {
        report.restarted_pids = h.await.unwrap_or_default();
    }
    report.faults = faults.lock().unwrap_or_else(|e| e.into_inner()).clone();
    report.ok = counts[0].load(Ordering::Relaxed);
    report.failed = counts[1].load(Ordering::Relaxed);
    report.unknown = counts[2].load(Ordering::Relaxed);
    report.retries = counts[3].load(Ordering::Relaxed);
    // A last read of every key once the cluster settled, so that appends
    // lost after their last reader are seen too.
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_secs(60) {
        let host = &cfg.hosts[(settle.elapsed().as_secs() as usize) % cfg.hosts.len()];
        let sender = Arc::new(txn_setup::client(host).await?);
        let ops: Vec<Op> = (0..nkeys).map(Op::Read).collect();
        let p = cfg.clients + 1;
        let line =
            |kind: &str, value: serde_json::Value| json!({"type": kind, "process": p, "value": value}).to_string();
        let invoke = line("invoke", mops(&ops, None));
        let (r, _) = txn::run(sender, |t| {
            let ops = ops.clone();
            Box::pin(async move { execute(t, &ops).await })
        })
        .await;
        if let Ok(seen) = r {
            let mut h = history.lock().unwrap_or_else(|e| e.into_inner());
            h.push(invoke);
            h.push(line("ok", mops(&ops, Some(&seen))));
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let lines = history.lock().unwrap_or_else(|e| e.into_inner()).join("\n");
    report.history = lines;
    report.check = match list_append::parse(&report.history) {
        Ok(txns) => Some(list_append::check(&txns)),
        Err(e) => return Err(format!("the history does not parse: {e}")),
    };
    report.metrics = txn_setup::txn_metrics(&cfg.http);
    Ok(report)
}
