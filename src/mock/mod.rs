//! An in-process mock of the Aleph API, its token endpoint and an object store holding presigned
//! links, on loopback ports. `aleph-proxy demo` runs it; the tests drive its faults.
//!
//! It behaves like the real API as described in the design notes: Auth0-style token endpoint
//! (JSON body, `expires_in`), `authorizationToken` + `X-Satellogic-Contract-Id` checks with 401
//! `{"message": ...}` bodies, DRF pagination with absolute `next`, orders v2 with relative `next`,
//! a STAC API with GET and POST search paging, assets with Range support, and thumbnails as
//! presigned links on another host.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use bytes::Bytes;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::time::Instant;

pub const MOCK_CLIENT_ID: &str = "demo-client";
pub const MOCK_CLIENT_SECRET: &str = "demo-secret-not-for-production";
pub const MOCK_CONTRACT: &str = "contract-123";
pub const MOCK_CONTRACT_2: &str = "contract-456";

/// How the token endpoint answers.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenMode {
    Ok,
    /// 500 with a JSON error.
    ServerError,
    /// 200 with a body that is not a token.
    Malformed,
    /// 200 with an empty body.
    Empty,
    /// 429 with Retry-After.
    RateLimited,
    /// 401 invalid_client.
    Reject,
    /// Accept the connection, never answer.
    Hang,
    /// The endpoint is down: connections are reset (new ones at once, open ones on their next use).
    Down,
    /// This status and JSON body, whatever the request (odd answers: huge `expires_in`, an
    /// `error` echoing the request, oversized bodies).
    Custom {
        status: u16,
        body: String,
    },
}

/// One request the mock API or object store received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub version: axum::http::Version,
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
    pub body: Bytes,
}

#[derive(Debug, Clone)]
pub struct MockOptions {
    pub token_lifetime: Duration,
    pub contracts: Vec<(String, String)>,
    /// Bytes of generated asset data (when `asset_file` is not set).
    pub asset_size: usize,
    /// Serve this file (e.g. a GeoTIFF) as every data asset.
    pub asset_file: Option<PathBuf>,
    /// Number of STAC items in the archive.
    pub stac_items: usize,
    /// Number of tasks in the tasking list.
    pub tasks: usize,
}

impl Default for MockOptions {
    fn default() -> Self {
        MockOptions {
            token_lifetime: Duration::from_secs(86400),
            contracts: vec![(MOCK_CONTRACT.into(), "Enterprise Imagery Access".into())],
            asset_size: 4 * 1024 * 1024,
            asset_file: None,
            stac_items: 23,
            tasks: 250,
        }
    }
}

/// Fault switches and observations, shared with the tests.
pub struct MockState {
    pub opts: Mutex<MockOptions>,
    pub token_mode: Mutex<TokenMode>,
    pub token_fetches: AtomicU64,
    pub token_successes: AtomicU64,
    tokens: Mutex<HashMap<String, Instant>>,
    /// Every upstream answer is delayed by this much (slow upstream).
    pub api_delay: Mutex<Duration>,
    /// The next N API requests answer this status (with Retry-After for 429/503).
    pub api_fail_next: Mutex<Option<(u16, u32)>>,
    /// The Retry-After value sent with injected 429/503 answers ("0" unless a test changes it).
    pub api_fail_retry_after: Mutex<String>,
    /// The API is down: its connections are reset (a crashed upstream behind a load balancer).
    pub api_down: AtomicBool,
    /// Requests to these paths answer 401 `{"message": "Unauthorized"}` whatever their token (a
    /// path the credential may not use).
    pub unauthorized_paths: Mutex<Vec<String>>,
    /// The Retry-After value the token endpoint sends with its 429 (`TokenMode::RateLimited`).
    pub token_retry_after: Mutex<String>,
    /// TCP connections the API listener accepted (tells pooled reuse from one connection per request).
    pub api_connections: AtomicU64,
    /// Asset bodies are sent at most this many bytes per second (0 = unthrottled).
    pub asset_rate: AtomicU64,
    pub api_requests: AtomicU64,
    recorded: Mutex<VecDeque<Recorded>>,
    pub object_store: Mutex<Vec<Recorded>>,
    pub changed: Notify,
    pub api_url: Mutex<String>,
    pub object_store_url: Mutex<String>,
    asset_bytes: Mutex<Option<Bytes>>,
}

const RECORD_LIMIT: usize = 2000;

impl MockState {
    fn new(opts: MockOptions) -> MockState {
        MockState {
            opts: Mutex::new(opts),
            token_mode: Mutex::new(TokenMode::Ok),
            token_fetches: AtomicU64::new(0),
            token_successes: AtomicU64::new(0),
            tokens: Mutex::new(HashMap::new()),
            api_delay: Mutex::new(Duration::ZERO),
            api_fail_next: Mutex::new(None),
            api_fail_retry_after: Mutex::new("0".into()),
            api_down: AtomicBool::new(false),
            unauthorized_paths: Mutex::new(Vec::new()),
            token_retry_after: Mutex::new("1".into()),
            api_connections: AtomicU64::new(0),
            asset_rate: AtomicU64::new(0),
            api_requests: AtomicU64::new(0),
            recorded: Mutex::new(VecDeque::new()),
            object_store: Mutex::new(Vec::new()),
            changed: Notify::new(),
            api_url: Mutex::new(String::new()),
            object_store_url: Mutex::new(String::new()),
            asset_bytes: Mutex::new(None),
        }
    }

