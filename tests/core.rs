//! The core: tokens, credentials, forwarding, contracts, legacy mode, configuration.
//! Every test runs the real proxy and the mock API on ephemeral loopback ports.

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use aleph_proxy::mock::{MockOptions, MOCK_CONTRACT, MOCK_CONTRACT_2};
use support::{client, eventually, get_json, proxy_error, two_contracts, Harness};

#[tokio::test]
async fn short_lived_tokens_are_refreshed_before_expiry_without_failures() {
    let h = Harness::start_with(
        MockOptions {
            token_lifetime: Duration::from_millis(1500),
            ..MockOptions::default()
        },
        "",
    )
    .await;
    let c = client();
    let mut served = 0;
    // Keep traffic going across at least three refreshes; every request must succeed.
    while h.mock.state.token_successes.load(Ordering::SeqCst) < 4 {
        let r = c.get(h.url("/tasking/products/")).send().await.unwrap();
        assert_eq!(r.status(), 200, "request {served} failed");
        served += 1;
    }
    assert!(served > 10);
    // Refreshes were proactive: no request ever waited on a 401 replay.
    let m = c
        .get(h.admin_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(m.contains("aleph_proxy_token_fetches_total"));
}

#[tokio::test]
async fn cold_start_100_concurrent_requests_cause_one_token_fetch() {
    let h = Harness::start("").await;
    let c = client();
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let c = c.clone();
        let url = h.url("/tasking/products/");
        tasks.push(tokio::spawn(async move {
            c.get(url).send().await.unwrap().status()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(h.token_fetches(), 1);
}

#[tokio::test]
async fn client_credentials_are_replaced_by_the_proxys() {
    let h = Harness::start("").await;
    let r = client()
        .get(h.url("/tasking/products/"))
        .header("authorizationToken", "Bearer client-token")
        .header("Authorization", "Bearer client-authorization")
        .header("AUTHORIZATIONTOKEN", "Key,Secret a,b")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let rec = h.mock.state.last_request().unwrap();
    let toks: Vec<_> = rec.headers.get_all("authorizationtoken").iter().collect();
    assert_eq!(toks.len(), 1);
    let tok = toks[0].to_str().unwrap();
    assert!(tok.starts_with("Bearer mock-token-"), "{tok}");
    assert!(rec.headers.get("authorization").is_none());
    assert_eq!(rec.headers["x-satellogic-contract-id"], MOCK_CONTRACT);
    assert_eq!(
        rec.headers["host"],
        h.mock.api_url.trim_start_matches("http://")
    );
}

fn payload(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(seed) ^ (i >> 11) as u8)
        .collect()
}

#[tokio::test]
async fn methods_queries_and_multi_mib_bodies_are_forwarded_byte_for_byte() {
    forwards_byte_for_byte().await;
}

/// The same on the multi-threaded runtime (the default on a multi-core machine): the request
/// body is read by whichever worker polls the upstream writer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_mib_bodies_on_several_worker_threads_arrive_byte_for_byte() {
    forwards_byte_for_byte().await;
}

async fn forwards_byte_for_byte() {
    let h = Harness::start("").await;
    let c = client();
    // A query with encoded, repeated and odd parameters must arrive exactly as sent.
    let query = "a=1&a=2&b=%2F%3F%26&c=s3%3A%2F%2Fbucket%2Fkey&empty=&flag&x=%E2%9C%93";
    for (i, method) in ["GET", "POST", "PUT", "PATCH", "DELETE"].iter().enumerate() {
        // Several MiB: beyond the replay limit (streamed) for most, under it for one.
        let size = if i == 0 {
            512 * 1024
        } else {
            (3 + i) * 1024 * 1024 + 7
        };
        let body = payload(size, 7 + i as u8);
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let r = c
            .request(m, h.url(&format!("/echo/{method}/x?{query}")))
            .header("content-type", "application/octet-stream")
            .header("x-custom", "kept")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{method}");
        let back = r.bytes().await.unwrap();
        assert!(
            back.as_ref() == body.as_slice(),
            "{method}: echoed body differs"
        );
        let rec = h.mock.state.last_request().unwrap();
        assert_eq!(rec.method.as_str(), *method);
        assert_eq!(rec.uri.query(), Some(query), "{method}");
        assert_eq!(rec.uri.path(), format!("/echo/{method}/x"));
        assert!(
            rec.body.as_ref() == body.as_slice(),
            "{method}: upstream body differs"
        );
        assert_eq!(rec.headers["x-custom"], "kept");
    }
}

#[tokio::test]
async fn redirects_are_returned_not_followed() {
    let h = Harness::start("").await;
    let r = client()
        .get(h.url("/redirect-elsewhere"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 302);
    let loc = r.headers()["location"].to_str().unwrap();
    assert!(loc.starts_with(&h.mock.object_store_url), "{loc}");
    assert!(h.mock.state.object_store.lock().unwrap().is_empty());
}

#[tokio::test]
async fn routes_match_on_segment_boundaries_then_default() {
    let h = Harness::start_with(
        two_contracts(),
        r#"
        [contract]
        default = "contract-123"
        [[contract.routes]]
        prefix = "/archive"
        id = "contract-456"
        "#,
    )
    .await;
    let c = client();
    for (path, want) in [
        ("/archive/stac/", MOCK_CONTRACT_2),
        ("/archives", MOCK_CONTRACT),
        ("/tasking/products/", MOCK_CONTRACT),
    ] {
        c.get(h.url(path)).send().await.unwrap();
        let rec = h.mock.state.last_request().unwrap();
        assert_eq!(rec.headers["x-satellogic-contract-id"], want, "{path}");
    }
    c.get(h.url("/contracts")).send().await.unwrap();
    let rec = h.mock.state.last_request().unwrap();
    assert!(rec.headers.get("x-satellogic-contract-id").is_none());
}

#[tokio::test]
async fn the_only_contract_is_discovered() {
    let h = Harness::start("").await;
    let r = client()
        .get(h.url("/tasking/products/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let rec = h.mock.state.last_request().unwrap();
    assert_eq!(rec.headers["x-satellogic-contract-id"], MOCK_CONTRACT);
}

#[tokio::test]
async fn no_applicable_contract_is_a_proxy_error_without_an_upstream_call() {
    let h = Harness::start_with(two_contracts(), "").await;
    let c = client();
    // Discovery finds two contracts: no automatic choice.
    eventually(Duration::from_secs(5), || async {
        h.mock
            .state
            .recorded()
            .iter()
            .any(|r| r.uri.path() == "/contracts")
    })
    .await;
    let before = h.mock.state.api_requests.load(Ordering::SeqCst);
    let r = c.get(h.url("/tasking/tasks/")).send().await.unwrap();
    let (status, code) = proxy_error(r).await;
    assert_eq!((status, code.as_str()), (422, "no_contract"));
    assert_eq!(h.mock.state.api_requests.load(Ordering::SeqCst), before);
    // /contracts still works: it needs no contract.
    let r = c.get(h.url("/contracts")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn client_contract_header_is_replaced_unless_override_is_allowed() {
    let h = Harness::start_with(two_contracts(), "[contract]\ndefault = \"contract-123\"").await;
    let c = client();
    c.get(h.url("/tasking/products/"))
        .header("X-Satellogic-Contract-Id", MOCK_CONTRACT_2)
        .send()
        .await
        .unwrap();
    let rec = h.mock.state.last_request().unwrap();
    assert_eq!(rec.headers["x-satellogic-contract-id"], MOCK_CONTRACT);

    let h = Harness::start_with(
        two_contracts(),
        "[contract]\ndefault = \"contract-123\"\nallow_client_override = true",
    )
    .await;
    c.get(h.url("/tasking/products/"))
        .header("X-Satellogic-Contract-Id", MOCK_CONTRACT_2)
        .send()
        .await
        .unwrap();
    let rec = h.mock.state.last_request().unwrap();
    assert_eq!(rec.headers["x-satellogic-contract-id"], MOCK_CONTRACT_2);
}

#[tokio::test]
async fn legacy_mode_sends_key_secret_and_fetches_no_token() {
    let h =
        Harness::start("[auth]\nmode = \"legacy\"\n[contract]\ndefault = \"contract-123\"").await;
    let r = client()
        .get(h.url("/tasking/products/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let rec = h.mock.state.last_request().unwrap();
    assert_eq!(
        rec.headers["authorizationtoken"],
        format!(
            "Key,Secret {},{}",
            aleph_proxy::mock::MOCK_CLIENT_ID,
            aleph_proxy::mock::MOCK_CLIENT_SECRET
        )
    );
    assert_eq!(h.token_fetches(), 0);
}

#[tokio::test]
async fn readiness_follows_the_token() {
    let h = Harness::start("").await;
    h.ready().await;
    let v: serde_json::Value = get_json(&h.admin_url("/readyz")).await;
    assert_eq!(v["ready"], true);
    assert!(v["tokens"][0]["expires_in_s"].as_f64().unwrap() > 86000.0);
    let r = client().get(h.admin_url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

/// `aleph-proxy --config FILE run` with `toml` as the file, and no client id from the
/// environment: what start-up says and how it exits.
fn run_config(toml: &str) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, toml).unwrap();
    std::process::Command::new(support::binary())
        .args(["--config", path.to_str().unwrap(), "run"])
        .env_remove("ALEPH_PROXY_AUTH__CLIENT_ID")
        .output()
        .unwrap()
}

#[test]
fn bad_config_lists_every_problem_exits_non_zero_and_hides_secrets() {
    let out = run_config(
        r#"
        listen = "not-an-address"
        upstream = "ftp://x"
        unknown_key = 1
        [auth]
        client_secret = "super-secret-value-123"
        retry_max_backoff = "soon"
        [contract]
        routes = [{ prefix = "no-slash", id = "c" }]
        [tcp]
        client_congestion_control = "re no"
        "#,
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "`listen`",
        "`upstream`",
        "unknown key `unknown_key`",
        "`auth.client_id` is required",
        "`auth.retry_max_backoff`",
        "`contract.routes[0].prefix`",
        "`tcp.client_congestion_control`",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in\n{err}");
    }
    assert!(!err.contains("super-secret-value-123"));
}

#[test]
fn a_congestion_control_the_kernel_lacks_stops_start_up_and_is_named() {
    let out = run_config(
        r#"
        listen = "127.0.0.1:0"
        [admin]
        listen = "127.0.0.1:0"
        [auth]
        client_id = "x"
        client_secret = "y"
        token_url = "http://127.0.0.1:9/oauth/token"
        [contract]
        default = "c"
        [tcp]
        client_congestion_control = "nosuchalgo"
        "#,
    );
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot use TCP congestion control \"nosuchalgo\" on 127.0.0.1:0")
            && err.contains("no such algorithm"),
        "{err}"
    );
}

#[test]
fn env_overrides_file_and_flags_override_env() {
    // `check`-free probe of precedence through the binary: a bad listen in the file, fixed by env,
    // broken again by a flag: the error names the flag's value only.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        "listen = \"file-value\"\n[auth]\nclient_id = \"x\"\nclient_secret = \"y\"\n",
    )
    .unwrap();
    let run = |env: Option<&str>, flag: Option<&str>| {
        let mut cmd = std::process::Command::new(support::binary());
        cmd.args(["--config", path.to_str().unwrap()]);
        if let Some(f) = flag {
            cmd.args(["--listen", f]);
        }
        cmd.arg("check");
        if let Some(e) = env {
            cmd.env("ALEPH_PROXY_LISTEN", e);
        }
        let out = cmd.output().unwrap();
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout)
    };
    assert!(run(None, None).contains("\"file-value\""));
    let env_only = run(Some("env-value"), None);
    assert!(env_only.contains("\"env-value\"") && !env_only.contains("file-value"));
    let flag = run(Some("env-value"), Some("flag-value"));
    assert!(flag.contains("\"flag-value\"") && !flag.contains("env-value"));
}
