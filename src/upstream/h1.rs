//! HTTP/1.1 to the upstream, driven by the task that serves the client's request.
//!
//! The handler writes the request head and body itself, and the response body is read from the
//! upstream socket when the client connection's writer asks for the next chunk. There is no
//! connection task and no channel between tasks: a request costs one wake-up per socket event.
//! BENCHMARKS.md has what that bought against hyper's client connection.
//!
//! Parsing is httparse's (the parser inside hyper), for the status line and the headers; the
//! chunked coding is `crate::http1`'s. This module holds the message framing of RFC 9112 section
//! 6: a body delimited by Content-Length, by chunked transfer coding or by the connection
//! closing, no body for HEAD, 1xx, 204 and 304. A response with Transfer-Encoding and
//! Content-Length is read as chunked, as the RFC says, and its connection is not reused, so a
//! confused upstream cannot desynchronise the next request. A head over 64 KiB, a
//! Transfer-Encoding other than exactly `chunked` (the proxy decodes no other coding, and the
//! client must not get coded bytes undeclared), a Content-Length that is not digits only, and
//! differing Content-Lengths fail the request (the proxy's 502). A broken chunked body cuts the
//! client's response and its connection is not reused.

use std::pin::Pin;
use std::sync::Mutex;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode, Version};
use http_body::{Body as _, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::body::{BoxError, PassBody};
use crate::http1::{parse_length, take, Chunk, Decoded};

/// The upstream socket: TCP, or TLS over TCP (possibly through the egress proxy's tunnel), read
/// and written through tokio's traits directly. (The connector's `TokioIo<MaybeHttpsStream<..>>`
/// converts every read between tokio's and hyper's buffer types twice.)
pub enum Io {
    Plain(tokio::net::TcpStream),
    Tls(Box<Tls>),
}

/// What hyper-rustls's connector makes of a TCP stream: its TLS stream over a `TokioIo` of the
/// connector's `TokioIo`.
type Tls = tokio_rustls::client::TlsStream<
    hyper_util::rt::TokioIo<hyper_util::rt::TokioIo<tokio::net::TcpStream>>,
>;

impl Io {
    /// Unwraps what the connector made.
    pub fn new(
        io: hyper_rustls::MaybeHttpsStream<hyper_util::rt::TokioIo<tokio::net::TcpStream>>,
    ) -> Io {
        match io {
            hyper_rustls::MaybeHttpsStream::Http(tcp) => Io::Plain(tcp.into_inner()),
            hyper_rustls::MaybeHttpsStream::Https(tls) => Io::Tls(Box::new(tls.into_inner())),
        }
    }
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(_) => Poll::Ready(Ok(())),
            Io::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

/// A response head larger than this is refused (hyper's client allows about as much).
const MAX_HEAD: usize = 64 * 1024;
/// Response headers at most (hyper's default).
const MAX_HEADERS: usize = 100;
/// Bytes asked of the socket per read of a response body: at first, and at most. A read that
/// fills what was asked doubles the next one, so a large download moves in large reads (fewer
/// system calls and wake-ups per byte) while small responses keep small buffers.
const READ_MIN: usize = 64 * 1024;
const READ_MAX: usize = 1024 * 1024;
/// Request bodies up to this size go out in the same write as the head.
const COALESCE: usize = 16 * 1024;
/// Idle connections kept at most; more are closed once their response is read.
const MAX_IDLE: usize = 1024;
/// Idle connections unused this long are closed (servers drop them around then anyway).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// One HTTP/1.1 connection to the upstream.
pub struct Conn {
    io: Io,
    /// Read from the socket, not consumed yet.
    buf: BytesMut,
    /// The request head being written; kept to reuse its allocation.
    head: Vec<u8>,
    used: Instant,
}

impl Conn {
    /// Boxed once per connection: a connection moves from the pool to a request and its body
    /// and back, and the TLS state makes it large.
    pub fn new(io: Io) -> Box<Conn> {
        Box::new(Conn {
            io,
            buf: BytesMut::new(),
            head: Vec::new(),
            used: Instant::now(),
        })
    }

    /// The TCP socket, when the connection is plain TCP (not TLS): the one bodies can be
    /// spliced into and out of.
    fn tcp(&self) -> Option<&tokio::net::TcpStream> {
        match &self.io {
            Io::Plain(tcp) => Some(tcp),
            Io::Tls(_) => None,
        }
    }

    /// Still usable after lying idle: nothing to read (no EOF, no stray bytes, no error).
    /// A single non-blocking poll; tokio remembers that the socket was drained, so this makes
    /// no system call in the usual case.
    fn is_open(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
        let mut byte = [0u8; 1];
        let mut rb = ReadBuf::new(&mut byte);
        matches!(
            Pin::new(&mut self.io).poll_read(&mut cx, &mut rb),
            Poll::Pending
        )
    }
}

/// The idle HTTP/1.1 connections, most recently used last.
#[derive(Default)]
pub struct Idle {
    #[allow(clippy::vec_box)] // The boxes move out to requests and back, unchanged.
    conns: Mutex<Vec<Box<Conn>>>,
}

impl Idle {
    /// The most recently used idle connection that is still open.
    pub fn checkout(&self) -> Option<Box<Conn>> {
        let mut conns = self.conns.lock().expect("pool lock");
        let now = Instant::now();
        while let Some(mut c) = conns.pop() {
            if now.duration_since(c.used) > IDLE_TIMEOUT {
                // The rest were used even earlier.
                conns.clear();
                return None;
            }
            if c.is_open() {
                return Some(c);
            }
        }
        None
    }

    fn checkin(&self, mut conn: Box<Conn>) {
        conn.used = Instant::now();
        let mut conns = self.conns.lock().expect("pool lock");
        if conns.len() < MAX_IDLE {
            conns.push(conn);
        }
    }
}

/// Why a request on a connection failed.
#[allow(clippy::large_enum_variant)] // Moved once per failed request, not worth a box.
pub enum SendError {
    /// The client's request body failed (stalled, malformed, cut short): the client's fault.
    Body(BoxError),
    /// The connection failed or the upstream broke the protocol. `retry` holds the request
    /// body when sending the request again on another connection is safe: a reused connection
    /// that failed before the upstream answered anything, with nothing of the request written or
    /// an idempotent request whose body is kept (RFC 9110 section 9.2.2).
    Conn {
        error: BoxError,
        retry: Option<PassBody>,
    },
}

/// The request line and headers, borrowed from the handler so that a retry needs no copy.
pub struct Head<'a> {
    pub method: &'a Method,
    pub path_and_query: &'a str,
    pub host: &'a HeaderValue,
    pub headers: &'a HeaderMap,
    /// Written after `headers`, which hold none of these names (see [`super::Extra`]).
    pub extra: &'a super::Extra<'a>,
}

/// Sends one request on `conn` and reads the response head. `reused`: the connection served
/// requests before (a failure with nothing answered may be the upstream closing it while idle).
pub async fn send(
    mut conn: Box<Conn>,
    reused: bool,
    head: &Head<'_>,
    body: PassBody,
    idle: &std::sync::Arc<Idle>,
) -> Result<Response<Body>, SendError> {
    let framing = write_head(&mut conn.head, head, &body);
    let replayable = match &body {
        PassBody::Buffered(b) if is_idempotent(head.method) => Some(b.clone()),
        _ => None,
    };
    // Only a buffered body survives a failed attempt; a streamed one may be half read.
    let stale = |error: BoxError| SendError::Conn {
        retry: if reused {
            replayable.clone().map(PassBody::Buffered)
        } else {
            None
        },
        error,
    };

    // The head, with a small body in the same write.
    let mut body = body;
    let mut sent = 0;
    if let PassBody::Buffered(b) = &body {
        if b.len() <= COALESCE {
            conn.head.extend_from_slice(b);
            sent = b.len() as u64;
            body = PassBody::Buffered(Bytes::new());
        }
    }
    if let Err(e) = conn.io.write_all(&conn.head).await {
        return Err(match body {
            // Nothing of a streamed body was read yet: it can go on another connection.
            PassBody::Streaming(_) if reused => SendError::Conn {
                error: e.into(),
                retry: Some(body),
            },
            _ => stale(e.into()),
        });
    }
    // The body is written while the upstream is watched: it may answer before reading all of
    // it (a 413, a 401, a redirect) and stop reading. Without a body (the usual request) there
    // is nothing to watch for.
    let answered_early = if matches!(&body, PassBody::Buffered(b) if b.is_empty()) {
        if let Err(e) = conn.io.flush().await {
            return Err(stale(e.into()));
        }
        false
    } else {
        match write_body(&mut conn, body, framing, sent).await {
            Ok(answered) => answered,
            Err(WriteError::Body(e)) => return Err(SendError::Body(e)),
            Err(WriteError::Io(e)) => return Err(stale(e.into())),
        }
    };

    // The response head; 1xx interim responses (100 Continue, 103 Early Hints) are skipped.
    let mut received = false;
    loop {
        match parse_head(&mut conn.buf, head.method) {
            Ok(Some(mut parsed)) => {
                if parsed.status.is_informational() {
                    if parsed.status == StatusCode::SWITCHING_PROTOCOLS {
                        return Err(SendError::Conn {
                            error: "the upstream switched protocols unasked".into(),
                            retry: None,
                        });
                    }
                    continue;
                }
                // The rest of the request body was never sent: the connection is done.
                parsed.keep_alive &= !answered_early;
                return Ok(parsed.into_response(conn, idle));
            }
            Ok(None) => {}
            Err(e) => {
                return Err(SendError::Conn {
                    error: e.into(),
                    retry: None,
                })
            }
        }
        if conn.buf.len() > MAX_HEAD {
            return Err(SendError::Conn {
                error: "upstream response head too large".into(),
                retry: None,
            });
        }
        conn.buf.reserve(8 * 1024);
        match conn.io.read_buf(&mut conn.buf).await {
            Ok(0) if !received => {
                return Err(stale(
                    "the upstream closed the connection without answering".into(),
                ))
            }
            Ok(0) => {
                return Err(SendError::Conn {
                    error: "the upstream closed the connection in the response head".into(),
                    retry: None,
                })
            }
            Ok(_) => received = true,
            Err(e) if !received => return Err(stale(e.into())),
            Err(e) => {
                return Err(SendError::Conn {
                    error: e.into(),
                    retry: None,
                })
            }
        }
    }
}

fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// How the request body is delimited.
#[derive(Clone, Copy)]
enum Framing {
    Length(u64),
    Chunked,
}

fn write_head(out: &mut Vec<u8>, head: &Head<'_>, body: &PassBody) -> Framing {
    out.clear();
    out.extend_from_slice(head.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(head.path_and_query.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(head.host.as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut client_length = false;
    for (name, value) in head.headers {
        // Framing is the proxy's own (below); Host is the upstream's; the client's Expect was
        // answered by the proxy, which sends the body at once.
        if matches!(
            *name,
            header::CONTENT_LENGTH | header::TRANSFER_ENCODING | header::HOST | header::EXPECT
        ) {
            client_length |= *name == header::CONTENT_LENGTH;
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    for (name, value) in head.extra {
        if let Some(value) = value {
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }
    let framing = match body {
        PassBody::Buffered(b) => Framing::Length(b.len() as u64),
        PassBody::Streaming(s) => match s.size_hint().exact() {
            Some(n) => Framing::Length(n),
            None => Framing::Chunked,
        },
    };
    match framing {
        Framing::Length(0)
            if !client_length
                && !matches!(*head.method, Method::POST | Method::PUT | Method::PATCH) => {}
        Framing::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa_u64(n, &mut [0u8; 20]));
            out.extend_from_slice(b"\r\n");
        }
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    out.extend_from_slice(b"\r\n");
    framing
}

fn itoa_u64(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

enum WriteError {
    Body(BoxError),
    Io(std::io::Error),
}

/// Writes a request body while reading whatever the upstream sends meanwhile into
/// `conn.buf`. Ok(true): a complete final response head arrived before the body was all sent
/// (the rest is not sent; the connection cannot carry another request). Ok(false): the body was
/// sent whole. A write that fails because the upstream answered and closed counts as answered:
/// the answer is what the client gets, not a 502. So after a failed write the connection is
/// read to its end before the failure is reported (the answer may still be on its way: tokio
/// learns that the socket is readable only from the next event).
async fn write_body(
    conn: &mut Conn,
    mut body: PassBody,
    framing: Framing,
    mut sent: u64,
) -> Result<bool, WriteError> {
    // Bytes framed and not yet written, in order.
    let mut out: std::collections::VecDeque<Bytes> = std::collections::VecDeque::new();
    let mut body_done = false;
    let mut upstream_eof = false;
    let mut write_failed: Option<std::io::Error> = None;
    std::future::poll_fn(|cx| loop {
        // The upstream's side first: an answer stops the upload.
        while !upstream_eof {
            conn.buf.reserve(8 * 1024);
            match tokio_util::io::poll_read_buf(Pin::new(&mut conn.io), cx, &mut conn.buf) {
                Poll::Ready(Ok(0)) => upstream_eof = true,
                Poll::Ready(Ok(_)) => {
                    if final_head_ready(&conn.buf) {
                        return Poll::Ready(Ok(true));
                    }
                    if conn.buf.len() > MAX_HEAD {
                        // Garbage, not a head: left for the response parser to refuse.
                        return Poll::Ready(Ok(true));
                    }
                }
                // The write side will report it, or the response parser will.
                Poll::Ready(Err(_)) => upstream_eof = true,
                // After a failed write, only an answer or the end of the connection is awaited.
                Poll::Pending if write_failed.is_some() => return Poll::Pending,
                Poll::Pending => break,
            }
        }
        if let Some(e) = write_failed.take() {
            // The connection ended without a complete answer.
            return Poll::Ready(Err(WriteError::Io(e)));
        }
        if let Some(front) = out.front_mut() {
            match Pin::new(&mut conn.io).poll_write(cx, front) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(WriteError::Io(std::io::ErrorKind::WriteZero.into())))
                }
                Poll::Ready(Ok(n)) => {
                    front.advance(n);
                    if front.is_empty() {
                        out.pop_front();
                    }
                    continue;
                }
                Poll::Ready(Err(e)) => {
                    // An upstream that answered and closed resets the connection: its answer
                    // may still be readable.
                    write_failed = Some(e);
                    continue;
                }
                Poll::Pending => return Poll::Pending,
            }
        }
        if body_done {
            return match Pin::new(&mut conn.io).poll_flush(cx) {
                Poll::Ready(Ok(())) => Poll::Ready(Ok(false)),
                Poll::Ready(Err(e)) => Poll::Ready(Err(WriteError::Io(e))),
                Poll::Pending => Poll::Pending,
            };
        }
        match Pin::new(&mut body).poll_frame(cx) {
            Poll::Ready(None) => {
                match framing {
                    Framing::Length(n) if sent != n => {
                        return Poll::Ready(Err(WriteError::Body(
                            "request body shorter than announced".into(),
                        )))
                    }
                    Framing::Chunked => out.push_back(Bytes::from_static(b"0\r\n\r\n")),
                    Framing::Length(_) => {}
                }
                body_done = true;
            }
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(WriteError::Body(e))),
            Poll::Ready(Some(Ok(frame))) => {
                let Ok(data) = frame.into_data() else {
                    // Request trailers (the API uses none) are not forwarded.
                    continue;
                };
                if data.is_empty() {
                    continue;
                }
                sent += data.len() as u64;
                match framing {
                    Framing::Length(n) => {
                        if sent > n {
                            return Poll::Ready(Err(WriteError::Body(
                                "request body longer than announced".into(),
                            )));
                        }
                        out.push_back(data);
                    }
                    Framing::Chunked => {
                        out.push_back(Bytes::from(format!("{:x}\r\n", data.len())));
                        out.push_back(data);
                        out.push_back(Bytes::from_static(b"\r\n"));
                    }
                }
            }
            Poll::Pending => return Poll::Pending,
        }
    })
    .await
}

/// `buf` holds a complete final (not 1xx) response head, after any interim ones.
fn final_head_ready(buf: &[u8]) -> bool {
    let mut at = 0;
    loop {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(&buf[at..]) {
            Ok(httparse::Status::Complete(n)) => {
                if resp.code.is_some_and(|c| (100..200).contains(&c)) {
                    at += n;
                    continue;
                }
                return true;
            }
            Ok(httparse::Status::Partial) => return false,
            // Not a valid head: the response parser reports it.
            Err(_) => return true,
        }
    }
}

/// A parsed response head.
struct Parsed {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    kind: Kind,
    keep_alive: bool,
}

/// Parses a complete response head off the front of `buf`; None when more bytes are needed.
fn parse_head(buf: &mut BytesMut, method: &Method) -> Result<Option<Parsed>, String> {
    // Uninitialised: zeroing 100 slots would cost more than parsing a small head.
    let mut slots = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let n = match httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut resp, buf, &mut slots)
    {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("invalid upstream response head: {e}")),
    };
    // The reads before it are checked too, but one read can bring much more.
    if n > MAX_HEAD {
        return Err("upstream response head too large".into());
    }
    let code = resp.code.unwrap_or(0);
    let status =
        StatusCode::from_u16(code).map_err(|_| format!("invalid upstream status {code}"))?;
    let version = if resp.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    // Names and values are read back from the head's bytes once they are split off: values as
    // slices of them, not copies.
    let base = buf.as_ptr() as usize;
    let count = resp.headers.len();
    let (mut inline, mut heap) = ([(0, 0, 0, 0); crate::http1::INLINE_FIELDS], Vec::new());
    let spans = crate::http1::field_spans(base, n, resp.headers, &mut inline, &mut heap);
    let bytes = buf.split_to(n).freeze();
    // Room for what the proxy adds on the way back (request id, rewritten links), so the map
    // is not grown (rehashed) per response.
    let mut headers = crate::http1::header_map(count + 4);
    // The fields that decide framing and reuse are read as the map is built: looking them up
    // afterwards would hash their names again, several times per response.
    let mut conn_close = false;
    let mut te_codings = 0u32;
    let mut te_chunked_only = true;
    let mut cl_seen = false;
    let mut cl: Result<Option<u64>, &'static str> = Ok(None);
    for &(ns, ne, vs, ve) in spans {
        let raw_name = &bytes[ns as usize..ne as usize];
        let name = HeaderName::from_bytes(raw_name).map_err(|_| {
            format!(
                "invalid upstream header name {:?}",
                String::from_utf8_lossy(raw_name)
            )
        })?;
        let raw = &bytes[vs as usize..ve as usize];
        if name == header::CONNECTION {
            let mut names_fields = false;
            for t in raw.split(|b| *b == b',').map(|t| t.trim_ascii()) {
                let close = t.eq_ignore_ascii_case(b"close");
                conn_close |= close;
                names_fields |= !(close || t.is_empty() || t.eq_ignore_ascii_case(b"keep-alive"));
            }
            // Hop-by-hop: consumed here. Kept in the map only when it names fields that must
            // be stripped with it (headers::strip_hop_by_hop).
            if !names_fields {
                continue;
            }
        } else if name == header::TRANSFER_ENCODING {
            for c in raw.split(|b| *b == b',').map(|c| c.trim_ascii()) {
                te_codings += 1;
                te_chunked_only &= c.eq_ignore_ascii_case(b"chunked");
            }
        } else if name == header::CONTENT_LENGTH {
            cl_seen = true;
            for part in raw.split(|b| *b == b',') {
                cl = match (cl, parse_length(part.trim_ascii())) {
                    (Err(e), _) => Err(e),
                    (_, None) => Err("invalid upstream Content-Length"),
                    (Ok(Some(l)), Some(n)) if l != n => Err("differing upstream Content-Lengths"),
                    (Ok(_), Some(n)) => Ok(Some(n)),
                };
            }
        }
        let value = HeaderValue::from_maybe_shared(bytes.slice(vs as usize..ve as usize))
            .map_err(|_| format!("invalid upstream header value for {name}"))?;
        headers.append(name, value);
    }

    let mut keep_alive = version == Version::HTTP_11 && !conn_close;
    let kind = if *method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        Kind::Length(0)
    } else if te_codings > 0 {
        // Any other coding would reach the client undeclared once the proxy re-frames the body
        // (Transfer-Encoding is hop-by-hop), and the proxy decodes none.
        if !(te_chunked_only && te_codings == 1) {
            return Err("upstream Transfer-Encoding other than chunked".into());
        }
        // RFC 9112 6.1: Transfer-Encoding overrides Content-Length, and such a message must not
        // leave the connection reusable.
        if cl_seen {
            headers.remove(header::CONTENT_LENGTH);
            keep_alive = false;
        }
        Kind::Chunked(Chunk::Size)
    } else if cl_seen {
        Kind::Length(cl.map_err(str::to_string)?.unwrap_or(0))
    } else {
        keep_alive = false;
        Kind::Close
    };
    Ok(Some(Parsed {
        status,
        version,
        headers,
        kind,
        keep_alive,
    }))
}

