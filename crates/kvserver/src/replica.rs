//! One replica of a range on this store: its raft group member, its applied
//! state, the proposals waiting for their entries to apply, and what readers
//! may see of it.
//!
//! A replica is owned by the store's raft loop (one thread); readers see it only
//! through `ReplicaStatus` snapshots. Applying an entry writes its data, the
//! range's applied state (index, term, lease-applied index, MVCC stats) and the
//! etcd revision state in one batch, so a restart never applies an entry twice
//! or skips one.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use parking_lot::RwLock;
use prost::Message as _;
use proto::kvserver::{Liveness, RaftCommand};
use proto::storage::{replica_descriptor, RangeDescriptor};
use proto::transport::SnapshotHandle;
use raft::{ConfChange, ConfState, RawNode, Role};
use storage::rangestate::{self, AppliedState};
use storage::Engine;
use tokio::sync::oneshot;

use crate::etcd::{EtcdError, EtcdWriteResponse, RevState};
use crate::metrics::Metrics;
use crate::raft_storage::{self, ReplicaStorage};

/// Range-local record suffix of the etcd revision state.
pub const REV_STATE_SUFFIX: u8 = b'e';

/// The outcome of a proposed command, once applied (or known lost).
#[derive(Debug)]
pub enum ApplyOutcome {
    /// A node id was allocated.
    NodeId(u64),
    /// A node's liveness after its heartbeat.
    Liveness(Liveness),
    /// A native KV write batch: applied, or refused at apply (the range no
    /// longer holds its span) with why.
    Kv(Result<(), String>),
    /// Meta records published: how many changed.
    MetaUpdated(u32),
    /// A range id was allocated.
    RangeId(u64),
    /// A split: applied, or refused at apply (the range changed) with why.
    Split(Result<(), String>),
    /// A freeze for a merge applied at this log index, or refused (frozen
    /// for another attempt).
    Frozen(Result<u64, String>),
    /// An unfreeze: whether the range was frozen for that attempt.
    Unfrozen(bool),
    /// A merge trigger: the merged descriptor, or why it changed nothing.
    Merged(Result<RangeDescriptor, String>),
    /// A merge fence: whether the merge had applied before it.
    MergeResolved(bool),
    /// An etcd write, applied at raft `term`; `rev` is the store's revision after it.
    Etcd {
        result: Result<EtcdWriteResponse, EtcdError>,
        rev: i64,
        term: u64,
    },
}

/// Why a proposal did not produce an outcome.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    #[error("not leader (leader is replica {leader})")]
    NotLeader { leader: u64 },
    #[error("no such range {0}")]
    NoSuchRange(u64),
    /// The command may or may not have been applied.
    #[error("outcome unknown")]
    Ambiguous,
    /// The command was not applied (its entry was replaced or refused).
    #[error("proposal dropped")]
    Dropped,
    #[error("store stopped")]
    Stopped,
    #[error("clock: {0}")]
    Clock(String),
    /// Not proposed: evaluated under a lease (raft term) this replica no
    /// longer holds.
    #[error("the lease it was evaluated under ended")]
    LeaseChanged,
}

pub type Reply = oneshot::Sender<Result<ApplyOutcome, ProposeError>>;

/// What readers may see of a replica, refreshed by the raft loop.
#[derive(Clone, Debug, Default)]
pub struct ReplicaStatus {
    pub desc: RangeDescriptor,
    pub name: String,
    pub leader: u64,
    pub term: u64,
    pub commit: u64,
    pub applied: AppliedState,
    /// The leader applied an entry of its own term: it may evaluate requests.
    pub leader_ready: bool,
    /// What this leader's lease rests on (`store_liveness` says until when).
    pub lease: Option<Arc<crate::store_liveness::Lease>>,
    /// The store's liveness, to check the lease with.
    pub liveness: Option<Arc<crate::store_liveness::StoreLiveness>>,
    /// Latches and timestamp cache of requests evaluated before proposal.
    pub conc: Arc<crate::concurrency::Concurrency>,
    /// Frozen for a merge: serves nothing until merged away or unfrozen.
    pub frozen: Option<proto::kvserver::FreezeForMerge>,
}

impl ReplicaStatus {
    /// What this replica's lease rests on (see `StoreLiveness::describe`);
    /// empty when it claims none.
    pub fn lease_detail(&self, now: Instant) -> String {
        match (&self.lease, &self.liveness) {
            (Some(l), Some(sl)) => sl.describe(l, now),
            _ => String::new(),
        }
    }

