//! HTTP/1.1 pieces both sides of the proxy share: the chunked transfer coding (RFC 9112
//! section 7.1) as an incremental decoder, the Content-Length grammar, where a parsed field lies
//! in its head, and the header maps that finished messages hand back for the next ones.
//!
//! The chunked coding is parsed to the letter of RFC 9112 section 7.1, because a recipient that
//! reads a body's end elsewhere than the sender does is a request-smuggling hop: a chunk-size
//! line is `1*HEXDIG` (within u64), then only extensions (`BWS ";" BWS token [BWS "=" BWS
//! (token / quoted-string)]`), then CRLF; a trailer line is a field line (a token, a colon, a
//! value without control bytes but HTAB). Every line of the coding ends in CRLF: a bare LF,
//! which RFC 9112 section 2.2 lets a recipient take as a line end, is refused here, as is a
//! bare CR (it is a control byte).

use std::cell::RefCell;

use bytes::{Buf, Bytes, BytesMut};
use http::HeaderMap;

/// Header maps kept per thread for reuse, at most.
const SPARE_MAPS: usize = 32;
/// A map that grew past room for this many fields is freed instead of kept.
const SPARE_MAX_FIELDS: usize = 64;

thread_local! {
    static SPARE: RefCell<Vec<HeaderMap>> = const { RefCell::new(Vec::new()) };
}

/// An empty header map with room for `fields`: one a finished message left on this thread when
/// there is one. A header map is two allocations of up to a few KiB, larger than the
/// allocator's fast per-thread caches take; two per request cost about a twentieth of the
/// proxy's instructions per request before maps were reused (BENCHMARKS.md).
pub fn header_map(fields: usize) -> HeaderMap {
    match SPARE.with(|s| s.borrow_mut().pop()) {
        Some(map) if map.capacity() >= fields => map,
        _ => HeaderMap::with_capacity(fields),
    }
}

/// Hands a header map that is no longer needed back for [`header_map`].
pub fn recycle(mut map: HeaderMap) {
    let room = map.capacity();
    if room == 0 || room > SPARE_MAX_FIELDS {
        return;
    }
    map.clear();
    SPARE.with(|s| {
        let mut spare = s.borrow_mut();
        if spare.len() < SPARE_MAPS {
            spare.push(map);
        }
    });
}

/// A chunk-size line longer than this (extensions included) is refused.
const MAX_SIZE_LINE: usize = 1024;

/// Where a chunked body's decoder stands.
#[derive(Debug)]
pub enum Chunk {
    /// A chunk-size line is next.
    Size,
    /// This many bytes of chunk data are left.
    Data(u64),
    /// The CRLF after chunk data is next.
    DataEnd,
    /// Trailer lines until the empty line; the count of trailer bytes so far.
    Trailers(usize),
}

