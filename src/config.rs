//! Configuration: figment layers (defaults < TOML file < `ALEPH_PROXY_*` env < CLI flags) parsed into a
//! typed, validated [`Config`]. Every problem (unknown key, bad type, bad value) is collected and
//! reported at once; secrets are held in [`Secret`] and never printed.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::{Dict, Value};
use figment::{Figment, Provider as _};
use ipnet::IpNet;
use url::Url;

use crate::secret::Secret;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";
pub const DEFAULT_UPSTREAM: &str = "https://api.satellogic.com";
pub const DEFAULT_TOKEN_URL: &str = "https://auth.platform.satellogic.com/oauth/token";
pub const DEFAULT_AUDIENCE: &str = "https://api.satellogic.com/";
pub const ENV_PREFIX: &str = "ALEPH_PROXY_";

/// Every key the configuration accepts, as dotted paths. `[]` marks an array of tables.
/// Unknown keys are errors (a typo must not silently fall back to a default).
/// The longest duration any setting takes: past it, a deadline computed from it could overflow
/// the clock, and no timeout or backoff of a proxy is meant to be longer.
const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

const KNOWN_KEYS: &[&str] = &[
    "listen",
    "upstream",
    "upstream_ca_file",
    "public_url",
    "auth",
    "auth.mode",
    "auth.token_url",
    "auth.audience",
    "auth.client_id",
    "auth.client_secret",
    "auth.client_secret_file",
    "auth.token_cache",
    "auth.wait_timeout",
    "auth.retry_initial_backoff",
    "auth.retry_max_backoff",
    "contract",
    "contract.default",
    "contract.allow_client_override",
    "contract.routes",
    "contract.routes[].prefix",
    "contract.routes[].id",
    "admin",
    "admin.listen",
    "listeners",
    "listeners[].listen",
    "listeners[].contract",
    "listeners[].public_url",
    "listeners[].auth",
    "listeners[].auth.client_id",
    "listeners[].auth.client_secret",
    "listeners[].auth.client_secret_file",
    "timeouts",
    "timeouts.connect",
    "timeouts.response_headers",
    "timeouts.body_idle",
    "timeouts.request_headers",
    "timeouts.client_idle",
    "timeouts.token_request",
    "retry",
    "retry.max_retries",
    "retry.max_elapsed",
    "retry.replay_body_limit",
    "limits",
    "limits.max_in_flight",
    "limits.max_connections",
    "limits.max_request_header_bytes",
    "shutdown",
    "shutdown.drain_timeout",
    "access",
    "access.key_header",
    "access.key",
    "access.key_file",
    "access.allowed_cidrs",
    "access.allowed_hosts",
    "cors",
    "cors.allowed_origins",
    "rewrite",
    "rewrite.enabled",
    "rewrite.max_body_bytes",
    "log",
    "log.format",
    "tcp",
    "tcp.client_congestion_control",
];

/// How the proxy authenticates to the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// OAuth2 client credentials: fetch a bearer token, refresh it ahead of expiry.
    OAuth,
    /// Deprecated `authorizationToken: Key,Secret <id>,<secret>`; no token fetch.
    Legacy,
}

/// One credential (a client id and secret) and how to turn it into a token.
#[derive(Debug, Clone, PartialEq)]
pub struct AuthConfig {
    pub mode: AuthMode,
    pub token_url: Url,
    pub audience: String,
    pub client_id: String,
    pub client_secret: Secret,
    /// Where `client_secret` came from, when it came from a file: read again before every token
    /// request, so a rotated secret (a Kubernetes Secret update) is picked up without a restart.
    pub client_secret_file: Option<PathBuf>,
    pub token_cache: Option<PathBuf>,
    /// How long a request waits for a token when none is valid (cold start, outage).
    pub wait_timeout: Duration,
    pub retry_initial_backoff: Duration,
    pub retry_max_backoff: Duration,
}

impl AuthConfig {
    /// Two listeners with the same key share one token (one fetch, one refresher).
    pub fn share_key(&self) -> (AuthMode, String, String, String) {
        (
            self.mode,
            self.token_url.to_string(),
            self.audience.clone(),
            self.client_id.clone(),
        )
    }
}

/// A `[[contract.routes]]` rule.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ContractRoute {
    pub prefix: String,
    pub id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ContractConfig {
    pub default: Option<String>,
    pub allow_client_override: bool,
    pub routes: Vec<ContractRoute>,
}

/// One proxy listener: an address, the credential it uses and how it picks contracts.
#[derive(Debug, Clone, PartialEq)]
pub struct ListenerConfig {
    pub listen: SocketAddr,
    /// Base URL of this listener's rewritten links: the top-level `public_url` for the main
    /// listener, each `[[listeners]]` entry's own for the others (a listener has its own
    /// contract, so its links must lead back to it).
    pub public_url: Option<Url>,
    /// Index into [`Config::credentials`].
    pub credential: usize,
    pub contract: ContractConfig,
}

/// The upstream API: scheme, authority and base path. Never changes per request.
#[derive(Debug, Clone, PartialEq)]
pub struct Upstream {
    pub url: Url,
}

