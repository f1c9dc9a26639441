//! What the IDC's peers announced about images this node is not downloading, sans-IO: when
//! a download of one of them starts, its scheduler knows at once which peer holds which
//! chunk, instead of learning it from the next full announcement round (up to
//! `announcer::ANNOUNCE_FULL` later). Until then a host that starts late knew only its
//! bridgehead as a source of the chunks the IDC already held, pulled them over the
//! bridgehead's LAN link (which carries the fresh chunks of the WAN pull) and left its idle
//! peers idle.
//!
//! Bounded: at most [`MAX_RANGES`] ranges and [`MAX_PEER_ENTRIES`] peer entries over all
//! images (a peer that holds an image whole keeps no ranges but is still an entry); the image
//! heard of least recently goes first. A peer whose ranges grow past [`MAX_RANGES_PER_PEER`],
//! or that lost chunks at rest, is forgotten for that image (its next full round says it all
//! again).

use bids_protocols::gossip::Have;
use bids_protocols::{ChunkIndex, ImageId};
use libp2p::PeerId;
use std::collections::HashMap;
use std::time::Instant;

/// Ranges kept over all images and peers (16 bytes each with the map overhead aside).
pub const MAX_RANGES: usize = 1 << 18;
/// Ranges kept for one peer and image.
pub const MAX_RANGES_PER_PEER: usize = 4096;
/// (image, peer) entries kept over all images.
pub const MAX_PEER_ENTRIES: usize = 1 << 16;

/// What one peer said it holds of one image.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerHave {
    /// Sorted, disjoint half-open ranges.
    pub ranges: Vec<(ChunkIndex, ChunkIndex)>,
    /// It holds the whole image.
    pub complete: bool,
    /// Heard on the bridgeheads' topic (a bridgehead of another IDC).
    pub remote: bool,
}

#[derive(Default)]
struct ImageHeard {
    peers: HashMap<PeerId, PeerHave>,
    last: Option<Instant>,
}

impl ImageHeard {
    fn ranges(&self) -> usize {
        self.peers.values().map(|p| p.ranges.len()).sum()
    }
}

/// Announcements kept per image until a download of it starts.
#[derive(Default)]
pub struct Heard {
    images: HashMap<ImageId, ImageHeard>,
    ranges: usize,
    entries: usize,
}

impl Heard {
    /// `peer` announced `have` at `now` (`remote`: on the bridgeheads' topic).
    pub fn heard(&mut self, peer: PeerId, remote: bool, have: &Have, now: Instant) {
        let (ranges, complete, lost) = (&have.ranges, have.complete, !have.lost.is_empty());
        let entry = self.images.entry(have.image).or_default();
        entry.last = Some(now);
        let before = entry.peers.get(&peer).map(|p| p.ranges.len());
        let p = entry.peers.entry(peer).or_default();
        p.remote = remote;
        p.complete |= complete;
        if !complete && !p.complete {
            p.ranges
                .extend(ranges.iter().copied().filter(|&(start, end)| start < end));
            p.ranges = merge(std::mem::take(&mut p.ranges));
        } else {
            p.ranges.clear();
        }
        let after = p.ranges.len();
        if lost || after > MAX_RANGES_PER_PEER {
            entry.peers.remove(&peer);
            if entry.peers.is_empty() {
                self.images.remove(&have.image);
            }
            if let Some(before) = before {
                self.ranges -= before;
                self.entries -= 1;
            }
        } else {
            self.ranges = self.ranges - before.unwrap_or(0) + after;
            self.entries += usize::from(before.is_none());
        }
        self.evict();
    }

    /// Everything heard of `image`, forgotten here (its download takes it over).
    pub fn take(&mut self, image: &ImageId) -> Vec<(PeerId, PeerHave)> {
        let Some(entry) = self.drop_image(image) else {
            return Vec::new();
        };
        let mut out: Vec<(PeerId, PeerHave)> = entry.peers.into_iter().collect();
        out.sort_unstable_by_key(|(p, _)| *p);
        out
    }

    /// A peer left (disconnected): what it said no longer holds.
    pub fn forget_peer(&mut self, peer: &PeerId) {
        for entry in self.images.values_mut() {
            if let Some(p) = entry.peers.remove(peer) {
                self.ranges -= p.ranges.len();
                self.entries -= 1;
            }
        }
        self.images.retain(|_, e| !e.peers.is_empty());
    }

    /// Ranges kept now.
    pub fn ranges(&self) -> usize {
        self.ranges
    }

    /// (image, peer) entries kept now.
    pub fn entries(&self) -> usize {
        self.entries
    }

    fn drop_image(&mut self, image: &ImageId) -> Option<ImageHeard> {
        let e = self.images.remove(image)?;
        self.ranges -= e.ranges();
        self.entries -= e.peers.len();
        Some(e)
    }

    fn evict(&mut self) {
        while self.ranges > MAX_RANGES || self.entries > MAX_PEER_ENTRIES {
            let Some(oldest) = self
                .images
                .iter()
                .min_by_key(|(id, e)| (e.last, **id))
                .map(|(id, _)| *id)
            else {
                return;
            };
            self.drop_image(&oldest);
        }
    }
}

