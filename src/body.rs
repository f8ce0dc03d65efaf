//! Body types of the forwarding path: the boxed response body, the request body sent upstream
//! (replayable when small), and the streaming wrapper that enforces the idle timeout between chunks
//! and holds the request's in-flight slot until the last byte is sent.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use tokio::time::{Instant, Sleep};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Every response the proxy sends has this body type: any body, boxed, or an upstream body
/// passed through unchanged, which the client connection may splice (`crate::splice`).
pub struct ProxyBody(Inner);

enum Inner {
    Boxed(UnsyncBoxBody<Bytes, BoxError>),
    /// Boxed like the other variant: a response moves through several futures on its way
    /// to the client, and an inline body would make every move of it copy ten times as much.
    Pass(Box<Streamed<Streaming, crate::proxy::InFlight>>),
}

impl ProxyBody {
    pub fn new<B>(body: B) -> ProxyBody
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        ProxyBody(Inner::Boxed(body.map_err(Into::into).boxed_unsync()))
    }

    /// An upstream body streamed to the client as it is.
    pub fn pass(body: Streamed<Streaming, crate::proxy::InFlight>) -> ProxyBody {
        ProxyBody(Inner::Pass(Box::new(body)))
    }

    /// The rest of the body can be spliced: see [`Streaming::can_splice`].
    pub fn can_splice(&self) -> bool {
        match &self.0 {
            Inner::Pass(b) => b.inner.can_splice(),
            Inner::Boxed(_) => false,
        }
    }
}

impl Default for ProxyBody {
    fn default() -> ProxyBody {
        empty()
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.get_mut().0 {
            Inner::Boxed(b) => Pin::new(b).poll_frame(cx),
            Inner::Pass(b) => Pin::new(&mut **b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Inner::Boxed(b) => b.is_end_stream(),
            Inner::Pass(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Inner::Boxed(b) => b.size_hint(),
            Inner::Pass(b) => b.size_hint(),
        }
    }
}

impl crate::splice::Source for ProxyBody {
    type Error = BoxError;

    fn poll_fill(
        &mut self,
        cx: &mut Context<'_>,
        pipe: &mut crate::splice::Pipe,
    ) -> Poll<Result<usize, BoxError>> {
        match &mut self.0 {
            Inner::Pass(b) => b.poll_fill(cx, pipe),
            Inner::Boxed(_) => Poll::Ready(Err("body cannot be spliced".into())),
        }
    }
}

pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    ProxyBody::new(Full::new(bytes.into()))
}

pub fn empty() -> ProxyBody {
    ProxyBody::new(Empty::<Bytes>::new())
}

/// A body passing through the proxy: a request body on its way upstream, or an upstream response.
#[allow(clippy::large_enum_variant)] // Boxing the streaming variant costs an allocation per request.
pub enum PassBody {
    /// Held in memory (a small request body kept for replay, a 401 body the proxy inspected).
    Buffered(Bytes),
    /// Streamed as it arrives; cannot be replayed.
    Streaming(Streaming),
}

impl PassBody {
    /// For a streamed body, a [`Progress`] it keeps up to date while the upstream takes it.
    pub fn track(&mut self) -> Option<Arc<Progress>> {
        match self {
            PassBody::Buffered(_) => None,
            PassBody::Streaming(s) => {
                let p = Progress::new();
                s.progress = Some(p.clone());
                Some(p)
            }
        }
    }

    /// A copy for another attempt, or None when the body was streamed.
    pub fn try_clone(&self) -> Option<PassBody> {
        match self {
            PassBody::Buffered(b) => Some(PassBody::Buffered(b.clone())),
            PassBody::Streaming(_) => None,
        }
    }
}

impl Body for PassBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            PassBody::Buffered(b) => {
                if b.is_empty() {
                    Poll::Ready(None)
                } else {
                    Poll::Ready(Some(Ok(Frame::data(std::mem::take(b)))))
                }
            }
            PassBody::Streaming(s) => Pin::new(s).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            PassBody::Buffered(b) => b.is_empty(),
            PassBody::Streaming(s) => s.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            PassBody::Buffered(b) => SizeHint::with_exact(b.len() as u64),
            PassBody::Streaming(s) => s.size_hint(),
        }
    }
}

/// A hyper body streamed as it arrives: first the part already read (a request body read up to the
/// replay limit before it proved too large to keep), then the rest; optionally failing when the
/// sender stalls (a client trickling an upload must not hold an upstream connection forever).
pub struct Streaming {
    head: Option<Bytes>,
    inner: Source,
    idle: Option<IdleTimer>,
    progress: Option<Arc<Progress>>,
}