impl Upstream {
    /// The base path without a trailing slash ("" for the root).
    pub fn base_path(&self) -> &str {
        self.url.path().trim_end_matches('/')
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Timeouts {
    pub connect: Duration,
    /// The request sent (a streamed upload: its last progress) to the response head.
    pub response_headers: Duration,
    pub body_idle: Duration,
    pub request_headers: Duration,
    /// A keep-alive client connection with no new request this long is closed.
    pub client_idle: Duration,
    pub token_request: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RetryConfig {
    /// Retries after the first attempt for idempotent requests (0 disables).
    pub max_retries: u32,
    /// Total time budget for one request including retries and waits.
    pub max_elapsed: Duration,
    /// Request bodies up to this size are kept so the request can be replayed.
    pub replay_body_limit: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub max_in_flight: usize,
    pub max_connections: usize,
    pub max_request_header_bytes: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AccessConfig {
    pub key_header: http::HeaderName,
    pub key: Option<Secret>,
    pub allowed_cidrs: Vec<IpNet>,
    pub allowed_hosts: Vec<String>,
    /// Web origins whose pages may use the proxy: `cors.allowed_origins` (lowercase, no
    /// trailing slash). A request with any other `Origin` is refused (cross-site requests).
    pub allowed_origins: Vec<String>,
}

impl AccessConfig {
    pub fn any_guard(&self) -> bool {
        self.key.is_some() || !self.allowed_cidrs.is_empty() || !self.allowed_hosts.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Copy)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RewriteConfig {
    pub enabled: bool,
    pub max_body_bytes: usize,
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub upstream: Upstream,
    pub upstream_ca_file: Option<PathBuf>,
    pub public_url: Option<Url>,
    pub listeners: Vec<ListenerConfig>,
    pub credentials: Vec<AuthConfig>,
    pub admin_listen: SocketAddr,
    pub timeouts: Timeouts,
    pub retry: RetryConfig,
    pub limits: Limits,
    pub drain_timeout: Duration,
    pub access: AccessConfig,
    pub cors_allowed_origins: Vec<String>,
    pub rewrite: RewriteConfig,
    pub log_format: LogFormat,
    pub client_congestion: crate::tcp::Congestion,
    /// Things that work but deserve a warning (a world-readable secret file). Collected here
    /// because the configuration is read before logging is set up; `run` logs them.
    pub warnings: Vec<String>,
}

/// Every problem found in a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "invalid configuration ({} problem{}):",
            self.problems.len(),
            if self.problems.len() == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            writeln!(f, "  - {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Command-line values that override every other layer (only those given).
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Overrides(pub BTreeMap<String, Value>);

impl Overrides {
    pub fn set(&mut self, dotted: &str, value: impl Into<Value>) {
        self.0.insert(dotted.to_string(), value.into());
    }
}

/// The `ALEPH_PROXY_` environment variables, `__` separating the levels of a key.
fn env_provider() -> Env {
    Env::prefixed(ENV_PREFIX)
        // ALEPH_PROXY_CONFIG names the file (a CLI flag), it is not a key. Kubernetes gives every
        // container of a namespace with a Service named `aleph-proxy` the variables
        // ALEPH_PROXY_PORT, ALEPH_PROXY_PORT_8080_TCP_ADDR, ALEPH_PROXY_SERVICE_HOST, ...: they
        // are not keys either (no key starts with `port` or `service_`).
        .filter(|k| {
            let k = k.as_str();
            !(k.eq_ignore_ascii_case("config")
                || k.eq_ignore_ascii_case("port")
                || k.get(..5).is_some_and(|p| p.eq_ignore_ascii_case("port_"))
                || k.get(..8)
                    .is_some_and(|p| p.eq_ignore_ascii_case("service_")))
        })
        .split("__")
}

/// The figment for a config file path (optional), the process environment and CLI overrides.
pub fn figment(path: Option<&Path>, overrides: &Overrides) -> Figment {
    let mut fig = Figment::new();
    if let Some(p) = path {
        fig = fig.merge(Toml::file_exact(p));
    }
    fig = fig.merge(env_provider());
    for (k, v) in &overrides.0 {
        fig = fig.merge(Serialized::default(k, v.clone()));
    }
    fig
}

/// Loads and validates the configuration.
pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
    if let Some(p) = path {
        let problem = if !p.exists() {
            Some("does not exist")
        } else if p.is_dir() {
            Some("is a directory")
        } else {
            None
        };
        if let Some(problem) = problem {
            return Err(ConfigError {
                problems: vec![format!("config file {} {problem}", p.display())],
            });
        }
    }
    from_figment(&figment(path, overrides))
}

/// Parses a figment into a [`Config`], collecting every problem.
pub fn from_figment(fig: &Figment) -> Result<Config, ConfigError> {
    let mut p = Parser {
        fig,
        problems: Vec::new(),
        warnings: Vec::new(),
    };
    if !p.check_unknown_keys() {
        // The layers could not be read (a TOML syntax error): every value would look missing,
        // and "`auth.client_id` is required" would be a false problem.
        return Err(ConfigError {
            problems: p.problems,
        });
    }
    let mut config = p.parse();
    config.warnings = std::mem::take(&mut p.warnings);
    if p.problems.is_empty() {
        Ok(config)
    } else {
        Err(ConfigError {
            problems: p.problems,
        })
    }
}

struct Parser<'a> {
    fig: &'a Figment,
    problems: Vec<String>,
    warnings: Vec<String>,
}

fn source_of(fig: &Figment, v: &Value) -> String {
    match fig.get_metadata(v.tag()) {
        Some(md) => match &md.source {
            Some(src) => format!(" (from {} {src})", md.name),
            None => format!(" (from {})", md.name),
        },
        None => String::new(),
    }
}

impl Parser<'_> {
    fn problem(&mut self, msg: impl Into<String>) {
        self.problems.push(msg.into());
    }

    /// Reports unknown keys; false when the layers themselves cannot be read.
    fn check_unknown_keys(&mut self) -> bool {
        let dict = match self.fig.extract::<Dict>() {
            Ok(d) => d,
            Err(e) => {
                for err in e {
                    self.problem(without_source_lines(&err.to_string()));
                }
                return false;
            }
        };
        let mut unknown = Vec::new();
        walk_keys(self.fig, &dict, "", &mut unknown);
        for u in unknown {
            self.problem(u);
        }
        true
    }

    /// The value at a dotted key; numeric segments index arrays (`listeners.0.listen`).
    fn value(&self, key: &str) -> Option<Value> {
        let mut segments = key.split('.');
        let mut v = self.fig.find_value(segments.next()?).ok()?;
        for seg in segments {
            v = match v {
                Value::Dict(_, mut d) => d.remove(seg)?,
                Value::Array(_, mut items) => {
                    let i: usize = seg.parse().ok()?;
                    if i >= items.len() {
                        return None;
                    }
                    items.swap_remove(i)
                }
                _ => return None,
            };
        }
        Some(v)
    }

    /// Whether `v` came from the environment.
    fn is_from_env(&self, v: &Value) -> bool {
        self.fig
            .get_metadata(v.tag())
            .is_some_and(|md| md.name == env_provider().metadata().name)
    }

    /// The environment's own text for a string key whose value came from the environment.
    /// figment reads environment values as TOML-like values (`0012` a number, `"x"` unquoted,
    /// `[a]` an array, spaces trimmed): secrets, ids and keys must arrive exactly as written.
    fn raw_env(&self, key: &str, v: &Value) -> Option<String> {
        if !self.is_from_env(v) {
            return None;
        }
        let name = format!("{ENV_PREFIX}{}", key.replace('.', "__"));
        std::env::vars_os().find_map(|(k, value)| {
            let k = k.to_str()?;
            k.eq_ignore_ascii_case(&name)
                .then(|| value.into_string().ok())
                .flatten()
        })
    }

    /// A string value; numbers and booleans given in the file are accepted as their text. Values
    /// from the environment are taken as written ([`Self::raw_env`]).
    fn string(&mut self, key: &str) -> Option<String> {
        let v = self.value(key)?;
        if let Some(raw) = self.raw_env(key, &v) {
            return Some(raw);
        }
        match &v {
            Value::String(_, s) => Some(s.clone()),
            Value::Num(_, n) => Some(
                n.to_u128()
                    .map(|n| n.to_string())
                    .or_else(|| n.to_i128().map(|n| n.to_string()))
                    .or_else(|| n.to_f64().map(|n| n.to_string()))
                    .unwrap_or_default(),
            ),
            Value::Bool(_, b) => Some(b.to_string()),
            other => {
                let src = source_of(self.fig, other);
                self.problem(format!("`{key}` must be a string{src}"));
                None
            }
        }
    }

    fn secret(&mut self, key: &str) -> Option<Secret> {
        let v = self.value(key)?;
        if let Some(raw) = self.raw_env(key, &v) {
            return Some(Secret::new(raw));
        }
        match &v {
            Value::String(_, s) => Some(Secret::new(s.clone())),
            Value::Num(..) | Value::Bool(..) => self.string(key).map(Secret::new),
            other => {
                let src = source_of(self.fig, other);
                // Never print the value of a secret key.
                self.problem(format!("`{key}` must be a string{src}"));
                None
            }
        }
    }

    fn boolean(&mut self, key: &str, default: bool) -> bool {
        let Some(v) = self.value(key) else {
            return default;
        };
        match &v {
            Value::Bool(_, b) => *b,
            Value::String(_, s) if s.eq_ignore_ascii_case("true") => true,
            Value::String(_, s) if s.eq_ignore_ascii_case("false") => false,
            other => {
                let src = source_of(self.fig, other);
                self.problem(format!(
                    "`{key}` must be true or false, not {}{src}",
                    describe(other)
                ));
                default
            }
        }
    }

    fn uint(&mut self, key: &str, default: u64, min: u64) -> u64 {
        let Some(v) = self.value(key) else {
            return default;
        };
        let parsed = match &v {
            Value::Num(_, n) => n
                .to_u128()
                .or_else(|| n.to_i128().and_then(|i| u128::try_from(i).ok()))
                .and_then(|n| u64::try_from(n).ok()),
            Value::String(_, s) => s.trim().parse::<u64>().ok(),
            _ => None,
        };
        match parsed {
            Some(n) if n >= min => n,
            _ => {
                let src = source_of(self.fig, &v);
                self.problem(format!(
                    "`{key}` must be a whole number of at least {min}, not {}{src}",
                    describe(&v)
                ));
                default
            }
        }
    }

    fn duration(&mut self, key: &str, default: Duration) -> Duration {
        let Some(v) = self.value(key) else {
            return default;
        };
        let parsed = match &v {
            Value::Num(_, n) => match n.to_u128() {
                Some(whole) => u64::try_from(whole).ok().map(Duration::from_secs),
                None => n.to_f64().and_then(|f| Duration::try_from_secs_f64(f).ok()),
            },
            Value::String(_, s) => humantime::parse_duration(s.trim()).ok(),
            _ => None,
        };
        match parsed {
            Some(d) if !d.is_zero() && d <= MAX_DURATION => d,
            _ => {
                let src = source_of(self.fig, &v);
                self.problem(format!(
                    "`{key}` must be a positive duration of at most a year, such as \"10s\", \"500ms\" or \"5m\", not {}{src}",
                    describe(&v)
                ));
                default
            }
        }
    }

    fn socket_addr(&mut self, key: &str, default: &str) -> SocketAddr {
        let text = self.string(key).unwrap_or_else(|| default.to_string());
        match parse_listen(&text) {
            Ok(a) => a,
            Err(e) => {
                self.problem(format!("`{key}`: {e}"));
                default.parse().expect("default address parses")
            }
        }
    }

    fn url(&mut self, key: &str, default: &str) -> Url {
        let text = self.string(key).unwrap_or_else(|| default.to_string());
        match parse_http_url(&text) {
            Ok(u) => u,
            Err(e) => {
                self.problem(format!("`{key}`: {e}"));
                Url::parse(default).expect("default url parses")
            }
        }
    }

    /// A `public_url`-type key; `shown` is its name in problems (`listeners[1].public_url`).
    fn public_url(&mut self, key: &str, shown: &str) -> Option<Url> {
        let text = self.string(key)?;
        match parse_http_url(&text) {
            Ok(u) => Some(u),
            Err(e) => {
                self.problem(format!("`{shown}`: {e}"));
                None
            }
        }
    }

    fn path(&mut self, key: &str) -> Option<PathBuf> {
        self.string(key)
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
    }

    fn string_list(&mut self, key: &str) -> Vec<String> {
        let Some(v) = self.value(key) else {
            return Vec::new();
        };
        match &v {
            Value::Array(_, items) => {
                let mut out = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    match item {
                        Value::String(_, s) => out.push(s.clone()),
                        other => {
                            let src = source_of(self.fig, other);
                            self.problem(format!("`{key}[{i}]` must be a string{src}"));
                        }
                    }
                }
                out
            }
            // Env convenience: ALEPH_PROXY_ACCESS__ALLOWED_HOSTS="a,b"
            Value::String(_, s) => s
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
            other => {
                let src = source_of(self.fig, other);
                self.problem(format!("`{key}` must be a list of strings{src}"));
                Vec::new()
            }
        }
    }

    /// Reads a secret given inline (`key`) or as a file (`file_key`). Given both in one layer,
    /// that is an error; in different layers, the environment's wins over the file's, as it does
    /// for every key. `Err` when a problem was reported.
    fn secret_inline_or_file(&mut self, key: &str, file_key: &str) -> Result<Option<Secret>, ()> {
        self.secret_and_file(key, file_key)
            .map(|found| found.map(|(secret, _)| secret))
    }

    /// [`Self::secret_inline_or_file`], with the file the secret was read from, if any.
    fn secret_and_file(
        &mut self,
        key: &str,
        file_key: &str,
    ) -> Result<Option<(Secret, Option<PathBuf>)>, ()> {
        let (inline_env, file_env) = (
            self.value(key).is_some_and(|v| self.is_from_env(&v)),
            self.value(file_key).is_some_and(|v| self.is_from_env(&v)),
        );
        let reported = self.problems.len();
        let inline = self.secret(key);
        let file = self.path(file_key);
        if self.problems.len() > reported {
            // A value of the wrong type was reported: not "required" as well.
            return Err(());
        }
        let from_file = |p: &mut Self, path: PathBuf| {
            p.secret_file(file_key, &path)
                .map(|found| found.map(|secret| (secret, Some(path))))
        };
        match (inline, file) {
            (Some(s), Some(_)) if inline_env && !file_env => Ok(Some((s, None))),
            (Some(_), Some(path)) if file_env && !inline_env => from_file(self, path),
            (Some(_), Some(_)) => {
                self.problem(format!("set `{key}` or `{file_key}`, not both"));
                Err(())
            }
            (Some(s), None) => Ok(Some((s, None))),
            (None, Some(path)) => from_file(self, path),
            (None, None) => Ok(None),
        }
    }

    fn secret_file(&mut self, file_key: &str, path: &Path) -> Result<Option<Secret>, ()> {
        match read_secret_file(path) {
            Ok((s, warning)) => {
                self.warnings.extend(warning);
                Ok(Some(s))
            }
            Err(e) => {
                self.problem(format!("`{file_key}`: {e}"));
                Err(())
            }
        }
    }

    fn parse(&mut self) -> Config {
        let upstream = Upstream {
            url: self.url("upstream", DEFAULT_UPSTREAM),
        };
        if upstream.url.query().is_some() || upstream.url.fragment().is_some() {
            self.problem("`upstream` must not have a query or fragment");
        }
        let upstream_ca_file = self.path("upstream_ca_file");
        if let Some(p) = &upstream_ca_file {
            if let Err(e) = crate::upstream::read_ca_file(p) {
                self.problem(format!("`upstream_ca_file`: {e}"));
            }
        }
        let public_url = self.public_url("public_url", "public_url");

        // [auth]
        let mode = match self.string("auth.mode").as_deref() {
            None | Some("oauth") | Some("client_credentials") => AuthMode::OAuth,
            Some("legacy") => AuthMode::Legacy,
            Some(other) => {
                self.problem(format!(
                    "`auth.mode` must be \"oauth\" or \"legacy\", not \"{other}\""
                ));
                AuthMode::OAuth
            }
        };
        let token_url = self.url("auth.token_url", DEFAULT_TOKEN_URL);
        let audience = self
            .string("auth.audience")
            .unwrap_or_else(|| DEFAULT_AUDIENCE.to_string());
        let client_id = self.string("auth.client_id");
        let client_secret = self.secret_and_file("auth.client_secret", "auth.client_secret_file");
        let client_secret_file = client_secret
            .as_ref()
            .ok()
            .and_then(|found| found.as_ref())
            .and_then(|(_, file)| file.clone());
        let client_secret = client_secret.map(|found| found.map(|(secret, _)| secret));
        let token_cache = self.path("auth.token_cache");
        let wait_timeout = self.duration("auth.wait_timeout", Duration::from_secs(10));
        let retry_initial_backoff =
            self.duration("auth.retry_initial_backoff", Duration::from_secs(1));
        let retry_max_backoff = self.duration("auth.retry_max_backoff", Duration::from_secs(300));
        if retry_max_backoff < retry_initial_backoff {
            self.problem(
                "`auth.retry_max_backoff` must not be shorter than `auth.retry_initial_backoff`",
            );
        }
        if client_id.as_deref().unwrap_or("").is_empty() {
            self.problem(format!(
                "`auth.client_id` is required (set it in the config file or as {ENV_PREFIX}AUTH__CLIENT_ID)"
            ));
        }
        if client_secret
            .as_ref()
            .is_ok_and(|s| s.as_ref().map_or(true, |s| s.is_empty()))
        {
            self.problem(format!(
                "`auth.client_secret` or `auth.client_secret_file` is required (or {ENV_PREFIX}AUTH__CLIENT_SECRET)"
            ));
        }
        let main_auth = AuthConfig {
            mode,
            token_url,
            audience,
            client_id: client_id.unwrap_or_default(),
            client_secret: client_secret.ok().flatten().unwrap_or_default(),
            client_secret_file,
            token_cache,
            wait_timeout,
            retry_initial_backoff,
            retry_max_backoff,
        };

        // [contract]
        let contract = ContractConfig {
            default: self.string("contract.default").filter(|s| !s.is_empty()),
            allow_client_override: self.boolean("contract.allow_client_override", false),
            routes: self.routes(),
        };

        let mut credentials = vec![main_auth.clone()];
        let mut listeners = vec![ListenerConfig {
            listen: self.socket_addr("listen", DEFAULT_LISTEN),
            public_url: public_url.clone(),
            credential: 0,
            contract: contract.clone(),
        }];
        self.extra_listeners(&main_auth, &contract, &mut credentials, &mut listeners);

        let admin_listen = self.socket_addr("admin.listen", DEFAULT_ADMIN_LISTEN);
        let (mut seen, mut reported) = (
            std::collections::HashSet::new(),
            std::collections::HashSet::new(),
        );
        for addr in listeners
            .iter()
            .map(|l| l.listen)
            .chain(std::iter::once(admin_listen))
        {
            if addr.port() != 0 && !seen.insert(addr) && reported.insert(addr) {
                self.problem(format!("address {addr} is used by more than one listener"));
            }
        }

        let timeouts = Timeouts {
            connect: self.duration("timeouts.connect", Duration::from_secs(5)),
            response_headers: self.duration("timeouts.response_headers", Duration::from_secs(60)),
            body_idle: self.duration("timeouts.body_idle", Duration::from_secs(60)),
            request_headers: self.duration("timeouts.request_headers", Duration::from_secs(10)),
            client_idle: self.duration("timeouts.client_idle", Duration::from_secs(75)),
            token_request: self.duration("timeouts.token_request", Duration::from_secs(10)),
        };
        let retry = RetryConfig {
            max_retries: self.uint("retry.max_retries", 2, 0) as u32,
            max_elapsed: self.duration("retry.max_elapsed", Duration::from_secs(30)),
            replay_body_limit: self.uint("retry.replay_body_limit", 1024 * 1024, 0),
        };
        let limits = Limits {
            max_in_flight: self.uint("limits.max_in_flight", 1024, 1) as usize,
            max_connections: self.uint("limits.max_connections", 4096, 1) as usize,
            max_request_header_bytes: self.uint("limits.max_request_header_bytes", 64 * 1024, 8192)
                as usize,
        };
        let drain_timeout = self.duration("shutdown.drain_timeout", Duration::from_secs(25));

        let mut access = self.access();
        let cors_allowed_origins = self.string_list("cors.allowed_origins");
        access.allowed_origins = cors_allowed_origins
            .iter()
            .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
            .collect();
        for o in &cors_allowed_origins {
            if o != "*" && http::HeaderValue::from_str(o).is_err() {
                self.problem(format!(
                    "`cors.allowed_origins`: \"{o}\" is not a valid origin"
                ));
            } else if o != "*" && !(o.starts_with("http://") || o.starts_with("https://")) {
                self.problem(format!(
                    "`cors.allowed_origins`: \"{o}\" must be an origin such as https://maps.example.com, or \"*\""
                ));
            }
        }
        let rewrite = RewriteConfig {
            enabled: self.boolean("rewrite.enabled", true),
            max_body_bytes: self.uint("rewrite.max_body_bytes", 32 * 1024 * 1024, 0) as usize,
        };
        let log_format = match self.string("log.format").as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                self.problem(format!(
                    "`log.format` must be \"text\" or \"json\", not \"{other}\""
                ));
                LogFormat::Text
            }
        };
        let client_congestion = match self.string("tcp.client_congestion_control") {
            None => crate::tcp::Congestion::Auto,
            Some(s) => crate::tcp::Congestion::parse(&s).unwrap_or_else(|e| {
                self.problem(e);
                crate::tcp::Congestion::Auto
            }),
        };

        Config {
            upstream,
            upstream_ca_file,
            public_url,
            listeners,
            credentials,
            admin_listen,
            timeouts,
            retry,
            limits,
            drain_timeout,
            access,
            cors_allowed_origins,
            rewrite,
            log_format,
            client_congestion,
            warnings: Vec::new(),
        }
    }

