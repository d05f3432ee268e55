//! Applying committed entries to a replica, in log order: the entries'
//! effects, the range's applied state (index, term, lease-applied index, MVCC
//! stats) and the etcd revision state are written together, so a restart
//! never applies an entry twice or skips one. The write path's entries of
//! one `Ready` share one batch; any other entry is written by itself.
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

/// What applying one entry changes besides its batch, done once that batch is
/// written.
#[derive(Default)]
struct Effects {
    frozen: Option<Option<FreezeForMerge>>,
    /// A merge: the merged descriptor and the range absorbed.
    merged: Option<(proto::storage::RangeDescriptor, Option<u64>)>,
    /// A split: the left and right halves.
    split: Option<(proto::storage::RangeDescriptor, proto::storage::RangeDescriptor)>,
    /// The proposer's answer, if it proposed this entry here.
    reply: Option<(crate::replica::Reply, Result<ApplyOutcome, ProposeError>)>,
}

/// Whether an entry must be applied in a batch of its own: everything but
/// the commands of the write path (etcd puts and deletes, native KV write
/// batches), which change nothing outside their batch and which etcd's rules
/// refuse, if at all, before they write anything. A transaction may be
/// refused after it wrote, a compaction is large, and the rest change the
/// replica itself (descriptor, freeze) for the entries after them.
fn applies_alone(e: &Entry, cmd: Option<&Result<RaftCommand, prost::DecodeError>>) -> bool {
    use raft_command::Op;
    match (&e.payload, cmd) {
        (EntryPayload::Empty, _) => false,
        (EntryPayload::Normal(_), Some(Ok(c))) => !matches!(
            c.op,
            None | Some(Op::EtcdPut(_) | Op::EtcdDeleteRange(_) | Op::WriteBatch(_))
        ),
        _ => true,
    }
}

/// A committed entry with its command decoded (once: the raft loop looks
/// at it before applying, see `any_alone`).
pub(crate) struct Decoded {
    entry: Entry,
    cmd: Option<Result<RaftCommand, prost::DecodeError>>,
    alone: bool,
    /// A split or merge: it writes (or removes) another range's raft state,
    /// so every raft write collected before must land first.
    lands_first: bool,
}

/// Decodes committed entries for `Replica::apply_decoded`.
pub(crate) fn decode(entries: Vec<Entry>) -> Vec<Decoded> {
    entries
        .into_iter()
        .map(|entry| {
            let cmd = match &entry.payload {
                EntryPayload::Normal(data) => Some(RaftCommand::decode(&data[..])),
                _ => None,
            };
            let alone = applies_alone(&entry, cmd.as_ref());
            let lands_first = matches!(
                &cmd,
                Some(Ok(RaftCommand {
                    op: Some(raft_command::Op::Split(_) | raft_command::Op::Merge(_)),
                    ..
                }))
            );
            Decoded {
                entry,
                cmd,
                alone,
                lands_first,
            }
        })
        .collect()
}

/// Whether any of `entries` writes another range's raft state (see
/// `Decoded::lands_first`).
pub(crate) fn any_lands_first(entries: &[Decoded]) -> bool {
    entries.iter().any(|d| d.lands_first)
}

impl Replica {
    /// Applies committed entries, in order (see `apply_decoded`).
    pub fn apply(&mut self, entries: Vec<Entry>, clock: &Clock, metrics: &Metrics) -> Result<(), StoreError> {
        self.apply_decoded(decode(entries), clock, metrics)
    }

    /// Applies committed entries, in order: the entries of the write path
    /// share one batch (one engine write for all of them, with the applied
    /// state once), every other entry gets a batch of its own; proposers are
    /// answered once their entry's batch is written.
    pub(crate) fn apply_decoded(
        &mut self,
        entries: Vec<Decoded>,
        clock: &Clock,
        metrics: &Metrics,
    ) -> Result<(), StoreError> {
        let Some(last) = entries.last().map(|d| d.entry.index) else {
            return Ok(());
        };
        let mut batch = self.engine.batch();
        let mut effects: Vec<Effects> = Vec::new();
        let mut rev_written = self.rev;
        // The applied index as last written (for the error below).
        let mut written = self.applied.index;
        for Decoded {
            entry: e, cmd, alone, ..
        } in entries
        {
            let index = e.index;
            if alone && !effects.is_empty() {
                self.write_applied(&mut batch, &mut effects, &mut rev_written)?;
                written = self.applied.index;
            }
            let fx = self
                .apply_one(e, cmd, &mut batch, alone, clock, metrics)
                .map_err(|err| {
                    StoreError::Apply(format!(
                        "range {} entry {index}: {err} (the replica stays applied up to {})",
                        self.range_id, written
                    ))
                })?;
            effects.push(fx);
            if alone {
                self.write_applied(&mut batch, &mut effects, &mut rev_written)?;
                written = self.applied.index;
            }
        }
        if !effects.is_empty() {
            self.write_applied(&mut batch, &mut effects, &mut rev_written)?;
        }
        self.raw.on_applied(last);
        self.raw.storage_mut().applied(last);
        Ok(())
    }

