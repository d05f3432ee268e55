//! The simulator's test runs: many seeded schedules for 3 and 5 nodes, one
//! seed on demand, and the proof that planted bugs are caught.
//!
//! - `RAFT_SIM_SEEDS=N`: seeds per shard (default 250; 8 shards, 2,000 runs).
//! - `RAFT_SIM_STEPS=N`: steps per run (default 1,000).
//! - `RAFT_SEED=S RAFT_NODES=N`: `one_seed` runs that seed alone.
#![cfg(test)]

use super::{run_one, SimConfig, Stats};
use crate::raft::Mutations;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

/// Runs seeds `[first, first + count)` and returns what they exercised.
fn run_shard(nodes: u64, first: u64, count: u64) -> Stats {
    let steps = env("RAFT_SIM_STEPS", 1000);
    let mut total = Stats::default();
    for seed in first..first + count {
        let cfg = SimConfig {
            seed,
            nodes,
            steps,
            mutations: Mutations::default(),
        };
        match run_one(cfg) {
            Ok(s) => total += s,
            Err(f) => panic!("{f}"),
        }
    }
    total
}

/// 3,000 schedules by default (1,500 with 3 nodes, 1,500 with 5), on two
/// threads; `RAFT_SIM_SEEDS=N` runs N of each instead.
#[test]
fn simulate_many_schedules() {
    let per = env("RAFT_SIM_SEEDS", 1500);
    let started = std::time::Instant::now();
    let handles: Vec<_> = (0..2u64)
        .map(|half| {
            std::thread::spawn(move || {
                let mut s = Stats::default();
                for nodes in [3u64, 5] {
                    let base = 1_000_000 * nodes;
                    let (lo, hi) = (half * per / 2, (half + 1) * per / 2);
                    s += run_shard(nodes, base + lo, hi - lo);
                }
                s
            })
        })
        .collect();
    let mut s = Stats::default();
    for h in handles {
        match h.join() {
            Ok(x) => s += x,
            Err(e) => std::panic::resume_unwind(e),
        }
    }
    println!(
        "raft simulator: {} schedules ({per} x 3 nodes, {per} x 5 nodes), {} steps in {:.1}s\n  elections {}, snapshots {}, joint configurations {}, leader transfers {}, crashes {}, partitions {}, pauses {}, drops {}, duplicates {}, acknowledged proposals {}, reads {}, compactions {}\n  steps with a lease {}, quiesced leaders {}, supports withdrawn {}, votes refused on a promise {}",
        2 * per,
        s.steps,
        started.elapsed().as_secs_f64(),
        s.elections, s.snapshots, s.joint_configs, s.transfers, s.crashes, s.partitions, s.pauses, s.drops, s.duplicates, s.proposals_acked, s.reads, s.compactions,
        s.lease_steps, s.quiesced, s.withdrawals, s.votes_ignored_in_lease
    );
    for (what, n) in [
        ("elections", s.elections),
        ("snapshots", s.snapshots),
        ("joint configurations", s.joint_configs),
        ("leader transfers", s.transfers),
        ("crashes", s.crashes),
        ("partitions", s.partitions),
        ("pauses", s.pauses),
        ("acknowledged proposals", s.proposals_acked),
        ("reads", s.reads),
        ("compactions", s.compactions),
        ("steps with a lease", s.lease_steps),
        ("quiesced leaders", s.quiesced),
        ("support withdrawals", s.withdrawals),
    ] {
        assert!(n > 0, "the schedules exercised no {what}");
    }
}

/// `RAFT_SEED=S RAFT_NODES=N cargo test -p tardigrade-raft sim::tests::one_seed -- --nocapture`
#[test]
fn one_seed() {
    let seed = env("RAFT_SEED", 42);
    let nodes = env("RAFT_NODES", 3);
    let steps = env("RAFT_SIM_STEPS", 1000);
    let cfg = SimConfig {
        seed,
        nodes,
        steps,
        mutations: Mutations::default(),
    };
    match run_one(cfg) {
        Ok(s) => println!("seed {seed} ({nodes} nodes) passed: {s:?}"),
        Err(f) => panic!("{f}"),
    }
}

