//! Changed-range lists: what hypervisor change tracking reports, as a file.
//!
//! Format (docs/datastore-format.md): one `OFFSET LENGTH` pair per line, in bytes
//! (decimal or `0x` hex), sector (512-byte) aligned, in any order, not overlapping.
//! Blank lines and `#` comments are ignored. For several disks, a line `disk N` starts
//! the list of disk N (0-based, in the order the disks are given); pairs before any
//! `disk` line belong to disk 0.

use crate::error::{Error, Result};

/// Per disk (index = disk number), sorted merged ranges; a disk without a section gets
/// an empty list (nothing changed). `sizes` are the disks' virtual sizes: a range past
/// the end is refused with its line.
pub fn parse(name: &str, text: &str, sizes: &[u64]) -> Result<Vec<Vec<(u64, u64)>>> {
    let disks = sizes.len();
    let mut out: Vec<Vec<(u64, u64, usize)>> = vec![Vec::new(); disks];
    let mut cur = 0usize;
    let bad = |line: usize, what: String| Error::Invalid(format!("{name}:{line}: {what}"));
    for (n, raw) in text.lines().enumerate() {
        let line = n + 1;
        let l = raw.split('#').next().unwrap_or("").trim();
        if l.is_empty() {
            continue;
        }
        let mut f = l.split_whitespace();
        let a = f.next().unwrap_or("");
        let b = f.next().ok_or_else(|| {
            bad(
                line,
                format!("expected `OFFSET LENGTH` or `disk N`, got {l:?}"),
            )
        })?;
        if f.next().is_some() {
            return Err(bad(line, format!("too many fields in {l:?}")));
        }
        if a == "disk" {
            cur = b
                .parse()
                .map_err(|_| bad(line, format!("bad disk number {b:?}")))?;
            if cur >= disks {
                return Err(bad(
                    line,
                    format!("disk {cur} given, but only {disks} disk(s) are backed up"),
                ));
            }
            continue;
        }
        let off = number(a).ok_or_else(|| bad(line, format!("bad offset {a:?}")))?;
        let len = number(b).ok_or_else(|| bad(line, format!("bad length {b:?}")))?;
        if len == 0 {
            return Err(bad(line, "length is 0".into()));
        }
        if off % 512 != 0 || len % 512 != 0 {
            return Err(bad(
                line,
                format!("range {off}+{len} is not aligned to 512-byte sectors"),
            ));
        }
        match off.checked_add(len) {
            None => return Err(bad(line, format!("range {off}+{len} overflows"))),
            Some(end) if end > sizes[cur] => {
                return Err(bad(
                    line,
                    format!(
                        "range {off}+{len} ends past the end of disk {cur} ({} bytes)",
                        sizes[cur]
                    ),
                ));
            }
            Some(_) => {}
        }
        out[cur].push((off, len, line));
    }
    out.into_iter()
        .map(|mut v| {
            v.sort_unstable();
            let mut merged: Vec<(u64, u64)> = Vec::with_capacity(v.len());
            let mut prev: Option<(u64, usize)> = None;
            for (off, len, line) in v {
                if let Some((end, pl)) = prev
                    && off < end
                {
                    return Err(bad(
                        line,
                        format!("range {off}+{len} overlaps the range on line {pl}"),
                    ));
                }
                match merged.last_mut() {
                    Some(m) if m.0 + m.1 == off => m.1 += len,
                    _ => merged.push((off, len)),
                }
                prev = Some((off + len, line));
            }
            Ok(merged)
        })
        .collect()
}

fn number(s: &str) -> Option<u64> {
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

/// Answers "does `[start, end)` meet a range?" for queries that never move backwards.
#[derive(Debug)]
pub struct RangeCursor<'a> {
    ranges: &'a [(u64, u64)],
    i: usize,
}

impl<'a> RangeCursor<'a> {
    pub fn new(ranges: &'a [(u64, u64)]) -> Self {
        RangeCursor { ranges, i: 0 }
    }

    pub fn intersects(&mut self, start: u64, end: u64) -> bool {
        while let Some(&(o, l)) = self.ranges.get(self.i) {
            if o + l <= start {
                self.i += 1;
            } else {
                return o < end;
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sections_sorts_and_merges() {
        let t = "# from RCT\n1024 512\n0 1024\ndisk 1\n0x200 0x200\n";
        let r = parse("f", t, &[1 << 20, 1 << 20]).unwrap();
        assert_eq!(r, vec![vec![(0, 1536)], vec![(512, 512)]]);
        assert_eq!(
            parse("f", "", &[512]).unwrap(),
            vec![Vec::<(u64, u64)>::new()]
        );
    }

    #[test]
    fn rejects_bad_lines_by_line_number() {
        for (t, want) in [
            (
                "0 1024\n512 512\n",
                "f:2: range 512+512 overlaps the range on line 1",
            ),
            ("100 512\n", "f:1: range 100+512 is not aligned"),
            ("0 0\n", "f:1: length is 0"),
            ("x 512\n", "f:1: bad offset"),
            ("0\n", "f:1: expected"),
            ("disk 3\n", "f:1: disk 3 given"),
            ("18446744073709551104 1024\n", "overflows"),
            (
                "1024 1024\n",
                "f:1: range 1024+1024 ends past the end of disk 0 (1536 bytes)",
            ),
        ] {
            let e = parse("f", t, &[1536]).unwrap_err().to_string();
            assert!(e.contains(want), "{t:?}: {e}");
        }
    }

    #[test]
    fn cursor() {
        let r = [(10, 5), (100, 10)];
        let mut c = RangeCursor::new(&r);
        assert!(!c.intersects(0, 10));
        assert!(c.intersects(0, 11));
        assert!(c.intersects(14, 20));
        assert!(!c.intersects(15, 100));
        assert!(c.intersects(109, 200));
        assert!(!c.intersects(110, 200));
    }
}
