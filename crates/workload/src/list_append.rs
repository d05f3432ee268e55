//! A checker for list-append histories, in the manner of Jepsen's Elle:
//! transactions of appends to and reads of lists, one list per key, whose
//! histories (JSON lines in Elle's format) it judges for serializability.
//!
//! Appended values are unique per key, so a read of a list names the writer
//! of every element and the order in which they were appended. From the
//! longest read of each key (every other read must be a prefix of it) the
//! checker takes each key's version order and builds the dependency graph of
//! committed transactions: write-write (the next append to a key), write-read
//! (the read saw that writer's append last), read-write (the read did not
//! see the next append). Cycles that serializability forbids are reported,
//! the smallest found of each kind: G0 (write-write only), G1c (with
//! write-read), G-single (exactly one read-write edge), G2-item (more). It
//! also reports, without a graph: G1a (a read of a failed transaction's
//! append), G1b (a read ending in an append that was not its writer's last
//! to that key), duplicated elements, elements nobody appended, reads that
//! are not prefixes of one another, and lost appends (a committed append
//! missing from a read that began after it committed).
//!
//! It only reads a history; it never talks to a cluster.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;

use serde_json::Value;

/// One micro-operation of a transaction.
#[derive(Clone, Debug, PartialEq)]
pub enum Mop {
    Append {
        key: String,
        value: i64,
    },
    /// `None`: not known (an invocation, or an unknown outcome).
    Read {
        key: String,
        value: Option<Vec<i64>>,
    },
}

/// How a transaction ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// Certainly did not take effect.
    Fail,
    /// May or may not have taken effect.
    Info,
}

/// A transaction as the history shows it.
#[derive(Clone, Debug)]
pub struct Txn {
    pub process: i64,
    pub outcome: Outcome,
    /// The completion's operations for `Ok` (with what reads saw), the
    /// invocation's otherwise.
    pub mops: Vec<Mop>,
    /// Line numbers of its invocation and completion.
    pub invoked: usize,
    pub completed: usize,
}

/// Why a history could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("line {line}: {why}")]
    Bad { line: usize, why: String },
}

fn bad(line: usize, why: impl Into<String>) -> HistoryError {
    HistoryError::Bad { line, why: why.into() }
}

fn key_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn parse_mops(line: usize, v: &Value) -> Result<Vec<Mop>, HistoryError> {
    let ops = v
        .as_array()
        .ok_or_else(|| bad(line, "value is not a list of operations"))?;
    ops.iter()
        .map(|op| {
            let op = op
                .as_array()
                .filter(|o| o.len() == 3)
                .ok_or_else(|| bad(line, "an operation is not [f, k, v]"))?;
            let key = key_of(&op[1]);
            match op[0].as_str() {
                Some("append") => {
                    let value = op[2]
                        .as_i64()
                        .ok_or_else(|| bad(line, "an appended value is not an integer"))?;
                    Ok(Mop::Append { key, value })
                }
                Some("r") => {
                    let value = match &op[2] {
                        Value::Null => None,
                        Value::Array(xs) => Some(
                            xs.iter()
                                .map(|x| x.as_i64().ok_or_else(|| bad(line, "a read element is not an integer")))
                                .collect::<Result<Vec<_>, _>>()?,
                        ),
                        _ => return Err(bad(line, "a read value is neither null nor a list")),
                    };
                    Ok(Mop::Read { key, value })
                }
                _ => Err(bad(line, "an operation is neither \"append\" nor \"r\"")),
            }
        })
        .collect()
}

