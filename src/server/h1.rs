//! HTTP/1.1 client connections, served in the connection's own task.
//!
//! One task per connection reads a request head, calls the handler, and writes the response
//! while it is polled for body data; the request body is read from the socket when the handler
//! (the upstream writer) asks for the next chunk. There is no dispatch channel and no timer per
//! request: the header, keep-alive and write timeouts share one timer per connection, which only
//! moves when it fires (the write timeout only when a write has to wait). BENCHMARKS.md has what
//! that bought against hyper's server connection.
//!
//! Parsing is httparse's (the parser inside hyper). The message framing of RFC 9112 section 6
//! and its request-smuggling defences are here:
//! - a request line longer than `limits.max_request_header_bytes`: 414;
//! - a head larger than that or with more than 100 fields: 431;
//! - anything httparse refuses (bad bytes, obs-fold, spaces before the colon): 400;
//! - an HTTP/1.1 request without Host, or any request with more than one Host field: 400;
//! - Transfer-Encoding other than exactly `chunked`, or in an HTTP/1.0 request: 400;
//! - Transfer-Encoding with Content-Length: read as chunked, the length dropped, the connection
//!   closed after the response (RFC 9112 6.3);
//! - differing Content-Lengths (repeated or as a list), or one that is not digits only: 400;
//! - a chunked body that breaks RFC 9112 section 7.1 to the letter (a chunk-size line without
//!   digits, with bytes other than extensions after the size, a trailer line that is not a field
//!   line, a line ending in a bare LF: `crate::http1`) fails the body: the proxy answers 400 and
//!   closes the connection.
//!
//! Every refusal is the proxy's JSON error and closes the connection; nothing of a refused
//! request reaches the handler. An HTTP/2 preface and a head that never completes (timeout, end
//! of stream) are closed without an answer. A client that takes nothing of its response for
//! `timeouts.body_idle` has the response cut and the connection reset, which frees the request's
//! in-flight slot and closes its upstream connection.

use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body as _, Frame, SizeHint};
use tokio::io::AsyncWrite;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use crate::body::{BoxError, ProxyBody};
use crate::error::ProxyError;
use crate::http1::{parse_length, span, take, Chunk, Decoded};
use crate::splice;

/// Request header fields at most (hyper's limit); more is a 431.
const MAX_HEADERS: usize = 100;
/// Bytes asked of the socket per read while a head is incomplete.
const READ_HEAD: usize = 8 * 1024;
/// Bytes asked of the socket per read of a request body: at first, and at most. A read that
/// fills what was asked doubles the next one (large uploads move in large reads).
const READ_MIN: usize = 64 * 1024;
const READ_MAX: usize = 1024 * 1024;
/// Response body chunks up to this size are copied next to the head (or the chunk before), so a
/// small response leaves in one write; larger ones go out with a vectored write.
const COALESCE: usize = 32 * 1024;
/// A request body the handler left unread (an error answered before the upload) is read and
/// discarded up to this size and time so the connection can be reused; past it, closed.
const DRAIN_LIMIT: u64 = 1024 * 1024;
const DRAIN_TIME: Duration = Duration::from_secs(1);
/// Before closing a connection whose client may still be sending, the proxy stops writing and
/// discards input for this long at most, so the client reads the response before a reset.
const LINGER_TIME: Duration = Duration::from_secs(2);
const LINGER_LIMIT: usize = 4 * 1024 * 1024;
/// Trailer section of a chunked request body at most.
const MAX_TRAILERS: usize = 16 * 1024;
const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// Connection-level limits of one listener.
#[derive(Debug, Clone)]
pub struct Limits {
    /// A request head must be complete this long after its first byte (after the connection
    /// opened, for the first request).
    pub header_timeout: Duration,
    /// A keep-alive connection with no request this long after the last response is closed.
    pub idle_timeout: Duration,
    /// Request heads larger than this are refused with 431.
    pub max_head: usize,
    /// A response write the client takes nothing of for this long cuts the response and closes
    /// the connection (`timeouts.body_idle`, the pause allowed between body chunks).
    pub body_idle: Duration,
}

/// The client's request body failed: cut short, malformed framing, or read after its request
/// was over. The client's fault: the proxy answers 400, never a 502 that blames the upstream.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ClientBodyError(&'static str);

/// The socket halves and the read buffer, shared by the connection and the body of the request
/// being served (the body reads the socket when polled; the connection between requests).
struct Io {
    rd: OwnedReadHalf,
    wr: OwnedWriteHalf,
    buf: BytesMut,
    /// The request whose body `framing` describes.
    generation: u64,
    framing: Framing,
    /// Bytes of `100 Continue` still to send before the body is read (0: none owed).
    continue_left: usize,
    read_size: usize,
}

/// What is left of the request body being read.
#[derive(Debug)]
enum Framing {
    Length(u64),
    Chunked(Chunk),
    Done,
    Failed,
}

