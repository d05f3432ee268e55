//! A store: one engine, the replicas on it, and the handle request handlers
//! and the transport use to reach them. The replicas themselves belong to the
//! scheduler's thread (`scheduler`); readers see `ReplicaStatus` snapshots.
//!
//! A store starts from its engine: an empty one is bootstrapped as a new
//! cluster (a single node, or the first node of `init`), or given an identity
//! by a cluster it joins (no replicas; the cluster adds them).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use parking_lot::{Mutex, RwLock};
use prost::Message as _;
use proto::kvserver::{RaftCommand, StoreIdent};
use proto::storage::{replica_descriptor, RangeDescriptor, ReplicaDescriptor};
use proto::transport::RaftMsg;
use storage::raftlog::{self, HardState};
use storage::rangestate::{self, AppliedState};
use storage::{Engine, EngineOptions};
use tokio::sync::oneshot;

use crate::etcd::RevState;
use crate::hlc::{Clock, SystemClock, WallClock};
use crate::keyspace::{BOOTSTRAP_RANGES, ETCD_RANGE_ID, SYSTEM_RANGE_ID};
use crate::metrics::Metrics;
use crate::replica::{ApplyOutcome, ProposeError, Replica, ReplicaStatus, REV_STATE_SUFFIX};
use crate::scheduler::Scheduler;
use crate::transport::{NoTransport, Transport};
use crate::StoreError;
use crate::{liveness, node_ids};

/// Settings of a store.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    pub dir: PathBuf,
    /// The store-level raft tick.
    pub tick: Duration,
    /// The minimum election timeout, in ticks.
    pub election_ticks: u64,
    pub heartbeat_ticks: u64,
    /// Bound on the rate error between two nodes' monotonic clocks (leases).
    pub clock_rate_error: f64,
    /// A replica truncates its raft log once it holds more than this many
    /// applied entries.
    pub log_truncation_threshold: u64,
    /// The raft loop hands its batches to the log writer (and goes on while
    /// they sync) only once syncs take this long on average: with shorter
    /// syncs the two thread hops cost more than the overlap gains (measured
    /// in docs/benchmarks.md). Zero: whenever work waits.
    pub pipeline_min_sync: Duration,
    /// Testing knob, zero by default: every synced raft write takes this
    /// much longer (a slow disk).
    pub testing_sync_delay: Duration,
}

impl StoreConfig {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        StoreConfig {
            dir: dir.into(),
            tick: Duration::from_millis(100),
            election_ticks: 10,
            heartbeat_ticks: 1,
            clock_rate_error: 0.01,
            log_truncation_threshold: 10_000,
            pipeline_min_sync: Duration::from_millis(1),
            testing_sync_delay: Duration::ZERO,
        }
    }

    /// How long a store's support of another lasts after each request
    /// (`store_liveness`): `(election_ticks - 1) * tick`, within a restarted
    /// replica's quiet period of `election_ticks` ticks, so every grant of a
    /// forgotten process has expired before it may vote.
    pub fn support_interval(&self) -> Duration {
        self.tick * self.election_ticks.saturating_sub(1) as u32
    }
}

pub(crate) enum Event {
    Propose {
        range_id: u64,
        cmd: Box<RaftCommand>,
        reply: oneshot::Sender<Result<ApplyOutcome, ProposeError>>,
    },
    RaftMessages {
        from_store: u64,
        msgs: Vec<RaftMsg>,
    },
    SnapshotDone {
        range_id: u64,
        to: u64,
        ok: bool,
    },
    /// Move the range's leadership (and lease) to its replica on `to_store`.
    TransferLeader {
        range_id: u64,
        to_store: u64,
    },
    Stop,
}

/// How a store with an empty engine gets its identity.
#[derive(Clone, Debug)]
pub enum Bootstrap {
    /// Refuse: the store must exist already.
    Existing,
    /// Become node 1 of a new cluster, holding every range; `addr` is where it
    /// serves (recorded as node 1's address).
    NewCluster { addr: String },
    /// Take the identity a cluster gave this node, with no replicas.
    Join(StoreIdent),
}

