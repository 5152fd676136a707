//! Opening and creating a datastore; its configuration, manifests and blob index.

use crate::backend::{Backend, LocalBackend};
use crate::crypto::{self, Keys};
use crate::error::{Error, Result};
use crate::format::{self, Kind, PackEntry};
use crate::id::Id;
use crate::manifest::{MANIFEST_FORMAT, MANIFEST_VERSION, Manifest};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

pub const CONFIG_KEY: &str = "holdfast-datastore.json";
pub const CONFIG_FORMAT: &str = "holdfast-datastore";
pub const CONFIG_VERSION: u32 = 1;
pub const DAMAGED_KEY: &str = "damaged";

/// Default bytes per index entry: the unit of change detection and of storage for
/// changed data.
pub const DEFAULT_BLOCK_SIZE: u32 = 64 * 1024;
/// Index entries per index piece (64 MiB of disk at the default block size).
pub const DEFAULT_PIECE_BLOCKS: u32 = 1024;
/// Target size of a pack file.
pub const DEFAULT_PACK_SIZE: u32 = 8 << 20;

/// `holdfast-datastore.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub format: String,
    pub version: u32,
    pub id: String,
    pub created: String,
    pub block_size: u32,
    pub piece_blocks: u32,
    pub pack_size: u32,
    pub zstd_level: i32,
    pub encryption: Option<Encryption>,
    /// BLAKE3 of this file's JSON with `checksum` empty.
    pub checksum: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Encryption {
    pub algorithm: String,
    pub key_fingerprint: String,
}

impl Config {
    fn compute_checksum(&self) -> Result<String> {
        let mut c = self.clone();
        c.checksum.clear();
        let body = serde_json::to_vec(&c).map_err(|e| Error::Invalid(e.to_string()))?;
        Ok(blake3::hash(&body).to_hex().to_string())
    }
}

/// Options of `datastore create`.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Write a key file here and encrypt everything.
    pub key_file: Option<PathBuf>,
    pub zstd_level: i32,
    pub block_size: u32,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            key_file: None,
            zstd_level: 1,
            block_size: DEFAULT_BLOCK_SIZE,
        }
    }
}

/// A recovery point that could not be read.
#[derive(Debug)]
pub struct DamagedPoint {
    pub key: String,
    pub error: Error,
}

/// Where every blob is: loaded from the index files.
#[derive(Debug, Default)]
pub struct BlobIndex {
    pub packs: Vec<Id>,
    pub map: HashMap<Id, Loc>,
    /// Index files read, for gc.
    pub files: Vec<String>,
    /// Index files and packs that could not be read, with the reason.
    pub damaged_files: Vec<(String, String)>,
}

/// A blob's place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loc {
    pub pack: u32,
    pub offset: u32,
    pub len: u32,
    pub kind: Kind,
}

impl BlobIndex {
    pub fn contains(&self, id: &Id) -> bool {
        self.map.contains_key(id)
    }
}

/// A blob location found damaged by verify: (pack id, offset).
pub type BadLoc = (Id, u32);

/// The offset recorded in the damaged list for a pack whose trailer is damaged.
pub const TRAILER_DAMAGED: u32 = u32::MAX;

/// An open datastore.
#[derive(Debug)]
pub struct Datastore {
    pub(crate) backend: Box<dyn Backend>,
    pub(crate) config: Config,
    pub(crate) keys: Keys,
    pub(crate) threads: usize,
}

/// Where a datastore's key file is by default: beside the folder, never inside it
/// (`/srv/ds` → `/srv/ds.key`), so copying the datastore does not copy its key.
pub fn default_key_path(dir: &Path) -> PathBuf {
    let mut s = dir.as_os_str().to_owned();
    while s.len() > 1 && s.to_string_lossy().ends_with('/') {
        let t = s.to_string_lossy().trim_end_matches('/').to_string();
        s = t.into();
    }
    s.push(".key");
    PathBuf::from(s)
}

