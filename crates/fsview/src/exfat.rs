//! exFAT, read-only, by our own code (no maintained exFAT crate exists).
//!
//! What it reads: the main boot sector (signature, shifts, the FAT and cluster heap
//! placement, all checked against the volume), verified by the boot-region checksum,
//! falling back to the backup boot region when the main one is damaged; the active FAT
//! (cluster chains, with length and loop guards); directories as entry sets (File
//! 0x85 with its SetChecksum verified, Stream Extension 0xC0, File Name 0xC1), the
//! volume label (0x83); contiguous (`NoFatChain`) and FAT-chained data; bytes past
//! `ValidDataLength` read as zeros. Files are streamed in chunks of at most
//! [`READ_CHUNK`] bytes.
//!
//! Names are matched without case by Unicode simple upper-casing (`char::to_uppercase`),
//! not by the volume's up-case table, which is not parsed; nor are name hashes checked.
//! The allocation bitmap is not read (only what the entries reference is read). Entry
//! ids are the volume byte offset of the File entry (0 for the root, whose entries
//! live in the cluster heap, never at offset 0).
//!
//! Every number read from the disk is checked: clusters against `ClusterCount`, chains
//! at most as long as the data needs (and free of repeats, so a FAT loop is
//! [`Error::Corrupt`]), directories at most [`MAX_DIR_BYTES`] (the format's own limit),
//! entry sets inside their directory.

use crate::fs::{Entry, EntryKind, FileSystem, READ_CHUNK, find_name};
use crate::probe::FsKind;
use crate::volume::Volume;
use crate::{Error, Result, le16, le32, le64};
use std::cell::RefCell;
use std::io::Write;
use std::sync::Arc;
use utc::days_from_civil;

/// Directories larger than this are refused (the exFAT limit; a list is held in memory).
pub(crate) const MAX_DIR_BYTES: u64 = 256 << 20;
/// File entry sets the folder cache holds at most (beyond one folder's own).
const CACHE_NODES: usize = 1 << 20;
/// Bytes of one directory entry.
const ENTRY: usize = 32;
/// The cluster chain end mark, and the bad-cluster mark.
const FAT_EOC: u32 = 0xFFFF_FFFF;
const FAT_BAD: u32 = 0xFFFF_FFF7;
/// Clusters in a chain most: the format's cluster count limit.
const MAX_CLUSTERS: u32 = 0xFFFF_FFF5;

const T_END: u8 = 0x00;
const T_LABEL: u8 = 0x83;
const T_FILE: u8 = 0x85;
const T_STREAM: u8 = 0xC0;
const T_NAME: u8 = 0xC1;
const IN_USE: u8 = 0x80;
const ATTR_DIR: u16 = 0x10;
const FLAG_NO_FAT_CHAIN: u8 = 0x02;

/// The boot-sector fields the reader uses, checked.
#[derive(Debug, Clone)]
struct Boot {
    sector_shift: u32,
    cluster_shift: u32,
    /// Byte offset of the active FAT.
    fat_at: u64,
    /// Byte offset of cluster 2.
    heap_at: u64,
    cluster_count: u32,
    root_cluster: u32,
}

fn bad_boot(at: u64, detail: impl Into<String>) -> Error {
    Error::corrupt("exFAT boot sector", at, detail)
}

/// The boot-region checksum over sectors 0..11 (`region` is 11 sectors), skipping the
/// VolumeFlags and PercentInUse bytes, which change without the checksum being redone.
fn boot_checksum(region: &[u8]) -> u32 {
    let mut c: u32 = 0;
    for (i, b) in region.iter().enumerate() {
        if matches!(i, 106 | 107 | 112) {
            continue;
        }
        c = c.rotate_right(1).wrapping_add(u32::from(*b));
    }
    c
}

