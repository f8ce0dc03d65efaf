//! Response link rewriting: upstream URLs in JSON bodies and in Location/Content-Location/Link headers become URLs of the proxy.
//!
//! A client that follows an absolute upstream link bypasses the proxy and loses the injected
//! credentials, so every link that points back at the upstream is turned into the same link on the
//! proxy. Everything else in a body is left byte-identical: signed URLs of other hosts must not be
//! touched, and clients may compare or cache the documents. Root-relative links (`next`,
//! `previous`, `href` values and header targets) change only where the proxy's path prefix
//! differs from the upstream's base path, and values under a `body` key never change: the client
//! sends them back to the API.

use std::io::{Read, Write};

use flate2::Compression;

/// Deepest container nesting accepted in a JSON body. It matches `serde_json`'s own recursion limit,
/// so that a rewritten body is never one that a `serde_json` client refuses while the original was
/// accepted.
const MAX_DEPTH: usize = 127;

/// Matches absolute URLs of one upstream and maps them onto the proxy.
#[derive(Debug, Clone)]
pub struct Rewriter {
    /// Lowercase scheme, e.g. `https`.
    scheme: String,
    /// Host as `url` serializes it: lowercase domain, dotted IPv4 or bracketed IPv6.
    host: String,
    /// Effective port; `None` only for schemes without a known default and no explicit port.
    port: Option<u16>,
    /// Base path without a trailing slash; empty when the upstream is served at its root.
    base_path: String,
}

/// Why a body could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum RewriteError {
    /// The decoded body would exceed the caller's limit.
    #[error("decoded body exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The limit that was exceeded.
        limit: usize,
    },
    /// The body is not a valid stream in its declared encoding.
    #[error("cannot decode {encoding:?} body: {source}")]
    Decode {
        /// The declared encoding.
        encoding: Encoding,
        /// The decoder's complaint.
        #[source]
        source: std::io::Error,
    },
}

/// Supported Content-Encoding of a body the rewriter can decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// No content coding.
    Identity,
    /// `gzip` (and its historical alias `x-gzip`).
    Gzip,
    /// `deflate`: zlib-wrapped per RFC 9110, raw deflate tolerated.
    Deflate,
    /// `br`.
    Brotli,
}

impl Encoding {
    /// Maps a Content-Encoding header value to an encoding; a missing header is identity.
    ///
    /// Returns `None` for codings that cannot be decoded here (e.g. `zstd`) and for stacked codings
    /// (`gzip, br`): such bodies must pass through untouched.
    pub fn from_header(v: Option<&str>) -> Option<Encoding> {
        let Some(v) = v else {
            return Some(Encoding::Identity);
        };
        let v = v.trim();
        if v.is_empty() || v.eq_ignore_ascii_case("identity") {
            Some(Encoding::Identity)
        } else if v.eq_ignore_ascii_case("gzip") || v.eq_ignore_ascii_case("x-gzip") {
            Some(Encoding::Gzip)
        } else if v.eq_ignore_ascii_case("deflate") {
            Some(Encoding::Deflate)
        } else if v.eq_ignore_ascii_case("br") {
            Some(Encoding::Brotli)
        } else {
            None
        }
    }
}

/// Decodes a body, refusing to produce more than `limit` bytes (zip-bomb guard): Err if over.
pub fn decode(enc: Encoding, body: &[u8], limit: usize) -> Result<Vec<u8>, RewriteError> {
    if body.is_empty() {
        // HEAD answers and 204/304 carry a Content-Encoding but no stream at all.
        return Ok(Vec::new());
    }
    match enc {
        Encoding::Identity => {
            if body.len() > limit {
                Err(RewriteError::TooLarge { limit })
            } else {
                Ok(body.to_vec())
            }
        }
        Encoding::Gzip => read_limited(flate2::read::MultiGzDecoder::new(body), enc, limit),
        Encoding::Deflate => {
            // RFC 9110 says zlib, but some servers send raw deflate. The zlib header carries a
            // checksum, which tells the two apart; the rare raw stream that happens to start like
            // a valid header gets a second chance.
            let raw = || read_limited(flate2::read::DeflateDecoder::new(body), enc, limit);
            if !has_zlib_header(body) {
                return raw();
            }
            match read_limited(flate2::read::ZlibDecoder::new(body), enc, limit) {
                Err(zlib_err @ RewriteError::Decode { .. }) => raw().map_err(|_| zlib_err),
                other => other,
            }
        }
        Encoding::Brotli => read_limited(brotli::Decompressor::new(body, 8192), enc, limit),
    }
}

fn has_zlib_header(body: &[u8]) -> bool {
    match body {
        [cmf, flg, ..] => {
            cmf & 0x0f == 8 && cmf >> 4 <= 7 && (u16::from(*cmf) << 8 | u16::from(*flg)) % 31 == 0
        }
        _ => false,
    }
}

fn read_limited(reader: impl Read, enc: Encoding, limit: usize) -> Result<Vec<u8>, RewriteError> {
    let mut out = Vec::new();
    // One byte past the limit is enough to know it is exceeded without inflating the rest.
    let cap = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    reader
        .take(cap)
        .read_to_end(&mut out)
        .map_err(|source| RewriteError::Decode {
            encoding: enc,
            source,
        })?;
    if out.len() > limit {
        return Err(RewriteError::TooLarge { limit });
    }
    Ok(out)
}

/// Re-encodes a body with the same encoding (fast compression level).
pub fn encode(enc: Encoding, body: &[u8]) -> Vec<u8> {
    // Writing into a Vec cannot fail, so the io::Results below are infallible.
    match enc {
        Encoding::Identity => body.to_vec(),
        Encoding::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), Compression::fast());
            e.write_all(body).expect("writing to a Vec");
            e.finish().expect("writing to a Vec")
        }
        Encoding::Deflate => {
            let mut e = flate2::write::ZlibEncoder::new(Vec::new(), Compression::fast());
            e.write_all(body).expect("writing to a Vec");
            e.finish().expect("writing to a Vec")
        }
        Encoding::Brotli => {
            let mut out = Vec::new();
            {
                let mut w = brotli::CompressorWriter::new(&mut out, 8192, 1, 22);
                w.write_all(body).expect("writing to a Vec");
            }
            out
        }
    }
}

/// True for application/json, application/geo+json, any application/*+json (parameters like charset ignored, case-insensitive).
pub fn is_json_content_type(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or("").trim();
    let Some((ty, subtype)) = essence.split_once('/') else {
        return false;
    };
    if !ty.eq_ignore_ascii_case("application") {
        return false;
    }
    if subtype.eq_ignore_ascii_case("json") {
        return true;
    }
    let n = subtype.len();
    n > 5 && subtype.is_char_boundary(n - 5) && subtype[n - 5..].eq_ignore_ascii_case("+json")
}

impl Rewriter {
    /// `upstream` is the configured upstream URL, e.g. https://api.satellogic.com or http://127.0.0.1:4000/base
    pub fn new(upstream: &url::Url) -> Self {
        let scheme = upstream.scheme().to_ascii_lowercase();
        let host = upstream.host_str().unwrap_or("").to_ascii_lowercase();
        let port = upstream.port().or_else(|| default_port(&scheme));
        let base_path = upstream.path().trim_end_matches('/').to_owned();
        Rewriter {
            scheme,
            host,
            port,
            base_path,
        }
    }

    /// Rewrites one URL string if its origin is exactly the upstream's (scheme, host, port; default ports equal to explicit ones; host case-insensitive) and its path is under the upstream base path (segment boundary). `public_base` is the proxy's base such as "http://127.0.0.1:8080" (no trailing slash; may carry a path prefix). The result is public_base + the path relative to the upstream base path + query + fragment, byte for byte as in the input (no re-encoding of the path or query). Returns None when the string is not such a URL.
    pub fn rewrite_url(&self, s: &str, public_base: &str) -> Option<String> {
        let at = self.suffix_start(s)?;
        let base = trim_base(public_base);
        let mut out = String::with_capacity(base.len() + s.len() - at);
        out.push_str(base);
        out.push_str(&s[at..]);
        Some(out)
    }

    /// The path a root-relative upstream link (`/v2/orders?offset=25`) takes through the proxy at
    /// `public_base`, when that differs from the link: the upstream's base path taken off, the
    /// proxy's path prefix (`public_url = "https://gis.example.org/aleph"`) put on. `None` when
    /// `s` is not a plain root-relative link (`//host`, dot segments, backslashes), lies outside
    /// the upstream's base path, or reads the same through the proxy (no prefix on either side:
    /// the common case).
    pub fn rewrite_root_relative(&self, s: &str, public_base: &str) -> Option<String> {
        let prefix = path_of(trim_base(public_base));
        if prefix == self.base_path {
            return None;
        }
        let b = s.as_bytes();
        if b.first() != Some(&b'/') || matches!(b.get(1), Some(b'/' | b'\\')) {
            return None;
        }
        let path = &s[..checked_path_len(b)?];
        let rest = if self.base_path.is_empty() {
            s
        } else {
            let tail = path.strip_prefix(self.base_path.as_str())?;
            if !(tail.is_empty() || tail.starts_with('/')) {
                return None;
            }
            &s[self.base_path.len()..]
        };
        let mut out = String::with_capacity(prefix.len() + rest.len() + 1);
        out.push_str(prefix);
        if !rest.starts_with('/') {
            out.push('/');
        }
        out.push_str(rest);
        Some(out)
    }