/// Seeds within which each planted bug must be caught.
const MUTATION_SEEDS: u64 = 1000;

fn mutation_seeds() -> u64 {
    env("RAFT_MUTATION_SEEDS", MUTATION_SEEDS)
}

fn caught(name: &str, m: Mutations) {
    for seed in 0..mutation_seeds() {
        for nodes in [3, 5] {
            let cfg = SimConfig {
                seed: 7_000_000 + seed,
                nodes,
                steps: 1000,
                mutations: m,
            };
            if let Err(f) = run_one(cfg) {
                println!(
                    "mutation {name}: caught by seed {} ({nodes} nodes) at step {}: {}",
                    f.seed, f.step, f.what
                );
                return;
            }
        }
    }
    panic!("mutation {name} was not caught within {} seeds", mutation_seeds());
}

#[test]
fn mutation_commit_old_term_is_caught() {
    caught(
        "commit an older term's entry by counting replicas",
        Mutations {
            commit_old_term: true,
            ..Default::default()
        },
    );
}

#[test]
fn mutation_double_vote_is_caught() {
    caught(
        "grant two votes in one term",
        Mutations {
            double_vote: true,
            ..Default::default()
        },
    );
}

#[test]
fn mutation_skip_log_matching_is_caught() {
    caught(
        "accept appends without the log-matching check",
        Mutations {
            skip_log_matching: true,
            ..Default::default()
        },
    );
}

#[test]
fn mutation_vote_before_durable_is_caught() {
    caught(
        "answer a vote before it is durable",
        Mutations {
            vote_before_durable: true,
            ..Default::default()
        },
    );
}

#[test]
fn mutation_vote_while_fortified_is_caught() {
    caught(
        "a follower votes while it supports a fortified leader",
        Mutations {
            vote_while_fortified: true,
            ..Default::default()
        },
    );
}

#[test]
fn mutation_support_past_interval_is_caught() {
    caught(
        "a store counts on support past the supporter's interval",
        Mutations {
            support_past_interval: true,
            ..Default::default()
        },
    );
}

#[test]
fn mutation_heartbeat_full_commit_is_caught() {
    caught(
        "heartbeats carry the leader's commit, not min(commit, match)",
        Mutations {
            heartbeat_full_commit: true,
            ..Default::default()
        },
    );
}

#[test]
fn mutation_early_conf_change_is_caught() {
    caught(
        "new leader changes configuration before its first entry applies",
        Mutations {
            early_conf_change: true,
            ..Default::default()
        },
    );
}

/// Debug aid: `RAFT_SEED=S RAFT_MUTATION=name` runs one seed with a mutation.
#[test]
fn one_seed_mutated() {
    let Ok(name) = std::env::var("RAFT_MUTATION") else {
        return;
    };
    let mut m = Mutations::default();
    match name.as_str() {
        "commit_old_term" => m.commit_old_term = true,
        "double_vote" => m.double_vote = true,
        "skip_log_matching" => m.skip_log_matching = true,
        "vote_before_durable" => m.vote_before_durable = true,
        "vote_while_fortified" => m.vote_while_fortified = true,
        "support_past_interval" => m.support_past_interval = true,
        "heartbeat_full_commit" => m.heartbeat_full_commit = true,
        "early_conf_change" => m.early_conf_change = true,
        other => panic!("unknown mutation {other}"),
    }
    let cfg = SimConfig {
        seed: env("RAFT_SEED", 42),
        nodes: env("RAFT_NODES", 3),
        steps: env("RAFT_SIM_STEPS", 1000),
        mutations: m,
    };
    match run_one(cfg) {
        Ok(s) => println!("passed: {s:?}"),
        Err(f) => panic!("{f}"),
    }
}
