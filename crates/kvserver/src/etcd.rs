//! etcd's v3 KV semantics over the MVCC engine, for the range that holds the
//! etcd keyspace.
//!
//! Writes are evaluated when their raft entry is applied, in log order, as
//! etcd does: that alone serializes every request on the same keys (two
//! compare-and-swaps of one key cannot both succeed against the same old
//! value). A write's revision is `max(last revision + 1, the proposer's HLC wall
//! nanoseconds)`, so revisions are strictly increasing but not dense; the MVCC
//! timestamp of every version it writes is that revision. Reads are MVCC reads
//! at a revision. This module never talks to the network or to raft.

use std::collections::BTreeSet;

use prost::Message as _;
use proto::etcdserverpb::{
    compare, range_request, request_op, response_op, CompactionRequest, Compare, DeleteRangeRequest,
    DeleteRangeResponse, LeaseGrantRequest, LeaseGrantResponse, LeaseRevokeRequest, LeaseRevokeResponse, PutRequest,
    PutResponse, RangeRequest, RangeResponse, RequestOp, ResponseHeader, ResponseOp, TxnRequest, TxnResponse,
};
use proto::mvccpb::KeyValue;
use storage::mvcc::{self, MvccStats, ReadOptions, ScanOptions};
use storage::{Batch, Reader, Timestamp};

use crate::etcd_lease;
use crate::keyspace::{etcd_key, etcd_span_end, ETCD_PREFIX};

/// etcd's own limits.
pub const MAX_TXN_OPS: usize = 128;
pub const MAX_REQUEST_BYTES: usize = 1536 * 1024;

/// etcd's errors, with etcd's messages (clients match on them).
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("etcdserver: key is not provided")]
    EmptyKey,
    #[error("etcdserver: mvcc: required revision is a future revision")]
    FutureRev,
    #[error("etcdserver: mvcc: required revision has been compacted")]
    Compacted,
    #[error("etcdserver: duplicate key given in txn request")]
    DuplicateKey,
    #[error("etcdserver: too many operations in txn request")]
    TooManyOps,
    #[error("etcdserver: request is too large")]
    TooLarge,
    #[error("etcdserver: requested lease not found")]
    LeaseNotFound(i64),
    #[error("etcdserver: lease already exists")]
    LeaseExists,
    #[error("etcdserver: too large lease TTL")]
    LeaseTtlTooLarge,
    #[error("etcdserver: value is provided")]
    ValueProvided,
    #[error("etcdserver: lease is provided")]
    LeaseProvided,
    #[error("etcdserver: key not found")]
    KeyNotFound,
    #[error("etcdserver: request timed out")]
    Timeout,
    /// The MVCC layer refused the write (a case etcd's checks do not
    /// foresee): applied as a no-op on every replica.
    #[error("etcdserver: {0}")]
    Refused(String),
}

