//! The `holdfast image` commands as a user runs them: real binary, real qemu-img.

mod common;

use common::{holdfast, no_temp_files, ok, qemu_img, s};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A 20 MiB raw disk with data, written zeros and holes.
fn sample(dir: &Path) -> PathBuf {
    use std::os::unix::fs::FileExt;
    let p = dir.join("sample.img");
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(20 << 20).unwrap();
    let data: Vec<u8> = (0..3 << 20)
        .map(|i: u32| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    f.write_all_at(&data, 1 << 20).unwrap();
    f.write_all_at(&vec![0u8; 2 << 20], 8 << 20).unwrap();
    f.write_all_at(b"the end", (20 << 20) - 512).unwrap();
    p
}

#[test]
fn every_format_converts_and_reports_info_as_json() {
    let d = tempfile::tempdir().unwrap();
    let raw = sample(d.path());
    for (fmt, sub, qfmt) in [
        ("vhdx", "dynamic", "vhdx"),
        ("vhdx", "fixed", "vhdx"),
        ("vhd", "dynamic", "vpc"),
        ("vhd", "fixed", "vpc"),
        ("qcow2", "", "qcow2"),
        ("raw", "", "raw"),
    ] {
        let out = d.path().join(format!("out-{fmt}-{sub}.bin"));
        let mut args = vec![
            "image",
            "convert",
            s(&raw),
            s(&out),
            "--format",
            fmt,
            "--quiet",
        ];
        if !sub.is_empty() {
            args.extend(["--subformat", sub]);
        }
        ok(&args);
        let o = Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", qfmt, s(&raw), s(&out)])
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{fmt} {sub}: {}",
            String::from_utf8_lossy(&o.stdout)
        );
        let v: serde_json::Value =
            serde_json::from_str(&ok(&["image", "info", "--json", s(&out)])).unwrap();
        assert_eq!(v["format"], fmt);
        assert_eq!(v["virtual_size"], 20 << 20);
        if !sub.is_empty() {
            assert_eq!(v["subformat"], sub);
        }
        let check = ok(&["image", "check", s(&out)]);
        assert!(check.contains("no damage found"), "{check}");
        // and back to raw, byte for byte
        let back = d.path().join(format!("back-{fmt}-{sub}.img"));
        ok(&[
            "image",
            "convert",
            s(&out),
            s(&back),
            "--format",
            "raw",
            "--quiet",
        ]);
        assert_eq!(
            std::fs::read(&raw).unwrap(),
            std::fs::read(&back).unwrap(),
            "{fmt} {sub}"
        );
    }
    no_temp_files(d.path());
}

#[test]
fn map_json_lists_extents_covering_the_disk() {
    let d = tempfile::tempdir().unwrap();
    let raw = sample(d.path());
    let q = d.path().join("s.qcow2");
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2", s(&raw), s(&q)]);
    let v: serde_json::Value =
        serde_json::from_str(&ok(&["image", "map", "--json", s(&q)])).unwrap();
    let list = v.as_array().unwrap();
    let mut pos = 0;
    let mut data = 0;
    for e in list {
        assert_eq!(e["offset"], pos);
        pos += e["length"].as_u64().unwrap();
        if e["state"] == "data" {
            data += e["length"].as_u64().unwrap();
        }
        assert!(["data", "zero", "unallocated"].contains(&e["state"].as_str().unwrap()));
    }
    assert_eq!(pos, 20 << 20);
    assert!((3 << 20..8 << 20).contains(&data), "data bytes {data}");
    let text = ok(&["image", "map", s(&q)]);
    assert!(
        text.contains("data") && text.contains("unallocated"),
        "{text}"
    );
}

#[test]
fn info_shows_the_parent_chain() {
    let d = tempfile::tempdir().unwrap();
    let raw = sample(d.path());
    let base = d.path().join("base.qcow2");
    let top = d.path().join("top.qcow2");
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2", s(&raw), s(&base)]);
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        s(&top),
    ]);
    let v: serde_json::Value =
        serde_json::from_str(&ok(&["image", "info", "--json", s(&top)])).unwrap();
    assert_eq!(v["subformat"], "differencing");
    assert_eq!(v["parent"]["format"], "qcow2");
    assert!(
        v["parent"]["path"]
            .as_str()
            .unwrap()
            .ends_with("base.qcow2")
    );
    let text = ok(&["image", "info", s(&top)]);
    assert!(text.contains("parent:"), "{text}");
}

