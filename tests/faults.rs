//! Fault handling, end to end: token endpoint outages and bad answers, revoked tokens, contract
//! 401s, slow, dead and busy upstreams, retries, pooling, slowloris, overload, SIGTERM draining, and
//! a soak across forced token rotations. Every test runs the real proxy (in process, or the binary
//! for signals and logs) against the mock API on ephemeral loopback ports, drives the mock's fault
//! switches, and asserts what a client would notice.

mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use aleph_proxy::mock::{Mock, MockOptions, TokenMode, MOCK_CLIENT_ID, MOCK_CLIENT_SECRET};
use support::{client, eventually, proxy_error, Harness};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Logs go to the test's captured output (shown for failing tests only), filtered by `RUST_LOG`.
fn init() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .with_ansi(false)
            .try_init();
    });
}

const PRODUCTS: &str = "/tasking/products/";

/// Fast failure settings: requests give up waiting for a token after 300 ms.
const SHORT_WAIT: &str = r#"
[auth]
wait_timeout = "300ms"
[timeouts]
token_request = "300ms"
"#;

async fn get(c: &reqwest::Client, url: String) -> reqwest::Response {
    c.get(url).send().await.expect("the proxy answers")
}

async fn readyz(h: &Harness) -> (u16, serde_json::Value) {
    let r = get(&client(), h.admin_url("/readyz")).await;
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

fn api_requests(h: &Harness) -> u64 {
    h.mock.state.api_requests.load(Ordering::SeqCst)
}

/// Token endpoint requests the proxy attempted (also those the endpoint never answered).
fn fetch_attempts(h: &Harness) -> u64 {
    h.tokens[0].fetch_count()
}

/// Recorded upstream requests to `path`.
fn upstream_hits(h: &Harness, method: &str, path: &str) -> usize {
    h.mock
        .state
        .recorded()
        .iter()
        .filter(|r| r.method.as_str() == method && r.uri.path() == path)
        .count()
}

/// Asserts that every request the upstream ever received carried one of the proxy's tokens.
fn assert_every_upstream_request_had_a_token(h: &Harness) {
    for r in h.mock.state.recorded() {
        let t = r
            .headers
            .get("authorizationtoken")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        assert!(
            t.starts_with("Bearer mock-token-"),
            "{} {} reached the upstream with {t:?}",
            r.method,
            r.uri
        );
    }
}

async fn wait_attempts(h: &Harness, n: u64) {
    eventually(Duration::from_secs(10), || async { fetch_attempts(h) >= n }).await;
}

/// Asserts the proxy's own 503 for a missing token, after a bounded wait, with nothing forwarded.
async fn assert_no_token_503(h: &Harness) {
    let before = api_requests(h);
    let started = Instant::now();
    let r = get(&client(), h.url(PRODUCTS)).await;
    let waited = started.elapsed();
    assert!(r.headers().contains_key("retry-after"), "{:?}", r.headers());
    let (status, code) = proxy_error(r).await;
    assert_eq!((status, code.as_str()), (503, "no_token"));
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(3),
        "the wait for a token is bounded by auth.wait_timeout: {waited:?}"
    );
    assert_eq!(api_requests(h), before, "forwarded without a token");
    let (status, body) = readyz(h).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["ready"], false);
}

