//! Unit tests of the index: the paper's lookup scenario, bridgehead choice, certificates,
//! manifests, liveness and restore.

use super::*;
use crate::storage::{MemStorage, Storage};
use bids_protocols::cert::CertBody;
use bids_protocols::manifest::chunk_info;
use libp2p::identity::Keypair;

const T0: i64 = 1_700_000_000_000;
const CHUNK: u32 = 4096;

fn idc(s: &str) -> Idc {
    Idc::new(s).unwrap()
}

fn manifest(name: &str, version: &str, chunks: usize) -> (Vec<u8>, ImageId) {
    let infos = (0..chunks)
        .map(|i| chunk_info(&vec![(i % 251) as u8 + 1; CHUNK as usize]))
        .collect();
    let m = Manifest {
        name: name.into(),
        version: version.into(),
        base: None,
        kind: ObjectKind::Image,
        size: chunks as u64 * CHUNK as u64,
        chunk_size: CHUNK,
        chunks: infos,
    };
    (m.to_bytes(), m.id())
}

/// A GIS index plus the admin key and a clock.
struct World {
    admin: Keypair,
    ix: Index,
    now: i64,
    next_serial: u64,
}

struct Node {
    peer: PeerId,
    idc: Idc,
    cert: Option<BridgeheadCert>,
}

impl World {
    fn new(policy: Policy) -> Self {
        let admin = Keypair::generate_ed25519();
        let ix = Index::new(IndexConfig::new(admin.public().to_peer_id(), policy));
        World {
            admin,
            ix,
            now: T0,
            next_serial: 1,
        }
    }

    fn admin_peer(&self) -> PeerId {
        self.admin.public().to_peer_id()
    }

    fn cert_for(&mut self, peer: PeerId, idc_name: &str, not_after_s: i64) -> BridgeheadCert {
        let serial = self.next_serial;
        self.next_serial += 1;
        BridgeheadCert::issue(
            &self.admin,
            CertBody {
                peer,
                idc: idc(idc_name),
                db_id: format!("{idc_name}-{serial}"),
                serial,
                not_before: self.now / 1000 - 3600,
                not_after: not_after_s,
                issuer: peer,
            },
        )
        .unwrap()
    }

    fn host(&mut self, idc_name: &str) -> Node {
        let peer = Keypair::generate_ed25519().public().to_peer_id();
        let role = self
            .ix
            .register(
                peer,
                idc(idc_name),
                vec![],
                None,
                self.ix.cfg.policy,
                self.now,
            )
            .unwrap();
        assert_eq!(role, Role::Host);
        Node {
            peer,
            idc: idc(idc_name),
            cert: None,
        }
    }

    fn bridgehead(&mut self, idc_name: &str) -> Node {
        let peer = Keypair::generate_ed25519().public().to_peer_id();
        let cert = self.cert_for(peer, idc_name, self.now / 1000 + 86_400);
        let role = self
            .ix
            .register(
                peer,
                idc(idc_name),
                vec!["/ip4/127.0.0.1/tcp/4001".parse().unwrap()],
                Some(cert.clone()),
                self.ix.cfg.policy,
                self.now,
            )
            .unwrap();
        assert_eq!(role, Role::Bridgehead);
        Node {
            peer,
            idc: idc(idc_name),
            cert: Some(cert),
        }
    }

    fn hold(
        &mut self,
        n: &Node,
        image: ImageId,
        manifest: &[u8],
        chunks: u32,
        complete: bool,
        fetching: bool,
    ) {
        self.ix
            .publish(
                n.peer,
                Holding {
                    image,
                    chunks_held: chunks,
                    complete,
                    fetching,
                },
                manifest,
                self.now,
            )
            .unwrap();
    }

    fn lookup(&self, n: &Node, image: ImageId) -> HostList {
        self.ix
            .lookup(n.peer, &ImageQuery::Id(image), self.now)
            .unwrap()
    }

    /// Advances the clock; everyone in `alive` heartbeats at the new time.
    fn advance(&mut self, ms: i64, alive: &[&Node]) {
        self.now += ms;
        for n in alive {
            self.ix
                .heartbeat(n.peer, HostStats::default(), self.now)
                .unwrap();
        }
    }
}

fn peers(level: &[HostEntry]) -> Vec<PeerId> {
    level.iter().map(|e| e.peer).collect()
}

/// The paper's Fig. 1, reduced: image X lives in IDC A; B and C have bridgeheads.
struct Scenario {
    w: World,
    x: ImageId,
    a_full: Node,
    a_part: Node,
    a_host: Node,
    a_db: Node,
    b_host: Node,
    b_dbs: [Node; 2],
    c_db: Node,
    c_host: Node,
}

fn scenario() -> Scenario {
    let mut w = World::new(Policy::Bids);
    let (bytes, x) = manifest("debian", "12", 8);
    let a_full = w.host("A");
    let a_part = w.host("A");
    let a_host = w.host("A");
    let a_db = w.bridgehead("A");
    let b_host = w.host("B");
    let b_dbs = [w.bridgehead("B"), w.bridgehead("B")];
    let c_db = w.bridgehead("C");
    let c_host = w.host("C");
    w.hold(&a_full, x, &bytes, 8, true, false);
    w.hold(&a_part, x, &[], 3, false, true);
    Scenario {
        w,
        x,
        a_full,
        a_part,
        a_host,
        a_db,
        b_host,
        b_dbs,
        c_db,
        c_host,
    }
}

impl Scenario {
    fn everyone(&self) -> Vec<&Node> {
        let mut v = vec![
            &self.a_full,
            &self.a_part,
            &self.a_host,
            &self.a_db,
            &self.b_host,
        ];
        v.extend(self.b_dbs.iter());
        v.extend([&self.c_db, &self.c_host]);
        v
    }
    fn chosen_b(&self) -> (&Node, &Node) {
        let chosen = self
            .w
            .ix
            .chosen_bridgehead(&idc("B"), &self.x, self.w.now)
            .unwrap();
        if chosen == self.b_dbs[0].peer {
            (&self.b_dbs[0], &self.b_dbs[1])
        } else {
            assert_eq!(chosen, self.b_dbs[1].peer);
            (&self.b_dbs[1], &self.b_dbs[0])
        }
    }
}

