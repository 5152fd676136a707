//! The `qemu` provider's original instance (see [`crate::original`]): the disk files
//! come from QEMU itself (`query-block`), the VM is stopped with QMP `quit` and started
//! again with the command line, folder and environment it was started with.
//!
//! Why `quit` rather than `system_powerdown`: the guest's disks are about to be
//! replaced by an older recovery point, so nothing the guest would save on a clean
//! shutdown survives anyway, and a powerdown depends on the guest (ACPI, an OS that
//! listens) and can take minutes. `quit` makes QEMU flush and close its images and
//! exit at once.
//!
//! How QEMU is started again is read from `/proc/PID` before it is stopped: `exe`,
//! `cmdline`, `cwd` and `environ`; the pid is the QMP socket's peer (`SO_PEERCRED`).
//! The new QEMU runs detached (its own session, stdin from /dev/null, stdout and stderr
//! appended to `STATE_DIR/NAME.qemu.log`); the agent reaps it when it exits. A QEMU
//! that forks away from the process that opened its QMP socket (`-daemonize` after the
//! socket is made) is refused rather than guessed at.

use super::{Inner, disk_name, hv, lock};
use crate::provider::{Instance, OriginalDisk};
use crate::{Error, Result};
use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long QEMU may take to exit after `quit` (it flushes its images first).
const EXIT_WAIT: Duration = Duration::from_secs(60);
/// How long a restarted QEMU may take until its QMP socket answers.
const START_WAIT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(50);

/// How a QEMU process was started, read from `/proc/PID`.
#[derive(Debug, Clone)]
struct Launch {
    pid: u32,
    /// `/proc/PID/stat` field 22: tells the process from a later one with its pid.
    start_ticks: u64,
    /// The binary, when it is still on disk under that name.
    exe: Option<PathBuf>,
    argv: Vec<OsString>,
    cwd: PathBuf,
    env: Vec<(OsString, OsString)>,
}

pub(super) struct QemuInstance {
    inner: Arc<Inner>,
    vm: String,
    launch: Option<Launch>,
}

impl QemuInstance {
    pub(super) fn new(inner: Arc<Inner>, vm: &str) -> QemuInstance {
        QemuInstance {
            inner,
            vm: vm.to_string(),
            launch: None,
        }
    }

    fn err(&self, what: &str, e: impl std::fmt::Display) -> Error {
        hv(&self.vm, what, e)
    }

    /// Reads how QEMU runs now (its pid from the QMP connection).
    fn capture(&mut self) -> Result<Launch> {
        let vm = self.vm.clone();
        let pid = self.inner.with_qmp(&vm, |qmp| {
            qmp.peer_pid().map_err(|e| hv(&vm, "QEMU's pid", e))
        })?;
        let launch = read_launch(pid).map_err(|e| self.err("reading how QEMU was started", e))?;
        self.launch = Some(launch.clone());
        Ok(launch)
    }
}

impl Instance for QemuInstance {
    fn disk_files(&mut self) -> Result<Vec<OriginalDisk>> {
        let launch = self.capture()?;
        let vm = self.vm.clone();
        let devices = self.inner.with_qmp(&vm, |qmp| Inner::disks(&vm, qmp))?;
        let mut out = Vec::new();
        for d in devices {
            let name = disk_name(&d);
            // A json: file name (several options) or a network URI is not a file that
            // can be replaced by a rename.
            if d.file.is_empty() || d.file.starts_with("json:") || d.file.contains("://") {
                return Err(self.err(
                    &format!("disk {name}"),
                    format!(
                        "its image {:?} is not a plain file; recover with --alternate",
                        d.file
                    ),
                ));
            }
            let p = Path::new(&d.file);
            // Relative to QEMU's folder, as QEMU opened it.
            let path = if p.is_absolute() {
                p.to_path_buf()
            } else {
                launch.cwd.join(p)
            };
            match std::fs::metadata(&path) {
                Ok(m) if m.is_file() => {}
                Ok(_) => {
                    return Err(self.err(
                        &format!("disk {name}"),
                        format!(
                            "{} is not a regular file (a device?); recover with --alternate",
                            path.display()
                        ),
                    ));
                }
                Err(e) => return Err(Error::io(&path, "stat", e)),
            }
            out.push(OriginalDisk {
                name,
                path,
                format: Some(d.format.clone()),
            });
        }
        Ok(out)
    }

