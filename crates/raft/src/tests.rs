//! Unit tests of each feature, on a small synchronous network: every message is
//! delivered and every write persisted at once unless a test holds them back.

use std::collections::{BTreeMap, BTreeSet};

use crate::node::{RawNode, Ready};
use crate::raft::{Config, ProposeError};
use crate::storage::{MemStorage, Storage};
use crate::types::*;

struct Net {
    nodes: BTreeMap<NodeId, RawNode<MemStorage>>,
    /// Directed links that drop messages.
    cut: BTreeSet<(NodeId, NodeId)>,
    /// Nodes whose writes are held back (not persisted) until released.
    slow_disk: BTreeSet<NodeId>,
    held: BTreeMap<NodeId, Vec<Ready>>,
    applied: BTreeMap<NodeId, Vec<Entry>>,
    reads: BTreeMap<NodeId, Vec<ReadState>>,
}

/// The store epoch every node of these tests has; their stores all support
/// each other for good (the node would deliver `Fortify` only then).
const EPOCH: u64 = 1;

fn cfg(id: NodeId) -> Config {
    let mut c = Config::new(id);
    c.election_ticks = 10;
    c.heartbeat_ticks = 1;
    c
}

impl Net {
    fn new(voters: &[NodeId]) -> Net {
        Self::with(voters, &[], cfg)
    }

    fn with(voters: &[NodeId], learners: &[NodeId], f: fn(NodeId) -> Config) -> Net {
        let mut nodes = BTreeMap::new();
        let cs = ConfState {
            voters: voters.to_vec(),
            learners: learners.to_vec(),
            ..Default::default()
        };
        for &id in voters.iter().chain(learners) {
            let mut raw = RawNode::new(f(id), MemStorage::new_with_conf(cs.clone())).unwrap();
            raw.set_store_epoch(EPOCH);
            nodes.insert(id, raw);
        }
        Net {
            nodes,
            cut: BTreeSet::new(),
            slow_disk: BTreeSet::new(),
            held: BTreeMap::new(),
            applied: BTreeMap::new(),
            reads: BTreeMap::new(),
        }
    }

    fn add_node(&mut self, id: NodeId) {
        let mut raw = RawNode::new(cfg(id), MemStorage::default()).unwrap();
        raw.set_store_epoch(EPOCH);
        self.nodes.insert(id, raw);
    }

    /// Whether `id` holds a lease, every store supporting every other.
    fn has_lease(&mut self, id: NodeId) -> bool {
        self.node(id)
            .lease_basis()
            .and_then(|b| b.expiration(EPOCH, |_| Some((u64::MAX, crate::support::incarnation(EPOCH)))))
            .is_some()
    }

    fn node(&mut self, id: NodeId) -> &mut RawNode<MemStorage> {
        self.nodes.get_mut(&id).unwrap()
    }

    fn persist(raw: &mut RawNode<MemStorage>, rd: &Ready) {
        let st = raw.storage_mut();
        if let Some(s) = &rd.snapshot {
            st.apply_snapshot(s.clone());
        }
        st.append(&rd.entries);
        if let Some(hs) = rd.hard_state {
            st.hard_state = hs;
        }
        raw.on_persisted(rd.number);
    }

    /// Processes readies and delivers messages until nothing moves.
    fn settle(&mut self) {
        for _ in 0..1000 {
            let mut msgs = Vec::new();
            let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
            for id in ids {
                loop {
                    let raw = self.nodes.get_mut(&id).unwrap();
                    if !raw.has_ready() {
                        break;
                    }
                    let mut rd = raw.ready();
                    msgs.append(&mut rd.messages);
                    self.reads.entry(id).or_default().append(&mut rd.read_states);
                    let committed = std::mem::take(&mut rd.committed_entries);
                    if self.slow_disk.contains(&id) {
                        self.held.entry(id).or_default().push(rd);
                    } else {
                        Self::persist(raw, &rd);
                        msgs.append(&mut rd.persisted_messages);
                    }
                    self.apply(id, committed);
                }
            }
            if msgs.is_empty() {
                return;
            }
            for m in msgs {
                if self.cut.contains(&(m.from, m.to)) {
                    continue;
                }
                if let Some(r) = self.nodes.get_mut(&m.to) {
                    r.step(m);
                }
            }
        }
        panic!("network did not settle");
    }

    fn apply(&mut self, id: NodeId, ents: Vec<Entry>) {
        let Some(last) = ents.last().map(|e| e.index) else {
            return;
        };
        let raw = self.nodes.get_mut(&id).unwrap();
        for e in &ents {
            if let EntryPayload::ConfChange(cc) = &e.payload {
                if let Ok(cs) = raw.apply_conf_change(cc) {
                    raw.storage_mut().conf_state = cs;
                }
            }
        }
        raw.storage_mut().applied = last;
        raw.on_applied(last);
        self.applied.entry(id).or_default().extend(ents);
    }

