//! Node liveness, all of it: the record every node heartbeats on the system
//! range, how a heartbeat applies (epochs), the loop that sends them, and who
//! counts as live.
//!
//! Every node proposes a heartbeat to the system range every
//! `HEARTBEAT_INTERVAL` (through the node's router, so from any node), each
//! keeping it live for `LIVENESS_TTL` past its clock. The record (range-local
//! `L` of range 1) holds per node an expiration and an epoch, which rises when
//! a heartbeat finds the previous expiration passed. A node is live while its
//! record has not expired by the reader's clock; a store without a replica of
//! the system range (or before any record exists) falls back to whether it
//! hears from the node (raft traffic, within `HEARD_WINDOW`).
//!
//! This never decides leases: a range's lease is its raft leader's (see the
//! raft crate); liveness only says which stores are worth placing replicas on
//! and what `node status` shows.

use std::collections::HashMap;
use std::future::Future;
use std::time::{Duration, Instant};

use prost::Message as _;
use proto::kvserver::{raft_command, Heartbeat, Liveness, LivenessRecord, RaftCommand};
use storage::{rangestate, Batch, Reader};

use crate::keyspace::SYSTEM_RANGE_ID;
use crate::StoreError;

/// How often a node heartbeats its record.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(1500);
/// How long past its clock one heartbeat keeps a node live.
pub const LIVENESS_TTL: Duration = Duration::from_millis(4500);
/// How long one heartbeat may take (its outcome is then unknown; the next one
/// follows on schedule).
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_millis(2500);
/// Without records: a store heard from within this long counts as live.
pub const HEARD_WINDOW: Duration = Duration::from_secs(3);

/// Range-local record suffix of the liveness record (system range only).
pub const LIVENESS_SUFFIX: u8 = b'L';

/// The command that heartbeats `node_id` until `expiration_nanos`.
pub fn heartbeat_command(node_id: u64, expiration_nanos: u64) -> RaftCommand {
    RaftCommand {
        op: Some(raft_command::Op::Heartbeat(Heartbeat {
            node_id,
            expiration_nanos: expiration_nanos.min(i64::MAX as u64) as i64,
        })),
        ..Default::default()
    }
}

/// Every node's liveness as `reader` holds it (`None` without a record).
pub fn records(reader: &dyn Reader) -> Result<Option<Vec<Liveness>>, StoreError> {
    match rangestate::local_record(reader, SYSTEM_RANGE_ID, LIVENESS_SUFFIX)? {
        Some(b) => LivenessRecord::decode(&b[..])
            .map(|r| Some(r.nodes))
            .map_err(|e| StoreError::Corrupt(format!("liveness record: {e}"))),
        None => Ok(None),
    }
}

/// Applies a heartbeat proposed at HLC wall time `now` into `batch` (which
/// reads through to the engine); returns the node's liveness after it.
pub fn apply_heartbeat(batch: &mut Batch, h: &Heartbeat, now: i64) -> Result<Liveness, StoreError> {
    let mut rec = LivenessRecord {
        nodes: records(&*batch)?.unwrap_or_default(),
    };
    let l = heartbeat(&mut rec, h.node_id, h.expiration_nanos, now);
    rangestate::set_local_record(batch, SYSTEM_RANGE_ID, LIVENESS_SUFFIX, &rec.encode_to_vec())?;
    Ok(l)
}

/// Applies node `node`'s heartbeat (live until `expiration`) proposed at HLC
/// wall time `now`: a node whose liveness had lapsed by then starts a new
/// epoch; an expiration never moves back. Returns the node's liveness.
fn heartbeat(rec: &mut LivenessRecord, node: u64, expiration: i64, now: i64) -> Liveness {
    match rec.nodes.iter_mut().find(|l| l.node_id == node) {
        Some(l) => {
            if l.expiration_nanos < now {
                l.epoch += 1;
            }
            l.expiration_nanos = l.expiration_nanos.max(expiration);
            *l
        }
        None => {
            let l = Liveness {
                node_id: node,
                epoch: 1,
                expiration_nanos: expiration,
            };
            rec.nodes.push(l);
            l
        }
    }
}

/// What a store knows to judge liveness by.
pub struct View<'a> {
    /// The records, if this store has a replica of the system range holding any.
    pub records: Option<&'a [Liveness]>,
    /// When this store last heard from each store.
    pub heard: &'a HashMap<u64, Instant>,
    pub now: Instant,
    /// This node's wall clock, nanoseconds.
    pub wall: i64,
    pub me: u64,
}