/// What the GIS answers `n`'s heartbeat about other IDCs' bridgeheads, sorted.
fn linked_bridgeheads(w: &mut World, n: &Node) -> Vec<PeerId> {
    let req = GisRequest::Heartbeat {
        stats: HostStats::default(),
    };
    match w.ix.handle(n.peer, req, w.now) {
        GisResponse::Ack { bridgeheads, .. } => {
            let mut v = peers(&bridgeheads);
            v.sort();
            v
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn bridgeheads_learn_the_other_idcs_bridgeheads_from_heartbeat_answers() {
    let mut s = scenario();
    let mut others_of_b = vec![s.a_db.peer, s.c_db.peer];
    others_of_b.sort();
    assert_eq!(linked_bridgeheads(&mut s.w, &s.b_dbs[0]), others_of_b);
    let mut others_of_a = vec![s.b_dbs[0].peer, s.b_dbs[1].peer, s.c_db.peer];
    others_of_a.sort();
    assert_eq!(linked_bridgeheads(&mut s.w, &s.a_db), others_of_a);
    assert!(
        linked_bridgeheads(&mut s.w, &s.b_host).is_empty(),
        "ordinary hosts never learn of other IDCs"
    );
}

#[test]
fn refresh_is_the_lookup_by_id_without_the_manifest() {
    let mut s = scenario();
    let (chosen, _) = s.chosen_b();
    let (chosen, b_host, x) = (chosen.peer, s.b_host.peer, s.x);
    for peer in [chosen, b_host] {
        let full = s.w.ix.lookup(peer, &ImageQuery::Id(x), s.w.now).unwrap();
        assert!(!full.manifest.is_empty());
        match s.w.ix.handle(
            peer,
            GisRequest::Refresh {
                image: x,
                known: None,
            },
            s.w.now,
        ) {
            GisResponse::HostList(l) => {
                assert!(l.manifest.is_empty(), "a refresh carries no manifest");
                assert_eq!(l.image, full.image);
                assert_eq!(
                    (peers(&l.level0), peers(&l.level1), peers(&l.level2)),
                    (
                        peers(&full.level0),
                        peers(&full.level1),
                        peers(&full.level2)
                    )
                );
            }
            other => panic!("{other:?}"),
        }
    }
    // Only registered hosts refresh; unknown images are refused as by a lookup.
    let stranger = PeerId::random();
    assert!(matches!(
        s.w.ix.handle(
            stranger,
            GisRequest::Refresh {
                image: x,
                known: None
            },
            s.w.now
        ),
        GisResponse::Error {
            kind: ErrorKind::NotRegistered,
            ..
        }
    ));
    assert!(matches!(
        s.w.ix.handle(
            b_host,
            GisRequest::Refresh {
                image: ImageId([9; 32]),
                known: None
            },
            s.w.now
        ),
        GisResponse::Error {
            kind: ErrorKind::UnknownImage,
            ..
        }
    ));
}

#[test]
fn a_refresh_that_knows_the_list_gets_unchanged_until_what_it_acts_on_changes() {
    let mut s = scenario();
    let (x, a_host) = (s.x, s.a_host.peer);
    let refresh = |s: &mut Scenario, known| {
        s.w.ix
            .handle(a_host, GisRequest::Refresh { image: x, known }, s.w.now)
    };
    let first = s.w.lookup(&s.a_host, x);
    assert_eq!(peers(&first.level0).len(), 2);
    let known = Some(first.digest());
    assert_eq!(refresh(&mut s, known), GisResponse::Unchanged);
    // Progress alone (more chunks held) is not news to the host.
    s.w.hold(&s.a_part, x, &[], 6, false, true);
    assert_eq!(refresh(&mut s, known), GisResponse::Unchanged);
    // A stale or foreign digest gets the whole list, without the manifest.
    match refresh(&mut s, known.map(|k| k ^ 1)) {
        GisResponse::HostList(l) => {
            assert!(l.manifest.is_empty());
            assert_eq!(l.digest(), first.digest());
        }
        other => panic!("{other:?}"),
    }
    // A holder more, and a holder that completes: the whole list again.
    s.w.hold(&s.a_db, x, &[], 2, false, true);
    let GisResponse::HostList(second) = refresh(&mut s, known) else {
        panic!("a new holder must be sent")
    };
    assert_eq!(peers(&second.level0).len(), 3);
    let known = Some(second.digest());
    assert_eq!(refresh(&mut s, known), GisResponse::Unchanged);
    s.w.hold(&s.a_part, x, &[], 8, true, false);
    let GisResponse::HostList(third) = refresh(&mut s, known) else {
        panic!("a holder that completed must be sent")
    };
    assert!(third
        .level0
        .iter()
        .any(|e| e.peer == s.a_part.peer && e.complete));
}

#[test]
fn ordinary_host_of_b_gets_only_bs_chosen_bridgehead() {
    let s = scenario();
    let (chosen, _) = s.chosen_b();
    let l = s.w.lookup(&s.b_host, s.x);
    assert!(l.level0.is_empty());
    assert_eq!(peers(&l.level1), vec![chosen.peer]);
    assert_eq!(l.level1[0].role, Role::Bridgehead);
    assert_eq!(l.level1[0].idc, idc("B"));
    assert!(l.level2.is_empty(), "ordinary hosts never see other IDCs");
    assert_eq!(l.image.name, "debian");
    assert_eq!(l.image.id, s.x);
    assert_eq!(
        Manifest::from_bytes_with_id(&l.manifest, s.x)
            .unwrap()
            .chunk_count(),
        8
    );
}

#[test]
fn chosen_bridgehead_of_b_gets_level2_with_as_bridgehead() {
    let mut s = scenario();
    let (chosen, other) = s.chosen_b();
    let (chosen_peer, other_peer) = (chosen.peer, other.peer);
    let chosen_node = Node {
        peer: chosen_peer,
        idc: idc("B"),
        cert: None,
    };
    let l = s.w.lookup(&chosen_node, s.x);
    assert!(l.level0.is_empty());
    assert!(
        l.level1.is_empty(),
        "the chosen bridgehead is not told about itself"
    );
    assert_eq!(
        peers(&l.level2),
        vec![s.a_db.peer],
        "C holds nothing of X yet"
    );
    assert_eq!(l.level2[0].idc, idc("A"));

    // The other bridgehead of B is not chosen for X: it behaves as an ordinary host.
    let other_node = Node {
        peer: other_peer,
        idc: idc("B"),
        cert: None,
    };
    let l = s.w.lookup(&other_node, s.x);
    assert_eq!(peers(&l.level1), vec![chosen_peer]);
    assert!(l.level2.is_empty());

    // A host of C gets part of X (from somewhere): C becomes a source, after A (complete).
    let c_host = Node {
        peer: s.c_host.peer,
        idc: idc("C"),
        cert: None,
    };
    s.w.hold(&c_host, s.x, &[], 2, false, false);
    let l = s.w.lookup(&chosen_node, s.x);
    assert_eq!(peers(&l.level2), vec![s.a_db.peer, s.c_db.peer]);
    assert_eq!(
        (l.level2[1].chunks_held, l.level2[1].idc.as_str()),
        (0, "C")
    );

    // Without that host, C's bridgehead fetching X is enough to be listed.
    s.w.ix.unpublish(s.c_host.peer, s.x).unwrap();
    assert_eq!(
        peers(&s.w.lookup(&chosen_node, s.x).level2),
        vec![s.a_db.peer]
    );
    let c_db = Node {
        peer: s.c_db.peer,
        idc: idc("C"),
        cert: None,
    };
    s.w.hold(&c_db, s.x, &[], 0, false, true);
    assert_eq!(
        peers(&s.w.lookup(&chosen_node, s.x).level2),
        vec![s.a_db.peer, s.c_db.peer]
    );
}

#[test]
fn host_of_a_gets_level0_only_best_first() {
    let s = scenario();
    let l = s.w.lookup(&s.a_host, s.x);
    assert_eq!(peers(&l.level0), vec![s.a_full.peer, s.a_part.peer]);
    assert!(l.level0[0].complete && l.level0[0].chunks_held == 8);
    assert!(!l.level0[1].complete && l.level0[1].chunks_held == 3);
    assert!(l.level1.is_empty(), "X is complete inside A");
    assert!(l.level2.is_empty());
    // The requester is never listed to itself.
    let l = s.w.lookup(&s.a_part, s.x);
    assert_eq!(peers(&l.level0), vec![s.a_full.peer]);
    // A's bridgehead gets no level 2 either: nothing needs to cross the WAN into A.
    let l = s.w.lookup(&s.a_db, s.x);
    assert_eq!(peers(&l.level0), vec![s.a_full.peer, s.a_part.peer]);
    assert!(l.level1.is_empty() && l.level2.is_empty());
}

#[test]
fn partial_copy_in_own_idc_still_gets_the_bridgehead() {
    let mut s = scenario();
    let (bytes, _) = manifest("debian", "12", 8);
    let b2 = s.w.host("B");
    s.w.hold(&b2, s.x, &bytes, 5, false, true);
    let (chosen, _) = s.chosen_b();
    let chosen = chosen.peer;
    let l = s.w.lookup(&s.b_host, s.x);
    assert_eq!(peers(&l.level0), vec![b2.peer]);
    assert_eq!(peers(&l.level1), vec![chosen]);
    // Once a host of B is complete, B no longer needs its bridgehead for X.
    s.w.hold(&b2, s.x, &[], 8, true, false);
    let l = s.w.lookup(&s.b_host, s.x);
    assert!(l.level1.is_empty());
    assert!(l.level0[0].complete);
}

#[test]
fn dead_bridgehead_is_replaced_by_the_other_certified_one() {
    let mut s = scenario();
    let (chosen, other) = s.chosen_b();
    let (chosen, other) = (chosen.peer, other.peer);
    let timeout = s.w.ix.cfg.heartbeat_timeout.as_millis() as i64;
    let alive: Vec<Node> = s
        .everyone()
        .into_iter()
        .filter(|n| n.peer != chosen)
        .map(|n| Node {
            peer: n.peer,
            idc: n.idc.clone(),
            cert: n.cert.clone(),
        })
        .collect();
    let alive_refs: Vec<&Node> = alive.iter().collect();
    // Just inside the timeout the chosen one is still alive.
    s.w.advance(timeout, &alive_refs);
    assert!(s.w.ix.expire(s.w.now).is_empty());
    assert_eq!(peers(&s.w.lookup(&s.b_host, s.x).level1), vec![chosen]);
    s.w.advance(1, &alive_refs);
    assert_eq!(s.w.ix.expire(s.w.now), vec![chosen]);
    assert!(
        s.w.ix.expire(s.w.now).is_empty(),
        "each death is reported once"
    );
    assert_eq!(peers(&s.w.lookup(&s.b_host, s.x).level1), vec![other]);
    // It comes back: it is the chosen one again (rendezvous is stable).
    let back = Node {
        peer: chosen,
        idc: idc("B"),
        cert: None,
    };
    s.w.advance(1, &[&back]);
    assert_eq!(peers(&s.w.lookup(&s.b_host, s.x).level1), vec![chosen]);
}

#[test]
fn dead_holders_are_not_listed_but_the_image_outlives_them() {
    let mut s = scenario();
    s.w.advance(60_000, &[&s.b_host]);
    let dead = s.w.ix.expire(s.w.now);
    assert_eq!(dead.len(), 8, "all but b_host died");
    let l = s.w.lookup(&s.b_host, s.x);
    assert!(l.level0.is_empty() && l.level1.is_empty() && l.level2.is_empty());
    assert_eq!(l.image.id, s.x);
    assert!(!l.manifest.is_empty());
}

#[test]
fn revoked_bridgehead_is_never_listed_and_cannot_register() {
    let mut s = scenario();
    let (chosen, other) = s.chosen_b();
    let (chosen_peer, other_peer) = (chosen.peer, other.peer);
    let chosen_cert = chosen.cert.clone().unwrap();
    // It also holds part of X, so it would be a level-0 candidate for B's hosts.
    let chosen_node = Node {
        peer: chosen_peer,
        idc: idc("B"),
        cert: None,
    };
    s.w.hold(&chosen_node, s.x, &[], 2, false, true);
    assert_eq!(peers(&s.w.lookup(&s.b_host, s.x).level0), vec![chosen_peer]);

    let admin = s.w.admin_peer();
    assert_eq!(
        s.w.ix
            .revoke(s.b_host.peer, chosen_cert.body.serial)
            .unwrap_err()
            .kind,
        ErrorKind::Forbidden
    );
    let affected = s.w.ix.revoke(admin, chosen_cert.body.serial).unwrap();
    assert_eq!(affected, vec![chosen_peer]);
    assert!(s
        .w
        .ix
        .take_changes()
        .contains(&Change::PutRevocation(chosen_cert.body.serial)));

    let l = s.w.lookup(&s.b_host, s.x);
    assert!(
        l.level0.is_empty(),
        "a revoked bridgehead is not listed even as a holder"
    );
    assert_eq!(peers(&l.level1), vec![other_peer]);
    assert_eq!(
        s.w.ix.chosen_bridgehead(&idc("B"), &s.x, s.w.now),
        Some(other_peer)
    );

    let err =
        s.w.ix
            .register(
                chosen_peer,
                idc("B"),
                vec![],
                Some(chosen_cert),
                Policy::Bids,
                s.w.now,
            )
            .unwrap_err();
    assert_eq!(err.kind, ErrorKind::BadCert);
    assert!(err.message.contains("revoked"), "{}", err.message);
    assert!(s.w.ix.take_changes().is_empty());
    // The admin role is shown in the views too.
    let view =
        s.w.ix
            .hosts(s.w.now)
            .into_iter()
            .find(|h| h.peer == chosen_peer)
            .unwrap();
    assert_eq!(view.role, Role::Host);
    assert_eq!(view.cert.unwrap().state, CertState::Revoked);
}

#[test]
fn expired_certificate_stops_a_bridgehead_at_once() {
    let mut w = World::new(Policy::Bids);
    let (bytes, x) = manifest("img", "1", 4);
    let a = w.host("A");
    w.hold(&a, x, &bytes, 4, true, false);
    let _a_db = w.bridgehead("A");
    let b_host = w.host("B");
    // A bridgehead of B whose certificate ends in 5 seconds.
    let peer = Keypair::generate_ed25519().public().to_peer_id();
    let cert = w.cert_for(peer, "B", w.now / 1000 + 5);
    w.ix.register(peer, idc("B"), vec![], Some(cert), Policy::Bids, w.now)
        .unwrap();
    assert_eq!(peers(&w.lookup(&b_host, x).level1), vec![peer]);
    let db = Node {
        peer,
        idc: idc("B"),
        cert: None,
    };
    w.advance(6_000, &[&b_host, &db]);
    let l = w.lookup(&b_host, x);
    assert!(l.level1.is_empty(), "B has no valid bridgehead left");
    assert_eq!(w.ix.chosen_bridgehead(&idc("B"), &x, w.now), None);
    let l = w.ix.lookup(peer, &ImageQuery::Id(x), w.now).unwrap();
    assert!(l.level2.is_empty(), "an expired bridgehead gets no level 2");
}

#[test]
fn rendezvous_spreads_images_over_bridgeheads() {
    let mut w = World::new(Policy::Bids);
    let dbs = [w.bridgehead("B"), w.bridgehead("B")];
    let mut counts = [0usize; 2];
    let mut on_second = Vec::new();
    for i in 0..100 {
        let id = ImageId(Sha256::digest(format!("image {i}")).into());
        let chosen = w.ix.chosen_bridgehead(&idc("B"), &id, w.now).unwrap();
        let k = dbs.iter().position(|d| d.peer == chosen).unwrap();
        counts[k] += 1;
        if k == 1 {
            on_second.push(id);
        }
    }
    assert!(
        counts.iter().all(|&c| (30..=70).contains(&c)),
        "uneven spread {counts:?}"
    );
    // Only the dead one's images move: the survivor keeps its own.
    w.advance(20_000, &[&dbs[1]]);
    for id in on_second {
        assert_eq!(
            w.ix.chosen_bridgehead(&idc("B"), &id, w.now),
            Some(dbs[1].peer)
        );
    }
}

#[test]
fn baseline_lists_holders_of_every_idc_and_no_bridgeheads() {
    let mut w = World::new(Policy::Baseline);
    let (bytes, x) = manifest("img", "1", 4);
    let a_full = w.host("A");
    let a_part = w.host("A");
    let b_part = w.host("B");
    let b_host = w.host("B");
    let b_db = w.bridgehead("B");
    let _a_db = w.bridgehead("A");
    w.hold(&a_full, x, &bytes, 4, true, false);
    w.hold(&a_part, x, &[], 3, false, true);
    w.hold(&b_part, x, &[], 1, false, true);
    let l = w.lookup(&b_host, x);
    assert_eq!(
        peers(&l.level0),
        vec![b_part.peer, a_full.peer, a_part.peer]
    );
    assert!(l.level1.is_empty() && l.level2.is_empty());
    assert!(
        linked_bridgeheads(&mut w, &b_db).is_empty(),
        "no bridgehead links in Baseline"
    );
    // A baseline GIS refuses a node started for the BIDS policy.
    let err =
        w.ix.register(
            PeerId::random(),
            idc("A"),
            vec![],
            None,
            Policy::Bids,
            w.now,
        )
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::BadRequest);
    assert!(err.message.contains("--policy baseline"), "{}", err.message);
}

#[test]
fn bad_certificates_are_refused_and_nothing_is_stored() {
    let mut w = World::new(Policy::Bids);
    w.ix.take_changes();
    let peer = Keypair::generate_ed25519().public().to_peer_id();
    let far = w.now / 1000 + 86_400;
    let good = w.cert_for(peer, "B", far);

    let mut forged = good.clone();
    forged.body.idc = idc("C");
    let other_peer = w.cert_for(PeerId::random(), "B", far);
    let expired = w.cert_for(peer, "B", w.now / 1000 - 1);
    let stranger = Keypair::generate_ed25519();
    let self_signed = BridgeheadCert::issue(&stranger, good.body.clone()).unwrap();

    let cases: Vec<(&str, Idc, BridgeheadCert, &str)> = vec![
        ("forged", idc("C"), forged, "signature"),
        ("another peer's", idc("B"), other_peer, "presented by"),
        ("another IDC's", idc("C"), good.clone(), "IDC"),
        ("expired", idc("B"), expired, "expired"),
        ("not the admin's", idc("B"), self_signed, "not by the admin"),
    ];
    for (what, claimed_idc, cert, needle) in cases {
        let err =
            w.ix.register(peer, claimed_idc, vec![], Some(cert), Policy::Bids, w.now)
                .unwrap_err();
        assert_eq!(err.kind, ErrorKind::BadCert, "{what}");
        assert!(err.message.contains(needle), "{what}: {}", err.message);
        assert!(
            !w.ix.is_registered(&peer),
            "{what} cert must not register the host"
        );
        assert!(
            w.ix.take_changes().is_empty(),
            "{what} cert must store nothing"
        );
        assert!(w.ix.idcs(w.now).is_empty());
    }
    // The good one works.
    assert_eq!(
        w.ix.register(peer, idc("B"), vec![], Some(good), Policy::Bids, w.now),
        Ok(Role::Bridgehead)
    );
}

#[test]
fn manifest_not_matching_its_id_is_refused_and_nothing_stored() {
    let mut w = World::new(Policy::Bids);
    let h = w.host("A");
    w.ix.take_changes();
    let (bytes, _) = manifest("img", "1", 4);
    let (_, other_id) = manifest("img", "2", 4);
    let err =
        w.ix.publish(
            h.peer,
            Holding {
                image: other_id,
                chunks_held: 4,
                complete: true,
                fetching: false,
            },
            &bytes,
            w.now,
        )
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::ManifestMismatch);
    assert!(w.ix.take_changes().is_empty());
    assert!(w.ix.images(w.now).is_empty());
    // Garbage is a bad request, also storing nothing.
    let err =
        w.ix.publish(
            h.peer,
            Holding {
                image: other_id,
                chunks_held: 0,
                complete: false,
                fetching: true,
            },
            b"\xff\x00garbage",
            w.now,
        )
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::BadRequest);
    assert!(w.ix.take_changes().is_empty());
    // A known image with different, wrong manifest bytes is also refused.
    let (_, id) = manifest("img", "1", 4);
    w.hold(&h, id, &bytes, 4, true, false);
    w.ix.take_changes();
    let (other_bytes, _) = manifest("img", "3", 4);
    let err =
        w.ix.publish(
            h.peer,
            Holding {
                image: id,
                chunks_held: 4,
                complete: true,
                fetching: false,
            },
            &other_bytes,
            w.now,
        )
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::ManifestMismatch);
    assert!(w.ix.take_changes().is_empty());
}

