//! The coordination workload: etcd's watches, leases and a lock recipe
//! under load (and the nemesis), each checked against what the clients saw.
//!
//! - **Watches**: writers put unique values under `<prefix>w/`; watchers
//!   watch that prefix from the revision before the first write, resuming
//!   from their last revision after any error, as etcd's clients do. Each
//!   watcher must see every acknowledged write at its revision, nothing
//!   that was never written, and revisions strictly increasing (no event
//!   twice, none out of order).
//! - **Leases**: holders keep a lease alive through random nodes. A lease
//!   whose keep-alives all reached the cluster in time (from each one's
//!   sending to the next one's answer, less than its TTL minus a margin)
//!   must never be found expired.
//! - **Locks**: lockers take a lock with etcd's recipe (a key under the
//!   lock prefix with the session's lease; the holder is the oldest key)
//!   and write under it, each write a Txn conditioned on its lock key's
//!   create revision (fencing). Afterwards the history of the lock keys and
//!   the guarded key, read through a watch, is replayed: every guarded
//!   write that applied must come from the holder of the lock at its
//!   revision.
//!
//! It talks to the cluster only through etcd's gRPC API.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proto::etcdserverpb::{
    compare, kv_client::KvClient, lease_client::LeaseClient, range_request, request_op, watch_client::WatchClient,
    watch_request::RequestUnion, Compare, DeleteRangeRequest, LeaseGrantRequest, LeaseKeepAliveRequest,
    LeaseRevokeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest, WatchCreateRequest, WatchRequest,
};
use proto::mvccpb::event::EventType;
use tonic::transport::Channel;

use crate::nemesis::{self, NemesisConfig, Rng};

/// The acknowledged writes: (revision, value).
type Acked = Vec<(i64, Vec<u8>)>;

/// What to run.
#[derive(Clone, Debug)]
pub struct CoordConfig {
    pub hosts: Vec<String>,
    pub duration: Duration,
    pub writers: usize,
    pub watchers: usize,
    pub leases: usize,
    pub lockers: usize,
    /// TTL (seconds) of the checked leases and of the lockers' sessions.
    pub lease_ttl: i64,
    pub seed: u64,
    /// Keys of this run start with it.
    pub prefix: String,
    pub nemesis: Option<NemesisConfig>,
}

/// What happened, and what the checks found.
#[derive(Debug, Default)]
pub struct CoordReport {
    pub writes_ok: usize,
    pub writes_unknown: usize,
    pub watch_events: Vec<usize>,
    pub watch_resumes: usize,
    pub watch_problems: Vec<String>,
    pub keepalives_ok: usize,
    pub leases_expired_excused: usize,
    pub lease_problems: Vec<String>,
    pub locks_taken: usize,
    pub guarded_ok: usize,
    pub guarded_refused: usize,
    pub guarded_applied: usize,
    pub fencing_problems: Vec<String>,
    pub faults: Vec<String>,
    pub restarted_pids: Vec<u32>,
    pub elapsed: Duration,
}

impl CoordReport {
    pub fn ok(&self) -> bool {
        self.watch_problems.is_empty() && self.lease_problems.is_empty() && self.fencing_problems.is_empty()
    }
}

const CALL_TIMEOUT: Duration = Duration::from_secs(2);

fn prefix_end(p: &[u8]) -> Vec<u8> {
    let mut end = p.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn channel(host: &str) -> Option<Channel> {
    Channel::from_shared(format!("http://{host}"))
        .ok()
        .map(|e| e.connect_timeout(CALL_TIMEOUT).connect_lazy())
}

async fn timed<T>(
    f: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, String> {
    match tokio::time::timeout(CALL_TIMEOUT, f).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(s)) => Err(format!("{:?}: {}", s.code(), s.message())),
        Err(_) => Err("timed out".into()),
    }
}

struct Hosts {
    chans: Vec<Channel>,
    rng: Mutex<Rng>,
}

impl Hosts {
    fn any(&self) -> Channel {
        let i = self
            .rng
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .below(self.chans.len() as u64) as usize;
        self.chans[i].clone()
    }

