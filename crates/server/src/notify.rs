//! Notifications: alert e-mails and webhooks when an alert is raised, and a job e-mail
//! when a job that asked for one ends (`backup-now --notify`).
//!
//! Nothing here blocks the API or the scheduler: messages go into a bounded queue that
//! one background thread empties (a full queue drops the message with a log line). A
//! failed send is retried with backoff, then logged and counted (`/status`).
//! Passwords are never logged.

use crate::config::{Config, Security, parse_severity};
use catalog::Catalog;
use protocol::{AlertInfo, JobInfo, Severity};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Messages waiting to be sent; more are dropped.
const QUEUE: usize = 256;
/// Tries per message; the waits between them double from [`FIRST_RETRY`].
const ATTEMPTS: u32 = 4;
const FIRST_RETRY: Duration = Duration::from_secs(2);
/// Recipients one job may name.
pub const MAX_JOB_RECIPIENTS: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("smtp.password_file {path}: {err}")]
    PasswordFile {
        path: String,
        #[source]
        err: std::io::Error,
    },
    #[error("smtp.password_file {0}: empty")]
    EmptyPassword(String),
    #[error("{0}")]
    Invalid(String),
}

/// One message for the sender thread.
#[derive(Debug, Clone, PartialEq)]
pub enum Outgoing {
    Email {
        to: Vec<String>,
        subject: String,
        body: String,
    },
    Webhook {
        url: String,
        body: serde_json::Value,
    },
}

/// Counted for `/status`.
#[derive(Debug, Default)]
pub struct Counters {
    pub sent: AtomicU64,
    pub failed: AtomicU64,
    pub dropped: AtomicU64,
}

/// The server's notification hook: every alert the server raises goes through
/// [`Notifier::raise_alert`], every job end through [`Notifier::job_finished`].
pub struct Notifier {
    tx: Option<SyncSender<Outgoing>>,
    email_to: Vec<String>,
    webhooks: Vec<String>,
    min_severity: Severity,
    smtp: bool,
    url: OnceLock<String>,
    pub counters: Arc<Counters>,
}

/// What the sender thread needs to build its transports.
struct Setup {
    smtp: crate::config::Smtp,
    password: Option<String>,
    webhooks: bool,
    first_retry: Duration,
}

