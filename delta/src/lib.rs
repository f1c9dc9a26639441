//! Delta files between two versions of one VM image (paper §2.3, DESIGN.md §7): `build`
//! writes a delta that turns A into B, `apply` rebuilds B from A bit-exactly (SHA-256 of
//! the base checked first, of the output last, written to a temporary file and renamed
//! into place only when verified). Distribution of deltas (chunks, GIS) is the node's job.
//!
//! Algorithm. Disk images change in aligned blocks, files move, and a new version
//! repeats some of its own new data. A is indexed by its aligned non-zero blocks (default
//! 4 KiB, the ext4 block size) under a 32-bit rolling polynomial hash. Each aligned block
//! of B becomes, in this order: ZERO (all zero, or a hole of the sparse file, which is
//! never read), COPY from the same offset of A, COPY continuing the previous moved copy,
//! COPY from any block of A with equal bytes, COPY_OUT from an earlier new block of B
//! with equal bytes (B's literal blocks are indexed as the scan goes), else literal (every
//! index hit confirmed by comparing bytes). Literal runs are then refined byte-wise: the
//! copy before and after a run is extended while the bytes agree, and the rest is
//! searched rsync-style with the rolling hash at every byte offset, against A and against
//! B's earlier new blocks (bit filters reject most offsets without touching the tables).
//! The search costs about 4 ns a searched byte, so only literal runs of at most 4 MiB are
//! searched: long literal runs are new files where it finds nothing. What is still
//! literal is checked against B's own earlier literal bytes at any alignment and distance
//! (content-defined anchors; repeats of 256 bytes or more become COPY_OUT). Adjacent ops
//! are coalesced; literal bytes go into 24 MiB frames compressed with zstd (level 18, a
//! window over the frame and its reference, long-distance matching) by two worker
//! threads in parallel. A frame goes through an x86 branch filter (CALL/JMP offsets made
//! absolute, so calls of one function repeat) when a fast trial says it helps, and the
//! regions of A its bytes resemble (anchors shared with A, voted per 16 KiB of A, up to
//! 16 MiB) are zstd's reference prefix, so an edited file costs its edits; so are the
//! regions of B already written that it resembles (B's anchors, up to 2 MiB), so new data
//! like new data of an earlier frame (programs of one package sharing code) costs its
//! differences too. Each frame is followed by the zstd-compressed block of records that
//! consume it. See `delta/FORMAT.md` for the
//! byte layout (version 4; versions 1 to 3 still apply).
//!
//! Memory: inputs are memory-mapped and their pages released behind each pass; the block
//! index is about 16 bytes per block of A (a 4 GiB base: 24 MiB at most) plus as much for
//! B's new blocks; A's anchors take 8 bytes per 256 allocated bytes of A on average, and
//! as much for B's allocated bytes, B's literal anchors an 8-byte slot per KiB of B (at
//! most 32 MiB); each compression worker holds one frame,
//! its reference and a zstd context (about 60 MiB at level 18), the decoder a few frames
//! and one reference. Nothing else is proportional to the image size.

mod apply;
mod build;
mod error;
mod filter;
mod format;
mod image;
mod index;
mod similar;

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::mpsc::sync_channel;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

pub use build::{BuildOptions, DeltaStats, DEFAULT_LEVEL};
pub use error::DeltaError;
pub use format::{
    DeltaHeader, HEADER_LEN, MAGIC, MAX_FRAME, MAX_FRAME_V2, MAX_OPS_BLOCK, MAX_REFERENCE,
    MAX_REFERENCE_RANGES, MIN_VERSION, TRAILER_LEN, VERSION,
};

use apply::{check_delta, decode, hash_jobs, FileSink, VecSink};
use image::{Image, MappedFile};

