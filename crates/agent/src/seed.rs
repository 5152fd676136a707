//! Offline seeding (MABS "manual replica creation"): the first copy of a big VM written
//! to removable media on the host, carried to the server and imported there, instead
//! of sent over a slow network. The seed holds framed blobs exactly as a backup would
//! send them, plus the disk records; `holdfast replica import` replays them through the
//! server's normal ingest, so every blob is verified there.

use crate::provider::Provider;
use crate::{Error, Result};
use datastore::{BlockParams, BlockTarget, Id, backup_disks};
use protocol::{JobKind, ReplicaSeed, SEED_FORMAT, SEED_VERSION, SessionStart};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

/// Largest blob file: a size every file system of removable media takes.
const FILE_BYTES: usize = 32 << 20;

/// A block target writing blob files into a folder; it has nothing, so every block is
/// "missing" (the pipeline still stores each distinct block once).
struct SeedTarget {
    params: BlockParams,
    dir: PathBuf,
    state: Mutex<SeedState>,
}

#[derive(Default)]
struct SeedState {
    buf: Vec<u8>,
    files: Vec<String>,
    bytes: u64,
}

impl SeedTarget {
    fn flush(&self, st: &mut SeedState) -> datastore::Result<()> {
        if st.buf.is_empty() {
            return Ok(());
        }
        let name = format!("blobs-{:06}.bin", st.files.len() + 1);
        crate::write_durably(&self.dir.join(&name), &st.buf).map_err(|e| {
            datastore::Error::Invalid(format!("{}: {e}", self.dir.join(&name).display()))
        })?;
        st.bytes += st.buf.len() as u64;
        st.buf.clear();
        st.files.push(name);
        Ok(())
    }
}

impl BlockTarget for SeedTarget {
    fn params(&self) -> &BlockParams {
        &self.params
    }

    fn missing(&self, ids: &[Id]) -> datastore::Result<Vec<bool>> {
        Ok(vec![true; ids.len()])
    }

    fn read_piece(&self, _id: Id) -> datastore::Result<Vec<Id>> {
        Err(datastore::Error::Invalid(
            "a replica seed has no base to read from".into(),
        ))
    }

    fn put(&self, framed: &[u8]) -> datastore::Result<()> {
        let mut st = locks::lock(&self.state);
        st.buf.extend_from_slice(framed);
        if st.buf.len() >= FILE_BYTES {
            self.flush(&mut st)?;
        }
        Ok(())
    }

    fn finish(&self) -> datastore::Result<u64> {
        let mut st = locks::lock(&self.state);
        self.flush(&mut st)?;
        Ok(st.bytes)
    }
}

/// Writes a seed of `vm` (found by `provider`) into `to` (new or empty), with the
/// parameters the server gave (`start`). Returns the seed description.
pub fn export(
    provider: &dyn Provider,
    vm: &str,
    start: &SessionStart,
    to: &Path,
    threads: usize,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ReplicaSeed> {
    if to.exists()
        && std::fs::read_dir(to)
            .map_err(|e| Error::Invalid(format!("{}: {e}", to.display())))?
            .next()
            .is_some()
    {
        return Err(Error::Invalid(format!(
            "{}: folder is not empty; export a replica into a new or empty folder",
            to.display()
        )));
    }
    std::fs::create_dir_all(to).map_err(|e| Error::Invalid(format!("{}: {e}", to.display())))?;
    let params = crate::runtime::block_params(start)?;
    let target = SeedTarget {
        params,
        dir: to.to_path_buf(),
        state: Mutex::new(SeedState::default()),
    };
    // Taken before the view: the point is dated no later than the data it holds, so
    // the import never ranks it above a point with newer data.
    let viewed = utc::rfc3339(utc::now());
    let snap = provider.open_view(vm, JobKind::InitialReplica, None)?;
    let consistency = snap.consistency();
    // Nothing cancels an export but its own failure (the read deadline still holds).
    snap.start_reading(&Arc::new(AtomicBool::new(false)));
    let result = {
        let disks = snap.disks();
        backup_disks(&target, None, &disks, threads, progress)
    };
    let (disks, stats) = match result {
        Ok(r) => {
            snap.release(true)?;
            r
        }
        Err(e) => {
            let _ = snap.release(false);
            return Err(Error::Backup(e));
        }
    };
    let files = locks::lock(&target.state).files.clone();
    let seed = ReplicaSeed {
        format: SEED_FORMAT.into(),
        version: SEED_VERSION,
        source: start.source.clone(),
        created: utc::rfc3339(utc::now()),
        viewed: Some(viewed),
        block_size: start.block_size,
        piece_blocks: start.piece_blocks,
        consistency,
        disks: disks.into_iter().map(Into::into).collect(),
        stats: stats.into(),
        blob_files: files,
    };
    let body = serde_json::to_vec_pretty(&seed).map_err(|e| Error::Invalid(e.to_string()))?;
    crate::write_durably(&to.join("seed.json"), &body)
        .map_err(|e| Error::Invalid(format!("{}: {e}", to.join("seed.json").display())))?;
    Ok(seed)
}
