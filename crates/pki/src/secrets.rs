//! Secrets the server keeps for others (a storage target's account key): one file
//! each, mode 0600 in a 0700 folder, written durably, never in the catalog or a log.

use std::path::{Path, PathBuf};

use crate::fsutil::{PRIVATE, ensure_dir, read_opt, write_durable};
use crate::{Error, Result};

/// A folder of named secrets (`DIR/NAME.secret`).
#[derive(Debug, Clone)]
pub struct SecretStore {
    dir: PathBuf,
}

impl SecretStore {
    pub fn new(dir: impl Into<PathBuf>) -> SecretStore {
        SecretStore { dir: dir.into() }
    }

    fn path(&self, name: &str) -> Result<PathBuf> {
        // Names are checked by the callers' grammar; this guards the file system anyway.
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
            || name.starts_with('.')
        {
            return Err(Error::BadFile {
                path: self.dir.join(name),
                what: "a secret's name must be letters, digits, `-`, `.`, `_`".into(),
            });
        }
        Ok(self.dir.join(format!("{name}.secret")))
    }

    /// The file of the secret called `name` (its folder made), for secrets another
    /// crate writes itself (a datastore key file).
    pub fn file(&self, name: &str) -> Result<PathBuf> {
        ensure_dir(&self.dir)?;
        self.path(name)
    }

    /// Stores (or replaces) the secret called `name`.
    pub fn put(&self, name: &str, secret: &str) -> Result<()> {
        ensure_dir(&self.dir)?;
        write_durable(&self.path(name)?, secret.as_bytes(), PRIVATE)
    }

    /// The secret called `name`; an error naming the file when it is missing.
    pub fn get(&self, name: &str) -> Result<String> {
        let path = self.path(name)?;
        read_opt(&path)?.ok_or_else(|| Error::BadFile {
            path: path.clone(),
            what: "missing (the secret was removed; add the target again)".into(),
        })
    }

    /// Forgets the secret called `name` (a missing one is not an error).
    pub fn remove(&self, name: &str) -> Result<()> {
        let path = self.path(name)?;
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(Error::Io {
                path,
                op: "remove",
                source,
            }),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn secrets_are_private_files_that_come_back_and_go() {
        let t = tempfile::tempdir().unwrap();
        let s = SecretStore::new(t.path().join("secrets"));
        s.put("offsite", "k3y").unwrap();
        assert_eq!(s.get("offsite").unwrap(), "k3y");
        let mode = std::fs::metadata(t.path().join("secrets/offsite.secret"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let dmode = std::fs::metadata(t.path().join("secrets"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(dmode & 0o777, 0o700);
        s.put("offsite", "new").unwrap();
        assert_eq!(s.get("offsite").unwrap(), "new");
        s.remove("offsite").unwrap();
        s.remove("offsite").unwrap();
        let e = s.get("offsite").unwrap_err().to_string();
        assert!(e.contains("offsite.secret"), "{e}");
        assert!(s.put("../x", "k").is_err());
        assert!(s.put(".hidden", "k").is_err());
    }
}
