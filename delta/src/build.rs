//! Building a delta: index A's aligned blocks, classify B's aligned blocks (zero, same
//! offset, moved, literal), refine literal runs byte-wise (extend neighbouring copies and
//! zero runs, rolling search for content shifted by non-multiples of the block size), and
//! encode the ops with zstd-compressed literal frames. Applying lives in `apply`.
//!
//! Threads: two hash A and B with SHA-256 (sequential reads, holes not read), the
//! caller's thread indexes A and scans B segment by segment, one groups the ops and
//! writes, and `threads` workers (default 2) compress the groups: at the default level
//! compression costs several times the scan, and the frames are independent, so two
//! cores nearly halve the build time.

use std::collections::VecDeque;
use std::io::Write;
use std::ops::Range;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::apply::REFERENCE_WINDOW_LOG_MAX;
use crate::filter::{x86_decode, x86_encode};
use crate::format::{
    put_ranges, put_varint, LIT_FLAG_OUT_REFERENCE, LIT_FLAG_REFERENCE, LIT_FLAG_X86, TAG_COPY,
    TAG_COPY_OUT, TAG_DATA, TAG_END, TAG_LIT_RAW, TAG_LIT_ZSTD_EX, TAG_OPS_ZSTD, TAG_ZERO,
};
use crate::image::Image;
use crate::index::{
    bits_for, common_prefix, common_suffix, is_zero, zero_prefix, zero_suffix, BlockIndex, PolyHash,
};
use crate::similar::{AnchorIndex, OwnAnchors};
use crate::{DeltaError, MAX_FRAME_V2, MAX_REFERENCE};

/// How to build a delta. `Default` is what `bids delta build` uses.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Size of the aligned blocks A is indexed by and B is scanned in. A power of two
    /// from 512 to 1 MiB; default 4096 (the ext4 block size).
    pub block_size: usize,
    /// zstd level of literal frames (1..=22): higher is smaller and slower; default
    /// `DEFAULT_LEVEL`.
    pub level: i32,
    /// Byte-by-byte rolling search of literal runs for blocks of A shifted by a
    /// non-multiple of the block size (rsync-style); default on.
    pub rolling: bool,
    /// Literal runs longer than this are not searched byte-wise (long runs of new bytes
    /// are new files, where the search costs time and finds nothing); default 4 MiB.
    pub rolling_max_run: usize,
    /// Uncompressed size of one literal frame, 64 KiB ..= 64 MiB; default 24 MiB.
    pub frame_size: usize,
    /// Threads compressing literal frames in parallel (1..=64); default 2.
    pub threads: usize,
    /// Most bytes of A a literal frame is compressed against (the regions of A its bytes
    /// resemble, found by content-defined anchors; zstd's reference prefix), 0 ..=
    /// `MAX_REFERENCE`; 0 compresses every frame alone. Default 16 MiB.
    pub reference_max: usize,
}

/// Default zstd level of literal frames.
pub const DEFAULT_LEVEL: i32 = 18;

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            block_size: 4096,
            level: DEFAULT_LEVEL,
            rolling: true,
            rolling_max_run: 4 << 20,
            frame_size: 24 << 20,
            threads: 2,
            reference_max: 16 << 20,
        }
    }
}

impl BuildOptions {
    fn validate(&self) -> Result<(), DeltaError> {
        let bs = self.block_size;
        if !bs.is_power_of_two() || !(512..=1 << 20).contains(&bs) {
            return Err(DeltaError::InvalidOptions(format!(
                "block size {bs} must be a power of two from 512 to 1048576"
            )));
        }
        if !(1..=22).contains(&self.level) {
            return Err(DeltaError::InvalidOptions(format!(
                "zstd level {} must be in 1..=22",
                self.level
            )));
        }
        if !(64 << 10..=MAX_FRAME_V2).contains(&self.frame_size) {
            return Err(DeltaError::InvalidOptions(format!(
                "frame size {} must be from 65536 to {MAX_FRAME_V2}",
                self.frame_size
            )));
        }
        if self.reference_max > MAX_REFERENCE {
            return Err(DeltaError::InvalidOptions(format!(
                "reference of {} bytes: at most {MAX_REFERENCE}",
                self.reference_max
            )));
        }
        if !(1..=64).contains(&self.threads) {
            return Err(DeltaError::InvalidOptions(format!(
                "{} compression threads: must be from 1 to 64",
                self.threads
            )));
        }
        Ok(())
    }
}

/// What a build produced and where B's bytes came from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeltaStats {
    /// Size of A.
    pub from_size: u64,
    /// Size of B.
    pub to_size: u64,
    /// Size of the delta file (header, body, trailer).
    pub delta_size: u64,
    /// Bytes of B copied from the same offset in A.
    pub same_offset_bytes: u64,
    /// Bytes of B copied from another offset of A (moved blocks, shifted content) or from
    /// B's own earlier bytes (`own_bytes` of them).
    pub moved_bytes: u64,
    /// Of the moved bytes, those copied from B's own earlier bytes (repeated new data).
    pub own_bytes: u64,
    /// Bytes of B that are zero (holes in the output).
    pub zero_bytes: u64,
    /// Bytes of B carried as literals.
    pub literal_bytes: u64,
    /// Bytes the literal frames take in the delta.
    pub literal_stored_bytes: u64,
    /// Literal frames compressed against a reference (regions of A they resemble).
    pub referenced_frames: u64,
    /// Bytes of A those references hold, summed over the frames.
    pub reference_bytes: u64,
    /// Of the reference bytes, those from the output already written (B before the
    /// frame's records) rather than from A.
    pub output_reference_bytes: u64,
    /// Of the copied bytes, those found byte-wise (copy extension, rolling search).
    pub shifted_match_bytes: u64,
    /// Operations in the body (COPY, ZERO, DATA).
    pub ops: u64,
    /// Literal frames in the body.
    pub frames: u64,
    /// Distinct non-zero blocks of A in the index.
    pub index_blocks: u64,
    /// Memory held by the index, in bytes.
    pub index_memory: u64,
    /// Wall-clock time of the build.
    pub elapsed: Duration,
}