impl Notifier {
    /// Reads the SMTP password file and starts the sender thread when anything can be
    /// sent (a mail server, or webhooks).
    pub fn start(cfg: &Config) -> Result<Notifier, Error> {
        let n = &cfg.notify;
        let password = match &cfg.smtp.password_file {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|err| Error::PasswordFile {
                    path: p.display().to_string(),
                    err,
                })?;
                let t = text.trim().to_string();
                if t.is_empty() {
                    return Err(Error::EmptyPassword(p.display().to_string()));
                }
                Some(t)
            }
            None => None,
        };
        let smtp = cfg.smtp.enabled();
        if smtp {
            // A bad CA file or sender is a configuration error at start, not e-mail
            // quietly off later.
            smtp_transport(&cfg.smtp, password.as_deref()).map_err(Error::Invalid)?;
        }
        let min_severity = parse_severity(&n.min_severity)
            .ok_or_else(|| Error::Invalid(format!("notify.min_severity: {:?}", n.min_severity)))?;
        let counters = Arc::new(Counters::default());
        let tx = if smtp || !n.webhooks.is_empty() {
            let (tx, rx) = sync_channel(QUEUE);
            let setup = Setup {
                smtp: cfg.smtp.clone(),
                password,
                webhooks: !n.webhooks.is_empty(),
                first_retry: FIRST_RETRY,
            };
            let c = counters.clone();
            std::thread::Builder::new()
                .name("notify".into())
                .spawn(move || sender(setup, rx, &c))
                .map_err(|e| Error::Invalid(format!("starting the notification thread: {e}")))?;
            Some(tx)
        } else {
            None
        };
        Ok(Notifier {
            tx,
            email_to: n.email_to.clone(),
            webhooks: n.webhooks.clone(),
            min_severity,
            smtp,
            url: OnceLock::new(),
            counters,
        })
    }

    /// A notifier that sends nothing.
    pub fn off() -> Notifier {
        Notifier {
            tx: None,
            email_to: Vec::new(),
            webhooks: Vec::new(),
            min_severity: Severity::Error,
            smtp: false,
            url: OnceLock::new(),
            counters: Arc::new(Counters::default()),
        }
    }

    /// The server's URL, named in messages once it is known.
    pub fn set_url(&self, url: &str) {
        let _ = self.url.set(url.to_string());
    }

    /// E-mail can be sent (jobs may ask for it).
    pub fn can_email(&self) -> bool {
        self.smtp && self.tx.is_some()
    }

    /// Raises (or updates) an alert in the catalog; a new one at or above
    /// `notify.min_severity` is e-mailed and POSTed to the webhooks. The one place the
    /// server raises alerts.
    pub fn raise_alert(
        &self,
        cat: &Catalog,
        now: i64,
        severity: Severity,
        subject: &str,
        kind: &str,
        message: &str,
    ) -> Result<i64, catalog::Error> {
        let r = cat.raise(now, severity, subject, kind, message)?;
        if r.new && rank(severity) >= rank(self.min_severity) {
            let t = utc::rfc3339(now);
            self.alert_raised(&AlertInfo {
                id: r.id,
                severity,
                subject: subject.to_string(),
                kind: kind.to_string(),
                message: message.to_string(),
                raised: t.clone(),
                last_seen: t,
                resolved: None,
                occurrences: 1,
                note: None,
            });
        }
        Ok(r.id)
    }

    /// Resolves the open alerts of `subject` (one `kind`, or all) in the catalog; each
    /// that was worth telling when raised (at or above `notify.min_severity`) is told
    /// resolved. The one place the server resolves alerts. Returns how many.
    pub fn resolve_alerts(
        &self,
        cat: &Catalog,
        now: i64,
        subject: &str,
        kind: Option<&str>,
    ) -> Result<u64, catalog::Error> {
        self.resolve_alerts_noted(cat, now, subject, kind, None)
    }

    /// [`Notifier::resolve_alerts`] with a note saying what resolved them.
    pub fn resolve_alerts_noted(
        &self,
        cat: &Catalog,
        now: i64,
        subject: &str,
        kind: Option<&str>,
        note: Option<&str>,
    ) -> Result<u64, catalog::Error> {
        let done = cat.resolve_alerts_noted(now, subject, kind, note)?;
        for a in &done {
            self.resolved(a);
        }
        Ok(done.len() as u64)
    }

    /// An administrator resolves one alert (told like any resolution).
    pub fn resolve_alert(
        &self,
        cat: &Catalog,
        now: i64,
        id: i64,
        note: Option<&str>,
    ) -> Result<AlertInfo, catalog::Error> {
        let a = cat.resolve_alert(now, id, note)?;
        self.resolved(&a);
        Ok(a)
    }

    fn resolved(&self, a: &AlertInfo) {
        if rank(a.severity) >= rank(self.min_severity) {
            self.alert_resolved(a);
        }
    }

    fn alert_resolved(&self, a: &AlertInfo) {
        self.tell(a, "alert-resolved", resolved_email);
    }

    fn alert_raised(&self, a: &AlertInfo) {
        self.tell(a, "alert-raised", alert_email);
    }

    /// E-mails `notify.email_to` and POSTs each webhook about `a`: the e-mail made by
    /// `email`, the webhook event `event`.
    fn tell(
        &self,
        a: &AlertInfo,
        event: &str,
        email: fn(&AlertInfo, Option<&str>) -> (String, String),
    ) {
        let url = self.url.get().map(String::as_str);
        if self.smtp && !self.email_to.is_empty() {
            let (subject, body) = email(a, url);
            self.push(Outgoing::Email {
                to: self.email_to.clone(),
                subject,
                body,
            });
        }
        for w in &self.webhooks {
            self.push(Outgoing::Webhook {
                url: w.clone(),
                body: alert_event(event, a, url, email),
            });
        }
    }

    /// A job that asked for notification ended: e-mail `to` a summary.
    pub fn job_finished(&self, job: &JobInfo, to: Vec<String>) {
        if to.is_empty() {
            return;
        }
        if !self.smtp {
            eprintln!(
                "holdfast server: notify: job {} asked for e-mail but no [smtp] host is configured",
                job.id
            );
            return;
        }
        let (subject, body) = job_email(job, self.url.get().map(String::as_str));
        self.push(Outgoing::Email { to, subject, body });
    }

    fn push(&self, m: Outgoing) {
        let Some(tx) = &self.tx else { return };
        match tx.try_send(m) {
            Ok(()) => {}
            Err(TrySendError::Full(m)) => {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                eprintln!(
                    "holdfast server: notify: queue full, dropped {}",
                    describe(&m)
                );
            }
            Err(TrySendError::Disconnected(m)) => {
                self.counters.failed.fetch_add(1, Ordering::Relaxed);
                eprintln!(
                    "holdfast server: notify: sender stopped, dropped {}",
                    describe(&m)
                );
            }
        }
    }
}

