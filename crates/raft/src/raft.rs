//! The Raft state machine: roles, terms, elections, and the dispatch of every
//! message. Replication, reads and membership live in sibling modules as further
//! `impl` blocks of [`Raft`].
//!
//! Everything here is a function of the inputs (ticks, messages, proposals and
//! persistence reports) and of a seeded RNG: no clock, no I/O, no threads.

use crate::log::RaftLog;
use crate::progress::Tracker;
use crate::quorum::VoteResult;
use crate::storage::{Storage, StorageError};
use crate::types::{Entry, EntryPayload, HardState, Message, MessageBody, NodeId, ReadState, Role, SoftState, NONE};

/// Planted bugs, switched on at run time by the simulator's mutation tests to
/// prove it catches them. Compiled only into tests; all off by default.
#[cfg(test)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Mutations {
    /// Commit by counting replicas of an entry of an older term.
    pub commit_old_term: bool,
    /// Grant a second vote in the same term.
    pub double_vote: bool,
    /// Accept appends without the log-matching check.
    pub skip_log_matching: bool,
    /// Answer votes before the vote is durable.
    pub vote_before_durable: bool,
    /// Grant votes while supporting a fortified leader.
    pub vote_while_fortified: bool,
    /// Heartbeats carry the leader's commit index, not min(commit, match).
    pub heartbeat_full_commit: bool,
    /// Not the core's: the simulated store liveness counts on a grant for
    /// twice the supporter's interval (support extended past its interval).
    pub support_past_interval: bool,
    /// Let a new leader propose a configuration change before its term's
    /// first entry is applied.
    pub early_conf_change: bool,
}

/// Settings of one Raft group member.
#[derive(Clone, Debug)]
pub struct Config {
    pub id: NodeId,
    /// The minimum election timeout in ticks; the randomized timeout is in
    /// `[election_ticks, 2 * election_ticks)`.
    pub election_ticks: u64,
    pub heartbeat_ticks: u64,
    /// The index the node's state machine has applied (on restart).
    pub applied: u64,
    /// At most this many append messages in flight to one follower.
    pub max_inflight_msgs: usize,
    /// At most this many entry bytes in flight to one follower.
    pub max_inflight_bytes: u64,
    /// Entry bytes per append message (at least one entry is always sent).
    pub max_msg_bytes: u64,
    /// Entry bytes per `Ready` to apply.
    pub max_apply_bytes: u64,
    pub pre_vote: bool,
    pub check_quorum: bool,
    /// Seeds the RNG of randomized election timeouts.
    pub seed: u64,
    #[cfg(test)]
    pub mutations: Mutations,
}

impl Config {
    pub fn new(id: NodeId) -> Self {
        Config {
            id,
            election_ticks: 10,
            heartbeat_ticks: 1,
            applied: 0,
            max_inflight_msgs: 256,
            max_inflight_bytes: 8 << 20,
            max_msg_bytes: 1 << 20,
            max_apply_bytes: 16 << 20,
            pre_vote: true,
            check_quorum: true,
            seed: id,
            #[cfg(test)]
            mutations: Mutations::default(),
        }
    }

    /// Checks the settings; the error says what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if self.id == NONE {
            return Err("id must not be 0".into());
        }
        if self.heartbeat_ticks == 0 {
            return Err("heartbeat_ticks must be positive".into());
        }
        if self.election_ticks <= self.heartbeat_ticks {
            return Err("election_ticks must be greater than heartbeat_ticks".into());
        }
        if self.max_inflight_msgs == 0 || self.max_inflight_bytes == 0 {
            return Err("in-flight limits must be positive".into());
        }
        Ok(())
    }
}

/// Why a proposal was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProposeError {
    /// This node is not the leader; `leader` is the one it knows of, if any.
    NotLeader { leader: NodeId },
    /// A leader transfer is in progress.
    TransferInProgress,
    /// A configuration change is still pending (proposed and not applied), or
    /// this leader has not yet applied its term's first entry.
    ConfChangePending,
    /// The configuration change does not fit the current configuration.
    InvalidConfChange(String),
}

