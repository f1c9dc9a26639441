//! Image manifests: what an image (or delta file) is, chunk by chunk. The image id is the
//! SHA-256 of the manifest's canonical CBOR bytes, so a manifest proves itself.

use crate::ids::{ChunkIndex, ImageId, ImageRef};
use crate::{MAX_CHUNKS, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Largest encoded manifest accepted from anywhere.
pub const MAX_MANIFEST_BYTES: usize = 96 * (MAX_CHUNKS as usize) + 4096;

/// Per-chunk checksums.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkInfo {
    /// SHA-256 of the raw chunk: the check every chunk passes before it is stored or served.
    #[serde(with = "serde_bytes")]
    pub sha256: [u8; 32],
    /// MD5 of the raw chunk: the paper's transmission checksum, kept for tools that expect it.
    #[serde(with = "serde_bytes")]
    pub md5: [u8; 16],
    /// The chunk is all zeros: it never travels and stays a hole on disk.
    pub zero: bool,
}

/// What a manifest describes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ObjectKind {
    /// A whole image version.
    Image,
    /// A delta file that turns image `from` into image `to` (both versions of one base).
    Delta { from: ImageId, to: ImageId },
}

/// The manifest of one image version (or delta file).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub name: String,
    pub version: String,
    /// The image version this one derives from, if any.
    pub base: Option<ImageRef>,
    pub kind: ObjectKind,
    /// Size in bytes of the whole object.
    pub size: u64,
    pub chunk_size: u32,
    pub chunks: Vec<ChunkInfo>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error("manifest is not valid CBOR: {0}")]
    Decode(String),
    #[error("manifest is {0} bytes, more than the limit of {MAX_MANIFEST_BYTES}")]
    TooLarge(usize),
    #[error("manifest is inconsistent: {0}")]
    Invalid(String),
    #[error("manifest hashes to {actual} but was announced as {expected}")]
    IdMismatch { expected: ImageId, actual: ImageId },
}

impl Manifest {
    /// Canonical bytes: CBOR of the struct, fields in declaration order.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_cbor::to_vec(self).expect("a manifest always encodes")
    }

    /// The image id: SHA-256 of the canonical bytes.
    pub fn id(&self) -> ImageId {
        ImageId(Sha256::digest(self.to_bytes()).into())
    }

    pub fn image_ref(&self) -> ImageRef {
        ImageRef {
            name: self.name.clone(),
            version: self.version.clone(),
        }
    }

    pub fn chunk_count(&self) -> u32 {
        self.chunks.len() as u32
    }

    /// Length of chunk `index` (the last one may be short).
    pub fn chunk_len(&self, index: ChunkIndex) -> usize {
        let start = index as u64 * self.chunk_size as u64;
        (self.size.saturating_sub(start)).min(self.chunk_size as u64) as usize
    }

    /// Byte offset of chunk `index` in the object.
    pub fn chunk_offset(&self, index: ChunkIndex) -> u64 {
        index as u64 * self.chunk_size as u64
    }

    /// Number of chunks that are not all zeros (the ones that must travel).
    pub fn data_chunks(&self) -> u32 {
        self.chunks.iter().filter(|c| !c.zero).count() as u32
    }

    /// Decodes and validates a manifest from untrusted bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ManifestError> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge(bytes.len()));
        }
        let m: Manifest =
            serde_cbor::from_slice(bytes).map_err(|e| ManifestError::Decode(e.to_string()))?;
        m.validate()?;
        Ok(m)
    }

    /// Decodes, validates and checks the bytes hash to `expected`.
    pub fn from_bytes_with_id(bytes: &[u8], expected: ImageId) -> Result<Self, ManifestError> {
        let m = Self::from_bytes(bytes)?;
        let actual = m.id();
        if actual != expected {
            return Err(ManifestError::IdMismatch { expected, actual });
        }
        Ok(m)
    }

    /// Checks internal consistency: names, chunk size, chunk count matches size.
    pub fn validate(&self) -> Result<(), ManifestError> {
        let inv = |s: String| Err(ManifestError::Invalid(s));
        if let Err(e) = ImageRef::new(&self.name, &self.version) {
            return inv(e);
        }
        if let Some(b) = &self.base {
            if let Err(e) = b.validate() {
                return inv(format!("base: {e}"));
            }
        }
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&self.chunk_size) {
            return inv(format!(
                "chunk size {} is outside {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}",
                self.chunk_size
            ));
        }
        if !self.chunk_size.is_multiple_of(4096) {
            return inv(format!(
                "chunk size {} is not a multiple of 4096",
                self.chunk_size
            ));
        }
        // An empty image has no chunk whose arrival could complete its download: a fetch
        // of it would wait forever. Nothing needs distributing, so it is refused here, on
        // import and on every manifest read from the wire or from disk alike.
        if self.size == 0 {
            return inv(format!(
                "image {}:{} is empty (0 bytes, no chunks); there is nothing to distribute",
                self.name, self.version
            ));
        }
        let expected = self.size.div_ceil(self.chunk_size as u64);
        if expected != self.chunks.len() as u64 {
            return inv(format!(
                "{} bytes in chunks of {} need {expected} chunks, manifest lists {}",
                self.size,
                self.chunk_size,
                self.chunks.len()
            ));
        }
        if self.chunks.len() > MAX_CHUNKS as usize {
            return inv(format!("more than {MAX_CHUNKS} chunks"));
        }
        Ok(())
    }
}

