//! Logging and metrics setup. Logs go to stderr as text or JSON (`log.format`), filtered by
//! `RUST_LOG` (default `info`). Injected credential headers are marked sensitive, so even
//! `RUST_LOG=trace` output of hyper and reqwest shows them as `Sensitive`.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing::{Level, Metadata};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

mod json;
mod text;

pub use request::{InRequest, REQUEST_SPAN};

mod request;
pub mod throttle;

/// Installs the global subscriber (once; later calls are ignored).
pub fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(Stderr)
        .with_timer(Timestamp);
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(false)
            .fmt_fields(text::TextFields)
            .event_format(text::TextLines)
            .try_init(),
        LogFormat::Json => builder
            .fmt_fields(json::JsonSpanFields)
            .event_format(json::JsonLines)
            .try_init(),
    };
}

/// The time of a log line: RFC 3339 in UTC to the microsecond, as tracing-subscriber's
/// `SystemTime` writes it, but formatted by humantime in one pass (tracing-subscriber's took
/// about 2,400 instructions a line).
struct Timestamp;

impl FormatTime for Timestamp {
    fn format_time(&self, w: &mut Writer<'_>) -> std::fmt::Result {
        let now = std::time::SystemTime::now();
        if now < std::time::UNIX_EPOCH {
            // humantime formats times from 1970 on; a clock set earlier is shown as it is.
            return tracing_subscriber::fmt::time::SystemTime.format_time(w);
        }
        write!(w, "{}", humantime::format_rfc3339_micros(now))
    }
}

/// Log lines waiting for [`flush_logs`] (see [`batch_logs`]).
static PENDING: Pending = Pending::new();
static BATCHING: AtomicBool = AtomicBool::new(false);
/// Pending lines are written out once they reach this size, idle or not.
const PENDING_LIMIT: usize = 32 * 1024;

/// Lets INFO and lower lines logged on a tokio runtime thread (the access log: one line per
/// request) wait for [`flush_logs`] instead of costing a `write(2)` each, which took about a
/// tenth of the CPU time of a request in bench/. The binary turns this on and calls
/// `flush_logs` whenever a runtime thread runs out of work (`on_thread_park`), before a panic
/// aborts, and at exit; a busy thread writes every 32 KiB. So lines are written the moment the
/// proxy is idle, and under load a few milliseconds late, in batches. WARN and ERROR lines, and
/// lines from threads outside the runtime, are written at once (after the waiting ones, in
/// order). Off (the default for the library, whose embedders have no such hook), every line is
/// written at once.
pub fn batch_logs(on: bool) {
    BATCHING.store(on, Ordering::Relaxed);
    if !on {
        flush_logs();
    }
}

/// Writes out the lines waiting under [`batch_logs`].
pub fn flush_logs() {
    PENDING.flush(&mut std::io::stderr());
}

/// [`flush_logs`] for a panic hook: skipped if the buffer is locked (by a thread that is
/// writing it out, or by the panicking thread itself, which would otherwise wait forever).
pub fn flush_logs_on_panic() {
    PENDING.try_flush(&mut std::io::stderr());
}

/// Lines waiting to be written, in the order they were logged.
struct Pending(Mutex<Vec<u8>>);