    /// Writes `batch` with the applied state (and the etcd revision state if
    /// it changed since `rev_written`), unsynced: the entries are durable in
    /// the raft log, so a crash replays them. Then carries out the entries'
    /// effects, in order.
    fn write_applied(
        &mut self,
        batch: &mut storage::Batch,
        effects: &mut Vec<Effects>,
        rev_written: &mut Option<crate::etcd::RevState>,
    ) -> Result<(), StoreError> {
        if let Some(r) = self.rev {
            if Some(r) != *rev_written {
                rangestate::set_local_record(batch, self.range_id, REV_STATE_SUFFIX, &r.encode())?;
            }
        }
        rangestate::set_applied_state(batch, self.range_id, self.applied)?;
        let b = std::mem::replace(batch, self.engine.batch());
        self.engine.write(b, false)?;
        *rev_written = self.rev;
        for fx in effects.drain(..) {
            if let Some(f) = fx.frozen {
                self.set_frozen(f);
            }
            if let Some((merged, away)) = fx.merged {
                tracing::info!(range = self.range_id, absorbed = ?away, "merge applied");
                self.set_descriptor(merged);
                self.merged_out.extend(away);
            }
            if let Some((left, right)) = fx.split {
                tracing::info!(range = self.range_id, right = right.range_id, split_key = ?right.start_key, "split applied");
                self.set_descriptor(left);
                self.split_out.push(right);
            }
            if let Some((reply, r)) = fx.reply {
                let _ = reply.send(r);
            }
        }
        Ok(())
    }

