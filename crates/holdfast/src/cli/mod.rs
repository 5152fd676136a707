//! Command-line interface: argument definitions and dispatch.

mod image;
mod progress;
mod store;
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
    /// Create a datastore.
    #[command(subcommand)]
    Datastore(store::DatastoreCommand),
    /// Take a recovery point of disk images into a datastore.
    Backup(store::BackupArgs),
    /// List the recovery points in a datastore.
    RecoveryPoints(store::PointsArgs),
    /// Write one disk of a recovery point to an image file.
    Restore(store::RestoreArgs),
    /// Re-read and check everything in a datastore; exits 2 when a recovery point is
    /// damaged.
    Verify(store::VerifyArgs),
    /// Remove recovery points that retention rules no longer keep.
    Prune(store::PruneArgs),
    /// Reclaim space that no recovery point references.
    Gc(store::GcArgs),
    /// Remove given recovery points (their data goes at the next gc).
    Forget(store::ForgetArgs),
}

/// Runs a parsed command line; the exit code says what happened.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Image(cmd) => image::run(cmd),
        Command::Datastore(store::DatastoreCommand::Create(a)) => store::create(&a),
        Command::Backup(a) => store::backup(&a),
        Command::RecoveryPoints(a) => store::points(&a),
        Command::Restore(a) => store::restore(&a),
        Command::Verify(a) => store::verify(&a),
        Command::Prune(a) => store::prune(&a),
        Command::Gc(a) => store::gc(&a),
        Command::Forget(a) => store::forget(&a),
    }
}
