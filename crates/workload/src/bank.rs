//! `bank`: Jepsen's bank test over Tardigrade's transactions. N accounts
//! (keys `bank/acct/NNNN`), each on its own range once split (leases spread
//! over the nodes), start with the same balance. Clients transfer random
//! amounts between random pairs (read both, write both, in one
//! transaction) and read every balance in one transaction. Serializability
//! says every read sees the initial total and no balance below zero; the
//! final read must too. Runs under the process nemesis if asked.
//!
//! It talks to the cluster only through the native KV API (transactions
//! driven by `kv::Txn`) and the admin API (splits, lease moves).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kv::txn::{self, Txn, TxnError};
use proto::kvpb::kv_client::KvClient;
use proto::kvpb::{self, request_union::Value as Req, response_union::Value as Resp};
use tonic::transport::Channel;

use crate::nemesis::{nemesis, NemesisConfig, Rng};
use crate::txn_setup;

#[derive(Clone, Debug)]
pub struct BankConfig {
    pub hosts: Vec<String>,
    /// The nodes' HTTP endpoints (for the transaction counters).
    pub http: Vec<String>,
    pub accounts: usize,
    pub initial_balance: i64,
    pub clients: usize,
    pub duration: Duration,
    /// Share of transactions that read every balance (0-100).
    pub read_percent: u32,
    /// Split at every account and spread the leases first.
    pub split: bool,
    pub seed: u64,
    pub nemesis: Option<NemesisConfig>,
}

#[derive(Debug, Default)]
pub struct BankReport {
    pub transfers_ok: u64,
    /// Certainly not applied (an error before commit, a refused commit).
    pub transfers_failed: u64,
    /// Outcome unknown (a commit with no answer).
    pub transfers_unknown: u64,
    pub reads_ok: u64,
    pub reads_failed: u64,
    /// Retries inside `kv::txn::run` (restarts and new attempts).
    pub retries: u64,
    pub refreshes: u64,
    /// Reads whose total or balances were wrong: what they saw.
    pub bad_reads: Vec<String>,
    /// When the first bad read was seen, from the start of the load.
    pub first_bad_at: Option<Duration>,
    /// The errors transactions failed with, by message (the most common first).
    pub errors: Vec<(String, u64)>,
    pub final_total: Option<i64>,
    pub expected_total: i64,
    pub faults: Vec<String>,
    pub restarted_pids: Vec<u32>,
    pub leases_moved: usize,
    pub elapsed: Duration,
    /// The nodes' transaction counters at the end.
    pub metrics: Vec<(String, u64)>,
}

impl BankReport {
    pub fn ok(&self) -> bool {
        self.bad_reads.is_empty() && self.final_total == Some(self.expected_total)
    }
}

fn account(i: usize) -> Vec<u8> {
    format!("bank/acct/{i:04}").into_bytes()
}

fn parse(v: &[u8]) -> Result<i64, TxnError> {
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| TxnError::Unavailable(format!("a balance that is not a number: {v:?}")))
}

type Sender = KvClient<Channel>;

/// A client whose transaction failed waits this long before the next (its
/// node may be down: no point spinning on it).
pub const FAILURE_BACKOFF: Duration = Duration::from_millis(100);

/// Reads every balance in one transaction.
async fn read_all(t: &mut Txn<Sender>, n: usize) -> Result<Vec<Option<i64>>, TxnError> {
    let reqs = (0..n).map(|i| Req::Get(kvpb::GetRequest { key: account(i) })).collect();
    let resps = t.send(reqs).await?;
    resps
        .into_iter()
        .map(|r| match r {
            Resp::Get(g) => g.kv.map(|kv| parse(&kv.value)).transpose(),
            other => Err(TxnError::Unavailable(format!("unexpected answer {other:?}"))),
        })
        .collect()
}

