//! A store: one engine, the replicas on it, and the MultiRaft scheduler that
//! drives them all from one thread.
//!
//! The scheduler's cycle: take every event waiting (proposals, later raft
//! messages), tick every replica if the store's one timer is due, then collect
//! a `Ready` from every replica with work, write all their entries and hard
//! states in ONE synced batch, hand their messages to the transport, report
//! them persisted, and apply their committed entries. A single thread owns all
//! replicas, so no replica needs a lock; readers see `ReplicaStatus` snapshots.
//! Requests queue while a sync is in flight and share the next one (group
//! commit).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use parking_lot::RwLock;
use prost::Message as _;
use proto::kvserver::{RaftCommand, StoreIdent};
use proto::storage::{replica_descriptor, RangeDescriptor, ReplicaDescriptor};
use storage::raftlog::{self, HardState};
use storage::rangestate::{self, AppliedState};
use storage::{Engine, EngineOptions};
use tokio::sync::oneshot;

use crate::command;
use crate::etcd::RevState;
use crate::hlc::{Clock, SystemClock, WallClock};
use crate::keyspace::{BOOTSTRAP_RANGES, ETCD_RANGE_ID};
use crate::metrics::Metrics;
use crate::replica::{ApplyOutcome, ProposeError, Replica, ReplicaStatus, REV_STATE_SUFFIX};
use crate::StoreError;

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
}

impl StoreConfig {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        StoreConfig {
            dir: dir.into(),
            tick: Duration::from_millis(100),
            election_ticks: 10,
            heartbeat_ticks: 1,
            clock_rate_error: 0.01,
        }
    }

    /// How long a lease lasts after the send time of its acknowledged round:
    /// `(election_ticks - 1) * tick * (1 - r) / (1 + r)`.
    pub fn lease_duration(&self) -> Duration {
        let r = self.clock_rate_error;
        self.tick
            .mul_f64(self.election_ticks.saturating_sub(1) as f64 * (1.0 - r) / (1.0 + r))
    }
}

enum Event {
    Propose {
        range_id: u64,
        cmd: RaftCommand,
        reply: oneshot::Sender<Result<ApplyOutcome, ProposeError>>,
    },
    Stop,
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
}

impl StoreHandle {
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

    pub fn status(&self, range_id: u64) -> Option<ReplicaStatus> {
        self.statuses.read().get(&range_id).map(|s| s.read().clone())
    }

