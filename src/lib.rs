//! aleph-proxy: an authenticating reverse proxy for Satellogic's Aleph API.
//!
//! # Layout
//! - [`config`]: figment layers -> validated [`config::Config`]; every problem reported at once.
//! - [`secret`]: the `Secret` type whose Debug/Display print a mask.
//! - [`token`]: token fetch (OAuth2 client credentials or legacy key), the refresher, the cache.
//! - [`upstream`]: the pooled hyper/rustls client, CA file and egress proxy.
//! - [`proxy`]: the forwarding handler, header policy, contract routing, access control,
//!   response stage (link rewriting).
//! - [`rewrite`]: pure rewriting of upstream links in JSON and headers.
//! - [`server`]: accept loops, connection limits, header timeouts, CORS, draining.
//! - [`admin`]: `/healthz`, `/readyz`, `/metrics`.
//! - [`error`]: the proxy's own errors and their one JSON shape.
//! - [`http1`]: the chunked coding decoder and head spans both HTTP/1.1 sides share.
//! - [`body`]: body types of the forwarding path (streaming, idle timeout, replay).
//! - [`splice`]: large response bodies moved socket to socket (`splice(2)`, Linux).
//! - [`telemetry`]: logging and the metrics recorder.
//! - [`mock`]: an in-process mock of the Aleph API and its token endpoint (`demo`, tests).
//! - [`cli`]: the command line.
#![forbid(unsafe_code)]

pub mod admin;
pub mod body;
pub mod cli;
pub mod config;
pub mod error;
pub mod http1;
pub mod mock;
pub mod proxy;
pub mod rewrite;
pub mod secret;
pub mod server;
pub mod splice;
pub mod tcp;
pub mod telemetry;
pub mod token;
pub mod upstream;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use config::Config;
use proxy::contract::{self, ContractInfo, Discovery};
use proxy::{Listener, Shared};
use token::{Token, TokenManager, Unauthorized};

/// Listeners bound before [`run`], so callers (tests, `demo`) can bind port 0 and learn the port.
pub struct Bound {
    pub proxies: Vec<TcpListener>,
    pub admin: TcpListener,
}

impl Bound {
    pub fn proxy_addrs(&self) -> Vec<SocketAddr> {
        self.proxies
            .iter()
            .map(|l| l.local_addr().expect("bound"))
            .collect()
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.local_addr().expect("bound")
    }
}

/// Binds every listener of the configuration.
pub async fn bind(config: &Config) -> std::io::Result<Bound> {
    let mut proxies = Vec::new();
    for l in &config.listeners {
        let tcp = TcpListener::bind(l.listen).await.map_err(|e| {
            std::io::Error::new(e.kind(), format!("cannot listen on {}: {e}", l.listen))
        })?;
        tcp::setup_listener(&tcp, l.listen, &config.client_congestion)?;
        proxies.push(tcp);
    }
    let admin = TcpListener::bind(config.admin_listen).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot listen on {} (admin): {e}", config.admin_listen),
        )
    })?;
    Ok(Bound { proxies, admin })
}

/// Everything a running proxy shares: the forwarding state and one token manager per credential.
pub struct Runtime {
    pub shared: Arc<Shared>,
    pub tokens: Vec<Arc<TokenManager>>,
}

impl Runtime {
    pub fn new(config: &Config) -> Result<Runtime, String> {
        let tls = upstream::tls_config(config.upstream_ca_file.as_deref())?;
        let client = upstream::client(config, tls.clone());
        let shared = Arc::new(Shared::new(config, client));
        let tokens = config
            .credentials
            .iter()
            .map(|c| TokenManager::new(c, tls.clone(), config.timeouts.token_request))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Runtime { shared, tokens })
    }

    /// `GET /contracts` with the credential's token.
    pub async fn list_contracts(&self, credential: usize) -> Result<Vec<ContractInfo>, String> {
        list_contracts(&self.shared, &self.tokens[credential]).await
    }
}

/// `GET /contracts` through the upstream client with a token of `tokens`.
pub async fn list_contracts(
    shared: &Shared,
    tokens: &TokenManager,
) -> Result<Vec<ContractInfo>, String> {
    let token = tokens
        .token()
        .await
        .map_err(|_| match tokens.last_error() {
            Some(e) => e.to_string(),
            None => "no access token".to_string(),
        })?;
    contracts_with(shared, &token).await.map_err(|e| match e {
        ContractsError::Unauthorized => "GET /contracts answered 401".to_string(),
        ContractsError::Other(e) | ContractsError::Permanent(e) => e,
    })
}

