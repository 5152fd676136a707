//! The client against a real `qemu-nbd`: data, holes and zeroes read back exactly as
//! `qemu-img convert` flattens them, `base:allocation` as `qemu-img map` reports it,
//! dirty bitmaps as `nbdinfo --map` reports them, over Unix sockets and TCP, with
//! named exports, block-size alignment, server errors and a server that goes away.
//!
//! Fixtures are generated per test in a temporary folder; the tools (qemu-img,
//! qemu-io, qemu-nbd, nbdinfo) are required, and a missing one fails the test.

use nbd::{Addr, Client, Error, Extent};
use std::net::TcpListener;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use testkit::{Rng, run};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;

/// A temporary folder removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "nbd-test-{}-{}-{name}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Deterministic pseudo-random bytes, different for every seed.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    Rng::new(seed).fill(&mut v);
    v
}

/// Writes random data regions into a sparse raw file of `size` bytes.
fn sparse_raw(path: &Path, size: u64, regions: &[(u64, usize)]) {
    let f = std::fs::File::create(path).expect("create raw");
    f.set_len(size).expect("size raw");
    for (i, &(off, len)) in regions.iter().enumerate() {
        f.write_all_at(&pattern(i as u64 + 1, len), off)
            .expect("write raw");
    }
}

/// The standard test image: 64 MiB qcow2 with random data (aligned and unaligned,
/// one 8 MiB run for many requests, the last MiB), explicit zeroes, holes, and a
/// persistent dirty bitmap `b0` dirtied by two later writes.
fn make_image(d: &TempDir) -> PathBuf {
    let raw = d.path("src.raw");
    sparse_raw(
        &raw,
        SIZE,
        &[
            (0, 256 << 10),
            (MIB + 512, 300 << 10),
            (10 * MIB, 8 << 20),
            (25 * MIB + 4097, 5000),
            (SIZE - MIB, 1 << 20),
        ],
    );
    let img = d.path("img.qcow2");
    run(
        "qemu-img",
        &[
            "convert",
            "-q",
            "-f",
            "raw",
            "-O",
            "qcow2",
            s(&raw),
            s(&img),
        ],
    );
    std::fs::remove_file(&raw).expect("remove raw");
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -z 20M 1M",
            "-c",
            "write -P 0x11 22M 3000",
            s(&img),
        ],
    );
    run(
        "qemu-img",
        &["bitmap", "--add", "--granularity", "65536", s(&img), "b0"],
    );
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x5a 30M 100k",
            "-c",
            "write -P 0x5b 40964k 512",
            s(&img),
        ],
    );
    img
}

/// The image flattened by qemu-img: the reference for every read.
fn flatten(d: &TempDir, img: &Path, fmt: &str) -> Vec<u8> {
    let flat = d.path("flat.raw");
    run(
        "qemu-img",
        &["convert", "-q", "-f", fmt, "-O", "raw", s(img), s(&flat)],
    );
    std::fs::read(&flat).expect("read flat image")
}

/// A running qemu-nbd, killed on drop.
struct Server {
    child: Child,
    addr: Addr,
    log: PathBuf,
}

impl Server {
    /// Starts qemu-nbd on a Unix socket in `d` with the given image arguments.
    fn unix(d: &TempDir, args: &[&str]) -> Server {
        let sock = d.path("nbd.sock");
        let mut all = vec!["-k", s(&sock)];
        all.extend_from_slice(args);
        Self::start(d, &all, Addr::Unix(sock.clone()))
    }

