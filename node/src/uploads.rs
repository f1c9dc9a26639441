//! The order in which chunk responses leave a node, sans-IO: at most `MAX_SENDING_PER_PEER`
//! responses are written to one peer at a time (its chunks go out one after another, each
//! arriving whole as early as possible, so the receiver relays and announces it sooner),
//! a BIDS bridgehead writes at most [`WAN_SENDING`] to other IDCs at a time, and data
//! responses wait for the operator's upload limit (`crate::ratelimit`). The caller
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

/// Data responses a BIDS bridgehead writes to other IDCs at a time, over all of them. A
/// bridgehead's chunks are wanted by many fetching IDCs; written all at once they share its
/// uplink evenly, each arrives late, and the IDCs that could pass a chunk on have nothing to
/// pass for a long time. A few at a time, each chunk reaches its first takers soon and they
/// serve the others. `bids sim`, 30 IDCs of 2 hosts, 1 GiB in 4 MiB chunks, seeds 1-3: last
/// host 1.76-1.88 x S/B_wan with no limit; 1.28-1.31 with 4 (and the limits below); 1.37-1.40
/// with 3 or 6 (sim/RESULTS.md).
pub const WAN_SENDING: usize = 4;
/// WAN data responses waiting for one of the [`WAN_SENDING`] writes, at most: a WAN request
/// beyond is answered "not held here" for now ([`Uploads::wan_full`]), so its asker takes
/// the chunk from another IDC that holds it. In the runs above, without the download's limit
/// of requests to fetching bridgeheads: no waiting room, 1.42 (the uplink idles between
/// writes); room for 4, 1.35-1.40. With that limit: room for 12, 1.49 (askers wait in the
/// queue while other IDCs hold their chunk). Queued without a bound: 2.2-2.3 at 256 MiB, as
/// with no limit at all.
pub const WAN_WAITING: usize = 4;

/// Which limits a data response is subject to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lane {
    /// The per-peer limit and the operator's upload rate.
    Open,
    /// Those and [`WAN_SENDING`]: a BIDS bridgehead's responses to other IDCs.
    Wan,
}

/// Data responses waiting (`Q`, with their payload bytes), the writes in progress, and the
/// limits that release them: per peer, over the WAN lane, and the operator's upload rate.
pub struct Uploads<Q> {
    limit: RateLimiter,
    /// Responses of any kind being written to each peer, and its lane.
    sending: HashMap<PeerId, (usize, Lane)>,
    /// Of those, the ones in the WAN lane.
    wan_sending: usize,
    /// Data responses waiting, in the order they were offered.
    waiting: VecDeque<(PeerId, Lane, Q, u64)>,
    /// Of those, the ones in the WAN lane.
    wan_waiting: usize,
}