/// Checksums of one raw chunk.
pub fn chunk_info(data: &[u8]) -> ChunkInfo {
    let zero = is_zero(data);
    ChunkInfo {
        sha256: Sha256::digest(data).into(),
        md5: md5::Md5::digest(data).into(),
        zero,
    }
}

/// SHA-256 of a chunk, the hot-path check.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// True if every byte is zero (word-at-a-time).
pub fn is_zero(data: &[u8]) -> bool {
    let (pre, mid, post) = unsafe { data.align_to::<u128>() };
    pre.iter().all(|&b| b == 0) && mid.iter().all(|&w| w == 0) && post.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Manifest {
        let data = vec![1u8; 5000];
        Manifest {
            name: "deb".into(),
            version: "1".into(),
            base: None,
            kind: ObjectKind::Image,
            size: 5000,
            chunk_size: 4096,
            chunks: vec![chunk_info(&data[..4096]), chunk_info(&data[4096..])],
        }
    }

    #[test]
    fn round_trip_and_id() {
        let m = sample();
        let b = m.to_bytes();
        let m2 = Manifest::from_bytes_with_id(&b, m.id()).unwrap();
        assert_eq!(m, m2);
        assert_eq!(m.chunk_len(1), 904);
        assert!(matches!(
            Manifest::from_bytes_with_id(&b, ImageId([0; 32])),
            Err(ManifestError::IdMismatch { .. })
        ));
    }

    #[test]
    fn inconsistent_rejected() {
        let mut m = sample();
        m.size = 10_000;
        assert!(Manifest::from_bytes(&m.to_bytes()).is_err());
        let mut m = sample();
        m.chunk_size = 3;
        assert!(Manifest::from_bytes(&m.to_bytes()).is_err());
    }

    #[test]
    fn empty_image_rejected() {
        let m = Manifest {
            size: 0,
            chunks: Vec::new(),
            ..sample()
        };
        // As a peer or the GIS would send it: decoding refuses it, nothing waits on it.
        let e = Manifest::from_bytes(&m.to_bytes()).unwrap_err().to_string();
        assert!(e.contains("is empty"), "{e}");
        assert!(m.validate().is_err());
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0u8; 1000]));
        let mut v = vec![0u8; 1001];
        v[1000] = 1;
        assert!(!is_zero(&v));
        assert!(is_zero(&[]));
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = Manifest::from_bytes(&bytes);
        }
    }
}
