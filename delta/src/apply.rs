//! Applying a delta: check the delta's trailer and the base's SHA-256 before anything is
//! written, then replay the records into a sink, hashing the output as it goes. The file
//! sink writes a sparse temporary file that `lib.rs` renames into place once verified.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::filter::x86_decode;
use crate::format::{
    BodyReader, DeltaHeader, HEADER_LEN, LIT_FLAG_OUT_REFERENCE, LIT_FLAG_REFERENCE, LIT_FLAG_X86,
    MAX_FRAME, MAX_FRAME_V2, MAX_OPS_BLOCK, MAX_REFERENCE, MAX_REFERENCE_RANGES, TAG_COPY,
    TAG_COPY_OUT, TAG_DATA, TAG_END, TAG_LIT_RAW, TAG_LIT_ZSTD, TAG_LIT_ZSTD_EX, TAG_OPS_ZSTD,
    TAG_ZERO, TRAILER_LEN,
};
use crate::image::{hash_zeros, Image};
use crate::DeltaError;

/// Where decoded output goes. Pieces arrive in output order.
pub(crate) trait Sink {
    /// `len` bytes of the base at `off`.
    fn base(&mut self, off: usize, len: usize) -> Result<(), DeltaError>;
    /// `len` literal bytes at `start` of the current frame.
    fn literal(&mut self, frame: &Arc<Vec<u8>>, start: usize, len: usize)
        -> Result<(), DeltaError>;
    /// `len` zero bytes.
    fn zero(&mut self, len: u64) -> Result<(), DeltaError>;
    /// Appends `len` bytes of the output already written, from `src`, to `into`
    /// (a frame's reference; the caller checked the range).
    fn read_output(&mut self, src: u64, len: usize, into: &mut Vec<u8>) -> Result<(), DeltaError>;
    /// `len` bytes of the output already written, from offset `src` (`src + len` is at
    /// most the current output position).
    fn output(&mut self, src: u64, len: u64) -> Result<(), DeltaError>;
    /// A new literal frame is about to replace the previous ones (lets a sink bound how
    /// many frames it keeps alive).
    fn new_frame(&mut self) -> Result<(), DeltaError> {
        Ok(())
    }
}

/// Byte counts of one replay.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct DecodeStats {
    pub(crate) copied: u64,
    pub(crate) zero: u64,
    pub(crate) literal: u64,
}

/// Checks a whole delta held in memory: header, exact length, SHA-256 trailer.
pub(crate) fn check_delta(bytes: &[u8], what: &str) -> Result<DeltaHeader, DeltaError> {
    let h = DeltaHeader::decode(bytes, what)?;
    let expected = h.file_len();
    let actual = bytes.len() as u64;
    if actual < expected {
        return Err(DeltaError::Truncated { expected, actual });
    }
    if actual > expected {
        return Err(DeltaError::corrupt(
            expected,
            format!("{} bytes after the trailer", actual - expected),
        ));
    }
    let body_end = HEADER_LEN + h.body_len as usize;
    let sum: [u8; 32] = Sha256::digest(&bytes[..body_end]).into();
    let trailer = &bytes[body_end..body_end + TRAILER_LEN];
    if sum[..] != trailer[..] {
        return Err(DeltaError::ChecksumMismatch {
            expected: hex::encode(trailer),
            actual: hex::encode(sum),
        });
    }
    Ok(h)
}

