//! The one error type of the crate. Messages say what failed, on what, and what to do.

use std::io;
use std::path::PathBuf;

/// Why building, reading or applying a delta file failed.
#[derive(Debug, thiserror::Error)]
pub enum DeltaError {
    /// A file could not be opened, read, mapped or written.
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The file does not start with the delta magic bytes.
    #[error("{what} is not a BIDS delta file (no \"BIDSDLT\" magic); check the path")]
    NotADelta { what: String },
    /// The file is a delta of a format version this build cannot read.
    #[error("delta format version {found} is not supported (this build reads versions 1 to {supported}); upgrade bids")]
    UnsupportedVersion { found: u8, supported: u8 },
    /// The delta file is shorter than its header says.
    #[error(
        "delta file is truncated: {expected} bytes expected, {actual} present; fetch it again"
    )]
    Truncated { expected: u64, actual: u64 },
    /// The delta file is structurally invalid (bad record, out-of-bounds operation, ...).
    #[error("delta file is corrupt at byte {offset}: {reason}; fetch it again")]
    Corrupt { offset: u64, reason: String },
    /// The SHA-256 trailer does not match the delta's contents.
    #[error("delta file checksum mismatch (trailer {expected}, contents hash to {actual}): the file is damaged; fetch it again")]
    ChecksumMismatch { expected: String, actual: String },
    /// The base given to `apply` is not the image the delta was built from.
    #[error("wrong base image {what}: the delta turns {expected_sha} ({expected_size} bytes) into its target, but this base is {actual_sha} ({actual_size} bytes); apply it to the version it was built from")]
    WrongBase {
        what: String,
        expected_sha: String,
        expected_size: u64,
        actual_sha: String,
        actual_size: u64,
    },
    /// The reconstructed image does not hash to the target SHA-256 (nothing was written).
    #[error("reconstructed image hashes to {actual}, the delta promises {expected}; nothing was written (the delta or the base is damaged)")]
    OutputMismatch { expected: String, actual: String },
    /// `BuildOptions` out of range.
    #[error("invalid delta build options: {0}")]
    InvalidOptions(String),
    /// An input is larger than this platform can map.
    #[error("{what} is {size} bytes, too large to map on this platform")]
    TooLarge { what: String, size: u64 },
    /// zstd failed (compression, or decompression of a frame the checksum accepted).
    #[error("zstd {op} failed: {source}")]
    Zstd {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    /// A worker thread died unexpectedly (a bug: please report it).
    #[error("internal error: {0}")]
    Internal(String),
}

impl DeltaError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        DeltaError::Io {
            op,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn corrupt(offset: u64, reason: impl Into<String>) -> Self {
        DeltaError::Corrupt {
            offset,
            reason: reason.into(),
        }
    }
}
