//! Holdfast's protection agent: runs on a hypervisor host, finds its VMs, and backs
//! them up to the server when the server hands it a job.
//!
//! # The provider model
//!
//! Everything hypervisor-specific lives behind [`Provider`]: it lists the VMs of the
//! host ([`Provider::inventory`]) and takes a consistent point-in-time view of one VM's
//! disks ([`Provider::open_view`]). The view ([`View`]) hands the backup pipeline
//! its disks as [`vdisk::VirtualDisk`]s, says how consistent the view is, and
//! optionally which byte ranges changed since the previous recovery point (change
//! tracking); it is released when the backup is done, successful or not, so a
//! tracking provider can merge its change map back after a failure.
//!
//! - `files` ([`files::FilesProvider`]): VMs at rest as folders of image files
//!   (Hyper-V exports, qcow2/raw folders); crash-consistent, no change tracking.
//! - `qemu` ([`qemu::QemuProvider`]): live VMs over QMP: a point-in-time fleecing
//!   view taken with the guest frozen or paused for milliseconds, persistent dirty
//!   bitmaps for change tracking, read through our own NBD client.
//! - `hyperv` (later): WMI checkpoints and resilient change tracking.
//!
//! The rest is provider-independent: [`remote::RemoteTarget`] runs the datastore's
//! backup pipeline against the server ("ask first, then send"), and [`runtime`] is
//! the agent's loop (enroll, inventory, long-poll, run jobs, report progress).

pub mod fetch;
pub mod files;
pub mod original;
pub mod provider;
pub mod qemu;
mod readahead;
pub mod recover;
pub mod remote;
pub mod runtime;
pub mod seed;

pub use files::FilesProvider;
pub use provider::{Provider, View};
pub use qemu::{ListedVm, QemuOptions, QemuProvider};
pub use remote::{RemoteTarget, Transport};
pub use runtime::{AgentOptions, default_threads, enroll, run};

use std::path::PathBuf;

/// Everything that can go wrong in the agent. [`Error::kind`] is the stable kind sent
/// to the server with a failed job (it raises alerts by kind).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A disk the VM should have is not there.
    #[error("VM {vm}: disk {disk} is missing{detail}")]
    DiskMissing {
        vm: String,
        disk: String,
        /// Extra detail, starting with `: ` when not empty.
        detail: String,
    },
    /// A disk changed size since the previous recovery point.
    #[error(
        "VM {vm}: disk {disk} changed size from {from} to {to} bytes; the replica is inconsistent and needs a consistency check"
    )]
    DiskResized {
        vm: String,
        disk: String,
        from: u64,
        to: u64,
    },
    /// No provider knows the VM.
    #[error("VM {0} is not on this host (no provider lists it)")]
    VmMissing(String),
    /// The operating system refused an operation on a file.
    #[error("{}: {op}: {err}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        err: std::io::Error,
    },
    /// A disk image cannot be read (damaged, unsupported, parent missing).
    #[error("VM {vm}: {err}")]
    Disk { vm: String, err: vdisk::Error },
    /// A configuration file (`vm.toml`) is unusable.
    #[error("{}: {msg}", path.display())]
    Config { path: PathBuf, msg: String },
    /// The backup pipeline failed.
    #[error(transparent)]
    Backup(datastore::Error),
    /// A call to the server failed.
    #[error(transparent)]
    Client(#[from] client::Error),
    /// The server answered something this agent cannot use.
    #[error("server: {0}")]
    Server(String),
    /// The agent's identity (key, certificate) is unusable or missing.
    #[error(transparent)]
    Identity(#[from] pki::Error),
    /// The server no longer accepts this agent.
    #[error("this agent's certificate was revoked or is unknown to the server")]
    Revoked,
    /// The job was cancelled (by an operator, or because the agent is stopping).
    #[error("cancelled: {0}")]
    Cancelled(String),
    /// The hypervisor (QMP, the guest agent, its NBD export) refused or failed.
    #[error("VM {vm}: {msg}")]
    Hypervisor { vm: String, msg: String },
    /// A caller asked for something impossible.
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    /// The stable kind of the error, for [`protocol::Failure::kind`].
    pub fn kind(&self) -> &'static str {
        match self {
            Error::DiskMissing { .. } => "disk-missing",
            Error::DiskResized { .. } => "disk-resized",
            Error::VmMissing(_) => "vm-missing",
            Error::Io { .. } | Error::Disk { .. } => "io",
            Error::Backup(datastore::Error::Disk(_)) => "io",
            Error::Backup(_) => "backup",
            Error::Config { .. } => "config",
            Error::Hypervisor { .. } => "hypervisor",
            Error::Client(_) | Error::Server(_) => "server",
            Error::Identity(_) | Error::Revoked => "identity",
            Error::Cancelled(_) => "cancelled",
            Error::Invalid(_) => "invalid",
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, op: &'static str, err: std::io::Error) -> Error {
        Error::Io {
            path: path.into(),
            op,
            err,
        }
    }
}

/// Writes `data` to `path` durably: a temporary name, fsync, rename, fsync the folder.
pub(crate) fn write_durably(path: &std::path::Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(parent) = path.parent() {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