/// Replays the body of a delta of format `version`. Every length and offset is checked
/// against the base, the declared output size and the current frame before it is used;
/// frames and instruction blocks are decompressed into buffers of at most `MAX_FRAME(_V2)`
/// and `MAX_OPS_BLOCK` bytes, references assembled from at most `MAX_REFERENCE` bytes of
/// `base`, whatever the delta claims.
pub(crate) fn decode<S: Sink>(
    body: &[u8],
    version: u8,
    base: &[u8],
    to_size: u64,
    sink: &mut S,
) -> Result<DecodeStats, DeltaError> {
    let mut r = BodyReader::new(body, HEADER_LEN as u64);
    let mut dec = zstd::bulk::Decompressor::new()
        .map_err(|source| DeltaError::Zstd { op: "init", source })?;
    let mut st = Replay {
        base_len: base.len() as u64,
        to_size,
        out_pos: 0,
        frame: Arc::new(Vec::new()),
        frame_pos: 0,
        counts: DecodeStats::default(),
    };
    let max_frame = if version >= 2 {
        MAX_FRAME_V2
    } else {
        MAX_FRAME
    };
    loop {
        let rec = r.offset();
        let tag = r.u8()?;
        match tag {
            TAG_END => {
                if r.remaining() != 0 {
                    return Err(r.err("bytes after the END record"));
                }
                if st.out_pos != to_size {
                    return Err(DeltaError::corrupt(
                        rec,
                        format!("output ends at {} bytes, header says {to_size}", st.out_pos),
                    ));
                }
                if st.frame_pos != st.frame.len() {
                    return Err(DeltaError::corrupt(rec, "literal bytes left unused"));
                }
                return Ok(st.counts);
            }
            TAG_COPY | TAG_ZERO | TAG_DATA => st.op(tag, rec, &mut r, sink)?,
            TAG_COPY_OUT if version >= 2 => st.op(tag, rec, &mut r, sink)?,
            TAG_OPS_ZSTD if version >= 2 => {
                let raw_len = r.varint()?;
                if raw_len == 0 || raw_len > MAX_OPS_BLOCK as u64 {
                    return Err(DeltaError::corrupt(
                        rec,
                        format!("instruction block of {raw_len} bytes (limit {MAX_OPS_BLOCK})"),
                    ));
                }
                let comp_len = r.varint()?;
                let packed = r.bytes(comp_len)?;
                let ops = unpack(&mut dec, packed, raw_len as usize, rec, "instruction block")?;
                // Offsets in errors inside a block point at the block's record.
                let mut inner = BodyReader::new(&ops, 0);
                while inner.remaining() > 0 {
                    let tag = inner.u8()?;
                    match tag {
                        TAG_COPY | TAG_ZERO | TAG_DATA | TAG_COPY_OUT => {
                            st.op(tag, rec, &mut inner, sink).map_err(|e| match e {
                                DeltaError::Corrupt { reason, .. } => DeltaError::corrupt(
                                    rec,
                                    format!("in the instruction block: {reason}"),
                                ),
                                e => e,
                            })?
                        }
                        other => {
                            return Err(DeltaError::corrupt(
                                rec,
                                format!("record tag {other:#04x} inside an instruction block"),
                            ))
                        }
                    }
                }
            }
            TAG_LIT_ZSTD | TAG_LIT_RAW | TAG_LIT_ZSTD_EX
                if tag != TAG_LIT_ZSTD_EX || version >= 3 =>
            {
                if st.frame_pos != st.frame.len() {
                    return Err(DeltaError::corrupt(
                        rec,
                        "new literal frame before the previous one was used up",
                    ));
                }
                let raw_len = r.varint()?;
                if raw_len == 0 || raw_len > max_frame as u64 {
                    return Err(DeltaError::corrupt(
                        rec,
                        format!("literal frame of {raw_len} bytes (limit {max_frame})"),
                    ));
                }
                let raw_len = raw_len as usize;
                let data = match tag {
                    TAG_LIT_ZSTD => {
                        let comp_len = r.varint()?;
                        let packed = r.bytes(comp_len)?;
                        unpack(&mut dec, packed, raw_len, rec, "literal frame")?
                    }
                    TAG_LIT_ZSTD_EX => {
                        let flags = r.varint()?;
                        let known = if version >= 4 {
                            LIT_FLAG_X86 | LIT_FLAG_REFERENCE | LIT_FLAG_OUT_REFERENCE
                        } else {
                            LIT_FLAG_X86 | LIT_FLAG_REFERENCE
                        };
                        if flags & !known != 0 {
                            return Err(DeltaError::corrupt(
                                rec,
                                format!("unknown literal frame flags {flags:#x}"),
                            ));
                        }
                        let mut reference = Vec::new();
                        if flags & LIT_FLAG_REFERENCE != 0 {
                            let ranges = read_ranges(&mut r, base.len() as u64, 0, rec, "base")?;
                            reserve_reference(&mut reference, &ranges)?;
                            for (src, len) in ranges {
                                reference.extend_from_slice(&base[src..src + len]);
                            }
                        }
                        if flags & LIT_FLAG_OUT_REFERENCE != 0 {
                            let before = reference.len() as u64;
                            let ranges = read_ranges(&mut r, st.out_pos, before, rec, "output")?;
                            reserve_reference(&mut reference, &ranges)?;
                            for (src, len) in ranges {
                                sink.read_output(src as u64, len, &mut reference)?;
                            }
                        }
                        let comp_len = r.varint()?;
                        let packed = r.bytes(comp_len)?;
                        let mut v = unpack_with_reference(&reference, packed, raw_len, rec)?;
                        if flags & LIT_FLAG_X86 != 0 {
                            x86_decode(&mut v);
                        }
                        v
                    }
                    _ => r.bytes(raw_len as u64)?.to_vec(),
                };
                sink.new_frame()?;
                st.frame = Arc::new(data);
                st.frame_pos = 0;
            }
            other => {
                return Err(DeltaError::corrupt(
                    rec,
                    format!("unknown record tag {other:#04x} in a version {version} delta"),
                ))
            }
        }
    }
}