    fn running(&mut self) -> Result<bool> {
        // The provider lists live QEMU processes only: one that answers holds its
        // images open, whether its CPUs run or are paused.
        let vm = self.vm.clone();
        match self.inner.with_qmp(&vm, |qmp| {
            qmp.status().map_err(|e| hv(&vm, "query-status", e))
        }) {
            Ok(_) => Ok(true),
            Err(e) => match &self.launch {
                Some(l) if exited(l) => Ok(false),
                _ => Err(e),
            },
        }
    }

    fn stop(&mut self) -> Result<String> {
        // Read again right before stopping: the freshest command line and a pid the
        // wait below can trust.
        let launch = self.capture()?;
        let vm = self.vm.clone();
        let t0 = Instant::now();
        let quit = self
            .inner
            .with_qmp(&vm, |qmp| qmp.quit().map_err(|e| hv(&vm, "quit", e)));
        if let Err(e) = quit {
            // QEMU refused: it still runs with its disks as they were.
            return Err(Error::Hypervisor {
                vm,
                msg: format!(
                    "stopping the VM failed ({e}); the VM still runs and the disks were not replaced"
                ),
            });
        }
        // The connection is dead now; drop it so nothing uses it.
        *lock(&self.inner.slot(&self.vm).qmp) = None;
        let deadline = t0 + EXIT_WAIT;
        while !exited(&launch) {
            if Instant::now() >= deadline {
                return Err(Error::Hypervisor {
                    vm,
                    msg: format!(
                        "QEMU (pid {}) was told to quit but has not exited after {} s; the VM is stopping or stopped, and the disks were not replaced",
                        launch.pid,
                        EXIT_WAIT.as_secs()
                    ),
                });
            }
            std::thread::sleep(POLL);
        }
        Ok(format!(
            "QMP quit; QEMU pid {} exited in {} ms",
            launch.pid,
            t0.elapsed().as_millis()
        ))
    }

    fn forget_tracking(&mut self) -> Result<()> {
        // The bitmaps live in the qcow2 that is replaced: a record naming them would
        // only be refused later; an empty record says plainly "read everything".
        self.inner.save_state(&self.vm, &super::VmState::default())
    }

    fn start(&mut self) -> Result<String> {
        let launch = self.launch.clone().ok_or_else(|| {
            Error::Invalid(format!("VM {}: how it was started is unknown", self.vm))
        })?;
        let log_path = self
            .inner
            .opts
            .state_dir
            .join(format!("{}.qemu.log", self.vm));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| Error::io(&log_path, "open", e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| Error::io(&log_path, "open", e))?;
        let (arg0, args) = launch
            .argv
            .split_first()
            .ok_or_else(|| self.err("starting QEMU", "its command line was empty"))?;
        let program = launch.exe.clone().unwrap_or_else(|| PathBuf::from(arg0));
        let mut cmd = std::process::Command::new(&program);
        {
            use std::os::unix::process::CommandExt;
            cmd.arg0(arg0);
            // SAFETY: setsid is async-signal-safe; it detaches QEMU from the agent's
            // session so that signals meant for the agent do not reach it.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::setsid() < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        cmd.args(args)
            .current_dir(&launch.cwd)
            .env_clear()
            .envs(launch.env.iter().map(|(k, v)| (k, v)))
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log2);
        let t0 = Instant::now();
        let mut child = cmd
            .spawn()
            .map_err(|e| self.err(&format!("starting {}", program.display()), e))?;
        let pid = child.id();
        let vm = self.vm.clone();
        let deadline = t0 + START_WAIT;
        let answered = loop {
            // An early exit with a failure is final; a successful one may be
            // -daemonize handing over to its child, so the socket is still waited for.
            match child.try_wait() {
                Ok(Some(st)) if !st.success() => {
                    return Err(self.err(
                        "starting QEMU",
                        format!("it exited at once ({st}); see {}", log_path.display()),
                    ));
                }
                _ => {}
            }
            let r = self.inner.with_qmp(&vm, |qmp| {
                qmp.status().map_err(|e| hv(&vm, "query-status", e))
            });
            match r {
                Ok(st) => break st,
                Err(e) if Instant::now() >= deadline => {
                    return Err(self.err(
                        "starting QEMU",
                        format!(
                            "pid {pid} was started but its QMP socket did not answer within {} s ({e}); see {}",
                            START_WAIT.as_secs(),
                            log_path.display()
                        ),
                    ));
                }
                // Connecting retries a missing socket for QMP_CONNECT itself.
                Err(_) => std::thread::sleep(POLL),
            }
        };
        // The agent is QEMU's parent: reap it whenever it exits.
        std::thread::spawn(move || {
            let _ = child.wait();
        });
        Ok(format!(
            "QEMU pid {pid}, QMP answered after {} ms, status {}; output in {}",
            t0.elapsed().as_millis(),
            answered.status,
            log_path.display()
        ))
    }
}

