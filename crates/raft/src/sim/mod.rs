//! A deterministic simulator of a Raft group (compiled only for tests).
//!
//! N nodes run the real core over in-memory storage. A seeded scheduler picks,
//! step by step, what happens next: a tick, a message delivery (in any order,
//! after a random delay), the completion of a node's oldest pending disk write,
//! a client proposal, a read, a membership change, a leader transfer, a log
//! compaction, or a fault: dropping or duplicating a message, cutting or healing
//! a (possibly one-way) partition, crashing a node (it keeps only what it made
//! durable) and restarting it, pausing and resuming one. After every step the
//! [`checker::Checker`] verifies Raft's safety properties. The run ends with a
//! calm period (no faults) in which a leader must be elected and a proposal
//! must commit and apply everywhere within a stated number of ticks.

pub mod checker;
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use checker::{chain, Checker};

use crate::node::{RawNode, Ready};
use crate::raft::{Config, Mutations};
use crate::storage::{MemStorage, Storage, StorageError};
use crate::support::{first_epoch, SupportConfig, SupportManager, SupportMsg};
use crate::types::*;

/// Simulated time units per tick.
pub const TICK: u64 = 3;
/// The minimum election timeout in ticks.
pub const ELECTION_TICKS: u64 = 6;
/// How long a store's support lasts (time units): within the restart quiet
/// period of `ELECTION_TICKS` ticks, as in the node.
pub const SUPPORT_INTERVAL: u64 = (ELECTION_TICKS - 1) * TICK;
/// Under faults, how often (per mille) a node's tick fires late.
pub const LATE_TICK_PER_MILLE: u64 = 50;
/// After faults stop, a leader must exist and a proposal must be applied by
/// every live member within this many ticks.
pub const CALM_LIVENESS_TICKS: u64 = 20 * ELECTION_TICKS;

/// What one run exercised.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    pub steps: u64,
    pub elections: u64,
    pub snapshots: u64,
    pub joint_configs: u64,
    pub transfers: u64,
    pub crashes: u64,
    pub partitions: u64,
    pub pauses: u64,
    pub drops: u64,
    pub duplicates: u64,
    pub proposals_acked: u64,
    pub reads: u64,
    pub compactions: u64,
    /// Steps at which some node held a valid lease.
    pub lease_steps: u64,
    pub votes_ignored_in_lease: u64,
    /// Times a leader quiesced.
    pub quiesced: u64,
    /// Supports withdrawn.
    pub withdrawals: u64,
}

impl std::ops::AddAssign for Stats {
    fn add_assign(&mut self, o: Stats) {
        self.steps += o.steps;
        self.elections += o.elections;
        self.snapshots += o.snapshots;
        self.joint_configs += o.joint_configs;
        self.transfers += o.transfers;
        self.crashes += o.crashes;
        self.partitions += o.partitions;
        self.pauses += o.pauses;
        self.drops += o.drops;
        self.duplicates += o.duplicates;
        self.proposals_acked += o.proposals_acked;
        self.reads += o.reads;
        self.compactions += o.compactions;
        self.lease_steps += o.lease_steps;
        self.votes_ignored_in_lease += o.votes_ignored_in_lease;
        self.quiesced += o.quiesced;
        self.withdrawals += o.withdrawals;
    }
}

/// How a run is set up.
#[derive(Clone, Copy, Debug)]
pub struct SimConfig {
    pub seed: u64,
    pub nodes: u64,
    pub steps: u64,
    pub mutations: Mutations,
}

/// Per-seed knobs, drawn from the seed, so that runs differ in character:
/// busy or quiet clients, one entry per message or batches, narrow or wide
/// flow-control windows, more or fewer crashes.
#[derive(Clone, Copy, Debug)]
pub struct Profile {
    pub propose_per_mille: u64,
    pub crash_per_mille: u64,
    pub long_delay_per_mille: u64,
    pub max_msg_bytes: u64,
    pub max_inflight_msgs: usize,
}

impl Profile {
    fn draw(rng: &mut Rng) -> Profile {
        Profile {
            propose_per_mille: [20, 100, 200, 400][rng.below(4) as usize],
            crash_per_mille: [2, 4, 10][rng.below(3) as usize],
            long_delay_per_mille: [0, 10, 30][rng.below(3) as usize],
            max_msg_bytes: [1, 512][rng.below(2) as usize],
            max_inflight_msgs: [1, 4, 16][rng.below(3) as usize],
        }
    }
}

/// A run that found a violation: what and where, and the events before it.
#[derive(Debug)]
pub struct Failure {
    pub seed: u64,
    pub profile: Profile,
    pub nodes: u64,
    pub step: u64,
    pub what: String,
    pub trace: Vec<String>,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "seed {} ({} nodes, {:?}) failed at step {}: {}",
            self.seed, self.nodes, self.profile, self.step, self.what
        )?;
        writeln!(
            f,
            "rerun alone: RAFT_SEED={} RAFT_NODES={} cargo test -p tardigrade-raft sim::tests::one_seed -- --nocapture",
            self.seed, self.nodes
        )?;
        writeln!(f, "last {} events:", self.trace.len())?;
        for t in &self.trace {
            writeln!(f, "  {t}")?;
        }
        Ok(())
    }
}

/// The seeded source of every choice.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0xA076_1D64_78BD_642F)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
    pub fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

// ---- the node's storage and state machine ----------------------------------

/// The state machine: which commands were applied, and a hash of the applied
/// log prefix (which doubles as the log's prefix hash at the applied index).
#[derive(Clone, Debug, Default)]
pub struct StateMachine {
    pub applied: u64,
    pub log_chain: u64,
    pub ids: BTreeSet<u64>,
}

impl StateMachine {
    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(24 + 8 * self.ids.len());
        v.extend_from_slice(&self.applied.to_le_bytes());
        v.extend_from_slice(&self.log_chain.to_le_bytes());
        for id in &self.ids {
            v.extend_from_slice(&id.to_le_bytes());
        }
        v
    }

    fn decode(b: &[u8]) -> StateMachine {
        let w = |i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        StateMachine {
            applied: w(0),
            log_chain: w(1),
            ids: (2..b.len() / 8).map(w).collect(),
        }
    }
}

