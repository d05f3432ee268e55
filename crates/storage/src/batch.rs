//! Write batches that read their own writes.
//!
//! A [`Batch`] collects puts, deletes and range deletes over any column families
//! and is written atomically by [`Engine::write`]. Alongside the RocksDB batch it
//! keeps an index of its own writes, so MVCC evaluation reading through the batch
//! sees what earlier operations of the same batch wrote (RocksDB's
//! WriteBatchWithIndex is not exposed by the Rust bindings).
//!
//! A write-only batch ([`Engine::write_only_batch`]) keeps no such index: for
//! writes nothing reads before they land (a raft log append), it saves a
//! copy of every key and value; reading through it is refused.
//!
//! A batch holds no lock: callers serialise writers to the same keys.

use std::collections::BTreeMap;
use std::ops::Bound;

use rocksdb::WriteBatch;

use crate::cursor::{Cursor, Reader};
use crate::engine::{Cf, Engine};
use crate::error::Result;

type Overlay = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

/// A key and its new value (`None`: deleted).
pub type Write = (Vec<u8>, Option<Vec<u8>>);

/// An atomic group of writes, readable before it is written.
pub struct Batch {
    engine: Engine,
    wb: WriteBatch,
    overlay: [Overlay; 3],
    range_dels: [Vec<(Vec<u8>, Vec<u8>)>; 3],
    ops: usize,
    /// Write-only: no index of its own writes is kept, and reads are refused.
    write_only: bool,
}

impl Batch {
    pub(crate) fn new(engine: Engine) -> Batch {
        Batch {
            engine,
            wb: WriteBatch::default(),
            overlay: Default::default(),
            range_dels: Default::default(),
            ops: 0,
            write_only: false,
        }
    }

    pub(crate) fn new_write_only(engine: Engine) -> Batch {
        Batch {
            write_only: true,
            ..Batch::new(engine)
        }
    }

    /// The engine this batch reads through and will be written to.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn put(&mut self, cf: Cf, key: &[u8], value: &[u8]) -> Result<()> {
        self.wb.put_cf(self.engine.cf(cf)?, key, value);
        if !self.write_only {
            self.overlay[cf.idx()].insert(key.to_vec(), Some(value.to_vec()));
        }
        self.ops += 1;
        Ok(())
    }

    pub fn delete(&mut self, cf: Cf, key: &[u8]) -> Result<()> {
        self.wb.delete_cf(self.engine.cf(cf)?, key);
        if !self.write_only {
            self.overlay[cf.idx()].insert(key.to_vec(), None);
        }
        self.ops += 1;
        Ok(())
    }

    /// Deletes every key in `[from, to)`.
    pub fn delete_range(&mut self, cf: Cf, from: &[u8], to: &[u8]) -> Result<()> {
        if from >= to {
            return Ok(());
        }
        self.wb.delete_range_cf(self.engine.cf(cf)?, from, to);
        let ov = &mut self.overlay[cf.idx()];
        let doomed: Vec<Vec<u8>> = ov
            .range::<[u8], _>((Bound::Included(from), Bound::Excluded(to)))
            .map(|(k, _)| k.clone())
            .collect();
        for k in doomed {
            ov.remove(&k);
        }
        self.range_dels[cf.idx()].push((from.to_vec(), to.to_vec()));
        self.ops += 1;
        Ok(())
    }

    /// Number of operations in the batch.
    pub fn len(&self) -> usize {
        self.ops
    }

    pub fn is_empty(&self) -> bool {
        self.ops == 0
    }

    /// Size of the serialized batch in bytes.
    pub fn size_in_bytes(&self) -> usize {
        self.wb.size_in_bytes()
    }

    /// The puts (`Some`) and deletes (`None`) this batch holds for `cf`, in
    /// key order, each key once with its last write; `None` if the batch also
    /// deletes a span of `cf` (a range delete cannot be listed as keys) or
    /// is write-only.
    /// Lets a leaseholder ship what its evaluation wrote to every replica.
    pub fn writes(&self, cf: Cf) -> Option<Vec<Write>> {
        if self.write_only || !self.range_dels[cf.idx()].is_empty() {
            return None;
        }
        Some(
            self.overlay[cf.idx()]
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        )
    }

    pub(crate) fn into_write_batch(self) -> WriteBatch {
        self.wb
    }

    fn range_deleted(&self, cf: Cf, key: &[u8]) -> Option<&[u8]> {
        self.range_dels[cf.idx()]
            .iter()
            .filter(|(f, t)| key >= &f[..] && key < &t[..])
            .map(|(_, t)| &t[..])
            .max()
    }
}