    pub fn set_token_mode(&self, m: TokenMode) {
        *self.token_mode.lock().unwrap() = m;
    }

    /// Every token issued so far stops working (revocation, key rotation).
    pub fn revoke_all_tokens(&self) {
        self.tokens.lock().unwrap().clear();
    }

    /// Every token but the most recently issued one stops working (a rotation on the server side).
    pub fn revoke_all_but_latest(&self) {
        let serial = |t: &str| -> u64 {
            t.strip_prefix("mock-token-")
                .and_then(|r| r.split('-').next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)
        };
        let mut tokens = self.tokens.lock().unwrap();
        let latest = tokens.keys().map(|t| serial(t)).max().unwrap_or(0);
        tokens.retain(|t, _| serial(t) == latest);
    }

    /// Is the token endpoint (`token == true`) or the API down?
    fn is_down(&self, token: bool) -> bool {
        if token {
            *self.token_mode.lock().unwrap() == TokenMode::Down
        } else {
            self.api_down.load(Ordering::SeqCst)
        }
    }

    pub fn issued_tokens(&self) -> Vec<String> {
        self.tokens.lock().unwrap().keys().cloned().collect()
    }

    pub fn recorded(&self) -> Vec<Recorded> {
        self.recorded.lock().unwrap().iter().cloned().collect()
    }

    pub fn last_request(&self) -> Option<Recorded> {
        self.recorded.lock().unwrap().back().cloned()
    }

    /// The most recent request whose path starts with `prefix` (background calls such as
    /// contract discovery may land after the request a test made).
    pub fn last_request_to(&self, prefix: &str) -> Option<Recorded> {
        self.recorded
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|r| r.uri.path().starts_with(prefix))
            .cloned()
    }

    pub fn clear_recorded(&self) {
        self.recorded.lock().unwrap().clear();
    }

    fn record(&self, r: Recorded) {
        let mut q = self.recorded.lock().unwrap();
        if q.len() >= RECORD_LIMIT {
            q.pop_front();
        }
        q.push_back(r);
        drop(q);
        self.changed.notify_waiters();
    }

    fn token_valid(&self, t: &str) -> bool {
        self.tokens
            .lock()
            .unwrap()
            .get(t)
            .is_some_and(|exp| Instant::now() < *exp)
    }
}

/// A running mock: token endpoint, API and object store.
pub struct Mock {
    pub token_url: String,
    pub api_url: String,
    pub object_store_url: String,
    pub state: Arc<MockState>,
}

impl Mock {
    pub async fn start(opts: MockOptions) -> std::io::Result<Mock> {
        Self::start_on("127.0.0.1:0".parse().unwrap(), opts).await
    }

    /// Starts the mock with its API on `api_addr` (token endpoint and object store on ephemeral ports).
    pub async fn start_on(api_addr: SocketAddr, opts: MockOptions) -> std::io::Result<Mock> {
        let state = Arc::new(MockState::new(opts));
        let api = TcpListener::bind(api_addr).await?;
        let auth = TcpListener::bind("127.0.0.1:0").await?;
        let store = TcpListener::bind("127.0.0.1:0").await?;
        let api_url = format!("http://{}", api.local_addr()?);
        let token_url = format!("http://{}/oauth/token", auth.local_addr()?);
        let object_store_url = format!("http://{}", store.local_addr()?);
        *state.api_url.lock().unwrap() = api_url.clone();
        *state.object_store_url.lock().unwrap() = object_store_url.clone();

        let s = state.clone();
        let s2 = state.clone();
        tokio::spawn(async move {
            let app = Router::new().fallback(token_endpoint).with_state(s);
            let _ = axum::serve(FaultyListener::new(auth, s2, true), app).await;
        });
        let s = state.clone();
        let s2 = state.clone();
        tokio::spawn(async move {
            let app = Router::new()
                .fallback(api_handler)
                .layer(axum::extract::DefaultBodyLimit::disable())
                .with_state(s);
            let _ = axum::serve(FaultyListener::new(api, s2, false), app).await;
        });
        let s = state.clone();
        tokio::spawn(async move {
            let app = Router::new().fallback(object_store).with_state(s);
            let _ = axum::serve(store, app).await;
        });
        Ok(Mock {
            token_url,
            api_url,
            object_store_url,
            state,
        })
    }
}

