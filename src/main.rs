//! `aleph-proxy`: parse the command line and hand over to [`aleph_proxy::cli`].
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = aleph_proxy::cli::Cli::parse();
    // One worker (TOKIO_WORKER_THREADS=1): the current-thread scheduler, no work-stealing
    // machinery on the hot path. More: the multi-threaded one, one worker per core by default.
    let one = std::env::var("TOKIO_WORKER_THREADS").is_ok_and(|v| v.trim() == "1");
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