fn rank(s: Severity) -> u8 {
    s.rank()
}

fn severity_text(s: Severity) -> &'static str {
    s.as_str()
}

fn describe(m: &Outgoing) -> String {
    match m {
        Outgoing::Email { to, subject, .. } => {
            format!("e-mail {subject:?} to {}", to.join(", "))
        }
        Outgoing::Webhook { url, .. } => format!("webhook POST to {url}"),
    }
}

/// Subject and plain-text body of an alert e-mail.
pub fn alert_email(a: &AlertInfo, server_url: Option<&str>) -> (String, String) {
    let sev = severity_text(a.severity);
    let subject = one_line(&format!("[Holdfast] {sev}: {}: {}", a.subject, a.kind));
    let mut body = format!(
        "Holdfast raised an alert.\n\n\
         Severity: {sev}\n\
         Subject:  {}\n\
         Kind:     {}\n\
         Raised:   {}\n\
         Alert id: {}\n\n\
         {}\n",
        a.subject, a.kind, a.raised, a.id, a.message
    );
    if let Some(u) = server_url {
        body.push_str(&format!("\nServer: {u}\n"));
    }
    body.push_str(
        "\nList open alerts with `holdfast alerts list`. This alert is not sent again while \
         it stays open.\n",
    );
    (subject, body)
}

/// Subject and plain-text body of the e-mail telling an alert is resolved.
pub fn resolved_email(a: &AlertInfo, server_url: Option<&str>) -> (String, String) {
    let subject = one_line(&format!("[Holdfast] resolved: {}: {}", a.subject, a.kind));
    let mut body = format!(
        "An alert Holdfast raised is resolved.\n\n\
         Severity:    {}\n\
         Subject:     {}\n\
         Kind:        {}\n\
         Raised:      {}\n\
         Resolved:    {}\n\
         Occurrences: {}\n\
         Alert id:    {}\n\n\
         Last message: {}\n{}",
        severity_text(a.severity),
        a.subject,
        a.kind,
        a.raised,
        a.resolved.as_deref().unwrap_or("-"),
        a.occurrences,
        a.id,
        a.message,
        a.note
            .as_ref()
            .map(|n| format!("Note: {n}\n"))
            .unwrap_or_default()
    );
    if let Some(u) = server_url {
        body.push_str(&format!("\nServer: {u}\n"));
    }
    (subject, body)
}

/// The JSON POSTed to each webhook about an alert (`event`: `alert-raised` or
/// `alert-resolved`); `summary` is the subject of the matching e-mail.
pub fn alert_event(
    event: &str,
    a: &AlertInfo,
    server_url: Option<&str>,
    email: fn(&AlertInfo, Option<&str>) -> (String, String),
) -> serde_json::Value {
    serde_json::json!({
        "event": event,
        "server": server_url,
        "summary": email(a, None).0,
        "alert": a,
    })
}

