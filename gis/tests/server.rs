//! The GIS over the network on 127.0.0.1: real libp2p peers register, publish and look up;
//! malformed streams are closed without harming the server; shutdown and restart.

mod common;

use bids_protocols::codec::encode_frame;
use bids_protocols::gis::{
    self, ErrorKind, GisRequest, GisResponse, HostStats, ImageQuery, MAX_REQUEST_BYTES,
    MAX_RESPONSE_BYTES,
};
use bids_protocols::Role;
use common::*;
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, StreamExt};
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, StreamProtocol};
use std::io;
use std::time::Duration;

#[tokio::test]
async fn register_publish_lookup_over_the_network() {
    let dir = tempfile::tempdir().unwrap();
    let admin = Keypair::generate_ed25519();
    let g = gis(dir.path(), peer_of(&admin)).await;
    let addrs = g.listen_addrs();
    assert!(!addrs.is_empty());
    assert!(addrs
        .iter()
        .all(|a| a.iter().last() == Some(Protocol::P2p(g.peer_id()))));
    let addr = &addrs[0];

    let (bytes, x) = manifest("debian", "12", 6);
    let a1 = Keypair::generate_ed25519();
    let a_db = Keypair::generate_ed25519();
    let b1 = Keypair::generate_ed25519();
    let b_db = Keypair::generate_ed25519();

    // A host of A registers, publishes X and looks it up, all on one connection.
    let rs = bids_gis::client::request_many(
        a1.clone(),
        addr.clone(),
        vec![
            register("A", None),
            publish(x, &bytes, 6, true),
            GisRequest::Heartbeat {
                stats: HostStats::default(),
            },
        ],
        TIMEOUT,
    )
    .await
    .unwrap();
    match &rs[0] {
        GisResponse::Registered {
            role,
            heartbeat_secs,
            ..
        } => {
            assert_eq!(*role, Role::Host);
            assert_eq!(*heartbeat_secs, 2);
        }
        other => panic!("{other:?}"),
    }
    assert_ack(&rs[1]);
    assert_ack(&rs[2]);

    for (key, name, serial) in [(&a_db, "A", 1), (&b_db, "B", 2)] {
        match ask(
            key,
            addr,
            register(name, Some(cert(&admin, peer_of(key), name, serial))),
        )
        .await
        {
            GisResponse::Registered { role, .. } => assert_eq!(role, Role::Bridgehead),
            other => panic!("{other:?}"),
        }
    }
    assert!(matches!(
        ask(&b1, addr, register("B", None)).await,
        GisResponse::Registered {
            role: Role::Host,
            ..
        }
    ));

    // B's host: only B's bridgehead.
    let by_ref = ImageQuery::Ref("debian:12".parse().unwrap());
    let GisResponse::HostList(l) = ask(
        &b1,
        addr,
        GisRequest::Lookup {
            image: by_ref.clone(),
            idc: None,
        },
    )
    .await
    else {
        panic!("no host list")
    };
    assert_eq!(l.image.id, x);
    assert_eq!(l.manifest, bytes);
    assert!(l.level0.is_empty());
    assert_eq!(l.level1.len(), 1);
    assert_eq!(l.level1[0].peer, peer_of(&b_db));
    assert_eq!(
        l.level1[0].addrs,
        vec!["/ip4/127.0.0.1/tcp/4001".parse::<Multiaddr>().unwrap()]
    );
    assert!(l.level2.is_empty());

    // B's bridgehead: A's bridgehead at level 2.
    let GisResponse::HostList(l) = ask(
        &b_db,
        addr,
        GisRequest::Lookup {
            image: ImageQuery::Id(x),
            idc: None,
        },
    )
    .await
    else {
        panic!("no host list")
    };
    assert!(l.level1.is_empty());
    assert_eq!(
        l.level2.iter().map(|e| e.peer).collect::<Vec<_>>(),
        vec![peer_of(&a_db)]
    );

    // An unregistered tool names an IDC and sees that IDC's view.
    let tool = Keypair::generate_ed25519();
    let GisResponse::HostList(l) = ask(
        &tool,
        addr,
        GisRequest::Lookup {
            image: by_ref.clone(),
            idc: Some(idc("A")),
        },
    )
    .await
    else {
        panic!("no host list")
    };
    assert_eq!(
        l.level0.iter().map(|e| e.peer).collect::<Vec<_>>(),
        vec![peer_of(&a1)]
    );

    // Without an IDC it must register first.
    match ask(
        &tool,
        addr,
        GisRequest::Lookup {
            image: by_ref,
            idc: None,
        },
    )
    .await
    {
        GisResponse::Error { kind, message } => {
            assert_eq!(kind, ErrorKind::NotRegistered);
            assert!(message.contains("Register"), "{message}");
        }
        other => panic!("{other:?}"),
    }

    // Revocation: the admin only; B's host then sees no bridgehead.
    assert!(matches!(
        ask(&b1, addr, GisRequest::Revoke { serial: 2 }).await,
        GisResponse::Error {
            kind: ErrorKind::Forbidden,
            ..
        }
    ));
    match ask(&admin, addr, GisRequest::Revoke { serial: 2 }).await {
        GisResponse::Ack { revocations, .. } => assert!(revocations.is_revoked(2)),
        other => panic!("{other:?}"),
    }
    let GisResponse::HostList(l) = ask(
        &b1,
        addr,
        GisRequest::Lookup {
            image: ImageQuery::Id(x),
            idc: None,
        },
    )
    .await
    else {
        panic!("no host list")
    };
    assert!(l.level1.is_empty());
    g.shutdown().await.unwrap();
}

