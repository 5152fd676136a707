//! The standing fault campaign (`scripts/campaign`; docs/testing.md). A test binary
//! without libtest's harness: it does nothing unless `CAMPAIGN=short|long` is set, so
//! `cargo nextest` (which lists no test in it) never runs it and `scripts/test` runs the
//! short form exactly once, as its own step.
//!
//!     CAMPAIGN=short|long campaign [--seed N] [--only KIND,KIND...]
//!
//! Every fault is drawn from one seeded generator (the seed is printed first; the same
//! seed replays the same faults at the same moments, up to the machine's timing). It
//! ends with a table per fault kind and exits 1 when any kind failed.

mod common;

use common::cluster::*;
use common::*;
use protocol::*;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const VM: &str = "hv01/vm1";

/// Scheduler settings for the cluster rounds: quick ticks, a killed agent's job failed
/// after 4 s of silence, reruns after 1 s.
fn toml() -> String {
    FAST.replace(
        "[scheduler]\n",
        "[scheduler]\njob_timeout_seconds = 4\nmax_attempts = 3\n",
    )
}

// ---------------------------------------------------------------------------------
// The table

#[derive(Default)]
struct Row {
    kind: String,
    injected: u64,
    lost: u64,
    verify_clean: u64,
    verify_runs: u64,
    /// Bytes sent beyond what the datastore stored (network rounds), if measured.
    resent: Option<String>,
    /// `None`: pass; `Some(reason)`: failed.
    failure: Option<String>,
    /// Set when the fault cannot be injected on this machine (not a pass).
    unavailable: Option<String>,
    notes: Vec<String>,
}

impl Row {
    fn new(kind: &str) -> Row {
        Row {
            kind: kind.to_string(),
            ..Default::default()
        }
    }

    fn verified(&mut self, ds: &Path) -> bool {
        let (code, text) = verify(ds);
        self.verify_runs += 1;
        if code == Some(0) {
            self.verify_clean += 1;
            true
        } else {
            self.note(format!("verify exit {code:?}: {}", text.trim()));
            false
        }
    }

    fn note(&mut self, s: impl Into<String>) {
        let s = s.into();
        eprintln!("  [{}] {s}", self.kind);
        self.notes.push(s);
    }

    fn fail(&mut self, why: impl Into<String>) {
        let why = why.into();
        eprintln!("  [{}] FAIL: {why}", self.kind);
        if self.failure.is_none() {
            self.failure = Some(why);
        }
    }

    fn result(&self) -> &str {
        if self.failure.is_some() {
            "FAIL"
        } else if self.unavailable.is_some() {
            "n/a"
        } else {
            "pass"
        }
    }
}

fn print_table(seed: u64, mode: &str, rows: &[Row], took: Duration) {
    println!();
    println!(
        "fault campaign ({mode}), seed {seed}, {:.0} s (replay: scripts/campaign{} --seed {seed})",
        took.as_secs_f64(),
        if mode == "long" { " --long" } else { "" }
    );
    println!(
        "{:<24} {:>8} {:>11} {:>10} {:>22}  result",
        "fault kind", "injected", "points lost", "verify ok", "bytes re-sent"
    );
    for r in rows {
        println!(
            "{:<24} {:>8} {:>11} {:>10} {:>22}  {}",
            r.kind,
            r.injected,
            r.lost,
            format!("{}/{}", r.verify_clean, r.verify_runs),
            r.resent.as_deref().unwrap_or("-"),
            r.result()
        );
    }
    for r in rows {
        if let Some(u) = &r.unavailable {
            println!("  {}: {u}", r.kind);
        }
        if let Some(f) = &r.failure {
            println!("  {} FAILED: {f}", r.kind);
        }
        for n in r.notes.iter().filter(|n| n.starts_with("report: ")) {
            println!("  {}: {}", r.kind, &n["report: ".len()..]);
        }
    }
}

// ---------------------------------------------------------------------------------
// Entry point

struct Plan {
    long: bool,
    local_kills: u32,
    agent_kills: u32,
    server_kills: u32,
    net_rounds: u32,
}

fn main() {
    // Without CAMPAIGN (a plain `cargo test`/`nextest` listing or run), nothing.
    let Ok(mode) = std::env::var("CAMPAIGN") else {
        return;
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        return;
    }
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let seed = match value("--seed") {
        Some(s) => s.parse::<u64>().unwrap_or_else(|_| {
            eprintln!("campaign: --seed {s:?} is not a whole number");
            std::process::exit(2)
        }),
        None => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64 % 1_000_000_000)
            .unwrap_or(1),
    };
    if args.iter().any(|a| a == "--netem-child") {
        netem_child(seed);
        return;
    }
    let plan = match mode.as_str() {
        "short" => Plan {
            long: false,
            local_kills: 5,
            agent_kills: 4,
            server_kills: 4,
            net_rounds: 3,
        },
        "long" => Plan {
            long: true,
            local_kills: 40,
            agent_kills: 30,
            server_kills: 30,
            net_rounds: 12,
        },
        other => {
            eprintln!("campaign: CAMPAIGN={other:?} is not short or long");
            std::process::exit(2)
        }
    };
    let only: Option<Vec<String>> =
        value("--only").map(|v| v.split(',').map(str::to_string).collect());
    println!("fault campaign ({mode}): seed {seed}");
    let start = Instant::now();
    type Section = fn(&Plan, u64) -> Vec<Row>;
    let sections: [(&str, Section); 7] = [
        ("kill-local-backup", kill_local),
        ("kill-agent", kill_agent),
        ("kill-server", kill_server),
        ("network-proxy", network_proxy),
        ("netem", netem),
        ("out-of-space", out_of_space),
        ("flipped-byte", flipped_bytes),
    ];
    let mut rows = Vec::new();
    for (i, (name, f)) in sections.iter().enumerate() {
        if only
            .as_ref()
            .is_some_and(|o| !o.iter().any(|x| name.starts_with(x.as_str())))
        {
            continue;
        }
        eprintln!("== {name} ({:.0} s)", start.elapsed().as_secs_f64());
        let sub = seed ^ (0x9e37_79b9 * (i as u64 + 1));
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&plan, sub))) {
            Ok(r) => rows.extend(r),
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "panicked".into());
                let mut r = Row::new(name);
                r.fail(msg);
                rows.push(r);
            }
        }
    }
    rows.extend(fuzz_rows());
    print_table(seed, &mode, &rows, start.elapsed());
    if rows.iter().any(|r| r.failure.is_some()) {
        std::process::exit(1);
    }
}

