//! Live QEMU VMs end to end: a real `qemu-system-x86_64` (TCG, `-machine none`, no
//! guest OS) with a qcow2 disk, protected through real `holdfast server` and
//! `holdfast agent --qmp-dir` processes. Guest writes are injected through HMP
//! `qemu-io` on the disk's BlockBackend, between backups and while a backup runs.
//! Every recovery point must restore to the disk as it was at its view's moment.

mod common;

use common::cluster::*;
use common::vm::*;
use common::*;
use protocol::*;
use qemu::qmp::Qmp;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

#[test]
fn incrementals_read_only_dirty_blocks_and_every_point_restores_its_view() {
    let d = tempfile::tempdir().unwrap();
    let (c, mut vm) = setup(d.path(), "vm1", 64 * MIB, 24 * MIB, 1, &[]);

    // First backup: all allocated data (24 MiB of 64) is read, nothing else.
    let j0 = backup_now(&c, &vm);
    assert_eq!(j0.kind, JobKind::InitialReplica);
    let rp0 = j0.recovery_point.clone().unwrap();
    assert_eq!(
        j0.bytes_read,
        24 * MIB,
        "the first backup reads the allocated data"
    );
    assert!(log_has(&j0, "VM paused for"), "{:?}", j0.log);
    // QEMU itself saw the pause and the resume (events go to every monitor).
    vm.qmp().status().unwrap();
    let events: Vec<String> = vm
        .qmp()
        .take_events()
        .iter()
        .filter_map(|e| e["event"].as_str().map(str::to_string))
        .filter(|e| e == "STOP" || e == "RESUME")
        .collect();
    assert_eq!(
        events,
        ["STOP", "RESUME"],
        "no guest agent: paused, then resumed"
    );
    assert_eq!(point(&c, &rp0).consistency, Consistency::CrashConsistent);
    assert_restores(&c, &vm, &rp0, &vm.model.clone());
    // The job ends when the server has the recovery point; the agent releases the
    // view right after.
    wait_released(&mut vm);
    let bms = vm.bitmaps();
    assert!(bms[0].persistent && bms[0].recording);

    // Writes between backups: scattered blocks, some in unallocated space.
    let dirty = vm.write_blocks(&[3, 100, 101, 500, 900, 1023], 0x5a);
    let j1 = backup_now(&c, &vm);
    assert_eq!(j1.kind, JobKind::Sync);
    let rp1 = j1.recovery_point.clone().unwrap();
    assert_eq!(
        j1.bytes_read, dirty,
        "an incremental reads exactly the dirty blocks"
    );
    let p1 = point(&c, &rp1);
    assert_eq!(p1.stats.changed_bytes, Some(dirty));
    assert_restores(&c, &vm, &rp1, &vm.model.clone());

    // Writes while a backup runs: after the view exists they must not reach it.
    let dirty = vm.write_blocks(&[7, 600], 0x77);
    let want = vm.model.clone();
    let job: JobInfo = c
        .admin()
        .post(
            &format!("/datasources/kvm01/{}/backup", vm.name),
            &BackupNowRequest {
                express_full: false,
                ..Default::default()
            },
        )
        .unwrap();
    wait_until("the view's export", Duration::from_secs(60), || {
        !vm.exports().is_empty() || c.job(job.id).state.finished()
    });
    let during = vm.write_blocks(&[1000, 1001, 8], 0xee);
    let j2 = c.wait_job(job.id);
    assert_eq!(j2.state, JobState::Succeeded, "{j2:?}");
    assert_eq!(j2.bytes_read, dirty);
    assert_restores(&c, &vm, j2.recovery_point.as_deref().unwrap(), &want);

    // The writes made during that backup are in the next one.
    let j3 = backup_now(&c, &vm);
    assert_eq!(j3.bytes_read, during);
    assert_restores_now(&c, &vm, &j3);
    wait_released(&mut vm);
}

