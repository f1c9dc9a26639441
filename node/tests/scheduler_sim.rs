//! Deterministic discrete-event simulation of one IDC downloading an image through the REAL
//! `Download` scheduler: virtual hosts and bridgeheads with per-node upload rates and
//! latencies, a shared WAN link into the IDC, gossip have-announcements, failures. No I/O;
//! time is virtual (microseconds), so a minute-long transfer simulates in milliseconds.

use bids_node::scheduler::{Download, Failure, SchedulerConfig, SourceKind};
use libp2p::PeerId;
use proptest::prelude::*;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::time::{Duration, Instant};

type Us = u64;
const MS: Us = 1_000;
const SEC: Us = 1_000_000;

fn peer_id(n: usize) -> PeerId {
    let mut seed = [0u8; 32];
    seed[..8].copy_from_slice(&(n as u64 + 1).to_le_bytes());
    libp2p::identity::Keypair::ed25519_from_bytes(seed)
        .expect("32 bytes make an ed25519 key")
        .public()
        .to_peer_id()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// A bridgehead of another IDC that holds the image.
    Remote,
    /// Our IDC's bridgehead: downloads over the WAN, serves hosts (deferring what it lacks).
    Bridgehead,
    Host,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    Data,
    Corrupt,
    NotHeld,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    /// A chunk request reaches `to`.
    Request { from: usize, to: usize, idx: u32 },
    /// The answer reaches the requester `to`.
    Response {
        to: usize,
        from: usize,
        idx: u32,
        outcome: Outcome,
    },
    /// A gossip have-announcement of `from` reaches `to`.
    Have { to: usize, from: usize, idx: u32 },
    /// Periodic wake-up of a downloading node (timeouts, back-offs).
    Tick { node: usize },
    /// `node` dies; `notify` = its peers see the connection close (else it just goes silent).
    Kill { node: usize, notify: bool },
}

struct Node {
    role: Role,
    id: PeerId,
    dl: Option<Download>,
    held: Vec<bool>,
    /// Serves every chunk with a bad payload.
    corrupts: bool,
    alive: bool,
    /// Upload: one chunk every `service` µs, FIFO.
    service: Us,
    up_free_at: Us,
    /// Requests the bridgehead deferred, per chunk.
    waiters: HashMap<u32, Vec<usize>>,
    done_at: Option<Us>,
}

struct Params {
    chunks: u32,
    hosts: usize,
    remotes: usize,
    lan_latency: Us,
    wan_latency: Us,
    host_service: Us,
    bridgehead_service: Us,
    remote_service: Us,
    /// Shared WAN link into the IDC: one chunk every `wan_service` µs.
    wan_service: Us,
    gossip_delay: Us,
    /// Hosts (by position among hosts) that serve corrupt chunks.
    corrupt_hosts: Vec<usize>,
    /// Remote bridgehead (by position among remotes) killed at a time, notified or silent.
    kill_remote: Option<(usize, Us, bool)>,
    /// Chunk ranges hosts already hold before the run (by position among hosts).
    preheld: Vec<(usize, u32, u32)>,
    cfg: SchedulerConfig,
    seed: u64,
}

impl Default for Params {
    fn default() -> Self {
        // 1 MiB chunks: LAN 100 MB/s per host NIC, WAN 20 MB/s shared, 20 ms one way.
        Params {
            chunks: 512,
            hosts: 8,
            remotes: 2,
            lan_latency: 100,
            wan_latency: 20 * MS,
            host_service: 10 * MS,
            bridgehead_service: 10 * MS,
            remote_service: 20 * MS,
            wan_service: 50 * MS,
            gossip_delay: 5 * MS,
            corrupt_hosts: Vec::new(),
            kill_remote: None,
            preheld: Vec::new(),
            cfg: SchedulerConfig::default(),
            seed: 1,
        }
    }
}

