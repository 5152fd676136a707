//! Online protection from the CLI: a protection group's `--online*` flags, and saving
//! the online copy's key when a group first uses a target.

use anyhow::{Context, anyhow, bail};
use clap::Args;
use client::seg;
use protocol::StorageKey;
use protocol::{OnlinePolicy, OnlineRetention, Policy};
use std::path::Path;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct OnlineArgs {
    /// Keep a second copy on this storage target (`holdfast storage add`); `none`
    /// turns online protection off.
    #[arg(long, value_name = "STORAGE")]
    online: Option<String>,
    /// Online copy times of day, UTC: HH:MM[,HH:MM] (needed with --online the first
    /// time).
    #[arg(long, value_name = "HH:MM[,HH:MM]")]
    online_times: Option<String>,
    /// Online retention, grandfather-father-son: daily=N,weekly=N,monthly=N,yearly=N
    /// (at most 180, 104, 60, 10; needed with --online the first time).
    #[arg(long, value_name = "RULES")]
    online_retention: Option<String>,
    /// Upload limit in KiB/s, always or only inside hours: KBPS or
    /// KBPS@HH:MM-HH:MM (UTC); `none` removes it.
    #[arg(long, value_name = "KBPS[@HH:MM-HH:MM]")]
    online_bandwidth: Option<String>,
    /// Save the key of the online copy to this new file (mode 0600). Online copies
    /// are always encrypted with a key of their own; without this flag, save it later
    /// with `holdfast storage key`.
    #[arg(long, value_name = "FILE")]
    online_key_file: Option<PathBuf>,
}

fn list(s: &str) -> Vec<String> {
    s.split(',')
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .collect()
}

/// `KBPS` or `KBPS@HH:MM-HH:MM`; `none` = no limit.
fn bandwidth(s: &str) -> anyhow::Result<(Option<u64>, Option<String>)> {
    if s == "none" {
        return Ok((None, None));
    }
    let (k, hours) = match s.split_once('@') {
        Some((k, h)) => (k, Some(h.trim().to_string())),
        None => (s, None),
    };
    let kbps: u64 = k.trim().parse().ok().filter(|&k| k > 0).ok_or_else(|| {
        anyhow!("--online-bandwidth {s:?}: KBPS (a number over 0) or KBPS@HH:MM-HH:MM")
    })?;
    Ok((Some(kbps), hours))
}

impl OnlineArgs {
    pub fn any(&self) -> bool {
        self.online.is_some()
            || self.online_times.is_some()
            || self.online_retention.is_some()
            || self.online_bandwidth.is_some()
    }

    /// The file to save the online key to, if asked.
    pub fn key_file(&self) -> Option<&PathBuf> {
        self.online_key_file.as_ref()
    }

    /// Applies the flags on top of `p`'s online protection (checked with the rest of
    /// the policy, as the server checks it).
    pub fn apply(&self, p: &mut Policy) -> anyhow::Result<()> {
        if self.online.as_deref() == Some("none") {
            if self.online_times.is_some()
                || self.online_retention.is_some()
                || self.online_bandwidth.is_some()
            {
                bail!(
                    "--online none turns online protection off; it takes no other --online-* flag"
                );
            }
            p.online = None;
            return Ok(());
        }
        let mut o = match (p.online.take(), &self.online) {
            (Some(mut o), name) => {
                if let Some(n) = name {
                    o.storage = n.clone();
                }
                o
            }
            (None, Some(n)) => OnlinePolicy {
                storage: n.clone(),
                times: list(self.online_times.as_deref().ok_or_else(|| {
                    anyhow!("--online-times is needed to turn on online protection")
                })?),
                retention: OnlineRetention::parse(self.online_retention.as_deref().ok_or_else(
                    || anyhow!("--online-retention is needed to turn on online protection"),
                )?)
                .map_err(|e| anyhow!("--online-retention: {e}"))?,
                bandwidth_kbps: None,
                bandwidth_hours: None,
            },
            (None, None) if self.any() => {
                bail!("the group has no online protection: give --online STORAGE with these flags")
            }
            (None, None) => return Ok(()),
        };
        if let Some(t) = &self.online_times {
            o.times = list(t);
        }
        if let Some(r) = &self.online_retention {
            o.retention =
                OnlineRetention::parse(r).map_err(|e| anyhow!("--online-retention: {e}"))?;
        }
        if let Some(b) = &self.online_bandwidth {
            (o.bandwidth_kbps, o.bandwidth_hours) = bandwidth(b)?;
        }
        p.online = Some(o);
        Ok(())
    }
}

/// Whether `r` is where a read asks for it: on disk (`from` none or `disk`), or on
/// target `online:NAME`.
pub fn held_at(r: &protocol::RecoveryPointInfo, from: Option<&str>) -> bool {
    let want = from.unwrap_or("disk");
    r.locations.iter().any(|l| l == want)
}

