//! A linearizability checker for histories of registers (one per key):
//! reads, writes and compare-and-swaps, each with its invoke and complete
//! times and outcome.
//!
//! The search is the one of Wing and Gong with Lowe's memoization, as used by
//! Knossos and Porcupine: walk the history in time order, linearize an
//! operation whose invocation comes before the first pending completion, and
//! backtrack when none fits; a (set of linearized operations, register state)
//! pair already explored is not explored again. Keys are independent registers,
//! so each key is checked alone.
//!
//! Outcomes: `Ok` (it happened, with this result), `Fail` (it definitely did not
//! happen: dropped from the history) and `Unknown` (it may have taken effect at
//! any time after its invocation, or never: its completion is at infinity and
//! the search may leave it out).
//!
//! This module only reasons about a recorded history; it never talks to a node.

use std::collections::HashSet;
use std::fmt;
use std::time::{Duration, Instant};

/// A register value; `None` is an absent key.
pub type Value = Option<u64>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read,
    Write(u64),
    /// Compare-and-swap: set to `new` if the value is `expect`.
    Cas {
        expect: u64,
        new: u64,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A read that returned this value.
    Got(Value),
    /// A write that was acknowledged.
    Written,
    /// A compare-and-swap that answered whether it swapped.
    Swapped(bool),
    /// Definitely not applied.
    Fail,
    /// May or may not have been applied.
    Unknown,
}

/// One operation of one client on one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub client: u64,
    pub key: String,
    pub op: Op,
    pub outcome: Outcome,
    /// Nanoseconds since the start of the run.
    pub invoke: u64,
    /// Nanoseconds; ignored for `Unknown` outcomes.
    pub complete: u64,
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let end = if self.outcome == Outcome::Unknown {
            "?".to_string()
        } else {
            format!("{:.3}ms", self.complete as f64 / 1e6)
        };
        write!(
            f,
            "client {} {:?} {:?} -> {:?} [{:.3}ms, {end}]",
            self.client,
            self.key,
            self.op,
            self.outcome,
            self.invoke as f64 / 1e6
        )
    }
}

/// The verdict on one key.
#[derive(Debug, PartialEq, Eq)]
pub enum KeyVerdict {
    Linearizable,
    /// No order explains the history; `window` holds the operation that could
    /// not be placed and every operation concurrent with it.
    NotLinearizable {
        window: Vec<Event>,
    },
    /// The search ran out of time.
    Unknown,
}

/// Applies `op` with its observed `outcome` to `state`; `None` if the outcome
/// is impossible from that state.
fn step(state: Value, op: Op, outcome: Outcome) -> Option<Value> {
    match (op, outcome) {
        (Op::Read, Outcome::Got(v)) => (state == v).then_some(state),
        (Op::Read, Outcome::Unknown) => Some(state),
        (Op::Write(v), Outcome::Written | Outcome::Unknown) => Some(Some(v)),
        (Op::Cas { expect, new }, Outcome::Swapped(true)) => (state == Some(expect)).then_some(Some(new)),
        (Op::Cas { expect, .. }, Outcome::Swapped(false)) => (state != Some(expect)).then_some(state),
        (Op::Cas { expect, new }, Outcome::Unknown) => Some(if state == Some(expect) { Some(new) } else { state }),
        _ => None,
    }
}

