//! ext2/3/4, read-only. Most volumes go through the `ext4-view` crate (extents, block
//! maps, htree directories, journal replay in memory; it never writes). ext4-view 1.0
//! refuses a file system with `inline_data` (small files and folders stored inside their
//! inode), `large_dir`, `meta_bg`, `ea_inode`, `dirdata` or `mmp`, or without
//! `filetype`: [`open`] sends those to our own reader, [`crate::ext_own`], which reads
//! inline data (in `i_block` and the in-inode `system.data` attribute), extents, block
//! maps and linear directories, but does not replay the journal (it refuses a journal
//! that holds transactions). Both share the helpers of [`crate::ext_common`].
//!
//! Limits of ext4-view 1.0 this file works around:
//! - `Ext4` is built on `Rc`/`RefCell`, so it is not `Send`; [`ExtFs`] owns the only
//!   handle and asserts `Send` (see the SAFETY note there).
//! - Inode numbers are not public. A regular file's inode number is read from the
//!   `Debug` output of an opened `File` (the only place it shows); directories and
//!   symlinks (never hard-linked in practice) get a hash of their path with the top bit
//!   set, so it cannot collide with an inode number (those are `u32`).
//! - Names are bytes; lists decode them lossily. A path component holding U+FFFD is
//!   matched against the lossy names of its directory, so listed names can be opened.
//! - It reads `s_blocks_count_hi` even without the 64bit feature; such a volume (with a
//!   stray value there) goes to the own reader too.

use crate::ext_common::{MAX_LINK, ROOT_INODE, check_size, ext_entry};
use crate::fs::{Entry, EntryKind, FileSystem, READ_CHUNK, fnv1a};
use crate::probe::FsKind;
use crate::volume::Volume;
use crate::{Error, Result};
use ext4_view::{Ext4, Ext4Error, Ext4Read, Metadata};
use std::io::Write;
use std::panic::{AssertUnwindSafe, catch_unwind};

/// `Ext4Read` over a volume (a clone: clones share the cache).
struct Reader(Volume);

impl Ext4Read for Reader {
    fn read(
        &mut self,
        start_byte: u64,
        dst: &mut [u8],
    ) -> std::result::Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        self.0.read_at(dst, start_byte).map_err(Box::new)?;
        Ok(())
    }
}

struct ExtFs {
    fs: Ext4,
    kind: FsKind,
    label: Option<String>,
}

// SAFETY: `Ext4` is `!Send` only because it is an `Rc` around `RefCell`s (and a boxed
// reader, here `Reader`, which is `Send`). `ExtFs` holds the only `Ext4` handle: every
// value that clones the `Rc` (`File`, `ReadDir`, `DirEntry`) is a local of one method
// call and dropped before it returns, so no reference count or cell is ever shared
// between threads; the whole object graph moves together.
unsafe impl Send for ExtFs {}

/// The SAFETY argument above needs the reader to be `Send` (a change to `Volume` that
/// broke it would fail to build here).
const _: fn() = || {
    fn send<T: Send>() {}
    send::<Reader>();
};

pub fn open(volume: Volume, kind: FsKind) -> Result<Box<dyn FileSystem>> {
    check_size(&volume)?;
    let mut sb = [0u8; 1024];
    volume.read_at(&mut sb, 1024)?;
    let incompat = crate::le32(&sb, 0x60);
    // ext4-view reads `s_blocks_count_hi` even without the 64bit feature (where it
    // means nothing and the kernel ignores it): a stray value there would make it size
    // its group table by billions of groups. The own reader ignores it, as the kernel.
    let stray_hi = incompat & 0x80 == 0 && crate::le32(&sb, 0x150) != 0;
    if crate::ext_own::wants(incompat) || stray_hi {
        return crate::ext_own::open(volume, kind);
    }
    let fs = guard(|| Ext4::load(Box::new(Reader(volume))).map_err(|e| map_err(e, "/")))?;
    let label = fs.label().display().to_string().trim().to_string();
    Ok(Box::new(ExtFs {
        fs,
        kind,
        label: (!label.is_empty()).then_some(label),
    }))
}

/// Runs `f`, turning a panic inside ext4-view (on data it did not expect) into an error:
/// a damaged image must never take the caller down.
fn guard<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|_| {
        Err(Error::corrupt(
            "ext4 file system",
            0,
            "the reader failed on unexpected data",
        ))
    })
}