/// Fuzz counts, when `scripts/campaign --long` ran the fuzzers first and left their
/// summary in `CAMPAIGN_FUZZ_SUMMARY` (lines `TARGET RUNS STATUS`).
fn fuzz_rows() -> Vec<Row> {
    let Ok(path) = std::env::var("CAMPAIGN_FUZZ_SUMMARY") else {
        return Vec::new();
    };
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    let mut rows = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [target, runs, status] = f[..] else {
            continue;
        };
        let mut r = Row::new(&format!("fuzz {target}"));
        r.injected = runs.parse().unwrap_or(0);
        if status != "ok" {
            r.fail(format!("libFuzzer: {status}"));
        } else if r.injected < 1_000_000 {
            r.fail(format!("only {runs} runs (at least 1000000 wanted)"));
        }
        rows.push(r);
    }
    if rows.is_empty() {
        let mut r = Row::new("fuzz");
        r.fail(format!("no fuzz summary in {path}"));
        rows.push(r);
    }
    rows
}

// ---------------------------------------------------------------------------------
// kill -9 of the local `holdfast backup`

/// Every committed point is listed and restores to what its backup read; returns how
/// many are lost (missing or different).
fn lost_points(
    ds: &Path,
    source: &str,
    committed: &[(String, blake3::Hash)],
    out: &Path,
    restore_all: bool,
) -> (u64, Vec<String>) {
    let listed = listed_points(ds);
    let mut lost = 0;
    let mut why = Vec::new();
    for (i, (id, want)) in committed.iter().enumerate() {
        if !listed.contains(id) {
            lost += 1;
            why.push(format!("committed point {id} is not listed"));
        } else if restore_all || i + 1 == committed.len() {
            restore_raw(ds, source, id, out);
            if hash_file(out) != *want {
                lost += 1;
                why.push(format!("point {id} does not restore what its backup read"));
            }
        }
    }
    (lost, why)
}

/// Point ids as `recovery-points --json` lists them, also when it exits 2 because a
/// manifest is unreadable (the others are still listed).
fn listed_points(ds: &Path) -> Vec<String> {
    let o = holdfast(&["recovery-points", "-d", s(ds), "--json"]);
    assert!(
        matches!(o.status.code(), Some(0 | 2)),
        "recovery-points: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["id"].as_str().map(str::to_string))
        .collect()
}

fn kill_local(plan: &Plan, seed: u64) -> Vec<Row> {
    let mut row = Row::new("kill-local-backup");
    let d = tempfile::tempdir().unwrap();
    let ds = d.path().join("ds");
    create_store(&ds);
    let disk = d.path().join("vm.img");
    make_disk(&disk, 48 * MIB, 24 * MIB, seed);
    let out = d.path().join("restored.img");
    let mut rng = Rng::new(seed);
    let mut committed = vec![(backup(&ds, "vm", &[&disk]), hash_file(&disk))];
    mutate(&disk, &mut rng, 16);
    let t = Instant::now();
    committed.push((backup(&ds, "vm", &[&disk]), hash_file(&disk)));
    let took = t.elapsed().as_millis().max(20) as u64;
    let mut mid = 0;
    for round in 0..plan.local_kills {
        mutate(&disk, &mut rng, 16);
        let h = hash_file(&disk);
        let delay = rng.below(took + 1);
        let mut child = backup_command(&ds, &disk).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(delay));
        let _ = child.kill(); // SIGKILL; harmless if it has exited already
        row.injected += 1;
        let o = child.wait_with_output().unwrap();
        if o.status.success() {
            committed.push((String::from_utf8(o.stdout).unwrap().trim().to_string(), h));
        } else if o.status.signal() == Some(9) {
            mid += 1;
        } else {
            row.fail(format!(
                "round {round}: backup failed by itself: {}",
                String::from_utf8_lossy(&o.stderr)
            ));
        }
        // Each kill: verify, a new backup, and the committed points checked.
        row.verified(&ds);
        committed.push((backup(&ds, "vm", &[&disk]), h));
        let (lost, why) = lost_points(&ds, "vm", &committed, &out, false);
        row.lost += lost;
        for w in why {
            row.fail(format!("round {round}: {w}"));
        }
    }
    let before = temp_files_under(&ds).len();
    ok(&["gc", "-d", s(&ds)]);
    let left = temp_files_under(&ds);
    if !left.is_empty() {
        row.fail(format!("temporary files left after gc: {left:?}"));
    }
    if !row.verified(&ds) {
        row.fail("verify after gc is not clean");
    }
    let (lost, why) = lost_points(&ds, "vm", &committed, &out, true);
    row.lost += lost;
    for w in why {
        row.fail(w);
    }
    row.note(format!(
        "report: {} kills ({mid} mid-backup, one backup takes {took} ms), {} points committed, {before} temporary files before gc, 0 after",
        row.injected,
        committed.len()
    ));
    vec![row]
}

// ---------------------------------------------------------------------------------
// kill -9 of the agent and of the server, through a real cluster

/// A cluster protecting one VM (`hv01/vm1`, one raw disk of `size` with `random`
/// bytes of data) through an agent whose reads are limited, so that a backup lasts
/// long enough to be interrupted. `agent_url` puts the agent behind a proxy.
struct Rig {
    _d: tempfile::TempDir,
    c: Cluster,
    disk: PathBuf,
    adir: PathBuf,
    agent_args: Vec<String>,
    work: PathBuf,
    /// The server's datastore folder.
    datastore: PathBuf,
    committed: Vec<(String, blake3::Hash)>,
}

