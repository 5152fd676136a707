//! The QMP client against a real QEMU 10 (`-machine none`, TCG, one qcow2 drive).

mod common;

use std::time::{Duration, Instant};

use common::{Qemu, UUID, create_qcow2};
use qemu::{Error, Qmp, RunState};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(10);

fn running(status: &str) -> RunState {
    RunState {
        running: status == "running",
        status: status.into(),
    }
}

#[test]
fn version_name_uuid() {
    let mut vm = Qemu::start();
    let mut q = vm.connect();
    let (major, minor, micro) = q.version();
    assert_eq!(major, 10, "expected QEMU 10.x, got {major}.{minor}.{micro}");
    assert_eq!(q.name().unwrap().as_deref(), Some("vm1"));
    assert_eq!(q.uuid().unwrap(), UUID);
}

#[test]
fn stop_and_cont_round_trip_with_events() {
    let mut vm = Qemu::start();
    let mut q = vm.connect();
    // -machine none without -S starts running.
    assert_eq!(q.status().unwrap(), running("running"));
    q.stop().unwrap();
    assert_eq!(q.status().unwrap(), running("paused"));
    // QEMU sends STOP before the reply to "stop": it is already queued.
    let ev = q.wait_event("STOP", WAIT, |_| true).unwrap();
    assert_eq!(ev["event"], "STOP");
    assert!(ev["timestamp"]["seconds"].is_u64());
    q.cont().unwrap();
    assert_eq!(q.status().unwrap(), running("running"));
    q.stop().unwrap();
    q.cont().unwrap();
    let names: Vec<String> = q
        .take_events()
        .iter()
        .filter_map(|e| e["event"].as_str().map(str::to_string))
        .collect();
    assert_eq!(names, ["RESUME", "STOP", "RESUME"]);
    // Nothing more comes: wait_event times out on time and leaves the connection usable.
    let t0 = Instant::now();
    let err = q
        .wait_event("STOP", Duration::from_millis(200), |_| true)
        .unwrap_err();
    assert!(matches!(err, Error::Timeout(_)), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(2));
    assert_eq!(q.status().unwrap(), running("running"));
}

#[test]
fn block_devices_of_a_drive_without_device() {
    let mut vm = Qemu::start();
    let mut q = vm.connect();
    let devices = q.block_devices().unwrap();
    assert_eq!(devices.len(), 1, "{devices:?}");
    let d = &devices[0];
    assert_eq!(d.device, "drive0");
    assert_eq!(d.qdev, None, "-drive if=none has no guest device");
    assert_eq!(d.node_name, "disk0");
    assert_eq!(d.format, "qcow2");
    assert_eq!(d.virtual_size, 64 << 20);
    assert_eq!(d.file, vm.image.display().to_string());
    assert!(!d.read_only);
    let nodes = q.node_names().unwrap();
    assert!(nodes.contains(&"disk0".to_string()), "{nodes:?}");
    // The protocol node has no name given; QEMU generates one.
    assert!(nodes.iter().any(|n| n.starts_with('#')), "{nodes:?}");
    assert!(matches!(q.bitmaps("no-such-node"), Err(Error::NotFound(_))));
}

#[test]
fn persistent_bitmap_counts_writes_through_hmp_qemu_io() {
    let mut vm = Qemu::start();
    let mut q = vm.connect();
    assert!(q.bitmaps("disk0").unwrap().is_empty());
    q.execute(
        "block-dirty-bitmap-add",
        json!({"node": "disk0", "name": "b0", "persistent": true}),
    )
    .unwrap();
    let b = q.bitmaps("disk0").unwrap();
    assert_eq!(b.len(), 1);
    assert_eq!(b[0].name, "b0");
    assert_eq!(b[0].granularity, 65536);
    assert_eq!(b[0].count, 0);
    assert!(b[0].recording && b[0].persistent && !b[0].busy && !b[0].inconsistent);
    // qemu-io through the BlockBackend name; success replies "" (its output goes to
    // QEMU's stdout).
    let out = q.hmp("qemu-io drive0 \"write -P 0xab 1M 64k\"").unwrap();
    assert_eq!(out, "");
    assert_eq!(q.bitmaps("disk0").unwrap()[0].count, 65536);
    // HMP failures are reply text, not QMP errors.
    let out = q.hmp("qemu-io nodrive \"write 0 512\"").unwrap();
    assert!(out.contains("nodrive"), "{out:?}");
    let out = q.hmp("no-such-hmp-command").unwrap();
    assert!(out.contains("unknown command"), "{out:?}");
}

