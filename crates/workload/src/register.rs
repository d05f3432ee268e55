//! `register`: Jepsen-style clients doing reads, writes and compare-and-swaps
//! (etcd Txn, or the native API's ConditionalPut: `register_client`) on a
//! few keys through different nodes, recording every
//! operation with its invoke and complete times and outcome, optionally while a
//! nemesis kills and restarts, or pauses and resumes, the nodes' processes.
//! The history then goes to the linearizability checker, and every
//! acknowledged insert of a unique key must still be readable at the end.
//!
//! Outcomes: `ok`; `failed` only for answers that prove the operation did not
//! apply (no leader, leader changed before proposing, bad request); `unknown`
//! for time-outs, lost connections and `request timed out`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::linearizability::{self, Event, Op, Outcome};
pub use crate::nemesis::NemesisConfig;
use crate::nemesis::{nemesis, Rng};
pub use crate::register_client::Api;
use crate::register_client::RegClient;

#[derive(Clone, Debug)]
pub struct RegisterConfig {
    /// host:port of every node's gRPC API; client i talks to node i mod n.
    pub endpoints: Vec<String>,
    /// etcd's KV API or the native one (keys spread over `00`..`ff`).
    pub api: Api,
    pub clients: usize,
    pub keys: usize,
    pub duration: Duration,
    /// An operation not answered within this is recorded unknown.
    pub op_timeout: Duration,
    pub seed: u64,
    pub nemesis: Option<NemesisConfig>,
    /// Move the etcd range's lease to a random voter about this often.
    pub lease_transfers: Option<Duration>,
    /// Time the checker may spend.
    pub check_budget: Duration,
}

#[derive(Debug)]
pub struct RegisterReport {
    pub history: Vec<Event>,
    pub check: linearizability::Report,
    /// How long the linearizability check took (bounded by the budget).
    pub check_time: Duration,
    pub inserts_acked: usize,
    pub inserts_lost: Vec<String>,
    /// The final read-back reached the cluster (if not, every insert counts
    /// as lost and the run fails, saying so).
    pub read_back: bool,
    /// The longest stretch with no operation completing successfully.
    pub longest_unavailability: Duration,
    /// When that stretch began, from the start of the run.
    pub longest_unavailability_from: Duration,
    /// The longest stretch with no operation completing successfully that
    /// began within a partition or the 10 s after it healed, and when (none:
    /// no partition).
    pub longest_unavailability_after_partition: Option<(Duration, Duration)>,
    /// The longest any operation took, from invoke to completion (including
    /// ones cut off at the operation timeout).
    pub longest_operation: Duration,
    pub faults: Vec<String>,
    /// Why operations ended with an unknown outcome (error or timeout), and
    /// how many.
    pub unknown_causes: BTreeMap<String, usize>,
    /// Processes restarted by the nemesis (the caller owns them now).
    pub restarted_pids: Vec<u32>,
}

impl RegisterReport {
    pub fn ok(&self) -> bool {
        self.check.linearizable() && self.inserts_lost.is_empty()
    }
}

/// Whether an error proves the operation was not applied.
fn definitely_failed(s: &tonic::Status) -> bool {
    use tonic::Code::*;
    match s.code() {
        InvalidArgument | NotFound | OutOfRange | FailedPrecondition => true,
        Unavailable => {
            let m = s.message();
            m.contains("no leader")
                || m.contains("leader changed")
                || m.contains("not initialized")
                || m.contains("unhealthy")
                // The native API: no leaseholder answered; nothing was sent.
                || m.contains("no leaseholder for range")
                || m.contains("meta lookup")
        }
        _ => false,
    }
}

struct Shared {
    /// Every key of this run starts with it, so that a run never sees what an
    /// earlier one left (the checker assumes every register starts empty).
    prefix: String,
    start: Instant,
    history: Mutex<Vec<Event>>,
    inserts: Mutex<Vec<String>>,
    /// Why operations ended unknown, counted.
    unknown: Mutex<BTreeMap<String, usize>>,
}

impl Shared {
    fn note_unknown(&self, why: String) {
        *self
            .unknown
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(why)
            .or_default() += 1;
    }

    fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }
}

