//! A flow-level network: links with a capacity, transfers (flows) that each cross a few of
//! them, and rates shared max-min fairly (water-filling: every flow grows at the same pace
//! until a link it crosses is full; the flows of that link keep that rate, the others grow
//! on). Time is a number of seconds the caller advances; nothing here reads a clock, so the
//! same calls give the same answers.
//!
//! A transfer is modelled as a fluid: it moves its bytes at its current rate, and the rates
//! change only when a flow starts, ends or is cancelled. That is what a TCP connection
//! averages to over a few round trips, and it lets thousands of hosts be simulated without a
//! packet each.
//!
//! Cost: a change shares again only the flows connected to it through common links (its
//! component), by water-filling with a heap of link fill levels (O(F log L) for F flows
//! over L links of the component). A flow's progress is kept as bytes left at a time and
//! brought up to date only when its rate changes; the next flow to end comes from a heap of
//! end times. With a quantum (`set_quantum`), changes that come within it of each other are
//! shared in one round: where thousands of transfers cross one component (bridgeheads of
//! many IDCs trading over the WAN), that is what keeps a run within minutes.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap, HashSet};

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
    /// Bytes still to move at `at`.
    left: f64,
    at: f64,
    /// Bytes per second, as last shared.
    rate: f64,
    /// Bumped at every new rate: older entries of the end heap are stale.
    version: u64,
    /// The sharing round that froze this flow's rate at `new_rate`.
    frozen_in: u64,
    new_rate: f64,
}

impl Flow {
    fn left_at(&self, t: f64) -> f64 {
        if self.rate.is_infinite() {
            return 0.0;
        }
        (self.left - self.rate * (t - self.at).max(0.0)).max(0.0)
    }

    fn end(&self) -> Option<f64> {
        if self.left <= DONE_EPSILON || self.rate.is_infinite() {
            Some(self.at)
        } else if self.rate > 0.0 {
            Some(self.at + self.left / self.rate)
        } else {
            None
        }
    }
}

/// An f64 ordered totally (end times are never NaN).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Time(f64);

impl Eq for Time {}

impl PartialOrd for Time {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Time {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// The network's links and the flows crossing them.
#[derive(Debug, Default)]
pub struct FlowNet {
    /// Capacity of each link in bytes per second (`f64::INFINITY`: unlimited).
    capacity: Vec<f64>,
    /// The flows crossing each link.
    on_link: Vec<Vec<FlowId>>,
    flows: HashMap<FlowId, Flow>,
    /// End times by flow, with the version they were computed for.
    ends: BinaryHeap<Reverse<(Time, FlowId, u64)>>,
    next_id: u64,
    /// The latest time the caller moved to.
    now: f64,
    /// Per link, reused by `share` (and left zeroed): capacity taken by frozen flows,
    /// unfrozen flows crossing it, whether the component search reached it.
    used: Vec<f64>,
    unfrozen: Vec<usize>,
    seen: Vec<bool>,
    /// Sharing rounds so far (marks the flows each round froze).
    round: u64,
    /// Changes within this many seconds of each other are shared once (0: at once).
    quantum: f64,
    /// Links whose flows changed since the rates were last shared, and new flows.
    pending: Vec<LinkId>,
    pending_new: Vec<FlowId>,
    /// When the pending changes are shared.
    due: Option<f64>,
}

impl FlowNet {
    pub fn new() -> Self {
        FlowNet::default()
    }

    /// Shares the rates again at most once per `seconds` (0, the default: at every change).
    /// Until then a new flow waits at rate 0 and what an ended flow freed stays unused: an
    /// error of about `seconds` per change, for far fewer sharing rounds when many flows
    /// start and end close together (each round costs the whole component).
    pub fn set_quantum(&mut self, seconds: f64) {
        self.quantum = seconds.max(0.0);
    }

    /// Shares now what changed on `seeds` (and new flow `extra`), or marks it for the
    /// next round.
    fn changed(&mut self, seeds: &[LinkId], extra: Option<FlowId>) {
        if self.quantum <= 0.0 {
            self.share(seeds, extra.as_slice());
            return;
        }
        if self.flows.is_empty() {
            // Nothing left to share.
            self.pending.clear();
            self.pending_new.clear();
            self.due = None;
            return;
        }
        self.pending.extend_from_slice(seeds);
        self.pending_new.extend(extra);
        if self.due.is_none() {
            self.due = Some(self.now + self.quantum);
        }
    }

    /// Shares the pending changes if they are due by `now`.
    fn share_due(&mut self) {
        if self.due.is_some_and(|d| d <= self.now) {
            self.due = None;
            // A new flow's links were marked when it started.
            let mut seeds = std::mem::take(&mut self.pending);
            let news = std::mem::take(&mut self.pending_new);
            seeds.sort_unstable();
            seeds.dedup();
            self.share(&seeds, &news);
        }
    }

    /// The time of the next change: a flow ending at the current rates, or a sharing round
    /// due.
    pub fn next_time(&mut self) -> Option<f64> {
        let end = self.next_end().map(|(t, _)| t);
        match (end, self.due) {
            (Some(e), Some(d)) => Some(e.min(d.max(self.now))),
            (e, d) => e.or(d.map(|d| d.max(self.now))),
        }
    }

