//! FAT12/16/32, read-only, through the `fatfs` crate (0.3).
//!
//! fatfs wants a `Read + Write + Seek` disk; [`Stream`] refuses every write, so the
//! volume is never changed. (fatfs 0.3 writes nothing on mount, on reads with the
//! default options (no access-date updates), or on unmount of a file system it did
//! not change: the boot-sector dirty flag is only rewritten when it differs from what
//! was read. A test below checks that no write is even attempted.)
//!
//! Paths are resolved here, not by fatfs's `open_dir`, so that every directory walk is
//! bounded: a damaged FAT can chain a directory's clusters into a loop, and fatfs would
//! then iterate forever. [`Stream`] has a read budget for directory walks, and lists
//! stop after the format's limit of 65536 entries per directory.
//!
//! A folder's id is its first cluster (fatfs does not expose it: it is read from the
//! short entry fatfs has just parsed, whose position the stream records), so a
//! directory entry that points back at an ancestor's cluster (a loop) has the
//! ancestor's id, and extraction sees it has been there. Files keep a hash of their
//! path as id (an empty file has no cluster).

use crate::fs::{Entry, EntryKind, FileSystem, find_name, fnv1a};
use crate::probe::FsKind;
use crate::volume::Volume;
use crate::{Error, Result};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Entries a FAT directory can hold (the format caps a directory at 65536 32-byte slots).
const MAX_DIR_ENTRIES: usize = 65536;

/// Bytes one directory's iteration may read: twice a full directory (2 MiB, plus FAT
/// lookups), small enough that a cluster loop fails in well under a second.
const WALK_BUDGET: u64 = 4 << 20;

type Fs = fatfs::FileSystem<Stream>;
type FatDir<'a> = fatfs::Dir<'a, Stream>;
type FatEntry<'a> = fatfs::DirEntry<'a, Stream>;

/// The volume as fatfs's disk: reads within a budget, writes refused.
struct Stream {
    vol: Volume,
    /// Bytes left to read before reads fail (`u64::MAX` while streaming file content,
    /// which the file size bounds).
    budget: Arc<AtomicU64>,
    /// Writes fatfs attempted (all refused): for tests and diagnostics.
    writes: Arc<AtomicU64>,
    /// Volume offset where the last read ended: after fatfs yields a directory entry,
    /// its 32-byte short entry ends here.
    last_end: Arc<AtomicU64>,
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len() as u64;
        let left = self.budget.load(Ordering::Relaxed);
        if left != u64::MAX {
            if left < n {
                return Err(io::Error::other(
                    "directory data longer than any FAT directory can be (a cluster chain loop?)",
                ));
            }
            self.budget.store(left - n, Ordering::Relaxed);
        }
        let n = self.vol.read(buf)?;
        self.last_end
            .store(self.vol.stream_position()?, Ordering::Relaxed);
        Ok(n)
    }
}

impl Seek for Stream {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        self.vol.seek(to)
    }
}