impl Batch {
    fn readable(&self) -> Result<()> {
        if self.write_only {
            return Err(crate::error::Error::InvalidArgument(
                "a write-only batch cannot be read through".into(),
            ));
        }
        Ok(())
    }
}

impl Reader for Batch {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.readable()?;
        if let Some(v) = self.overlay[cf.idx()].get(key) {
            return Ok(v.clone());
        }
        if self.range_deleted(cf, key).is_some() {
            return Ok(None);
        }
        self.engine.get(cf, key)
    }

    fn cursor(&self, cf: Cf, lower: &[u8], upper: Option<&[u8]>) -> Result<Box<dyn Cursor + '_>> {
        self.readable()?;
        let base = self.engine.cursor(cf, lower, upper)?;
        if self.overlay[cf.idx()].is_empty() && self.range_dels[cf.idx()].is_empty() {
            return Ok(base);
        }
        Ok(Box::new(BatchCursor {
            batch: self,
            cf,
            base,
            lower: lower.to_vec(),
            upper: upper.map(<[u8]>::to_vec),
            cur: None,
        }))
    }
}

/// Merges a batch's own writes over a cursor of the engine.
struct BatchCursor<'a> {
    batch: &'a Batch,
    cf: Cf,
    base: Box<dyn Cursor + 'a>,
    lower: Vec<u8>,
    upper: Option<Vec<u8>>,
    cur: Option<(Vec<u8>, Vec<u8>)>,
}

impl BatchCursor<'_> {
    fn overlay(&self) -> &Overlay {
        &self.batch.overlay[self.cf.idx()]
    }

    fn in_bounds(&self, k: &[u8]) -> bool {
        k >= &self.lower[..] && self.upper.as_deref().is_none_or(|u| k < u)
    }

    /// Advances the base cursor past keys hidden by the batch's range deletes.
    fn skip_deleted_forward(&mut self) -> Result<()> {
        loop {
            let Some((k, _)) = self.base.entry() else { return Ok(()) };
            if self.overlay().contains_key(k) {
                return Ok(());
            }
            match self.batch.range_deleted(self.cf, k) {
                Some(end) => {
                    let end = end.to_vec();
                    self.base.seek_ge(&end)?;
                }
                None => return Ok(()),
            }
        }
    }
}

impl BatchCursor<'_> {
    /// Positions at the last visible key `< target` (`None`: the last key at all).
    fn seek_before(&mut self, mut target: Option<Vec<u8>>) -> Result<()> {
        loop {
            match &target {
                Some(t) => self.base.seek_lt(t)?,
                None => self.base.seek_last()?,
            }
            // The newest base key not hidden by a range delete (overlay keys are
            // resolved against the overlay below).
            let base = loop {
                let Some((k, v)) = self.base.entry() else { break None };
                if self.overlay().contains_key(k) || self.batch.range_deleted(self.cf, k).is_none() {
                    break Some((k.to_vec(), v.to_vec()));
                }
                let from = self.batch.range_dels[self.cf.idx()]
                    .iter()
                    .filter(|(f, t)| k >= &f[..] && k < &t[..])
                    .map(|(f, _)| f.clone())
                    .min()
                    .unwrap_or_default();
                self.base.seek_lt(&from)?;
            };
            let upper = match &target {
                Some(t) => Bound::Excluded(t.clone()),
                None => Bound::Unbounded,
            };
            let ov = self
                .overlay()
                .range::<Vec<u8>, _>((Bound::Unbounded, upper))
                .next_back()
                .filter(|(k, _)| self.in_bounds(k))
                .map(|(k, v)| (k.clone(), v.clone()));
            // The larger of the two candidates wins; on a tie, or when the base key
            // is shadowed, the overlay's entry decides.
            let candidate = match (ov, base) {
                (None, None) => None,
                (Some(o), None) => Some(o),
                (None, Some(b)) => Some(self.shadowed(b)),
                (Some(o), Some(b)) => Some(if b.0 > o.0 { self.shadowed(b) } else { o }),
            };
            match candidate {
                None => {
                    self.cur = None;
                    return Ok(());
                }
                Some((k, Some(v))) => {
                    self.cur = Some((k, v));
                    return Ok(());
                }
                Some((k, None)) => target = Some(k),
            }
        }
    }

    /// A base entry as the overlay sees it: replaced, deleted (`None`) or as is.
    fn shadowed(&self, (k, v): (Vec<u8>, Vec<u8>)) -> (Vec<u8>, Option<Vec<u8>>) {
        match self.overlay().get(&k) {
            Some(ov) => (k, ov.clone()),
            None => (k, Some(v)),
        }
    }
}