fn json_response(status: StatusCode, v: Value) -> Response {
    (
        status,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

async fn token_endpoint(
    State(s): State<Arc<MockState>>,
    method: Method,
    uri: Uri,
    body: Bytes,
) -> Response {
    if method != Method::POST || uri.path() != "/oauth/token" {
        return json_response(StatusCode::NOT_FOUND, json!({"error": "not_found"}));
    }
    s.token_fetches.fetch_add(1, Ordering::SeqCst);
    s.changed.notify_waiters();
    let mode = s.token_mode.lock().unwrap().clone();
    match mode {
        TokenMode::Ok => {}
        TokenMode::ServerError => {
            return json_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"error": "server_error"}),
            )
        }
        TokenMode::Malformed => {
            return (
                StatusCode::OK,
                [("content-type", "application/json")],
                "{\"oops\": tru",
            )
                .into_response()
        }
        TokenMode::Empty => return (StatusCode::OK, "").into_response(),
        TokenMode::RateLimited => {
            let retry_after = s.token_retry_after.lock().unwrap().clone();
            return (
                StatusCode::TOO_MANY_REQUESTS,
                [
                    ("retry-after", retry_after.as_str()),
                    ("content-type", "application/json"),
                ],
                "{\"error\":\"too_many_requests\"}",
            )
                .into_response();
        }
        TokenMode::Custom { status, body } => {
            return (
                StatusCode::from_u16(status).unwrap_or(StatusCode::OK),
                [("content-type", "application/json")],
                body,
            )
                .into_response()
        }
        TokenMode::Reject => {
            return json_response(
                StatusCode::UNAUTHORIZED,
                json!({"error": "access_denied", "error_description": "Unauthorized"}),
            )
        }
        TokenMode::Hang => {
            std::future::pending::<()>().await;
        }
        // A request that was read before the switch flipped: answer like a dying server would.
        TokenMode::Down => return StatusCode::BAD_GATEWAY.into_response(),
    }
    let Ok(req) = serde_json::from_slice::<Value>(&body) else {
        return json_response(StatusCode::BAD_REQUEST, json!({"error": "invalid_request"}));
    };
    let ok = req["grant_type"] == "client_credentials"
        && req["client_id"] == MOCK_CLIENT_ID
        && req["client_secret"] == MOCK_CLIENT_SECRET
        && req["audience"] == "https://api.satellogic.com/";
    if !ok {
        return json_response(
            StatusCode::UNAUTHORIZED,
            json!({"error": "access_denied", "error_description": "Unauthorized"}),
        );
    }
    let lifetime = s.opts.lock().unwrap().token_lifetime;
    let n = s.token_successes.fetch_add(1, Ordering::SeqCst) + 1;
    let token = format!("mock-token-{n}-{:016x}", rand::random::<u64>());
    s.tokens
        .lock()
        .unwrap()
        .insert(token.clone(), Instant::now() + lifetime);
    s.changed.notify_waiters();
    json_response(
        StatusCode::OK,
        json!({
            "access_token": token,
            "scope": "api:tasking api:delivery",
            "expires_in": lifetime.as_secs_f64(),
            "token_type": "Bearer",
        }),
    )
}

async fn object_store(
    State(s): State<Arc<MockState>>,
    version: axum::http::Version,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    s.object_store.lock().unwrap().push(Recorded {
        version,
        method,
        uri,
        headers,
        body: Bytes::new(),
    });
    s.changed.notify_waiters();
    // A 1x1 PNG stands for a thumbnail.
    const PNG: &[u8] = &[
        0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0, 0, 0, 0x0d, 0x49, 0x48, 0x44, 0x52, 0,
        0, 0, 1, 0, 0, 0, 1, 8, 6, 0, 0, 0, 0x1f, 0x15, 0xc4, 0x89, 0, 0, 0, 0x0d, 0x49, 0x44,
        0x41, 0x54, 0x78, 0x9c, 0x63, 0, 1, 0, 0, 5, 0, 1, 0x0d, 0x0a, 0x2d, 0xb4, 0, 0, 0, 0,
        0x49, 0x45, 0x4e, 0x44, 0xae, 0x42, 0x60, 0x82,
    ];
    ([("content-type", "image/png")], PNG).into_response()
}

fn unauthorized(msg: &str) -> Response {
    json_response(StatusCode::UNAUTHORIZED, json!({ "message": msg }))
}

async fn api_handler(
    State(s): State<Arc<MockState>>,
    version: axum::http::Version,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    s.api_requests.fetch_add(1, Ordering::SeqCst);
    s.record(Recorded {
        version,
        method: method.clone(),
        uri: uri.clone(),
        headers: headers.clone(),
        body: body.clone(),
    });
    let delay = *s.api_delay.lock().unwrap();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    {
        let mut f = s.api_fail_next.lock().unwrap();
        if let Some((status, n)) = *f {
            *f = if n > 1 { Some((status, n - 1)) } else { None };
            drop(f);
            let mut r = json_response(
                StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                json!({"message": "injected failure"}),
            );
            if status == 429 || status == 503 {
                let ra = s.api_fail_retry_after.lock().unwrap().clone();
                r.headers_mut()
                    .insert("retry-after", ra.parse().expect("a header value"));
            }
            return r;
        }
    }

    if s.unauthorized_paths
        .lock()
        .unwrap()
        .iter()
        .any(|p| p == uri.path())
    {
        return compress_json(unauthorized("Unauthorized"), &headers).await;
    }
    // Authentication, as the API does it.
    let auth = headers
        .get("authorizationtoken")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let authed = if let Some(t) = auth.strip_prefix("Bearer ") {
        s.token_valid(t)
    } else if let Some(kv) = auth.strip_prefix("Key,Secret ") {
        kv == format!("{MOCK_CLIENT_ID},{MOCK_CLIENT_SECRET}")
    } else {
        false
    };
    // API gateways compress their 401s like any JSON answer.
    if !authed {
        return compress_json(unauthorized("Unauthorized"), &headers).await;
    }
    let path = uri.path().to_string();
    let contracts = s.opts.lock().unwrap().contracts.clone();
    if path == "/contracts" || path == "/contracts/" {
        let list: Vec<Value> = contracts
            .iter()
            .map(|(id, name)| json!({"contract_id": id, "name": name}))
            .collect();
        return json_response(StatusCode::OK, Value::Array(list));
    }
    let contract = headers
        .get("x-satellogic-contract-id")
        .and_then(|v| v.to_str().ok());
    if !contract.is_some_and(|c| contracts.iter().any(|(id, _)| id == c)) {
        let r = unauthorized(
            "Missing or invalid X-Satellogic-Contract-Id: the contract is not associated with this credential",
        );
        return compress_json(r, &headers).await;
    }
    let base = s.api_url.lock().unwrap().clone();
    let query = parse_query(uri.query());
    let resp = routes(&s, &method, &path, &query, &headers, &body, &base).await;
    let resp = conditional_json(resp, &method, &headers).await;
    compress_json(resp, &headers).await
}