impl Boot {
    /// Parses the boot region (12 sectors) at volume offset `at`.
    fn read(vol: &Volume, at: u64) -> Result<Boot> {
        let mut s0 = [0u8; 512];
        vol.read_at(&mut s0, at)
            .map_err(|e| bad_boot(at, e.to_string()))?;
        if &s0[3..11] != b"EXFAT   " {
            return Err(bad_boot(at, "no exFAT signature"));
        }
        if s0[11..64].iter().any(|b| *b != 0) {
            return Err(bad_boot(at, "MustBeZero bytes are not zero"));
        }
        if s0[510..512] != [0x55, 0xAA] {
            return Err(bad_boot(at, "no boot signature 55 AA"));
        }
        let sector_shift = u32::from(s0[0x6C]);
        let cluster_shift = u32::from(s0[0x6D]);
        if !(9..=12).contains(&sector_shift) {
            return Err(bad_boot(at, format!("BytesPerSectorShift {sector_shift}")));
        }
        if sector_shift + cluster_shift > 25 {
            return Err(bad_boot(
                at,
                format!("SectorsPerClusterShift {cluster_shift} makes clusters over 32 MiB"),
            ));
        }
        let bps = 1u64 << sector_shift;
        // The checksum covers sectors 0..11; sector 11 repeats it.
        let mut region = vec![0u8; (12 * bps) as usize];
        vol.read_at(&mut region, at)
            .map_err(|e| bad_boot(at, e.to_string()))?;
        let sum = boot_checksum(&region[..(11 * bps) as usize]);
        let stored = le32(&region, (11 * bps) as usize);
        if sum != stored {
            return Err(bad_boot(
                at,
                format!("boot checksum {sum:#010x}, recorded {stored:#010x}"),
            ));
        }
        let major = s0[0x69];
        if major != 1 {
            return Err(Error::Unsupported(format!(
                "exFAT revision {major}.{:02}",
                s0[0x68]
            )));
        }
        let volume_sectors = le64(&s0, 0x48);
        let fat_offset = u64::from(le32(&s0, 0x50));
        let fat_length = u64::from(le32(&s0, 0x54));
        let heap_offset = u64::from(le32(&s0, 0x58));
        let cluster_count = le32(&s0, 0x5C);
        let root_cluster = le32(&s0, 0x60);
        let flags = le16(&s0, 0x6A);
        let fats = u64::from(s0[0x6E]);
        let volume_bytes = volume_sectors
            .checked_mul(bps)
            .filter(|b| *b <= vol.len())
            .ok_or_else(|| {
                bad_boot(
                    at,
                    format!(
                        "the file system is {volume_sectors} sectors of {bps} bytes but its \
                         volume only {} bytes (truncated image?)",
                        vol.len()
                    ),
                )
            })?;
        if !(1..=2).contains(&fats) {
            return Err(bad_boot(at, format!("NumberOfFats {fats}")));
        }
        if fat_offset < 24 || fat_length == 0 {
            return Err(bad_boot(
                at,
                format!("FatOffset {fat_offset}, FatLength {fat_length}"),
            ));
        }
        // u32 fields times at most 2: no overflow in u64.
        let fats_end = fat_offset + fats * fat_length;
        if heap_offset < fats_end {
            return Err(bad_boot(
                at,
                format!("ClusterHeapOffset {heap_offset} inside the FATs (end {fats_end})"),
            ));
        }
        if cluster_count == 0 || cluster_count > MAX_CLUSTERS {
            return Err(bad_boot(at, format!("ClusterCount {cluster_count}")));
        }
        // FAT entries 0..ClusterCount+2 must fit FatLength sectors.
        if (u64::from(cluster_count) + 2) * 4 > fat_length << sector_shift {
            return Err(bad_boot(
                at,
                format!("FatLength {fat_length} too small for {cluster_count} clusters"),
            ));
        }
        let heap_end = (u64::from(cluster_count) << cluster_shift)
            .checked_add(heap_offset)
            .and_then(|s| s.checked_mul(bps));
        if heap_end.is_none_or(|e| e > volume_bytes) {
            return Err(bad_boot(
                at,
                format!(
                    "the cluster heap ({cluster_count} clusters at sector {heap_offset}) \
                     passes the end of the volume ({volume_sectors} sectors)"
                ),
            ));
        }
        if root_cluster < 2 || root_cluster - 2 >= cluster_count {
            return Err(bad_boot(
                at,
                format!("FirstClusterOfRootDirectory {root_cluster}"),
            ));
        }
        // TexFAT: the second FAT is the active one when flag bit 0 is set.
        let active = if fats == 2 && flags & 1 != 0 { 1 } else { 0 };
        Ok(Boot {
            sector_shift,
            cluster_shift,
            fat_at: (fat_offset + active * fat_length) << sector_shift,
            heap_at: heap_offset << sector_shift,
            cluster_count,
            root_cluster,
        })
    }

