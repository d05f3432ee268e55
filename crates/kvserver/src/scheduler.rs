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
//! the loop and nothing else: what a queue decides, how an entry applies and
//! where a message goes live in their own modules.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use parking_lot::{Mutex, RwLock};
use proto::storage::RangeDescriptor;
use proto::transport::RaftMsg;
use storage::raftlog::{self, HardState};
use storage::Engine;

use crate::apply;
use crate::command;
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

/// Weight of each new sync in `sync_average`.
const SYNC_AVERAGE_WEIGHT: f64 = 0.1;

/// `Ready`s collected and not yet handed over, with their writes.
pub(crate) struct Gathering {
    batch: storage::Batch,
    readies: Vec<(u64, u64, raft::Ready)>,
    snapshotted: Vec<u64>,
    must_sync: bool,
    entries: u64,
    synced_ranges: u64,
    started: Instant,
}

/// The `Ready`s of one batch, handed to the writer (or written inline).
pub(crate) struct Cycle {
    seq: u64,
    /// (range, replica uid, its Ready).
    readies: Vec<(u64, u64, raft::Ready)>,
    /// Applied indexes this cycle's synced write makes durable.
    durable: Vec<(u64, u64)>,
    /// Replicas that installed a snapshot in this cycle.
    snapshotted: Vec<u64>,
    started: Instant,
}

impl Scheduler {
    pub fn run(mut self) {
        let mut ticker = TickTimer::new(self.cfg.tick, Instant::now());
        let now = Instant::now();
        for r in self.replicas.values_mut() {
            r.publish_status(now);
        }
        let rx = self.rx.clone();
        let done = self.writer().done().clone();
        let mut failed = false;
        loop {
            // Replicas waiting for a collection the pipeline has room for,
            // or landed batches to finish: no sleeping.
            let busy = !self.dirty.is_empty() || self.writer().has_landed();
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
                    Ok(l) => self.writer_mut().record(l),
                    // The writer stopped after a failed write, reported
                    // before this: finishing it stops the store below.
                    Err(_) => stop = !self.writer().has_landed(),
                },
                default(wait) => {}
            }
            for _ in 0..MAX_EVENTS_PER_CYCLE {
                match self.rx.try_recv() {
                    Ok(ev) => stop |= self.handle(ev),
                    Err(_) => break,
                }
            }
            self.writer_mut().poll();
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

    fn writer(&self) -> &LogWriter {
        &self.writer
    }

