//! Range snapshots: building SST files of one range at one point in time, and
//! replacing a range's data with them, crash-safely.
//!
//! A snapshot is two SST files (one per column family it covers) plus a
//! [`SnapshotMeta`]. Each SST starts with a range deletion over the range's span,
//! so ingesting it replaces the span in that column family in one step. RocksDB
//! ingests one column family per call, so applying a snapshot follows a protocol:
//!
//! 1. write a durable marker naming the snapshot directory and the new state;
//! 2. ingest the `mvcc` SST; 3. ingest the `local` SST;
//! 4. one synced batch sets the applied and truncated state (and hard state),
//!    clears the old raft log and removes the marker;
//! 5. remove the snapshot directory.
//!
//! Every step can be redone, so [`recover_markers`], run when an engine opens,
//! completes any application a crash interrupted: a span is wholly old (no marker
//! was written) or wholly new.

use std::path::{Path, PathBuf};

use proto::storage::{SnapshotApplyMarker, SnapshotMeta};
use rocksdb::{IngestExternalFileOptions, Options, SstFileWriter};

use crate::cursor::Reader;
use crate::engine::{Cf, Engine};
use crate::error::{Error, Result};
use crate::keys;
use crate::raftlog::{self, HardState};
use crate::rangestate::{self, AppliedState};

const MVCC_SST: &str = "mvcc.sst";
const LOCAL_SST: &str = "local.sst";

/// The steps of applying a snapshot, for tests that crash between them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApplyStep {
    BeforeMarker,
    MarkerWritten,
    MvccIngested,
    LocalIngested,
    FinalBatchWritten,
    Done,
}

/// Writes the snapshot of range `range_id` over user keys `[start, end)` into
/// `dir` (created), at one point in time, and returns its meta.
pub fn build_snapshot(engine: &Engine, range_id: u64, start: &[u8], end: &[u8], dir: &Path) -> Result<SnapshotMeta> {
    if end.is_empty() || start >= end {
        return Err(Error::InvalidArgument(format!(
            "snapshot span [{start:?}, {end:?}) must be bounded and non-empty"
        )));
    }
    std::fs::create_dir_all(dir)?;
    let snap = engine.snapshot();
    let applied = rangestate::applied_state(&snap, range_id)?;
    let (mlo, mhi) = keys::mvcc_span_bounds(start, end);
    let mhi = mhi.unwrap_or_default();
    write_sst(&snap, Cf::Mvcc, &[(&mlo, &mhi)], &dir.join(MVCC_SST))?;
    // The transaction records anchored in the range's keys ('k') sort
    // below its range-local state ('r').
    let (tlo, thi) = keys::txn_record_span(start, end);
    let (llo, lhi) = keys::range_local_bounds(range_id);
    write_sst(&snap, Cf::Local, &[(&tlo, &thi), (&llo, &lhi)], &dir.join(LOCAL_SST))?;
    Ok(SnapshotMeta {
        range_id,
        start_key: start.to_vec(),
        end_key: end.to_vec(),
        applied: Some(applied.into()),
    })
}

/// Writes the spans (disjoint, in key order) of `cf` into one SST that
/// first deletes each of them.
fn write_sst(r: &dyn Reader, cf: Cf, spans: &[(&[u8], &[u8])], path: &Path) -> Result<()> {
    let opts = Options::default();
    let mut w = SstFileWriter::create(&opts);
    w.open(path)?;
    for (lo, hi) in spans {
        w.delete_range(lo, hi)?;
    }
    for (lo, hi) in spans {
        let mut c = r.cursor(cf, lo, Some(hi))?;
        c.seek_ge(lo)?;
        while let Some((k, v)) = c.entry() {
            w.put(k, v)?;
            c.next()?;
        }
    }
    w.finish()?;
    Ok(())
}

/// Replaces range `meta.range_id` on `engine` with the snapshot in `dir`.
pub fn apply_snapshot(engine: &Engine, dir: &Path, meta: &SnapshotMeta, hard_state: Option<HardState>) -> Result<()> {
    apply_snapshot_with_hook(engine, dir, meta, hard_state, &mut |_| {})
}

