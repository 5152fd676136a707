//! The server's optional TOML configuration (`DIR/holdfast.toml`, or `--config FILE`).
//! Every key has a default, so a server runs with no file at all; docs/configuration.md
//! lists them.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address the HTTPS API listens on.
    pub listen: SocketAddr,
    /// Extra DNS names or IP addresses for the server certificate (agents on other
    /// hosts connect by one of these).
    pub public_names: Vec<String>,
    /// The datastore folder (default `DIR/datastore`).
    pub datastore: Option<PathBuf>,
    /// Create the datastore encrypted (first start only; the key goes beside it).
    pub encrypt_datastore: bool,
    /// Threads the datastore uses to verify received blobs and for verify/gc (default:
    /// all cores).
    pub threads: Option<usize>,
    pub scheduler: Scheduler,
    pub jobs: Jobs,
    pub maintenance: Maintenance,
    pub limits: Limits,
    pub http: Http,
    pub notify: Notify,
    pub smtp: Smtp,
    pub recovery: RecoverySettings,
}

/// `[recovery]`: bandwidth limits for recovery transfers when a request gives none
/// (MABS "network bandwidth usage throttling", work and non-work hours; UTC).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RecoverySettings {
    /// KiB/s during work hours; 0 = no limit.
    pub work_hours_kbps: u64,
    /// KiB/s outside them; 0 = no limit.
    pub other_hours_kbps: u64,
    /// 1 = Monday ... 7 = Sunday.
    pub work_days: Vec<u8>,
    pub work_start: String,
    pub work_end: String,
}

impl Default for RecoverySettings {
    fn default() -> Self {
        RecoverySettings {
            work_hours_kbps: 0,
            other_hours_kbps: 0,
            work_days: vec![1, 2, 3, 4, 5],
            work_start: "08:00".into(),
            work_end: "18:00".into(),
        }
    }
}

