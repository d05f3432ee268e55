//! Applying committed entries to a replica, in log order, one batch each:
//! the entry's effect, the range's applied state (index, term, lease-applied
//! index, MVCC stats) and the etcd revision state are written together, so a
//! restart never applies an entry twice or skips one.
//!
//! A command is dispatched to the state machine it belongs to: node ids
//! (`node_ids`), liveness (`liveness`) or etcd's KV (`etcd`). Only a refusal by
//! etcd's rules is applied as a no-op (every replica refuses alike). Any
//! engine failure (a write, a read, bytes it cannot decode) returns an error
//! *before* the applied index moves: the scheduler then stops the store
//! rather than let this replica diverge from its peers or answer a client a
//! definite failure for a write the others applied.

use prost::Message as _;
use proto::kvserver::{raft_command, RaftCommand};
use raft::{Entry, EntryPayload};
use storage::mvcc::MvccStats;
use storage::rangestate;
use storage::Timestamp;

use crate::etcd::{self, EtcdFailure, EtcdWrite};
use crate::hlc::Clock;
use crate::keyspace::SYSTEM_RANGE_ID;
use crate::metrics::Metrics;
use crate::raft_storage::{self, CONF_STATE_SUFFIX};
use crate::replica::{ApplyOutcome, ProposeError, Replica, REV_STATE_SUFFIX};
use crate::{liveness, merge, node_ids, split, StoreError};
use proto::kvserver::FreezeForMerge;

impl Replica {
    /// Applies committed entries, in order, one batch each.
    pub fn apply(&mut self, entries: Vec<Entry>, clock: &Clock, metrics: &Metrics) -> Result<(), StoreError> {
        let Some(last) = entries.last().map(|e| e.index) else {
            return Ok(());
        };
        for e in entries {
            let index = e.index;
            self.apply_one(e, clock, metrics).map_err(|err| {
                StoreError::Apply(format!(
                    "range {} entry {index}: {err} (the replica stays applied up to {})",
                    self.range_id, self.applied.index
                ))
            })?;
        }
        self.raw.on_applied(last);
        self.raw.storage_mut().applied(last);
        Ok(())
    }

