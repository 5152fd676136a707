//! Checks of request bodies, shared by the server's API handlers and the admin CLI so
//! that both refuse the same things with the same message. Every message starts with
//! the field it is about (`name`, `policy.replica_creation`, `target.dir`...), as the
//! JSON body spells it.
//!
//! **Names** (hosts, VMs, protection groups, clusters, storage) follow one grammar,
//! [`check_name`]: 1-255 bytes of UTF-8; not `.` or `..`; no leading or trailing
//! white space; none of `/ \ ? # %`; no control characters, no bidirectional
//! overrides or isolates, no line or paragraph separators. Why: a name is a URL path
//! segment (`/datasources/{host}/{vm}`, where `/ ? # %` and `..` change what is
//! addressed), a folder name on recovery (`DIR/<vm>/`: 255 bytes is a file name's
//! limit, `\` separates folders on Windows) and a word in listings, logs and alerts
//! (control and bidi characters can make it read as something else). Everything else
//! stays allowed, because VM names come from hypervisors: spaces, parentheses and
//! non-ASCII letters are common ("SQL Server (prod) – 2019"). Host names are in
//! addition limited to letters, digits, `-`, `.` and `_` ([`check_host_name`]): they
//! are the common name of the agent's certificate and the `HOST` of `HOST:DIR`.

use crate::{
    AgentTokenRequest, CreateGroup, DiskFormat, EnrollRequest, Exclusions, Inventory, ModifyGroup,
    Policy, RecoveryRequest, RecoveryTarget, ReplicaCreation, VmInfo, split_vm,
};

/// Longest name, bytes (a file name's limit: a VM name becomes a folder name).
pub const MAX_NAME_BYTES: usize = 255;
/// Characters no name may hold: URL and path syntax.
pub const NAME_FORBIDDEN: [char; 5] = ['/', '\\', '?', '#', '%'];
/// Most members one request may name.
pub const MAX_MEMBERS: usize = 10_000;
/// Longest target folder or item path, bytes (Linux's PATH_MAX).
pub const MAX_PATH_BYTES: usize = 4096;
/// Most item paths one copy may name.
pub const MAX_ITEMS: usize = 1000;
/// Exclusions are whole sectors: a range that starts or ends inside a 512-byte sector
/// cannot be a file's data (file systems allocate whole sectors).
pub const EXCLUSION_ALIGN: u64 = 512;
/// The first MiB of a disk holds its partition table (MBR, the GPT header and its
/// entries) and, on BIOS disks, the boot loader in the gap before the first partition
/// (which starts at 1 MiB): left out, the restored disk would not boot or not open.
pub const EXCLUSION_HEAD: u64 = 1 << 20;
/// The last 32 KiB of a disk hold the backup GPT (33 sectors of 512 bytes, or 6 of
/// 4 KiB).
pub const EXCLUSION_TAIL: u64 = 32 << 10;

/// Characters that are not allowed anywhere in a name, a folder or an item path: C0 and
/// C1 controls (newline, escape...), bidirectional embeddings, overrides, isolates and
/// marks, and line and paragraph separators.
fn hidden_char(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061C}'
                | '\u{200E}'
                | '\u{200F}'
                | '\u{202A}'..='\u{202E}'
                | '\u{2066}'..='\u{2069}'
                | '\u{2028}'
                | '\u{2029}'
                | '\u{FEFF}'
        )
}

/// A name shown in a message: quoted and escaped, and cut (a 5,000-byte name is not
/// repeated whole).
fn shown(s: &str) -> String {
    let cut: String = s.chars().take(64).collect();
    if cut.len() < s.len() {
        format!("{cut:?}... ({} bytes)", s.len())
    } else {
        format!("{s:?}")
    }
}

