//! The console's memory of the past: WAN and LAN bytes per IDC over time and provision times,
//! built from periodic snapshots of what the GIS reports. Pure: the sampler task in `server`
//! feeds it snapshots and timestamps; the charts in the pages read it through `/api/stats`.
//!
//! Hosts report counters since they started, so a restarted host's counters fall back to
//! zero; the history adds only increases per host and so its per-IDC sums never go down.
//! Provision times are the hosts' own measures (download start to verified completion); the
//! history keeps each one once, also after the host removed the image.
//!
//! Rates (bytes/s per host, per IDC and per download) are taken over a sliding window of
//! [`RATE_WINDOW_MS`], wider than a node's heartbeat period, so a rate does not swing between
//! zero and a burst with each heartbeat. Role changes (a bridgehead demoted because its
//! certificate expired, was revoked or dropped; a host promoted) are kept as events, because
//! the GIS forgets an expired certificate once the node registers again without it.

use bids_protocols::admin::CertStatus;
use bids_protocols::gis::Counters;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

/// Rates are measured over this much time (or what the history holds, when less).
pub const RATE_WINDOW_MS: i64 = 6_000;

/// A host's bridgehead certificate in a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CertSample {
    pub serial: u64,
    /// Unix seconds.
    pub not_after: i64,
    pub status: CertStatus,
}

/// One host in a snapshot.
#[derive(Clone, Debug)]
pub struct HostSample {
    pub peer: String,
    pub idc: String,
    pub counters: Counters,
    pub bridgehead: bool,
    pub cert: Option<CertSample>,
    /// Bytes received so far for each image (id) the host is downloading now.
    pub downloads: Vec<(String, u64)>,
}

/// Bytes/s a host moves, over the last [`RATE_WINDOW_MS`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct HostRates {
    pub wan_in_bps: f64,
    pub wan_out_bps: f64,
    pub lan_in_bps: f64,
    pub lan_out_bps: f64,
}

/// Bytes/s an IDC's hosts move, over the last [`RATE_WINDOW_MS`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct IdcRates {
    /// Entering the IDC over the WAN.
    pub wan_in_bps: f64,
    /// Leaving the IDC over the WAN.
    pub wan_out_bps: f64,
    /// Received from hosts of the same IDC.
    pub lan_bps: f64,
}

/// A host became a bridgehead or stopped being one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RoleEvent {
    /// Unix ms: when the console saw it, or the certificate's end for an expiry that happened
    /// before the console watched.
    pub t_ms: i64,
    pub peer: String,
    pub idc: String,
    /// `demoted` or `promoted`.
    pub change: String,
    /// For a demotion: `certificate expired`, `certificate revoked` or `certificate dropped`.
    pub reason: String,
    pub serial: Option<u64>,
    /// Unix seconds: the end of the certificate concerned.
    pub not_after: Option<i64>,
}

/// A point of a [`Window`]: unix ms and the value then.
type Point<T> = (i64, T);

/// Points `(t_ms, value)` spanning at most one rate window (plus the point just before it).
#[derive(Clone, Debug, Default)]
struct Window<T> {
    pts: VecDeque<Point<T>>,
}

impl<T> Window<T> {
    fn push(&mut self, t_ms: i64, v: T) {
        self.pts.push_back((t_ms, v));
        // Keep the newest point at or before the window's start, drop older ones.
        while self.pts.len() > 2 && self.pts[1].0 <= t_ms - RATE_WINDOW_MS {
            self.pts.pop_front();
        }
    }

    /// Oldest and newest point, if they are apart in time.
    fn span(&self) -> Option<(&Point<T>, &Point<T>)> {
        let (a, b) = (self.pts.front()?, self.pts.back()?);
        (b.0 > a.0).then_some((a, b))
    }
}

fn per_s(a: u64, b: u64, dt_ms: i64) -> f64 {
    b.saturating_sub(a) as f64 * 1000.0 / dt_ms as f64
}

/// What the history remembers of one host between snapshots.
#[derive(Clone, Debug, Default)]
struct HostMemory {
    last: Counters,
    rates: Window<Counters>,
    bridgehead: bool,
    cert: Option<CertSample>,
}

/// Bytes an IDC's hosts moved, accumulated since the console started watching.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct IdcBytes {
    /// Received from other IDCs (what crosses the WAN into the IDC).
    pub wan_in: u64,
    /// Sent to other IDCs.
    pub wan_out: u64,
    /// Received from hosts of the same IDC.
    pub lan: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Sample {
    pub t_ms: i64,
    pub idcs: BTreeMap<String, IdcBytes>,
}