impl Rig {
    fn start(seed: u64, toml: &str, size: u64, random: u64, kbps: u32) -> Rig {
        Rig::start_in(
            tempfile::tempdir().unwrap(),
            seed,
            toml,
            size,
            random,
            kbps,
            None,
            None,
        )
    }

    #[allow(clippy::too_many_arguments)] // one call site per kind of rig
    fn start_in(
        d: tempfile::TempDir,
        seed: u64,
        toml: &str,
        size: u64,
        random: u64,
        kbps: u32,
        via: Option<&Proxy>,
        datastore: Option<PathBuf>,
    ) -> Rig {
        let vms = d.path().join("vms");
        std::fs::create_dir_all(vms.join("vm1")).unwrap();
        let disk = vms.join("vm1/vm1-disk0.raw");
        make_disk(&disk, size, random, seed);
        let mut c = Cluster::start(d.path(), toml);
        let agent_args: Vec<String> = vec![
            "--files-root".into(),
            s(&vms).into(),
            "--read-limit-kbps".into(),
            kbps.to_string(),
        ];
        let real = c.url.clone();
        if let Some(p) = via {
            let server: SocketAddr = real.trim_start_matches("https://").parse().unwrap();
            *p.target.lock().unwrap() = Some(server);
            c.url = format!("https://{}", p.addr);
        }
        let refs: Vec<&str> = agent_args.iter().map(String::as_str).collect();
        let adir = c.agent_with("hv01", &refs);
        c.url = real;
        c.wait_datasources(1);
        c.protect_daily("pg", &[VM]);
        let work = d.path().join("work");
        std::fs::create_dir_all(&work).unwrap();
        let c_datastore = c.datastore();
        let mut r = Rig {
            _d: d,
            c,
            disk,
            adir,
            agent_args,
            work,
            datastore: datastore.unwrap_or_else(|| c_datastore.clone()),
            committed: Vec::new(),
        };
        let first = point_ids(&r.ds());
        assert_eq!(first.len(), 1, "the initial replica: {first:?}");
        let h = hash_file(&r.disk);
        r.committed.push((first[0].clone(), h));
        r
    }

    fn ds(&self) -> PathBuf {
        self.datastore.clone()
    }

    fn backup_now(&self) -> JobInfo {
        self.c
            .admin()
            .post(
                &format!("/datasources/{VM}/backup"),
                &BackupNowRequest::default(),
            )
            .unwrap()
    }

    /// Waits until no job of the VM is queued or running (reruns included).
    fn settle(&self) -> Vec<JobInfo> {
        let mut jobs = Vec::new();
        wait_until(
            "the VM's jobs to end",
            Duration::from_secs(180),
            || match self.c.admin().get::<Vec<JobInfo>>("/jobs?limit=1000") {
                Ok(j) => {
                    jobs = j;
                    !jobs
                        .iter()
                        .any(|j| j.vm.as_deref() == Some(VM) && !j.state.finished())
                }
                Err(_) => false,
            },
        );
        jobs
    }

    fn restart_agent(&mut self, url: &str) {
        let mut args: Vec<String> = vec![
            "agent".into(),
            "--server".into(),
            url.into(),
            "--data-dir".into(),
            s(&self.adir).into(),
            "--inventory-seconds".into(),
            "1".into(),
        ];
        args.extend(self.agent_args.iter().cloned());
        let child = Command::new(BIN)
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.c.agents.push(child);
    }

    fn kill_agent(&mut self) {
        if let Some(mut a) = self.c.agents.pop() {
            let _ = a.kill();
            let _ = a.wait();
        }
    }

    /// Points listed now that the campaign did not know: made (by reruns) from the disk
    /// as it is now.
    fn adopt_new_points(&mut self) {
        let h = hash_file(&self.disk);
        for id in point_ids(&self.ds()) {
            if !self.committed.iter().any(|(c, _)| *c == id) {
                self.committed.push((id, h));
            }
        }
    }

    /// The round's checks: verify clean, a new backup succeeds, it restores exactly,
    /// every committed point is still listed.
    fn check_round(&mut self, row: &mut Row, round: u32) {
        self.settle();
        self.adopt_new_points();
        row.verified(&self.ds());
        let j = self.backup_now();
        let j = self.c.wait_job(j.id);
        if j.state != JobState::Succeeded {
            row.fail(format!(
                "round {round}: the backup after the fault failed: {:?}",
                j.error
            ));
            return;
        }
        let id = j.recovery_point.clone().unwrap_or_default();
        self.committed.push((id, hash_file(&self.disk)));
        let out = self.work.join("r.raw");
        let (lost, why) = lost_points(&self.ds(), VM, &self.committed, &out, false);
        row.lost += lost;
        for w in why {
            row.fail(format!("round {round}: {w}"));
        }
    }

    /// After the rounds: the cluster stopped, gc, no temporary file anywhere in the
    /// datastore, verify clean, every committed point restores exactly.
    fn finish(mut self, row: &mut Row) {
        let ds = self.ds();
        let before = temp_files_under(&ds);
        if !before.is_empty() {
            row.note(format!(
                "report: {} temporary files after the last restart (gc removes them)",
                before.len()
            ));
        }
        self.kill_agent();
        self.c.kill_server();
        ok(&["gc", "-d", s(&ds)]);
        let left = temp_files_under(&ds);
        if !left.is_empty() {
            row.fail(format!("temporary files left after gc: {left:?}"));
        }
        if !row.verified(&ds) {
            row.fail("verify after gc is not clean");
        }
        let out = self.work.join("r.raw");
        let (lost, why) = lost_points(&ds, VM, &self.committed, &out, true);
        row.lost += lost;
        for w in why {
            row.fail(w);
        }
    }
}

/// Starts a backup and returns when it runs (or has ended), with its id.
fn start_and_wait_running(r: &Rig) -> i64 {
    let j = r.backup_now();
    wait_until("the backup to start", Duration::from_secs(60), || {
        r.c.admin()
            .get::<JobInfo>(&format!("/jobs/{}", j.id))
            .is_ok_and(|j| j.state != JobState::Queued)
    });
    j.id
}

