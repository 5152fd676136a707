//! Enrollment tokens and the admin token.

use std::path::Path;

use crate::fsutil::{PRIVATE, ensure_dir, read_opt, write_durable};
use crate::{Error, Result, hex, random_bytes, sha256_hex};

const PREFIX: &str = "hf1";

fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Parses an enrollment token `hf1.<ca-fingerprint-hex64>.<secret-hex64>`
/// into (CA fingerprint, secret), both lowercase. Surrounding whitespace (a
/// pasted newline) is ignored; anything else malformed is an error naming
/// the problem.
pub fn parse_token(token: &str) -> Result<(String, String)> {
    let parts: Vec<&str> = token.trim().split('.').collect();
    let [prefix, fp, secret] = parts.as_slice() else {
        return Err(Error::Token(format!(
            "expected 3 dot-separated parts ({PREFIX}.<fingerprint>.<secret>), found {}",
            parts.len()
        )));
    };
    if *prefix != PREFIX {
        return Err(Error::Token(format!(
            "unknown version {prefix:?} (expected {PREFIX:?})"
        )));
    }
    if !is_hex64(fp) {
        return Err(Error::Token(
            "CA fingerprint must be 64 hex digits (SHA-256)".into(),
        ));
    }
    if !is_hex64(secret) {
        return Err(Error::Token("secret must be 64 hex digits".into()));
    }
    Ok((fp.to_ascii_lowercase(), secret.to_ascii_lowercase()))
}

/// Makes a new enrollment token pinning `ca_fingerprint`; returns
/// (token, secret). The catalog stores only [`secret_hash`] of the secret.
pub fn make_token(ca_fingerprint: &str) -> Result<(String, String)> {
    if !is_hex64(ca_fingerprint) {
        return Err(Error::Token(
            "CA fingerprint must be 64 hex digits (SHA-256)".into(),
        ));
    }
    let secret = hex(&random_bytes::<32>()?);
    let token = format!("{PREFIX}.{}.{secret}", ca_fingerprint.to_ascii_lowercase());
    Ok((token, secret))
}

/// SHA-256 hex of a token secret: what the catalog stores, so a leaked
/// catalog does not leak usable tokens. Also used for the admin token.
pub fn secret_hash(secret: &str) -> String {
    sha256_hex(secret.as_bytes())
}

/// The admin token in `dir/admin.token` (0600): 32 random bytes as hex,
/// created on first start and read afterwards.
pub fn load_or_create_admin_token(dir: &Path) -> Result<String> {
    ensure_dir(dir)?;
    let path = dir.join("admin.token");
    if let Some(s) = read_opt(&path)? {
        let token = s.trim();
        if token.is_empty() {
            return Err(Error::BadFile {
                path,
                what: "empty admin token; delete the file to create a new one".into(),
            });
        }
        return Ok(token.to_string());
    }
    let token = hex(&random_bytes::<32>()?);
    write_durable(&path, format!("{token}\n").as_bytes(), PRIVATE)?;
    Ok(token)
}

/// Compares two tokens in time independent of where they differ, so the
/// comparison does not leak a secret byte by byte.
pub fn token_eq(a: &str, b: &str) -> bool {
    aws_lc_rs::constant_time::verify_slices_are_equal(a.as_bytes(), b.as_bytes()).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const FP: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    #[test]
    fn make_parse_round_trip() {
        let (token, secret) = make_token(FP).unwrap();
        assert_eq!(secret.len(), 64);
        let (fp, s) = parse_token(&format!("{token}\n")).unwrap();
        assert_eq!(fp, FP);
        assert_eq!(s, secret);
        let (_, other) = make_token(FP).unwrap();
        assert_ne!(other, secret, "secrets are random");
        // Uppercase fingerprints are normalized.
        let (t, _) = make_token(&FP.to_uppercase()).unwrap();
        assert_eq!(parse_token(&t).unwrap().0, FP);
    }

    #[test]
    fn parse_rejects_malformed() {
        let s = "0".repeat(64);
        let cases = [
            String::new(),
            "hf1".to_string(),
            format!("hf1.{FP}"),
            format!("hf2.{FP}.{s}"),
            format!("hf1.{}.{s}", &FP[..63]),
            format!("hf1.{}g.{s}", &FP[..63]),
            format!("hf1.{FP}.{}", &s[..10]),
            format!("hf1.{FP}.{s}.extra"),
            format!("hf1.{FP}.{}z", &s[..63]),
        ];
        for c in cases {
            assert!(matches!(parse_token(&c), Err(Error::Token(_))), "{c:?}");
        }
        assert!(matches!(make_token("abc"), Err(Error::Token(_))));
    }

    #[test]
    fn secret_hash_and_eq() {
        assert_eq!(secret_hash("abc"), FP);
        assert!(token_eq("abc", "abc"));
        assert!(!token_eq("abc", "abd"));
        assert!(!token_eq("abc", "abcd"));
    }

    #[test]
    fn admin_token_persists_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create_admin_token(dir.path()).unwrap();
        assert_eq!(a.len(), 64);
        let b = load_or_create_admin_token(dir.path()).unwrap();
        assert_eq!(a, b);
        let mode = std::fs::metadata(dir.path().join("admin.token"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
