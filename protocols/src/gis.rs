//! The GIS protocol: hosts register, heartbeat (liveness and transfer counters), publish what
//! they hold and look up hierarchical host lists; the admin revokes certificates.

use crate::cert::{BridgeheadCert, Revocations};
use crate::ids::{Idc, ImageId, ImageRef, Policy, Role};
use crate::manifest::MAX_MANIFEST_BYTES;
use libp2p::{Multiaddr, PeerId, StreamProtocol};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/bids/gis/1");
/// A request may carry one manifest plus a bounded amount of other data.
pub const MAX_REQUEST_BYTES: usize = MAX_MANIFEST_BYTES + 256 * 1024;
/// A response may carry one manifest plus host lists.
pub const MAX_RESPONSE_BYTES: usize = MAX_MANIFEST_BYTES + 1024 * 1024;
/// Most addresses one host may register.
pub const MAX_ADDRS: usize = 16;
/// Most hosts per level in a host list.
pub const MAX_LEVEL_HOSTS: usize = 64;
/// Most held versions one `UpgradePath` request may name.
pub const MAX_HAVE: usize = 4096;

/// Byte and chunk counters, split LAN (same IDC) / WAN (other IDC).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub lan_sent_bytes: u64,
    pub lan_recv_bytes: u64,
    pub wan_sent_bytes: u64,
    pub wan_recv_bytes: u64,
    pub lan_sent_chunks: u64,
    pub lan_recv_chunks: u64,
    pub wan_sent_chunks: u64,
    pub wan_recv_chunks: u64,
    /// Chunks that failed verification (received from others).
    pub bad_chunks: u64,
    /// Of the LAN bytes, those sent to and received from certified bridgeheads of our own
    /// IDC; the rest went to or came from ordinary hosts (`hosts_*`). WAN bytes are those
    /// exchanged with other IDCs (remote bridgeheads under BIDS). Absent from older nodes.
    #[serde(default)]
    pub bridgehead_sent_bytes: u64,
    #[serde(default)]
    pub bridgehead_recv_bytes: u64,
    #[serde(default)]
    pub hosts_sent_bytes: u64,
    #[serde(default)]
    pub hosts_recv_bytes: u64,
    /// Time spent downloading the image while some host or bridgehead of our IDC held a
    /// chunk we lacked, and the LAN bytes received meanwhile: together, the LAN download
    /// rate while the IDC could have kept this host busy. Absent from older nodes.
    #[serde(default)]
    pub lan_available_ms: u64,
    #[serde(default)]
    pub lan_available_recv_bytes: u64,
}

impl Counters {
    pub fn add(&mut self, o: &Counters) {
        self.lan_sent_bytes += o.lan_sent_bytes;
        self.lan_recv_bytes += o.lan_recv_bytes;
        self.wan_sent_bytes += o.wan_sent_bytes;
        self.wan_recv_bytes += o.wan_recv_bytes;
        self.lan_sent_chunks += o.lan_sent_chunks;
        self.lan_recv_chunks += o.lan_recv_chunks;
        self.wan_sent_chunks += o.wan_sent_chunks;
        self.wan_recv_chunks += o.wan_recv_chunks;
        self.bad_chunks += o.bad_chunks;
        self.bridgehead_sent_bytes += o.bridgehead_sent_bytes;
        self.bridgehead_recv_bytes += o.bridgehead_recv_bytes;
        self.hosts_sent_bytes += o.hosts_sent_bytes;
        self.hosts_recv_bytes += o.hosts_recv_bytes;
        self.lan_available_ms += o.lan_available_ms;
        self.lan_available_recv_bytes += o.lan_available_recv_bytes;
    }
}

