//! The node's HTTP endpoints: `/health` (200 once the node can serve etcd
//! requests, 503 otherwise) and `/metrics` (Prometheus text).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use kvserver::keyspace::ETCD_RANGE_ID;
use kvserver::StoreHandle;

pub fn router(store: StoreHandle) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .with_state(store)
}

async fn health(State(store): State<StoreHandle>) -> impl IntoResponse {
    let ok = store
        .status(ETCD_RANGE_ID)
        .is_some_and(|s| s.can_serve(std::time::Instant::now()));
    if ok {
        (StatusCode::OK, "{\"health\":\"true\"}\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "{\"health\":\"false\",\"reason\":\"the etcd range has no valid lease here\"}\n",
        )
    }
}

async fn metrics(State(store): State<StoreHandle>) -> impl IntoResponse {
    (
        [("content-type", "text/plain; version=0.0.4")],
        store.metrics().render(),
    )
}
