//! Copying files and folders out of a [`FileSystem`] into a local folder, safely: names
//! from a backed-up (possibly hostile) disk never choose where a file lands, and one
//! bad entry never stops the copy of the rest.
//!
//! - Items take the name stored on the volume (`/REPORT.TXT` asked of a FAT volume
//!   that stores `report.txt` lands as `report.txt`).
//! - Every name is made safe ([`safe_name`]): `/`, `\`, NUL, control and invisible
//!   formatting characters (bidirectional overrides, zero-width spaces...) become `_`;
//!   `.`, `..` and empty names are renamed; reserved Windows device names (`CON`,
//!   `NUL`, `COM1`...) get a `_` prefix; names longer than 255 bytes are cut on a
//!   character boundary.
//! - Two names that would be equal (also without case: the target may ignore case) are
//!   told apart with ` (2)`, ` (3)`..., the name cut so that it still fits in 255 bytes.
//!   This holds across all the items of one copy (`/doc/a/copyright` and
//!   `/doc/b/copyright` land as `copyright` and `copyright (2)`) and, directly in the
//!   target folder, for names already there. Every rename is reported, with why.
//! - Nothing is ever written through an existing path: directories are created new,
//!   files are written under a temporary name created exclusively and renamed at the
//!   end (rename replaces a name, it never follows a link), and symbolic links are
//!   recreated as links (their targets are not looked at, never followed).
//! - Entries that cannot be copied are left out and reported, and the rest is copied:
//!   devices and sockets; names no path can reach (holding `/`, or `.`/`..`/empty: a
//!   crafted volume); a folder met again in the same walk (a directory loop or a
//!   cross-linked folder, recognised by the folder's id: inode, MFT record, first
//!   cluster); folders nested deeper than [`MAX_DEPTH`].
//! - A copy that fails (the source unreadable, the target full) removes what it made in
//!   the target folder.

use crate::fs::{EntryKind, FileSystem, components};
use crate::{Error, Result};
use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Deepest folder nesting extracted.
pub const MAX_DEPTH: usize = 256;

/// Longest file name written, in bytes (Linux, and what NTFS's 255 UTF-16 units hold
/// for ASCII).
const NAME_MAX: usize = 255;

/// What [`extract`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub files: u64,
    pub dirs: u64,
    pub links: u64,
    pub bytes: u64,
    /// Entries left out, by source path, with why.
    pub skipped: Vec<(String, String)>,
    /// Every name that had to change.
    pub renamed: Vec<Renamed>,
    /// What the copy made directly in the target folder (removed if the copy fails).
    pub created: Vec<PathBuf>,
}

/// A source entry written under another name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Renamed {
    /// The source path.
    pub from: String,
    /// The name it was given.
    pub to: String,
    pub why: String,
}

impl Report {
    /// One line per rename and per entry left out, names escaped as Rust's `{:?}` does
    /// (control, bidirectional and invisible characters as `\n`, `\u{202e}`...): for
    /// the CLI's output and the job log.
    pub fn lines(&self) -> impl Iterator<Item = String> + '_ {
        self.renamed
            .iter()
            .map(|r| format!("{:?} saved as {:?} ({})", r.from, r.to, r.why))
            .chain(
                self.skipped
                    .iter()
                    .map(|(p, why)| format!("{p:?} skipped: {why}")),
            )
    }
}

const RESERVED: [&str; 22] = [
    "CON", "PRN", "AUX", "NUL", "COM1", "COM2", "COM3", "COM4", "COM5", "COM6", "COM7", "COM8",
    "COM9", "LPT1", "LPT2", "LPT3", "LPT4", "LPT5", "LPT6", "LPT7", "LPT8", "LPT9",
];

