//! The GIS session: one long-lived stream per host carrying every GIS request of that host,
//! instead of one stream per request (`gis::PROTOCOL`).
//!
//! Each request-response exchange on its own yamux stream costs both ends a stream opening,
//! the protocol proposal, the request, a half-close, the response and a final close, each
//! sent through noise as its own TCP write, plus a timer per stream. At 20,000 hosts
//! heartbeating every few seconds that was most of the GIS's CPU, not the index (measured
//! with `bids bench gis`, see `gis/RESULTS.md`). On a session a request and its answer are
//! one frame each way.
//!
//! Frames are the codec's (a 4-byte big-endian length, then CBOR). The host sends
//! [`SessionRequest`]s; the GIS answers each with a [`SessionResponse`] carrying the same
//! id, in any order. The GIS reads at most [`MAX_IN_FLIGHT`] requests of one session ahead
//! of its answers; a host sending more just waits (TCP and yamux flow control).
//! A GIS that does not speak this protocol refuses the stream, and the host goes on with
//! `gis::PROTOCOL`.

use crate::codec::{read_frame, write_frame};
use crate::gis::{GisRequest, GisResponse, MAX_REQUEST_BYTES, MAX_RESPONSE_BYTES};
use futures::channel::mpsc;
use futures::future::{select, Either};
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, StreamExt};
use libp2p::core::transport::PortUse;
use libp2p::core::{Endpoint, InboundUpgrade, OutboundUpgrade, UpgradeInfo};
use libp2p::swarm::handler::{
    ConnectionEvent, DialUpgradeError, FullyNegotiatedInbound, FullyNegotiatedOutbound,
};
use libp2p::swarm::{
    ConnectionDenied, ConnectionHandler, ConnectionHandlerEvent, ConnectionId, FromSwarm,
    NetworkBehaviour, NotifyHandler, Stream, StreamUpgradeError, SubstreamProtocol, THandler,
    THandlerOutEvent, ToSwarm,
};
use libp2p::{Multiaddr, PeerId, StreamProtocol};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::future::{ready, Ready};
use std::io;
use std::task::{Context, Poll};

pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/bids/gis-session/1");
/// Room for the id and the array header around a request or a response.
const ENVELOPE: usize = 16;
/// Largest request frame body on a session.
pub const MAX_REQUEST_FRAME: usize = MAX_REQUEST_BYTES + ENVELOPE;
/// Largest response frame body on a session.
pub const MAX_RESPONSE_FRAME: usize = MAX_RESPONSE_BYTES + ENVELOPE;
/// Requests of one session the GIS works on at once.
pub const MAX_IN_FLIGHT: usize = 64;

/// A request and the id its answer will carry (chosen by the host, unique per session).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRequest(pub u64, pub GisRequest);

/// The answer to the request with this id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionResponse(pub u64, pub GisResponse);

/// A host's side of a session on `stream`: writes what arrives on `requests`, hands every
/// answer to `answers`. Ends with `Ok` once `requests` is closed (the write side is then
/// closed), with the error once the stream fails or the GIS closes it. Requests still
/// unanswered then are the caller's to fail (it knows their ids).
pub async fn run_client<S: AsyncRead + AsyncWrite>(
    stream: S,
    mut requests: mpsc::UnboundedReceiver<SessionRequest>,
    answers: mpsc::UnboundedSender<SessionResponse>,
) -> io::Result<()> {
    let (mut rd, mut wr) = stream.split();
    let writer = async move {
        while let Some(r) = requests.next().await {
            write_frame(&mut wr, &r, MAX_REQUEST_FRAME).await?;
        }
        wr.close().await
    };
    let reader = async move {
        loop {
            let a: SessionResponse = read_frame(&mut rd, MAX_RESPONSE_FRAME).await?;
            if answers.unbounded_send(a).is_err() {
                // Nobody waits for answers any more.
                return Ok(());
            }
        }
    };
    let (writer, reader) = (Box::pin(writer), Box::pin(reader));
    match select(writer, reader).await {
        Either::Left((r, _)) | Either::Right((r, _)) => r,
    }
}

