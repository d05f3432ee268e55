//! Reading the engine: the `Reader` and `Cursor` traits that MVCC, the raft log
//! and snapshots are written against, and their RocksDB implementation.
//!
//! A `Reader` is the latest state of the engine, a point-in-time snapshot, or a
//! batch being built (its own writes over the engine). Code above reads only
//! through these traits, so it runs unchanged over any of them.

use crate::engine::Cf;
use crate::error::Result;

/// Point reads and bounded cursors over one column family.
pub trait Reader {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>>;
    /// A cursor over keys in `[lower, upper)` (`upper == None`: unbounded).
    fn cursor(&self, cf: Cf, lower: &[u8], upper: Option<&[u8]>) -> Result<Box<dyn Cursor + '_>>;
}

/// A position in a sorted key space. After `seek_ge` it may step forward with
/// `next`; after `seek_lt` it holds one entry and is re-positioned by another seek.
pub trait Cursor {
    /// Positions at the first key `>= key` within the bounds.
    fn seek_ge(&mut self, key: &[u8]) -> Result<()>;
    /// Positions at the last key `< key` within the bounds.
    fn seek_lt(&mut self, key: &[u8]) -> Result<()>;
    /// Positions at the last key within the bounds.
    fn seek_last(&mut self) -> Result<()>;
    /// Steps to the next key after a `seek_ge` or `next`.
    fn next(&mut self) -> Result<()>;
    /// The current entry, or `None` once the cursor left its bounds.
    fn entry(&self) -> Option<(&[u8], &[u8])>;
}

/// A cursor over a RocksDB raw iterator, enforcing both bounds itself.
pub(crate) struct RocksCursor<'a> {
    pub(crate) it: rocksdb::DBRawIteratorWithThreadMode<'a, rocksdb::DB>,
    pub(crate) lower: Vec<u8>,
    pub(crate) upper: Option<Vec<u8>>,
}

impl RocksCursor<'_> {
    fn in_bounds(&self) -> bool {
        match self.it.key() {
            None => false,
            Some(k) => k >= &self.lower[..] && self.upper.as_deref().is_none_or(|u| k < u),
        }
    }
}

impl Cursor for RocksCursor<'_> {
    fn seek_ge(&mut self, key: &[u8]) -> Result<()> {
        if key < &self.lower[..] {
            let lower = self.lower.clone();
            self.it.seek(&lower);
        } else {
            self.it.seek(key);
        }
        self.it.status()?;
        Ok(())
    }

    fn seek_lt(&mut self, key: &[u8]) -> Result<()> {
        let target: &[u8] = match &self.upper {
            Some(u) if key > &u[..] => u,
            _ => key,
        };
        let target = target.to_vec();
        self.it.seek_for_prev(&target);
        if self.it.valid() && self.it.key() == Some(&target[..]) {
            self.it.prev();
        }
        self.it.status()?;
        Ok(())
    }

    fn seek_last(&mut self) -> Result<()> {
        match self.upper.clone() {
            Some(u) => self.seek_lt(&u),
            None => {
                self.it.seek_to_last();
                self.it.status()?;
                Ok(())
            }
        }
    }

    fn next(&mut self) -> Result<()> {
        if self.it.valid() {
            self.it.next();
        }
        self.it.status()?;
        Ok(())
    }

    fn entry(&self) -> Option<(&[u8], &[u8])> {
        if !self.in_bounds() {
            return None;
        }
        Some((self.it.key()?, self.it.value()?))
    }
}
