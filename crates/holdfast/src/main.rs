//! `holdfast`: one binary for the backup server, the protection agent and the admin
//! CLI. This crate only parses arguments and wires the library crates together.

mod cli;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    if !args.is_daemon() {
        // `holdfast ilr ls ... | head` should end quietly like any Unix tool, not
        // panic on a closed stdout. Daemons keep Rust's default (EPIPE as an error).
        // SAFETY: setting a signal disposition before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    match cli::run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("holdfast: error: {e:#}");
            ExitCode::from(1)
        }
    }
}