impl Pending {
    const fn new() -> Pending {
        Pending(Mutex::new(Vec::new()))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One whole line: kept (`wait`) until the buffer fills or is flushed, or written at once
    /// after the lines before it.
    fn line(&self, line: &[u8], wait: bool, out: &mut impl Write) {
        let mut pending = self.lock();
        if wait {
            pending.extend_from_slice(line);
            if pending.len() >= PENDING_LIMIT {
                write_out(&mut pending, out);
            }
        } else {
            write_out(&mut pending, out);
            // As tracing-subscriber does with its writer's errors: a line that cannot be
            // written is dropped; there is nowhere left to report it.
            let _ = out.write_all(line);
        }
    }

    fn flush(&self, out: &mut impl Write) {
        write_out(&mut self.lock(), out);
    }

    fn try_flush(&self, out: &mut impl Write) {
        match self.0.try_lock() {
            Ok(mut pending) => write_out(&mut pending, out),
            Err(std::sync::TryLockError::Poisoned(e)) => write_out(&mut e.into_inner(), out),
            Err(std::sync::TryLockError::WouldBlock) => {}
        }
    }
}

fn write_out(pending: &mut Vec<u8>, out: &mut impl Write) {
    if !pending.is_empty() {
        let _ = out.write_all(pending);
        pending.clear();
    }
}

/// The subscriber's writer: stderr, through [`PENDING`] when batching (see [`batch_logs`]).
struct Stderr;

/// One log line: tracing-subscriber formats a whole line and hands it over in one `write_all`.
struct Line {
    batch: bool,
}

impl<'a> MakeWriter<'a> for Stderr {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line { batch: false }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Line {
        let batch = BATCHING.load(Ordering::Relaxed)
            && *meta.level() > Level::WARN
            && tokio::runtime::Handle::try_current().is_ok();
        Line { batch }
    }
}

impl Write for Line {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        PENDING.line(buf, self.batch, &mut std::io::stderr());
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The process-wide Prometheus recorder, installed on first use.
pub fn metrics_handle() -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let buckets = [
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                60.0,
            ];
            let recorder = PrometheusBuilder::new()
                .set_buckets(&buckets)
                .ok()?
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok()?;
            describe();
            // Histogram samples queue up until they are drained into their buckets, which only a
            // scrape of /metrics or `run_upkeep` does: without a scraper every request's sample
            // stayed in memory (RSS grew ~1.5 MiB per 100k requests in bench/). A thread, not a
            // task: the recorder is process-wide and outlives any one runtime (tests run several).
            let upkeep = handle.clone();
            let _ = std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .stack_size(64 * 1024)
                .spawn(move || loop {
                    std::thread::sleep(std::time::Duration::from_secs(5));
                    upkeep.run_upkeep();
                });
            Some(handle)
        })
        .clone()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!("aleph_proxy_requests_total", "Requests answered, by method and status class (2xx, 4xx, ...), including the proxy's own errors");
    describe_counter!(
        "aleph_proxy_errors_total",
        "Responses made by the proxy itself, by error code"
    );
    describe_histogram!(
        "aleph_proxy_upstream_duration_seconds",
        Unit::Seconds,
        "Time from sending a request upstream to its response headers"
    );
    describe_gauge!(
        "aleph_proxy_in_flight_requests",
        "Requests in flight (until their response body is sent)"
    );
    describe_counter!(
        "aleph_proxy_token_fetches_total",
        "Token endpoint requests, by outcome"
    );
    describe_histogram!(
        "aleph_proxy_token_fetch_duration_seconds",
        Unit::Seconds,
        "Duration of token endpoint requests"
    );
    describe_gauge!(
        "aleph_proxy_token_expiry_seconds",
        Unit::Seconds,
        "Seconds until the current access token expires (negative once expired)"
    );
    describe_counter!(
        "aleph_proxy_unauthorized_refreshes_total",
        "Requests replayed with a new token after an upstream 401"
    );
    describe_counter!(
        "aleph_proxy_token_invalidations_total",
        "New tokens asked for because the upstream answered 401 to the current one (which stays in use until replaced)"
    );
    describe_counter!(
        "aleph_proxy_unauthorized_passed_through_total",
        "Upstream 401s given to the client as they came, by reason (contract, not_token, no_new_token, not_replayable)"
    );
    describe_counter!(
        "aleph_proxy_upstream_retries_total",
        "Retries of idempotent requests, by reason (connect, status)"
    );
    describe_counter!(
        "aleph_proxy_links_rewritten_total",
        "Upstream links rewritten to the proxy in bodies and headers"
    );
    describe_counter!(
        "aleph_proxy_links_not_rewritten_total",
        "JSON responses passed through with their links unrewritten, by reason (too_large, undecodable, unknown_coding)"
    );
    describe_counter!(
        "aleph_proxy_connections_rejected_total",
        "Connections closed at once because limits.max_connections was reached"
    );
    describe_counter!(
        "aleph_proxy_responses_cut_total",
        "Responses cut short because the upstream's body failed midway or did not match its length (their access line says the status that went out)"
    );
    describe_counter!(
        "aleph_proxy_spliced_bytes_total",
        Unit::Bytes,
        "Response body bytes moved socket to socket by the kernel (splice), not copied through the proxy"
    );

    // The exporter renders a series only once it exists. Create the label-less ones at zero now,
    // so the first scrape already lists them: a counter born on its first event hides that event
    // from rate()/increase(), and an alert on it cannot tell "never happened" from "not scraped".
    // (Labelled series appear with their first label combination.)
    for name in [
        "aleph_proxy_unauthorized_refreshes_total",
        "aleph_proxy_token_invalidations_total",
        "aleph_proxy_links_rewritten_total",
        "aleph_proxy_connections_rejected_total",
        "aleph_proxy_spliced_bytes_total",
        "aleph_proxy_responses_cut_total",
    ] {
        metrics::counter!(name).increment(0);
    }
    metrics::gauge!("aleph_proxy_in_flight_requests").increment(0.0);
    // A registered histogram is rendered with empty buckets and a zero count.
    let _ = metrics::histogram!("aleph_proxy_upstream_duration_seconds");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiting_lines_keep_their_order_and_leave_by_flush_limit_or_an_urgent_line() {
        let p = Pending::new();
        let mut out = Vec::new();
        p.line(b"info 1\n", true, &mut out);
        p.line(b"info 2\n", true, &mut out);
        assert!(out.is_empty(), "waiting lines are not written yet");
        p.line(b"warn 3\n", false, &mut out);
        assert_eq!(
            out, b"info 1\ninfo 2\nwarn 3\n",
            "an urgent line follows the waiting ones"
        );
        p.line(b"info 4\n", true, &mut out);
        p.flush(&mut out);
        assert_eq!(out, b"info 1\ninfo 2\nwarn 3\ninfo 4\n");
        p.flush(&mut out);
        assert_eq!(out.len(), 28, "a flush with nothing waiting writes nothing");

        let mut out = Vec::new();
        let line = [b'x'; 1000];
        for _ in 0..PENDING_LIMIT / 1000 {
            p.line(&line, true, &mut out);
        }
        assert!(out.is_empty());
        p.line(&line, true, &mut out);
        assert_eq!(
            out.len(),
            (PENDING_LIMIT / 1000 + 1) * 1000,
            "the limit writes all of it"
        );
    }

    #[test]
    fn timestamps_have_the_form_of_tracing_subscribers() {
        let (mut ours, mut theirs) = (String::new(), String::new());
        Timestamp.format_time(&mut Writer::new(&mut ours)).unwrap();
        tracing_subscriber::fmt::time::SystemTime
            .format_time(&mut Writer::new(&mut theirs))
            .unwrap();
        // 2026-11-26T08:30:01.123456Z
        assert_eq!(ours.len(), 27, "{ours}");
        assert_eq!(ours.len(), theirs.len(), "{ours} {theirs}");
        assert_eq!(ours[..16], theirs[..16], "{ours} {theirs}");
        let parsed = humantime::parse_rfc3339(&ours).unwrap();
        let age = std::time::SystemTime::now().duration_since(parsed).unwrap();
        assert!(age < std::time::Duration::from_secs(5), "{ours}");
    }

    #[test]
    fn a_panic_flush_skips_a_buffer_that_is_in_use() {
        let p = Pending::new();
        let mut out = Vec::new();
        p.line(b"info\n", true, &mut out);
        let held = p.lock();
        p.try_flush(&mut out);
        assert!(out.is_empty());
        drop(held);
        p.try_flush(&mut out);
        assert_eq!(out, b"info\n");
    }
}
