//! The access token: fetched by OAuth2 client credentials (or a static legacy key), held in one
//! `ArcSwap` snapshot (value and expiry together), refreshed ahead of expiry by one background task.
//!
//! Invariants:
//! - Only the refresher task talks to the token endpoint, so fetches are single flight by
//!   construction: cold-start requests, upstream 401s and readiness all just wake it and wait.
//! - An upstream 401 never takes the current token away from other requests: it marks the token
//!   due for refresh (as `rotate_now` does), and only the 401-hit requests wait for the new one.
//!   Whether a 401 may force a fetch at all is decided by [`forced`].
//! - A token past `usable_until` is never handed out; requests wait (bounded) and then get the
//!   proxy's 503.
//! - Failed fetches back off exponentially with jitter; waking the task does not shorten a backoff,
//!   so a failing endpoint is never stampeded.

pub mod cache;
pub mod forced;
pub mod schedule;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use http::HeaderValue;
use rand::Rng;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use crate::config::{AuthConfig, AuthMode};
use crate::error::ProxyError;
use crate::secret::Secret;

/// Two forced refreshes (after upstream 401s) are at least this far apart.
const MIN_FORCED_REFRESH_INTERVAL: Duration = Duration::from_secs(1);

/// The longest token lifetime the proxy believes: 30 days (Auth0's own maximum). A longer
/// `expires_in` (or cached expiry) is taken as 30 days, so the token is still refreshed.
pub const MAX_LIFETIME: Duration = Duration::from_secs(30 * 86400);

/// The most of a token endpoint answer the proxy reads; a larger body is a `malformed` fetch.
const MAX_TOKEN_BODY: usize = 64 * 1024;
/// How long a token request waits for `auth.client_secret_file` to be read again before it
/// goes out with the secret in use (a local file takes microseconds).
pub const SECRET_READ_TIMEOUT: Duration = Duration::from_secs(2);

/// Why an upstream 401 was passed through to the client (the `reason` label of
/// `aleph_proxy_unauthorized_passed_through_total`).
pub mod pass_reason {
    /// The body names the contract: a new token cannot fix it.
    pub const CONTRACT: &str = "contract";
    /// A newer token was refused too, or the path's 401s are known not to be the token's doing.
    pub const NOT_TOKEN: &str = "not_token";
    /// No new token could be had in time (the token endpoint fails or is slow).
    pub const NO_NEW_TOKEN: &str = "no_new_token";
    /// The request body was streamed and cannot be sent again.
    pub const NOT_REPLAYABLE: &str = "not_replayable";
}

/// What to do with an upstream 401 that did not name the contract.
pub enum Unauthorized {
    /// Send the request again with this newer token.
    Replay(Arc<Token>),
    /// Give the client the upstream's 401; the reason is one of [`pass_reason`].
    PassThrough(&'static str),
}

/// One token snapshot. Swapped as a whole: value and times never disagree.
pub struct Token {
    /// The complete `authorizationToken` header value, marked sensitive.
    pub header: HeaderValue,
    /// Generation number; tells a stale 401 from a fresh one.
    pub generation: u64,
    pub issued_at: Instant,
    pub usable_until: Instant,
    pub refresh_at: Instant,
    pub expires_at: Instant,
    /// Wall-clock expiry, for the metrics and the token cache.
    pub expires_at_wall: SystemTime,
    /// The raw access token, for `aleph-proxy token` and the cache only.
    pub access_token: Secret,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("header", &"***")
            .field("generation", &self.generation)
            .field("usable_until", &self.usable_until)
            .finish()
    }
}

impl Token {
    pub fn is_usable(&self, now: Instant) -> bool {
        now < self.usable_until
    }

    /// Builds a token snapshot from an access token and its remaining lifetime (taken as at most
    /// [`MAX_LIFETIME`]).
    pub fn new(
        access_token: &str,
        lifetime: Duration,
        generation: u64,
        jitter: f64,
    ) -> Result<Token, FetchError> {
        let mut header = HeaderValue::try_from(format!("Bearer {access_token}")).map_err(|_| {
            FetchError::Malformed("access_token has bytes not allowed in a header".into())
        })?;
        header.set_sensitive(true);
        let lifetime = lifetime.min(MAX_LIFETIME);
        let now = Instant::now();
        let after = |d: Duration| {
            now.checked_add(d)
                .ok_or_else(|| FetchError::Malformed("expires_in is out of range".into()))
        };
        Ok(Token {
            header,
            generation,
            issued_at: now,
            usable_until: after(lifetime - schedule::expiry_margin(lifetime))?,
            refresh_at: after(schedule::refresh_after(lifetime, jitter))?,
            expires_at: after(lifetime)?,
            expires_at_wall: SystemTime::now()
                .checked_add(lifetime)
                .ok_or_else(|| FetchError::Malformed("expires_in is out of range".into()))?,
            access_token: Secret::new(access_token),
        })
    }

