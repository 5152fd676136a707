//! The API types shared by the server, the protection agent and the admin CLI: every
//! request and response body of the HTTPS API (`/api/v1`), and nothing else. Server and
//! clients share types, never logic.
//!
//! Conventions: JSON bodies, snake_case fields, times as UTC RFC 3339 strings plus Unix
//! seconds where clients compute with them. Errors are [`ApiError`] bodies with a 4xx or
//! 5xx status. Bulk data (block ids, framed blobs) travels as `application/octet-stream`.

use serde::{Deserialize, Serialize};

/// Gives an enum whose values travel as fixed strings `as_str`, `parse`, `ALL` (in the
/// order the CLI lists them) and, with the `clap` feature, `clap::ValueEnum`, so the
/// CLI accepts exactly the strings the API carries. The strings must be serde's names
/// of the variants (each use has a test that checks it).
macro_rules! string_enum {
    ($name:ident { $($variant:ident => $s:literal),+ $(,)? }) => {
        impl $name {
            /// Every value, in the order the CLI lists them.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $s),+
                }
            }

            pub fn parse(s: &str) -> Option<$name> {
                match s {
                    $($s => Some($name::$variant),)+
                    _ => None,
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        #[cfg(feature = "clap")]
        impl clap::ValueEnum for $name {
            fn value_variants<'a>() -> &'a [Self] {
                Self::ALL
            }

            fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
                Some(clap::builder::PossibleValue::new(self.as_str()))
            }
        }
    };
}

mod validate;
pub use validate::*;

mod storage;
pub use storage::*;

mod users;
pub use users::*;

mod manifest;
pub use manifest::{Consistency, DiskRecord, Manifest, Source, Stats};

/// Path prefix of every API route.
pub const API: &str = "/api/v1";

/// Largest JSON request body the server accepts.
pub const MAX_JSON_BODY: usize = 1 << 20;
/// Largest blob batch the server accepts in one request.
pub const MAX_BLOB_BATCH: usize = 32 << 20;
/// Largest number of ids in one `missing` request.
pub const MAX_MISSING_IDS: usize = 1 << 16;

/// The most characters a job-log line, a job's error or a provider's note keeps
/// (agents send them; the catalog stores them).
pub const MAX_MESSAGE_CHARS: usize = 2000;
/// The most characters a job's step ("reading disk 0 (vda)") keeps.
pub const MAX_STEP_CHARS: usize = 200;

/// `s` cut to at most `max_chars` characters, on a character boundary and ending
/// with a marker that says how many bytes were cut (`… (N bytes cut)`); `s` itself
/// when it is short enough. Capping a capped string changes nothing.
pub fn cap_chars(s: &str, max_chars: usize) -> std::borrow::Cow<'_, str> {
    if s.char_indices().nth(max_chars).is_none() {
        return std::borrow::Cow::Borrowed(s);
    }
    // Room for the marker with as many digits as the whole length has.
    let reserve = format!("… ({} bytes cut)", s.len()).chars().count();
    let keep = max_chars.saturating_sub(reserve);
    let at = s.char_indices().nth(keep).map_or(s.len(), |(i, _)| i);
    std::borrow::Cow::Owned(format!(
        "{}… ({} bytes cut)",
        &s[..at],
        s.len().saturating_sub(at)
    ))
}

#[cfg(test)]
mod enum_tests {
    use super::*;

    #[test]
    fn a_data_source_name_travels_as_host_slash_vm() {
        let n = DataSourceName::parse("hv01/SQL Server (prod)").unwrap();
        assert_eq!((n.host(), n.vm()), ("hv01", "SQL Server (prod)"));
        assert_eq!(n, "hv01/SQL Server (prod)");
        assert_eq!(
            DataSourceName::new("hv01", "SQL Server (prod)"),
            Some(n.clone())
        );
        let json = serde_json::to_string(&n).unwrap();
        assert_eq!(json, "\"hv01/SQL Server (prod)\"");
        assert_eq!(serde_json::from_str::<DataSourceName>(&json).unwrap(), n);
        for bad in ["", "hv01", "/vm", "hv01/", "a/b/c"] {
            assert_eq!(DataSourceName::parse(bad), None, "{bad:?}");
            let e = serde_json::from_str::<DataSourceName>(&format!("{bad:?}")).unwrap_err();
            assert!(e.to_string().contains("is not a data source name"), "{e}");
        }
        assert_eq!(DataSourceName::new("a/b", "c"), None);
        assert_eq!(DataSourceName::new("a", "b/c"), None);
    }

    /// Each string enum's `as_str` is serde's name of the variant, and `parse` inverts it.
    fn travels_as_its_names<T>(all: &[T], len: usize)
    where
        T: Copy + PartialEq + std::fmt::Debug + Serialize + serde::de::DeserializeOwned,
        T: std::fmt::Display,
    {
        assert_eq!(all.len(), len);
        for &v in all {
            let json = serde_json::to_string(&v).unwrap();
            assert_eq!(json, format!("\"{v}\""));
            assert_eq!(serde_json::from_str::<T>(&json).unwrap(), v);
        }
        assert!(serde_json::from_str::<T>("\"bogus\"").is_err());
    }