impl RecoverySettings {
    /// The schedule recovery jobs get, `None` when both limits are 0.
    pub fn schedule(&self) -> Option<protocol::ThrottleSchedule> {
        (self.work_hours_kbps > 0 || self.other_hours_kbps > 0).then(|| {
            protocol::ThrottleSchedule {
                work_kbps: self.work_hours_kbps,
                other_kbps: self.other_hours_kbps,
                work_days: self.work_days.clone(),
                work_start: self.work_start.clone(),
                work_end: self.work_end.clone(),
            }
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Scheduler {
    /// How often schedules are looked at.
    pub tick_seconds: u64,
    /// Policy minutes last `60 / time_scale` seconds. Only for tests and
    /// demonstrations: a time_scale of 60 makes a 15-minute synchronization frequency
    /// fire every 15 seconds. Times of day are not scaled.
    pub time_scale: f64,
    /// Jobs running at once on the whole server, and per host.
    pub max_jobs: u32,
    pub max_jobs_per_host: u32,
    /// A failed job runs again after this delay (MABS "auto-rerun"), up to
    /// `max_attempts` runs in all.
    pub rerun_delay_seconds: u64,
    pub max_attempts: u32,
    /// A running agent job that has not been heard of for this long is failed (the
    /// agent died or lost the network for good) and rerun.
    pub job_timeout_seconds: u64,
    /// How long an agent's poll waits for a job before answering "none".
    pub poll_seconds: u64,
}

/// `[jobs]`: how running jobs are watched.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Jobs {
    /// A running agent job whose agent still reports but whose figures and step have
    /// not moved for this long is stuck: the watchdog fails it, tells the agent to
    /// cancel (it then undoes its view), and raises a `job-stalled` alert naming the
    /// VM and the step. 0 switches the check off.
    pub stall_seconds: u64,
}

impl Default for Jobs {
    fn default() -> Self {
        Jobs { stall_seconds: 600 }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Maintenance {
    /// Daily times (`HH:MM` UTC) of prune (retention), gc and verify; `""` = never.
    pub prune_time: Option<String>,
    pub gc_time: Option<String>,
    pub verify_time: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_json_body: usize,
    pub max_blob_batch: usize,
    /// A warning alert is raised while the datastore's file system has less than this
    /// percentage free; 0 switches the alert off.
    pub low_space_percent: u8,
}

/// `[http]`: how long connections may wait and how many there may be.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Http {
    /// A new connection must send its first request header within this many seconds
    /// of its TLS handshake; an HTTP/1.1 connection that has begun its next header
    /// must finish it within as long.
    pub header_timeout_seconds: u64,
    /// A connection with no request in progress is closed after this many seconds
    /// (HTTP/1.1 keep-alive, idle HTTP/2). Requests in progress are never cut.
    pub idle_timeout_seconds: u64,
    /// Open connections in all; more are closed at once.
    pub max_connections: usize,
    /// Open connections from one client address; more are closed at once.
    pub max_connections_per_address: usize,
}

impl Default for Http {
    fn default() -> Self {
        Http {
            header_timeout_seconds: 10,
            // Above the agents' and CLI's own 90 s pool timeout: clients close first.
            idle_timeout_seconds: 120,
            max_connections: 1024,
            max_connections_per_address: 64,
        }
    }
}

/// Who hears of alerts (and, per job, of job ends).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Notify {
    /// Recipients of alert e-mails; empty = no alert e-mail.
    pub email_to: Vec<String>,
    /// URLs each alert is POSTed to as JSON; empty = none.
    pub webhooks: Vec<String>,
    /// Alerts of this severity or above are sent: `info`, `warning`, `error` or
    /// `critical`.
    pub min_severity: String,
}

/// The mail server alert and job e-mails go through.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Smtp {
    /// Empty = no mail server (e-mail off).
    pub host: String,
    pub port: u16,
    /// `none`, `starttls` or `tls`.
    pub security: String,
    pub username: Option<String>,
    /// File holding the password (read at start, trimmed).
    pub password_file: Option<PathBuf>,
    /// Sender mailbox, `Name <address>` or `address`.
    pub from: String,
    pub timeout_seconds: u64,
    /// A certificate authority (PEM) trusted for the mail server's certificate besides
    /// the system's (an internal relay with a private CA).
    pub ca_file: Option<PathBuf>,
}

impl Default for Notify {
    fn default() -> Self {
        Notify {
            email_to: Vec::new(),
            webhooks: Vec::new(),
            min_severity: "warning".into(),
        }
    }
}

impl Default for Smtp {
    fn default() -> Self {
        Smtp {
            host: String::new(),
            port: 587,
            security: "starttls".into(),
            username: None,
            password_file: None,
            from: String::new(),
            timeout_seconds: 30,
            ca_file: None,
        }
    }
}

/// `info`, `warning`, `error`, `critical`.
pub fn parse_severity(s: &str) -> Option<protocol::Severity> {
    protocol::Severity::parse(s)
}

/// SMTP connection security.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Security {
    None,
    StartTls,
    Tls,
}

impl Security {
    pub fn parse(s: &str) -> Option<Security> {
        match s {
            "none" => Some(Security::None),
            "starttls" => Some(Security::StartTls),
            "tls" => Some(Security::Tls),
            _ => None,
        }
    }
}

impl Smtp {
    /// A mail server is configured.
    pub fn enabled(&self) -> bool {
        !self.host.is_empty()
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([0, 0, 0, 0], 8443)),
            public_names: Vec::new(),
            datastore: None,
            encrypt_datastore: false,
            threads: None,
            scheduler: Scheduler::default(),
            jobs: Jobs::default(),
            maintenance: Maintenance::default(),
            limits: Limits::default(),
            http: Http::default(),
            notify: Notify::default(),
            smtp: Smtp::default(),
            recovery: RecoverySettings::default(),
        }
    }
}

impl Default for Scheduler {
    fn default() -> Self {
        Scheduler {
            tick_seconds: 30,
            time_scale: 1.0,
            max_jobs: 8,
            max_jobs_per_host: 2,
            rerun_delay_seconds: 900,
            max_attempts: 3,
            job_timeout_seconds: 600,
            poll_seconds: 25,
        }
    }
}

