//! One virtual host's connection to the GIS: its own identity, its own TCP connection from
//! its own loopback source address, upgraded with noise and yamux exactly as a node's swarm
//! does, then either one GIS session carrying every request (`gis_session`, what nodes
//! use) or one yamux stream per GIS request (multistream-select, the CBOR codec; the
//! protocol nodes fall back to). No `Swarm`: tens of thousands of swarms would cost the
//! generator more than the GIS it measures. Inbound streams (the GIS's pings) are answered
//! as a node would.

use bids_protocols::codec::{read_frame, write_frame};
use bids_protocols::gis::{self, GisRequest, GisResponse};
use bids_protocols::gis_session::{self, SessionRequest, SessionResponse};
use futures::channel::mpsc;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{AsyncReadExt, AsyncWriteExt, FutureExt, StreamExt};
use libp2p::core::muxing::{StreamMuxerBox, StreamMuxerExt, SubstreamBox};
use libp2p::core::transport::{DialOpts, ListenerId, PortUse, TransportError, TransportEvent};
use libp2p::core::upgrade::Version;
use libp2p::core::{Endpoint, Transport};
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// The ping protocol of libp2p: the GIS pings every connection.
const PING_PROTOCOL: &str = "/ipfs/ping/1.0.0";
const PING_SIZE: usize = 32;

/// A dial-only TCP transport that binds each connection's source address first, so one
/// process can hold more connections to one GIS address than one source address has
/// ephemeral ports (libp2p-tcp binds a source address only when reusing a listener's port).
struct SourceBoundTcp {
    src: IpAddr,
}

fn tcp_addr(addr: &Multiaddr) -> Option<SocketAddr> {
    let mut ip = None;
    let mut port = None;
    for p in addr.iter() {
        match p {
            Protocol::Ip4(a) => ip = Some(IpAddr::from(a)),
            Protocol::Ip6(a) => ip = Some(IpAddr::from(a)),
            Protocol::Tcp(p) => port = Some(p),
            _ => {}
        }
    }
    Some(SocketAddr::new(ip?, port?))
}

/// The peer id at the end of a multiaddr, if any.
pub fn peer_of(addr: &Multiaddr) -> Option<PeerId> {
    addr.iter().find_map(|p| match p {
        Protocol::P2p(id) => Some(id),
        _ => None,
    })
}

impl Transport for SourceBoundTcp {
    type Output = libp2p::tcp::tokio::TcpStream;
    type Error = io::Error;
    type ListenerUpgrade = futures::future::Pending<Result<Self::Output, io::Error>>;
    type Dial = BoxFuture<'static, Result<Self::Output, io::Error>>;

    fn listen_on(
        &mut self,
        _id: ListenerId,
        addr: Multiaddr,
    ) -> Result<(), TransportError<io::Error>> {
        Err(TransportError::MultiaddrNotSupported(addr))
    }

    fn remove_listener(&mut self, _id: ListenerId) -> bool {
        false
    }

    fn dial(
        &mut self,
        addr: Multiaddr,
        _opts: DialOpts,
    ) -> Result<Self::Dial, TransportError<io::Error>> {
        let Some(dst) = tcp_addr(&addr) else {
            return Err(TransportError::MultiaddrNotSupported(addr));
        };
        let src = self.src;
        Ok(async move {
            let socket = if dst.is_ipv4() {
                tokio::net::TcpSocket::new_v4()?
            } else {
                tokio::net::TcpSocket::new_v6()?
            };
            socket.bind(SocketAddr::new(src, 0))?;
            let stream = socket.connect(dst).await?;
            stream.set_nodelay(true)?;
            Ok(libp2p::tcp::tokio::TcpStream(stream))
        }
        .boxed())
    }

    fn poll(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<TransportEvent<Self::ListenerUpgrade, Self::Error>> {
        Poll::Pending
    }
}

/// Why a connection or a request failed, as counted in the report.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("connect: {0}")]
    Connect(String),
    #[error("the peer at the GIS address is {found}, not {expected}")]
    WrongPeer { found: PeerId, expected: PeerId },
    #[error("connection closed: {0}")]
    Closed(String),
}

impl ConnError {
    /// A short stable label for the error table.
    pub fn kind(&self) -> String {
        match self {
            ConnError::Connect(_) => "connect".into(),
            ConnError::WrongPeer { .. } => "wrong_peer".into(),
            ConnError::Closed(_) => "connection_closed".into(),
        }
    }
}