    #[test]
    fn string_enums_travel_as_their_names() {
        travels_as_its_names(JobKind::ALL, 10);
        travels_as_its_names(JobState::ALL, 5);
        travels_as_its_names(Severity::ALL, 4);
        travels_as_its_names(DiskFormat::ALL, 4);
        travels_as_its_names(ProviderKind::ALL, 3);
        travels_as_its_names(ReplicaState::ALL, 3);
        travels_as_its_names(EntryKind::ALL, 4);
        travels_as_its_names(StorageKind::ALL, 3);
        assert_eq!(JobKind::parse("express-full"), Some(JobKind::ExpressFull));
        assert_eq!(ReplicaState::parse("Bad State"), None);
        assert_eq!(DiskFormat::parse("vmdk"), None);
    }
}

#[cfg(test)]
mod cap_tests {
    use super::*;

    #[test]
    fn cap_chars_cuts_on_a_char_boundary_and_says_how_much() {
        assert_eq!(cap_chars("short", 10), "short");
        assert_eq!(cap_chars("exactly10!", 10), "exactly10!");
        // "… (N bytes cut)" takes 16 characters here: 4 are left of the text.
        let s = "abcdefghijklmnopqrstuvwxyz";
        assert_eq!(cap_chars(s, 20), "abcd… (22 bytes cut)");
        // Multi-byte characters are counted as characters and never split.
        let e = "é".repeat(30);
        assert_eq!(cap_chars(&e, 20), "éééé… (52 bytes cut)");
        assert_eq!(
            cap_chars("a😀bcdefghijklmnopqrstu", 18),
            "a😀… (20 bytes cut)"
        );
        // A limit shorter than the marker keeps the marker alone.
        assert_eq!(cap_chars("xyz", 2), "… (3 bytes cut)");
        assert_eq!(cap_chars("", 0), "");
        let big = "y".repeat(1 << 20);
        let c = cap_chars(&big, MAX_MESSAGE_CHARS);
        assert_eq!(c.chars().count(), MAX_MESSAGE_CHARS);
        let kept = MAX_MESSAGE_CHARS - "… (1048576 bytes cut)".chars().count();
        assert_eq!(
            c,
            format!("{}… ({} bytes cut)", "y".repeat(kept), (1 << 20) - kept)
        );
        // Capping again changes nothing.
        assert_eq!(cap_chars(&c, MAX_MESSAGE_CHARS), c);
    }
}

/// The body of every error response.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
}

/// `GET /api/v1/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerStatus {
    pub version: String,
    pub server_time: String,
    pub datastore: String,
    pub datastore_encrypted: bool,
    pub ca_fingerprint: String,
    pub agents: u64,
    pub datasources: u64,
    pub protection_groups: u64,
    pub recovery_points: u64,
    pub active_alerts: u64,
    pub running_jobs: u64,
    /// How long the scheduler's last pass over every schedule took, milliseconds.
    #[serde(default)]
    pub scheduler_tick_ms: Option<f64>,
    /// Notifications (e-mails, webhook POSTs) sent, given up on after retries, and
    /// dropped because the queue was full, since the server started.
    #[serde(default)]
    pub notifications_sent: u64,
    #[serde(default)]
    pub notifications_failed: u64,
    #[serde(default)]
    pub notifications_dropped: u64,
}

// ---------------------------------------------------------------------------------
// Enrollment and agents

/// `POST /api/v1/agent-tokens` (admin).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentTokenRequest {
    pub host: String,
    /// Validity in minutes (default 60).
    #[serde(default)]
    pub valid_minutes: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentTokenResponse {
    /// `hf1.<ca-fingerprint-hex>.<secret>`: one use, pins the server's CA.
    pub token: String,
    pub host: String,
    pub expires: String,
}

/// `POST /api/v1/enroll` (no authentication but the token).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnrollRequest {
    pub token: String,
    /// The agent's public key (SubjectPublicKeyInfo, PEM); the server signs a client
    /// certificate for it. The private key never leaves the host.
    pub public_key_pem: String,
    /// Agent software version.
    pub version: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnrollResponse {
    pub host: String,
    /// The client certificate (PEM), signed by the server's CA.
    pub certificate_pem: String,
    pub ca_pem: String,
}

/// `GET /api/v1/agents` (admin).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentInfo {
    pub host: String,
    /// SHA-256 of the client certificate (DER), hex.
    pub cert_fingerprint: String,
    pub enrolled: String,
    pub last_seen: Option<String>,
    pub revoked: bool,
    pub version: Option<String>,
    pub connected: bool,
}

// ---------------------------------------------------------------------------------
// Inventory and data sources

/// A disk image format Holdfast writes (`recover --alternate --format`, `image
/// convert`, `restore`). A VM's reported disk ([`VmDisk::format`]) stays a string: QEMU
/// reports whatever block driver it runs (`vmdk`, `vdi`, ...), and those back up too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    Vhdx,
    Vhd,
    Qcow2,
    Raw,
}

string_enum!(DiskFormat {
    Vhdx => "vhdx",
    Vhd => "vhd",
    Qcow2 => "qcow2",
    Raw => "raw",
});

/// The provider on an agent that found a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// VM folders on disk (`--files-root`).
    Files,
    /// Running QEMU VMs through QMP.
    Qemu,
    /// Hyper-V (not yet shipped: no agent reports it).
    Hyperv,
}

string_enum!(ProviderKind {
    Files => "files",
    Qemu => "qemu",
    Hyperv => "hyperv",
});

/// The state of a data source's replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplicaState {
    Ok,
    /// The next backup must be a consistency check.
    Inconsistent,
    /// Not in a protection group, or no replica yet.
    Unprotected,
}

