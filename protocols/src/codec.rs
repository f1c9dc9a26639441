//! A request-response codec: each message is a 4-byte big-endian length then CBOR, with a
//! separate size limit for requests and responses so no peer can make us buffer more than a
//! message may really be.

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use serde::{de::DeserializeOwned, Serialize};
use std::io;
use std::marker::PhantomData;

/// Encodes one message: length prefix then CBOR. Fails if it exceeds `limit`.
pub fn encode_frame<T: Serialize>(msg: &T, limit: usize) -> io::Result<Vec<u8>> {
    let cbor_err = |e| io::Error::new(io::ErrorKind::InvalidData, e);
    // Size first (byte strings are only counted, not copied), so an oversized message is
    // refused before any allocation and the frame is allocated once: growing a Vec to a
    // chunk's size would copy the chunk several times.
    let mut count = Count(0);
    serde_cbor::to_writer(&mut count, msg).map_err(cbor_err)?;
    let len = count.0;
    if len > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("message of {len} bytes exceeds the limit of {limit}"),
        ));
    }
    let mut out = Vec::with_capacity(4 + len);
    out.extend_from_slice(&(len as u32).to_be_bytes());
    serde_cbor::to_writer(&mut out, msg).map_err(cbor_err)?;
    debug_assert_eq!(out.len(), 4 + len);
    Ok(out)
}

/// A writer that only counts bytes.
struct Count(usize);

impl io::Write for Count {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Decodes a CBOR body (without the length prefix) with a size check.
pub fn decode_body<T: DeserializeOwned>(body: &[u8], limit: usize) -> io::Result<T> {
    if body.len() > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "message of {} bytes exceeds the limit of {limit}",
                body.len()
            ),
        ));
    }
    serde_cbor::from_slice(body)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("malformed CBOR: {e}")))
}

/// The body length a frame's 4-byte prefix announces, refused above `limit` (before anything
/// is allocated for it); `what` names the message in the error.
pub fn frame_len(prefix: [u8; 4], limit: usize, what: &str) -> io::Result<usize> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("peer announced a {len}-byte {what}, the limit is {limit}"),
        ));
    }
    Ok(len)
}

/// Reads one length-prefixed frame, refusing lengths above `limit` before allocating.
pub async fn read_frame<R: AsyncRead + Unpin, T: DeserializeOwned>(
    io: &mut R,
    limit: usize,
) -> io::Result<T> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = frame_len(len, limit, "message")?;
    let mut buf = vec![0u8; len];
    io.read_exact(&mut buf).await?;
    decode_body(&buf, limit)
}

/// Writes one frame and flushes.
pub async fn write_frame<W: AsyncWrite + Unpin, T: Serialize>(
    io: &mut W,
    msg: &T,
    limit: usize,
) -> io::Result<()> {
    let buf = encode_frame(msg, limit)?;
    write_bytes(io, &buf).await
}

async fn write_bytes<W: AsyncWrite + Unpin>(io: &mut W, buf: &[u8]) -> io::Result<()> {
    io.write_all(buf).await?;
    io.flush().await
}

/// The CBOR codec for request-response, with explicit limits.
pub struct CborCodec<Req, Resp> {
    max_request: usize,
    max_response: usize,
    _t: PhantomData<fn() -> (Req, Resp)>,
}

impl<Req, Resp> CborCodec<Req, Resp> {
    pub fn new(max_request: usize, max_response: usize) -> Self {
        CborCodec {
            max_request,
            max_response,
            _t: PhantomData,
        }
    }
}

impl<Req, Resp> Clone for CborCodec<Req, Resp> {
    fn clone(&self) -> Self {
        Self::new(self.max_request, self.max_response)
    }
}

impl<Req, Resp> libp2p::request_response::Codec for CborCodec<Req, Resp>
where
    Req: Serialize + DeserializeOwned + Send + 'static,
    Resp: Serialize + DeserializeOwned + Send + 'static,
{
    type Protocol = StreamProtocol;
    type Request = Req;
    type Response = Resp;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Req>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io, self.max_request).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Resp>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io, self.max_response).await
    }

    async fn write_request<T>(&mut self, _: &StreamProtocol, io: &mut T, req: Req) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let buf = encode_frame(&req, self.max_request)?;
        drop(req);
        write_bytes(io, &buf).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Resp,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let buf = encode_frame(&res, self.max_response)?;
        drop(res);
        write_bytes(io, &buf).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn frame_round_trip_and_limits() {
        let msg = vec![1u32, 2, 3];
        let frame = encode_frame(&msg, 100).unwrap();
        let back: Vec<u32> = futures::executor::block_on(read_frame(&mut &frame[..], 100)).unwrap();
        assert_eq!(back, msg);
        assert!(encode_frame(&vec![0u8; 1000], 10).is_err());
        let r: io::Result<Vec<u32>> = futures::executor::block_on(read_frame(&mut &frame[..], 2));
        assert!(r.is_err());
    }

    proptest! {
        #[test]
        fn random_frames_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let r: io::Result<Vec<u32>> = futures::executor::block_on(read_frame(&mut &bytes[..], 256));
            let _ = r;
        }
    }
}