/// Dials `gis` as `key` from source address `src`: tcp, then noise, then yamux. With
/// `session`, every request goes over one GIS session, opened with the first.
pub async fn connect<T: Send + 'static>(
    key: &Keypair,
    src: IpAddr,
    gis: &Multiaddr,
    timeout: Duration,
    session: bool,
) -> Result<Conn<T>, ConnError> {
    let noise = libp2p::noise::Config::new(key).map_err(|e| ConnError::Connect(e.to_string()))?;
    let mut transport = SourceBoundTcp { src }
        .upgrade(Version::V1Lazy)
        .authenticate(noise)
        .multiplex(libp2p::yamux::Config::default())
        .timeout(timeout);
    let dial = transport
        .dial(
            gis.clone(),
            DialOpts {
                role: Endpoint::Dialer,
                port_use: PortUse::New,
            },
        )
        .map_err(|e| ConnError::Connect(e.to_string()))?;
    let (peer, muxer) = dial.await.map_err(|e| ConnError::Connect(e.to_string()))?;
    if let Some(expected) = peer_of(gis) {
        if expected != peer {
            return Err(ConnError::WrongPeer {
                found: peer,
                expected,
            });
        }
    }
    Ok(Conn {
        muxer: StreamMuxerBox::new(muxer),
        queue: VecDeque::new(),
        inflight: FuturesUnordered::new(),
        inbound: FuturesUnordered::new(),
        session: session.then(Session::new),
    })
}

/// A GIS session: requests wait in `requests` until the stream is open, answers come back
/// by id.
struct Session<T> {
    requests: mpsc::UnboundedSender<SessionRequest>,
    /// Taken by the driver once the stream is open.
    requests_rx: Option<mpsc::UnboundedReceiver<SessionRequest>>,
    answers_tx: Option<mpsc::UnboundedSender<SessionResponse>>,
    answers: mpsc::UnboundedReceiver<SessionResponse>,
    driver: Option<BoxFuture<'static, io::Result<()>>>,
    /// Unanswered requests: tag, when due, when sent.
    pending: HashMap<u64, (T, Instant, Instant)>,
    next_id: u64,
}

impl<T> Session<T> {
    fn new() -> Self {
        let (requests, requests_rx) = mpsc::unbounded();
        let (answers_tx, answers) = mpsc::unbounded();
        Session {
            requests,
            requests_rx: Some(requests_rx),
            answers_tx: Some(answers_tx),
            answers,
            driver: None,
            pending: HashMap::new(),
            next_id: 0,
        }
    }
}

/// One request's outcome, with the instant it was due (latency counts from then, so a
/// generator that falls behind shows up in the figures instead of hiding).
pub struct Done<T> {
    pub tag: T,
    pub due: Instant,
    /// When the request was written (its stream opened, or put on the session).
    pub sent: Instant,
    pub result: Result<GisResponse, String>,
}

/// A live connection: requests queue until yamux grants a stream, run concurrently, and
/// complete in any order.
pub struct Conn<T> {
    muxer: StreamMuxerBox,
    queue: VecDeque<(T, Instant, GisRequest)>,
    inflight: FuturesUnordered<BoxFuture<'static, Done<T>>>,
    inbound: FuturesUnordered<BoxFuture<'static, ()>>,
    session: Option<Session<T>>,
}