    fn routes(&mut self) -> Vec<ContractRoute> {
        // Read field by field, so that one bad route does not hide the others' problems (unknown
        // fields are reported with the other unknown keys).
        let count = match self.value("contract.routes") {
            None => return Vec::new(),
            Some(Value::Array(_, items)) => items.len(),
            Some(other) => {
                let src = source_of(self.fig, &other);
                self.problem(format!(
                    "`contract.routes` must be an array of tables ([[contract.routes]]){src}"
                ));
                return Vec::new();
            }
        };
        let mut routes = Vec::new();
        for i in 0..count {
            let field = |name: &str| format!("contract.routes.{i}.{name}");
            let (prefix, id) = (self.string(&field("prefix")), self.string(&field("id")));
            match &prefix {
                None => self.problem(format!("`contract.routes[{i}].prefix` is required")),
                Some(p) if !p.starts_with('/') => self.problem(format!(
                    "`contract.routes[{i}].prefix` must start with '/', not \"{p}\""
                )),
                Some(_) => {}
            }
            match &id {
                None => self.problem(format!("`contract.routes[{i}].id` is required")),
                Some(id) if id.trim().is_empty() => {
                    self.problem(format!("`contract.routes[{i}].id` must not be empty"))
                }
                Some(id) if http::HeaderValue::from_str(id).is_err() => self.problem(format!(
                    "`contract.routes[{i}].id` contains characters not allowed in a header"
                )),
                Some(_) => {}
            }
            if let (Some(prefix), Some(id)) = (prefix, id) {
                routes.push(ContractRoute { prefix, id });
            }
        }
        routes
    }