    /// Starts qemu-nbd on 127.0.0.1 at a free port.
    fn tcp(d: &TempDir, args: &[&str]) -> Server {
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").expect("bind port 0");
            l.local_addr().expect("local addr").port()
        };
        let p = port.to_string();
        let mut all = vec!["-b", "127.0.0.1", "-p", &p];
        all.extend_from_slice(args);
        Self::start(d, &all, Addr::Tcp(format!("127.0.0.1:{port}")))
    }

    fn start(d: &TempDir, args: &[&str], addr: Addr) -> Server {
        let log = d.path("qemu-nbd.log");
        let logf = std::fs::File::create(&log).expect("create log");
        let child = Command::new("qemu-nbd")
            .args(["--persistent", "--shared=16"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("clone log"))
            .stderr(logf)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run qemu-nbd ({e}): install qemu-utils (scripts/install-deps)")
            });
        let mut srv = Server { child, addr, log };
        srv.wait_ready();
        srv
    }

    /// Waits until the server accepts connections (or fails with its log).
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("qemu-nbd exited with {st}: {}", self.log_text());
            }
            let up = match &self.addr {
                Addr::Unix(p) => std::os::unix::net::UnixStream::connect(p).is_ok(),
                Addr::Tcp(a) => std::net::TcpStream::connect(a.as_str()).is_ok(),
            };
            if up {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "qemu-nbd not ready: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The libnbd URI of the default export, for nbdinfo.
    fn uri(&self) -> String {
        match &self.addr {
            Addr::Unix(p) => format!("nbd+unix:///?socket={}", p.display()),
            Addr::Tcp(a) => format!("nbd://{a}/"),
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i}: got {:#04x}, want {:#04x}",
            got[i], want[i]
        );
    }
}

/// `base:allocation` as qemu-img map reports it (QEMU's NBD server sets HOLE where
/// there is no data and ZERO where it reads as zeroes), merged like ours.
fn qemu_img_map(img: &Path, fmt: &str) -> Vec<Extent> {
    let out = run("qemu-img", &["map", "--output=json", "-f", fmt, s(img)]);
    let text = String::from_utf8(out.stdout).expect("utf-8 map");
    let num = |obj: &str, key: &str| -> u64 {
        let at = obj.find(&format!("\"{key}\": ")).expect("map key") + key.len() + 4;
        obj[at..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .expect("map number")
    };
    let flag = |obj: &str, key: &str| obj.contains(&format!("\"{key}\": true"));
    let mut v: Vec<Extent> = text
        .split('}')
        .filter(|o| o.contains("\"start\""))
        .map(|o| Extent {
            offset: num(o, "start"),
            length: num(o, "length"),
            flags: if flag(o, "data") { 0 } else { nbd::STATE_HOLE }
                | if flag(o, "zero") { nbd::STATE_ZERO } else { 0 },
        })
        .collect();
    nbd::merge_extents(&mut v);
    v
}

/// A context's map as nbdinfo (libnbd) reports it: "offset length flags [desc]".
fn nbdinfo_map(uri: &str, context: &str) -> Vec<Extent> {
    let out = run("nbdinfo", &[&format!("--map={context}"), uri]);
    let mut v: Vec<Extent> = String::from_utf8(out.stdout)
        .expect("utf-8 nbdinfo")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Extent {
                offset: f[0].parse().expect("offset"),
                length: f[1].parse().expect("length"),
                flags: f[2].parse().expect("flags"),
            }
        })
        .collect();
    nbd::merge_extents(&mut v);
    v
}

/// Checks extents tile [offset, offset + length) in order with merged neighbours.
fn assert_tiles(v: &[Extent], offset: u64, length: u64) {
    let mut pos = offset;
    for (i, e) in v.iter().enumerate() {
        assert_eq!(e.offset, pos, "extent {i} of {v:?}");
        assert!(e.length > 0, "empty extent {i} of {v:?}");
        if i > 0 {
            assert_ne!(v[i - 1].flags, e.flags, "unmerged extents {i} of {v:?}");
        }
        pos = e.end();
    }
    assert_eq!(pos, offset + length, "extents {v:?} do not reach the end");
}

/// The part of a full map inside [offset, offset + length), as block_status must
/// return it.
fn clip(map: &[Extent], offset: u64, length: u64) -> Vec<Extent> {
    let end = offset + length;
    let mut v: Vec<Extent> = map
        .iter()
        .filter(|e| e.end() > offset && e.offset < end)
        .map(|e| {
            let s = e.offset.max(offset);
            Extent {
                offset: s,
                length: e.end().min(end) - s,
                flags: e.flags,
            }
        })
        .collect();
    nbd::merge_extents(&mut v);
    v
}

