//! Splits: one range becomes two, by one raft command on the left-hand
//! (original) range.
//!
//! The leaseholder evaluates the split under a write latch on the whole
//! range at timestamp zero (no request of the range is in flight, none
//! starts), so the MVCC statistics of both halves are computed exactly from
//! the data, and proposes a `SplitTrigger`: both new descriptors (each half
//! takes the parent's generation plus one) and both halves' statistics.
//! Every replica applies it in one write batch (`apply`): the left
//! descriptor shrinks, and the right-hand range's descriptor, applied state
//! and raft state (a log starting at the bootstrap index, as a new range
//! does) are written with it; the data stays where it is, in the one engine.
//! The raft loop then starts the right-hand replica (`Scheduler`), which the
//! old leaseholder's replica campaigns for at once.
//!
//! Meta records are brought to agree afterwards, without transactions: each
//! half's leaseholder publishes its descriptor (`meta::publish_loop`) until
//! done; until then a lookup may find the parent's record, and the left
//! range answers `RangeKeyMismatch` with both halves. See
//! `docs/architecture.md` ("Splits") for every crash point.
//!
//! This module decides nothing about *when* to split (the split queue does).

use proto::kvserver::{
    batch_error, batch_response, raft_command, AdminSplitRequest, AdminSplitResponse, BatchError, BatchResponse,
    RaftCommand, SplitTrigger,
};
use proto::storage::{replica_descriptor, RangeDescriptor};
use storage::mvcc::{self, MvccStats};
use storage::raftlog::{self, HardState};
use storage::rangestate::{self, AppliedState};
use storage::Batch;

use crate::etcd::grpc_code;
use crate::evaluator::EvalOptions;
use crate::keyspace::{pretty, splittable, USER_START};
use crate::replica::ApplyOutcome;
use crate::store::StoreHandle;
use crate::StoreError;

fn error(kind: batch_error::Kind) -> BatchResponse {
    BatchResponse {
        response: Some(batch_response::Response::Error(BatchError { kind: Some(kind) })),
    }
}

fn refused(message: String) -> BatchResponse {
    error(batch_error::Kind::Etcd(proto::kvserver::EtcdError {
        code: grpc_code::INVALID_ARGUMENT,
        message,
    }))
}

/// Why `key` cannot split `desc`, if it cannot.
pub fn check_split_key(desc: &RangeDescriptor, key: &[u8]) -> Option<String> {
    if !splittable(desc.range_id) {
        return Some(format!(
            "range {} ({}) never splits: only ranges of the user keyspace do",
            desc.range_id,
            crate::keyspace::range_name(desc.range_id)
        ));
    }
    if key < USER_START {
        return Some(format!("split key {} is outside the user keyspace", pretty(key)));
    }
    if key <= desc.start_key.as_slice() || (!desc.end_key.is_empty() && key >= desc.end_key.as_slice()) {
        return Some(format!(
            "split key {} is not inside range {} [{}, {}) (a range boundary or outside it)",
            pretty(key),
            desc.range_id,
            pretty(&desc.start_key),
            pretty(&desc.end_key)
        ));
    }
    let joint = desc.replicas.iter().any(|r| {
        r.r#type == replica_descriptor::Type::VoterIncoming as i32
            || r.r#type == replica_descriptor::Type::VoterOutgoing as i32
    });
    joint.then(|| format!("range {} is changing its replicas; try again", desc.range_id))
}

/// A split sent to a range that does not hold its key (the sender's view is
/// stale): `RangeKeyMismatch`, so it looks again; a key at the range's
/// start is already a boundary.
fn misaddressed(desc: &RangeDescriptor, key: &[u8]) -> Option<BatchResponse> {
    let inside = desc.start_key.as_slice() <= key && (desc.end_key.is_empty() || key < desc.end_key.as_slice());
    if !inside {
        return Some(error(batch_error::Kind::RangeKeyMismatch(
            proto::kvserver::RangeKeyMismatch {
                descriptors: vec![desc.clone()],
            },
        )));
    }
    (key == desc.start_key.as_slice() && splittable(desc.range_id)).then(|| {
        refused(format!(
            "{} is already a range boundary (range {} starts there)",
            pretty(key),
            desc.range_id
        ))
    })
}

