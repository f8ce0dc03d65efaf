//! The command line: `aleph-proxy [run]`, `demo`, `check`, `token`, `contracts`, `healthcheck`.
//! Flags are the last figment layer, above the config file and the environment.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::config::{self, Config, Overrides};
use crate::mock::{Mock, MockOptions, MOCK_CLIENT_ID, MOCK_CLIENT_SECRET};

/// `println!` that survives a closed stdout: `aleph-proxy check | head -1` must not panic
/// (exit 101) when `head` leaves. Rust ignores SIGPIPE, so a write to a closed pipe is an
/// error, and `println!` panics on it; the command goes on and exits with its own status.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

#[derive(Debug, Parser)]
#[command(
    name = "aleph-proxy",
    version,
    propagate_version = true,
    about = "Authenticating sidecar proxy for Satellogic's Aleph API: point any tool at it and it adds a fresh token and the contract header.",
    after_help = "Configuration layers: built-in defaults < TOML file (--config) < ALEPH_PROXY_* environment < flags.\nExample: ALEPH_PROXY_AUTH__CLIENT_ID=... ALEPH_PROXY_AUTH__CLIENT_SECRET_FILE=/run/secrets/aleph aleph-proxy"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Args, Clone, Default)]
pub struct Global {
    /// TOML configuration file.
    #[arg(long, short = 'c', env = "ALEPH_PROXY_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Proxy listen address (overrides `listen`).
    #[arg(long, global = true)]
    pub listen: Option<String>,
    /// Admin listen address (overrides `admin.listen`).
    #[arg(long, global = true)]
    pub admin_listen: Option<String>,
    /// Upstream API base URL (overrides `upstream`).
    #[arg(long, global = true)]
    pub upstream: Option<String>,
    /// Default contract id (overrides `contract.default`).
    #[arg(long, global = true)]
    pub contract: Option<String>,
    /// Log format: text or json (overrides `log.format`).
    #[arg(long, global = true)]
    pub log_format: Option<String>,
}

#[derive(Debug, Subcommand, Clone)]
pub enum Command {
    /// Run the proxy (the default).
    Run,
    /// Run the proxy in front of a built-in mock of the Aleph API; no credentials needed.
    Demo,
    /// Validate the configuration, fetch a token, list contracts, show contract routing.
    #[command(
        after_help = "Exit status: 0 all good; 1 a problem (token endpoint, /contracts, a contract the credential lacks, no contract for some paths, an unwritable token cache, a listener off loopback without access control); 2 invalid configuration."
    )]
    Check,
    /// Print a fresh access token to stdout (for scripts).
    #[command(
        after_help = "Prints the token of the main credential and a newline, nothing else on stdout.\nExit status: 0 printed; 1 no token (see stderr); 2 invalid configuration."
    )]
    Token,
    /// List the contracts of the configured credential.
    #[command(
        after_help = "Exit status: 0 listed; 1 no token or /contracts failed; 2 invalid configuration."
    )]
    Contracts {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Ask a running instance's /readyz; exit 0 when ready (for images without curl).
    #[command(
        after_help = "Reads only admin.listen (flag, environment, then file; 0.0.0.0 means this host's loopback), so it works with the container's environment and an otherwise unusable config.\nExit status: 0 ready; 1 not ready, draining or not running; 2 admin.listen is invalid."
    )]
    Healthcheck {
        /// Seconds to wait for the answer.
        #[arg(long, default_value_t = 3)]
        timeout: u64,
    },
}

impl Global {
    pub fn overrides(&self) -> Overrides {
        let mut o = Overrides::default();
        if let Some(v) = &self.listen {
            o.set("listen", v.as_str());
        }
        if let Some(v) = &self.admin_listen {
            o.set("admin.listen", v.as_str());
        }
        if let Some(v) = &self.upstream {
            o.set("upstream", v.as_str());
        }
        if let Some(v) = &self.contract {
            o.set("contract.default", v.as_str());
        }
        if let Some(v) = &self.log_format {
            o.set("log.format", v.as_str());
        }
        o
    }

    pub fn load(&self) -> Result<Config, config::ConfigError> {
        config::load(self.config.as_deref(), &self.overrides())
    }
}

/// Runs a parsed command line to completion.
pub async fn main(cli: Cli) -> ExitCode {
    let g = cli.global.clone();
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => run(&g).await,
        Command::Demo => demo(&g).await,
        Command::Check => check(&g).await,
        Command::Token => token(&g).await,
        Command::Contracts { json } => contracts(&g, json).await,
        Command::Healthcheck { timeout } => healthcheck(&g, Duration::from_secs(timeout)).await,
    }
}

