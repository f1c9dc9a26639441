//! When a running download asks the GIS again, publishes its progress, and gives up for
//! want of a source: sans-IO, the caller passes the time, the node's role and whether the
//! scheduler has a source left, and sends what is due. The scheduler (`crate::scheduler`)
//! decides which chunk comes from whom; this only paces the download's talk with the GIS.

use bids_protocols::Role;
use std::time::{Duration, Instant};

/// A download that heard an announcement from a LAN peer it cannot reach (no address: the
/// peer started after our last host list) asks the GIS again this soon after its last
/// lookup instead of waiting for the refresh interval.
pub const LOOKUP_UNKNOWN_PEER: Duration = Duration::from_millis(250);
/// Progress is published to the GIS this often during a download.
pub const PUBLISH_PROGRESS: Duration = Duration::from_secs(5);

/// The pacing knobs of the node's configuration.
#[derive(Clone, Copy, Debug)]
pub struct Pace {
    /// How often an ordinary host asks the GIS again (`NodeConfig::lookup_refresh`).
    pub lookup_refresh: Duration,
    /// How long a download may have no source before it fails
    /// (`NodeConfig::no_source_timeout`).
    pub no_source_timeout: Duration,
}

/// What is due for one download at a tick.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Due {
    /// Ask the GIS for a fresh host list.
    pub lookup: bool,
    /// Publish the download's progress.
    pub publish: bool,
    /// No source for this long, which is the limit: the download fails.
    pub no_source_for: Option<Duration>,
}

/// One download's pacing state.
#[derive(Debug)]
pub struct Cadence {
    last_lookup: Instant,
    lookups: u32,
    lookup_inflight: bool,
    /// A peer announced chunks we can neither use nor dial (its address is in no host list
    /// yet): the next lookup comes after `LOOKUP_UNKNOWN_PEER`.
    unknown_announcer: bool,
    last_publish: Instant,
    no_source_since: Option<Instant>,
}

impl Cadence {
    /// A download that started at `now` with the answer to its first lookup.
    pub fn new(now: Instant) -> Self {
        Cadence {
            last_lookup: now,
            lookups: 1,
            lookup_inflight: false,
            unknown_announcer: false,
            last_publish: now,
            no_source_since: None,
        }
    }

    /// A lookup of this download was sent by someone else (a second fetch of it): no
    /// refresh goes out until it is answered.
    pub fn lookup_sent(&mut self) {
        self.lookup_inflight = true;
    }

    /// A host list for this download came at `now`.
    pub fn lookup_answered(&mut self, now: Instant) {
        self.lookup_inflight = false;
        self.last_lookup = now;
    }

    /// A lookup got no host list: the next one may go when due.
    pub fn lookup_failed(&mut self) {
        self.lookup_inflight = false;
    }

    /// A LAN peer announced chunks of this image and we have no address for it.
    pub fn unknown_announcer(&mut self) {
        self.unknown_announcer = true;
    }

