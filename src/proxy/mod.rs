//! The forwarding path: one handler for every request on a proxy listener.
//!
//! access check -> in-flight slot -> contract -> token -> headers -> send (bounded retries, one
//! token refresh after a 401) -> response headers and link rewriting -> streamed body.
//! Bodies stream both ways; only request bodies under `retry.replay_body_limit` are kept, so that
//! the request can be replayed.

pub mod access;
pub mod contract;
pub mod headers;
pub mod response;

use crate::telemetry::throttle::warn_throttled;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::server::h1::ClientBodyError;
use crate::server::RequestBody as Incoming;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;

use crate::body::{IdleTimeout, PassBody, ProxyBody, Streaming};
use crate::config::{Config, RetryConfig, Timeouts};
use crate::error::ProxyError;
use crate::token::{pass_reason, schedule, Token, TokenManager, Unauthorized};
use crate::upstream::UpstreamClient;
use access::Access;
use contract::{ContractRouter, Resolution};

/// Upstream 401 bodies larger than this are not inspected (they are passed through as they are).
const MAX_401_BODY: usize = 64 * 1024;

/// Process-wide forwarding state shared by every listener.
pub struct Shared {
    pub client: UpstreamClient,
    base_path: String,
    pub timeouts: Timeouts,
    pub retry: RetryConfig,
    in_flight: Arc<Slots>,
    pub response: response::ResponsePolicy,
    pub draining: AtomicBool,
}

impl Shared {
    pub fn new(config: &Config, client: UpstreamClient) -> Shared {
        Shared {
            client,
            base_path: config.upstream.base_path().to_string(),
            timeouts: config.timeouts.clone(),
            retry: config.retry.clone(),
            in_flight: Arc::new(Slots {
                used: AtomicUsize::new(0),
                max: config.limits.max_in_flight,
            }),
            response: response::ResponsePolicy::new(config),
            draining: AtomicBool::new(false),
        }
    }

    /// The upstream request target for a client path and query: the base path, then the client's
    /// path as it is, so `//other-host/x` stays a path (the scheme and authority are always the
    /// configured upstream's). Borrowed when there is no base path.
    pub fn upstream_path<'a>(&self, path_and_query: &'a str) -> std::borrow::Cow<'a, str> {
        if self.base_path.is_empty() {
            std::borrow::Cow::Borrowed(path_and_query)
        } else {
            std::borrow::Cow::Owned(format!("{}{}", self.base_path, path_and_query))
        }
    }

    /// Number of requests currently holding an in-flight slot.
    pub fn in_flight(&self) -> usize {
        self.in_flight.used.load(Ordering::Relaxed)
    }
}

/// One proxy listener: shared state plus its credential and contract rules.
pub struct Listener {
    pub shared: Arc<Shared>,
    pub tokens: Arc<TokenManager>,
    pub contracts: ContractRouter,
    pub access: Access,
    pub local_addr: SocketAddr,
    /// This listener's `public_url`, without a trailing slash.
    pub public_url: Option<String>,
}

/// The in-flight slots (`limits.max_in_flight`): a count, as requests never wait for a slot.
/// (`aleph_proxy_in_flight_requests` is set from it when `/metrics` is scraped.)
pub struct Slots {
    used: AtomicUsize,
    max: usize,
}

/// Held for the life of a request, until its response body is fully sent.
pub struct InFlight {
    slots: Arc<Slots>,
}

