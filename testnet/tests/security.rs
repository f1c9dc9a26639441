//! The cross-IDC rule seen from outside: a raw libp2p client (tcp + noise + yamux, the hello
//! and chunk protocols, nothing else) knocks on IDC A's nodes as an ordinary host of IDC B, as
//! a "bridgehead" with a forged, stolen or expired certificate, and as a properly certified
//! one (the control); then a real node with a forged certificate joins the cluster. Last, a
//! peer that a node dialled asks for chunks before its welcome reached the node, and
//! certificates that expire while their links are open close those links.

mod common;

use bids_gis::admin_client::AdminClient;
use bids_protocols::cert::CertBody;
use bids_protocols::chunk::{self, ChunkRequest, ChunkResponse};
use bids_protocols::gis::{self as gisp, ErrorKind, GisRequest, GisResponse, Holding, ImageQuery};
use bids_protocols::hello::{self, Hello, HelloReply};
use bids_protocols::{BridgeheadCert, Idc, ImageId, ImageRef, Manifest, Policy, Role};
use bids_testnet::cluster::{issue_cert, Cluster, ClusterSpec, IdcSpec};
use common::{idc, image_file, ordinary, status, wait_for, CHUNK, MIB};
use futures::StreamExt;
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self as rr, OutboundRequestId, ProtocolSupport};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm};
use std::time::{Duration, Instant};

/// Bound of every single network exchange in these tests.
const STEP: Duration = Duration::from_secs(10);

#[derive(NetworkBehaviour)]
struct Client {
    hello: rr::Behaviour<hello::Codec>,
    chunk: rr::Behaviour<chunk::Codec>,
    gis: rr::Behaviour<gisp::Codec>,
}

/// A bare libp2p peer that speaks only the hello and chunk protocols (and asks the GIS).
struct RawPeer {
    swarm: Swarm<Client>,
}

impl RawPeer {
    fn new(key: Keypair) -> RawPeer {
        let swarm = libp2p::SwarmBuilder::with_existing_identity(key)
            .with_tokio()
            .with_tcp(
                libp2p::tcp::Config::default().nodelay(true),
                libp2p::noise::Config::new,
                libp2p::yamux::Config::default,
            )
            .expect("tcp/noise/yamux transport")
            .with_behaviour(|_| Client {
                hello: rr::Behaviour::with_codec(
                    hello::codec(),
                    [(hello::PROTOCOL, ProtocolSupport::Full)],
                    rr::Config::default().with_request_timeout(STEP),
                ),
                chunk: rr::Behaviour::with_codec(
                    chunk::codec(),
                    [(chunk::PROTOCOL, ProtocolSupport::Full)],
                    rr::Config::default().with_request_timeout(STEP),
                ),
                gis: rr::Behaviour::with_codec(
                    gisp::codec(),
                    [(gisp::PROTOCOL, ProtocolSupport::Outbound)],
                    rr::Config::default().with_request_timeout(STEP),
                ),
            })
            .expect("client behaviour")
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
            .build();
        RawPeer { swarm }
    }

    /// Dials `addr` (ending in `/p2p/<id>`) and waits for the connection.
    async fn connect(&mut self, addr: &Multiaddr) -> PeerId {
        self.swarm.dial(addr.clone()).expect("dial");
        let step = async {
            loop {
                match self.swarm.select_next_some().await {
                    SwarmEvent::ConnectionEstablished { peer_id, .. } => return peer_id,
                    SwarmEvent::OutgoingConnectionError { error, .. } => {
                        panic!("cannot connect to {addr}: {error}")
                    }
                    _ => {}
                }
            }
        };
        tokio::time::timeout(STEP, step)
            .await
            .expect("connecting timed out")
    }

    /// Says `h` to `peer`; the answer, or why none came.
    async fn hello(&mut self, peer: PeerId, h: Hello) -> Result<HelloReply, String> {
        let id = self.swarm.behaviour_mut().hello.send_request(&peer, h);
        self.answer(id, "hello", |e| match e {
            ClientEvent::Hello(e) => Some(e),
            _ => None,
        })
        .await
    }

