//! Peer identities: the public key an ed25519 `PeerId` carries (used to check signatures
//! by the admin, whose identity is configured as a `PeerId`).

use libp2p::identity::PublicKey;
use libp2p::PeerId;

/// The ed25519 public key inside an identity-multihash `PeerId`, if it holds one.
pub fn public_key_of(peer: &PeerId) -> Option<PublicKey> {
    let mh: &libp2p::multihash::Multihash<64> = peer.as_ref();
    if mh.code() != 0 {
        return None;
    }
    PublicKey::try_decode_protobuf(mh.digest()).ok()
}
