//! How the engine carries the core's GIS requests: over one GIS session per GIS peer
//! (`bids_protocols::gis_session`: a long-lived stream, one frame per request and per
//! answer), opened once the connection is up, or over the per-request protocol while no
//! session is open and with a GIS that refuses sessions.
//!
//! A session that ends before its first answer is taken as a refusal (with 0-RTT stream
//! negotiation a refused protocol shows only as the stream failing): that GIS gets
//! per-request streams until the connection to it closes. A session that ends later is
//! reopened with the next request. Requests a session leaves unanswered fail, as they would
//! on a closed connection, and the core retries them as it does any failed GIS request.

use crate::nodecore::GisKey;
use bids_protocols::gis::{GisRequest, GisResponse};
use bids_protocols::gis_session::{self, SessionRequest, SessionResponse};
use futures::channel::mpsc as fmpsc;
use futures::StreamExt;
use libp2p::{PeerId, Stream};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tracing::debug;

/// A session request unanswered this long fails, as a per-request stream would time out.
pub(super) const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// What the session tasks tell the engine.
#[derive(Debug)]
pub(super) enum LinkEvent {
    Answer {
        peer: PeerId,
        id: u64,
        response: GisResponse,
    },
    Ended {
        peer: PeerId,
        generation: u64,
        error: String,
    },
}

enum State {
    /// Asked the swarm for a session stream.
    Opening,
    Open {
        generation: u64,
        requests: fmpsc::UnboundedSender<SessionRequest>,
        answered: bool,
    },
    /// This GIS refused sessions (until the connection closes).
    Refused,
}

#[derive(Default)]
pub(super) struct GisLinks {
    state: HashMap<PeerId, State>,
    /// Session requests not answered yet: to whom, the core's key, when sent.
    pending: HashMap<u64, (PeerId, GisKey, Instant)>,
    next_id: u64,
    generation: u64,
}

impl GisLinks {
    /// Sends `req` on `peer`'s session if one is open (`None`). Otherwise gives it back to
    /// be sent on a stream of its own, with `true` if the swarm should be asked to open a
    /// session first.
    pub(super) fn send(
        &mut self,
        peer: PeerId,
        key: GisKey,
        req: GisRequest,
        now: Instant,
    ) -> Option<(GisRequest, bool)> {
        match self.state.get(&peer) {
            Some(State::Open { requests, .. }) => {
                let id = self.next_id;
                self.next_id += 1;
                match requests.unbounded_send(SessionRequest(id, req)) {
                    Ok(()) => {
                        self.pending.insert(id, (peer, key, now));
                        None
                    }
                    // The task has ended; its `Ended` is on the way. This one goes alone.
                    Err(e) => Some((e.into_inner().1, false)),
                }
            }
            Some(State::Opening) | Some(State::Refused) => Some((req, false)),
            None => {
                self.state.insert(peer, State::Opening);
                Some((req, true))
            }
        }
    }

    /// The swarm opened the session: its task starts; its answers and its end come back on
    /// `events`.
    pub(super) fn opened(&mut self, peer: PeerId, stream: Stream, events: mpsc::Sender<LinkEvent>) {
        let (requests, requests_rx) = fmpsc::unbounded();
        let generation = self.open_with(peer, requests);
        let (answers_tx, mut answers) = fmpsc::unbounded::<SessionResponse>();
        let forward = events.clone();
        tokio::spawn(async move {
            let session = gis_session::run_client(stream, requests_rx, answers_tx);
            let relay = async move {
                while let Some(SessionResponse(id, response)) = answers.next().await {
                    let ev = LinkEvent::Answer { peer, id, response };
                    if forward.send(ev).await.is_err() {
                        return;
                    }
                }
            };
            let (result, ()) = futures::join!(session, relay);
            let error = match result {
                Ok(()) => "session closed".to_string(),
                Err(e) => format!("GIS session failed: {e}"),
            };
            let _ = events
                .send(LinkEvent::Ended {
                    peer,
                    generation,
                    error,
                })
                .await;
        });
        debug!(%peer, "GIS session open");
    }

    /// `peer`'s session is open and takes requests on `requests`: its generation.
    fn open_with(&mut self, peer: PeerId, requests: fmpsc::UnboundedSender<SessionRequest>) -> u64 {
        self.generation += 1;
        self.state.insert(
            peer,
            State::Open {
                generation: self.generation,
                requests,
                answered: false,
            },
        );
        self.generation
    }

    /// The swarm could not open a session: per-request streams for this GIS.
    pub(super) fn open_failed(&mut self, peer: PeerId, error: &str) {
        debug!(%peer, error, "no GIS session; requests go on streams of their own");
        self.state.insert(peer, State::Refused);
    }

    /// An answer: the core's key it belongs to, if still awaited.
    pub(super) fn answer(&mut self, peer: PeerId, id: u64) -> Option<GisKey> {
        if let Some(State::Open { answered, .. }) = self.state.get_mut(&peer) {
            *answered = true;
        }
        self.pending.remove(&id).map(|(_, key, _)| key)
    }