    fn cluster_size(&self) -> u64 {
        1u64 << (self.sector_shift + self.cluster_shift)
    }

    fn valid(&self, c: u32) -> bool {
        c >= 2 && c - 2 < self.cluster_count
    }

    /// Byte offset of cluster `c` (valid, so inside the heap, checked at open).
    fn cluster_at(&self, c: u32) -> u64 {
        self.heap_at + ((u64::from(c) - 2) << (self.sector_shift + self.cluster_shift))
    }
}

/// A run of contiguous clusters: first cluster, count.
type Run = (u32, u64);

/// A File entry set, decoded.
#[derive(Debug, Clone)]
struct Node {
    name: String,
    dir: bool,
    first_cluster: u32,
    no_fat_chain: bool,
    data_len: u64,
    valid_len: u64,
    mtime: Option<i64>,
    mtime_nanos: u32,
    /// Volume offset of the File entry (0 for the root).
    id: u64,
}

impl Node {
    fn entry(&self) -> Entry {
        Entry {
            name: self.name.clone(),
            kind: if self.dir {
                EntryKind::Dir
            } else {
                EntryKind::File
            },
            size: if self.dir { 0 } else { self.data_len },
            mtime: self.mtime,
            mtime_nanos: self.mtime_nanos,
            mode: None,
            id: self.id,
        }
    }
}

/// A directory's content as read: its bytes and the runs they came from.
struct DirData {
    bytes: Vec<u8>,
    runs: Vec<Run>,
}

impl DirData {
    /// Volume offset of directory byte `pos` (inside the data).
    fn volume_offset(&self, boot: &Boot, pos: usize) -> u64 {
        let cs = boot.cluster_size();
        let mut left = pos as u64;
        for (c, n) in &self.runs {
            let bytes = n * cs;
            if left < bytes {
                return boot.cluster_at(*c) + left;
            }
            left -= bytes;
        }
        0
    }
}

struct ExFat {
    vol: Volume,
    boot: Boot,
    label: Option<String>,
    /// The folders parsed last (id and sets, oldest first, at most [`CACHE_NODES`] sets
    /// unless one folder alone has more): walking a tree stats each entry, which would
    /// otherwise parse every folder of its path again for each.
    cache: RefCell<Vec<(u64, Arc<Vec<Node>>)>>,
}

pub fn open(volume: Volume) -> Result<Box<dyn FileSystem>> {
    let boot = match Boot::read(&volume, 0) {
        Ok(b) => b,
        Err(main @ Error::Corrupt { .. }) => {
            // The backup boot region follows the main one (12 sectors of the size the
            // main sector names, if it names a sane one).
            let mut s0 = [0u8; 512];
            if volume.read_at(&mut s0, 0).is_err() {
                return Err(main);
            }
            let shift = u32::from(s0[0x6C]);
            let backup = (9..=12)
                .contains(&shift)
                .then(|| Boot::read(&volume, 12u64 << shift));
            match backup {
                Some(Ok(b)) => b,
                _ => return Err(main),
            }
        }
        Err(e) => return Err(e),
    };
    let mut fs = ExFat {
        vol: volume,
        boot,
        label: None,
        cache: RefCell::new(Vec::new()),
    };
    let root = fs.root();
    let data = fs.dir_data(&root, "/")?;
    fs.label = label(&data.bytes);
    Ok(Box::new(fs))
}

/// The volume label entry of a root directory, if any (a count over 11 is ignored).
fn label(bytes: &[u8]) -> Option<String> {
    for e in bytes.chunks_exact(ENTRY) {
        match e[0] {
            T_END => break,
            T_LABEL => {
                let n = usize::from(e[1]);
                if n == 0 || n > 11 {
                    return None;
                }
                let units: Vec<u16> = (0..n).map(|i| le16(e, 2 + 2 * i)).collect();
                return Some(String::from_utf16_lossy(&units));
            }
            _ => {}
        }
    }
    None
}

/// The entry-set checksum: every byte of the set but the checksum field itself.
fn set_checksum(set: &[u8]) -> u16 {
    let mut c: u16 = 0;
    for (i, b) in set.iter().enumerate() {
        if i == 2 || i == 3 {
            continue;
        }
        c = c.rotate_right(1).wrapping_add(u16::from(*b));
    }
    c
}

