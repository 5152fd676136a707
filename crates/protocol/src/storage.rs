//! Storage targets: named places outside the datastore's disks (Azure Blob, S3, a
//! second folder) that hold online copies. A target's secret travels once, in
//! [`AddStorage`]; the server keeps it in a file of its own and never shows it again.

use crate::validate::{check_folder, check_host_name};
use serde::{Deserialize, Serialize};

/// What kind of store a target is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageKind {
    /// Azure Blob Storage (or Azurite): an account and a container.
    Azure,
    /// An S3-compatible store: a bucket at an endpoint.
    S3,
    /// A folder on the server (a second disk, a NAS mount).
    Folder,
}

string_enum!(StorageKind {
    Azure => "azure",
    S3 => "s3",
    Folder => "folder",
});

/// Where a target is, without its secret: what the catalog stores and lists show.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageLocation {
    /// Azure: the storage account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    /// Azure: the container (created beforehand).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// S3: the bucket (created beforehand).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bucket: Option<String>,
    /// S3: the region (`us-east-1` for most S3-compatible servers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Azure or S3: the service's URL (`http://127.0.0.1:10000/devstoreaccount1` for
    /// Azurite, the S3 server's URL); none = the public cloud's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// S3: the access key id (the secret key is the secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_key_id: Option<String>,
    /// Folder: an absolute path on the server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// `POST /api/v1/storage` (admin): a new named target.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AddStorage {
    pub name: String,
    pub kind: StorageKind,
    #[serde(flatten)]
    pub location: StorageLocation,
    /// Azure: the account key; S3: the secret access key; folder: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

/// `GET /api/v1/storage` (admin): one target, never its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageInfo {
    pub name: String,
    pub kind: StorageKind,
    #[serde(flatten)]
    pub location: StorageLocation,
    /// `az://ACCOUNT/CONTAINER`, `s3://BUCKET` or the folder.
    pub url: String,
    pub created: String,
    /// Protection groups that keep online copies there (a target in use cannot be
    /// removed).
    #[serde(default)]
    pub used_by: Vec<String>,
}

/// `POST /api/v1/storage/{name}/test` (admin): a probe object written, read back,
/// listed and deleted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StorageTestReport {
    pub name: String,
    pub url: String,
    pub bytes: u64,
    pub put_ms: f64,
    pub get_ms: f64,
    pub list_ms: f64,
    pub delete_ms: f64,
    pub write_bytes_per_sec: u64,
    pub read_bytes_per_sec: u64,
}

/// Longest secret accepted (Azure keys are 88 characters, S3 secrets 40).
pub const MAX_SECRET_BYTES: usize = 1024;

impl StorageLocation {
    /// How the target is written in messages and `online:` lists: `az://ACCOUNT/CONTAINER`,
    /// `s3://BUCKET` or the folder's path.
    pub fn url(&self, kind: StorageKind) -> String {
        let s = |o: &Option<String>| o.clone().unwrap_or_default();
        match kind {
            StorageKind::Azure => format!("az://{}/{}", s(&self.account), s(&self.container)),
            StorageKind::S3 => format!("s3://{}", s(&self.bucket)),
            StorageKind::Folder => s(&self.path),
        }
    }
}

/// A field the kind needs: present and a plain word (letters, digits, `-`, `.`, `_`).
fn need_word(field: &str, v: &Option<String>, kind: StorageKind) -> Result<(), String> {
    match v {
        None => Err(format!("{field}: needed for kind {kind}")),
        Some(v) if v.is_empty() || v.len() > 255 => {
            Err(format!("{field}: must be 1-255 characters"))
        }
        Some(v)
            if !v
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c)) =>
        {
            Err(format!(
                "{field}: {v:?} may hold only letters, digits, `-`, `.` and `_`"
            ))
        }
        Some(_) => Ok(()),
    }
}

/// A field the kind does not take.
fn refuse(field: &str, v: &Option<String>, kind: StorageKind) -> Result<(), String> {
    match v {
        Some(_) => Err(format!("{field}: not used by kind {kind}")),
        None => Ok(()),
    }
}

fn check_endpoint(v: &Option<String>) -> Result<(), String> {
    let Some(e) = v else { return Ok(()) };
    let rest = e
        .strip_prefix("https://")
        .or_else(|| e.strip_prefix("http://"))
        .ok_or_else(|| format!("endpoint: {e:?} must start with http:// or https://"))?;
    if rest.is_empty() || e.len() > 2048 || e.chars().any(|c| c.is_control() || c == ' ') {
        return Err(format!("endpoint: {e:?} is not a URL"));
    }
    Ok(())
}

