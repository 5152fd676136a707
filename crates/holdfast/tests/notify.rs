//! Notifications end to end: a real server sends alert e-mails to a real SMTP listener
//! (Python aiosmtpd, tests/fixtures/smtp_sink.py; scripts/install-deps installs it),
//! alert webhooks to an HTTP listener in this test, and a job e-mail to the address
//! `backup-now --notify` names.

mod common;

use common::cluster::*;
use common::*;
use protocol::*;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

fn make_vm(root: &Path, name: &str, size: u64, random: u64, seed: u64) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let raw = root.join(format!(".{name}.raw"));
    make_disk(&raw, size, random, seed);
    let disk = dir.join(format!("{name}-disk0.qcow2"));
    ok(&["image", "convert", s(&raw), s(&disk), "-f", "qcow2"]);
    std::fs::remove_file(&raw).unwrap();
    std::fs::write(
        dir.join("vm.toml"),
        format!("disks = [\"{name}-disk0.qcow2\"]\n"),
    )
    .unwrap();
    disk
}

/// The SMTP listener process; killed on drop.
struct SmtpSink {
    child: Child,
    _stdin: ChildStdin,
    port: u16,
    folder: PathBuf,
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl SmtpSink {
    fn start(dir: &Path) -> SmtpSink {
        Self::start_with(dir, &[])
    }

    /// With listener options (`--starttls CERT KEY`, `--auth USER PASSWORD`).
    fn start_with(dir: &Path, args: &[&str]) -> SmtpSink {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smtp_sink.py");
        let folder = dir.join("mail");
        let log = dir.join("smtp_sink.log");
        let mut child = Command::new("python3")
            .arg(&script)
            .arg(&folder)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run python3 for the SMTP listener ({e}); run scripts/install-deps")
            });
        let stdin = child.stdin.take().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let Some(port) = line
            .trim()
            .strip_prefix("ready ")
            .and_then(|p| p.parse().ok())
        else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the SMTP listener (python3 {}) did not start: {}\n\
                 (it needs the Python package aiosmtpd: run scripts/install-deps)",
                script.display(),
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        };
        SmtpSink {
            child,
            _stdin: stdin,
            port,
            folder,
        }
    }

    /// Every message received so far: (envelope recipients, headers unfolded, body).
    fn messages(&self) -> Vec<Mail> {
        let mut names: Vec<PathBuf> = std::fs::read_dir(&self.folder)
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        names.retain(|p| p.extension().is_some_and(|e| e == "eml"));
        names.sort();
        names
            .iter()
            .map(|p| Mail::parse(&std::fs::read_to_string(p).unwrap()))
            .collect()
    }

    /// Waits for the first message `f` accepts.
    fn wait_for(&self, what: &str, f: impl Fn(&Mail) -> bool) -> Mail {
        let start = Instant::now();
        loop {
            if let Some(m) = self.messages().into_iter().find(|m| f(m)) {
                return m;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "timed out waiting for {what}; received: {:#?}",
                self.messages()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[derive(Debug)]
struct Mail {
    rcpt_to: String,
    headers: String,
    body: String,
}

impl Mail {
    fn parse(text: &str) -> Mail {
        let text = text.replace("\r\n", "\n");
        let (head, body) = text.split_once("\n\n").unwrap_or((&text, ""));
        let headers = head.replace("\n ", " ").replace("\n\t", " ");
        let rcpt_to = headers
            .lines()
            .find_map(|l| l.strip_prefix("X-Rcpt-To: "))
            .unwrap_or_default()
            .to_string();
        let qp = headers
            .to_ascii_lowercase()
            .contains("content-transfer-encoding: quoted-printable");
        Mail {
            rcpt_to,
            body: if qp {
                quoted_printable(body)
            } else {
                body.to_string()
            },
            headers,
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then_some(v.trim())
        })
    }

    fn subject(&self) -> &str {
        self.header("Subject").unwrap_or_default()
    }
}

fn quoted_printable(s: &str) -> String {
    let s = s.replace("=\n", "");
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'='
            && i + 2 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// An HTTP listener that answers 200 to everything; each request's (request line,
/// body) comes out of the receiver.
fn webhook_sink() -> (u16, Receiver<(String, String)>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut conn) = conn else { continue };
            let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
            let mut r = BufReader::new(conn.try_clone().unwrap());
            let mut request = String::new();
            if r.read_line(&mut request).is_err() {
                continue;
            }
            let mut len = 0usize;
            loop {
                let mut h = String::new();
                if r.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
                    break;
                }
                if let Some((k, v)) = h.split_once(':')
                    && k.eq_ignore_ascii_case("content-length")
                {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; len];
            if r.read_exact(&mut body).is_err() {
                continue;
            }
            let _ = conn
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
            let _ = tx.send((
                request.trim().to_string(),
                String::from_utf8_lossy(&body).into_owned(),
            ));
        }
    });
    (port, rx)
}

