//! etcd's leases: the replicated records (which leases exist, the TTL each
//! was granted, which keys are attached to each) and the leaseholder's
//! expiry clock.
//!
//! The records are range-local state of the etcd range, written in the same
//! batch as the key-values they describe, so a snapshot carries them and a
//! restart never sees one without the other:
//!
//! ```text
//! range-local 'L' ++ id           -> the lease's granted TTL
//! range-local 'K' ++ id ++ key    -> (empty): `key` is attached to the lease
//! ```
//!
//! Only the leaseholder of the etcd range keeps time for leases, on its
//! monotonic clock ([`Lessor`]); a grant, a revoke and an expiry are raft
//! commands. When the lease of the range moves (a new raft term), the new
//! holder starts every lease afresh at its full TTL before it may expire any
//! (etcd's rule: a failover never expires a lease whose owner kept it
//! alive). A keep-alive touches only the leaseholder's clock, never raft.
//!
//! This module never talks to the network or raft and never reads a clock
//! itself: callers pass `now`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use storage::{keys, Batch, Cf, Reader};

use crate::etcd::{EtcdError, EtcdFailure};
use crate::keyspace::ETCD_RANGE_ID;

/// etcd's minimum TTL with its default timing (1.5 election timeouts of
/// 1 s, rounded up): shorter grants are raised to it.
pub const MIN_TTL: i64 = 2;
/// etcd's `MaxLeaseTTL`: longer grants are refused.
pub const MAX_TTL: i64 = 9_000_000_000;

const LEASE_SUFFIX: u8 = b'L';
const ATTACH_SUFFIX: u8 = b'K';

fn id_bytes(id: i64) -> [u8; 8] {
    // Sign bit flipped: keys sort in numeric order.
    ((id as u64) ^ (1 << 63)).to_be_bytes()
}

fn id_from(b: &[u8]) -> Option<i64> {
    let a: [u8; 8] = b.get(..8)?.try_into().ok()?;
    Some((u64::from_be_bytes(a) ^ (1 << 63)) as i64)
}

fn prefix(suffix: u8) -> Vec<u8> {
    keys::range_local_key(ETCD_RANGE_ID, suffix)
}

fn upper(mut p: Vec<u8>) -> Vec<u8> {
    // No key of ours has 0xFF.. after the prefix's last byte: ids are 8
    // bytes, so bump the prefix instead.
    if let Some(last) = p.last_mut() {
        *last += 1;
    }
    p
}

fn record_key(id: i64) -> Vec<u8> {
    let mut k = prefix(LEASE_SUFFIX);
    k.extend_from_slice(&id_bytes(id));
    k
}

fn attach_key(id: i64, key: &[u8]) -> Vec<u8> {
    let mut k = prefix(ATTACH_SUFFIX);
    k.extend_from_slice(&id_bytes(id));
    k.extend_from_slice(key);
    k
}

fn decode_ttl(b: &[u8]) -> Result<i64, EtcdFailure> {
    match b {
        [1, rest @ ..] if rest.len() == 8 => {
            let mut a = [0u8; 8];
            a.copy_from_slice(rest);
            Ok(i64::from_be_bytes(a))
        }
        _ => Err(EtcdFailure::Corrupt(format!("lease record of {} bytes", b.len()))),
    }
}

/// The TTL lease `id` was granted, if it exists.
pub fn granted_ttl(r: &dyn Reader, id: i64) -> Result<Option<i64>, EtcdFailure> {
    match r.get(Cf::Local, &record_key(id)).map_err(EtcdFailure::Engine)? {
        Some(b) => Ok(Some(decode_ttl(&b)?)),
        None => Ok(None),
    }
}

/// Every lease with its granted TTL, in id order.
pub fn all(r: &dyn Reader) -> Result<Vec<(i64, i64)>, EtcdFailure> {
    let lo = prefix(LEASE_SUFFIX);
    let hi = upper(lo.clone());
    let mut c = r.cursor(Cf::Local, &lo, Some(&hi)).map_err(EtcdFailure::Engine)?;
    c.seek_ge(&lo).map_err(EtcdFailure::Engine)?;
    let mut out = Vec::new();
    while let Some((k, v)) = c.entry() {
        let id = id_from(&k[lo.len()..]).ok_or_else(|| EtcdFailure::Corrupt(format!("lease key {k:?}")))?;
        out.push((id, decode_ttl(v)?));
        c.next().map_err(EtcdFailure::Engine)?;
    }
    Ok(out)
}

/// The keys attached to lease `id`, in key order.
pub fn keys_of(r: &dyn Reader, id: i64) -> Result<Vec<Vec<u8>>, EtcdFailure> {
    let mut lo = prefix(ATTACH_SUFFIX);
    lo.extend_from_slice(&id_bytes(id));
    let hi = match id.checked_add(1) {
        Some(next) => {
            let mut h = prefix(ATTACH_SUFFIX);
            h.extend_from_slice(&id_bytes(next));
            h
        }
        None => upper(prefix(ATTACH_SUFFIX)),
    };
    let mut c = r.cursor(Cf::Local, &lo, Some(&hi)).map_err(EtcdFailure::Engine)?;
    c.seek_ge(&lo).map_err(EtcdFailure::Engine)?;
    let mut out = Vec::new();
    while let Some((k, _)) = c.entry() {
        out.push(k[lo.len()..].to_vec());
        c.next().map_err(EtcdFailure::Engine)?;
    }
    Ok(out)
}