/// When a request body streamed to the upstream last moved: the response-headers timeout counts
/// from there, so an upload that keeps moving is never cut off by it, however long it takes, and
/// one the upstream stops taking is.
pub struct Progress {
    base: Instant,
    /// Milliseconds from `base` to the last chunk taken (or the end of the body).
    last_ms: AtomicU64,
}

impl Progress {
    pub fn new() -> Arc<Progress> {
        Arc::new(Progress {
            base: Instant::now(),
            last_ms: AtomicU64::new(0),
        })
    }

    fn mark(&self) {
        let ms = self.base.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// The last time the body moved (its creation, if it never did).
    pub fn last(&self) -> Instant {
        self.base + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// Where a streamed body comes from.
#[allow(clippy::large_enum_variant)] // One per body, never moved once streaming.
enum Source {
    /// The client's request body.
    Client(crate::server::RequestBody),
    /// An upstream response body.
    Upstream(crate::upstream::Body),
}

impl Source {
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self {
            Source::Client(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            Source::Upstream(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Source::Client(b) => b.is_end_stream(),
            Source::Upstream(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Source::Client(b) => b.size_hint(),
            Source::Upstream(b) => b.size_hint(),
        }
    }
}

impl Streaming {
    pub fn new(inner: crate::server::RequestBody) -> Streaming {
        Streaming {
            head: None,
            inner: Source::Client(inner),
            idle: None,
            progress: None,
        }
    }

    /// `head` was read from `inner` already and is sent first.
    pub fn with_head(head: Bytes, inner: crate::server::RequestBody) -> Streaming {
        Streaming {
            head: (!head.is_empty()).then_some(head),
            inner: Source::Client(inner),
            idle: None,
            progress: None,
        }
    }

    /// Fails the body when the sender has sent nothing for `idle` while it is being read.
    pub fn idle_timeout(mut self, idle: Duration) -> Streaming {
        self.idle = Some(IdleTimer::new(idle));
        self
    }
}

impl Streaming {
    /// The rest of the body can be moved socket to socket (`crate::splice`): an upstream
    /// response with nothing of it held in memory, whose source can (a Content-Length body on
    /// plain TCP, nothing buffered). Request bodies are copied: spliced, uploads were no faster
    /// and no cheaper (BENCHMARKS.md).
    pub fn can_splice(&self) -> bool {
        self.head.is_none()
            && match &self.inner {
                Source::Upstream(b) => b.can_splice(),
                Source::Client(_) => false,
            }
    }
}

impl crate::splice::Source for Streaming {
    type Error = BoxError;

    fn poll_fill(
        &mut self,
        cx: &mut Context<'_>,
        pipe: &mut crate::splice::Pipe,
    ) -> Poll<Result<usize, BoxError>> {
        // No idle timer here: only request bodies carry one, and they are not spliced. A
        // response's is the `Streamed` around it.
        match &mut self.inner {
            Source::Upstream(b) => b.poll_fill(cx, pipe),
            Source::Client(_) => Poll::Ready(Err("a request body is not spliced".into())),
        }
    }
}

impl From<crate::server::RequestBody> for Streaming {
    fn from(inner: crate::server::RequestBody) -> Streaming {
        Streaming::new(inner)
    }
}

impl From<crate::upstream::Body> for Streaming {
    fn from(inner: crate::upstream::Body) -> Streaming {
        Streaming {
            head: None,
            inner: Source::Upstream(inner),
            idle: None,
            progress: None,
        }
    }
}

impl Body for Streaming {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(head) = this.head.take() {
            return Poll::Ready(Some(Ok(Frame::data(head))));
        }
        match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(t) = &mut this.idle {
                    t.progress();
                }
                if let Some(p) = &this.progress {
                    p.mark();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(None) => {
                if let Some(p) = &this.progress {
                    p.mark();
                }
                Poll::Ready(None)
            }
            Poll::Pending => match &mut this.idle {
                Some(t) => {
                    if t.expired(cx) {
                        Poll::Ready(Some(Err(Box::new(IdleTimeout(t.idle)))))
                    } else {
                        Poll::Pending
                    }
                }
                None => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.head.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let head = self.head.as_ref().map_or(0, |h| h.len() as u64);
        let inner = self.inner.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + head);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + head);
        }
        hint
    }
}

/// Measures how long the sender of a body has kept the reader waiting. Armed when a poll finds no
/// data, cleared by the next chunk: time the reader itself spends elsewhere (a slow client reading
/// a download, an upstream applying backpressure to an upload) never counts as the sender's idling.
struct IdleTimer {
    idle: Duration,
    /// Made the first time the sender keeps the reader waiting: a body that is always ready
    /// (most small responses) never touches the timer wheel.
    timer: Option<Pin<Box<Sleep>>>,
    armed: bool,
}

impl IdleTimer {
    fn new(idle: Duration) -> IdleTimer {
        IdleTimer {
            idle,
            timer: None,
            armed: false,
        }
    }

    fn progress(&mut self) {
        self.armed = false;
    }

    /// Passes on a splice step's result, failing it when the sender has kept the reader
    /// waiting for `idle` (the same rule as for frames).
    fn watch(
        &mut self,
        r: Poll<Result<usize, BoxError>>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<usize, BoxError>> {
        match r {
            Poll::Ready(Ok(n)) => {
                self.progress();
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending if self.expired(cx) => Poll::Ready(Err(Box::new(IdleTimeout(self.idle)))),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Called when the sender has nothing: true once it has had nothing for `idle`.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let timer = match &mut self.timer {
            Some(t) => {
                if !self.armed {
                    t.as_mut().reset(Instant::now() + self.idle);
                }
                t
            }
            None => self.timer.insert(Box::pin(tokio::time::sleep(self.idle))),
        };
        self.armed = true;
        timer.as_mut().poll(cx).is_ready()
    }
}

/// The idle timeout fired between two chunks of a streamed body.
#[derive(Debug, thiserror::Error)]
#[error("no body data for {0:?}")]
pub struct IdleTimeout(pub Duration);

/// Wraps a streamed body: fails it when no chunk arrives within `idle`, and keeps `guard` alive
/// (the in-flight slot, the request's metrics) until the body is finished or dropped.
pub struct Streamed<B, G> {
    inner: B,
    timer: IdleTimer,
    _guard: G,
}

impl<B, G> Streamed<B, G> {
    pub fn new(inner: B, idle: Duration, guard: G) -> Self {
        Streamed {
            inner,
            timer: IdleTimer::new(idle),
            _guard: guard,
        }
    }
}

impl<B, G> crate::splice::Source for Streamed<B, G>
where
    B: crate::splice::Source<Error = BoxError>,
{
    type Error = BoxError;

    /// The same idle rule as for frames: only waits on the sender count.
    fn poll_fill(
        &mut self,
        cx: &mut Context<'_>,
        pipe: &mut crate::splice::Pipe,
    ) -> Poll<Result<usize, BoxError>> {
        let r = self.inner.poll_fill(cx, pipe);
        self.timer.watch(r, cx)
    }
}

impl<B, G> Body for Streamed<B, G>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
    G: Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.timer.progress();
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                if this.timer.expired(cx) {
                    Poll::Ready(Some(Err(Box::new(IdleTimeout(this.timer.idle)))))
                } else {
                    Poll::Pending
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

use std::future::Future as _;

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::StreamBody;

    /// A body fed by a channel: `send` a chunk to make one available.
    fn channel_body() -> (
        tokio::sync::mpsc::UnboundedSender<Bytes>,
        impl Body<Data = Bytes, Error = std::convert::Infallible> + Unpin,
    ) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|b| (Ok::<_, std::convert::Infallible>(Frame::data(b)), rx))
        });
        (tx, StreamBody::new(Box::pin(stream)))
    }

    #[test]
    fn a_response_body_is_small_to_move() {
        // Responses move through several futures on their way to the client.
        assert!(std::mem::size_of::<ProxyBody>() <= 24);
    }

    #[tokio::test]
    async fn idle_time_counts_only_while_waiting_on_the_sender() {
        let idle = Duration::from_millis(200);
        let (tx, inner) = channel_body();
        let mut body = Streamed::new(inner, idle, ());
        tx.send(Bytes::from_static(b"a")).unwrap();
        assert!(body.frame().await.unwrap().is_ok());
        // The reader is away for longer than the idle timeout (a slow client, backpressure)...
        tokio::time::sleep(idle * 2).await;
        // ...then finds nothing ready: the sender still gets a whole idle period from now.
        let late = tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            late.send(Bytes::from_static(b"b")).unwrap();
        });
        let frame = body.frame().await.unwrap();
        assert!(frame.is_ok(), "timed out while the reader was away");
        // A sender that stays silent is cut after about the idle period.
        let started = std::time::Instant::now();
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(err.is::<IdleTimeout>(), "{err}");
        assert!(started.elapsed() >= idle - Duration::from_millis(20));
        drop(tx);
    }
}
