//! Where a local-mode datastore lives: a folder, or object storage named by a URL
//! (`az://ACCOUNT/CONTAINER`, `s3://BUCKET`). Object storage takes its credentials
//! from the environment, the same key-file format as `holdfast storage add`:
//! `HOLDFAST_STORAGE_KEY_FILE` (Azure: the account key; S3: the access key id and the
//! secret key, one per line), `HOLDFAST_STORAGE_ENDPOINT` (Azurite, an S3-compatible
//! server) and `HOLDFAST_STORAGE_REGION` (S3; default `us-east-1`).

use anyhow::{Context, bail};
use std::path::Path;

pub(super) const KEY_FILE_ENV: &str = "HOLDFAST_STORAGE_KEY_FILE";
pub(super) const ENDPOINT_ENV: &str = "HOLDFAST_STORAGE_ENDPOINT";
pub(super) const REGION_ENV: &str = "HOLDFAST_STORAGE_REGION";

/// The object-storage target `dir` names, or `None` for a folder.
pub(super) fn object_target(dir: &Path) -> anyhow::Result<Option<objstore::Target>> {
    let s = dir.to_string_lossy();
    let (azure, rest) = if let Some(r) = s.strip_prefix("az://") {
        (true, r)
    } else if let Some(r) = s.strip_prefix("s3://") {
        (false, r)
    } else {
        return Ok(None);
    };
    let word = |w: &str| {
        !w.is_empty()
            && w.len() <= 255
            && w.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
    };
    let key_file = std::env::var_os(KEY_FILE_ENV)
        .with_context(|| format!("{s}: object storage needs {KEY_FILE_ENV} (the key file)"))?;
    let lines = key_lines(Path::new(&key_file))?;
    let endpoint = std::env::var(ENDPOINT_ENV).ok().filter(|e| !e.is_empty());
    if azure {
        let Some((account, container)) = rest.split_once('/').filter(|(a, c)| word(a) && word(c))
        else {
            bail!("{s}: write az://ACCOUNT/CONTAINER (letters, digits, `-`, `.`, `_`)");
        };
        let [key] = lines.as_slice() else {
            bail!("{KEY_FILE_ENV}: an Azure key file holds one line, the account key");
        };
        Ok(Some(objstore::Target::Azure {
            account: account.into(),
            container: container.into(),
            endpoint,
            access_key: objstore::Secret::new(key.clone()),
        }))
    } else {
        if !word(rest) {
            bail!("{s}: write s3://BUCKET (letters, digits, `-`, `.`, `_`)");
        }
        let [id, secret] = lines.as_slice() else {
            bail!(
                "{KEY_FILE_ENV}: an S3 key file holds two lines, the access key id and the secret access key"
            );
        };
        Ok(Some(objstore::Target::S3 {
            bucket: rest.into(),
            endpoint,
            region: std::env::var(REGION_ENV).unwrap_or_else(|_| "us-east-1".into()),
            access_key_id: id.clone(),
            secret_access_key: objstore::Secret::new(secret.clone()),
        }))
    }
}

/// Largest key file read (keys are under 100 bytes; a datastore key file under 1 KiB).
const MAX_KEY_FILE: u64 = 4096;

/// A key file's text, read only when it is small enough to be one.
pub(super) fn read_key_file(path: &Path) -> anyhow::Result<String> {
    let len = std::fs::metadata(path)
        .with_context(|| format!("{}: cannot read the key file", path.display()))?
        .len();
    if len > MAX_KEY_FILE {
        bail!(
            "{}: {len} bytes is too large for a key file (at most {MAX_KEY_FILE})",
            path.display()
        );
    }
    std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read the key file", path.display()))
}

/// The non-empty lines of a key file.
pub(super) fn key_lines(path: &Path) -> anyhow::Result<Vec<String>> {
    Ok(read_key_file(path)?
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect())
}