    /// Where the part of `s` relative to the upstream base path starts, if `s` is an upstream URL.
    ///
    /// Only unambiguous URLs qualify: anything a lenient parser could read differently from a strict
    /// one (userinfo, backslashes, whitespace, dot segments, odd host characters) is left alone,
    /// because leaving a link untouched is always safe while a wrong rewrite is not.
    fn suffix_start(&self, s: &str) -> Option<usize> {
        let b = s.as_bytes();
        let sl = self.scheme.len();
        if b.len() < sl + 3
            || !b[..sl].eq_ignore_ascii_case(self.scheme.as_bytes())
            || &b[sl..sl + 3] != b"://"
        {
            return None;
        }
        let auth_start = sl + 3;
        // Most URLs in a body belong to other hosts (presigned storage links, schemas): turn them
        // away on the host's bytes before any full parse.
        let host_end = auth_start + self.host.len();
        if !b
            .get(auth_start..host_end)?
            .eq_ignore_ascii_case(self.host.as_bytes())
            || !matches!(b.get(host_end), None | Some(b':' | b'/' | b'?' | b'#'))
        {
            return None;
        }
        let auth_end = b[auth_start..]
            .iter()
            .position(|&c| matches!(c, b'/' | b'?' | b'#'))
            .map_or(b.len(), |p| auth_start + p);
        let (host, port) = split_authority(&s[auth_start..auth_end])?;
        if !host.eq_ignore_ascii_case(&self.host) {
            return None;
        }
        let port = match port {
            // An empty port is the default one, as in the WHATWG URL standard.
            None | Some("") => default_port(&self.scheme),
            Some(p) => Some(parse_port(p)?),
        };
        if port != self.port {
            return None;
        }
        let path = &s[auth_end..auth_end + checked_path_len(&b[auth_end..])?];
        if self.base_path.is_empty() {
            return Some(auth_end);
        }
        let under = path
            .strip_prefix(self.base_path.as_str())
            .is_some_and(|tail| tail.is_empty() || tail.starts_with('/'));
        under.then_some(auth_end + self.base_path.len())
    }

    /// Rewrites a JSON document. Returns Some((new_body, count_rewritten)) when at least one string was rewritten, None when nothing changed OR when the body is not valid JSON (malformed input passes through unchanged). Everything but the rewritten string values stays byte-identical: key order, whitespace, number formatting, escapes elsewhere. Object KEYS are never rewritten, only string values (including strings inside arrays). Strings containing JSON escapes (e.g. "https:\/\/api.satellogic.com\/x") must be handled correctly (unescape to decide and rewrite; write the new value JSON-escaped).
    pub fn rewrite_json(&self, body: &[u8], public_base: &str) -> Option<(Vec<u8>, usize)> {
        // Checking UTF-8 once up front is far cheaper than per string, and lets strings be sliced
        // as &str without copying.
        let text = std::str::from_utf8(body).ok()?;
        let mut scan = Scan {
            rw: self,
            text,
            b: body,
            // A UTF-8 byte-order mark (RFC 8259 8.1 lets a parser ignore it) is kept as it is.
            i: if body.starts_with(b"\xEF\xBB\xBF") {
                3
            } else {
                0
            },
            public_base: trim_base(public_base),
            out: Vec::new(),
            copied: 0,
            count: 0,
            scratch: String::new(),
            body_key: false,
            untouched_below: None,
            link_key: false,
        };
        scan.document().ok()?;
        if scan.count == 0 {
            return None;
        }
        let Scan {
            mut out,
            copied,
            count,
            ..
        } = scan;
        out.extend_from_slice(&body[copied..]);
        Some((out, count))
    }

    /// Rewrites the URI references inside an RFC 8288 Link header value (`<https://api.../x>; rel="next", <...>; rel="prev"`). None if unchanged.
    pub fn rewrite_link_header(&self, value: &str, public_base: &str) -> Option<String> {
        let b = value.as_bytes();
        let mut out = String::new();
        let mut copied = 0;
        let mut changed = false;
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                // A quoted parameter value may itself contain '<' (e.g. title="a <b>").
                b'"' => {
                    i += 1;
                    while i < b.len() && b[i] != b'"' {
                        i += if b[i] == b'\\' { 2 } else { 1 };
                    }
                    i += 1;
                }
                b'<' => {
                    let start = i + 1;
                    let Some(len) = value[start..].find('>') else {
                        break;
                    };
                    let target = &value[start..start + len];
                    if let Some(at) = self.suffix_start(target) {
                        out.push_str(&value[copied..start]);
                        out.push_str(trim_base(public_base));
                        out.push_str(&target[at..]);
                        copied = start + len;
                        changed = true;
                    } else if let Some(new) = self.rewrite_root_relative(target, public_base) {
                        out.push_str(&value[copied..start]);
                        out.push_str(&new);
                        copied = start + len;
                        changed = true;
                    }
                    i = start + len + 1;
                }
                _ => i += 1,
            }
        }
        if !changed {
            return None;
        }
        out.push_str(&value[copied..]);
        Some(out)
    }
}

fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" | "ws" => Some(80),
        "https" | "wss" => Some(443),
        "ftp" => Some(21),
        _ => None,
    }
}

/// The path of a base URL without a trailing slash (`/aleph` of `https://host/aleph`), empty
/// for a URL at its host's root.
fn path_of(base: &str) -> &str {
    let after_scheme = base.find("://").map_or(0, |i| i + 3);
    base[after_scheme..]
        .find('/')
        .map_or("", |i| &base[after_scheme + i..])
}

/// The proxy base is documented without a trailing slash; tolerate one rather than emit `//`.
fn trim_base(public_base: &str) -> &str {
    public_base.strip_suffix('/').unwrap_or(public_base)
}

/// Splits `host[:port]`, rejecting anything that is not a plain host: userinfo (`@`), percent
/// escapes, backslashes and other characters lenient parsers interpret.
fn split_authority(auth: &str) -> Option<(&str, Option<&str>)> {
    let (host, port) = if auth.starts_with('[') {
        let close = auth.find(']')?;
        let host = &auth[..=close];
        if !host[1..close]
            .bytes()
            .all(|c| c.is_ascii_hexdigit() || c == b':' || c == b'.')
        {
            return None;
        }
        let rest = &auth[close + 1..];
        let port = match rest.strip_prefix(':') {
            Some(p) => Some(p),
            None if rest.is_empty() => None,
            None => return None,
        };
        (host, port)
    } else {
        let (host, port) = match auth.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (auth, None),
        };
        if !host
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'.' || c == b'-')
        {
            return None;
        }
        (host, port)
    };
    if host.is_empty() {
        return None;
    }
    Some((host, port))
}

fn parse_port(p: &str) -> Option<u16> {
    if !p.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    // Leading zeros are legal (`:0443`); strip them so the length check below bounds the value.
    let digits = p.trim_start_matches('0');
    if digits.is_empty() {
        return Some(0);
    }
    if digits.len() > 5 {
        return None;
    }
    digits.parse().ok()
}

/// Length of the path at the start of `rest` (everything after the authority), or `None` if the
/// string is not an unambiguous URL.
///
/// WHATWG parsers drop tabs and newlines inside URLs and trim spaces, so strings holding them could
/// name another origin than the one seen here; real links never contain them. In the path, clients
/// resolve dot segments and WHATWG parsers read `\` as `/`: either could climb out of the upstream
/// base path or the proxy's own path prefix.
fn checked_path_len(rest: &[u8]) -> Option<usize> {
    // A branch-free fold, which the compiler vectorizes: long signed queries are common.
    if rest
        .iter()
        .fold(false, |bad, &c| bad | (c <= b' ') | (c == 0x7f))
    {
        return None;
    }
    let mut path_len = rest.len();
    let mut dots = false;
    for (j, &c) in rest.iter().enumerate() {
        match c {
            b'?' | b'#' => {
                path_len = j;
                break;
            }
            b'\\' => return None,
            b'.' | b'%' => dots = true,
            _ => {}
        }
    }
    // Only a path holding `.` or `%` can have a dot segment: most skip the split.
    if dots && rest[..path_len].split(|&c| c == b'/').any(is_dot_segment) {
        return None;
    }
    Some(path_len)
}