/// What [`Chunk::decode`] found in the buffer.
#[derive(Debug, PartialEq)]
pub enum Decoded {
    /// A piece of chunk data.
    Data(Bytes),
    /// The body ended (the last chunk and the trailer section were read; trailers are dropped).
    End,
    /// More bytes are needed.
    More,
    /// The coding is broken.
    Invalid(&'static str),
}

impl Chunk {
    /// Decodes from the front of `buf` as far as it goes: chunk data comes out as slices of the
    /// buffer, not copies. Trailer sections over `max_trailers` bytes are refused.
    pub fn decode(&mut self, buf: &mut BytesMut, max_trailers: usize) -> Decoded {
        loop {
            match self {
                Chunk::Size => {
                    let end = match line_end(buf, MAX_SIZE_LINE, "chunk size line too long") {
                        Ok(0) => return Decoded::More,
                        Ok(end) => end,
                        Err(why) => return Decoded::Invalid(why),
                    };
                    let Some(size) = chunk_size(&buf[..end - 2]) else {
                        return Decoded::Invalid("invalid chunk size line");
                    };
                    buf.advance(end);
                    *self = if size == 0 {
                        Chunk::Trailers(0)
                    } else {
                        Chunk::Data(size)
                    };
                }
                Chunk::Data(left) => {
                    if buf.is_empty() {
                        return Decoded::More;
                    }
                    let data = take(buf, left);
                    if *left == 0 {
                        *self = Chunk::DataEnd;
                    }
                    return Decoded::Data(data);
                }
                Chunk::DataEnd => {
                    if buf.len() < 2 {
                        return Decoded::More;
                    }
                    if &buf[..2] != b"\r\n" {
                        return Decoded::Invalid("invalid chunk end");
                    }
                    buf.advance(2);
                    *self = Chunk::Size;
                }
                Chunk::Trailers(seen) => {
                    let room = max_trailers - *seen;
                    match line_end(buf, room, "trailer section too large") {
                        Ok(0) => return Decoded::More,
                        Ok(2) => {
                            buf.advance(2);
                            return Decoded::End;
                        }
                        Ok(end) if is_field_line(&buf[..end - 2]) => {
                            *seen += end;
                            buf.advance(end);
                        }
                        Ok(_) => return Decoded::Invalid("invalid trailer line"),
                        Err(why) => return Decoded::Invalid(why),
                    }
                }
            }
        }
    }
}

/// Where the line at the front of `buf` ends: its length with the CRLF, or 0 when no line end
/// is there yet and the line may still end within `max` bytes. Err(`too_long`) when it cannot;
/// an error too when it ends in a bare LF.
fn line_end(buf: &[u8], max: usize, too_long: &'static str) -> Result<usize, &'static str> {
    let window = &buf[..buf.len().min(max)];
    match memchr::memchr(b'\n', window) {
        Some(i) if i > 0 && window[i - 1] == b'\r' => Ok(i + 1),
        Some(_) => Err("chunked coding line ends in a bare LF"),
        None if buf.len() < max => Ok(0),
        None => Err(too_long),
    }
}

/// The size of a chunk-size line (without its CRLF): `1*HEXDIG` then chunk extensions, which
/// are checked and dropped. None when the line is not that, or the size overflows u64.
fn chunk_size(line: &[u8]) -> Option<u64> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || line[..digits].iter().skip_while(|b| **b == b'0').count() > 16 {
        return None;
    }
    let size = line[..digits].iter().fold(0u64, |n, b| {
        let d = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            _ => b - b'A' + 10,
        };
        n << 4 | u64::from(d)
    });
    // chunk-ext = *( BWS ";" BWS chunk-ext-name [ BWS "=" BWS chunk-ext-val ] )
    let mut rest = &line[digits..];
    while !rest.is_empty() {
        rest = skip_bws(rest).strip_prefix(b";")?;
        rest = skip_bws(rest);
        let name = token_len(rest);
        if name == 0 {
            return None;
        }
        rest = &rest[name..];
        if let Some(value) = skip_bws(rest).strip_prefix(b"=") {
            let value = skip_bws(value);
            let len = if value.first() == Some(&b'"') {
                quoted_len(value)?
            } else {
                token_len(value)
            };
            if len == 0 {
                return None;
            }
            rest = &value[len..];
        }
    }
    Some(size)
}

fn skip_bws(s: &[u8]) -> &[u8] {
    let n = s.iter().take_while(|b| matches!(b, b' ' | b'\t')).count();
    &s[n..]
}

/// RFC 9110 section 5.6.2: `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Bytes of the token at the front of `s` (0: none).
fn token_len(s: &[u8]) -> usize {
    s.iter().take_while(|b| is_tchar(**b)).count()
}

/// Bytes of the quoted-string at the front of `s` (which starts with `"`), RFC 9110 section
/// 5.6.4: None when it is not closed or holds a control byte other than HTAB.
fn quoted_len(s: &[u8]) -> Option<usize> {
    let text = |b: u8| b == b'\t' || (b >= 0x20 && b != 0x7f);
    let mut i = 1;
    while i < s.len() {
        match s[i] {
            b'"' => return Some(i + 1),
            b'\\' if s.get(i + 1).is_some_and(|b| text(*b)) => i += 2,
            b if text(b) && b != b'\\' => i += 1,
            _ => return None,
        }
    }
    None
}

/// A trailer line (without its CRLF) is a field line, RFC 9112 section 5: a token, a colon and
/// a value of visible bytes, spaces and tabs (obs-text included; no obs-fold).
fn is_field_line(line: &[u8]) -> bool {
    let name = token_len(line);
    name > 0
        && line.get(name) == Some(&b':')
        && line[name + 1..]
            .iter()
            .all(|b| *b == b'\t' || (*b >= 0x20 && *b != 0x7f))
}

/// A Content-Length value (one element of the list): digits only (`+5` and `-1` are refused,
/// RFC 9110 section 8.6), within u64.
pub fn parse_length(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 19 || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(s).ok()?.parse().ok()
}

/// Up to `left` bytes off the front of `buf` (which holds some).
pub fn take(buf: &mut BytesMut, left: &mut u64) -> Bytes {
    let n = (*left).min(buf.len() as u64) as usize;
    *left -= n as u64;
    buf.split_to(n).freeze()
}

/// Where `s` (a slice of a parsed head of `n` bytes starting at `base`) lies in the head. An
/// empty slice may point anywhere: taken as empty.
pub fn span(base: usize, n: usize, s: &[u8]) -> (u32, u32) {
    match (s.as_ptr() as usize).checked_sub(base) {
        Some(start) if start + s.len() <= n => (start as u32, (start + s.len()) as u32),
        _ => (0, 0),
    }
}

