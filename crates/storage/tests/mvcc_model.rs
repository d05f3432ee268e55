//! MVCC checked against a model: random sequences of puts, deletes, intent
//! writes, resolutions, GC and reads at random timestamps run against the engine
//! and against a plain `BTreeMap` model, which must agree on every answer. After
//! every batch the statistics accumulated from write deltas must equal a full
//! recomputation.
//!
//! `MVCC_MODEL_SEEDS=N` runs N seeds (default 150); `MVCC_MODEL_SEED=S` runs one.

mod common;

use std::collections::BTreeMap;

use common::{temp_engine, Rng};
use storage::mvcc::{self, MvccStats, ReadOptions, Resolution, ScanOptions, TxnId, TxnMeta};
use storage::{Error, Timestamp};

#[derive(Clone, Debug, Default)]
struct KeyModel {
    versions: BTreeMap<Timestamp, Option<Vec<u8>>>,
    intent: Option<(TxnMeta, Timestamp, Option<Vec<u8>>)>,
}

impl KeyModel {
    fn is_empty(&self) -> bool {
        self.versions.is_empty() && self.intent.is_none()
    }
}

#[derive(Default, Clone)]
struct Model {
    keys: BTreeMap<Vec<u8>, KeyModel>,
}

/// Outcomes compared between engine and model.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Ok,
    Value(Option<(Vec<u8>, Timestamp)>),
    Scan(Vec<(Vec<u8>, Vec<u8>, Timestamp)>, Option<Vec<u8>>),
    Resolved(bool),
    Gc(u64),
    WriteTooOld(Timestamp),
    Conflict(Vec<(Vec<u8>, TxnId)>),
    Uncertain(Vec<u8>, Timestamp),
    TxnState,
}

fn outcome_of_err(e: Error) -> Outcome {
    match e {
        Error::WriteTooOld { retry_ts, .. } => Outcome::WriteTooOld(retry_ts),
        Error::WriteIntent { intents } => Outcome::Conflict(intents.into_iter().map(|i| (i.key, i.txn.id)).collect()),
        Error::ReadWithinUncertainty { key, value_ts, .. } => Outcome::Uncertain(key, value_ts),
        Error::TxnState(_) => Outcome::TxnState,
        other => panic!("unexpected engine error: {other}"),
    }
}

enum Read {
    Value(Option<(Vec<u8>, Timestamp)>),
    Conflict(Vec<u8>, TxnId),
}

impl Model {
    fn put(&mut self, key: &[u8], ts: Timestamp, value: Option<Vec<u8>>, txn: Option<TxnMeta>) -> Outcome {
        let km = self.keys.entry(key.to_vec()).or_default();
        let mut write_ts = ts;
        if let Some((it, its, _)) = &km.intent {
            match txn {
                Some(t) if t.id == it.id => {
                    if it.epoch > t.epoch {
                        return Outcome::TxnState;
                    }
                    write_ts = write_ts.max(*its);
                }
                _ => return Outcome::Conflict(vec![(key.to_vec(), it.id)]),
            }
        }
        if let Some((&newest, _)) = km.versions.iter().next_back() {
            if newest >= write_ts {
                return Outcome::WriteTooOld(newest.next());
            }
        }
        match txn {
            Some(t) => km.intent = Some((t, write_ts, value)),
            None => {
                km.versions.insert(write_ts, value);
            }
        }
        Outcome::Ok
    }

    fn resolve(&mut self, key: &[u8], id: TxnId, res: Resolution) -> Outcome {
        let Some(km) = self.keys.get_mut(key) else {
            return Outcome::Resolved(false);
        };
        let Some((it, its, v)) = km.intent.clone() else {
            return Outcome::Resolved(false);
        };
        if it.id != id {
            return Outcome::Resolved(false);
        }
        if let Resolution::Commit { ts, epoch } = res {
            if it.epoch > epoch {
                return Outcome::TxnState;
            }
            if it.epoch == epoch {
                if ts < its || km.versions.keys().next_back().is_some_and(|&n| n >= ts) {
                    return Outcome::TxnState;
                }
                km.versions.insert(ts, v);
            }
        }
        km.intent = None;
        Outcome::Resolved(true)
    }

