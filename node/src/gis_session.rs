//! The node's session with its GIS, sans-IO: whether the GIS is connected and this node
//! registered, when to redial, which requests go out now, which wait for the GIS to be
//! back (bounded in number and time) and which are dropped, and which are sent again after
//! a failure. The caller passes the time and the randomness, does the dialling and the
//! sending, and turns what fails into answers; `crate::backoff` and `crate::gis_watch`
//! hold the redial and reminder policies this composes.

use crate::backoff::Backoff;
use crate::gis_watch::{GisWatch, Reminder};
use bids_protocols::gis::GisRequest;
use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::time::{Duration, Instant};

/// A lookup or a caller's request is sent at most this many more times after it failed.
pub const RESENDS: u32 = 2;
/// After the GIS connection is lost (or a dial fails) the GIS is redialled after a delay
/// that starts here and doubles per failure, drawn at random in its upper half.
pub const REDIAL_BASE: Duration = Duration::from_millis(250);
/// ... up to this: a node is back at most this long (plus a tick) after the GIS is, and the
/// hosts of a large IDC spread their redials over the upper half of it.
pub const REDIAL_CAP: Duration = Duration::from_millis(2500);
/// Requests someone waits for (a caller's, a fetch's first lookup) wait at most this long
/// for the GIS to be reachable and registered with again; then they fail.
pub const BACKLOG_WAIT: Duration = Duration::from_secs(15);
/// At most this many such requests wait; more fail at once.
pub const MAX_BACKLOG: usize = 256;

/// What becomes of a request while the GIS is unreachable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unreachable {
    /// Dropped: it repeats on its own (registration, heartbeats, publications).
    Drop,
    /// Failed at once: its sender asks again later by itself (a download's refresh).
    Fail,
    /// Held until the node is registered again: someone waits for its answer.
    Hold,
}

/// What the session needs to know of what a request is for.
pub trait Purpose {
    fn when_unreachable(&self) -> Unreachable;
    /// Whether it is sent again when it fails (an answer someone waits for; one lost
    /// answer on a slow link must not fail a download).
    fn resent(&self) -> bool;
}

/// What the caller does next.
#[derive(Debug)]
pub enum Step<P> {
    /// Send `req` now, then report it with [`GisSession::sent`].
    Send {
        req: Box<GisRequest>,
        purpose: P,
        attempt: u32,
    },
    /// It will not be answered: tell whoever waits why.
    Fail { purpose: P, why: String },
}

/// A request sent and not answered yet.
struct Pending<P> {
    purpose: P,
    /// The request and its attempt, kept if it is sent again on failure.
    resend: Option<(GisRequest, u32)>,
}

/// What happened to the connection, for the caller's log.
#[derive(Debug, PartialEq, Eq)]
pub enum Connected {
    /// Already connected: nothing to do.
    Already,
    /// The first connection.
    First,
    /// Back after a loss, after this many failed dials: register again.
    Again { failed_dials: u32 },
}

/// What a tick asks of the caller.
#[derive(Debug)]
pub struct Tick<P> {
    /// Dial the GIS now.
    pub dial: bool,
    /// Remind the operator that the GIS is still out of reach.
    pub reminder: Option<Reminder>,
    /// Held requests to send (registered again) or to fail (held too long).
    pub steps: Vec<Step<P>>,
}

/// One node's session with its GIS. `I` names a sent request (the swarm's request id).
///
/// The GIS may be a Raft group of replicas: the session talks to one at a time and moves
/// to the next, in order and round, whenever a dial fails or the connection is lost; it
/// registers again with whichever it reaches (any replica takes writes to its leader).
pub struct GisSession<P, I> {
    /// The replicas' addresses, for messages; `at` is the one in use.
    names: Vec<String>,
    at: usize,
    connected: bool,
    registered: bool,
    dialing: bool,
    /// Whether the connection was ever lost (the next one is a reconnection).
    lost: bool,
    redial: Backoff,
    watch: GisWatch,
    /// Requests waiting for the GIS to be reachable and to have registered us again: since
    /// when, the request, its purpose and attempt.
    backlog: VecDeque<(Instant, GisRequest, P, u32)>,
    pending: HashMap<I, Pending<P>>,
}

