//! The datastore under abuse, through the real binary: backups killed at random moments
//! (SIGKILL), gc racing a backup, and a full disk (a file-size limit). Whatever
//! happens, every recovery point that was reported committed must be listed, verify
//! clean and restore exactly; gc must clear what the interrupted runs left.

mod common;

use common::*;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// 64 KiB runs of new random data per round of the kill test (1 MiB: a backup's time
/// is mostly reading and hashing the 48 MiB, a kill lands anywhere in it; the data of
/// killed rounds accumulates into later backups' packs).
const ROUND_RUNS: u32 = 16;

/// Restores every listed point and checks it against what its backup read. Points
/// that were never reported committed (killed after their manifest was written) must
/// still hold one of the states the source had.
fn check_points(
    ds: &Path,
    out: &Path,
    committed: &[(String, blake3::Hash)],
    states: &[blake3::Hash],
) -> usize {
    let listed = point_ids(ds);
    for (id, _) in committed {
        assert!(
            listed.contains(id),
            "committed recovery point {id} is not listed: {listed:?}"
        );
    }
    for id in &listed {
        restore_raw(ds, "vm", id, out);
        let got = hash_file(out);
        match committed.iter().find(|(c, _)| c == id) {
            Some((_, want)) => assert_eq!(got, *want, "recovery point {id}"),
            None => assert!(
                states.contains(&got),
                "recovery point {id} (its backup was killed) holds no state the source had"
            ),
        }
    }
    listed.len()
}

#[test]
fn killed_backups_never_damage_the_datastore() {
    let d = tempfile::tempdir().unwrap();
    let ds = d.path().join("ds");
    create_store(&ds);
    let disk = d.path().join("vm.img");
    make_disk(&disk, 48 * MIB, 24 * MIB, 50);
    let out = d.path().join("restored.img");
    let mut rng = Rng::new(51);
    let mut committed = Vec::new();
    let mut states = Vec::new();

    let first = backup(&ds, "vm", &[&disk]);
    states.push(hash_file(&disk));
    committed.push((first, states[0]));
    // One incremental like those of the loop, timed: the kill delays spread over it.
    mutate(&disk, &mut rng, ROUND_RUNS);
    states.push(hash_file(&disk));
    let t = Instant::now();
    let second = backup(&ds, "vm", &[&disk]);
    let took = t.elapsed().as_millis().max(20) as u64;
    committed.push((second, states[1]));

    let mut killed = 0;
    for i in 0..25 {
        mutate(&disk, &mut rng, ROUND_RUNS);
        let h = hash_file(&disk);
        states.push(h);
        let delay = rng.below(took * 2 + 1);
        let mut child = backup_command(&ds, &disk).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(delay));
        let _ = child.kill(); // SIGKILL; harmless if it has exited already
        let o = child.wait_with_output().unwrap();
        if o.status.success() {
            let id = String::from_utf8(o.stdout).unwrap().trim().to_string();
            committed.push((id, h));
        } else {
            assert_eq!(
                o.status.signal(),
                Some(9),
                "round {i}: backup failed by itself: {:?}: {}",
                o.status,
                String::from_utf8_lossy(&o.stderr)
            );
            killed += 1;
        }
    }
    eprintln!(
        "one backup took {took} ms; {killed} of 25 backups killed, {} committed",
        committed.len() - 2
    );

    // Before gc: whatever the kills left, the committed points are whole.
    let (code, text) = verify(&ds);
    assert_eq!(code, Some(0), "verify after the kills: {text}");
    check_points(&ds, &out, &committed, &states);
    // A backup after all this works and is exact.
    mutate(&disk, &mut rng, ROUND_RUNS);
    states.push(hash_file(&disk));
    let id = backup(&ds, "vm", &[&disk]);
    committed.push((id, *states.last().unwrap()));

    let leftovers = temp_files_under(&ds);
    eprintln!("temporary files before gc: {}", leftovers.len());
    let g = json(&["gc", "-d", s(&ds), "--json"]);
    eprintln!("gc: {g}");
    assert_eq!(temp_files_under(&ds), Vec::<PathBuf>::new(), "after gc");
    assert_verify_clean(&ds);
    let n = check_points(&ds, &out, &committed, &states);
    assert_eq!(g["points"], n as u64, "{g}");
}