/// What a host reports in each heartbeat.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostStats {
    /// Totals since the node started.
    pub total: Counters,
    /// Per image.
    pub images: BTreeMap<ImageId, Counters>,
    /// Cross-IDC connections refused (bad or missing certificate, IDC rule).
    pub refusals: u64,
    /// The host's live distribution settings, for the console (absent from older nodes).
    #[serde(default)]
    pub settings: Option<HostSettings>,
    /// How long each image it downloaded took, as the host measured it (absent from older
    /// nodes; an image removed from the host leaves this map).
    #[serde(default)]
    pub provisions: BTreeMap<ImageId, ProvisionTime>,
    /// Peers this host banned for serving it corrupt chunks (until its ban expires): the GIS
    /// no longer lists them to it. Absent from older nodes.
    #[serde(default)]
    pub banned: Vec<PeerId>,
}

/// One image's provision time on one host: from the start of its download to its last chunk
/// verified and stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProvisionTime {
    /// Milliseconds, rounded up (never 0 for a download that happened).
    pub millis: u64,
    /// Unix ms when the download completed.
    pub completed_ms: i64,
}

/// A host's rate limits (bytes/s, 0 = unlimited) and whether it serves chunks to others.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostSettings {
    pub upload_bps: u64,
    pub download_bps: u64,
    pub sharing: bool,
}

/// How much of an image a host holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holding {
    pub image: ImageId,
    /// Data chunks held (zero chunks count as held).
    pub chunks_held: u32,
    pub complete: bool,
    /// The host is downloading it now.
    pub fetching: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
// Messages are decoded once and handled at once; boxing the large variant buys nothing.
#[allow(clippy::large_enum_variant)]
pub enum GisRequest {
    /// A host joins (or rejoins after a restart).
    Register {
        idc: Idc,
        addrs: Vec<Multiaddr>,
        cert: Option<BridgeheadCert>,
        policy: Policy,
    },
    /// Liveness plus counters.
    Heartbeat { stats: HostStats },
    /// The host holds (part of) an image. `manifest` is the manifest's canonical bytes; the
    /// GIS checks they hash to `holding.image`.
    Publish {
        holding: Holding,
        #[serde(with = "serde_bytes")]
        manifest: Vec<u8>,
    },
    /// The host no longer holds an image.
    Unpublish { image: ImageId },
    /// Hierarchical host list for an image, by name or by id. Registered hosts leave `idc`
    /// empty and get their own view. A peer that has not registered (a tool such as
    /// `bids lookup`) names an IDC and gets what an ordinary host of that IDC would get.
    Lookup {
        image: ImageQuery,
        #[serde(default)]
        idc: Option<Idc>,
    },
    /// A registered host's periodic refresh of a download in progress: the host list of
    /// `Lookup` by id, but with an empty `manifest` (the host has it; a manifest is ~0.1 %
    /// of its image and a download refreshes every few seconds, over the WAN when the GIS
    /// is in another IDC).
    Refresh {
        image: ImageId,
        /// `HostList::digest` of the last host list the host took for this download: if
        /// the answer would have the same digest, the GIS answers `Unchanged` instead of
        /// sending the list again. Absent from older hosts (they always get the list).
        #[serde(default)]
        known: Option<u64>,
    },
    /// Admin only: revoke a certificate serial.
    Revoke { serial: u64 },
    /// The cheapest way for a host holding the versions `have` to get `want`: a chain of
    /// delta files starting at one of them, or the whole image, whichever moves fewer bytes.
    UpgradePath {
        have: Vec<ImageId>,
        want: ImageQuery,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ImageQuery {
    Ref(ImageRef),
    Id(ImageId),
}

/// One host in a host list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostEntry {
    pub peer: PeerId,
    pub idc: Idc,
    pub role: Role,
    pub addrs: Vec<Multiaddr>,
    pub chunks_held: u32,
    pub complete: bool,
    /// Level 2 only: the bridgehead's IDC holds the whole image, so the bridgehead can supply
    /// every chunk (it pulls what it lacks from its own LAN). Otherwise it is itself fetching
    /// and supplies only the chunks it announces.
    #[serde(default)]
    pub idc_complete: bool,
}

/// Summary of an image, as the GIS knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    pub name: String,
    pub version: String,
    pub id: ImageId,
    pub size: u64,
    pub chunk_size: u32,
}

