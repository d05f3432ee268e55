//! The raft loop's cycles (see `scheduler`): collecting `Ready`s into one
//! batch, handing it to the commit pipeline (`log_writer`) or writing it
//! inline, and finishing it once it landed: raft hears it is durable, the
//! answers that promise durable state leave, committed entries apply.
//!
//! Cycles finish one at a time in the order collected; writes that replace
//! or remove raft state wait until everything collected has landed. This
//! module must never write a raft batch itself except through
//! `log_writer::write`, nor finish a cycle out of order.

use std::time::Instant;

use storage::raftlog::{self, HardState};

use crate::apply;
use crate::command;
use crate::scheduler::Scheduler;
use crate::StoreError;

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
    /// Finishes the cycle whose batch landed, collects what replicas have
    /// now, and hands the next batch over if none is in flight.
    pub(crate) fn process_readies(&mut self) -> Result<(), StoreError> {
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
    pub(crate) fn drain(&mut self) -> Result<(), StoreError> {
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
        if let Some(r) = self.replicas.get(&crate::keyspace::ETCD_RANGE_ID) {
            let a = r.applied.index;
            self.etcd_applied.send_if_modified(|v| std::mem::replace(v, a) != a);
        }
        self.metrics
            .scheduler_cycle_seconds
            .observe(cycle.started.elapsed().as_secs_f64());
        Ok(())
    }
}
