//! HTTP endpoints for the DaemonSet's probes and for Prometheus: `/healthz`
//! says the process runs, `/readyz` proves the provider socket accepts
//! connections, `/metrics` is the OpenMetrics exposition.

use std::path::PathBuf;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(socket): State<PathBuf>) -> (StatusCode, &'static str) {
    let connect = tokio::net::UnixStream::connect(&socket);
    match tokio::time::timeout(Duration::from_secs(2), connect).await {
        Ok(Ok(_)) => (StatusCode::OK, "ok\n"),
        _ => (
            StatusCode::SERVICE_UNAVAILABLE,
            "provider socket is not accepting\n",
        ),
    }
}

async fn metrics() -> impl axum::response::IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        crate::metrics::METRICS.encode(),
    )
}

pub fn router(socket: PathBuf) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/readyz", get(readyz))
        .with_state(socket)
}