impl Parsed {
    fn into_response(self, conn: Box<Conn>, idle: &std::sync::Arc<Idle>) -> Response<Body> {
        let mut body = Body {
            reading: Some(Reading {
                conn,
                kind: self.kind,
                keep_alive: self.keep_alive,
                idle: idle.clone(),
                read_size: READ_MIN,
            }),
        };
        if let Some(Reading {
            kind: Kind::Length(0),
            ..
        }) = &body.reading
        {
            body.finish();
        }
        let mut resp = Response::new(body);
        *resp.status_mut() = self.status;
        *resp.version_mut() = self.version;
        *resp.headers_mut() = self.headers;
        resp
    }
}

/// How the rest of the response body is delimited.
enum Kind {
    Length(u64),
    Chunked(Chunk),
    Close,
}

struct Reading {
    conn: Box<Conn>,
    kind: Kind,
    keep_alive: bool,
    idle: std::sync::Arc<Idle>,
    read_size: usize,
}

/// A response body read from the upstream connection as it is polled. When the body ends
/// cleanly on a reusable connection, the connection goes back to the pool; dropped midway,
/// the connection is closed.
pub struct Body {
    reading: Option<Reading>,
}

impl Body {
    fn finish(&mut self) {
        if let Some(r) = self.reading.take() {
            if r.keep_alive && r.conn.buf.is_empty() {
                r.idle.checkin(r.conn);
            }
        }
    }
}