#[test]
fn the_bitmap_survives_a_restart_and_its_loss_triggers_a_consistency_check() {
    let d = tempfile::tempdir().unwrap();
    let (c, mut vm) = setup(d.path(), "vm2", 32 * MIB, 8 * MIB, 2, &[]);
    backup_now(&c, &vm);

    // A clean restart keeps the persistent bitmap (stored in the qcow2).
    wait_released(&mut vm);
    vm.write_blocks(&[10, 20], 0x11);
    vm.quit();
    let info = std::process::Command::new("qemu-img")
        .args(["info", "--output=json", s(&vm.img)])
        .output()
        .unwrap();
    let info = String::from_utf8_lossy(&info.stdout).to_string();
    assert!(info.contains("\"hf-"), "the bitmap is in the image: {info}");
    vm.start();
    let dirty = 2 * BLOCK + vm.write_blocks(&[30], 0x12);
    let j = backup_now(&c, &vm);
    assert_eq!(
        j.bytes_read, dirty,
        "writes before and after the restart are tracked"
    );
    assert_restores_now(&c, &vm, &j);

    // QEMU killed: the bitmap comes back marked inconsistent. The next backup reads
    // everything, says so, and raises an informational alert.
    vm.write_blocks(&[40], 0x13);
    vm.kill();
    vm.start();
    vm.write_blocks(&[50], 0x14);
    let j = backup_now(&c, &vm);
    assert_eq!(
        j.bytes_read,
        8 * MIB,
        "a consistency check reads all allocated data"
    );
    assert!(log_has(&j, "change tracking not used"), "{:?}", j.log);
    assert_restores_now(&c, &vm, &j);
    let alert = |c: &Cluster| {
        c.alerts()
            .into_iter()
            .find(|a| a.kind == "change-tracking-reset" && a.resolved.is_none())
    };
    let a = alert(&c).expect("an informational alert");
    assert_eq!(a.severity, Severity::Info);

    // Tracking works again from that view on; the alert resolves itself.
    let dirty = vm.write_blocks(&[60], 0x15);
    let j = backup_now(&c, &vm);
    assert_eq!(j.bytes_read, dirty);
    assert_restores_now(&c, &vm, &j);
    assert!(alert(&c).is_none(), "the alert is resolved");
}

/// Starts the QGA test double on `sockets/NAME.qga`, logging commands to `log`.
fn qga_double(sockets: &Path, name: &str, log: &Path, extra: &[&str]) -> Child {
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../qemu/tests/fixtures/qga_double.py");
    let sock = sockets.join(format!("{name}.qga"));
    let _ = std::fs::remove_file(&sock);
    let child = Command::new("python3")
        .arg(&fixture)
        .arg(&sock)
        .arg("--log")
        .arg(log)
        .args(extra)
        .stdout(Stdio::null())
        .spawn()
        .expect("python3 must be installed");
    wait_until("the guest agent double", Duration::from_secs(10), || {
        sock.exists()
    });
    child
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn logged(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("guest-fsfreeze-freeze") || l.starts_with("guest-fsfreeze-thaw"))
        .map(str::to_string)
        .collect()
}

