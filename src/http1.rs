//! HTTP/1.1 pieces both sides of the proxy share: the chunked transfer coding (RFC 9112
//! section 7.1) as an incremental decoder, where a parsed field lies in its head, and the header
//! maps that finished messages hand back for the next ones.

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
                Chunk::Size => match httparse::parse_chunk_size(buf) {
                    Ok(httparse::Status::Complete((used, size))) => {
                        buf.advance(used);
                        *self = if size == 0 {
                            Chunk::Trailers(0)
                        } else {
                            Chunk::Data(size)
                        };
                    }
                    Ok(httparse::Status::Partial) if buf.len() < MAX_SIZE_LINE => {
                        return Decoded::More
                    }
                    _ => return Decoded::Invalid("invalid chunk size"),
                },
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
                Chunk::Trailers(seen) => match buf.windows(2).position(|w| w == b"\r\n") {
                    Some(0) => {
                        buf.advance(2);
                        return Decoded::End;
                    }
                    Some(i) if *seen + i + 2 <= max_trailers => {
                        *seen += i + 2;
                        buf.advance(i + 2);
                    }
                    None if *seen + buf.len() <= max_trailers => return Decoded::More,
                    _ => return Decoded::Invalid("trailer section too large"),
                },
            }
        }
    }
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
        for (wire, why) in [
            (&b"zz\r\nab\r\n0\r\n\r\n"[..], "invalid chunk size"),
            (b"fffffffffffffffffffff\r\nx\r\n0\r\n\r\n", "invalid chunk size"),
            (b"2\r\nabXY0\r\n\r\n", "invalid chunk end"),
            (
                b"0\r\nx-a: 0123456789012345678901234567890123456789012345678901234567890123\r\n\r\n",
                "trailer section too large",
            ),
        ] {
            let (_, end) = decode_in_steps(wire, 100);
            assert_eq!(end, Decoded::Invalid(why), "{:?}", String::from_utf8_lossy(wire));
        }
    }
}
