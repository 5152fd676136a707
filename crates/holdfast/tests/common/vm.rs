//! A live QEMU VM for the end-to-end tests (qemu.rs, qemu_live.rs): a real
//! `qemu-system-x86_64` (TCG, `-machine none`, no guest OS) with one disk, whose guest
//! writes are injected through HMP `qemu-io`, and a model of what the disk holds; and
//! the steps those tests share (a cluster protecting it, backups, restores compared
//! with the model).

use super::cluster::*;
use super::*;
use protocol::*;
use qemu::qmp::Qmp;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

pub const MIB: u64 = 1 << 20;

/// A UUID of the VM's own (the agent tells VMs apart by it).
pub fn uuid_of(name: &str) -> String {
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    format!("5e0c1a7e-0000-4000-8000-{:012x}", h & 0xffff_ffff_ffff)
}
pub const BLOCK: u64 = 64 << 10;

/// A QEMU process with a disk (`drive0`, node `disk0`; more disks are `drive1`...),
/// its monitor for the agent in `sockets/NAME.qmp` and a second monitor for the test;
/// and a model of what each disk holds.
pub struct Vm {
    pub name: String,
    pub fmt: String,
    pub dir: PathBuf,
    pub sockets: PathBuf,
    pub img: PathBuf,
    pub child: Option<Child>,
    /// A QEMU that is not the test's child (the agent started it again).
    pub adopted: Option<u32>,
    /// The agent may have started QEMU again: on drop, whatever QEMU answers on the
    /// test's socket is killed too (a failed test must not leave one running).
    pub agent_restarts: bool,
    /// QEMU runs in `dir` and names its image relative to it.
    pub relative: bool,
    pub qmp: Option<Qmp>,
    pub model: Vec<u8>,
    /// Disks after the first (`drive1`, `drive2`...).
    pub extra: Vec<ExtraDisk>,
}

/// A disk of a [`Vm`] after its first.
pub struct ExtraDisk {
    pub img: PathBuf,
    pub fmt: String,
    pub model: Vec<u8>,
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.qmp = None;
        let test_sock = self.dir.join(format!("{}.test.qmp", self.name));
        let restarted = self
            .agent_restarts
            .then(|| Qmp::connect(&test_sock, Duration::from_millis(300)).ok())
            .flatten()
            .and_then(|q| q.peer_pid().ok());
        for pid in self.adopted.iter().chain(restarted.iter()) {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
    }
}

impl Vm {
    /// Makes the disk (`size` bytes, random data in the first `filled` bytes) and
    /// starts QEMU.
    pub fn create(dir: &Path, sockets: &Path, name: &str, size: u64, filled: u64, seed: u64) -> Vm {
        Self::create_as(dir, sockets, name, size, filled, seed, "qcow2")
    }

    /// As [`Vm::create`], the disk in format `fmt` (`qcow2` or `raw`).
    pub fn create_as(
        dir: &Path,
        sockets: &Path,
        name: &str,
        size: u64,
        filled: u64,
        seed: u64,
        fmt: &str,
    ) -> Vm {
        let raw = dir.join(format!("{name}.raw"));
        let img = dir.join(format!("{name}.{fmt}"));
        let mut model = vec![0u8; size as usize];
        Rng::new(seed).fill(&mut model[..filled as usize]);
        std::fs::write(&raw, &model).unwrap();
        if fmt != "raw" {
            qemu_img(&["convert", "-f", "raw", "-O", fmt, s(&raw), s(&img)]);
            std::fs::remove_file(&raw).unwrap();
        }
        Self::with_image(dir, sockets, name, img, fmt, model)
    }

    /// Starts QEMU on the existing image `img` (format `fmt`), whose guest-visible
    /// bytes are `model`.
    pub fn with_image(
        dir: &Path,
        sockets: &Path,
        name: &str,
        img: PathBuf,
        fmt: &str,
        model: Vec<u8>,
    ) -> Vm {
        Self::with_images(dir, sockets, name, vec![(img, fmt, model)])
    }

    /// Starts QEMU on several existing images: `(image, format, guest-visible bytes)`,
    /// the first one being `drive0`.
    pub fn with_images(
        dir: &Path,
        sockets: &Path,
        name: &str,
        mut disks: Vec<(PathBuf, &str, Vec<u8>)>,
    ) -> Vm {
        std::fs::create_dir_all(sockets).unwrap();
        let extra: Vec<ExtraDisk> = disks
            .drain(1..)
            .map(|(img, fmt, model)| ExtraDisk {
                img,
                fmt: fmt.to_string(),
                model,
            })
            .collect();
        let (img, fmt, model) = disks.pop().expect("a VM has a disk");
        let mut vm = Vm {
            fmt: fmt.to_string(),
            name: name.to_string(),
            dir: dir.to_path_buf(),
            sockets: sockets.to_path_buf(),
            img,
            child: None,
            adopted: None,
            agent_restarts: false,
            relative: false,
            qmp: None,
            model,
            extra,
        };
        vm.start();
        vm
    }

