//! `holdfast export-nbd` as a user runs it: a qcow2 image backed up into a datastore,
//! served over NBD and read by the real tools (qemu-img, nbdinfo, qemu-io, a QEMU VM).
//! The tools are required: a missing one fails the test with its name.

mod common;

use common::*;
use qemu::qmp::Qmp;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;
const SOURCE: &str = "host1/vm1";
const WAIT: Duration = Duration::from_secs(15);

struct Fixture {
    dir: tempfile::TempDir,
    ds: PathBuf,
    raw: PathBuf,
}

/// A 64 MiB disk (8 MiB random, text, holes) as qcow2, backed up into a datastore.
fn fixture(seed: u64) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    make_disk(&raw, SIZE, 8 * MIB, seed);
    let qcow2 = dir.path().join("disk.qcow2");
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2", s(&raw), s(&qcow2)]);
    let ds = dir.path().join("ds");
    create_store(&ds);
    backup(&ds, SOURCE, &[&qcow2]);
    Fixture { dir, ds, raw }
}

/// A running `holdfast export-nbd`; killed if the test ends without stopping it.
struct Export {
    child: Option<Child>,
    uri: String,
    stderr: PathBuf,
}

impl Drop for Export {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Export {
    /// Starts the export and waits for the URI line on stdout.
    fn start(f: &Fixture, extra: &[&str]) -> Export {
        let mut args = vec!["export-nbd", SOURCE, "-d", s(&f.ds)];
        args.extend_from_slice(extra);
        Self::spawn(f.dir.path(), &args)
    }