/// Checks the events of one key, starting from `initial`.
pub fn check_key(events: &[Event], initial: Value, budget: Duration) -> KeyVerdict {
    // Failed operations never happened; unknown reads tell nothing.
    let ops: Vec<&Event> = events
        .iter()
        .filter(|e| e.outcome != Outcome::Fail && !(e.op == Op::Read && e.outcome == Outcome::Unknown))
        .collect();
    let n = ops.len();
    if n == 0 {
        return KeyVerdict::Linearizable;
    }
    let ret = |i: usize| {
        if ops[i].outcome == Outcome::Unknown {
            u64::MAX
        } else {
            ops[i].complete.max(ops[i].invoke)
        }
    };
    // Events in time order: calls before returns at equal times.
    let mut evs: Vec<(u64, bool, usize)> = Vec::with_capacity(2 * n);
    for (i, e) in ops.iter().enumerate() {
        evs.push((e.invoke, false, i));
        evs.push((ret(i), true, i));
    }
    evs.sort_by_key(|&(t, is_ret, i)| (t, is_ret, i));
    // A doubly linked list over `evs` (index len = head sentinel).
    let len = evs.len();
    let mut next: Vec<usize> = (1..=len).collect();
    let mut prev: Vec<usize> = (0..len).map(|i| if i == 0 { len } else { i - 1 }).collect();
    next.push(0);
    prev.push(len - 1);
    let head = len;
    let mut pos_call = vec![0; n];
    let mut pos_ret = vec![0; n];
    for (p, &(_, is_ret, i)) in evs.iter().enumerate() {
        if is_ret {
            pos_ret[i] = p;
        } else {
            pos_call[i] = p;
        }
    }
    let unlink = |p: usize, next: &mut Vec<usize>, prev: &mut Vec<usize>| {
        let (a, b) = (prev[p], next[p]);
        next[a] = b;
        prev[b] = a;
    };
    let relink = |p: usize, next: &mut Vec<usize>, prev: &mut Vec<usize>| {
        let (a, b) = (prev[p], next[p]);
        next[a] = p;
        prev[b] = p;
    };
    let required = ops.iter().filter(|e| e.outcome != Outcome::Unknown).count();
    let words = n.div_ceil(64);
    let mut done = vec![0u64; words];
    let mut done_required = 0;
    let mut state = initial;
    let mut cache: HashSet<(Vec<u64>, Value)> = HashSet::new();
    let mut stack: Vec<(usize, Value)> = Vec::new();
    let mut deepest = 0usize;
    let mut stuck_at: Option<usize> = None;
    let started = Instant::now();
    let mut entry = next[head];
    let mut steps = 0u64;
    loop {
        if done_required == required {
            return KeyVerdict::Linearizable;
        }
        steps += 1;
        if steps.is_multiple_of(4096) && started.elapsed() > budget {
            return KeyVerdict::Unknown;
        }
        if entry == head {
            // Only unknown operations remain ahead and required ones are left:
            // treat like reaching a return.
            entry = prev[head];
        }
        let (_, is_ret, i) = evs[entry];
        if !is_ret {
            if let Some(ns) = step(state, ops[i].op, ops[i].outcome) {
                let mut nd = done.clone();
                nd[i / 64] |= 1 << (i % 64);
                if cache.insert((nd.clone(), ns)) {
                    stack.push((i, state));
                    done = nd;
                    if ops[i].outcome != Outcome::Unknown {
                        done_required += 1;
                    }
                    state = ns;
                    unlink(pos_call[i], &mut next, &mut prev);
                    unlink(pos_ret[i], &mut next, &mut prev);
                    if stack.len() > deepest {
                        deepest = stack.len();
                        stuck_at = None;
                    }
                    entry = next[head];
                    continue;
                }
            }
            entry = next[entry];
            continue;
        }
        // A completion: everything before it must already be linearized.
        if stack.len() >= deepest && stuck_at.is_none() {
            stuck_at = Some(i);
        }
        let Some((j, s)) = stack.pop() else {
            let culprit = stuck_at.unwrap_or(i);
            return KeyVerdict::NotLinearizable {
                window: window(&ops, culprit),
            };
        };
        relink(pos_ret[j], &mut next, &mut prev);
        relink(pos_call[j], &mut next, &mut prev);
        done[j / 64] &= !(1 << (j % 64));
        if ops[j].outcome != Outcome::Unknown {
            done_required -= 1;
        }
        state = s;
        entry = next[pos_call[j]];
    }
}

/// The operation `culprit` and every operation overlapping it in time.
fn window(ops: &[&Event], culprit: usize) -> Vec<Event> {
    let c = ops[culprit];
    let c_end = if c.outcome == Outcome::Unknown {
        u64::MAX
    } else {
        c.complete
    };
    let mut w: Vec<Event> = ops
        .iter()
        .filter(|e| {
            let end = if e.outcome == Outcome::Unknown {
                u64::MAX
            } else {
                e.complete
            };
            e.invoke <= c_end && c.invoke <= end
        })
        .map(|e| (*e).clone())
        .collect();
    w.sort_by_key(|e| e.invoke);
    w
}

/// The verdict on a whole history.
#[derive(Debug)]
pub struct Report {
    pub keys: usize,
    pub ops_by_outcome: [u64; 3],
    pub failures: Vec<(String, Vec<Event>)>,
    pub undecided: Vec<String>,
}

impl Report {
    pub fn linearizable(&self) -> bool {
        self.failures.is_empty() && self.undecided.is_empty()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [ok, fail, unknown] = self.ops_by_outcome;
        writeln!(
            f,
            "{} over {} keys: {ok} ok, {fail} failed, {unknown} unknown operations",
            if self.linearizable() {
                "LINEARIZABLE"
            } else if self.failures.is_empty() {
                "UNDECIDED"
            } else {
                "NOT LINEARIZABLE"
            },
            self.keys
        )?;
        for (key, w) in &self.failures {
            writeln!(f, "key {key:?}: no order explains these {} operations:", w.len())?;
            for e in w {
                writeln!(f, "  {e}")?;
            }
        }
        for key in &self.undecided {
            writeln!(f, "key {key:?}: search ran out of time")?;
        }
        Ok(())
    }
}