/// [`apply_snapshot`], calling `hook` after each step (crash tests kill the
/// process there).
pub fn apply_snapshot_with_hook(
    engine: &Engine,
    dir: &Path,
    meta: &SnapshotMeta,
    hard_state: Option<HardState>,
    hook: &mut dyn FnMut(ApplyStep),
) -> Result<()> {
    let rel = dir
        .strip_prefix(engine.dir())
        .ok()
        .filter(|r| r.starts_with("snapshots") && r.components().all(|c| matches!(c, std::path::Component::Normal(_))))
        .ok_or_else(|| {
            Error::InvalidArgument(format!(
                "snapshot dir {dir:?} is not inside {:?} (use new_incoming_dir)",
                engine.snapshots_dir()
            ))
        })?;
    let hs = hard_state.unwrap_or_default();
    let marker = SnapshotApplyMarker {
        meta: Some(meta.clone()),
        dir: rel.to_string_lossy().into_owned(),
        hard_state: Some(proto::storage::RaftHardState {
            term: hs.term,
            vote: hs.vote,
            commit: hs.commit,
        }),
        has_hard_state: hard_state.is_some(),
    };
    hook(ApplyStep::BeforeMarker);
    let mut b = engine.batch();
    b.put(
        Cf::Local,
        &keys::snapshot_marker_key(meta.range_id),
        &prost::Message::encode_to_vec(&marker),
    )?;
    engine.write(b, true)?;
    hook(ApplyStep::MarkerWritten);
    finish(engine, &marker, hook)
}

/// Steps 2 to 5, from a durable marker.
fn finish(engine: &Engine, marker: &SnapshotApplyMarker, hook: &mut dyn FnMut(ApplyStep)) -> Result<()> {
    let meta = marker
        .meta
        .as_ref()
        .ok_or_else(|| Error::corrupt("snapshot marker", "no meta"))?;
    let dir: PathBuf = engine.dir().join(&marker.dir);
    let mut ingest = IngestExternalFileOptions::default();
    ingest.set_move_files(false);
    for (cf, file, step) in [
        (Cf::Mvcc, MVCC_SST, ApplyStep::MvccIngested),
        (Cf::Local, LOCAL_SST, ApplyStep::LocalIngested),
    ] {
        let path = dir.join(file);
        if !path.exists() {
            return Err(Error::corrupt(
                "snapshot",
                format!("{path:?} missing while its marker exists"),
            ));
        }
        engine
            .db()
            .ingest_external_file_cf_opts(engine.cf(cf)?, &ingest, vec![path])?;
        hook(step);
    }
    let applied: AppliedState = meta.applied.unwrap_or_default().into();
    let mut b = engine.batch();
    rangestate::set_applied_state(&mut b, meta.range_id, applied)?;
    raftlog::reset(&mut b, meta.range_id, applied.index, applied.term)?;
    if marker.has_hard_state {
        let h = marker.hard_state.unwrap_or_default();
        raftlog::save_hard_state(
            &mut b,
            meta.range_id,
            HardState {
                term: h.term,
                vote: h.vote,
                commit: h.commit,
            },
        )?;
    }
    b.delete(Cf::Local, &keys::snapshot_marker_key(meta.range_id))?;
    engine.write(b, true)?;
    hook(ApplyStep::FinalBatchWritten);
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    hook(ApplyStep::Done);
    Ok(())
}

/// A new, empty staging directory for a snapshot of `range_id` being received,
/// under the engine's `snapshots_dir`. Only directories made here may be applied.
pub fn new_incoming_dir(engine: &Engine, range_id: u64) -> Result<PathBuf> {
    let base = engine.snapshots_dir();
    std::fs::create_dir_all(&base)?;
    for n in 0u64.. {
        let d = base.join(format!("r{range_id}-{n}"));
        match std::fs::create_dir(&d) {
            Ok(()) => return Ok(d),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e.into()),
        }
    }
    unreachable!("u64 ran out of directory names")
}

/// Removes staging directories no marker refers to (run after `recover_markers`,
/// so none does): snapshots half-received, or applied just before a crash.
pub(crate) fn remove_orphaned_dirs(engine: &Engine) -> Result<()> {
    let base = engine.snapshots_dir();
    if !base.exists() {
        return Ok(());
    }
    for e in std::fs::read_dir(&base)? {
        let p = e?.path();
        tracing::info!(dir = %p.display(), "removing leftover snapshot directory");
        if p.is_dir() {
            std::fs::remove_dir_all(&p)?;
        } else {
            std::fs::remove_file(&p)?;
        }
    }
    Ok(())
}

/// Completes every snapshot application a crash interrupted. Run by `Engine::open`.
pub(crate) fn recover_markers(engine: &Engine) -> Result<()> {
    let (lo, hi) = keys::snapshot_marker_bounds();
    let mut markers = Vec::new();
    {
        let mut c = engine.cursor(Cf::Local, &lo, Some(&hi))?;
        c.seek_ge(&lo)?;
        while let Some((_, v)) = c.entry() {
            let m: SnapshotApplyMarker =
                prost::Message::decode(v).map_err(|e| Error::corrupt("snapshot marker", e.to_string()))?;
            markers.push(m);
            c.next()?;
        }
    }
    for m in markers {
        tracing::warn!(range_id = m.meta.as_ref().map(|x| x.range_id), dir = %m.dir, "completing interrupted snapshot application");
        finish(engine, &m, &mut |_| {})?;
    }
    Ok(())
}