/// Characters that print nothing visible or change how the text around them is shown:
/// control characters (C0, DEL, C1), bidirectional marks, embeddings, overrides and
/// isolates (U+202E makes `exe.txt` read as `txt.exe`), zero-width and other invisible
/// formatting characters, line and paragraph separators. (Zero-width joiners stay:
/// scripts and emoji need them.)
fn hidden(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{00AD}'
                | '\u{061C}'
                | '\u{180E}'
                | '\u{200B}'
                | '\u{200E}'
                | '\u{200F}'
                | '\u{2028}'..='\u{202E}'
                | '\u{2060}'..='\u{2064}'
                | '\u{2066}'..='\u{206F}'
                | '\u{FEFF}'
                | '\u{FFF9}'..='\u{FFFB}'
        )
}

/// A name from a disk as shown to people (listings): unchanged when every character
/// shows as itself; else control, bidirectional and invisible characters escaped as
/// `\n`, `\u{202e}`... (and `\` as `\\`, so the escaped form is unambiguous).
pub fn shown(name: &str) -> String {
    if !name.chars().any(hidden) {
        return name.to_string();
    }
    let mut s = String::with_capacity(name.len() + 8);
    for c in name.chars() {
        if hidden(c) || c == '\\' {
            s.extend(c.escape_debug());
        } else {
            s.push(c);
        }
    }
    s
}

fn reserved(name: &str) -> bool {
    let stem = name.split('.').next().unwrap_or("").trim_end();
    RESERVED.iter().any(|r| r.eq_ignore_ascii_case(stem))
}

/// `s` cut to at most `max` bytes, on a character boundary.
fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut at = max;
    while !s.is_char_boundary(at) {
        at -= 1;
    }
    &s[..at]
}

/// `name` as a safe single path component (see the module documentation).
pub fn safe_name(name: &str) -> String {
    let mut s: String = name
        .chars()
        .map(|c| match c {
            '/' | '\\' | '\0' => '_',
            c if hidden(c) => '_',
            c => c,
        })
        .collect();
    if s.is_empty() || s == "." || s == ".." {
        s = format!("_{s}");
    }
    if reserved(&s) {
        s.insert(0, '_');
    }
    cut(&s, NAME_MAX).to_string()
}

/// Why [`safe_name`] changes `name`, if it does.
fn unsafe_why(name: &str) -> Option<&'static str> {
    if name.is_empty() || name == "." || name == ".." {
        Some("not usable as a file name")
    } else if name.contains(['/', '\\', '\0']) {
        Some("holds a path separator or NUL")
    } else if name.chars().any(hidden) {
        Some("holds control or invisible characters")
    } else if reserved(name) {
        Some("a reserved Windows device name")
    } else if name.len() > NAME_MAX {
        Some("longer than 255 bytes")
    } else {
        None
    }
}

/// `base` with ` (n)` after it, `base` cut so that the whole fits in [`NAME_MAX`].
fn with_suffix(base: &str, n: u32) -> String {
    let suffix = format!(" ({n})");
    format!("{}{suffix}", cut(base, NAME_MAX - suffix.len()))
}

/// Copies the file, folder (recursively) or symlink at `path` of `fs` into the folder
/// `target` (which must exist), under its stored (made safe) name. The root (`/`)
/// copies the whole file system's contents into `target`.
pub fn extract(
    fs: &mut dyn FileSystem,
    path: &str,
    target: &Path,
    report: &mut Report,
) -> Result<()> {
    extract_all(fs, &[path], target, report)
}

/// [`extract`] of several items into one folder: names are told apart across them (and
/// from what `target` already holds). On failure, what this call made in `target` is
/// removed.
pub fn extract_all<S: AsRef<str>>(
    fs: &mut dyn FileSystem,
    paths: &[S],
    target: &Path,
    report: &mut Report,
) -> Result<()> {
    let made = report.created.len();
    let mut taken = HashSet::new();
    let mut r = Ok(());
    for p in paths {
        r = extract_one(fs, p.as_ref(), target, &mut taken, report);
        if r.is_err() {
            break;
        }
    }
    if r.is_err() {
        for p in report.created.drain(made..).rev() {
            let _ = match p.symlink_metadata() {
                Ok(m) if m.is_dir() => std::fs::remove_dir_all(&p),
                _ => std::fs::remove_file(&p),
            };
        }
    }
    r
}

