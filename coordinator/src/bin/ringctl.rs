//! `ringctl`: the operator's CLI. Exit codes: 0 success, 1 failed, 2 bad usage or input.

use std::process::ExitCode;

use clap::Parser;
use ringmaster_coordinator::cli::{self, Args, Command};

fn main() -> ExitCode {
    let args = Args::parse();
    // ringctl prints results on stdout; its own diagnostics go to stderr, quiet by default.
    // `ringctl local` also shows the workers' output lines.
    if std::env::var_os("RUST_LOG").is_none() {
        let filter = if matches!(args.command, Command::Local { .. }) {
            "warn,worker=info"
        } else {
            "warn"
        };
        // SAFETY: single-threaded at this point; nothing else reads the environment yet.
        unsafe { std::env::set_var("RUST_LOG", filter) };
    }
    // Records go through the live view's writer: `ringctl local` shows them above its view.
    ringmaster_common::logging::init_with_writer(
        args.log_format,
        cli::view::LogWriter,
        std::io::IsTerminal::is_terminal(&std::io::stderr()),
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("building the tokio runtime");
    match rt.block_on(cli::run(args)) {
        Ok(exit) => ExitCode::from(exit as u8),
        Err(e) => {
            eprintln!("ringctl: {}", e.message);
            ExitCode::from(e.exit as u8)
        }
    }
}