fn lock(io: &Mutex<Io>) -> MutexGuard<'_, Io> {
    io.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Io {
    /// Reads more of the socket into the buffer; Ok(0) at end of stream.
    fn poll_fill(&mut self, want: usize, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        self.buf.reserve(want);
        tokio_util::io::poll_read_buf(Pin::new(&mut self.rd), cx, &mut self.buf)
    }

    /// Sends what is left of `100 Continue`.
    fn poll_continue(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while self.continue_left > 0 {
            let from = CONTINUE.len() - self.continue_left;
            let n = ready!(Pin::new(&mut self.wr).poll_write(cx, &CONTINUE[from..]))?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            self.continue_left -= n;
        }
        Poll::Ready(Ok(()))
    }

    fn fail(&mut self, why: &'static str) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.framing = Framing::Failed;
        Poll::Ready(Some(Err(Box::new(ClientBodyError(why)))))
    }

    /// The next piece of the request body.
    fn poll_body(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.continue_left > 0 && ready!(self.poll_continue(cx)).is_err() {
            return self.fail("the client connection failed");
        }
        loop {
            match &mut self.framing {
                Framing::Done => return Poll::Ready(None),
                Framing::Failed => {
                    return Poll::Ready(Some(Err(Box::new(ClientBodyError(
                        "the request body failed",
                    )))))
                }
                Framing::Length(left) => {
                    if !self.buf.is_empty() {
                        let data = take(&mut self.buf, left);
                        if *left == 0 {
                            self.framing = Framing::Done;
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                Framing::Chunked(state) => match state.decode(&mut self.buf, MAX_TRAILERS) {
                    Decoded::Data(data) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Decoded::End => {
                        self.framing = Framing::Done;
                        return Poll::Ready(None);
                    }
                    Decoded::More => {}
                    Decoded::Invalid(why) => return self.fail(why),
                },
            }
            let want = self.read_size;
            match ready!(self.poll_fill(want, cx)) {
                Ok(0) => return self.fail("the client closed the connection mid-body"),
                Ok(n) => {
                    if n >= want {
                        self.read_size = (want * 2).min(READ_MAX);
                    }
                }
                Err(_) => return self.fail("the client connection failed mid-body"),
            }
        }
    }
}

/// A request body, read from the client connection as it is polled.
pub struct RequestBody {
    io: Option<Arc<Mutex<Io>>>,
    generation: u64,
}

impl RequestBody {
    fn empty() -> RequestBody {
        RequestBody {
            io: None,
            generation: 0,
        }
    }
}

impl http_body::Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let Some(io) = &this.io else {
            return Poll::Ready(None);
        };
        let mut g = lock(io);
        if g.generation != this.generation {
            // Its request is over and the connection moved on: the bytes are not this body's.
            drop(g);
            this.io = None;
            return Poll::Ready(Some(Err(Box::new(ClientBodyError(
                "the request body was read after its request ended",
            )))));
        }
        let r = g.poll_body(cx);
        if matches!(r, Poll::Ready(None)) {
            drop(g);
            this.io = None;
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        match &self.io {
            None => true,
            Some(io) => {
                let g = lock(io);
                g.generation != self.generation || matches!(g.framing, Framing::Done)
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        let Some(io) = &self.io else {
            return SizeHint::with_exact(0);
        };
        let g = lock(io);
        match g.framing {
            Framing::Length(n) if g.generation == self.generation => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

/// A head the connection refuses.
#[derive(Debug)]
enum Refusal {
    /// 400 with this detail.
    Bad(String),
    /// 431.
    TooLarge,
    /// 414: the request line alone is longer than the head may be.
    TargetTooLong,
    /// Closed without an answer (an HTTP/2 preface).
    Silent,
}

/// A parsed request head.
struct Head {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
    framing: Framing,
    keep_alive: bool,
    expect_continue: bool,
}

fn bad(detail: impl Into<String>) -> Refusal {
    Refusal::Bad(detail.into())
}

/// A head over `max_head` bytes: 414 when its request line alone is (RFC 9112 section 3), else
/// 431.
fn too_large(buf: &[u8], max_head: usize) -> Refusal {
    // Empty lines before the request line are skipped by the parser, and by this count.
    let start = buf
        .iter()
        .take_while(|b| matches!(b, b'\r' | b'\n'))
        .count();
    let window = &buf[start..buf.len().min(start + max_head)];
    if memchr::memchr(b'\n', window).is_none() {
        Refusal::TargetTooLong
    } else {
        Refusal::TooLarge
    }
}

/// Parses a complete request head off the front of `buf`; None when more bytes are needed.
fn parse_head(buf: &mut BytesMut, max_head: usize) -> Result<Option<Head>, Refusal> {
    // Uninitialised: zeroing 100 slots would cost more than parsing a small head.
    let mut slots = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let n = match req.parse_with_uninit_headers(buf, &mut slots) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > max_head => {
            return Err(too_large(buf, max_head))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Refusal::TooLarge),
        Err(httparse::Error::Version) if buf.starts_with(b"PRI * HTTP/2.0") => {
            return Err(Refusal::Silent)
        }
        Err(e) => return Err(bad(format!("malformed request head: {e}"))),
    };
    if n > max_head {
        return Err(too_large(buf, max_head));
    }
    let method = Method::from_bytes(req.method.unwrap_or("").as_bytes())
        .map_err(|_| bad("malformed request method"))?;
    let version = match req.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    // The target, names and values are read back from the head's bytes once they are split
    // off: the target and values as slices of them, not copies.
    let base = buf.as_ptr() as usize;
    let target = span(base, n, req.path.unwrap_or("").as_bytes());
    let count = req.headers.len();
    let (mut inline, mut heap) = ([(0, 0, 0, 0); crate::http1::INLINE_FIELDS], Vec::new());
    let spans = crate::http1::field_spans(base, n, req.headers, &mut inline, &mut heap);
    let bytes = buf.split_to(n).freeze();
    if target.0 == target.1 {
        return Err(bad("empty request target"));
    }
    let uri = Uri::from_maybe_shared(bytes.slice(target.0 as usize..target.1 as usize))
        .map_err(|_| bad("malformed request target"))?;
    // Room for the headers the proxy injects (token, contract, request id), so the map is not
    // grown (rehashed) per request.
    let mut headers = crate::http1::header_map(count + 4);
    // The fields that decide framing and keep-alive are read as the map is built: looking them
    // up afterwards would hash their names again, several times per request.
    let mut conn_close = false;
    let mut conn_keep_alive = false;
    let mut te_codings = 0u32;
    let mut te_chunked_only = true;
    let mut cl_values = 0u32;
    let mut cl: Result<Option<u64>, &'static str> = Ok(None);
    let mut expect_continue = false;
    let mut hosts = 0u32;
    for &(ns, ne, vs, ve) in spans {
        let name = HeaderName::from_bytes(&bytes[ns as usize..ne as usize])
            .map_err(|_| bad("malformed request header name"))?;
        let raw = &bytes[vs as usize..ve as usize];
        if name == header::HOST {
            hosts += 1;
        } else if name == header::CONNECTION {
            let mut names_fields = false;
            for t in raw.split(|b| *b == b',').map(|t| t.trim_ascii()) {
                let close = t.eq_ignore_ascii_case(b"close");
                let keep = t.eq_ignore_ascii_case(b"keep-alive");
                conn_close |= close;
                conn_keep_alive |= keep;
                names_fields |= !(close || keep || t.is_empty());
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
            for part in raw.split(|b| *b == b',') {
                cl_values += 1;
                cl = match (cl, parse_length(part.trim_ascii())) {
                    (Err(e), _) => Err(e),
                    (_, None) => Err("malformed Content-Length"),
                    (Ok(Some(l)), Some(n)) if l != n => Err("differing Content-Lengths"),
                    (Ok(_), Some(n)) => Ok(Some(n)),
                };
            }
        } else if name == header::EXPECT {
            // Answered here (100 Continue when the body is first read), never forwarded.
            expect_continue =
                version == Version::HTTP_11 && raw.eq_ignore_ascii_case(b"100-continue");
            continue;
        }
        let value = HeaderValue::from_maybe_shared(bytes.slice(vs as usize..ve as usize))
            .map_err(|_| bad("malformed request header value"))?;
        headers.append(name, value);
    }
    // RFC 9112 section 3.2: exactly one Host in HTTP/1.1, at most one in HTTP/1.0.
    if hosts > 1 {
        return Err(bad("more than one Host header field"));
    }
    if hosts == 0 && version == Version::HTTP_11 {
        return Err(bad("an HTTP/1.1 request needs a Host header field"));
    }

    let mut keep_alive = if version == Version::HTTP_11 {
        !conn_close
    } else {
        conn_keep_alive && !conn_close
    };
    let framing = if te_codings > 0 {
        if version == Version::HTTP_10 {
            return Err(bad(
                "Transfer-Encoding is not allowed in an HTTP/1.0 request",
            ));
        }
        if !(te_chunked_only && te_codings == 1) {
            return Err(bad(
                "only Transfer-Encoding: chunked is accepted in a request",
            ));
        }
        // RFC 9112 6.3: chunked wins, and such a message must not leave the connection open.
        if cl_values > 0 {
            headers.remove(header::CONTENT_LENGTH);
            keep_alive = false;
        }
        Framing::Chunked(Chunk::Size)
    } else if cl_values > 0 {
        let length = cl.map_err(bad)?.unwrap_or(0);
        if cl_values > 1 {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
        }
        if length == 0 {
            Framing::Done
        } else {
            Framing::Length(length)
        }
    } else {
        Framing::Done
    };
    Ok(Some(Head {
        method,
        uri,
        version,
        headers,
        framing,
        keep_alive,
        expect_continue,
    }))
}

fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.as_bytes()
            .split(|b| *b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    })
}

/// One timer per connection for the header and keep-alive timeouts. Moving the deadline later
/// costs nothing; the timer notices when it fires early and sleeps again until the real deadline.
struct Deadline {
    sleep: Pin<Box<Sleep>>,
    at: Instant,
    /// The timer holds this task's waker: until it fires, checking `is_elapsed` is enough.
    armed: bool,
}

impl Deadline {
    fn new(at: Instant) -> Deadline {
        Deadline {
            sleep: Box::pin(tokio::time::sleep_until(at)),
            at,
            armed: false,
        }
    }

    fn set(&mut self, at: Instant) {
        if at < self.sleep.deadline() {
            self.sleep.as_mut().reset(at);
            self.armed = false;
        }
        self.at = at;
    }

    /// The connection's task is the only one ever polling this timer, so once a poll has
    /// registered its waker, the timer wakes the task when it fires: until then no poll is needed.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> bool {
        if self.armed && !self.sleep.is_elapsed() {
            return false;
        }
        loop {
            if self.sleep.as_mut().poll(cx).is_pending() {
                self.armed = true;
                return false;
            }
            if Instant::now() >= self.at {
                return true;
            }
            self.sleep.as_mut().reset(self.at);
        }
    }
}

/// How the response body is delimited on the wire.
#[derive(Clone, Copy, PartialEq)]
enum Out {
    /// No body (HEAD, 1xx, 204, 304).
    None,
    Length(u64),
    Chunked,
    /// Until the connection closes (an HTTP/1.0 client and a body of unknown length).
    Close,
}

/// Why the response could not be written completely.
enum WriteFailed {
    /// The client connection failed.
    Io,
    /// The response body failed midway: the client must see a cut, not a complete response.
    Body,
    /// The client took nothing of a write for `limits.body_idle`.
    Stalled,
}

/// Bounds the wait of one client write (flush, vectored write, splice) by `limits.body_idle`
/// without progress, on the connection's one timer. A write that completes at once (the usual
/// case) costs nothing more: the clock is read and the timer moved only when a write has to
/// wait after some progress.
struct Stall<'a> {
    deadline: &'a mut Deadline,
    idle: Duration,
    /// The deadline is set for the current wait.
    waiting: bool,
}

impl<'a> Stall<'a> {
    fn new(deadline: &'a mut Deadline, idle: Duration) -> Stall<'a> {
        Stall {
            deadline,
            idle,
            waiting: false,
        }
    }

    /// The client took some bytes.
    fn progressed(&mut self) {
        self.waiting = false;
    }

    /// The write has to wait: true when it has waited `idle` since the last progress.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.waiting {
            self.waiting = true;
            self.deadline.set(Instant::now() + self.idle);
        }
        self.deadline.poll_expired(cx)
    }

    /// What a pending write gives its poll: Pending, or the stall once it expired.
    fn pending<T>(&mut self, cx: &mut Context<'_>) -> Poll<Result<T, WriteFailed>> {
        if self.expired(cx) {
            Poll::Ready(Err(WriteFailed::Stalled))
        } else {
            Poll::Pending
        }
    }
}

struct Conn {
    io: Arc<Mutex<Io>>,
    out: Vec<u8>,
    limits: Arc<Limits>,
    deadline: Deadline,
    /// The shutdown signal has this task's waker.
    cancel_armed: bool,
}

/// Serves one client connection until it closes, fails, times out or `cancel` fires between
/// requests. `handler` answers every request the connection accepted.
pub async fn serve<H, F>(
    stream: TcpStream,
    limits: Arc<Limits>,
    cancel: tokio_util::sync::CancellationToken,
    mut handler: H,
) where
    H: FnMut(Request<RequestBody>) -> F,
    F: Future<Output = Result<Response<ProxyBody>, std::convert::Infallible>>,
{
    let (rd, wr) = stream.into_split();
    let io = Arc::new(Mutex::new(Io {
        rd,
        wr,
        buf: BytesMut::new(),
        generation: 0,
        framing: Framing::Done,
        continue_left: 0,
        read_size: READ_MIN,
    }));
    // The first request's head is due `header_timeout` after the connection opened.
    let deadline = Deadline::new(Instant::now() + limits.header_timeout);
    let mut conn = Conn {
        io,
        out: Vec::new(),
        limits,
        deadline,
        cancel_armed: false,
    };
    let mut cancelled = pin!(cancel.clone().cancelled_owned());
    let mut first = true;
    let mut generation = 0u64;
    loop {
        let head = match conn.read_head(first, &cancel, cancelled.as_mut()).await {
            Ok(Some(head)) => head,
            Ok(None) => return,
            Err(refusal) => return conn.refuse(refusal).await,
        };
        first = false;
        generation += 1;
        let body = {
            let mut g = lock(&conn.io);
            g.generation = generation;
            g.read_size = READ_MIN;
            g.continue_left = 0;
            if matches!(head.framing, Framing::Done) {
                g.framing = Framing::Done;
                RequestBody::empty()
            } else {
                if head.expect_continue {
                    g.continue_left = CONTINUE.len();
                }
                g.framing = head.framing;
                RequestBody {
                    io: Some(conn.io.clone()),
                    generation,
                }
            }
        };
        let is_head = head.method == Method::HEAD;
        let version = head.version;
        let mut req = Request::new(body);
        *req.method_mut() = head.method;
        *req.uri_mut() = head.uri;
        *req.version_mut() = head.version;
        *req.headers_mut() = head.headers;

        // Pinned where it is made: the handler's future is large, and moving it costs a copy.
        let fut = pin!(handler(req));
        let Some(resp) = conn.respond(fut).await else {
            // The client closed its connection while waiting: the request is abandoned.
            return;
        };
        let Ok(resp) = resp;

        // What is left of the request body decides whether the connection can go on.
        let leftover = {
            let g = lock(&conn.io);
            match g.framing {
                Framing::Done => Leftover::None,
                Framing::Length(n) if g.continue_left == 0 && n <= DRAIN_LIMIT => Leftover::Drain,
                Framing::Chunked(_) if g.continue_left == 0 => Leftover::Drain,
                _ => Leftover::Unread,
            }
        };
        let keep_alive = head.keep_alive
            && leftover != Leftover::Unread
            && !has_token(resp.headers(), header::CONNECTION, "close")
            && !cancel.is_cancelled();
        // An HTTP/1.0 client reads a body of unknown length until the connection closes: when
        // such a body fails midway, only a reset tells it the response was cut.
        let until_close = version != Version::HTTP_11 && resp.body().size_hint().exact().is_none();
        let kept = match conn
            .write_response(resp, is_head, version, keep_alive)
            .await
        {
            Ok(kept) => kept,
            Err(WriteFailed::Io) => return,
            Err(WriteFailed::Stalled) => return conn.abort(Abort::Stalled),
            Err(WriteFailed::Body) if until_close => return conn.abort(Abort::Cut),
            Err(WriteFailed::Body) => false,
        };
        if !kept {
            return conn.close(leftover != Leftover::None).await;
        }
        if leftover == Leftover::Drain && !conn.drain(generation).await {
            return conn.close(true).await;
        }
    }
}

/// Why a connection is reset ([`Conn::abort`]).
enum Abort {
    Stalled,
    Cut,
}

#[derive(PartialEq)]
enum Leftover {
    None,
    /// Small enough to read and discard.
    Drain,
    /// Too large, or never asked for (`100 Continue` not sent): the connection closes.
    Unread,
}

impl Conn {
    /// Waits for the next request head. Ok(None): the connection is over without an answer
    /// (closed, failed, timed out, shutting down while idle).
    async fn read_head(
        &mut self,
        first: bool,
        cancel: &tokio_util::sync::CancellationToken,
        mut cancelled: Pin<&mut tokio_util::sync::WaitForCancellationFutureOwned>,
    ) -> Result<Option<Head>, Refusal> {
        let max_head = self.limits.max_head;
        // Waiting on an idle connection: the keep-alive timeout until a byte arrives, then the
        // header timeout.
        let mut idle = !first && lock(&self.io).buf.is_empty();
        if !first {
            let wait = if idle {
                self.limits.idle_timeout
            } else {
                self.limits.header_timeout
            };
            self.deadline.set(Instant::now() + wait);
        }
        poll_fn(|cx| {
            let mut g = lock(&self.io);
            loop {
                if !g.buf.is_empty() {
                    if let Some(head) = parse_head(&mut g.buf, max_head)? {
                        return Poll::Ready(Ok(Some(head)));
                    }
                }
                match g.poll_fill(READ_HEAD, cx) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(Ok(None)),
                    Poll::Ready(Ok(_)) => {
                        if idle {
                            idle = false;
                            self.deadline
                                .set(Instant::now() + self.limits.header_timeout);
                        }
                    }
                    Poll::Pending => break,
                }
            }
            drop(g);
            if self.deadline.poll_expired(cx) {
                return Poll::Ready(Ok(None));
            }
            // The same for shutdown: polled once, it holds the task's waker.
            if self.cancel_armed {
                if cancel.is_cancelled() {
                    return Poll::Ready(Ok(None));
                }
            } else if cancelled.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ok(None));
            } else {
                self.cancel_armed = true;
            }
            Poll::Pending
        })
        .await
    }

    /// Runs the handler; None when the client hung up meanwhile (the handler is dropped, which
    /// abandons the upstream request).
    async fn respond<F: Future>(&mut self, mut fut: Pin<&mut F>) -> Option<F::Output> {
        let mut watching = true;
        poll_fn(|cx| {
            if let Poll::Ready(r) = fut.as_mut().poll(cx) {
                return Poll::Ready(Some(r));
            }
            // Watch for the client closing, once its request body is in (until then the body
            // reader sees it). A peek, not a read: the read buffer still backs the request's
            // header values, so reading into it would allocate a new one per request. Bytes of
            // a pipelined next request end the watch; they are read after the response.
            if watching {
                let mut g = lock(&self.io);
                if matches!(g.framing, Framing::Done) {
                    let mut byte = [0u8; 1];
                    let mut rb = tokio::io::ReadBuf::new(&mut byte);
                    match g.rd.poll_peek(cx, &mut rb) {
                        Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(None),
                        Poll::Ready(Ok(_)) => watching = false,
                        Poll::Pending => {}
                    }
                }
            }
            Poll::Pending
        })
        .await
    }

    /// Writes the response; Ok(true) when the connection stays open for the next request.
    async fn write_response(
        &mut self,
        resp: Response<ProxyBody>,
        is_head: bool,
        version: Version,
        mut keep_alive: bool,
    ) -> Result<bool, WriteFailed> {
        let (parts, mut body) = resp.into_parts();
        let status = parts.status;
        let headers = parts.headers;
        let none = is_head
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED;
        let out = if none {
            Out::None
        } else {
            match body.size_hint().exact() {
                Some(n) => Out::Length(n),
                None if version == Version::HTTP_11 => Out::Chunked,
                None => Out::Close,
            }
        };
        if out == Out::Close {
            keep_alive = false;
        }
        // The framing and connection headers are the proxy's own, except that the upstream's
        // describe the body a GET would have had for HEAD and 304: kept there. Skipped while
        // writing rather than removed from the map (a removal hashes the name).
        let keep_framing = none && status != StatusCode::NO_CONTENT;

        let w = &mut self.out;
        w.clear();
        w.extend_from_slice(b"HTTP/1.1 ");
        w.extend_from_slice(status.as_str().as_bytes());
        w.push(b' ');
        // A status without a registered reason gets an empty one (the upstream's is not kept).
        w.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
        w.extend_from_slice(b"\r\n");
        let mut has_date = false;
        for (name, value) in headers.iter() {
            if *name == header::CONNECTION
                || (!keep_framing
                    && (*name == header::CONTENT_LENGTH || *name == header::TRANSFER_ENCODING))
            {
                continue;
            }
            has_date |= *name == header::DATE;
            w.extend_from_slice(name.as_str().as_bytes());
            w.extend_from_slice(b": ");
            w.extend_from_slice(value.as_bytes());
            w.extend_from_slice(b"\r\n");
        }
        match out {
            Out::Length(n) => {
                w.extend_from_slice(b"content-length: ");
                w.extend_from_slice(itoa(n, &mut [0; 20]));
                w.extend_from_slice(b"\r\n");
            }
            Out::Chunked => w.extend_from_slice(b"transfer-encoding: chunked\r\n"),
            Out::None | Out::Close => {}
        }
        if !keep_alive {
            w.extend_from_slice(b"connection: close\r\n");
        } else if version == Version::HTTP_10 {
            w.extend_from_slice(b"connection: keep-alive\r\n");
        }
        if !has_date {
            w.extend_from_slice(b"date: ");
            date(w);
            w.extend_from_slice(b"\r\n");
        }
        w.extend_from_slice(b"\r\n");

        if out == Out::None {
            drop(body);
            crate::http1::recycle(headers);
            self.flush().await?;
            return Ok(keep_alive);
        }
        // The head stays until the body is written: a body cut short is logged with its
        // request id, looked up only then.
        let rid = headers.get(crate::proxy::headers::REQUEST_ID);
        let mut left = match out {
            Out::Length(n) => n,
            _ => u64::MAX,
        };
        loop {
            // A large body passing through unchanged moves socket to socket.
            if matches!(out, Out::Length(_)) && left >= splice::MIN && body.can_splice() {
                if let Ok(pipe) = splice::Pipe::new() {
                    let moved = self.splice(&mut body, pipe, rid).await?;
                    if moved > left {
                        return Err(WriteFailed::Body);
                    }
                    left -= moved;
                    continue;
                }
            }
            let out_pending = !self.out.is_empty();
            let next = poll_fn(|cx| match Pin::new(&mut body).poll_frame(cx) {
                Poll::Ready(f) => Poll::Ready(Some(f)),
                // Nothing more yet: send what is waiting first.
                Poll::Pending if out_pending => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            })
            .await;
            let frame = match next {
                None => {
                    self.flush().await?;
                    continue;
                }
                Some(None) => break,
                Some(Some(Ok(frame))) => frame,
                Some(Some(Err(e))) => {
                    cut_short(rid, &e.to_string());
                    self.flush().await?;
                    return Err(WriteFailed::Body);
                }
            };
            // Trailers are dropped.
            let Ok(mut data) = frame.into_data() else {
                continue;
            };
            if data.is_empty() {
                continue;
            }
            if data.len() as u64 > left {
                // More than the length announced: the response is cut where it said it ends.
                cut_short(rid, "the body is longer than its Content-Length");
                data.truncate(left as usize);
                self.out.extend_from_slice(&data);
                self.flush().await?;
                return Err(WriteFailed::Body);
            }
            left -= data.len() as u64;
            if out == Out::Chunked {
                let mut hex = [0u8; 16];
                self.out.extend_from_slice(hex_len(data.len(), &mut hex));
                self.out.extend_from_slice(b"\r\n");
            }
            if data.len() <= COALESCE {
                self.out.extend_from_slice(&data);
                if self.out.len() >= COALESCE {
                    self.flush().await?;
                }
            } else {
                self.write_two(&data).await?;
            }
            if out == Out::Chunked {
                self.out.extend_from_slice(b"\r\n");
            }
        }
        match out {
            Out::Chunked => self.out.extend_from_slice(b"0\r\n\r\n"),
            Out::Length(_) if left > 0 => {
                // The body ended before its announced length.
                cut_short(rid, "the body ended before its Content-Length");
                self.flush().await?;
                return Err(WriteFailed::Body);
            }
            _ => {}
        }
        self.flush().await?;
        crate::http1::recycle(headers);
        Ok(keep_alive)
    }

    /// Moves the rest of `body` to the client socket to socket (`crate::splice`), after what
    /// is buffered; returns the bytes moved. A failed body ends the response as in the frame
    /// path (the client sees it cut short).
    async fn splice(
        &mut self,
        body: &mut ProxyBody,
        mut pipe: splice::Pipe,
        rid: Option<&HeaderValue>,
    ) -> Result<u64, WriteFailed> {
        self.flush().await?;
        let io = &self.io;
        let mut stall = Stall::new(&mut self.deadline, self.limits.body_idle);
        let mut moved = 0u64;
        let r = poll_fn(|cx| {
            let g = lock(io);
            let before = moved;
            let r = splice::poll_copy(cx, &mut pipe, body, g.wr.as_ref(), &mut moved);
            if moved != before {
                stall.progressed();
            }
            // Pending with bytes in the pipe is a wait for the client; with none, for the
            // upstream (whose pauses the body bounds).
            if r.is_pending() && pipe.held() > 0 && stall.expired(cx) {
                return Poll::Ready(None);
            }
            r.map(Some)
        })
        .await;
        metrics::counter!("aleph_proxy_spliced_bytes_total").increment(moved);
        match r {
            Some(Ok(())) => Ok(moved),
            None => Err(WriteFailed::Stalled),
            Some(Err(splice::CopyError::Destination(_))) => Err(WriteFailed::Io),
            Some(Err(splice::CopyError::Source(e))) => {
                cut_short(rid, &e.to_string());
                Err(WriteFailed::Body)
            }
        }
    }

    /// Writes out the buffered bytes.
    async fn flush(&mut self) -> Result<(), WriteFailed> {
        let mut from = 0;
        let out = &self.out;
        let io = &self.io;
        let mut stall = Stall::new(&mut self.deadline, self.limits.body_idle);
        let r = poll_fn(|cx| {
            let mut g = lock(io);
            while from < out.len() {
                match Pin::new(&mut g.wr).poll_write(cx, &out[from..]) {
                    Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(Err(WriteFailed::Io)),
                    Poll::Ready(Ok(n)) => {
                        from += n;
                        stall.progressed();
                    }
                    Poll::Pending => return stall.pending(cx),
                }
            }
            Poll::Ready(Ok(()))
        })
        .await;
        self.out.clear();
        r
    }

    /// Writes the buffered bytes, then `data`, in as few system calls as the socket allows.
    async fn write_two(&mut self, data: &[u8]) -> Result<(), WriteFailed> {
        let (mut a, mut b) = (0, 0);
        let out = &self.out;
        let io = &self.io;
        let mut stall = Stall::new(&mut self.deadline, self.limits.body_idle);
        let r = poll_fn(|cx| {
            let mut g = lock(io);
            while a < out.len() || b < data.len() {
                let bufs = [
                    std::io::IoSlice::new(&out[a..]),
                    std::io::IoSlice::new(&data[b..]),
                ];
                match Pin::new(&mut g.wr).poll_write_vectored(cx, &bufs) {
                    Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(Err(WriteFailed::Io)),
                    Poll::Ready(Ok(mut n)) => {
                        let first = n.min(out.len() - a);
                        a += first;
                        n -= first;
                        b += n;
                        stall.progressed();
                    }
                    Poll::Pending => return stall.pending(cx),
                }
            }
            Poll::Ready(Ok(()))
        })
        .await;
        self.out.clear();
        r
    }

    /// Reads and discards what is left of the request body (an error was answered before it
    /// was read), so the connection can serve the next request. False when it is too much, too
    /// slow or malformed.
    async fn drain(&mut self, generation: u64) -> bool {
        let mut body = RequestBody {
            io: Some(self.io.clone()),
            generation,
        };
        let mut total = 0u64;
        let drained = tokio::time::timeout(DRAIN_TIME, async {
            use http_body_util::BodyExt as _;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => {
                        total += f.data_ref().map_or(0, |d| d.len() as u64);
                        if total > DRAIN_LIMIT {
                            return false;
                        }
                    }
                    Err(_) => return false,
                }
            }
            true
        })
        .await;
        drained.unwrap_or(false)
    }

    /// Closes the connection. When the client may still be sending (`unread`), stops writing
    /// first and discards its input for a moment: closing a socket with unread input sends a
    /// reset, which can destroy the response before the client reads it.
    async fn close(self, unread: bool) {
        let io = &self.io;
        let _ = poll_fn(|cx| Pin::new(&mut lock(io).wr).poll_shutdown(cx)).await;
        if !unread {
            return;
        }
        let mut discarded = 0usize;
        let _ = tokio::time::timeout(
            LINGER_TIME,
            poll_fn(|cx| {
                let mut g = lock(io);
                loop {
                    g.buf.clear();
                    match ready!(g.poll_fill(READ_HEAD, cx)) {
                        Ok(0) | Err(_) => return Poll::Ready(()),
                        Ok(n) => {
                            discarded += n;
                            if discarded > LINGER_LIMIT {
                                return Poll::Ready(());
                            }
                        }
                    }
                }
            }),
        )
        .await;
    }

    /// Drops the connection with a reset. A client that stopped taking its response: what the
    /// kernel still holds for it is discarded, not sent on for as long as the client stays. A
    /// response delimited by the close that failed midway: the reset is how the client learns
    /// it was cut, where a plain close would look like its end.
    fn abort(self, why: Abort) {
        match why {
            Abort::Stalled => tracing::debug!(
                idle_secs = self.limits.body_idle.as_secs_f64(),
                "the client took nothing of the response for timeouts.body_idle; closing the connection"
            ),
            Abort::Cut => tracing::debug!(
                "the response body failed midway; resetting the connection so the client sees the cut"
            ),
        }
        // Dropping the write half would shut it down first, and a FIN the client can read before
        // the reset ends a body of unknown length cleanly: the stream is put back together and
        // closed whole. (The request body may still hold the halves: then they close as they
        // are, FIN then reset.)
        match Arc::try_unwrap(self.io) {
            Ok(io) => {
                let io = io
                    .into_inner()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                if let Ok(stream) = io.rd.reunite(io.wr) {
                    let _ = stream.set_zero_linger();
                }
            }
            Err(io) => {
                let _ = lock(&io).wr.as_ref().set_zero_linger();
            }
        }
    }

    /// Answers a refused head with the proxy's JSON error, then closes.
    async fn refuse(mut self, refusal: Refusal) {
        let err = match refusal {
            Refusal::Silent => return,
            Refusal::TooLarge => ProxyError::HeadersTooLarge,
            Refusal::TargetTooLong => ProxyError::TargetTooLong,
            Refusal::Bad(detail) => ProxyError::BadRequest { detail },
        };
        metrics::counter!("aleph_proxy_errors_total", "code" => err.code()).increment(1);
        // A head that was not read whole carries no usable id: a fresh one, in the answer and
        // in the log line, as for every other response the proxy makes.
        let rid = crate::proxy::headers::request_id(&HeaderMap::new());
        tracing::info!(
            request_id = rid.to_str().unwrap_or_default(),
            status = err.status().as_u16(),
            code = err.code(),
            detail = %err.message(),
            "request head refused"
        );
        let mut resp = err.into_response();
        resp.headers_mut()
            .insert(crate::proxy::headers::REQUEST_ID, rid);
        if self
            .write_response(resp, false, Version::HTTP_11, false)
            .await
            .is_ok()
        {
            self.close(true).await;
        }
    }
}

