//! LAN super-seeding for a bridgehead (the idea of BitTorrent's BEP 16, sans-IO): each chunk
//! the bridgehead relays into its IDC goes to one host, spread over distinct hosts; a host
//! that asks for a chunk already given to another is told it is not held here, takes it from
//! that host once it is announced, and the bridgehead's LAN link carries the image about
//! once, whatever the number of hosts. The engine decides when the rule applies (a bridgehead
//! under BIDS, a peer of its own IDC) and answers; this module only decides who gets a chunk.

use bids_protocols::{ChunkIndex, ImageId};
use libp2p::PeerId;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// A chunk given to one host is given again, to whoever asks, once this much time has passed:
/// by then its taker has stored and announced it, so a host still asking either missed the
/// announcement or the taker failed. Bounds what a lost taker costs the others.
pub const RESEND_AFTER: Duration = Duration::from_secs(2);

/// A waiter lacking more than `CATCHING_UP` times as many chunks as the furthest waiter
/// (plus [`CATCHING_UP_SLACK`]) is catching up: it is not given fresh chunks while a host
/// further along waits for them too.
pub const CATCHING_UP: u32 = 2;
/// See [`CATCHING_UP`]: the chunks a host keeping pace may lack besides those in flight.
pub const CATCHING_UP_SLACK: u32 = 4;

fn catching_up(lacks: u32, furthest: u32) -> bool {
    lacks
        > furthest
            .saturating_mul(CATCHING_UP)
            .saturating_add(CATCHING_UP_SLACK)
}

/// Whether to serve a chunk to a LAN host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Send it: nobody in the LAN got it from us yet (or long ago, or this host itself).
    Serve,
    /// Another host got it just now: answer "not held here" so the asker takes it from that
    /// host once it is announced.
    Elsewhere,
}

#[derive(Default)]
struct ImageSeeding {
    /// Per chunk: the host it last went to and when.
    given: HashMap<ChunkIndex, (PeerId, Instant)>,
    /// When each host was last given a chunk (a count of gives, not a clock), to spread fresh
    /// chunks over distinct hosts in turn.
    per_host: HashMap<PeerId, u64>,
    /// Chunks given so far.
    gives: u64,
}

/// A chunk a holder of the whole image sent to one fetching IDC's bridgehead is sent to
/// another after this long at the earliest: by then the first has stored and announced it
/// to the other bridgeheads, who take it from there. Longer than on the LAN: the chunk
/// crosses a WAN link that the taker shares with everything it fetches.
pub const WAN_RESEND_AFTER: Duration = Duration::from_secs(5);

/// What a bridgehead has relayed into its LAN (or a holder of the whole image has sent to
/// the fetching IDCs' bridgeheads), per image.
pub struct LanSeeder {
    images: HashMap<ImageId, ImageSeeding>,
    resend: Duration,
}

impl Default for LanSeeder {
    fn default() -> Self {
        LanSeeder::with_resend(RESEND_AFTER)
    }
}

impl LanSeeder {
    /// A seeder that gives a chunk to another asker `resend` after it last gave it.
    pub fn with_resend(resend: Duration) -> Self {
        LanSeeder {
            images: HashMap::new(),
            resend,
        }
    }

    /// Decides a request from LAN host `peer` for a chunk we hold, and records a `Serve`.
    pub fn on_request(
        &mut self,
        image: ImageId,
        idx: ChunkIndex,
        peer: PeerId,
        now: Instant,
    ) -> Verdict {
        let s = self.images.entry(image).or_default();
        match s.given.get(&idx) {
            Some((to, at)) if *to != peer && now.saturating_duration_since(*at) < self.resend => {
                Verdict::Elsewhere
            }
            _ => {
                s.give(idx, peer, now);
                Verdict::Serve
            }
        }
    }

    /// A chunk several LAN hosts wait for has arrived: the one of `waiters` (not empty) that
    /// gets it. `missing[k]` is how many chunks `waiters[k]` lacks as far as we know. The
    /// taker is a host about as far along as the furthest of them (see [`CATCHING_UP`]): a
    /// host still catching up has its download link full of chunks its peers already hold, so
    /// a fresh chunk would reach it, and through it the others, late. Among those, the one
    /// given a chunk least recently (one never given first; the first among equals), so
    /// consecutive fresh chunks go to distinct hosts in turn: a host that joins late is not
    /// handed a run of them, whose copies its upload alone would then serve to every other
    /// host. The others are answered [`Verdict::Elsewhere`]. `None` when the chunk went to
    /// one of them a moment ago and none of the others is due a copy yet (see
    /// [`RESEND_AFTER`]).
    pub fn pick_taker(
        &mut self,
        image: ImageId,
        idx: ChunkIndex,
        waiters: &[PeerId],
        missing: &[u32],
        now: Instant,
    ) -> Option<usize> {
        let s = self.images.entry(image).or_default();
        if let Some((to, at)) = s.given.get(&idx) {
            if now.saturating_duration_since(*at) < self.resend {
                // Already given (e.g. answered while these waited): only its taker again.
                return waiters.iter().position(|p| p == to);
            }
        }
        let lacks = |k: usize| missing.get(k).copied().unwrap_or(u32::MAX);
        let furthest = (0..waiters.len()).map(lacks).min()?;
        let (pos, peer) = waiters
            .iter()
            .enumerate()
            .filter(|(k, _)| !catching_up(lacks(*k), furthest))
            .min_by_key(|(k, p)| (s.per_host.get(*p).copied(), *k))?;
        s.give(idx, *peer, now);
        Some(pos)
    }

