//! Header policy of the forwarding path, in one place: which headers the proxy strips from the
//! client's request, which it injects (marked sensitive), and which it strips from responses.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// The API's token header (`authorizationToken: Bearer <token>`).
pub const AUTHORIZATION_TOKEN: HeaderName = HeaderName::from_static("authorizationtoken");
/// The API's contract header.
pub const CONTRACT_ID: HeaderName = HeaderName::from_static("x-satellogic-contract-id");
/// Request id: taken from the client when present and sane, generated otherwise, sent upstream and
/// echoed back.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// Marks an upstream response that the proxy replayed after refreshing its token.
pub const PROXY_PREFIX: &str = "x-aleph-proxy-";

/// Hop-by-hop headers (RFC 9110 7.6.1) plus the legacy ones proxies must not forward.
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// The lengths of the names in `HOP_BY_HOP`: most fields are ruled out by theirs alone, without
/// comparing them with eight names.
fn hop_by_hop_length(len: usize) -> bool {
    matches!(len, 2 | 7 | 10 | 16 | 17 | 19)
}

/// Removes hop-by-hop headers, including those the `Connection` header names.
///
/// One pass over the names finds which are present (most messages carry none but `Connection`);
/// only those are removed. A `remove` hashes its name even when it is absent, and this runs twice
/// per request.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let mut present = [false; 8];
    let mut any = false;
    for name in headers.keys() {
        if !hop_by_hop_length(name.as_str().len()) {
            continue;
        }
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
            present[i] = true;
            any = true;
        }
    }
    if !any {
        return;
    }
    if present[0] {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|list| list.split(','))
            .map(str::trim)
            // Connection options, not field names (Keep-Alive is hop-by-hop anyway): not
            // parsed as names, which would allocate for every keep-alive response.
            .filter(|n| {
                !n.is_empty()
                    && !n.eq_ignore_ascii_case("close")
                    && !n.eq_ignore_ascii_case("keep-alive")
            })
            .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
            // The API's token and contract fields are never taken for hop-by-hop ones (on a
            // request the proxy's own go out after the map anyway: `injected`).
            .filter(|n| *n != AUTHORIZATION_TOKEN && *n != CONTRACT_ID)
            .filter(|n| !HOP_BY_HOP.contains(n))
            .collect();
        for n in named {
            headers.remove(n);
        }
    }
    for (h, present) in HOP_BY_HOP.iter().zip(present) {
        if present {
            headers.remove(h);
        }
    }
}

/// Prepares the client's headers for the upstream: strips hop-by-hop headers, every client
/// credential (`authorizationToken`, `Authorization`; `Cookie` is kept: it is not a credential of
/// this API), the inbound access key, and the client's contract header and request id. The
/// proxy's own values for those go out as [`injected`] fields, after the map's.
pub fn prepare_request(headers: &mut HeaderMap, access_key_header: &HeaderName) {
    strip_hop_by_hop(headers);
    // Host stays in the map (access checks and link rewriting read it); the upstream request
    // is written with the upstream's own (upstream::h1::write_head, and `:authority` for
    // HTTP/2, where the map's Host is removed).
    // The names to strip are found in one pass (usually there are none): a `remove` hashes its
    // name even when it is absent.
    let key_len = access_key_header.as_str().len();
    let (mut authorization, mut key, mut accept_encoding) = (false, false, false);
    let (mut token, mut contract, mut request_id) = (false, false, false);
    for name in headers.keys() {
        authorization |= *name == header::AUTHORIZATION;
        accept_encoding |= *name == header::ACCEPT_ENCODING;
        key |= name.as_str().len() == key_len && name == access_key_header;
        token |= *name == AUTHORIZATION_TOKEN;
        contract |= *name == CONTRACT_ID;
        request_id |= *name == REQUEST_ID;
    }
    if accept_encoding {
        narrow_accept_encoding(headers);
    }
    for (name, present) in [
        (&header::AUTHORIZATION, authorization),
        (access_key_header, key),
        (&AUTHORIZATION_TOKEN, token),
        (&CONTRACT_ID, contract),
        (&REQUEST_ID, request_id),
    ] {
        if present {
            // Every value, whatever its case or count.
            headers.remove(name);
        }
    }
}

