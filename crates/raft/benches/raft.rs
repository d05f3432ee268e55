//! Microbenchmark of the Raft core alone: a 3-node group driven in memory on
//! one thread, proposals batched at the leader; reports committed (and applied
//! on every node) entries per second. Also reports the memory of an idle group.
//!
//! Run: `make bench-raft` (= `cargo bench --profile dev -p tardigrade-raft --bench raft`).
//! `BENCH_ENTRIES` (default 2,000,000), `BENCH_BATCH` (default 1,000 entries
//! proposed before the group is driven), `BENCH_PAYLOAD` (bytes, default 16).

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Instant;

/// Counts live heap bytes, to measure what idle groups cost.
struct Counting;

static LIVE: AtomicI64 = AtomicI64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as i64, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as i64, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

use raft::{ConfState, Config, MemStorage, Message, RawNode, Role};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

struct Group {
    nodes: BTreeMap<u64, RawNode<MemStorage>>,
    applied: BTreeMap<u64, u64>,
}

impl Group {
    fn new(n: u64) -> Group {
        let voters: Vec<u64> = (1..=n).collect();
        let mut nodes = BTreeMap::new();
        for id in 1..=n {
            let mut c = Config::new(id);
            c.max_inflight_msgs = 64;
            c.max_msg_bytes = 4 << 20;
            c.max_inflight_bytes = 64 << 20;
            let raw = RawNode::new(c, MemStorage::new_with_conf(ConfState::with_voters(&voters))).expect("node");
            nodes.insert(id, raw);
        }
        Group {
            nodes,
            applied: BTreeMap::new(),
        }
    }

    /// Processes every ready (writing to storage at once) and delivers every
    /// message, until nothing moves. Returns the number of messages delivered.
    fn pump(&mut self) -> u64 {
        let mut delivered = 0;
        loop {
            let mut msgs: Vec<Message> = Vec::new();
            for (id, raw) in self.nodes.iter_mut() {
                while raw.has_ready() {
                    let mut rd = raw.ready();
                    msgs.append(&mut rd.messages);
                    let st = raw.storage_mut();
                    if let Some(s) = &rd.snapshot {
                        st.apply_snapshot(s.clone());
                    }
                    st.append(&rd.entries);
                    if let Some(hs) = rd.hard_state {
                        st.hard_state = hs;
                    }
                    raw.on_persisted(rd.number);
                    msgs.append(&mut rd.persisted_messages);
                    if let Some(last) = rd.committed_entries.last() {
                        let last = last.index;
                        raw.storage_mut().applied = last;
                        raw.on_applied(last);
                        self.applied.insert(*id, last);
                    }
                }
            }
            if msgs.is_empty() {
                return delivered;
            }
            delivered += msgs.len() as u64;
            for m in msgs {
                if let Some(r) = self.nodes.get_mut(&m.to) {
                    r.step(m);
                }
            }
        }
    }

    fn leader(&self) -> Option<u64> {
        self.nodes
            .iter()
            .find(|(_, r)| r.role() == Role::Leader)
            .map(|(&id, _)| id)
    }
}

fn main() {
    let total = env("BENCH_ENTRIES", 2_000_000);
    let batch = env("BENCH_BATCH", 1_000);
    let payload = vec![7u8; env("BENCH_PAYLOAD", 16) as usize];
    let mut g = Group::new(3);
    let mut ticks = 0;
    let leader = loop {
        for r in g.nodes.values_mut() {
            r.tick();
        }
        g.pump();
        ticks += 1;
        if let Some(l) = g.leader() {
            break l;
        }
        assert!(ticks < 1000, "no leader");
    };
    let start = Instant::now();
    let mut proposed = 0;
    let mut messages = 0;
    let mut last_index = 0;
    while proposed < total {
        let raw = g.nodes.get_mut(&leader).expect("leader");
        for _ in 0..batch {
            last_index = raw.propose(payload.clone()).expect("propose").0;
        }
        proposed += batch;
        messages += g.pump();
        // Everything proposed is committed and applied on every node.
        assert!(
            g.applied.values().all(|&a| a >= last_index),
            "not applied everywhere: {:?}",
            g.applied
        );
        // Keep memory flat: compact the logs behind what is applied.
        for r in g.nodes.values_mut() {
            let applied = r.storage().applied;
            let cs = r.conf_state();
            r.storage_mut().compact(applied, cs, Vec::new());
        }
    }
    let el = start.elapsed();
    println!(
        "raft core, 3 nodes in memory on one thread: {total} entries of {} B in batches of {batch}: {:.2}s, {:.0} entries/s committed and applied on all 3; {:.1} messages per batch",
        payload.len(),
        el.as_secs_f64(),
        total as f64 / el.as_secs_f64(),
        messages as f64 / (total / batch) as f64
    );

    // Memory of idle group members: 10,000 members of 3-voter groups that
    // elected a leader and went quiet, measured on the heap, plus the struct.
    let n = 10_000u64;
    let voters = [1u64, 2, 3];
    let before = LIVE.load(Ordering::Relaxed);
    let mut idle = Vec::with_capacity(n as usize);
    let base = LIVE.load(Ordering::Relaxed);
    for i in 0..n {
        let mut c = Config::new(1 + i % 3);
        c.seed = i;
        let mut raw = RawNode::new(c, MemStorage::new_with_conf(ConfState::with_voters(&voters))).expect("node");
        while raw.has_ready() {
            let rd = raw.ready();
            raw.on_persisted(rd.number);
        }
        idle.push(raw);
    }
    let heap = LIVE.load(Ordering::Relaxed) - base;
    let per = heap as f64 / n as f64 + std::mem::size_of::<RawNode<MemStorage>>() as f64;
    println!(
        "idle group member (3 voters, follower, in-memory log): {per:.0} B each ({} B struct + {:.0} B heap), over {n} members",
        std::mem::size_of::<RawNode<MemStorage>>(),
        heap as f64 / n as f64
    );
    drop(idle);
    let _ = before;
}