/// JSON answers to GET and HEAD carry a strong ETag (a digest of the body) and are revalidated
/// by `If-None-Match` with the weak comparison (a tag matches with or without `W/`), as Django's
/// ConditionalGetMiddleware does behind the API.
async fn conditional_json(resp: Response, method: &Method, req_headers: &HeaderMap) -> Response {
    use std::hash::{Hash, Hasher};
    let is_json = is_json(&resp);
    if !is_json || resp.status() != StatusCode::OK || !matches!(*method, Method::GET | Method::HEAD)
    {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, usize::MAX).await else {
        return Response::from_parts(parts, Body::empty());
    };
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    let etag = format!("\"{:016x}\"", h.finish());
    let matched = req_headers
        .get_all("if-none-match")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim())
        .any(|t| t == "*" || t.strip_prefix("W/").unwrap_or(t) == etag);
    parts
        .headers
        .insert("etag", etag.parse().expect("a header value"));
    if matched {
        parts.status = StatusCode::NOT_MODIFIED;
        parts.headers.remove("content-type");
        parts.headers.remove("content-length");
        return Response::from_parts(parts, Body::empty());
    }
    Response::from_parts(parts, Body::from(bytes))
}

fn is_json(resp: &Response) -> bool {
    resp.headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("json"))
}

/// JSON answers are gzip-compressed when the client accepts it, as API gateways do.
async fn compress_json(resp: Response, req_headers: &HeaderMap) -> Response {
    use std::io::Write;
    let wants_gzip = req_headers
        .get("accept-encoding")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|e| e.trim().starts_with("gzip")));
    let is_json = is_json(&resp);
    if !wants_gzip || !is_json {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, usize::MAX).await else {
        return Response::from_parts(parts, Body::empty());
    };
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(&bytes).expect("in-memory write");
    let gz = enc.finish().expect("in-memory write");
    parts
        .headers
        .insert("content-encoding", "gzip".parse().unwrap());
    parts.headers.remove("content-length");
    // Another representation than the identity one: its tag is weak (Django's GZipMiddleware).
    if let Some(tag) = parts.headers.get("etag").and_then(|v| v.to_str().ok()) {
        if !tag.starts_with("W/") {
            let weak = format!("W/{tag}");
            parts.headers.insert("etag", weak.parse().unwrap());
        }
    }
    parts
        .headers
        .insert("vary", "Accept-Encoding".parse().unwrap());
    Response::from_parts(parts, Body::from(gz))
}

fn parse_query(q: Option<&str>) -> HashMap<String, String> {
    url::form_urlencoded::parse(q.unwrap_or("").as_bytes())
        .into_owned()
        .collect()
}

async fn routes(
    s: &Arc<MockState>,
    method: &Method,
    path: &str,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    body: &Bytes,
    base: &str,
) -> Response {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let opts = s.opts.lock().unwrap().clone();
    // A HEAD is answered as the GET, without its body (hyper drops it), as the API does.
    let method = if method == Method::HEAD {
        &Method::GET
    } else {
        method
    };
    match (method.clone(), segs.as_slice()) {
        (Method::GET, ["tasking", "products"]) => json_response(
            StatusCode::OK,
            json!([
                {"product_id": "prod-1", "name": "Multispectral 70cm", "max_cloud_cover": 20},
                {"product_id": "prod-2", "name": "Hyperspectral 25m", "max_cloud_cover": 30}
            ]),
        ),
        (Method::GET, ["tasking", "tasks"]) => {
            let limit: usize = query
                .get("limit")
                .and_then(|v| v.parse().ok())
                .unwrap_or(100)
                .clamp(1, 1000);
            let offset: usize = query
                .get("offset")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let total = opts.tasks;
            let results: Vec<Value> = (offset..(offset + limit).min(total))
                .map(|i| json!({"task_id": i + 1, "task_name": format!("task {}", i + 1), "status": "completed"}))
                .collect();
            let next = (offset + limit < total).then(|| {
                format!(
                    "{base}/tasking/tasks/?limit={limit}&offset={}",
                    offset + limit
                )
            });
            let previous = (offset > 0).then(|| {
                format!(
                    "{base}/tasking/tasks/?limit={limit}&offset={}",
                    offset.saturating_sub(limit)
                )
            });
            json_response(
                StatusCode::OK,
                json!({"count": total, "next": next, "previous": previous, "results": results}),
            )
        }
        (Method::POST, ["tasking", "tasks"]) => {
            let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
            json_response(
                StatusCode::CREATED,
                json!({"task_id": 9001, "status": "received", "request": v, "url": format!("{base}/tasking/tasks/9001/")}),
            )
        }
        (Method::GET, ["tasking", "tasks", id]) if !path.ends_with('/') => {
            // Django's APPEND_SLASH: an absolute redirect to the canonical URL.
            Response::builder()
                .status(StatusCode::MOVED_PERMANENTLY)
                .header("location", format!("{base}/tasking/tasks/{id}/"))
                .header(
                    "link",
                    format!("<{base}/tasking/tasks/{id}/>; rel=\"canonical\""),
                )
                .body(Body::empty())
                .unwrap()
        }
        (Method::GET, ["tasking", "tasks", id]) => json_response(
            StatusCode::OK,
            json!({"task_id": id, "status": "completed", "captures": format!("{base}/tasking/tasks/{id}/captures/")}),
        ),
        (Method::PATCH, ["tasking", "tasks", id, "cancel"]) => {
            json_response(StatusCode::OK, json!({"task_id": id, "status": "canceled"}))
        }
        (Method::GET, ["v2", "orders"]) => {
            let limit: usize = query
                .get("limit")
                .and_then(|v| v.parse().ok())
                .unwrap_or(25);
            let offset: usize = query
                .get("offset")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let total = 60;
            let results: Vec<Value> = (offset..(offset + limit).min(total))
                .map(|i| json!({"id": format!("order-{i}"), "status": "delivered"}))
                .collect();
            let next = (offset + limit < total)
                .then(|| format!("/v2/orders?offset={}&limit={limit}", offset + limit));
            json_response(StatusCode::OK, json!({"results": results, "next": next}))
        }
        (_, ["archive", "stac", rest @ ..]) => stac(s, method, rest, query, body, base, &opts),
        (Method::GET | Method::HEAD, ["assets", collection, item, asset]) => {
            asset_response(s, method, collection, item, asset, headers, base, &opts).await
        }
        (Method::GET, ["redirect-elsewhere"]) => {
            // An upstream redirect to another host (an object store).
            let store = s.object_store_url.lock().unwrap().clone();
            Response::builder()
                .status(StatusCode::FOUND)
                .header(
                    "location",
                    format!("{store}/bucket/file.tif?X-Amz-Signature=abc"),
                )
                .body(Body::empty())
                .unwrap()
        }
        (_, ["echo", ..]) => {
            let mut r = Response::new(Body::from(body.clone()));
            r.headers_mut().insert(
                "content-type",
                headers
                    .get("content-type")
                    .cloned()
                    .unwrap_or_else(|| "application/octet-stream".parse().unwrap()),
            );
            r
        }
        _ => json_response(StatusCode::NOT_FOUND, json!({"detail": "Not found."})),
    }
}