    /// Asks `peer` for a chunk; the answer, or why none came.
    async fn chunk(&mut self, peer: PeerId, req: ChunkRequest) -> Result<ChunkResponse, String> {
        let id = self.swarm.behaviour_mut().chunk.send_request(&peer, req);
        self.answer(id, "chunk request", |e| match e {
            ClientEvent::Chunk(e) => Some(e),
            _ => None,
        })
        .await
    }

    /// The answer to request `id` of one behaviour (`pick` takes its events out of the
    /// swarm's), or why none came; panics after [`STEP`].
    async fn answer<Req, Resp>(
        &mut self,
        id: OutboundRequestId,
        what: &str,
        pick: impl Fn(ClientEvent) -> Option<rr::Event<Req, Resp>>,
    ) -> Result<Resp, String> {
        let step = async {
            loop {
                let SwarmEvent::Behaviour(e) = self.swarm.select_next_some().await else {
                    continue;
                };
                match pick(e) {
                    Some(rr::Event::Message {
                        message:
                            rr::Message::Response {
                                request_id,
                                response,
                            },
                        ..
                    }) if request_id == id => return Ok(response),
                    Some(rr::Event::OutboundFailure {
                        request_id, error, ..
                    }) if request_id == id => return Err(error.to_string()),
                    _ => {}
                }
            }
        };
        tokio::time::timeout(STEP, step)
            .await
            .unwrap_or_else(|_| panic!("{what} timed out"))
    }

    /// Listens on loopback; its address.
    async fn listen(&mut self) -> Multiaddr {
        self.swarm
            .listen_on("/ip4/127.0.0.1/tcp/0".parse().unwrap())
            .expect("listen");
        let step = async {
            loop {
                if let SwarmEvent::NewListenAddr { address, .. } =
                    self.swarm.select_next_some().await
                {
                    return address;
                }
            }
        };
        tokio::time::timeout(STEP, step)
            .await
            .expect("listening timed out")
    }

    /// Sends `req` to the GIS at `addr` (ending in `/p2p/<id>`); its answer.
    async fn gis(&mut self, addr: &Multiaddr, req: GisRequest) -> GisResponse {
        let Some(Protocol::P2p(gis)) = addr.iter().last() else {
            panic!("GIS address {addr} names no peer");
        };
        self.swarm.add_peer_address(gis, addr.clone());
        let id = self.swarm.behaviour_mut().gis.send_request(&gis, req);
        self.answer(id, "GIS request", |e| match e {
            ClientEvent::Gis(e) => Some(e),
            _ => None,
        })
        .await
        .unwrap_or_else(|e| panic!("GIS request failed: {e}"))
    }

    /// Waits until no connection to `peer` is left.
    async fn closed(&mut self, peer: PeerId) {
        let step = async {
            while self.swarm.is_connected(&peer) {
                self.swarm.select_next_some().await;
            }
        };
        tokio::time::timeout(STEP, step)
            .await
            .expect("the node did not close the connection");
    }
}

fn hello_as(idc: &str, cert: Option<BridgeheadCert>) -> Hello {
    Hello {
        idc: Idc::new(idc).expect("IDC name"),
        policy: Policy::Bids,
        cert,
    }
}

/// A cluster of IDC A (a holder and a bridgehead) and IDC B (one host, one bridgehead), with a
/// 4 MiB image seeded on A's holder. Returns the cluster, A's holder, A's bridgehead, the
/// image and its manifest.
async fn setup(image_dir: &std::path::Path) -> (Cluster, usize, usize, ImageRef, Manifest) {
    common::init_logs();
    let c = Cluster::start(ClusterSpec {
        idcs: vec![idc("A", 1, 1), idc("B", 1, 1)],
        policy: Policy::Bids,
        shaped: false,
    })
    .await
    .expect("cluster");
    let a = c.idc_nodes("A");
    let holder = *a.iter().find(|&&i| !c.nodes[i].is_bridgehead()).unwrap();
    let bridgehead = *a.iter().find(|&&i| c.nodes[i].is_bridgehead()).unwrap();
    let file = image_dir.join("image.raw");
    bids_testnet::demo::make_image(&file, 4 * MIB, 11, false).unwrap();
    let image: ImageRef = "secure:1".parse().unwrap();
    let m = c.seed(holder, &file, &image, CHUNK).await.expect("seeding");
    (c, holder, bridgehead, image, m)
}