/// Why an etcd operation did not produce an answer: etcd's rules refused it
/// (a definite answer; a write refused this way is applied as a no-op on
/// every replica alike), or the engine failed or holds bytes it cannot read
/// (nothing may be concluded: a write must not be taken as applied, and the
/// store must stop applying rather than diverge from its peers).
#[derive(Debug, thiserror::Error)]
pub enum EtcdFailure {
    #[error(transparent)]
    Refused(#[from] EtcdError),
    #[error("storage: {0}")]
    Engine(storage::Error),
    #[error("corrupt etcd record: {0}")]
    Corrupt(String),
}

impl From<storage::Error> for EtcdFailure {
    /// The engine failing, or bytes it cannot read, stop the store; an MVCC
    /// answer (a version at or above the write, an intent, an argument it
    /// refuses) is a function of the replicated state alone, so every
    /// replica meets it alike and the write is refused, never fatal: no
    /// request may stop a store.
    fn from(e: storage::Error) -> Self {
        use storage::Error as E;
        match e {
            E::Engine(_) | E::Io(_) | E::Corruption { .. } => EtcdFailure::Engine(e),
            E::WriteTooOld { .. }
            | E::WriteIntent { .. }
            | E::ReadWithinUncertainty { .. }
            | E::TxnState(_)
            | E::LogCompacted { .. }
            | E::LogUnavailable { .. }
            | E::InvalidArgument(_) => EtcdFailure::Refused(EtcdError::Refused(e.to_string())),
        }
    }
}

/// gRPC status codes (as numbers: this crate does not speak gRPC).
pub mod grpc_code {
    pub const INVALID_ARGUMENT: i32 = 3;
    pub const NOT_FOUND: i32 = 5;
    pub const FAILED_PRECONDITION: i32 = 9;
    pub const ABORTED: i32 = 10;
    pub const OUT_OF_RANGE: i32 = 11;
    pub const INTERNAL: i32 = 13;
    pub const UNAVAILABLE: i32 = 14;
}

impl EtcdError {
    /// The gRPC status code etcd answers this error with.
    pub fn grpc_code(&self) -> i32 {
        match self {
            EtcdError::EmptyKey
            | EtcdError::DuplicateKey
            | EtcdError::TooManyOps
            | EtcdError::TooLarge
            | EtcdError::KeyNotFound
            | EtcdError::ValueProvided
            | EtcdError::LeaseProvided => grpc_code::INVALID_ARGUMENT,
            EtcdError::FutureRev | EtcdError::Compacted | EtcdError::LeaseTtlTooLarge => grpc_code::OUT_OF_RANGE,
            EtcdError::LeaseNotFound(_) => grpc_code::NOT_FOUND,
            EtcdError::LeaseExists => grpc_code::FAILED_PRECONDITION,
            EtcdError::Timeout => grpc_code::UNAVAILABLE,
            EtcdError::Refused(_) => grpc_code::INTERNAL,
        }
    }
}

/// The revision state of the etcd range, persisted with the data it describes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RevState {
    /// The revision of the last write applied.
    pub rev: i64,
    /// Reads below this revision are refused (etcd's compacted error).
    pub compact_rev: i64,
}

impl RevState {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(17);
        v.push(1);
        v.extend_from_slice(&self.rev.to_be_bytes());
        v.extend_from_slice(&self.compact_rev.to_be_bytes());
        v
    }

    pub fn decode(b: &[u8]) -> Result<RevState, EtcdFailure> {
        if b.len() != 17 || b[0] != 1 {
            return Err(EtcdFailure::Corrupt(format!("revision state of {} bytes", b.len())));
        }
        let mut r = [0u8; 8];
        r.copy_from_slice(&b[1..9]);
        let mut c = [0u8; 8];
        c.copy_from_slice(&b[9..17]);
        Ok(RevState {
            rev: i64::from_be_bytes(r),
            compact_rev: i64::from_be_bytes(c),
        })
    }
}

fn ts(rev: i64) -> Timestamp {
    Timestamp::new(rev.max(0) as u64, 0)
}

/// Checks a request before it is proposed: etcd's validation.
pub fn validate_range(r: &RangeRequest) -> Result<(), EtcdError> {
    if r.key.is_empty() {
        return Err(EtcdError::EmptyKey);
    }
    // An unknown sort order or target is accepted, as etcd accepts it: it
    // sorts nothing (order) or by key (target).
    Ok(())
}

pub fn validate_put(r: &PutRequest) -> Result<(), EtcdError> {
    if r.key.is_empty() {
        return Err(EtcdError::EmptyKey);
    }
    if r.ignore_value && !r.value.is_empty() {
        return Err(EtcdError::ValueProvided);
    }
    if r.ignore_lease && r.lease != 0 {
        return Err(EtcdError::LeaseProvided);
    }
    Ok(())
}

pub fn validate_delete(r: &DeleteRangeRequest) -> Result<(), EtcdError> {
    if r.key.is_empty() {
        return Err(EtcdError::EmptyKey);
    }
    Ok(())
}

/// etcd's checks of a transaction: sizes (nested txns share the budget of
/// operations), keys, and no key written twice on any path through it,
/// nested txns included (etcd's `checkTxnRequest` then `checkIntervals`).
pub fn validate_txn(t: &TxnRequest) -> Result<(), EtcdError> {
    check_txn_request(t, MAX_TXN_OPS)?;
    check_intervals(&t.success)?;
    check_intervals(&t.failure)?;
    Ok(())
}