    fn extra_listeners(
        &mut self,
        main_auth: &AuthConfig,
        contract: &ContractConfig,
        credentials: &mut Vec<AuthConfig>,
        listeners: &mut Vec<ListenerConfig>,
    ) {
        let count = match self.value("listeners") {
            None => return,
            Some(Value::Array(_, items)) => items.len(),
            Some(other) => {
                let src = source_of(self.fig, &other);
                self.problem(format!(
                    "`listeners` must be an array of tables ([[listeners]]){src}"
                ));
                return;
            }
        };
        for i in 0..count {
            let base = format!("listeners.{i}");
            // Without a usable address the rest of the entry is still checked, so every
            // problem is reported at once.
            let listen = match self.string(&format!("{base}.listen")) {
                Some(s) => match parse_listen(&s) {
                    Ok(a) => Some(a),
                    Err(e) => {
                        self.problem(format!("`listeners[{i}].listen`: {e}"));
                        None
                    }
                },
                None => {
                    self.problem(format!("`listeners[{i}].listen` is required"));
                    None
                }
            };
            let mut lc = contract.clone();
            if let Some(id) = self.string(&format!("{base}.contract")) {
                // A listener bound to a contract uses it for every path (but /contracts).
                lc.default = Some(id);
                lc.routes.clear();
            }
            let credential = if self.value(&format!("{base}.auth")).is_some() {
                let client_id = self.string(&format!("{base}.auth.client_id"));
                let secret = self.secret_and_file(
                    &format!("{base}.auth.client_secret"),
                    &format!("{base}.auth.client_secret_file"),
                );
                match (client_id, secret) {
                    (_, Err(())) => 0,
                    (Some(id), Ok(Some((secret, file))))
                        if !id.is_empty() && !secret.is_empty() =>
                    {
                        let auth = AuthConfig {
                            client_id: id,
                            client_secret: secret,
                            client_secret_file: file,
                            // The token cache belongs to the main credential.
                            token_cache: None,
                            ..main_auth.clone()
                        };
                        match credentials
                            .iter()
                            .position(|c| c.share_key() == auth.share_key())
                        {
                            Some(idx) => idx,
                            None => {
                                credentials.push(auth);
                                credentials.len() - 1
                            }
                        }
                    }
                    _ => {
                        self.problem(format!(
                            "`listeners[{i}].auth` needs both client_id and client_secret (or client_secret_file)"
                        ));
                        0
                    }
                }
            } else {
                0
            };
            let public_url = self.public_url(
                &format!("{base}.public_url"),
                &format!("listeners[{i}].public_url"),
            );
            let Some(listen) = listen else { continue };
            listeners.push(ListenerConfig {
                listen,
                public_url,
                credential,
                contract: lc,
            });
        }
    }

