//! Live QEMU VMs whose disks look like real ones, and live VMs that misbehave:
//! - disks holding partition tables (GPT, MBR) with ext4, FAT32 and NTFS volumes made
//!   by the real tools, sizes that are not a multiple of 64 KiB, raw images and qcow2
//!   images over a backing file, two disks in one VM: each backs up live (once, such a
//!   disk hung every backup), restores byte for byte, and leaves page and swap files
//!   out;
//! - a read that never completes (a test hook): the server's watchdog fails the job,
//!   the agent cancels it and cleans its view, an alert names the VM and the step, and
//!   the next backup succeeds;
//! - a QMP monitor or guest agent that accepts and never answers, a QEMU stopped
//!   (SIGSTOP) or killed during a backup: every job ends within its deadline, QEMU is
//!   left clean, and other VMs of the same agent are not held up.

mod common;
#[path = "../../fsview/tests/support/mod.rs"]
mod support;

use common::cluster::*;
use common::vm::*;
use common::*;
use protocol::*;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Added to a partitioned disk's size: whole sectors, not a multiple of 64 KiB, so the
/// disk's last block is a partial one.
const ODD_TAIL: u64 = 7 * 4096 + 512;

const LINUX: (&str, &str) = ("0FC63DAF-8483-4772-8E79-3D69D8477DE4", "83");
const BASIC_DATA: (&str, &str) = ("EBD0A0A2-B9E5-4433-87C0-68B6B72699C7", "7");
const FAT32: (&str, &str) = ("EBD0A0A2-B9E5-4433-87C0-68B6B72699C7", "c");
const SWAP: (&str, &str) = ("0657FD6D-A4AB-43C4-84E5-0933C84B4F4F", "82");

/// A disk as users bring them, made by the real tools: ext4 (24 MiB), FAT32 (40 MiB)
/// and NTFS (16 MiB) holding files, in a GPT or MBR table; with `paging`, the NTFS
/// volume also holds a 4 MiB pagefile.sys and a 4 MiB Linux swap partition follows.
/// Its size is not a multiple of 64 KiB. Returns the raw image.
fn real_disk(dir: &Path, name: &str, gpt: bool, paging: bool) -> PathBuf {
    let src = dir.join(format!("{name}-src"));
    std::fs::create_dir_all(src.join("etc")).unwrap();
    std::fs::write(src.join("etc/hosts"), b"127.0.0.1 localhost\n").unwrap();
    std::fs::write(
        src.join("random.bin"),
        support::random_bytes(MIB as usize + 4321, 0x5eed),
    )
    .unwrap();
    std::fs::write(src.join("notes.txt"), b"notes\n".repeat(3000)).unwrap();
    let ext = dir.join(format!("{name}-ext4.img"));
    support::mke2fs(&ext, "ext4", 24, "LINUX", &src, None);
    let fat = dir.join(format!("{name}-fat.img"));
    support::mkfat(&fat, 32, 40, "BOOT", &src);
    let ntfs = dir.join(format!("{name}-ntfs.img"));
    support::mkntfs(&ntfs, 16 * MIB, "WIN");
    let doc = dir.join(format!("{name}-doc.txt"));
    std::fs::write(&doc, b"keep me\n".repeat(5000)).unwrap();
    support::run("ntfscp", &["-q", s(&ntfs), s(&doc), "/doc.txt"], None, &[]);
    let ty = |t: (&'static str, &'static str)| if gpt { t.0 } else { t.1 };
    let mut parts: Vec<(PathBuf, &str)> = vec![
        (ext, ty(LINUX)),
        (fat, ty(FAT32)),
        (ntfs.clone(), ty(BASIC_DATA)),
    ];
    if paging {
        let page = dir.join(format!("{name}-pagefile.sys"));
        std::fs::write(&page, b"PAGEFILE".repeat((4 * MIB / 8) as usize)).unwrap();
        support::run(
            "ntfscp",
            &["-q", s(&ntfs), s(&page), "/pagefile.sys"],
            None,
            &[],
        );
        let swap = dir.join(format!("{name}-swap.img"));
        support::blank(&swap, 4 * MIB);
        support::run("mkswap", &["-L", "SWAPPY", s(&swap)], None, &[]);
        parts.push((swap, ty(SWAP)));
    }
    let raw = dir.join(format!("{name}.raw"));
    let refs: Vec<(&Path, &str)> = parts.iter().map(|(p, t)| (p.as_path(), *t)).collect();
    support::partitioned_disk(&raw, gpt, &refs);
    let f = std::fs::OpenOptions::new().write(true).open(&raw).unwrap();
    let len = f.metadata().unwrap().len();
    f.set_len(len + ODD_TAIL).unwrap();
    drop(f);
    if gpt {
        // The backup GPT belongs at the disk's new end.
        support::run("sgdisk", &["-e", s(&raw)], None, &[]);
    }
    raw
}