/// Why `GET /contracts` failed.
enum ContractsError {
    /// The upstream refused the token.
    Unauthorized,
    /// Unreachable, timed out, 5xx, 408, 429: worth another attempt.
    Other(String),
    /// An answer that will not change by asking again (another 4xx, a body that is not a
    /// contract list): discovery ends without a contract.
    Permanent(String),
}

/// `GET /contracts` with `token`.
async fn contracts_with(
    shared: &Shared,
    token: &Token,
) -> Result<Vec<ContractInfo>, ContractsError> {
    let target = shared.upstream_path("/contracts");
    let mut headers = http::HeaderMap::new();
    headers.insert(
        http::header::ACCEPT,
        http::HeaderValue::from_static("application/json"),
    );
    let token_field = [(proxy::headers::AUTHORIZATION_TOKEN, Some(&token.header))];
    let get = shared.client.request(
        &http::Method::GET,
        &target,
        &headers,
        &token_field,
        body::PassBody::Buffered(Bytes::new()),
    );
    let other = |s: &str| ContractsError::Other(s.to_string());
    let resp = tokio::time::timeout(shared.timeouts.response_headers, get)
        .await
        .map_err(|_| other("GET /contracts timed out"))?
        .map_err(|_| other("GET /contracts: cannot reach the upstream"))?;
    let status = resp.status();
    let body = http_body_util::Limited::new(resp.into_body(), 4 * 1024 * 1024)
        .collect()
        .await
        .map_err(|_| other("GET /contracts: body failed"))?
        .to_bytes();
    if status == http::StatusCode::UNAUTHORIZED {
        return Err(ContractsError::Unauthorized);
    }
    if !status.is_success() {
        let text = format!("GET /contracts answered {}", status.as_u16());
        let passing = status.is_server_error()
            || status == http::StatusCode::REQUEST_TIMEOUT
            || status == http::StatusCode::TOO_MANY_REQUESTS;
        return Err(if passing {
            ContractsError::Other(text)
        } else {
            ContractsError::Permanent(text)
        });
    }
    contract::parse_contracts(&body).map_err(ContractsError::Permanent)
}

/// Runs the proxy on already bound listeners until `shutdown` resolves, then drains.
/// Returns Ok(()) after a clean drain (also when the drain timeout cut requests off).
pub async fn run(
    config: Config,
    bound: Bound,
    shutdown: impl Future<Output = ()>,
) -> Result<(), String> {
    let rt = Runtime::new(&config)?;
    run_with(config, bound, rt, shutdown).await
}

