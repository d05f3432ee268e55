//! The engine of one store: a RocksDB database with one column family per kind of
//! data, opened once and shared by every replica on the store.
//!
//! Writes go through [`Batch`]es, written atomically, with a WAL fsync when asked.
//! Opening an engine first completes any snapshot application that a crash
//! interrupted (see `snapshot`), so nothing above ever sees a half-replaced span.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rocksdb::{ColumnFamily, ColumnFamilyDescriptor, Options, WriteOptions, DB};

use crate::batch::Batch;
use crate::cursor::{Cursor, Reader, RocksCursor};
use crate::error::{Error, Result};

/// The column families of a store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Cf {
    /// MVCC data of every range: versions and intents.
    Mvcc,
    /// Raft log entries, hard state and truncated state of every range.
    Raft,
    /// Range-local state (applied state, descriptor, GC threshold) and store-local records.
    Local,
}

impl Cf {
    pub const ALL: [Cf; 3] = [Cf::Mvcc, Cf::Raft, Cf::Local];

    pub fn name(self) -> &'static str {
        match self {
            Cf::Mvcc => "mvcc",
            Cf::Raft => "raft",
            Cf::Local => "local",
        }
    }

    pub(crate) fn idx(self) -> usize {
        self as usize
    }
}

/// Settings of an engine.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// Collect RocksDB statistics (tickers such as WAL syncs). Cheap; on by default.
    pub statistics: bool,
    /// Size of the shared block cache in bytes.
    pub block_cache_bytes: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            statistics: true,
            block_cache_bytes: 64 << 20,
        }
    }
}

struct Inner {
    db: DB,
    opts: Options,
    dir: PathBuf,
}

/// One store's RocksDB. Cheap to clone; every clone is the same database.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("dir", &self.inner.dir).finish()
    }
}

impl Engine {
    /// Opens (creating if missing) the engine in `dir`, then completes any
    /// interrupted snapshot application.
    pub fn open(dir: impl AsRef<Path>, options: EngineOptions) -> Result<Engine> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir)?;
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_max_background_jobs(2);
        opts.set_keep_log_file_num(4);
        if options.statistics {
            opts.enable_statistics();
        }
        let cache = rocksdb::Cache::new_lru_cache(options.block_cache_bytes);
        let mut block = rocksdb::BlockBasedOptions::default();
        block.set_block_cache(&cache);
        block.set_bloom_filter(10.0, false);
        let cfs = Cf::ALL.iter().map(|cf| {
            let mut o = Options::default();
            o.set_block_based_table_factory(&block);
            o.set_compression_type(rocksdb::DBCompressionType::Lz4);
            ColumnFamilyDescriptor::new(cf.name(), o)
        });
        let db = DB::open_cf_descriptors(&opts, dir.join("db"), cfs)?;
        let engine = Engine {
            inner: Arc::new(Inner { db, opts, dir }),
        };
        crate::snapshot::recover_markers(&engine)?;
        crate::snapshot::remove_orphaned_dirs(&engine)?;
        Ok(engine)
    }

    /// The store directory this engine lives in.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Where snapshots being received are staged: `<store>/snapshots`. Whatever
    /// is left there when the engine opens (after completing markers) is removed.
    pub fn snapshots_dir(&self) -> PathBuf {
        self.inner.dir.join("snapshots")
    }

    pub(crate) fn db(&self) -> &DB {
        &self.inner.db
    }

    pub(crate) fn cf(&self, cf: Cf) -> Result<&ColumnFamily> {
        self.inner
            .db
            .cf_handle(cf.name())
            .ok_or_else(|| Error::corrupt("engine", format!("column family {} missing", cf.name())))
    }

    /// A new, empty batch whose reads see its own writes over this engine.
    pub fn batch(&self) -> Batch {
        Batch::new(self.clone())
    }

    /// A batch that keeps no index of its own writes (and cannot be read
    /// through): for writes nothing reads before they are written.
    pub fn write_only_batch(&self) -> Batch {
        Batch::new_write_only(self.clone())
    }

    /// Writes `batch` atomically. With `sync`, returns only after the WAL is fsynced.
    pub fn write(&self, batch: Batch, sync: bool) -> Result<()> {
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        self.inner.db.write_opt(batch.into_write_batch(), &wo)?;
        Ok(())
    }

    /// A consistent point-in-time view of the whole engine.
    pub fn snapshot(&self) -> EngineSnapshot<'_> {
        EngineSnapshot {
            engine: self,
            snap: self.inner.db.snapshot(),
        }
    }

    /// How many times RocksDB has synced a WAL file (0 without statistics).
    pub fn wal_syncs(&self) -> u64 {
        self.inner
            .opts
            .get_ticker_count(rocksdb::statistics::Ticker::WalFileSynced)
    }

    /// Bytes the store's files take on disk (RocksDB files and staging).
    pub fn disk_usage_bytes(&self) -> Result<u64> {
        fn walk(p: &Path) -> std::io::Result<u64> {
            let mut total = 0;
            for e in std::fs::read_dir(p)? {
                let e = e?;
                let m = e.metadata()?;
                total += if m.is_dir() { walk(&e.path())? } else { m.len() };
            }
            Ok(total)
        }
        Ok(walk(&self.inner.dir)?)
    }

    /// Flushes every memtable to SST files (tests and tools).
    pub fn flush(&self) -> Result<()> {
        for cf in Cf::ALL {
            self.inner.db.flush_cf(self.cf(cf)?)?;
        }
        Ok(())
    }

    fn rocks_cursor<'a>(
        &'a self,
        cf: Cf,
        lower: &[u8],
        upper: Option<&[u8]>,
        snap: Option<&'a rocksdb::SnapshotWithThreadMode<'a, DB>>,
    ) -> Result<RocksCursor<'a>> {
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_iterate_lower_bound(lower.to_vec());
        if let Some(u) = upper {
            ro.set_iterate_upper_bound(u.to_vec());
        }
        let handle = self.cf(cf)?;
        let it = match snap {
            Some(s) => s.raw_iterator_cf_opt(handle, ro),
            None => self.inner.db.raw_iterator_cf_opt(handle, ro),
        };
        Ok(RocksCursor {
            it,
            lower: lower.to_vec(),
            upper: upper.map(<[u8]>::to_vec),
        })
    }
}

impl Reader for Engine {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.inner.db.get_cf(self.cf(cf)?, key)?)
    }

    fn cursor(&self, cf: Cf, lower: &[u8], upper: Option<&[u8]>) -> Result<Box<dyn Cursor + '_>> {
        Ok(Box::new(self.rocks_cursor(cf, lower, upper, None)?))
    }
}

/// A point-in-time view of an engine (a RocksDB snapshot).
pub struct EngineSnapshot<'a> {
    engine: &'a Engine,
    snap: rocksdb::SnapshotWithThreadMode<'a, DB>,
}

impl Reader for EngineSnapshot<'_> {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.snap.get_cf(self.engine.cf(cf)?, key)?)
    }

    fn cursor(&self, cf: Cf, lower: &[u8], upper: Option<&[u8]>) -> Result<Box<dyn Cursor + '_>> {
        Ok(Box::new(self.engine.rocks_cursor(
            cf,
            lower,
            upper,
            Some(&self.snap),
        )?))
    }
}
