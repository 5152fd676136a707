//! The QGA client against the guest-agent double (tests/fixtures/qga_double.py), which
//! speaks the wire format recorded from a real qemu-ga 10.0.2.

mod common;

use std::time::{Duration, Instant};

use common::Agent;
use qemu::{Error, Qga};
use serde_json::json;

const T: Duration = Duration::from_secs(5);

#[test]
fn freeze_status_thaw_round_trip() {
    let mut agent = Agent::start(&["--filesystems", "3"]);
    let mut g = agent.connect();
    g.ping(T).unwrap();
    assert_eq!(g.fsfreeze_status(T).unwrap(), "thawed");
    assert_eq!(g.fsfreeze_freeze(T).unwrap(), 3);
    assert_eq!(g.fsfreeze_status(T).unwrap(), "frozen");
    // While frozen the agent refuses most commands: a Command error, no desync.
    match g.execute("guest-get-time", serde_json::Value::Null, T) {
        Err(Error::Command { class, desc, .. }) => {
            assert_eq!(class, "CommandNotFound");
            assert!(desc.contains("frozen"), "{desc}");
        }
        other => panic!("expected a Command error, got {other:?}"),
    }
    assert_eq!(g.fsfreeze_thaw(T).unwrap(), 3);
    assert_eq!(g.fsfreeze_status(T).unwrap(), "thawed");
    assert_eq!(g.fsfreeze_thaw(T).unwrap(), 0);
    // Arguments are passed through.
    assert_eq!(
        g.execute(
            "guest-fsfreeze-freeze-list",
            json!({"mountpoints": ["/", "/var"]}),
            T
        )
        .unwrap(),
        json!(2)
    );
    assert_eq!(g.fsfreeze_thaw(T).unwrap(), 3);
    assert_eq!(
        agent.commands(),
        [
            "guest-sync-delimited",
            "guest-ping",
            "guest-fsfreeze-status",
            "guest-fsfreeze-freeze",
            "guest-fsfreeze-status",
            "guest-get-time",
            "guest-fsfreeze-thaw",
            "guest-fsfreeze-status",
            "guest-fsfreeze-thaw",
            "guest-fsfreeze-freeze-list",
            "guest-fsfreeze-thaw",
        ]
    );
}

#[test]
fn freeze_timeout_then_resync_and_thaw() {
    let mut agent = Agent::start(&["--freeze-delay", "1.5"]);
    let mut g = agent.connect();
    let t0 = Instant::now();
    let err = g.fsfreeze_freeze(Duration::from_millis(400)).unwrap_err();
    let elapsed = t0.elapsed();
    assert!(
        matches!(&err, Error::Timeout(m) if m.contains("guest-fsfreeze-freeze")),
        "{err}"
    );
    assert!(
        elapsed >= Duration::from_millis(400) && elapsed < Duration::from_millis(1200),
        "timed out after {elapsed:?}"
    );
    assert!(!g.is_broken());
    // The freeze completes inside the guest after all; the thaw resynchronises first,
    // skipping the late freeze reply, and then thaws what it froze.
    assert_eq!(g.fsfreeze_thaw(T).unwrap(), 2);
    assert_eq!(g.fsfreeze_status(T).unwrap(), "thawed");
    assert_eq!(
        agent.commands(),
        [
            "guest-sync-delimited",
            "guest-fsfreeze-freeze",
            "guest-sync-delimited",
            "guest-fsfreeze-thaw",
            "guest-fsfreeze-status",
        ]
    );
}

#[test]
fn stale_sync_replies_are_skipped_by_id() {
    let mut agent = Agent::start(&["--freeze-delay", "1.5"]);
    let mut g = agent.connect();
    let short = Duration::from_millis(300);
    assert!(matches!(g.fsfreeze_freeze(short), Err(Error::Timeout(_))));
    // The agent is still busy freezing: this call's resync times out as well, and its
    // sync reply (sentinel + id R1) will arrive late.
    let err = g.ping(short).unwrap_err();
    assert!(
        matches!(&err, Error::Timeout(m) if m.contains("guest-sync-delimited")),
        "{err}"
    );
    // The next resync (id R2) must skip the late freeze reply, the parse-error replies to
    // both 0xFF bytes and the sentinel + R1 reply.
    assert_eq!(g.fsfreeze_status(T).unwrap(), "frozen");
    assert_eq!(g.fsfreeze_thaw(T).unwrap(), 2);
    assert_eq!(
        agent.commands(),
        [
            "guest-sync-delimited",
            "guest-fsfreeze-freeze",
            "guest-sync-delimited",
            "guest-sync-delimited",
            "guest-fsfreeze-status",
            "guest-fsfreeze-thaw",
        ]
    );
}

#[test]
fn freeze_error_is_a_command_error() {
    let mut agent = Agent::start(&["--freeze-error", "VSS writer failed"]);
    let mut g = agent.connect();
    match g.fsfreeze_freeze(T) {
        Err(Error::Command {
            command,
            class,
            desc,
        }) => {
            assert_eq!(command, "guest-fsfreeze-freeze");
            assert_eq!(class, "GenericError");
            assert_eq!(desc, "VSS writer failed");
        }
        other => panic!("expected a Command error, got {other:?}"),
    }
    // No resync needed after a command error.
    assert_eq!(g.fsfreeze_status(T).unwrap(), "thawed");
    assert_eq!(
        agent.commands(),
        [
            "guest-sync-delimited",
            "guest-fsfreeze-freeze",
            "guest-fsfreeze-status"
        ]
    );
}

#[test]
fn unknown_command_is_a_command_error() {
    let mut agent = Agent::start(&[]);
    let mut g = agent.connect();
    match g.execute("no-such-cmd", serde_json::Value::Null, T) {
        Err(Error::Command { class, .. }) => assert_eq!(class, "CommandNotFound"),
        other => panic!("expected a Command error, got {other:?}"),
    }
    g.ping(T).unwrap();
}

#[test]
fn nobody_listening_is_a_quick_io_error() {
    let dir = tempfile::tempdir().unwrap();
    // A socket file that exists but has no listener (bound, never listening, closed).
    let path = dir.path().join("dead.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let t0 = Instant::now();
    let err = Qga::connect(&path, T).err().unwrap();
    assert!(
        matches!(&err, Error::Io { what, source }
            if what.ends_with("dead.sock: connect")
            && source.kind() == std::io::ErrorKind::ConnectionRefused),
        "{err:?}"
    );
    assert!(t0.elapsed() < Duration::from_millis(500));
    // And a path that does not exist at all.
    let err = Qga::connect(&dir.path().join("missing.sock"), T)
        .err()
        .unwrap();
    assert!(
        matches!(&err, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound),
        "{err:?}"
    );
}

#[test]
fn silent_socket_times_out_on_connect() {
    // A listener that accepts but never answers, like a guest without an agent.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("silent.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let t0 = Instant::now();
    let err = Qga::connect(&path, Duration::from_millis(300))
        .err()
        .unwrap();
    assert!(
        matches!(&err, Error::Timeout(m) if m.contains("guest agent running")),
        "{err}"
    );
    let elapsed = t0.elapsed();
    assert!(elapsed >= Duration::from_millis(300) && elapsed < Duration::from_secs(2));
    drop(listener);
}