impl std::fmt::Display for ProposeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProposeError::NotLeader { leader } => write!(f, "not leader (leader is {leader})"),
            ProposeError::TransferInProgress => write!(f, "leader transfer in progress"),
            ProposeError::ConfChangePending => write!(f, "a configuration change is pending"),
            ProposeError::InvalidConfChange(s) => write!(f, "invalid configuration change: {s}"),
        }
    }
}

impl std::error::Error for ProposeError {}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CampaignKind {
    PreElection,
    Election,
    Transfer,
}

/// A read index request waiting for a quorum to confirm leadership.
#[derive(Clone, Debug)]
pub(crate) struct PendingRead {
    pub ctx: Vec<u8>,
    pub index: u64,
    pub seq: u64,
    pub from: NodeId,
}

/// Counters of what a member has been through, for tests and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RaftCounters {
    pub elections_won: u64,
    pub snapshots_sent: u64,
    pub snapshots_restored: u64,
    pub transfers_started: u64,
    pub conf_changes_applied: u64,
    pub invalid_conf_changes: u64,
    /// Vote and pre-vote requests ignored because a leader's lease may be valid.
    pub votes_ignored_in_lease: u64,
    /// Times this leader quiesced.
    pub quiesced: u64,
}

/// One member of a Raft group.
pub struct Raft<S: Storage> {
    pub id: NodeId,
    pub term: u64,
    pub vote: NodeId,
    pub leader: NodeId,
    pub role: Role,
    pub(crate) log: RaftLog<S>,
    pub(crate) trk: Tracker,
    pub(crate) cfg: Config,
    pub(crate) election_elapsed: u64,
    pub(crate) heartbeat_elapsed: u64,
    pub(crate) randomized_timeout: u64,
    /// Ticks since this member started (saturating at the election timeout).
    pub(crate) ticks_since_start: u64,
    /// Ticks since this member last heard from a leader (saturating at
    /// `u64::MAX`). Unlike `election_elapsed`, a change of term does not
    /// reset it: it is the promise a leader's lease rests on, and a follower
    /// moved to a new term (by a stale answer to its own pre-vote, say) must
    /// keep it.
    pub(crate) lease_elapsed: u64,
    rng: u64,
    /// Messages that may be sent at once.
    pub(crate) msgs: Vec<Message>,
    /// Messages that may be sent only once the state they report is durable.
    pub(crate) msgs_after_persist: Vec<Message>,
    /// Index of the last configuration change proposed (or, for a new leader,
    /// of its term's first entry): no other change until it is applied.
    pub(crate) pending_conf_index: u64,
    pub lead_transferee: NodeId,
    /// A TimeoutNow was sent in this term: no lease may be claimed in it.
    pub(crate) lease_disabled_term: u64,
    /// The latest heartbeat round started by this leader.
    pub(crate) hb_seq: u64,
    pub(crate) read_states: Vec<ReadState>,
    pub(crate) pending_reads: Vec<PendingRead>,
    /// Reads that arrived before this leader committed an entry of its term.
    pub(crate) reads_waiting_commit: Vec<(Vec<u8>, NodeId)>,
    /// The candidate's own vote, counted once it is durable.
    pub(crate) self_vote_pending: bool,
    /// Proposals were appended since the last broadcast: appends go out once
    /// per `Ready`, not once per proposal.
    pub(crate) proposals_unsent: bool,
    /// Index of the empty entry this leader appended when elected.
    pub(crate) term_start_index: u64,
    /// The node's store epoch (0: no store liveness, no leases).
    pub(crate) store_epoch: u64,
    /// This member's promise to a fortified leader (kept across a change of
    /// term until released: see `fortify`).
    pub(crate) fortified: Option<crate::fortify::Fortification>,
    /// The term this member led (fortified) and stepped down from, until it
    /// has released its followers' promises.
    pub(crate) defortify_term: u64,
    /// A quiesced leader: no ticks, no heartbeats.
    pub(crate) quiesced: bool,
    /// The heartbeat round (and last index) quiescence waits for.
    pub(crate) quiesce_round: Option<(u64, u64)>,
    /// What the lease rests on changed since the last `Ready` (a promise
    /// arrived or was lost): the next `Ready` tells the node, even if empty.
    pub(crate) lease_changed: bool,
    pub counters: RaftCounters,
}