#[derive(Debug, Default)]
struct Report {
    /// Successful WAN transfers per chunk (the chunk crossed into the IDC).
    wan_crossings: BTreeMap<u32, u32>,
    wan_requests: u64,
    /// Chunks uploaded over the LAN, per uploader.
    lan_uploads: HashMap<usize, u64>,
    /// Completion time of every downloading node.
    done_at: Vec<Option<Us>>,
    bridgehead: usize,
    hosts: Vec<usize>,
    remotes: Vec<usize>,
    /// Per host: the peers it banned.
    banned: HashMap<usize, Vec<usize>>,
    /// Per host: corrupt chunks it got from each peer.
    corrupt: HashMap<usize, HashMap<usize, u32>>,
    /// Successful WAN transfers per remote bridgehead.
    wan_by_remote: HashMap<usize, u32>,
}

struct Sim {
    p: Params,
    nodes: Vec<Node>,
    by_id: HashMap<PeerId, usize>,
    queue: BinaryHeap<Reverse<(Us, u64, Ev)>>,
    seq: u64,
    now: Us,
    base: Instant,
    wan_free_at: Us,
    report: Report,
}

impl Sim {
    fn new(p: Params) -> Sim {
        let mut nodes = Vec::new();
        let mut report = Report::default();
        let mk = |role, i: usize, service, n: u32| Node {
            role,
            id: peer_id(i),
            dl: None,
            held: vec![role == Role::Remote; n as usize],
            corrupts: false,
            alive: true,
            service,
            up_free_at: 0,
            waiters: HashMap::new(),
            done_at: None,
        };
        for _ in 0..p.remotes {
            report.remotes.push(nodes.len());
            nodes.push(mk(Role::Remote, nodes.len(), p.remote_service, p.chunks));
        }
        report.bridgehead = nodes.len();
        nodes.push(mk(
            Role::Bridgehead,
            nodes.len(),
            p.bridgehead_service,
            p.chunks,
        ));
        for h in 0..p.hosts {
            report.hosts.push(nodes.len());
            let mut n = mk(Role::Host, nodes.len(), p.host_service, p.chunks);
            n.corrupts = p.corrupt_hosts.contains(&h);
            nodes.push(n);
        }
        for &(h, s, e) in &p.preheld {
            let node = &mut nodes[report.hosts[h]];
            for i in s..e {
                node.held[i as usize] = true;
            }
        }
        let bh = report.bridgehead;
        let bh_id = nodes[bh].id;
        let remote_ids: Vec<PeerId> = report.remotes.iter().map(|&r| nodes[r].id).collect();
        // Level 0 of the GIS host list: hosts holding part of the image.
        let holders: Vec<(PeerId, Vec<bool>)> = report
            .hosts
            .iter()
            .map(|&h| (nodes[h].id, nodes[h].held.clone()))
            .filter(|(_, held)| held.iter().any(|x| *x))
            .collect();
        for (i, node) in nodes.iter_mut().enumerate() {
            if node.role == Role::Remote {
                continue;
            }
            let held = node.held.clone();
            let mut dl = Download::new(
                p.chunks,
                |c| held[c as usize],
                p.cfg.clone(),
                p.seed.wrapping_mul(1000).wrapping_add(i as u64),
            );
            if node.role == Role::Bridgehead {
                for id in &remote_ids {
                    dl.add_peer(*id, SourceKind::RemoteBridgehead, true);
                }
            } else {
                dl.add_peer(bh_id, SourceKind::LocalBridgehead, false);
            }
            for (id, held) in &holders {
                if *id != node.id {
                    let ranges = ranges_of(held);
                    dl.add_peer(*id, SourceKind::Lan, false);
                    dl.peer_has(id, &ranges);
                }
            }
            node.dl = Some(dl);
        }
        report.done_at = vec![None; nodes.len()];
        let by_id = nodes.iter().enumerate().map(|(i, n)| (n.id, i)).collect();
        let mut sim = Sim {
            p,
            nodes,
            by_id,
            queue: BinaryHeap::new(),
            seq: 0,
            now: 0,
            base: Instant::now(),
            wan_free_at: 0,
            report,
        };
        if let Some((r, at, notify)) = sim.p.kill_remote {
            let node = sim.report.remotes[r];
            sim.push(at, Ev::Kill { node, notify });
        }
        for i in 0..sim.nodes.len() {
            if sim.nodes[i].dl.is_some() {
                sim.push(0, Ev::Tick { node: i });
            }
        }
        sim
    }