/// Where a walk stands: the folders it has copied (by id, with the path first seen).
struct Walk<'r> {
    visited: HashMap<u64, String>,
    report: &'r mut Report,
}

fn extract_one(
    fs: &mut dyn FileSystem,
    path: &str,
    target: &Path,
    taken: &mut HashSet<String>,
    report: &mut Report,
) -> Result<()> {
    let parts = components(path)?;
    let entry = fs.stat(path)?;
    let mut w = Walk {
        visited: HashMap::new(),
        report,
    };
    match parts.split_last() {
        None => {
            w.visited.insert(entry.id, "/".into());
            copy_children(fs, "", target, 0, taken, Some(target), &mut w)
        }
        Some((_, dir)) => {
            // The stored name: the path may spell it in another case.
            let mut src = String::new();
            for c in dir.iter().chain([&entry.name.as_str()]) {
                src.push('/');
                src.push_str(c);
            }
            let name = unique(&entry.name, taken, &src, Some(target), w.report);
            copy_entry(fs, &src, &entry, &target.join(name), 0, true, &mut w)
        }
    }
}

/// The name `name` gets among the names `taken` so far in its folder (and, in the
/// target folder itself, `existing`'s entries), recorded in the report when it changes.
fn unique(
    name: &str,
    taken: &mut HashSet<String>,
    src: &str,
    existing: Option<&Path>,
    report: &mut Report,
) -> String {
    let base = safe_name(name);
    let mut why: Vec<&str> = unsafe_why(name).into_iter().collect();
    let mut out = base.clone();
    let mut n = 2u32;
    loop {
        // Compared without case: the target may be a case-insensitive file system.
        let key = out.to_lowercase();
        let reason = if taken.contains(&key) {
            "another item has the same name (case aside)"
        } else if existing.is_some_and(|d| d.join(&out).symlink_metadata().is_ok()) {
            "the name is taken in the target folder"
        } else {
            taken.insert(key);
            break;
        };
        if !why.contains(&reason) {
            why.push(reason);
        }
        out = with_suffix(&base, n);
        n = n.saturating_add(1);
    }
    if out != name {
        if why.is_empty() {
            why.push("unsafe name");
        }
        report.renamed.push(Renamed {
            from: src.to_string(),
            to: out.clone(),
            why: why.join("; "),
        });
    }
    out
}

