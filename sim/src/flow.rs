//! A flow-level network: links with a capacity, transfers (flows) that each cross a few of
//! them, and rates shared max-min fairly (progressive filling: every flow grows at the same
//! pace until a link it crosses is full; the flows of that link keep that rate, the others
//! grow on). Time is a number of seconds the caller advances; nothing here reads a clock,
//! so the same calls give the same answers.
//!
//! A transfer is modelled as a fluid: it moves its bytes at its current rate, and the rates
//! change only when a flow starts, ends or is cancelled. That is what a TCP connection
//! averages to over a few round trips, and it lets 10,000 hosts be simulated without a
//! packet each. Every change shares all rates again (progressive filling over every link);
//! at 10,000 hosts the simulator will want to share only the flows a change can reach.

use std::collections::BTreeMap;

/// A link (a host's LAN up or down direction, an IDC's WAN up or down direction).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LinkId(pub u32);

/// A transfer in progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FlowId(pub u64);

/// Bytes left below this count as done (rounding of rate × time).
const DONE_EPSILON: f64 = 1e-6;

#[derive(Debug)]
struct Flow {
    links: Vec<LinkId>,
    /// Bytes still to move.
    left: f64,
    /// Bytes per second, as last shared.
    rate: f64,
}

/// The network's links and the flows crossing them.
#[derive(Debug, Default)]
pub struct FlowNet {
    /// Capacity of each link in bytes per second (`f64::INFINITY`: unlimited).
    capacity: Vec<f64>,
    flows: BTreeMap<FlowId, Flow>,
    next_id: u64,
    /// The time the flows' progress is counted to.
    now: f64,
}

impl FlowNet {
    pub fn new() -> Self {
        FlowNet::default()
    }

    /// A link of `bytes_per_s` (0 or less: unlimited).
    pub fn add_link(&mut self, bytes_per_s: f64) -> LinkId {
        let cap = if bytes_per_s > 0.0 {
            bytes_per_s
        } else {
            f64::INFINITY
        };
        self.capacity.push(cap);
        LinkId((self.capacity.len() - 1) as u32)
    }

    /// The time progress is counted to.
    pub fn now(&self) -> f64 {
        self.now
    }

    /// Flows in progress.
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// The current rate of a flow, in bytes per second.
    pub fn rate(&self, id: FlowId) -> Option<f64> {
        self.flows.get(&id).map(|f| f.rate)
    }

    /// Bytes a flow still has to move (as of `now`).
    pub fn left(&self, id: FlowId) -> Option<f64> {
        self.flows.get(&id).map(|f| f.left)
    }

    /// Starts a transfer of `bytes` over `links` at `at` (not before `now`); the rates of
    /// every flow are shared again. A transfer over no link, or of nothing, ends at the
    /// next `advance`.
    pub fn start(&mut self, at: f64, links: &[LinkId], bytes: u64) -> FlowId {
        self.progress_to(at);
        let id = FlowId(self.next_id);
        self.next_id += 1;
        let mut links = links.to_vec();
        links.sort_unstable();
        links.dedup();
        self.flows.insert(
            id,
            Flow {
                links,
                left: bytes as f64,
                rate: 0.0,
            },
        );
        self.share();
        id
    }

    /// Stops a flow at `at` (its peer went away); the others share again. Returns the bytes
    /// it had left.
    pub fn cancel(&mut self, at: f64, id: FlowId) -> Option<f64> {
        self.progress_to(at);
        let f = self.flows.remove(&id)?;
        self.share();
        Some(f.left)
    }

    /// When the next flow ends at the current rates, and which (the lowest id on a tie).
    pub fn next_end(&self) -> Option<(f64, FlowId)> {
        let mut best: Option<(f64, FlowId)> = None;
        for (&id, f) in &self.flows {
            let t = if f.left <= DONE_EPSILON {
                self.now
            } else if f.rate > 0.0 {
                self.now + f.left / f.rate
            } else {
                continue;
            };
            if best.is_none_or(|(bt, _)| t < bt) {
                best = Some((t, id));
            }
        }
        best
    }