/// One output operation while building. `Data` points into B (its bytes become literal).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Copy {
        src: u64,
        len: u64,
    },
    /// Copy from B itself, from bytes before the op's own position.
    Own {
        src: u64,
        len: u64,
    },
    Zero {
        len: u64,
    },
    Data {
        start: u64,
        len: u64,
    },
}

/// Appends `op`, merging it into the previous op when both describe one contiguous run.
pub(crate) fn push_op(ops: &mut Vec<Op>, op: Op) {
    let empty = match op {
        Op::Copy { len, .. } | Op::Own { len, .. } | Op::Zero { len } | Op::Data { len, .. } => {
            len == 0
        }
    };
    if empty {
        return;
    }
    if let Some(last) = ops.last_mut() {
        match (last, op) {
            (Op::Copy { src, len }, Op::Copy { src: s2, len: l2 }) if *src + *len == s2 => {
                *len += l2;
                return;
            }
            (Op::Own { src, len }, Op::Own { src: s2, len: l2 }) if *src + *len == s2 => {
                *len += l2;
                return;
            }
            (Op::Zero { len }, Op::Zero { len: l2 }) => {
                *len += l2;
                return;
            }
            (Op::Data { start, len }, Op::Data { start: s2, len: l2 }) if *start + *len == s2 => {
                *len += l2;
                return;
            }
            _ => {}
        }
    }
    ops.push(op);
}

/// B is scanned in segments of this size (a multiple of every block size): the unit of
/// work handed to the encoder and of page release.
const SEGMENT: usize = 8 << 20;

/// Finds, for each segment of B, the ops that rebuild it from A.
struct Scanner<'s> {
    a: &'s Image<'s>,
    b: &'s Image<'s>,
    index: &'s BlockIndex,
    /// B's own aligned blocks that were not found in A, from the segments already
    /// scanned: later copies of new data (a file installed twice, metadata and the
    /// journal's copy of it) become copies from the output instead of literals.
    own: BlockIndex,
    /// Anchors of B's literal runs already scanned, for repeats at any alignment.
    own_anchors: OwnAnchors,
    poly: &'s PolyHash,
    block_size: usize,
    rolling: bool,
    rolling_max_run: usize,
    /// Bytes the rolling search went over since A's pages were last released.
    searched_since_release: std::cell::Cell<usize>,
}

/// How many bytes of B the rolling search may go over before A's pages it touched are
/// released (see `refine`).
const RELEASE_A_EVERY: usize = 1 << 20;

