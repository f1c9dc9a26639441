//! Helpers shared by the GIS integration tests: keys, certificates, manifests, a GIS on
//! 127.0.0.1 port 0.

#![allow(dead_code)]

use bids_gis::server::{spawn, GisConfig, GisHandle};
use bids_protocols::cert::{BridgeheadCert, CertBody};
use bids_protocols::gis::{GisRequest, GisResponse, Holding};
use bids_protocols::manifest::chunk_info;
use bids_protocols::{Idc, ImageId, Manifest, ObjectKind, Policy};
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use std::path::Path;
use std::time::Duration;

pub const TIMEOUT: Duration = Duration::from_secs(10);
pub const CHUNK: u32 = 4096;

pub fn peer_of(k: &Keypair) -> PeerId {
    k.public().to_peer_id()
}

pub fn idc(s: &str) -> Idc {
    Idc::new(s).unwrap()
}

/// A manifest of `chunks` distinct 4 KiB chunks; returns its canonical bytes and id.
pub fn manifest(name: &str, version: &str, chunks: usize) -> (Vec<u8>, ImageId) {
    let m = Manifest {
        name: name.into(),
        version: version.into(),
        base: None,
        kind: ObjectKind::Image,
        size: chunks as u64 * CHUNK as u64,
        chunk_size: CHUNK,
        chunks: (0..chunks)
            .map(|i| chunk_info(&vec![(i % 250) as u8 + 1; CHUNK as usize]))
            .collect(),
    };
    (m.to_bytes(), m.id())
}

/// A certificate valid for a day around now.
pub fn cert(admin: &Keypair, peer: PeerId, idc_name: &str, serial: u64) -> BridgeheadCert {
    let now = bids_protocols::unix_now();
    BridgeheadCert::issue(
        admin,
        CertBody {
            peer,
            idc: idc(idc_name),
            db_id: format!("{idc_name}-{serial}"),
            serial,
            not_before: now - 3600,
            not_after: now + 86_400,
            issuer: peer,
        },
    )
    .unwrap()
}

pub fn register(idc_name: &str, cert: Option<BridgeheadCert>) -> GisRequest {
    GisRequest::Register {
        idc: idc(idc_name),
        addrs: vec!["/ip4/127.0.0.1/tcp/4001".parse().unwrap()],
        cert,
        policy: Policy::Bids,
    }
}

pub fn publish(image: ImageId, manifest: &[u8], chunks_held: u32, complete: bool) -> GisRequest {
    GisRequest::Publish {
        holding: Holding {
            image,
            chunks_held,
            complete,
            fetching: !complete,
        },
        manifest: manifest.to_vec(),
    }
}

pub async fn gis(dir: &Path, admin: PeerId) -> GisHandle {
    let cfg = GisConfig::new(
        Keypair::generate_ed25519(),
        "/ip4/127.0.0.1/tcp/0".parse().unwrap(),
        dir.to_path_buf(),
        admin,
    );
    spawn(cfg).await.unwrap()
}

pub async fn ask(key: &Keypair, addr: &Multiaddr, req: GisRequest) -> GisResponse {
    bids_gis::client::request_once(key.clone(), addr.clone(), req, TIMEOUT)
        .await
        .unwrap()
}

pub fn assert_ack(r: &GisResponse) {
    assert!(
        matches!(r, GisResponse::Ack { .. }),
        "expected Ack, got {r:?}"
    );
}

/// The key the replicas of one group share in these tests (each test its own group, on
/// its own ports).
pub fn group_key() -> bids_gis::cluster::ClusterKey {
    bids_gis::cluster::ClusterKey::from_hex(&"5a".repeat(32)).unwrap()
}
