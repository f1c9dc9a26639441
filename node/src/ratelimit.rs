//! Token buckets for the operator's upload and download limits (set live from the RMC).
//! Transfers are whole chunks, so a bucket may go into debt; the next transfer waits until
//! the debt is paid. That keeps the average rate exact without splitting chunks.
//!
//! Downloads are charged when a chunk request is *sent* ([`DownloadBudget`]), not when its
//! answer arrives: charging on arrival let a whole pipeline of requests (a window of chunks)
//! through before the limit bit. Which chunk to ask and when is the engine's business; the
//! clock is passed in, so the arithmetic is tested without waiting.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::Instant;

#[derive(Debug)]
pub struct RateLimiter {
    /// Bytes per second; 0 = unlimited.
    rate: u64,
    tokens: f64,
    last: Instant,
}

impl RateLimiter {
    /// A bucket that starts empty at `now`: a fresh limit grants no burst up front.
    pub fn new_at(rate: u64, now: Instant) -> Self {
        RateLimiter {
            rate,
            tokens: 0.0,
            last: now,
        }
    }

    pub fn rate(&self) -> u64 {
        self.rate
    }

    pub fn set_rate_at(&mut self, rate: u64, now: Instant) {
        self.refill(now);
        self.rate = rate;
        self.tokens = self.tokens.min(self.burst());
    }

    fn burst(&self) -> f64 {
        // A tenth of a second of traffic: smooth enough, small enough to follow changes.
        (self.rate as f64 / 10.0).max(64.0 * 1024.0)
    }

    fn refill(&mut self, now: Instant) {
        if self.rate > 0 {
            let dt = now.saturating_duration_since(self.last).as_secs_f64();
            self.tokens = (self.tokens + dt * self.rate as f64).min(self.burst());
        }
        self.last = self.last.max(now);
    }

    /// True if a transfer may start at `now`.
    pub fn available_at(&mut self, now: Instant) -> bool {
        if self.rate == 0 {
            return true;
        }
        self.refill(now);
        self.tokens >= 0.0
    }

    /// Charges `bytes` (may leave the bucket in debt).
    pub fn consume_at(&mut self, bytes: u64, now: Instant) {
        self.settle_at(0, bytes, now);
    }

    /// Drops saved-up credit (keeps any debt).
    pub fn drain_at(&mut self, now: Instant) {
        self.refill(now);
        self.tokens = self.tokens.min(0.0);
    }

    /// A transfer charged `charged` bytes up front really moved `actual`: gives back the
    /// difference (never beyond the burst) or charges the excess.
    pub fn settle_at(&mut self, charged: u64, actual: u64, now: Instant) {
        if self.rate == 0 {
            return;
        }
        self.refill(now);
        self.tokens = (self.tokens + charged as f64 - actual as f64).min(self.burst());
    }
}

/// The download limit as the request pump uses it: a request may leave only while the bucket
/// is out of debt, and leaving charges its expected size (the raw chunk); the answer settles
/// the charge by what really arrived (a compressed payload, nothing for a refusal or a
/// failure). So at most one chunk beyond the bucket's burst is ever asked for ahead of the
/// limit, whatever the pipeline depth. `K` names a request (the engine's request id).
#[derive(Debug)]
pub struct DownloadBudget<K> {
    bucket: RateLimiter,
    /// What each unanswered request was charged.
    charged: HashMap<K, u64>,
}

impl<K: Eq + Hash> DownloadBudget<K> {
    pub fn new(rate: u64, now: Instant) -> Self {
        DownloadBudget {
            bucket: RateLimiter::new_at(rate, now),
            charged: HashMap::new(),
        }
    }

    /// Bytes per second; 0 = unlimited.
    pub fn rate(&self) -> u64 {
        self.bucket.rate()
    }

    pub fn set_rate(&mut self, rate: u64, now: Instant) {
        self.bucket.set_rate_at(rate, now);
    }