/// Seconds since the epoch and nanoseconds for an exFAT timestamp, its 10 ms increment
/// (0..=199) and UTC offset byte (bit 7: valid; bits 0-6: signed 15-minute steps). A time
/// without a valid offset is local time of an unknown zone, taken as UTC. `None` for
/// impossible values (a zero date, month 13...).
fn unix_time(ts: u32, ms10: u8, utc: u8) -> Option<(i64, u32)> {
    let sec2 = i64::from(ts & 0x1F);
    let min = i64::from((ts >> 5) & 0x3F);
    let hour = i64::from((ts >> 11) & 0x1F);
    let day = (ts >> 16) & 0x1F;
    let month = (ts >> 21) & 0xF;
    let year = 1980 + i64::from(ts >> 25);
    if sec2 > 29 || min > 59 || hour > 23 || !(1..=31).contains(&day) || !(1..=12).contains(&month)
    {
        return None;
    }
    let ms10 = if ms10 <= 199 { i64::from(ms10) } else { 0 };
    let mut t =
        days_from_civil(year, month, day) * 86_400 + hour * 3600 + min * 60 + sec2 * 2 + ms10 / 100;
    if utc & 0x80 != 0 {
        // Sign-extend the 7-bit field.
        let q = i64::from(((utc << 1) as i8) >> 1);
        t -= q * 15 * 60;
    }
    Some((t, (ms10 % 100) as u32 * 10_000_000))
}

impl ExFat {
    fn root(&self) -> Node {
        Node {
            name: String::new(),
            dir: true,
            first_cluster: self.boot.root_cluster,
            no_fat_chain: false,
            data_len: 0,
            valid_len: 0,
            mtime: None,
            mtime_nanos: 0,
            id: 0,
        }
    }

    fn fat(&self, c: u32) -> Result<u32> {
        // `c` is valid, so its entry is inside FatLength (checked at open).
        let at = self.boot.fat_at + u64::from(c) * 4;
        let mut b = [0u8; 4];
        self.vol.read_at(&mut b, at)?;
        Ok(u32::from_le_bytes(b))
    }

    /// The runs of a chain from `first`: exactly `need` clusters when given (file and
    /// folder data), else up to the end mark, at most `max` clusters (the root folder).
    /// `what`/`at` name the owner in errors.
    fn chain(
        &self,
        first: u32,
        no_fat_chain: bool,
        need: Option<u64>,
        max: u64,
        what: &str,
        at: u64,
    ) -> Result<Vec<Run>> {
        let bad = |detail: String| Error::corrupt(format!("exFAT {what}"), at, detail);
        if need == Some(0) {
            return Ok(Vec::new());
        }
        if !self.boot.valid(first) {
            return Err(bad(format!(
                "first cluster {first} outside the cluster heap (ClusterCount {})",
                self.boot.cluster_count
            )));
        }
        if no_fat_chain {
            let n = need.unwrap_or(1);
            let last = u64::from(first - 2)
                .checked_add(n)
                .filter(|e| *e <= u64::from(self.boot.cluster_count));
            if last.is_none() {
                return Err(bad(format!(
                    "{n} contiguous clusters from {first} pass ClusterCount {}",
                    self.boot.cluster_count
                )));
            }
            return Ok(vec![(first, n)]);
        }
        let limit = need.unwrap_or(max).min(u64::from(self.boot.cluster_count));
        if need.is_some_and(|n| n > limit) {
            return Err(bad(format!(
                "needs {} clusters, the volume has {}",
                need.unwrap_or(0),
                self.boot.cluster_count
            )));
        }
        let mut runs: Vec<Run> = Vec::new();
        let mut c = first;
        let mut count = 0u64;
        loop {
            match runs.last_mut() {
                Some((s, n)) if u64::from(*s) + *n == u64::from(c) => *n += 1,
                _ => runs.push((c, 1)),
            }
            count += 1;
            if need == Some(count) {
                break;
            }
            let next = self.fat(c)?;
            if next == FAT_EOC {
                if let Some(n) = need {
                    return Err(bad(format!(
                        "cluster chain ends after {count} of {n} clusters"
                    )));
                }
                break;
            }
            if next == FAT_BAD {
                return Err(bad(format!("cluster {c} chains to a bad cluster")));
            }
            if !self.boot.valid(next) {
                return Err(bad(format!(
                    "cluster {c} chains to cluster {next:#x}, past ClusterCount {}",
                    self.boot.cluster_count
                )));
            }
            if count >= limit {
                return Err(bad(format!(
                    "cluster chain longer than {limit} clusters (a loop?)"
                )));
            }
            c = next;
        }
        // A loop (or cross-link within the chain) repeats a cluster.
        let mut sorted = runs.clone();
        sorted.sort_unstable();
        for w in sorted.windows(2) {
            if u64::from(w[0].0) + w[0].1 > u64::from(w[1].0) {
                return Err(bad(format!(
                    "cluster chain visits cluster {} twice (a loop)",
                    w[1].0
                )));
            }
        }
        Ok(runs)
    }