/// [`run`] with a prepared [`Runtime`] (tests reach its token managers).
pub async fn run_with(
    config: Config,
    bound: Bound,
    rt: Runtime,
    shutdown: impl Future<Output = ()>,
) -> Result<(), String> {
    // Found while reading the configuration, before logging was set up.
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    let cancel = CancellationToken::new();
    let stop_background = CancellationToken::new();
    let metrics = telemetry::metrics_handle();

    for t in &rt.tokens {
        let stop = stop_background.clone();
        tokio::spawn(
            t.clone()
                .run_refresher(async move { stop.cancelled().await }),
        );
    }

    // Contract discovery, once per credential that some listener may fall back on.
    let mut discoveries: HashMap<usize, watch::Receiver<Discovery>> = HashMap::new();
    for l in &config.listeners {
        if discoveries.contains_key(&l.credential) {
            continue;
        }
        let needs = config
            .listeners
            .iter()
            .any(|x| x.credential == l.credential && x.contract.default.is_none());
        let (tx, rx) = watch::channel(if needs {
            Discovery::Pending
        } else {
            Discovery::NotOne("discovery is off because a default contract is set".into())
        });
        if needs {
            let shared = rt.shared.clone();
            let tokens = rt.tokens[l.credential].clone();
            let stop = stop_background.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = discover(shared, tokens, tx) => {}
                    _ = stop.cancelled() => {}
                }
            });
        }
        discoveries.insert(l.credential, rx);
    }

    if let Some(via) = config
        .upstream
        .url
        .as_str()
        .parse::<http::Uri>()
        .ok()
        .and_then(|u| upstream::egress_description(&u))
    {
        tracing::info!(via = %via, "upstream connections go through the egress proxy (HTTPS_PROXY / HTTP_PROXY)");
    }
    let runtime = tokio::runtime::Handle::current();
    tracing::info!(
        scheduler = match runtime.runtime_flavor() {
            tokio::runtime::RuntimeFlavor::CurrentThread => "current-thread",
            _ => "multi-thread",
        },
        worker_threads = runtime.metrics().num_workers(),
        "async runtime (TOKIO_WORKER_THREADS sets the worker threads)"
    );
    let settings = server::ConnSettings::new(&config);
    let mut tasks = Vec::new();
    for (lc, tcp) in config.listeners.iter().zip(bound.proxies) {
        let local_addr = tcp.local_addr().map_err(|e| e.to_string())?;
        let access = proxy::access::Access::new(&config.access, local_addr);
        if !local_addr.ip().is_loopback() && !config.access.any_guard() {
            tracing::warn!(
                listen = %local_addr,
                "EXPOSED: this listener is not on loopback and no access control is set, so anyone who can reach it uses these API credentials. Set access.key_file, access.allowed_cidrs or access.allowed_hosts."
            );
        }
        let listener = Arc::new(Listener {
            shared: rt.shared.clone(),
            tokens: rt.tokens[lc.credential].clone(),
            contracts: contract::ContractRouter::new(
                &lc.contract,
                discoveries[&lc.credential].clone(),
            ),
            access,
            local_addr,
            public_url: lc
                .public_url
                .as_ref()
                .map(|u| u.as_str().trim_end_matches('/').to_string()),
        });
        tracing::info!(
            listen = %local_addr,
            upstream = %config.upstream.url,
            contract = lc.contract.default.as_deref().unwrap_or("(routes/discovery)"),
            tcp_congestion_control = %tcp::describe(&tcp, &config.client_congestion),
            "proxy listening"
        );
        tasks.push(tokio::spawn(server::serve_proxy(
            tcp,
            listener,
            settings.clone(),
            cancel.clone(),
        )));
    }

    let admin_state = admin::AdminState {
        tokens: rt.tokens.clone(),
        shared: rt.shared.clone(),
        metrics,
        discoveries: discoveries.values().cloned().collect(),
    };
    let admin_cancel = CancellationToken::new();
    let admin_stop = admin_cancel.clone();
    tracing::info!(listen = %bound.admin.local_addr().map_err(|e| e.to_string())?, "admin listening (/healthz, /readyz, /metrics)");
    let admin_task = tokio::spawn(admin::serve(
        bound.admin,
        admin::router(admin_state),
        admin_stop,
        config.timeouts.request_headers,
    ));

    shutdown.await;
    tracing::info!(
        drain_timeout_s = config.drain_timeout.as_secs_f64(),
        "shutting down: no new connections; draining requests in flight"
    );
    // Readiness goes false first so an orchestrator stops routing here.
    rt.shared.draining.store(true, Ordering::Relaxed);
    cancel.cancel();
    let mut clean = true;
    for t in tasks {
        clean &= t.await.unwrap_or(false);
    }
    stop_background.cancel();
    admin_cancel.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(1), admin_task).await;
    tracing::info!(clean, "stopped");
    Ok(())
}