/// Reads a history of JSON lines (`{"type": "invoke"|"ok"|"fail"|"info",
/// "process": P, "value": [...]}`), pairing each completion with its
/// process's invocation. An invocation never completed counts as `Info`.
pub fn parse(history: &str) -> Result<Vec<Txn>, HistoryError> {
    let mut open: HashMap<i64, (usize, Vec<Mop>)> = HashMap::new();
    let mut txns = Vec::new();
    for (i, text) in history.lines().enumerate() {
        let line = i + 1;
        if text.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(text).map_err(|e| bad(line, e.to_string()))?;
        let process = v["process"].as_i64().ok_or_else(|| bad(line, "no integer process"))?;
        let mops = parse_mops(line, &v["value"])?;
        let outcome = match v["type"].as_str() {
            Some("invoke") => {
                if open.insert(process, (line, mops)).is_some() {
                    return Err(bad(line, format!("process {process} invoked twice without completing")));
                }
                continue;
            }
            Some("ok") => Outcome::Ok,
            Some("fail") => Outcome::Fail,
            Some("info") => Outcome::Info,
            _ => return Err(bad(line, "type is not invoke, ok, fail or info")),
        };
        let (invoked, invoked_mops) = open
            .remove(&process)
            .ok_or_else(|| bad(line, format!("process {process} completed what it never invoked")))?;
        txns.push(Txn {
            process,
            outcome,
            mops: if outcome == Outcome::Ok { mops } else { invoked_mops },
            invoked,
            completed: line,
        });
    }
    for (process, (invoked, mops)) in open {
        txns.push(Txn {
            process,
            outcome: Outcome::Info,
            mops,
            invoked,
            completed: usize::MAX,
        });
    }
    Ok(txns)
}

/// Kinds of dependency edges.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dep {
    Ww,
    Wr,
    Rw,
}

/// What the checker found wrong.
#[derive(Clone, Debug, PartialEq)]
pub enum Anomaly {
    /// A dependency cycle: its name (G0, G1c, G-single, G2-item) and its
    /// steps (transaction index, edge to the next, key).
    Cycle {
        name: &'static str,
        steps: Vec<(usize, Dep, String)>,
    },
    G1a {
        reader: usize,
        key: String,
        value: i64,
        writer: usize,
    },
    G1b {
        reader: usize,
        key: String,
        value: i64,
        writer: usize,
    },
    Duplicate {
        reader: usize,
        key: String,
        value: i64,
    },
    Garbage {
        reader: usize,
        key: String,
        value: i64,
    },
    IncompatibleOrder {
        key: String,
        a: Vec<i64>,
        b: Vec<i64>,
    },
    Lost {
        writer: usize,
        key: String,
        value: i64,
        reader: usize,
    },
    /// Two transactions appended the same value to one key: the history
    /// cannot be judged by this checker.
    AmbiguousWrite {
        key: String,
        value: i64,
    },
}

impl fmt::Display for Anomaly {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Anomaly::Cycle { name, steps } => {
                write!(f, "{name}: ")?;
                for (t, dep, key) in steps {
                    let d = match dep {
                        Dep::Ww => "ww",
                        Dep::Wr => "wr",
                        Dep::Rw => "rw",
                    };
                    write!(f, "T{t} -{d}({key})-> ")?;
                }
                write!(f, "T{}", steps.first().map_or(0, |s| s.0))
            }
            Anomaly::G1a { reader, key, value, writer } => write!(
                f,
                "G1a: T{reader} read {value} of key {key}, appended by T{writer}, which failed"
            ),
            Anomaly::G1b { reader, key, value, writer } => write!(
                f,
                "G1b: T{reader} read key {key} ending in {value}, which T{writer} later appended after"
            ),
            Anomaly::Duplicate { reader, key, value } => {
                write!(f, "duplicate: T{reader} read {value} twice in key {key}")
            }
            Anomaly::Garbage { reader, key, value } => {
                write!(f, "garbage: T{reader} read {value} in key {key}, which nobody appended")
            }
            Anomaly::IncompatibleOrder { key, a, b } => {
                write!(f, "incompatible order of key {key}: {a:?} and {b:?}")
            }
            Anomaly::Lost { writer, key, value, reader } => write!(
                f,
                "lost: T{writer} appended {value} to key {key} and committed, and T{reader}, begun after, did not see it"
            ),
            Anomaly::AmbiguousWrite { key, value } => {
                write!(f, "ambiguous: {value} appended to key {key} more than once")
            }
        }
    }
}

/// What `check` says of a history.
#[derive(Debug, Default)]
pub struct Report {
    pub transactions: usize,
    pub committed: usize,
    pub anomalies: Vec<Anomaly>,
    /// The transactions the anomalies name: where they are in the history.
    pub named: BTreeMap<usize, String>,
}

