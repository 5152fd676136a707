//! Storage access: a small key/value interface, so an object store (Azure Blob, S3) can
//! take the place of a local folder without changing the format's logic.
//!
//! Keys are `/`-separated relative names (`packs/ab/ab12…`, `points/…`). Every write is
//! atomic and durable when it returns: readers see the whole object or nothing.

use crate::error::{Error, Result};
use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// One stored object, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub size: u64,
}

/// Held while a backup, verify or prune runs (shared) or while gc runs (exclusive).
pub trait LockGuard: Send + std::fmt::Debug {}

/// A server's lifetime hold of the datastore's lease ([`Backend::hold`]).
pub trait LeaseHold: Send + Sync + std::fmt::Debug {
    /// Why the lease is gone (another server took it over), once it is: every write
    /// fails from then on.
    fn lost(&self) -> Option<String>;
}

/// A write started by [`Backend::stage`], made durable and visible by `commit`.
pub trait Staged: Send {
    fn commit(self: Box<Self>) -> Result<()>;
}

/// Where a datastore's objects live.
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// Stores `data` under `key`, replacing any object there; atomic and durable.
    fn put(&self, key: &str, data: &[u8]) -> Result<()>;
    /// Starts storing `data` under `key`; the object appears (durably) only when the
    /// returned handle is committed. Lets a backup write many packs and wait for the
    /// disk once. The default stores at once.
    fn stage(&self, key: &str, data: &[u8]) -> Result<Box<dyn Staged>> {
        self.put(key, data)?;
        Ok(Box::new(AlreadyStored))
    }
    /// Stores `data` under `key` only if nothing is there; `Ok(false)` when it was.
    fn put_new(&self, key: &str, data: &[u8]) -> Result<bool>;
    /// The whole object.
    fn get(&self, key: &str) -> Result<Vec<u8>>;
    /// `buf.len()` bytes of the object from `offset`; a short object is an error.
    fn get_range(&self, key: &str, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// Every object whose key starts with `prefix` (a folder, ending in `/`), sorted.
    fn list(&self, prefix: &str) -> Result<Vec<Entry>>;
    /// Removes an object; removing a missing one is not an error.
    fn delete(&self, key: &str) -> Result<()>;
    /// Whether an object exists.
    fn exists(&self, key: &str) -> Result<bool>;
    /// Takes the datastore lock: shared (backups, verify, prune) or exclusive (gc).
    /// Without `wait`, a conflicting holder makes this fail at once.
    fn lock(&self, exclusive: bool, wait: bool) -> Result<Box<dyn LockGuard>>;
    /// Takes the lock that keeps other servers out for as long as the returned hold
    /// lives, without waiting for another holder and without conflicting with this
    /// process's own [`Backend::lock`] guards. `None` where each operation's lock is
    /// enough (a folder: `flock` ends with its process).
    fn hold(&self) -> Result<Option<Box<dyn LeaseHold>>> {
        Ok(None)
    }
    /// Removes what interrupted writes left behind (temporary objects); returns the
    /// bytes freed. Only called under the exclusive lock.
    fn remove_leftovers(&self) -> Result<u64>;
    /// A human-readable location for messages.
    fn location(&self) -> String;
}

struct AlreadyStored;

impl Staged for AlreadyStored {
    fn commit(self: Box<Self>) -> Result<()> {
        Ok(())
    }
}

/// A datastore in a local folder. Writes go to `.NAME.tmp-PID-N`, are fsynced, renamed
/// into place, and the folder is fsynced.
#[derive(Debug)]
pub struct LocalBackend {
    root: PathBuf,
    /// Open read handles of recently read objects (packs are read many times in a row).
    handles: Mutex<HashMap<String, Arc<File>>>,
}

const MAX_HANDLES: usize = 128;
const TMP_MARK: &str = ".tmp-";

