//! Body types of the forwarding path: the boxed response body, the request body sent upstream
//! (replayable when small), and the streaming wrapper that enforces the idle timeout between chunks
//! and holds the request's in-flight slot until the last byte is sent.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use tokio::time::{Instant, Sleep};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Every response the proxy sends has this body type.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|e| match e {})
        .boxed_unsync()
}

pub fn empty() -> ProxyBody {
    Empty::<Bytes>::new().map_err(|e| match e {}).boxed_unsync()
}

/// A body passing through the proxy: a request body on its way upstream, or an upstream response.
pub enum PassBody {
    /// Held in memory (a small request body kept for replay, a 401 body the proxy inspected).
    Buffered(Bytes),
    /// Streamed as it arrives; cannot be replayed.
    Streaming(hyper::body::Incoming),
}

impl PassBody {
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
            PassBody::Streaming(inc) => Pin::new(inc).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            PassBody::Buffered(b) => b.is_empty(),
            PassBody::Streaming(inc) => inc.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            PassBody::Buffered(b) => SizeHint::with_exact(b.len() as u64),
            PassBody::Streaming(inc) => inc.size_hint(),
        }
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
    idle: Duration,
    timer: Pin<Box<Sleep>>,
    _guard: G,
}

impl<B, G> Streamed<B, G> {
    pub fn new(inner: B, idle: Duration, guard: G) -> Self {
        Streamed {
            inner,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
            _guard: guard,
        }
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
                let deadline = Instant::now() + this.idle;
                this.timer.as_mut().reset(deadline);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match this.timer.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(IdleTimeout(this.idle))))),
                Poll::Pending => Poll::Pending,
            },
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