    /// Moves time to `to`: every flow progresses at its rate; the flows done by then are
    /// removed and returned (in id order), and the rest share again.
    pub fn advance(&mut self, to: f64) -> Vec<FlowId> {
        self.progress_to(to);
        let done: Vec<FlowId> = self
            .flows
            .iter()
            .filter(|(_, f)| f.left <= DONE_EPSILON)
            .map(|(&id, _)| id)
            .collect();
        if !done.is_empty() {
            for id in &done {
                self.flows.remove(id);
            }
            self.share();
        }
        done
    }

    fn progress_to(&mut self, to: f64) {
        let dt = to - self.now;
        if dt <= 0.0 {
            return;
        }
        for f in self.flows.values_mut() {
            if f.rate.is_finite() {
                f.left = (f.left - f.rate * dt).max(0.0);
            } else {
                f.left = 0.0;
            }
        }
        self.now = to;
    }

    /// Max-min fair rates by progressive filling.
    fn share(&mut self) {
        let n_links = self.capacity.len();
        let mut residual = self.capacity.clone();
        let mut crossing = vec![0usize; n_links];
        let mut unfrozen: Vec<FlowId> = Vec::with_capacity(self.flows.len());
        for (&id, f) in self.flows.iter_mut() {
            if f.links
                .iter()
                .all(|l| self.capacity[l.0 as usize].is_infinite())
            {
                // Crosses no limited link: done as soon as it starts.
                f.rate = f64::INFINITY;
                f.left = 0.0;
                continue;
            }
            f.rate = 0.0;
            for l in &f.links {
                crossing[l.0 as usize] += 1;
            }
            unfrozen.push(id);
        }
        while !unfrozen.is_empty() {
            // The link that fills first: the least residual per unfrozen flow.
            let mut fair = f64::INFINITY;
            for (l, &n) in crossing.iter().enumerate() {
                if n > 0 && residual[l].is_finite() {
                    fair = fair.min(residual[l] / n as f64);
                }
            }
            if !fair.is_finite() {
                break;
            }
            let fair = fair.max(0.0);
            // Every unfrozen flow grows by `fair`; those on a link now full freeze.
            let mut still = Vec::with_capacity(unfrozen.len());
            for &id in &unfrozen {
                if let Some(f) = self.flows.get_mut(&id) {
                    f.rate += fair;
                }
            }
            for (l, &n) in crossing.iter().enumerate() {
                if n > 0 && residual[l].is_finite() {
                    residual[l] -= fair * n as f64;
                }
            }
            for &id in &unfrozen {
                let Some(f) = self.flows.get(&id) else {
                    continue;
                };
                let full = f.links.iter().any(|l| {
                    let l = l.0 as usize;
                    residual[l].is_finite() && residual[l] <= 1e-9 * self.capacity[l].max(1.0)
                });
                if full {
                    for l in &f.links {
                        crossing[l.0 as usize] -= 1;
                    }
                } else {
                    still.push(id);
                }
            }
            if still.len() == unfrozen.len() {
                // Rounding left no link exactly full: nothing more to share.
                break;
            }
            unfrozen = still;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-6 * b.abs().max(1.0)
    }

    #[test]
    fn flows_on_one_link_share_it_equally_and_speed_up_when_one_ends() {
        let mut n = FlowNet::new();
        let l = n.add_link(100.0);
        let a = n.start(0.0, &[l], 100);
        let b = n.start(0.0, &[l], 300);
        assert!(close(n.rate(a).unwrap(), 50.0) && close(n.rate(b).unwrap(), 50.0));
        let (t, first) = n.next_end().unwrap();
        assert_eq!(first, a);
        assert!(close(t, 2.0));
        assert_eq!(n.advance(t), vec![a]);
        // b moved 100 of 300 bytes; alone now at 100 B/s: 2 s more.
        assert!(close(n.rate(b).unwrap(), 100.0));
        let (t, _) = n.next_end().unwrap();
        assert!(close(t, 4.0));
        assert_eq!(n.advance(t), vec![b]);
        assert!(n.is_empty());
    }

    #[test]
    fn a_flow_held_back_elsewhere_leaves_its_share_to_the_others() {
        // The textbook case: a crosses links 1 (10) and 2 (100), b only link 2.
        let mut n = FlowNet::new();
        let narrow = n.add_link(10.0);
        let wide = n.add_link(100.0);
        let a = n.start(0.0, &[narrow, wide], 1000);
        let b = n.start(0.0, &[wide], 1000);
        assert!(close(n.rate(a).unwrap(), 10.0));
        assert!(close(n.rate(b).unwrap(), 90.0));
        // A third flow on the narrow link halves a and gives b more.
        let c = n.start(1.0, &[narrow], 1000);
        assert!(close(n.rate(a).unwrap(), 5.0));
        assert!(close(n.rate(c).unwrap(), 5.0));
        assert!(close(n.rate(b).unwrap(), 95.0));
        assert!(close(n.left(a).unwrap(), 990.0));
        // Cancelled: the others share again.
        assert!(close(n.cancel(1.0, c).unwrap(), 1000.0));
        assert!(close(n.rate(a).unwrap(), 10.0));
    }

    #[test]
    fn unlimited_links_and_empty_transfers_end_at_once() {
        let mut n = FlowNet::new();
        let free = n.add_link(0.0);
        let a = n.start(0.0, &[free], 1 << 30);
        let b = n.start(0.0, &[], 0);
        assert_eq!(n.next_end().map(|(t, _)| t), Some(0.0));
        assert_eq!(n.advance(0.0), vec![a, b]);
    }

    proptest! {
        /// Whatever the flows, no link carries more than its capacity, every flow that
        /// crosses a limited link gets a positive rate, and each flow is held back by a
        /// full link on which no other flow is faster (max-min fairness).
        #[test]
        fn shares_are_feasible_and_max_min_fair(
            caps in proptest::collection::vec(1.0f64..1000.0, 1..6),
            flows in proptest::collection::vec(
                (proptest::collection::vec(0usize..6, 1..4), 1u64..10_000), 1..12),
        ) {
            let mut n = FlowNet::new();
            let links: Vec<LinkId> = caps.iter().map(|&c| n.add_link(c)).collect();
            let mut ids = Vec::new();
            for (ls, bytes) in &flows {
                let ls: Vec<LinkId> = ls.iter().map(|&i| links[i % links.len()]).collect();
                ids.push((n.start(0.0, &ls, *bytes), ls));
            }
            let mut load = vec![0.0; caps.len()];
            for (id, ls) in &ids {
                let r = n.rate(*id).unwrap();
                prop_assert!(r > 0.0);
                let mut ls = ls.clone();
                ls.sort_unstable();
                ls.dedup();
                for l in ls {
                    load[l.0 as usize] += r;
                }
            }
            for (l, &c) in caps.iter().enumerate() {
                prop_assert!(load[l] <= c * (1.0 + 1e-9), "link {} carries {} > {}", l, load[l], c);
            }
            for (id, ls) in &ids {
                let r = n.rate(*id).unwrap();
                let bottleneck = ls.iter().any(|l| {
                    let l = l.0 as usize;
                    let full = load[l] >= caps[l] * (1.0 - 1e-6);
                    let fastest = ids
                        .iter()
                        .filter(|(_, other)| other.contains(&LinkId(l as u32)))
                        .all(|(o, _)| n.rate(*o).unwrap() <= r * (1.0 + 1e-6));
                    full && fastest
                });
                prop_assert!(bottleneck, "flow {:?} at {} has no bottleneck", id, r);
            }
        }
    }
}