impl Anomaly {
    /// The transactions it names.
    fn names(&self) -> Vec<usize> {
        match self {
            Anomaly::Cycle { steps, .. } => steps.iter().map(|s| s.0).collect(),
            Anomaly::G1a { reader, writer, .. }
            | Anomaly::G1b { reader, writer, .. }
            | Anomaly::Lost { reader, writer, .. } => vec![*reader, *writer],
            Anomaly::Duplicate { reader, .. } | Anomaly::Garbage { reader, .. } => vec![*reader],
            Anomaly::IncompatibleOrder { .. } | Anomaly::AmbiguousWrite { .. } => Vec::new(),
        }
    }
}

impl Report {
    pub fn valid(&self) -> bool {
        self.anomalies.is_empty()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.valid() {
            return write!(
                f,
                "SERIALIZABLE: {} transactions, {} committed, no anomaly",
                self.transactions, self.committed
            );
        }
        writeln!(
            f,
            "NOT SERIALIZABLE: {} anomalies in {} transactions ({} committed)",
            self.anomalies.len(),
            self.transactions,
            self.committed
        )?;
        for a in &self.anomalies {
            writeln!(f, "  {a}")?;
        }
        for (t, what) in &self.named {
            writeln!(f, "  T{t}: {what}")?;
        }
        Ok(())
    }
}

/// The reads an `Ok` transaction made: (key, what it saw).
fn reads(t: &Txn) -> impl Iterator<Item = (&String, &Vec<i64>)> {
    t.mops.iter().filter_map(|m| match m {
        Mop::Read { key, value: Some(v) } => Some((key, v)),
        _ => None,
    })
}