impl<T: Send + 'static> Conn<T> {
    pub fn send(&mut self, tag: T, due: Instant, req: GisRequest) {
        match &mut self.session {
            Some(s) => {
                let id = s.next_id;
                s.next_id += 1;
                s.pending.insert(id, (tag, due, Instant::now()));
                // A closed channel means the session ended: `poll_done` reports it.
                let _ = s.requests.unbounded_send(SessionRequest(id, req));
            }
            None => self.queue.push_back((tag, due, req)),
        }
    }

    pub fn in_flight(&self) -> usize {
        self.queue.len()
            + self.inflight.len()
            + self.session.as_ref().map_or(0, |s| s.pending.len())
    }

    /// Session requests sent more than `timeout` ago, as failed (per-request streams time
    /// out by themselves). Called on a timer the caller already has, so no timer per
    /// request: a time-out is seen up to one of its periods late.
    pub fn expired(&mut self, timeout: Duration) -> Vec<Done<T>> {
        let Some(s) = &mut self.session else {
            return Vec::new();
        };
        let now = Instant::now();
        let late: Vec<u64> = s
            .pending
            .iter()
            .filter(|(_, (_, _, sent))| now.saturating_duration_since(*sent) > timeout)
            .map(|(id, _)| *id)
            .collect();
        late.into_iter()
            .filter_map(|id| s.pending.remove(&id))
            .map(|(tag, due, sent)| Done {
                tag,
                due,
                sent,
                result: Err("timeout".to_string()),
            })
            .collect()
    }

    /// Drives the connection; ready with the next completed request, or an error once the
    /// connection is gone.
    pub fn poll_done(
        &mut self,
        cx: &mut Context<'_>,
        timeout: Duration,
    ) -> Poll<Result<Done<T>, ConnError>> {
        loop {
            // Drives yamux and hands over streams the GIS opened.
            match self.muxer.poll_inbound_unpin(cx) {
                Poll::Ready(Ok(s)) => {
                    self.inbound.push(answer_inbound(s).boxed());
                    continue;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(ConnError::Closed(e.to_string()))),
                Poll::Pending => {}
            }
            break;
        }
        if let Some(s) = &mut self.session {
            if s.driver.is_none() {
                match self.muxer.poll_outbound_unpin(cx) {
                    Poll::Ready(Ok(stream)) => {
                        if let (Some(rx), Some(tx)) = (s.requests_rx.take(), s.answers_tx.take()) {
                            s.driver = Some(
                                async move {
                                    let (_, io) = multistream_select::dialer_select_proto(
                                        stream,
                                        [gis_session::PROTOCOL.as_ref()],
                                        Version::V1Lazy,
                                    )
                                    .await
                                    .map_err(io::Error::other)?;
                                    gis_session::run_client(io, rx, tx).await
                                }
                                .boxed(),
                            );
                        }
                    }
                    Poll::Ready(Err(e)) => {
                        return Poll::Ready(Err(ConnError::Closed(e.to_string())))
                    }
                    Poll::Pending => {}
                }
            }
            if let Some(driver) = &mut s.driver {
                if let Poll::Ready(r) = driver.poll_unpin(cx) {
                    let why = match r {
                        Ok(()) => "session ended".to_string(),
                        Err(e) => format!("session: {}", io_kind(&e)),
                    };
                    return Poll::Ready(Err(ConnError::Closed(why)));
                }
            }
            while let Poll::Ready(Some(SessionResponse(id, response))) =
                s.answers.poll_next_unpin(cx)
            {
                if let Some((tag, due, sent)) = s.pending.remove(&id) {
                    return Poll::Ready(Ok(Done {
                        tag,
                        due,
                        sent,
                        result: Ok(response),
                    }));
                }
            }
        }
        while !self.queue.is_empty() {
            match self.muxer.poll_outbound_unpin(cx) {
                Poll::Ready(Ok(s)) => {
                    let Some((tag, due, req)) = self.queue.pop_front() else {
                        break;
                    };
                    let sent = Instant::now();
                    self.inflight.push(
                        async move {
                            let result =
                                match tokio::time::timeout(timeout, exchange(s, &req)).await {
                                    Ok(Ok(r)) => Ok(r),
                                    Ok(Err(e)) => Err(format!("stream: {}", io_kind(&e))),
                                    Err(_) => Err("timeout".to_string()),
                                };
                            Done {
                                tag,
                                due,
                                sent,
                                result,
                            }
                        }
                        .boxed(),
                    );
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(ConnError::Closed(e.to_string()))),
                Poll::Pending => break,
            }
        }
        while let Poll::Ready(Some(())) = self.inbound.poll_next_unpin(cx) {}
        match self.inflight.poll_next_unpin(cx) {
            Poll::Ready(Some(d)) => Poll::Ready(Ok(d)),
            _ => Poll::Pending,
        }
    }

    /// Waits for the next completed request (driving the connection meanwhile).
    pub async fn next_done(&mut self, timeout: Duration) -> Result<Done<T>, ConnError> {
        std::future::poll_fn(|cx| self.poll_done(cx, timeout)).await
    }

    /// Closes the connection politely.
    pub async fn close(mut self) {
        let _ = std::future::poll_fn(|cx| self.muxer.poll_close_unpin(cx)).await;
    }
}

fn io_kind(e: &io::Error) -> String {
    format!("{:?}", e.kind()).to_lowercase()
}

/// One GIS request on its own stream, as libp2p's request-response does it: negotiate the
/// protocol (0-RTT), write the request, close the write side, read the response.
async fn exchange(stream: SubstreamBox, req: &GisRequest) -> io::Result<GisResponse> {
    let (_, mut io) =
        multistream_select::dialer_select_proto(stream, [gis::PROTOCOL.as_ref()], Version::V1Lazy)
            .await
            .map_err(io::Error::other)?;
    write_frame(&mut io, req, gis::MAX_REQUEST_BYTES).await?;
    io.close().await?;
    read_frame(&mut io, gis::MAX_RESPONSE_BYTES).await
}

/// Answers the GIS's pings (echo 32 bytes until it stops); refuses any other protocol.
async fn answer_inbound(stream: SubstreamBox) {
    let Ok((_, mut io)) = multistream_select::listener_select_proto(stream, [PING_PROTOCOL]).await
    else {
        return;
    };
    let mut buf = [0u8; PING_SIZE];
    while io.read_exact(&mut buf).await.is_ok() {
        if io.write_all(&buf).await.is_err() || io.flush().await.is_err() {
            return;
        }
    }
}
