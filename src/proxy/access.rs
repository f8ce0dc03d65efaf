//! Inbound access control: who may use the proxy's credentials. Client address (CIDR allowlist),
//! a shared key header compared in constant time, a Host allowlist against DNS rebinding
//! (a web page that rebinds its own name to 127.0.0.1 sends `Host: its-name`), and an Origin
//! check against cross-site requests (a page on any site may POST to http://127.0.0.1:8080; the
//! browser then sends its `Origin`, which must be one of `cors.allowed_origins`).

use std::net::{IpAddr, SocketAddr};

use http::HeaderMap;
use subtle::ConstantTimeEq;

use crate::config::AccessConfig;
use crate::error::ProxyError;

/// The checks of one listener, resolved once at start-up.
#[derive(Debug, Clone)]
pub struct Access {
    pub cfg: AccessConfig,
    /// Host names (lowercase, without port) accepted in the Host header; empty = any.
    hosts: Vec<String>,
}

/// Hosts accepted by default on a loopback listener when `access.allowed_hosts` is not set.
const LOOPBACK_HOSTS: [&str; 4] = ["localhost", "127.0.0.1", "[::1]", "::1"];

impl Access {
    pub fn new(cfg: &AccessConfig, listen: SocketAddr) -> Access {
        let hosts = if cfg.allowed_hosts.iter().any(|h| h == "*") {
            Vec::new()
        } else if cfg.allowed_hosts.is_empty() && listen.ip().is_loopback() {
            LOOPBACK_HOSTS.iter().map(|s| s.to_string()).collect()
        } else {
            cfg.allowed_hosts.clone()
        };
        Access {
            cfg: cfg.clone(),
            hosts,
        }
    }

    pub fn check(&self, remote: IpAddr, headers: &HeaderMap) -> Result<(), ProxyError> {
        if !self.cfg.allowed_cidrs.is_empty() {
            let remote = match remote {
                IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(remote),
                v4 => v4,
            };
            if !self.cfg.allowed_cidrs.iter().any(|n| n.contains(&remote)) {
                return Err(ProxyError::Forbidden {
                    detail: "this client address is not in access.allowed_cidrs".into(),
                });
            }
        }
        if !self.hosts.is_empty() {
            if let Some(host) = headers.get(http::header::HOST) {
                let ok = host.to_str().ok().map(host_without_port).is_some_and(|h| {
                    self.hosts.iter().any(|allowed| {
                        allowed.eq_ignore_ascii_case(h)
                            || (allowed.starts_with('.')
                                && h.len() > allowed.len()
                                && h[h.len() - allowed.len()..].eq_ignore_ascii_case(allowed))
                    })
                });
                if !ok {
                    return Err(ProxyError::Forbidden {
                        detail: "this Host is not allowed (access.allowed_hosts); it guards against DNS rebinding".into(),
                    });
                }
            }
        }
        if let Some(origin) = headers.get(http::header::ORIGIN) {
            // Clients other than browsers send no Origin. A browser sends it on cross-origin
            // requests and on every POST; without this check a page could make the proxy act
            // (POST /tasking/tasks) even though it cannot read the answer.
            let allowed = self.cfg.allowed_origins.iter().any(|o| o == "*")
                || origin.to_str().is_ok_and(|o| {
                    let o = o.trim_end_matches('/');
                    self.cfg
                        .allowed_origins
                        .iter()
                        .any(|a| a.eq_ignore_ascii_case(o))
                });
            if !allowed {
                return Err(ProxyError::Forbidden {
                    detail: "requests from web pages of this origin are refused: add it to cors.allowed_origins to allow them".into(),
                });
            }
        }
        if let Some(key) = &self.cfg.key {
            let given = headers
                .get(&self.cfg.key_header)
                .map(|v| v.as_bytes())
                .unwrap_or(b"");
            if !bool::from(given.ct_eq(key.expose().as_bytes())) {
                return Err(ProxyError::Forbidden {
                    detail: format!(
                        "missing or wrong access key (header {})",
                        self.cfg.key_header
                    ),
                });
            }
        }
        Ok(())
    }
}

