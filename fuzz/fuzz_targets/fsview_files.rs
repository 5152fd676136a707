//! Fuzz target: any bytes as a whole-disk volume, opened by fsview's file-system readers
//! (ext2/3/4, FAT, exFAT, NTFS by signature), its root walked two levels deep, files read
//! (output capped), links read. Nothing may panic, hang or allocate without bound.
//! (Panics inside the third-party readers are caught by fsview and become errors; the
//! default panic hook is kept quiet so those do not count as crashes here.)
#![no_main]

use std::io::Write;
use std::sync::{Arc, Once};

/// Accepts at most 1 MiB, then fails (bounds the time spent on one file).
struct Capped(usize);

impl Write for Capped {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0 += b.len();
        if self.0 > 1 << 20 {
            return Err(std::io::Error::other("enough"));
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn walk(fs: &mut dyn fsview::FileSystem, dir: &str, depth: u32, budget: &mut u32) {
    let Ok(entries) = fs.list(dir) else { return };
    for e in entries {
        if *budget == 0 {
            return;
        }
        *budget -= 1;
        let path = format!("{}/{}", dir.trim_end_matches('/'), e.name);
        let _ = fs.stat(&path);
        match e.kind {
            fsview::EntryKind::Dir if depth < 2 => walk(fs, &path, depth + 1, budget),
            fsview::EntryKind::File => {
                let _ = fs.read_file(&path, &mut Capped(0));
                let _ = fs.data_ranges(&path);
            }
            fsview::EntryKind::Symlink => {
                let _ = fs.read_link(&path);
            }
            _ => {}
        }
    }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    static QUIET: Once = Once::new();
    QUIET.call_once(|| {
        let default = std::panic::take_hook();
        // A panic that escapes fsview still aborts (libfuzzer-sys catches it); only
        // the message of caught ones is dropped.
        std::panic::set_hook(Box::new(move |info| {
            if std::env::var_os("FSVIEW_FUZZ_VERBOSE").is_some() {
                default(info);
            }
        }));
    });
    let b = vdisk::MemBacking::new(data.to_vec(), "fuzz.img");
    let Ok(disk) = vdisk::open_backing(b) else {
        return;
    };
    let disk: Arc<dyn vdisk::VirtualDisk> = Arc::from(disk);
    let Ok(mut fs) = fsview::open(fsview::Volume::whole(disk.clone())) else {
        return;
    };
    let _ = fs.label();
    let mut budget = 200;
    walk(fs.as_mut(), "/", 0, &mut budget);
    let _ = fsview::page_and_swap(disk);
});
