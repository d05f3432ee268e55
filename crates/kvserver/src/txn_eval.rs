//! Evaluating the requests that act on transaction records and intents:
//! EndTxn (commit, 1PC, abort), HeartbeatTxn, PushTxn, QueryTxn,
//! ResolveIntent and Refresh. Like `batcheval`, of which it is a part, it is
//! pure over a storage `Batch` and the evaluation context: it decides from
//! the record and the intents what to write, and never waits, routes or
//! retries. A push that finds its pushee alive answers PENDING; waiting is
//! `kv_batch`'s and `txnwait`'s.
//!
//! Rules it keeps (see `docs/architecture.md`, "Transactions"):
//! - a final record (COMMITTED, ABORTED) is never changed;
//! - a commit is refused while the write timestamp is above the read one
//!   and the transaction read something (it must refresh first);
//! - a commit whose writes all lie in this batch and this range (1PC)
//!   writes no record and leaves no intent;
//! - a push aborts only a pushee whose record (or, with no record yet, whose
//!   intent) is older than `txn_record::TXN_EXPIRY_NANOS`, or one sacrificed
//!   to break a deadlock (`force`).

use proto::kvpb::{self, request_union::Value as Req, response_union::Value as Resp, TxnStatus};
use proto::kvserver::TxnRecord;
use storage::mvcc::{self, MvccStats, Resolution, TxnId};
use storage::{Batch, Timestamp};

use crate::batcheval::{refused_at, storage_err, txn_error, EvalCtx, EvalError};
use crate::etcd::grpc_code;
use crate::txn_record;

/// How many intents one command resolves at most (a commit on its own
/// range, or one ResolveIntent of a span): the rest resume in another.
pub const MAX_RESOLVE_PER_COMMAND: usize = 2_000;

/// The state of a batch being evaluated that these requests use.
pub struct TxnBatch<'a, 'b> {
    pub batch: &'a mut Batch,
    pub stats: &'a mut MvccStats,
    pub cx: &'a EvalCtx<'b>,
    /// The highest timestamp an intent of the batch landed at so far.
    pub landed: Timestamp,
    pub finished: &'a mut Vec<Finished>,
}

/// A transaction a batch finished: who waits for it is told once the batch
/// applied, and the intents it did not resolve itself are resolved then.
#[derive(Clone, Debug)]
pub struct Finished {
    pub id: [u8; 16],
    pub status: TxnStatus,
    pub epoch: u32,
    pub commit_ts: Timestamp,
    /// Lock spans this batch did not resolve (other ranges', or beyond the
    /// per-command bound).
    pub unresolved: Vec<kvpb::Span>,
}

/// Evaluates one transaction request (`i` is its index in the batch).
pub fn evaluate(tx: &mut TxnBatch, r: &Req, i: usize) -> Result<Resp, EvalError> {
    match r {
        Req::EndTxn(e) => end_txn(tx, e, i),
        Req::HeartbeatTxn(h) => heartbeat(tx, h, i),
        Req::PushTxn(p) => push(tx, p, i),
        Req::QueryTxn(q) => query(tx, q, i),
        Req::ResolveIntent(r) => resolve(tx, r, i),
        Req::Refresh(r) => refresh(tx, r, i),
        _ => Err(refused_at(grpc_code::INTERNAL, i, "not a transaction request".into())),
    }
}

fn own_txn<'a>(tx: &TxnBatch<'a, '_>, key: &[u8], i: usize) -> Result<&'a crate::batcheval::TxnCtx, EvalError> {
    let t = tx.cx.txn.ok_or_else(|| {
        refused_at(
            grpc_code::INVALID_ARGUMENT,
            i,
            "a transaction request outside a transaction".into(),
        )
    })?;
    if t.proto.key != key {
        return Err(refused_at(
            grpc_code::INVALID_ARGUMENT,
            i,
            "a transaction's record requests go to its anchor key".into(),
        ));
    }
    Ok(t)
}

fn se(i: usize) -> impl Fn(storage::Error) -> EvalError {
    move |e| storage_err(e, i, true)
}