/// What an `apply` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyStats {
    /// Size of the rebuilt image B.
    pub to_size: u64,
    /// Bytes copied from the base.
    pub copied_bytes: u64,
    /// Bytes left as zeros (holes in the output file).
    pub zero_bytes: u64,
    /// Bytes taken from the delta's literal frames.
    pub literal_bytes: u64,
    /// Bytes actually written to the output file (zeros are not written).
    pub written_bytes: u64,
    /// Wall-clock time of the apply, verification included.
    pub elapsed: Duration,
}

/// Options of `apply_with`.
#[derive(Debug, Clone)]
pub struct ApplyOptions {
    /// fsync the output before renaming it into place (default true: a crash never
    /// leaves a file under the target name whose data did not reach the disk).
    pub sync: bool,
}

impl Default for ApplyOptions {
    fn default() -> Self {
        ApplyOptions { sync: true }
    }
}

/// Builds the delta that turns `from` (A) into `to` (B) and writes it to `out`
/// (through a temporary file in the same directory, renamed when complete).
pub fn build(
    from: &Path,
    to: &Path,
    out: &Path,
    opts: &BuildOptions,
) -> Result<DeltaStats, DeltaError> {
    let t0 = Instant::now();
    let fa = MappedFile::open(from)?;
    let fb = MappedFile::open(to)?;
    let dir = parent_dir(out);
    let tmp = tempfile::Builder::new()
        .prefix(".bids-delta-")
        .tempfile_in(dir)
        .map_err(|e| DeltaError::io("create a temporary file in", dir, e))?;
    let file = tmp
        .as_file()
        .try_clone()
        .map_err(|e| DeltaError::io("reopen", tmp.path(), e))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    w.write_all(&[0u8; HEADER_LEN])
        .map_err(|e| DeltaError::io("write", tmp.path(), e))?;
    let (w, outcome) = build::build_body(&fa.image(), &fb.image(), opts, w)?;
    let file = w
        .into_inner()
        .map_err(|e| DeltaError::io("write", tmp.path(), e.into_error()))?;
    let header = header_for(opts, &outcome, fa.len(), fb.len());
    file.write_all_at(&header.encode(), 0)
        .map_err(|e| DeltaError::io("write", tmp.path(), e))?;
    let sum = checksum_file(&file, HEADER_LEN as u64 + outcome.body_len)
        .map_err(|e| DeltaError::io("read back", tmp.path(), e))?;
    file.write_all_at(&sum, HEADER_LEN as u64 + outcome.body_len)
        .map_err(|e| DeltaError::io("write", tmp.path(), e))?;
    file.sync_all()
        .map_err(|e| DeltaError::io("sync", tmp.path(), e))?;
    tmp.persist(out)
        .map_err(|e| DeltaError::io("rename the delta to", out, e.error))?;
    let mut stats = outcome.stats;
    stats.delta_size = header.file_len();
    stats.elapsed = t0.elapsed();
    tracing::info!(
        from = %from.display(), to = %to.display(), out = %out.display(),
        delta_size = stats.delta_size, elapsed_ms = stats.elapsed.as_millis() as u64,
        "delta built"
    );
    Ok(stats)
}

/// Rebuilds B from `base` (A) and `delta` into `out`, with `ApplyOptions::default()`.
pub fn apply(base: &Path, delta: &Path, out: &Path) -> Result<ApplyStats, DeltaError> {
    apply_with(base, delta, out, &ApplyOptions::default())
}