string_enum!(ReplicaState {
    Ok => "ok",
    Inconsistent => "inconsistent",
    Unprotected => "unprotected",
});

/// One disk of a VM as the agent sees it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmDisk {
    /// File name (or device name).
    pub name: String,
    /// `vhdx`, `vhd`, `qcow2`, `raw` from the files provider; QEMU's block driver name
    /// from the QEMU provider (see [`DiskFormat`]).
    pub format: String,
    pub virtual_size: u64,
}

/// One VM found by a provider.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmInfo {
    /// Name on its host (unique per host).
    pub name: String,
    /// The hypervisor's id for the VM (Hyper-V GUID, QEMU UUID, `vm.toml` id) when
    /// known: it is how a VM keeps its data source when it moves between hosts.
    pub vm_id: Option<String>,
    /// Provider that found it.
    pub provider: ProviderKind,
    pub disks: Vec<VmDisk>,
    /// Whether the VM runs (`None` for VMs at rest).
    pub running: Option<bool>,
}

/// `POST /api/v1/agent/inventory` (agent).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Inventory {
    pub vms: Vec<VmInfo>,
}

/// `GET /api/v1/datasources` (admin).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DataSourceInfo {
    /// Stable id of the data source (kept across hosts).
    pub id: String,
    pub name: DataSourceName,
    pub host: String,
    pub vm: String,
    pub vm_id: Option<String>,
    pub provider: ProviderKind,
    pub disks: Vec<VmDisk>,
    /// Sum of the disks' virtual sizes.
    pub size: u64,
    pub protection_group: Option<String>,
    /// Whether the agent still reports it.
    pub present: bool,
    pub last_recovery_point: Option<String>,
    pub replica_state: ReplicaState,
}

// ---------------------------------------------------------------------------------
// Protection groups

/// The synchronization frequency of a policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncFrequency {
    /// Minutes: 15, 30, 60, 120, 240, 360, 720 or 1440.
    Minutes(u32),
    /// An express full backup just before each scheduled recovery point.
    JustBeforeRecoveryPoint,
}

/// The minute values a synchronization frequency may take (as MABS offers).
pub const SYNC_MINUTES: [u32; 8] = [15, 30, 60, 120, 240, 360, 720, 1440];

/// When the initial replica is made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplicaCreation {
    Now,
    /// At this UTC time (RFC 3339).
    At(String),
    /// Offline seeding: `holdfast replica export` / `replica import`.
    Manual,
}

/// A protection group's policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    /// Short-term retention range, days (1-448).
    pub retention_days: u32,
    pub sync_frequency: SyncFrequency,
    /// Recovery point times of day, `HH:MM` UTC, sorted.
    pub recovery_point_times: Vec<String>,
    /// Express full backup times of day, `HH:MM` UTC (may be empty).
    #[serde(default)]
    pub express_full_times: Vec<String>,
    /// Run a consistency check automatically when a replica becomes inconsistent.
    #[serde(default = "yes")]
    pub consistency_check_when_inconsistent: bool,
    /// Daily consistency check at this time, `HH:MM` UTC.
    #[serde(default)]
    pub consistency_check_daily: Option<String>,
    pub replica_creation: ReplicaCreation,
    /// Expected daily churn of the members, percent (for the disk allocation review).
    #[serde(default = "default_churn")]
    pub churn_percent: f64,
    /// Online protection: a second copy on a storage target (none = off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub online: Option<OnlinePolicy>,
}

impl Policy {
    /// A policy with one recovery point a day at `time` (`HH:MM` UTC) and the serde
    /// defaults for the rest: no express fulls, a consistency check when a replica turns
    /// inconsistent, no daily check, the first replica now, 5% churn.
    pub fn daily_at(retention_days: u32, sync_frequency: SyncFrequency, time: &str) -> Policy {
        Policy {
            retention_days,
            sync_frequency,
            recovery_point_times: vec![time.to_string()],
            express_full_times: Vec::new(),
            consistency_check_when_inconsistent: yes(),
            consistency_check_daily: None,
            replica_creation: ReplicaCreation::Now,
            churn_percent: default_churn(),
            online: None,
        }
    }
}

fn yes() -> bool {
    true
}

fn default_churn() -> f64 {
    5.0
}

/// `POST /api/v1/protection-groups` (admin).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateGroup {
    pub name: String,
    /// `HOST/VM`.
    pub members: Vec<String>,
    pub policy: Policy,
}

/// `PATCH /api/v1/protection-groups/{name}` (admin): fields left out stay as they are.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ModifyGroup {
    #[serde(default)]
    pub add_members: Vec<String>,
    #[serde(default)]
    pub remove_members: Vec<String>,
    #[serde(default)]
    pub policy: Option<Policy>,
}

/// The disk allocation review of a group (MABS's wizard page).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AllocationReview {
    /// Sum of the members' virtual disk sizes.
    pub data_size: u64,
    /// What the policy will need: data_size + data_size x churn x retention days.
    pub required: u64,
    /// What the datastore's file system has free, and in all.
    pub datastore_free: u64,
    pub datastore_total: u64,
    pub fits: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupInfo {
    pub name: String,
    pub members: Vec<String>,
    pub policy: Policy,
    pub created: String,
    pub allocation: AllocationReview,
}