    /// Whether this replica may serve a read now.
    pub fn can_serve(&self, now: Instant) -> bool {
        self.leader_ready
            && match (&self.lease, &self.liveness) {
                (Some(l), Some(sl)) => sl.lease_valid(l, now),
                _ => false,
            }
    }
}

pub struct Replica {
    pub range_id: u64,
    pub replica_id: u64,
    /// Unique to this object in the process: a `Ready` taken from a replica
    /// that was replaced since (an uninitialized one by a split's right
    /// half) is not reported to its successor.
    pub(crate) uid: u64,
    pub raw: RawNode<ReplicaStorage>,
    pub desc: RangeDescriptor,
    pub name: String,
    pub(crate) engine: Engine,
    pub(crate) applied: AppliedState,
    pub(crate) rev: Option<RevState>,
    /// Proposals waiting for their entry: index -> (term, reply).
    pub(crate) pending: BTreeMap<u64, (u64, Reply)>,
    proposed_lai: u64,
    /// Whether the status readers see may let them serve (a lease or a
    /// ready leader): `publish_lease_loss` needs no lock when it is not.
    serving_published: bool,
    liveness: Arc<crate::store_liveness::StoreLiveness>,
    pub status: Arc<RwLock<ReplicaStatus>>,
    /// Term and vote of the last hard state written with a sync.
    pub synced_term_vote: (u64, u64),
    /// The applied index known durable: applied states are written without a
    /// sync, and become durable with the next synced write (the WAL is ordered).
    pub durable_applied: u64,
    /// The store of every peer replica known: from the descriptor, and from
    /// messages received (an uninitialized replica knows only its senders).
    pub peers: BTreeMap<u64, u64>,
    /// Right-hand ranges of splits applied here, for the raft loop to start.
    pub(crate) split_out: Vec<RangeDescriptor>,
    /// Ranges merged into this one here, for the raft loop to remove.
    pub(crate) merged_out: Vec<u64>,
    /// Frozen for a merge (see `merge`).
    pub frozen: Option<proto::kvserver::FreezeForMerge>,
    /// A freeze was proposed here in this term: no membership change may
    /// be proposed after it (it would land after the freeze in the log).
    pub(crate) freeze_proposed_term: u64,
}

impl Replica {
    pub fn new(
        engine: Engine,
        desc: RangeDescriptor,
        name: String,
        replica_id: u64,
        raft_cfg: raft::Config,
        liveness: Arc<crate::store_liveness::StoreLiveness>,
    ) -> Result<Replica, crate::StoreError> {
        let range_id = desc.range_id;
        let applied = rangestate::applied_state(&engine, range_id)?;
        let rev = match rangestate::local_record(&engine, range_id, REV_STATE_SUFFIX)? {
            Some(b) => Some(RevState::decode(&b).map_err(|e| crate::StoreError::Corrupt(e.to_string()))?),
            None => None,
        };
        let conf = raft_storage::load_conf(&engine, range_id)?.unwrap_or_else(|| raft_storage::conf_state_of(&desc));
        let frozen = crate::merge::frozen(&engine, range_id)?;
        let st = ReplicaStorage::open(engine.clone(), range_id, conf)?;
        let mut cfg = raft_cfg;
        cfg.applied = applied.index;
        let mut raw = RawNode::new(cfg, st).map_err(|e| crate::StoreError::Raft(e.to_string()))?;
        raw.set_store_epoch(liveness.epoch());
        let hs = raw.hard_state();
        let synced_term_vote = (hs.term, hs.vote);
        let peers = desc.replicas.iter().map(|r| (r.replica_id, r.store_id)).collect();
        let status = Arc::new(RwLock::new(ReplicaStatus {
            desc: desc.clone(),
            name: name.clone(),
            applied,
            frozen,
            liveness: Some(liveness.clone()),
            ..Default::default()
        }));
        static NEXT_UID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Ok(Replica {
            range_id,
            replica_id,
            uid: NEXT_UID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            raw,
            desc,
            name,
            engine,
            applied,
            rev,
            pending: BTreeMap::new(),
            proposed_lai: applied.lease_applied_index,
            serving_published: false,
            liveness,
            status,
            synced_term_vote,
            durable_applied: applied.index,
            peers,
            split_out: Vec::new(),
            merged_out: Vec::new(),
            frozen,
            freeze_proposed_term: 0,
        })
    }

    /// The store of replica `id`, if known.
    pub fn store_of(&self, id: u64) -> Option<u64> {
        self.peers.get(&id).copied()
    }

