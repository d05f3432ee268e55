//! Evaluating a native KV batch against a range's state: reads answered,
//! writes turned into the MVCC writes (and statistics delta) that every
//! replica then applies as they are (`WriteBatch`). Nothing here is
//! evaluated twice: this runs once, at the leaseholder, under the latches
//! the caller holds for the batch's spans.
//!
//! A batch of a transaction reads at its read timestamp (seeing its own
//! intents) and lays intents at its write timestamp; the requests that act
//! on transaction records (EndTxn, HeartbeatTxn, PushTxn, QueryTxn) and on
//! intents (ResolveIntent, Refresh) are `txn_eval`'s.
//!
//! Pure over a storage `Batch` (which reads its own writes, so a later
//! request of the batch sees an earlier one's write): no raft, no clock, no
//! latches. The caller picks the timestamps and, outside a transaction,
//! retries above a newer version on `WriteTooOld`.

use proto::kvpb::{self, request_union::Value as Req, response_union::Value as Resp};
use proto::kvserver::{RawWrite, WriteBatch};
use storage::mvcc::{self, MvccStats, ReadOptions, ScanOptions};
use storage::{Batch, Cf, Timestamp};

use storage::mvcc::{Intent, TxnMeta};

use crate::etcd::grpc_code;
use crate::keyspace::{in_user_keyspace, pretty};
use crate::spanlatch::Span;
use crate::txn_eval;

/// The outcome of evaluating a batch.
#[derive(Debug)]
pub struct Evaluated {
    pub responses: Vec<kvpb::ResponseUnion>,
    /// What to propose, if the batch wrote anything.
    pub write: Option<WriteBatch>,
    /// The highest timestamp an intent of the batch's transaction landed at.
    pub txn_write_ts: Timestamp,
    /// A transaction this batch finished (an EndTxn, a push that aborted
    /// it): once applied, waiters are told and its intents outside what the
    /// batch resolved are resolved in the background.
    pub finished: Vec<txn_eval::Finished>,
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
    /// Intents of other transactions are in the way: wait for them
    /// (`intent_resolver`) and evaluate again.
    #[error("conflicting intents on {} keys", .0.len())]
    Conflict(Vec<Intent>),
    /// The batch's transaction cannot go on as it is (retry or aborted).
    #[error("{}", .0.reason)]
    Txn(kvpb::TxnError),
    /// The engine failed.
    #[error("storage: {0}")]
    Storage(storage::Error),
}

/// Testing knobs of transactions, never on in production: each breaks one
/// mechanism on purpose, so the bank and append checkers can prove they
/// catch it.
#[derive(Clone, Copy, Debug, Default)]
pub struct TxnKnobs {
    /// A refresh always succeeds (reads are never re-checked).
    pub skip_refresh: bool,
    /// Writes never move above earlier reads (no timestamp cache).
    pub skip_tscache: bool,
    /// Reads pass over other transactions' intents (dirty reads).
    pub dirty_reads: bool,
}

impl TxnKnobs {
    /// The knobs the environment turns on (`TARDIGRADE_TESTING_SKIP_REFRESH`,
    /// `TARDIGRADE_TESTING_SKIP_TSCACHE`, `TARDIGRADE_TESTING_DIRTY_READS`),
    /// read once per process.
    pub fn from_env() -> TxnKnobs {
        static KNOBS: std::sync::OnceLock<TxnKnobs> = std::sync::OnceLock::new();
        *KNOBS.get_or_init(|| {
            let on = |k: &str| std::env::var(k).is_ok_and(|v| v == "1");
            let k = TxnKnobs {
                skip_refresh: on("TARDIGRADE_TESTING_SKIP_REFRESH"),
                skip_tscache: on("TARDIGRADE_TESTING_SKIP_TSCACHE"),
                dirty_reads: on("TARDIGRADE_TESTING_DIRTY_READS"),
            };
            if k.skip_refresh || k.skip_tscache || k.dirty_reads {
                tracing::warn!("transaction testing knobs are on ({k:?}): this node is NOT serializable");
            }
            k
        })
    }
}

/// A batch's transaction, as evaluation needs it.
#[derive(Clone, Debug)]
pub struct TxnCtx {
    pub proto: kvpb::Transaction,
    pub meta: TxnMeta,
    pub id: [u8; 16],
}

impl TxnCtx {
    /// Checks the header's transaction: a 16-byte id, its timestamps set.
    pub fn new(t: &kvpb::Transaction) -> Result<TxnCtx, String> {
        let id = crate::txn_record::txn_id(&t.id)?;
        if t.read_timestamp.is_none() || t.write_timestamp.is_none() {
            return Err("a transaction without timestamps".into());
        }
        Ok(TxnCtx {
            proto: t.clone(),
            meta: TxnMeta {
                id: storage::mvcc::TxnId(id),
                epoch: t.epoch,
            },
            id,
        })
    }

    pub fn read_ts(&self) -> Timestamp {
        self.proto.read_timestamp.map(Timestamp::from).unwrap_or_default()
    }

