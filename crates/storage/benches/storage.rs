//! Storage benchmark: the fdatasync floor of the disk, MVCC put, point get and
//! 100-row scan, and raft log appends with sync (one entry per sync, and 100
//! ranges' entries in one synced batch).
//!
//! Run: `make bench-storage` (= `cargo bench --profile dev -p tardigrade-storage`,
//! the one profile tests and `make run` use). `BENCH_DIR` picks the directory
//! (default: the system temp dir); `BENCH_SCALE` multiplies the operation counts.

use std::fs::OpenOptions;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use storage::mvcc::{self, MvccStats, ReadOptions, ScanOptions};
use storage::raftlog::{self, RaftEntry};
use storage::{Engine, EngineOptions, Timestamp};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn report(name: &str, unit: &str, n: u64, units_per_op: u64, elapsed: Duration, h: &Histogram<u64>) {
    let rate = (n * units_per_op) as f64 / elapsed.as_secs_f64();
    println!(
        "| {name:<44} | {rate:>12.0} {unit:<10} | {:>9.1} | {:>9.1} | {:>9.1} |",
        h.value_at_quantile(0.5) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0,
        h.max() as f64 / 1000.0,
    );
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("histogram bounds")
}

fn timed<F: FnMut(u64)>(n: u64, mut f: F) -> (Duration, Histogram<u64>) {
    let mut h = hist();
    let start = Instant::now();
    for i in 0..n {
        let t = Instant::now();
        f(i);
        h.record(t.elapsed().as_nanos().max(1) as u64).ok();
    }
    (start.elapsed(), h)
}

fn key(i: u64) -> Vec<u8> {
    format!("user/{i:010}").into_bytes()
}

fn main() {
    // `cargo bench` passes --bench; ignore arguments.
    let scale: u64 = std::env::var("BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let base = std::env::var("BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir());
    std::fs::create_dir_all(&base).expect("bench dir");
    let dir = tempfile::tempdir_in(&base).expect("tempdir");
    println!("storage benchmark in {} (scale {scale})", dir.path().display());
    println!("| operation                                    | throughput              | p50 (us)  | p99 (us)  | max (us)  |");
    println!("|----------------------------------------------|-------------------------|-----------|-----------|-----------|");

    // 1. The floor: a 4 KiB overwrite plus fdatasync on the same filesystem.
    {
        let path = dir.path().join("fsync-probe");
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .expect("open probe");
        f.write_all(&[0u8; 4096]).expect("write");
        f.sync_all().expect("sync");
        let buf = [7u8; 4096];
        let n = 1000 * scale;
        let (el, h) = timed(n, |_| {
            f.write_all_at(&buf, 0).expect("pwrite");
            f.sync_data().expect("fdatasync");
        });
        report("fdatasync 4 KiB (the floor)", "syncs/s", n, 1, el, &h);
        f.seek(SeekFrom::Start(0)).ok();
    }

    let engine = Engine::open(dir.path().join("store"), EngineOptions::default()).expect("open engine");
    let nkeys = 100_000 * scale;

    // 2. MVCC put, one put per unsynced batch.
    let mut stats = MvccStats::default();
    let value = vec![b'v'; 100];
    let (el, h) = timed(nkeys, |i| {
        let mut b = engine.batch();
        mvcc::put(
            &mut b,
            &mut stats,
            &key(i),
            Timestamp::new(i + 1, 0),
            Some(&value),
            None,
        )
        .expect("put");
        engine.write(b, false).expect("write");
    });
    report("mvcc put (100 B value, no sync)", "puts/s", nkeys, 1, el, &h);
    engine.flush().expect("flush");

    // 3. Point gets of random existing keys.
    let mut rng = Rng(0x5eed);
    let read = ReadOptions::at(Timestamp::MAX);
    let n = 100_000 * scale;
    let (el, h) = timed(n, |_| {
        let k = key(rng.next() % nkeys);
        let got = mvcc::get(&engine, &k, &read).expect("get");
        assert!(got.is_some());
    });
    report("mvcc point get", "gets/s", n, 1, el, &h);

    // 4. 100-row scans from random starting keys.
    let n = 5_000 * scale;
    let (el, h) = timed(n, |_| {
        let s = ScanOptions {
            start: key(rng.next() % (nkeys - 100)),
            end: Vec::new(),
            read,
            max_keys: 100,
            reverse: false,
        };
        let r = mvcc::scan(&engine, &s).expect("scan");
        assert_eq!(r.kvs.len(), 100);
    });
    report("mvcc scan, 100 rows", "rows/s", n, 100, el, &h);

    // 5a. Raft log: one entry (256 B) per synced batch.
    let payload = vec![b'e'; 256];
    let n = 1000 * scale;
    let (el, h) = timed(n, |i| {
        let mut b = engine.batch();
        raftlog::append(
            &mut b,
            1,
            &[RaftEntry {
                index: i + 1,
                term: 1,
                payload: payload.clone(),
            }],
        )
        .expect("append");
        engine.write(b, true).expect("write");
    });
    report("raft append, 1 entry per sync", "entries/s", n, 1, el, &h);

    // 5b. Raft log: 100 ranges' entries in one synced batch (group commit).
    let n = 300 * scale;
    let (el, h) = timed(n, |i| {
        let mut b = engine.batch();
        for r in 0..100u64 {
            raftlog::append(
                &mut b,
                1000 + r,
                &[RaftEntry {
                    index: i + 1,
                    term: 1,
                    payload: payload.clone(),
                }],
            )
            .expect("append");
        }
        engine.write(b, true).expect("write");
    });
    report(
        "raft append, 100 ranges x 1 entry per sync",
        "entries/s",
        n,
        100,
        el,
        &h,
    );
    println!("(latency columns are per operation: per put/get/scan/sync batch)");
    println!("WAL syncs counted by RocksDB: {}", engine.wal_syncs());
}
