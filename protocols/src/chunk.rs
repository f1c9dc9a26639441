//! The chunk protocol: request (image id, chunk index) → chunk payload. Payloads travel
//! zstd-compressed when that is smaller; checksums are always of the raw chunk, and a
//! decompressor never produces more than the chunk's length.
//!
//! Wire format (version 2): a request is one length-prefixed CBOR frame; a response is a
//! length-prefixed CBOR head (kind; for data the encoding and payload length) followed, for
//! data, by the payload bytes themselves. Version 1 carried the payload inside the CBOR,
//! which cost a copy on each side of every chunk.

use crate::codec::{encode_frame, read_frame, write_frame};
use crate::ids::{ChunkIndex, ImageId};
use crate::MAX_CHUNK_SIZE;
use bytes::Bytes;
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use serde::{Deserialize, Serialize};
use std::io;
use std::sync::Mutex;

pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/bids/chunk/2");
/// A request is tiny.
pub const MAX_REQUEST_BYTES: usize = 256;
/// The head of a response (its kind, and for data the encoding and length).
pub const MAX_HEAD_BYTES: usize = 1024;
/// A response: at most one chunk (a compressed chunk is never larger than the raw one,
/// since we send raw then) plus its head.
pub const MAX_RESPONSE_BYTES: usize = MAX_CHUNK_SIZE as usize + 4 + MAX_HEAD_BYTES;
/// A refusal's reason is cut to this many bytes so its head always fits.
const MAX_REASON_BYTES: usize = 512;

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

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChunkResponse {
    /// The chunk's bytes, encoded as said. `Bytes`, so one payload answers several
    /// requesters (a bridgehead's cut-through relay) without a copy each.
    Data { encoding: Encoding, payload: Bytes },
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

/// A response on the wire: a length-prefixed CBOR head, then for data exactly `len` payload
/// bytes. The payload is not inside the CBOR, so it is written straight from the sender's
/// buffer and read straight into the receiver's: no encoding copy on either side of the
/// hottest path.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
enum Head {
    Data { encoding: Encoding, len: u32 },
    NotHeld,
    UnknownImage,
    BadIndex,
    Refused(String),
    Busy,
}

/// The chunk protocol's codec: CBOR requests; responses as [`Head`] plus raw payload.
#[derive(Clone, Copy, Debug, Default)]
pub struct Codec;

pub fn codec() -> Codec {
    Codec
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Reads one response: the head (at most [`MAX_HEAD_BYTES`]), then a payload of at most
/// [`MAX_CHUNK_SIZE`] bytes, refused before any allocation if announced larger.
pub async fn read_response<R: AsyncRead + Unpin>(io: &mut R) -> io::Result<ChunkResponse> {
    let head: Head = read_frame(io, MAX_HEAD_BYTES).await?;
    Ok(match head {
        Head::Data { encoding, len } => {
            let len = len as usize;
            if len > MAX_CHUNK_SIZE as usize {
                return Err(invalid(format!(
                    "peer announced a {len}-byte chunk payload, the limit is {MAX_CHUNK_SIZE}"
                )));
            }
            let mut payload = vec![0u8; len];
            io.read_exact(&mut payload).await?;
            ChunkResponse::Data {
                encoding,
                payload: payload.into(),
            }
        }
        Head::NotHeld => ChunkResponse::NotHeld,
        Head::UnknownImage => ChunkResponse::UnknownImage,
        Head::BadIndex => ChunkResponse::BadIndex,
        Head::Refused(r) => ChunkResponse::Refused(r),
        Head::Busy => ChunkResponse::Busy,
    })
}

/// Writes one response (head, then the payload from its own buffer) and flushes.
pub async fn write_response<W: AsyncWrite + Unpin>(
    io: &mut W,
    res: ChunkResponse,
) -> io::Result<()> {
    let (head, payload) = match res {
        ChunkResponse::Data { encoding, payload } => {
            if payload.len() > MAX_CHUNK_SIZE as usize {
                return Err(invalid(format!(
                    "a {}-byte payload exceeds the chunk limit of {MAX_CHUNK_SIZE}",
                    payload.len()
                )));
            }
            let len = payload.len() as u32;
            (Head::Data { encoding, len }, Some(payload))
        }
        ChunkResponse::NotHeld => (Head::NotHeld, None),
        ChunkResponse::UnknownImage => (Head::UnknownImage, None),
        ChunkResponse::BadIndex => (Head::BadIndex, None),
        ChunkResponse::Refused(r) => (Head::Refused(cut(r, MAX_REASON_BYTES)), None),
        ChunkResponse::Busy => (Head::Busy, None),
    };
    io.write_all(&encode_frame(&head, MAX_HEAD_BYTES)?).await?;
    if let Some(p) = payload {
        io.write_all(&p).await?;
    }
    io.flush().await
}

/// Cuts a string to at most `max` bytes on a character boundary.
fn cut(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

impl libp2p::request_response::Codec for Codec {
    type Protocol = StreamProtocol;
    type Request = ChunkRequest;
    type Response = ChunkResponse;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<ChunkRequest>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io, MAX_REQUEST_BYTES).await
    }

    async fn read_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<ChunkResponse>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_response(io).await
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: ChunkRequest,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &req, MAX_REQUEST_BYTES).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: ChunkResponse,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_response(io, res).await
    }
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

