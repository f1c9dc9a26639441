//! Have-announcements on each IDC's gossipsub topic: which chunks of which images a host
//! gained, batched. Never chunk data.

use crate::ids::{ChunkIndex, Idc, ImageId};
use serde::{Deserialize, Serialize};

/// Largest announcement message accepted (also the gossipsub max transmit size).
pub const MAX_ANNOUNCE_BYTES: usize = 64 * 1024;

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

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
            let _ = Announcement::from_bytes(&bytes);
        }
    }
}