/// Checks every key of `history` (registers start absent), with `budget` of
/// search time in all.
pub fn check(history: &[Event], budget: Duration) -> Report {
    let mut keys: Vec<&str> = history.iter().map(|e| e.key.as_str()).collect();
    keys.sort_unstable();
    keys.dedup();
    let mut report = Report {
        keys: keys.len(),
        ops_by_outcome: [0; 3],
        failures: Vec::new(),
        undecided: Vec::new(),
    };
    for e in history {
        let slot = match e.outcome {
            Outcome::Fail => 1,
            Outcome::Unknown => 2,
            _ => 0,
        };
        report.ops_by_outcome[slot] += 1;
    }
    let deadline = Instant::now() + budget;
    for key in keys {
        let evs: Vec<Event> = history.iter().filter(|e| e.key == key).cloned().collect();
        let left = deadline.saturating_duration_since(Instant::now());
        match check_key(&evs, None, left) {
            KeyVerdict::Linearizable => {}
            KeyVerdict::NotLinearizable { window } => report.failures.push((key.to_string(), window)),
            KeyVerdict::Unknown => report.undecided.push(key.to_string()),
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(client: u64, op: Op, outcome: Outcome, invoke: u64, complete: u64) -> Event {
        Event {
            client,
            key: "k".into(),
            op,
            outcome,
            invoke,
            complete,
        }
    }
    const B: Duration = Duration::from_secs(5);
    use Op::*;
    use Outcome::*;

    fn lin(h: &[Event]) -> bool {
        check_key(h, None, B) == KeyVerdict::Linearizable
    }

    #[test]
    fn sequential_and_concurrent_histories_that_make_sense_are_accepted() {
        assert!(lin(&[
            ev(1, Write(1), Written, 0, 10),
            ev(2, Read, Got(Some(1)), 20, 30)
        ]));
        // A read concurrent with a write may see either value.
        assert!(lin(&[
            ev(1, Write(1), Written, 0, 10),
            ev(1, Write(2), Written, 20, 40),
            ev(2, Read, Got(Some(1)), 25, 35)
        ]));
        assert!(lin(&[
            ev(1, Write(1), Written, 0, 10),
            ev(1, Write(2), Written, 20, 40),
            ev(2, Read, Got(Some(2)), 25, 35)
        ]));
        // Reads of an absent key.
        assert!(lin(&[ev(2, Read, Got(None), 0, 5), ev(1, Write(7), Written, 6, 9)]));
        // CAS chains.
        assert!(lin(&[
            ev(1, Write(0), Written, 0, 1),
            ev(1, Cas { expect: 0, new: 1 }, Swapped(true), 2, 10),
            ev(2, Cas { expect: 0, new: 2 }, Swapped(false), 3, 11),
            ev(3, Read, Got(Some(1)), 12, 13),
        ]));
    }

    #[test]
    fn unknown_outcomes_may_apply_late_or_never() {
        // An unknown write seen long after its client gave up.
        assert!(lin(&[
            ev(1, Write(5), Unknown, 0, 0),
            ev(2, Read, Got(None), 10, 20),
            ev(2, Read, Got(Some(5)), 100, 110)
        ]));
        // An unknown write that never applied.
        assert!(lin(&[
            ev(1, Write(0), Written, 0, 1),
            ev(1, Write(5), Unknown, 2, 0),
            ev(2, Read, Got(Some(0)), 100, 110)
        ]));
        // A failed write never applied: reading it is wrong.
        assert!(!lin(&[
            ev(1, Write(0), Written, 0, 1),
            ev(1, Write(5), Fail, 2, 3),
            ev(2, Read, Got(Some(5)), 100, 110)
        ]));
        // An unknown CAS that did swap.
        assert!(lin(&[
            ev(1, Write(0), Written, 0, 1),
            ev(1, Cas { expect: 0, new: 9 }, Unknown, 2, 0),
            ev(2, Read, Got(Some(9)), 50, 60)
        ]));
    }

    #[test]
    fn stale_reads_are_rejected() {
        let h = [
            ev(1, Write(1), Written, 0, 10),
            ev(1, Write(2), Written, 20, 30),
            ev(2, Read, Got(Some(1)), 40, 50), // after write 2 completed
        ];
        match check_key(&h, None, B) {
            KeyVerdict::NotLinearizable { window } => {
                assert!(
                    window.iter().any(|e| e.op == Read),
                    "the window names the stale read: {window:?}"
                );
            }
            other => panic!("stale read accepted: {other:?}"),
        }
    }

    #[test]
    fn lost_writes_are_rejected() {
        let h = [ev(1, Write(1), Written, 0, 10), ev(2, Read, Got(None), 20, 30)];
        assert!(!lin(&h));
        // A value that comes back after being overwritten.
        let h = [
            ev(1, Write(1), Written, 0, 10),
            ev(1, Write(2), Written, 20, 30),
            ev(2, Read, Got(Some(2)), 40, 50),
            ev(3, Read, Got(Some(1)), 60, 70),
        ];
        assert!(!lin(&h));
    }

    #[test]
    fn double_compare_and_swap_successes_are_rejected() {
        let h = [
            ev(1, Write(0), Written, 0, 1),
            ev(1, Cas { expect: 0, new: 1 }, Swapped(true), 2, 10),
            ev(2, Cas { expect: 0, new: 2 }, Swapped(true), 3, 11),
        ];
        assert!(!lin(&h));
    }

    #[test]
    fn the_whole_history_report_counts_and_names_failures() {
        let mut h = vec![
            ev(1, Write(1), Written, 0, 10),
            ev(2, Read, Got(None), 20, 30),
            ev(3, Write(4), Fail, 0, 5),
        ];
        h.push(Event {
            client: 4,
            key: "other".into(),
            op: Write(3),
            outcome: Unknown,
            invoke: 0,
            complete: 0,
        });
        let r = check(&h, B);
        assert!(!r.linearizable());
        assert_eq!(r.keys, 2);
        assert_eq!(r.ops_by_outcome, [2, 1, 1]);
        assert_eq!(r.failures.len(), 1);
        assert!(r.to_string().starts_with("NOT LINEARIZABLE"));
    }

    #[test]
    fn many_concurrent_clients_are_checked_quickly() {
        // 5 clients, 200 operations each, on a register that moves forward.
        let mut h = Vec::new();
        let mut t = 0u64;
        let mut v = 0u64;
        h.push(ev(0, Write(0), Written, 0, 1));
        for round in 0..200u64 {
            t += 100;
            for c in 1..=5u64 {
                let start = t + c;
                if c == 1 {
                    v = round + 1;
                    h.push(ev(c, Write(v), Written, start, start + 50));
                } else {
                    // Reads overlapping the write may see the old or new value.
                    let seen = if c % 2 == 0 { v } else { v - 1 };
                    h.push(ev(c, Read, Got(Some(seen)), start, start + 40));
                }
            }
        }
        let started = Instant::now();
        assert!(lin(&h));
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    /// Histories produced by a real register, each operation taking effect at a
    /// random instant inside its window, are always accepted; and changing one
    /// read to a value never written is always caught.
    #[test]
    fn generated_histories_are_judged_correctly() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _case in 0..300 {
            // (effect time, event index) for each op, applied in effect order.
            let mut h = Vec::new();
            let mut effects = Vec::new();
            for c in 0..4u64 {
                let mut t = rnd(20);
                for _ in 0..12 {
                    let invoke = t;
                    let complete = invoke + 1 + rnd(60);
                    let effect = invoke + rnd(complete - invoke + 1);
                    let op = match rnd(3) {
                        0 => Read,
                        1 => Write(rnd(4)),
                        _ => Cas {
                            expect: rnd(4),
                            new: rnd(4),
                        },
                    };
                    effects.push((effect, h.len()));
                    h.push(ev(c, op, Unknown, invoke, complete));
                    t = complete + rnd(10);
                }
            }
            effects.sort();
            let mut state: Value = None;
            for &(_, i) in &effects {
                let e: &mut Event = &mut h[i];
                // Some operations lose their answer; a lost one may still apply.
                let lost = rnd(10) == 0;
                let applies = !lost || rnd(2) == 0;
                let outcome = match e.op {
                    Read => Got(state),
                    Write(v) => {
                        if applies {
                            state = Some(v);
                        }
                        Written
                    }
                    Cas { expect, new } => {
                        let ok = state == Some(expect);
                        if ok && applies {
                            state = Some(new);
                        }
                        Swapped(ok)
                    }
                };
                e.outcome = if lost {
                    if applies || e.op == Read {
                        Unknown
                    } else {
                        Fail
                    }
                } else {
                    outcome
                };
            }
            assert!(
                lin(&h),
                "a linearizable history was rejected:\n{}",
                h.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n")
            );
            // A read of a value nobody ever wrote cannot be explained.
            if let Some(r) = h.iter_mut().find(|e| e.op == Read && matches!(e.outcome, Got(_))) {
                r.outcome = Got(Some(99));
                assert!(!lin(&h), "a read of a never-written value was accepted");
            }
        }
    }
}