impl Scanner<'_> {
    /// Ops for `seg` (block-aligned start) and the number of bytes matched byte-wise.
    fn scan(&mut self, seg: Range<usize>) -> (Vec<Op>, u64) {
        let (coarse, new_blocks) = self.classify(seg);
        let (refined, shifted) = self.refine(coarse);
        // Literal runs that repeat earlier literal bytes at any alignment and distance.
        let b = self.b.bytes();
        let mut r = (Vec::with_capacity(refined.len()), shifted);
        for op in refined {
            match op {
                Op::Data { start, len } => {
                    let (s, e) = (start as usize, (start + len) as usize);
                    self.own_anchors.split_run(b, s, e, &mut r.0);
                }
                op => push_op(&mut r.0, op),
            }
        }
        // Indexed only now, so every source found in `own` lies before the segment.
        for (h, k) in new_blocks {
            self.own.add(h, k / self.block_size, b);
        }
        r
    }

    /// Block by block: zero, same offset in A, continuation of the previous copy (from A
    /// or from B itself), any aligned block of A (index), any earlier new block of B,
    /// else literal. Also returns (hash, offset) of the full literal blocks.
    fn classify(&self, seg: Range<usize>) -> (Vec<Op>, Vec<(u32, usize)>) {
        let a = self.a.bytes();
        let b = self.b.bytes();
        let bs = self.block_size;
        let mut ops = Vec::new();
        let mut new_blocks = Vec::new();
        // Where the next block would continue the last moved copy (in A, or in B).
        let mut next_src: Option<usize> = None;
        let mut next_own: Option<usize> = None;
        let mut k = seg.start;
        while k < seg.end {
            let end = (k + bs).min(seg.end);
            let len = (end - k) as u64;
            if self.b.is_hole(k as u64, end as u64) || is_zero(&b[k..end]) {
                push_op(&mut ops, Op::Zero { len });
                (next_src, next_own) = (None, None);
                k = end;
                continue;
            }
            let blk = &b[k..end];
            let n = blk.len();
            let mut h = None;
            let src = if end <= a.len()
                && !self.a.is_hole(k as u64, end as u64)
                && &a[k..end] == blk
            {
                Some(k)
            } else if let Some(s) = next_src.filter(|&s| s + n <= a.len() && &a[s..s + n] == blk) {
                Some(s)
            } else if n == bs {
                let hh = self.poly.hash(blk);
                h = Some(hh);
                self.index.find(hh, blk, a)
            } else {
                None
            };
            if let Some(s) = src {
                push_op(&mut ops, Op::Copy { src: s as u64, len });
                (next_src, next_own) = (Some(s + n), None);
                k = end;
                continue;
            }
            let own = if let Some(s) = next_own.filter(|&s| s + n <= k && &b[s..s + n] == blk) {
                Some(s)
            } else {
                h.and_then(|hh| self.own.find(hh, blk, b))
            };
            match own {
                Some(s) => {
                    push_op(&mut ops, Op::Own { src: s as u64, len });
                    (next_src, next_own) = (None, Some(s + n));
                }
                None => {
                    push_op(
                        &mut ops,
                        Op::Data {
                            start: k as u64,
                            len,
                        },
                    );
                    if let Some(hh) = h {
                        new_blocks.push((hh, k));
                    }
                    (next_src, next_own) = (None, None);
                }
            }
            k = end;
        }
        (ops, new_blocks)
    }

    /// Shrinks literal runs: the copy (or zero run) before a literal run is extended
    /// forward byte by byte, the one after it backward, and what is left is searched for
    /// shifted blocks of A.
    fn refine(&self, mut coarse: Vec<Op>) -> (Vec<Op>, u64) {
        let a = self.a.bytes();
        let b = self.b.bytes();
        let mut out = Vec::with_capacity(coarse.len());
        let mut shifted = 0u64;
        let mut tail: Option<Op> = None;
        // Offset in A as far from A's end as `x` is from B's end.
        let end_aligned = |x: usize| (x + a.len()).checked_sub(b.len());
        for i in 0..coarse.len() {
            let op = coarse[i];
            let Op::Data { start, len } = op else {
                push_op(&mut out, op);
                continue;
            };
            let (mut s, mut e) = (start as usize, (start + len) as usize);
            // Forward: continue the previous copy, or A at the same offset (an edit
            // inside a block leaves its head in place), or the previous zero run.
            let cont = match out.last() {
                Some(&Op::Copy { src, len }) => Some((src + len) as usize),
                _ => None,
            };
            let (ext_src, ext) = best_prefix(&b[s..e], a, cont, s, end_aligned(s));
            let zeros = if matches!(out.last(), Some(Op::Zero { .. })) {
                zero_prefix(&b[s..e])
            } else {
                0
            };
            if zeros > ext {
                push_op(&mut out, Op::Zero { len: zeros as u64 });
                s += zeros;
            } else if ext > 0 {
                push_op(
                    &mut out,
                    Op::Copy {
                        src: ext_src as u64,
                        len: ext as u64,
                    },
                );
                shifted += ext as u64;
                s += ext;
            }
            // Backward: the next copy or zero run grows down into the run, or A at the
            // same offset supplies its tail.
            if s < e {
                let next = coarse.get_mut(i + 1);
                let to = match next.as_deref() {
                    Some(&Op::Copy { src, .. }) => Some(src as usize),
                    _ => None,
                };
                let (ext_end, ext) = best_suffix(&b[s..e], a, to, e, end_aligned(e));
                let zeros = if matches!(next.as_deref(), Some(Op::Zero { .. })) {
                    zero_suffix(&b[s..e])
                } else {
                    0
                };
                match next {
                    Some(Op::Zero { len }) if zeros >= ext && zeros > 0 => {
                        *len += zeros as u64;
                        e -= zeros;
                    }
                    Some(Op::Copy { src, len }) if ext > 0 && Some(ext_end) == to => {
                        *src -= ext as u64;
                        *len += ext as u64;
                        shifted += ext as u64;
                        e -= ext;
                    }
                    _ if ext > 0 => {
                        // Same-offset tail: split it off as its own copy after the rest.
                        tail = Some(Op::Copy {
                            src: (ext_end - ext) as u64,
                            len: ext as u64,
                        });
                        shifted += ext as u64;
                        e -= ext;
                    }
                    _ => {}
                }
            }
            if s < e {
                let run = e - s;
                if self.rolling
                    && run >= self.block_size
                    && run <= self.rolling_max_run
                    && self.index.len() + self.own.len() > 0
                {
                    shifted += self.rolling_search(s, e, &mut out);
                    // Each candidate the search confirms touches a page of A somewhere:
                    // 8 MiB of search kept up to 65 MiB of A mapped (resident) until the
                    // segment's end. Dropped every MiB searched instead.
                    let searched = self.searched_since_release.get() + run;
                    if searched >= RELEASE_A_EVERY {
                        self.a.release_all();
                        self.searched_since_release.set(0);
                    } else {
                        self.searched_since_release.set(searched);
                    }
                } else {
                    push_op(
                        &mut out,
                        Op::Data {
                            start: s as u64,
                            len: (e - s) as u64,
                        },
                    );
                }
            }
            if let Some(t) = tail.take() {
                push_op(&mut out, t);
            }
        }
        (out, shifted)
    }

    /// The hot loop of the rolling search: slides the window over `w` (whose first
    /// `block_size` bytes hash to `h`) until the filter lets a position through.
    /// Returns (window start relative to `w`, its hash), or None at the end of `w`.
    #[inline]
    fn next_candidate(&self, mut h: u32, w: &[u8]) -> Option<(usize, u32)> {
        let bs = self.block_size;
        let (outs, ins) = (&w[..w.len() - bs], &w[bs..]);
        for (k, (&o, &i)) in outs.iter().zip(ins).enumerate() {
            h = self.poly.roll(h, o, i);
            if self.index.may_contain(h) || self.own.may_contain(h) {
                return Some((k + 1, h));
            }
        }
        None
    }

    /// The window of B at `p` (hash `h`) in A's index, else in B's own: the copy grown
    /// backward (not before `lit`) and forward (not past `e`; a copy from B ends before
    /// its destination starts). Returns (destination start, length, op).
    fn match_at(&self, p: usize, h: u32, lit: usize, e: usize) -> Option<(usize, usize, Op)> {
        let a = self.a.bytes();
        let b = self.b.bytes();
        let bs = self.block_size;
        let win = &b[p..p + bs];
        if self.index.may_contain(h) {
            if let Some(off) = self.index.find(h, win, a) {
                let back = common_suffix(&b[lit..p], &a[..off]);
                let fwd = common_prefix(&b[p + bs..e], &a[off + bs..]);
                let len = back + bs + fwd;
                let op = Op::Copy {
                    src: (off - back) as u64,
                    len: len as u64,
                };
                return Some((p - back, len, op));
            }
        }
        if self.own.may_contain(h) {
            if let Some(off) = self.own.find(h, win, b) {
                let back = common_suffix(&b[lit..p], &b[..off]);
                let start = p - back;
                // Source end (off + bs + fwd) stays at or before the destination start.
                let room = start.saturating_sub(off + bs);
                let fwd = common_prefix(&b[p + bs..e], &b[off + bs..off + bs + room]);
                let len = back + bs + fwd;
                if off + bs <= start {
                    let op = Op::Own {
                        src: (off - back) as u64,
                        len: len as u64,
                    };
                    return Some((start, len, op));
                }
            }
        }
        None
    }

    /// rsync-style: slide a block-sized window over B[s..e) one byte at a time; where its
    /// rolling hash hits the index and the bytes match, copy from A, extended backward
    /// and forward as far as the bytes agree. Returns the bytes matched.
    fn rolling_search(&self, s: usize, e: usize, out: &mut Vec<Op>) -> u64 {
        let b = self.b.bytes();
        let bs = self.block_size;
        let mut lit = s;
        let mut p = s;
        let mut matched = 0u64;
        'windows: while e - p >= bs {
            let mut h = self.poly.hash(&b[p..p + bs]);
            loop {
                if let Some((m_start, m_len, op)) = self.match_at(p, h, lit, e) {
                    push_op(
                        out,
                        Op::Data {
                            start: lit as u64,
                            len: (m_start - lit) as u64,
                        },
                    );
                    push_op(out, op);
                    matched += m_len as u64;
                    p = m_start + m_len;
                    lit = p;
                    continue 'windows;
                }
                match self.next_candidate(h, &b[p..e]) {
                    Some((step, h2)) => {
                        p += step;
                        h = h2;
                    }
                    None => break 'windows,
                }
            }
        }
        push_op(
            out,
            Op::Data {
                start: lit as u64,
                len: (e - lit) as u64,
            },
        );
        matched
    }
}