/// Checks `name` against the name grammar (see the module docs); the message starts
/// with `field`.
pub fn check_name(field: &str, name: &str) -> Result<(), String> {
    let why = if name.is_empty() {
        "is empty".to_string()
    } else if name.len() > MAX_NAME_BYTES {
        format!("is {} bytes long; at most {MAX_NAME_BYTES}", name.len())
    } else if name == "." || name == ".." {
        "is not a name (`.` and `..` are not allowed)".to_string()
    } else if name.trim() != name {
        "starts or ends with white space".to_string()
    } else if let Some(c) = name.chars().find(|c| NAME_FORBIDDEN.contains(c)) {
        format!("holds {c:?}; names may not hold / \\ ? # %")
    } else if let Some(c) = name.chars().find(|&c| hidden_char(c)) {
        format!(
            "holds the control or bidirectional character U+{:04X}",
            c as u32
        )
    } else {
        return Ok(());
    };
    Err(format!("{field}: {} {why}", shown(name)))
}

/// A host name: the name grammar, and only letters, digits, `-`, `.`, `_`, at most 128
/// bytes (it is a certificate's common name and the `HOST` of `HOST:DIR`).
pub fn check_host_name(field: &str, name: &str) -> Result<(), String> {
    check_name(field, name)?;
    if name.len() > 128
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
    {
        return Err(format!(
            "{field}: {} is not a host name (1-128 letters, digits, '-', '.', '_')",
            shown(name)
        ));
    }
    Ok(())
}

/// A `HOST/VM` name: a host name and a VM name.
pub fn check_vm_ref(field: &str, s: &str) -> Result<(), String> {
    let (h, v) = split_vm(s).ok_or_else(|| format!("{field}: {} is not HOST/VM", shown(s)))?;
    check_host_name(field, h)?;
    check_name(field, v)
}

/// Parses a UTC time: `YYYY-MM-DDTHH:MM[:SS[.fraction]]` followed by `Z` or an offset
/// `+HH:MM`/`-HH:MM` (RFC 3339; a space may stand for the `T`, and without a zone the
/// time is UTC). The date must exist (no February 30th), the year be 1970-9999.
/// Returns Unix seconds.
pub fn parse_utc_time(s: &str) -> Option<i64> {
    let s = s.trim();
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = b.get(r)?;
        if t.is_empty() || !t.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(t).ok()?.parse().ok()
    };
    if b.len() < 16 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    if b[13] != b':' {
        return None;
    }
    let (y, mo, d, hh, mm) = (
        num(0..4)?,
        num(5..7)?,
        num(8..10)?,
        num(11..13)?,
        num(14..16)?,
    );
    let mut i = 16;
    let mut ss = 0;
    if b.get(i) == Some(&b':') {
        ss = num(i + 1..i + 3)?;
        i += 3;
        if b.get(i) == Some(&b'.') {
            i += 1;
            let start = i;
            while b.get(i).is_some_and(u8::is_ascii_digit) {
                i += 1;
            }
            if i == start {
                return None;
            }
        }
    }
    let offset = match &b[i..] {
        [] | [b'Z'] | [b'z'] => 0,
        [sign @ (b'+' | b'-'), ..] if b.len() == i + 6 && b[i + 3] == b':' => {
            let (oh, om) = (num(i + 1..i + 3)?, num(i + 4..i + 6)?);
            if oh > 23 || om > 59 {
                return None;
            }
            let o = oh * 3600 + om * 60;
            if *sign == b'+' { o } else { -o }
        }
        _ => return None,
    };
    if !(1970..=9999).contains(&y) || !(1..=12).contains(&mo) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let days_in_month = match mo {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    if !(1..=days_in_month).contains(&d) {
        return None;
    }
    let days = utc::days_from_civil(y, mo as u32, d as u32);
    Some(days * 86_400 + hh * 3600 + mm * 60 + ss - offset)
}

/// A time field: a real date and time ([`parse_utc_time`]).
pub fn check_time(field: &str, s: &str) -> Result<i64, String> {
    parse_utc_time(s).ok_or_else(|| {
        format!(
            "{field}: {} is not a valid UTC time (RFC 3339, like 2026-11-25T22:00:00Z, with a date that exists)",
            shown(s)
        )
    })
}