/// Judges a history.
pub fn check(txns: &[Txn]) -> Report {
    let mut report = Report {
        transactions: txns.len(),
        committed: txns.iter().filter(|t| t.outcome == Outcome::Ok).count(),
        ..Default::default()
    };
    let anomalies = &mut report.anomalies;
    // Who appended what: (key, value) -> (txn, is it the txn's last append to key).
    let mut writer: HashMap<(String, i64), (usize, bool)> = HashMap::new();
    for (i, t) in txns.iter().enumerate() {
        let mut last: HashMap<&String, i64> = HashMap::new();
        for m in &t.mops {
            if let Mop::Append { key, value } = m {
                last.insert(key, *value);
            }
        }
        for m in &t.mops {
            if let Mop::Append { key, value } = m {
                let is_last = last.get(key) == Some(value);
                if writer.insert((key.clone(), *value), (i, is_last)).is_some() {
                    anomalies.push(Anomaly::AmbiguousWrite {
                        key: key.clone(),
                        value: *value,
                    });
                }
            }
        }
    }
    // Each key's version order: its longest committed read, of which every
    // other read must be a prefix.
    let mut order: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for (i, t) in txns.iter().enumerate().filter(|(_, t)| t.outcome == Outcome::Ok) {
        for (key, seen) in reads(t) {
            let mut dup = HashSet::new();
            for &v in seen {
                if !dup.insert(v) {
                    anomalies.push(Anomaly::Duplicate {
                        reader: i,
                        key: key.clone(),
                        value: v,
                    });
                }
                match writer.get(&(key.clone(), v)) {
                    None => anomalies.push(Anomaly::Garbage {
                        reader: i,
                        key: key.clone(),
                        value: v,
                    }),
                    Some(&(w, _)) if txns[w].outcome == Outcome::Fail => anomalies.push(Anomaly::G1a {
                        reader: i,
                        key: key.clone(),
                        value: v,
                        writer: w,
                    }),
                    _ => {}
                }
            }
            if let Some(&v) = seen.last() {
                if let Some(&(w, false)) = writer.get(&(key.clone(), v)) {
                    if w != i {
                        anomalies.push(Anomaly::G1b {
                            reader: i,
                            key: key.clone(),
                            value: v,
                            writer: w,
                        });
                    }
                }
            }
            let cur = order.entry(key.clone()).or_default();
            let (short, long) = if seen.len() <= cur.len() {
                (seen, &*cur)
            } else {
                (&*cur, seen)
            };
            if long[..short.len()] != short[..] {
                anomalies.push(Anomaly::IncompatibleOrder {
                    key: key.clone(),
                    a: cur.clone(),
                    b: seen.clone(),
                });
            } else if seen.len() > cur.len() {
                *cur = seen.clone();
            }
        }
    }
    // Lost appends: a committed append missing from a committed read of its
    // key invoked after the append's transaction completed. Reads are
    // prefixes of the key's order (or reported above), so a read holds the
    // append iff it is longer than the append's place: per key, the shortest
    // read invoked at or after each line answers for every append at once.
    let mut later_reads: HashMap<&String, Vec<(usize, usize, usize)>> = HashMap::new(); // (invoked, len, reader)
    for (i, t) in txns.iter().enumerate().filter(|(_, t)| t.outcome == Outcome::Ok) {
        for (key, seen) in reads(t) {
            later_reads.entry(key).or_default().push((t.invoked, seen.len(), i));
        }
    }
    for rs in later_reads.values_mut() {
        rs.sort_unstable();
        // Suffix minimum of the length (with its reader), from the end.
        for j in (0..rs.len().saturating_sub(1)).rev() {
            if rs[j + 1].1 < rs[j].1 {
                rs[j].1 = rs[j + 1].1;
                rs[j].2 = rs[j + 1].2;
            }
        }
    }
    let place_of: HashMap<(&String, i64), usize> = order
        .iter()
        .flat_map(|(k, vs)| vs.iter().enumerate().map(move |(p, &v)| ((k, v), p)))
        .collect();
    for (i, t) in txns.iter().enumerate().filter(|(_, t)| t.outcome == Outcome::Ok) {
        for m in &t.mops {
            let Mop::Append { key, value } = m else { continue };
            let Some(rs) = later_reads.get(key) else { continue };
            let first_after = rs.partition_point(|r| r.0 <= t.completed);
            let Some(&(_, shortest, reader)) = rs.get(first_after) else {
                continue;
            };
            let place = place_of.get(&(key, *value)).copied();
            if place.is_none_or(|p| shortest <= p) {
                anomalies.push(Anomaly::Lost {
                    writer: i,
                    key: key.clone(),
                    value: *value,
                    reader,
                });
            }
        }
    }
    // The dependency graph over transactions that committed or may have (an
    // unknown outcome whose append someone read is a committed writer).
    let mut edges: BTreeMap<usize, BTreeMap<usize, (Dep, String)>> = BTreeMap::new();
    let mut add = |from: usize, to: usize, dep: Dep, key: &str| {
        if from != to {
            // Between two transactions keep the mildest kind (ww, then wr,
            // then rw): a cycle is named by the mildest edges that form it.
            let e = edges.entry(from).or_default();
            match e.get(&to) {
                Some((d, _)) if *d <= dep => {}
                _ => {
                    e.insert(to, (dep, key.to_string()));
                }
            }
        }
    };
    // A failed transaction is no node (reading its append is G1a above).
    let who = |key: &str, v: i64| {
        writer
            .get(&(key.to_string(), v))
            .map(|w| w.0)
            .filter(|&w| txns[w].outcome != Outcome::Fail)
    };
    for (key, vs) in &order {
        for w in vs.windows(2) {
            if let (Some(a), Some(b)) = (who(key, w[0]), who(key, w[1])) {
                add(a, b, Dep::Ww, key);
            }
        }
    }
    for (i, t) in txns.iter().enumerate().filter(|(_, t)| t.outcome == Outcome::Ok) {
        for (key, seen) in reads(t) {
            let full = &order[key];
            if let Some(&last) = seen.last() {
                if let Some(w) = who(key, last) {
                    add(w, i, Dep::Wr, key);
                }
            }
            // The append after what it saw: it read before that writer.
            if let Some(&next) = full.get(seen.len()) {
                if let Some(w) = who(key, next) {
                    add(i, w, Dep::Rw, key);
                }
            }
        }
    }
    anomalies.extend(cycles(&edges));
    for t in report.anomalies.iter().flat_map(Anomaly::names) {
        let x = &txns[t];
        let done = if x.completed == usize::MAX {
            "never completed".to_string()
        } else {
            format!("completed line {}", x.completed)
        };
        report.named.insert(
            t,
            format!(
                "process {}, invoked line {}, {done}, {:?}: {:?}",
                x.process, x.invoked, x.outcome, x.mops
            ),
        );
    }
    report
}