    /// `holdfast ARGS` (an export-nbd command line), its stderr kept in `dir`.
    fn spawn(dir: &Path, args: &[&str]) -> Export {
        let stderr = dir.join(format!(
            "export-{}.err",
            args.join("_")
                .replace(['/', ':'], "_")
                .chars()
                .take(100)
                .collect::<String>()
        ));
        let mut child = Command::new(BIN)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(out).read_line(&mut line);
            let _ = tx.send(line);
        });
        let mut e = Export {
            child: Some(child),
            uri: String::new(),
            stderr,
        };
        match rx.recv_timeout(WAIT) {
            Ok(line) if !line.trim().is_empty() => e.uri = line.trim().to_string(),
            other => panic!(
                "export-nbd printed no URI ({other:?}); stderr: {}",
                e.stderr_text()
            ),
        }
        e
    }

    fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Sends `signal` (SIGTERM or SIGINT) and waits for a clean exit.
    fn stop(&mut self, signal: libc::c_int) {
        let mut c = self.child.take().unwrap();
        // SAFETY: kill(2) on our own child's pid.
        let r = unsafe { libc::kill(c.id() as libc::pid_t, signal) };
        assert_eq!(r, 0, "kill: {}", std::io::Error::last_os_error());
        let start = Instant::now();
        let status = loop {
            if let Some(st) = c.try_wait().unwrap() {
                break st;
            }
            if start.elapsed() > WAIT {
                c.kill().unwrap();
                panic!("export-nbd ignored signal {signal}: {}", self.stderr_text());
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(
            status.success(),
            "export-nbd exit {status:?}: {}",
            self.stderr_text()
        );
    }
}

/// Runs a tool (which must be installed) to completion within [`WAIT`]; returns stdout.
fn tool(name: &str, args: &[&str]) -> String {
    if Command::new(name).arg("--version").output().is_err() {
        panic!("{name} must be installed (scripts/install-deps)");
    }
    let mut c = Command::new(name);
    c.args(args);
    let o = run_bounded(c, &format!("{name} {args:?}"), WAIT);
    assert!(
        o.status.success(),
        "{name} {args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn nbdinfo(uri: &str) -> serde_json::Value {
    let out = tool("nbdinfo", &["--json", uri]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["exports"][0].clone()
}

/// `qemu-img compare` of the original raw image with the export (exit 0: identical).
fn assert_same(raw: &Path, uri: &str) {
    let out = tool(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", s(raw), uri],
    );
    assert!(out.contains("identical"), "{out}");
}

/// The first 16 bytes as `qemu-io read -v` prints them: "00000000:  22 91 ...".
fn hex_line(bytes: &[u8]) -> String {
    let hex: Vec<String> = bytes[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("00000000:  {}", hex.join(" "))
}

#[test]
fn a_read_only_export_reads_like_the_image_in_qemu_img_nbdinfo_and_a_vm() {
    let f = fixture(1);
    let mut e = Export::start(
        &f,
        &[
            "--listen",
            &format!("unix:{}", s(&f.dir.path().join("nbd.sock"))),
        ],
    );
    assert_eq!(
        e.uri,
        format!("nbd+unix:///?socket={}", s(&f.dir.path().join("nbd.sock")))
    );
    assert_same(&f.raw, &e.uri);

    let info = nbdinfo(&e.uri);
    assert_eq!(info["export-size"], SIZE, "{info}");
    assert_eq!(info["is_read_only"], true, "{info}");
    assert_eq!(info["export-name"], "", "{info}");

    // base:allocation: the image's holes are zero extents, its data is data.
    let map: serde_json::Value = serde_json::from_str(&tool(
        "qemu-img",
        &["map", "--output=json", "-f", "raw", &e.uri],
    ))
    .unwrap();
    let (mut zero, mut data) = (0u64, 0u64);
    for x in map.as_array().unwrap() {
        let len = x["length"].as_u64().unwrap();
        if x["zero"] == true {
            zero += len;
        } else {
            data += len;
        }
    }
    assert_eq!(zero + data, SIZE);
    assert!(
        data >= 8 * MIB && zero >= 40 * MIB,
        "data {data}, zero {zero}: {map}"
    );

    // A VM (stopped, -S) with the export as a virtio disk: QEMU opens it and reads
    // the first sector through the drive.
    let qmp_sock = f.dir.path().join("qmp.sock");
    let qemu_out = f.dir.path().join("qemu.out");
    let mut vm = Command::new("qemu-system-x86_64")
        .args([
            "-M",
            "q35,accel=tcg",
            "-S",
            "-display",
            "none",
            "-nodefaults",
        ])
        .arg("-drive")
        .arg(format!(
            "file={},format=raw,if=none,id=d0,readonly=on",
            e.uri
        ))
        .args(["-device", "virtio-blk-pci,drive=d0"])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", s(&qmp_sock)))
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&qemu_out).unwrap())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("qemu-system-x86_64 must be installed (scripts/install-deps)");
    let mut qmp = Qmp::connect(&qmp_sock, WAIT).unwrap();
    let r = qmp.hmp("qemu-io d0 \"read -v 0 512\"").unwrap();
    assert!(r.trim().is_empty(), "qemu-io: {r}");
    let _ = qmp.execute("quit", serde_json::Value::Null);
    drop(qmp);
    let st = vm.wait().unwrap();
    assert!(st.success(), "qemu exit {st:?}");
    let printed = std::fs::read_to_string(&qemu_out).unwrap();
    let mut first = [0u8; 16];
    std::os::unix::fs::FileExt::read_exact_at(&std::fs::File::open(&f.raw).unwrap(), &mut first, 0)
        .unwrap();
    assert!(
        printed.contains(&hex_line(&first)),
        "QEMU did not read the first sector: {printed}"
    );
    assert!(printed.contains("read 512/512 bytes"), "{printed}");

    e.stop(libc::SIGTERM);
    assert!(!f.dir.path().join("nbd.sock").exists(), "socket removed");
    assert!(e.stderr_text().contains("read-only"), "{}", e.stderr_text());
}

#[test]
fn a_writable_export_keeps_writes_in_a_temporary_overlay() {
    let f = fixture(2);
    let overlays = f.dir.path().join("overlays");
    std::fs::create_dir(&overlays).unwrap();
    let sock = f.dir.path().join("rw.sock");
    let mut e = Export::start(
        &f,
        &[
            "--listen",
            &format!("unix:{}", s(&sock)),
            "--writable",
            "--overlay-dir",
            s(&overlays),
        ],
    );
    assert_eq!(nbdinfo(&e.uri)["is_read_only"], false);
    assert_eq!(walk(&overlays).len(), 1, "one overlay file while running");

    let out = tool(
        "qemu-io",
        &[
            "-f",
            "raw",
            &e.uri,
            "-c",
            "write -P 0x5a 1000 1M",
            "-c",
            "write -z 40M 64k",
            "-c",
            "read -P 0x5a 1000 1M",
        ],
    );
    assert!(!out.contains("fail"), "{out}");
    // A second connection sees the writes, and the rest is still the recovery point.
    let out = tool(
        "qemu-io",
        &[
            "-r",
            "-f",
            "raw",
            &e.uri,
            "-c",
            "read -P 0x5a 1000 1M",
            "-c",
            "read -P 0 40M 64k",
        ],
    );
    assert!(!out.contains("fail"), "{out}");
    let changed = f.dir.path().join("changed.raw");
    tool(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", &e.uri, s(&changed)],
    );
    let (a, b) = (
        std::fs::read(&f.raw).unwrap(),
        std::fs::read(&changed).unwrap(),
    );
    assert_eq!(a.len(), b.len());
    let diff: Vec<usize> = (0..a.len()).filter(|&i| a[i] != b[i]).collect();
    assert!(
        diff.iter()
            .all(|&i| (1000..1000 + MIB as usize).contains(&i)
                || (40 * MIB as usize..40 * MIB as usize + 65536).contains(&i))
    );
    assert!(diff.len() > 1_000_000, "{} bytes differ", diff.len());

    e.stop(libc::SIGTERM);
    assert!(walk(&overlays).is_empty(), "overlay file removed");
    assert!(!sock.exists(), "socket removed");

    // The recovery point is unchanged.
    let mut e = Export::start(&f, &["--listen", &format!("unix:{}", s(&sock))]);
    assert_same(&f.raw, &e.uri);
    e.stop(libc::SIGINT);
}

#[test]
fn tcp_port_zero_prints_the_real_port_and_sigint_stops() {
    let f = fixture(3);
    let mut e = Export::start(&f, &["--listen", "127.0.0.1:0", "--point", "latest"]);
    let port: u16 = e
        .uri
        .strip_prefix("nbd://127.0.0.1:")
        .and_then(|r| r.strip_suffix('/'))
        .unwrap_or_else(|| panic!("unexpected URI {}", e.uri))
        .parse()
        .unwrap();
    assert_ne!(port, 0);
    let info = nbdinfo(&e.uri);
    assert_eq!(info["export-size"], SIZE);
    assert_eq!(info["is_read_only"], true);
    assert_same(&f.raw, &e.uri);
    e.stop(libc::SIGINT);
}

#[test]
fn errors_name_what_is_wrong() {
    let f = fixture(4);
    let ds = s(&f.ds);
    let sock = f.dir.path().join("x.sock");
    let listen = format!("unix:{}", s(&sock));
    let err = fails(
        1,
        &["export-nbd", "nobody/vm", "-d", ds, "--listen", &listen],
    );
    assert!(err.contains("no recovery point of source"), "{err}");
    let err = fails(
        1,
        &[
            "export-nbd",
            SOURCE,
            "-d",
            ds,
            "--point",
            "nope",
            "--listen",
            &listen,
        ],
    );
    assert!(err.contains("nope"), "{err}");
    let err = fails(
        1,
        &[
            "export-nbd",
            SOURCE,
            "-d",
            ds,
            "--disk",
            "3",
            "--listen",
            &listen,
        ],
    );
    assert!(err.contains("no disk 3"), "{err}");
    let err = fails(1, &["export-nbd", SOURCE, "-d", ds, "--listen", "nonsense"]);
    assert!(err.contains("unix:PATH or ADDR:PORT"), "{err}");
    std::fs::write(&sock, b"").unwrap();
    let err = fails(1, &["export-nbd", SOURCE, "-d", ds, "--listen", &listen]);
    assert!(err.contains("exists"), "{err}");
    assert!(sock.exists(), "someone else's file is left alone");
}

/// Without `-d`: the point is read through the server's API (`.../disks/{n}/data` and
/// `map`), so a hypervisor host serves it on its own socket.
#[test]
fn an_export_through_the_server_reads_like_the_image() {
    let t = tempfile::tempdir().unwrap();
    let vm = t.path().join("vms/vm1");
    std::fs::create_dir_all(&vm).unwrap();
    let raw = t.path().join("disk.raw");
    make_disk(&raw, SIZE, 8 * MIB, 77);
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        s(&raw),
        s(&vm.join("disk0.qcow2")),
    ]);
    let mut c = common::cluster::Cluster::start(t.path(), common::cluster::FAST);
    c.agent("hv01", &t.path().join("vms"));
    c.wait_datasources(1);
    c.protect_daily("pg", &["hv01/vm1"]);
    let sd = c.dir.join("server");
    let sock = t.path().join("nbd.sock");
    let listen = format!("unix:{}", s(&sock));
    let server_args = |more: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "--server",
            c.url.as_str(),
            "--ca-file",
            s(&sd.join("ca.pem")),
            "--token-file",
            s(&sd.join("admin.token")),
            "export-nbd",
            "hv01/vm1",
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        a.extend(more.iter().map(|x| x.to_string()));
        a
    };
    let args = server_args(&["--listen", &listen]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut e = Export::spawn(t.path(), &refs);
    assert_eq!(e.uri, format!("nbd+unix:///?socket={}", s(&sock)));
    assert!(
        e.stderr_text().contains("read through the server"),
        "{}",
        e.stderr_text()
    );
    assert_same(&raw, &e.uri);
    let info = nbdinfo(&e.uri);
    assert_eq!(info["export-size"], SIZE, "{info}");
    // The holes come through the allocation map: qemu-img map sees data exactly in
    // the source's 64 KiB blocks that are not all zeros (the datastore's blocks).
    let map = tool("qemu-img", &["map", "--output=json", "-f", "raw", &e.uri]);
    let v: serde_json::Value = serde_json::from_str(&map).unwrap();
    let data: u64 = v
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["data"] == true)
        .map(|x| x["length"].as_u64().unwrap())
        .sum();
    let bytes = std::fs::read(&raw).unwrap();
    let nonzero = bytes
        .chunks(64 << 10)
        .filter(|b| b.iter().any(|&x| x != 0))
        .count() as u64;
    assert_eq!(data, nonzero * (64 << 10), "{map}");
    assert!(data < SIZE);
    e.stop(libc::SIGTERM);
    assert!(!sock.exists());

    // The API refuses what it cannot answer exactly.
    let admin = c.admin();
    let points: Vec<protocol::RecoveryPointInfo> = admin
        .get(&format!("/recovery-points?vm={}", client::seg("hv01/vm1")))
        .unwrap();
    let base = format!("/recovery-points/{}/disks/0", client::seg(&points[0].id));
    let got = admin
        .get_bytes(&format!("{base}/data?offset={}&length=4096", 5 * MIB))
        .unwrap();
    assert!(got == bytes[5 * MIB as usize..5 * MIB as usize + 4096]);
    for (q, code) in [
        (format!("{base}/data?offset=0&length=0"), 400),
        (format!("{base}/data?offset=0&length={}", 4 * MIB + 1), 400),
        (format!("{base}/data?offset={}&length=2", SIZE - 1), 400),
        (format!("{base}/map?offset=0&length={}", SIZE + 1), 400),
        (
            "/recovery-points/20000101T000000.000000Z-00000000/disks/0/data?offset=0&length=1"
                .into(),
            404,
        ),
        (
            format!(
                "{}/disks/1/data?offset=0&length=1",
                base.trim_end_matches("/disks/0")
            ),
            404,
        ),
    ] {
        let e = admin.get_bytes(&q).unwrap_err();
        assert_eq!(e.status(), Some(code), "{q}: {e}");
    }

    // A point or disk that is not there: a clear error, exit 1.
    for (more, want) in [
        (&["--point", "nope"][..], "no recovery point \"nope\""),
        (&["--disk", "3"][..], "there is no disk 3"),
    ] {
        let mut a = server_args(more);
        a.extend(["--listen".to_string(), listen.clone()]);
        let o = Command::new(BIN).args(&a).output().unwrap();
        assert_eq!(o.status.code(), Some(1));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(want), "{err}");
    }
}
