//! The plain values Raft works with: entries, messages, hard state,
//! configurations and snapshots. Their protobuf form for the wire is converted at
//! the edge (kvserver), so the core depends on nothing.

/// A node (replica) id within one group. 0 means "none".
pub type NodeId = u64;
/// "No node": no leader known, no vote cast.
pub const NONE: NodeId = 0;

/// What an entry carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryPayload {
    /// The empty entry a new leader appends in its term.
    Empty,
    /// An application command, opaque to Raft.
    Normal(Vec<u8>),
    /// A membership change (joint consensus).
    ConfChange(ConfChange),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub term: u64,
    pub index: u64,
    pub payload: EntryPayload,
}

impl Entry {
    /// Approximate size in bytes, for flow control and message size limits.
    pub fn size(&self) -> u64 {
        16 + match &self.payload {
            EntryPayload::Empty => 0,
            EntryPayload::Normal(d) => d.len() as u64,
            EntryPayload::ConfChange(cc) => 8 * cc.changes.len() as u64 + 8,
        }
    }
}

/// The state Raft must persist before it answers or counts itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HardState {
    pub term: u64,
    pub vote: NodeId,
    pub commit: u64,
}

/// One change of a membership change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfChangeKind {
    /// Add a voter, or promote a learner.
    AddVoter,
    /// Add a learner, or demote a voter.
    AddLearner,
    /// Remove a node, voter or learner.
    Remove,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConfChangeSingle {
    pub kind: ConfChangeKind,
    pub node: NodeId,
}

/// A membership change. A non-empty list enters a joint configuration (old and
/// new voters must both agree); an empty list leaves it. The leader proposes the
/// leave itself once the joint configuration is applied.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConfChange {
    pub changes: Vec<ConfChangeSingle>,
    /// Opaque to raft: the node's own description of the change (kvserver
    /// puts the new range descriptor here).
    pub context: Vec<u8>,
}

impl ConfChange {
    pub fn leave_joint() -> Self {
        ConfChange::default()
    }
    pub fn is_leave(&self) -> bool {
        self.changes.is_empty()
    }
}

/// A configuration as persisted and carried in snapshots.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConfState {
    /// Voters of the (incoming) configuration.
    pub voters: Vec<NodeId>,
    /// Voters of the outgoing configuration; non-empty only when joint.
    pub voters_outgoing: Vec<NodeId>,
    pub learners: Vec<NodeId>,
    /// Voters being demoted: learners once the joint configuration is left.
    pub learners_next: Vec<NodeId>,
}

impl ConfState {
    pub fn with_voters(voters: &[NodeId]) -> Self {
        ConfState {
            voters: voters.to_vec(),
            ..Default::default()
        }
    }
    pub fn is_joint(&self) -> bool {
        !self.voters_outgoing.is_empty()
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotMeta {
    pub index: u64,
    pub term: u64,
    pub conf_state: ConfState,
}

/// A snapshot of the state machine at `meta.index`. `data` is opaque to Raft
/// (the node may put a handle to data streamed separately).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub meta: SnapshotMeta,
    pub data: Vec<u8>,
}

/// A message between nodes of one group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub from: NodeId,
    pub to: NodeId,
    pub term: u64,
    pub body: MessageBody,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MessageBody {
    /// Entries after (`index`, `log_term`), and the leader's commit index.
    Append {
        log_term: u64,
        index: u64,
        entries: Vec<Entry>,
        commit: u64,
    },
    /// Accepts up to `index`, or rejects the append at `index` with a hint of
    /// where the follower's log may match: (`hint_index`, `hint_term`).
    AppendResponse {
        index: u64,
        reject: bool,
        hint_index: u64,
        hint_term: u64,
    },
    /// A (pre-)vote request; `transfer` marks a campaign started by TimeoutNow.
    Vote {
        pre: bool,
        last_index: u64,
        last_term: u64,
        transfer: bool,
    },
    VoteResponse {
        pre: bool,
        reject: bool,
    },
    /// The leader's heartbeat of round `seq`; `commit` is capped at what the
    /// follower is known to have.
    Heartbeat {
        commit: u64,
        seq: u64,
    },
    /// `fortified`: the follower holds the sender's fortification of this
    /// term (if not, a fortifying leader sends `Fortify` again).
    HeartbeatResponse {
        seq: u64,
        fortified: bool,
    },
    /// A leader asks a follower to promise not to vote for anyone else while
    /// the follower's store supports the leader's store at `epoch`. The node
    /// delivers it only if its store does support that epoch.
    Fortify {
        epoch: u64,
    },
    /// The follower promised; `incarnation` is its store's (a promise counts
    /// only while the support the leader's store has comes from that same
    /// incarnation: a restarted store forgot it).
    FortifyResponse {
        epoch: u64,
        incarnation: u64,
    },
    /// A leader of term `term` that stepped down releases its followers'
    /// promises.
    Defortify {
        term: u64,
    },
    Snapshot {
        snapshot: Snapshot,
    },
    /// Campaign now, on a leader transfer.
    TimeoutNow,
    /// A follower asks the leader for a read index on behalf of `ctx`.
    ReadIndex {
        ctx: Vec<u8>,
    },
    ReadIndexResponse {
        ctx: Vec<u8>,
        index: u64,
    },
}

impl MessageBody {
    /// A short name for logs and simulator statistics.
    pub fn name(&self) -> &'static str {
        match self {
            MessageBody::Append { .. } => "Append",
            MessageBody::AppendResponse { .. } => "AppendResponse",
            MessageBody::Vote { pre: true, .. } => "PreVote",
            MessageBody::Vote { .. } => "Vote",
            MessageBody::VoteResponse { pre: true, .. } => "PreVoteResponse",
            MessageBody::VoteResponse { .. } => "VoteResponse",
            MessageBody::Heartbeat { .. } => "Heartbeat",
            MessageBody::HeartbeatResponse { .. } => "HeartbeatResponse",
            MessageBody::Fortify { .. } => "Fortify",
            MessageBody::FortifyResponse { .. } => "FortifyResponse",
            MessageBody::Defortify { .. } => "Defortify",
            MessageBody::Snapshot { .. } => "Snapshot",
            MessageBody::TimeoutNow => "TimeoutNow",
            MessageBody::ReadIndex { .. } => "ReadIndex",
            MessageBody::ReadIndexResponse { .. } => "ReadIndexResponse",
        }
    }
}

/// A read that may be served once the state machine has applied `index`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadState {
    pub index: u64,
    pub ctx: Vec<u8>,
}

/// A node's role.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Follower,
    PreCandidate,
    Candidate,
    Leader,
}

/// Volatile state that the node may want to observe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SoftState {
    pub leader: NodeId,
    pub role: Role,
}