/// Durable storage of a simulated node: the raft log (what was persisted) and
/// the state machine with the configuration history (durable when applied).
#[derive(Clone, Debug, Default)]
pub struct SimStorage {
    pub mem: MemStorage,
    pub sm: StateMachine,
    /// Configuration in force after each applied configuration change.
    pub confs: BTreeMap<u64, ConfState>,
}

impl SimStorage {
    fn conf_at(&self, index: u64) -> ConfState {
        self.confs
            .range(..=index)
            .next_back()
            .map(|(_, c)| c.clone())
            .unwrap_or_default()
    }
}

impl Storage for SimStorage {
    fn initial_state(&self) -> Result<(HardState, ConfState), StorageError> {
        self.mem.initial_state()
    }
    fn entries(&self, lo: u64, hi: u64, max_bytes: u64) -> Result<Vec<Entry>, StorageError> {
        self.mem.entries(lo, hi, max_bytes)
    }
    fn term(&self, index: u64) -> Result<u64, StorageError> {
        self.mem.term(index)
    }
    fn first_index(&self) -> Result<u64, StorageError> {
        self.mem.first_index()
    }
    fn last_index(&self) -> Result<u64, StorageError> {
        self.mem.last_index()
    }
    /// Built on demand from the state machine at its applied index.
    fn snapshot(&self, _request_index: u64, _to: u64) -> Result<Snapshot, StorageError> {
        let index = self.sm.applied;
        let term = self.mem.term(index)?;
        Ok(Snapshot {
            meta: SnapshotMeta {
                index,
                term,
                conf_state: self.conf_at(index),
            },
            data: self.sm.encode(),
        })
    }
}

// ---- the world -------------------------------------------------------------

struct PendingWrite {
    number: u64,
    hard_state: Option<HardState>,
    entries: Vec<Entry>,
    snapshot: Option<Snapshot>,
    persisted_messages: Vec<Message>,
}

struct SimNode {
    id: NodeId,
    raw: Option<RawNode<SimStorage>>,
    /// The durable storage while crashed.
    down_storage: Option<SimStorage>,
    pending: VecDeque<PendingWrite>,
    paused: bool,
    /// The node's log as it sees it: index -> (term, prefix hash).
    chain: BTreeMap<u64, (u64, u64)>,
    /// Its store's liveness (the node is its own store); gone while down.
    sl: Option<SupportManager>,
    restarts: u64,
    was_leader_in: u64,
    /// The commit index when it last became leader.
    commit_at_election: u64,
    /// The node's tick timer: when the next tick was scheduled, and when it
    /// fires (later if the node's loop is busy: a slow fsync, a long apply).
    tick_scheduled: u64,
    tick_at: u64,
}

impl SimNode {
    fn up(&self) -> bool {
        self.raw.is_some()
    }
    fn active(&self) -> bool {
        self.raw.is_some() && !self.paused
    }
}

struct InFlightMsg {
    deliver_at: u64,
    msg: Message,
}

struct Proposal {
    node: NodeId,
    index: u64,
    term: u64,
}

/// One simulated run.
pub struct World {
    cfg: SimConfig,
    profile: Profile,
    rng: Rng,
    now: u64,
    step: u64,
    nodes: BTreeMap<NodeId, SimNode>,
    net: Vec<InFlightMsg>,
    /// Store liveness messages in flight: (deliver at, message).
    snet: Vec<(u64, SupportMsg)>,
    /// Directed links that drop everything.
    cut: BTreeSet<(NodeId, NodeId)>,
    checker: Checker,
    next_cmd: u64,
    proposals: HashMap<u64, Proposal>,
    acked: BTreeMap<u64, u64>,
    /// Read ctx -> highest commit index known when it was requested.
    reads: HashMap<u64, u64>,
    /// Nodes that were ever in a configuration.
    ever: BTreeSet<NodeId>,
    /// Nodes removed from the configuration, never to return.
    retired: BTreeSet<NodeId>,
    faults: bool,
    /// A violation found where no error can be returned; reported by the next check.
    audit_failure: Option<String>,
    trace: VecDeque<String>,
    pub stats: Stats,
}

fn trace_len() -> usize {
    std::env::var("RAFT_TRACE_LEN")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120)
}

impl World {
    pub fn new(cfg: SimConfig) -> World {
        let mut rng = Rng::new(cfg.seed);
        let profile = Profile::draw(&mut rng);
        let mut w = World {
            cfg,
            profile,
            rng,
            now: 0,
            step: 0,
            nodes: BTreeMap::new(),
            net: Vec::new(),
            snet: Vec::new(),
            cut: BTreeSet::new(),
            checker: Checker::default(),
            next_cmd: 1,
            proposals: HashMap::new(),
            acked: BTreeMap::new(),
            reads: HashMap::new(),
            ever: (1..=cfg.nodes).collect(),
            retired: BTreeSet::new(),
            faults: true,
            audit_failure: None,
            trace: VecDeque::new(),
            stats: Stats::default(),
        };
        let voters: Vec<NodeId> = (1..=cfg.nodes).collect();
        // Two spare nodes that membership changes may add.
        for id in 1..=cfg.nodes + 2 {
            let conf = if id <= cfg.nodes {
                ConfState::with_voters(&voters)
            } else {
                ConfState::default()
            };
            let member = id <= cfg.nodes;
            let mut st = SimStorage {
                mem: if member {
                    MemStorage::new_with_conf(conf.clone())
                } else {
                    MemStorage::default()
                },
                ..Default::default()
            };
            if member {
                // Bootstrapped from a snapshot at index 1, as every new group is.
                st.sm.applied = crate::storage::BOOTSTRAP_INDEX;
                st.mem.snapshot.data = st.sm.encode();
            }
            st.confs.insert(st.sm.applied, conf);
            let base = (st.sm.applied, if member { crate::storage::BOOTSTRAP_TERM } else { 0 });
            let mut raw = w.make_raw(id, 0, st);
            let sl = w.make_support(id, 0);
            raw.set_store_epoch(sl.epoch());
            w.nodes.insert(
                id,
                SimNode {
                    id,
                    raw: Some(raw),
                    down_storage: None,
                    pending: VecDeque::new(),
                    paused: false,
                    chain: BTreeMap::from([(base.0, (base.1, 0))]),
                    sl: Some(sl),
                    restarts: 0,
                    was_leader_in: 0,
                    commit_at_election: 0,
                    tick_scheduled: TICK,
                    tick_at: TICK,
                },
            );
        }
        w
    }

