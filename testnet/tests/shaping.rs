//! The link emulator measured from outside: raw TCP loopback connections wrapped by the
//! topology's shaper (rates, sharing, delay, counters), then two libp2p swarms in two
//! emulated IDCs exchanging chunk requests over the node transport.

use bids_node::transport::{build, BoxedStream, LinkShaper, TransportOptions};
use bids_protocols::chunk::{self, ChunkRequest, ChunkResponse, Encoding};
use bids_protocols::ImageId;
use bids_testnet::shaping::Topology;
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, Swarm};
use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One Mbit/s in bytes per second.
const MBIT: u64 = 125_000;
const MIB: usize = 1024 * 1024;
/// No test may hang: every wait is bounded by this.
const DEADLINE: Duration = Duration::from_secs(30);

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A TCP connection from `from` to `to` on loopback, both ends wrapped by `shaper`.
/// Returns (dialer end, listener end).
async fn pair(shaper: &Arc<dyn LinkShaper>, from: &str, to: &str) -> (BoxedStream, BoxedStream) {
    let listener = tokio::net::TcpListener::bind((ip(to), 0)).await.unwrap();
    let target = listener.local_addr().unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(ip(from), 0)).unwrap();
    let (dialed, accepted) = tokio::join!(socket.connect(target), listener.accept());
    let wrap = |s: tokio::net::TcpStream| {
        s.set_nodelay(true).unwrap();
        let (local, remote) = (s.local_addr().unwrap(), s.peer_addr().unwrap());
        shaper.wrap(local, remote, Box::new(libp2p::tcp::tokio::TcpStream(s)))
    };
    (wrap(dialed.unwrap()), wrap(accepted.unwrap().0))
}

/// Writes `n` bytes into `tx` and closes it, reading them on `rx` until end of stream.
/// Returns the time from the first write to the last byte read.
async fn transfer(mut tx: BoxedStream, mut rx: BoxedStream, n: usize) -> Duration {
    let start = Instant::now();
    let send = async {
        let buf = vec![0xa5u8; 64 * 1024];
        let mut left = n;
        while left > 0 {
            let k = left.min(buf.len());
            tx.write_all(&buf[..k]).await.unwrap();
            left -= k;
        }
        tx.close().await.unwrap();
    };
    let receive = async {
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = 0;
        loop {
            let k = rx.read(&mut buf).await.unwrap();
            if k == 0 {
                break;
            }
            got += k;
        }
        (got, start.elapsed())
    };
    let ((), (got, elapsed)) =
        tokio::time::timeout(DEADLINE, async { tokio::join!(send, receive) })
            .await
            .expect("transfer finishes in time");
    assert_eq!(got, n, "every byte arrives, none twice");
    elapsed
}

fn mbit_per_s(bytes: usize, d: Duration) -> f64 {
    bytes as f64 * 8.0 / d.as_secs_f64() / 1e6
}

