//! Merges: a user range (left) absorbs its right-hand neighbour, both on
//! the same stores. The steps, driven by any node (`server::kv_api::merge`):
//!
//! 1. **Subsume** (at the right range's leaseholder): with every latch of
//!    the range held, a `FreezeForMerge` command is applied on it; from then
//!    on every replica of it refuses to serve (a durable range-local record,
//!    so a new leaseholder refuses too), and the answer carries its
//!    descriptor, the freeze's log index, its exact statistics and a
//!    timestamp above every read it may have served.
//! 2. **Wait for application** (at each store holding it): every replica of
//!    the right range applied the freeze, so each store holds all of its
//!    data.
//! 3. **Commit** (at the left range's leaseholder): its timestamp cache is
//!    raised above the right range's reads, and a `MergeTrigger` is applied
//!    on the left range: it takes the merged span and the right range's
//!    statistics, and on each store the right range's replica state is
//!    removed (its data stays, now the left range's) and a tombstone keeps
//!    late messages from recreating it.
//!
//! Atomicity without transactions: the left range's log decides. A merge
//! that cannot complete is fenced off by an `AbortMerge` applied on the left
//! range (`resolve`): a trigger of that attempt applied after it changes
//! nothing, so once the fence applied, either the merge happened (before it)
//! or it never will, and only then is the right range unfrozen. A frozen
//! range whose driver died is resolved the same way by its leaseholder's
//! node after a while (`server::kv_api::merge_loop`). A left range frozen
//! for its own merge absorbs nothing more, so a right range frozen for a
//! left range that has since been merged away (tombstoned on its store,
//! where it applied everything before its freeze) was never absorbed and
//! never will be: it is unfrozen.
//!
//! This module evaluates the steps and defines what their commands apply;
//! it never sends anything to another node.

use std::time::{Duration, Instant};

use prost::Message as _;
use proto::kvserver::{
    batch_error, batch_response, raft_command, AbortMerge, BatchError, BatchResponse, FreezeForMerge,
    MergeCommitRequest, MergeTrigger, RaftCommand, ResolveMergeRequest, SubsumeRequest, SubsumeResponse, Unfreeze,
    UnfreezeRequest, WaitAppliedRequest,
};
use proto::storage::{replica_descriptor, RangeDescriptor};
use storage::mvcc::MvccStats;
use storage::rangestate::{self, AppliedState};
use storage::{keys, Batch, Cf, Reader, Timestamp};

use crate::etcd::grpc_code;
use crate::evaluator::EvalOptions;
use crate::keyspace::{pretty, splittable};
use crate::replica::ApplyOutcome;
use crate::spanlatch::Span;
use crate::store::StoreHandle;
use crate::StoreError;

/// Range-local record of a frozen right-hand range (`FreezeForMerge`).
pub const FROZEN_SUFFIX: u8 = b'F';
/// Range-local record of the highest merge attempt fenced off on a left range.
pub const ABORTED_SUFFIX: u8 = b'A';
/// Range-local record of the ranges a left range absorbed (the latest
/// `MAX_ABSORBED` ids, big-endian u64s): what a fence answers from.
pub const ABSORBED_SUFFIX: u8 = b'M';
const MAX_ABSORBED: usize = 1024;

