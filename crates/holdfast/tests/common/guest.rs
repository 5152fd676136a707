//! A real Debian 12 guest under QEMU, for the live-VM tests: `scripts/guest-rig` builds
//! it once (debootstrap; cached under `target/guest-rig/`), [`Guest`] boots it by direct
//! kernel boot and talks to its qemu-guest-agent.
//!
//! Files of a guest named NAME:
//! - `sockets/NAME.qmp`: QMP for the Holdfast agent under test (its `--qmp-dir`);
//! - `sockets/NAME.qga`: the guest agent (virtio-serial port `org.qemu.guest_agent.0`);
//! - `dir/NAME.test.qmp`: QMP for the test itself ([`Guest::test_qmp`]);
//! - `dir/NAME.console.log`: the guest's serial console, appended across restarts;
//! - `dir/NAME.qemu.log`: QEMU's own stdout and stderr, appended across restarts;
//! - `dir/NAME.root.qcow2`: the default root disk, an overlay on the rig's disk.
//!
//! The guest: `/dev/vda1` is the ext4 root, a second disk's `/dev/vdb1` (GPT, ext4) is
//! mounted on `/data2`, `/data` is an empty folder on the root. The agent's socket serves
//! one client at a time, so every call here connects, asks and disconnects, leaving the
//! socket free for the Holdfast agent's fsfreeze.

use super::run_bounded;
use qemu::qga::Qga;
use qemu::qmp::Qmp;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How long one boot may take, start to agent answering, on this rig's accelerator.
pub fn boot_deadline(rig: &Rig) -> Duration {
    if rig.accel == "kvm" {
        Duration::from_secs(90)
    } else {
        Duration::from_secs(240)
    }
}

/// The built guest (`scripts/guest-rig`).
#[derive(Clone, Debug)]
pub struct Rig {
    /// `target/guest-rig/VERSION`.
    pub dir: PathBuf,
    /// The guest's kernel, for `-kernel`.
    pub kernel: PathBuf,
    /// The guest's initramfs, for `-initrd`.
    pub initrd: PathBuf,
    /// The guest's root disk (qcow2, GPT, ext4 at partition 1); never written: guests
    /// boot from overlays on it.
    pub disk: PathBuf,
    /// `kvm` when this machine's KVM really runs the guest, else `tcg`.
    pub accel: String,
}

impl Rig {
    /// Builds the rig if needed (minutes, once per rig version, serialised between
    /// processes by the script), probes the accelerator; once per test process.
    pub fn get() -> Rig {
        static RIG: OnceLock<Rig> = OnceLock::new();
        RIG.get_or_init(Rig::build).clone()
    }

    fn build() -> Rig {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/guest-rig");
        let run = |args: &[&str], limit: u64| -> String {
            let mut c = Command::new(script);
            c.args(args);
            let what = format!("scripts/guest-rig {}", args.join(" "));
            let o = run_bounded(c, &what, Duration::from_secs(limit));
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(o.status.success(), "{what} failed ({}):\n{err}", o.status);
            let out = String::from_utf8_lossy(&o.stdout);
            match out.lines().last() {
                Some(l) if !l.trim().is_empty() => l.trim().to_string(),
                _ => panic!("{what} printed nothing:\n{err}"),
            }
        };
        // A cold build takes minutes; another process's build is waited for.
        let dir = PathBuf::from(run(&[], 1800));
        let accel = run(&["--accel"], 300);
        assert!(
            accel == "kvm" || accel == "tcg",
            "scripts/guest-rig --accel printed {accel:?}"
        );
        Rig {
            kernel: dir.join("vmlinuz"),
            initrd: dir.join("initrd.img"),
            disk: dir.join("disk.qcow2"),
            dir,
            accel,
        }
    }
}

/// A disk image and its QEMU format (`qcow2`, `raw`).
#[derive(Clone, Debug)]
pub struct Disk {
    pub path: PathBuf,
    pub format: String,
}

impl Disk {
    pub fn new(path: impl Into<PathBuf>, format: &str) -> Disk {
        Disk {
            path: path.into(),
            format: format.to_string(),
        }
    }
}

/// How to boot a [`Guest`].
#[derive(Clone, Debug)]
pub struct BootOpts {
    /// The root disk (`drive0`, node `disk0`, the guest's vda). `None` (the default):
    /// a fresh qcow2 overlay `dir/NAME.root.qcow2` backed by the rig's disk.
    pub root: Option<Disk>,
    /// Data disks, in order `drive1`/`disk1` (vdb), `drive2`/`disk2` (vdc), ...
    pub data: Vec<Disk>,
    /// `-uuid`.
    pub uuid: String,
    /// Guest memory, MiB.
    pub memory_mib: u32,
}