    /// The same token, due for refresh at `now` (it stays usable until replaced).
    fn due(&self, now: Instant) -> Token {
        Token {
            header: self.header.clone(),
            generation: self.generation,
            issued_at: self.issued_at,
            usable_until: self.usable_until,
            refresh_at: now,
            expires_at: self.expires_at,
            expires_at_wall: self.expires_at_wall,
            access_token: self.access_token.clone(),
        }
    }

    fn legacy(client_id: &str, secret: &Secret) -> Result<Token, FetchError> {
        let mut header =
            HeaderValue::try_from(format!("Key,Secret {},{}", client_id, secret.expose()))
                .map_err(|_| {
                    FetchError::Malformed(
                        "client id or secret has bytes not allowed in a header".into(),
                    )
                })?;
        header.set_sensitive(true);
        let now = Instant::now();
        let far = Duration::from_secs(100 * 365 * 86400);
        Ok(Token {
            header,
            generation: 1,
            issued_at: now,
            usable_until: now + far,
            refresh_at: now + far,
            expires_at: now + far,
            expires_at_wall: SystemTime::now() + far,
            access_token: Secret::default(),
        })
    }
}

/// Why a fetch failed. Display never includes a secret or a token.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    #[error("token endpoint unreachable: {0}")]
    Unreachable(String),
    #[error("token endpoint timed out")]
    Timeout,
    #[error("token endpoint rejected the credentials ({0}): check auth.client_id and auth.client_secret")]
    Credentials(String),
    #[error("token endpoint is rate limiting (429)")]
    RateLimited { retry_after: Option<Duration> },
    /// The status, and the endpoint's RFC 6749 error code when it sent one.
    #[error("token endpoint answered {0}")]
    Status(String),
    #[error("token endpoint answered 200 with an unusable body: {0}")]
    Malformed(String),
}

impl FetchError {
    pub fn outcome(&self) -> &'static str {
        match self {
            FetchError::Unreachable(_) => "unreachable",
            FetchError::Timeout => "timeout",
            FetchError::Credentials(_) => "rejected",
            FetchError::RateLimited { .. } => "rate_limited",
            FetchError::Status(_) => "error_status",
            FetchError::Malformed(_) => "malformed",
        }
    }
}

#[derive(serde::Deserialize)]
struct TokenResponse {
    access_token: Option<String>,
    expires_in: Option<serde_json::Value>,
    token_type: Option<String>,
}

#[derive(serde::Deserialize, Default)]
struct TokenErrorBody {
    error: Option<String>,
}

enum Source {
    OAuth {
        http: reqwest::Client,
        url: url::Url,
        /// The client secret in use: the configured one, or what `auth.client_secret_file`
        /// held at the last fetch. std Mutex: never held across .await.
        secret: Mutex<Secret>,
    },
    Legacy(Token),
}

/// Holds and refreshes one credential's token. Shared by every listener using that credential.
pub struct TokenManager {
    current: ArcSwapOption<Token>,
    source: Source,
    wake: Notify,
    generation: AtomicU64,
    updates: watch::Sender<u64>,
    /// Counts the refresher's failed fetches: requests waiting for a forced refresh stop waiting.
    failures: watch::Sender<u64>,
    cfg: AuthConfig,
    /// Fetch outcomes for `aleph-proxy check` and the logs. std Mutex: never held across .await.
    last_error: Mutex<Option<FetchError>>,
    /// When the refresher tries again after a failure (None while it is not backing off).
    retry_at: Mutex<Option<Instant>>,
    /// Which upstream 401s may force a refresh. Touched on 401s only, never on the success path.
    forced: Mutex<forced::Forced>,
    fetches: AtomicU64,
}