fn assert_within(what: &str, got: f64, want: f64, tolerance: f64) {
    println!("{what}: {got:.2} (want {want:.2})");
    assert!(
        (got - want).abs() <= want * tolerance,
        "{what}: got {got:.2}, want {want:.2} ± {:.0}%",
        tolerance * 100.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wan_transfer_runs_at_the_emulated_rate() {
    let mut t = Topology::new();
    t.add_idc("a", 20 * MBIT, Duration::ZERO).unwrap();
    t.add_idc("b", 1000 * MBIT, Duration::ZERO).unwrap();
    t.add_host(ip("127.0.1.1"), "a", 1000 * MBIT).unwrap();
    t.add_host(ip("127.0.2.1"), "b", 1000 * MBIT).unwrap();
    let t = Arc::new(t);
    let (tx, rx) = pair(&t.shaper(), "127.0.1.1", "127.0.2.1").await;
    let elapsed = transfer(tx, rx, 4 * MIB).await;
    assert_within("WAN Mbit/s", mbit_per_s(4 * MIB, elapsed), 20.0, 0.10);
    assert_eq!(t.wan_out_bytes("a"), 4 * MIB as u64);
    assert_eq!(t.wan_in_bytes("b"), 4 * MIB as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_into_one_idc_share_its_wan_rate() {
    let mut t = Topology::new();
    t.add_idc("a", 1000 * MBIT, Duration::ZERO).unwrap();
    t.add_idc("b", 20 * MBIT, Duration::ZERO).unwrap();
    for (host, idc) in [
        ("127.0.1.1", "a"),
        ("127.0.1.2", "a"),
        ("127.0.2.1", "b"),
        ("127.0.2.2", "b"),
    ] {
        t.add_host(ip(host), idc, 1000 * MBIT).unwrap();
    }
    let t = Arc::new(t);
    let shaper = t.shaper();
    let (tx1, rx1) = pair(&shaper, "127.0.1.1", "127.0.2.1").await;
    let (tx2, rx2) = pair(&shaper, "127.0.1.2", "127.0.2.2").await;
    let (d1, d2) = tokio::join!(transfer(tx1, rx1, 2 * MIB), transfer(tx2, rx2, 2 * MIB));
    let total = d1.max(d2);
    assert_within(
        "sum of both streams, Mbit/s",
        mbit_per_s(4 * MIB, total),
        20.0,
        0.10,
    );
    // Fair sharing: neither stream finished early by taking the whole link.
    assert!(
        d1.min(d2) >= total.mul_f64(0.8),
        "streams took {d1:?} and {d2:?}: one got more than its share"
    );
    assert_eq!(t.wan_in_bytes("b"), 4 * MIB as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wan_delay_shows_in_round_trips_but_not_in_bulk_throughput() {
    let mut t = Topology::new();
    // 20 + 30 ms: 50 ms one way.
    t.add_idc("a", 20 * MBIT, Duration::from_millis(20))
        .unwrap();
    t.add_idc("b", 20 * MBIT, Duration::from_millis(30))
        .unwrap();
    t.add_host(ip("127.0.1.1"), "a", 1000 * MBIT).unwrap();
    t.add_host(ip("127.0.2.1"), "b", 1000 * MBIT).unwrap();
    let t = Arc::new(t);
    let shaper = t.shaper();

    let (mut client, mut server) = pair(&shaper, "127.0.1.1", "127.0.2.1").await;
    let echo = tokio::spawn(async move {
        let mut msg = [0u8; 100];
        while server.read_exact(&mut msg).await.is_ok() {
            server.write_all(&msg).await.unwrap();
            server.flush().await.unwrap();
        }
    });
    let mut rtts = Vec::new();
    for round in 0..5u8 {
        let start = Instant::now();
        client.write_all(&[round; 100]).await.unwrap();
        client.flush().await.unwrap();
        let mut back = [0u8; 100];
        tokio::time::timeout(DEADLINE, client.read_exact(&mut back))
            .await
            .expect("echo in time")
            .unwrap();
        assert_eq!(back, [round; 100]);
        rtts.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    rtts.sort_by(f64::total_cmp);
    println!("round trips: {rtts:.1?} ms");
    // The median is what the link does; the minimum shows no byte ever beat the delay.
    // (A single late wake-up on a loaded machine may stretch one round trip.)
    assert!((rtts[2] - 100.0).abs() <= 15.0, "round trips {rtts:.1?} ms");
    assert!(
        rtts[0] >= 99.0,
        "a round trip beat the 2 × 50 ms delay: {rtts:.1?} ms"
    );
    drop(client);
    tokio::time::timeout(DEADLINE, echo).await.unwrap().unwrap();

    let (tx, rx) = pair(&shaper, "127.0.1.1", "127.0.2.1").await;
    let elapsed = transfer(tx, rx, 4 * MIB).await;
    let rate = mbit_per_s(4 * MIB, elapsed);
    println!("bulk over a 50 ms link: {rate:.2} Mbit/s");
    // 1.68 s at the rate plus one 50 ms delay: ≥ 90 % of the rate, never above it.
    assert!(
        (18.0..=20.5).contains(&rate),
        "bulk over the delayed link: {rate:.2} Mbit/s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_idc_traffic_is_limited_by_the_lan_and_not_counted_as_wan() {
    let mut t = Topology::new();
    // A WAN slower than the LAN and with delay: it must not apply inside the IDC.
    t.add_idc("a", MBIT, Duration::from_millis(40)).unwrap();
    t.add_host(ip("127.0.1.1"), "a", 50 * MBIT).unwrap();
    t.add_host(ip("127.0.1.2"), "a", 1000 * MBIT).unwrap();
    let t = Arc::new(t);
    // The sender's 50 Mbit/s uplink is the bottleneck one way, the receiver's downlink
    // the other way.
    let (tx, rx) = pair(&t.shaper(), "127.0.1.1", "127.0.1.2").await;
    let elapsed = transfer(tx, rx, 4 * MIB).await;
    assert_within(
        "LAN uplink Mbit/s",
        mbit_per_s(4 * MIB, elapsed),
        50.0,
        0.10,
    );
    let (tx, rx) = pair(&t.shaper(), "127.0.1.2", "127.0.1.1").await;
    let elapsed = transfer(tx, rx, 4 * MIB).await;
    assert_within(
        "LAN downlink Mbit/s",
        mbit_per_s(4 * MIB, elapsed),
        50.0,
        0.10,
    );
    assert_eq!(t.wan_in_bytes("a"), 0);
    assert_eq!(t.wan_out_bytes("a"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gigabit_lan_is_reached() {
    let mut t = Topology::new();
    t.add_idc("a", 10 * MBIT, Duration::from_millis(10))
        .unwrap();
    t.add_host(ip("127.0.1.1"), "a", 1000 * MBIT).unwrap();
    t.add_host(ip("127.0.1.2"), "a", 1000 * MBIT).unwrap();
    let t = Arc::new(t);
    let (tx, rx) = pair(&t.shaper(), "127.0.1.1", "127.0.1.2").await;
    let bytes = 64 * MIB;
    let rate = mbit_per_s(bytes, transfer(tx, rx, bytes).await);
    println!("1 Gbit/s LAN: {rate:.0} Mbit/s");
    // Close to the link, pacing costs no throughput; above it only by the initial burst.
    assert!(
        (850.0..=1030.0).contains(&rate),
        "1 Gbit/s LAN ran at {rate:.0} Mbit/s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wan_counters_count_exactly_the_bytes_that_crossed() {
    let mut t = Topology::new();
    t.add_idc("a", 200 * MBIT, Duration::from_millis(5))
        .unwrap();
    t.add_idc("b", 200 * MBIT, Duration::ZERO).unwrap();
    t.add_host(ip("127.0.1.1"), "a", 0).unwrap();
    t.add_host(ip("127.0.1.2"), "a", 0).unwrap();
    t.add_host(ip("127.0.2.1"), "b", 0).unwrap();
    let t = Arc::new(t);
    let shaper = t.shaper();
    let runs = [
        ("127.0.1.1", "127.0.2.1", 1_000_001), // a → b
        ("127.0.2.1", "127.0.1.2", 300_007),   // b → a
        ("127.0.1.1", "127.0.1.2", 500_000),   // inside a
        ("127.0.0.1", "127.0.1.1", 200_000),   // the GIS, outside the topology → a
        ("127.0.2.1", "127.0.0.1", 100_000),   // b → the GIS
    ];
    for (from, to, n) in runs {
        let (tx, rx) = pair(&shaper, from, to).await;
        transfer(tx, rx, n).await;
    }
    assert_eq!(t.wan_out_bytes("a"), 1_000_001);
    assert_eq!(t.wan_in_bytes("b"), 1_000_001);
    assert_eq!(t.wan_out_bytes("b"), 300_007);
    assert_eq!(t.wan_in_bytes("a"), 300_007);
    assert_eq!(t.wan_in_bytes("nowhere"), 0);
    t.reset_counters();
    assert_eq!(
        [
            t.wan_in_bytes("a"),
            t.wan_out_bytes("a"),
            t.wan_in_bytes("b"),
            t.wan_out_bytes("b")
        ],
        [0; 4]
    );
}

type Behaviour = request_response::Behaviour<chunk::Codec>;

fn swarm(host: &str, shaper: Arc<dyn LinkShaper>) -> Swarm<Behaviour> {
    let opts = TransportOptions {
        bind_ip: Some(ip(host)),
        shaper: Some(shaper),
        ..TransportOptions::default()
    };
    let mut swarm = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_other_transport(|k| build(k, opts).map_err(Into::into))
        .unwrap()
        .with_behaviour(|_| {
            Behaviour::with_codec(
                chunk::codec(),
                [(chunk::PROTOCOL, ProtocolSupport::Full)],
                request_response::Config::default().with_request_timeout(DEADLINE),
            )
        })
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(DEADLINE))
        .build();
    swarm
        .listen_on(format!("/ip4/{host}/tcp/0").parse().unwrap())
        .unwrap();
    swarm
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libp2p_chunk_exchange_across_idcs_runs_at_the_wan_rate() {
    let mut t = Topology::new();
    // 40 Mbit/s WAN with a 100 ms round trip.
    t.add_idc("a", 40 * MBIT, Duration::from_millis(25))
        .unwrap();
    t.add_idc("b", 40 * MBIT, Duration::from_millis(25))
        .unwrap();
    t.add_host(ip("127.0.1.1"), "a", 1000 * MBIT).unwrap();
    t.add_host(ip("127.0.2.1"), "b", 1000 * MBIT).unwrap();
    let t = Arc::new(t);

    let mut server = swarm("127.0.1.1", t.shaper());
    let addr: Multiaddr = loop {
        if let SwarmEvent::NewListenAddr { address, .. } = server.select_next_some().await {
            break address;
        }
    };
    let chunk: Vec<u8> = (0..MIB as u32).map(|i| (i * 7 + i / 4099) as u8).collect();
    let served = chunk.clone();
    let serve = tokio::spawn(async move {
        let mut seen_from = None;
        loop {
            match server.select_next_some().await {
                SwarmEvent::ConnectionEstablished { endpoint, .. } => {
                    seen_from = Some(endpoint.get_remote_address().clone());
                }
                SwarmEvent::Behaviour(request_response::Event::Message {
                    message: request_response::Message::Request { channel, .. },
                    ..
                }) => {
                    let data = ChunkResponse::Data {
                        encoding: Encoding::Raw,
                        payload: served.clone().into(),
                    };
                    let _ = server.behaviour_mut().send_response(channel, data);
                }
                SwarmEvent::Behaviour(request_response::Event::InboundFailure {
                    error, ..
                }) => {
                    panic!("server: inbound failure {error}; seen {seen_from:?}")
                }
                _ => {}
            }
        }
    });

    let mut client = swarm("127.0.2.1", t.shaper());
    client.dial(addr).unwrap();
    let server_peer = loop {
        match tokio::time::timeout(DEADLINE, client.select_next_some()).await {
            Ok(SwarmEvent::ConnectionEstablished { peer_id, .. }) => break peer_id,
            Ok(SwarmEvent::OutgoingConnectionError { error, .. }) => panic!("dial: {error}"),
            Ok(_) => {}
            Err(_) => panic!("no connection in time"),
        }
    };
    // Warm up: one chunk lets yamux measure the RTT and grow its windows, as a long-lived
    // connection between bridgeheads would have.
    t.reset_counters();
    let image = ImageId([1; 32]);
    let fetch = |client: &mut Swarm<Behaviour>, n: u32| {
        (0..n)
            .map(|index| {
                client
                    .behaviour_mut()
                    .send_request(&server_peer, ChunkRequest { image, index })
            })
            .collect::<HashSet<_>>()
    };
    let run = |mut client: Swarm<Behaviour>, mut pending: HashSet<_>| {
        let chunk = chunk.clone();
        async move {
            while !pending.is_empty() {
                let event = tokio::time::timeout(DEADLINE, client.select_next_some())
                    .await
                    .expect("responses in time");
                match event {
                    SwarmEvent::Behaviour(request_response::Event::Message {
                        message:
                            request_response::Message::Response {
                                request_id,
                                response,
                            },
                        ..
                    }) => {
                        assert!(pending.remove(&request_id));
                        match response {
                            ChunkResponse::Data { payload, .. } => assert!(payload == chunk),
                            other => panic!("unexpected response {other:?}"),
                        }
                    }
                    SwarmEvent::Behaviour(request_response::Event::OutboundFailure {
                        error,
                        ..
                    }) => panic!("request failed: {error}"),
                    _ => {}
                }
            }
            client
        }
    };
    let warm = fetch(&mut client, 1);
    let mut client = run(client, warm).await;

    let chunks = 12u32;
    let start = Instant::now();
    let pending = fetch(&mut client, chunks);
    let _client = run(client, pending).await;
    let elapsed = start.elapsed();
    serve.abort();

    let payload = chunks as usize * MIB;
    // The first response byte arrives one round trip after the requests leave.
    let rate = mbit_per_s(payload, elapsed - Duration::from_millis(100));
    let crossed = t.wan_in_bytes("b");
    let sent = u64::from(chunks + 1) * MIB as u64;
    println!(
        "{chunks} MiB across the emulated WAN in {elapsed:?}: {rate:.1} Mbit/s after the \
         first round trip; {:.4} × the payload crossed",
        crossed as f64 / sent as f64
    );
    // Framing (noise, yamux, CBOR) takes a little of the link, the rest is payload.
    assert!(
        (36.0..=40.5).contains(&rate),
        "chunk exchange at {rate:.1} Mbit/s"
    );
    assert!(
        crossed >= sent && crossed <= sent * 101 / 100,
        "{crossed} bytes entered IDC b for {} chunks of 1 MiB",
        chunks + 1
    );
    assert!(t.wan_out_bytes("b") < 64 * 1024, "requests are small");
}
