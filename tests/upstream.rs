//! The HTTP/1.1 upstream connection, against a scripted raw-socket upstream: every way RFC 9112
//! delimits a response body (Content-Length, chunked with extensions and trailers, the connection
//! closing, none for HEAD), interim 1xx responses, ambiguous or broken framing, and keep-alive
//! connections the upstream closes, idle or mid-request. Each test asserts what the client gets
//! and how many upstream connections were used.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use aleph_proxy::mock::{Mock, MockOptions};
use support::{client, eventually, proxy_error, Harness};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the scripted upstream does with one request.
enum Step {
    /// Write these bytes and keep the connection for the next request.
    Reply(&'static [u8]),
    /// Write these bytes, then close the connection.
    ReplyAndClose(&'static [u8]),
    /// Close the connection without answering.
    Close,
}

type Script = dyn Fn(&str, usize) -> Step + Send + Sync;

struct Upstream {
    addr: SocketAddr,
    /// Connections accepted.
    conns: Arc<AtomicUsize>,
    /// Connections the upstream has closed.
    closed: Arc<AtomicUsize>,
    /// "METHOD path" of every request received, in order.
    seen: Arc<Mutex<Vec<String>>>,
}

impl Upstream {
    /// `script(request_line, index of the request on its connection)`.
    async fn start(script: impl Fn(&str, usize) -> Step + Send + Sync + 'static) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Upstream {
            addr,
            conns: Arc::new(AtomicUsize::new(0)),
            closed: Arc::new(AtomicUsize::new(0)),
            seen: Arc::new(Mutex::new(Vec::new())),
        };
        let script: Arc<Script> = Arc::new(script);
        let (conns, closed, seen) = (up.conns.clone(), up.closed.clone(), up.seen.clone());
        tokio::spawn(async move {
            loop {
                let (sock, _) = listener.accept().await.unwrap();
                conns.fetch_add(1, Ordering::SeqCst);
                let (script, closed, seen) = (script.clone(), closed.clone(), seen.clone());
                tokio::spawn(async move {
                    serve(sock, &*script, &seen).await;
                    closed.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        up
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

/// Reads requests (head, then a Content-Length body) and follows the script.
async fn serve(mut sock: TcpStream, script: &Script, seen: &Mutex<Vec<String>>) {
    let mut buf = Vec::new();
    for index in 0.. {
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            match sock.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_string();
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        while buf.len() < end + length {
            let mut chunk = [0u8; 4096];
            match sock.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..end + length);
        let line = head.lines().next().unwrap_or("").to_string();
        let mut parts = line.split(' ');
        let request = format!(
            "{} {}",
            parts.next().unwrap_or(""),
            parts.next().unwrap_or("")
        );
        seen.lock().unwrap().push(request.clone());
        match script(&request, index) {
            Step::Reply(bytes) => {
                if sock.write_all(bytes).await.is_err() {
                    return;
                }
            }
            Step::ReplyAndClose(bytes) => {
                let _ = sock.write_all(bytes).await;
                return;
            }
            Step::Close => return,
        }
    }
}

async fn proxy_for(up: &Upstream) -> Harness {
    proxy_at(up.addr, "").await
}

/// The proxy in front of the upstream at `addr`, with `extra` configuration.
async fn proxy_at(addr: SocketAddr, extra: &str) -> Harness {
    let mock = Mock::start(MockOptions::default()).await.unwrap();
    let mut config = support::config_for(
        &mock,
        &format!("[contract]\ndefault = \"contract-123\"\n{extra}"),
    );
    config.upstream.url = format!("http://{addr}").parse().unwrap();
    let h = Harness::start_config(mock, config).await;
    h.ready().await;
    h
}

/// Starts a `PUT` of `size` bytes to the proxy (with a Content-Length, or `chunked` in 1 MiB
/// chunks), written by a task of its own as fast as the proxy takes it; returns the
/// connection's read side, for the answer.
async fn upload(proxy: SocketAddr, size: usize, chunked: bool) -> tokio::net::tcp::OwnedReadHalf {
    let conn = TcpStream::connect(proxy).await.unwrap();
    let (rd, mut wr) = conn.into_split();
    let framing = if chunked {
        "Transfer-Encoding: chunked".to_string()
    } else {
        format!("Content-Length: {size}")
    };
    let head = format!("PUT /upload HTTP/1.1\r\nHost: {proxy}\r\n{framing}\r\n\r\n");
    tokio::spawn(async move {
        wr.write_all(head.as_bytes()).await?;
        let piece = vec![7u8; 1024 * 1024];
        for _ in 0..size / piece.len() {
            if chunked {
                wr.write_all(format!("{:x}\r\n", piece.len()).as_bytes())
                    .await?;
                wr.write_all(&piece).await?;
                wr.write_all(b"\r\n").await?;
            } else {
                wr.write_all(&piece).await?;
            }
        }
        if chunked {
            wr.write_all(b"0\r\n\r\n").await?;
        }
        Ok::<_, std::io::Error>(())
    });
    rd
}

/// Reads from `rd` until `done` holds for what was read, the connection ends, or 20 s pass.
async fn read_until(
    rd: &mut tokio::net::tcp::OwnedReadHalf,
    done: impl Fn(&[u8]) -> bool,
) -> String {
    let mut resp = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(20), async {
        let mut buf = [0u8; 4096];
        while !done(&resp) {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => resp.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .expect("an answer in time");
    String::from_utf8_lossy(&resp).into_owned()
}

async fn get_text(url: &str) -> (u16, String) {
    let r = client().get(url).send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test]
async fn chunked_responses_arrive_whole_and_keep_their_connection() {
    let up = Upstream::start(|_, _| {
        Step::Reply(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n\
              5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-checksum: abc\r\n\r\n",
        )
    })
    .await;
    let h = proxy_for(&up).await;
    for _ in 0..3 {
        assert_eq!(get_text(&h.url("/x")).await, (200, "hello world".into()));
    }
    assert_eq!(
        up.conns.load(Ordering::SeqCst),
        1,
        "the connection was reused"
    );
}

#[tokio::test]
async fn responses_delimited_by_close_arrive_whole_on_fresh_connections() {
    let up = Upstream::start(|_, _| {
        Step::ReplyAndClose(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil the end")
    })
    .await;
    let h = proxy_for(&up).await;
    for _ in 0..2 {
        assert_eq!(get_text(&h.url("/x")).await, (200, "until the end".into()));
    }
    assert_eq!(up.conns.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn interim_responses_are_skipped() {
    let up = Upstream::start(|_, _| {
        Step::Reply(
            b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n\
              HTTP/1.1 100 Continue\r\n\r\n\
              HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
        )
    })
    .await;
    let h = proxy_for(&up).await;
    assert_eq!(get_text(&h.url("/x")).await, (200, "ok".into()));
    assert_eq!(get_text(&h.url("/x")).await, (200, "ok".into()));
    assert_eq!(up.conns.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn ambiguous_framing_is_read_as_chunked_and_the_connection_is_not_reused() {
    // Transfer-Encoding and Content-Length together: RFC 9112 6.1 says Transfer-Encoding wins,
    // and such a connection must not carry another request (the lengths disagree on where the
    // next response starts).
    let up = Upstream::start(|_, _| {
        Step::Reply(
            b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\ntransfer-encoding: chunked\r\n\r\n\
              2\r\nok\r\n0\r\n\r\n",
        )
    })
    .await;
    let h = proxy_for(&up).await;
    assert_eq!(get_text(&h.url("/x")).await, (200, "ok".into()));
    assert_eq!(get_text(&h.url("/x")).await, (200, "ok".into()));
    assert_eq!(up.conns.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn differing_content_lengths_are_a_502_from_the_proxy() {
    let up = Upstream::start(|_, _| {
        Step::Reply(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\nabcd")
    })
    .await;
    let h = proxy_for(&up).await;
    let r = client().get(h.url("/x")).send().await.unwrap();
    let (status, code) = proxy_error(r).await;
    assert_eq!((status, code.as_str()), (502, "upstream_bad_response"));
}

#[tokio::test]
async fn a_truncated_response_body_fails_the_clients_response() {
    let up = Upstream::start(|_, _| {
        Step::ReplyAndClose(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly ten b")
    })
    .await;
    let h = proxy_for(&up).await;
    // The head may or may not have left before the body failed; either way the client must
    // not get what looks like a complete response.
    if let Ok(r) = client().get(h.url("/x")).send().await {
        assert_eq!(r.status(), 200);
        assert!(
            r.bytes().await.is_err(),
            "the client must see the body cut short"
        );
    }
}

/// An HTTP/1.0 client reads a body of unknown length until the connection closes, so a cut
/// must reach it as a reset, never as the orderly close that ends a complete body.
#[tokio::test]
async fn a_cut_body_reaches_an_http_1_0_client_as_a_reset() {
    let up = Upstream::start(|_, _| {
        Step::ReplyAndClose(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
    })
    .await;
    let h = proxy_for(&up).await;
    let mut s = tokio::net::TcpStream::connect(h.proxy).await.unwrap();
    s.write_all(b"GET /x HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let end = tokio::time::timeout(std::time::Duration::from_secs(20), async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) => return Ok(()),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => return Err(e),
            }
        }
    })
    .await
    .expect("the connection ends in time");
    let e = end.expect_err("a reset, not an orderly close after a cut body");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
}

#[tokio::test]
async fn head_and_304_responses_have_no_body_and_keep_the_connection() {
    let up = Upstream::start(|req, _| {
        if req.starts_with("HEAD") {
            Step::Reply(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n")
        } else if req.contains("cached") {
            Step::Reply(b"HTTP/1.1 304 Not Modified\r\netag: \"v1\"\r\n\r\n")
        } else {
            Step::Reply(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nbody")
        }
    })
    .await;
    let h = proxy_for(&up).await;
    let r = client().head(h.url("/x")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"], "1000");
    let r = client().get(h.url("/cached")).send().await.unwrap();
    assert_eq!(r.status(), 304);
    assert_eq!(get_text(&h.url("/x")).await, (200, "body".into()));
    assert_eq!(up.conns.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_idle_connection_the_upstream_closed_is_not_used() {
    // The upstream answers one request per connection without saying so (no Connection: close),
    // as servers do when their keep-alive timeout ends.
    let up = Upstream::start(|_, _| {
        Step::ReplyAndClose(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
    })
    .await;
    let h = proxy_for(&up).await;
    assert_eq!(get_text(&h.url("/a")).await, (200, "ok".into()));
    let closed = up.closed.clone();
    eventually(std::time::Duration::from_secs(5), || {
        let closed = closed.clone();
        async move { closed.load(Ordering::SeqCst) == 1 }
    })
    .await;
    // A POST cannot be sent twice: it must not go out on the closed connection.
    let r = client()
        .post(h.url("/b"))
        .body("payload")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "ok");
    assert_eq!(up.seen(), vec!["GET /a", "POST /b"]);
}

#[tokio::test]
async fn a_reused_connection_that_drops_a_request_is_retried_for_idempotent_methods_only() {
    // The second request on every connection is read and dropped without an answer: the race
    // of a keep-alive timeout ending just as a request arrives.
    let up = Upstream::start(|_, index| {
        if index == 1 {
            Step::Close
        } else {
            Step::Reply(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        }
    })
    .await;
    let h = proxy_for(&up).await;
    assert_eq!(get_text(&h.url("/first")).await, (200, "ok".into()));
    // GET: sent again on a new connection.
    assert_eq!(get_text(&h.url("/again")).await, (200, "ok".into()));
    assert_eq!(
        up.seen(),
        vec!["GET /first", "GET /again", "GET /again"],
        "the GET went out twice"
    );
    assert_eq!(up.conns.load(Ordering::SeqCst), 2);

    // POST: the pooled connection (one request served) drops it too; not sent again.
    let r = client()
        .post(h.url("/order"))
        .body("buy")
        .send()
        .await
        .unwrap();
    let (status, code) = proxy_error(r).await;
    assert_eq!((status, code.as_str()), (502, "upstream_bad_response"));
    let posts = up.seen().iter().filter(|r| *r == "POST /order").count();
    assert_eq!(posts, 1, "a POST is never sent twice");
}

/// `len` body bytes of a repeating pattern.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// A 200 announcing `announced` body bytes and carrying `len` of them (leaked: the scripts
/// take static bytes).
fn large_response(len: usize, announced: usize) -> &'static [u8] {
    let mut v = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: image/tiff\r\ncontent-length: {announced}\r\n\r\n"
    )
    .into_bytes();
    v.extend(pattern(len));
    Box::leak(v.into_boxed_slice())
}

/// A chunked 200 with `len` body bytes in chunks of 1 MiB (leaked like [`large_response`]).
fn large_chunked_response(len: usize) -> &'static [u8] {
    let mut v =
        b"HTTP/1.1 200 OK\r\ncontent-type: image/tiff\r\ntransfer-encoding: chunked\r\n\r\n"
            .to_vec();
    for chunk in pattern(len).chunks(1024 * 1024) {
        v.extend(format!("{:x}\r\n", chunk.len()).bytes());
        v.extend(chunk);
        v.extend(b"\r\n");
    }
    v.extend(b"0\r\n\r\n");
    Box::leak(v.into_boxed_slice())
}

/// The proxy's `aleph_proxy_spliced_bytes_total`.
async fn spliced(h: &support::Harness) -> u64 {
    h.metric("aleph_proxy_spliced_bytes_total").await as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_move_socket_to_socket_whole_and_keep_their_connection() {
    const LEN: usize = 3 * 1024 * 1024 + 5;
    let big = large_response(LEN, LEN);
    let up = Upstream::start(move |line, _| match line {
        "GET /big" => Step::Reply(big),
        _ => Step::Reply(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"),
    })
    .await;
    let h = proxy_for(&up).await;
    let before = spliced(&h).await;
    for _ in 0..2 {
        let r = client().get(h.url("/big")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-length"], LEN.to_string().as_str());
        let body = r.bytes().await.unwrap();
        assert!(
            body[..] == pattern(LEN)[..],
            "the body arrives byte for byte"
        );
    }
    assert_eq!(get_text(&h.url("/small")).await, (200, "ok".into()));
    // Each body ended exactly where it said: the connection served all three requests.
    assert_eq!(up.conns.load(Ordering::SeqCst), 1);
    assert_eq!(up.closed.load(Ordering::SeqCst), 0);
    if cfg!(target_os = "linux") {
        // All but what arrived with each head moved by the kernel.
        let moved = spliced(&h).await - before;
        assert!(moved >= 2 * (LEN as u64 - 256 * 1024), "spliced {moved}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_body_the_upstream_cuts_short_is_cut_for_the_client() {
    let cut = large_response(1024 * 1024, 3 * 1024 * 1024);
    let up = Upstream::start(move |line, _| match line {
        "GET /big" => Step::ReplyAndClose(cut),
        _ => Step::Reply(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"),
    })
    .await;
    let h = proxy_for(&up).await;
    let r = client().get(h.url("/big")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.bytes().await.is_err(),
        "a body cut short must not look complete"
    );
    // The next request gets a fresh connection and a whole answer.
    assert_eq!(get_text(&h.url("/small")).await, (200, "ok".into()));
    assert_eq!(up.conns.load(Ordering::SeqCst), 2);
}

/// What an upstream that reads only a request's head does next.
#[derive(Clone, Copy)]
enum AfterHead {
    /// Nothing: it never reads the body nor answers.
    Nothing,
    /// Answers 413, as servers do before reading a body they refuse, and keeps the connection
    /// without reading anything more.
    Answer,
    /// Answers 413, then closes.
    AnswerAndClose,
}

/// An upstream that reads each request's head and none of its body.
async fn reads_only_the_head(then: AfterHead) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut buf = Vec::new();
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                let mut chunk = [0u8; 1024];
                match sock.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let close = matches!(then, AfterHead::AnswerAndClose);
            if !matches!(then, AfterHead::Nothing) {
                let body = br#"{"detail":"Request entity too large."}"#;
                let mut answer = format!(
                    "HTTP/1.1 413 Payload Too Large\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{}\r\n",
                    body.len(),
                    if close { "Connection: close\r\n" } else { "" }
                )
                .into_bytes();
                answer.extend_from_slice(body);
                // One write: closing with the body unread resets the connection, and the kernel
                // drops whatever it had not sent yet (a second write held back by Nagle).
                let _ = sock.write_all(&answer).await;
            }
            if !close {
                held.push(sock);
            }
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_stops_taking_an_upload_gives_504_after_the_response_headers_timeout() {
    // The upload fills the socket buffers and stops moving.
    let addr = reads_only_the_head(AfterHead::Nothing).await;
    let h = proxy_at(addr, "[timeouts]\nresponse_headers = \"500ms\"").await;
    let mut rd = upload(h.proxy, 256 * 1024 * 1024, false).await;
    let text = read_until(&mut rd, |r| r.windows(4).any(|w| w == b"\r\n\r\n"))
        .await
        .to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 504"), "{text}");
    assert!(
        text.contains("x-aleph-proxy-error: upstream_timeout"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_answer_before_the_upload_is_read_reaches_the_client() {
    for (close, chunked) in [(true, false), (false, false), (true, true), (false, true)] {
        let up = reads_only_the_head(if close {
            AfterHead::AnswerAndClose
        } else {
            AfterHead::Answer
        })
        .await;
        // The response-headers timeout far away: the answer must come from the upstream, not
        // from a 504.
        let h = proxy_at(up, "[timeouts]\nresponse_headers = \"60s\"").await;
        // 64 MiB: far more than the socket buffers between the client and the upstream hold.
        let mut rd = upload(h.proxy, 64 * 1024 * 1024, chunked).await;
        let text = read_until(&mut rd, |r| r.ends_with(b"}")).await;
        assert!(
            text.starts_with("HTTP/1.1 413"),
            "close={close} chunked={chunked}: {text}"
        );
        assert!(
            text.ends_with(r#"{"detail":"Request entity too large."}"#),
            "{text}"
        );
        assert!(
            !text.to_ascii_lowercase().contains("x-aleph-proxy-error"),
            "{text}"
        );
        // The upload was not finished: with its length known to be too large to read and
        // discard, the proxy says it closes the client's connection after the answer. (The
        // rest of a chunked one is read and discarded up to a limit, then the connection
        // closes too.)
        if !chunked {
            assert!(
                text.to_ascii_lowercase().contains("connection: close"),
                "{text}"
            );
        }
    }
}

/// A client that stops reading its response holds nothing longer than `timeouts.body_idle`: the
/// response is cut, the connection closed, its in-flight slot freed and its upstream connection
/// closed, whether the body moves socket to socket (a Content-Length) or through the proxy
/// (chunked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_off_after_body_idle() {
    // Far more than the socket buffers between the upstream and the client hold.
    const LEN: usize = 32 * 1024 * 1024;
    let length = large_response(LEN, LEN);
    let chunked = large_chunked_response(LEN);
    let up = Upstream::start(move |line, _| match line {
        "GET /length" => Step::Reply(length),
        "GET /chunked" => Step::Reply(chunked),
        _ => Step::Reply(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"),
    })
    .await;
    // One request in flight at most: a client holding its slot would refuse every other one.
    let h = proxy_at(
        up.addr,
        "[timeouts]\nbody_idle = \"300ms\"\n[limits]\nmax_in_flight = 1\n",
    )
    .await;
    for (i, path) in ["/length", "/chunked"].into_iter().enumerate() {
        // The slot of the previous round's small request is given back once its response is
        // sent, which can be just after the client has read it.
        eventually(std::time::Duration::from_secs(20), || async {
            h.in_flight().await == 0
        })
        .await;
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        let (mut rd, mut wr) = sock.connect(h.proxy).await.unwrap().into_split();
        wr.write_all(format!("GET {path} HTTP/1.1\r\nHost: {}\r\n\r\n", h.proxy).as_bytes())
            .await
            .unwrap();
        // The response has begun; the client reads no more of it.
        let head = read_until(&mut rd, |r| r.windows(4).any(|w| w == b"\r\n\r\n")).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{path}: {head}");
        eventually(std::time::Duration::from_secs(20), || async {
            h.in_flight().await == 0
        })
        .await;
        assert_eq!(
            get_text(&h.url("/small")).await,
            (200, "ok".into()),
            "{path}"
        );
        let closed = up.closed.clone();
        eventually(std::time::Duration::from_secs(20), || {
            let closed = closed.clone();
            async move { closed.load(Ordering::SeqCst) == i + 1 }
        })
        .await;
        // The client's connection is over: what it reads now ends short of the body.
        let rest = read_until(&mut rd, |_| false).await;
        assert!(
            head.len() + rest.len() < LEN,
            "{path}: the response was cut"
        );
    }
}

/// A chunked response body that breaks RFC 9112 section 7.1 (a size line without digits, a bare
/// LF or a control byte in an extension, a trailer line that is not a field) cuts the client's
/// response, and its connection is not used again.
#[tokio::test]
async fn broken_chunked_response_bodies_are_cut_and_their_connection_is_not_reused() {
    let up = Upstream::start(|line, _| {
        let head = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
        let body: &str = match line {
            "GET /no-digits" => "5\r\nhello\r\n\r\n\r\n",
            "GET /bare-lf" => "3;x\nabc\r\nxyz\r\n0\r\n\r\n",
            "GET /control" => "3;\x00\x01\x7f\r\nabc\r\n0\r\n\r\n",
            "GET /space" => "3 \r\nabc\r\n0\r\n\r\n",
            "GET /trailer" => "3\r\nabc\r\n0\r\nthis is not a field\r\n\r\n",
            "GET /trailer-lf" => "3\r\nabc\r\n0\r\n\nx-a: 1\r\n\r\n",
            _ => return Step::Reply(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"),
        };
        Step::Reply(format!("{head}{body}").leak().as_bytes())
    })
    .await;
    let h = proxy_for(&up).await;
    let paths = [
        "/no-digits",
        "/bare-lf",
        "/control",
        "/space",
        "/trailer",
        "/trailer-lf",
    ];
    for (i, path) in paths.into_iter().enumerate() {
        // The head may or may not have left before the body failed; either way the client must
        // not get what looks like a complete response.
        let cut_before = h.metric("aleph_proxy_responses_cut_total").await;
        if let Ok(r) = client().get(h.url(path)).send().await {
            assert_eq!(r.status(), 200, "{path}");
            assert!(r.bytes().await.is_err(), "{path}: the body must be cut");
            // The access line said 200: the operator sees the cut in the metrics (and a WARN).
            let cut = h.metric("aleph_proxy_responses_cut_total").await;
            assert!(cut > cut_before, "{path}: the cut is counted");
        }
        assert_eq!(get_text(&h.url("/ok")).await, (200, "ok".into()), "{path}");
        assert_eq!(
            up.conns.load(Ordering::SeqCst),
            i + 2,
            "{path}: its connection was not reused"
        );
    }
}

/// Framing the proxy cannot pass on is its 502: a Transfer-Encoding other than exactly chunked
/// (the proxy decodes no other coding, and re-framed bytes would reach the client still coded
/// and undeclared), a Content-Length that is not digits only, a head over 64 KiB.
#[tokio::test]
async fn upstream_framing_the_proxy_cannot_pass_on_is_a_502() {
    let fields: String = (0..95)
        .map(|i| format!("x-f{i}: {}\r\n", "a".repeat(1000)))
        .collect();
    let big_head: &'static str =
        format!("HTTP/1.1 200 OK\r\n{fields}content-length: 2\r\n\r\nok").leak();
    let up = Upstream::start(move |line, _| {
        Step::Reply(match line {
            "GET /gzip-chunked" => {
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
            }
            "GET /chunked-gzip" => {
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, gzip\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
            }
            "GET /gzip" => b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\nhello",
            "GET /plus-length" => b"HTTP/1.1 200 OK\r\ncontent-length: +2\r\n\r\nok",
            "GET /big-head" => big_head.as_bytes(),
            _ => b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
        })
    })
    .await;
    let h = proxy_for(&up).await;
    for path in [
        "/gzip-chunked",
        "/chunked-gzip",
        "/gzip",
        "/plus-length",
        "/big-head",
    ] {
        let r = client().get(h.url(path)).send().await.unwrap();
        let (status, code) = proxy_error(r).await;
        assert_eq!(
            (status, code.as_str()),
            (502, "upstream_bad_response"),
            "{path}"
        );
    }
    assert_eq!(get_text(&h.url("/ok")).await, (200, "ok".into()));
}

/// The status line carries the registered reason of its code, and none for a code without one
/// (the upstream's own phrase is not kept).
#[tokio::test]
async fn statuses_without_a_registered_reason_get_an_empty_one() {
    let up = Upstream::start(|line, _| {
        Step::Reply(match line {
            "GET /custom" => b"HTTP/1.1 299 Custom Thing\r\ncontent-length: 2\r\n\r\nok",
            _ => b"HTTP/1.1 404 Gone Fishing\r\ncontent-length: 2\r\n\r\nok",
        })
    })
    .await;
    let h = proxy_for(&up).await;
    for (path, line) in [
        ("/custom", "HTTP/1.1 299 \r\n"),
        ("/missing", "HTTP/1.1 404 Not Found\r\n"),
    ] {
        let (mut rd, mut wr) = TcpStream::connect(h.proxy).await.unwrap().into_split();
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            h.proxy
        );
        wr.write_all(request.as_bytes()).await.unwrap();
        let text = read_until(&mut rd, |_| false).await;
        assert!(text.starts_with(line), "{text}");
        assert!(text.ends_with("\r\n\r\nok"), "{text}");
    }
}
