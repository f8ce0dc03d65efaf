//! The text log format (`log.format = "text"`, the default). The same lines, byte for byte, as
//! tracing-subscriber's default `Full` format without colours, written in one pass: that
//! formatter writes every field through `format_args!` and two layers of `Display` wrappers, and
//! a line's message one character at a time through its escaping writer. It made the access
//! line, logged once per request at the default `RUST_LOG=info`, cost about 11,000
//! instructions (bench/instructions.py).
//!
//! A line is `<timestamp> <level> <span>{<fields>}:<span>...: <target>: <fields>`: the level
//! right-aligned to five characters, the spans from the outermost in, a span's braces only when
//! it has fields, the event's fields separated by spaces, the message bare and the others as
//! `name=value`. Values are written as tracing-subscriber writes them: strings quoted and
//! escaped (`Debug`), `%` fields as their `Display`, numbers and booleans as they are, errors
//! with their sources. Fields of records bridged from the `log` crate (`log.file`, `log.line`,
//! ...) are left out, as there.
//!
//! One deliberate difference: a line is one line and holds no control character. In messages,
//! `%` and `?` values and errors, every C0 control (line breaks and tabs among them) and delete
//! is written as `\x0a`, every C1 control as `\u{9b}`. tracing-subscriber escapes only escape,
//! bell, backspace, form feed, delete and C1, and only in messages. The access line's `path` is
//! the client's, and a request path may hold any UTF-8 (the `http` crate accepts it), the C1
//! controls included: `GET /%C2%9B...` arrives percent-encoded and harmless, but `GET
//! /\xC2\x9B...` sent raw would otherwise reach an operator's terminal as a control sequence.

use std::fmt::{self, Write};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_log::NormalizeEvent;
use tracing_subscriber::field::{RecordFields, VisitOutput};
use tracing_subscriber::fmt::format::{DefaultVisitor, Writer};
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

use super::Timestamp;

/// The event formatter; pair it with [`TextFields`].
pub struct TextLines;

/// The field formatter of [`TextLines`] (a span's fields are kept formatted, ready to copy).
pub struct TextFields;

impl<S> FormatEvent<S, TextFields> for TextLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, TextFields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        if Timestamp.format_time(&mut writer).is_err() {
            writer.write_str("<unknown time>")?;
        }
        writer.write_str(level(meta.level()))?;
        let mut seen = super::request::with_id(|id| match id {
            Some(id) => {
                writer.write_str(super::REQUEST_SPAN)?;
                writer.write_str("{request_id=")?;
                quoted(&mut writer, id)?;
                writer.write_str("}:").map(|()| true)
            }
            None => Ok(false),
        })?;
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                seen = true;
                writer.write_str(span.metadata().name())?;
                let ext = span.extensions();
                if let Some(fields) = ext.get::<FormattedFields<TextFields>>() {
                    if !fields.is_empty() {
                        writer.write_char('{')?;
                        writer.write_str(fields)?;
                        writer.write_char('}')?;
                    }
                }
                writer.write_char(':')?;
            }
        }
        if seen {
            writer.write_char(' ')?;
        }
        writer.write_str(meta.target())?;
        writer.write_str(": ")?;
        let mut fields = Fields::new(&mut writer);
        event.record(&mut fields);
        fields.result?;
        writer.write_char('\n')
    }
}

/// The level as tracing-subscriber writes it (five characters, right-aligned), with the space
/// after the timestamp in front.
fn level(l: &Level) -> &'static str {
    match *l {
        Level::TRACE => " TRACE ",
        Level::DEBUG => " DEBUG ",
        Level::INFO => "  INFO ",
        Level::WARN => "  WARN ",
        Level::ERROR => " ERROR ",
    }
}

impl<'w> FormatFields<'w> for TextFields {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut v = Fields::new(&mut writer);
        fields.record(&mut v);
        v.result
    }
}