/// The libp2p side of sessions: hands over each session stream the other side opens (if
/// this peer accepts sessions, as the GIS does) and opens sessions on request (as nodes do).
/// Streams are never dropped for want of a reader: they queue as swarm events, which the
/// owner of the swarm takes in turn.
pub struct Behaviour {
    accept: bool,
    connected: HashMap<PeerId, usize>,
    events: VecDeque<ToSwarm<Event, ()>>,
}

/// What the session behaviour reports.
#[derive(Debug)]
pub enum Event {
    /// A peer opened a session (only where sessions are accepted).
    Inbound { peer: PeerId, stream: Stream },
    /// The session asked for with [`Behaviour::open`] is ready to use. The other side may
    /// still refuse the protocol: with 0-RTT negotiation that shows as the stream failing
    /// before the first answer.
    Opened { peer: PeerId, stream: Stream },
    /// It could not be opened: no connection, or the peer refused the protocol.
    OpenFailed { peer: PeerId, error: String },
}

impl Behaviour {
    /// `accept`: take sessions other peers open (the GIS); nodes only open them.
    pub fn new(accept: bool) -> Self {
        Behaviour {
            accept,
            connected: HashMap::new(),
            events: VecDeque::new(),
        }
    }

    /// Opens a session to `peer` on a connection it already has; the outcome comes back as
    /// [`Event::Opened`] or [`Event::OpenFailed`].
    pub fn open(&mut self, peer: PeerId) {
        if self.connected.contains_key(&peer) {
            self.events.push_back(ToSwarm::NotifyHandler {
                peer_id: peer,
                handler: NotifyHandler::Any,
                event: (),
            });
        } else {
            self.events
                .push_back(ToSwarm::GenerateEvent(Event::OpenFailed {
                    peer,
                    error: "not connected".into(),
                }));
        }
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = Handler;
    type ToSwarm = Event;

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(Handler::new(self.accept))
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(Handler::new(self.accept))
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::ConnectionEstablished(c) => {
                *self.connected.entry(c.peer_id).or_default() += 1;
            }
            FromSwarm::ConnectionClosed(c) => {
                if let Some(n) = self.connected.get_mut(&c.peer_id) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        self.connected.remove(&c.peer_id);
                    }
                }
            }
            _ => {}
        }
    }

    fn on_connection_handler_event(
        &mut self,
        peer: PeerId,
        _: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        let event = match event {
            HandlerEvent::Inbound(stream) => Event::Inbound { peer, stream },
            HandlerEvent::Opened(stream) => Event::Opened { peer, stream },
            HandlerEvent::Failed(error) => Event::OpenFailed { peer, error },
        };
        self.events.push_back(ToSwarm::GenerateEvent(event));
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Event, ()>> {
        match self.events.pop_front() {
            Some(e) => Poll::Ready(e),
            None => Poll::Pending,
        }
    }
}

/// What a connection's handler tells the behaviour.
#[derive(Debug)]
pub enum HandlerEvent {
    Inbound(Stream),
    Opened(Stream),
    Failed(String),
}

/// One connection's part: listens for the session protocol if accepting, opens session
/// streams when told to.
pub struct Handler {
    accept: bool,
    /// Opens asked for and not yet requested from the connection.
    to_open: usize,
    out: VecDeque<HandlerEvent>,
}

impl Handler {
    fn new(accept: bool) -> Self {
        Handler {
            accept,
            to_open: 0,
            out: VecDeque::new(),
        }
    }
}

impl ConnectionHandler for Handler {
    type FromBehaviour = ();
    type ToBehaviour = HandlerEvent;
    type InboundProtocol = Upgrade;
    type OutboundProtocol = Upgrade;
    type InboundOpenInfo = ();
    type OutboundOpenInfo = ();

