//! Contract routing: which `X-Satellogic-Contract-Id` a request carries. Pure rules
//! ([`ContractRouter::resolve`]) plus the one-time discovery through `GET /contracts`.
//!
//! Order: a client header when `allow_client_override`; the first `[[contract.routes]]` prefix that
//! matches on a segment boundary; `contract.default` (or the listener's contract); the credential's
//! only contract found by discovery. `/contracts` itself is sent without the header.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use tokio::sync::watch;

use crate::config::ContractConfig;

/// The outcome of routing one path.
#[derive(Debug, Clone, PartialEq)]
pub enum Resolution {
    /// Send this contract header.
    Header(HeaderValue),
    /// Send no contract header (`/contracts`).
    NoHeader,
    /// Use the discovered contract (wait for discovery when it is still running).
    Discovered,
}

/// What discovery found.
#[derive(Debug, Clone, PartialEq)]
pub enum Discovery {
    Pending,
    One(HeaderValue),
    /// Zero or several contracts, or discovery failed: the text says which.
    NotOne(String),
}

/// One contract as `GET /contracts` lists it.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize, PartialEq)]
pub struct ContractInfo {
    pub contract_id: String,
    #[serde(default)]
    pub name: Option<String>,
}

/// Parses a `/contracts` body: a list, or `{"results": [...]}`.
pub fn parse_contracts(body: &[u8]) -> Result<Vec<ContractInfo>, String> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Shape {
        List(Vec<ContractInfo>),
        Page { results: Vec<ContractInfo> },
    }
    match serde_json::from_slice::<Shape>(body) {
        Ok(Shape::List(l)) | Ok(Shape::Page { results: l }) => Ok(l),
        Err(_) => Err("the /contracts answer is not a list of contracts".into()),
    }
}

pub struct ContractRouter {
    routes: Vec<(String, HeaderValue)>,
    default: Option<HeaderValue>,
    pub allow_client_override: bool,
    discovery: watch::Receiver<Discovery>,
}

/// Is `path` the contracts listing, which the API serves without a contract?
pub fn is_contracts_path(path: &str) -> bool {
    path == "/contracts" || path == "/contracts/"
}

/// The path as an upstream that normalises it would see it, for routing: runs of `/` as one,
/// percent-encoded unreserved characters (`%61` is `a`, RFC 3986 6.2.2.2) decoded. The request
/// itself goes upstream as the client wrote it; its contract is the one of the path it names.
/// (Dot segments never get here: the proxy refuses them.)
pub fn routing_path(path: &str) -> Cow<'_, str> {
    // One pass over the bytes, no substring searcher: this runs on every request.
    let b = path.as_bytes();
    if !b
        .iter()
        .zip(b.iter().skip(1).chain(std::iter::once(&0)))
        .any(|(&c, &next)| c == b'%' || (c == b'/' && next == b'/'))
    {
        return Cow::Borrowed(path);
    }
    let b = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'/' if out.ends_with('/') => i += 1,
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(c)
                        if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') =>
                    {
                        out.push(c as char);
                        i += 3;
                    }
                    _ => {
                        out.push('%');
                        i += 1;
                    }
                }
            }
            _ => {
                // Copy up to the next byte of interest, whole UTF-8 sequences included.
                let next = b[i + 1..]
                    .iter()
                    .position(|&c| c == b'/' || c == b'%')
                    .map_or(b.len(), |n| i + 1 + n);
                out.push_str(&path[i..next]);
                i = next;
            }
        }
    }
    Cow::Owned(out)
}

/// Has `path` a `.` or `..` segment, written plainly or percent-encoded (`%2e`)? Upstreams and
/// caches resolve them, so `/archive/../tasking/x` is `/tasking/x` there: a path the proxy would
/// route as `/archive/...`, or one that climbs out of the upstream's base path.
pub fn has_dot_segment(path: &str) -> bool {
    if !path.contains('.') && !path.contains('%') {
        return false;
    }
    // Upstreams that decode `%2F` (or take `\` and `%5C` for `/`, as some servers and CDNs do)
    // before resolving dot segments see `..%2F` as `../`: those are separators here too.
    if path.contains('%') || path.contains('\\') {
        let mut spread = path.replace('\\', "/");
        for sep in ["%2F", "%2f", "%5C", "%5c"] {
            if spread.contains(sep) {
                spread = spread.replace(sep, "/");
            }
        }
        return dot_segment_among(&spread);
    }
    dot_segment_among(path)
}

fn dot_segment_among(path: &str) -> bool {
    path.split('/').any(|seg| {
        let seg = seg.as_bytes();
        let (mut dots, mut i) = (0, 0);
        while i < seg.len() {
            if seg[i] == b'.' {
                i += 1;
            } else if seg.len() - i >= 3
                && seg[i] == b'%'
                && seg[i + 1] == b'2'
                && seg[i + 2] | 0x20 == b'e'
            {
                i += 3;
            } else {
                return false;
            }
            dots += 1;
        }
        dots == 1 || dots == 2
    })
}