/// `DELETE /api/v1/protection-groups/{name}?delete_data=BOOL` (admin).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeleteGroupResponse {
    pub name: String,
    pub recovery_points_deleted: u64,
}

// ---------------------------------------------------------------------------------
// Recovery points

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecoveryPointInfo {
    pub id: String,
    /// The source's name at the time of the backup, from its manifest: `HOST/VM` for
    /// points made through a server, but any name for points a local `holdfast backup
    /// --source NAME` made, so a string (not a [`DataSourceName`]).
    pub vm: String,
    pub datasource_id: String,
    pub created: String,
    pub created_unix: i64,
    pub consistency: Consistency,
    pub base: Option<String>,
    pub disks: Vec<VmDisk>,
    pub stats: Stats,
    /// The job that made it, when made through the server.
    pub job_id: Option<i64>,
    /// What the server found when it opened each volume of the stored point (after
    /// the backup); `None` until checked.
    #[serde(default)]
    pub volumes: Option<Vec<VolumeCheck>>,
    /// Where the point lives: `disk` (the server's datastore) and `online:NAME` for
    /// each storage target holding a copy.
    #[serde(default)]
    pub locations: Vec<String>,
}

/// One volume of a recovery point, opened from the datastore after the backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeCheck {
    pub disk: u32,
    /// Partition number (1-based); 0 = the whole disk (no partition table).
    pub partition: u32,
    /// File system by signature (`ntfs`, `ext4`, `fat32`, `swap`, `bitlocker`,
    /// `unknown`...).
    pub fs: String,
    /// Whether its root folder could be listed.
    pub readable: bool,
    /// Entries in the root folder.
    pub root_entries: u64,
    /// Why it is not readable.
    pub problem: Option<String>,
}

// ---------------------------------------------------------------------------------
// Jobs

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobKind {
    /// Incremental synchronization + recovery point (changed blocks only).
    Sync,
    /// Express full: every block read, compared by checksum (no change tracking).
    ExpressFull,
    /// Consistency check: every block read and compared; repairs the replica.
    ConsistencyCheck,
    /// The first copy of a data source.
    InitialReplica,
    Verify,
    Prune,
    Gc,
    /// Whole-VM recovery from a recovery point, written by an agent.
    Recovery,
    /// Copies a data source's newest recovery point to its group's storage target,
    /// then applies the online retention there.
    OnlineCopy,
    /// Verifies the online copy on a storage target (all or a sample).
    OnlineVerify,
}

string_enum!(JobKind {
    Sync => "sync",
    ExpressFull => "express-full",
    ConsistencyCheck => "consistency-check",
    InitialReplica => "initial-replica",
    Verify => "verify",
    Prune => "prune",
    Gc => "gc",
    Recovery => "recovery",
    OnlineCopy => "online-copy",
    OnlineVerify => "online-verify",
});

impl JobKind {
    /// Jobs an agent runs (the others run on the server).
    pub fn on_agent(self) -> bool {
        matches!(
            self,
            JobKind::Sync
                | JobKind::ExpressFull
                | JobKind::ConsistencyCheck
                | JobKind::InitialReplica
                | JobKind::Recovery
        )
    }