/// Records a grant; refused if the lease exists or the TTL is too long.
/// Returns the TTL granted (raised to [`MIN_TTL`]).
pub fn grant(b: &mut Batch, id: i64, ttl: i64) -> Result<i64, EtcdFailure> {
    if id == 0 {
        return Err(EtcdError::LeaseNotFound(0).into());
    }
    if ttl > MAX_TTL {
        return Err(EtcdError::LeaseTtlTooLarge.into());
    }
    if granted_ttl(&*b, id)?.is_some() {
        return Err(EtcdError::LeaseExists.into());
    }
    let ttl = ttl.max(MIN_TTL);
    let mut v = vec![1u8];
    v.extend_from_slice(&ttl.to_be_bytes());
    b.put(Cf::Local, &record_key(id), &v).map_err(EtcdFailure::Engine)?;
    Ok(ttl)
}

/// Removes the record of lease `id` (its keys are deleted by the caller).
pub fn remove(b: &mut Batch, id: i64) -> Result<(), EtcdFailure> {
    b.delete(Cf::Local, &record_key(id)).map_err(EtcdFailure::Engine)
}

/// Attaches `key` to lease `id`.
pub fn attach(b: &mut Batch, id: i64, key: &[u8]) -> Result<(), EtcdFailure> {
    b.put(Cf::Local, &attach_key(id, key), &[]).map_err(EtcdFailure::Engine)
}

/// Detaches `key` from lease `id`.
pub fn detach(b: &mut Batch, id: i64, key: &[u8]) -> Result<(), EtcdFailure> {
    b.delete(Cf::Local, &attach_key(id, key)).map_err(EtcdFailure::Engine)
}

/// The leaseholder's clock for leases: when each lease expires, on this
/// node's monotonic clock, as of the raft term it holds the range's lease
/// in. A lease it has not timed yet in this term expires its full TTL from
/// the first look: so a new leaseholder extends every lease by its TTL.
#[derive(Debug, Default)]
pub struct Lessor {
    term: u64,
    deadlines: HashMap<i64, Instant>,
}

impl Lessor {
    /// Forgets every deadline if the range's lease is now held in another term.
    fn at_term(&mut self, term: u64) {
        if self.term != term {
            self.term = term;
            self.deadlines.clear();
        }
    }

    /// When lease `id` (granted `ttl` seconds) expires.
    pub fn deadline(&mut self, term: u64, id: i64, ttl: i64, now: Instant) -> Instant {
        self.at_term(term);
        *self.deadlines.entry(id).or_insert_with(|| now + secs(ttl))
    }

    /// A keep-alive: lease `id` expires `ttl` from now. Refused (false) if
    /// it has expired already: an expired lease is not revived.
    pub fn renew(&mut self, term: u64, id: i64, ttl: i64, now: Instant) -> bool {
        let d = self.deadline(term, id, ttl, now);
        if d <= now {
            return false;
        }
        self.deadlines.insert(id, now + secs(ttl));
        true
    }

    /// Whole seconds left of lease `id`, rounded up as etcd rounds them.
    pub fn remaining(&mut self, term: u64, id: i64, ttl: i64, now: Instant) -> i64 {
        let d = self.deadline(term, id, ttl, now);
        let left = d.saturating_duration_since(now);
        (left.as_millis() as i64 + 999) / 1000
    }

    /// Forgets lease `id` (revoked).
    pub fn forget(&mut self, id: i64) {
        self.deadlines.remove(&id);
    }

    /// Of `leases` (id, granted TTL), those expired at `now`.
    pub fn expired(&mut self, term: u64, leases: &[(i64, i64)], now: Instant) -> Vec<i64> {
        self.at_term(term);
        let live: std::collections::HashSet<i64> = leases.iter().map(|l| l.0).collect();
        self.deadlines.retain(|id, _| live.contains(id));
        leases
            .iter()
            .filter(|&&(id, ttl)| self.deadline(term, id, ttl, now) <= now)
            .map(|l| l.0)
            .collect()
    }
}

fn secs(ttl: i64) -> Duration {
    Duration::from_secs(ttl.clamp(0, MAX_TTL) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_term_extends_every_lease_by_its_ttl() {
        let t0 = Instant::now();
        let mut l = Lessor::default();
        assert_eq!(l.remaining(1, 7, 10, t0), 10);
        let t9 = t0 + Duration::from_secs(9);
        assert!(l.expired(1, &[(7, 10)], t9).is_empty());
        let t11 = t0 + Duration::from_secs(11);
        assert_eq!(l.expired(1, &[(7, 10)], t11), vec![7]);
        // An expired lease is not revived by a keep-alive in the same term...
        assert!(!l.renew(1, 7, 10, t11));
        // ...but a new holder (term 2) starts it afresh.
        assert!(l.expired(2, &[(7, 10)], t11).is_empty());
        assert!(l.renew(2, 7, 10, t11 + Duration::from_secs(5)));
        assert_eq!(l.remaining(2, 7, 10, t11 + Duration::from_secs(6)), 9);
    }

    #[test]
    fn ids_sort_numerically() {
        for (a, b) in [(-5i64, 3i64), (1, 2), (i64::MIN, i64::MAX), (-2, -1)] {
            assert!(id_bytes(a) < id_bytes(b));
            assert_eq!(id_from(&id_bytes(a)), Some(a));
        }
    }
}
