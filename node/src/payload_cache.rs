//! A small byte-budgeted cache of compressed chunk payloads. Compressing a chunk costs far more
//! than sending it; a bridgehead relays each chunk to every host of its IDC and hosts share
//! among themselves, so each compressed payload is kept for reuse instead of being
//! recompressed per request. Raw payloads are not kept: reading them again is cheap.

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

    /// Keeps a compressed payload (raw ones are ignored); evicts the oldest over budget.
    pub fn insert(&mut self, image: ImageId, idx: ChunkIndex, p: Payload) {
        if p.0 != Encoding::Zstd
            || p.1.len() > self.budget / 4
            || self.map.contains_key(&(image, idx))
        {
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
    fn keeps_compressed_payloads_within_budget() {
        let mut c = PayloadCache::new(1000);
        let img = ImageId([1; 32]);
        c.insert(img, 0, (Encoding::Raw, vec![0; 10].into()));
        assert!(c.get(&img, 0).is_none(), "raw payloads are not cached");
        for i in 0..10 {
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
