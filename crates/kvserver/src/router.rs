//! Where raft messages go: outgoing ones grouped per destination store (one
//! frame per store per cycle; snapshots on their own RPC, their outcome
//! reported back to the scheduler), incoming ones into their replica.
//!
//! It never blocks: the transport only queues.

use std::collections::BTreeMap;
use std::path::Path;

use crossbeam_channel::Sender;
use prost::Message as _;
use proto::transport::{RaftMsg, SnapshotHandle};
use raft::MessageBody;

use crate::metrics::Metrics;
use crate::replica::Replica;
use crate::store::Event;
use crate::transport::{message_to_pb, Transport};

/// Outgoing messages of one cycle, per destination store.
#[derive(Default)]
pub struct Outbox {
    frames: BTreeMap<u64, Vec<RaftMsg>>,
}

impl Outbox {
    /// Files `msgs` of replica `r` by destination store; a snapshot leaves at
    /// once on its own RPC, and its outcome comes back as an event.
    pub fn add(&mut self, r: &Replica, msgs: Vec<raft::Message>, transport: &dyn Transport, events: &Sender<Event>) {
        for m in msgs {
            let Some(store) = r.store_of(m.to) else {
                tracing::debug!(
                    range = r.range_id,
                    to = m.to,
                    "no store known for a replica: message dropped"
                );
                continue;
            };
            if let MessageBody::Snapshot { snapshot } = &m.body {
                let Ok(handle) = SnapshotHandle::decode(&snapshot.data[..]) else {
                    continue;
                };
                let meta = handle.meta.clone().unwrap_or_default();
                let dir = Path::new(&handle.dir).to_path_buf();
                let (range_id, to) = (r.range_id, m.to);
                let ev = events.clone();
                let cleanup = dir.clone();
                transport.send_snapshot(
                    store,
                    message_to_pb(r.range_id, &m),
                    meta,
                    dir,
                    Box::new(move |ok| {
                        let _ = std::fs::remove_dir_all(&cleanup);
                        let _ = ev.send(Event::SnapshotDone { range_id, to, ok });
                    }),
                );
                continue;
            }
            self.frames
                .entry(store)
                .or_default()
                .push(message_to_pb(r.range_id, &m));
        }
    }

    /// Files a message that belongs to no replica (store liveness).
    pub fn push(&mut self, store: u64, m: RaftMsg) {
        self.frames.entry(store).or_default().push(m);
    }

    /// Sends one frame per destination store.
    pub fn flush(&mut self, transport: &dyn Transport, metrics: &Metrics) {
        for (store, mut msgs) in std::mem::take(&mut self.frames) {
            metrics.raft_messages_sent.add(msgs.len() as u64);
            // Every range's heartbeat to that store: one packed message.
            crate::transport::coalesce_heartbeats(&mut msgs);
            metrics.raft_frames_sent.inc();
            transport.send(store, msgs);
        }
    }
}
