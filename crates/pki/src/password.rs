//! Console users' passwords (argon2id, PHC strings) and API tokens (`hft_` + 32 random
//! bytes, stored as SHA-256 like enrollment tokens: they are high-entropy, a slow hash
//! adds nothing).

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};

use crate::{Error, Result, hex, random_bytes};

/// Prefix of API tokens, so a bearer token tells which kind it is.
pub const API_TOKEN_PREFIX: &str = "hft_";

/// The longest password accepted: argon2 takes any length, but a megabyte password is
/// only a way to make the server work.
pub const MAX_PASSWORD: usize = 1024;

/// argon2id with OWASP's minimum (19 MiB, 2 passes, 1 lane): a login costs ~20 ms.
fn hasher() -> Result<Argon2<'static>> {
    let params = Params::new(19 * 1024, 2, 1, None).map_err(|e| Error::Password(e.to_string()))?;
    Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
}

/// The PHC string (`$argon2id$v=19$...`) of `password` with a fresh random salt.
pub fn hash_password(password: &str) -> Result<String> {
    if password.len() > MAX_PASSWORD {
        return Err(Error::Password(format!(
            "a password is at most {MAX_PASSWORD} bytes"
        )));
    }
    let salt = SaltString::encode_b64(&random_bytes::<16>()?)
        .map_err(|e| Error::Password(e.to_string()))?;
    let phc = hasher()?
        .hash_password(password.as_bytes(), &salt)
        .map_err(|e| Error::Password(e.to_string()))?;
    Ok(phc.to_string())
}

/// Whether `password` matches the PHC string `phc`. A PHC string that does not parse
/// matches nothing.
pub fn verify_password(password: &str, phc: &str) -> bool {
    if password.len() > MAX_PASSWORD {
        return false;
    }
    let Ok(parsed) = PasswordHash::new(phc) else {
        return false;
    };
    let Ok(h) = hasher() else {
        return false;
    };
    h.verify_password(password.as_bytes(), &parsed).is_ok()
}

/// A new API token: `hft_<64 hex>`. The catalog keeps [`crate::secret_hash`] of it.
pub fn make_api_token() -> Result<String> {
    Ok(format!("{API_TOKEN_PREFIX}{}", hex(&random_bytes::<32>()?)))
}

/// A new random secret (session ids, CSRF tokens): 64 hex digits.
pub fn random_secret() -> Result<String> {
    Ok(hex(&random_bytes::<32>()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_verify_and_differ_by_salt() {
        let a = hash_password("correct horse").unwrap();
        let b = hash_password("correct horse").unwrap();
        assert!(a.starts_with("$argon2id$v=19$"), "{a}");
        assert_ne!(a, b);
        assert!(verify_password("correct horse", &a));
        assert!(!verify_password("correct hors", &a));
        assert!(!verify_password("x", "not a phc string"));
        assert!(hash_password(&"x".repeat(MAX_PASSWORD + 1)).is_err());
    }

    #[test]
    fn api_tokens_are_prefixed_and_random() {
        let t = make_api_token().unwrap();
        assert!(t.starts_with(API_TOKEN_PREFIX));
        assert_eq!(t.len(), API_TOKEN_PREFIX.len() + 64);
        assert_ne!(t, make_api_token().unwrap());
    }
}
