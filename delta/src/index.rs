//! The base image's block index: a rolling polynomial hash of every aligned, non-zero block
//! of A in an open-addressed table, plus a bit filter so the byte-by-byte rolling search
//! over B can reject most positions without touching the table. Matches are always
//! confirmed by comparing bytes, so hash collisions cost time, never correctness.

use crate::image::Image;

/// Multiplier of the polynomial hash. Odd and ≡ 3 (mod 8), so its powers modulo 2^32
/// cycle with the longest possible period (2^30).
const P: u32 = 0x2545_F493;
/// Fibonacci-hashing multipliers that spread the 32-bit hash over table slots and filter
/// bits (top bits of the product depend on every bit of the hash).
const SLOT_MUL: u32 = 0x9E37_79B9;
const FILTER_MUL: u32 = 0x85EB_CA6B;
/// Filter bits per indexed block: about 1/64 of the positions of a rolling search reach
/// the table (8 bytes a block: 8 MiB for a 4 GiB base full of data).
const FILTER_BITS_PER_BLOCK: usize = 64;

/// H(w) = Σ w[i]·P^(n-1-i) mod 2^32 over a window of n bytes. Computing it for a whole
/// block is a dot product with precomputed powers (vectorised); moving the window by one
/// byte is two multiplications.
pub(crate) struct PolyHash {
    weights: Vec<u32>,
    /// out_tab[b] = b·P^n, subtracted when byte b leaves the window.
    out_tab: [u32; 256],
    dot: fn(&[u8], &[u32]) -> u32,
}

impl PolyHash {
    pub(crate) fn new(window: usize) -> Self {
        let mut weights = vec![0u32; window];
        let mut p: u32 = 1;
        for w in weights.iter_mut().rev() {
            *w = p;
            p = p.wrapping_mul(P);
        }
        // Here p = P^window.
        let mut out_tab = [0u32; 256];
        for (b, o) in out_tab.iter_mut().enumerate() {
            *o = (b as u32).wrapping_mul(p);
        }
        PolyHash {
            weights,
            out_tab,
            dot: select_dot(),
        }
    }

    /// Hash of one full window (`block.len()` must equal the window).
    #[inline]
    pub(crate) fn hash(&self, block: &[u8]) -> u32 {
        debug_assert_eq!(block.len(), self.weights.len());
        (self.dot)(block, &self.weights)
    }

    /// Slides the window one byte: `out` leaves at the front, `inn` enters at the back.
    #[inline(always)]
    pub(crate) fn roll(&self, h: u32, out: u8, inn: u8) -> u32 {
        h.wrapping_mul(P)
            .wrapping_sub(self.out_tab[out as usize])
            .wrapping_add(u32::from(inn))
    }
}

#[inline(always)]
fn dot_generic(block: &[u8], w: &[u32]) -> u32 {
    block.iter().zip(w).fold(0u32, |acc, (&b, &w)| {
        acc.wrapping_add(u32::from(b).wrapping_mul(w))
    })
}

fn dot_portable(block: &[u8], w: &[u32]) -> u32 {
    dot_generic(block, w)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn dot_avx2_inner(block: &[u8], w: &[u32]) -> u32 {
    dot_generic(block, w)
}

#[cfg(target_arch = "x86_64")]
fn dot_avx2(block: &[u8], w: &[u32]) -> u32 {
    // SAFETY: this function is only selected by `select_dot` after the CPU reported AVX2.
    unsafe { dot_avx2_inner(block, w) }
}

/// The same arithmetic, compiled for AVX2 when the CPU has it (8 lanes of 32-bit
/// multiplies instead of SSE2 emulation): hashing the base is then memory-bound.
fn select_dot() -> fn(&[u8], &[u32]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") {
            return dot_avx2;
        }
    }
    dot_portable
}

/// Number of bits needed to index `n` slots as a power of two (at least `min_bits`).
pub(crate) fn bits_for(n: usize, min_bits: u32) -> u32 {
    let n = n.max(1).next_power_of_two();
    n.trailing_zeros().clamp(min_bits, 32)
}