#[test]
fn fleecing_sequence_and_cleanup() {
    let mut vm = Qemu::start();
    let mut q = vm.connect();
    let dir = vm.dir.path().to_path_buf();
    q.execute(
        "block-dirty-bitmap-add",
        json!({"node": "disk0", "name": "b0", "persistent": true}),
    )
    .unwrap();
    assert_eq!(
        q.hmp("qemu-io drive0 \"write -P 0xab 1M 64k\"").unwrap(),
        ""
    );

    let fleece = dir.join("fleece1.qcow2");
    create_qcow2(&fleece, "64M");
    q.execute(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "fleece1", "backing": "disk0",
               "file": {"driver": "file", "filename": fleece}}),
    )
    .unwrap();
    q.execute(
        "transaction",
        json!({"actions": [
            {"type": "block-dirty-bitmap-add", "data": {"node": "disk0", "name": "b1", "persistent": true}},
            {"type": "block-dirty-bitmap-disable", "data": {"node": "disk0", "name": "b0"}},
            {"type": "blockdev-backup", "data": {"job-id": "bk1", "device": "disk0",
                                                 "target": "fleece1", "sync": "none"}}]}),
    )
    .unwrap();
    let nbd = dir.join("nbd.sock");
    q.execute(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": nbd}}}),
    )
    .unwrap();
    q.execute(
        "block-export-add",
        json!({"type": "nbd", "id": "exp1", "node-name": "fleece1", "name": "inc1",
               "writable": false, "bitmaps": ["b0"]}),
    )
    .unwrap();

    assert_eq!(q.block_jobs().unwrap(), ["bk1"]);
    assert_eq!(q.block_exports().unwrap(), ["exp1"]);
    let mut b: Vec<(String, bool, u64)> = q
        .bitmaps("disk0")
        .unwrap()
        .into_iter()
        .map(|b| (b.name, b.recording, b.count))
        .collect();
    b.sort(); // QEMU lists the newest bitmap first
    assert_eq!(
        b,
        [("b0".into(), false, 65536), ("b1".into(), true, 0)],
        "b0 frozen at the point in time, b1 tracking from it"
    );
    // While the job runs, the drive's root is the copy-before-write filter.
    let root = &q.block_devices().unwrap()[0];
    assert_eq!(root.format, "copy-before-write", "{root:?}");
    // A write after the point in time is tracked by b1 only.
    assert_eq!(
        q.hmp("qemu-io drive0 \"write -P 0xee 2M 64k\"").unwrap(),
        ""
    );
    let counts: Vec<u64> = q
        .bitmaps("disk0")
        .unwrap()
        .iter()
        .map(|b| b.count)
        .collect();
    assert_eq!(counts, [65536, 65536]);

    q.delete_export_and_wait("exp1", WAIT).unwrap();
    q.cancel_job_and_wait("bk1", WAIT).unwrap();
    q.execute("blockdev-del", json!({"node-name": "fleece1"}))
        .unwrap();
    q.execute("nbd-server-stop", Value::Null).unwrap();

    assert!(q.block_jobs().unwrap().is_empty());
    assert!(q.block_exports().unwrap().is_empty());
    let nodes = q.node_names().unwrap();
    assert!(!nodes.contains(&"fleece1".to_string()), "{nodes:?}");
    assert_eq!(q.block_devices().unwrap()[0].node_name, "disk0");
    // Both helpers are idempotent: gone is done.
    q.delete_export_and_wait("exp1", WAIT).unwrap();
    q.cancel_job_and_wait("bk1", WAIT).unwrap();
    // The events of the sequence were queued, not lost.
    let names: Vec<String> = q
        .take_events()
        .iter()
        .filter_map(|e| e["event"].as_str().map(str::to_string))
        .collect();
    assert!(
        names.contains(&"BLOCK_EXPORT_DELETED".to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"BLOCK_JOB_CANCELLED".to_string()),
        "{names:?}"
    );
}