/// The paper's hierarchical host list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostList {
    pub image: ImageInfo,
    /// The canonical manifest bytes (they hash to `image.id`); empty in answer to `Refresh`.
    #[serde(with = "serde_bytes")]
    pub manifest: Vec<u8>,
    /// Live hosts of the requester's IDC holding the image, best first.
    pub level0: Vec<HostEntry>,
    /// The bridgehead of the requester's IDC chosen for this image, when the image is not
    /// fully present in the IDC.
    pub level1: Vec<HostEntry>,
    /// Only for a bridgehead: bridgeheads of other IDCs chosen for this image that hold or
    /// are fetching it.
    pub level2: Vec<HostEntry>,
}

impl HostList {
    /// What a host acts on in this list, as one number: for each level, its hosts' peer
    /// id, IDC, role, addresses, `complete` and `idc_complete`, taken in peer-id order.
    /// Left out: `chunks_held` and the order within a level (they move with every
    /// progress report, and a host does not act on them), the image and the manifest (a
    /// refresh names its image). Equal digests: a refresh has nothing new to tell.
    pub fn digest(&self) -> u64 {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(b"bids host list digest v1");
        for level in [&self.level0, &self.level1, &self.level2] {
            let mut hosts: Vec<&HostEntry> = level.iter().collect();
            hosts.sort_by_key(|e| e.peer);
            h.update((hosts.len() as u64).to_le_bytes());
            for e in hosts {
                let peer = e.peer.to_bytes();
                h.update((peer.len() as u64).to_le_bytes());
                h.update(&peer);
                h.update((e.idc.0.len() as u64).to_le_bytes());
                h.update(e.idc.0.as_bytes());
                h.update([
                    matches!(e.role, Role::Bridgehead) as u8,
                    e.complete as u8,
                    e.idc_complete as u8,
                ]);
                h.update((e.addrs.len() as u64).to_le_bytes());
                for a in &e.addrs {
                    let a = a.as_ref();
                    h.update((a.len() as u64).to_le_bytes());
                    h.update(a);
                }
            }
        }
        let d = h.finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&d[..8]);
        u64::from_le_bytes(first)
    }
}

/// How a host gets image `target` (the answer to `GisRequest::UpgradePath`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradePath {
    pub target: ImageInfo,
    /// The target's canonical manifest bytes (they hash to `target.id`).
    #[serde(with = "serde_bytes")]
    pub manifest: Vec<u8>,
    /// The held version the delta chain starts from; `None`: fetch the whole image.
    /// `Some(target.id)` with no steps: the host already holds the target.
    pub base: Option<ImageId>,
    /// Delta files to fetch and apply in order (empty: fetch whole, or already held).
    pub steps: Vec<ImageInfo>,
    /// Bytes this path moves: the steps' non-zero chunks, or the target's.
    pub bytes: u64,
    /// Bytes the whole target would move (its non-zero chunks), for comparison.
    pub full_bytes: u64,
}

/// Machine-readable error kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    BadRequest,
    UnknownImage,
    NotRegistered,
    BadCert,
    Forbidden,
    ManifestMismatch,
    Internal,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum GisResponse {
    Registered {
        /// The role the GIS granted (bridgehead only with a valid certificate).
        role: Role,
        heartbeat_secs: u32,
        /// Current revocations, so nodes can refuse revoked bridgeheads.
        revocations: Revocations,
        /// For a bridgehead only: the live bridgeheads of the other IDCs (see `Ack`).
        #[serde(default)]
        bridgeheads: Vec<HostEntry>,
    },
    Ack {
        revocations: Revocations,
        /// Answering a bridgehead's heartbeat: the live bridgeheads of the other IDCs, at
        /// most `MAX_LEVEL_HOSTS`, so it keeps its cross-IDC links open before an image needs
        /// them (the first image then does not wait for connection handshakes over the WAN).
        /// Empty for ordinary hosts and for other requests.
        #[serde(default)]
        bridgeheads: Vec<HostEntry>,
        /// How often to heartbeat from now on (it grows with the number of hosts the GIS
        /// serves, see `Registered::heartbeat_secs`); 0 from older GISes: no change.
        #[serde(default)]
        heartbeat_secs: u32,
    },
    HostList(Box<HostList>),
    /// Answer to a `Refresh` whose `known` digest is that of the host list it would get:
    /// the host keeps the list it has.
    Unchanged,
    UpgradePath(Box<UpgradePath>),
    Error {
        kind: ErrorKind,
        message: String,
    },
}