impl<S: Storage> Raft<S> {
    pub fn new(cfg: Config, storage: S) -> Result<Self, StorageError> {
        cfg.validate().map_err(StorageError::Other)?;
        let (hs, cs) = storage.initial_state()?;
        let log = RaftLog::new(storage, hs.commit, cfg.applied)?;
        let mut r = Raft {
            id: cfg.id,
            term: hs.term,
            vote: hs.vote,
            leader: NONE,
            role: Role::Follower,
            log,
            trk: Tracker::default(),
            rng: cfg.seed ^ 0x9E37_79B9_7F4A_7C15,
            cfg,
            election_elapsed: 0,
            heartbeat_elapsed: 0,
            randomized_timeout: 0,
            ticks_since_start: 0,
            lease_elapsed: u64::MAX,
            msgs: Vec::new(),
            msgs_after_persist: Vec::new(),
            pending_conf_index: 0,
            lead_transferee: NONE,
            lease_disabled_term: 0,
            hb_seq: 0,
            read_states: Vec::new(),
            pending_reads: Vec::new(),
            reads_waiting_commit: Vec::new(),
            self_vote_pending: false,
            proposals_unsent: false,
            term_start_index: 0,
            store_epoch: 0,
            fortified: None,
            defortify_term: 0,
            quiesced: false,
            quiesce_round: None,
            lease_changed: false,
            counters: RaftCounters::default(),
        };
        let next = r.log.last_index() + 1;
        r.trk.set_conf(&cs, next);
        r.become_follower(hs.term, NONE);
        Ok(r)
    }

    pub fn hard_state(&self) -> HardState {
        HardState {
            term: self.term,
            vote: self.vote,
            commit: self.log.committed,
        }
    }

    pub fn soft_state(&self) -> SoftState {
        SoftState {
            leader: self.leader,
            role: self.role,
        }
    }