type Graph = BTreeMap<usize, BTreeMap<usize, (Dep, String)>>;

/// Edges whose search for a cycle through them is tried per strongly
/// connected component (the smallest cycle among those is reported).
const CYCLE_SEARCHES_PER_COMPONENT: usize = 2_000;

/// The strongly connected component of every node (Tarjan's, iterative).
fn components(g: &Graph) -> HashMap<usize, usize> {
    let mut index: HashMap<usize, usize> = HashMap::new();
    let mut low: HashMap<usize, usize> = HashMap::new();
    let mut on_stack: HashSet<usize> = HashSet::new();
    let mut stack: Vec<usize> = Vec::new();
    let mut comp: HashMap<usize, usize> = HashMap::new();
    let mut next = 0;
    let succ = |n: usize| -> Vec<usize> { g.get(&n).map(|e| e.keys().copied().collect()).unwrap_or_default() };
    for &root in g.keys() {
        if index.contains_key(&root) {
            continue;
        }
        // (node, its successors, the next one to visit)
        let mut work: Vec<(usize, Vec<usize>, usize)> = vec![(root, succ(root), 0)];
        index.insert(root, next);
        low.insert(root, next);
        next += 1;
        stack.push(root);
        on_stack.insert(root);
        while let Some((n, ss, i)) = work.last_mut() {
            let n = *n;
            if let Some(&m) = ss.get(*i) {
                *i += 1;
                if let std::collections::hash_map::Entry::Vacant(e) = index.entry(m) {
                    e.insert(next);
                    low.insert(m, next);
                    next += 1;
                    stack.push(m);
                    on_stack.insert(m);
                    work.push((m, succ(m), 0));
                } else if on_stack.contains(&m) {
                    let l = low[&n].min(index[&m]);
                    low.insert(n, l);
                }
                continue;
            }
            work.pop();
            if let Some((parent, ..)) = work.last() {
                let l = low[parent].min(low[&n]);
                low.insert(*parent, l);
            }
            if low[&n] == index[&n] {
                while let Some(m) = stack.pop() {
                    on_stack.remove(&m);
                    comp.insert(m, n);
                    if m == n {
                        break;
                    }
                }
            }
        }
    }
    comp
}

/// The shortest path from `from` to `to` over edges `allowed` lets through.
fn shortest_path(g: &Graph, from: usize, to: usize, allowed: &dyn Fn(Dep) -> bool) -> Option<Vec<usize>> {
    let mut prev: HashMap<usize, usize> = HashMap::new();
    let mut seen = HashSet::from([from]);
    let mut q = VecDeque::from([from]);
    while let Some(n) = q.pop_front() {
        for (&m, (d, _)) in g.get(&n).into_iter().flatten() {
            if !allowed(*d) || !seen.insert(m) {
                continue;
            }
            prev.insert(m, n);
            if m == to {
                let mut path = vec![to];
                let mut cur = to;
                while cur != from {
                    cur = prev[&cur];
                    path.push(cur);
                }
                path.reverse();
                return Some(path);
            }
            q.push_back(m);
        }
    }
    None
}

/// The steps of the cycle `path` (first node repeated at the end).
fn steps(g: &Graph, path: &[usize]) -> Vec<(usize, Dep, String)> {
    path.windows(2)
        .map(|w| {
            let (d, k) = &g[&w[0]][&w[1]];
            (w[0], *d, k.clone())
        })
        .collect()
}

