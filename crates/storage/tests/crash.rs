//! Crash tests. A child process (this test binary, re-executed) writes and is
//! killed with SIGKILL; the parent reopens the engine and checks what survived.
//!
//! 1. Synced batches: at least 20 kills at random moments; every batch the child
//!    reported synced is present after reopen and no batch is half-applied
//!    (across all three column families). Since SIGKILL keeps the page cache,
//!    the child also reports RocksDB's WAL-sync ticker after each write, and the
//!    parent checks that every synced write really synced the WAL.
//! 2. Snapshot application, killed after each step of the marker protocol: after
//!    reopen the span is wholly old or wholly new.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Rng;
use prost::Message;
use storage::mvcc::{self, MvccStats, ReadOptions, ScanOptions};
use storage::raftlog::{self, HardState, RaftEntry};
use storage::rangestate::{self, AppliedState};
use storage::snapshot::{self, ApplyStep};
use storage::{Engine, EngineOptions, RangeDescriptor, SnapshotMeta, Timestamp};

const KEYS_PER_BATCH: usize = 4;

fn child(test: &str, envs: &[(&str, String)]) -> Command {
    let mut c = Command::new(std::env::current_exe().expect("current exe"));
    c.args(["--exact", test, "--ignored", "--nocapture", "--test-threads=1"]);
    for (k, v) in envs {
        c.env(k, v);
    }
    c
}

fn batch_key(run: u64, i: u64, j: usize) -> Vec<u8> {
    format!("r{run:02}-b{i:06}-{j}").into_bytes()
}

/// Child: writes numbered synced batches forever, reporting each one.
#[test]
#[ignore = "run as a child process by synced_batches_survive_sigkill"]
fn crash_child_synced_batches() {
    let Ok(dir) = std::env::var("CRASH_DIR") else { return };
    let run: u64 = std::env::var("CRASH_RUN").unwrap().parse().unwrap();
    let e = Engine::open(&dir, EngineOptions::default()).unwrap();
    let range_id = 100 + run;
    let mut stats = MvccStats::default();
    for i in 0.. {
        let mut b = e.batch();
        for j in 0..KEYS_PER_BATCH {
            let v = vec![b'x'; 100 + j * 50];
            mvcc::put(
                &mut b,
                &mut stats,
                &batch_key(run, i, j),
                Timestamp::new(i + 1, 0),
                Some(&v),
                None,
            )
            .unwrap();
        }
        raftlog::append(
            &mut b,
            range_id,
            &[RaftEntry {
                index: i + 1,
                term: 1,
                payload: vec![7; 64],
            }],
        )
        .unwrap();
        rangestate::set_applied_state(
            &mut b,
            range_id,
            AppliedState {
                index: i + 1,
                term: 1,
                stats,
                ..Default::default()
            },
        )
        .unwrap();
        e.write(b, true).unwrap();
        println!("synced {i} {}", e.wal_syncs());
    }
}

#[test]
fn synced_batches_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let seed = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7);
    let mut rng = Rng(seed);
    let runs = 24;
    let mut total_synced = 0;
    for run in 0..runs {
        let mut c = child(
            "crash_child_synced_batches",
            &[
                ("CRASH_DIR", dir.path().display().to_string()),
                ("CRASH_RUN", run.to_string()),
            ],
        );
        let mut proc = c.stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
        let out = proc.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut reports = Vec::new();
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.strip_prefix("synced ") {
                    let mut it = rest.split_whitespace().map(|x| x.parse::<u64>().unwrap());
                    reports.push((it.next().unwrap(), it.next().unwrap()));
                }
            }
            reports
        });
        // Kill at a random moment: sometimes while the store is opening, mostly mid-stream.
        std::thread::sleep(Duration::from_millis(50 + rng.below(400)));
        proc.kill().unwrap();
        proc.wait().unwrap();
        let reports = reader.join().unwrap();
        total_synced += reports.len();

        // Every synced write fsynced the WAL: the ticker rose with each one.
        let mut prev = 0;
        for &(i, syncs) in &reports {
            assert!(
                syncs > prev,
                "run {run}: batch {i} reported synced but the WAL sync count did not rise ({prev} -> {syncs})"
            );
            prev = syncs;
        }

        let e = Engine::open(dir.path(), EngineOptions::default()).unwrap();
        let last_reported = reports.last().map(|r| r.0 as i64).unwrap_or(-1);
        let found = check_run(&e, run);
        assert!(
            found > last_reported,
            "run {run}: child reported batch {last_reported} synced but only {found} batches survived"
        );
        drop(e);
    }
    println!("crash test: {runs} SIGKILLs, {total_synced} synced batches all present, none half-applied");
    assert!(
        total_synced > runs as usize,
        "the children wrote too little to test anything"
    );
}