fn addr_of(c: &Cluster, i: usize) -> Multiaddr {
    c.nodes[i].node().listen_addrs()[0].clone()
}

fn request(id: ImageId) -> ChunkRequest {
    ChunkRequest {
        image: id,
        index: 0,
    }
}

/// Expects a refused hello followed by the node closing the connection, then shows that a
/// chunk request on a fresh connection without an accepted hello gets no data either.
async fn expect_refused(
    client: &mut RawPeer,
    addr: &Multiaddr,
    h: Hello,
    id: ImageId,
    reason_has: &str,
) {
    let peer = client.connect(addr).await;
    match client.hello(peer, h).await {
        Ok(HelloReply::Refused(reason)) => assert!(
            reason.contains(reason_has),
            "refusal {reason:?} should mention {reason_has:?}"
        ),
        other => panic!("expected a refused hello ({reason_has:?}), got {other:?}"),
    }
    client.closed(peer).await;
    // A chunk request without an accepted hello, on a new connection.
    let peer = client.connect(addr).await;
    match client.chunk(peer, request(id)).await {
        Ok(ChunkResponse::Refused(_)) => {}
        other => panic!("a chunk request without an accepted hello got {other:?}"),
    }
}

/// (a) An ordinary host of IDC B talks straight to a host of IDC A: refused, disconnected,
/// no data; a certified bridgehead of B is refused by A's ordinary host too, since ordinary
/// hosts never talk to another IDC.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordinary_host_of_another_idc_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (c, holder, _, _, m) = setup(dir.path()).await;
    let id = m.id();
    let addr = addr_of(&c, holder);
    let before = status(&c, holder).await.refusals;

    let mut host_b = RawPeer::new(Keypair::generate_ed25519());
    expect_refused(
        &mut host_b,
        &addr,
        hello_as("B", None),
        id,
        "ordinary host of IDC A",
    )
    .await;

    let key = Keypair::generate_ed25519();
    let cert = issue_cert(
        &c.admin,
        key.public().to_peer_id(),
        "B",
        "B-db9",
        9001,
        Duration::from_secs(3600),
    )
    .unwrap();
    let mut bridgehead_b = RawPeer::new(key);
    expect_refused(
        &mut bridgehead_b,
        &addr,
        hello_as("B", Some(cert)),
        id,
        "ordinary host of IDC A",
    )
    .await;

    let after = status(&c, holder).await;
    assert!(
        after.refusals >= before + 4,
        "A's holder counted {} refusals, expected at least {} (2 hellos, 2 chunk requests)",
        after.refusals,
        before + 4
    );
    assert_eq!(
        after.total.wan_sent_bytes + after.total.lan_sent_bytes,
        0,
        "A's holder sent image data"
    );
    c.shutdown().await;
}

