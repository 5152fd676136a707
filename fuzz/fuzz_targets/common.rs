//! What every fuzz target does with its input: open it, read its info, map it, read
//! from it (unaligned too) and check it. Nothing may panic, hang or allocate without
//! bound (libFuzzer's -malloc_limit_mb catches the last).

/// Runs the whole reader surface over `img`. `magic`, when given, is put in front of
/// inputs that lack it, so that every input reaches that format's parser.
pub fn exercise(data: &[u8], magic: Option<&[u8]>, name: &str) {
    let mut img = data.to_vec();
    if let Some(m) = magic
        && !img.starts_with(m)
    {
        img.splice(0..0, m.iter().copied());
    }
    let b = vdisk::MemBacking::new(img, name);
    let _ = vdisk::check::check_backing(b.clone());
    if let Ok(d) = vdisk::open_backing(b) {
        let _ = d.info();
        let size = d.virtual_size();
        let _ = d.map(0, size);
        // Reads up to 3 MiB cross VHDX blocks and qcow2 clusters; smaller disks get a
        // buffer of their own size so small inputs stay fast.
        let mut buf = vec![0u8; size.min(3 << 20) as usize];
        for i in 0..4u64 {
            let off = (size / 4) * i + (i * 511) % size.max(1);
            let n = size.saturating_sub(off).min(buf.len() as u64) as usize;
            let _ = d.read_at(&mut buf[..n], off);
        }
    }
}
