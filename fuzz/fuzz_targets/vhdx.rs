//! VHDX: the input is a VHDX file (the signature is added when missing so every input
//! reaches the VHDX parser): open, map, read, check.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut img = data.to_vec();
    if !img.starts_with(b"vhdxfile") {
        img.splice(0..0, b"vhdxfile".iter().copied());
    }
    let b = vdisk::MemBacking::new(img, "fuzz.vhdx");
    let _ = vdisk::check::check_backing(b.clone());
    if let Ok(d) = vdisk::open_backing(b) {
        let _ = d.info();
        let size = d.virtual_size();
        let _ = d.map(0, size);
        let mut buf = vec![0u8; 3 << 20];
        for i in 0..4u64 {
            let off = (size / 4) * i + (i * 511) % size.max(1);
            let n = size.saturating_sub(off).min(buf.len() as u64) as usize;
            let _ = d.read_at(&mut buf[..n], off);
        }
    }
});
