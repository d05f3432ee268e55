//! Several stores in one process, joined by an in-memory transport: ranges
//! up-replicate to every store, writes reach every replica, and the cluster
//! keeps working when the leader's store stops.

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

type Handles = Arc<RwLock<HashMap<u64, StoreHandle>>>;

/// Delivers directly into the destination store's raft loop.
struct LocalTransport {
    me: u64,
    handles: Handles,
}

impl Transport for LocalTransport {
    fn send(&self, to_store: u64, msgs: Vec<RaftMsg>) {
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

struct Cluster {
    _dirs: Vec<tempfile::TempDir>,
    stores: HashMap<u64, Store>,
    handles: Handles,
}

fn cfg(dir: &std::path::Path) -> StoreConfig {
    let mut c = StoreConfig::new(dir);
    c.tick = Duration::from_millis(20);
    c
}

fn start(n: u64) -> Cluster {
    start_with(n, 10_000)
}

fn start_with(n: u64, threshold: u64) -> Cluster {
    let handles: Handles = Arc::new(RwLock::new(HashMap::new()));
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
    }
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn put(h: &StoreHandle, k: &str, v: &str) -> Result<i64, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let cmd = RaftCommand {
        max_lease_index: 0,
        proposer_ts: None,
        op: Some(raft_command::Op::EtcdPut(PutRequest {
            key: k.into(),
            value: v.into(),
            ..Default::default()
        })),
    };
    match rt.block_on(h.propose(ETCD_RANGE_ID, cmd, Duration::from_secs(5))) {
        Ok(ApplyOutcome::Etcd { result: Ok(_), rev, .. }) => Ok(rev),
        other => Err(format!("{other:?}")),
    }
}

fn all_voters(s: &kvserver::ReplicaStatus) -> bool {
    s.desc.replicas.len() == 3
        && s.desc
            .replicas
            .iter()
            .all(|r| r.r#type == proto::storage::replica_descriptor::Type::Voter as i32)
}

fn leader_store(c: &Cluster, range: u64) -> Option<u64> {
    c.handles
        .read()
        .iter()
        .find_map(|(&id, h)| h.status(range).filter(|s| s.leader_ready).map(|_| id))
}

#[test]
fn ranges_up_replicate_and_writes_reach_every_store() {
    let c = start(3);
    wait_for(
        "every range to have three voters on every store",
        Duration::from_secs(30),
        || {
            c.handles.read().values().all(|h| {
                let st = h.statuses();
                st.len() == 3 && st.iter().all(|s| all_voters(s) && s.applied.index > 1)
            })
        },
    );
    let h1 = c.handles.read()[&leader_store(&c, ETCD_RANGE_ID).unwrap()].clone();
    let rev = put(&h1, "k", "v").unwrap();
    assert!(rev > 1);
    wait_for("the write to apply everywhere", Duration::from_secs(10), || {
        c.handles.read().values().all(|h| {
            h.status(ETCD_RANGE_ID).is_some_and(|s| {
                let snap = h.engine().snapshot();
                h.rev_state(&snap).map(|r| r.rev).unwrap_or(0) == rev && s.applied.index > 2
            })
        })
    });
}

#[test]
fn the_cluster_survives_losing_the_leaders_store() {
    let mut c = start(3);
    wait_for("three voters", Duration::from_secs(30), || {
        c.handles
            .read()
            .values()
            .all(|h| h.statuses().len() == 3 && h.statuses().iter().all(all_voters))
    });
    let old = leader_store(&c, ETCD_RANGE_ID).unwrap();
    put(&c.handles.read()[&old].clone(), "before", "1").unwrap();
    c.handles.write().remove(&old);
    let mut s = c.stores.remove(&old).unwrap();
    s.stop();
    wait_for("a new leader", Duration::from_secs(20), || {
        leader_store(&c, ETCD_RANGE_ID).is_some_and(|l| l != old)
    });
    let new = leader_store(&c, ETCD_RANGE_ID).unwrap();
    let h = c.handles.read()[&new].clone();
    put(&h, "after", "2").unwrap();
}

#[test]
fn a_store_behind_the_truncated_log_catches_up_by_snapshot() {
    let mut c = start_with(3, 20);
    wait_for("three voters", Duration::from_secs(30), || {
        c.handles
            .read()
            .values()
            .all(|h| h.statuses().len() == 3 && h.statuses().iter().all(all_voters))
    });
    let leader = leader_store(&c, ETCD_RANGE_ID).unwrap();
    let down = (1..=3).find(|&s| s != leader).unwrap();
    // Stop one follower, keeping its directory.
    c.handles.write().remove(&down);
    let mut s = c.stores.remove(&down).unwrap();
    s.stop();
    drop(s);
    let h = c.handles.read()[&leader].clone();
    for i in 0..200 {
        put(&h, &format!("k{i}"), "v").unwrap();
    }
    wait_for("the leader to truncate its log", Duration::from_secs(10), || {
        h.statuses().iter().any(|st| st.desc.range_id == ETCD_RANGE_ID) && {
            let t = storage::raftlog::truncated_state(h.engine(), ETCD_RANGE_ID).unwrap();
            t.index > 50
        }
    });
    // Restart the follower on its old directory.
    let dir = c._dirs[(down - 1) as usize].path().to_path_buf();
    let opts = StoreOptions {
        transport: Arc::new(LocalTransport {
            me: down,
            handles: c.handles.clone(),
        }),
        bootstrap: Bootstrap::Existing,
        ..Default::default()
    };
    let store = Store::start_with(cfg(&dir), opts).unwrap();
    let hd = store.handle();
    for id in 1..=3 {
        hd.known_stores().write().insert(id, format!("store-{id}"));
    }
    c.handles.write().insert(down, hd.clone());
    c.stores.insert(down, store);
    let want = h.status(ETCD_RANGE_ID).unwrap().applied.index;
    wait_for("the restarted follower to catch up", Duration::from_secs(20), || {
        hd.status(ETCD_RANGE_ID).is_some_and(|s| s.applied.index >= want)
    });
    assert!(hd.metrics().snapshots_applied.get() >= 1, "it caught up by a snapshot");
    let snap = hd.engine().snapshot();
    assert_eq!(hd.rev_state(&snap).unwrap().rev, {
        let s2 = h.engine().snapshot();
        h.rev_state(&s2).unwrap().rev
    });
}