    fn apply_one(&mut self, e: Entry, clock: &Clock, metrics: &Metrics) -> Result<(), StoreError> {
        let mut applied = self.applied;
        applied.index = e.index;
        applied.term = e.term;
        let mut batch = self.engine.batch();
        let mut outcome: Option<ApplyOutcome> = None;
        let mut new_rev = self.rev;
        // A split's halves, once its batch is written.
        let mut new_desc: Option<(proto::storage::RangeDescriptor, proto::storage::RangeDescriptor)> = None;
        // A merge's outcome, once its batch is written.
        let mut merged_desc: Option<proto::storage::RangeDescriptor> = None;
        let mut merged_away: Option<u64> = None;
        let mut new_frozen: Option<Option<FreezeForMerge>> = None;
        match &e.payload {
            EntryPayload::Empty => {}
            EntryPayload::ConfChange(cc) if self.frozen.is_some() && !cc.is_leave() => {
                // Committed after the freeze: a frozen range keeps the
                // replicas its merge waited on. Every replica skips it alike
                // (the freeze is replicated state); raft forgets the pending
                // change once the applied index passes it. Leaving a joint
                // configuration still applies: a range frozen while joint
                // is refused by the merge (not all voters) and unfrozen.
                tracing::warn!(
                    range = self.range_id,
                    index = e.index,
                    "a membership change of a frozen range applied as a no-op"
                );
            }
            EntryPayload::ConfChange(cc) => match self.raw.apply_conf_change(cc) {
                Ok(cs) => {
                    let desc = self.descriptor_after(cc, &cs);
                    rangestate::set_descriptor(&mut batch, &desc)?;
                    rangestate::set_local_record(
                        &mut batch,
                        self.range_id,
                        CONF_STATE_SUFFIX,
                        &raft_storage::conf_to_record(&cs),
                    )?;
                    self.set_descriptor(desc);
                    self.raw.storage_mut().set_conf(cs);
                }
                Err(refused) => {
                    tracing::warn!(range = self.range_id, index = e.index, %refused, "membership change applied as a no-op");
                }
            },
            EntryPayload::Normal(data) => match RaftCommand::decode(&data[..]) {
                Err(err) => {
                    tracing::error!(range = self.range_id, index = e.index, %err, "undecodable command applied as a no-op");
                }
                Ok(cmd) if cmd.max_lease_index <= applied.lease_applied_index => {
                    // Already applied once, or overtaken: never apply twice.
                    metrics.rejected_commands.inc();
                }
                Ok(cmd) => {
                    applied.lease_applied_index = cmd.max_lease_index;
                    let hlc = cmd.proposer_ts.map(Timestamp::from).unwrap_or_default();
                    if let Err(err) = clock.update(hlc) {
                        tracing::error!(%err, "clock cannot follow an applied timestamp");
                    }
                    let system = self.range_id == SYSTEM_RANGE_ID;
                    let write = match cmd.op {
                        None => None,
                        Some(raft_command::Op::AllocateNode(_) | raft_command::Op::Heartbeat(_)) if !system => {
                            // The evaluator refuses these for other ranges;
                            // should one get here, it changes nothing.
                            tracing::warn!(
                                range = self.range_id,
                                index = e.index,
                                "a system-range command applied elsewhere as a no-op"
                            );
                            None
                        }
                        Some(raft_command::Op::AllocateNode(a)) => {
                            outcome = Some(ApplyOutcome::NodeId(node_ids::apply_allocate(&mut batch, &a)?));
                            None
                        }
                        Some(raft_command::Op::Heartbeat(h)) => {
                            let l = liveness::apply_heartbeat(&mut batch, &h, hlc.wall as i64)?;
                            outcome = Some(ApplyOutcome::Liveness(l));
                            None
                        }
                        Some(raft_command::Op::MetaUpdate(_)) if !system => {
                            tracing::warn!(
                                range = self.range_id,
                                index = e.index,
                                "a meta update applied elsewhere as a no-op"
                            );
                            None
                        }
                        Some(raft_command::Op::MetaUpdate(u)) => {
                            let mut delta = MvccStats::default();
                            let changed = crate::meta::apply_update(&mut batch, &mut delta, &u, hlc)?;
                            applied.stats += delta;
                            outcome = Some(ApplyOutcome::MetaUpdated(changed));
                            None
                        }
                        Some(raft_command::Op::AllocateRangeId(_)) if system => {
                            outcome = Some(ApplyOutcome::RangeId(node_ids::apply_allocate_range_id(&mut batch)?));
                            None
                        }
                        Some(raft_command::Op::AllocateRangeId(_)) => None,
                        Some(raft_command::Op::Split(t)) => {
                            let matched = match &self.frozen {
                                Some(_) => Err(format!("range {} is being merged", self.range_id)),
                                None => split::trigger_matches(&self.desc, &t),
                            };
                            let r = match matched {
                                Ok((left, right)) => {
                                    let stats = |s: Option<proto::storage::MvccStats>| {
                                        s.map(MvccStats::from).unwrap_or_default()
                                    };
                                    rangestate::set_descriptor(&mut batch, &left)?;
                                    if !split::write_right_hand(&mut batch, &right, stats(t.right_stats))? {
                                        tracing::info!(
                                            range = right.range_id,
                                            "right-hand range already here (by snapshot)"
                                        );
                                    }
                                    applied.stats = stats(t.left_stats);
                                    new_desc = Some((left, right));
                                    Ok(())
                                }
                                Err(why) => {
                                    tracing::warn!(range = self.range_id, index = e.index, %why, "a split applied as a no-op");
                                    Err(why)
                                }
                            };
                            outcome = Some(ApplyOutcome::Split(r));
                            None
                        }
                        Some(raft_command::Op::Freeze(f)) if crate::keyspace::splittable(self.range_id) => {
                            let r = match &self.frozen {
                                Some(cur) if cur.merge_id == f.merge_id => Ok(cur.freeze_index),
                                Some(cur) => Err(format!("frozen for merge attempt {} already", cur.merge_id)),
                                None => {
                                    merge::apply_freeze(&mut batch, self.range_id, &f, e.index)?;
                                    new_frozen = Some(Some(FreezeForMerge {
                                        freeze_index: e.index,
                                        ..f
                                    }));
                                    Ok(e.index)
                                }
                            };
                            outcome = Some(ApplyOutcome::Frozen(r));
                            None
                        }
                        Some(raft_command::Op::Unfreeze(u)) => {
                            let done = merge::apply_unfreeze(&mut batch, self.range_id, &u)?;
                            if done {
                                new_frozen = Some(None);
                            }
                            outcome = Some(ApplyOutcome::Unfrozen(done));
                            None
                        }
                        Some(raft_command::Op::AbortMerge(a)) => {
                            outcome = Some(ApplyOutcome::MergeResolved(merge::apply_abort(
                                &mut batch, &self.desc, &a,
                            )?));
                            None
                        }
                        Some(raft_command::Op::Merge(t)) => {
                            let r = merge::apply_merge(&mut batch, &self.desc, &mut applied, &t)?;
                            match &r {
                                Ok(merged) => {
                                    merged_away = t.right.as_ref().map(|d| d.range_id);
                                    merged_desc = Some(merged.clone());
                                }
                                Err(why) => {
                                    tracing::warn!(range = self.range_id, index = e.index, %why, "a merge applied as a no-op")
                                }
                            }
                            outcome = Some(ApplyOutcome::Merged(r));
                            None
                        }
                        Some(raft_command::Op::Freeze(_)) => None,
                        Some(raft_command::Op::WriteBatch(wb)) => {
                            outcome = Some(ApplyOutcome::Kv(self.apply_write_batch(
                                &mut batch,
                                &mut applied,
                                &wb,
                                clock,
                            )?));
                            None
                        }
                        Some(raft_command::Op::EtcdPut(p)) => Some(EtcdWrite::Put(p)),
                        Some(raft_command::Op::EtcdDeleteRange(d)) => Some(EtcdWrite::DeleteRange(d)),
                        Some(raft_command::Op::EtcdTxn(t)) => Some(EtcdWrite::Txn(t)),
                        Some(raft_command::Op::EtcdCompact(c)) => Some(EtcdWrite::Compact(c)),
                    };
                    if let (Some(w), Some(mut state)) = (write, self.rev) {
                        let mut delta = MvccStats::default();
                        let result = match etcd::apply(&mut batch, &mut delta, &mut state, hlc.wall, &w) {
                            Ok((resp, rev_after)) => {
                                applied.stats += delta;
                                new_rev = Some(state);
                                if let Some(r) = rev_after {
                                    let _ = clock.update(Timestamp::new(r as u64, 0));
                                }
                                Ok(resp)
                            }
                            Err(EtcdFailure::Refused(err)) => {
                                // Nothing of a refused write is kept.
                                batch = self.engine.batch();
                                Err(err)
                            }
                            Err(EtcdFailure::Engine(err)) => return Err(err.into()),
                            Err(EtcdFailure::Corrupt(why)) => return Err(StoreError::Corrupt(why)),
                        };
                        let rev = new_rev.map_or(0, |r| r.rev);
                        outcome = Some(ApplyOutcome::Etcd {
                            result,
                            rev,
                            term: e.term,
                        });
                    }
                    metrics.applied_commands.inc();
                }
            },
        }
        if let Some(r) = new_rev {
            if Some(r) != self.rev {
                rangestate::set_local_record(&mut batch, self.range_id, REV_STATE_SUFFIX, &r.encode())?;
            }
        }
        rangestate::set_applied_state(&mut batch, self.range_id, applied)?;
        // Unsynced: the entry is durable in the raft log, so a crash replays it.
        self.engine.write(batch, false)?;
        self.applied = applied;
        self.rev = new_rev;
        if let Some(f) = new_frozen {
            self.set_frozen(f);
        }
        if let Some(merged) = merged_desc {
            tracing::info!(range = self.range_id, absorbed = ?merged_away, "merge applied");
            self.set_descriptor(merged);
            self.merged_out.extend(merged_away);
        }
        if let Some((left, right)) = new_desc {
            tracing::info!(range = self.range_id, right = right.range_id, split_key = ?right.start_key, "split applied");
            self.set_descriptor(left);
            self.split_out.push(right);
        }
        metrics.raft_entries_committed.inc();
        // Answer the proposer if this entry is the one it proposed here.
        if let Some((term, reply)) = self.pending.remove(&e.index) {
            let r = match outcome {
                Some(o) if term == e.term => Ok(o),
                _ => Err(ProposeError::Dropped),
            };
            let _ = reply.send(r);
        }
        Ok(())
    }