    /// Backups: jobs that make a recovery point (and whose outcome is the replica's).
    pub fn is_backup(self) -> bool {
        self.on_agent() && self != JobKind::Recovery
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

string_enum!(JobState {
    Queued => "queued",
    Running => "running",
    Succeeded => "succeeded",
    Failed => "failed",
    Cancelled => "cancelled",
});

impl JobState {
    pub fn finished(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobInfo {
    pub id: i64,
    pub kind: JobKind,
    pub state: JobState,
    /// `HOST/VM` for data-source jobs.
    pub vm: Option<DataSourceName>,
    pub datasource_id: Option<String>,
    /// `schedule`, `admin`, `rerun of N`.
    pub trigger: String,
    pub created: String,
    pub started: Option<String>,
    pub finished: Option<String>,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub bytes_read: u64,
    pub bytes_sent: u64,
    pub recovery_point: Option<String>,
    pub error: Option<String>,
    /// Attempt number (1 for the first run).
    pub attempt: u32,
    /// Earliest time a queued job may start (reruns wait).
    pub not_before: Option<String>,
    /// Bytes per second since the job started (to now, or to its end): of
    /// `bytes_fetched` for a recovery (what `--throttle` limits), else of `bytes_done`.
    #[serde(default)]
    pub rate_bytes_per_sec: Option<u64>,
    /// Seconds left at the pace so far (running jobs with a known total).
    #[serde(default)]
    pub eta_seconds: Option<u64>,
    /// Recovery jobs: bytes fetched from the datastore (framed, compressed blocks and
    /// index pieces; holes are never fetched). The same as `bytes_read`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_fetched: Option<u64>,
    /// Recovery jobs: bytes of disk written, holes (zero ranges, left unallocated)
    /// included. The same as `bytes_done`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_written: Option<u64>,
    /// Recovery jobs: `bytes_written` per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_rate_bytes_per_sec: Option<u64>,
    #[serde(default)]
    pub log: Vec<JobLogLine>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobLogLine {
    pub time: String,
    pub message: String,
}

/// `POST /api/v1/datasources/{host}/{vm}/backup` (admin).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BackupNowRequest {
    #[serde(default)]
    pub express_full: bool,
    /// E-mail addresses told when the job ends (needs `[smtp]` on the server).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notify: Vec<String>,
}

// ---------------------------------------------------------------------------------
// Alerts

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Info,
    Warning,
    Error,
    /// Someone may be attacking the server (a VM id claimed by another host): act now.
    Critical,
}

// Lowercase, as in JSON and `[notify] min_severity`.
string_enum!(Severity {
    Info => "info",
    Warning => "warning",
    Error => "error",
    Critical => "critical",
});

impl Severity {
    /// Order for `min_severity` filters: info < warning < error < critical.
    pub fn rank(self) -> u8 {
        match self {
            Severity::Info => 0,
            Severity::Warning => 1,
            Severity::Error => 2,
            Severity::Critical => 3,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AlertInfo {
    pub id: i64,
    pub severity: Severity,
    /// What it is about: `HOST/VM`, `datastore`, `agent HOST`, `group NAME`.
    pub subject: String,
    /// Stable kind: `backup-failed`, `disk-missing`, `disk-resized`, `space`, ...
    pub kind: String,
    pub message: String,
    pub raised: String,
    pub last_seen: String,
    pub resolved: Option<String>,
    pub occurrences: u64,
    /// Why it was resolved: an administrator's note, or what resolved it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// `POST /api/v1/alerts/{id}/resolve` (admin).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ResolveAlert {
    /// At most [`MAX_NOTE_CHARS`] characters, no control characters.
    #[serde(default)]
    pub note: Option<String>,
}

/// Longest note an administrator may attach to a resolved alert.
pub const MAX_NOTE_CHARS: usize = 2000;

impl ResolveAlert {
    pub fn validate(&self) -> Result<(), String> {
        if let Some(n) = &self.note {
            if n.chars().count() > MAX_NOTE_CHARS {
                return Err(format!("note: longer than {MAX_NOTE_CHARS} characters"));
            }
            if n.chars().any(char::is_control) {
                return Err("note: control characters (newlines, tabs...) are not allowed".into());
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------
// Clusters and data-source moves

/// A set of hosts VMs may move between on their own (live migration): a data source
/// follows its VM id from one member to another once the old host stops reporting it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterInfo {
    pub name: String,
    pub hosts: Vec<String>,
    pub created: String,
}

/// `POST /api/v1/clusters` (admin).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateCluster {
    pub name: String,
    pub hosts: Vec<String>,
}

/// `POST /api/v1/clusters/{name}/hosts` (admin): hosts to add.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterHosts {
    pub hosts: Vec<String>,
}

/// `POST /api/v1/datasources/{host}/{vm}/move` (admin).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MoveDataSource {
    /// The host that now reports the VM.
    pub to: String,
}

// ---------------------------------------------------------------------------------
// Agent <-> server: jobs and data

/// `POST /api/v1/agent/poll` response: the next job for this agent, or none after the
/// long-poll timeout.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PollResponse {
    pub job: Option<AgentJob>,
}

/// A backup job handed to an agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentJob {
    pub job_id: i64,
    pub kind: JobKind,
    /// Name of the VM on the agent's host.
    pub vm: String,
    pub datasource_id: String,
    /// What to recover and where, for [`JobKind::Recovery`] jobs.
    #[serde(default)]
    pub recovery: Option<RecoveryPlan>,
}

// ---------------------------------------------------------------------------------
// Whole-VM recovery

/// Where a recovery writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "kebab-case")]
pub enum RecoveryTarget {
    /// Over the VM's own disk files, each replaced only once its restored copy is
    /// complete. A running VM (`qemu` provider) is refused unless `stop_vm`: the agent
    /// then writes the copies while the VM runs, stops it, swaps the files in, and starts
    /// it again when `start` is set.
    Original {
        #[serde(default)]
        stop_vm: bool,
        #[serde(default)]
        start: bool,
    },
    /// A new VM folder `DIR/<vm name>/` on `host`, with a `vm.toml`; disks in `format`
    /// (`vhdx`, `vhd`, `qcow2`, `raw`; default: each disk's original format).
    Alternate {
        host: String,
        dir: String,
        #[serde(default)]
        format: Option<String>,
    },
    /// Into a new folder `DIR/holdfast_<YYYYMMDD-HHMMSS>/` on `host`: the disk files
    /// (all, or disk `disk`) in their original format; with `partition`, that volume
    /// of `disk` (1-based, as in /dev/sda1; 0 = a disk without a partition table) as a
    /// raw image; with `items` as well, those files and folders of its file system
    /// (paths from its root, folders recursively).
    CopyTo {
        host: String,
        dir: String,
        #[serde(default)]
        disk: Option<u32>,
        #[serde(default)]
        partition: Option<u32>,
        #[serde(default)]
        items: Vec<String>,
    },
}

/// `POST /api/v1/recoveries` (admin): answered with the queued job ([`JobInfo`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecoveryRequest {
    /// `HOST/VM` of the protected VM.
    pub vm: String,
    /// Recovery point id or `latest` (default: latest, unless `at` is given).
    #[serde(default)]
    pub point: Option<String>,
    /// The latest recovery point at or before this UTC time (`YYYY-MM-DD HH:MM` or
    /// RFC 3339).
    #[serde(default)]
    pub at: Option<String>,
    pub target: RecoveryTarget,
    /// Bytes fetched from the server per second, KiB (applied on the agent). Without
    /// it the server's `[recovery]` work-hours schedule applies, if set.
    #[serde(default)]
    pub throttle_kbps: Option<u64>,
    /// E-mail addresses told when the recovery ends (success or failure).
    #[serde(default)]
    pub notify: Vec<String>,
    /// `disk` (default) or `online:NAME`: recover from the copy on a storage target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
}

/// A bandwidth limit for recovery transfers by time of week (UTC): `work_kbps` on
/// `work_days` (1 = Monday ... 7 = Sunday) from `work_start` to `work_end`
/// (`HH:MM`), `other_kbps` the rest of the time; 0 = no limit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThrottleSchedule {
    pub work_kbps: u64,
    pub other_kbps: u64,
    pub work_days: Vec<u8>,
    pub work_start: String,
    pub work_end: String,
}

impl ThrottleSchedule {
    /// The limit in KiB/s at `unix` (UTC seconds), `None` for no limit.
    pub fn kbps_at(&self, unix: i64) -> Option<u64> {
        let days = unix.div_euclid(86_400);
        // 1970-01-01 was a Thursday (ISO weekday 4).
        let weekday = ((days + 3).rem_euclid(7) + 1) as u8;
        let minute = (unix.rem_euclid(86_400) / 60) as u32;
        let start = parse_time_of_day(&self.work_start).unwrap_or(0);
        let end = parse_time_of_day(&self.work_end).unwrap_or(0);
        let in_hours = if start <= end {
            (start..end).contains(&minute)
        } else {
            minute >= start || minute < end
        };
        let work = self.work_days.contains(&weekday) && in_hours;
        Some(if work {
            self.work_kbps
        } else {
            self.other_kbps
        })
        .filter(|&k| k > 0)
    }
}

/// `POST /api/v1/agent/jobs/{id}/recovered` (agent): a recovery job wrote everything.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecoveryDone {
    /// The files written (full paths on the agent's host).
    pub files: Vec<String>,
    /// Bytes fetched from the server (framed blocks and index pieces).
    pub bytes_fetched: u64,
    /// Bytes of disk written, holes included (absent from older agents).
    #[serde(default)]
    pub bytes_written: Option<u64>,
    /// Milliseconds from the recovery's start to its last byte written (absent from
    /// older agents): the job log's rates are measured over it.
    #[serde(default)]
    pub elapsed_ms: Option<u64>,
    /// Lines for the job log (what an item copy copied, names it had to change).
    #[serde(default)]
    pub notes: Vec<String>,
}

/// Blob ids per `POST /agent/jobs/{id}/recovery-blobs` request (one round trip for up
/// to 4 MiB of 64 KiB blocks).
pub const RECOVERY_BATCH: usize = 64;

/// What an agent needs to run a recovery job (in [`AgentJob::recovery`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecoveryPlan {
    pub target: RecoveryTarget,
    /// The recovery point (its disks with their index piece ids).
    pub manifest: Manifest,
    pub block_size: u32,
    pub piece_blocks: u32,
    /// The datastore's master key (hex) when it is encrypted.
    #[serde(default)]
    pub master_key: Option<String>,
    #[serde(default)]
    pub throttle_kbps: Option<u64>,
    /// Used when `throttle_kbps` is not given.
    #[serde(default)]
    pub throttle_schedule: Option<ThrottleSchedule>,
}

