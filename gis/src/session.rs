//! The GIS's side of GIS sessions (`bids_protocols::gis_session`): one long-lived stream per
//! host carrying all its requests. A task per session reads requests and hands them to the
//! event loop, which answers them like requests of the per-request protocol; the task
//! writes the answers back. Where an answer goes is a [`Reply`], whichever way the request
//! came.

use crate::metrics::GisMetrics;
use bids_protocols::codec::{read_frame, write_frame};
use bids_protocols::gis::{self, GisRequest, GisResponse};
use bids_protocols::gis_session::{
    SessionRequest, SessionResponse, MAX_IN_FLIGHT, MAX_REQUEST_FRAME, MAX_RESPONSE_FRAME,
};
use futures::{AsyncReadExt, AsyncWriteExt, FutureExt};
use libp2p::request_response::{self, ResponseChannel};
use libp2p::PeerId;
use std::io;
use std::sync::Arc;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tracing::debug;

/// Requests read from sessions and not yet taken by the event loop; session tasks wait
/// (and stop reading their streams) while it is full.
const INBOX: usize = 4096;

/// Where the answer to one request goes.
pub(crate) enum Reply {
    /// A request of the per-request protocol: its stream.
    Stream(ResponseChannel<GisResponse>),
    /// A request read from a session.
    Session(SessionReply),
}

/// The way back to a session task. Holds one of the session's in-flight slots until the
/// answer is sent or dropped.
pub(crate) struct SessionReply {
    id: u64,
    to_writer: mpsc::UnboundedSender<(SessionResponse, OwnedSemaphorePermit)>,
    slot: OwnedSemaphorePermit,
}

impl Reply {
    /// Sends `response`; false if the requester is gone.
    pub(crate) fn send(
        self,
        rr: &mut request_response::Behaviour<gis::Codec>,
        response: GisResponse,
    ) -> bool {
        match self {
            Reply::Stream(channel) => rr.send_response(channel, response).is_ok(),
            Reply::Session(s) => s
                .to_writer
                .send((SessionResponse(s.id, response), s.slot))
                .is_ok(),
        }
    }
}

/// A request read from a session, for the event loop.
pub(crate) struct Incoming {
    pub(crate) peer: PeerId,
    pub(crate) request: GisRequest,
    pub(crate) reply: Reply,
}

/// Requests of every session, for the event loop.
pub(crate) struct Inbox {
    rx: mpsc::Receiver<Incoming>,
    tx: mpsc::Sender<Incoming>,
}

/// Starts the task of each session a host opens; its requests go to the [`Inbox`].
#[derive(Clone)]
pub(crate) struct Sessions {
    tx: mpsc::Sender<Incoming>,
    metrics: Arc<GisMetrics>,
}

impl Sessions {
    /// Serves the session `stream` of `peer` until it ends.
    pub(crate) fn start(&self, peer: PeerId, stream: libp2p::Stream) {
        debug!(%peer, "GIS session opened");
        let (tx, metrics) = (self.tx.clone(), self.metrics.clone());
        tokio::spawn(async move {
            metrics.session(true);
            serve(peer, stream, tx).await;
            metrics.session(false);
        });
    }
}

impl Inbox {
    pub(crate) fn new() -> Inbox {
        let (tx, rx) = mpsc::channel(INBOX);
        Inbox { rx, tx }
    }

    /// What starts sessions feeding this inbox.
    pub(crate) fn sessions(&self, metrics: Arc<GisMetrics>) -> Sessions {
        Sessions {
            tx: self.tx.clone(),
            metrics,
        }
    }

    /// The next request of any session.
    pub(crate) async fn recv(&mut self) -> Option<Incoming> {
        self.rx.recv().await
    }

    /// A request already waiting, if any.
    pub(crate) fn try_recv(&mut self) -> Option<Incoming> {
        self.rx.try_recv().ok()
    }
}

/// One session: reads requests (at most `MAX_IN_FLIGHT` unanswered) and writes answers
/// as the event loop sends them, until the host closes the session or the stream fails.
/// Answers to requests already read are still written after the host's half-close.
async fn serve(peer: PeerId, stream: libp2p::Stream, to_loop: mpsc::Sender<Incoming>) {
    let (mut rd, mut wr) = stream.split();
    let (to_writer, mut answers) =
        mpsc::unbounded_channel::<(SessionResponse, OwnedSemaphorePermit)>();
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let reader = async move {
        let mut stop = stop_rx.fuse();
        loop {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let frame = futures::select! {
                f = read_frame::<_, SessionRequest>(&mut rd, MAX_REQUEST_FRAME).fuse() => f,
                _ = stop => return,
            };
            match frame {
                Ok(SessionRequest(id, request)) => {
                    let reply = Reply::Session(SessionReply {
                        id,
                        to_writer: to_writer.clone(),
                        slot,
                    });
                    let incoming = Incoming {
                        peer,
                        request,
                        reply,
                    };
                    if to_loop.send(incoming).await.is_err() {
                        return; // The GIS is stopping.
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    debug!(%peer, "GIS session closed by the host");
                    return;
                }
                Err(e) => {
                    // Malformed or oversized frames end the session; nothing else is touched.
                    debug!(%peer, error = %e, "bad GIS session; closing it");
                    return;
                }
            }
        }
        // `to_writer` drops here: the writer ends once every answer already owed is out.
    };
    let writer = async move {
        while let Some((answer, _slot)) = answers.recv().await {
            if let Err(e) = write_frame(&mut wr, &answer, MAX_RESPONSE_FRAME).await {
                debug!(%peer, error = %e, "cannot write to a GIS session; closing it");
                let _ = stop_tx.send(());
                return;
            }
        }
        let _ = wr.close().await;
    };
    futures::join!(reader, writer);
}
