//! Property tests of the index through its public API: random sequences of register,
//! heartbeat, publish, unpublish, lookup, revoke and time passing never panic, host lists
//! keep their shape, and an index restored from its persisted changes knows the same.

mod common;

use bids_gis::index::{Index, IndexConfig};
use bids_gis::storage::{MemStorage, Storage};
use bids_protocols::cert::BridgeheadCert;
use bids_protocols::gis::{
    GisRequest, GisResponse, Holding, HostStats, ImageQuery, MAX_LEVEL_HOSTS,
};
use bids_protocols::{ImageId, ImageRef, Policy, Role};
use common::*;
use libp2p::identity::Keypair;
use libp2p::PeerId;
use proptest::prelude::*;
use std::collections::BTreeSet;
use std::sync::OnceLock;

const T0: i64 = 1_700_000_000_000;
const IDCS: [&str; 3] = ["A", "B", "C"];
const PEERS: usize = 8;

struct Fixture {
    admin: Keypair,
    peers: Vec<PeerId>,
    /// Per peer: a valid cert for its "home" IDC (peer i → IDCS[i % 3]), an expired one, and
    /// one the admin did not sign.
    good: Vec<BridgeheadCert>,
    expired: Vec<BridgeheadCert>,
    forged: Vec<BridgeheadCert>,
    images: Vec<(Vec<u8>, ImageId, ImageRef)>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let admin = Keypair::generate_ed25519();
        let stranger = Keypair::generate_ed25519();
        let peers: Vec<PeerId> = (0..PEERS)
            .map(|_| Keypair::generate_ed25519().public().to_peer_id())
            .collect();
        let mk = |signer: &Keypair, i: usize, serial: u64, not_after: i64| {
            BridgeheadCert::issue(
                signer,
                bids_protocols::cert::CertBody {
                    peer: peers[i],
                    idc: idc(IDCS[i % 3]),
                    db_id: format!("db{i}"),
                    serial,
                    not_before: T0 / 1000 - 10,
                    not_after,
                    issuer: peers[i],
                },
            )
            .unwrap()
        };
        let good = (0..PEERS)
            .map(|i| mk(&admin, i, i as u64, T0 / 1000 + 120))
            .collect();
        let expired = (0..PEERS)
            .map(|i| mk(&admin, i, 100 + i as u64, T0 / 1000 - 1))
            .collect();
        let forged = (0..PEERS)
            .map(|i| mk(&stranger, i, 200 + i as u64, T0 / 1000 + 120))
            .collect();
        let images = (0..3)
            .map(|k| {
                let (b, id) = manifest("img", &format!("{k}"), 4 + k);
                (b, id, format!("img:{k}").parse().unwrap())
            })
            .collect();
        Fixture {
            admin,
            peers,
            good,
            expired,
            forged,
            images,
        }
    })
}

#[derive(Clone, Debug)]
enum Op {
    Register {
        peer: usize,
        idc: usize,
        cert: u8,
    },
    Heartbeat {
        peer: usize,
    },
    Publish {
        peer: usize,
        image: usize,
        chunks: u32,
        complete: bool,
        fetching: bool,
        manifest: u8,
    },
    Unpublish {
        peer: usize,
        image: usize,
    },
    Lookup {
        peer: usize,
        image: usize,
        by_ref: bool,
        idc: Option<usize>,
    },
    Revoke {
        admin: bool,
        serial: u64,
    },
    Advance {
        ms: i64,
    },
    Expire,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..PEERS, 0..3usize, 0..4u8).prop_map(|(peer, idc, cert)| Op::Register { peer, idc, cert }),
        3 => (0..PEERS).prop_map(|peer| Op::Heartbeat { peer }),
        4 => (0..PEERS, 0..3usize, 0..9u32, any::<bool>(), any::<bool>(), prop_oneof![Just(0u8), Just(1), Just(1), Just(2)]).prop_map(
            |(peer, image, chunks, complete, fetching, manifest)| Op::Publish { peer, image, chunks, complete, fetching, manifest }
        ),
        1 => (0..PEERS, 0..3usize).prop_map(|(peer, image)| Op::Unpublish { peer, image }),
        4 => (0..PEERS, 0..3usize, any::<bool>(), proptest::option::of(0..3usize))
            .prop_map(|(peer, image, by_ref, idc)| Op::Lookup { peer, image, by_ref, idc }),
        1 => (any::<bool>(), 0..10u64).prop_map(|(admin, serial)| Op::Revoke { admin, serial }),
        2 => (0..8_000i64).prop_map(|ms| Op::Advance { ms }),
        1 => Just(Op::Expire),
    ]
}