/// Checks that the batches of `run` form a whole prefix 0..n and returns n.
fn check_run(e: &Engine, run: u64) -> i64 {
    let prefix = format!("r{run:02}-").into_bytes();
    let mut end = prefix.clone();
    *end.last_mut().unwrap() += 1;
    let s = ScanOptions {
        start: prefix,
        end,
        read: ReadOptions::at(Timestamp::MAX),
        max_keys: 0,
        reverse: false,
    };
    let kvs = mvcc::scan(e, &s).unwrap().kvs;
    assert_eq!(kvs.len() % KEYS_PER_BATCH, 0, "run {run}: a batch is half-applied");
    let n = (kvs.len() / KEYS_PER_BATCH) as u64;
    for (idx, kv) in kvs.iter().enumerate() {
        let i = idx as u64 / KEYS_PER_BATCH as u64;
        let j = idx % KEYS_PER_BATCH;
        assert_eq!(
            kv.key,
            batch_key(run, i, j),
            "run {run}: batches are not a whole prefix"
        );
        assert_eq!(kv.value.len(), 100 + j * 50);
    }
    let range_id = 100 + run;
    assert_eq!(
        raftlog::last_index(e, range_id).unwrap(),
        n,
        "run {run}: raft log disagrees with the data"
    );
    let applied = rangestate::applied_state(e, range_id).unwrap();
    assert_eq!(applied.index, n, "run {run}: applied state disagrees with the data");
    if n > 0 {
        let s = mvcc::compute_stats(
            e,
            &format!("r{run:02}-").into_bytes(),
            &format!("r{run:02}.").into_bytes(),
        )
        .unwrap();
        assert_eq!(
            applied.stats, s,
            "run {run}: stats written with the data disagree with it"
        );
    }
    n as i64
}

// ---- snapshot application --------------------------------------------------

const STEPS: [ApplyStep; 6] = [
    ApplyStep::BeforeMarker,
    ApplyStep::MarkerWritten,
    ApplyStep::MvccIngested,
    ApplyStep::LocalIngested,
    ApplyStep::FinalBatchWritten,
    ApplyStep::Done,
];

/// Child: applies the snapshot prepared in SNAP_DIR and kills itself at SNAP_STEP.
#[test]
#[ignore = "run as a child process by snapshot_apply_is_all_or_nothing_across_crashes"]
fn crash_child_snapshot_apply() {
    let Ok(dir) = std::env::var("SNAP_DIR") else { return };
    let step: usize = std::env::var("SNAP_STEP").unwrap().parse().unwrap();
    let dir = Path::new(&dir);
    let e = Engine::open(dir.join("store"), EngineOptions::default()).unwrap();
    let meta = SnapshotMeta::decode(&std::fs::read(dir.join("meta.bin")).unwrap()[..]).unwrap();
    let hs = HardState {
        term: 3,
        vote: 1,
        commit: 40,
    };
    // Stage the files as the transport would, after the engine is open.
    let incoming = snapshot::new_incoming_dir(&e, 5).unwrap();
    for f in std::fs::read_dir(dir.join("files")).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), incoming.join(f.file_name())).unwrap();
    }
    println!("staged {}", incoming.display());
    snapshot::apply_snapshot_with_hook(&e, &incoming, &meta, Some(hs), &mut |s| {
        if s == STEPS[step] {
            // SAFETY: plain libc calls with valid arguments.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        }
    })
    .unwrap();
    println!("applied without being killed");
}

#[derive(Debug, PartialEq)]
struct RangeView {
    data: Vec<(Vec<u8>, Vec<u8>)>,
    applied: (u64, u64),
    first: u64,
    last: u64,
    commit: u64,
    desc: Option<RangeDescriptor>,
    neighbour: Vec<(Vec<u8>, Vec<u8>)>,
}

fn view(e: &Engine) -> RangeView {
    let scan = |a: &[u8], b: &[u8]| {
        let s = ScanOptions {
            start: a.to_vec(),
            end: b.to_vec(),
            read: ReadOptions::at(Timestamp::MAX),
            max_keys: 0,
            reverse: false,
        };
        mvcc::scan(e, &s)
            .unwrap()
            .kvs
            .into_iter()
            .map(|kv| (kv.key, kv.value))
            .collect::<Vec<_>>()
    };
    let a = rangestate::applied_state(e, 5).unwrap();
    RangeView {
        data: scan(b"m", b"t"),
        applied: (a.index, a.term),
        first: raftlog::first_index(e, 5).unwrap(),
        last: raftlog::last_index(e, 5).unwrap(),
        commit: raftlog::hard_state(e, 5).unwrap().commit,
        desc: rangestate::descriptor(e, 5).unwrap(),
        neighbour: scan(b"a", b"b"),
    }
}