#[test]
fn gc_and_backup_started_together_both_succeed() {
    let d = tempfile::tempdir().unwrap();
    let ds = d.path().join("ds");
    create_store(&ds);
    let disk = d.path().join("vm.img");
    make_disk(&disk, 48 * MIB, 16 * MIB, 60);
    let mut rng = Rng::new(61);
    let old = backup(&ds, "vm", &[&disk]);
    mutate(&disk, &mut rng, 64);
    let kept = backup(&ds, "vm", &[&disk]);
    let kept_hash = hash_file(&disk);
    // Give gc work: the first point's unique blocks become garbage.
    ok(&["forget", "-d", s(&ds), "--point", &old]);
    mutate(&disk, &mut rng, 64);
    let new_hash = hash_file(&disk);

    let mut gc = Command::new(BIN);
    gc.args(["gc", "-d", s(&ds), "--json"]);
    let gc = std::thread::spawn(move || run_bounded(gc, "gc", HANG));
    let mut b = Command::new(BIN);
    b.args(["backup", "-d", s(&ds), "--source", "vm", "-q", s(&disk)]);
    let b = run_bounded(b, "backup", HANG);
    let gc = gc.join().unwrap();
    assert!(
        gc.status.success(),
        "gc: {}",
        String::from_utf8_lossy(&gc.stderr)
    );
    assert!(
        b.status.success(),
        "backup: {}",
        String::from_utf8_lossy(&b.stderr)
    );
    let new = String::from_utf8(b.stdout).unwrap().trim().to_string();
    let g: serde_json::Value = serde_json::from_slice(&gc.stdout).unwrap();
    assert!(
        g["points"] == 1 || g["points"] == 2,
        "gc saw {} points",
        g["points"]
    );

    assert_verify_clean(&ds);
    let out = d.path().join("r.img");
    restore_raw(&ds, "vm", &new, &out);
    assert_eq!(hash_file(&out), new_hash, "the backup that raced gc");
    restore_raw(&ds, "vm", &kept, &out);
    assert_eq!(hash_file(&out), kept_hash);
    assert_eq!(temp_files_under(&ds), Vec::<PathBuf>::new());
}

#[test]
fn a_full_disk_fails_the_backup_and_harms_nothing() {
    let d = tempfile::tempdir().unwrap();
    let ds = d.path().join("ds");
    create_store(&ds);
    let disk = d.path().join("vm.img");
    make_disk(&disk, 16 * MIB, 2 * MIB, 70);
    let first = backup(&ds, "vm", &[&disk]);
    let first_hash = hash_file(&disk);
    // 8 MiB of new data: its pack is far over the 1 MiB limit below.
    let mut rng = Rng::new(71);
    mutate(&disk, &mut rng, 128);

    // bash counts `ulimit -f` in KiB. Ignoring SIGXFSZ turns the over-limit write into
    // EFBIG, as a full disk turns it into ENOSPC.
    let mut c = Command::new("bash");
    c.args([
        "-c",
        r#"trap "" XFSZ; ulimit -f 1024; exec "$0" "$@""#,
        BIN,
        "backup",
        "-d",
        s(&ds),
        "--source",
        "vm",
        "-q",
        s(&disk),
    ]);
    let o = run_bounded(c, "backup under a file-size limit", HANG);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("holdfast: error:"), "{err}");
    assert!(
        err.contains("File too large"),
        "the cause should be named: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(o.stdout.is_empty(), "no id may be printed");
    assert_eq!(point_ids(&ds), vec![first.clone()]);
    let out = d.path().join("r.img");
    restore_raw(&ds, "vm", &first, &out);
    assert_eq!(hash_file(&out), first_hash);
    assert_verify_clean(&ds);
    assert_eq!(
        temp_files_under(&ds),
        Vec::<PathBuf>::new(),
        "a backup that failed (not killed) should remove its temporary files"
    );

    // A restore that runs out of space: exit 1, no output, no temporary file.
    let outdir = d.path().join("out");
    std::fs::create_dir(&outdir).unwrap();
    let big = outdir.join("big.img");
    let mut c = Command::new("bash");
    c.args([
        "-c",
        r#"trap "" XFSZ; ulimit -f 1024; exec "$0" "$@""#,
        BIN,
        "restore",
        "-d",
        s(&ds),
        "--source",
        "vm",
        "--format",
        "qcow2",
        "-o",
        s(&big),
        "-q",
    ]);
    let o = run_bounded(c, "restore under a file-size limit", HANG);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("File too large"), "{err}");
    assert!(!big.exists());
    no_temp_files(&outdir);

    // Space again: the next backup works.
    let id = backup(&ds, "vm", &[&disk]);
    restore_raw(&ds, "vm", &id, &out);
    assert_eq!(hash_file(&out), hash_file(&disk));
    ok(&["gc", "-d", s(&ds)]);
    assert_verify_clean(&ds);
}