/// Reads a list of reference ranges (count, then `src`, `len` each) that must lie
/// within the first `limit` bytes of the `what` (the base, or the output written so
/// far), checking every range, and the reference's total with the `before` bytes it
/// already holds against `MAX_REFERENCE`, before anything is allocated.
fn read_ranges(
    r: &mut BodyReader<'_>,
    limit: u64,
    before: u64,
    rec: u64,
    what: &str,
) -> Result<Vec<(usize, usize)>, DeltaError> {
    let n = r.varint()?;
    if n == 0 || n > MAX_REFERENCE_RANGES {
        return Err(DeltaError::corrupt(
            rec,
            format!("reference of {n} ranges (1 to {MAX_REFERENCE_RANGES})"),
        ));
    }
    let mut ranges = Vec::with_capacity(n as usize);
    let mut total = before;
    for _ in 0..n {
        let (src, len) = (r.varint()?, r.varint()?);
        let end = src.checked_add(len).filter(|&e| e <= limit);
        if len == 0 || end.is_none() {
            return Err(DeltaError::corrupt(
                rec,
                format!("reference range {src}+{len} outside the {what}'s {limit} bytes"),
            ));
        }
        total += len;
        if total > MAX_REFERENCE as u64 {
            return Err(DeltaError::corrupt(
                rec,
                format!("reference of more than {MAX_REFERENCE} bytes"),
            ));
        }
        ranges.push((src as usize, len as usize));
    }
    Ok(ranges)
}

/// Makes room in `reference` for the bytes of `ranges` (checked by `read_ranges`).
fn reserve_reference(reference: &mut Vec<u8>, ranges: &[(usize, usize)]) -> Result<(), DeltaError> {
    let add: usize = ranges.iter().map(|&(_, len)| len).sum();
    reference
        .try_reserve_exact(add)
        .map_err(|e| DeltaError::Internal(format!("cannot allocate a reference: {e}")))
}

/// Decompresses one zstd frame compressed against `reference` (zstd's reference
/// prefix; none if empty); it must hold exactly `raw_len` bytes.
fn unpack_with_reference(
    reference: &[u8],
    packed: &[u8],
    raw_len: usize,
    rec: u64,
) -> Result<Vec<u8>, DeltaError> {
    use zstd::zstd_safe::{get_error_name, DCtx, DParameter};
    let fail = |what: &str, code| {
        DeltaError::corrupt(
            rec,
            format!("literal frame {what}: {}", get_error_name(code)),
        )
    };
    let mut dctx = DCtx::try_create()
        .ok_or_else(|| DeltaError::Internal("cannot create a zstd decoder".into()))?;
    dctx.set_parameter(DParameter::WindowLogMax(REFERENCE_WINDOW_LOG_MAX))
        .map_err(|c| fail("decoder setup", c))?;
    if !reference.is_empty() {
        dctx.ref_prefix(reference)
            .map_err(|c| fail("reference", c))?;
    }
    exact_frame(raw_len, rec, "literal frame", |v| {
        dctx.decompress(v, packed)
            .map(|_| ())
            .map_err(|c| get_error_name(c).to_string())
    })
}

