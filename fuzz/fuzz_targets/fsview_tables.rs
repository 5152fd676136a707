//! Fuzz target: any bytes as a raw disk, through fsview's partition-table reader (MBR,
//! EBR chains, GPT primary and backup) and its file-system probe, at offset 0 and at
//! every partition found. Nothing may panic, hang or allocate without bound.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let b = vdisk::MemBacking::new(data.to_vec(), "fuzz.img");
    let Ok(disk) = vdisk::open_backing(b) else {
        return;
    };
    let size = disk.virtual_size();
    let _ = fsview::probe(disk.as_ref(), 0, size);
    let _ = fsview::identify(data);
    if let Ok(t) = fsview::read_partitions(disk.as_ref()) {
        for p in &t.partitions {
            let _ = fsview::probe(disk.as_ref(), p.start, p.length);
        }
    }
});
