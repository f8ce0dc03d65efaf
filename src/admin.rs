//! Admin listener (default 127.0.0.1:9090): `GET /healthz` (the process is alive), `GET /readyz`
//! (200 only while every credential holds a usable token and the proxy is not draining; the body
//! gives each token's seconds to expiry), `GET /metrics` (Prometheus text exposition).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};

use crate::proxy::Shared;
use crate::token::TokenManager;

#[derive(Clone)]
pub struct AdminState {
    pub tokens: Vec<Arc<TokenManager>>,
    pub shared: Arc<Shared>,
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// Contract discovery of each credential that needs it: not ready while one is pending.
    pub discoveries: Vec<tokio::sync::watch::Receiver<crate::proxy::contract::Discovery>>,
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route(
            "/healthz",
            get(|| async { Json(serde_json::json!({"status": "alive"})) }),
        )
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    let draining = s.shared.draining.load(Ordering::Relaxed);
    let tokens: Vec<_> = s
        .tokens
        .iter()
        .map(|t| {
            serde_json::json!({
                "usable": t.current_usable().is_some(),
                "expires_in_s": t.seconds_to_expiry().map(|x| x.floor()),
                "last_error": t.last_error().map(|e| e.to_string()),
            })
        })
        .collect();
    let discovering = s
        .discoveries
        .iter()
        .any(|d| matches!(*d.borrow(), crate::proxy::contract::Discovery::Pending));
    let ready = !draining && !discovering && s.tokens.iter().all(|t| t.current_usable().is_some());
    let body = serde_json::json!({
        "ready": ready,
        "draining": draining,
        "contracts_discovered": !discovering,
        "tokens": tokens,
        "in_flight": s.shared.in_flight(),
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body))
}

async fn metrics(State(s): State<AdminState>) -> impl IntoResponse {
    // Refreshed at scrape time so the value is exact whenever the refresher is asleep. A legacy
    // key never expires: a made-up "100 years" would only skew dashboards, so it has no series.
    for t in s.tokens.iter().filter(|t| !t.is_legacy()) {
        if let Some(secs) = t.seconds_to_expiry() {
            metrics::gauge!("aleph_proxy_token_expiry_seconds", "client_id" => t.client_id().to_string())
                .set(secs);
        }
    }
    metrics::gauge!("aleph_proxy_in_flight_requests").set(s.shared.in_flight() as f64);
    match &s.metrics {
        Some(h) => (
            StatusCode::OK,
            [(
                axum::http::header::CONTENT_TYPE,
                "text/plain; version=0.0.4",
            )],
            h.render(),
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "metrics recorder not installed").into_response(),
    }
}

/// At most this many admin connections at once; more are closed on accept. Probes and a scraper
/// need a handful; the cap keeps a flood of idle connections on an exposed admin port (`0.0.0.0`
/// in a pod) from taking the file descriptors the proxy listeners need.
pub const MAX_CONNECTIONS: usize = 64;

/// Serves the admin router over HTTP/1.1 until `stop`: each connection must send a complete
/// request head within `head_timeout` of opening or of its previous response (hyper's header
/// read timeout also covers an idle keep-alive connection), else it is closed.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    stop: tokio_util::sync::CancellationToken,
    head_timeout: std::time::Duration,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Out of file descriptors, say: wait a little rather than spin.
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(tcp);
            continue;
        };
        let service = TowerToHyperService::new(app.clone());
        let stop = stop.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(head_timeout);
            let conn = builder.serve_connection(TokioIo::new(tcp), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
}
