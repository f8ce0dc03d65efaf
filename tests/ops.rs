//! Operations: Prometheus metrics, the command line (every subcommand, run as the real binary),
//! the token cache across restarts, JSON logs with request ids, and the container's contract
//! (configuration from the environment alone, the `healthcheck` probe).
//!
//! Subcommand tests spawn the built binary against a mock API started in the test; ports are
//! ephemeral and every wait polls a condition.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aleph_proxy::mock::{
    Mock, MockOptions, TokenMode, MOCK_CLIENT_ID, MOCK_CLIENT_SECRET, MOCK_CONTRACT,
    MOCK_CONTRACT_2,
};
use support::{client, eventually, Harness};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const WAIT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// Helpers

/// The binary with a clean environment: no ALEPH_PROXY_* or RUST_LOG of the developer's shell, no
/// HTTP proxy (the token client honours HTTPS_PROXY), so only what a test sets is configuration.
fn aleph() -> Command {
    let mut c = Command::new(support::binary());
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().to_string();
        let upper = k.to_ascii_uppercase();
        if upper.starts_with("ALEPH_PROXY_")
            || upper == "RUST_LOG"
            || upper.ends_with("_PROXY")
            || upper == "NO_PROXY"
        {
            c.env_remove(&k);
        }
    }
    c.stdin(Stdio::null()).kill_on_drop(true);
    c
}

struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

async fn output(mut c: Command) -> Out {
    let o = tokio::time::timeout(WAIT, c.output())
        .await
        .expect("the command finishes")
        .expect("the binary runs");
    Out {
        code: o.status.code(),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

/// A loopback port nobody listens on right now (bound, then released for the binary to take),
/// and never one this test binary handed out before: the OS may give a released port again at
/// once, and `free_addr(), free_addr()` as proxy and admin address would then be one port (a
/// config error, exit 2).
fn free_addr() -> SocketAddr {
    static GIVEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        if GIVEN.lock().unwrap().insert(addr.port()) {
            return addr;
        }
    }
}

/// Two distinct free ports (proxy, admin).
fn free_pair() -> (SocketAddr, SocketAddr) {
    (free_addr(), free_addr())
}

/// The mock's endpoints and credentials as TOML, ports as given, fast token retries; `extra` is
/// appended (it starts inside `[auth]`, so it may set auth keys before opening its own tables).
fn toml_for(mock: &Mock, proxy: SocketAddr, admin: SocketAddr, extra: &str) -> String {
    format!(
        r#"
listen = "{proxy}"
upstream = "{api}"
[admin]
listen = "{admin}"
[auth]
token_url = "{token}"
client_id = "{id}"
client_secret = "{secret}"
wait_timeout = "5s"
retry_initial_backoff = "50ms"
retry_max_backoff = "200ms"
{extra}
"#,
        api = mock.api_url,
        token = mock.token_url,
        id = MOCK_CLIENT_ID,
        secret = MOCK_CLIENT_SECRET,
    )
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn fetches(mock: &Mock) -> u64 {
    mock.state
        .token_fetches
        .load(std::sync::atomic::Ordering::SeqCst)
}

#[cfg(unix)]
fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// A running `aleph-proxy` process with its stderr collected line by line.
struct Running {
    /// std Mutex: only locked for `try_wait`, never across an await.
    child: Mutex<Child>,
    proxy: SocketAddr,
    admin: SocketAddr,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Running {
    /// Spawns `c` (already given its configuration) and collects its stderr.
    fn spawn(mut c: Command, proxy: SocketAddr, admin: SocketAddr) -> Running {
        c.stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = c.spawn().expect("the binary starts");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let lines = stderr.clone();
        let pipe = child.stderr.take().unwrap();
        // Read continuously: a full pipe would block the proxy's logging.
        tokio::spawn(async move {
            let mut r = BufReader::new(pipe).lines();
            while let Ok(Some(l)) = r.next_line().await {
                lines.lock().unwrap().push(l);
            }
        });
        Running {
            child: Mutex::new(child),
            proxy,
            admin,
            stderr,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.proxy, path)
    }

    fn logs(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }

    async fn status(&self, path: &str) -> Option<u16> {
        client()
            .get(format!("http://{}{path}", self.admin))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()
            .map(|r| r.status().as_u16())
    }

    /// Panics with the logs when the process has exited (a port taken meanwhile, a bad config),
    /// rather than letting a wait run into its timeout.
    fn assert_running(&self) {
        if let Ok(Some(status)) = self.child.lock().unwrap().try_wait() {
            panic!("aleph-proxy exited ({status}):\n{}", self.logs().join("\n"));
        }
    }

    /// Waits until `path` on the admin listener answers 200.
    async fn admin_ok(&self, path: &str) {
        eventually(WAIT, || async {
            self.assert_running();
            self.status(path).await == Some(200)
        })
        .await;
    }

    /// Waits for /readyz to answer 200.
    async fn ready(&self) {
        self.admin_ok("/readyz").await;
    }

    /// Waits until the process answers /healthz (alive, ready or not).
    async fn alive(&self) {
        self.admin_ok("/healthz").await;
    }

    /// Kills the process (SIGKILL: whatever it persisted must already be on disk) and reaps it.
    async fn kill(self) -> Vec<String> {
        let Running { child, stderr, .. } = self;
        let mut child = child.into_inner().unwrap();
        child.kill().await.unwrap();
        // Let the reader drain what the process wrote before it died.
        eventually(Duration::from_secs(5), || {
            // The reader task holds the other reference until it reaches EOF.
            let n = Arc::strong_count(&stderr);
            async move { n == 1 }
        })
        .await;
        let lines = stderr.lock().unwrap().clone();
        lines
    }
}

/// `aleph-proxy run --config <file>` on fresh ports.
async fn run_binary(mock: &Mock, dir: &Path, extra: &str) -> Running {
    let (proxy, admin) = free_pair();
    let cfg = write(
        dir,
        &format!("run-{}.toml", proxy.port()),
        &toml_for(mock, proxy, admin, extra),
    );
    let mut c = aleph();
    c.arg("run").arg("--config").arg(&cfg);
    Running::spawn(c, proxy, admin)
}

// ---------------------------------------------------------------------------------------------
// Prometheus exposition

#[derive(Debug, Default)]
struct Exposition {
    help: BTreeMap<String, String>,
    types: BTreeMap<String, String>,
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

/// A line parser for the text format as the exporter writes it (no escaped quotes in our labels).
fn parse_exposition(text: &str) -> Exposition {
    let mut e = Exposition::default();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            e.help.insert(name.into(), help.into());
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, ty) = rest.split_once(' ').expect("TYPE has a type");
            e.types.insert(name.into(), ty.into());
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("sample has a value");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad sample value: {line}")),
        };
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').expect("labels close");
                let labels = body
                    .split(',')
                    .filter(|kv| !kv.is_empty())
                    .map(|kv| {
                        let (k, v) = kv.split_once('=').expect("label k=v");
                        (k.to_string(), v.trim_matches('"').to_string())
                    })
                    .collect();
                (name.to_string(), labels)
            }
            None => (series.to_string(), BTreeMap::new()),
        };
        e.samples.push((name, labels, value));
    }
    e
}