/// Compression contexts kept for reuse. Making one per call (its workspace allocated and its
/// tables cleared) cost more than compressing the sample of an incompressible chunk; keeping a
/// few, not one per thread, bounds the memory they hold however many threads serve.
static COMPRESSORS: Mutex<Vec<zstd::bulk::Compressor<'static>>> = Mutex::new(Vec::new());
/// How many idle contexts are kept (each holds a few MiB after a whole chunk).
const KEPT_COMPRESSORS: usize = 2;

/// zstd at [`ZSTD_LEVEL`] through a kept context (or a new one).
fn compress(data: &[u8]) -> io::Result<Vec<u8>> {
    let kept = COMPRESSORS.lock().ok().and_then(|mut v| v.pop());
    let mut c = match kept {
        Some(c) => c,
        None => zstd::bulk::Compressor::new(ZSTD_LEVEL)?,
    };
    let out = c.compress(data);
    if let Ok(mut v) = COMPRESSORS.lock() {
        if v.len() < KEPT_COMPRESSORS {
            v.push(c);
        }
    }
    out
}

/// Encodes a raw chunk for the wire: zstd if it is clearly smaller, raw otherwise (the
/// buffer itself, not a copy). A sample is tried first so incompressible chunks cost little.
pub fn encode_payload(raw: Vec<u8>) -> (Encoding, Bytes) {
    if raw.len() >= 2 * SAMPLE {
        // Sample from the middle (headers compress well even in random-ish data).
        let mid = raw.len() / 2;
        let sample = &raw[mid - SAMPLE / 2..mid + SAMPLE / 2];
        match compress(sample) {
            Ok(c) if c.len() * 10 < sample.len() * 9 => {}
            _ => {
                // Sample is nearly incompressible; try the start, which may hold text or zeros.
                match compress(&raw[..SAMPLE]) {
                    Ok(c) if c.len() * 10 < SAMPLE * 9 => {}
                    _ => return (Encoding::Raw, raw.into()),
                }
            }
        }
    }
    match compress(&raw) {
        Ok(c) if c.len() < raw.len() => (Encoding::Zstd, c.into()),
        _ => (Encoding::Raw, raw.into()),
    }
}

