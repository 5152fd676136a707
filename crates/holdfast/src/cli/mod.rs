//! Command-line interface: argument definitions and dispatch.

mod admin;
mod calendar;
mod copy;
mod daemons;
mod export;
mod ilr;
mod image;
mod location;
mod online;
mod progress;
mod storage;
mod store;
mod units;
mod users;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Holdfast: backup and recovery for Hyper-V and KVM virtual machines.
#[derive(Debug, Parser)]
#[command(name = "holdfast", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    server: admin::ServerArgs,
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
    /// List recovery points: from the server (`recovery-points list [--vm HOST/VM]`),
    /// or straight from a datastore folder with `-d DIR`.
    RecoveryPoints(store::PointsArgs),
    /// Write one disk of a recovery point to an image file.
    Restore(store::RestoreArgs),
    /// Item-level recovery: browse and copy files inside a recovery point (NTFS,
    /// ext2/3/4, FAT), without restoring the disk.
    #[command(subcommand)]
    Ilr(ilr::IlrCommand),
    /// Serve one disk of a recovery point as an NBD export (instant recovery): QEMU,
    /// qemu-img or nbdcopy read it in place; `--writable` keeps writes in a temporary
    /// overlay. Runs until SIGINT/SIGTERM.
    ExportNbd(export::ExportNbdArgs),
    /// Re-read and check everything in a datastore; exits 2 when a recovery point is
    /// damaged.
    Verify(store::VerifyArgs),
    /// Remove recovery points that retention rules no longer keep.
    Prune(store::PruneArgs),
    /// Reclaim space that no recovery point references.
    Gc(store::GcArgs),
    /// Remove given recovery points (their data goes at the next gc).
    Forget(store::ForgetArgs),
    /// Copy recovery points into another datastore (a folder, Azure Blob, S3): each
    /// source's newest, or one given; only blocks the target lacks are uploaded.
    Copy(copy::CopyArgs),
    /// Run the backup server (API, scheduler, catalog, datastore).
    Server(daemons::ServerCmd),
    /// Run the protection agent on a hypervisor host.
    Agent(daemons::AgentCmd),
    /// Start a server and an agent on loopback in a temporary folder and protect two
    /// sample VMs end to end (the five-minute tour).
    Demo(daemons::DemoCmd),
    /// Enrollment tokens for agents.
    #[command(subcommand)]
    AgentToken(admin::TokenCommand),
    /// Enrolled agents.
    #[command(subcommand)]
    Agents(admin::AgentsCommand),
    /// Protection groups: members and policy.
    #[command(subcommand)]
    Pg(admin::PgCommand),
    /// Data sources (VMs) the agents report.
    #[command(subcommand)]
    Datasources(admin::DataSourcesCommand),
    /// Clusters: hosts a VM may move between on its own (live migration).
    #[command(subcommand)]
    Clusters(admin::ClustersCommand),
    /// Storage targets for online copies: Azure Blob, S3, a folder.
    #[command(subcommand)]
    Storage(storage::StorageCommand),
    /// Take a recovery point of a VM now.
    BackupNow {
        /// HOST/VM
        vm: String,
        /// Read every block (no change tracking).
        #[arg(long)]
        express_full: bool,
        /// E-mail this address when the job ends (repeatable; needs [smtp] on the
        /// server).
        #[arg(long = "notify", value_name = "EMAIL")]
        notify: Vec<String>,
        /// Wait for the job; exit 0 only when the recovery point exists.
        #[arg(long)]
        wait: bool,
        #[arg(long)]
        json: bool,
    },
    /// Recover a whole VM from a recovery point through an agent: over the original
    /// disk files (a running QEMU VM with --stop-vm), as a new VM in a folder, or as
    /// plain disk files.
    Recover(admin::RecoverArgs),
    /// Compare every block of a VM with its replica and repair it.
    ConsistencyCheck {
        /// HOST/VM
        vm: String,
        #[arg(long)]
        wait: bool,
        #[arg(long)]
        json: bool,
    },
    /// Jobs: list, show, follow, cancel.
    #[command(subcommand)]
    Jobs(admin::JobsCommand),
    /// Alerts.
    #[command(subcommand)]
    Alerts(admin::AlertsCommand),
    /// Offline seeding: export a VM's first copy on the host, import it on the server.
    #[command(subcommand)]
    Replica(daemons::ReplicaCommand),
    /// Console users and their roles (admin, operator, restore, auditor).
    #[command(subcommand)]
    Users(users::UsersCommand),
    /// API tokens for scripts, with a role and an expiry; shown once.
    #[command(subcommand)]
    Tokens(users::TokensCommand),
}

impl Cli {
    /// Long-running commands that hold sockets (a client going away must be an error
    /// on that socket, not a SIGPIPE ending the process).
    pub fn is_daemon(&self) -> bool {
        matches!(
            self.command,
            Command::Server(_) | Command::Agent(_) | Command::Demo(_) | Command::ExportNbd(_)
        )
    }
}

/// Runs a parsed command line; the exit code says what happened.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Image(cmd) => image::run(cmd),
        Command::Datastore(store::DatastoreCommand::Create(a)) => store::create(&a),
        Command::Backup(a) => store::backup(&a),
        Command::RecoveryPoints(a) => match a.datastore_given() {
            true => store::points(&a),
            false => admin::recovery_points(&cli.server, &a),
        },
        Command::Restore(a) => store::restore(&a),
        Command::Ilr(c) => ilr::run(&cli.server, c),
        Command::ExportNbd(a) => export::export_nbd(&cli.server, &a),
        Command::Verify(a) => match &a.storage {
            Some(name) => storage::verify(&cli.server, name, a.sample, a.json),
            None => store::verify(&a),
        },
        Command::Prune(a) => store::prune(&a),
        Command::Gc(a) => store::gc(&a),
        Command::Forget(a) => store::forget(&a),
        Command::Copy(a) => copy::copy(&a),
        Command::Server(a) => daemons::server(a),
        Command::Agent(a) => daemons::agent(&cli.server, a),
        Command::Demo(a) => daemons::demo(a),
        Command::AgentToken(c) => admin::agent_token(&cli.server, c),
        Command::Agents(c) => admin::agents(&cli.server, c),
        Command::Pg(c) => admin::pg(&cli.server, c),
        Command::Datasources(c) => admin::datasources(&cli.server, c),
        Command::Clusters(c) => admin::clusters(&cli.server, c),
        Command::Storage(c) => storage::run(&cli.server, c),
        Command::BackupNow {
            vm,
            express_full,
            notify,
            wait,
            json,
        } => admin::backup_now(&cli.server, &vm, express_full, notify, wait, json),
        Command::Recover(a) => admin::recover(&cli.server, &a),
        Command::ConsistencyCheck { vm, wait, json } => {
            admin::consistency_check(&cli.server, &vm, wait, json)
        }
        Command::Jobs(c) => admin::jobs(&cli.server, c),
        Command::Alerts(c) => admin::alerts(&cli.server, c),
        Command::Replica(c) => daemons::replica(&cli.server, c),
        Command::Users(c) => users::users(&cli.server, c),
        Command::Tokens(c) => users::tokens(&cli.server, c),
    }
}