fn fill(e: &Engine, prefix: &str, n: u64, applied: u64, term: u64, log: bool, desc_gen: u64) {
    let mut st = MvccStats::default();
    let mut b = e.batch();
    for i in 0..n {
        let k = format!("{prefix}{i:03}");
        mvcc::put(
            &mut b,
            &mut st,
            k.as_bytes(),
            Timestamp::new(i + 1, 0),
            Some(k.as_bytes()),
            None,
        )
        .unwrap();
    }
    let desc = RangeDescriptor {
        range_id: 5,
        start_key: b"m".to_vec(),
        end_key: b"t".to_vec(),
        generation: desc_gen,
        ..Default::default()
    };
    rangestate::set_descriptor(&mut b, &desc).unwrap();
    rangestate::set_applied_state(
        &mut b,
        5,
        AppliedState {
            index: applied,
            term,
            stats: st,
            ..Default::default()
        },
    )
    .unwrap();
    if log {
        let es: Vec<RaftEntry> = (1..=applied)
            .map(|i| RaftEntry {
                index: i,
                term,
                payload: vec![1; 10],
            })
            .collect();
        raftlog::append(&mut b, 5, &es).unwrap();
        raftlog::save_hard_state(
            &mut b,
            5,
            HardState {
                term,
                vote: 1,
                commit: applied,
            },
        )
        .unwrap();
    }
    e.write(b, true).unwrap();
}

#[test]
fn snapshot_apply_is_all_or_nothing_across_crashes() {
    // The new state, built once on a sender engine.
    let sender_dir = tempfile::tempdir().unwrap();
    let sender = Engine::open(sender_dir.path(), EngineOptions::default()).unwrap();
    fill(&sender, "new-", 30, 40, 3, false, 2);
    let snap_files = tempfile::tempdir().unwrap();
    let meta = snapshot::build_snapshot(&sender, 5, b"m", b"t", snap_files.path()).unwrap();

    let mut old_view = None;
    let mut new_view = None;
    for (step_idx, step) in STEPS.iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        {
            let e = Engine::open(dir.path().join("store"), EngineOptions::default()).unwrap();
            fill(&e, "old-", 12, 7, 1, true, 1);
            let mut b = e.batch();
            let mut st = MvccStats::default();
            mvcc::put(
                &mut b,
                &mut st,
                b"a-neighbour",
                Timestamp::new(1, 0),
                Some(b"keep"),
                None,
            )
            .unwrap();
            e.write(b, true).unwrap();
            old_view.get_or_insert_with(|| view(&e));
        }
        let files = dir.path().join("files");
        std::fs::create_dir_all(&files).unwrap();
        for f in std::fs::read_dir(snap_files.path()).unwrap() {
            let f = f.unwrap();
            std::fs::copy(f.path(), files.join(f.file_name())).unwrap();
        }
        let incoming = dir.path().join("store/snapshots/r5-0");
        std::fs::write(dir.path().join("meta.bin"), meta.encode_to_vec()).unwrap();
        let t = Instant::now();
        let status = child(
            "crash_child_snapshot_apply",
            &[
                ("SNAP_DIR", dir.path().display().to_string()),
                ("SNAP_STEP", step_idx.to_string()),
            ],
        )
        .stderr(Stdio::null())
        .output()
        .unwrap();
        let out = String::from_utf8_lossy(&status.stdout);
        assert!(
            out.contains(&format!("staged {}", incoming.display())),
            "step {step:?}: child did not stage where expected: {out}"
        );
        assert!(
            !status.status.success(),
            "step {step:?}: the child was meant to die, took {:?}",
            t.elapsed()
        );
        let e = Engine::open(dir.path().join("store"), EngineOptions::default()).unwrap();
        let v = view(&e);
        if *step == ApplyStep::BeforeMarker {
            assert_eq!(Some(&v), old_view.as_ref(), "killed before the marker: wholly old");
        } else {
            assert_eq!(v.data.len(), 30, "step {step:?}: span not wholly new: {v:?}");
            assert!(v.data.iter().all(|(k, _)| k.starts_with(b"new-")));
            assert_eq!(v.applied, (40, 3));
            assert_eq!((v.first, v.last, v.commit), (41, 40, 40));
            assert_eq!(v.desc.as_ref().map(|d| d.generation), Some(2));
            assert_eq!(v.neighbour, vec![(b"a-neighbour".to_vec(), b"keep".to_vec())]);
            if let Some(nv) = &new_view {
                assert_eq!(&v, nv, "step {step:?}: new state differs between crash points");
            }
            new_view = Some(v);
        }
        assert!(
            !incoming.exists(),
            "step {step:?}: the snapshot directory outlived the reopen"
        );
    }
}
