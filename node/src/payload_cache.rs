//! A small byte-budgeted cache of the chunk payloads a node sent or received last, as they
//! go on the wire. A bridgehead relays each chunk to hosts of its IDC and hosts share among
//! themselves, mostly within moments of the chunk landing; serving it again from here costs
//! neither a recompression (a compressed payload) nor a read and a re-hash (a raw one: a
//! read from the store re-checks the chunk's SHA-256, which took 6-9 % of the CPU of a
//! 32-host IDC). Every payload kept was verified when it was received or read.

use bids_protocols::chunk::Encoding;
use bids_protocols::{ChunkIndex, ImageId};
use bytes::Bytes;
use std::collections::{HashMap, VecDeque};

/// An encoded payload; `Bytes`, so the cache and every response share one buffer.
pub type Payload = (Encoding, Bytes);

#[derive(Debug)]
pub struct PayloadCache {
    map: HashMap<(ImageId, ChunkIndex), Payload>,
    order: VecDeque<(ImageId, ChunkIndex)>,
    bytes: usize,
    budget: usize,
}

impl PayloadCache {
    pub fn new(budget: usize) -> Self {
        PayloadCache {
            map: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
            budget,
        }
    }

    pub fn get(&self, image: &ImageId, idx: ChunkIndex) -> Option<Payload> {
        self.map.get(&(*image, idx)).cloned()
    }

    /// Keeps a payload; evicts the oldest over budget.
    pub fn insert(&mut self, image: ImageId, idx: ChunkIndex, p: Payload) {
        if p.1.len() > self.budget / 4 || self.map.contains_key(&(image, idx)) {
            return;
        }
        self.bytes += p.1.len();
        self.map.insert((image, idx), p);
        self.order.push_back((image, idx));
        while self.bytes > self.budget {
            let Some(k) = self.order.pop_front() else {
                break;
            };
            if let Some(old) = self.map.remove(&k) {
                self.bytes -= old.1.len();
            }
        }
    }

    /// Drops everything of one image (removed from the store).
    pub fn forget(&mut self, image: &ImageId) {
        self.order.retain(|(i, _)| i != image);
        let bytes = &mut self.bytes;
        self.map.retain(|(i, _), p| {
            if i == image {
                *bytes -= p.1.len();
                false
            } else {
                true
            }
        });
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_payloads_within_budget() {
        let mut c = PayloadCache::new(1000);
        let img = ImageId([1; 32]);
        c.insert(img, 0, (Encoding::Raw, vec![0; 300].into()));
        assert!(
            c.get(&img, 0).is_none(),
            "more than a quarter of the budget: not kept"
        );
        c.insert(img, 0, (Encoding::Raw, vec![0; 10].into()));
        assert_eq!(c.get(&img, 0).map(|p| p.0), Some(Encoding::Raw));
        for i in 1..10 {
            c.insert(img, i, (Encoding::Zstd, vec![0; 200].into()));
        }
        assert!(c.bytes() <= 1000);
        assert!(c.get(&img, 9).is_some(), "newest kept");
        assert!(c.get(&img, 0).is_none(), "oldest evicted");
        c.forget(&img);
        assert_eq!(c.bytes(), 0);
        assert!(c.get(&img, 9).is_none());
    }
}