/// Whether the process of `l` is gone: no such pid, another process under it, or a
/// zombie (which has closed its files and released its image locks).
fn exited(l: &Launch) -> bool {
    match read_stat(l.pid) {
        Ok((state, ticks)) => state == 'Z' || state == 'X' || ticks != l.start_ticks,
        Err(_) => true,
    }
}

/// State letter and start time (clock ticks since boot) from `/proc/PID/stat`.
fn read_stat(pid: u32) -> std::io::Result<(char, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_stat(&s).ok_or_else(|| std::io::Error::other(format!("/proc/{pid}/stat: unreadable")))
}

/// `pid (comm) S ... starttime ...`: comm may hold spaces and parentheses, so the
/// fields are counted after the last `)`.
fn parse_stat(s: &str) -> Option<(char, u64)> {
    let rest = s.get(s.rfind(')')? + 1..)?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // Field 3 is the state; starttime is field 22, the 19th after it.
    let ticks = fields.nth(18)?.parse().ok()?;
    Some((state, ticks))
}

fn read_launch(pid: u32) -> std::io::Result<Launch> {
    let proc = PathBuf::from(format!("/proc/{pid}"));
    let (_, start_ticks) = read_stat(pid)?;
    let argv = split_nul(&std::fs::read(proc.join("cmdline"))?);
    if argv.is_empty() {
        return Err(std::io::Error::other(format!(
            "process {pid} has no command line (not QEMU?)"
        )));
    }
    let env = split_nul(&std::fs::read(proc.join("environ"))?)
        .into_iter()
        .filter_map(|kv| {
            let b = kv.into_vec();
            let eq = b.iter().position(|c| *c == b'=')?;
            let (k, v) = b.split_at(eq);
            Some((
                OsString::from_vec(k.to_vec()),
                OsString::from_vec(v.get(1..).unwrap_or_default().to_vec()),
            ))
        })
        .filter(|(k, _)| !k.is_empty())
        .collect();
    let cwd = std::fs::read_link(proc.join("cwd"))?;
    // A binary replaced since QEMU started reads "... (deleted)": then argv[0] is
    // looked up as the shell would.
    let exe = std::fs::read_link(proc.join("exe"))
        .ok()
        .filter(|p| !p.as_os_str().as_bytes().ends_with(b" (deleted)") && p.exists());
    Ok(Launch {
        pid,
        start_ticks,
        exe,
        argv,
        cwd,
        env,
    })
}

/// A NUL-terminated list (`cmdline`, `environ`); empty items (`-append ""`) are kept.
fn split_nul(b: &[u8]) -> Vec<OsString> {
    let b = b.strip_suffix(&[0]).unwrap_or(b);
    if b.is_empty() {
        return Vec::new();
    }
    b.split(|c| *c == 0)
        .map(|s| OsString::from_vec(s.to_vec()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_survive_odd_names() {
        let s =
            "1234 (qemu (x) y) S 1 1234 1234 0 -1 4194560 100 0 0 0 5 6 0 0 20 0 3 0 98765 1000 50";
        assert_eq!(parse_stat(s), Some(('S', 98765)));
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (x) Z"), None);
    }

    #[test]
    fn own_process_is_read_and_not_exited() {
        let l = read_launch(std::process::id()).unwrap();
        assert!(!l.argv.is_empty());
        assert!(l.cwd.is_absolute());
        assert!(!exited(&l));
        let gone = Launch {
            start_ticks: l.start_ticks + 1,
            ..l
        };
        assert!(exited(&gone));
    }

    #[test]
    fn nul_lists_split() {
        assert_eq!(
            split_nul(b"a\0\0bc\0"),
            vec![
                OsString::from("a"),
                OsString::from(""),
                OsString::from("bc")
            ]
        );
        assert!(split_nul(b"").is_empty());
    }
}
