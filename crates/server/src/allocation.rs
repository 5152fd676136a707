//! The disk allocation review (MABS's "review disk storage allocation" page): how much
//! space a protection group's policy needs against what the datastore has.
//!
//! Formula, as MABS documents it: required = S + S x C x R, where S is the members'
//! data size (sum of virtual disk sizes), C the daily churn (policy `churn_percent`,
//! default 5%) and R the retention range in days. It overestimates: zero blocks,
//! deduplication and compression usually make the real need much smaller.

use crate::state::AppState;
use protocol::{AllocationReview, Policy};

/// Free and total bytes of the file system holding `path`.
pub fn fs_space(path: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `s` a writable statvfs.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return None;
    }
    let frsize = s.f_frsize as u64;
    Some((
        (s.f_bavail as u64).saturating_mul(frsize),
        (s.f_blocks as u64).saturating_mul(frsize),
    ))
}

/// The space `policy` needs for `size` bytes of members.
pub fn required(size: u64, policy: &Policy) -> u64 {
    let churn = size as f64 * policy.churn_percent / 100.0 * policy.retention_days as f64;
    size.saturating_add(churn.min(u64::MAX as f64 / 2.0) as u64)
}

/// On object storage (`st.datastore_url`) there is no file system to measure: object
/// storage has no fixed capacity, so the figures are 0 and every policy fits.
pub fn review(st: &AppState, size: u64, policy: &Policy) -> AllocationReview {
    let required = required(size, policy);
    if st.datastore_url.is_some() {
        return AllocationReview {
            data_size: size,
            required,
            datastore_free: 0,
            datastore_total: 0,
            fits: true,
        };
    }
    let (free, total) = fs_space(&st.datastore_dir).unwrap_or((0, 0));
    AllocationReview {
        data_size: size,
        required,
        datastore_free: free,
        datastore_total: total,
        fits: required <= free,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::SyncFrequency;

    #[test]
    fn formula() {
        let p = Policy::daily_at(10, SyncFrequency::Minutes(60), "20:00");
        // 100 GiB, 5% a day for 10 days: 100 + 50 GiB.
        assert_eq!(required(100 << 30, &p), 150 << 30);
        assert!(fs_space(std::path::Path::new("/")).is_some_and(|(f, t)| t >= f && t > 0));
    }
}