impl<P: Purpose, I: Hash + Eq> GisSession<P, I> {
    /// A session with the GIS replicas at `names` (at least one; for messages), not
    /// connected yet, from `now`; the first is tried first.
    pub fn new(names: Vec<String>, now: Instant) -> Self {
        let mut watch = GisWatch::default();
        watch.down(now);
        GisSession {
            names,
            at: 0,
            connected: false,
            registered: false,
            dialing: false,
            lost: false,
            redial: Backoff::new(REDIAL_BASE, REDIAL_CAP),
            watch,
            backlog: VecDeque::new(),
            pending: HashMap::new(),
        }
    }

    pub fn connected(&self) -> bool {
        self.connected
    }

    /// The replica in use (to dial, to send to): an index into the names given at start.
    pub fn replica(&self) -> usize {
        self.at
    }

    /// The address of the replica in use.
    pub fn name(&self) -> &str {
        self.names.get(self.at).map_or("", String::as_str)
    }

    /// The next replica takes over (the one in use failed us).
    fn next_replica(&mut self) {
        if !self.names.is_empty() {
            self.at = (self.at + 1) % self.names.len();
        }
    }

    pub fn registered(&self) -> bool {
        self.registered
    }

    pub fn dialing(&self) -> bool {
        self.dialing
    }

    /// Failed dials since the last connection.
    pub fn failed_dials(&self) -> u32 {
        self.redial.failures()
    }

    /// A request to send at its `attempt` (0: the first).
    pub fn submit(
        &mut self,
        req: GisRequest,
        purpose: P,
        attempt: u32,
        now: Instant,
    ) -> Option<Step<P>> {
        if self.connected {
            return Some(Step::Send {
                req: Box::new(req),
                purpose,
                attempt,
            });
        }
        match purpose.when_unreachable() {
            Unreachable::Drop => None,
            Unreachable::Fail => Some(Step::Fail {
                purpose,
                why: "the GIS is unreachable".into(),
            }),
            Unreachable::Hold if self.backlog.len() >= MAX_BACKLOG => Some(Step::Fail {
                purpose,
                why: "the GIS is unreachable and too many requests wait for it".into(),
            }),
            Unreachable::Hold => {
                self.backlog.push_back((now, req, purpose, attempt));
                None
            }
        }
    }

    /// What to keep of a request about to be sent, to send it again if it fails: a copy
    /// for purposes that are resent, nothing for the others.
    pub fn keep(req: &GisRequest, purpose: &P) -> Option<GisRequest> {
        purpose.resent().then(|| req.clone())
    }

    /// A request went out as `id` (after a [`Step::Send`]) at `attempt`, with what
    /// [`GisSession::keep`] kept of it.
    pub fn sent(&mut self, id: I, kept: Option<GisRequest>, purpose: P, attempt: u32) {
        let resend = kept.map(|req| (req, attempt));
        self.pending.insert(id, Pending { purpose, resend });
    }

    /// The answer to `id` came: what it was for.
    pub fn answered(&mut self, id: &I) -> Option<P> {
        self.pending.remove(id).map(|p| p.purpose)
    }

    /// `id` failed with `error`: sent again (its next attempt), or failed for good.
    pub fn failed(&mut self, id: &I, error: String, now: Instant) -> Option<Step<P>> {
        let p = self.pending.remove(id)?;
        match p.resend {
            Some((req, attempt)) if attempt < RESENDS => {
                tracing::warn!(%error, attempt = attempt + 1, "a GIS request failed; sending it again");
                self.submit(req, p.purpose, attempt + 1, now)
            }
            _ => Some(Step::Fail {
                purpose: p.purpose,
                why: error,
            }),
        }
    }

    /// A dial of the GIS started.
    pub fn dial_started(&mut self) {
        self.dialing = true;
    }

    /// A dial failed with `cause` (`unit` in [0, 1) draws the backoff): how long until the
    /// next one, and whether to report the failure now (else a reminder will).
    pub fn dial_failed(&mut self, now: Instant, cause: &str, unit: f64) -> (Duration, bool) {
        self.dialing = false;
        self.next_replica();
        let wait = self.redial.failed(now, unit);
        (wait, self.watch.dial_failed(now, cause))
    }

    /// The connection to the GIS is up: register (unless it already was).
    pub fn on_connected(&mut self, now: Instant) -> Connected {
        self.dialing = false;
        if self.connected {
            return Connected::Already;
        }
        let failed_dials = self.redial.failures();
        self.connected = true;
        self.watch.up(now);
        self.redial.reset();
        if self.lost {
            Connected::Again { failed_dials }
        } else {
            Connected::First
        }
    }

