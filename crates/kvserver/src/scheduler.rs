//! The MultiRaft scheduler: one thread that drives every replica of a store.
//!
//! Its cycle: take every event waiting (proposals, raft messages from other
//! stores, snapshot outcomes), tick every replica if the store's one timer is
//! due, then collect a `Ready` from every replica with work, write all their
//! entries and hard states in ONE batch (synced if it holds entries or a new
//! term or vote), hand their messages to the transport grouped per
//! destination store, report them persisted, and apply committed entries.
//! One thread owns all replicas, so no replica needs a lock. Requests queue
//! while a sync is in flight and share the next one (group commit).
//!
//! Every half second the leaseholder of each range also runs the replicate
//! queue: while the range has fewer voters than min(3, live stores), add a
//! learner on a live store without a replica, and promote it once caught up.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use parking_lot::{Mutex, RwLock};
use prost::Message as _;
use proto::storage::{replica_descriptor, RangeDescriptor, ReplicaDescriptor};
use proto::transport::{RaftMsg, SnapshotHandle};
use raft::{ConfChange, ConfChangeKind, ConfChangeSingle, MessageBody, Role};
use storage::raftlog::{self, HardState};
use storage::Engine;

use crate::command;
use crate::hlc::Clock;
use crate::metrics::Metrics;
use crate::replica::{ProposeError, Replica, ReplicaStatus};
use crate::store::{Event, StoreConfig};
use crate::transport::{message_from_pb, message_to_pb, Transport};
use crate::StoreError;

/// Events handled per cycle at most, so ticks are never starved.
const MAX_EVENTS_PER_CYCLE: usize = 4096;
/// How often leaseholders look at their ranges' replication.
const REPLICATE_EVERY: Duration = Duration::from_millis(500);
/// How often a store pings every other store it knows (liveness).
const PING_EVERY: Duration = Duration::from_secs(1);
/// A store heard from within this long counts as live.
pub const LIVENESS_WINDOW: Duration = Duration::from_secs(3);

pub(crate) struct Scheduler {
    pub cfg: StoreConfig,
    pub engine: Engine,
    pub rx: Receiver<Event>,
    pub replicas: BTreeMap<u64, Replica>,
    pub statuses: Arc<RwLock<BTreeMap<u64, Arc<RwLock<ReplicaStatus>>>>>,
    pub clock: Arc<Clock>,
    pub metrics: Arc<Metrics>,
    pub transport: Arc<dyn Transport>,
    pub store_id: u64,
    /// Stores of the cluster and when this store last heard from each.
    pub last_heard: Arc<Mutex<HashMap<u64, Instant>>>,
    pub known_stores: Arc<RwLock<BTreeMap<u64, String>>>,
    pub next_replicate: Instant,
    pub next_ping: Instant,
    /// To send events to itself (snapshot outcomes).
    pub events: crossbeam_channel::Sender<Event>,
}

impl Scheduler {
    pub fn run(mut self) {
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
            if now >= self.next_ping {
                self.next_ping = now + PING_EVERY;
                // An empty batch: tells its receiver this store is alive.
                let stores: Vec<u64> = self
                    .known_stores
                    .read()
                    .keys()
                    .copied()
                    .filter(|&s| s != self.store_id)
                    .collect();
                for s in stores {
                    self.transport.send(s, Vec::new());
                }
            }
            if now >= self.next_replicate {
                self.next_replicate = now + REPLICATE_EVERY;
                self.replicate_queue();
                let threshold = self.cfg.log_truncation_threshold;
                for r in self.replicas.values_mut() {
                    match r.maybe_truncate_log(threshold) {
                        Ok(Some(i)) => tracing::debug!(range = r.range_id, index = i, "raft log truncated"),
                        Ok(None) => {}
                        Err(e) => tracing::warn!(range = r.range_id, error = %e, "raft log truncation failed"),
                    }
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
            Event::RaftMessages { from_store, msgs } => {
                self.metrics.raft_messages_received.add(msgs.len() as u64);
                for m in msgs {
                    self.step(from_store, m);
                }
            }
            Event::SnapshotDone { range_id, to, ok } => {
                if let Some(r) = self.replicas.get_mut(&range_id) {
                    r.raw.report_snapshot(to, ok);
                }
            }
            Event::Stop => return true,
        }
        false
    }

    /// Steps a message from another store into its replica, creating an
    /// uninitialized replica (it will receive a snapshot) if there is none.
    fn step(&mut self, from_store: u64, m: RaftMsg) {
        let (range_id, msg) = match message_from_pb(m) {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(from_store, error = %e, "dropping a malformed raft message");
                return;
            }
        };
        if !self.replicas.contains_key(&range_id) {
            if let Err(e) = self.create_replica(range_id, msg.to) {
                tracing::warn!(range_id, error = %e, "cannot create a replica for an incoming message");
                return;
            }
        }
        let Some(r) = self.replicas.get_mut(&range_id) else {
            return;
        };
        if msg.to != r.replica_id {
            return; // for a replica this store no longer (or never) had
        }
        r.peers.insert(msg.from, from_store);
        r.raw.step(msg);
    }