/// Largest zstd window a frame with a reference may declare: the reference and the
/// frame together (`MAX_REFERENCE` + `MAX_FRAME_V2` = 2^27).
pub(crate) const REFERENCE_WINDOW_LOG_MAX: u32 = 27;

/// Decompresses one zstd frame that must hold exactly `raw_len` bytes.
fn unpack(
    dec: &mut zstd::bulk::Decompressor<'_>,
    packed: &[u8],
    raw_len: usize,
    rec: u64,
    what: &str,
) -> Result<Vec<u8>, DeltaError> {
    exact_frame(raw_len, rec, what, |v| {
        dec.decompress_to_buffer(packed, v)
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
}

/// Runs `decompress` into a buffer of exactly `raw_len` bytes' capacity; the result must
/// fill it (a zstd frame cannot write past the capacity it is given).
fn exact_frame(
    raw_len: usize,
    rec: u64,
    what: &str,
    decompress: impl FnOnce(&mut Vec<u8>) -> Result<(), String>,
) -> Result<Vec<u8>, DeltaError> {
    let mut v = Vec::new();
    v.try_reserve_exact(raw_len)
        .map_err(|e| DeltaError::Internal(format!("cannot allocate a {what}: {e}")))?;
    decompress(&mut v)
        .map_err(|e| DeltaError::corrupt(rec, format!("{what} does not decompress: {e}")))?;
    if v.len() != raw_len {
        return Err(DeltaError::corrupt(
            rec,
            format!("{what} decompresses to {} bytes, not {raw_len}", v.len()),
        ));
    }
    Ok(v)
}

/// The replay state: output position and the current literal frame.
struct Replay {
    base_len: u64,
    to_size: u64,
    out_pos: u64,
    frame: Arc<Vec<u8>>,
    frame_pos: usize,
    counts: DecodeStats,
}

impl Replay {
    /// Reads the fields of one COPY, COPY_OUT, ZERO or DATA record (tag already read)
    /// from `r`, checks them and hands the bytes to the sink.
    fn op<S: Sink>(
        &mut self,
        tag: u8,
        rec: u64,
        r: &mut BodyReader<'_>,
        sink: &mut S,
    ) -> Result<(), DeltaError> {
        let src = if tag == TAG_COPY || tag == TAG_COPY_OUT {
            r.varint()?
        } else {
            0
        };
        let len = r.varint()?;
        if len == 0 {
            return Err(DeltaError::corrupt(rec, "zero-length operation"));
        }
        let out_pos = self.out_pos;
        if len > self.to_size - out_pos {
            return Err(DeltaError::corrupt(
                rec,
                format!(
                    "operation of {len} bytes at output {out_pos} passes the output size {}",
                    self.to_size
                ),
            ));
        }
        match tag {
            TAG_COPY => {
                if src.checked_add(len).is_none_or(|end| end > self.base_len) {
                    return Err(DeltaError::corrupt(
                        rec,
                        format!(
                            "copy of {len} bytes from {src} passes the base size {}",
                            self.base_len
                        ),
                    ));
                }
                sink.base(src as usize, len as usize)?;
                self.counts.copied += len;
            }
            TAG_COPY_OUT => {
                if src.checked_add(len).is_none_or(|end| end > out_pos) {
                    return Err(DeltaError::corrupt(
                        rec,
                        format!(
                            "copy of {len} output bytes from {src} reaches past the output written so far ({out_pos})"
                        ),
                    ));
                }
                sink.output(src, len)?;
                self.counts.copied += len;
            }
            TAG_ZERO => {
                sink.zero(len)?;
                self.counts.zero += len;
            }
            _ => {
                let left = self.frame.len() - self.frame_pos;
                if len > left as u64 {
                    return Err(DeltaError::corrupt(
                        rec,
                        format!("literal of {len} bytes, only {left} left in the frame"),
                    ));
                }
                sink.literal(&self.frame, self.frame_pos, len as usize)?;
                self.frame_pos += len as usize;
                self.counts.literal += len;
            }
        }
        self.out_pos += len;
        Ok(())
    }
}

/// Output in memory (tests, small images). Allocation failures are errors, not aborts.
pub(crate) struct VecSink<'a> {
    pub(crate) base: &'a [u8],
    pub(crate) out: Vec<u8>,
}

impl VecSink<'_> {
    fn reserve(&mut self, len: usize) -> Result<(), DeltaError> {
        self.out
            .try_reserve(len)
            .map_err(|e| DeltaError::Internal(format!("cannot allocate the output: {e}")))
    }
}

