//! The console's memory of the past: WAN and LAN bytes per IDC over time and provision times,
//! built from periodic snapshots of what the GIS reports. Pure: the sampler task in `server`
//! feeds it snapshots and timestamps; the charts in the pages read it through `/api/stats`.
//!
//! Hosts report counters since they started, so a restarted host's counters fall back to
//! zero; the history adds only increases per host and so its per-IDC sums never go down.
//! Provision times are the hosts' own measures (download start to verified completion); the
//! history keeps each one once, also after the host removed the image.

use bids_protocols::gis::Counters;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

/// One host in a snapshot.
#[derive(Clone, Debug)]
pub struct HostSample {
    pub peer: String,
    pub idc: String,
    pub counters: Counters,
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
    /// Keys of `provisions`, so a download reported again in every sample is kept once.
    known: HashSet<(String, String, i64)>,
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
            known: HashSet::new(),
        }
    }

    /// Adds one snapshot taken at `t_ms`: the hosts' counters and the provision times they
    /// report now.
    pub fn record(&mut self, t_ms: i64, hosts: &[HostSample], provisions: &[Provision]) {
        for h in hosts {
            let before = self.last.get(&h.peer).copied().unwrap_or_default();
            let c = &h.counters;
            let a = self.acc.entry(h.idc.clone()).or_default();
            a.wan_in += increase(c.wan_recv_bytes, before.wan_recv_bytes);
            a.wan_out += increase(c.wan_sent_bytes, before.wan_sent_bytes);
            a.lan += increase(c.lan_recv_bytes, before.lan_recv_bytes);
            self.last.insert(h.peer.clone(), *c);
        }
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
}
