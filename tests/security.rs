//! The promises of SECURITY.md, one section per point of its threat model, over real sockets.
//!
//! A second local server, the [`Canary`], stands for "another host": it records every connection
//! it accepts, and a test fails when it receives a credential (or, where nothing may reach it,
//! anything at all). Raw `TcpStream` requests send what HTTP clients refuse to: absolute-form,
//! CONNECT, conflicting framing, bad header bytes. The trace-level log scans run the real binary.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aleph_proxy::mock::{Mock, MockOptions, TokenMode, MOCK_CLIENT_ID, MOCK_CLIENT_SECRET};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use support::{client, eventually, proxy_error, Harness};

/// Harness TOML that fixes the contract, so that no discovery request reaches the mock and
/// counts of upstream requests are exact.
const FIXED: &str = "[contract]\ndefault = \"contract-123\"\n";

/// Header names that must never reach another host (lowercase, as they start a header line).
const CREDENTIAL_HEADERS: [&str; 4] = [
    "authorizationtoken:",
    "x-satellogic-contract-id:",
    "authorization:",
    "x-aleph-proxy-key:",
];

// ---------------------------------------------------------------------------------------------
// Helpers: the canary, raw HTTP/1.1 exchanges, the spawned binary.
// ---------------------------------------------------------------------------------------------

/// "Another host": accepts any TCP connection, records the request it receives (head and a
/// Content-Length body), answers with a fixed response and closes.
struct Canary {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<String>>>,
}

impl Canary {
    /// A canary that answers 200.
    async fn start() -> Canary {
        Self::start_answering(|_| {
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 6\r\nconnection: close\r\n\r\ncanary"
                .to_string()
        })
        .await
    }

    /// A canary whose answer is computed from its own address.
    async fn start_answering(answer: impl Fn(SocketAddr) -> String + Send + 'static) -> Canary {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let recorded = requests.clone();
        let answer = Arc::new(answer(addr));
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let recorded = recorded.clone();
                let answer = answer.clone();
                tokio::spawn(async move {
                    // Recorded at once: a bare connection (a CONNECT tunnel, say) counts too.
                    let idx = {
                        let mut v = recorded.lock().unwrap();
                        v.push(String::new());
                        v.len() - 1
                    };
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 8192];
                    loop {
                        let read =
                            tokio::time::timeout(Duration::from_secs(5), stream.read(&mut chunk));
                        match read.await {
                            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                            _ => break,
                        }
                        recorded.lock().unwrap()[idx] = String::from_utf8_lossy(&buf).into_owned();
                        if request_complete(&buf) {
                            break;
                        }
                    }
                    let _ = stream.write_all(answer.as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        Canary { addr, requests }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }

    /// Fails when the canary was contacted at all.
    fn assert_untouched(&self) {
        let r = self.requests();
        assert!(r.is_empty(), "another host was contacted: {r:#?}");
    }

    /// Fails when any request carried a credential header or one of `secrets`.
    fn assert_no_credentials(&self, secrets: &[String]) {
        for req in self.requests() {
            let lower = req.to_ascii_lowercase();
            for name in CREDENTIAL_HEADERS {
                assert!(
                    !lower.contains(&format!("\n{name}")),
                    "another host received {name}\n{req}"
                );
            }
            for s in secrets {
                assert!(
                    !req.contains(s.as_str()),
                    "another host received a secret\n{req}"
                );
            }
        }
    }
}

/// A request head is complete and its Content-Length body (if any) received.
fn request_complete(buf: &[u8]) -> bool {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    buf.len() >= end + 4 + length
}

/// Writes `request` and reads until the server closes the connection (at most 10 s). Write errors
/// are ignored: a server may refuse and close before the client has finished sending.
async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(request).await;
    read_to_close(&mut s).await
}

/// Reads until EOF or a reset; fails when the connection stays open for 10 s.
async fn read_to_close(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let done = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 8192];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&out).into_owned();
    assert!(
        done.is_ok(),
        "the connection stayed open; got so far:\n{text}"
    );
    text
}

/// Reads one response head (through the blank line) from a kept-alive connection; a connection
/// closed first yields what came before the close (often "").
async fn read_head(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut byte = [0u8; 1];
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while !out.ends_with(b"\r\n\r\n") {
            match s.read(&mut byte).await {
                Ok(1) => out.push(byte[0]),
                _ => break,
            }
        }
    })
    .await;
    String::from_utf8_lossy(&out).into_owned()
}

/// The status codes of every response in a raw exchange, in order.
fn statuses(raw: &str) -> Vec<u16> {
    raw.split("HTTP/1.1 ")
        .skip(1)
        .filter_map(|rest| rest.get(..3)?.parse().ok())
        .collect()
}

/// `raw` holds exactly one response, with this status.
fn assert_one_response(raw: &str, status: u16, what: &str) {
    assert_eq!(statuses(raw), vec![status], "{what}:\n{raw}");
}

/// Path and query of every request the mock API recorded, in order.
fn recorded_paths(mock: &Mock) -> Vec<String> {
    mock.state
        .recorded()
        .iter()
        .map(|r| {
            r.uri
                .path_and_query()
                .map(|p| p.as_str().to_string())
                .unwrap_or_default()
        })
        .collect()
}

/// The real binary with a config file, its stderr collected as it runs.
struct Spawned {
    child: tokio::process::Child,
    log: Arc<Mutex<Vec<u8>>>,
    reader: JoinHandle<()>,
}

impl Spawned {
    /// Starts `aleph-proxy --config <dir>/aleph-proxy.toml` with only `env` in its environment (no
    /// inherited `ALEPH_PROXY_*` or proxy variables).
    fn start(dir: &Path, toml: &str, env: &[(&str, &str)]) -> Spawned {
        let path = dir.join("aleph-proxy.toml");
        std::fs::write(&path, toml).unwrap();
        let mut cmd = tokio::process::Command::new(support::binary());
        cmd.arg("--config")
            .arg(&path)
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("the binary starts");
        let mut stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 16384];
            while let Ok(n) = stderr.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Spawned { child, log, reader }
    }

    fn log(&self) -> String {
        String::from_utf8_lossy(&self.log.lock().unwrap()).into_owned()
    }

    /// Waits until the log contains `needle` (at most 20 s); fails early, with the log, when the
    /// process exits first.
    async fn wait_for(&mut self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.log().contains(needle) {
            if let Ok(Some(status)) = self.child.try_wait() {
                let _ = (&mut self.reader).await;
                panic!(
                    "the proxy exited ({status}) before saying {needle:?}:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "log never said {needle:?}:\n{}",
                self.log()
            );
            // Polled: stderr arrives in chunks, there is nothing finer to wait on.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The `listen` address on the first log line containing `marker` (text or JSON format).
    fn addr_of(&self, marker: &str) -> SocketAddr {
        let log = self.log();
        let line = log
            .lines()
            .find(|l| l.contains(marker))
            .unwrap_or_else(|| panic!("no {marker:?} line in:\n{log}"));
        let text = if let Some(i) = line.find(" listen=") {
            line[i + 8..].split_whitespace().next().unwrap()
        } else {
            let i = line.find("\"listen\":\"").expect("a listen field") + 10;
            line[i..].split('"').next().unwrap()
        };
        text.parse().unwrap()
    }

    /// SIGTERM, wait for the exit, return everything it wrote to stderr.
    async fn stop(mut self) -> String {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status();
        }
        let exited = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await;
        if exited.is_err() {
            let _ = self.child.kill().await;
        }
        let _ = (&mut self.reader).await;
        self.log()
    }
}

fn write_file(dir: &Path, name: &str, text: &str, mode: u32) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    p
}