/// The smallest cycle of each forbidden kind, if any.
fn cycles(g: &Graph) -> Vec<Anomaly> {
    let mut found = Vec::new();
    let rws = |s: &[(usize, Dep, String)]| s.iter().filter(|x| x.1 == Dep::Rw).count();
    let mut best: HashMap<&'static str, Vec<(usize, Dep, String)>> = HashMap::new();
    let mut offer = |name: &'static str, s: Vec<(usize, Dep, String)>| {
        if best.get(name).is_none_or(|b| s.len() < b.len()) {
            best.insert(name, s);
        }
    };
    // Only edges inside a strongly connected component lie on a cycle; the
    // search is confined to the component (a serializable history has none).
    let comp = components(g);
    let mut sizes: HashMap<usize, usize> = HashMap::new();
    for c in comp.values() {
        *sizes.entry(*c).or_default() += 1;
    }
    let sub: Graph = g
        .iter()
        .filter(|(a, _)| sizes[&comp[*a]] > 1)
        .map(|(&a, outs)| {
            let inside = outs
                .iter()
                .filter(|(b, _)| comp.get(*b) == comp.get(&a))
                .map(|(&b, e)| (b, e.clone()))
                .collect();
            (a, inside)
        })
        .collect();
    let g = &sub;
    let mut tried: HashMap<usize, usize> = HashMap::new();
    for (&a, outs) in g {
        for (&b, (dep, _)) in outs {
            let n = tried.entry(comp[&a]).or_default();
            if *n >= CYCLE_SEARCHES_PER_COMPONENT {
                break;
            }
            *n += 1;
            // The shortest cycle through the edge a -> b, per kind allowed on
            // the way back.
            let back = |allowed: &dyn Fn(Dep) -> bool| {
                shortest_path(g, b, a, allowed).map(|mut p| {
                    p.insert(0, a);
                    steps(g, &p)
                })
            };
            match dep {
                Dep::Ww => {
                    if let Some(s) = back(&|d| d == Dep::Ww) {
                        offer("G0", s);
                    }
                    if let Some(s) = back(&|d| d != Dep::Rw) {
                        if s.iter().any(|x| x.1 == Dep::Wr) {
                            offer("G1c", s);
                        }
                    }
                }
                Dep::Wr => {
                    if let Some(s) = back(&|d| d != Dep::Rw) {
                        offer("G1c", s);
                    }
                }
                Dep::Rw => {
                    if let Some(s) = back(&|d| d != Dep::Rw) {
                        offer("G-single", s);
                    } else if let Some(s) = back(&|_| true) {
                        if rws(&s) > 1 {
                            offer("G2-item", s);
                        }
                    }
                }
            }
        }
    }
    for name in ["G0", "G1c", "G-single", "G2-item"] {
        if let Some(steps) = best.remove(name) {
            found.push(Anomaly::Cycle { name, steps });
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a history: each transaction (process, outcome, ops) is invoked
    /// and completed in turn (reads invoked with null); `concurrent`: every
    /// invocation first, then every completion.
    fn history(txns: &[(i64, &str, &str)], concurrent: bool) -> String {
        let (mut invokes, mut out) = (String::new(), String::new());
        for (p, outcome, ops) in txns {
            let v: Value = serde_json::from_str(ops).unwrap();
            let invoked: Vec<Value> = v
                .as_array()
                .unwrap()
                .iter()
                .map(|op| {
                    let mut op = op.clone();
                    if op[0] == "r" {
                        op[2] = Value::Null;
                    }
                    op
                })
                .collect();
            let invoke = format!(
                "{{\"type\":\"invoke\",\"process\":{p},\"value\":{}}}\n",
                Value::from(invoked)
            );
            if concurrent {
                invokes += &invoke;
            } else {
                out += &invoke;
            }
            out += &format!("{{\"type\":\"{outcome}\",\"process\":{p},\"value\":{ops}}}\n");
        }
        invokes + &out
    }

    /// One after the other.
    fn judge(txns: &[(i64, &str, &str)]) -> Report {
        check(&parse(&history(txns, false)).unwrap())
    }

    /// All at once (no realtime order: nothing can be "lost").
    fn judge_concurrent(txns: &[(i64, &str, &str)]) -> Report {
        check(&parse(&history(txns, true)).unwrap())
    }

    fn names(r: &Report) -> Vec<String> {
        r.anomalies
            .iter()
            .map(|a| match a {
                Anomaly::Cycle { name, .. } => name.to_string(),
                Anomaly::G1a { .. } => "G1a".into(),
                Anomaly::G1b { .. } => "G1b".into(),
                Anomaly::Duplicate { .. } => "duplicate".into(),
                Anomaly::Garbage { .. } => "garbage".into(),
                Anomaly::IncompatibleOrder { .. } => "incompatible-order".into(),
                Anomaly::Lost { .. } => "lost".into(),
                Anomaly::AmbiguousWrite { .. } => "ambiguous".into(),
            })
            .collect()
    }

    #[test]
    fn a_serial_history_with_failures_and_unknowns_is_accepted() {
        let r = judge(&[
            (0, "ok", r#"[["append","x",1],["r","y",[]]]"#),
            (1, "ok", r#"[["r","x",[1]],["append","y",1],["append","x",2]]"#),
            (2, "fail", r#"[["append","x",3]]"#),
            (0, "info", r#"[["append","y",2]]"#),
            (1, "ok", r#"[["r","x",[1,2]],["r","y",[1,2]]]"#),
        ]);
        assert!(r.valid(), "{r}");
        assert_eq!((r.transactions, r.committed), (5, 3));
    }

    #[test]
    fn write_cycles_are_g0() {
        let r = judge_concurrent(&[
            (0, "ok", r#"[["append","x",1],["append","y",1]]"#),
            (1, "ok", r#"[["append","x",2],["append","y",2]]"#),
            (2, "ok", r#"[["r","x",[1,2]],["r","y",[2,1]]]"#),
        ]);
        assert!(names(&r).contains(&"G0".to_string()), "{r}");
        let text = r.to_string();
        assert!(
            text.contains("T0 -ww(x)-> T1 -ww(y)-> T0") || text.contains("T1 -ww(y)-> T0 -ww(x)-> T1"),
            "{text}"
        );
    }

    #[test]
    fn circular_information_flow_is_g1c() {
        let r = judge_concurrent(&[
            (0, "ok", r#"[["append","x",1],["r","y",[1]]]"#),
            (1, "ok", r#"[["append","y",1],["r","x",[1]]]"#),
        ]);
        assert_eq!(names(&r), vec!["G1c"], "{r}");
    }

    #[test]
    fn read_skew_is_g_single_and_write_skew_is_g2_item() {
        // A version order comes from reads: a later read shows x's append.
        let skew = judge_concurrent(&[
            (0, "ok", r#"[["append","x",1],["append","y",1]]"#),
            (1, "ok", r#"[["r","x",[]],["r","y",[1]]]"#),
            (2, "ok", r#"[["r","x",[1]]]"#),
        ]);
        assert_eq!(names(&skew), vec!["G-single"], "{skew}");
        let write_skew = judge_concurrent(&[
            (0, "ok", r#"[["r","x",[]],["append","y",1]]"#),
            (1, "ok", r#"[["r","y",[]],["append","x",1]]"#),
            (2, "ok", r#"[["r","x",[1]],["r","y",[1]]]"#),
        ]);
        assert_eq!(names(&write_skew), vec!["G2-item"], "{write_skew}");
    }

    #[test]
    fn aborted_and_intermediate_reads_are_g1a_and_g1b() {
        let r = judge(&[(0, "fail", r#"[["append","x",1]]"#), (1, "ok", r#"[["r","x",[1]]]"#)]);
        assert_eq!(names(&r), vec!["G1a"], "{r}");
        let r = judge(&[
            (0, "ok", r#"[["append","x",1],["append","x",2]]"#),
            (1, "ok", r#"[["r","x",[1]]]"#),
        ]);
        assert!(names(&r).contains(&"G1b".to_string()), "{r}");
        // A transaction reading its own intermediate append is fine.
        let own = judge(&[(0, "ok", r#"[["append","x",1],["r","x",[1]],["append","x",2]]"#)]);
        assert!(own.valid(), "{own}");
    }

    #[test]
    fn duplicates_garbage_lost_appends_and_incompatible_orders_are_caught() {
        let dup = judge(&[(0, "ok", r#"[["append","x",1]]"#), (1, "ok", r#"[["r","x",[1,1]]]"#)]);
        assert!(names(&dup).contains(&"duplicate".to_string()), "{dup}");
        let garbage = judge(&[(0, "ok", r#"[["r","x",[7]]]"#)]);
        assert_eq!(names(&garbage), vec!["garbage"], "{garbage}");
        let lost = judge(&[(0, "ok", r#"[["append","x",1]]"#), (1, "ok", r#"[["r","x",[]]]"#)]);
        assert!(names(&lost).contains(&"lost".to_string()), "{lost}");
        let orders = judge(&[
            (0, "ok", r#"[["append","x",1]]"#),
            (1, "ok", r#"[["append","x",2]]"#),
            (2, "ok", r#"[["r","x",[1,2]]]"#),
            (3, "ok", r#"[["r","x",[2,1]]]"#),
        ]);
        assert!(names(&orders).contains(&"incompatible-order".to_string()), "{orders}");
    }

    #[test]
    fn concurrent_transactions_that_saw_nothing_of_each_other_are_fine() {
        // Two writers in flight together, both invoked before either ended:
        // a reader that began before the second finished may miss it.
        let h = "\
{\"type\":\"invoke\",\"process\":0,\"value\":[[\"append\",\"x\",1]]}
{\"type\":\"invoke\",\"process\":1,\"value\":[[\"r\",\"x\",null]]}
{\"type\":\"ok\",\"process\":0,\"value\":[[\"append\",\"x\",1]]}
{\"type\":\"ok\",\"process\":1,\"value\":[[\"r\",\"x\",[]]]}
";
        let r = check(&parse(h).unwrap());
        assert!(r.valid(), "{r}");
    }

    #[test]
    fn a_long_serial_history_is_judged_quickly_and_one_planted_skew_is_found() {
        // 5,000 transactions on 50 keys, one after the other: each appends
        // to one key and reads another, as a serial store would answer.
        let mut lists: Vec<Vec<i64>> = vec![Vec::new(); 50];
        let mut txns = Vec::new();
        for i in 0..5_000i64 {
            let (w, r) = ((i % 50) as usize, ((i * 7 + 3) % 50) as usize);
            lists[w].push(i);
            let ops = format!(r#"[["append",{w},{i}],["r",{r},{:?}]]"#, lists[r]);
            txns.push((i % 8, "ok".to_string(), ops));
        }
        let as_refs: Vec<(i64, &str, &str)> = txns.iter().map(|(p, o, v)| (*p, o.as_str(), v.as_str())).collect();
        let start = std::time::Instant::now();
        let r = judge(&as_refs);
        assert!(r.valid(), "{r}");
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "{:?}",
            start.elapsed()
        );
        // Two more, concurrent with each other, each missing the other's
        // append (write skew), and a read that orders both.
        let mut h = history(&as_refs, false);
        let (x, y) = (&lists[0], &lists[1]);
        h += r#"{"type":"invoke","process":100,"value":[["r",0,null],["append",1,9000]]}"#;
        h += "\n";
        h += r#"{"type":"invoke","process":101,"value":[["r",1,null],["append",0,9001]]}"#;
        h += "\n";
        h += &format!(r#"{{"type":"ok","process":100,"value":[["r",0,{x:?}],["append",1,9000]]}}"#);
        h += "\n";
        h += &format!(r#"{{"type":"ok","process":101,"value":[["r",1,{y:?}],["append",0,9001]]}}"#);
        h += "\n";
        let (mut x2, mut y2) = (x.clone(), y.clone());
        x2.push(9001);
        y2.push(9000);
        h += r#"{"type":"invoke","process":102,"value":[["r",0,null],["r",1,null]]}"#;
        h += "\n";
        h += &format!(r#"{{"type":"ok","process":102,"value":[["r",0,{x2:?}],["r",1,{y2:?}]]}}"#);
        h += "\n";
        let r = check(&parse(&h).unwrap());
        assert_eq!(names(&r), vec!["G2-item"], "{r}");
    }

    #[test]
    fn malformed_histories_are_refused_with_the_line() {
        for (h, line) in [
            ("not json\n", 1),
            ("{\"type\":\"ok\",\"process\":0,\"value\":[]}\n", 1),
            ("{\"type\":\"invoke\",\"process\":0,\"value\":[[\"inc\",\"x\",1]]}\n", 1),
            (
                "{\"type\":\"invoke\",\"process\":0,\"value\":[]}\n{\"type\":\"invoke\",\"process\":0,\"value\":[]}\n",
                2,
            ),
        ] {
            match parse(h) {
                Err(HistoryError::Bad { line: l, .. }) => assert_eq!(l, line, "{h}"),
                Ok(_) => panic!("accepted: {h}"),
            }
        }
    }
}
