//! Evaluating a native KV batch against a range's state: reads answered,
//! writes turned into the MVCC writes (and statistics delta) that every
//! replica then applies as they are (`WriteBatch`). Nothing here is
//! evaluated twice: this runs once, at the leaseholder, under the latches
//! the caller holds for the batch's spans.
//!
//! Pure over a storage `Batch` (which reads its own writes, so a later
//! request of the batch sees an earlier one's write): no raft, no clock, no
//! latches. The caller picks the timestamp and retries above it on
//! `WriteTooOld`.

use proto::kvpb::{self, request_union::Value as Req, response_union::Value as Resp};
use proto::kvserver::{RawWrite, WriteBatch};
use storage::mvcc::{self, MvccStats, ReadOptions, ScanOptions};
use storage::{Batch, Cf, Timestamp};

use crate::etcd::grpc_code;
use crate::keyspace::{in_user_keyspace, pretty};
use crate::spanlatch::Span;

/// The outcome of evaluating a batch.
#[derive(Debug)]
pub struct Evaluated {
    pub responses: Vec<kvpb::ResponseUnion>,
    /// What to propose, if the batch wrote anything.
    pub write: Option<WriteBatch>,
}

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// Refused (a condition failed, bad input): nothing is written.
    #[error("{}", .0.message)]
    Refused(kvpb::Error),
    /// A write met a version at or above the batch's timestamp: evaluate
    /// again at `retry_ts`.
    #[error("write too old; retry at {0}")]
    WriteTooOld(Timestamp),
    /// The engine failed.
    #[error("storage: {0}")]
    Storage(storage::Error),
}

fn refused(code: i32, index: usize, message: String) -> EvalError {
    EvalError::Refused(kvpb::Error {
        code,
        message,
        index: index as u32,
        condition_failed: None,
    })
}

fn storage_err(e: storage::Error, index: usize) -> EvalError {
    match e {
        storage::Error::WriteTooOld { retry_ts, .. } => EvalError::WriteTooOld(retry_ts),
        storage::Error::WriteIntent { .. } | storage::Error::ReadWithinUncertainty { .. } => {
            refused(grpc_code::UNAVAILABLE, index, e.to_string())
        }
        storage::Error::InvalidArgument(m) => refused(grpc_code::INVALID_ARGUMENT, index, m),
        e => EvalError::Storage(e),
    }
}

/// The key span a request touches: `(start, end)`, `end` empty for one key.
pub fn request_span(r: &Req) -> (&[u8], &[u8]) {
    match r {
        Req::Get(x) => (&x.key, &[]),
        Req::Put(x) => (&x.key, &[]),
        Req::ConditionalPut(x) => (&x.key, &[]),
        Req::Delete(x) => (&x.key, &[]),
        Req::Increment(x) => (&x.key, &[]),
        Req::DeleteRange(x) => (&x.start_key, &x.end_key),
        Req::Scan(x) => (&x.start_key, &x.end_key),
        Req::ReverseScan(x) => (&x.start_key, &x.end_key),
    }
}

/// Whether a request writes.
pub fn is_write(r: &Req) -> bool {
    !matches!(r, Req::Get(_) | Req::Scan(_) | Req::ReverseScan(_))
}

/// Checks every request names keys of the user keyspace and well-formed
/// spans; returns the requests.
pub fn validate(reqs: &[kvpb::RequestUnion]) -> Result<Vec<&Req>, EvalError> {
    let mut out = Vec::with_capacity(reqs.len());
    for (i, r) in reqs.iter().enumerate() {
        let Some(v) = &r.value else {
            return Err(refused(grpc_code::INVALID_ARGUMENT, i, "an empty request".into()));
        };
        let (start, end) = request_span(v);
        let spanning = matches!(v, Req::DeleteRange(_) | Req::Scan(_) | Req::ReverseScan(_));
        if start.is_empty() && !spanning {
            return Err(refused(grpc_code::INVALID_ARGUMENT, i, "key is not provided".into()));
        }
        if spanning && (end.is_empty() || start >= end) {
            return Err(refused(
                grpc_code::INVALID_ARGUMENT,
                i,
                format!("the span [{}, {}) is empty or inverted", pretty(start), pretty(end)),
            ));
        }
        if !in_user_keyspace(start, end) {
            return Err(refused(
                grpc_code::INVALID_ARGUMENT,
                i,
                format!(
                    "[{}, {}) is outside the user keyspace [\\x11, \\xff\\xff): the native API reads and writes only user keys",
                    pretty(start),
                    pretty(end)
                ),
            ));
        }
        out.push(v);
    }
    Ok(out)
}