#[tokio::test]
async fn bad_requests_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let admin = Keypair::generate_ed25519();
    let g = gis(dir.path(), peer_of(&admin)).await;
    let addr = &g.listen_addrs()[0];
    let h = Keypair::generate_ed25519();

    // A certificate signed by someone else.
    let forged = cert(&Keypair::generate_ed25519(), peer_of(&h), "A", 5);
    match ask(&h, addr, register("A", Some(forged))).await {
        GisResponse::Error { kind, message } => {
            assert_eq!(kind, ErrorKind::BadCert);
            assert!(message.contains("not by the admin"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    // It is not registered because of it.
    assert!(matches!(
        ask(
            &h,
            addr,
            GisRequest::Heartbeat {
                stats: HostStats::default()
            }
        )
        .await,
        GisResponse::Error {
            kind: ErrorKind::NotRegistered,
            ..
        }
    ));
    // A CBOR-valid but invalid IDC name.
    let bad_idc = GisRequest::Register {
        idc: bids_protocols::Idc("no spaces allowed".into()),
        addrs: vec![],
        cert: None,
        policy: bids_protocols::Policy::Bids,
    };
    assert!(matches!(
        ask(&h, addr, bad_idc).await,
        GisResponse::Error {
            kind: ErrorKind::BadRequest,
            ..
        }
    ));
    // A manifest that does not hash to the announced id.
    ask(&h, addr, register("A", None)).await;
    let (bytes, _) = manifest("img", "1", 2);
    let (_, other) = manifest("img", "2", 2);
    assert!(matches!(
        ask(&h, addr, publish(other, &bytes, 2, true)).await,
        GisResponse::Error {
            kind: ErrorKind::ManifestMismatch,
            ..
        }
    ));
    match ask(
        &h,
        addr,
        GisRequest::Lookup {
            image: ImageQuery::Ref("img:2".parse().unwrap()),
            idc: None,
        },
    )
    .await
    {
        GisResponse::Error { kind, message } => {
            assert_eq!(kind, ErrorKind::UnknownImage);
            assert_eq!(
                message,
                "image img:2 is not known to the GIS; publish it first"
            );
        }
        other => panic!("{other:?}"),
    }
}

/// Writes raw bytes on the GIS protocol and reads whatever comes back, so tests can send
/// what no well-behaved client would.
#[derive(Clone, Default)]
struct RawCodec;

impl request_response::Codec for RawCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        _: &mut T,
    ) -> io::Result<Vec<u8>> {
        Err(io::Error::other("the raw client serves nothing"))
    }

    async fn read_response<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Vec<u8>> {
        let mut buf = Vec::new();
        io.take(MAX_RESPONSE_BYTES as u64 + 4)
            .read_to_end(&mut buf)
            .await?;
        if buf.is_empty() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(buf)
    }

    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Vec<u8>,
    ) -> io::Result<()> {
        io.write_all(&req).await?;
        io.flush().await
    }

    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        _: &mut T,
        _: Vec<u8>,
    ) -> io::Result<()> {
        Err(io::Error::other("the raw client serves nothing"))
    }
}