impl Body {
    /// The rest of the body can be spliced to the client (`crate::splice`): a Content-Length
    /// body with bytes to go, none of them in the read buffer, on a plain TCP connection.
    pub fn can_splice(&self) -> bool {
        self.reading.as_ref().is_some_and(|r| {
            matches!(r.kind, Kind::Length(n) if n > 0)
                && r.conn.buf.is_empty()
                && r.conn.tcp().is_some()
        })
    }
}

impl crate::splice::Source for Body {
    type Error = BoxError;

    fn poll_fill(
        &mut self,
        cx: &mut Context<'_>,
        pipe: &mut crate::splice::Pipe,
    ) -> Poll<Result<usize, BoxError>> {
        let Some(r) = self.reading.as_mut() else {
            return Poll::Ready(Ok(0));
        };
        let (Kind::Length(left), Some(tcp)) = (&mut r.kind, r.conn.tcp()) else {
            return Poll::Ready(Err("response body cannot be spliced".into()));
        };
        match ready!(pipe.poll_fill(cx, tcp, left)) {
            Ok(0) if *left > 0 => fail_fill(self, truncated()),
            Ok(n) => {
                if *left == 0 {
                    // All of it read: the connection is at a message boundary again.
                    self.finish();
                }
                Poll::Ready(Ok(n))
            }
            Err(e) => fail_fill(self, e.into()),
        }
    }
}