#[test]
fn job_with_auto_dismiss_off_is_dismissed() {
    let mut vm = Qemu::start();
    let mut q = vm.connect();
    let fleece = vm.dir.path().join("fleece.qcow2");
    create_qcow2(&fleece, "64M");
    q.execute(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "fl", "backing": "disk0",
               "file": {"driver": "file", "filename": fleece}}),
    )
    .unwrap();
    q.execute(
        "blockdev-backup",
        json!({"job-id": "bk9", "device": "disk0", "target": "fl", "sync": "none",
               "auto-dismiss": false}),
    )
    .unwrap();
    q.cancel_job_and_wait("bk9", WAIT).unwrap();
    assert!(q.block_jobs().unwrap().is_empty());
    // The job stopped in "concluded" and only left it through job-dismiss.
    let states: Vec<String> = q
        .take_events()
        .iter()
        .filter(|e| e["event"] == "JOB_STATUS_CHANGE")
        .filter_map(|e| e["data"]["status"].as_str().map(str::to_string))
        .collect();
    assert!(
        states.ends_with(&["concluded".to_string(), "null".to_string()]),
        "{states:?}"
    );
    q.execute("blockdev-del", json!({"node-name": "fl"}))
        .unwrap();
}

#[test]
fn command_errors_carry_class_and_desc() {
    let mut vm = Qemu::start();
    let mut q = vm.connect();
    match q.execute("blockdev-del", json!({"node-name": "nope"})) {
        Err(Error::Command {
            command,
            class,
            desc,
        }) => {
            assert_eq!(command, "blockdev-del");
            assert_eq!(class, "GenericError");
            assert!(desc.contains("nope"), "{desc}");
        }
        other => panic!("expected a Command error, got {other:?}"),
    }
    match q.execute("no-such-command", Value::Null) {
        Err(Error::Command { class, .. }) => assert_eq!(class, "CommandNotFound"),
        other => panic!("expected a Command error, got {other:?}"),
    }
    // Arguments that are not an object: QEMU refuses the request (with our id).
    match q.execute("query-status", json!(5)) {
        Err(Error::Command { class, desc, .. }) => {
            assert_eq!(class, "GenericError");
            assert!(desc.contains("must be an object"), "{desc}");
        }
        other => panic!("expected a Command error, got {other:?}"),
    }
    // A command error leaves the connection usable.
    assert!(q.status().unwrap().running);
}

#[test]
fn second_client_gets_no_greeting() {
    let mut vm = Qemu::start();
    let mut first = vm.connect();
    let t0 = Instant::now();
    let err = Qmp::connect(&vm.qmp_path, Duration::from_millis(300))
        .err()
        .expect("a second client must not get a monitor");
    assert!(
        matches!(&err, Error::Timeout(m) if m.contains("another")),
        "{err}"
    );
    assert!(t0.elapsed() < Duration::from_secs(3));
    assert!(first.status().is_ok());
    drop(first);
    // Once the first client is gone QEMU serves the next one.
    let mut again = Qmp::connect(&vm.qmp_path, WAIT).unwrap();
    assert!(again.status().is_ok());
}

#[test]
fn killed_qemu_is_an_error_not_a_hang() {
    let mut vm = Qemu::start();
    let mut q = vm.connect();
    q.set_timeout(Duration::from_secs(5));
    vm.kill();
    let t0 = Instant::now();
    let err = q.status().unwrap_err();
    assert!(
        matches!(err, Error::Io { .. } | Error::Protocol(_)),
        "expected Io or Protocol, got {err:?}"
    );
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    // And the connection says so from then on.
    assert!(matches!(q.status(), Err(Error::Broken(_))));
    assert!(matches!(
        q.wait_event("STOP", Duration::from_millis(10), |_| true),
        Err(Error::Broken(_))
    ));
}

#[test]
fn connect_to_a_socket_that_never_appears_gives_up() {
    let dir = tempfile::tempdir().unwrap();
    let t0 = Instant::now();
    let err = Qmp::connect(&dir.path().join("none.sock"), Duration::from_millis(200))
        .err()
        .unwrap();
    assert!(
        matches!(&err, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound),
        "{err:?}"
    );
    let elapsed = t0.elapsed();
    assert!(
        elapsed >= Duration::from_millis(200) && elapsed < Duration::from_secs(2),
        "{elapsed:?}"
    );
}