/// (b) and (c): A's bridgehead refuses "bridgeheads" of B whose certificate is signed by
/// another key, was altered after signing, belongs to another peer, or has expired; with a
/// certificate the admin really issued, the same client is welcome and gets a verified chunk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_stolen_and_expired_certificates_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (c, _, bridgehead, _, m) = setup(dir.path()).await;
    let id = m.id();
    let addr = addr_of(&c, bridgehead);
    let before = status(&c, bridgehead).await.refusals;
    let now = bids_protocols::unix_now();
    let body = |peer: PeerId, not_before: i64, not_after: i64| CertBody {
        peer,
        idc: Idc::new("B").unwrap(),
        db_id: "B-rogue".into(),
        serial: 7777,
        not_before,
        not_after,
        issuer: peer,
    };

    // Signed by a key that is not the admin.
    let key = Keypair::generate_ed25519();
    let rogue_admin = Keypair::generate_ed25519();
    let forged = BridgeheadCert::issue(
        &rogue_admin,
        body(key.public().to_peer_id(), now - 60, now + 3600),
    )
    .unwrap();
    let mut client = RawPeer::new(key);
    expect_refused(
        &mut client,
        &addr,
        hello_as("B", Some(forged)),
        id,
        "not by the admin",
    )
    .await;

    // Signed by another key but claiming the admin as issuer.
    let key = Keypair::generate_ed25519();
    let mut claimed = BridgeheadCert::issue(
        &rogue_admin,
        body(key.public().to_peer_id(), now - 60, now + 3600),
    )
    .unwrap();
    claimed.body.issuer = c.admin.public().to_peer_id();
    let mut client = RawPeer::new(key);
    expect_refused(
        &mut client,
        &addr,
        hello_as("B", Some(claimed)),
        id,
        "signature does not match",
    )
    .await;

    // The real certificate of B's bridgehead, presented by another identity.
    let b_bridgehead = c
        .idc_nodes("B")
        .into_iter()
        .find(|&i| c.nodes[i].is_bridgehead())
        .unwrap();
    let stolen = c.nodes[b_bridgehead].cert.clone().unwrap();
    let mut client = RawPeer::new(Keypair::generate_ed25519());
    expect_refused(
        &mut client,
        &addr,
        hello_as("B", Some(stolen)),
        id,
        "certificate is for peer",
    )
    .await;

    // (c) Issued by the admin, but expired an hour ago.
    let key = Keypair::generate_ed25519();
    let expired = BridgeheadCert::issue(
        &c.admin,
        body(key.public().to_peer_id(), now - 7200, now - 3600),
    )
    .unwrap();
    let mut client = RawPeer::new(key);
    expect_refused(
        &mut client,
        &addr,
        hello_as("B", Some(expired)),
        id,
        "expired",
    )
    .await;

    let after = status(&c, bridgehead).await;
    assert!(
        after.refusals >= before + 8,
        "A's bridgehead counted {} refusals, expected at least {} (4 hellos, 4 chunk requests)",
        after.refusals,
        before + 8
    );
    assert_eq!(
        after.total.wan_sent_bytes, 0,
        "A's bridgehead sent image data over the WAN"
    );

    // Control: a certificate the admin issued is welcome and gets a verified chunk, so the
    // refusals above are the certificates' doing, not the client's.
    let key = Keypair::generate_ed25519();
    let good = BridgeheadCert::issue(
        &c.admin,
        body(key.public().to_peer_id(), now - 60, now + 3600),
    )
    .unwrap();
    let mut client = RawPeer::new(key);
    let peer = client.connect(&addr).await;
    match client.hello(peer, hello_as("B", Some(good))).await {
        Ok(HelloReply::Welcome(h)) => assert_eq!(h.idc.as_str(), "A"),
        other => panic!("a properly certified bridgehead was not welcome: {other:?}"),
    }
    // A's bridgehead does not hold the image: it pulls it from A's holder and answers
    // NotHeld while it does not yet know its LAN has the chunk, so ask again as a real
    // bridgehead would (bounded).
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        match client.chunk(peer, request(id)).await {
            Ok(ChunkResponse::Data { encoding, payload }) => {
                let raw = chunk::decode_payload(encoding, payload, m.chunk_len(0)).unwrap();
                assert_eq!(
                    bids_protocols::manifest::sha256(&raw),
                    m.chunks[0].sha256,
                    "the control chunk does not verify"
                );
                break;
            }
            Ok(ChunkResponse::NotHeld) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => panic!("the certified client got no chunk: {other:?}"),
        }
    }
    c.shutdown().await;
}

