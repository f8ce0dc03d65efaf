//! The response stage: hop-by-hop headers out, request id in, upstream links in `Location`,
//! `Content-Location`, `Link` and JSON bodies rewritten to the proxy's public URL, and the body
//! streamed with the idle timeout while holding the request's in-flight slot.
//!
//! Only JSON bodies are ever buffered, and only up to `rewrite.max_body_bytes`; anything larger,
//! compressed with an unknown coding, partial (206) or not JSON streams through untouched.

use std::net::SocketAddr;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode};
use http_body_util::BodyExt;

use crate::body::{self, PassBody, ProxyBody, Streamed};
use crate::config::{Config, Timeouts};
use crate::proxy::headers;
use crate::proxy::InFlight;
use crate::rewrite::{self, Encoding, Rewriter};

/// The request's part in its response: where its links should point, and the validator it
/// revalidates with. Empty when rewriting is off.
#[derive(Default)]
pub struct PublicBase {
    base: Option<String>,
    if_none_match: Option<HeaderValue>,
}

pub struct ResponsePolicy {
    rewriter: Option<Rewriter>,
    max_body: usize,
}

impl ResponsePolicy {
    pub fn new(config: &Config) -> ResponsePolicy {
        ResponsePolicy {
            rewriter: config
                .rewrite
                .enabled
                .then(|| Rewriter::new(&config.upstream.url)),
            max_body: config.rewrite.max_body_bytes,
        }
    }

    /// What the response stage needs of the request, taken before the request is sent.
    pub fn public(
        &self,
        headers: &HeaderMap,
        local: SocketAddr,
        public_url: Option<&str>,
    ) -> PublicBase {
        if self.rewriter.is_none() {
            return PublicBase::default();
        }
        PublicBase {
            base: self.public_base(headers, local, public_url),
            if_none_match: headers.get(header::IF_NONE_MATCH).cloned(),
        }
    }

    /// The base URL clients should use to come back through this listener: its `public_url`
    /// (no trailing slash), else the Host the client used (scheme http), else the listener's
    /// address.
    fn public_base(
        &self,
        headers: &HeaderMap,
        local: SocketAddr,
        public_url: Option<&str>,
    ) -> Option<String> {
        self.rewriter.as_ref()?;
        if let Some(p) = public_url {
            return Some(p.to_string());
        }
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .filter(|h| {
                !h.is_empty()
                    && h.bytes().all(|b| {
                        b.is_ascii_alphanumeric()
                            || matches!(b, b'.' | b'-' | b':' | b'[' | b']' | b'_')
                    })
            });
        Some(match host {
            Some(h) => format!("http://{h}"),
            None => format!("http://{local}"),
        })
    }

    /// Turns the upstream response into the client's response.
    pub async fn finish(
        &self,
        (resp, method): (Response<PassBody>, Method),
        rid: &HeaderValue,
        public: &PublicBase,
        guard: InFlight,
        timeouts: &Timeouts,
    ) -> Response<ProxyBody> {
        let (mut parts, body) = resp.into_parts();
        headers::prepare_response(&mut parts.headers, rid);
        let (Some(rw), Some(base)) = (&self.rewriter, &public.base) else {
            return Response::from_parts(parts, stream(body, timeouts, guard));
        };
        rewrite_headers(rw, base, &mut parts.headers);
        if parts.status == StatusCode::NOT_MODIFIED {
            // Revalidating a JSON response the proxy rewrote: the client holds the weak tag the
            // proxy gave it (`W/"x"`), the upstream matched it weakly and answers with its strong
            // `"x"`. A 304 carries the validator its 200 would have (RFC 9110 15.4.5); a strong
            // tag the client did not send as weak (an asset's) stays strong for If-Range.
            if let Some(inm) = &public.if_none_match {
                weaken_etag_sent_weak(&mut parts.headers, inm);
            }
            return Response::from_parts(parts, stream(body, timeouts, guard));
        }

        let json = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(rewrite::is_json_content_type);
        let has_body = method != Method::HEAD
            && !matches!(
                parts.status,
                StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED | StatusCode::PARTIAL_CONTENT
            );
        let encoding = Encoding::from_header(
            parts
                .headers
                .get(header::CONTENT_ENCODING)
                .and_then(|v| v.to_str().ok()),
        );
        if json && method == Method::HEAD && encoding.is_some() {
            // The GET of this resource may come back rewritten: its length, byte ranges and
            // digests are not known from here, and its validator can only be weak (RFC 9110
            // 9.3.2 lets a HEAD leave out what is determined while the content is generated).
            parts.headers.remove(header::CONTENT_LENGTH);
            drop_byte_identity(&mut parts.headers);
            // The GET of a compressed JSON success is sent decoded (below).
            if parts.status.is_success() {
                parts.headers.remove(header::CONTENT_ENCODING);
            }
        }
        let (true, true, Some(encoding)) = (json, has_body, encoding) else {
            if json && has_body {
                tracing::warn!(
                    encoding = ?parts.headers.get(header::CONTENT_ENCODING),
                    "JSON response in a content coding the proxy cannot read: links in it are not rewritten"
                );
                not_rewritten("unknown_coding");
            }
            return Response::from_parts(parts, stream(body, timeouts, guard));
        };
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.max_body as u64) {
            tracing::warn!(
                bytes = declared,
                limit = self.max_body,
                "JSON response larger than rewrite.max_body_bytes: links in it are not rewritten"
            );
            not_rewritten("too_large");
            return Response::from_parts(parts, stream(body, timeouts, guard));
        }