impl LocalBackend {
    pub fn new(root: &Path) -> LocalBackend {
        LocalBackend {
            root: root.to_path_buf(),
            handles: Mutex::new(HashMap::new()),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> Result<PathBuf> {
        if key.is_empty()
            || key.starts_with('/')
            || key
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == ".." || c.starts_with('.'))
        {
            return Err(Error::Invalid(format!("invalid datastore key {key:?}")));
        }
        Ok(self.root.join(key))
    }

    fn handle(&self, key: &str) -> Result<Arc<File>> {
        if let Some(f) = self.lock_handles().get(key) {
            return Ok(f.clone());
        }
        let path = self.path(key)?;
        let f = Arc::new(File::open(&path).map_err(|e| not_found(key, &path, "open", e))?);
        let mut h = self.lock_handles();
        if h.len() >= MAX_HANDLES {
            h.clear();
        }
        h.insert(key.to_string(), f.clone());
        Ok(f)
    }

    fn lock_handles(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<File>>> {
        locks::lock(&self.handles)
    }

    /// Writes `data` to a fresh temporary file beside `path` and fsyncs it.
    fn write_temp(&self, path: &Path, data: &[u8]) -> Result<vdisk::copy::TempPath> {
        let (tmp, f) = self.write_temp_nosync(path, data)?;
        f.sync_all()
            .map_err(|e| Error::io(tmp.path(), "fsync", e))?;
        Ok(tmp)
    }

    fn write_temp_nosync(&self, path: &Path, data: &[u8]) -> Result<(vdisk::copy::TempPath, File)> {
        let dir = path.parent().unwrap_or(&self.root);
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, "create folder", e))?;
        let tmp = vdisk::copy::TempPath::next_to(path)?;
        let mut f = File::create(tmp.path()).map_err(|e| Error::io(tmp.path(), "create", e))?;
        // 128 KiB writes: one large write makes Linux allocate large page-cache folios,
        // which is several times slower here (docs/performance.md).
        data.chunks(128 << 10)
            .try_for_each(|c| f.write_all(c))
            .map_err(|e| Error::io(tmp.path(), "write", e))?;
        Ok((tmp, f))
    }
}

fn not_found(key: &str, path: &Path, op: &'static str, e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::NotFound {
        Error::Missing { key: key.into() }
    } else {
        Error::io(path, op, e)
    }
}

impl Backend for LocalBackend {
    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        let path = self.path(key)?;
        let tmp = self.write_temp(&path, data)?;
        tmp.persist(&path, true)?;
        self.lock_handles().remove(key);
        Ok(())
    }

    fn stage(&self, key: &str, data: &[u8]) -> Result<Box<dyn Staged>> {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.path(key)?;
        let dir = path.parent().unwrap_or(&self.root);
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, "create folder", e))?;
        let tmp = vdisk::copy::TempPath::next_to(&path)?;
        let file = File::create(tmp.path()).map_err(|e| Error::io(tmp.path(), "create", e))?;
        // The page-aligned bulk goes to the disk directly (O_DIRECT): no page cache to
        // allocate and flush; the unaligned tail, and everything where the file system
        // refuses direct I/O, is written normally.
        let align = vdisk::aligned::ALIGN;
        let mut done = 0;
        let bulk = if (data.as_ptr() as usize).is_multiple_of(align) {
            data.len() / align * align
        } else {
            0
        };
        if bulk > 0
            && let Ok(direct) = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_DIRECT)
                .open(tmp.path())
            && direct.write_all_at(&data[..bulk], 0).is_ok()
        {
            done = bulk;
        }
        for (i, piece) in data[done..].chunks(128 << 10).enumerate() {
            file.write_all_at(piece, (done + i * (128 << 10)) as u64)
                .map_err(|e| Error::io(tmp.path(), "write", e))?;
        }
        // Start writeback of the buffered part now, so the fsync at commit finds little
        // left to do.
        // SAFETY: a plain syscall on a descriptor we own.
        unsafe {
            libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
        }
        Ok(Box::new(LocalStaged { tmp, file, path }))
    }

    fn put_new(&self, key: &str, data: &[u8]) -> Result<bool> {
        let path = self.path(key)?;
        let tmp = self.write_temp(&path, data)?;
        // link(2) fails if the name exists: an atomic create-if-absent.
        match std::fs::hard_link(tmp.path(), &path) {
            Ok(()) => {
                drop(tmp);
                vdisk::copy::fsync_parent(&path)?;
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(Error::io(&path, "link into place", e)),
        }
    }

    fn get(&self, key: &str) -> Result<Vec<u8>> {
        let path = self.path(key)?;
        std::fs::read(&path).map_err(|e| not_found(key, &path, "read", e))
    }

    fn get_range(&self, key: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        let f = self.handle(key)?;
        f.read_exact_at(buf, offset).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Error::corrupt(
                    key,
                    format!(
                        "truncated: {} bytes at offset {offset} are past its end",
                        buf.len()
                    ),
                )
            } else {
                Error::io(self.root.join(key), "read", e)
            }
        })
    }

    fn list(&self, prefix: &str) -> Result<Vec<Entry>> {
        let mut out = Vec::new();
        let start = self.root.join(prefix.trim_end_matches('/'));
        walk(&self.root, &start, &mut out)?;
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key)?;
        self.lock_handles().remove(key);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(&path, "remove", e)),
        }
    }

    fn exists(&self, key: &str) -> Result<bool> {
        let path = self.path(key)?;
        Ok(path.exists())
    }

    fn lock(&self, exclusive: bool, wait: bool) -> Result<Box<dyn LockGuard>> {
        let path = self.root.join("lock");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(&path, "open lock file", e))?;
        let mut op = if exclusive {
            libc::LOCK_EX
        } else {
            libc::LOCK_SH
        };
        if !wait {
            op |= libc::LOCK_NB;
        }
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a descriptor we own; no memory is passed.
        let rc = unsafe { libc::flock(f.as_raw_fd(), op) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::WouldBlock {
                return Err(Error::Invalid(format!(
                    "{}: the datastore is busy ({}); try again later",
                    self.root.display(),
                    if exclusive {
                        "a backup, verify or prune is running"
                    } else {
                        "gc is running"
                    }
                )));
            }
            return Err(Error::io(&path, "lock", e));
        }
        Ok(Box::new(LocalLock { _file: f }))
    }

    fn remove_leftovers(&self) -> Result<u64> {
        let mut freed = 0;
        let mut all = Vec::new();
        walk_all(&self.root, &mut all)?;
        for (path, size) in all {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if name.starts_with('.') && name.contains(TMP_MARK) {
                std::fs::remove_file(&path).map_err(|e| Error::io(&path, "remove leftover", e))?;
                freed += size;
            }
        }
        Ok(freed)
    }

    fn location(&self) -> String {
        self.root.display().to_string()
    }
}