#[test]
fn publish_rules() {
    let mut w = World::new(Policy::Bids);
    let h = w.host("A");
    let (bytes, id) = manifest("img", "1", 4);
    let hold = |chunks_held, complete| Holding {
        image: id,
        chunks_held,
        complete,
        fetching: !complete,
    };
    // Unknown image without a manifest.
    assert_eq!(
        w.ix.publish(h.peer, hold(1, false), &[], w.now)
            .unwrap_err()
            .kind,
        ErrorKind::UnknownImage
    );
    // More chunks than the image has.
    assert_eq!(
        w.ix.publish(h.peer, hold(5, false), &bytes, w.now)
            .unwrap_err()
            .kind,
        ErrorKind::BadRequest
    );
    w.ix.take_changes();
    let p = w.ix.publish(h.peer, hold(1, false), &bytes, w.now).unwrap();
    assert!(p.new_image);
    assert_eq!(p.info.name, "img");
    assert_eq!(w.ix.take_changes().len(), 2, "image and holding");
    // Same holding again: no change to persist.
    let p = w.ix.publish(h.peer, hold(1, false), &[], w.now).unwrap();
    assert!(!p.new_image);
    assert!(w.ix.take_changes().is_empty());
    // All chunks held means complete.
    w.ix.publish(h.peer, hold(4, false), &[], w.now).unwrap();
    let v = w.ix.images(w.now);
    assert!(v[0].holders[&idc("A")][0].complete);
    // Another manifest under the same name:version is refused.
    let mut m = Manifest::from_bytes(&bytes).unwrap();
    m.size -= 1;
    let other = m.to_bytes();
    let err =
        w.ix.publish(
            h.peer,
            Holding {
                image: m.id(),
                chunks_held: 0,
                complete: false,
                fetching: true,
            },
            &other,
            w.now,
        )
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::BadRequest);
    assert!(err.message.contains("already published"), "{}", err.message);
    // Unpublish is idempotent and unknown images are reported.
    w.ix.unpublish(h.peer, id).unwrap();
    w.ix.unpublish(h.peer, id).unwrap();
    assert!(w.ix.images(w.now)[0].holders.is_empty());
    assert_eq!(
        w.ix.unpublish(h.peer, ImageId([9; 32])).unwrap_err().kind,
        ErrorKind::UnknownImage
    );
}

