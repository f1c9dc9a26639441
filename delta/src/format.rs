//! The on-disk layout of a delta file: header, body records, trailer (see `delta/FORMAT.md`).
//! Pure encoding and decoding of bytes; building and applying live in `build` and `apply`.

use crate::DeltaError;

/// First seven bytes of every delta file.
pub const MAGIC: &[u8; 7] = b"BIDSDLT";
/// Format version written by this build. It reads every version from 1 to this one.
pub const VERSION: u8 = 4;
/// Oldest format version this build still reads.
pub const MIN_VERSION: u8 = 1;
/// Size of the fixed header in bytes.
pub const HEADER_LEN: usize = 104;
/// Size of the SHA-256 trailer in bytes.
pub const TRAILER_LEN: usize = 32;
/// Largest literal frame (uncompressed) a decoder accepts in a version 1 delta. Bounds the
/// decoder's memory whatever the delta claims.
pub const MAX_FRAME: usize = 16 << 20;
/// Largest literal frame (uncompressed) in a version 2 delta: bigger frames let the
/// literal compressor see more of the new data at once (builders default to 24 MiB).
pub const MAX_FRAME_V2: usize = 64 << 20;
/// Largest decompressed instruction block (`OPS_ZSTD`) a decoder accepts.
pub const MAX_OPS_BLOCK: usize = 4 << 20;
/// Largest reference (bytes of the base a `LIT_ZSTD_REF` frame is compressed against) a
/// decoder assembles, version 3.
pub const MAX_REFERENCE: usize = 64 << 20;
/// Most base ranges one reference may list, version 3.
pub const MAX_REFERENCE_RANGES: u64 = 1 << 16;

/// Record tags of the body.
pub(crate) const TAG_END: u8 = 0x00;
pub(crate) const TAG_COPY: u8 = 0x01;
pub(crate) const TAG_ZERO: u8 = 0x02;
pub(crate) const TAG_DATA: u8 = 0x03;
pub(crate) const TAG_LIT_ZSTD: u8 = 0x04;
pub(crate) const TAG_LIT_RAW: u8 = 0x05;
/// Version 2: copy from the output already written.
pub(crate) const TAG_COPY_OUT: u8 = 0x06;
/// Version 2: a zstd-compressed block of COPY, COPY_OUT, ZERO and DATA records.
pub(crate) const TAG_OPS_ZSTD: u8 = 0x07;
/// Version 3: a literal frame compressed with zstd, with flags: its bytes went through
/// the x86 branch filter, and/or ranges of the base are zstd's reference prefix.
pub(crate) const TAG_LIT_ZSTD_EX: u8 = 0x08;
/// LIT_ZSTD_EX flag: undo the x86 branch filter after decompressing.
pub(crate) const LIT_FLAG_X86: u64 = 1;
/// LIT_ZSTD_EX flag: a reference (ranges of the base) follows the flags.
pub(crate) const LIT_FLAG_REFERENCE: u64 = 2;
/// Version 4 flag of LIT_ZSTD_EX and LIT_LZMA: ranges of the output already written
/// follow (after the base's, if any) and end the reference.
pub(crate) const LIT_FLAG_OUT_REFERENCE: u64 = 4;

/// The fixed header of a delta file: what it turns into what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeltaHeader {
    /// Format version (1 to 4).
    pub version: u8,
    /// Block size the builder indexed the base with (informational: apply does not need it).
    pub block_size: u32,
    /// Size in bytes of the base image A.
    pub from_size: u64,
    /// Size in bytes of the target image B.
    pub to_size: u64,
    /// Length in bytes of the record body that follows the header.
    pub body_len: u64,
    /// SHA-256 of the base image A.
    pub from_sha256: [u8; 32],
    /// SHA-256 of the target image B.
    pub to_sha256: [u8; 32],
}