fn check_txn_request(t: &TxnRequest, max_ops: usize) -> Result<(), EtcdError> {
    let opc = t.compare.len().max(t.success.len()).max(t.failure.len());
    if opc > max_ops {
        return Err(EtcdError::TooManyOps);
    }
    if t.compare.iter().any(|c| c.key.is_empty()) {
        return Err(EtcdError::EmptyKey);
    }
    for op in t.success.iter().chain(&t.failure) {
        match &op.request {
            Some(request_op::Request::RequestRange(r)) => validate_range(r)?,
            Some(request_op::Request::RequestPut(p)) => validate_put(p)?,
            Some(request_op::Request::RequestDeleteRange(d)) => validate_delete(d)?,
            Some(request_op::Request::RequestTxn(inner)) => check_txn_request(inner, max_ops - opc)?,
            None => return Err(EtcdError::KeyNotFound),
        }
    }
    Ok(())
}

/// A span deleted by a txn: `[key, range_end)` as etcd reads it.
type DelSpan = (Vec<u8>, Vec<u8>);

/// The keys `ops` put and the spans they delete, nested txns included; a
/// key put twice, or put and deleted, on one path is a duplicate. The two
/// branches of a nested txn exclude each other, so both may put one key.
fn check_intervals(ops: &[RequestOp]) -> Result<(BTreeSet<Vec<u8>>, Vec<DelSpan>), EtcdError> {
    let deleted = |dels: &[DelSpan], k: &[u8]| dels.iter().any(|(s, e)| in_range(k, s, e));
    let mut dels: Vec<DelSpan> = ops
        .iter()
        .filter_map(|op| match &op.request {
            Some(request_op::Request::RequestDeleteRange(d)) => Some((d.key.clone(), d.range_end.clone())),
            _ => None,
        })
        .collect();
    let mut puts = BTreeSet::new();
    for op in ops {
        let Some(request_op::Request::RequestTxn(t)) = &op.request else {
            continue;
        };
        let (then_puts, then_dels) = check_intervals(&t.success)?;
        let (else_puts, else_dels) = check_intervals(&t.failure)?;
        for k in &then_puts {
            if puts.contains(k) || deleted(&dels, k) {
                return Err(EtcdError::DuplicateKey);
            }
            puts.insert(k.clone());
        }
        for k in &else_puts {
            if (puts.contains(k) && !then_puts.contains(k)) || deleted(&dels, k) {
                return Err(EtcdError::DuplicateKey);
            }
            puts.insert(k.clone());
        }
        dels.extend(then_dels);
        dels.extend(else_dels);
    }
    for op in ops {
        if let Some(request_op::Request::RequestPut(p)) = &op.request {
            if puts.contains(&p.key) || deleted(&dels, &p.key) {
                return Err(EtcdError::DuplicateKey);
            }
            puts.insert(p.key.clone());
        }
    }
    Ok((puts, dels))
}

fn in_range(key: &[u8], start: &[u8], end: &[u8]) -> bool {
    if end.is_empty() {
        return key == start;
    }
    if end == [0] {
        return key >= start;
    }
    key >= start && key < end
}

/// Maps an etcd [key, range_end) to MVCC user keys; `None` for an empty range.
fn span(key: &[u8], range_end: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let start = etcd_key(key);
    if range_end.is_empty() {
        let mut end = start.clone();
        end.push(0);
        return Some((start, end));
    }
    if range_end == [0] {
        return Some((start, etcd_span_end()));
    }
    if range_end <= key {
        return None;
    }
    Some((start, etcd_key(range_end)))
}

fn decode_kv(user_key: &[u8], value: &[u8]) -> Result<KeyValue, EtcdFailure> {
    let mut kv = KeyValue::decode(value).map_err(|e| EtcdFailure::Corrupt(e.to_string()))?;
    kv.key = user_key
        .strip_prefix(ETCD_PREFIX)
        .ok_or_else(|| EtcdFailure::Corrupt(format!("key {user_key:?} outside the etcd keyspace")))?
        .to_vec();
    Ok(kv)
}

