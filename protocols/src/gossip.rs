//! Have-announcements on each IDC's gossipsub topic: which chunks of which images a host
//! gained, batched. Never chunk data.

use crate::ids::{ChunkIndex, Idc, ImageId};
use crate::peer::public_key_of;
use libp2p::identity::Keypair;
use libp2p::PeerId;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Largest announcement body accepted.
pub const MAX_ANNOUNCE_BYTES: usize = 64 * 1024;

/// Largest gossipsub message: a sealed announcement (body, sequence number, signature and
/// their CBOR framing). Also the gossipsub max transmit size.
pub const MAX_SEALED_BYTES: usize = MAX_ANNOUNCE_BYTES + 256;

/// What an announcement's signature covers first, so it can be taken for nothing else.
const SEAL_DOMAIN: &[u8] = b"bids/announcement/1\0";

/// The gossipsub topic of an IDC.
pub fn topic_name(idc: &Idc) -> String {
    format!("bids/idc/{}/chunks", idc.as_str())
}

/// Chunks of one image a host holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Have {
    pub image: ImageId,
    /// Half-open ranges `[start, end)` of chunk indexes newly held.
    pub ranges: Vec<(ChunkIndex, ChunkIndex)>,
    /// The host now holds the whole image.
    pub complete: bool,
    /// Ranges the host no longer holds (found corrupt at rest): peers stop asking it for
    /// them. Absent from older hosts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lost: Vec<(ChunkIndex, ChunkIndex)>,
}

/// One gossipsub message: a batch of haves from one host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announcement {
    pub haves: Vec<Have>,
}

impl Announcement {
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_cbor::to_vec(self).expect("an announcement always encodes")
    }
    pub fn from_bytes(b: &[u8]) -> Result<Self, String> {
        if b.len() > MAX_ANNOUNCE_BYTES {
            return Err(format!(
                "announcement of {} bytes exceeds {MAX_ANNOUNCE_BYTES}",
                b.len()
            ));
        }
        let a: Announcement =
            serde_cbor::from_slice(b).map_err(|e| format!("malformed announcement: {e}"))?;
        for h in &a.haves {
            if h.ranges.iter().chain(&h.lost).any(|(s, e)| s >= e) {
                return Err("announcement holds an empty or reversed range".into());
            }
        }
        Ok(a)
    }
}

/// An announcement as it travels on a topic: its CBOR body, signed by its author.
///
/// Gossipsub could sign every message itself, but it then checks the signature of every
/// copy a host receives, duplicates included: with flood publishing and a mesh of 6, about
/// seven ed25519 checks per announcement and host, which took 15 % of the CPU of a 32-host
/// IDC. Here the author signs and a receiver checks only a message that a peer other than
/// its author passed on ([`open`]): one delivered by its author came over the author's own
/// Noise-authenticated connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealed {
    /// Chosen by the author, different for every message it sends (so two equal bodies are
    /// two messages, and a copy replayed on another topic or as another message fails).
    pub seq: u64,
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub sig: Vec<u8>,
}

/// Why a sealed announcement was not accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error("sealed announcement of {0} bytes exceeds {MAX_SEALED_BYTES}")]
    TooLarge(usize),
    #[error("malformed sealed announcement: {0}")]
    Malformed(String),
    #[error("the author's peer id carries no public key")]
    NoKey,
    #[error("bad signature")]
    BadSignature,
}

fn signing_bytes(topic: &str, seq: u64, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(SEAL_DOMAIN.len() + 16 + topic.len() + body.len());
    v.extend_from_slice(SEAL_DOMAIN);
    v.extend_from_slice(&(topic.len() as u64).to_be_bytes());
    v.extend_from_slice(topic.as_bytes());
    v.extend_from_slice(&seq.to_be_bytes());
    v.extend_from_slice(body);
    v
}

/// Signs `body` (an [`Announcement`]'s bytes) for `topic` as message `seq` of `key`'s owner.
pub fn seal(key: &Keypair, topic: &str, seq: u64, body: Vec<u8>) -> Result<Vec<u8>, String> {
    let sig = key
        .sign(&signing_bytes(topic, seq, &body))
        .map_err(|e| format!("signing an announcement: {e}"))?;
    let bytes = serde_cbor::to_vec(&Sealed { seq, body, sig }).expect("always encodes");
    if bytes.len() > MAX_SEALED_BYTES {
        return Err(format!(
            "sealed announcement of {} bytes exceeds {MAX_SEALED_BYTES}",
            bytes.len()
        ));
    }
    Ok(bytes)
}

/// The body of a sealed announcement on `topic` whose author is `author`. `direct`: the
/// author itself delivered it over its authenticated connection, so the signature need not
/// be checked again; otherwise it must verify against the key in `author`'s peer id.
pub fn open(
    bytes: &[u8],
    topic: &str,
    author: &PeerId,
    direct: bool,
) -> Result<Vec<u8>, SealError> {
    if bytes.len() > MAX_SEALED_BYTES {
        return Err(SealError::TooLarge(bytes.len()));
    }
    let s: Sealed =
        serde_cbor::from_slice(bytes).map_err(|e| SealError::Malformed(e.to_string()))?;
    if !direct {
        let key = public_key_of(author).ok_or(SealError::NoKey)?;
        if !key.verify(&signing_bytes(topic, s.seq, &s.body), &s.sig) {
            return Err(SealError::BadSignature);
        }
    }
    Ok(s.body)
}

