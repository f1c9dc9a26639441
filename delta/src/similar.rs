//! Which regions of A the new bytes of B resemble. A literal frame is compressed with
//! those regions as zstd's reference prefix (format version 3, LIT_ZSTD_REF), so a file
//! that changed a little between versions (a package upgraded, a metadata block with a
//! few new entries) costs its differences, not its whole size.
//!
//! Resemblance is found by content-defined anchors: positions where a gear hash of the
//! preceding bytes has its top `ANCHOR_BITS` bits zero (one position in 256 on average),
//! keyed by 32 other bits of the hash. A's anchors are indexed once (8 bytes each, about
//! 32 KiB a MiB of allocated base); each anchor of a literal frame that is also an
//! anchor of A votes for the 16 KiB chunk of A holding it, and the chunks with most votes
//! make the reference, up to a byte budget. Anchors depend only on content, so they
//! line up whatever the shift between the two copies. B's anchors are indexed the same
//! way, and the same vote, limited to the bytes of B the decoder has already written,
//! picks the regions of B's earlier output a frame resembles (format version 4).

use std::collections::HashMap;

use crate::build::{push_op, Op};
use crate::image::Image;
use crate::index::{bits_for, common_prefix, common_suffix};

/// An anchor is a position where the hash has this many top bits zero.
const ANCHOR_BITS: u32 = 8;
/// Anchors closer than this to the previous one are skipped (periodic data).
const MIN_GAP: usize = 16;
/// A's positions are indexed in units of 2^UNIT_SHIFT bytes.
const UNIT_SHIFT: u32 = 12;
/// The reference is made of A's chunks of 2^CHUNK_SHIFT bytes.
pub(crate) const CHUNK_SHIFT: u32 = 14;
/// Keys found at more places of A than this say nothing about where: not indexed.
const MAX_PER_KEY: usize = 8;
/// A chunk needs this many votes to be part of a reference: one anchor found at one
/// place (an anchor found at k places gives each `MAX_PER_KEY / k`). At two anchors
/// v2->v3 of issue 22 was 0.3 % larger; at any vote, the references tripled.
const MIN_VOTES: u32 = MAX_PER_KEY as u32;
/// Input of at most this many bytes is hashed as one piece when indexing A.
const PIECE: usize = 1 << 20;

/// The gear table: 256 fixed pseudo-random words (splitmix64), the same on every build.
const GEAR: [u64; 256] = {
    let mut t = [0u64; 256];
    let mut s: u64 = 0x6A09_E667_F3BC_C908;
    let mut i = 0;
    while i < 256 {
        s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        t[i] = z ^ (z >> 31);
        i += 1;
    }
    t
};

/// Calls `f(position, key)` for each anchor of `data`, in order. A run of one key (a
/// run of equal bytes soon hashes to one value) yields one anchor.
pub(crate) fn anchors(data: &[u8], f: impl FnMut(usize, u32)) {
    anchors_with(data, ANCHOR_BITS, f);
}

/// `anchors` with one position in 2^`bits` on average.
fn anchors_with(data: &[u8], bits: u32, mut f: impl FnMut(usize, u32)) {
    let mut h = 0u64;
    let mut last_key = None;
    let mut next = 0usize;
    for (i, &b) in data.iter().enumerate() {
        h = (h << 1).wrapping_add(GEAR[b as usize]);
        if h >> (64 - bits) == 0 {
            let key = (h >> 24) as u32;
            if i >= next && last_key != Some(key) {
                f(i, key);
                next = i + MIN_GAP;
            }
            last_key = Some(key);
        }
    }
}

/// A's anchors: keys sorted, each with the unit of A it is in.
pub(crate) struct AnchorIndex {
    keys: Vec<u32>,
    units: Vec<u32>,
}