/// What `pg show` prints of online protection.
pub fn describe(o: &OnlinePolicy) -> String {
    format!(
        "to {} at {} UTC, keeping {}{}",
        o.storage,
        o.times.join(", "),
        o.retention,
        match (o.bandwidth_kbps, &o.bandwidth_hours) {
            (Some(k), Some(h)) => format!(", uploads at most {k} KiB/s {h} UTC"),
            (Some(k), None) => format!(", uploads at most {k} KiB/s"),
            _ => String::new(),
        }
    )
}

/// Writes `text` to a new file readable by its owner only, durably.
pub fn write_new_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| {
            format!(
                "{}: cannot create the key file (it must not exist)",
                path.display()
            )
        })?;
    f.write_all(text.as_bytes())
        .and_then(|_| f.sync_all())
        .with_context(|| format!("{}: cannot write the key file", path.display()))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("{}: cannot sync the folder", dir.display()))?;
    }
    Ok(())
}

/// Fetches target `name`'s online key from the server and saves it to `out`.
pub fn save_key(cl: &client::Client, name: &str, out: &Path) -> anyhow::Result<()> {
    if out.exists() {
        bail!("{}: exists; give a new file for the key", out.display());
    }
    let k: StorageKey = cl.get(&format!("/storage/{}/key", seg(name)))?;
    write_new_private(out, &k.key)?;
    eprintln!(
        "the key of the online copy on {name} is saved in {} (mode 0600); keep it apart from this server",
        out.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::SyncFrequency;

    fn args(online: &[(&str, &str)]) -> OnlineArgs {
        let get = |k: &str| {
            online
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        };
        OnlineArgs {
            online: get("online"),
            online_times: get("times"),
            online_retention: get("retention"),
            online_bandwidth: get("bandwidth"),
            online_key_file: None,
        }
    }

    #[test]
    fn flags_turn_on_change_and_turn_off_online_protection() {
        let mut p = Policy::daily_at(5, SyncFrequency::Minutes(15), "20:00");
        args(&[
            ("online", "cloud"),
            ("times", "21:00,03:00"),
            ("retention", "daily=30,monthly=12"),
            ("bandwidth", "512@08:00-18:00"),
        ])
        .apply(&mut p)
        .unwrap();
        p.validate().unwrap();
        let o = p.online.clone().unwrap();
        assert_eq!(o.storage, "cloud");
        assert_eq!(o.times, vec!["21:00", "03:00"]);
        assert_eq!((o.retention.daily, o.retention.monthly), (30, 12));
        assert_eq!(o.bandwidth_kbps, Some(512));
        assert_eq!(o.bandwidth_hours.as_deref(), Some("08:00-18:00"));
        // Changing one flag keeps the others.
        args(&[("retention", "yearly=3")]).apply(&mut p).unwrap();
        let o = p.online.clone().unwrap();
        assert_eq!(o.times, vec!["21:00", "03:00"]);
        assert_eq!(o.retention.yearly, 3);
        assert_eq!(o.retention.daily, 0);
        args(&[("bandwidth", "none")]).apply(&mut p).unwrap();
        assert_eq!(p.online.as_ref().unwrap().bandwidth_kbps, None);
        args(&[("online", "none")]).apply(&mut p).unwrap();
        assert!(p.online.is_none());
    }

    #[test]
    fn wrong_flags_are_refused_with_the_flag_named() {
        let mut p = Policy::daily_at(5, SyncFrequency::Minutes(15), "20:00");
        let e = args(&[("online", "cloud"), ("times", "21:00")])
            .apply(&mut p)
            .unwrap_err();
        assert!(e.to_string().contains("--online-retention"), "{e}");
        let e = args(&[("times", "21:00")]).apply(&mut p).unwrap_err();
        assert!(e.to_string().contains("--online STORAGE"), "{e}");
        let e = args(&[
            ("online", "cloud"),
            ("times", "21:00"),
            ("retention", "hourly=3"),
        ])
        .apply(&mut p)
        .unwrap_err();
        assert!(e.to_string().contains("hourly"), "{e}");
        let e = args(&[
            ("online", "cloud"),
            ("times", "21:00"),
            ("retention", "daily=3"),
            ("bandwidth", "fast"),
        ])
        .apply(&mut p)
        .unwrap_err();
        assert!(e.to_string().contains("--online-bandwidth"), "{e}");
        // Over MABS's limits: the policy check names the field.
        args(&[
            ("online", "cloud"),
            ("times", "21:00"),
            ("retention", "daily=181"),
        ])
        .apply(&mut p)
        .unwrap();
        assert!(p.validate().unwrap_err().contains("online.retention.daily"));
    }
}