    pub fn agent_socket(&self) -> PathBuf {
        self.sockets.join(format!("{}.qmp", self.name))
    }

    pub fn start(&mut self) {
        let test_sock = self.dir.join(format!("{}.test.qmp", self.name));
        for p in [self.agent_socket(), test_sock.clone()] {
            let _ = std::fs::remove_file(p);
        }
        let log = std::fs::File::create(self.dir.join(format!("{}.log", self.name))).unwrap();
        let img = if self.relative {
            self.img.file_name().unwrap().to_str().unwrap()
        } else {
            s(&self.img)
        };
        let child = Command::new("qemu-system-x86_64")
            .current_dir(&self.dir)
            .args([
                "-nodefaults",
                "-display",
                "none",
                "-machine",
                "none,accel=tcg",
            ])
            .args([
                "-name",
                &self.name,
                "-uuid",
                &uuid_of(&self.name),
            ])
            .arg("-qmp")
            .arg(format!(
                "unix:{},server=on,wait=off",
                s(&self.agent_socket())
            ))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", s(&test_sock)))
            .arg("-drive")
            .arg(format!(
                "if=none,id=drive0,node-name=disk0,driver={},file.driver=file,file.filename={}",
                self.fmt, img
            ))
            .args(self.extra.iter().enumerate().flat_map(|(i, d)| {
                [
                    "-drive".to_string(),
                    format!(
                        "if=none,id=drive{n},node-name=disk{n},driver={},file.driver=file,file.filename={}",
                        d.fmt,
                        s(&d.img),
                        n = i + 1
                    ),
                ]
            }))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("qemu-system-x86_64 must be installed (scripts/install-deps)");
        self.child = Some(child);
        self.qmp = Some(Qmp::connect(&test_sock, Duration::from_secs(30)).unwrap());
    }

    pub fn qmp(&mut self) -> &mut Qmp {
        self.qmp.as_mut().unwrap()
    }

    /// Quits QEMU cleanly (persistent bitmaps are written to the qcow2).
    pub fn quit(&mut self) {
        let _ = self.qmp().execute("quit", serde_json::Value::Null);
        self.qmp = None;
        if let Some(mut c) = self.child.take() {
            c.wait().unwrap();
        }
    }

