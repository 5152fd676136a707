//! LZNT1, the compression of NTFS compressed files (the `ntfs` crate reads only the
//! raw clusters).
//!
//! A compression unit (usually 16 clusters = 64 KiB) that is stored compressed holds a
//! sequence of chunks, each decompressing to at most 4096 bytes:
//!
//! * a 2-byte little-endian header: bits 0-11 = total chunk size − 3 (header included),
//!   bit 15 = compressed; a header of 0 (or the end of the data) ends the unit;
//! * an uncompressed chunk holds 4096 raw bytes;
//! * a compressed chunk is a series of groups: a flag byte, then 8 tokens (bit clear = a
//!   literal byte, bit set = a 2-byte back-reference). The split of a back-reference
//!   between offset and length bits depends on the position inside the 4096-byte output
//!   chunk: the offset gets `max(4, ceil(log2(pos)))` bits, the length the rest
//!   (length + 3, offset + 1), as in ntfs-3g and Linux `fs/ntfs/compress.c`.
//!
//! A compressed chunk that ends short of 4096 bytes is followed by zeros up to the next
//! 4096-byte boundary when another chunk follows (the caller pads the unit's end).
//!
//! Every back-reference is validated (it must not reach before the chunk start nor run
//! past the chunk end): damage is an [`Lznt1Error`], never a panic.

/// Bytes one chunk decompresses to, at most.
pub(crate) const CHUNK: usize = 4096;

/// Where (offset in the compressed input) and why decompression failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Lznt1Error {
    pub at: usize,
    pub what: &'static str,
}

impl std::fmt::Display for Lznt1Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LZNT1 data at byte {}: {}", self.at, self.what)
    }
}

/// Decompresses `src` (one compression unit) and appends at most `limit` bytes to `out`.
pub(crate) fn decompress(src: &[u8], limit: usize, out: &mut Vec<u8>) -> Result<(), Lznt1Error> {
    let base = out.len();
    let end = base.saturating_add(limit);
    let mut pos = 0usize;
    while pos + 2 <= src.len() && out.len() < end {
        let hdr = u16::from_le_bytes([src[pos], src[pos + 1]]);
        if hdr == 0 {
            break;
        }
        // A chunk after a short one starts at the next 4096-byte boundary.
        let rel = out.len() - base;
        if !rel.is_multiple_of(CHUNK) {
            let next = (base + rel.next_multiple_of(CHUNK)).min(end);
            out.resize(next, 0);
            if next >= end {
                break;
            }
        }
        let size = (hdr & 0x0fff) as usize + 3;
        let chunk_end = pos + size;
        if chunk_end > src.len() {
            return Err(Lznt1Error {
                at: pos,
                what: "chunk passes the end of the compressed data",
            });
        }
        let data = &src[pos + 2..chunk_end];
        if hdr & 0x8000 == 0 {
            if data.len() != CHUNK {
                return Err(Lznt1Error {
                    at: pos,
                    what: "uncompressed chunk is not 4096 bytes",
                });
            }
            out.extend_from_slice(data);
        } else {
            chunk(data, out).map_err(|(off, what)| Lznt1Error {
                at: pos + 2 + off,
                what,
            })?;
        }
        pos = chunk_end;
    }
    out.truncate(end);
    Ok(())
}