/// A folder on a host: absolute, no `..`, no control characters, at most
/// [`MAX_PATH_BYTES`].
pub fn check_folder(field: &str, dir: &str) -> Result<(), String> {
    let why = if dir.len() > MAX_PATH_BYTES {
        format!("is {} bytes long; at most {MAX_PATH_BYTES}", dir.len())
    } else if let Some(c) = dir.chars().find(|&c| hidden_char(c)) {
        format!(
            "holds the control or bidirectional character U+{:04X}",
            c as u32
        )
    } else if !dir.starts_with('/') {
        "is not an absolute path".to_string()
    } else if dir.split('/').any(|c| c == "..") {
        "must not contain '..'".to_string()
    } else {
        return Ok(());
    };
    Err(format!("{field}: {} {why}", shown(dir)))
}

/// A path inside a recovery point's file system: no `.` or `..` components, no control
/// characters, at most [`MAX_PATH_BYTES`].
pub fn check_item_path(field: &str, p: &str) -> Result<(), String> {
    let why = if p.len() > MAX_PATH_BYTES {
        format!("is {} bytes long; at most {MAX_PATH_BYTES}", p.len())
    } else if let Some(c) = p.chars().find(|&c| hidden_char(c)) {
        format!(
            "holds the control or bidirectional character U+{:04X}",
            c as u32
        )
    } else if p.split('/').any(|c| c == "." || c == "..") {
        "must not contain `.` or `..`".to_string()
    } else {
        return Ok(());
    };
    Err(format!("{field}: {} {why}", shown(p)))
}

fn check_members(field: &str, members: &[String]) -> Result<(), String> {
    if members.len() > MAX_MEMBERS {
        return Err(format!(
            "{field}: {} members; at most {MAX_MEMBERS}",
            members.len()
        ));
    }
    for (i, m) in members.iter().enumerate() {
        check_vm_ref(&format!("{field}[{i}]"), m)?;
    }
    Ok(())
}

impl Policy {
    /// [`Policy::validate`], and a replica-creation time that exists; messages start
    /// with `policy.`.
    pub fn validate_request(&self) -> Result<(), String> {
        self.validate().map_err(|e| format!("policy.{e}"))?;
        if let ReplicaCreation::At(t) = &self.replica_creation {
            check_time("policy.replica_creation", t)?;
        }
        Ok(())
    }
}

impl EnrollRequest {
    /// The key's and version's shape (the token is the server's to check).
    pub fn validate(&self) -> Result<(), String> {
        let pem = self.public_key_pem.trim();
        if pem.len() > 16 << 10
            || !pem.starts_with("-----BEGIN PUBLIC KEY-----")
            || !pem.ends_with("-----END PUBLIC KEY-----")
        {
            return Err(
                "public_key_pem: not a PEM public key (-----BEGIN PUBLIC KEY-----, at most 16 KiB)"
                    .into(),
            );
        }
        if self.version.is_empty()
            || self.version.len() > 64
            || !self.version.chars().all(|c| c.is_ascii_graphic())
        {
            return Err(format!(
                "version: {} is not a version (1-64 printable ASCII characters)",
                shown(&self.version)
            ));
        }
        Ok(())
    }
}

impl AgentTokenRequest {
    pub fn validate(&self) -> Result<(), String> {
        check_host_name("host", &self.host)?;
        if self
            .valid_minutes
            .is_some_and(|m| !(1..=7 * 24 * 60).contains(&m))
        {
            return Err(format!(
                "valid_minutes: {} is outside 1-10080 (7 days)",
                self.valid_minutes.unwrap_or(0)
            ));
        }
        Ok(())
    }
}

impl CreateGroup {
    pub fn validate(&self) -> Result<(), String> {
        check_name("name", &self.name)?;
        check_members("members", &self.members)?;
        self.policy.validate_request()
    }
}