impl Exposition {
    /// Sum of the samples of `name` whose labels include every pair of `want`.
    fn sum(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && want
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, _, v)| v)
            .sum()
    }

    fn has(&self, name: &str) -> bool {
        self.samples.iter().any(|(n, _, _)| n == name)
    }
}

async fn scrape(admin: &str) -> Exposition {
    let r = client().get(admin).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let ct = r.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("text/plain"), "{ct}");
    parse_exposition(&r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_exposed_and_move_with_traffic() {
    let h = Harness::start("").await;
    h.ready().await;
    let c = client();
    let metrics_url = h.admin_url("/metrics");
    let before = scrape(&metrics_url).await;
    // Label-less series exist from the first scrape, before any event.
    for name in [
        "aleph_proxy_unauthorized_refreshes_total",
        "aleph_proxy_links_rewritten_total",
        "aleph_proxy_in_flight_requests",
        "aleph_proxy_token_invalidations_total",
        "aleph_proxy_connections_rejected_total",
    ] {
        assert!(before.has(name), "{name} missing before traffic");
    }

    for _ in 0..3 {
        let r = c.get(h.url("/tasking/products/")).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    // A 404 from the upstream: a 4xx of the same method.
    let r = c.get(h.url("/no/such/thing")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    // A revoked token: the upstream answers 401, the proxy refreshes once and replays.
    let fetched = h.token_fetches();
    h.mock.state.revoke_all_tokens();
    let r = c.get(h.url("/tasking/products/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(h.token_fetches(), fetched + 1);
    // A paginated answer whose links the rewriter points back at the proxy (once it lands).
    let r = c
        .get(h.url("/tasking/tasks/?limit=2"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // A POST, so the method label moves too.
    let r = c.post(h.url("/echo/x")).body("hello").send().await.unwrap();
    assert_eq!(r.status(), 200);

    // In flight: a slow upstream keeps a request open while we scrape.
    *h.mock.state.api_delay.lock().unwrap() = Duration::from_millis(1500);
    let slow = tokio::spawn({
        let c = c.clone();
        let url = h.url("/tasking/products/");
        async move { c.get(url).send().await.unwrap().status() }
    });
    let in_flight_seen = Arc::new(Mutex::new(0.0f64));
    eventually(WAIT, || {
        let url = metrics_url.clone();
        let seen = in_flight_seen.clone();
        async move {
            let v = scrape(&url)
                .await
                .sum("aleph_proxy_in_flight_requests", &[]);
            *seen.lock().unwrap() = v;
            v >= 1.0
        }
    })
    .await;
    assert_eq!(slow.await.unwrap(), 200);
    *h.mock.state.api_delay.lock().unwrap() = Duration::ZERO;

    let after = scrape(&metrics_url).await;

    // Every metric the issue names, with the type the README documents.
    let expected = [
        ("aleph_proxy_requests_total", "counter"),
        ("aleph_proxy_upstream_duration_seconds", "histogram"),
        ("aleph_proxy_in_flight_requests", "gauge"),
        ("aleph_proxy_token_fetches_total", "counter"),
        ("aleph_proxy_token_expiry_seconds", "gauge"),
        ("aleph_proxy_unauthorized_refreshes_total", "counter"),
        ("aleph_proxy_links_rewritten_total", "counter"),
        ("aleph_proxy_token_fetch_duration_seconds", "histogram"),
        ("aleph_proxy_token_invalidations_total", "counter"),
    ];
    for (name, ty) in expected {
        assert_eq!(
            after.types.get(name).map(String::as_str),
            Some(ty),
            "TYPE of {name}"
        );
        assert!(after.help.contains_key(name), "HELP of {name}");
    }

    // Requests by method and status class; other tests in this process only add to them.
    let get2 = |e: &Exposition| {
        e.sum(
            "aleph_proxy_requests_total",
            &[("method", "GET"), ("status", "2xx")],
        )
    };
    assert!(get2(&after) >= get2(&before) + 6.0, "GET 2xx moved");
    let get4 = |e: &Exposition| {
        e.sum(
            "aleph_proxy_requests_total",
            &[("method", "GET"), ("status", "4xx")],
        )
    };
    assert!(get4(&after) >= get4(&before) + 1.0, "GET 4xx moved");
    let post2 = |e: &Exposition| {
        e.sum(
            "aleph_proxy_requests_total",
            &[("method", "POST"), ("status", "2xx")],
        )
    };
    assert!(post2(&after) >= post2(&before) + 1.0, "POST 2xx moved");

    // The histogram: count and sum move, buckets are cumulative and end in +Inf == count.
    let count = after.sum("aleph_proxy_upstream_duration_seconds_count", &[]);
    assert!(count >= before.sum("aleph_proxy_upstream_duration_seconds_count", &[]) + 8.0);
    assert!(after.sum("aleph_proxy_upstream_duration_seconds_sum", &[]) >= 1.5);
    let inf = after.sum(
        "aleph_proxy_upstream_duration_seconds_bucket",
        &[("le", "+Inf")],
    );
    assert_eq!(inf, count);

    // Token fetches by outcome; the refresh after the 401 was one of them.
    let ok = |e: &Exposition| e.sum("aleph_proxy_token_fetches_total", &[("outcome", "success")]);
    assert!(ok(&after) >= ok(&before) + 1.0);
    let refreshes = |e: &Exposition| e.sum("aleph_proxy_unauthorized_refreshes_total", &[]);
    assert!(refreshes(&after) >= refreshes(&before) + 1.0);
    assert!(
        after.sum("aleph_proxy_token_invalidations_total", &[])
            >= before.sum("aleph_proxy_token_invalidations_total", &[]) + 1.0
    );

    // Seconds to expiry of this credential's token: about a day (the mock's lifetime).
    let expiry = after.sum(
        "aleph_proxy_token_expiry_seconds",
        &[("client_id", MOCK_CLIENT_ID)],
    );
    assert!(expiry > 80_000.0 && expiry <= 86_400.0, "{expiry}");

    // The gauge went up while the slow request was open and back down after it.
    let peak = *in_flight_seen.lock().unwrap();
    assert!(peak >= 1.0);
    eventually(WAIT, || {
        let url = metrics_url.clone();
        async move {
            scrape(&url)
                .await
                .sum("aleph_proxy_in_flight_requests", &[])
                < peak
        }
    })
    .await;
}

#[tokio::test]
async fn a_token_fetch_failure_is_counted_by_outcome() {
    let mock = Mock::start(MockOptions::default()).await.unwrap();
    mock.state.set_token_mode(TokenMode::Reject);
    let h = Harness::start_proxy(mock, "").await;
    let url = h.admin_url("/metrics");
    eventually(WAIT, || {
        let url = url.clone();
        async move {
            scrape(&url).await.sum(
                "aleph_proxy_token_fetches_total",
                &[("outcome", "rejected")],
            ) >= 1.0
        }
    })
    .await;
    // Not ready without a token, and the readiness body says why.
    let r = client().get(h.admin_url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let v: serde_json::Value = r.json().await.unwrap();
    assert!(v["tokens"][0]["last_error"]
        .as_str()
        .unwrap()
        .contains("rejected"));
}

// ---------------------------------------------------------------------------------------------
// Command line

#[tokio::test]
async fn version_and_help_for_every_subcommand() {
    let mut c = aleph();
    c.arg("--version");
    let o = output(c).await;
    assert_eq!(o.code, Some(0));
    assert_eq!(
        o.stdout.trim(),
        format!("aleph-proxy {}", env!("CARGO_PKG_VERSION"))
    );

    let mut c = aleph();
    c.arg("--help");
    let o = output(c).await;
    assert_eq!(o.code, Some(0));
    for sub in ["run", "demo", "check", "token", "contracts", "healthcheck"] {
        assert!(o.stdout.contains(sub), "top-level help lists {sub}");
    }
    for sub in ["run", "demo", "check", "token", "contracts", "healthcheck"] {
        let mut c = aleph();
        c.args([sub, "--help"]);
        let o = output(c).await;
        assert_eq!(o.code, Some(0), "{sub} --help");
        assert!(o.stdout.contains("--config"), "{sub} takes --config");
        assert!(
            o.stdout.contains("Usage: aleph-proxy"),
            "{sub}: {}",
            o.stdout
        );
        let mut c = aleph();
        c.args([sub, "--version"]);
        let o = output(c).await;
        assert_eq!(o.code, Some(0), "{sub} --version");
        assert!(
            o.stdout.contains(env!("CARGO_PKG_VERSION")),
            "{sub}: {}",
            o.stdout
        );
    }
    let mut c = aleph();
    c.args(["contracts", "--help"]);
    assert!(output(c).await.stdout.contains("--json"));
    let mut c = aleph();
    c.args(["healthcheck", "--help"]);
    assert!(output(c).await.stdout.contains("--timeout"));
    // An unknown subcommand is a usage error, not a silent `run`.
    let mut c = aleph();
    c.arg("frobnicate");
    assert_eq!(output(c).await.code, Some(2));
}

#[tokio::test]
async fn check_passes_and_prints_the_contract_of_each_route() {
    let mock = Mock::start(support::two_contracts()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let extra = format!(
        r#"
[contract]
default = "{MOCK_CONTRACT}"
[[contract.routes]]
prefix = "/tasking"
id = "{MOCK_CONTRACT_2}"
"#
    );
    let cfg = write(
        dir.path(),
        "ok.toml",
        &toml_for(&mock, free_addr(), free_addr(), &extra),
    );
    let mut c = aleph();
    c.arg("check").arg("--config").arg(&cfg);
    let o = output(c).await;
    assert_eq!(o.code, Some(0), "{}\n{}", o.stdout, o.stderr);
    assert!(o.stdout.contains("configuration: ok"), "{}", o.stdout);
    assert!(o.stdout.contains("token ok"), "{}", o.stdout);
    assert!(
        o.stdout
            .contains(&format!("contracts: {MOCK_CONTRACT}, {MOCK_CONTRACT_2}")),
        "{}",
        o.stdout
    );
    assert!(
        o.stdout
            .contains(&format!("/tasking/... -> {MOCK_CONTRACT_2}")),
        "{}",
        o.stdout
    );
    assert!(
        o.stdout
            .contains(&format!("everything else -> {MOCK_CONTRACT}")),
        "{}",
        o.stdout
    );
    assert!(o.stdout.contains("/contracts -> (no contract header)"));
    assert!(o.stdout.contains("all good"));
    // Neither the secret nor the token appears anywhere.
    let issued = mock.state.issued_tokens();
    assert_eq!(issued.len(), 1);
    for out in [&o.stdout, &o.stderr] {
        assert!(!out.contains(MOCK_CLIENT_SECRET));
        assert!(!out.contains(&issued[0]));
    }
}

#[tokio::test]
async fn check_discovers_the_only_contract_without_a_default() {
    let mock = Mock::start(MockOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(
        dir.path(),
        "c.toml",
        &toml_for(&mock, free_addr(), free_addr(), ""),
    );
    let mut c = aleph();
    c.arg("check").arg("-c").arg(&cfg);
    let o = output(c).await;
    assert_eq!(o.code, Some(0), "{}", o.stdout);
    assert!(o
        .stdout
        .contains(&format!("everything else -> {MOCK_CONTRACT} (discovered")));
}

/// `aleph-proxy check | head -1`: the reader leaves before the output ends. The command neither
/// panics (exit 101) nor changes its verdict.
#[tokio::test]
async fn commands_whose_reader_leaves_early_keep_their_exit_status() {
    let mock = Mock::start(MockOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(
        dir.path(),
        "c.toml",
        &toml_for(&mock, free_addr(), free_addr(), ""),
    );
    for sub in ["check", "contracts", "token"] {
        let mut c = aleph();
        c.arg(sub)
            .arg("-c")
            .arg(&cfg)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().unwrap();
        // The read end closes before the first line is written.
        drop(child.stdout.take());
        let o = tokio::time::timeout(WAIT, child.wait_with_output())
            .await
            .expect("the command finishes")
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(0), "{sub}: {stderr}");
        assert!(!stderr.contains("panicked"), "{sub}: {stderr}");
    }
}

#[tokio::test]
async fn check_with_several_contracts_needs_a_default_unless_clients_choose() {
    let mock = Mock::start(support::two_contracts()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(
        dir.path(),
        "c.toml",
        &toml_for(&mock, free_addr(), free_addr(), ""),
    );
    let mut c = aleph();
    c.arg("check").arg("--config").arg(&cfg);
    let o = output(c).await;
    assert_eq!(o.code, Some(1), "{}", o.stdout);
    assert!(
        o.stdout.contains(
            "everything else -> NONE: set contract.default (the credential has 2 contracts)"
        ),
        "{}",
        o.stdout
    );

    let cfg = write(
        dir.path(),
        "o.toml",
        &toml_for(
            &mock,
            free_addr(),
            free_addr(),
            "[contract]\nallow_client_override = true\n",
        ),
    );
    let mut c = aleph();
    c.arg("check").arg("--config").arg(&cfg);
    let o = output(c).await;
    assert_eq!(o.code, Some(0), "{}", o.stdout);
    assert!(
        o.stdout
            .contains("everything else -> the client's X-Satellogic-Contract-Id"),
        "{}",
        o.stdout
    );
}

#[tokio::test]
async fn check_fails_on_a_bad_config() {
    let mock = Mock::start(MockOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    // A typo'd key and a bad value: both reported, nothing fetched.
    let cfg = write(
        dir.path(),
        "bad.toml",
        &toml_for(
            &mock,
            free_addr(),
            free_addr(),
            "\n[timeouts]\nconect = \"5s\"\n[log]\nformat = \"xml\"\n",
        ),
    );
    let mut c = aleph();
    c.arg("check").arg("--config").arg(&cfg);
    let o = output(c).await;
    assert_eq!(o.code, Some(2), "{}\n{}", o.stdout, o.stderr);
    assert!(o.stderr.contains("conect"), "{}", o.stderr);
    assert!(o.stderr.contains("log.format"), "{}", o.stderr);
    assert!(!o.stdout.contains("all good"));
    assert_eq!(fetches(&mock), 0);

    // A missing file, and a config without credentials.
    let mut c = aleph();
    c.arg("check")
        .arg("--config")
        .arg(dir.path().join("nope.toml"));
    let o = output(c).await;
    assert_eq!(o.code, Some(2));
    assert!(o.stderr.contains("does not exist"), "{}", o.stderr);
    let mut c = aleph();
    c.arg("check").current_dir(dir.path());
    let o = output(c).await;
    assert_eq!(o.code, Some(2));
    assert!(o.stderr.contains("auth.client_id"), "{}", o.stderr);
}

#[tokio::test]
async fn check_refuses_what_run_refuses_and_shows_the_warnings_run_logs() {
    let mock = Mock::start(MockOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    // A congestion control the kernel lacks: `run` fails when it binds, so `check` fails too.
    let cfg = write(
        dir.path(),
        "cc.toml",
        &toml_for(
            &mock,
            free_addr(),
            free_addr(),
            "[contract]\ndefault = \"c\"\n[tcp]\nclient_congestion_control = \"nosuchalgo\"\n",
        ),
    );
    let mut c = aleph();
    c.arg("check").arg("--config").arg(&cfg);
    let o = output(c).await;
    assert_eq!(o.code, Some(1), "{}\n{}", o.stdout, o.stderr);
    assert!(
        o.stdout
            .contains("cannot use TCP congestion control \"nosuchalgo\""),
        "{}",
        o.stdout
    );
    assert!(!o.stdout.contains("all good"));

    // A secret file every user can read: `run` warns at start, `check` shows the same warning.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let secret = write(dir.path(), "secret", &format!("{MOCK_CLIENT_SECRET}\n"));
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
        let toml = toml_for(&mock, free_addr(), free_addr(), "").replace(
            &format!("client_secret = \"{MOCK_CLIENT_SECRET}\""),
            &format!("client_secret_file = \"{}\"", secret.display()),
        );
        let cfg = write(dir.path(), "ws.toml", &toml);
        let mut c = aleph();
        c.arg("check").arg("--config").arg(&cfg);
        let o = output(c).await;
        assert!(o.stdout.contains("warning:"), "{}", o.stdout);
        assert!(o.stdout.contains("readable by every user"), "{}", o.stdout);
        assert!(!o.stdout.contains(MOCK_CLIENT_SECRET));
    }
}

#[tokio::test]
async fn check_fails_on_rejected_credentials() {
    let mock = Mock::start(MockOptions::default()).await.unwrap();
    mock.state.set_token_mode(TokenMode::Reject);
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(
        dir.path(),
        "c.toml",
        &toml_for(&mock, free_addr(), free_addr(), ""),
    );
    let mut c = aleph();
    c.arg("check").arg("--config").arg(&cfg);
    let o = output(c).await;
    assert_eq!(o.code, Some(1), "{}\n{}", o.stdout, o.stderr);
    assert!(
        o.stdout.contains("rejected the credentials"),
        "{}",
        o.stdout
    );
    assert!(o.stdout.contains("problems found"));
    assert!(!o.stdout.contains(MOCK_CLIENT_SECRET) && !o.stderr.contains(MOCK_CLIENT_SECRET));
}

#[tokio::test]
async fn check_fails_on_a_route_to_a_contract_the_credential_lacks() {
    let mock = Mock::start(MockOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let extra = format!(
        r#"
[contract]
default = "{MOCK_CONTRACT}"
[[contract.routes]]
prefix = "/archive"
id = "contract-999"
"#
    );
    let cfg = write(
        dir.path(),
        "c.toml",
        &toml_for(&mock, free_addr(), free_addr(), &extra),
    );
    let mut c = aleph();
    c.arg("check").arg("--config").arg(&cfg);
    let o = output(c).await;
    assert_eq!(o.code, Some(1), "{}", o.stdout);
    assert!(
        o.stdout
            .contains("/archive/... -> contract-999  (NOT a contract of this credential)"),
        "{}",
        o.stdout
    );
    assert!(o.stdout.contains("problems found"));

    // The same for a default contract given as a flag (flags are the top layer).
    let cfg = write(
        dir.path(),
        "d.toml",
        &toml_for(&mock, free_addr(), free_addr(), ""),
    );
    let mut c = aleph();
    c.arg("check")
        .arg("--config")
        .arg(&cfg)
        .args(["--contract", "contract-777"]);
    let o = output(c).await;
    assert_eq!(o.code, Some(1), "{}", o.stdout);
    assert!(o.stdout.contains("everything else -> contract-777  (NOT"));
}

#[tokio::test]
async fn check_with_a_legacy_key_uses_no_token_endpoint() {
    let mock = Mock::start(MockOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(
        dir.path(),
        "legacy.toml",
        &toml_for(&mock, free_addr(), free_addr(), "mode = \"legacy\"\n"),
    );
    let mut c = aleph();
    c.arg("check").arg("--config").arg(&cfg);
    let o = output(c).await;
    assert_eq!(o.code, Some(0), "{}{}", o.stdout, o.stderr);
    assert!(o.stdout.contains("legacy key"), "{}", o.stdout);
    assert!(o.stdout.contains(&format!("contracts: {MOCK_CONTRACT}")));
    assert_eq!(fetches(&mock), 0);
    assert!(!o.stdout.contains(MOCK_CLIENT_SECRET) && !o.stderr.contains(MOCK_CLIENT_SECRET));

    // A wrong secret (the environment beats the file) shows at /contracts.
    let mut c = aleph();
    c.arg("check")
        .arg("--config")
        .arg(&cfg)
        .env("ALEPH_PROXY_AUTH__CLIENT_SECRET", "wrong-secret");
    let o = output(c).await;
    assert_eq!(o.code, Some(1), "{}", o.stdout);
    assert!(o.stdout.contains("answered 401"), "{}", o.stdout);
    assert!(!o.stdout.contains("wrong-secret") && !o.stderr.contains("wrong-secret"));
}

#[tokio::test]
async fn check_reports_the_token_cache() {
    let mock = Mock::start(MockOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("token.json");
    let check = |cache: &Path| {
        let cfg = write(
            dir.path(),
            "c.toml",
            &toml_for(
                &mock,
                free_addr(),
                free_addr(),
                &format!("token_cache = \"{}\"\n", cache.display()),
            ),
        );
        let mut c = aleph();
        c.arg("check").arg("--config").arg(cfg);
        c
    };
    let o = output(check(&cache)).await;
    assert_eq!(o.code, Some(0), "{}", o.stdout);
    assert!(o
        .stdout
        .contains("empty; written after the first token fetch"));
    // `check` fetches but does not write the cache, and leaves no probe file behind.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

    std::fs::write(
        &cache,
        cache_json(
            &mock.token_url,
            MOCK_CLIENT_ID,
            "cached-token",
            now_unix() + 3600,
        ),
    )
    .unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let o = output(check(&cache)).await;
    assert_eq!(o.code, Some(0), "{}", o.stdout);
    assert!(o.stdout.contains("holds a token for"), "{}", o.stdout);
    assert!(!o.stdout.contains("cached-token") && !o.stderr.contains("cached-token"));
    // `check` fetched its own token; it does not pretend to use the cached one.
    assert!(
        !o.stderr.contains("using the cached access token"),
        "{}",
        o.stderr
    );

    // A corrupt cache: reported once, not a failure (the proxy would replace it).
    std::fs::write(&cache, "garbage").unwrap();
    let o = output(check(&cache)).await;
    assert_eq!(o.code, Some(0), "{}", o.stdout);
    assert!(o.stdout.contains("holds nothing usable"), "{}", o.stdout);
    assert_eq!(
        o.stderr.matches("token cache is corrupt").count(),
        1,
        "{}",
        o.stderr
    );

    // A directory that does not exist: the proxy could never keep its token.
    let o = output(check(&dir.path().join("missing/token.json"))).await;
    assert_eq!(o.code, Some(1), "{}", o.stdout);
    assert!(o.stdout.contains("NOT usable: directory"), "{}", o.stdout);
}

#[tokio::test]
async fn token_prints_exactly_the_issued_token() {
    let mock = Mock::start(MockOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(
        dir.path(),
        "c.toml",
        &toml_for(&mock, free_addr(), free_addr(), ""),
    );
    let mut c = aleph();
    c.arg("token").arg("--config").arg(&cfg);
    let o = output(c).await;
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    let issued = mock.state.issued_tokens();
    assert_eq!(issued.len(), 1);
    // stdout is the token and a newline, nothing else, so `$(aleph-proxy token)` works.
    assert_eq!(o.stdout, format!("{}\n", issued[0]));
    assert!(!o.stderr.contains(&issued[0]), "the token is not logged");

    // Rejected credentials: non-zero, nothing on stdout.
    mock.state.set_token_mode(TokenMode::Reject);
    let mut c = aleph();
    c.arg("token").arg("--config").arg(&cfg);
    let o = output(c).await;
    assert_eq!(o.code, Some(1));
    assert_eq!(o.stdout, "");
    assert!(o.stderr.contains("rejected"), "{}", o.stderr);
}

#[tokio::test]
async fn contracts_lists_as_a_table_and_as_json() {
    let mock = Mock::start(MockOptions {
        contracts: vec![
            (MOCK_CONTRACT.into(), "Imagery A".into()),
            (MOCK_CONTRACT_2.into(), "Tasking B".into()),
        ],
        ..MockOptions::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(
        dir.path(),
        "c.toml",
        &toml_for(&mock, free_addr(), free_addr(), ""),
    );
    let mut c = aleph();
    c.arg("contracts").arg("--config").arg(&cfg);
    let o = output(c).await;
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    let lines: Vec<&str> = o.stdout.lines().collect();
    assert!(lines[0].starts_with("CONTRACT ID"));
    assert!(lines
        .iter()
        .any(|l| l.starts_with(MOCK_CONTRACT) && l.ends_with("Imagery A")));
    assert!(lines
        .iter()
        .any(|l| l.starts_with(MOCK_CONTRACT_2) && l.ends_with("Tasking B")));

    let mut c = aleph();
    c.args(["contracts", "--json"]).arg("--config").arg(&cfg);
    let o = output(c).await;
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).expect("JSON on stdout");
    let ids: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["contract_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [MOCK_CONTRACT, MOCK_CONTRACT_2]);
    assert_eq!(v[1]["name"], "Tasking B");
    // /contracts went without a contract header, with the proxy's token.
    let rec = mock.state.last_request().unwrap();
    assert_eq!(rec.uri.path(), "/contracts");
    assert!(rec.headers.get("x-satellogic-contract-id").is_none());

    // Upstream down: non-zero.
    mock.state.set_token_mode(TokenMode::ServerError);
    let mut c = aleph();
    c.args(["contracts", "--json"]).arg("--config").arg(&cfg);
    let o = output(c).await;
    assert_eq!(o.code, Some(1));
    assert_eq!(o.stdout, "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_exit_codes_follow_a_running_instance() {
    let mock = Mock::start(MockOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = run_binary(&mock, dir.path(), "").await;
    p.ready().await;
    let cfg = dir.path().join(format!("run-{}.toml", p.proxy.port()));

    let probe = |cfg: &Path| {
        let mut c = aleph();
        c.arg("healthcheck").arg("--config").arg(cfg);
        c
    };
    let o = output(probe(&cfg)).await;
    assert_eq!(o.code, Some(0), "{}{}", o.stdout, o.stderr);
    assert!(o.stdout.starts_with("ready"));

    // As the image runs it: the admin address only in the environment, 0.0.0.0 as configured.
    let mut c = aleph();
    c.arg("healthcheck").env(
        "ALEPH_PROXY_ADMIN__LISTEN",
        format!("0.0.0.0:{}", p.admin.port()),
    );
    assert_eq!(output(c).await.code, Some(0));
    // The flag wins over the file (a wrong address in the file, the right one as a flag).
    let wrong = write(
        dir.path(),
        "wrong.toml",
        &format!("[admin]\nlisten = \"{}\"\n", free_addr()),
    );
    let mut c = probe(&wrong);
    c.args(["--admin-listen", &p.admin.to_string()]);
    assert_eq!(output(c).await.code, Some(0));
    // A config file the probe cannot parse does not hide the address in the environment.
    let broken = write(dir.path(), "broken.toml", "this is [not toml");
    let mut c = probe(&broken);
    c.env("ALEPH_PROXY_ADMIN__LISTEN", p.admin.to_string());
    assert_eq!(output(c).await.code, Some(0));

    // Stopped: non-zero.
    p.kill().await;
    let o = output(probe(&cfg)).await;
    assert_eq!(o.code, Some(1));
    assert!(o.stdout.contains("not running"), "{}", o.stdout);

    // Running but not ready (the token endpoint rejects the credentials): non-zero.
    mock.state.set_token_mode(TokenMode::Reject);
    let p = run_binary(&mock, dir.path(), "").await;
    p.alive().await;
    let cfg = dir.path().join(format!("run-{}.toml", p.proxy.port()));
    let o = output(probe(&cfg)).await;
    assert_eq!(o.code, Some(1), "{}", o.stdout);
    assert!(o.stdout.contains("not ready"), "{}", o.stdout);
    assert!(o.stdout.contains("503"), "{}", o.stdout);
    // Recovers once the credentials are accepted again.
    mock.state.set_token_mode(TokenMode::Ok);
    p.ready().await;
    assert_eq!(output(probe(&cfg)).await.code, Some(0));
    p.kill().await;
}

/// `demo` with both listeners on ephemeral ports (the start-up lines name them).
const DEMO_ON_FREE_PORTS: [&str; 5] = [
    "demo",
    "--listen",
    "127.0.0.1:0",
    "--admin-listen",
    "127.0.0.1:0",
];

/// The proxy address a running `demo` (stdout piped) prints.
async fn demo_proxy_address(child: &mut Child) -> String {
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    loop {
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .expect("demo prints its address")
            .unwrap()
            .expect("stdout open");
        if let Some(rest) = line.split("the proxy on http://").nth(1) {
            return rest.split_whitespace().next().unwrap().to_string();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_serves_the_mock_on_the_ports_it_prints() {
    let mut c = aleph();
    c.args(DEMO_ON_FREE_PORTS)
        // Variables meant for a real deployment do not reach the demo.
        .env("ALEPH_PROXY_ACCESS__KEY", "a-key-the-demo-must-ignore")
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = c.spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let (mut proxy, mut admin) = (None, None);
    while proxy.is_none() || admin.is_none() {
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .expect("demo prints its addresses")
            .unwrap()
            .expect("stdout open");
        if let Some(rest) = line.split("the proxy on http://").nth(1) {
            proxy = rest.split_whitespace().next().map(str::to_string);
        }
        if let Some(rest) = line.trim().strip_prefix("curl -s http://") {
            if let Some(a) = rest.strip_suffix("/readyz") {
                admin = Some(a.to_string());
            }
        }
    }
    let (proxy, admin) = (proxy.unwrap(), admin.unwrap());
    let c = client();
    // A fresh process lists its label-less series before any request (at 0), so rate() and
    // increase() see the first event. (In-process tests share one registry; only a new process
    // shows the first scrape.)
    let first = scrape(&format!("http://{admin}/metrics")).await;
    for name in [
        "aleph_proxy_unauthorized_refreshes_total",
        "aleph_proxy_token_invalidations_total",
        "aleph_proxy_links_rewritten_total",
        "aleph_proxy_connections_rejected_total",
        "aleph_proxy_spliced_bytes_total",
        "aleph_proxy_responses_cut_total",
        "aleph_proxy_in_flight_requests",
        "aleph_proxy_upstream_duration_seconds_count",
    ] {
        assert_eq!(first.sum(name, &[]), 0.0, "{name} at 0 before any request");
        assert!(first.has(name), "{name} missing before any request");
    }
    let r = c
        .get(format!("http://{proxy}/contracts"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains(MOCK_CONTRACT));
    let r = c
        .get(format!("http://{proxy}/tasking/products/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = c
        .get(format!("http://{admin}/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The demo's suggested `curl .../metrics | grep aleph_proxy_requests_total` finds the series.
    let m = scrape(&format!("http://{admin}/metrics")).await;
    assert!(
        m.sum(
            "aleph_proxy_requests_total",
            &[("method", "GET"), ("status", "2xx")]
        ) >= 2.0
    );
    child.kill().await.unwrap();

    // A configuration file named on the demo's command line would go unused: refused, exit 2.
    // The same path in ALEPH_PROXY_CONFIG is ignored like every ALEPH_PROXY_* variable.
    let mut c = aleph();
    c.args(["demo", "--config", "/nonexistent/aleph-proxy.toml"]);
    let o = output(c).await;
    assert_eq!(o.code, Some(2), "{}", o.stderr);
    assert!(
        o.stderr.contains("--config is not read by demo"),
        "{}",
        o.stderr
    );
    let mut c = aleph();
    c.args(DEMO_ON_FREE_PORTS)
        .env("ALEPH_PROXY_CONFIG", "/nonexistent/aleph-proxy.toml")
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = c.spawn().unwrap();
    // Starts although ALEPH_PROXY_CONFIG names no file.
    demo_proxy_address(&mut child).await;
    child.kill().await.unwrap();
}

/// `aleph-proxy demo` under `taskset -c CPUS` with `TOKIO_WORKER_THREADS` as given: the scheduler
/// and worker count from the start-up line, and the demo's proxy address.
async fn demo_runtime(cpus: &str, workers: Option<&str>) -> (String, String, Child) {
    let mut c = Command::new("taskset");
    c.args(["-c", cpus, support::binary()]);
    c.args(DEMO_ON_FREE_PORTS)
        .env_remove("RUST_LOG")
        .env_remove("TOKIO_WORKER_THREADS")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(n) = workers {
        c.env("TOKIO_WORKER_THREADS", n);
    }
    let mut child = c.spawn().expect("taskset (util-linux) runs the binary");
    let runtime = first_line(child.stderr.take().unwrap(), |l| {
        l.contains("async runtime").then(|| l.to_string())
    })
    .await;
    let proxy = first_line(child.stdout.take().unwrap(), |l| {
        let rest = l.split("the proxy on http://").nth(1)?;
        rest.split_whitespace().next().map(str::to_string)
    })
    .await;
    (runtime, proxy, child)
}

/// The first line of `from` that `pick` takes something from (within WAIT).
async fn first_line<T>(
    from: impl tokio::io::AsyncRead + Unpin,
    mut pick: impl FnMut(&str) -> Option<T>,
) -> T {
    let mut lines = BufReader::new(from).lines();
    loop {
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .expect("the line within the wait")
            .unwrap()
            .expect("the stream still open");
        if let Some(found) = pick(&line) {
            return found;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_usable_cpu_runs_the_current_thread_scheduler_unless_told_otherwise() {
    let all = format!(
        "0-{}",
        std::thread::available_parallelism().unwrap().get() - 1
    );
    let cases = [
        // One CPU in the affinity mask (as a cgroup limit below two cores gives): current-thread.
        ("0", None, r#"scheduler="current-thread" worker_threads=1"#),
        // TOKIO_WORKER_THREADS beats the CPU count, both ways.
        (
            "0",
            Some("2"),
            r#"scheduler="multi-thread" worker_threads=2"#,
        ),
        (
            all.as_str(),
            Some("1"),
            r#"scheduler="current-thread" worker_threads=1"#,
        ),
    ];
    for (cpus, workers, expected) in cases {
        let (line, proxy, mut child) = demo_runtime(cpus, workers).await;
        assert!(
            line.contains(expected),
            "taskset -c {cpus}, TOKIO_WORKER_THREADS {workers:?}: {line}"
        );
        let r = client()
            .get(format!("http://{proxy}/contracts"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "taskset -c {cpus}, {workers:?}");
        child.kill().await.unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// Token cache

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_cache_survives_a_restart_with_one_fetch() {
    let mock = Mock::start(MockOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("token.json");
    let extra = format!("token_cache = \"{}\"\n", cache.display());
    let c = client();

    let first = run_binary(&mock, dir.path(), &extra).await;
    first.ready().await;
    let r = c.get(first.url("/tasking/products/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(cache.exists());
    #[cfg(unix)]
    assert_eq!(mode(&cache), 0o600);
    let logs1 = first.kill().await;
    assert_eq!(fetches(&mock), 1);
    let token = mock.state.issued_tokens().pop().unwrap();

    let second = run_binary(&mock, dir.path(), &extra).await;
    second.ready().await;
    let r = c
        .get(second.url("/tasking/products/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(fetches(&mock), 1, "the restart reused the cached token");
    let rec = mock.state.last_request().unwrap();
    assert_eq!(
        rec.headers["authorizationtoken"],
        format!("Bearer {token}").as_str()
    );
    let logs2 = second.kill().await;
    assert!(
        logs2
            .iter()
            .any(|l| l.contains("using the cached access token")),
        "{logs2:#?}"
    );
    for l in logs1.iter().chain(&logs2) {
        assert!(!l.contains(&token), "token logged: {l}");
        assert!(!l.contains(MOCK_CLIENT_SECRET), "secret logged: {l}");
    }
    #[cfg(unix)]
    assert_eq!(mode(&cache), 0o600);
}

fn cache_json(mock_token_url: &str, client_id: &str, token: &str, expires_at_unix: u64) -> String {
    serde_json::json!({
        "version": 1,
        "token_url": mock_token_url,
        "audience": "https://api.satellogic.com/",
        "client_id": client_id,
        "access_token": token,
        "expires_at_unix": expires_at_unix,
    })
    .to_string()
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_token_cache_is_ignored_with_a_warning() {
    let (logs, fetched, sent, cache) =
        run_with_cache_for_mock("{\"version\": 1, \"access_tok", 0o600).await;
    assert!(
        logs.iter()
            .any(|l| l.contains("WARN") && l.contains("token cache is corrupt")),
        "{logs:#?}"
    );
    assert_eq!(fetched, 1);
    assert!(sent.starts_with("Bearer mock-token-"), "{sent}");
    // Replaced by a valid, private cache.
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&cache).unwrap()).unwrap();
    assert_eq!(
        format!("Bearer {}", v["access_token"].as_str().unwrap()),
        sent
    );
    #[cfg(unix)]
    assert_eq!(mode(&cache), 0o600);
    let _ = std::fs::remove_dir_all(cache.parent().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_expired_or_exposed_token_cache_is_not_trusted() {
    // Each file is a valid cache for this proxy but for the one thing under test.
    let far = now_unix() + 86_400;
    let cases = [
        (
            "another client",
            cache_json("{URL}", "someone-else", "foreign-token", far),
            0o600,
            "another credential",
        ),
        (
            "expired",
            cache_json("{URL}", MOCK_CLIENT_ID, "old-token", now_unix() - 10),
            0o600,
            "expired",
        ),
        (
            "readable by others",
            cache_json("{URL}", MOCK_CLIENT_ID, "planted-token", far),
            0o644,
            "accessible to other users",
        ),
    ];
    for (what, text, file_mode, warning) in cases {
        let (logs, fetched, sent, cache) = run_with_cache_for_mock(&text, file_mode).await;
        assert!(
            logs.iter()
                .any(|l| l.contains("WARN") && l.contains(warning)),
            "{what}: {logs:#?}"
        );
        assert_eq!(fetched, 1, "{what}");
        assert!(sent.starts_with("Bearer mock-token-"), "{what}: {sent}");
        #[cfg(unix)]
        assert_eq!(mode(&cache), 0o600, "{what}");
        let _ = std::fs::remove_dir_all(cache.parent().unwrap());
    }
}

/// Runs the proxy with a pre-written cache file (`{URL}` in it replaced by the mock's token URL);
/// returns its logs, the token fetch count, the token the upstream received and the cache path
/// (its directory is kept for the caller's checks, and removed by it).
async fn run_with_cache_for_mock(
    text: &str,
    file_mode: u32,
) -> (Vec<String>, u64, String, PathBuf) {
    let mock = Mock::start(MockOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("token.json");
    std::fs::write(&cache, text.replace("{URL}", &mock.token_url)).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(file_mode)).unwrap();
    }
    let extra = format!("token_cache = \"{}\"\n", cache.display());
    let p = run_binary(&mock, dir.path(), &extra).await;
    p.ready().await;
    let r = client()
        .get(p.url("/tasking/products/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let sent = mock.state.last_request().unwrap().headers["authorizationtoken"]
        .to_str()
        .unwrap()
        .to_string();
    let logs = p.kill().await;
    (logs, fetches(&mock), sent, dir.keep().join("token.json"))
}

// ---------------------------------------------------------------------------------------------
// Logs and the container contract

/// The configuration a container gets: environment variables only, the secret in a file.
fn container_env(c: &mut Command, mock: &Mock, dir: &Path, proxy: SocketAddr, admin: SocketAddr) {
    let secret = write(dir, "client-secret", MOCK_CLIENT_SECRET);
    c.env("ALEPH_PROXY_LISTEN", proxy.to_string())
        .env("ALEPH_PROXY_ADMIN__LISTEN", admin.to_string())
        .env("ALEPH_PROXY_UPSTREAM", &mock.api_url)
        .env("ALEPH_PROXY_AUTH__TOKEN_URL", &mock.token_url)
        .env("ALEPH_PROXY_AUTH__CLIENT_ID", MOCK_CLIENT_ID)
        .env("ALEPH_PROXY_AUTH__CLIENT_SECRET_FILE", &secret)
        .env("ALEPH_PROXY_CONTRACT__DEFAULT", MOCK_CONTRACT)
        .env("ALEPH_PROXY_LOG__FORMAT", "json")
        // No config file anywhere: run from an empty directory.
        .current_dir(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_parse_and_carry_the_request_id() {
    let mock = Mock::start(MockOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (proxy, admin) = free_pair();
    let mut c = aleph();
    container_env(&mut c, &mock, dir.path(), proxy, admin);
    // No subcommand: `run` is the default.
    let p = Running::spawn(c, proxy, admin);
    p.ready().await;

    let r = client()
        .get(p.url("/tasking/products/"))
        .header("x-request-id", "test-rid-123")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-request-id"], "test-rid-123", "echoed back");
    let rec = mock.state.last_request().unwrap();
    assert_eq!(rec.headers["x-request-id"], "test-rid-123", "sent upstream");

    // Without one, the proxy makes one up, sends it upstream and echoes it.
    let r = client()
        .get(p.url("/tasking/products/"))
        .send()
        .await
        .unwrap();
    let generated = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert!(generated.len() >= 16, "{generated}");
    let rec = mock.state.last_request().unwrap();
    assert_eq!(rec.headers["x-request-id"], generated.as_str());
    // A proxy error carries it too.
    let r = client()
        .request(reqwest::Method::CONNECT, p.url("/"))
        .header("x-request-id", "test-rid-err")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.headers().contains_key("x-aleph-proxy-error"));
    assert_eq!(r.headers()["x-request-id"], "test-rid-err");

    // Wait for the access log line of our request, then check every line.
    eventually(WAIT, || {
        let seen = p
            .logs()
            .iter()
            .any(|l| l.contains("test-rid-123") && l.contains("\"status\""));
        async move { seen }
    })
    .await;
    let lines = p.kill().await;
    let mut ours = Vec::new();
    for l in &lines {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v["timestamp"].is_string() && v["level"].is_string(), "{l}");
        assert!(v["message"].is_string(), "{l}");
        if v["span"]["request_id"] == "test-rid-123" {
            ours.push(v);
        }
        assert!(!l.contains(MOCK_CLIENT_SECRET), "secret logged: {l}");
        for t in mock.state.issued_tokens() {
            assert!(!l.contains(&t), "token logged: {l}");
        }
    }
    // The access line of that request: method, path, status, latency, and the id.
    let access = ours
        .iter()
        .find(|v| v["message"] == "request")
        .unwrap_or_else(|| panic!("no access line with the id in {lines:#?}"));
    assert_eq!(access["method"], "GET");
    assert_eq!(access["path"], "/tasking/products/");
    assert_eq!(access["status"], 200);
    assert!(access["latency_ms"].is_number());
    // Every line naming the id belongs to that request's span (no stray copies elsewhere).
    for l in lines.iter().filter(|l| l.contains("test-rid-123")) {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert_eq!(v["span"]["request_id"], "test-rid-123", "{l}");
    }
    // The generated id is in the logs as well.
    assert!(lines.iter().any(|l| l.contains(&generated)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_configured_by_environment_alone_serves_and_passes_its_healthcheck() {
    let mock = Mock::start(MockOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (proxy, admin) = free_pair();
    let mut c = aleph();
    container_env(&mut c, &mock, dir.path(), proxy, admin);
    // As the image's CMD: `run`; and as its HEALTHCHECK: `healthcheck` with the same environment.
    c.arg("run");
    let p = Running::spawn(c, proxy, admin);
    p.ready().await;
    let r = client()
        .get(p.url("/tasking/products/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let rec = mock.state.last_request().unwrap();
    assert_eq!(rec.headers["x-satellogic-contract-id"], MOCK_CONTRACT);

    let mut hc = aleph();
    container_env(&mut hc, &mock, dir.path(), proxy, admin);
    hc.arg("healthcheck");
    let o = output(hc).await;
    assert_eq!(o.code, Some(0), "{}{}", o.stdout, o.stderr);

    // `check` and `token` read the same environment.
    let mut chk = aleph();
    container_env(&mut chk, &mock, dir.path(), proxy, admin);
    chk.arg("check");
    let o = output(chk).await;
    assert_eq!(o.code, Some(0), "{}{}", o.stdout, o.stderr);
    assert!(o
        .stdout
        .contains(&format!("everything else -> {MOCK_CONTRACT}")));

    // An unknown ALEPH_PROXY_ variable is a configuration error, not silently ignored.
    let mut bad = aleph();
    container_env(&mut bad, &mock, dir.path(), free_addr(), free_addr());
    bad.env("ALEPH_PROXY_AUTH__CLIENT_SECERT", "typo")
        .arg("run");
    let o = output(bad).await;
    assert_eq!(o.code, Some(2), "{}", o.stderr);
    assert!(
        o.stderr.to_ascii_lowercase().contains("client_secert"),
        "{}",
        o.stderr
    );
    p.kill().await;
}

/// The image's ENV defaults, from the Dockerfile (`ENV K=V \ K=V ...` blocks).
fn dockerfile_env() -> Vec<(String, String)> {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Dockerfile")).unwrap();
    let mut env = Vec::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let Some(rest) = line.strip_prefix("ENV ") else {
            continue;
        };
        let mut block = rest.to_string();
        while block.trim_end().ends_with('\\') {
            block = block.trim_end().trim_end_matches('\\').to_string();
            block.push(' ');
            block.push_str(lines.next().unwrap_or(""));
        }
        for pair in block.split_whitespace() {
            let (k, v) = pair.split_once('=').expect("ENV K=V");
            env.push((k.to_string(), v.to_string()));
        }
    }
    env
}

/// The image runs `aleph-proxy run` with its ENV defaults and probes itself with
/// `aleph-proxy healthcheck` (Dockerfile and Compose): those must be real subcommands, and the ENV
/// defaults plus a deployment's credentials must be a valid configuration.
#[tokio::test]
async fn the_images_commands_and_env_defaults_work() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    assert!(dockerfile.contains(r#"ENTRYPOINT ["/aleph-proxy"]"#));
    assert!(dockerfile.contains(r#"CMD ["run"]"#));
    assert!(dockerfile.contains(r#"CMD ["/aleph-proxy", "healthcheck"]"#));
    let compose = std::fs::read_to_string(root.join("deploy/docker-compose.yaml")).unwrap();
    assert!(compose.contains(r#"test: ["CMD", "/aleph-proxy", "healthcheck"]"#));
    for sub in ["run", "healthcheck"] {
        let mut c = aleph();
        c.args([sub, "--help"]);
        assert_eq!(output(c).await.code, Some(0), "{sub}");
    }

    let env = dockerfile_env();
    let keys: Vec<&str> = env.iter().map(|(k, _)| k.as_str()).collect();
    for k in [
        "ALEPH_PROXY_LISTEN",
        "ALEPH_PROXY_ADMIN__LISTEN",
        "ALEPH_PROXY_LOG__FORMAT",
    ] {
        assert!(keys.contains(&k), "the image sets {k}: {keys:?}");
    }
    let mock = Mock::start(MockOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut c = aleph();
    // The image's defaults, then what a deployment adds (the listeners are not bound by `check`).
    container_env(&mut c, &mock, dir.path(), free_addr(), free_addr());
    c.env_remove("ALEPH_PROXY_LISTEN")
        .env_remove("ALEPH_PROXY_ADMIN__LISTEN")
        .env_remove("ALEPH_PROXY_LOG__FORMAT");
    for (k, v) in &env {
        c.env(k, v);
    }
    c.arg("check");
    // Without an access guard the image's 0.0.0.0 listener exposes the credential: not all good.
    let o = output(c).await;
    assert_eq!(o.code, Some(1), "{}{}", o.stdout, o.stderr);
    assert!(
        o.stdout
            .contains("listener 0 on 0.0.0.0:8080:\n    EXPOSED"),
        "{}",
        o.stdout
    );
    // With one, as the Compose example sets it.
    let mut c = aleph();
    container_env(&mut c, &mock, dir.path(), free_addr(), free_addr());
    for (k, v) in &env {
        c.env(k, v);
    }
    let key = write(dir.path(), "proxy-key", "a-shared-key-of-32-characters-xx");
    c.env("ALEPH_PROXY_ACCESS__KEY_FILE", &key).arg("check");
    let o = output(c).await;
    assert_eq!(o.code, Some(0), "{}{}", o.stdout, o.stderr);
    assert!(!o.stdout.contains("EXPOSED"));
}

/// During an upstream outage every request fails the same way: the WARN line of that failure is
/// written at most once a second, the next one saying how many were left out; every request
/// still gets its 502 and its access line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_logs_one_warning_a_second_not_one_per_request() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("stderr.log");
    let dead = free_addr();
    let mut c = aleph();
    c.args(DEMO_ON_FREE_PORTS)
        .args(["--upstream", &format!("http://{dead}")])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap());
    let mut child = c.spawn().unwrap();
    let proxy = demo_proxy_address(&mut child).await;
    let c = client();
    let started = std::time::Instant::now();
    const REQUESTS: usize = 40;
    for _ in 0..REQUESTS {
        let r = c
            // /contracts needs no contract (discovery cannot finish with the API down), and a
            // POST is not retried: one failure per request.
            .post(format!("http://{proxy}/contracts"))
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 502);
    }
    let seconds = started.elapsed().as_secs() as usize;
    // SIGTERM, not a kill: the drain writes out the log lines still batched.
    let pid = child.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("exits after SIGTERM")
        .unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    let warned = text
        .lines()
        .filter(|l| l.contains("upstream request failed"))
        .count();
    let accessed = text
        .lines()
        .filter(|l| l.contains("path=/contracts") && l.contains("status=502"))
        .count();
    assert_eq!(
        accessed, REQUESTS,
        "every request has its access line:\n{text}"
    );
    assert!(
        (1..=seconds + 2).contains(&warned),
        "{warned} warnings for {REQUESTS} failures in {seconds} s:\n{text}"
    );
    if warned > 1 {
        assert!(text.contains("suppressed="), "{text}");
    }
}