impl Cursor for BatchCursor<'_> {
    fn seek_ge(&mut self, key: &[u8]) -> Result<()> {
        let key = if key < &self.lower[..] {
            self.lower.clone()
        } else {
            key.to_vec()
        };
        self.base.seek_ge(&key)?;
        self.skip_deleted_forward()?;
        let mut from = Bound::Included(key);
        loop {
            let ov = self
                .overlay()
                .range::<Vec<u8>, _>((from.clone(), Bound::Unbounded))
                .next()
                .filter(|(k, _)| self.in_bounds(k));
            let base = self.base.entry();
            match (ov, base) {
                (None, None) => {
                    self.cur = None;
                    return Ok(());
                }
                (None, Some((bk, bv))) => {
                    self.cur = Some((bk.to_vec(), bv.to_vec()));
                    return Ok(());
                }
                (Some((ok, ov)), base) => {
                    if let Some((bk, bv)) = base {
                        if bk < &ok[..] {
                            self.cur = Some((bk.to_vec(), bv.to_vec()));
                            return Ok(());
                        }
                    }
                    let same = base.is_some_and(|(bk, _)| bk == &ok[..]);
                    match ov {
                        Some(v) => {
                            self.cur = Some((ok.clone(), v.clone()));
                            return Ok(());
                        }
                        None => {
                            from = Bound::Excluded(ok.clone());
                            if same {
                                self.base.next()?;
                                self.skip_deleted_forward()?;
                            }
                        }
                    }
                }
            }
        }
    }

    fn seek_lt(&mut self, key: &[u8]) -> Result<()> {
        let target = match &self.upper {
            Some(u) if key > &u[..] => u.clone(),
            _ => key.to_vec(),
        };
        self.seek_before(Some(target))
    }

    fn seek_last(&mut self) -> Result<()> {
        self.seek_before(self.upper.clone())
    }

    fn next(&mut self) -> Result<()> {
        match self.cur.take() {
            None => Ok(()),
            Some((k, _)) => {
                let mut succ = k;
                succ.push(0);
                self.seek_ge(&succ)
            }
        }
    }

    fn entry(&self) -> Option<(&[u8], &[u8])> {
        self.cur.as_ref().map(|(k, v)| (&k[..], &v[..]))
    }
}

#[cfg(test)]
mod tests {
    use crate::cursor::Reader;
    use crate::engine::{Cf, Engine, EngineOptions};

    #[test]
    fn a_write_only_batch_writes_the_same_and_refuses_reads() {
        let dir = tempfile::tempdir().unwrap();
        let e = Engine::open(dir.path(), EngineOptions::default()).unwrap();
        let mut b = e.write_only_batch();
        b.put(Cf::Raft, b"a", b"1").unwrap();
        b.put(Cf::Raft, b"b", b"2").unwrap();
        b.delete(Cf::Raft, b"a").unwrap();
        b.delete_range(Cf::Raft, b"c", b"d").unwrap();
        assert_eq!(b.len(), 4);
        assert!(b.get(Cf::Raft, b"b").is_err(), "its writes are not indexed: no read");
        assert!(b.cursor(Cf::Raft, b"", None).is_err());
        assert!(b.writes(Cf::Raft).is_none());
        e.write(b, true).unwrap();
        assert_eq!(e.get(Cf::Raft, b"a").unwrap(), None);
        assert_eq!(e.get(Cf::Raft, b"b").unwrap(), Some(b"2".to_vec()));
    }
}
