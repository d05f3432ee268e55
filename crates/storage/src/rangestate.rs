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
}

impl From<AppliedState> for RangeAppliedState {
    fn from(a: AppliedState) -> Self {
        RangeAppliedState {
            applied_index: a.index,
            applied_term: a.term,
            stats: Some(a.stats.into()),
        }
    }
}

impl From<RangeAppliedState> for AppliedState {
    fn from(a: RangeAppliedState) -> Self {
        AppliedState {
            index: a.applied_index,
            term: a.applied_term,
            stats: a.stats.map(Into::into).unwrap_or_default(),
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

pub fn set_gc_threshold(b: &mut Batch, range_id: u64, ts: Timestamp) -> Result<()> {
    let p: proto::storage::Timestamp = ts.into();
    b.put(
        Cf::Local,
        &keys::range_gc_threshold_key(range_id),
        &prost::Message::encode_to_vec(&p),
    )
}