fn stac_item(i: usize, base: &str, store: &str) -> Value {
    let id = format!("20240101_120000_SN{:02}_L1D_{:04}", i % 30, i);
    let c = "l1d";
    json!({
        "type": "Feature",
        "stac_version": "1.0.0",
        "id": id,
        "collection": c,
        "geometry": {"type": "Polygon", "coordinates": [[[-58.4, -34.6], [-58.3, -34.6], [-58.3, -34.5], [-58.4, -34.5], [-58.4, -34.6]]]},
        "bbox": [-58.4, -34.6, -58.3, -34.5],
        "properties": {"datetime": "2024-01-01T12:00:00Z", "eo:cloud_cover": (i * 7) % 100, "gsd": 0.7},
        "links": [
            {"rel": "self", "href": format!("{base}/archive/stac/collections/{c}/items/{id}"), "type": "application/geo+json"},
            {"rel": "root", "href": format!("{base}/archive/stac/"), "type": "application/json"},
            {"rel": "parent", "href": format!("{base}/archive/stac/collections/{c}"), "type": "application/json"},
            {"rel": "collection", "href": format!("{base}/archive/stac/collections/{c}"), "type": "application/json"}
        ],
        "assets": {
            "analytic": {"href": format!("{base}/assets/{c}/{id}/analytic?s=s3://satellogic-archive/{id}/analytic.tif"), "type": "image/tiff; application=geotiff; profile=cloud-optimized", "roles": ["data"]},
            "visual": {"href": format!("{base}/assets/{c}/{id}/visual?s=s3://satellogic-archive/{id}/visual.tif"), "type": "image/tiff; application=geotiff; profile=cloud-optimized", "roles": ["visual"]},
            "thumbnail": {"href": format!("{store}/satellogic-archive/{id}/thumb.png?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Expires=604800&X-Amz-Signature=deadbeef{i:04}"), "type": "image/png", "roles": ["thumbnail"]},
            "preview": {"href": format!("{store}/satellogic-archive/{id}/preview.png?X-Amz-Signature=cafe{i:04}"), "type": "image/png", "roles": ["overview"]}
        }
    })
}

