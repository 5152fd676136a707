//! Fixtures shared by the integration tests: real QEMU processes and the guest-agent
//! double, each in a temporary folder and killed on drop.

#![allow(dead_code)] // each test binary uses part of this module

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use qemu::Qmp;

/// Finds `name` in PATH, or fails the test saying what to install (never skips: a
/// missing tool must not pass for a working client).
pub fn tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "required tool `{name}` not found in PATH; these tests run real QEMU \
         (Debian: apt-get install qemu-system-x86 qemu-utils python3)"
    );
}

/// Debian's python3 when present: a pyenv shim costs ~250 ms per start.
pub fn python() -> PathBuf {
    let system = PathBuf::from("/usr/bin/python3");
    if system.is_file() {
        system
    } else {
        tool("python3")
    }
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-img create -f qcow2 PATH SIZE`.
pub fn create_qcow2(path: &Path, size: &str) {
    run(Command::new(tool("qemu-img"))
        .args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg(size));
}

/// A QEMU with no machine (`-machine none`, TCG) and one 64 MiB qcow2 drive
/// (`-drive if=none,id=drive0,node-name=disk0`), named vm1 with a fixed uuid.
pub struct Qemu {
    child: Child,
    pub dir: tempfile::TempDir,
    pub qmp_path: PathBuf,
    pub image: PathBuf,
}

pub const UUID: &str = "11111111-2222-3333-4444-555555555555";

impl Qemu {
    pub fn start() -> Qemu {
        let qemu = tool("qemu-system-x86_64");
        let dir = tempfile::Builder::new()
            .prefix("qemu-test")
            .tempdir()
            .expect("temp dir");
        let image = dir.path().join("disk.qcow2");
        create_qcow2(&image, "64M");
        let qmp_path = dir.path().join("qmp.sock");
        let log = fs::File::create(dir.path().join("qemu.log")).expect("qemu.log");
        let child = Command::new(qemu)
            .args([
                "-nodefaults",
                "-display",
                "none",
                "-machine",
                "none,accel=tcg",
            ])
            .args(["-name", "vm1", "-uuid", UUID])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
            .arg("-drive")
            .arg(format!(
                "if=none,id=drive0,node-name=disk0,driver=qcow2,file.driver=file,file.filename={}",
                image.display()
            ))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn qemu-system-x86_64");
        Qemu {
            child,
            dir,
            qmp_path,
            image,
        }
    }

    /// Connects through `Qmp::connect`'s retry (the socket appears some ms after spawn).
    pub fn connect(&mut self) -> Qmp {
        match Qmp::connect(&self.qmp_path, Duration::from_secs(10)) {
            Ok(q) => q,
            Err(e) => panic!("cannot connect to QEMU: {e}\nqemu.log:\n{}", self.log()),
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("qemu.log")).unwrap_or_default()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The guest-agent double (tests/fixtures/qga_double.py) on a socket in a temp folder,
/// logging the commands it executes.
pub struct Agent {
    child: Child,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl Agent {
    /// Starts the double with extra options (e.g. `--freeze-delay 1.5`).
    pub fn start(extra: &[&str]) -> Agent {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qga_double.py");
        let dir = tempfile::Builder::new()
            .prefix("qga-test")
            .tempdir()
            .expect("temp dir");
        let socket = dir.path().join("qga.sock");
        let log = dir.path().join("commands.log");
        let child = Command::new(python())
            .arg(&script)
            .arg(&socket)
            .arg("--log")
            .arg(&log)
            .args(extra)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn the guest agent double");
        Agent {
            child,
            dir,
            socket,
            log,
        }
    }

    /// Connects once the double listens: `Qga::connect` fails fast on a socket that
    /// does not exist or refuses, so wait for that here.
    pub fn connect(&mut self) -> qemu::Qga {
        let give_up = Instant::now() + Duration::from_secs(10);
        loop {
            match qemu::Qga::connect(&self.socket, Duration::from_secs(5)) {
                Ok(q) => return q,
                Err(qemu::Error::Io { source, .. })
                    if matches!(
                        source.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                    ) && Instant::now() < give_up =>
                {
                    if let Ok(Some(status)) = self.child.try_wait() {
                        panic!("the guest agent double exited early: {status}");
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("cannot connect to the guest agent double: {e}"),
            }
        }
    }

    /// Commands the double executed, in order.
    pub fn commands(&self) -> Vec<String> {
        fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
