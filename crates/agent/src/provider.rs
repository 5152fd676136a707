//! The interface between the agent and a hypervisor: see the crate documentation.

use crate::Result;
use datastore::DiskInput;
use protocol::{Consistency, JobKind, Manifest, Note, VmInfo};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

/// One kind of VM source on this host (`files`, `qemu`, `hyperv`). Shared by the job
/// threads, so it must be `Sync`: state (connections, change maps) lives behind locks.
pub trait Provider: Send + Sync {
    /// The provider's name, as in [`VmInfo::provider`].
    fn name(&self) -> &'static str;

    /// The VMs on this host now.
    fn inventory(&self) -> Result<Vec<VmInfo>>;

    /// Takes a consistent point-in-time view of one VM's disks.
    ///
    /// `base` is the previous recovery point of the VM (to decide changed ranges and to
    /// detect a resize). `kind`: [`JobKind::Sync`] may use change tracking;
    /// `ExpressFull`, `ConsistencyCheck` and `InitialReplica` read everything and
    /// accept the disks as they are now.
    fn open_view(&self, vm: &str, kind: JobKind, base: Option<&Manifest>) -> Result<Box<dyn View>>;

    /// The VM's original instance, for a recovery over it ([`crate::original`]): its
    /// disk files, and how to stop and start it. The default serves VMs at rest
    /// through [`Provider::disk_files`]; a provider of running VMs overrides it.
    fn instance(&self, vm: &str) -> Result<Box<dyn Instance + '_>> {
        let files = self.disk_files(vm)?;
        Ok(Box::new(AtRest(
            files
                .into_iter()
                .map(|(name, path)| OriginalDisk {
                    name,
                    path,
                    format: None,
                })
                .collect(),
        )))
    }

    /// The files of a VM's disks (`(disk name, path)`, recovery-point order), for a
    /// recovery over the original instance of a VM at rest.
    fn disk_files(&self, vm: &str) -> Result<Vec<(String, std::path::PathBuf)>> {
        let kind = match self.name() {
            "qemu" => "running QEMU",
            "hyperv" => "Hyper-V",
            other => other,
        };
        Err(crate::Error::Invalid(format!(
            "recovery to the original instance of a {kind} VM ({vm}) is not supported yet; use --alternate"
        )))
    }
}

/// A point-in-time view of one VM's disks, held while the backup reads it.
pub trait View: Send {
    /// How consistent the view is.
    fn consistency(&self) -> Consistency;

    /// The disks as they were at the view's moment, in recovery-point order. `changed`
    /// holds the ranges changed since the base when change tracking knows them (then
    /// disk `i` must be disk `i` of the base, same size); `None` = read everything.
    fn disks(&self) -> Vec<DiskInput<'_>>;

    /// What the job log (and, for some kinds, an alert) should say about the view:
    /// how long the guest was held, change tracking that could not be trusted.
    fn notes(&self) -> Vec<Note> {
        Vec::new()
    }

    /// The backup pipeline is about to read the disks in order (after the page-file
    /// search's scattered reads): a provider may serve reads from a read-ahead from
    /// now on, waiting for it no longer than its own deadline and not past `cancel`.
    fn start_reading(&self, _cancel: &Arc<AtomicBool>) {}

    /// Releases the view. `ok` false = the backup failed or was cancelled: a tracking
    /// provider then merges its change map back, so the next backup loses nothing.
    fn release(self: Box<Self>, ok: bool) -> Result<()>;
}

/// One disk file of a VM's original instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginalDisk {
    /// The disk's name, as recovery points record it.
    pub name: String,
    /// The image file (absolute).
    pub path: std::path::PathBuf,
    /// The format the hypervisor opens it as, when it says (`qcow2`, `raw`): a
    /// recovery point of another format cannot go there.
    pub format: Option<String>,
}

/// A VM's original instance during a recovery over it (see [`crate::original`]).
pub trait Instance {
    /// The VM's disk files, in recovery-point order.
    fn disk_files(&mut self) -> Result<Vec<OriginalDisk>>;

    /// Whether the VM runs now, holding its disk files open: it must be stopped
    /// before they are replaced.
    fn running(&mut self) -> Result<bool> {
        Ok(false)
    }

    /// Stops the VM and waits (bounded) until it has released its disk files,
    /// keeping what [`Instance::start`] needs. Returns how, for the job log.
    fn stop(&mut self) -> Result<String> {
        Err(crate::Error::Invalid("this VM cannot be stopped".into()))
    }

    /// The disk files are about to be replaced: forget whatever described the old
    /// ones (change tracking), so the next backup reads everything.
    fn forget_tracking(&mut self) -> Result<()> {
        Ok(())
    }

    /// Starts the VM again as it was started, and waits (bounded) until it answers.
    /// Returns what happened, for the job log.
    fn start(&mut self) -> Result<String> {
        Err(crate::Error::Invalid("this VM cannot be started".into()))
    }
}

/// A VM at rest: its files are written in place; there is nothing to stop or start.
struct AtRest(Vec<OriginalDisk>);

impl Instance for AtRest {
    fn disk_files(&mut self) -> Result<Vec<OriginalDisk>> {
        Ok(self.0.clone())
    }
}