/// Open-addressed table of (hash, block number) for A's aligned non-zero blocks.
/// Slot layout: hash in the high 32 bits, block number + 1 in the low 32 (0 = empty);
/// 8 bytes a slot at load ≤ 1/2: 4 MiB for a 1 GiB base at 4 KiB blocks.
pub(crate) struct BlockIndex {
    slots: Vec<u64>,
    slot_shift: u32,
    filter: Vec<u64>,
    filter_shift: u32,
    block_size: usize,
    entries: usize,
}

impl BlockIndex {
    /// Indexes every full, aligned, non-zero block of `a`. Identical blocks are stored
    /// once (so look-ups stay short on images with many repeated blocks). `progress` is
    /// called with each finished byte offset so the caller can release mapped pages.
    pub(crate) fn build(
        a: &Image<'_>,
        poly: &PolyHash,
        block_size: usize,
        mut progress: impl FnMut(usize),
    ) -> Self {
        let bytes = a.bytes();
        let full_blocks = bytes.len() / block_size;
        let slot_bits = bits_for(full_blocks.saturating_mul(2), 4);
        let mut idx = BlockIndex {
            slots: vec![0u64; 1usize << slot_bits],
            slot_shift: 32 - slot_bits,
            filter: Vec::new(),
            filter_shift: 32,
            block_size,
            entries: 0,
        };
        const STEP: usize = 8 << 20;
        for j in 0..full_blocks {
            let start = j * block_size;
            let end = start + block_size;
            if !a.is_hole(start as u64, end as u64) {
                let blk = &bytes[start..end];
                if !is_zero(blk) {
                    idx.insert(poly.hash(blk), j, bytes);
                }
            }
            if end % STEP < block_size {
                progress(end);
            }
        }
        let filter_bits = bits_for(idx.entries.saturating_mul(FILTER_BITS_PER_BLOCK), 6);
        idx.filter = vec![0u64; (1usize << filter_bits) / 64];
        idx.filter_shift = 32 - filter_bits;
        for &s in &idx.slots {
            if s != 0 {
                let bit = idx.filter_bit((s >> 32) as u32);
                idx.filter[bit / 64] |= 1u64 << (bit % 64);
            }
        }
        idx
    }

    /// An empty index for up to `blocks` blocks that grows by `add` (the target's own
    /// blocks, indexed as the scan goes). Its filter is sized for `blocks` from the start.
    pub(crate) fn with_capacity(blocks: usize, block_size: usize) -> Self {
        let slot_bits = bits_for(blocks.saturating_mul(2), 4);
        let filter_bits = bits_for(blocks.saturating_mul(FILTER_BITS_PER_BLOCK), 6);
        BlockIndex {
            slots: vec![0u64; 1usize << slot_bits],
            slot_shift: 32 - slot_bits,
            filter: vec![0u64; (1usize << filter_bits) / 64],
            filter_shift: 32 - filter_bits,
            block_size,
            entries: 0,
        }
    }

    /// Adds block number `block` of `data` (hash `h`) to an index made by
    /// `with_capacity`; ignored once the index is half full (look-ups stay short).
    pub(crate) fn add(&mut self, h: u32, block: usize, data: &[u8]) {
        if (self.entries + 1) * 2 > self.slots.len() || block >= u32::MAX as usize {
            return;
        }
        self.insert(h, block, data);
        let bit = self.filter_bit(h);
        self.filter[bit / 64] |= 1u64 << (bit % 64);
    }

    /// Number of distinct blocks indexed.
    pub(crate) fn len(&self) -> usize {
        self.entries
    }

    /// Bytes of memory held by the index.
    pub(crate) fn memory(&self) -> usize {
        self.slots.len() * 8 + self.filter.len() * 8
    }

    #[inline(always)]
    fn slot_of(&self, h: u32) -> usize {
        (h.wrapping_mul(SLOT_MUL) >> self.slot_shift) as usize
    }

