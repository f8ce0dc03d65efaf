//! Accept loops: HTTP/1.1 connections on the proxy listeners with a connection cap, a header read
//! timeout (slowloris), a header size limit, optional CORS, and graceful draining on shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;
use tower_http::cors::{AllowOrigin, Any, CorsLayer};

use crate::config::Config;
use crate::proxy::{self, Listener};

/// Connection-level settings shared by every proxy listener.
#[derive(Clone)]
pub struct ConnSettings {
    pub connections: Arc<Semaphore>,
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub drain_timeout: Duration,
    pub cors: Option<CorsLayer>,
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
            header_read_timeout: config.timeouts.request_headers,
            max_header_bytes: config.limits.max_request_header_bytes,
            drain_timeout: config.drain_timeout,
            cors,
        }
    }
}

/// Serves one proxy listener until `cancel`, then drains its connections for up to the drain
/// timeout. Returns true when every connection finished in time.
pub async fn serve_proxy(
    tcp: TcpListener,
    state: Arc<Listener>,
    settings: ConnSettings,
    cancel: CancellationToken,
) -> bool {
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        // The header limit on its own: capping the whole read buffer at it (as before) also cut
        // uploads into 64 KiB reads. The buffer keeps hyper's default (~400 KiB) for bodies.
        .max_header_size(settings.max_header_bytes)
        .keep_alive(true);
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
        let conn = http.serve_connection(
            TokioIo::new(stream),
            service(state.clone(), remote, settings.cors.clone()),
        );
        let watched = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = watched.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(tcp);
    tokio::select! {
        _ = graceful.shutdown() => true,
        _ = tokio::time::sleep(settings.drain_timeout) => {
            tracing::warn!(
                drain_timeout_s = settings.drain_timeout.as_secs_f64(),
                "drain timeout reached with requests still in flight; closing them"
            );
            false
        }
    }
}

/// The per-connection service: the proxy handler for one client address.
#[derive(Clone)]
pub struct ProxyService {
    state: Arc<Listener>,
    remote: SocketAddr,
}

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl tower::Service<http::Request<Incoming>> for ProxyService {
    type Response = http::Response<crate::body::ProxyBody>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Incoming>) -> Self::Future {
        Box::pin(proxy::handle(self.state.clone(), self.remote, req))
    }
}

type HyperService =
    TowerToHyperService<tower::util::Either<tower_http::cors::Cors<ProxyService>, ProxyService>>;

fn service(state: Arc<Listener>, remote: SocketAddr, cors: Option<CorsLayer>) -> HyperService {
    TowerToHyperService::new(
        ServiceBuilder::new()
            .option_layer(cors)
            .service(ProxyService { state, remote }),
    )
}