/// The longest of: the bytes of `run` that continue A at `cont`, those that equal A at
/// the run's own offset `at`, and those that equal A at the same distance from its end
/// (what an insertion or deletion in a small file does to the bytes after it).
/// Returns (source offset in A, length).
fn best_prefix(
    run: &[u8],
    a: &[u8],
    cont: Option<usize>,
    at: usize,
    from_end: Option<usize>,
) -> (usize, usize) {
    let mut best = (0, 0);
    for src in cont.into_iter().chain(Some(at)).chain(from_end) {
        if src < a.len() {
            let n = common_prefix(run, &a[src..]);
            if n > best.1 {
                best = (src, n);
            }
        }
    }
    best
}

/// Mirror of `best_prefix` for the end of a run: the bytes of `run` that precede A at
/// `to`, or that equal A at the run's own end offset `end`. Returns (end offset in A,
/// length); on a tie the next copy (`to`) wins so it can simply grow.
fn best_suffix(
    run: &[u8],
    a: &[u8],
    to: Option<usize>,
    end: usize,
    from_end: Option<usize>,
) -> (usize, usize) {
    let mut best = (0, 0);
    for stop in to.into_iter().chain(Some(end)).chain(from_end) {
        if stop <= a.len() {
            let n = common_suffix(run, &a[..stop]);
            if n > best.1 {
                best = (stop, n);
            }
        }
    }
    best
}

/// A group (one literal frame and the instruction block that consumes it) is closed
/// past this many ops, so the encoder's memory and the decoder's instruction block stay
/// bounded (65536 records of at most 21 bytes fit `MAX_OPS_BLOCK`).
const MAX_PENDING_OPS: usize = 1 << 16;
/// zstd level of the instruction blocks: they are small, so the strongest level is cheap.
const OPS_LEVEL: i32 = 19;

/// Counters the encoder keeps.
#[derive(Debug, Default)]
struct EncStats {
    body_len: u64,
    same_offset: u64,
    moved: u64,
    own: u64,
    zero: u64,
    literal: u64,
    literal_stored: u64,
    referenced_frames: u64,
    reference_bytes: u64,
    output_reference_bytes: u64,
    ops: u64,
    frames: u64,
}

/// One literal frame and the encoded records that consume it, ready to be compressed.
/// The frame is named by where its bytes lie in B (`(start, len)` runs, in order): the
/// worker copies them when it starts, so only the frames being compressed are in memory.
struct Group {
    spans: Vec<(usize, usize)>,
    /// Output position where the group's records start: what the decoder has written
    /// when it reads the frame.
    out_start: u64,
    lit_len: usize,
    ops: Vec<u8>,
}

/// A compressed group: its records, how many of its bytes are the literal frame, and
/// how many bytes of A the frame was compressed against (0: none).
struct Packed {
    bytes: Vec<u8>,
    lit_stored: u64,
    reference: u64,
    /// Of `reference`, the bytes from B's earlier output.
    output_reference: u64,
}

/// What a compression worker needs to compress frames against A.
#[derive(Clone)]
struct RefSource<'a> {
    a: &'a Image<'a>,
    b: &'a Image<'a>,
    anchors: Arc<AnchorIndex>,
    /// B's anchors: the output a frame's decoder has already written (B before the
    /// group's first byte) can be part of its reference too.
    own: Arc<AnchorIndex>,
    budget: usize,
}