    /// A link of `bytes_per_s` (0 or less: unlimited).
    pub fn add_link(&mut self, bytes_per_s: f64) -> LinkId {
        let cap = if bytes_per_s > 0.0 {
            bytes_per_s
        } else {
            f64::INFINITY
        };
        self.capacity.push(cap);
        self.on_link.push(Vec::new());
        self.used.push(0.0);
        self.unfrozen.push(0);
        self.seen.push(false);
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
        self.flows.get(&id).map(|f| f.left_at(self.now))
    }

    /// Starts a transfer of `bytes` over `links` at `at` (not before `now`); the flows it
    /// shares links with share again. A transfer over no limited link, or of nothing, ends
    /// at the next `advance`.
    pub fn start(&mut self, at: f64, links: &[LinkId], bytes: u64) -> FlowId {
        self.now = self.now.max(at);
        let id = FlowId(self.next_id);
        self.next_id += 1;
        let mut links = links.to_vec();
        links.sort_unstable();
        links.dedup();
        links.retain(|l| (l.0 as usize) < self.capacity.len());
        for l in &links {
            self.on_link[l.0 as usize].push(id);
        }
        let seeds = links.clone();
        self.flows.insert(
            id,
            Flow {
                links,
                left: bytes as f64,
                at: self.now,
                rate: 0.0,
                version: 0,
                frozen_in: 0,
                new_rate: 0.0,
            },
        );
        self.changed(&seeds, Some(id));
        id
    }

    /// Stops a flow at `at` (its peer went away); the flows it shared links with share
    /// again. Returns the bytes it had left.
    pub fn cancel(&mut self, at: f64, id: FlowId) -> Option<f64> {
        self.now = self.now.max(at);
        let f = self.remove(id)?;
        let left = f.left_at(self.now);
        self.changed(&f.links, None);
        Some(left)
    }

    fn remove(&mut self, id: FlowId) -> Option<Flow> {
        let f = self.flows.remove(&id)?;
        for l in &f.links {
            let on = &mut self.on_link[l.0 as usize];
            if let Some(k) = on.iter().position(|x| *x == id) {
                on.swap_remove(k);
            }
        }
        Some(f)
    }

    /// When the next flow ends at the current rates, and which (the lowest id on a tie).
    pub fn next_end(&mut self) -> Option<(f64, FlowId)> {
        while let Some(Reverse((t, id, v))) = self.ends.peek().copied() {
            match self.flows.get(&id) {
                Some(f) if f.version == v => return Some((t.0.max(self.now), id)),
                _ => {
                    self.ends.pop();
                }
            }
        }
        None
    }

    /// Moves time to `to`: the flows done by then are removed and returned (in id order),
    /// and the flows they shared links with share again (with a quantum: sharing rounds
    /// due by then happen).
    pub fn advance(&mut self, to: f64) -> Vec<FlowId> {
        self.now = self.now.max(to);
        self.share_due();
        let mut done = Vec::new();
        while let Some((t, id)) = self.next_end() {
            let Some(f) = self.flows.get(&id) else {
                self.ends.pop();
                continue;
            };
            if t > self.now && f.left_at(self.now) > DONE_EPSILON {
                break;
            }
            self.ends.pop();
            done.push(id);
        }
        done.sort_unstable();
        let mut seeds = Vec::new();
        for id in &done {
            if let Some(f) = self.remove(*id) {
                seeds.extend(f.links);
            }
        }
        if !seeds.is_empty() {
            self.changed(&seeds, None);
        }
        done
    }

    /// The flows connected to `seeds` through common links, and those links.
    fn component(&mut self, seeds: &[LinkId], extra: &[FlowId]) -> (Vec<FlowId>, Vec<usize>) {
        let mut link_seen = std::mem::take(&mut self.seen);
        let mut links: Vec<usize> = Vec::new();
        let mut flows: Vec<FlowId> = Vec::new();
        let mut flow_seen = HashSet::new();
        let mut stack: Vec<usize> = seeds.iter().map(|l| l.0 as usize).collect();
        for &id in extra {
            if self.flows.contains_key(&id) && flow_seen.insert(id) {
                flows.push(id);
            }
        }
        while let Some(l) = stack.pop() {
            if l >= link_seen.len() || link_seen[l] {
                continue;
            }
            link_seen[l] = true;
            links.push(l);
            // An unlimited link couples nothing.
            if self.capacity[l].is_infinite() {
                continue;
            }
            for id in &self.on_link[l] {
                if flow_seen.insert(*id) {
                    flows.push(*id);
                    if let Some(f) = self.flows.get(id) {
                        stack.extend(f.links.iter().map(|m| m.0 as usize));
                    }
                }
            }
        }
        for &l in &links {
            link_seen[l] = false;
        }
        self.seen = link_seen;
        flows.sort_unstable();
        links.sort_unstable();
        (flows, links)
    }

