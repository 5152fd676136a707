//! Reading a recovery point from the server during a recovery job: [`Fetch`] is the
//! [`BlobSource`] of the agent's [`PointDisk`]s (blobs fetched through the job's
//! `recovery-blob`/`recovery-blobs` routes, each one checked against its id, in
//! parallel batches, paced by a [`Throttle`] and counted in `fetched`), and
//! `image_options`, how a recovered disk's image is created. Shared by the
//! recoveries into new files (`recover.rs`) and over the original instance
//! (`original.rs`).

use crate::remote::{Transport, retry};
use crate::{Error, Result};
use datastore::crypto::Keys;
use datastore::{
    BlobSource, BlockRead, DiskRecord, DiskRef, Id, PointDisk, decode_framed_block,
    decode_framed_piece,
};
use locks::lock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vdisk::{CreateOptions, Format, Subformat};

/// The pacing of fetches: shared with the datastore's copies (it moved there).
pub use datastore::Throttle;

/// Block requests in flight per read (the copy runs up to four reads at once).
const FETCHERS: usize = 4;

/// What every disk of a recovery shares.
pub struct Fetch {
    pub transport: Arc<dyn Transport>,
    /// `/agent/jobs/{id}`.
    pub prefix: String,
    pub keys: Keys,
    pub cancel: Arc<AtomicBool>,
    pub throttle: Option<Throttle>,
    /// Framed bytes fetched so far.
    pub fetched: AtomicU64,
    pub budget: Duration,
}

impl Fetch {
    fn get(&self, id: Id) -> Result<Vec<u8>> {
        if self.cancel.load(Ordering::Relaxed) {
            return Err(Error::Cancelled("the recovery was cancelled".into()));
        }
        let path = format!("{}/recovery-blob/{}", self.prefix, id.to_hex());
        let framed = retry(
            self.budget,
            || self.cancel.load(Ordering::Relaxed),
            || self.transport.get_bytes(&path),
        )?;
        let n = framed.len() as u64;
        self.fetched.fetch_add(n, Ordering::Relaxed);
        if let Some(t) = &self.throttle {
            t.take(n, &self.cancel);
        }
        Ok(framed)
    }

    /// Several blobs in one round trip (`recovery-blobs`), in the order asked.
    fn get_many(&self, ids: &[Id]) -> Result<Vec<Vec<u8>>> {
        if self.cancel.load(Ordering::Relaxed) {
            return Err(Error::Cancelled("the recovery was cancelled".into()));
        }
        let mut body = Vec::with_capacity(ids.len() * 32);
        for id in ids {
            body.extend_from_slice(&id.0);
        }
        let body = bytes::Bytes::from(body);
        let path = format!("{}/recovery-blobs", self.prefix);
        let all = retry(
            self.budget,
            || self.cancel.load(Ordering::Relaxed),
            || self.transport.post_bytes(&path, body.clone()),
        )?;
        let n = all.len() as u64;
        let out = split_batch(&all, ids.len())?;
        self.fetched.fetch_add(n, Ordering::Relaxed);
        if let Some(t) = &self.throttle {
            t.take(n, &self.cancel);
        }
        Ok(out)
    }
}

impl std::fmt::Debug for Fetch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetch")
            .field("prefix", &self.prefix)
            .finish()
    }
}

/// A `recovery-blobs` answer: `count` times (u32 LE length, bytes), nothing after.
fn split_batch(all: &[u8], count: usize) -> Result<Vec<Vec<u8>>> {
    let bad = |what: String| Error::Server(format!("recovery-blobs answer: {what}"));
    let mut out = Vec::with_capacity(count);
    let mut rest = all;
    for i in 0..count {
        let (len, tail) = rest
            .split_first_chunk::<4>()
            .ok_or_else(|| bad(format!("blob {i} of {count} is missing")))?;
        let len = u32::from_le_bytes(*len) as usize;
        if tail.len() < len {
            return Err(bad(format!(
                "blob {i} claims {len} bytes, {} are left",
                tail.len()
            )));
        }
        let (blob, tail) = tail.split_at(len);
        out.push(blob.to_vec());
        rest = tail;
    }
    if !rest.is_empty() {
        return Err(bad(format!("{} bytes after the last blob", rest.len())));
    }
    Ok(out)
}

/// One disk of a recovery point, read from the server through a recovery job.
pub type RemotePointDisk<'a> = PointDisk<&'a Fetch>;

