//! The read-only file-system interface item-level recovery uses, whatever the file
//! system: list a directory, stat a path, stream a file, read a link.

use crate::probe::FsKind;
use crate::{Error, Result};
use std::io::Write;

/// Bytes per read when streaming a file: bounded memory whatever the file size.
pub(crate) const READ_CHUNK: usize = 1 << 20;

/// What a directory entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    /// Devices, sockets, FIFOs, reparse points other than links.
    Other,
}

impl EntryKind {
    pub fn name(&self) -> &'static str {
        match self {
            EntryKind::File => "file",
            EntryKind::Dir => "dir",
            EntryKind::Symlink => "symlink",
            EntryKind::Other => "other",
        }
    }
}

/// One directory entry (or the result of [`FileSystem::stat`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The name as stored, decoded from the file system's encoding; undecodable units
    /// become U+FFFD. Never `.` or `..` (lists leave those out). May hold characters
    /// that are unsafe on the target (`/`, `\`, NUL...): extraction sanitises.
    pub name: String,
    pub kind: EntryKind,
    /// Bytes of content (files), link target length (symlinks), 0 otherwise.
    pub size: u64,
    /// Last modification, seconds since the Unix epoch, and the sub-second part.
    pub mtime: Option<i64>,
    pub mtime_nanos: u32,
    /// Unix permission bits (ext), if the file system has them.
    pub mode: Option<u32>,
    /// The file's identity inside the file system (inode, MFT record, first cluster):
    /// hard links share it.
    pub id: u64,
}

impl Entry {
    /// The root folder's entry (named "", no times) with the file system's `id` for it.
    pub fn root(id: u64) -> Entry {
        Entry {
            name: String::new(),
            kind: EntryKind::Dir,
            size: 0,
            mtime: None,
            mtime_nanos: 0,
            mode: None,
            id,
        }
    }
}

/// A file system opened read-only on a [`Volume`].
///
/// Paths are `/`-separated from the root (`/`, `/Windows/System32`); a leading `/` is
/// optional. Name matching follows the file system (case-insensitive on NTFS, FAT
/// and exFAT). A missing path is [`Error::NotFound`].
pub trait FileSystem: Send {
    fn kind(&self) -> FsKind;
    /// The volume label, if the file system has one.
    fn label(&self) -> Option<String>;
    /// The entries of the directory at `path`, in on-disk order.
    fn list(&mut self, path: &str) -> Result<Vec<Entry>>;
    /// The entry `path` names (the root is a directory named "").
    fn stat(&mut self, path: &str) -> Result<Entry>;
    /// The target of the symbolic link at `path`.
    fn read_link(&mut self, path: &str) -> Result<String>;
    /// Writes the content of the file at `path` to `out` (sparse ranges as zeros,
    /// compressed files decompressed) and returns the bytes written.
    fn read_file(&mut self, path: &str, out: &mut dyn Write) -> Result<u64>;
    /// Byte ranges of the volume holding the file's data, `(offset, length)`, when the
    /// file system can tell (NTFS non-resident, uncompressed data); `None` otherwise.
    /// Used to leave page files out of backups.
    fn data_ranges(&mut self, path: &str) -> Result<Option<Vec<(u64, u64)>>> {
        let _ = path;
        Ok(None)
    }
}

/// FNV-1a: a stable hash for entry ids where the file system gives none (the same id
/// for the same path on every run and build).
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Names equal without case (full Unicode upper-casing, not a volume's own up-case
/// table).
pub(crate) fn eq_ci(a: &str, b: &str) -> bool {
    a.chars()
        .flat_map(char::to_uppercase)
        .eq(b.chars().flat_map(char::to_uppercase))
}

/// The one rule by which a path component names an entry of a folder, for every
/// reader, `ilr ls` and `ilr get`, local and through the server: the entry whose
/// stored name is `wanted` exactly; else, when the file system ignores case (NTFS, FAT,
/// exFAT: [`FsKind::ignores_case`]), the first whose name equals it without case. The
/// exact match first means two entries that differ only in case (possible on a
/// crafted volume, or POSIX names on NTFS) are each found as themselves.
pub fn find_name<'a, T>(
    items: &'a [T],
    wanted: &str,
    ignore_case: bool,
    name: impl Fn(&T) -> std::borrow::Cow<'_, str>,
) -> Option<&'a T> {
    items.iter().find(|i| name(i) == wanted).or_else(|| {
        ignore_case
            .then(|| items.iter().find(|i| eq_ci(&name(i), wanted)))
            .flatten()
    })
}

/// Splits a path into its components, refusing `.`/`..`, so a path never climbs.
pub fn components(path: &str) -> Result<Vec<&str>> {
    let mut out = Vec::new();
    for c in path.split('/') {
        match c {
            "" => {}
            "." | ".." => {
                return Err(Error::BadPath(format!(
                    "{path:?}: `.` and `..` are not allowed"
                )));
            }
            c => out.push(c),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_exactly_first() {
        let names = ["REPORT.TXT", "report.txt", "Other"];
        let f = |ci, w| find_name(&names, w, ci, |n| (*n).into()).copied();
        assert_eq!(f(true, "report.txt"), Some("report.txt"));
        assert_eq!(f(true, "REPORT.TXT"), Some("REPORT.TXT"));
        assert_eq!(f(true, "Report.Txt"), Some("REPORT.TXT"));
        assert_eq!(f(false, "Report.Txt"), None);
        assert_eq!(f(false, "Other"), Some("Other"));
        assert_eq!(f(true, "othe"), None);
    }

    #[test]
    fn names_compare_without_case() {
        // From the exFAT and FAT readers, which both match names with it.
        assert!(eq_ci("Ärger.TXT", "ärger.txt"));
        assert!(!eq_ci("a", "ab"));
        assert!(eq_ci("Résumé.TXT", "résumé.txt"));
        assert!(!eq_ci("a.txt", "a.txt2"));
    }

    #[test]
    fn components_refuse_climbing() {
        assert_eq!(components("/a//b/").unwrap(), vec!["a", "b"]);
        assert!(components("/").unwrap().is_empty());
        assert!(components("a/../b").is_err());
        assert!(components("./a").is_err());
    }
}