/// `admin.listen` from the layers, without validating the rest. A config file that cannot be read
/// or parsed must not hide an address given in the environment or on the command line (a figment
/// with a broken file fails every extraction), so the file is dropped before falling back.
fn admin_listen_for_probe(g: &Global) -> String {
    let extract = |path: Option<&std::path::Path>| {
        config::figment(path, &g.overrides())
            .extract_inner::<figment::value::Value>("admin.listen")
            .ok()
            .and_then(|v| v.into_string())
    };
    extract(g.config.as_deref())
        .or_else(|| extract(None))
        .unwrap_or_else(|| config::DEFAULT_ADMIN_LISTEN.to_string())
}

fn load_or_report(g: &Global) -> Option<Config> {
    match g.load() {
        Ok(c) => Some(c),
        Err(e) => {
            eprint!("aleph-proxy: {e}");
            None
        }
    }
}

async fn run(g: &Global) -> ExitCode {
    let Some(config) = load_or_report(g) else {
        crate::telemetry::init_logging(config::LogFormat::Text);
        return ExitCode::from(2);
    };
    crate::telemetry::init_logging(config.log_format);
    serve(config).await
}

async fn serve(config: Config) -> ExitCode {
    let bound = match crate::bind(&config).await {
        Ok(b) => b,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(1);
        }
    };
    match crate::run_until_signalled(config, bound).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::from(1)
        }
    }
}

/// The demo configuration: the proxy in front of a running mock.
pub fn demo_config(mock: &Mock, g: &Global) -> Result<Config, config::ConfigError> {
    let mut o = Overrides::default();
    o.set("upstream", mock.api_url.as_str());
    o.set("auth.token_url", mock.token_url.as_str());
    o.set("auth.client_id", MOCK_CLIENT_ID);
    o.set("auth.client_secret", MOCK_CLIENT_SECRET);
    for (k, v) in g.overrides().0 {
        o.0.insert(k, v);
    }
    // Flags only: ALEPH_PROXY_* variables meant for a real deployment (an access key, a token
    // cache, a real contract id) must not leak into the demo and make it fail in confusing ways.
    config::from_figment(&figment_only(&o))
}

fn figment_only(o: &Overrides) -> figment::Figment {
    let mut fig = figment::Figment::new();
    for (k, v) in &o.0 {
        fig = fig.merge(figment::providers::Serialized::default(k, v.clone()));
    }
    fig
}

async fn demo(g: &Global) -> ExitCode {
    // The demo runs on its built-in configuration; a file named on its command line would be
    // silently unused. (ALEPH_PROXY_CONFIG, like every ALEPH_PROXY_* variable, is ignored.)
    let from_env = std::env::var_os("ALEPH_PROXY_CONFIG").map(std::path::PathBuf::from);
    if g.config.is_some() && g.config != from_env {
        eprintln!(
            "aleph-proxy demo: --config is not read by demo, which runs on its built-in configuration \
             in front of the mock (flags such as --listen still apply); \
             to run a configuration file: aleph-proxy run --config FILE"
        );
        return ExitCode::from(2);
    }
    let mock = match Mock::start(MockOptions::default()).await {
        Ok(m) => m,
        Err(e) => {
            eprintln!("aleph-proxy demo: cannot start the mock API: {e}");
            return ExitCode::from(1);
        }
    };
    let config = match demo_config(&mock, g) {
        Ok(c) => c,
        Err(e) => {
            eprint!("aleph-proxy demo: {e}");
            return ExitCode::from(2);
        }
    };
    crate::telemetry::init_logging(config.log_format);
    let bound = match crate::bind(&config).await {
        Ok(b) => b,
        Err(e) => {
            eprintln!("aleph-proxy demo: {e}\nTry another port: aleph-proxy demo --listen 127.0.0.1:18080 --admin-listen 127.0.0.1:19090");
            return ExitCode::from(1);
        }
    };
    let p = bound.proxy_addrs()[0];
    let a = bound.admin_addr();
    out!(
        r#"
aleph-proxy demo: the proxy on http://{p} in front of {api}.
It fetched no real credentials; the mock issues tokens like the real token endpoint.
Try, in another terminal:

  curl -s http://{p}/contracts
  curl -s http://{p}/tasking/products/
  curl -s 'http://{p}/tasking/tasks/?limit=2'               # "next" points back at the proxy
  curl -s http://{p}/archive/stac/ | head -c 600
  curl -s 'http://{p}/archive/stac/search?limit=1'
  curl -s -r 0-15 -o /dev/null -w '%{{http_code}} %{{size_download}} bytes\n' \
       'http://{p}/assets/l1d/20240101_120000_SN00_L1D_0000/analytic'
  curl -s -H 'authorizationToken: Bearer stolen' http://{p}/tasking/products/   # replaced by the proxy's
  curl -s http://{a}/readyz
  curl -s http://{a}/metrics | grep aleph_proxy_requests_total

Stop with Ctrl-C.
"#,
        api = match &g.upstream {
            // --upstream replaces the mock API; the mock still issues the tokens.
            Some(u) => format!("{u} (--upstream; tokens from the mock's token endpoint)"),
            None => format!("a mock Aleph API ({})", mock.api_url),
        }
    );
    match crate::run_until_signalled(config, bound).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("aleph-proxy demo: {e}");
            ExitCode::from(1)
        }
    }
}

