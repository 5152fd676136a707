//! `holdfast`: one binary for the backup server, the protection agent and the admin
//! CLI. This crate only parses arguments and wires the library crates together.

mod cli;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("holdfast: error: {e:#}");
            ExitCode::from(1)
        }
    }
}