#[test]
fn unknown_image_and_unregistered_peer_errors() {
    let mut w = World::new(Policy::Bids);
    let h = w.host("A");
    let q = ImageQuery::Ref("debian:12".parse().unwrap());
    let err = w.ix.lookup(h.peer, &q, w.now).unwrap_err();
    assert_eq!(err.kind, ErrorKind::UnknownImage);
    assert_eq!(
        err.message,
        "image debian:12 is not known to the GIS; publish it first"
    );
    let bad = ImageQuery::Ref(ImageRef {
        name: "a b".into(),
        version: "1".into(),
    });
    assert_eq!(
        w.ix.lookup(h.peer, &bad, w.now).unwrap_err().kind,
        ErrorKind::BadRequest
    );

    let stranger = PeerId::random();
    for req in [
        GisRequest::Lookup {
            image: q.clone(),
            idc: None,
        },
        GisRequest::Heartbeat {
            stats: HostStats::default(),
        },
        GisRequest::Unpublish {
            image: ImageId([1; 32]),
        },
        GisRequest::Publish {
            holding: Holding {
                image: ImageId([1; 32]),
                chunks_held: 0,
                complete: false,
                fetching: true,
            },
            manifest: vec![],
        },
    ] {
        match w.ix.handle(stranger, req, w.now) {
            GisResponse::Error { kind, message } => {
                assert_eq!(kind, ErrorKind::NotRegistered);
                assert!(message.contains("send Register first"));
            }
            other => panic!("expected NotRegistered, got {other:?}"),
        }
    }
    // Revoke from a stranger is forbidden, from the admin accepted without registering.
    assert!(matches!(
        w.ix.handle(stranger, GisRequest::Revoke { serial: 1 }, w.now),
        GisResponse::Error {
            kind: ErrorKind::Forbidden,
            ..
        }
    ));
    match w
        .ix
        .handle(w.admin_peer(), GisRequest::Revoke { serial: 1 }, w.now)
    {
        GisResponse::Ack { revocations, .. } => assert!(revocations.is_revoked(1)),
        other => panic!("{other:?}"),
    }
    // Register through `handle` reports the heartbeat interval.
    match w.ix.handle(
        stranger,
        GisRequest::Register {
            idc: idc("A"),
            addrs: vec![],
            cert: None,
            policy: Policy::Bids,
        },
        w.now,
    ) {
        GisResponse::Registered {
            role,
            heartbeat_secs,
            revocations,
            bridgeheads,
        } => {
            assert!(
                bridgeheads.is_empty(),
                "an ordinary host learns no bridgeheads"
            );
            assert_eq!(role, Role::Host);
            assert_eq!(heartbeat_secs, 2);
            assert!(revocations.is_revoked(1));
        }
        other => panic!("{other:?}"),
    }
    let too_many = vec!["/ip4/127.0.0.1/tcp/1".parse().unwrap(); MAX_ADDRS + 1];
    assert_eq!(
        w.ix.register(stranger, idc("A"), too_many, None, Policy::Bids, w.now)
            .unwrap_err()
            .kind,
        ErrorKind::BadRequest
    );
    assert_eq!(
        w.ix.register(
            stranger,
            Idc("no spaces".into()),
            vec![],
            None,
            Policy::Bids,
            w.now
        )
        .unwrap_err()
        .kind,
        ErrorKind::BadRequest
    );
}

