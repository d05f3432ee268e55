//! The Raft log as the core sees it: durable entries in `Storage`, followed by
//! unstable entries (and possibly an unstable snapshot) not yet known durable.
//!
//! Unstable entries are handed to the node in a `Ready`; they stay here until
//! the node reports them durable, and only durable entries are ever applied.

use crate::storage::{Storage, StorageError};
use crate::types::{Entry, Snapshot};

/// Entries and a snapshot that are not yet known durable.
#[derive(Debug, Default)]
pub struct Unstable {
    pub snapshot: Option<Snapshot>,
    pub entries: Vec<Entry>,
    /// Index of `entries[0]`.
    pub offset: u64,
    /// Entries below this index (and the snapshot, if flagged) were handed to
    /// the node for persistence and are in flight.
    pub offset_in_progress: u64,
    pub snapshot_in_progress: bool,
}

impl Unstable {
    fn last_index(&self) -> Option<u64> {
        if !self.entries.is_empty() {
            return Some(self.offset + self.entries.len() as u64 - 1);
        }
        self.snapshot.as_ref().map(|s| s.meta.index)
    }

    fn term(&self, i: u64) -> Option<u64> {
        if i < self.offset {
            return self
                .snapshot
                .as_ref()
                .filter(|s| s.meta.index == i)
                .map(|s| s.meta.term);
        }
        let last = self.last_index()?;
        if i > last {
            return None;
        }
        self.entries.get((i - self.offset) as usize).map(|e| e.term)
    }
}

pub struct RaftLog<S: Storage> {
    pub storage: S,
    pub unstable: Unstable,
    /// Highest index known committed.
    pub committed: u64,
    /// Highest index handed to the node for applying.
    pub applying: u64,
    /// Highest index the node reported applied.
    pub applied: u64,
}

impl<S: Storage> RaftLog<S> {
    pub fn new(storage: S, committed: u64, applied: u64) -> Result<Self, StorageError> {
        let last = storage.last_index()?;
        let first = storage.first_index()?;
        let applied = applied.max(first - 1);
        Ok(RaftLog {
            storage,
            unstable: Unstable {
                offset: last + 1,
                offset_in_progress: last + 1,
                ..Default::default()
            },
            committed: committed.max(first - 1),
            applying: applied,
            applied,
        })
    }

    pub fn first_index(&self) -> u64 {
        if let Some(s) = &self.unstable.snapshot {
            return s.meta.index + 1;
        }
        self.storage.first_index().unwrap_or(1)
    }

    pub fn last_index(&self) -> u64 {
        match self.unstable.last_index() {
            Some(i) => i,
            None => self.storage.last_index().unwrap_or(0),
        }
    }

    pub fn term(&self, i: u64) -> Result<u64, StorageError> {
        let dummy = self.first_index() - 1;
        if i < dummy {
            return Err(StorageError::Compacted);
        }
        if i > self.last_index() {
            return Err(StorageError::Unavailable);
        }
        if let Some(t) = self.unstable.term(i) {
            return Ok(t);
        }
        self.storage.term(i)
    }

    /// The term at `i`, or 0 if it is not in the log.
    pub fn term_or_zero(&self, i: u64) -> u64 {
        self.term(i).unwrap_or(0)
    }

    pub fn last_term(&self) -> u64 {
        self.term_or_zero(self.last_index())
    }

    pub fn match_term(&self, i: u64, term: u64) -> bool {
        self.term(i).is_ok_and(|t| t == term)
    }

    /// Whether a log ending at (`last_index`, `last_term`) is at least as
    /// up to date as ours.
    pub fn is_up_to_date(&self, last_index: u64, last_term: u64) -> bool {
        let lt = self.last_term();
        last_term > lt || (last_term == lt && last_index >= self.last_index())
    }

    /// Entries `[lo, hi)` within `max_bytes` (at least one).
    pub fn slice(&self, lo: u64, hi: u64, max_bytes: u64) -> Result<Vec<Entry>, StorageError> {
        if lo >= hi {
            return Ok(Vec::new());
        }
        if lo < self.first_index() {
            return Err(StorageError::Compacted);
        }
        if hi > self.last_index() + 1 {
            return Err(StorageError::Unavailable);
        }
        let mut out = Vec::new();
        let mut size = 0;
        if lo < self.unstable.offset {
            let stored_hi = hi.min(self.unstable.offset);
            out = self.storage.entries(lo, stored_hi, max_bytes)?;
            size = out.iter().map(Entry::size).sum::<u64>();
            if (out.len() as u64) < stored_hi - lo {
                return Ok(out); // the byte limit stopped it
            }
        }
        if hi > self.unstable.offset {
            let from = lo.max(self.unstable.offset);
            for e in
                &self.unstable.entries[(from - self.unstable.offset) as usize..(hi - self.unstable.offset) as usize]
            {
                size += e.size();
                if !out.is_empty() && size > max_bytes {
                    break;
                }
                out.push(e.clone());
            }
        }
        Ok(out)
    }

    /// The first index in `ents` whose term differs from ours (0 if none
    /// differ and all are present: nothing to append).
    fn find_conflict(&self, ents: &[Entry]) -> u64 {
        for e in ents {
            if !self.match_term(e.index, e.term) {
                return e.index;
            }
        }
        0
    }

    /// For a rejection hint: the largest index `<= index` whose term is `<= term`,
    /// with that term.
    pub fn find_conflict_by_term(&self, index: u64, term: u64) -> (u64, u64) {
        let mut i = index.min(self.last_index());
        loop {
            match self.term(i) {
                Ok(t) if t > term => {
                    if i == 0 {
                        return (0, 0);
                    }
                    i -= 1;
                }
                Ok(t) => return (i, t),
                Err(_) => return (i, 0),
            }
        }
    }