/// Compresses a literal frame at `level` against a reference: `buf` holds the reference
/// (possibly empty), then the frame (`buf[..ref_len]`, `buf[ref_len..]`); the reference
/// is zstd's reference prefix, the window spans both (at least the frame, at most
/// 2^`REFERENCE_WINDOW_LOG_MAX`), long-distance matching on from `LONG_FROM_LEVEL`.
///
/// With the prefix right before the frame in memory, zstd searches one contiguous
/// window instead of two segments: on issue 22's v1→v2 images that took the build from
/// 27.7 to 25.5 CPU seconds, with the same delta to a few bytes.
fn compress_literal(buf: &[u8], ref_len: usize, level: i32) -> Result<Vec<u8>, DeltaError> {
    use zstd::zstd_safe::{get_error_name, CCtx, CParameter};
    let fail = |code| DeltaError::Internal(format!("zstd: {}", get_error_name(code)));
    let mut c = CCtx::try_create()
        .ok_or_else(|| DeltaError::Internal("cannot create a zstd compressor".into()))?;
    let (reference, lit) = buf.split_at(ref_len);
    let wlog = bits_for(buf.len(), 20).min(REFERENCE_WINDOW_LOG_MAX);
    c.set_parameter(CParameter::CompressionLevel(level))
        .map_err(fail)?;
    c.set_parameter(CParameter::WindowLog(wlog)).map_err(fail)?;
    if CAPPED_CHAIN_LEVELS.contains(&level) {
        c.set_parameter(CParameter::ChainLog(CAPPED_CHAIN_LOG))
            .map_err(fail)?;
    }
    if level >= LONG_FROM_LEVEL {
        c.set_parameter(CParameter::EnableLongDistanceMatching(true))
            .map_err(fail)?;
    }
    if !reference.is_empty() {
        c.ref_prefix(reference).map_err(fail)?;
    }
    let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(lit.len()));
    c.compress2(&mut out, lit).map_err(fail)?;
    Ok(out)
}

/// At these levels zstd's chain table has 2^23 entries (32 MiB a worker); capped at
/// 2^`CAPPED_CHAIN_LOG`: on the real images of issue 22 at level 18 that cost 0.5 % in
/// size and saved 13 % of the build time and 32 MiB of peak memory with two workers.
const CAPPED_CHAIN_LEVELS: std::ops::RangeInclusive<i32> = 17..=19;
const CAPPED_CHAIN_LOG: u32 = 22;

/// The compressor of the x86 filter's trial: zstd level 3 with a window over the frame
/// and long-distance matching (whether the filter helps depends on far repeats).
fn trial_compressor(frame_size: usize) -> Result<zstd::bulk::Compressor<'static>, DeltaError> {
    use zstd::zstd_safe::CParameter;
    let zerr = |source| DeltaError::Zstd { op: "init", source };
    let mut c = zstd::bulk::Compressor::new(3).map_err(zerr)?;
    let wlog = bits_for(frame_size, 20).min(26);
    c.set_parameter(CParameter::WindowLog(wlog)).map_err(zerr)?;
    c.set_parameter(CParameter::EnableLongDistanceMatching(true))
        .map_err(zerr)?;
    Ok(c)
}

/// Of a frame's reference budget, the most that ranges of B's earlier output may take
/// (the rest is for A): an eighth, 2 MiB by default. On issue 22's v2→v3 images, where
/// new programs share much code with programs installed a few MiB earlier, that made the
/// delta 2.1 % smaller (18.05 → 17.67 MB); half the budget gained 0.1 % more but took
/// the peak memory of v1→v3 from 232 to 254-261 MiB.
fn own_reference_budget(budget: usize) -> usize {
    budget / 8
}

/// Levels from which literal frames also use zstd's long-distance matcher.
const LONG_FROM_LEVEL: i32 = 3;