/// The check of one read: the total and no negative balance.
fn judge(balances: &[Option<i64>], expected: i64) -> Option<String> {
    let total: i64 = balances.iter().map(|b| b.unwrap_or(0)).sum();
    let missing = balances.iter().filter(|b| b.is_none()).count();
    let negative = balances.iter().filter(|b| b.is_some_and(|v| v < 0)).count();
    (total != expected || missing > 0 || negative > 0).then(|| {
        format!("total {total} (expected {expected}), {missing} accounts missing, {negative} negative: {balances:?}")
    })
}

pub async fn run(cfg: BankConfig, progress: impl Fn(&str)) -> Result<BankReport, String> {
    let n = cfg.accounts.max(2);
    let mut report = BankReport {
        expected_total: cfg.initial_balance * n as i64,
        ..Default::default()
    };
    if cfg.split {
        let keys: Vec<Vec<u8>> = (0..n).map(account).collect();
        report.leases_moved = txn_setup::split_and_spread(&cfg.hosts, &keys, &progress).await?;
        progress(&format!(
            "{n} accounts on their own ranges, {} leases moved",
            report.leases_moved
        ));
    }
    // The initial balances, in one transaction over every range.
    let first = Arc::new(txn_setup::client(&cfg.hosts[0]).await?);
    let init = Instant::now();
    loop {
        let balance = cfg.initial_balance.to_string();
        let (r, _) = txn::run(first.clone(), |t| {
            let balance = balance.clone();
            Box::pin(async move {
                for i in 0..n {
                    t.put(&account(i), balance.as_bytes()).await?;
                }
                Ok(())
            })
        })
        .await;
        match r {
            Ok(()) => break,
            Err(e) if init.elapsed() < Duration::from_secs(60) => {
                progress(&format!("initial balances: {e}; again"));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(format!("initial balances: {e}")),
        }
    }
    let started = Instant::now();
    let deadline = started + cfg.duration;
    let faults = Arc::new(Mutex::new(Vec::new()));
    let nem = cfg
        .nemesis
        .clone()
        .map(|nc| tokio::spawn(nemesis(nc, cfg.seed, deadline, faults.clone())));
    let counts: Arc<[AtomicU64; 8]> = Arc::new(Default::default());
    let bad = Arc::new(Mutex::new(Vec::<(Duration, String)>::new()));
    let errors = Arc::new(Mutex::new(std::collections::HashMap::<String, u64>::new()));
    let mut tasks = Vec::new();
    for c in 0..cfg.clients.max(1) {
        let sender = Arc::new(txn_setup::client(&cfg.hosts[c % cfg.hosts.len()]).await?);
        let counts = counts.clone();
        let bad = bad.clone();
        let errors = errors.clone();
        let note = move |e: &TxnError| {
            // The message without numbers, so alike errors count together.
            let m: String = e
                .to_string()
                .chars()
                .filter(|c| !c.is_ascii_digit())
                .take(160)
                .collect();
            *errors.lock().unwrap_or_else(|e| e.into_inner()).entry(m).or_default() += 1;
        };
        let expected = report.expected_total;
        let read_percent = cfg.read_percent;
        let mut rng = Rng(cfg.seed ^ (c as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                if rng.below(100) < u64::from(read_percent) {
                    let (r, st) = txn::run(sender.clone(), |t| Box::pin(read_all(t, n))).await;
                    counts[6].fetch_add(st.retries, Ordering::Relaxed);
                    counts[7].fetch_add(st.refreshes, Ordering::Relaxed);
                    match r {
                        Ok(b) => {
                            counts[3].fetch_add(1, Ordering::Relaxed);
                            if let Some(why) = judge(&b, expected) {
                                bad.lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .push((started.elapsed(), why));
                            }
                        }
                        Err(e) => {
                            note(&e);
                            counts[4].fetch_add(1, Ordering::Relaxed);
                            // A node down: do not spin on it.
                            tokio::time::sleep(FAILURE_BACKOFF).await;
                        }
                    }
                    continue;
                }
                let a = rng.below(n as u64) as usize;
                let b = (a + 1 + rng.below(n as u64 - 1) as usize) % n;
                let amount = 1 + rng.below(5) as i64;
                let (r, st) = txn::run(sender.clone(), |t| {
                    Box::pin(async move {
                        let got = t
                            .send(vec![
                                Req::Get(kvpb::GetRequest { key: account(a) }),
                                Req::Get(kvpb::GetRequest { key: account(b) }),
                            ])
                            .await?;
                        let bal = |r: &Resp| match r {
                            Resp::Get(g) => g.kv.as_ref().map_or(Ok(0), |kv| parse(&kv.value)),
                            _ => Err(TxnError::Unavailable("unexpected answer".into())),
                        };
                        let (ba, bb) = (bal(&got[0])?, bal(&got[1])?);
                        if ba < amount {
                            return Ok(false);
                        }
                        t.write_at_commit(vec![
                            txn::put(&account(a), (ba - amount).to_string().as_bytes()),
                            txn::put(&account(b), (bb + amount).to_string().as_bytes()),
                        ]);
                        Ok(true)
                    })
                })
                .await;
                counts[6].fetch_add(st.retries, Ordering::Relaxed);
                counts[7].fetch_add(st.refreshes, Ordering::Relaxed);
                if let Err(e) = &r {
                    note(e);
                }
                let slot = match r {
                    Ok(_) => 0,
                    Err(TxnError::Ambiguous(_)) => 2,
                    Err(_) => 1,
                };
                counts[slot].fetch_add(1, Ordering::Relaxed);
                if slot != 0 {
                    tokio::time::sleep(FAILURE_BACKOFF).await;
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
                "{:.0}s: {} transfers ok, {} failed, {} unknown, {} reads, {} retries",
                started.elapsed().as_secs_f64(),
                counts[0].load(Ordering::Relaxed),
                counts[1].load(Ordering::Relaxed),
                counts[2].load(Ordering::Relaxed),
                counts[3].load(Ordering::Relaxed),
                counts[6].load(Ordering::Relaxed),
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
    let c = |i: usize| counts[i].load(Ordering::Relaxed);
    report.transfers_ok = c(0);
    report.transfers_failed = c(1);
    report.transfers_unknown = c(2);
    report.reads_ok = c(3);
    report.reads_failed = c(4);
    report.retries = c(6);
    report.refreshes = c(7);
    let bad = bad.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut errs: Vec<(String, u64)> = errors.lock().unwrap_or_else(|e| e.into_inner()).drain().collect();
    errs.sort_by_key(|e| std::cmp::Reverse(e.1));
    report.errors = errs;
    report.first_bad_at = bad.iter().map(|(at, _)| *at).min();
    report.bad_reads = bad
        .into_iter()
        .map(|(at, why)| format!("at {:.1}s: {why}", at.as_secs_f64()))
        .collect();
    // The final read, once the cluster settled, through every host in turn.
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_secs(60) {
        let host = &cfg.hosts[(settle.elapsed().as_secs() as usize) % cfg.hosts.len()];
        let sender = Arc::new(txn_setup::client(host).await?);
        let (r, _) = txn::run(sender, |t| Box::pin(read_all(t, n))).await;
        if let Ok(b) = r {
            if let Some(why) = judge(&b, report.expected_total) {
                report.bad_reads.push(format!("final read: {why}"));
            }
            report.final_total = Some(b.iter().map(|v| v.unwrap_or(0)).sum());
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    report.metrics = txn_setup::txn_metrics(&cfg.http);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_is_judged_by_its_total_and_its_balances() {
        assert_eq!(judge(&[Some(5), Some(5)], 10), None);
        assert!(judge(&[Some(6), Some(5)], 10).is_some());
        assert!(judge(&[Some(12), Some(-2)], 10).is_some(), "a negative balance");
        assert!(judge(&[Some(10), None], 10).is_some(), "a missing account");
    }
}