    /// Kills QEMU (persistent bitmaps are left marked in use: inconsistent).
    pub fn kill(&mut self) {
        self.qmp = None;
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// A guest write of `len` bytes of `byte` at `off`, through the disk's
    /// BlockBackend (as the guest's own writes go); the model follows.
    pub fn write(&mut self, off: u64, len: u64, byte: u8) {
        self.write_on(0, off, len, byte);
    }

    /// [`Vm::write`] on disk `disk` (0 = `drive0`).
    pub fn write_on(&mut self, disk: usize, off: u64, len: u64, byte: u8) {
        let cmd = format!("qemu-io drive{disk} \"write -P {byte} {off} {len}\"");
        let out = self.qmp().hmp(&cmd).unwrap();
        assert!(out.trim().is_empty(), "HMP {cmd}: {out}");
        let model = match disk {
            0 => &mut self.model,
            n => &mut self.extra[n - 1].model,
        };
        model[off as usize..(off + len) as usize].fill(byte);
    }

    /// Writes one 64 KiB block at each of `blocks` (block numbers); returns the
    /// bytes dirtied.
    pub fn write_blocks(&mut self, blocks: &[u64], byte: u8) -> u64 {
        for &b in blocks {
            self.write(b * BLOCK, BLOCK, byte);
        }
        blocks.len() as u64 * BLOCK
    }

    pub fn exports(&mut self) -> Vec<String> {
        self.qmp().block_exports().unwrap()
    }

    pub fn ours_left(&mut self) -> Vec<String> {
        let mut v: Vec<String> = self.qmp().block_exports().unwrap();
        v.extend(self.qmp().block_jobs().unwrap());
        v.extend(self.qmp().node_names().unwrap());
        v.retain(|n| n.starts_with("hf-"));
        v
    }

    pub fn bitmaps(&mut self) -> Vec<qemu::qmp::Bitmap> {
        self.qmp().bitmaps("disk0").unwrap()
    }
}

/// A server, a VM `name` (qcow2, `size` bytes, random data in the first `filled`), and
/// an agent protecting it with `--qmp-dir` and `extra`.
pub fn setup(
    dir: &Path,
    name: &str,
    size: u64,
    filled: u64,
    seed: u64,
    extra: &[&str],
) -> (Cluster, Vm) {
    let mut c = start_cluster(dir);
    let vm = Vm::create(dir, &dir.join("sockets"), name, size, filled, seed);
    protect(&mut c, &vm, extra);
    (c, vm)
}

pub fn start_cluster(dir: &Path) -> Cluster {
    // No reruns and a short watchdog: a killed agent's job fails within seconds and
    // the test's own backups are never queued behind a rerun.
    Cluster::start(
        dir,
        "[scheduler]\ntick_seconds = 1\npoll_seconds = 2\nmax_attempts = 1\njob_timeout_seconds = 5\n[limits]\nlow_space_percent = 0\n",
    )
}

pub fn protect(c: &mut Cluster, vm: &Vm, extra: &[&str]) -> PathBuf {
    let mut args = vec!["--qmp-dir", s(&vm.sockets)];
    args.extend_from_slice(extra);
    protect_with(c, vm, &args)
}

/// Starts the agent with `args` as its provider arguments and protects `vm`.
pub fn protect_with(c: &mut Cluster, vm: &Vm, args: &[&str]) -> PathBuf {
    let adir = c.agent_with("kvm01", args);
    c.wait_datasources(1);
    manual_group(c, "live", &[&format!("kvm01/{}", vm.name)]);
    adir
}

/// Puts `members` in a new protection group whose backups run only when asked for
/// (manual initial replica; the daily synchronization at 03:33 UTC).
pub fn manual_group(c: &Cluster, group: &str, members: &[&str]) {
    c.create_group(
        group,
        members,
        &["--recovery-point-times", "03:33", "--replica", "manual"],
    );
}

/// Runs `backup-now --wait` and returns the finished job.
pub fn backup_now(c: &Cluster, vm: &Vm) -> JobInfo {
    let out = c.cli_ok(&[
        "backup-now",
        &format!("kvm01/{}", vm.name),
        "--wait",
        "--json",
    ]);
    let j: JobInfo = serde_json::from_str(&out).unwrap();
    assert_eq!(j.state, JobState::Succeeded, "{j:?}");
    c.job(j.id)
}

/// Queues an express full backup (it reads everything, so it runs for a while) and
/// returns once its view is exported.
pub fn express_full_with_view(c: &Cluster, vm: &mut Vm) -> JobInfo {
    let job: JobInfo = c
        .admin()
        .post(
            &format!("/datasources/kvm01/{}/backup", vm.name),
            &BackupNowRequest {
                express_full: true,
                ..Default::default()
            },
        )
        .unwrap();
    wait_until("the view's export", Duration::from_secs(60), || {
        !vm.exports().is_empty()
    });
    job
}

pub fn point(c: &Cluster, id: &str) -> RecoveryPointInfo {
    let all: Vec<RecoveryPointInfo> = c.admin().get("/recovery-points").unwrap();
    all.into_iter().find(|p| p.id == id).unwrap()
}

/// Restores recovery point `id` and compares it with `want`.
pub fn assert_restores(c: &Cluster, vm: &Vm, id: &str, want: &[u8]) {
    let out = c.dir.join("restored.raw");
    restore_raw(&c.datastore(), &format!("kvm01/{}", vm.name), id, &out);
    let got = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    assert_eq!(got.len(), want.len(), "size of {id}");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("recovery point {id} differs from the view at byte {i}");
    }
}

/// The recovery point job `j` made restores to the disk as the model holds it now.
pub fn assert_restores_now(c: &Cluster, vm: &Vm, j: &JobInfo) {
    let id = j
        .recovery_point
        .as_deref()
        .expect("the job made a recovery point");
    assert_restores(c, vm, id, &vm.model);
}

/// Waits for the agent to release the last view: nothing of it left in QEMU, and one
/// bitmap of ours (tracking the writes since that view).
pub fn wait_released(vm: &mut Vm) {
    wait_until("the view's release", Duration::from_secs(30), || {
        let ours = vm
            .bitmaps()
            .iter()
            .filter(|b| b.name.starts_with("hf-"))
            .count();
        vm.ours_left().is_empty() && ours == 1
    });
}

pub fn log_has(j: &JobInfo, needle: &str) -> bool {
    j.log.iter().any(|l| l.message.contains(needle))
}