impl Default for BootOpts {
    fn default() -> BootOpts {
        BootOpts {
            root: None,
            data: Vec::new(),
            uuid: "5e0c1a7e-0000-4000-8000-00000000b001".to_string(),
            memory_mib: 512,
        }
    }
}

impl BootOpts {
    /// Boots from `path` (in `format`) instead of a fresh overlay.
    pub fn root(mut self, path: impl Into<PathBuf>, format: &str) -> BootOpts {
        self.root = Some(Disk::new(path, format));
        self
    }

    /// Adds a data disk (the next `driveN`/`diskN`).
    pub fn data_disk(mut self, path: impl Into<PathBuf>, format: &str) -> BootOpts {
        self.data.push(Disk::new(path, format));
        self
    }

    pub fn uuid(mut self, uuid: &str) -> BootOpts {
        self.uuid = uuid.to_string();
        self
    }
}

/// The kernel command line: quiet (a serial console is slow under TCG), no
/// mitigations (TCG runs them slowly), one legacy UART probed instead of four, and a
/// panic ends QEMU (with `-no-reboot`) instead of looping.
const APPEND: &str =
    "root=/dev/vda1 rw console=ttyS0 quiet panic=-1 mitigations=off 8250.nr_uarts=1";

/// A QEMU process running the rig's guest. Dropping it kills QEMU (files stay).
pub struct Guest {
    pub name: String,
    pub dir: PathBuf,
    pub sockets: PathBuf,
    /// The root disk QEMU opened (the overlay when none was given).
    pub root: Disk,
    pub data: Vec<Disk>,
    pub uuid: String,
    pub memory_mib: u32,
    rig: Rig,
    child: Option<Child>,
    started: Instant,
    boot_seconds: Option<f64>,
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // A QEMU started again by someone else (the Holdfast agent restarting the VM
        // with this command line) answers on the test socket: kill it too.
        if let Ok(q) = Qmp::connect(&self.test_qmp_socket(), Duration::from_millis(300))
            && let Ok(pid) = q.peer_pid()
        {
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

impl Guest {
    /// Starts QEMU (does not wait for the guest: see [`Guest::wait_agent`]).
    pub fn boot(rig: &Rig, dir: &Path, sockets: &Path, name: &str, opts: BootOpts) -> Guest {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::create_dir_all(sockets).unwrap();
        let root = match opts.root {
            Some(d) => d,
            None => {
                let overlay = dir.join(format!("{name}.root.qcow2"));
                let _ = std::fs::remove_file(&overlay);
                let mut c = Command::new("qemu-img");
                c.args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
                    .arg(&rig.disk)
                    .arg(&overlay);
                let o = run_bounded(c, "qemu-img create (root overlay)", Duration::from_secs(60));
                assert!(
                    o.status.success(),
                    "qemu-img create {}: {}",
                    overlay.display(),
                    String::from_utf8_lossy(&o.stderr)
                );
                Disk::new(overlay, "qcow2")
            }
        };
        let mut g = Guest {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            sockets: sockets.to_path_buf(),
            root,
            data: opts.data,
            uuid: opts.uuid,
            memory_mib: opts.memory_mib,
            rig: rig.clone(),
            child: None,
            started: Instant::now(),
            boot_seconds: None,
        };
        let _ = std::fs::remove_file(g.console_log());
        let _ = std::fs::remove_file(g.qemu_log());
        g.start();
        g
    }

    /// `sockets/NAME.qmp`: the QMP socket for the Holdfast agent.
    pub fn agent_qmp_socket(&self) -> PathBuf {
        self.sockets.join(format!("{}.qmp", self.name))
    }

    /// `sockets/NAME.qga`: the guest agent's socket.
    pub fn qga_socket(&self) -> PathBuf {
        self.sockets.join(format!("{}.qga", self.name))
    }

    /// `dir/NAME.test.qmp`: the test's own QMP socket.
    pub fn test_qmp_socket(&self) -> PathBuf {
        self.dir.join(format!("{}.test.qmp", self.name))
    }

    pub fn console_log(&self) -> PathBuf {
        self.dir.join(format!("{}.console.log", self.name))
    }

    pub fn qemu_log(&self) -> PathBuf {
        self.dir.join(format!("{}.qemu.log", self.name))
    }

    /// The full QEMU command line (program first) this guest runs with.
    pub fn command_line(&self) -> Vec<String> {
        let s = |p: &Path| p.to_str().unwrap().to_string();
        let mut a: Vec<String> = vec!["qemu-system-x86_64".into()];
        let mut add = |args: &[&str]| a.extend(args.iter().map(|x| x.to_string()));
        let machine = format!("q35,accel={}", self.rig.accel);
        let cpu = if self.rig.accel == "kvm" {
            "host"
        } else {
            "max"
        };
        let mem = self.memory_mib.to_string();
        add(&["-nodefaults", "-no-user-config", "-display", "none"]);
        add(&["-machine", &machine, "-cpu", cpu, "-smp", "2", "-m", &mem]);
        add(&["-no-reboot", "-name", &self.name, "-uuid", &self.uuid]);
        add(&[
            "-kernel",
            &s(&self.rig.kernel),
            "-initrd",
            &s(&self.rig.initrd),
        ]);
        add(&["-append", APPEND]);
        let disks = std::iter::once(&self.root).chain(&self.data);
        for (i, d) in disks.enumerate() {
            let drive = format!(
                "file={},format={},if=none,id=drive{i},node-name=disk{i}",
                s(&d.path),
                d.format
            );
            let vd = format!("vd{}", (b'a' + i as u8) as char);
            let dev = format!("virtio-blk-pci,drive=drive{i},id={vd}");
            add(&["-drive", &drive, "-device", &dev]);
        }
        let qmp = |p: PathBuf| format!("unix:{},server=on,wait=off", s(&p));
        add(&["-qmp", &qmp(self.agent_qmp_socket())]);
        add(&["-qmp", &qmp(self.test_qmp_socket())]);
        let qga = format!(
            "socket,id=qga0,path={},server=on,wait=off",
            s(&self.qga_socket())
        );
        add(&["-device", "virtio-serial-pci", "-chardev", &qga]);
        add(&[
            "-device",
            "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
        ]);
        let console = format!("file,id=console0,path={},append=on", s(&self.console_log()));
        add(&["-chardev", &console, "-serial", "chardev:console0"]);
        a
    }

    fn start(&mut self) {
        for p in [
            self.agent_qmp_socket(),
            self.test_qmp_socket(),
            self.qga_socket(),
        ] {
            let _ = std::fs::remove_file(p);
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.qemu_log())
            .unwrap();
        let args = self.command_line();
        let child = Command::new(&args[0])
            .args(&args[1..])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("qemu-system-x86_64 must be installed (scripts/install-deps)");
        self.child = Some(child);
        self.started = Instant::now();
        self.boot_seconds = None;
    }

    /// QEMU's pid, while it is this test's child.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// True while QEMU (this test's child) runs.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().unwrap().is_none(),
            None => false,
        }
    }