    /// Applies a snapshot a `Ready` carries, at once (its own synced writes,
    /// by the storage crate's marker protocol: data, range-local state and
    /// log replaced together), before the entries that follow it are
    /// appended to the cycle's batch.
    pub fn apply_snapshot(&mut self, snap: &raft::Snapshot, hs: raft::HardState) -> Result<(), crate::StoreError> {
        let handle = SnapshotHandle::decode(&snap.data[..])
            .map_err(|e| crate::StoreError::Corrupt(format!("snapshot handle: {e}")))?;
        let meta = handle.meta.unwrap_or_default();
        storage::snapshot::apply_snapshot(
            &self.engine,
            std::path::Path::new(&handle.dir),
            &meta,
            Some(storage::raftlog::HardState {
                term: hs.term,
                vote: hs.vote,
                commit: hs.commit.max(snap.meta.index),
            }),
        )?;
        self.reload_after_snapshot()?;
        self.synced_term_vote = (hs.term, hs.vote);
        tracing::info!(range = self.range_id, index = snap.meta.index, "applied a snapshot");
        Ok(())
    }

    /// Re-reads everything a snapshot replaced.
    fn reload_after_snapshot(&mut self) -> Result<(), crate::StoreError> {
        self.applied = rangestate::applied_state(&self.engine, self.range_id)?;
        self.rev = match rangestate::local_record(&self.engine, self.range_id, REV_STATE_SUFFIX)? {
            Some(b) => Some(RevState::decode(&b).map_err(|e| crate::StoreError::Corrupt(e.to_string()))?),
            None => None,
        };
        if let Some(d) = rangestate::descriptor(&self.engine, self.range_id)? {
            self.set_descriptor(d);
        }
        self.proposed_lai = self.proposed_lai.max(self.applied.lease_applied_index);
        self.set_frozen(crate::merge::frozen(&self.engine, self.range_id)?);
        self.raw.storage_mut().reload()?;
        // Proposals the snapshot covers will never be applied here one by one:
        // whether they made it is unknown to this replica.
        let later = self.pending.split_off(&(self.applied.index + 1));
        for (_, (_, reply)) in std::mem::replace(&mut self.pending, later) {
            let _ = reply.send(Err(ProposeError::Ambiguous));
        }
        Ok(())
    }

    pub(crate) fn set_frozen(&mut self, f: Option<proto::kvserver::FreezeForMerge>) {
        self.frozen = f;
        self.status.write().frozen = f;
    }

    pub(crate) fn set_descriptor(&mut self, desc: RangeDescriptor) {
        for r in &desc.replicas {
            self.peers.insert(r.replica_id, r.store_id);
        }
        self.desc = desc;
        self.status.write().desc = self.desc.clone();
    }

    /// Whether a membership change may be proposed: not on a range frozen for
    /// a merge, nor after a freeze was proposed in this term (the merge
    /// needs the replicas it saw frozen).
    pub fn may_change_replicas(&self) -> bool {
        self.frozen.is_none() && self.freeze_proposed_term != self.raw.term()
    }

    /// Proposes a membership change carrying the descriptor it leads to.
    pub fn propose_conf_change(&mut self, cc: ConfChange) -> Result<(), raft::ProposeError> {
        self.raw.propose_conf_change(cc).map(|_| ())
    }

    /// Whether this replica is the only voter of its range.
    pub fn is_sole_voter(&self) -> bool {
        let cs = self.raw.conf_state();
        cs.voters == [self.replica_id] && cs.voters_outgoing.is_empty()
    }

    /// Proposes `cmd`; the reply comes when its entry applies.
    pub fn propose(&mut self, mut cmd: RaftCommand, reply: Reply, metrics: &Metrics) {
        if cmd.proposer_term != 0 && cmd.proposer_term != self.raw.term() {
            metrics.raft_proposals_dropped.inc();
            let _ = reply.send(Err(ProposeError::LeaseChanged));
            return;
        }
        if self.raw.role() != Role::Leader {
            metrics.raft_proposals_dropped.inc();
            let _ = reply.send(Err(ProposeError::NotLeader {
                leader: self.raw.leader(),
            }));
            return;
        }
        let lai = self.proposed_lai.max(self.applied.lease_applied_index) + 1;
        cmd.max_lease_index = lai;
        if matches!(cmd.op, Some(proto::kvserver::raft_command::Op::Freeze(_))) {
            self.freeze_proposed_term = self.raw.term();
        }
        match self.raw.propose(cmd.encode_to_vec()) {
            Ok((index, term)) => {
                self.proposed_lai = lai;
                metrics.raft_proposals.inc();
                // An older proposal waiting on this index left this log, but
                // another replica may still hold it and commit it: unknown.
                if let Some((_, old)) = self.pending.insert(index, (term, reply)) {
                    let _ = old.send(Err(ProposeError::Ambiguous));
                }
            }
            Err(e) => {
                metrics.raft_proposals_dropped.inc();
                let leader = match e {
                    raft::ProposeError::NotLeader { leader } => leader,
                    _ => self.raw.leader(),
                };
                let _ = reply.send(Err(ProposeError::NotLeader { leader }));
            }
        }
    }