async fn client(cfg: Arc<RegisterConfig>, id: u64, shared: Arc<Shared>, deadline: Instant) {
    let addr = cfg.endpoints[id as usize % cfg.endpoints.len()].clone();
    let mut rng = Rng(cfg.seed ^ (id + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut kv: Option<RegClient> = None;
    let mut counter = 0u64;
    let mut last_seen: Option<u64> = None;
    // After an unknown outcome the client only reads until a read answers:
    // its node may be down (behind a published port, a dead container still
    // accepts connections and fails each request at once), and every
    // unknown write stays open to the end of the history, which the checker
    // pays for; an unknown read is simply dropped.
    let mut probing = false;
    while Instant::now() < deadline {
        if kv.is_none() {
            kv = RegClient::connect(cfg.api, &addr, cfg.op_timeout).await;
            if kv.is_none() {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        }
        let Some(c) = kv.as_mut() else { continue };
        let key = cfg.api.register_key(&shared.prefix, rng.below(cfg.keys as u64));
        counter += 1;
        let fresh = id * 1_000_000_000 + counter;
        let roll = rng.below(100);
        let invoke = shared.now();
        if roll < 15 && !probing {
            // A unique insert: it must survive everything once acknowledged.
            let k = cfg.api.insert_key(&shared.prefix, id, counter);
            match tokio::time::timeout(cfg.op_timeout, c.put(&k, "x")).await {
                Ok(Ok(())) => shared.inserts.lock().unwrap_or_else(|e| e.into_inner()).push(k),
                Ok(Err(s)) if definitely_failed(&s) => {}
                _ => {
                    kv = None;
                    probing = true;
                }
            }
            continue;
        }
        let op = if roll < 50 || probing {
            Op::Read
        } else if roll < 75 {
            Op::Write(fresh)
        } else {
            Op::Cas {
                expect: last_seen.unwrap_or(fresh),
                new: fresh,
            }
        };
        let result = match op {
            Op::Read => tokio::time::timeout(cfg.op_timeout, c.get(&key))
                .await
                .map(|r| r.map(Outcome::Got)),
            Op::Write(v) => tokio::time::timeout(cfg.op_timeout, c.put(&key, &v.to_string()))
                .await
                .map(|r| r.map(|_| Outcome::Written)),
            Op::Cas { expect, new } => tokio::time::timeout(cfg.op_timeout, c.cas(&key, expect, new))
                .await
                .map(|r| r.map(Outcome::Swapped)),
        };
        let complete = shared.now();
        let outcome = match result {
            Ok(Ok(o)) => o,
            Ok(Err(s)) if definitely_failed(&s) => Outcome::Fail,
            Ok(Err(s)) => {
                kv = None; // reconnect: the node may be gone
                let m: String = s.message().chars().take(60).collect();
                shared.note_unknown(format!("{:?}: {m}", s.code()));
                Outcome::Unknown
            }
            Err(_) => {
                kv = None;
                shared.note_unknown("no answer within the operation timeout".into());
                Outcome::Unknown
            }
        };
        probing = outcome == Outcome::Unknown || (probing && !matches!(outcome, Outcome::Got(_)));
        match outcome {
            Outcome::Got(v) => last_seen = v,
            Outcome::Swapped(true) | Outcome::Written => last_seen = Some(fresh),
            _ => {}
        }
        shared.history.lock().unwrap_or_else(|e| e.into_inner()).push(Event {
            client: id,
            key,
            op,
            outcome,
            invoke,
            complete,
        });
    }
}

/// Moves the etcd range's lease to a random other voter every `interval`
/// on average (through a random node), until `deadline`; records each move.
async fn lease_mover(
    endpoints: Vec<String>,
    interval: Duration,
    seed: u64,
    deadline: Instant,
    faults: Arc<Mutex<Vec<String>>>,
) {
    const ETCD_RANGE: u64 = 2;
    let mut rng = Rng(seed.rotate_left(17) | 1);
    let start = Instant::now();
    loop {
        let wait = interval / 2 + Duration::from_millis(rng.below(interval.as_millis() as u64));
        if Instant::now() + wait >= deadline {
            return;
        }
        tokio::time::sleep(wait).await;
        let host = &endpoints[rng.below(endpoints.len() as u64) as usize];
        let at = start.elapsed().as_secs_f64();
        let what = match kv::admin::find_lease(host, ETCD_RANGE).await {
            Ok(lease) => {
                let others: Vec<u64> = lease
                    .voter_nodes
                    .iter()
                    .copied()
                    .filter(|&n| n != lease.leaseholder_node)
                    .collect();
                if others.is_empty() {
                    continue;
                }
                let to = others[rng.below(others.len() as u64) as usize];
                match kv::admin::transfer_lease(host, ETCD_RANGE, to).await {
                    Ok((from, to)) => format!("{at:.1}s: lease of the etcd range moved from node {from} to node {to}"),
                    Err(e) => format!("{at:.1}s: lease transfer not done: {e}"),
                }
            }
            Err(e) => format!("{at:.1}s: lease transfer not done: {e}"),
        };
        faults.lock().unwrap_or_else(|e| e.into_inner()).push(what);
    }
}

/// Runs the clients (and the nemesis) for the configured time, lets the
/// cluster settle, reads everything back and checks the history.
pub async fn run(cfg: RegisterConfig) -> RegisterReport {
    let cfg = Arc::new(cfg);
    let run_id = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let shared = Arc::new(Shared {
        prefix: format!("workload/register/{run_id:016x}/"),
        start: Instant::now(),
        history: Mutex::new(Vec::new()),
        inserts: Mutex::new(Vec::new()),
        unknown: Mutex::new(BTreeMap::new()),
    });
    let deadline = Instant::now() + cfg.duration;
    let faults = Arc::new(Mutex::new(Vec::new()));
    let nem = cfg
        .nemesis
        .clone()
        .map(|n| tokio::spawn(nemesis(n, cfg.seed, deadline, faults.clone())));
    let mover = cfg.lease_transfers.map(|every| {
        tokio::spawn(lease_mover(
            cfg.endpoints.clone(),
            every,
            cfg.seed,
            deadline,
            faults.clone(),
        ))
    });
    let clients: Vec<_> = (0..cfg.clients as u64)
        .map(|id| tokio::spawn(client(cfg.clone(), id, shared.clone(), deadline)))
        .collect();
    for c in clients {
        let _ = c.await;
    }
    if let Some(m) = mover {
        let _ = m.await;
    }
    let restarted_pids = match nem {
        Some(n) => n.await.unwrap_or_default(),
        None => Vec::new(),
    };
    // Final reads, through any node that answers, after the faults stopped.
    let settle = Instant::now() + Duration::from_secs(20);
    let mut history = shared.history.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let inserts = shared.inserts.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut present: Option<BTreeSet<String>> = None;
    let keys: Vec<String> = (0..cfg.keys as u64)
        .map(|k| cfg.api.register_key(&shared.prefix, k))
        .collect();
    let mut finals: Vec<Event> = Vec::new();
    'outer: while Instant::now() < settle {
        for addr in &cfg.endpoints {
            let Some(mut c) = RegClient::connect(cfg.api, addr, Duration::from_secs(2)).await else {
                continue;
            };
            let mut got = Vec::new();
            for k in &keys {
                let invoke = shared.now();
                match c.get(k).await {
                    Ok(v) => got.push(Event {
                        client: u64::MAX,
                        key: k.clone(),
                        op: Op::Read,
                        outcome: Outcome::Got(v),
                        invoke,
                        complete: shared.now(),
                    }),
                    Err(_) => continue 'outer,
                }
            }
            if let Some(all) = c.read_inserts(cfg.api, &shared.prefix).await {
                present = Some(all);
                finals = got;
                break 'outer;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    history.extend(finals);
    let read_back = present.is_some();
    let inserts_lost: Vec<String> = match &present {
        Some(p) => inserts.iter().filter(|k| !p.contains(*k)).cloned().collect(),
        None => inserts.clone(), // nothing could be read back at all
    };
    // The longest stretch without a successful completion.
    let mut oks: Vec<u64> = history
        .iter()
        .filter(|e| {
            matches!(e.outcome, Outcome::Got(_) | Outcome::Written | Outcome::Swapped(_)) && e.client != u64::MAX
        })
        .map(|e| e.complete)
        .collect();
    oks.sort_unstable();
    let end = cfg.duration.as_nanos() as u64;
    let (mut longest, mut longest_from) = (0u64, 0u64);
    let mut prev = 0u64;
    for t in oks.iter().copied().chain(std::iter::once(end)) {
        if t.saturating_sub(prev) > longest {
            (longest, longest_from) = (t - prev, prev);
        }
        prev = t;
    }
    let longest_operation = history
        .iter()
        .filter(|e| e.client != u64::MAX)
        .map(|e| e.complete.saturating_sub(e.invoke))
        .max()
        .unwrap_or(0);
    let faults = faults.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let unknown_causes = shared.unknown.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let fault_duration = cfg.nemesis.as_ref().map_or(Duration::ZERO, |n| n.fault_duration);
    let longest_unavailability_after_partition = crate::nemesis::partition_starts(&faults)
        .into_iter()
        .map(|at| {
            let from = at.as_nanos() as u64;
            let to = (from + (fault_duration + Duration::from_secs(10)).as_nanos() as u64).min(end);
            let (gap, gap_from) = longest_gap(&oks, from, to);
            (Duration::from_nanos(gap), Duration::from_nanos(gap_from))
        })
        .max();
    let check_started = std::time::Instant::now();
    let check = linearizability::check(&history, cfg.check_budget);
    let check_time = check_started.elapsed();
    RegisterReport {
        history,
        check,
        check_time,
        inserts_acked: inserts.len(),
        inserts_lost,
        read_back,
        longest_unavailability: Duration::from_nanos(longest),
        longest_unavailability_from: Duration::from_nanos(longest_from),
        longest_unavailability_after_partition,
        longest_operation: Duration::from_nanos(longest_operation),
        faults,
        unknown_causes,
        restarted_pids,
    }
}

/// The longest stretch within `[from, to]` holding none of `oks` (sorted
/// completion times), and where it began.
fn longest_gap(oks: &[u64], from: u64, to: u64) -> (u64, u64) {
    let inside = oks.iter().copied().filter(|&t| t > from && t < to);
    let (mut best, mut best_from, mut prev) = (0u64, from, from);
    for t in inside.chain(std::iter::once(to)) {
        if t.saturating_sub(prev) > best {
            (best, best_from) = (t - prev, prev);
        }
        prev = t;
    }
    (best, best_from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_gap_is_measured_inside_the_window_only() {
        let oks = [1, 2, 10, 11, 30, 31];
        // From 5 to 20: 5..10 then 11..20 (9 long, from 11).
        assert_eq!(longest_gap(&oks, 5, 20), (9, 11));
        // A window holding no success at all is one gap.
        assert_eq!(longest_gap(&oks, 12, 25), (13, 12));
        assert_eq!(longest_gap(&[], 0, 4), (4, 0));
    }
    use proto::etcdserverpb::kv_server::{Kv, KvServer};
    use proto::etcdserverpb::{
        CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, PutRequest, PutResponse,
        RangeRequest, RangeResponse, TxnRequest, TxnResponse,
    };
    use proto::mvccpb::KeyValue;
    use tonic::{Request, Response, Status};

    /// A KV server holding `n` keys that, like a real transport, refuses an
    /// answer larger than `max_keys` keys (a gRPC message has a size limit).
    struct Big {
        n: usize,
        max_keys: usize,
    }

    #[tonic::async_trait]
    impl Kv for Big {
        async fn range(&self, r: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
            let r = r.into_inner();
            let all: Vec<Vec<u8>> = (0..self.n)
                .map(|i| format!("p/inserts/{i:06}").into_bytes())
                .filter(|k| *k >= r.key && *k < r.range_end)
                .collect();
            let limit = if r.limit > 0 { r.limit as usize } else { usize::MAX };
            let take = all.len().min(limit);
            if take > self.max_keys {
                return Err(Status::resource_exhausted("message too large"));
            }
            Ok(Response::new(RangeResponse {
                kvs: all[..take]
                    .iter()
                    .map(|k| KeyValue {
                        key: k.clone(),
                        ..Default::default()
                    })
                    .collect(),
                more: all.len() > take,
                count: all.len() as i64,
                header: None,
            }))
        }
        async fn put(&self, _: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
            Err(Status::unimplemented("put"))
        }
        async fn delete_range(&self, _: Request<DeleteRangeRequest>) -> Result<Response<DeleteRangeResponse>, Status> {
            Err(Status::unimplemented("delete_range"))
        }
        async fn txn(&self, _: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
            Err(Status::unimplemented("txn"))
        }
        async fn compact(&self, _: Request<CompactionRequest>) -> Result<Response<CompactionResponse>, Status> {
            Err(Status::unimplemented("compact"))
        }
    }

    /// A 180 s nemesis run acknowledged 56,171 inserts and reported all of
    /// them lost: its read-back asked for every key in one answer, larger
    /// than a gRPC message may be. It reads in pages now.
    #[tokio::test]
    async fn the_read_back_reads_in_pages_however_many_keys() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(KvServer::new(Big {
                    n: 12_345,
                    max_keys: 6_000,
                }))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let mut c = RegClient::connect(Api::Etcd, &addr.to_string(), Duration::from_secs(5))
            .await
            .unwrap();
        let keys = c.read_inserts(Api::Etcd, "p/").await.expect("read back");
        assert_eq!(keys.len(), 12_345);
        assert!(keys.contains("p/inserts/012344") && keys.contains("p/inserts/000000"));
        server.abort();
    }
}