/// (d) A real node of IDC B with a certificate signed by a rogue key: `start` refuses it
/// against the real admin; configured to trust the rogue key instead, it starts, but the GIS
/// refuses the certificate, so the node drops it and joins as an ordinary host of B: never
/// listed as a bridgehead, never a byte across the WAN (what it gets, it gets over B's LAN,
/// like any host of B without a certificate), while the legitimate hosts of B get the image
/// across the WAN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_with_forged_certificate_gets_nothing_across_the_wan() {
    let (file, _guard) = image_file(4 * MIB, 12, false);
    let mut c = Cluster::start(ClusterSpec {
        idcs: vec![idc("A", 1, 1), idc("B", 2, 1)],
        policy: Policy::Bids,
        shaped: false,
    })
    .await
    .expect("cluster");
    let holder = *common::ordinary(&c, &c.idc_nodes("A")).first().unwrap();
    let image: ImageRef = "secure:2".parse().unwrap();
    let m = c.seed(holder, &file, &image, CHUNK).await.expect("seeding");
    let legit_b = c.idc_nodes("B");

    let rogue = c.add_node("B").unwrap();
    let rogue_peer = c.nodes[rogue].peer_id();
    let rogue_admin = Keypair::generate_ed25519();
    let now = bids_protocols::unix_now();
    let forged = BridgeheadCert::issue(
        &rogue_admin,
        CertBody {
            peer: rogue_peer,
            idc: Idc::new("B").unwrap(),
            db_id: "B-db666".into(),
            serial: 666,
            not_before: now - 60,
            not_after: now + 3600,
            issuer: rogue_peer,
        },
    )
    .unwrap();
    c.nodes[rogue].cert = Some(forged.clone());

    // Start-up checks the node's own certificate against the configured admin.
    let err = c
        .start_node_with(rogue, |_| {})
        .await
        .expect_err("a node with a forged certificate started");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("bridgehead certificate is not usable") && msg.contains("not by the admin"),
        "unclear start-up error: {msg}"
    );

    // A rogue operator points its node at its own "admin": it starts, but the GIS refuses it.
    let rogue_admin_peer = rogue_admin.public().to_peer_id();
    c.start_node_with(rogue, |cfg| cfg.admin_peer = rogue_admin_peer)
        .await
        .expect("the rogue node starts when it trusts its own key");
    let rh = c.nodes[rogue].node().clone();
    let answer = rh
        .gis_request(GisRequest::Register {
            idc: Idc::new("B").unwrap(),
            addrs: Vec::new(),
            cert: Some(forged),
            policy: Policy::Bids,
        })
        .await
        .expect("the GIS answers");
    match answer {
        GisResponse::Error { kind, message } => {
            assert_eq!(kind, ErrorKind::BadCert, "{message}");
            assert!(message.contains("not by the admin"), "{message}");
        }
        other => panic!("the GIS accepted a forged certificate: {other:?}"),
    }
    // Refused at registration, the node dropped the certificate and registered without it.
    let st = wait_for(
        "the rogue registered as an ordinary host",
        Duration::from_secs(10),
        || async { rh.status().await.ok().filter(|s| s.registered) },
    )
    .await;
    assert_eq!(st.role, Role::Host);

    // B's bridgehead for the image is the certified one, not the rogue.
    let list = c.lookup("B", &ImageQuery::Id(m.id())).await.unwrap();
    let chosen: Vec<PeerId> = list.level1.iter().map(|e| e.peer).collect();
    let real_b = c
        .idc_nodes("B")
        .into_iter()
        .find(|&i| c.nodes[i].is_bridgehead())
        .unwrap();
    assert_eq!(
        chosen,
        vec![c.nodes[real_b].peer_id()],
        "B's bridgehead for the image"
    );

    // The legitimate hosts of B get the image across the WAN meanwhile.
    c.fetch_all(&legit_b, &image, Duration::from_secs(30))
        .await
        .expect("legitimate hosts of B fetch the image");
    for &i in &legit_b {
        assert_eq!(
            common::file_hash(&c.nodes[i].node().store().image_path(&m.id())),
            common::file_hash(&file),
            "node {i} differs"
        );
    }

    // The rogue's own download, as an ordinary host of B: whatever it gets comes over B's
    // LAN, nothing across the WAN.
    let _ = tokio::time::timeout(
        Duration::from_secs(30),
        rh.fetch_and_wait(ImageQuery::Ref(image.clone())),
    )
    .await;
    let st = rh.status().await.unwrap();
    assert_eq!(st.total.wan_recv_bytes, 0, "the rogue received WAN data");
    assert_eq!(st.role, Role::Host);

    // The GIS never lists it as a bridgehead, nor to another IDC.
    for idc_name in ["A", "B"] {
        let list = wait_for("a host list", Duration::from_secs(10), || async {
            c.lookup(idc_name, &ImageQuery::Id(m.id())).await.ok()
        })
        .await;
        for e in list.level1.iter().chain(&list.level2) {
            assert_ne!(
                e.peer, rogue_peer,
                "the GIS lists the rogue as a bridgehead"
            );
        }
        if idc_name == "A" {
            assert!(
                list.level0.iter().all(|e| e.peer != rogue_peer),
                "the GIS lists the rogue to another IDC"
            );
        }
    }
    c.shutdown().await;
}

