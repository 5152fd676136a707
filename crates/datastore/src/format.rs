//! Byte layouts of what the datastore stores: blobs, packs, index files and sealed
//! (checksummed, optionally encrypted) small files. docs/datastore-format.md describes the
//! same in prose; keep the two in step.

use crate::crypto::{Keys, TAG_LEN};
use crate::error::{Error, Result};
use crate::id::Id;
use vdisk::aligned::AlignedBuf;

/// What a blob holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Up to one block of disk data.
    Data = 0,
    /// A piece of a disk index: block ids.
    Index = 1,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        match v {
            0 => Some(Kind::Data),
            1 => Some(Kind::Index),
            _ => None,
        }
    }
}

pub const BLOB_MAGIC: &[u8; 4] = b"HFB1";
pub const BLOB_HEADER: usize = 64;
const FLAG_ZSTD: u8 = 1;
const FLAG_AEAD: u8 = 2;
/// Largest plaintext a blob may hold (a data block is at most this).
pub const MAX_BLOB_PLAIN: u32 = 1 << 20;

fn le32(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

/// Compresses (when it pays), encrypts (when the datastore is encrypted) and frames one
/// blob, appending it to `out` (so a worker fills one buffer with many blobs, copying
/// each byte once). `zstd` is the caller's reusable compression context.
pub fn encode_blob(
    keys: &Keys,
    zstd: &mut zstd::bulk::Compressor<'static>,
    kind: Kind,
    id: Id,
    plain: &[u8],
    out: &mut Vec<u8>,
) -> Result<()> {
    thread_local! {
        static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let plain_len = u32::try_from(plain.len())
        .ok()
        .filter(|&n| n <= MAX_BLOB_PLAIN)
        .ok_or_else(|| Error::Invalid(format!("blob of {} bytes is too large", plain.len())))?;
    let start = out.len();
    out.extend_from_slice(&[0u8; BLOB_HEADER]);
    let body = out.len();
    let mut flags = 0;
    // Store raw unless zstd saves at least 1/32: incompressible data costs no
    // decompression on restore.
    SCRATCH.with(|z| {
        let mut z = z.borrow_mut();
        z.clear();
        z.reserve(zstd::zstd_safe::compress_bound(plain.len()));
        match zstd.compress_to_buffer(plain, &mut *z) {
            Ok(n) if n + plain.len() / 32 < plain.len() => {
                flags |= FLAG_ZSTD;
                out.extend_from_slice(&z[..n]);
            }
            _ => out.extend_from_slice(plain),
        }
    });
    let mut header = [0u8; BLOB_HEADER];
    header[..4].copy_from_slice(BLOB_MAGIC);
    header[4] = kind as u8;
    header[8..12].copy_from_slice(&plain_len.to_le_bytes());
    header[16..48].copy_from_slice(&id.0);
    if keys.encrypted() {
        flags |= FLAG_AEAD;
        header[5] = flags;
        let stored = (out.len() - body + TAG_LEN) as u32;
        header[12..16].copy_from_slice(&stored.to_le_bytes());
        let (nonce, tag) = keys.seal_detached(&header[..48], &mut out[body..])?;
        out.extend_from_slice(&tag);
        header[48..60].copy_from_slice(&nonce);
    } else {
        header[5] = flags;
        let stored = (out.len() - body) as u32;
        header[12..16].copy_from_slice(&stored.to_le_bytes());
    }
    let crc = crc32c::crc32c(&header[..60]);
    header[60..64].copy_from_slice(&crc.to_le_bytes());
    out[start..body].copy_from_slice(&header);
    Ok(())
}

/// The fixed part of a blob, checked.
#[derive(Debug, Clone, Copy)]
pub struct BlobHeader {
    pub kind: Kind,
    pub flags: u8,
    pub plain_len: u32,
    pub stored_len: u32,
    pub id: Id,
    pub nonce: [u8; 12],
}

pub fn parse_blob_header(key: &str, offset: u64, b: &[u8]) -> Result<BlobHeader> {
    let bad = |what: &str| Error::corrupt(key, format!("blob at offset {offset}: {what}"));
    if b.len() < BLOB_HEADER {
        return Err(bad("truncated header"));
    }
    if &b[..4] != BLOB_MAGIC {
        return Err(bad("bad magic"));
    }
    if crc32c::crc32c(&b[..60]) != le32(b, 60) {
        return Err(bad("header checksum mismatch"));
    }
    let kind = Kind::from_u8(b[4]).ok_or_else(|| bad("unknown kind"))?;
    let flags = b[5];
    if flags & !(FLAG_ZSTD | FLAG_AEAD) != 0 {
        return Err(bad("unknown flags"));
    }
    let plain_len = le32(b, 8);
    let stored_len = le32(b, 12);
    if plain_len > MAX_BLOB_PLAIN || stored_len > MAX_BLOB_PLAIN + 4096 {
        return Err(bad("length out of range"));
    }
    let mut nonce = [0u8; 12];
    nonce.copy_from_slice(&b[48..60]);
    Ok(BlobHeader {
        kind,
        flags,
        plain_len,
        stored_len,
        id: Id::from_slice(&b[16..48]).ok_or_else(|| bad("truncated id"))?,
        nonce,
    })
}

/// Walks concatenated framed blobs (as [`encode_blob`] appends them): yields each blob's
/// offset in `buf`, its checked header and its bytes. A truncated or malformed blob ends
/// the walk with an error naming `key` and its offset.
pub fn split_blobs<'a>(
    key: &'a str,
    buf: &'a [u8],
) -> impl Iterator<Item = Result<(usize, BlobHeader, &'a [u8])>> + 'a {
    let mut off = 0usize;
    let mut failed = false;
    std::iter::from_fn(move || {
        if failed || off >= buf.len() {
            return None;
        }
        let r = parse_blob_header(key, off as u64, &buf[off..]).and_then(|h| {
            let end = off + BLOB_HEADER + h.stored_len as usize;
            if end > buf.len() {
                return Err(Error::corrupt(
                    key,
                    format!(
                        "blob at offset {off}: truncated ({} bytes of {} present)",
                        buf.len() - off,
                        end - off
                    ),
                ));
            }
            Ok((off, h, &buf[off..end]))
        });
        match &r {
            Ok((_, _, b)) => off += b.len(),
            Err(_) => failed = true,
        }
        Some(r)
    })
}

/// Checks and opens one framed blob (`bytes` = header + payload) that should hold `id`,
/// returning its plaintext in `out`. Every failure names `key` (the pack) and the offset.
pub fn decode_blob(
    keys: &Keys,
    key: &str,
    offset: u64,
    id: Id,
    bytes: &mut [u8],
    out: &mut Vec<u8>,
) -> Result<BlobHeader> {
    let h = parse_blob_header(key, offset, bytes)?;
    out.clear();
    out.resize(h.plain_len as usize, 0);
    decode_blob_into(keys, key, offset, id, bytes, out)
}

/// As [`decode_blob`], into `out`, which must be exactly the plaintext's length (a
/// restore decodes straight into its output buffer).
pub fn decode_blob_into(
    keys: &Keys,
    key: &str,
    offset: u64,
    id: Id,
    bytes: &mut [u8],
    out: &mut [u8],
) -> Result<BlobHeader> {
    let h = check_frame(key, offset, id, bytes, out.len())?;
    let (head, payload) = bytes.split_at_mut(BLOB_HEADER);
    let payload_len = if h.flags & FLAG_AEAD != 0 {
        keys.open(key, &head[..48], h.nonce, payload)
            .map_err(|_| aead_failed(key, offset, id))?
    } else if keys.encrypted() {
        return Err(unencrypted(key, offset, id));
    } else {
        payload.len()
    };
    finish_decode(keys, key, offset, id, &h, &payload[..payload_len], out)?;
    Ok(h)
}

/// As [`decode_blob_into`] for a blob that must stay unchanged (the server checking an
/// agent's batch): only an encrypted blob is copied, into `scratch`, to be opened in
/// place; a plain one is decompressed and hashed where it lies.
pub fn check_blob(
    keys: &Keys,
    key: &str,
    offset: u64,
    id: Id,
    bytes: &[u8],
    scratch: &mut Vec<u8>,
    out: &mut [u8],
) -> Result<BlobHeader> {
    let h = check_frame(key, offset, id, bytes, out.len())?;
    if h.flags & FLAG_AEAD != 0 {
        scratch.clear();
        scratch.extend_from_slice(bytes);
        return decode_blob_into(keys, key, offset, id, scratch, out);
    }
    if keys.encrypted() {
        return Err(unencrypted(key, offset, id));
    }
    finish_decode(keys, key, offset, id, &h, &bytes[BLOB_HEADER..], out)?;
    Ok(h)
}

fn blob_error(key: &str, offset: u64, id: Id, what: impl std::fmt::Display) -> Error {
    Error::corrupt(key, format!("blob {id:?} at offset {offset}: {what}"))
}

fn aead_failed(key: &str, offset: u64, id: Id) -> Error {
    blob_error(
        key,
        offset,
        id,
        "authentication tag mismatch (the data was changed, or the key is wrong)",
    )
}

fn unencrypted(key: &str, offset: u64, id: Id) -> Error {
    blob_error(
        key,
        offset,
        id,
        "unencrypted blob in an encrypted datastore",
    )
}

/// The header of `bytes`, checked against the expected id, frame length and plaintext
/// length.
fn check_frame(key: &str, offset: u64, id: Id, bytes: &[u8], plain: usize) -> Result<BlobHeader> {
    let h = parse_blob_header(key, offset, bytes)?;
    let bad = |what: String| blob_error(key, offset, id, what);
    if h.id != id {
        return Err(bad(format!("holds blob {:?} instead", h.id)));
    }
    if bytes.len() != BLOB_HEADER + h.stored_len as usize {
        return Err(bad("length does not match the index".into()));
    }
    if plain != h.plain_len as usize {
        return Err(bad(format!(
            "holds {} bytes, {plain} expected",
            h.plain_len
        )));
    }
    Ok(h)
}

/// Decompresses (or copies) an opened payload into `out` and checks its id.
fn finish_decode(
    keys: &Keys,
    key: &str,
    offset: u64,
    id: Id,
    h: &BlobHeader,
    payload: &[u8],
    out: &mut [u8],
) -> Result<()> {
    let bad = |what: String| blob_error(key, offset, id, what);
    let n = if h.flags & FLAG_ZSTD != 0 {
        DECOMPRESSOR.with(|d| {
            let mut d = d.borrow_mut();
            let d = match d.as_mut() {
                Some(d) => d,
                None => d.insert(
                    zstd::bulk::Decompressor::new()
                        .map_err(|e| Error::Invalid(format!("zstd: {e}")))?,
                ),
            };
            d.decompress_to_buffer(payload, &mut *out)
                .map_err(|e| bad(format!("zstd: {e}")))
        })?
    } else {
        let n = payload.len().min(out.len());
        out[..n].copy_from_slice(&payload[..n]);
        payload.len()
    };
    if n != out.len() {
        return Err(bad(format!("holds {n} bytes, header says {}", h.plain_len)));
    }
    if keys.id(out) != id {
        return Err(bad(
            "content does not match its id (checksum mismatch)".into()
        ));
    }
    Ok(())
}

thread_local! {
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

// ---- packs ----------------------------------------------------------------------------

pub const PACK_MAGIC: &[u8; 8] = b"HFPACK01";
pub const PACK_END: &[u8; 8] = b"HFPKEND1";
pub const ENTRY_LEN: usize = 48;
const PACK_TAIL: usize = 4 + 4 + 8;

/// Where a blob sits inside its pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackEntry {
    pub id: Id,
    pub kind: Kind,
    /// Offset of the blob's header in the pack.
    pub offset: u32,
    /// Header plus payload.
    pub len: u32,
    pub plain_len: u32,
}

impl PackEntry {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.id.0);
        out.push(self.kind as u8);
        out.extend_from_slice(&[0; 3]);
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&self.len.to_le_bytes());
        out.extend_from_slice(&self.plain_len.to_le_bytes());
    }

    fn decode(b: &[u8]) -> Option<PackEntry> {
        Some(PackEntry {
            id: Id::from_slice(b)?,
            kind: Kind::from_u8(*b.get(32)?)?,
            offset: le32(b, 36),
            len: le32(b, 40),
            plain_len: le32(b, 44),
        })
    }
}