/// How to start a store.
pub struct StoreOptions {
    pub wall: Arc<dyn WallClock>,
    pub transport: Arc<dyn Transport>,
    pub bootstrap: Bootstrap,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            wall: Arc::new(SystemClock),
            transport: Arc::new(NoTransport),
            bootstrap: Bootstrap::NewCluster { addr: String::new() },
        }
    }
}

const IDENT_KEY: &[u8] = b"ident";
const HLC_BOUND_KEY: &[u8] = b"hlcbound";

/// What request handlers use to reach a store.
#[derive(Clone)]
pub struct StoreHandle {
    tx: Sender<Event>,
    engine: Engine,
    clock: Arc<Clock>,
    statuses: Arc<RwLock<BTreeMap<u64, Arc<RwLock<ReplicaStatus>>>>>,
    metrics: Arc<Metrics>,
    ident: StoreIdent,
    last_heard: Arc<Mutex<HashMap<u64, Instant>>>,
    known_stores: Arc<RwLock<BTreeMap<u64, String>>>,
    stopped: Arc<Mutex<Option<String>>>,
    status_version: Arc<std::sync::atomic::AtomicU64>,
    etcd_applied: Arc<tokio::sync::watch::Sender<u64>>,
    lessor: Arc<Mutex<crate::etcd_lease::Lessor>>,
    txnwait: Arc<crate::txnwait::TxnWait>,
}

impl StoreHandle {
    /// Changes whenever this store's replica of the etcd range applied
    /// more (its value: the applied index), so watches read what is new.
    pub fn etcd_applied(&self) -> tokio::sync::watch::Receiver<u64> {
        self.etcd_applied.subscribe()
    }

    /// The clock of etcd leases, kept while this store holds the etcd
    /// range's lease (see `etcd_lease::Lessor`).
    pub fn lessor(&self) -> &Arc<Mutex<crate::etcd_lease::Lessor>> {
        &self.lessor
    }

    /// The queue where pushes of transactions anchored here wait.
    pub fn txnwait(&self) -> &Arc<crate::txnwait::TxnWait> {
        &self.txnwait
    }

    /// Why the store's raft loop stopped on its own (an engine failure), if
    /// it did: the store then serves and acknowledges nothing.
    pub fn stopped(&self) -> Option<String> {
        self.stopped.lock().clone()
    }

    /// Hands raft messages from another store to the raft loop.
    pub fn deliver(&self, from_store: u64, msgs: Vec<RaftMsg>) {
        self.last_heard.lock().insert(from_store, Instant::now());
        let _ = self.tx.send(Event::RaftMessages { from_store, msgs });
    }

    /// Stores of the cluster and their addresses (the address book).
    pub fn known_stores(&self) -> &Arc<RwLock<BTreeMap<u64, String>>> {
        &self.known_stores
    }

    /// Every known store with whether it is live and its liveness record,
    /// judged as `liveness` says; and for each when this store last heard
    /// from it.
    pub fn node_liveness(&self) -> Vec<liveness::NodeLiveness> {
        let known: Vec<u64> = self.known_stores.read().keys().copied().collect();
        liveness::judge(
            &self.engine,
            self.has_range(SYSTEM_RANGE_ID),
            &self.last_heard.lock(),
            known,
            self.clock.physical() as i64,
            self.ident.store_id,
        )
    }

    /// Moves `range_id`'s leadership, and so its lease, to its replica on
    /// `to_store` (raft leader transfer; the lease is given up before the
    /// TimeoutNow leaves). The outcome shows in the range's status.
    pub fn transfer_leader(&self, range_id: u64, to_store: u64) -> Result<(), ProposeError> {
        self.tx
            .send(Event::TransferLeader { range_id, to_store })
            .map_err(|_| ProposeError::Stopped)
    }
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn ident(&self) -> &StoreIdent {
        &self.ident
    }