/// Every live key-value in `[start, end)` at `rev`, in key order.
fn scan_at(r: &dyn Reader, start: &[u8], end: &[u8], rev: i64, max_keys: usize) -> Result<Vec<KeyValue>, EtcdFailure> {
    let res = mvcc::scan(
        r,
        &ScanOptions {
            start: start.to_vec(),
            end: end.to_vec(),
            read: ReadOptions::at(ts(rev)),
            max_keys,
            reverse: false,
        },
    )?;
    res.kvs.iter().map(|kv| decode_kv(&kv.key, &kv.value)).collect()
}

fn get_at(r: &dyn Reader, key: &[u8], rev: i64) -> Result<Option<KeyValue>, EtcdFailure> {
    let k = etcd_key(key);
    match mvcc::get(r, &k, &ReadOptions::at(ts(rev)))? {
        Some(kv) => Ok(Some(decode_kv(&k, &kv.value)?)),
        None => Ok(None),
    }
}

/// The revision a Range reads at: `r.revision`, or `current` if not
/// positive; refused above `current` or below the compaction point.
fn read_revision(r: &RangeRequest, state: &RevState) -> Result<i64, EtcdError> {
    let rev = if r.revision <= 0 { state.rev } else { r.revision };
    if rev > state.rev {
        return Err(EtcdError::FutureRev);
    }
    if rev < state.compact_rev {
        return Err(EtcdError::Compacted);
    }
    Ok(rev)
}

/// Range, as etcd answers it: at `r.revision` (or `current` if not positive).
pub fn range(reader: &dyn Reader, state: &RevState, r: &RangeRequest) -> Result<RangeResponse, EtcdFailure> {
    validate_range(r)?;
    let rev = read_revision(r, state)?;
    let mut resp = RangeResponse::default();
    let Some((start, end)) = span(&r.key, &r.range_end) else {
        return Ok(resp);
    };
    let mut kvs = scan_at(reader, &start, &end, rev, 0)?;
    resp.count = kvs.len() as i64;
    kvs.retain(|kv| {
        (r.min_mod_revision == 0 || kv.mod_revision >= r.min_mod_revision)
            && (r.max_mod_revision == 0 || kv.mod_revision <= r.max_mod_revision)
            && (r.min_create_revision == 0 || kv.create_revision >= r.min_create_revision)
            && (r.max_create_revision == 0 || kv.create_revision <= r.max_create_revision)
    });
    use range_request::{SortOrder, SortTarget};
    let target = SortTarget::try_from(r.sort_target).unwrap_or(SortTarget::Key);
    let mut order = SortOrder::try_from(r.sort_order).unwrap_or(SortOrder::None);
    if target != SortTarget::Key && order == SortOrder::None {
        order = SortOrder::Ascend;
    } else if target == SortTarget::Key && order == SortOrder::Ascend {
        order = SortOrder::None; // already in key order
    }
    if order != SortOrder::None {
        // Stable sorts on the target keep key order among equals, as etcd's do.
        match target {
            SortTarget::Key => kvs.sort_by(|a, b| a.key.cmp(&b.key)),
            SortTarget::Version => kvs.sort_by_key(|kv| kv.version),
            SortTarget::Create => kvs.sort_by_key(|kv| kv.create_revision),
            SortTarget::Mod => kvs.sort_by_key(|kv| kv.mod_revision),
            SortTarget::Value => kvs.sort_by(|a, b| a.value.cmp(&b.value)),
        }
        if order == SortOrder::Descend {
            kvs.reverse();
        }
    }
    if r.limit > 0 && kvs.len() > r.limit as usize {
        kvs.truncate(r.limit as usize);
        // A count alone is exact and returns no keys: nothing more to fetch
        // (etcd answers `more: false`).
        resp.more = !r.count_only;
    }
    if r.count_only {
        kvs.clear();
    } else if r.keys_only {
        for kv in &mut kvs {
            kv.value.clear();
        }
    }
    resp.kvs = kvs;
    Ok(resp)
}

/// A write in progress: the revision it will get, assigned at its first write.
struct Writer<'a> {
    batch: &'a mut Batch,
    stats: &'a mut MvccStats,
    state: &'a mut RevState,
    hlc_wall: u64,
    rev: Option<i64>,
    /// The keys this write changed, in order (the revision's history).
    changed: Vec<Vec<u8>>,
}