#[test]
fn restore_brings_back_records_but_not_liveness() {
    let mut s = scenario();
    let mut store = MemStorage::new();
    store.commit(&s.w.ix.take_changes()).unwrap();
    let (chosen, _) = s.chosen_b();
    let chosen = chosen.peer;
    let revoked = s.c_db.cert.as_ref().unwrap().body.serial;
    let admin = s.w.admin_peer();
    s.w.ix.revoke(admin, revoked).unwrap();
    s.w.ix.forget_host(&s.c_host.peer);
    store.commit(&s.w.ix.take_changes()).unwrap();

    let restored = Index::restore(s.w.ix.cfg.clone(), store.load().unwrap());
    assert_eq!(
        restored.images(s.w.now),
        s.w.ix
            .images(s.w.now)
            .into_iter()
            .map(|mut v| {
                for hs in v.holders.values_mut() {
                    for h in hs {
                        h.alive = false;
                    }
                }
                v
            })
            .collect::<Vec<_>>()
    );
    assert_eq!(restored.hosts(s.w.now).len(), 8);
    assert!(restored.hosts(s.w.now).iter().all(|h| !h.alive));
    assert!(restored.revocations().is_revoked(revoked));
    // Nobody is alive, so nobody is chosen or listed, but the image is known.
    let l = restored
        .lookup(s.b_host.peer, &ImageQuery::Id(s.x), s.w.now)
        .unwrap();
    assert!(l.level0.is_empty() && l.level1.is_empty() && l.level2.is_empty());
    // Hosts heartbeating again make the same choices as before.
    let mut restored = restored;
    for n in s.everyone() {
        if n.peer != s.c_host.peer {
            restored
                .heartbeat(n.peer, HostStats::default(), s.w.now)
                .unwrap();
        }
    }
    assert_eq!(
        restored.chosen_bridgehead(&idc("B"), &s.x, s.w.now),
        Some(chosen)
    );
    let l = restored
        .lookup(s.b_host.peer, &ImageQuery::Id(s.x), s.w.now)
        .unwrap();
    assert_eq!(peers(&l.level1), vec![chosen]);
}

