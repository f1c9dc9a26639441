//! Fixed-length bit sets: an atomic one for the in-memory chunk bitmap that many writer
//! threads update at once, and the packed byte form that is persisted in sled.
//!
//! Byte form: bit `i` is `bytes[i / 8] >> (i % 8) & 1`, `ceil(len / 8)` bytes.

use std::sync::atomic::{AtomicU64, Ordering};

/// A bit set of fixed length whose bits can be set and cleared from several threads.
pub(crate) struct AtomicBits {
    words: Vec<AtomicU64>,
    len: u32,
}

impl AtomicBits {
    pub(crate) fn new(len: u32) -> Self {
        let words = (0..(len as usize).div_ceil(64))
            .map(|_| AtomicU64::new(0))
            .collect();
        AtomicBits { words, len }
    }

    pub(crate) fn len(&self) -> u32 {
        self.len
    }

    fn locate(&self, i: u32) -> Option<(&AtomicU64, u64)> {
        if i >= self.len {
            return None;
        }
        Some((&self.words[(i / 64) as usize], 1u64 << (i % 64)))
    }

    pub(crate) fn get(&self, i: u32) -> bool {
        self.locate(i)
            .is_some_and(|(w, m)| w.load(Ordering::Acquire) & m != 0)
    }

    /// Sets bit `i`; true if this call changed it (it was clear). Out of range: false.
    pub(crate) fn set(&self, i: u32) -> bool {
        self.locate(i)
            .is_some_and(|(w, m)| w.fetch_or(m, Ordering::AcqRel) & m == 0)
    }

    /// Clears bit `i`; true if this call changed it (it was set). Out of range: false.
    pub(crate) fn clear(&self, i: u32) -> bool {
        self.locate(i)
            .is_some_and(|(w, m)| w.fetch_and(!m, Ordering::AcqRel) & m != 0)
    }

    pub(crate) fn count(&self) -> u32 {
        self.words
            .iter()
            .map(|w| w.load(Ordering::Acquire).count_ones())
            .sum()
    }

    pub(crate) fn to_bools(&self) -> Vec<bool> {
        (0..self.len).map(|i| self.get(i)).collect()
    }
}

/// Length in bytes of the packed form of `len` bits.
pub(crate) fn packed_len(len: u32) -> usize {
    (len as usize).div_ceil(8)
}

pub(crate) fn packed_get(bytes: &[u8], i: u32) -> bool {
    bytes
        .get((i / 8) as usize)
        .is_some_and(|b| b >> (i % 8) & 1 == 1)
}

pub(crate) fn packed_set(bytes: &mut [u8], i: u32, on: bool) {
    if let Some(b) = bytes.get_mut((i / 8) as usize) {
        if on {
            *b |= 1 << (i % 8);
        } else {
            *b &= !(1 << (i % 8));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_bits_set_clear_count() {
        let b = AtomicBits::new(130);
        assert_eq!(b.len(), 130);
        assert!(b.set(0));
        assert!(!b.set(0), "second set reports no change");
        assert!(b.set(129));
        assert!(!b.set(130), "out of range is refused");
        assert!(!b.get(130));
        assert_eq!(b.count(), 2);
        assert!(b.clear(0));
        assert!(!b.clear(0));
        assert_eq!(b.count(), 1);
        let bools = b.to_bools();
        assert_eq!(bools.len(), 130);
        assert!(bools[129] && !bools[0]);
    }

    #[test]
    fn packed_form_round_trip() {
        let mut bytes = vec![0u8; packed_len(17)];
        assert_eq!(bytes.len(), 3);
        packed_set(&mut bytes, 16, true);
        packed_set(&mut bytes, 3, true);
        assert_eq!(bytes, vec![0b1000, 0, 1]);
        assert!(packed_get(&bytes, 16) && packed_get(&bytes, 3) && !packed_get(&bytes, 4));
        packed_set(&mut bytes, 3, false);
        assert!(!packed_get(&bytes, 3));
        // Out of range reads are false and writes are ignored.
        assert!(!packed_get(&bytes, 100));
        packed_set(&mut bytes, 100, true);
        assert_eq!(bytes.len(), 3);
    }
}
