//! The connection to the upstream API: a connection pool over hyper's connection API with rustls
//! (webpki roots, the system's roots and `upstream_ca_file`), connect timeout, and the egress
//! proxy from `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY` (a CONNECT tunnel) decided once at start-up,
//! since the upstream never changes. The same TLS settings serve the token client (reqwest).
//!
//! Why not hyper-util's pooled `Client`: it serves any number of hosts, and pays for that on
//! every request (two pool locks, a spawned task that waits to return the connection, a `Host`
//! header formatted each time). This proxy has one upstream, so its pool is a stack of idle
//! HTTP/1.1 connections driven by the requests' own tasks ([`h1`]), or one shared HTTP/2
//! connection (hyper's) when TLS negotiates h2; BENCHMARKS.md has the numbers.

pub mod h1;

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::{Connection as _, HttpConnector};
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tower::Service;

use crate::body::{BoxError, PassBody};
use crate::config::Config;

/// Reads PEM certificates from a file (at least one).
pub fn read_ca_file(
    path: &Path,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    let pem =
        std::fs::read(path).map_err(|e| format!("cannot read {}: {}", path.display(), e.kind()))?;
    use rustls::pki_types::pem::PemObject;
    let certs: Result<Vec<_>, _> =
        rustls::pki_types::CertificateDer::pem_slice_iter(&pem).collect();
    let certs = certs.map_err(|e| format!("{} is not PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    Ok(certs)
}

/// The rustls client configuration shared by the upstream and token clients.
pub fn tls_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    // System roots carry corporate CAs installed on the host; absent in a scratch image.
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        let _ = roots.add(cert);
    }
    if let Some(p) = ca_file {
        for cert in read_ca_file(p)? {
            roots
                .add(cert)
                .map_err(|e| format!("{}: unusable certificate: {e}", p.display()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(cfg)
}

/// TCP, directly or through a CONNECT tunnel of the egress proxy.
#[derive(Clone)]
pub struct Connector {
    route: Route,
    /// `tcp.client_congestion_control`: with `auto`, a connection to a loopback peer (an
    /// upstream or an egress proxy on this host) leaves a pacing algorithm (`crate::tcp`).
    congestion: crate::tcp::Congestion,
}

#[derive(Clone)]
enum Route {
    Direct(HttpConnector),
    Tunnel(Tunnel<HttpConnector>),
}

impl Service<http::Uri> for Connector {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        match &mut self.route {
            Route::Direct(c) => c.poll_ready(cx).map_err(Into::into),
            Route::Tunnel(t) => t.poll_ready(cx).map_err(Into::into),
        }
    }

    fn call(&mut self, dst: http::Uri) -> Self::Future {
        use futures_util::{future::Either, TryFutureExt};
        let connecting = match &mut self.route {
            Route::Direct(c) => Either::Left(c.call(dst).err_into::<BoxError>()),
            Route::Tunnel(t) => Either::Right(t.call(dst).err_into::<BoxError>()),
        };
        let congestion = self.congestion.clone();
        Box::pin(async move {
            let io = connecting.await?;
            crate::tcp::on_connect(io.inner(), &congestion);
            Ok(io)
        })
    }
}

/// Describes the egress route for logs, without credentials of the egress proxy.
pub fn egress_description(upstream: &http::Uri) -> Option<String> {
    let matcher = Matcher::from_env();
    matcher.intercept(upstream).map(|i| {
        let u = i.uri();
        format!(
            "{}://{}",
            u.scheme_str().unwrap_or("http"),
            u.authority().map(|a| a.host()).unwrap_or("?")
        )
    })
}

/// A failed upstream request: connecting (nothing was sent), the client's own request body, or
/// the request itself.
#[derive(Debug)]
pub struct Error {
    connect: bool,
    client_body: bool,
    source: BoxError,
}

impl Error {
    /// The connection could not be made, so the request never left: safe to retry.
    pub fn is_connect(&self) -> bool {
        self.connect
    }

    /// The client's request body failed (stalled, malformed, cut short) while it was sent.
    pub fn is_client_body(&self) -> bool {
        self.client_body
    }

    fn request(source: BoxError) -> Error {
        Error {
            connect: false,
            client_body: false,
            source,
        }
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.connect {
            "upstream connect error"
        } else if self.client_body {
            "client request body error"
        } else {
            "upstream request error"
        })
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}

/// The pooled client for the one upstream. Cheap to clone.
#[derive(Clone)]
pub struct UpstreamClient {
    inner: Arc<Pool>,
}

struct Pool {
    connector: HttpsConnector<Connector>,
    /// The upstream origin, for connecting and for the HTTP/2 request target.
    origin: Uri,
    /// `Host` of every HTTP/1.1 request, made once.
    host: HeaderValue,
    /// Idle HTTP/1.1 connections. A connection busy with a request belongs to that request's
    /// response body until the body is read to the end.
    h1: Arc<h1::Idle>,
    /// The HTTP/2 connection, when TLS negotiated h2: one carries every request.
    h2: Mutex<Option<http2::SendRequest<PassBody>>>,
    /// What the upstream negotiated on its last connection ([`PROTOCOL_UNKNOWN`] before any).
    protocol: AtomicU8,
    /// Held by the request that connects while a burst may share what it connects (an HTTP/2
    /// upstream, or one not connected yet): the others wait for it instead of each opening a
    /// connection of its own.
    connecting: tokio::sync::Mutex<()>,
}

const PROTOCOL_UNKNOWN: u8 = 0;
const PROTOCOL_H1: u8 = 1;
const PROTOCOL_H2: u8 = 2;

enum Conn {
    H1(Box<h1::Conn>),
    H2(http2::SendRequest<PassBody>),
}

/// An upstream response body: read by the request's task (HTTP/1.1), or hyper's (HTTP/2).
pub enum Body {
    H1(h1::Body),
    H2(Incoming),
}

impl Body {
    /// The rest of the body can be spliced to the client: see [`h1::Body::can_splice`].
    pub fn can_splice(&self) -> bool {
        match self {
            Body::H1(b) => b.can_splice(),
            Body::H2(_) => false,
        }
    }
}

impl crate::splice::Source for Body {
    type Error = BoxError;

    fn poll_fill(
        &mut self,
        cx: &mut Context<'_>,
        pipe: &mut crate::splice::Pipe,
    ) -> Poll<Result<usize, BoxError>> {
        match self {
            Body::H1(b) => b.poll_fill(cx, pipe),
            Body::H2(_) => Poll::Ready(Err("an HTTP/2 body cannot be spliced".into())),
        }
    }
}

impl http_body::Body for Body {
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, BoxError>>> {
        match self.get_mut() {
            Body::H1(b) => Pin::new(b).poll_frame(cx),
            Body::H2(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::H1(b) => b.is_end_stream(),
            Body::H2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            Body::H1(b) => b.size_hint(),
            Body::H2(b) => b.size_hint(),
        }
    }
}

/// Fields the proxy adds to a request (its token, contract and request id), written after the
/// request's header map, which holds none of these names; `None` adds nothing. Kept out of the
/// map: inserting them would hash each name per request, and a retry with a newer token only
/// changes this list.
pub type Extra<'a> = [(HeaderName, Option<&'a HeaderValue>)];

impl UpstreamClient {
    /// Sends a request and returns the response once its headers arrived. `target` is the path
    /// and query on the upstream (base path included). A pooled HTTP/1.1 connection
    /// found closed is skipped; one that fails before the upstream answered anything gets the
    /// request again on another connection when that is safe ([`h1::SendError`]).
    pub async fn request(
        &self,
        method: &Method,
        target: &str,
        headers: &HeaderMap,
        extra: &Extra<'_>,
        mut body: PassBody,
    ) -> Result<Response<Body>, Error> {
        let pool = &*self.inner;
        loop {
            let (conn, reused) = match pool.checkout() {
                Some(c) => (c, true),
                // Boxed: connecting (TLS, the egress tunnel) is a large future, and every
                // request's future would otherwise carry its size (and be copied with it).
                None => (Box::pin(pool.connect_or_join()).await?, false),
            };
            match conn {
                Conn::H2(mut tx) => {
                    let mut parts = http::uri::Parts::default();
                    parts.scheme = pool.origin.scheme().cloned();
                    parts.authority = pool.origin.authority().cloned();
                    parts.path_and_query = Some(target.parse().map_err(|_| {
                        Error::request("the request target is not a valid URI path".into())
                    })?);
                    let uri = Uri::from_parts(parts)
                        .map_err(|_| Error::request("the request target is not valid".into()))?;
                    let mut req = Request::new(body);
                    *req.method_mut() = method.clone();
                    *req.uri_mut() = uri;
                    *req.headers_mut() = headers.clone();
                    // The client's Host names the proxy; the upstream's is in `:authority`.
                    req.headers_mut().remove(http::header::HOST);
                    for (name, value) in extra {
                        if let Some(value) = value {
                            req.headers_mut().insert(name.clone(), (*value).clone());
                        }
                    }
                    return tx
                        .send_request(req)
                        .await
                        .map(|r| r.map(Body::H2))
                        .map_err(|e| Error::request(e.into()));
                }
                Conn::H1(c) => {
                    let head = h1::Head {
                        method,
                        path_and_query: target,
                        host: &pool.host,
                        headers,
                        extra,
                    };
                    match h1::send(c, reused, &head, body, &pool.h1).await {
                        Ok(resp) => return Ok(resp.map(Body::H1)),
                        Err(h1::SendError::Conn {
                            retry: Some(b),
                            error,
                        }) => {
                            tracing::debug!(%error, "pooled upstream connection failed; trying another");
                            body = b;
                        }
                        Err(h1::SendError::Conn { error, .. }) => {
                            return Err(Error::request(error))
                        }
                        Err(h1::SendError::Body(e)) => {
                            return Err(Error {
                                connect: false,
                                client_body: true,
                                source: e,
                            })
                        }
                    }
                }
            }
        }
    }
}

impl Pool {
    /// A new connection, or the HTTP/2 connection another request of the same burst has just
    /// made. Over HTTP/1.1 (known from the last connection) every request connects in
    /// parallel; otherwise one connects and the rest wait for it, then share its HTTP/2
    /// connection, or, if it failed or turned out HTTP/1.1, connect in parallel: a dead
    /// upstream costs a request of the burst two connect timeouts at most, never one per
    /// request before it.
    async fn connect_or_join(&self) -> Result<Conn, Error> {
        if self.protocol.load(Ordering::Relaxed) == PROTOCOL_H1 {
            return self.connect().await;
        }
        match self.connecting.try_lock() {
            Ok(_leader) => self.connect().await,
            Err(_) => {
                drop(self.connecting.lock().await);
                if let Some(tx) = self.live_h2() {
                    return Ok(Conn::H2(tx));
                }
                self.connect().await
            }
        }
    }

    fn live_h2(&self) -> Option<http2::SendRequest<PassBody>> {
        self.h2
            .lock()
            .expect("pool lock")
            .as_ref()
            .filter(|tx| !tx.is_closed())
            .cloned()
    }

    fn checkout(&self) -> Option<Conn> {
        if let Some(tx) = self.live_h2() {
            return Some(Conn::H2(tx));
        }
        self.h1.checkout().map(Conn::H1)
    }

    async fn connect(&self) -> Result<Conn, Error> {
        let connect_err = |e: BoxError| Error {
            connect: true,
            client_body: false,
            source: e,
        };
        let io = self
            .connector
            .clone()
            .call(self.origin.clone())
            .await
            .map_err(connect_err)?;
        if io.connected().is_negotiated_h2() {
            let (tx, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(io)
                .await
                .map_err(|e| connect_err(e.into()))?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "upstream h2 connection ended");
                }
            });
            *self.h2.lock().expect("pool lock") = Some(tx.clone());
            self.protocol.store(PROTOCOL_H2, Ordering::Relaxed);
            Ok(Conn::H2(tx))
        } else {
            self.protocol.store(PROTOCOL_H1, Ordering::Relaxed);
            Ok(Conn::H1(h1::Conn::new(h1::Io::new(io))))
        }
    }
}