fn absorbed(r: &dyn Reader, range_id: u64) -> Result<Vec<u64>, StoreError> {
    let b = rangestate::local_record(r, range_id, ABSORBED_SUFFIX)?.unwrap_or_default();
    if b.len() % 8 != 0 {
        return Err(StoreError::Corrupt(format!(
            "absorbed-ranges record of range {range_id}"
        )));
    }
    Ok(b.chunks(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
        .collect())
}

/// The store-local record marking a merged-away range (its id is never used
/// again, so no message for it may recreate a replica).
pub fn tombstone_key(range_id: u64) -> Vec<u8> {
    format!("tombstone/{range_id:016x}").into_bytes()
}

/// Whether `range_id` was merged away on this store.
pub fn tombstoned(r: &dyn Reader, range_id: u64) -> Result<bool, StoreError> {
    Ok(rangestate::store_record(r, &tombstone_key(range_id))?.is_some())
}

/// Removes the state of a frozen replica a merge absorbed (known here only
/// through a snapshot of the merged range) and writes its tombstone, in one
/// synced write. Its data is the merged range's.
pub fn remove_absorbed(engine: &storage::Engine, range_id: u64) -> Result<(), StoreError> {
    let mut b = engine.batch();
    remove_state(&mut b, range_id)?;
    engine.write(b, true)?;
    Ok(())
}

/// Deletes a merged-away range's replica state on this store (raft log and
/// hard state, range-local records) and writes its tombstone; its data stays.
fn remove_state(batch: &mut Batch, range_id: u64) -> Result<(), StoreError> {
    let (lo, hi) = keys::raft_range_bounds(range_id);
    batch.delete_range(Cf::Raft, &lo, &hi)?;
    let (lo, hi) = keys::range_local_bounds(range_id);
    batch.delete_range(Cf::Local, &lo, &hi)?;
    rangestate::set_store_record(batch, &tombstone_key(range_id), &u64::MAX.to_be_bytes())?;
    Ok(())
}

/// The freeze of a range, if it is frozen.
pub fn frozen(r: &dyn Reader, range_id: u64) -> Result<Option<FreezeForMerge>, StoreError> {
    match rangestate::local_record(r, range_id, FROZEN_SUFFIX)? {
        Some(b) => FreezeForMerge::decode(&b[..])
            .map(Some)
            .map_err(|e| StoreError::Corrupt(format!("freeze record of range {range_id}: {e}"))),
        None => Ok(None),
    }
}

fn max_aborted(r: &dyn Reader, range_id: u64) -> Result<u64, StoreError> {
    match rangestate::local_record(r, range_id, ABORTED_SUFFIX)? {
        Some(b) => Ok(u64::from_be_bytes(b[..].try_into().map_err(|_| {
            StoreError::Corrupt(format!("aborted-merge record of range {range_id} of {} bytes", b.len()))
        })?)),
        None => Ok(0),
    }
}

/// Applies a freeze on range `range_id` at log `index`.
pub fn apply_freeze(batch: &mut Batch, range_id: u64, f: &FreezeForMerge, index: u64) -> Result<(), StoreError> {
    let rec = FreezeForMerge {
        freeze_index: index,
        ..*f
    };
    rangestate::set_local_record(batch, range_id, FROZEN_SUFFIX, &rec.encode_to_vec())?;
    Ok(())
}

/// Applies an unfreeze: only of the attempt the range is frozen for.
pub fn apply_unfreeze(batch: &mut Batch, range_id: u64, u: &Unfreeze) -> Result<bool, StoreError> {
    match frozen(&*batch, range_id)? {
        Some(f) if f.merge_id == u.merge_id => {
            batch.delete(Cf::Local, &keys::range_local_key(range_id, FROZEN_SUFFIX))?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// Applies a fence on the left range; returns whether the merge happened
/// before it: whether the left range absorbed `right_range_id` (its record
/// says so whatever its span is now: it may have split since).
pub fn apply_abort(batch: &mut Batch, cur: &RangeDescriptor, a: &AbortMerge) -> Result<bool, StoreError> {
    let max = max_aborted(&*batch, cur.range_id)?.max(a.merge_id);
    rangestate::set_local_record(batch, cur.range_id, ABORTED_SUFFIX, &max.to_be_bytes())?;
    Ok(absorbed(&*batch, cur.range_id)?.contains(&a.right_range_id))
}

fn same_range(a: &RangeDescriptor, b: &RangeDescriptor) -> bool {
    a.range_id == b.range_id && a.start_key == b.start_key && a.end_key == b.end_key && a.generation == b.generation
}

/// What a merge trigger does on a replica of the left range whose
/// descriptor is `cur`: `Ok(Err(why))` if it changes nothing (the left
/// range changed, or the attempt was fenced off), `Ok(Ok(merged))` once the
/// batch holds the merge. An error if this store's replica of the right
/// range did not apply its freeze: it cannot take part, and must stop.
pub fn apply_merge(
    batch: &mut Batch,
    cur: &RangeDescriptor,
    applied: &mut AppliedState,
    t: &MergeTrigger,
) -> Result<Result<RangeDescriptor, String>, StoreError> {
    let (Some(left), Some(right), Some(merged)) = (&t.left, &t.right, &t.merged) else {
        return Ok(Err("a merge without its descriptors".into()));
    };
    if !same_range(cur, left) {
        return Ok(Err(format!(
            "range {} changed since the merge was evaluated (generation {}, not {})",
            cur.range_id, cur.generation, left.generation
        )));
    }
    if t.merge_id <= max_aborted(&*batch, cur.range_id)? {
        return Ok(Err("the merge attempt was fenced off (rolled back)".into()));
    }
    // A left range frozen for its own merge absorbs nothing after its
    // freeze: the right range, still here, then knows it never will be.
    if frozen(&*batch, cur.range_id)?.is_some() {
        return Ok(Err(format!("range {} is itself being merged", cur.range_id)));
    }
    let here = rangestate::descriptor(&*batch, right.range_id)?;
    let applied_right = rangestate::applied_state(&*batch, right.range_id)?;
    if !here.as_ref().is_some_and(|d| same_range(d, right)) || applied_right.index < t.freeze_index {
        return Err(StoreError::Apply(format!(
            "merge of range {} into {}: this store's replica of it is not the frozen one (applied {} < {}, or another descriptor)",
            right.range_id, cur.range_id, applied_right.index, t.freeze_index
        )));
    }
    // The right range's state goes; its data is the left range's now.
    remove_state(batch, right.range_id)?;
    let mut ids = absorbed(&*batch, cur.range_id)?;
    ids.push(right.range_id);
    let keep = ids.len().saturating_sub(MAX_ABSORBED);
    let rec: Vec<u8> = ids[keep..].iter().flat_map(|i| i.to_be_bytes()).collect();
    rangestate::set_local_record(batch, cur.range_id, ABSORBED_SUFFIX, &rec)?;
    rangestate::set_descriptor(batch, merged)?;
    applied.stats += t.right_stats.map(MvccStats::from).unwrap_or_default();
    Ok(Ok(merged.clone()))
}

fn error(kind: batch_error::Kind) -> BatchResponse {
    BatchResponse {
        response: Some(batch_response::Response::Error(BatchError { kind: Some(kind) })),
    }
}

fn refused(message: String) -> BatchResponse {
    error(batch_error::Kind::Etcd(proto::kvserver::EtcdError {
        code: grpc_code::FAILED_PRECONDITION,
        message,
    }))
}

fn answer(r: batch_response::Response) -> BatchResponse {
    BatchResponse { response: Some(r) }
}

/// Why two ranges cannot merge, if they cannot: not user ranges, not
/// adjacent, not on the same stores, or changing their replicas.
pub fn check_mergeable(left: &RangeDescriptor, right: &RangeDescriptor) -> Option<String> {
    if !splittable(left.range_id) || !splittable(right.range_id) {
        return Some("only user ranges merge".into());
    }
    if left.end_key != right.start_key || left.end_key.is_empty() {
        return Some(format!(
            "ranges {} and {} are not neighbours",
            left.range_id, right.range_id
        ));
    }
    let stores = |d: &RangeDescriptor| {
        let mut s: Vec<u64> = d.replicas.iter().map(|r| r.store_id).collect();
        s.sort_unstable();
        s
    };
    if stores(left) != stores(right) {
        return Some(format!(
            "ranges {} and {} are not on the same stores ({:?} and {:?}); they must be colocated first",
            left.range_id,
            right.range_id,
            stores(left),
            stores(right)
        ));
    }
    let voters = |d: &RangeDescriptor| {
        d.replicas
            .iter()
            .all(|r| r.r#type == replica_descriptor::Type::Voter as i32)
    };
    (!voters(left) || !voters(right)).then(|| "a range is changing its replicas; try again".into())
}

/// Step 1, at the right range's leaseholder.
pub async fn subsume(store: &StoreHandle, range_id: u64, req: SubsumeRequest, opts: &EvalOptions) -> BatchResponse {
    let Some(st) = store.status(range_id) else {
        return error(batch_error::Kind::RangeNotFound(range_id));
    };
    if st.desc.start_key != req.left_end_key || !splittable(range_id) {
        return refused(format!(
            "range {range_id} does not start at {} (it is [{}, {}))",
            pretty(&req.left_end_key),
            pretty(&st.desc.start_key),
            pretty(&st.desc.end_key)
        ));
    }
    let (st, guard) = match crate::kv_batch::latch_whole_range(store, range_id, opts).await {
        Ok(x) => x,
        Err(answer) => return answer,
    };
    let term = st.term;
    let freeze_index = match store.frozen(range_id) {
        Some(f) if f.merge_id == req.merge_id => f.freeze_index, // a retry
        Some(f) => {
            return refused(format!(
                "range {range_id} is being merged already (attempt {})",
                f.merge_id
            ))
        }
        None => {
            let cmd = RaftCommand {
                proposer_term: term,
                op: Some(raft_command::Op::Freeze(FreezeForMerge {
                    merge_id: req.merge_id,
                    left_range_id: req.left_range_id,
                    freeze_index: 0,
                })),
                ..Default::default()
            };
            match crate::kv_batch::propose_holding(store, range_id, cmd, guard, opts.write_timeout).await {
                Ok(ApplyOutcome::Frozen(Ok(i))) => i,
                Ok(ApplyOutcome::Frozen(Err(why))) => return refused(why),
                Ok(other) => return refused(format!("unexpected outcome {other:?}")),
                Err(e) => return crate::kv_batch::propose_error(store, range_id, e),
            }
        }
    };
    // The descriptor as the freeze left it (from the engine: the status is
    // published after the answer): the replicas the merge must wait on.
    let right = match rangestate::descriptor(store.engine(), range_id) {
        Ok(Some(d)) => d,
        Ok(None) => return error(batch_error::Kind::RangeNotFound(range_id)),
        Err(e) => return error(batch_error::Kind::Unavailable(format!("storage: {e}"))),
    };
    // Frozen: nothing writes any more, so the statistics are exact.
    let stats = match storage::mvcc::compute_stats(store.engine(), &right.start_key, &right.end_key) {
        Ok(s) => s,
        Err(e) => return error(batch_error::Kind::Unavailable(format!("storage: {e}"))),
    };
    // Above every read the range served: its cache over the whole span,
    // and (if this lease served nothing yet) the previous leases' bound.
    let max_offset = opts.max_offset.as_nanos() as u64;
    let clock = store.clock();
    let entered = st.conc.enter_lease(term, || {
        clock
            .now()
            .map(|t| Timestamp::new(t.wall.saturating_add(max_offset), 0))
    });
    let freeze_ts = match (entered, clock.now()) {
        (Ok(_), Ok(now)) => now.max(st.conc.min_write_ts(&[Span::range(&right.start_key, &right.end_key)])),
        (Err(e), _) | (_, Err(e)) => return error(batch_error::Kind::Unavailable(format!("clock: {e}"))),
    };
    answer(batch_response::Response::Subsume(SubsumeResponse {
        right: Some(right),
        freeze_index,
        right_stats: Some(stats.into()),
        freeze_ts: Some(freeze_ts.into()),
    }))
}

/// Step 2, at any store holding the range.
pub async fn wait_applied(
    store: &StoreHandle,
    range_id: u64,
    req: WaitAppliedRequest,
    opts: &EvalOptions,
) -> BatchResponse {
    let deadline = Instant::now() + opts.write_timeout;
    loop {
        let Some(st) = store.status(range_id) else {
            return error(batch_error::Kind::RangeNotFound(range_id));
        };
        if st.applied.index >= req.index {
            return answer(batch_response::Response::AppliedIndex(st.applied.index));
        }
        if Instant::now() >= deadline {
            return error(batch_error::Kind::Unavailable(format!(
                "range {range_id} here applied {} < {}",
                st.applied.index, req.index
            )));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Step 3, at the left range's leaseholder.
pub async fn commit(store: &StoreHandle, range_id: u64, req: MergeCommitRequest, opts: &EvalOptions) -> BatchResponse {
    let Some(st) = store.status(range_id) else {
        return error(batch_error::Kind::RangeNotFound(range_id));
    };
    let Some(right) = req.right.clone() else {
        return refused("a merge commit without the right range".into());
    };
    if let Some(why) = check_mergeable(&st.desc, &right) {
        return refused(why);
    }
    let (st, guard) = match crate::kv_batch::latch_whole_range(store, range_id, opts).await {
        Ok(x) => x,
        Err(answer) => return answer,
    };
    let term = st.term;
    if let Some(why) = check_mergeable(&st.desc, &right) {
        return refused(why);
    }
    if st.frozen.is_some() {
        return refused(format!("range {range_id} is itself being merged"));
    }
    // No write of the merged range may land below a read the right range served.
    if let Some(ts) = req.freeze_ts {
        st.conc.raise_low_water(Timestamp::from(ts));
    }
    let mut merged = st.desc.clone();
    merged.end_key = right.end_key.clone();
    merged.generation = st.desc.generation.max(right.generation).saturating_add(1);
    let cmd = RaftCommand {
        proposer_term: term,
        op: Some(raft_command::Op::Merge(MergeTrigger {
            left: Some(st.desc.clone()),
            right: Some(right),
            merged: Some(merged),
            right_stats: req.right_stats,
            freeze_index: req.freeze_index,
            merge_id: req.merge_id,
        })),
        ..Default::default()
    };
    match crate::kv_batch::propose_holding(store, range_id, cmd, guard, opts.write_timeout).await {
        Ok(ApplyOutcome::Merged(Ok(d))) => {
            store.metrics().merges.inc();
            answer(batch_response::Response::Merged(d))
        }
        Ok(ApplyOutcome::Merged(Err(why))) => refused(why),
        Ok(other) => refused(format!("unexpected outcome {other:?}")),
        Err(e) => crate::kv_batch::propose_error(store, range_id, e),
    }
}

/// Fences a merge attempt off at the left range's leaseholder and says
/// whether it merged before the fence.
pub async fn resolve(
    store: &StoreHandle,
    range_id: u64,
    req: ResolveMergeRequest,
    opts: &EvalOptions,
) -> BatchResponse {
    let cmd = RaftCommand {
        op: Some(raft_command::Op::AbortMerge(AbortMerge {
            merge_id: req.merge_id,
            right_end_key: req.right_end_key,
            right_range_id: req.right_range_id,
        })),
        ..Default::default()
    };
    match store.propose(range_id, cmd, opts.write_timeout).await {
        Ok(ApplyOutcome::MergeResolved(merged)) => answer(batch_response::Response::MergeApplied(merged)),
        Ok(other) => refused(format!("unexpected outcome {other:?}")),
        Err(e) => crate::kv_batch::propose_error(store, range_id, e),
    }
}

/// Unfreezes a right range whose merge was fenced off.
pub async fn unfreeze(store: &StoreHandle, range_id: u64, req: UnfreezeRequest, opts: &EvalOptions) -> BatchResponse {
    if store.frozen(range_id).is_none_or(|f| f.merge_id != req.merge_id) {
        return answer(batch_response::Response::Unfrozen(true));
    }
    let cmd = RaftCommand {
        op: Some(raft_command::Op::Unfreeze(Unfreeze { merge_id: req.merge_id })),
        ..Default::default()
    };
    match store.propose(range_id, cmd, opts.write_timeout).await {
        Ok(ApplyOutcome::Unfrozen(done)) => answer(batch_response::Response::Unfrozen(done)),
        Ok(other) => refused(format!("unexpected outcome {other:?}")),
        Err(e) => crate::kv_batch::propose_error(store, range_id, e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use storage::{Engine, EngineOptions};

    fn d(id: u64, s: &[u8], e: &[u8], generation: u64) -> RangeDescriptor {
        RangeDescriptor {
            range_id: id,
            start_key: s.to_vec(),
            end_key: e.to_vec(),
            generation,
            replicas: vec![proto::storage::ReplicaDescriptor {
                node_id: 1,
                store_id: 1,
                replica_id: 1,
                r#type: 0,
            }],
            ..Default::default()
        }
    }

    #[test]
    fn a_fenced_attempt_never_merges_and_a_merge_removes_the_right_range() {
        let dir = tempfile::tempdir().unwrap();
        let e = Engine::open(dir.path(), EngineOptions::default()).unwrap();
        let (left, right) = (d(5, b"a", b"m", 3), d(6, b"m", b"z", 4));
        let mut b = e.batch();
        rangestate::set_descriptor(&mut b, &right).unwrap();
        rangestate::set_applied_state(
            &mut b,
            6,
            AppliedState {
                index: 9,
                ..Default::default()
            },
        )
        .unwrap();
        e.write(b, false).unwrap();
        let trigger = |id: u64, freeze_index: u64| MergeTrigger {
            left: Some(left.clone()),
            right: Some(right.clone()),
            merged: Some(d(5, b"a", b"z", 5)),
            right_stats: None,
            freeze_index,
            merge_id: id,
        };
        // Fenced off: attempt 7 is a no-op, whatever comes after.
        let mut b = e.batch();
        let fence = AbortMerge {
            merge_id: 7,
            right_end_key: b"z".to_vec(),
            right_range_id: 6,
        };
        assert!(
            !apply_abort(&mut b, &left, &fence).unwrap(),
            "not merged before the fence"
        );
        e.write(b, false).unwrap();
        let mut applied = AppliedState::default();
        let mut b = e.batch();
        assert!(apply_merge(&mut b, &left, &mut applied, &trigger(7, 9))
            .unwrap()
            .is_err());
        // The right range's replica here must have applied its freeze.
        assert!(apply_merge(&mut b, &left, &mut applied, &trigger(8, 10)).is_err());
        // A stale left descriptor changes nothing.
        assert!(apply_merge(&mut b, &d(5, b"a", b"m", 2), &mut applied, &trigger(8, 9))
            .unwrap()
            .is_err());
        let merged = apply_merge(&mut b, &left, &mut applied, &trigger(8, 9))
            .unwrap()
            .unwrap();
        assert_eq!(merged.end_key, b"z");
        e.write(b, false).unwrap();
        assert!(
            rangestate::descriptor(&e, 6).unwrap().is_none(),
            "the right range's state is gone"
        );
        assert!(tombstoned(&e, 6).unwrap());
        assert_eq!(rangestate::descriptor(&e, 5).unwrap().unwrap().end_key, b"z");
        // A fence after the merge says it merged, even once the merged
        // range split again below the absorbed range's end.
        let mut b = e.batch();
        assert!(apply_abort(&mut b, &merged, &fence).unwrap());
        assert!(apply_abort(&mut b, &d(5, b"a", b"c", 6), &fence).unwrap());
        let other = AbortMerge {
            right_range_id: 7,
            ..fence.clone()
        };
        assert!(!apply_abort(&mut b, &merged, &other).unwrap());
    }

    #[test]
    fn only_colocated_neighbouring_user_ranges_merge() {
        assert!(check_mergeable(&d(5, b"a", b"m", 1), &d(6, b"m", b"z", 1)).is_none());
        assert!(check_mergeable(&d(5, b"a", b"m", 1), &d(6, b"n", b"z", 1)).is_some());
        assert!(check_mergeable(&d(2, b"\x10", b"\x11", 1), &d(3, b"\x11", b"z", 1)).is_some());
        let mut elsewhere = d(6, b"m", b"z", 1);
        elsewhere.replicas[0].store_id = 2;
        assert!(check_mergeable(&d(5, b"a", b"m", 1), &elsewhere)
            .unwrap()
            .contains("same stores"));
    }
}