/// With 0-RTT stream negotiation, a peer that accepted a node's hello may ask for chunks at
/// once, and the request can reach the node before the welcome does. The node, which
/// dialled and waits for that welcome, holds the request and serves it once the welcome is
/// judged; it used to answer "say hello first" and count a refusal. Here a raw peer of IDC A
/// claims at the GIS to hold the image, so A's bridgehead, fetching it, dials the raw peer;
/// the raw peer asks for chunk 0 and sends its welcome only 300 ms later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_request_that_overtakes_the_welcome_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let (c, _holder, bridgehead, image, m) = setup(dir.path()).await;
    let mut raw = RawPeer::new(Keypair::generate_ed25519());
    let addr = raw.listen().await;
    let registered = raw
        .gis(
            &c.gis_addr,
            GisRequest::Register {
                idc: Idc::new("A").unwrap(),
                addrs: vec![addr],
                cert: None,
                policy: Policy::Bids,
            },
        )
        .await;
    assert!(
        matches!(registered, GisResponse::Registered { .. }),
        "{registered:?}"
    );
    let published = raw
        .gis(
            &c.gis_addr,
            GisRequest::Publish {
                holding: Holding {
                    image: m.id(),
                    chunks_held: m.chunk_count(),
                    complete: true,
                    fetching: false,
                },
                manifest: m.to_bytes(),
            },
        )
        .await;
    assert!(
        !matches!(published, GisResponse::Error { .. }),
        "{published:?}"
    );
    let before = status(&c, bridgehead).await.refusals;
    let b = c.nodes[bridgehead].node().clone();
    let fetch = tokio::spawn(async move { b.fetch_and_wait(ImageQuery::Ref(image)).await });

    let mut asked = None;
    let mut welcome: Option<(Instant, rr::ResponseChannel<HelloReply>)> = None;
    let answer = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let due = welcome.as_ref().map(|(at, _)| *at);
            let event = tokio::select! {
                e = raw.swarm.select_next_some() => Some(e),
                _ = tokio::time::sleep_until(due.unwrap_or_else(Instant::now).into()), if due.is_some() => None,
            };
            let Some(event) = event else {
                let (_, channel) = welcome.take().unwrap();
                let _ = raw
                    .swarm
                    .behaviour_mut()
                    .hello
                    .send_response(channel, HelloReply::Welcome(hello_as("A", None)));
                continue;
            };
            match event {
                SwarmEvent::Behaviour(ClientEvent::Hello(rr::Event::Message {
                    peer,
                    message: rr::Message::Request { channel, .. },
                    ..
                })) if asked.is_none() => {
                    // Accept the node, ask it for a chunk at once, and welcome it later.
                    let id = raw
                        .swarm
                        .behaviour_mut()
                        .chunk
                        .send_request(&peer, request(m.id()));
                    asked = Some(id);
                    welcome = Some((Instant::now() + Duration::from_millis(300), channel));
                }
                SwarmEvent::Behaviour(ClientEvent::Chunk(rr::Event::Message {
                    message: rr::Message::Request { channel, .. },
                    ..
                })) => {
                    // The raw peer holds nothing after all.
                    let _ = raw
                        .swarm
                        .behaviour_mut()
                        .chunk
                        .send_response(channel, ChunkResponse::NotHeld);
                }
                SwarmEvent::Behaviour(ClientEvent::Chunk(rr::Event::Message {
                    message:
                        rr::Message::Response {
                            request_id,
                            response,
                        },
                    ..
                })) if Some(request_id) == asked => return response,
                SwarmEvent::Behaviour(ClientEvent::Chunk(rr::Event::OutboundFailure {
                    request_id,
                    error,
                    ..
                })) if Some(request_id) == asked => panic!("the chunk request failed: {error}"),
                _ => {}
            }
        }
    })
    .await
    .expect("the bridgehead never dialled the raw peer, or never answered");
    match answer {
        ChunkResponse::Data { .. } => {}
        other => panic!("a request that overtook the welcome got {other:?}"),
    }
    // Keep answering the bridgehead's requests, so its fetch does not wait for time-outs.
    let answering = tokio::spawn(async move {
        loop {
            if let SwarmEvent::Behaviour(ClientEvent::Chunk(rr::Event::Message {
                message: rr::Message::Request { channel, .. },
                ..
            })) = raw.swarm.select_next_some().await
            {
                let _ = raw
                    .swarm
                    .behaviour_mut()
                    .chunk
                    .send_response(channel, ChunkResponse::NotHeld);
            }
        }
    });
    let secs = tokio::time::timeout(Duration::from_secs(60), fetch)
        .await
        .expect("the fetch timed out")
        .unwrap()
        .expect("the fetch failed");
    assert!(secs > 0.0);
    assert_eq!(
        status(&c, bridgehead).await.refusals,
        before,
        "the bridgehead refused someone"
    );
    answering.abort();
    c.shutdown().await;
}