impl InFlight {
    /// A slot, or None when all `max` are taken.
    fn take(slots: &Arc<Slots>) -> Option<InFlight> {
        if slots.used.fetch_add(1, Ordering::Relaxed) >= slots.max {
            slots.used.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(InFlight {
            slots: slots.clone(),
        })
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.slots.used.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Handles of the metrics every request touches, registered once: each `counter!`/`gauge!` call
/// looks its series up in the recorder (hashing the name and labels, building a label Vec).
/// The first request comes after `run` installed the recorder, so the handles are live.
struct Meters {
    upstream_duration: metrics::Histogram,
    /// `aleph_proxy_requests_total` by method and status class, each created on first use so a
    /// series appears with its first request, as before.
    requests: [[OnceLock<metrics::Counter>; 5]; 8],
}

fn meters() -> &'static Meters {
    static METERS: OnceLock<Meters> = OnceLock::new();
    METERS.get_or_init(|| Meters {
        upstream_duration: metrics::histogram!("aleph_proxy_upstream_duration_seconds"),
        requests: std::array::from_fn(|_| std::array::from_fn(|_| OnceLock::new())),
    })
}

fn count_request(method: &Method, status: StatusCode) {
    let m = METHODS
        .iter()
        .position(|x| x == method)
        .unwrap_or(METHODS.len());
    let c = match status.as_u16() {
        100..=199 => 0,
        200..=299 => 1,
        300..=399 => 2,
        400..=499 => 3,
        _ => 4,
    };
    meters().requests[m][c]
        .get_or_init(|| {
            metrics::counter!(
                "aleph_proxy_requests_total",
                "method" => method_label(method),
                "status" => status_class(status),
            )
        })
        .increment(1);
}

/// The methods with their own label; the rest count as "other" (the last slot).
const METHODS: [Method; 7] = [
    Method::GET,
    Method::HEAD,
    Method::POST,
    Method::PUT,
    Method::PATCH,
    Method::DELETE,
    Method::OPTIONS,
];

/// Parses `Retry-After` (delay-seconds or an HTTP date) into a delay.
pub fn retry_after_delay(v: &HeaderValue) -> Option<Duration> {
    let s = v.to_str().ok()?.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(s).ok()?;
    Some(
        when.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

fn status_class(s: StatusCode) -> &'static str {
    match s.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE
    )
}

/// Entry point for hyper: never fails; errors become the proxy's JSON responses.
pub async fn handle(
    listener: Arc<Listener>,
    remote: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    // The latency is only logged: no clock reads for it when the access log is off.
    let started = tracing::enabled!(tracing::Level::INFO).then(Instant::now);
    let rid = headers::request_id(req.headers());
    let method = req.method().clone();
    // Logged as the path only: query strings can carry signed parameters. (A Uri clone shares
    // its bytes: no copy for the log line, which RUST_LOG=warn skips anyway.)
    let uri = req.uri().clone();
    // Every line logged while the request is served shows its id (`span.request_id` in JSON).
    let resp = crate::telemetry::InRequest::new(rid.clone(), async {
        let mut resp = match serve(&listener, remote, req, &rid).await {
            Ok(r) => r,
            Err(e) => {
                metrics::counter!("aleph_proxy_errors_total", "code" => e.code()).increment(1);
                let mut r = e.into_response();
                r.headers_mut().insert(headers::REQUEST_ID, rid.clone());
                r
            }
        };
        let status = resp.status();
        count_request(&method, status);
        if let Some(started) = started {
            // Only for the log line: no header lookup when the access log is off.
            // Whole microseconds: `0.545`, not `0.5450630000000001`.
            let latency_ms = started.elapsed().as_micros() as f64 / 1000.0;
            let proxy_error = resp
                .headers()
                .get(crate::error::ERROR_HEADER)
                .and_then(|v| v.to_str().ok());
            tracing::info!(
                method = %method,
                path = %uri.path(),
                status = status.as_u16(),
                latency_ms,
                proxy_error,
                "request"
            );
        }
        if listener.shared.draining.load(Ordering::Relaxed) {
            // Tell keep-alive clients to reconnect elsewhere while draining.
            resp.headers_mut()
                .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    })
    .await;
    Ok(resp)
}

/// The least of the retry budget a retry is started with: one that would have less gets the
/// previous answer instead of a wait cut short at once.
const RETRY_WINDOW: Duration = Duration::from_millis(250);

async fn serve(
    l: &Listener,
    remote: SocketAddr,
    req: Request<Incoming>,
    rid: &HeaderValue,
) -> Result<Response<ProxyBody>, ProxyError> {
    // The request's form first: a client that takes the proxy for a forward proxy (HTTPS_PROXY,
    // http_proxy) names the API's host, which the Host check would refuse as DNS rebinding;
    // these 400s say what is wrong and forward nothing.
    if req.method() == Method::CONNECT {
        return Err(ProxyError::BadRequest {
            detail: "CONNECT is not supported: aleph-proxy is a reverse proxy for one API, not a forward proxy".into(),
        });
    }
    if req.version() < http::Version::HTTP_2 && req.uri().authority().is_some() {
        return Err(ProxyError::BadRequest {
            detail: "absolute-form request targets (GET http://host/...) are refused: aleph-proxy only forwards to its configured upstream; send the path alone".into(),
        });
    }
    // What is left besides a path is asterisk-form (OPTIONS *), which names nothing on the API
    // and would be glued onto the base path.
    if !req.uri().path().starts_with('/') {
        return Err(ProxyError::BadRequest {
            detail: "only request targets that start with '/' are forwarded".into(),
        });
    }
    // An upstream that echoes TRACE (RFC 9110 9.3.8) would hand the injected token to the client.
    if req.method() == Method::TRACE {
        return Err(ProxyError::BadRequest {
            detail: "TRACE is not forwarded: the API's echo of the request would carry the proxy's credentials".into(),
        });
    }
    // An upstream resolves `/archive/../tasking/x` to `/tasking/x`: routed here by its raw form,
    // it would carry another path's contract, or climb out of the upstream's base path.
    if contract::has_dot_segment(req.uri().path()) {
        return Err(ProxyError::BadRequest {
            detail: "the path has a '.' or '..' segment (plain or as %2e): send the resolved path"
                .into(),
        });
    }
    l.access.check(remote.ip(), req.headers())?;
    let Some(permit) = InFlight::take(&l.shared.in_flight) else {
        return Err(ProxyError::Overloaded {
            retry_after: Duration::from_secs(1),
        });
    };
    let public = l
        .shared
        .response
        .public(req.headers(), l.local_addr, l.public_url.as_deref());
    let resp = forward(l, req, rid).await?;
    Ok(l.shared
        .response
        .finish(resp, rid, &public, permit, &l.shared.timeouts)
        .await)
}

/// Sends the request upstream with retries; returns the upstream response (headers received).
async fn forward(
    l: &Listener,
    req: Request<Incoming>,
    rid: &HeaderValue,
) -> Result<(Response<PassBody>, Method), ProxyError> {
    let shared = &l.shared;
    let (mut parts, body) = req.into_parts();
    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|pq| pq.as_str())
        .unwrap_or("/");
    let target = shared.upstream_path(path_and_query);

    // The token first: without one nothing can be sent, and discovery (which needs a token too)
    // would otherwise turn a token outage into a misleading 422 `no_contract`.
    let mut token = l.tokens.token().await?;

    let client_contract = parts.headers.get(headers::CONTRACT_ID);
    let contract = match l.contracts.resolve(parts.uri.path(), client_contract) {
        Resolution::Header(h) => Some(h),
        Resolution::NoHeader => None,
        Resolution::Discovered => match l.contracts.discovered(l.tokens.wait_timeout()).await {
            Ok(h) => Some(h),
            // The token expired while discovery waited for one: that is the real cause.
            Err(_) if l.tokens.current_usable().is_none() => return Err(l.tokens.no_token()),
            Err(Some(detail)) => {
                return Err(ProxyError::NoContract {
                    path: parts.uri.path().to_string(),
                    detail,
                    pending: false,
                })
            }
            Err(None) => {
                return Err(ProxyError::NoContract {
                    path: parts.uri.path().to_string(),
                    detail: "contract discovery (GET /contracts) has not finished yet".into(),
                    pending: true,
                })
            }
        },
    };
    headers::prepare_request(&mut parts.headers, &l.access.cfg.key_header);
    let body = read_body(body, &parts.headers, shared).await?;
    let method = parts.method.clone();
    let retryable_method = is_idempotent(&method);
    // The retry budget, counted from the first attempt (set when it is sent).
    let mut deadline: Option<tokio::time::Instant> = None;
    let mut attempt: u32 = 0;
    // The token an upstream 401 refused, once the request was sent again with a newer one.
    let mut refused: Option<Arc<Token>> = None;
    let mut body = Some(body);

    loop {
        // Retries wait and request bodies take time to read: a token that became unusable since it
        // was taken is replaced (waiting for the refresher, bounded) rather than injected expired.
        let mut now = tokio::time::Instant::now();
        if !token.is_usable(now) {
            token = l.tokens.token().await?;
            now = tokio::time::Instant::now();
        }
        let replay = body.as_ref().and_then(|b| b.try_clone());
        let mut this_body = match replay {
            Some(b) => b,
            None => body.take().ok_or(ProxyError::UpstreamUnreachable)?,
        };
        let can_replay = body.is_some();
        let progress = this_body.track();
        // Nothing waited since `now` was read.
        let sent = now;
        let extra = headers::injected(&token.header, contract.as_ref(), rid);
        let request = shared
            .client
            .request(&method, &target, &parts.headers, &extra, this_body);
        let deadline = *deadline.get_or_insert(sent + shared.retry.max_elapsed);
        // A retry lives within `retry.max_elapsed` of the first attempt, its wait included (at
        // least RETRY_WINDOW: a retry is only started with that much of the budget left, and a
        // 401 replay after a retry must not fail before it is sent).
        let limit = if attempt > 0 {
            shared
                .timeouts
                .response_headers
                .min(deadline.saturating_duration_since(sent).max(RETRY_WINDOW))
        } else {
            shared.timeouts.response_headers
        };
        let result = match progress {
            None => tokio::time::timeout_at(sent + limit, request)
                .await
                .map_err(|_| ()),
            Some(p) => response_headers_after_upload(sent, limit, &p, request).await,
        };
        meters()
            .upstream_duration
            .record(sent.elapsed().as_secs_f64());
        let resp = match result {
            Err(_) => {
                if limit < shared.timeouts.response_headers {
                    warn_throttled!(
                        retry_budget_ms = shared.retry.max_elapsed.as_millis() as u64,
                        attempt,
                        "upstream did not send response headers within the retry budget (retry.max_elapsed)"
                    );
                } else {
                    warn_throttled!(
                        timeout_ms = limit.as_millis() as u64,
                        "upstream did not send response headers in time"
                    );
                }
                return Err(ProxyError::UpstreamTimeout);
            }
            Ok(Err(e)) => {
                if request_body_stalled(&e) {
                    tracing::info!(
                        "the client stopped sending its request body; request abandoned"
                    );
                    return Err(ProxyError::BadRequest {
                        detail: format!(
                            "the request body stalled: nothing received for {} s (timeouts.body_idle)",
                            shared.timeouts.body_idle.as_secs_f64()
                        ),
                    });
                }
                if client_body_failed(&e) {
                    tracing::info!("the client's request body failed (malformed or cut short)");
                    return Err(ProxyError::BadRequest {
                        detail: "the request body is malformed or was not received completely"
                            .into(),
                    });
                }
                let connect = e.is_connect();
                let kind = upstream_error_kind(&e);
                if connect && retryable_method && can_replay && attempt < shared.retry.max_retries {
                    let delay = schedule::backoff(
                        attempt,
                        Duration::from_millis(100),
                        Duration::from_secs(2),
                        rand::random(),
                    );
                    if tokio::time::Instant::now() + delay + RETRY_WINDOW <= deadline {
                        warn_throttled!(error = %kind, attempt = attempt + 1, "upstream connect failed; retrying");
                        metrics::counter!("aleph_proxy_upstream_retries_total", "reason" => "connect").increment(1);
                        attempt += 1;
                        tokio::time::sleep(delay).await;
                        continue;
                    }
                }
                warn_throttled!(error = %kind, "upstream request failed");
                return Err(if timed_out(&e) || kind.contains("timed out") {
                    ProxyError::UpstreamTimeout
                } else if connect {
                    ProxyError::UpstreamUnreachable
                } else {
                    ProxyError::UpstreamBadResponse
                });
            }
            Ok(Ok(resp)) => resp,
        };

        let status = resp.status();
        if status == StatusCode::UNAUTHORIZED && !l.tokens.is_legacy() {
            let (rparts, rbody) = resp.into_parts();
            let text = read_small(rbody, MAX_401_BODY, shared.timeouts.body_idle).await;
            let Some(text) = text else {
                tracing::warn!(
                    limit = MAX_401_BODY,
                    "upstream 401 body failed, stalled or was larger than the limit"
                );
                return Err(ProxyError::UpstreamBadResponse);
            };
            let reason = if mentions_contract(&rparts.headers, &text) {
                // A new token cannot fix a contract problem: pass it through, no loop.
                warn_throttled!("upstream 401 names the contract; passed through");
                pass_reason::CONTRACT
            } else if let Some(refused) = &refused {
                // The replay with a newer token was refused as well.
                l.tokens
                    .replay_answered(refused, &token, parts.uri.path(), true);
                pass_reason::NOT_TOKEN
            } else {
                match l.tokens.unauthorized(&token, parts.uri.path()).await {
                    Unauthorized::Replay(newer) if can_replay => {
                        metrics::counter!("aleph_proxy_unauthorized_refreshes_total").increment(1);
                        refused = Some(std::mem::replace(&mut token, newer));
                        continue;
                    }
                    Unauthorized::Replay(_) => {
                        warn_throttled!(
                            "upstream 401 on a streamed body that cannot be replayed; passed through"
                        );
                        pass_reason::NOT_REPLAYABLE
                    }
                    Unauthorized::PassThrough(reason) => {
                        if reason == pass_reason::NO_NEW_TOKEN {
                            warn_throttled!(
                                "upstream 401 and no new access token to try; passed through"
                            );
                        }
                        reason
                    }
                }
            };
            metrics::counter!("aleph_proxy_unauthorized_passed_through_total", "reason" => reason)
                .increment(1);
            return Ok((rebuild(rparts, text), method));
        }
        if let Some(refused) = &refused {
            // The replay got past authentication. (A 429 or a 5xx may come from a gateway before
            // it, and says nothing about the token.)
            if status.as_u16() < 500 && status != StatusCode::TOO_MANY_REQUESTS {
                l.tokens
                    .replay_answered(refused, &token, parts.uri.path(), false);
            }
        }
        if matches!(status.as_u16(), 429 | 502 | 503)
            && retryable_method
            && can_replay
            && attempt < shared.retry.max_retries
        {
            let delay = resp
                .headers()
                .get(http::header::RETRY_AFTER)
                .and_then(retry_after_delay)
                .unwrap_or_else(|| {
                    schedule::backoff(
                        attempt,
                        Duration::from_millis(200),
                        Duration::from_secs(5),
                        rand::random(),
                    )
                });
            // The delay is the upstream's word (Retry-After): checked, it may be any size.
            let in_time = tokio::time::Instant::now()
                .checked_add(delay + RETRY_WINDOW)
                .is_some_and(|at| at <= deadline);
            if in_time {
                tracing::info!(
                    status = status.as_u16(),
                    delay_ms = delay.as_millis() as u64,
                    attempt = attempt + 1,
                    "upstream busy; retrying"
                );
                metrics::counter!("aleph_proxy_upstream_retries_total", "reason" => "status")
                    .increment(1);
                attempt += 1;
                drop(resp);
                tokio::time::sleep(delay).await;
                continue;
            }
        }
        // The request's header map is done with: the next request's head reuses it.
        crate::http1::recycle(std::mem::take(&mut parts.headers));
        return Ok((resp.map(|b| PassBody::Streaming(b.into())), method));
    }
}

/// Does a 401 body speak of the contract rather than the token?
/// Whether a 401's body names the contract, read through its content coding: clients ask for
/// gzip, so the API's 401s usually come compressed. A body that cannot be decoded (an unknown or
/// broken coding) is searched as it is.
fn mentions_contract(headers: &http::HeaderMap, body: &Bytes) -> bool {
    use crate::rewrite::{decode, Encoding};
    let encoding = match headers.get(http::header::CONTENT_ENCODING) {
        None => None,
        Some(v) => v.to_str().ok().and_then(|v| Encoding::from_header(Some(v))),
    };
    let decoded = match encoding {
        Some(Encoding::Identity) | None => None,
        Some(enc) => decode(enc, body, 16 * MAX_401_BODY).ok(),
    };
    let text = decoded.as_deref().unwrap_or(body);
    text.windows(8).any(|w| w.eq_ignore_ascii_case(b"contract"))
}

fn rebuild(parts: http::response::Parts, body: Bytes) -> Response<PassBody> {
    Response::from_parts(parts, PassBody::Buffered(body))
}

/// Reads a small body completely; None if it fails, is too long or stalls.
async fn read_small(body: crate::upstream::Body, limit: usize, idle: Duration) -> Option<Bytes> {
    let limited = http_body_util::Limited::new(body, limit);
    let collected = tokio::time::timeout(idle, limited.collect())
        .await
        .ok()?
        .ok()?;
    Some(collected.to_bytes())
}

/// Keeps the request body when it is small enough to replay (`retry.replay_body_limit`), streams it
/// otherwise. A body without a Content-Length (chunked) is read up to the limit: one that ends
/// within it is kept like any other small body; past it, what was read is sent first, then the rest.
async fn read_body(
    mut body: Incoming,
    headers: &http::HeaderMap,
    shared: &Shared,
) -> Result<PassBody, ProxyError> {
    use http_body::Body as _;
    if body.is_end_stream() {
        return Ok(PassBody::Buffered(Bytes::new()));
    }
    let limit = shared.retry.replay_body_limit;
    let idle = shared.timeouts.body_idle;
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Ok(PassBody::Streaming(Streaming::new(body).idle_timeout(idle)));
    }
    let incomplete = || ProxyError::BadRequest {
        detail: "the request body was not received completely".into(),
    };
    let mut buf = bytes::BytesMut::new();
    loop {
        let frame = tokio::time::timeout(idle, body.frame())
            .await
            .map_err(|_| incomplete())?;
        match frame {
            None => return Ok(PassBody::Buffered(buf.freeze())),
            Some(Err(_)) => return Err(incomplete()),
            Some(Ok(frame)) => {
                // Request trailers are not forwarded (the API uses none).
                if let Ok(data) = frame.into_data() {
                    buf.extend_from_slice(&data);
                    if buf.len() as u64 > limit {
                        let s = Streaming::with_head(buf.freeze(), body).idle_timeout(idle);
                        return Ok(PassBody::Streaming(s));
                    }
                }
            }
        }
    }
}

/// `request` bounded by `timeouts.response_headers` (`limit`) for a streamed request body: counted
/// from the last time the body moved (or `sent`), so a long upload is not cut off while the
/// upstream keeps taking it. Err(()) when the time ran out.
async fn response_headers_after_upload<F: std::future::Future>(
    sent: tokio::time::Instant,
    limit: Duration,
    progress: &crate::body::Progress,
    request: F,
) -> Result<F::Output, ()> {
    let mut request = std::pin::pin!(request);
    let mut deadline = sent + limit;
    loop {
        match tokio::time::timeout_at(deadline, request.as_mut()).await {
            Ok(out) => return Ok(out),
            Err(_) if progress.last() + limit > deadline => deadline = progress.last() + limit,
            Err(_) => return Err(()),
        }
    }
}

/// Did the upstream request fail by timing out (`timeouts.connect`, or the OS giving up on the
/// connection)? That is a 504 like nginx's, not the 502 of a refused connection. hyper-util reports
/// its connect timeout as an io::Error of kind TimedOut whose text does not say so.
fn timed_out(e: &crate::upstream::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        if inner
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        {
            return true;
        }
        source = inner.source();
    }
    false
}