    fn push(&mut self, at: Us, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse((at, self.seq, ev)));
    }

    fn instant(&self) -> Instant {
        self.base + Duration::from_micros(self.now)
    }

    fn is_wan(&self, a: usize, b: usize) -> bool {
        self.nodes[a].role == Role::Remote || self.nodes[b].role == Role::Remote
    }

    fn latency(&self, a: usize, b: usize) -> Us {
        if self.is_wan(a, b) {
            self.p.wan_latency
        } else {
            self.p.lan_latency
        }
    }

    /// Asks node `i`'s scheduler for requests and sends them.
    fn pump(&mut self, i: usize) {
        let now = self.instant();
        let Some(dl) = self.nodes[i].dl.as_mut() else {
            return;
        };
        dl.expire(now);
        let reqs = dl.next_requests(now);
        let limit = |k| dl.config().limit(k);
        for &(peer, idx) in &reqs {
            assert!(!dl.is_held(idx), "node {i} requested held chunk {idx}");
            assert!(!dl.is_banned(&peer), "node {i} asked a banned peer");
            let kind = dl.peer_kind(&peer).expect("requests go to known peers");
            assert!(
                dl.inflight_to(&peer) <= limit(kind),
                "per-peer limit exceeded"
            );
        }
        for (peer, idx) in reqs {
            let to = self.by_id[&peer];
            if self.is_wan(i, to) {
                self.report.wan_requests += 1;
            }
            let at = self.now + self.latency(i, to);
            self.push(at, Ev::Request { from: i, to, idx });
        }
    }

    /// Queues an upload of `idx` from `from` to `to` behind `from`'s earlier uploads.
    fn serve(&mut self, from: usize, to: usize, idx: u32) {
        let outcome = if self.nodes[from].corrupts {
            Outcome::Corrupt
        } else {
            Outcome::Data
        };
        let node = &mut self.nodes[from];
        let mut done = node.up_free_at.max(self.now) + node.service;
        node.up_free_at = done;
        if self.is_wan(from, to) {
            // Then through the shared WAN link into our IDC.
            done = self.wan_free_at.max(done) + self.p.wan_service;
            self.wan_free_at = done;
        } else {
            *self.report.lan_uploads.entry(from).or_default() += 1;
        }
        let at = done + self.latency(from, to);
        self.push(
            at,
            Ev::Response {
                to,
                from,
                idx,
                outcome,
            },
        );
    }

    fn on_request(&mut self, from: usize, to: usize, idx: u32) {
        if !self.nodes[to].alive {
            return; // lost: the requester's timeout will tell
        }
        if self.nodes[to].held[idx as usize] {
            self.serve(to, from, idx);
        } else if self.nodes[to].role == Role::Bridgehead {
            // Deferred: answer once the chunk arrives; pull it first.
            self.nodes[to].waiters.entry(idx).or_default().push(from);
            if let Some(dl) = self.nodes[to].dl.as_mut() {
                dl.prioritize(idx);
            }
            self.pump(to);
        } else {
            let at = self.now + self.latency(to, from);
            self.push(
                at,
                Ev::Response {
                    to: from,
                    from: to,
                    idx,
                    outcome: Outcome::NotHeld,
                },
            );
        }
    }

    fn on_response(&mut self, to: usize, from: usize, idx: u32, outcome: Outcome) {
        if !self.nodes[from].alive || !self.nodes[to].alive {
            return;
        }
        let now = self.instant();
        let wan = self.is_wan(from, to);
        let from_id = self.nodes[from].id;
        let Some(dl) = self.nodes[to].dl.as_mut() else {
            return;
        };
        match outcome {
            Outcome::Data => {
                if wan {
                    *self.report.wan_crossings.entry(idx).or_default() += 1;
                    *self.report.wan_by_remote.entry(from).or_default() += 1;
                }
                if dl.on_chunk(&from_id, idx, now) {
                    let complete = dl.is_complete();
                    self.gained(to, idx);
                    if complete && self.nodes[to].done_at.is_none() {
                        self.nodes[to].done_at = Some(self.now);
                        self.report.done_at[to] = Some(self.now);
                    }
                }
            }
            Outcome::Corrupt => dl.on_failure(&from_id, idx, Failure::Corrupt, now),
            Outcome::NotHeld => dl.on_failure(&from_id, idx, Failure::NotHeld, now),
        }
        self.pump(to);
    }

    /// Node `i` stored a new chunk: serve its waiters, announce it on the IDC topic.
    fn gained(&mut self, i: usize, idx: u32) {
        self.nodes[i].held[idx as usize] = true;
        if let Some(waiters) = self.nodes[i].waiters.remove(&idx) {
            for w in waiters {
                self.serve(i, w, idx);
            }
        }
        let at = self.now + self.p.gossip_delay;
        for j in 0..self.nodes.len() {
            if j != i && self.nodes[j].role != Role::Remote {
                self.push(
                    at,
                    Ev::Have {
                        to: j,
                        from: i,
                        idx,
                    },
                );
            }
        }
    }

    fn all_done(&self) -> bool {
        self.nodes
            .iter()
            .all(|n| n.dl.as_ref().is_none_or(|d| d.is_complete()))
    }

    fn run(mut self) -> Report {
        let limit = 3600 * SEC;
        while let Some(Reverse((at, _, ev))) = self.queue.pop() {
            assert!(
                at <= limit,
                "simulation did not finish within an hour of virtual time"
            );
            self.now = at;
            match ev {
                Ev::Request { from, to, idx } => self.on_request(from, to, idx),
                Ev::Response {
                    to,
                    from,
                    idx,
                    outcome,
                } => self.on_response(to, from, idx, outcome),
                Ev::Have { to, from, idx } => {
                    let from_id = self.nodes[from].id;
                    if let Some(dl) = self.nodes[to].dl.as_mut() {
                        dl.peer_has(&from_id, &[(idx, idx + 1)]);
                    }
                    self.pump(to);
                }
                Ev::Tick { node } => {
                    self.pump(node);
                    let dl = self.nodes[node].dl.as_ref();
                    if let Some(dl) = dl.filter(|d| !d.is_complete()) {
                        assert!(!dl.is_stalled(), "node {node} stalled");
                        self.push(self.now + 500 * MS, Ev::Tick { node });
                    }
                }
                Ev::Kill { node, notify } => {
                    self.nodes[node].alive = false;
                    if notify {
                        let id = self.nodes[node].id;
                        for j in 0..self.nodes.len() {
                            if let Some(dl) = self.nodes[j].dl.as_mut() {
                                dl.remove_peer(&id);
                            }
                            self.pump(j);
                        }
                    }
                }
            }
            if self.all_done() {
                break;
            }
        }
        assert!(self.all_done(), "event queue ran dry before completion");
        let bh = self.report.bridgehead;
        eprintln!(
            "run (seed {}): done at {:.2} s, WAN requests {}, bridgehead LAN uploads {} of {}",
            self.p.seed,
            self.now as f64 / 1e6,
            self.report.wan_requests,
            self.report.lan_uploads.get(&bh).copied().unwrap_or(0),
            self.report.lan_uploads.values().sum::<u64>()
        );
        for &h in &self.report.hosts {
            let dl = self.nodes[h].dl.as_ref().expect("hosts download");
            let banned = (0..self.nodes.len())
                .filter(|&j| dl.is_banned(&self.nodes[j].id))
                .collect();
            self.report.banned.insert(h, banned);
            let corrupt = dl
                .penalties()
                .into_iter()
                .map(|(id, corrupt, _)| (self.by_id[&id], corrupt))
                .collect();
            self.report.corrupt.insert(h, corrupt);
        }
        self.report
    }
}

