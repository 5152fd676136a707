//! Copying files and folders out of a [`FileSystem`] into a local folder, safely: names
//! from a backed-up (possibly hostile) disk never choose where a file lands.
//!
//! - Every name is made safe ([`safe_name`]): `/`, `\`, NUL and control characters
//!   become `_`; `.`, `..` and empty names are renamed; reserved Windows device names
//!   (`CON`, `NUL`, `COM1`...) get a `_` prefix; names longer than 255 bytes are cut.
//!   Two names that become equal are told apart with ` (2)`, ` (3)`...
//! - Nothing is ever written through an existing path: directories are created new,
//!   files are written under a temporary name created exclusively and renamed at the
//!   end (rename replaces a name, it never follows a link), and symbolic links are
//!   recreated as links (their targets are not looked at, never followed).
//! - An entry that already exists in the target is an error, not an overwrite.
//! - Depth is bounded and a directory that contains itself (a corrupt image) is
//!   refused, so a hostile image cannot make extraction loop.

use crate::fs::{EntryKind, FileSystem, components};
use crate::{Error, Result};
use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Deepest folder nesting extracted.
pub const MAX_DEPTH: usize = 256;

/// What [`extract`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub files: u64,
    pub dirs: u64,
    pub links: u64,
    pub bytes: u64,
    /// Entries of other kinds (devices, sockets) left out, by source path.
    pub skipped: Vec<String>,
    /// Source path → the name it was given, for every name that had to change.
    pub renamed: Vec<(String, String)>,
}

const RESERVED: [&str; 22] = [
    "CON", "PRN", "AUX", "NUL", "COM1", "COM2", "COM3", "COM4", "COM5", "COM6", "COM7", "COM8",
    "COM9", "LPT1", "LPT2", "LPT3", "LPT4", "LPT5", "LPT6", "LPT7", "LPT8", "LPT9",
];

