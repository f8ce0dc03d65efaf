//! The proxy's own errors: one enum, the one place that picks status codes, and one JSON shape.
//!
//! Every response the proxy makes itself carries the header `x-aleph-proxy-error: <code>` and a body
//! `{"error": {"code", "message", "source": "aleph-proxy"}}`, so a client can tell it from the API's
//! own errors. Messages never contain secrets, tokens or internal error chains.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};

use crate::body::{self, ProxyBody};

/// Response header that marks a response as made by the proxy, not the upstream.
pub const ERROR_HEADER: &str = "x-aleph-proxy-error";

/// Where an error came from (pingora-style classification).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyError {
    /// No valid token could be had in time (token endpoint down, credentials rejected).
    NoToken { retry_after: Duration },
    /// No contract applies to this path and none could be discovered; `pending` while
    /// discovery has not finished (503 with Retry-After: it passes), else 422.
    NoContract {
        path: String,
        detail: String,
        pending: bool,
    },
    /// The upstream could not be reached (refused, DNS, TLS).
    UpstreamUnreachable,
    /// The upstream was reached but its answer cannot be passed on: the connection closed
    /// before a response, or the response head or framing is invalid.
    UpstreamBadResponse,
    /// The upstream did not answer in time.
    UpstreamTimeout,
    /// Too many requests in flight in the proxy.
    Overloaded { retry_after: Duration },
    /// The request cannot be served by a reverse proxy (absolute-form, CONNECT, bad path).
    BadRequest { detail: String },
    /// Inbound access control refused the client.
    Forbidden { detail: String },
    /// The request head is larger than `limits.max_request_header_bytes` (or has too many fields).
    HeadersTooLarge,
    /// The request line alone is longer than `limits.max_request_header_bytes`.
    TargetTooLong,
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoToken { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::NoContract { pending: true, .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::NoContract { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ProxyError::UpstreamUnreachable | ProxyError::UpstreamBadResponse => {
                StatusCode::BAD_GATEWAY
            }
            ProxyError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Overloaded { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ProxyError::Forbidden { .. } => StatusCode::FORBIDDEN,
            ProxyError::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::TargetTooLong => StatusCode::URI_TOO_LONG,
        }
    }

    /// A stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::NoToken { .. } => "no_token",
            ProxyError::NoContract { .. } => "no_contract",
            ProxyError::UpstreamUnreachable => "upstream_unreachable",
            ProxyError::UpstreamBadResponse => "upstream_bad_response",
            ProxyError::UpstreamTimeout => "upstream_timeout",
            ProxyError::Overloaded { .. } => "overloaded",
            ProxyError::BadRequest { .. } => "bad_request",
            ProxyError::Forbidden { .. } => "forbidden",
            ProxyError::HeadersTooLarge => "request_headers_too_large",
            ProxyError::TargetTooLong => "request_target_too_long",
        }
    }

    pub fn message(&self) -> String {
        match self {
            ProxyError::NoToken { .. } => {
                "aleph-proxy holds no valid access token: the token endpoint is unreachable or rejects the credentials; retry later".into()
            }
            ProxyError::NoContract { path, detail, pending: true } => format!(
                "no X-Satellogic-Contract-Id applies to {path} yet: {detail} (the API may be unreachable); retry later"
            ),
            ProxyError::NoContract { path, detail, .. } => format!(
                "no X-Satellogic-Contract-Id applies to {path}: {detail}. Set contract.default, add a [[contract.routes]] rule, or send the header with contract.allow_client_override = true"
            ),
            ProxyError::UpstreamUnreachable => "aleph-proxy could not connect to the upstream API".into(),
            ProxyError::UpstreamBadResponse => "the upstream API closed the connection without a response, or sent one aleph-proxy cannot pass on (its log says which)".into(),
            ProxyError::UpstreamTimeout => "the upstream API did not answer in time".into(),
            ProxyError::Overloaded { .. } => "aleph-proxy has too many requests in flight; retry later".into(),
            ProxyError::BadRequest { detail } => detail.clone(),
            ProxyError::Forbidden { detail } => detail.clone(),
            ProxyError::HeadersTooLarge => "the request head is larger than aleph-proxy accepts (limits.max_request_header_bytes, at most 100 fields)".into(),
            ProxyError::TargetTooLong => "the request target is longer than aleph-proxy accepts (limits.max_request_header_bytes)".into(),
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            ProxyError::NoToken { retry_after } | ProxyError::Overloaded { retry_after } => {
                Some(*retry_after)
            }
            ProxyError::NoContract { pending: true, .. } => Some(Duration::from_secs(1)),
            _ => None,
        }
    }

    /// The JSON body, built with serde_json so paths and details are escaped correctly.
    pub fn body(&self) -> Bytes {
        let v = serde_json::json!({
            "error": {
                "code": self.code(),
                "message": self.message(),
                "status": self.status().as_u16(),
                "source": "aleph-proxy",
            }
        });
        Bytes::from(serde_json::to_vec(&v).expect("json serializes"))
    }

    pub fn into_response(self) -> Response<ProxyBody> {
        let mut resp = Response::new(body::full(self.body()));
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(ERROR_HEADER, HeaderValue::from_static(self.code()));
        h.insert(
            http::header::CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        );
        if let Some(ra) = self.retry_after() {
            let secs = ra.as_secs().max(1);
            h.insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_one_stable_shape() {
        let e = ProxyError::NoContract {
            path: "/tasking/\"x".into(),
            detail: "none configured".into(),
            pending: false,
        };
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(v["error"]["code"], "no_contract");
        assert_eq!(v["error"]["source"], "aleph-proxy");
        assert_eq!(v["error"]["status"], 422);
        assert!(v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("/tasking/\"x"));
    }

    #[test]
    fn statuses() {
        assert_eq!(ProxyError::UpstreamUnreachable.status(), 502);
        assert_eq!(ProxyError::UpstreamBadResponse.status(), 502);
        assert_eq!(
            ProxyError::UpstreamBadResponse.code(),
            "upstream_bad_response"
        );
        assert_eq!(ProxyError::UpstreamTimeout.status(), 504);
        assert_eq!(ProxyError::TargetTooLong.status(), 414);
        assert_eq!(ProxyError::TargetTooLong.code(), "request_target_too_long");
        let r = ProxyError::NoToken {
            retry_after: Duration::from_secs(3),
        }
        .into_response();
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()["retry-after"], "3");
        assert_eq!(r.headers()[ERROR_HEADER], "no_token");
    }
}