    /// The bytes of a folder.
    fn dir_data(&self, dir: &Node, path: &str) -> Result<DirData> {
        let cs = self.boot.cluster_size();
        let max = MAX_DIR_BYTES / cs;
        let runs = if dir.id == 0 {
            self.chain(dir.first_cluster, false, None, max.max(1), "root folder", 0)?
        } else {
            if dir.data_len == 0 || dir.data_len > MAX_DIR_BYTES {
                return Err(Error::corrupt(
                    "exFAT folder entry",
                    dir.id,
                    format!(
                        "{path}: a folder of {} bytes (1 to {MAX_DIR_BYTES})",
                        dir.data_len
                    ),
                ));
            }
            let need = dir.data_len.div_ceil(cs);
            self.chain(
                dir.first_cluster,
                dir.no_fat_chain,
                Some(need),
                need,
                "folder",
                dir.id,
            )?
        };
        let total: u64 = runs.iter().map(|r| r.1).sum::<u64>() * cs;
        let mut bytes = vec![0u8; total as usize];
        let mut done = 0usize;
        for (c, n) in &runs {
            let len = (n * cs) as usize;
            self.vol
                .read_at(&mut bytes[done..done + len], self.boot.cluster_at(*c))?;
            done += len;
        }
        if dir.id != 0 {
            bytes.truncate(dir.data_len as usize);
        }
        Ok(DirData { bytes, runs })
    }

    /// The File entry sets of a folder, in on-disk order (the last folder is cached:
    /// the volume never changes under the reader).
    fn list_nodes(&self, dir: &Node, path: &str) -> Result<Arc<Vec<Node>>> {
        if let Some((_, nodes)) = self.cache.borrow().iter().find(|(id, _)| *id == dir.id) {
            return Ok(nodes.clone());
        }
        let nodes = Arc::new(self.parse_dir(dir, path)?);
        let mut cache = self.cache.borrow_mut();
        let mut held: usize = cache.iter().map(|(_, n)| n.len()).sum();
        while !cache.is_empty() && held.saturating_add(nodes.len()) > CACHE_NODES {
            held -= cache.remove(0).1.len();
        }
        cache.push((dir.id, nodes.clone()));
        Ok(nodes)
    }

    fn parse_dir(&self, dir: &Node, path: &str) -> Result<Vec<Node>> {
        let data = self.dir_data(dir, path)?;
        let b = &data.bytes;
        let n = b.len() / ENTRY;
        let mut out = Vec::new();
        let mut i = 0usize;
        while i < n {
            let e = &b[i * ENTRY..(i + 1) * ENTRY];
            let t = e[0];
            if t == T_END {
                break;
            }
            if t != T_FILE {
                // Deleted (bit 7 clear), label, bitmap, up-case table, GUID, padding,
                // vendor entries, and secondaries outside a File set: not files.
                i += 1;
                continue;
            }
            let at = data.volume_offset(&self.boot, i * ENTRY);
            let bad = |detail: String| {
                Error::corrupt("exFAT directory entry set", at, format!("{path}: {detail}"))
            };
            let secondaries = usize::from(e[1]);
            if !(2..=18).contains(&secondaries) {
                return Err(bad(format!("SecondaryCount {secondaries}")));
            }
            let end = i + 1 + secondaries;
            if end > n {
                return Err(bad("the set passes the end of the folder".into()));
            }
            let set = &b[i * ENTRY..end * ENTRY];
            let stored = le16(set, 2);
            let sum = set_checksum(set);
            if sum != stored {
                return Err(bad(format!(
                    "SetChecksum {stored:#06x}, computed {sum:#06x}"
                )));
            }
            out.push(parse_set(set, at).map_err(bad)?);
            i = end;
        }
        Ok(out)
    }