    /// The descriptor after a membership change: entering a joint
    /// configuration carries it (with every replica of both halves); leaving
    /// one keeps the replicas still in the configuration.
    pub(crate) fn descriptor_after(&self, cc: &ConfChange, cs: &ConfState) -> RangeDescriptor {
        descriptor_after_change(&self.desc, cc, cs)
    }

    /// The applied index now (made durable by the store's next synced write).
    pub fn applied_index(&self) -> u64 {
        self.applied.index
    }

    /// Drops the raft log up to `index` (persisting the truncated state).
    pub fn truncate_log(&mut self, index: u64) -> Result<(), crate::StoreError> {
        let mut b = self.engine.batch();
        storage::raftlog::truncate(&mut b, self.range_id, index)?;
        self.engine.write(b, false)?;
        self.raw.storage_mut().truncated_again()?;
        Ok(())
    }

    /// Refreshes what readers see.
    pub fn publish_status(&mut self, now: Instant) {
        let basis = self.raw.lease_basis();
        let mut s = self.status.write();
        let unchanged = match (&s.lease, &basis) {
            (Some(l), Some(b)) => l.basis == *b,
            (None, None) => true,
            _ => false,
        };
        if !unchanged {
            s.lease = basis.map(|basis| {
                let stores = basis
                    .promised()
                    .filter_map(|id| self.store_of(id).map(|st| (id, st)))
                    .collect();
                Arc::new(crate::store_liveness::Lease { basis, stores })
            });
        }
        s.leader = self.raw.leader();
        s.term = self.raw.term();
        s.commit = self.raw.committed();
        s.applied = self.applied;
        s.leader_ready = self.raw.leader_ready();
        self.serving_published = s.leader_ready || s.lease.is_some();
        let _ = now;
    }

    /// Publishes a lost lease at once: called before any message of a
    /// `Ready` leaves, so that readers stop serving under a lease raft gave
    /// up (a leader transfer's TimeoutNow, a step-down) before any other
    /// replica can act on it, without waiting for the cycle's fsync.
    pub fn publish_lease_loss(&mut self) {
        if !self.serving_published {
            return; // nothing readers could serve under (every follower)
        }
        let ready = self.raw.leader_ready();
        if ready && self.raw.may_claim_lease() {
            return;
        }
        // Only ever lowers what readers see; gains wait for `publish_status`.
        let mut s = self.status.write();
        s.lease = None;
        s.leader_ready &= ready;
        self.serving_published = s.leader_ready;
    }

    /// The store's liveness (for the raft loop).
    pub fn liveness(&self) -> &Arc<crate::store_liveness::StoreLiveness> {
        &self.liveness
    }

    /// Starts moving leadership (and so the lease) to replica `to`.
    pub fn transfer_leader(&mut self, to: u64) {
        self.raw.transfer_leader(to);
    }

    /// Fails every waiting proposal (the store is stopping).
    pub fn fail_pending(&mut self, err: ProposeError) {
        for (_, (_, reply)) in std::mem::take(&mut self.pending) {
            let _ = reply.send(Err(err.clone()));
        }
    }
}

/// The descriptor of a range now `cur` after a membership change: only the
/// replicas (and the next replica id) come from the change's context; the
/// span is the range's own. The context was the descriptor when the change
/// was proposed, and a split may have applied since: taking its span would
/// widen the left-hand range back over the right-hand one.
pub(crate) fn descriptor_after_change(cur: &RangeDescriptor, cc: &ConfChange, cs: &ConfState) -> RangeDescriptor {
    let mut desc = cur.clone();
    if !cc.is_leave() {
        if let Ok(ctx) = RangeDescriptor::decode(&cc.context[..]) {
            desc.replicas = ctx.replicas;
            desc.next_replica_id = desc.next_replica_id.max(ctx.next_replica_id);
        }
    }
    mark_replicas(&mut desc, cs);
    desc.generation = cur.generation + 1;
    desc
}