fn stac(
    s: &Arc<MockState>,
    method: &Method,
    rest: &[&str],
    query: &HashMap<String, String>,
    body: &Bytes,
    base: &str,
    opts: &MockOptions,
) -> Response {
    let store = s.object_store_url.lock().unwrap().clone();
    let geo = |v: Value| {
        (
            StatusCode::OK,
            [("content-type", "application/geo+json")],
            v.to_string(),
        )
            .into_response()
    };
    let stac_root = format!("{base}/archive/stac");
    match (method.clone(), rest) {
        (Method::GET, [] | [""]) => json_response(
            StatusCode::OK,
            json!({
                "type": "Catalog", "id": "satellogic-archive", "stac_version": "1.0.0",
                "description": "Satellogic archive (mock)",
                "conformsTo": [
                    "https://api.stacspec.org/v1.0.0/core",
                    "https://api.stacspec.org/v1.0.0/item-search",
                    "https://api.stacspec.org/v1.0.0/ogcapi-features",
                    "https://api.stacspec.org/v1.0.0/collections",
                    "http://www.opengis.net/spec/ogcapi-features-1/1.0/conf/core",
                    "http://www.opengis.net/spec/ogcapi-features-1/1.0/conf/geojson"
                ],
                "links": [
                    {"rel": "self", "href": format!("{stac_root}/"), "type": "application/json"},
                    {"rel": "root", "href": format!("{stac_root}/"), "type": "application/json"},
                    {"rel": "data", "href": format!("{stac_root}/collections"), "type": "application/json"},
                    {"rel": "conformance", "href": format!("{stac_root}/conformance"), "type": "application/json"},
                    {"rel": "search", "href": format!("{stac_root}/search"), "type": "application/geo+json", "method": "GET"},
                    {"rel": "search", "href": format!("{stac_root}/search"), "type": "application/geo+json", "method": "POST"},
                    {"rel": "child", "href": format!("{stac_root}/collections/l1d"), "type": "application/json"}
                ]
            }),
        ),
        (Method::GET, ["conformance"]) => json_response(
            StatusCode::OK,
            json!({"conformsTo": ["https://api.stacspec.org/v1.0.0/core", "https://api.stacspec.org/v1.0.0/item-search"]}),
        ),
        (Method::GET, ["collections"]) => json_response(
            StatusCode::OK,
            json!({"collections": [collection_doc(&stac_root, "l1d")], "links": [{"rel": "self", "href": format!("{stac_root}/collections")}]}),
        ),
        (Method::GET, ["collections", c]) => {
            json_response(StatusCode::OK, collection_doc(&stac_root, c))
        }
        (Method::GET, ["collections", _c, "items", id]) => {
            let idx = (0..opts.stac_items).find(|i| stac_item(*i, base, &store)["id"] == *id);
            match idx {
                Some(i) => geo(stac_item(i, base, &store)),
                None => json_response(StatusCode::NOT_FOUND, json!({"detail": "Not found."})),
            }
        }
        (Method::GET, ["search"])
        | (Method::POST, ["search"])
        | (Method::GET, ["collections", _, "items"]) => {
            let post = *method == Method::POST;
            let req: Value = if post {
                serde_json::from_slice(body).unwrap_or(json!({}))
            } else {
                json!({})
            };
            let limit = if post {
                req["limit"].as_u64().map(|v| v as usize)
            } else {
                query.get("limit").and_then(|v| v.parse().ok())
            }
            .unwrap_or(10)
            .clamp(1, 1000);
            let start: usize = if post {
                req["next"]
                    .as_str()
                    .and_then(|v| v.strip_prefix("cursor-"))
                    .and_then(|v| v.parse().ok())
            } else {
                query
                    .get("token")
                    .and_then(|v| v.strip_prefix("cursor-"))
                    .and_then(|v| v.parse().ok())
            }
            .unwrap_or(0);
            let total = opts.stac_items;
            let end = (start + limit).min(total);
            let features: Vec<Value> = (start..end).map(|i| stac_item(i, base, &store)).collect();
            let mut links = vec![
                json!({"rel": "root", "href": format!("{stac_root}/"), "type": "application/json"}),
            ];
            if end < total {
                if post {
                    let mut next_body = req.clone();
                    next_body["next"] = json!(format!("cursor-{end}"));
                    links.push(json!({"rel": "next", "href": format!("{stac_root}/search"), "type": "application/geo+json", "method": "POST", "body": next_body, "merge": false}));
                } else {
                    let mut q: Vec<(String, String)> = query
                        .iter()
                        .filter(|(k, _)| *k != "token")
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect();
                    q.sort();
                    q.push(("token".into(), format!("cursor-{end}")));
                    let qs = url::form_urlencoded::Serializer::new(String::new())
                        .extend_pairs(q)
                        .finish();
                    let p = if rest[0] == "search" {
                        "search".to_string()
                    } else {
                        rest.join("/")
                    };
                    links.push(json!({"rel": "next", "href": format!("{stac_root}/{p}?{qs}"), "type": "application/geo+json", "method": "GET"}));
                }
            }
            geo(json!({
                "type": "FeatureCollection",
                "features": features,
                "links": links,
                "numberMatched": total,
                "numberReturned": end - start,
                "context": {"returned": end - start, "limit": limit, "matched": total}
            }))
        }
        _ => json_response(StatusCode::NOT_FOUND, json!({"detail": "Not found."})),
    }
}

fn collection_doc(stac_root: &str, c: &str) -> Value {
    json!({
        "type": "Collection", "id": c, "stac_version": "1.0.0",
        "description": "L1D orthorectified imagery (mock)", "license": "proprietary",
        "extent": {"spatial": {"bbox": [[-180, -90, 180, 90]]}, "temporal": {"interval": [["2020-01-01T00:00:00Z", null]]}},
        "links": [
            {"rel": "self", "href": format!("{stac_root}/collections/{c}")},
            {"rel": "root", "href": format!("{stac_root}/")},
            {"rel": "items", "href": format!("{stac_root}/collections/{c}/items"), "type": "application/geo+json"}
        ]
    })
}

fn asset_data(s: &MockState, opts: &MockOptions) -> Bytes {
    let mut cached = s.asset_bytes.lock().unwrap();
    if let Some(b) = cached.as_ref() {
        return b.clone();
    }
    let bytes = match &opts.asset_file {
        Some(p) => Bytes::from(std::fs::read(p).unwrap_or_default()),
        None => Bytes::from(generated_asset(opts.asset_size)),
    };
    *cached = Some(bytes.clone());
    bytes
}

/// Where the generated asset's pixels start; the GeoTIFF header and its arrays come before.
const ASSET_PIXELS_AT: usize = 16 * 1024;
/// Tiles of the generated asset, 256 x 256 single-byte pixels each.
const ASSET_TILE: usize = 256;