    fn access(&mut self) -> AccessConfig {
        let header_text = self
            .string("access.key_header")
            .unwrap_or_else(|| "x-aleph-proxy-key".to_string());
        let key_header = match http::HeaderName::from_bytes(header_text.as_bytes()) {
            Ok(h) => h,
            Err(_) => {
                self.problem(format!(
                    "`access.key_header`: \"{header_text}\" is not a valid header name"
                ));
                http::HeaderName::from_static("x-aleph-proxy-key")
            }
        };
        let key = self
            .secret_inline_or_file("access.key", "access.key_file")
            .ok()
            .flatten();
        if let Some(k) = &key {
            if k.expose().len() < 16 {
                self.problem("`access.key` must be at least 16 characters long");
            }
        }
        let mut allowed_cidrs = Vec::new();
        for c in self.string_list("access.allowed_cidrs") {
            match c
                .parse::<IpNet>()
                .or_else(|_| c.parse::<std::net::IpAddr>().map(IpNet::from))
            {
                Ok(n) => allowed_cidrs.push(n),
                Err(_) => self.problem(format!(
                    "`access.allowed_cidrs`: \"{c}\" is not an address or CIDR such as 10.0.0.0/8"
                )),
            }
        }
        let allowed_hosts = self
            .string_list("access.allowed_hosts")
            .into_iter()
            .map(|h| h.to_ascii_lowercase())
            .collect();
        AccessConfig {
            key_header,
            key,
            allowed_cidrs,
            allowed_hosts,
            allowed_origins: Vec::new(),
        }
    }
}

fn describe(v: &Value) -> String {
    match v {
        Value::String(_, s) => format!("\"{s}\""),
        Value::Num(_, n) => n
            .to_i128()
            .map(|i| i.to_string())
            .or_else(|| n.to_u128().map(|u| u.to_string()))
            .or_else(|| n.to_f64().map(|f| f.to_string()))
            .unwrap_or_else(|| "a number".into()),
        Value::Bool(_, b) => b.to_string(),
        Value::Char(_, c) => format!("'{c}'"),
        Value::Dict(..) => "a table".into(),
        Value::Array(..) => "an array".into(),
        Value::Empty(..) => "nothing".into(),
    }
}

fn walk_keys(fig: &Figment, dict: &Dict, prefix: &str, unknown: &mut Vec<String>) {
    for (k, v) in dict {
        let path = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        if !KNOWN_KEYS.contains(&path.as_str()) {
            let shown = path.replace("[]", "[..]");
            unknown.push(format!(
                "unknown key `{shown}`{}; known keys are listed in config/aleph-proxy.example.toml",
                source_of(fig, v)
            ));
            continue;
        }
        // A leaf key holding a table or an array (an environment value such as `{a=1}` parsed
        // as one) is reported as a wrong type by its parser; its parts are not keys, and a
        // secret's parts must not be printed as unknown keys.
        let is_table = KNOWN_KEYS.iter().any(|k| {
            k.strip_prefix(path.as_str())
                .is_some_and(|rest| rest.starts_with('.') || rest.starts_with("[]"))
        });
        if !is_table {
            continue;
        }
        match v {
            Value::Dict(_, d) => walk_keys(fig, d, &path, unknown),
            Value::Array(_, items) => {
                let elem = format!("{path}[]");
                for item in items {
                    if let Value::Dict(_, d) = item {
                        walk_keys(fig, d, &elem, unknown);
                    }
                }
            }
            // A plain value where a section belongs (`ALEPH_PROXY_ADMIN=0.0.0.0:9090`, TOML
            // `shutdown = "10s"`) would replace the section and be ignored. The value is not
            // echoed: it may be a secret put at the wrong level. (The lists of tables,
            // `listeners` and `contract.routes`, are checked where they are parsed.)
            _ if !path.contains("[]")
                && !KNOWN_KEYS
                    .iter()
                    .any(|k| k.starts_with(&format!("{path}[]"))) =>
            {
                unknown.push(format!(
                    "`{path}` must be a table (`[{path}]` in TOML, `ALEPH_PROXY_{}__<KEY>` in the environment), not a single value{}",
                    path.to_uppercase().replace('.', "__"),
                    source_of(fig, v)
                ));
            }
            _ => {}
        }
    }
}

/// Parses a listen address: `host:port`, `[v6]:port`, or `:port` (all interfaces).
pub fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    let t = text.trim();
    let candidate = if let Some(port) = t.strip_prefix(':') {
        format!("0.0.0.0:{port}")
    } else if let Some(port) = t.strip_prefix("localhost:") {
        format!("127.0.0.1:{port}")
    } else {
        t.to_string()
    };
    candidate.parse::<SocketAddr>().map_err(|_| {
        format!("\"{text}\" is not an address such as 127.0.0.1:8080, 0.0.0.0:8080 or [::1]:8080")
    })
}

/// Parses an absolute http(s) URL without credentials in it.
pub fn parse_http_url(text: &str) -> Result<Url, String> {
    // Text that may hold a user name and password is not echoed, whatever else is wrong with it.
    let shown = if text.contains('@') {
        "the URL".to_string()
    } else {
        format!("\"{text}\"")
    };
    let url = Url::parse(text.trim()).map_err(|e| format!("{shown} is not a URL ({e})"))?;
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err(format!("{shown} must be an http:// or https:// URL"));
    }
    if url.host_str().map_or(true, |h| h.is_empty()) {
        return Err(format!("{shown} has no host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        // Do not echo the URL: it holds credentials.
        return Err("the URL must not contain a user name or password".to_string());
    }
    Ok(url)
}

/// Reads a secret from a file once, trimmed (editors and `echo` add a newline). The second value
/// is a warning when other users can read the file.
pub fn read_secret_file(path: &Path) -> Result<(Secret, Option<String>), String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {}", shown_secret_path(path), e.kind()))?;
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    Ok((Secret::new(trimmed), world_readable_warning(path)))
}