fn ranges_of(held: &[bool]) -> Vec<(u32, u32)> {
    let idx: Vec<u32> = (0..held.len() as u32)
        .filter(|&i| held[i as usize])
        .collect();
    bids_protocols::gossip::to_ranges(&idx)
}

fn assert_wan_once(r: &Report, chunks: impl Iterator<Item = u32>) {
    for c in chunks {
        assert_eq!(
            r.wan_crossings.get(&c),
            Some(&1),
            "chunk {c} crossed the WAN {:?} times",
            r.wan_crossings.get(&c)
        );
    }
}

/// The bridgehead and every host (the liar too) hold the whole image.
fn assert_all_complete(r: &Report) {
    for (i, done) in r.done_at.iter().enumerate() {
        assert!(
            done.is_some() || r.remotes.contains(&i),
            "node {i} did not complete"
        );
    }
}

/// The dead remote bridgehead delivered part of the image before dying, the other the rest.
fn assert_survivor_took_over(r: &Report, dead: usize) {
    let by = |i: usize| r.wan_by_remote.get(&r.remotes[i]).copied().unwrap_or(0);
    let (gone, alive) = (by(dead), by(1 - dead));
    assert!(gone > 0, "the dead bridgehead never served");
    assert!(
        alive > gone,
        "the survivor served {alive}, the dead one {gone}"
    );
}