    pub fn write_ts(&self) -> Timestamp {
        self.proto.write_timestamp.map(Timestamp::from).unwrap_or_default()
    }

    pub fn uncertainty_limit(&self) -> Timestamp {
        self.proto.uncertainty_limit.map(Timestamp::from).unwrap_or_default()
    }
}

/// Everything evaluation needs besides the requests.
#[derive(Clone, Debug)]
pub struct EvalCtx<'a> {
    /// Reads happen here (a transaction's read timestamp).
    pub read_ts: Timestamp,
    /// Writes land here (at or above `read_ts`).
    pub write_ts: Timestamp,
    /// At most this many keys over the span requests (0: no limit).
    pub limit: i64,
    pub txn: Option<&'a TxnCtx>,
    /// The leaseholder's clock, for transaction records.
    pub now: Timestamp,
    /// The range's span: what a commit may resolve in its own command.
    pub range_start: &'a [u8],
    pub range_end: &'a [u8],
    pub knobs: TxnKnobs,
}

impl EvalCtx<'_> {
    /// A plain batch at `ts`: no transaction, no records.
    pub fn plain(ts: Timestamp, limit: i64) -> EvalCtx<'static> {
        EvalCtx {
            read_ts: ts,
            write_ts: ts,
            limit,
            txn: None,
            now: ts,
            range_start: b"",
            range_end: b"",
            knobs: TxnKnobs::default(),
        }
    }

    fn read_opts(&self) -> ReadOptions {
        ReadOptions {
            ts: self.read_ts,
            uncertainty_limit: self.txn.map_or(self.read_ts, |t| t.uncertainty_limit()),
            txn: self.txn.map(|t| t.meta),
            ignore_intents: self.knobs.dirty_reads,
        }
    }
}

pub(crate) fn txn_error(kind: kvpb::txn_error::Kind, retry: Timestamp, reason: String) -> EvalError {
    EvalError::Txn(kvpb::TxnError {
        kind: kind as i32,
        retry_timestamp: Some(retry.into()),
        reason,
    })
}

pub(crate) fn refused_at(code: i32, index: usize, message: String) -> EvalError {
    refused(code, index, message)
}

fn refused(code: i32, index: usize, message: String) -> EvalError {
    EvalError::Refused(kvpb::Error {
        code,
        message,
        index: index as u32,
        condition_failed: None,
        txn_error: None,
    })
}

pub(crate) fn storage_err(e: storage::Error, index: usize, in_txn: bool) -> EvalError {
    use kvpb::txn_error::Kind;
    match e {
        storage::Error::WriteTooOld { retry_ts, ref key, .. } if in_txn => txn_error(
            Kind::WriteTooOld,
            retry_ts,
            format!(
                "write too old: {} has a newer version; retry at {retry_ts}",
                pretty(key)
            ),
        ),
        storage::Error::WriteTooOld { retry_ts, .. } => EvalError::WriteTooOld(retry_ts),
        storage::Error::WriteIntent { intents } => EvalError::Conflict(intents),
        storage::Error::ReadWithinUncertainty { value_ts, ref key, .. } => txn_error(
            Kind::Uncertain,
            value_ts.next(),
            format!(
                "{} has a value at {value_ts}, within the uncertainty interval: retry above it",
                pretty(key)
            ),
        ),
        storage::Error::TxnState(m) => refused(grpc_code::FAILED_PRECONDITION, index, m),
        storage::Error::InvalidArgument(m) => refused(grpc_code::INVALID_ARGUMENT, index, m),
        e => EvalError::Storage(e),
    }
}

/// The key span a request touches: `(start, end)`, `end` empty for one key.
pub fn request_span(r: &Req) -> (&[u8], &[u8]) {
    r.span()
}

/// Whether a request may write (and so takes write latches).
pub fn is_write(r: &Req) -> bool {
    !matches!(
        r,
        Req::Get(_) | Req::Scan(_) | Req::ReverseScan(_) | Req::QueryTxn(_) | Req::Refresh(_)
    )
}

/// Whether a request writes MVCC values at the batch's timestamp (and so
/// must go above earlier reads of its keys); the requests on records and
/// intents do not.
pub fn is_mvcc_write(r: &Req) -> bool {
    matches!(
        r,
        Req::Put(_) | Req::ConditionalPut(_) | Req::Delete(_) | Req::Increment(_) | Req::DeleteRange(_)
    )
}

