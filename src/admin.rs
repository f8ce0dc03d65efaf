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
    pub max_in_flight: usize,
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
    let ready = !draining && s.tokens.iter().all(|t| t.current_usable().is_some());
    let body = serde_json::json!({
        "ready": ready,
        "draining": draining,
        "tokens": tokens,
        "in_flight": s.shared.in_flight(s.max_in_flight),
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
