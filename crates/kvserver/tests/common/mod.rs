//! The in-process cluster the store tests share: several stores in one
//! process joined by an in-memory transport, and helpers to drive them.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvserver::keyspace::ETCD_RANGE_ID;
use kvserver::transport::{SnapshotDone, Transport};
use kvserver::{ApplyOutcome, Bootstrap, Store, StoreConfig, StoreHandle, StoreOptions};
use parking_lot::RwLock;
use prost::Message as _;
use proto::etcdserverpb::PutRequest;
use proto::kvserver::{raft_command, RaftCommand, StoreIdent};
use proto::transport::{raft_msg, RaftMsg, SnapshotHandle};

pub type Handles = Arc<RwLock<HashMap<u64, StoreHandle>>>;

/// Whether the sending store still published a valid lease for the range
/// when each TimeoutNow left it.
pub type TimeoutNowProbe = Arc<parking_lot::Mutex<Vec<(u64, bool)>>>;

/// Delivers directly into the destination store's raft loop.
pub struct LocalTransport {
    pub me: u64,
    pub handles: Handles,
    pub timeout_now: TimeoutNowProbe,
    /// Stores cut off from all others: nothing to or from them arrives.
    pub isolated: Isolated,
}

pub type Isolated = Arc<RwLock<std::collections::HashSet<u64>>>;

impl Transport for LocalTransport {
    fn send(&self, to_store: u64, msgs: Vec<RaftMsg>) {
        {
            let cut = self.isolated.read();
            if cut.contains(&self.me) || cut.contains(&to_store) {
                return;
            }
        }
        for m in &msgs {
            if let Some(raft_msg::Body::TimeoutNow(_)) = m.body {
                let me = self.handles.read().get(&self.me).cloned();
                let serving = me
                    .and_then(|h| h.status(m.range_id))
                    .is_some_and(|s| s.can_serve(Instant::now()));
                self.timeout_now.lock().push((m.range_id, serving));
            }
        }
        if let Some(h) = self.handles.read().get(&to_store) {
            h.deliver(self.me, msgs);
        }
    }

    fn send_snapshot(
        &self,
        to_store: u64,
        mut msg: RaftMsg,
        meta: proto::storage::SnapshotMeta,
        dir: PathBuf,
        done: SnapshotDone,
    ) {
        let Some(h) = self.handles.read().get(&to_store).cloned() else {
            return done(false);
        };
        // Stage the files where the receiver applies snapshots from.
        let Ok(staged) = storage::snapshot::new_incoming_dir(h.engine(), msg.range_id) else {
            return done(false);
        };
        for f in std::fs::read_dir(&dir).unwrap() {
            let f = f.unwrap();
            std::fs::copy(f.path(), staged.join(f.file_name())).unwrap();
        }
        if let Some(raft_msg::Body::Snapshot(s)) = &mut msg.body {
            s.data = SnapshotHandle {
                meta: Some(meta),
                dir: staged.to_string_lossy().into_owned(),
            }
            .encode_to_vec();
        }
        h.deliver(self.me, vec![msg]);
        done(true);
    }
}

pub struct Cluster {
    pub _dirs: Vec<tempfile::TempDir>,
    pub stores: HashMap<u64, Store>,
    pub handles: Handles,
    pub timeout_now: TimeoutNowProbe,
    pub isolated: Isolated,
}

pub fn cfg(dir: &std::path::Path) -> StoreConfig {
    let mut c = StoreConfig::new(dir);
    c.tick = Duration::from_millis(20);
    c
}

pub fn start(n: u64) -> Cluster {
    start_with(n, 10_000)
}

