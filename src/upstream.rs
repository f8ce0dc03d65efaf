//! The connection to the upstream API: a connection pool over hyper's connection API with rustls
//! (webpki roots, the system's roots and `upstream_ca_file`), connect timeout, and the egress
//! proxy from `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY` (a CONNECT tunnel) decided once at start-up,
//! since the upstream never changes. The same TLS settings serve the token client (reqwest).
//!
//! Why not hyper-util's pooled `Client`: it serves any number of hosts, and pays for that on
//! every request (two pool locks, a spawned task that waits to return the connection, a `Host`
//! header formatted each time). This proxy has one upstream, so its pool is a stack of HTTP/1.1
//! connections (or one shared HTTP/2 connection when TLS negotiates h2); BENCHMARKS.md has the
//! numbers.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::header::{HeaderValue, HOST};
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
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
pub enum Connector {
    Direct(HttpConnector),
    Tunnel(Tunnel<HttpConnector>),
}

impl Service<http::Uri> for Connector {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        match self {
            Connector::Direct(c) => c.poll_ready(cx).map_err(Into::into),
            Connector::Tunnel(t) => t.poll_ready(cx).map_err(Into::into),
        }
    }

    fn call(&mut self, dst: http::Uri) -> Self::Future {
        match self {
            Connector::Direct(c) => {
                let fut = c.call(dst);
                Box::pin(async move { fut.await.map_err(Into::into) })
            }
            Connector::Tunnel(t) => {
                let fut = t.call(dst);
                Box::pin(async move { fut.await.map_err(Into::into) })
            }
        }
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

/// Idle connections kept at most; more are closed once their response is read.
const MAX_IDLE: usize = 1024;
/// Idle connections unused this long are closed (servers drop them around then anyway).
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// A failed upstream request: connecting (nothing was sent) or the request itself.
#[derive(Debug)]
pub struct Error {
    connect: bool,
    source: BoxError,
}

impl Error {
    /// The connection could not be made, so the request never left: safe to retry.
    pub fn is_connect(&self) -> bool {
        self.connect
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.connect {
            "upstream connect error"
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
    /// HTTP/1.1 connections: idle ones and ones still reading a response (not ready yet), most
    /// recently used last. A connection is put back as soon as its response headers arrive, so
    /// no task has to wait for the body to end; `is_ready` tells which are free.
    h1: Mutex<Vec<Pooled>>,
    /// The HTTP/2 connection, when TLS negotiated h2: one carries every request.
    h2: Mutex<Option<http2::SendRequest<PassBody>>>,
}

struct Pooled {
    tx: http1::SendRequest<PassBody>,
    used: Instant,
}

enum Conn {
    H1(http1::SendRequest<PassBody>),
    H2(http2::SendRequest<PassBody>),
}

impl UpstreamClient {
    /// Sends `req` (absolute URI of the upstream) and returns the response once its headers
    /// arrived. A pooled HTTP/1.1 connection that turns out closed before the request was
    /// written is skipped; the request then goes on another or a new connection.
    pub async fn request(&self, mut req: Request<PassBody>) -> Result<Response<Incoming>, Error> {
        let pool = &*self.inner;
        loop {
            let (conn, fresh) = match pool.checkout() {
                Some(c) => (c, false),
                None => (pool.connect().await?, true),
            };
            match conn {
                Conn::H2(mut tx) => {
                    return tx.send_request(req).await.map_err(|e| Error {
                        connect: false,
                        source: e.into(),
                    });
                }
                Conn::H1(mut tx) => {
                    if req.uri().scheme().is_some() {
                        // origin-form: the connection already goes to the upstream.
                        let pq = req.uri().path_and_query().cloned();
                        let mut parts = http::uri::Parts::default();
                        parts.path_and_query = pq;
                        *req.uri_mut() = Uri::from_parts(parts).unwrap_or_else(|_| Uri::default());
                    }
                    if !req.headers().contains_key(HOST) {
                        req.headers_mut().insert(HOST, pool.host.clone());
                    }
                    match tx.try_send_request(req).await {
                        Ok(resp) => {
                            pool.checkin(tx);
                            return Ok(resp);
                        }
                        Err(mut e) => match e.take_message() {
                            // Not written: a pooled connection closed while idle. Try another
                            // (a fresh one failing is an upstream that hangs up at once).
                            Some(r) if !fresh => req = r,
                            _ => {
                                return Err(Error {
                                    connect: false,
                                    source: e.into_error().into(),
                                })
                            }
                        },
                    }
                }
            }
        }
    }
}

impl Pool {
    fn checkout(&self) -> Option<Conn> {
        if let Some(tx) = self.h2.lock().expect("pool lock").as_ref() {
            if !tx.is_closed() {
                return Some(Conn::H2(tx.clone()));
            }
        }
        let mut h1 = self.h1.lock().expect("pool lock");
        let now = Instant::now();
        let mut i = h1.len();
        while i > 0 {
            i -= 1;
            let p = &h1[i];
            if p.tx.is_closed() || (now.duration_since(p.used) > IDLE_TIMEOUT && p.tx.is_ready()) {
                h1.swap_remove(i);
            } else if p.tx.is_ready() {
                return Some(Conn::H1(h1.swap_remove(i).tx));
            }
        }
        None
    }

    fn checkin(&self, tx: http1::SendRequest<PassBody>) {
        let mut h1 = self.h1.lock().expect("pool lock");
        if h1.len() < MAX_IDLE {
            h1.push(Pooled {
                tx,
                used: Instant::now(),
            });
        }
    }

    async fn connect(&self) -> Result<Conn, Error> {
        let connect_err = |e: BoxError| Error {
            connect: true,
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
            Ok(Conn::H2(tx))
        } else {
            let (tx, conn) = http1::Builder::new()
                .handshake(io)
                .await
                .map_err(|e| connect_err(e.into()))?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "upstream connection ended");
                }
            });
            Ok(Conn::H1(tx))
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
            Connector::Tunnel(tunnel)
        }
        None => Connector::Direct(http),
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
            h1: Mutex::new(Vec::new()),
            h2: Mutex::new(None),
        }),
    }
}
