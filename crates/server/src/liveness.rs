//! The node's side of liveness: sends the heartbeats that
//! `kvserver::liveness` defines, through this node's router (the
//! DistSender), so they reach the system range's leaseholder wherever it is.
//! Everything else about liveness (the record, epochs, who is live) lives in
//! `kvserver::liveness`.

use std::sync::Arc;
use std::time::Duration;

use kvserver::keyspace::SYSTEM_RANGE_ID;
use kvserver::liveness::HeartbeatSender;
use proto::kvserver::{batch_request, batch_response, Liveness, RaftCommand};

use crate::Shared;

struct Sender(Arc<Shared>);

impl HeartbeatSender for Sender {
    fn node(&self) -> Option<(u64, u64)> {
        let l = self.0.local.get()?;
        Some((l.store.ident().node_id, l.store.clock().physical()))
    }

    async fn send(&self, cmd: RaftCommand, timeout: Duration) -> Result<Liveness, String> {
        match self
            .0
            .send_within(SYSTEM_RANGE_ID, batch_request::Request::Write(cmd), timeout)
            .await
        {
            Ok(batch_response::Response::Liveness(lv)) => Ok(lv),
            Ok(other) => Err(format!("unexpected answer to a liveness heartbeat: {other:?}")),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// Heartbeats this node's liveness for as long as the node runs.
pub async fn heartbeat_loop(shared: Arc<Shared>) {
    kvserver::liveness::heartbeat_loop(Sender(shared)).await
}