fn end_txn(tx: &mut TxnBatch, e: &kvpb::EndTxnRequest, i: usize) -> Result<Resp, EvalError> {
    use kvpb::txn_error::Kind;
    let t = own_txn(tx, &e.key, i)?;
    let rec = txn_record::read(tx.batch, &e.key, &t.id).map_err(se(i))?;
    let answer = |status: TxnStatus, one_phase| {
        Ok(Resp::EndTxn(kvpb::EndTxnResponse {
            status: status as i32,
            one_phase,
        }))
    };
    match rec.as_ref().map(txn_record::status) {
        Some(TxnStatus::Committed) if e.commit => return answer(TxnStatus::Committed, false),
        Some(TxnStatus::Committed) => {
            return Err(refused_at(
                grpc_code::FAILED_PRECONDITION,
                i,
                "the transaction is already committed".into(),
            ))
        }
        Some(TxnStatus::Aborted) if e.commit => {
            return Err(txn_error(
                Kind::Aborted,
                t.write_ts(),
                "the transaction was aborted (its heartbeat expired, or a deadlock chose it)".into(),
            ))
        }
        Some(TxnStatus::Aborted) => return answer(TxnStatus::Aborted, false),
        _ => {}
    }
    let spans: Vec<kvpb::Span> = e.lock_spans.clone();
    if !e.commit {
        let unresolved = resolve_local(tx, &spans, t.meta.id, Resolution::Abort, i)?;
        finish_own(tx, t, TxnStatus::Aborted, t.write_ts(), &spans, unresolved, i)?;
        return answer(TxnStatus::Aborted, false);
    }
    let commit_ts = t.write_ts().max(tx.landed);
    if commit_ts > t.read_ts() && !e.no_reads {
        return Err(txn_error(
            Kind::Retry,
            commit_ts,
            format!(
                "the write timestamp moved to {commit_ts}, above the read timestamp {}: refresh the reads first",
                t.read_ts()
            ),
        ));
    }
    let in_range = |s: &kvpb::Span| {
        let end_ok = if s.end_key.is_empty() {
            tx.cx.range_end.is_empty() || s.start_key.as_slice() < tx.cx.range_end
        } else {
            tx.cx.range_end.is_empty() || s.end_key.as_slice() <= tx.cx.range_end
        };
        s.start_key.as_slice() >= tx.cx.range_start && end_ok
    };
    let one_phase = e.one_phase && rec.is_none() && spans.iter().all(in_range);
    let resolution = Resolution::Commit {
        ts: commit_ts,
        epoch: t.proto.epoch,
    };
    let unresolved = resolve_local(tx, &spans, t.meta.id, resolution, i)?;
    if one_phase && unresolved.is_empty() {
        // 1PC: the batch laid every intent of the transaction; committing
        // them in the same command leaves neither intents nor a record.
        return answer(TxnStatus::Committed, true);
    }
    // Two phases (or too many intents for one command): a record.
    finish_own(tx, t, TxnStatus::Committed, commit_ts, &spans, unresolved, i)?;
    answer(TxnStatus::Committed, false)
}