#[test]
fn whole_image_reads_like_qemu_img_convert() {
    let d = TempDir::new("whole");
    let img = make_image(&d);
    let want = flatten(&d, &img, "qcow2");
    let srv = Server::unix(&d, &["-f", "qcow2", "-r", s(&img)]);
    let mut c = Client::connect(&srv.addr, "", &[]).unwrap();
    assert_eq!(c.size(), SIZE);
    assert!(c.read_only());
    assert!(c.can_multi_conn());
    let (min, pref, max) = c.block_size().expect("qemu-nbd advertises block sizes");
    assert!(
        min >= 1 && pref >= min && max >= pref,
        "{:?}",
        c.block_size()
    );
    assert_eq!(c.max_request(), nbd::DEFAULT_MAX_REQUEST);

    let mut got = vec![0xeeu8; SIZE as usize];
    c.read(0, &mut got).unwrap();
    assert_same(&got, &want, "default pipeline");

    // Many small requests in flight, replies in whatever order QEMU sends them.
    c.set_max_request(64 << 10);
    c.set_depth(64);
    got.fill(0xee);
    c.read(0, &mut got).unwrap();
    assert_same(&got, &want, "64 KiB requests, depth 64");

    // One at a time, odd request size.
    c.set_max_request(100_000);
    c.set_depth(1);
    assert_eq!(c.max_request(), 100_000);
    let mut part = vec![0xeeu8; (12 * MIB) as usize];
    c.read(9 * MIB, &mut part).unwrap();
    assert_same(
        &part,
        &want[(9 * MIB) as usize..(21 * MIB) as usize],
        "depth 1",
    );

    // The server's maximum caps the request size.
    c.set_max_request(u32::MAX);
    assert_eq!(c.max_request(), max.min(32 << 20));
    c.disconnect().unwrap();
}

#[test]
fn unaligned_reads_match() {
    let d = TempDir::new("unaligned");
    let img = make_image(&d);
    let want = flatten(&d, &img, "qcow2");
    let srv = Server::unix(&d, &["-f", "qcow2", "-r", s(&img)]);
    let mut c = Client::connect(&srv.addr, "", &[]).unwrap();
    c.set_max_request(4096 * 3 + 512);
    let mut cases: Vec<(u64, usize)> = vec![
        (0, 1),
        (1, 0),
        (SIZE - 1, 1),
        (SIZE - 12345, 12345),
        (MIB + 511, 2),
        (MIB + 500, 300 << 10),
        (25 * MIB + 4000, 6000),
        (20 * MIB - 3, 1 << 20),
        (22 * MIB - 1, 3002),
    ];
    let mut x = 12345u64;
    for _ in 0..60 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let off = (x >> 20) % SIZE;
        let len = ((x >> 5) % 200_000).min(SIZE - off) as usize;
        cases.push((off, len));
    }
    for (off, len) in cases {
        let mut got = vec![0xeeu8; len];
        c.read(off, &mut got).unwrap();
        assert_same(
            &got,
            &want[off as usize..off as usize + len],
            &format!("read {len} at {off}"),
        );
    }
    // Past the end: refused before anything is sent; the connection stays usable.
    let mut b = [0u8; 2];
    assert!(matches!(
        c.read(SIZE - 1, &mut b),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        c.read(u64::MAX, &mut b),
        Err(Error::InvalidArgument(_))
    ));
    c.read(SIZE - 2, &mut b).unwrap();
    assert_same(&b, &want[want.len() - 2..], "last two bytes");
}