/// The two descriptors a split of `desc` at `key` makes.
pub fn halves(desc: &RangeDescriptor, key: &[u8], new_range_id: u64) -> (RangeDescriptor, RangeDescriptor) {
    let mut left = desc.clone();
    left.end_key = key.to_vec();
    left.generation = desc.generation + 1;
    let mut right = desc.clone();
    right.range_id = new_range_id;
    right.start_key = key.to_vec();
    right.generation = desc.generation + 1;
    (left, right)
}

/// Evaluates an administrative split at the leaseholder and waits until it
/// applied.
pub async fn admin_split(
    store: &StoreHandle,
    range_id: u64,
    req: AdminSplitRequest,
    opts: &EvalOptions,
) -> BatchResponse {
    let Some(st) = store.status(range_id) else {
        return error(batch_error::Kind::RangeNotFound(range_id));
    };
    if let Some(answer) = misaddressed(&st.desc, &req.split_key) {
        return answer;
    }
    if let Some(why) = check_split_key(&st.desc, &req.split_key) {
        return refused(why);
    }
    let first_free = crate::keyspace::BOOTSTRAP_RANGES.iter().map(|r| r.0).max().unwrap_or(0) + 1;
    if req.new_range_id < first_free || store.has_range(req.new_range_id) {
        return refused(format!("range id {} is taken", req.new_range_id));
    }
    // Every request of the range waits: nothing writes while the halves'
    // statistics are computed and until the split applied.
    let (st, guard) = match crate::kv_batch::latch_whole_range(store, range_id, opts).await {
        Ok(x) => x,
        Err(answer) => return answer,
    };
    let term = st.term;
    // The descriptor may have changed while it waited.
    if let Some(answer) = misaddressed(&st.desc, &req.split_key) {
        return answer;
    }
    if let Some(why) = check_split_key(&st.desc, &req.split_key) {
        return refused(why);
    }
    if st.frozen.is_some() {
        return error(batch_error::Kind::Unavailable(format!(
            "range {range_id} is being merged; try again"
        )));
    }
    let (left, right) = halves(&st.desc, &req.split_key, req.new_range_id);
    let stats = |s: &[u8], e: &[u8]| mvcc::compute_stats(store.engine(), s, e);
    let (left_stats, right_stats) = match (
        stats(&left.start_key, &left.end_key),
        stats(&right.start_key, &right.end_key),
    ) {
        (Ok(l), Ok(r)) => (l, r),
        (Err(e), _) | (_, Err(e)) => return error(batch_error::Kind::Unavailable(format!("storage: {e}"))),
    };
    let cmd = RaftCommand {
        proposer_term: term,
        op: Some(raft_command::Op::Split(SplitTrigger {
            left: Some(left.clone()),
            right: Some(right.clone()),
            left_stats: Some(left_stats.into()),
            right_stats: Some(right_stats.into()),
        })),
        ..Default::default()
    };
    match crate::kv_batch::propose_holding(store, range_id, cmd, guard, opts.write_timeout).await {
        Ok(ApplyOutcome::Split(Ok(()))) => {
            store.metrics().splits.inc();
            BatchResponse {
                response: Some(batch_response::Response::AdminSplit(AdminSplitResponse {
                    left: Some(left),
                    right: Some(right),
                })),
            }
        }
        Ok(ApplyOutcome::Split(Err(why))) => refused(why),
        Ok(other) => refused(format!("unexpected outcome {other:?}")),
        Err(e) => crate::kv_batch::propose_error(store, range_id, e),
    }
}