/// `POST /api/v1/agent/jobs/{id}/start` response: what the agent needs to build blobs
/// exactly as the datastore would.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionStart {
    pub block_size: u32,
    pub piece_blocks: u32,
    pub zstd_level: i32,
    /// The datastore's master key (hex) when it is encrypted: blobs are compressed and
    /// encrypted on the agent, and ids are keyed hashes.
    pub master_key: Option<String>,
    /// The previous recovery point of the data source (for change-tracked backups).
    pub base: Option<Manifest>,
    /// Recovery-point source name to record (`HOST/VM`) and its stable id.
    pub source: Source,
    /// Per disk (recovery-point order), byte ranges to leave out and store as zeros
    /// (page file, swap), as set on the data source; missing = none.
    #[serde(default)]
    pub excluded: Vec<Vec<(u64, u64)>>,
}

/// `PUT|GET /api/v1/datasources/{host}/{vm}/exclusions` (admin): per disk, in
/// recovery-point order, `(offset, length)` ranges left out of backups and stored as
/// zeros. Sorted, non-empty and disjoint within a disk, whole sectors, outside the
/// partition tables ([`Exclusions::validate`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exclusions {
    pub disks: Vec<Vec<(u64, u64)>>,
}

/// `POST /api/v1/agent/jobs/{id}/progress`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobProgress {
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub bytes_read: u64,
    pub bytes_sent: u64,
    #[serde(default)]
    pub message: Option<String>,
    /// What the job is doing now ("taking the point-in-time view", "reading disk 0
    /// (vda)", ...): the watchdog names it when the job stalls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
}

/// The reply to progress: whether to go on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobProgressReply {
    pub cancel: bool,
}

/// `POST /api/v1/agent/jobs/{id}/commit`: the disks' indexes are complete; the server
/// checks every referenced block exists, then writes the recovery point.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Commit {
    pub consistency: Consistency,
    pub base: Option<String>,
    pub disks: Vec<DiskRecord>,
    pub stats: Stats,
    /// What the provider said about the view (logged with the job).
    #[serde(default)]
    pub notes: Vec<Note>,
}

/// A remark of a provider about a backup's view. Kind `info` is only logged; kind
/// `change-tracking-reset` (change tracking was not trusted, every block was read)
/// also raises an informational alert, resolved by the next backup that could use
/// change tracking.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Note {
    pub kind: String,
    pub message: String,
}