/// The fields the proxy adds to a request prepared by [`prepare_request`]: its token, the
/// contract (none for the paths that take no contract header), the request id.
pub fn injected<'a>(
    token: &'a HeaderValue,
    contract: Option<&'a HeaderValue>,
    request_id: &'a HeaderValue,
) -> [(HeaderName, Option<&'a HeaderValue>); 3] {
    [
        (AUTHORIZATION_TOKEN, Some(token)),
        (CONTRACT_ID, contract),
        (REQUEST_ID, Some(request_id)),
    ]
}

/// The content codings the proxy can read (link rewriting, the contract check of a 401): gzip,
/// deflate and br. `identity` is always acceptable.
const READABLE_CODINGS: [&str; 4] = ["gzip", "x-gzip", "deflate", "br"];

/// The coding of an `Accept-Encoding` item (`gzip;q=0.5`: `gzip`).
fn coding_of(item: &str) -> &str {
    item.split(';').next().unwrap_or("").trim()
}

/// Keeps only the codings the proxy can read in the client's `Accept-Encoding`, so the upstream
/// never answers in one it cannot (zstd, compression dictionaries): a JSON body in such a coding
/// would reach the client with its upstream links unrewritten, and the client would follow them
/// around the proxy. `*` becomes the readable codings, with its weight. A header with nothing
/// readable left becomes `identity`. One that names only readable codings is left as it is.
pub fn narrow_accept_encoding(headers: &mut HeaderMap) {
    let items = |headers: &HeaderMap| -> Vec<String> {
        headers
            .get_all(header::ACCEPT_ENCODING)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|i| !i.is_empty())
            .map(str::to_string)
            .collect()
    };
    // Most clients (curl, GDAL, Python) name only readable codings: nothing to do, no allocation.
    let unchanged = headers.get_all(header::ACCEPT_ENCODING).iter().all(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',')
                .map(str::trim)
                .all(|item| item.is_empty() || accepted(item) == Accepted::Keep)
        })
    });
    if unchanged {
        return;
    }
    let mut kept: Vec<String> = Vec::new();
    let mut star: Option<String> = None;
    for item in items(headers) {
        match accepted(&item) {
            Accepted::Keep => kept.push(item),
            Accepted::Star => star = Some(item[1..].trim().to_string()),
            Accepted::Drop => {}
        }
    }
    if let Some(weight) = star {
        // The codings the client left to `*`: those it did not name itself.
        let named: Vec<String> = kept
            .iter()
            .map(|i| coding_of(i).to_ascii_lowercase())
            .collect();
        for c in ["gzip", "deflate", "br"] {
            if !named
                .iter()
                .any(|n| n == c || (c == "gzip" && n == "x-gzip"))
            {
                kept.push(format!("{c}{weight}"));
            }
        }
    }
    // Nothing offered any more (`zstd, *;q=0`: the client's only coding is one the proxy
    // cannot read): identity, which the proxy can always pass on, rather than a header that
    // refuses everything and gets a 406.
    let value = if kept.iter().all(|i| refuses(i)) {
        "identity".to_string()
    } else {
        kept.join(", ")
    };
    let value =
        HeaderValue::try_from(value).unwrap_or_else(|_| HeaderValue::from_static("identity"));
    headers.insert(header::ACCEPT_ENCODING, value);
}

/// What [`narrow_accept_encoding`] does with one item of the header.
#[derive(Debug, PartialEq)]
enum Accepted {
    /// A readable coding, `identity`, or `*;q=0` (which only takes codings away).
    Keep,
    /// `*` with a weight above 0: spelled out as the readable codings.
    Star,
    /// A coding the proxy cannot read.
    Drop,
}