/// ext4-view's error, for `path`, as this crate's.
fn map_err(e: Ext4Error, path: &str) -> Error {
    match e {
        Ext4Error::NotFound => Error::NotFound(path.to_string()),
        Ext4Error::NotADirectory => Error::WrongKind(format!("{path}: not a directory")),
        Ext4Error::IsADirectory => Error::WrongKind(format!("{path}: is a directory")),
        Ext4Error::IsASpecialFile => Error::WrongKind(format!("{path}: not a regular file")),
        Ext4Error::NotASymlink => Error::WrongKind(format!("{path}: not a symbolic link")),
        Ext4Error::NotAbsolute | Ext4Error::MalformedPath | Ext4Error::PathTooLong => {
            Error::BadPath(format!("{path}: {e}"))
        }
        Ext4Error::TooManySymlinks => Error::BadPath(format!("{path}: {e}")),
        Ext4Error::Encrypted => Error::Unsupported(format!("{path}: ext4 encrypted file")),
        Ext4Error::Io(inner) => Error::Io(std::io::Error::other(inner)),
        Ext4Error::Incompatible(i) => Error::Unsupported(format!("ext4: {i}")),
        other => Error::corrupt("ext4 file system", 0, format!("{path}: {other}")),
    }
}

fn kind_of(m: &Metadata) -> EntryKind {
    let t = m.file_type();
    if t.is_regular_file() {
        EntryKind::File
    } else if t.is_dir() {
        EntryKind::Dir
    } else if t.is_symlink() {
        EntryKind::Symlink
    } else {
        EntryKind::Other
    }
}

/// Id for an entry whose inode number ext4-view does not tell: the path's hash, top bit
/// set (inode numbers are 32-bit, so the two never meet).
fn path_id(path: &[u8]) -> u64 {
    fnv1a(path) | (1 << 63)
}

/// The inode number in `File`'s `Debug` output (`File { inode: 12, position: 0, .. }`).
fn inode_from_debug(debug: &str) -> Option<u64> {
    let rest = &debug[debug.find("inode: ")? + "inode: ".len()..];
    let digits: &str = &rest[..rest.find(|c: char| !c.is_ascii_digit())?];
    digits.parse().ok().filter(|n| *n != 0)
}

fn entry(name: &[u8], m: &Metadata, id: u64) -> Entry {
    ext_entry(
        name,
        kind_of(m),
        m.len(),
        m.modified().seconds(),
        m.modified().nanoseconds(),
        u32::from(m.mode()),
        id,
    )
}

/// Whether the raw name `raw` is what the path component `c` asks for: the same bytes,
/// or, when `c` holds U+FFFD (a listed name that was not UTF-8), the same lossy
/// decoding.
pub(crate) fn name_matches(raw: &[u8], c: &str) -> bool {
    if c.contains('\u{FFFD}') {
        String::from_utf8_lossy(raw) == c
    } else {
        raw == c.as_bytes()
    }
}

impl ExtFs {
    /// The on-disk (byte) path for `path`: components joined, each U+FFFD-holding one
    /// replaced by the raw name it was listed from.
    fn resolve(&self, path: &str) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(path.len() + 1);
        for c in crate::components(path)? {
            let raw = if c.contains('\u{FFFD}') {
                self.raw_name(&out, c, path)?
            } else {
                c.as_bytes().to_vec()
            };
            out.push(b'/');
            out.extend_from_slice(&raw);
        }
        if out.is_empty() {
            out.push(b'/');
        }
        Ok(out)
    }

    /// The raw name in directory `dir` whose lossy decoding is `lossy`.
    fn raw_name(&self, dir: &[u8], lossy: &str, path: &str) -> Result<Vec<u8>> {
        let dir_path = if dir.is_empty() { &b"/"[..] } else { dir };
        let rd = self
            .fs
            .read_dir(ext_path(dir_path, path)?)
            .map_err(|e| map_err(e, path))?;
        for e in rd {
            let e = e.map_err(|e| map_err(e, path))?;
            let raw = e.file_name().as_ref().to_vec();
            if name_matches(&raw, lossy) {
                return Ok(raw);
            }
        }
        Err(Error::NotFound(path.to_string()))
    }

    /// The id of the entry at `raw` (already known to have metadata `m`).
    fn id_of(&self, raw: &[u8], m: &Metadata, path: &str) -> Result<u64> {
        if raw == b"/" {
            return Ok(ROOT_INODE);
        }
        if m.file_type().is_regular_file() {
            let f = self
                .fs
                .open(ext_path(raw, path)?)
                .map_err(|e| map_err(e, path))?;
            if let Some(n) = inode_from_debug(&format!("{f:?}")) {
                return Ok(n);
            }
        }
        Ok(path_id(raw))
    }
}

fn ext_path<'a>(raw: &'a [u8], path: &str) -> Result<ext4_view::Path<'a>> {
    ext4_view::Path::try_from(raw).map_err(|e| Error::BadPath(format!("{path}: {e}")))
}