impl Note {
    /// A note that is only logged.
    pub fn info(message: impl Into<String>) -> Note {
        Note {
            kind: "info".into(),
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CommitResponse {
    pub recovery_point: String,
}

/// `POST /api/v1/agent/jobs/{id}/fail`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Failure {
    pub error: String,
    /// A stable kind for alerts: `disk-missing`, `disk-resized`, `vm-missing`, `io`.
    pub kind: String,
}

/// Splits `HOST/VM`; both parts non-empty, no further `/`.
pub fn split_vm(s: &str) -> Option<(&str, &str)> {
    let (h, v) = s.split_once('/')?;
    if h.is_empty() || v.is_empty() || v.contains('/') {
        return None;
    }
    Some((h, v))
}

/// A data source's name, `HOST/VM`: the VM's name on the host that reports it. It
/// travels as that one string (`"hv01/sql"`); [`host`](Self::host) and
/// [`vm`](Self::vm) are its parts, and it reads as the whole string where a `&str` is
/// wanted.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DataSourceName {
    full: String,
    /// Byte offset of the `/` between host and VM.
    slash: usize,
}

impl DataSourceName {
    /// `HOST/VM` as [`split_vm`] accepts it.
    pub fn parse(s: &str) -> Option<DataSourceName> {
        let (host, _) = split_vm(s)?;
        Some(DataSourceName {
            full: s.to_string(),
            slash: host.len(),
        })
    }

    /// The name of `vm` on `host`; `None` when either is empty or holds a `/`.
    pub fn new(host: &str, vm: &str) -> Option<DataSourceName> {
        if host.contains('/') {
            return None;
        }
        DataSourceName::parse(&format!("{host}/{vm}"))
    }

    pub fn host(&self) -> &str {
        &self.full[..self.slash]
    }

    pub fn vm(&self) -> &str {
        &self.full[self.slash + 1..]
    }

    pub fn as_str(&self) -> &str {
        &self.full
    }
}

impl std::ops::Deref for DataSourceName {
    type Target = str;
    fn deref(&self) -> &str {
        &self.full
    }
}

impl AsRef<str> for DataSourceName {
    fn as_ref(&self) -> &str {
        &self.full
    }
}

impl std::fmt::Display for DataSourceName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.full)
    }
}

impl PartialEq<str> for DataSourceName {
    fn eq(&self, other: &str) -> bool {
        self.full == other
    }
}

impl PartialEq<String> for DataSourceName {
    fn eq(&self, other: &String) -> bool {
        self.full == *other
    }
}

impl PartialEq<&str> for DataSourceName {
    fn eq(&self, other: &&str) -> bool {
        self.full == *other
    }
}

impl Serialize for DataSourceName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.full)
    }
}

impl<'de> Deserialize<'de> for DataSourceName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        DataSourceName::parse(&s).ok_or_else(|| {
            serde::de::Error::custom(format!("{s:?} is not a data source name (HOST/VM)"))
        })
    }
}

/// Parses `HH:MM` (24 h) into minutes after midnight.
pub fn parse_time_of_day(s: &str) -> Option<u32> {
    let (h, m) = s.split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    let h: u32 = h.parse().ok()?;
    let m: u32 = m.parse().ok()?;
    (h < 24 && m < 60).then_some(h * 60 + m)
}

impl Policy {
    /// Checks the ranges MABS allows; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=448).contains(&self.retention_days) {
            return Err(format!(
                "retention_days: {} is outside 1-448",
                self.retention_days
            ));
        }
        if let SyncFrequency::Minutes(m) = self.sync_frequency
            && !SYNC_MINUTES.contains(&m)
        {
            return Err(format!(
                "sync_frequency: {m} minutes is not one of 15, 30, 60, 120, 240, 360, 720, 1440 (or just-before-recovery-point)"
            ));
        }
        if self.recovery_point_times.is_empty() {
            return Err("recovery_point_times: at least one time of day is needed".into());
        }
        for (field, list) in [
            ("recovery_point_times", &self.recovery_point_times),
            ("express_full_times", &self.express_full_times),
        ] {
            for t in list {
                if parse_time_of_day(t).is_none() {
                    return Err(format!("{field}: {t:?} is not a time of day HH:MM"));
                }
            }
        }
        if let Some(t) = &self.consistency_check_daily
            && parse_time_of_day(t).is_none()
        {
            return Err(format!(
                "consistency_check_daily: {t:?} is not a time of day HH:MM"
            ));
        }
        if !(self.churn_percent.is_finite() && (0.0..=100.0).contains(&self.churn_percent)) {
            return Err(format!(
                "churn_percent: {} is outside 0-100",
                self.churn_percent
            ));
        }
        if let Some(o) = &self.online {
            o.validate()?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------
// Item-level recovery

/// One volume of a recovery point's disk (`GET /recovery-points/{id}/browse` without a
/// partition on a partitioned disk).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IlrVolume {
    /// Partition number (1-based, as in /dev/sda1); 0 = the whole disk (no table).
    pub number: u32,
    pub start: u64,
    pub size: u64,
    /// File system by signature: ntfs, ext4, fat32, xfs, bitlocker, swap, unknown...
    pub fs: String,
    /// Whether item-level recovery can browse it.
    pub supported: bool,
    pub partition_type: String,
    pub name: Option<String>,
}