    /// Forgets an image (download over and no longer relayed, or removed).
    pub fn forget(&mut self, image: &ImageId) {
        self.images.remove(image);
    }

    /// Forgets a host that left: its chunks may go to others at once.
    pub fn forget_host(&mut self, peer: &PeerId) {
        for s in self.images.values_mut() {
            if s.per_host.remove(peer).is_some() {
                s.given.retain(|_, (to, _)| to != peer);
            }
        }
    }
}

impl ImageSeeding {
    fn give(&mut self, idx: ChunkIndex, peer: PeerId, now: Instant) {
        self.given.insert(idx, (peer, now));
        self.gives += 1;
        self.per_host.insert(peer, self.gives);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pid(n: u8) -> PeerId {
        libp2p::identity::Keypair::ed25519_from_bytes([n; 32])
            .expect("key")
            .public()
            .to_peer_id()
    }

    const IMG: ImageId = ImageId([7; 32]);

    #[test]
    fn a_chunk_goes_to_one_host_then_elsewhere_until_resend_time() {
        let mut s = LanSeeder::default();
        let t = Instant::now();
        assert_eq!(s.on_request(IMG, 3, pid(1), t), Verdict::Serve);
        assert_eq!(s.on_request(IMG, 3, pid(2), t), Verdict::Elsewhere);
        // Its taker may ask again (its first copy was lost).
        assert_eq!(s.on_request(IMG, 3, pid(1), t), Verdict::Serve);
        assert_eq!(
            s.on_request(IMG, 3, pid(2), t + RESEND_AFTER / 2),
            Verdict::Elsewhere
        );
        assert_eq!(
            s.on_request(IMG, 3, pid(2), t + RESEND_AFTER),
            Verdict::Serve
        );
        // Other chunks and images are independent.
        assert_eq!(s.on_request(IMG, 4, pid(2), t), Verdict::Serve);
        assert_eq!(s.on_request(ImageId([8; 32]), 3, pid(2), t), Verdict::Serve);
    }

    #[test]
    fn the_wan_seeder_waits_longer_before_sending_a_chunk_again() {
        let mut s = LanSeeder::with_resend(WAN_RESEND_AFTER);
        let t = Instant::now();
        assert_eq!(s.on_request(IMG, 1, pid(1), t), Verdict::Serve);
        assert_eq!(
            s.on_request(IMG, 1, pid(2), t + RESEND_AFTER),
            Verdict::Elsewhere
        );
        assert_eq!(
            s.on_request(IMG, 1, pid(2), t + WAN_RESEND_AFTER),
            Verdict::Serve
        );
    }

    #[test]
    fn waiters_spread_over_hosts() {
        let mut s = LanSeeder::default();
        let t = Instant::now();
        let hosts: Vec<PeerId> = (1..=4).map(pid).collect();
        let mut got = HashMap::new();
        for idx in 0..40 {
            let k = s
                .pick_taker(IMG, idx, &hosts, &[3, 0, 4, 1], t)
                .expect("a taker");
            *got.entry(k).or_insert(0) += 1;
        }
        // Every host waited for every chunk: each gets a quarter, in turn.
        assert!(got.values().all(|&n| n == 10), "{got:?}");
        // A chunk just given is not given to another waiter.
        assert_eq!(s.pick_taker(IMG, 0, &hosts[1..2], &[0], t), None);
        // A host that joins now gets one fresh chunk, then waits its turn like the others.
        let mut late = hosts.clone();
        late.push(pid(5));
        let takers: Vec<usize> = (40..45)
            .map(|idx| s.pick_taker(IMG, idx, &late, &[0; 5], t).expect("a taker"))
            .collect();
        assert_eq!(takers, [4, 0, 1, 2, 3]);
    }

    #[test]
    fn a_host_catching_up_takes_no_fresh_chunk_while_one_keeping_pace_waits() {
        let mut s = LanSeeder::default();
        let t = Instant::now();
        // Host 1 started late and lacks nearly everything; hosts 2 and 3 keep pace.
        let hosts: Vec<PeerId> = (1..=3).map(pid).collect();
        let missing = [120, 3, 6];
        let mut got = HashMap::new();
        for idx in 0..20 {
            let k = s
                .pick_taker(IMG, idx, &hosts, &missing, t)
                .expect("a taker");
            *got.entry(k).or_insert(0) += 1;
        }
        assert_eq!(got.get(&0), None, "{got:?}");
        assert_eq!((got.get(&1), got.get(&2)), (Some(&10), Some(&10)));
        // Alone, or with an unknown neighbour, it is the taker.
        assert_eq!(s.pick_taker(IMG, 30, &hosts[..1], &[120], t), Some(0));
        assert_eq!(s.pick_taker(IMG, 31, &hosts[..2], &[120], t), Some(0));
    }

    #[test]
    fn a_departed_host_frees_its_chunks() {
        let mut s = LanSeeder::default();
        let t = Instant::now();
        assert_eq!(s.on_request(IMG, 9, pid(1), t), Verdict::Serve);
        s.forget_host(&pid(1));
        assert_eq!(s.on_request(IMG, 9, pid(2), t), Verdict::Serve);
        s.forget(&IMG);
        assert_eq!(s.on_request(IMG, 9, pid(3), t), Verdict::Serve);
    }
}
