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
            if h.ranges.iter().any(|(s, e)| s >= e) {
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
            }],
        };
        assert!(Announcement::from_bytes(&a.to_bytes()).is_err());
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
            let _ = Announcement::from_bytes(&bytes);
        }
    }
}
