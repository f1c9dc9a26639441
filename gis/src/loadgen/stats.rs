//! What the load generator counts: latencies per request kind, errors by kind, and the CPU
//! and memory of processes read from `/proc`.

use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Duration;

/// The GIS requests a virtual host sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// Dial, noise and yamux.
    Connect,
    Register,
    Publish,
    Heartbeat,
    Lookup,
    /// A lookup from the moment the virtual host wrote it to its answer: `Lookup` less the
    /// time it waited in the generator (which falls behind when the machine is saturated).
    LookupSent,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Connect,
        Kind::Register,
        Kind::Publish,
        Kind::Heartbeat,
        Kind::Lookup,
        Kind::LookupSent,
    ];
    fn index(self) -> usize {
        self as usize
    }
    pub fn name(self) -> &'static str {
        match self {
            Kind::Connect => "connect",
            Kind::Register => "register",
            Kind::Publish => "publish",
            Kind::Heartbeat => "heartbeat",
            Kind::Lookup => "lookup",
            Kind::LookupSent => "lookup_sent",
        }
    }
}

/// Samples of one stretch of the run (registration, or one lookup rate).
#[derive(Default, Debug)]
pub struct Recorder {
    /// Microseconds of each successful request, per kind.
    latencies: [Vec<u32>; Kind::ALL.len()],
    pub errors: BTreeMap<String, u64>,
}

impl Recorder {
    pub fn ok(&mut self, kind: Kind, took: Duration) {
        let us = u32::try_from(took.as_micros()).unwrap_or(u32::MAX);
        self.latencies[kind.index()].push(us);
    }

    pub fn error(&mut self, what: impl Into<String>) {
        *self.errors.entry(what.into()).or_default() += 1;
    }

    pub fn count(&self, kind: Kind) -> usize {
        self.latencies[kind.index()].len()
    }

    pub fn summary(&mut self, kind: Kind) -> Latency {
        Latency::of(&mut self.latencies[kind.index()])
    }
}

/// Latency percentiles in milliseconds.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Latency {
    pub count: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    /// Nearest-rank percentiles of `us` (sorted in place).
    pub fn of(us: &mut [u32]) -> Latency {
        if us.is_empty() {
            return Latency::default();
        }
        us.sort_unstable();
        let at = |q: f64| {
            let rank = ((q * us.len() as f64).ceil() as usize).clamp(1, us.len());
            f64::from(us[rank - 1]) / 1000.0
        };
        Latency {
            count: us.len() as u64,
            p50_ms: at(0.50),
            p99_ms: at(0.99),
            p999_ms: at(0.999),
            max_ms: at(1.0),
        }
    }
}

/// CPU seconds (user + system) and memory of a process, from `/proc/<pid>`.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq)]
pub struct ProcSample {
    pub cpu_s: f64,
    pub rss_bytes: u64,
    /// The kernel's high-water mark of the resident set (VmHWM).
    pub peak_rss_bytes: u64,
}

/// Reads `/proc/<pid>` (`None`: this process). `None` if it is gone or unreadable.
pub fn proc_sample(pid: Option<u32>) -> Option<ProcSample> {
    let dir = match pid {
        Some(p) => format!("/proc/{p}"),
        None => "/proc/self".to_string(),
    };
    let stat = std::fs::read_to_string(format!("{dir}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at field 3.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ticks = if ticks > 0 { ticks as f64 } else { 100.0 };
    let status = std::fs::read_to_string(format!("{dir}/status")).ok()?;
    let kib = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(0, |k| k * 1024)
    };
    Some(ProcSample {
        cpu_s: (utime + stime) as f64 / ticks,
        rss_bytes: kib("VmRSS:"),
        peak_rss_bytes: kib("VmHWM:"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let mut v: Vec<u32> = (1..=1000).map(|x| x * 1000).collect();
        let l = Latency::of(&mut v);
        assert_eq!(l.count, 1000);
        assert_eq!(l.p50_ms, 500.0);
        assert_eq!(l.p99_ms, 990.0);
        assert_eq!(l.p999_ms, 999.0);
        assert_eq!(l.max_ms, 1000.0);
        assert_eq!(Latency::of(&mut []), Latency::default());
    }

    #[test]
    fn reads_its_own_process() {
        let s = proc_sample(None).expect("/proc/self");
        assert!(s.rss_bytes > 0 && s.peak_rss_bytes >= s.rss_bytes);
        assert!(s.cpu_s >= 0.0);
    }
}