    fn next_rand(&mut self) -> u64 {
        // SplitMix64.
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn reset_randomized_timeout(&mut self) {
        let e = self.cfg.election_ticks;
        self.randomized_timeout = e + self.next_rand() % e;
    }

    /// Whether this member may campaign: a voter with no snapshot pending.
    pub fn promotable(&self) -> bool {
        self.trk.is_voter(self.id) && self.log.pending_snapshot().is_none()
    }

    // ---- sending -------------------------------------------------------------

    pub(crate) fn send(&mut self, to: NodeId, term: u64, body: MessageBody) {
        #[cfg(test)]
        let votes_wait = !self.cfg.mutations.vote_before_durable;
        #[cfg(not(test))]
        let votes_wait = true;
        let after_persist = match &body {
            MessageBody::AppendResponse { .. } => true,
            MessageBody::VoteResponse { .. } => votes_wait,
            _ => false,
        };
        let m = Message {
            from: self.id,
            to,
            term,
            body,
        };
        if after_persist {
            self.msgs_after_persist.push(m);
        } else {
            self.msgs.push(m);
        }
    }

    // ---- role changes --------------------------------------------------------

    fn reset(&mut self, term: u64) {
        if self.term != term {
            self.term = term;
            self.vote = NONE;
        }
        self.leader = NONE;
        self.election_elapsed = 0;
        self.heartbeat_elapsed = 0;
        self.reset_randomized_timeout();
        self.lead_transferee = NONE;
        self.trk.reset_votes();
        self.self_vote_pending = false;
        let next = self.log.last_index() + 1;
        for p in self.trk.progress.values_mut() {
            *p = crate::progress::Progress::new(next, p.is_learner);
        }
        self.pending_conf_index = 0;
        self.pending_reads.clear();
        self.reads_waiting_commit.clear();
        self.quiesced = false;
        self.quiesce_round = None;
    }

    pub fn become_follower(&mut self, term: u64, leader: NodeId) {
        if self.role == Role::Leader && self.store_epoch != 0 {
            // Release the promises made to this leadership.
            self.defortify_term = self.term;
        }
        self.reset(term);
        self.leader = leader;
        self.role = Role::Follower;
    }

    fn become_pre_candidate(&mut self) {
        // A pre-candidate changes neither term nor vote.
        self.trk.reset_votes();
        self.self_vote_pending = false;
        self.leader = NONE;
        self.role = Role::PreCandidate;
    }

    fn become_candidate(&mut self) {
        let t = self.term + 1;
        self.reset(t);
        self.vote = self.id;
        self.role = Role::Candidate;
        // Our own vote counts once the hard state carrying it is durable.
        self.self_vote_pending = true;
    }

    pub(crate) fn become_leader(&mut self) {
        let t = self.term;
        self.reset(t);
        self.leader = self.id;
        self.role = Role::Leader;
        self.counters.elections_won += 1;
        let durable = self.log.durable_index();
        if let Some(p) = self.trk.progress.get_mut(&self.id) {
            p.matched = durable;
            p.become_replicate();
            p.recent_active = true;
        }
        self.defortify_term = 0;
        self.fortified = None;
        let index = self.log.last_index() + 1;
        self.log.append(&[Entry {
            term: self.term,
            index,
            payload: EntryPayload::Empty,
        }]);
        self.term_start_index = index;
        // No configuration change until the term's first entry is applied.
        self.pending_conf_index = index;
        #[cfg(test)]
        if self.cfg.mutations.early_conf_change {
            self.pending_conf_index = 0;
        }
        self.bcast_append();
        self.bcast_fortify();
    }

    // ---- ticks ---------------------------------------------------------------

    pub fn tick(&mut self) {
        if self.ticks_since_start < self.cfg.election_ticks {
            self.ticks_since_start += 1;
        }
        self.lease_elapsed = self.lease_elapsed.saturating_add(1);
        match self.role {
            Role::Leader => self.tick_heartbeat(),
            _ => self.tick_election(),
        }
    }

    fn tick_election(&mut self) {
        self.election_elapsed += 1;
        self.tick_defortify();
        if self.fortified.is_some() {
            // It promised not to campaign while its store supports the
            // leader's; a withdrawal of that support releases it.
            self.election_elapsed = 0;
            return;
        }
        if self.promotable() && self.election_elapsed >= self.randomized_timeout {
            self.election_elapsed = 0;
            let kind = if self.cfg.pre_vote {
                CampaignKind::PreElection
            } else {
                CampaignKind::Election
            };
            self.campaign(kind);
        }
    }

    fn tick_heartbeat(&mut self) {
        if self.quiesced {
            return;
        }
        self.heartbeat_elapsed += 1;
        self.election_elapsed += 1;
        if self.election_elapsed >= self.cfg.election_ticks {
            self.election_elapsed = 0;
            if self.cfg.check_quorum && !self.trk.quorum_active(self.id) {
                let t = self.term;
                self.become_follower(t, NONE);
                return;
            }
            if self.lead_transferee != NONE {
                // The transfer did not finish within an election timeout.
                self.lead_transferee = NONE;
            }
            if self.lease_disabled_term == self.term {
                // A TimeoutNow left in this term and nobody took over (it
                // was lost, or its target died): this leader may never
                // claim a lease again in this term, so it steps down and
                // lets an election start a term that can have one.
                let t = self.term;
                self.become_follower(t, NONE);
                return;
            }
        }
        if self.heartbeat_elapsed >= self.cfg.heartbeat_ticks {
            self.heartbeat_elapsed = 0;
            if self.maybe_quiesce() {
                return;
            }
            self.bcast_heartbeat();
            self.bcast_fortify();
            self.note_quiesce_round();
        }
    }

    // ---- elections -----------------------------------------------------------

    /// Starts an election now (tests, bootstrap of a single node).
    pub fn campaign_now(&mut self) {
        if self.role != Role::Leader {
            let kind = if self.cfg.pre_vote {
                CampaignKind::PreElection
            } else {
                CampaignKind::Election
            };
            self.campaign(kind);
        }
    }

    pub(crate) fn campaign(&mut self, kind: CampaignKind) {
        if !self.promotable() {
            return;
        }
        let (pre, term) = match kind {
            CampaignKind::PreElection => {
                self.become_pre_candidate();
                self.trk.record_vote(self.id, true);
                (true, self.term + 1)
            }
            _ => {
                self.become_candidate();
                (false, self.term)
            }
        };
        if self.poll_and_act() {
            return;
        }
        let ids: Vec<NodeId> = self.trk.voters.ids().into_iter().filter(|&id| id != self.id).collect();
        let (last_index, last_term) = (self.log.last_index(), self.log.last_term());
        for id in ids {
            self.send(
                id,
                term,
                MessageBody::Vote {
                    pre,
                    last_index,
                    last_term,
                    transfer: kind == CampaignKind::Transfer,
                },
            );
        }
    }

    /// Tallies votes; wins or loses the election if decided. Returns whether
    /// the election is over.
    pub(crate) fn poll_and_act(&mut self) -> bool {
        match self.trk.tally() {
            VoteResult::Won => {
                if self.role == Role::PreCandidate {
                    self.campaign(CampaignKind::Election);
                } else if self.role == Role::Candidate {
                    self.become_leader();
                }
                true
            }
            VoteResult::Lost => {
                let t = self.term;
                self.become_follower(t, NONE);
                true
            }
            VoteResult::Pending => false,
        }
    }

    /// Whether this member would still honour the lease of a leader it heard
    /// from, in this term or an earlier one (or, having just started, of one
    /// it may have heard from): until then it grants no vote but a leader
    /// transfer's.
    pub(crate) fn in_lease(&self) -> bool {
        let heard_recently = self.lease_elapsed < self.cfg.election_ticks;
        #[cfg(test)]
        if self.cfg.mutations.vote_while_fortified {
            // The planted bug ignores the promise; the check-quorum rule
            // below, which no lease rests on any more, would only hide it
            // while the leader keeps talking.
            return self.cfg.check_quorum && self.ticks_since_start < self.cfg.election_ticks;
        }
        // The promise to a fortified leader (its lease rests on it); the
        // restart quiet period (promises of a forgotten process); and, as
        // etcd's check-quorum, a leader heard within an election timeout.
        // The quiet period holds whenever leases may exist (store liveness
        // on), even without check-quorum: a restarted store forgot promises
        // a leader may still count.
        let restarting = self.ticks_since_start < self.cfg.election_ticks;
        self.fortified.is_some()
            || (restarting && (self.cfg.check_quorum || self.store_epoch != 0))
            || (self.cfg.check_quorum && (self.role == Role::Leader || heard_recently))
    }

    // ---- messages ------------------------------------------------------------

    /// Handles a message from another member.
    pub fn step(&mut self, m: Message) {
        if m.term == 0 || m.from == NONE || m.from == self.id {
            return; // not a message any correct member sends
        }
        self.unquiesce();
        if let MessageBody::Defortify { term } = m.body {
            // Whatever the terms now: it names the leadership it ends.
            self.handle_defortify(m.from, term);
            return;
        }
        if m.term > self.term {
            if let MessageBody::Vote { transfer: false, .. } = &m.body {
                if self.in_lease() {
                    self.counters.votes_ignored_in_lease += 1;
                    return; // the leader we heard from may still hold its lease
                }
            }
            match &m.body {
                MessageBody::Vote { pre: true, .. } => {}
                MessageBody::VoteResponse {
                    pre: true,
                    reject: false,
                } => {}
                MessageBody::Append { .. }
                | MessageBody::Heartbeat { .. }
                | MessageBody::Snapshot { .. }
                | MessageBody::Fortify { .. } => {
                    // A leader of a newer term was elected: any promise to
                    // an older one was released for that (or its lease
                    // given up by a transfer).
                    if self.fortified.is_some_and(|f| f.leader != m.from || f.term < m.term) {
                        self.fortified = None;
                    }
                    self.become_follower(m.term, m.from)
                }
                _ => self.become_follower(m.term, NONE),
            }
        } else if m.term < self.term {
            match &m.body {
                MessageBody::Append { .. } | MessageBody::Heartbeat { .. }
                    if self.cfg.check_quorum || self.cfg.pre_vote =>
                {
                    // Tell the stale leader about the newer term so it steps down.
                    let t = self.term;
                    self.send(
                        m.from,
                        t,
                        MessageBody::AppendResponse {
                            index: 0,
                            reject: false,
                            hint_index: 0,
                            hint_term: 0,
                        },
                    );
                }
                MessageBody::Vote { pre: true, .. } => {
                    let t = self.term;
                    self.send(
                        m.from,
                        t,
                        MessageBody::VoteResponse {
                            pre: true,
                            reject: true,
                        },
                    );
                }
                _ => {}
            }
            return;
        }

        if let MessageBody::Vote {
            pre,
            last_index,
            last_term,
            transfer,
        } = m.body
        {
            self.handle_vote(&m, pre, last_index, last_term, transfer);
            return;
        }
        match self.role {
            Role::Leader => self.step_leader(m),
            Role::Candidate | Role::PreCandidate => self.step_candidate(m),
            Role::Follower => self.step_follower(m),
        }
    }

    fn handle_vote(&mut self, m: &Message, pre: bool, last_index: u64, last_term: u64, transfer: bool) {
        let mut can_vote =
            self.vote == m.from || (self.vote == NONE && self.leader == NONE) || (pre && m.term > self.term);
        if self.vote != m.from && !transfer && self.in_lease() {
            // A term reached without a leader (a stale answer to a pre-vote)
            // does not release the promise made to the last leader heard.
            self.counters.votes_ignored_in_lease += 1;
            can_vote = false;
        }
        #[cfg(test)]
        if self.cfg.mutations.double_vote && !pre && self.role == Role::Follower {
            can_vote = true;
        }
        if self.role == Role::Leader && !pre && m.term == self.term {
            can_vote = false;
        }
        if can_vote && self.log.is_up_to_date(last_index, last_term) {
            self.send(m.from, m.term, MessageBody::VoteResponse { pre, reject: false });
            if !pre {
                self.election_elapsed = 0;
                self.vote = m.from;
            }
        } else {
            let t = self.term;
            self.send(m.from, t, MessageBody::VoteResponse { pre, reject: true });
        }
    }

    fn step_candidate(&mut self, m: Message) {
        match m.body {
            MessageBody::Append { .. } => {
                self.become_follower(m.term, m.from);
                self.lease_elapsed = 0;
                self.handle_append(m);
            }
            MessageBody::Heartbeat { commit, seq } => {
                self.become_follower(m.term, m.from);
                self.lease_elapsed = 0;
                self.handle_heartbeat(m.from, commit, seq);
            }
            MessageBody::Snapshot { snapshot } => {
                self.become_follower(m.term, m.from);
                self.lease_elapsed = 0;
                self.handle_snapshot(m.from, snapshot);
            }
            MessageBody::Fortify { epoch } => {
                self.become_follower(m.term, m.from);
                self.lease_elapsed = 0;
                self.handle_fortify(m.from, epoch);
            }
            MessageBody::VoteResponse { pre, reject } => {
                if pre != (self.role == Role::PreCandidate) {
                    return; // a response to another phase
                }
                self.trk.record_vote(m.from, !reject);
                self.poll_and_act();
            }
            _ => {}
        }
    }

    fn step_follower(&mut self, m: Message) {
        match m.body {
            MessageBody::Append { .. } => {
                self.election_elapsed = 0;
                self.lease_elapsed = 0;
                self.leader = m.from;
                self.handle_append(m);
            }
            MessageBody::Heartbeat { commit, seq } => {
                self.election_elapsed = 0;
                self.lease_elapsed = 0;
                self.leader = m.from;
                self.handle_heartbeat(m.from, commit, seq);
            }
            MessageBody::Snapshot { snapshot } => {
                self.election_elapsed = 0;
                self.lease_elapsed = 0;
                self.leader = m.from;
                self.handle_snapshot(m.from, snapshot);
            }
            MessageBody::Fortify { epoch } => {
                self.election_elapsed = 0;
                self.lease_elapsed = 0;
                self.leader = m.from;
                self.handle_fortify(m.from, epoch);
            }
            MessageBody::TimeoutNow => {
                // Campaign at once, bypassing pre-vote and others' leases.
                self.campaign(CampaignKind::Transfer);
            }
            MessageBody::ReadIndex { ctx } if self.leader != NONE => {
                let (leader, t) = (self.leader, self.term);
                self.send(leader, t, MessageBody::ReadIndex { ctx });
            }
            MessageBody::ReadIndexResponse { ctx, index } => {
                self.read_states.push(ReadState { index, ctx });
            }
            _ => {}
        }
    }

    fn step_leader(&mut self, m: Message) {
        if let Some(p) = self.trk.progress.get_mut(&m.from) {
            p.recent_active = true;
        }
        match m.body {
            MessageBody::AppendResponse {
                index,
                reject,
                hint_index,
                hint_term,
            } => self.handle_append_response(m.from, index, reject, hint_index, hint_term),
            MessageBody::HeartbeatResponse { seq, fortified } => {
                self.handle_heartbeat_response(m.from, seq);
                if !fortified && self.store_epoch != 0 && self.trk.is_voter(m.from) {
                    // It does not hold this term's promise (it restarted, or
                    // the fortification was lost or refused): ask again.
                    if let Some(p) = self.trk.progress.get_mut(&m.from) {
                        self.lease_changed |= p.fortified.take().is_some();
                    }
                    let (t, epoch) = (self.term, self.store_epoch);
                    self.send(m.from, t, MessageBody::Fortify { epoch });
                }
            }
            MessageBody::FortifyResponse { epoch, incarnation } => {
                self.handle_fortify_response(m.from, epoch, incarnation)
            }
            MessageBody::ReadIndex { ctx } => self.handle_read_index(ctx, m.from),
            _ => {}
        }
    }

    /// Proposes application data; returns the (index, term) it will have.
    pub fn propose(&mut self, data: Vec<u8>) -> Result<(u64, u64), ProposeError> {
        self.propose_payload(EntryPayload::Normal(data))
    }

    pub(crate) fn propose_payload(&mut self, payload: EntryPayload) -> Result<(u64, u64), ProposeError> {
        if self.role != Role::Leader {
            return Err(ProposeError::NotLeader { leader: self.leader });
        }
        self.unquiesce();
        if self.lead_transferee != NONE {
            return Err(ProposeError::TransferInProgress);
        }
        if !self.trk.progress.contains_key(&self.id) {
            return Err(ProposeError::NotLeader { leader: NONE });
        }
        let index = self.log.last_index() + 1;
        self.log.append(&[Entry {
            term: self.term,
            index,
            payload,
        }]);
        self.proposals_unsent = true;
        Ok((index, self.term))
    }

    /// Whether this leader has applied the first entry of its term: only then
    /// does its state hold every write an earlier leader may have acknowledged,
    /// so only then may it evaluate reads and writes.
    pub fn leader_ready(&self) -> bool {
        self.role == Role::Leader && self.log.applied >= self.term_start_index
    }

    /// Sends the appends that proposals since the last call need.
    pub fn flush_proposals(&mut self) {
        if std::mem::take(&mut self.proposals_unsent) && self.role == Role::Leader {
            self.bcast_append();
        }
    }
}
