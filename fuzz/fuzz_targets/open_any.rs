//! Any bytes, detected as whatever format they look like: open, map, read, check.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let b = vdisk::MemBacking::new(data.to_vec(), "fuzz.img");
    let _ = vdisk::check::check_backing(b.clone());
    if let Ok(d) = vdisk::open_backing(b) {
        let size = d.virtual_size();
        let _ = d.map(0, size);
        let mut buf = vec![0u8; 4096];
        for i in 0..4u64 {
            let off = (size / 4) * i;
            let n = (size - off).min(buf.len() as u64) as usize;
            let _ = d.read_at(&mut buf[..n], off);
        }
    }
});