/// Sorts half-open ranges and joins those that overlap or touch.
fn merge(mut r: Vec<(ChunkIndex, ChunkIndex)>) -> Vec<(ChunkIndex, ChunkIndex)> {
    r.sort_unstable();
    let mut out: Vec<(ChunkIndex, ChunkIndex)> = Vec::with_capacity(r.len());
    for (s, e) in r {
        match out.last_mut() {
            Some((_, end)) if s <= *end => *end = (*end).max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn have(image: ImageId, ranges: &[(u32, u32)], complete: bool, lost: bool) -> Have {
        Have {
            image,
            ranges: ranges.to_vec(),
            complete,
            lost: if lost { vec![(0, 1)] } else { Vec::new() },
        }
    }

    fn pid(n: u8) -> PeerId {
        let mut key = [0u8; 32];
        key[0] = n;
        let k = libp2p::identity::Keypair::ed25519_from_bytes(key).expect("key");
        k.public().to_peer_id()
    }

    const A: ImageId = ImageId([1; 32]);
    const B: ImageId = ImageId([2; 32]);

    #[test]
    fn announcements_add_up_per_peer_until_the_download_takes_them() {
        let mut h = Heard::default();
        let t = Instant::now();
        h.heard(pid(1), false, &have(A, &[(0, 2)], false, false), t);
        h.heard(pid(1), false, &have(A, &[(2, 3), (5, 6)], false, false), t);
        h.heard(pid(2), false, &have(A, &[], true, false), t);
        h.heard(pid(1), false, &have(B, &[(7, 8)], false, false), t);
        assert_eq!(h.ranges(), 3);
        let got = h.take(&A);
        let mut want = vec![
            (
                pid(1),
                PeerHave {
                    ranges: vec![(0, 3), (5, 6)],
                    complete: false,
                    remote: false,
                },
            ),
            (
                pid(2),
                PeerHave {
                    ranges: vec![],
                    complete: true,
                    remote: false,
                },
            ),
        ];
        want.sort_unstable_by_key(|(p, _)| *p);
        assert_eq!(got, want);
        assert!(h.take(&A).is_empty());
        assert_eq!(h.ranges(), 1);
    }

    #[test]
    fn a_peer_that_lost_chunks_or_left_is_forgotten() {
        let mut h = Heard::default();
        let t = Instant::now();
        h.heard(pid(1), false, &have(A, &[(0, 4)], false, false), t);
        h.heard(pid(2), false, &have(A, &[(0, 4)], false, false), t);
        h.heard(pid(1), false, &have(A, &[], false, true), t);
        h.forget_peer(&pid(2));
        assert!(h.take(&A).is_empty());
        assert_eq!(h.ranges(), 0);
    }

    #[test]
    fn the_image_heard_of_least_recently_goes_first_when_full() {
        let mut h = Heard::default();
        let t = Instant::now();
        // Every other chunk: ranges that never merge.
        let many: Vec<(u32, u32)> = (0..MAX_RANGES_PER_PEER as u32)
            .map(|i| (2 * i, 2 * i + 1))
            .collect();
        let mut n = 0u8;
        while h.ranges() + MAX_RANGES_PER_PEER <= MAX_RANGES {
            n += 1;
            h.heard(pid(n), false, &have(A, &many, false, false), t);
        }
        h.heard(
            pid(1),
            false,
            &have(B, &many, false, false),
            t + std::time::Duration::from_secs(1),
        );
        assert!(h.take(&A).is_empty(), "the older image was evicted");
        assert_eq!(h.take(&B).len(), 1);
        assert_eq!(h.ranges(), 0);
    }

    #[test]
    fn peers_that_hold_images_whole_are_bounded_too() {
        let mut h = Heard::default();
        let t = Instant::now();
        let peers: Vec<PeerId> = (1..=64u8).map(pid).collect();
        let images = MAX_PEER_ENTRIES / peers.len() + 1;
        for i in 0..images {
            let mut id = [0u8; 32];
            id[..8].copy_from_slice(&(i as u64).to_le_bytes());
            let at = t + std::time::Duration::from_millis(i as u64);
            for p in &peers {
                h.heard(*p, false, &have(ImageId(id), &[], true, false), at);
            }
        }
        assert_eq!(h.ranges(), 0);
        assert!(h.entries() <= MAX_PEER_ENTRIES, "{}", h.entries());
        assert!(
            h.take(&ImageId([0; 32])).is_empty(),
            "the oldest image was evicted"
        );
    }

    #[test]
    fn a_loss_heard_of_an_unknown_peer_keeps_nothing() {
        let mut h = Heard::default();
        h.heard(pid(1), false, &have(A, &[], false, true), Instant::now());
        assert_eq!((h.ranges(), h.entries()), (0, 0));
        assert!(h.images.is_empty());
    }

    proptest! {
        /// Whatever arrives, the count stays exact, within bounds, and the ranges sorted
        /// and disjoint.
        #[test]
        fn ranges_stay_merged_and_counted(
            ops in proptest::collection::vec(
                (0u8..3, 0u8..4, proptest::collection::vec((0u32..5000, 1u32..50), 0..20), any::<bool>(), any::<bool>()),
                0..200,
            )
        ) {
            let mut h = Heard::default();
            let t = Instant::now();
            for (img, peer, rs, complete, lost) in ops {
                let ranges: Vec<(u32, u32)> = rs.iter().map(|&(s, l)| (s, s + l)).collect();
                h.heard(pid(peer), false, &have(ImageId([img; 32]), &ranges, complete, lost && peer == 0), t);
            }
            let counted = h.ranges();
            let counted_entries = h.entries();
            let mut total = 0;
            let mut total_entries = 0;
            for img in 0..3u8 {
                for (_, p) in h.take(&ImageId([img; 32])) {
                    prop_assert!(p.ranges.len() <= MAX_RANGES_PER_PEER);
                    for w in p.ranges.windows(2) {
                        prop_assert!(w[0].1 < w[1].0);
                    }
                    total += p.ranges.len();
                    total_entries += 1;
                }
            }
            prop_assert_eq!(counted, total);
            prop_assert_eq!(counted_entries, total_entries);
            prop_assert_eq!(h.ranges(), 0);
            prop_assert_eq!(h.entries(), 0);
        }
    }
}