    /// The connection to the GIS is lost: a restarted GIS has forgotten that we are alive,
    /// so we register again once back. Returns the wait before the redial (`None`: it was
    /// not connected).
    pub fn on_disconnected(&mut self, now: Instant, unit: f64) -> Option<Duration> {
        if !self.connected {
            return None;
        }
        self.connected = false;
        self.lost = true;
        self.registered = false;
        self.next_replica();
        let wait = self.redial.failed(now, unit);
        self.watch.down(now);
        Some(wait)
    }

    /// The GIS accepted our registration.
    pub fn on_registered(&mut self) {
        self.registered = true;
    }

    /// The GIS no longer knows us (it said so, or a registration failed).
    pub fn on_unregistered(&mut self) {
        self.registered = false;
    }

    /// What is due at `now`: a redial, a reminder, the held requests (sent once
    /// registered again, failed once held for `BACKLOG_WAIT`).
    pub fn tick(&mut self, now: Instant) -> Tick<P> {
        let dial = !self.connected && !self.dialing && self.redial.due(now);
        let reminder = self.watch.due(now);
        let mut steps = Vec::new();
        if self.registered && self.connected {
            for (_, req, purpose, attempt) in std::mem::take(&mut self.backlog) {
                steps.push(Step::Send {
                    req: Box::new(req),
                    purpose,
                    attempt,
                });
            }
        } else {
            while let Some((since, ..)) = self.backlog.front() {
                if now.duration_since(*since) < BACKLOG_WAIT {
                    break;
                }
                if let Some((_, _, purpose, _)) = self.backlog.pop_front() {
                    steps.push(Step::Fail {
                        purpose,
                        why: format!(
                            "not connected to and registered with the GIS {} for {BACKLOG_WAIT:?}",
                            self.names.join(" or ")
                        ),
                    });
                }
            }
        }
        Tick {
            dial,
            reminder,
            steps,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bids_protocols::gis::ImageQuery;
    use bids_protocols::ImageId;

    #[derive(Debug, PartialEq)]
    enum Why {
        Heartbeat,
        Refresh,
        Fetch(u8),
    }

    impl Purpose for Why {
        fn when_unreachable(&self) -> Unreachable {
            match self {
                Why::Heartbeat => Unreachable::Drop,
                Why::Refresh => Unreachable::Fail,
                Why::Fetch(_) => Unreachable::Hold,
            }
        }
        fn resent(&self) -> bool {
            matches!(self, Why::Fetch(_))
        }
    }

    fn lookup(n: u8) -> GisRequest {
        GisRequest::Lookup {
            image: ImageQuery::Id(ImageId([n; 32])),
            idc: None,
        }
    }

    fn sends(steps: &[Step<Why>]) -> Vec<&Why> {
        steps
            .iter()
            .filter_map(|s| match s {
                Step::Send { purpose, .. } => Some(purpose),
                Step::Fail { .. } => None,
            })
            .collect()
    }

    #[test]
    fn while_unreachable_requests_are_dropped_failed_or_held_by_purpose() {
        let t0 = Instant::now();
        let mut s: GisSession<Why, u32> = GisSession::new(vec!["gis".into()], t0);
        assert!(s.submit(lookup(0), Why::Heartbeat, 0, t0).is_none());
        assert!(matches!(
            s.submit(lookup(0), Why::Refresh, 0, t0),
            Some(Step::Fail {
                purpose: Why::Refresh,
                ..
            })
        ));
        assert!(s.submit(lookup(1), Why::Fetch(1), 0, t0).is_none());
        // Connected but not registered yet: still held.
        assert_eq!(s.on_connected(t0), Connected::First);
        assert!(sends(&s.tick(t0).steps).is_empty());
        // Registered: the held request goes out, once.
        s.on_registered();
        let t = s.tick(t0 + Duration::from_millis(100));
        assert_eq!(sends(&t.steps), vec![&Why::Fetch(1)]);
        assert!(s.tick(t0 + Duration::from_millis(200)).steps.is_empty());
        // Connected now: anything goes out at once.
        assert!(matches!(
            s.submit(lookup(2), Why::Heartbeat, 0, t0),
            Some(Step::Send { .. })
        ));
    }

    #[test]
    fn held_requests_fail_after_the_wait_and_beyond_the_bound() {
        let t0 = Instant::now();
        let mut s: GisSession<Why, u32> = GisSession::new(vec!["gis".into()], t0);
        for i in 0..MAX_BACKLOG {
            assert!(s.submit(lookup(1), Why::Fetch(i as u8), 0, t0).is_none());
        }
        assert!(matches!(
            s.submit(lookup(1), Why::Fetch(0), 0, t0),
            Some(Step::Fail { .. })
        ));
        assert!(s
            .tick(t0 + BACKLOG_WAIT - Duration::from_millis(1))
            .steps
            .is_empty());
        let t = s.tick(t0 + BACKLOG_WAIT);
        assert_eq!(t.steps.len(), MAX_BACKLOG);
        assert!(t.steps.iter().all(|s| matches!(s, Step::Fail { .. })));
    }

    #[test]
    fn failed_lookups_are_sent_again_then_fail_and_others_fail_at_once() {
        let t0 = Instant::now();
        let mut s: GisSession<Why, u32> = GisSession::new(vec!["gis".into()], t0);
        s.on_connected(t0);
        s.on_registered();
        s.sent(1, Some(lookup(1)), Why::Fetch(1), 0);
        let mut attempts = 0;
        let mut id = 1;
        loop {
            match s.failed(&id, "timeout".into(), t0) {
                Some(Step::Send {
                    req,
                    purpose,
                    attempt,
                }) => {
                    attempts += 1;
                    assert_eq!(attempt, attempts);
                    id += 1;
                    let kept = GisSession::<Why, u32>::keep(&req, &purpose);
                    s.sent(id, kept, purpose, attempt);
                }
                Some(Step::Fail { purpose, why }) => {
                    assert_eq!(purpose, Why::Fetch(1));
                    assert_eq!(why, "timeout");
                    break;
                }
                None => panic!("a pending request vanished"),
            }
        }
        assert_eq!(attempts, RESENDS);
        // Not resent: fails at once; answered: gone.
        s.sent(10, None, Why::Heartbeat, 0);
        assert!(matches!(
            s.failed(&10, "x".into(), t0),
            Some(Step::Fail { .. })
        ));
        s.sent(11, Some(lookup(3)), Why::Fetch(3), 0);
        assert_eq!(s.answered(&11), Some(Why::Fetch(3)));
        assert!(s.failed(&11, "late".into(), t0).is_none());
    }

    #[test]
    fn replicas_take_over_in_turn_when_one_fails() {
        let t0 = Instant::now();
        let names = vec!["a".to_string(), "b".into(), "c".into()];
        let mut s: GisSession<Why, u32> = GisSession::new(names, t0);
        assert_eq!((s.replica(), s.name()), (0, "a"));
        s.dial_started();
        s.dial_failed(t0, "refused", 0.0);
        assert_eq!(s.name(), "b");
        s.on_connected(t0);
        s.on_registered();
        // b stays in use while it answers; lost, c takes over, then a again.
        s.on_disconnected(t0, 0.0);
        assert_eq!(s.name(), "c");
        s.dial_failed(t0, "refused", 0.0);
        assert_eq!(s.name(), "a");
    }

    #[test]
    fn a_lost_connection_unregisters_redials_with_backoff_and_reconnects() {
        let t0 = Instant::now();
        let mut s: GisSession<Why, u32> = GisSession::new(vec!["gis".into()], t0);
        assert!(s.tick(t0).dial, "the first dial is due at once");
        s.dial_started();
        assert!(!s.tick(t0).dial, "not while a dial is under way");
        let (wait, report) = s.dial_failed(t0, "connection refused", 0.5);
        assert!(report, "the first failure is reported");
        assert!(wait >= REDIAL_BASE / 2 && wait <= REDIAL_BASE);
        assert!(!s.tick(t0).dial);
        assert!(s.tick(t0 + wait).dial);
        let (_, again) = s.dial_failed(t0 + wait, "connection refused", 0.5);
        assert!(!again, "the same cause is left to the reminders");
        assert_eq!(s.on_connected(t0 + wait), Connected::First);
        s.on_registered();
        assert!(s.registered());
        let t1 = t0 + Duration::from_secs(60);
        let wait = s.on_disconnected(t1, 0.0).expect("it was connected");
        assert!(!s.registered() && !s.connected());
        assert!(wait <= REDIAL_BASE);
        assert_eq!(s.on_disconnected(t1, 0.0), None);
        assert_eq!(
            s.on_connected(t1 + wait),
            Connected::Again { failed_dials: 1 }
        );
        assert_eq!(s.failed_dials(), 0);
    }
}