pub fn start_with(n: u64, threshold: u64) -> Cluster {
    let handles: Handles = Arc::new(RwLock::new(HashMap::new()));
    let timeout_now = TimeoutNowProbe::default();
    let isolated = Isolated::default();
    let mut stores = HashMap::new();
    let mut dirs = Vec::new();
    let mut cluster_id = String::new();
    for id in 1..=n {
        let dir = tempfile::tempdir().unwrap();
        let bootstrap = if id == 1 {
            Bootstrap::NewCluster { addr: String::new() }
        } else {
            Bootstrap::Join(StoreIdent {
                cluster_id: cluster_id.clone(),
                node_id: id,
                store_id: id,
            })
        };
        let opts = StoreOptions {
            transport: Arc::new(LocalTransport {
                me: id,
                handles: handles.clone(),
                timeout_now: timeout_now.clone(),
                isolated: isolated.clone(),
            }),
            bootstrap,
            ..Default::default()
        };
        let mut sc = cfg(dir.path());
        sc.log_truncation_threshold = threshold;
        let store = Store::start_with(sc, opts).unwrap();
        let h = store.handle();
        if id == 1 {
            cluster_id = h.ident().cluster_id.clone();
        }
        handles.write().insert(id, h);
        stores.insert(id, store);
        dirs.push(dir);
    }
    // Every store knows every other.
    for h in handles.read().values() {
        for id in 1..=n {
            h.known_stores().write().insert(id, format!("store-{id}"));
        }
    }
    Cluster {
        _dirs: dirs,
        stores,
        handles,
        timeout_now,
        isolated,
    }
}

pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `f` to completion on a runtime of its own (the tests are sync).
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

pub fn put(h: &StoreHandle, k: &str, v: &str) -> Result<i64, String> {
    let cmd = RaftCommand {
        proposer_term: 0,
        max_lease_index: 0,
        proposer_ts: None,
        op: Some(raft_command::Op::EtcdPut(PutRequest {
            key: k.into(),
            value: v.into(),
            ..Default::default()
        })),
    };
    match block_on(h.propose(ETCD_RANGE_ID, cmd, Duration::from_secs(5))) {
        Ok(ApplyOutcome::Etcd { result: Ok(_), rev, .. }) => Ok(rev),
        other => Err(format!("{other:?}")),
    }
}

pub fn all_voters(s: &kvserver::ReplicaStatus) -> bool {
    s.desc.replicas.len() == 3
        && s.desc
            .replicas
            .iter()
            .all(|r| r.r#type == proto::storage::replica_descriptor::Type::Voter as i32)
}

pub fn leader_store(c: &Cluster, range: u64) -> Option<u64> {
    c.handles
        .read()
        .iter()
        .find_map(|(&id, h)| h.status(range).filter(|s| s.leader_ready).map(|_| id))
}

impl Cluster {
    /// Stops store `id` (its directory stays), as if its process died.
    pub fn stop(&mut self, id: u64) {
        self.handles.write().remove(&id);
        if let Some(mut s) = self.stores.remove(&id) {
            s.stop();
        }
    }

    /// Starts store `id` again on its directory.
    pub fn restart(&mut self, id: u64) -> StoreHandle {
        let dir = self._dirs[(id - 1) as usize].path().to_path_buf();
        let opts = StoreOptions {
            transport: Arc::new(LocalTransport {
                me: id,
                handles: self.handles.clone(),
                timeout_now: self.timeout_now.clone(),
                isolated: self.isolated.clone(),
            }),
            bootstrap: Bootstrap::Existing,
            ..Default::default()
        };
        let store = Store::start_with(cfg(&dir), opts).unwrap();
        let h = store.handle();
        let n = self._dirs.len() as u64;
        for i in 1..=n {
            h.known_stores().write().insert(i, format!("store-{i}"));
        }
        self.handles.write().insert(id, h.clone());
        self.stores.insert(id, store);
        h
    }

    pub fn handle(&self, id: u64) -> StoreHandle {
        self.handles.read()[&id].clone()
    }
}

/// Splits range `range_id` at `key` into a new range `new_id` by proposing
/// the split trigger to its leader directly.
pub fn split_at(h: &StoreHandle, range_id: u64, key: &[u8], new_id: u64) {
    let desc = h.status(range_id).unwrap().desc;
    let (left, right) = kvserver::split::halves(&desc, key, new_id);
    let cmd = RaftCommand {
        op: Some(raft_command::Op::Split(proto::kvserver::SplitTrigger {
            left: Some(left),
            right: Some(right),
            ..Default::default()
        })),
        ..Default::default()
    };
    match block_on(h.propose(range_id, cmd, Duration::from_secs(5))) {
        Ok(ApplyOutcome::Split(Ok(()))) => {}
        other => panic!("split of range {range_id} at {key:?}: {other:?}"),
    }
}