impl Write for Stream {
    fn write(&mut self, _buf: &[u8]) -> io::Result<usize> {
        self.writes.fetch_add(1, Ordering::Relaxed);
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "fsview opens FAT volumes read-only: the FAT reader tried to write",
        ))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Short names in the OEM code page: ASCII kept, other bytes U+FFFD (long names, which
/// every non-ASCII name written since Windows 95 has, are UTF-16 and exact).
#[derive(Debug)]
struct AsciiOem;

impl fatfs::OemCpConverter for AsciiOem {
    fn decode(&self, oem_char: u8) -> char {
        if oem_char.is_ascii() {
            char::from(oem_char)
        } else {
            '\u{FFFD}'
        }
    }

    fn encode(&self, uni_char: char) -> Option<u8> {
        u8::try_from(uni_char).ok().filter(u8::is_ascii)
    }
}

/// A clock for fatfs's write paths, which never run here.
#[derive(Debug)]
struct NoClock;

impl fatfs::TimeProvider for NoClock {
    fn get_current_date(&self) -> fatfs::Date {
        fatfs::Date {
            year: 1980,
            month: 1,
            day: 1,
        }
    }

    fn get_current_date_time(&self) -> fatfs::DateTime {
        fatfs::DateTime {
            date: self.get_current_date(),
            time: fatfs::Time {
                hour: 0,
                min: 0,
                sec: 0,
                millis: 0,
            },
        }
    }
}

static OEM: AsciiOem = AsciiOem;
static CLOCK: NoClock = NoClock;

struct FatFs {
    fs: Fs,
    kind: FsKind,
    label: Option<String>,
    budget: Arc<AtomicU64>,
    #[cfg_attr(not(test), allow(dead_code))]
    writes: Arc<AtomicU64>,
    ids: Ids,
}

/// What reading folders' first clusters needs.
struct Ids {
    vol: Volume,
    last_end: Arc<AtomicU64>,
    fat32: bool,
    /// The root folder's id: its first cluster on FAT32, 0 (no cluster) on FAT12/16.
    root: u64,
}

/// Marks an id made from a first cluster (path-hash ids may have the bit too; only
/// folders are compared, and a clash costs at most a folder reported as a loop).
const CLUSTER_ID: u64 = 1 << 63;

impl Ids {
    fn new(vol: &Volume, kind: FsKind, last_end: Arc<AtomicU64>) -> Result<Ids> {
        let fat32 = kind == (FsKind::Fat { bits: 32 });
        let mut root = 0u32;
        if fat32 {
            let mut b = [0u8; 4];
            vol.read_at(&mut b, 44)?;
            root = u32::from_le_bytes(b);
        }
        Ok(Ids {
            vol: vol.clone(),
            last_end,
            fat32,
            root: CLUSTER_ID | u64::from(root),
        })
    }

    /// The id of the folder whose short entry fatfs has just parsed as `e`, from the
    /// entry's first cluster; `None` (the path hash is used) when the bytes found
    /// there are not that entry.
    fn folder_id(&self, e: &FatEntry<'_>) -> Option<u64> {
        let at = self.last_end.load(Ordering::Relaxed).checked_sub(32)?;
        let mut raw = [0u8; 32];
        self.vol.read_at(&mut raw, at).ok()?;
        if raw[11] != e.attributes().bits() || !same_short_name(&raw[..11], e) {
            return None;
        }
        let hi = if self.fat32 {
            u32::from(crate::le16(&raw, 20))
        } else {
            0
        };
        let cluster = hi << 16 | u32::from(crate::le16(&raw, 26));
        // Cluster 0 is the root (fatfs opens such an entry as the root folder).
        Some(if cluster == 0 {
            self.root
        } else {
            CLUSTER_ID | u64::from(cluster)
        })
    }
}

/// Whether the 11 raw name bytes are `e`'s short name ("NAME    EXT" vs "NAME.EXT").
fn same_short_name(raw: &[u8], e: &FatEntry<'_>) -> bool {
    let mut base = raw[..8].to_vec();
    if base[0] == 0x05 {
        base[0] = 0xE5; // a leading 0xE5 is stored as 0x05
    }
    let trim = |b: &[u8]| -> Vec<u8> {
        let n = b.iter().rposition(|c| *c != b' ').map_or(0, |i| i + 1);
        b[..n].to_vec()
    };
    let (base, ext) = (trim(&base), trim(&raw[8..11]));
    let mut want = base;
    if !ext.is_empty() {
        want.push(b'.');
        want.extend_from_slice(&ext);
    }
    want == e.short_file_name_as_bytes()
}

// SAFETY: fatfs's `FileSystem<Stream>` is `!Send` only because its options hold
// `&'static dyn OemCpConverter` and `&'static dyn TimeProvider` (traits without a
// `Sync` bound). Here both point to `OEM` and `CLOCK`, stateless unit structs, which are
// `Sync`; everything else in it (`RefCell<Stream>`, `Cell`s, plain data) is `Send`.
unsafe impl Send for FatFs {}

/// The SAFETY argument above needs the disk and the two statics to be `Send`/`Sync`.
const _: fn() = || {
    fn send<T: Send>() {}
    fn sync<T: Sync>() {}
    send::<Stream>();
    sync::<AsciiOem>();
    sync::<NoClock>();
};

pub fn open(volume: Volume, kind: FsKind) -> Result<Box<dyn FileSystem>> {
    check_size(&volume)?;
    let budget = Arc::new(AtomicU64::new(WALK_BUDGET));
    let writes = Arc::new(AtomicU64::new(0));
    let last_end = Arc::new(AtomicU64::new(0));
    let ids = Ids::new(&volume, kind, last_end.clone())?;
    let mut vol = volume;
    vol.seek(SeekFrom::Start(0))?;
    let stream = Stream {
        vol,
        budget: budget.clone(),
        writes: writes.clone(),
        last_end,
    };
    let options = fatfs::FsOptions::new()
        .update_accessed_date(false)
        .oem_cp_converter(&OEM)
        .time_provider(&CLOCK);
    let fs = guard(|| Fs::new(stream, options).map_err(|e| map_io(e, "FAT boot sector")))?;
    let label = bpb_label(fs.volume_label_as_bytes());
    Ok(Box::new(FatFs {
        fs,
        kind,
        label,
        budget,
        writes,
        ids,
    }))
}

/// Refuses a file system larger than its volume (a truncated image, or a boot sector
/// claiming more sectors than exist): reads would fail part-way through the tree.
fn check_size(volume: &Volume) -> Result<()> {
    let mut bs = [0u8; 512];
    volume.read_at(&mut bs, 0)?;
    let bps = u64::from(crate::le16(&bs, 11));
    let total16 = u64::from(crate::le16(&bs, 19));
    let total = if total16 != 0 {
        total16
    } else {
        u64::from(crate::le32(&bs, 32))
    };
    // Both at most 32 bits: the product cannot overflow.
    let bytes = total * bps;
    if bytes > volume.len() {
        return Err(Error::corrupt(
            "FAT boot sector",
            0,
            format!(
                "the file system is {bytes} bytes but its volume only {} (truncated image?)",
                volume.len()
            ),
        ));
    }
    Ok(())
}

/// The boot-sector label, trimmed; "NO NAME" (what formatters write for none) and an
/// empty one are no label.
fn bpb_label(raw: &[u8]) -> Option<String> {
    let s: String = raw
        .iter()
        .map(|b| fatfs::OemCpConverter::decode(&OEM, *b))
        .collect();
    let s = s.trim_matches(|c: char| c == ' ' || c == '\0').to_string();
    (!s.is_empty() && s != "NO NAME").then_some(s)
}

/// Runs `f`, turning a panic inside fatfs (on data it did not expect) into an error.
fn guard<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|_| {
        Err(Error::corrupt(
            "FAT file system",
            0,
            "the reader failed on unexpected data",
        ))
    })
}

