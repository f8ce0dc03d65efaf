//! Accept loops: HTTP/1.1 connections on the proxy listeners with a connection cap, a header read
//! timeout (slowloris), a keep-alive idle timeout, a header size limit, optional CORS, and
//! graceful draining on shutdown. The connections themselves are served by [`h1`].

pub mod h1;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::Either;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::{Layer, Service};
use tower_http::cors::{AllowOrigin, Any, CorsLayer};

use crate::config::Config;
use crate::proxy::{self, Listener};
pub use h1::RequestBody;

/// Connection-level settings shared by every proxy listener.
#[derive(Clone)]
pub struct ConnSettings {
    pub connections: Arc<Semaphore>,
    pub limits: Arc<h1::Limits>,
    pub drain_timeout: Duration,
    pub cors: Option<CorsLayer>,
    pub congestion: crate::tcp::Congestion,
}
impl ConnSettings {
    pub fn new(config: &Config) -> ConnSettings {
        let cors = (!config.cors_allowed_origins.is_empty()).then(|| {
            let origins = &config.cors_allowed_origins;
            let layer = CorsLayer::new()
                .allow_methods(Any)
                .allow_headers(Any)
                .expose_headers(Any)
                .max_age(Duration::from_secs(600));
            if origins.iter().any(|o| o == "*") {
                layer.allow_origin(Any)
            } else {
                let list: Vec<http::HeaderValue> = origins
                    .iter()
                    .filter_map(|o| http::HeaderValue::from_str(o.trim_end_matches('/')).ok())
                    .collect();
                layer.allow_origin(AllowOrigin::list(list))
            }
        });
        ConnSettings {
            connections: Arc::new(Semaphore::new(config.limits.max_connections)),
            limits: Arc::new(h1::Limits {
                header_timeout: config.timeouts.request_headers,
                idle_timeout: config.timeouts.client_idle,
                max_head: config.limits.max_request_header_bytes,
                body_idle: config.timeouts.body_idle,
            }),
            drain_timeout: config.drain_timeout,
            cors,
            congestion: config.client_congestion.clone(),
        }
    }
}

/// Serves one proxy listener until `cancel`, then drains its connections for up to the drain
/// timeout: idle ones close at once, busy ones after their response. Returns true when every
/// connection finished in time.
pub async fn serve_proxy(
    tcp: TcpListener,
    state: Arc<Listener>,
    settings: ConnSettings,
    cancel: CancellationToken,
) -> bool {
    let tracker = TaskTracker::new();
    let congestion = crate::tcp::per_connection(&tcp, &settings.congestion);
    loop {
        let (stream, remote) = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            r = tcp.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = settings.connections.clone().try_acquire_owned() else {
            metrics::counter!("aleph_proxy_connections_rejected_total").increment(1);
            tracing::debug!(%remote, "connection limit reached; closing the new connection");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        crate::tcp::on_accept(&stream, remote, congestion);
        let state = state.clone();
        let limits = settings.limits.clone();
        let mut cors = settings
            .cors
            .as_ref()
            .map(|layer| layer.layer(ProxyService::new(state.clone(), remote)));
        let cancel = cancel.clone();
        tracker.spawn(async move {
            h1::serve(stream, limits, cancel, |req| {
                dispatch(&mut cors, &state, remote, req)
            })
            .await;
            drop(permit);
        });
    }
    drop(tcp);
    tracker.close();
    tokio::select! {
        _ = tracker.wait() => true,
        _ = tokio::time::sleep(settings.drain_timeout) => {
            tracing::warn!(
                drain_timeout_s = settings.drain_timeout.as_secs_f64(),
                "drain timeout reached with requests still in flight; closing them"
            );
            false
        }
    }
}

/// One request to the proxy handler, through the CORS layer when there is one.
fn dispatch(
    cors: &mut Option<tower_http::cors::Cors<ProxyService>>,
    state: &Arc<Listener>,
    remote: SocketAddr,
    req: http::Request<RequestBody>,
) -> impl std::future::Future<
    Output = Result<http::Response<crate::body::ProxyBody>, std::convert::Infallible>,
> + Send
       + 'static {
    match cors {
        Some(svc) => {
            // The proxy service is always ready; poll_ready keeps tower's contract.
            let _ = futures_util::FutureExt::now_or_never(std::future::poll_fn(|cx| {
                svc.poll_ready(cx)
            }));
            Either::Left(svc.call(req))
        }
        None => Either::Right(proxy::handle(state.clone(), remote, req)),
    }
}

/// The proxy handler for one client address, as a tower service (for the CORS layer).
#[derive(Clone)]
pub struct ProxyService {
    state: Arc<Listener>,
    remote: SocketAddr,
}

impl ProxyService {
    fn new(state: Arc<Listener>, remote: SocketAddr) -> ProxyService {
        ProxyService { state, remote }
    }
}

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl tower::Service<http::Request<RequestBody>> for ProxyService {
    type Response = http::Response<crate::body::ProxyBody>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<RequestBody>) -> Self::Future {
        Box::pin(proxy::handle(self.state.clone(), self.remote, req))
    }
}