impl ModifyGroup {
    pub fn validate(&self) -> Result<(), String> {
        check_members("add_members", &self.add_members)?;
        // Removing needs only the shape: a member named before this grammar existed
        // must stay removable.
        for (i, m) in self.remove_members.iter().enumerate() {
            if split_vm(m).is_none() {
                return Err(format!("remove_members[{i}]: {} is not HOST/VM", shown(m)));
            }
        }
        match &self.policy {
            Some(p) => p.validate_request(),
            None => Ok(()),
        }
    }
}

impl RecoveryRequest {
    /// The request's shape; whether the VM, point and host exist is the server's.
    pub fn validate(&self) -> Result<(), String> {
        check_vm_ref("vm", &self.vm)?;
        if let Some(f) = &self.from
            && f != "disk"
        {
            match f.strip_prefix("online:") {
                Some(name) => check_host_name("from", name)?,
                None => return Err(format!("from: {} is not `disk` or `online:NAME`", shown(f))),
            }
        }
        if let Some(p) = &self.point
            && (p.is_empty()
                || p.len() > 128
                || !p
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || ".-_".contains(c)))
        {
            return Err(format!(
                "point: {} is not a recovery point id or `latest`",
                shown(p)
            ));
        }
        if self.point.is_some() && self.at.is_some() {
            return Err("at: give a recovery point or a time, not both".into());
        }
        if let Some(at) = &self.at {
            check_time("at", at)?;
        }
        match &self.target {
            RecoveryTarget::Original { stop_vm, start } => {
                if *start && !*stop_vm {
                    return Err(
                        "target.start: needs target.stop_vm (start the VM again after stopping it)"
                            .into(),
                    );
                }
            }
            RecoveryTarget::Alternate { host, dir, format } => {
                check_host_name("target.host", host)?;
                check_folder("target.dir", dir)?;
                if let Some(f) = format
                    && DiskFormat::parse(f).is_none()
                {
                    return Err(format!(
                        "target.format: {} is not one of {}",
                        shown(f),
                        DiskFormat::ALL
                            .iter()
                            .map(|f| f.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
            }
            RecoveryTarget::CopyTo {
                host,
                dir,
                partition,
                items,
                ..
            } => {
                check_host_name("target.host", host)?;
                check_folder("target.dir", dir)?;
                if partition.is_some_and(|p| p > 256) {
                    return Err("target.partition: at most 256".into());
                }
                if items.len() > MAX_ITEMS {
                    return Err(format!(
                        "target.items: {} paths; at most {MAX_ITEMS}",
                        items.len()
                    ));
                }
                for (i, p) in items.iter().enumerate() {
                    check_item_path(&format!("target.items[{i}]"), p)?;
                }
            }
        }
        Ok(())
    }
}

impl Inventory {
    /// Takes out the VMs whose name breaks the name grammar (or repeats an earlier
    /// one), so one odd VM does not cost the host the rest of its inventory; returns
    /// each with why.
    pub fn take_invalid(&mut self) -> Vec<(VmInfo, String)> {
        let mut seen = std::collections::HashSet::new();
        let mut bad = Vec::new();
        let mut good = Vec::with_capacity(self.vms.len());
        for v in std::mem::take(&mut self.vms) {
            let why = check_name("name", &v.name).err().or_else(|| {
                (!seen.insert(v.name.clone()))
                    .then(|| format!("name: {} is listed twice", shown(&v.name)))
            });
            match why {
                Some(w) => bad.push((v, w)),
                None => good.push(v),
            }
        }
        self.vms = good;
        bad
    }
}

impl Exclusions {
    /// Checks the shape, and that every range is whole sectors, outside the disk's
    /// partition tables and boot loader (its first [`EXCLUSION_HEAD`] bytes) and,
    /// where the disk's size is known (`sizes`, in the same order), inside the disk and
    /// before its backup GPT (its last [`EXCLUSION_TAIL`] bytes). Messages start with
    /// `exclusions.disks[N]`.
    pub fn validate(&self, sizes: &[u64]) -> Result<(), String> {
        if self.disks.len() > 64 {
            return Err(format!(
                "exclusions.disks: {} disks; at most 64",
                self.disks.len()
            ));
        }
        for (i, d) in self.disks.iter().enumerate() {
            let field = format!("exclusions.disks[{i}]");
            if d.len() > 4096 {
                return Err(format!("{field}: {} ranges; at most 4096", d.len()));
            }
            let mut prev_end = 0u64;
            for &(o, l) in d {
                let end = o
                    .checked_add(l)
                    .ok_or_else(|| format!("{field}: range {o}+{l} overflows"))?;
                if l == 0 || o < prev_end {
                    return Err(format!(
                        "{field}: range {o}+{l} is empty, out of order or overlaps the previous one"
                    ));
                }
                if !o.is_multiple_of(EXCLUSION_ALIGN) || !l.is_multiple_of(EXCLUSION_ALIGN) {
                    return Err(format!(
                        "{field}: range {o}+{l} is not whole {EXCLUSION_ALIGN}-byte sectors (offset and length must be multiples of {EXCLUSION_ALIGN})"
                    ));
                }
                if o < EXCLUSION_HEAD {
                    return Err(format!(
                        "{field}: range {o}+{l} starts inside the disk's first MiB, which holds the partition table and the boot loader"
                    ));
                }
                if let Some(&size) = sizes.get(i) {
                    if end > size {
                        return Err(format!(
                            "{field}: range {o}+{l} ends past the disk's size {size}"
                        ));
                    }
                    if end > size.saturating_sub(EXCLUSION_TAIL) {
                        return Err(format!(
                            "{field}: range {o}+{l} reaches into the disk's last {} KiB, which hold the backup GPT",
                            EXCLUSION_TAIL >> 10
                        ));
                    }
                }
                prev_end = end;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{SyncFrequency, VmDisk};

    #[test]
    fn names_follow_one_grammar() {
        let good = [
            "web01",
            "SQL Server (prod) – 2019",
            "Ünïcødé VM",
            "日本語のサーバー",
            "a.b",
            "...",
            "vm_1-x",
            "with 'quotes' & [brackets]",
        ];
        for n in good {
            assert_eq!(check_name("name", n), Ok(()), "{n:?}");
        }
        let long = "a".repeat(5000);
        let max = "é".repeat(127); // 254 bytes
        assert_eq!(check_name("name", &max), Ok(()));
        let bad: [(&str, &str); 17] = [
            ("", "empty"),
            (".", "`.` and `..`"),
            ("..", "`.` and `..`"),
            ("a/b", "'/'"),
            ("a\\b", "'\\\\'"),
            ("a?b", "'?'"),
            ("a#b", "'#'"),
            ("100%", "'%'"),
            ("new\nline", "U+000A"),
            ("esc\u{1b}[31m", "U+001B"),
            ("nul\0", "U+0000"),
            ("rtl\u{202E}gpj.exe", "U+202E"),
            ("iso\u{2066}x", "U+2066"),
            ("sep\u{2028}x", "U+2028"),
            (" lead", "white space"),
            ("trail ", "white space"),
            (&long, "5000 bytes"),
        ];
        for (n, why) in bad {
            let e = check_name("vms[0].name", n).unwrap_err();
            assert!(e.starts_with("vms[0].name: "), "{e}");
            assert!(e.contains(why), "{n:?}: {e}");
            assert!(e.len() < 300, "the message repeats a long name whole: {e}");
        }
    }

    #[test]
    fn host_names_are_narrower() {
        for h in ["hv01", "hv-01.example.com", "a_b"] {
            assert_eq!(check_host_name("host", h), Ok(()));
        }
        for h in ["..", ".", "hv 01", "hv:01", "hv/01", "", &"h".repeat(129)] {
            let e = check_host_name("host", h).unwrap_err();
            assert!(e.starts_with("host: "), "{e}");
        }
        assert!(check_vm_ref("vm", "hv01/SQL Server (prod) – 2019").is_ok());
        for m in ["hv01/..", "../vm", "hv01", "hv01/a/b", "hv01/a?b"] {
            assert!(
                check_vm_ref("members[0]", m)
                    .unwrap_err()
                    .starts_with("members[0]: ")
            );
        }
    }

    #[test]
    fn times_are_parsed_fully() {
        let t = |s| parse_utc_time(s);
        assert_eq!(t("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(t("2000-02-29T00:00:00Z"), Some(951_782_400));
        assert_eq!(t("2000-02-29 00:00"), Some(951_782_400));
        assert_eq!(t("2000-02-29T01:00:00+01:00"), Some(951_782_400));
        assert_eq!(t("2000-02-28T23:00:00.5-01:00"), Some(951_782_400));
        assert_eq!(
            t("2026-11-25T22:00:00Z"),
            utc::parse("2026-11-25T22:00:00Z")
        );
        for bad in [
            "9999-99-99T99:99:99Z",
            "2026-02-30T00:00:00Z",
            "2100-02-29T00:00:00Z",
            "2026-04-31T00:00:00Z",
            "2026-13-01T00:00:00Z",
            "2026-00-10T00:00:00Z",
            "2026-01-01T24:00:00Z",
            "2026-01-01T23:60:00Z",
            "1969-12-31T23:59:59Z",
            "2026-1-01T00:00:00Z",
            "2026-01-01T00:00:00+2:00",
            "2026-01-01T00:00:00.Z",
            "2026-01-01T00:00:00ZZ",
            "2026-01-01",
            "+2026-01-01T00:00:00Z",
            "tomorrow",
            "",
        ] {
            assert_eq!(t(bad), None, "{bad:?}");
        }
    }

    fn policy() -> Policy {
        Policy::daily_at(5, SyncFrequency::Minutes(15), "20:00")
    }

    #[test]
    fn group_requests() {
        let ok = CreateGroup {
            name: "gold (prod)".into(),
            members: vec!["hv01/SQL Server (prod) – 2019".into()],
            policy: policy(),
        };
        assert_eq!(ok.validate(), Ok(()));
        type Change = Box<dyn Fn(&mut CreateGroup)>;
        let cases: Vec<(Change, &str)> = vec![
            (Box::new(|g| g.name = ".".into()), "name: "),
            (Box::new(|g| g.name = "..".into()), "name: "),
            (Box::new(|g| g.name = "a/b".into()), "name: "),
            (
                Box::new(|g| g.members = vec!["hv01/web".into(), "hv01".into()]),
                "members[1]: ",
            ),
            (
                Box::new(|g| {
                    g.policy.replica_creation = ReplicaCreation::At("9999-99-99T99:99:99Z".into())
                }),
                "policy.replica_creation: ",
            ),
            (
                Box::new(|g| {
                    g.policy.replica_creation = ReplicaCreation::At("2026-02-30T10:00:00Z".into())
                }),
                "policy.replica_creation: ",
            ),
            (
                Box::new(|g| g.policy.retention_days = 0),
                "policy.retention_days: ",
            ),
        ];
        for (change, field) in cases {
            let mut g = ok.clone();
            change(&mut g);
            let e = g.validate().unwrap_err();
            assert!(e.starts_with(field), "{e}");
        }
        let m = ModifyGroup {
            add_members: vec!["x/..".into()],
            ..Default::default()
        };
        assert!(m.validate().unwrap_err().starts_with("add_members[0]: "));
        let mut p = policy();
        p.replica_creation = ReplicaCreation::At("2026-11-25T22:00:00Z".into());
        assert_eq!(p.validate_request(), Ok(()));
    }

    #[test]
    fn recovery_requests() {
        let req = |target| RecoveryRequest {
            vm: "hv01/web".into(),
            point: None,
            at: None,
            target,
            throttle_kbps: None,
            notify: vec![],
            from: None,
        };
        let copy = |dir: &str, items: Vec<String>| RecoveryTarget::CopyTo {
            host: "hv01".into(),
            dir: dir.into(),
            disk: None,
            partition: None,
            items,
        };
        assert_eq!(req(copy("/srv/restore here", vec![])).validate(), Ok(()));
        assert_eq!(
            req(copy("/srv", vec!["/Users/alice/My Documents".into()])).validate(),
            Ok(())
        );
        for (r, field) in [
            (req(copy("/srv/a\nb", vec![])), "target.dir: "),
            (req(copy("srv", vec![])), "target.dir: "),
            (req(copy("/srv/../etc", vec![])), "target.dir: "),
            (
                req(copy("/srv", vec!["/a/../b".into()])),
                "target.items[0]: ",
            ),
            (req(copy("/srv", vec!["/a\rb".into()])), "target.items[0]: "),
            (
                req(RecoveryTarget::Alternate {
                    host: "hv01".into(),
                    dir: "/srv/x\u{202E}".into(),
                    format: None,
                }),
                "target.dir: ",
            ),
            (
                req(RecoveryTarget::Alternate {
                    host: "..".into(),
                    dir: "/srv".into(),
                    format: None,
                }),
                "target.host: ",
            ),
            (
                req(RecoveryTarget::Alternate {
                    host: "hv01".into(),
                    dir: "/srv".into(),
                    format: Some("iso".into()),
                }),
                "target.format: ",
            ),
            (
                RecoveryRequest {
                    at: Some("2026-02-30 10:00".into()),
                    ..req(RecoveryTarget::Original {
                        stop_vm: false,
                        start: false,
                    })
                },
                "at: ",
            ),
            (
                RecoveryRequest {
                    vm: "hv01/..".into(),
                    ..req(RecoveryTarget::Original {
                        stop_vm: false,
                        start: false,
                    })
                },
                "vm: ",
            ),
        ] {
            let e = r.validate().unwrap_err();
            assert!(e.starts_with(field), "{e}");
        }
    }

    #[test]
    fn inventories_lose_only_their_bad_vms() {
        let vm = |n: &str| VmInfo {
            name: n.into(),
            vm_id: None,
            provider: crate::ProviderKind::Files,
            disks: vec![VmDisk {
                name: "d.qcow2".into(),
                format: "qcow2".into(),
                virtual_size: 1 << 20,
            }],
            running: None,
        };
        let mut inv = Inventory {
            vms: vec![
                vm("SQL Server (prod) – 2019"),
                vm(".."),
                vm("a?b"),
                vm("web"),
                vm("web"),
                vm(&"x".repeat(5000)),
            ],
        };
        let bad = inv.take_invalid();
        let names: Vec<&str> = inv.vms.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["SQL Server (prod) – 2019", "web"]);
        assert_eq!(bad.len(), 4);
        assert!(bad[2].1.contains("listed twice"), "{}", bad[2].1);
    }

    #[test]
    fn exclusions_are_whole_sectors_outside_the_tables() {
        const MIB: u64 = 1 << 20;
        let ex = |r: Vec<(u64, u64)>| Exclusions { disks: vec![r] };
        let size = [64 * MIB];
        assert_eq!(
            ex(vec![(MIB, 4096), (2 * MIB, MIB)]).validate(&size),
            Ok(())
        );
        assert_eq!(ex(vec![(MIB, 4096)]).validate(&[]), Ok(()));
        for (r, why) in [
            (vec![(MIB + 1000, 4096)], "sectors"),
            (vec![(MIB, 1000)], "sectors"),
            (vec![(0, 4096)], "first MiB"),
            (vec![(512, 4096)], "first MiB"),
            (vec![(MIB - 512, 4096)], "first MiB"),
            (vec![(63 * MIB, MIB)], "backup GPT"),
            (vec![(64 * MIB, MIB)], "past the disk's size"),
            (vec![(2 * MIB, MIB), (MIB, 512)], "out of order"),
            (vec![(MIB, 0)], "empty"),
            (vec![(u64::MAX - 511, 1024)], "overflows"),
        ] {
            let e = ex(r.clone()).validate(&size).unwrap_err();
            assert!(e.starts_with("exclusions.disks[0]: "), "{e}");
            assert!(e.contains(why), "{r:?}: {e}");
        }
    }
}