/// Times one backup of the rig (ms), to spread kill moments over a backup.
fn time_backup(r: &mut Rig) -> u64 {
    let t = Instant::now();
    let j = r.backup_now();
    let j = r.c.wait_job(j.id);
    assert_eq!(j.state, JobState::Succeeded, "{j:?}");
    r.committed
        .push((j.recovery_point.unwrap(), hash_file(&r.disk)));
    t.elapsed().as_millis().max(50) as u64
}

fn kill_agent(plan: &Plan, seed: u64) -> Vec<Row> {
    let mut row = Row::new("kill-agent");
    let mut r = Rig::start(seed, &toml(), 64 * MIB, 24 * MIB, 16384);
    let mut rng = Rng::new(seed);
    let took = time_backup(&mut r);
    let url = r.c.url.clone();
    let mut mid = 0;
    for round in 0..plan.agent_kills {
        mutate(&r.disk, &mut rng, 16);
        let id = start_and_wait_running(&r);
        std::thread::sleep(Duration::from_millis(rng.below(took + 1)));
        r.kill_agent();
        row.injected += 1;
        if !r.c.job(id).state.finished() {
            mid += 1;
        }
        r.restart_agent(&url);
        r.check_round(&mut row, round);
    }
    row.note(format!(
        "report: {} kills ({mid} mid-job; a backup takes {took} ms), {} points committed",
        row.injected,
        r.committed.len()
    ));
    r.finish(&mut row);
    vec![row]
}

fn kill_server(plan: &Plan, seed: u64) -> Vec<Row> {
    let mut row = Row::new("kill-server");
    let mut r = Rig::start(seed, &toml(), 64 * MIB, 24 * MIB, 16384);
    let mut rng = Rng::new(seed);
    let took = time_backup(&mut r);
    let mut mid = 0;
    let mut temp_after_start = 0;
    for round in 0..plan.server_kills {
        mutate(&r.disk, &mut rng, 16);
        let id = start_and_wait_running(&r);
        std::thread::sleep(Duration::from_millis(rng.below(took + 1)));
        let running = !r.c.job(id).state.finished();
        r.c.kill_server();
        row.injected += 1;
        if running {
            mid += 1;
        }
        r.c.start_server();
        // The restart fails the interrupted job; its staged packs must be gone now.
        let j = r.c.job(id);
        if running && j.state == JobState::Succeeded {
            row.fail(format!("round {round}: job {id} was killed yet succeeded"));
        }
        r.settle();
        temp_after_start += temp_files_under(&r.ds()).len();
        r.check_round(&mut row, round);
    }
    if temp_after_start > 0 {
        row.fail(format!(
            "{temp_after_start} temporary files were left in the datastore after restarts"
        ));
    }
    row.note(format!(
        "report: {} kills ({mid} mid-job; a backup takes {took} ms), {} points committed, staging empty after every restart",
        row.injected,
        r.committed.len()
    ));
    r.finish(&mut row);
    vec![row]
}

// ---------------------------------------------------------------------------------
// Network faults: a TCP proxy of our own between agent and server

/// Faults the proxy applies now: a delay per forwarded chunk, a pause (nothing is
/// forwarded until then), and an epoch that resets every connection when it changes.
#[derive(Default)]
struct Faults {
    delay_ms: AtomicU64,
    paused_until_ms: AtomicU64,
    epoch: AtomicU64,
    upstream: AtomicU64,
    stop: AtomicBool,
}

struct Proxy {
    addr: SocketAddr,
    faults: Arc<Faults>,
    born: Instant,
    /// The server, once it runs (connections before are refused).
    target: Arc<Mutex<Option<SocketAddr>>>,
}

impl Proxy {
    fn start() -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let faults = Arc::new(Faults::default());
        let born = Instant::now();
        let f = faults.clone();
        let target: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
        let to = target.clone();
        std::thread::spawn(move || {
            for c in l.incoming() {
                if f.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(a) = c else { continue };
                let Some(to) = *to.lock().unwrap_or_else(|p| p.into_inner()) else {
                    continue;
                };
                let Ok(b) = TcpStream::connect(to) else {
                    continue;
                };
                let epoch = f.epoch.load(Ordering::SeqCst);
                for (from, into, up) in [
                    (a.try_clone().unwrap(), b.try_clone().unwrap(), true),
                    (b.try_clone().unwrap(), a.try_clone().unwrap(), false),
                ] {
                    let f = f.clone();
                    std::thread::spawn(move || pump(from, into, up, epoch, &f, born));
                }
            }
        });
        Proxy {
            addr,
            faults,
            born,
            target,
        }
    }

    fn now_ms(&self) -> u64 {
        self.born.elapsed().as_millis() as u64
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.faults.stop.store(true, Ordering::SeqCst);
        self.faults.epoch.fetch_add(1, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr); // wakes the accept loop
    }
}

/// Closes with RST (SO_LINGER 0), as a middlebox resetting the connection would.
fn reset(s: &TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a correctly sized option value.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    let _ = s.shutdown(Shutdown::Both);
}