/// Compresses one group into its records: the literal frame (LIT_ZSTD_EX: x86 branch
/// filter, and the regions of A it resembles as reference; LIT_RAW when zstd does not
/// make it smaller), then OPS_ZSTD with the instruction block.
fn pack(
    ops_comp: &mut zstd::bulk::Compressor<'static>,
    trial: &mut zstd::bulk::Compressor<'static>,
    refs: &RefSource<'_>,
    level: i32,
    g: Group,
) -> Result<Packed, DeltaError> {
    let zerr = |source| DeltaError::Zstd {
        op: "compress",
        source,
    };
    let mut out = Vec::new();
    let mut lit_stored = 0;
    let mut reference_len = 0;
    let mut output_reference = 0;
    if g.lit_len > 0 {
        let mut buf: Vec<u8> = Vec::new();
        buf.try_reserve_exact(g.lit_len)
            .map_err(|e| DeltaError::Internal(format!("cannot allocate a literal frame: {e}")))?;
        let b = refs.b.bytes();
        for &(s, l) in &g.spans {
            buf.extend_from_slice(&b[s..s + l]);
        }
        // The encoder and the scanner are past these pages.
        if let (Some(first), Some(last)) = (g.spans.first(), g.spans.last()) {
            refs.b.release(first.0, last.0 + last.1);
        }
        let own_budget = own_reference_budget(refs.budget);
        let ranges = if refs.budget > 0 {
            refs.anchors
                .reference(&buf, refs.a.bytes().len() as u64, refs.budget - own_budget)
        } else {
            Vec::new()
        };
        let own_ranges = if own_budget > 0 {
            refs.own.reference(&buf, g.out_start, own_budget)
        } else {
            Vec::new()
        };
        // The reference goes in front of the frame, in the same buffer (see
        // `compress_literal`): the frame moves up, the reference is copied below it:
        // ranges of A, then ranges of B's earlier output (nearest the frame).
        let ref_len: usize = ranges
            .iter()
            .chain(&own_ranges)
            .map(|&(_, len)| len as usize)
            .sum();
        if ref_len > 0 {
            buf.try_reserve_exact(ref_len)
                .map_err(|e| DeltaError::Internal(format!("cannot allocate a reference: {e}")))?;
            buf.resize(ref_len + g.lit_len, 0);
            buf.copy_within(..g.lit_len, ref_len);
            let mut at = 0;
            for (img, list) in [(refs.a, &ranges), (refs.b, &own_ranges)] {
                for &(src, len) in list {
                    let (s, e) = (src as usize, (src + len) as usize);
                    buf[at..at + (e - s)].copy_from_slice(&img.bytes()[s..e]);
                    img.release(s, e);
                    at += e - s;
                }
            }
        }
        let lit = &mut buf[ref_len..];
        // The x86 filter makes the calls of one function alike, but it also makes two
        // copies of one code at different places differ (their absolute targets
        // differ), which costs more on some frames (git's programs share much code):
        // a fast trial compression with and without it decides.
        let t0 = std::time::Instant::now();
        let plain = trial.compress(lit).map_err(zerr)?.len();
        x86_encode(lit);
        let filtered = trial.compress(lit).map_err(zerr)?.len();
        let x86 = filtered < plain;
        if !x86 {
            x86_decode(lit);
        }
        let t1 = std::time::Instant::now();
        let packed = compress_literal(&buf, ref_len, level)?;
        tracing::debug!(
            literal = g.lit_len,
            reference = ref_len,
            packed = packed.len(),
            x86,
            trial_ms = (t1 - t0).as_millis() as u64,
            compress_ms = t1.elapsed().as_millis() as u64,
            "literal frame compressed"
        );
        let lit = &mut buf[ref_len..];
        if packed.len() < lit.len() {
            let mut flags = if x86 { LIT_FLAG_X86 } else { 0 };
            if !ranges.is_empty() {
                flags |= LIT_FLAG_REFERENCE;
            }
            if !own_ranges.is_empty() {
                flags |= LIT_FLAG_OUT_REFERENCE;
            }
            out.push(TAG_LIT_ZSTD_EX);
            put_varint(&mut out, lit.len() as u64);
            put_varint(&mut out, flags);
            for list in [&ranges, &own_ranges] {
                if !list.is_empty() {
                    put_ranges(&mut out, list);
                }
            }
            put_varint(&mut out, packed.len() as u64);
            out.extend_from_slice(&packed);
            reference_len = ref_len as u64;
            output_reference = own_ranges.iter().map(|&(_, len)| len).sum();
        } else {
            if x86 {
                x86_decode(lit);
            }
            out.push(TAG_LIT_RAW);
            put_varint(&mut out, lit.len() as u64);
            out.extend_from_slice(lit);
        }
        lit_stored = out.len() as u64;
    }
    if !g.ops.is_empty() {
        let packed = ops_comp.compress(&g.ops).map_err(zerr)?;
        out.push(TAG_OPS_ZSTD);
        put_varint(&mut out, g.ops.len() as u64);
        put_varint(&mut out, packed.len() as u64);
        out.extend_from_slice(&packed);
    }
    Ok(Packed {
        bytes: out,
        lit_stored,
        reference: reference_len,
        output_reference,
    })
}

/// A group handed to the compression workers, with where to send the result.
type Job = (Group, SyncSender<Result<Packed, DeltaError>>);

/// Turns ops into groups, has the workers compress them, and writes the results in
/// order. Literal bytes collect in a frame; the records that consume a frame go into the
/// instruction block written right after it, so a decoder holds one frame at a time.
struct Encoder<W: Write> {
    w: W,
    spans: Vec<(usize, usize)>,
    lit_len: usize,
    pending: Vec<Op>,
    frame_size: usize,
    jobs: SyncSender<Job>,
    in_flight: VecDeque<Receiver<Result<Packed, DeltaError>>>,
    max_in_flight: usize,
    out_pos: u64,
    st: EncStats,
}

impl<W: Write> Encoder<W> {
    fn push(&mut self, op: Op) -> Result<(), DeltaError> {
        match op {
            Op::Data { mut start, mut len } => {
                while len > 0 {
                    let room = (self.frame_size - self.lit_len) as u64;
                    let take = room.min(len);
                    let (s, t) = (start as usize, take as usize);
                    match self.spans.last_mut() {
                        Some((s0, l0)) if *s0 + *l0 == s => *l0 += t,
                        _ => self.spans.push((s, t)),
                    }
                    self.lit_len += t;
                    push_op(&mut self.pending, Op::Data { start, len: take });
                    start += take;
                    len -= take;
                    if self.lit_len >= self.frame_size {
                        self.close_group()?;
                    }
                }
            }
            Op::Copy { .. } | Op::Own { .. } | Op::Zero { .. } => {
                push_op(&mut self.pending, op);
                if self.pending.len() >= MAX_PENDING_OPS {
                    self.close_group()?;
                }
            }
        }
        Ok(())
    }

    /// Encodes the pending ops, hands the group to a worker, and writes finished groups
    /// while too many are in flight.
    fn close_group(&mut self) -> Result<(), DeltaError> {
        if self.lit_len == 0 && self.pending.is_empty() {
            return Ok(());
        }
        let mut ops = Vec::with_capacity(self.pending.len() * 8);
        let out_start = self.out_pos;
        for op in std::mem::take(&mut self.pending) {
            self.encode_op(op, &mut ops);
        }
        if self.lit_len > 0 {
            self.st.frames += 1;
        }
        let group = Group {
            out_start,
            spans: std::mem::take(&mut self.spans),
            lit_len: std::mem::take(&mut self.lit_len),
            ops,
        };
        let (tx, rx) = sync_channel(1);
        self.jobs
            .send((group, tx))
            .map_err(|_| DeltaError::Internal("delta compression workers stopped".into()))?;
        self.in_flight.push_back(rx);
        while self.in_flight.len() > self.max_in_flight {
            self.write_oldest()?;
        }
        Ok(())
    }