#[test]
fn restore_drops_certs_of_another_admin() {
    let mut s = scenario();
    assert_eq!(
        s.w.ix
            .hosts(s.w.now)
            .iter()
            .filter(|h| h.cert.is_some())
            .count(),
        4
    );
    let mut store = MemStorage::new();
    store.commit(&s.w.ix.take_changes()).unwrap();
    let other_admin = Keypair::generate_ed25519().public().to_peer_id();
    let restored = Index::restore(
        IndexConfig::new(other_admin, Policy::Bids),
        store.load().unwrap(),
    );
    assert!(restored.hosts(s.w.now).iter().all(|h| h.cert.is_none()));
}

#[test]
fn console_views() {
    let mut s = scenario();
    s.w.ix
        .heartbeat(
            s.a_full.peer,
            HostStats {
                refusals: 3,
                ..HostStats::default()
            },
            s.w.now,
        )
        .unwrap();
    let idcs = s.w.ix.idcs(s.w.now);
    let names: Vec<&str> = idcs.iter().map(|i| i.idc.as_str()).collect();
    assert_eq!(names, vec!["A", "B", "C"]);
    assert_eq!(
        (idcs[0].hosts, idcs[0].live_hosts, idcs[0].bridgeheads),
        (4, 4, 1)
    );
    assert_eq!(
        (idcs[1].hosts, idcs[1].bridgeheads, idcs[1].live_bridgeheads),
        (3, 2, 2)
    );
    let hosts = s.w.ix.hosts(s.w.now);
    let full = hosts.iter().find(|h| h.peer == s.a_full.peer).unwrap();
    assert_eq!(full.stats.refusals, 3);
    assert_eq!(full.images, 1);
    assert!(full.alive && full.cert.is_none());
    let images = s.w.ix.images(s.w.now);
    assert_eq!(images.len(), 1);
    assert_eq!(images[0].chunks, 8);
    assert_eq!(images[0].publisher, s.a_full.peer);
    assert_eq!(images[0].holders[&idc("A")].len(), 2);
    // Forgetting the image removes its holdings too.
    assert!(s.w.ix.forget_image(&s.x));
    assert!(s.w.ix.images(s.w.now).is_empty());
    assert_eq!(
        s.w.ix
            .lookup(s.a_host.peer, &ImageQuery::Id(s.x), s.w.now)
            .unwrap_err()
            .kind,
        ErrorKind::UnknownImage
    );
}

