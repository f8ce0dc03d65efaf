//! The connection to the upstream API: one pooled hyper client with rustls (webpki roots, the
//! system's roots and `upstream_ca_file`), connect timeout, and the egress proxy from
//! `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY` (a CONNECT tunnel) decided once at start-up, since the
//! upstream never changes. The same TLS settings serve the token client (reqwest).

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tower::Service;

use crate::body::{BoxError, PassBody};
use crate::config::Config;

pub type UpstreamClient = Client<HttpsConnector<Connector>, PassBody>;

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
    Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(1024)
        .build(https)
}
