//! The replica's HTTP endpoint (`node.http_listen`).
//!
//! - `GET /health`: this replica's report (JSON) with its view of the cluster; HTTP 200 when
//!   this replica is healthy, 503 when not (the reasons are in the body). Suitable as a
//!   liveness or load-balancer probe: it judges this replica only, so a healthy follower is not
//!   restarted because the leader is sick.
//! - `GET /health/cluster`: the same report; HTTP 200 only when the cluster as this replica
//!   sees it is healthy (a healthy, scheduling leader; a healthy quorum; every member healthy),
//!   503 when it is degraded or unhealthy. Suitable as a monitoring check.
//!
//! - `GET /metrics`: every metric in the Prometheus text format (see docs/metrics.md); 404 when
//!   `[metrics] prometheus = false`.
//!
//! All answer from memory (peers' reports are gathered in the background), so a probe never
//! waits on another replica.

use std::sync::Arc;

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;

use super::report::HealthReport;
use crate::server::Replica;

pub async fn serve(replica: Arc<Replica>, listener: TcpListener) {
    let app = Router::new()
        .route("/health", get(replica_health))
        .route("/health/cluster", get(cluster_health))
        .route("/metrics", get(prometheus_metrics))
        .with_state(replica);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "the HTTP endpoint stopped");
    }
}

fn json(ok: bool, report: &HealthReport) -> Response {
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::to_string_pretty(report).unwrap_or_else(|e| {
        format!("{{\"status\":\"unhealthy\",\"reasons\":[\"cannot encode the report: {e}\"]}}")
    });
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body + "\n",
    )
        .into_response()
}

async fn replica_health(
    axum::extract::State(replica): axum::extract::State<Arc<Replica>>,
) -> Response {
    let report = replica.health_report(true).await;
    json(report.status.is_healthy(), &report)
}

async fn cluster_health(
    axum::extract::State(replica): axum::extract::State<Arc<Replica>>,
) -> Response {
    let report = replica.health_report(true).await;
    let ok = report
        .cluster
        .as_ref()
        .is_some_and(|c| c.status.is_healthy());
    json(ok, &report)
}

async fn prometheus_metrics() -> Response {
    match crate::metrics::render_prometheus() {
        Some(text) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        None => (
            StatusCode::NOT_FOUND,
            "the Prometheus endpoint is off on this replica ([metrics] prometheus = false)\n",
        )
            .into_response(),
    }
}