impl Sink for VecSink<'_> {
    fn read_output(&mut self, src: u64, len: usize, into: &mut Vec<u8>) -> Result<(), DeltaError> {
        let s = src as usize;
        into.extend_from_slice(&self.out[s..s + len]);
        Ok(())
    }
    fn base(&mut self, off: usize, len: usize) -> Result<(), DeltaError> {
        self.reserve(len)?;
        self.out.extend_from_slice(&self.base[off..off + len]);
        Ok(())
    }
    fn literal(&mut self, f: &Arc<Vec<u8>>, start: usize, len: usize) -> Result<(), DeltaError> {
        self.reserve(len)?;
        self.out.extend_from_slice(&f[start..start + len]);
        Ok(())
    }
    fn zero(&mut self, len: u64) -> Result<(), DeltaError> {
        let len = usize::try_from(len)
            .map_err(|_| DeltaError::Internal("zero run larger than memory".into()))?;
        self.reserve(len)?;
        self.out.resize(self.out.len() + len, 0);
        Ok(())
    }
    fn output(&mut self, src: u64, len: u64) -> Result<(), DeltaError> {
        // `decode` checked src + len <= the output length, which is this Vec's length.
        let (src, len) = (src as usize, len as usize);
        self.reserve(len)?;
        self.out.extend_from_within(src..src + len);
        Ok(())
    }
}

/// Work for the output hasher, in output order.
pub(crate) enum HashJob {
    Base(usize, usize),
    Literal(Arc<Vec<u8>>, usize, usize),
    Zero(u64),
    /// Reply once every earlier job is hashed.
    Barrier(SyncSender<()>),
}

/// Hashes the output on its own thread while the caller's thread writes it.
pub(crate) fn hash_jobs(base: &[u8], rx: Receiver<HashJob>) -> [u8; 32] {
    let mut h = Sha256::new();
    for job in rx {
        match job {
            HashJob::Base(off, len) => h.update(&base[off..off + len]),
            HashJob::Literal(f, s, l) => h.update(&f[s..s + l]),
            HashJob::Zero(n) => hash_zeros(&mut h, n),
            HashJob::Barrier(reply) => {
                // The decoder waits on this; if it is gone there is nothing to tell.
                let _ = reply.send(());
            }
        }
    }
    h.finalize().into()
}

/// Writes pieces of at most this size at once (bounds how much of the base is mapped
/// in at a time and lets the hasher start early).
const PIECE: usize = 8 << 20;
/// The base mapping is released after this much output.
const RELEASE_EVERY: u64 = 32 << 20;

/// Output to a (sparse, pre-sized) file: small pieces are gathered in a buffer, zero
/// runs are skipped so they stay holes, every piece is also queued for hashing.
pub(crate) struct FileSink<'a> {
    pub(crate) file: &'a File,
    pub(crate) path: PathBuf,
    pub(crate) base: &'a Image<'a>,
    pub(crate) hasher: SyncSender<HashJob>,
    pos: u64,
    buf: Vec<u8>,
    buf_start: u64,
    since_release: u64,
    live_frames: Vec<Arc<Vec<u8>>>,
    pub(crate) written: u64,
}

impl<'a> FileSink<'a> {
    pub(crate) fn new(
        file: &'a File,
        path: PathBuf,
        base: &'a Image<'a>,
        hasher: SyncSender<HashJob>,
    ) -> Self {
        FileSink {
            file,
            path,
            base,
            hasher,
            pos: 0,
            buf: Vec::with_capacity(1 << 20),
            buf_start: 0,
            since_release: 0,
            live_frames: Vec::new(),
            written: 0,
        }
    }