    /// One round: every node's ready is processed (written at once unless its
    /// disk is slow), then every message produced is delivered.
    fn step_round(&mut self) {
        let mut msgs = Vec::new();
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for id in ids {
            let raw = self.nodes.get_mut(&id).unwrap();
            if !raw.has_ready() {
                continue;
            }
            let mut rd = raw.ready();
            msgs.append(&mut rd.messages);
            let committed = std::mem::take(&mut rd.committed_entries);
            if self.slow_disk.contains(&id) {
                self.held.entry(id).or_default().push(rd);
            } else {
                Self::persist(raw, &rd);
                msgs.append(&mut rd.persisted_messages);
            }
            self.apply(id, committed);
        }
        for m in msgs {
            if !self.cut.contains(&(m.from, m.to)) {
                if let Some(r) = self.nodes.get_mut(&m.to) {
                    r.step(m);
                }
            }
        }
    }

    /// `id` campaigns and wins, one round at a time, so the test can cut in
    /// right after it becomes leader (before its first entry goes out).
    fn win_in_rounds(&mut self, id: NodeId) {
        self.release_promises();
        self.node(id).campaign();
        for _ in 0..4 {
            self.step_round();
            if self.node(id).role() == Role::Leader {
                return;
            }
        }
        panic!("node {id} did not win in 4 rounds");
    }

    /// Persists the held writes of `id` and sends what waited for them.
    fn release_disk(&mut self, id: NodeId) {
        self.slow_disk.remove(&id);
        let held = self.held.remove(&id).unwrap_or_default();
        let mut msgs = Vec::new();
        for mut rd in held {
            let raw = self.nodes.get_mut(&id).unwrap();
            Self::persist(raw, &rd);
            msgs.append(&mut rd.persisted_messages);
        }
        for m in msgs {
            if let Some(r) = self.nodes.get_mut(&m.to) {
                r.step(m);
            }
        }
        self.settle();
    }

    fn tick(&mut self, id: NodeId, n: u64) {
        for _ in 0..n {
            self.node(id).tick();
            self.settle();
        }
    }

    fn tick_all(&mut self, n: u64) {
        for _ in 0..n {
            let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
            for id in ids {
                self.node(id).tick();
            }
            self.settle();
        }
    }

    /// Lets `id` win an election: every other node is past its start-up quiet
    /// period and has not heard from a leader for an election timeout.
    /// As if every store withdrew its support of every other's epoch: no
    /// promise to a fortified leader holds any more.
    fn release_promises(&mut self) {
        for r in self.nodes.values_mut() {
            r.raft.fortified = None;
        }
    }

    fn elect(&mut self, id: NodeId) {
        self.release_promises();
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for &i in &ids {
            let r = &mut self.node(i).raft;
            r.ticks_since_start = 10;
            r.election_elapsed = 10;
            r.lease_elapsed = 10;
        }
        let raw = self.node(id);
        raw.raft.election_elapsed = 0;
        raw.campaign();
        self.settle();
        assert_eq!(self.node(id).role(), Role::Leader, "node {id} did not win");
    }

    fn isolate(&mut self, id: NodeId) {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for o in ids {
            if o != id {
                self.cut.insert((id, o));
                self.cut.insert((o, id));
            }
        }
    }

    fn heal(&mut self) {
        self.cut.clear();
    }

    fn propose(&mut self, id: NodeId, data: &[u8]) -> (u64, u64) {
        let r = self.node(id).propose(data.to_vec()).unwrap();
        self.settle();
        r
    }