    /// Applies a leaseholder's evaluated writes as they are, if this range
    /// still holds their span (a split or merge cannot come between their
    /// evaluation and apply, since those take every latch of the range, but
    /// the check costs nothing and keeps a bug from writing into the wrong
    /// range).
    fn apply_write_batch(
        &self,
        batch: &mut storage::Batch,
        applied: &mut storage::rangestate::AppliedState,
        wb: &proto::kvserver::WriteBatch,
        clock: &Clock,
    ) -> Result<Result<(), String>, StoreError> {
        if self.frozen.is_some() {
            // Replicated state: every replica refuses alike. The merge that
            // froze the range must find exactly the data the freeze saw.
            return Ok(Err(format!("range {} is being merged; try again", self.range_id)));
        }
        let d = &self.desc;
        let inside = wb.start_key >= d.start_key && (d.end_key.is_empty() || wb.end_key <= d.end_key);
        if !inside {
            tracing::warn!(
                range = self.range_id,
                "a write batch outside the range's span applied as a no-op"
            );
            return Ok(Err(format!(
                "range {} no longer holds [{}, {})",
                self.range_id,
                crate::keyspace::pretty(&wb.start_key),
                crate::keyspace::pretty(&wb.end_key)
            )));
        }
        applied.stats += crate::batcheval::apply_write_batch(batch, wb)?;
        if let Some(ts) = wb.ts {
            let _ = clock.update(Timestamp::from(ts));
        }
        Ok(Ok(()))
    }
}