    fn writer_mut(&mut self) -> &mut LogWriter {
        &mut self.writer
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
    fn remove_subsumed(&mut self, range_id: u64) -> Result<(), StoreError> {
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
    fn remove_merged(&mut self, range_id: u64) {
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
    fn start_right_hand(&mut self, right: RangeDescriptor, campaign: bool) -> Result<(), StoreError> {
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

    /// Finishes the cycle whose batch landed, collects what replicas have
    /// now, and hands the next batch over if none is in flight.
    fn process_readies(&mut self) -> Result<(), StoreError> {
        self.finish_landed()?;
        self.collect()?;
        self.hand_over(false)?;
        // Store liveness messages queued this cycle, if no Ready took them.
        let mut out = std::mem::take(&mut self.out);
        out.flush(&*self.transport, &self.metrics);
        Ok(())
    }

    fn observe_sync(&mut self, secs: f64) {
        self.sync_average += SYNC_AVERAGE_WEIGHT * (secs - self.sync_average);
    }

    /// Hands what was gathered to the writer and waits until every batch
    /// handed over has landed (without finishing them).
    fn land_everything(&mut self) -> Result<(), StoreError> {
        self.hand_over(true)?;
        self.writer.wait_all_landed().map_err(StoreError::Io)
    }

    /// Lands and finishes everything collected so far.
    fn drain(&mut self) -> Result<(), StoreError> {
        self.land_everything()?;
        self.finish_landed()
    }

    fn finish_landed(&mut self) -> Result<(), StoreError> {
        while let Some(l) = self.writer.take_landed() {
            l.result?;
            if let Some(secs) = l.sync_secs {
                self.observe_sync(secs);
            }
            let cycle = self
                .cycles
                .pop_front()
                .ok_or_else(|| StoreError::Io(format!("batch {} landed, but no cycle waits for it", l.seq)))?;
            debug_assert_eq!(cycle.seq, l.seq, "batches land in the order handed over");
            self.finish(cycle)?;
        }
        Ok(())
    }

    /// Takes a `Ready` from every replica something touched, sends their
    /// messages (also while a batch is in flight: a leader's appends leave
    /// at once) and gathers their writes into the next batch.
    fn collect(&mut self) -> Result<(), StoreError> {
        if self.dirty.is_empty() {
            return Ok(());
        }
        // A snapshot's install writes the replica's raft state itself: no
        // batch of before it may land after it, nor be finished after it.
        if self
            .dirty
            .iter()
            .any(|id| self.replicas.get(id).is_some_and(|r| r.raw.has_pending_snapshot()))
        {
            self.drain()?;
        }
        let candidates: Vec<u64> = std::mem::take(&mut self.dirty).into_iter().collect();
        // What events and ticks queued this cycle goes in the same frames.
        let mut out = std::mem::take(&mut self.out);
        let mut g = self.gathering.take().unwrap_or_else(|| Gathering {
            // Nothing reads the log writes before they land: no index.
            batch: self.engine.write_only_batch(),
            readies: Vec::new(),
            snapshotted: Vec::new(),
            must_sync: false,
            entries: 0,
            synced_ranges: 0,
            started: Instant::now(),
        });
        for &id in &candidates {
            let Some(r) = self.replicas.get_mut(&id) else { continue };
            if r.raw.needs_tick() {
                self.ticking.insert(id);
            }
            if !r.raw.has_ready() {
                continue;
            }
            let mut rd = r.raw.ready();
            // Before any of its messages leave (a TimeoutNow above all).
            r.publish_lease_loss();
            if let Some(snap) = &rd.snapshot {
                let hs = rd.hard_state.unwrap_or_else(|| r.raw.hard_state());
                r.apply_snapshot(snap, hs)?;
                self.metrics.snapshots_applied.inc();
                g.snapshotted.push(id);
            }
            out.add(r, std::mem::take(&mut rd.messages), &*self.transport, &self.events);
            let ranges_before = g.synced_ranges;
            if !rd.entries.is_empty() {
                g.synced_ranges += 1;
                let es: Vec<_> = rd.entries.iter().map(command::encode_entry).collect();
                let (truncated, last) = r.raw.storage().bounds();
                raftlog::append_within(&mut g.batch, id, &es, truncated, last)?;
                // The next append (maybe before this batch lands) starts
                // from these bounds; raft reads these entries from its own
                // unstable log until it hears they are persisted.
                r.raw.storage_mut().appended(&rd.entries);
                g.entries += es.len() as u64;
                g.must_sync = true;
            }
            if let Some(hs) = rd.hard_state {
                if (hs.term, hs.vote) != r.synced_term_vote {
                    g.must_sync = true;
                    g.synced_ranges = g.synced_ranges.max(ranges_before + 1);
                    r.synced_term_vote = (hs.term, hs.vote);
                }
                raftlog::save_hard_state(
                    &mut g.batch,
                    id,
                    HardState {
                        term: hs.term,
                        vote: hs.vote,
                        commit: hs.commit,
                    },
                )?;
            }
            g.readies.push((id, r.uid, rd));
        }
        // Every snapshot stepped is installed (or was refused by raft) now:
        // every replica touched was asked.
        self.stepped_snapshots.clear();
        // Leaders' appends and heartbeats leave before the sync.
        out.flush(&*self.transport, &self.metrics);
        if !g.readies.is_empty() {
            self.gathering = Some(g);
        }
        Ok(())
    }

    /// Hands the gathered batch over once nothing is in flight. Written
    /// inline, and finished at once, when nothing waits or syncs are too
    /// short to be worth two thread hops. `force`: handed to the writer now,
    /// behind what is in flight, and never finished here (the caller may be
    /// finishing an earlier cycle: cycles finish in order).
    fn hand_over(&mut self, force: bool) -> Result<(), StoreError> {
        if !force && !self.cycles.is_empty() {
            return Ok(()); // joins the next batch: the one in flight lands first
        }
        let Some(g) = self.gathering.take() else {
            return Ok(());
        };
        // A synced write makes durable every applied state written before
        // it (the WAL is ordered): that is, before it is handed over.
        let durable = if g.must_sync {
            let mut ids = std::mem::take(&mut self.applied_unsynced);
            ids.sort_unstable();
            ids.dedup();
            ids.into_iter()
                .filter_map(|id| self.replicas.get(&id).map(|r| (id, r.applied_index())))
                .collect()
        } else {
            Vec::new()
        };
        if g.must_sync {
            self.metrics.raft_fsyncs.inc();
            self.metrics.raft_entries_persisted.add(g.entries);
            self.metrics.raft_entries_per_fsync.observe(g.entries as f64);
            self.metrics.raft_ranges_per_fsync.observe(g.synced_ranges as f64);
        }
        let Gathering {
            batch,
            readies,
            snapshotted,
            must_sync,
            started,
            ..
        } = g;
        let cycle = |seq| Cycle {
            seq,
            readies,
            durable,
            snapshotted,
            started,
        };
        let write = (!batch.is_empty()).then_some(batch);
        let pays = self.sync_average >= self.cfg.pipeline_min_sync.as_secs_f64();
        if !force && self.cycles.is_empty() && (self.rx.is_empty() || !pays) {
            // Nothing in flight, and nothing waiting or syncs too short to
            // be worth two thread hops: written here and now.
            if let Some(b) = write {
                let delay = self.cfg.testing_sync_delay;
                if let Some(secs) = crate::log_writer::write(&self.engine, b, must_sync, delay, &self.metrics)? {
                    self.observe_sync(secs);
                }
            }
            return self.finish(cycle(0));
        }
        self.metrics.raft_writes_in_flight.observe(self.writer.pending() as f64);
        let seq = self.writer.submit(write, must_sync).map_err(StoreError::Io)?;
        self.cycles.push_back(cycle(seq));
        Ok(())
    }

    /// A cycle whose batch landed: raft hears it is durable, the answers
    /// that promise durable state leave, committed entries apply.
    fn finish(&mut self, cycle: Cycle) -> Result<(), StoreError> {
        // Cycles finish one at a time, in the order collected: finishing one
        // inside another would report and apply a later `Ready` before an
        // earlier one (acknowledged writes were lost that way).
        if self.finishing {
            return Err(StoreError::Raft("a cycle was finished inside another".into()));
        }
        self.finishing = true;
        let r = self.finish_inner(cycle);
        self.finishing = false;
        r
    }

    fn finish_inner(&mut self, cycle: Cycle) -> Result<(), StoreError> {
        for (id, applied) in cycle.durable {
            if let Some(r) = self.replicas.get_mut(&id) {
                r.durable_applied = r.durable_applied.max(applied);
            }
        }
        if !cycle.snapshotted.is_empty() {
            // A snapshot of a merged range subsumes the replicas frozen for
            // that merge here (the merge trigger is inside the snapshot);
            // after every batch collected, which may hold their raft state.
            self.land_everything()?;
            for &id in &cycle.snapshotted {
                self.remove_subsumed(id)?;
            }
        }
        let mut out = std::mem::take(&mut self.out);
        let mut splits = Vec::new();
        // Ranges merged away here: their state is gone, nothing of theirs
        // may be written again.
        let mut gone: Vec<u64> = Vec::new();
        let now = Instant::now();
        for (id, uid, mut rd) in cycle.readies {
            if gone.contains(&id) {
                continue;
            }
            let committed = apply::decode(std::mem::take(&mut rd.committed_entries));
            if apply::any_lands_first(&committed) {
                // Splits and merges write or remove another range's raft
                // state: after everything collected has landed.
                self.land_everything()?;
            }
            let Some(r) = self.replicas.get_mut(&id) else { continue };
            let msgs = std::mem::take(&mut rd.persisted_messages);
            if r.uid != uid {
                // Taken from a replica replaced since (an uninitialized one
                // by a split's right half): its answers still hold.
                out.add(r, msgs, &*self.transport, &self.events);
                continue;
            }
            r.raw.on_persisted(rd.number);
            if !committed.is_empty() {
                r.apply_decoded(committed, &self.clock, &self.metrics)?;
                self.applied_unsynced.push(id);
            }
            r.publish_status(now);
            out.add(r, msgs, &*self.transport, &self.events);
            let leader = r.raw.role() == raft::Role::Leader;
            splits.extend(std::mem::take(&mut r.split_out).into_iter().map(|d| (d, leader)));
            gone.extend(std::mem::take(&mut r.merged_out));
            // Applying may give it more to do.
            self.dirty.insert(id);
        }
        for id in gone {
            self.remove_merged(id);
            self.dirty.remove(&id);
        }
        // Only now: a right-hand replica may replace an uninitialized one
        // whose `Ready` this cycle handled above.
        for (right, leader) in splits {
            self.start_right_hand(right, leader)?;
        }
        out.flush(&*self.transport, &self.metrics);
        // After the statuses moved (see `StoreHandle::status_version`).
        self.status_version.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.metrics
            .scheduler_cycle_seconds
            .observe(cycle.started.elapsed().as_secs_f64());
        Ok(())
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