    /// The current revision, from any node that answers.
    async fn revision(&self, deadline: Instant) -> Result<i64, String> {
        loop {
            let r = timed(KvClient::new(self.any()).range(RangeRequest {
                key: b"\0".to_vec(),
                ..Default::default()
            }))
            .await;
            match r {
                Ok(r) => return Ok(r.header.map_or(0, |h| h.revision)),
                Err(e) if Instant::now() > deadline => return Err(format!("no node answered: {e}")),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Puts until a node answers definitely (for set-up and end markers).
    async fn put_surely(&self, key: &[u8], value: &[u8], deadline: Instant) -> Result<i64, String> {
        loop {
            let r = timed(KvClient::new(self.any()).put(PutRequest {
                key: key.to_vec(),
                value: value.to_vec(),
                ..Default::default()
            }))
            .await;
            match r {
                Ok(r) => return Ok(r.header.map_or(0, |h| h.revision)),
                Err(e) if Instant::now() > deadline => return Err(format!("no node took the write: {e}")),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
}

/// One event of a watched history.
#[derive(Clone, Debug)]
struct Seen {
    rev: i64,
    put: bool,
    key: Vec<u8>,
    value: Vec<u8>,
    create_rev: i64,
}

/// Watches `[key, end)` from `from` until an event at `until` or later
/// arrives (or `deadline`), resuming after errors from the last revision
/// seen. Returns the events and how many times it resumed.
async fn watch_history(
    hosts: &Hosts,
    key: &[u8],
    end: &[u8],
    from: i64,
    until: Arc<Mutex<Option<i64>>>,
    deadline: Instant,
) -> (Vec<Seen>, usize, Vec<String>) {
    let mut seen: Vec<Seen> = Vec::new();
    let mut problems = Vec::new();
    let mut resumes = 0;
    let mut next = from;
    'outer: while Instant::now() < deadline {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let create = WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                key: key.to_vec(),
                range_end: end.to_vec(),
                start_revision: next,
                ..Default::default()
            })),
        };
        if tx.send(create).await.is_err() {
            break;
        }
        let mut client = WatchClient::new(hosts.any());
        let stream = tokio::time::timeout(
            CALL_TIMEOUT,
            client.watch(tokio_stream::wrappers::ReceiverStream::new(rx)),
        )
        .await;
        let mut stream = match stream {
            Ok(Ok(s)) => s.into_inner(),
            _ => {
                resumes += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        loop {
            let done = until
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some_and(|u| next > u);
            if done {
                break 'outer;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            // A silent stream is checked on (the end marker may be written
            // any time); a broken one is resumed.
            let msg = tokio::time::timeout(left.min(Duration::from_secs(3)), stream.message()).await;
            let resp = match msg {
                Ok(Ok(Some(r))) => r,
                Err(_) if left > Duration::ZERO => continue,
                _ => {
                    resumes += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue 'outer;
                }
            };
            if resp.canceled {
                problems.push(format!(
                    "watch from {next} cancelled: {:?} (compact revision {})",
                    resp.cancel_reason, resp.compact_revision
                ));
                break 'outer;
            }
            for e in resp.events {
                let Some(kv) = e.kv else { continue };
                if let Some(last) = seen.last() {
                    if kv.mod_revision < last.rev || (kv.mod_revision == last.rev && kv.key <= last.key) {
                        problems.push(format!(
                            "event at revision {} for {:?} after revision {} for {:?}: out of order or twice",
                            kv.mod_revision,
                            String::from_utf8_lossy(&kv.key),
                            last.rev,
                            String::from_utf8_lossy(&last.key)
                        ));
                    }
                }
                next = next.max(kv.mod_revision + 1);
                seen.push(Seen {
                    rev: kv.mod_revision,
                    put: e.r#type == EventType::Put as i32,
                    key: kv.key,
                    value: kv.value,
                    create_rev: kv.create_revision,
                });
            }
        }
    }
    let reached = until
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .is_some_and(|u| next > u);
    if !reached {
        problems.push(format!("the watch never reached the end marker (next revision {next})"));
    }
    (seen, resumes, problems)
}

/// One keep-alive through a random node: the TTL it answered.
async fn keep_alive(hosts: &Hosts, id: i64) -> Result<i64, String> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let _ = tx.send(LeaseKeepAliveRequest { id }).await;
    let mut c = LeaseClient::new(hosts.any());
    let call = async {
        let mut s = c
            .lease_keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        match s.message().await? {
            Some(m) => Ok(m.ttl),
            None => Err(tonic::Status::unavailable("keep-alive stream ended")),
        }
    };
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(Ok(ttl)) => Ok(ttl),
        Ok(Err(s)) => Err(format!("{:?}: {}", s.code(), s.message())),
        Err(_) => Err("timed out".into()),
    }
}

async fn grant(hosts: &Hosts, ttl: i64) -> Result<i64, String> {
    timed(LeaseClient::new(hosts.any()).lease_grant(LeaseGrantRequest { ttl, id: 0 }))
        .await
        .map(|g| g.id)
}

/// A lease holder: keeps a lease alive; a lease found expired although its
/// keep-alives all came in time is a problem.
async fn lease_holder(hosts: Arc<Hosts>, ttl: i64, deadline: Instant, report: Arc<Mutex<CoordReport>>) {
    let margin = Duration::from_millis(700);
    let limit = Duration::from_secs(ttl as u64).saturating_sub(margin);
    while Instant::now() < deadline {
        let sent = Instant::now();
        let Ok(id) = grant(&hosts, ttl).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        // Since the last keep-alive (or grant) that was sent and answered:
        // when it was sent.
        let mut last_sent = sent;
        let mut in_time = true;
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_secs(ttl as u64) / 4).await;
            let sent = Instant::now();
            let r = keep_alive(&hosts, id).await;
            let answered = Instant::now();
            match r {
                Ok(t) if t > 0 => {
                    if answered.duration_since(last_sent) >= limit {
                        in_time = false;
                    }
                    last_sent = sent;
                    report.lock().unwrap_or_else(|e| e.into_inner()).keepalives_ok += 1;
                }
                Ok(_) => {
                    let mut rep = report.lock().unwrap_or_else(|e| e.into_inner());
                    if in_time && answered.duration_since(last_sent) < limit {
                        rep.lease_problems.push(format!(
                            "lease {id:x} found expired although every keep-alive came in time (the last one sent {:?} before)",
                            answered.duration_since(last_sent)
                        ));
                    } else {
                        rep.leases_expired_excused += 1;
                    }
                    break;
                }
                Err(_) => {}
            }
        }
    }
}

