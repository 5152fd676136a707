//! Fuzz target: arbitrary bytes opened, mapped, read and checked as an image (qcow2
//! seeds). Nothing may panic or allocate without bound.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let b = vdisk::MemBacking::new(data.to_vec(), "fuzz.qcow2");
    if let Ok(d) = vdisk::open_backing(b.clone()) {
        let size = d.virtual_size();
        let _ = d.map(0, size);
        let mut buf = vec![0u8; 64 * 1024];
        for i in 0..4u64 {
            let off = (size / 4) * i;
            let n = (size - off).min(buf.len() as u64) as usize;
            let _ = d.read_at(&mut buf[..n], off);
        }
        let _ = d.read_at(&mut buf[..3], size.saturating_sub(3).min(size / 2 + 1));
    }
    let _ = vdisk::check::check_backing(b);
});