/// Rebuilds B from `base` and `delta` into `out`. The delta's trailer and the base's
/// SHA-256 are checked before anything is created; the output goes to a sparse
/// temporary file next to `out` and is renamed into place only if its SHA-256 matches.
/// On any error `out` is neither created nor touched.
pub fn apply_with(
    base: &Path,
    delta: &Path,
    out: &Path,
    opts: &ApplyOptions,
) -> Result<ApplyStats, DeltaError> {
    let t0 = Instant::now();
    let fd = MappedFile::open(delta)?;
    let d_img = fd.image();
    let what = delta.display().to_string();
    let fbase = MappedFile::open(base)?;
    let b_img = fbase.image();

    // Delta integrity and base identity, in parallel (both are sequential hashes).
    let (header, base_sha) = std::thread::scope(|s| {
        let base_hash = s.spawn(|| b_img.sha256());
        let checked = check_delta(d_img.bytes(), &what);
        let base_sha = base_hash.join();
        (checked, base_sha)
    });
    let header = header?;
    d_img.release_all();
    if fbase.len() != header.from_size {
        return Err(wrong_base(fbase.path(), &header, fbase.len(), None));
    }
    let base_sha = base_sha
        .map_err(|_| DeltaError::Internal("base hashing thread panicked".into()))?
        .map_err(|e| DeltaError::io("read", base, e))?;
    if base_sha != header.from_sha256 {
        return Err(wrong_base(
            fbase.path(),
            &header,
            fbase.len(),
            Some(base_sha),
        ));
    }

    let dir = parent_dir(out);
    let tmp = tempfile::Builder::new()
        .prefix(".bids-apply-")
        .tempfile_in(dir)
        .map_err(|e| DeltaError::io("create a temporary file in", dir, e))?;
    let file: &File = tmp.as_file();
    file.set_len(header.to_size)
        .map_err(|e| DeltaError::io("size", tmp.path(), e))?;
    let body = &d_img.bytes()[HEADER_LEN..HEADER_LEN + header.body_len as usize];

    let (decoded, written, digest) = std::thread::scope(|s| {
        let (tx, rx) = sync_channel(256);
        let base_bytes = b_img.bytes();
        let hasher = s.spawn(move || hash_jobs(base_bytes, rx));
        let (decoded, written) = {
            let mut sink = FileSink::new(file, tmp.path().to_path_buf(), &b_img, tx);
            let r = decode(body, header.version, base_bytes, header.to_size, &mut sink);
            let f = sink.finish();
            (r.and_then(|st| f.map(|()| st)), sink.written)
            // `sink` (and with it the sender) is dropped here, so the hasher ends.
        };
        let digest = hasher.join();
        (decoded, written, digest)
    });
    b_img.release_all();
    d_img.release_all();
    let decoded = decoded?;
    let digest =
        digest.map_err(|_| DeltaError::Internal("output hashing thread panicked".into()))?;
    if digest != header.to_sha256 {
        return Err(DeltaError::OutputMismatch {
            expected: header.to_hex(),
            actual: hex::encode(digest),
        });
    }
    if opts.sync {
        file.sync_all()
            .map_err(|e| DeltaError::io("sync", tmp.path(), e))?;
    }
    tmp.persist(out)
        .map_err(|e| DeltaError::io("rename the output to", out, e.error))?;
    let stats = ApplyStats {
        to_size: header.to_size,
        copied_bytes: decoded.copied,
        zero_bytes: decoded.zero,
        literal_bytes: decoded.literal,
        written_bytes: written,
        elapsed: t0.elapsed(),
    };
    tracing::info!(
        base = %base.display(), delta = %delta.display(), out = %out.display(),
        size = stats.to_size, elapsed_ms = stats.elapsed.as_millis() as u64,
        "delta applied"
    );
    Ok(stats)
}

/// For a process whose main job is `build`: buffers of 4 MiB and more (literal frames,
/// zstd's work space) get their own memory maps, so each is given back to the system
/// when freed. By default glibc raises that threshold to the size of the largest block
/// freed (up to 32 MiB), after which frames come from the allocator's arenas and stay
/// there: on the 1 GiB images of issue 22 that added about 20 MiB to a build's peak.
/// Process-wide, so a command calls it, never the library; a no-op on other C libraries.
pub fn keep_large_buffers_out_of_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes a tuning parameter of the allocator; it has no
    // preconditions and is safe to call at any time.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
    }
}