    fn gc(&mut self, threshold: Timestamp) -> Outcome {
        let mut removed = 0;
        for km in self.keys.values_mut() {
            let below: Vec<Timestamp> = km.versions.range(..=threshold).rev().map(|(t, _)| *t).collect();
            let Some(&first) = below.first() else { continue };
            let keep_first = km.versions[&first].is_some();
            for t in below.iter().skip(if keep_first { 1 } else { 0 }) {
                km.versions.remove(t);
                removed += 1;
            }
        }
        self.keys.retain(|_, km| !km.is_empty());
        Outcome::Gc(removed)
    }

    fn read_key(&self, key: &[u8], o: &ReadOptions) -> Result<Read, Outcome> {
        let Some(km) = self.keys.get(key) else {
            return Ok(Read::Value(None));
        };
        let limit = o.uncertainty_limit.max(o.ts);
        if let Some((it, its, v)) = &km.intent {
            let own = o.txn.filter(|t| t.id == it.id);
            match own {
                Some(t) if it.epoch > t.epoch => return Err(Outcome::TxnState),
                Some(t) if it.epoch == t.epoch => return Ok(Read::Value(v.clone().map(|v| (v, *its)))),
                Some(_) => {}
                None => {
                    if *its <= limit {
                        return Ok(Read::Conflict(key.to_vec(), it.id));
                    }
                }
            }
        }
        match km.versions.range(..=limit).next_back() {
            None => Ok(Read::Value(None)),
            Some((&t, _)) if t > o.ts => Err(Outcome::Uncertain(key.to_vec(), t)),
            Some((&t, v)) => Ok(Read::Value(v.clone().map(|v| (v, t)))),
        }
    }

    fn get(&self, key: &[u8], o: &ReadOptions) -> Outcome {
        match self.read_key(key, o) {
            Err(e) => e,
            Ok(Read::Value(v)) => Outcome::Value(v),
            Ok(Read::Conflict(k, id)) => Outcome::Conflict(vec![(k, id)]),
        }
    }

    fn scan(&self, s: &ScanOptions) -> Outcome {
        let in_span = |k: &Vec<u8>| k >= &s.start && (s.end.is_empty() || k < &s.end);
        let mut keys: Vec<&Vec<u8>> = self.keys.keys().filter(|k| in_span(k)).collect();
        if s.reverse {
            keys.reverse();
        }
        let mut kvs = Vec::new();
        let mut conflicts = Vec::new();
        let mut resume = None;
        for k in keys {
            if s.max_keys > 0 && kvs.len() >= s.max_keys {
                resume = Some(if s.reverse { [&k[..], &[0]].concat() } else { k.clone() });
                break;
            }
            match self.read_key(k, &s.read) {
                Err(e) => return e,
                Ok(Read::Value(Some((v, t)))) => kvs.push((k.clone(), v, t)),
                Ok(Read::Value(None)) => {}
                Ok(Read::Conflict(k, id)) => conflicts.push((k, id)),
            }
        }
        if !conflicts.is_empty() {
            return Outcome::Conflict(conflicts);
        }
        Outcome::Scan(kvs, resume)
    }
}

const KEYS: &[&[u8]] = &[
    b"",
    b"\x00",
    b"a",
    b"a\x00",
    b"a\x00\x00",
    b"a\x01",
    b"b",
    b"b\xff",
    b"c",
];

fn rand_key(r: &mut Rng) -> Vec<u8> {
    // The empty key is not writable; it serves only as a scan bound.
    r.pick(&KEYS[1..]).to_vec()
}

fn rand_ts(r: &mut Rng) -> Timestamp {
    Timestamp::new(1 + r.below(20), r.below(3) as u32)
}

fn rand_txn(r: &mut Rng) -> TxnMeta {
    TxnMeta {
        id: TxnId([1 + r.below(3) as u8; 16]),
        epoch: r.below(3) as u32,
    }
}

fn rand_read(r: &mut Rng) -> ReadOptions {
    let ts = rand_ts(r);
    let limit = if r.chance(50) {
        Timestamp::new(ts.wall + r.below(6), r.below(3) as u32)
    } else {
        ts
    };
    ReadOptions {
        ts,
        uncertainty_limit: limit,
        txn: if r.chance(40) { Some(rand_txn(r)) } else { None },
        ignore_intents: false,
    }
}

