//! The MultiRaft scheduler: one thread that drives every replica of a store.
//!
//! Its cycle: take every event waiting (proposals, raft messages from other
//! stores, snapshot outcomes, leader transfers) and every batch the log
//! writer reports landed, tick every replica that needs it when the store's
//! one timer (`ticker`) says so, run the periodic queues (`replicate_queue`,
//! `log_truncation`) and the store liveness requests, then:
//! - *finish* the cycles whose batch landed, oldest first: report them
//!   persisted to raft, send the answers that promise durable state, apply
//!   committed entries (`apply`), start split halves, drop merged replicas;
//! - *collect* a `Ready` from every replica something touched: their entries
//!   and hard states go into ONE batch (synced if it holds entries or a new
//!   term or vote), their messages to the transport grouped per destination
//!   store (`router`), and the batch to the commit pipeline (`log_writer`),
//!   which writes it while this loop goes on. What arrives during a sync
//!   joins the next batch (group commit across ranges), and that batch is
//!   handed over at once, up to `log_writer::MAX_IN_FLIGHT` deep.
//!
//! Writes that replace a replica's raft state wholesale (a snapshot) or write
//! another range's (splits, merges, subsumption) wait until every batch in
//! flight has landed, so no older batch lands over them.
//!
//! One thread owns all replicas, so no replica needs a lock. This module is
//! the loop and nothing else: collecting and finishing cycles is `cycle`'s,
//! and what a queue decides, how an entry applies and where a message goes
//! live in their own modules.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use parking_lot::{Mutex, RwLock};
use proto::storage::RangeDescriptor;
use proto::transport::RaftMsg;
use storage::Engine;

use crate::cycle::{Cycle, Gathering};
use crate::hlc::Clock;
use crate::liveness;
use crate::log_writer::LogWriter;
use crate::metrics::Metrics;
use crate::replica::{ProposeError, Replica, ReplicaStatus};
use crate::router::Outbox;
use crate::store::{Event, StoreConfig};
use crate::ticker::TickTimer;
use crate::transport::{message_from_pb, Transport};
use crate::{log_truncation, replicate_queue, StoreError};

/// Events handled per cycle at most, so ticks are never starved.
const MAX_EVENTS_PER_CYCLE: usize = 4096;
/// How often leaseholders look at their ranges' replication (and every
/// replica at its log's length).
const QUEUES_EVERY: Duration = Duration::from_millis(500);
/// How often a store asks every other store it knows for support (in
/// ticks): several requests per support interval, so one lost message does
/// not end a support.
const SUPPORT_EVERY_TICKS: u32 = 2;

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
    pub next_queues: Instant,
    pub next_support: Instant,
    /// This store's liveness (leases rest on it).
    pub liveness: Arc<crate::store_liveness::StoreLiveness>,
    /// Messages of this cycle so far (store liveness, then raft), sent in one
    /// frame per store when the cycle's readies are collected.
    pub out: Outbox,
    /// Replicas that may have a `Ready`: those an event, a tick or a queue
    /// touched since their last one. A cycle asks only these, so an idle
    /// range costs nothing however many there are.
    pub dirty: std::collections::BTreeSet<u64>,
    /// Replicas that needed ticks when last looked at. A replica's need
    /// only arises from an input, which puts it in `dirty`: a tick visits
    /// these and the dirty ones, not every replica.
    pub ticking: std::collections::BTreeSet<u64>,
    /// Raised after every pass that handled a `Ready` (see
    /// `StoreHandle::status_version`).
    pub status_version: Arc<std::sync::atomic::AtomicU64>,
    /// The applied index of this store's replica of the etcd range, for
    /// the watches fed from it (`StoreHandle::etcd_applied`).
    pub etcd_applied: Arc<tokio::sync::watch::Sender<u64>>,
    /// To send events to itself (snapshot outcomes).
    pub events: crossbeam_channel::Sender<Event>,
    /// Set when the loop stops on an error: why.
    pub stopped: Arc<Mutex<Option<String>>>,
    /// Spans of snapshots stepped into replicas and not yet applied.
    pub stepped_snapshots: Vec<(u64, Vec<u8>, Vec<u8>)>,
    /// Ranges merged away here (a cache of their tombstones).
    pub tombstones: std::collections::HashSet<u64>,
    /// Ticks taken since this process started the store.
    pub ticks_taken: u64,
    /// The commit pipeline.
    pub writer: LogWriter,
    /// The cycle handed to the writer and not finished yet (one at most).
    pub cycles: std::collections::VecDeque<Cycle>,
    /// What was collected while a batch was in flight: the next batch.
    pub gathering: Option<Gathering>,
    /// A cycle is being finished (see `finish`).
    pub finishing: bool,
    /// Replicas that applied entries since the last synced batch was handed
    /// over (that batch makes what they applied durable).
    pub applied_unsynced: Vec<u64>,
    /// Moving average of how long a synced write takes, in seconds: the
    /// pipeline is used only when it is at least `cfg.pipeline_min_sync`.
    pub sync_average: f64,
}