    fn make_raw(&self, id: NodeId, restarts: u64, st: SimStorage) -> RawNode<SimStorage> {
        let mut c = Config::new(id);
        c.election_ticks = ELECTION_TICKS;
        c.heartbeat_ticks = 1;
        c.applied = st.sm.applied;
        c.max_inflight_msgs = self.profile.max_inflight_msgs;
        c.max_inflight_bytes = 4096;
        c.max_msg_bytes = self.profile.max_msg_bytes;
        c.seed = self.cfg.seed.wrapping_mul(31).wrapping_add(id * 1000 + restarts);
        c.mutations = self.cfg.mutations;
        match RawNode::new(c, st) {
            Ok(r) => r,
            Err(e) => panic!("sim node {id} cannot start: {e}"),
        }
    }

    fn make_support(&self, id: NodeId, restarts: u64) -> SupportManager {
        let cfg = SupportConfig {
            interval: SUPPORT_INTERVAL,
            requester_interval: SUPPORT_INTERVAL,
        };
        let mut sl = SupportManager::new(id, first_epoch(restarts), cfg);
        sl.mutations.extend_past_interval = self.cfg.mutations.support_past_interval;
        sl
    }

    fn log(&mut self, s: String) {
        if self.trace.len() >= trace_len() {
            self.trace.pop_front();
        }
        self.trace.push_back(format!("[{} t={}] {s}", self.step, self.now));
    }

    /// Every node's state, for failure reports.
    fn describe(&self) -> String {
        let mut out = String::new();
        for n in self.nodes.values() {
            match n.raw.as_ref() {
                None => out.push_str(&format!("\n  node {}: down", n.id)),
                Some(r) => {
                    let l = &r.raft.log;
                    out.push_str(&format!(
                        "\n  node {}: {:?} term {} leader {} commit {} applied {} first {} last {} paused {} pending writes {} conf {:?}",
                        n.id, r.role(), r.term(), r.leader(), l.committed, l.applied, l.first_index(), l.last_index(), n.paused, n.pending.len(), r.conf_state()
                    ));
                    if r.role() == Role::Leader {
                        for (id, p) in &r.raft.trk.progress {
                            out.push_str(&format!(
                                "\n      progress {id}: match {} next {} {:?} probe_sent {} inflight {} active {}",
                                p.matched,
                                p.next,
                                p.state,
                                p.probe_sent,
                                p.inflights.count(),
                                p.recent_active
                            ));
                        }
                    }
                }
            }
        }
        out
    }

    fn fail(&self, what: String) -> Failure {
        Failure {
            seed: self.cfg.seed,
            profile: self.profile,
            nodes: self.cfg.nodes,
            step: self.step,
            what: format!("{what}{}", self.describe()),
            trace: self.trace.iter().cloned().collect(),
        }
    }

    /// Runs the whole schedule: faults, then calm and the liveness checks.
    pub fn run(mut self) -> Result<Stats, Failure> {
        let fault_steps = self.cfg.steps * 7 / 10;
        while self.step < fault_steps {
            self.one_step().map_err(|e| self.fail(e))?;
        }
        self.calm().map_err(|e| self.fail(e))?;
        // The liveness phase: a leader, and a proposal applied everywhere.
        let deadline = self.now + CALM_LIVENESS_TICKS * TICK;
        // Probes: a proposal at the current leader, renewed if it was lost
        // (proposed to a leader that was then deposed).
        let mut probes: Vec<u64> = Vec::new();
        let mut next_probe_at = self.now;
        loop {
            if self.now > deadline {
                return Err(self.fail(format!(
                    "liveness: no leader committed a proposal on every member within {CALM_LIVENESS_TICKS} ticks of calm (leader {:?}, probes {probes:?})",
                    self.leader()
                )));
            }
            if self.now >= next_probe_at {
                if let Some(l) = self.leader() {
                    let cmd = self.next_cmd;
                    self.next_cmd += 1;
                    let raw = self
                        .nodes
                        .get_mut(&l)
                        .and_then(|n| n.raw.as_mut())
                        .expect("leader is up");
                    if let Ok((index, term)) = raw.propose(cmd.to_le_bytes().to_vec()) {
                        self.proposals.insert(cmd, Proposal { node: l, index, term });
                        probes.push(cmd);
                        next_probe_at = self.now + 4 * ELECTION_TICKS * TICK;
                    }
                }
            }
            if probes.iter().any(|&c| self.applied_everywhere(c)) {
                break;
            }
            self.one_step().map_err(|e| self.fail(e))?;
        }
        while self.step < self.cfg.steps.max(fault_steps) {
            self.one_step().map_err(|e| self.fail(e))?;
        }
        // Let the calm network settle, then every acknowledged command must be
        // applied by every live member.
        let settle = self.now + CALM_LIVENESS_TICKS * TICK;
        while self.now < settle && !self.all_acked_applied() {
            self.one_step().map_err(|e| self.fail(e))?;
        }
        if !self.all_acked_applied() {
            return Err(self.fail("liveness: acknowledged commands missing on live members after calm".into()));
        }
        if std::env::var("RAFT_FORCE_FAIL").is_ok() {
            return Err(self.fail("forced failure (RAFT_FORCE_FAIL) to print the trace".into()));
        }
        self.stats.steps = self.step;
        self.stats.votes_ignored_in_lease = self
            .nodes
            .values()
            .filter_map(|n| n.raw.as_ref())
            .map(|r| r.raft.counters.votes_ignored_in_lease)
            .sum();
        self.stats.quiesced = self
            .nodes
            .values()
            .filter_map(|n| n.raw.as_ref())
            .map(|r| r.raft.counters.quiesced)
            .sum();
        Ok(self.stats)
    }

    /// Members of the configuration the leader (or any up node) knows.
    fn members(&self) -> BTreeSet<NodeId> {
        let src = self
            .leader()
            .and_then(|l| self.nodes.get(&l))
            .or_else(|| self.nodes.values().find(|n| n.up()));
        let Some(raw) = src.and_then(|n| n.raw.as_ref()) else {
            return BTreeSet::new();
        };
        let cs = raw.conf_state();
        cs.voters
            .iter()
            .chain(&cs.voters_outgoing)
            .chain(&cs.learners)
            .chain(&cs.learners_next)
            .copied()
            .collect()
    }