/// A host downloaded an image: how long it took, as the host measured it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Provision {
    pub peer: String,
    pub idc: String,
    /// `name:version` (the id when the GIS no longer knows the image).
    pub image: String,
    /// Image id (hex).
    pub id: String,
    /// Unix ms when the download started (`completed_ms` minus its duration).
    pub started_ms: i64,
    /// Unix ms when its last chunk was verified and stored.
    pub completed_ms: i64,
    /// From the start of the download to its verified completion.
    pub seconds: f64,
}

impl Provision {
    /// One download: the same host, image and completion time.
    fn key(&self) -> (String, String, i64) {
        (self.peer.clone(), self.id.clone(), self.completed_ms)
    }
}

/// What `/api/stats` shows of the history.
#[derive(Clone, Debug, Serialize)]
pub struct HistoryView {
    pub interval_ms: u64,
    pub samples: Vec<Sample>,
    pub provisions: Vec<Provision>,
    /// Role changes seen since the console started, oldest first (bounded).
    pub events: Vec<RoleEvent>,
}

pub struct History {
    interval_ms: u64,
    max_samples: usize,
    max_provisions: usize,
    samples: VecDeque<Sample>,
    provisions: VecDeque<Provision>,
    /// Last counters, rate window and role seen per host.
    hosts: HashMap<String, HostMemory>,
    acc: BTreeMap<String, IdcBytes>,
    /// Keys of `provisions`, so a download reported again in every sample is kept once.
    known: HashSet<(String, String, i64)>,
    /// Bytes received per (host, image id) download in progress.
    downloads: HashMap<(String, String), Window<u64>>,
    events: VecDeque<RoleEvent>,
    max_events: usize,
}

/// Why a bridgehead seen with `before` is an ordinary host at `t_ms` with `now`.
fn demotion_reason(before: Option<CertSample>, now: Option<CertSample>, t_ms: i64) -> &'static str {
    match now.map(|c| c.status) {
        Some(CertStatus::Expired) => "certificate expired",
        Some(CertStatus::Revoked) => "certificate revoked",
        Some(CertStatus::NotYetValid) => "certificate not yet valid",
        _ => match before {
            Some(b) if b.not_after.saturating_mul(1000) <= t_ms => "certificate expired",
            _ => "certificate dropped",
        },
    }
}

fn increase(now: u64, before: u64) -> u64 {
    // A drop means the host restarted and counts from zero again.
    if now >= before {
        now - before
    } else {
        now
    }
}

impl History {
    pub fn new(interval_ms: u64, max_samples: usize, max_provisions: usize) -> Self {
        History {
            interval_ms,
            max_samples: max_samples.max(1),
            max_provisions: max_provisions.max(1),
            samples: VecDeque::new(),
            provisions: VecDeque::new(),
            hosts: HashMap::new(),
            acc: BTreeMap::new(),
            known: HashSet::new(),
            downloads: HashMap::new(),
            events: VecDeque::new(),
            max_events: 1000,
        }
    }

    fn event(&mut self, e: RoleEvent) {
        if self.events.len() == self.max_events {
            self.events.pop_front();
        }
        self.events.push_back(e);
    }

    /// Notes a host's role change since the last snapshot.
    fn role_change(&mut self, t_ms: i64, h: &HostSample, seen: Option<&HostMemory>) {
        let ev = |change: &str, reason: &str, at: i64, c: Option<CertSample>| RoleEvent {
            t_ms: at,
            peer: h.peer.clone(),
            idc: h.idc.clone(),
            change: change.into(),
            reason: reason.into(),
            serial: c.map(|c| c.serial),
            not_after: c.map(|c| c.not_after),
        };
        match seen {
            Some(m) if m.bridgehead && !h.bridgehead => {
                let reason = demotion_reason(m.cert, h.cert, t_ms);
                self.event(ev("demoted", reason, t_ms, h.cert.or(m.cert)));
            }
            Some(m) if !m.bridgehead && h.bridgehead => {
                self.event(ev("promoted", "certificate granted", t_ms, h.cert));
            }
            Some(_) => {}
            // First seen with an expired certificate: it was demoted when that ended.
            None => {
                if let Some(c) = h.cert.filter(|c| c.status == CertStatus::Expired) {
                    let at = c.not_after.saturating_mul(1000);
                    self.event(ev("demoted", "certificate expired", at, Some(c)));
                }
            }
        }
    }