fn request(f: &Fixture, op: &Op) -> Option<(PeerId, GisRequest)> {
    Some(match op {
        Op::Register { peer, idc: i, cert } => {
            let cert = match cert {
                0 => None,
                1 => Some(f.good[*peer].clone()),
                2 => Some(f.expired[*peer].clone()),
                _ => Some(f.forged[*peer].clone()),
            };
            (
                f.peers[*peer],
                GisRequest::Register {
                    idc: idc(IDCS[*i]),
                    addrs: vec![],
                    cert,
                    policy: Policy::Bids,
                },
            )
        }
        Op::Heartbeat { peer } => (
            f.peers[*peer],
            GisRequest::Heartbeat {
                stats: HostStats::default(),
            },
        ),
        Op::Publish {
            peer,
            image,
            chunks,
            complete,
            fetching,
            manifest,
        } => {
            let (bytes, id, _) = &f.images[*image];
            let manifest = match manifest {
                0 => vec![],
                1 => bytes.clone(),
                // Another image's manifest: must be refused.
                _ => f.images[(*image + 1) % 3].0.clone(),
            };
            (
                f.peers[*peer],
                GisRequest::Publish {
                    holding: Holding {
                        image: *id,
                        chunks_held: *chunks,
                        complete: *complete,
                        fetching: *fetching,
                    },
                    manifest,
                },
            )
        }
        Op::Unpublish { peer, image } => (
            f.peers[*peer],
            GisRequest::Unpublish {
                image: f.images[*image].1,
            },
        ),
        Op::Lookup {
            peer,
            image,
            by_ref,
            idc: i,
        } => {
            let (_, id, r) = &f.images[*image];
            let image = if *by_ref {
                ImageQuery::Ref(r.clone())
            } else {
                ImageQuery::Id(*id)
            };
            (
                f.peers[*peer],
                GisRequest::Lookup {
                    image,
                    idc: i.map(|i| idc(IDCS[i])),
                },
            )
        }
        Op::Revoke { admin, serial } => {
            let who = if *admin {
                f.admin.public().to_peer_id()
            } else {
                f.peers[0]
            };
            (who, GisRequest::Revoke { serial: *serial })
        }
        Op::Advance { .. } | Op::Expire => return None,
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn random_operations_keep_the_index_sound(ops in proptest::collection::vec(op(), 1..80)) {
        let f = fixture();
        let cfg = IndexConfig::new(f.admin.public().to_peer_id(), Policy::Bids);
        let mut ix = Index::new(cfg.clone());
        let mut store = MemStorage::new();
        let mut now = T0;
        // Start from a populated world (bridgeheads in every IDC, one complete copy in A) so
        // the random part reaches every level of the host list.
        let setup = (0..PEERS)
            .map(|peer| Op::Register { peer, idc: peer % 3, cert: u8::from(peer < 3 || peer == 6) })
            .chain([Op::Publish { peer: 3, image: 0, chunks: 4, complete: true, fetching: false, manifest: 1 }]);
        for op in setup.chain(ops) {
            let op = &op;
            match op {
                Op::Advance { ms } => now += ms,
                Op::Expire => {
                    let died = ix.expire(now);
                    let unique: BTreeSet<_> = died.iter().collect();
                    prop_assert_eq!(unique.len(), died.len());
                }
                _ => {
                    let (peer, req) = request(f, op).expect("a request");
                    let forged_or_expired = matches!(op, Op::Register { cert: 2 | 3, .. });
                    let was_registered = ix.is_registered(&peer);
                    let resp = ix.handle(peer, req, now);
                    if forged_or_expired {
                        prop_assert!(matches!(resp, GisResponse::Error { .. }), "bad cert accepted: {:?}", resp);
                        prop_assert_eq!(ix.is_registered(&peer), was_registered);
                    }
                    if let GisResponse::HostList(l) = &resp {
                        let me = ix.hosts(now).into_iter().find(|h| h.peer == peer);
                        for level in [&l.level0, &l.level1, &l.level2] {
                            prop_assert!(level.len() <= MAX_LEVEL_HOSTS);
                            prop_assert!(level.iter().all(|e| e.peer != peer), "requester listed to itself");
                            let unique: BTreeSet<_> = level.iter().map(|e| e.peer).collect();
                            prop_assert_eq!(unique.len(), level.len());
                        }
                        prop_assert!(l.level1.len() <= 1);
                        prop_assert!(l.level1.iter().all(|e| e.role == Role::Bridgehead));
                        prop_assert!(l.level2.iter().all(|e| e.role == Role::Bridgehead));
                        if !l.level2.is_empty() {
                            let me = me.as_ref().expect("only registered hosts get level 2");
                            prop_assert_eq!(me.role, Role::Bridgehead);
                            prop_assert!(l.level2.iter().all(|e| e.idc != me.idc));
                        }
                        if let Some(me) = &me {
                            prop_assert!(l.level0.iter().all(|e| e.idc == me.idc));
                        }
                    }
                }
            }
            store.commit(&ix.take_changes()).expect("mem storage");
        }
        // The records copied from memory (what a replica's snapshot carries) are exactly
        // what was persisted.
        let sorted = |mut s: bids_gis::storage::Snapshot| {
            s.hosts.sort_by_key(|h| h.peer.to_bytes());
            s.images.sort_by_key(|i| i.id);
            s.holdings.sort_by_key(|h| (h.peer.to_bytes(), h.holding.image));
            (s.hosts, s.images, s.holdings, s.revocations)
        };
        prop_assert_eq!(sorted(ix.records()), sorted(store.load().expect("load")));
        // What was persisted rebuilds the same index, except liveness.
        let restored = Index::restore(cfg, store.load().expect("load"));
        let dead = |mut v: Vec<bids_gis::index::ImageView>| {
            for i in &mut v { for hs in i.holders.values_mut() { for h in hs { h.alive = false; } } }
            v
        };
        prop_assert_eq!(dead(restored.images(now)), dead(ix.images(now)));
        let sig = |ix: &Index| ix.hosts(now).into_iter().map(|h| (h.peer, h.idc, h.addrs, h.cert, h.registered_ms)).collect::<Vec<_>>();
        prop_assert_eq!(sig(&restored), sig(&ix));
        prop_assert_eq!(restored.revocations(), ix.revocations());
    }
}