    /// The node `path` names.
    fn lookup(&self, path: &str) -> Result<Node> {
        let comps = crate::components(path)?;
        let mut node = self.root();
        let mut walked = String::new();
        for c in comps {
            if !node.dir {
                return Err(Error::WrongKind(format!(
                    "{path}: {walked} is not a directory"
                )));
            }
            let dir_path = if walked.is_empty() { "/" } else { &walked };
            node = find_name(&self.list_nodes(&node, dir_path)?, c, true, |e| {
                e.name.as_str().into()
            })
            .cloned()
            .ok_or_else(|| Error::NotFound(path.to_string()))?;
            walked.push('/');
            walked.push_str(&node.name);
        }
        Ok(node)
    }

    /// A regular file's node and the runs of its valid data.
    fn file(&self, path: &str) -> Result<(Node, Vec<Run>)> {
        let node = self.lookup(path)?;
        if node.dir {
            return Err(Error::WrongKind(format!("{path}: is a directory")));
        }
        let need = node.valid_len.div_ceil(self.boot.cluster_size());
        // The whole allocation must be sane, even the part past the valid data.
        let all = node.data_len.div_ceil(self.boot.cluster_size());
        let runs = self.chain(
            node.first_cluster,
            node.no_fat_chain,
            Some(all),
            all,
            "file",
            node.id,
        )?;
        Ok((node, trim(runs, need)))
    }
}

/// The first `need` clusters of `runs`.
fn trim(runs: Vec<Run>, need: u64) -> Vec<Run> {
    let mut left = need;
    let mut out = Vec::new();
    for (c, n) in runs {
        if left == 0 {
            break;
        }
        let take = n.min(left);
        out.push((c, take));
        left -= take;
    }
    out
}

/// Decodes a checksummed File entry set (`set`, the File entry and its secondaries) at
/// volume offset `at`; the error is the detail.
fn parse_set(set: &[u8], at: u64) -> std::result::Result<Node, String> {
    let attrs = le16(set, 4);
    let modified = le32(set, 12);
    let mtime = unix_time(modified, set[21], set[23]);
    let stream = &set[ENTRY..2 * ENTRY];
    if stream[0] != T_STREAM {
        return Err(format!(
            "the File entry is followed by type {:#04x}, not a Stream Extension",
            stream[0]
        ));
    }
    let flags = stream[1];
    let name_len = usize::from(stream[3]);
    let valid_len = le64(stream, 8);
    let first_cluster = le32(stream, 20);
    let data_len = le64(stream, 24);
    if name_len == 0 {
        return Err("NameLength 0".into());
    }
    if valid_len > data_len {
        return Err(format!(
            "ValidDataLength {valid_len} larger than DataLength {data_len}"
        ));
    }
    let mut units: Vec<u16> = Vec::with_capacity(name_len);
    for e in set[2 * ENTRY..].chunks_exact(ENTRY) {
        if e[0] & IN_USE == 0 {
            return Err(format!(
                "a secondary entry of type {:#04x} not in use",
                e[0]
            ));
        }
        if e[0] != T_NAME || units.len() >= name_len {
            continue; // other benign or critical secondaries: not needed to read
        }
        for k in 0..15 {
            if units.len() < name_len {
                units.push(le16(e, 2 + 2 * k));
            }
        }
    }
    if units.len() < name_len {
        return Err(format!(
            "NameLength {name_len}, but the File Name entries hold {}",
            units.len()
        ));
    }
    let (mtime, mtime_nanos) = match mtime {
        Some((s, n)) => (Some(s), n),
        None => (None, 0),
    };
    Ok(Node {
        name: String::from_utf16_lossy(&units),
        dir: attrs & ATTR_DIR != 0,
        first_cluster,
        no_fat_chain: flags & FLAG_NO_FAT_CHAIN != 0,
        data_len,
        valid_len,
        mtime,
        mtime_nanos,
        id: at,
    })
}

impl FileSystem for ExFat {
    fn kind(&self) -> FsKind {
        FsKind::ExFat
    }

    fn label(&self) -> Option<String> {
        self.label.clone()
    }

    fn list(&mut self, path: &str) -> Result<Vec<Entry>> {
        let node = self.lookup(path)?;
        if !node.dir {
            return Err(Error::WrongKind(format!("{path}: not a directory")));
        }
        Ok(self
            .list_nodes(&node, path)?
            .iter()
            .map(Node::entry)
            .collect())
    }

