//! The connected peers and where each stands in the hello exchange, sans-IO: pending (its
//! hello not judged yet, with the chunk requests it sent meanwhile held), accepted (with
//! its link and whether it is a certified bridgehead), or refused (kept connected for a
//! moment so it can read why). The caller judges hellos (`crate::gate`), passes the time,
//! and closes the connections this says to close; no image data goes to a peer that is
//! not accepted.

use crate::accounting::PeerKind;
use crate::gate::Link;
use libp2p::PeerId;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// A peer that has not said hello by then is disconnected.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// A peer whose hello we refused stays connected this long, so it can read why (closing at
/// once loses the reply in flight); it gets no data meanwhile.
pub const REFUSAL_GRACE: Duration = Duration::from_secs(1);
/// Chunk requests held per peer while its hello is judged; more are answered Busy. A
/// requester keeps at most 16 in flight to one peer.
pub const MAX_EARLY_PER_PEER: usize = 32;

enum State<R> {
    Pending {
        since: Instant,
        /// We dialled and sent our hello; its answer is on the way.
        asked: bool,
        /// Chunk requests it sent before its hello was judged.
        early: Vec<R>,
    },
    Accepted {
        link: Link,
        /// It presented a bridgehead certificate (for the accounting by kind of peer).
        certified: bool,
    },
    /// Its hello was refused; disconnected once `REFUSAL_GRACE` has passed.
    Refused { since: Instant },
}

/// What to do with a chunk request from a peer that is not accepted.
#[derive(Debug, PartialEq, Eq)]
pub enum Early<R> {
    /// Held until its hello is judged (then released by `accept`, `refuse` or `drop`).
    Held,
    /// Too many held already: answer Busy.
    Busy(R),
    /// No hello on the way (or refused): refuse it.
    Refuse(R),
}

/// Counts for the node's status and metrics.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Census {
    pub bridgeheads: usize,
    pub hosts: usize,
    pub remotes: usize,
    pub pending: usize,
    pub wan_links: usize,
    pub connected: usize,
}

/// The peer table. `R` is a held chunk request (with whatever answers it).
pub struct Peers<R> {
    peers: HashMap<PeerId, State<R>>,
}

impl<R> Default for Peers<R> {
    fn default() -> Self {
        Peers {
            peers: HashMap::new(),
        }
    }
}

impl<R> Peers<R> {
    /// A first connection to `peer` came up at `now`; `dialer` if we dialled it. Returns
    /// whether to send it our hello now (we dialled, and it is still pending).
    pub fn connected(&mut self, peer: PeerId, now: Instant, dialer: bool) -> bool {
        let st = self.peers.entry(peer).or_insert(State::Pending {
            since: now,
            asked: false,
            early: Vec::new(),
        });
        match st {
            State::Pending { asked, .. } if dialer => {
                *asked = true;
                true
            }
            _ => false,
        }
    }

    /// `peer`'s last connection closed: forgotten, with what it had sent early.
    pub fn closed(&mut self, peer: &PeerId) {
        self.peers.remove(peer);
    }

    /// `peer`'s hello was accepted. Returns the chunk requests it sent meanwhile, to serve.
    pub fn accept(&mut self, peer: PeerId, link: Link, certified: bool) -> Vec<R> {
        let early = self.take_early(&peer);
        self.peers.insert(peer, State::Accepted { link, certified });
        early
    }

    /// We refused `peer`'s hello at `now`: it stays connected for `REFUSAL_GRACE` to read
    /// why. Returns the chunk requests it sent meanwhile, to refuse.
    pub fn refuse(&mut self, peer: PeerId, now: Instant) -> Vec<R> {
        let early = self.take_early(&peer);
        self.peers.insert(peer, State::Refused { since: now });
        early
    }

    /// `peer` is dropped (it refused us, its hello failed, its link is closed by policy):
    /// forgotten. Returns the chunk requests it sent meanwhile, to refuse.
    pub fn drop_peer(&mut self, peer: &PeerId) -> Vec<R> {
        let early = self.take_early(peer);
        self.peers.remove(peer);
        early
    }

    /// Whether our hello to `peer` failed while it was pending (then it is dropped).
    pub fn is_pending(&self, peer: &PeerId) -> bool {
        matches!(self.peers.get(peer), Some(State::Pending { .. }))
    }

    fn take_early(&mut self, peer: &PeerId) -> Vec<R> {
        match self.peers.get_mut(peer) {
            Some(State::Pending { early, .. }) => std::mem::take(early),
            _ => Vec::new(),
        }
    }

    /// A chunk request `req` from `peer`, which is not accepted: held while our hello to it
    /// is on the way (its answer settles it), else refused.
    pub fn early_request(&mut self, peer: &PeerId, req: R) -> Early<R> {
        match self.peers.get_mut(peer) {
            Some(State::Pending {
                asked: true, early, ..
            }) => {
                if early.len() < MAX_EARLY_PER_PEER {
                    early.push(req);
                    Early::Held
                } else {
                    Early::Busy(req)
                }
            }
            _ => Early::Refuse(req),
        }
    }