/// Writes fields as tracing-subscriber's `DefaultVisitor` does, with the common kinds of value
/// (strings, integers, booleans, `%` and `?` values, the message) written directly.
struct Fields<'a, 'w> {
    w: &'a mut Writer<'w>,
    empty: bool,
    result: fmt::Result,
}

impl<'a, 'w> Fields<'a, 'w> {
    fn new(w: &'a mut Writer<'w>) -> Fields<'a, 'w> {
        Fields {
            w,
            empty: true,
            result: Ok(()),
        }
    }

    /// The separating space and `name=`; false for a field that is not written.
    fn name(&mut self, field: &Field) -> bool {
        let name = field.name();
        if self.result.is_err() || name.starts_with("log.") {
            return false;
        }
        let name = name.strip_prefix("r#").unwrap_or(name);
        self.result = self.pad().and_then(|()| {
            self.w.write_str(name)?;
            self.w.write_char('=')
        });
        self.result.is_ok()
    }

    fn pad(&mut self) -> fmt::Result {
        if self.empty {
            self.empty = false;
            Ok(())
        } else {
            self.w.write_char(' ')
        }
    }

    fn message(&mut self, v: impl fmt::Display) {
        self.result = self
            .pad()
            .and_then(|()| write!(Sanitized(&mut *self.w), "{v}"));
    }
}

impl Visit for Fields<'_, '_> {
    fn record_str(&mut self, field: &Field, v: &str) {
        if field.name() == "message" {
            if self.result.is_ok() {
                self.message(v);
            }
        } else if self.name(field) {
            self.result = quoted(self.w, v);
        }
    }

    fn record_u64(&mut self, field: &Field, v: u64) {
        if field.name() == "message" {
            self.record_debug(field, &v);
        } else if self.name(field) {
            self.result = self.w.write_str(itoa::Buffer::new().format(v));
        }
    }

    fn record_i64(&mut self, field: &Field, v: i64) {
        if field.name() == "message" {
            self.record_debug(field, &v);
        } else if self.name(field) {
            self.result = self.w.write_str(itoa::Buffer::new().format(v));
        }
    }

    fn record_f64(&mut self, field: &Field, v: f64) {
        if field.name() == "message" {
            self.record_debug(field, &v);
        } else if self.name(field) {
            self.result = match thousandths(v) {
                Some(m) => write_thousandths(self.w, m),
                None => write!(self.w, "{v:?}"),
            };
        }
    }

    fn record_bool(&mut self, field: &Field, v: bool) {
        if field.name() == "message" {
            self.record_debug(field, &v);
        } else if self.name(field) {
            self.result = self.w.write_str(if v { "true" } else { "false" });
        }
    }