    fn write_oldest(&mut self) -> Result<(), DeltaError> {
        let Some(rx) = self.in_flight.pop_front() else {
            return Ok(());
        };
        let packed = rx
            .recv()
            .map_err(|_| DeltaError::Internal("a delta compression worker died".into()))??;
        self.st.literal_stored += packed.lit_stored;
        if packed.reference > 0 {
            self.st.referenced_frames += 1;
            self.st.reference_bytes += packed.reference;
            self.st.output_reference_bytes += packed.output_reference;
        }
        self.st.body_len += packed.bytes.len() as u64;
        write(&mut self.w, &packed.bytes)
    }

    fn encode_op(&mut self, op: Op, rec: &mut Vec<u8>) {
        match op {
            Op::Copy { src, len } => {
                rec.push(TAG_COPY);
                put_varint(rec, src);
                put_varint(rec, len);
                if src == self.out_pos {
                    self.st.same_offset += len;
                } else {
                    self.st.moved += len;
                }
                self.out_pos += len;
            }
            Op::Own { src, len } => {
                rec.push(TAG_COPY_OUT);
                put_varint(rec, src);
                put_varint(rec, len);
                self.st.moved += len;
                self.st.own += len;
                self.out_pos += len;
            }
            Op::Zero { len } => {
                rec.push(TAG_ZERO);
                put_varint(rec, len);
                self.st.zero += len;
                self.out_pos += len;
            }
            Op::Data { len, .. } => {
                rec.push(TAG_DATA);
                put_varint(rec, len);
                self.st.literal += len;
                self.out_pos += len;
            }
        }
        self.st.ops += 1;
    }

    fn finish(mut self) -> Result<(W, EncStats), DeltaError> {
        self.close_group()?;
        while !self.in_flight.is_empty() {
            self.write_oldest()?;
        }
        write(&mut self.w, &[TAG_END])?;
        self.st.body_len += 1;
        self.w
            .flush()
            .map_err(|e| DeltaError::io("write", "delta body", e))?;
        Ok((self.w, self.st))
    }
}

/// A compression worker: takes groups from the shared queue until it closes.
fn compress_worker(
    jobs: &Mutex<Receiver<Job>>,
    opts: &BuildOptions,
    refs: &RefSource<'_>,
) -> Result<(), DeltaError> {
    let mut ops_comp = zstd::bulk::Compressor::new(OPS_LEVEL)
        .map_err(|source| DeltaError::Zstd { op: "init", source })?;
    let mut trial = trial_compressor(opts.frame_size)?;
    loop {
        let job = match jobs.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return Err(DeltaError::Internal("delta job queue poisoned".into())),
        };
        let Ok((group, reply)) = job else {
            return Ok(());
        };
        // The encoder may have stopped on an error; then nobody waits for this reply.
        let _ = reply.send(pack(&mut ops_comp, &mut trial, refs, opts.level, group));
    }
}

fn write<W: Write>(w: &mut W, bytes: &[u8]) -> Result<(), DeltaError> {
    w.write_all(bytes)
        .map_err(|e| DeltaError::io("write", "delta body", e))
}

/// What `build_body` hands back besides the writer.
pub(crate) struct BodyOutcome {
    pub(crate) from_sha256: [u8; 32],
    pub(crate) to_sha256: [u8; 32],
    pub(crate) body_len: u64,
    pub(crate) stats: DeltaStats,
}