/// Does `prefix` match `path` on a segment boundary (`/archive` matches `/archive/stac` and
/// `/archive`, not `/archives`)?
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    if prefix.is_empty() {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

impl ContractRouter {
    pub fn new(cfg: &ContractConfig, discovery: watch::Receiver<Discovery>) -> ContractRouter {
        let hv = |s: &str| HeaderValue::from_str(s).expect("validated contract id");
        ContractRouter {
            routes: cfg
                .routes
                .iter()
                .map(|r| (r.prefix.clone(), hv(&r.id)))
                .collect(),
            default: cfg.default.as_deref().map(hv),
            allow_client_override: cfg.allow_client_override,
            discovery,
        }
    }

    /// True when some path can fall through to discovery.
    pub fn needs_discovery(&self) -> bool {
        self.default.is_none()
    }

    /// Routes one path. `client` is the contract header the client sent, if any.
    pub fn resolve(&self, path: &str, client: Option<&HeaderValue>) -> Resolution {
        if let (true, Some(c)) = (self.allow_client_override, client) {
            return Resolution::Header(c.clone());
        }
        let path = &*routing_path(path);
        if is_contracts_path(path) {
            return Resolution::NoHeader;
        }
        if let Some((_, id)) = self.routes.iter().find(|(p, _)| prefix_matches(p, path)) {
            return Resolution::Header(id.clone());
        }
        if let Some(d) = &self.default {
            return Resolution::Header(d.clone());
        }
        Resolution::Discovered
    }

    /// The discovered contract, waiting up to `limit` while discovery runs. `Err(None)`: discovery
    /// has not finished (the API is unreachable at start-up, say), a passing condition.
    pub async fn discovered(&self, limit: Duration) -> Result<HeaderValue, Option<String>> {
        let mut rx = self.discovery.clone();
        let outcome = tokio::time::timeout(limit, async {
            rx.wait_for(|d| !matches!(d, Discovery::Pending))
                .await
                .map(|d| d.clone())
        })
        .await;
        match outcome {
            Ok(Ok(Discovery::One(h))) => Ok(h),
            Ok(Ok(Discovery::NotOne(why))) => Err(Some(why)),
            _ => Err(None),
        }
    }
}

/// Turns a contract list into a discovery outcome.
pub fn discovery_outcome(list: &[ContractInfo]) -> Discovery {
    match list {
        [one] => match HeaderValue::from_str(&one.contract_id) {
            Ok(h) => Discovery::One(h),
            Err(_) => {
                Discovery::NotOne("the discovered contract id is not a valid header value".into())
            }
        },
        [] => Discovery::NotOne("the credential has no contract (GET /contracts is empty)".into()),
        many => Discovery::NotOne(format!(
            "the credential has {} contracts ({}), so none is chosen automatically",
            many.len(),
            many.iter()
                .map(|c| c.contract_id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

pub type DiscoverySender = Arc<watch::Sender<Discovery>>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ContractRoute;

    fn router(routes: &[(&str, &str)], default: Option<&str>, ovr: bool) -> ContractRouter {
        let cfg = ContractConfig {
            default: default.map(Into::into),
            allow_client_override: ovr,
            routes: routes
                .iter()
                .map(|(p, i)| ContractRoute {
                    prefix: p.to_string(),
                    id: i.to_string(),
                })
                .collect(),
        };
        let (_tx, rx) = watch::channel(Discovery::Pending);
        ContractRouter::new(&cfg, rx)
    }

    fn h(s: &'static str) -> Resolution {
        Resolution::Header(HeaderValue::from_static(s))
    }

    #[test]
    fn segment_boundary() {
        assert!(prefix_matches("/archive", "/archive"));
        assert!(prefix_matches("/archive", "/archive/stac"));
        assert!(prefix_matches("/archive/", "/archive/stac"));
        assert!(!prefix_matches("/archive", "/archives"));
        assert!(!prefix_matches("/archive", "/"));
        assert!(prefix_matches("/", "/anything"));
    }

    #[test]
    fn dot_segments_plain_or_encoded() {
        for p in [
            "/archive/..%2Ftasking/x",
            "/..%2f..%2fadmin",
            "/archive/%2e%2e%5Ctasking",
            "/archive/..\\tasking",
            "/archive/../tasking/x",
            "/archive/%2e%2e/tasking/x",
            "/archive/%2E./x",
            "/./archive",
            "/a/.",
            "/a/..",
            "/a/%2e",
        ] {
            assert!(has_dot_segment(p), "{p}");
        }
        for p in [
            "/",
            "/a/b.tif",
            "/a/...",
            "/a/.b",
            "/a/%2e%2e%2e",
            "/a/%2f",
            "/v1.2/x",
        ] {
            assert!(!has_dot_segment(p), "{p}");
        }
    }

    #[test]
    fn routes_see_the_path_an_upstream_would() {
        assert_eq!(routing_path("/archive/x"), "/archive/x");
        assert_eq!(routing_path("//archive//x"), "/archive/x");
        assert_eq!(routing_path("/%61rchive/x"), "/archive/x");
        assert_eq!(routing_path("/%41%7e%2D"), "/A~-");
        // Reserved and non-ASCII encodings stay encoded; broken escapes stay as written.
        assert_eq!(routing_path("/a%2Fb/%C3%A9/%zz/%4"), "/a%2Fb/%C3%A9/%zz/%4");
        assert_eq!(routing_path("/é//x%"), "/é/x%");
        let r = router(
            &[("/archive", "A"), ("/contracts-x", "X")],
            Some("D"),
            false,
        );
        assert_eq!(r.resolve("//archive/x", None), h("A"));
        assert_eq!(r.resolve("/%61rchive/x", None), h("A"));
        assert_eq!(r.resolve("//contracts", None), Resolution::NoHeader);
        assert_eq!(r.resolve("/contr%61cts/", None), Resolution::NoHeader);
    }

    #[test]
    fn first_matching_route_wins_then_default_then_discovery() {
        let r = router(
            &[("/archive/stac", "A1"), ("/archive", "A2")],
            Some("D"),
            false,
        );
        assert_eq!(r.resolve("/archive/stac/search", None), h("A1"));
        assert_eq!(r.resolve("/archive/x", None), h("A2"));
        assert_eq!(r.resolve("/archives", None), h("D"));
        assert_eq!(r.resolve("/contracts", None), Resolution::NoHeader);
        let r = router(&[("/archive", "A")], None, false);
        assert_eq!(r.resolve("/tasking/tasks", None), Resolution::Discovered);
    }

    #[test]
    fn client_override_only_when_allowed() {
        let c = HeaderValue::from_static("C");
        let r = router(&[], Some("D"), false);
        assert_eq!(r.resolve("/x", Some(&c)), h("D"));
        let r = router(&[], Some("D"), true);
        assert_eq!(r.resolve("/x", Some(&c)), h("C"));
    }

    /// Independent oracle: the prefix's segments are a prefix of the path's segments.
    fn segments_prefix(prefix: &str, path: &str) -> bool {
        let pre: Vec<&str> = prefix.split('/').filter(|s| !s.is_empty()).collect();
        let segs: Vec<&str> = path.split('/').skip(1).collect();
        segs.len() >= pre.len() && segs[..pre.len()] == pre[..]
    }

    fn path() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        (prop::collection::vec("[a-c]{1,3}", 0..4), any::<bool>()).prop_map(|(segs, slash)| {
            let p = format!("/{}", segs.join("/"));
            if slash && !segs.is_empty() {
                p + "/"
            } else {
                p
            }
        })
    }

    proptest::proptest! {
        /// Routing picks the client's header when overriding is allowed, else no header for
        /// /contracts, else the first route whose prefix matches on segment boundaries, else
        /// the default, else discovery.
        #[test]
        fn prop_routing_picks_the_first_segment_prefix(
            routes in proptest::collection::vec((path(), "[a-z0-9-]{1,8}"), 0..5),
            p in path(),
            default in proptest::option::of("[a-z0-9-]{1,8}"),
            client in proptest::option::of("[a-z0-9-]{1,8}"),
            ovr in proptest::bool::ANY,
        ) {
            let pairs: Vec<(&str, &str)> =
                routes.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
            let r = router(&pairs, default.as_deref(), ovr);
            let client_hv = client.as_deref().map(|c| HeaderValue::from_str(c).unwrap());
            let expected = match (&client_hv, ovr) {
                (Some(c), true) => Resolution::Header(c.clone()),
                _ if is_contracts_path(&p) => Resolution::NoHeader,
                _ => match routes.iter().find(|(pre, _)| segments_prefix(pre, &p)) {
                    Some((_, id)) => Resolution::Header(HeaderValue::from_str(id).unwrap()),
                    None => match &default {
                        Some(d) => Resolution::Header(HeaderValue::from_str(d).unwrap()),
                        None => Resolution::Discovered,
                    },
                },
            };
            proptest::prop_assert_eq!(r.resolve(&p, client_hv.as_ref()), expected);
        }

        /// A prefix never matches a path that continues its last segment (`/a` vs `/ab`).
        #[test]
        fn prop_prefix_never_matches_inside_a_segment(
            prefix in path(),
            more in "[a-z]{1,3}",
            rest in path(),
        ) {
            let base = prefix.trim_end_matches('/');
            proptest::prop_assume!(!base.is_empty());
            let p = format!("{base}{more}{rest}");
            proptest::prop_assert!(!prefix_matches(&prefix, &p));
            let below = format!("{base}{rest}");
            proptest::prop_assert!(prefix_matches(&prefix, &below));
        }
    }

    #[test]
    fn contracts_parse_both_shapes() {
        let a = parse_contracts(br#"[{"contract_id":"c1","name":"n"}]"#).unwrap();
        let b = parse_contracts(br#"{"results":[{"contract_id":"c1"}]}"#).unwrap();
        assert_eq!(a[0].contract_id, b[0].contract_id);
        assert!(parse_contracts(b"{}").is_err());
        assert!(matches!(discovery_outcome(&a), Discovery::One(_)));
        assert!(matches!(discovery_outcome(&[]), Discovery::NotOne(_)));
    }
}