impl TokenManager {
    pub fn new(
        cfg: &AuthConfig,
        tls: rustls::ClientConfig,
        timeout: Duration,
    ) -> Result<Arc<TokenManager>, String> {
        let (updates, _) = watch::channel(0);
        let source = match cfg.mode {
            AuthMode::Legacy => Source::Legacy(
                Token::legacy(&cfg.client_id, &cfg.client_secret).map_err(|e| e.to_string())?,
            ),
            AuthMode::OAuth => {
                let http = reqwest::Client::builder()
                    .use_preconfigured_tls(tls)
                    .timeout(timeout)
                    .connect_timeout(timeout)
                    .redirect(reqwest::redirect::Policy::none())
                    .user_agent(concat!("aleph-proxy/", env!("CARGO_PKG_VERSION")))
                    .build()
                    .map_err(|e| format!("cannot build the token client: {e}"))?;
                Source::OAuth {
                    http,
                    url: cfg.token_url.clone(),
                    secret: Mutex::new(cfg.client_secret.clone()),
                }
            }
        };
        let mgr = TokenManager {
            current: ArcSwapOption::empty(),
            source,
            wake: Notify::new(),
            generation: AtomicU64::new(0),
            updates,
            failures: watch::channel(0).0,
            cfg: cfg.clone(),
            last_error: Mutex::new(None),
            retry_at: Mutex::new(None),
            forced: Mutex::new(forced::Forced::default()),
            fetches: AtomicU64::new(0),
        };
        if let Source::Legacy(t) = &mgr.source {
            mgr.current.store(Some(Arc::new(Token {
                header: t.header.clone(),
                generation: 1,
                issued_at: t.issued_at,
                usable_until: t.usable_until,
                refresh_at: t.refresh_at,
                expires_at: t.expires_at,
                expires_at_wall: t.expires_at_wall,
                access_token: Secret::default(),
            })));
        } else if let Some(path) = &cfg.token_cache {
            if let Some((access_token, remaining)) = cache::load(path, cfg) {
                let generation = mgr.generation.fetch_add(1, Ordering::Relaxed) + 1;
                if let Ok(t) =
                    Token::new(&access_token, remaining, generation, rand::rng().random())
                {
                    tracing::info!(
                        expires_in_s = remaining.as_secs(),
                        "using the cached access token"
                    );
                    mgr.publish(t);
                }
            }
        }
        Ok(Arc::new(mgr))
    }

    pub fn client_id(&self) -> &str {
        &self.cfg.client_id
    }

    /// How long requests wait for a token (and for contract discovery).
    pub fn wait_timeout(&self) -> Duration {
        self.cfg.wait_timeout
    }

    pub fn is_legacy(&self) -> bool {
        matches!(self.source, Source::Legacy(_))
    }

    /// The current token when it is usable right now (the hot path: one atomic load).
    pub fn current_usable(&self) -> Option<Arc<Token>> {
        let t = self.current.load_full()?;
        t.is_usable(Instant::now()).then_some(t)
    }

    /// Seconds until the current token expires (negative when expired, None without one).
    pub fn seconds_to_expiry(&self) -> Option<f64> {
        let t = self.current.load_full()?;
        let now = Instant::now();
        Some(if t.expires_at >= now {
            (t.expires_at - now).as_secs_f64()
        } else {
            -((now - t.expires_at).as_secs_f64())
        })
    }

    /// Number of token fetches attempted so far.
    pub fn fetch_count(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }

    pub fn last_error(&self) -> Option<FetchError> {
        self.last_error.lock().expect("not poisoned").clone()
    }

    /// A usable token, waiting up to `auth.wait_timeout` for the refresher when there is none.
    pub async fn token(&self) -> Result<Arc<Token>, ProxyError> {
        if let Some(t) = self.current_usable() {
            return Ok(t);
        }
        self.wait_for_token(self.cfg.wait_timeout).await
    }

    /// Waits up to `limit` for a usable token.
    pub async fn wait_for_token(&self, limit: Duration) -> Result<Arc<Token>, ProxyError> {
        let mut rx = self.updates.subscribe();
        self.wake.notify_one();
        let deadline = Instant::now() + limit;
        loop {
            if let Some(t) = self.current_usable() {
                return Ok(t);
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                _ => return Err(self.no_token()),
            }
        }
    }

    /// The proxy's 503 for a missing token. Its Retry-After is the time until the refresher's
    /// next attempt when it is backing off (at least 1 s, at most `auth.retry_max_backoff`),
    /// else `auth.retry_initial_backoff` (at least 1 s).
    pub fn no_token(&self) -> ProxyError {
        let one = Duration::from_secs(1);
        let next = *self.retry_at.lock().expect("not poisoned");
        let retry_after = match next {
            Some(at) => {
                let left = at.saturating_duration_since(Instant::now());
                // Whole seconds, rounded up: a client that waits that long finds the attempt made.
                let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
                Duration::from_secs(secs).clamp(one, self.cfg.retry_max_backoff.max(one))
            }
            None => self.cfg.retry_initial_backoff.max(one),
        };
        ProxyError::NoToken { retry_after }
    }

