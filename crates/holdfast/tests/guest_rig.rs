//! The live-VM tests' guest (`scripts/guest-rig`, `common::guest`) on its own: a real
//! Debian 12 boots under QEMU (KVM when it really works, else TCG), its agent runs
//! commands, freezes and thaws the file systems and powers the guest off; a data disk
//! is mounted on /data2 and what the guest writes there is on the image afterwards.

mod common;

use common::guest::*;
use std::time::Duration;

const MINUTE: Duration = Duration::from_secs(60);

#[test]
fn base64_decodes() {
    assert_eq!(base64_decode("aGk="), b"hi");
    assert_eq!(base64_decode("aGkK"), b"hi\n");
    assert_eq!(base64_decode("aGk"), b"hi");
    assert_eq!(base64_decode(""), b"");
    assert_eq!(base64_decode("AAEC/w=="), [0, 1, 2, 255]);
    assert_eq!(base64_decode("+/+/\n"), [0xfb, 0xff, 0xbf]);
}

#[test]
fn the_guest_boots_runs_commands_freezes_and_powers_off() {
    let rig = Rig::get();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let sockets = dir.join("sockets");
    let data = dir.join("data.raw");
    make_data_disk(&data, 64);

    let opts = BootOpts::default().data_disk(&data, "raw");
    let mut g = Guest::boot(&rig, dir, &sockets, "rig", opts);
    g.wait_agent(boot_deadline(&rig));
    let boot = g.boot_seconds().unwrap();
    eprintln!("guest rig: {} boot to agent in {boot:.1} s", rig.accel);

    // Commands, their output and exit codes.
    g.exec_ok("echo hi > /data/x; sync", MINUTE);
    assert_eq!(g.exec_ok("cat /data/x", MINUTE), "hi\n");
    assert_eq!(
        g.exec("echo out; echo oops >&2; exit 3", MINUTE),
        (3, "out\n".to_string(), "oops\n".to_string())
    );
    assert_eq!(g.exec("kill -9 $$", MINUTE).0, 128 + 9);

    // The data disk is mounted by the time the agent answers.
    assert_eq!(
        g.exec_ok("findmnt -n -o SOURCE,FSTYPE /data2", MINUTE)
            .trim(),
        "/dev/vdb1 ext4"
    );
    g.exec_ok("echo there > /data2/y; sync", MINUTE);

    // A background process.
    let pid = g.spawn("exec sleep 1000");
    assert!(pid > 0);
    assert_eq!(
        g.exec_ok(&format!("cat /proc/{pid}/comm"), MINUTE),
        "sleep\n"
    );

    // Freeze and thaw: the root and /data2.
    {
        let t = Duration::from_secs(60);
        let mut q = g.qga(t);
        assert_eq!(q.fsfreeze_status(t).unwrap(), "thawed");
        assert_eq!(q.fsfreeze_freeze(t).unwrap(), 2);
        assert_eq!(q.fsfreeze_status(t).unwrap(), "frozen");
        assert_eq!(q.fsfreeze_thaw(t).unwrap(), 2);
        assert_eq!(q.fsfreeze_status(t).unwrap(), "thawed");
    }

    // The test's own monitor.
    {
        let mut qmp = g.test_qmp();
        let st = qmp.status().unwrap();
        assert!(st.running, "{st:?}");
        assert_eq!(qmp.uuid().unwrap(), BootOpts::default().uuid);
    }
    assert!(g.agent_qmp_socket().exists());

    let took = g.shutdown(Duration::from_secs(120));
    eprintln!("guest rig: powered off in {:.1} s", took.as_secs_f64());
    assert!(!g.is_running());
    assert_eq!(ext4_cat(&data, "/y"), b"there\n");

    // Started again on the same disks: what it wrote is still there.
    g.restart();
    g.wait_agent(boot_deadline(&rig));
    eprintln!(
        "guest rig: second boot to agent in {:.1} s",
        g.boot_seconds().unwrap()
    );
    assert_eq!(g.exec_ok("cat /data/x /data2/y", MINUTE), "hi\nthere\n");
    g.kill();
    assert!(!g.is_running());
}
