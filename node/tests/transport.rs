//! The node transport end to end: two swarms speaking the chunk protocol over
//! tcp + noise + yamux on loopback, one dialing from a bound source IP.

use bids_node::transport::{build, BoxedStream, LinkShaper, TransportOptions};
use bids_protocols::chunk::{self, ChunkRequest, ChunkResponse, Encoding};
use bids_protocols::ImageId;
use futures::StreamExt;
use libp2p::core::ConnectedPoint;
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, Swarm};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

const CHUNK: usize = 1024 * 1024;

/// Remembers the socket addresses of every stream it is asked to wrap.
#[derive(Default)]
struct Recorder(Mutex<Vec<(SocketAddr, SocketAddr)>>);

impl LinkShaper for Recorder {
    fn wrap(&self, local: SocketAddr, remote: SocketAddr, stream: BoxedStream) -> BoxedStream {
        self.0.lock().unwrap().push((local, remote));
        stream
    }
}

type Behaviour = request_response::Behaviour<chunk::Codec>;

fn swarm(opts: TransportOptions) -> Swarm<Behaviour> {
    libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_other_transport(|k| build(k, opts).map_err(Into::into))
        .unwrap()
        .with_behaviour(|_| {
            Behaviour::with_codec(
                chunk::codec(),
                [(chunk::PROTOCOL, ProtocolSupport::Full)],
                request_response::Config::default()
                    .with_request_timeout(Duration::from_secs(60))
                    .with_max_concurrent_streams(256),
            )
        })
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build()
}

/// The chunk a node tagged `tag` serves at `index`: distinct per node and per index.
fn payload(tag: u8, index: u32) -> Vec<u8> {
    (0..CHUNK as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(index) >> 11) as u8 ^ tag)
        .collect()
}

/// What a node saw: the peer's address on the connection, and how its requests went.
#[derive(Debug)]
struct Report {
    remote: Multiaddr,
    verified: u32,
    elapsed: Duration,
}

/// Runs a node: serves chunks tagged `tag`; once connected, asks the peer for `requests`
/// chunks (all at once) and checks them against `peer_tag`; reports, then keeps serving.
async fn drive(
    mut swarm: Swarm<Behaviour>,
    tag: u8,
    peer_tag: u8,
    dial: Option<Multiaddr>,
    requests: u32,
    listening: Option<oneshot::Sender<Multiaddr>>,
    done: oneshot::Sender<Result<Report, String>>,
) {
    let mut listening = listening;
    let mut done = Some(done);
    if let Some(addr) = dial {
        swarm.dial(addr).unwrap();
    }
    let mut pending: HashMap<OutboundRequestId, u32> = HashMap::new();
    let mut remote = None;
    let mut verified = 0;
    let mut started = Instant::now();
    let image = ImageId([7; 32]);
    loop {
        let event = swarm.select_next_some().await;
        let failure = match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                if let Some(tx) = listening.take() {
                    let _ = tx.send(address);
                }
                None
            }
            SwarmEvent::ConnectionEstablished {
                peer_id, endpoint, ..
            } => {
                remote = Some(match endpoint {
                    ConnectedPoint::Dialer { address, .. } => address,
                    ConnectedPoint::Listener { send_back_addr, .. } => send_back_addr,
                });
                started = Instant::now();
                for index in 0..requests {
                    let id = swarm
                        .behaviour_mut()
                        .send_request(&peer_id, ChunkRequest { image, index });
                    pending.insert(id, index);
                }
                None
            }
            SwarmEvent::Behaviour(request_response::Event::Message { message, .. }) => {
                match message {
                    request_response::Message::Request {
                        request, channel, ..
                    } => {
                        let data = ChunkResponse::Data {
                            encoding: Encoding::Raw,
                            payload: payload(tag, request.index).into(),
                        };
                        // The requester may be gone at the end of the test; nothing to do then.
                        let _ = swarm.behaviour_mut().send_response(channel, data);
                        None
                    }
                    request_response::Message::Response {
                        request_id,
                        response,
                    } => match (pending.remove(&request_id), response) {
                        (Some(index), ChunkResponse::Data { payload: p, .. })
                            if p == payload(peer_tag, index) =>
                        {
                            verified += 1;
                            None
                        }
                        (index, other) => Some(format!(
                            "bad response to request {index:?}: {:?}",
                            match other {
                                ChunkResponse::Data { payload, .. } => payload.len().to_string(),
                                o => format!("{o:?}"),
                            }
                        )),
                    },
                }
            }
            SwarmEvent::Behaviour(request_response::Event::OutboundFailure { error, .. }) => {
                Some(format!("outbound failure: {error}"))
            }
            _ => None,
        };
        if let Some(reason) = failure {
            if let Some(tx) = done.take() {
                let _ = tx.send(Err(reason));
            }
        } else if verified == requests && remote.is_some() {
            if let Some(tx) = done.take() {
                let _ = tx.send(Ok(Report {
                    remote: remote.clone().unwrap(),
                    verified,
                    elapsed: started.elapsed(),
                }));
            }
        }
    }
}

fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    addr.iter().find_map(|p| match p {
        libp2p::multiaddr::Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        libp2p::multiaddr::Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    })
}

/// Starts a listener on 127.0.0.1 and a dialer with `dialer_opts`; both request
/// `requests` chunks from each other. Returns (listener report, dialer report).
async fn exchange(
    listener_opts: TransportOptions,
    dialer_opts: TransportOptions,
    requests: u32,
) -> (Report, Report) {
    let mut a = swarm(listener_opts);
    a.listen_on("/ip4/127.0.0.1/tcp/0".parse().unwrap())
        .unwrap();
    let (addr_tx, addr_rx) = oneshot::channel();
    let (a_done, a_report) = oneshot::channel();
    let (b_done, b_report) = oneshot::channel();
    let a_task = tokio::spawn(drive(a, 1, 2, None, requests, Some(addr_tx), a_done));
    let addr = tokio::time::timeout(Duration::from_secs(10), addr_rx)
        .await
        .expect("listener reports its address in time")
        .unwrap();
    let b = swarm(dialer_opts);
    let b_task = tokio::spawn(drive(b, 2, 1, Some(addr), requests, None, b_done));
    let wait = Duration::from_secs(60);
    let a_report = tokio::time::timeout(wait, a_report)
        .await
        .expect("listener done in time");
    let b_report = tokio::time::timeout(wait, b_report)
        .await
        .expect("dialer done in time");
    a_task.abort();
    b_task.abort();
    (a_report.unwrap().unwrap(), b_report.unwrap().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bound_dialer_is_seen_by_its_source_ip_and_data_flows_both_ways() {
    let a_rec = Arc::new(Recorder::default());
    let b_rec = Arc::new(Recorder::default());
    let a_opts = TransportOptions {
        shaper: Some(a_rec.clone()),
        ..TransportOptions::default()
    };
    let b_opts = TransportOptions {
        bind_ip: Some("127.0.0.2".parse().unwrap()),
        shaper: Some(b_rec.clone()),
        ..TransportOptions::default()
    };
    let (a, b) = exchange(a_opts, b_opts, 4).await;
    assert_eq!((a.verified, b.verified), (4, 4));
    // libp2p on the listener sees the dialer's bound source IP…
    assert_eq!(ip_of(&a.remote), Some("127.0.0.2".parse().unwrap()));
    assert_eq!(ip_of(&b.remote), Some("127.0.0.1".parse().unwrap()));
    // …and so does the shaper, on both ends, with matching socket addresses.
    let a_seen = a_rec.0.lock().unwrap().clone();
    let b_seen = b_rec.0.lock().unwrap().clone();
    assert_eq!(a_seen.len(), 1, "one connection, wrapped once on each end");
    assert_eq!(b_seen.len(), 1);
    let (a_local, a_remote) = a_seen[0];
    let (b_local, b_remote) = b_seen[0];
    assert_eq!(a_remote.ip(), "127.0.0.2".parse::<IpAddr>().unwrap());
    assert_eq!((a_local, a_remote), (b_remote, b_local));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_chunk_responses_flow_without_a_bind_ip() {
    let requests = 64;
    let (a, b) = exchange(
        TransportOptions::default(),
        TransportOptions::default(),
        requests,
    )
    .await;
    assert_eq!((a.verified, b.verified), (requests, requests));
    assert_eq!(ip_of(&a.remote), Some("127.0.0.1".parse().unwrap()));
    // Both directions at once on one connection: 2 × 64 MiB.
    let secs = a.elapsed.max(b.elapsed).as_secs_f64();
    println!(
        "{} MiB each way in {secs:.2} s: {:.0} MiB/s total",
        requests,
        2.0 * f64::from(requests) / secs
    );
}