    fn applied_data(&self, id: NodeId) -> Vec<Vec<u8>> {
        self.applied
            .get(&id)
            .map(|v| {
                v.iter()
                    .filter_map(|e| match &e.payload {
                        EntryPayload::Normal(d) => Some(d.clone()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

// ---- elections ------------------------------------------------------------------

#[test]
fn a_leader_is_elected_and_appends_an_empty_entry_of_its_term() {
    let mut n = Net::new(&[1, 2, 3]);
    n.tick_all(40);
    let leaders: Vec<NodeId> = n
        .nodes
        .iter()
        .filter(|(_, r)| r.role() == Role::Leader)
        .map(|(&id, _)| id)
        .collect();
    assert_eq!(leaders.len(), 1);
    let l = leaders[0];
    let term = n.node(l).term();
    let last = n.node(l).raft.log.last_index();
    assert_eq!(n.node(l).raft.log.term(last).unwrap(), term);
    assert!(n.applied[&l]
        .iter()
        .any(|e| e.payload == EntryPayload::Empty && e.term == term));
    for id in [1, 2, 3] {
        assert_eq!(n.node(id).leader(), l);
    }
}

#[test]
fn randomized_timeouts_differ_between_nodes_and_follow_the_seed() {
    let n = Net::new(&[1, 2, 3]);
    let t: Vec<u64> = n.nodes.values().map(|r| r.raft.randomized_timeout).collect();
    assert!(t.iter().all(|&x| (10..20).contains(&x)));
    let again = Net::new(&[1, 2, 3]);
    let t2: Vec<u64> = again.nodes.values().map(|r| r.raft.randomized_timeout).collect();
    assert_eq!(t, t2, "same seeds, same timeouts");
}

#[test]
fn a_group_that_is_not_ticked_never_campaigns() {
    let mut n = Net::new(&[1, 2, 3]);
    n.settle();
    for r in n.nodes.values() {
        assert_eq!(r.role(), Role::Follower);
        assert_eq!(r.term(), crate::BOOTSTRAP_TERM);
    }
}

#[test]
fn a_candidate_counts_its_own_vote_only_once_durable() {
    let mut n = Net::new(&[1]);
    n.slow_disk.insert(1);
    n.node(1).raft.ticks_since_start = 10;
    n.node(1).campaign();
    n.settle();
    assert_eq!(n.node(1).role(), Role::Candidate, "vote not durable yet");
    n.release_disk(1);
    assert_eq!(n.node(1).role(), Role::Leader);
}

#[test]
fn votes_are_answered_only_after_they_are_durable() {
    let mut n = Net::new(&[1, 2, 3]);
    for id in [1, 2, 3] {
        n.node(id).raft.ticks_since_start = 10;
    }
    n.slow_disk.insert(2);
    n.slow_disk.insert(3);
    n.node(1).campaign();
    n.settle();
    assert_ne!(
        n.node(1).role(),
        Role::Leader,
        "no vote may arrive before it is durable"
    );
    n.release_disk(2);
    assert_eq!(n.node(1).role(), Role::Leader);
}

#[test]
fn two_candidates_split_and_one_wins_later() {
    let mut n = Net::new(&[1, 2, 3, 4]);
    n.tick_all(60);
    let leaders = n.nodes.values().filter(|r| r.role() == Role::Leader).count();
    assert_eq!(leaders, 1);
}

// ---- pre-vote, check-quorum, leases ------------------------------------------

#[test]
fn a_partitioned_node_rejoining_does_not_depose_a_healthy_leader() {
    let mut n = Net::new(&[1, 2, 3]);
    n.elect(1);
    let term = n.node(1).term();
    n.isolate(3);
    n.tick(3, 100); // pre-vote keeps failing: its term does not grow
    assert_eq!(n.node(3).term(), term);
    n.heal();
    n.tick_all(5);
    assert_eq!(n.node(1).role(), Role::Leader);
    assert_eq!(n.node(1).term(), term);
}

#[test]
fn a_leader_that_loses_its_quorum_steps_down() {
    let mut n = Net::new(&[1, 2, 3]);
    n.elect(1);
    n.isolate(1);
    n.tick(1, 21);
    assert_eq!(n.node(1).role(), Role::Follower);
    assert!(!n.has_lease(1));
}

/// A (non-pre) vote request from 3 to 2 for `term`, with a log that wins.
fn vote_3_to_2(term: u64, transfer: bool) -> Message {
    Message {
        from: 3,
        to: 2,
        term,
        body: MessageBody::Vote {
            pre: false,
            last_index: 100,
            last_term: term - 1,
            transfer,
        },
    }
}

#[test]
fn a_follower_in_lease_ignores_votes_but_not_a_transfer_campaign() {
    let mut n = Net::new(&[1, 2, 3]);
    n.elect(1);
    n.tick_all(1);
    let term = n.node(1).term();
    let vote = |transfer| vote_3_to_2(term + 1, transfer);
    n.node(2).step(vote(false));
    assert_eq!(n.node(2).term(), term, "a vote in lease is ignored");
    assert!(n.node(2).ready().persisted_messages.is_empty());
    n.node(2).step(vote(true));
    assert_eq!(n.node(2).term(), term + 1, "a transfer campaign bypasses the lease");
    let rd = n.node(2).ready();
    assert!(rd
        .persisted_messages
        .iter()
        .any(|m| matches!(m.body, MessageBody::VoteResponse { reject: false, .. })));
}

#[test]
fn a_follower_moved_to_a_new_term_without_a_leader_keeps_its_promise() {
    // Found by the simulator's lease-promise check (under the older lease
    // rule): node 2 pre-campaigns, hears its leader again (and promises),
    // then a stale rejection of its pre-vote from a candidate of a higher
    // term moves it to that term with no leader. It must still refuse that
    // candidate's vote while its store supports the leader's.
    let mut n = Net::new(&[1, 2, 3]);
    n.elect(1);
    n.tick_all(1);
    let term = n.node(1).term();
    assert!(n.has_lease(1));
    n.node(2).step(Message {
        from: 3,
        to: 2,
        term: term + 1,
        body: MessageBody::VoteResponse {
            pre: true,
            reject: true,
        },
    });
    assert_eq!(n.node(2).term(), term + 1, "a rejection of a higher term moves it on");
    assert_eq!(n.node(2).leader(), NONE);
    let vote = vote_3_to_2(term + 1, false);
    n.node(2).step(vote.clone());
    assert_eq!(n.node(2).raft.vote, NONE, "no vote while it promised");
    // Time alone does not release it: it promised for as long as its store
    // supports the leader's.
    for _ in 0..30 {
        n.node(2).tick();
    }
    n.node(2).step(vote.clone());
    assert_eq!(n.node(2).raft.vote, NONE);
    n.node(2).support_withdrawn(1, EPOCH);
    n.node(2).step(vote);
    assert_eq!(n.node(2).raft.vote, 3);
}

#[test]
fn a_member_that_forgoes_the_start_wait_votes_at_once() {
    let mut n = Net::new(&[1, 2, 3]);
    let vote = Message {
        from: 3,
        to: 2,
        term: 5,
        body: MessageBody::Vote {
            pre: false,
            last_index: 1,
            last_term: 1,
            transfer: false,
        },
    };
    n.node(2).forgo_start_wait();
    n.node(2).step(vote);
    assert_eq!(n.node(2).term(), 5);
    assert_eq!(n.node(2).raft.vote, 3, "no quiet period");
}

#[test]
fn forgoing_the_start_wait_does_not_forget_a_promise_made_since() {
    let mut n = Net::new(&[1, 2, 3]);
    n.node(2).forgo_start_wait();
    // 2 hears leader 1 of term 5: it promises; a candidate of term 6 is refused.
    n.node(2).step(Message {
        from: 1,
        to: 2,
        term: 5,
        body: MessageBody::Heartbeat { commit: 0, seq: 1 },
    });
    n.node(2).step(Message {
        from: 3,
        to: 2,
        term: 6,
        body: MessageBody::Vote {
            pre: false,
            last_index: 1,
            last_term: 1,
            transfer: false,
        },
    });
    assert_eq!(n.node(2).term(), 5, "the vote was ignored");
    assert_ne!(n.node(2).raft.vote, 3);
}

#[test]
fn a_restarted_node_rejects_votes_for_one_election_timeout() {
    let mut n = Net::new(&[1, 2, 3]);
    let vote = Message {
        from: 3,
        to: 2,
        term: 5,
        body: MessageBody::Vote {
            pre: false,
            last_index: 1,
            last_term: 1,
            transfer: false,
        },
    };
    n.node(2).step(vote.clone());
    assert_eq!(
        n.node(2).term(),
        crate::BOOTSTRAP_TERM,
        "fresh start: in the quiet period"
    );
    for _ in 0..10 {
        n.node(2).tick();
    }
    n.node(2).step(vote);
    assert_eq!(n.node(2).term(), 5);
    assert_eq!(n.node(2).raft.vote, 3);
}

#[test]
fn the_lease_rests_on_a_quorum_of_promises_still_supported() {
    let mut n = Net::new(&[1, 2, 3]);
    n.elect(1);
    let basis = n.node(1).lease_basis().expect("a leader may claim a lease");
    assert_eq!(basis.promised().count(), 3, "both followers promised");
    let inc = crate::support::incarnation(EPOCH);
    // Support from one follower is enough with the leader's own.
    let one = basis.expiration(EPOCH, |id| (id == 2).then_some((500, inc)));
    assert_eq!(one, Some(500));
    let two = basis.expiration(EPOCH, |id| Some((if id == 2 { 500 } else { 700 }, inc)));
    assert_eq!(two, Some(700), "the best quorum counts");
    assert_eq!(basis.expiration(EPOCH, |_| None), None, "no support, no lease");
    // Support from another incarnation (a restarted store) does not carry
    // the promise its earlier process made.
    assert_eq!(basis.expiration(EPOCH, |_| Some((500, inc + 1))), None);
    // Nor does a lease survive a change of the leader's store epoch.
    assert_eq!(basis.expiration(EPOCH + 1, |_| Some((500, inc))), None);
    // Followers whose fortification was lost do not count, until the next
    // heartbeat tick asks them again.
    for id in [2, 3] {
        n.node(1).raft.trk.progress.get_mut(&id).unwrap().fortified = None;
        n.node(id).raft.fortified = None;
    }
    let b = n.node(1).lease_basis().expect("basis");
    assert_eq!(b.promised().count(), 1);
    assert_eq!(b.expiration(EPOCH, |_| Some((500, inc))), None);
    n.tick(1, 1);
    let b = n.node(1).lease_basis().expect("basis");
    assert_eq!(b.expiration(EPOCH, |_| Some((500, inc))), Some(500));
}

#[test]
fn a_promise_arriving_makes_a_ready_so_the_node_republishes_the_lease() {
    // Found by the process tests: a leader whose last promise came in a
    // cycle with nothing else to do never republished its lease basis, and
    // served nothing though a quorum had promised.
    let mut n = Net::new(&[1, 2, 3]);
    n.elect(1);
    n.node(1).raft.trk.progress.get_mut(&2).unwrap().fortified = None;
    n.settle();
    assert!(!n.node(1).has_ready());
    let term = n.node(1).term();
    n.node(1).step(Message {
        from: 2,
        to: 1,
        term,
        body: MessageBody::FortifyResponse {
            epoch: EPOCH,
            incarnation: 0,
        },
    });
    assert!(n.node(1).has_ready(), "the node must learn the lease changed");
    let _ = n.node(1).ready();
    assert!(!n.node(1).has_ready());
    assert_eq!(n.node(1).lease_basis().unwrap().promised().count(), 3);
}

#[test]
fn a_fortified_follower_does_not_campaign_until_support_is_withdrawn() {
    let mut n = Net::new(&[1, 2, 3]);
    n.elect(1);
    n.isolate(1);
    n.tick(2, 100);
    assert_eq!(n.node(2).role(), Role::Follower, "it promised not to campaign");
    assert!(!n.node(2).needs_tick());
    n.node(2).support_withdrawn(1, EPOCH);
    n.node(3).support_withdrawn(1, EPOCH);
    assert!(n.node(2).needs_tick());
    n.tick_all(20);
    let leader = [2, 3].into_iter().find(|&id| n.node(id).role() == Role::Leader);
    assert!(
        leader.is_some(),
        "a failover within an election timeout of the withdrawal"
    );
}

#[test]
fn a_leader_that_steps_down_releases_its_followers() {
    let mut n = Net::new(&[1, 2, 3]);
    n.elect(1);
    assert!(n.node(2).fortification().is_some());
    // Node 1 steps down: it hears of a higher term from a node it cannot
    // otherwise reach (a pre-vote rejection), and releases its followers.
    let term = n.node(1).term();
    n.node(1).step(Message {
        from: 3,
        to: 1,
        term: term + 1,
        body: MessageBody::AppendResponse {
            index: 0,
            reject: false,
            hint_index: 0,
            hint_term: 0,
        },
    });
    assert_eq!(n.node(1).role(), Role::Follower);
    n.tick(1, 1);
    assert_eq!(n.node(2).fortification(), None, "released by Defortify");
    assert_eq!(n.node(3).fortification(), None);
    // A stale Defortify of an older term does not release a newer promise.
    n.elect(1);
    let t = n.node(1).term();
    assert!(n.node(2).fortification().is_some_and(|f| f.term == t));
    n.node(2).step(Message {
        from: 1,
        to: 2,
        term: t,
        body: MessageBody::Defortify { term },
    });
    assert!(
        n.node(2).fortification().is_some(),
        "a Defortify of term {term} leaves term {t}'s promise"
    );
}

#[test]
fn an_idle_leader_quiesces_and_a_proposal_wakes_it() {
    let mut n = Net::new(&[1, 2, 3]);
    n.elect(1);
    n.tick_all(3);
    assert!(n.node(1).quiesced(), "all caught up, all promised: quiesced");
    assert!(!n.node(1).needs_tick());
    assert!(!n.node(2).needs_tick() && !n.node(3).needs_tick());
    n.tick_all(5);
    assert!(!n.node(1).has_ready(), "a quiesced leader sends nothing");
    n.node(1).propose(b"x".to_vec()).unwrap();
    assert!(!n.node(1).quiesced());
    n.settle();
    let last = n.node(1).raft.log.last_index();
    for id in [2, 3] {
        assert_eq!(n.node(id).raft.log.committed, last, "node {id} knows the commit");
    }
    n.tick_all(3);
    assert!(n.node(1).quiesced(), "quiesces again");
    // A leader with a follower that does not answer does not quiesce.
    n.node(1).propose(b"y".to_vec()).unwrap();
    n.isolate(3);
    n.settle();
    n.tick(1, 5);
    assert!(!n.node(1).quiesced());
}

#[test]
fn with_store_liveness_a_restarted_node_keeps_its_quiet_period_even_without_check_quorum() {
    // A leader may count a promise the restarted node's earlier process
    // made: it must not vote until that support has surely run out.
    fn no_cq(id: NodeId) -> Config {
        let mut c = cfg(id);
        c.check_quorum = false;
        c
    }
    let mut n = Net::with(&[1, 2, 3], &[], no_cq);
    let vote = vote_3_to_2(5, false);
    n.node(2).step(vote);
    assert_eq!(n.node(2).term(), crate::BOOTSTRAP_TERM, "in the quiet period");
    for _ in 0..10 {
        n.node(2).tick();
    }
    n.node(2).step(vote_3_to_2(5, false));
    assert_eq!(n.node(2).raft.vote, 3);
}

#[test]
fn a_new_leader_is_not_ready_until_it_applies_an_entry_of_its_term() {
    let mut n = Net::new(&[1, 2, 3]);
    for id in [1, 2, 3] {
        n.node(id).raft.ticks_since_start = 10;
    }
    n.win_in_rounds(1);
    assert!(!n.node(1).leader_ready(), "its empty entry is not applied yet");
    n.settle();
    assert!(n.node(1).leader_ready());
    assert!(!n.node(2).leader_ready());
}

#[test]
fn no_lease_after_sending_timeout_now() {
    let mut n = Net::new(&[1, 2, 3]);
    n.elect(1);
    n.tick(1, 1);
    assert!(n.has_lease(1));
    n.cut.insert((1, 2)); // TimeoutNow is lost: node 1 stays leader
    n.node(1).transfer_leader(2);
    n.settle();
    assert_eq!(n.node(1).role(), Role::Leader);
    assert!(!n.has_lease(1));
    // Without a lease for the rest of its term, it steps down after an
    // election timeout, and a later term has a leader with a lease again.
    n.cut.clear();
    n.tick(1, 10);
    assert_ne!(
        n.node(1).role(),
        Role::Leader,
        "a leader without a lease for good steps down"
    );
    n.tick_all(60);
    let leader = (1..=3)
        .find(|&id| n.node(id).role() == Role::Leader)
        .expect("a new leader");
    assert!(n.node(leader).term() > 2);
    n.tick(leader, 1);
    assert!(n.has_lease(leader), "the new term has a lease");
}

// ---- replication -----------------------------------------------------------------

#[test]
fn proposals_replicate_commit_and_apply_everywhere_in_order() {
    let mut n = Net::new(&[1, 2, 3]);
    n.elect(1);
    for i in 0..20u8 {
        n.propose(1, &[i]);
    }
    let want: Vec<Vec<u8>> = (0..20u8).map(|i| vec![i]).collect();
    for id in [1, 2, 3] {
        assert_eq!(n.applied_data(id), want);
    }
    assert_eq!(n.node(2).propose(vec![9]), Err(ProposeError::NotLeader { leader: 1 }));
}

#[test]
fn the_leader_counts_itself_only_for_durable_entries() {
    let mut n = Net::new(&[1, 2, 3]);
    n.elect(1);
    n.isolate(2);
    n.slow_disk.insert(1);
    let (idx, _) = n.propose(1, b"x");
    assert!(
        n.node(1).raft.log.committed < idx,
        "1 of 3 durable copies (node 3) is not a quorum"
    );
    n.release_disk(1);
    assert!(n.node(1).raft.log.committed >= idx);
}

#[test]
fn entries_are_applied_only_once_durable_locally() {
    let mut n = Net::new(&[1, 2, 3]);
    n.elect(1);
    n.slow_disk.insert(3);
    n.propose(1, b"y");
    assert!(n.node(3).raft.log.committed >= 1);
    assert!(
        !n.applied_data(3).contains(&b"y".to_vec()),
        "committed but not durable on 3"
    );
    n.release_disk(3);
    n.tick(1, 1);
    assert!(n.applied_data(3).contains(&b"y".to_vec()));
}

#[test]
fn a_divergent_follower_is_repaired_with_fast_backtracking() {
    let mut n = Net::new(&[1, 2, 3]);
    n.elect(1);
    n.propose(1, b"a");
    // Node 1 leads in isolation and appends entries nobody else gets.
    n.isolate(1);
    for i in 0..50u8 {
        n.node(1).propose(vec![i]).unwrap();
    }
    n.settle();
    // Node 2 becomes leader of the majority and commits other entries.
    n.tick(2, 30);
    n.elect(2);
    n.propose(2, b"b");
    n.heal();
    n.tick_all(3);
    assert_eq!(n.node(1).role(), Role::Follower);
    assert_eq!(n.applied_data(1), n.applied_data(2));
    assert_eq!(n.node(1).raft.log.last_index(), n.node(2).raft.log.last_index());
}

#[test]
fn a_leader_never_commits_an_older_terms_entry_by_counting_replicas() {
    // Node 1 appends X in its term, alone (cut off), then loses leadership;
    // it then wins a later term (its log is the longest) and replicates X to
    // node 2 only, while its own new-term entry is not yet durable locally.
    let mut m = Net::new(&[1, 2, 3]);
    m.elect(1);
    m.isolate(1);
    let (x, xt) = m.node(1).propose(b"X".to_vec()).unwrap();
    m.settle();
    m.tick(1, 21);
    m.heal();
    for id in [1, 2, 3] {
        let r = &mut m.node(id).raft;
        r.ticks_since_start = 10;
        r.election_elapsed = 10;
        r.lease_elapsed = 10;
    }
    m.cut.insert((1, 3));
    m.cut.insert((3, 1));
    // Pre-vote and vote rounds, node 1's disk still fast.
    m.win_in_rounds(1);
    m.slow_disk.insert(1);
    m.settle();
    // Node 2 holds X and the new-term entry; node 1 holds X durably but not its
    // new-term entry: a quorum {1, 2} has X, yet X must not commit alone.
    assert!(m.node(2).raft.log.last_index() > x);
    assert_eq!(m.node(1).raft.log.term(x).unwrap(), xt);
    assert!(
        m.node(1).raft.log.committed < x,
        "X is of an older term: it may not commit by counting replicas"
    );
    m.release_disk(1);
    assert!(
        m.node(1).raft.log.committed > x,
        "X commits together with an entry of the leader's term"
    );
    let c = m.node(1).raft.log.committed;
    assert_eq!(m.node(1).raft.log.term(c).unwrap(), m.node(1).term());
}

#[test]
fn flow_control_caps_messages_in_flight_and_probes_unknown_followers() {
    fn small(id: NodeId) -> Config {
        let mut c = cfg(id);
        c.max_inflight_msgs = 3;
        c.max_msg_bytes = 1;
        c
    }
    let mut n = Net::with(&[1, 2], &[], small);
    n.elect(1);
    n.cut.insert((1, 2)); // appends leave node 1 but never arrive
    for i in 0..10u8 {
        n.node(1).propose(vec![i]).unwrap();
    }
    let rd = n.node(1).ready();
    let appends = rd
        .messages
        .iter()
        .filter(|m| matches!(m.body, MessageBody::Append { .. }))
        .count();
    assert_eq!(appends, 3, "one entry per message, three in flight");
    assert_eq!(n.node(1).raft.trk.progress[&2].inflights.count(), 3);
    n.node(1).report_unreachable(2);
    assert_eq!(n.node(1).raft.trk.progress[&2].state, crate::ProgressState::Probe);
}

// ---- reads -----------------------------------------------------------------------

#[test]
fn read_index_is_confirmed_by_a_quorum_and_forwarded_by_followers() {
    let mut n = Net::new(&[1, 2, 3]);
    n.elect(1);
    n.propose(1, b"w");
    let commit = n.node(1).raft.log.committed;
    n.node(1).read_index(b"r1".to_vec());
    n.settle();
    assert_eq!(
        n.reads[&1],
        vec![ReadState {
            index: commit,
            ctx: b"r1".to_vec()
        }]
    );
    n.node(3).read_index(b"r3".to_vec());
    n.settle();
    assert_eq!(
        n.reads[&3],
        vec![ReadState {
            index: commit,
            ctx: b"r3".to_vec()
        }]
    );
    // A leader cut from its quorum cannot confirm a read.
    n.isolate(1);
    n.node(1).read_index(b"r4".to_vec());
    n.settle();
    assert_eq!(n.reads[&1].len(), 1);
}

// ---- learners and membership ------------------------------------------------------

#[test]
fn learners_receive_entries_but_never_vote_or_count() {
    let mut n = Net::with(&[1, 2, 3], &[4], cfg);
    n.elect(1);
    n.propose(1, b"l");
    assert!(n.applied_data(4).contains(&b"l".to_vec()));
    n.tick(4, 100);
    assert_eq!(n.node(4).role(), Role::Follower, "a learner never campaigns");
    // A learner alone does not make a quorum.
    n.isolate(2);
    n.cut.insert((1, 3));
    let (idx, _) = n.node(1).propose(b"m".to_vec()).unwrap();
    n.settle();
    assert!(n.node(1).raft.log.committed < idx);
}

fn cc(ch: &[(ConfChangeKind, NodeId)]) -> ConfChange {
    ConfChange {
        context: Vec::new(),
        changes: ch.iter().map(|&(kind, node)| ConfChangeSingle { kind, node }).collect(),
    }
}

#[test]
fn joint_consensus_adds_and_removes_several_voters_at_once() {
    let mut n = Net::new(&[1, 2, 3]);
    n.add_node(4);
    n.add_node(5);
    n.elect(1);
    n.node(1)
        .propose_conf_change(cc(&[(ConfChangeKind::AddLearner, 4), (ConfChangeKind::AddLearner, 5)]))
        .unwrap();
    n.settle();
    n.tick_all(3); // leave the joint configuration
    assert!(!n.node(1).conf_state().is_joint());
    n.node(1)
        .propose_conf_change(cc(&[
            (ConfChangeKind::AddVoter, 4),
            (ConfChangeKind::AddVoter, 5),
            (ConfChangeKind::Remove, 2),
            (ConfChangeKind::Remove, 3),
        ]))
        .unwrap();
    n.settle();
    n.tick_all(3);
    for id in [1, 4, 5] {
        let cs = n.node(id).conf_state();
        assert_eq!(cs.voters, vec![1, 4, 5], "node {id}");
        assert!(cs.voters_outgoing.is_empty());
    }
    // The new configuration commits without 2 and 3.
    n.isolate(2);
    n.isolate(3);
    let (idx, _) = n.propose(1, b"after");
    assert!(n.node(1).raft.log.committed >= idx);
}

#[test]
fn one_configuration_change_at_a_time() {
    let mut n = Net::new(&[1, 2, 3]);
    n.add_node(4);
    n.elect(1);
    n.cut.insert((1, 2));
    n.cut.insert((1, 3));
    n.node(1)
        .propose_conf_change(cc(&[(ConfChangeKind::AddLearner, 4)]))
        .unwrap();
    n.settle();
    // Not yet applied: a second change is refused.
    assert_eq!(
        n.node(1).propose_conf_change(cc(&[(ConfChangeKind::Remove, 3)])),
        Err(ProposeError::ConfChangePending)
    );
    n.heal();
    n.tick_all(3);
    assert!(n.node(1).conf_state().learners.contains(&4));
    n.node(1)
        .propose_conf_change(cc(&[(ConfChangeKind::Remove, 3)]))
        .unwrap();
}

#[test]
fn a_new_leader_proposes_no_configuration_change_until_its_first_entry_applies() {
    let mut n = Net::new(&[1, 2, 3]);
    for id in [1, 2, 3] {
        n.node(id).raft.ticks_since_start = 10;
    }
    n.win_in_rounds(2);
    // Its term's first entry has not even left the node yet.
    n.isolate(2);
    n.settle();
    assert!(n.node(2).raft.log.applied < n.node(2).raft.log.last_index());
    assert_eq!(
        n.node(2).propose_conf_change(cc(&[(ConfChangeKind::Remove, 3)])),
        Err(ProposeError::ConfChangePending)
    );
    n.heal();
    n.tick_all(2);
    assert_eq!(n.node(2).role(), Role::Leader);
    n.node(2)
        .propose_conf_change(cc(&[(ConfChangeKind::Remove, 3)]))
        .unwrap();
}

#[test]
fn a_leader_removed_from_the_configuration_steps_down() {
    let mut n = Net::new(&[1, 2, 3]);
    n.elect(1);
    n.node(1)
        .propose_conf_change(cc(&[(ConfChangeKind::Remove, 1)]))
        .unwrap();
    n.settle();
    n.tick_all(2);
    assert_ne!(n.node(1).role(), Role::Leader);
    assert_eq!(n.node(2).conf_state().voters, vec![2, 3]);
    n.tick_all(40);
    assert!(n.node(2).role() == Role::Leader || n.node(3).role() == Role::Leader);
}

// ---- snapshots, compaction, transfer ---------------------------------------------

#[test]
fn a_follower_behind_the_compacted_log_is_caught_up_by_a_snapshot() {
    let mut n = Net::new(&[1, 2, 3]);
    n.elect(1);
    n.isolate(3);
    for i in 0..30u8 {
        n.propose(1, &[i]);
    }
    let applied = n.node(1).raft.log.applied;
    let cs = n.node(1).conf_state();
    n.node(1).storage_mut().compact(applied, cs, b"state".to_vec());
    assert!(n.node(1).raft.log.first_index() > 2);
    n.heal();
    n.tick_all(3);
    assert_eq!(n.node(3).storage().snapshot.meta.index, applied);
    assert_eq!(n.node(3).storage().snapshot.data, b"state");
    assert_eq!(n.node(1).raft.counters.snapshots_sent, 1);
    n.propose(1, b"after");
    assert!(n.applied_data(3).contains(&b"after".to_vec()));
}

#[test]
fn a_failed_snapshot_send_puts_the_follower_back_into_probing() {
    let mut n = Net::new(&[1, 2, 3]);
    n.elect(1);
    n.isolate(3);
    for i in 0..5u8 {
        n.propose(1, &[i]);
    }
    let applied = n.node(1).raft.log.applied;
    let cs = n.node(1).conf_state();
    n.node(1).storage_mut().compact(applied, cs, vec![]);
    n.node(1).raft.trk.progress.get_mut(&3).unwrap().recent_active = true;
    n.node(1).raft.trk.progress.get_mut(&3).unwrap().become_probe();
    n.node(1).raft.send_append(3);
    assert!(matches!(
        n.node(1).raft.trk.progress[&3].state,
        crate::ProgressState::Snapshot { .. }
    ));
    n.node(1).report_snapshot(3, false);
    assert_eq!(n.node(1).raft.trk.progress[&3].state, crate::ProgressState::Probe);
}

#[test]
fn log_compaction_keeps_the_group_working() {
    let mut n = Net::new(&[1, 2, 3]);
    n.elect(1);
    for round in 0..5u8 {
        for i in 0..10u8 {
            n.propose(1, &[round, i]);
        }
        for id in [1, 2, 3] {
            let applied = n.node(id).raft.log.applied;
            let cs = n.node(id).conf_state();
            n.node(id).storage_mut().compact(applied - 1, cs, vec![]);
        }
    }
    assert_eq!(n.applied_data(2).len(), 50);
    assert!(n.node(2).storage().first_index().unwrap() > 40);
}

#[test]
fn leader_transfer_moves_leadership_and_refuses_proposals_meanwhile() {
    let mut n = Net::new(&[1, 2, 3]);
    n.elect(1);
    n.propose(1, b"x");
    n.cut.insert((1, 3));
    n.node(1).propose(b"behind".to_vec()).unwrap();
    n.settle();
    n.node(1).transfer_leader(3); // 3 is behind: appends first
    assert_eq!(n.node(1).propose(b"z".to_vec()), Err(ProposeError::TransferInProgress));
    n.cut.clear();
    n.tick_all(2);
    assert_eq!(n.node(3).role(), Role::Leader);
    assert_eq!(n.node(1).role(), Role::Follower);
    assert_eq!(n.node(1).raft.counters.transfers_started, 1);
}

#[test]
fn a_committed_change_that_does_not_fit_is_refused_by_raft_and_changes_nothing() {
    let mut n = Net::new(&[1, 2, 3]);
    n.elect(1);
    let before = n.node(2).conf_state();
    // Leaving a joint configuration that was never entered.
    let refused = n.node(2).apply_conf_change(&ConfChange::leave_joint());
    assert!(refused.is_err(), "raft reports the refusal: {refused:?}");
    // Removing every voter at once.
    let refused = n.node(2).apply_conf_change(&cc(&[
        (ConfChangeKind::Remove, 1),
        (ConfChangeKind::Remove, 2),
        (ConfChangeKind::Remove, 3),
    ]));
    assert!(refused.is_err());
    assert_eq!(n.node(2).conf_state(), before);
    assert_eq!(n.node(2).counters().invalid_conf_changes, 2);
    // A change that fits is applied and returned.
    let cs = n
        .node(2)
        .apply_conf_change(&cc(&[(ConfChangeKind::AddLearner, 4)]))
        .unwrap();
    assert!(cs.learners_next.contains(&4) || cs.learners.contains(&4));
}

#[test]
fn status_shows_progress_only_on_a_leader() {
    let mut n = Net::new(&[1, 2, 3]);
    n.elect(1);
    let (idx, _) = n.propose(1, b"x");
    let st = n.node(1).status();
    assert_eq!(st.role, Role::Leader);
    assert!(st.leader_ready);
    assert_eq!(st.last_index, idx);
    assert_eq!(st.progress.len(), 3);
    assert!(st.progress.values().all(|p| p.matched == idx), "{:?}", st.progress);
    let f = n.node(2).status();
    assert_eq!(f.role, Role::Follower);
    assert_eq!(f.leader, 1);
    assert!(f.progress.is_empty() && !f.leader_ready);
    assert_eq!(n.node(2).progress(1), None);
}