/// The gossipsub message id: a hash of the author and the whole message, so a forged
/// message under a real author's name never shadows the real one as a "duplicate".
pub fn message_id(author: Option<&PeerId>, data: &[u8]) -> Vec<u8> {
    let mut h = Sha256::new();
    if let Some(a) = author {
        h.update(a.to_bytes());
    }
    h.update(data);
    h.finalize()[..20].to_vec()
}

/// Compresses sorted indexes into half-open ranges.
pub fn to_ranges(sorted: &[ChunkIndex]) -> Vec<(ChunkIndex, ChunkIndex)> {
    let mut out: Vec<(ChunkIndex, ChunkIndex)> = Vec::new();
    for &i in sorted {
        match out.last_mut() {
            Some((_, e)) if *e == i => *e = i + 1,
            _ => out.push((i, i + 1)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ranges() {
        assert_eq!(
            to_ranges(&[1, 2, 3, 7, 9, 10]),
            vec![(1, 4), (7, 8), (9, 11)]
        );
        assert!(to_ranges(&[]).is_empty());
    }

    #[test]
    fn reversed_range_rejected() {
        let a = Announcement {
            haves: vec![Have {
                image: ImageId([0; 32]),
                ranges: vec![(5, 5)],
                complete: false,
                lost: Vec::new(),
            }],
        };
        assert!(Announcement::from_bytes(&a.to_bytes()).is_err());
    }

    #[test]
    fn lost_ranges_round_trip_and_older_haves_decode() {
        let a = Announcement {
            haves: vec![Have {
                image: ImageId([1; 32]),
                ranges: Vec::new(),
                complete: false,
                lost: vec![(3, 4), (9, 12)],
            }],
        };
        assert_eq!(Announcement::from_bytes(&a.to_bytes()).unwrap(), a);
        let bad = Announcement {
            haves: vec![Have {
                lost: vec![(4, 3)],
                ..a.haves[0].clone()
            }],
        };
        assert!(Announcement::from_bytes(&bad.to_bytes()).is_err());
        // What a host without the field sends.
        #[derive(Serialize)]
        struct OldHave {
            image: ImageId,
            ranges: Vec<(ChunkIndex, ChunkIndex)>,
            complete: bool,
        }
        #[derive(Serialize)]
        struct OldAnnouncement {
            haves: Vec<OldHave>,
        }
        let old = serde_cbor::to_vec(&OldAnnouncement {
            haves: vec![OldHave {
                image: ImageId([2; 32]),
                ranges: vec![(0, 2)],
                complete: true,
            }],
        })
        .unwrap();
        let back = Announcement::from_bytes(&old).unwrap();
        assert!(back.haves[0].lost.is_empty() && back.haves[0].complete);
    }

    #[test]
    fn a_sealed_announcement_opens_only_as_signed() {
        let key = Keypair::generate_ed25519();
        let me = key.public().to_peer_id();
        let body = Announcement {
            haves: vec![Have {
                image: ImageId([3; 32]),
                ranges: vec![(0, 4)],
                complete: false,
                lost: Vec::new(),
            }],
        }
        .to_bytes();
        let bytes = seal(&key, "bids/idc/a/chunks", 7, body.clone()).unwrap();
        // Passed on by another peer: checked, and fine.
        assert_eq!(open(&bytes, "bids/idc/a/chunks", &me, false).unwrap(), body);
        // Under another author's name, on another topic, or with the body changed: refused.
        let other = Keypair::generate_ed25519().public().to_peer_id();
        assert_eq!(
            open(&bytes, "bids/idc/a/chunks", &other, false),
            Err(SealError::BadSignature)
        );
        assert_eq!(
            open(&bytes, "bids/idc/b/chunks", &me, false),
            Err(SealError::BadSignature)
        );
        let mut s: Sealed = serde_cbor::from_slice(&bytes).unwrap();
        s.body.push(0);
        let forged = serde_cbor::to_vec(&s).unwrap();
        assert_eq!(
            open(&forged, "bids/idc/a/chunks", &me, false),
            Err(SealError::BadSignature)
        );
        s.body.pop();
        s.seq = 8;
        let replayed = serde_cbor::to_vec(&s).unwrap();
        assert_eq!(
            open(&replayed, "bids/idc/a/chunks", &me, false),
            Err(SealError::BadSignature)
        );
        // Delivered by its author over its own connection: not checked again.
        assert_eq!(
            open(&forged, "bids/idc/a/chunks", &me, true).unwrap().len(),
            body.len() + 1
        );
        // Different messages (even of one body) have different ids.
        let again = seal(&key, "bids/idc/a/chunks", 8, body).unwrap();
        assert_ne!(message_id(Some(&me), &bytes), message_id(Some(&me), &again));
        assert_ne!(
            message_id(Some(&me), &bytes),
            message_id(Some(&other), &bytes)
        );
    }

    #[test]
    fn oversized_sealed_announcements_are_refused() {
        let key = Keypair::generate_ed25519();
        assert!(seal(&key, "t", 1, vec![0; MAX_SEALED_BYTES]).is_err());
        let me = key.public().to_peer_id();
        assert_eq!(
            open(&vec![0; MAX_SEALED_BYTES + 1], "t", &me, false),
            Err(SealError::TooLarge(MAX_SEALED_BYTES + 1))
        );
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
            let _ = Announcement::from_bytes(&bytes);
            let me = PeerId::random();
            let _ = open(&bytes, "t", &me, false);
            let _ = open(&bytes, "t", &me, true);
        }
    }
}