impl Scheduler {
    pub fn run(mut self) {
        let mut ticker = TickTimer::new(self.cfg.tick, Instant::now());
        let now = Instant::now();
        for r in self.replicas.values_mut() {
            r.publish_status(now);
        }
        let rx = self.rx.clone();
        let done = self.writer.done().clone();
        let mut failed = false;
        loop {
            // Replicas waiting for a collection the pipeline has room for,
            // or landed batches to finish: no sleeping.
            let busy = !self.dirty.is_empty() || self.writer.has_landed();
            let wait = if busy {
                Duration::ZERO
            } else {
                ticker.wait(Instant::now())
            };
            let mut stop = false;
            crossbeam_channel::select! {
                recv(rx) -> ev => match ev {
                    Ok(ev) => stop |= self.handle(ev),
                    Err(_) => stop = true,
                },
                recv(done) -> l => match l {
                    Ok(l) => self.writer.record(l),
                    // The writer stopped after a failed write, reported
                    // before this: finishing it stops the store below.
                    Err(_) => stop = !self.writer.has_landed(),
                },
                default(wait) => {}
            }
            for _ in 0..MAX_EVENTS_PER_CYCLE {
                match self.rx.try_recv() {
                    Ok(ev) => stop |= self.handle(ev),
                    Err(_) => break,
                }
            }
            self.writer.poll();
            if stop {
                break;
            }
            // Taken after the events: a message stepped in this cycle was
            // heard before this tick, never after it.
            let now = Instant::now();
            if ticker.take(now) {
                // Support that expired first: a follower released by it may
                // start its failover on this very tick.
                let withdrawn = self.liveness.withdraw_expired(now);
                for (store, epoch) in withdrawn {
                    self.support_withdrawn(store, epoch);
                }
                // A quiesced leader and its fortified followers need no tick.
                let mut ticked = 0u64;
                let visit: Vec<u64> = self.ticking.union(&self.dirty).copied().collect();
                for id in visit {
                    match self.replicas.get_mut(&id) {
                        Some(r) if r.raw.needs_tick() => {
                            r.raw.tick();
                            self.ticking.insert(id);
                            self.dirty.insert(id);
                            ticked += 1;
                        }
                        _ => {
                            self.ticking.remove(&id);
                        }
                    }
                }
                self.ticks_taken += 1;
                self.metrics.raft_ticks.inc();
                self.metrics.raft_replica_ticks.add(ticked);
                self.metrics.ranges_quiescent.set(self.replicas.len() as u64 - ticked);
            }
            if now >= self.next_support {
                self.next_support = now + self.cfg.tick * SUPPORT_EVERY_TICKS;
                self.request_support(now);
            }
            if now >= self.next_queues {
                self.next_queues = now + QUEUES_EVERY;
                let live = self.live_stores();
                let threshold = self.cfg.log_truncation_threshold;
                for (&id, r) in self.replicas.iter_mut() {
                    // A status (it copies the leader's progress) only for a
                    // replica a queue may act on: a leader with replicas to
                    // add or promote, or a log long enough to truncate.
                    let replicate = r.raw.role() == raft::Role::Leader
                        && !replicate_queue::fully_replicated(&r.raw.conf_state(), live.len());
                    let (truncated, _) = r.raw.storage().bounds();
                    let truncate = r.applied_index().saturating_sub(truncated) > threshold;
                    if !replicate && !truncate {
                        continue;
                    }
                    let st = r.raw.status();
                    replicate_queue::consider(r, &st, &live);
                    log_truncation::consider(r, &st, threshold);
                    self.dirty.insert(id);
                }
            }
            let processed = self.process_readies();
            if let Err(e) = processed {
                tracing::error!(
                    error = %e,
                    "the store stops: its raft loop can no longer persist or apply; nothing more is acknowledged or served from it"
                );
                *self.stopped.lock() = Some(format!("the store stopped: {e}"));
                failed = true;
                break;
            }
        }
        // Asked to stop: what was collected lands and is finished first, so
        // its proposers hear how it went. Stopped by an error: nothing more
        // is finished (a cycle the error cut short left entries unapplied;
        // applying later ones would skip them).
        if !failed {
            if let Err(e) = self.drain() {
                tracing::warn!(error = %e, "stopping with batches that did not land");
            }
        }
        for r in self.replicas.values_mut() {
            r.fail_pending(ProposeError::Stopped);
            let mut s = r.status.write();
            s.leader_ready = false;
            s.lease = None;
        }
    }