    /// Max-min fair rates for the component of `seeds` (and new flows `extra`), by
    /// water-filling: the link whose fill level (what is left of it per unfrozen flow) is
    /// lowest fills first and freezes its flows at that level.
    fn share(&mut self, seeds: &[LinkId], extra: &[FlowId]) {
        let (ids, links) = self.component(seeds, extra);
        self.round += 1;
        let round = self.round;
        let now = self.now;
        // Progress so far is kept before the rates change.
        for id in &ids {
            if let Some(f) = self.flows.get_mut(id) {
                f.left = f.left_at(now);
                f.at = now;
            }
        }
        let mut used = std::mem::take(&mut self.used);
        let mut unfrozen = std::mem::take(&mut self.unfrozen);
        for id in &ids {
            let Some(f) = self.flows.get_mut(id) else {
                continue;
            };
            let mut limited = false;
            for l in &f.links {
                let l = l.0 as usize;
                if self.capacity[l].is_finite() {
                    unfrozen[l] += 1;
                    limited = true;
                }
            }
            if !limited {
                // Crosses no limited link: done as soon as it starts.
                f.frozen_in = round;
                f.new_rate = f64::INFINITY;
            }
        }
        let cap = &self.capacity;
        let level_of = |l: usize, used: &[f64], n: usize| (cap[l] - used[l]).max(0.0) / n as f64;
        let mut heap: BinaryHeap<Reverse<(Time, usize, usize)>> = BinaryHeap::new();
        for &l in &links {
            if unfrozen[l] > 0 {
                heap.push(Reverse((
                    Time(level_of(l, &used, unfrozen[l])),
                    l,
                    unfrozen[l],
                )));
            }
        }
        while let Some(Reverse((level, l, n))) = heap.pop() {
            // Stale: the link's count changed since this entry was pushed.
            if unfrozen[l] != n || n == 0 {
                continue;
            }
            let level = level.0;
            for id in &self.on_link[l] {
                let Some(f) = self.flows.get_mut(id) else {
                    continue;
                };
                if f.frozen_in == round {
                    continue;
                }
                f.frozen_in = round;
                f.new_rate = level;
                for m in &f.links {
                    let m = m.0 as usize;
                    if !cap[m].is_finite() {
                        continue;
                    }
                    used[m] += level;
                    unfrozen[m] = unfrozen[m].saturating_sub(1);
                    if m != l && unfrozen[m] > 0 {
                        heap.push(Reverse((
                            Time(level_of(m, &used, unfrozen[m])),
                            m,
                            unfrozen[m],
                        )));
                    }
                }
            }
            unfrozen[l] = 0;
        }
        for &l in &links {
            used[l] = 0.0;
            unfrozen[l] = 0;
        }
        self.used = used;
        self.unfrozen = unfrozen;
        for id in ids {
            let Some(f) = self.flows.get_mut(&id) else {
                continue;
            };
            let rate = if f.frozen_in == round {
                f.new_rate
            } else {
                0.0
            };
            if rate == f.rate && f.version > 0 {
                // Same rate, same end: its heap entry stands.
                continue;
            }
            f.rate = rate;
            if rate.is_infinite() {
                f.left = 0.0;
            }
            f.version += 1;
            if let Some(t) = f.end() {
                self.ends.push(Reverse((Time(t), id, f.version)));
            }
        }
        // Stale entries are dropped lazily; rebuild when they crowd the heap.
        if self.ends.len() > 4 * self.flows.len() + 1024 {
            let live: Vec<_> = self
                .ends
                .drain()
                .filter(|Reverse((_, id, v))| self.flows.get(id).is_some_and(|f| f.version == *v))
                .collect();
            self.ends = live.into_iter().collect();
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
    fn with_a_quantum_changes_close_together_are_shared_once() {
        let mut n = FlowNet::new();
        n.set_quantum(0.5);
        let l = n.add_link(100.0);
        let a = n.start(0.0, &[l], 100);
        let b = n.start(0.2, &[l], 300);
        // Nothing moves until the round due half a second after the first change.
        assert_eq!(n.rate(a), Some(0.0));
        assert_eq!(n.rate(b), Some(0.0));
        let t = n.next_time().unwrap();
        assert!(close(t, 0.5));
        assert!(n.advance(t).is_empty());
        assert!(close(n.rate(a).unwrap(), 50.0) && close(n.rate(b).unwrap(), 50.0));
        // a ends at 0.5 + 2 s; b keeps 50 B/s until the round after that, 0.5 s later.
        let t = n.next_time().unwrap();
        assert!(close(t, 2.5));
        assert_eq!(n.advance(t), vec![a]);
        assert!(close(n.rate(b).unwrap(), 50.0));
        let t = n.next_time().unwrap();
        assert!(close(t, 3.0));
        assert!(n.advance(t).is_empty());
        assert!(close(n.rate(b).unwrap(), 100.0));
        // 300 - 50 x 2.5 = 175 bytes left at 3.0 s, at 100 B/s.
        let t = n.next_time().unwrap();
        assert!(close(t, 4.75));
        assert_eq!(n.advance(t), vec![b]);
        assert!(n.is_empty() && n.next_time().is_none());
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
