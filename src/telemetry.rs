//! Logging and metrics setup. Logs go to stderr as text or JSON (`log.format`), filtered by
//! `RUST_LOG` (default `info`). Injected credential headers are marked sensitive, so even
//! `RUST_LOG=trace` output of hyper and reqwest shows them as `Sensitive`.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber (once; later calls are ignored).
pub fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.with_ansi(false).try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .flatten_event(true)
            .try_init(),
    };
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
        "Tokens dropped because the upstream rejected them"
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
        "aleph_proxy_connections_rejected_total",
        "Connections closed at once because limits.max_connections was reached"
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
    ] {
        metrics::counter!(name).increment(0);
    }
    metrics::gauge!("aleph_proxy_in_flight_requests").increment(0.0);
}
