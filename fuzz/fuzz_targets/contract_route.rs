//! Contract routing on arbitrary routes and paths: the first route whose prefix matches on a
//! segment boundary wins, then the default, then discovery; `/contracts` goes without a header.
//!
//! Input: lines. The first is the request path; each further line is `prefix id` (a route) or
//! `=id` (the default).
#![no_main]

use aleph_proxy::config::{ContractConfig, ContractRoute};
use aleph_proxy::proxy::contract::{
    is_contracts_path, prefix_matches, ContractRouter, Discovery, Resolution,
};
use http::HeaderValue;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut lines = text.lines();
    let Some(path) = lines.next() else {
        return;
    };
    let mut cfg = ContractConfig::default();
    for line in lines {
        if let Some(id) = line.strip_prefix('=') {
            // The configuration accepts only ids that are header values.
            if HeaderValue::from_str(id).is_ok() && !id.trim().is_empty() {
                cfg.default = Some(id.to_string());
            }
        } else if let Some((prefix, id)) = line.split_once(' ') {
            if prefix.starts_with('/') && HeaderValue::from_str(id).is_ok() && !id.trim().is_empty()
            {
                cfg.routes.push(ContractRoute {
                    prefix: prefix.to_string(),
                    id: id.to_string(),
                });
            }
        }
    }
    let (_tx, rx) = tokio::sync::watch::channel(Discovery::Pending);
    let router = ContractRouter::new(&cfg, rx);
    let got = router.resolve(path, None);

    let expected = if is_contracts_path(path) {
        Resolution::NoHeader
    } else if let Some(r) = cfg.routes.iter().find(|r| segment_prefix(&r.prefix, path)) {
        Resolution::Header(HeaderValue::from_str(&r.id).unwrap())
    } else if let Some(d) = &cfg.default {
        Resolution::Header(HeaderValue::from_str(d).unwrap())
    } else {
        Resolution::Discovered
    };
    assert_eq!(got, expected, "path {path:?}, routes {:?}", cfg.routes);
    for r in &cfg.routes {
        assert_eq!(
            prefix_matches(&r.prefix, path),
            segment_prefix(&r.prefix, path)
        );
    }
});

/// Independent oracle: after removing trailing slashes from the prefix, the path equals it or
/// continues it with '/'.
fn segment_prefix(prefix: &str, path: &str) -> bool {
    let p = prefix.trim_end_matches('/');
    p.is_empty() || path == p || path.starts_with(&format!("{p}/"))
}