    /// Seconds from QEMU's start to the agent's first answer, once [`Guest::wait_agent`]
    /// saw it (per boot: [`Guest::restart`] resets it).
    pub fn boot_seconds(&self) -> Option<f64> {
        self.boot_seconds
    }

    /// The last `n` lines of the serial console and of QEMU's log, for failure messages.
    pub fn console_tail(&self, n: usize) -> String {
        let tail = |p: PathBuf| {
            let text = std::fs::read(&p).unwrap_or_default();
            let text = String::from_utf8_lossy(&text);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        };
        format!(
            "--- console ({}):\n{}\n--- qemu log:\n{}",
            self.console_log().display(),
            tail(self.console_log()),
            tail(self.qemu_log())
        )
    }

    /// Waits until the guest agent answers a ping (each try a fresh connection, dropped
    /// at once), at most `limit` from now; records [`Guest::boot_seconds`] on the first
    /// answer of this boot. Panics with the console's last 40 lines on the deadline or
    /// when QEMU exits.
    pub fn wait_agent(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let last = match self.try_ping(Duration::from_secs(2)) {
                Ok(()) => {
                    if self.boot_seconds.is_none() {
                        self.boot_seconds = Some(self.started.elapsed().as_secs_f64());
                    }
                    return;
                }
                Err(e) => e,
            };
            if let Some(c) = self.child.as_mut()
                && let Some(st) = c.try_wait().unwrap()
            {
                panic!(
                    "{}: QEMU exited ({st}) before the guest agent answered ({last})\n{}",
                    self.name,
                    self.console_tail(40)
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "{}: the guest agent did not answer within {} s ({last})\n{}",
                    self.name,
                    limit.as_secs(),
                    self.console_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn try_ping(&self, timeout: Duration) -> Result<(), String> {
        let mut q = Qga::connect(&self.qga_socket(), timeout).map_err(|e| e.to_string())?;
        q.ping(timeout).map_err(|e| e.to_string())
    }

    /// A fresh guest-agent connection; drop it soon (one client at a time).
    pub fn qga(&self, timeout: Duration) -> Qga {
        Qga::connect(&self.qga_socket(), timeout).unwrap_or_else(|e| {
            panic!("{}: guest agent: {e}\n{}", self.name, self.console_tail(20))
        })
    }

    /// Runs one guest-agent command on a fresh connection, retrying the connection
    /// (another client, such as the Holdfast agent, may hold the socket) until
    /// `deadline`. A command that was sent but got no answer is sent again only when
    /// `idempotent`; an error answer panics.
    fn agent(&self, cmd: &str, args: &Value, deadline: Instant, idempotent: bool) -> Value {
        let mut last = String::from("not tried");
        while Instant::now() < deadline {
            let t = deadline
                .saturating_duration_since(Instant::now())
                .min(Duration::from_secs(10));
            match Qga::connect(&self.qga_socket(), t) {
                Ok(mut q) => match q.execute(cmd, args.clone(), t) {
                    Ok(v) => return v,
                    Err(e @ qemu::Error::Command { .. }) => {
                        panic!("{}: {cmd} {args}: {e}", self.name)
                    }
                    Err(e) if idempotent => last = e.to_string(),
                    Err(e) => panic!(
                        "{}: {cmd} {args}: {e}\n{}",
                        self.name,
                        self.console_tail(20)
                    ),
                },
                Err(e) => last = e.to_string(),
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!(
            "{}: {cmd} {args}: no answer in time ({last})\n{}",
            self.name,
            self.console_tail(20)
        )
    }

    /// Runs `/bin/sh -c CMD` in the guest and waits for it: (exit code, stdout, stderr).
    /// A process killed by a signal gives 128 + the signal. Panics after `timeout`.
    pub fn exec(&self, cmd: &str, timeout: Duration) -> (i64, String, String) {
        let deadline = Instant::now() + timeout;
        let args = json!({"path": "/bin/sh", "arg": ["-c", cmd], "capture-output": true});
        let pid = self.agent("guest-exec", &args, deadline, false)["pid"]
            .as_i64()
            .expect("guest-exec returns a pid");
        loop {
            let st = self.agent("guest-exec-status", &json!({ "pid": pid }), deadline, true);
            if st["exited"].as_bool() == Some(true) {
                let text = |k: &str| {
                    let b = st[k].as_str().map(base64_decode).unwrap_or_default();
                    String::from_utf8_lossy(&b).into_owned()
                };
                let code = match (st["exitcode"].as_i64(), st["signal"].as_i64()) {
                    (Some(c), _) => c,
                    (None, Some(sig)) => 128 + sig,
                    _ => panic!("guest-exec-status without exitcode or signal: {st}"),
                };
                return (code, text("out-data"), text("err-data"));
            }
            assert!(
                Instant::now() < deadline,
                "{}: `{cmd}` still running after {} s",
                self.name,
                timeout.as_secs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// As [`Guest::exec`], expecting exit code 0; returns stdout.
    pub fn exec_ok(&self, cmd: &str, timeout: Duration) -> String {
        let (code, out, err) = self.exec(cmd, timeout);
        assert_eq!(
            code, 0,
            "{}: `{cmd}` exited {code}\nstdout: {out}\nstderr: {err}",
            self.name
        );
        out
    }

    /// Starts `/bin/sh -c CMD` in the guest without waiting; returns the shell's pid in
    /// the guest (`exec PROGRAM ...` makes it the program's). Its output is discarded.
    pub fn spawn(&self, cmd: &str) -> i64 {
        let deadline = Instant::now() + Duration::from_secs(60);
        let args = json!({"path": "/bin/sh", "arg": ["-c", cmd], "capture-output": false});
        self.agent("guest-exec", &args, deadline, false)["pid"]
            .as_i64()
            .expect("guest-exec returns a pid")
    }

    /// Asks the guest to power off (guest-shutdown: a clean systemd poweroff) and waits
    /// for QEMU to exit; kills it and panics if it has not after `limit`. Returns how
    /// long it took.
    pub fn shutdown(&mut self, limit: Duration) -> Duration {
        let start = Instant::now();
        let deadline = start + limit;
        assert!(self.child.is_some(), "{}: QEMU is not running", self.name);
        // guest-shutdown never answers on success: the reply's timeout is the expected
        // outcome, or the connection closing as the guest goes down.
        let mut sent = false;
        let mut last = String::from("not tried");
        while !sent && Instant::now() < deadline {
            let t = deadline
                .saturating_duration_since(Instant::now())
                .min(Duration::from_secs(10));
            match Qga::connect(&self.qga_socket(), t) {
                Ok(mut q) => {
                    let short = t.min(Duration::from_secs(2));
                    match q.execute("guest-shutdown", json!({"mode": "powerdown"}), short) {
                        Ok(_) | Err(qemu::Error::Timeout(_)) | Err(qemu::Error::Io { .. }) => {
                            sent = true
                        }
                        Err(e) => panic!("{}: guest-shutdown: {e}", self.name),
                    }
                }
                Err(e) => last = e.to_string(),
            }
        }
        let child = self.child.as_mut().unwrap();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                self.child = None;
                assert!(
                    st.success(),
                    "{}: QEMU exited with {st} on shutdown",
                    self.name
                );
                return start.elapsed();
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                self.child = None;
                let what = if sent {
                    "not powered off".to_string()
                } else {
                    format!("guest-shutdown not delivered ({last})")
                };
                panic!(
                    "{}: {what} {} s after asking; killed\n{}",
                    self.name,
                    limit.as_secs(),
                    self.console_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills QEMU (SIGKILL): a power cut for the guest.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            c.wait().unwrap();
        }
    }

    /// Starts QEMU again with the same disks and command line (the root overlay is kept,
    /// not recreated); kills it first if it still runs. Wait with [`Guest::wait_agent`].
    pub fn restart(&mut self) {
        self.kill();
        self.start();
    }

    /// A fresh connection to the test's QMP socket (QMP serves one client per socket:
    /// drop it before asking for another).
    pub fn test_qmp(&self) -> Qmp {
        Qmp::connect(&self.test_qmp_socket(), Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("{}: test QMP: {e}\n{}", self.name, self.console_tail(20)))
    }
}

/// Standard base64 (with or without padding; whitespace ignored), as guest-exec-status
/// encodes output.
pub fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => (c - b'A') as u32,
            b'a'..=b'z' => (c - b'a') as u32 + 26,
            b'0'..=b'9' => (c - b'0') as u32 + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c:#x}"),
        }
    };
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes().filter(|c| !c.is_ascii_whitespace() && *c != b'=') {
        acc = (acc << 6) | val(c);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

/// Makes `path` a raw disk of `mib` MiB for a guest's data disk: GPT, partition 1 from
/// 1 MiB to the end, ext4 (label `data`) on it, empty. As the guest's second disk it is
/// mounted on `/data2`.
pub fn make_data_disk(path: &Path, mib: u64) {
    assert!(mib >= 8, "a data disk needs 8 MiB at least");
    let _ = std::fs::remove_file(path);
    std::fs::File::create(path)
        .unwrap()
        .set_len(mib << 20)
        .unwrap();
    let run = |prog: &str, args: &[&str]| {
        let mut c = Command::new(prog);
        c.args(args);
        let o = run_bounded(c, prog, Duration::from_secs(60));
        assert!(
            o.status.success(),
            "{prog} {args:?}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    };
    let p = path.to_str().unwrap();
    run("sgdisk", &["-o", "-n", "1:2048:0", "-t", "1:8300", p]);
    // The partition ends 33 sectors before the disk (the backup GPT): whole MiB below.
    let part_kib = ((mib - 2) << 10).to_string();
    run(
        "mke2fs",
        &[
            "-q",
            "-F",
            "-t",
            "ext4",
            "-L",
            "data",
            "-E",
            "offset=1048576",
            p,
            &part_kib,
        ],
    );
}

/// The contents of `file` (an absolute path) in the ext4 file system at 1 MiB of the
/// raw image `raw` (a rig disk converted to raw, or a [`make_data_disk`] disk), read with
/// debugfs on the host: what the guest wrote, once it is shut down.
pub fn ext4_cat(raw: &Path, file: &str) -> Vec<u8> {
    let mut c = Command::new("debugfs");
    c.arg("-R")
        .arg(format!("cat {file}"))
        .arg(format!("{}?offset=1048576", raw.to_str().unwrap()));
    let o = run_bounded(c, "debugfs", Duration::from_secs(60));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && !err.contains("File not found"),
        "debugfs cat {file} in {}: {err}",
        raw.display()
    );
    o.stdout
}