impl AddStorage {
    /// What each kind needs and refuses; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        check_host_name("name", &self.name)?;
        let l = &self.location;
        let k = self.kind;
        match k {
            StorageKind::Azure => {
                need_word("account", &l.account, k)?;
                need_word("container", &l.container, k)?;
                check_endpoint(&l.endpoint)?;
                for (f, v) in [
                    ("bucket", &l.bucket),
                    ("region", &l.region),
                    ("access_key_id", &l.access_key_id),
                    ("path", &l.path),
                ] {
                    refuse(f, v, k)?;
                }
            }
            StorageKind::S3 => {
                need_word("bucket", &l.bucket, k)?;
                need_word("region", &l.region, k)?;
                need_word("access_key_id", &l.access_key_id, k)?;
                check_endpoint(&l.endpoint)?;
                for (f, v) in [
                    ("account", &l.account),
                    ("container", &l.container),
                    ("path", &l.path),
                ] {
                    refuse(f, v, k)?;
                }
            }
            StorageKind::Folder => {
                match &l.path {
                    None => return Err(format!("path: needed for kind {k}")),
                    Some(p) => check_folder("path", p)?,
                }
                for (f, v) in [
                    ("account", &l.account),
                    ("container", &l.container),
                    ("bucket", &l.bucket),
                    ("region", &l.region),
                    ("endpoint", &l.endpoint),
                    ("access_key_id", &l.access_key_id),
                ] {
                    refuse(f, v, k)?;
                }
            }
        }
        match (&self.secret, k) {
            (Some(_), StorageKind::Folder) => Err("secret: not used by kind folder".into()),
            (None, StorageKind::Azure | StorageKind::S3) => {
                Err(format!("secret: needed for kind {k} (the key file's contents)"))
            }
            (Some(s), _) if s.is_empty() || s.len() > MAX_SECRET_BYTES => Err(format!(
                "secret: must be 1-{MAX_SECRET_BYTES} bytes (not shown)"
            )),
            (Some(s), _) if s.chars().any(|c| c.is_control() || c == ' ') => Err(
                "secret: holds white space or control characters (not shown); is the key file one line?"
                    .into(),
            ),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn azure() -> AddStorage {
        AddStorage {
            name: "offsite".into(),
            kind: StorageKind::Azure,
            location: StorageLocation {
                account: Some("devstoreaccount1".into()),
                container: Some("holdfast".into()),
                endpoint: Some("http://127.0.0.1:10000/devstoreaccount1".into()),
                ..StorageLocation::default()
            },
            secret: Some("a2V5".into()),
        }
    }

    #[test]
    fn each_kind_needs_its_fields_and_refuses_the_others() {
        assert_eq!(azure().validate(), Ok(()));
        assert_eq!(
            azure().location.url(StorageKind::Azure),
            "az://devstoreaccount1/holdfast"
        );
        let mut a = azure();
        a.location.container = None;
        assert_eq!(
            a.validate().unwrap_err(),
            "container: needed for kind azure"
        );
        let mut a = azure();
        a.location.bucket = Some("b".into());
        assert_eq!(a.validate().unwrap_err(), "bucket: not used by kind azure");
        let mut a = azure();
        a.location.endpoint = Some("ftp://x".into());
        assert!(a.validate().unwrap_err().starts_with("endpoint: "));
        let mut a = azure();
        a.secret = None;
        assert!(a.validate().unwrap_err().starts_with("secret: needed"));
        let mut a = azure();
        a.secret = Some("two\nlines".into());
        let e = a.validate().unwrap_err();
        assert!(e.starts_with("secret: ") && !e.contains("two"), "{e}");
        let mut a = azure();
        a.name = "a/b".into();
        assert!(a.validate().unwrap_err().starts_with("name: "));
        let f = AddStorage {
            name: "nas".into(),
            kind: StorageKind::Folder,
            location: StorageLocation {
                path: Some("/mnt/nas/holdfast".into()),
                ..StorageLocation::default()
            },
            secret: None,
        };
        assert_eq!(f.validate(), Ok(()));
        let mut g = f.clone();
        g.location.path = Some("relative".into());
        assert!(g.validate().unwrap_err().starts_with("path: "));
        let mut g = f;
        g.secret = Some("x".into());
        assert_eq!(g.validate().unwrap_err(), "secret: not used by kind folder");
    }

    #[test]
    fn the_location_is_flat_in_json_and_the_secret_is_never_in_info() {
        let a = azure();
        let v = serde_json::to_value(&a).unwrap();
        assert_eq!(v["account"], "devstoreaccount1");
        assert_eq!(v["kind"], "azure");
        let info = StorageInfo {
            name: a.name.clone(),
            kind: a.kind,
            location: a.location.clone(),
            url: a.location.url(a.kind),
            created: "2026-12-07T00:00:00Z".into(),
            used_by: vec![],
        };
        let s = serde_json::to_string(&info).unwrap();
        assert!(!s.contains("a2V5") && !s.contains("secret"), "{s}");
        let back: StorageInfo = serde_json::from_str(&s).unwrap();
        assert_eq!(back, info);
    }
}

// ---------------------------------------------------------------------------------
// Online protection

/// A protection group's online protection: at each of `times` the newest recovery
/// point of every member is copied to storage target `storage`, where `retention`
/// (grandfather-father-son) decides how long copies stay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OnlinePolicy {
    pub storage: String,
    /// Times of day, `HH:MM` UTC.
    pub times: Vec<String>,
    pub retention: OnlineRetention,
    /// Upload limit in KiB/s (none = unlimited).
    #[serde(default)]
    pub bandwidth_kbps: Option<u64>,
    /// `HH:MM-HH:MM` UTC: the limit applies only inside these hours (none = always).
    #[serde(default)]
    pub bandwidth_hours: Option<String>,
}