fn bridgehead_share(r: &Report) -> f64 {
    let total: u64 = r.lan_uploads.values().sum();
    let bh = r.lan_uploads.get(&r.bridgehead).copied().unwrap_or(0);
    bh as f64 / total as f64
}

#[test]
fn idc_of_eight_hosts_pulls_each_chunk_over_the_wan_once() {
    let p = Params::default();
    let (chunks, wan_service) = (p.chunks, p.wan_service);
    let r = Sim::new(p).run();
    assert_all_complete(&r);
    assert_wan_once(&r, 0..chunks);
    assert_eq!(r.wan_crossings.values().sum::<u32>(), chunks);
    assert_eq!(r.wan_requests, chunks as u64, "no WAN request was wasted");
    let share = bridgehead_share(&r);
    let total: u64 = r.lan_uploads.values().sum();
    assert!(total >= 8 * chunks as u64);
    assert!(
        share < 0.35,
        "bridgehead uploaded {:.0}% of LAN chunks",
        share * 100.0
    );
    // Cut-through: the last host finishes soon after the WAN bound S / B_wan.
    let bound = chunks as u64 * wan_service;
    let last = r
        .hosts
        .iter()
        .filter_map(|&h| r.done_at[h])
        .max()
        .unwrap_or(u64::MAX);
    assert!(
        (last as f64) < 1.2 * bound as f64,
        "last host at {last} µs, WAN bound {bound} µs"
    );
    eprintln!(
        "8 hosts: last host {:.2} s (bound {:.2} s), bridgehead share {:.1}%, LAN uploads {total}",
        last as f64 / 1e6,
        bound as f64 / 1e6,
        share * 100.0
    );
}

#[test]
fn corrupting_host_is_banned_and_everyone_completes() {
    let p = Params {
        corrupt_hosts: vec![3],
        // A fast liar attracts many requests.
        host_service: 5 * MS,
        seed: 2,
        ..Params::default()
    };
    let chunks = p.chunks;
    let max = p.cfg.max_failures_before_ban;
    let lan_limit = p.cfg.max_inflight_lan as u32;
    let r = Sim::new(p).run();
    let liar = r.hosts[3];
    assert_all_complete(&r);
    assert_wan_once(&r, 0..chunks);
    let banners: Vec<usize> = r
        .hosts
        .iter()
        .copied()
        .filter(|h| r.banned[h].contains(&liar))
        .collect();
    let honest: Vec<usize> = r.hosts.iter().copied().filter(|&h| h != liar).collect();
    assert_eq!(banners, honest, "every honest host bans the liar");
    for &h in &r.hosts {
        assert!(
            r.banned[&h].iter().all(|&b| b == liar),
            "an honest peer was banned"
        );
        let seen = r.corrupt[&h].get(&liar).copied().unwrap_or(0);
        // Banned at `max`; only requests already in flight then can add to it.
        assert_eq!(seen >= max, banners.contains(&h));
        assert!(seen < max + lan_limit, "host {h} kept asking the liar");
    }
}

