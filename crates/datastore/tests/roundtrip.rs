//! Round trips: every input format (raw, VHD fixed and dynamic, VHDX, qcow2, made from
//! one raw fixture by qemu-img), into a plain and an encrypted datastore, read back
//! through `open_disk` and through `vdisk::copy::write_image`, byte for byte.
mod common;
use common::*;
use datastore::Datastore;

/// Converts the raw fixture to `fmt` with qemu-img (`opts` = `-o` options) and backs it
/// up into a plain and an encrypted datastore; both restores must equal the fixture.
fn round_trip(fmt: &str, opts: Option<&str>, want_format: &str, seed: u64) {
    let d = tempfile::tempdir().unwrap();
    let raw = d.path().join("disk.raw");
    let want = gen_raw(&raw, ODD_SIZE, seed);
    let img = if fmt == "raw" {
        raw.clone()
    } else {
        let img = d.path().join(format!("disk.{fmt}"));
        let mut args = vec!["convert", "-f", "raw", "-O", fmt];
        if let Some(o) = opts {
            args.extend(["-o", o]);
        }
        args.extend([s(&raw), s(&img)]);
        qemu_img(&args);
        img
    };
    // The image reads as the fixture before anything else is checked.
    let src = vdisk::open(&img).unwrap();
    assert_eq!(src.info().format.name(), want_format);
    assert_same(&read_disk(src.as_ref()), &want, "source image");
    drop(src);
    for encrypted in [false, true] {
        let what = format!("{fmt} {opts:?} encrypted={encrypted}");
        let dir = d.path().join(format!("ds-{encrypted}"));
        let ds = create_store(&dir, encrypted);
        let m = backup_full(&ds, "vm", &img);
        assert_eq!(m.disks.len(), 1);
        let rec = &m.disks[0];
        assert_eq!(rec.virtual_size, ODD_SIZE, "{what}");
        assert_eq!(rec.format, want_format, "{what}");
        assert_eq!(rec.name, img.file_name().unwrap().to_string_lossy());
        assert_eq!(m.base, None);
        // Nothing was read twice, every block is accounted for.
        let st = m.stats;
        let nblocks = ODD_SIZE.div_ceil(BS);
        assert_eq!(
            st.blocks_new + st.blocks_dedup + st.blocks_zero + st.blocks_reused,
            nblocks,
            "{what}: {st:?}"
        );
        assert_eq!(st.blocks_reused, 0, "{what}");
        assert!(st.bytes_read <= ODD_SIZE, "{what}: {st:?}");
        assert!(st.blocks_zero > 0 && st.blocks_new > 0, "{what}: {st:?}");
        assert_eq!(st.changed_bytes, None);
        // Reopen, as a restore in another process would.
        drop(ds);
        let ds = Datastore::open(&dir, None).unwrap();
        assert_eq!(ds.keys().encrypted(), encrypted);
        let m2 = ds.point(&m.id).unwrap();
        assert_same(&restore(&ds, &m2, 0), &want, &format!("{what}: open_disk"));
        let out = d.path().join("restored.raw");
        assert_same(
            &restore_to_raw(&ds, &m2, 0, &out),
            &want,
            &format!("{what}: write_image"),
        );
        assert_clean(&verify(&ds));
        // A second backup of the same image stores no new data blocks.
        let again = backup_full(&ds, "vm", &img);
        assert_eq!(again.stats.blocks_new, 0, "{what}: {:?}", again.stats);
        assert_same(&restore(&ds, &again, 0), &want, &format!("{what}: again"));
    }
}

#[test]
fn raw() {
    round_trip("raw", None, "raw", 1);
}

#[test]
fn vhd_fixed() {
    round_trip("vpc", Some("subformat=fixed,force_size=on"), "vhd", 2);
}

#[test]
fn vhd_dynamic() {
    round_trip("vpc", Some("subformat=dynamic,force_size=on"), "vhd", 3);
}

#[test]
fn vhdx() {
    round_trip("vhdx", None, "vhdx", 4);
}

#[test]
fn qcow2() {
    round_trip("qcow2", None, "qcow2", 5);
}

/// A datastore with a smaller block size restores the same bytes.
#[test]
fn small_block_size() {
    let d = tempfile::tempdir().unwrap();
    let raw = d.path().join("disk.raw");
    let want = gen_raw(&raw, (5 << 20) + 1536, 6);
    let dir = d.path().join("ds");
    let ds = Datastore::create(
        &dir,
        &datastore::StoreOptions {
            block_size: 4096,
            ..Default::default()
        },
    )
    .unwrap();
    let m = backup_full(&ds, "vm", &raw);
    assert_eq!(m.disks[0].block_size, 4096);
    assert_same(&restore(&ds, &m, 0), &want, "4 KiB blocks");
    assert_clean(&verify(&ds));
}
