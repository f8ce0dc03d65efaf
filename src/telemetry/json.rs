//! The JSON log format (`log.format = "json"`). The same lines as tracing-subscriber's
//! `fmt().json().flatten_event(true).with_current_span(true).with_span_list(false)`, written
//! in one pass: that formatter keeps a span's fields as a map of JSON values, serialises them
//! and parses them back for every line, and UTF-8-checks every piece it writes, which made a JSON
//! access line cost about 15,000 instructions (3.5 µs of CPU) per request in bench/.
//!
//! One object per line: `timestamp`, `level`, the event's fields (`message` first), `target`,
//! and `span` (`{<its fields>, "name": ...}`) when logged inside one. A span's fields are kept
//! as the `"key":value` pairs of that object, ready to copy ([`JsonSpanFields`]); a field
//! recorded again later is appended, not replaced (the last one is what JSON readers keep).
//! Fields of records bridged from the `log` crate (`log.file`, `log.line`, ...) are left out:
//! `target` and `level` already carry what matters of them.
//!
//! One difference: delete and the C1 controls in strings are written as `\u007f` to `\u009f`
//! (tracing-subscriber, through serde_json, writes them as they are; see [`escape_controls`]).

use std::cell::RefCell;
use std::fmt;

use serde::Serialize;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_log::NormalizeEvent;
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

use super::Timestamp;

/// The event formatter; pair it with [`JsonSpanFields`].
pub struct JsonLines;

/// The span field formatter of [`JsonLines`]: `,"key":value` for each field.
pub struct JsonSpanFields;

thread_local! {
    /// The line being written, reused from line to line.
    static LINE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl<S> FormatEvent<S, JsonSpanFields> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, JsonSpanFields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        LINE.with(|cell| {
            let mut reused = cell.try_borrow_mut();
            let mut own = Vec::new();
            let line = match reused.as_deref_mut() {
                Ok(line) => {
                    line.clear();
                    line
                }
                // A field's Debug that logs: this line gets its own buffer.
                Err(_) => &mut own,
            };
            self.line(ctx, line, event)?;
            writer.write_str(std::str::from_utf8(line).map_err(|_| fmt::Error)?)
        })
    }
}

impl JsonLines {
    fn line<S>(
        &self,
        ctx: &FmtContext<'_, S, JsonSpanFields>,
        line: &mut Vec<u8>,
        event: &Event<'_>,
    ) -> fmt::Result
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        let mut time = String::with_capacity(32);
        Timestamp.format_time(&mut Writer::new(&mut time))?;
        line.extend_from_slice(b"{\"timestamp\":");
        value(line, &time)?;
        line.extend_from_slice(b",\"level\":");
        value(line, meta.level().as_str())?;
        let mut fields = Fields::new(line, false);
        event.record(&mut fields);
        fields.result?;
        line.extend_from_slice(b",\"target\":");
        value(line, meta.target())?;
        let span = event
            .parent()
            .and_then(|id| ctx.span(id))
            .or_else(|| ctx.lookup_current());
        if let Some(span) = span {
            line.extend_from_slice(b",\"span\":{");
            let ext = span.extensions();
            if let Some(stored) = ext
                .get::<FormattedFields<JsonSpanFields>>()
                .and_then(|f| f.fields.strip_prefix(','))
            {
                line.extend_from_slice(stored.as_bytes());
                line.push(b',');
            }
            line.extend_from_slice(b"\"name\":");
            value(line, span.metadata().name())?;
            line.push(b'}');
        } else {
            super::request::with_id(|id| match id {
                Some(id) => {
                    line.extend_from_slice(b",\"span\":{\"request_id\":");
                    value(line, id)?;
                    line.extend_from_slice(b",\"name\":");
                    value(line, super::REQUEST_SPAN)?;
                    line.push(b'}');
                    Ok(())
                }
                None => Ok(()),
            })?;
        }
        line.extend_from_slice(b"}\n");
        escape_controls(line);
        Ok(())
    }
}

impl<'w> FormatFields<'w> for JsonSpanFields {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut pairs = Vec::new();
        let mut v = Fields::new(&mut pairs, true);
        fields.record(&mut v);
        v.result?;
        escape_controls(&mut pairs);
        writer.write_str(std::str::from_utf8(&pairs).map_err(|_| fmt::Error)?)
    }

    fn add_fields(
        &self,
        current: &'w mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        // Each pair starts with its comma: appending keeps the pairs well-formed.
        self.format_fields(current.as_writer(), fields)
    }
}

/// Appends `v` as JSON (strings escaped, non-finite floats as `null`).
fn value(line: &mut Vec<u8>, v: impl Serialize) -> fmt::Result {
    serde_json::to_writer(line, &v).map_err(|_| fmt::Error)
}