    fn listen_protocol(&self) -> SubstreamProtocol<Upgrade> {
        SubstreamProtocol::new(Upgrade(self.accept.then_some(PROTOCOL)), ())
    }

    fn poll(
        &mut self,
        _: &mut Context<'_>,
    ) -> Poll<ConnectionHandlerEvent<Upgrade, (), HandlerEvent>> {
        if let Some(e) = self.out.pop_front() {
            return Poll::Ready(ConnectionHandlerEvent::NotifyBehaviour(e));
        }
        if self.to_open > 0 {
            self.to_open -= 1;
            return Poll::Ready(ConnectionHandlerEvent::OutboundSubstreamRequest {
                protocol: SubstreamProtocol::new(Upgrade(Some(PROTOCOL)), ()),
            });
        }
        Poll::Pending
    }

    fn on_behaviour_event(&mut self, (): ()) {
        self.to_open += 1;
    }

    fn on_connection_event(&mut self, event: ConnectionEvent<Upgrade, Upgrade>) {
        match event {
            ConnectionEvent::FullyNegotiatedInbound(FullyNegotiatedInbound {
                protocol: stream,
                ..
            }) => self.out.push_back(HandlerEvent::Inbound(stream)),
            ConnectionEvent::FullyNegotiatedOutbound(FullyNegotiatedOutbound {
                protocol: stream,
                ..
            }) => self.out.push_back(HandlerEvent::Opened(stream)),
            ConnectionEvent::DialUpgradeError(DialUpgradeError { error, .. }) => {
                let why = match error {
                    StreamUpgradeError::NegotiationFailed => {
                        "the peer does not speak GIS sessions".to_string()
                    }
                    StreamUpgradeError::Timeout => "timed out opening a session".to_string(),
                    StreamUpgradeError::Io(e) => format!("opening a session: {e}"),
                    StreamUpgradeError::Apply(never) => match never {},
                };
                self.out.push_back(HandlerEvent::Failed(why));
            }
            _ => {}
        }
    }
}

/// The session protocol as a stream upgrade: nothing beyond the protocol's name (`None`:
/// offer nothing, for peers that accept no sessions).
pub struct Upgrade(Option<StreamProtocol>);

impl UpgradeInfo for Upgrade {
    type Info = StreamProtocol;
    type InfoIter = std::option::IntoIter<StreamProtocol>;

    fn protocol_info(&self) -> Self::InfoIter {
        self.0.clone().into_iter()
    }
}

impl InboundUpgrade<Stream> for Upgrade {
    type Output = Stream;
    type Error = Infallible;
    type Future = Ready<Result<Stream, Infallible>>;

    fn upgrade_inbound(self, stream: Stream, _: StreamProtocol) -> Self::Future {
        ready(Ok(stream))
    }
}

impl OutboundUpgrade<Stream> for Upgrade {
    type Output = Stream;
    type Error = Infallible;
    type Future = Ready<Result<Stream, Infallible>>;

    fn upgrade_outbound(self, stream: Stream, _: StreamProtocol) -> Self::Future {
        ready(Ok(stream))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode_body, encode_frame};
    use crate::gis::ImageQuery;
    use crate::ids::ImageId;
    use proptest::prelude::*;

    #[test]
    fn frames_round_trip() {
        let r = SessionRequest(
            7,
            GisRequest::Refresh {
                image: ImageId([3; 32]),
                known: Some(9),
            },
        );
        let f = encode_frame(&r, MAX_REQUEST_FRAME).unwrap();
        assert_eq!(
            decode_body::<SessionRequest>(&f[4..], MAX_REQUEST_FRAME).unwrap(),
            r
        );
        let a = SessionResponse(
            u64::MAX,
            GisResponse::Error {
                kind: crate::gis::ErrorKind::UnknownImage,
                message: "no such image".into(),
            },
        );
        let f = encode_frame(&a, MAX_RESPONSE_FRAME).unwrap();
        assert_eq!(
            decode_body::<SessionResponse>(&f[4..], MAX_RESPONSE_FRAME).unwrap(),
            a
        );
    }