        // Read up to the cap; past it, send what was read followed by the rest, untouched.
        let mut body = Streamed::new(body, timeouts.body_idle, ());
        let mut buf = BytesMut::new();
        loop {
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        buf.extend_from_slice(&data);
                        if buf.len() > self.max_body {
                            tracing::warn!(
                                limit = self.max_body,
                                "JSON response larger than rewrite.max_body_bytes: links in it are not rewritten"
                            );
                            not_rewritten("too_large");
                            let head =
                                http_body_util::Full::new(buf.freeze()).map_err(|e| match e {});
                            let chained = Chain {
                                head: Some(head),
                                tail: body,
                                _guard: guard,
                            };
                            return Response::from_parts(parts, ProxyBody::new(chained));
                        }
                    }
                }
                Some(Err(e)) => {
                    // The upstream body failed midway: the client sees a truncated response, as
                    // it would without rewriting.
                    // The connection logs the cut (WARN, aleph_proxy_responses_cut_total).
                    tracing::debug!(error = %e, "upstream response body failed");
                    let failed =
                        http_body_util::StreamBody::new(futures_util::stream::iter(vec![Err::<
                            http_body::Frame<Bytes>,
                            body::BoxError,
                        >(
                            e
                        )]));
                    return Response::from_parts(parts, ProxyBody::new(failed));
                }
                None => break,
            }
        }
        let original = buf.freeze();
        let decoded = match encoding {
            Encoding::Identity => None,
            enc => match rewrite::decode(enc, &original, self.max_body) {
                Ok(d) => Some(d),
                Err(rewrite::RewriteError::TooLarge { .. }) => {
                    tracing::warn!(
                        limit = self.max_body,
                        "JSON response larger than rewrite.max_body_bytes once decoded: links in it are not rewritten"
                    );
                    not_rewritten("too_large");
                    return Response::from_parts(parts, body::full(original));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "JSON response cannot be decoded: links in it are not rewritten");
                    not_rewritten("undecodable");
                    return Response::from_parts(parts, body::full(original));
                }
            },
        };
        let text: &[u8] = decoded.as_deref().unwrap_or(&original);
        match rw.rewrite_json(text, base) {
            Some((new_body, count)) => {
                metrics::counter!("aleph_proxy_links_rewritten_total").increment(count as u64);
                identity(parts, new_body)
            }
            // Nothing to rewrite. A decoded success is sent decoded all the same, so a GET is
            // always what its HEAD said (identity, no upstream length) whatever the body holds.
            // The API's errors pass as they came.
            None => match decoded {
                Some(d) if parts.status.is_success() => identity(parts, d),
                _ => Response::from_parts(parts, body::full(original)),
            },
        }
    }
}

/// A body that is not the upstream's bytes, sent as identity with its own length: the client is
/// a local hop where compression buys nothing.
fn identity(mut parts: http::response::Parts, body: Vec<u8>) -> Response<ProxyBody> {
    parts.headers.remove(header::CONTENT_ENCODING);
    drop_byte_identity(&mut parts.headers);
    parts
        .headers
        .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    Response::from_parts(parts, body::full(body))
}

/// A JSON response passed through with its links as the upstream wrote them.
fn not_rewritten(reason: &'static str) {
    metrics::counter!("aleph_proxy_links_not_rewritten_total", "reason" => reason).increment(1);
}

/// The body is (or may be) not the upstream's bytes: no byte ranges, digests or strong validator.
fn drop_byte_identity(headers: &mut HeaderMap) {
    headers.remove(header::ACCEPT_RANGES);
    headers.remove("content-md5");
    headers.remove("digest");
    headers.remove("content-digest");
    headers.remove("repr-digest");
    weaken_etag(headers);
}

/// A strong `ETag: "x"` on a 304 whose request sent `W/"x"` becomes `W/"x"`.
fn weaken_etag_sent_weak(headers: &mut HeaderMap, if_none_match: &HeaderValue) {
    let Some(tag) = headers.get(header::ETAG).map(HeaderValue::as_bytes) else {
        return;
    };
    if tag.starts_with(b"W/") {
        return;
    }
    let sent_weak = if_none_match
        .as_bytes()
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .any(|t| t.strip_prefix(b"W/") == Some(tag));
    if sent_weak {
        weaken_etag(headers);
    }
}

