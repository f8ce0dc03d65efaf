//! `aleph-proxy`: parse the command line and hand over to [`aleph_proxy::cli`].
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = aleph_proxy::cli::Cli::parse();
    // One worker: the current-thread scheduler, everything on this thread, no work-stealing
    // machinery and no second thread (against one worker of the multi-threaded one: the same CPU
    // per request, a p99 about 4% lower; BENCHMARKS.md). Chosen with TOKIO_WORKER_THREADS=1, and
    // when that is unset and the process may use less than two CPUs (one core, an affinity mask
    // of one CPU, a cgroup limit below two cores such as a Kubernetes sidecar's
    // `limits.cpu: 500m`), where the multi-threaded scheduler would run one worker anyway.
    // Otherwise the multi-threaded one, one worker per usable CPU.
    let one = match std::env::var("TOKIO_WORKER_THREADS") {
        Ok(v) => v.trim() == "1",
        Err(std::env::VarError::NotPresent) => {
            std::thread::available_parallelism().map_or(true, |n| n.get() == 1)
        }
        // Not Unicode: tokio's multi-threaded builder reports it.
        Err(std::env::VarError::NotUnicode(_)) => false,
    };
    let mut builder = if one {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    // The access log waits for the runtime to run out of work, then goes out in one write
    // (telemetry::batch_logs); what is still waiting is written before a panic aborts and at exit.
    aleph_proxy::telemetry::batch_logs(true);
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        aleph_proxy::telemetry::flush_logs_on_panic();
        report(info)
    }));
    builder.on_thread_park(aleph_proxy::telemetry::flush_logs);
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("aleph-proxy: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let code = runtime.block_on(aleph_proxy::cli::main(cli));
    aleph_proxy::telemetry::batch_logs(false);
    code
}