async fn discover(shared: Arc<Shared>, tokens: Arc<TokenManager>, tx: watch::Sender<Discovery>) {
    const PATH: &str = "/contracts";
    let mut attempt = 0;
    // The token a 401 refused, while the request is sent again with a newer one.
    let mut refused: Option<Arc<Token>> = None;
    loop {
        // A token outage is the refresher's to handle: wait for its token instead of failing and
        // backing off, so discovery finishes as soon as the token endpoint recovers (a backoff of
        // up to a minute here would keep answering 422 after the outage is over).
        let token = loop {
            if let Some(t) = tokens.current_usable() {
                break t;
            }
            let _ = tokens.wait_for_token(Duration::from_secs(3600)).await;
        };
        let result = contracts_with(&shared, &token).await;
        // A 401 with a token the proxy believed valid (a revoked, e.g. cached, token) follows
        // the rules of any upstream 401: one new token, then the request once more.
        let result = match (result, refused.take()) {
            (Err(ContractsError::Unauthorized), Some(before)) => {
                tokens.replay_answered(&before, &token, PATH, true);
                Err(ContractsError::Permanent(
                    "GET /contracts answered 401, with a new access token too".to_string(),
                ))
            }
            (Err(ContractsError::Unauthorized), None) => {
                match tokens.unauthorized(&token, PATH).await {
                    Unauthorized::Replay(_) => {
                        refused = Some(token);
                        continue;
                    }
                    Unauthorized::PassThrough(_) => Err(ContractsError::Other(
                        "GET /contracts answered 401".to_string(),
                    )),
                }
            }
            (Err(e), _) => Err(e),
            (Ok(list), before) => {
                if let Some(before) = before {
                    tokens.replay_answered(&before, &token, PATH, false);
                }
                Ok(list)
            }
        };
        match result {
            Ok(list) => {
                let outcome = contract::discovery_outcome(&list);
                match &outcome {
                    Discovery::One(h) => tracing::info!(
                        contract = h.to_str().unwrap_or("?"),
                        "discovered the credential's only contract"
                    ),
                    Discovery::NotOne(why) => tracing::warn!(
                        "no contract discovered: {why}; paths without a route get a 422 until contract.default is set"
                    ),
                    Discovery::Pending => {}
                }
                tx.send_replace(outcome);
                return;
            }
            Err(ContractsError::Permanent(why)) => {
                tracing::warn!(
                    "no contract discovered: {why}; paths without a route get a 422 until contract.default is set"
                );
                tx.send_replace(Discovery::NotOne(why));
                return;
            }
            Err(e) => {
                let e = match e {
                    ContractsError::Other(e) | ContractsError::Permanent(e) => e,
                    ContractsError::Unauthorized => "GET /contracts answered 401".to_string(),
                };
                let delay = token::schedule::backoff(
                    attempt,
                    Duration::from_secs(1),
                    Duration::from_secs(60),
                    rand::random(),
                );
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "contract discovery failed; retrying");
                attempt += 1;
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// SIGTERM and SIGINT (Ctrl-C), counted: [`Signals::first`] starts the drain, and
/// [`Signals::second`] stops at once for someone who does not want to wait for it.
///
/// The handlers are installed by [`shutdown_signals`], not when a future is first polled: `run`
/// polls its shutdown future only after start-up, and a SIGTERM arriving in between would
/// otherwise take the default action and kill the process with a non-zero status instead of
/// draining.
pub struct Signals {
    received: watch::Receiver<u32>,
}

impl Signals {
    /// Resolves on the first signal.
    pub fn first(&self) -> impl Future<Output = ()> + Send + 'static {
        self.nth(1)
    }

    /// Resolves on the second signal.
    pub fn second(&self) -> impl Future<Output = ()> + Send + 'static {
        self.nth(2)
    }

    fn nth(&self, n: u32) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.received.clone();
        async move {
            if rx.wait_for(|&c| c >= n).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

/// Installs the SIGTERM, SIGINT and SIGHUP handlers and counts the signals. Must be called within
/// a Tokio runtime. SIGHUP (a closed terminal, or a reload sent out of habit: the proxy has no
/// reload) drains like SIGTERM instead of killing the process with requests in flight.
pub fn shutdown_signals() -> Signals {
    let (tx, received) = watch::channel(0u32);
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut int = signal(SignalKind::interrupt()).ok();
        let mut term = signal(SignalKind::terminate()).ok();
        let mut hup = signal(SignalKind::hangup()).ok();
        tokio::spawn(async move {
            async fn recv(s: &mut Option<tokio::signal::unix::Signal>) {
                match s.as_mut() {
                    Some(s) => {
                        if s.recv().await.is_none() {
                            std::future::pending::<()>().await;
                        }
                    }
                    None => std::future::pending::<()>().await,
                }
            }
            loop {
                let name = tokio::select! {
                    _ = recv(&mut int) => "SIGINT",
                    _ = recv(&mut term) => "SIGTERM",
                    _ = recv(&mut hup) => "SIGHUP",
                };
                counted(&tx, name);
            }
        });
    }
    #[cfg(not(unix))]
    tokio::spawn(async move {
        while tokio::signal::ctrl_c().await.is_ok() {
            counted(&tx, "SIGINT");
        }
    });
    Signals { received }
}

/// Counts one more signal and says what it does. Said first: the tasks the count wakes log
/// what they do next ("shutting down", "stopped"), and those lines must come after this one.
fn counted(tx: &watch::Sender<u32>, name: &str) {
    if *tx.borrow() == 0 {
        tracing::info!("{name} received");
    } else {
        tracing::warn!("{name} received again: stopping now; requests still in flight are cut off");
    }
    tx.send_modify(|c| *c += 1);
}

/// [`run`] until the first SIGTERM or SIGINT, then drains; a second one ends the drain at once.
pub async fn run_until_signalled(config: Config, bound: Bound) -> Result<(), String> {
    let signals = shutdown_signals();
    tokio::select! {
        r = run(config, bound, signals.first()) => r,
        () = signals.second() => Ok(()),
    }
}