impl Writer<'_> {
    fn rev(&mut self) -> i64 {
        if let Some(r) = self.rev {
            return r;
        }
        let r = (self.state.rev + 1).max(self.hlc_wall.min(i64::MAX as u64) as i64);
        self.rev = Some(r);
        r
    }

    /// The revision reads inside this write see: its own writes included.
    fn read_rev(&self) -> i64 {
        self.rev.unwrap_or(self.state.rev)
    }

    fn put(&mut self, p: &PutRequest) -> Result<PutResponse, EtcdFailure> {
        let prev = get_at(&*self.batch, &p.key, self.read_rev())?;
        if (p.ignore_value || p.ignore_lease) && prev.is_none() {
            return Err(EtcdError::KeyNotFound.into());
        }
        let old_lease = prev.as_ref().map_or(0, |kv| kv.lease);
        let lease = if p.ignore_lease { old_lease } else { p.lease };
        if lease != 0 && etcd_lease::granted_ttl(&*self.batch, lease)?.is_none() {
            return Err(EtcdError::LeaseNotFound(lease).into());
        }
        let rev = self.rev();
        if old_lease != lease {
            if old_lease != 0 {
                etcd_lease::detach(self.batch, old_lease, &p.key)?;
            }
            if lease != 0 {
                etcd_lease::attach(self.batch, lease, &p.key)?;
            }
        }
        self.changed.push(p.key.clone());
        let value = if p.ignore_value {
            prev.as_ref().map(|kv| kv.value.clone()).unwrap_or_default()
        } else {
            p.value.clone()
        };
        let (create, version) = match &prev {
            Some(kv) => (kv.create_revision, kv.version + 1),
            None => (rev, 1),
        };
        let stored = KeyValue {
            key: Vec::new(),
            create_revision: create,
            mod_revision: rev,
            version,
            value,
            lease,
        };
        mvcc::put(
            self.batch,
            self.stats,
            &etcd_key(&p.key),
            ts(rev),
            Some(&stored.encode_to_vec()),
            None,
        )?;
        Ok(PutResponse {
            header: Some(rev_header(rev)),
            prev_kv: if p.prev_kv { prev } else { None },
        })
    }

    fn delete(&mut self, d: &DeleteRangeRequest) -> Result<DeleteRangeResponse, EtcdFailure> {
        // Deleting nothing answers the revision as it is (the txn's new one
        // if it wrote before), as etcd does.
        let mut resp = DeleteRangeResponse {
            header: Some(rev_header(self.read_rev())),
            ..Default::default()
        };
        let Some((start, end)) = span(&d.key, &d.range_end) else {
            return Ok(resp);
        };
        let doomed = scan_at(&*self.batch, &start, &end, self.read_rev(), 0)?;
        if doomed.is_empty() {
            return Ok(resp);
        }
        let rev = self.rev();
        for kv in &doomed {
            mvcc::delete(self.batch, self.stats, &etcd_key(&kv.key), ts(rev), None)?;
            if kv.lease != 0 {
                etcd_lease::detach(self.batch, kv.lease, &kv.key)?;
            }
            self.changed.push(kv.key.clone());
        }
        resp.deleted = doomed.len() as i64;
        resp.header = Some(rev_header(rev));
        if d.prev_kv {
            resp.prev_kvs = doomed;
        }
        Ok(resp)
    }

    fn compare(&self, c: &Compare) -> Result<bool, EtcdFailure> {
        let kvs: Vec<KeyValue> = if c.range_end.is_empty() {
            get_at(&*self.batch, &c.key, self.read_rev())?.into_iter().collect()
        } else {
            match span(&c.key, &c.range_end) {
                Some((s, e)) => scan_at(&*self.batch, &s, &e, self.read_rev(), 0)?,
                None => Vec::new(),
            }
        };
        use compare::{CompareResult, CompareTarget, TargetUnion};
        let result = CompareResult::try_from(c.result).unwrap_or(CompareResult::Equal);
        let target = CompareTarget::try_from(c.target).unwrap_or(CompareTarget::Version);
        let check = |kv: Option<&KeyValue>| -> bool {
            let ord = match (target, &c.target_union) {
                (CompareTarget::Value, Some(TargetUnion::Value(v))) => match kv {
                    Some(kv) => kv.value.as_slice().cmp(v.as_slice()),
                    None => return false, // a missing key has no value to compare
                },
                (CompareTarget::Version, Some(TargetUnion::Version(v))) => kv.map_or(0, |k| k.version).cmp(v),
                (CompareTarget::Create, Some(TargetUnion::CreateRevision(v))) => {
                    kv.map_or(0, |k| k.create_revision).cmp(v)
                }
                (CompareTarget::Mod, Some(TargetUnion::ModRevision(v))) => kv.map_or(0, |k| k.mod_revision).cmp(v),
                (CompareTarget::Lease, Some(TargetUnion::Lease(v))) => kv.map_or(0, |k| k.lease).cmp(v),
                // A compare with no value for its target compares against zero.
                (CompareTarget::Value, _) => match kv {
                    Some(kv) => kv.value.as_slice().cmp(&[][..]),
                    None => return false,
                },
                (_, _) => {
                    let v = match target {
                        CompareTarget::Version => kv.map_or(0, |k| k.version),
                        CompareTarget::Create => kv.map_or(0, |k| k.create_revision),
                        CompareTarget::Mod => kv.map_or(0, |k| k.mod_revision),
                        _ => kv.map_or(0, |k| k.lease),
                    };
                    v.cmp(&0)
                }
            };
            match result {
                CompareResult::Equal => ord.is_eq(),
                CompareResult::Greater => ord.is_gt(),
                CompareResult::Less => ord.is_lt(),
                CompareResult::NotEqual => ord.is_ne(),
            }
        };
        if c.range_end.is_empty() {
            return Ok(check(kvs.first()));
        }
        Ok(kvs.iter().all(|kv| check(Some(kv))))
    }

    fn txn(&mut self, t: &TxnRequest) -> Result<TxnResponse, EtcdFailure> {
        let mut ok = true;
        for c in &t.compare {
            if !self.compare(c)? {
                ok = false;
                break;
            }
        }
        let ops = if ok { &t.success } else { &t.failure };
        let mut responses = Vec::with_capacity(ops.len());
        for op in ops {
            responses.push(self.op(op)?);
        }
        Ok(TxnResponse {
            header: None,
            succeeded: ok,
            responses,
        })
    }

    fn op(&mut self, op: &RequestOp) -> Result<ResponseOp, EtcdFailure> {
        let response = match &op.request {
            Some(request_op::Request::RequestRange(r)) => {
                // At its own revision if it names one (checked against the
                // revision before this txn's writes, as etcd checks it), else
                // at the txn's view, its own writes included; the header
                // carries that view's revision.
                let before = RevState {
                    rev: self.state.rev,
                    compact_rev: self.state.compact_rev,
                };
                read_revision(r, &before)?;
                let view = RevState {
                    rev: self.read_rev(),
                    compact_rev: self.state.compact_rev,
                };
                let mut resp = range(&*self.batch, &view, r)?;
                resp.header = Some(rev_header(view.rev));
                Some(response_op::Response::ResponseRange(resp))
            }
            Some(request_op::Request::RequestPut(p)) => Some(response_op::Response::ResponsePut(self.put(p)?)),
            Some(request_op::Request::RequestDeleteRange(d)) => {
                Some(response_op::Response::ResponseDeleteRange(self.delete(d)?))
            }
            Some(request_op::Request::RequestTxn(t)) => Some(response_op::Response::ResponseTxn(self.txn(t)?)),
            None => None,
        };
        Ok(ResponseOp { response })
    }
}