/// Starts QEMU on the raw disk `raw` converted to `fmt` (the model is its bytes).
fn vm_on(dir: &Path, name: &str, raw: &Path, fmt: &str) -> Vm {
    let model = std::fs::read(raw).unwrap();
    assert_ne!(
        model.len() as u64 % BLOCK,
        0,
        "the disk ends in a partial block"
    );
    let img = if fmt == "raw" {
        raw.to_path_buf()
    } else {
        let img = dir.join(format!("{name}.{fmt}"));
        support::convert(raw, fmt, &img);
        img
    };
    Vm::with_image(dir, &dir.join("sockets"), name, img, fmt, model)
}

/// The ranges recovery point `id` left out of its first disk.
fn excluded(c: &Cluster, id: &str) -> Vec<(u64, u64)> {
    let out = ok(&["recovery-points", "-d", s(&c.datastore()), "--json"]);
    let all: serde_json::Value = serde_json::from_str(&out).unwrap();
    let p = all
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == id)
        .unwrap_or_else(|| panic!("{id} not in {all}"));
    serde_json::from_value(p["disks"][0]["excluded"].clone()).unwrap()
}

/// Restores recovery point `id` of `vm`: the excluded ranges are zeros, every other
/// byte is the model's.
fn assert_restores_except(c: &Cluster, vm: &Vm, id: &str, excluded: &[(u64, u64)]) {
    let out = c.dir.join(format!("{}-restored.raw", vm.name));
    restore_raw(&c.datastore(), &format!("kvm01/{}", vm.name), id, &out);
    let got = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    assert_eq!(got.len(), vm.model.len(), "size of {id}");
    let mut want = vm.model.clone();
    for &(o, l) in excluded {
        want[o as usize..(o + l) as usize].fill(0);
    }
    if let Some(i) = got.iter().zip(&want).position(|(a, b)| a != b) {
        panic!("recovery point {id} differs from the view at byte {i}");
    }
}

#[test]
fn a_gpt_disk_with_real_file_systems_backs_up_live_and_leaves_page_files_out() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let raw = real_disk(dir, "gpt", true, true);
    let mut c = start_cluster(dir);
    let mut vm = vm_on(dir, "gpt", &raw, "qcow2");
    std::fs::remove_file(&raw).unwrap();
    protect(&mut c, &vm, &[]);

    // Once, this backup never ended (the page-file search moved the read-ahead past
    // the disk's start); `backup_now` fails the test if it takes over two minutes.
    let j0 = backup_now(&c, &vm);
    assert_eq!(j0.kind, JobKind::InitialReplica);
    assert!(log_has(&j0, "/pagefile.sys"), "{:?}", j0.log);
    assert!(log_has(&j0, "Linux swap"), "{:?}", j0.log);
    assert!(
        log_has(&j0, "of page, hibernation and swap files left out"),
        "the job log says how much was left out: {:?}",
        j0.log
    );
    let rp0 = j0.recovery_point.clone().unwrap();
    let ex = excluded(&c, &rp0);
    let total: u64 = ex.iter().map(|r| r.1).sum();
    // The page file's 4 MiB and the swap partition but its kept header (64 KiB).
    assert_eq!(total, 4 * MIB + 4 * MIB - (64 << 10), "{ex:?}");
    assert!(
        vm.model.windows(8).any(|w| w == b"PAGEFILE"),
        "fixture holds the page file"
    );
    assert_restores_except(&c, &vm, &rp0, &ex);
    wait_released(&mut vm);

    // Guest writes in the ext4 volume and in the disk's partial last block: the
    // incremental reads those blocks only, and restores exactly.
    let size = vm.model.len() as u64;
    // (Blocks 300, 301 and 350 lie in the ext4 volume.)
    let mut dirty = vm.write_blocks(&[300, 301, 350], 0x61);
    vm.write(size - 4096, 4096, 0x62);
    dirty += size - size / BLOCK * BLOCK;
    let j1 = backup_now(&c, &vm);
    assert_eq!(j1.kind, JobKind::Sync);
    assert_eq!(j1.bytes_read, dirty, "{:?}", j1.log);
    let rp1 = j1.recovery_point.clone().unwrap();
    assert_restores_except(&c, &vm, &rp1, &excluded(&c, &rp1));
    wait_released(&mut vm);
}