    /// A download starts while none ran: credit saved up while idle is dropped, so the
    /// limit holds from its first request (the burst only smooths a running download).
    pub fn start_fresh(&mut self, now: Instant) {
        self.bucket.drain_at(now);
    }

    /// May one more request go out now?
    pub fn may_send(&mut self, now: Instant) -> bool {
        self.bucket.available_at(now)
    }

    /// A request expecting `expected` bytes went out: charge it now. Unlimited requests are
    /// not recorded (their answers, should a limit be set meanwhile, are charged in full).
    pub fn sent(&mut self, key: K, expected: u64, now: Instant) {
        if self.bucket.rate() == 0 {
            return;
        }
        self.bucket.consume_at(expected, now);
        self.charged.insert(key, expected);
    }

    /// The request's answer brought `actual` payload bytes (0 for a refusal, a time-out or a
    /// closed connection): settle its charge.
    pub fn answered(&mut self, key: &K, actual: u64, now: Instant) {
        let charged = self.charged.remove(key).unwrap_or(0);
        self.bucket.settle_at(charged, actual, now);
    }

    /// Bytes charged for requests not answered yet.
    pub fn outstanding(&self) -> u64 {
        self.charged.values().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::time::Duration;

    #[test]
    fn unlimited_is_always_available() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new_at(0, t0);
        r.consume_at(1 << 30, t0);
        assert!(r.available_at(t0));
    }

