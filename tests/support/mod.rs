//! Test support: the mock Aleph API plus the real proxy on ephemeral loopback ports, and helpers
//! to await conditions instead of sleeping.
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use aleph_proxy::config::{self, Config};
use aleph_proxy::mock::{Mock, MockOptions, MOCK_CLIENT_ID, MOCK_CLIENT_SECRET};
use aleph_proxy::token::TokenManager;
use figment::providers::{Format, Toml};
use figment::Figment;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub struct Harness {
    pub mock: Mock,
    /// The first proxy listener.
    pub proxy: SocketAddr,
    pub proxies: Vec<SocketAddr>,
    pub admin: SocketAddr,
    pub tokens: Vec<Arc<TokenManager>>,
    pub config: Config,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), String>>>,
}

/// The TOML every harness starts from: the mock's endpoints and credentials, ports 0, fast
/// backoff so recovery tests finish quickly.
pub fn base_toml(mock: &Mock) -> String {
    format!(
        r#"
listen = "127.0.0.1:0"
upstream = "{api}"
[auth]
token_url = "{token}"
client_id = "{id}"
client_secret = "{secret}"
wait_timeout = "3s"
retry_initial_backoff = "50ms"
retry_max_backoff = "200ms"
[admin]
listen = "127.0.0.1:0"
"#,
        api = mock.api_url,
        token = mock.token_url,
        id = MOCK_CLIENT_ID,
        secret = MOCK_CLIENT_SECRET,
    )
}

/// Parses `base_toml(mock)` merged with `extra` (later keys win), never reading the environment.
pub fn config_for(mock: &Mock, extra: &str) -> Config {
    let fig = Figment::from(Toml::string(&base_toml(mock))).merge(Toml::string(extra));
    config::from_figment(&fig).unwrap_or_else(|e| panic!("test config: {e}"))
}

impl Harness {
    /// Mock with default options, proxy with `extra` TOML on top of the base config.
    pub async fn start(extra: &str) -> Harness {
        Self::start_with(MockOptions::default(), extra).await
    }

    pub async fn start_with(opts: MockOptions, extra: &str) -> Harness {
        let mock = Mock::start(opts).await.expect("mock starts");
        Self::start_proxy(mock, extra).await
    }

    /// Starts the proxy in front of an existing mock.
    pub async fn start_proxy(mock: Mock, extra: &str) -> Harness {
        let config = config_for(&mock, extra);
        Self::start_config(mock, config).await
    }

    pub async fn start_config(mock: Mock, config: Config) -> Harness {
        aleph_proxy::telemetry::init_logging(config::LogFormat::Text);
        let bound = aleph_proxy::bind(&config).await.expect("bind");
        let proxies = bound.proxy_addrs();
        let admin = bound.admin_addr();
        let rt = aleph_proxy::Runtime::new(&config).expect("runtime");
        let tokens = rt.tokens.clone();
        let (stop, rx) = oneshot::channel::<()>();
        let cfg = config.clone();
        let task = tokio::spawn(async move {
            aleph_proxy::run_with(cfg, bound, rt, async {
                let _ = rx.await;
            })
            .await
        });
        Harness {
            mock,
            proxy: proxies[0],
            proxies,
            admin,
            tokens,
            config,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.proxy, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    /// The admin endpoint's `/metrics` text.
    pub async fn metrics(&self) -> String {
        client()
            .get(self.admin_url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The value of the proxy's metric `name`, one without labels.
    pub async fn metric(&self, name: &str) -> f64 {
        self.metrics()
            .await
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("{name} is not exported"))
            .trim()
            .parse()
            .unwrap()
    }

    /// The requests this proxy has in flight, as `/readyz` reports them. (Not the
    /// `aleph_proxy_in_flight_requests` gauge: it is set from the scraped proxy's count when
    /// `/metrics` is scraped, in a recorder that every proxy of a test binary shares, so a
    /// scrape of another test's proxy between that set and the rendering would show its count.)
    pub async fn in_flight(&self) -> u64 {
        let body = get_json(&self.admin_url("/readyz")).await;
        body["in_flight"]
            .as_u64()
            .unwrap_or_else(|| panic!("/readyz has no in_flight count: {body}"))
    }

    /// Number of token endpoint requests so far.
    pub fn token_fetches(&self) -> u64 {
        self.mock
            .state
            .token_fetches
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits until the proxy holds a usable token (readiness), at most 10 s.
    pub async fn ready(&self) {
        let c = client();
        let url = self.admin_url("/readyz");
        eventually(Duration::from_secs(10), || {
            let c = c.clone();
            let url = url.clone();
            async move {
                c.get(&url)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
            }
        })
        .await;
    }

    /// Stops the proxy (as SIGTERM would) and waits for it to finish draining.
    pub async fn shutdown(mut self) -> Result<(), String> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.task.take().unwrap().await.unwrap()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// An HTTP client that follows no redirects and ignores proxy environment variables.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .pool_max_idle_per_host(256)
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

/// Polls `cond` until it is true; panics after `limit`.
pub async fn eventually<F, Fut>(limit: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if cond().await {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("condition not met within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Parses a proxy error body and returns its code, asserting the marker header and shape.
pub async fn proxy_error(resp: reqwest::Response) -> (u16, String) {
    let status = resp.status().as_u16();
    let header = resp
        .headers()
        .get("x-aleph-proxy-error")
        .map(|v| v.to_str().unwrap().to_string())
        .expect("proxy error header");
    let v: serde_json::Value = resp.json().await.expect("json error body");
    assert_eq!(v["error"]["source"], "aleph-proxy");
    assert_eq!(v["error"]["code"], header.as_str());
    assert_eq!(v["error"]["status"], status);
    (status, header)
}

/// The path of the built binary (for tests of the command line and signals).
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_aleph-proxy")
}

/// Mock options for a credential with two contracts (`MOCK_CONTRACT` "A", `MOCK_CONTRACT_2` "B").
pub fn two_contracts() -> MockOptions {
    MockOptions {
        contracts: vec![
            (aleph_proxy::mock::MOCK_CONTRACT.into(), "A".into()),
            (aleph_proxy::mock::MOCK_CONTRACT_2.into(), "B".into()),
        ],
        ..MockOptions::default()
    }
}

/// GET `url` and parse the JSON body.
pub async fn get_json(url: &str) -> serde_json::Value {
    client()
        .get(url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}