    /// The upstream answered 401 to `token` on `path`, and the body does not name the contract.
    ///
    /// The current token is never taken away: if a new token may help (see [`forced`]), it is
    /// marked due for refresh, so other requests keep using it while the refresher fetches a new
    /// one (one fetch for every 401 with the same token). The caller waits for a token newer than
    /// the refused one, up to `auth.wait_timeout`, and not at all while the token endpoint fails:
    /// then the 401 is passed through at once. Callers that cannot replay wait all the same, so
    /// that the client's next attempt finds the new token.
    pub async fn unauthorized(&self, token: &Token, path: &str) -> Unauthorized {
        if self.is_legacy() {
            // A legacy key is never refreshed: nothing to wait for.
            return Unauthorized::PassThrough(pass_reason::NOT_TOKEN);
        }
        // Subscribed before deciding, so no publish or failure in between goes unseen.
        let mut updates = self.updates.subscribe();
        let mut failures = self.failures.subscribe();
        let now = Instant::now();
        let decision = self.forced.lock().expect("not poisoned").on_401(
            token.generation,
            self.generation(),
            path,
            now,
        );
        match decision {
            forced::Decision::PassThrough => {
                return Unauthorized::PassThrough(pass_reason::NOT_TOKEN)
            }
            forced::Decision::Refresh => {
                let generation = token.generation;
                self.current.rcu(|cur| match cur {
                    Some(t) if t.generation == generation && t.refresh_at > now => {
                        Some(Arc::new(t.due(now)))
                    }
                    other => other.clone(),
                });
                tracing::warn!(
                    generation,
                    "upstream rejected the access token (401); fetching a new one, the current one stays in use meanwhile"
                );
                metrics::counter!("aleph_proxy_token_invalidations_total").increment(1);
                self.wake.notify_one();
            }
            forced::Decision::Join | forced::Decision::Newer => self.wake.notify_one(),
        }
        // A refresher that is backing off after a failure does not try sooner for being woken:
        // the 401 goes back now rather than after the wait.
        if decision != forced::Decision::Newer && self.last_error().is_some() {
            return Unauthorized::PassThrough(pass_reason::NO_NEW_TOKEN);
        }
        let deadline = now + self.cfg.wait_timeout;
        loop {
            if let Some(t) = self.current_usable() {
                if t.generation > token.generation {
                    return Unauthorized::Replay(t);
                }
            }
            tokio::select! {
                changed = updates.changed() => if changed.is_err() {
                    return Unauthorized::PassThrough(pass_reason::NO_NEW_TOKEN);
                },
                _ = failures.changed() => return Unauthorized::PassThrough(pass_reason::NO_NEW_TOKEN),
                _ = tokio::time::sleep_until(deadline) => {
                    return Unauthorized::PassThrough(pass_reason::NO_NEW_TOKEN)
                }
            }
        }
    }

    /// The request replayed on `path` with `replayed` (newer than the `refused` token) was
    /// answered 401 (`unauthorized`) or otherwise: a refused replay means the 401 is not the
    /// token's doing and opens a hold-off window; an accepted one closes it.
    pub fn replay_answered(
        &self,
        refused: &Token,
        replayed: &Token,
        path: &str,
        unauthorized: bool,
    ) {
        if replayed.generation <= refused.generation {
            return;
        }
        let outcome = self.forced.lock().expect("not poisoned").replayed(
            replayed.generation,
            path,
            unauthorized,
            Instant::now(),
        );
        match outcome {
            forced::Replayed::HoldOff(window) => tracing::warn!(
                path,
                holdoff_s = window.as_secs(),
                "the upstream refused a new access token on this path as well: the 401 is not the token's doing; it is passed through, and 401s like it fetch no token for a while"
            ),
            forced::Replayed::Reset => tracing::info!(
                "a new access token fixed an upstream 401; 401s fetch new tokens as usual again"
            ),
            forced::Replayed::Nothing => {}
        }
    }

    /// Makes a token fetched outside the refresher current (the `check` and `contracts` commands).
    pub fn install_for_tools(&self, t: Token) {
        self.publish(t);
    }

    fn publish(&self, t: Token) {
        let generation = t.generation;
        self.current.store(Some(Arc::new(t)));
        self.updates.send_replace(generation);
    }

    /// Forces the next refresh now (tests, rotations): the refresher fetches a new
    /// token while the current one stays in use until replaced.
    pub fn rotate_now(&self) {
        let now = Instant::now();
        // rcu: a token the refresher publishes meanwhile is kept, not replaced by the old one.
        self.current
            .rcu(|cur| cur.as_ref().map(|t| Arc::new(t.due(now))));
        self.wake.notify_one();
    }