impl DeltaHeader {
    /// Total length of a well-formed delta file with this header.
    pub fn file_len(&self) -> u64 {
        (HEADER_LEN as u64)
            .saturating_add(self.body_len)
            .saturating_add(TRAILER_LEN as u64)
    }

    /// Lower-case hex of the base SHA-256.
    pub fn from_hex(&self) -> String {
        hex::encode(self.from_sha256)
    }

    /// Lower-case hex of the target SHA-256.
    pub fn to_hex(&self) -> String {
        hex::encode(self.to_sha256)
    }

    pub(crate) fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..7].copy_from_slice(MAGIC);
        h[7] = self.version;
        h[8..12].copy_from_slice(&self.block_size.to_le_bytes());
        // 12..16: flags, reserved, zero in version 1.
        h[16..24].copy_from_slice(&self.from_size.to_le_bytes());
        h[24..32].copy_from_slice(&self.to_size.to_le_bytes());
        h[32..40].copy_from_slice(&self.body_len.to_le_bytes());
        h[40..72].copy_from_slice(&self.from_sha256);
        h[72..104].copy_from_slice(&self.to_sha256);
        h
    }

    /// Parses the header from the first bytes of a delta; `what` names the source in errors.
    pub(crate) fn decode(bytes: &[u8], what: &str) -> Result<Self, DeltaError> {
        if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
            return Err(DeltaError::NotADelta {
                what: what.to_string(),
            });
        }
        if bytes.len() < HEADER_LEN {
            return Err(DeltaError::Truncated {
                expected: HEADER_LEN as u64,
                actual: bytes.len() as u64,
            });
        }
        let version = bytes[7];
        if !(MIN_VERSION..=VERSION).contains(&version) {
            return Err(DeltaError::UnsupportedVersion {
                found: version,
                supported: VERSION,
            });
        }
        let u32_at = |o: usize| {
            let mut b = [0u8; 4];
            b.copy_from_slice(&bytes[o..o + 4]);
            u32::from_le_bytes(b)
        };
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[o..o + 8]);
            u64::from_le_bytes(b)
        };
        let flags = u32_at(12);
        if flags != 0 {
            return Err(DeltaError::corrupt(
                12,
                format!("unknown header flags {flags:#x} (versions 1 and 2 define none)"),
            ));
        }
        let mut from_sha256 = [0u8; 32];
        from_sha256.copy_from_slice(&bytes[40..72]);
        let mut to_sha256 = [0u8; 32];
        to_sha256.copy_from_slice(&bytes[72..104]);
        Ok(DeltaHeader {
            version,
            block_size: u32_at(8),
            from_size: u64_at(16),
            to_size: u64_at(24),
            body_len: u64_at(32),
            from_sha256,
            to_sha256,
        })
    }
}

/// Appends `v` as an unsigned LEB128 varint (at most 10 bytes).
pub(crate) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Appends a reference range list of a `LIT_ZSTD_EX` frame: the count, then each range's
/// start and length.
pub(crate) fn put_ranges(out: &mut Vec<u8>, ranges: &[(u64, u64)]) {
    put_varint(out, ranges.len() as u64);
    for &(start, len) in ranges {
        put_varint(out, start);
        put_varint(out, len);
    }
}

/// A cursor over the body that turns every short read or malformed value into a
/// `Corrupt` error carrying the absolute file offset.
pub(crate) struct BodyReader<'a> {
    buf: &'a [u8],
    pos: usize,
    base_offset: u64,
}

impl<'a> BodyReader<'a> {
    pub(crate) fn new(buf: &'a [u8], base_offset: u64) -> Self {
        BodyReader {
            buf,
            pos: 0,
            base_offset,
        }
    }