    /// Adds one snapshot taken at `t_ms`: the hosts' counters and the provision times they
    /// report now.
    pub fn record(&mut self, t_ms: i64, hosts: &[HostSample], provisions: &[Provision]) {
        let mut live_downloads = HashSet::new();
        for h in hosts {
            let seen = self.hosts.remove(&h.peer);
            self.role_change(t_ms, h, seen.as_ref());
            let mut m = seen.unwrap_or_default();
            let (before, c) = (m.last, h.counters);
            let a = self.acc.entry(h.idc.clone()).or_default();
            a.wan_in += increase(c.wan_recv_bytes, before.wan_recv_bytes);
            a.wan_out += increase(c.wan_sent_bytes, before.wan_sent_bytes);
            a.lan += increase(c.lan_recv_bytes, before.lan_recv_bytes);
            let restarted = c.wan_recv_bytes < before.wan_recv_bytes
                || c.wan_sent_bytes < before.wan_sent_bytes
                || c.lan_recv_bytes < before.lan_recv_bytes
                || c.lan_sent_bytes < before.lan_sent_bytes;
            if restarted {
                m.rates = Window::default();
            }
            m.rates.push(t_ms, c);
            m.last = c;
            m.bridgehead = h.bridgehead;
            m.cert = h.cert;
            self.hosts.insert(h.peer.clone(), m);
            for (id, got) in &h.downloads {
                let key = (h.peer.clone(), id.clone());
                let w = self.downloads.entry(key.clone()).or_default();
                if w.pts.back().is_some_and(|(_, v)| v > got) {
                    *w = Window::default();
                }
                w.push(t_ms, *got);
                live_downloads.insert(key);
            }
        }
        self.downloads.retain(|k, _| live_downloads.contains(k));
        let mut fresh: Vec<&Provision> = provisions
            .iter()
            .filter(|p| !self.known.contains(&p.key()))
            .collect();
        fresh.sort_by_key(|p| p.completed_ms);
        for p in fresh {
            if self.known.contains(&p.key()) {
                continue;
            }
            if self.provisions.len() == self.max_provisions {
                // Older than everything kept: it was dropped before (or would be at once).
                if self
                    .provisions
                    .front()
                    .is_some_and(|f| p.completed_ms < f.completed_ms)
                {
                    continue;
                }
                if let Some(old) = self.provisions.pop_front() {
                    self.known.remove(&old.key());
                }
            }
            self.known.insert(p.key());
            self.provisions.push_back(p.clone());
        }
        if self.samples.len() == self.max_samples {
            self.samples.pop_front();
        }
        self.samples.push_back(Sample {
            t_ms,
            idcs: self.acc.clone(),
        });
    }

    pub fn view(&self) -> HistoryView {
        HistoryView {
            interval_ms: self.interval_ms,
            samples: self.samples.iter().cloned().collect(),
            provisions: self.provisions.iter().cloned().collect(),
            events: self.events.iter().cloned().collect(),
        }
    }

    pub fn latest(&self) -> Option<&Sample> {
        self.samples.back()
    }

    /// A host's rates over the last window; `None` until two snapshots apart in time.
    pub fn host_rates(&self, peer: &str) -> Option<HostRates> {
        let ((t0, a), (t1, b)) = self.hosts.get(peer)?.rates.span()?;
        let dt = t1 - t0;
        Some(HostRates {
            wan_in_bps: per_s(a.wan_recv_bytes, b.wan_recv_bytes, dt),
            wan_out_bps: per_s(a.wan_sent_bytes, b.wan_sent_bytes, dt),
            lan_in_bps: per_s(a.lan_recv_bytes, b.lan_recv_bytes, dt),
            lan_out_bps: per_s(a.lan_sent_bytes, b.lan_sent_bytes, dt),
        })
    }