#[test]
fn observer_lookup_sees_what_an_ordinary_host_of_that_idc_sees() {
    let mut s = scenario();
    let (chosen, _) = s.chosen_b();
    let chosen = chosen.peer;
    let stranger = PeerId::random();
    let q = ImageQuery::Id(s.x);
    let ask = |w: &mut World, idc_name: Option<&str>, who: PeerId| {
        w.ix.handle(
            who,
            GisRequest::Lookup {
                image: q.clone(),
                idc: idc_name.map(|n| Idc(n.to_string())),
            },
            w.now,
        )
    };
    match ask(&mut s.w, Some("B"), stranger) {
        GisResponse::HostList(l) => {
            assert!(l.level0.is_empty());
            assert_eq!(peers(&l.level1), vec![chosen]);
            assert!(l.level2.is_empty());
        }
        other => panic!("{other:?}"),
    }
    match ask(&mut s.w, Some("A"), stranger) {
        GisResponse::HostList(l) => {
            assert_eq!(peers(&l.level0), vec![s.a_full.peer, s.a_part.peer]);
            assert!(l.level1.is_empty());
        }
        other => panic!("{other:?}"),
    }
    assert!(
        !s.w.ix.is_registered(&stranger),
        "an observer is not registered by asking"
    );
    // A registered host may not pose as a host of another IDC.
    let b_host = s.b_host.peer;
    assert!(matches!(
        ask(&mut s.w, Some("A"), b_host),
        GisResponse::Error {
            kind: ErrorKind::BadRequest,
            ..
        }
    ));
    assert!(matches!(
        ask(&mut s.w, Some("B"), b_host),
        GisResponse::HostList(_)
    ));
    assert!(matches!(
        ask(&mut s.w, Some("bad idc"), stranger),
        GisResponse::Error {
            kind: ErrorKind::BadRequest,
            ..
        }
    ));
}

/// Issue 18 item 4: a host that banned a peer for corrupt chunks reports it in its
/// heartbeats; the GIS no longer lists that peer to it (others still see it), and lists it
/// again once the ban is no longer reported.
#[test]
fn peers_a_host_banned_are_not_listed_to_it() {
    let mut s = scenario();
    let x = s.x;
    let before = peers(&s.w.lookup(&s.a_host, x).level0);
    assert!(before.contains(&s.a_full.peer), "{before:?}");
    let stats = HostStats {
        banned: vec![s.a_full.peer],
        ..HostStats::default()
    };
    s.w.ix.heartbeat(s.a_host.peer, stats, s.w.now).unwrap();
    let after = peers(&s.w.lookup(&s.a_host, x).level0);
    assert!(!after.contains(&s.a_full.peer), "{after:?}");
    assert!(after.contains(&s.a_part.peer), "{after:?}");
    let others = peers(&s.w.lookup(&s.a_part, x).level0);
    assert!(others.contains(&s.a_full.peer), "{others:?}");
    s.w.ix
        .heartbeat(s.a_host.peer, HostStats::default(), s.w.now)
        .unwrap();
    assert!(peers(&s.w.lookup(&s.a_host, x).level0).contains(&s.a_full.peer));
}

#[test]
fn replicated_liveness_follows_the_records_not_the_clock() {
    let admin = Keypair::generate_ed25519();
    let mut cfg = IndexConfig::new(admin.public().to_peer_id(), Policy::Bids);
    cfg.replicated_liveness = true;
    let mut ix = Index::new(cfg);
    let peer = PeerId::random();
    let addrs = vec!["/ip4/127.0.0.1/tcp/4001".parse().unwrap()];
    ix.register(peer, idc("east"), addrs, None, Policy::Bids, T0)
        .unwrap();
    let timeout = DEFAULT_HEARTBEAT_TIMEOUT.as_millis() as i64;
    let later = T0 + 10 * timeout;
    // A replica that sees no heartbeats still lists the host: no record said it died.
    assert!(ix.hosts(later)[0].alive);
    // The leader, which does see them, finds it overdue without changing anything ...
    assert_eq!(ix.overdue(later), vec![peer]);
    assert!(ix.marked_alive(&peer));
    // ... and the replicated record is what kills it.
    assert!(ix.set_liveness(&peer, false, later));
    assert!(!ix.hosts(later)[0].alive);
    assert!(ix.overdue(later).is_empty());
    assert_eq!(ix.live_hosts(), vec![]);
    assert!(ix.set_liveness(&peer, true, later));
    assert_eq!(ix.live_hosts(), vec![(peer, later)]);
    // A new leader gives every live host a full timeout from now.
    ix.restart_liveness_clock(later + 5 * timeout);
    assert!(ix.overdue(later + 5 * timeout).is_empty());
    assert!(
        !ix.set_liveness(&PeerId::random(), true, later),
        "unknown hosts are refused"
    );
}