    /// Absolute offset (in the delta file) of the next unread byte.
    pub(crate) fn offset(&self) -> u64 {
        self.base_offset + self.pos as u64
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(crate) fn err(&self, reason: impl Into<String>) -> DeltaError {
        DeltaError::corrupt(self.offset(), reason)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DeltaError> {
        match self.buf.get(self.pos) {
            Some(&b) => {
                self.pos += 1;
                Ok(b)
            }
            None => Err(self.err("body ends inside a record")),
        }
    }

    pub(crate) fn varint(&mut self) -> Result<u64, DeltaError> {
        let start = self.offset();
        let mut v: u64 = 0;
        for i in 0..10 {
            let b = self.u8()?;
            let part = u64::from(b & 0x7f);
            // The tenth byte may only carry the top bit of a u64.
            if i == 9 && part > 1 {
                return Err(DeltaError::corrupt(start, "varint overflows 64 bits"));
            }
            v |= part << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(DeltaError::corrupt(start, "varint longer than 10 bytes"))
    }

    /// Takes `len` bytes; `len` is checked against what is left before anything is sliced.
    pub(crate) fn bytes(&mut self, len: u64) -> Result<&'a [u8], DeltaError> {
        if len > self.remaining() as u64 {
            return Err(self.err(format!(
                "record claims {len} bytes, only {} left in the body",
                self.remaining()
            )));
        }
        let len = len as usize;
        let s = &self.buf[self.pos..self.pos + len];
        self.pos += len;
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_roundtrip_and_limits() {
        for v in [
            0u64,
            1,
            127,
            128,
            300,
            u32::MAX as u64,
            u64::MAX - 1,
            u64::MAX,
        ] {
            let mut buf = Vec::new();
            put_varint(&mut buf, v);
            let mut r = BodyReader::new(&buf, 0);
            assert_eq!(r.varint().unwrap(), v);
            assert_eq!(r.remaining(), 0);
        }
        // 11 continuation bytes: rejected, not looped forever.
        let long = [0xffu8; 11];
        assert!(BodyReader::new(&long, 0).varint().is_err());
        // Tenth byte with more than the top bit set.
        let mut over = [0xffu8; 10];
        over[9] = 0x02;
        assert!(BodyReader::new(&over, 0).varint().is_err());
        // Truncated varint.
        assert!(BodyReader::new(&[0x80], 0).varint().is_err());
    }

    #[test]
    fn header_roundtrip_and_rejects() {
        let h = DeltaHeader {
            version: VERSION,
            block_size: 4096,
            from_size: 1 << 30,
            to_size: 12345,
            body_len: 99,
            from_sha256: [1; 32],
            to_sha256: [2; 32],
        };
        let enc = h.encode();
        assert_eq!(DeltaHeader::decode(&enc, "t").unwrap(), h);
        assert_eq!(h.file_len(), 104 + 99 + 32);

        let mut bad = enc;
        bad[0] = b'X';
        assert!(matches!(
            DeltaHeader::decode(&bad, "t"),
            Err(DeltaError::NotADelta { .. })
        ));
        let mut v1 = enc;
        v1[7] = 1;
        assert_eq!(DeltaHeader::decode(&v1, "t").unwrap().version, 1);
        for bad in [0u8, VERSION + 1] {
            let mut v = enc;
            v[7] = bad;
            assert!(matches!(
                DeltaHeader::decode(&v, "t"),
                Err(DeltaError::UnsupportedVersion { found, .. }) if found == bad
            ));
        }
        let mut flags = enc;
        flags[13] = 1;
        assert!(matches!(
            DeltaHeader::decode(&flags, "t"),
            Err(DeltaError::Corrupt { .. })
        ));
        assert!(matches!(
            DeltaHeader::decode(&enc[..50], "t"),
            Err(DeltaError::Truncated { .. })
        ));
    }

    #[test]
    fn reader_bounds_checked() {
        let mut r = BodyReader::new(&[1, 2, 3], 104);
        assert!(r.bytes(4).is_err());
        assert_eq!(r.bytes(2).unwrap(), &[1, 2]);
        assert_eq!(r.offset(), 106);
        assert!(r.bytes(u64::MAX).is_err());
    }
}