/// A write request as carried in a raft command.
#[derive(Clone, Debug, PartialEq)]
pub enum EtcdWrite {
    Put(PutRequest),
    DeleteRange(DeleteRangeRequest),
    Txn(TxnRequest),
    Compact(CompactionRequest),
    /// A grant whose id the proposer chose (never 0).
    LeaseGrant(LeaseGrantRequest),
    /// A revoke, asked for or an expiry: the lease's keys are deleted in
    /// one revision.
    LeaseRevoke(LeaseRevokeRequest),
}

/// What a write answers: the response for the client, with the header's
/// revision set to the store's revision after it.
#[derive(Clone, Debug, PartialEq)]
pub enum EtcdWriteResponse {
    Put(PutResponse),
    DeleteRange(DeleteRangeResponse),
    Txn(TxnResponse),
    Compact,
    LeaseGrant(LeaseGrantResponse),
    LeaseRevoke(LeaseRevokeResponse),
}

/// Applies one write in log order. On error the batch may hold part of the
/// write (a transaction's; a put or delete is refused before it writes): the
/// caller discards it and `state` is left unchanged. Only `EtcdFailure::Refused` is an
/// answer; any other failure means the write could not be applied at all.
pub fn apply(
    batch: &mut Batch,
    stats: &mut MvccStats,
    state: &mut RevState,
    hlc_wall: u64,
    w: &EtcdWrite,
) -> Result<(EtcdWriteResponse, Option<i64>), EtcdFailure> {
    let mut wr = Writer {
        batch,
        stats,
        state,
        hlc_wall,
        rev: None,
        changed: Vec::new(),
    };
    let resp = match w {
        EtcdWrite::Put(p) => {
            validate_put(p)?;
            EtcdWriteResponse::Put(wr.put(p)?)
        }
        EtcdWrite::DeleteRange(d) => {
            validate_delete(d)?;
            EtcdWriteResponse::DeleteRange(wr.delete(d)?)
        }
        EtcdWrite::Txn(t) => {
            validate_txn(t)?;
            EtcdWriteResponse::Txn(wr.txn(t)?)
        }
        EtcdWrite::Compact(c) => {
            if c.revision > wr.state.rev {
                return Err(EtcdError::FutureRev.into());
            }
            if c.revision <= wr.state.compact_rev {
                return Err(EtcdError::Compacted.into());
            }
            // Keep what reads at or above the revision see; drop the rest.
            let (start, end) = (ETCD_PREFIX.to_vec(), etcd_span_end());
            mvcc::gc(wr.batch, wr.stats, &start, &end, ts(c.revision))?;
            crate::etcd_history::compact(wr.batch, c.revision)?;
            wr.state.compact_rev = c.revision;
            EtcdWriteResponse::Compact
        }
        EtcdWrite::LeaseGrant(g) => {
            let ttl = etcd_lease::grant(wr.batch, g.id, g.ttl)?;
            EtcdWriteResponse::LeaseGrant(LeaseGrantResponse {
                header: None,
                id: g.id,
                ttl,
                error: String::new(),
            })
        }
        EtcdWrite::LeaseRevoke(r) => {
            if etcd_lease::granted_ttl(&*wr.batch, r.id)?.is_none() {
                return Err(EtcdError::LeaseNotFound(r.id).into());
            }
            // Every key in one revision, as etcd deletes them.
            for key in etcd_lease::keys_of(&*wr.batch, r.id)? {
                let d = DeleteRangeRequest {
                    key,
                    ..Default::default()
                };
                wr.delete(&d)?;
            }
            etcd_lease::remove(wr.batch, r.id)?;
            EtcdWriteResponse::LeaseRevoke(LeaseRevokeResponse { header: None })
        }
    };
    let new_rev = wr.rev;
    if let Some(r) = new_rev {
        crate::etcd_history::record(wr.batch, r, &wr.changed)?;
        wr.state.rev = r;
    }
    Ok((resp, new_rev))
}