    /// Waits until a token newer than generation `after` is published (or the timeout passes).
    pub async fn wait_for_generation(&self, after: u64, limit: Duration) -> bool {
        let mut rx = self.updates.subscribe();
        let deadline = Instant::now() + limit;
        loop {
            if *rx.borrow_and_update() > after {
                return true;
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return false;
            }
        }
    }

    pub fn generation(&self) -> u64 {
        self.current.load().as_ref().map_or(0, |t| t.generation)
    }

    /// The secret for the next token request. With `auth.client_secret_file`, the file is read
    /// again (a token request comes every few hours, or on a backoff during an outage), so a
    /// rotated secret is used from the next attempt on; an unreadable or empty file keeps the
    /// secret in use. The read runs on tokio's blocking pool and is given [`SECRET_READ_TIMEOUT`]:
    /// a hung mount (NFS, a CSI driver) then delays this token request, not every request the
    /// proxy is serving (with one CPU the runtime has a single thread), and the secret in use
    /// goes out when the read does not finish in time.
    async fn secret_for_fetch(&self, current: &Mutex<Secret>) -> Secret {
        let lock = || current.lock().unwrap_or_else(|e| e.into_inner());
        let Some(path) = self.cfg.client_secret_file.clone() else {
            return lock().clone();
        };
        let read = tokio::time::timeout(
            SECRET_READ_TIMEOUT,
            tokio::task::spawn_blocking(move || crate::config::read_secret_file(&path)),
        )
        .await;
        let mut current = lock();
        match read {
            Ok(Ok(Ok((new, _)))) if new.expose() != current.expose() => {
                tracing::info!(
                    client_id = %self.cfg.client_id,
                    "auth.client_secret_file holds a new secret: used from this token request on"
                );
                *current = new;
            }
            Ok(Ok(Ok(_))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(
                client_id = %self.cfg.client_id,
                error = %e,
                "auth.client_secret_file cannot be read again: the secret read before stays in use"
            ),
            Ok(Err(e)) => tracing::warn!(
                client_id = %self.cfg.client_id,
                error = %e,
                "reading auth.client_secret_file failed: the secret read before stays in use"
            ),
            Err(_) => tracing::warn!(
                client_id = %self.cfg.client_id,
                timeout_ms = SECRET_READ_TIMEOUT.as_millis() as u64,
                "auth.client_secret_file did not answer in time (a hung mount?): the secret read before is used for this token request"
            ),
        }
        current.clone()
    }

    /// One fetch from the token endpoint.
    pub async fn fetch(&self) -> Result<Token, FetchError> {
        let Source::OAuth { http, url, secret } = &self.source else {
            return Token::legacy(&self.cfg.client_id, &self.cfg.client_secret);
        };
        // The JSON request body holds the client secret, so it is never logged.
        let body = Secret::new(
            serde_json::json!({
                "client_id": self.cfg.client_id,
                "client_secret": self.secret_for_fetch(secret).await.expose(),
                "audience": self.cfg.audience,
                "grant_type": "client_credentials",
            })
            .to_string(),
        );
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let started = std::time::Instant::now();
        let result = async {
            let resp = http
                .post(url.clone())
                .header(http::header::CONTENT_TYPE, "application/json")
                .header(http::header::ACCEPT, "application/json")
                .body(body.expose().to_string())
                .send()
                .await
                .map_err(|e| {
                    if e.is_timeout() {
                        FetchError::Timeout
                    } else {
                        FetchError::Unreachable(describe_reqwest(&e))
                    }
                })?;
            let status = resp.status();
            let retry_after = resp
                .headers()
                .get(http::header::RETRY_AFTER)
                .and_then(crate::proxy::retry_after_delay);
            // Read chunk by chunk, at most MAX_TOKEN_BODY: an endless or huge body costs no memory.
            let mut resp = resp;
            let mut bytes = Vec::new();
            let mut too_large = resp
                .content_length()
                .is_some_and(|n| n > MAX_TOKEN_BODY as u64);
            while !too_large {
                let chunk = resp.chunk().await.map_err(|e| {
                    if e.is_timeout() {
                        FetchError::Timeout
                    } else {
                        FetchError::Unreachable(describe_reqwest(&e))
                    }
                })?;
                let Some(chunk) = chunk else { break };
                if bytes.len() + chunk.len() > MAX_TOKEN_BODY {
                    too_large = true;
                } else {
                    bytes.extend_from_slice(&chunk);
                }
            }
            drop(resp);
            if status == http::StatusCode::TOO_MANY_REQUESTS {
                return Err(FetchError::RateLimited { retry_after });
            }
            if !status.is_success() {
                let err: TokenErrorBody = if too_large {
                    TokenErrorBody::default()
                } else {
                    serde_json::from_slice(&bytes).unwrap_or_default()
                };
                let code = err.error.unwrap_or_default();
                let credential_problem = matches!(status.as_u16(), 401 | 403)
                    || matches!(
                        code.as_str(),
                        "invalid_client"
                            | "unauthorized_client"
                            | "access_denied"
                            | "invalid_grant"
                    );
                let what = if code.is_empty() {
                    status.as_u16().to_string()
                } else {
                    format!("{} {}", status.as_u16(), self.error_code(&code))
                };
                if credential_problem {
                    return Err(FetchError::Credentials(what));
                }
                return Err(FetchError::Status(what));
            }
            if too_large {
                return Err(FetchError::Malformed(format!(
                    "larger than {} KiB",
                    MAX_TOKEN_BODY / 1024
                )));
            }
            // Never log this body: it is the token.
            let parsed: TokenResponse = serde_json::from_slice(&bytes)
                .map_err(|_| FetchError::Malformed("not a JSON token response".into()))?;
            let access_token = parsed
                .access_token
                .filter(|t| !t.trim().is_empty())
                .ok_or_else(|| FetchError::Malformed("no access_token".into()))?;
            if let Some(tt) = &parsed.token_type {
                if !tt.eq_ignore_ascii_case("bearer") {
                    // Remote text: not quoted.
                    return Err(FetchError::Malformed("token_type is not Bearer".into()));
                }
            }
            let lifetime = match parsed.expires_in {
                Some(serde_json::Value::Number(n)) => n.as_f64(),
                Some(serde_json::Value::String(s)) => s.trim().parse::<f64>().ok(),
                None => Some(3600.0),
                _ => None,
            }
            .filter(|s| s.is_finite() && *s >= 1.0)
            .ok_or_else(|| FetchError::Malformed("expires_in is not a positive number".into()))?;
            let max = MAX_LIFETIME.as_secs_f64();
            if lifetime > max {
                tracing::warn!(
                    expires_in_s = lifetime,
                    max_s = max,
                    "the token endpoint's expires_in is beyond 30 days; the token is refreshed as if it lived 30 days"
                );
            }
            let lifetime = lifetime.min(max);
            let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
            Token::new(
                access_token.trim(),
                Duration::from_secs_f64(lifetime),
                generation,
                rand::rng().random(),
            )
        }
        .await;
        let outcome = match &result {
            Ok(_) => "success",
            Err(e) => e.outcome(),
        };
        metrics::counter!("aleph_proxy_token_fetches_total", "outcome" => outcome).increment(1);
        metrics::histogram!("aleph_proxy_token_fetch_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        result
    }

    /// The refresher: keeps a usable token until `shutdown` resolves.
    pub async fn run_refresher(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        if self.is_legacy() {
            return;
        }
        tokio::pin!(shutdown);
        let mut failures: u32 = 0;
        // Whether this series of failures has already said CREDENTIAL PROBLEM: a series that
        // starts with an outage and turns into a rejection must still say so, once.
        let mut credentials_reported = false;
        let mut last_fetch: Option<Instant> = None;
        loop {
            let now = Instant::now();
            if let Some(t) = self.current.load_full() {
                if now < t.refresh_at {
                    self.record_expiry_gauge();
                    tokio::select! {
                        _ = tokio::time::sleep_until(t.refresh_at) => {}
                        _ = self.wake.notified() => {}
                        _ = &mut shutdown => return,
                    }
                    continue;
                }
            }
            // Rate limit forced refreshes: a 401 storm must not become a token storm.
            if let Some(last) = last_fetch {
                let earliest = last + MIN_FORCED_REFRESH_INTERVAL;
                if now < earliest {
                    tokio::select! {
                        _ = tokio::time::sleep_until(earliest) => {}
                        _ = &mut shutdown => return,
                    }
                }
            }
            last_fetch = Some(Instant::now());
            match self.fetch().await {
                Ok(token) => {
                    if failures > 0 {
                        tracing::info!(
                            after_failures = failures,
                            "token endpoint recovered; new access token in use"
                        );
                    } else {
                        tracing::info!(
                            expires_in_s = (token.expires_at - token.issued_at).as_secs(),
                            refresh_in_s = (token.refresh_at - token.issued_at).as_secs(),
                            "access token refreshed"
                        );
                    }
                    failures = 0;
                    credentials_reported = false;
                    *self.last_error.lock().expect("not poisoned") = None;
                    *self.retry_at.lock().expect("not poisoned") = None;
                    if let Some(path) = &self.cfg.token_cache {
                        cache::store(path, &self.cfg, &token);
                    }
                    self.publish(token);
                    self.record_expiry_gauge();
                }
                Err(err) => {
                    let delay = schedule::backoff(
                        failures,
                        self.cfg.retry_initial_backoff,
                        self.cfg.retry_max_backoff,
                        rand::rng().random(),
                    );
                    // A Retry-After is honoured, but only up to the configured maximum backoff:
                    // a bogus one (a day, a date far ahead) must not stall refreshes.
                    let delay = match &err {
                        FetchError::RateLimited {
                            retry_after: Some(ra),
                        } => delay.max((*ra).min(self.cfg.retry_max_backoff)),
                        _ => delay,
                    };
                    let still_usable = self.current_usable().is_some();
                    // Once per series at error level; the rest at warn with the attempt count.
                    let rejected = matches!(err, FetchError::Credentials(_));
                    if rejected && !credentials_reported {
                        credentials_reported = true;
                        tracing::error!(
                            error = %err,
                            attempt = failures + 1,
                            retry_in_ms = delay.as_millis() as u64,
                            current_token_usable = still_usable,
                            "{}",
                            if still_usable {
                                "CREDENTIAL PROBLEM: the token endpoint rejects this client; requests will fail once the current token expires"
                            } else {
                                "CREDENTIAL PROBLEM: the token endpoint rejects this client; requests fail until it accepts it"
                            }
                        );
                    } else if failures == 0 {
                        tracing::error!(
                            error = %err,
                            retry_in_ms = delay.as_millis() as u64,
                            current_token_usable = still_usable,
                            "cannot fetch an access token; retrying with backoff"
                        );
                    } else {
                        tracing::warn!(
                            error = %err,
                            attempt = failures + 1,
                            retry_in_ms = delay.as_millis() as u64,
                            current_token_usable = still_usable,
                            "token fetch failed again"
                        );
                    }
                    failures = failures.saturating_add(1);
                    *self.last_error.lock().expect("not poisoned") = Some(err);
                    *self.retry_at.lock().expect("not poisoned") =
                        Instant::now().checked_add(delay);
                    self.failures.send_modify(|n| *n += 1);
                    self.record_expiry_gauge();
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = &mut shutdown => return,
                    }
                }
            }
        }
    }

    fn record_expiry_gauge(&self) {
        if let Some(s) = self.seconds_to_expiry() {
            metrics::gauge!("aleph_proxy_token_expiry_seconds", "client_id" => self.cfg.client_id.clone())
                .set(s);
        }
    }
}

/// A reqwest error as text without its URL query or any body.
fn describe_reqwest(e: &reqwest::Error) -> String {
    let mut s = if e.is_connect() {
        "connection failed".to_string()
    } else if e.is_request() {
        "request failed".to_string()
    } else if e.is_body() || e.is_decode() {
        "body failed".to_string()
    } else {
        "error".to_string()
    };
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&sanitize(&inner.to_string()));
        source = inner.source();
    }
    s
}

