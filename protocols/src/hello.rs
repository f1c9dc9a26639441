//! The hello handshake, run on every new connection before any image data moves: each side
//! tells its IDC and policy and presents its bridgehead certificate, if any.

use crate::cert::BridgeheadCert;
use crate::ids::{Idc, Policy};
use libp2p::StreamProtocol;
use serde::{Deserialize, Serialize};

pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/bids/hello/1");
pub const MAX_HELLO_BYTES: usize = 8 * 1024;

/// What a peer says about itself; the same message answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub idc: Idc,
    pub policy: Policy,
    pub cert: Option<BridgeheadCert>,
}

/// The answer to a hello: our own hello, or why we refuse the peer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
// Messages are decoded once and handled at once; boxing the large variant buys nothing.
#[allow(clippy::large_enum_variant)]
pub enum HelloReply {
    Welcome(Hello),
    Refused(String),
}

pub type Codec = crate::codec::CborCodec<Hello, HelloReply>;

pub fn codec() -> Codec {
    Codec::new(MAX_HELLO_BYTES, MAX_HELLO_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
            let _ = crate::codec::decode_body::<Hello>(&bytes, MAX_HELLO_BYTES);
            let _ = crate::codec::decode_body::<HelloReply>(&bytes, MAX_HELLO_BYTES);
        }
    }
}