    fn create_replica(&mut self, range_id: u64, replica_id: u64) -> Result<(), StoreError> {
        let desc = RangeDescriptor {
            range_id,
            ..Default::default()
        };
        let rc = self.raft_config(replica_id, range_id);
        let name = crate::keyspace::BOOTSTRAP_RANGES
            .iter()
            .find(|(id, ..)| *id == range_id)
            .map_or_else(|| format!("r{range_id}"), |(.., n)| n.to_string());
        let rep = Replica::new(
            self.engine.clone(),
            desc,
            name,
            replica_id,
            rc,
            self.cfg.lease_duration(),
        )?;
        self.statuses.write().insert(range_id, rep.status.clone());
        self.replicas.insert(range_id, rep);
        self.metrics.ranges.set(self.replicas.len() as u64);
        tracing::info!(range_id, replica_id, "created a replica, awaiting a snapshot");
        Ok(())
    }

    pub fn raft_config(&self, replica_id: u64, range_id: u64) -> raft::Config {
        let mut rc = raft::Config::new(replica_id);
        rc.election_ticks = self.cfg.election_ticks;
        rc.heartbeat_ticks = self.cfg.heartbeat_ticks;
        rc.seed = self.clock.physical() ^ range_id.rotate_left(32) ^ replica_id;
        rc
    }

    /// The stores worth placing replicas on: by the liveness records when
    /// this store has a replica of the system range with records, else by
    /// whether this store hears from them (transport pings).
    fn live_stores(&self) -> Vec<u64> {
        let records = self
            .replicas
            .contains_key(&crate::keyspace::SYSTEM_RANGE_ID)
            .then(|| {
                storage::rangestate::local_record(
                    &self.engine,
                    crate::keyspace::SYSTEM_RANGE_ID,
                    crate::replica::LIVENESS_SUFFIX,
                )
                .ok()
                .flatten()
                .and_then(|b| proto::kvserver::LivenessRecord::decode(&b[..]).ok())
            })
            .flatten()
            .filter(|r| !r.nodes.is_empty());
        let now = Instant::now();
        let wall = self.clock.physical() as i64;
        let heard = self.last_heard.lock();
        let mut live: Vec<u64> = self
            .known_stores
            .read()
            .keys()
            .copied()
            .filter(|s| {
                *s == self.store_id
                    || match &records {
                        Some(r) => r.nodes.iter().any(|l| l.node_id == *s && l.expiration_nanos > wall),
                        None => heard.get(s).is_some_and(|t| now.duration_since(*t) < LIVENESS_WINDOW),
                    }
            })
            .collect();
        if !live.contains(&self.store_id) {
            live.push(self.store_id);
        }
        live
    }

    /// Adds replicas to under-replicated ranges this store leads.
    fn replicate_queue(&mut self) {
        let live = self.live_stores();
        let target = live.len().min(3);
        for r in self.replicas.values_mut() {
            if r.raw.role() != Role::Leader || !r.raw.leader_ready() || r.raw.raft.conf_change_pending() {
                continue;
            }
            let cs = r.raw.conf_state();
            if cs.is_joint() {
                continue;
            }
            // Promote a learner that has caught up.
            let caught_up = cs.learners.iter().copied().find(|id| {
                r.raw
                    .raft
                    .trk
                    .progress
                    .get(id)
                    .is_some_and(|p| p.matched + 2 >= r.raw.raft.log.last_index())
            });
            let mut desc = r.desc.clone();
            let cc = if let Some(id) = caught_up {
                for rep in &mut desc.replicas {
                    if rep.replica_id == id {
                        rep.r#type = replica_descriptor::Type::Voter as i32;
                    }
                }
                ConfChange {
                    changes: vec![ConfChangeSingle {
                        kind: ConfChangeKind::AddVoter,
                        node: id,
                    }],
                    context: desc.encode_to_vec(),
                }
            } else if cs.voters.len() < target && cs.learners.is_empty() {
                let have: Vec<u64> = desc.replicas.iter().map(|x| x.store_id).collect();
                let Some(&store) = live.iter().find(|s| !have.contains(s)) else {
                    continue;
                };
                let id = desc.next_replica_id.max(1);
                desc.next_replica_id = id + 1;
                desc.replicas.push(ReplicaDescriptor {
                    node_id: store,
                    store_id: store,
                    replica_id: id,
                    r#type: replica_descriptor::Type::Learner as i32,
                });
                ConfChange {
                    changes: vec![ConfChangeSingle {
                        kind: ConfChangeKind::AddLearner,
                        node: id,
                    }],
                    context: desc.encode_to_vec(),
                }
            } else {
                continue;
            };
            let what = format!("{:?}", cc.changes);
            match r.propose_conf_change(cc) {
                Ok(()) => tracing::info!(range = r.range_id, change = %what, "replicate queue"),
                Err(e) => tracing::debug!(range = r.range_id, error = %e, "replicate queue: change refused"),
            }
        }
    }

