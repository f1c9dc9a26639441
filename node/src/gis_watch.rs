//! When to tell the operator that the GIS is out of reach, and in which words. The first
//! failed dial is reported at once with its cause; while the GIS stays out of reach a
//! reminder follows after 5 s, then 10 s, 20 s, … up to 5 min, so a long outage is neither
//! silent nor a flood. A dial that hangs (packets dropped, a port that accepts and says
//! nothing) is reported by the first reminder, within 5 s. Pure policy: the engine passes
//! the clock, does the dialling (with `crate::backoff`) and the logging.

use libp2p::swarm::DialError;
use libp2p::TransportError;
use std::time::{Duration, Instant};

/// The first reminder comes this long after the GIS went out of reach.
pub const FIRST_REMINDER: Duration = Duration::from_secs(5);
/// Reminders double up to this interval.
pub const MAX_REMINDER: Duration = Duration::from_secs(300);

#[derive(Debug, Default)]
pub struct GisWatch {
    /// Since when the GIS is out of reach (`None`: connected, or never tried).
    down_since: Option<Instant>,
    next_reminder: Option<Instant>,
    interval: Duration,
    /// The cause of the last failed dial, and whether it was reported already.
    cause: Option<String>,
    cause_reported: bool,
}

/// A reminder that the GIS is still out of reach.
#[derive(Debug, PartialEq, Eq)]
pub struct Reminder {
    pub down_for: Duration,
    /// The last failed dial's cause; `None` while the first dial has no answer yet.
    pub cause: Option<String>,
    pub next_in: Duration,
}

impl GisWatch {
    /// The GIS is not connected from `now` on (at start, or the connection was lost).
    pub fn down(&mut self, now: Instant) {
        if self.down_since.is_none() {
            self.down_since = Some(now);
            self.interval = FIRST_REMINDER;
            self.next_reminder = Some(now + FIRST_REMINDER);
            self.cause = None;
            self.cause_reported = false;
        }
    }

    /// A dial failed with `cause`: whether to report it now (the first failure of an
    /// outage, or a cause other than the one reported) rather than wait for a reminder.
    pub fn dial_failed(&mut self, now: Instant, cause: &str) -> bool {
        self.down(now);
        let new = self.cause.as_deref() != Some(cause);
        self.cause = Some(cause.to_string());
        if new || !self.cause_reported {
            self.cause_reported = true;
            true
        } else {
            false
        }
    }

    /// The reminder due at `now`, if any; the next one comes twice as late.
    pub fn due(&mut self, now: Instant) -> Option<Reminder> {
        let since = self.down_since?;
        if now < self.next_reminder? {
            return None;
        }
        let next_in = self.interval.saturating_mul(2).min(MAX_REMINDER);
        self.interval = next_in;
        self.next_reminder = Some(now + next_in);
        Some(Reminder {
            down_for: now.saturating_duration_since(since),
            cause: self.cause.clone(),
            next_in,
        })
    }

    /// Connected: how long the GIS was out of reach, if it was.
    pub fn up(&mut self, now: Instant) -> Option<Duration> {
        let since = self.down_since.take()?;
        self.next_reminder = None;
        self.cause = None;
        Some(now.saturating_duration_since(since))
    }
}

/// Why a dial failed, in an operator's words: the innermost cause of each attempt (e.g.
/// "Connection refused (os error 111)") instead of libp2p's nested wrappers, and a peer id
/// mismatch named as such.
pub fn dial_cause(e: &DialError) -> String {
    match e {
        DialError::WrongPeerId { obtained, address } => format!(
            "the peer at {address} is {obtained}, not the GIS named in --gis (wrong /p2p/ part, \
             or another process on that port)"
        ),
        DialError::Transport(errors) => {
            let mut causes: Vec<String> = errors
                .iter()
                .map(|(_, e)| match e {
                    TransportError::MultiaddrNotSupported(a) => {
                        format!("address {a} is not supported (use /ip4|ip6|dns/…/tcp/…)")
                    }
                    TransportError::Other(io) => innermost(io),
                })
                .collect();
            causes.dedup();
            if causes.is_empty() {
                e.to_string()
            } else {
                causes.join("; ")
            }
        }
        other => other.to_string(),
    }
}

fn innermost(io: &std::io::Error) -> String {
    let mut e: &(dyn std::error::Error + 'static) = io;
    for _ in 0..16 {
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            e = inner;
        } else if let Some(s) = e.source() {
            e = s;
        } else {
            break;
        }
    }
    let s = e.to_string();
    if s.trim().is_empty() {
        io.to_string()
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_failure_at_once_then_reminders_with_backoff() {
        let t0 = Instant::now();
        let mut w = GisWatch::default();
        w.down(t0);
        assert_eq!(w.due(t0 + Duration::from_secs(1)), None);
        assert!(w.dial_failed(t0, "Connection refused"));
        // The same cause again is not repeated at every redial.
        assert!(!w.dial_failed(t0 + Duration::from_millis(300), "Connection refused"));
        let r = w.due(t0 + FIRST_REMINDER).expect("a reminder at 5 s");
        assert_eq!(r.cause.as_deref(), Some("Connection refused"));
        assert_eq!(r.next_in, Duration::from_secs(10));
        assert_eq!(w.due(t0 + Duration::from_secs(14)), None);
        assert!(w.due(t0 + Duration::from_secs(15)).is_some());
        // A new cause is reported at once.
        assert!(w.dial_failed(t0 + Duration::from_secs(16), "Timeout"));
        // Reminders never come further apart than MAX_REMINDER.
        let mut t = t0 + Duration::from_secs(16);
        for _ in 0..20 {
            t += MAX_REMINDER;
            let r = w.due(t).expect("a reminder");
            assert!(r.next_in <= MAX_REMINDER);
        }
        assert_eq!(
            w.up(t + Duration::from_secs(1)),
            Some(t + Duration::from_secs(1) - t0)
        );
        assert_eq!(w.due(t + MAX_REMINDER * 2), None);
    }

    #[test]
    fn a_hanging_first_dial_is_reported_within_five_seconds() {
        let t0 = Instant::now();
        let mut w = GisWatch::default();
        w.down(t0);
        let r = w.due(t0 + FIRST_REMINDER).expect("reminder");
        assert_eq!(r.cause, None);
        assert_eq!(r.down_for, FIRST_REMINDER);
    }
}
