//! Building a delta: index A's aligned blocks, classify B's aligned blocks (zero, same
//! offset, moved, literal), refine literal runs byte-wise (extend neighbouring copies and
//! zero runs, rolling search for content shifted by non-multiples of the block size), and
//! encode the ops with zstd-compressed literal frames. Applying lives in `apply`.
//!
//! Threads: one hashes A then B with SHA-256 (sequential reads, holes not read), the
//! caller's thread indexes A and scans B segment by segment, one encodes and compresses.

use std::io::Write;
use std::ops::Range;
use std::sync::mpsc::sync_channel;
use std::time::Duration;

use crate::format::{put_varint, TAG_COPY, TAG_DATA, TAG_END, TAG_LIT_RAW, TAG_LIT_ZSTD, TAG_ZERO};
use crate::image::Image;
use crate::index::{
    common_prefix, common_suffix, is_zero, zero_prefix, zero_suffix, BlockIndex, PolyHash,
};
use crate::{DeltaError, MAX_FRAME};

/// How to build a delta. `Default` is what `bids delta build` uses.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Size of the aligned blocks A is indexed by and B is scanned in. A power of two
    /// from 512 to 1 MiB; default 4096 (the ext4 block size).
    pub block_size: usize,
    /// zstd level of literal frames (1..=22); default 3.
    pub level: i32,
    /// Byte-by-byte rolling search of literal runs for blocks of A shifted by a
    /// non-multiple of the block size (rsync-style); default on.
    pub rolling: bool,
    /// Literal runs longer than this are not searched byte-wise (long runs of new bytes
    /// are new files, where the search costs time and finds nothing); default 4 MiB.
    pub rolling_max_run: usize,
    /// Uncompressed size of one literal frame, 64 KiB ..= 16 MiB; default 4 MiB.
    pub frame_size: usize,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            block_size: 4096,
            level: 3,
            rolling: true,
            rolling_max_run: 4 << 20,
            frame_size: 4 << 20,
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
        if !(64 << 10..=MAX_FRAME).contains(&self.frame_size) {
            return Err(DeltaError::InvalidOptions(format!(
                "frame size {} must be from 65536 to {MAX_FRAME}",
                self.frame_size
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
    /// Bytes of B copied from another offset of A (moved blocks, shifted content).
    pub moved_bytes: u64,
    /// Bytes of B that are zero (holes in the output).
    pub zero_bytes: u64,
    /// Bytes of B carried as literals.
    pub literal_bytes: u64,
    /// Bytes the literal frames take in the delta.
    pub literal_stored_bytes: u64,
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
    Copy { src: u64, len: u64 },
    Zero { len: u64 },
    Data { start: u64, len: u64 },
}

/// Appends `op`, merging it into the previous op when both describe one contiguous run.
fn push_op(ops: &mut Vec<Op>, op: Op) {
    let empty = match op {
        Op::Copy { len, .. } | Op::Zero { len } | Op::Data { len, .. } => len == 0,
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
    poly: &'s PolyHash,
    block_size: usize,
    rolling: bool,
    rolling_max_run: usize,
}

impl Scanner<'_> {
    /// Ops for `seg` (block-aligned start) and the number of bytes matched byte-wise.
    fn scan(&self, seg: Range<usize>) -> (Vec<Op>, u64) {
        let coarse = self.classify(seg);
        self.refine(coarse)
    }

    /// Block by block: zero, same offset in A, continuation of the previous moved copy,
    /// any aligned block of A (index), else literal.
    fn classify(&self, seg: Range<usize>) -> Vec<Op> {
        let a = self.a.bytes();
        let b = self.b.bytes();
        let bs = self.block_size;
        let mut ops = Vec::new();
        // Where in A the next block would continue the last moved copy.
        let mut next_src: Option<usize> = None;
        let mut k = seg.start;
        while k < seg.end {
            let end = (k + bs).min(seg.end);
            let len = (end - k) as u64;
            if self.b.is_hole(k as u64, end as u64) || is_zero(&b[k..end]) {
                push_op(&mut ops, Op::Zero { len });
                next_src = None;
                k = end;
                continue;
            }
            let blk = &b[k..end];
            let src =
                if end <= a.len() && !self.a.is_hole(k as u64, end as u64) && &a[k..end] == blk {
                    Some(k)
                } else if let Some(s) =
                    next_src.filter(|&s| s + blk.len() <= a.len() && &a[s..s + blk.len()] == blk)
                {
                    Some(s)
                } else if blk.len() == bs {
                    self.index.find(self.poly.hash(blk), blk, a)
                } else {
                    None
                };
            match src {
                Some(s) => {
                    push_op(&mut ops, Op::Copy { src: s as u64, len });
                    next_src = Some(s + blk.len());
                }
                None => {
                    push_op(
                        &mut ops,
                        Op::Data {
                            start: k as u64,
                            len,
                        },
                    );
                    next_src = None;
                }
            }
            k = end;
        }
        ops
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
                    && self.index.len() > 0
                {
                    shifted += self.rolling_search(s, e, &mut out);
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
            if self.index.may_contain(h) {
                return Some((k + 1, h));
            }
        }
        None
    }

    /// rsync-style: slide a block-sized window over B[s..e) one byte at a time; where its
    /// rolling hash hits the index and the bytes match, copy from A, extended backward
    /// and forward as far as the bytes agree. Returns the bytes matched.
    fn rolling_search(&self, s: usize, e: usize, out: &mut Vec<Op>) -> u64 {
        let a = self.a.bytes();
        let b = self.b.bytes();
        let bs = self.block_size;
        let mut lit = s;
        let mut p = s;
        let mut matched = 0u64;
        'windows: while e - p >= bs {
            let mut h = self.poly.hash(&b[p..p + bs]);
            loop {
                if self.index.may_contain(h) {
                    if let Some(off) = self.index.find(h, &b[p..p + bs], a) {
                        let back = common_suffix(&b[lit..p], &a[..off]);
                        let fwd = common_prefix(&b[p + bs..e], &a[off + bs..]);
                        let (m_start, m_src, m_len) = (p - back, off - back, back + bs + fwd);
                        push_op(
                            out,
                            Op::Data {
                                start: lit as u64,
                                len: (m_start - lit) as u64,
                            },
                        );
                        push_op(
                            out,
                            Op::Copy {
                                src: m_src as u64,
                                len: m_len as u64,
                            },
                        );
                        matched += m_len as u64;
                        p = m_start + m_len;
                        lit = p;
                        continue 'windows;
                    }
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

/// Ops waiting for the literal frame they read from are flushed (with an early, smaller
/// frame) past this many, so the encoder's memory stays bounded.
const MAX_PENDING_OPS: usize = 1 << 16;

/// Counters the encoder keeps.
#[derive(Debug, Default)]
struct EncStats {
    body_len: u64,
    same_offset: u64,
    moved: u64,
    zero: u64,
    literal: u64,
    literal_stored: u64,
    ops: u64,
    frames: u64,
}

/// Turns ops into body records. Literal bytes collect in a frame; the DATA ops that
/// consume a frame are written right after it, so a decoder needs one frame in memory.
struct Encoder<'b, W: Write> {
    w: W,
    b: &'b [u8],
    lit: Vec<u8>,
    pending: Vec<Op>,
    frame_size: usize,
    comp: zstd::bulk::Compressor<'static>,
    rec: Vec<u8>,
    out_pos: u64,
    st: EncStats,
}

impl<'b, W: Write> Encoder<'b, W> {
    fn new(w: W, b: &'b [u8], opts: &BuildOptions) -> Result<Self, DeltaError> {
        let comp = zstd::bulk::Compressor::new(opts.level)
            .map_err(|source| DeltaError::Zstd { op: "init", source })?;
        Ok(Encoder {
            w,
            b,
            lit: Vec::with_capacity(opts.frame_size),
            pending: Vec::new(),
            frame_size: opts.frame_size,
            comp,
            rec: Vec::with_capacity(64),
            out_pos: 0,
            st: EncStats::default(),
        })
    }

    fn push(&mut self, op: Op) -> Result<(), DeltaError> {
        match op {
            Op::Data { mut start, mut len } => {
                while len > 0 {
                    let room = (self.frame_size - self.lit.len()) as u64;
                    let take = room.min(len);
                    let (s, t) = (start as usize, take as usize);
                    self.lit.extend_from_slice(&self.b[s..s + t]);
                    push_op(&mut self.pending, Op::Data { start, len: take });
                    start += take;
                    len -= take;
                    if self.lit.len() >= self.frame_size {
                        self.flush_frame()?;
                    }
                }
            }
            Op::Copy { .. } | Op::Zero { .. } => {
                push_op(&mut self.pending, op);
                if self.lit.is_empty() && self.pending.len() > 1 {
                    // Nothing waits for literal bytes: write all but the last op, which
                    // the next one may still extend.
                    let keep = self.pending.len() - 1;
                    let ready: Vec<Op> = self.pending.drain(..keep).collect();
                    for op in ready {
                        self.write_op(op)?;
                    }
                } else if self.pending.len() >= MAX_PENDING_OPS {
                    self.flush_frame()?;
                }
            }
        }
        Ok(())
    }

    /// Writes the current literal frame (if any), then every pending op.
    fn flush_frame(&mut self) -> Result<(), DeltaError> {
        if !self.lit.is_empty() {
            let packed = self
                .comp
                .compress(&self.lit)
                .map_err(|source| DeltaError::Zstd {
                    op: "compress",
                    source,
                })?;
            self.rec.clear();
            let body: &[u8] = if packed.len() < self.lit.len() {
                self.rec.push(TAG_LIT_ZSTD);
                put_varint(&mut self.rec, self.lit.len() as u64);
                put_varint(&mut self.rec, packed.len() as u64);
                &packed
            } else {
                self.rec.push(TAG_LIT_RAW);
                put_varint(&mut self.rec, self.lit.len() as u64);
                &self.lit
            };
            self.st.literal_stored += (self.rec.len() + body.len()) as u64;
            self.st.body_len += (self.rec.len() + body.len()) as u64;
            self.st.frames += 1;
            write(&mut self.w, &self.rec)?;
            write(&mut self.w, body)?;
            self.lit.clear();
        }
        let ready = std::mem::take(&mut self.pending);
        for op in ready {
            self.write_op(op)?;
        }
        Ok(())
    }

    fn write_op(&mut self, op: Op) -> Result<(), DeltaError> {
        self.rec.clear();
        match op {
            Op::Copy { src, len } => {
                self.rec.push(TAG_COPY);
                put_varint(&mut self.rec, src);
                put_varint(&mut self.rec, len);
                if src == self.out_pos {
                    self.st.same_offset += len;
                } else {
                    self.st.moved += len;
                }
                self.out_pos += len;
            }
            Op::Zero { len } => {
                self.rec.push(TAG_ZERO);
                put_varint(&mut self.rec, len);
                self.st.zero += len;
                self.out_pos += len;
            }
            Op::Data { len, .. } => {
                self.rec.push(TAG_DATA);
                put_varint(&mut self.rec, len);
                self.st.literal += len;
                self.out_pos += len;
            }
        }
        self.st.ops += 1;
        self.st.body_len += self.rec.len() as u64;
        write(&mut self.w, &self.rec)
    }

    fn finish(mut self) -> Result<(W, EncStats), DeltaError> {
        self.flush_frame()?;
        write(&mut self.w, &[TAG_END])?;
        self.st.body_len += 1;
        self.w
            .flush()
            .map_err(|e| DeltaError::io("write", "delta body", e))?;
        Ok((self.w, self.st))
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
    std::thread::scope(|scope| {
        // SHA-256 is sequential per file and, on sparse images, mostly spent on the
        // zeros of the holes: one thread per input.
        let hash_a = scope.spawn(|| a.sha256());
        let hash_b = scope.spawn(|| b.sha256());

        let poly = PolyHash::new(bs);
        let index = BlockIndex::build(a, &poly, bs, |done| a.release(0, done));
        a.release_all();
        tracing::debug!(blocks = index.len(), bytes = index.memory(), "base indexed");

        let (tx, rx) = sync_channel::<Vec<Op>>(2);
        let b_bytes = b.bytes();
        let encoder = scope.spawn(move || -> Result<(W, EncStats), DeltaError> {
            let mut enc = Encoder::new(w, b_bytes, opts)?;
            for ops in rx {
                for op in ops {
                    enc.push(op)?;
                }
            }
            enc.finish()
        });

        let scanner = Scanner {
            a,
            b,
            index: &index,
            poly: &poly,
            block_size: bs,
            rolling: opts.rolling,
            rolling_max_run: opts.rolling_max_run,
        };
        let mut shifted = 0u64;
        let mut seg_start = 0usize;
        let b_len = b_bytes.len();
        while seg_start < b_len {
            let seg_end = (seg_start + SEGMENT).min(b_len);
            let (ops, sh) = scanner.scan(seg_start..seg_end);
            shifted += sh;
            if tx.send(ops).is_err() {
                break; // the encoder stopped; its error is reported below
            }
            // Pages of B the encoder may still copy literals from are kept for the
            // segments in flight (if it lags further, it maps them back in); A's pages
            // were touched at random and are all dropped.
            b.release(0, seg_start.saturating_sub(2 * SEGMENT));
            a.release_all();
            seg_start = seg_end;
        }
        drop(tx);
        let enc = encoder
            .join()
            .map_err(|_| DeltaError::Internal("delta encoder thread panicked".into()))?;
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
            zero_bytes: st.zero,
            literal_bytes: st.literal,
            literal_stored_bytes: st.literal_stored,
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
            frame_size: MAX_FRAME + 1,
            ..Default::default()
        };
        assert!(o.validate().is_err());
    }
}