#[test]
fn remote_bridgehead_dying_silently_is_replaced_by_the_other() {
    let p = Params {
        kill_remote: Some((1, 10 * SEC, false)),
        seed: 3,
        ..Params::default()
    };
    let chunks = p.chunks;
    let r = Sim::new(p).run();
    assert_all_complete(&r);
    // Requests lost with the dead bridgehead were re-sent, but each chunk arrived once.
    assert_wan_once(&r, 0..chunks);
    assert!(r.wan_requests > chunks as u64);
    assert_survivor_took_over(&r, 1);
}

#[test]
fn remote_bridgehead_disconnecting_is_replaced_by_the_other() {
    let p = Params {
        kill_remote: Some((0, 8 * SEC, true)),
        seed: 4,
        ..Params::default()
    };
    let chunks = p.chunks;
    let r = Sim::new(p).run();
    assert_all_complete(&r);
    assert_wan_once(&r, 0..chunks);
    // Only the requests in flight at the dead one were sent twice.
    let limit = SchedulerConfig::default().max_inflight_wan as u64;
    assert!(r.wan_requests <= chunks as u64 + limit);
    assert_survivor_took_over(&r, 0);
}

#[test]
fn chunks_already_in_the_idc_never_cross_the_wan() {
    let p = Params {
        preheld: vec![(0, 0, 200), (5, 150, 300)],
        seed: 5,
        ..Params::default()
    };
    let chunks = p.chunks;
    let r = Sim::new(p).run();
    assert_all_complete(&r);
    assert!(
        r.wan_crossings.keys().all(|&c| c >= 300),
        "a LAN-held chunk crossed the WAN"
    );
    assert_wan_once(&r, 300..chunks);
    assert_eq!(r.wan_requests, (chunks - 300) as u64);
}

// ---- property test: random event sequences against the invariants ----

#[derive(Clone, Debug)]
enum Op {
    Add(usize, u8, bool),
    Has(usize, u32, u32),
    Complete(usize),
    Remove(usize),
    Prioritize(u32),
    Next,
    Deliver(usize),
    Fail(usize, u8),
    MarkHeld(u32),
    Advance(u64),
}

const N: u32 = 40;
const PEERS: usize = 6;

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..PEERS, 0u8..3, any::<bool>()).prop_map(|(p, k, c)| Op::Add(p, k, c)),
        (0..PEERS, 0..N, 1..N).prop_map(|(p, s, l)| Op::Has(p, s, s + l)),
        (0..PEERS).prop_map(Op::Complete),
        (0..PEERS).prop_map(Op::Remove),
        (0..N).prop_map(Op::Prioritize),
        Just(Op::Next),
        Just(Op::Next),
        (0usize..64).prop_map(Op::Deliver),
        (0usize..64).prop_map(Op::Deliver),
        (0usize..64, 0u8..7).prop_map(|(i, f)| Op::Fail(i, f)),
        (0..N).prop_map(Op::MarkHeld),
        (0u64..200_000).prop_map(Op::Advance),
    ]
}

fn kind(k: u8) -> SourceKind {
    match k {
        0 => SourceKind::Lan,
        1 => SourceKind::LocalBridgehead,
        _ => SourceKind::RemoteBridgehead,
    }
}

fn failure(f: u8) -> Failure {
    [
        Failure::NotHeld,
        Failure::Corrupt,
        Failure::Timeout,
        Failure::Refused,
        Failure::Busy,
        Failure::Disconnected,
        Failure::UnknownImage,
    ][f as usize % 7]
}

/// Requests the test believes in flight: (peer, chunk) → was it sent over the WAN.
struct Shadow {
    inflight: BTreeMap<(PeerId, u32), bool>,
}

impl Shadow {
    fn check(&self, d: &Download) {
        let mut wan_per_chunk: HashMap<u32, u32> = HashMap::new();
        for (&(_, idx), &wan) in &self.inflight {
            if wan {
                *wan_per_chunk.entry(idx).or_default() += 1;
            }
        }
        assert!(
            wan_per_chunk.values().all(|&n| n <= 1),
            "two WAN requests for one chunk"
        );
        assert_eq!(d.inflight(), self.inflight.len());
    }
}