/// `example.com:8080` -> `example.com`, `[::1]:80` -> `[::1]`.
fn host_without_port(h: &str) -> &str {
    if h.starts_with('[') {
        // `[v6]` or `[v6]:port`; anything else after the `]` (`[::1].evil.com`) keeps the
        // whole text, which matches no allowed name.
        match h.find(']') {
            Some(end)
                if h[end + 1..].is_empty()
                    || h[end + 1..]
                        .strip_prefix(':')
                        .is_some_and(|p| p.bytes().all(|b| b.is_ascii_digit())) =>
            {
                &h[..=end]
            }
            _ => h,
        }
    } else {
        match h.rfind(':') {
            Some(i) if h[i + 1..].bytes().all(|b| b.is_ascii_digit()) => &h[..i],
            _ => h,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;
    use http::HeaderValue;

    fn cfg() -> AccessConfig {
        AccessConfig {
            key_header: http::HeaderName::from_static("x-aleph-proxy-key"),
            key: None,
            allowed_cidrs: vec![],
            allowed_hosts: vec![],
            allowed_origins: vec![],
        }
    }

    fn headers(host: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_str(host).unwrap());
        h
    }

    #[test]
    fn loopback_listener_rejects_rebound_hosts() {
        let a = Access::new(&cfg(), "127.0.0.1:8080".parse().unwrap());
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        assert!(a.check(ip, &headers("127.0.0.1:8080")).is_ok());
        assert!(a.check(ip, &headers("localhost:8080")).is_ok());
        assert!(a.check(ip, &headers("[::1]:8080")).is_ok());
        assert!(a.check(ip, &headers("evil.example:8080")).is_err());
        assert!(a.check(ip, &headers("[::1].evil.example")).is_err());
        assert!(a.check(ip, &HeaderMap::new()).is_ok());
    }

    #[test]
    fn cidrs_and_keys() {
        let mut c = cfg();
        c.allowed_cidrs = vec!["10.0.0.0/8".parse().unwrap()];
        c.key = Some(Secret::new("0123456789abcdef"));
        let a = Access::new(&c, "0.0.0.0:8080".parse().unwrap());
        let inside: IpAddr = "10.1.2.3".parse().unwrap();
        let outside: IpAddr = "192.0.2.1".parse().unwrap();
        let mut h = headers("proxy:8080");
        assert!(a.check(inside, &h).is_err());
        h.insert(
            "x-aleph-proxy-key",
            HeaderValue::from_static("0123456789abcdef"),
        );
        assert!(a.check(inside, &h).is_ok());
        assert!(a.check(outside, &h).is_err());
        h.insert(
            "x-aleph-proxy-key",
            HeaderValue::from_static("0123456789abcdeX"),
        );
        assert!(a.check(inside, &h).is_err());
    }

    proptest::proptest! {
        /// Any Host and key bytes: no panic; an accepted request had an allowed Host (or none)
        /// and exactly the key.
        #[test]
        fn prop_access_accepts_only_allowed_hosts_and_the_exact_key(
            host in proptest::collection::vec(proptest::num::u8::ANY, 0..40),
            key in proptest::collection::vec(proptest::num::u8::ANY, 0..40),
            ip in proptest::array::uniform4(proptest::num::u8::ANY),
        ) {
            let mut c = cfg();
            c.key = Some(Secret::new("0123456789abcdef"));
            c.allowed_cidrs = vec!["10.0.0.0/8".parse().unwrap()];
            c.allowed_hosts = vec!["proxy.internal".into(), ".svc.local".into()];
            let a = Access::new(&c, "0.0.0.0:8080".parse().unwrap());
            let mut h = HeaderMap::new();
            let host_hv = HeaderValue::from_bytes(&host).ok();
            if let Some(v) = &host_hv {
                h.insert("host", v.clone());
            }
            if let Ok(v) = HeaderValue::from_bytes(&key) {
                h.insert("x-aleph-proxy-key", v);
            }
            let remote = IpAddr::from(ip);
            if a.check(remote, &h).is_ok() {
                proptest::prop_assert_eq!(ip[0], 10);
                proptest::prop_assert_eq!(&key[..], b"0123456789abcdef");
                if let Some(v) = host_hv {
                    let name = host_without_port(v.to_str().unwrap()).to_ascii_lowercase();
                    proptest::prop_assert!(
                        name == "proxy.internal"
                            || (name.ends_with(".svc.local") && name.len() > ".svc.local".len())
                    );
                }
            }
        }
    }

    #[test]
    fn foreign_origins_are_refused() {
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let mut c = cfg();
        c.allowed_origins = vec!["https://maps.example".into()];
        let a = Access::new(&c, "127.0.0.1:8080".parse().unwrap());
        let mut h = headers("127.0.0.1:8080");
        assert!(a.check(ip, &h).is_ok());
        h.insert("origin", HeaderValue::from_static("https://MAPS.example/"));
        assert!(a.check(ip, &h).is_ok());
        for bad in ["https://evil.example", "null", "https://maps.example.evil"] {
            h.insert("origin", HeaderValue::from_static(bad));
            assert!(a.check(ip, &h).is_err(), "{bad}");
        }
        c.allowed_origins = vec!["*".into()];
        let a = Access::new(&c, "127.0.0.1:8080".parse().unwrap());
        assert!(a.check(ip, &h).is_ok());
    }

    #[test]
    fn host_ports() {
        assert_eq!(host_without_port("a.b:80"), "a.b");
        assert_eq!(host_without_port("[::1]:80"), "[::1]");
        assert_eq!(host_without_port("a.b"), "a.b");
        for odd in ["[::1].evil.com", "[::1]evil", "[::1]:5evil", "[::1]]"] {
            assert_eq!(host_without_port(odd), odd);
        }
    }
}