    #[test]
    fn debt_blocks_until_paid() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new_at(1_000_000, t0);
        r.consume_at(200_000, t0);
        assert!(!r.available_at(t0 + Duration::from_millis(150)));
        assert!(r.available_at(t0 + Duration::from_millis(201)));
    }

    #[test]
    fn settling_refunds_what_did_not_arrive_up_to_the_burst() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new_at(1_000_000, t0);
        r.consume_at(300_000, t0);
        // The answer was compressed to a third: two thirds come back.
        r.settle_at(300_000, 100_000, t0);
        assert!(!r.available_at(t0 + Duration::from_millis(99)));
        assert!(r.available_at(t0 + Duration::from_millis(101)));
        // A refund never lifts the bucket beyond its burst (a tenth of a second here).
        let mut r = RateLimiter::new_at(1_000_000, t0);
        r.settle_at(10_000_000, 0, t0);
        r.consume_at(100_001, t0);
        assert!(!r.available_at(t0));
    }

    /// A request pump like the engine's, on a virtual clock: up to `window` requests in
    /// flight, each answered `latency` after it left with `payload(n)` bytes (0 = refused);
    /// a request leaves only while the budget allows. Returns (ms, bytes received by then)
    /// at every millisecond.
    fn pump(
        limit: u64,
        chunk: u64,
        window: usize,
        latency: Duration,
        secs: u64,
        payload: impl Fn(u64) -> u64,
    ) -> Vec<(u64, u64)> {
        // The limit was set a while before the download started: idle time saved credit.
        let set_at = Instant::now();
        let t0 = set_at + Duration::from_secs(2);
        let mut budget: DownloadBudget<u64> = DownloadBudget::new(limit, set_at);
        assert!(budget.may_send(t0));
        budget.start_fresh(t0);
        let mut inflight: VecDeque<(Instant, u64)> = VecDeque::new();
        let (mut next_id, mut received) = (0u64, 0u64);
        let mut out = Vec::new();
        for ms in 0..=secs * 1000 {
            let now = t0 + Duration::from_millis(ms);
            while inflight.front().is_some_and(|(due, _)| *due <= now) {
                if let Some((_, id)) = inflight.pop_front() {
                    let got = payload(id);
                    received += got;
                    budget.answered(&id, got, now);
                }
            }
            while inflight.len() < window && budget.may_send(now) {
                budget.sent(next_id, chunk, now);
                inflight.push_back((now + latency, next_id));
                next_id += 1;
            }
            assert!(
                budget.outstanding() <= window as u64 * chunk,
                "charges are settled as answers arrive"
            );
            out.push((ms, received));
        }
        out
    }

    fn at(timeline: &[(u64, u64)], ms: u64) -> u64 {
        timeline
            .iter()
            .find(|(t, _)| *t == ms)
            .map(|(_, b)| *b)
            .unwrap_or(0)
    }

    #[test]
    fn a_full_window_does_not_get_ahead_of_the_limit() {
        let (limit, chunk) = (3_000_000u64, 256 * 1024u64);
        // Eight requests in flight (2 MiB), answered at once: charging on arrival would let
        // all of them through in the first milliseconds.
        let t = pump(limit, chunk, 8, Duration::from_millis(2), 5, |_| chunk);
        let first = at(&t, 1000);
        assert!(
            first <= limit + chunk,
            "{first} bytes in the first second, limit {limit} B/s"
        );
        let rate = (at(&t, 5000) - at(&t, 1000)) as f64 / 4.0;
        let ratio = rate / limit as f64;
        eprintln!("full window: first second {first} B (limit {limit} B/s), then {ratio:.3} x");
        assert!(
            (0.8..=1.2).contains(&ratio),
            "throughput {ratio:.3} x the limit"
        );
    }

    #[test]
    fn compressed_and_refused_answers_are_settled_by_what_arrived() {
        let (limit, chunk) = (2_000_000u64, 1024 * 1024u64);
        // Every answer a third of the chunk (compressed), every fourth one refused.
        let t = pump(limit, chunk, 16, Duration::from_millis(30), 6, |id| {
            if id % 4 == 3 {
                0
            } else {
                chunk / 3
            }
        });
        let first = at(&t, 1000);
        assert!(first <= limit + chunk, "{first} bytes in the first second");
        let rate = (at(&t, 6000) - at(&t, 1000)) as f64 / 5.0;
        let ratio = rate / limit as f64;
        eprintln!(
            "compressed/refused: first second {first} B (limit {limit} B/s), then {ratio:.3} x"
        );
        assert!(
            (0.8..=1.2).contains(&ratio),
            "throughput {ratio:.3} x the limit"
        );
    }

    #[test]
    fn a_fresh_start_drops_saved_credit_but_keeps_debt() {
        let t0 = Instant::now();
        let mut b: DownloadBudget<u32> = DownloadBudget::new(1_000_000, t0);
        // A second idle: a burst (0.1 s worth) saved up, enough for one more request.
        let t1 = t0 + Duration::from_secs(1);
        b.sent(1, 100_000, t1);
        assert!(b.may_send(t1));
        b.answered(&1, 100_000, t1);
        b.start_fresh(t1);
        b.sent(2, 100_000, t1);
        assert!(!b.may_send(t1), "no saved credit after a fresh start");
        // Debt survives a fresh start.
        b.start_fresh(t1);
        assert!(!b.may_send(t1 + Duration::from_millis(99)));
        assert!(b.may_send(t1 + Duration::from_millis(101)));
    }

    #[test]
    fn lifting_and_setting_the_limit_live() {
        let t0 = Instant::now();
        let mut b: DownloadBudget<u32> = DownloadBudget::new(0, t0);
        // Unlimited: anything goes, nothing is recorded.
        for k in 0..100 {
            assert!(b.may_send(t0));
            b.sent(k, 1 << 20, t0);
        }
        assert_eq!(b.outstanding(), 0);
        // A limit set while those are in flight: their answers are charged in full.
        b.set_rate(1_000_000, t0);
        b.answered(&0, 1 << 20, t0);
        assert!(!b.may_send(t0 + Duration::from_millis(900)));
        assert!(b.may_send(t0 + Duration::from_millis(1100)));
        // A failed request gives its charge back.
        let t1 = t0 + Duration::from_millis(1100);
        b.sent(500, 400_000, t1);
        assert!(!b.may_send(t1));
        b.answered(&500, 0, t1);
        assert!(b.may_send(t1));
        assert_eq!(b.outstanding(), 0);
    }
}