/// Sleeps until unix time `at_ms` (milliseconds).
async fn sleep_until_unix_ms(at_ms: i64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    if at_ms > now {
        tokio::time::sleep(Duration::from_millis((at_ms - now) as u64)).await;
    }
}

/// Issue 18, item 2 (b): a bridgehead of another IDC whose certificate was valid at its hello
/// is disconnected at the certificate's not-after, by our side alone (this raw peer never
/// closes on its own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_whose_certificate_expires_is_disconnected_at_its_not_after() {
    let dir = tempfile::tempdir().unwrap();
    let (c, _, bridgehead, _, _) = setup(dir.path()).await;
    let key = Keypair::generate_ed25519();
    let now = bids_protocols::unix_now();
    let cert = BridgeheadCert::issue(
        &c.admin,
        CertBody {
            peer: key.public().to_peer_id(),
            idc: Idc::new("B").unwrap(),
            db_id: "B-short".into(),
            serial: 8888,
            not_before: now - 60,
            not_after: now + 3,
            issuer: key.public().to_peer_id(),
        },
    )
    .unwrap();
    let not_after = cert.body.not_after;
    // B's real bridgehead is linked already.
    let links = status(&c, bridgehead).await.wan_links;
    let mut client = RawPeer::new(key);
    let peer = client.connect(&addr_of(&c, bridgehead)).await;
    match client.hello(peer, hello_as("B", Some(cert))).await {
        Ok(HelloReply::Welcome(_)) => {}
        other => panic!("a bridgehead with a valid certificate was not welcome: {other:?}"),
    }
    assert_eq!(status(&c, bridgehead).await.wan_links, links + 1);
    client.closed(peer).await;
    let closed_at = bids_protocols::unix_now();
    assert!(
        closed_at >= not_after && closed_at <= not_after + 2,
        "closed at {closed_at}, the certificate ended at {not_after}"
    );
    assert_eq!(status(&c, bridgehead).await.wan_links, links);
    c.shutdown().await;
}