/// Reads and checks the fixed header of a delta file (magic, version), without reading
/// the body. Use `verify` to check the whole file.
pub fn read_header(delta: &Path) -> Result<DeltaHeader, DeltaError> {
    let f = File::open(delta).map_err(|e| DeltaError::io("open", delta, e))?;
    let mut buf = Vec::with_capacity(HEADER_LEN);
    f.take(HEADER_LEN as u64)
        .read_to_end(&mut buf)
        .map_err(|e| DeltaError::io("read", delta, e))?;
    DeltaHeader::decode(&buf, &delta.display().to_string())
}

/// Checks a whole delta file (header, length, SHA-256 trailer) and returns its header.
pub fn verify(delta: &Path) -> Result<DeltaHeader, DeltaError> {
    let fd = MappedFile::open(delta)?;
    let img = fd.image();
    let r = check_delta(img.bytes(), &delta.display().to_string());
    img.release_all();
    r
}

/// In-memory `build` with default options (tests, small images).
pub fn build_bytes(from: &[u8], to: &[u8]) -> Result<Vec<u8>, DeltaError> {
    build_bytes_with(from, to, &BuildOptions::default())
}

/// In-memory `build`.
pub fn build_bytes_with(
    from: &[u8],
    to: &[u8],
    opts: &BuildOptions,
) -> Result<Vec<u8>, DeltaError> {
    let mut out = vec![0u8; HEADER_LEN];
    out.reserve(to.len() / 8);
    let (mut out, outcome) =
        build::build_body(&Image::from_bytes(from), &Image::from_bytes(to), opts, out)?;
    let header = header_for(opts, &outcome, from.len() as u64, to.len() as u64);
    out[..HEADER_LEN].copy_from_slice(&header.encode());
    let sum = Sha256::digest(&out);
    out.extend_from_slice(&sum);
    Ok(out)
}

/// In-memory `apply`: checks the delta, the base and the output exactly as `apply` does.
pub fn apply_bytes(base: &[u8], delta: &[u8]) -> Result<Vec<u8>, DeltaError> {
    let header = check_delta(delta, "in-memory delta")?;
    let base_sha = apply::sha256(base);
    if base.len() as u64 != header.from_size || base_sha != header.from_sha256 {
        return Err(DeltaError::WrongBase {
            what: "(in memory)".into(),
            expected_sha: header.from_hex(),
            expected_size: header.from_size,
            actual_sha: hex::encode(base_sha),
            actual_size: base.len() as u64,
        });
    }
    let body = &delta[HEADER_LEN..HEADER_LEN + header.body_len as usize];
    let mut sink = VecSink {
        base,
        out: Vec::new(),
    };
    decode(body, header.version, base, header.to_size, &mut sink)?;
    let digest = apply::sha256(&sink.out);
    if digest != header.to_sha256 {
        return Err(DeltaError::OutputMismatch {
            expected: header.to_hex(),
            actual: hex::encode(digest),
        });
    }
    Ok(sink.out)
}

fn header_for(
    opts: &BuildOptions,
    outcome: &build::BodyOutcome,
    from_size: u64,
    to_size: u64,
) -> DeltaHeader {
    DeltaHeader {
        version: VERSION,
        block_size: opts.block_size as u32,
        from_size,
        to_size,
        body_len: outcome.body_len,
        from_sha256: outcome.from_sha256,
        to_sha256: outcome.to_sha256,
    }
}

fn wrong_base(path: &Path, h: &DeltaHeader, size: u64, sha: Option<[u8; 32]>) -> DeltaError {
    DeltaError::WrongBase {
        what: path.display().to_string(),
        expected_sha: h.from_hex(),
        expected_size: h.from_size,
        actual_sha: sha.map_or_else(|| "(not hashed: the size differs)".into(), hex::encode),
        actual_size: size,
    }
}

fn parent_dir(out: &Path) -> &Path {
    match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// SHA-256 of the first `len` bytes of `file`, read with pread.
fn checksum_file(file: &File, len: u64) -> std::io::Result<[u8; 32]> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    while pos < len {
        let n = (len - pos).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..n], pos)?;
        h.update(&buf[..n]);
        pos += n as u64;
    }
    Ok(h.finalize().into())
}