/// fatfs reports damage as `io::Error`s of kind `InvalidData`/`Other` with a message;
/// errors from the volume itself keep their kind.
fn map_io(e: io::Error, what: &str) -> Error {
    match e.kind() {
        io::ErrorKind::InvalidData | io::ErrorKind::InvalidInput | io::ErrorKind::Other => {
            Error::corrupt(what, 0, e.to_string())
        }
        io::ErrorKind::UnexpectedEof => Error::corrupt(what, 0, e.to_string()),
        _ => Error::Io(e),
    }
}

/// Seconds since the epoch for a FAT date and time. FAT stores local time with no zone;
/// with nothing to say which zone, it is taken as UTC. `None` for impossible values
/// (a zero date, month 13...).
fn unix_time(dt: &fatfs::DateTime) -> Option<i64> {
    let (y, m, d) = (
        i64::from(dt.date.year),
        u32::from(dt.date.month),
        u32::from(dt.date.day),
    );
    let t = &dt.time;
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || t.hour > 23 || t.min > 59 || t.sec > 59 {
        return None;
    }
    let days = utc::days_from_civil(y, m, d);
    Some(days * 86_400 + i64::from(t.hour) * 3600 + i64::from(t.min) * 60 + i64::from(t.sec))
}

fn entry(e: &FatEntry<'_>, path_key: &str, folder_id: Option<u64>) -> Entry {
    let modified = e.modified();
    let mtime = unix_time(&modified);
    Entry {
        name: e.file_name(),
        kind: if e.is_dir() {
            EntryKind::Dir
        } else {
            EntryKind::File
        },
        size: if e.is_dir() { 0 } else { e.len() },
        mtime,
        mtime_nanos: if mtime.is_some() {
            u32::from(modified.time.millis.min(999)) * 1_000_000
        } else {
            0
        },
        mode: None,
        id: match folder_id {
            Some(id) if e.is_dir() => id,
            // fatfs does not expose first clusters: the path's hash.
            _ => fnv1a(path_key.as_bytes()),
        },
    }
}