    /// A session ended: the keys of its unanswered requests, to fail.
    pub(super) fn ended(&mut self, peer: PeerId, generation: u64, error: &str) -> Vec<GisKey> {
        match self.state.get(&peer) {
            Some(State::Open {
                generation: g,
                answered,
                ..
            }) if *g == generation => {
                if *answered {
                    debug!(%peer, error, "GIS session ended; the next request opens another");
                    self.state.remove(&peer);
                } else {
                    self.open_failed(peer, error);
                }
            }
            _ => {}
        }
        self.take_pending(|p, _| p == peer)
    }

    /// Every connection to `peer` closed: forget what was learnt about it.
    pub(super) fn disconnected(&mut self, peer: PeerId) {
        self.state.remove(&peer);
    }

    /// The keys of session requests unanswered for longer than `REQUEST_TIMEOUT`.
    pub(super) fn timed_out(&mut self, now: Instant) -> Vec<GisKey> {
        self.take_pending(|_, sent| now.saturating_duration_since(sent) > REQUEST_TIMEOUT)
    }

    fn take_pending(&mut self, pick: impl Fn(PeerId, Instant) -> bool) -> Vec<GisKey> {
        let ids: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, (p, _, sent))| pick(*p, *sent))
            .map(|(id, _)| *id)
            .collect();
        ids.into_iter()
            .filter_map(|id| self.pending.remove(&id))
            .map(|(_, key, _)| key)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bids_protocols::gis::GisRequest;

    fn hb() -> GisRequest {
        GisRequest::Heartbeat {
            stats: Default::default(),
        }
    }

    #[test]
    fn requests_use_the_session_once_open_and_streams_until_then() {
        let (gis, t0) = (PeerId::random(), Instant::now());
        let mut l = GisLinks::default();
        // No session yet: this one goes alone, and a session is asked for, once.
        assert!(matches!(l.send(gis, GisKey(1), hb(), t0), Some((_, true))));
        assert!(matches!(l.send(gis, GisKey(2), hb(), t0), Some((_, false))));
        let (tx, mut rx) = fmpsc::unbounded();
        let generation = l.open_with(gis, tx);
        assert!(l.send(gis, GisKey(3), hb(), t0).is_none());
        assert!(l.send(gis, GisKey(4), hb(), t0).is_none());
        let SessionRequest(a, _) = rx.try_recv().unwrap();
        let SessionRequest(b, _) = rx.try_recv().unwrap();
        assert_eq!(l.answer(gis, b), Some(GisKey(4)));
        assert_eq!(l.answer(gis, b), None, "answered once");
        // The session ends after answering: what it owed fails, the next request reopens.
        assert_eq!(l.ended(gis, generation, "reset"), vec![GisKey(3)]);
        assert_eq!(l.answer(gis, a), None);
        assert!(matches!(l.send(gis, GisKey(5), hb(), t0), Some((_, true))));
    }

    #[test]
    fn a_session_that_ends_before_any_answer_means_streams_until_reconnection() {
        let (gis, t0) = (PeerId::random(), Instant::now());
        let mut l = GisLinks::default();
        let _ = l.send(gis, GisKey(1), hb(), t0);
        let (tx, _rx) = fmpsc::unbounded();
        let generation = l.open_with(gis, tx);
        assert!(l.send(gis, GisKey(2), hb(), t0).is_none());
        // A GIS without sessions: with 0-RTT negotiation the stream just fails.
        assert_eq!(l.ended(gis, generation, "refused"), vec![GisKey(2)]);
        for k in 3..6 {
            assert!(matches!(l.send(gis, GisKey(k), hb(), t0), Some((_, false))));
        }
        // A stale end of an older session changes nothing.
        assert!(l.ended(gis, generation, "late").is_empty());
        l.disconnected(gis);
        assert!(matches!(l.send(gis, GisKey(6), hb(), t0), Some((_, true))));
        // The swarm could not open one at all: the same.
        l.open_failed(gis, "the peer does not speak GIS sessions");
        assert!(matches!(l.send(gis, GisKey(7), hb(), t0), Some((_, false))));
    }

    #[test]
    fn unanswered_session_requests_time_out() {
        let (gis, t0) = (PeerId::random(), Instant::now());
        let mut l = GisLinks::default();
        let (tx, _rx) = fmpsc::unbounded();
        l.open_with(gis, tx);
        assert!(l.send(gis, GisKey(1), hb(), t0).is_none());
        assert!(l
            .send(gis, GisKey(2), hb(), t0 + Duration::from_secs(10))
            .is_none());
        assert!(l.timed_out(t0 + REQUEST_TIMEOUT).is_empty());
        assert_eq!(
            l.timed_out(t0 + REQUEST_TIMEOUT + Duration::from_secs(1)),
            vec![GisKey(1)]
        );
        assert_eq!(
            l.timed_out(t0 + REQUEST_TIMEOUT + Duration::from_secs(11)),
            vec![GisKey(2)]
        );
    }
}