/// A header carrying only a revision; `with_header` fills in the rest.
fn rev_header(revision: i64) -> ResponseHeader {
    ResponseHeader {
        revision,
        ..Default::default()
    }
}

/// Sets the header of a write response. The operations inside a txn carry
/// only the revision each one saw (a Range before the txn's writes answers
/// the revision before them), and a nested txn's own response an empty
/// header (revision 0), as in etcd.
pub fn with_header(resp: EtcdWriteResponse, header: ResponseHeader) -> EtcdWriteResponse {
    match resp {
        EtcdWriteResponse::Put(mut p) => {
            p.header = Some(header);
            EtcdWriteResponse::Put(p)
        }
        EtcdWriteResponse::DeleteRange(mut d) => {
            d.header = Some(header);
            EtcdWriteResponse::DeleteRange(d)
        }
        EtcdWriteResponse::Txn(mut t) => {
            set_txn_headers(&mut t, &header);
            EtcdWriteResponse::Txn(t)
        }
        EtcdWriteResponse::Compact => EtcdWriteResponse::Compact,
        EtcdWriteResponse::LeaseGrant(mut g) => {
            g.header = Some(header);
            EtcdWriteResponse::LeaseGrant(g)
        }
        EtcdWriteResponse::LeaseRevoke(_) => {
            EtcdWriteResponse::LeaseRevoke(LeaseRevokeResponse { header: Some(header) })
        }
    }
}