impl Default for Maintenance {
    fn default() -> Self {
        Maintenance {
            prune_time: Some("01:00".into()),
            gc_time: Some("02:00".into()),
            verify_time: Some("03:00".into()),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_json_body: protocol::MAX_JSON_BODY,
            max_blob_batch: protocol::MAX_BLOB_BATCH,
            low_space_percent: 5,
        }
    }
}

impl Config {
    /// Reads `path`; a missing file at the default place means defaults.
    pub fn load(path: &Path, must_exist: bool) -> Result<Config, String> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !must_exist => {
                return Ok(Config::default());
            }
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        let c: Config = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        c.check().map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(c)
    }

    pub fn check(&self) -> Result<(), String> {
        let r = &self.recovery;
        if r.work_days.iter().any(|d| !(1..=7).contains(d)) {
            return Err("recovery.work_days: days are 1 (Monday) to 7 (Sunday)".into());
        }
        for (k, v) in [
            ("recovery.work_start", &r.work_start),
            ("recovery.work_end", &r.work_end),
        ] {
            if protocol::parse_time_of_day(v).is_none() {
                return Err(format!("{k}: {v:?} is not a time of day HH:MM"));
            }
        }
        let s = &self.scheduler;
        if s.tick_seconds == 0 || s.tick_seconds > 3600 {
            return Err("scheduler.tick_seconds must be 1-3600".into());
        }
        if !(s.time_scale.is_finite() && s.time_scale > 0.0 && s.time_scale <= 3600.0) {
            return Err("scheduler.time_scale must be above 0 and at most 3600".into());
        }
        if s.max_jobs == 0 || s.max_jobs_per_host == 0 {
            return Err("scheduler.max_jobs and max_jobs_per_host must be at least 1".into());
        }
        if s.max_attempts == 0 {
            return Err("scheduler.max_attempts must be at least 1".into());
        }
        if s.poll_seconds == 0 || s.poll_seconds > 300 {
            return Err("scheduler.poll_seconds must be 1-300".into());
        }
        if self.jobs.stall_seconds > 7 * 86_400 {
            return Err("jobs.stall_seconds must be 0 (off) to 604800 (a week)".into());
        }
        for (k, v) in [
            ("maintenance.prune_time", &self.maintenance.prune_time),
            ("maintenance.gc_time", &self.maintenance.gc_time),
            ("maintenance.verify_time", &self.maintenance.verify_time),
        ] {
            if let Some(t) = v
                && !t.is_empty()
                && protocol::parse_time_of_day(t).is_none()
            {
                return Err(format!("{k}: {t:?} is not a time of day HH:MM"));
            }
        }
        if self.limits.max_json_body < 4096 || self.limits.max_blob_batch < (2 << 20) {
            return Err(
                "limits: max_json_body must be at least 4096 and max_blob_batch at least 2 MiB"
                    .into(),
            );
        }
        if self.limits.low_space_percent > 99 {
            return Err("limits.low_space_percent must be 0-99".into());
        }
        self.check_http()?;
        self.check_notify()
    }

    fn check_http(&self) -> Result<(), String> {
        let h = &self.http;
        if !(1..=300).contains(&h.header_timeout_seconds) {
            return Err("http.header_timeout_seconds must be 1-300".into());
        }
        if !(1..=3600).contains(&h.idle_timeout_seconds) {
            return Err("http.idle_timeout_seconds must be 1-3600".into());
        }
        if !(1..=65_536).contains(&h.max_connections) {
            return Err("http.max_connections must be 1-65536".into());
        }
        if h.max_connections_per_address == 0 || h.max_connections_per_address > h.max_connections {
            return Err(
                "http.max_connections_per_address must be 1 to http.max_connections".into(),
            );
        }
        Ok(())
    }

    fn check_notify(&self) -> Result<(), String> {
        let n = &self.notify;
        if parse_severity(&n.min_severity).is_none() {
            return Err(format!(
                "notify.min_severity: {:?} is not info, warning, error or critical",
                n.min_severity
            ));
        }
        for a in &n.email_to {
            if a.parse::<lettre::Address>().is_err() {
                return Err(format!("notify.email_to: {a:?} is not an e-mail address"));
            }
        }
        for u in &n.webhooks {
            let rest = u
                .strip_prefix("https://")
                .or_else(|| u.strip_prefix("http://"));
            if rest.is_none_or(|r| r.is_empty() || r.starts_with('/')) {
                return Err(format!(
                    "notify.webhooks: {u:?} must start with http:// or https:// and name a host"
                ));
            }
        }
        let m = &self.smtp;
        if Security::parse(&m.security).is_none() {
            return Err(format!(
                "smtp.security: {:?} is not none, starttls or tls",
                m.security
            ));
        }
        if m.port == 0 {
            return Err("smtp.port must be 1-65535".into());
        }
        if m.timeout_seconds == 0 || m.timeout_seconds > 3600 {
            return Err("smtp.timeout_seconds must be 1-3600".into());
        }
        if !m.from.is_empty() && m.from.parse::<lettre::message::Mailbox>().is_err() {
            return Err(format!(
                "smtp.from: {:?} is not a mailbox (\"Name <address>\" or \"address\")",
                m.from
            ));
        }
        if m.enabled() && m.from.is_empty() {
            return Err("smtp.from is needed when smtp.host is set".into());
        }
        if !n.email_to.is_empty() && !m.enabled() {
            return Err("notify.email_to needs [smtp] with host and from".into());
        }
        if m.password_file.is_some() && m.username.is_none() {
            return Err("smtp.password_file needs smtp.username".into());
        }
        if m.ca_file.is_some() && m.security == "none" {
            return Err("smtp.ca_file needs smtp.security starttls or tls".into());
        }
        Ok(())
    }

    /// Policy minutes in real seconds.
    pub fn minutes(&self, m: u32) -> i64 {
        ((m as f64 * 60.0) / self.scheduler.time_scale).max(1.0) as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_overrides() {
        let c: Config =
            toml::from_str("listen = \"127.0.0.1:9000\"\n[scheduler]\ntime_scale = 60.0\n")
                .unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.minutes(15), 15);
        assert_eq!(c.scheduler.max_attempts, 3);
        assert!(c.check().is_ok());
        assert!(toml::from_str::<Config>("nonsense = 1").is_err());
        let bad: Config = toml::from_str("[maintenance]\nprune_time = \"25:00\"").unwrap();
        assert!(bad.check().unwrap_err().contains("prune_time"));
        let bad: Config = toml::from_str("[limits]\nlow_space_percent = 100").unwrap();
        assert!(bad.check().unwrap_err().contains("low_space_percent"));
        // The stall watchdog: on by default, 0 turns it off, a week at most.
        assert_eq!(c.jobs.stall_seconds, 600);
        let off: Config = toml::from_str("[jobs]\nstall_seconds = 0").unwrap();
        assert!(off.check().is_ok());
        let bad: Config = toml::from_str("[jobs]\nstall_seconds = 604801").unwrap();
        assert!(bad.check().unwrap_err().contains("jobs.stall_seconds"));
        assert!(toml::from_str::<Config>("[jobs]\nstall = 5").is_err());
    }

    #[test]
    fn http_limits_have_defaults_and_bounds() {
        let d = Config::default();
        assert_eq!(d.http.header_timeout_seconds, 10);
        assert_eq!(d.http.idle_timeout_seconds, 120);
        assert_eq!(d.http.max_connections, 1024);
        assert_eq!(d.http.max_connections_per_address, 64);
        let ok: Config = toml::from_str(
            "[http]\nheader_timeout_seconds = 2\nidle_timeout_seconds = 3\n\
             max_connections = 400\nmax_connections_per_address = 400",
        )
        .unwrap();
        assert_eq!(ok.check(), Ok(()));
        assert_eq!(ok.http.max_connections, 400);
        for (text, field) in [
            ("header_timeout_seconds = 0", "http.header_timeout_seconds"),
            (
                "header_timeout_seconds = 301",
                "http.header_timeout_seconds",
            ),
            ("idle_timeout_seconds = 0", "http.idle_timeout_seconds"),
            ("idle_timeout_seconds = 3601", "http.idle_timeout_seconds"),
            ("max_connections = 0", "http.max_connections"),
            ("max_connections = 65537", "http.max_connections"),
            (
                "max_connections_per_address = 0",
                "http.max_connections_per_address",
            ),
            (
                "max_connections = 10\nmax_connections_per_address = 11",
                "http.max_connections_per_address",
            ),
        ] {
            assert!(err(&format!("[http]\n{text}")).contains(field), "{text}");
        }
        assert!(toml::from_str::<Config>("[http]\nheader_timeout = 5").is_err());
        assert!(toml::from_str::<Config>("[http]\nmax_connections = -1").is_err());
    }

    fn err(toml_text: &str) -> String {
        let c: Config = toml::from_str(toml_text).unwrap();
        c.check().unwrap_err()
    }

    #[test]
    fn notify_and_smtp() {
        let c: Config = toml::from_str(
            "[notify]\nemail_to = [\"ops@example.net\"]\nwebhooks = [\"https://hooks.example.net/h\"]\n\
             min_severity = \"error\"\n[smtp]\nhost = \"smtp.example.net\"\nport = 465\n\
             security = \"tls\"\nusername = \"hf\"\npassword_file = \"/etc/hf.pass\"\n\
             from = \"Holdfast <holdfast@example.net>\"\ntimeout_seconds = 10\n",
        )
        .unwrap();
        assert_eq!(c.check(), Ok(()));
        assert_eq!(c.smtp.port, 465);
        assert_eq!(Security::parse(&c.smtp.security), Some(Security::Tls));
        // Defaults: nothing sent, nothing to check.
        let d = Config::default();
        assert_eq!(d.check(), Ok(()));
        assert!(!d.smtp.enabled());
        assert_eq!(d.smtp.port, 587);
        assert_eq!(d.notify.min_severity, "warning");

        let smtp = "[smtp]\nhost = \"m\"\nfrom = \"a@b.c\"\n";
        assert!(err("[notify]\nmin_severity = \"loud\"").contains("notify.min_severity"));
        let crit: Config = toml::from_str("[notify]\nmin_severity = \"critical\"\n").unwrap();
        assert_eq!(crit.check(), Ok(()));
        assert!(err("[notify]\nemail_to = [\"nobody\"]").contains("notify.email_to"));
        assert!(err("[notify]\nemail_to = [\"ops@example.net\"]").contains("[smtp]"));
        assert!(err("[notify]\nwebhooks = [\"ftp://x\"]").contains("notify.webhooks"));
        assert!(err("[notify]\nwebhooks = [\"https://\"]").contains("notify.webhooks"));
        assert!(err(&format!("{smtp}port = 0")).contains("smtp.port"));
        assert!(toml::from_str::<Config>(&format!("{smtp}port = 70000")).is_err());
        assert!(err(&format!("{smtp}security = \"ssl\"")).contains("smtp.security"));
        assert!(err("[smtp]\nhost = \"m\"\nfrom = \"not a mailbox\"").contains("smtp.from"));
        assert!(err("[smtp]\nhost = \"m\"").contains("smtp.from"));
        assert!(err(&format!("{smtp}timeout_seconds = 0")).contains("smtp.timeout_seconds"));
        assert!(err(&format!("{smtp}password_file = \"/p\"")).contains("smtp.password_file"));
        assert!(
            err(&format!("{smtp}security = \"none\"\nca_file = \"/ca.pem\""))
                .contains("smtp.ca_file")
        );
        let ok: Config = toml::from_str(&format!(
            "[notify]\nemail_to = [\"x@y.z\"]\nwebhooks = [\"http://127.0.0.1:9/h\"]\n{smtp}security = \"none\"\nport = 2525"
        ))
        .unwrap();
        assert_eq!(ok.check(), Ok(()));
    }
}
