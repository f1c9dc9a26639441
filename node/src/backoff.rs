//! Capped exponential backoff with jitter, as a pure policy: the caller supplies the clock
//! and the random draw, so the schedule is deterministic in tests. The engine uses it to
//! redial the GIS; what a redial does is the engine's business.

use std::time::{Duration, Instant};

/// When to try again after failures: `base`, doubling per failure up to `cap`, each delay
/// drawn in its upper half ("equal jitter"), so many hosts that lost the same server spread
/// their attempts instead of arriving in the same instant, yet none waits longer than `cap`.
#[derive(Clone, Debug)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    failures: u32,
    next: Option<Instant>,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Backoff {
            base,
            cap: cap.max(base),
            failures: 0,
            next: None,
        }
    }

    /// The delay before the attempt that follows `failures` failed ones, for a random draw
    /// `unit` in [0, 1): in [d/2, d] with d = min(cap, base × 2^(failures - 1)).
    pub fn delay(&self, failures: u32, unit: f64) -> Duration {
        let doublings = failures.saturating_sub(1).min(20);
        let full = self.base.saturating_mul(1 << doublings).min(self.cap);
        let unit = if unit.is_finite() {
            unit.clamp(0.0, 1.0)
        } else {
            0.0
        };
        full / 2 + full.mul_f64(0.5 * unit)
    }

    /// Records a failed attempt at `now`; returns the delay until the next one.
    pub fn failed(&mut self, now: Instant, unit: f64) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let d = self.delay(self.failures, unit);
        self.next = Some(now + d);
        d
    }

    /// Success: the next failure starts again from `base`, and nothing is scheduled.
    pub fn reset(&mut self) {
        self.failures = 0;
        self.next = None;
    }

    /// Failed attempts since the last success.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Whether the scheduled attempt is due (an attempt with nothing scheduled is due at once).
    pub fn due(&self, now: Instant) -> bool {
        self.next.is_none_or(|t| now >= t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn b() -> Backoff {
        Backoff::new(250 * MS, 2500 * MS)
    }

    #[test]
    fn doubles_up_to_the_cap() {
        let b = b();
        let top: Vec<u64> = (1..=7)
            .map(|n| b.delay(n, 1.0).as_millis() as u64)
            .collect();
        assert_eq!(top, [250, 500, 1000, 2000, 2500, 2500, 2500]);
        // Never more than the cap, however many failures.
        assert_eq!(b.delay(u32::MAX, 1.0), 2500 * MS);
    }

    #[test]
    fn jitter_spreads_within_the_upper_half() {
        let b = b();
        assert_eq!(b.delay(6, 0.0), 1250 * MS);
        assert_eq!(b.delay(6, 0.5), 1875 * MS);
        // Out-of-range draws are clamped, not trusted.
        assert_eq!(b.delay(6, 7.0), 2500 * MS);
        assert_eq!(b.delay(6, -1.0), 1250 * MS);
        assert_eq!(b.delay(6, f64::NAN), 1250 * MS);
        // Different draws give different instants: hosts do not all come back together.
        let distinct: std::collections::BTreeSet<Duration> =
            (0..10).map(|i| b.delay(6, i as f64 / 10.0)).collect();
        assert_eq!(distinct.len(), 10);
    }

    #[test]
    fn schedules_and_resets() {
        let mut b = b();
        let t0 = Instant::now();
        assert!(b.due(t0), "nothing scheduled: due at once");
        let d = b.failed(t0, 0.0);
        assert_eq!(d, 125 * MS);
        assert!(!b.due(t0 + 100 * MS));
        assert!(b.due(t0 + 125 * MS));
        for _ in 0..10 {
            b.failed(t0, 0.9);
        }
        assert_eq!(b.failures(), 11);
        assert!(b.due(t0 + 2500 * MS), "the cap bounds the wait");
        b.reset();
        assert_eq!(b.failures(), 0);
        assert!(b.due(t0));
        assert_eq!(b.failed(t0, 1.0), 250 * MS);
    }
}