/// Builds the pooled upstream client.
pub fn client(config: &Config, tls: rustls::ClientConfig) -> UpstreamClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(config.timeouts.connect));
    http.set_keepalive(Some(Duration::from_secs(60)));

    let upstream_uri: http::Uri = config
        .upstream
        .url
        .as_str()
        .parse()
        .expect("validated upstream url is a uri");
    let connector = match Matcher::from_env().intercept(&upstream_uri) {
        Some(intercept) => {
            let mut tunnel = Tunnel::new(intercept.uri().clone(), http);
            if let Some(auth) = intercept.basic_auth() {
                let mut auth = auth.clone();
                auth.set_sensitive(true);
                tunnel = tunnel.with_auth(auth);
            }
            Route::Tunnel(tunnel)
        }
        None => Route::Direct(http),
    };
    let connector = Connector {
        route: connector,
        congestion: config.client_congestion.clone(),
    };
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_all_versions()
        .wrap_connector(connector);
    let origin = {
        let mut parts = http::uri::Parts::default();
        parts.scheme = upstream_uri.scheme().cloned();
        parts.authority = upstream_uri.authority().cloned();
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        Uri::from_parts(parts).expect("validated upstream url has scheme and host")
    };
    // As hyper-util's client did: the port only when it is not the scheme's default.
    let authority = upstream_uri.authority().expect("validated upstream host");
    let default_port = match upstream_uri.scheme_str() {
        Some("https") => 443,
        _ => 80,
    };
    let host = match authority.port_u16() {
        Some(p) if p != default_port => authority.as_str().to_string(),
        _ => authority.host().to_string(),
    };
    UpstreamClient {
        inner: Arc::new(Pool {
            connector: https,
            origin,
            host: HeaderValue::try_from(host).expect("a validated host is a header value"),
            h1: Arc::new(h1::Idle::default()),
            h2: Mutex::new(None),
            protocol: AtomicU8::new(PROTOCOL_UNKNOWN),
            connecting: tokio::sync::Mutex::new(()),
        }),
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use crate::tcp::Congestion;

    /// The connector hands every new connection to `tcp::on_connect`: on a host whose default
    /// paces (BBR), `auto` moves a connection to a loopback upstream to Reno and `system` keeps
    /// the default; elsewhere both keep the host's default.
    #[tokio::test]
    async fn loopback_upstream_connections_follow_the_congestion_setting() {
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let uri: Uri = format!("http://{}/", tcp.local_addr().unwrap())
            .parse()
            .unwrap();
        let host = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        for (mode, paced_becomes) in [(Congestion::Auto, "reno"), (Congestion::System, "bbr")] {
            let mut http = HttpConnector::new();
            http.enforce_http(false);
            let mut connector = Connector {
                route: Route::Direct(http),
                congestion: mode.clone(),
            };
            let io = connector.call(uri.clone()).await.unwrap();
            let _accepted = tcp.accept().await.unwrap();
            let algorithm = rustix::net::sockopt::tcp_congestion(io.inner()).unwrap();
            if host.starts_with("bbr") {
                let want = if paced_becomes == "bbr" {
                    host.as_str()
                } else {
                    paced_becomes
                };
                assert_eq!(algorithm, want, "{mode:?}");
            } else {
                assert_eq!(algorithm, host, "{mode:?}");
            }
        }
    }
}