/// `name` as a safe single path component (see the module documentation).
pub fn safe_name(name: &str) -> String {
    let mut s: String = name
        .chars()
        .map(|c| match c {
            '/' | '\\' | '\0' => '_',
            c if c.is_control() => '_',
            c => c,
        })
        .collect();
    if s.is_empty() || s == "." || s == ".." {
        s = format!("_{s}");
    }
    let stem = s.split('.').next().unwrap_or("").trim_end();
    if RESERVED.iter().any(|r| r.eq_ignore_ascii_case(stem)) {
        s.insert(0, '_');
    }
    if s.len() > 255 {
        let mut cut = 255;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// Copies the file, folder (recursively) or symlink at `path` of `fs` into the folder
/// `target` (which must exist), under its own (made safe) name. The root (`/`) copies
/// the whole file system's contents into `target`.
pub fn extract(
    fs: &mut dyn FileSystem,
    path: &str,
    target: &Path,
    report: &mut Report,
) -> Result<()> {
    let parts = components(path)?;
    let entry = fs.stat(path)?;
    let mut seen = HashSet::new();
    match parts.last() {
        None => {
            seen.insert(entry.id);
            copy_children(fs, "", target, 0, &mut seen, report)
        }
        Some(last) => {
            let mut taken = HashSet::new();
            let src = format!("/{}", parts.join("/"));
            let name = unique(last, &mut taken, &src, report);
            copy_entry(fs, &src, &entry, &target.join(name), 0, &mut seen, report)
        }
    }
}

fn unique(name: &str, taken: &mut HashSet<String>, src: &str, report: &mut Report) -> String {
    let base = safe_name(name);
    let mut out = base.clone();
    let mut n = 2u32;
    // Compare case-insensitively: the target may be a case-insensitive file system.
    while !taken.insert(out.to_lowercase()) {
        out = format!("{base} ({n})");
        n = n.saturating_add(1);
    }
    if out != name {
        report.renamed.push((src.to_string(), out.clone()));
    }
    out
}

fn copy_children(
    fs: &mut dyn FileSystem,
    dir: &str,
    to: &Path,
    depth: usize,
    seen: &mut HashSet<u64>,
    report: &mut Report,
) -> Result<()> {
    if depth >= MAX_DEPTH {
        return Err(Error::Unsupported(format!(
            "{dir}: folders nested deeper than {MAX_DEPTH} levels"
        )));
    }
    let mut taken = HashSet::new();
    for e in fs.list(if dir.is_empty() { "/" } else { dir })? {
        let src = format!("{dir}/{}", e.name);
        let name = unique(&e.name, &mut taken, &src, report);
        copy_entry(fs, &src, &e, &to.join(name), depth + 1, seen, report)?;
    }
    Ok(())
}

fn copy_entry(
    fs: &mut dyn FileSystem,
    src: &str,
    e: &crate::Entry,
    to: &Path,
    depth: usize,
    seen: &mut HashSet<u64>,
    report: &mut Report,
) -> Result<()> {
    let exists = |p: &Path| {
        Error::Io(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!("{} already exists; not overwritten", p.display()),
        ))
    };
    match e.kind {
        EntryKind::Dir => {
            if !seen.insert(e.id) {
                return Err(Error::corrupt(
                    format!("folder {src}"),
                    0,
                    "contains itself (a loop in the directory tree)",
                ));
            }
            std::fs::create_dir(to).map_err(|err| match err.kind() {
                std::io::ErrorKind::AlreadyExists => exists(to),
                _ => err.into(),
            })?;
            report.dirs += 1;
            copy_children(fs, src, to, depth, seen, report)?;
            seen.remove(&e.id);
            // After the children: writing them changed the folder's time.
            if let Some(t) = mtime(e) {
                File::open(to)?.set_modified(t)?;
            }
        }
        EntryKind::File => {
            let n = write_file(fs, src, to, mtime(e), e.mode)?;
            report.files += 1;
            report.bytes = report.bytes.saturating_add(n);
        }
        EntryKind::Symlink => {
            let target = fs.read_link(src)?;
            if target.contains('\0') {
                return Err(Error::corrupt(
                    format!("symlink {src}"),
                    0,
                    "target holds NUL",
                ));
            }
            std::os::unix::fs::symlink(&target, to).map_err(|err| match err.kind() {
                std::io::ErrorKind::AlreadyExists => exists(to),
                _ => err.into(),
            })?;
            report.links += 1;
        }
        EntryKind::Other => report.skipped.push(src.to_string()),
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
        let t = tempfile::tempdir().unwrap();
        let outer = t.path().join("out");
        std::fs::create_dir(&outer).unwrap();
        let mut r = Report::default();
        extract(&mut m, "/", &outer, &mut r).unwrap();
        assert_eq!((r.files, r.dirs, r.links), (5, 1, 1));
        // Listed first (`A` sorts before `a`), `A.TXT` keeps its name.
        assert_eq!(
            std::fs::read(outer.join("docs/a.txt (2)")).unwrap(),
            b"hello"
        );
        assert_eq!(std::fs::read(outer.join("docs/A.TXT")).unwrap(), b"upper");
        assert_eq!(std::fs::read(outer.join("_..")).unwrap(), b"dotdot");
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
        assert_eq!(r.renamed.len(), 4, "{:?}", r.renamed);
        // A second extraction does not overwrite anything.
        let e = extract(
            &mut m,
            "/docs/A.TXT",
            &outer.join("docs"),
            &mut Report::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("already exists"), "{e}");
        assert_eq!(std::fs::read(outer.join("docs/A.TXT")).unwrap(), b"upper");
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
        assert!(extract(&mut m, "/f", &out, &mut Report::default()).is_err());
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
    }

    #[test]
    fn paths_that_climb_are_refused() {
        let mut m = Mem(BTreeMap::new());
        let t = tempfile::tempdir().unwrap();
        let e = extract(&mut m, "/a/../..", t.path(), &mut Report::default()).unwrap_err();
        assert!(matches!(e, Error::BadPath(_)), "{e}");
    }
}