fn pump(mut from: TcpStream, mut into: TcpStream, up: bool, epoch: u64, f: &Faults, born: Instant) {
    let mut buf = vec![0u8; 64 << 10];
    let _ = from.set_read_timeout(Some(Duration::from_millis(50)));
    loop {
        if f.epoch.load(Ordering::SeqCst) != epoch {
            reset(&from);
            reset(&into);
            return;
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                // A pause holds the bytes read (nothing reaches the other side).
                while (born.elapsed().as_millis() as u64) < f.paused_until_ms.load(Ordering::SeqCst)
                {
                    if f.epoch.load(Ordering::SeqCst) != epoch {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                let d = f.delay_ms.load(Ordering::SeqCst);
                if d > 0 {
                    std::thread::sleep(Duration::from_millis(d));
                }
                if into.write_all(&buf[..n]).is_err() {
                    break;
                }
                if up {
                    f.upstream.fetch_add(n as u64, Ordering::SeqCst);
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = into.shutdown(Shutdown::Both);
}

#[derive(Default)]
struct NetCounts {
    delays: u64,
    pauses: u64,
    resets: u64,
}

/// Injects seeded faults until `done`: every 0.3-1.5 s a delay (20-200 ms per chunk
/// for up to 2 s), a pause (0.2-2 s) or a reset of every open connection.
fn inject(p: &Proxy, rng: &mut Rng, done: &AtomicBool, counts: &mut NetCounts) {
    while !done.load(Ordering::SeqCst) {
        let wait = Instant::now() + Duration::from_millis(300 + rng.below(1200));
        while Instant::now() < wait && !done.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(20));
        }
        if done.load(Ordering::SeqCst) {
            break;
        }
        match rng.below(3) {
            0 => {
                p.faults
                    .delay_ms
                    .store(20 + rng.below(180), Ordering::SeqCst);
                let until = Instant::now() + Duration::from_millis(rng.below(2000));
                while Instant::now() < until && !done.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                p.faults.delay_ms.store(0, Ordering::SeqCst);
                counts.delays += 1;
            }
            1 => {
                let until = p.now_ms() + 200 + rng.below(1800);
                p.faults.paused_until_ms.store(until, Ordering::SeqCst);
                counts.pauses += 1;
            }
            _ => {
                p.faults.epoch.fetch_add(1, Ordering::SeqCst);
                counts.resets += 1;
            }
        }
    }
}

fn network_proxy(plan: &Plan, seed: u64) -> Vec<Row> {
    let mut row = Row::new("network-proxy");
    let d = tempfile::tempdir().unwrap();
    let proxy = Proxy::start();
    let mut r = Rig::start_in(
        d,
        seed,
        &toml(),
        64 * MIB,
        32 * MIB,
        8192,
        Some(&proxy),
        None,
    );
    let mut rng = Rng::new(seed);
    let mut counts = NetCounts::default();
    let (mut sent, mut stored, mut reruns, mut wire) = (0u64, 0u64, 0u64, 0u64);
    for round in 0..plan.net_rounds {
        // Half the rounds change much of the disk, so that much is sent.
        mutate(&r.disk, &mut rng, if round % 2 == 0 { 128 } else { 16 });
        let done = AtomicBool::new(false);
        let resets_before = counts.resets;
        let wire_before = proxy.faults.upstream.load(Ordering::SeqCst);
        let job = std::thread::scope(|sc| {
            let h = sc.spawn(|| {
                let j = r.backup_now();
                let j = r.c.wait_job(j.id);
                done.store(true, Ordering::SeqCst);
                j
            });
            inject(&proxy, &mut rng, &done, &mut counts);
            h.join().unwrap()
        });
        r.settle();
        let resets = counts.resets - resets_before;
        // What crossed the proxy towards the server: blobs sent again after a reset
        // count here (the job's bytes_sent counts each batch once).
        let round_wire = proxy.faults.upstream.load(Ordering::SeqCst) - wire_before;
        wire += round_wire;
        match job.state {
            JobState::Succeeded => {
                let id = job.recovery_point.clone().unwrap_or_default();
                r.committed.push((id.clone(), hash_file(&r.disk)));
                let pts: Vec<RecoveryPointInfo> = r.c.admin().get("/recovery-points").unwrap();
                let st = pts
                    .iter()
                    .find(|p| p.id == id)
                    .map(|p| p.stats.bytes_stored)
                    .unwrap_or(0);
                sent += job.bytes_sent;
                stored += st;
                // At most the batches in flight are sent again per reset (3 senders
                // x 4 MiB, plus a partial one), never the backup again.
                let bound = st + (resets + 1) * (20 * MIB);
                if job.bytes_sent > bound || round_wire > bound + bound / 10 {
                    row.fail(format!(
                        "round {round}: sent {} ({round_wire} on the wire) for {st} stored after {resets} resets",
                        job.bytes_sent
                    ));
                }
            }
            _ => {
                reruns += 1;
                row.note(format!(
                    "round {round}: job {} ended {:?} ({:?}) under faults",
                    job.id, job.state, job.error
                ));
                r.adopt_new_points();
                let latest = r.committed.last().map(|(_, h)| *h);
                if latest != Some(hash_file(&r.disk)) {
                    row.fail(format!(
                        "round {round}: the job did not complete under network faults (even by rerun): {:?}",
                        job.error
                    ));
                }
            }
        }
        let out = r.work.join("r.raw");
        let (lost, why) = lost_points(&r.ds(), VM, &r.committed, &out, false);
        row.lost += lost;
        for w in why {
            row.fail(format!("round {round}: {w}"));
        }
        row.verified(&r.ds());
    }
    row.injected = counts.delays + counts.pauses + counts.resets;
    // Re-sent: what crossed the wire beyond the blobs the jobs sent once (TLS, HTTP
    // and the missing-block questions, a percent or two, included).
    row.resent = Some(format!(
        "{:.1} of {:.1} MiB",
        wire.saturating_sub(sent) as f64 / MIB as f64,
        wire as f64 / MIB as f64
    ));
    row.note(format!(
        "report: {} backups of a 64 MiB disk holding 32.5 MiB of data, {} delays, {} pauses, {} resets; jobs sent {:.1} MiB of blobs for {:.1} MiB stored; {:.1} MiB crossed the proxy upstream; {} jobs needed a rerun",
        plan.net_rounds,
        counts.delays,
        counts.pauses,
        counts.resets,
        sent as f64 / MIB as f64,
        stored as f64 / MIB as f64,
        wire as f64 / MIB as f64,
        reruns
    ));
    r.finish(&mut row);
    vec![row]
}

// ---------------------------------------------------------------------------------
// tc netem in a network namespace

/// Runs `cmd` (a program and its arguments); its stderr when it fails.
fn sh(cmd: &[&str]) -> Result<(), String> {
    let mut c = Command::new(cmd[0]);
    c.args(&cmd[1..]);
    let o = run_bounded(c, &cmd.join(" "), Duration::from_secs(30));
    if o.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{}`: {}",
            cmd.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        ))
    }
}

struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = sh(&["ip", "netns", "del", &self.0]);
    }
}

fn netem(_plan: &Plan, seed: u64) -> Vec<Row> {
    let mut row = Row::new("netem");
    let name = format!("hf-campaign-{}", std::process::id());
    if let Err(e) = sh(&["ip", "netns", "add", &name]) {
        row.unavailable = Some(format!("netem: not available here ({e})"));
        return vec![row];
    }
    let ns = Netns(name);
    let probe = sh(&[
        "ip", "netns", "exec", &ns.0, "ip", "link", "set", "lo", "up",
    ])
    .and_then(|_| {
        sh(&[
            "ip", "netns", "exec", &ns.0, "tc", "qdisc", "add", "dev", "lo", "root", "netem",
            "delay", "10ms", "5ms", "loss", "1%",
        ])
    });
    if let Err(e) = probe {
        row.unavailable = Some(format!("netem: not available here ({e})"));
        return vec![row];
    }
    let exe = std::env::current_exe().unwrap();
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &ns.0])
        .arg(exe)
        .args(["--netem-child", "--seed", &seed.to_string()]);
    let o = run_bounded(c, "the netem round", Duration::from_secs(300));
    let out = String::from_utf8_lossy(&o.stdout);
    let Some(line) = out.lines().find_map(|l| l.strip_prefix("NETEM ")) else {
        row.fail(format!(
            "the netem round gave no result: {}",
            String::from_utf8_lossy(&o.stderr)
        ));
        return vec![row];
    };
    let f: Vec<u64> = line
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    let [backups, succeeded, sent, stored, clean] = f[..] else {
        row.fail(format!("unreadable netem result {line:?}"));
        return vec![row];
    };
    row.injected = backups;
    row.verify_runs = 1;
    row.verify_clean = clean;
    row.resent = Some(format!(
        "{:.1} of {:.1} MiB",
        sent.saturating_sub(stored) as f64 / MIB as f64,
        sent as f64 / MIB as f64
    ));
    if succeeded != backups || clean != 1 || !o.status.success() {
        row.fail(format!(
            "netem: {succeeded} of {backups} backups, verify clean {clean}"
        ));
    }
    row.note("report: delay 10±5 ms and 1% loss on the namespace's loopback".to_string());
    vec![row]
}

/// Inside the namespace: two backups (a full and an incremental) under netem; prints
/// `NETEM backups succeeded sent stored verify-clean`.
fn netem_child(seed: u64) {
    let mut r = Rig::start(seed, &toml(), 32 * MIB, 8 * MIB, 65536);
    let mut rng = Rng::new(seed);
    let (mut ok_n, mut sent, mut stored) = (1u64, 0u64, 0u64);
    mutate(&r.disk, &mut rng, 32);
    let j = r.backup_now();
    let j = r.c.wait_job(j.id);
    if j.state == JobState::Succeeded {
        ok_n += 1;
        sent += j.bytes_sent;
        let pts: Vec<RecoveryPointInfo> = r.c.admin().get("/recovery-points").unwrap();
        stored += pts
            .iter()
            .find(|p| Some(&p.id) == j.recovery_point.as_ref())
            .map(|p| p.stats.bytes_stored)
            .unwrap_or(0);
        r.committed
            .push((j.recovery_point.unwrap(), hash_file(&r.disk)));
    }
    let out = r.work.join("r.raw");
    let (lost, _) = lost_points(&r.ds(), VM, &r.committed, &out, true);
    let clean = u64::from(verify(&r.ds()).0 == Some(0) && lost == 0);
    println!("NETEM 2 {ok_n} {sent} {stored} {clean}");
}

// ---------------------------------------------------------------------------------
// Out of space: the server's datastore on a small loop-mounted ext4

struct LoopMount(PathBuf);

impl Drop for LoopMount {
    fn drop(&mut self) {
        if sh(&["umount", s(&self.0)]).is_err() {
            let _ = sh(&["umount", "-l", s(&self.0)]);
        }
    }
}

fn free_bytes(p: &Path) -> u64 {
    let c = std::ffi::CString::new(s(p)).unwrap();
    // SAFETY: a valid path and a zeroed struct the call fills.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    assert_eq!(rc, 0, "statvfs {}", p.display());
    st.f_bfree as u64 * st.f_frsize as u64
}

fn out_of_space(_plan: &Plan, seed: u64) -> Vec<Row> {
    let mut row = Row::new("out-of-space");
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("fs.img");
    let mnt = d.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let setup = sh(&["truncate", "-s", "128M", s(&img)])
        .and_then(|_| sh(&["mkfs.ext4", "-q", "-m", "0", s(&img)]))
        .and_then(|_| sh(&["mount", "-o", "loop", s(&img), s(&mnt)]));
    if let Err(e) = setup {
        row.unavailable = Some(format!("loop mount: not available here ({e})"));
        return vec![row];
    }
    let _guard = LoopMount(mnt.clone());
    let ds = mnt.join("ds");
    let toml = format!("datastore = \"{}\"\n{}", s(&ds), toml());
    let rig_dir = tempfile::tempdir_in(d.path()).unwrap();
    let mut r = Rig::start_in(
        rig_dir,
        seed,
        &toml,
        48 * MIB,
        16 * MIB,
        65536,
        None,
        Some(ds.clone()),
    );
    let mut rng = Rng::new(seed);
    // Fill the file system but 6 MiB; then 8 MiB of new random data cannot fit.
    let filler = mnt.join("filler");
    let free = free_bytes(&mnt);
    let fill = free.saturating_sub(6 * MIB);
    {
        let f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0xA5u8; MIB as usize];
        let mut at = 0;
        while at < fill {
            let n = (fill - at).min(MIB);
            f.write_all_at(&chunk[..n as usize], at).unwrap();
            at += n;
        }
        f.sync_all().unwrap();
    }
    let points_before = point_ids(&r.ds());
    mutate(&r.disk, &mut rng, 128);
    let j = r.backup_now();
    let j = r.c.wait_job(j.id);
    row.injected = 1;
    let err = j.error.clone().unwrap_or_default();
    if j.state != JobState::Failed {
        row.fail(format!(
            "a backup into a full datastore ended {:?} ({err})",
            j.state
        ));
    }
    if !err.contains("No space left") {
        row.fail(format!("the job's error does not name the cause: {err:?}"));
    }
    let alerts = r.c.alerts();
    match alerts
        .iter()
        .find(|a| a.subject == VM && a.kind == "backup-failed")
    {
        Some(a) if a.message.contains("No space left") => {
            row.note(format!(
                "report: alert {} ({:?}): {}",
                a.kind, a.severity, a.message
            ));
        }
        _ => row.fail(format!(
            "no backup-failed alert naming the full disk: {alerts:?}"
        )),
    }
    // Nothing half: no new point, no staged file, the earlier points intact.
    r.settle();
    if point_ids(&r.ds()) != points_before {
        row.fail("a point appeared from the failed backup");
    }
    let left = temp_files_under(&r.ds());
    if !left.is_empty() {
        row.fail(format!("staged files left by the failed backup: {left:?}"));
    }
    row.verified(&r.ds());
    let out = r.work.join("r.raw");
    let (lost, why) = lost_points(&r.ds(), VM, &r.committed, &out, true);
    row.lost += lost;
    for w in why {
        row.fail(w);
    }
    // Space again: the next backup succeeds and restores exactly.
    std::fs::remove_file(&filler).unwrap();
    let j = r.backup_now();
    let j = r.c.wait_job(j.id);
    if j.state != JobState::Succeeded {
        row.fail(format!(
            "the backup after space was freed failed: {:?}",
            j.error
        ));
    } else {
        r.committed
            .push((j.recovery_point.unwrap(), hash_file(&r.disk)));
        wait_until("the alert to resolve", Duration::from_secs(30), || {
            !r.c.alerts()
                .iter()
                .any(|a| a.subject == VM && a.kind == "backup-failed")
        });
    }
    r.finish(&mut row);
    vec![row]
}

// ---------------------------------------------------------------------------------
// A flipped byte in every kind of datastore file

/// A pack's entries: (kind, offset, length), from its trailer (docs/datastore-format.md).
fn pack_entries(p: &Path) -> Vec<(u8, u64, u64)> {
    let b = std::fs::read(p).unwrap();
    let n = u32::from_le_bytes(b[b.len() - 16..b.len() - 12].try_into().unwrap()) as usize;
    let table = b.len() - 16 - 48 * n;
    (0..n)
        .map(|i| {
            let e = &b[table + 48 * i..table + 48 * (i + 1)];
            let u = |o: usize| u32::from_le_bytes(e[o..o + 4].try_into().unwrap()) as u64;
            (e[32], u(36), u(40))
        })
        .collect()
}

fn flip(p: &Path, at: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= 0x40;
    f.write_all_at(&b, at).unwrap();
}

/// Whether byte `at` of a JSON text lies inside the string value of `"field": "..."`.
fn in_json_value(text: &[u8], field: &str, at: u64) -> bool {
    let t = String::from_utf8_lossy(text);
    let Some(k) = t.find(&format!("\"{field}\"")) else {
        return false;
    };
    let after = k + field.len() + 2;
    let Some(open) = t[after..].find('"').map(|i| after + i) else {
        return false;
    };
    let Some(close) = t[open + 1..].find('"').map(|i| open + 1 + i) else {
        return false;
    };
    (open as u64) < at && at < close as u64
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut v = walk(dir);
    v.sort();
    v
}

/// What happens per kind of file; a row each.
fn flipped_bytes(plan: &Plan, seed: u64) -> Vec<Row> {
    let kinds = [
        "data-blob",
        "index-piece",
        "pack-trailer",
        "index-file",
        "manifest",
        "config",
        "key-file",
        "damaged-list",
    ];
    let mut rows = Vec::new();
    let mut rng = Rng::new(seed);
    for kind in kinds {
        let encs: &[bool] = if plan.long || kind == "key-file" {
            if kind == "key-file" {
                &[true]
            } else {
                &[false, true]
            }
        } else {
            &[false]
        };
        for &enc in encs {
            let name = format!("flip {kind}{}", if enc { " (enc)" } else { "" });
            let mut row = Row::new(&name);
            let s2 = rng.next_u64();
            if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                flip_one(&mut row, kind, enc, s2)
            })) {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "panicked".into());
                row.fail(msg);
            }
            rows.push(row);
        }
    }
    rows
}

fn flip_one(row: &mut Row, kind: &str, enc: bool, seed: u64) {
    let d = tempfile::tempdir().unwrap();
    let ds = d.path().join("ds");
    if enc {
        ok(&["datastore", "create", "--encrypt", s(&ds)]);
    } else {
        create_store(&ds);
    }
    let disk = d.path().join("vm.img");
    make_disk(&disk, 16 * MIB, 4 * MIB, seed);
    let mut rng = Rng::new(seed);
    let h0 = hash_file(&disk);
    let p0 = backup(&ds, "vm", &[&disk]);
    let pack0 = files_in(&ds.join("packs"));
    mutate(&disk, &mut rng, 4);
    let h1 = hash_file(&disk);
    let p1 = backup(&ds, "vm", &[&disk]);
    // The pack p1 wrote: its blocks and piece are what the source holds now.
    let pack1: Vec<PathBuf> = files_in(&ds.join("packs"))
        .into_iter()
        .filter(|p| !pack0.contains(p))
        .collect();
    let mut committed = vec![(p0.clone(), h0), (p1.clone(), h1)];
    let rel = |p: &Path| {
        p.strip_prefix(&ds)
            .map(|r| s(r).to_string())
            .unwrap_or_else(|_| s(p).to_string())
    };
    // The file and the offset; what verify must name; whether a backup can heal it.
    let (target, at, healable): (PathBuf, u64, bool) = match kind {
        "data-blob" | "index-piece" => {
            let want = if kind == "data-blob" { 0 } else { 1 };
            let pack = pack1[0].clone();
            let es: Vec<_> = pack_entries(&pack)
                .into_iter()
                .filter(|e| e.0 == want)
                .collect();
            let e = es[rng.below(es.len() as u64) as usize];
            (pack, e.1 + 40 + rng.below(e.2 - 40), true)
        }
        "pack-trailer" => {
            let pack = pack0[0].clone();
            let len = std::fs::metadata(&pack).unwrap().len();
            (pack, len - 16 - 1 - rng.below(40), true)
        }
        "index-file" => {
            let f = files_in(&ds.join("index"))[0].clone();
            let len = std::fs::metadata(&f).unwrap().len();
            (f, 8 + rng.below(len - 8), true)
        }
        "manifest" => {
            let f = ds.join("points").join(&p0);
            let len = std::fs::metadata(&f).unwrap().len();
            (f, 20 + rng.below(len - 20), false)
        }
        "config" => {
            let f = ds.join("holdfast-datastore.json");
            let len = std::fs::metadata(&f).unwrap().len();
            (f, rng.below(len), false)
        }
        "key-file" => {
            let f = d.path().join("ds.key");
            let len = std::fs::metadata(&f).unwrap().len();
            (f, rng.below(len), false)
        }
        "damaged-list" => {
            // Damage first, so that verify writes the list; then flip the list.
            let pack = pack1[0].clone();
            let e = pack_entries(&pack)[0];
            flip(&pack, e.1 + 40);
            let _ = verify(&ds);
            let f = ds.join("damaged");
            assert!(f.exists(), "verify wrote no damaged list");
            let len = std::fs::metadata(&f).unwrap().len();
            (f, 8 + rng.below(len - 8), true)
        }
        _ => unreachable!(),
    };
    let original = std::fs::read(&target).unwrap();
    flip(&target, at);
    row.injected = 1;
    let name = if kind == "key-file" {
        "ds.key".to_string()
    } else {
        rel(&target)
    };
    if kind == "damaged-list" {
        // Read by every backup (to store damaged blocks again); verify rebuilds it.
        let o = holdfast(&["backup", "-d", s(&ds), "--source", "vm", "-q", s(&disk)]);
        let err = String::from_utf8_lossy(&o.stderr);
        if o.status.success() || !err.contains("damaged: ") {
            row.fail(format!(
                "a backup over a damaged `damaged` list: exit {:?}: {err}",
                o.status.code()
            ));
        }
        row.note(format!(
            "report: backup before verify: exit {:?}: {}",
            o.status.code(),
            err.trim()
        ));
    }
    let (code, text) = verify(&ds);
    row.verify_runs += 1;
    // The damaged list is rebuilt by verify from what it finds (it names the pack).
    let named = if kind == "damaged-list" {
        text.contains("packs/")
    } else {
        text.contains(&name)
    };
    let blob_named = (kind != "data-blob" && kind != "index-piece") || text.contains("blob ");
    // The key file's `datastore` field only labels it: the key is checked against the
    // datastore's fingerprint, so a flip there changes nothing (and must not lock the
    // owner out of the data).
    let label_only = kind == "key-file" && in_json_value(&original, "datastore", at);
    if code == Some(0) && label_only {
        row.verify_clean += 1;
        row.note(format!(
            "report: the flip at {at} hit the key file's `datastore` label, which nothing depends on: verify clean, as it should be"
        ));
        return;
    } else if code == Some(0) {
        row.fail(format!(
            "verify is clean after a flipped byte in {name} at {at}"
        ));
    } else if !named || !blob_named {
        row.fail(format!("verify does not name {name}: {}", text.trim()));
    }
    let first_line = text
        .lines()
        .find(|l| l.contains(&name) || l.contains("packs/"))
        .unwrap_or("")
        .to_string();
    row.note(format!(
        "report: verify exit {code:?}: {}",
        first_line.trim()
    ));
    let out = d.path().join("r.img");
    if healable {
        // The next backup (same source) heals; gc drops the bad copy or rewrites the
        // pack; then verify is clean and every point restores.
        let p2 = backup(&ds, "vm", &[&disk]);
        committed.push((p2, h1));
        ok(&["gc", "-d", s(&ds)]);
        if row.verified(&ds) {
            row.note("report: healed by the next backup + gc; verify clean".to_string());
        } else {
            row.fail("verify is not clean after the next backup and gc");
        }
        let (lost, why) = lost_points(&ds, "vm", &committed, &out, true);
        row.lost += lost;
        for w in why {
            row.fail(w);
        }
        if !temp_files_under(&ds).is_empty() {
            row.fail("temporary files left");
        }
    } else if kind == "manifest" {
        // The damaged point is named and lost; the others still restore exactly; the
        // operator forgets it, and the datastore is clean again.
        row.lost = 0;
        let others = vec![committed[1].clone()];
        let (lost, why) = lost_points(&ds, "vm", &others, &out, true);
        row.lost += lost;
        for w in why {
            row.fail(w);
        }
        ok(&["forget", "-d", s(&ds), "--point", &p0]);
        ok(&["gc", "-d", s(&ds)]);
        if row.verified(&ds) {
            row.note(format!(
                "report: not healable: point {p0} unreadable; the other point restores; clean after `forget` + gc"
            ));
        }
    } else {
        // The datastore's own config or key: nothing opens until the file is put back
        // from a copy; then everything is whole.
        std::fs::write(&target, &original).unwrap();
        if row.verified(&ds) {
            row.note("report: not healable: nothing opens until the file is restored from a copy; then verify clean".to_string());
        } else {
            row.fail("verify not clean after the file was restored");
        }
        let (lost, why) = lost_points(&ds, "vm", &committed, &out, true);
        row.lost += lost;
        for w in why {
            row.fail(w);
        }
    }
}