/// The latch spans of a batch: (reads, writes).
pub fn latch_spans(reqs: &[&Req]) -> (Vec<Span>, Vec<Span>) {
    let (mut reads, mut writes) = (Vec::new(), Vec::new());
    for r in reqs {
        let (s, e) = request_span(r);
        let span = if e.is_empty() { Span::key(s) } else { Span::range(s, e) };
        if is_write(r) {
            writes.push(span);
        } else {
            reads.push(span);
        }
    }
    (reads, writes)
}

fn kv(k: mvcc::KeyValue) -> kvpb::KeyValue {
    kvpb::KeyValue {
        key: k.key,
        value: k.value,
        timestamp: Some(k.ts.into()),
    }
}

fn parse_int(b: &[u8]) -> Option<i64> {
    std::str::from_utf8(b).ok()?.trim().parse().ok()
}

/// Evaluates `reqs` at `ts` on a fresh batch of the range's engine, with at
/// most `limit` keys over the span requests (0: no limit).
pub fn evaluate(mut batch: Batch, reqs: &[&Req], ts: Timestamp, limit: i64) -> Result<Evaluated, EvalError> {
    let at = ReadOptions::at(ts);
    let mut stats = MvccStats::default();
    let mut budget: Option<usize> = (limit > 0).then_some(limit as usize);
    let mut responses = Vec::with_capacity(reqs.len());
    let (mut w_start, mut w_end): (Option<Vec<u8>>, Vec<u8>) = (None, Vec::new());
    for (i, r) in reqs.iter().enumerate() {
        let se = |e| storage_err(e, i);
        if is_write(r) {
            let (s, e) = request_span(r);
            let e = if e.is_empty() {
                storage::keys::next_user_key(s)
            } else {
                e.to_vec()
            };
            w_start = Some(w_start.map_or(s.to_vec(), |w| w.min(s.to_vec())));
            w_end = w_end.max(e);
        }
        let resp = match r {
            Req::Get(g) => Resp::Get(kvpb::GetResponse {
                kv: mvcc::get(&batch, &g.key, &at).map_err(se)?.map(kv),
            }),
            Req::Put(p) => {
                mvcc::put(&mut batch, &mut stats, &p.key, ts, Some(&p.value), None).map_err(se)?;
                Resp::Put(kvpb::PutResponse {})
            }
            Req::ConditionalPut(c) => {
                let cur = mvcc::get(&batch, &c.key, &at).map_err(se)?;
                let holds = match &cur {
                    None => c.exp_absent,
                    Some(v) => !c.exp_absent && v.value == c.exp_value,
                };
                if !holds {
                    return Err(EvalError::Refused(kvpb::Error {
                        code: grpc_code::FAILED_PRECONDITION,
                        message: "condition failed: the key's value is not the expected one".into(),
                        index: i as u32,
                        condition_failed: Some(kvpb::ConditionFailed {
                            exists: cur.is_some(),
                            actual_value: cur.map(|v| v.value).unwrap_or_default(),
                        }),
                    }));
                }
                mvcc::put(&mut batch, &mut stats, &c.key, ts, Some(&c.value), None).map_err(se)?;
                Resp::ConditionalPut(kvpb::ConditionalPutResponse {})
            }
            Req::Delete(d) => {
                mvcc::delete(&mut batch, &mut stats, &d.key, ts, None).map_err(se)?;
                Resp::Delete(kvpb::DeleteResponse {})
            }
            Req::Increment(inc) => {
                let cur = match mvcc::get(&batch, &inc.key, &at).map_err(se)? {
                    None => 0,
                    Some(v) => parse_int(&v.value).ok_or_else(|| {
                        refused(
                            grpc_code::FAILED_PRECONDITION,
                            i,
                            format!("the value of {} is not an integer", crate::keyspace::pretty(&inc.key)),
                        )
                    })?,
                };
                let new_value = cur
                    .checked_add(inc.increment)
                    .ok_or_else(|| refused(grpc_code::OUT_OF_RANGE, i, "integer overflow".into()))?;
                let v = new_value.to_string();
                mvcc::put(&mut batch, &mut stats, &inc.key, ts, Some(v.as_bytes()), None).map_err(se)?;
                Resp::Increment(kvpb::IncrementResponse { new_value })
            }
            Req::Scan(_) | Req::ReverseScan(_) | Req::DeleteRange(_) => {
                let (start, end) = request_span(r);
                let reverse = matches!(r, Req::ReverseScan(_));
                if budget == Some(0) {
                    // The limit is spent: not evaluated, all of it to resume.
                    let resume = Some(kvpb::Span {
                        start_key: start.to_vec(),
                        end_key: end.to_vec(),
                    });
                    responses.push(kvpb::ResponseUnion {
                        value: Some(empty_span_response(r, resume)),
                    });
                    continue;
                }
                let found = mvcc::scan(
                    &batch,
                    &ScanOptions {
                        start: start.to_vec(),
                        end: end.to_vec(),
                        read: at,
                        max_keys: budget.unwrap_or(0),
                        reverse,
                    },
                )
                .map_err(se)?;
                if let Some(b) = &mut budget {
                    *b -= found.kvs.len().min(*b);
                }
                let resume_span = found.resume_key.map(|k| {
                    if reverse {
                        kvpb::Span {
                            start_key: start.to_vec(),
                            end_key: k,
                        }
                    } else {
                        kvpb::Span {
                            start_key: k,
                            end_key: end.to_vec(),
                        }
                    }
                });
                match r {
                    Req::DeleteRange(d) => {
                        let mut keys = Vec::new();
                        for f in &found.kvs {
                            mvcc::delete(&mut batch, &mut stats, &f.key, ts, None).map_err(se)?;
                            if d.return_keys {
                                keys.push(f.key.clone());
                            }
                        }
                        Resp::DeleteRange(kvpb::DeleteRangeResponse {
                            deleted: found.kvs.len() as i64,
                            keys,
                            resume_span,
                        })
                    }
                    Req::Scan(_) => Resp::Scan(kvpb::ScanResponse {
                        rows: found.kvs.into_iter().map(kv).collect(),
                        resume_span,
                    }),
                    _ => Resp::ReverseScan(kvpb::ReverseScanResponse {
                        rows: found.kvs.into_iter().map(kv).collect(),
                        resume_span,
                    }),
                }
            }
        };
        responses.push(kvpb::ResponseUnion { value: Some(resp) });
    }
    let writes = batch.writes(Cf::Mvcc).ok_or_else(|| {
        EvalError::Storage(storage::Error::InvalidArgument(
            "a range delete in an evaluated batch".into(),
        ))
    })?;
    let write = (!writes.is_empty()).then(|| WriteBatch {
        writes: writes
            .into_iter()
            .map(|(key, v)| RawWrite {
                key,
                delete: v.is_none(),
                value: v.unwrap_or_default(),
            })
            .collect(),
        delta: Some(stats.into()),
        ts: Some(ts.into()),
        start_key: w_start.unwrap_or_default(),
        end_key: w_end,
    });
    Ok(Evaluated { responses, write })
}

