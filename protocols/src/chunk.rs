//! The chunk protocol: request (image id, chunk index) → chunk payload. Payloads travel
//! zstd-compressed when that is smaller; checksums are always of the raw chunk, and a
//! decompressor never produces more than the chunk's length.

use crate::ids::{ChunkIndex, ImageId};
use crate::MAX_CHUNK_SIZE;
use libp2p::StreamProtocol;
use serde::{Deserialize, Serialize};

pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/bids/chunk/1");
/// A request is tiny.
pub const MAX_REQUEST_BYTES: usize = 256;
/// A response: at most one chunk (a compressed chunk is never larger than the raw one,
/// since we send raw then) plus framing.
pub const MAX_RESPONSE_BYTES: usize = MAX_CHUNK_SIZE as usize + 1024;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRequest {
    pub image: ImageId,
    pub index: ChunkIndex,
}

/// How a payload is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Encoding {
    Raw,
    Zstd,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChunkResponse {
    /// The chunk's bytes, encoded as said.
    Data {
        encoding: Encoding,
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
    },
    /// We know the image but do not hold that chunk (yet).
    NotHeld,
    /// We do not know that image.
    UnknownImage,
    /// The index is past the image's end.
    BadIndex,
    /// The request is refused (no verified hello, IDC rule, sharing off, …): the reason.
    Refused(String),
    /// Too many requests in flight from you; try again shortly.
    Busy,
}

pub type Codec = crate::codec::CborCodec<ChunkRequest, ChunkResponse>;

pub fn codec() -> Codec {
    Codec::new(MAX_REQUEST_BYTES, MAX_RESPONSE_BYTES)
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PayloadError {
    #[error("raw payload is {got} bytes, the chunk is {want}")]
    WrongLength { got: usize, want: usize },
    #[error("compressed payload inflates past the chunk length of {0} bytes")]
    TooLarge(usize),
    #[error("compressed payload is corrupt: {0}")]
    Corrupt(String),
}

/// zstd level for chunk payloads: 3, as `zstd -3`; incompressible chunks skip it (sampled).
const ZSTD_LEVEL: i32 = 3;
/// Bytes sampled to decide whether compressing is worth it.
const SAMPLE: usize = 16 * 1024;

/// Encodes a raw chunk for the wire: zstd if it is clearly smaller, raw otherwise.
/// A sample is tried first so incompressible chunks cost little.
pub fn encode_payload(raw: &[u8]) -> (Encoding, Vec<u8>) {
    if raw.len() >= 2 * SAMPLE {
        // Sample from the middle (headers compress well even in random-ish data).
        let mid = raw.len() / 2;
        let sample = &raw[mid - SAMPLE / 2..mid + SAMPLE / 2];
        match zstd::bulk::compress(sample, ZSTD_LEVEL) {
            Ok(c) if c.len() * 10 < sample.len() * 9 => {}
            _ => {
                // Sample is nearly incompressible; try the start, which may hold text or zeros.
                match zstd::bulk::compress(&raw[..SAMPLE], ZSTD_LEVEL) {
                    Ok(c) if c.len() * 10 < SAMPLE * 9 => {}
                    _ => return (Encoding::Raw, raw.to_vec()),
                }
            }
        }
    }
    match zstd::bulk::compress(raw, ZSTD_LEVEL) {
        Ok(c) if c.len() < raw.len() => (Encoding::Zstd, c),
        _ => (Encoding::Raw, raw.to_vec()),
    }
}

/// Decodes a payload into a raw chunk of exactly `want` bytes, refusing anything that
/// would inflate past it.
pub fn decode_payload(
    encoding: Encoding,
    payload: Vec<u8>,
    want: usize,
) -> Result<Vec<u8>, PayloadError> {
    match encoding {
        Encoding::Raw => {
            if payload.len() != want {
                return Err(PayloadError::WrongLength {
                    got: payload.len(),
                    want,
                });
            }
            Ok(payload)
        }
        Encoding::Zstd => {
            // Capacity want+1 lets us tell "exactly want" from "more than want".
            let out = zstd::bulk::decompress(&payload, want + 1).map_err(|e| {
                if e.to_string().contains("Destination buffer is too small") {
                    PayloadError::TooLarge(want)
                } else {
                    PayloadError::Corrupt(e.to_string())
                }
            })?;
            if out.len() > want {
                return Err(PayloadError::TooLarge(want));
            }
            if out.len() != want {
                return Err(PayloadError::WrongLength {
                    got: out.len(),
                    want,
                });
            }
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn compressible_chunks_shrink_and_round_trip() {
        let raw: Vec<u8> = b"hello image "
            .iter()
            .cycle()
            .take(1 << 20)
            .copied()
            .collect();
        let (enc, p) = encode_payload(&raw);
        assert_eq!(enc, Encoding::Zstd);
        assert!(p.len() < raw.len() / 10);
        assert_eq!(decode_payload(enc, p, raw.len()).unwrap(), raw);
    }

    #[test]
    fn random_chunks_travel_raw() {
        let raw: Vec<u8> = (0..1u32 << 20)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let (enc, p) = encode_payload(&raw);
        if enc == Encoding::Raw {
            assert_eq!(p, raw);
        }
        assert_eq!(decode_payload(enc, p, raw.len()).unwrap(), raw);
    }

    #[test]
    fn inflation_past_chunk_is_refused() {
        let bomb = zstd::bulk::compress(&vec![0u8; 64 * 1024], 3).unwrap();
        assert_eq!(
            decode_payload(Encoding::Zstd, bomb, 4096),
            Err(PayloadError::TooLarge(4096))
        );
        assert!(decode_payload(Encoding::Raw, vec![1; 10], 11).is_err());
    }

    proptest! {
        #[test]
        fn garbage_payloads_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096), want in 0usize..8192) {
            let _ = decode_payload(Encoding::Zstd, bytes.clone(), want);
            let _ = decode_payload(Encoding::Raw, bytes, want);
        }

        #[test]
        fn chunk_messages_decode_safely(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = crate::codec::decode_body::<ChunkResponse>(&bytes, MAX_RESPONSE_BYTES);
            let _ = crate::codec::decode_body::<ChunkRequest>(&bytes, MAX_REQUEST_BYTES);
        }
    }
}