/// Subject and plain-text body of a job e-mail.
pub fn job_email(j: &JobInfo, server_url: Option<&str>) -> (String, String) {
    let what = match &j.vm {
        Some(vm) => format!("{} {vm}", j.kind.as_str()),
        None => j.kind.as_str().to_string(),
    };
    let subject = one_line(&format!(
        "[Holdfast] job {} {what} {}",
        j.id,
        j.state.as_str()
    ));
    let mut lines = vec![
        format!("Job:            {}", j.id),
        format!("Kind:           {}", j.kind.as_str()),
    ];
    if let Some(vm) = &j.vm {
        lines.push(format!("VM:             {vm}"));
    }
    lines.push(format!("State:          {}", j.state.as_str()));
    lines.push(format!("Trigger:        {}", j.trigger));
    lines.push(format!("Attempt:        {}", j.attempt));
    if let Some(s) = &j.started {
        lines.push(format!("Started:        {s}"));
    }
    if let Some(f) = &j.finished {
        lines.push(format!("Finished:       {f}"));
    }
    if let Some(d) = duration(j) {
        lines.push(format!("Duration:       {d}"));
    }
    if let (Some(f), Some(w)) = (j.bytes_fetched, j.bytes_written) {
        // A recovery: what it fetched apart from the disk bytes it wrote (holes).
        lines.push(format!("Bytes fetched:  {f}"));
        lines.push(format!("Bytes written:  {w} (holes included)"));
    } else {
        lines.push(format!("Bytes read:     {}", j.bytes_read));
        lines.push(format!("Bytes sent:     {}", j.bytes_sent));
    }
    if let Some(rp) = &j.recovery_point {
        lines.push(format!("Recovery point: {rp}"));
    }
    if let Some(e) = &j.error {
        lines.push(format!("Error:          {e}"));
    }
    let mut body = lines.join("\n");
    body.push('\n');
    if let Some(u) = server_url {
        body.push_str(&format!("\nServer: {u}\n"));
    }
    body.push_str(&format!(
        "\nShow the job's log with `holdfast jobs show {}`.\n",
        j.id
    ));
    (subject, body)
}

/// `1h 2m 3s`, from the job's start and end.
fn duration(j: &JobInfo) -> Option<String> {
    let s = utc::parse(j.started.as_deref()?)?;
    let f = utc::parse(j.finished.as_deref()?)?;
    let d = (f - s).max(0);
    Some(match (d / 3600, d / 60 % 60, d % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m {s}s"),
        (h, m, s) => format!("{h}h {m}m {s}s"),
    })
}

/// Header values stay on one line.
fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(200)
        .collect()
}

// ---------------------------------------------------------------------------------
// The sender thread

struct Transports {
    smtp: Option<(lettre::SmtpTransport, lettre::message::Mailbox)>,
    http: Option<reqwest::blocking::Client>,
}