/// Beyond what JSON requires, delete and the C1 controls are escaped too (`\u007f`, `\u009b`):
/// the same string to a JSON reader, but no control sequence for a terminal that shows the raw
/// line (`kubectl logs`); a request path may carry them. serde_json writes both as they are, and
/// in its output they can only be string content, so a line (or a span's stored pairs) is
/// rewritten as a whole in the rare case it holds one.
fn escape_controls(line: &mut Vec<u8>) {
    if memchr::memchr2(0x7f, 0xc2, line).is_none() {
        return;
    }
    let raw = std::mem::take(line);
    let mut bytes = raw.iter().copied().peekable();
    while let Some(b) = bytes.next() {
        let code = match b {
            0x7f => Some(0x7f),
            0xc2 => bytes.next_if(|c| (0x80..=0x9f).contains(c)),
            _ => None,
        };
        match code {
            Some(c) => line.extend_from_slice(format!("\\u{c:04x}").as_bytes()),
            None => line.push(b),
        }
    }
}

/// Appends fields as `,"name":value` pairs.
struct Fields<'a> {
    line: &'a mut Vec<u8>,
    /// A span's fields: a raw identifier's `r#` is dropped, as tracing-subscriber does there.
    span: bool,
    result: fmt::Result,
}

impl<'a> Fields<'a> {
    fn new(line: &'a mut Vec<u8>, span: bool) -> Fields<'a> {
        Fields {
            line,
            span,
            result: Ok(()),
        }
    }

    fn entry(&mut self, field: &Field, v: impl Serialize) {
        let mut name = field.name();
        if self.result.is_err() || name.starts_with("log.") {
            return;
        }
        if self.span {
            name = name.strip_prefix("r#").unwrap_or(name);
        }
        self.line.push(b',');
        self.result = value(self.line, name).and_then(|()| {
            self.line.push(b':');
            value(self.line, v)
        });
    }
}

/// As tracing-serde's visitor (tracing-subscriber's JSON): numbers, booleans and strings as such,
/// everything else (128-bit integers and byte slices included) as its `Debug` text.
impl Visit for Fields<'_> {
    fn record_f64(&mut self, field: &Field, v: f64) {
        self.entry(field, v);
    }
    fn record_i64(&mut self, field: &Field, v: i64) {
        self.entry(field, v);
    }
    fn record_u64(&mut self, field: &Field, v: u64) {
        self.entry(field, v);
    }
    fn record_bool(&mut self, field: &Field, v: bool) {
        self.entry(field, v);
    }
    fn record_str(&mut self, field: &Field, v: &str) {
        self.entry(field, v);
    }
    fn record_error(&mut self, field: &Field, v: &(dyn std::error::Error + 'static)) {
        self.entry(field, format_args!("{v}"));
    }
    fn record_debug(&mut self, field: &Field, v: &dyn fmt::Debug) {
        self.entry(field, format_args!("{v:?}"));
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::sync::{Arc, Mutex};

    use serde_json::Value;
    use tracing_subscriber::fmt::MakeWriter;

    use super::*;

    #[derive(Clone, Default)]
    pub(crate) struct Captured(pub(crate) Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Captured {
            self.clone()
        }
    }

    /// Events of every kind of field, in and out of spans.
    pub(crate) fn emit() {
        tracing::info!("outside any span");
        let request = tracing::info_span!("request", request_id = "rid-1");
        let _in = request.enter();
        tracing::info!(
            method = %"GET",
            path = "/a\"b\\c\nd\u{1}\u{7f}é☃",
            status = 200u16,
            latency_ms = 0.545,
            neg = -3i64,
            ok = true,
            nan = f64::NAN,
            inf = f64::INFINITY,
            big = 1u128 << 100,
            small = -5i128,
            bytes = b"xy".as_slice(),
            debug = ?Some("q\"uote"),
            "request"
        );
        let err = std::io::Error::other("boom \"x\"");
        tracing::warn!(
            error = &err as &(dyn std::error::Error + 'static),
            "failed {}",
            42
        );
        tracing::info_span!("inner", n = 1u64, s = "x\ty", r#type = "raw").in_scope(|| {
            tracing::debug!(kind = "nested", "inner {:?}", ["a", "b"]);
        });
        tracing::info_span!("no_fields").in_scope(|| tracing::info!("in an empty span"));
        let later = tracing::info_span!("later", added = tracing::field::Empty, first = 1u64);
        later.record("added", "yes");
        later.in_scope(|| tracing::error!("after record"));
    }

    /// The lines of `emit()`, with our format or with tracing-subscriber's own JSON.
    fn render(ours: bool) -> Vec<Value> {
        let out = Captured::default();
        let builder = tracing_subscriber::fmt()
            .with_writer(out.clone())
            .with_max_level(tracing::Level::TRACE);
        if ours {
            let sub = builder
                .fmt_fields(JsonSpanFields)
                .event_format(JsonLines)
                .finish();
            tracing::subscriber::with_default(sub, emit);
        } else {
            let sub = builder
                .json()
                .with_current_span(true)
                .with_span_list(false)
                .flatten_event(true)
                .finish();
            tracing::subscriber::with_default(sub, emit);
        }
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert!(text.ends_with('\n'), "{text}");
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    }

    fn keys(v: &Value) -> Vec<String> {
        v.as_object().unwrap().keys().cloned().collect()
    }

    #[test]
    fn lines_are_those_of_tracing_subscribers_json_format() {
        let (ours, theirs) = (render(true), render(false));
        assert_eq!(ours.len(), 6);
        assert_eq!(ours.len(), theirs.len());
        for (mut a, mut b) in ours.into_iter().zip(theirs) {
            // The same keys in the same order, the same values; timestamps of the same form.
            assert_eq!(keys(&a), keys(&b), "{a}\n{b}");
            for v in [&a, &b] {
                let t = v["timestamp"].as_str().unwrap();
                assert!(
                    t.len() == 27 && t.ends_with('Z') && &t[10..11] == "T",
                    "{t}"
                );
            }
            a.as_object_mut().unwrap().remove("timestamp");
            b.as_object_mut().unwrap().remove("timestamp");
            // Span fields may come in another order (tracing-subscriber sorts them by name).
            assert_eq!(a, b);
        }
    }

    /// What `f` logs, in our format.
    fn logged(f: impl FnOnce()) -> String {
        let out = Captured::default();
        let sub = tracing_subscriber::fmt()
            .with_writer(out.clone())
            .fmt_fields(JsonSpanFields)
            .event_format(JsonLines)
            .finish();
        tracing::subscriber::with_default(sub, f);
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        text
    }

    #[test]
    fn records_of_the_log_crate_keep_their_target_and_drop_their_metadata_fields() {
        let text = logged(|| {
            let step = "handshake";
            tracing_log::format_trace(
                &log::Record::builder()
                    .args(format_args!("{step} done"))
                    .level(log::Level::Warn)
                    .target("rustls::client")
                    .module_path_static(Some("rustls::client::hs"))
                    .file_static(Some("hs.rs"))
                    .line(Some(7))
                    .build(),
            )
            .unwrap();
        });
        let v: Value = serde_json::from_str(text.trim_end()).unwrap();
        assert_eq!(v["target"], "rustls::client", "{v}");
        assert_eq!(v["level"], "WARN", "{v}");
        assert_eq!(v["message"], "handshake done", "{v}");
        assert!(keys(&v).iter().all(|k| !k.starts_with("log.")), "{v}");
    }

    #[test]
    fn no_terminal_control_reaches_a_line_raw() {
        let path = "/a\u{9b}31m\x1b[0m\x7f\u{85}\u{80}\u{9f}b \u{a0}\u{c2}é";
        let text = logged(|| {
            tracing::info_span!("request", request_id = path).in_scope(|| {
                tracing::info!(path = %path, debug = ?path, s = path, "{path}");
            })
        });
        assert!(
            !text.contains(['\u{9b}', '\x1b', '\x7f', '\u{85}', '\u{80}', '\u{9f}']),
            "{text}"
        );
        assert!(
            text.contains("\\u009b31m\\u001b[0m\\u007f\\u0085\\u0080\\u009fb \u{a0}\u{c2}é"),
            "{text}"
        );
        let v: Value = serde_json::from_str(text.trim_end()).unwrap();
        assert_eq!(v["message"], path);
        assert_eq!(v["path"], path);
        assert_eq!(v["s"], path);
        assert_eq!(v["span"]["request_id"], path);
        assert_eq!(v["debug"], format!("{path:?}"));
    }

    #[test]
    fn lines_in_a_request_read_as_in_a_request_span() {
        let log = || tracing::info!(status = 200u16, "request");
        let ours = logged(|| super::super::text::tests::in_request("rid-7", log));
        let span = logged(|| tracing::info_span!("request", request_id = "rid-7").in_scope(log));
        let (mut a, mut b): (Value, Value) = (
            serde_json::from_str(ours.trim_end()).unwrap(),
            serde_json::from_str(span.trim_end()).unwrap(),
        );
        a.as_object_mut().unwrap().remove("timestamp");
        b.as_object_mut().unwrap().remove("timestamp");
        assert_eq!(a, b);
        assert_eq!(a["span"]["request_id"], "rid-7", "{a}");
        assert_eq!(keys(&a), keys(&b));
    }

    #[test]
    fn strings_are_escaped_and_spans_carried() {
        let lines = render(true);
        let access = &lines[1];
        assert_eq!(access["path"], "/a\"b\\c\nd\u{1}\u{7f}é☃");
        assert_eq!(access["status"], 200);
        assert_eq!(access["latency_ms"], 0.545);
        assert_eq!(access["nan"], Value::Null);
        assert_eq!(access["span"]["request_id"], "rid-1");
        assert_eq!(access["span"]["name"], "request");
        assert!(lines[0].get("span").is_none());
        assert_eq!(lines[3]["span"]["s"], "x\ty");
        assert_eq!(lines[3]["span"]["type"], "raw");
        assert_eq!(lines[5]["span"]["added"], "yes");
        assert_eq!(lines[5]["level"], "ERROR");
    }
}
