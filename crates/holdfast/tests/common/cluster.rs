//! A `holdfast server` process and agents started against it, for the end-to-end
//! tests (server.rs, qemu.rs).

use super::*;
use client::{Auth, Client};
use protocol::*;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A server process and the agents started against it; all killed on drop.
pub struct Cluster {
    pub dir: PathBuf,
    pub server: Option<Child>,
    pub agents: Vec<Child>,
    pub url: String,
    /// Environment given to agents started from now on (test hooks).
    pub agent_env: Vec<(String, String)>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in self.server.iter_mut().chain(self.agents.iter_mut()) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Scheduler settings that make tests quick: a 1 s tick, 2 s polls, policy minutes
/// lasting 0.2 s (a 15-minute synchronization frequency fires every 3 s).
/// Test servers do not alert on the test machine's own free space (CI disks can be
/// nearly full); `server.rs` checks that alert with a threshold it controls.
pub const FAST: &str = "[scheduler]\ntick_seconds = 1\npoll_seconds = 2\ntime_scale = 300.0\nrerun_delay_seconds = 1\n[limits]\nlow_space_percent = 0\n";

impl Cluster {
    pub fn start(dir: &Path, toml: &str) -> Cluster {
        let sdir = dir.join("server");
        std::fs::create_dir_all(&sdir).unwrap();
        std::fs::write(sdir.join("holdfast.toml"), toml).unwrap();
        let mut c = Cluster {
            dir: dir.to_path_buf(),
            server: None,
            agents: Vec::new(),
            url: String::new(),
            agent_env: Vec::new(),
        };
        c.start_server();
        c
    }

    pub fn server_dir(&self) -> PathBuf {
        self.dir.join("server")
    }

    pub fn datastore(&self) -> PathBuf {
        self.server_dir().join("datastore")
    }

    /// Starts (or restarts) the server on a port of its choosing; returns once it
    /// answers.
    pub fn start_server(&mut self) {
        let listen = if self.url.is_empty() {
            "127.0.0.1:0".to_string()
        } else {
            self.url.trim_start_matches("https://").to_string()
        };
        let mut child = Command::new(BIN)
            .args([
                "server",
                "--data-dir",
                s(&self.server_dir()),
                "--listen",
                &listen,
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut first = String::new();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        out.read_line(&mut first).unwrap();
        // Keep reading, so the server never writes into a closed pipe.
        std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
        let url = first
            .trim()
            .strip_prefix("holdfast server listening on ")
            .unwrap_or_else(|| panic!("unexpected first line from the server: {first:?}"))
            .to_string();
        self.url = url;
        self.server = Some(child);
        wait_until("the server answers", Duration::from_secs(30), || {
            self.admin().get::<ServerStatus>("/status").is_ok()
        });
    }

    pub fn kill_server(&mut self) {
        if let Some(mut c) = self.server.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    pub fn admin(&self) -> Client {
        let token = std::fs::read_to_string(self.server_dir().join("admin.token")).unwrap();
        self.client(Auth::Token(token.trim().to_string()))
    }

    /// A client that trusts this server's CA and presents no credentials.
    pub fn anonymous(&self) -> Client {
        self.client(Auth::None)
    }

    /// A client that trusts this server's CA and presents `auth`.
    pub fn client(&self, auth: Auth) -> Client {
        let ca = std::fs::read_to_string(self.server_dir().join("ca.pem")).unwrap();
        Client::new(&self.url, pki::client_config_trusting(&ca).unwrap(), auth).unwrap()
    }

    /// The admin CLI with this server's flags.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        let sd = self.server_dir();
        let ca = sd.join("ca.pem");
        let tok = sd.join("admin.token");
        let mut all = vec![
            "--server",
            &self.url,
            "--ca-file",
            s(&ca),
            "--token-file",
            s(&tok),
        ];
        all.extend_from_slice(args);
        holdfast(&all)
    }

    pub fn cli_ok(&self, args: &[&str]) -> String {
        let o = self.cli(args);
        assert!(
            o.status.success(),
            "holdfast {args:?} failed: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    }

    pub fn token(&self, host: &str) -> String {
        let v: serde_json::Value = serde_json::from_str(&self.cli_ok(&[
            "agent-token",
            "create",
            "--host",
            host,
            "--json",
        ]))
        .unwrap();
        v["token"].as_str().unwrap().to_string()
    }

    /// Enrolls and starts an agent for `host` over `vms`; returns its data dir.
    pub fn agent(&mut self, host: &str, vms: &Path) -> PathBuf {
        self.agent_with(host, &["--files-root", s(vms)])
    }

    /// Enrolls (first time) and starts an agent for `host` with these provider
    /// arguments; returns its data dir. Its index in `agents` is the last.
    pub fn agent_with(&mut self, host: &str, provider: &[&str]) -> PathBuf {
        let adir = self.dir.join(format!("agent-{host}"));
        let token = self.token(host);
        let mut args = vec![
            "agent",
            "--server",
            &self.url,
            "--enroll",
            &token,
            "--data-dir",
            s(&adir),
            "--inventory-seconds",
            "1",
        ];
        args.extend_from_slice(provider);
        let child = Command::new(BIN)
            .args(&args)
            .envs(self.agent_env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        self.agents.push(child);
        adir
    }

    pub fn datasources(&self) -> Vec<DataSourceInfo> {
        self.admin().get("/datasources").unwrap()
    }

    pub fn wait_datasources(&self, n: usize) {
        wait_until("the agents' inventory", Duration::from_secs(30), || {
            self.datasources().iter().filter(|d| d.present).count() >= n
        });
    }

    pub fn jobs(&self) -> Vec<JobInfo> {
        self.admin().get("/jobs?limit=1000").unwrap()
    }

    pub fn job(&self, id: i64) -> JobInfo {
        self.admin().get(&format!("/jobs/{id}")).unwrap()
    }

    pub fn wait_job(&self, id: i64) -> JobInfo {
        let mut last = None;
        wait_until(
            &format!("job {id} to end"),
            Duration::from_secs(120),
            || {
                let j = self.job(id);
                let done = j.state.finished();
                last = Some(j);
                done
            },
        );
        last.unwrap()
    }

    pub fn alerts(&self) -> Vec<AlertInfo> {
        self.admin().get("/alerts").unwrap()
    }
}

impl Cluster {
    /// Puts `members` in a new protection group (daily synchronization, so only the
    /// test's own backups run) and waits for their initial replicas; a failed one
    /// fails the test at once.
    pub fn protect_daily(&self, group: &str, members: &[&str]) {
        self.create_group(group, members, &["--recovery-point-times", "20:00"]);
        wait_until("the initial replicas", Duration::from_secs(120), || {
            let jobs = self.jobs();
            let initial = |st: JobState| {
                jobs.iter()
                    .filter(|j| j.kind == JobKind::InitialReplica && j.state == st)
                    .count()
            };
            assert_eq!(initial(JobState::Failed), 0, "{jobs:?}");
            initial(JobState::Succeeded) == members.len()
        });
    }
}

impl Cluster {
    /// `pg create GROUP` with `members`, 7 days of retention, a daily synchronization
    /// and the policy arguments `more`.
    pub fn create_group(&self, group: &str, members: &[&str], more: &[&str]) {
        let mut args = vec!["pg", "create", group];
        for m in members {
            args.extend_from_slice(&["--member", m]);
        }
        args.extend_from_slice(&["--retention-days", "7", "--sync-frequency", "1440"]);
        args.extend_from_slice(more);
        self.cli_ok(&args);
    }
}

pub fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