fn sender(setup: Setup, rx: Receiver<Outgoing>, counters: &Counters) {
    let t = Transports {
        smtp: if setup.smtp.enabled() {
            match smtp_transport(&setup.smtp, setup.password.as_deref()) {
                Ok(t) => Some(t),
                Err(e) => {
                    eprintln!("holdfast server: notify: SMTP setup: {e}; e-mail is off");
                    None
                }
            }
        } else {
            None
        },
        http: if setup.webhooks {
            match http_client(Duration::from_secs(setup.smtp.timeout_seconds)) {
                Ok(c) => Some(c),
                Err(e) => {
                    eprintln!("holdfast server: notify: webhook setup: {e}; webhooks are off");
                    None
                }
            }
        } else {
            None
        },
    };
    while let Ok(m) = rx.recv() {
        let mut wait = setup.first_retry;
        let mut attempt = 1;
        loop {
            match send(&t, &m) {
                Ok(()) => {
                    counters.sent.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Err(e) if attempt < ATTEMPTS => {
                    eprintln!(
                        "holdfast server: notify: {} failed (attempt {attempt} of {ATTEMPTS}, \
                         retrying in {:?}): {e}",
                        describe(&m),
                        wait
                    );
                    std::thread::sleep(wait);
                    wait *= 2;
                    attempt += 1;
                }
                Err(e) => {
                    counters.failed.fetch_add(1, Ordering::Relaxed);
                    eprintln!(
                        "holdfast server: notify: {} failed, giving up after {ATTEMPTS} attempts: {e}",
                        describe(&m)
                    );
                    break;
                }
            }
        }
    }
}

fn send(t: &Transports, m: &Outgoing) -> Result<(), String> {
    match m {
        Outgoing::Email { to, subject, body } => {
            let Some((smtp, from)) = &t.smtp else {
                return Err("no working SMTP setup".into());
            };
            let msg = build_email(from, to, subject, body)?;
            lettre::Transport::send(smtp, &msg)
                .map(|_| ())
                .map_err(|e| format!("SMTP: {e}"))
        }
        Outgoing::Webhook { url, body } => {
            let Some(http) = &t.http else {
                return Err("no working HTTP client".into());
            };
            let r = http
                .post(url)
                .json(body)
                .send()
                .map_err(|e| format!("POST: {e}"))?;
            if r.status().is_success() {
                Ok(())
            } else {
                Err(format!("POST answered {}", r.status()))
            }
        }
    }
}

/// The e-mail as lettre builds it.
pub fn build_email(
    from: &lettre::message::Mailbox,
    to: &[String],
    subject: &str,
    body: &str,
) -> Result<lettre::Message, String> {
    let mut b = lettre::Message::builder()
        .from(from.clone())
        .subject(subject)
        .header(lettre::message::header::ContentType::TEXT_PLAIN);
    for a in to {
        let mb: lettre::message::Mailbox =
            a.parse().map_err(|e| format!("recipient {a:?}: {e}"))?;
        b = b.to(mb);
    }
    b.body(body.to_string())
        .map_err(|e| format!("building the e-mail: {e}"))
}

fn smtp_transport(
    c: &crate::config::Smtp,
    password: Option<&str>,
) -> Result<(lettre::SmtpTransport, lettre::message::Mailbox), String> {
    use lettre::transport::smtp::client::{Tls, TlsParameters};
    use lettre::transport::smtp::extension::ClientId;
    let from: lettre::message::Mailbox = c
        .from
        .parse()
        .map_err(|e| format!("smtp.from {:?}: {e}", c.from))?;
    let security = Security::parse(&c.security)
        .ok_or_else(|| format!("smtp.security {:?} is unknown", c.security))?;
    let extra_ca = match &c.ca_file {
        Some(p) => {
            let pem = std::fs::read(p).map_err(|e| format!("smtp.ca_file {}: {e}", p.display()))?;
            // lettre accepts a PEM without any certificate: count them here.
            use rustls::pki_types::pem::PemObject;
            let certs = rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("smtp.ca_file {}: {e}", p.display()))?;
            if certs.is_empty() {
                return Err(format!(
                    "smtp.ca_file {}: no PEM certificate in it",
                    p.display()
                ));
            }
            Some(
                lettre::transport::smtp::client::Certificate::from_pem(&pem).map_err(|e| {
                    format!("smtp.ca_file {}: not a PEM certificate: {e}", p.display())
                })?,
            )
        }
        None => None,
    };
    let tls = || {
        let mut b = TlsParameters::builder(c.host.clone());
        if let Some(ca) = &extra_ca {
            b = b.add_root_certificate(ca.clone());
        }
        b.build().map_err(|e| format!("TLS setup: {e}"))
    };
    let tls = match security {
        Security::None => Tls::None,
        Security::StartTls => Tls::Required(tls()?),
        Security::Tls => Tls::Wrapper(tls()?),
    };
    let hello = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    let mut b = lettre::SmtpTransport::builder_dangerous(c.host.clone())
        .port(c.port)
        .tls(tls)
        .hello_name(ClientId::Domain(hello))
        .timeout(Some(Duration::from_secs(c.timeout_seconds)));
    if let Some(u) = &c.username {
        b = b.credentials(lettre::transport::smtp::authentication::Credentials::new(
            u.clone(),
            password.unwrap_or_default().to_string(),
        ));
    }
    Ok((b.build(), from))
}