    /// Each IDC's rates over the last window of samples.
    pub fn idc_rates(&self) -> BTreeMap<String, IdcRates> {
        let Some(last) = self.samples.back() else {
            return BTreeMap::new();
        };
        let first = self
            .samples
            .iter()
            .rev()
            .find(|s| s.t_ms <= last.t_ms - RATE_WINDOW_MS)
            .or(self.samples.front())
            .unwrap_or(last);
        let dt = last.t_ms - first.t_ms;
        last.idcs
            .iter()
            .map(|(idc, b)| {
                let a = first.idcs.get(idc).copied().unwrap_or_default();
                let r = if dt > 0 {
                    IdcRates {
                        wan_in_bps: per_s(a.wan_in, b.wan_in, dt),
                        wan_out_bps: per_s(a.wan_out, b.wan_out, dt),
                        lan_bps: per_s(a.lan, b.lan, dt),
                    }
                } else {
                    IdcRates::default()
                };
                (idc.clone(), r)
            })
            .collect()
    }

    /// Bytes/s a host receives for an image it is downloading, over the last window.
    pub fn download_rate(&self, peer: &str, id: &str) -> Option<f64> {
        let w = self.downloads.get(&(peer.to_string(), id.to_string()))?;
        let ((t0, a), (t1, b)) = w.span()?;
        Some(per_s(*a, *b, t1 - t0))
    }