/// A pack being filled in memory (bounded by the target size).
#[derive(Debug)]
pub struct PackBuilder {
    buf: AlignedBuf,
    entries: Vec<PackEntry>,
}

impl PackBuilder {
    pub fn new(capacity: usize) -> PackBuilder {
        PackBuilder::with_buffer(AlignedBuf::with_capacity(capacity + (1 << 20)))
    }

    /// A pack filled in `buf` (cleared), so a pack's memory can be reused.
    pub fn with_buffer(mut buf: AlignedBuf) -> PackBuilder {
        buf.clear();
        buf.extend_from_slice(PACK_MAGIC);
        PackBuilder {
            buf,
            entries: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Appends one framed blob (from [`encode_blob`]).
    pub fn add(&mut self, kind: Kind, id: Id, plain_len: u32, framed: &[u8]) -> Result<()> {
        let offset =
            u32::try_from(self.buf.len()).map_err(|_| Error::Invalid("pack too large".into()))?;
        self.buf.extend_from_slice(framed);
        self.entries.push(PackEntry {
            id,
            kind,
            offset,
            len: framed.len() as u32,
            plain_len,
        });
        Ok(())
    }

    /// Appends the trailer; returns the pack's bytes and its entries. The pack's id is
    /// [`pack_id`] of the bytes.
    pub fn finish(mut self) -> (AlignedBuf, Vec<PackEntry>) {
        let mut tail = Vec::with_capacity(self.entries.len() * ENTRY_LEN + 16);
        for e in &self.entries {
            e.encode(&mut tail);
        }
        tail.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        let crc = crc32c::crc32c(&tail);
        tail.extend_from_slice(&crc.to_le_bytes());
        tail.extend_from_slice(PACK_END);
        self.buf.extend_from_slice(&tail);
        (self.buf, self.entries)
    }
}

/// A pack's id: BLAKE3 of its bytes.
pub fn pack_id(bytes: &[u8]) -> Id {
    Id(*blake3::hash(bytes).as_bytes())
}

/// The storage key of a pack.
pub fn pack_key(id: &Id) -> String {
    let h = id.to_hex();
    format!("packs/{}/{}", &h[..2], h)
}

/// Bytes at the end of a pack after the entry table: count, checksum, end marker.
pub const PACK_TAIL_LEN: usize = PACK_TAIL;

/// Reads a pack's entry table from its trailer, given `tail`: the pack's last bytes
/// (at least the table and the fixed tail) and the pack's length. Used when an index
/// file is missing or damaged, and by verify.
pub fn parse_pack_trailer(key: &str, pack_len: u64, tail: &[u8]) -> Result<Vec<PackEntry>> {
    let bad = |what: &str| Error::corrupt(key, format!("pack trailer: {what}"));
    let n = tail.len();
    if n < PACK_TAIL || pack_len < (PACK_MAGIC.len() + PACK_TAIL) as u64 {
        return Err(bad("too short"));
    }
    if &tail[n - 8..] != PACK_END {
        return Err(bad("bad end marker (truncated?)"));
    }
    let count = trailer_count(tail);
    let table = count
        .checked_mul(ENTRY_LEN)
        .filter(|&t| t + PACK_TAIL <= n && (t + PACK_TAIL + PACK_MAGIC.len()) as u64 <= pack_len)
        .ok_or_else(|| bad("entry count out of range"))?;
    let start = n - PACK_TAIL - table;
    if crc32c::crc32c(&tail[start..n - 12]) != le32(tail, n - 12) {
        return Err(bad("checksum mismatch"));
    }
    let table_start = pack_len - (PACK_TAIL + table) as u64;
    let mut out = Vec::with_capacity(count);
    for c in tail[start..start + table].chunks_exact(ENTRY_LEN) {
        let e = PackEntry::decode(c).ok_or_else(|| bad("bad entry"))?;
        if (e.offset as u64)
            .checked_add(e.len as u64)
            .is_none_or(|end| end > table_start)
            || (e.offset as usize) < PACK_MAGIC.len()
        {
            return Err(bad("entry points outside the pack"));
        }
        out.push(e);
    }
    Ok(out)
}

/// The entry count stored in a pack's last 16 bytes (callers check the length).
pub fn trailer_count(tail: &[u8]) -> usize {
    le32(tail, tail.len() - 16) as usize
}

// ---- index files ----------------------------------------------------------------------

pub const INDEX_MAGIC: &[u8; 8] = b"HFIDX001";

/// Encodes an index file: for each pack, its id and entries; then a BLAKE3 checksum.
pub fn encode_index(packs: &[(Id, Vec<PackEntry>)]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(INDEX_MAGIC);
    for (id, entries) in packs {
        out.extend_from_slice(&id.0);
        out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
        for e in entries {
            e.encode(&mut out);
        }
    }
    let sum = *blake3::hash(&out).as_bytes();
    out.extend_from_slice(&sum);
    out
}

pub fn decode_index(key: &str, b: &[u8]) -> Result<Vec<(Id, Vec<PackEntry>)>> {
    let bad = |what: &str| Error::corrupt(key, format!("index file: {what}"));
    if b.len() < 8 + 32 || &b[..8] != INDEX_MAGIC {
        return Err(bad("not an index file (bad magic or too short)"));
    }
    let body = &b[..b.len() - 32];
    if blake3::hash(body).as_bytes() != &b[b.len() - 32..] {
        return Err(bad("checksum mismatch"));
    }
    let mut out = Vec::new();
    let mut p = 8;
    while p < body.len() {
        if body.len() - p < 36 {
            return Err(bad("truncated pack record"));
        }
        let id = Id::from_slice(&body[p..]).ok_or_else(|| bad("truncated pack id"))?;
        let count = le32(body, p + 32) as usize;
        p += 36;
        let len = count
            .checked_mul(ENTRY_LEN)
            .filter(|&l| l <= body.len() - p)
            .ok_or_else(|| bad("entry count out of range"))?;
        let entries = body[p..p + len]
            .chunks_exact(ENTRY_LEN)
            .map(PackEntry::decode)
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad("bad entry"))?;
        p += len;
        out.push((id, entries));
    }
    Ok(out)
}

// ---- sealed files (manifests, the damaged-blob list) ------------------------------------

const SEALED_MAGIC: &[u8; 8] = b"HFSEAL01";

/// Frames a small file: checksummed, and encrypted (bound to its key name) when the
/// datastore is.
pub fn seal_file(keys: &Keys, key: &str, payload: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(payload.len() + 96);
    out.extend_from_slice(SEALED_MAGIC);
    let mut body = payload.to_vec();
    let mut nonce = [0u8; 12];
    let flags = if keys.encrypted() {
        nonce = keys.seal(format!("holdfast sealed {key}").as_bytes(), &mut body)?;
        1u8
    } else {
        0
    };
    out.push(flags);
    out.extend_from_slice(&[0; 3]);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    let sum = *blake3::hash(&out).as_bytes();
    out.extend_from_slice(&sum);
    Ok(out)
}

pub fn open_sealed(keys: &Keys, key: &str, b: &[u8]) -> Result<Vec<u8>> {
    let bad = |what: &str| Error::corrupt(key, what.to_string());
    if b.len() < 28 + 32 || &b[..8] != SEALED_MAGIC {
        return Err(bad("not a holdfast file (bad magic or too short)"));
    }
    let body_end = b.len() - 32;
    if blake3::hash(&b[..body_end]).as_bytes() != &b[body_end..] {
        return Err(bad("checksum mismatch"));
    }
    let len = le32(b, 24) as usize;
    if 28 + len != body_end {
        return Err(bad("length mismatch"));
    }
    let mut body = b[28..body_end].to_vec();
    match b[8] {
        0 if !keys.encrypted() => Ok(body),
        0 => Err(bad("unencrypted file in an encrypted datastore")),
        1 => {
            let mut nonce = [0u8; 12];
            nonce.copy_from_slice(&b[12..24]);
            let n = keys.open(
                key,
                format!("holdfast sealed {key}").as_bytes(),
                nonce,
                &mut body,
            )?;
            body.truncate(n);
            Ok(body)
        }
        _ => Err(bad("unknown flags")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(keys: &Keys, data: &[u8]) {
        let mut z = zstd::bulk::Compressor::new(1).unwrap();
        let id = keys.id(data);
        let mut framed = Vec::new();
        encode_blob(keys, &mut z, Kind::Data, id, data, &mut framed).unwrap();
        let mut out = Vec::new();
        let h = decode_blob(keys, "p", 0, id, &mut framed.clone(), &mut out).unwrap();
        assert_eq!(out, data);
        assert_eq!(h.plain_len as usize, data.len());
        // Every single-byte change is caught.
        for i in (0..framed.len()).step_by(7) {
            let mut m = framed.clone();
            m[i] ^= 0x40;
            assert!(
                decode_blob(keys, "p", 0, id, &mut m, &mut out).is_err(),
                "byte {i}"
            );
        }
    }

    #[test]
    fn blobs_round_trip_plain_and_encrypted() {
        let text = b"log line 42 ok\n".repeat(3000);
        let rand: Vec<u8> = (0..20000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        for keys in [Keys::plain(), Keys::from_master(&[3; 32]).unwrap()] {
            round_trip(&keys, &text);
            round_trip(&keys, &rand);
            round_trip(&keys, b"");
        }
    }

    #[test]
    fn pack_and_index_round_trip() {
        let keys = Keys::plain();
        let mut z = zstd::bulk::Compressor::new(1).unwrap();
        let mut pb = PackBuilder::new(1 << 20);
        let mut framed = Vec::new();
        for i in 0..5u8 {
            let data = vec![i; 1000];
            let id = keys.id(&data);
            framed.clear();
            encode_blob(&keys, &mut z, Kind::Data, id, &data, &mut framed).unwrap();
            pb.add(Kind::Data, id, 1000, &framed).unwrap();
        }
        let (bytes, entries) = pb.finish();
        let id = pack_id(&bytes);
        let n = bytes.len() as u64;
        assert_eq!(parse_pack_trailer("k", n, &bytes).unwrap(), entries);
        assert_eq!(
            parse_pack_trailer("k", n, &bytes[bytes.len() - 16 - 5 * ENTRY_LEN..]).unwrap(),
            entries
        );
        assert!(parse_pack_trailer("k", n - 1, &bytes[..bytes.len() - 1]).is_err());
        let idx = encode_index(&[(id, entries.clone())]);
        assert_eq!(decode_index("i", &idx).unwrap(), vec![(id, entries)]);
        let mut m = idx.clone();
        m[20] ^= 1;
        assert!(decode_index("i", &m).is_err());
    }

    #[test]
    fn sealed_files() {
        for keys in [Keys::plain(), Keys::from_master(&[3; 32]).unwrap()] {
            let s = seal_file(&keys, "points/x", b"{}").unwrap();
            assert_eq!(open_sealed(&keys, "points/x", &s).unwrap(), b"{}");
            let mut m = s.clone();
            m[30] ^= 1;
            assert!(open_sealed(&keys, "points/x", &m).is_err());
            if keys.encrypted() {
                // Bound to its name: a manifest copied under another name is refused.
                assert!(open_sealed(&keys, "points/y", &s).is_err());
            }
        }
    }
}
