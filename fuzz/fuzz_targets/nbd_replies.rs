//! Fuzz target: the NBD client's view of a hostile server. The first byte picks what
//! the rest feeds: the pure reply parsers, a whole handshake, the transmission phase
//! behind a valid handshake (reads and block status over the fuzzed replies), or an
//! export listing. Nothing may panic, hang or allocate without bound.
#![no_main]

use nbd::proto;
use std::io::{self, Cursor, Read, Write};

/// A server that says `input` and then hangs up; what the client sends is dropped.
struct Replay(Cursor<Vec<u8>>);

impl Read for Replay {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Replay {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

const CONTEXTS: [&str; 2] = ["base:allocation", "qemu:dirty-bitmap:b0"];
const SIZE: u64 = 1 << 20;

fn opt_reply(out: &mut Vec<u8>, option: u32, reply: u32, payload: &[u8]) {
    out.extend_from_slice(&proto::OPT_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
}

/// A successful handshake: contexts get ids 1 and 2, the export is 1 MiB.
fn handshake(min_block: u32) -> Vec<u8> {
    let mut s = proto::NBDMAGIC.to_be_bytes().to_vec();
    s.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    s.extend_from_slice(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes());
    opt_reply(&mut s, proto::OPT_STRUCTURED_REPLY, proto::REP_ACK, &[]);
    for (i, c) in CONTEXTS.iter().enumerate() {
        let mut p = (i as u32 + 1).to_be_bytes().to_vec();
        p.extend_from_slice(c.as_bytes());
        opt_reply(
            &mut s,
            proto::OPT_SET_META_CONTEXT,
            proto::REP_META_CONTEXT,
            &p,
        );
    }
    opt_reply(&mut s, proto::OPT_SET_META_CONTEXT, proto::REP_ACK, &[]);
    let mut p = proto::INFO_EXPORT.to_be_bytes().to_vec();
    p.extend_from_slice(&SIZE.to_be_bytes());
    p.extend_from_slice(&(proto::TFLAG_HAS_FLAGS | proto::TFLAG_READ_ONLY).to_be_bytes());
    opt_reply(&mut s, proto::OPT_GO, proto::REP_INFO, &p);
    let mut p = proto::INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for v in [min_block, 4096, 1 << 20] {
        p.extend_from_slice(&v.to_be_bytes());
    }
    opt_reply(&mut s, proto::OPT_GO, proto::REP_INFO, &p);
    opt_reply(&mut s, proto::OPT_GO, proto::REP_ACK, &[]);
    s
}

/// Reads and block status against whatever the server says, twice (the second round
/// exercises the broken-connection path after a failure).
fn exercise(mut c: nbd::Client, sel: u8) {
    c.set_max_request(4096);
    c.set_depth(4);
    let mut buf = vec![0u8; 16 << 10];
    let off = u64::from(sel >> 4) * 777;
    for _ in 0..2 {
        let _ = c.read(off, &mut buf);
        if let Ok(v) = c.block_status(CONTEXTS[usize::from(sel >> 7)], off, 64 << 10) {
            // What comes back must tile the range exactly.
            let mut pos = off;
            for e in &v {
                assert_eq!(e.offset, pos, "extents do not tile: {v:?}");
                assert!(e.length > 0, "empty extent: {v:?}");
                pos = e.end();
            }
            assert_eq!(pos, off + (64 << 10), "extents do not cover: {v:?}");
        }
    }
    let _ = c.disconnect();
}

fn parsers(b: &[u8]) {
    let _ = proto::parse_greeting(b);
    let _ = proto::parse_opt_reply_header(b, proto::OPT_GO);
    let _ = proto::parse_rep_info(b);
    let _ = proto::parse_rep_server(b);
    let _ = proto::parse_rep_meta_context(b);
    let _ = proto::parse_reply_header(b);
    let kind = b.first().map_or(0, |&k| u16::from(k) << 8 | 1);
    let _ = proto::parse_error_chunk(kind, b);
    let _ = proto::parse_error_chunk(proto::REPLY_TYPE_ERROR_OFFSET, b);
    let _ = proto::parse_offset_hole(b);
    if let Ok((_, descs)) = proto::parse_block_status(b) {
        let req = (b.len() as u32).saturating_mul(97);
        if let Ok(v) = proto::descriptors_to_extents(1 << 40, req, &descs) {
            let total: u64 = v.iter().map(|e| e.length).sum();
            assert!(total > 0 && total <= u64::from(req));
        }
    }
    // Content chunks against one request's coverage.
    let mut cov = proto::Coverage::new(4096);
    for p in b.chunks_exact(4) {
        let start = u64::from(u16::from_be_bytes([p[0], p[1]]));
        let len = u64::from(u16::from_be_bytes([p[2], p[3]]));
        let _ = cov.add(start, len);
        assert!(cov.covered() <= 4096);
    }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    match sel % 4 {
        0 => parsers(rest),
        1 => {
            if let Ok(c) =
                nbd::Client::from_stream(Replay(Cursor::new(rest.to_vec())), "", &CONTEXTS)
            {
                exercise(c, sel);
            }
        }
        2 => {
            let min = if sel & 4 != 0 { 512 } else { 1 };
            let mut s = handshake(min);
            s.extend_from_slice(rest);
            let c = nbd::Client::from_stream(Replay(Cursor::new(s)), "", &CONTEXTS)
                .expect("the fixed handshake is valid");
            exercise(c, sel);
        }
        _ => {
            let mut s = proto::NBDMAGIC.to_be_bytes().to_vec();
            s.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
            s.extend_from_slice(&proto::FLAG_FIXED_NEWSTYLE.to_be_bytes());
            s.extend_from_slice(rest);
            let _ = nbd::list_exports_on(Replay(Cursor::new(s)));
        }
    }
});
