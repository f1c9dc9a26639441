//! Wire types of BIDS: identifiers, image manifests, bridgehead certificates and the
//! messages of every protocol, with CBOR codecs that enforce size limits.
//!
//! This crate does no I/O of its own and spawns nothing: the GIS and the node drive it.

pub mod admin;
pub mod cert;
pub mod chunk;
pub mod codec;
pub mod gis;
pub mod gossip;
pub mod hello;
pub mod ids;
pub mod manifest;
pub mod peer;

pub use cert::{BridgeheadCert, CertBody, CertError, Revocations};
pub use ids::{ChunkIndex, Idc, ImageId, ImageRef, Policy, Role};
pub use manifest::{ChunkInfo, Manifest, ObjectKind};

/// Largest chunk size a node accepts. Chunk messages are limited to this plus framing.
pub const MAX_CHUNK_SIZE: u32 = 16 * 1024 * 1024;
/// Smallest chunk size (keeps manifests of large images bounded).
pub const MIN_CHUNK_SIZE: u32 = 4 * 1024;
/// A chunk size for long-RTT links: a chunk response (the payload plus ~100 bytes of
/// framing and stream negotiation) fits yamux's initial stream window of 256 KiB, so the
/// sender never waits a round trip for a window update before the response's last bytes.
/// A 256 KiB chunk just misses it and took 2 RTTs instead of 1 (measured in `bids demo`:
/// a bridgehead's first chunks, 150 ms for 256 KiB over an 80 ms RTT at 100 Mbit/s).
/// 63 pages of 4 KiB, so zero chunks stay holes on disk. The smallest default chunk size
/// ([`default_chunk_size`]).
pub const WAN_CHUNK_SIZE: u32 = 252 * 1024;
/// Most chunks one manifest may list (1 GiB at 4 KiB chunks, 256 GiB at 1 MiB).
pub const MAX_CHUNKS: u32 = 1 << 18;
/// An image cut at the default chunk size has at most this many chunks, until the chunks
/// reach their largest default size (see [`default_chunk_size`]).
pub const DEFAULT_MAX_CHUNKS: u64 = 4096;

/// The chunk size of an image of `size` bytes when its publisher names none:
/// [`WAN_CHUNK_SIZE`] doubled until the image has at most [`DEFAULT_MAX_CHUNKS`] chunks, at
/// most 64 x [`WAN_CHUNK_SIZE`] (15.75 MiB): 252 KiB up to 1008 MiB, about 1 MiB at 4 GiB,
/// 4 MiB at 16 GiB. So what a chunk costs a LAN is small against the image: the last
/// chunks of a download reach one host of an IDC first and the others from it, and that
/// tail grows with the chunk's size (measured on the netns testnet, 32 MiB, 8 hosts
/// starting together, WAN 100 / LAN 200 Mbit/s: last host 1.36 x S/B_wan with 1 MiB
/// chunks, 1.21-1.25 with 252 KiB). The chunk count stays low enough for manifests and announcements of large
/// images, as BitTorrent's piece sizes do.
pub fn default_chunk_size(size: u64) -> u32 {
    let mut cs = WAN_CHUNK_SIZE;
    while size.div_ceil(u64::from(cs)) > DEFAULT_MAX_CHUNKS && cs * 2 <= MAX_CHUNK_SIZE {
        cs *= 2;
    }
    cs
}

/// How the opener of a stream settles its protocol (multistream-select). With the default,
/// `V1`, the opener waits for the other side to confirm the protocol before it writes the
/// request: every chunk request and GIS lookup paid one round trip more than the exchange
/// itself (measured in `bids demo`: a bridgehead's first chunk request reached the remote
/// bridgehead ~130 ms after it was made over an 80 ms RTT path). Chunk, GIS and admin
/// streams propose a single protocol that the other side speaks, so `V1Lazy` sends the
/// proposal together with the request (0-RTT); the wire format is the same, and a stream
/// that proposes several (gossipsub's) still waits for the answer to all but the last.
/// Every swarm of the project (node, GIS server, GIS and admin clients, the bench's
/// reference) and the node's connection upgrades use it.
pub const STREAM_NEGOTIATION: libp2p::core::upgrade::Version =
    libp2p::core::upgrade::Version::V1Lazy;

/// Seconds since the Unix epoch, the time unit of certificates and records.
pub fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_chunk_size_keeps_images_to_a_few_thousand_chunks() {
        const MIB: u64 = 1 << 20;
        assert_eq!(default_chunk_size(0), WAN_CHUNK_SIZE);
        assert_eq!(default_chunk_size(32 * MIB), WAN_CHUNK_SIZE);
        assert_eq!(default_chunk_size(1008 * MIB), WAN_CHUNK_SIZE);
        assert_eq!(default_chunk_size(1008 * MIB + 1), 2 * WAN_CHUNK_SIZE);
        assert_eq!(default_chunk_size(4096 * MIB), 8 * WAN_CHUNK_SIZE);
        assert_eq!(default_chunk_size(1 << 50), 64 * WAN_CHUNK_SIZE);
        for size in [1, 5 * MIB, 3000 * MIB, 20_000 * MIB, 1 << 40] {
            let cs = default_chunk_size(size);
            assert!((MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&cs) && cs % 4096 == 0);
            assert!(size.div_ceil(u64::from(cs)) <= DEFAULT_MAX_CHUNKS || cs * 2 > MAX_CHUNK_SIZE);
        }
    }
}