/// `.` or `..`, plain or percent-encoded.
fn is_dot_segment(seg: &[u8]) -> bool {
    let dot = |s: &[u8]| s == b"." || s.eq_ignore_ascii_case(b"%2e");
    match seg.len() {
        1 | 3 => dot(seg),
        2 => seg == b"..",
        4 => (dot(&seg[..1]) && dot(&seg[1..])) || (dot(&seg[..3]) && dot(&seg[3..])),
        6 => dot(&seg[..3]) && dot(&seg[3..]),
        _ => false,
    }
}

/// The body is not valid JSON; details do not matter since such bodies pass through unchanged.
struct Invalid;

/// One pass over a JSON text that validates it and splices rewritten string values into `out`.
struct Scan<'a> {
    rw: &'a Rewriter,
    text: &'a str,
    b: &'a [u8],
    i: usize,
    public_base: &'a str,
    /// Output built lazily: stays empty until the first rewrite, so untouched bodies cost no copy.
    out: Vec<u8>,
    /// Input before this offset is already in `out`.
    copied: usize,
    count: usize,
    /// Reused buffer for unescaping candidate strings that contain escapes.
    scratch: String,
    /// The key just read is `body`: the value that follows is not rewritten. A POST `next` link
    /// carries the body the client must send back, and the API expects it as it issued it.
    body_key: bool,
    /// Inside a `body` value that is an object or array: the container depth where it started.
    untouched_below: Option<usize>,
    /// The key just read names a link (`next`, `previous`, `href`): a root-relative value is a
    /// path on the upstream, which a proxy path prefix must be put in front of.
    link_key: bool,
}

impl Scan<'_> {
    fn peek(&self) -> Result<u8, Invalid> {
        self.b.get(self.i).copied().ok_or(Invalid)
    }

    fn skip_ws(&mut self) {
        loop {
            match self.b.get(self.i) {
                // Pretty-printed bodies are mostly indentation: take it eight spaces at a time.
                Some(b' ') if self.b.get(self.i..self.i + 8) == Some(b"        ") => self.i += 8,
                Some(b' ' | b'\t' | b'\n' | b'\r') => self.i += 1,
                _ => return,
            }
        }
    }

    fn expect(&mut self, c: u8) -> Result<(), Invalid> {
        self.skip_ws();
        if self.peek()? != c {
            return Err(Invalid);
        }
        self.i += 1;
        Ok(())
    }

    /// Reads an object key and its colon, leaving the cursor before the value.
    fn key(&mut self) -> Result<(), Invalid> {
        self.skip_ws();
        if self.peek()? != b'"' {
            return Err(Invalid);
        }
        let start = self.i + 1;
        self.string(false)?;
        let key = &self.b[start..self.i - 1];
        self.body_key = key == b"body";
        self.link_key = matches!(key, b"next" | b"previous" | b"href");
        self.expect(b':')
    }

    fn document(&mut self) -> Result<(), Invalid> {
        // true = object, false = array. An explicit stack keeps hostile nesting off the call stack.
        let mut stack: Vec<bool> = Vec::new();
        loop {
            // A value starts here.
            self.skip_ws();
            let untouched = std::mem::take(&mut self.body_key) || self.untouched_below.is_some();
            let link = std::mem::take(&mut self.link_key);
            match self.peek()? {
                b'{' | b'[' => {
                    let is_obj = self.b[self.i] == b'{';
                    self.i += 1;
                    if stack.len() == MAX_DEPTH {
                        return Err(Invalid);
                    }
                    if untouched && self.untouched_below.is_none() {
                        self.untouched_below = Some(stack.len());
                    }
                    stack.push(is_obj);
                    self.skip_ws();
                    let close = if is_obj { b'}' } else { b']' };
                    if self.peek()? == close {
                        self.i += 1;
                        stack.pop();
                        self.left_container(stack.len());
                    } else {
                        if is_obj {
                            self.key()?;
                        }
                        continue;
                    }
                }
                b'"' if link && !untouched && self.b.get(self.i + 1) == Some(&b'/') => {
                    self.relative_link()?
                }
                b'"' => self.string(!untouched)?,
                b'-' | b'0'..=b'9' => self.number()?,
                b't' => self.literal(b"true")?,
                b'f' => self.literal(b"false")?,
                b'n' => self.literal(b"null")?,
                _ => return Err(Invalid),
            }
            // A value ended: close containers until one continues with another element.
            loop {
                self.skip_ws();
                let Some(&is_obj) = stack.last() else {
                    return if self.i == self.b.len() {
                        Ok(())
                    } else {
                        Err(Invalid)
                    };
                };
                let c = self.peek()?;
                self.i += 1;
                match (c, is_obj) {
                    (b',', true) => {
                        self.key()?;
                        break;
                    }
                    (b',', false) => break,
                    (b'}', true) | (b']', false) => {
                        stack.pop();
                        self.left_container(stack.len());
                    }
                    _ => return Err(Invalid),
                }
            }
        }
    }

    /// A container closed, leaving `depth` open ones: the end of an untouched `body` value?
    fn left_container(&mut self, depth: usize) {
        if self.untouched_below == Some(depth) {
            self.untouched_below = None;
        }
    }

    fn literal(&mut self, word: &[u8]) -> Result<(), Invalid> {
        if self.b[self.i..].starts_with(word) {
            self.i += word.len();
            Ok(())
        } else {
            Err(Invalid)
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.i;
        while self.b.get(self.i).is_some_and(u8::is_ascii_digit) {
            self.i += 1;
        }
        self.i - start
    }

    fn number(&mut self) -> Result<(), Invalid> {
        if self.b[self.i] == b'-' {
            self.i += 1;
        }
        match self.peek()? {
            b'0' => self.i += 1,
            b'1'..=b'9' => {
                self.digits();
            }
            _ => return Err(Invalid),
        }
        if self.b.get(self.i) == Some(&b'.') {
            self.i += 1;
            if self.digits() == 0 {
                return Err(Invalid);
            }
        }
        if let Some(b'e' | b'E') = self.b.get(self.i) {
            self.i += 1;
            if let Some(b'+' | b'-') = self.b.get(self.i) {
                self.i += 1;
            }
            if self.digits() == 0 {
                return Err(Invalid);
            }
        }
        Ok(())
    }

    /// A link value starting with `/` at the cursor: put the proxy's path prefix in front when
    /// it needs one. Only plain strings (no escapes) are considered: leaving a link is safe.
    fn relative_link(&mut self) -> Result<(), Invalid> {
        let start = self.i + 1;
        self.string(false)?;
        let end = self.i - 1;
        let raw = &self.text[start..end];
        if raw.contains('\\') {
            return Ok(());
        }
        let Some(new) = self.rw.rewrite_root_relative(raw, self.public_base) else {
            return Ok(());
        };
        self.splice(start, end, &new, false, end);
        Ok(())
    }

    /// Replaces the content of the string at `start..end`: `prefix`, JSON-escaped, then the
    /// input's own bytes from `kept_from` to `end`.
    fn splice(
        &mut self,
        start: usize,
        end: usize,
        prefix: &str,
        escape_slash: bool,
        kept_from: usize,
    ) {
        if self.out.is_empty() {
            // Rewritten URLs are rarely much longer than the originals: one allocation suffices.
            self.out.reserve(self.b.len() + self.b.len() / 16);
        }
        self.out.extend_from_slice(&self.b[self.copied..start]);
        write_escaped(&mut self.out, prefix, escape_slash);
        self.out.extend_from_slice(&self.b[kept_from..end]);
        self.copied = end;
        self.count += 1;
    }

    /// Scans a string whose opening quote is at the cursor; if it is a value (`rewrite`) and an
    /// upstream URL, splices its replacement into the output.
    fn string(&mut self, rewrite: bool) -> Result<(), Invalid> {
        let start = self.i + 1;
        let mut i = start;
        let mut escaped = false;
        let b = self.b;
        loop {
            i = find_special(b, i);
            match b.get(i) {
                Some(b'"') => break,
                Some(b'\\') => {
                    escaped = true;
                    i = check_escape(b, i)?;
                }
                _ => return Err(Invalid),
            }
        }
        let end = i;
        self.i = end + 1;
        // Cheap prefilter: only strings that can start with the scheme are worth a closer look.
        if !rewrite || !matches!(b[start], b'h' | b'H' | b'\\') {
            return Ok(());
        }
        let raw = &self.text[start..end];
        let at = if escaped {
            self.scratch.clear();
            unescape_into(raw, &mut self.scratch);
            let Some(at) = self.rw.suffix_start(&self.scratch) else {
                return Ok(());
            };
            raw_offset(raw, at)
        } else {
            let Some(at) = self.rw.suffix_start(raw) else {
                return Ok(());
            };
            at
        };
        // The suffix is copied in its original escaped form; the new prefix follows the document's
        // style for slashes so that `\/`-escaping emitters stay consistent.
        let escape_slash = escaped && raw.as_bytes()[..at].windows(2).any(|w| w == b"\\/");
        let base = self.public_base;
        self.splice(start, end, base, escape_slash, start + at);
        Ok(())
    }
}