/// The path of a secret file as an error may show it. The secret itself put where its file
/// belongs (`CLIENT_SECRET_FILE=<the secret>`, a Kubernetes `secretKeyRef` on the wrong
/// variable) is a path to nowhere: a path is shown only when it exists or names a file in an
/// existing directory other than `/` (a secret may contain a `/`).
fn shown_secret_path(path: &Path) -> String {
    let plausible = path.exists()
        || path
            .parent()
            .is_some_and(|d| !d.as_os_str().is_empty() && d != Path::new("/") && d.is_dir());
    if plausible {
        path.display().to_string()
    } else {
        "the file named there (the name is not shown: it is not a path in an existing \
         directory and may be the secret itself, which belongs in the key without `_file`)"
            .to_string()
    }
}

#[cfg(unix)]
fn world_readable_warning(path: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode();
    (mode & 0o004 != 0).then(|| {
        format!(
            "secret file {} is readable by every user on this machine (mode {:o}); chmod 600 (or 640) it",
            path.display(),
            mode & 0o777
        )
    })
}

#[cfg(not(unix))]
fn world_readable_warning(_path: &Path) -> Option<String> {
    None
}

/// Drops the source excerpt of a parse error (`5 | client_secret = abc`): the line that failed
/// to parse may be the one holding a secret. The line and column numbers stay.
fn without_source_lines(msg: &str) -> String {
    msg.lines()
        .filter(|l| {
            let t = l.trim_start();
            let digits = t.bytes().take_while(u8::is_ascii_digit).count();
            !(t.starts_with('|') || (digits > 0 && t[digits..].trim_start().starts_with('|')))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
// figment's Jail fixes the closure's error type (figment::Error, which is large).
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use figment::Jail;

    fn base_env(jail: &mut Jail) {
        jail.set_env("ALEPH_PROXY_AUTH__CLIENT_ID", "id-1");
        jail.set_env("ALEPH_PROXY_AUTH__CLIENT_SECRET", "s3cr3t-value");
    }

    #[test]
    fn defaults_with_credentials_from_env() {
        Jail::expect_with(|jail| {
            base_env(jail);
            let c = load(None, &Overrides::default()).unwrap();
            assert_eq!(c.listeners[0].listen.to_string(), DEFAULT_LISTEN);
            assert_eq!(c.admin_listen.to_string(), DEFAULT_ADMIN_LISTEN);
            assert_eq!(c.upstream.url.as_str(), "https://api.satellogic.com/");
            assert_eq!(c.credentials[0].token_url.as_str(), DEFAULT_TOKEN_URL);
            assert_eq!(c.credentials[0].audience, DEFAULT_AUDIENCE);
            assert_eq!(c.credentials[0].mode, AuthMode::OAuth);
            assert!(!c.listeners[0].contract.allow_client_override);
            Ok(())
        });
    }

    #[test]
    fn precedence_defaults_file_env_flags() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "c.toml",
                r#"
                listen = "127.0.0.1:7001"
                upstream = "http://file.example"
                [auth]
                client_id = "file-id"
                client_secret = "file-secret"
                [contract]
                default = "file-contract"
                "#,
            )?;
            jail.set_env("ALEPH_PROXY_UPSTREAM", "http://env.example");
            jail.set_env("ALEPH_PROXY_CONTRACT__DEFAULT", "12345");
            let mut o = Overrides::default();
            o.set("listen", "127.0.0.1:7003");
            let c = load(Some(Path::new("c.toml")), &o).unwrap();
            assert_eq!(c.listeners[0].listen.to_string(), "127.0.0.1:7003"); // flag
            assert_eq!(c.upstream.url.as_str(), "http://env.example/"); // env
            assert_eq!(c.listeners[0].contract.default.as_deref(), Some("12345")); // env, numeric text
            assert_eq!(c.credentials[0].client_id, "file-id"); // file
            assert_eq!(c.admin_listen.to_string(), DEFAULT_ADMIN_LISTEN); // default
            Ok(())
        });
    }

    #[test]
    fn every_problem_is_reported_at_once_without_secrets() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "bad.toml",
                r#"
                listen = "nonsense"
                upstrem = "typo"
                [auth]
                mode = "magic"
                client_secret = "do-not-print-me"
                wait_timeout = "forever"
                [contract]
                allow_client_override = "maybe"
                [[contract.routes]]
                prefix = "archive"
                id = "c1"
                [timeouts]
                connect = -3
                [[listeners]]
                contract = "c2"
                public_url = "not a url"
                [listeners.auth]
                client_id = "other"
                "#,
            )?;
            let err = load(Some(Path::new("bad.toml")), &Overrides::default()).unwrap_err();
            let text = err.to_string();
            for needle in [
                "unknown key `upstrem`",
                "`listen`",
                "`auth.mode`",
                "`auth.client_id` is required",
                "`auth.wait_timeout`",
                "`contract.allow_client_override`",
                "`contract.routes[0].prefix`",
                "`timeouts.connect`",
                // A listener without an address still has the rest of it checked.
                "`listeners[0].listen` is required",
                "`listeners[0].public_url`",
                "`listeners[0].auth` needs both",
            ] {
                assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
            }
            assert!(!text.contains("do-not-print-me"));
            assert!(err.problems.len() >= 8, "{text}");
            Ok(())
        });
    }

    #[test]
    fn environment_values_of_string_keys_arrive_as_written() {
        Jail::expect_with(|jail| {
            jail.set_env("ALEPH_PROXY_AUTH__CLIENT_ID", "0042");
            jail.set_env("ALEPH_PROXY_AUTH__CLIENT_SECRET", "0012345678901234");
            jail.set_env("ALEPH_PROXY_CONTRACT__DEFAULT", "007");
            jail.set_env("ALEPH_PROXY_ACCESS__KEY", "00001111222233334444");
            let c = load(None, &Overrides::default()).unwrap();
            assert_eq!(c.credentials[0].client_id, "0042");
            assert_eq!(c.credentials[0].client_secret.expose(), "0012345678901234");
            assert_eq!(c.listeners[0].contract.default.as_deref(), Some("007"));
            assert_eq!(
                c.access.key.as_ref().unwrap().expose(),
                "00001111222233334444"
            );
            // Values figment would read as a string, a table or an array, or trim.
            for secret in ["\"quoted\"", "{a=1}", "[abc]", "  spaced  "] {
                jail.set_env("ALEPH_PROXY_AUTH__CLIENT_SECRET", secret);
                let c =
                    load(None, &Overrides::default()).unwrap_or_else(|e| panic!("{secret:?}: {e}"));
                assert_eq!(c.credentials[0].client_secret.expose(), secret);
            }
            // Non-string keys still take numbers from the environment.
            jail.set_env("ALEPH_PROXY_TIMEOUTS__CONNECT", "3");
            jail.set_env("ALEPH_PROXY_LIMITS__MAX_IN_FLIGHT", "7");
            let c = load(None, &Overrides::default()).unwrap();
            assert_eq!(c.timeouts.connect, Duration::from_secs(3));
            assert_eq!(c.limits.max_in_flight, 7);
            Ok(())
        });
    }

    #[test]
    fn every_route_is_checked_whatever_another_one_holds() {
        Jail::expect_with(|jail| {
            base_env(jail);
            jail.create_file(
                "r.toml",
                r#"
                [[contract.routes]]
                prefix = "/a"
                id = "c"
                extra = 1
                [[contract.routes]]
                prefix = "archive"
                id = ""
                [[contract.routes]]
                id = "c"
                "#,
            )?;
            let err = load(Some(Path::new("r.toml")), &Overrides::default()).unwrap_err();
            let text = err.to_string();
            for needle in [
                "unknown key `contract.routes[..].extra`",
                "`contract.routes[1].prefix` must start with '/'",
                "`contract.routes[1].id` must not be empty",
                "`contract.routes[2].prefix` is required",
            ] {
                assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
            }
            assert_eq!(err.problems.len(), 4, "{text}");
            Ok(())
        });
    }

    #[test]
    fn a_single_value_where_a_section_belongs_is_a_problem_not_ignored() {
        Jail::expect_with(|jail| {
            base_env(jail);
            jail.set_env("ALEPH_PROXY_ADMIN", "0.0.0.0:9090");
            jail.create_file("c.toml", "shutdown = \"10s\"\nlisteners = \"x\"\n")?;
            let err = load(Some(Path::new("c.toml")), &Overrides::default()).unwrap_err();
            let text = err.to_string();
            for needle in [
                "`admin` must be a table (`[admin]` in TOML, `ALEPH_PROXY_ADMIN__<KEY>`",
                "`shutdown` must be a table",
                "`listeners` must be an array of tables",
            ] {
                assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
            }
            // The value is not echoed: it may be a secret at the wrong level.
            jail.set_env("ALEPH_PROXY_AUTH", "a-secret-at-the-wrong-level");
            let err = load(None, &Overrides::default()).unwrap_err().to_string();
            assert!(err.contains("`auth` must be a table"), "{err}");
            assert!(!err.contains("a-secret-at-the-wrong-level"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn a_secret_given_as_its_file_name_is_not_printed() {
        Jail::expect_with(|jail| {
            jail.set_env("ALEPH_PROXY_AUTH__CLIENT_ID", "id-1");
            for secret in [
                "Zm9v/YmFy-secret",
                "/plain-secret-value",
                "plain-secret-value",
            ] {
                jail.set_env("ALEPH_PROXY_AUTH__CLIENT_SECRET_FILE", secret);
                let err = load(None, &Overrides::default()).unwrap_err().to_string();
                assert!(err.contains("`auth.client_secret_file`"), "{err}");
                assert!(!err.contains(secret), "{err}");
                assert!(err.contains("may be the secret itself"), "{err}");
            }
            // A real path, missing file: named, so the mistake can be found.
            let dir = jail.directory().to_path_buf();
            let missing = dir.join("no-such-secret");
            jail.set_env("ALEPH_PROXY_AUTH__CLIENT_SECRET_FILE", missing.display());
            let err = load(None, &Overrides::default()).unwrap_err().to_string();
            assert!(err.contains(&missing.display().to_string()), "{err}");
            Ok(())
        });
    }

    #[test]
    fn kubernetes_service_link_variables_are_not_keys() {
        Jail::expect_with(|jail| {
            base_env(jail);
            for (k, v) in [
                ("ALEPH_PROXY_PORT", "tcp://10.0.0.1:8080"),
                ("ALEPH_PROXY_PORT_8080_TCP", "tcp://10.0.0.1:8080"),
                ("ALEPH_PROXY_PORT_8080_TCP_ADDR", "10.0.0.1"),
                ("ALEPH_PROXY_SERVICE_HOST", "10.0.0.1"),
                ("ALEPH_PROXY_SERVICE_PORT", "8080"),
                ("ALEPH_PROXY_SERVICE_PORT_HTTP", "8080"),
            ] {
                jail.set_env(k, v);
            }
            load(None, &Overrides::default()).unwrap();
            // A real typo still is a problem.
            jail.set_env("ALEPH_PROXY_LISTN", "127.0.0.1:1");
            let err = load(None, &Overrides::default()).unwrap_err();
            assert!(err.to_string().contains("unknown key `listn`"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn an_environment_secret_wins_over_a_file_setting_of_the_other_form() {
        Jail::expect_with(|jail| {
            base_env(jail);
            jail.create_file("f.toml", "[auth]\nclient_secret_file = \"nowhere\"\n")?;
            let c = load(Some(Path::new("f.toml")), &Overrides::default()).unwrap();
            assert_eq!(c.credentials[0].client_secret.expose(), "s3cr3t-value");
            // The other way round: a secret file from the environment over the file's secret.
            jail.create_file("secret.txt", "from-file\n")?;
            jail.set_env("ALEPH_PROXY_AUTH__CLIENT_SECRET", "");
            jail.create_file("g.toml", "[auth]\nclient_secret = \"inline\"\n")?;
            jail.set_env("ALEPH_PROXY_AUTH__CLIENT_SECRET_FILE", "secret.txt");
            std::env::remove_var("ALEPH_PROXY_AUTH__CLIENT_SECRET");
            let c = load(Some(Path::new("g.toml")), &Overrides::default()).unwrap();
            assert_eq!(c.credentials[0].client_secret.expose(), "from-file");
            // Both in one layer: one problem, not a second one saying neither is set.
            jail.create_file(
                "both.toml",
                "[auth]\nclient_secret = \"a\"\nclient_secret_file = \"secret.txt\"\n",
            )?;
            std::env::remove_var("ALEPH_PROXY_AUTH__CLIENT_SECRET_FILE");
            let err = load(Some(Path::new("both.toml")), &Overrides::default()).unwrap_err();
            assert_eq!(err.problems.len(), 1, "{err}");
            assert!(err.problems[0].contains("not both"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn out_of_range_values_are_problems_named_with_their_value() {
        Jail::expect_with(|jail| {
            base_env(jail);
            jail.create_file(
                "c.toml",
                r#"
                listen = "127.0.0.1:7000"
                [admin]
                listen = "127.0.0.1:7000"
                [[listeners]]
                listen = "127.0.0.1:7000"
                [timeouts]
                connect = 1e20
                response_headers = "18000000000000000000s"
                body_idle = "2years"
                [limits]
                max_in_flight = 0
                "#,
            )?;
            let err = load(Some(Path::new("c.toml")), &Overrides::default()).unwrap_err();
            let text = err.to_string();
            for needle in [
                "`timeouts.connect`",
                "`timeouts.response_headers`",
                "`timeouts.body_idle`",
                "`limits.max_in_flight` must be a whole number of at least 1, not 0",
            ] {
                assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
            }
            assert_eq!(text.matches("127.0.0.1:7000 is used").count(), 1, "{text}");
            Ok(())
        });
    }

    #[test]
    fn urls_with_credentials_are_never_echoed() {
        for bad in [
            "https://user:PASSWD@api.example.com:99999/",
            "ftp://user:PASSWD@host/",
            "https://user:PASSWD@/x",
            "https://user:PASSWD@api.example.com/",
        ] {
            let e = parse_http_url(bad).unwrap_err();
            assert!(!e.contains("PASSWD"), "{e}");
        }
    }

    #[test]
    fn debug_of_config_hides_secrets() {
        Jail::expect_with(|jail| {
            base_env(jail);
            jail.set_env("ALEPH_PROXY_ACCESS__KEY", "a-very-long-access-key-123");
            let c = load(None, &Overrides::default()).unwrap();
            let dbg = format!("{c:?}");
            assert!(!dbg.contains("s3cr3t-value"));
            assert!(!dbg.contains("a-very-long-access-key-123"));
            Ok(())
        });
    }

    #[test]
    fn syntax_errors_do_not_echo_the_line_holding_a_secret() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "bad.toml",
                "[auth]\nclient_id = \"x\"\nclient_secret = unquoted-s3cret-value\n",
            )?;
            // The parser's own message quotes the failing line: that is what is cut.
            let raw = Figment::from(Toml::file("bad.toml"))
                .extract::<Dict>()
                .unwrap_err()
                .to_string();
            assert!(raw.contains("unquoted-s3cret-value"), "{raw}");
            let err = load(Some(Path::new("bad.toml")), &Overrides::default()).unwrap_err();
            let text = err.to_string();
            assert!(!text.contains("unquoted-s3cret-value"), "{text}");
            assert!(text.contains("line 3"), "{text}");
            // Only the syntax error: the values the file holds are not "missing".
            assert_eq!(err.problems.len(), 1, "{text}");
            jail.create_dir("a-dir")?;
            let err = load(Some(Path::new("a-dir")), &Overrides::default()).unwrap_err();
            assert_eq!(err.problems, ["config file a-dir is a directory"]);
            Ok(())
        });
    }

    #[test]
    fn secret_file_is_trimmed() {
        Jail::expect_with(|jail| {
            jail.set_env("ALEPH_PROXY_AUTH__CLIENT_ID", "id-1");
            jail.create_file("secret.txt", "  from-file\n")?;
            jail.set_env("ALEPH_PROXY_AUTH__CLIENT_SECRET_FILE", "secret.txt");
            let c = load(None, &Overrides::default()).unwrap();
            assert_eq!(c.credentials[0].client_secret.expose(), "from-file");
            // The jail's file is 0644: warned about, by path only.
            std::fs::set_permissions(
                "secret.txt",
                std::os::unix::fs::PermissionsExt::from_mode(0o644),
            )
            .unwrap();
            let c = load(None, &Overrides::default()).unwrap();
            assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
            assert!(c.warnings[0].contains("secret.txt"));
            assert!(!c.warnings[0].contains("from-file"));
            std::fs::set_permissions(
                "secret.txt",
                std::os::unix::fs::PermissionsExt::from_mode(0o600),
            )
            .unwrap();
            let c = load(None, &Overrides::default()).unwrap();
            assert!(c.warnings.is_empty(), "{:?}", c.warnings);
            Ok(())
        });
    }

    #[test]
    fn listeners_share_credentials_and_bind_contracts() {
        Jail::expect_with(|jail| {
            base_env(jail);
            jail.create_file(
                "l.toml",
                r#"
                [[listeners]]
                listen = "127.0.0.1:8081"
                contract = "A"
                [[listeners]]
                listen = "127.0.0.1:8082"
                contract = "B"
                [listeners.auth]
                client_id = "other"
                client_secret = "other-secret"
                [[listeners]]
                listen = "127.0.0.1:8083"
                contract = "C"
                [listeners.auth]
                client_id = "other"
                client_secret = "other-secret"
                "#,
            )?;
            let c = load(Some(Path::new("l.toml")), &Overrides::default()).unwrap();
            assert_eq!(c.listeners.len(), 4);
            assert_eq!(c.listeners[1].credential, 0);
            assert_eq!(c.listeners[2].credential, 1);
            assert_eq!(c.listeners[3].credential, 1);
            assert_eq!(c.credentials.len(), 2);
            assert_eq!(c.listeners[2].contract.default.as_deref(), Some("B"));
            Ok(())
        });
    }

    #[test]
    fn example_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/aleph-proxy.example.toml");
        Jail::expect_with(|_jail| {
            let c = load(Some(&path), &Overrides::default()).unwrap();
            assert!(!c.listeners.is_empty());
            Ok(())
        });
    }
}

#[cfg(test)]
mod prop_tests {
    use super::*;
    use figment::providers::Toml;
    use proptest::prelude::*;

    /// Values of every TOML type, valid and not.
    fn value() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z0-9:/._ -]{0,20}".prop_map(|s| format!("\"{s}\"")),
            any::<i64>().prop_map(|n| n.to_string()),
            any::<f64>().prop_map(|f| f.to_string()),
            any::<bool>().prop_map(|b| b.to_string()),
            "[ -~]{0,16}",
            Just("[]".to_string()),
            Just("{}".to_string()),
            Just("[\"a\", 1, {x = 2}]".to_string()),
            Just("\"10.0.0.0/8\"".to_string()),
            Just("\"127.0.0.1:0\"".to_string()),
            Just("\"http://127.0.0.1:1/x\"".to_string()),
        ]
    }

    /// A line of a config file: a known key (in dotted form, so arrays meet tables), a table
    /// header, or printable junk. Keys that name files are left out: a property must not read
    /// arbitrary paths.
    fn line() -> impl Strategy<Value = String> {
        let keys: Vec<&'static str> = KNOWN_KEYS
            .iter()
            .copied()
            .filter(|k| !k.contains("file") && !k.contains("cache"))
            .collect();
        prop_oneof![
            4 => (prop::sample::select(keys), value())
                .prop_map(|(k, v)| format!("{} = {v}", k.replace("[]", ""))),
            1 => prop::sample::select(vec![
                "[auth]", "[access]", "[[listeners]]", "[[contract.routes]]", "[contract]",
                "[limits]", "[timeouts]", "[listeners]", "[[access]]",
            ])
            .prop_map(String::from),
            1 => "[ -~]{0,30}",
        ]
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        from_figment(&Figment::from(Toml::string(text)))
    }

    proptest! {
        /// Whatever the file holds, parsing returns a Config or a list of problems; it never
        /// panics, and a Config always has a listener and a credential.
        #[test]
        fn prop_config_parse_never_panics(lines in prop::collection::vec(line(), 0..12)) {
            if let Ok(c) = parse(&lines.join("\n")) {
                prop_assert!(!c.listeners.is_empty());
                prop_assert!(c.listeners.iter().all(|l| l.credential < c.credentials.len()));
            }
        }

        /// Arbitrary text (not TOML-shaped at all) does not panic either.
        #[test]
        fn prop_config_parse_never_panics_on_any_text(text in "\\PC{0,200}") {
            let _ = parse(&text);
        }

        /// A secret, quoted or not (a syntax error then), among junk lines: neither the problems
        /// nor the Debug of a Config ever show it.
        #[test]
        fn prop_config_never_echoes_a_secret(
            secret in "[a-zA-Z][a-zA-Z0-9]{15,23}",
            quoted in any::<bool>(),
            key in prop::sample::select(vec!["auth.client_secret", "access.key", "listeners.0.auth.client_secret"]),
            before in prop::collection::vec(line(), 0..4),
            after in prop::collection::vec(line(), 0..4),
        ) {
            let v = if quoted { format!("\"{secret}\"") } else { secret.clone() };
            let mut lines = before;
            lines.push(format!("{key} = {v}"));
            lines.extend(after);
            let text = lines.join("\n");
            match parse(&text) {
                Ok(c) => {
                    let shown = format!("{c:?}");
                    prop_assert!(!shown.contains(&secret));
                }
                Err(e) => prop_assert!(!e.to_string().contains(&secret), "{}", e),
            }
        }
    }
}