fn fail_fill(body: &mut Body, e: BoxError) -> Poll<Result<usize, BoxError>> {
    body.reading = None;
    Poll::Ready(Err(e))
}

/// Reads more of the socket into the connection's buffer; Ok(0) at end of stream.
fn poll_fill(
    conn: &mut Conn,
    read_size: &mut usize,
    cx: &mut Context<'_>,
) -> Poll<std::io::Result<usize>> {
    conn.buf.reserve(*read_size);
    let n = ready!(tokio_util::io::poll_read_buf(
        Pin::new(&mut conn.io),
        cx,
        &mut conn.buf
    ))?;
    if n >= *read_size {
        *read_size = (*read_size * 2).min(READ_MAX);
    }
    Poll::Ready(Ok(n))
}

fn truncated() -> BoxError {
    "the upstream closed the connection before the end of the response body".into()
}

/// Reads more of a body that is not over yet: the connection closing now truncates it.
fn poll_more(r: &mut Reading, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
    match ready!(poll_fill(&mut r.conn, &mut r.read_size, cx)) {
        Ok(0) => Poll::Ready(Err(truncated())),
        Ok(_) => Poll::Ready(Ok(())),
        Err(e) => Poll::Ready(Err(e.into())),
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            let Some(r) = this.reading.as_mut() else {
                return Poll::Ready(None);
            };
            match &mut r.kind {
                Kind::Length(0) => {
                    this.finish();
                    continue;
                }
                Kind::Length(left) => {
                    if !r.conn.buf.is_empty() {
                        let data = take(&mut r.conn.buf, left);
                        if *left == 0 {
                            this.finish();
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                Kind::Close => {
                    if !r.conn.buf.is_empty() {
                        let data = r.conn.buf.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    match ready!(poll_fill(&mut r.conn, &mut r.read_size, cx)) {
                        Ok(0) => {
                            this.reading = None;
                            return Poll::Ready(None);
                        }
                        Ok(_) => continue,
                        Err(e) => return fail(this, e.into()),
                    }
                }
                Kind::Chunked(state) => match state.decode(&mut r.conn.buf, MAX_HEAD) {
                    Decoded::Data(data) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Decoded::End => {
                        this.finish();
                        return Poll::Ready(None);
                    }
                    Decoded::More => {}
                    Decoded::Invalid(why) => {
                        return fail(this, format!("upstream response body: {why}").into())
                    }
                },
            }
            if let Err(e) = ready!(poll_more(r, cx)) {
                return fail(this, e);
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.reading.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.reading {
            None => SizeHint::with_exact(0),
            Some(Reading {
                kind: Kind::Length(n),
                ..
            }) => SizeHint::with_exact(*n),
            Some(_) => SizeHint::default(),
        }
    }
}

fn fail(body: &mut Body, e: BoxError) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
    body.reading = None;
    Poll::Ready(Some(Err(e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head_for(
        method: Method,
        headers: &[(&'static str, &'static str)],
        body: PassBody,
    ) -> String {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(*k, HeaderValue::from_static(v));
        }
        let host = HeaderValue::from_static("api.example");
        let token = HeaderValue::from_static("Bearer t");
        let extra = [
            (HeaderName::from_static("authorizationtoken"), Some(&token)),
            (HeaderName::from_static("x-satellogic-contract-id"), None),
        ];
        let head = Head {
            method: &method,
            path_and_query: "/a?b=c",
            host: &host,
            headers: &map,
            extra: &extra,
        };
        let mut out = Vec::new();
        write_head(&mut out, &head, &body);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn request_heads_carry_the_proxys_framing_and_host_only() {
        let h = head_for(
            Method::GET,
            &[
                ("host", "client.example"),
                ("expect", "100-continue"),
                ("transfer-encoding", "chunked"),
                ("x-keep", "1"),
            ],
            PassBody::Buffered(Bytes::new()),
        );
        assert_eq!(
            h,
            "GET /a?b=c HTTP/1.1\r\nhost: api.example\r\nx-keep: 1\r\nauthorizationtoken: Bearer t\r\n\r\n"
        );
        let h = head_for(Method::POST, &[], PassBody::Buffered(Bytes::new()));
        assert!(h.ends_with("content-length: 0\r\n\r\n"), "{h}");
        let h = head_for(
            Method::PUT,
            &[("content-length", "999")],
            PassBody::Buffered(Bytes::from_static(b"12345")),
        );
        assert!(h.ends_with("\r\ncontent-length: 5\r\n\r\n"), "{h}");
        assert_eq!(h.matches("content-length").count(), 1, "{h}");
    }

    #[test]
    fn responses_with_many_fields_keep_them_all() {
        let mut raw = String::from("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n");
        for i in 0..60 {
            raw.push_str(&format!("x-f{i}: v{i}\r\n"));
        }
        raw.push_str("\r\n");
        let mut buf = BytesMut::from(raw.as_str());
        let p = parse_head(&mut buf, &Method::GET).unwrap().unwrap();
        assert_eq!(p.headers.len(), 61);
        assert_eq!(p.headers["x-f59"], "v59");
    }

    #[test]
    fn connection_is_consumed_unless_it_names_fields() {
        let headers = |raw: &str| {
            let mut buf = BytesMut::from(raw);
            let p = parse_head(&mut buf, &Method::GET).unwrap().unwrap();
            (p.headers, p.keep_alive)
        };
        let (h, keep) =
            headers("HTTP/1.1 200 OK\r\nconnection: keep-alive\r\ncontent-length: 0\r\n\r\n");
        assert!(h.get("connection").is_none());
        assert!(keep);
        let (h, keep) = headers(
            "HTTP/1.1 200 OK\r\nconnection: close, x-drop\r\nx-drop: 1\r\ncontent-length: 0\r\n\r\n",
        );
        assert_eq!(h["connection"], "close, x-drop");
        assert!(!keep);
    }

    #[test]
    fn an_early_answer_is_a_complete_final_head() {
        // Partial heads wait for more bytes.
        assert!(!final_head_ready(b""));
        assert!(!final_head_ready(
            b"HTTP/1.1 413 Payload Too Large\r\nContent-Le"
        ));
        // Interim answers are not the answer.
        assert!(!final_head_ready(b"HTTP/1.1 100 Continue\r\n\r\n"));
        assert!(!final_head_ready(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
        ));
        // A final head, alone or after interim ones, with or without some of its body.
        assert!(final_head_ready(
            b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 2\r\n\r\n"
        ));
        assert!(final_head_ready(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 401 Unauthorized\r\nContent-Length: 2\r\n\r\n{}"
        ));
        // Garbage stops the upload too: the response parser then refuses it (a 502).
        assert!(final_head_ready(b"SSH-2.0-OpenSSH_9.6\r\n\r\n"));
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let parse = |raw: &str, method: Method| {
            let mut buf = BytesMut::from(raw);
            parse_head(&mut buf, &method).map(|p| p.map(|p| (p.kind, p.keep_alive)))
        };
        let kind = |raw: &str| match parse(raw, Method::GET) {
            Ok(Some((Kind::Length(n), ka))) => format!("length {n} {ka}"),
            Ok(Some((Kind::Chunked(_), ka))) => format!("chunked {ka}"),
            Ok(Some((Kind::Close, ka))) => format!("close {ka}"),
            Ok(None) => "partial".into(),
            Err(e) => format!("error {e}"),
        };
        assert_eq!(
            kind("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"),
            "length 5 true"
        );
        assert_eq!(kind("HTTP/1.1 200 OK\r\ncontent-length: 5"), "partial");
        assert_eq!(
            kind("HTTP/1.1 200 OK\r\ntransfer-encoding: Chunked\r\n\r\n"),
            "chunked true"
        );
        // Codings the proxy would pass on undeclared, and lists, are refused.
        for te in [
            "gzip, chunked",
            "chunked, gzip",
            "gzip",
            "chunked, chunked",
            "chunked\r\ntransfer-encoding: chunked",
            "chunked,",
            "identity",
        ] {
            let raw = format!("HTTP/1.1 200 OK\r\ntransfer-encoding: {te}\r\n\r\n");
            assert_eq!(
                kind(&raw),
                "error upstream Transfer-Encoding other than chunked",
                "{te}"
            );
        }
        // Not for a response without a body: its fields describe the body a GET would get.
        assert!(matches!(
            parse(
                "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
                Method::HEAD
            ),
            Ok(Some((Kind::Length(0), true)))
        ));
        assert_eq!(
            kind("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n"),
            "chunked false"
        );
        assert_eq!(kind("HTTP/1.1 200 OK\r\n\r\n"), "close false");
        assert_eq!(
            kind("HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n"),
            "length 1 false"
        );
        assert_eq!(
            kind("HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 1\r\n\r\n"),
            "length 1 false"
        );
        assert_eq!(kind("HTTP/1.1 204 No Content\r\n\r\n"), "length 0 true");
        assert_eq!(
            kind("HTTP/1.1 304 Not Modified\r\ncontent-length: 50\r\n\r\n"),
            "length 0 true"
        );
        assert!(kind("HTTP/1.1 200 OK\r\ncontent-length: 1, 2\r\n\r\n").starts_with("error"));
        assert!(kind("HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n").starts_with("error"));
        assert!(kind("HTTP/1.1 200 OK\r\ncontent-length: +2\r\n\r\n").starts_with("error"));
        assert!(kind("HTTP/1.1 200 OK\r\ncontent-length: 0x2\r\n\r\n").starts_with("error"));
        // A head over the limit is refused whole, however it arrived.
        let fields: String = (0..90)
            .map(|i| format!("x-f{i}: {}\r\n", "a".repeat(1000)))
            .collect();
        assert_eq!(
            kind(&format!(
                "HTTP/1.1 200 OK\r\n{fields}content-length: 0\r\n\r\n"
            )),
            "error upstream response head too large"
        );
        assert!(kind("HTTP/1.1 200 OK\r\nbad header\r\n\r\n").starts_with("error"));
        assert!(matches!(
            parse("HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n", Method::HEAD),
            Ok(Some((Kind::Length(0), true)))
        ));
    }
}