fn set_txn_headers(t: &mut TxnResponse, header: &ResponseHeader) {
    t.header = Some(*header);
    set_op_headers(t, header);
}

fn set_op_headers(t: &mut TxnResponse, header: &ResponseHeader) {
    // Inside a txn etcd sets only the revision of each operation's header.
    let fill = |h: &mut Option<ResponseHeader>| {
        let revision = h.map_or(header.revision, |h| h.revision);
        *h = Some(rev_header(revision));
    };
    for r in &mut t.responses {
        match &mut r.response {
            Some(response_op::Response::ResponseRange(x)) => fill(&mut x.header),
            Some(response_op::Response::ResponsePut(x)) => fill(&mut x.header),
            Some(response_op::Response::ResponseDeleteRange(x)) => fill(&mut x.header),
            Some(response_op::Response::ResponseTxn(x)) => {
                // etcd sends an empty one: every field zero.
                x.header = Some(ResponseHeader::default());
                set_op_headers(x, header);
            }
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_engine_failures_and_corruption_are_fatal() {
        let fatal = |e: storage::Error| !matches!(EtcdFailure::from(e), EtcdFailure::Refused(_));
        assert!(fatal(storage::Error::Io(std::io::Error::other("disk"))));
        assert!(fatal(storage::Error::Corruption {
            what: "value",
            detail: "bad version byte".into()
        }));
        let ts = Timestamp::new(5, 0);
        assert!(!fatal(storage::Error::WriteTooOld {
            key: b"k".to_vec(),
            write_ts: ts,
            existing_ts: ts,
            retry_ts: Timestamp::new(5, 1),
        }));
        assert!(!fatal(storage::Error::InvalidArgument("empty key".into())));
    }

    #[test]
    fn duplicate_writes_are_found_through_nested_txns() {
        let put = |k: &str| RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest {
                key: k.into(),
                ..Default::default()
            })),
        };
        let del = |k: &str, end: &str| RequestOp {
            request: Some(request_op::Request::RequestDeleteRange(DeleteRangeRequest {
                key: k.into(),
                range_end: end.into(),
                ..Default::default()
            })),
        };
        let nested = |success: Vec<RequestOp>, failure: Vec<RequestOp>| RequestOp {
            request: Some(request_op::Request::RequestTxn(TxnRequest {
                compare: vec![],
                success,
                failure,
            })),
        };
        let txn = |ops: Vec<RequestOp>| TxnRequest {
            compare: vec![],
            success: ops,
            failure: vec![],
        };
        let dup = |ops| matches!(validate_txn(&txn(ops)), Err(EtcdError::DuplicateKey));
        assert!(dup(vec![put("a"), put("a")]));
        assert!(dup(vec![put("a"), nested(vec![put("a")], vec![])]));
        assert!(dup(vec![del("a", "c"), nested(vec![], vec![put("b")])]));
        assert!(dup(vec![
            nested(vec![put("a")], vec![]),
            nested(vec![put("a")], vec![])
        ]));
        assert!(dup(vec![nested(vec![del("a", "")], vec![]), put("a")]));
        // Branches of one nested txn exclude each other; deletes may overlap.
        assert!(!dup(vec![nested(vec![put("a")], vec![put("a")])]));
        assert!(!dup(vec![del("a", "c"), nested(vec![del("b", "")], vec![])]));
        assert!(!dup(vec![put("a"), nested(vec![put("b")], vec![put("c")])]));
        assert!(validate_txn(&txn(vec![put("a"), nested(vec![put("b")], vec![])])).is_ok());
    }
}