    /// Groups messages by destination store; snapshots go on their own RPC.
    fn route(
        &self,
        r: &Replica,
        msgs: Vec<raft::Message>,
        out: &mut BTreeMap<u64, Vec<RaftMsg>>,
        events: &crossbeam_channel::Sender<Event>,
    ) {
        for m in msgs {
            let Some(store) = r.store_of(m.to) else {
                tracing::debug!(
                    range = r.range_id,
                    to = m.to,
                    "no store known for a replica: message dropped"
                );
                continue;
            };
            if let MessageBody::Snapshot { snapshot } = &m.body {
                let Ok(handle) = SnapshotHandle::decode(&snapshot.data[..]) else {
                    continue;
                };
                let meta = handle.meta.clone().unwrap_or_default();
                let dir = Path::new(&handle.dir).to_path_buf();
                let (range_id, to) = (r.range_id, m.to);
                let ev = events.clone();
                let cleanup = dir.clone();
                self.transport.send_snapshot(
                    store,
                    message_to_pb(r.range_id, &m),
                    meta,
                    dir,
                    Box::new(move |ok| {
                        let _ = std::fs::remove_dir_all(&cleanup);
                        let _ = ev.send(Event::SnapshotDone { range_id, to, ok });
                    }),
                );
                continue;
            }
            out.entry(store).or_default().push(message_to_pb(r.range_id, &m));
        }
    }

    fn send(&self, out: BTreeMap<u64, Vec<RaftMsg>>) {
        for (store, msgs) in out {
            self.metrics.raft_messages_sent.add(msgs.len() as u64);
            self.transport.send(store, msgs);
        }
    }

    fn process_readies(&mut self) -> Result<(), StoreError> {
        let events = self.events_sender();
        loop {
            let mut batch = self.engine.batch();
            let mut readies = Vec::new();
            let mut entries = 0u64;
            // Only entries, a snapshot, or a new term or vote must be synced:
            // a commit index alone may be lost in a crash (raft relearns it).
            let mut must_sync = false;
            let mut out: BTreeMap<u64, Vec<RaftMsg>> = BTreeMap::new();
            let now = Instant::now();
            let ids: Vec<u64> = self.replicas.keys().copied().collect();
            for id in ids {
                let Some(r) = self.replicas.get_mut(&id) else { continue };
                if !r.raw.has_ready() {
                    continue;
                }
                let mut rd = r.raw.ready();
                if let Some(seq) = rd.heartbeat_round {
                    r.stamp_heartbeat(seq, now);
                }
                if let Some(snap) = &rd.snapshot {
                    // Applied at once (its own synced writes), before the entries
                    // that follow it are appended to this cycle's batch.
                    let handle = SnapshotHandle::decode(&snap.data[..])
                        .map_err(|e| StoreError::Corrupt(format!("snapshot handle: {e}")))?;
                    let meta = handle.meta.unwrap_or_default();
                    let hs = rd.hard_state.unwrap_or_else(|| r.raw.raft.hard_state());
                    storage::snapshot::apply_snapshot(
                        &self.engine,
                        Path::new(&handle.dir),
                        &meta,
                        Some(HardState {
                            term: hs.term,
                            vote: hs.vote,
                            commit: hs.commit.max(snap.meta.index),
                        }),
                    )?;
                    r.reload_after_snapshot()?;
                    r.synced_term_vote = (hs.term, hs.vote);
                    self.metrics.snapshots_applied.inc();
                    tracing::info!(range = id, index = snap.meta.index, "applied a snapshot");
                }
                let msgs = std::mem::take(&mut rd.messages);
                let r = &self.replicas[&id];
                self.route(r, msgs, &mut out, &events);
                let r = self.replicas.get_mut(&id).expect("replica present");
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
            // Leaders' appends and heartbeats leave before the sync.
            self.send(std::mem::take(&mut out));
            if readies.is_empty() {
                return Ok(());
            }
            if must_sync {
                // ONE synced write for every range's entries and hard state;
                // it also makes every applied state written before it durable.
                for r in self.replicas.values_mut() {
                    r.durable_applied = r.applied_index();
                }
                self.engine.write(batch, true)?;
                self.metrics.raft_fsyncs.inc();
                self.metrics.raft_entries_persisted.add(entries);
                self.metrics.raft_entries_per_fsync.observe(entries as f64);
            } else if !batch.is_empty() {
                self.engine.write(batch, false)?;
            }
            for (id, mut rd) in readies {
                let Some(r) = self.replicas.get_mut(&id) else { continue };
                if let Some(e) = rd.entries.last() {
                    r.raw.storage_mut().appended(e.index);
                }
                r.raw.on_persisted(rd.number);
                let msgs = std::mem::take(&mut rd.persisted_messages);
                r.apply(rd.committed_entries, &self.clock, &self.metrics)?;
                r.publish_status(Instant::now());
                let r = &self.replicas[&id];
                self.route(r, msgs, &mut out, &events);
            }
            self.send(std::mem::take(&mut out));
        }
    }

    fn events_sender(&self) -> crossbeam_channel::Sender<Event> {
        self.events.clone()
    }
}