/// What a path resolved to.
enum Found<'a> {
    Root,
    /// The entry, its path spelled with the names as stored (the id key), and its
    /// folder id when it is a folder ([`Ids::folder_id`]).
    Entry(FatEntry<'a>, String, Option<u64>),
}

/// The entries of `dir` but `.` and `..`, at most [`MAX_DIR_ENTRIES`], each folder with
/// its id.
fn entries<'a>(
    dir: &FatDir<'a>,
    path: &str,
    budget: &AtomicU64,
    ids: &Ids,
) -> Result<Vec<(FatEntry<'a>, Option<u64>)>> {
    budget.store(WALK_BUDGET, Ordering::Relaxed);
    let mut out = Vec::new();
    for (i, e) in dir.iter().enumerate() {
        if i >= MAX_DIR_ENTRIES {
            return Err(Error::corrupt(
                "FAT directory",
                0,
                format!("{path}: more than {MAX_DIR_ENTRIES} entries (a cluster chain loop?)"),
            ));
        }
        let e = e.map_err(|e| map_io(e, "FAT directory"))?;
        let raw = e.short_file_name_as_bytes();
        if raw == b"." || raw == b".." {
            continue;
        }
        let id = if e.is_dir() { ids.folder_id(&e) } else { None };
        out.push((e, id));
    }
    Ok(out)
}

impl FatFs {
    /// Bounds the reads before the first directory iteration (each then gets its own).
    fn walk(&self) {
        self.budget.store(WALK_BUDGET, Ordering::Relaxed);
    }

    fn resolve<'a>(fs: &'a Fs, path: &str, budget: &AtomicU64, ids: &Ids) -> Result<Found<'a>> {
        let comps = crate::components(path)?;
        let mut dir = fs.root_dir();
        let mut key = String::new();
        let mut found = Found::Root;
        for (i, c) in comps.iter().enumerate() {
            if i > 0 {
                match &found {
                    Found::Entry(e, _, _) if e.is_dir() => dir = e.to_dir(),
                    _ => {
                        return Err(Error::WrongKind(format!(
                            "{path}: {key} is not a directory"
                        )));
                    }
                }
            }
            let mut all = entries(&dir, path, budget, ids)?;
            // The long name by the common rule; else the 8.3 alias, without case.
            let i = find_name(&all, c, true, |(e, _)| e.file_name().into())
                .or_else(|| find_name(&all, c, true, |(e, _)| e.short_file_name().into()))
                .and_then(|hit| all.iter().position(|x| std::ptr::eq(x, hit)))
                .ok_or_else(|| Error::NotFound(path.to_string()))?;
            let (e, id) = all.swap_remove(i);
            key.push('/');
            key.push_str(&e.file_name());
            found = Found::Entry(e, key.clone(), id);
        }
        Ok(found)
    }
}

impl FileSystem for FatFs {
    fn kind(&self) -> FsKind {
        self.kind
    }

    fn label(&self) -> Option<String> {
        self.label.clone()
    }

    fn list(&mut self, path: &str) -> Result<Vec<Entry>> {
        self.walk();
        guard(|| {
            let (dir, key) = match Self::resolve(&self.fs, path, &self.budget, &self.ids)? {
                Found::Root => (self.fs.root_dir(), String::new()),
                Found::Entry(e, key, _) if e.is_dir() => (e.to_dir(), key),
                Found::Entry(..) => {
                    return Err(Error::WrongKind(format!("{path}: not a directory")));
                }
            };
            Ok(entries(&dir, path, &self.budget, &self.ids)?
                .iter()
                .map(|(e, id)| entry(e, &format!("{key}/{}", e.file_name()), *id))
                .collect())
        })
    }