/// Writes the batch's own transaction's final record and notes it finished
/// (its waiters told, `unresolved` resolved in the background, once applied).
fn finish_own(
    tx: &mut TxnBatch,
    t: &crate::batcheval::TxnCtx,
    status: TxnStatus,
    ts: Timestamp,
    spans: &[kvpb::Span],
    unresolved: Vec<kvpb::Span>,
    i: usize,
) -> Result<(), EvalError> {
    write_record(
        tx,
        &t.proto.key,
        &t.id,
        status,
        t.proto.epoch,
        ts,
        spans,
        t.proto.priority,
        i,
    )?;
    tx.finished.push(Finished {
        id: t.id,
        status,
        epoch: t.proto.epoch,
        commit_ts: ts,
        unresolved,
    });
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn write_record(
    tx: &mut TxnBatch,
    anchor: &[u8],
    id: &[u8; 16],
    status: TxnStatus,
    epoch: u32,
    ts: Timestamp,
    spans: &[kvpb::Span],
    priority: i32,
    i: usize,
) -> Result<(), EvalError> {
    let rec = TxnRecord {
        status: status as i32,
        epoch,
        write_timestamp: Some(ts.into()),
        last_heartbeat: Some(tx.cx.now.into()),
        lock_spans: spans.to_vec(),
        priority,
    };
    txn_record::write(tx.batch, anchor, id, &rec).map_err(se(i))
}

/// Resolves `txn`'s intents in the parts of `spans` on this range, at most
/// `MAX_RESOLVE_PER_COMMAND`; returns the spans left to resolve elsewhere
/// or later.
fn resolve_local(
    tx: &mut TxnBatch,
    spans: &[kvpb::Span],
    txn: TxnId,
    res: Resolution,
    i: usize,
) -> Result<Vec<kvpb::Span>, EvalError> {
    let (rs, re) = (tx.cx.range_start.to_vec(), tx.cx.range_end.to_vec());
    let mut left = Vec::new();
    let mut budget = MAX_RESOLVE_PER_COMMAND;
    for s in spans {
        let point = s.end_key.is_empty();
        let end = if point {
            storage::keys::next_user_key(&s.start_key)
        } else {
            s.end_key.clone()
        };
        // The part inside the range: [lo, hi).
        let lo = s.start_key.clone().max(rs.clone());
        let hi = if re.is_empty() {
            end.clone()
        } else {
            end.clone().min(re.clone())
        };
        if lo >= hi {
            left.push(s.clone());
            continue;
        }
        if s.start_key < lo {
            left.push(kvpb::Span {
                start_key: s.start_key.clone(),
                end_key: lo.clone(),
            });
        }
        if hi < end {
            left.push(kvpb::Span {
                start_key: hi.clone(),
                end_key: end.clone(),
            });
        }
        if budget == 0 {
            left.push(kvpb::Span {
                start_key: lo,
                end_key: if point { Vec::new() } else { hi },
            });
            continue;
        }
        if point {
            mvcc::resolve_intent(tx.batch, tx.stats, &s.start_key, txn, res).map_err(se(i))?;
            budget -= 1;
            continue;
        }
        let (found, resume) = mvcc::intents_in_span(tx.batch, &lo, &hi, budget).map_err(se(i))?;
        for (k, rec) in found {
            if rec.txn.id == txn {
                mvcc::resolve_intent(tx.batch, tx.stats, &k, txn, res).map_err(se(i))?;
            }
            budget = budget.saturating_sub(1);
        }
        if let Some(r) = resume {
            left.push(kvpb::Span {
                start_key: r,
                end_key: hi,
            });
        }
    }
    Ok(left)
}

fn heartbeat(tx: &mut TxnBatch, h: &kvpb::HeartbeatTxnRequest, i: usize) -> Result<Resp, EvalError> {
    let t = own_txn(tx, &h.key, i)?;
    let rec = txn_record::read(tx.batch, &h.key, &t.id).map_err(se(i))?;
    let mut rec = match rec {
        Some(r) if txn_record::status(&r) == TxnStatus::Aborted => {
            return Err(txn_error(
                kvpb::txn_error::Kind::Aborted,
                t.write_ts(),
                "the transaction was aborted (its heartbeat expired, or a deadlock chose it)".into(),
            ))
        }
        Some(r) if txn_record::status(&r) == TxnStatus::Committed => {
            return Ok(Resp::HeartbeatTxn(kvpb::HeartbeatTxnResponse {}))
        }
        Some(r) => r,
        None => TxnRecord {
            status: TxnStatus::Pending as i32,
            priority: t.proto.priority,
            ..Default::default()
        },
    };
    rec.epoch = rec.epoch.max(t.proto.epoch);
    rec.write_timestamp = Some(
        t.write_ts()
            .max(rec.write_timestamp.map(Timestamp::from).unwrap_or_default())
            .into(),
    );
    rec.last_heartbeat = Some(tx.cx.now.into());
    txn_record::write(tx.batch, &h.key, &t.id, &rec).map_err(se(i))?;
    Ok(Resp::HeartbeatTxn(kvpb::HeartbeatTxnResponse {}))
}

fn push(tx: &mut TxnBatch, p: &kvpb::PushTxnRequest, i: usize) -> Result<Resp, EvalError> {
    let pushee = p
        .pushee
        .clone()
        .ok_or_else(|| refused_at(grpc_code::INVALID_ARGUMENT, i, "a push names no pushee".into()))?;
    let id = txn_record::txn_id(&pushee.id).map_err(|m| refused_at(grpc_code::INVALID_ARGUMENT, i, m))?;
    if pushee.key != p.key {
        return Err(refused_at(
            grpc_code::INVALID_ARGUMENT,
            i,
            "a push goes to its pushee's anchor key".into(),
        ));
    }
    let rec = txn_record::read(tx.batch, &p.key, &id).map_err(se(i))?;
    let (rec_epoch, rec_priority) = rec.as_ref().map_or((pushee.epoch, 0), |r| (r.epoch, r.priority));
    let answer = |status: TxnStatus, ts: Timestamp| {
        Ok(Resp::PushTxn(kvpb::PushTxnResponse {
            pushee: Some(kvpb::TxnMeta {
                write_timestamp: Some(ts.into()),
                epoch: rec_epoch,
                ..pushee.clone()
            }),
            status: status as i32,
            pushee_priority: rec_priority,
        }))
    };
    let intent_ts = pushee.write_timestamp.map(Timestamp::from).unwrap_or_default();
    let (last_heard, epoch, priority) = match &rec {
        Some(r) => {
            let ts = r.write_timestamp.map(Timestamp::from).unwrap_or_default();
            match txn_record::status(r) {
                TxnStatus::Committed => return answer(TxnStatus::Committed, ts),
                TxnStatus::Aborted => return answer(TxnStatus::Aborted, ts),
                _ => {}
            }
            (
                r.last_heartbeat.map(Timestamp::from).unwrap_or_default(),
                r.epoch,
                r.priority,
            )
        }
        // No record yet: its coordinator sends one with its first write,
        // so only an old intent's transaction can be given up for dead.
        None => (intent_ts, pushee.epoch, 0),
    };
    if !(p.force || txn_record::expired(last_heard, tx.cx.now)) {
        return answer(TxnStatus::Pending, intent_ts);
    }
    write_record(tx, &p.key, &id, TxnStatus::Aborted, epoch, intent_ts, &[], priority, i)?;
    tx.finished.push(Finished {
        id,
        status: TxnStatus::Aborted,
        epoch,
        commit_ts: intent_ts,
        unresolved: Vec::new(),
    });
    answer(TxnStatus::Aborted, intent_ts)
}

fn query(tx: &mut TxnBatch, q: &kvpb::QueryTxnRequest, i: usize) -> Result<Resp, EvalError> {
    let id = txn_record::txn_id(&q.id).map_err(|m| refused_at(grpc_code::INVALID_ARGUMENT, i, m))?;
    let rec = txn_record::read(tx.batch, &q.key, &id).map_err(se(i))?;
    Ok(Resp::QueryTxn(kvpb::QueryTxnResponse {
        status: rec.as_ref().map_or(TxnStatus::Pending, txn_record::status) as i32,
        waiters: Vec::new(), // filled in from `txnwait` by the caller
        found: rec.is_some(),
    }))
}

fn resolve(tx: &mut TxnBatch, r: &kvpb::ResolveIntentRequest, i: usize) -> Result<Resp, EvalError> {
    let id = TxnId(txn_record::txn_id(&r.txn_id).map_err(|m| refused_at(grpc_code::INVALID_ARGUMENT, i, m))?);
    let res = match TxnStatus::try_from(r.status) {
        Ok(TxnStatus::Committed) => Resolution::Commit {
            ts: r.commit_timestamp.map(Timestamp::from).unwrap_or_default(),
            epoch: r.epoch,
        },
        Ok(TxnStatus::Aborted) => Resolution::Abort,
        _ => {
            return Err(refused_at(
                grpc_code::INVALID_ARGUMENT,
                i,
                "only a finished transaction's intents are resolved".into(),
            ))
        }
    };
    if r.end_key.is_empty() {
        let done = mvcc::resolve_intent(tx.batch, tx.stats, &r.key, id, res).map_err(se(i))?;
        return Ok(Resp::ResolveIntent(kvpb::ResolveIntentResponse {
            resolved: done as i64,
            resume_span: None,
        }));
    }
    let (found, resume) =
        mvcc::intents_in_span(tx.batch, &r.key, &r.end_key, MAX_RESOLVE_PER_COMMAND).map_err(se(i))?;
    let mut resolved = 0;
    for (k, rec) in found {
        if rec.txn.id == id && mvcc::resolve_intent(tx.batch, tx.stats, &k, id, res).map_err(se(i))? {
            resolved += 1;
        }
    }
    Ok(Resp::ResolveIntent(kvpb::ResolveIntentResponse {
        resolved,
        resume_span: resume.map(|k| kvpb::Span {
            start_key: k,
            end_key: r.end_key.clone(),
        }),
    }))
}

fn refresh(tx: &mut TxnBatch, r: &kvpb::RefreshRequest, i: usize) -> Result<Resp, EvalError> {
    let t = tx
        .cx
        .txn
        .ok_or_else(|| refused_at(grpc_code::INVALID_ARGUMENT, i, "a refresh outside a transaction".into()))?;
    if tx.cx.knobs.skip_refresh {
        return Ok(Resp::Refresh(kvpb::RefreshResponse {}));
    }
    let from = r.from.map(Timestamp::from).unwrap_or_default();
    let end = if r.end_key.is_empty() {
        storage::keys::next_user_key(&r.key)
    } else {
        r.end_key.clone()
    };
    let found = mvcc::changed_since(tx.batch, &r.key, &end, from, tx.cx.read_ts, Some(t.meta.id)).map_err(se(i))?;
    match found {
        None => Ok(Resp::Refresh(kvpb::RefreshResponse {})),
        Some(c) => {
            let what = match c {
                mvcc::Changed::Version { key, ts } => {
                    format!("{} was written at {ts}", crate::keyspace::pretty(&key))
                }
                mvcc::Changed::Intent(x) => {
                    format!("{} holds another transaction's intent", crate::keyspace::pretty(&x.key))
                }
            };
            Err(txn_error(
                kvpb::txn_error::Kind::Retry,
                tx.cx.read_ts,
                format!("reads no longer hold at {} ({what}): restart", tx.cx.read_ts),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batcheval::{evaluate_in, validate, EvalCtx, TxnCtx, TxnKnobs};
    use proto::kvpb::{request_union::Value as Req, RequestUnion};
    use storage::{Engine, EngineOptions};

    fn ts(w: u64) -> Timestamp {
        Timestamp::new(w * 1_000_000_000, 0)
    }

    fn txn(id: u8, anchor: &str, read: u64, write: u64) -> TxnCtx {
        TxnCtx::new(&kvpb::Transaction {
            id: vec![id; 16],
            key: anchor.into(),
            read_timestamp: Some(ts(read).into()),
            write_timestamp: Some(ts(write).into()),
            uncertainty_limit: Some(ts(read).into()),
            priority: 1,
            ..Default::default()
        })
        .unwrap()
    }

    /// Evaluates and applies on one engine, as a range [a, m) would.
    fn run(e: &Engine, t: Option<&TxnCtx>, reqs: Vec<Req>, now: u64) -> Result<(Vec<Resp>, Vec<Finished>), EvalError> {
        let reqs: Vec<RequestUnion> = reqs.into_iter().map(|v| RequestUnion { value: Some(v) }).collect();
        let rs = validate(&reqs)?;
        let (r, w) = t.map_or((ts(now), ts(now)), |t| (t.read_ts(), t.write_ts()));
        let cx = EvalCtx {
            read_ts: r,
            write_ts: w,
            limit: 0,
            txn: t,
            now: ts(now),
            range_start: b"a",
            range_end: b"m",
            knobs: TxnKnobs::default(),
        };
        let ev = evaluate_in(e.batch(), &rs, &cx)?;
        if let Some(wb) = &ev.write {
            let mut b = e.batch();
            crate::batcheval::apply_write_batch(&mut b, wb).unwrap();
            e.write(b, false).unwrap();
        }
        Ok((ev.responses.into_iter().filter_map(|r| r.value).collect(), ev.finished))
    }

    fn put(k: &str, v: &str) -> Req {
        Req::Put(kvpb::PutRequest {
            key: k.into(),
            value: v.into(),
        })
    }

    fn get(k: &str) -> Req {
        Req::Get(kvpb::GetRequest { key: k.into() })
    }

    fn end(anchor: &str, commit: bool, spans: &[&str], one_phase: bool) -> Req {
        Req::EndTxn(kvpb::EndTxnRequest {
            key: anchor.into(),
            commit,
            lock_spans: spans
                .iter()
                .map(|k| kvpb::Span {
                    start_key: k.as_bytes().to_vec(),
                    end_key: Vec::new(),
                })
                .collect(),
            one_phase,
            no_reads: false,
        })
    }

    fn value(e: &Engine, k: &str, at: u64) -> Result<Option<String>, EvalError> {
        let (r, _) = run(e, None, vec![get(k)], at)?;
        Ok(match &r[0] {
            Resp::Get(g) => g.kv.as_ref().map(|kv| String::from_utf8(kv.value.clone()).unwrap()),
            other => panic!("{other:?}"),
        })
    }

    fn engine() -> (tempfile::TempDir, Engine) {
        let dir = tempfile::tempdir().unwrap();
        let e = Engine::open(dir.path(), EngineOptions::default()).unwrap();
        (dir, e)
    }

    #[test]
    fn one_phase_commit_leaves_no_intent_and_no_record() {
        let (_d, e) = engine();
        let t = txn(1, "b", 10, 10);
        let (r, fin) = run(
            &e,
            Some(&t),
            vec![put("b", "1"), put("c", "2"), end("b", true, &["b", "c"], true)],
            10,
        )
        .unwrap();
        assert!(matches!(
            r[2],
            Resp::EndTxn(kvpb::EndTxnResponse { one_phase: true, .. })
        ));
        assert!(fin.is_empty());
        assert_eq!(txn_record::read(&e, b"b", &t.id).unwrap(), None);
        let (intents, _) = mvcc::intents_in_span(&e, b"a", b"m", 0).unwrap();
        assert!(intents.is_empty(), "{intents:?}");
        assert_eq!(value(&e, "c", 11).unwrap().as_deref(), Some("2"));
        assert_eq!(
            value(&e, "c", 9).unwrap(),
            None,
            "committed at the transaction's timestamp"
        );
    }

    #[test]
    fn a_two_phase_commit_writes_the_record_and_resolves_what_is_local() {
        let (_d, e) = engine();
        let t = txn(2, "b", 10, 10);
        run(
            &e,
            Some(&t),
            vec![
                Req::HeartbeatTxn(kvpb::HeartbeatTxnRequest { key: "b".into() }),
                put("b", "1"),
            ],
            10,
        )
        .unwrap();
        // The intent blocks a plain reader, which must wait for the owner.
        assert!(matches!(value(&e, "b", 12), Err(EvalError::Conflict(ref i)) if i[0].anchor == b"b"));
        let rec = txn_record::read(&e, b"b", &t.id).unwrap().unwrap();
        assert_eq!(txn_record::status(&rec), TxnStatus::Pending);
        // Commit: "z" is outside the range [a, m): left for the background.
        let (r, fin) = run(
            &e,
            Some(&t),
            vec![put("c", "2"), end("b", true, &["b", "c", "z"], false)],
            11,
        )
        .unwrap();
        assert!(matches!(
            r[1],
            Resp::EndTxn(kvpb::EndTxnResponse { one_phase: false, .. })
        ));
        assert_eq!(fin.len(), 1);
        assert_eq!(
            fin[0].unresolved,
            vec![kvpb::Span {
                start_key: b"z".to_vec(),
                end_key: vec![]
            }]
        );
        let rec = txn_record::read(&e, b"b", &t.id).unwrap().unwrap();
        assert_eq!(txn_record::status(&rec), TxnStatus::Committed);
        assert_eq!(value(&e, "b", 12).unwrap().as_deref(), Some("1"));
        // A commit again is answered as done; an abort now is refused.
        assert!(run(&e, Some(&t), vec![end("b", true, &[], false)], 12).is_ok());
        assert!(matches!(
            run(&e, Some(&t), vec![end("b", false, &[], false)], 12),
            Err(EvalError::Refused(_))
        ));
    }

    #[test]
    fn a_moved_write_timestamp_must_be_refreshed_before_commit() {
        let (_d, e) = engine();
        // Read at 10, writes pushed to 12 (by the cache, say).
        let t = txn(3, "b", 10, 12);
        let r = run(&e, Some(&t), vec![put("b", "1"), end("b", true, &["b"], true)], 12);
        assert!(
            matches!(r, Err(EvalError::Txn(ref x)) if x.kind == kvpb::txn_error::Kind::Retry as i32),
            "{r:?}"
        );
        // Nothing was written by the refused batch.
        assert_eq!(value(&e, "b", 20).unwrap(), None);
        // A transaction that read nothing commits at the higher timestamp.
        let mut x = end("b", true, &["b"], true);
        if let Req::EndTxn(ref mut e) = x {
            e.no_reads = true;
        }
        run(&e, Some(&t), vec![put("b", "1"), x], 12).unwrap();
        assert_eq!(value(&e, "b", 12).unwrap().as_deref(), Some("1"));
    }

    #[test]
    fn refresh_sees_writes_in_its_interval_and_ignores_its_own() {
        let (_d, e) = engine();
        run(&e, None, vec![put("d", "x")], 15).unwrap();
        let refresh = |k: &str, from: u64| {
            Req::Refresh(kvpb::RefreshRequest {
                key: k.into(),
                end_key: Vec::new(),
                from: Some(ts(from).into()),
            })
        };
        // Read at 10, now at 20: d was written at 15 in between.
        let t = txn(4, "b", 20, 20);
        assert!(matches!(
            run(&e, Some(&t), vec![refresh("d", 10)], 20),
            Err(EvalError::Txn(_))
        ));
        // From 15 on, nothing new.
        run(&e, Some(&t), vec![refresh("d", 15)], 20).unwrap();
        // Its own intent is no change; another transaction's is.
        run(
            &e,
            Some(&t),
            vec![
                Req::HeartbeatTxn(kvpb::HeartbeatTxnRequest { key: "b".into() }),
                put("e", "mine"),
            ],
            20,
        )
        .unwrap();
        run(&e, Some(&t), vec![refresh("e", 10)], 20).unwrap();
        let other = txn(5, "f", 30, 30);
        let t2 = txn(4, "b", 40, 40);
        run(&e, Some(&other), vec![put("f", "theirs")], 30).unwrap();
        assert!(matches!(
            run(&e, Some(&t2), vec![refresh("f", 10)], 40),
            Err(EvalError::Txn(_))
        ));
    }

    #[test]
    fn a_push_aborts_only_an_expired_or_sacrificed_pushee() {
        let (_d, e) = engine();
        let t = txn(6, "b", 10, 10);
        run(
            &e,
            Some(&t),
            vec![
                Req::HeartbeatTxn(kvpb::HeartbeatTxnRequest { key: "b".into() }),
                put("b", "1"),
            ],
            10,
        )
        .unwrap();
        let push = |force| {
            Req::PushTxn(kvpb::PushTxnRequest {
                key: "b".into(),
                pushee: Some(kvpb::TxnMeta {
                    id: vec![6; 16],
                    key: "b".into(),
                    epoch: 0,
                    write_timestamp: Some(ts(10).into()),
                }),
                force,
                ..Default::default()
            })
        };
        let status = |r: &[Resp]| match &r[0] {
            Resp::PushTxn(p) => TxnStatus::try_from(p.status).unwrap(),
            other => panic!("{other:?}"),
        };
        // Heartbeat at 10: alive at 12, expired after 15.
        assert_eq!(
            status(&run(&e, None, vec![push(false)], 12).unwrap().0),
            TxnStatus::Pending
        );
        let (r, fin) = run(&e, None, vec![push(false)], 16).unwrap();
        assert_eq!(status(&r), TxnStatus::Aborted);
        assert_eq!(fin.len(), 1);
        // Aborted is final: the heartbeat and the commit are refused.
        let hb = run(
            &e,
            Some(&t),
            vec![Req::HeartbeatTxn(kvpb::HeartbeatTxnRequest { key: "b".into() })],
            16,
        );
        assert!(matches!(hb, Err(EvalError::Txn(ref x)) if x.kind == kvpb::txn_error::Kind::Aborted as i32));
        assert!(matches!(
            run(&e, Some(&t), vec![end("b", true, &["b"], false)], 16),
            Err(EvalError::Txn(_))
        ));
        // A live transaction is aborted only when forced (a deadlock).
        let t2 = txn(7, "c", 20, 20);
        run(
            &e,
            Some(&t2),
            vec![Req::HeartbeatTxn(kvpb::HeartbeatTxnRequest { key: "c".into() })],
            20,
        )
        .unwrap();
        let push2 = |force| {
            Req::PushTxn(kvpb::PushTxnRequest {
                key: "c".into(),
                pushee: Some(kvpb::TxnMeta {
                    id: vec![7; 16],
                    key: "c".into(),
                    epoch: 0,
                    write_timestamp: Some(ts(20).into()),
                }),
                force,
                ..Default::default()
            })
        };
        assert_eq!(
            status(&run(&e, None, vec![push2(false)], 21).unwrap().0),
            TxnStatus::Pending
        );
        assert_eq!(
            status(&run(&e, None, vec![push2(true)], 21).unwrap().0),
            TxnStatus::Aborted
        );
        // No record and a fresh intent: alive; an old one: aborted.
        let missing = |at| {
            Req::PushTxn(kvpb::PushTxnRequest {
                key: "d".into(),
                pushee: Some(kvpb::TxnMeta {
                    id: vec![8; 16],
                    key: "d".into(),
                    epoch: 0,
                    write_timestamp: Some(ts(at).into()),
                }),
                ..Default::default()
            })
        };
        assert_eq!(
            status(&run(&e, None, vec![missing(30)], 31).unwrap().0),
            TxnStatus::Pending
        );
        assert_eq!(
            status(&run(&e, None, vec![missing(30)], 40).unwrap().0),
            TxnStatus::Aborted
        );
    }

    #[test]
    fn resolving_a_span_commits_or_removes_only_that_transactions_intents() {
        let (_d, e) = engine();
        let a = txn(9, "b", 10, 10);
        let b = txn(10, "h", 10, 10);
        run(&e, Some(&a), vec![put("b", "a1"), put("c", "a2")], 10).unwrap();
        run(&e, Some(&b), vec![put("h", "b1")], 10).unwrap();
        let resolve = |id: u8, status: TxnStatus| {
            Req::ResolveIntent(kvpb::ResolveIntentRequest {
                key: "a".into(),
                end_key: "m".into(),
                txn_id: vec![id; 16],
                epoch: 0,
                status: status as i32,
                commit_timestamp: Some(ts(11).into()),
            })
        };
        let (r, _) = run(&e, None, vec![resolve(9, TxnStatus::Committed)], 12).unwrap();
        assert!(matches!(
            r[0],
            Resp::ResolveIntent(kvpb::ResolveIntentResponse { resolved: 2, .. })
        ));
        assert_eq!(value(&e, "c", 12).unwrap().as_deref(), Some("a2"));
        assert!(
            matches!(value(&e, "h", 12), Err(EvalError::Conflict(_))),
            "b's intent stays"
        );
        run(&e, None, vec![resolve(10, TxnStatus::Aborted)], 12).unwrap();
        assert_eq!(value(&e, "h", 12).unwrap(), None);
        // Resolving as pending is refused.
        assert!(matches!(
            run(&e, None, vec![resolve(10, TxnStatus::Pending)], 12),
            Err(EvalError::Refused(_))
        ));
    }
}