impl TokenManager {
    /// An RFC 6749 §5.2 `error` code as the logs, `/readyz` and the commands show it: only a code
    /// of 1 to 40 lowercase letters and underscores, and never one that holds (or is part of) the
    /// client secret or client id, which an endpoint echoing its request could put there.
    fn error_code<'a>(&self, code: &'a str) -> &'a str {
        let shaped = (1..=40).contains(&code.len())
            && code.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
        let secret = self.cfg.client_secret.expose();
        let id = self.cfg.client_id.as_str();
        let overlaps = |s: &str| !s.is_empty() && (code.contains(s) || s.contains(code));
        if shaped && !overlaps(secret) && !overlaps(id) {
            code
        } else {
            "unrecognised error"
        }
    }
}

/// Keeps only printable ASCII of a remote-supplied string, truncated.
fn sanitize(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .take(120)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock::{Mock, MockOptions, TokenMode, MOCK_CLIENT_ID, MOCK_CLIENT_SECRET};

    fn auth(mock: &Mock, client_id: &str, secret: &str) -> AuthConfig {
        AuthConfig {
            mode: AuthMode::OAuth,
            token_url: mock.token_url.parse().unwrap(),
            audience: "https://api.satellogic.com/".into(),
            client_id: client_id.into(),
            client_secret: Secret::new(secret),
            client_secret_file: None,
            token_cache: None,
            wait_timeout: Duration::from_secs(1),
            retry_initial_backoff: Duration::from_secs(1),
            retry_max_backoff: Duration::from_secs(1),
        }
    }

    /// One fetch from a token endpoint that answers `status` with `body`.
    async fn fetch_answer(
        status: u16,
        body: String,
        client_id: &str,
        secret: &str,
    ) -> Result<Token, FetchError> {
        let mock = Mock::start(MockOptions::default()).await.unwrap();
        mock.state
            .set_token_mode(TokenMode::Custom { status, body });
        let tls = crate::upstream::tls_config(None).unwrap();
        let m = TokenManager::new(&auth(&mock, client_id, secret), tls, Duration::from_secs(5))
            .unwrap();
        m.fetch().await
    }

    const THIRTY_DAYS: Duration = Duration::from_secs(30 * 86400);

    #[test]
    fn a_lifetime_of_any_size_is_taken_as_at_most_thirty_days() {
        for lifetime in [
            Duration::MAX,
            Duration::from_secs(u64::MAX / 2),
            2 * THIRTY_DAYS,
        ] {
            let t = Token::new("t", lifetime, 1, 0.5).unwrap();
            assert_eq!(t.expires_at - t.issued_at, THIRTY_DAYS);
            assert!(t.refresh_at < t.usable_until);
        }
    }

    #[tokio::test]
    async fn a_huge_expires_in_is_clamped_and_the_token_still_refreshed() {
        for expires_in in ["1e17", "1e19", "1e20", "1.7976931348623157e308", "\"1e30\""] {
            let body = format!(
                r#"{{"access_token":"t","expires_in":{expires_in},"token_type":"Bearer"}}"#
            );
            let t = fetch_answer(200, body, MOCK_CLIENT_ID, MOCK_CLIENT_SECRET)
                .await
                .unwrap_or_else(|e| panic!("{expires_in}: {e}"));
            assert_eq!(t.expires_at - t.issued_at, THIRTY_DAYS, "{expires_in}");
            assert!(
                t.refresh_at - t.issued_at <= THIRTY_DAYS / 2,
                "{expires_in}"
            );
        }
    }

    #[tokio::test]
    async fn the_endpoints_error_text_is_shown_only_as_an_error_code() {
        let secret = "lowercasesecretvalue";
        let id = "lowercaseclient";
        for (status, error, shown) in [
            (401, "invalid_client".to_string(), "401 invalid_client"),
            (400, "access_denied".to_string(), "400 access_denied"),
            (
                401,
                format!("invalid_client for secret {secret}"),
                "401 unrecognised error",
            ),
            (403, secret.to_string(), "403 unrecognised error"),
            (403, format!("x_{secret}_x"), "403 unrecognised error"),
            (403, "lowercasesecret".to_string(), "403 unrecognised error"),
            (401, id.to_string(), "401 unrecognised error"),
            (401, "Invalid-Client".to_string(), "401 unrecognised error"),
            (401, "a".repeat(41), "401 unrecognised error"),
            // Not about the credentials: shown with the status all the same.
            (400, "invalid_request".to_string(), "400 invalid_request"),
            (500, "server_error".to_string(), "500 server_error"),
            (500, format!("boom {secret}"), "500 unrecognised error"),
        ] {
            let body = serde_json::json!({ "error": error }).to_string();
            let err = fetch_answer(status, body, id, secret).await.err().unwrap();
            let text = err.to_string();
            assert!(text.contains(shown), "{error}: {text}");
            assert!(!text.contains("lowercase"), "{error}: {text}");
        }
    }

    #[tokio::test]
    async fn a_token_answer_over_64_kib_is_malformed() {
        let token = r#"{"access_token":"t","expires_in":3600,"token_type":"Bearer"}"#;
        // Within the limit: a token, however padded.
        let padded = format!("{token}{}", " ".repeat(60 * 1024));
        assert!(
            fetch_answer(200, padded, MOCK_CLIENT_ID, MOCK_CLIENT_SECRET)
                .await
                .is_ok()
        );
        let huge = format!("{token}{}", " ".repeat(65 * 1024));
        let err = fetch_answer(200, huge, MOCK_CLIENT_ID, MOCK_CLIENT_SECRET)
            .await
            .err()
            .unwrap();
        assert_eq!(err.outcome(), "malformed", "{err}");
        assert!(err.to_string().contains("larger than 64 KiB"), "{err}");
        // An error answer that large is still its status.
        let huge_error = format!(r#"{{"error":"server_error"}}{}"#, " ".repeat(65 * 1024));
        let err = fetch_answer(500, huge_error, MOCK_CLIENT_ID, MOCK_CLIENT_SECRET)
            .await
            .err()
            .unwrap();
        assert_eq!(err.outcome(), "error_status", "{err}");
    }
}