/// A locker: takes the lock with etcd's recipe and writes under it, each
/// write fenced by its lock key's create revision.
async fn locker(
    hosts: Arc<Hosts>,
    me: usize,
    prefix: String,
    ttl: i64,
    deadline: Instant,
    report: Arc<Mutex<CoordReport>>,
) {
    let lock_prefix = format!("{prefix}lock/").into_bytes();
    let guarded = format!("{prefix}fenced").into_bytes();
    let mut n = 0u64;
    while Instant::now() < deadline {
        let Ok(lease) = grant(&hosts, ttl).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        // The session's keep-alives, until it is dropped.
        let keeper = {
            let hosts = hosts.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(ttl as u64) / 4).await;
                    if let Ok(0) = keep_alive(&hosts, lease).await {
                        return;
                    }
                }
            })
        };
        let my_key = [lock_prefix.clone(), format!("{lease:016x}").into_bytes()].concat();
        let taken = acquire(&hosts, &lock_prefix, &my_key, lease, deadline).await;
        if let Some(my_rev) = taken {
            report.lock().unwrap_or_else(|e| e.into_inner()).locks_taken += 1;
            for _ in 0..3 {
                n += 1;
                let value = [my_key.clone(), format!("#{me}-{n}").into_bytes()].concat();
                let txn = TxnRequest {
                    compare: vec![Compare {
                        key: my_key.clone(),
                        target: compare::CompareTarget::Create as i32,
                        result: compare::CompareResult::Equal as i32,
                        target_union: Some(compare::TargetUnion::CreateRevision(my_rev)),
                        ..Default::default()
                    }],
                    success: vec![RequestOp {
                        request: Some(request_op::Request::RequestPut(PutRequest {
                            key: guarded.clone(),
                            value,
                            ..Default::default()
                        })),
                    }],
                    failure: vec![],
                };
                let r = timed(KvClient::new(hosts.any()).txn(txn)).await;
                {
                    let mut rep = report.lock().unwrap_or_else(|e| e.into_inner());
                    match r {
                        Ok(t) if t.succeeded => rep.guarded_ok += 1,
                        Ok(_) => rep.guarded_refused += 1,
                        Err(_) => {}
                    }
                }
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
            let _ = timed(KvClient::new(hosts.any()).delete_range(DeleteRangeRequest {
                key: my_key.clone(),
                ..Default::default()
            }))
            .await;
        }
        keeper.abort();
        let _ = timed(LeaseClient::new(hosts.any()).lease_revoke(LeaseRevokeRequest { id: lease })).await;
    }
}