pub type Codec = crate::codec::CborCodec<GisRequest, GisResponse>;

pub fn codec() -> Codec {
    Codec::new(MAX_REQUEST_BYTES, MAX_RESPONSE_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn request_round_trip() {
        let r = GisRequest::Lookup {
            image: ImageQuery::Ref("a:1".parse().unwrap()),
            idc: None,
        };
        let f = crate::codec::encode_frame(&r, MAX_REQUEST_BYTES).unwrap();
        let back: GisRequest = crate::codec::decode_body(&f[4..], MAX_REQUEST_BYTES).unwrap();
        assert_eq!(back, r);
        for known in [None, Some(u64::MAX)] {
            let r = GisRequest::Refresh {
                image: ImageId([7; 32]),
                known,
            };
            let f = crate::codec::encode_frame(&r, MAX_REQUEST_BYTES).unwrap();
            let back: GisRequest = crate::codec::decode_body(&f[4..], MAX_REQUEST_BYTES).unwrap();
            assert_eq!(back, r);
        }
        let f = crate::codec::encode_frame(&GisResponse::Unchanged, MAX_RESPONSE_BYTES).unwrap();
        let back: GisResponse = crate::codec::decode_body(&f[4..], MAX_RESPONSE_BYTES).unwrap();
        assert_eq!(back, GisResponse::Unchanged);
    }

    #[test]
    fn refreshes_of_older_hosts_still_decode_and_ask_for_the_list() {
        /// A refresh as hosts sent it before the digest existed.
        #[derive(Serialize)]
        enum OldRequest {
            #[allow(dead_code)]
            Lookup,
            Refresh {
                image: ImageId,
            },
        }
        let old = OldRequest::Refresh {
            image: ImageId([5; 32]),
        };
        let f = crate::codec::encode_frame(&old, MAX_REQUEST_BYTES).unwrap();
        let back: GisRequest = crate::codec::decode_body(&f[4..], MAX_REQUEST_BYTES).unwrap();
        assert_eq!(
            back,
            GisRequest::Refresh {
                image: ImageId([5; 32]),
                known: None
            }
        );
    }

    fn entry(seed: u8, held: u32) -> HostEntry {
        HostEntry {
            peer: libp2p::identity::Keypair::ed25519_from_bytes([seed; 32])
                .unwrap()
                .public()
                .to_peer_id(),
            idc: Idc("idc-a".into()),
            role: Role::Host,
            addrs: vec![format!("/ip4/10.0.0.{seed}/tcp/4001").parse().unwrap()],
            chunks_held: held,
            complete: false,
            idc_complete: false,
        }
    }

    fn list(level0: Vec<HostEntry>, level1: Vec<HostEntry>) -> HostList {
        HostList {
            image: ImageInfo {
                name: "a".into(),
                version: "1".into(),
                id: ImageId([1; 32]),
                size: 1 << 20,
                chunk_size: 4096,
            },
            manifest: vec![1, 2, 3],
            level0,
            level1,
            level2: Vec::new(),
        }
    }

    #[test]
    fn digest_ignores_progress_order_and_manifest() {
        let a = list(vec![entry(1, 3), entry(2, 9)], vec![entry(3, 0)]);
        let mut b = list(vec![entry(2, 30), entry(1, 4)], vec![entry(3, 7)]);
        b.manifest.clear();
        assert_eq!(a.digest(), b.digest());
    }

    #[test]
    fn digest_sees_what_a_host_acts_on() {
        let base = list(vec![entry(1, 3), entry(2, 9)], vec![entry(3, 0)]);
        let d = base.digest();
        let mut changes: Vec<HostList> = Vec::new();
        // A host more, a host less, a host moved from one level to another.
        changes.push(list(
            vec![entry(1, 3), entry(2, 9), entry(4, 0)],
            vec![entry(3, 0)],
        ));
        changes.push(list(vec![entry(1, 3)], vec![entry(3, 0)]));
        changes.push(list(vec![entry(1, 3), entry(2, 9), entry(3, 0)], vec![]));
        // Each field of one entry.
        let edits: [fn(&mut HostEntry); 5] = [
            |e| e.complete = true,
            |e| e.idc_complete = true,
            |e| e.role = Role::Bridgehead,
            |e| e.idc = Idc("idc-b".into()),
            |e| e.addrs[0] = "/ip4/10.0.0.99/tcp/4001".parse().unwrap(),
        ];
        for edit in edits {
            let mut l = base.clone();
            edit(&mut l.level0[1]);
            changes.push(l);
        }
        let mut l = base.clone();
        l.level0[0]
            .addrs
            .push("/ip4/10.0.1.1/tcp/4001".parse().unwrap());
        changes.push(l);
        for (i, c) in changes.iter().enumerate() {
            assert_ne!(c.digest(), d, "change {i} not seen");
        }
    }

    #[test]
    fn heartbeats_of_older_nodes_still_decode() {
        /// A heartbeat as nodes sent it before settings and provision times existed.
        #[derive(Serialize)]
        struct OldStats {
            total: Counters,
            images: BTreeMap<ImageId, Counters>,
            refusals: u64,
        }
        #[derive(Serialize)]
        enum OldRequest {
            Heartbeat { stats: OldStats },
        }
        let old = OldRequest::Heartbeat {
            stats: OldStats {
                total: Counters::default(),
                images: BTreeMap::new(),
                refusals: 3,
            },
        };
        let f = crate::codec::encode_frame(&old, MAX_REQUEST_BYTES).unwrap();
        let back: GisRequest = crate::codec::decode_body(&f[4..], MAX_REQUEST_BYTES).unwrap();
        let GisRequest::Heartbeat { stats } = back else {
            panic!("not a heartbeat: {back:?}")
        };
        assert_eq!(stats.refusals, 3);
        assert!(stats.settings.is_none() && stats.provisions.is_empty());

        let mut stats = HostStats::default();
        stats.provisions.insert(
            ImageId([4; 32]),
            ProvisionTime {
                millis: 1500,
                completed_ms: 1_700_000_000_000,
            },
        );
        let r = GisRequest::Heartbeat { stats };
        let f = crate::codec::encode_frame(&r, MAX_REQUEST_BYTES).unwrap();
        let back: GisRequest = crate::codec::decode_body(&f[4..], MAX_REQUEST_BYTES).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn upgrade_path_round_trip() {
        let r = GisRequest::UpgradePath {
            have: vec![ImageId([1; 32]), ImageId([2; 32])],
            want: ImageQuery::Ref("a:3".parse().unwrap()),
        };
        let f = crate::codec::encode_frame(&r, MAX_REQUEST_BYTES).unwrap();
        let back: GisRequest = crate::codec::decode_body(&f[4..], MAX_REQUEST_BYTES).unwrap();
        assert_eq!(back, r);
        let info = |v: &str, id: u8| ImageInfo {
            name: "a".into(),
            version: v.into(),
            id: ImageId([id; 32]),
            size: 1 << 20,
            chunk_size: 4096,
        };
        let resp = GisResponse::UpgradePath(Box::new(UpgradePath {
            target: info("3", 3),
            manifest: vec![0xa0],
            base: Some(ImageId([1; 32])),
            steps: vec![info("1-to-3", 9)],
            bytes: 4096,
            full_bytes: 1 << 20,
        }));
        let f = crate::codec::encode_frame(&resp, MAX_RESPONSE_BYTES).unwrap();
        let back: GisResponse = crate::codec::decode_body(&f[4..], MAX_RESPONSE_BYTES).unwrap();
        assert_eq!(back, resp);
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = crate::codec::decode_body::<GisRequest>(&bytes, MAX_REQUEST_BYTES);
            let _ = crate::codec::decode_body::<GisResponse>(&bytes, MAX_RESPONSE_BYTES);
        }
    }
}