/// Issue 18, item 2: B's bridgehead gets a certificate that ends a few seconds into a
/// cross-IDC transfer over a slow WAN. At its not-after the WAN transfer stops (no WAN byte
/// moves 2 s later), the node is an ordinary host (status and GIS), B gets no chosen
/// bridgehead; a renewed certificate handed over without a restart makes it a bridgehead
/// again, and B's hosts complete bit-exact, never crossing the WAN themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_bridgehead_certificate_stops_the_wan_and_a_renewal_resumes_it() {
    common::init_logs();
    let size = 16 * MIB;
    let (file, _guard) = image_file(size, 71, false);
    let wan = |spec: IdcSpec| IdcSpec {
        wan_bps: 1_000_000,
        wan_delay: Duration::from_millis(5),
        ..spec
    };
    let c = Cluster::start(ClusterSpec {
        idcs: vec![wan(idc("A", 1, 1)), wan(idc("B", 2, 1))],
        policy: Policy::Bids,
        shaped: true,
    })
    .await
    .expect("cluster");
    let holder = ordinary(&c, &c.idc_nodes("A"))[0];
    let image: ImageRef = "expiry:1".parse().unwrap();
    let m = c.seed(holder, &file, &image, CHUNK).await.expect("seeding");
    let id = m.id();
    let b = c.idc_nodes("B");
    let db = b[0];
    assert!(c.nodes[db].is_bridgehead());
    let hosts = ordinary(&c, &b);
    let db_peer = c.nodes[db].peer_id();

    // A certificate that ends in a few seconds, taken without a restart.
    let short = issue_cert(
        &c.admin,
        db_peer,
        "B",
        "B-db1",
        5001,
        Duration::from_secs(5),
    )
    .expect("short certificate");
    let not_after = short.body.not_after;
    let role = c.nodes[db].node().set_cert(Some(short)).await;
    assert_eq!(role, Ok(Role::Bridgehead));
    let st = status(&c, db).await;
    assert_eq!(st.cert_expires_at, Some(not_after));
    assert!(
        st.cert_expiring,
        "5 s left is within the default 14-day warning"
    );

    let mut tasks = Vec::new();
    for &i in &hosts {
        let n = c.nodes[i].node().clone();
        let q = ImageQuery::Ref(image.clone());
        tasks.push((i, tokio::spawn(async move { n.fetch_and_wait(q).await })));
    }
    wait_for(
        "B's bridgehead to pull over the WAN",
        Duration::from_secs(10),
        || async { (status(&c, db).await.total.wan_recv_bytes > 0).then_some(()) },
    )
    .await;
    assert!(
        bids_protocols::unix_now() < not_after,
        "the certificate ended before the WAN transfer began; lengthen it"
    );

    // 2 s after the not-after the WAN is closed: nothing more crosses it.
    sleep_until_unix_ms(not_after * 1000 + 2000).await;
    let at_2s = status(&c, db).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let at_3s = status(&c, db).await;
    eprintln!(
        "WAN bytes into B: {} two seconds after the not-after, {} 1.5 s later (image {size})",
        at_2s.total.wan_recv_bytes, at_3s.total.wan_recv_bytes
    );
    assert!(
        at_2s.total.wan_recv_bytes < size,
        "the whole image crossed before the certificate ended; slow the WAN down"
    );
    assert_eq!(
        at_3s.total.wan_recv_bytes, at_2s.total.wan_recv_bytes,
        "WAN bytes still grow after the certificate ended"
    );
    assert_eq!(at_3s.wan_links, 0, "a cross-IDC link is still open");
    assert_eq!(
        at_3s.role,
        Role::Host,
        "the node still reports role bridgehead"
    );
    assert_eq!(at_3s.cert_expires_at, None);
    let admin = AdminClient::connect(c.gis_addr.clone(), c.admin.clone())
        .await
        .expect("admin client connects");
    let seen = admin
        .hosts()
        .await
        .expect("hosts")
        .into_iter()
        .find(|h| h.peer == db_peer)
        .expect("the GIS lists B's bridgehead");
    assert_eq!(
        seen.role,
        Role::Host,
        "the GIS still shows it as a bridgehead"
    );
    let list = c.lookup("B", &ImageQuery::Id(id)).await.expect("lookup");
    assert!(
        list.level1.is_empty(),
        "B still has a chosen bridgehead: {:?}",
        list.level1
    );

    // A renewed certificate takes effect without a restart, and the transfer resumes.
    let renewed = issue_cert(
        &c.admin,
        db_peer,
        "B",
        "B-db1",
        5002,
        Duration::from_secs(30 * 86_400),
    )
    .expect("renewed certificate");
    assert_eq!(
        c.nodes[db].node().set_cert(Some(renewed)).await,
        Ok(Role::Bridgehead)
    );
    assert_eq!(status(&c, db).await.role, Role::Bridgehead);
    assert!(!status(&c, db).await.cert_expiring);
    common::fetched_bit_exact(&c, tasks, &id, &file, Duration::from_secs(40)).await;
    for &i in &hosts {
        assert_eq!(
            status(&c, i).await.total.wan_recv_bytes,
            0,
            "host {i} crossed the WAN itself"
        );
    }
    assert!(status(&c, db).await.total.wan_recv_bytes > at_3s.total.wan_recv_bytes);
    c.shutdown().await;
}