impl View<'_> {
    /// Whether `store` counts as live: by its record when there are records,
    /// else by whether it was heard from lately. This store always is.
    pub fn is_live(&self, store: u64) -> bool {
        if store == self.me {
            return true;
        }
        match self.records {
            Some(r) if !r.is_empty() => r.iter().any(|l| l.node_id == store && l.expiration_nanos > self.wall),
            _ => self
                .heard
                .get(&store)
                .is_some_and(|t| self.now.duration_since(*t) < HEARD_WINDOW),
        }
    }

    /// `store`'s record, if any.
    pub fn record(&self, store: u64) -> Option<Liveness> {
        self.records?.iter().find(|l| l.node_id == store).copied()
    }
}

/// One known store as liveness judges it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NodeLiveness {
    pub store: u64,
    pub live: bool,
    pub record: Option<Liveness>,
    /// When this store last heard from it (now for itself).
    pub last_heard: Option<Instant>,
}

/// Judges every store in `known` from what a store knows: the records in
/// `engine` when it holds a replica of the system range, else what it heard.
pub fn judge(
    engine: &dyn Reader,
    has_system_range: bool,
    heard: &HashMap<u64, Instant>,
    known: impl IntoIterator<Item = u64>,
    wall: i64,
    me: u64,
) -> Vec<NodeLiveness> {
    let records = if has_system_range {
        records(engine).ok().flatten()
    } else {
        None
    };
    let now = Instant::now();
    let view = View {
        records: records.as_deref(),
        heard,
        now,
        wall,
        me,
    };
    known
        .into_iter()
        .map(|store| NodeLiveness {
            store,
            live: view.is_live(store),
            record: view.record(store),
            last_heard: if store == me {
                Some(now)
            } else {
                heard.get(&store).copied()
            },
        })
        .collect()
}

/// Sends one heartbeat command to the system range's leaseholder and returns
/// the node's liveness after it (the server implements it with its router).
pub trait HeartbeatSender: Send + Sync {
    /// This node's id and clock, once it belongs to a cluster.
    fn node(&self) -> Option<(u64, u64)>;
    fn send(&self, cmd: RaftCommand, timeout: Duration) -> impl Future<Output = Result<Liveness, String>> + Send;
}

/// Heartbeats this node's liveness for as long as the node runs: a fixed
/// cadence, each heartbeat bounded well inside the TTL, so that one slow
/// heartbeat does not let the record lapse.
pub async fn heartbeat_loop(sender: impl HeartbeatSender) {
    while sender.node().is_none() {
        // Not part of a cluster yet: heartbeat as soon as it is.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut failing = false;
    let mut ticker = tokio::time::interval(HEARTBEAT_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some((node_id, wall)) = sender.node() else { continue };
        let cmd = heartbeat_command(node_id, wall + LIVENESS_TTL.as_nanos() as u64);
        match sender.send(cmd, HEARTBEAT_TIMEOUT).await {
            Ok(lv) => {
                if failing {
                    tracing::info!(epoch = lv.epoch, "liveness heartbeats succeed again");
                }
                failing = false;
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "liveness heartbeat failed");
                }
                failing = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeats_extend_liveness_and_a_lapse_starts_a_new_epoch() {
        let mut rec = LivenessRecord::default();
        assert_eq!(heartbeat(&mut rec, 2, 100, 10).epoch, 1);
        // Renewed in time: same epoch, later expiration.
        let l = heartbeat(&mut rec, 2, 150, 90);
        assert_eq!((l.epoch, l.expiration_nanos), (1, 150));
        // A late, reordered heartbeat never moves the expiration back.
        assert_eq!(heartbeat(&mut rec, 2, 120, 95).expiration_nanos, 150);
        // Lapsed (proposed after expiring): a new epoch.
        let l = heartbeat(&mut rec, 2, 400, 200);
        assert_eq!((l.epoch, l.expiration_nanos), (2, 400));
        // Other nodes are independent.
        assert_eq!(heartbeat(&mut rec, 3, 500, 200).epoch, 1);
        assert_eq!(rec.nodes.len(), 2);
    }

    #[test]
    fn records_decide_liveness_and_hearing_is_the_fallback() {
        let now = Instant::now();
        let heard = HashMap::from([(2, now), (3, now - Duration::from_secs(10))]);
        let recs = [
            Liveness {
                node_id: 2,
                epoch: 1,
                expiration_nanos: 50,
            },
            Liveness {
                node_id: 3,
                epoch: 4,
                expiration_nanos: 500,
            },
        ];
        let by_records = View {
            records: Some(&recs),
            heard: &heard,
            now,
            wall: 100,
            me: 1,
        };
        // Records win over hearing: 2 is heard but expired, 3 is silent but live.
        assert!(by_records.is_live(1));
        assert!(!by_records.is_live(2));
        assert!(by_records.is_live(3));
        assert!(!by_records.is_live(4));
        assert_eq!(by_records.record(3).map(|l| l.epoch), Some(4));
        let by_hearing = View {
            records: None,
            ..by_records
        };
        assert!(by_hearing.is_live(2));
        assert!(!by_hearing.is_live(3));
    }
}