/// Keeps the replicas `cs` still names and marks each with its role in it:
/// in a joint configuration a voter of only one half is `VoterIncoming` or
/// `VoterOutgoing`, so nobody reads a range as fully replicated while both
/// halves must still agree.
fn mark_replicas(desc: &mut RangeDescriptor, cs: &ConfState) {
    use replica_descriptor::Type;
    let learner = |id: &u64| cs.learners.contains(id) || cs.learners_next.contains(id);
    desc.replicas.retain(|r| {
        cs.voters.contains(&r.replica_id) || cs.voters_outgoing.contains(&r.replica_id) || learner(&r.replica_id)
    });
    let joint = cs.is_joint();
    for r in &mut desc.replicas {
        let (inc, out) = (
            cs.voters.contains(&r.replica_id),
            cs.voters_outgoing.contains(&r.replica_id),
        );
        r.r#type = match (inc, out) {
            (true, true) => Type::Voter,
            (true, false) if joint => Type::VoterIncoming,
            (true, false) => Type::Voter,
            (false, true) => Type::VoterOutgoing,
            (false, false) => Type::Learner,
        } as i32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::storage::ReplicaDescriptor;
    use replica_descriptor::Type;

    fn desc(ids: &[u64]) -> RangeDescriptor {
        RangeDescriptor {
            replicas: ids
                .iter()
                .map(|&id| ReplicaDescriptor {
                    node_id: id,
                    store_id: id,
                    replica_id: id,
                    r#type: 0,
                })
                .collect(),
            ..Default::default()
        }
    }

    fn types(d: &RangeDescriptor) -> Vec<(u64, Type)> {
        d.replicas
            .iter()
            .map(|r| (r.replica_id, Type::try_from(r.r#type).unwrap()))
            .collect()
    }

    #[test]
    fn a_membership_change_proposed_before_a_split_keeps_the_split_span() {
        // Proposed when the range was [a, z) (generation 4), applied after it
        // split to [a, m) (generation 5): the span stays [a, m).
        let mut before = desc(&[1, 2]);
        before.range_id = 3;
        before.start_key = b"a".to_vec();
        before.end_key = b"z".to_vec();
        before.generation = 4;
        before.next_replica_id = 3;
        let mut ctx = before.clone();
        ctx.replicas = desc(&[1, 2, 3]).replicas;
        ctx.next_replica_id = 4;
        let mut now = before.clone();
        now.end_key = b"m".to_vec();
        now.generation = 5;
        let cc = ConfChange {
            changes: vec![raft::ConfChangeSingle {
                kind: raft::ConfChangeKind::AddLearner,
                node: 3,
            }],
            context: ctx.encode_to_vec(),
        };
        let cs = ConfState {
            voters: vec![1, 2],
            learners: vec![3],
            ..Default::default()
        };
        let after = descriptor_after_change(&now, &cc, &cs);
        assert_eq!(
            (after.start_key.as_slice(), after.end_key.as_slice()),
            (&b"a"[..], &b"m"[..])
        );
        assert_eq!(after.generation, 6);
        assert_eq!(after.next_replica_id, 4);
        assert_eq!(
            types(&after),
            vec![(1, Type::Voter), (2, Type::Voter), (3, Type::Learner)]
        );
    }

    #[test]
    fn a_joint_configuration_is_not_shown_as_fully_replicated() {
        // Promoting learner 3 into {1, 2}: old half {1, 2}, new half {1, 2, 3}.
        let mut d = desc(&[1, 2, 3]);
        let joint = ConfState {
            voters: vec![1, 2, 3],
            voters_outgoing: vec![1, 2],
            ..Default::default()
        };
        mark_replicas(&mut d, &joint);
        assert_eq!(
            types(&d),
            vec![(1, Type::Voter), (2, Type::Voter), (3, Type::VoterIncoming)]
        );
        // Replacing 2 by 3: 2 is outgoing.
        let mut d = desc(&[1, 2, 3]);
        let swap = ConfState {
            voters: vec![1, 3],
            voters_outgoing: vec![1, 2],
            ..Default::default()
        };
        mark_replicas(&mut d, &swap);
        assert_eq!(
            types(&d),
            vec![(1, Type::Voter), (2, Type::VoterOutgoing), (3, Type::VoterIncoming)]
        );
        // Left: everyone named is a plain voter or learner; others are dropped.
        let mut d = desc(&[1, 2, 3, 4]);
        let left = ConfState {
            voters: vec![1, 2, 3],
            learners: vec![4],
            ..Default::default()
        };
        mark_replicas(&mut d, &left);
        assert_eq!(
            types(&d),
            vec![(1, Type::Voter), (2, Type::Voter), (3, Type::Voter), (4, Type::Learner)]
        );
        let mut d = desc(&[1, 2, 5]);
        mark_replicas(&mut d, &left);
        assert_eq!(types(&d), vec![(1, Type::Voter), (2, Type::Voter)]);
    }
}