async fn assert_recovers(h: &Harness) {
    h.ready().await;
    let r = get(&client(), h.url(PRODUCTS)).await;
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    assert_every_upstream_request_had_a_token(h);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_outage_at_startup_then_automatic_recovery() {
    init();
    let mock = Mock::start(MockOptions::default()).await.unwrap();
    mock.state.set_token_mode(TokenMode::Down);
    let h = Harness::start_proxy(mock, SHORT_WAIT).await;
    // The refresher keeps trying (with backoff) while the endpoint is down.
    wait_attempts(&h, 3).await;
    assert_no_token_503(&h).await;
    let (_, body) = readyz(&h).await;
    let err = body["tokens"][0]["last_error"].as_str().unwrap();
    assert!(err.contains("unreachable"), "{err}");
    assert_eq!(
        api_requests(&h),
        0,
        "nothing reaches the API without a token"
    );

    h.mock.state.set_token_mode(TokenMode::Ok);
    assert_recovers(&h).await;
    assert_eq!(h.mock.state.token_successes.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_errors_slowness_and_empty_answers_are_retried_until_it_recovers() {
    init();
    for (mode, expected) in [
        (TokenMode::ServerError, "answered 500"),
        (TokenMode::Hang, "timed out"),
        (TokenMode::Empty, "unusable body"),
    ] {
        let mock = Mock::start(MockOptions::default()).await.unwrap();
        mock.state.set_token_mode(mode.clone());
        let h = Harness::start_proxy(mock, SHORT_WAIT).await;
        wait_attempts(&h, 3).await;
        assert_no_token_503(&h).await;
        let (_, body) = readyz(&h).await;
        let err = body["tokens"][0]["last_error"].as_str().unwrap_or("");
        assert!(err.contains(expected), "{mode:?}: {err}");
        h.mock.state.set_token_mode(TokenMode::Ok);
        assert_recovers(&h).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_200_from_the_token_endpoint_is_a_failure_not_a_token() {
    init();
    let mock = Mock::start(MockOptions::default()).await.unwrap();
    mock.state.set_token_mode(TokenMode::Malformed);
    let h = Harness::start_proxy(mock, SHORT_WAIT).await;
    wait_attempts(&h, 3).await;
    assert_no_token_503(&h).await;
    let (_, body) = readyz(&h).await;
    let err = body["tokens"][0]["last_error"].as_str().unwrap();
    assert!(err.contains("200 with an unusable body"), "{err}");
    assert_eq!(api_requests(&h), 0);
    h.mock.state.set_token_mode(TokenMode::Ok);
    assert_recovers(&h).await;
}

/// A proxy whose token endpoint answers 429 with `Retry-After: retry_after`; requests wait
/// 300 ms for a token.
async fn rate_limited(retry_after: &str, max_backoff: &str) -> Harness {
    init();
    let mock = Mock::start(MockOptions::default()).await.unwrap();
    mock.state.set_token_mode(TokenMode::RateLimited);
    *mock.state.token_retry_after.lock().unwrap() = retry_after.into();
    Harness::start_proxy(
        mock,
        &format!("[auth]\nretry_max_backoff = \"{max_backoff}\"\nwait_timeout = \"300ms\""),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_429_is_retried_after_its_retry_after() {
    // Backoff alone would retry after 50 ms; the endpoint asks for 1 s (Retry-After: 1).
    let h = rate_limited("1", "5s").await;
    let fetches = || h.mock.state.token_fetches.load(Ordering::SeqCst);
    eventually(Duration::from_secs(5), || async { fetches() >= 1 }).await;
    let first = Instant::now();
    eventually(Duration::from_secs(5), || async { fetches() >= 2 }).await;
    let gap = first.elapsed();
    assert!(gap >= Duration::from_millis(900), "retried after {gap:?}");
    assert_no_token_503(&h).await;
    let (_, body) = readyz(&h).await;
    assert!(body["tokens"][0]["last_error"]
        .as_str()
        .unwrap()
        .contains("rate limiting"));
    h.mock.state.set_token_mode(TokenMode::Ok);
    assert_recovers(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_expiry_during_an_outage_gives_503_never_an_expired_token_then_recovers() {
    init();
    let h = Harness::start_with(
        MockOptions {
            token_lifetime: Duration::from_secs(2),
            ..MockOptions::default()
        },
        SHORT_WAIT,
    )
    .await;
    h.ready().await;
    // The outage starts before the first refresh (due at about half the 2 s lifetime).
    h.mock.state.set_token_mode(TokenMode::ServerError);
    let c = client();
    let mut served = 0;
    // The current token keeps working until it is about to expire; never is an expired one sent
    // (the mock would answer 401).
    loop {
        let r = get(&c, h.url(PRODUCTS)).await;
        if r.status() == 503 {
            let (_, code) = proxy_error(r).await;
            assert_eq!(code, "no_token");
            break;
        }
        assert_eq!(
            r.status(),
            200,
            "request {served} while the token was valid"
        );
        served += 1;
    }
    assert!(served > 0);
    assert!(
        h.mock.state.token_fetches.load(Ordering::SeqCst) >= 2,
        "refreshes were attempted"
    );
    assert_no_token_503(&h).await;
    assert_no_token_503(&h).await;
    h.mock.state.set_token_mode(TokenMode::Ok);
    assert_recovers(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_mid_traffic_is_invisible_to_clients_and_costs_one_token() {
    init();
    let h = Harness::start("").await;
    h.ready().await;
    let c = client();
    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let (c, url, done) = (c.clone(), h.url(PRODUCTS), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            for _ in 0..40 {
                statuses.push(c.get(&url).send().await.unwrap().status().as_u16());
                done.fetch_add(1, Ordering::SeqCst);
            }
            statuses
        }));
    }
    eventually(Duration::from_secs(10), || async {
        done.load(Ordering::SeqCst) >= 200
    })
    .await;
    h.mock.state.revoke_all_tokens();
    for t in tasks {
        for s in t.await.unwrap() {
            assert_eq!(s, 200);
        }
    }
    assert_eq!(h.token_fetches(), 2, "one new token after the revocation");
    assert_eq!(h.mock.state.token_successes.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_naming_the_contract_is_passed_through_without_a_new_token() {
    init();
    let h = Harness::start("[contract]\ndefault = \"contract-999\"").await;
    h.ready().await;
    let c = client();
    // Plain, then gzip-compressed as the gateway sends it to every client that asks (GDAL,
    // pystac-client, browsers): the proxy reads the 401 through its coding.
    for (round, gzip) in [(1, false), (2, false), (3, true), (4, true)] {
        let mut req = c.get(h.url(PRODUCTS));
        if gzip {
            req = req.header("accept-encoding", "gzip");
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 401);
        assert!(r.headers().get("x-aleph-proxy-error").is_none());
        let coding = r.headers().get("content-encoding").cloned();
        let body = r.bytes().await.unwrap();
        let body = if gzip {
            assert_eq!(
                coding.unwrap(),
                "gzip",
                "passed through as the upstream sent it"
            );
            let mut out = Vec::new();
            std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&body[..]), &mut out)
                .unwrap();
            out
        } else {
            body.to_vec()
        };
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert!(
            v["message"].as_str().unwrap().contains("Contract-Id"),
            "{v}"
        );
        assert_eq!(
            upstream_hits(&h, "GET", PRODUCTS),
            round,
            "no loop, no replay"
        );
    }
    assert_eq!(h.token_fetches(), 1, "a new token cannot fix a contract");
}

/// A path the credential may not use: the upstream answers it 401 with a body that does not name
/// the contract, whatever the token.
const DENIED: &str = "/tasking/denied/";

const NOT_TOKEN: &str = "aleph_proxy_unauthorized_passed_through_total{reason=\"not_token\"}";

/// The value of one series in a Prometheus exposition (0 when it is absent).
fn sample(exposition: &str, series: &str) -> f64 {
    exposition
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// A ready proxy (with `extra` config) whose upstream answers `DENIED` with 401.
async fn with_denied_path(extra: &str) -> Harness {
    init();
    let h = Harness::start(extra).await;
    h.ready().await;
    h.mock
        .state
        .unauthorized_paths
        .lock()
        .unwrap()
        .push(DENIED.into());
    h
}

/// GETs `DENIED` and asserts that the upstream's 401 came back (not a proxy error).
async fn assert_denied_passes_through(h: &Harness) {
    let r = get(&client(), h.url(DENIED)).await;
    assert_eq!(r.status(), 401);
    assert!(
        r.headers().get("x-aleph-proxy-error").is_none(),
        "the upstream's 401, not the proxy's error"
    );
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["message"], "Unauthorized");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_that_keeps_answering_401_costs_one_token_not_one_per_request() {
    let h = with_denied_path("").await;
    let passed_before = sample(&h.metrics().await, NOT_TOKEN);
    let c = client();
    for round in 0..12 {
        assert_denied_passes_through(&h).await;
        // Other requests go on with the same token, and the proxy stays ready.
        let r = get(&c, h.url(PRODUCTS)).await;
        assert_eq!(r.status(), 200, "round {round}");
        let (status, body) = readyz(&h).await;
        assert_eq!(status, 200, "round {round}: {body}");
    }
    // The first 401 was worth one new token; the replay with it was refused too, so the 401 is
    // not the token's doing and later ones cost nothing.
    assert_eq!(h.token_fetches(), 2);
    assert_eq!(
        upstream_hits(&h, "GET", DENIED),
        13,
        "one replay, then none"
    );
    // Other tests in this process add to the counters too: at least these 12.
    let passed = sample(&h.metrics().await, NOT_TOKEN);
    assert!(
        passed - passed_before >= 12.0,
        "{passed_before} -> {passed}"
    );
    assert_every_upstream_request_had_a_token(&h);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_is_still_repaired_while_a_denied_path_keeps_answering_401() {
    let h = with_denied_path("").await;
    assert_denied_passes_through(&h).await;
    assert_eq!(h.token_fetches(), 2);
    // Now the token really is revoked: a 401 on another path still gets one new token.
    h.mock.state.revoke_all_tokens();
    let r = get(&client(), h.url(PRODUCTS)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(h.token_fetches(), 3);
    assert_denied_passes_through(&h).await;
    assert_denied_passes_through(&h).await;
    assert_eq!(h.token_fetches(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_a_token_outage_a_401_neither_drops_the_token_nor_fails_other_requests() {
    let h = with_denied_path(SHORT_WAIT).await;
    h.mock.state.set_token_mode(TokenMode::Down);
    let c = client();
    for round in 0..3 {
        // No new token can be had: the client gets the upstream's 401 as it came.
        assert_denied_passes_through(&h).await;
        let r = get(&c, h.url(PRODUCTS)).await;
        assert_eq!(r.status(), 200, "round {round}: {:?}", r.text().await);
        let (status, body) = readyz(&h).await;
        assert_eq!(status, 200, "round {round}: {body}");
        assert_eq!(body["tokens"][0]["usable"], true);
    }
    let m = h.metrics().await;
    assert!(
        sample(
            &m,
            "aleph_proxy_unauthorized_passed_through_total{reason=\"no_new_token\"}"
        ) >= 3.0,
        "{m}"
    );
    h.mock.state.set_token_mode(TokenMode::Ok);
    assert_recovers(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contract_discovery_with_a_revoked_cached_token_fetches_a_new_one() {
    init();
    let mock = Mock::start(MockOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("token.json");
    let expires = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 80_000;
    let cached = serde_json::json!({
        "version": 1,
        "token_url": mock.token_url,
        "audience": "https://api.satellogic.com/",
        "client_id": MOCK_CLIENT_ID,
        "access_token": "revoked-cached-token",
        "expires_at_unix": expires,
    });
    std::fs::write(&cache, cached.to_string()).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    // No contract.default: the proxy asks GET /contracts with the cached token, which the
    // upstream no longer accepts.
    let h = Harness::start_proxy(
        mock,
        &format!("[auth]\ntoken_cache = \"{}\"\n", cache.display()),
    )
    .await;
    h.ready().await;
    let r = get(&client(), h.url(PRODUCTS)).await;
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    assert_eq!(h.token_fetches(), 1, "one new token for the rejected one");
    let sent = h.mock.state.last_request_to(PRODUCTS).unwrap();
    assert_eq!(sent.headers["x-satellogic-contract-id"], "contract-123");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_token_retry_after_is_the_time_until_the_refreshers_next_attempt() {
    let h = rate_limited("40", "60s").await;
    // The first fetch was refused with Retry-After: 40; the refresher waits that long.
    eventually(Duration::from_secs(10), || async {
        readyz(&h).await.1["tokens"][0]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("rate limiting"))
    })
    .await;
    let r = get(&client(), h.url(PRODUCTS)).await;
    let retry_after: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let (status, code) = proxy_error(r).await;
    assert_eq!((status, code.as_str()), (503, "no_token"));
    assert!(
        (10..=40).contains(&retry_after),
        "Retry-After {retry_after}: the refresher's next attempt is about 40 s away"
    );
    assert_eq!(fetch_attempts(&h), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_retry_after_of_any_size_is_passed_through_not_a_crash() {
    init();
    let h = Harness::start("").await;
    h.ready().await;
    *h.mock.state.api_fail_retry_after.lock().unwrap() = u64::MAX.to_string();
    *h.mock.state.api_fail_next.lock().unwrap() = Some((503, 1));
    let c = client();
    let r = get(&c, h.url(PRODUCTS)).await;
    assert_eq!(r.status(), 503, "too long to wait: the upstream's answer");
    assert!(r.headers().get("x-aleph-proxy-error").is_none());
    let r = get(&c, h.url(PRODUCTS)).await;
    assert_eq!(r.status(), 200);
}

fn payload(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8 ^ (i >> 12) as u8).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_bodies_are_replayed_after_a_401_large_streamed_ones_are_not() {
    init();
    let h = Harness::start("[contract]\ndefault = \"contract-123\"").await;
    h.ready().await;
    let c = client();

    // Under the 1 MiB replay limit: kept, replayed with a new token, the client sees 200.
    h.mock.state.revoke_all_tokens();
    let small = payload(512 * 1024);
    let r = c
        .post(h.url("/echo/small"))
        .body(small.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.bytes().await.unwrap().as_ref() == small.as_slice());
    assert_eq!(upstream_hits(&h, "POST", "/echo/small"), 2);
    assert_eq!(h.token_fetches(), 2);

    // Over the limit: streamed, cannot be replayed, the 401 goes back to the client.
    h.mock.state.revoke_all_tokens();
    let large = payload(2 * 1024 * 1024 + 3);
    let r = c
        .post(h.url("/echo/large"))
        .body(large.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers().get("x-aleph-proxy-error").is_none());
    assert_eq!(upstream_hits(&h, "POST", "/echo/large"), 1, "not replayed");
    // The rejected token was dropped all the same: the next request gets a new one.
    let r = c
        .post(h.url("/echo/large"))
        .body(large)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(h.token_fetches(), 3);
}

/// Sends a request with a chunked body over a raw connection (reqwest sends Content-Length for
/// in-memory bodies) and returns the status code and the response body (read until the close).
async fn raw_chunked_post(proxy: SocketAddr, path: &str, payload: &[u8]) -> (u16, Vec<u8>) {
    let mut conn = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {proxy}\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    for chunk in payload.chunks(64 * 1024) {
        conn.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
            .await
            .unwrap();
        conn.write_all(chunk).await.unwrap();
        conn.write_all(b"\r\n").await.unwrap();
    }
    conn.write_all(b"0\r\n\r\n").await.unwrap();
    let mut resp = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), conn.read_to_end(&mut resp))
        .await
        .expect("the proxy answers and closes")
        .unwrap();
    let split = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete response head");
    let head = String::from_utf8_lossy(&resp[..split]).to_string();
    assert!(
        head.to_ascii_lowercase().contains("content-length"),
        "expected a sized echo: {head}"
    );
    let status = head[9..12].parse().unwrap();
    (status, resp[split + 4..].to_vec())
}

/// curl sends `Expect: 100-continue` before bodies over 1 MiB and waits for the go-ahead: the
/// proxy must give it (and not forward the Expect), for kept and for streamed bodies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_that_expect_100_continue_get_it_and_arrive_whole() {
    init();
    let h = Harness::start("[contract]\ndefault = \"contract-123\"").await;
    h.ready().await;
    for size in [1000usize, 3 * 1024 * 1024] {
        let payload: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        let mut conn = tokio::net::TcpStream::connect(h.proxy).await.unwrap();
        let head = format!(
            "PUT /echo/expect HTTP/1.1\r\nHost: {}\r\nContent-Type: application/octet-stream\r\nContent-Length: {size}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
            h.proxy
        );
        conn.write_all(head.as_bytes()).await.unwrap();
        let mut interim = [0u8; 25];
        tokio::time::timeout(Duration::from_secs(5), conn.read_exact(&mut interim))
            .await
            .expect("a 100 Continue before the body is sent")
            .unwrap();
        assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
        conn.write_all(&payload).await.unwrap();
        let mut resp = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), conn.read_to_end(&mut resp))
            .await
            .expect("the proxy answers and closes")
            .unwrap();
        let split = resp.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        assert!(resp.starts_with(b"HTTP/1.1 200"), "{size} bytes");
        assert!(
            resp[split + 4..] == payload[..],
            "{size} bytes echoed whole"
        );
        let rec = h.mock.state.last_request_to("/echo/expect").unwrap();
        assert!(rec.headers.get("expect").is_none(), "Expect went upstream");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_uploads_are_kept_for_replay_when_small_and_forwarded_whole_when_large() {
    init();
    let h = Harness::start("[contract]\ndefault = \"contract-123\"").await;
    h.ready().await;

    // Small and chunked (no Content-Length): kept, so a revoked token costs the client nothing.
    h.mock.state.revoke_all_tokens();
    let small = payload(300 * 1024);
    let (status, body) = raw_chunked_post(h.proxy, "/echo/chunked-small", &small).await;
    assert_eq!(status, 200);
    assert!(body == small, "the replayed body differs");
    assert_eq!(upstream_hits(&h, "POST", "/echo/chunked-small"), 2);
    assert_eq!(h.token_fetches(), 2);

    // Large and chunked: what was read while deciding is sent first, then the rest, byte for byte.
    let large = payload(3 * 1024 * 1024 + 11);
    let (status, body) = raw_chunked_post(h.proxy, "/echo/chunked-large", &large).await;
    assert_eq!(status, 200);
    assert!(body == large, "the streamed body differs");
    let rec = h.mock.state.last_request().unwrap();
    assert!(rec.body.as_ref() == large.as_slice());

    // Large, chunked and rejected: not replayable, so the client gets the upstream's 401.
    h.mock.state.revoke_all_tokens();
    let (status, _) = raw_chunked_post(h.proxy, "/echo/chunked-rejected", &large).await;
    assert_eq!(status, 401);
    assert_eq!(upstream_hits(&h, "POST", "/echo/chunked-rejected"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_upload_is_abandoned_after_the_idle_timeout() {
    init();
    let h =
        Harness::start("[contract]\ndefault = \"contract-123\"\n[timeouts]\nbody_idle = \"300ms\"")
            .await;
    h.ready().await;
    let before = api_requests(&h);
    // Beyond the replay limit (streamed upstream) and below it (read first): both stall.
    for declared in [2 * 1024 * 1024, 100 * 1024] {
        let mut conn = tokio::net::TcpStream::connect(h.proxy).await.unwrap();
        let head = format!(
            "POST /echo/stalled HTTP/1.1\r\nHost: {}\r\nContent-Length: {declared}\r\n\r\n",
            h.proxy
        );
        conn.write_all(head.as_bytes()).await.unwrap();
        conn.write_all(&payload(10_000)).await.unwrap();
        let started = Instant::now();
        let mut resp = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut resp))
            .await
            .expect("the proxy gives up on the upload");
        let text = String::from_utf8_lossy(&resp).to_ascii_lowercase();
        assert!(text.starts_with("http/1.1 400"), "{declared}: {text}");
        assert!(text.contains("x-aleph-proxy-error: bad_request"), "{text}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
    }
    assert_eq!(
        api_requests(&h),
        before,
        "the upstream never got a complete request"
    );
    assert_eq!(get(&client(), h.url(PRODUCTS)).await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_longer_than_the_response_headers_timeout_arrives_while_it_keeps_moving() {
    init();
    let h = Harness::start(
        "[contract]\ndefault = \"contract-123\"\n[timeouts]\nresponse_headers = \"400ms\"",
    )
    .await;
    h.ready().await;
    // 2 MiB (streamed: beyond the replay limit) in 32 pieces 100 ms apart: about 3 s in all,
    // far beyond the timeout, but never idle for long.
    let body = payload(2 * 1024 * 1024);
    let mut conn = tokio::net::TcpStream::connect(h.proxy).await.unwrap();
    let head = format!(
        "POST /echo/slow HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        h.proxy,
        body.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    for piece in body.chunks(64 * 1024) {
        conn.write_all(piece).await.unwrap();
        // The pace of a slow uplink: this is the behaviour under test, not a wait for a condition.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut resp = Vec::new();
    conn.read_to_end(&mut resp).await.unwrap();
    assert!(started.elapsed() > Duration::from_secs(2));
    let end = resp.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let head = String::from_utf8_lossy(&resp[..end]);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        resp[end..] == body[..],
        "the upload was echoed back altered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_upstream_gives_504() {
    init();
    let h = Harness::start(
        "[contract]\ndefault = \"contract-123\"\n[timeouts]\nresponse_headers = \"300ms\"",
    )
    .await;
    h.ready().await;
    *h.mock.state.api_delay.lock().unwrap() = Duration::from_secs(3);
    let started = Instant::now();
    let r = get(&client(), h.url(PRODUCTS)).await;
    let (status, code) = proxy_error(r).await;
    assert_eq!((status, code.as_str()), (504, "upstream_timeout"));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(api_requests(&h), 1, "a timeout is not retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_response_body_is_cut_after_the_idle_timeout() {
    init();
    let h =
        Harness::start("[contract]\ndefault = \"contract-123\"\n[timeouts]\nbody_idle = \"300ms\"")
            .await;
    h.ready().await;
    // One 64 KiB chunk every 4 s: the headers come at once, then the body stalls.
    h.mock.state.asset_rate.store(16 * 1024, Ordering::SeqCst);
    let started = Instant::now();
    let r = get(&client(), h.url("/assets/l1d/item/analytic")).await;
    assert_eq!(r.status(), 200);
    assert!(
        r.bytes().await.is_err(),
        "a truncated body must not look complete"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_upstream_gives_502_quickly() {
    init();
    let mock = Mock::start(MockOptions::default()).await.unwrap();
    // A port with nobody listening: connections are refused.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let mut config = support::config_for(&mock, "[contract]\ndefault = \"contract-123\"");
    config.upstream.url = format!("http://{dead}").parse().unwrap();
    let h = Harness::start_config(mock, config).await;
    h.ready().await;
    let c = client();
    for method in [reqwest::Method::GET, reqwest::Method::POST] {
        let started = Instant::now();
        let r = c
            .request(method.clone(), h.url(PRODUCTS))
            .send()
            .await
            .unwrap();
        let (status, code) = proxy_error(r).await;
        assert_eq!(
            (status, code.as_str()),
            (502, "upstream_unreachable"),
            "{method}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{method}: {:?}",
            started.elapsed()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_does_not_accept_connections_gives_504_after_the_connect_timeout() {
    init();
    let mock = Mock::start(MockOptions::default()).await.unwrap();
    // A listener that never accepts, its backlog filled: the kernel drops further SYNs, so a
    // connect hangs as it does to a host behind a silent firewall.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let black_hole = socket.listen(1).unwrap();
    let addr = black_hole.local_addr().unwrap();
    let mut fillers = Vec::new();
    loop {
        match tokio::time::timeout(
            Duration::from_millis(300),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            Ok(Ok(s)) => fillers.push(s),
            Ok(Err(e)) => panic!("connect: {e}"),
            Err(_) => break,
        }
        assert!(fillers.len() < 64, "the backlog never filled");
    }
    let mut config = support::config_for(
        &mock,
        "[contract]\ndefault = \"contract-123\"\n[timeouts]\nconnect = \"300ms\"",
    );
    config.upstream.url = format!("http://{addr}").parse().unwrap();
    let h = Harness::start_config(mock, config).await;
    h.ready().await;
    let started = Instant::now();
    let r = get(&client(), h.url(PRODUCTS)).await;
    let (status, code) = proxy_error(r).await;
    assert_eq!((status, code.as_str()), (504, "upstream_timeout"));
    // Three attempts (two retries of a GET) of 300 ms each, plus short backoffs.
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    drop(fillers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_goes_down_gives_502_and_comes_back() {
    init();
    let h = Harness::start("[contract]\ndefault = \"contract-123\"").await;
    h.ready().await;
    let c = client();
    assert_eq!(get(&c, h.url(PRODUCTS)).await.status(), 200);
    // The mock's "down" accepts connections and closes them unanswered, as a load balancer with
    // no healthy backend does: reached, but no response.
    h.mock.state.api_down.store(true, Ordering::SeqCst);
    let r = get(&c, h.url(PRODUCTS)).await;
    let (status, code) = proxy_error(r).await;
    // The reset may reach a new connection before the request is written (a connect failure,
    // retried, then `upstream_unreachable`) or after (`upstream_bad_response`): a 502 either way.
    assert_eq!(status, 502, "{code}");
    assert!(
        matches!(
            code.as_str(),
            "upstream_bad_response" | "upstream_unreachable"
        ),
        "{code}"
    );
    h.mock.state.api_down.store(false, Ordering::SeqCst);
    assert_eq!(get(&c, h.url(PRODUCTS)).await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_requests_are_retried_after_retry_after_others_are_not() {
    init();
    let h = Harness::start("[contract]\ndefault = \"contract-123\"").await;
    h.ready().await;
    let c = client();
    let s = &h.mock.state;

    // GET: a 503 with Retry-After: 1 is retried after a second, and the client sees the 200.
    *s.api_fail_retry_after.lock().unwrap() = "1".into();
    *s.api_fail_next.lock().unwrap() = Some((503, 1));
    let started = Instant::now();
    let r = get(&c, h.url(PRODUCTS)).await;
    assert_eq!(r.status(), 200);
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(upstream_hits(&h, "GET", PRODUCTS), 2);

    // 429 and 502 are retried too (Retry-After: 0 here).
    *s.api_fail_retry_after.lock().unwrap() = "0".into();
    for status in [429, 502] {
        *s.api_fail_next.lock().unwrap() = Some((status, 1));
        assert_eq!(
            get(&c, h.url("/v2/orders/")).await.status(),
            200,
            "{status}"
        );
    }

    // POST is not idempotent: the 503 goes back to the client, the upstream saw it once.
    *s.api_fail_next.lock().unwrap() = Some((503, 1));
    let r = c
        .post(h.url("/tasking/tasks/"))
        .json(&serde_json::json!({"task_name": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().get("x-aleph-proxy-error").is_none());
    assert_eq!(upstream_hits(&h, "POST", "/tasking/tasks/"), 1);

    // Bounded in count: default 2 retries, so 3 attempts, then the upstream's 503.
    h.mock.state.clear_recorded();
    *s.api_fail_next.lock().unwrap() = Some((503, 10));
    let r = get(&c, h.url("/v2/captures/")).await;
    assert_eq!(r.status(), 503);
    assert_eq!(upstream_hits(&h, "GET", "/v2/captures/"), 3);

    // Bounded in time: a Retry-After beyond retry.max_elapsed (30 s) is not waited for.
    h.mock.state.clear_recorded();
    *s.api_fail_retry_after.lock().unwrap() = "120".into();
    *s.api_fail_next.lock().unwrap() = Some((503, 1));
    let started = Instant::now();
    let r = get(&c, h.url("/v2/captures/")).await;
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "120");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(upstream_hits(&h, "GET", "/v2/captures/"), 1);
    *s.api_fail_next.lock().unwrap() = None;

    // Configurable: retry.max_retries = 0 turns retries off.
    let h =
        Harness::start("[contract]\ndefault = \"contract-123\"\n[retry]\nmax_retries = 0").await;
    h.ready().await;
    *h.mock.state.api_fail_next.lock().unwrap() = Some((503, 1));
    assert_eq!(get(&c, h.url(PRODUCTS)).await.status(), 503);
    assert_eq!(upstream_hits(&h, "GET", PRODUCTS), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_pooled_and_reused() {
    init();
    let h = Harness::start("[contract]\ndefault = \"contract-123\"").await;
    h.ready().await;
    let c = client();
    for _ in 0..100 {
        assert_eq!(get(&c, h.url(PRODUCTS)).await.status(), 200);
    }
    let conns = h.mock.state.api_connections.load(Ordering::SeqCst);
    // One, give or take a connection opened while the previous one was still on its way back to
    // the pool.
    assert!(
        conns <= 2,
        "100 sequential requests, {conns} upstream connections"
    );

    // 10 concurrent clients: at most one upstream connection each.
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let (c, url) = (c.clone(), h.url(PRODUCTS));
        tasks.push(tokio::spawn(async move {
            for _ in 0..30 {
                assert_eq!(c.get(&url).send().await.unwrap().status(), 200);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let conns = h.mock.state.api_connections.load(Ordering::SeqCst);
    assert!(conns <= 11, "400 requests, {conns} upstream connections");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_half_a_request_line_is_never_served_and_is_closed() {
    init();
    let h = Harness::start(
        "[contract]\ndefault = \"contract-123\"\n[timeouts]\nrequest_headers = \"500ms\"",
    )
    .await;
    h.ready().await;
    let before = api_requests(&h);
    let mut partial = tokio::net::TcpStream::connect(h.proxy).await.unwrap();
    partial.write_all(b"GET /tasking/pro").await.unwrap();
    let mut silent = tokio::net::TcpStream::connect(h.proxy).await.unwrap();
    for (name, conn) in [
        ("half a request line", &mut partial),
        ("nothing", &mut silent),
    ] {
        let started = Instant::now();
        let mut buf = Vec::new();
        // read_to_end ends at the proxy's close (EOF) or its reset.
        let read = tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("{name}: the connection stayed open"));
        let waited = started.elapsed();
        assert!(
            read.is_err() || buf.is_empty(),
            "{name}: got a response {buf:?}"
        );
        assert!(
            waited < Duration::from_secs(3),
            "{name}: closed after {waited:?}"
        );
    }
    assert_eq!(api_requests(&h), before, "nothing was forwarded");
    // The proxy still serves everyone else.
    assert_eq!(get(&client(), h.url(PRODUCTS)).await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_gives_503_with_retry_after() {
    init();
    let h =
        Harness::start("[contract]\ndefault = \"contract-123\"\n[limits]\nmax_in_flight = 2").await;
    h.ready().await;
    *h.mock.state.api_delay.lock().unwrap() = Duration::from_secs(1);
    let c = client();
    let slow: Vec<_> = (0..2)
        .map(|_| {
            let (c, url) = (c.clone(), h.url(PRODUCTS));
            tokio::spawn(async move { c.get(url).send().await.unwrap().status() })
        })
        .collect();
    eventually(Duration::from_secs(5), || async { api_requests(&h) >= 2 }).await;
    let r = get(&c, h.url(PRODUCTS)).await;
    assert_eq!(r.headers()["retry-after"], "1");
    let (status, code) = proxy_error(r).await;
    assert_eq!((status, code.as_str()), (503, "overloaded"));
    assert_eq!(
        api_requests(&h),
        2,
        "the overflow request was not forwarded"
    );
    for t in slow {
        assert_eq!(t.await.unwrap(), 200);
    }
    *h.mock.state.api_delay.lock().unwrap() = Duration::ZERO;
    assert_eq!(get(&c, h.url(PRODUCTS)).await.status(), 200);
}

/// The real binary with a config file, its stderr collected line by line.
struct Binary {
    child: Child,
    proxy: SocketAddr,
    admin: SocketAddr,
    log: Arc<Mutex<String>>,
    _dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    // Bound and released at once: the binary takes it a moment later. Collisions are retried.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

impl Binary {
    async fn start(mock: &Mock, extra: &str) -> Binary {
        Self::start_with_env(mock, extra, &[]).await
    }

    /// `start`, with these environment variables set for the process.
    async fn start_with_env(mock: &Mock, extra: &str, env: &[(&str, &str)]) -> Binary {
        for _ in 0..5 {
            if let Some(b) = Self::try_start(mock, extra, env).await {
                return b;
            }
        }
        panic!("the binary did not start on free ports five times");
    }

    async fn try_start(mock: &Mock, extra: &str, env: &[(&str, &str)]) -> Option<Binary> {
        let dir = tempfile::tempdir().unwrap();
        let proxy: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let path = dir.path().join("aleph-proxy.toml");
        std::fs::write(
            &path,
            format!(
                r#"
listen = "{proxy}"
upstream = "{api}"
[auth]
token_url = "{token}"
client_id = "{id}"
client_secret = "{secret}"
retry_initial_backoff = "50ms"
retry_max_backoff = "200ms"
[admin]
listen = "{admin}"
[contract]
default = "contract-123"
{extra}
"#,
                api = mock.api_url,
                token = mock.token_url,
                id = MOCK_CLIENT_ID,
                secret = MOCK_CLIENT_SECRET,
            ),
        )
        .unwrap();
        let mut cmd = Command::new(support::binary());
        cmd.args(["--config", path.to_str().unwrap(), "run"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, _) in std::env::vars() {
            if k.starts_with("ALEPH_PROXY_") || k == "TOKIO_WORKER_THREADS" {
                cmd.env_remove(k);
            }
        }
        cmd.envs(env.iter().copied());
        let mut child = cmd.spawn().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let mut b = Binary {
            child,
            proxy,
            admin,
            log,
            _dir: dir,
        };
        // Up when the admin port answers; a port taken in the meantime makes it exit: retry.
        let c = client();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(_)) = b.child.try_wait() {
                return None;
            }
            if c.get(format!("http://{}/healthz", b.admin))
                .send()
                .await
                .is_ok()
            {
                return Some(b);
            }
            assert!(Instant::now() < deadline, "binary not up:\n{}", b.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{name}");
    }

    /// Waits (without blocking the runtime) for the process to exit.
    async fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "did not exit within {limit:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_download_lets_it_finish_then_exits_0() {
    init();
    let mock = Mock::start(MockOptions::default()).await.unwrap();
    let mut b = Binary::start(&mock, "[shutdown]\ndrain_timeout = \"20s\"").await;
    let c = client();
    eventually(Duration::from_secs(10), || async {
        c.get(format!("http://{}/readyz", b.admin))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    // 4 MiB at 2 MiB/s: the download lasts about two seconds.
    let size = MockOptions::default().asset_size;
    mock.state
        .asset_rate
        .store(2 * 1024 * 1024, Ordering::SeqCst);
    let mut resp = c
        .get(format!("http://{}/assets/l1d/item-1/analytic", b.proxy))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = Vec::new();
    let first = resp.chunk().await.unwrap().expect("a first chunk");
    body.extend_from_slice(&first);

    b.signal("TERM");
    // Draining: new connections are refused and readiness is false.
    eventually(Duration::from_secs(5), || async {
        tokio::net::TcpStream::connect(b.proxy).await.is_err()
    })
    .await;
    let r = client()
        .get(format!("http://{}/readyz", b.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["draining"],
        true
    );
    assert_eq!(
        b.child.try_wait().unwrap(),
        None,
        "exited with a download in flight"
    );

    while let Some(chunk) = resp.chunk().await.unwrap() {
        body.extend_from_slice(&chunk);
    }
    assert_eq!(body.len(), size);
    let expected = aleph_proxy::mock::generated_asset(size);
    assert!(body == expected, "the download arrived altered");
    let status = b.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0), "{}", b.log());
    let log = b.log();
    assert!(log.contains("SIGTERM received"), "{log}");
    assert!(log.contains("shutting down"), "{log}");
    // In the order it happened: the signal, the drain, the end.
    let at = |s: &str| log.find(s).unwrap_or_else(|| panic!("{s}: {log}"));
    assert!(at("SIGTERM received") < at("shutting down"), "{log}");
    assert!(at("shutting down") < at("stopped"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_and_sighup_stop_an_idle_proxy_with_exit_0() {
    init();
    let mock = Mock::start(MockOptions::default()).await.unwrap();
    // SIGHUP (a closed terminal) drains like the others instead of killing the process.
    for signal in ["INT", "HUP"] {
        let mut b = Binary::start(&mock, "").await;
        b.signal(signal);
        let status = b.wait_exit(Duration::from_secs(10)).await;
        assert_eq!(status.code(), Some(0), "{}", b.log());
        assert!(b.log().contains(&format!("SIG{signal} received")));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_timeout_bounds_shutdown_and_still_exits_0() {
    init();
    let mock = Mock::start(MockOptions::default()).await.unwrap();
    let mut b = Binary::start(&mock, "[shutdown]\ndrain_timeout = \"500ms\"").await;
    // 16 s, far longer than the drain timeout.
    let (resp, received) = slow_download(&mock, &b, "item-2").await;
    let started = Instant::now();
    b.signal("TERM");
    let status = b.wait_exit(Duration::from_secs(10)).await;
    let took = started.elapsed();
    assert_eq!(status.code(), Some(0), "{}", b.log());
    assert!(took < Duration::from_secs(4), "exit took {took:?}");
    assert!(b.log().contains("drain timeout reached"), "{}", b.log());
    assert_cut_off(resp, received).await;
}

/// A download through `b` at 256 KiB/s (4 MiB: 16 s), once its first chunk has arrived; with the
/// bytes received so far.
async fn slow_download(mock: &Mock, b: &Binary, item: &str) -> (reqwest::Response, usize) {
    mock.state.asset_rate.store(256 * 1024, Ordering::SeqCst);
    let mut resp = client()
        .get(format!("http://{}/assets/l1d/{item}/analytic", b.proxy))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let received = resp.chunk().await.unwrap().map_or(0, |c| c.len());
    (resp, received)
}

/// The rest of a download that shutdown cut off: it ends short (with an error), never as a
/// complete body.
async fn assert_cut_off(mut resp: reqwest::Response, mut received: usize) {
    while let Ok(Some(c)) = resp.chunk().await {
        received += c.len();
    }
    assert!(received < MockOptions::default().asset_size);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_ends_the_drain_at_once() {
    init();
    let mock = Mock::start(MockOptions::default()).await.unwrap();
    let mut b = Binary::start(&mock, "[shutdown]\ndrain_timeout = \"120s\"").await;
    // 16 s, and the drain would wait for all of it.
    let (resp, received) = slow_download(&mock, &b, "item-3").await;
    b.signal("TERM");
    // The first signal is handled (draining: no new connections) before the second is sent:
    // two signals pending at once would reach the process as one.
    eventually(Duration::from_secs(5), || async {
        tokio::net::TcpStream::connect(b.proxy).await.is_err()
    })
    .await;
    assert_eq!(
        b.child.try_wait().unwrap(),
        None,
        "exited with a download in flight"
    );
    b.signal("INT");
    let status = b.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0), "{}", b.log());
    let log = b.log();
    assert!(log.contains("SIGTERM received"), "{log}");
    assert!(log.contains("SIGINT received again: stopping now"), "{log}");
    assert_cut_off(resp, received).await;
}

/// The access log is written in batches (whenever the proxy runs out of work, or every 32 KiB);
/// none of it may be lost on the way out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_log_line_is_written_before_a_clean_exit() {
    init();
    let mock = Mock::start(MockOptions::default()).await.unwrap();
    // Both schedulers: one worker is the current-thread one, which never parks after its last line.
    for workers in ["1", "2"] {
        every_log_line_is_written_before_a_clean_exit_with(&mock, workers).await;
    }
}

async fn every_log_line_is_written_before_a_clean_exit_with(mock: &Mock, workers: &str) {
    let mut b = Binary::start_with_env(mock, "", &[("TOKIO_WORKER_THREADS", workers)]).await;
    // Enough requests on enough connections that lines pile up while the proxy is busy.
    const CONNS: usize = 16;
    const EACH: usize = 50;
    let c = client();
    let mut tasks = Vec::new();
    for conn in 0..CONNS {
        let (c, url) = (c.clone(), format!("http://{}/tasking/products/", b.proxy));
        tasks.push(tokio::spawn(async move {
            for i in 0..EACH {
                let r = c
                    .get(&url)
                    .header("x-request-id", format!("burst-{conn}-{i}"))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
                r.bytes().await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    b.signal("TERM");
    let status = b.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0), "{}", b.log());
    // The last line, logged after the runtime's last idle moment: only the exit writes it.
    eventually(Duration::from_secs(5), || async {
        b.log().contains("stopped")
    })
    .await;
    let log = b.log();
    let missing: Vec<String> = (0..CONNS)
        .flat_map(|conn| (0..EACH).map(move |i| format!("request_id=\"burst-{conn}-{i}\"")))
        .filter(|id| {
            !log.lines()
                .any(|l| l.contains(id.as_str()) && l.contains("status=200"))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "{workers} worker(s): no access log line for {missing:?}"
    );
    assert!(log.trim_end().ends_with("clean=true"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credential_rejection_is_logged_clearly_once_per_series() {
    init();
    let mock = Mock::start(MockOptions {
        token_lifetime: Duration::from_secs(2),
        ..MockOptions::default()
    })
    .await
    .unwrap();
    let fetches = || mock.state.token_fetches.load(Ordering::SeqCst);
    // The series starts as an outage (500s) and turns into a rejection: it is still called a
    // credential problem, once.
    mock.state.set_token_mode(TokenMode::ServerError);
    let mut b = Binary::start(&mock, "").await;
    eventually(Duration::from_secs(10), || async { fetches() >= 2 }).await;
    mock.state.set_token_mode(TokenMode::Reject);
    let seen = fetches();
    eventually(Duration::from_secs(10), || async { fetches() >= seen + 5 }).await;
    let log = b.log();
    assert_eq!(
        log.matches("cannot fetch an access token").count(),
        1,
        "{log}"
    );
    let problems = |log: &str| log.matches("CREDENTIAL PROBLEM").count();
    assert_eq!(problems(&log), 1, "one clear error per series:\n{log}");
    assert!(
        log.contains("check auth.client_id and auth.client_secret"),
        "{log}"
    );
    assert!(
        log.matches("token fetch failed again").count() >= 3,
        "{log}"
    );
    let r = client()
        .get(format!("http://{}/readyz", b.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);

    // Recovery, then a second series when the next refresh is rejected again.
    mock.state.set_token_mode(TokenMode::Ok);
    eventually(Duration::from_secs(10), || async {
        b.log().contains("token endpoint recovered")
    })
    .await;
    mock.state.set_token_mode(TokenMode::Reject);
    let seen = fetches();
    eventually(Duration::from_secs(10), || async { fetches() >= seen + 4 }).await;
    b.signal("TERM");
    let status = b.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0));
    let log = b.log();
    assert_eq!(problems(&log), 2, "{log}");
    assert!(!log.contains(MOCK_CLIENT_SECRET), "the secret was logged");
    assert!(!log.contains("mock-token-"), "a token was logged");
}

/// One GET on a kept-alive connection, opened on first use: a minimal HTTP/1.1 client, because in
/// debug builds a full client costs as much CPU as the proxy under test and the soak must stay
/// short. Anything but a complete 200 is an error.
async fn soak_get(
    conn: &mut Option<tokio::io::BufReader<tokio::net::TcpStream>>,
    proxy: SocketAddr,
    path: &str,
) -> Result<(), String> {
    use tokio::io::AsyncBufReadExt;
    if conn.is_none() {
        let s = tokio::net::TcpStream::connect(proxy)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        *conn = Some(tokio::io::BufReader::new(s));
    }
    let c = conn.as_mut().expect("connected");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {proxy}\r\n\r\n");
    let io = |e: std::io::Error| e.to_string();
    c.get_mut()
        .write_all(request.as_bytes())
        .await
        .map_err(io)?;
    let mut line = String::new();
    c.read_line(&mut line).await.map_err(io)?;
    let status = line.get(9..12).unwrap_or("").to_string();
    let mut length = None;
    let mut close = false;
    loop {
        line.clear();
        if c.read_line(&mut line).await.map_err(io)? == 0 {
            return Err("connection closed in the response head".into());
        }
        if line == "\r\n" {
            break;
        }
        let lower = line.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            length = v.trim().parse::<usize>().ok();
        }
        if lower.starts_with("transfer-encoding:") {
            return Err(format!("unexpected {}", line.trim()));
        }
        close |= lower.starts_with("connection:") && lower.contains("close");
    }
    let mut body = vec![0; length.ok_or("no content-length")?];
    c.read_exact(&mut body).await.map_err(io)?;
    if close {
        *conn = None;
    }
    if status != "200" {
        return Err(format!(
            "status {status}: {}",
            String::from_utf8_lossy(&body)
        ));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_20000_requests_100_clients_two_rotations_no_failures() {
    init();
    const TOTAL: usize = 20_000;
    const CLIENTS: usize = 100;
    const ROTATIONS: u64 = 2;
    // An authenticated API path with a small non-JSON answer: every request is checked for its
    // token and contract by the mock, while the proxy's JSON rewriting stays out of the measure.
    const SOAK_PATH: &str = "/echo/soak";
    let h = Harness::start("[contract]\ndefault = \"contract-123\"").await;
    h.ready().await;
    let issued = Arc::new(AtomicUsize::new(0));
    let completed = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let (issued, completed, failures) = (issued.clone(), completed.clone(), failures.clone());
        let proxy = h.proxy;
        tasks.push(tokio::spawn(async move {
            let mut conn = None;
            while issued.fetch_add(1, Ordering::SeqCst) < TOTAL {
                if let Err(e) = soak_get(&mut conn, proxy, SOAK_PATH).await {
                    conn = None;
                    failures.lock().unwrap().push(e);
                }
                completed.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    // Two forced rotations, at a third and two thirds of the run. After each, the server side
    // revokes every older token, so requests still carrying one get a 401 and are replayed.
    let rotations = Arc::new(AtomicU64::new(0));
    for k in 1..=ROTATIONS {
        let at = TOTAL * k as usize / (ROTATIONS as usize + 1);
        eventually(Duration::from_secs(60), || async {
            completed.load(Ordering::SeqCst) >= at
        })
        .await;
        let generation = h.tokens[0].generation();
        h.tokens[0].rotate_now();
        assert!(
            h.tokens[0]
                .wait_for_generation(generation, Duration::from_secs(10))
                .await,
            "rotation {k} produced no new token"
        );
        h.mock.state.revoke_all_but_latest();
        rotations.fetch_add(1, Ordering::SeqCst);
    }
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = started.elapsed();
    let failures = failures.lock().unwrap().clone();
    let fetches = h.token_fetches();
    let done = completed.load(Ordering::SeqCst);
    println!(
        "soak: {done} requests, {CLIENTS} concurrent clients, {} rotations, {fetches} token fetches, {} failures, {:.2} s, {:.0} req/s",
        rotations.load(Ordering::SeqCst),
        failures.len(),
        elapsed.as_secs_f64(),
        done as f64 / elapsed.as_secs_f64()
    );
    assert_eq!(done, TOTAL);
    assert!(
        failures.is_empty(),
        "{} failures, first: {:?}",
        failures.len(),
        failures.first()
    );
    assert!(
        fetches <= ROTATIONS + 1,
        "{fetches} token fetches for {ROTATIONS} rotations"
    );
}

/// The proxy in front of `mock` with its client secret in the file `secret` (read from the
/// configuration as a deployment gives it) and a default contract.
async fn with_secret_file(mock: Mock, secret: &std::path::Path) -> Harness {
    let toml = support::base_toml(&mock).replace(
        &format!("client_secret = \"{MOCK_CLIENT_SECRET}\""),
        &format!("client_secret_file = \"{}\"", secret.display()),
    );
    let config = aleph_proxy::config::from_figment(&figment::Figment::from(
        <figment::providers::Toml as figment::providers::Format>::string(&format!(
            "{toml}[contract]\ndefault = \"contract-123\"\n"
        )),
    ))
    .unwrap();
    assert_eq!(
        config.credentials[0].client_secret_file.as_deref(),
        Some(secret)
    );
    Harness::start_config(mock, config).await
}

/// A rotated secret (a Kubernetes Secret update rewrites the mounted file) is picked up at the
/// next token request, without a restart: a proxy started with an old secret recovers once the
/// file holds the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_secret_file_is_used_without_a_restart() {
    init();
    let mock = Mock::start(MockOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("client-secret");
    std::fs::write(&secret, "an-old-revoked-secret\n").unwrap();
    let h = with_secret_file(mock, &secret).await;
    // Rejected: not ready, and requests get the proxy's 503.
    eventually(Duration::from_secs(10), || async { h.token_fetches() >= 2 }).await;
    assert_eq!(readyz(&h).await.0, 503);
    // The file is replaced the way kubelet and `mv` do it: a new file renamed over the old.
    let staged = dir.path().join("staged");
    std::fs::write(&staged, MOCK_CLIENT_SECRET).unwrap();
    std::fs::rename(&staged, &secret).unwrap();
    h.ready().await;
    assert_eq!(get(&client(), h.url(PRODUCTS)).await.status(), 200);
}

/// A secret file that hangs when it is read again (a stuck NFS or CSI mount; here a FIFO with
/// no writer) delays only the token request. On a one-thread runtime, which the proxy runs with
/// one CPU, a blocking read would have stopped every request; the token request goes out with
/// the secret in use once the read has had `SECRET_READ_TIMEOUT`.
#[tokio::test]
async fn a_hung_secret_file_delays_the_token_request_not_the_proxy() {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    init();
    let mock = Mock::start(MockOptions {
        token_lifetime: Duration::from_secs(6),
        ..MockOptions::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("client-secret");
    std::fs::write(&secret, MOCK_CLIENT_SECRET).unwrap();
    let h = with_secret_file(mock, &secret).await;
    h.ready().await;
    let fetched = h.token_fetches();

    // The secret becomes a FIFO: opening it for reading blocks until a writer comes. A second
    // name for it lets the end of the test (or the watchdog, should the proxy be stuck) release
    // readers after the secret's name points elsewhere again.
    let fifo = dir.path().join("fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let held = dir.path().join("held");
    std::fs::hard_link(&fifo, &held).unwrap();
    std::fs::rename(&fifo, &secret).unwrap();
    let release = move || {
        // Non-blocking: with no reader waiting this fails at once (ENXIO), and that is fine.
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&held)
        {
            let _ = f.write_all(MOCK_CLIENT_SECRET.as_bytes());
        }
    };
    let watchdog_release = release.clone();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(40));
        watchdog_release();
    });

    // The refresh (a tenth of the 6 s life before expiry) reads the FIFO. Meanwhile every
    // request is answered at once: 200, or 503 while the token has expired and its successor
    // waits for the read to give up.
    let c = client();
    let start = Instant::now();
    let mut statuses = Vec::new();
    while h.token_fetches() == fetched {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no token request with the secret in use after the read hung"
        );
        let t = Instant::now();
        let status = c.get(h.url(PRODUCTS)).send().await.unwrap().status();
        assert!(
            t.elapsed() < Duration::from_millis(1500),
            "a request took {:?} while the secret file hung",
            t.elapsed()
        );
        assert!(status == 200 || status == 503, "{status}");
        statuses.push(status);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The read was given up on and the secret in use fetched a new token.
    assert!(
        start.elapsed() >= aleph_proxy::token::SECRET_READ_TIMEOUT,
        "{:?}",
        start.elapsed()
    );
    h.ready().await;
    assert_eq!(get(&c, h.url(PRODUCTS)).await.status(), 200);
    assert!(statuses.len() > 20, "{statuses:?}");

    // A plain file again, then the readers still waiting on the FIFO are let go.
    let plain = dir.path().join("plain");
    std::fs::write(&plain, MOCK_CLIENT_SECRET).unwrap();
    std::fs::rename(&plain, &secret).unwrap();
    release();
}

/// `retry.max_elapsed` bounds a request's retries with their waits: a retry that is still waiting
/// for response headers when the budget ends is cut there (504), instead of running on for
/// `timeouts.response_headers`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_ends_with_the_retry_budget() {
    init();
    let h = Harness::start(
        "[contract]\ndefault = \"contract-123\"\n[retry]\nmax_elapsed = \"3s\"\n[timeouts]\nresponse_headers = \"20s\"\n",
    )
    .await;
    h.ready().await;
    let s = &h.mock.state;
    // Every answer takes 2 s: the first, a 503, leaves about 1 s of the budget for the retry,
    // which then waits for its answer no longer than that.
    *s.api_delay.lock().unwrap() = Duration::from_secs(2);
    *s.api_fail_next.lock().unwrap() = Some((503, 5));
    let r = get(&client(), h.url(PRODUCTS)).await;
    let (status, body) = proxy_error(r).await;
    assert_eq!(status, 504, "{body}");
    assert!(body.contains("upstream_timeout"), "{body}");
    assert_eq!(
        upstream_hits(&h, "GET", PRODUCTS),
        2,
        "the first attempt and one retry"
    );
    *s.api_delay.lock().unwrap() = Duration::ZERO;
    *s.api_fail_next.lock().unwrap() = None;
}

/// The API unreachable at start-up, with no `contract.default`: the proxy is not ready while it
/// cannot discover the credential's contract, and a request meanwhile gets a 503 with
/// Retry-After (a passing condition), not a 422 that tells clients not to retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_and_503_while_contract_discovery_has_not_finished() {
    init();
    let mock = Mock::start(MockOptions::default()).await.unwrap();
    *mock.state.api_fail_next.lock().unwrap() = Some((503, u32::MAX));
    let h = Harness::start_proxy(mock, "[auth]\nwait_timeout = \"300ms\"\n").await;
    eventually(Duration::from_secs(10), || async {
        h.mock.state.api_requests.load(Ordering::SeqCst) >= 1
    })
    .await;
    let (status, body) = readyz(&h).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["contracts_discovered"], false, "{body}");
    let r = get(&client(), h.url(PRODUCTS)).await;
    assert!(r.headers().get("retry-after").is_some());
    let (status, code) = proxy_error(r).await;
    assert_eq!((status, code.as_str()), (503, "no_contract"));

    // The API comes back: discovery finishes, the proxy is ready and requests pass.
    *h.mock.state.api_fail_next.lock().unwrap() = None;
    h.ready().await;
    let (_, body) = readyz(&h).await;
    assert_eq!(body["contracts_discovered"], true, "{body}");
    assert_eq!(get(&client(), h.url(PRODUCTS)).await.status(), 200);
}

/// A `GET /contracts` the API refuses for good (a 403) ends discovery: the proxy is ready (routes
/// and the client's own header still work) and unrouted paths get the 422 that says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_contract_discovery_ends_and_leaves_the_proxy_ready() {
    init();
    let mock = Mock::start(MockOptions::default()).await.unwrap();
    *mock.state.api_fail_next.lock().unwrap() = Some((403, 1));
    let h = Harness::start_proxy(
        mock,
        "[[contract.routes]]\nprefix = \"/tasking\"\nid = \"contract-123\"\n",
    )
    .await;
    h.ready().await;
    let (_, body) = readyz(&h).await;
    assert_eq!(body["contracts_discovered"], true, "{body}");
    assert_eq!(get(&client(), h.url(PRODUCTS)).await.status(), 200);
    let r = get(&client(), h.url("/v2/orders/")).await;
    assert!(r.headers().get("retry-after").is_none());
    let (status, body) = proxy_error(r).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(upstream_hits(&h, "GET", "/contracts"), 1, "not asked again");
}