    /// Returns whether to stop.
    fn handle(&mut self, ev: Event) -> bool {
        match ev {
            Event::Propose { range_id, cmd, reply } => match self.replicas.get_mut(&range_id) {
                Some(r) => {
                    r.propose(*cmd, reply, &self.metrics);
                    self.dirty.insert(range_id);
                }
                None => {
                    let _ = reply.send(Err(ProposeError::NoSuchRange(range_id)));
                }
            },
            Event::RaftMessages { from_store, msgs } => {
                self.metrics.raft_messages_received.add(msgs.len() as u64);
                for m in msgs {
                    if m.range_id != 0 {
                        self.step(from_store, m);
                    } else if let Some(proto::transport::raft_msg::Body::CoalescedHeartbeats(c)) = m.body {
                        for hb in crate::transport::uncoalesce_heartbeats(c) {
                            self.step(from_store, hb);
                        }
                    } else {
                        self.step_support(from_store, m);
                    }
                }
            }
            Event::SnapshotDone { range_id, to, ok } => {
                if let Some(r) = self.replicas.get_mut(&range_id) {
                    r.raw.report_snapshot(to, ok);
                    self.dirty.insert(range_id);
                }
            }
            Event::TransferLeader { range_id, to_store } => {
                if let Some(r) = self.replicas.get_mut(&range_id) {
                    match r.desc.replicas.iter().find(|x| x.store_id == to_store) {
                        Some(to) => {
                            let to = to.replica_id;
                            tracing::info!(range = range_id, to_store, "transferring leadership");
                            r.transfer_leader(to);
                            self.dirty.insert(range_id);
                        }
                        None => tracing::warn!(range = range_id, to_store, "no replica there to transfer to"),
                    }
                }
            }
            Event::Stop => return true,
        }
        false
    }

    /// Asks every other known store for support (it also tells each this
    /// store is alive).
    fn request_support(&mut self, now: Instant) {
        let stores: Vec<u64> = self.known_stores.read().keys().copied().collect();
        for m in self.liveness.requests(stores.into_iter(), now) {
            self.metrics.support_messages_sent.inc();
            self.out.push(m.to(), crate::transport::support_to_pb(&m));
        }
    }

    /// A store liveness message from `from_store`.
    fn step_support(&mut self, from_store: u64, m: RaftMsg) {
        let Some(sm) = crate::transport::support_from_pb(&m) else {
            tracing::warn!(from_store, "dropping a malformed store liveness message");
            return;
        };
        if sm.from() != from_store || sm.to() != self.store_id {
            return; // misaddressed: not this store's business
        }
        let before = self.liveness.epoch();
        let (answer, ended) = self.liveness.handle(sm, Instant::now());
        if let Some(a) = answer {
            self.metrics.support_messages_sent.inc();
            self.out.push(a.to(), crate::transport::support_to_pb(&a));
        }
        if let Some((store, epoch)) = ended {
            self.support_withdrawn(store, epoch);
        }
        let after = self.liveness.epoch();
        if after != before {
            // Our epoch was withdrawn somewhere: every lease of ours must be
            // fortified again under the new one.
            tracing::info!(epoch = format_args!("{after:#x}"), "store liveness epoch raised");
            for (&id, r) in self.replicas.iter_mut() {
                r.raw.set_store_epoch(after);
                self.dirty.insert(id);
            }
        }
    }