impl Datastore {
    /// Creates a datastore in `dir` (which must not exist or be empty).
    pub fn create(dir: &Path, opts: &StoreOptions) -> Result<Datastore> {
        check_options(opts)?;
        match std::fs::read_dir(dir) {
            Ok(mut rd) => {
                if rd.next().is_some() {
                    return Err(Error::Invalid(format!(
                        "{}: folder is not empty; a new datastore needs an empty or new folder",
                        dir.display()
                    )));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, "create folder", e))?;
            }
            Err(e) => return Err(Error::io(dir, "open folder", e)),
        }
        Self::create_on(
            Box::new(LocalBackend::new(dir)),
            &dir.display().to_string(),
            opts,
        )
    }

    /// Creates a datastore on any backend (an object store's container or bucket),
    /// which must hold no object yet. `location` names it in messages. An encrypted
    /// datastore's key file is written to the local path `opts.key_file`.
    pub fn create_on(
        backend: Box<dyn Backend>,
        location: &str,
        opts: &StoreOptions,
    ) -> Result<Datastore> {
        check_options(opts)?;
        if let Some(e) = backend.list("")?.first() {
            return Err(Error::Invalid(format!(
                "{location}: not empty ({} exists); a new datastore needs an empty folder, container or bucket",
                e.key
            )));
        }
        let id = crypto::random_hex(16)?;
        let (keys, encryption) = match &opts.key_file {
            Some(path) => {
                let mut master = [0u8; 32];
                crypto::random(&mut master)?;
                crypto::write_key_file(path, &id, &master)?;
                (
                    Keys::from_master(&master)?,
                    Some(Encryption {
                        algorithm: "aes-256-gcm".into(),
                        key_fingerprint: crypto::fingerprint(&master),
                    }),
                )
            }
            None => (Keys::plain(), None),
        };
        let mut config = Config {
            format: CONFIG_FORMAT.into(),
            version: CONFIG_VERSION,
            id,
            created: utc::rfc3339(utc::now()),
            block_size: opts.block_size,
            piece_blocks: DEFAULT_PIECE_BLOCKS,
            pack_size: DEFAULT_PACK_SIZE,
            zstd_level: opts.zstd_level,
            encryption,
            checksum: String::new(),
        };
        config.checksum = config.compute_checksum()?;
        let mut body =
            serde_json::to_vec_pretty(&config).map_err(|e| Error::Invalid(e.to_string()))?;
        body.push(b'\n');
        // Write-once: of two creators racing, one wins.
        if !backend.put_new(CONFIG_KEY, &body)? {
            return Err(Error::Invalid(format!("{location}: already a datastore")));
        }
        Ok(Datastore {
            backend,
            config,
            keys,
            threads: default_threads(),
        })
    }

    /// Opens the datastore in `dir`; an encrypted one needs its key file (`key_file`,
    /// else [`default_key_path`]).
    pub fn open(dir: &Path, key_file: Option<&Path>) -> Result<Datastore> {
        Self::open_inner(
            Box::new(LocalBackend::new(dir)),
            &dir.display().to_string(),
            &dir.join(CONFIG_KEY).display().to_string(),
            key_file,
            Some(default_key_path(dir)),
        )
    }

    /// Opens the datastore on any backend; an encrypted one needs its key file (there
    /// is no default place beside an object store).
    pub fn open_on(
        backend: Box<dyn Backend>,
        location: &str,
        key_file: Option<&Path>,
    ) -> Result<Datastore> {
        Self::open_inner(
            backend,
            location,
            &format!("{location}/{CONFIG_KEY}"),
            key_file,
            None,
        )
    }

    fn open_inner(
        backend: Box<dyn Backend>,
        location: &str,
        config_name: &str,
        key_file: Option<&Path>,
        default_key: Option<PathBuf>,
    ) -> Result<Datastore> {
        let body = match backend.get(CONFIG_KEY) {
            Ok(b) => b,
            Err(Error::Missing { .. }) => {
                return Err(Error::Format(format!(
                    "{location}: not a holdfast datastore ({CONFIG_KEY} not found); create one with `holdfast datastore create`"
                )));
            }
            Err(e) => return Err(e),
        };
        let config = parse_config(config_name, &body)?;
        let keys = match &config.encryption {
            // A key given for a plain datastore is a mistake worth naming: the user
            // believes the data is encrypted, or has the wrong datastore.
            None if key_file.is_some() => {
                return Err(Error::Key(format!(
                    "{}: datastore {location} is not encrypted, so it takes no key file; leave out --key-file (or check that this is the datastore meant)",
                    key_file
                        .map(Path::display)
                        .map(|d| d.to_string())
                        .unwrap_or_default(),
                )));
            }
            None => Keys::plain(),
            Some(enc) => {
                if enc.algorithm != "aes-256-gcm" {
                    return Err(Error::Format(format!(
                        "{location}: unknown encryption {:?}",
                        enc.algorithm
                    )));
                }
                let path = match key_file.map(Path::to_path_buf).or(default_key) {
                    Some(p) => p,
                    None => {
                        return Err(Error::Key(format!(
                            "{location}: the datastore is encrypted; give its key file (--key-file)"
                        )));
                    }
                };
                let master = crypto::read_key_file(&path)?;
                if crypto::fingerprint(&master) != enc.key_fingerprint {
                    return Err(Error::Key(format!(
                        "{}: wrong key: this key file does not belong to datastore {location} (fingerprint mismatch)",
                        path.display(),
                    )));
                }
                Keys::from_master(&master)?
            }
        };
        Ok(Datastore {
            backend,
            config,
            keys,
            threads: default_threads(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn backend(&self) -> &dyn Backend {
        self.backend.as_ref()
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Worker threads for hashing and compression (default: the number of cores).
    pub fn set_threads(&mut self, n: usize) {
        self.threads = n.max(1);
    }

    // ---- recovery points ----

    pub(crate) fn point_key(id: &str) -> String {
        format!("points/{id}")
    }

    /// Reads one recovery point's manifest.
    pub fn point(&self, id: &str) -> Result<Manifest> {
        if id.is_empty()
            || !id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        {
            return Err(Error::Invalid(format!("{id:?} is not a recovery point id")));
        }
        let key = Self::point_key(id);
        let body = match self.backend.get(&key) {
            Err(Error::Missing { .. }) => {
                return Err(Error::Invalid(format!(
                    "no recovery point {id} in {}",
                    self.backend.location()
                )));
            }
            r => r?,
        };
        let m = self.parse_manifest(&key, &body)?;
        if m.id != id {
            return Err(Error::corrupt(
                &key,
                format!("holds recovery point {} instead", m.id),
            ));
        }
        Ok(m)
    }

    fn parse_manifest(&self, key: &str, body: &[u8]) -> Result<Manifest> {
        let json = format::open_sealed(&self.keys, key, body)?;
        let v: serde_json::Value = serde_json::from_slice(&json)
            .map_err(|e| Error::corrupt(key, format!("manifest is not JSON: {e}")))?;
        if v.get("format").and_then(|f| f.as_str()) != Some(MANIFEST_FORMAT) {
            return Err(Error::corrupt(key, "not a recovery-point manifest"));
        }
        let version = v.get("version").and_then(|f| f.as_u64()).unwrap_or(0);
        if version > MANIFEST_VERSION as u64 {
            return Err(Error::Format(format!(
                "{key}: recovery point format version {version} is newer than this holdfast understands ({MANIFEST_VERSION}); upgrade holdfast"
            )));
        }
        serde_json::from_value(v).map_err(|e| Error::corrupt(key, format!("manifest: {e}")))
    }

    /// Every recovery point, oldest first, and those that could not be read.
    pub fn points(&self) -> Result<(Vec<Manifest>, Vec<DamagedPoint>)> {
        let mut good = Vec::new();
        let mut bad = Vec::new();
        for e in self.backend.list("points/")? {
            match self
                .backend
                .get(&e.key)
                .and_then(|b| self.parse_manifest(&e.key, &b))
            {
                Ok(m) => good.push(m),
                Err(error) => bad.push(DamagedPoint { key: e.key, error }),
            }
        }
        good.sort_by(|a: &Manifest, b: &Manifest| {
            (a.created_unix, &a.id).cmp(&(b.created_unix, &b.id))
        });
        Ok((good, bad))
    }

    /// Picks a recovery point of `source`: `latest`, an id, or `None` = latest.
    pub fn find_point(&self, source: &str, point: Option<&str>) -> Result<Manifest> {
        match point {
            Some(id) if id != "latest" => {
                let m = self.point(id)?;
                if m.source.name != source {
                    return Err(Error::Invalid(format!(
                        "recovery point {id} belongs to source {:?}, not {source:?}",
                        m.source.name
                    )));
                }
                Ok(m)
            }
            _ => {
                let (points, _) = self.points()?;
                points
                    .into_iter()
                    .rev()
                    .find(|m| m.source.name == source)
                    .ok_or_else(|| {
                        Error::Invalid(format!(
                            "no recovery point of source {source:?} in {}",
                            self.backend.location()
                        ))
                    })
            }
        }
    }

    pub(crate) fn write_manifest(&self, m: &Manifest) -> Result<()> {
        let key = Self::point_key(&m.id);
        let json = serde_json::to_vec_pretty(m).map_err(|e| Error::Invalid(e.to_string()))?;
        let body = format::seal_file(&self.keys, &key, &json)?;
        if !self.backend.put_new(&key, &body)? {
            return Err(Error::Invalid(format!(
                "recovery point {} already exists",
                m.id
            )));
        }
        Ok(())
    }

    /// Removes a recovery point's manifest (its data goes at the next gc).
    pub fn forget(&self, id: &str) -> Result<()> {
        // Under the lock as prune removes points: on object storage, the lease fences
        // the delete against another server writing.
        let _lock = self.backend.lock(false, true)?;
        self.forget_locked(id)
    }

    /// [`Datastore::forget`] for a caller that holds the lock (prune).
    pub(crate) fn forget_locked(&self, id: &str) -> Result<()> {
        self.backend.delete(&Self::point_key(id))
    }

    // ---- blobs ----

    /// Loads every index file, then reads the trailer of any pack no index file covers
    /// (an index file lost or damaged, or a backup interrupted before writing its
    /// index): index files are an accelerator, the packs are the truth. Locations
    /// verify found damaged are left out, so a blob whose only copies are damaged counts
    /// as absent (and the next backup that reads it stores it again).
    pub fn blob_index(&self) -> Result<BlobIndex> {
        let damaged: HashSet<BadLoc> = self.damaged()?.into_iter().collect();
        let mut idx = BlobIndex::default();
        for (pack, entries) in self.pack_tables(&mut idx.files, &mut idx.damaged_files)? {
            idx.packs.push(pack);
            let no = (idx.packs.len() - 1) as u32;
            for pe in entries {
                if damaged.contains(&(pack, pe.offset)) {
                    continue;
                }
                idx.map.entry(pe.id).or_insert(Loc {
                    pack: no,
                    offset: pe.offset,
                    len: pe.len,
                    kind: pe.kind,
                });
            }
        }
        Ok(idx)
    }

    /// Every pack's entry table: from the index files, else from the pack's trailer.
    /// Packs listed by an index file but missing are left out (verify reports them).
    pub(crate) fn pack_tables(
        &self,
        files: &mut Vec<String>,
        damaged_files: &mut Vec<(String, String)>,
    ) -> Result<Vec<(Id, Vec<PackEntry>)>> {
        let mut tables: Vec<(Id, Vec<PackEntry>)> = Vec::new();
        let mut seen: HashMap<Id, usize> = HashMap::new();
        for e in self.backend.list("index/")? {
            let parsed = self
                .backend
                .get(&e.key)
                .and_then(|body| format::decode_index(&e.key, &body));
            match parsed {
                Ok(list) => {
                    for (pack, entries) in list {
                        if let std::collections::hash_map::Entry::Vacant(v) = seen.entry(pack) {
                            v.insert(tables.len());
                            tables.push((pack, entries));
                        }
                    }
                    files.push(e.key);
                }
                Err(err) => damaged_files.push((e.key, err.to_string())),
            }
        }
        let mut present = HashSet::new();
        for e in self.backend.list("packs/")? {
            let Some(id) = e.key.rsplit('/').next().and_then(Id::from_hex) else {
                continue;
            };
            present.insert(id);
            if seen.contains_key(&id) {
                continue;
            }
            match self.read_trailer(&e.key, e.size) {
                Ok(entries) => {
                    seen.insert(id, tables.len());
                    tables.push((id, entries));
                }
                Err(err) => damaged_files.push((e.key, err.to_string())),
            }
        }
        tables.retain(|(p, _)| present.contains(p));
        Ok(tables)
    }

    /// The size of every pack file, by key.
    pub(crate) fn pack_sizes(&self) -> Result<HashMap<String, u64>> {
        Ok(self
            .backend
            .list("packs/")?
            .into_iter()
            .map(|e| (e.key, e.size))
            .collect())
    }

    /// Reads a pack's entry table from its trailer.
    pub(crate) fn read_trailer(&self, key: &str, size: u64) -> Result<Vec<PackEntry>> {
        let fixed = format::PACK_TAIL_LEN as u64;
        if size < fixed + 8 {
            return Err(Error::corrupt(key, "pack too short"));
        }
        let mut tail = vec![0u8; fixed as usize];
        self.backend.get_range(key, size - fixed, &mut tail)?;
        let table = (format::trailer_count(&tail) as u64)
            .checked_mul(format::ENTRY_LEN as u64)
            .filter(|&t| t + fixed + 8 <= size)
            .ok_or_else(|| Error::corrupt(key, "pack trailer: entry count out of range"))?;
        let mut all = vec![0u8; (table + fixed) as usize];
        self.backend
            .get_range(key, size - table - fixed, &mut all)?;
        format::parse_pack_trailer(key, size, &all)
    }

    /// Reads and checks one blob.
    pub fn read_blob(&self, idx: &BlobIndex, id: Id, out: &mut Vec<u8>) -> Result<()> {
        let loc = idx.map.get(&id).ok_or_else(|| Error::Missing {
            key: format!("blob {id}"),
        })?;
        self.read_blob_at(idx.packs[loc.pack as usize], loc, id, out)
    }

    pub(crate) fn read_blob_at(
        &self,
        pack: Id,
        loc: &Loc,
        id: Id,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        self.with_framed(pack, loc, |key, framed| {
            format::decode_blob(&self.keys, key, loc.offset as u64, id, framed, out).map(|_| ())
        })
    }

    /// One blob's framed bytes exactly as stored (data or index), unchecked: for a
    /// client that decodes and checks them itself (an agent recovering a VM).
    pub fn framed_blob(&self, idx: &BlobIndex, id: Id) -> Result<Vec<u8>> {
        let loc = idx.map.get(&id).ok_or_else(|| Error::Missing {
            key: format!("blob {id}"),
        })?;
        let pack = idx.packs[loc.pack as usize];
        let mut buf = vec![0u8; loc.len as usize];
        self.backend
            .get_range(&format::pack_key(&pack), loc.offset as u64, &mut buf)?;
        Ok(buf)
    }

    /// Reads one pack entry's framed bytes and checks them (plaintext into `plain`);
    /// returns the framed bytes, as stored (gc copies them, verify only checks).
    pub(crate) fn read_entry(
        &self,
        pack: Id,
        e: &PackEntry,
        plain: &mut Vec<u8>,
    ) -> Result<Vec<u8>> {
        let key = format::pack_key(&pack);
        let mut buf = vec![0u8; e.len as usize];
        self.backend.get_range(&key, e.offset as u64, &mut buf)?;
        let framed = buf.clone();
        format::decode_blob(&self.keys, &key, e.offset as u64, e.id, &mut buf, plain)?;
        Ok(framed)
    }

    /// Reads and checks one blob into `out`, which must be exactly its plaintext length.
    pub fn read_blob_into(&self, idx: &BlobIndex, id: Id, out: &mut [u8]) -> Result<()> {
        let loc = idx.map.get(&id).ok_or_else(|| Error::Missing {
            key: format!("blob {id}"),
        })?;
        self.with_framed(idx.packs[loc.pack as usize], loc, |key, framed| {
            format::decode_blob_into(&self.keys, key, loc.offset as u64, id, framed, out)
                .map(|_| ())
        })
    }

    /// Reads a blob's framed bytes into a per-thread buffer and hands them to `f`.
    fn with_framed<T>(
        &self,
        pack: Id,
        loc: &Loc,
        f: impl FnOnce(&str, &mut [u8]) -> Result<T>,
    ) -> Result<T> {
        thread_local! {
            static FRAMED: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let key = format::pack_key(&pack);
        FRAMED.with(|b| {
            let mut buf = b.borrow_mut();
            buf.resize(loc.len as usize, 0);
            self.backend.get_range(&key, loc.offset as u64, &mut buf)?;
            f(&key, &mut buf)
        })
    }

    /// Reads an index piece: `piece_blocks` block ids.
    pub fn read_piece(&self, idx: &BlobIndex, id: Id) -> Result<Vec<Id>> {
        let mut raw = Vec::new();
        self.read_blob(idx, id, &mut raw)?;
        if raw.len() % 32 != 0 {
            return Err(Error::corrupt(
                format!("index piece {id}"),
                "length is not a multiple of 32",
            ));
        }
        Ok(raw.chunks_exact(32).filter_map(Id::from_slice).collect())
    }

    /// The blob locations verify last found damaged.
    pub fn damaged(&self) -> Result<Vec<BadLoc>> {
        let body = match self.backend.get(DAMAGED_KEY) {
            Ok(b) => b,
            Err(Error::Missing { .. }) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        // Without this list a backup could reuse a copy verify found bad, so an
        // unreadable list stops backups; say how to rebuild it.
        let unreadable = |detail: String| {
            Error::corrupt(
                DAMAGED_KEY,
                format!(
                    "verify's list of damaged blocks is unreadable ({detail}); \
                     run `holdfast verify` (or `holdfast jobs run verify`) to rebuild it"
                ),
            )
        };
        let json = format::open_sealed(&self.keys, DAMAGED_KEY, &body).map_err(|e| match e {
            Error::Corrupt { detail, .. } => unreadable(detail),
            e => e,
        })?;
        let list: Vec<(String, u32)> =
            serde_json::from_slice(&json).map_err(|e| unreadable(e.to_string()))?;
        list.into_iter()
            .map(|(p, o)| {
                Id::from_hex(&p)
                    .map(|id| (id, o))
                    .ok_or_else(|| unreadable(format!("bad pack id {p:?}")))
            })
            .collect()
    }

    pub(crate) fn write_damaged(&self, list: &[BadLoc]) -> Result<()> {
        if list.is_empty() {
            return self.backend.delete(DAMAGED_KEY);
        }
        let v: Vec<(String, u32)> = list.iter().map(|(p, o)| (p.to_hex(), *o)).collect();
        let json = serde_json::to_vec(&v).map_err(|e| Error::Invalid(e.to_string()))?;
        self.backend.put(
            DAMAGED_KEY,
            &format::seal_file(&self.keys, DAMAGED_KEY, &json)?,
        )
    }

    /// Writes an index file for packs just stored.
    pub(crate) fn write_index(&self, name: &str, packs: &[(Id, Vec<PackEntry>)]) -> Result<()> {
        if packs.is_empty() {
            return Ok(());
        }
        self.backend
            .put(&format!("index/{name}"), &format::encode_index(packs))
    }
}

fn parse_config(name: &str, body: &[u8]) -> Result<Config> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| Error::corrupt(name, format!("not JSON: {e}")))?;
    if v.get("format").and_then(|f| f.as_str()) != Some(CONFIG_FORMAT) {
        return Err(Error::Format(format!(
            "{name}: not a holdfast datastore configuration"
        )));
    }
    let version = v.get("version").and_then(|f| f.as_u64()).unwrap_or(0);
    if version > CONFIG_VERSION as u64 {
        return Err(Error::Format(format!(
            "{name}: datastore format version {version} is newer than this holdfast understands ({CONFIG_VERSION}); upgrade holdfast"
        )));
    }
    let c: Config = serde_json::from_value(v).map_err(|e| Error::corrupt(name, e.to_string()))?;
    if c.compute_checksum()? != c.checksum {
        return Err(Error::corrupt(name, "checksum mismatch"));
    }
    if !c.block_size.is_power_of_two()
        || !(4096..=1 << 20).contains(&c.block_size)
        || c.piece_blocks == 0
        || c.piece_blocks > 1 << 16
        || !(1 << 20..=1 << 30).contains(&c.pack_size)
        || !(1..=22).contains(&c.zstd_level)
    {
        return Err(Error::corrupt(name, "a field is out of range"));
    }
    Ok(c)
}

fn check_options(opts: &StoreOptions) -> Result<()> {
    if !(1..=22).contains(&opts.zstd_level) {
        return Err(Error::Invalid(format!(
            "zstd level {} is out of range (1-22)",
            opts.zstd_level
        )));
    }
    if !opts.block_size.is_power_of_two() || !(4096..=1 << 20).contains(&opts.block_size) {
        return Err(Error::Invalid(format!(
            "block size {} must be a power of two from 4096 to 1048576",
            opts.block_size
        )));
    }
    Ok(())
}

fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_path_is_beside_the_folder() {
        assert_eq!(
            default_key_path(Path::new("/srv/ds/")),
            PathBuf::from("/srv/ds.key")
        );
        assert_eq!(default_key_path(Path::new("ds")), PathBuf::from("ds.key"));
    }

    #[test]
    fn create_open_and_wrong_key() {
        let d = tempfile::tempdir().unwrap();
        let ds = d.path().join("ds");
        let key = d.path().join("ds.key");
        Datastore::create(
            &ds,
            &StoreOptions {
                key_file: Some(key.clone()),
                ..Default::default()
            },
        )
        .unwrap();
        assert!(Datastore::open(&ds, None).unwrap().keys().encrypted());
        let other = d.path().join("other.key");
        crypto::write_key_file(&other, "x", &[9; 32]).unwrap();
        let e = Datastore::open(&ds, Some(&other)).unwrap_err().to_string();
        assert!(e.contains("wrong key"), "{e}");
        let e = Datastore::open(&ds, Some(&d.path().join("none")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("key file not found"), "{e}");
        // A newer format version is refused by name.
        let cfg = ds.join(CONFIG_KEY);
        let s = std::fs::read_to_string(&cfg)
            .unwrap()
            .replace("\"version\": 1", "\"version\": 2");
        std::fs::write(&cfg, s).unwrap();
        let e = Datastore::open(&ds, None).unwrap_err().to_string();
        assert!(e.contains("newer"), "{e}");
    }
}
