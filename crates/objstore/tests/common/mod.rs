//! Helpers the objstore test binaries share: targets on Azurite and moto, short test
//! deadlines, and a disk backed up to and restored from a datastore on a target.
#![allow(dead_code)] // each test binary uses its own part

use datastore::{BackupRequest, BaseChoice, Consistency, Datastore, DiskInput, Manifest, Source};
use objstore::{Options, Secret, Target};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use testkit::{AZURITE_ACCOUNT, AZURITE_KEY, Azurite, Moto};
use vdisk::VirtualDisk;

/// A container on Azurite (created there), as a target reached at `port` (Azurite's
/// own, or a proxy's in front of it).
pub fn azure_target_via(az: &Azurite, container: &str, port: u16) -> Target {
    az.create_container(container);
    Target::Azure {
        account: AZURITE_ACCOUNT.into(),
        container: container.into(),
        endpoint: Some(format!("http://127.0.0.1:{port}/{AZURITE_ACCOUNT}")),
        access_key: Secret::new(AZURITE_KEY),
    }
}

pub fn azure_target(az: &Azurite, container: &str) -> Target {
    azure_target_via(az, container, az.port())
}

/// A bucket on moto (created there), as a target reached at `port`.
pub fn s3_target_via(moto: &Moto, bucket: &str, port: u16) -> Target {
    moto.create_bucket(bucket);
    Target::S3 {
        bucket: bucket.into(),
        endpoint: Some(format!("http://127.0.0.1:{port}")),
        region: "us-east-1".into(),
        access_key_id: "testing".into(),
        secret_access_key: Secret::new("testing"),
    }
}

pub fn s3_target(moto: &Moto, bucket: &str) -> Target {
    s3_target_via(moto, bucket, moto.port())
}

/// Short lease and deadlines, so the lease tests run in seconds.
/// The keys `b` lists under `prefix`, in its order.
pub fn keys(b: &dyn datastore::Backend, prefix: &str) -> Vec<String> {
    b.list(prefix).unwrap().into_iter().map(|e| e.key).collect()
}

pub fn test_options() -> Options {
    Options {
        lease: Duration::from_secs(2),
        lock_wait: Duration::from_secs(10),
        retry_timeout: Duration::from_secs(5),
        ..Options::default()
    }
}

/// Backs up the raw image at `disk` as source `host/vm` (based on the latest point).
pub fn backup(ds: &Datastore, disk: &Path) -> datastore::Result<Manifest> {
    backup_with_progress(ds, disk, &mut |_, _| {})
}

/// [`backup`], calling `progress(done, total)` as it reads.
pub fn backup_with_progress(
    ds: &Datastore,
    disk: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> datastore::Result<Manifest> {
    let opened = vdisk::open(disk).unwrap();
    ds.backup(
        BackupRequest {
            source: Source {
                name: "host/vm".into(),
                id: "vm-uuid".into(),
            },
            consistency: Consistency::CrashConsistent,
            base: BaseChoice::Latest,
            disks: vec![DiskInput {
                disk: opened.as_ref(),
                name: "disk.raw".into(),
                format: "raw".into(),
                changed: None,
                excluded: Vec::new(),
            }],
        },
        progress,
    )
}

/// Restores disk 0 of `m` as a raw image at `out` and returns its bytes.
pub fn restore(ds: &Datastore, m: &Manifest, out: &Path) -> Vec<u8> {
    let idx = Arc::new(ds.blob_index().unwrap());
    let pd = ds.open_disk(m, 0, idx).unwrap();
    let opts = vdisk::CreateOptions::new(
        vdisk::Format::Raw,
        vdisk::Subformat::Fixed,
        pd.virtual_size(),
    );
    vdisk::copy::write_image(&pd, out, &opts, &mut |_, _| {}).unwrap();
    std::fs::read(out).unwrap()
}