#[test]
fn the_guest_agent_freezes_then_thaws_and_a_freeze_timeout_still_thaws() {
    let d = tempfile::tempdir().unwrap();
    let mut c = start_cluster(d.path());
    let sockets = d.path().join("sockets");
    let mut vm = Vm::create(d.path(), &sockets, "vm3", 16 * MIB, 4 * MIB, 3);
    let log = d.path().join("qga.log");
    let qga = Kill(qga_double(&sockets, "vm3", &log, &[]));
    protect(&mut c, &vm, &["--freeze-timeout-seconds", "1"]);

    let j = backup_now(&c, &vm);
    let rp = j.recovery_point.clone().unwrap();
    assert_eq!(point(&c, &rp).consistency, Consistency::FileConsistent);
    assert_eq!(
        logged(&log),
        ["guest-fsfreeze-freeze", "guest-fsfreeze-thaw"]
    );
    assert!(
        log_has(&j, "file systems frozen by the guest agent"),
        "{:?}",
        j.log
    );
    assert!(!log_has(&j, "VM paused"), "{:?}", j.log);
    assert_restores(&c, &vm, &rp, &vm.model.clone());

    // A guest agent that takes 3 s to freeze, against a 1 s timeout: thawed anyway,
    // the VM paused instead, the point crash-consistent.
    drop(qga);
    std::fs::remove_file(&log).unwrap();
    let _qga = Kill(qga_double(&sockets, "vm3", &log, &["--freeze-delay", "3"]));
    vm.write_blocks(&[5], 0x33);
    let j = backup_now(&c, &vm);
    let rp = j.recovery_point.clone().unwrap();
    assert_eq!(point(&c, &rp).consistency, Consistency::CrashConsistent);
    assert!(log_has(&j, "paused instead"), "{:?}", j.log);
    assert!(log_has(&j, "VM paused for"), "{:?}", j.log);
    wait_until("the thaw", Duration::from_secs(20), || {
        logged(&log).last().map(String::as_str) == Some("guest-fsfreeze-thaw")
    });
    assert_eq!(logged(&log)[0], "guest-fsfreeze-freeze");
    assert_restores(&c, &vm, &rp, &vm.model.clone());
    assert!(
        vm.qmp().status().unwrap().running,
        "the VM runs again after the backup"
    );
}

