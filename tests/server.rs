//! The client side of the proxy over raw sockets: keep-alive and pipelining, HTTP/1.0 clients,
//! the proxy's JSON answer to heads it refuses, uploads the proxy answers before reading them,
//! the keep-alive idle timeout, and clients that hang up while the upstream is still working.

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use support::{client, eventually, Harness};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const FIXED: &str = "[contract]\ndefault = \"contract-123\"\n";

/// One response read off `s`: the head (as text) and the body, delimited by Content-Length or
/// chunked coding.
async fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> (String, Vec<u8>) {
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        fill(s, buf).await;
    };
    let head = String::from_utf8(buf.drain(..end).collect()).unwrap();
    let lower = head.to_ascii_lowercase();
    let mut body = Vec::new();
    if head.starts_with("HTTP/1.1 304") || head.starts_with("HTTP/1.1 204") {
        return (head, body);
    }
    if lower.contains("transfer-encoding: chunked") {
        loop {
            let line_end = loop {
                if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                    break i;
                }
                fill(s, buf).await;
            };
            let size =
                usize::from_str_radix(std::str::from_utf8(&buf[..line_end]).unwrap(), 16).unwrap();
            buf.drain(..line_end + 2);
            while buf.len() < size + 2 {
                fill(s, buf).await;
            }
            body.extend(buf.drain(..size));
            buf.drain(..2);
            if size == 0 {
                return (head, body);
            }
        }
    }
    let length: usize = lower
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or_else(|| panic!("no length in {head}"));
    while buf.len() < length {
        fill(s, buf).await;
    }
    body.extend(buf.drain(..length));
    (head, body)
}

async fn fill(s: &mut TcpStream, buf: &mut Vec<u8>) {
    let mut chunk = [0u8; 16 * 1024];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
        .await
        .expect("response in time")
        .expect("read");
    assert!(
        n > 0,
        "connection closed mid-response: {:?}",
        String::from_utf8_lossy(buf)
    );
    buf.extend_from_slice(&chunk[..n]);
}

/// Reads until the proxy closes the connection (EOF or reset); true if it did within 10 s.
async fn closed_by_proxy(s: &mut TcpStream) -> bool {
    let mut sink = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut sink)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Requests sent back to back on one connection (pipelined) are answered in order, and the