/// Only what a process needs to run: no inherited proxy settings or `ALEPH_PROXY_*`.
fn minimal_env(rust_log: &str) -> Vec<(&'static str, String)> {
    vec![
        ("PATH", std::env::var("PATH").unwrap_or_default()),
        ("RUST_LOG", rust_log.to_string()),
    ]
}

fn env_refs<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

// ---------------------------------------------------------------------------------------------
// 1. The upstream is fixed.
// ---------------------------------------------------------------------------------------------

/// Absolute-form and CONNECT are refused with the proxy's 400; a Host naming another port is
/// ignored and replaced; a Host naming another name meets the DNS-rebinding guard (403); paths
/// that look like authorities (`//host/x`, `/@host/x`) are plain paths on the upstream. Nothing
/// ever reaches the canary.
#[tokio::test]
async fn requests_only_ever_reach_the_configured_upstream() {
    let canary = Canary::start().await;
    let h = Harness::start(FIXED).await;
    h.ready().await;
    let p = h.proxy;
    let c = canary.addr;
    let upstream_authority = h.mock.api_url.trim_start_matches("http://").to_string();

    // Absolute-form, naming another host and naming the upstream itself: one rule, 400.
    for target in [
        format!("http://{c}/tasking/products/"),
        format!("https://{c}/tasking/products/"),
        format!("{}/tasking/products/", h.mock.api_url),
    ] {
        let r = raw_exchange(
            p,
            format!("GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await;
        assert_one_response(&r, 400, &target);
        assert!(r.contains("x-aleph-proxy-error: bad_request"), "{r}");
        assert!(r.contains("absolute-form"), "{r}");
    }

    // CONNECT to another host: 400, no tunnel.
    let r = raw_exchange(
        p,
        format!("CONNECT {c} HTTP/1.1\r\nHost: {c}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    assert_one_response(&r, 400, "CONNECT");
    assert!(r.contains("CONNECT is not supported"), "{r}");

    // The proxy used as a forward proxy (HTTPS_PROXY, curl -x): the Host names the API, not
    // the loopback, and the answer still says what is wrong rather than "DNS rebinding".
    for request in [
        "GET http://api.satellogic.com/contracts HTTP/1.1\r\nHost: api.satellogic.com\r\nConnection: close\r\n\r\n",
        "CONNECT api.satellogic.com:443 HTTP/1.1\r\nHost: api.satellogic.com:443\r\nConnection: close\r\n\r\n",
    ] {
        let r = raw_exchange(p, request.as_bytes()).await;
        assert_one_response(&r, 400, request);
        assert!(
            r.contains("absolute-form") || r.contains("CONNECT is not supported"),
            "{r}"
        );
    }

    // A Host with the canary's port passes the loopback Host guard (ports are not compared) and
    // is replaced by the upstream's authority.
    h.mock.state.clear_recorded();
    let r = raw_exchange(
        p,
        format!("GET /tasking/products/ HTTP/1.1\r\nHost: {c}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await;
    assert_one_response(&r, 200, "Host of another port");
    let rec = h.mock.state.last_request().expect("reached the upstream");
    assert_eq!(rec.headers["host"], upstream_authority.as_str());

    // Two Host headers, in either order (RFC 9112 section 3.2), or none in HTTP/1.1: 400,
    // nothing forwarded.
    h.mock.state.clear_recorded();
    for (what, hosts) in [
        (
            "two Host headers",
            format!("Host: 127.0.0.1\r\nHost: {c}\r\n"),
        ),
        (
            "two Host headers, reversed",
            format!("Host: {c}\r\nHost: 127.0.0.1\r\n"),
        ),
        ("no Host header", String::new()),
    ] {
        let r = raw_exchange(
            p,
            format!("GET /tasking/products/ HTTP/1.1\r\n{hosts}Connection: close\r\n\r\n")
                .as_bytes(),
        )
        .await;
        assert_one_response(&r, 400, what);
        assert!(r.contains("x-aleph-proxy-error: bad_request"), "{r}");
    }
    assert_eq!(recorded_paths(&h.mock), Vec::<String>::new());

    // A Host naming another name on a loopback listener is the DNS-rebinding case: 403.
    let r = raw_exchange(
        p,
        b"GET /tasking/products/ HTTP/1.1\r\nHost: other-host.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_one_response(&r, 403, "Host of another name");

    // Authority-looking paths are forwarded as plain paths, to the upstream only.
    for path in [
        format!("//{c}/x"),
        format!("/@{c}/x"),
        "//other-host.example/x".to_string(),
        "/@other-host.example/x".to_string(),
        format!("/%2F%2F{c}/x"),
    ] {
        h.mock.state.clear_recorded();
        let r = raw_exchange(
            p,
            format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await;
        // The mock knows no such path: its 404 (not a proxy error) proves where it went.
        assert_one_response(&r, 404, &path);
        assert!(!r.contains("x-aleph-proxy-error"), "{r}");
        assert_eq!(recorded_paths(&h.mock), vec![path.clone()]);
        let rec = h.mock.state.last_request().unwrap();
        assert_eq!(rec.headers["host"], upstream_authority.as_str());
    }

    // Asterisk-form names no resource of the API: 400, nothing forwarded.
    h.mock.state.clear_recorded();
    let r = raw_exchange(
        p,
        b"OPTIONS * HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_one_response(&r, 400, "OPTIONS *");
    assert!(r.contains("x-aleph-proxy-error: bad_request"), "{r}");
    assert_eq!(recorded_paths(&h.mock), Vec::<String>::new());

    // The same through an ordinary HTTP client.
    let r = client()
        .get(format!("http://{p}//{c}/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(recorded_paths(&h.mock).last().unwrap(), &format!("//{c}/x"));

    canary.assert_untouched();
}

// ---------------------------------------------------------------------------------------------
// 2. Redirects are never followed with credentials.
// ---------------------------------------------------------------------------------------------

/// The upstream answers 302 to another host: the proxy hands the 302 to the client and sends
/// nothing there; a client that follows it reaches the other host without the proxy's token, the
/// contract header or its own access key.
/// The configuration decides the contract of a path: a client cannot borrow another route's
/// contract with dot segments (an upstream resolves `/archive/../tasking/x` to `/tasking/x`) nor
/// escape a route with spellings an upstream reads as the same path (`//archive`, `/%61rchive`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_cannot_choose_its_contract_or_leave_the_base_path() {
    use aleph_proxy::mock::{MOCK_CONTRACT, MOCK_CONTRACT_2};
    let h = Harness::start_with(
        support::two_contracts(),
        &format!(
            "[contract]\ndefault = \"{MOCK_CONTRACT}\"\n[[contract.routes]]\nprefix = \"/archive\"\nid = \"{MOCK_CONTRACT_2}\"\n"
        ),
    )
    .await;
    h.ready().await;
    h.mock.state.clear_recorded();
    for path in [
        "/archive/../tasking/products/",
        "/archive/%2e%2e/tasking/products/",
        "/archive/%2E./tasking/products/",
        "/tasking/../archive/stac/",
        "/./archive/stac/",
        "/../../admin",
        "/contracts/../tasking/products/",
        "/archive/..%2Ftasking/products/",
    ] {
        let r = raw_exchange(
            h.proxy,
            format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await;
        assert_one_response(&r, 400, path);
        assert!(r.contains("x-aleph-proxy-error: bad_request"), "{r}");
        assert!(r.contains("'..' segment"), "{r}");
    }
    assert!(
        recorded_paths(&h.mock).is_empty(),
        "nothing reaches the API"
    );

    // TRACE: an upstream's echo would return the injected token to the client.
    let r = raw_exchange(
        h.proxy,
        b"TRACE /tasking/products/ HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_one_response(&r, 400, "TRACE");
    assert!(r.contains("TRACE is not forwarded"), "{r}");
    assert!(recorded_paths(&h.mock).is_empty(), "TRACE reaches nothing");

    // Spellings of /archive an upstream normalises get the /archive route's contract.
    for path in ["//archive/stac/", "/%61rchive/stac/", "/archive//stac/"] {
        h.mock.state.clear_recorded();
        let r = raw_exchange(
            h.proxy,
            format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await;
        assert!(statuses(&r).len() == 1, "{path}: {r}");
        let rec = h.mock.state.last_request().expect("forwarded");
        assert_eq!(rec.uri.path(), path, "sent as the client wrote it");
        assert_eq!(
            rec.headers["x-satellogic-contract-id"], MOCK_CONTRACT_2,
            "{path}"
        );
    }
}

#[tokio::test]
async fn upstream_redirects_reach_the_client_and_the_other_host_gets_no_credential() {
    let canary = Canary::start().await;
    let h = Harness::start("").await;
    h.ready().await;
    // The mock redirects to its object store; make the canary that store.
    *h.mock.state.object_store_url.lock().unwrap() = canary.url();

    for path in ["/redirect-elsewhere", "/assets/l1d/item-1/redirect"] {
        let r = client().get(h.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 302, "{path}");
        let loc = r.headers()["location"].to_str().unwrap();
        assert!(loc.starts_with(&canary.url()), "{path}: {loc}");
        assert!(r.headers().get("x-aleph-proxy-error").is_none());
    }
    canary.assert_untouched();

    // A client that follows redirects (reqwest's default policy) reaches the other host itself.
    let follower = reqwest::Client::builder().no_proxy().build().unwrap();
    let r = follower
        .get(h.url("/redirect-elsewhere"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "canary");
    let reqs = canary.requests();
    assert_eq!(reqs.len(), 1, "{reqs:#?}");
    assert!(reqs[0].starts_with("GET /bucket/file.tif?X-Amz-Signature=abc "));
    let mut secrets = h.mock.state.issued_tokens();
    secrets.push(MOCK_CLIENT_SECRET.to_string());
    canary.assert_no_credentials(&secrets);
}

/// The token request carries the client secret in its body: a 307 from the token endpoint (which
/// would resend that body) is not followed.
#[tokio::test]
async fn token_endpoint_redirects_are_not_followed() {
    let canary = Canary::start().await;
    let target = format!("{}/oauth/token", canary.url());
    let redirector = Canary::start_answering(move |_| {
        format!(
            "HTTP/1.1 307 Temporary Redirect\r\nlocation: {target}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        )
    })
    .await;
    let h = Harness::start(&format!(
        "{FIXED}[auth]\ntoken_url = \"{}/oauth/token\"\n",
        redirector.url()
    ))
    .await;
    let tokens = h.tokens[0].clone();
    eventually(Duration::from_secs(10), || {
        let failed = tokens.last_error().is_some();
        async move { failed }
    })
    .await;
    assert!(!redirector.requests().is_empty());
    assert!(redirector.requests()[0].contains(MOCK_CLIENT_SECRET));
    canary.assert_untouched();
    let r = client()
        .get(h.url("/tasking/products/"))
        .send()
        .await
        .unwrap();
    assert_eq!(proxy_error(r).await, (503, "no_token".to_string()));
    canary.assert_untouched();
}

// ---------------------------------------------------------------------------------------------
// 3. No secret in any log, error or response, at trace level.
// ---------------------------------------------------------------------------------------------

/// Credentials a client sends; none may show up in the proxy's logs.
const CLIENT_TOKEN: &str = "client-sent-token-7c1d9e";
const CLIENT_BASIC: &str = "Y2xpZW50LXVzZXI6Y2xpZW50LXBhc3N3b3JkLTQ0"; // client-user:client-password-44
const CLIENT_COOKIE: &str = "client-cookie-3e9f01";
const CLIENT_QUERY_SIG: &str = "client-query-sig-88aa2b";
const WRONG_KEY: &str = "wrong-key-from-client-0042";
const ACCESS_KEY: &str = "access-key-5b7e2c9d41f0";

/// Sends one request carrying every kind of client credential; records status, headers and body.
async fn request_with_client_credentials(
    c: &reqwest::Client,
    base: &str,
    path: &str,
    key: &str,
    seen: &mut String,
) -> u16 {
    let sep = if path.contains('?') { '&' } else { '?' };
    let r = c
        .get(format!(
            "{base}{path}{sep}X-Amz-Signature={CLIENT_QUERY_SIG}"
        ))
        .header("x-aleph-proxy-key", key)
        .header("authorizationToken", format!("Bearer {CLIENT_TOKEN}"))
        .header("Authorization", format!("Basic {CLIENT_BASIC}"))
        .header("Cookie", format!("session={CLIENT_COOKIE}"))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    seen.push_str(&format!("{:?}\n", r.headers()));
    seen.push_str(&r.text().await.unwrap_or_default());
    status
}

/// Fails naming the first secret found in `text`.
fn assert_free_of(text: &str, secrets: &[String], what: &str) {
    for s in secrets {
        if let Some(i) = text.find(s.as_str()) {
            let from = text[..i].rfind('\n').map_or(0, |n| n + 1);
            let to = text[i..].find('\n').map_or(text.len(), |n| i + n);
            panic!("{what} contains the secret {s:?} in:\n{}", &text[from..to]);
        }
    }
}

/// OAuth mode at `RUST_LOG=trace`: token fetches and proactive refreshes, a forced refresh after
/// a 401, retries after 503, a 502 passed through, an upstream timeout, a token endpoint that
/// rejects the credentials, and every request carrying client credentials. The binary's stderr,
/// every response and the admin endpoints are then searched for the client secret, every token
/// the mock issued, the access key and the client-sent credentials.
#[tokio::test]
async fn trace_logs_and_responses_hold_no_secret_oauth() {
    let mock = Mock::start(MockOptions {
        token_lifetime: Duration::from_secs(2),
        ..MockOptions::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let secret_file = write_file(
        dir.path(),
        "client_secret",
        &format!("{MOCK_CLIENT_SECRET}\n"),
        0o600,
    );
    let key_file = write_file(dir.path(), "key", &format!("{ACCESS_KEY}\n"), 0o600);
    let toml = format!(
        r#"
listen = "127.0.0.1:0"
upstream = "{api}"
[admin]
listen = "127.0.0.1:0"
[auth]
token_url = "{token}"
client_id = "{id}"
client_secret_file = "{secret}"
token_cache = "{cache}"
wait_timeout = "2s"
retry_initial_backoff = "50ms"
retry_max_backoff = "200ms"
[access]
key_file = "{key}"
[timeouts]
response_headers = "1s"
"#,
        api = mock.api_url,
        token = mock.token_url,
        id = MOCK_CLIENT_ID,
        secret = secret_file.display(),
        key = key_file.display(),
        cache = dir.path().join("token-cache.json").display(),
    );
    let env = minimal_env("trace");
    let mut proxy = Spawned::start(dir.path(), &toml, &env_refs(&env));
    proxy.wait_for("proxy listening").await;
    proxy.wait_for("admin listening").await;
    let base = format!("http://{}", proxy.addr_of("proxy listening"));
    let admin = format!("http://{}", proxy.addr_of("admin listening"));
    let c = client();
    let mut seen = String::new();
    let mut tokens: Vec<String> = Vec::new();

    // Proactive refreshes: traffic across at least three issued tokens.
    let deadline = Instant::now() + Duration::from_secs(30);
    while mock.state.token_successes.load(Ordering::SeqCst) < 3 {
        assert!(Instant::now() < deadline, "no refreshes");
        let s =
            request_with_client_credentials(&c, &base, "/tasking/products/", ACCESS_KEY, &mut seen)
                .await;
        assert_eq!(s, 200);
        tokens.extend(mock.state.issued_tokens());
        // Pace the traffic on the mock's events (a token fetch, say), at most 100 ms apart,
        // so the trace log stays small.
        let _ =
            tokio::time::timeout(Duration::from_millis(100), mock.state.changed.notified()).await;
    }

    // A wrong key from the client: 403, and the wrong key is not logged either.
    let s = request_with_client_credentials(&c, &base, "/tasking/products/", WRONG_KEY, &mut seen)
        .await;
    assert_eq!(s, 403);

    // From now on tokens live a day, so that no proactive refresh races the revocation below
    // (two revoked tokens in a row would rightly end in a 401). Wait until the proxy holds one.
    mock.state.opts.lock().unwrap().token_lifetime = Duration::from_secs(86400);
    let readyz = format!("{admin}/readyz");
    eventually(Duration::from_secs(20), || {
        let r = c.get(&readyz).send();
        async move {
            let Ok(r) = r.await else { return false };
            let v: serde_json::Value = r.json().await.unwrap_or_default();
            v["tokens"][0]["expires_in_s"]
                .as_f64()
                .is_some_and(|s| s > 3600.0)
        }
    })
    .await;

    // A 401 from the upstream: invalidate, fetch a new token, replay.
    tokens.extend(mock.state.issued_tokens());
    let before = mock.state.token_successes.load(Ordering::SeqCst);
    mock.state.revoke_all_tokens();
    let s = request_with_client_credentials(&c, &base, "/tasking/products/", ACCESS_KEY, &mut seen)
        .await;
    assert_eq!(s, 200);
    assert!(mock.state.token_successes.load(Ordering::SeqCst) > before);
    tokens.extend(mock.state.issued_tokens());

    // 503 then success (retried); 502 until the retries run out (passed through).
    *mock.state.api_fail_next.lock().unwrap() = Some((503, 1));
    let s = request_with_client_credentials(&c, &base, "/tasking/products/", ACCESS_KEY, &mut seen)
        .await;
    assert_eq!(s, 200);
    *mock.state.api_fail_next.lock().unwrap() = Some((502, 10));
    let s = request_with_client_credentials(&c, &base, "/tasking/products/", ACCESS_KEY, &mut seen)
        .await;
    assert_eq!(s, 502);
    *mock.state.api_fail_next.lock().unwrap() = None;

    // An upstream that does not answer in time: the proxy's 504.
    *mock.state.api_delay.lock().unwrap() = Duration::from_millis(1500);
    let s = request_with_client_credentials(&c, &base, "/tasking/products/", ACCESS_KEY, &mut seen)
        .await;
    assert_eq!(s, 504);
    *mock.state.api_delay.lock().unwrap() = Duration::ZERO;

    // The token endpoint rejects the credentials while the token is revoked: no new token to send
    // the request with, so the upstream's 401 comes back.
    tokens.extend(mock.state.issued_tokens());
    mock.state.set_token_mode(TokenMode::Reject);
    mock.state.revoke_all_tokens();
    let s = request_with_client_credentials(&c, &base, "/tasking/products/", ACCESS_KEY, &mut seen)
        .await;
    assert_eq!(s, 401);
    // A malformed token answer, then recovery.
    mock.state.set_token_mode(TokenMode::Malformed);
    let fetches = mock.state.token_fetches.load(Ordering::SeqCst);
    eventually(Duration::from_secs(10), || {
        let more = mock.state.token_fetches.load(Ordering::SeqCst) > fetches + 1;
        async move { more }
    })
    .await;
    mock.state.set_token_mode(TokenMode::Ok);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s =
            request_with_client_credentials(&c, &base, "/tasking/products/", ACCESS_KEY, &mut seen)
                .await;
        if s == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "no recovery: {s}");
    }
    // `/contracts` (sent without a contract header) and the admin endpoints.
    let s = request_with_client_credentials(&c, &base, "/contracts", ACCESS_KEY, &mut seen).await;
    assert_eq!(s, 200);
    for path in ["/healthz", "/readyz", "/metrics"] {
        let r = c.get(format!("{admin}{path}")).send().await.unwrap();
        seen.push_str(&format!("{:?}\n", r.headers()));
        seen.push_str(&r.text().await.unwrap());
    }
    tokens.extend(mock.state.issued_tokens());

    let log = proxy.stop().await;
    assert!(
        log.contains(" TRACE "),
        "RUST_LOG=trace had no effect:\n{log}"
    );
    assert!(tokens.len() >= 4, "{tokens:?}");
    let mut secrets: Vec<String> = vec![
        MOCK_CLIENT_SECRET.into(),
        ACCESS_KEY.into(),
        WRONG_KEY.into(),
        CLIENT_TOKEN.into(),
        CLIENT_BASIC.into(),
        CLIENT_COOKIE.into(),
        CLIENT_QUERY_SIG.into(),
        // Catches a token issued between two snapshots.
        "mock-token-".into(),
    ];
    secrets.extend(tokens);
    assert_free_of(&log, &secrets, "the trace-level log");
    // The client sees its own request echoed nowhere, and never the proxy's credentials.
    assert_free_of(&seen, &secrets, "a response");
}

/// A config for the binary in legacy mode in front of `mock`, both listeners on ephemeral
/// ports, the default contract `contract-123`, then `extra`.
fn legacy_config(mock: &Mock, extra: &str) -> String {
    format!(
        r#"
listen = "127.0.0.1:0"
upstream = "{api}"
[admin]
listen = "127.0.0.1:0"
[auth]
mode = "legacy"
client_id = "{id}"
client_secret = "{secret}"
[contract]
default = "contract-123"
{extra}"#,
        api = mock.api_url,
        id = MOCK_CLIENT_ID,
        secret = MOCK_CLIENT_SECRET,
    )
}

/// Legacy mode (`authorizationToken: Key,Secret <id>,<secret>`) with JSON logs at trace level:
/// the secret and the `Key,Secret` value appear nowhere.
#[tokio::test]
async fn trace_logs_and_responses_hold_no_secret_legacy() {
    let mock = Mock::start(MockOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let toml = legacy_config(
        &mock,
        r#"
[[contract.routes]]
prefix = "/wrong-contract"
id = "no-such-contract"
[timeouts]
response_headers = "1s"
[log]
format = "json"
"#,
    );
    let env = minimal_env("trace");
    let mut proxy = Spawned::start(dir.path(), &toml, &env_refs(&env));
    proxy.wait_for("proxy listening").await;
    proxy.wait_for("admin listening").await;
    let base = format!("http://{}", proxy.addr_of("proxy listening"));
    let admin = format!("http://{}", proxy.addr_of("admin listening"));
    let c = client();
    let mut seen = String::new();

    for _ in 0..3 {
        let s =
            request_with_client_credentials(&c, &base, "/tasking/products/", "", &mut seen).await;
        assert_eq!(s, 200);
    }
    let rec = mock.state.last_request().unwrap();
    assert_eq!(
        rec.headers["authorizationtoken"],
        format!("Key,Secret {MOCK_CLIENT_ID},{MOCK_CLIENT_SECRET}").as_str()
    );
    // The upstream's 401 about the contract, passed through.
    let s = request_with_client_credentials(&c, &base, "/wrong-contract/x", "", &mut seen).await;
    assert_eq!(s, 401);
    // Retry after 503, a 502 passed through, a timeout.
    *mock.state.api_fail_next.lock().unwrap() = Some((503, 1));
    let s = request_with_client_credentials(&c, &base, "/tasking/products/", "", &mut seen).await;
    assert_eq!(s, 200);
    *mock.state.api_fail_next.lock().unwrap() = Some((502, 10));
    let s = request_with_client_credentials(&c, &base, "/tasking/products/", "", &mut seen).await;
    assert_eq!(s, 502);
    *mock.state.api_fail_next.lock().unwrap() = None;
    *mock.state.api_delay.lock().unwrap() = Duration::from_millis(1500);
    let s = request_with_client_credentials(&c, &base, "/tasking/products/", "", &mut seen).await;
    assert_eq!(s, 504);
    *mock.state.api_delay.lock().unwrap() = Duration::ZERO;
    for path in ["/healthz", "/readyz", "/metrics"] {
        let r = c.get(format!("{admin}{path}")).send().await.unwrap();
        seen.push_str(&format!("{:?}\n", r.headers()));
        seen.push_str(&r.text().await.unwrap());
    }

    let log = proxy.stop().await;
    assert!(
        log.contains("\"level\":\"TRACE\""),
        "RUST_LOG=trace had no effect:\n{log}"
    );
    assert_eq!(mock.state.token_fetches.load(Ordering::SeqCst), 0);
    let secrets: Vec<String> = vec![
        MOCK_CLIENT_SECRET.into(),
        format!("{MOCK_CLIENT_ID},{MOCK_CLIENT_SECRET}"),
        CLIENT_TOKEN.into(),
        CLIENT_BASIC.into(),
        CLIENT_COOKIE.into(),
        CLIENT_QUERY_SIG.into(),
    ];
    assert_free_of(&log, &secrets, "the trace-level log");
    assert_free_of(&seen, &secrets, "a response");
}

// ---------------------------------------------------------------------------------------------
// 4. Exposure: loopback by default; key, CIDRs and Host allowlist when exposed.
// ---------------------------------------------------------------------------------------------

/// The base config of a non-loopback listener (all interfaces), reached through 127.0.0.1.
const EXPOSED: &str = "listen = \"0.0.0.0:0\"\n";

/// Sends GET /tasking/products/ to the exposed listener with a Host and headers.
async fn get_exposed(h: &Harness, host: &str, headers: &[(&str, &str)]) -> reqwest::Response {
    let url = format!("http://127.0.0.1:{}/tasking/products/", h.proxy.port());
    let mut req = client().get(url).header("host", host);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}

#[tokio::test]
async fn listeners_default_to_loopback() {
    let mock = Mock::start(MockOptions::default()).await.unwrap();
    let fig = figment::Figment::from(figment::providers::Serialized::defaults(
        serde_json::json!({"auth": {"client_id": "id", "client_secret": "secret"}}),
    ));
    let c = aleph_proxy::config::from_figment(&fig).unwrap();
    assert!(c.listeners[0].listen.ip().is_loopback());
    assert!(c.admin_listen.ip().is_loopback());
    assert!(c.access.key.is_none());
    // The harness binds what the config says; on loopback the Host guard is on by default.
    let h = Harness::start_proxy(mock, "").await;
    assert!(h.proxy.ip().is_loopback());
    let r = client()
        .get(h.url("/tasking/products/"))
        .header("host", "rebound.attacker.example")
        .send()
        .await
        .unwrap();
    assert_eq!(proxy_error(r).await, (403, "forbidden".to_string()));
}

/// A non-loopback listener with a shared key (from a file) and a Host allowlist: both must pass;
/// the key is compared exactly and is not forwarded.
#[tokio::test]
async fn exposed_listener_requires_key_and_allowed_host() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = write_file(dir.path(), "key", &format!("  {ACCESS_KEY}\n"), 0o600);
    let h = Harness::start(&format!(
        "{EXPOSED}{FIXED}[access]\nkey_file = \"{}\"\nallowed_hosts = [\"proxy.internal\", \".svc.cluster.local\"]\n",
        key_file.display()
    ))
    .await;
    assert!(h.proxy.ip().is_unspecified());
    h.ready().await;

    let ok_host = format!("proxy.internal:{}", h.proxy.port());
    let r = get_exposed(&h, &ok_host, &[]).await;
    assert_eq!(proxy_error(r).await, (403, "forbidden".to_string()));
    let r = get_exposed(&h, &ok_host, &[("x-aleph-proxy-key", WRONG_KEY)]).await;
    let (status, _) = proxy_error(r).await;
    assert_eq!(status, 403);
    // A prefix of the key, and the key with something appended, are wrong keys.
    let r = get_exposed(&h, &ok_host, &[("x-aleph-proxy-key", &ACCESS_KEY[..10])]).await;
    assert_eq!(r.status(), 403);
    let longer = format!("{ACCESS_KEY}x");
    let r = get_exposed(&h, &ok_host, &[("x-aleph-proxy-key", &longer)]).await;
    assert_eq!(r.status(), 403);

    h.mock.state.clear_recorded();
    let r = get_exposed(&h, &ok_host, &[("x-aleph-proxy-key", ACCESS_KEY)]).await;
    assert_eq!(r.status(), 200);
    let rec = h.mock.state.last_request().unwrap();
    assert!(rec.headers.get("x-aleph-proxy-key").is_none());
    let r = get_exposed(
        &h,
        "api.ns.svc.cluster.local",
        &[("x-aleph-proxy-key", ACCESS_KEY)],
    )
    .await;
    assert_eq!(r.status(), 200);

    // Right key, wrong Host (DNS rebinding: a page's own name pointed at this address).
    for host in [
        "evil.example",
        "127.0.0.1",
        "svc.cluster.local.evil.example",
    ] {
        let r = get_exposed(&h, host, &[("x-aleph-proxy-key", ACCESS_KEY)]).await;
        let status = r.status();
        let body = r.text().await.unwrap();
        assert_eq!(status, 403, "{host}");
        assert!(!body.contains(ACCESS_KEY));
        assert!(body.contains("allowed_hosts"), "{body}");
    }
    assert_eq!(h.mock.state.recorded().len(), 2);
}

/// `access.allowed_cidrs` refuses clients outside the networks (here: every loopback client).
#[tokio::test]
async fn exposed_listener_checks_client_networks() {
    let outside = Harness::start(&format!(
        "{EXPOSED}{FIXED}[access]\nallowed_cidrs = [\"10.0.0.0/8\", \"192.0.2.1\"]\n"
    ))
    .await;
    let r = get_exposed(&outside, "127.0.0.1", &[]).await;
    let status = r.status();
    let body = r.text().await.unwrap();
    assert_eq!(status, 403);
    assert!(body.contains("allowed_cidrs"), "{body}");
    assert_eq!(outside.mock.state.api_requests.load(Ordering::SeqCst), 0);

    let inside = Harness::start(&format!(
        "{EXPOSED}{FIXED}[access]\nallowed_cidrs = [\"127.0.0.0/8\", \"::1/128\"]\n"
    ))
    .await;
    inside.ready().await;
    let r = get_exposed(&inside, "anything.example", &[]).await;
    assert_eq!(r.status(), 200);
}

/// A web page on another site can make a browser send requests to http://127.0.0.1:8080 (it
/// cannot read the answers, but a POST acts). Browsers send `Origin` on those: anything not in
/// `cors.allowed_origins` is refused before the upstream; clients without Origin are unaffected.
#[tokio::test]
async fn cross_site_requests_from_web_pages_are_refused() {
    let h = Harness::start(&format!(
        "{FIXED}[cors]\nallowed_origins = [\"https://maps.example\"]\n"
    ))
    .await;
    h.ready().await;
    let post = |origin: Option<&'static str>| {
        let mut r = client()
            .post(h.url("/tasking/tasks/"))
            .header("content-type", "text/plain")
            .body("{\"task_name\": \"csrf\"}");
        if let Some(o) = origin {
            r = r.header("origin", o);
        }
        r.send()
    };
    for origin in ["https://evil.example", "null", "http://127.0.0.1:8888"] {
        let r = post(Some(origin)).await.unwrap();
        assert_eq!(
            proxy_error(r).await,
            (403, "forbidden".to_string()),
            "{origin}"
        );
    }
    assert_eq!(h.mock.state.api_requests.load(Ordering::SeqCst), 0);
    assert_eq!(
        post(Some("https://maps.example")).await.unwrap().status(),
        201
    );
    assert_eq!(post(None).await.unwrap().status(), 201);
    assert_eq!(h.mock.state.api_requests.load(Ordering::SeqCst), 2);
}

/// Start-up says EXPOSED, loudly, when a listener is off loopback with no guard at all, and does
/// not when a guard is set (a key from a file or from the environment, or client networks).
#[tokio::test]
async fn exposed_listener_without_guard_warns_at_startup() {
    let mock = Mock::start(MockOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key_file = write_file(dir.path(), "key", ACCESS_KEY, 0o600);
    let env = minimal_env("info");
    let mut env_with_key = env.clone();
    env_with_key.push(("ALEPH_PROXY_ACCESS__KEY", ACCESS_KEY.to_string()));
    for (guard, env, expect_warning) in [
        (String::new(), &env, true),
        (
            format!("[access]\nkey_file = \"{}\"\n", key_file.display()),
            &env,
            false,
        ),
        (String::new(), &env_with_key, false),
        (
            "[access]\nallowed_cidrs = [\"10.0.0.0/8\"]\n".to_string(),
            &env,
            false,
        ),
    ] {
        let toml = format!(
            "{EXPOSED}upstream = \"{}\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[auth]\ntoken_url = \"{}\"\nclient_id = \"{MOCK_CLIENT_ID}\"\nclient_secret = \"{MOCK_CLIENT_SECRET}\"\n{guard}",
            mock.api_url, mock.token_url
        );
        let mut proxy = Spawned::start(dir.path(), &toml, &env_refs(env));
        proxy.wait_for("proxy listening").await;
        let log = proxy.stop().await;
        assert_eq!(
            log.contains("EXPOSED"),
            expect_warning,
            "guard {guard:?}:\n{log}"
        );
        if expect_warning {
            let line = log.lines().find(|l| l.contains("EXPOSED")).unwrap();
            assert!(line.contains("WARN"), "{line}");
            assert!(line.contains("0.0.0.0"), "{line}");
        }
        assert!(!log.contains(MOCK_CLIENT_SECRET));
        assert!(!log.contains(ACCESS_KEY));
    }
}

// ---------------------------------------------------------------------------------------------
// 5. Limits and malformed requests.
// ---------------------------------------------------------------------------------------------

/// Classic smuggling shapes (CL.TE, TE.CL, duplicate or conflicting Content-Length, obfuscated
/// Transfer-Encoding, bad chunk sizes). The proxy refuses most with a 400; for Content-Length beside
/// `Transfer-Encoding: chunked` it follows RFC 9112 6.3 (chunked wins, the length is dropped) and
/// closes the connection after the response. Either way: at most one response per connection,
/// the connection closed, and the smuggled request never reaches the upstream.
#[tokio::test]
async fn smuggling_attempts_never_reach_the_upstream() {
    let canary = Canary::start().await;
    let h = Harness::start(FIXED).await;
    h.ready().await;
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
    let post = "POST /echo/x HTTP/1.1\r\nHost: 127.0.0.1\r\n";
    let cases: Vec<(&str, String)> = vec![
        (
            "CL.TE",
            format!("{post}Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"),
        ),
        (
            "TE.CL",
            format!(
                "{post}Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n{:x}\r\n{smuggled}\r\n0\r\n\r\n",
                smuggled.len()
            ),
        ),
        // Both lengths agree, so every parser reads the same request: forwarded with one length.
        (
            "duplicate Content-Length, same value",
            format!("{post}Content-Length: 5\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"),
        ),
        (
            "conflicting Content-Length",
            format!("{post}Content-Length: 5\r\nContent-Length: 50\r\n\r\nhello{smuggled}"),
        ),
        (
            "Content-Length list",
            format!("{post}Content-Length: 5, 50\r\n\r\nhello{smuggled}"),
        ),
        (
            "Transfer-Encoding not ending in chunked",
            format!("{post}Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n{smuggled}"),
        ),
        (
            "obfuscated Transfer-Encoding",
            format!("{post}Transfer-Encoding: xchunked\r\nContent-Length: 5\r\n\r\nhello{smuggled}"),
        ),
        (
            "space before the colon",
            format!("{post}Transfer-Encoding : chunked\r\nContent-Length: 5\r\n\r\nhello{smuggled}"),
        ),
        (
            "Transfer-Encoding in HTTP/1.0",
            format!(
                "POST /echo/x HTTP/1.0\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"
            ),
        ),
        (
            "bad chunk size",
            format!("{post}Transfer-Encoding: chunked\r\n\r\nfffffffffffffffffffff\r\nx\r\n0\r\n\r\n{smuggled}"),
        ),
    ];
    for (what, request) in &cases {
        let before = h.mock.state.recorded().len();
        let r = raw_exchange(h.proxy, request.as_bytes()).await;
        let s = statuses(&r);
        let forwarded = h.mock.state.recorded()[before..].to_vec();
        match s.as_slice() {
            [c] if (400..500).contains(c) => {
                assert!(forwarded.is_empty(), "{what}: refused yet forwarded")
            }
            // Forwarded as the proxy framed it: one request, the body per Transfer-Encoding.
            [200] => {
                assert_eq!(forwarded.len(), 1, "{what}");
                assert_eq!(forwarded[0].uri.path(), "/echo/x", "{what}");
                assert!(
                    forwarded[0]
                        .headers
                        .get_all("content-length")
                        .iter()
                        .count()
                        <= 1
                );
                assert!(
                    forwarded[0].headers.get("transfer-encoding").is_none()
                        || forwarded[0].headers.get("content-length").is_none()
                );
                if let Some(v) = forwarded[0].headers.get("content-length") {
                    assert_eq!(v.to_str().unwrap(), forwarded[0].body.len().to_string());
                }
            }
            [] => assert!(forwarded.is_empty(), "{what}: closed yet forwarded"),
            _ => panic!("{what}: expected one 4xx, one 200 or a close, got:\n{r}"),
        }
    }
    let paths = recorded_paths(&h.mock);
    assert!(
        paths.iter().all(|p| p == "/echo/x"),
        "a smuggled request reached the upstream: {paths:?}"
    );
    canary.assert_untouched();

    // The proxy still serves well-formed requests, chunked ones included.
    let r = raw_exchange(
        h.proxy,
        format!(
            "{post}Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert_one_response(&r, 200, "chunked POST");
    let rec = h.mock.state.last_request().unwrap();
    assert_eq!(rec.body.as_ref(), b"hello");
}

/// Chunked request bodies that break RFC 9112 section 7.1, the ways parsers have been made to
/// disagree on where a body ends ("funky chunks"): a size line without digits, a bare LF or
/// control bytes in a chunk extension, whitespace after the size, a bare LF before or in the
/// trailers, trailer lines that are not fields. Each gets the proxy's 400 and a closed
/// connection; neither the request nor what follows it reaches the upstream.
#[tokio::test]
async fn malformed_chunked_bodies_get_400_and_reach_no_upstream() {
    let h = Harness::start(FIXED).await;
    h.ready().await;
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
    let post = "POST /echo/x HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n";
    for (what, body) in [
        ("a size line without digits", format!("\r\n\r\n{smuggled}")),
        (
            "a bare LF in an extension",
            "3;x\nabc\r\nxyz\r\n0\r\n\r\n".to_string(),
        ),
        (
            "control bytes in an extension",
            "3;\x00\x01\x7f\r\nabc\r\n0\r\n\r\n".to_string(),
        ),
        (
            "whitespace after the size",
            "3 \t \r\nabc\r\n0\r\n\r\n".to_string(),
        ),
        (
            "a bare LF ending the size line",
            "3\nabc\r\n0\r\n\r\n".to_string(),
        ),
        (
            "a bare LF ending the trailers",
            format!("3\r\nabc\r\n0\r\n\n{smuggled}"),
        ),
        (
            "a trailer line that is no field",
            "3\r\nabc\r\n0\r\nthis is not a field\r\n\r\n".to_string(),
        ),
        (
            "a folded trailer line",
            "3\r\nabc\r\n0\r\nx-a: 1\r\n b\r\n\r\n".to_string(),
        ),
    ] {
        let r = raw_exchange(h.proxy, format!("{post}{body}").as_bytes()).await;
        assert_one_response(&r, 400, what);
        assert!(
            r.contains("x-aleph-proxy-error: bad_request"),
            "{what}:\n{r}"
        );
    }
    assert_eq!(h.mock.state.api_requests.load(Ordering::SeqCst), 0);
    // Extensions and trailers that follow the grammar pass.
    let r = raw_exchange(
        h.proxy,
        format!("{post}3 ; a=b;c=\"d e\"\r\nabc\r\n0\r\nx-a: 1\r\n\r\n")
            .replace("HTTP/1.1\r\nHost", "HTTP/1.1\r\nConnection: close\r\nHost")
            .as_bytes(),
    )
    .await;
    assert_one_response(&r, 200, "a well-formed chunked body");
    assert_eq!(h.mock.state.last_request().unwrap().body.as_ref(), b"abc");
}

/// Bytes no HTTP/1.1 parser should accept in a request head: 400 (or a close), never a crash, and
/// nothing reaches the upstream.
#[tokio::test]
async fn bad_header_bytes_get_400_and_reach_no_upstream() {
    let h = Harness::start(FIXED).await;
    h.ready().await;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "NUL in a value",
            b"GET /tasking/products/ HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: a\0b\r\n\r\n".to_vec(),
        ),
        (
            "CR in a value",
            b"GET /tasking/products/ HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: a\rb\r\n\r\n".to_vec(),
        ),
        (
            "space in a name",
            b"GET /tasking/products/ HTTP/1.1\r\nHost: 127.0.0.1\r\nX A: b\r\n\r\n".to_vec(),
        ),
        (
            "non-ASCII name",
            "GET /tasking/products/ HTTP/1.1\r\nHost: 127.0.0.1\r\nX-\u{e9}: b\r\n\r\n"
                .as_bytes()
                .to_vec(),
        ),
        (
            "obs-fold",
            b"GET /tasking/products/ HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: a\r\n b\r\n\r\n".to_vec(),
        ),
        (
            "empty name",
            b"GET /tasking/products/ HTTP/1.1\r\nHost: 127.0.0.1\r\n: b\r\n\r\n".to_vec(),
        ),
        (
            "space in the target",
            b"GET /tasking/ products/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".to_vec(),
        ),
        (
            "control byte in the target",
            b"GET /tasking/\x01products/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".to_vec(),
        ),
        (
            "bad version",
            b"GET /tasking/products/ HTTP/9.9\r\nHost: 127.0.0.1\r\n\r\n".to_vec(),
        ),
        (
            "HTTP/2 preface",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
        ),
        (
            "binary garbage",
            vec![
                0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03, b'\r', b'\n',
                b'\r', b'\n',
            ],
        ),
    ];
    for (what, request) in &cases {
        let r = raw_exchange(h.proxy, request).await;
        // The proxy answers 400 to what it cannot parse; to an HTTP/2 preface it just closes.
        let expected = if what.starts_with("HTTP/2") {
            vec![]
        } else {
            vec![400]
        };
        assert_eq!(statuses(&r), expected, "{what}:\n{r}");
    }
    assert_eq!(h.mock.state.api_requests.load(Ordering::SeqCst), 0);
    // Still alive.
    let r = client()
        .get(h.url("/tasking/products/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// A client cannot drive the terminal of whoever reads the log: ASCII control bytes in the
/// request target get a 400, and the C1 controls a UTF-8 path may carry (forwarded as they came)
/// appear escaped in the access line, in text and in JSON.
#[tokio::test]
async fn request_paths_reach_the_log_without_terminal_controls() {
    let mock = Mock::start(MockOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = "/tasking/\u{9b}2J\u{85}x";
    for (format, logged) in [
        ("text", "path=/tasking/\\u{9b}2J\\u{85}x "),
        ("json", "\"path\":\"/tasking/\\u009b2J\\u0085x\""),
    ] {
        let toml = legacy_config(&mock, &format!("[log]\nformat = \"{format}\"\n"));
        let env = minimal_env("info");
        let mut proxy = Spawned::start(dir.path(), &toml, &env_refs(&env));
        proxy.wait_for("proxy listening").await;
        let addr = proxy.addr_of("proxy listening");
        for target in ["/tasking/\x1b[2J", "/tasking/\x07", "/tasking/\x7f"] {
            let r = raw_exchange(
                addr,
                format!("GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await;
            assert_one_response(&r, 400, &format!("{format}: {target:?}"));
        }
        let r = raw_exchange(
            addr,
            format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await;
        assert_eq!(statuses(&r).len(), 1, "{format}: {r}");
        assert_eq!(
            recorded_paths(&mock).last().map(String::as_str),
            Some(path),
            "{format}: forwarded as it came"
        );
        proxy.wait_for(logged).await;
        let log = proxy.stop().await;
        assert!(
            !log.contains(['\x1b', '\x07', '\x7f', '\u{9b}', '\u{85}']),
            "{format}: a raw control character in the log:\n{log}"
        );
    }
    assert_eq!(mock.state.api_requests.load(Ordering::SeqCst), 2);
}

/// The proxy's warnings about a request carry the request's id, also under `RUST_LOG=warn`,
/// where no access line is written (an upstream that refuses connections: retries, then 502).
#[tokio::test]
async fn warnings_of_a_request_carry_its_id_at_warn_level() {
    let mock = Mock::start(MockOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let refused = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let toml = legacy_config(&mock, "[log]\nformat = \"json\"\n").replace(
        &format!("upstream = \"{}\"", mock.api_url),
        &format!("upstream = \"{refused}\""),
    );
    assert!(toml.contains(&refused), "{toml}");
    // WARN for the request path (no access line, as under RUST_LOG=warn), INFO for the start-up
    // line that names the port.
    let env = minimal_env("warn,aleph_proxy=info,aleph_proxy::proxy=warn");
    let mut proxy = Spawned::start(dir.path(), &toml, &env_refs(&env));
    proxy.wait_for("proxy listening").await;
    let addr = proxy.addr_of("proxy listening");
    let r = raw_exchange(
        addr,
        b"GET /tasking/products/ HTTP/1.1\r\nHost: 127.0.0.1\r\nx-request-id: warn-rid-1\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_one_response(&r, 502, "refused upstream");
    proxy.wait_for("upstream request failed").await;
    let log = proxy.stop().await;
    let warnings: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("upstream"))
        })
        .collect();
    assert!(warnings.len() >= 2, "retries and the failure:\n{log}");
    for w in &warnings {
        assert_eq!(w["level"], "WARN", "{w}");
        assert_eq!(w["span"]["request_id"], "warn-rid-1", "{w}");
        assert_eq!(w["span"]["name"], "request", "{w}");
    }
    assert!(
        !log.contains("\"message\":\"request\""),
        "no access line at warn:\n{log}"
    );
}

/// Request heads over `limits.max_request_header_bytes`, or with too many fields, get 431, and a
/// request line over it 414 (or a close); nothing reaches the upstream.
#[tokio::test]
async fn oversized_headers_get_431_and_reach_no_upstream() {
    let h = Harness::start(&format!(
        "{FIXED}[limits]\nmax_request_header_bytes = 16384\n"
    ))
    .await;
    h.ready().await;
    let big = "a".repeat(20 * 1024);
    let many: String = (0..300).map(|i| format!("X-H{i}: v\r\n")).collect();
    for (what, request) in [
        (
            "one 20 KiB field",
            format!("GET /tasking/products/ HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: {big}\r\n\r\n"),
        ),
        (
            "300 fields",
            format!("GET /tasking/products/ HTTP/1.1\r\nHost: 127.0.0.1\r\n{many}\r\n"),
        ),
    ] {
        let mut s = TcpStream::connect(h.proxy).await.unwrap();
        let _ = s.write_all(request.as_bytes()).await;
        let r = read_to_close(&mut s).await;
        assert_one_response(&r, 431, what);
    }
    // A request line alone over the limit: 414 (RFC 9112 section 3).
    let r = raw_exchange(
        h.proxy,
        format!("GET /tasking/products/?q={big} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").as_bytes(),
    )
    .await;
    assert_one_response(&r, 414, "a 20 KiB target");
    // Under the limit is fine.
    let fits = "a".repeat(8 * 1024);
    let r = raw_exchange(
        h.proxy,
        format!("GET /tasking/products/ HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Fits: {fits}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    assert_one_response(&r, 200, "8 KiB field");
    assert_eq!(h.mock.state.api_requests.load(Ordering::SeqCst), 1);
}

/// `limits.max_connections`: connections beyond the cap are closed at once; a freed slot is
/// reused.
#[tokio::test]
async fn connections_beyond_the_limit_are_closed() {
    let h = Harness::start(&format!("{FIXED}[limits]\nmax_connections = 2\n")).await;
    h.ready().await;
    let get = b"GET /echo/x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(h.proxy).await.unwrap();
        s.write_all(get).await.unwrap();
        let head = read_head(&mut s).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        held.push(s);
    }
    // The third connection is accepted by the kernel, then closed by the proxy unanswered.
    let r = raw_exchange(h.proxy, get).await;
    assert!(r.is_empty(), "{r}");
    drop(held.pop());
    eventually(Duration::from_secs(10), || async {
        let Ok(mut s) = TcpStream::connect(h.proxy).await else {
            return false;
        };
        if s.write_all(get).await.is_err() {
            return false;
        }
        read_head(&mut s).await.starts_with("HTTP/1.1 200")
    })
    .await;
}

/// A client that never finishes its request head (slowloris) is cut off after
/// `timeouts.request_headers`.
#[tokio::test]
async fn slow_request_heads_are_cut_off() {
    let h = Harness::start(&format!("{FIXED}[timeouts]\nrequest_headers = \"300ms\"\n")).await;
    let started = Instant::now();
    let mut s = TcpStream::connect(h.proxy).await.unwrap();
    s.write_all(b"GET /tasking/products/ HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        .await
        .unwrap();
    let r = read_to_close(&mut s).await;
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        statuses(&r).iter().all(|c| *c == 408),
        "only a 408 may be sent: {r}"
    );
    assert_eq!(h.mock.state.api_requests.load(Ordering::SeqCst), 0);
}

// ---------------------------------------------------------------------------------------------
// 6. Secrets on disk.
// ---------------------------------------------------------------------------------------------

/// `client_secret_file` and `access.key_file`: read once at start, trimmed (the mock accepts only
/// the exact secret, the proxy only the exact key), and a world-readable file is warned about by
/// path, never by content.
#[tokio::test]
async fn secret_files_are_trimmed_and_world_readable_ones_are_warned_about() {
    let mock = Mock::start(MockOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let secret_file = write_file(
        dir.path(),
        "client_secret",
        &format!("\n  {MOCK_CLIENT_SECRET} \r\n\n"),
        0o644,
    );
    let key_file = write_file(dir.path(), "key", &format!("{ACCESS_KEY}\n"), 0o600);
    let toml = format!(
        "listen = \"127.0.0.1:0\"\nupstream = \"{}\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[auth]\ntoken_url = \"{}\"\nclient_id = \"{MOCK_CLIENT_ID}\"\nclient_secret_file = \"{}\"\n[access]\nkey_file = \"{}\"\n",
        mock.api_url,
        mock.token_url,
        secret_file.display(),
        key_file.display()
    );
    let env = minimal_env("info");
    let mut proxy = Spawned::start(dir.path(), &toml, &env_refs(&env));
    proxy.wait_for("proxy listening").await;
    let base = format!("http://{}", proxy.addr_of("proxy listening"));
    let r = client()
        .get(format!("{base}/tasking/products/"))
        .header("x-aleph-proxy-key", ACCESS_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Read once: changing the files now changes nothing.
    std::fs::write(&secret_file, "changed").unwrap();
    std::fs::write(&key_file, "changed-key-0123456789").unwrap();
    let r = client()
        .get(format!("{base}/tasking/products/"))
        .header("x-aleph-proxy-key", ACCESS_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let log = proxy.stop().await;
    let warning = log
        .lines()
        .find(|l| l.contains("readable by every user"))
        .unwrap_or_else(|| panic!("no world-readable warning:\n{log}"));
    assert!(warning.contains("WARN"), "{warning}");
    assert!(warning.contains("client_secret"), "{warning}");
    assert!(!log.contains(&format!("{}", key_file.display())), "{log}");
    assert!(!log.contains(MOCK_CLIENT_SECRET));
    assert!(!log.contains(ACCESS_KEY));
    assert_eq!(mock.state.token_successes.load(Ordering::SeqCst), 1);
}

// ---------------------------------------------------------------------------------------------
// 7. Fuzz targets; and SECURITY.md stays true to the code.
// ---------------------------------------------------------------------------------------------

/// Every file in fuzz/fuzz_targets is declared as a target, and the ones named in the brief exist.
#[test]
fn fuzz_targets_are_declared() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    assert!(
        manifest.contains("[workspace]"),
        "fuzz/ must stay out of the main workspace"
    );
    let mut files = Vec::new();
    for e in std::fs::read_dir(root.join("fuzz_targets")).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        if let Some(stem) = name.strip_suffix(".rs") {
            files.push(stem.to_string());
        }
    }
    for required in ["config_parse", "contract_route"] {
        assert!(files.iter().any(|f| f == required), "missing {required}");
    }
    for f in &files {
        assert!(
            manifest.contains(&format!("path = \"fuzz_targets/{f}.rs\"")),
            "fuzz_targets/{f}.rs is not a [[bin]] in fuzz/Cargo.toml"
        );
    }
}

/// SECURITY.md maps each promise to tests by name (`security::name`, `config::tests::name`):
/// every test it cites exists, in the file the path names.
#[test]
fn security_md_cites_existing_tests() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("SECURITY.md")).unwrap();
    let mut cited = 0;
    for name in doc.split('`').skip(1).step_by(2) {
        let is_test_path = name.contains("::")
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b':');
        if !is_test_path {
            continue;
        }
        let segs: Vec<&str> = name.split("::").collect();
        let (test, module) = segs.split_last().unwrap();
        let integration = root.join("tests").join(format!("{}.rs", module[0]));
        let file = if module.len() == 1 && integration.exists() {
            integration
        } else {
            // `config::prop_tests::x` lives in src/config.rs.
            let m: Vec<&str> = module
                .iter()
                .copied()
                .filter(|s| !s.ends_with("tests"))
                .collect();
            let flat = root.join("src").join(format!("{}.rs", m.join("/")));
            if flat.exists() {
                flat
            } else {
                root.join("src").join(m.join("/")).join("mod.rs")
            }
        };
        let text = std::fs::read_to_string(&file)
            .unwrap_or_else(|_| panic!("SECURITY.md cites `{name}`: no {}", file.display()));
        assert!(
            text.contains(&format!("fn {test}(")),
            "SECURITY.md cites `{name}`, which is no test in {}",
            file.display()
        );
        cited += 1;
    }
    assert!(cited >= 10, "SECURITY.md cites only {cited} tests");
}