    /// This store no longer supports `store` at `epoch`: every replica here
    /// that promised a leader there is released (and may start a failover).
    fn support_withdrawn(&mut self, store: u64, epoch: u64) {
        self.metrics.support_withdrawn.inc();
        for (&id, r) in self.replicas.iter_mut() {
            if let Some(f) = r.raw.fortification() {
                if f.epoch == epoch && r.store_of(f.leader) == Some(store) {
                    r.raw.support_withdrawn(f.leader, epoch);
                    self.dirty.insert(id);
                }
            }
        }
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
            // A range merged away here never comes back (its id is never
            // used again): a late message for it is dropped.
            if self.tombstones.contains(&range_id) || crate::merge::tombstoned(&self.engine, range_id).unwrap_or(false)
            {
                self.tombstones.insert(range_id);
                return;
            }
            if let Err(e) = self.create_replica(range_id, msg.to) {
                tracing::warn!(range_id, error = %e, "cannot create a replica for an incoming message");
                return;
            }
        }
        if let raft::MessageBody::Snapshot { snapshot } = &msg.body {
            if let Some(other) = self.overlapping_replica(range_id, snapshot) {
                // Most often the right-hand half of a split this store has
                // not applied yet: its left-hand range still holds the span.
                tracing::debug!(range_id, other, "dropping a snapshot overlapping another replica here");
                use prost::Message as _;
                if let Ok(h) = proto::transport::SnapshotHandle::decode(&snapshot.data[..]) {
                    // Its staged files: the sender will send another.
                    let _ = std::fs::remove_dir_all(&h.dir);
                }
                return;
            }
        }
        let Some(r) = self.replicas.get_mut(&range_id) else {
            return;
        };
        if msg.to != r.replica_id {
            return; // for a replica this store no longer (or never) had
        }
        if let raft::MessageBody::Fortify { epoch } = msg.body {
            // A promise may only be made while this store supports the
            // leader's store at that epoch (the leader asks again).
            if !self.liveness.supports(from_store, epoch) {
                return;
            }
        }
        r.peers.insert(msg.from, from_store);
        r.raw.step(msg);
        self.dirty.insert(range_id);
    }

    /// Another initialized replica here whose span overlaps the span a
    /// snapshot for `range_id` carries, if there is one: that snapshot must
    /// wait (two replicas of this store never hold one key).
    fn overlapping_replica(&mut self, range_id: u64, snap: &raft::Snapshot) -> Option<u64> {
        use prost::Message as _;
        let meta = proto::transport::SnapshotHandle::decode(&snap.data[..]).ok()?.meta?;
        // A frozen replica is not in the way: a snapshot can overlap its
        // span only if a merge absorbed it (ranges of the cluster never
        // overlap), and applying it subsumes the frozen replica.
        let held = self
            .replicas
            .values()
            .filter(|r| r.range_id != range_id && !r.desc.end_key.is_empty())
            .filter(|r| r.frozen.is_none())
            .map(|r| (r.range_id, r.desc.start_key.clone(), r.desc.end_key.clone()));
        // Snapshots stepped since the last cycle applied will hold their
        // spans too.
        let stepped = self.stepped_snapshots.iter().filter(|s| s.0 != range_id).cloned();
        let other = held
            .chain(stepped)
            .find(|(_, s, e)| meta.start_key < *e && *s < meta.end_key)
            .map(|(id, ..)| id);
        if other.is_none() {
            self.stepped_snapshots.push((range_id, meta.start_key, meta.end_key));
        }
        other
    }

    /// After a snapshot of `range_id`: removes every frozen replica here its
    /// new span overlaps (absorbed by a merge this store applied only
    /// through the snapshot), state and tombstone in one synced write, as
    /// the merge's apply would have.
    pub(crate) fn remove_subsumed(&mut self, range_id: u64) -> Result<(), StoreError> {
        let Some(d) = self.replicas.get(&range_id).map(|r| r.desc.clone()) else {
            return Ok(());
        };
        let subsumed: Vec<u64> = self
            .replicas
            .values()
            .filter(|r| r.range_id != range_id && r.frozen.is_some() && !r.desc.end_key.is_empty())
            .filter(|r| r.desc.start_key < d.end_key && d.start_key < r.desc.end_key)
            .map(|r| r.range_id)
            .collect();
        for id in subsumed {
            crate::merge::remove_absorbed(&self.engine, id)?;
            self.remove_merged(id);
        }
        Ok(())
    }

    /// Drops the replica of a range merged away here (its state was removed
    /// and its tombstone written with the merge).
    pub(crate) fn remove_merged(&mut self, range_id: u64) {
        if let Some(mut r) = self.replicas.remove(&range_id) {
            r.fail_pending(ProposeError::Ambiguous);
            let mut s = r.status.write();
            s.leader_ready = false;
            s.lease = None;
        }
        self.statuses.write().remove(&range_id);
        self.tombstones.insert(range_id);
        self.metrics.ranges.set(self.replicas.len() as u64);
        tracing::info!(range_id, "removed the replica of a range merged away");
    }

    /// Starts the right-hand replica of a split applied here (replacing an
    /// uninitialized one a message created first; the split kept its term
    /// and vote). The old leaseholder's store campaigns for it at once.
    pub(crate) fn start_right_hand(&mut self, right: RangeDescriptor, campaign: bool) -> Result<(), StoreError> {
        let Some(me) = right.replicas.iter().find(|r| r.store_id == self.store_id) else {
            return Ok(());
        };
        if self
            .replicas
            .get(&right.range_id)
            .is_some_and(|r| !r.desc.end_key.is_empty())
        {
            // Initialized by a snapshot before this split applied here: it
            // is ahead of the split and stays as it is.
            return Ok(());
        }
        // An uninitialized replica a message created first: whether it ever
        // heard of a leader (its term moved).
        let predecessor_term = self.replicas.get(&right.range_id).map(|r| r.raw.term());
        let rc = raft_config(&self.cfg, self.clock.physical(), me.replica_id, right.range_id);
        let mut rep = Replica::new(
            self.engine.clone(),
            right.clone(),
            crate::keyspace::range_name(right.range_id),
            me.replica_id,
            rc,
            self.liveness.clone(),
        )?;
        if predecessor_term.is_none_or(|t| t <= raft::BOOTSTRAP_TERM) {
            self.maybe_forgo_start_wait(&mut rep);
        }
        if campaign || rep.is_sole_voter() {
            rep.raw.campaign();
        }
        rep.publish_status(Instant::now());
        self.statuses.write().insert(right.range_id, rep.status.clone());
        self.replicas.insert(right.range_id, rep);
        self.dirty.insert(right.range_id);
        self.metrics.ranges.set(self.replicas.len() as u64);
        Ok(())
    }

    /// A new replica of a group that never had a leader it acknowledged
    /// here (its term is still the initial one), in a process that has run
    /// for an election timeout (no promise of an earlier process still
    /// runs), has no lease promise outstanding: it may vote at once. The
    /// right half of a split then elects its first leader in one round
    /// instead of waiting out every new replica's quiet period.
    fn maybe_forgo_start_wait(&self, rep: &mut Replica) {
        if self.ticks_taken >= self.cfg.election_ticks && rep.raw.term() <= raft::BOOTSTRAP_TERM {
            rep.raw.forgo_start_wait();
        }
    }

    fn create_replica(&mut self, range_id: u64, replica_id: u64) -> Result<(), StoreError> {
        let desc = RangeDescriptor {
            range_id,
            ..Default::default()
        };
        let rc = raft_config(&self.cfg, self.clock.physical(), replica_id, range_id);
        let mut rep = Replica::new(
            self.engine.clone(),
            desc,
            crate::keyspace::range_name(range_id),
            replica_id,
            rc,
            self.liveness.clone(),
        )?;
        self.maybe_forgo_start_wait(&mut rep);
        self.statuses.write().insert(range_id, rep.status.clone());
        self.replicas.insert(range_id, rep);
        self.dirty.insert(range_id);
        self.metrics.ranges.set(self.replicas.len() as u64);
        tracing::info!(range_id, replica_id, "created a replica, awaiting a snapshot");
        Ok(())
    }

    /// The stores worth placing replicas on (see `liveness`).
    fn live_stores(&self) -> Vec<u64> {
        let known: Vec<u64> = self.known_stores.read().keys().copied().collect();
        let mut live: Vec<u64> = liveness::judge(
            &self.engine,
            self.replicas.contains_key(&crate::keyspace::SYSTEM_RANGE_ID),
            &self.last_heard.lock(),
            known,
            self.clock.physical() as i64,
            self.store_id,
        )
        .into_iter()
        .filter(|n| n.live)
        .map(|n| n.store)
        .collect();
        if !live.contains(&self.store_id) {
            live.push(self.store_id);
        }
        live
    }
}

/// The raft settings of replica `replica_id` of `range_id` on this store.
pub(crate) fn raft_config(cfg: &StoreConfig, seed: u64, replica_id: u64, range_id: u64) -> raft::Config {
    let mut rc = raft::Config::new(replica_id);
    rc.election_ticks = cfg.election_ticks;
    rc.heartbeat_ticks = cfg.heartbeat_ticks;
    rc.seed = seed ^ range_id.rotate_left(32) ^ replica_id;
    rc
}
