//! Fuzz target: the datastore's stored-file parsers (blob, pack trailer, index file,
//! sealed file, changed-ranges file). Checksums and magics are patched in so inputs
//! reach the parsing behind them instead of stopping at the first check.
#![no_main]

use datastore::crypto::Keys;
use datastore::format;
use datastore::id::Id;

fn fix_blake3_tail(b: &mut [u8], magic: &[u8]) {
    if b.len() < magic.len() + 32 {
        return;
    }
    b[..magic.len()].copy_from_slice(magic);
    let n = b.len() - 32;
    let sum = *blake3::hash(&b[..n]).as_bytes();
    b[n..].copy_from_slice(&sum);
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let mut b = rest.to_vec();
    let keys = [Keys::plain(), Keys::from_master(&[7; 32]).expect("keys")];
    let mut out = Vec::new();
    match sel % 5 {
        0 => {
            if b.len() >= format::BLOB_HEADER {
                b[..4].copy_from_slice(format::BLOB_MAGIC);
                let crc = crc32c::crc32c(&b[..60]);
                b[60..64].copy_from_slice(&crc.to_le_bytes());
                let id = Id(b[16..48].try_into().expect("32 bytes"));
                for k in &keys {
                    let _ = format::decode_blob(k, "fuzz", 0, id, &mut b.clone(), &mut out);
                }
            }
        }
        1 => {
            let n = b.len();
            if n >= 16 {
                b[n - 8..].copy_from_slice(format::PACK_END);
                let count = format::trailer_count(&b);
                if let Some(start) = count
                    .checked_mul(format::ENTRY_LEN)
                    .and_then(|t| n.checked_sub(16 + t))
                {
                    let crc = crc32c::crc32c(&b[start..n - 12]);
                    b[n - 12..n - 8].copy_from_slice(&crc.to_le_bytes());
                }
                let _ = format::parse_pack_trailer("fuzz", n as u64 + 8, &b);
            }
        }
        2 => {
            fix_blake3_tail(&mut b, format::INDEX_MAGIC);
            let _ = format::decode_index("fuzz", &b);
        }
        3 => {
            fix_blake3_tail(&mut b, b"HFSEAL01");
            for k in &keys {
                let _ = format::open_sealed(k, "points/x", &b);
            }
        }
        _ => {
            let _ = datastore::ranges::parse(
                "fuzz",
                &String::from_utf8_lossy(&b),
                &[1 << 30, 0, u64::MAX],
            );
        }
    }
});
