//! The order in which chunk responses leave a node, sans-IO: at most `MAX_SENDING_PER_PEER`
//! responses are written to one peer at a time (its chunks go out one after another, each
//! arriving whole as early as possible, so the receiver relays and announces it sooner),
//! and data responses wait for the operator's upload limit (`crate::ratelimit`). The caller
//! passes the time, writes what this releases, and says when each write is done.

use crate::ratelimit::RateLimiter;
use libp2p::PeerId;
use std::collections::{HashMap, VecDeque};
use std::time::Instant;

/// Chunk responses written to one peer at a time, at most. Interleaving every deferred
/// response on one connection delays each of them to the end of the batch; with a few, a
/// chunk arrives whole soon while the others keep the link busy. Four, not one or two: a
/// yamux stream starts with a 256 KiB window, about 3 MB/s at an 80 ms round trip.
pub const MAX_SENDING_PER_PEER: usize = 4;

/// Queued data responses (`Q`, with their payload bytes) and the writes in progress.
pub struct Uploads<Q> {
    limit: RateLimiter,
    /// Responses of any kind being written to each peer.
    sending: HashMap<PeerId, usize>,
    /// Data responses waiting for a peer's writes in progress to finish.
    per_peer: HashMap<PeerId, VecDeque<(Q, u64)>>,
    /// Data responses waiting for the upload limit, in order.
    limited: VecDeque<(PeerId, Q, u64)>,
}

impl<Q> Uploads<Q> {
    /// Uploads limited to `rate` bytes/s (0: unlimited) from `now`.
    pub fn new(rate: u64, now: Instant) -> Self {
        Uploads {
            limit: RateLimiter::new_at(rate, now),
            sending: HashMap::new(),
            per_peer: HashMap::new(),
            limited: VecDeque::new(),
        }
    }

    pub fn rate(&self) -> u64 {
        self.limit.rate()
    }

    /// A new limit, applied at once to what waits.
    pub fn set_rate(&mut self, rate: u64, now: Instant) {
        self.limit.set_rate_at(rate, now);
    }

    fn in_flight(&self, peer: &PeerId) -> usize {
        self.sending.get(peer).copied().unwrap_or(0)
    }

    /// A data response of `bytes` to `peer`: returned to be written now (its bytes are
    /// charged to the limit), or queued (released later by `done` or `tick`).
    pub fn offer(&mut self, peer: PeerId, q: Q, bytes: u64, now: Instant) -> Option<Q> {
        if self.in_flight(&peer) >= MAX_SENDING_PER_PEER {
            self.per_peer.entry(peer).or_default().push_back((q, bytes));
            return None;
        }
        if !self.limit.available_at(now) {
            self.limited.push_back((peer, q, bytes));
            return None;
        }
        self.limit.consume_at(bytes, now);
        Some(q)
    }

    /// A response (of any kind) to `peer` is being written.
    pub fn started(&mut self, peer: PeerId) {
        *self.sending.entry(peer).or_default() += 1;
    }

    /// A response to `peer` was written (or failed): the data responses queued for it that
    /// may go now, charged, in order (to write, each reported with `started`).
    pub fn done(&mut self, peer: PeerId, now: Instant) -> Vec<Q> {
        if let Some(n) = self.sending.get_mut(&peer) {
            *n = n.saturating_sub(1);
        }
        let mut out = Vec::new();
        while self.in_flight(&peer) + out.len() < MAX_SENDING_PER_PEER {
            let Some(queue) = self.per_peer.get_mut(&peer) else {
                break;
            };
            let Some((q, bytes)) = queue.pop_front() else {
                self.per_peer.remove(&peer);
                break;
            };
            if !self.limit.available_at(now) {
                // Held back by the upload limit: the tick sends it.
                self.limited.push_back((peer, q, bytes));
                break;
            }
            self.limit.consume_at(bytes, now);
            out.push(q);
        }
        out
    }

    /// What the upload limit lets go at `now`, in order, charged (to write, each reported
    /// with `started`); a response whose peer has its writes in progress waits for them.
    pub fn tick(&mut self, now: Instant) -> Vec<(PeerId, Q)> {
        let mut out = Vec::new();
        let mut released: HashMap<PeerId, usize> = HashMap::new();
        while self.limit.available_at(now) {
            let Some((peer, q, bytes)) = self.limited.pop_front() else {
                break;
            };
            let extra = released.get(&peer).copied().unwrap_or(0);
            if self.in_flight(&peer) + extra >= MAX_SENDING_PER_PEER {
                self.per_peer.entry(peer).or_default().push_back((q, bytes));
                continue;
            }
            self.limit.consume_at(bytes, now);
            *released.entry(peer).or_default() += 1;
            out.push((peer, q));
        }
        out
    }

    /// `peer` is gone: what was being written or waited for it is forgotten.
    pub fn closed(&mut self, peer: &PeerId) {
        self.sending.remove(peer);
        self.per_peer.remove(peer);
        self.limited.retain(|(p, ..)| p != peer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_peer_gets_its_responses_a_few_at_a_time_in_order() {
        let t0 = Instant::now();
        let mut u: Uploads<u32> = Uploads::new(0, t0);
        let (a, b) = (PeerId::random(), PeerId::random());
        for i in 0..MAX_SENDING_PER_PEER as u32 {
            assert_eq!(u.offer(a, i, 1000, t0), Some(i));
            u.started(a);
        }
        assert_eq!(u.offer(a, 10, 1000, t0), None);
        assert_eq!(u.offer(a, 11, 1000, t0), None);
        // Another peer is not held up.
        assert_eq!(u.offer(b, 20, 1000, t0), Some(20));
        u.started(b);
        // Each finished write lets one more go, in order.
        assert_eq!(u.done(a, t0), vec![10]);
        u.started(a);
        assert_eq!(u.done(a, t0), vec![11]);
        u.started(a);
        assert!(u.done(a, t0).is_empty());
        // A closed peer's queue is forgotten.
        for i in 30..34 {
            u.offer(b, i, 1, t0);
            u.started(b);
        }
        u.offer(b, 40, 1, t0);
        u.closed(&b);
        assert!(u.done(b, t0).is_empty());
    }

    #[test]
    fn data_waits_for_the_upload_limit_and_leaves_at_its_rate() {
        let t0 = Instant::now();
        // 1 MB/s; the bucket starts empty but may go into debt once.
        let mut u: Uploads<u32> = Uploads::new(1_000_000, t0);
        let (a, b) = (PeerId::random(), PeerId::random());
        assert_eq!(u.offer(a, 1, 500_000, t0), Some(1));
        u.started(a);
        // In debt now: the next waits, whoever it is for.
        assert_eq!(u.offer(b, 2, 500_000, t0), None);
        assert_eq!(u.offer(a, 3, 500_000, t0), None);
        assert!(u.tick(t0 + Duration::from_millis(100)).is_empty());
        // Half a second later the debt is paid: one goes (and its 0.5 MB is the new debt).
        assert_eq!(u.tick(t0 + Duration::from_millis(500)), vec![(b, 2)]);
        assert!(u.tick(t0 + Duration::from_millis(600)).is_empty());
        assert_eq!(u.tick(t0 + Duration::from_millis(1000)), vec![(a, 3)]);
        // Unlimited from now on: all at once.
        u.set_rate(0, t0 + Duration::from_millis(1000));
        assert_eq!(u.offer(b, 4, 500_000, t0), Some(4));
    }
}
