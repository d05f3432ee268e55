//! Node liveness: every node heartbeats its liveness record on the system
//! range (through the DistSender, so from any node) every
//! `HEARTBEAT_INTERVAL`, each heartbeat keeping it live for `LIVENESS_TTL`
//! past the node's clock. A node is live while its record has not expired by
//! the reader's clock; `node status` and the replicate queue (which only adds
//! replicas on live stores) read the records. A node whose record lapsed
//! starts a new epoch when it heartbeats again.
//!
//! This never decides leases: a range's lease is its raft leader's (see the
//! raft crate); liveness only says which nodes are worth placing replicas on.

use std::sync::Arc;
use std::time::Duration;

use kvserver::keyspace::SYSTEM_RANGE_ID;
use proto::kvserver::{batch_request, batch_response, raft_command, Heartbeat, RaftCommand};

use crate::Shared;

pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(1500);
pub const LIVENESS_TTL: Duration = Duration::from_millis(4500);
/// How long one heartbeat may take (its outcome is then unknown; the next one
/// follows on schedule).
const HEARTBEAT_TIMEOUT: Duration = Duration::from_millis(2500);

/// Heartbeats this node's liveness for as long as the node runs.
pub async fn heartbeat_loop(shared: Arc<Shared>) {
    let mut failing = false;
    while shared.local.get().is_none() {
        // Not part of a cluster yet: heartbeat as soon as it is.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A fixed cadence, each heartbeat bounded well inside the TTL, so that
    // one slow heartbeat does not let the record lapse.
    let mut ticker = tokio::time::interval(HEARTBEAT_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some(l) = shared.local.get() else { continue };
        let store = l.store.clone();
        let expiration = store.clock().physical() + LIVENESS_TTL.as_nanos() as u64;
        let cmd = RaftCommand {
            max_lease_index: 0,
            proposer_ts: None,
            op: Some(raft_command::Op::Heartbeat(Heartbeat {
                node_id: store.ident().node_id,
                expiration_nanos: expiration as i64,
            })),
        };
        match shared
            .send_within(SYSTEM_RANGE_ID, batch_request::Request::Write(cmd), HEARTBEAT_TIMEOUT)
            .await
        {
            Ok(batch_response::Response::Liveness(lv)) => {
                if failing {
                    tracing::info!(epoch = lv.epoch, "liveness heartbeats succeed again");
                }
                failing = false;
            }
            Ok(other) => tracing::warn!(answer = ?other, "unexpected answer to a liveness heartbeat"),
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "liveness heartbeat failed");
                }
                failing = true;
            }
        }
    }
}