/// Sends each raw payload on its own stream; returns what came back (Err: no response).
async fn raw_exchange(
    gis_addr: &Multiaddr,
    gis_peer: PeerId,
    payloads: Vec<Vec<u8>>,
) -> Vec<Result<Vec<u8>, String>> {
    let mut swarm = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            libp2p::tcp::Config::default(),
            libp2p::noise::Config::new,
            libp2p::yamux::Config::default,
        )
        .unwrap()
        .with_behaviour(|_| {
            request_response::Behaviour::with_codec(
                RawCodec,
                [(gis::PROTOCOL, ProtocolSupport::Outbound)],
                request_response::Config::default().with_request_timeout(Duration::from_secs(5)),
            )
        })
        .unwrap()
        .build();
    swarm.dial(gis_addr.clone()).unwrap();
    let mut results: Vec<Option<Result<Vec<u8>, String>>> = vec![None; payloads.len()];
    let mut ids = Vec::new();
    let work = async {
        loop {
            if let SwarmEvent::ConnectionEstablished { peer_id, .. } =
                swarm.select_next_some().await
            {
                assert_eq!(peer_id, gis_peer);
                break;
            }
        }
        for p in payloads {
            ids.push(swarm.behaviour_mut().send_request(&gis_peer, p));
        }
        while results.iter().any(Option::is_none) {
            match swarm.select_next_some().await {
                SwarmEvent::Behaviour(request_response::Event::Message {
                    message:
                        request_response::Message::Response {
                            request_id,
                            response,
                        },
                    ..
                }) => {
                    if let Some(i) = ids.iter().position(|r| *r == request_id) {
                        results[i] = Some(Ok(response));
                    }
                }
                SwarmEvent::Behaviour(request_response::Event::OutboundFailure {
                    request_id,
                    error,
                    ..
                }) => {
                    if let Some(i) = ids.iter().position(|r| *r == request_id) {
                        results[i] = Some(Err(error.to_string()));
                    }
                }
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), work)
        .await
        .expect("raw exchange timed out");
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err("none".into())))
        .collect()
}

#[tokio::test]
async fn malformed_streams_are_closed_and_the_server_stays_up() {
    let dir = tempfile::tempdir().unwrap();
    let g = gis(dir.path(), PeerId::random()).await;
    let addr = g.listen_addrs()[0].clone();

    let huge_prefix = {
        let mut v = (u32::MAX).to_be_bytes().to_vec();
        v.extend([0u8; 16]);
        v
    };
    let over_limit = ((MAX_REQUEST_BYTES + 1) as u32).to_be_bytes().to_vec();
    let garbage_cbor = {
        let body = b"\xff\xfe\xfd not cbor at all";
        let mut v = (body.len() as u32).to_be_bytes().to_vec();
        v.extend(body);
        v
    };
    let truncated = {
        let mut v = 100u32.to_be_bytes().to_vec();
        v.extend([0xa1; 10]);
        v
    };
    // Valid CBOR, but not a GisRequest.
    let wrong_type = encode_frame(&vec!["hello", "gis"], 1024).unwrap();
    // A real request over the same raw path: proves the failures above are the server's
    // refusals, not a broken test client.
    let valid = encode_frame(
        &GisRequest::Lookup {
            image: ImageQuery::Ref("x:1".parse().unwrap()),
            idc: None,
        },
        MAX_REQUEST_BYTES,
    )
    .unwrap();

    let results = raw_exchange(
        &addr,
        g.peer_id(),
        vec![
            huge_prefix,
            over_limit,
            garbage_cbor,
            truncated,
            wrong_type,
            valid,
        ],
    )
    .await;
    for (i, r) in results[..5].iter().enumerate() {
        assert!(r.is_err(), "malformed payload {i} got a response: {r:?}");
    }
    let reply = results[5]
        .as_ref()
        .expect("the valid raw request was answered");
    let resp: GisResponse =
        bids_protocols::codec::decode_body(&reply[4..], MAX_RESPONSE_BYTES).unwrap();
    assert!(matches!(
        resp,
        GisResponse::Error {
            kind: ErrorKind::NotRegistered,
            ..
        }
    ));

    // The server is still up for ordinary clients.
    let h = Keypair::generate_ed25519();
    assert!(matches!(
        ask(&h, &addr, register("A", None)).await,
        GisResponse::Registered { .. }
    ));
    g.shutdown().await.unwrap();
}

#[tokio::test]
async fn shutdown_then_restart_on_the_same_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let admin = Keypair::generate_ed25519();
    let g = gis(dir.path(), peer_of(&admin)).await;
    let addr = g.listen_addrs()[0].clone();
    let h = Keypair::generate_ed25519();
    let (bytes, x) = manifest("img", "7", 3);
    ask(&h, &addr, register("A", None)).await;
    assert_ack(&ask(&h, &addr, publish(x, &bytes, 1, false)).await);

    // A second GIS on the same data dir is refused while the first runs.
    let second = bids_gis::server::spawn(bids_gis::GisConfig::new(
        Keypair::generate_ed25519(),
        "/ip4/127.0.0.1/tcp/0".parse().unwrap(),
        dir.path().to_path_buf(),
        peer_of(&admin),
    ))
    .await;
    let err = second.err().expect("two GIS on one data dir");
    assert!(format!("{err:#}").contains("another GIS"), "{err:#}");

    g.shutdown().await.unwrap();
    assert!(
        bids_gis::client::request_once(
            h.clone(),
            addr.clone(),
            register("A", None),
            Duration::from_secs(2)
        )
        .await
        .is_err(),
        "a stopped GIS answers nothing"
    );

    let g = gis(dir.path(), peer_of(&admin)).await;
    let addr = g.listen_addrs()[0].clone();
    let GisResponse::HostList(l) = ask(
        &h,
        &addr,
        GisRequest::Lookup {
            image: ImageQuery::Id(x),
            idc: None,
        },
    )
    .await
    else {
        panic!("the host and image should have survived the restart")
    };
    assert_eq!(l.image.name, "img");
}