    fn record_error(&mut self, field: &Field, v: &(dyn std::error::Error + 'static)) {
        if self.result.is_err() || field.name().starts_with("log.") {
            return;
        }
        // Rare (error paths only): tracing-subscriber's own visitor writes it, sources and all.
        let mut own = String::new();
        let mut visitor = DefaultVisitor::new(Writer::new(&mut own), self.empty);
        visitor.record_error(field, v);
        self.result = visitor
            .finish()
            .and_then(|()| Sanitized(&mut *self.w).write_str(&own));
        self.empty = false;
    }

    fn record_debug(&mut self, field: &Field, v: &dyn fmt::Debug) {
        if field.name() == "message" {
            if self.result.is_ok() {
                self.message(format_args!("{v:?}"));
            }
        } else if self.name(field) {
            self.result = write!(Sanitized(&mut *self.w), "{v:?}");
        }
    }
}

/// `v` as a whole number of thousandths (the access log's `latency_ms`: whole microseconds),
/// when it is one and `{:?}` writes it in decimal notation. Below 10^9 a double is exact to far
/// better than half a thousandth, so the decimal with at most three places that rounds to `v` is
/// the shortest that does, which is what `{:?}` writes.
fn thousandths(v: f64) -> Option<u64> {
    if !(v.is_sign_positive() && v < 1e9) {
        return None;
    }
    let m = (v * 1000.0).round();
    (m / 1000.0 == v).then_some(m as u64)
}

/// `{:?}` of `m / 1000.0` for `m` from [`thousandths`]: `0.545`, `12.3`, `7.0`.
fn write_thousandths(w: &mut Writer<'_>, m: u64) -> fmt::Result {
    let mut digits = itoa::Buffer::new();
    w.write_str(digits.format(m / 1000))?;
    w.write_char('.')?;
    let frac = m % 1000;
    if frac == 0 {
        return w.write_char('0');
    }
    let three = [
        b'0' + (frac / 100) as u8,
        b'0' + (frac / 10 % 10) as u8,
        b'0' + (frac % 10) as u8,
    ];
    let len = 3 - three.iter().rev().take_while(|&&d| d == b'0').count();
    w.write_str(std::str::from_utf8(&three[..len]).map_err(|_| fmt::Error)?)
}

/// `{:?}` of a string: quoted, with the escapes of `str::escape_debug`.
fn quoted(w: &mut Writer<'_>, v: &str) -> fmt::Result {
    if v.bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
    {
        w.write_char('"')?;
        w.write_str(v)?;
        w.write_char('"')
    } else {
        write!(w, "{v:?}")
    }
}

/// Every control character as an escape: the C0 controls (line breaks and tabs among them) and
/// delete as `\x1b`, the C1 controls (U+0080 to U+009F, which UTF-8 writes as 0xC2 0x80 to
/// 0xC2 0x9F) as `\u{9b}`. For escape, bell, backspace, form feed, delete and C1 that is
/// tracing-subscriber's own message sanitising; the other C0 controls it writes as they are.
struct Sanitized<'a, 'w>(&'a mut Writer<'w>);

impl Write for Sanitized<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if !s.bytes().any(|b| b < 0x20 || b == 0x7f || b == 0xc2) {
            return self.0.write_str(s);
        }
        for ch in s.chars() {
            match ch {
                '\0'..='\x1f' | '\x7f' => write!(self.0, "\\x{:02x}", ch as u32)?,
                '\u{80}'..='\u{9f}' => write!(self.0, "\\u{{{:x}}}", ch as u32)?,
                c => self.0.write_char(c)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::future::Future;

    use futures_util::FutureExt;

    use super::super::json::tests::{emit, Captured};
    use super::*;

    /// The lines of `emit()` and more, with our format or with tracing-subscriber's own.
    fn render(ours: bool) -> String {
        let out = Captured::default();
        let builder = tracing_subscriber::fmt()
            .with_writer(out.clone())
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false);
        let run = || {
            emit();
            more();
        };
        if ours {
            let sub = builder
                .fmt_fields(TextFields)
                .event_format(TextLines)
                .finish();
            tracing::subscriber::with_default(sub, run);
        } else {
            let sub = builder.with_timer(Timestamp).finish();
            tracing::subscriber::with_default(sub, run);
        }
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        text
    }

    /// What the access log and the proxy's other lines hold beyond `emit()`: controls in
    /// messages and fields, raw identifiers, errors with sources, `log` records, explicit
    /// parents, nested spans.
    fn more() {
        tracing::trace!(message = 5u64, ok = true);
        tracing::info!(message = 1.0f64);
        tracing::info!(message = true);
        tracing::info!(message = -3i64, "and a format {}", 1);
        tracing::info!("only an escape: \x1b[1m");
        tracing::info!("only a C1 control: \u{9b}31m");
        tracing::info!("esc \x1b[31m red \x07\x08\x0c\x7f c1 \u{85}\u{9f} ok \u{a0}é");
        tracing::info!(
            s = "esc \x1b[0m",
            r#type = "t",
            "fmt {}",
            "\x1b]0;title\x07"
        );
        tracing::warn!(message = "a message field", n = 1u64);
        tracing::info!(method = %"GET", path = %"/x y", status = 200u16, latency_ms = 1e-7, proxy_error = None::<&str>, "request");
        tracing::info!(
            latency_ms = 12345678901234567890.0,
            f = 1.0f64,
            i = i64::MIN,
            "big"
        );
        let inner = std::io::Error::other("inner cause");
        let outer = std::io::Error::new(std::io::ErrorKind::NotFound, Wrapped(inner));
        tracing::error!(
            error = &outer as &(dyn std::error::Error + 'static),
            "with a source"
        );
        let parent = tracing::info_span!("parent", id = "p\"1");
        tracing::info!(parent: &parent, "explicit parent");
        parent.in_scope(|| {
            tracing::info_span!("child", k = 2i64).in_scope(|| {
                tracing::info!(x = ?("a", 1), "nested");
            })
        });
        tracing_log::format_trace(
            &log::Record::builder()
                .args(format_args!("{} done", "handshake"))
                .level(log::Level::Warn)
                .target("rustls::client")
                .module_path_static(Some("rustls::client::hs"))
                .file_static(Some("hs.rs"))
                .line(Some(7))
                .build(),
        )
        .unwrap();
    }

    #[derive(Debug)]
    struct Wrapped(std::io::Error);

    impl fmt::Display for Wrapped {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("wrapped")
        }
    }

    impl std::error::Error for Wrapped {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn thousandths_are_written_as_debug_writes_them() {
        let check = |v: f64| {
            let mut ours = String::new();
            match thousandths(v) {
                Some(m) => write_thousandths(&mut Writer::new(&mut ours), m).unwrap(),
                None => return false,
            }
            assert_eq!(ours, format!("{v:?}"), "{v}");
            true
        };
        // Every latency up to 2 s, every 9,973 µs up to 100 s, then random samples to 10^9 ms.
        for us in (0..2_000_000u64).chain((2_000_000..100_000_000).step_by(9_973)) {
            assert!(check(us as f64 / 1000.0), "{us}");
        }
        let mut rng = rand::rng();
        for _ in 0..200_000 {
            let us: u64 = rand::Rng::random_range(&mut rng, 0..1_000_000_000_000);
            assert!(check(us as f64 / 1000.0), "{us}");
            // Anything else is left to `{:?}` or written the same.
            check(f64::from_bits(rand::Rng::random(&mut rng)));
            check(rand::Rng::random_range(&mut rng, 0.0..1e10));
        }
        for v in [
            -0.0,
            -1.0,
            1e-7,
            0.0001,
            0.0005,
            1e9,
            1e16,
            f64::NAN,
            f64::INFINITY,
            0.1 + 0.2,
        ] {
            check(v);
        }
        assert!(!check(-0.0) && !check(0.1 + 0.2) && check(0.0) && check(7.0));
    }

    #[test]
    fn a_line_is_one_line_without_control_characters() {
        let v = "/a\u{9b}31m\x1b[0m\x07\u{85}b\n\t\r\0x";
        let text = logged(|| {
            tracing::info_span!("request", id = %v).in_scope(|| {
                tracing::info!(path = %v, debug = ?v, s = v, "request {v}");
            });
            let err = std::io::Error::other(format!("line one\nline two {v}"));
            tracing::warn!(error = &err as &(dyn std::error::Error + 'static), "failed");
        });
        let escaped = "/a\\u{9b}31m\\x1b[0m\\x07\\u{85}b\\x0a\\x09\\x0d\\x00x";
        let quoted = "\"/a\\u{9b}31m\\u{1b}[0m\\u{7}\\u{85}b\\n\\t\\r\\0x\"";
        let lines: Vec<&str> = text.lines().map(untimed).collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(
            lines[0],
            format!(
                "  INFO request{{id={escaped}}}: aleph_proxy::telemetry::text::tests: \
                 request {escaped} path={escaped} debug={quoted} s={quoted}"
            )
        );
        assert!(
            lines[1].ends_with(&format!("failed error=line one\\x0aline two {escaped}")),
            "{}",
            lines[1]
        );
        assert!(
            text.lines().all(|l| !l.contains(char::is_control)),
            "{text}"
        );
    }

    /// What `f` logs, in our format.
    fn logged(f: impl FnOnce()) -> String {
        let out = Captured::default();
        let sub = tracing_subscriber::fmt()
            .with_writer(out.clone())
            .fmt_fields(TextFields)
            .event_format(TextLines)
            .finish();
        tracing::subscriber::with_default(sub, f);
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        text
    }

    /// Polls `f` to completion inside [`InRequest`] with this id.
    pub(crate) fn in_request(id: &'static str, f: impl FnOnce()) {
        let fut = crate::telemetry::InRequest::new(
            http::HeaderValue::from_static(id),
            std::future::ready(()).map(|()| f()),
        );
        let mut fut = std::pin::pin!(fut);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(fut.as_mut().poll(&mut cx).is_ready());
    }

    #[test]
    fn lines_in_a_request_read_as_in_a_request_span() {
        let log = |f: &dyn Fn()| {
            tracing::info!(method = %"GET", status = 200u16, latency_ms = 0.5, "request");
            f();
        };
        let ours = logged(|| {
            in_request("rid-7", || {
                log(&|| tracing::info_span!("inner", n = 1u64).in_scope(|| tracing::warn!("w")))
            })
        });
        let out = Captured::default();
        let sub = tracing_subscriber::fmt()
            .with_writer(out.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(sub, || {
            tracing::info_span!("request", request_id = "rid-7").in_scope(|| {
                log(&|| tracing::info_span!("inner", n = 1u64).in_scope(|| tracing::warn!("w")))
            })
        });
        let theirs = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let (ours, theirs): (Vec<&str>, Vec<&str>) =
            (ours.lines().collect(), theirs.lines().collect());
        assert_eq!(ours.len(), 2, "{ours:#?}");
        assert_eq!(ours.len(), theirs.len());
        for (a, b) in ours.iter().zip(&theirs) {
            assert_eq!(untimed(a), untimed(b));
        }
        assert!(untimed(ours[1]).starts_with("  WARN request{request_id=\"rid-7\"}:inner{n=1}: "));
    }

    /// A line without its timestamp (the 27 characters of `2026-11-26T12:00:00.123456Z`).
    fn untimed(line: &str) -> &str {
        let (t, rest) = line.split_at(27);
        assert!(t.ends_with('Z') && &t[10..11] == "T", "{line}");
        rest
    }

    #[test]
    fn lines_are_those_of_tracing_subscribers_text_format() {
        let (ours, theirs) = (render(true), render(false));
        assert!(ours.ends_with('\n'), "{ours}");
        let (ours, theirs): (Vec<&str>, Vec<&str>) =
            (ours.lines().collect(), theirs.lines().collect());
        assert_eq!(ours.len(), 21, "{ours:#?}");
        assert_eq!(ours.len(), theirs.len(), "{ours:#?}\n{theirs:#?}");
        for (a, b) in ours.iter().zip(&theirs) {
            assert_eq!(untimed(a), untimed(b));
        }
    }

    #[test]
    fn messages_cannot_carry_terminal_escapes_and_spans_are_carried() {
        let text = render(true);
        let lines: Vec<&str> = text.lines().map(untimed).collect();
        assert_eq!(
            lines[1],
            "  INFO request{request_id=\"rid-1\"}: aleph_proxy::telemetry::json::tests: request \
             method=GET path=\"/a\\\"b\\\\c\\nd\\u{1}\\u{7f}é☃\" status=200 latency_ms=0.545 \
             neg=-3 ok=true nan=NaN inf=inf big=1267650600228229401496703205376 small=-5 \
             bytes=[78 79] debug=Some(\"q\\\"uote\")"
        );
        assert!(!text.contains('\x1b') && !text.contains('\x07'), "{text}");
        assert!(
            lines[12]
                .contains("esc \\x1b[31m red \\x07\\x08\\x0c\\x7f c1 \\u{85}\\u{9f} ok \u{a0}é"),
            "{}",
            lines[12]
        );
        assert!(
            lines[20].starts_with("  WARN rustls::client: handshake done"),
            "{}",
            lines[20]
        );
    }
}
