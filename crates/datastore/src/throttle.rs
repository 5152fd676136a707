//! Pacing by bandwidth: a token bucket over bytes per second, used by the agent's
//! recoveries (fetches) and reads, and by copies between datastores (uploads).

use locks::lock;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// A token bucket over bytes per second, at a fixed rate or one that follows a
/// work-hours schedule (looked up at each take); waits are cut short by `cancel`.
#[derive(Debug)]
pub struct Throttle {
    rate: Rate,
    /// Tokens (may go negative: a debt paid by waiting) and when last refilled.
    state: Mutex<(f64, Instant)>,
}

#[derive(Debug)]
enum Rate {
    Fixed(f64),
    Schedule(protocol::ThrottleSchedule),
}

impl Throttle {
    /// `kbps` KiB per second (0 = none).
    pub fn new(kbps: u64) -> Option<Throttle> {
        (kbps > 0).then(|| Throttle {
            rate: Rate::Fixed(kbps as f64 * 1024.0),
            state: Mutex::new((0.0, Instant::now())),
        })
    }

    /// The plan's limit: its fixed rate, else its schedule, else none.
    pub fn for_plan(
        kbps: Option<u64>,
        schedule: Option<&protocol::ThrottleSchedule>,
    ) -> Option<Throttle> {
        match (kbps.and_then(Throttle::new), schedule) {
            (Some(t), _) => Some(t),
            (None, Some(s)) => Some(Throttle {
                rate: Rate::Schedule(s.clone()),
                state: Mutex::new((0.0, Instant::now())),
            }),
            (None, None) => None,
        }
    }

    /// Bytes per second now, `None` for no limit.
    fn rate_now(&self) -> Option<f64> {
        match &self.rate {
            Rate::Fixed(r) => Some(*r),
            Rate::Schedule(s) => s.kbps_at(utc::now()).map(|k| k as f64 * 1024.0),
        }
    }

    /// Takes `n` bytes' worth of tokens, waiting until they are earned.
    pub fn take(&self, n: u64, cancel: &AtomicBool) {
        let wait = {
            let mut s = lock(&self.state);
            let now = Instant::now();
            let Some(rate) = self.rate_now() else {
                // Unlimited for now: no debt carried into a limited period.
                *s = (0.0, now);
                return;
            };
            // A burst of at most a quarter second.
            let burst = rate / 4.0;
            s.0 = (s.0 + now.duration_since(s.1).as_secs_f64() * rate).min(burst);
            s.1 = now;
            s.0 -= n as f64;
            if s.0 < 0.0 { -s.0 / rate } else { 0.0 }
        };
        let end = Instant::now() + Duration::from_secs_f64(wait.min(3600.0));
        while !cancel.load(Ordering::Relaxed) {
            let now = Instant::now();
            if now >= end {
                break;
            }
            std::thread::sleep((end - now).min(Duration::from_millis(50)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_paces_bytes() {
        let t = Throttle::new(1024).unwrap();
        let cancel = AtomicBool::new(false);
        let start = Instant::now();
        for _ in 0..4 {
            t.take(128 * 1024, &cancel);
        }
        // 512 KiB at 1 MiB/s: about half a second.
        assert!(start.elapsed() >= Duration::from_millis(400));
        assert!(Throttle::new(0).is_none());
    }

    #[test]
    fn scheduled_throttle_follows_the_clock() {
        // Work hours all week, all day: the work rate always applies.
        let always = protocol::ThrottleSchedule {
            work_kbps: 1024,
            other_kbps: 0,
            work_days: (1..=7).collect(),
            work_start: "00:00".into(),
            work_end: "00:00".into(),
        };
        // start == end is an empty window (never work hours): unlimited now.
        let t = Throttle::for_plan(None, Some(&always)).unwrap();
        let cancel = AtomicBool::new(false);
        let start = Instant::now();
        for _ in 0..4 {
            t.take(1 << 20, &cancel);
        }
        assert!(start.elapsed() < Duration::from_millis(200));
        let busy = protocol::ThrottleSchedule {
            other_kbps: 1024,
            ..always.clone()
        };
        let t = Throttle::for_plan(None, Some(&busy)).unwrap();
        let start = Instant::now();
        for _ in 0..4 {
            t.take(128 * 1024, &cancel);
        }
        assert!(start.elapsed() >= Duration::from_millis(400));
        // A fixed rate wins over the schedule; neither means no throttle.
        assert!(matches!(
            Throttle::for_plan(Some(10), Some(&busy)).unwrap().rate,
            Rate::Fixed(_)
        ));
        assert!(Throttle::for_plan(None, None).is_none());
    }
}