#[test]
fn base_allocation_matches_qemu_img_map() {
    let d = TempDir::new("alloc");
    let img = make_image(&d);
    let srv = Server::unix(&d, &["-f", "qcow2", "-r", s(&img)]);
    let c = Client::connect(&srv.addr, "", &[nbd::CONTEXT_BASE_ALLOCATION]).unwrap();
    let got = c.block_status("base:allocation", 0, SIZE).unwrap();
    assert_tiles(&got, 0, SIZE);
    let want = qemu_img_map(&img, "qcow2");
    assert_eq!(got, want, "base:allocation vs qemu-img map");
    // And as libnbd sees it.
    assert_eq!(got, nbdinfo_map(&srv.uri(), "base:allocation"));
    // Data, zero and hole all appear.
    assert!(got.iter().any(|e| e.flags == 0));
    assert!(
        got.iter()
            .any(|e| e.flags == nbd::STATE_HOLE | nbd::STATE_ZERO)
    );

    // Sub-ranges, unaligned, are the full map clipped.
    for (off, len) in [
        (1, 1),
        (MIB + 100, 700_000),
        (20 * MIB - 1, MIB + 2),
        (SIZE - 3, 3),
        (123_456, 40 * MIB),
    ] {
        let part = c.block_status("base:allocation", off, len).unwrap();
        assert_tiles(&part, off, len);
        assert_eq!(part, clip(&want, off, len), "range {len} at {off}");
    }
    assert!(c.block_status("base:allocation", 5, 0).unwrap().is_empty());
    assert!(matches!(
        c.block_status("base:allocation", SIZE, 1),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn dirty_bitmap_matches_nbdinfo() {
    let d = TempDir::new("dirty");
    let img = make_image(&d);
    let srv = Server::unix(&d, &["-f", "qcow2", "-r", "-B", "b0", s(&img)]);
    let ctx = nbd::dirty_bitmap_context("b0");
    // Two contexts on one connection: each reply carries a chunk for both.
    let c = Client::connect(&srv.addr, "", &["base:allocation", &ctx]).unwrap();
    assert_eq!(c.contexts().len(), 2);
    let got = c.block_status(&ctx, 0, SIZE).unwrap();
    assert_tiles(&got, 0, SIZE);
    assert_eq!(got, nbdinfo_map(&srv.uri(), &ctx), "dirty map vs nbdinfo");
    // The two writes after the bitmap was added, rounded to its 64 KiB granularity.
    let dirty: Vec<(u64, u64)> = got
        .iter()
        .filter(|e| e.flags & nbd::DIRTY != 0)
        .map(|e| (e.offset, e.length))
        .collect();
    assert_eq!(dirty, vec![(30 * MIB, 128 << 10), (40 * MIB, 64 << 10)]);
    // Sub-ranges clip.
    let part = c.block_status(&ctx, 30 * MIB + 100, 200_000).unwrap();
    assert_eq!(part, clip(&got, 30 * MIB + 100, 200_000));
    // The other context on the same connection still answers correctly.
    let alloc = c.block_status("base:allocation", 0, SIZE).unwrap();
    assert_eq!(alloc, qemu_img_map(&img, "qcow2"));
}

#[test]
fn missing_context_is_named() {
    let d = TempDir::new("missing");
    let img = make_image(&d);
    let srv = Server::unix(&d, &["-f", "qcow2", "-r", s(&img)]);
    match Client::connect(
        &srv.addr,
        "",
        &["base:allocation", "qemu:dirty-bitmap:nope"],
    ) {
        Err(Error::ContextNotAvailable { context, export }) => {
            assert_eq!(context, "qemu:dirty-bitmap:nope");
            assert_eq!(export, "");
        }
        other => panic!("expected ContextNotAvailable, got {other:?}"),
    }
    let e = Client::connect(&srv.addr, "", &["qemu:dirty-bitmap:nope"]).unwrap_err();
    assert!(e.to_string().contains("qemu:dirty-bitmap:nope"), "{e}");
    // Asking for a context that was not negotiated on this connection.
    let c = Client::connect(&srv.addr, "", &["base:allocation"]).unwrap();
    assert!(matches!(
        c.block_status("qemu:dirty-bitmap:b0", 0, 4096),
        Err(Error::InvalidArgument(_))
    ));
    // Bad context names are refused before sending.
    assert!(matches!(
        Client::connect(&srv.addr, "", &["nocolon"]),
        Err(Error::InvalidArgument(_))
    ));
    // The server is still fine.
    assert_eq!(c.block_status("base:allocation", 0, 4096).unwrap().len(), 1);
}

#[test]
fn tcp_and_named_export() {
    let d = TempDir::new("tcp");
    let img = make_image(&d);
    let want = flatten(&d, &img, "qcow2");
    let srv = Server::tcp(&d, &["-f", "qcow2", "-r", "-x", "disk1", s(&img)]);
    assert_eq!(
        nbd::list_exports(&srv.addr).unwrap(),
        vec!["disk1".to_string()]
    );
    match Client::connect(&srv.addr, "nope", &[]) {
        Err(Error::Refused { reply, what, .. }) => {
            assert_eq!(reply, nbd::proto::REP_ERR_UNKNOWN);
            assert!(what.contains("nope"), "{what}");
        }
        other => panic!("expected Refused, got {other:?}"),
    }
    let Addr::Tcp(hostport) = &srv.addr else {
        unreachable!()
    };
    let (addr, export) = nbd::parse_uri(&format!("nbd://{hostport}/disk1")).unwrap();
    let c = Client::connect_timeout(&addr, &export, &["base:allocation"], Duration::from_secs(5))
        .unwrap();
    assert_eq!(c.export(), "disk1");
    let mut got = vec![0u8; SIZE as usize];
    c.read(0, &mut got).unwrap();
    assert_same(&got, &want, "over TCP");
    assert_eq!(
        c.block_status("base:allocation", 0, SIZE).unwrap(),
        qemu_img_map(&img, "qcow2")
    );
}

#[test]
fn unix_uri_and_addr_forms() {
    let d = TempDir::new("uri");
    let img = make_image(&d);
    let srv = Server::unix(&d, &["-f", "qcow2", "-r", "-x", "a b", s(&img)]);
    let Addr::Unix(sock) = &srv.addr else {
        unreachable!()
    };
    let (addr, export) =
        nbd::parse_uri(&format!("nbd+unix:///a%20b?socket={}", sock.display())).unwrap();
    assert_eq!(export, "a b");
    let c = Client::connect(&addr, &export, &[]).unwrap();
    assert_eq!(c.size(), SIZE);
    let c2 = Client::connect(
        &Addr::parse(&format!("unix:{}", sock.display())).unwrap(),
        "a b",
        &[],
    )
    .unwrap();
    assert_eq!(c2.size(), SIZE);
}

/// A raw image behind blkdebug with 4 KiB alignment: QEMU then advertises a 4 KiB
/// minimum block size and refuses unaligned requests, so unaligned reads and block
/// status only work if the client widens them.
#[test]
fn minimum_block_size_is_honoured() {
    let d = TempDir::new("align");
    let raw = d.path("disk.raw");
    let size = 8 * MIB;
    sparse_raw(
        &raw,
        size,
        &[(0, 10_000), (MIB + 4096, 70_000), (size - 4096, 4096)],
    );
    let want = std::fs::read(&raw).unwrap();
    let opts = format!(
        "driver=blkdebug,align=4096,image.driver=file,image.filename={}",
        raw.display()
    );
    let srv = Server::unix(&d, &["--image-opts", "-r", &opts]);
    let mut c = Client::connect(&srv.addr, "", &["base:allocation"]).unwrap();
    assert_eq!(c.block_size().map(|b| b.0), Some(4096));
    c.set_max_request(10_000);
    assert_eq!(c.max_request(), 8192, "rounded down to the minimum block");
    for (off, len) in [
        (0u64, 1usize),
        (1, 4095),
        (4095, 2),
        (100, 100),
        (MIB + 4000, 80_000),
        (size - 5, 5),
        (12_345, 3 * 4096),
        (0, size as usize),
    ] {
        let mut got = vec![0xeeu8; len];
        c.read(off, &mut got).unwrap();
        assert_same(
            &got,
            &want[off as usize..off as usize + len],
            &format!("read {len} at {off}"),
        );
    }
    let full = c.block_status("base:allocation", 0, size).unwrap();
    assert_tiles(&full, 0, size);
    assert_eq!(full, nbdinfo_map(&srv.uri(), "base:allocation"));
    let part = c.block_status("base:allocation", 9_000, 1_000_000).unwrap();
    assert_eq!(part, clip(&full, 9_000, 1_000_000));
}

/// blkdebug fails block status touching one sector with EIO (its rule arms on the
/// first read). QEMU reports that as an error chunk, for block status and for reads
/// (it checks for holes first): the call fails with Error::Server and the errno, the
/// other requests in flight are drained, and the connection keeps working.
#[test]
fn server_errors_leave_connection_usable() {
    let d = TempDir::new("eio");
    let raw = d.path("disk.raw");
    let size = 4 * MIB;
    sparse_raw(&raw, size, &[(0, size as usize)]);
    let want = std::fs::read(&raw).unwrap();
    let opts = format!(
        "driver=raw,file.driver=blkdebug,file.inject-error.0.event=read_aio,\
         file.inject-error.0.iotype=block-status,file.inject-error.0.errno=5,\
         file.inject-error.0.sector=4096,file.inject-error.0.once=off,\
         file.image.driver=file,file.image.filename={}",
        raw.display()
    );
    let srv = Server::unix(&d, &["--image-opts", "-r", &opts]);
    let bad = 4096 * 512;
    let mut c = Client::connect(&srv.addr, "", &["base:allocation"]).unwrap();
    c.set_max_request(64 << 10);
    let mut all = vec![0u8; size as usize];
    c.read(0, &mut all[..4096]).unwrap();

    match c.block_status("base:allocation", 0, size) {
        Err(Error::Server { errno, what, .. }) => {
            assert_eq!(errno, nbd::proto::EIO);
            assert!(what.contains("block status"), "{what}");
        }
        other => panic!("expected a server error, got {other:?}"),
    }
    // A whole-disk read: 64 requests, 16 in flight, one fails.
    match c.read(0, &mut all) {
        Err(Error::Server { errno, what, .. }) => {
            assert_eq!(errno, nbd::proto::EIO);
            assert!(what.contains(&format!("at offset {bad}")), "{what}");
        }
        other => panic!("expected a server error, got {other:?}"),
    }
    // The connection is still in step.
    c.read(0, &mut all[..bad as usize]).unwrap();
    assert_same(
        &all[..bad as usize],
        &want[..bad as usize],
        "before the bad sector",
    );
    let after = bad + (64 << 10);
    c.read(after, &mut all[..MIB as usize]).unwrap();
    assert_same(
        &all[..MIB as usize],
        &want[after as usize..(after + MIB) as usize],
        "after the bad sector",
    );
    assert_eq!(
        c.block_status("base:allocation", 0, MIB).unwrap(),
        vec![Extent {
            offset: 0,
            length: MIB,
            flags: 0
        }]
    );
}

#[test]
fn threads_share_one_client() {
    let d = TempDir::new("threads");
    let img = make_image(&d);
    let want = Arc::new(flatten(&d, &img, "qcow2"));
    let srv = Server::unix(&d, &["-f", "qcow2", "-r", s(&img)]);
    let c = Arc::new(Client::connect(&srv.addr, "", &["base:allocation"]).unwrap());
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let (c, want) = (c.clone(), want.clone());
            std::thread::spawn(move || {
                for i in 0..8u64 {
                    let off = (t * 16 + i * 2) * MIB + t * 511;
                    let len = (MIB + i * 1000) as usize;
                    let mut got = vec![0u8; len];
                    c.read(off, &mut got).unwrap();
                    assert_same(&got, &want[off as usize..off as usize + len], "thread read");
                    let ext = c.block_status("base:allocation", off, len as u64).unwrap();
                    assert_tiles(&ext, off, len as u64);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

/// When the server goes away mid-session, the next call fails with an I/O error and
/// every call after that reports the connection as broken instead of touching it.
#[test]
fn dead_server_breaks_connection() {
    let d = TempDir::new("dead");
    let img = make_image(&d);
    let mut srv = Server::unix(&d, &["-f", "qcow2", "-r", s(&img)]);
    let c = Client::connect_timeout(&srv.addr, "", &["base:allocation"], Duration::from_secs(5))
        .unwrap();
    let mut b = vec![0u8; 4096];
    c.read(0, &mut b).unwrap();
    srv.kill();
    let first = c.read(0, &mut b).unwrap_err();
    assert!(matches!(first, Error::Io { .. }), "{first:?}");
    let later = c.block_status("base:allocation", 0, 4096).unwrap_err();
    assert!(matches!(later, Error::Broken(_)), "{later:?}");
    assert!(matches!(c.read(0, &mut b), Err(Error::Broken(_))));
    assert!(matches!(c.disconnect(), Err(Error::Broken(_))));
    // Connecting to a server that is not there fails clearly too.
    let e = Client::connect(&srv.addr, "", &[]).unwrap_err();
    assert!(
        matches!(e, Error::Io { .. }) && e.to_string().contains("connecting"),
        "{e}"
    );
}
