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
//!
//! Bounds, so that a slow or hostile client cannot make the endpoint unanswerable for probes
//! (a slowloris attack: connections whose request headers never finish):
//! - a request's headers must arrive within [`HEADER_READ_TIMEOUT`]; the same timer runs while
//!   a kept-alive connection waits for its next request, so it is also the idle timeout;
//! - a connection lives at most [`CONNECTION_LIFETIME`];
//! - at most [`MAX_HTTP_CONNECTIONS`] connections are open; a new one beyond that closes the
//!   oldest, so the newest (a probe) is always served. The kernel's accept queue is drained at
//!   once: an attacker cannot fill it either.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::task::AbortHandle;

use super::monitor::HealthContext;
use super::report::HealthReport;

/// Most HTTP connections open at once; the oldest is closed for a new one.
pub const MAX_HTTP_CONNECTIONS: usize = 128;
/// How long a client may take to send a request's headers, or stay idle between requests.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one connection may live, requests included.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

pub async fn serve(replica: Arc<HealthContext>, listener: TcpListener) {
    let app = Router::new()
        .route("/health", get(replica_health))
        .route("/health/cluster", get(cluster_health))
        .route("/metrics", get(prometheus_metrics))
        .with_state(replica);
    let mut open: VecDeque<AbortHandle> = VecDeque::new();
    loop {
        let (stream, remote) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors, most likely: pace the retries.
                tracing::warn!(error = %e, "HTTP accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        open.retain(|h| !h.is_finished());
        while open.len() >= MAX_HTTP_CONNECTIONS {
            if let Some(oldest) = open.pop_front() {
                oldest.abort();
            }
        }
        let service = TowerToHyperService::new(app.clone());
        let task = tokio::spawn(async move {
            let io = TokioIo::new(stream);
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .keep_alive(true);
            let conn = builder.serve_connection(io, service);
            match tokio::time::timeout(CONNECTION_LIFETIME, conn).await {
                Ok(Err(e)) => tracing::debug!(%remote, error = %e, "HTTP connection ended"),
                Err(_) => tracing::debug!(%remote, "HTTP connection closed at its lifetime"),
                Ok(Ok(())) => {}
            }
        });
        open.push_back(task.abort_handle());
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
    axum::extract::State(replica): axum::extract::State<Arc<HealthContext>>,
) -> Response {
    let report = replica.health_report(true).await;
    json(report.status.is_healthy(), &report)
}

async fn cluster_health(
    axum::extract::State(replica): axum::extract::State<Arc<HealthContext>>,
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