/// `q=0`: the item refuses its coding instead of offering it.
fn refuses(item: &str) -> bool {
    item.split(';').skip(1).any(|p| {
        p.trim()
            .strip_prefix("q=")
            .and_then(|q| q.parse::<f32>().ok())
            .is_some_and(|q| q == 0.0)
    })
}

fn accepted(item: &str) -> Accepted {
    let coding = coding_of(item);
    if coding == "*" {
        let excludes = refuses(item);
        return if excludes {
            Accepted::Keep
        } else {
            Accepted::Star
        };
    }
    let readable = coding.eq_ignore_ascii_case("identity")
        || READABLE_CODINGS
            .iter()
            .any(|c| coding.eq_ignore_ascii_case(c));
    if readable {
        Accepted::Keep
    } else {
        Accepted::Drop
    }
}

/// Prepares upstream response headers for the client.
pub fn prepare_response(headers: &mut HeaderMap, request_id: &HeaderValue) {
    strip_hop_by_hop(headers);
    headers.insert(REQUEST_ID, request_id.clone());
}

/// A request id: the client's when it is short and printable, else a fresh random one.
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get(REQUEST_ID) {
        let b = v.as_bytes();
        if !b.is_empty()
            && b.len() <= 128
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b':'))
        {
            return v.clone();
        }
    }
    let id = IDS.with(|ids| {
        let mut ids = ids.borrow_mut();
        if ids.is_empty() {
            *ids = id_block();
        }
        ids.split_to(ID_LEN)
    });
    HeaderValue::from_maybe_shared(id).expect("hex is a valid header value")
}

const ID_LEN: usize = 32;
/// Fresh request ids are made this many at a time, in one buffer that they share: an id then
/// costs no allocation of its own, and copies of it (the upstream request, the response, the
/// log line) share its bytes instead of allocating a shared copy each.
const IDS_PER_BLOCK: usize = 64;

thread_local! {
    static IDS: std::cell::RefCell<bytes::Bytes> = const { std::cell::RefCell::new(bytes::Bytes::new()) };
}