async fn check(g: &Global) -> ExitCode {
    let Some(config) = load_or_report(g) else {
        return ExitCode::from(2);
    };
    crate::telemetry::init_logging(config.log_format);
    out!("configuration: ok");
    for w in &config.warnings {
        out!("  warning: {w}");
    }
    let mut ok = true;
    // What `run` would refuse when it binds: an algorithm the kernel lacks or does not allow.
    if let crate::tcp::Congestion::Named(_) = &config.client_congestion {
        let probe = tokio::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await;
        if let Err(e) = probe.and_then(|tcp| {
            crate::tcp::setup_listener(&tcp, config.listeners[0].listen, &config.client_congestion)
        }) {
            out!("tcp.client_congestion_control: {e}");
            ok = false;
        }
    }
    let rt = match crate::Runtime::new(&without_token_cache(&config)) {
        Ok(rt) => rt,
        Err(e) => {
            out!("runtime: {e}");
            return ExitCode::from(1);
        }
    };
    for (i, tokens) in rt.tokens.iter().enumerate() {
        let cred = &config.credentials[i];
        match tokens.fetch().await {
            Ok(t) => {
                if cred.mode == config::AuthMode::Legacy {
                    // No token endpoint: the key itself is the credential, checked by /contracts.
                    out!(
                        "credential {} ({}): legacy key (auth.mode = \"legacy\")",
                        i,
                        cred.client_id
                    );
                } else {
                    out!(
                        "credential {} ({}): token ok, expires in {} s",
                        i,
                        cred.client_id,
                        (t.expires_at - t.issued_at).as_secs()
                    );
                }
                // Legacy keys are never cached, whatever auth.token_cache says.
                if let Some(path) = cred
                    .token_cache
                    .as_ref()
                    .filter(|_| cred.mode == config::AuthMode::OAuth)
                {
                    match crate::token::cache::check(path, cred) {
                        Ok(state) => out!("  token cache {}: {state}", path.display()),
                        Err(e) => {
                            out!("  token cache {}: NOT usable: {e}", path.display());
                            ok = false;
                        }
                    }
                }
                let list = match list_with(&rt, i, t).await {
                    Ok(l) => l,
                    Err(e) => {
                        out!("  contracts: {e}");
                        ok = false;
                        continue;
                    }
                };
                let ids: Vec<&str> = list.iter().map(|c| c.contract_id.as_str()).collect();
                out!(
                    "  contracts: {}",
                    if ids.is_empty() {
                        "(none)".to_string()
                    } else {
                        ids.join(", ")
                    }
                );
                for (li, l) in config
                    .listeners
                    .iter()
                    .enumerate()
                    .filter(|(_, l)| l.credential == i)
                {
                    out!("  listener {li} on {}:", l.listen);
                    // The same condition `run` warns about at start: anyone who can reach this
                    // address would use the credential.
                    if !l.listen.ip().is_loopback() && !config.access.any_guard() {
                        out!("    EXPOSED: not on loopback and no access control; set access.key_file, access.allowed_cidrs or access.allowed_hosts");
                        ok = false;
                    }
                    for r in &l.contract.routes {
                        let known = ids.contains(&r.id.as_str());
                        ok &= known;
                        out!(
                            "    {}/... -> {}{}",
                            r.prefix.trim_end_matches('/'),
                            r.id,
                            if known {
                                ""
                            } else {
                                "  (NOT a contract of this credential)"
                            }
                        );
                    }
                    match &l.contract.default {
                        Some(d) => {
                            let known = ids.contains(&d.as_str());
                            ok &= known;
                            out!("    everything else -> {d}{}", if known { "" } else { "  (NOT a contract of this credential)" });
                        }
                        None => match ids.as_slice() {
                            [one] => out!("    everything else -> {one} (discovered: the credential's only contract)"),
                            // Clients name the contract themselves; without the header they get
                            // a 422, which is their choice, not a configuration problem.
                            _ if l.contract.allow_client_override => out!(
                                "    everything else -> the client's X-Satellogic-Contract-Id (allow_client_override; none set: 422)"
                            ),
                            _ => {
                                out!("    everything else -> NONE: set contract.default (the credential has {} contracts)", ids.len());
                                ok = false;
                            }
                        },
                    }
                    out!("    /contracts -> (no contract header)");
                }
            }
            Err(e) => {
                out!("credential {} ({}): {e}", i, cred.client_id);
                ok = false;
            }
        }
    }
    if ok {
        out!("all good");
        ExitCode::SUCCESS
    } else {
        out!("problems found");
        ExitCode::from(1)
    }
}

