//! Range-local state in the `local` column family: the applied state (applied
//! index and term, and MVCC statistics, written in the same batch as the data
//! they describe), the range descriptor and the GC threshold.

use proto::storage::{RangeAppliedState, RangeDescriptor};

use crate::batch::Batch;
use crate::cursor::Reader;
use crate::engine::Cf;
use crate::error::{Error, Result};
use crate::keys;
use crate::mvcc::MvccStats;
use crate::timestamp::Timestamp;

/// How far a replica has applied its log, and the statistics of its data then.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AppliedState {
    pub index: u64,
    pub term: u64,
    pub stats: MvccStats,
    /// The highest lease-applied index applied (see kvserver's at-most-once rule).
    pub lease_applied_index: u64,
}

impl From<AppliedState> for RangeAppliedState {
    fn from(a: AppliedState) -> Self {
        RangeAppliedState {
            applied_index: a.index,
            applied_term: a.term,
            stats: Some(a.stats.into()),
            lease_applied_index: a.lease_applied_index,
        }
    }
}

impl From<RangeAppliedState> for AppliedState {
    fn from(a: RangeAppliedState) -> Self {
        AppliedState {
            index: a.applied_index,
            term: a.applied_term,
            stats: a.stats.map(Into::into).unwrap_or_default(),
            lease_applied_index: a.lease_applied_index,
        }
    }
}

fn decode<M: prost::Message + Default>(what: &'static str, b: &[u8]) -> Result<M> {
    M::decode(b).map_err(|e| Error::corrupt(what, e.to_string()))
}

/// The applied state of `range_id` (zero if nothing was ever applied).
pub fn applied_state(r: &dyn Reader, range_id: u64) -> Result<AppliedState> {
    match r.get(Cf::Local, &keys::range_applied_state_key(range_id))? {
        None => Ok(AppliedState::default()),
        Some(b) => Ok(decode::<RangeAppliedState>("applied state", &b)?.into()),
    }
}

pub fn set_applied_state(b: &mut Batch, range_id: u64, a: AppliedState) -> Result<()> {
    let p: RangeAppliedState = a.into();
    b.put(
        Cf::Local,
        &keys::range_applied_state_key(range_id),
        &prost::Message::encode_to_vec(&p),
    )
}

pub fn descriptor(r: &dyn Reader, range_id: u64) -> Result<Option<RangeDescriptor>> {
    match r.get(Cf::Local, &keys::range_descriptor_key(range_id))? {
        None => Ok(None),
        Some(b) => Ok(Some(decode("range descriptor", &b)?)),
    }
}

/// Every range descriptor stored in the engine, by range id.
pub fn all_descriptors(r: &dyn Reader) -> Result<Vec<RangeDescriptor>> {
    let (lo, _) = keys::range_local_bounds(0);
    let hi = vec![b'r' + 1];
    let mut c = r.cursor(Cf::Local, &lo, Some(&hi))?;
    c.seek_ge(&lo)?;
    let mut out = Vec::new();
    while let Some((k, v)) = c.entry() {
        if k.len() == 10 && k[9] == keys::range_descriptor_key(0)[9] {
            out.push(decode("range descriptor", v)?);
        }
        c.next()?;
    }
    Ok(out)
}

pub fn set_descriptor(b: &mut Batch, desc: &RangeDescriptor) -> Result<()> {
    b.put(
        Cf::Local,
        &keys::range_descriptor_key(desc.range_id),
        &prost::Message::encode_to_vec(desc),
    )
}

/// The GC threshold of `range_id`: versions needed only by reads below it may be
/// gone.
pub fn gc_threshold(r: &dyn Reader, range_id: u64) -> Result<Timestamp> {
    match r.get(Cf::Local, &keys::range_gc_threshold_key(range_id))? {
        None => Ok(Timestamp::ZERO),
        Some(b) => Ok(decode::<proto::storage::Timestamp>("gc threshold", &b)?.into()),
    }
}

/// A range-local record owned by a layer above (suffixes are registered in
/// `keys::range_local_key`'s documentation).
pub fn local_record(r: &dyn Reader, range_id: u64, suffix: u8) -> Result<Option<Vec<u8>>> {
    r.get(Cf::Local, &keys::range_local_key(range_id, suffix))
}

pub fn set_local_record(b: &mut Batch, range_id: u64, suffix: u8, value: &[u8]) -> Result<()> {
    b.put(Cf::Local, &keys::range_local_key(range_id, suffix), value)
}

/// A store-local record (not tied to a range), e.g. the store's identity.
pub fn store_record(r: &dyn Reader, name: &[u8]) -> Result<Option<Vec<u8>>> {
    r.get(Cf::Local, &keys::store_local_key(name))
}

pub fn set_store_record(b: &mut Batch, name: &[u8], value: &[u8]) -> Result<()> {
    b.put(Cf::Local, &keys::store_local_key(name), value)
}

pub fn set_gc_threshold(b: &mut Batch, range_id: u64, ts: Timestamp) -> Result<()> {
    let p: proto::storage::Timestamp = ts.into();
    b.put(
        Cf::Local,
        &keys::range_gc_threshold_key(range_id),
        &prost::Message::encode_to_vec(&p),
    )
}