    /// What is due at `now`. Early in a download a bridgehead's host list changes fast
    /// (other IDCs start fetching too, and the sooner fetching bridgeheads find each other
    /// the sooner they trade): it asks again after 0.2, 0.5, 1 and 2 s. Ordinary hosts
    /// refresh every `lookup_refresh` (a new bridgehead after a failure, say; host lists
    /// cross the WAN when the GIS is in another IDC), except that a LAN peer whose
    /// announcement named chunks we cannot fetch (gossip carries no address: it started
    /// after our last host list, as all hosts of an IDC that start together do) is asked
    /// for after `LOOKUP_UNKNOWN_PEER`. A lookup due is counted as sent.
    pub fn tick(&mut self, now: Instant, role: Role, stalled: bool, pace: &Pace) -> Due {
        let mut due = Due::default();
        let mut every = match (role, self.lookups) {
            (Role::Bridgehead, 0 | 1) => Duration::from_millis(200),
            (Role::Bridgehead, 2) => Duration::from_millis(500),
            (Role::Bridgehead, 3) => Duration::from_secs(1),
            (Role::Bridgehead, 4) => Duration::from_secs(2),
            _ => pace.lookup_refresh,
        };
        if self.unknown_announcer {
            every = every.min(LOOKUP_UNKNOWN_PEER);
        }
        if now.duration_since(self.last_lookup) >= every && !self.lookup_inflight {
            self.lookup_inflight = true;
            self.unknown_announcer = false;
            self.last_lookup = now;
            self.lookups += 1;
            due.lookup = true;
        }
        if stalled {
            let since = *self.no_source_since.get_or_insert(now);
            let for_ = now.duration_since(since);
            if for_ >= pace.no_source_timeout {
                due.no_source_for = Some(for_);
            }
        } else {
            self.no_source_since = None;
        }
        if now.duration_since(self.last_publish) >= PUBLISH_PROGRESS {
            self.last_publish = now;
            due.publish = true;
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);
    const PACE: Pace = Pace {
        lookup_refresh: Duration::from_secs(3),
        no_source_timeout: Duration::from_secs(15),
    };

    /// The instants (ms after the start) at which lookups go out over `until_ms`, each
    /// answered 10 ms later.
    fn lookups(role: Role, until_ms: u64) -> Vec<u64> {
        let t0 = Instant::now();
        let mut c = Cadence::new(t0);
        let mut out = Vec::new();
        let mut answer_at = None;
        for ms in (0..=until_ms).step_by(10) {
            let now = t0 + Duration::from_millis(ms);
            if answer_at == Some(ms) {
                c.lookup_answered(now);
                answer_at = None;
            }
            if c.tick(now, role, false, &PACE).lookup {
                out.push(ms);
                answer_at = Some(ms + 10);
            }
        }
        out
    }

    #[test]
    fn a_bridgehead_asks_again_fast_early_then_at_the_refresh_interval() {
        // 0.2 s after the first answer, then 0.5, 1, 2 s after each answer, then 3 s.
        assert_eq!(
            lookups(Role::Bridgehead, 10_000),
            vec![200, 710, 1720, 3730, 6740, 9750]
        );
        assert_eq!(lookups(Role::Host, 10_000), vec![3000, 6010, 9020]);
    }

    #[test]
    fn an_unknown_announcer_brings_the_next_lookup_forward_once() {
        let t0 = Instant::now();
        let mut c = Cadence::new(t0);
        c.unknown_announcer();
        assert!(!c.tick(t0 + 240 * MS, Role::Host, false, &PACE).lookup);
        assert!(c.tick(t0 + 250 * MS, Role::Host, false, &PACE).lookup);
        // In flight: nothing more until answered, however long.
        c.unknown_announcer();
        assert!(!c.tick(t0 + 5000 * MS, Role::Host, false, &PACE).lookup);
        c.lookup_failed();
        assert!(c.tick(t0 + 5000 * MS, Role::Host, false, &PACE).lookup);
        c.lookup_answered(t0 + 5010 * MS);
        // The shortcut was used up: back to the refresh interval.
        assert!(!c.tick(t0 + 5300 * MS, Role::Host, false, &PACE).lookup);
        assert!(c.tick(t0 + 8010 * MS, Role::Host, false, &PACE).lookup);
    }

    #[test]
    fn no_source_fails_only_after_the_timeout_without_a_break() {
        let t0 = Instant::now();
        let mut c = Cadence::new(t0);
        let s = Duration::from_secs(1);
        assert_eq!(c.tick(t0, Role::Host, true, &PACE).no_source_for, None);
        assert_eq!(
            c.tick(t0 + 14 * s, Role::Host, true, &PACE).no_source_for,
            None
        );
        // A source came back for a moment: the count starts again.
        c.tick(t0 + 14 * s, Role::Host, false, &PACE);
        assert_eq!(
            c.tick(t0 + 20 * s, Role::Host, true, &PACE).no_source_for,
            None
        );
        assert_eq!(
            c.tick(t0 + 35 * s, Role::Host, true, &PACE).no_source_for,
            Some(15 * s)
        );
    }

    #[test]
    fn progress_is_published_every_interval() {
        let t0 = Instant::now();
        let mut c = Cadence::new(t0);
        let published: Vec<u64> = (0..=12_000u64)
            .step_by(100)
            .filter(|&ms| {
                c.tick(t0 + Duration::from_millis(ms), Role::Host, false, &PACE)
                    .publish
            })
            .collect();
        assert_eq!(published, vec![5000, 10_000]);
    }
}