/// The body changed, so a strong validator would lie about byte identity.
fn weaken_etag(headers: &mut HeaderMap) {
    if let Some(tag) = headers.get(header::ETAG) {
        let b = tag.as_bytes();
        if !b.starts_with(b"W/") {
            let mut weak = b"W/".to_vec();
            weak.extend_from_slice(b);
            if let Ok(v) = HeaderValue::from_bytes(&weak) {
                headers.insert(header::ETAG, v);
            }
        }
    }
}

fn rewrite_headers(rw: &Rewriter, base: &str, headers: &mut HeaderMap) {
    for name in [header::LOCATION, header::CONTENT_LOCATION] {
        if let Some(new) = headers
            .get(&name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                rw.rewrite_url(v, base)
                    .or_else(|| rw.rewrite_root_relative(v, base))
            })
        {
            if let Ok(v) = HeaderValue::try_from(new) {
                headers.insert(name, v);
                metrics::counter!("aleph_proxy_links_rewritten_total").increment(1);
            }
        }
    }
    if headers.contains_key(header::LINK) {
        let values: Vec<HeaderValue> = headers
            .get_all(header::LINK)
            .iter()
            .map(|v| {
                match v
                    .to_str()
                    .ok()
                    .and_then(|s| rw.rewrite_link_header(s, base))
                    .and_then(|s| HeaderValue::try_from(s).ok())
                {
                    Some(new) => {
                        metrics::counter!("aleph_proxy_links_rewritten_total").increment(1);
                        new
                    }
                    None => v.clone(),
                }
            })
            .collect();
        headers.remove(header::LINK);
        for v in values {
            headers.append(header::LINK, v);
        }
    }
}

fn stream(body: PassBody, timeouts: &Timeouts, guard: InFlight) -> ProxyBody {
    match body {
        PassBody::Buffered(b) => body::full(b),
        PassBody::Streaming(inc) => ProxyBody::pass(Streamed::new(inc, timeouts.body_idle, guard)),
    }
}

/// What was buffered, then the rest of the stream.
struct Chain<H, T, G> {
    head: Option<H>,
    tail: T,
    _guard: G,
}

impl<H, T, G> http_body::Body for Chain<H, T, G>
where
    H: http_body::Body<Data = Bytes, Error = body::BoxError> + Unpin,
    T: http_body::Body<Data = Bytes, Error = body::BoxError> + Unpin,
    G: Unpin,
{
    type Data = Bytes;
    type Error = body::BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, body::BoxError>>> {
        let this = self.get_mut();
        if let Some(head) = this.head.as_mut() {
            match std::pin::Pin::new(head).poll_frame(cx) {
                std::task::Poll::Ready(None) => this.head = None,
                other => return other,
            }
        }
        std::pin::Pin::new(&mut this.tail).poll_frame(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metrics_exporter_prometheus::PrometheusBuilder;

    #[test]
    fn every_rewritten_header_link_is_counted() {
        let rw = Rewriter::new(&"https://api.satellogic.com".parse().unwrap());
        let mut h = HeaderMap::new();
        h.insert(
            header::LOCATION,
            HeaderValue::from_static("https://api.satellogic.com/a/"),
        );
        h.append(
            header::LINK,
            HeaderValue::from_static("<https://api.satellogic.com/a/>; rel=\"canonical\""),
        );
        h.append(
            header::LINK,
            HeaderValue::from_static("<https://elsewhere.example/>; rel=\"help\""),
        );
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            rewrite_headers(&rw, "http://127.0.0.1:8080", &mut h)
        });
        assert_eq!(h[header::LOCATION], "http://127.0.0.1:8080/a/");
        let links: Vec<_> = h.get_all(header::LINK).iter().collect();
        assert_eq!(
            links,
            [
                "<http://127.0.0.1:8080/a/>; rel=\"canonical\"",
                "<https://elsewhere.example/>; rel=\"help\""
            ]
        );
        assert!(
            handle
                .render()
                .contains("aleph_proxy_links_rewritten_total 2"),
            "{}",
            handle.render()
        );
    }

    #[test]
    fn a_304_answers_with_the_tag_the_client_holds() {
        let mut h = HeaderMap::new();
        h.insert(header::ETAG, HeaderValue::from_static("\"abc\""));
        weaken_etag_sent_weak(&mut h, &HeaderValue::from_static("\"other\", W/\"abc\""));
        assert_eq!(h[header::ETAG], "W/\"abc\"");
        // A strong tag the client sent strong (an asset's, for If-Range) stays strong.
        let mut h = HeaderMap::new();
        h.insert(header::ETAG, HeaderValue::from_static("\"abc\""));
        weaken_etag_sent_weak(&mut h, &HeaderValue::from_static("\"abc\""));
        assert_eq!(h[header::ETAG], "\"abc\"");
    }
}
