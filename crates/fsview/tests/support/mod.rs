//! Fixture helpers shared by fsview's tests (files.rs, ntfs.rs, exfat.rs, tables.rs) and by holdfast's
//! item-level-recovery test, which includes this file by path
//! (`#[path = "../../fsview/tests/support/mod.rs"] mod support;`). So it uses only the
//! standard library, `libc` and `tempfile`, which both test crates have.
//!
//! Images are made by the real tools (mke2fs, mkfs.fat + mcopy, mkntfs + the ntfs-3g
//! FUSE mount, mkfs.exfat + the exfat-fuse mount on a loop device, sfdisk). A missing
//! tool fails the test with the package to install (see scripts/install-deps); nothing
//! is skipped.
//!
//! Each including test uses a different subset, hence the `dead_code` allowance.
#![allow(dead_code)]

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const MIB: u64 = 1 << 20;

/// GPT partition type of Windows basic data (NTFS, FAT).
pub const GPT_BASIC_DATA: &str = "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7";

/// The Debian package that provides `tool`.
pub fn pkg(tool: &str) -> &'static str {
    match tool {
        "sfdisk" => "fdisk",
        "sgdisk" => "gdisk",
        "mkfs.fat" => "dosfstools",
        "mke2fs" | "debugfs" => "e2fsprogs",
        "mcopy" => "mtools",
        "mkntfs" | "ntfs-3g" | "ntfsinfo" => "ntfs-3g",
        "mkfs.exfat" => "exfatprogs",
        "mount.exfat-fuse" => "exfat-fuse",
        "mountpoint" | "umount" | "losetup" | "mkswap" => "util-linux",
        "qemu-img" => "qemu-utils",
        "sha256sum" => "coreutils",
        _ => "?",
    }
}

/// Runs a tool with extra environment, failing the test (with the package to install)
/// when it is missing or fails. Returns stdout (lossily decoded).
pub fn run(tool: &str, args: &[&str], stdin: Option<&[u8]>, env: &[(&str, &str)]) -> String {
    String::from_utf8_lossy(&run_bytes(tool, args, stdin, env)).into_owned()
}