/// Opens a GIS session as nodes do (the session behaviour of `bids_protocols`), with its
/// own identity; the swarm must stay alive while the stream is used.
async fn open_session(
    key: Keypair,
    gis_addr: &Multiaddr,
    gis_peer: PeerId,
) -> (
    libp2p::Swarm<bids_protocols::gis_session::Behaviour>,
    libp2p::Stream,
) {
    use bids_protocols::gis_session::{Behaviour, Event};
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(
            libp2p::tcp::Config::default(),
            libp2p::noise::Config::new,
            libp2p::yamux::Config::default,
        )
        .unwrap()
        .with_behaviour(|_| Behaviour::new(false))
        .unwrap()
        .build();
    swarm.dial(gis_addr.clone()).unwrap();
    let work = async {
        loop {
            match swarm.select_next_some().await {
                SwarmEvent::ConnectionEstablished { peer_id, .. } => {
                    assert_eq!(peer_id, gis_peer);
                    swarm.behaviour_mut().open(gis_peer);
                }
                SwarmEvent::Behaviour(Event::Opened { stream, .. }) => return stream,
                SwarmEvent::Behaviour(Event::OpenFailed { error, .. }) => panic!("{error}"),
                _ => {}
            }
        }
    };
    let stream = tokio::time::timeout(Duration::from_secs(10), work)
        .await
        .expect("no session within 10 s");
    (swarm, stream)
}

/// A session carries pipelined requests, each answered under its id; a session that sends
/// a bad frame is closed, and only it: the host's other session goes on.
#[tokio::test]
async fn sessions_carry_pipelined_requests_and_a_bad_one_closes_only_itself() {
    use bids_protocols::codec::{read_frame, write_frame};
    use bids_protocols::gis_session::{
        SessionRequest, SessionResponse, MAX_REQUEST_FRAME, MAX_RESPONSE_FRAME,
    };
    let dir = tempfile::tempdir().unwrap();
    let g = gis(dir.path(), PeerId::random()).await;
    let addr = g.listen_addrs()[0].clone();
    let key = Keypair::generate_ed25519();
    let (_swarm, good) = open_session(key.clone(), &addr, g.peer_id()).await;
    let (mut rd, mut wr) = good.split();
    let heartbeat = GisRequest::Heartbeat {
        stats: Default::default(),
    };
    // Three requests before any answer.
    for (id, req) in [
        (7, register("A", None)),
        (
            8,
            GisRequest::Lookup {
                image: ImageQuery::Ref("nothing:1".parse().unwrap()),
                idc: None,
            },
        ),
        (9, heartbeat.clone()),
    ] {
        write_frame(&mut wr, &SessionRequest(id, req), MAX_REQUEST_FRAME)
            .await
            .unwrap();
    }
    let mut answers = std::collections::BTreeMap::new();
    for _ in 0..3 {
        let SessionResponse(id, resp) = read_frame(&mut rd, MAX_RESPONSE_FRAME).await.unwrap();
        answers.insert(id, resp);
    }
    assert!(
        matches!(answers[&7], GisResponse::Registered { .. }),
        "{answers:?}"
    );
    assert!(
        matches!(
            answers[&8],
            GisResponse::Error {
                kind: ErrorKind::UnknownImage,
                ..
            }
        ),
        "{answers:?}"
    );
    assert!(
        matches!(answers[&9], GisResponse::Ack { .. }),
        "{answers:?}"
    );

    // A second session of the same host sends a frame above the limit: the GIS closes it.
    let (_swarm2, bad) = open_session(key, &addr, g.peer_id()).await;
    let (mut brd, mut bwr) = bad.split();
    bwr.write_all(&((MAX_REQUEST_FRAME + 1) as u32).to_be_bytes())
        .await
        .unwrap();
    bwr.flush().await.unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), brd.read_to_end(&mut rest)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "the bad session was not closed: {closed:?}"
    );
    // The first session still answers.
    write_frame(&mut wr, &SessionRequest(10, heartbeat), MAX_REQUEST_FRAME)
        .await
        .unwrap();
    let SessionResponse(id, resp) = read_frame(&mut rd, MAX_RESPONSE_FRAME).await.unwrap();
    assert_eq!(id, 10);
    assert!(matches!(resp, GisResponse::Ack { .. }), "{resp:?}");
    g.shutdown().await.unwrap();
}
