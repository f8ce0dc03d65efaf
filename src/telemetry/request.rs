//! The request a log line belongs to. Every line logged while a request is served carries its id,
//! as the fields of a `request` span: `request{request_id="..."}:` in text, `"span":
//! {"request_id":"...","name":"request"}` in JSON. The id is kept in a thread-local for the
//! time the request's future is polled ([`InRequest`]), and the formatters read it there.
//!
//! A tracing span would give the same lines, but cost about 4,000 instructions per request
//! (created with its fields formatted into a new string, entered and left through the
//! subscriber on every poll, closed), half of an access line. The id is also on the lines of
//! a request at any level (a span at INFO is gone under `RUST_LOG=warn`, and with it the id
//! of a request's warnings). What no longer exists is a span to filter on
//! (`RUST_LOG='[request]=debug'`).

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::HeaderValue;

/// The name the request's fields are shown under, as a span's would be.
pub const REQUEST_SPAN: &str = "request";

thread_local! {
    /// The id of the request whose future this thread is polling.
    static CURRENT: Cell<Option<HeaderValue>> = const { Cell::new(None) };
}

pin_project_lite::pin_project! {
    /// `inner`, with `id` as the current request id while it is polled.
    pub struct InRequest<F> {
        id: Option<HeaderValue>,
        #[pin]
        inner: F,
    }
}

impl<F> InRequest<F> {
    pub fn new(id: HeaderValue, inner: F) -> InRequest<F> {
        InRequest {
            id: Some(id),
            inner,
        }
    }
}

impl<F: Future> Future for InRequest<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        // The id moves into the thread-local and back: no copy, no reference count.
        let _current = Current::enter(this.id);
        this.inner.poll(cx)
    }
}

/// Puts the id back where it came from, and the thread-local as it was, even on a panic.
struct Current<'a> {
    home: &'a mut Option<HeaderValue>,
    before: Option<HeaderValue>,
}

impl<'a> Current<'a> {
    fn enter(home: &'a mut Option<HeaderValue>) -> Current<'a> {
        let before = CURRENT.with(|c| c.replace(home.take()));
        Current { home, before }
    }
}

impl Drop for Current<'_> {
    fn drop(&mut self) {
        *self.home = CURRENT.with(|c| c.replace(self.before.take()));
    }
}

/// Calls `f` with the current request id, if a request is being served on this thread (`-` for
/// an id that is not text, which the proxy never makes).
pub(crate) fn with_id<R>(f: impl FnOnce(Option<&str>) -> R) -> R {
    CURRENT.with(|c| {
        let id = c.take();
        let r = f(id.as_ref().map(|v| v.to_str().unwrap_or("-")));
        c.set(id);
        r
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_id_is_current_only_while_its_future_is_polled() {
        let inner = std::future::poll_fn(|_| {
            assert_eq!(
                with_id(|id| id.map(str::to_owned)),
                Some("outer".to_owned())
            );
            let nested = InRequest::new(HeaderValue::from_static("inner"), async {
                with_id(|id| id.map(str::to_owned))
            });
            let mut nested = std::pin::pin!(nested);
            let mut cx = Context::from_waker(std::task::Waker::noop());
            let seen = nested.as_mut().poll(&mut cx);
            assert_eq!(seen, Poll::Ready(Some("inner".to_owned())));
            // Back to the outer id once the nested future returns.
            assert_eq!(
                with_id(|id| id.map(str::to_owned)),
                Some("outer".to_owned())
            );
            Poll::Ready(())
        });
        let outer = InRequest::new(HeaderValue::from_static("outer"), inner);
        let mut outer = std::pin::pin!(outer);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(with_id(|id| id.is_none()));
        assert_eq!(outer.as_mut().poll(&mut cx), Poll::Ready(()));
        assert!(with_id(|id| id.is_none()));
    }
}