/// [`run`], returning stdout as bytes.
pub fn run_bytes(tool: &str, args: &[&str], stdin: Option<&[u8]>, env: &[(&str, &str)]) -> Vec<u8> {
    let mut cmd = Command::new(tool);
    cmd.args(args)
        .envs(env.iter().copied())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| {
        panic!(
            "{tool} could not be started ({e}): install it with `apt-get install {}` (or run scripts/install-deps)",
            pkg(tool)
        )
    });
    if let Some(s) = stdin {
        use std::io::Write;
        child.stdin.take().unwrap().write_all(s).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Deterministic pseudo-random bytes (xorshift64).
pub fn random_bytes(len: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        out.extend_from_slice(&seed.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A new sparse file of `size` bytes (replacing any).
pub fn blank(path: &Path, size: u64) {
    File::create(path).unwrap().set_len(size).unwrap();
}

/// `mke2fs -t KIND` over a new `size_mib` image filled from `src` (`-d`), 4 KiB blocks,
/// 256-byte inodes, label `label`, extra `-O features`.
pub fn mke2fs(
    img: &Path,
    kind: &str,
    size_mib: u64,
    label: &str,
    src: &Path,
    features: Option<&str>,
) {
    mke2fs_sized(img, kind, size_mib, label, src, features, 4096, 256);
}

/// [`mke2fs`] with the block and inode sizes given (`inline_data` keeps more bytes in
/// larger inodes).
#[allow(clippy::too_many_arguments)]
pub fn mke2fs_sized(
    img: &Path,
    kind: &str,
    size_mib: u64,
    label: &str,
    src: &Path,
    features: Option<&str>,
    block_size: u32,
    inode_size: u32,
) {
    blank(img, size_mib * MIB);
    let (b, i) = (block_size.to_string(), inode_size.to_string());
    let mut args = vec!["-q", "-F", "-t", kind, "-b", &b, "-I", &i, "-L", label];
    if let Some(f) = features {
        args.extend(["-O", f]);
    }
    args.extend(["-d", src.to_str().unwrap(), img.to_str().unwrap()]);
    run("mke2fs", &args, None, &[]);
}

/// A new FAT`bits` image of `size_mib` labelled `label`, holding a copy of everything in
/// `src` (mcopy, modification times kept: mtools is run in UTC, so FAT's local times are
/// the source's UTC times, in 2-second steps).
pub fn mkfat(img: &Path, bits: u8, size_mib: u64, label: &str, src: &Path) {
    let _ = std::fs::remove_file(img);
    let kib = (size_mib * 1024).to_string();
    let bits_s = bits.to_string();
    let mut args = vec!["-F", &bits_s, "-n", label];
    if bits == 32 {
        // One sector per cluster keeps a 64 MiB volume above FAT32's cluster minimum.
        args.extend(["-s", "1"]);
    }
    args.extend(["-C", img.to_str().unwrap(), &kib]);
    run("mkfs.fat", &args, None, &[]);
    let mut names: Vec<String> = std::fs::read_dir(src)
        .unwrap()
        .map(|e| e.unwrap().path().to_str().unwrap().to_string())
        .collect();
    if names.is_empty() {
        return;
    }
    names.sort();
    let mut args = vec!["-s", "-p", "-m", "-i", img.to_str().unwrap()];
    args.extend(names.iter().map(String::as_str));
    args.push("::/");
    // mtools stores local time: UTC makes it the source's; UTF-8 for long names.
    run(
        "mcopy",
        &args,
        None,
        &[
            ("TZ", "UTC"),
            ("LC_ALL", "C.UTF-8"),
            ("MTOOLS_SKIP_CHECK", "1"),
        ],
    );
}

/// A new NTFS image of `size` bytes labelled `label` (quick format, 512-byte sectors,
/// geometry as for a partition at 1 MiB).
pub fn mkntfs(img: &Path, size: u64, label: &str) {
    blank(img, size);
    run(
        "mkntfs",
        &[
            "-q",
            "-F",
            "-Q",
            "-L",
            label,
            "-s",
            "512",
            "-p",
            "2048",
            "-H",
            "255",
            "-S",
            "63",
            img.to_str().unwrap(),
        ],
        None,
        &[],
    );
}

/// A new exFAT image of `size` bytes labelled `label` (mkfs.exfat, exfatprogs).
pub fn mkexfat(img: &Path, size: u64, label: &str) {
    blank(img, size);
    run(
        "mkfs.exfat",
        &["-L", label, img.to_str().unwrap()],
        None,
        &[],
    );
}

/// A FUSE mount of an image (ntfs-3g, or mount.exfat-fuse on a loop device, since
/// exfat-fuse always mounts with `blkdev`); needs root and /dev/fuse. Unmounted (the
/// daemon reaped, the loop device detached) on drop.
pub struct Mount {
    dir: PathBuf,
    child: Option<Child>,
    tool: &'static str,
    loop_dev: Option<String>,
}

impl Mount {
    /// ntfs-3g.
    pub fn new(img: &Path, dir: &Path) -> Mount {
        std::fs::create_dir_all(dir).unwrap();
        let mut cmd = Command::new("ntfs-3g");
        cmd.args(["-o", "no_detach"]).arg(img).arg(dir);
        Mount::spawn(cmd, "ntfs-3g", None, img, dir)
    }

    /// mount.exfat-fuse (in the foreground, `-d`) on a new loop device over `img`, with
    /// the daemon's time zone `tz` (exFAT stores local times and their UTC offset).
    pub fn exfat(img: &Path, dir: &Path, tz: &str) -> Mount {
        std::fs::create_dir_all(dir).unwrap();
        let dev = run(
            "losetup",
            &["-f", "--show", img.to_str().unwrap()],
            None,
            &[],
        )
        .trim()
        .to_string();
        let mut cmd = Command::new("mount.exfat-fuse");
        cmd.arg("-d").arg(&dev).arg(dir).env("TZ", tz);
        Mount::spawn(cmd, "mount.exfat-fuse", Some(dev), img, dir)
    }

    fn spawn(
        mut cmd: Command,
        tool: &'static str,
        loop_dev: Option<String>,
        img: &Path,
        dir: &Path,
    ) -> Mount {
        let spawned = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match spawned {
            Ok(c) => c,
            Err(e) => {
                if let Some(d) = &loop_dev {
                    let _ = Command::new("losetup").arg("-d").arg(d).status();
                }
                panic!(
                    "{tool} could not be started ({e}): install it with `apt-get install {}` (or run scripts/install-deps); the test needs root and /dev/fuse",
                    pkg(tool)
                )
            }
        };
        let m = Mount {
            dir: dir.to_path_buf(),
            child: Some(child),
            tool,
            loop_dev,
        };
        let t0 = Instant::now();
        loop {
            let ok = Command::new("mountpoint")
                .arg("-q")
                .arg(dir)
                .status()
                .unwrap_or_else(|e| {
                    panic!("mountpoint could not be started ({e}): install util-linux")
                })
                .success();
            if ok {
                return m;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "{tool} did not mount {} (needs root and /dev/fuse)",
                img.display()
            );
            std::thread::sleep(Duration::from_millis(30));
        }
    }

    /// `p` (relative) inside the mount.
    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.join(p)
    }

    /// Unmounts, failing the test if the daemon did not exit cleanly (everything written
    /// is then on the image).
    pub fn unmount(mut self) {
        run("umount", &[self.dir.to_str().unwrap()], None, &[]);
        let status = self.child.take().unwrap().wait().unwrap();
        assert!(status.success(), "{} exited with {status}", self.tool);
        if let Some(d) = self.loop_dev.take() {
            run("losetup", &["-d", &d], None, &[]);
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(d) = self.loop_dev.take() {
            let _ = Command::new("losetup").arg("-d").arg(&d).status();
        }
    }
}

/// Sets an extended attribute (ntfs-3g maps `system.ntfs_*` to NTFS metadata).
pub fn setxattr(path: &Path, name: &str, value: &[u8]) {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    // SAFETY: valid NUL-terminated strings and a live buffer of value.len() bytes.
    let rc = unsafe {
        libc::setxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(
        rc,
        0,
        "setxattr {name} on {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

/// Sets FILE_ATTRIBUTE_COMPRESSED (0x800) on a folder of an ntfs-3g mount: files created
/// in it afterwards are LZNT1-compressed.
pub fn set_ntfs_compressed(dir: &Path) {
    setxattr(dir, "system.ntfs_attrib_be", &0x800u32.to_be_bytes());
}

/// A new disk at `disk` with a partition table (`gpt`, else MBR) holding each image of
/// `parts` as a partition of that sfdisk `type=` (MBR: `83`, `c`, `7`...; GPT: `L` or a
/// GUID), in order, the first at 1 MiB, each starting on a 1 MiB boundary. A GPT disk
/// keeps 1 MiB at the end for the backup table. Returns each partition's start (bytes).
pub fn partitioned_disk(disk: &Path, gpt: bool, parts: &[(&Path, &str)]) -> Vec<u64> {
    let mut script = String::from(if gpt { "label: gpt\n" } else { "label: dos\n" });
    let mut starts = Vec::new();
    let mut at = MIB;
    for (img, ty) in parts {
        let len = std::fs::metadata(img).unwrap().len();
        assert_eq!(len % 512, 0, "{}: not whole sectors", img.display());
        script.push_str(&format!(
            "start={}, size={}, type={ty}\n",
            at / 512,
            len / 512
        ));
        starts.push(at);
        at += len.div_ceil(MIB) * MIB;
    }
    blank(disk, at + if gpt { MIB } else { 0 });
    run(
        "sfdisk",
        &["-q", disk.to_str().unwrap()],
        Some(script.as_bytes()),
        &[],
    );
    let f = OpenOptions::new().write(true).open(disk).unwrap();
    for ((img, _), start) in parts.iter().zip(&starts) {
        f.write_all_at(&std::fs::read(img).unwrap(), *start)
            .unwrap();
    }
    starts
}

/// `qemu-img convert -O FORMAT` (`vhdx`, `vpc`, `qcow2`...) of a raw image.
pub fn convert(raw: &Path, format: &str, out: &Path) {
    if let Some(d) = out.parent() {
        std::fs::create_dir_all(d).unwrap();
    }
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            format,
            raw.to_str().unwrap(),
            out.to_str().unwrap(),
        ],
        None,
        &[],
    );
}

/// What the file system holds, by recursive lists: path (without the leading `/`) →
/// entry. No listing may hold `.` or `..`, and no path twice.
pub fn fs_map(
    fs: &mut dyn fsview::FileSystem,
) -> std::collections::BTreeMap<String, fsview::Entry> {
    let mut out = std::collections::BTreeMap::new();
    let mut todo = vec![String::new()];
    while let Some(dir) = todo.pop() {
        for e in fs.list(&format!("/{dir}")).unwrap() {
            assert!(e.name != "." && e.name != "..");
            let rel = if dir.is_empty() {
                e.name.clone()
            } else {
                format!("{dir}/{}", e.name)
            };
            if e.kind == fsview::EntryKind::Dir {
                todo.push(rel.clone());
            }
            assert!(out.insert(rel, e).is_none());
        }
    }
    out
}

/// Touches everything a damaged file system still shows (lists, stats, links, file
/// contents up to 1 MiB, data ranges), ignoring errors: only panics and hangs fail.
pub fn walk_ignoring_errors(fs: &mut dyn fsview::FileSystem, path: &str, depth: usize) {
    let Ok(entries) = fs.list(path) else { return };
    for e in entries {
        let p = format!("{}/{}", path.trim_end_matches('/'), e.name);
        let _ = fs.stat(&p);
        match e.kind {
            fsview::EntryKind::Dir if depth < 8 => walk_ignoring_errors(fs, &p, depth + 1),
            fsview::EntryKind::Symlink => {
                let _ = fs.read_link(&p);
            }
            _ => {
                // Large files only cost time here: data_ranges walks their runs.
                if e.size <= 1 << 20 {
                    let _ = fs.read_file(&p, &mut std::io::sink());
                }
                let _ = fs.data_ranges(&p);
            }
        }
    }
}

/// What a source tree holds: relative path (no leading `/`) → (kind, size; a link's
/// size is its target's length).
pub fn source_map(root: &Path) -> std::collections::BTreeMap<String, (fsview::EntryKind, u64)> {
    fn walk(
        root: &Path,
        dir: &Path,
        out: &mut std::collections::BTreeMap<String, (fsview::EntryKind, u64)>,
    ) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let v = if m.is_dir() {
                walk(root, &p, out);
                (fsview::EntryKind::Dir, 0)
            } else if m.file_type().is_symlink() {
                (fsview::EntryKind::Symlink, m.len())
            } else {
                (fsview::EntryKind::File, m.len())
            };
            out.insert(rel, v);
        }
    }
    let mut out = std::collections::BTreeMap::new();
    walk(root, root, &mut out);
    out
}