    /// The status of every range on this store.
    pub fn statuses(&self) -> Vec<ReplicaStatus> {
        self.statuses.read().values().map(|s| s.read().clone()).collect()
    }

    /// The status of every range on this store for which `keep` holds,
    /// copying only those (the periodic loops look at every range often,
    /// and most are of no interest to them).
    /// A number that changes whenever the raft loop handled a `Ready` (so
    /// any replica's status may have changed): loops that scan every status
    /// can skip a scan when it did not move.
    pub fn status_version(&self) -> u64 {
        self.status_version.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn statuses_where(&self, mut keep: impl FnMut(&ReplicaStatus) -> bool) -> Vec<ReplicaStatus> {
        self.statuses
            .read()
            .values()
            .filter_map(|s| {
                let s = s.read();
                keep(&s).then(|| s.clone())
            })
            .collect()
    }

    /// Whether this store holds a replica of `range_id`.
    pub fn has_range(&self, range_id: u64) -> bool {
        self.statuses.read().contains_key(&range_id)
    }

    /// The merge a range here is frozen for, if it is.
    pub fn frozen(&self, range_id: u64) -> Option<proto::kvserver::FreezeForMerge> {
        self.statuses.read().get(&range_id).and_then(|s| s.read().frozen)
    }

    pub fn status(&self, range_id: u64) -> Option<ReplicaStatus> {
        self.statuses.read().get(&range_id).map(|s| s.read().clone())
    }

    /// Looks at `range_id`'s status in place (no copy: the request path
    /// asks several times per request), if this store has the range.
    pub fn with_status<R>(&self, range_id: u64, f: impl FnOnce(&ReplicaStatus) -> R) -> Option<R> {
        self.statuses.read().get(&range_id).map(|s| f(&s.read()))
    }

    /// Proposes `cmd` on `range_id` (stamped with this node's clock) and waits
    /// until it applies, `timeout` passes (outcome unknown) or it is refused.
    ///
    /// While the range has no leader (an election in progress), the command is
    /// not proposed and is retried until `timeout`: that is always safe.
    pub async fn propose(
        &self,
        range_id: u64,
        cmd: RaftCommand,
        timeout: Duration,
    ) -> Result<ApplyOutcome, ProposeError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let rx = self.send_proposal(range_id, cmd.clone())?;
            match tokio::time::timeout_at(deadline, rx).await {
                Ok(Ok(Err(ProposeError::NotLeader { leader: 0 }))) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Ok(Ok(r)) => return r,
                Ok(Err(_)) => return Err(ProposeError::Stopped),
                Err(_) => return Err(ProposeError::Ambiguous),
            }
        }
    }

    /// Proposes a command evaluated under the lease of its `proposer_term`
    /// and waits, however long it takes, until it applied or certainly will
    /// not (its entry was replaced, the lease ended before it was proposed,
    /// the store stopped). Never retried: only the lease it was evaluated
    /// under may propose it. Whoever holds the command's latches keeps them
    /// across this wait.
    pub async fn propose_evaluated(&self, range_id: u64, cmd: RaftCommand) -> Result<ApplyOutcome, ProposeError> {
        self.send_proposal(range_id, cmd)?
            .await
            .unwrap_or(Err(ProposeError::Stopped))
    }

    /// Stamps `cmd` with this node's clock and hands it to the raft loop;
    /// the receiver gets its outcome.
    fn send_proposal(
        &self,
        range_id: u64,
        mut cmd: RaftCommand,
    ) -> Result<oneshot::Receiver<Result<ApplyOutcome, ProposeError>>, ProposeError> {
        let ts = self.clock.now().map_err(|e| ProposeError::Clock(e.to_string()))?;
        cmd.proposer_ts = Some(ts.into());
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Event::Propose {
                range_id,
                cmd: Box::new(cmd),
                reply,
            })
            .map_err(|_| ProposeError::Stopped)?;
        Ok(rx)
    }

    /// Waits until `range_id` may serve reads here, up to `timeout`.
    pub async fn wait_readable(&self, range_id: u64, timeout: Duration) -> Result<ReplicaStatus, ProposeError> {
        let deadline = Instant::now() + timeout;
        loop {
            let st = self.status(range_id).ok_or(ProposeError::NoSuchRange(range_id))?;
            let now = Instant::now();
            if st.can_serve(now) {
                return Ok(st);
            }
            if now >= deadline {
                return Err(if st.leader == 0 {
                    ProposeError::NotLeader { leader: 0 }
                } else {
                    ProposeError::Ambiguous
                });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The nodes the cluster gave ids to (from this store's system range replica).
    pub fn node_records(&self) -> Vec<proto::kvserver::NodeRecord> {
        node_ids::records(&self.engine).unwrap_or_default()
    }

    /// The etcd revision state as of a point-in-time view.
    pub fn rev_state(&self, r: &dyn storage::Reader) -> Result<RevState, StoreError> {
        match rangestate::local_record(r, ETCD_RANGE_ID, REV_STATE_SUFFIX)? {
            Some(b) => RevState::decode(&b).map_err(|e| StoreError::Corrupt(e.to_string())),
            None => Err(StoreError::Corrupt("etcd revision state missing".into())),
        }
    }
}

/// A running store.
pub struct Store {
    handle: StoreHandle,
    thread: Option<JoinHandle<()>>,
}

impl Store {
    /// Opens the store in `cfg.dir` (bootstrapping a new single-node cluster if
    /// it is empty) and starts its raft loop.
    pub fn start(cfg: StoreConfig) -> Result<Store, StoreError> {
        Self::start_with(cfg, StoreOptions::default())
    }

    pub fn start_with(cfg: StoreConfig, opts: StoreOptions) -> Result<Store, StoreError> {
        let engine = Engine::open(&cfg.dir, EngineOptions::default())?;
        let ident = bootstrap_if_needed(&engine, &opts.bootstrap)?;
        let wall = opts.wall;
        let bound = match rangestate::store_record(&engine, HLC_BOUND_KEY)? {
            Some(b) if b.len() == 8 => u64::from_be_bytes(b.try_into().unwrap_or([0; 8])),
            Some(b) => return Err(StoreError::Corrupt(format!("clock bound of {} bytes", b.len()))),
            None => 0,
        };
        let pe = engine.clone();
        let clock = Arc::new(Clock::new(
            wall,
            bound,
            Box::new(move |b| {
                let mut batch = pe.batch();
                rangestate::set_store_record(&mut batch, HLC_BOUND_KEY, &b.to_be_bytes()).map_err(|e| e.to_string())?;
                pe.write(batch, true).map_err(|e| e.to_string())
            }),
        ));
        let metrics = Arc::new(Metrics::default());
        let mut replicas = BTreeMap::new();
        let statuses = Arc::new(RwLock::new(BTreeMap::new()));
        let (tx, rx) = crossbeam_channel::unbounded();
        let known_stores = Arc::new(RwLock::new(BTreeMap::new()));
        known_stores.write().insert(ident.store_id, String::new());
        let liveness = Arc::new(crate::store_liveness::StoreLiveness::open(
            &engine,
            ident.store_id,
            &cfg,
        )?);
        let mut sched = Scheduler {
            liveness: liveness.clone(),
            out: Default::default(),
            dirty: Default::default(),
            ticking: Default::default(),
            status_version: Default::default(),
            etcd_applied: Arc::new(tokio::sync::watch::Sender::new(0)),
            cfg: cfg.clone(),
            engine: engine.clone(),
            rx,
            replicas: BTreeMap::new(),
            statuses: statuses.clone(),
            clock: clock.clone(),
            metrics: metrics.clone(),
            transport: opts.transport,
            store_id: ident.store_id,
            last_heard: Arc::new(Mutex::new(HashMap::new())),
            known_stores: known_stores.clone(),
            next_queues: Instant::now(),
            next_support: Instant::now(),
            events: tx.clone(),
            stopped: Arc::new(Mutex::new(None)),
            stepped_snapshots: Vec::new(),
            tombstones: Default::default(),
            ticks_taken: 0,
            writer: crate::log_writer::LogWriter::start(engine.clone(), metrics.clone(), cfg.testing_sync_delay)
                .map_err(|e| StoreError::Io(format!("cannot start the raft log writer: {e}")))?,
            cycles: Default::default(),
            gathering: None,
            finishing: false,
            applied_unsynced: Vec::new(),
            sync_average: 0.0,
        };
        let mut descs = rangestate::all_descriptors(&engine)?;
        let mut absorbed = Vec::new();
        for desc in &descs {
            // A frozen replica overlapping another one was absorbed by a
            // merge this store took through a snapshot, and the store
            // stopped before removing it: remove it now.
            let overlaps = descs.iter().any(|o| {
                o.range_id != desc.range_id
                    && !o.end_key.is_empty()
                    && !desc.end_key.is_empty()
                    && o.start_key < desc.end_key
                    && desc.start_key < o.end_key
            });
            if overlaps && crate::merge::frozen(&engine, desc.range_id)?.is_some() {
                tracing::info!(
                    range = desc.range_id,
                    "removing a frozen replica its merged range absorbed"
                );
                crate::merge::remove_absorbed(&engine, desc.range_id)?;
                absorbed.push(desc.range_id);
            }
        }
        descs.retain(|d| !absorbed.contains(&d.range_id));
        for desc in descs {
            let Some(me) = desc.replicas.iter().find(|r| r.store_id == ident.store_id) else {
                continue;
            };
            let name = crate::keyspace::range_name(desc.range_id);
            let rc = crate::scheduler::raft_config(&cfg, clock.physical(), me.replica_id, desc.range_id);
            let mut rep = Replica::new(engine.clone(), desc.clone(), name, me.replica_id, rc, liveness.clone())?;
            if rep.is_sole_voter() {
                // Nobody else can hold a lease: no reason to wait out a timeout.
                rep.raw.campaign();
            }
            statuses.write().insert(desc.range_id, rep.status.clone());
            replicas.insert(desc.range_id, rep);
        }
        metrics.ranges.set(replicas.len() as u64);
        sched.dirty = replicas.keys().copied().collect();
        sched.replicas = replicas;
        let handle = StoreHandle {
            tx,
            engine: engine.clone(),
            clock: clock.clone(),
            statuses,
            metrics: metrics.clone(),
            ident,
            last_heard: sched.last_heard.clone(),
            known_stores,
            stopped: sched.stopped.clone(),
            status_version: sched.status_version.clone(),
            etcd_applied: sched.etcd_applied.clone(),
            lessor: Arc::default(),
            txnwait: Arc::default(),
        };
        let thread = std::thread::Builder::new()
            .name("raft-scheduler".into())
            .spawn(move || sched.run())
            .map_err(|e| StoreError::Io(e.to_string()))?;
        Ok(Store {
            handle,
            thread: Some(thread),
        })
    }

    pub fn handle(&self) -> StoreHandle {
        self.handle.clone()
    }

    /// Stops the raft loop; waiting proposals get `Stopped`.
    pub fn stop(&mut self) {
        let _ = self.handle.tx.send(Event::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Writes a new single-node cluster's store, if the engine holds none yet.
/// The identity of the store in `engine`, if it has one.
pub fn read_ident(engine: &Engine) -> Result<Option<StoreIdent>, StoreError> {
    match rangestate::store_record(engine, IDENT_KEY)? {
        Some(b) => Ok(Some(
            StoreIdent::decode(&b[..]).map_err(|e| StoreError::Corrupt(format!("store ident: {e}")))?,
        )),
        None => Ok(None),
    }
}

/// Gives an empty store its identity (and, for a new cluster, its ranges).
fn bootstrap_if_needed(engine: &Engine, plan: &Bootstrap) -> Result<StoreIdent, StoreError> {
    if let Some(ident) = read_ident(engine)? {
        if let Bootstrap::Join(want) = plan {
            if want.cluster_id != ident.cluster_id {
                return Err(StoreError::WrongCluster {
                    store: ident.cluster_id,
                    cluster: want.cluster_id.clone(),
                });
            }
        }
        return Ok(ident);
    }
    let ident = match plan {
        Bootstrap::Existing => return Err(StoreError::NotInitialized),
        Bootstrap::Join(ident) => {
            let mut b = engine.batch();
            rangestate::set_store_record(&mut b, IDENT_KEY, &ident.encode_to_vec())?;
            engine.write(b, true)?;
            tracing::info!(cluster = %ident.cluster_id, node = ident.node_id, "joined a cluster");
            return Ok(ident.clone());
        }
        Bootstrap::NewCluster { .. } => StoreIdent {
            cluster_id: format!(
                "{:016x}",
                SystemClock.now_nanos() ^ (std::process::id() as u64).rotate_left(40)
            ),
            node_id: 1,
            store_id: 1,
        },
    };
    let mut b = engine.batch();
    let descs: Vec<RangeDescriptor> = BOOTSTRAP_RANGES
        .iter()
        .map(|&(range_id, start, end, _)| RangeDescriptor {
            range_id,
            start_key: start.to_vec(),
            end_key: end.to_vec(),
            replicas: vec![ReplicaDescriptor {
                node_id: ident.node_id,
                store_id: ident.store_id,
                replica_id: 1,
                r#type: replica_descriptor::Type::Voter as i32,
            }],
            next_replica_id: 2,
            generation: 0,
        })
        .collect();
    // The meta records of every range, in the system range's data.
    let mut meta_stats = storage::mvcc::MvccStats::default();
    crate::meta::bootstrap_records(&mut b, &mut meta_stats, &descs, storage::Timestamp::new(1, 0))?;
    for desc in &descs {
        let range_id = desc.range_id;
        rangestate::set_descriptor(&mut b, desc)?;
        rangestate::set_applied_state(
            &mut b,
            range_id,
            AppliedState {
                index: raft::BOOTSTRAP_INDEX,
                term: raft::BOOTSTRAP_TERM,
                stats: if range_id == SYSTEM_RANGE_ID {
                    meta_stats
                } else {
                    Default::default()
                },
                ..Default::default()
            },
        )?;
        raftlog::reset(&mut b, range_id, raft::BOOTSTRAP_INDEX, raft::BOOTSTRAP_TERM)?;
        raftlog::save_hard_state(
            &mut b,
            range_id,
            HardState {
                term: raft::BOOTSTRAP_TERM,
                vote: 0,
                commit: raft::BOOTSTRAP_INDEX,
            },
        )?;
        if range_id == SYSTEM_RANGE_ID {
            let addr = match plan {
                Bootstrap::NewCluster { addr } => addr.as_str(),
                _ => "",
            };
            node_ids::bootstrap(&mut b, ident.node_id, addr)?;
        }
        if range_id == ETCD_RANGE_ID {
            let rev = RevState { rev: 1, compact_rev: 0 };
            rangestate::set_local_record(&mut b, range_id, REV_STATE_SUFFIX, &rev.encode())?;
        }
    }
    rangestate::set_store_record(&mut b, IDENT_KEY, &ident.encode_to_vec())?;
    engine.write(b, true)?;
    tracing::info!(cluster = %ident.cluster_id, "bootstrapped a new single-node cluster");
    Ok(ident)
}
