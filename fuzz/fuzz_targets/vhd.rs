//! Fuzz target: any bytes, opened (as whatever format they are detected as, VHD
//! included), mapped, read and checked, must never panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let b = vdisk::MemBacking::new(data.to_vec(), "fuzz.vhd");
    if let Ok(d) = vdisk::open_backing(b.clone()) {
        let size = d.virtual_size();
        let _ = d.map(0, size);
        let mut buf = vec![0u8; 64 * 1024];
        for i in 0..4u64 {
            let off = (size / 4) * i;
            let n = (size - off).min(buf.len() as u64) as usize;
            let _ = d.read_at(&mut buf[..n], off);
        }
        let _ = d.info();
    }
    let _ = vdisk::check::check_backing(b);
});