fn run_seed(seed: u64, steps: usize) {
    let (_dir, engine) = temp_engine();
    let mut model = Model::default();
    let mut r = Rng(seed);
    let mut stats = MvccStats::default();
    let mut step = 0;
    while step < steps {
        // Several operations per batch, so reads through a batch see its own writes.
        let mut batch = engine.batch();
        let ops = 1 + r.below(4);
        for _ in 0..ops {
            step += 1;
            let op = r.below(100);
            let (what, got, want) = if op < 30 {
                let key = rand_key(&mut r);
                let ts = rand_ts(&mut r);
                let value = if r.chance(20) {
                    None
                } else {
                    Some(format!("v{}", r.below(1000)).into_bytes())
                };
                let txn = if r.chance(45) { Some(rand_txn(&mut r)) } else { None };
                let got = match mvcc::put(&mut batch, &mut stats, &key, ts, value.as_deref(), txn.as_ref()) {
                    Ok(()) => Outcome::Ok,
                    Err(e) => outcome_of_err(e),
                };
                (
                    format!("put {key:?}@{ts} {value:?} {txn:?}"),
                    got,
                    model.put(&key, ts, value, txn),
                )
            } else if op < 45 {
                let key = rand_key(&mut r);
                let id = TxnId([1 + r.below(3) as u8; 16]);
                let res = if r.chance(70) {
                    Resolution::Commit {
                        ts: rand_ts(&mut r),
                        epoch: r.below(3) as u32,
                    }
                } else {
                    Resolution::Abort
                };
                let got = match mvcc::resolve_intent(&mut batch, &mut stats, &key, id, res) {
                    Ok(b) => Outcome::Resolved(b),
                    Err(e) => outcome_of_err(e),
                };
                (
                    format!("resolve {key:?} {id:?} {res:?}"),
                    got,
                    model.resolve(&key, id, res),
                )
            } else if op < 50 {
                let th = rand_ts(&mut r);
                let got = match mvcc::gc(&mut batch, &mut stats, b"", b"", th) {
                    Ok(g) => Outcome::Gc(g.versions_removed),
                    Err(e) => outcome_of_err(e),
                };
                (format!("gc {th}"), got, model.gc(th))
            } else if op < 75 {
                let key = rand_key(&mut r);
                let o = rand_read(&mut r);
                let got = match mvcc::get(&batch, &key, &o) {
                    Ok(v) => Outcome::Value(v.map(|kv| (kv.value, kv.ts))),
                    Err(e) => outcome_of_err(e),
                };
                (format!("get {key:?} {o:?}"), got, model.get(&key, &o))
            } else {
                let mut a = r.pick(KEYS).to_vec();
                let mut b = if r.chance(20) {
                    Vec::new()
                } else {
                    r.pick(KEYS).to_vec()
                };
                if !b.is_empty() && a > b {
                    std::mem::swap(&mut a, &mut b);
                }
                let s = ScanOptions {
                    start: a,
                    end: b,
                    read: rand_read(&mut r),
                    max_keys: r.below(4) as usize,
                    reverse: r.chance(50),
                };
                let got = match mvcc::scan(&batch, &s) {
                    Ok(res) => Outcome::Scan(
                        res.kvs.into_iter().map(|kv| (kv.key, kv.value, kv.ts)).collect(),
                        res.resume_key,
                    ),
                    Err(e) => outcome_of_err(e),
                };
                (format!("scan {s:?}"), got, model.scan(&s))
            };
            assert_eq!(got, want, "seed {seed} step {step}: {what}\nrerun: MVCC_MODEL_SEED={seed} cargo test -p tardigrade-storage --test mvcc_model");
            // Keys left with no record exist for neither side.
            model.keys.retain(|_, km| !km.is_empty());
        }
        engine.write(batch, false).expect("write batch");
        let full = mvcc::compute_stats(&engine, b"", b"").expect("compute stats");
        assert_eq!(
            stats, full,
            "seed {seed} step {step}: stats from deltas differ from recomputation"
        );
    }
}

#[test]
fn mvcc_matches_model() {
    if let Ok(s) = std::env::var("MVCC_MODEL_SEED") {
        let seed: u64 = s.parse().expect("MVCC_MODEL_SEED is a number");
        run_seed(seed, 400);
        return;
    }
    let seeds: u64 = std::env::var("MVCC_MODEL_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(150);
    for seed in 0..seeds {
        run_seed(seed, 400);
    }
    println!("mvcc model: {seeds} seeds x 400 operations agreed");
}