/// Writes the right-hand range of a split into the apply batch: its
/// descriptor, applied state (with its statistics) and a raft log starting
/// at the bootstrap index. A replica of it that a message created before
/// this split applied here keeps its term and vote (it may have voted). A
/// right-hand replica already initialized here (by a snapshot: it is ahead
/// of this split) is left as it is. Returns whether it wrote anything.
pub fn write_right_hand(batch: &mut Batch, right: &RangeDescriptor, stats: MvccStats) -> Result<bool, StoreError> {
    let id = right.range_id;
    if rangestate::descriptor(&*batch, id)?.is_some() {
        return Ok(false);
    }
    let prior = raftlog::hard_state(&*batch, id)?;
    rangestate::set_descriptor(batch, right)?;
    rangestate::set_applied_state(
        batch,
        id,
        AppliedState {
            index: raft::BOOTSTRAP_INDEX,
            term: raft::BOOTSTRAP_TERM,
            stats,
            lease_applied_index: 0,
        },
    )?;
    raftlog::reset(batch, id, raft::BOOTSTRAP_INDEX, raft::BOOTSTRAP_TERM)?;
    let (term, vote) = if prior.term > raft::BOOTSTRAP_TERM {
        (prior.term, prior.vote)
    } else {
        (raft::BOOTSTRAP_TERM, 0)
    };
    raftlog::save_hard_state(
        batch,
        id,
        HardState {
            term,
            vote,
            commit: raft::BOOTSTRAP_INDEX,
        },
    )?;
    Ok(true)
}

/// Whether a split trigger applies to a range whose descriptor is `cur`:
/// it must split exactly this range as it is now (a trigger proposed under
/// an older descriptor changes nothing).
pub fn trigger_matches(cur: &RangeDescriptor, t: &SplitTrigger) -> Result<(RangeDescriptor, RangeDescriptor), String> {
    let (Some(left), Some(right)) = (&t.left, &t.right) else {
        return Err("a split without both halves".into());
    };
    let ok = left.range_id == cur.range_id
        && left.start_key == cur.start_key
        && right.end_key == cur.end_key
        && left.end_key == right.start_key
        && left.generation == cur.generation + 1
        && right.generation == cur.generation + 1;
    if ok {
        Ok((left.clone(), right.clone()))
    } else {
        Err(format!(
            "range {} changed since the split was evaluated (now [{}, {}) generation {})",
            cur.range_id,
            pretty(&cur.start_key),
            pretty(&cur.end_key),
            cur.generation
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(id: u64, s: &[u8], e: &[u8]) -> RangeDescriptor {
        RangeDescriptor {
            range_id: id,
            start_key: s.to_vec(),
            end_key: e.to_vec(),
            generation: 4,
            ..Default::default()
        }
    }

    #[test]
    fn split_keys_outside_or_at_a_boundary_or_in_system_ranges_are_refused() {
        let user = d(3, b"\x11", b"\xff\xff");
        assert!(check_split_key(&user, b"m").is_none());
        assert!(check_split_key(&user, b"\x11").is_some(), "at the start");
        assert!(check_split_key(&user, b"\xff\xff").is_some(), "at the end");
        assert!(check_split_key(&user, b"\x10x").is_some(), "outside");
        assert!(check_split_key(&d(2, b"\x10", b"\x11"), b"\x10m").is_some(), "etcd");
        assert!(check_split_key(&d(1, b"", b"\x10"), b"\x05").is_some(), "system");
        let (l, r) = halves(&user, b"m", 9);
        assert_eq!((l.range_id, l.end_key.as_slice(), l.generation), (3, &b"m"[..], 5));
        assert_eq!((r.range_id, r.start_key.as_slice(), r.generation), (9, &b"m"[..], 5));
        let t = SplitTrigger {
            left: Some(l),
            right: Some(r),
            ..Default::default()
        };
        assert!(trigger_matches(&user, &t).is_ok());
        let mut moved = user.clone();
        moved.generation = 5;
        assert!(
            trigger_matches(&moved, &t).is_err(),
            "evaluated under an older descriptor"
        );
    }
}