/// Disk `rec` of recovery point `point`, read through `fetch`.
pub fn open_disk<'a>(
    fetch: &'a Fetch,
    point: &str,
    rec: &DiskRecord,
) -> Result<RemotePointDisk<'a>> {
    PointDisk::with_record(fetch, point, rec.index as usize, rec)
        .map_err(|e| Error::Server(e.to_string()))
}

/// How a recovered disk's image is made, in `format`: raw fixed, the others dynamic;
/// the point's sector sizes where the format keeps them. One choice, so a recovery into
/// new files and one over the original instance write the same image.
pub(crate) fn image_options(format: Format, rec: &DiskRecord) -> CreateOptions {
    let subformat = if format == Format::Raw {
        Subformat::Fixed
    } else {
        Subformat::Dynamic
    };
    let mut opts = CreateOptions::new(format, subformat, rec.virtual_size);
    opts.logical_sector_size = if format == Format::Vhdx {
        rec.logical_sector_size
    } else {
        512
    };
    opts.physical_sector_size = rec.physical_sector_size.max(opts.logical_sector_size);
    opts
}

fn invalid(e: impl std::fmt::Display) -> vdisk::Error {
    vdisk::Error::Invalid(e.to_string())
}

impl BlobSource for Fetch {
    fn location(&self) -> String {
        "server".into()
    }

    fn piece(&self, id: Id) -> vdisk::Result<Vec<Id>> {
        let mut framed = self.get(id).map_err(invalid)?;
        decode_framed_piece(&self.keys, &mut framed, id).map_err(invalid)
    }

    /// Batches spread over up to [`FETCHERS`] threads, each batch one round trip.
    fn read_blocks(&self, disk: DiskRef<'_>, reads: &mut [BlockRead<'_>]) -> vdisk::Result<()> {
        let per = reads
            .len()
            .div_ceil(FETCHERS)
            .clamp(1, protocol::RECOVERY_BATCH);
        let batches = reads.chunks_mut(per);
        let threads = FETCHERS.min(batches.len());
        let queue = Mutex::new(batches);
        let failure: Mutex<Option<Error>> = Mutex::new(None);
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| {
                    loop {
                        if lock(&failure).is_some() {
                            return;
                        }
                        let Some(batch) = lock(&queue).next() else {
                            return;
                        };
                        if let Err(e) = self.fill(disk, batch) {
                            lock(&failure).get_or_insert(e);
                            return;
                        }
                    }
                });
            }
        });
        match lock(&failure).take() {
            Some(e) => Err(invalid(e)),
            None => Ok(()),
        }
    }
}

impl Fetch {
    /// Fetches a batch of blocks in one round trip, checks them and places each one's
    /// bytes.
    fn fill(&self, disk: DiskRef<'_>, batch: &mut [BlockRead<'_>]) -> Result<()> {
        let ids: Vec<Id> = batch.iter().map(|r| r.id).collect();
        let blobs = self.get_many(&ids)?;
        for (r, mut framed) in batch.iter_mut().zip(blobs) {
            let b = r.block;
            let plain =
                decode_framed_block(&self.keys, &mut framed, r.id).map_err(Error::Backup)?;
            if plain.len() != r.block_len {
                return Err(Error::Server(format!(
                    "recovery point {} disk {} block {b}: {} bytes, expected {}",
                    disk.point,
                    disk.rec.index,
                    plain.len(),
                    r.block_len
                )));
            }
            let src = plain
                .get(r.within..r.within + r.out.len())
                .ok_or_else(|| Error::Server(format!("block {b} is too short")))?;
            r.out.copy_from_slice(src);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_answers_are_split_and_checked() {
        let mut all = Vec::new();
        for b in [&b"abc"[..], b"", b"xy"] {
            all.extend_from_slice(&(b.len() as u32).to_le_bytes());
            all.extend_from_slice(b);
        }
        let got = split_batch(&all, 3).unwrap();
        assert_eq!(got, [b"abc".to_vec(), Vec::new(), b"xy".to_vec()]);
        // Fewer blobs than asked, a length past the end, bytes left over.
        assert!(
            split_batch(&all, 4)
                .unwrap_err()
                .to_string()
                .contains("blob 3 of 4")
        );
        assert!(
            split_batch(&all[..6], 3)
                .unwrap_err()
                .to_string()
                .contains("claims")
        );
        assert!(
            split_batch(&all, 2)
                .unwrap_err()
                .to_string()
                .contains("after the last")
        );
    }
}