/// The answer of a span request the limit left unevaluated.
pub fn empty_span_response(r: &Req, resume_span: Option<kvpb::Span>) -> Resp {
    match r {
        Req::DeleteRange(_) => Resp::DeleteRange(kvpb::DeleteRangeResponse {
            resume_span,
            ..Default::default()
        }),
        Req::ReverseScan(_) => Resp::ReverseScan(kvpb::ReverseScanResponse {
            resume_span,
            ..Default::default()
        }),
        _ => Resp::Scan(kvpb::ScanResponse {
            resume_span,
            ..Default::default()
        }),
    }
}

/// Applies an evaluated write batch to `batch` as it is: the writes, nothing
/// re-evaluated. Returns the statistics delta to add.
pub fn apply_write_batch(batch: &mut Batch, wb: &WriteBatch) -> Result<MvccStats, storage::Error> {
    for w in &wb.writes {
        if w.delete {
            batch.delete(Cf::Mvcc, &w.key)?;
        } else {
            batch.put(Cf::Mvcc, &w.key, &w.value)?;
        }
    }
    Ok(wb.delta.map(MvccStats::from).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::kvpb::*;
    use storage::{Engine, EngineOptions};

    fn req(v: Req) -> RequestUnion {
        RequestUnion { value: Some(v) }
    }

    /// Evaluates and applies on the same engine (as a one-replica range would).
    fn run(
        e: &Engine,
        stats: &mut MvccStats,
        reqs: Vec<RequestUnion>,
        wall: u64,
        limit: i64,
    ) -> Result<Vec<Resp>, EvalError> {
        let rs = validate(&reqs)?;
        let ev = evaluate(e.batch(), &rs, Timestamp::new(wall, 0), limit)?;
        if let Some(w) = &ev.write {
            let mut b = e.batch();
            *stats += apply_write_batch(&mut b, w).unwrap();
            e.write(b, false).unwrap();
        }
        Ok(ev.responses.into_iter().map(|r| r.value.unwrap()).collect())
    }

    fn put(k: &str, v: &str) -> RequestUnion {
        req(Req::Put(PutRequest {
            key: k.into(),
            value: v.into(),
        }))
    }

    fn scan(s: &str, e: &str) -> RequestUnion {
        req(Req::Scan(ScanRequest {
            start_key: s.into(),
            end_key: e.into(),
        }))
    }

    fn keys(r: &Resp) -> Vec<String> {
        let rows = match r {
            Resp::Scan(s) => &s.rows,
            Resp::ReverseScan(s) => &s.rows,
            _ => panic!("not a scan: {r:?}"),
        };
        rows.iter()
            .map(|kv| String::from_utf8(kv.key.clone()).unwrap())
            .collect()
    }

    #[test]
    fn a_batch_reads_its_own_writes_and_applies_as_evaluated() {
        let dir = tempfile::tempdir().unwrap();
        let e = Engine::open(dir.path(), EngineOptions::default()).unwrap();
        let mut stats = MvccStats::default();
        let out = run(
            &e,
            &mut stats,
            vec![
                put("a", "1"),
                put("b", "2"),
                put("c", "3"),
                req(Req::Increment(IncrementRequest {
                    key: "n".into(),
                    increment: 5,
                })),
                scan("a", "z"),
            ],
            10,
            0,
        )
        .unwrap();
        assert_eq!(keys(&out[4]), ["a", "b", "c", "n"]);
        // Applied: a later batch sees it; the stats match the data exactly.
        assert_eq!(mvcc::compute_stats(&e, b"\x11", b"\xff\xff").unwrap(), stats);
        let out = run(
            &e,
            &mut stats,
            vec![
                req(Req::Increment(IncrementRequest {
                    key: "n".into(),
                    increment: -7,
                })),
                req(Req::ReverseScan(ReverseScanRequest {
                    start_key: "a".into(),
                    end_key: "z".into(),
                })),
                req(Req::DeleteRange(DeleteRangeRequest {
                    start_key: "b".into(),
                    end_key: "d".into(),
                    return_keys: true,
                })),
                scan("a", "z"),
            ],
            20,
            0,
        )
        .unwrap();
        assert!(matches!(out[0], Resp::Increment(IncrementResponse { new_value: -2 })));
        assert_eq!(keys(&out[1]), ["n", "c", "b", "a"]);
        assert!(matches!(&out[2], Resp::DeleteRange(d) if d.deleted == 2 && d.keys == [b"b".to_vec(), b"c".to_vec()]));
        assert_eq!(keys(&out[3]), ["a", "n"]);
        assert_eq!(mvcc::compute_stats(&e, b"\x11", b"\xff\xff").unwrap(), stats);
        // Reads at an earlier timestamp still see the old versions.
        let out = run(&e, &mut stats, vec![scan("a", "z")], 15, 0).unwrap();
        assert_eq!(keys(&out[0]), ["a", "b", "c", "n"]);
    }

    #[test]
    fn conditions_limits_and_bad_input() {
        let dir = tempfile::tempdir().unwrap();
        let e = Engine::open(dir.path(), EngineOptions::default()).unwrap();
        let mut stats = MvccStats::default();
        run(&e, &mut stats, vec![put("a", "1"), put("b", "x"), put("c", "3")], 10, 0).unwrap();
        let cput = |exp: &str, absent| {
            req(Req::ConditionalPut(ConditionalPutRequest {
                key: "a".into(),
                value: "2".into(),
                exp_value: exp.into(),
                exp_absent: absent,
            }))
        };
        // A failed condition refuses the whole batch, with the actual value.
        match run(&e, &mut stats, vec![put("d", "4"), cput("9", false)], 20, 0) {
            Err(EvalError::Refused(err)) => {
                assert_eq!(err.index, 1);
                assert_eq!(err.condition_failed.unwrap().actual_value, b"1");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            run(&e, &mut stats, vec![cput("", true)], 20, 0),
            Err(EvalError::Refused(_))
        ));
        run(&e, &mut stats, vec![cput("1", false)], 20, 0).unwrap();
        let out = run(&e, &mut stats, vec![scan("a", "z")], 21, 0).unwrap();
        assert_eq!(keys(&out[0]), ["a", "b", "c"]);
        // A write below an existing version: retry above it.
        assert!(matches!(
            run(&e, &mut stats, vec![put("a", "old")], 5, 0),
            Err(EvalError::WriteTooOld(t)) if t > Timestamp::new(20, 0)
        ));
        // Increment of a non-integer.
        let inc = req(Req::Increment(IncrementRequest {
            key: "b".into(),
            increment: 1,
        }));
        assert!(matches!(
            run(&e, &mut stats, vec![inc], 30, 0),
            Err(EvalError::Refused(_))
        ));
        // The limit spans the batch: the first scan takes 2, the second 0.
        let out = run(&e, &mut stats, vec![scan("a", "z"), scan("a", "z")], 40, 2).unwrap();
        assert_eq!(keys(&out[0]), ["a", "b"]);
        assert!(matches!(&out[0], Resp::Scan(s) if s.resume_span.as_ref().unwrap().start_key == b"c"));
        assert!(keys(&out[1]).is_empty());
        assert!(matches!(&out[1], Resp::Scan(s) if s.resume_span.as_ref().unwrap().start_key == b"a"));
        let out = run(
            &e,
            &mut stats,
            vec![req(Req::ReverseScan(ReverseScanRequest {
                start_key: "a".into(),
                end_key: "z".into(),
            }))],
            40,
            1,
        )
        .unwrap();
        assert!(matches!(&out[0], Resp::ReverseScan(s) if s.resume_span.as_ref().unwrap().end_key == b"b\x00"));
        // Bad input: outside the user keyspace, empty key, inverted span.
        let past_end = req(Req::Scan(ScanRequest {
            start_key: b"a".to_vec(),
            end_key: b"\xff\xff\x01".to_vec(),
        }));
        for bad in [put("\x10etcd", "x"), put("", "x"), scan("b", "a"), past_end] {
            assert!(matches!(
                run(&e, &mut stats, vec![bad], 50, 0),
                Err(EvalError::Refused(_))
            ));
        }
        assert_eq!(mvcc::compute_stats(&e, b"\x11", b"\xff\xff").unwrap(), stats);
    }
}
