//! The interface between the agent and a hypervisor: see the crate documentation.

use crate::Result;
use datastore::DiskInput;
use protocol::{Consistency, JobKind, Manifest, Note, VmInfo};

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
    fn snapshot(
        &self,
        vm: &str,
        kind: JobKind,
        base: Option<&Manifest>,
    ) -> Result<Box<dyn Snapshot>>;

    /// The files of a VM's disks (`(disk name, path)`, recovery-point order), for a
    /// recovery over the original instance. Only VMs at rest can be written in place.
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
pub trait Snapshot: Send {
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

    /// Releases the view. `ok` false = the backup failed or was cancelled: a tracking
    /// provider then merges its change map back, so the next backup loses nothing.
    fn release(self: Box<Self>, ok: bool) -> Result<()>;
}