fn itoa(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
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

fn hex_len(mut n: usize, buf: &mut [u8; 16]) -> &[u8] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = DIGITS[n & 0xf];
        n >>= 4;
        if n == 0 {
            return &buf[i..];
        }
    }
}

/// Appends the IMF-fixdate of now, formatted at most once a second per thread.
fn date(out: &mut Vec<u8>) {
    use std::cell::RefCell;
    thread_local! {
        static CACHE: RefCell<(u64, String)> = const { RefCell::new((0, String::new())) };
    }
    let now = std::time::SystemTime::now();
    let secs = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != secs || c.1.is_empty() {
            *c = (secs, httpdate::fmt_http_date(now));
        }
        out.extend_from_slice(c.1.as_bytes());
    });
}

/// The upstream's response body failed midway, or did not match its length: the client's
/// response is cut short (the client sees an incomplete body, never a complete-looking one). The
/// access line, written when the head went out, says 200; this line says what happened.
fn cut_short(rid: Option<&HeaderValue>, why: &str) {
    metrics::counter!("aleph_proxy_responses_cut_total").increment(1);
    crate::telemetry::throttle::warn_throttled!(
        request_id = rid.and_then(|v| v.to_str().ok()).unwrap_or(""),
        error = why,
        "upstream response body failed; the client's response is cut short"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &str) -> Result<Option<Head>, Refusal> {
        let mut buf = BytesMut::from(raw.as_bytes());
        parse_head(&mut buf, 64 * 1024)
    }

    fn framing(raw: &str) -> String {
        match parse(raw) {
            Ok(Some(h)) => format!("{:?} keep_alive={}", h.framing, h.keep_alive),
            Ok(None) => "partial".into(),
            Err(r) => format!("{r:?}"),
        }
    }

    #[test]
    fn request_framing_follows_rfc_9112() {
        let p = "POST /x HTTP/1.1\r\nHost: a\r\n";
        for (head, want) in [
            (format!("{p}\r\n"), "Done keep_alive=true"),
            (
                format!("{p}Content-Length: 5\r\n\r\n"),
                "Length(5) keep_alive=true",
            ),
            (
                format!("{p}Content-Length: 5\r\nContent-Length: 5\r\n\r\n"),
                "Length(5) keep_alive=true",
            ),
            (
                format!("{p}Content-Length: 5, 5\r\n\r\n"),
                "Length(5) keep_alive=true",
            ),
            (
                format!("{p}Content-Length: 5\r\nContent-Length: 6\r\n\r\n"),
                "Bad(\"differing Content-Lengths\")",
            ),
            (
                format!("{p}Content-Length: 5, 6\r\n\r\n"),
                "Bad(\"differing Content-Lengths\")",
            ),
            (
                format!("{p}Content-Length: +5\r\n\r\n"),
                "Bad(\"malformed Content-Length\")",
            ),
            (
                format!("{p}Content-Length: 0\r\n\r\n"),
                "Done keep_alive=true",
            ),
            (
                format!("{p}Transfer-Encoding: chunked\r\n\r\n"),
                "Chunked(Size) keep_alive=true",
            ),
            (
                format!("{p}Transfer-Encoding: CHUNKED\r\nContent-Length: 3\r\n\r\n"),
                "Chunked(Size) keep_alive=false",
            ),
            (
                format!("{p}Transfer-Encoding: gzip, chunked\r\n\r\n"),
                "Bad(\"only Transfer-Encoding: chunked is accepted in a request\")",
            ),
            (
                "POST /x HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n".into(),
                "Bad(\"Transfer-Encoding is not allowed in an HTTP/1.0 request\")",
            ),
            ("GET /x HTTP/1.0\r\n\r\n".into(), "Done keep_alive=false"),
            (
                "GET /x HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n".into(),
                "Done keep_alive=true",
            ),
            (
                "GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".into(),
                "Done keep_alive=false",
            ),
            // RFC 9112 section 3.2: one Host in HTTP/1.1, at most one in HTTP/1.0.
            (
                "GET /x HTTP/1.1\r\n\r\n".into(),
                "Bad(\"an HTTP/1.1 request needs a Host header field\")",
            ),
            (
                "GET /x HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n".into(),
                "Bad(\"more than one Host header field\")",
            ),
            (
                "GET /x HTTP/1.1\r\nHost: a\r\nHOST: a\r\n\r\n".into(),
                "Bad(\"more than one Host header field\")",
            ),
            (
                "GET /x HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n".into(),
                "Bad(\"more than one Host header field\")",
            ),
            ("GET /x HTTP/1.1\r\nHost: a\r\n".into(), "partial"),
            ("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".into(), "Silent"),
        ] {
            assert_eq!(framing(&head), want, "{head:?}");
        }
    }

    #[test]
    fn heads_keep_their_bytes_and_drop_expect() {
        let h = parse("PUT /a/b?c=d HTTP/1.1\r\nHost: x\r\nX-Empty:\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc")
            .unwrap()
            .unwrap();
        assert_eq!(h.method, Method::PUT);
        assert_eq!(h.uri, "/a/b?c=d");
        assert_eq!(h.headers["x-empty"], "");
        assert!(h.expect_continue);
        assert!(h.headers.get("expect").is_none());
    }

    #[test]
    fn heads_with_many_fields_keep_them_all() {
        let mut raw = String::from("GET / HTTP/1.1\r\nHost: x\r\n");
        for i in 0..60 {
            raw.push_str(&format!("X-F{i}: v{i}\r\n"));
        }
        raw.push_str("\r\n");
        let h = parse(&raw).unwrap().unwrap();
        assert_eq!(h.headers.len(), 61);
        assert_eq!(h.headers["x-f59"], "v59");
    }

    #[test]
    fn connection_is_consumed_unless_it_names_fields() {
        let h = parse("GET / HTTP/1.1\r\nHost: x\r\nConnection: Keep-Alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(h.headers.get("connection").is_none());
        assert!(h.keep_alive);
        // Fields it names must be stripped with it: kept for headers::strip_hop_by_hop.
        let h =
            parse("GET / HTTP/1.1\r\nHost: x\r\nConnection: close, x-drop\r\nX-Drop: 1\r\n\r\n")
                .unwrap()
                .unwrap();
        assert_eq!(h.headers["connection"], "close, x-drop");
        assert!(!h.keep_alive);
    }

    #[test]
    fn oversized_heads_are_refused() {
        let mut buf = BytesMut::from(&b"GET / HTTP/1.1\r\nX-Big: "[..]);
        buf.extend_from_slice(&[b'a'; 9000]);
        assert!(matches!(parse_head(&mut buf, 8192), Err(Refusal::TooLarge)));
        buf.extend_from_slice(b"\r\n\r\n");
        assert!(matches!(parse_head(&mut buf, 8192), Err(Refusal::TooLarge)));
        // A request line longer than the limit is a target too long (414), whole or not.
        let mut buf = BytesMut::from(&b"\r\nGET /?q="[..]);
        buf.extend_from_slice(&[b'a'; 9000]);
        assert!(matches!(
            parse_head(&mut buf, 8192),
            Err(Refusal::TargetTooLong)
        ));
        buf.extend_from_slice(b" HTTP/1.1\r\nHost: a\r\n\r\n");
        assert!(matches!(
            parse_head(&mut buf, 8192),
            Err(Refusal::TargetTooLong)
        ));
    }

    #[test]
    fn numbers_format() {
        assert_eq!(itoa(0, &mut [0; 20]), b"0");
        assert_eq!(itoa(u64::MAX, &mut [0; 20]), b"18446744073709551615");
        assert_eq!(hex_len(0, &mut [0; 16]), b"0");
        assert_eq!(hex_len(0x1a2f, &mut [0; 16]), b"1a2f");
    }
}