/// What a file-system entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    /// Devices, sockets, FIFOs, reparse points Holdfast does not follow.
    Other,
}

string_enum!(EntryKind {
    File => "file",
    Dir => "dir",
    Symlink => "symlink",
    Other => "other",
});

/// One file-system entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IlrEntry {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: EntryKind,
    pub size: u64,
    /// Last modification (UTC, RFC 3339) and the same in Unix seconds.
    pub modified: Option<String>,
    pub modified_unix: Option<i64>,
    pub mode: Option<u32>,
    /// Inode / MFT record number: hard links share it.
    pub id: u64,
    /// Symlink target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// One extent of `GET /recovery-points/{id}/disks/{n}/map`: `zero` ranges read as zeros
/// without any stored data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskExtent {
    pub offset: u64,
    pub length: u64,
    pub zero: bool,
}

/// What `GET /recovery-points/{id}/browse` answers: the disk's volumes when no
/// partition was chosen on a partitioned disk, else the entries at `path` (a file's
/// own entry when `path` names a file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IlrListing {
    pub recovery_point: String,
    pub disk: u32,
    pub partition: Option<u32>,
    pub fs: Option<String>,
    pub label: Option<String>,
    pub path: String,
    pub volumes: Vec<IlrVolume>,
    pub entries: Vec<IlrEntry>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_schedule_by_time_of_week() {
        let s = ThrottleSchedule {
            work_kbps: 1000,
            other_kbps: 0,
            work_days: vec![1, 2, 3, 4, 5],
            work_start: "08:00".into(),
            work_end: "18:00".into(),
        };
        // 2026-11-23 is a Monday.
        let monday = utc::parse("2026-11-23 00:00").unwrap();
        assert_eq!(s.kbps_at(monday + 9 * 3600), Some(1000));
        assert_eq!(s.kbps_at(monday + 18 * 3600), None);
        assert_eq!(s.kbps_at(monday + 7 * 3600 + 3599), None);
        assert_eq!(s.kbps_at(monday + 5 * 86_400 + 9 * 3600), None, "Saturday");
        let night = ThrottleSchedule {
            work_start: "22:00".into(),
            work_end: "06:00".into(),
            other_kbps: 50,
            ..s
        };
        assert_eq!(night.kbps_at(monday + 23 * 3600), Some(1000));
        assert_eq!(night.kbps_at(monday + 3600), Some(1000));
        assert_eq!(night.kbps_at(monday + 12 * 3600), Some(50));
    }

    #[test]
    fn vm_names_split_once() {
        assert_eq!(split_vm("h1/vm"), Some(("h1", "vm")));
        assert_eq!(split_vm("h1/"), None);
        assert_eq!(split_vm("/vm"), None);
        assert_eq!(split_vm("a/b/c"), None);
        assert_eq!(split_vm("novm"), None);
    }

    #[test]
    fn times_of_day() {
        assert_eq!(parse_time_of_day("00:00"), Some(0));
        assert_eq!(parse_time_of_day("23:59"), Some(1439));
        assert_eq!(parse_time_of_day("24:00"), None);
        assert_eq!(parse_time_of_day("7:00"), None);
        assert_eq!(parse_time_of_day("07:60"), None);
    }

    #[test]
    fn policy_ranges() {
        let mut p = Policy::daily_at(5, SyncFrequency::Minutes(15), "20:00");
        assert!(p.validate().is_ok());
        p.retention_days = 449;
        assert!(p.validate().unwrap_err().contains("retention_days"));
        p.retention_days = 5;
        p.sync_frequency = SyncFrequency::Minutes(45);
        assert!(p.validate().unwrap_err().contains("sync_frequency"));
        p.sync_frequency = SyncFrequency::JustBeforeRecoveryPoint;
        p.recovery_point_times = vec!["25:00".into()];
        assert!(p.validate().unwrap_err().contains("recovery_point_times"));
    }
}

// ---------------------------------------------------------------------------------
// Offline seeding (manual replica creation)

/// `POST /api/v1/agent/replica-params` (agent): the parameters to build an offline
/// seed of one of this host's VMs; answered with a [`SessionStart`] (no base).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplicaParamsRequest {
    pub vm: String,
}

/// `seed.json` of a replica exported to removable media (`holdfast replica export`),
/// written last: a folder without it is an incomplete export. Beside it,
/// `blobs-NNNNNN.bin` files hold framed blobs exactly as an agent would send them; the
/// import verifies each as the server verifies any agent's data.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplicaSeed {
    pub format: String,
    pub version: u32,
    /// `HOST/VM` and the data source id it was exported for.
    pub source: Source,
    /// When the export finished (UTC, RFC 3339).
    pub created: String,
    /// When the export's view of the VM was taken (UTC, RFC 3339): the time its
    /// recovery point is dated by. Version 2 on; a version 1 seed has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub viewed: Option<String>,
    pub block_size: u32,
    pub piece_blocks: u32,
    pub consistency: Consistency,
    pub disks: Vec<DiskRecord>,
    pub stats: Stats,
    /// Names of the blob files, in order.
    pub blob_files: Vec<String>,
}

pub const SEED_FORMAT: &str = "holdfast-replica-seed";
/// 2 added `viewed`. Import reads 1 and 2 (a version 1 seed is dated by `created`, so
/// it is taken only as a VM's first recovery point).
pub const SEED_VERSION: u32 = 2;