/// Did the upstream request fail because the client's upload stalled past `timeouts.body_idle`?
fn request_body_stalled(e: &crate::upstream::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        if inner.is::<IdleTimeout>() {
            return true;
        }
        source = inner.source();
    }
    false
}

/// Did the send fail because the client's own streamed body failed (a bad chunk size, a client
/// that hung up mid-body)? That is the client's fault: a 400, not a 502 that blames the upstream.
/// (HTTP/2 to the upstream: hyper reports a user body error caused by the client body's error.)
fn client_body_failed(e: &crate::upstream::Error) -> bool {
    if e.is_client_body() {
        return true;
    }
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        if inner.is::<ClientBodyError>() {
            return true;
        }
        source = inner.source();
    }
    false
}

fn upstream_error_kind(e: &crate::upstream::Error) -> String {
    let mut s = String::from(if e.is_connect() { "connect" } else { "request" });
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_flight_slots_are_taken_up_to_the_limit_and_given_back() {
        let slots = Arc::new(Slots {
            used: AtomicUsize::new(0),
            max: 2,
        });
        let a = InFlight::take(&slots).unwrap();
        let b = InFlight::take(&slots).unwrap();
        assert!(InFlight::take(&slots).is_none());
        // A refusal leaves the count as it was.
        assert_eq!(slots.used.load(Ordering::Relaxed), 2);
        drop(a);
        let c = InFlight::take(&slots).unwrap();
        drop((b, c));
        assert_eq!(slots.used.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(
            retry_after_delay(&HeaderValue::from_static("3")),
            Some(Duration::from_secs(3))
        );
        let past = HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT");
        assert_eq!(retry_after_delay(&past), Some(Duration::ZERO));
        assert_eq!(retry_after_delay(&HeaderValue::from_static("soon")), None);
    }

    #[test]
    fn contract_401s() {
        let plain = http::HeaderMap::new();
        let named = br#"{"message":"Invalid X-Satellogic-Contract-Id"}"#;
        assert!(mentions_contract(&plain, &Bytes::from_static(named)));
        assert!(!mentions_contract(
            &plain,
            &Bytes::from_static(br#"{"message":"Unauthorized"}"#)
        ));
        // Compressed, as the API's gateway sends it to clients that accept gzip or br.
        for (coding, enc) in [
            ("gzip", crate::rewrite::Encoding::Gzip),
            ("br", crate::rewrite::Encoding::Brotli),
            ("deflate", crate::rewrite::Encoding::Deflate),
        ] {
            let mut headers = http::HeaderMap::new();
            headers.insert(
                http::header::CONTENT_ENCODING,
                HeaderValue::from_static(coding),
            );
            let body = Bytes::from(crate::rewrite::encode(enc, named));
            assert!(mentions_contract(&headers, &body), "{coding}");
            let other = Bytes::from(crate::rewrite::encode(
                enc,
                b"{\"message\":\"Unauthorized\"}",
            ));
            assert!(!mentions_contract(&headers, &other), "{coding}");
        }
    }
}