/// The data asset the mock serves when no file is given: `size` bytes of a fixed pattern that
/// GDAL reads as a georeferenced, tiled, uncompressed single-band GeoTIFF (the pattern is its
/// pixels; bytes past the last tile are ignored by readers). Below 80 KiB it is the bare pattern.
pub fn generated_asset(size: usize) -> Vec<u8> {
    let mut data: Vec<u8> = (0..size)
        .map(|i| (i.wrapping_mul(31) ^ (i >> 8)) as u8)
        .collect();
    let tile_bytes = ASSET_TILE * ASSET_TILE;
    let fit = size.saturating_sub(ASSET_PIXELS_AT) / tile_bytes;
    // Tiles per side: the largest square that fits, at most 40 (the tile arrays stay within
    // the space before the pixels).
    let n = (1..=40usize)
        .take_while(|k| k * k <= fit)
        .last()
        .unwrap_or(0);
    if n == 0 {
        return data;
    }
    let side = (n * ASSET_TILE) as u32;
    let tiles = n * n;
    // Little-endian TIFF: header, one IFD, then the arrays its entries point at.
    let mut h: Vec<u8> = Vec::with_capacity(ASSET_PIXELS_AT);
    h.extend_from_slice(b"II");
    h.extend_from_slice(&42u16.to_le_bytes());
    h.extend_from_slice(&8u32.to_le_bytes());
    const SHORT: u16 = 3;
    const LONG: u16 = 4;
    const DOUBLE: u16 = 12;
    // (tag, type, count, inline value or None for an array at the end)
    let geokeys: [u16; 16] = [1, 1, 0, 3, 1024, 0, 1, 2, 1025, 0, 1, 1, 2048, 0, 1, 4326];
    // The item's footprint: 0.1 degree square, north-west corner at (-58.4, -34.5).
    let scale = [0.1 / f64::from(side), 0.1 / f64::from(side), 0.0];
    let tiepoint = [0.0, 0.0, 0.0, -58.4, -34.5, 0.0];
    let offsets: Vec<u32> = (0..tiles)
        .map(|t| (ASSET_PIXELS_AT + t * tile_bytes) as u32)
        .collect();
    let counts = vec![tile_bytes as u32; tiles];
    let mut arrays: Vec<Vec<u8>> = Vec::new();
    let mut array = |bytes: Vec<u8>| {
        arrays.push(bytes);
        arrays.len() - 1
    };
    let le32 = |v: &[u32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let le64 = |v: &[f64]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let entries: Vec<(u16, u16, u32, Result<u32, usize>)> = vec![
        (256, LONG, 1, Ok(side)),
        (257, LONG, 1, Ok(side)),
        (258, SHORT, 1, Ok(8)),
        (259, SHORT, 1, Ok(1)), // no compression
        (262, SHORT, 1, Ok(1)), // black is zero
        (277, SHORT, 1, Ok(1)),
        (284, SHORT, 1, Ok(1)),
        (322, SHORT, 1, Ok(ASSET_TILE as u32)),
        (323, SHORT, 1, Ok(ASSET_TILE as u32)),
        (324, LONG, tiles as u32, Err(array(le32(&offsets)))),
        (325, LONG, tiles as u32, Err(array(le32(&counts)))),
        (33550, DOUBLE, 3, Err(array(le64(&scale)))),
        (33922, DOUBLE, 6, Err(array(le64(&tiepoint)))),
        (
            34735,
            SHORT,
            16,
            Err(array(
                geokeys.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )),
        ),
    ];
    let mut next_array = 8 + 2 + entries.len() * 12 + 4;
    let mut array_at = vec![0usize; arrays.len()];
    for (i, a) in arrays.iter().enumerate() {
        array_at[i] = next_array;
        next_array += a.len();
    }
    h.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    for (tag, ty, count, value) in &entries {
        h.extend_from_slice(&tag.to_le_bytes());
        h.extend_from_slice(&ty.to_le_bytes());
        h.extend_from_slice(&count.to_le_bytes());
        let v = match value {
            Ok(v) => *v,
            Err(a) => array_at[*a] as u32,
        };
        h.extend_from_slice(&v.to_le_bytes());
    }
    h.extend_from_slice(&0u32.to_le_bytes()); // no next IFD
    for a in &arrays {
        h.extend_from_slice(a);
    }
    debug_assert!(h.len() <= ASSET_PIXELS_AT);
    data[..h.len()].copy_from_slice(&h);
    data
}

#[allow(clippy::too_many_arguments)]
async fn asset_response(
    s: &Arc<MockState>,
    method: &Method,
    _collection: &str,
    item: &str,
    asset: &str,
    headers: &HeaderMap,
    _base: &str,
    opts: &MockOptions,
) -> Response {
    if asset == "redirect" {
        let store = s.object_store_url.lock().unwrap().clone();
        return Response::builder()
            .status(StatusCode::FOUND)
            .header(
                "location",
                format!("{store}/satellogic-archive/{item}/data.tif?X-Amz-Signature=f00d"),
            )
            .body(Body::empty())
            .unwrap();
    }
    let data = asset_data(s, opts);
    let etag = format!("\"asset-{}-{}\"", data.len(), item.len());
    let last_modified = "Mon, 01 Jan 2024 12:00:00 GMT";
    if headers
        .get("if-none-match")
        .is_some_and(|v| v.as_bytes() == etag.as_bytes())
        || headers
            .get("if-modified-since")
            .is_some_and(|v| v.as_bytes() == last_modified.as_bytes())
    {
        return Response::builder()
            .status(StatusCode::NOT_MODIFIED)
            .header("etag", &etag)
            .body(Body::empty())
            .unwrap();
    }
    let total = data.len();
    let range = headers
        .get("range")
        .and_then(|v| v.to_str().ok())
        .and_then(|r| parse_range(r, total));
    let (status, slice, content_range) = match range {
        Some(Ok((a, b))) => (
            StatusCode::PARTIAL_CONTENT,
            data.slice(a..=b),
            Some(format!("bytes {a}-{b}/{total}")),
        ),
        Some(Err(())) => {
            return Response::builder()
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header("content-range", format!("bytes */{total}"))
                .body(Body::empty())
                .unwrap()
        }
        None => (StatusCode::OK, data.clone(), None),
    };
    let mut b = Response::builder()
        .status(status)
        .header(
            "content-type",
            "image/tiff; application=geotiff; profile=cloud-optimized",
        )
        .header("accept-ranges", "bytes")
        .header("etag", &etag)
        .header("last-modified", last_modified)
        .header("content-length", slice.len());
    if let Some(cr) = content_range {
        b = b.header("content-range", cr);
    }
    if *method == Method::HEAD {
        return b.body(Body::empty()).unwrap();
    }
    let rate = s.asset_rate.load(Ordering::Relaxed);
    if rate == 0 {
        return b.body(Body::from(slice)).unwrap();
    }
    // Throttled: 64 KiB chunks paced to `rate` bytes per second.
    let chunk = 64 * 1024;
    let per_chunk = Duration::from_secs_f64(chunk as f64 / rate as f64);
    let stream = futures_util::stream::unfold(0usize, move |off| {
        let slice = slice.clone();
        async move {
            if off >= slice.len() {
                return None;
            }
            tokio::time::sleep(per_chunk).await;
            let end = (off + chunk).min(slice.len());
            Some((Ok::<_, std::io::Error>(slice.slice(off..end)), end))
        }
    });
    b.body(Body::from_stream(stream)).unwrap()
}

/// One `bytes=a-b` / `bytes=a-` / `bytes=-n` range.
fn parse_range(r: &str, total: usize) -> Option<Result<(usize, usize), ()>> {
    let spec = r.strip_prefix("bytes=")?;
    if spec.contains(',') || total == 0 {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (start, end) = if a.is_empty() {
        let n: usize = b.parse().ok()?;
        (total.saturating_sub(n), total - 1)
    } else {
        let start: usize = a.parse().ok()?;
        let end = if b.is_empty() {
            total - 1
        } else {
            b.parse::<usize>().ok()?.min(total - 1)
        };
        (start, end)
    };
    if start >= total || start > end {
        return Some(Err(()));
    }
    Some(Ok((start, end)))
}

/// A listener whose connections fail on demand: while its side is down, new connections are closed
/// at once and open ones are reset on their next read or write, as when a server process dies.
/// It also counts accepted connections, so tests can see whether the proxy pools them.
struct FaultyListener {
    inner: TcpListener,
    state: Arc<MockState>,
    token: bool,
}

impl FaultyListener {
    fn new(inner: TcpListener, state: Arc<MockState>, token: bool) -> FaultyListener {
        FaultyListener {
            inner,
            state,
            token,
        }
    }
}

impl axum::serve::Listener for FaultyListener {
    type Io = FaultyIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (FaultyIo, SocketAddr) {
        loop {
            let (io, addr) = match self.inner.accept().await {
                Ok(x) => x,
                Err(_) => {
                    // EMFILE and friends: let the system recover instead of spinning.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            };
            if !self.token {
                self.state.api_connections.fetch_add(1, Ordering::SeqCst);
            }
            if self.state.is_down(self.token) {
                // Linger 0 turns the close into a reset, like a port nobody serves.
                let _ = io.set_zero_linger();
                drop(io);
                continue;
            }
            let _ = io.set_nodelay(true);
            return (
                FaultyIo {
                    inner: io,
                    state: self.state.clone(),
                    token: self.token,
                },
                addr,
            );
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// A connection of [`FaultyListener`].
struct FaultyIo {
    inner: tokio::net::TcpStream,
    state: Arc<MockState>,
    token: bool,
}

impl FaultyIo {
    fn check(&self) -> std::io::Result<()> {
        if self.state.is_down(self.token) {
            let _ = self.inner.set_zero_linger();
            return Err(std::io::ErrorKind::ConnectionReset.into());
        }
        Ok(())
    }
}

impl tokio::io::AsyncRead for FaultyIo {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if let Err(e) = this.check() {
            return std::task::Poll::Ready(Err(e));
        }
        std::pin::Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for FaultyIo {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if let Err(e) = this.check() {
            return std::task::Poll::Ready(Err(e));
        }
        std::pin::Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::generated_asset;

    #[test]
    fn the_generated_asset_is_a_tiff_of_the_asked_size_when_it_fits_a_tile() {
        for size in [0, 1000, 80 * 1024, 1 << 20, 4 << 20, 64 << 20] {
            let a = generated_asset(size);
            assert_eq!(a.len(), size);
            let tiff = a.starts_with(b"II*\0");
            assert_eq!(tiff, size >= 16 * 1024 + 256 * 256, "{size}");
            // Past the header, the pattern: what the pixels and any trailing bytes are.
            let i = size.saturating_sub(1);
            if size > 16 * 1024 {
                assert_eq!(a[i], (i.wrapping_mul(31) ^ (i >> 8)) as u8);
            }
        }
    }
}
