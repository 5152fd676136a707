//! Hand-made hostile or unusual tables no tool writes: EBR loops, endless chains, huge
//! GPT entry arrays, 4096-byte-sector GPT on a disk that reports 512.

use fsview::{Error, PartKind, TableKind, read_partitions};

fn disk(img: Vec<u8>) -> Box<dyn vdisk::VirtualDisk> {
    vdisk::open_backing(vdisk::MemBacking::new(img, "crafted.img")).unwrap()
}

fn entry(sector: &mut [u8], slot: usize, status: u8, ptype: u8, lba: u32, count: u32) {
    let e = &mut sector[446 + 16 * slot..446 + 16 * (slot + 1)];
    e[0] = status;
    e[4] = ptype;
    e[8..12].copy_from_slice(&lba.to_le_bytes());
    e[12..16].copy_from_slice(&count.to_le_bytes());
    sector[510] = 0x55;
    sector[511] = 0xAA;
}

fn corrupt_what(r: fsview::Result<fsview::PartitionTable>) -> (String, String) {
    match r {
        Err(Error::Corrupt { what, detail, .. }) => (what, detail),
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[test]
fn ebr_chain_looping_to_itself_is_corrupt() {
    let mut img = vec![0u8; 8 << 20];
    entry(&mut img[..512], 0, 0, 0x05, 2048, 8192);
    let ebr = &mut img[2048 * 512..2049 * 512];
    entry(ebr, 0, 0, 0x83, 63, 100);
    entry(ebr, 1, 0, 0x05, 0, 8192); // next EBR: the extended start, i.e. itself
    let (what, detail) = corrupt_what(read_partitions(disk(img).as_ref()));
    assert_eq!(what, "EBR chain");
    assert!(detail.contains("loop"), "{detail}");
}

#[test]
fn ebr_chain_is_bounded() {
    // 200 EBRs one sector apart, each with a one-sector logical partition after it.
    let mut img = vec![0u8; 8 << 20];
    entry(&mut img[..512], 0, 0, 0x0F, 2048, 4096);
    for i in 0..200u32 {
        let at = (2048 + 2 * i) as usize * 512;
        let ebr = &mut img[at..at + 512];
        entry(ebr, 0, 0, 0x83, 1, 1);
        entry(ebr, 1, 0, 0x05, 2 * (i + 1), 2);
    }
    let (what, detail) = corrupt_what(read_partitions(disk(img).as_ref()));
    assert_eq!(what, "EBR chain");
    assert!(detail.contains("128"), "{detail}");
}

#[test]
fn logical_outside_extended_is_corrupt() {
    let mut img = vec![0u8; 8 << 20];
    entry(&mut img[..512], 0, 0x80, 0x85, 2048, 2048);
    let ebr = &mut img[2048 * 512..2049 * 512];
    entry(ebr, 0, 0, 0x83, 4096, 100);
    let (what, _) = corrupt_what(read_partitions(disk(img).as_ref()));
    assert!(what.starts_with("logical partition 5"), "{what}");
}

#[test]
fn invalid_mbr_status_means_no_table() {
    let mut img = vec![0u8; 1 << 20];
    entry(&mut img[..512], 0, 0x13, 0x83, 2048, 10);
    let t = read_partitions(disk(img).as_ref()).unwrap();
    assert_eq!(t.kind, TableKind::None);
    assert!(t.partitions.is_empty());
    assert_eq!(t.notes.len(), 1);
}

/// A GPT with one Linux partition, written with sector size `ss`.
fn gpt(ss: usize, size: usize, count: u32) -> Vec<u8> {
    let mut img = vec![0u8; size];
    entry(&mut img[..512], 0, 0, 0xEE, 1, (size / ss - 1) as u32);
    let last = (size / ss - 1) as u64;
    let mut entries = vec![0u8; count as usize * 128];
    let linux: [u8; 16] = [
        0xaf, 0x3d, 0xc6, 0x0f, 0x83, 0x84, 0x72, 0x47, 0x8e, 0x79, 0x3d, 0x69, 0xd8, 0x47, 0x7d,
        0xe4,
    ];
    entries[..16].copy_from_slice(&linux);
    entries[32..40].copy_from_slice(&6u64.to_le_bytes());
    entries[40..48].copy_from_slice(&9u64.to_le_bytes());
    for (i, u) in "data".encode_utf16().enumerate() {
        entries[56 + 2 * i..58 + 2 * i].copy_from_slice(&u.to_le_bytes());
    }
    let n = entries.len().min(4 * ss);
    img[2 * ss..2 * ss + n].copy_from_slice(&entries[..n]);
    let mut h = vec![0u8; 92];
    h[..8].copy_from_slice(b"EFI PART");
    h[8..12].copy_from_slice(&0x10000u32.to_le_bytes());
    h[12..16].copy_from_slice(&92u32.to_le_bytes());
    h[24..32].copy_from_slice(&1u64.to_le_bytes());
    h[32..40].copy_from_slice(&last.to_le_bytes());
    h[40..48].copy_from_slice(&6u64.to_le_bytes());
    h[48..56].copy_from_slice(&(last - 5).to_le_bytes());
    h[56..72].copy_from_slice(&[0x11; 16]);
    h[72..80].copy_from_slice(&2u64.to_le_bytes());
    h[80..84].copy_from_slice(&count.to_le_bytes());
    h[84..88].copy_from_slice(&128u32.to_le_bytes());
    h[88..92].copy_from_slice(&crc32fast::hash(&entries).to_le_bytes());
    let crc = crc32fast::hash(&h);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    img[ss..ss + 92].copy_from_slice(&h);
    img
}

#[test]
fn gpt_with_4096_byte_sectors_on_a_disk_reporting_512() {
    let t = read_partitions(disk(gpt(4096, 1 << 20, 4)).as_ref()).unwrap();
    assert_eq!(t.kind, TableKind::Gpt);
    assert_eq!(
        t.disk_guid.as_deref(),
        Some("11111111-1111-1111-1111-111111111111")
    );
    assert_eq!(t.partitions.len(), 1);
    let p = &t.partitions[0];
    assert_eq!((p.number, p.start, p.length), (1, 6 * 4096, 4 * 4096));
    assert_eq!(p.name.as_deref(), Some("data"));
    assert!(matches!(
        &p.kind,
        PartKind::Gpt {
            description: "Linux filesystem",
            ..
        }
    ));
    assert!(
        t.notes.iter().any(|n| n.contains("4096-byte sectors")),
        "{:?}",
        t.notes
    );
    // The same layout with 512-byte sectors has no note.
    let t = read_partitions(disk(gpt(512, 1 << 20, 4)).as_ref()).unwrap();
    assert_eq!(t.partitions[0].start, 6 * 512);
    assert!(t.notes.is_empty(), "{:?}", t.notes);
}

#[test]
fn gpt_entry_array_is_capped() {
    // 1 Mi entries × 128 bytes = 128 MiB: refused before any allocation.
    let (what, detail) = corrupt_what(read_partitions(disk(gpt(512, 1 << 20, 1 << 20)).as_ref()));
    assert_eq!(what, "GPT");
    assert!(detail.contains("limit"), "{detail}");
}