/// Writes the record body for A → B into `w` and hashes both inputs.
pub(crate) fn build_body<W: Write + Send>(
    a: &Image<'_>,
    b: &Image<'_>,
    opts: &BuildOptions,
    w: W,
) -> Result<(W, BodyOutcome), DeltaError> {
    opts.validate()?;
    let bs = opts.block_size;
    if a.bytes().len() / bs >= u32::MAX as usize {
        return Err(DeltaError::InvalidOptions(format!(
            "base has more than 2^32 blocks of {bs} bytes; use a larger block size"
        )));
    }
    let (job_tx, job_rx) = sync_channel::<Job>(0);
    let job_rx = Mutex::new(job_rx);
    std::thread::scope(|scope| {
        // SHA-256 is sequential per file and, on sparse images, mostly spent on the
        // zeros of the holes: one thread per input.
        let hash_a = scope.spawn(|| a.sha256());
        let hash_b = scope.spawn(|| b.sha256());

        // B's anchors, for references into the output already written, indexed while
        // A's indexes are built.
        let own_index = (own_reference_budget(opts.reference_max) > 0).then(|| {
            scope.spawn(|| {
                let idx = AnchorIndex::build(b, |done| b.release(0, done));
                b.release_all();
                idx
            })
        });
        let poly = PolyHash::new(bs);
        let index = BlockIndex::build(a, &poly, bs, |done| a.release(0, done));
        a.release_all();
        let anchors = if opts.reference_max > 0 {
            AnchorIndex::build(a, |done| a.release(0, done))
        } else {
            AnchorIndex::empty()
        };
        a.release_all();
        let own_anchors = OwnAnchors::new(b.bytes().len());
        tracing::debug!(
            own_anchor_bytes = own_anchors.memory(),
            blocks = index.len(),
            bytes = index.memory(),
            anchors = anchors.len(),
            anchor_bytes = anchors.memory(),
            "base indexed"
        );
        let own = match own_index {
            Some(h) => h
                .join()
                .map_err(|_| DeltaError::Internal("indexing thread panicked".into()))?,
            None => AnchorIndex::empty(),
        };
        let refs = RefSource {
            own: Arc::new(own),
            a,
            b,
            anchors: Arc::new(anchors),
            budget: opts.reference_max,
        };

        let (tx, rx) = sync_channel::<Vec<Op>>(2);
        let b_bytes = b.bytes();
        let workers: Vec<_> = (0..opts.threads)
            .map(|_| {
                let (job_rx, refs) = (&job_rx, refs.clone());
                scope.spawn(move || compress_worker(job_rx, opts, &refs))
            })
            .collect();
        let encoder = scope.spawn(move || -> Result<(W, EncStats), DeltaError> {
            let mut enc = Encoder {
                w,
                spans: Vec::new(),
                lit_len: 0,
                pending: Vec::new(),
                frame_size: opts.frame_size,
                jobs: job_tx,
                in_flight: VecDeque::new(),
                max_in_flight: opts.threads,
                out_pos: 0,
                st: EncStats::default(),
            };
            for ops in rx {
                for op in ops {
                    enc.push(op)?;
                }
            }
            enc.finish()
            // `enc` and with it the job sender are dropped here: the workers end.
        });

        let mut scanner = Scanner {
            a,
            b,
            index: &index,
            own: BlockIndex::with_capacity(b.bytes().len() / bs, bs),
            own_anchors,
            poly: &poly,
            block_size: bs,
            rolling: opts.rolling,
            rolling_max_run: opts.rolling_max_run,
            searched_since_release: std::cell::Cell::new(0),
        };
        let mut shifted = 0u64;
        let mut seg_start = 0usize;
        let b_len = b_bytes.len();
        while seg_start < b_len {
            let seg_end = (seg_start + SEGMENT).min(b_len);
            let (ops, sh) = scanner.scan(seg_start..seg_end);
            shifted += sh;
            // The scan is done with B's pages up to here (the workers map the literal
            // bytes back in when they copy them, and drop them after); A's pages were
            // touched at random and are all dropped. Before the send, which waits while
            // the workers are busy: pages kept over that wait (this segment, B's earlier
            // bytes its search compared, A's matches) made up to 96 MiB of the peak RSS.
            b.release(0, seg_end);
            a.release_all();
            if tx.send(ops).is_err() {
                break; // the encoder stopped; its error is reported below
            }
            seg_start = seg_end;
        }
        drop(tx);
        tracing::debug!("scan of the target done");
        let enc = encoder
            .join()
            .map_err(|_| DeltaError::Internal("delta encoder thread panicked".into()))?;
        for wk in workers {
            wk.join()
                .map_err(|_| DeltaError::Internal("delta compression worker panicked".into()))??;
        }
        let hashed = |h: std::thread::ScopedJoinHandle<'_, std::io::Result<[u8; 32]>>| {
            h.join()
                .map_err(|_| DeltaError::Internal("hashing thread panicked".into()))?
                .map_err(|e| DeltaError::io("read", "input image", e))
        };
        let from_sha256 = hashed(hash_a)?;
        let to_sha256 = hashed(hash_b)?;
        let (w, st) = enc?;
        a.release_all();
        b.release_all();
        let stats = DeltaStats {
            from_size: a.bytes().len() as u64,
            to_size: b_len as u64,
            delta_size: 0,
            same_offset_bytes: st.same_offset,
            moved_bytes: st.moved,
            own_bytes: st.own,
            zero_bytes: st.zero,
            literal_bytes: st.literal,
            literal_stored_bytes: st.literal_stored,
            referenced_frames: st.referenced_frames,
            reference_bytes: st.reference_bytes,
            output_reference_bytes: st.output_reference_bytes,
            shifted_match_bytes: shifted,
            ops: st.ops,
            frames: st.frames,
            index_blocks: index.len() as u64,
            index_memory: index.memory() as u64,
            elapsed: Duration::ZERO,
        };
        Ok((
            w,
            BodyOutcome {
                from_sha256,
                to_sha256,
                body_len: st.body_len,
                stats,
            },
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_op_merges_contiguous_runs_only() {
        let mut v = Vec::new();
        push_op(&mut v, Op::Copy { src: 0, len: 10 });
        push_op(&mut v, Op::Copy { src: 10, len: 5 });
        push_op(&mut v, Op::Copy { src: 100, len: 5 });
        push_op(&mut v, Op::Zero { len: 0 });
        push_op(&mut v, Op::Zero { len: 3 });
        push_op(&mut v, Op::Zero { len: 4 });
        push_op(&mut v, Op::Data { start: 50, len: 2 });
        push_op(&mut v, Op::Data { start: 52, len: 2 });
        push_op(&mut v, Op::Data { start: 60, len: 2 });
        assert_eq!(
            v,
            vec![
                Op::Copy { src: 0, len: 15 },
                Op::Copy { src: 100, len: 5 },
                Op::Zero { len: 7 },
                Op::Data { start: 50, len: 4 },
                Op::Data { start: 60, len: 2 },
            ]
        );
    }

    #[test]
    fn options_validated() {
        let mut o = BuildOptions::default();
        assert!(o.validate().is_ok());
        o.block_size = 3000;
        assert!(o.validate().is_err());
        o = BuildOptions {
            level: 0,
            ..Default::default()
        };
        assert!(o.validate().is_err());
        o = BuildOptions {
            frame_size: MAX_FRAME_V2 + 1,
            ..Default::default()
        };
        assert!(o.validate().is_err());
        o = BuildOptions {
            threads: 0,
            ..Default::default()
        };
        assert!(o.validate().is_err());
    }
}