    fn applied_everywhere(&self, cmd: u64) -> bool {
        self.members().iter().all(|id| {
            self.nodes
                .get(id)
                .and_then(|n| n.raw.as_ref())
                .is_some_and(|r| r.storage().sm.ids.contains(&cmd))
        })
    }

    fn all_acked_applied(&self) -> bool {
        self.acked.keys().all(|&cmd| self.applied_everywhere(cmd))
    }

    fn leader(&self) -> Option<NodeId> {
        let mut best: Option<(u64, NodeId)> = None;
        for n in self.nodes.values() {
            if let Some(r) = n.raw.as_ref() {
                if r.role() == Role::Leader && !n.paused && best.is_none_or(|(t, _)| r.term() > t) {
                    best = Some((r.term(), n.id));
                }
            }
        }
        best.map(|(_, id)| id)
    }

    /// Stops all faults: heals, resumes, restarts.
    fn calm(&mut self) -> Result<(), String> {
        self.faults = false;
        self.cut.clear();
        self.log("calm: faults stop".into());
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for id in ids {
            let n = self.nodes.get_mut(&id).expect("node");
            n.paused = false;
            if !n.up() {
                self.restart(id);
            }
        }
        Ok(())
    }

    fn one_step(&mut self) -> Result<(), String> {
        self.step += 1;
        self.now += 1;
        let due: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.active() && n.tick_at <= self.now)
            .map(|(&id, _)| id)
            .collect();
        if !due.is_empty() {
            for id in due {
                self.tick_node(id);
            }
            self.process_readies()?;
        }
        self.deliver_some();
        self.deliver_support_some();
        self.process_readies()?;
        self.persist_some();
        self.process_readies()?;
        self.random_action();
        self.process_readies()?;
        self.check_step()
    }

    /// Ticks a node and sets its timer as a store's scheduler does: the next
    /// tick one tick after this one, however late this one fired. Under
    /// faults a tick sometimes fires late. Each tick the node's store
    /// liveness withdraws expired support (releasing promises made to it)
    /// and asks every other store for support; raft ticks only a member that
    /// needs it (a quiesced leader and its fortified followers do not).
    fn tick_node(&mut self, id: NodeId) {
        let now = self.now;
        let late = self.faults && self.rng.chance(LATE_TICK_PER_MILLE);
        let delay = 1 + self.rng.below(2 * TICK);
        let peers: Vec<NodeId> = self.nodes.keys().copied().filter(|&p| p != id).collect();
        let Some(n) = self.nodes.get_mut(&id) else { return };
        let (Some(r), Some(sl)) = (n.raw.as_mut(), n.sl.as_mut()) else {
            return;
        };
        let withdrawn = sl.withdraw_expired(now);
        for &(store, epoch) in &withdrawn {
            r.support_withdrawn(store, epoch);
        }
        let requests: Vec<SupportMsg> = peers.iter().map(|&p| sl.request(p, now)).collect();
        if r.needs_tick() {
            r.tick();
        }
        n.tick_scheduled = now + TICK;
        n.tick_at = n.tick_scheduled + if late { delay } else { 0 };
        self.stats.withdrawals += withdrawn.len() as u64;
        for (store, epoch) in withdrawn {
            self.log(format!(
                "store {id} withdraws support of store {store} epoch {epoch:#x}"
            ));
        }
        for m in requests {
            self.enqueue_support(m);
        }
        if late {
            self.log(format!("tick of {id} will be {delay} late"));
        }
    }

    /// One operator, client or fault event, or none.
    fn random_action(&mut self) {
        let p = self.profile;
        let mut roll = self.rng.below(1000);
        if roll < p.propose_per_mille {
            return self.propose_one();
        }
        roll = self.rng.below(1000);
        match roll {
            0..=49 => self.read_one(),
            50..=79 => self.compact_one(),
            80..=94 => self.conf_change_one(),
            95..=104 => self.transfer_one(),
            _ if !self.faults => {}
            105..=134 => self.restart_one(),
            135..=144 => self.partition_one(),
            145..=164 => self.heal_one(),
            165..=169 => self.pause_one(),
            170..=199 => self.resume_one(),
            r if r >= 1000 - p.crash_per_mille => self.crash_one(),
            _ => {}
        }
    }

    /// Delivers each due message with some probability, in random order;
    /// during faults some are dropped or duplicated instead.
    fn deliver_some(&mut self) {
        let mut due: Vec<usize> = (0..self.net.len())
            .filter(|&i| self.net[i].deliver_at <= self.now)
            .collect();
        // Fisher-Yates with the seeded RNG: any order may happen.
        for i in (1..due.len()).rev() {
            let j = self.rng.below(i as u64 + 1) as usize;
            due.swap(i, j);
        }
        let mut take = Vec::new();
        for i in due {
            if self.rng.chance(600) {
                take.push(i);
            }
        }
        // Remove from the back so indexes stay valid.
        let mut order = take.clone();
        order.sort_unstable_by(|a, b| b.cmp(a));
        let mut msgs: std::collections::HashMap<usize, InFlightMsg> = std::collections::HashMap::new();
        for i in order {
            msgs.insert(i, self.net.swap_remove(i));
        }
        for i in take {
            let Some(f) = msgs.remove(&i) else { continue };
            let m = f.msg;
            if self.nodes.get(&m.to).is_some_and(|n| n.paused) {
                self.net.push(InFlightMsg {
                    deliver_at: self.now + 1,
                    msg: m,
                });
                continue;
            }
            if self.faults && self.rng.chance(30) {
                self.stats.drops += 1;
                self.log(format!("drop {} {}->{}", m.body.name(), m.from, m.to));
                if matches!(m.body, MessageBody::Snapshot { .. }) {
                    self.report_snapshot(m.from, m.to, false);
                }
                continue;
            }
            if self.faults && self.rng.chance(20) {
                self.stats.duplicates += 1;
                self.enqueue(m.clone());
            }
            self.deliver(m);
        }
    }

    /// Completes, on each node with pending writes, the oldest one with some
    /// probability: disks finish out of step with the network.
    fn persist_some(&mut self) {
        let ids = self.writing_nodes();
        for id in ids {
            if self.rng.chance(500) {
                // One sync may cover several queued writes (group commit).
                let queued = self.nodes.get(&id).map_or(0, |n| n.pending.len()) as u64;
                let k = 1 + self.rng.below(queued);
                for _ in 0..k {
                    self.persist(id);
                }
            }
        }
    }

    // ---- network -------------------------------------------------------------

    /// How long the next message takes. Usually under a tick, as on a real
    /// network (when calm, at most one: a round trip well inside the
    /// election timeout); under faults some take up to 4 ticks, and some
    /// stall for longer than an election timeout.
    fn delay(&mut self) -> u64 {
        let max = if !self.faults {
            TICK
        } else if self.rng.chance(self.profile.long_delay_per_mille) {
            3 * ELECTION_TICKS * TICK
        } else if self.rng.chance(100) {
            4 * TICK
        } else {
            TICK
        };
        self.rng.below(max)
    }

    fn enqueue(&mut self, msg: Message) {
        let delay = self.delay();
        self.net.push(InFlightMsg {
            deliver_at: self.now + delay,
            msg,
        });
    }

    fn enqueue_support(&mut self, m: SupportMsg) {
        let delay = self.delay();
        self.snet.push((self.now + delay, m));
    }

    /// Delivers due store liveness messages (same faults as raft's).
    fn deliver_support_some(&mut self) {
        let now = self.now;
        let mut due = Vec::new();
        let mut i = 0;
        while i < self.snet.len() {
            if self.snet[i].0 <= now && self.rng.chance(600) {
                due.push(self.snet.swap_remove(i).1);
            } else {
                i += 1;
            }
        }
        for m in due {
            let (from, to) = (m.from(), m.to());
            if self.nodes.get(&to).is_some_and(|n| n.paused) {
                self.snet.push((now + 1, m));
                continue;
            }
            if self.cut.contains(&(from, to)) || (self.faults && self.rng.chance(30)) {
                continue;
            }
            let Some(n) = self.nodes.get_mut(&to) else { continue };
            let (Some(r), Some(sl)) = (n.raw.as_mut(), n.sl.as_mut()) else {
                continue;
            };
            let (answer, ended) = sl.handle(m, now);
            if let Some((store, epoch)) = ended {
                r.support_withdrawn(store, epoch);
            }
            // A refusal may have moved this store to a higher epoch.
            r.set_store_epoch(sl.epoch());
            if let Some(a) = answer {
                self.enqueue_support(a);
            }
        }
    }

    fn deliver(&mut self, m: Message) {
        let (from, to) = (m.from, m.to);
        let is_snap = matches!(m.body, MessageBody::Snapshot { .. });
        let blocked = self.cut.contains(&(from, to));
        let target_up = self.nodes.get(&to).is_some_and(|n| n.up());
        if blocked || !target_up {
            if is_snap {
                self.report_snapshot(from, to, false);
            }
            return;
        }
        if let MessageBody::Fortify { epoch } = m.body {
            // The node delivers a fortification only if its store supports
            // the leader's store at that epoch.
            if !self
                .nodes
                .get(&to)
                .and_then(|n| n.sl.as_ref())
                .is_some_and(|sl| sl.supports(from, epoch))
            {
                self.log(format!("drop Fortify {from}->{to}: no support of epoch {epoch:#x}"));
                return;
            }
        }
        self.log(format!("deliver {} {from}->{to} term {}", m.body.name(), m.term));
        if let Some(r) = self.nodes.get_mut(&to).and_then(|n| n.raw.as_mut()) {
            r.step(m);
        }
        if is_snap {
            self.report_snapshot(from, to, true);
        }
    }

    fn report_snapshot(&mut self, from: NodeId, to: NodeId, ok: bool) {
        if let Some(r) = self.nodes.get_mut(&from).and_then(|n| n.raw.as_mut()) {
            r.report_snapshot(to, ok);
        }
    }

    fn random_node(&mut self) -> NodeId {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        ids[self.rng.below(ids.len() as u64) as usize]
    }

    /// The leader half of the time (faults aimed at the leader are the ones
    /// that test it), any node otherwise.
    fn target(&mut self) -> NodeId {
        match self.leader() {
            Some(l) if self.rng.chance(500) => l,
            _ => self.random_node(),
        }
    }

    fn partition_one(&mut self) {
        let a = self.target();
        let b = self.random_node();
        if a == b {
            return;
        }
        self.stats.partitions += 1;
        let kind = self.rng.below(3);
        if kind == 0 {
            // One-way: a cannot reach b.
            self.cut.insert((a, b));
            self.log(format!("partition one-way {a}-/->{b}"));
        } else if kind == 1 {
            // A broken link between two nodes that both still reach the rest.
            self.cut.insert((a, b));
            self.cut.insert((b, a));
            self.log(format!("partition link {a}<-/->{b}"));
        } else {
            // Isolate a from everyone.
            let ids: Vec<NodeId> = self.nodes.keys().copied().filter(|&x| x != a).collect();
            for x in ids {
                self.cut.insert((a, x));
                self.cut.insert((x, a));
            }
            self.log(format!("partition isolate {a}"));
        }
    }

    fn heal_one(&mut self) {
        if !self.cut.is_empty() {
            self.cut.clear();
            self.log("heal".into());
        }
    }

    // ---- processes -----------------------------------------------------------

    /// Running nodes with writes not yet durable.
    fn writing_nodes(&self) -> Vec<NodeId> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.active() && !n.pending.is_empty())
            .map(|(&id, _)| id)
            .collect()
    }

    fn crash_one(&mut self) {
        // Often a node in the middle of writing: what it has not synced is lost.
        let writing = self.writing_nodes();
        let id = if !writing.is_empty() && self.rng.chance(500) {
            writing[self.rng.below(writing.len() as u64) as usize]
        } else {
            self.target()
        };
        let Some(n) = self.nodes.get_mut(&id) else { return };
        let Some(raw) = n.raw.take() else { return };
        n.down_storage = Some(raw.storage().clone());
        n.pending.clear();
        n.paused = false;
        n.sl = None;
        self.stats.crashes += 1;
        self.log(format!("crash {id}"));
    }

    fn restart_one(&mut self) {
        let down: Vec<NodeId> = self.nodes.iter().filter(|(_, n)| !n.up()).map(|(&id, _)| id).collect();
        if down.is_empty() {
            return;
        }
        let id = down[self.rng.below(down.len() as u64) as usize];
        self.restart(id);
    }

    fn restart(&mut self, id: NodeId) {
        let Some(n) = self.nodes.get_mut(&id) else { return };
        let Some(st) = n.down_storage.take() else { return };
        n.restarts += 1;
        let restarts = n.restarts;
        // Rebuild the node's view of its log from what is durable.
        let mut chain = BTreeMap::new();
        let base = st.mem.snapshot.meta.index;
        let base_hash = if st.mem.snapshot.data.is_empty() {
            0
        } else {
            StateMachine::decode(&st.mem.snapshot.data).log_chain
        };
        chain.insert(base, (st.mem.snapshot.meta.term, base_hash));
        let mut h = base_hash;
        for e in &st.mem.entries {
            h = checker::chain(h, e);
            chain.insert(e.index, (e.term, h));
        }
        let mut raw = self.make_raw(id, restarts, st);
        // A restarted store takes a new incarnation: a higher epoch.
        let sl = self.make_support(id, restarts);
        raw.set_store_epoch(sl.epoch());
        let now = self.now;
        let n = self.nodes.get_mut(&id).expect("node");
        n.chain = chain;
        n.raw = Some(raw);
        n.sl = Some(sl);
        n.tick_scheduled = now + TICK;
        n.tick_at = now + TICK;
        self.log(format!("restart {id}"));
    }

    fn pause_one(&mut self) {
        let id = self.target();
        if let Some(n) = self.nodes.get_mut(&id) {
            if n.up() && !n.paused {
                n.paused = true;
                self.stats.pauses += 1;
                self.log(format!("pause {id}"));
            }
        }
    }

    fn resume_one(&mut self) {
        let paused: Vec<NodeId> = self.nodes.iter().filter(|(_, n)| n.paused).map(|(&id, _)| id).collect();
        if let Some(&id) = paused.get(self.rng.below(paused.len().max(1) as u64) as usize) {
            if let Some(n) = self.nodes.get_mut(&id) {
                n.paused = false;
            }
            self.log(format!("resume {id}"));
        }
    }

    // ---- clients and operators ----------------------------------------------

    fn random_active(&mut self) -> Option<NodeId> {
        let ids: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.active())
            .map(|(&id, _)| id)
            .collect();
        if ids.is_empty() {
            return None;
        }
        Some(ids[self.rng.below(ids.len() as u64) as usize])
    }

    fn propose_one(&mut self) {
        let Some(id) = self.random_active() else { return };
        let cmd = self.next_cmd;
        let raw = self.nodes.get_mut(&id).and_then(|n| n.raw.as_mut()).expect("active");
        if let Ok((index, term)) = raw.propose(cmd.to_le_bytes().to_vec()) {
            self.next_cmd += 1;
            self.proposals.insert(cmd, Proposal { node: id, index, term });
            self.log(format!("propose cmd {cmd} at {id} -> ({index}, {term})"));
        }
    }

    fn read_one(&mut self) {
        let Some(id) = self.random_active() else { return };
        let ctx = self.next_cmd;
        self.next_cmd += 1;
        let known = self.checker.highest_committed().unwrap_or(0);
        self.reads.insert(ctx, known);
        if let Some(r) = self.nodes.get_mut(&id).and_then(|n| n.raw.as_mut()) {
            r.read_index(ctx.to_le_bytes().to_vec());
        }
    }

    fn compact_one(&mut self) {
        let Some(id) = self.random_active() else { return };
        let n = self.nodes.get_mut(&id).expect("active");
        let raw = n.raw.as_mut().expect("active");
        let st = raw.storage();
        let first = st.mem.snapshot.meta.index;
        let applied = st.sm.applied;
        if applied <= first + 1 {
            return;
        }
        // Compact at the applied index: the snapshot is the state machine now.
        let conf = st.conf_at(applied);
        let data = st.sm.encode();
        raw.storage_mut().mem.compact(applied, conf, data);
        self.stats.compactions += 1;
        self.log(format!("compact {id} to {applied}"));
    }

    fn conf_change_one(&mut self) {
        let Some(l) = self.leader() else { return };
        let raw = self.nodes.get(&l).and_then(|n| n.raw.as_ref()).expect("leader up");
        let cs = raw.conf_state();
        if cs.is_joint() {
            return;
        }
        let all: BTreeSet<NodeId> = self.nodes.keys().copied().collect();
        let in_conf: BTreeSet<NodeId> = cs.voters.iter().chain(&cs.learners).copied().collect();
        let spares: Vec<NodeId> = all
            .iter()
            .copied()
            .filter(|id| !in_conf.contains(id) && !self.retired.contains(id))
            .collect();
        let n = self.cfg.nodes as usize;
        let mut changes = Vec::new();
        let roll = self.rng.below(3);
        if roll == 0 && !spares.is_empty() {
            changes.push(ConfChangeSingle {
                kind: ConfChangeKind::AddLearner,
                node: spares[0],
            });
        } else if roll == 1 && !cs.learners.is_empty() {
            let learner = cs.learners[0];
            changes.push(ConfChangeSingle {
                kind: ConfChangeKind::AddVoter,
                node: learner,
            });
            if cs.voters.len() >= n {
                // Replace a voter in one joint step.
                let victim = cs.voters[self.rng.below(cs.voters.len() as u64) as usize];
                changes.push(ConfChangeSingle {
                    kind: ConfChangeKind::Remove,
                    node: victim,
                });
            }
        } else if cs.voters.len() > n - 1 && cs.voters.len() > 2 {
            let victim = cs.voters[self.rng.below(cs.voters.len() as u64) as usize];
            changes.push(ConfChangeSingle {
                kind: ConfChangeKind::Remove,
                node: victim,
            });
        }
        if changes.is_empty() {
            return;
        }
        let cc = ConfChange {
            changes,
            context: Vec::new(),
        };
        let raw = self.nodes.get_mut(&l).and_then(|n| n.raw.as_mut()).expect("leader up");
        if raw.propose_conf_change(cc.clone()).is_ok() {
            self.log(format!("propose conf change at {l}: {:?}", cc.changes));
        }
    }

    fn transfer_one(&mut self) {
        let Some(l) = self.leader() else { return };
        let raw = self.nodes.get_mut(&l).and_then(|n| n.raw.as_mut()).expect("leader up");
        let voters: Vec<NodeId> = raw.conf_state().voters.into_iter().filter(|&v| v != l).collect();
        if voters.is_empty() {
            return;
        }
        let to = voters[self.rng.below(voters.len() as u64) as usize];
        raw.transfer_leader(to);
        self.stats.transfers += 1;
        self.log(format!("transfer {l} -> {to}"));
    }

    // ---- disks and state machines -------------------------------------------

    fn persist(&mut self, id: NodeId) {
        let n = self.nodes.get_mut(&id).expect("node");
        let Some(w) = n.pending.pop_front() else { return };
        let raw = n.raw.as_mut().expect("active");
        let st = raw.storage_mut();
        if let Some(s) = &w.snapshot {
            st.mem.apply_snapshot(s.clone());
            st.sm = StateMachine::decode(&s.data);
            st.confs.clear();
            st.confs.insert(s.meta.index, s.meta.conf_state.clone());
        }
        st.mem.append(&w.entries);
        if let Some(hs) = w.hard_state {
            st.mem.hard_state = hs;
        }
        raw.on_persisted(w.number);
        for m in w.persisted_messages {
            // Checked after the write: these answers are now backed by storage.
            if let Err(e) = self.audit_durable_vote(id, &m) {
                self.audit_failure.get_or_insert(e);
            }
            self.enqueue(m);
        }
    }

    fn process_readies(&mut self) -> Result<(), String> {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        loop {
            let mut any = false;
            for &id in &ids {
                let ready = {
                    let Some(n) = self.nodes.get_mut(&id) else { continue };
                    if !n.active() {
                        continue;
                    }
                    let raw = n.raw.as_mut().expect("active");
                    if !raw.has_ready() {
                        continue;
                    }
                    raw.ready()
                };
                any = true;
                self.handle_ready(id, ready)?;
            }
            if !any {
                return Ok(());
            }
        }
    }

    fn handle_ready(&mut self, id: NodeId, rd: Ready) -> Result<(), String> {
        if let Some(ss) = rd.soft_state {
            if ss.role == Role::Leader {
                self.on_new_leader(id)?;
            }
        }
        // The node's view of its log: snapshot first, then appended entries.
        if let Some(s) = &rd.snapshot {
            let h = StateMachine::decode(&s.data).log_chain;
            self.checker.log_entry(id, s.meta.index, s.meta.term, h)?;
            let n = self.nodes.get_mut(&id).expect("node");
            n.chain.clear();
            n.chain.insert(s.meta.index, (s.meta.term, h));
            self.stats.snapshots += 1;
            self.log(format!("node {id} installs snapshot at {}", s.meta.index));
        }
        if let Some(first) = rd.entries.first() {
            let n = self.nodes.get_mut(&id).expect("node");
            let _ = n.chain.split_off(&first.index);
            let mut h = match n.chain.get(&(first.index - 1)) {
                Some(&(_, h)) => h,
                None => {
                    return Err(format!(
                        "node {id}: appended entry {} after a hole in its log",
                        first.index
                    ))
                }
            };
            let mut recs = Vec::with_capacity(rd.entries.len());
            for e in &rd.entries {
                h = chain(h, e);
                recs.push((e.index, e.term, h));
            }
            let n = self.nodes.get_mut(&id).expect("node");
            for &(i, t, h) in &recs {
                n.chain.insert(i, (t, h));
            }
            for (i, t, h) in recs {
                self.checker.log_entry(id, i, t, h)?;
            }
        }
        let must_persist = rd.must_persist();
        for m in &rd.messages {
            self.audit_durable_vote(id, m)?;
        }
        for m in rd.messages {
            self.enqueue(m);
        }
        let n = self.nodes.get_mut(&id).expect("node");
        if must_persist {
            n.pending.push_back(PendingWrite {
                number: rd.number,
                hard_state: rd.hard_state,
                entries: rd.entries,
                snapshot: rd.snapshot,
                persisted_messages: rd.persisted_messages,
            });
        } else if let Some(last) = n.pending.back_mut() {
            // Nothing to write: it is durable as soon as the writes queued
            // before it are, so it rides along with the last of them.
            last.number = rd.number;
            last.persisted_messages.extend(rd.persisted_messages);
        } else {
            let raw = n.raw.as_mut().expect("active");
            raw.on_persisted(rd.number);
            for m in rd.persisted_messages {
                self.enqueue(m);
            }
        }
        for rs in rd.read_states {
            let ctx = u64::from_le_bytes(rs.ctx[..8].try_into().map_err(|_| "bad read ctx".to_string())?);
            self.stats.reads += 1;
            if let Some(&known) = self.reads.get(&ctx) {
                if rs.index < known {
                    return Err(format!(
                        "read safety: node {id} answered read {ctx} at index {} below index {known} committed before it was asked",
                        rs.index
                    ));
                }
            }
        }
        if !rd.committed_entries.is_empty() {
            self.apply(id, rd.committed_entries)?;
        }
        Ok(())
    }

    /// A granted vote promises durable state: the voter's storage must already
    /// hold that vote when the answer leaves.
    fn audit_durable_vote(&self, id: NodeId, m: &Message) -> Result<(), String> {
        if let MessageBody::VoteResponse {
            pre: false,
            reject: false,
        } = m.body
        {
            let hs = self
                .nodes
                .get(&id)
                .and_then(|n| n.raw.as_ref())
                .map(|r| r.storage().mem.hard_state)
                .unwrap_or_default();
            // Writes are durable in order: a later durable term means the
            // vote was durable before it.
            if hs.term < m.term || (hs.term == m.term && hs.vote != m.to) {
                return Err(format!(
                    "durability: node {id} grants its vote to {} in term {} before it is durable (durable: term {}, vote {})",
                    m.to, m.term, hs.term, hs.vote
                ));
            }
        }
        Ok(())
    }

    fn on_new_leader(&mut self, id: NodeId) -> Result<(), String> {
        let n = self.nodes.get(&id).expect("node");
        let raw = n.raw.as_ref().expect("up");
        let term = raw.term();
        if n.was_leader_in == term {
            return Ok(());
        }
        self.checker.leader_elected(term, id)?;
        let first = raw
            .storage()
            .mem
            .snapshot
            .meta
            .index
            .max(*n.chain.keys().next().unwrap_or(&0));
        self.checker.leader_complete(id, term, first, &n.chain)?;
        let commit = raw.raft.log.committed;
        let n = self.nodes.get_mut(&id).expect("node");
        n.was_leader_in = term;
        n.commit_at_election = commit;
        self.stats.elections += 1;
        self.log(format!("node {id} leader in term {term}"));
        Ok(())
    }

    fn apply(&mut self, id: NodeId, ents: Vec<Entry>) -> Result<(), String> {
        let mut last = 0;
        for e in ents {
            let n = self.nodes.get_mut(&id).expect("node");
            let raw = n.raw.as_mut().expect("up");
            let sm = &raw.storage().sm;
            if e.index != sm.applied + 1 {
                return Err(format!("node {id} applies index {} after {}", e.index, sm.applied));
            }
            let h = chain(sm.log_chain, &e);
            let mut cmd = None;
            match &e.payload {
                EntryPayload::Normal(d) => {
                    let c = u64::from_le_bytes(d[..8].try_into().map_err(|_| "bad command".to_string())?);
                    if sm.ids.contains(&c) {
                        return Err(format!("node {id} applies command {c} twice (again at {})", e.index));
                    }
                    cmd = Some(c);
                }
                EntryPayload::ConfChange(cc) => {
                    let cs = raw.apply_conf_change(cc).map_err(|why| {
                        format!(
                            "node {id}: committed configuration change {cc:?} at {} cannot apply: {why}",
                            e.index
                        )
                    })?;
                    if cs.is_joint() {
                        self.stats.joint_configs += 1;
                    }
                    raw.storage_mut().confs.insert(e.index, cs.clone());
                    raw.storage_mut().mem.conf_state = cs.clone();
                    let members: BTreeSet<NodeId> = cs
                        .voters
                        .iter()
                        .chain(&cs.voters_outgoing)
                        .chain(&cs.learners)
                        .chain(&cs.learners_next)
                        .copied()
                        .collect();
                    self.ever.extend(members.iter().copied());
                    if !cs.is_joint() {
                        for &old in &self.ever {
                            if !members.contains(&old) {
                                self.retired.insert(old);
                            }
                        }
                    }
                }
                EntryPayload::Empty => {}
            }
            let raw = self.nodes.get_mut(&id).and_then(|n| n.raw.as_mut()).expect("up");
            let sm = &mut raw.storage_mut().sm;
            sm.applied = e.index;
            sm.log_chain = h;
            if let Some(c) = cmd {
                sm.ids.insert(c);
            }
            self.checker.applied(id, e.index, h)?;
            if let Some(c) = cmd {
                if let Some(p) = self.proposals.get(&c) {
                    if p.node == id && p.index == e.index && p.term == e.term {
                        self.acked.insert(c, e.index);
                        self.stats.proposals_acked += 1;
                    }
                }
            }
            last = e.index;
        }
        if let Some(raw) = self.nodes.get_mut(&id).and_then(|n| n.raw.as_mut()) {
            raw.on_applied(last);
        }
        Ok(())
    }

    fn check_step(&mut self) -> Result<(), String> {
        if let Some(e) = self.audit_failure.take() {
            return Err(e);
        }
        let mut holders = Vec::new();
        let mut commits = Vec::new();
        for n in self.nodes.values() {
            let (Some(raw), Some(sl)) = (n.raw.as_ref(), n.sl.as_ref()) else {
                continue;
            };
            if let Some(basis) = raw.lease_basis() {
                let until = basis.expiration(sl.epoch(), |f| sl.support_from(f));
                if until.is_some_and(|u| self.now < u) {
                    holders.push(n.id);
                    self.check_lease_promises(n.id, &basis, sl)?;
                }
            }
            let c = raw.raft.log.committed;
            // The commit rule: a leader moves its commit index only to an entry
            // of its own term (older entries commit with it, never by count).
            if raw.role() == Role::Leader && n.was_leader_in == raw.term() && c > n.commit_at_election {
                if let Some(&(t, _)) = n.chain.get(&c) {
                    if t != raw.term() {
                        return Err(format!(
                            "commit rule: leader {} of term {} committed index {c} of term {t}",
                            n.id,
                            raw.term()
                        ));
                    }
                }
            }
            if let Some(&(_, h)) = n.chain.get(&c) {
                commits.push((n.id, raw.term(), c, h));
            }
        }
        if !holders.is_empty() {
            self.stats.lease_steps += 1;
        }
        self.checker.lease_holders(&holders, self.now)?;
        for (id, t, c, h) in commits {
            self.checker.committed(id, t, c, h)?;
        }
        Ok(())
    }
}