#[test]
fn mbr_raw_and_backing_file_disks_of_two_vms_back_up_at_once_and_restore_exactly() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let mut c = start_cluster(dir);
    // An MBR disk as a raw image.
    let raw = real_disk(dir, "mbr", false, false);
    let mut mbr = vm_on(dir, "mbr", &raw, "raw");
    // A GPT disk as a qcow2 over a backing file, with data of its own on top.
    let base_raw = real_disk(dir, "base", true, false);
    let base = dir.join("base.qcow2");
    support::convert(&base_raw, "qcow2", &base);
    let top = dir.join("layered.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "qcow2",
        "-b",
        s(&base),
        s(&top),
    ]);
    let model = std::fs::read(&base_raw).unwrap();
    std::fs::remove_file(&base_raw).unwrap();
    let mut layered = Vm::with_image(dir, &dir.join("sockets"), "layered", top, "qcow2", model);
    layered.write_blocks(&[2, 3, 60], 0x71);
    protect(&mut c, &mbr, &[]);
    c.wait_datasources(2);
    c.cli_ok(&["pg", "modify", "live", "--add-member", "kvm01/layered"]);

    // Both at once, through one agent.
    let jobs: Vec<JobInfo> = [&mbr, &layered]
        .iter()
        .map(|vm| {
            c.admin()
                .post(
                    &format!("/datasources/kvm01/{}/backup", vm.name),
                    &BackupNowRequest::default(),
                )
                .unwrap()
        })
        .collect();
    for (vm, job) in [&mut mbr, &mut layered].into_iter().zip(&jobs) {
        let j = c.wait_job(job.id);
        assert_eq!(j.state, JobState::Succeeded, "{j:?}");
        let rp = j.recovery_point.clone().unwrap();
        assert_eq!(
            point(&c, &rp).consistency,
            Consistency::CrashConsistent,
            "no guest agent: paused"
        );
        assert_restores(&c, vm, &rp, &vm.model.clone());
        wait_released(vm);
    }

    // Incrementals of both: exactly what was written.
    for vm in [&mut mbr, &mut layered] {
        let dirty = vm.write_blocks(&[5, 300], 0x72);
        let j = backup_now(&c, vm);
        assert_eq!(j.kind, JobKind::Sync);
        assert_eq!(j.bytes_read, dirty, "{:?}", j.log);
        assert_restores_now(&c, vm, &j);
        wait_released(vm);
    }
}

/// Restores disk `disk` of recovery point `id` and compares it with `want`.
fn assert_disk_restores(c: &Cluster, vm: &Vm, id: &str, disk: usize, want: &[u8]) {
    let out = c.dir.join(format!("{}-{disk}-restored.raw", vm.name));
    ok(&[
        "restore",
        "-d",
        s(&c.datastore()),
        "--source",
        &format!("kvm01/{}", vm.name),
        "--point",
        id,
        "--disk",
        &disk.to_string(),
        "-o",
        s(&out),
        "--format",
        "raw",
        "--no-fsync",
        "-q",
    ]);
    let got = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    assert_eq!(got.len(), want.len(), "size of disk {disk} of {id}");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("disk {disk} of recovery point {id} differs from the view at byte {i}");
    }
}