/// Decompresses one compressed chunk, appending to `out` (at most [`CHUNK`] bytes).
fn chunk(data: &[u8], out: &mut Vec<u8>) -> Result<(), (usize, &'static str)> {
    let start = out.len();
    let mut i = 0usize;
    while i < data.len() {
        let flags = data[i];
        i += 1;
        for bit in 0..8 {
            if i >= data.len() {
                break;
            }
            let p = out.len() - start;
            if p >= CHUNK {
                return Err((i, "chunk decompresses to more than 4096 bytes"));
            }
            if flags & (1 << bit) == 0 {
                out.push(data[i]);
                i += 1;
                continue;
            }
            if i + 2 > data.len() {
                return Err((i, "truncated back-reference"));
            }
            if p == 0 {
                return Err((i, "back-reference at the start of a chunk"));
            }
            let token = u16::from_le_bytes([data[i], data[i + 1]]);
            // Offset bits: max(4, ceil(log2(p))); p <= 4095 so lg <= 8.
            let mut lg = 0u32;
            let mut k = p - 1;
            while k >= 0x10 {
                lg += 1;
                k >>= 1;
            }
            let back = (token >> (12 - lg)) as usize + 1;
            let len = (token & (0x0fff >> lg)) as usize + 3;
            if back > p {
                return Err((i, "back-reference before the chunk start"));
            }
            if p + len > CHUNK {
                return Err((i, "back-reference passes the 4096-byte chunk end"));
            }
            // Byte by byte: the source may overlap what is being written.
            for _ in 0..len {
                let b = out[out.len() - back];
                out.push(b);
            }
            i += 2;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dec(src: &[u8], limit: usize) -> Result<Vec<u8>, Lznt1Error> {
        let mut out = Vec::new();
        decompress(src, limit, &mut out).map(|_| out)
    }

    /// "abc" then a back-reference of length 9 at distance 3 (overlapping copy).
    const ABC: [u8; 8] = [0x05, 0xB0, 0x08, b'a', b'b', b'c', 0x06, 0x20];

    #[test]
    fn literals_and_overlapping_back_reference() {
        assert_eq!(dec(&ABC, 65536).unwrap(), b"abcabcabcabc");
        // Terminated by a zero header, trailing garbage ignored.
        let mut v = ABC.to_vec();
        v.extend_from_slice(&[0, 0, 0xFF, 0xFF]);
        assert_eq!(dec(&v, 65536).unwrap(), b"abcabcabcabc");
        // The limit truncates.
        assert_eq!(dec(&ABC, 5).unwrap(), b"abcab");
    }

    #[test]
    fn offset_bits_grow_with_the_position() {
        // 17 literals 'a'..'q' (two flag groups), then at p = 17 (lg = 1: 5 offset bits,
        // 11 length bits) copy back 17 bytes, length 4: "abcd".
        let mut c = vec![0x00];
        c.extend(b'a'..=b'h');
        c.push(0x00);
        c.extend(b'i'..=b'p');
        c.push(0x02); // literal 'q', then a back-reference
        c.push(b'q');
        let token: u16 = (16 << 11) | 1; // back = 17, len = 4
        c.extend_from_slice(&token.to_le_bytes());
        let mut src = ((0xB000u16) | (c.len() as u16 + 2 - 3))
            .to_le_bytes()
            .to_vec();
        src.extend_from_slice(&c);
        let mut want: Vec<u8> = (b'a'..=b'q').collect();
        want.extend_from_slice(b"abcd");
        assert_eq!(dec(&src, 65536).unwrap(), want);
    }

    #[test]
    fn uncompressed_chunk_and_padding_between_chunks() {
        let raw: Vec<u8> = (0..CHUNK).map(|i| (i * 13 % 256) as u8).collect();
        // A short compressed chunk, then an uncompressed one: it starts at 4096.
        let mut src = ABC.to_vec();
        src.extend_from_slice(&0x3FFFu16.to_le_bytes());
        src.extend_from_slice(&raw);
        let out = dec(&src, 65536).unwrap();
        assert_eq!(out.len(), 2 * CHUNK);
        assert_eq!(&out[..12], b"abcabcabcabc");
        assert!(out[12..CHUNK].iter().all(|&b| b == 0));
        assert_eq!(&out[CHUNK..], &raw[..]);
    }

    #[test]
    fn malformed_inputs_are_errors() {
        // Back-reference as the first token.
        let e = dec(&[0x02, 0xB0, 0x01, 0x00, 0x00], 65536).unwrap_err();
        assert!(e.what.contains("start of a chunk"), "{e}");
        // Back-reference reaching before the chunk start: at p = 1, back = 2.
        let e = dec(&[0x03, 0xB0, 0x02, b'x', 0x00, 0x10], 65536).unwrap_err();
        assert!(e.what.contains("before the chunk start"), "{e}");
        // Chunk size past the end of the data.
        let e = dec(&[0x40, 0xB0, 0x00, b'x'], 65536).unwrap_err();
        assert!(e.what.contains("passes the end"), "{e}");
        // Uncompressed chunk of the wrong size.
        let e = dec(&[0x01, 0x30, 1, 2], 65536).unwrap_err();
        assert!(e.what.contains("not 4096"), "{e}");
        // Truncated back-reference token.
        let e = dec(&[0x02, 0xB0, 0x02, b'x', 0x00], 65536).unwrap_err();
        assert!(e.what.contains("truncated"), "{e}");
        // A back-reference running past 4096 bytes: at p = 1 (lg 0) len = 0xfff + 3.
        let e = dec(&[0x03, 0xB0, 0x02, b'x', 0xFF, 0x0F], 65536).unwrap_err();
        assert!(e.what.contains("chunk end"), "{e}");
        // 'x', a back-reference filling the chunk to 4096 bytes, then one more literal.
        let src = [0x04, 0xB0, 0x02, b'x', 0xFC, 0x0F, b'y'];
        let e = dec(&src, 65536).unwrap_err();
        assert!(e.what.contains("more than 4096"), "{e}");
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..3000 {
            let len = (next() % 9000) as usize;
            let mut src: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            // Make plausible compressed headers common.
            if round % 2 == 0 && src.len() >= 2 {
                let h = 0xB000u16 | ((next() as u16) & 0x0fff);
                src[..2].copy_from_slice(&h.to_le_bytes());
            }
            let mut out = Vec::new();
            let _ = decompress(&src, 65536, &mut out);
            assert!(out.len() <= 65536);
        }
    }
}
