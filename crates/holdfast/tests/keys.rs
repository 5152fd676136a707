//! Enrollment and key files with the real binary: re-enrolling an agent whose
//! certificate was revoked, an enrollment request that cannot be served leaving its
//! token usable, `--key-file` on a plain datastore, and key files others can read.

mod common;

use common::cluster::*;
use common::*;
use protocol::*;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn agent_info(c: &Cluster, host: &str) -> Option<AgentInfo> {
    let list: Vec<AgentInfo> = c.admin().get("/agents").unwrap();
    list.into_iter().find(|a| a.host == host)
}

/// An agent process, killed when dropped (a failed test leaves none behind).
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `holdfast agent --enroll TOKEN` on `dir` with an empty files root.
fn start_agent(c: &Cluster, dir: &Path, token: &str) -> Agent {
    let vms = c.dir.join("vms");
    std::fs::create_dir_all(&vms).unwrap();
    Command::new(BIN)
        .args([
            "agent",
            "--server",
            &c.url,
            "--enroll",
            token,
            "--data-dir",
            s(dir),
            "--inventory-seconds",
            "1",
            "--files-root",
            s(&vms),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map(Agent)
        .unwrap()
}

/// Waits until `f`, failing at once if the agent exits meanwhile.
fn wait_running(what: &str, agent: &mut Agent, mut f: impl FnMut() -> bool) {
    wait_until(what, Duration::from_secs(30), || {
        if let Some(st) = agent.0.try_wait().unwrap() {
            panic!("the agent exited ({st}) while waiting for {what}");
        }
        f()
    });
}

#[test]
fn a_new_token_re_enrolls_an_agent_whose_certificate_was_revoked() {
    let t = tempfile::tempdir().unwrap();
    let c = Cluster::start(t.path(), FAST);
    let dir = t.path().join("agent-hv01");
    let mut first = start_agent(&c, &dir, &c.token("hv01"));
    wait_running("the first enrollment", &mut first, || {
        agent_info(&c, "hv01").is_some_and(|a| a.connected)
    });
    let old_fp = agent_info(&c, "hv01").unwrap().cert_fingerprint;
    let old_key = std::fs::read(dir.join("agent.key")).unwrap();

    // Revoked: the agent stops.
    c.cli_ok(&["agents", "revoke", "hv01"]);
    let st = run_wait(&mut first.0, Duration::from_secs(30));
    assert!(!st.success());

    // A new token into the same folder: enrolled again, with a new key and
    // certificate, and running.
    let token = c.token("hv01");
    let seen = agent_info(&c, "hv01").unwrap().last_seen;
    let mut again = start_agent(&c, &dir, &token);
    // The server records the new certificate before the agent has stored it; the
    // agent's first call with it (a newer last contact) says it is in place.
    wait_running("the re-enrolled agent to call", &mut again, || {
        agent_info(&c, "hv01")
            .is_some_and(|a| !a.revoked && a.cert_fingerprint != old_fp && a.last_seen > seen)
    });
    let new_fp = agent_info(&c, "hv01").unwrap().cert_fingerprint;
    let new_key = std::fs::read(dir.join("agent.key")).unwrap();
    assert_ne!(new_key, old_key, "the key was not replaced");
    let mode = std::fs::metadata(dir.join("agent.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let identity = pki::AgentIdentity::load(&dir).unwrap();
    assert_eq!(identity.fingerprint(), new_fp);
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".next") || n.contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // Started again with the same (now used) token, as a service file would: no
    // new enrollment, the same certificate, running.
    drop(again);
    let seen = agent_info(&c, "hv01").unwrap().last_seen;
    let mut restarted = start_agent(&c, &dir, &token);
    wait_running("the restarted agent to call", &mut restarted, || {
        agent_info(&c, "hv01").is_some_and(|a| a.last_seen > seen)
    });
    let status = c.admin().get::<ServerStatus>("/status").unwrap();
    assert_eq!(status.agents, 1);
    assert_eq!(agent_info(&c, "hv01").unwrap().cert_fingerprint, new_fp);
    assert_eq!(
        pki::AgentIdentity::load(&dir).unwrap().fingerprint(),
        new_fp
    );
}

/// Waits for a child to exit, killing it and failing after `limit`.
fn run_wait(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let mut status = None;
    wait_until("the agent to stop", limit, || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    status.unwrap()
}

#[test]
fn a_malformed_public_key_does_not_use_up_the_token() {
    let t = tempfile::tempdir().unwrap();
    let c = Cluster::start(t.path(), FAST);
    let token = c.token("hv01");
    let anon = c.anonymous();
    for key in [
        "not a key".to_string(),
        "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n".to_string(),
    ] {
        let e = anon
            .post::<_, EnrollResponse>(
                "/enroll",
                &EnrollRequest {
                    token: token.clone(),
                    public_key_pem: key,
                    version: "0.1.0".into(),
                },
            )
            .unwrap_err();
        assert_eq!(e.status(), Some(400), "{e}");
        assert!(e.to_string().contains("public_key_pem"), "{e}");
    }
    assert!(agent_info(&c, "hv01").is_none());
    // The same token still enrolls a real agent.
    let mut agent = start_agent(&c, &t.path().join("agent"), &token);
    wait_running("the enrollment with the same token", &mut agent, || {
        agent_info(&c, "hv01").is_some_and(|a| !a.revoked)
    });
}

#[test]
fn key_file_on_a_plain_datastore_is_refused_by_every_command() {
    let t = tempfile::tempdir().unwrap();
    let plain = t.path().join("plain");
    create_store(&plain);
    let disk = t.path().join("d.img");
    make_disk(&disk, 4 << 20, 1 << 20, 3);
    backup(&plain, "web", &[&disk]);
    // A real key file, of another (encrypted) datastore.
    let enc = t.path().join("enc");
    ok(&["datastore", "create", s(&enc), "--encrypt"]);
    let key = datastore::default_key_path(&enc);
    let out = t.path().join("out.raw");
    for args in [
        vec!["verify", "-d", s(&plain)],
        vec!["gc", "-d", s(&plain)],
        vec!["recovery-points", "-d", s(&plain)],
        vec!["backup", "-d", s(&plain), "--source", "web", s(&disk)],
        vec![
            "restore",
            "-d",
            s(&plain),
            "--source",
            "web",
            "--output",
            s(&out),
        ],
        vec!["ilr", "ls", "web", "-d", s(&plain)],
        vec![
            "export-nbd",
            "web",
            "-d",
            s(&plain),
            "--listen",
            "127.0.0.1:0",
        ],
    ] {
        let mut all = args.clone();
        all.extend(["--key-file", s(&key)]);
        let err = fails(1, &all);
        assert!(
            err.contains("not encrypted") && err.contains(s(&key)),
            "{args:?}: {err}"
        );
    }
    assert!(!out.exists());
    // Without it, the same commands work.
    ok(&["verify", "-d", s(&plain)]);
}

#[test]
fn a_key_file_others_can_read_is_warned_about() {
    let t = tempfile::tempdir().unwrap();
    let enc = t.path().join("enc");
    ok(&["datastore", "create", s(&enc), "--encrypt"]);
    let key = datastore::default_key_path(&enc);
    let quiet = holdfast(&["verify", "-d", s(&enc)]);
    assert!(quiet.status.success());
    assert!(
        !String::from_utf8_lossy(&quiet.stderr).contains("warning"),
        "a 0600 key file is warned about"
    );
    for mode in [0o644, 0o640] {
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
        for args in [
            vec!["verify", "-d", s(&enc)],
            vec!["recovery-points", "-d", s(&enc), "--key-file", s(&key)],
        ] {
            let o = holdfast(&args);
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(o.status.success(), "{args:?}: {err}");
            assert!(
                err.contains("warning")
                    && err.contains(s(&key))
                    && err.contains(&format!("{mode:04o}")),
                "{args:?} mode {mode:o}: {err}"
            );
        }
    }
}