    fn stat(&mut self, path: &str) -> Result<Entry> {
        self.walk();
        guard(|| {
            Ok(
                match Self::resolve(&self.fs, path, &self.budget, &self.ids)? {
                    Found::Root => Entry::root(self.ids.root),
                    Found::Entry(e, key, id) => entry(&e, &key, id),
                },
            )
        })
    }

    fn read_link(&mut self, path: &str) -> Result<String> {
        self.walk();
        guard(|| {
            Self::resolve(&self.fs, path, &self.budget, &self.ids)?;
            Err(Error::WrongKind(format!(
                "{path}: not a symbolic link (FAT has none)"
            )))
        })
    }

    fn read_file(&mut self, path: &str, out: &mut dyn Write) -> Result<u64> {
        self.walk();
        let budget = self.budget.clone();
        guard(|| {
            let e = match Self::resolve(&self.fs, path, &self.budget, &self.ids)? {
                Found::Entry(e, _, _) if !e.is_dir() => e,
                _ => return Err(Error::WrongKind(format!("{path}: is a directory"))),
            };
            let want = e.len();
            let mut f = e.to_file();
            // Content reads are bounded by the file size, not the walk budget.
            budget.store(u64::MAX, Ordering::Relaxed);
            let mut buf = vec![0u8; 1 << 20];
            let mut done = 0u64;
            loop {
                // fatfs returns at most a cluster per call: fill the buffer first.
                let mut filled = 0;
                while filled < buf.len() {
                    let n = f
                        .read(&mut buf[filled..])
                        .map_err(|e| map_io(e, "FAT file"))?;
                    if n == 0 {
                        break;
                    }
                    filled += n;
                }
                if filled == 0 {
                    break;
                }
                out.write_all(&buf[..filled])?;
                done = done.saturating_add(filled as u64);
            }
            if done != want {
                return Err(Error::corrupt(
                    "FAT file",
                    0,
                    format!("{path}: cluster chain holds {done} bytes of {want}"),
                ));
            }
            Ok(done)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dt(year: u16, month: u16, day: u16, hour: u16, min: u16, sec: u16) -> fatfs::DateTime {
        fatfs::DateTime {
            date: fatfs::Date { year, month, day },
            time: fatfs::Time {
                hour,
                min,
                sec,
                millis: 0,
            },
        }
    }

    #[test]
    fn fat_times_as_utc() {
        assert_eq!(unix_time(&dt(1980, 1, 1, 0, 0, 0)), Some(315_532_800));
        assert_eq!(unix_time(&dt(2000, 3, 1, 12, 30, 58)), Some(951_913_858));
        assert_eq!(
            unix_time(&dt(2107, 12, 31, 23, 59, 58)),
            Some(4_354_819_198)
        );
        assert_eq!(unix_time(&dt(1980, 0, 0, 0, 0, 0)), None);
        assert_eq!(unix_time(&dt(1999, 13, 1, 0, 0, 0)), None);
        assert_eq!(unix_time(&dt(1999, 1, 1, 24, 0, 0)), None);
    }

    #[test]
    fn labels() {
        assert_eq!(bpb_label(b"NO NAME    "), None);
        assert_eq!(bpb_label(b"           "), None);
        assert_eq!(bpb_label(b"DATA       ").as_deref(), Some("DATA"));
    }

    /// Builds a FAT image with fatfs itself, then browses it: nothing may be written,
    /// not even on unmount (the stream counts refused writes).
    #[test]
    fn browsing_writes_nothing() {
        let mut img = io::Cursor::new(vec![0u8; 8 << 20]);
        fatfs::format_volume(
            &mut img,
            fatfs::FormatVolumeOptions::new().volume_label(*b"UNITFAT    "),
        )
        .unwrap();
        {
            let fs = fatfs::FileSystem::new(&mut img, fatfs::FsOptions::new()).unwrap();
            let d = fs.root_dir().create_dir("Sub Dir").unwrap();
            let mut f = d.create_file("Long file name.txt").unwrap();
            f.write_all(&vec![7u8; 100_000]).unwrap();
        }
        let clean = img.into_inner();
        // Also with the dirty flag set (a volume not unmounted): fatfs must not clear it.
        let kind = crate::identify(&clean);
        let flags_at = if kind == (FsKind::Fat { bits: 32 }) {
            0x41
        } else {
            0x25
        };
        let mut dirty = clean.clone();
        dirty[flags_at] |= 1;
        for (image, is_dirty) in [(clean, false), (dirty, true)] {
            browse_counting_writes(image, kind, is_dirty);
        }
    }

    fn browse_counting_writes(image: Vec<u8>, kind: FsKind, is_dirty: bool) {
        let disk = vdisk::open_backing(vdisk::MemBacking::new(image, "f.img")).unwrap();
        let vol = Volume::whole(Arc::from(disk));
        assert!(matches!(kind, FsKind::Fat { .. }), "{kind:?}");
        let writes = {
            let budget = Arc::new(AtomicU64::new(WALK_BUDGET));
            let writes = Arc::new(AtomicU64::new(0));
            let last_end = Arc::new(AtomicU64::new(0));
            let ids = Ids::new(&vol, kind, last_end.clone()).unwrap();
            let stream = Stream {
                vol,
                budget: budget.clone(),
                writes: writes.clone(),
                last_end,
            };
            let fs = Fs::new(stream, fatfs::FsOptions::new().oem_cp_converter(&OEM)).unwrap();
            let mut ff = FatFs {
                label: bpb_label(fs.volume_label_as_bytes()),
                fs,
                kind,
                budget,
                writes: writes.clone(),
                ids,
            };
            assert_eq!(ff.label().as_deref(), Some("UNITFAT"));
            assert_eq!(ff.fs.read_status_flags().unwrap().dirty(), is_dirty);
            let l = ff.list("/SUB DIR").unwrap();
            assert_eq!(l.len(), 1);
            assert_eq!(l[0].name, "Long file name.txt");
            assert_eq!(l[0].size, 100_000);
            let mut out = Vec::new();
            assert_eq!(
                ff.read_file("/sub dir/LONG FILE NAME.TXT", &mut out)
                    .unwrap(),
                100_000
            );
            assert_eq!(out, vec![7u8; 100_000]);
            let s = ff.stat("/Sub Dir/long file name.txt").unwrap();
            assert_eq!(s.id, l[0].id, "one id whatever the spelling");
            // A folder's id is its first cluster, however it is reached.
            let root = ff.list("/").unwrap();
            let sub = ff.stat("/sub dir").unwrap();
            assert_eq!(root[0].id, sub.id);
            assert_eq!(sub.id & CLUSTER_ID, CLUSTER_ID);
            assert_ne!(sub.id, ff.stat("/").unwrap().id);
            assert!(matches!(
                ff.list("/Sub Dir/long file name.txt"),
                Err(Error::WrongKind(_))
            ));
            assert!(matches!(ff.stat("/nope"), Err(Error::NotFound(_))));
            assert_eq!(ff.writes.load(Ordering::Relaxed), 0);
            writes
        };
        assert_eq!(writes.load(Ordering::Relaxed), 0, "unmount wrote");
    }

    #[test]
    fn walk_budget_stops_runaway_reads() {
        let disk =
            vdisk::open_backing(vdisk::MemBacking::new(vec![0u8; 1 << 20], "z.img")).unwrap();
        let mut s = Stream {
            vol: Volume::whole(Arc::from(disk)),
            budget: Arc::new(AtomicU64::new(100)),
            writes: Arc::new(AtomicU64::new(0)),
            last_end: Arc::new(AtomicU64::new(0)),
        };
        let mut b = [0u8; 64];
        s.read_exact(&mut b).unwrap();
        assert!(s.read_exact(&mut b).is_err());
        assert!(s.write(b"x").is_err());
        assert_eq!(s.writes.load(Ordering::Relaxed), 1);
    }
}