impl World {
    /// The lease's premise, checked directly: every voter whose promise
    /// counts toward the lease of `leader` (its support still counted by the
    /// leader's store) still holds that promise and still supports the
    /// leader's store at that epoch, or is down or in its restart quiet
    /// period (it forgot the promise and refuses votes for an interval).
    fn check_lease_promises(
        &self,
        leader: NodeId,
        basis: &crate::LeaseBasis,
        sl: &SupportManager,
    ) -> Result<(), String> {
        for f in basis.promised() {
            // Counted: its support still runs, granted by the incarnation
            // of its store that promised.
            let counted = sl
                .support_from(f)
                .is_some_and(|(u, inc)| self.now < u && basis.promise_of(f) == Some(inc));
            if f == leader || !counted {
                continue;
            }
            let Some(n) = self.nodes.get(&f) else { continue };
            let (Some(fr), Some(fsl)) = (n.raw.as_ref(), n.sl.as_ref()) else {
                continue; // down
            };
            if fr.raft.ticks_since_start < ELECTION_TICKS {
                continue; // restarted: refuses every vote for now
            }
            let promise = crate::Fortification {
                leader,
                term: basis.term,
                epoch: basis.epoch,
            };
            if fr.fortification() != Some(promise) || !fsl.supports(leader, basis.epoch) {
                return Err(format!(
                    "lease promise: node {f} counts toward the lease of leader {leader} (term {}, epoch {:#x}) at {}, but holds promise {:?} and supports it: {}",
                    basis.term,
                    basis.epoch,
                    self.now,
                    fr.fortification(),
                    fsl.supports(leader, basis.epoch)
                ));
            }
        }
        Ok(())
    }
}

/// Runs one seed.
pub fn run_one(cfg: SimConfig) -> Result<Stats, Failure> {
    World::new(cfg).run()
}