    /// The last time each host was demoted, if it ever was while watched.
    pub fn last_demotion(&self, peer: &str) -> Option<&RoleEvent> {
        self.events
            .iter()
            .rev()
            .find(|e| e.peer == peer && e.change == "demoted")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(peer: &str, idc: &str, wan_in: u64, lan: u64) -> HostSample {
        HostSample {
            peer: peer.into(),
            idc: idc.into(),
            counters: Counters {
                wan_recv_bytes: wan_in,
                lan_recv_bytes: lan,
                ..Counters::default()
            },
            bridgehead: false,
            cert: None,
            downloads: Vec::new(),
        }
    }

    fn provision(peer: &str, id: &str, millis: i64, completed_ms: i64) -> Provision {
        Provision {
            peer: peer.into(),
            idc: "B".into(),
            image: format!("img:{id}"),
            id: id.into(),
            started_ms: completed_ms - millis,
            completed_ms,
            seconds: millis as f64 / 1000.0,
        }
    }

    #[test]
    fn per_idc_bytes_accumulate_and_survive_a_restart() {
        let mut h = History::new(1000, 10, 10);
        h.record(0, &[host("p1", "B", 100, 10), host("p2", "B", 0, 5)], &[]);
        h.record(
            1000,
            &[host("p1", "B", 300, 10), host("p2", "B", 0, 25)],
            &[],
        );
        assert_eq!(
            h.latest().unwrap().idcs["B"],
            IdcBytes {
                wan_in: 300,
                wan_out: 0,
                lan: 35
            }
        );
        // p1 restarted: its counter fell to 50; the IDC's total still grows by 50.
        h.record(
            2000,
            &[host("p1", "B", 50, 10), host("p2", "B", 0, 25)],
            &[],
        );
        assert_eq!(h.latest().unwrap().idcs["B"].wan_in, 350);
        let v = h.view();
        assert_eq!(v.samples.len(), 3);
        assert!(v
            .samples
            .windows(2)
            .all(|w| w[0].idcs["B"].wan_in <= w[1].idcs["B"].wan_in));
    }

    #[test]
    fn samples_are_bounded() {
        let mut h = History::new(1000, 3, 10);
        for t in 0..10 {
            h.record(t * 1000, &[host("p", "A", t as u64, 0)], &[]);
        }
        let v = h.view();
        assert_eq!(v.samples.len(), 3);
        assert_eq!(v.samples[0].t_ms, 7000);
    }

    #[test]
    fn reported_provisions_are_kept_once_in_completion_order() {
        let mut h = History::new(500, 10, 10);
        let p1 = provision("p", "1", 2500, 4000);
        let q1 = provision("q", "1", 700, 3000);
        h.record(4000, &[], &[p1.clone(), q1.clone()]);
        // Reported again in later samples, and gone once the host removed the image.
        h.record(4500, &[], &[p1.clone(), q1.clone()]);
        h.record(5000, &[], std::slice::from_ref(&q1));
        let v = h.view();
        assert_eq!(v.provisions, vec![q1.clone(), p1.clone()]);
        assert_eq!(v.provisions[1].seconds, 2.5);
        // The same image downloaded again later is another provision.
        let p1_again = provision("p", "1", 900, 9000);
        h.record(9000, &[], &[p1_again.clone(), q1]);
        assert_eq!(h.view().provisions.last(), Some(&p1_again));
        assert_eq!(h.view().provisions.len(), 3);
    }

    #[test]
    fn provisions_are_bounded() {
        let mut h = History::new(500, 10, 2);
        let all: Vec<Provision> = (0..5)
            .map(|k| provision("p", &k.to_string(), 10, k))
            .collect();
        h.record(0, &[], &all);
        let v = h.view();
        assert_eq!(v.provisions.len(), 2);
        assert_eq!(v.provisions[1].id, "4");
        // Still reported: the dropped ones do not come back.
        h.record(500, &[], &all);
        assert_eq!(h.view().provisions.len(), 2);
    }

    fn bridgehead(peer: &str, cert: Option<CertSample>, on: bool) -> HostSample {
        HostSample {
            bridgehead: on,
            cert,
            ..host(peer, "B", 0, 0)
        }
    }

    #[test]
    fn rates_span_the_window_and_restart_after_a_counter_drop() {
        let mut h = History::new(500, 100, 10);
        // 1 MB/s of WAN in, reported in 2-second steps (the heartbeat) while sampled twice
        // a second: the rate over the window stays near 1 MB/s instead of jumping.
        for k in 0..=20i64 {
            let got = (k / 4 * 2_000_000) as u64;
            h.record(k * 500, &[host("p", "B", got, 0)], &[]);
        }
        let r = h.host_rates("p").unwrap();
        assert!((r.wan_in_bps - 1_000_000.0).abs() < 200_000.0, "{r:?}");
        let i = h.idc_rates()["B"];
        assert!((i.wan_in_bps - 1_000_000.0).abs() < 200_000.0, "{i:?}");
        assert_eq!(i.lan_bps, 0.0);
        // The host restarted: no rate until it has two samples again, never a negative one.
        h.record(10_500, &[host("p", "B", 100, 0)], &[]);
        assert!(h.host_rates("p").is_none());
        h.record(11_500, &[host("p", "B", 1_100, 0)], &[]);
        assert_eq!(h.host_rates("p").unwrap().wan_in_bps, 1000.0);
    }

    #[test]
    fn download_rates_follow_the_bytes_received() {
        let mut h = History::new(500, 100, 10);
        let mut s = host("p", "B", 0, 0);
        for k in 0..5i64 {
            s.downloads = vec![("img".into(), (k * 250_000) as u64)];
            h.record(k * 500, std::slice::from_ref(&s), &[]);
        }
        assert_eq!(h.download_rate("p", "img"), Some(500_000.0));
        // Done: no longer listed, so forgotten.
        s.downloads.clear();
        h.record(3000, std::slice::from_ref(&s), &[]);
        assert_eq!(h.download_rate("p", "img"), None);
    }

    #[test]
    fn a_bridgehead_whose_certificate_ended_is_recorded_as_demoted() {
        let mut h = History::new(500, 10, 10);
        let valid = CertSample {
            serial: 7,
            not_after: 100,
            status: CertStatus::Valid,
        };
        h.record(90_000, &[bridgehead("db", Some(valid), true)], &[]);
        assert!(h.view().events.is_empty());
        // The node dropped its ended certificate and registered again as a host.
        h.record(101_000, &[bridgehead("db", None, false)], &[]);
        let e = h.last_demotion("db").unwrap();
        assert_eq!(
            (e.reason.as_str(), e.serial, e.t_ms),
            ("certificate expired", Some(7), 101_000)
        );
        // Promoted again with a new certificate, then demoted by the admin before its end.
        let fresh = CertSample {
            serial: 8,
            not_after: 10_000,
            status: CertStatus::Valid,
        };
        h.record(102_000, &[bridgehead("db", Some(fresh), true)], &[]);
        let revoked = CertSample {
            status: CertStatus::Revoked,
            ..fresh
        };
        h.record(103_000, &[bridgehead("db", Some(revoked), false)], &[]);
        let changes: Vec<_> = h
            .view()
            .events
            .iter()
            .map(|e| (e.change.clone(), e.reason.clone()))
            .collect();
        assert_eq!(
            changes,
            vec![
                ("demoted".into(), "certificate expired".into()),
                ("promoted".into(), "certificate granted".into()),
                ("demoted".into(), "certificate revoked".into()),
            ]
        );
        // Seen for the first time with an ended certificate: demoted when it ended.
        let ended = CertSample {
            serial: 3,
            not_after: 50,
            status: CertStatus::Expired,
        };
        h.record(104_000, &[bridgehead("old", Some(ended), false)], &[]);
        assert_eq!(h.last_demotion("old").unwrap().t_ms, 50_000);
    }
}