#[test]
fn a_vm_with_a_gpt_qcow2_and_an_mbr_raw_disk_restores_both_byte_for_byte() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let mut c = start_cluster(dir);
    let gpt = real_disk(dir, "two-gpt", true, false);
    let mbr = real_disk(dir, "two-mbr", false, false);
    let gpt_img = dir.join("two-gpt.qcow2");
    support::convert(&gpt, "qcow2", &gpt_img);
    let gpt_model = std::fs::read(&gpt).unwrap();
    let mbr_model = std::fs::read(&mbr).unwrap();
    let mut vm = Vm::with_images(
        dir,
        &dir.join("sockets"),
        "two",
        vec![(gpt_img, "qcow2", gpt_model), (mbr, "raw", mbr_model)],
    );
    protect(&mut c, &vm, &[]);
    let check = |c: &Cluster, vm: &Vm, j: &JobInfo| {
        let rp = j.recovery_point.as_deref().unwrap();
        let p = point(c, rp);
        assert_eq!(p.disks.len(), 2, "{p:?}");
        assert_disk_restores(c, vm, rp, 0, &vm.model);
        assert_disk_restores(c, vm, rp, 1, &vm.extra[0].model);
    };
    let j0 = backup_now(&c, &vm);
    check(&c, &vm, &j0);
    wait_released(&mut vm);
    // Writes on both disks, the second one's in its partial last block too.
    let size1 = vm.extra[0].model.len() as u64;
    let mut dirty = vm.write_blocks(&[300], 0x41);
    vm.write_on(1, 40 * BLOCK, BLOCK, 0x42);
    vm.write_on(1, size1 - 512, 512, 0x43);
    dirty += BLOCK + size1 % BLOCK;
    let j1 = backup_now(&c, &vm);
    assert_eq!(j1.kind, JobKind::Sync);
    assert_eq!(j1.bytes_read, dirty, "{:?}", j1.log);
    check(&c, &vm, &j1);
    wait_released(&mut vm);
}

/// The alerts of `kind`.
fn alerts_of(c: &Cluster, kind: &str) -> Vec<AlertInfo> {
    c.alerts().into_iter().filter(|a| a.kind == kind).collect()
}

#[test]
fn a_stuck_read_is_failed_by_the_watchdog_the_view_undone_and_the_next_backup_succeeds() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let mut c = Cluster::start(
        dir,
        "[scheduler]\ntick_seconds = 1\npoll_seconds = 2\nmax_attempts = 1\njob_timeout_seconds = 30\n[jobs]\nstall_seconds = 4\n[limits]\nlow_space_percent = 0\n",
    );
    // The agent's first backup of `stuck` has one read that never completes.
    c.agent_env
        .push(("HOLDFAST_TEST_STALL_READ".into(), "stuck".into()));
    let mut vm = Vm::create(dir, &dir.join("sockets"), "stuck", 32 * MIB, 8 * MIB, 21);
    protect(&mut c, &vm, &[]);

    let started = Instant::now();
    let job: JobInfo = c
        .admin()
        .post(
            "/datasources/kvm01/stuck/backup",
            &BackupNowRequest::default(),
        )
        .unwrap();
    let j = c.wait_job(job.id);
    let took = started.elapsed();
    eprintln!("the stuck job failed after {:.1} s", took.as_secs_f64());
    assert_eq!(j.state, JobState::Failed, "{j:?}");
    // 4 s without progress, plus the watchdog's tick and the agent's report period.
    assert!(took < Duration::from_secs(20), "took {took:?}");
    let err = j.error.clone().unwrap_or_default();
    assert!(
        err.contains("made no progress for 4 seconds") && err.contains("reading disk 0"),
        "{err}"
    );
    let a = alerts_of(&c, "job-stalled");
    assert_eq!(a.len(), 1, "{a:?}");
    assert!(
        a[0].message.contains("kvm01/stuck") && a[0].message.contains("reading disk 0"),
        "{}",
        a[0].message
    );

    // The agent was told to cancel: the view is undone in QEMU (no export, fleecing
    // node or job of ours; no bitmap recording for a view that never became a point).
    wait_until("the view's undoing", Duration::from_secs(30), || {
        vm.ours_left().is_empty()
    });
    assert!(vm.exports().is_empty());
    assert!(vm.qmp().status().unwrap().running, "the VM runs");

    // The next backup succeeds and restores exactly.
    vm.write_blocks(&[9], 0x21);
    let j = backup_now(&c, &vm);
    assert_restores_now(&c, &vm, &j);
    wait_released(&mut vm);
}

/// A unix socket that accepts connections and never answers (a hung QMP monitor or
/// guest agent). Connections are kept open for as long as it lives.
struct Mute {
    path: PathBuf,
    _thread: std::thread::JoinHandle<()>,
}

impl Mute {
    fn at(path: PathBuf) -> Mute {
        let _ = std::fs::remove_file(&path);
        let l = UnixListener::bind(&path).unwrap();
        let thread = std::thread::spawn(move || {
            let mut held = Vec::new();
            for s in l.incoming() {
                match s {
                    Ok(s) => held.push(s),
                    Err(_) => return,
                }
            }
        });
        Mute {
            path,
            _thread: thread,
        }
    }
}