/// Decodes a payload into a raw chunk of exactly `want` bytes, refusing anything that
/// would inflate past it.
pub fn decode_payload(
    encoding: Encoding,
    payload: Bytes,
    want: usize,
) -> Result<Bytes, PayloadError> {
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
            Ok(out.into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::executor::block_on;
    use proptest::prelude::*;

    #[test]
    fn oversized_payloads_are_refused_before_allocation() {
        // A head announcing a payload past the chunk limit is refused as soon as it is read.
        let head = Head::Data {
            encoding: Encoding::Raw,
            len: MAX_CHUNK_SIZE + 1,
        };
        let wire = encode_frame(&head, MAX_HEAD_BYTES).unwrap();
        let e = block_on(read_response(&mut &wire[..])).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        // A payload shorter than announced is an error, not a short chunk.
        let head = Head::Data {
            encoding: Encoding::Raw,
            len: 100,
        };
        let mut wire = encode_frame(&head, MAX_HEAD_BYTES).unwrap();
        wire.extend_from_slice(&[7; 50]);
        assert!(block_on(read_response(&mut &wire[..])).is_err());
        // A head frame past its own limit is refused too.
        let mut wire = ((MAX_HEAD_BYTES + 1) as u32).to_be_bytes().to_vec();
        wire.extend_from_slice(&vec![0; MAX_HEAD_BYTES + 1]);
        assert!(block_on(read_response(&mut &wire[..])).is_err());
    }

    #[test]
    fn compressible_chunks_shrink_and_round_trip() {
        let raw: Vec<u8> = b"hello image "
            .iter()
            .cycle()
            .take(1 << 20)
            .copied()
            .collect();
        let (enc, p) = encode_payload(raw.clone());
        assert_eq!(enc, Encoding::Zstd);
        assert!(p.len() < raw.len() / 10);
        assert_eq!(decode_payload(enc, p, raw.len()).unwrap(), raw);
    }

    #[test]
    fn kept_compression_contexts_carry_nothing_between_chunks() {
        // Threads share the kept contexts; each chunk, whatever came before it on the same
        // context (other sizes, other data, incompressible samples), decodes to itself.
        let threads: Vec<_> = (0..4u8)
            .map(|t| {
                std::thread::spawn(move || {
                    for k in 0..12u32 {
                        let len = [4096usize, 100_000, 1 << 20][(k % 3) as usize];
                        let raw: Vec<u8> = if (k + t as u32).is_multiple_of(2) {
                            format!("thread {t} chunk {k} ")
                                .into_bytes()
                                .into_iter()
                                .cycle()
                                .take(len)
                                .collect()
                        } else {
                            (0..len as u32)
                                .map(|i| (i.wrapping_mul(2654435761).wrapping_add(k) >> 13) as u8)
                                .collect()
                        };
                        let (enc, p) = encode_payload(raw.clone());
                        assert_eq!(decode_payload(enc, p, raw.len()).unwrap(), raw, "{t}/{k}");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(COMPRESSORS.lock().unwrap().len() <= KEPT_COMPRESSORS);
    }

    #[test]
    fn random_chunks_travel_raw() {
        let raw: Vec<u8> = (0..1u32 << 20)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let (enc, p) = encode_payload(raw.clone());
        if enc == Encoding::Raw {
            assert_eq!(p, raw);
        }
        assert_eq!(decode_payload(enc, p, raw.len()).unwrap(), raw);
    }

    #[test]
    fn inflation_past_chunk_is_refused() {
        let bomb = zstd::bulk::compress(&vec![0u8; 64 * 1024], 3).unwrap();
        assert_eq!(
            decode_payload(Encoding::Zstd, bomb.into(), 4096),
            Err(PayloadError::TooLarge(4096))
        );
        assert!(decode_payload(Encoding::Raw, vec![1; 10].into(), 11).is_err());
    }

    proptest! {
        #[test]
        fn garbage_payloads_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096), want in 0usize..8192) {
            let _ = decode_payload(Encoding::Zstd, bytes.clone().into(), want);
            let _ = decode_payload(Encoding::Raw, bytes.into(), want);
        }

        #[test]
        fn chunk_messages_decode_safely(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = block_on(read_response(&mut &bytes[..]));
            let _ = crate::codec::decode_body::<ChunkRequest>(&bytes, MAX_REQUEST_BYTES);
        }

        #[test]
        fn responses_round_trip(
            kind in 0u8..6,
            payload in proptest::collection::vec(any::<u8>(), 0..5000),
            reason in ".{0,700}",
        ) {
            let res = match kind {
                0 => ChunkResponse::Data { encoding: Encoding::Raw, payload: payload.into() },
                1 => ChunkResponse::Data { encoding: Encoding::Zstd, payload: payload.into() },
                2 => ChunkResponse::NotHeld,
                3 => ChunkResponse::UnknownImage,
                4 => ChunkResponse::Refused(reason.clone()),
                _ => ChunkResponse::Busy,
            };
            let mut wire = Vec::new();
            block_on(write_response(&mut wire, res.clone())).unwrap();
            prop_assert!(wire.len() <= MAX_RESPONSE_BYTES);
            let back = block_on(read_response(&mut &wire[..])).unwrap();
            match (&res, &back) {
                // A long reason arrives cut on a character boundary.
                (ChunkResponse::Refused(a), ChunkResponse::Refused(b)) => {
                    prop_assert!(a.starts_with(b.as_str()) && b.len() <= MAX_REASON_BYTES);
                }
                _ => prop_assert_eq!(&res, &back),
            }
        }
    }
}