/// `IDS_PER_BLOCK` random ids of 32 hex digits (128 random bits each), back to back: the random
/// bytes drawn in one call, then written as hex two digits at a time.
fn id_block() -> bytes::Bytes {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut random = [0u8; ID_LEN / 2 * IDS_PER_BLOCK];
    rand::fill(&mut random[..]);
    let mut block = vec![0u8; ID_LEN * IDS_PER_BLOCK];
    for (pair, b) in block.chunks_exact_mut(2).zip(random) {
        pair[0] = HEX[(b >> 4) as usize];
        pair[1] = HEX[(b & 0xf) as usize];
    }
    bytes::Bytes::from(block)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_credentials_are_replaced() {
        let mut h = HeaderMap::new();
        h.append(
            "AuthorizationToken",
            HeaderValue::from_static("Bearer client"),
        );
        h.append(
            "authorizationtoken",
            HeaderValue::from_static("Bearer client2"),
        );
        h.insert("authorization", HeaderValue::from_static("Basic abc"));
        h.insert("x-aleph-proxy-key", HeaderValue::from_static("k"));
        h.insert("x-satellogic-contract-id", HeaderValue::from_static("c0"));
        h.insert("x-request-id", HeaderValue::from_static("client-id"));
        h.insert("host", HeaderValue::from_static("evil"));
        h.insert("connection", HeaderValue::from_static("keep-alive, x-drop"));
        h.insert("x-drop", HeaderValue::from_static("1"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        let key = HeaderName::from_static("x-aleph-proxy-key");
        prepare_request(&mut h, &key);
        for gone in [
            "authorizationtoken",
            "authorization",
            "x-aleph-proxy-key",
            "x-satellogic-contract-id",
            "x-request-id",
            "x-drop",
            "connection",
        ] {
            assert!(h.get(gone).is_none(), "{gone}");
        }
        assert_eq!(h["x-keep"], "1");
        assert_eq!(h["host"], "evil");

        let mut tok = HeaderValue::from_static("Bearer proxy");
        tok.set_sensitive(true);
        let c1 = HeaderValue::from_static("c1");
        let rid = HeaderValue::from_static("rid");
        let extra = injected(&tok, Some(&c1), &rid);
        assert_eq!(extra[0], (AUTHORIZATION_TOKEN, Some(&tok)));
        assert!(extra[0].1.unwrap().is_sensitive());
        // What a `?headers` log field or a hyper/h2 trace would print: no token. (h2 also sends
        // sensitive values never-indexed, out of reach of HPACK compression attacks.)
        assert!(!format!("{extra:?}").contains("Bearer proxy"));
        assert_eq!(extra[1], (CONTRACT_ID, Some(&c1)));
        assert_eq!(extra[2], (REQUEST_ID, Some(&rid)));
        assert_eq!(injected(&tok, None, &rid)[1], (CONTRACT_ID, None));
    }

    #[test]
    fn accept_encoding_keeps_only_readable_codings() {
        let narrowed = |values: &[&str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(header::ACCEPT_ENCODING, HeaderValue::from_str(v).unwrap());
            }
            narrow_accept_encoding(&mut h);
            let out: Vec<_> = h
                .get_all(header::ACCEPT_ENCODING)
                .iter()
                .map(|v| v.to_str().unwrap().to_string())
                .collect();
            out.join(" | ")
        };
        // curl --compressed, Chrome, Firefox.
        assert_eq!(narrowed(&["deflate, gzip, br, zstd"]), "deflate, gzip, br");
        assert_eq!(
            narrowed(&["gzip, deflate, br, zstd, dcb, dcz"]),
            "gzip, deflate, br"
        );
        // Readable only: untouched, weights and spelling included.
        assert_eq!(narrowed(&["gzip;q=1.0, br;q=0.5"]), "gzip;q=1.0, br;q=0.5");
        assert_eq!(narrowed(&["GZIP", "identity"]), "GZIP | identity");
        assert_eq!(narrowed(&["zstd;q=1.0, gzip;q=0.5"]), "gzip;q=0.5");
        assert_eq!(narrowed(&["zstd"]), "identity");
        assert_eq!(narrowed(&["*"]), "gzip, deflate, br");
        assert_eq!(narrowed(&["br, *;q=0.1"]), "br, gzip;q=0.1, deflate;q=0.1");
        // `*;q=0` only excludes: kept, and identity stays excluded as the client asked...
        assert_eq!(narrowed(&["x-gzip, *;q=0"]), "x-gzip, *;q=0");
        // ...unless nothing the client offered is left: identity, not a refusal of everything.
        assert_eq!(narrowed(&["zstd, *;q=0"]), "identity");
        assert_eq!(narrowed(&["zstd, identity;q=0"]), "identity");
        assert_eq!(narrowed(&["zstd, gzip;q=0.0"]), "identity");
    }

    #[test]
    fn every_hop_by_hop_name_passes_the_length_filter() {
        for h in &HOP_BY_HOP {
            assert!(hop_by_hop_length(h.as_str().len()), "{h}");
        }
    }

    #[test]
    fn request_ids() {
        let mut h = HeaderMap::new();
        assert_eq!(request_id(&h).len(), 32);
        h.insert(REQUEST_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(request_id(&h), "abc-123");
        h.insert(
            REQUEST_ID,
            HeaderValue::from_static("bad value with spaces"),
        );
        assert_ne!(request_id(&h), "bad value with spaces");
    }

    #[test]
    fn fresh_request_ids_are_distinct_across_blocks() {
        let h = HeaderMap::new();
        let ids: std::collections::HashSet<_> =
            (0..IDS_PER_BLOCK * 3 + 5).map(|_| request_id(&h)).collect();
        assert_eq!(ids.len(), IDS_PER_BLOCK * 3 + 5);
        for id in &ids {
            assert_eq!(id.len(), ID_LEN);
            assert!(id.as_bytes().iter().all(u8::is_ascii_hexdigit));
        }
    }
}
