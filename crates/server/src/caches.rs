//! What the server keeps open between requests: recovery-point disks being browsed or
//! read block by block, and what each running recovery job may read. Plain data held
//! by [`crate::state::AppState`]; filled by the handlers that need it.

use datastore::{BlobIndex, Id, Manifest};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vdisk::VirtualDisk;

/// Disks kept open, and for how long: long enough for a client's burst of reads, short
/// enough that a gc's new pack layout is picked up soon.
const OPEN_DISKS: usize = 8;
const OPEN_FOR: Duration = Duration::from_secs(60);

/// A recovery point's disk with its manifest.
pub type Opened = (Arc<Manifest>, Arc<dyn VirtualDisk>);

/// A recovery point's disk kept open.
struct OpenDisk {
    /// Where it is read from: empty for the server's datastore, else a target's name.
    place: String,
    point: String,
    disk: u32,
    opened: Instant,
    manifest: Arc<Manifest>,
    vd: Arc<dyn VirtualDisk>,
}

/// Recovery-point disks opened for browsing and block reads, newest last (opening one
/// loads the blob index; an NBD client reads thousands of times).
#[derive(Default)]
pub struct OpenDisks(Mutex<Vec<OpenDisk>>);

impl OpenDisks {
    /// Disk `disk` of point `id` with its manifest, when opened less than a minute ago.
    pub fn get(&self, place: &str, id: &str, disk: u32) -> Option<Opened> {
        let mut c = locks::lock(&self.0);
        c.retain(|o| o.opened.elapsed() < OPEN_FOR);
        c.iter()
            .find(|o| o.place == place && o.point == id && o.disk == disk)
            .map(|o| (o.manifest.clone(), o.vd.clone()))
    }

    /// Keeps disk `disk` of `manifest` open, dropping the oldest when full.
    pub fn put(&self, place: &str, disk: u32, manifest: Arc<Manifest>, vd: Arc<dyn VirtualDisk>) {
        let mut c = locks::lock(&self.0);
        if c.len() >= OPEN_DISKS {
            c.remove(0);
        }
        c.push(OpenDisk {
            place: place.to_string(),
            point: manifest.id.clone(),
            disk,
            opened: Instant::now(),
            manifest,
            vd,
        });
    }
}

/// What a running recovery job may read: the blob index and the point's blob ids.
pub struct Access {
    /// The datastore read (the server's, or a storage target's online copy).
    pub store: Arc<datastore::Datastore>,
    pub index: Arc<BlobIndex>,
    pub allowed: HashSet<Id>,
}

/// Storage targets' online datastores opened so far, by target name (opening one reads
/// its config over the network).
#[derive(Default)]
pub struct OnlineStores(Mutex<std::collections::HashMap<String, Arc<datastore::Datastore>>>);

impl OnlineStores {
    pub fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, Arc<datastore::Datastore>>>
    {
        locks::lock(&self.0)
    }
}