/// etcd's mutex recipe: create the key (with the session's lease) if it
/// is not there, then wait until no older key remains under the prefix.
/// Returns the key's create revision once held, None on giving up.
async fn acquire(hosts: &Hosts, pfx: &[u8], my_key: &[u8], lease: i64, deadline: Instant) -> Option<i64> {
    let txn = TxnRequest {
        compare: vec![Compare {
            key: my_key.to_vec(),
            target: compare::CompareTarget::Create as i32,
            result: compare::CompareResult::Equal as i32,
            target_union: Some(compare::TargetUnion::CreateRevision(0)),
            ..Default::default()
        }],
        success: vec![RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest {
                key: my_key.to_vec(),
                lease,
                ..Default::default()
            })),
        }],
        failure: vec![RequestOp {
            request: Some(request_op::Request::RequestRange(RangeRequest {
                key: my_key.to_vec(),
                ..Default::default()
            })),
        }],
    };
    let t = timed(KvClient::new(hosts.any()).txn(txn)).await.ok()?;
    let my_rev = if t.succeeded {
        t.header.map(|h| h.revision)?
    } else {
        match t.responses.first().and_then(|r| r.response.as_ref()) {
            Some(proto::etcdserverpb::response_op::Response::ResponseRange(r)) => r.kvs.first()?.create_revision,
            _ => return None,
        }
    };
    let end = prefix_end(pfx);
    let give_up = Instant::now() + Duration::from_secs(10);
    loop {
        if Instant::now() > deadline || Instant::now() > give_up {
            return None;
        }
        let older = timed(KvClient::new(hosts.any()).range(RangeRequest {
            key: pfx.to_vec(),
            range_end: end.clone(),
            // etcd's `waitDeletes`: the newest key older than ours (a
            // count would not do: etcd's ignores the revision filters).
            max_create_revision: my_rev - 1,
            sort_target: range_request::SortTarget::Create as i32,
            sort_order: range_request::SortOrder::Descend as i32,
            limit: 1,
            keys_only: true,
            ..Default::default()
        }))
        .await;
        match older {
            Ok(r) if r.kvs.is_empty() => return Some(my_rev),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Replays the history of the lock keys and the guarded key: every
/// guarded write must come from the oldest lock key alive at its revision.
fn check_fencing(history: &[Seen], lock_prefix: &[u8], guarded: &[u8]) -> (usize, Vec<String>) {
    let mut alive: BTreeMap<Vec<u8>, i64> = BTreeMap::new();
    let mut applied = 0;
    let mut problems = Vec::new();
    for e in history {
        if e.key.starts_with(lock_prefix) {
            if e.put {
                alive.entry(e.key.clone()).or_insert(e.create_rev);
            } else {
                alive.remove(&e.key);
            }
        } else if e.key == guarded && e.put {
            applied += 1;
            let holder = alive.iter().min_by_key(|(_, &rev)| rev).map(|(k, _)| k.clone());
            let writer_key = e.value.split(|&b| b == b'#').next().unwrap_or_default();
            if holder.as_deref() != Some(writer_key) {
                problems.push(format!(
                    "a guarded write at revision {} by {:?} while the lock was held by {:?}",
                    e.rev,
                    String::from_utf8_lossy(writer_key),
                    holder.map(|h| String::from_utf8_lossy(&h).into_owned())
                ));
            }
        }
    }
    (applied, problems)
}

/// Runs the workload and its checks.
pub async fn run(cfg: CoordConfig, progress: impl Fn(String)) -> Result<CoordReport, String> {
    if cfg.hosts.is_empty() {
        return Err("no hosts".into());
    }
    let hosts = Arc::new(Hosts {
        chans: cfg.hosts.iter().filter_map(|h| channel(h)).collect(),
        rng: Mutex::new(Rng(cfg.seed | 1)),
    });
    if hosts.chans.is_empty() {
        return Err(format!("no usable host in {:?}", cfg.hosts));
    }
    let start = Instant::now();
    let setup_deadline = start + Duration::from_secs(30);
    let r0 = hosts.revision(setup_deadline).await?;
    let from = r0 + 1;
    let deadline = Instant::now() + cfg.duration;
    let report = Arc::new(Mutex::new(CoordReport::default()));
    let faults = Arc::new(Mutex::new(Vec::new()));
    let end_rev: Arc<Mutex<Option<i64>>> = Arc::new(Mutex::new(None));
    let pw = format!("{}w/", cfg.prefix).into_bytes();
    let pw_end = prefix_end(&pw);
    let all = cfg.prefix.clone().into_bytes();
    let all_end = prefix_end(&all);
    // After the load: time to drain every watch to the end marker.
    let drain = deadline + Duration::from_secs(30);

    let mut watchers = Vec::new();
    for _ in 0..cfg.watchers.max(1) {
        let (h, k, e, u) = (hosts.clone(), pw.clone(), pw_end.clone(), end_rev.clone());
        watchers.push(tokio::spawn(
            async move { watch_history(&h, &k, &e, from, u, drain).await },
        ));
    }
    // The history of everything of this run, for the fencing check.
    let whole = {
        let (h, k, e, u) = (hosts.clone(), all.clone(), all_end.clone(), end_rev.clone());
        tokio::spawn(async move { watch_history(&h, &k, &e, from, u, drain).await })
    };
    let acked: Arc<Mutex<Acked>> = Arc::default();
    let unknown: Arc<Mutex<HashSet<Vec<u8>>>> = Arc::default();
    let mut load = Vec::new();
    for w in 0..cfg.writers.max(1) {
        let (h, acked, unknown, p) = (hosts.clone(), acked.clone(), unknown.clone(), pw.clone());
        load.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                n += 1;
                let key = [p.clone(), format!("{w}/{}", n % 16).into_bytes()].concat();
                let value = format!("{w}-{n}").into_bytes();
                let r = timed(KvClient::new(h.any()).put(PutRequest {
                    key,
                    value: value.clone(),
                    ..Default::default()
                }))
                .await;
                match r {
                    Ok(r) => acked
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((r.header.map_or(0, |h| h.revision), value)),
                    Err(_) => {
                        unknown.lock().unwrap_or_else(|e| e.into_inner()).insert(value);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }));
    }
    for _ in 0..cfg.leases {
        load.push(tokio::spawn(lease_holder(
            hosts.clone(),
            cfg.lease_ttl,
            deadline,
            report.clone(),
        )));
    }
    for i in 0..cfg.lockers {
        load.push(tokio::spawn(locker(
            hosts.clone(),
            i,
            cfg.prefix.clone(),
            cfg.lease_ttl,
            deadline,
            report.clone(),
        )));
    }
    let nemesis_task = cfg
        .nemesis
        .clone()
        .map(|n| tokio::spawn(nemesis::nemesis(n, cfg.seed, deadline, faults.clone())));
    progress(format!("load running for {:?}", cfg.duration));
    for t in load {
        let _ = t.await;
    }
    let restarted = match nemesis_task {
        Some(t) => t.await.unwrap_or_default(),
        None => Vec::new(),
    };
    progress("load done; writing the end marker and draining the watches".into());
    let marker = [pw.clone(), b"end".to_vec()].concat();
    let end = hosts.put_surely(&marker, b"end", drain).await?;
    *end_rev.lock().unwrap_or_else(|e| e.into_inner()) = Some(end);

    let acked = std::mem::take(&mut *acked.lock().unwrap_or_else(|e| e.into_inner()));
    let unknown = std::mem::take(&mut *unknown.lock().unwrap_or_else(|e| e.into_inner()));
    let written: HashSet<Vec<u8>> = acked
        .iter()
        .map(|(_, v)| v.clone())
        .chain(unknown.iter().cloned())
        .collect();
    let mut rep = std::mem::take(&mut *report.lock().unwrap_or_else(|e| e.into_inner()));
    rep.writes_ok = acked.len();
    rep.writes_unknown = unknown.len();
    for (i, w) in watchers.into_iter().enumerate() {
        let (seen, resumes, problems) = w.await.map_err(|e| e.to_string())?;
        rep.watch_resumes += resumes;
        rep.watch_problems
            .extend(problems.into_iter().map(|p| format!("watcher {i}: {p}")));
        let by_value: BTreeMap<&[u8], i64> = seen.iter().map(|s| (s.value.as_slice(), s.rev)).collect();
        let mut missed = 0;
        for (rev, v) in &acked {
            match by_value.get(v.as_slice()) {
                Some(r) if r == rev => {}
                Some(r) => rep.watch_problems.push(format!(
                    "watcher {i}: {:?} acknowledged at revision {rev} but seen at {r}",
                    String::from_utf8_lossy(v)
                )),
                None => missed += 1,
            }
        }
        if missed > 0 {
            rep.watch_problems
                .push(format!("watcher {i}: missed {missed} acknowledged writes"));
        }
        for s in &seen {
            if s.put && s.value != b"end" && !written.contains(&s.value) {
                rep.watch_problems.push(format!(
                    "watcher {i}: saw {:?}, which no client wrote",
                    String::from_utf8_lossy(&s.value)
                ));
            }
        }
        rep.watch_events.push(seen.len());
    }
    let (history, _, problems) = whole.await.map_err(|e| e.to_string())?;
    rep.watch_problems
        .extend(problems.into_iter().map(|p| format!("history watch: {p}")));
    let (applied, fencing) = check_fencing(
        &history,
        format!("{}lock/", cfg.prefix).as_bytes(),
        format!("{}fenced", cfg.prefix).as_bytes(),
    );
    rep.guarded_applied = applied;
    rep.fencing_problems = fencing;
    if rep.guarded_applied < rep.guarded_ok {
        rep.fencing_problems.push(format!(
            "{} guarded writes acknowledged but only {} in the history",
            rep.guarded_ok, rep.guarded_applied
        ));
    }
    rep.faults = std::mem::take(&mut *faults.lock().unwrap_or_else(|e| e.into_inner()));
    rep.restarted_pids = restarted;
    rep.elapsed = start.elapsed();
    Ok(rep)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(rev: i64, put: bool, key: &str, value: &str, create_rev: i64) -> Seen {
        Seen {
            rev,
            put,
            key: key.into(),
            value: value.into(),
            create_rev,
        }
    }

    #[test]
    fn fencing_check_catches_a_write_by_a_holder_that_lost_the_lock() {
        let good = vec![
            ev(1, true, "p/lock/a", "", 1),
            ev(2, true, "p/lock/b", "", 2),
            ev(3, true, "p/fenced", "p/lock/a#0-1", 0),
            ev(4, false, "p/lock/a", "", 0),
            ev(5, true, "p/fenced", "p/lock/b#1-1", 0),
        ];
        let (n, problems) = check_fencing(&good, b"p/lock/", b"p/fenced");
        assert_eq!((n, problems.len()), (2, 0), "{problems:?}");
        let mut bad = good.clone();
        // a writes after its key is gone (its lease expired, b holds it).
        bad.push(ev(6, true, "p/fenced", "p/lock/a#0-2", 0));
        let (_, problems) = check_fencing(&bad, b"p/lock/", b"p/fenced");
        assert_eq!(problems.len(), 1, "{problems:?}");
        // b writes while a still holds it.
        let early = vec![
            ev(1, true, "p/lock/a", "", 1),
            ev(2, true, "p/lock/b", "", 2),
            ev(3, true, "p/fenced", "p/lock/b#1-1", 0),
        ];
        assert_eq!(check_fencing(&early, b"p/lock/", b"p/fenced").1.len(), 1);
    }

    #[test]
    fn prefix_ends_bump_the_last_byte() {
        assert_eq!(prefix_end(b"ab"), b"ac");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }
}