impl AnchorIndex {
    /// Indexes the anchors of `a`'s data (holes are skipped unread). `progress` is called
    /// with finished byte offsets so the caller can release mapped pages.
    pub(crate) fn build(a: &Image<'_>, mut progress: impl FnMut(usize)) -> Self {
        let bytes = a.bytes();
        // Units are u32: positions past 16 TiB are not indexed.
        let limit = bytes.len().min((u32::MAX as usize) << UNIT_SHIFT);
        let mut all: Vec<u64> = Vec::new();
        let mut s = 0usize;
        while s < limit {
            let end = (s + PIECE).min(limit);
            if !a.is_hole(s as u64, end as u64) {
                anchors(&bytes[s..end], |i, key| {
                    all.push((u64::from(key) << 32) | ((s + i) >> UNIT_SHIFT) as u64);
                });
            }
            if end.is_multiple_of(8 << 20) {
                progress(end);
            }
            s = end;
        }
        all.sort_unstable();
        all.dedup();
        let mut idx = AnchorIndex {
            keys: Vec::with_capacity(all.len()),
            units: Vec::with_capacity(all.len()),
        };
        for run in all.chunk_by(|x, y| x >> 32 == y >> 32) {
            if run.len() <= MAX_PER_KEY {
                for &e in run {
                    idx.keys.push((e >> 32) as u32);
                    idx.units.push(e as u32);
                }
            }
        }
        idx.keys.shrink_to_fit();
        idx.units.shrink_to_fit();
        idx
    }

    /// An index of nothing: every reference is empty.
    pub(crate) fn empty() -> Self {
        AnchorIndex {
            keys: Vec::new(),
            units: Vec::new(),
        }
    }

    /// Units of A holding anchor `key` (none, or 1 to `MAX_PER_KEY`).
    fn find(&self, key: u32) -> &[u32] {
        let lo = self.keys.partition_point(|&k| k < key);
        let hi = lo + self.keys[lo..].partition_point(|&k| k == key);
        &self.units[lo..hi]
    }

    /// Number of anchors indexed.
    pub(crate) fn len(&self) -> usize {
        self.keys.len()
    }

    /// Bytes of memory held by the index.
    pub(crate) fn memory(&self) -> usize {
        self.keys.capacity() * 4 + self.units.capacity() * 4
    }

    /// The regions of the indexed image (sorted, disjoint `(start, len)`, within its
    /// first `a_len` bytes: anchors in later units do not vote) that `lit` resembles
    /// most, `budget` bytes at most; empty when none does.
    pub(crate) fn reference(&self, lit: &[u8], a_len: u64, budget: usize) -> Vec<(u64, u64)> {
        let mut votes: HashMap<u32, u32> = HashMap::new();
        let limit_unit = (a_len >> UNIT_SHIFT).min(u64::from(u32::MAX)) as u32;
        anchors(lit, |_, key| {
            let hits = self.find(key);
            if hits.is_empty() {
                return;
            }
            let w = (MAX_PER_KEY / hits.len()) as u32;
            for &u in hits {
                if u < limit_unit {
                    *votes.entry(u >> (CHUNK_SHIFT - UNIT_SHIFT)).or_default() += w;
                }
            }
        });
        let mut ranked: Vec<(u32, u32)> =
            votes.into_iter().filter(|&(_, v)| v >= MIN_VOTES).collect();
        // Most votes first; equal votes by position, so a build is reproducible.
        ranked.sort_unstable_by(|x, y| y.1.cmp(&x.1).then(x.0.cmp(&y.0)));
        ranked.truncate(budget >> CHUNK_SHIFT);
        let mut chunks: Vec<u32> = ranked.into_iter().map(|(c, _)| c).collect();
        chunks.sort_unstable();
        let mut out: Vec<(u64, u64)> = Vec::new();
        for c in chunks {
            let start = u64::from(c) << CHUNK_SHIFT;
            let end = (start + (1u64 << CHUNK_SHIFT)).min(a_len);
            if start >= end {
                continue;
            }
            match out.last_mut() {
                Some((s, l)) if *s + *l == start => *l += end - start,
                _ => out.push((start, end - start)),
            }
        }
        out
    }
}

/// B's own literal runs are searched at one anchor in 2^OWN_ANCHOR_BITS positions: more
/// repeats found than at A's density, for a table of the same size.
const OWN_ANCHOR_BITS: u32 = 6;
/// A slot of `OwnAnchors`: 24 check bits of the key, then position + 1 in 40 bits (later
/// positions, past 1 TiB, are not indexed).
const POS_BITS: u32 = 40;
const POS_MASK: u64 = (1 << POS_BITS) - 1;
const CHECK_MASK: u32 = (1 << 24) - 1;
/// Repeats shorter than this stay literal: zstd codes them about as well as a copy, and
/// cutting literal runs costs it context (on issue 22's images 256 beat 64 and 128 by
/// 0.1-0.6 %, and 512).
const MIN_OWN_MATCH: usize = 256;