async fn list_with(
    rt: &crate::Runtime,
    credential: usize,
    token: crate::token::Token,
) -> Result<Vec<crate::proxy::contract::ContractInfo>, String> {
    rt.tokens[credential].install_for_tools(token);
    rt.list_contracts(credential).await
}

/// The tools (`check`, `token`, `contracts`) always fetch a fresh token, so their token managers
/// must not read the cache: that would only log "using the cached access token" (or the cache's
/// warnings, which `check` reports itself) for a token they do not use.
fn without_token_cache(config: &Config) -> Config {
    let mut c = config.clone();
    for cred in &mut c.credentials {
        cred.token_cache = None;
    }
    c
}

async fn fetch_token_once(
    g: &Global,
) -> Result<(Config, crate::Runtime, crate::token::Token), ExitCode> {
    let Some(config) = load_or_report(g) else {
        return Err(ExitCode::from(2));
    };
    crate::telemetry::init_logging(config.log_format);
    let rt = crate::Runtime::new(&without_token_cache(&config)).map_err(|e| {
        eprintln!("aleph-proxy: {e}");
        ExitCode::from(1)
    })?;
    match rt.tokens[0].fetch().await {
        Ok(t) => Ok((config, rt, t)),
        Err(e) => {
            eprintln!("aleph-proxy: {e}");
            Err(ExitCode::from(1))
        }
    }
}

async fn token(g: &Global) -> ExitCode {
    match fetch_token_once(g).await {
        Ok((config, _, t)) => {
            if config.credentials[0].mode == config::AuthMode::Legacy {
                eprintln!("aleph-proxy: auth.mode is legacy: there is no access token to print");
                return ExitCode::from(1);
            }
            out!("{}", t.access_token.expose());
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

async fn contracts(g: &Global, json: bool) -> ExitCode {
    let (_, rt, t) = match fetch_token_once(g).await {
        Ok(x) => x,
        Err(code) => return code,
    };
    match list_with(&rt, 0, t).await {
        Ok(list) => {
            if json {
                out!(
                    "{}",
                    serde_json::to_string_pretty(&list).unwrap_or_default()
                );
            } else {
                out!("{:<40} NAME", "CONTRACT ID");
                for c in list {
                    out!("{:<40} {}", c.contract_id, c.name.unwrap_or_default());
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("aleph-proxy: {e}");
            ExitCode::from(1)
        }
    }
}

/// Only `admin.listen` matters here, so a config with other problems still health-checks.
async fn healthcheck(g: &Global, timeout: Duration) -> ExitCode {
    let text = admin_listen_for_probe(g);
    let mut addr = match config::parse_listen(&text) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("aleph-proxy healthcheck: admin.listen: {e}");
            return ExitCode::from(2);
        }
    };
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    let url = format!("http://{addr}/readyz");
    let client = match reqwest::Client::builder()
        .timeout(timeout)
        .no_proxy()
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("aleph-proxy healthcheck: {e}");
            return ExitCode::from(1);
        }
    };
    match client.get(&url).send().await {
        Ok(r) if r.status().is_success() => {
            out!("ready ({url})");
            ExitCode::SUCCESS
        }
        Ok(r) => {
            let status = r.status().as_u16();
            let body = r.text().await.unwrap_or_default();
            out!("not ready ({url}: {status}) {body}");
            ExitCode::from(1)
        }
        Err(_) => {
            out!("not running ({url} unreachable)");
            ExitCode::from(1)
        }
    }
}
