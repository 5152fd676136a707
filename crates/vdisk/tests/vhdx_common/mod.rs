//! A deliberately naive, test-only VHDX reader (sector by sector through the BAT,
//! sector bitmaps and parent locators), independent of vdisk's reader, so the writer's
//! differencing and 4096-byte-sector output can be checked where qemu-img cannot help.
#![allow(dead_code)]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

const MIB: u64 = 1 << 20;

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn guid_bytes(s: &str) -> [u8; 16] {
    let h: String = s.chars().filter(|c| c.is_ascii_hexdigit()).collect();
    let b: Vec<u8> = (0..16)
        .map(|i| u8::from_str_radix(&h[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    [
        b[3], b[2], b[1], b[0], b[5], b[4], b[7], b[6], b[8], b[9], b[10], b[11], b[12], b[13],
        b[14], b[15],
    ]
}

fn read_at(f: &File, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, off).unwrap();
    b
}

fn utf16(b: &[u8]) -> String {
    String::from_utf16(
        &b.chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect::<Vec<_>>(),
    )
    .unwrap()
}

pub struct TestVhdx {
    file: File,
    pub size: u64,
    pub block: u64,
    pub sector: u64,
    chunk_ratio: u64,
    bat: Vec<u64>,
    pub locator: Vec<(String, String)>,
    pub parent: Option<Box<TestVhdx>>,
}

impl TestVhdx {
    /// Opens `path` and (through `relative_path`) its parents, checking CRCs and the
    /// parent linkage.
    pub fn open(path: &Path) -> TestVhdx {
        let file = File::open(path).unwrap();
        assert_eq!(&read_at(&file, 0, 8), b"vhdxfile");
        let mut hdrs = vec![];
        for off in [64 << 10, 128 << 10] {
            let mut h = read_at(&file, off, 4096);
            let crc = u32_at(&h, 4);
            h[4..8].fill(0);
            assert_eq!(&h[..4], b"head");
            assert_eq!(crc32c::crc32c(&h), crc, "header CRC at {off:#x}");
            assert_eq!(&h[48..64], &[0u8; 16], "log must be empty");
            hdrs.push(h);
        }
        let rt = read_at(&file, 192 << 10, 64 << 10);
        let mut rt2 = rt.clone();
        rt2[4..8].fill(0);
        assert_eq!(crc32c::crc32c(&rt2), u32_at(&rt, 4), "region table CRC");
        assert_eq!(
            rt,
            read_at(&file, 256 << 10, 64 << 10),
            "region tables differ"
        );
        let (mut bat_off, mut meta_off) = (0, 0);
        for i in 0..u32_at(&rt, 8) as usize {
            let e = &rt[16 + 32 * i..48 + 32 * i];
            if e[..16] == guid_bytes("2DC27766-F623-4200-9D64-115E9BFD4A08") {
                bat_off = u64_at(e, 16);
            } else if e[..16] == guid_bytes("8B7CA206-4790-4B9A-B8FE-575F050F886E") {
                meta_off = u64_at(e, 16);
            }
        }
        let mt = read_at(&file, meta_off, 64 << 10);
        assert_eq!(&mt[..8], b"metadata");
        let item = |id: &str| -> Option<Vec<u8>> {
            (0..u16_at(&mt, 10) as usize).find_map(|i| {
                let e = &mt[32 + 32 * i..64 + 32 * i];
                (e[..16] == guid_bytes(id)).then(|| {
                    read_at(
                        &file,
                        meta_off + u32_at(e, 16) as u64,
                        u32_at(e, 20) as usize,
                    )
                })
            })
        };
        let fp = item("CAA16737-FA36-4D43-B3B6-33F0AA44E76B").unwrap();
        let block = u32_at(&fp, 0) as u64;
        let has_parent = u32_at(&fp, 4) & 2 != 0;
        let size = u64_at(&item("2FA54224-CD1B-4876-B211-5DBED83BF4B8").unwrap(), 0);
        let sector = u32_at(&item("8141BF1D-A96F-4709-BA47-F233A8FAAB5F").unwrap(), 0) as u64;
        let chunk_ratio = (1u64 << 23) * sector / block;
        let payload = size.div_ceil(block);
        let entries = if has_parent {
            payload.div_ceil(chunk_ratio) * (chunk_ratio + 1)
        } else {
            payload + payload.saturating_sub(1) / chunk_ratio
        };
        let raw = read_at(&file, bat_off, entries as usize * 8);
        let bat: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let mut locator = vec![];
        let mut parent = None;
        if has_parent {
            let loc = item("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C").expect("parent locator");
            assert_eq!(
                loc[..16],
                guid_bytes("B04AEFB7-D19E-4A81-B789-25B8E9445913")
            );
            for i in 0..u16_at(&loc, 18) as usize {
                let e = 20 + 12 * i;
                let (ko, vo) = (u32_at(&loc, e) as usize, u32_at(&loc, e + 4) as usize);
                let (kl, vl) = (u16_at(&loc, e + 8) as usize, u16_at(&loc, e + 10) as usize);
                locator.push((utf16(&loc[ko..ko + kl]), utf16(&loc[vo..vo + vl])));
            }
            let get = |k: &str| {
                locator
                    .iter()
                    .find(|(kk, _)| kk == k)
                    .map(|(_, v)| v.clone())
            };
            let rel = get("relative_path")
                .expect("relative_path")
                .replace('\\', "/");
            let ppath = path.parent().unwrap().join(rel);
            let p = TestVhdx::open(&ppath);
            assert_eq!(p.size, size, "parent size");
            let pfile = File::open(&ppath).unwrap();
            let ph = read_at(&pfile, 64 << 10, 4096);
            let ph2 = read_at(&pfile, 128 << 10, 4096);
            let cur = if u64_at(&ph2, 8) > u64_at(&ph, 8) {
                ph2
            } else {
                ph
            };
            let linkage = get("parent_linkage").unwrap();
            assert_eq!(
                guid_bytes(&linkage),
                cur[32..48],
                "parent_linkage = parent's DataWriteGuid"
            );
            assert_eq!(linkage, linkage.to_uppercase());
            assert!(linkage.starts_with('{') && linkage.ends_with('}'));
            parent = Some(Box::new(p));
        }
        TestVhdx {
            file,
            size,
            block,
            sector,
            chunk_ratio,
            bat,
            locator,
            parent,
        }
    }

    fn sector_present(&self, chunk: u64, sector_in_chunk: u64) -> bool {
        let sb = self.bat[(chunk * (self.chunk_ratio + 1) + self.chunk_ratio) as usize];
        if sb & 7 != 6 {
            return false;
        }
        let b = read_at(&self.file, (sb & !(MIB - 1)) + sector_in_chunk / 8, 1);
        b[0] & (1 << (sector_in_chunk % 8)) != 0
    }

    /// Reads one logical sector.
    pub fn read_sector(&self, lba: u64, out: &mut [u8]) {
        let off = lba * self.sector;
        let blk = off / self.block;
        let e = self.bat[(blk + blk / self.chunk_ratio) as usize];
        let file_off = (e & !(MIB - 1)) + off % self.block;
        match e & 7 {
            6 => self.file.read_exact_at(out, file_off).unwrap(),
            7 => {
                let chunk = blk / self.chunk_ratio;
                let first = chunk * self.chunk_ratio * self.block / self.sector;
                if self.sector_present(chunk, lba - first) {
                    self.file.read_exact_at(out, file_off).unwrap();
                } else {
                    self.parent.as_ref().unwrap().read_sector(lba, out);
                }
            }
            2 => out.fill(0),
            0 | 1 | 3 => match &self.parent {
                Some(p) => p.read_sector(lba, out),
                None => out.fill(0),
            },
            s => panic!("bad BAT state {s}"),
        }
    }

    /// Compares every sector with the raw file.
    pub fn assert_matches_raw(&self, raw: &Path) {
        let f = File::open(raw).unwrap();
        assert_eq!(f.metadata().unwrap().len(), self.size);
        let mut a = vec![0u8; self.sector as usize];
        let mut b = vec![0u8; self.sector as usize];
        for lba in 0..self.size / self.sector {
            self.read_sector(lba, &mut a);
            f.read_exact_at(&mut b, lba * self.sector).unwrap();
            assert!(
                a == b,
                "sector {lba} (offset {:#x}) differs",
                lba * self.sector
            );
        }
    }
}