/// A field's span in its head: (name start, name end, value start, value end).
pub type FieldSpan = (u32, u32, u32, u32);

/// Room for the spans of the usual few fields, on the caller's stack (zeroing room for all of
/// them would cost more than parsing a small head); more go on the heap.
pub const INLINE_FIELDS: usize = 24;

/// Where each field of a parsed head lies in its `n` bytes at `base`, taken while httparse's
/// fields still borrow the read buffer, so that names and values can be read back as slices of
/// the head once it is split off, not copies. The spans go in `inline` when they fit, else in
/// `heap` (both the caller's: nothing is moved or allocated for a small head).
#[inline(always)]
pub fn field_spans<'a>(
    base: usize,
    n: usize,
    fields: &[httparse::Header<'_>],
    inline: &'a mut [FieldSpan; INLINE_FIELDS],
    heap: &'a mut Vec<FieldSpan>,
) -> &'a [FieldSpan] {
    let slots: &mut [FieldSpan] = if fields.len() <= INLINE_FIELDS {
        &mut inline[..fields.len()]
    } else {
        heap.resize(fields.len(), (0, 0, 0, 0));
        heap
    };
    for (slot, h) in slots.iter_mut().zip(fields) {
        let (ns, ne) = span(base, n, h.name.as_bytes());
        let (vs, ve) = span(base, n, h.value);
        *slot = (ns, ne, vs, ve);
    }
    slots
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reused_header_maps_come_back_empty() {
        let mut map = header_map(8);
        map.insert("authorizationtoken", "Bearer secret".parse().unwrap());
        map.append("x-a", "1".parse().unwrap());
        map.append("x-a", "2".parse().unwrap());
        let room = map.capacity();
        recycle(map);
        let again = header_map(4);
        assert!(
            again.is_empty(),
            "a reused map carries nothing of its last message"
        );
        assert_eq!(again.capacity(), room, "and keeps its room");
        // A map that grew large is freed, not kept.
        let mut big = http::HeaderMap::with_capacity(200);
        big.insert("x-b", "1".parse().unwrap());
        recycle(big);
        assert!(header_map(1).capacity() < 200);
    }

    /// Feeds `wire` in pieces of `step` bytes; returns the data and how the body ended.
    fn decode_in_steps(wire: &[u8], step: usize) -> (Vec<u8>, Decoded) {
        let mut state = Chunk::Size;
        let mut buf = BytesMut::new();
        let mut data = Vec::new();
        for piece in wire.chunks(step) {
            buf.extend_from_slice(piece);
            loop {
                match state.decode(&mut buf, 64) {
                    Decoded::Data(d) => data.extend_from_slice(&d),
                    Decoded::More => break,
                    end => return (data, end),
                }
            }
        }
        (data, Decoded::More)
    }

    /// Decodes `wire` a byte at a time and at once, which must agree; returns the result.
    fn decode_bytewise_and_whole(wire: &[u8]) -> (Vec<u8>, Decoded) {
        let whole = decode_in_steps(wire, wire.len());
        let bytewise = decode_in_steps(wire, 1);
        assert_eq!(bytewise, whole, "{:?}", String::from_utf8_lossy(wire));
        whole
    }

    #[test]
    fn chunked_bodies_decode_whatever_the_read_boundaries() {
        let wire = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-trailer: dropped\r\n\r\nNEXT";
        for step in [1, 2, 3, 7, 100] {
            let (data, end) = decode_in_steps(wire, step);
            assert_eq!(data, b"hello world", "step {step}");
            assert_eq!(end, Decoded::End, "step {step}");
        }
        let mut buf = BytesMut::from(&wire[..]);
        let mut state = Chunk::Size;
        while state.decode(&mut buf, 64) != Decoded::End {}
        assert_eq!(
            &buf[..],
            b"NEXT",
            "bytes after the body are left for the next message"
        );
    }

    #[test]
    fn broken_chunked_bodies_are_refused() {
        let size = "invalid chunk size line";
        let bare_lf = "chunked coding line ends in a bare LF";
        let trailer = "invalid trailer line";
        for (wire, why) in [
            (&b"zz\r\nab\r\n0\r\n\r\n"[..], size),
            (b"fffffffffffffffffffff\r\nx\r\n0\r\n\r\n", size),
            (b"10000000000000000\r\nx\r\n0\r\n\r\n", size),
            (b"2\r\nabXY0\r\n\r\n", "invalid chunk end"),
            (
                b"0\r\nx-a: 0123456789012345678901234567890123456789012345678901234567890123\r\n\r\n",
                "trailer section too large",
            ),
            // No digits: not a last chunk (RFC 9112 section 7.1: chunk-size = 1*HEXDIG).
            (b"\r\n\r\n", size),
            (b"5\r\nhello\r\n\r\n\r\n", size),
            (b";x\r\n\r\n", size),
            (b"-1\r\nx\r\n0\r\n\r\n", size),
            (b"+1\r\nx\r\n0\r\n\r\n", size),
            (b"0x1\r\nx\r\n0\r\n\r\n", size),
            // Whitespace after the size is allowed only before an extension.
            (b"3 \t \r\nabc\r\n0\r\n\r\n", size),
            (b"3 \r\nabc\r\n0\r\n\r\n", size),
            // Extensions: tokens or quoted strings, no control bytes, no bare LF.
            (b"3;x\nabc\r\nxyz\r\n0\r\n\r\n", bare_lf),
            (b"3;\x00\x01\x7f\r\nabc\r\n0\r\n\r\n", size),
            (b"3;a=\x01\r\nabc\r\n0\r\n\r\n", size),
            (b"3;a\rb\r\nabc\r\n0\r\n\r\n", size),
            (b"3;\r\nabc\r\n0\r\n\r\n", size),
            (b"3;a=\r\nabc\r\n0\r\n\r\n", size),
            (b"3;a=\"x\r\nabc\r\n0\r\n\r\n", size),
            (b"3;a=\"x\x7f\"\r\nabc\r\n0\r\n\r\n", size),
            (b"3;a b\r\nabc\r\n0\r\n\r\n", size),
            (b"3;a=b \r\nabc\r\n0\r\n\r\n", size),
            (b"3;a=b;\r\nabc\r\n0\r\n\r\n", size),
            // Bare LF ends no line of the coding.
            (b"3\nabc\r\n0\r\n\r\n", bare_lf),
            (b"3\r\nabc\r\n0\n\r\n", bare_lf),
            (b"3\r\nabc\r\n0\r\n\n", bare_lf),
            // Trailers are field lines.
            (
                b"3\r\nabc\r\n0\r\n\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
                bare_lf,
            ),
            (b"3\r\nabc\r\n0\r\nthis is not a field\r\n\r\n", trailer),
            (b"0\r\nx-a: 1\nx-b: 2\r\n\r\n", bare_lf),
            (b"0\r\n: empty name\r\n\r\n", trailer),
            (b"0\r\nx-a : 1\r\n\r\n", trailer),
            (b"0\r\n x-a: 1\r\n\r\n", trailer),
            (b"0\r\nx-a: 1\r\n folded\r\n\r\n", trailer),
            (b"0\r\nx-a: \x00\r\n\r\n", trailer),
            (b"0\r\nx-a: a\rb\r\n\r\n", trailer),
            (b"0\r\nx-a: \x7f\r\n\r\n", trailer),
        ] {
            let (_, end) = decode_bytewise_and_whole(wire);
            let text = String::from_utf8_lossy(wire);
            assert_eq!(end, Decoded::Invalid(why), "{text:?}");
        }
    }

    #[test]
    fn chunk_lines_follow_rfc_9112() {
        for wire in [
            &b"3\r\nabc\r\n0\r\n\r\n"[..],
            b"03\r\nabc\r\n000\r\n\r\n",
            b"3;a\r\nabc\r\n0;b\r\n\r\n",
            b"3 ;a\r\nabc\r\n0\r\n\r\n",
            b"3\t; a = b ;c=\"q \\\" ;\t\x80\"\r\nabc\r\n0\r\n\r\n",
            b"3;!#$%&'*+-.^_`|~09azAZ=x\r\nabc\r\n0\r\n\r\n",
            b"3\r\nabc\r\n0\r\nx-a: 1\r\nx-b:\r\nx-c:\ta b\x80\t\r\n\r\n",
        ] {
            assert_eq!(
                decode_bytewise_and_whole(wire),
                (b"abc".to_vec(), Decoded::End)
            );
        }
        // The largest size that fits u64 is a size; leading zeros do not count.
        let mut state = Chunk::Size;
        let mut buf = BytesMut::from(&b"00000ffffffffffffffff\r\n"[..]);
        assert_eq!(state.decode(&mut buf, 64), Decoded::More);
        assert!(matches!(state, Chunk::Data(u64::MAX)));
    }

    #[test]
    fn content_lengths_are_digits_only() {
        assert_eq!(parse_length(b"0"), Some(0));
        assert_eq!(parse_length(b"18446744073709551615"), None);
        assert_eq!(
            parse_length(b"1844674407370955161"),
            Some(1844674407370955161)
        );
        for bad in [
            &b""[..],
            b"+2",
            b"-1",
            b" 1",
            b"1 ",
            b"0x10",
            b"1e3",
            b"\xd9\xa3",
        ] {
            assert_eq!(
                parse_length(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