#[test]
fn alerts_and_jobs_are_emailed_and_posted() {
    let t = tempfile::tempdir().unwrap();
    let smtp = SmtpSink::start(t.path());
    let (hook_port, hooks) = webhook_sink();
    let vms = t.path().join("vms");
    make_vm(&vms, "web", 8 << 20, 2 << 20, 31);
    let app = make_vm(&vms, "app", 8 << 20, 2 << 20, 32);
    let toml = format!(
        "{FAST}[notify]\nemail_to = [\"ops@example.net\"]\n\
         webhooks = [\"http://127.0.0.1:{hook_port}/holdfast\"]\nmin_severity = \"warning\"\n\
         [smtp]\nhost = \"127.0.0.1\"\nport = {}\nsecurity = \"none\"\n\
         from = \"Holdfast <holdfast@example.net>\"\ntimeout_seconds = 10\n",
        smtp.port
    );
    let mut c = Cluster::start(t.path(), &toml);
    c.agent("hv01", &vms);
    c.wait_datasources(2);
    c.protect_daily("pg", &["hv01/web", "hv01/app"]);

    // A job that asks: its end is e-mailed to whom it names, with the recovery point.
    let out = c.cli_ok(&[
        "backup-now",
        "hv01/web",
        "--notify",
        "a@b.c",
        "--notify",
        "d@e.f",
        "--wait",
        "--json",
    ]);
    let job: JobInfo = serde_json::from_str(&out).unwrap();
    assert_eq!(job.state, JobState::Succeeded, "{out}");
    let rp = job.recovery_point.clone().unwrap();
    let m = smtp.wait_for("the job e-mail", |m| m.rcpt_to.contains("a@b.c"));
    assert_eq!(
        m.subject(),
        format!("[Holdfast] job {} sync hv01/web succeeded", job.id)
    );
    assert!(m.rcpt_to.contains("d@e.f"), "{m:?}");
    assert!(!m.rcpt_to.contains("ops@example.net"), "{m:?}");
    assert_eq!(
        m.header("From"),
        Some("Holdfast <holdfast@example.net>"),
        "{m:?}"
    );
    for want in [
        format!("Job:            {}", job.id),
        "VM:             hv01/web".to_string(),
        "State:          succeeded".to_string(),
        format!("Recovery point: {rp}"),
        format!("Server: {}", c.url),
    ] {
        assert!(m.body.contains(&want), "{want:?} not in {m:?}");
    }

    // A recovery asks too: the copy's end is e-mailed.
    let copies = c.dir.join("copies");
    let out = c.cli_ok(&[
        "recover",
        "hv01/web",
        "--copy-to",
        &format!("hv01:{}", copies.display()),
        "--notify",
        "r@b.c",
        "--wait",
        "--json",
    ]);
    let rjob: JobInfo = serde_json::from_str(&out).unwrap();
    assert_eq!(rjob.state, JobState::Succeeded, "{out}");
    let m = smtp.wait_for("the recovery e-mail", |m| m.rcpt_to.contains("r@b.c"));
    assert_eq!(
        m.subject(),
        format!("[Holdfast] job {} recovery hv01/web succeeded", rjob.id)
    );

    // Bad requests: an address that is not one.
    let o = c.cli(&["backup-now", "hv01/web", "--notify", "nobody"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("not an e-mail address"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // A disk vanishes: the backup fails, a disk-missing alert is raised, e-mailed to
    // notify.email_to and POSTed to the webhook.
    std::fs::rename(&app, t.path().join("away.qcow2")).unwrap();
    let o = c.cli(&["backup-now", "hv01/app", "--wait"]);
    assert_eq!(o.status.code(), Some(1));
    let m = smtp.wait_for("the alert e-mail", |m| {
        m.rcpt_to.contains("ops@example.net")
    });
    assert_eq!(
        m.subject(),
        "[Holdfast] error: hv01/app: disk-missing",
        "{m:?}"
    );
    assert!(m.body.contains("Subject:  hv01/app"), "{m:?}");
    assert!(m.body.contains("Kind:     disk-missing"), "{m:?}");
    assert!(m.body.contains("app-disk0.qcow2"), "{m:?}");
    let (request, body) = hooks
        .recv_timeout(Duration::from_secs(60))
        .expect("no webhook POST within 60 s");
    assert_eq!(request, "POST /holdfast HTTP/1.1");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["event"], "alert-raised", "{v}");
    assert_eq!(v["alert"]["subject"], "hv01/app", "{v}");
    assert_eq!(v["alert"]["kind"], "disk-missing", "{v}");
    assert_eq!(v["alert"]["severity"], "error", "{v}");
    assert_eq!(v["server"], c.url.as_str(), "{v}");

    // Its reruns fail the same way: the open alert is updated, not sent again.
    let attempts = 3;
    wait_until("the reruns to fail", Duration::from_secs(90), || {
        c.jobs()
            .iter()
            .filter(|j| j.vm.as_deref() == Some("hv01/app") && j.state == JobState::Failed)
            .count()
            == attempts
    });
    let status: ServerStatus = c.admin().get("/status").unwrap();
    assert_eq!(status.notifications_failed, 0, "{status:?}");
    assert_eq!(status.notifications_dropped, 0, "{status:?}");
    let alert_mails = smtp
        .messages()
        .iter()
        .filter(|m| m.rcpt_to.contains("ops@example.net"))
        .count();
    assert_eq!(alert_mails, 1, "{:#?}", smtp.messages());
    assert!(
        hooks.try_recv().is_err(),
        "a repeated alert was POSTed again"
    );
    let a = c.alerts();
    let a = a.iter().find(|a| a.kind == "disk-missing").unwrap();
    assert!(a.occurrences >= attempts as u64, "{a:?}");

    // The disk comes back: the next backup resolves the alert, and that is told too.
    std::fs::rename(t.path().join("away.qcow2"), &app).unwrap();
    c.cli_ok(&["backup-now", "hv01/app", "--wait"]);
    let m = smtp.wait_for("the resolved e-mail", |m| {
        m.subject() == "[Holdfast] resolved: hv01/app: disk-missing"
    });
    assert!(m.rcpt_to.contains("ops@example.net"), "{m:?}");
    assert!(m.body.contains("Kind:        disk-missing"), "{m:?}");
    assert!(
        m.body.contains(&format!("Occurrences: {}", a.occurrences)),
        "{m:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let v = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let (_, body) = hooks
            .recv_timeout(left)
            .expect("no alert-resolved webhook POST within 60 s");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        if v["alert"]["kind"] == "disk-missing" {
            break v;
        }
    };
    assert_eq!(v["event"], "alert-resolved", "{v}");
    assert!(v["alert"]["resolved"].is_string(), "{v}");
}

#[test]
fn mail_goes_over_starttls_with_a_login_to_a_private_ca() {
    let t = tempfile::tempdir().unwrap();
    // The relay's certificate comes from a CA of its own, as an internal relay's would.
    let pki_dir = t.path().join("relay-pki");
    pki::ServerPki::load_or_create(&pki_dir, &["127.0.0.1".to_string()]).unwrap();
    let smtp = SmtpSink::start_with(
        t.path(),
        &[
            "--starttls",
            s(&pki_dir.join("server.pem")),
            s(&pki_dir.join("server.key")),
            "--auth",
            "holdfast",
            "s3cret pass",
        ],
    );
    let password = t.path().join("smtp.password");
    std::fs::write(&password, "s3cret pass\n").unwrap();
    let vms = t.path().join("vms");
    make_vm(&vms, "web", 8 << 20, 2 << 20, 41);
    let toml = format!(
        "{FAST}[smtp]\nhost = \"127.0.0.1\"\nport = {}\nsecurity = \"starttls\"\n\
         username = \"holdfast\"\npassword_file = \"{}\"\nca_file = \"{}\"\n\
         from = \"holdfast@example.net\"\ntimeout_seconds = 10\n",
        smtp.port,
        s(&password),
        s(&pki_dir.join("ca.pem"))
    );
    let mut c = Cluster::start(t.path(), &toml);
    c.agent("hv01", &vms);
    c.wait_datasources(1);
    c.protect_daily("pg", &["hv01/web"]);
    let out = c.cli_ok(&[
        "backup-now",
        "hv01/web",
        "--notify",
        "tls@b.c",
        "--wait",
        "--json",
    ]);
    let job: JobInfo = serde_json::from_str(&out).unwrap();
    // The listener takes mail only after STARTTLS and AUTH: its arrival is the proof.
    let m = smtp.wait_for("the e-mail over STARTTLS", |m| {
        m.rcpt_to.contains("tls@b.c")
    });
    assert_eq!(
        m.subject(),
        format!("[Holdfast] job {} sync hv01/web succeeded", job.id)
    );
    let st: serde_json::Value = c.admin().get("/status").unwrap();
    assert_eq!(st["notifications_failed"], 0, "{st}");
    assert!(st["notifications_sent"].as_u64().unwrap() >= 1, "{st}");
}
