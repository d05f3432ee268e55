//! The store's commit pipeline: one thread that writes (and syncs) the raft
//! loop's batches in the order they were handed over. The raft loop does not
//! wait for a sync: it goes on taking proposals and messages, and what
//! arrives while a sync is in flight is collected into the next batch, which
//! is handed over at once, so the disk is never idle while work waits.
//!
//! It only writes. What a batch holds, and what happens once it is durable
//! (acknowledgements, applying), is the raft loop's (`scheduler`). It never
//! reorders batches: a batch lands only after every batch handed over before
//! it, and landings are reported in that order.

use std::collections::VecDeque;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use storage::{Batch, Engine};

use crate::metrics::Metrics;

/// Writes `batch`, synced if `sync`, and says how long the sync took
/// (recorded in `tardigrade_raft_sync_seconds`); `delay` is a testing knob
/// that makes every sync that much slower (a slow disk).
pub(crate) fn write(
    engine: &Engine,
    batch: Batch,
    sync: bool,
    delay: std::time::Duration,
    metrics: &Metrics,
) -> Result<Option<f64>, storage::Error> {
    let start = std::time::Instant::now();
    engine.write(batch, sync)?;
    if !sync {
        return Ok(None);
    }
    if !delay.is_zero() {
        std::thread::sleep(delay);
    }
    let secs = start.elapsed().as_secs_f64();
    metrics.raft_sync_seconds.observe(secs);
    Ok(Some(secs))
}

struct Job {
    seq: u64,
    batch: Option<Batch>,
    sync: bool,
}

/// A batch written (or not: the engine's error).
pub(crate) struct Landed {
    pub seq: u64,
    pub result: Result<(), storage::Error>,
    /// How long its synced write took (`None`: not synced).
    pub sync_secs: Option<f64>,
}

pub(crate) struct LogWriter {
    tx: Option<Sender<Job>>,
    done: Receiver<Landed>,
    thread: Option<JoinHandle<()>>,
    next_seq: u64,
    /// Handed over and not yet reported landed, oldest first.
    in_flight: VecDeque<u64>,
    /// Reported landed and not yet taken by the raft loop, oldest first.
    landed: VecDeque<Landed>,
}

impl LogWriter {
    pub fn start(
        engine: Engine,
        metrics: std::sync::Arc<Metrics>,
        sync_delay: std::time::Duration,
    ) -> std::io::Result<LogWriter> {
        let (tx, rx) = crossbeam_channel::unbounded::<Job>();
        let (done_tx, done) = crossbeam_channel::unbounded();
        let thread = std::thread::Builder::new()
            .name("raft-log-writer".into())
            .spawn(move || {
                for job in rx {
                    let (result, sync_secs) = match job.batch {
                        Some(b) => match write(&engine, b, job.sync, sync_delay, &metrics) {
                            Ok(secs) => (Ok(()), secs),
                            Err(e) => (Err(e), None),
                        },
                        None => (Ok(()), None),
                    };
                    let failed = result.is_err();
                    let landed = Landed {
                        seq: job.seq,
                        result,
                        sync_secs,
                    };
                    if done_tx.send(landed).is_err() || failed {
                        // Nothing after a failed write may land: the raft
                        // loop stops the store when it hears of it.
                        return;
                    }
                }
            })?;
        Ok(LogWriter {
            tx: Some(tx),
            done,
            thread: Some(thread),
            next_seq: 1,
            in_flight: VecDeque::new(),
            landed: VecDeque::new(),
        })
    }

    /// Hands `batch` over (`None`: nothing to write, but it lands only after
    /// the batches before it); returns its sequence number.
    pub fn submit(&mut self, batch: Option<Batch>, sync: bool) -> Result<u64, String> {
        let seq = self.next_seq;
        self.next_seq += 1;
        let tx = self.tx.as_ref().ok_or("the log writer stopped")?;
        tx.send(Job { seq, batch, sync })
            .map_err(|_| "the log writer stopped".to_string())?;
        self.in_flight.push_back(seq);
        Ok(seq)
    }

    /// Batches handed over and not yet taken back as landed.
    pub fn pending(&self) -> usize {
        self.in_flight.len() + self.landed.len()
    }

    /// Whether a landed batch waits to be taken.
    pub fn has_landed(&self) -> bool {
        !self.landed.is_empty()
    }

    /// Where landings are reported (for the raft loop's select).
    pub fn done(&self) -> &Receiver<Landed> {
        &self.done
    }

    /// Records a landing received from `done`.
    pub fn record(&mut self, l: Landed) {
        debug_assert_eq!(self.in_flight.front(), Some(&l.seq), "landings come in order");
        self.in_flight.pop_front();
        self.landed.push_back(l);
    }

    /// Records every landing already reported.
    pub fn poll(&mut self) {
        while let Ok(l) = self.done.try_recv() {
            self.record(l);
        }
    }

    /// Waits until every batch handed over has landed (not taking them).
    pub fn wait_all_landed(&mut self) -> Result<(), String> {
        while !self.in_flight.is_empty() {
            let l = self.done.recv().map_err(|_| "the log writer stopped".to_string())?;
            self.record(l);
        }
        Ok(())
    }

    /// The oldest landed batch not yet taken.
    pub fn take_landed(&mut self) -> Option<Landed> {
        self.landed.pop_front()
    }
}

impl Drop for LogWriter {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use storage::{Cf, Engine, EngineOptions, Reader};

    use super::*;

    #[test]
    fn batches_land_in_the_order_handed_over_and_say_so_in_that_order() {
        let dir = tempfile::tempdir().unwrap();
        let e = Engine::open(dir.path(), EngineOptions::default()).unwrap();
        let mut w = LogWriter::start(e.clone(), Arc::new(Metrics::default()), Default::default()).unwrap();
        let mut seqs = Vec::new();
        for i in 0..20u8 {
            // Every batch overwrites one key: the last one handed over wins.
            let mut b = e.write_only_batch();
            b.put(Cf::Raft, b"k", &[i]).unwrap();
            seqs.push(w.submit(Some(b), i % 3 == 0).unwrap());
            if i == 10 {
                seqs.push(w.submit(None, false).unwrap());
            }
        }
        assert!(w.pending() > 0);
        w.wait_all_landed().unwrap();
        let mut landed = Vec::new();
        while let Some(l) = w.take_landed() {
            l.result.unwrap();
            landed.push(l.seq);
        }
        assert_eq!(landed, seqs);
        assert_eq!(w.pending(), 0);
        assert_eq!(e.get(Cf::Raft, b"k").unwrap(), Some(vec![19]));
    }
}