/// Whether a request reads MVCC values at the batch's timestamp (and so
/// goes in the timestamp cache).
pub fn is_mvcc_read(r: &Req) -> bool {
    matches!(
        r,
        Req::Get(_)
            | Req::Scan(_)
            | Req::ReverseScan(_)
            | Req::ConditionalPut(_)
            | Req::Increment(_)
            | Req::DeleteRange(_)
            | Req::Refresh(_)
    )
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
        if matches!(
            v,
            Req::PushTxn(_) | Req::QueryTxn(_) | Req::HeartbeatTxn(_) | Req::EndTxn(_)
        ) && start.is_empty()
        {
            return Err(refused(
                grpc_code::INVALID_ARGUMENT,
                i,
                "a transaction request names no anchor key".into(),
            ));
        }
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
pub fn evaluate(batch: Batch, reqs: &[&Req], ts: Timestamp, limit: i64) -> Result<Evaluated, EvalError> {
    evaluate_in(batch, reqs, &EvalCtx::plain(ts, limit))
}

/// Writes `value` to `key` as the context says: an intent of its
/// transaction, or a committed version. Returns where it landed.
fn write(
    batch: &mut Batch,
    stats: &mut MvccStats,
    cx: &EvalCtx,
    key: &[u8],
    value: Option<&[u8]>,
) -> Result<Timestamp, storage::Error> {
    match cx.txn {
        Some(t) => mvcc::put_txn(batch, stats, key, cx.write_ts, value, &t.meta, &t.proto.key),
        None => mvcc::put(batch, stats, key, cx.write_ts, value, None).map(|()| cx.write_ts),
    }
}

/// Evaluates `reqs` as `cx` says on a fresh batch of the range's engine.
pub fn evaluate_in(mut batch: Batch, reqs: &[&Req], cx: &EvalCtx) -> Result<Evaluated, EvalError> {
    let at = cx.read_opts();
    let in_txn = cx.txn.is_some();
    if let Some(t) = cx.txn {
        if t.proto.key.is_empty() && reqs.iter().any(|r| is_mvcc_write(r)) {
            return Err(refused(
                grpc_code::INVALID_ARGUMENT,
                0,
                "a transaction writes before naming its anchor key".into(),
            ));
        }
    }
    let mut stats = MvccStats::default();
    let mut budget: Option<usize> = (cx.limit > 0).then_some(cx.limit as usize);
    let mut responses = Vec::with_capacity(reqs.len());
    let (mut w_start, mut w_end): (Option<Vec<u8>>, Vec<u8>) = (None, Vec::new());
    let mut landed = Timestamp::ZERO;
    let mut finished = Vec::new();
    for (i, r) in reqs.iter().enumerate() {
        let se = |e| storage_err(e, i, in_txn);
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
                landed = landed.max(write(&mut batch, &mut stats, cx, &p.key, Some(&p.value)).map_err(se)?);
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
                        txn_error: None,
                    }));
                }
                landed = landed.max(write(&mut batch, &mut stats, cx, &c.key, Some(&c.value)).map_err(se)?);
                Resp::ConditionalPut(kvpb::ConditionalPutResponse {})
            }
            Req::Delete(d) => {
                landed = landed.max(write(&mut batch, &mut stats, cx, &d.key, None).map_err(se)?);
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
                landed = landed.max(write(&mut batch, &mut stats, cx, &inc.key, Some(v.as_bytes())).map_err(se)?);
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
                            landed = landed.max(write(&mut batch, &mut stats, cx, &f.key, None).map_err(se)?);
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
            Req::EndTxn(_)
            | Req::HeartbeatTxn(_)
            | Req::PushTxn(_)
            | Req::QueryTxn(_)
            | Req::ResolveIntent(_)
            | Req::Refresh(_) => {
                let mut tx = txn_eval::TxnBatch {
                    batch: &mut batch,
                    stats: &mut stats,
                    cx,
                    landed,
                    finished: &mut finished,
                };
                let resp = txn_eval::evaluate(&mut tx, r, i)?;
                landed = tx.landed;
                resp
            }
        };
        responses.push(kvpb::ResponseUnion { value: Some(resp) });
    }
    let no_range_deletes = || {
        EvalError::Storage(storage::Error::InvalidArgument(
            "a range delete in an evaluated batch".into(),
        ))
    };
    let writes = batch.writes(Cf::Mvcc).ok_or_else(no_range_deletes)?;
    let local = batch.writes(Cf::Local).ok_or_else(no_range_deletes)?;
    let raw = |local: bool| {
        move |(key, v): (Vec<u8>, Option<Vec<u8>>)| RawWrite {
            key,
            delete: v.is_none(),
            value: v.unwrap_or_default(),
            local,
        }
    };
    let write = (!writes.is_empty() || !local.is_empty()).then(|| WriteBatch {
        writes: writes
            .into_iter()
            .map(raw(false))
            .chain(local.into_iter().map(raw(true)))
            .collect(),
        delta: Some(stats.into()),
        ts: Some(cx.write_ts.max(landed).into()),
        start_key: w_start.unwrap_or_default(),
        end_key: w_end,
    });
    Ok(Evaluated {
        responses,
        write,
        txn_write_ts: landed,
        finished,
    })
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
        let cf = if w.local { Cf::Local } else { Cf::Mvcc };
        if w.delete {
            batch.delete(cf, &w.key)?;
        } else {
            batch.put(cf, &w.key, &w.value)?;
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