impl Drop for Mute {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[test]
fn mute_monitors_and_guest_agents_stopped_and_killed_qemus_end_within_deadlines() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let sockets = dir.join("sockets");
    let mut c = start_cluster(dir);
    std::fs::create_dir_all(&sockets).unwrap();
    // A QMP monitor that accepts and never answers, beside two real VMs.
    let _mute_qmp = Mute::at(sockets.join("mute.qmp"));
    let mut a = Vm::create(dir, &sockets, "a", 256 * MIB, 256 * MIB, 31);
    let mut b = Vm::create(dir, &sockets, "b", 16 * MIB, 4 * MIB, 32);
    // `b` has a guest agent that accepts and never answers.
    let _mute_qga = Mute::at(sockets.join("b.qga"));
    protect(
        &mut c,
        &a,
        &[
            "--qemu-timeout-seconds",
            "3",
            "--freeze-timeout-seconds",
            "2",
            "--threads",
            "1",
        ],
    );
    wait_until("both VMs listed", Duration::from_secs(60), || {
        let ds = c.datasources();
        ["kvm01/a", "kvm01/b"]
            .iter()
            .all(|n| ds.iter().any(|d| d.present && &d.name == n))
    });
    c.cli_ok(&["pg", "modify", "live", "--add-member", "kvm01/b"]);

    // The mute guest agent: the freeze times out, the VM is paused instead.
    let started = Instant::now();
    let jb = backup_now(&c, &b);
    eprintln!(
        "backup with a mute guest agent: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let rp = jb.recovery_point.clone().unwrap();
    assert_eq!(point(&c, &rp).consistency, Consistency::CrashConsistent);
    assert!(log_has(&jb, "VM paused for"), "{:?}", jb.log);
    assert_restores(&c, &b, &rp, &b.model.clone());
    wait_released(&mut b);
    let ja = backup_now(&c, &a);
    wait_released(&mut a);

    // QEMU stopped (SIGSTOP) while its view is exported: NBD and QMP stop answering.
    // The job fails within the agent's I/O deadline, and `b` is backed up meanwhile.
    let job = express_full_with_view(&c, &mut a);
    let pid = a.qmp().peer_pid().unwrap();
    signal(pid, "STOP");
    let started = Instant::now();
    let jb = backup_now(&c, &b);
    eprintln!(
        "b backed up while a's QEMU is stopped: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(jb.recovery_point.is_some());
    let failed = c.wait_job(job.id);
    eprintln!(
        "the job of the stopped QEMU failed after {:.1} s: {:?}",
        started.elapsed().as_secs_f64(),
        failed.error
    );
    assert_eq!(failed.state, JobState::Failed, "{failed:?}");
    assert!(started.elapsed() < Duration::from_secs(60));
    let err = failed.error.clone().unwrap_or_default();
    assert!(
        err.contains("disk drive0") && err.contains("NBD export"),
        "the error names the disk and what did not answer: {err}"
    );
    signal(pid, "CONT");
    // Once QEMU answers again, the agent undoes the view; nothing is lost.
    wait_released(&mut a);
    let dirty = a.write_blocks(&[1, 2], 0x31);
    let j = backup_now(&c, &a);
    assert_eq!(j.bytes_read, dirty, "{:?}", j.log);
    assert_ne!(j.recovery_point, ja.recovery_point);
    assert_restores_now(&c, &a, &j);
    wait_released(&mut a);

    // QEMU killed during a backup: the job fails at once, `b` is unaffected, and once
    // QEMU runs again (its bitmap now inconsistent) the next backup reads it all.
    let job = express_full_with_view(&c, &mut a);
    let started = Instant::now();
    a.kill();
    let failed = c.wait_job(job.id);
    eprintln!(
        "the job of the killed QEMU failed after {:.1} s: {:?}",
        started.elapsed().as_secs_f64(),
        failed.error
    );
    assert_eq!(failed.state, JobState::Failed, "{failed:?}");
    let err = failed.error.clone().unwrap_or_default();
    assert!(
        err.contains("disk drive0"),
        "the error names the disk: {err}"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    backup_now(&c, &b);
    a.start();
    let j = backup_now(&c, &a);
    assert_restores_now(&c, &a, &j);
    wait_released(&mut a);
}

fn signal(pid: u32, sig: &str) {
    let st = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success(), "kill -{sig} {pid}");
}