#[test]
fn a_killed_agent_leaves_qemu_clean_after_restart_and_no_write_is_lost() {
    let d = tempfile::tempdir().unwrap();
    // Big enough (random data) that the backup is still running when killed.
    let (mut c, mut vm) = setup(
        d.path(),
        "vm4",
        512 * MIB,
        512 * MIB,
        4,
        &["--threads", "1"],
    );
    let j0 = backup_now(&c, &vm);

    // Writes, then a backup killed with its view open (an express full, which reads
    // everything, so it is still running).
    let dirty = vm.write_blocks(&(0..2000).step_by(7).collect::<Vec<u64>>(), 0x44);
    let job = express_full_with_view(&c, &mut vm);
    let agent = c.agents.last_mut().unwrap();
    agent.kill().unwrap();
    agent.wait().unwrap();
    assert!(!vm.ours_left().is_empty(), "the killed agent left its view");
    // More writes while no agent runs.
    let later = vm.write_blocks(&[3000, 3001], 0x45);

    // The restarted agent cleans up (exports, jobs, fleecing nodes; the new bitmap
    // merged back into the old one) before anything else.
    let adir = d.path().join("agent-kvm01");
    let child = Command::new(BIN)
        .args([
            "agent",
            "--server",
            &c.url,
            "--data-dir",
            s(&adir),
            "--qmp-dir",
        ])
        .arg(&vm.sockets)
        .args(["--inventory-seconds", "1", "--threads", "1"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    c.agents.push(child);
    wait_released(&mut vm);
    let bms = vm.bitmaps();
    assert!(
        bms[0].recording,
        "the previous bitmap records again: {bms:?}"
    );
    // The killed job fails (the watchdog) and is not rerun (max_attempts 1); the next
    // backup holds every write since the first one.
    let failed = c.wait_job(job.id);
    assert_ne!(failed.state, JobState::Succeeded);
    let j = backup_now(&c, &vm);
    assert_eq!(j.bytes_read, dirty + later, "nothing lost, nothing extra");
    assert_ne!(j.recovery_point, j0.recovery_point);
    assert_restores_now(&c, &vm, &j);

    // A cancelled backup: the same cleanup, and its bitmap merged back.
    let before = vm.write_blocks(&[11, 4000], 0x46);
    let job = express_full_with_view(&c, &mut vm);
    c.cli_ok(&["jobs", "cancel", &job.id.to_string()]);
    let cancelled = c.wait_job(job.id);
    assert_eq!(cancelled.state, JobState::Cancelled, "{cancelled:?}");
    wait_released(&mut vm);
    let after = vm.write_blocks(&[12], 0x47);
    let j = backup_now(&c, &vm);
    assert_eq!(
        j.bytes_read,
        before + after,
        "the cancelled view lost no write: {:?}",
        j.log
    );
    assert_restores_now(&c, &vm, &j);
}

#[test]
fn excluded_ranges_are_zeros_recorded_and_read_again_once_lifted() {
    let d = tempfile::tempdir().unwrap();
    // A socket left behind by a QEMU that is gone: listed by nobody, it must not
    // stop the others from being protected.
    let sockets = d.path().join("sockets");
    std::fs::create_dir_all(&sockets).unwrap();
    drop(std::os::unix::net::UnixListener::bind(sockets.join("ghost.qmp")).unwrap());
    let (c, mut vm) = setup(d.path(), "vm5", 16 * MIB, 8 * MIB, 5, &[]);
    assert_eq!(c.datasources().len(), 1, "the ghost is not a VM");
    // 2 MiB of data left out (a page file, say), and two sectors inside one block
    // (ranges are whole sectors: protocol refuses anything else).
    let range = (MIB, 2 * MIB);
    let small = (5 * MIB + 512, 1024);
    let fmt = |r: (u64, u64)| format!("{}+{}", r.0, r.1);
    c.cli_ok(&[
        "datasources",
        "exclude",
        "kvm01/vm5",
        "--disk",
        "0",
        "--range",
        &fmt(range),
        "--range",
        &fmt(small),
    ]);
    let listed: Exclusions =
        serde_json::from_str(&c.cli_ok(&["datasources", "exclude", "kvm01/vm5", "--json"]))
            .unwrap();
    assert_eq!(listed.disks, vec![vec![range, small]]);
    let zeroed = |model: &[u8]| {
        let mut m = model.to_vec();
        for (o, l) in [range, small] {
            m[o as usize..(o + l) as usize].fill(0);
        }
        m
    };
    let j = backup_now(&c, &vm);
    assert_eq!(
        j.bytes_read,
        8 * MIB - range.1,
        "excluded whole blocks are not read"
    );
    assert_restores(
        &c,
        &vm,
        j.recovery_point.as_deref().unwrap(),
        &zeroed(&vm.model),
    );
    // The recovery point records them (read from the datastore itself).
    let ds = datastore::Datastore::open(&c.datastore(), None).unwrap();
    let m = ds.point(j.recovery_point.as_deref().unwrap()).unwrap();
    assert_eq!(m.disks[0].excluded, vec![range, small]);
    // An incremental keeps them out too: block 20 lies in the excluded range and is not
    // read; nor is the rest of the block around the small range, which did not change.
    vm.write_blocks(&[20, 200], 0x66);
    let j = backup_now(&c, &vm);
    assert_eq!(j.bytes_read, BLOCK, "only block 200 is read");
    assert_restores(
        &c,
        &vm,
        j.recovery_point.as_deref().unwrap(),
        &zeroed(&vm.model),
    );
    // Lifted: the next incremental reads those ranges again.
    c.cli_ok(&["datasources", "exclude", "kvm01/vm5", "--clear"]);
    let j = backup_now(&c, &vm);
    assert_eq!(
        j.bytes_read,
        range.1 + BLOCK,
        "the formerly excluded blocks are read"
    );
    assert_restores_now(&c, &vm, &j);
}

#[test]
fn a_raw_disk_is_tracked_by_a_bitmap_that_lives_with_qemu() {
    let d = tempfile::tempdir().unwrap();
    let mut c = start_cluster(d.path());
    let mut vm = Vm::create_as(
        d.path(),
        &d.path().join("sockets"),
        "vm6",
        16 * MIB,
        4 * MIB,
        6,
        "raw",
    );
    // Listed by its socket rather than found in a folder.
    let listed = format!("vm6={}", s(&vm.agent_socket()));
    protect_with(&mut c, &vm, &["--qmp-socket", &listed]);
    backup_now(&c, &vm);
    wait_released(&mut vm);
    let bms = vm.bitmaps();
    assert!(
        !bms[0].persistent,
        "a raw disk cannot store a bitmap: {bms:?}"
    );
    let dirty = vm.write_blocks(&[1, 2, 100], 0x21);
    let j = backup_now(&c, &vm);
    assert_eq!(j.bytes_read, dirty);
    assert_restores_now(&c, &vm, &j);
    // A restart loses it: the next backup is a consistency check, and says so.
    vm.quit();
    vm.start();
    vm.write_blocks(&[3], 0x22);
    let j = backup_now(&c, &vm);
    assert!(log_has(&j, "is missing"), "{:?}", j.log);
    assert_restores_now(&c, &vm, &j);
}

/// `qemu-img compare` of the VM's image with `want` (raw bytes); `-U` because QEMU may
/// hold the image open.
fn image_equals(vm: &Vm, want: &[u8]) -> bool {
    let raw = vm.dir.join("want.raw");
    std::fs::write(&raw, want).unwrap();
    let o = Command::new("qemu-img")
        .args([
            "compare",
            "-U",
            "-f",
            "raw",
            "-F",
            &vm.fmt,
            s(&raw),
            s(&vm.img),
        ])
        .output()
        .unwrap();
    std::fs::remove_file(&raw).unwrap();
    assert!(
        matches!(o.status.code(), Some(0 | 1)),
        "qemu-img compare: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o.status.code() == Some(0)
}

/// Whether process `pid` is gone (or a zombie, which holds no files).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(st) => st
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => true,
    }
}

#[test]
fn recovery_over_a_running_vm_stops_replaces_and_starts_it_again() {
    let d = tempfile::tempdir().unwrap();
    let mut c = start_cluster(d.path());
    // QEMU runs in its folder and opens its image by a relative name: the restart
    // must happen in the same folder.
    let mut vm = Vm::create(
        d.path(),
        &d.path().join("sockets"),
        "vm7",
        8 * MIB,
        3 * MIB,
        7,
    );
    vm.quit();
    vm.relative = true;
    vm.agent_restarts = true;
    vm.start();
    protect(&mut c, &vm, &[]);
    let name = format!("kvm01/{}", vm.name);
    let j0 = backup_now(&c, &vm);
    let rp0 = j0.recovery_point.clone().unwrap();
    let at_rp0 = vm.model.clone();
    wait_released(&mut vm);
    vm.write_blocks(&[1, 40, 100], 0x31);
    // QEMU's qcow2 metadata cache reaches the file on a flush.
    vm.qmp().hmp("qemu-io drive0 \"flush\"").unwrap();
    assert!(!image_equals(&vm, &at_rp0));

    // (i) Without --stop-vm: refused, nothing queued, the VM untouched.
    let o = c.cli(&["recover", &name, "--original", "--point", &rp0]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("is a running QEMU VM; add --stop-vm"), "{err}");
    vm.qmp().status().unwrap();

    // Cancelled while the copies are written: the VM runs on, untouched, and no
    // temporary copy is left.
    let old_pid = vm.qmp().peer_pid().unwrap();
    let out = c.cli_ok(&[
        "recover",
        &name,
        "--original",
        "--stop-vm",
        "--start",
        "--point",
        &rp0,
        "--throttle",
        "256",
        "--json",
    ]);
    let j: JobInfo = serde_json::from_str(&out).unwrap();
    // 3 MiB at 256 KiB/s take 12 s; the copy reports its first bytes only after a
    // 2 MiB piece, so the cancel goes out a moment after the job started.
    wait_until("the job to start", Duration::from_secs(30), || {
        c.job(j.id).state == JobState::Running
    });
    std::thread::sleep(Duration::from_millis(1500));
    c.cli_ok(&["jobs", "cancel", &j.id.to_string()]);
    let done = c.wait_job(j.id);
    assert_eq!(done.state, JobState::Cancelled, "{:?}", done.error);
    assert!(!log_has(&done, "stopped"), "{:?}", done.log);
    assert!(vm.qmp().status().unwrap().running);
    assert_eq!(vm.qmp().peer_pid().unwrap(), old_pid);
    vm.qmp().hmp("qemu-io drive0 \"flush\"").unwrap();
    assert!(
        image_equals(&vm, &vm.model.clone()),
        "the disk is untouched"
    );
    no_temp_files(&vm.dir);

    // (ii) --stop-vm --start: the disk holds the point, QEMU runs again.
    let out = c.cli_ok(&[
        "recover",
        &name,
        "--original",
        "--stop-vm",
        "--start",
        "--point",
        &rp0,
        "--wait",
        "--json",
    ]);
    let j: JobInfo = serde_json::from_str(&out).unwrap();
    assert_eq!(j.state, JobState::Succeeded, "{:?}", j.error);
    let j = c.job(j.id);
    for needle in [
        "stopped (QMP quit",
        "disk file(s) replaced",
        "started again",
    ] {
        assert!(log_has(&j, needle), "{needle}: {:?}", j.log);
    }
    // The test's QEMU exited; the agent's runs in its place, with the same sockets.
    vm.qmp = None;
    let st = vm.child.take().unwrap().wait().unwrap();
    assert!(st.success(), "QEMU quit cleanly: {st}");
    let test_sock = vm.dir.join(format!("{}.test.qmp", vm.name));
    vm.qmp = Some(Qmp::connect(&test_sock, Duration::from_secs(30)).unwrap());
    let pid = vm.qmp().peer_pid().unwrap();
    vm.adopted = Some(pid);
    assert_ne!(pid, old_pid);
    assert!(vm.qmp().status().unwrap().running);
    vm.model = at_rp0.clone();
    assert!(
        image_equals(&vm, &at_rp0),
        "the disk holds the recovery point"
    );
    no_temp_files(&vm.dir);
    // The restored qcow2 holds no bitmap of ours: the next backup reads everything,
    // succeeds and restores byte for byte; the one after is incremental again.
    assert!(vm.bitmaps().iter().all(|b| !b.name.starts_with("hf-")));
    vm.write_blocks(&[2, 60], 0x32);
    let j1 = backup_now(&c, &vm);
    assert_eq!(j1.kind, JobKind::Sync);
    assert!(j1.bytes_read > 2 * BLOCK, "a full read: {j1:?}");
    assert_restores_now(&c, &vm, &j1);
    wait_released(&mut vm);
    let dirty = vm.write_blocks(&[5], 0x33);
    let j2 = backup_now(&c, &vm);
    assert_eq!(j2.bytes_read, dirty, "change tracking works again");
    assert_restores_now(&c, &vm, &j2);
    wait_released(&mut vm);

    // (iii) --stop-vm alone: the disk is restored and the VM stays stopped.
    let out = c.cli_ok(&[
        "recover",
        &name,
        "--original",
        "--stop-vm",
        "--point",
        &rp0,
        "--wait",
        "--json",
    ]);
    let j: JobInfo = serde_json::from_str(&out).unwrap();
    assert_eq!(j.state, JobState::Succeeded, "{:?}", j.error);
    assert!(
        log_has(&c.job(j.id), "left stopped"),
        "{:?}",
        c.job(j.id).log
    );
    vm.qmp = None;
    wait_until("QEMU to be gone", Duration::from_secs(10), || gone(pid));
    vm.adopted = None;
    assert!(Qmp::connect(&test_sock, Duration::from_millis(300)).is_err());
    assert!(
        image_equals(&vm, &at_rp0),
        "the disk holds the recovery point"
    );
    no_temp_files(&vm.dir);
}