    #[inline(always)]
    fn filter_bit(&self, h: u32) -> usize {
        (h.wrapping_mul(FILTER_MUL) >> self.filter_shift) as usize
    }

    fn insert(&mut self, h: u32, block: usize, a: &[u8]) {
        let mask = self.slots.len() - 1;
        let bs = self.block_size;
        let mut i = self.slot_of(h);
        loop {
            let s = self.slots[i];
            if s == 0 {
                // Block numbers fit: `build` rejects bases with more than u32::MAX blocks.
                self.slots[i] = (u64::from(h) << 32) | (block as u64 + 1);
                self.entries += 1;
                return;
            }
            if (s >> 32) as u32 == h {
                let other = (s & 0xffff_ffff) as usize - 1;
                if a[other * bs..(other + 1) * bs] == a[block * bs..(block + 1) * bs] {
                    return;
                }
            }
            i = (i + 1) & mask;
        }
    }

    /// Cheap pre-check for the rolling search: false means "certainly not indexed".
    #[inline(always)]
    pub(crate) fn may_contain(&self, h: u32) -> bool {
        if self.filter.is_empty() {
            return false;
        }
        let bit = self.filter_bit(h);
        self.filter[bit / 64] & (1u64 << (bit % 64)) != 0
    }

    /// Offset in A of a block whose bytes equal `data` (a full block), if any.
    pub(crate) fn find(&self, h: u32, data: &[u8], a: &[u8]) -> Option<usize> {
        if self.entries == 0 {
            return None;
        }
        let mask = self.slots.len() - 1;
        let bs = self.block_size;
        let mut i = self.slot_of(h);
        loop {
            let s = self.slots[i];
            if s == 0 {
                return None;
            }
            if (s >> 32) as u32 == h {
                let off = ((s & 0xffff_ffff) as usize - 1) * bs;
                if &a[off..off + bs] == data {
                    return Some(off);
                }
            }
            i = (i + 1) & mask;
        }
    }
}

/// True if every byte is zero (OR-folds 64-byte chunks so it vectorises).
#[inline]
pub(crate) fn is_zero(data: &[u8]) -> bool {
    let mut chunks = data.chunks_exact(256);
    for c in &mut chunks {
        if c.iter().fold(0u8, |acc, &x| acc | x) != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&x| x == 0)
}

/// Number of leading zero bytes of `x`.
pub(crate) fn zero_prefix(x: &[u8]) -> usize {
    let mut i = 0;
    while i + 64 <= x.len() && is_zero(&x[i..i + 64]) {
        i += 64;
    }
    while i < x.len() && x[i] == 0 {
        i += 1;
    }
    i
}

/// Number of trailing zero bytes of `x`.
pub(crate) fn zero_suffix(x: &[u8]) -> usize {
    let n = x.len();
    let mut i = 0;
    while i + 64 <= n && is_zero(&x[n - i - 64..n - i]) {
        i += 64;
    }
    while i < n && x[n - i - 1] == 0 {
        i += 1;
    }
    i
}

/// Length of the longest common prefix of `x` and `y`.
pub(crate) fn common_prefix(x: &[u8], y: &[u8]) -> usize {
    let n = x.len().min(y.len());
    let (x, y) = (&x[..n], &y[..n]);
    let mut i = 0;
    while i + 64 <= n && x[i..i + 64] == y[i..i + 64] {
        i += 64;
    }
    while i < n && x[i] == y[i] {
        i += 1;
    }
    i
}

