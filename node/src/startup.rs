//! Where a download's first second goes: from the fetch being asked to the GIS's answer,
//! the first source ready (connected, hello accepted), the first chunk request and the first
//! byte of chunk data. Sans-IO: the engine passes the instants; each mark is taken once.

use serde::{Deserialize, Serialize};
use std::time::Instant;

/// The start-up of one download, as milliseconds since the fetch was asked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StartupReport {
    /// The GIS's host list (and the manifest) arrived.
    pub lookup_ms: Option<u64>,
    /// The first source could be asked for chunks (connected, hello accepted).
    pub first_source_ms: Option<u64>,
    /// The first chunk request left.
    pub first_request_ms: Option<u64>,
    /// The first chunk data arrived.
    pub first_byte_ms: Option<u64>,
}

impl std::fmt::Display for StartupReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |v: Option<u64>| v.map_or_else(|| "-".to_string(), |v| format!("{v} ms"));
        write!(
            f,
            "lookup {}, first source {}, first request {}, first byte {}",
            ms(self.lookup_ms),
            ms(self.first_source_ms),
            ms(self.first_request_ms),
            ms(self.first_byte_ms)
        )
    }
}

/// Marks the start-up milestones of one download.
#[derive(Clone, Debug)]
pub struct Startup {
    asked: Instant,
    report: StartupReport,
}

impl Startup {
    pub fn new(asked: Instant) -> Self {
        Self {
            asked,
            report: StartupReport::default(),
        }
    }

    fn since(&self, now: Instant) -> Option<u64> {
        Some(now.saturating_duration_since(self.asked).as_millis() as u64)
    }

    pub fn lookup_answered(&mut self, now: Instant) {
        if self.report.lookup_ms.is_none() {
            self.report.lookup_ms = self.since(now);
        }
    }

    pub fn source_ready(&mut self, now: Instant) {
        if self.report.first_source_ms.is_none() {
            self.report.first_source_ms = self.since(now);
        }
    }

    pub fn request_sent(&mut self, now: Instant) {
        if self.report.first_request_ms.is_none() {
            self.report.first_request_ms = self.since(now);
        }
    }

    /// Marks the first byte; true the first time only (when the start-up is complete).
    pub fn data_arrived(&mut self, now: Instant) -> bool {
        if self.report.first_byte_ms.is_some() {
            return false;
        }
        self.report.first_byte_ms = self.since(now);
        true
    }

    pub fn report(&self) -> StartupReport {
        self.report
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn each_milestone_is_taken_once_from_the_ask() {
        let t0 = Instant::now();
        let mut s = Startup::new(t0);
        s.lookup_answered(t0 + Duration::from_millis(12));
        s.lookup_answered(t0 + Duration::from_millis(900));
        s.source_ready(t0 + Duration::from_millis(30));
        s.request_sent(t0 + Duration::from_millis(31));
        s.request_sent(t0 + Duration::from_millis(500));
        assert!(s.data_arrived(t0 + Duration::from_millis(45)));
        assert!(!s.data_arrived(t0 + Duration::from_millis(60)));
        let r = s.report();
        assert_eq!(
            (
                r.lookup_ms,
                r.first_source_ms,
                r.first_request_ms,
                r.first_byte_ms
            ),
            (Some(12), Some(30), Some(31), Some(45))
        );
        assert_eq!(
            r.to_string(),
            "lookup 12 ms, first source 30 ms, first request 31 ms, first byte 45 ms"
        );
    }

    #[test]
    fn a_missing_milestone_shows_as_a_dash() {
        let s = Startup::new(Instant::now());
        assert_eq!(
            s.report().to_string(),
            "lookup -, first source -, first request -, first byte -"
        );
    }
}
