//! Command-line interface: argument definitions and dispatch.

mod image;
mod progress;
mod units;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Holdfast: backup and recovery for Hyper-V and KVM virtual machines.
#[derive(Debug, Parser)]
#[command(name = "holdfast", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Inspect, convert and check virtual disk images (raw, VHD, VHDX/AVHDX, qcow2).
    #[command(subcommand)]
    Image(image::ImageCommand),
}

/// Runs a parsed command line; the exit code says what happened.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Image(cmd) => image::run(cmd),
    }
}