/// Length of the longest common suffix of `x` and `y`.
pub(crate) fn common_suffix(x: &[u8], y: &[u8]) -> usize {
    let n = x.len().min(y.len());
    let (x, y) = (&x[x.len() - n..], &y[y.len() - n..]);
    let mut i = 0;
    while i + 64 <= n && x[n - i - 64..n - i] == y[n - i - 64..n - i] {
        i += 64;
    }
    while i < n && x[n - i - 1] == y[n - i - 1] {
        i += 1;
    }
    i
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// xorshift bytes, the same for a seed everywhere (shared by the crate's unit tests).
    pub(crate) fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 24) as u8
            })
            .collect()
    }

    #[test]
    fn rolling_equals_direct_hash() {
        let data = pseudo_random(3000, 7);
        let w = 256;
        let poly = PolyHash::new(w);
        let mut h = poly.hash(&data[..w]);
        for p in 1..data.len() - w {
            h = poly.roll(h, data[p - 1], data[p - 1 + w]);
            assert_eq!(h, poly.hash(&data[p..p + w]), "position {p}");
            assert_eq!(h, dot_portable(&data[p..p + w], &poly.weights));
        }
    }

    #[test]
    fn index_finds_blocks_and_dedups() {
        let bs = 512;
        let mut a = pseudo_random(bs * 8, 1);
        // Block 3 duplicates block 1; block 5 is zero (not indexed).
        let (lo, hi) = a.split_at_mut(3 * bs);
        hi[..bs].copy_from_slice(&lo[bs..2 * bs]);
        a[5 * bs..6 * bs].fill(0);
        let img = Image::from_bytes(&a);
        let poly = PolyHash::new(bs);
        let idx = BlockIndex::build(&img, &poly, bs, |_| {});
        assert_eq!(idx.len(), 6);
        for j in [0usize, 1, 2, 4, 6, 7] {
            let blk = &a[j * bs..(j + 1) * bs];
            let h = poly.hash(blk);
            assert!(idx.may_contain(h));
            let off = idx.find(h, blk, &a).unwrap();
            assert_eq!(&a[off..off + bs], blk);
        }
        let other = pseudo_random(bs, 99);
        assert_eq!(idx.find(poly.hash(&other), &other, &a), None);
        assert!(idx.memory() > 0);
    }

    #[test]
    fn growing_index_finds_added_blocks() {
        let bs = 512;
        let b = pseudo_random(bs * 6, 5);
        let poly = PolyHash::new(bs);
        let mut idx = BlockIndex::with_capacity(6, bs);
        let h2 = poly.hash(&b[2 * bs..3 * bs]);
        assert!(idx.find(h2, &b[2 * bs..3 * bs], &b).is_none());
        idx.add(h2, 2, &b);
        idx.add(h2, 2, &b); // the same block twice is stored once
        assert_eq!(idx.len(), 1);
        assert!(idx.may_contain(h2));
        assert_eq!(idx.find(h2, &b[2 * bs..3 * bs], &b), Some(2 * bs));
        let h4 = poly.hash(&b[4 * bs..5 * bs]);
        assert!(idx.find(h4, &b[4 * bs..5 * bs], &b).is_none());
        // Capacity 6 blocks: at most 6 entries (half of the 16 slots would allow 8).
        for j in 0..6 {
            idx.add(poly.hash(&b[j * bs..(j + 1) * bs]), j, &b);
        }
        assert_eq!(idx.len(), 6);
        assert_eq!(idx.find(h4, &b[4 * bs..5 * bs], &b), Some(4 * bs));
    }

    #[test]
    fn prefix_suffix_and_zero() {
        let x = pseudo_random(1000, 3);
        let mut y = x.clone();
        y[700] ^= 1;
        assert_eq!(common_prefix(&x, &y), 700);
        assert_eq!(common_suffix(&x, &y), 299);
        assert_eq!(common_prefix(&x, &x[..10]), 10);
        assert_eq!(common_suffix(&x, &x[500..]), 500);
        assert!(is_zero(&[0u8; 1000]));
        let mut z = [0u8; 1000];
        z[999] = 1;
        assert!(!is_zero(&z));
        z[999] = 0;
        z[3] = 1;
        assert!(!is_zero(&z));
        assert!(is_zero(&[]));
        let mut w = vec![0u8; 300];
        w[100] = 5;
        w[250] = 1;
        assert_eq!(zero_prefix(&w), 100);
        assert_eq!(zero_suffix(&w), 49);
        assert_eq!(zero_prefix(&[0u8; 130]), 130);
        assert_eq!(zero_suffix(&[0u8; 130]), 130);
    }
}