#[test]
fn convert_refuses_to_clobber_and_to_write_onto_its_source() {
    let d = tempfile::tempdir().unwrap();
    let raw = sample(d.path());
    let out = d.path().join("o.vhdx");
    std::fs::write(&out, b"precious").unwrap();
    let o = holdfast(&["image", "convert", s(&raw), s(&out), "--format", "vhdx"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--overwrite"));
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");
    let o = holdfast(&[
        "image",
        "convert",
        s(&raw),
        s(&raw),
        "--format",
        "raw",
        "--overwrite",
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("same file"));
    ok(&[
        "image",
        "convert",
        s(&raw),
        s(&out),
        "--format",
        "vhdx",
        "--overwrite",
        "--quiet",
    ]);
    qemu_img(&["compare", "-f", "raw", "-F", "vhdx", s(&raw), s(&out)]);
}

#[test]
fn damaged_input_fails_cleanly_and_leaves_nothing_behind() {
    let d = tempfile::tempdir().unwrap();
    let raw = sample(d.path());
    let q = d.path().join("s.qcow2");
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2", s(&raw), s(&q)]);
    // Cut the file in the middle of its data clusters: the header and tables survive,
    // reads of the lost clusters must fail with a message naming the file.
    let len = std::fs::metadata(&q).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&q).unwrap();
    f.set_len(len / 2).unwrap();
    drop(f);
    let out = d.path().join("out.raw");
    let o = holdfast(&[
        "image",
        "convert",
        s(&q),
        s(&out),
        "--format",
        "raw",
        "--quiet",
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("s.qcow2"), "error must name the file: {err}");
    assert!(
        err.contains("beyond the end of the file"),
        "error must say what is wrong: {err}"
    );
    assert!(
        err.contains("offset 0x"),
        "error must name the offset: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(!out.exists());
    no_temp_files(d.path());
    let o = holdfast(&["image", "check", s(&q)]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("DAMAGED"));
}

#[test]
fn check_json_and_exit_codes() {
    let d = tempfile::tempdir().unwrap();
    let raw = sample(d.path());
    let v = d.path().join("s.vhdx");
    ok(&[
        "image",
        "convert",
        s(&raw),
        s(&v),
        "--format",
        "vhdx",
        "--quiet",
    ]);
    let j: serde_json::Value =
        serde_json::from_str(&ok(&["image", "check", "--json", s(&v)])).unwrap();
    assert_eq!(j["damaged"], false);
    assert_eq!(j["format"], "vhdx");
    // Both headers damaged: refused, exit 2, both named.
    let mut bytes = std::fs::read(&v).unwrap();
    bytes[64 * 1024 + 20] ^= 0xff;
    bytes[128 * 1024 + 20] ^= 0xff;
    std::fs::write(&v, &bytes).unwrap();
    let o = holdfast(&["image", "check", "--json", s(&v)]);
    assert_eq!(o.status.code(), Some(2));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["damaged"], true);
    let o = holdfast(&["image", "info", s(&v)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("header"));
}

#[test]
fn bad_arguments_are_refused() {
    let o = holdfast(&["image", "convert", "a", "b", "--format", "vmdk"]);
    assert!(!o.status.success());
    let o = holdfast(&[
        "image",
        "convert",
        "a",
        "b",
        "--format",
        "qcow2",
        "--subformat",
        "fixed",
    ]);
    assert!(!o.status.success());
    let o = holdfast(&["image", "info", "/nonexistent/disk.vhdx"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent/disk.vhdx"));
}

#[test]
fn no_fsync_writes_the_same_image() {
    let d = tempfile::tempdir().unwrap();
    let raw = sample(d.path());
    let a = d.path().join("a.vhdx");
    let b = d.path().join("b.qcow2");
    ok(&[
        "image",
        "convert",
        s(&raw),
        s(&a),
        "--format",
        "vhdx",
        "--no-fsync",
        "--quiet",
    ]);
    ok(&[
        "image",
        "convert",
        s(&a),
        s(&b),
        "--format",
        "qcow2",
        "--no-fsync",
        "--quiet",
    ]);
    qemu_img(&["compare", "-f", "raw", "-F", "qcow2", s(&raw), s(&b)]);
    qemu_img(&["check", "-f", "qcow2", s(&b)]);
    no_temp_files(d.path());
}