    /// The largest request the per-request protocol allows still fits a session frame.
    #[test]
    fn a_request_at_the_limit_fits_the_envelope() {
        let manifest = vec![0u8; MAX_REQUEST_BYTES - 64];
        let r = GisRequest::Publish {
            holding: crate::gis::Holding {
                image: ImageId([1; 32]),
                chunks_held: 1,
                complete: false,
                fetching: true,
            },
            manifest,
        };
        let plain = encode_frame(&r, usize::MAX).unwrap().len() - 4;
        let wrapped = encode_frame(&SessionRequest(u64::MAX, r), usize::MAX)
            .unwrap()
            .len()
            - 4;
        assert!(wrapped - plain <= ENVELOPE, "{wrapped} - {plain}");
    }

    /// A session over an in-memory pipe: answers arrive by id, in the order the peer sent
    /// them; an oversized answer ends the session with an error instead of being read.
    #[tokio::test]
    async fn the_client_matches_answers_and_refuses_oversized_frames() {
        let (client_end, server_end) = pipe();
        let (req_tx, req_rx) = mpsc::unbounded();
        let (ans_tx, mut ans_rx) = mpsc::unbounded();
        let client = tokio::spawn(run_client(client_end, req_rx, ans_tx));
        let lookup = |n: u8| GisRequest::Lookup {
            image: ImageQuery::Id(ImageId([n; 32])),
            idc: None,
        };
        req_tx.unbounded_send(SessionRequest(1, lookup(1))).unwrap();
        req_tx.unbounded_send(SessionRequest(2, lookup(2))).unwrap();
        let (mut srd, mut swr) = server_end.split();
        let a: SessionRequest = read_frame(&mut srd, MAX_REQUEST_FRAME).await.unwrap();
        let b: SessionRequest = read_frame(&mut srd, MAX_REQUEST_FRAME).await.unwrap();
        assert_eq!((a.0, b.0), (1, 2));
        let ack = GisResponse::Ack {
            revocations: Default::default(),
            bridgeheads: vec![],
            heartbeat_secs: 2,
        };
        write_frame(
            &mut swr,
            &SessionResponse(2, ack.clone()),
            MAX_RESPONSE_FRAME,
        )
        .await
        .unwrap();
        write_frame(
            &mut swr,
            &SessionResponse(1, ack.clone()),
            MAX_RESPONSE_FRAME,
        )
        .await
        .unwrap();
        assert_eq!(ans_rx.next().await.unwrap().0, 2);
        assert_eq!(ans_rx.next().await.unwrap().0, 1);
        // A length prefix above the limit: the client stops before allocating it.
        swr.write_all(&((MAX_RESPONSE_FRAME as u32) + 1).to_be_bytes())
            .await
            .unwrap();
        swr.flush().await.unwrap();
        let err = client.await.unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
    }

    /// Closing the request channel closes the client's write side: the peer reads EOF.
    #[tokio::test]
    async fn dropping_the_requests_closes_the_session() {
        let (client_end, server_end) = pipe();
        let (req_tx, req_rx) = mpsc::unbounded();
        let (ans_tx, _ans_rx) = mpsc::unbounded();
        let client = tokio::spawn(run_client(client_end, req_rx, ans_tx));
        drop(req_tx);
        client.await.unwrap().unwrap();
        let mut srd = server_end;
        let mut rest = Vec::new();
        srd.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }

    fn pipe() -> (
        impl AsyncRead + AsyncWrite + Send + 'static,
        impl AsyncRead + AsyncWrite + Send + Unpin + 'static,
    ) {
        use tokio_util::compat::TokioAsyncReadCompatExt;
        let (a, b) = tokio::io::duplex(1 << 20);
        (a.compat(), b.compat())
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = decode_body::<SessionRequest>(&bytes, MAX_REQUEST_FRAME);
            let _ = decode_body::<SessionResponse>(&bytes, MAX_RESPONSE_FRAME);
        }
    }
}
