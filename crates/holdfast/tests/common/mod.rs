//! Helpers the CLI test files share: run the real binary, check its exit code, make
//! fixtures from a seeded generator, look for temporary files.
//!
//! Each test file uses a different subset, hence the `dead_code` allowance.
#![allow(dead_code)]

pub mod cluster;
pub mod guest;
pub mod vm;

use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub use testkit::{Rng, qemu_img};

pub const BIN: &str = env!("CARGO_BIN_EXE_holdfast");

/// Longest any single command may take before the test calls it hung.
pub const HANG: Duration = Duration::from_secs(120);

/// Runs holdfast to completion; a run that takes longer than [`HANG`] is killed and
/// fails the test (a hang must not hang the suite).
pub fn holdfast(args: &[&str]) -> Output {
    let mut c = Command::new(BIN);
    c.args(args);
    run_bounded(c, &format!("holdfast {args:?}"), HANG)
}

/// `holdfast backup -d DS --source vm -q DISK`, not yet started, its output piped: for
/// the tests that kill it mid-run.
pub fn backup_command(ds: &Path, disk: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.args(["backup", "-d", s(ds), "--source", "vm", "-q", s(disk)])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// Runs `c` to completion; kills it and fails the test after `limit`.
pub fn run_bounded(mut c: Command, what: &str, limit: Duration) -> Output {
    let mut child = c
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let o = std::thread::spawn(move || {
        let mut v = Vec::new();
        out.read_to_end(&mut v).map(|_| v)
    });
    let e = std::thread::spawn(move || {
        let mut v = Vec::new();
        err.read_to_end(&mut v).map(|_| v)
    });
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > limit {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("{what} hung: killed after {} s", limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Output {
        status,
        stdout: o.join().unwrap().unwrap(),
        stderr: e.join().unwrap().unwrap(),
    }
}

fn show(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs holdfast, expects success, returns stdout.
pub fn ok(args: &[&str]) -> String {
    let o = holdfast(args);
    assert!(o.status.success(), "holdfast {args:?} failed: {}", show(&o));
    String::from_utf8(o.stdout).unwrap()
}

/// Runs holdfast, expects exit code `code`, returns stderr (the error message).
pub fn fails(code: i32, args: &[&str]) -> String {
    let o = holdfast(args);
    assert_eq!(
        o.status.code(),
        Some(code),
        "holdfast {args:?}: {}",
        show(&o)
    );
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!err.contains("panicked"), "holdfast {args:?}: {err}");
    err
}

/// Runs holdfast with `--json` output expected, parses stdout.
pub fn json(args: &[&str]) -> serde_json::Value {
    let out = ok(args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("holdfast {args:?}: {e}: {out}"))
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Temporary files (`.NAME.tmp-PID-N`) directly in `dir`.
pub fn no_temp_files(dir: &Path) {
    for e in std::fs::read_dir(dir).unwrap() {
        let n = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!n.contains(".tmp-"), "temporary file left behind: {n}");
    }
}

/// Every file anywhere under `dir`.
pub fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

/// Temporary files anywhere under `dir`.
pub fn temp_files_under(dir: &Path) -> Vec<PathBuf> {
    walk(dir)
        .into_iter()
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().contains(".tmp-"))
        })
        .collect()
}

/// Compressible text, `n` bytes.
pub fn text(rng: &mut Rng, n: usize) -> Vec<u8> {
    const WORDS: [&str; 8] = [
        "holdfast ",
        "backup ",
        "virtual ",
        "machine ",
        "disk ",
        "block ",
        "pack\n",
        "zero ",
    ];
    let mut v = Vec::with_capacity(n + 16);
    while v.len() < n {
        v.extend_from_slice(WORDS[rng.below(8) as usize].as_bytes());
    }
    v.truncate(n);
    v
}

/// A raw disk of `size` bytes (sparse): `random` bytes of random data in 256 KiB runs,
/// a 512 KiB run of text, the rest holes; a marker in the last sector.
pub fn make_disk(path: &Path, size: u64, random: u64, seed: u64) {
    let mut rng = Rng::new(seed);
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let run = 256 << 10;
    let slots = size / run;
    for _ in 0..random / run {
        let at = rng.below(slots - 1) * run;
        f.write_all_at(&rng.bytes(run as usize), at).unwrap();
    }
    f.write_all_at(&text(&mut rng, 512 << 10), size / 3 / 4096 * 4096)
        .unwrap();
    f.write_all_at(b"the last sector", size - 512).unwrap();
}

/// Overwrites a few places of a disk: `runs` random 64 KiB runs and one text sector.
pub fn mutate(path: &Path, rng: &mut Rng, runs: u32) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let size = f.metadata().unwrap().len();
    for _ in 0..runs {
        let at = rng.below(size / 65536) * 65536;
        f.write_all_at(&rng.bytes(65536), at).unwrap();
    }
    let at = rng.below(size / 512) * 512;
    f.write_all_at(&text(rng, 512), at).unwrap();
}

pub fn hash_file(path: &Path) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    h.update_reader(std::fs::File::open(path).unwrap()).unwrap();
    h.finalize()
}

/// Creates a datastore (unencrypted) in `dir`.
pub fn create_store(dir: &Path) {
    ok(&["datastore", "create", s(dir)]);
}

/// `holdfast backup -q`; returns the id printed on stdout.
pub fn backup(ds: &Path, source: &str, disks: &[&Path]) -> String {
    let mut args = vec!["backup", "-d", s(ds), "--source", source, "-q"];
    args.extend(disks.iter().map(|p| s(p)));
    ok(&args).trim().to_string()
}

/// `holdfast backup -q --changed-ranges RANGES`; returns the id printed on stdout.
pub fn backup_with_ranges(ds: &Path, source: &str, ranges: &Path, disks: &[&Path]) -> String {
    let mut args = vec![
        "backup",
        "-d",
        s(ds),
        "--source",
        source,
        "--changed-ranges",
        s(ranges),
        "-q",
    ];
    args.extend(disks.iter().map(|p| s(p)));
    ok(&args).trim().to_string()
}

/// Recovery point ids, oldest first.
pub fn point_ids(ds: &Path) -> Vec<String> {
    let v = json(&["recovery-points", "-d", s(ds), "--json"]);
    v.as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_string())
        .collect()
}

/// Restores `point` of `source` (raw) to `out`, replacing it.
pub fn restore_raw(ds: &Path, source: &str, point: &str, out: &Path) {
    ok(&[
        "restore",
        "-d",
        s(ds),
        "--source",
        source,
        "--point",
        point,
        "-o",
        s(out),
        "--format",
        "raw",
        "--overwrite",
        "--no-fsync",
        "-q",
    ]);
}

/// Exit code of `verify -q` and its stdout.
pub fn verify(ds: &Path) -> (Option<i32>, String) {
    let o = holdfast(&["verify", "-d", s(ds), "-q"]);
    (
        o.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

pub fn assert_verify_clean(ds: &Path) {
    let (code, out) = verify(ds);
    assert_eq!(code, Some(0), "verify: {out}");
}