fn copy_children(
    fs: &mut dyn FileSystem,
    dir: &str,
    to: &Path,
    depth: usize,
    taken: &mut HashSet<String>,
    top: Option<&Path>,
    w: &mut Walk<'_>,
) -> Result<()> {
    for e in fs.list(if dir.is_empty() { "/" } else { dir })? {
        let src = format!("{dir}/{}", e.name);
        // A path names an entry by its name: one holding `/` (or `.`, `..`, empty) can
        // be listed but not read.
        if e.name.is_empty() || e.name == "." || e.name == ".." || e.name.contains('/') {
            w.report.skipped.push((
                src,
                "its name holds `/` or is `.`, `..` or empty (a damaged or crafted volume): \
                 no path reaches it"
                    .into(),
            ));
            continue;
        }
        let name = unique(&e.name, taken, &src, top, w.report);
        copy_entry(fs, &src, &e, &to.join(name), depth + 1, top.is_some(), w)?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn copy_entry(
    fs: &mut dyn FileSystem,
    src: &str,
    e: &crate::Entry,
    to: &Path,
    depth: usize,
    top: bool,
    w: &mut Walk<'_>,
) -> Result<()> {
    let exists = |p: &Path| {
        Error::Io(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!("{} already exists; not overwritten", p.display()),
        ))
    };
    let made = |w: &mut Walk<'_>| {
        if top {
            w.report.created.push(to.to_path_buf());
        }
    };
    match e.kind {
        EntryKind::Dir => {
            if let Some(first) = w.visited.get(&e.id) {
                let why = if src.starts_with(&format!("{}/", first.trim_end_matches('/'))) {
                    format!("a loop in the directory tree: it is {first:?} again")
                } else {
                    format!("the same folder as {first:?} (cross-linked), copied there")
                };
                w.report.skipped.push((src.to_string(), why));
                return Ok(());
            }
            if depth >= MAX_DEPTH {
                w.report.skipped.push((
                    src.to_string(),
                    format!("folders nested deeper than {MAX_DEPTH} levels"),
                ));
                return Ok(());
            }
            std::fs::create_dir(to).map_err(|err| match err.kind() {
                std::io::ErrorKind::AlreadyExists => exists(to),
                _ => err.into(),
            })?;
            made(w);
            w.report.dirs += 1;
            w.visited.insert(e.id, src.to_string());
            copy_children(fs, src, to, depth, &mut HashSet::new(), None, w)?;
            // After the children: writing them changed the folder's time.
            if let Some(t) = mtime(e) {
                File::open(to)?.set_modified(t)?;
            }
        }
        EntryKind::File => {
            let n = write_file(fs, src, to, mtime(e), e.mode)?;
            made(w);
            w.report.files += 1;
            w.report.bytes = w.report.bytes.saturating_add(n);
        }
        EntryKind::Symlink => {
            let target = fs.read_link(src)?;
            if target.contains('\0') {
                w.report.skipped.push((
                    src.to_string(),
                    "a symbolic link whose target holds NUL".into(),
                ));
                return Ok(());
            }
            std::os::unix::fs::symlink(&target, to).map_err(|err| match err.kind() {
                std::io::ErrorKind::AlreadyExists => exists(to),
                _ => err.into(),
            })?;
            made(w);
            w.report.links += 1;
        }
        EntryKind::Other => w.report.skipped.push((
            src.to_string(),
            "not a file, folder or link (a device, socket or special file)".into(),
        )),
    }
    Ok(())
}

fn mtime(e: &crate::Entry) -> Option<SystemTime> {
    let t = e.mtime?;
    let nanos = Duration::from_nanos(u64::from(e.mtime_nanos.min(999_999_999)));
    if t >= 0 {
        UNIX_EPOCH.checked_add(Duration::from_secs(t as u64) + nanos)
    } else {
        UNIX_EPOCH
            .checked_sub(Duration::from_secs(t.unsigned_abs()))?
            .checked_add(nanos)
    }
}