    fn send(&self, job: HashJob) -> Result<(), DeltaError> {
        self.hasher
            .send(job)
            .map_err(|_| DeltaError::Internal("output hashing thread stopped".into()))
    }

    fn flush_buf(&mut self) -> Result<(), DeltaError> {
        if !self.buf.is_empty() {
            self.file
                .write_all_at(&self.buf, self.buf_start)
                .map_err(|e| DeltaError::io("write", &self.path, e))?;
            self.written += self.buf.len() as u64;
            self.buf.clear();
        }
        Ok(())
    }

    /// Writes `data` at the current position, through the buffer if small.
    fn put(&mut self, data: &[u8]) -> Result<(), DeltaError> {
        if self.buf.is_empty() {
            self.buf_start = self.pos;
        }
        if self.buf.len() + data.len() <= self.buf.capacity() {
            self.buf.extend_from_slice(data);
        } else {
            self.flush_buf()?;
            if data.len() < self.buf.capacity() {
                self.buf_start = self.pos;
                self.buf.extend_from_slice(data);
            } else {
                self.file
                    .write_all_at(data, self.pos)
                    .map_err(|e| DeltaError::io("write", &self.path, e))?;
                self.written += data.len() as u64;
            }
        }
        self.pos += data.len() as u64;
        Ok(())
    }

    pub(crate) fn finish(&mut self) -> Result<(), DeltaError> {
        self.flush_buf()
    }
}

impl Sink for FileSink<'_> {
    fn read_output(&mut self, src: u64, len: usize, into: &mut Vec<u8>) -> Result<(), DeltaError> {
        // Everything before the current position is in the file once the buffer is out.
        self.flush_buf()?;
        let at = into.len();
        into.resize(at + len, 0);
        self.file
            .read_exact_at(&mut into[at..], src)
            .map_err(|e| DeltaError::io("read back", &self.path, e))
    }
    fn base(&mut self, off: usize, len: usize) -> Result<(), DeltaError> {
        let bytes = self.base.bytes();
        let mut done = 0;
        while done < len {
            let n = (len - done).min(PIECE);
            self.put(&bytes[off + done..off + done + n])?;
            self.send(HashJob::Base(off + done, n))?;
            done += n;
            self.since_release += n as u64;
            if self.since_release >= RELEASE_EVERY {
                // The hasher may still read some of these pages: it maps them back in.
                self.base.release_all();
                self.since_release = 0;
            }
        }
        Ok(())
    }

    fn literal(&mut self, f: &Arc<Vec<u8>>, start: usize, len: usize) -> Result<(), DeltaError> {
        self.put(&f[start..start + len])?;
        if self.live_frames.last().is_none_or(|g| !Arc::ptr_eq(g, f)) {
            self.live_frames.push(Arc::clone(f));
        }
        self.send(HashJob::Literal(Arc::clone(f), start, len))
    }

    fn zero(&mut self, len: u64) -> Result<(), DeltaError> {
        self.flush_buf()?;
        self.pos += len;
        self.send(HashJob::Zero(len))
    }

    fn output(&mut self, src: u64, len: u64) -> Result<(), DeltaError> {
        // Everything before the current position is in the file once the buffer is out.
        self.flush_buf()?;
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(PIECE as u64) as usize;
            let mut piece = vec![0u8; n];
            self.file
                .read_exact_at(&mut piece, src + done)
                .map_err(|e| DeltaError::io("read back", &self.path, e))?;
            self.put(&piece)?;
            self.send(HashJob::Literal(Arc::new(piece), 0, n))?;
            done += n as u64;
        }
        Ok(())
    }

    fn new_frame(&mut self) -> Result<(), DeltaError> {
        // `live_frames` holds one reference to each frame handed to the hasher; a count
        // above one means the frame is still current or still queued. Past two such
        // frames, wait for the hasher, so memory stays at a few frames whatever the delta.
        self.live_frames.retain(|f| Arc::strong_count(f) > 1);
        if self.live_frames.len() >= 2 {
            let (tx, rx) = sync_channel(1);
            self.send(HashJob::Barrier(tx))?;
            rx.recv()
                .map_err(|_| DeltaError::Internal("output hashing thread stopped".into()))?;
            self.live_frames.clear();
        }
        Ok(())
    }
}