    /// Proposes `cmd` on `range_id` (stamped with this node's clock) and waits
    /// until it applies, `timeout` passes (outcome unknown) or it is refused.
    ///
    /// While the range has no leader (an election in progress), the command is
    /// not proposed and is retried until `timeout`: that is always safe.
    pub async fn propose(
        &self,
        range_id: u64,
        mut cmd: RaftCommand,
        timeout: Duration,
    ) -> Result<ApplyOutcome, ProposeError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let ts = self.clock.now().map_err(|e| ProposeError::Clock(e.to_string()))?;
            cmd.proposer_ts = Some(ts.into());
            let (reply, rx) = oneshot::channel();
            self.tx
                .send(Event::Propose {
                    range_id,
                    cmd: cmd.clone(),
                    reply,
                })
                .map_err(|_| ProposeError::Stopped)?;
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
        Self::start_with_clock(cfg, Arc::new(SystemClock))
    }

    pub fn start_with_clock(cfg: StoreConfig, wall: Arc<dyn WallClock>) -> Result<Store, StoreError> {
        let engine = Engine::open(&cfg.dir, EngineOptions::default())?;
        let ident = bootstrap_if_needed(&engine)?;
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
        for desc in rangestate::all_descriptors(&engine)? {
            let Some(me) = desc.replicas.iter().find(|r| r.store_id == ident.store_id) else {
                continue;
            };
            let name = BOOTSTRAP_RANGES
                .iter()
                .find(|(id, ..)| *id == desc.range_id)
                .map_or_else(|| format!("r{}", desc.range_id), |(.., n)| n.to_string());
            let mut rc = raft::Config::new(me.replica_id);
            rc.election_ticks = cfg.election_ticks;
            rc.heartbeat_ticks = cfg.heartbeat_ticks;
            rc.seed = clock.physical() ^ desc.range_id.rotate_left(32) ^ me.replica_id;
            let mut rep = Replica::new(
                engine.clone(),
                desc.clone(),
                name,
                me.replica_id,
                rc,
                cfg.lease_duration(),
            )?;
            if rep.is_sole_voter() {
                // Nobody else can hold a lease: no reason to wait out a timeout.
                rep.raw.campaign();
            }
            statuses.write().insert(desc.range_id, rep.status.clone());
            replicas.insert(desc.range_id, rep);
        }
        metrics.ranges.set(replicas.len() as u64);
        let (tx, rx) = crossbeam_channel::unbounded();
        let handle = StoreHandle {
            tx,
            engine: engine.clone(),
            clock: clock.clone(),
            statuses,
            metrics: metrics.clone(),
            ident,
        };
        let sched = Scheduler {
            cfg,
            engine,
            rx,
            replicas,
            clock,
            metrics,
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
fn bootstrap_if_needed(engine: &Engine) -> Result<StoreIdent, StoreError> {
    if let Some(b) = rangestate::store_record(engine, IDENT_KEY)? {
        return StoreIdent::decode(&b[..]).map_err(|e| StoreError::Corrupt(format!("store ident: {e}")));
    }
    let ident = StoreIdent {
        cluster_id: format!(
            "{:016x}",
            SystemClock.now_nanos() ^ (std::process::id() as u64).rotate_left(40)
        ),
        node_id: 1,
        store_id: 1,
    };
    let mut b = engine.batch();
    for &(range_id, start, end, _) in BOOTSTRAP_RANGES {
        let desc = RangeDescriptor {
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
        };
        rangestate::set_descriptor(&mut b, &desc)?;
        rangestate::set_applied_state(
            &mut b,
            range_id,
            AppliedState {
                index: raft::BOOTSTRAP_INDEX,
                term: raft::BOOTSTRAP_TERM,
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

struct Scheduler {
    cfg: StoreConfig,
    engine: Engine,
    rx: Receiver<Event>,
    replicas: BTreeMap<u64, Replica>,
    clock: Arc<Clock>,
    metrics: Arc<Metrics>,
}

/// Events handled per cycle at most, so ticks are never starved.
const MAX_EVENTS_PER_CYCLE: usize = 4096;

impl Scheduler {
    fn run(mut self) {
        let mut next_tick = Instant::now() + self.cfg.tick;
        let now = Instant::now();
        for r in self.replicas.values_mut() {
            r.publish_status(now);
        }
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            let mut stop = false;
            match self.rx.recv_timeout(wait) {
                Ok(ev) => stop |= self.handle(ev),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => stop = true,
            }
            for _ in 0..MAX_EVENTS_PER_CYCLE {
                match self.rx.try_recv() {
                    Ok(ev) => stop |= self.handle(ev),
                    Err(_) => break,
                }
            }
            if stop {
                break;
            }
            let now = Instant::now();
            if now >= next_tick {
                for r in self.replicas.values_mut() {
                    r.raw.tick();
                }
                self.metrics.raft_ticks.inc();
                next_tick += self.cfg.tick;
                if next_tick < now {
                    next_tick = now + self.cfg.tick; // fell behind: don't burst
                }
            }
            if let Err(e) = self.process_readies() {
                tracing::error!(error = %e, "raft loop stopped: the store can no longer write");
                break;
            }
        }
        for r in self.replicas.values_mut() {
            r.fail_pending(ProposeError::Stopped);
            let mut s = r.status.write();
            s.leader_ready = false;
            s.lease_until = None;
        }
    }

    /// Returns whether to stop.
    fn handle(&mut self, ev: Event) -> bool {
        match ev {
            Event::Propose { range_id, cmd, reply } => match self.replicas.get_mut(&range_id) {
                Some(r) => r.propose(cmd, reply, &self.metrics),
                None => {
                    let _ = reply.send(Err(ProposeError::NoSuchRange(range_id)));
                }
            },
            Event::Stop => return true,
        }
        false
    }

    fn process_readies(&mut self) -> Result<(), StoreError> {
        loop {
            let mut batch = self.engine.batch();
            let mut readies = Vec::new();
            let mut entries = 0u64;
            // Only entries, a snapshot, or a new term or vote must be synced:
            // a commit index alone may be lost in a crash (raft relearns it).
            let mut must_sync = false;
            let now = Instant::now();
            for (&id, r) in self.replicas.iter_mut() {
                if !r.raw.has_ready() {
                    continue;
                }
                let rd = r.raw.ready();
                if let Some(seq) = rd.heartbeat_round {
                    r.stamp_heartbeat(seq, now);
                }
                // A single-node store has no peers to send to (the cluster
                // issue adds the transport).
                self.metrics.raft_messages_sent.add(rd.messages.len() as u64);
                if !rd.entries.is_empty() {
                    let es: Vec<_> = rd.entries.iter().map(command::encode_entry).collect();
                    raftlog::append(&mut batch, id, &es)?;
                    entries += es.len() as u64;
                    must_sync = true;
                }
                if let Some(hs) = rd.hard_state {
                    if (hs.term, hs.vote) != r.synced_term_vote {
                        must_sync = true;
                        r.synced_term_vote = (hs.term, hs.vote);
                    }
                    raftlog::save_hard_state(
                        &mut batch,
                        id,
                        HardState {
                            term: hs.term,
                            vote: hs.vote,
                            commit: hs.commit,
                        },
                    )?;
                }
                readies.push((id, rd));
            }
            if readies.is_empty() {
                return Ok(());
            }
            if must_sync {
                // ONE synced write for every range's entries and hard state.
                self.engine.write(batch, true)?;
                self.metrics.raft_fsyncs.inc();
                self.metrics.raft_entries_persisted.add(entries);
                self.metrics.raft_entries_per_fsync.observe(entries as f64);
            } else if !batch.is_empty() {
                self.engine.write(batch, false)?;
            }
            for (id, rd) in readies {
                let Some(r) = self.replicas.get_mut(&id) else { continue };
                if let Some(e) = rd.entries.last() {
                    r.raw.storage_mut().appended(e.index);
                }
                r.raw.on_persisted(rd.number);
                self.metrics.raft_messages_sent.add(rd.persisted_messages.len() as u64);
                r.apply(rd.committed_entries, &self.clock, &self.metrics)?;
                r.publish_status(Instant::now());
            }
        }
    }
}