/// The per-IDC holder index says exactly what grouping `holders` by each host's IDC says.
fn assert_holder_index_consistent(ix: &Index) {
    let mut want: BTreeMap<ImageId, BTreeMap<Idc, BTreeSet<PeerId>>> = BTreeMap::new();
    for (image, hs) in &ix.holders {
        for p in hs.keys() {
            let idc = ix.hosts[p].rec.idc.clone();
            want.entry(*image)
                .or_default()
                .entry(idc)
                .or_default()
                .insert(*p);
        }
    }
    assert_eq!(ix.holders_by_idc, want);
}

proptest::proptest! {
    /// Whatever hosts register (again, elsewhere), publish, unpublish and are forgotten,
    /// and whatever images are forgotten, lookups read the per-IDC holder index, so it
    /// must stay what the holders say.
    #[test]
    fn the_per_idc_holder_index_follows_every_change(
        ops in proptest::collection::vec((0u8..6, 0usize..6, 0usize..3, 0usize..2), 1..60)
    ) {
        let mut w = World::new(Policy::Bids);
        let images = [manifest("a", "1", 3), manifest("b", "1", 2)];
        let peers: Vec<PeerId> = (0..6)
            .map(|_| Keypair::generate_ed25519().public().to_peer_id())
            .collect();
        let idcs = ["A", "B", "C"];
        for (op, who, place, img) in ops {
            let peer = peers[who];
            let (bytes, id) = &images[img];
            match op {
                0 | 1 => {
                    let _ = w.ix.register(peer, idc(idcs[place]), vec![], None, Policy::Bids, w.now);
                }
                2 | 3 => {
                    let holding = Holding { image: *id, chunks_held: 1, complete: op == 3, fetching: op == 2 };
                    let _ = w.ix.publish(peer, holding, bytes, w.now);
                }
                4 => {
                    let _ = w.ix.unpublish(peer, *id);
                }
                _ => {
                    if place == 0 {
                        w.ix.forget_image(id);
                    } else {
                        w.ix.forget_host(&peer);
                    }
                }
            }
            assert_holder_index_consistent(&w.ix);
            // A lookup from any registered host agrees with the holders too.
            if w.ix.is_registered(&peer) && w.ix.images.contains_key(id) {
                let list = w.ix.lookup(peer, &ImageQuery::Id(*id), w.now);
                if let Ok(l) = list {
                    let my = w.ix.hosts[&peer].rec.idc.clone();
                    for e in &l.level0 {
                        proptest::prop_assert_eq!(&e.idc, &my);
                    }
                }
            }
        }
    }
}

/// With more live hosts than the heartbeat budget covers at the base interval, the interval
/// grows with them and the timeout with it; when hosts die the interval shrinks at once,
/// but the timeout only once every host has had time to hear the shorter interval.
#[test]
fn the_heartbeat_interval_grows_with_the_live_hosts_and_the_timeout_follows_it() {
    let mut w = World::new(Policy::Bids);
    w.ix.cfg.heartbeats_per_s = 10;
    // Base: a fifth of the 10 s default timeout.
    w.ix.pace(w.now);
    assert_eq!(w.ix.heartbeat_secs(), 2);
    let hosts: Vec<Node> = (0..50).map(|_| w.host("A")).collect();
    // Second by second, as the server does: pace, then expire. `alive` heartbeat each
    // second; the others are silent. Returns who died.
    let run = |w: &mut World, secs: u32, alive: &[Node]| {
        let mut died = Vec::new();
        for _ in 0..secs {
            w.advance(1000, &alive.iter().collect::<Vec<_>>());
            w.ix.pace(w.now);
            died.extend(w.ix.expire(w.now));
        }
        died
    };
    assert!(run(&mut w, 1, &hosts).is_empty());
    // 50 hosts at 10 heartbeats/s: every 5 s; dead after 25 s.
    assert_eq!(w.ix.heartbeat_secs(), 5);
    let ack = w.ix.handle(
        hosts[0].peer,
        GisRequest::Heartbeat {
            stats: Default::default(),
        },
        w.now,
    );
    assert!(
        matches!(
            ack,
            GisResponse::Ack {
                heartbeat_secs: 5,
                ..
            }
        ),
        "{ack:?}"
    );
    // Forty fall silent: 20 s is no death at this pace, 26 s is.
    assert!(run(&mut w, 20, &hosts[..10]).is_empty());
    assert_eq!(run(&mut w, 6, &hosts[..10]).len(), 40);
    w.ix.pace(w.now);
    assert_eq!(
        w.ix.heartbeat_secs(),
        2,
        "ten hosts: back to the base interval"
    );
    // The ten last heard "5 s" a moment ago: they may stay silent 25 s more...
    assert!(run(&mut w, 24, &[]).is_empty());
    // ...after which the timeout is the configured 10 s again.
    assert_eq!(run(&mut w, 2, &[]).len(), 10);
    // Fixed pace: no budget, no change.
    let mut w = World::new(Policy::Bids);
    w.ix.cfg.heartbeats_per_s = 0;
    for _ in 0..50 {
        w.host("A");
    }
    w.ix.pace(w.now);
    assert_eq!(w.ix.heartbeat_secs(), 2);
}