/// How many daily, weekly, monthly and yearly online copies are kept (the newest copy
/// of each of the last N days, weeks, months, years that have one). MABS's limits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OnlineRetention {
    #[serde(default)]
    pub daily: u32,
    #[serde(default)]
    pub weekly: u32,
    #[serde(default)]
    pub monthly: u32,
    #[serde(default)]
    pub yearly: u32,
}

impl OnlineRetention {
    /// `daily=N,weekly=N,monthly=N,yearly=N` (any subset, any order).
    pub fn parse(s: &str) -> Result<OnlineRetention, String> {
        let mut r = OnlineRetention::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?}: expected NAME=COUNT (daily=30)"))?;
            let n: u32 = v
                .trim()
                .parse()
                .map_err(|_| format!("{part:?}: {v:?} is not a count"))?;
            match k.trim() {
                "daily" => r.daily = n,
                "weekly" => r.weekly = n,
                "monthly" => r.monthly = n,
                "yearly" => r.yearly = n,
                other => {
                    return Err(format!(
                        "{other:?}: expected daily, weekly, monthly or yearly"
                    ));
                }
            }
        }
        Ok(r)
    }
}

impl std::fmt::Display for OnlineRetention {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "daily={},weekly={},monthly={},yearly={}",
            self.daily, self.weekly, self.monthly, self.yearly
        )
    }
}

/// `HH:MM-HH:MM` as minutes of the day.
pub fn parse_hours(s: &str) -> Option<(u32, u32)> {
    let (a, b) = s.split_once('-')?;
    Some((
        crate::parse_time_of_day(a.trim())?,
        crate::parse_time_of_day(b.trim())?,
    ))
}

impl OnlinePolicy {
    /// MABS's ranges (daily 0-180, weekly 0-104, monthly 0-60, yearly 0-10, at least
    /// one copy kept); the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        check_host_name("online.storage", &self.storage)?;
        if self.times.is_empty() || self.times.len() > 4 {
            return Err("online.times: one to four times of day are needed".into());
        }
        for t in &self.times {
            if crate::parse_time_of_day(t).is_none() {
                return Err(format!("online.times: {t:?} is not a time of day HH:MM"));
            }
        }
        let r = &self.retention;
        for (field, n, max) in [
            ("daily", r.daily, 180),
            ("weekly", r.weekly, 104),
            ("monthly", r.monthly, 60),
            ("yearly", r.yearly, 10),
        ] {
            if n > max {
                return Err(format!("online.retention.{field}: {n} is over {max}"));
            }
        }
        if *r == OnlineRetention::default() {
            return Err(
                "online.retention: keep at least one copy (daily, weekly, monthly or yearly)"
                    .into(),
            );
        }
        if self.bandwidth_kbps == Some(0) {
            return Err("online.bandwidth_kbps: 0 is no limit; leave it out".into());
        }
        if let Some(h) = &self.bandwidth_hours {
            if self.bandwidth_kbps.is_none() {
                return Err("online.bandwidth_hours: needs a bandwidth limit".into());
            }
            if parse_hours(h).is_none() {
                return Err(format!("online.bandwidth_hours: {h:?} is not HH:MM-HH:MM"));
            }
        }
        Ok(())
    }

    /// The upload limit as a schedule: the limit inside the hours (every day), none
    /// outside; `None` when there is no limit.
    pub fn throttle(&self) -> Option<(Option<u64>, Option<crate::ThrottleSchedule>)> {
        let kbps = self.bandwidth_kbps?;
        Some(match &self.bandwidth_hours {
            None => (Some(kbps), None),
            Some(h) => {
                let (a, b) = h.split_once('-').unwrap_or((h, h));
                (
                    None,
                    Some(crate::ThrottleSchedule {
                        work_kbps: kbps,
                        other_kbps: 0,
                        work_days: (1..=7).collect(),
                        work_start: a.trim().to_string(),
                        work_end: b.trim().to_string(),
                    }),
                )
            }
        })
    }
}

/// `POST /api/v1/storage/{name}/attach` (admin): the key of the online copy on the
/// target (the key file's text). The server keeps it, opens the copy and records its
/// recovery points.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AttachStorage {
    pub key: String,
}

/// The answer to an attach: what the target holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AttachReport {
    pub name: String,
    pub url: String,
    pub recovery_points: u64,
    pub sources: Vec<String>,
}

/// `GET /api/v1/storage/{name}/key` (admin): the key file of the target's online copy,
/// to keep apart from the server (a new server needs it to attach the copy).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StorageKey {
    pub name: String,
    pub key: String,
}

/// `POST /api/v1/protection-groups/{name}/online-copy` (operator): copy now.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OnlineCopyQueued {
    pub group: String,
    pub jobs: Vec<i64>,
}

/// `POST /api/v1/storage/{name}/verify` (admin): verify the online copy.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VerifyStorage {
    /// Percent of the packs to read (1-100; none = all).
    #[serde(default)]
    pub sample_percent: Option<u8>,
}