    /// Peers that never said hello within `HELLO_TIMEOUT`, or were refused and had
    /// `REFUSAL_GRACE` to read why, at `now`: forgotten, to disconnect, each with the
    /// requests it had sent early (to refuse).
    pub fn expire(&mut self, now: Instant) -> Vec<(PeerId, Vec<R>)> {
        let stale: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, s)| match s {
                State::Pending { since, .. } => now.duration_since(*since) > HELLO_TIMEOUT,
                State::Refused { since } => now.duration_since(*since) > REFUSAL_GRACE,
                State::Accepted { .. } => false,
            })
            .map(|(p, _)| *p)
            .collect();
        stale
            .into_iter()
            .map(|p| {
                let early = self.drop_peer(&p);
                (p, early)
            })
            .collect()
    }

    /// The link of an accepted peer.
    pub fn link_of(&self, peer: &PeerId) -> Option<Link> {
        match self.peers.get(peer) {
            Some(State::Accepted { link, .. }) => Some(*link),
            _ => None,
        }
    }

    /// Whom bytes exchanged with an accepted peer count for.
    pub fn kind_of(&self, peer: &PeerId) -> Option<PeerKind> {
        match self.peers.get(peer) {
            Some(State::Accepted { link, certified }) => Some(PeerKind::of(*link, *certified)),
            _ => None,
        }
    }

    pub fn is_accepted(&self, peer: &PeerId) -> bool {
        self.link_of(peer).is_some()
    }

    /// Whether `peer` is in the table at all (connected).
    pub fn contains(&self, peer: &PeerId) -> bool {
        self.peers.contains_key(peer)
    }

    /// The accepted peers across the WAN (bridgeheads of other IDCs).
    pub fn wan_peers(&self) -> Vec<PeerId> {
        self.peers
            .iter()
            .filter(|(_, s)| {
                matches!(
                    s,
                    State::Accepted {
                        link: Link::Wan,
                        ..
                    }
                )
            })
            .map(|(p, _)| *p)
            .collect()
    }

    pub fn census(&self) -> Census {
        let mut c = Census {
            connected: self.peers.len(),
            ..Census::default()
        };
        for st in self.peers.values() {
            match st {
                State::Accepted { link, certified } => {
                    if *link == Link::Wan {
                        c.wan_links += 1;
                    }
                    match PeerKind::of(*link, *certified) {
                        PeerKind::Bridgehead => c.bridgeheads += 1,
                        PeerKind::Host => c.hosts += 1,
                        PeerKind::Remote => c.remotes += 1,
                    }
                }
                State::Pending { .. } => c.pending += 1,
                State::Refused { .. } => {}
            }
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn early_requests_wait_for_our_hello_and_follow_its_verdict() {
        let t0 = Instant::now();
        let mut p: Peers<u32> = Peers::default();
        let (a, b, c) = (PeerId::random(), PeerId::random(), PeerId::random());
        // It dialled us: no hello of ours on the way, its requests are refused.
        assert!(!p.connected(a, t0, false));
        assert_eq!(p.early_request(&a, 1), Early::Refuse(1));
        // We dialled: hello sent, requests held up to the bound.
        assert!(p.connected(b, t0, true));
        for i in 0..MAX_EARLY_PER_PEER as u32 {
            assert_eq!(p.early_request(&b, i), Early::Held);
        }
        assert_eq!(p.early_request(&b, 99), Early::Busy(99));
        assert!(!p.is_accepted(&b));
        let held = p.accept(b, Link::Lan, false);
        assert_eq!(held, (0..MAX_EARLY_PER_PEER as u32).collect::<Vec<_>>());
        assert_eq!(p.link_of(&b), Some(Link::Lan));
        assert_eq!(p.kind_of(&b), Some(PeerKind::Host));
        // A second connection to an accepted peer changes nothing.
        assert!(!p.connected(b, t0, true));
        assert!(p.is_accepted(&b));
        // Refused: what it sent early goes back to be refused.
        assert!(p.connected(c, t0, true));
        assert_eq!(p.early_request(&c, 7), Early::Held);
        assert_eq!(p.refuse(c, t0), vec![7]);
        assert_eq!(p.early_request(&c, 8), Early::Refuse(8));
        assert!(p.contains(&c) && !p.is_accepted(&c));
    }

    #[test]
    fn silent_and_refused_peers_expire_accepted_ones_stay() {
        let t0 = Instant::now();
        let mut p: Peers<u32> = Peers::default();
        let (silent, refused, good) = (PeerId::random(), PeerId::random(), PeerId::random());
        p.connected(silent, t0, true);
        p.early_request(&silent, 5);
        p.connected(refused, t0, false);
        p.refuse(refused, t0);
        p.connected(good, t0, false);
        p.accept(good, Link::Wan, true);
        assert!(p.expire(t0 + REFUSAL_GRACE).is_empty());
        let gone = p.expire(t0 + REFUSAL_GRACE + Duration::from_millis(1));
        assert_eq!(gone, vec![(refused, vec![])]);
        let gone = p.expire(t0 + HELLO_TIMEOUT + Duration::from_millis(1));
        assert_eq!(gone, vec![(silent, vec![5])]);
        assert!(p.expire(t0 + Duration::from_secs(3600)).is_empty());
        assert_eq!(p.wan_peers(), vec![good]);
        assert_eq!(
            p.census(),
            Census {
                remotes: 1,
                wan_links: 1,
                connected: 1,
                ..Census::default()
            }
        );
        p.closed(&good);
        assert_eq!(p.census(), Census::default());
    }
}
