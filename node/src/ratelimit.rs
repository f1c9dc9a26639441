//! A token bucket for the operator's upload and download limits (set live from the RMC).
//! Transfers are whole chunks, so the bucket may go into debt; the next transfer waits until
//! the debt is paid. That keeps the average rate exact without splitting chunks.

use std::time::Instant;

#[derive(Debug)]
pub struct RateLimiter {
    /// Bytes per second; 0 = unlimited.
    rate: u64,
    tokens: f64,
    last: Instant,
}

impl RateLimiter {
    pub fn new(rate: u64) -> Self {
        RateLimiter {
            rate,
            tokens: 0.0,
            last: Instant::now(),
        }
    }

    pub fn rate(&self) -> u64 {
        self.rate
    }

    pub fn set_rate(&mut self, rate: u64) {
        self.refill(Instant::now());
        self.rate = rate;
        self.tokens = self.tokens.min(self.burst());
    }

    fn burst(&self) -> f64 {
        // A tenth of a second of traffic: smooth enough, small enough to follow changes.
        (self.rate as f64 / 10.0).max(64.0 * 1024.0)
    }

    fn refill(&mut self, now: Instant) {
        if self.rate > 0 {
            let dt = now.duration_since(self.last).as_secs_f64();
            self.tokens = (self.tokens + dt * self.rate as f64).min(self.burst());
        }
        self.last = now;
    }

    /// True if a transfer may start now.
    pub fn available(&mut self) -> bool {
        if self.rate == 0 {
            return true;
        }
        self.refill(Instant::now());
        self.tokens >= 0.0
    }

    /// Charges `bytes` (may leave the bucket in debt).
    pub fn consume(&mut self, bytes: u64) {
        if self.rate == 0 {
            return;
        }
        self.refill(Instant::now());
        self.tokens -= bytes as f64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn unlimited_is_always_available() {
        let mut r = RateLimiter::new(0);
        r.consume(1 << 30);
        assert!(r.available());
    }

    #[test]
    fn debt_blocks_until_paid() {
        let mut r = RateLimiter::new(1_000_000);
        r.consume(200_000);
        assert!(!r.available());
        std::thread::sleep(Duration::from_millis(250));
        assert!(r.available());
    }
}