/// Hashes the output bytes: used by the in-memory path and tests.
pub(crate) fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{put_ranges, put_varint};

    /// A body of one LIT_ZSTD_EX frame (`flags`, `ranges`) holding `lit` compressed
    /// against those ranges of `base`, one DATA record for it, END.
    fn ex_body(base: &[u8], lit: &[u8], flags: u64, ranges: &[(u64, u64)]) -> Vec<u8> {
        use zstd::zstd_safe::CCtx;
        let mut reference = Vec::new();
        for &(s, l) in ranges {
            if let Some(e) = s.checked_add(l).filter(|&e| e <= base.len() as u64) {
                reference.extend_from_slice(&base[s as usize..e as usize]);
            }
        }
        let mut filtered = lit.to_vec();
        if flags & LIT_FLAG_X86 != 0 {
            crate::filter::x86_encode(&mut filtered);
        }
        let mut c = CCtx::create();
        if !reference.is_empty() {
            c.ref_prefix(&reference).unwrap();
        }
        let mut packed = Vec::with_capacity(zstd::zstd_safe::compress_bound(lit.len()));
        c.compress2(&mut packed, &filtered).unwrap();
        let mut body = vec![TAG_LIT_ZSTD_EX];
        put_varint(&mut body, lit.len() as u64);
        put_varint(&mut body, flags);
        if flags & LIT_FLAG_REFERENCE != 0 {
            put_ranges(&mut body, ranges);
        }
        put_varint(&mut body, packed.len() as u64);
        body.extend_from_slice(&packed);
        body.push(TAG_DATA);
        put_varint(&mut body, lit.len() as u64);
        body.push(TAG_END);
        body
    }

    fn run(body: &[u8], version: u8, base: &[u8], to_size: u64) -> Result<Vec<u8>, DeltaError> {
        let mut sink = VecSink {
            base,
            out: Vec::new(),
        };
        decode(body, version, base, to_size, &mut sink)?;
        Ok(sink.out)
    }

    fn corrupt_reason(r: Result<Vec<u8>, DeltaError>) -> String {
        match r {
            Err(DeltaError::Corrupt { reason, .. }) => reason,
            other => panic!("expected a corrupt error, got {other:?}"),
        }
    }

    #[test]
    fn frames_with_a_reference_and_the_x86_filter_decode() {
        let base: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut lit = base[30_000..50_000].to_vec();
        lit[5] = 0xE8;
        let flags = LIT_FLAG_X86 | LIT_FLAG_REFERENCE;
        let body = ex_body(&base, &lit, flags, &[(29_000, 10_000), (40_000, 20_000)]);
        assert_eq!(run(&body, 3, &base, lit.len() as u64).unwrap(), lit);
        // Without a reference, too.
        let body = ex_body(&base, &lit, LIT_FLAG_X86, &[]);
        assert_eq!(run(&body, 3, &base, lit.len() as u64).unwrap(), lit);
    }

    /// A body of two frames: `first` as a raw frame, then `second` compressed against
    /// the output ranges `out_ranges` (version 4's output reference).
    fn out_ref_body(first: &[u8], second: &[u8], out_ranges: &[(u64, u64)]) -> Vec<u8> {
        use zstd::zstd_safe::CCtx;
        let mut reference = Vec::new();
        for &(s, l) in out_ranges {
            if let Some(e) = s.checked_add(l).filter(|&e| e <= first.len() as u64) {
                reference.extend_from_slice(&first[s as usize..e as usize]);
            }
        }
        let mut body = vec![TAG_LIT_RAW];
        put_varint(&mut body, first.len() as u64);
        body.extend_from_slice(first);
        body.push(TAG_DATA);
        put_varint(&mut body, first.len() as u64);
        let mut c = CCtx::create();
        c.ref_prefix(&reference).unwrap();
        let mut packed = Vec::with_capacity(zstd::zstd_safe::compress_bound(second.len()));
        c.compress2(&mut packed, second).unwrap();
        body.push(TAG_LIT_ZSTD_EX);
        put_varint(&mut body, second.len() as u64);
        put_varint(&mut body, LIT_FLAG_OUT_REFERENCE);
        put_ranges(&mut body, out_ranges);
        put_varint(&mut body, packed.len() as u64);
        body.extend_from_slice(&packed);
        body.push(TAG_DATA);
        put_varint(&mut body, second.len() as u64);
        body.push(TAG_END);
        body
    }

    #[test]
    fn frames_with_a_reference_into_the_output_decode_and_bad_ones_are_refused() {
        let first = crate::index::tests::pseudo_random(60_000, 9);
        let mut second = first[10_000..40_000].to_vec();
        second[100] ^= 1;
        let mut want = first.clone();
        want.extend_from_slice(&second);
        let n = want.len() as u64;
        let body = out_ref_body(&first, &second, &[(5_000, 20_000), (25_000, 30_000)]);
        assert_eq!(run(&body, 4, &[], n).unwrap(), want);
        // Before version 4 the flag is unknown.
        assert!(corrupt_reason(run(&body, 3, &[], n)).contains("flags"));
        // A range reaching past what has been written (the frame's own bytes, or later).
        let body = out_ref_body(&first, &second, &[(50_000, 10_001)]);
        assert!(corrupt_reason(run(&body, 4, &[], n)).contains("outside the output"));
        let body = out_ref_body(&first, &second, &[(u64::MAX, 2)]);
        assert!(corrupt_reason(run(&body, 4, &[], n)).contains("outside the output"));
    }

    #[test]
    fn bad_frame_records_are_refused() {
        let base = vec![1u8; 50_000];
        let lit = vec![1u8; 1000];
        let n = lit.len() as u64;
        // The record is not known before version 3.
        let body = ex_body(&base, &lit, LIT_FLAG_REFERENCE, &[(0, 1000)]);
        assert!(corrupt_reason(run(&body, 2, &base, n)).contains("unknown record tag"));
        // A range past the end of the base.
        let body = ex_body(&base, &lit, LIT_FLAG_REFERENCE, &[(49_999, 2)]);
        assert!(corrupt_reason(run(&body, 3, &base, n)).contains("outside the base"));
        // An empty range, and a range whose end overflows.
        let body = ex_body(&base, &lit, LIT_FLAG_REFERENCE, &[(0, 0)]);
        assert!(corrupt_reason(run(&body, 3, &base, n)).contains("outside the base"));
        let body = ex_body(&base, &lit, LIT_FLAG_REFERENCE, &[(u64::MAX, 2)]);
        assert!(corrupt_reason(run(&body, 3, &base, n)).contains("outside the base"));
        // Unknown flags.
        let body = ex_body(&base, &lit, 4, &[]);
        assert!(corrupt_reason(run(&body, 3, &base, n)).contains("flags"));
        // More ranges than allowed, checked before anything is read or allocated.
        let mut body = vec![TAG_LIT_ZSTD_EX];
        put_varint(&mut body, n);
        put_varint(&mut body, LIT_FLAG_REFERENCE);
        put_varint(&mut body, MAX_REFERENCE_RANGES + 1);
        assert!(corrupt_reason(run(&body, 3, &base, n)).contains("ranges"));
        // A reference larger than MAX_REFERENCE in total.
        let big = vec![0u8; MAX_REFERENCE + 2];
        let mut body = vec![TAG_LIT_ZSTD_EX];
        put_varint(&mut body, n);
        put_varint(&mut body, LIT_FLAG_REFERENCE);
        put_varint(&mut body, 2);
        for _ in 0..2 {
            put_varint(&mut body, 0);
            put_varint(&mut body, (MAX_REFERENCE / 2 + 1) as u64);
        }
        assert!(corrupt_reason(run(&body, 3, &big, n)).contains("more than"));
        // A frame compressed against other bytes than the reference it names.
        let other: Vec<u8> = (0..50_000u32).map(|i| (i % 13) as u8).collect();
        let lit2 = other[1000..9000].to_vec();
        let good = ex_body(&other, &lit2, LIT_FLAG_REFERENCE, &[(0, 20_000)]);
        let r = run(&good, 3, &base, lit2.len() as u64);
        assert!(
            r.map_or(true, |out| out != lit2),
            "decoded against the wrong reference"
        );
    }
}