/// Offset of the first byte at or after `i` that ends a plain run of string content: a quote, a
/// backslash or a control character (or the end of input).
fn find_special(b: &[u8], mut i: usize) -> usize {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    // Most of a body is string content, so it is scanned a word at a time. In each test below the
    // lowest flagged byte is exact (false positives only appear above a true hit), which is all
    // that trailing_zeros needs.
    while let Some(chunk) = b.get(i..i + 8) {
        let v = u64::from_le_bytes(chunk.try_into().unwrap_or([0; 8]));
        let quote = v ^ (LO * u64::from(b'"'));
        let backslash = v ^ (LO * u64::from(b'\\'));
        let hits = (quote.wrapping_sub(LO) & !quote)
            | (backslash.wrapping_sub(LO) & !backslash)
            | (v.wrapping_sub(LO * 0x20) & !v);
        let hits = hits & HI;
        if hits != 0 {
            return i + (hits.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while let Some(&c) = b.get(i) {
        if c == b'"' || c == b'\\' || c < 0x20 {
            break;
        }
        i += 1;
    }
    i
}

/// Validates the escape at `b[i]` (a backslash) and returns the offset after it. Lone surrogates
/// are refused, as `serde_json` does when it builds values.
fn check_escape(b: &[u8], i: usize) -> Result<usize, Invalid> {
    match b.get(i + 1) {
        Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => Ok(i + 2),
        Some(b'u') => {
            let cp = hex4(b, i + 2)?;
            match cp {
                0xD800..=0xDBFF => {
                    if b.get(i + 6) != Some(&b'\\') || b.get(i + 7) != Some(&b'u') {
                        return Err(Invalid);
                    }
                    match hex4(b, i + 8)? {
                        0xDC00..=0xDFFF => Ok(i + 12),
                        _ => Err(Invalid),
                    }
                }
                0xDC00..=0xDFFF => Err(Invalid),
                _ => Ok(i + 6),
            }
        }
        _ => Err(Invalid),
    }
}

fn hex4(b: &[u8], i: usize) -> Result<u32, Invalid> {
    let h = b.get(i..i + 4).ok_or(Invalid)?;
    h.iter().try_fold(0u32, |acc, &c| {
        let d = (c as char).to_digit(16).ok_or(Invalid)?;
        Ok(acc << 4 | d)
    })
}

/// Length of the escape starting at `raw[i]` (a backslash); `raw` was validated by the scan.
fn escape_len(raw: &[u8], i: usize) -> usize {
    match raw[i + 1] {
        b'u' if raw.get(i + 6) == Some(&b'\\')
            && matches!(hex4(raw, i + 2), Ok(0xD800..=0xDBFF)) =>
        {
            12
        }
        b'u' => 6,
        _ => 2,
    }
}

/// Decodes a validated JSON string body.
fn unescape_into(raw: &str, out: &mut String) {
    let b = raw.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let Some(p) = raw[i..].find('\\') else {
            out.push_str(&raw[i..]);
            return;
        };
        out.push_str(&raw[i..i + p]);
        i += p;
        let n = escape_len(b, i);
        let c = match b[i + 1] {
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let hi = hex4(b, i + 2).unwrap_or(0);
                let cp = if n == 12 {
                    let lo = hex4(b, i + 8).unwrap_or(0);
                    0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
                } else {
                    hi
                };
                char::from_u32(cp).unwrap_or('\u{FFFD}')
            }
            other => other as char,
        };
        out.push(c);
        i += n;
    }
}

/// Maps a byte offset in the unescaped string back to the raw (escaped) one. The offset always falls
/// between whole characters, and each escape decodes to exactly one character.
fn raw_offset(raw: &str, unescaped_at: usize) -> usize {
    let b = raw.as_bytes();
    let (mut i, mut u) = (0, 0);
    while u < unescaped_at {
        if b[i] == b'\\' {
            let n = escape_len(b, i);
            u += match n {
                12 => 4,
                6 => char::from_u32(hex4(b, i + 2).unwrap_or(0)).map_or(3, char::len_utf8),
                _ => 1,
            };
            i += n;
        } else {
            let ch_len = raw[i..].chars().next().map_or(1, char::len_utf8);
            u += ch_len;
            i += ch_len;
        }
    }
    i
}

fn write_escaped(out: &mut Vec<u8>, s: &str, escape_slash: bool) {
    let needs = |c: u8| c == b'"' || c == b'\\' || c < 0x20 || (escape_slash && c == b'/');
    // The public base is normally plain ASCII: copy it whole.
    if !s.bytes().any(needs) {
        out.extend_from_slice(s.as_bytes());
        return;
    }
    for c in s.bytes() {
        match c {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'/' if escape_slash => out.extend_from_slice(b"\\/"),
            0x00..=0x1f => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(c >> 4)]);
                out.push(HEX[usize::from(c & 0xf)]);
            }
            _ => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PUB: &str = "http://127.0.0.1:8080";

    fn rw(upstream: &str) -> Rewriter {
        Rewriter::new(&url::Url::parse(upstream).unwrap())
    }

    fn aleph() -> Rewriter {
        rw("https://api.satellogic.com")
    }

    fn json(r: &Rewriter, body: &str) -> Option<(String, usize)> {
        r.rewrite_json(body.as_bytes(), PUB)
            .map(|(b, n)| (String::from_utf8(b).unwrap(), n))
    }

    #[test]
    fn rewrites_stac_links() {
        let body = r#"{"type":"FeatureCollection","links":[
  {"rel":"self","href":"https://api.satellogic.com/archive/stac/search?collections=l1d"},
  {"rel":"root","href":"https://api.satellogic.com/archive/stac/"},
  {"rel":"parent","href":"https://api.satellogic.com/archive/stac/collections/l1d"},
  {"rel":"collection","href":"https://api.satellogic.com/archive/stac/collections/l1d"},
  {"rel":"next","href":"https://api.satellogic.com/archive/stac/search?token=next:abc"},
  {"rel":"search","href":"https://api.satellogic.com/archive/stac/search","method":"GET"}]}"#;
        let (out, n) = json(&aleph(), body).unwrap();
        assert_eq!(n, 6);
        assert_eq!(out, body.replace("https://api.satellogic.com", PUB));
    }

    #[test]
    fn rewrites_drf_next_and_previous() {
        let body = r#"{"count": 250, "next": "https://api.satellogic.com/tasking/tasks/?limit=100&offset=200", "previous": "https://api.satellogic.com/tasking/tasks/?limit=100&offset=0", "results": []}"#;
        let (out, n) = json(&aleph(), body).unwrap();
        assert_eq!(n, 2);
        assert_eq!(
            out,
            r#"{"count": 250, "next": "http://127.0.0.1:8080/tasking/tasks/?limit=100&offset=200", "previous": "http://127.0.0.1:8080/tasking/tasks/?limit=100&offset=0", "results": []}"#
        );
        let first_page = r#"{"count":250,"next":"https://api.satellogic.com/tasking/tasks/?limit=100&offset=100","previous":null}"#;
        let (out, n) = json(&aleph(), first_page).unwrap();
        assert_eq!(n, 1);
        assert!(out.ends_with(
            r#""next":"http://127.0.0.1:8080/tasking/tasks/?limit=100&offset=100","previous":null}"#
        ));
    }

    #[test]
    fn rewrites_asset_hrefs_keeping_their_query() {
        let href = "https://api.satellogic.com/assets/l1d/20240101_abc/visual?s=s3://bucket/key/visual.tif";
        let body = format!(
            r#"{{"assets":{{"visual":{{"href":"{href}","type":"image/tiff; application=geotiff"}}}}}}"#
        );
        let (out, n) = json(&aleph(), &body).unwrap();
        assert_eq!(n, 1);
        assert!(out.contains(r#""href":"http://127.0.0.1:8080/assets/l1d/20240101_abc/visual?s=s3://bucket/key/visual.tif""#));
    }

    #[test]
    fn leaves_other_hosts_such_as_presigned_s3_links() {
        let r = aleph();
        let presigned = "https://bucket.s3.amazonaws.com/x.png?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Signature=0f1e2d";
        assert_eq!(r.rewrite_url(presigned, PUB), None);
        let body =
            format!(r#"{{"thumbnail":{{"href":"{presigned}"}},"other":"https://example.com/"}}"#);
        assert_eq!(json(&r, &body), None);
    }

    #[test]
    fn leaves_same_host_on_another_scheme_or_port() {
        let r = aleph();
        for s in [
            "http://api.satellogic.com/x",
            "https://api.satellogic.com:8443/x",
            "https://api.satellogic.com:80/x",
            "ftp://api.satellogic.com/x",
            "wss://api.satellogic.com/x",
        ] {
            assert_eq!(r.rewrite_url(s, PUB), None, "{s}");
        }
    }

    #[test]
    fn default_port_equals_explicit_port() {
        let r = aleph();
        assert_eq!(
            r.rewrite_url("https://api.satellogic.com:443/x", PUB)
                .as_deref(),
            Some("http://127.0.0.1:8080/x")
        );
        assert_eq!(
            r.rewrite_url("https://api.satellogic.com:0443/x", PUB)
                .as_deref(),
            Some("http://127.0.0.1:8080/x")
        );
        let explicit = rw("https://api.satellogic.com:443/");
        assert_eq!(
            explicit
                .rewrite_url("https://api.satellogic.com/x", PUB)
                .as_deref(),
            Some("http://127.0.0.1:8080/x")
        );
        let local = rw("http://127.0.0.1:4000");
        assert_eq!(
            local.rewrite_url("http://127.0.0.1:4000/x", PUB).as_deref(),
            Some("http://127.0.0.1:8080/x")
        );
        assert_eq!(local.rewrite_url("http://127.0.0.1/x", PUB), None);
        assert_eq!(local.rewrite_url("http://127.0.0.1:40000/x", PUB), None);
        assert_eq!(
            local.rewrite_url("http://127.0.0.1:99999999999999999999/x", PUB),
            None
        );
    }

    #[test]
    fn host_and_scheme_match_case_insensitively() {
        let r = aleph();
        assert_eq!(
            r.rewrite_url("HTTPS://API.Satellogic.COM/Archive?Q=A", PUB)
                .as_deref(),
            Some("http://127.0.0.1:8080/Archive?Q=A")
        );
        let upper = rw("https://API.SATELLOGIC.COM");
        assert_eq!(
            upper
                .rewrite_url("https://api.satellogic.com/x", PUB)
                .as_deref(),
            Some("http://127.0.0.1:8080/x")
        );
        let v6 = rw("http://[::1]:4000");
        assert_eq!(
            v6.rewrite_url("http://[::1]:4000/x", PUB).as_deref(),
            Some("http://127.0.0.1:8080/x")
        );
        assert_eq!(v6.rewrite_url("http://[::2]:4000/x", PUB), None);
    }

    #[test]
    fn leaves_lookalike_hosts_and_userinfo_tricks() {
        let r = aleph();
        for s in [
            "https://api.satellogic.com.evil.com/",
            "https://api.satellogic.com.evil.com/x",
            "https://evil.com/?u=https://api.satellogic.com/x",
            "https://evil.com/https://api.satellogic.com/x",
            "https://api.satellogic.com@evil.com/",
            "https://user:pw@api.satellogic.com/x",
            "https://api.satellogic.com:443@evil.com/",
            "https://api.satellogic.com\\@evil.com/",
            "https://api.satellogic.com%2f@evil.com/",
            "https://api%2esatellogic.com/x",
            "https://api.satellogic.com./x",
            "https://xapi.satellogic.com/x",
            "https:/api.satellogic.com/x",
            "https:api.satellogic.com/x",
            "https://api.satellogic.com\t.evil.com/",
            " https://api.satellogic.com/x",
            "https://api.satellogic.com/x y",
        ] {
            assert_eq!(r.rewrite_url(s, PUB), None, "{s}");
        }
    }

    #[test]
    fn leaves_urls_inside_query_parameters() {
        let r = aleph();
        let body =
            r#"{"tiles":"https://tiles.example.com/cog?url=https://api.satellogic.com/assets/x"}"#;
        assert_eq!(json(&r, body), None);
        // When the outer URL is the upstream's, only its own origin changes; the inner one is data.
        let s = "https://api.satellogic.com/raster/cog/tiles/1/2/3?url=https://api.satellogic.com/assets/x";
        assert_eq!(
            r.rewrite_url(s, PUB).as_deref(),
            Some("http://127.0.0.1:8080/raster/cog/tiles/1/2/3?url=https://api.satellogic.com/assets/x")
        );
    }

    #[test]
    fn leaves_relative_links() {
        let r = aleph();
        let body = r#"{"count":60,"next":"/v2/orders?offset=25&limit=25","previous":null,"self":"//api.satellogic.com/v2/orders","x":"v2/orders"}"#;
        assert_eq!(json(&r, body), None);
        assert_eq!(r.rewrite_url("/v2/orders?offset=25&limit=25", PUB), None);
    }

    #[test]
    fn base_path_is_matched_on_segment_boundaries() {
        let r = rw("http://127.0.0.1:4000/base");
        let ok = |s: &str| r.rewrite_url(s, PUB);
        assert_eq!(
            ok("http://127.0.0.1:4000/base/x?q=1#f").as_deref(),
            Some("http://127.0.0.1:8080/x?q=1#f")
        );
        assert_eq!(
            ok("http://127.0.0.1:4000/base").as_deref(),
            Some("http://127.0.0.1:8080")
        );
        assert_eq!(
            ok("http://127.0.0.1:4000/base/").as_deref(),
            Some("http://127.0.0.1:8080/")
        );
        assert_eq!(
            ok("http://127.0.0.1:4000/base?q").as_deref(),
            Some("http://127.0.0.1:8080?q")
        );
        assert_eq!(ok("http://127.0.0.1:4000/basement/x"), None);
        assert_eq!(ok("http://127.0.0.1:4000/other/x"), None);
        assert_eq!(ok("http://127.0.0.1:4000/"), None);
        assert_eq!(ok("http://127.0.0.1:4000"), None);
        assert_eq!(ok("http://127.0.0.1:4000?base/"), None);
        // A trailing slash in the configured upstream names the same base path.
        let slash = rw("http://127.0.0.1:4000/base/");
        assert_eq!(
            slash
                .rewrite_url("http://127.0.0.1:4000/base/x", PUB)
                .as_deref(),
            Some("http://127.0.0.1:8080/x")
        );
    }

    #[test]
    fn leaves_dot_segments_and_backslash_paths() {
        let r = rw("http://127.0.0.1:4000/base");
        for s in [
            "http://127.0.0.1:4000/base/../secret",
            "http://127.0.0.1:4000/base/%2e%2E/secret",
            "http://127.0.0.1:4000/base/.%2e/secret",
            "http://127.0.0.1:4000/base/./x",
            "http://127.0.0.1:4000/base/x/..",
            "http://127.0.0.1:4000/base\\..\\secret",
            "http://127.0.0.1:4000/base/x\\y",
        ] {
            assert_eq!(r.rewrite_url(s, PUB), None, "{s}");
        }
        // Dots that are not whole segments are ordinary path text, and a query is not a path.
        assert!(r
            .rewrite_url("http://127.0.0.1:4000/base/a.b/..c/...", PUB)
            .is_some());
        assert!(r
            .rewrite_url("http://127.0.0.1:4000/base/x?p=../y", PUB)
            .is_some());
    }

    #[test]
    fn leaves_strings_that_only_start_like_the_upstream() {
        let r = aleph();
        for s in [
            "https://api.satellogic.comx",
            "https://api.satellogic.comx/y",
            "https://api.satellogic.co",
            "https://api.satellogic.com-evil.com/",
            "https://api.satellogic.com:x/",
            "https://",
            "https",
            "",
        ] {
            assert_eq!(r.rewrite_url(s, PUB), None, "{s:?}");
        }
        assert_eq!(
            json(
                &r,
                r#"["https://api.satellogic.comx","https://api.satellogic.com.","http"]"#
            ),
            None
        );
    }

    #[test]
    fn a_byte_order_mark_is_kept_and_the_document_still_rewritten() {
        let r = aleph();
        let body = b"\xEF\xBB\xBF{\"next\":\"https://api.satellogic.com/x\"}";
        let (out, n) = r.rewrite_json(body, PUB).expect("rewritten");
        assert_eq!(n, 1);
        assert_eq!(out, b"\xEF\xBB\xBF{\"next\":\"http://127.0.0.1:8080/x\"}");
    }

    #[test]
    fn upstream_root_rewrites_to_public_base() {
        let r = aleph();
        assert_eq!(
            r.rewrite_url("https://api.satellogic.com", PUB).as_deref(),
            Some(PUB)
        );
        assert_eq!(
            r.rewrite_url("https://api.satellogic.com/", PUB).as_deref(),
            Some("http://127.0.0.1:8080/")
        );
        let (out, n) = json(
            &r,
            r#"{"a":"https://api.satellogic.com","b":"https://api.satellogic.com/"}"#,
        )
        .unwrap();
        assert_eq!(n, 2);
        assert_eq!(
            out,
            r#"{"a":"http://127.0.0.1:8080","b":"http://127.0.0.1:8080/"}"#
        );
    }

    #[test]
    fn public_base_may_carry_a_path_prefix() {
        let r = aleph();
        let base = "https://proxy.example/aleph";
        assert_eq!(
            r.rewrite_url("https://api.satellogic.com/x?y", base)
                .as_deref(),
            Some("https://proxy.example/aleph/x?y")
        );
        assert_eq!(
            r.rewrite_url("https://api.satellogic.com", base).as_deref(),
            Some(base)
        );
        // A trailing slash on the base must not produce `//`.
        assert_eq!(
            r.rewrite_url("https://api.satellogic.com/x", "http://p/")
                .as_deref(),
            Some("http://p/x")
        );
    }

    #[test]
    fn keeps_path_and_query_bytes_as_they_are() {
        let r = aleph();
        let s =
            "https://api.satellogic.com/a%2Fb/%7Euser/caf\u{e9}?q=a%20b&r=%ZZ&s=\u{1F600}#frag%21";
        assert_eq!(
            r.rewrite_url(s, PUB).as_deref(),
            Some("http://127.0.0.1:8080/a%2Fb/%7Euser/caf\u{e9}?q=a%20b&r=%ZZ&s=\u{1F600}#frag%21")
        );
    }

    #[test]
    fn never_rewrites_object_keys() {
        let r = aleph();
        let body =
            r#"{"https://api.satellogic.com/k":"v","nested":{"https://api.satellogic.com/k2":1}}"#;
        assert_eq!(json(&r, body), None);
        let body = r#"{"https://api.satellogic.com/k":"https://api.satellogic.com/v"}"#;
        let (out, n) = json(&r, body).unwrap();
        assert_eq!(n, 1);
        assert_eq!(
            out,
            r#"{"https://api.satellogic.com/k":"http://127.0.0.1:8080/v"}"#
        );
    }

    #[test]
    fn keeps_everything_else_byte_identical() {
        let r = aleph();
        let body = "{ \"z\" : 1.50E+3 ,\n\t\"a\":[ -0, 1e-7, true,false , null,\"\\u00e9\\n\\/\" ],\r\n \"href\" :\"https://api.satellogic.com/x\" ,\"n\":12345678901234567890123}  \n";
        let (out, n) = json(&r, body).unwrap();
        assert_eq!(n, 1);
        assert_eq!(
            out,
            body.replace("https://api.satellogic.com/x", "http://127.0.0.1:8080/x")
        );
    }

    #[test]
    fn rewrites_strings_inside_arrays_and_at_top_level() {
        let r = aleph();
        let (out, n) = json(
            &r,
            r#"[["https://api.satellogic.com/a"],"https://api.satellogic.com/b",1]"#,
        )
        .unwrap();
        assert_eq!(n, 2);
        assert_eq!(
            out,
            r#"[["http://127.0.0.1:8080/a"],"http://127.0.0.1:8080/b",1]"#
        );
        let (out, n) = json(&r, r#" "https://api.satellogic.com/c" "#).unwrap();
        assert_eq!((out.as_str(), n), (r#" "http://127.0.0.1:8080/c" "#, 1));
    }

    #[test]
    fn post_next_link_rewrites_only_the_href() {
        let r = aleph();
        let body = r#"{"rel":"next","href":"https://api.satellogic.com/archive/stac/search","method":"POST","body":{"next":"abc","collections":["l1d"]}}"#;
        let (out, n) = json(&r, body).unwrap();
        assert_eq!(n, 1);
        assert_eq!(
            out,
            r#"{"rel":"next","href":"http://127.0.0.1:8080/archive/stac/search","method":"POST","body":{"next":"abc","collections":["l1d"]}}"#
        );
    }

    #[test]
    fn root_relative_links_get_the_proxy_path_prefix_when_the_paths_differ() {
        let r = aleph();
        let prefixed = "https://gis.example.org/aleph/";
        let rel = |r: &Rewriter, s: &str, base: &str| r.rewrite_root_relative(s, base);
        assert_eq!(
            rel(&r, "/v2/orders?offset=25&limit=25", prefixed).as_deref(),
            Some("/aleph/v2/orders?offset=25&limit=25")
        );
        // No prefix on either side: the link reads the same through the proxy.
        assert_eq!(rel(&r, "/v2/orders?offset=25", PUB), None);
        // Not plain root-relative paths: left alone.
        for s in [
            "//evil.example/x",
            "/\\evil.example",
            "/a/../../x",
            "v2/orders",
            "/a b",
            "",
        ] {
            assert_eq!(rel(&r, s, prefixed), None, "{s:?}");
        }
        // An upstream with a base path: links under it lose it, others are not the API's.
        let based = rw("http://127.0.0.1:4000/base");
        assert_eq!(rel(&based, "/base/x?y", PUB).as_deref(), Some("/x?y"));
        assert_eq!(rel(&based, "/base", PUB).as_deref(), Some("/"));
        assert_eq!(
            rel(&based, "/base?q", prefixed).as_deref(),
            Some("/aleph/?q")
        );
        assert_eq!(rel(&based, "/basement/x", PUB), None);
        assert_eq!(rel(&based, "/other", PUB), None);

        // In JSON: the values of link keys only, and not inside a `body`.
        let body = r#"{"next":"/v2/orders?offset=25&limit=25","previous":null,"path":"/v2/x","links":[{"href":"/a","body":{"next":"/b"}}],"results":["/c"]}"#;
        let (out, n) = r
            .rewrite_json(body.as_bytes(), prefixed)
            .map(|(b, n)| (String::from_utf8(b).unwrap(), n))
            .unwrap();
        assert_eq!(n, 2);
        assert_eq!(
            out,
            r#"{"next":"/aleph/v2/orders?offset=25&limit=25","previous":null,"path":"/v2/x","links":[{"href":"/aleph/a","body":{"next":"/b"}}],"results":["/c"]}"#
        );
        assert!(json(&r, body).is_none(), "no prefix: nothing to change");
        // In a Link header.
        assert_eq!(
            r.rewrite_link_header(r#"</v2/orders?offset=25>; rel="next""#, prefixed)
                .as_deref(),
            Some(r#"</aleph/v2/orders?offset=25>; rel="next""#)
        );
    }

    #[test]
    fn values_under_a_body_key_go_back_as_the_api_issued_them() {
        let r = aleph();
        let up = "https://api.satellogic.com/archive/stac/collections/l1d/items/A";
        let body = format!(
            r#"{{"links":[{{"rel":"next","body":{{"filter":{{"args":["{up}",{{"x":["{up}"]}}]}},"e":{{}},"a":[]}},"href":"{up}"}},{{"body":"{up}","href":"{up}"}},{{"body":[],"href":"{up}"}}],"self":"{up}"}}"#
        );
        let (out, n) = json(&r, &body).unwrap();
        let new = "http://127.0.0.1:8080/archive/stac/collections/l1d/items/A";
        assert_eq!(n, 4, "{out}");
        assert_eq!(
            out,
            format!(
                r#"{{"links":[{{"rel":"next","body":{{"filter":{{"args":["{up}",{{"x":["{up}"]}}]}},"e":{{}},"a":[]}},"href":"{new}"}},{{"body":"{up}","href":"{new}"}},{{"body":[],"href":"{new}"}}],"self":"{new}"}}"#
            )
        );
    }

    #[test]
    fn unescapes_strings_to_decide_and_keeps_their_escapes() {
        let r = aleph();
        // `\/`-escaping emitters (PHP, some Python setups) get their style kept.
        let (out, n) = json(
            &r,
            r#"{"href":"https:\/\/api.satellogic.com\/archive\/stac?q=\"x\"\u00e9"}"#,
        )
        .unwrap();
        assert_eq!(n, 1);
        assert_eq!(
            out,
            r#"{"href":"http:\/\/127.0.0.1:8080\/archive\/stac?q=\"x\"\u00e9"}"#
        );
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&out).unwrap()["href"],
            "http://127.0.0.1:8080/archive/stac?q=\"x\"\u{e9}"
        );
        let (out, _) = json(&r, r#"["\u0068ttps://api.satellogic.com/a\ud83d\ude00b", "https://api.satellogic\u002ecom/c"]"#).unwrap();
        assert_eq!(
            out,
            r#"["http://127.0.0.1:8080/a\ud83d\ude00b", "http://127.0.0.1:8080/c"]"#
        );
        // An escape that decodes to a character a URL cannot hold still disqualifies the string.
        assert_eq!(
            json(
                &r,
                r#"["https://api.satellogic.com/a\nb", "https://api.satellogic.com\\@evil.com/"]"#
            ),
            None
        );
        // A public base that needs escaping is escaped.
        let (out, _) = r
            .rewrite_json(br#"["https://api.satellogic.com/x"]"#, "http://h/\"q\\")
            .unwrap();
        assert_eq!(
            serde_json::from_slice::<Vec<String>>(&out).unwrap(),
            ["http://h/\"q\\/x"]
        );
    }

    #[test]
    fn invalid_or_truncated_json_returns_none() {
        let r = aleph();
        let url = "\"https://api.satellogic.com/x\"";
        let cases: Vec<Vec<u8>> = vec![
            Vec::new(),
            b"   ".to_vec(),
            format!("[{url}").into_bytes(),
            format!("{{\"a\":{url}").into_bytes(),
            format!("{{\"a\":{url},}}").into_bytes(),
            format!("[{url},]").into_bytes(),
            format!("[{url}] x").into_bytes(),
            format!("[{url}][]").into_bytes(),
            format!("{{{url}}}").into_bytes(),
            format!("{{\"a\" {url}}}").into_bytes(),
            format!("[{url}, 01]").into_bytes(),
            format!("[{url}, 1.]").into_bytes(),
            format!("[{url}, .5]").into_bytes(),
            format!("[{url}, 1e]").into_bytes(),
            format!("[{url}, +1]").into_bytes(),
            format!("[{url}, tru]").into_bytes(),
            format!("[{url}, NaN]").into_bytes(),
            format!("[{url}, 'x']").into_bytes(),
            format!("[{url}, \"\\x\"]").into_bytes(),
            format!("[{url}, \"\\u12\"]").into_bytes(),
            format!("[{url}, \"\\ud800\"]").into_bytes(),
            format!("[{url}, \"\\udc00\\ud800\"]").into_bytes(),
            format!("[{url}, \"\\udc00\"]").into_bytes(),
            format!("[{url}, \"\\ud800\\n\"]").into_bytes(),
            format!("[{url}, \"a\tb\"]").into_bytes(),
            [format!("[{url}, \"").into_bytes(), vec![0xff, b'"', b']']].concat(),
            b"\"https://api.satellogic.com/x".to_vec(),
            b"<html>https://api.satellogic.com/x</html>".to_vec(),
            b"https://api.satellogic.com/x".to_vec(),
        ];
        for c in cases {
            assert_eq!(
                r.rewrite_json(&c, PUB),
                None,
                "{:?}",
                String::from_utf8_lossy(&c)
            );
            assert!(
                serde_json::from_slice::<serde_json::Value>(&c).is_err(),
                "{:?}",
                String::from_utf8_lossy(&c)
            );
        }
    }

    #[test]
    fn nesting_is_limited_like_serde_json() {
        let r = aleph();
        let nest = |d: usize| {
            format!(
                "{}\"https://api.satellogic.com/x\"{}",
                "[".repeat(d),
                "]".repeat(d)
            )
        };
        let ok = nest(MAX_DEPTH);
        assert!(serde_json::from_str::<serde_json::Value>(&ok).is_ok());
        assert!(r.rewrite_json(ok.as_bytes(), PUB).is_some());
        let deep = nest(MAX_DEPTH + 1);
        assert!(serde_json::from_str::<serde_json::Value>(&deep).is_err());
        assert_eq!(r.rewrite_json(deep.as_bytes(), PUB), None);
        assert_eq!(r.rewrite_json("[".repeat(100_000).as_bytes(), PUB), None);
    }

    #[test]
    fn unchanged_documents_return_none() {
        let r = aleph();
        for body in [
            r#"{}"#,
            "[]",
            "null",
            "1",
            r#""x""#,
            r#"{"a":[1,2,{"b":"http://x/"}],"c":"https://other/"}"#,
        ] {
            assert_eq!(json(&r, body), None, "{body}");
        }
    }

    #[test]
    fn rewrites_link_header_targets() {
        let r = aleph();
        let v = r#"<https://api.satellogic.com/v2/orders?page=2>; rel="next", <https://api.satellogic.com/v2/orders?page=0>; rel="prev""#;
        assert_eq!(
            r.rewrite_link_header(v, PUB).as_deref(),
            Some(
                r#"<http://127.0.0.1:8080/v2/orders?page=2>; rel="next", <http://127.0.0.1:8080/v2/orders?page=0>; rel="prev""#
            )
        );
        // Angle brackets inside quoted parameters are not targets; other hosts stay as they are.
        let v = r#"<https://cdn.example/x>; rel="alternate"; title="see <https://api.satellogic.com/t>", <https://api.satellogic.com/y>;rel=up"#;
        assert_eq!(
            r.rewrite_link_header(v, PUB).as_deref(),
            Some(
                r#"<https://cdn.example/x>; rel="alternate"; title="see <https://api.satellogic.com/t>", <http://127.0.0.1:8080/y>;rel=up"#
            )
        );
        assert_eq!(
            r.rewrite_link_header(r#"</relative>; rel="next""#, PUB),
            None
        );
        assert_eq!(
            r.rewrite_link_header(
                r#"<https://evil.com/?u=https://api.satellogic.com/>; rel=x"#,
                PUB
            ),
            None
        );
        assert_eq!(
            r.rewrite_link_header("<https://api.satellogic.com/unterminated", PUB),
            None
        );
        assert_eq!(r.rewrite_link_header("", PUB), None);
    }

    #[test]
    fn location_header_values_use_rewrite_url() {
        let r = aleph();
        assert_eq!(
            r.rewrite_url("https://api.satellogic.com/v2/orders/42", PUB)
                .as_deref(),
            Some("http://127.0.0.1:8080/v2/orders/42")
        );
        assert_eq!(
            r.rewrite_url("https://bucket.s3.amazonaws.com/k?X-Amz-Signature=1", PUB),
            None
        );
    }

    #[test]
    fn recognises_json_content_types() {
        for ct in [
            "application/json",
            "Application/JSON; charset=utf-8",
            "application/geo+json",
            " application/vnd.oai.openapi+json;version=3.0",
            "application/problem+JSON",
        ] {
            assert!(is_json_content_type(ct), "{ct}");
        }
        for ct in [
            "text/html",
            "application/jsonl",
            "application/json-seq",
            "application/+json",
            "text/json",
            "application",
            "",
            "image/tiff; application=geotiff",
        ] {
            assert!(!is_json_content_type(ct), "{ct}");
        }
    }

    #[test]
    fn parses_content_encoding() {
        assert_eq!(Encoding::from_header(None), Some(Encoding::Identity));
        assert_eq!(
            Encoding::from_header(Some("identity")),
            Some(Encoding::Identity)
        );
        assert_eq!(Encoding::from_header(Some(" GZIP ")), Some(Encoding::Gzip));
        assert_eq!(Encoding::from_header(Some("x-gzip")), Some(Encoding::Gzip));
        assert_eq!(
            Encoding::from_header(Some("deflate")),
            Some(Encoding::Deflate)
        );
        assert_eq!(Encoding::from_header(Some("br")), Some(Encoding::Brotli));
        assert_eq!(Encoding::from_header(Some("zstd")), None);
        assert_eq!(Encoding::from_header(Some("gzip, br")), None);
        assert_eq!(Encoding::from_header(Some("compress")), None);
    }

    fn sample_body() -> Vec<u8> {
        let item = r#"{"href":"https://api.satellogic.com/archive/stac/x","n":12345}"#;
        format!("[{}]", vec![item; 200].join(",")).into_bytes()
    }

    #[test]
    fn encodings_round_trip() {
        let body = sample_body();
        for enc in [
            Encoding::Identity,
            Encoding::Gzip,
            Encoding::Deflate,
            Encoding::Brotli,
        ] {
            let packed = encode(enc, &body);
            if enc != Encoding::Identity {
                assert!(packed.len() < body.len() / 4, "{enc:?} compresses");
            }
            assert_eq!(decode(enc, &packed, body.len()).unwrap(), body, "{enc:?}");
        }
        assert_eq!(decode(Encoding::Gzip, b"", 10).unwrap(), b"");
    }

    #[test]
    fn deflate_accepts_raw_streams() {
        let body = sample_body();
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), Compression::default());
        e.write_all(&body).unwrap();
        let raw = e.finish().unwrap();
        assert!(!has_zlib_header(&raw));
        assert_eq!(decode(Encoding::Deflate, &raw, body.len()).unwrap(), body);
        // A raw stream of stored blocks whose first bytes also form a valid zlib header.
        let lookalike = [
            0x78, 0x01, 0x00, 0xfe, 0xff, b'x', 0x01, 0x00, 0x00, 0xff, 0xff,
        ];
        assert!(has_zlib_header(&lookalike));
        assert_eq!(decode(Encoding::Deflate, &lookalike, 10).unwrap(), b"x");
    }

    #[test]
    fn gzip_accepts_concatenated_members() {
        let packed = [
            encode(Encoding::Gzip, b"[1,"),
            encode(Encoding::Gzip, b"2]"),
        ]
        .concat();
        assert_eq!(decode(Encoding::Gzip, &packed, 100).unwrap(), b"[1,2]");
    }

    #[test]
    fn decode_limit_is_enforced() {
        let bomb = vec![b' '; 4 << 20];
        for enc in [
            Encoding::Identity,
            Encoding::Gzip,
            Encoding::Deflate,
            Encoding::Brotli,
        ] {
            let packed = encode(enc, &bomb);
            assert!(
                matches!(decode(enc, &packed, 1 << 20), Err(RewriteError::TooLarge { limit }) if limit == 1 << 20),
                "{enc:?}"
            );
            assert_eq!(
                decode(enc, &packed, bomb.len()).unwrap().len(),
                bomb.len(),
                "{enc:?} exact limit"
            );
            assert!(
                matches!(
                    decode(enc, &packed, bomb.len() - 1),
                    Err(RewriteError::TooLarge { .. })
                ),
                "{enc:?} one over"
            );
        }
    }

    #[test]
    fn corrupt_streams_are_errors() {
        let packed = encode(Encoding::Gzip, &sample_body());
        let cut = &packed[..packed.len() / 2];
        for enc in [Encoding::Gzip, Encoding::Deflate, Encoding::Brotli] {
            let err = decode(enc, b"this is not compressed at all", 1 << 20).unwrap_err();
            assert!(
                matches!(err, RewriteError::Decode { encoding, .. } if encoding == enc),
                "{enc:?}: {err}"
            );
        }
        assert!(matches!(
            decode(Encoding::Gzip, cut, 1 << 20),
            Err(RewriteError::Decode { .. })
        ));
    }

    mod props {
        use super::*;
        use proptest::prelude::*;
        use serde_json::{Map, Value};

        /// A document tree whose string leaves carry their expected rewrite (None = untouched).
        #[derive(Debug, Clone)]
        enum Node {
            Null,
            Bool(bool),
            Int(i64),
            Float(f64),
            Str(String, Option<String>),
            Arr(Vec<Node>),
            Obj(Vec<(String, Node)>),
        }

        fn upstream_url() -> impl Strategy<Value = (String, String)> {
            let origin = prop::sample::select(vec![
                "https://api.satellogic.com",
                "HTTPS://API.Satellogic.com",
                "https://api.satellogic.com:443",
            ]);
            // Segments that decode to "." or ".." are refused by design (they could climb out of
            // the base path), so they are not "upstream URLs" here.
            let segment = "[a-zA-Z0-9_~%-]{1,8}".prop_filter("dot segment", |x| {
                let decoded = x.to_ascii_lowercase().replace("%2e", ".");
                decoded != "." && decoded != ".."
            });
            let path = prop::collection::vec(segment, 0..4)
                .prop_map(|s| s.iter().map(|x| format!("/{x}")).collect::<String>());
            let slash = any::<bool>().prop_map(|b| if b { "/" } else { "" });
            // Queries hold characters that need JSON escaping, to check the suffix is copied right.
            let query = prop::option::of("[a-z0-9=&:/\"\\\\\u{e9}\u{1F600}.]{0,12}");
            (origin, path, slash, query).prop_map(|(o, p, s, q)| {
                let tail = format!("{p}{s}{}", q.map(|q| format!("?{q}")).unwrap_or_default());
                (format!("{o}{tail}"), format!("{PUB}{tail}"))
            })
        }

        fn other_string() -> impl Strategy<Value = String> {
            prop_oneof![
                prop::sample::select(vec![
                    "https://bucket.s3.amazonaws.com/x.png?X-Amz-Signature=abc",
                    "https://api.satellogic.com.evil.com/",
                    "https://evil.com/?u=https://api.satellogic.com/x",
                    "https://api.satellogic.com@evil.com/",
                    "https://api.satellogic.comx",
                    "http://api.satellogic.com/x",
                    "https://api.satellogic.com:8443/x",
                    "/v2/orders?offset=25&limit=25",
                    "hello",
                    "h",
                    "",
                ])
                .prop_map(str::to_owned),
                "\\PC{0,16}",
                "[\\x00-\\x1f\"\\\\/]{0,6}",
            ]
        }

        fn leaf(with_upstream: bool) -> BoxedStrategy<Node> {
            let plain = prop_oneof![
                Just(Node::Null),
                any::<bool>().prop_map(Node::Bool),
                any::<i64>().prop_map(Node::Int),
                any::<f64>()
                    .prop_filter("finite", |f| f.is_finite())
                    .prop_map(Node::Float),
                other_string().prop_map(|s| Node::Str(s, None)),
            ];
            if with_upstream {
                prop_oneof![
                    plain,
                    upstream_url().prop_map(|(s, e)| Node::Str(s, Some(e)))
                ]
                .boxed()
            } else {
                plain.boxed()
            }
        }

        fn tree(with_upstream: bool) -> impl Strategy<Value = Node> {
            // Keys may look like upstream URLs but must never be rewritten.
            let key = prop_oneof![other_string(), upstream_url().prop_map(|(s, _)| s)];
            leaf(with_upstream).prop_recursive(4, 48, 6, move |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..6).prop_map(Node::Arr),
                    prop::collection::vec((key.clone(), inner), 0..6).prop_map(Node::Obj),
                ]
            })
        }

        /// The input document and the one expected after rewriting.
        fn build(n: &Node) -> (Value, Value) {
            match n {
                Node::Null => (Value::Null, Value::Null),
                Node::Bool(b) => (Value::Bool(*b), Value::Bool(*b)),
                Node::Int(i) => ((*i).into(), (*i).into()),
                Node::Float(f) => ((*f).into(), (*f).into()),
                Node::Str(s, e) => (s.as_str().into(), e.as_deref().unwrap_or(s).into()),
                Node::Arr(v) => {
                    let (a, b) = v.iter().map(build).unzip();
                    (Value::Array(a), Value::Array(b))
                }
                Node::Obj(v) => {
                    let (mut a, mut b) = (Map::new(), Map::new());
                    for (k, n) in v {
                        let (x, y) = build(n);
                        a.insert(k.clone(), x);
                        b.insert(k.clone(), y);
                    }
                    (Value::Object(a), Value::Object(b))
                }
            }
        }

        /// Counts string values that differ: every upstream URL changes origin when rewritten.
        fn changed(a: &Value, b: &Value) -> usize {
            match (a, b) {
                (Value::String(x), Value::String(y)) => usize::from(x != y),
                (Value::Array(x), Value::Array(y)) => {
                    x.iter().zip(y).map(|(x, y)| changed(x, y)).sum()
                }
                (Value::Object(x), Value::Object(y)) => {
                    x.values().zip(y.values()).map(|(x, y)| changed(x, y)).sum()
                }
                _ => 0,
            }
        }

        /// The three serializations exercised: compact, pretty, and compact with `\/` escapes
        /// (`/` only ever occurs inside strings, so replacing it everywhere is sound).
        fn render(v: &Value, style: u8) -> Vec<u8> {
            match style {
                0 => serde_json::to_vec(v).unwrap(),
                1 => serde_json::to_vec_pretty(v).unwrap(),
                _ => serde_json::to_string(v)
                    .unwrap()
                    .replace('/', "\\/")
                    .into_bytes(),
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn rewrites_exactly_the_upstream_urls(node in tree(true), style in 0u8..3) {
                let (input, expected) = build(&node);
                let body = render(&input, style);
                let n = changed(&input, &expected);
                match aleph().rewrite_json(&body, PUB) {
                    None => prop_assert_eq!(n, 0),
                    Some((out, count)) => {
                        prop_assert_eq!(count, n);
                        let parsed: Value = serde_json::from_slice(&out).expect("output parses");
                        let want: Value = serde_json::from_slice(&render(&expected, style)).unwrap();
                        prop_assert_eq!(&parsed, &want);
                        // Stronger: byte-identical to serializing the expected document.
                        prop_assert_eq!(String::from_utf8(out).unwrap(), String::from_utf8(render(&expected, style)).unwrap());
                    }
                }
            }

            #[test]
            fn documents_without_upstream_urls_are_unchanged(node in tree(false), style in 0u8..3) {
                let (input, _) = build(&node);
                prop_assert_eq!(aleph().rewrite_json(&render(&input, style), PUB), None);
            }

            #[test]
            fn damaged_documents_never_yield_invalid_output(
                node in tree(true),
                edits in prop::collection::vec((any::<prop::sample::Index>(), 0u8..3, any::<u8>()), 1..4),
            ) {
                let (input, _) = build(&node);
                let mut body = render(&input, 0);
                for (at, op, byte) in edits {
                    let i = at.index(body.len() + 1);
                    match op {
                        0 => body.insert(i, byte),
                        1 if i < body.len() => { body.remove(i); }
                        _ if i < body.len() => body[i] = byte,
                        _ => {}
                    }
                }
                if let Some((out, count)) = aleph().rewrite_json(&body, PUB) {
                    prop_assert!(count > 0);
                    // serde_json refuses floats beyond f64 that are valid JSON: only those may differ.
                    match serde_json::from_slice::<Value>(&body) {
                        Ok(_) => prop_assert!(serde_json::from_slice::<Value>(&out).is_ok()),
                        Err(e) => prop_assert!(e.to_string().starts_with("number out of range"), "{}", e),
                    }
                }
            }
        }
    }
}