impl<Q> Uploads<Q> {
    /// Uploads limited to `rate` bytes/s (0: unlimited) from `now`.
    pub fn new(rate: u64, now: Instant) -> Self {
        Uploads {
            limit: RateLimiter::new_at(rate, now),
            sending: HashMap::new(),
            wan_sending: 0,
            waiting: VecDeque::new(),
            wan_waiting: 0,
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
        self.sending.get(peer).map_or(0, |s| s.0)
    }

    /// The WAN lane's writes and its waiting room are full: a new WAN request should go to
    /// another holder.
    pub fn wan_full(&self) -> bool {
        self.wan_sending + self.wan_waiting >= WAN_SENDING + WAN_WAITING
    }

    /// Whether a response to `peer` in `lane` may start, with `extra` more released to that
    /// peer (and `extra_wan` to the WAN lane) in this pass.
    fn may_go(&self, peer: &PeerId, lane: Lane, extra: usize, extra_wan: usize) -> bool {
        self.in_flight(peer) + extra < MAX_SENDING_PER_PEER
            && (lane == Lane::Open || self.wan_sending + extra_wan < WAN_SENDING)
    }

    /// A data response of `bytes` to `peer`: returned to be written now (its bytes are
    /// charged to the limit), or queued (released later by `done` or `tick`).
    pub fn offer(&mut self, peer: PeerId, lane: Lane, q: Q, bytes: u64, now: Instant) -> Option<Q> {
        if !self.may_go(&peer, lane, 0, 0) || !self.limit.available_at(now) {
            if lane == Lane::Wan {
                self.wan_waiting += 1;
            }
            self.waiting.push_back((peer, lane, q, bytes));
            return None;
        }
        self.limit.consume_at(bytes, now);
        Some(q)
    }

    /// A response (of any kind) to `peer` in `lane` is being written.
    pub fn started(&mut self, peer: PeerId, lane: Lane) {
        let s = self.sending.entry(peer).or_insert((0, lane));
        s.0 += 1;
        if s.1 == Lane::Wan {
            self.wan_sending += 1;
        }
    }

    /// A response to `peer` was written (or failed): the data responses that may go now,
    /// charged, in order (to write, each reported with `started`).
    pub fn done(&mut self, peer: PeerId, now: Instant) -> Vec<(PeerId, Q)> {
        if let Some(s) = self.sending.get_mut(&peer) {
            s.0 = s.0.saturating_sub(1);
            if s.1 == Lane::Wan {
                self.wan_sending = self.wan_sending.saturating_sub(1);
            }
            if s.0 == 0 {
                self.sending.remove(&peer);
            }
        }
        self.release(now)
    }

    /// What the upload limit lets go at `now`, charged (to write, each reported with
    /// `started`).
    pub fn tick(&mut self, now: Instant) -> Vec<(PeerId, Q)> {
        self.release(now)
    }

    /// The waiting responses that may go at `now`, in the order offered: one waits while
    /// its peer has [`MAX_SENDING_PER_PEER`] writes in progress or its lane is full; the
    /// upload limit stops the pass (what comes after waits for the next).
    fn release(&mut self, now: Instant) -> Vec<(PeerId, Q)> {
        let mut out = Vec::new();
        let mut extra: HashMap<PeerId, usize> = HashMap::new();
        let mut extra_wan = 0;
        let mut i = 0;
        while let Some(&(peer, lane, ..)) = self.waiting.get(i) {
            let e = extra.get(&peer).copied().unwrap_or(0);
            if !self.may_go(&peer, lane, e, extra_wan) {
                i += 1;
                continue;
            }
            if !self.limit.available_at(now) {
                break;
            }
            let Some((peer, lane, q, bytes)) = self.waiting.remove(i) else {
                break;
            };
            self.limit.consume_at(bytes, now);
            *extra.entry(peer).or_default() += 1;
            if lane == Lane::Wan {
                extra_wan += 1;
                self.wan_waiting = self.wan_waiting.saturating_sub(1);
            }
            out.push((peer, q));
        }
        out
    }

    /// `peer` is gone: what was being written or waited for it is forgotten.
    pub fn closed(&mut self, peer: &PeerId) {
        if let Some((n, Lane::Wan)) = self.sending.remove(peer) {
            self.wan_sending = self.wan_sending.saturating_sub(n);
        }
        let mut wan_dropped = 0;
        self.waiting.retain(|(p, lane, ..)| {
            let keep = p != peer;
            if !keep && *lane == Lane::Wan {
                wan_dropped += 1;
            }
            keep
        });
        self.wan_waiting = self.wan_waiting.saturating_sub(wan_dropped);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn peers<const N: usize>() -> [PeerId; N] {
        std::array::from_fn(|_| PeerId::random())
    }

    #[test]
    fn a_peer_gets_its_responses_a_few_at_a_time_in_order() {
        let t0 = Instant::now();
        let mut u: Uploads<u32> = Uploads::new(0, t0);
        let [a, b] = peers();
        for i in 0..MAX_SENDING_PER_PEER as u32 {
            assert_eq!(u.offer(a, Lane::Open, i, 1000, t0), Some(i));
            u.started(a, Lane::Open);
        }
        assert_eq!(u.offer(a, Lane::Open, 10, 1000, t0), None);
        assert_eq!(u.offer(a, Lane::Open, 11, 1000, t0), None);
        // Another peer is not held up.
        assert_eq!(u.offer(b, Lane::Open, 20, 1000, t0), Some(20));
        u.started(b, Lane::Open);
        // Each finished write lets one more go, in order.
        assert_eq!(u.done(a, t0), vec![(a, 10)]);
        u.started(a, Lane::Open);
        assert_eq!(u.done(a, t0), vec![(a, 11)]);
        u.started(a, Lane::Open);
        assert!(u.done(a, t0).is_empty());
        // A closed peer's queue is forgotten.
        for i in 30..34 {
            u.offer(b, Lane::Open, i, 1, t0);
            u.started(b, Lane::Open);
        }
        u.offer(b, Lane::Open, 40, 1, t0);
        u.closed(&b);
        assert!(u.done(b, t0).is_empty());
    }

    #[test]
    fn the_wan_lane_writes_a_few_at_a_time_over_all_its_peers_and_then_is_full() {
        let t0 = Instant::now();
        let mut u: Uploads<u32> = Uploads::new(0, t0);
        let remote: [PeerId; 8] = peers();
        let [lan] = peers();
        // One response to each of several IDCs: only WAN_SENDING are written at once.
        let mut written = Vec::new();
        for (i, p) in remote.iter().enumerate() {
            assert!(!u.wan_full());
            if let Some(q) = u.offer(*p, Lane::Wan, i as u32, 1000, t0) {
                u.started(*p, Lane::Wan);
                written.push(q);
            }
        }
        assert_eq!(written, (0..WAN_SENDING as u32).collect::<Vec<_>>());
        assert_eq!(WAN_SENDING + WAN_WAITING, remote.len());
        assert!(u.wan_full(), "every write and every waiting place taken");
        // The LAN is not held up by the WAN lane.
        assert_eq!(u.offer(lan, Lane::Open, 100, 1000, t0), Some(100));
        u.started(lan, Lane::Open);
        assert!(u.done(lan, t0).is_empty());
        // A WAN write done lets the oldest waiting one go, whoever it is for.
        let next = u.done(remote[1], t0);
        assert_eq!(next, vec![(remote[WAN_SENDING], WAN_SENDING as u32)]);
        u.started(remote[WAN_SENDING], Lane::Wan);
        assert!(!u.wan_full());
        // A closed peer's writes and waiting responses free their places.
        u.closed(&remote[0]);
        let next = u.done(remote[2], t0);
        assert_eq!(next.len(), 2, "{next:?}");
        for (p, _) in &next {
            u.started(*p, Lane::Wan);
        }
        u.closed(&remote[7]);
        assert!(!u.wan_full());
    }

    #[test]
    fn data_waits_for_the_upload_limit_and_leaves_at_its_rate() {
        let t0 = Instant::now();
        // 1 MB/s; the bucket starts empty but may go into debt once.
        let mut u: Uploads<u32> = Uploads::new(1_000_000, t0);
        let (a, b) = (PeerId::random(), PeerId::random());
        assert_eq!(u.offer(a, Lane::Open, 1, 500_000, t0), Some(1));
        u.started(a, Lane::Open);
        // In debt now: the next waits, whoever it is for.
        assert_eq!(u.offer(b, Lane::Open, 2, 500_000, t0), None);
        assert_eq!(u.offer(a, Lane::Open, 3, 500_000, t0), None);
        assert!(u.tick(t0 + Duration::from_millis(100)).is_empty());
        // Half a second later the debt is paid: one goes (and its 0.5 MB is the new debt).
        assert_eq!(u.tick(t0 + Duration::from_millis(500)), vec![(b, 2)]);
        assert!(u.tick(t0 + Duration::from_millis(600)).is_empty());
        assert_eq!(u.tick(t0 + Duration::from_millis(1000)), vec![(a, 3)]);
        // Unlimited from now on: all at once.
        u.set_rate(0, t0 + Duration::from_millis(1000));
        assert_eq!(u.offer(b, Lane::Open, 4, 500_000, t0), Some(4));
    }
}