struct LocalStaged {
    tmp: vdisk::copy::TempPath,
    file: File,
    path: PathBuf,
}

impl Staged for LocalStaged {
    fn commit(self: Box<Self>) -> Result<()> {
        self.file
            .sync_all()
            .map_err(|e| Error::io(self.tmp.path(), "fsync", e))?;
        self.tmp.persist(&self.path, true)?;
        Ok(())
    }
}

#[derive(Debug)]
struct LocalLock {
    // flock is released when the descriptor closes.
    _file: File,
}

impl LockGuard for LocalLock {}

/// Lists regular files under `dir` (recursively) as keys relative to `root`, skipping
/// temporary files.
fn walk(root: &Path, dir: &Path, out: &mut Vec<Entry>) -> Result<()> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(dir, "list folder", e)),
    };
    for ent in rd {
        let ent = ent.map_err(|e| Error::io(dir, "list folder", e))?;
        let path = ent.path();
        let name = ent.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let md = ent.metadata().map_err(|e| Error::io(&path, "stat", e))?;
        if md.is_dir() {
            walk(root, &path, out)?;
        } else if md.is_file() {
            let rel = path.strip_prefix(root).unwrap_or(&path);
            out.push(Entry {
                key: rel.to_string_lossy().into_owned(),
                size: md.len(),
            });
        }
    }
    Ok(())
}

fn walk_all(dir: &Path, out: &mut Vec<(PathBuf, u64)>) -> Result<()> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, "list folder", e))?;
    for ent in rd {
        let ent = ent.map_err(|e| Error::io(dir, "list folder", e))?;
        let md = ent
            .metadata()
            .map_err(|e| Error::io(ent.path(), "stat", e))?;
        if md.is_dir() {
            walk_all(&ent.path(), out)?;
        } else {
            out.push((ent.path(), md.len()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_list_delete() {
        let d = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(d.path());
        b.put("points/a", b"1").unwrap();
        assert!(!b.put_new("points/a", b"2").unwrap());
        assert!(b.put_new("points/b", b"2").unwrap());
        assert_eq!(b.get("points/a").unwrap(), b"1");
        let mut buf = [0u8; 1];
        b.get_range("points/b", 0, &mut buf).unwrap();
        assert_eq!(&buf, b"2");
        assert!(b.get_range("points/b", 1, &mut buf).is_err());
        let keys: Vec<_> = b
            .list("points/")
            .unwrap()
            .into_iter()
            .map(|e| e.key)
            .collect();
        assert_eq!(keys, ["points/a", "points/b"]);
        b.delete("points/a").unwrap();
        assert!(matches!(b.get("points/a"), Err(Error::Missing { .. })));
        assert!(b.path("../x").is_err());
        assert!(b.path("a/.hidden").is_err());
        assert_eq!(b.remove_leftovers().unwrap(), 0);
    }

    #[test]
    fn exclusive_lock_excludes_shared() {
        let d = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(d.path());
        let s = b.lock(false, false).unwrap();
        let _s2 = b.lock(false, false).unwrap();
        assert!(b.lock(true, false).is_err());
        drop(s);
        drop(_s2);
        let _x = b.lock(true, false).unwrap();
        assert!(b.lock(false, false).is_err());
    }
}