/// connection serves more afterwards.
#[tokio::test]
async fn pipelined_requests_are_answered_in_order_on_one_connection() {
    let h = Harness::start(FIXED).await;
    h.ready().await;
    let mut s = TcpStream::connect(h.proxy).await.unwrap();
    // The mock's /echo answers with the request body.
    let pipelined = "POST /echo/1 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 3\r\n\r\none\
                     GET /echo/2 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n\
                     POST /echo/3 HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n\
                     5\r\nthree\r\n0\r\n\r\n";
    s.write_all(pipelined.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    for want in ["one", "", "three"] {
        let (head, body) = read_response(&mut s, &mut buf).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert_eq!(String::from_utf8_lossy(&body), want);
    }
    s.write_all(b"GET /echo/four HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let (head, _) = read_response(&mut s, &mut buf).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(h.mock.state.api_requests.load(Ordering::SeqCst), 4);
}

/// HTTP/1.0 clients get keep-alive only when they ask for it, and a close otherwise.
#[tokio::test]
async fn http_1_0_clients_get_keep_alive_only_when_they_ask() {
    let h = Harness::start(FIXED).await;
    h.ready().await;
    let mut s = TcpStream::connect(h.proxy).await.unwrap();
    let mut buf = Vec::new();
    for _ in 0..2 {
        s.write_all(b"GET /echo/x HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: keep-alive\r\n\r\n")
            .await
            .unwrap();
        let (head, _) = read_response(&mut s, &mut buf).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert_eq!(header(&head, "connection"), Some("keep-alive"), "{head}");
    }
    // Without Host, which HTTP/1.0 does not require.
    s.write_all(b"GET /echo/x HTTP/1.0\r\n\r\n").await.unwrap();
    let (head, _) = read_response(&mut s, &mut buf).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(header(&head, "connection"), Some("close"), "{head}");
    assert!(closed_by_proxy(&mut s).await);
}

/// What the proxy refuses at the head is its own JSON error, marked as such, and the
/// connection closes: bad bytes, differing lengths, a head or a request line over the limit,
/// an HTTP/1.1 request without Host or any with two.
#[tokio::test]
async fn refused_heads_get_the_proxys_json_error() {
    let h = Harness::start(&format!(
        "{FIXED}[limits]\nmax_request_header_bytes = 16384\n"
    ))
    .await;
    h.ready().await;
    let big = "a".repeat(20 * 1024);
    let refused = |metrics: String, code: &str| -> f64 {
        let name = format!("aleph_proxy_errors_total{{code=\"{code}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name.as_str()))
            .map_or(0.0, |v| v.trim().parse().unwrap())
    };
    let codes = [
        "bad_request",
        "request_headers_too_large",
        "request_target_too_long",
    ];
    let before = h.metrics().await;
    let before: Vec<f64> = codes.iter().map(|c| refused(before.clone(), c)).collect();
    for (request, status, code) in [
        (
            "GET /x HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: a\rb\r\n\r\n".to_string(),
            400,
            "bad_request",
        ),
        (
            "POST /x HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello"
                .to_string(),
            400,
            "bad_request",
        ),
        (
            format!("GET /x HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: {big}\r\n\r\n"),
            431,
            "request_headers_too_large",
        ),
        (
            format!("GET /x?q={big} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"),
            414,
            "request_target_too_long",
        ),
        // RFC 9112 section 3.2: exactly one Host in an HTTP/1.1 request.
        (
            "GET /echo/x HTTP/1.1\r\n\r\n".to_string(),
            400,
            "bad_request",
        ),
        (
            "GET /echo/x HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil.example\r\n\r\n".to_string(),
            400,
            "bad_request",
        ),
        (
            "GET /echo/x HTTP/1.0\r\nHost: evil.example\r\nHost: 127.0.0.1\r\n\r\n".to_string(),
            400,
            "bad_request",
        ),
    ] {
        let mut s = TcpStream::connect(h.proxy).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let (head, body) = read_response(&mut s, &mut buf).await;
        assert!(head.starts_with(&format!("HTTP/1.1 {status}")), "{head}");
        assert_eq!(header(&head, "x-aleph-proxy-error"), Some(code), "{head}");
        assert_eq!(header(&head, "connection"), Some("close"), "{head}");
        // A fresh id, as on every response of the proxy.
        assert_eq!(header(&head, "x-request-id").map(str::len), Some(32), "{head}");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["source"], "aleph-proxy");
        assert_eq!(v["error"]["code"], code);
        assert!(closed_by_proxy(&mut s).await);
    }
    assert_eq!(h.mock.state.api_requests.load(Ordering::SeqCst), 0);
    // Counted as the proxy's own errors (the registry is shared by the tests of this binary:
    // at least this test's refusals).
    let after = h.metrics().await;
    for ((code, before), refusals) in codes.iter().zip(before).zip([5.0, 1.0, 1.0]) {
        assert!(
            refused(after.clone(), code) >= before + refusals,
            "{code}: {after}"
        );
    }
}

/// An upload the proxy refuses before reading it (here: a Host it does not serve). A small body
/// is read and discarded so the connection serves the next request; a large one gets
/// `connection: close`, and the client still reads the whole answer (no reset destroys it).
#[tokio::test]
async fn uploads_answered_before_they_are_read_leave_the_client_its_answer() {
    let h = Harness::start(FIXED).await;
    h.ready().await;
    let mut buf = Vec::new();

    let small = vec![b'x'; 256 * 1024];
    let mut s = TcpStream::connect(h.proxy).await.unwrap();
    s.write_all(
        format!(
            "PUT /echo/x HTTP/1.1\r\nHost: evil.example\r\nContent-Length: {}\r\n\r\n",
            small.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    s.write_all(&small).await.unwrap();
    let (head, _) = read_response(&mut s, &mut buf).await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    assert_eq!(header(&head, "connection"), None, "{head}");
    s.write_all(b"GET /echo/next HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let (head, _) = read_response(&mut s, &mut buf).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");

    // 64 MiB announced: the proxy answers at once, and the client, still writing, gets it whole.
    let mut s = TcpStream::connect(h.proxy).await.unwrap();
    let total = 64 * 1024 * 1024;
    s.write_all(
        format!("PUT /echo/x HTTP/1.1\r\nHost: evil.example\r\nContent-Length: {total}\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let (mut rd, mut wr) = s.into_split();
    let writer = tokio::spawn(async move {
        let chunk = vec![b'y'; 64 * 1024];
        let mut sent = 0;
        while sent < total {
            if wr.write_all(&chunk).await.is_err() {
                break;
            }
            sent += chunk.len();
        }
        sent
    });
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), rd.read_to_end(&mut raw))
        .await
        .expect("the proxy closes the connection");
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 403"), "{text}");
    assert!(text.contains("connection: close"), "{text}");
    assert!(text.ends_with('}'), "the JSON body arrived whole: {text}");
    let sent = writer.await.unwrap();
    assert!(
        sent < total,
        "the proxy stopped reading before the whole upload"
    );
    assert_eq!(h.mock.state.api_requests.load(Ordering::SeqCst), 1);
}

/// `timeouts.client_idle`: a keep-alive connection with no new request is closed; one in use
/// is not.
#[tokio::test]
async fn idle_keep_alive_connections_are_closed_after_client_idle() {
    let h = Harness::start(&format!(
        "{FIXED}[timeouts]\nclient_idle = \"300ms\"\nrequest_headers = \"10s\"\n"
    ))
    .await;
    h.ready().await;
    let mut s = TcpStream::connect(h.proxy).await.unwrap();
    let mut buf = Vec::new();
    s.write_all(b"GET /echo/x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let (head, _) = read_response(&mut s, &mut buf).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let started = tokio::time::Instant::now();
    assert!(closed_by_proxy(&mut s).await, "idle connection left open");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(250),
        "closed after {waited:?}"
    );
    assert!(buf.is_empty(), "no bytes after the response");
}

/// A client that hangs up while the upstream is still working abandons its request: the proxy
/// frees its in-flight slot and drops the upstream exchange instead of waiting it out.
#[tokio::test]
async fn a_client_hanging_up_abandons_its_request() {
    let h = Harness::start(FIXED).await;
    h.ready().await;
    *h.mock.state.api_delay.lock().unwrap() = Duration::from_secs(30);
    let mut s = TcpStream::connect(h.proxy).await.unwrap();
    s.write_all(b"GET /tasking/products/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    eventually(Duration::from_secs(10), || async {
        h.in_flight().await == 1
    })
    .await;
    drop(s);
    eventually(Duration::from_secs(10), || async {
        h.in_flight().await == 0
    })
    .await;
}

/// The admin port (on `0.0.0.0` in a pod) holds no connection that sends no complete head
/// within `timeouts.request_headers`, idle or half-sent, and takes at most
/// `admin::MAX_CONNECTIONS` at once; probes keep working when those are gone.
#[tokio::test]
async fn the_admin_port_drops_silent_connections_and_caps_them() {
    let h = Harness::start(&format!("{FIXED}[timeouts]\nrequest_headers = \"3s\"\n")).await;
    h.ready().await;
    // Nothing sent, and a head never finished: both closed.
    let mut idle = TcpStream::connect(h.admin).await.unwrap();
    let mut half = TcpStream::connect(h.admin).await.unwrap();
    half.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    assert!(
        closed_by_proxy(&mut idle).await,
        "idle admin connection left open"
    );
    assert!(closed_by_proxy(&mut half).await, "half-sent head left open");

    // A keep-alive connection that answered a probe is closed once it goes quiet, too.
    let mut s = TcpStream::connect(h.admin).await.unwrap();
    let mut buf = Vec::new();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (head, body) = read_response(&mut s, &mut buf).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(String::from_utf8_lossy(&body).contains("alive"));
    assert!(
        closed_by_proxy(&mut s).await,
        "quiet keep-alive connection left open"
    );

    // The cap: the connections past it are closed at once, the ones within stay.
    let mut held = Vec::new();
    for _ in 0..aleph_proxy::admin::MAX_CONNECTIONS {
        let mut c = TcpStream::connect(h.admin).await.unwrap();
        // A started head, so each holds its slot until the head timeout.
        c.write_all(b"GET /").await.unwrap();
        held.push(c);
    }
    let mut extra = TcpStream::connect(h.admin).await.unwrap();
    assert!(closed_by_proxy(&mut extra).await);
    // Closed on accept, not by the head timeout: the held ones, older, are still open and serve.
    let mut first = held.remove(0);
    first
        .write_all(b"healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let (head, _) = read_response(&mut first, &mut buf).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // Once the held ones time out, probes are served again.
    for mut c in held {
        assert!(closed_by_proxy(&mut c).await);
    }
    let r = client().get(h.admin_url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}
