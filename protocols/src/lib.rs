//! Wire types of BIDS: identifiers, image manifests, bridgehead certificates and the
//! messages of every protocol, with CBOR codecs that enforce size limits.
//!
//! This crate does no I/O of its own and spawns nothing: the GIS and the node drive it.

pub mod admin;
pub mod cert;
pub mod chunk;
pub mod codec;
pub mod gis;
pub mod gis_session;
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
/// Default chunk size: 1 MiB, as in the design.
pub const DEFAULT_CHUNK_SIZE: u32 = 1024 * 1024;
/// A chunk size for long-RTT links: a chunk response (the payload plus ~100 bytes of
/// framing and stream negotiation) fits yamux's initial stream window of 256 KiB, so the
/// sender never waits a round trip for a window update before the response's last bytes.
/// A 256 KiB chunk just misses it and took 2 RTTs instead of 1 (measured in `bids demo`:
/// a bridgehead's first chunks, 150 ms for 256 KiB over an 80 ms RTT at 100 Mbit/s).
/// 63 pages of 4 KiB, so zero chunks stay holes on disk. `bids demo` and the netns
/// evaluation use it.
pub const WAN_CHUNK_SIZE: u32 = 252 * 1024;
/// Most chunks one manifest may list (1 GiB at 4 KiB chunks, 256 GiB at 1 MiB).
pub const MAX_CHUNKS: u32 = 1 << 18;

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