/// A plain HTTPS client trusting the system's certificate authorities.
fn http_client(timeout: Duration) -> Result<reqwest::blocking::Client, String> {
    let mut roots = rustls::RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    for c in found.certs {
        let _ = roots.add(c);
    }
    if roots.is_empty() {
        eprintln!(
            "holdfast server: notify: no system certificate authorities found; https:// webhooks will fail"
        );
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS setup: {e}"))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    reqwest::blocking::Client::builder()
        .tls_backend_preconfigured(tls)
        .connect_timeout(Duration::from_secs(10))
        .timeout(timeout)
        .user_agent(concat!("holdfast/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("HTTP client: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::{JobKind, JobState};

    fn alert() -> AlertInfo {
        AlertInfo {
            id: 7,
            severity: Severity::Warning,
            subject: "hv01/web01".into(),
            kind: "disk-missing".into(),
            message: "sync job 3 failed: disk\nvda is gone".into(),
            raised: "2026-01-02T03:04:05Z".into(),
            last_seen: "2026-01-02T03:04:05Z".into(),
            resolved: None,
            occurrences: 1,
            note: None,
        }
    }

    fn job() -> JobInfo {
        JobInfo {
            id: 42,
            kind: JobKind::Sync,
            state: JobState::Succeeded,
            vm: protocol::DataSourceName::parse("hv01/web01"),
            datasource_id: Some("ds".into()),
            trigger: "admin".into(),
            created: "2026-01-02T03:00:00Z".into(),
            started: Some("2026-01-02T03:00:00Z".into()),
            finished: Some("2026-01-02T04:01:05Z".into()),
            bytes_done: 0,
            bytes_total: 0,
            bytes_read: 1048576,
            bytes_sent: 4096,
            recovery_point: Some("20260102T040105Z-abc".into()),
            error: None,
            attempt: 1,
            not_before: None,
            rate_bytes_per_sec: None,
            eta_seconds: None,
            bytes_fetched: None,
            bytes_written: None,
            write_rate_bytes_per_sec: None,
            log: Vec::new(),
        }
    }

    #[test]
    fn alert_message() {
        let (s, b) = alert_email(&alert(), Some("https://backup:8443"));
        assert_eq!(s, "[Holdfast] warning: hv01/web01: disk-missing");
        assert!(b.contains("Subject:  hv01/web01\n"), "{b}");
        assert!(b.contains("Kind:     disk-missing\n"), "{b}");
        assert!(b.contains("disk\nvda is gone"), "{b}");
        assert!(b.contains("Server: https://backup:8443"), "{b}");
        let (_, b) = alert_email(&alert(), None);
        assert!(!b.contains("Server:"));
        let mut a = alert();
        a.subject = "evil\r\nBcc: x@y.z".into();
        assert!(!alert_email(&a, None).0.contains('\n'));
        let w = alert_event(
            "alert-raised",
            &alert(),
            Some("https://backup:8443"),
            alert_email,
        );
        assert_eq!(w["summary"], "[Holdfast] warning: hv01/web01: disk-missing");
        assert_eq!(w["event"], "alert-raised");
        assert_eq!(w["alert"]["severity"], "warning");
        assert_eq!(w["alert"]["subject"], "hv01/web01");
        assert_eq!(w["alert"]["kind"], "disk-missing");
        assert_eq!(w["server"], "https://backup:8443");
    }

    #[test]
    fn job_message() {
        let (s, b) = job_email(&job(), None);
        assert_eq!(s, "[Holdfast] job 42 sync hv01/web01 succeeded");
        for want in [
            "Job:            42\n",
            "VM:             hv01/web01\n",
            "State:          succeeded\n",
            "Duration:       1h 1m 5s\n",
            "Bytes read:     1048576\n",
            "Bytes sent:     4096\n",
            "Recovery point: 20260102T040105Z-abc\n",
        ] {
            assert!(b.contains(want), "{want:?} not in {b}");
        }
        assert!(!b.contains("Error:"));
        let mut j = job();
        j.kind = JobKind::Verify;
        j.vm = None;
        j.state = JobState::Failed;
        j.recovery_point = None;
        j.error = Some("damage".into());
        j.finished = Some("2026-01-02T03:00:09Z".into());
        let (s, b) = job_email(&j, Some("https://b"));
        assert_eq!(s, "[Holdfast] job 42 verify failed");
        assert!(b.contains("Error:          damage\n"), "{b}");
        assert!(b.contains("Duration:       9s\n"), "{b}");
        assert!(!b.contains("Recovery point"));
    }

    #[test]
    fn a_bad_ca_file_is_a_setup_error() {
        let d = tempfile::tempdir().unwrap();
        let ca = d.path().join("ca.pem");
        std::fs::write(&ca, "not a certificate").unwrap();
        let mut c = crate::config::Smtp {
            host: "mail.example.net".into(),
            from: "holdfast@example.net".into(),
            ca_file: Some(ca.clone()),
            ..Default::default()
        };
        let e = smtp_transport(&c, None).unwrap_err();
        assert!(e.contains("smtp.ca_file") && e.contains("ca.pem"), "{e}");
        c.ca_file = Some(d.path().join("missing.pem"));
        let e = smtp_transport(&c, None).unwrap_err();
        assert!(e.contains("missing.pem"), "{e}");
    }

    #[test]
    fn email_builds() {
        let from = "Holdfast <holdfast@example.net>".parse().unwrap();
        let (s, b) = job_email(&job(), None);
        let m = build_email(&from, &["a@b.c".into(), "d@e.f".into()], &s, &b).unwrap();
        let text = String::from_utf8(m.formatted()).unwrap();
        assert!(text.contains("Subject: [Holdfast] job 42 sync hv01/web01 succeeded"));
        assert!(text.contains("To: a@b.c, d@e.f"), "{text}");
        assert!(build_email(&from, &["nobody".into()], &s, &b).is_err());
    }

    #[test]
    fn failed_sends_are_retried_then_counted() {
        // A port nobody listens on (bound, then closed).
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let setup = Setup {
            smtp: crate::config::Smtp {
                host: "127.0.0.1".into(),
                port,
                security: "none".into(),
                username: Some("u".into()),
                from: "h@example.net".into(),
                timeout_seconds: 2,
                ..Default::default()
            },
            password: Some("secret".into()),
            webhooks: true,
            first_retry: Duration::from_millis(10),
        };
        let (tx, rx) = sync_channel(4);
        tx.send(Outgoing::Email {
            to: vec!["a@b.c".into()],
            subject: "s".into(),
            body: "b".into(),
        })
        .unwrap();
        tx.send(Outgoing::Webhook {
            url: format!("http://127.0.0.1:{port}/h"),
            body: serde_json::json!({}),
        })
        .unwrap();
        drop(tx);
        let c = Counters::default();
        sender(setup, rx, &c);
        assert_eq!(c.failed.load(Ordering::Relaxed), 2);
        assert_eq!(c.sent.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn severity_filter_and_new_only() {
        let cat = Catalog::open_in_memory().unwrap();
        let (tx, rx) = sync_channel(8);
        let n = Notifier {
            tx: Some(tx),
            email_to: vec!["ops@example.net".into()],
            webhooks: vec!["http://127.0.0.1:9/h".into()],
            min_severity: Severity::Warning,
            smtp: true,
            url: OnceLock::new(),
            counters: Arc::new(Counters::default()),
        };
        n.raise_alert(&cat, 1, Severity::Info, "datastore", "x", "m")
            .unwrap();
        assert!(rx.try_recv().is_err(), "info is below warning");
        n.raise_alert(&cat, 1, Severity::Error, "hv/a", "backup-failed", "m")
            .unwrap();
        assert!(matches!(rx.try_recv(), Ok(Outgoing::Email { .. })));
        assert!(matches!(rx.try_recv(), Ok(Outgoing::Webhook { .. })));
        n.raise_alert(&cat, 2, Severity::Error, "hv/a", "backup-failed", "again")
            .unwrap();
        assert!(
            rx.try_recv().is_err(),
            "a repeat of an open alert is not sent"
        );
        // Critical is above error: sent under any filter, and its resolution too.
        n.raise_alert(&cat, 3, Severity::Critical, "hv/a", "vm-id-conflict", "m")
            .unwrap();
        assert!(
            matches!(rx.try_recv(), Ok(Outgoing::Email { subject, .. }) if subject.contains("critical"))
        );
        assert!(matches!(rx.try_recv(), Ok(Outgoing::Webhook { .. })));
        let id = cat.alerts(false).unwrap()[0].id;
        let a = n.resolve_alert(&cat, 4, id, Some("a test VM")).unwrap();
        assert_eq!(a.note.as_deref(), Some("a test VM"));
        match rx.try_recv() {
            Ok(Outgoing::Email { subject, body, .. }) => {
                assert!(subject.contains("resolved"), "{subject}");
                assert!(body.contains("Note: a test VM"), "{body}");
            }
            _ => panic!("the resolution of a critical alert is sent"),
        }
        assert!(matches!(rx.try_recv(), Ok(Outgoing::Webhook { .. })));
        // A full queue drops and counts.
        for _ in 0..10 {
            n.job_finished(&job(), vec!["a@b.c".into()]);
        }
        assert_eq!(n.counters.dropped.load(Ordering::Relaxed), 2);
    }
}