    /// Appends `ents` after (`index`, `log_term`) if that matches; returns the
    /// new last index of what was appended, or `None` on a mismatch.
    pub fn maybe_append(&mut self, index: u64, log_term: u64, committed: u64, ents: &[Entry]) -> Option<u64> {
        if !self.match_term(index, log_term) {
            return None;
        }
        let last_new = index + ents.len() as u64;
        let ci = self.find_conflict(ents);
        if ci != 0 {
            // A conflict with a committed entry cannot come from a correct
            // leader; refuse it rather than lose a committed entry.
            if ci <= self.committed {
                return None;
            }
            let start = (ci - (index + 1)) as usize;
            self.append(&ents[start..]);
        }
        self.commit_to(committed.min(last_new));
        Some(last_new)
    }

    /// Appends entries (the first may overwrite a suffix); returns the last index.
    pub fn append(&mut self, ents: &[Entry]) -> u64 {
        let Some(first) = ents.first() else {
            return self.last_index();
        };
        if first.index <= self.committed {
            return self.last_index(); // never overwrite committed entries
        }
        let u = &mut self.unstable;
        if first.index == u.offset + u.entries.len() as u64 {
            u.entries.extend_from_slice(ents);
        } else if first.index <= u.offset {
            // Replaces every unstable entry; storage entries from first.index on
            // are shadowed (they will be overwritten when these are persisted).
            u.offset = first.index;
            u.offset_in_progress = u.offset;
            u.entries = ents.to_vec();
        } else {
            u.entries.truncate((first.index - u.offset) as usize);
            u.entries.extend_from_slice(ents);
            u.offset_in_progress = u.offset_in_progress.min(first.index);
        }
        self.last_index()
    }

    pub fn commit_to(&mut self, to: u64) {
        let to = to.min(self.last_index());
        if to > self.committed {
            self.committed = to;
        }
    }

    /// Commits `index` if it is in `term` (a leader commits only entries of its term).
    pub fn maybe_commit(&mut self, index: u64, term: u64) -> bool {
        if index > self.committed && self.term_or_zero(index) == term {
            self.commit_to(index);
            return true;
        }
        false
    }

    /// The highest index that is durable locally: below every unstable entry and
    /// not behind an unstable snapshot.
    pub fn durable_index(&self) -> u64 {
        if self.unstable.snapshot.is_some() {
            return 0; // nothing is applicable before the snapshot is installed
        }
        self.unstable.offset - 1
    }

    /// Entries that may be applied now: committed, durable, not yet handed out.
    pub fn next_committed(&self, max_bytes: u64) -> Vec<Entry> {
        let hi = self.committed.min(self.durable_index());
        let lo = self.applying + 1;
        if lo > hi || lo < self.first_index() {
            return Vec::new();
        }
        self.slice(lo, hi + 1, max_bytes).unwrap_or_default()
    }

    pub fn has_next_committed(&self) -> bool {
        let hi = self.committed.min(self.durable_index());
        self.applying < hi && self.applying + 1 >= self.first_index()
    }

    /// Entries not yet handed to the node for persistence.
    pub fn unstable_to_persist(&self) -> &[Entry] {
        let u = &self.unstable;
        let from = (u.offset_in_progress - u.offset) as usize;
        &u.entries[from.min(u.entries.len())..]
    }

    pub fn snapshot_to_persist(&self) -> Option<&Snapshot> {
        if self.unstable.snapshot_in_progress {
            return None;
        }
        self.unstable.snapshot.as_ref()
    }

    /// Marks what `unstable_to_persist` and `snapshot_to_persist` returned as
    /// handed out.
    pub fn accept_unstable(&mut self) {
        let u = &mut self.unstable;
        u.offset_in_progress = u.offset + u.entries.len() as u64;
        if u.snapshot.is_some() {
            u.snapshot_in_progress = true;
        }
    }

    /// The node made entries up to (`index`, `term`) durable.
    pub fn stable_to(&mut self, index: u64, term: u64) {
        let u = &mut self.unstable;
        if index < u.offset {
            return;
        }
        // Ignore if the entry was overwritten in the meantime.
        if u.term(index) != Some(term) {
            return;
        }
        let n = (index + 1 - u.offset) as usize;
        u.entries.drain(..n);
        u.offset = index + 1;
        u.offset_in_progress = u.offset_in_progress.max(u.offset);
    }

    /// The node made the snapshot at `index` durable.
    pub fn stable_snap_to(&mut self, index: u64) {
        let u = &mut self.unstable;
        if u.snapshot.as_ref().is_some_and(|s| s.meta.index == index) {
            u.snapshot = None;
            u.snapshot_in_progress = false;
        }
    }

    /// Replaces the log with a snapshot (a follower restoring one).
    pub fn restore(&mut self, snap: Snapshot) {
        let idx = snap.meta.index;
        self.committed = idx;
        self.unstable = Unstable {
            offset: idx + 1,
            offset_in_progress: idx + 1,
            entries: Vec::new(),
            snapshot: Some(snap),
            snapshot_in_progress: false,
        };
    }

    pub fn applied_to(&mut self, index: u64) {
        if index > self.applied {
            self.applied = index;
            self.applying = self.applying.max(index);
        }
    }

    pub fn pending_snapshot(&self) -> Option<&Snapshot> {
        self.unstable.snapshot.as_ref()
    }
}