/// B's own literal bytes already scanned, by anchor: a repeat of new data at any
/// distance and alignment (a file installed twice, a binary shipped in two packages)
/// becomes a copy from the output instead of literal bytes, wherever the literal frames
/// and zstd's window fall. A lossy table: slot by key, the newest position wins; a slot
/// keeps 24 bits of its key beside the position, so a collision is rejected without
/// reading B (candidates that are read map B's pages).
pub(crate) struct OwnAnchors {
    slots: Vec<u64>,
    shift: u32,
}

impl OwnAnchors {
    /// A table for a target of `bytes` bytes: a slot for each 1 KiB (about four times
    /// the anchors of its literal runs when a tenth of it is new), from 32 KiB to 32 MiB.
    pub(crate) fn new(bytes: usize) -> Self {
        let bits = bits_for((bytes >> 10).min(1 << 22), 12);
        OwnAnchors {
            slots: vec![0; 1 << bits],
            shift: 32 - bits,
        }
    }

    /// Bytes of memory held by the table.
    pub(crate) fn memory(&self) -> usize {
        self.slots.len() * 8
    }

    /// Appends ops for the literal run `b[s..e]`: copies of earlier literal bytes of `b`
    /// (at least `MIN_OWN_MATCH` long, each source ending before its destination starts)
    /// and literal data for the rest; then indexes the run's anchors. Returns the bytes
    /// copied.
    pub(crate) fn split_run(&mut self, b: &[u8], s: usize, e: usize, out: &mut Vec<Op>) -> u64 {
        let mut found: Vec<(usize, u32)> = Vec::new();
        anchors_with(&b[s..e], OWN_ANCHOR_BITS, |i, key| found.push((s + i, key)));
        let mut pos = s;
        let mut copied = 0u64;
        for &(q, key) in &found {
            if q < pos {
                continue;
            }
            let slot = self.slots[(key >> self.shift) as usize];
            if slot == 0 || slot >> POS_BITS != u64::from(key & CHECK_MASK) {
                continue;
            }
            let src = ((slot & POS_MASK) - 1) as usize;
            if src >= q {
                continue;
            }
            let back = common_suffix(&b[pos..q], &b[..src]);
            let (dst, from) = (q - back, src - back);
            let fwd = common_prefix(&b[q..e], &b[src..src + (e - q)]);
            let len = (back + fwd).min(dst - from);
            if len < MIN_OWN_MATCH {
                continue;
            }
            push_op(
                out,
                Op::Data {
                    start: pos as u64,
                    len: (dst - pos) as u64,
                },
            );
            push_op(
                out,
                Op::Own {
                    src: from as u64,
                    len: len as u64,
                },
            );
            copied += len as u64;
            pos = dst + len;
        }
        push_op(
            out,
            Op::Data {
                start: pos as u64,
                len: (e - pos) as u64,
            },
        );
        for (q, key) in found {
            if (q as u64) < POS_MASK {
                self.slots[(key >> self.shift) as usize] =
                    (u64::from(key & CHECK_MASK) << POS_BITS) | (q as u64 + 1);
            }
        }
        copied
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::tests::pseudo_random;

    fn noise(seed: u64, len: usize) -> Vec<u8> {
        pseudo_random(len, seed)
    }

    #[test]
    fn anchors_follow_content_not_offset() {
        let data = noise(1, 1 << 16);
        let mut a = Vec::new();
        anchors(&data, |i, k| a.push((i, k)));
        // About one in 256 positions.
        assert!((100..500).contains(&a.len()), "{} anchors", a.len());
        let mut shifted = noise(2, 777);
        shifted.extend_from_slice(&data);
        let mut b = Vec::new();
        anchors(&shifted, |i, k| b.push((i as i64 - 777, k)));
        // Past the first 64 bytes the hash depends only on the content.
        let a: Vec<(i64, u32)> = a.into_iter().map(|(i, k)| (i as i64, k)).collect();
        let tail = |v: &[(i64, u32)]| v.iter().filter(|x| x.0 > 64).copied().collect::<Vec<_>>();
        assert_eq!(tail(&a), tail(&b));
    }

    #[test]
    fn runs_of_one_byte_give_two_anchors_at_most() {
        // At most one while the hash fills up, and one at its fixed point.
        for v in 0..=255u8 {
            let mut n = 0;
            anchors(&vec![v; 1 << 16], |_, _| n += 1);
            assert!(n <= 2, "byte {v:#04x}: {n} anchors");
        }
    }

    #[test]
    fn reference_finds_the_region_a_literal_came_from() {
        // A: 4 MiB of noise. The literal: 64 KiB of A from 1 MiB + 100, with edits.
        let a = noise(3, 4 << 20);
        let idx = AnchorIndex::build(&Image::from_bytes(&a), |_| {});
        assert!(idx.len() > 10_000, "{} anchors", idx.len());
        let from = (1 << 20) + 100;
        let mut lit = a[from..from + (64 << 10)].to_vec();
        for i in (0..lit.len()).step_by(997) {
            lit[i] ^= 0x55;
        }
        let r = idx.reference(&lit, a.len() as u64, 1 << 20);
        let covered: u64 = r.iter().map(|x| x.1).sum();
        assert!(covered <= 1 << 20);
        let holds = |p: u64| r.iter().any(|&(s, l)| s <= p && p < s + l);
        assert!(
            holds(from as u64 + 1000) && holds(from as u64 + 60_000),
            "{r:?}"
        );
        // Unrelated bytes find nothing.
        assert!(idx
            .reference(&noise(4, 64 << 10), a.len() as u64, 1 << 20)
            .is_empty());
        // The budget is kept.
        let small = idx.reference(&lit, a.len() as u64, 1 << CHUNK_SHIFT);
        assert_eq!(small.iter().map(|x| x.1).sum::<u64>(), 1 << CHUNK_SHIFT);
    }

    #[test]
    fn reference_keeps_to_the_bytes_before_its_limit() {
        // B's index: a frame may only reference output written before its records.
        let data = noise(8, 4 << 20);
        let idx = AnchorIndex::build(&Image::from_bytes(&data), |_| {});
        let lit = data[(3 << 20) + 50..(3 << 20) + 50 + (64 << 10)].to_vec();
        assert!(idx.reference(&lit, 3 << 20, 1 << 20).is_empty());
        let r = idx.reference(&lit, 4 << 20, 1 << 20);
        assert!(!r.is_empty());
        assert!(r.iter().all(|&(s, _)| s >= 3 << 20), "{r:?}");
        // A limit inside the copied region: only whole units before it vote, and no
        // range reaches past it.
        let limit = (3 << 20) + (32 << 10) + 100;
        let r = idx.reference(&lit, limit, 1 << 20);
        assert!(r.iter().all(|&(s, l)| s + l <= limit), "{r:?}");
    }

    #[test]
    fn own_repeats_at_any_distance_and_alignment_become_copies() {
        // 1 MiB of new bytes, 3 MiB of other new bytes, then the first 200 KiB again at
        // an odd offset with one byte changed in the middle.
        let first = noise(5, 1 << 20);
        let mut b = first.clone();
        b.extend(noise(6, 3 << 20));
        b.extend(noise(7, 1235));
        let at = b.len();
        let mut again = first[..200_000].to_vec();
        again[100_000] ^= 1;
        b.extend_from_slice(&again);
        let mut own = OwnAnchors::new(b.len());
        let mut ops = Vec::new();
        own.split_run(&b, 0, at, &mut ops);
        assert_eq!(
            ops,
            vec![Op::Data {
                start: 0,
                len: at as u64
            }]
        );
        ops.clear();
        let copied = own.split_run(&b, at, b.len(), &mut ops);
        assert!(copied > 190_000, "{copied} bytes copied");
        let mut pos = at as u64;
        for op in &ops {
            match *op {
                Op::Own { src, len } => {
                    let (s, d, l) = (src as usize, pos as usize, len as usize);
                    assert!(s + l <= d, "source ends after the destination starts");
                    assert_eq!(b[s..s + l], b[d..d + l]);
                    pos += len;
                }
                Op::Data { start, len } => {
                    assert_eq!(start, pos);
                    pos += len;
                }
                _ => panic!("unexpected {op:?}"),
            }
        }
        assert_eq!(pos, b.len() as u64);
    }
}
