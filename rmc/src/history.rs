//! The console's memory of the past: WAN and LAN bytes per IDC over time and provision times,
//! built from periodic snapshots of what the GIS reports. Pure: the sampler task in `server`
//! feeds it snapshots and timestamps; the charts in the pages read it through `/api/stats`.
//!
//! Hosts report counters since they started, so a restarted host's counters fall back to
//! zero; the history adds only increases per host and so its per-IDC sums never go down.

use bids_protocols::gis::Counters;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, VecDeque};

/// One host in a snapshot.
#[derive(Clone, Debug)]
pub struct HostSample {
    pub peer: String,
    pub idc: String,
    pub counters: Counters,
}

/// One (host, image) holding in a snapshot.
#[derive(Clone, Debug)]
pub struct HoldingSample {
    pub peer: String,
    pub idc: String,
    /// `name:version` of the image.
    pub image: String,
    pub complete: bool,
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

/// A host completed an image the console had seen it lacking.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Provision {
    pub peer: String,
    pub idc: String,
    pub image: String,
    /// When the console first saw the host fetching it.
    pub started_ms: i64,
    pub completed_ms: i64,
    /// `completed_ms - started_ms`, in seconds; accurate to one sampling interval.
    pub seconds: f64,
}

/// What `/api/stats` shows of the history.
#[derive(Clone, Debug, Serialize)]
pub struct HistoryView {
    pub interval_ms: u64,
    pub samples: Vec<Sample>,
    pub provisions: Vec<Provision>,
}

pub struct History {
    interval_ms: u64,
    max_samples: usize,
    max_provisions: usize,
    samples: VecDeque<Sample>,
    provisions: VecDeque<Provision>,
    /// Last counters seen per host, to add only increases.
    last: HashMap<String, Counters>,
    acc: BTreeMap<String, IdcBytes>,
    /// (peer, image) seen incomplete, with the time it was first seen so.
    pending: HashMap<(String, String), i64>,
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
            last: HashMap::new(),
            acc: BTreeMap::new(),
            pending: HashMap::new(),
        }
    }

    /// Adds one snapshot taken at `t_ms`.
    pub fn record(&mut self, t_ms: i64, hosts: &[HostSample], holdings: &[HoldingSample]) {
        for h in hosts {
            let before = self.last.get(&h.peer).copied().unwrap_or_default();
            let c = &h.counters;
            let a = self.acc.entry(h.idc.clone()).or_default();
            a.wan_in += increase(c.wan_recv_bytes, before.wan_recv_bytes);
            a.wan_out += increase(c.wan_sent_bytes, before.wan_sent_bytes);
            a.lan += increase(c.lan_recv_bytes, before.lan_recv_bytes);
            self.last.insert(h.peer.clone(), *c);
        }
        for h in holdings {
            let key = (h.peer.clone(), h.image.clone());
            if !h.complete {
                self.pending.entry(key).or_insert(t_ms);
            } else if let Some(started) = self.pending.remove(&key) {
                if self.provisions.len() == self.max_provisions {
                    self.provisions.pop_front();
                }
                self.provisions.push_back(Provision {
                    peer: h.peer.clone(),
                    idc: h.idc.clone(),
                    image: h.image.clone(),
                    started_ms: started,
                    completed_ms: t_ms,
                    seconds: (t_ms - started).max(0) as f64 / 1000.0,
                });
            }
        }
        // Holdings that vanished unfinished (removed, host gone) are not provisions.
        let seen: std::collections::HashSet<(&str, &str)> = holdings
            .iter()
            .map(|h| (h.peer.as_str(), h.image.as_str()))
            .collect();
        self.pending
            .retain(|(p, i), _| seen.contains(&(p.as_str(), i.as_str())));
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
        }
    }

    pub fn latest(&self) -> Option<&Sample> {
        self.samples.back()
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
        }
    }

    fn holding(peer: &str, image: &str, complete: bool) -> HoldingSample {
        HoldingSample {
            peer: peer.into(),
            idc: "B".into(),
            image: image.into(),
            complete,
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
    fn provision_time_runs_from_first_seen_fetching_to_complete() {
        let mut h = History::new(500, 10, 10);
        h.record(1000, &[], &[holding("p", "img:1", false)]);
        h.record(1500, &[], &[holding("p", "img:1", false)]);
        h.record(4000, &[], &[holding("p", "img:1", true)]);
        // Already complete when first seen: no provision (its start is unknown).
        h.record(
            4500,
            &[],
            &[holding("p", "img:1", true), holding("q", "img:1", true)],
        );
        let v = h.view();
        assert_eq!(v.provisions.len(), 1);
        assert_eq!(v.provisions[0].peer, "p");
        assert_eq!(v.provisions[0].seconds, 3.0);
    }

    #[test]
    fn vanished_unfinished_holdings_are_forgotten() {
        let mut h = History::new(500, 10, 10);
        h.record(0, &[], &[holding("p", "img:1", false)]);
        h.record(500, &[], &[]);
        h.record(9000, &[], &[holding("p", "img:1", true)]);
        assert!(h.view().provisions.is_empty());
    }
}
