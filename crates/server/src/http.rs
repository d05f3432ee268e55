//! The node's HTTP endpoints: `/health` (200 once the node can serve etcd
//! requests, 503 with the reason otherwise) and `/metrics` (Prometheus text).

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use kvserver::keyspace::{ETCD_RANGE_ID, SYSTEM_RANGE_ID};

use crate::Shared;

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .with_state(shared)
}

/// Healthy once the node can serve etcd requests: it is part of an
/// initialized cluster, its clock agrees with its peers, and the etcd range
/// has a leaseholder it knows (here or elsewhere; a node with no replica of
/// it is healthy once it reaches the cluster's leaseholders).
async fn health(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    let reason = match shared.health_problem() {
        Some(r) => Some(r),
        None => match shared.local.get().and_then(|l| l.store.status(ETCD_RANGE_ID)) {
            Some(s) if s.can_serve(std::time::Instant::now()) => None,
            Some(s) if s.leader != 0 && !s.desc.replicas.is_empty() => None,
            // No replica of the etcd range here: fine once this node's
            // DistSender reaches leaseholders (its liveness heartbeats land).
            None if shared.local.get().is_some()
                && (shared.ranges.leaseholder(ETCD_RANGE_ID).is_some()
                    || shared.ranges.leaseholder(SYSTEM_RANGE_ID).is_some()) =>
            {
                None
            }
            _ => Some("the etcd range has no known leaseholder yet".to_string()),
        },
    };
    match reason {
        None => (StatusCode::OK, "{\"health\":\"true\"}\n".to_string()),
        Some(r) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{{\"health\":\"false\",\"reason\":{r:?}}}\n"),
        ),
    }
}

async fn metrics(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    let mut text = shared
        .local
        .get()
        .map(|l| l.store.metrics().render())
        .unwrap_or_default();
    let m = &shared.kv_metrics;
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    text.push_str(&format!(
        "# HELP tardigrade_range_cache_misses_total Meta lookups by this node's DistSender (its range cache lacked a key).\n\
         # TYPE tardigrade_range_cache_misses_total counter\ntardigrade_range_cache_misses_total {}\n\
         # HELP tardigrade_range_cache_corrections_total Batch parts re-sent after a range key mismatch or a range not found.\n\
         # TYPE tardigrade_range_cache_corrections_total counter\ntardigrade_range_cache_corrections_total {}\n",
        load(&m.cache_misses),
        load(&m.stale_corrections)
    ));
    ([("content-type", "text/plain; version=0.0.4")], text)
}