impl FileSystem for ExtFs {
    fn kind(&self) -> FsKind {
        self.kind
    }

    fn label(&self) -> Option<String> {
        self.label.clone()
    }

    fn list(&mut self, path: &str) -> Result<Vec<Entry>> {
        guard(|| {
            let raw = self.resolve(path)?;
            let rd = self
                .fs
                .read_dir(ext_path(&raw, path)?)
                .map_err(|e| map_err(e, path))?;
            let mut out = Vec::new();
            for e in rd {
                let e = e.map_err(|e| map_err(e, path))?;
                let name = e.file_name();
                let name = name.as_ref();
                if name == b"." || name == b".." {
                    continue;
                }
                let m = e.metadata().map_err(|e| map_err(e, path))?;
                let child = e.path();
                let id = self.id_of(child.as_ref(), &m, path)?;
                out.push(entry(name, &m, id));
            }
            Ok(out)
        })
    }

    fn stat(&mut self, path: &str) -> Result<Entry> {
        guard(|| {
            let raw = self.resolve(path)?;
            let m = self
                .fs
                .symlink_metadata(ext_path(&raw, path)?)
                .map_err(|e| map_err(e, path))?;
            let name = match raw.iter().rposition(|b| *b == b'/') {
                Some(i) => &raw[i + 1..],
                None => &[][..],
            };
            let id = self.id_of(&raw, &m, path)?;
            Ok(entry(name, &m, id))
        })
    }

    fn read_link(&mut self, path: &str) -> Result<String> {
        guard(|| {
            let raw = self.resolve(path)?;
            let p = ext_path(&raw, path)?;
            // ext4-view allocates the link's size before reading it: refuse a size no
            // link target has (a fuzzer found a damaged inode claiming a terabyte).
            let m = self.fs.symlink_metadata(p).map_err(|e| map_err(e, path))?;
            if m.is_symlink() && m.len() > MAX_LINK {
                return Err(Error::corrupt(
                    "ext4 symlink",
                    0,
                    format!("{path}: a target of {} bytes", m.len()),
                ));
            }
            let target = self.fs.read_link(p).map_err(|e| map_err(e, path))?;
            Ok(String::from_utf8_lossy(target.as_ref()).into_owned())
        })
    }

    fn read_file(&mut self, path: &str, out: &mut dyn Write) -> Result<u64> {
        guard(|| {
            let raw = self.resolve(path)?;
            let p = ext_path(&raw, path)?;
            // `open` follows links; a link is not a file's content here.
            let m = self.fs.symlink_metadata(p).map_err(|e| map_err(e, path))?;
            if m.is_symlink() {
                return Err(Error::WrongKind(format!("{path}: is a symbolic link")));
            }
            let mut f = self.fs.open(p).map_err(|e| map_err(e, path))?;
            let want = f.metadata().len();
            let mut buf = vec![0u8; READ_CHUNK];
            let mut done = 0u64;
            loop {
                let n = f.read_bytes(&mut buf).map_err(|e| map_err(e, path))?;
                if n == 0 {
                    break;
                }
                out.write_all(&buf[..n])?;
                done = done.saturating_add(n as u64);
            }
            if done != want {
                return Err(Error::corrupt(
                    "ext4 file",
                    0,
                    format!("{path}: {done} bytes read of {want}"),
                ));
            }
            Ok(done)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inode_number_from_file_debug() {
        assert_eq!(
            inode_from_debug("File { inode: 12, position: 0, .. }"),
            Some(12)
        );
        assert_eq!(inode_from_debug("File { inode: 0, .. }"), None);
        assert_eq!(inode_from_debug("File { position: 0 }"), None);
        assert_eq!(inode_from_debug("File { inode: x }"), None);
        assert_eq!(inode_from_debug("inode: 7"), None, "no terminator");
    }

    #[test]
    fn path_ids_never_look_like_inode_numbers() {
        assert!(path_id(b"/a") > u64::from(u32::MAX));
        assert_eq!(path_id(b"/a"), path_id(b"/a"));
        assert_ne!(path_id(b"/a"), path_id(b"/b"));
    }

    #[test]
    fn errors_map_to_kinds() {
        assert!(matches!(map_err(Ext4Error::NotFound, "/x"), Error::NotFound(p) if p == "/x"));
        assert!(matches!(
            map_err(Ext4Error::NotADirectory, "/x"),
            Error::WrongKind(_)
        ));
        assert!(matches!(
            map_err(Ext4Error::MalformedPath, "/x"),
            Error::BadPath(_)
        ));
        assert!(matches!(
            map_err(Ext4Error::FileTooLarge, "/x"),
            Error::Corrupt { .. }
        ));
    }
}