/// Writes the file under a temporary name (created exclusively: never through an
/// existing link), fsyncs it, then renames it into place if nothing is there yet.
fn write_file(
    fs: &mut dyn FileSystem,
    src: &str,
    to: &Path,
    t: Option<SystemTime>,
    mode: Option<u32>,
) -> Result<u64> {
    if to.symlink_metadata().is_ok() {
        return Err(Error::Io(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!("{} already exists; not overwritten", to.display()),
        )));
    }
    let dir = to.parent().unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new()
        .prefix(".holdfast-")
        .suffix(".partial")
        .tempfile_in(dir)?;
    let file: File = tmp.as_file().try_clone()?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let n = fs.read_file(src, &mut w)?;
    w.flush()?;
    let file = w.into_inner().map_err(|e| e.into_error())?;
    // The source's permission bits (ext), without set-id bits; 0644 where the file
    // system has none (NTFS, FAT). The temporary file starts at 0600.
    use std::os::unix::fs::PermissionsExt;
    let bits = mode.map_or(0o644, |m| m & 0o777);
    file.set_permissions(std::fs::Permissions::from_mode(bits))?;
    file.sync_all()?;
    if let Some(t) = t {
        file.set_modified(t)?;
    }
    // `persist_noclobber` is link(2) + unlink: it fails rather than replace a name that
    // appeared meanwhile.
    tmp.persist_noclobber(to).map_err(|e| Error::Io(e.error))?;
    let _ = OpenOptions::new()
        .read(true)
        .open(dir)
        .and_then(|d| d.sync_all());
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Entry;
    use crate::probe::FsKind;
    use std::collections::BTreeMap;

    #[test]
    fn names_are_made_safe() {
        assert_eq!(safe_name("report.txt"), "report.txt");
        assert_eq!(safe_name("../etc/passwd"), ".._etc_passwd");
        assert_eq!(safe_name(".."), "_..");
        assert_eq!(safe_name("."), "_.");
        assert_eq!(safe_name(""), "_");
        assert_eq!(safe_name("a\\b\0c\nd"), "a_b_c_d");
        assert_eq!(safe_name("CON"), "_CON");
        assert_eq!(safe_name("nul.txt"), "_nul.txt");
        assert_eq!(safe_name("com1 .log"), "_com1 .log");
        assert_eq!(safe_name("CONSOLE"), "CONSOLE");
        assert_eq!(safe_name("résumé ü.txt"), "résumé ü.txt");
        let long = "é".repeat(200);
        let s = safe_name(&long);
        assert!(s.len() <= 255 && s.chars().all(|c| c == 'é'));
        // Bidirectional overrides and invisible characters never reach a written name.
        assert_eq!(safe_name("a\u{202e}txt.exe"), "a_txt.exe");
        assert_eq!(safe_name("x\u{200b}\u{feff}y"), "x__y");
    }

    #[test]
    fn suffixes_fit_in_255_bytes() {
        // 2-byte characters and an odd budget: the cut lands on a character boundary.
        let base = format!("x{}", "é".repeat(127));
        assert_eq!(base.len(), 255);
        let n = with_suffix(&base, 2);
        assert!(n.len() <= 255 && n.ends_with(" (2)"), "{} {n}", n.len());
        assert!(n.starts_with("xé"));
        assert_eq!(with_suffix("short", 12), "short (12)");
    }

    #[test]
    fn names_are_shown_escaped() {
        assert_eq!(shown("plain \\ name.txt"), "plain \\ name.txt");
        assert_eq!(shown("a\u{202e}txt.exe"), "a\\u{202e}txt.exe");
        assert_eq!(shown("new\nline\\x"), "new\\nline\\\\x");
        assert_eq!(
            shown("emoji \u{1f468}\u{200d}\u{1f469}"),
            "emoji \u{1f468}\u{200d}\u{1f469}"
        );
        // Messages quote names with `{:?}`: it escapes every character `shown` does.
        for c in (0u32..0x3_0000)
            .filter_map(char::from_u32)
            .filter(|c| hidden(*c))
        {
            let s = c.to_string();
            assert!(!format!("{s:?}").contains(c), "{:#x}", c as u32);
        }
    }

    /// An in-memory file system: path → (entry, content or link target).
    struct Mem(BTreeMap<String, (Entry, Vec<u8>)>);

    fn ent(name: &str, kind: EntryKind, id: u64) -> Entry {
        Entry {
            name: name.into(),
            kind,
            size: 0,
            mtime: Some(1_700_000_000),
            mtime_nanos: 5,
            mode: None,
            id,
        }
    }

    impl Mem {
        /// `dir` holds `names` (raw, possibly hostile).
        fn add(&mut self, dir: &str, name: &str, kind: EntryKind, data: &[u8]) {
            let id = self.0.len() as u64 + 2;
            let key = format!("{dir}\u{1}{name}");
            let mut e = ent(name, kind, id);
            e.size = data.len() as u64;
            self.0.insert(key, (e, data.to_vec()));
        }
        fn find(&self, path: &str) -> Result<(Entry, Vec<u8>)> {
            if path.trim_matches('/').is_empty() {
                return Ok((ent("", EntryKind::Dir, 1), vec![]));
            }
            // Test paths use `|` instead of `/` inside hostile names.
            let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
            self.0
                .get(&format!("{dir}\u{1}{name}"))
                .cloned()
                .ok_or_else(|| Error::NotFound(path.into()))
        }
    }

    impl FileSystem for Mem {
        fn kind(&self) -> FsKind {
            FsKind::Ext { version: 4 }
        }
        fn label(&self) -> Option<String> {
            None
        }
        fn list(&mut self, path: &str) -> Result<Vec<Entry>> {
            let dir = path.trim_end_matches('/');
            Ok(self
                .0
                .iter()
                .filter(|(k, _)| k.split_once('\u{1}').map(|x| x.0) == Some(dir))
                .map(|(_, (e, _))| e.clone())
                .collect())
        }
        fn stat(&mut self, path: &str) -> Result<Entry> {
            Ok(self.find(path)?.0)
        }
        fn read_link(&mut self, path: &str) -> Result<String> {
            Ok(String::from_utf8(self.find(path)?.1).unwrap())
        }
        fn read_file(&mut self, path: &str, out: &mut dyn Write) -> Result<u64> {
            let d = self.find(path)?.1;
            out.write_all(&d)?;
            Ok(d.len() as u64)
        }
    }

    #[test]
    fn hostile_names_stay_inside_the_target() {
        let mut m = Mem(BTreeMap::new());
        m.add("", "docs", EntryKind::Dir, b"");
        m.add("/docs", "a.txt", EntryKind::File, b"hello");
        m.add("/docs", "A.TXT", EntryKind::File, b"upper");
        m.add("", "..", EntryKind::File, b"dotdot");
        m.add("", "CON", EntryKind::File, b"con");
        m.add("", "x\\..\\..\\evil", EntryKind::File, b"evil");
        m.add("", "escape", EntryKind::Symlink, b"../../../../etc/passwd");
        m.add("", "evil/name", EntryKind::File, b"unreachable");
        let t = tempfile::tempdir().unwrap();
        let outer = t.path().join("out");
        std::fs::create_dir(&outer).unwrap();
        let mut r = Report::default();
        extract(&mut m, "/", &outer, &mut r).unwrap();
        // `..` and `evil/name` cannot be read by path: left out, reported, the rest
        // copied.
        assert_eq!((r.files, r.dirs, r.links), (4, 1, 1));
        let skipped: Vec<&str> = r.skipped.iter().map(|s| s.0.as_str()).collect();
        assert_eq!(skipped, ["/..", "/evil/name"]);
        // Listed first (`A` sorts before `a`), `A.TXT` keeps its name.
        assert_eq!(
            std::fs::read(outer.join("docs/a.txt (2)")).unwrap(),
            b"hello"
        );
        assert_eq!(std::fs::read(outer.join("docs/A.TXT")).unwrap(), b"upper");
        assert!(!outer.join("_..").exists());
        assert_eq!(std::fs::read(outer.join("_CON")).unwrap(), b"con");
        assert_eq!(std::fs::read(outer.join("x_.._.._evil")).unwrap(), b"evil");
        let link = outer.join("escape");
        assert!(link.symlink_metadata().unwrap().file_type().is_symlink());
        assert_eq!(
            std::fs::read_link(&link).unwrap(),
            Path::new("../../../../etc/passwd")
        );
        // Nothing outside `out`, no temporary files left.
        let top: Vec<_> = std::fs::read_dir(t.path()).unwrap().collect();
        assert_eq!(top.len(), 1);
        assert!(
            std::fs::read_dir(&outer).unwrap().all(|e| !e
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains("partial"))
        );
        let mt = std::fs::metadata(outer.join("docs/A.TXT"))
            .unwrap()
            .modified()
            .unwrap();
        assert_eq!(mt, UNIX_EPOCH + Duration::new(1_700_000_000, 5));
        assert_eq!(r.renamed.len(), 3, "{:?}", r.renamed);
        // A second extraction overwrites nothing: the name taken gets a suffix.
        let mut r = Report::default();
        extract(&mut m, "/docs/A.TXT", &outer.join("docs"), &mut r).unwrap();
        assert_eq!(std::fs::read(outer.join("docs/A.TXT")).unwrap(), b"upper");
        assert_eq!(
            std::fs::read(outer.join("docs/A.TXT (2)")).unwrap(),
            b"upper"
        );
        assert_eq!(r.renamed[0].why, "the name is taken in the target folder");
    }

    #[test]
    fn items_with_one_name_all_land() {
        let mut m = Mem(BTreeMap::new());
        for (d, data) in [("libc-bin", "c"), ("bash", "b"), ("Bash2", "B")] {
            m.add("", d, EntryKind::Dir, b"");
            m.add(
                &format!("/{d}"),
                "copyright",
                EntryKind::File,
                data.as_bytes(),
            );
        }
        // Two 255-byte names that differ only in case.
        let long = "n".repeat(255);
        m.add("/bash", &long, EntryKind::File, b"lower");
        m.add("/bash", &long.to_uppercase(), EntryKind::File, b"upper");
        let t = tempfile::tempdir().unwrap();
        let mut r = Report::default();
        let items = ["/libc-bin/copyright", "/bash/copyright", "/Bash2/copyright"];
        extract_all(&mut m, &items, t.path(), &mut r).unwrap();
        let read = |n: &str| std::fs::read_to_string(t.path().join(n)).unwrap();
        assert_eq!(read("copyright"), "c");
        assert_eq!(read("copyright (2)"), "b");
        assert_eq!(read("copyright (3)"), "B");
        let lines: Vec<String> = r.lines().collect();
        assert!(
            lines[0].starts_with("\"/bash/copyright\" saved as \"copyright (2)\""),
            "{lines:?}"
        );
        let mut r = Report::default();
        extract(&mut m, "/bash", t.path(), &mut r).unwrap();
        let cut = format!("{} (2)", &"n".repeat(251));
        assert_eq!(read(&format!("bash/{}", long.to_uppercase())), "upper");
        assert_eq!(read(&format!("bash/{cut}")), "lower");
    }

    #[test]
    fn a_failed_copy_removes_what_it_made() {
        let mut m = Mem(BTreeMap::new());
        m.add("", "d", EntryKind::Dir, b"");
        m.add("/d", "f", EntryKind::File, b"x");
        m.add("", "g", EntryKind::File, b"y");
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("mine"), b"keep").unwrap();
        let mut r = Report::default();
        let e = extract_all(&mut m, &["/d", "/g", "/missing"], t.path(), &mut r).unwrap_err();
        assert!(matches!(e, Error::NotFound(_)), "{e}");
        let left: Vec<_> = std::fs::read_dir(t.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["mine"]);
    }

    #[test]
    fn existing_links_in_the_target_are_not_followed() {
        let mut m = Mem(BTreeMap::new());
        m.add("", "f", EntryKind::File, b"data");
        let t = tempfile::tempdir().unwrap();
        let victim = t.path().join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        let out = t.path().join("out");
        std::fs::create_dir(&out).unwrap();
        std::os::unix::fs::symlink(&victim, out.join("f")).unwrap();
        extract(&mut m, "/f", &out, &mut Report::default()).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        assert_eq!(std::fs::read(out.join("f (2)")).unwrap(), b"data");
    }

    #[test]
    fn paths_that_climb_are_refused() {
        let mut m = Mem(BTreeMap::new());
        let t = tempfile::tempdir().unwrap();
        let e = extract(&mut m, "/a/../..", t.path(), &mut Report::default()).unwrap_err();
        assert!(matches!(e, Error::BadPath(_)), "{e}");
    }
}
