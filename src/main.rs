//! `aleph-proxy`: parse the command line and hand over to [`aleph_proxy::cli`].
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = aleph_proxy::cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("aleph-proxy: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(aleph_proxy::cli::main(cli))
}