fn next(d: &mut Download, s: &mut Shadow, now: Instant) {
    for (peer, idx) in d.expire(now) {
        assert!(
            s.inflight.remove(&(peer, idx)).is_some(),
            "expired unknown request"
        );
    }
    let reqs = d.next_requests(now);
    let mut seen = HashSet::new();
    for &(peer, idx) in &reqs {
        assert!(!d.is_held(idx), "requested held chunk {idx}");
        assert!(!d.is_banned(&peer), "requested from a banned peer");
        assert!(seen.insert((peer, idx)), "same request twice in one batch");
        let k = d.peer_kind(&peer).expect("known peer");
        assert!(
            s.inflight.insert((peer, idx), k.is_wan()).is_none(),
            "chunk {idx} in flight twice to one peer"
        );
        assert!(
            d.inflight_to(&peer) <= d.config().limit(k),
            "per-peer limit exceeded"
        );
    }
    s.check(d);
}

/// Drops the shadow's requests to a peer the scheduler released (removed, banned, dropped).
fn sync_released(d: &Download, s: &mut Shadow, peer: PeerId) {
    if d.inflight_to(&peer) == 0 {
        s.inflight.retain(|(p, _), _| *p != peer);
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_event_sequences_keep_the_invariants(
        ops in proptest::collection::vec(op(), 1..120),
        seed in any::<u64>(),
    ) {
        let ids: Vec<PeerId> = (0..PEERS).map(|i| peer_id(100 + i)).collect();
        let cfg = SchedulerConfig {
            max_inflight_lan: 3,
            max_inflight_bridgehead: 4,
            max_inflight_wan: 2,
            ..SchedulerConfig::default()
        };
        let mut d = Download::new(N, |i| i % 7 == 0, cfg, seed);
        let mut s = Shadow { inflight: BTreeMap::new() };
        let base = Instant::now();
        let mut t = 0u64;
        for op in ops {
            let now = base + Duration::from_millis(t);
            match op {
                Op::Add(p, k, c) => d.add_peer(ids[p], kind(k), c),
                Op::Has(p, a, b) => d.peer_has(&ids[p], &[(a, b)]),
                Op::Complete(p) => d.peer_complete(&ids[p]),
                Op::Remove(p) => {
                    d.remove_peer(&ids[p]);
                    sync_released(&d, &mut s, ids[p]);
                }
                Op::Prioritize(i) => d.prioritize(i),
                Op::Next => next(&mut d, &mut s, now),
                Op::Deliver(k) => {
                    if let Some(&(peer, idx)) = s.inflight.keys().nth(k % s.inflight.len().max(1)) {
                        let was_held = d.is_held(idx);
                        s.inflight.remove(&(peer, idx));
                        prop_assert_eq!(d.on_chunk(&peer, idx, now), !was_held);
                    }
                }
                Op::Fail(k, f) => {
                    if let Some(&(peer, idx)) = s.inflight.keys().nth(k % s.inflight.len().max(1)) {
                        s.inflight.remove(&(peer, idx));
                        d.on_failure(&peer, idx, failure(f), now);
                        sync_released(&d, &mut s, peer);
                    }
                }
                Op::MarkHeld(i) => d.mark_held(i),
                Op::Advance(ms) => t += ms,
            }
            s.check(&d);
        }
        // With a source of everything (a fresh peer, never banned), the download completes.
        let fresh = peer_id(99);
        d.add_peer(fresh, SourceKind::Lan, true);
        for _ in 0..10_000 {
            if d.is_complete() {
                break;
            }
            t += 50;
            let now = base + Duration::from_millis(t);
            next(&mut d, &mut s, now);
            prop_assert!(!d.is_stalled());
            let all: Vec<(PeerId, u32)> = s.inflight.keys().copied().collect();
            for (peer, idx) in all {
                // Old peers keep failing in random ways; only the fresh one delivers.
                s.inflight.remove(&(peer, idx));
                if peer == fresh {
                    d.on_chunk(&peer, idx, now);
                } else {
                    d.on_failure(&peer, idx, failure(idx as u8), now);
                    sync_released(&d, &mut s, peer);
                }
            }
        }
        prop_assert!(d.is_complete());
        prop_assert_eq!(d.held_count(), N);
        prop_assert_eq!(d.missing(), 0);
    }
}