    fn stat(&mut self, path: &str) -> Result<Entry> {
        let node = self.lookup(path)?;
        Ok(if node.id == 0 {
            Entry::root(0)
        } else {
            node.entry()
        })
    }

    fn read_link(&mut self, path: &str) -> Result<String> {
        self.lookup(path)?;
        Err(Error::WrongKind(format!(
            "{path}: not a symbolic link (exFAT has none)"
        )))
    }

    fn read_file(&mut self, path: &str, out: &mut dyn Write) -> Result<u64> {
        let (node, runs) = self.file(path)?;
        let cs = self.boot.cluster_size();
        let mut buf = vec![0u8; READ_CHUNK];
        let mut done = 0u64;
        for (c, n) in runs {
            let start = self.boot.cluster_at(c);
            // Runs were trimmed to the valid data: the last one may hold less.
            let len = (n * cs).min(node.valid_len - done);
            let mut off = 0u64;
            while off < len {
                let k = (len - off).min(READ_CHUNK as u64) as usize;
                self.vol.read_at(&mut buf[..k], start + off)?;
                out.write_all(&buf[..k])?;
                off += k as u64;
            }
            done += len;
        }
        // Past ValidDataLength: zeros.
        buf.fill(0);
        while done < node.data_len {
            let k = (node.data_len - done).min(READ_CHUNK as u64) as usize;
            out.write_all(&buf[..k])?;
            done += k as u64;
        }
        Ok(done)
    }

    /// The volume ranges of the file's valid data (what lies past `ValidDataLength`
    /// reads as zeros and is left out).
    fn data_ranges(&mut self, path: &str) -> Result<Option<Vec<(u64, u64)>>> {
        let (node, runs) = self.file(path)?;
        let cs = self.boot.cluster_size();
        let mut done = 0u64;
        let mut out = Vec::with_capacity(runs.len());
        for (c, n) in runs {
            let len = (n * cs).min(node.valid_len - done);
            out.push((self.boot.cluster_at(c), len));
            done += len;
        }
        Ok(Some(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        // 2021-06-15 10:20:31.45 UTC: 30 s in 2 s steps, 145 (1.45 s) in 10 ms steps.
        let ts = (41 << 25) | (6 << 21) | (15 << 16) | (10 << 11) | (20 << 5) | 15;
        assert_eq!(unix_time(ts, 145, 0x80), Some((1_623_752_431, 450_000_000)));
        // The same instant noted as 12:20 at UTC+2 (8 quarters).
        let ts2 = (41 << 25) | (6 << 21) | (15 << 16) | (12 << 11) | (20 << 5) | 15;
        assert_eq!(
            unix_time(ts2, 145, 0x80 | 8),
            Some((1_623_752_431, 450_000_000))
        );
        // At UTC-5 (-20 quarters, 0x6C in 7 bits): 05:20 local.
        let ts3 = (41 << 25) | (6 << 21) | (15 << 16) | (5 << 11) | (20 << 5) | 15;
        assert_eq!(
            unix_time(ts3, 145, 0x80 | 0x6C),
            Some((1_623_752_431, 450_000_000))
        );
        assert_eq!(unix_time(0, 0, 0), None);
        assert_eq!(unix_time((13 << 21) | (1 << 16), 0, 0), None);
    }

    #[test]
    fn checksums() {
        // One byte after the skipped checksum field: rotate then add.
        let mut set = [0u8; 64];
        set[0] = 0x85;
        let c = set_checksum(&set);
        set[2] = 0xAB; // the checksum field itself does not count
        assert_eq!(set_checksum(&set), c);
        set[4] = 1;
        assert_ne!(set_checksum(&set), c);
        let mut region = vec![0u8; 11 * 512];
        let c = boot_checksum(&region);
        region[106] = 0xFF;
        region[112] = 0x33;
        assert_eq!(
            boot_checksum(&region),
            c,
            "flags and percent-in-use skipped"
        );
    }

    #[test]
    fn trimming_runs() {
        assert_eq!(trim(vec![(5, 3), (20, 4)], 5), vec![(5, 3), (20, 2)]);
        assert_eq!(trim(vec![(5, 3)], 0), vec![]);
    }
}
