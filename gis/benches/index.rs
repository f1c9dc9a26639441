//! The GIS index at the issue's scale (19,400 hosts in 100 IDCs, 2 certified bridgeheads
//! each, 1,000 images, 5 holdings a host, heartbeats with per-image counters): the
//! once-a-second liveness pass of the GIS event loop (heartbeat pace, expiry, per-IDC
//! counts for the metrics), against a lookup and a heartbeat on the same index. Everything
//! the event loop does in that pass, lookups and heartbeats wait for.
//!
//! `cargo bench -p bids-gis --bench index`

use bids_gis::index::{Index, IndexConfig};
use bids_protocols::cert::{BridgeheadCert, CertBody};
use bids_protocols::gis::{Counters, GisRequest, Holding, HostStats, ImageQuery};
use bids_protocols::{Idc, ImageId, ImageRef, Policy};
use criterion::{criterion_group, criterion_main, Criterion};
use libp2p::identity::Keypair;
use libp2p::PeerId;
use std::hint::black_box;

const HOSTS: usize = 19_400;
const IDCS: usize = 100;
const IMAGES: usize = 1_000;
const HOLDINGS: usize = 5;
const CHUNKS: u32 = 64;

fn manifest(i: usize) -> (ImageRef, ImageId, Vec<u8>) {
    let m = bids_gis::loadgen::synthetic_manifest(i, CHUNKS);
    (m.image_ref(), m.id(), m.to_bytes())
}

struct Setup {
    index: Index,
    peers: Vec<PeerId>,
    refs: Vec<ImageRef>,
    heartbeat: GisRequest,
    now_ms: i64,
}

fn setup() -> Setup {
    let admin = Keypair::generate_ed25519();
    let mut index = Index::new(IndexConfig::new(admin.public().to_peer_id(), Policy::Bids));
    let now_ms = bids_protocols::unix_now() * 1000;
    let images: Vec<_> = (0..IMAGES).map(manifest).collect();
    let per_image = Counters {
        lan_recv_bytes: 64 << 20,
        lan_recv_chunks: 64,
        ..Default::default()
    };
    let mut peers = Vec::with_capacity(HOSTS);
    let mut heartbeat = None;
    for i in 0..HOSTS {
        let key = Keypair::generate_ed25519();
        let peer = key.public().to_peer_id();
        let idc = Idc::new(&format!("idc-{:03}", i % IDCS)).expect("idc");
        let cert = (i / IDCS < 2).then(|| {
            BridgeheadCert::issue(
                &admin,
                CertBody {
                    peer,
                    idc: idc.clone(),
                    db_id: format!("db{}", i / IDCS),
                    serial: i as u64 + 1,
                    not_before: now_ms / 1000 - 3600,
                    not_after: now_ms / 1000 + 86_400,
                    issuer: admin.public().to_peer_id(),
                },
            )
            .expect("cert")
        });
        let reg = GisRequest::Register {
            idc,
            addrs: vec!["/ip4/10.0.0.1/tcp/4001".parse().expect("addr")],
            cert,
            policy: Policy::Bids,
        };
        index.handle(peer, reg, now_ms);
        let mut stats = HostStats::default();
        for k in 0..HOLDINGS {
            let (_, id, bytes) = &images[(i * 7 + k * 131) % IMAGES];
            let publish = GisRequest::Publish {
                holding: Holding {
                    image: *id,
                    chunks_held: CHUNKS,
                    complete: true,
                    fetching: false,
                },
                manifest: bytes.clone(),
            };
            index.handle(peer, publish, now_ms);
            stats.total.add(&per_image);
            stats.images.insert(*id, per_image);
        }
        let hb = GisRequest::Heartbeat { stats };
        index.handle(peer, hb.clone(), now_ms);
        heartbeat.get_or_insert(hb);
        peers.push(peer);
    }
    index.take_changes();
    Setup {
        index,
        peers,
        refs: images.into_iter().map(|(r, _, _)| r).collect(),
        heartbeat: heartbeat.expect("a heartbeat"),
        now_ms,
    }
}

fn bench(c: &mut Criterion) {
    let mut s = setup();
    let mut g = c.benchmark_group("gis_index_19400_hosts");
    g.bench_function("liveness_pass", |b| {
        b.iter(|| {
            s.index.pace(s.now_ms);
            black_box(s.index.expire(s.now_ms));
            black_box(s.index.idcs(s.now_ms));
        })
    });
    let mut i = 0usize;
    g.bench_function("lookup", |b| {
        b.iter(|| {
            i = i.wrapping_add(7919);
            let req = GisRequest::Lookup {
                image: ImageQuery::Ref(s.refs[i % s.refs.len()].clone()),
                idc: None,
            };
            black_box(s.index.handle(s.peers[i % s.peers.len()], req, s.now_ms))
        })
    });
    g.bench_function("heartbeat", |b| {
        b.iter(|| {
            i = i.wrapping_add(7919);
            black_box(
                s.index
                    .handle(s.peers[i % s.peers.len()], s.heartbeat.clone(), s.now_ms),
            )
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30);
    targets = bench
}
criterion_main!(benches);