    /// Applies one entry into `batch` (its own when `alone`), moving the
    /// replica's applied and revision state in memory; what else it changes
    /// comes back as effects, for after the write.
    fn apply_one(
        &mut self,
        e: Entry,
        cmd: Option<Result<RaftCommand, prost::DecodeError>>,
        batch: &mut storage::Batch,
        alone: bool,
        clock: &Clock,
        metrics: &Metrics,
    ) -> Result<Effects, StoreError> {
        let mut applied = self.applied;
        applied.index = e.index;
        applied.term = e.term;
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
                    rangestate::set_descriptor(batch, &desc)?;
                    rangestate::set_local_record(
                        batch,
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
            EntryPayload::Normal(data) => match cmd.unwrap_or_else(|| RaftCommand::decode(&data[..])) {
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
                            outcome = Some(ApplyOutcome::NodeId(node_ids::apply_allocate(batch, &a)?));
                            None
                        }
                        Some(raft_command::Op::Heartbeat(h)) => {
                            let l = liveness::apply_heartbeat(batch, &h, hlc.wall as i64)?;
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
                            let changed = crate::meta::apply_update(batch, &mut delta, &u, hlc)?;
                            applied.stats += delta;
                            outcome = Some(ApplyOutcome::MetaUpdated(changed));
                            None
                        }
                        Some(raft_command::Op::AllocateRangeId(_)) if system => {
                            outcome = Some(ApplyOutcome::RangeId(node_ids::apply_allocate_range_id(batch)?));
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
                                    rangestate::set_descriptor(batch, &left)?;
                                    if !split::write_right_hand(batch, &right, stats(t.right_stats))? {
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
                                    merge::apply_freeze(batch, self.range_id, &f, e.index)?;
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
                            let done = merge::apply_unfreeze(batch, self.range_id, &u)?;
                            if done {
                                new_frozen = Some(None);
                            }
                            outcome = Some(ApplyOutcome::Unfrozen(done));
                            None
                        }
                        Some(raft_command::Op::AbortMerge(a)) => {
                            outcome = Some(ApplyOutcome::MergeResolved(merge::apply_abort(batch, &self.desc, &a)?));
                            None
                        }
                        Some(raft_command::Op::Merge(t)) => {
                            let r = merge::apply_merge(batch, &self.desc, &mut applied, &t)?;
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
                                batch,
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
                        Some(raft_command::Op::EtcdLeaseGrant(g)) => Some(EtcdWrite::LeaseGrant(g)),
                        Some(raft_command::Op::EtcdLeaseRevoke(r)) => Some(EtcdWrite::LeaseRevoke(r)),
                    };
                    if let (Some(w), Some(mut state)) = (write, self.rev) {
                        let ops_before = batch.len();
                        let mut delta = MvccStats::default();
                        let result = match etcd::apply(batch, &mut delta, &mut state, hlc.wall, &w) {
                            Ok((resp, rev_after)) => {
                                applied.stats += delta;
                                new_rev = Some(state);
                                if let Some(r) = rev_after {
                                    let _ = clock.update(Timestamp::new(r as u64, 0));
                                }
                                Ok(resp)
                            }
                            Err(EtcdFailure::Refused(err)) => {
                                // Nothing of a refused write is kept: its
                                // batch is its own, or (puts and deletes)
                                // etcd refuses before writing.
                                if alone {
                                    *batch = self.engine.batch();
                                } else if batch.len() != ops_before {
                                    return Err(StoreError::Apply(format!(
                                        "a refused etcd write left {} writes in a shared batch",
                                        batch.len() - ops_before
                                    )));
                                }
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
        self.applied = applied;
        self.rev = new_rev;
        metrics.raft_entries_committed.inc();
        // Answer the proposer if this entry is the one it proposed here.
        let reply = self.pending.remove(&e.index).map(|(term, reply)| {
            let r = match outcome {
                Some(o) if term == e.term => Ok(o),
                _ => Err(ProposeError::Dropped),
            };
            (reply, r)
        });
        Ok(Effects {
            frozen: new_frozen,
            merged: merged_desc.map(|d| (d, merged_away)),
            split: new_desc,
            reply,
        })
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use proto::etcdserverpb::{request_op, PutRequest, RangeRequest, RequestOp, TxnRequest};
    use proto::storage::{RangeDescriptor, ReplicaDescriptor};
    use storage::{Engine, EngineOptions};
    use tokio::sync::oneshot;

    use super::*;
    use crate::etcd::{EtcdError, EtcdWriteResponse, RevState};
    use crate::keyspace::ETCD_RANGE_ID;
    use crate::store::StoreConfig;
    use crate::store_liveness::StoreLiveness;

    fn put(key: &str, value: &str, lease: i64) -> PutRequest {
        PutRequest {
            key: key.into(),
            value: value.into(),
            lease,
            ..Default::default()
        }
    }

    fn entry(index: u64, op: raft_command::Op) -> Entry {
        let cmd = RaftCommand {
            op: Some(op),
            max_lease_index: index,
            ..Default::default()
        };
        Entry {
            index,
            term: 1,
            payload: EntryPayload::Normal(cmd.encode_to_vec()),
        }
    }

    #[test]
    fn write_path_entries_share_a_batch_and_each_sees_the_writes_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(dir.path(), EngineOptions::default()).unwrap();
        let mut b = engine.batch();
        let state = RevState { rev: 1, compact_rev: 0 };
        rangestate::set_local_record(&mut b, ETCD_RANGE_ID, REV_STATE_SUFFIX, &state.encode()).unwrap();
        engine.write(b, false).unwrap();
        let desc = RangeDescriptor {
            range_id: ETCD_RANGE_ID,
            replicas: vec![ReplicaDescriptor {
                node_id: 1,
                store_id: 1,
                replica_id: 1,
                r#type: 0,
            }],
            ..Default::default()
        };
        let cfg = StoreConfig::new(dir.path());
        let liveness = Arc::new(StoreLiveness::new(1, 1, &cfg));
        let mut r = Replica::new(engine.clone(), desc, "etcd".into(), 1, raft::Config::new(1), liveness).unwrap();
        let clock = Clock::new(Arc::new(crate::hlc::SystemClock), 0, Box::new(|_| Ok(())));
        let metrics = Metrics::default();
        use raft_command::Op;
        let txn = TxnRequest {
            success: vec![
                RequestOp {
                    request: Some(request_op::Request::RequestPut(put("c", "1", 0))),
                },
                RequestOp {
                    request: Some(request_op::Request::RequestPut(put("d", "1", 7))),
                },
            ],
            ..Default::default()
        };
        let entries = vec![
            entry(1, Op::EtcdPut(put("a", "1", 0))),
            entry(2, Op::EtcdPut(put("a", "2", 0))),
            // Refused (unknown lease) before it writes: the batch goes on.
            entry(3, Op::EtcdPut(put("b", "1", 7))),
            // Refused after its first put: applied alone, nothing kept.
            entry(4, Op::EtcdTxn(txn)),
            entry(5, Op::EtcdPut(put("a", "3", 0))),
        ];
        let mut answers = Vec::new();
        for e in &entries {
            let (tx, rx) = oneshot::channel();
            r.pending.insert(e.index, (1, tx));
            answers.push(rx);
        }
        r.apply(entries, &clock, &metrics).unwrap();
        let outcomes: Vec<_> = answers
            .into_iter()
            .map(|mut rx| rx.try_recv().unwrap().unwrap())
            .collect();
        let result = |i: usize| match &outcomes[i] {
            ApplyOutcome::Etcd { result, .. } => result,
            o => panic!("not an etcd outcome: {o:?}"),
        };
        assert!(matches!(result(0), Ok(EtcdWriteResponse::Put(_))));
        assert!(matches!(result(2), Err(EtcdError::LeaseNotFound(7))));
        assert!(matches!(result(3), Err(EtcdError::LeaseNotFound(7))));
        // Each put read the one before it in the shared batch.
        let state = r.rev.unwrap();
        let read = |key: &str| {
            crate::etcd::range(
                &engine,
                &state,
                &RangeRequest {
                    key: key.into(),
                    ..Default::default()
                },
            )
            .unwrap()
            .kvs
        };
        let a = read("a");
        assert_eq!((a[0].version, a[0].value.as_slice()), (3, &b"3"[..]));
        assert!(a[0].create_revision < a[0].mod_revision);
        assert!(read("b").is_empty() && read("c").is_empty());
        // Written with the applied state, in the engine.
        assert_eq!(rangestate::applied_state(&engine, ETCD_RANGE_ID).unwrap().index, 5);
        assert_eq!(r.applied_index(), 5);
    }
}
