//! The simulated world: hosts in IDCs, each running the node's real sans-IO core
//! ([`NodeCore`]), the GIS's real [`Index`], and a flow-level network ([`FlowNet`]) under
//! them, driven by one discrete-event loop.
//!
//! What is modelled, and how:
//! - Every host has a LAN link up and down (`lan_mbit`), every IDC a WAN link up and down
//!   (`wan_mbit`); a chunk's bytes are a flow over the sender's up link, both WAN links if
//!   the IDCs differ, and the receiver's down link, sharing them max-min fairly.
//! - Messages (chunk requests, answers without data, hellos, gossip, GIS requests) take
//!   the one-way delay of the path and no bandwidth: `lan_delay_ms` inside an IDC,
//!   `delay_ms` between IDCs and to the GIS. A connection comes up after two round trips
//!   (TCP, then noise and yamux).
//! - Gossip reaches every subscriber of a topic (the IDC's, or the bridgeheads'), as
//!   gossipsub's flood publishing does.
//! - Reads, verification and writes take no time; the core is told they succeeded.
//! - Each core ticks every `tick_ms`, as the engine does every 20 ms.
//!
//! The core makes every decision: who to ask, when to defer, what to announce, when to ask
//! the GIS. The world only moves bytes and messages and tells the cores what happened.

mod act;
mod faults;
mod report;

use crate::flow::{FlowId, FlowNet, LinkId};
use crate::store::SimStore;
use bids_gis::{Index, IndexConfig};
use bids_node::nodecore::{prepare_download, Action, CoreConfig, GisKey, NodeCore, ReqKey, Token};
use bids_node::scheduler::Failure;
use bids_node::store::ChunkStore;
use bids_node::{FetchProgress, NodeConfig};
use bids_protocols::cert::{BridgeheadCert, CertBody};
use bids_protocols::chunk::{ChunkRequest, ChunkResponse, Encoding};
use bids_protocols::gis::{GisRequest, GisResponse, ImageQuery};
use bids_protocols::hello::{Hello, HelloReply};
use bids_protocols::manifest::{ChunkInfo, Manifest, ObjectKind};
use bids_protocols::{Idc, ImageId, Policy};
use bytes::Bytes;
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, watch};

/// Unix time of the simulation's start: certificates and the GIS's clock count from it.
const WALL0_MS: i64 = 1_800_000_000_000;
/// How often the GIS looks for hosts whose heartbeats stopped.
const GIS_EXPIRE_EVERY: f64 = 1.0;
/// A fetch that failed is started again this much later (as the netns runs do).
const RETRY_AFTER: f64 = 1.0;

/// What to simulate.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Params {
    /// IDCs that fetch the image.
    pub idcs: usize,
    /// Hosts in each fetching IDC; the first is its certified bridgehead.
    pub hosts_per_idc: usize,
    /// IDCs that hold the image from the start, and hosts in each (the first certified).
    pub providers: usize,
    pub provider_hosts: usize,
    /// Image size and chunk size in bytes.
    pub size: u64,
    pub chunk_size: u32,
    pub wan_mbit: f64,
    pub lan_mbit: f64,
    /// One-way delay between IDCs and to the GIS, and inside an IDC.
    pub delay_ms: f64,
    pub lan_delay_ms: f64,
    pub policy: Policy,
    pub seed: u64,
    /// Fetches start at random times in [0, jitter_ms); a fetching IDC's bridgehead starts
    /// at 0 unless `bridgehead_random`.
    pub jitter_ms: f64,
    pub bridgehead_random: bool,
    /// How often each core ticks.
    pub tick_ms: f64,
    /// The flow model shares the links' rates again at most once per this many ms (0: at
    /// every flow that starts or ends; see `FlowNet::set_quantum`). 1 ms moved the results
    /// of a 30-IDC run by under 0.1 % and made it 2.6 x faster.
    pub share_quantum_ms: f64,
    /// Bytes on the wire per payload byte beyond the payload: TCP/IP headers, noise and
    /// yamux framing (the netns runs' kernel counters saw 1.04 x the image on the WAN).
    pub wire_overhead: f64,
    /// The simulation stops here even if hosts are still fetching.
    pub time_limit_s: f64,
    /// Failures at given times.
    pub faults: Vec<Fault>,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            idcs: 1,
            hosts_per_idc: 9,
            providers: 4,
            provider_hosts: 2,
            size: 16_000_000,
            chunk_size: 258_048,
            wan_mbit: 10.0,
            lan_mbit: 200.0,
            delay_ms: 15.0,
            lan_delay_ms: 0.1,
            policy: Policy::Bids,
            seed: 1,
            jitter_ms: 2000.0,
            bridgehead_random: false,
            tick_ms: 20.0,
            share_quantum_ms: 1.0,
            wire_overhead: 0.04,
            time_limit_s: 3600.0,
            faults: Vec::new(),
        }
    }
}

/// A failure injected at a given time.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Fault {
    /// The bridgehead of fetching IDC `idc` (from 0) stops, and starts again `for_s`
    /// later with the same key and store (0: never).
    Bridgehead { idc: usize, at_s: f64, for_s: f64 },
    /// Host `host` of fetching IDC `idc` (from 0; host 0 is the bridgehead) stops, and
    /// starts again `for_s` later (0: never).
    Host {
        idc: usize,
        host: usize,
        at_s: f64,
        for_s: f64,
    },
    /// The GIS is down from `at_s` for `for_s` seconds; it keeps its index (as the real
    /// one does on disk).
    Gis { at_s: f64, for_s: f64 },
}

impl Fault {
    fn at(&self) -> f64 {
        match self {
            Fault::Bridgehead { at_s, .. } | Fault::Host { at_s, .. } | Fault::Gis { at_s, .. } => {
                *at_s
            }
        }
    }
}

/// What a simulation run reports about one host.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HostRow {
    pub idc: String,
    pub host: usize,
    pub role: String,
    pub fetching: bool,
    /// When it started fetching, and how long it took (None: not done, or a provider).
    pub start_s: Option<f64>,
    pub provision_s: Option<f64>,
    /// Payload bytes it received over its LAN and over the WAN, and sent to its own IDC.
    pub lan_recv_bytes: u64,
    pub wan_recv_bytes: u64,
    pub lan_sent_bytes: u64,
    pub wan_sent_bytes: u64,
    /// Its LAN download rate while its IDC held chunks it lacked, in bytes per second.
    pub lan_rate_while_available: Option<f64>,
    pub alive: bool,
}

/// What a simulation run reports about one IDC.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IdcRow {
    pub idc: String,
    pub provider: bool,
    pub hosts: usize,
    /// Hosts done (the bridgehead included).
    pub done: usize,
    /// The mean and the longest provision time of its hosts other than the bridgehead (as
    /// the netns evaluation counts them), each from its own start.
    pub mean_s: Option<f64>,
    pub last_s: Option<f64>,
    /// The bridgehead's provision time.
    pub bridgehead_s: Option<f64>,
    /// From the first start in the IDC to the last host done.
    pub makespan_s: Option<f64>,
    /// S / B_wan.
    pub bound_s: f64,
    pub last_over_bound: Option<f64>,
    /// Payload bytes into the IDC over its WAN link, over the image size.
    pub wan_in_bytes: u64,
    pub wan_in_over_size: f64,
    /// Payload bytes its bridgehead sent to its own hosts, over the image size.
    pub bridgehead_lan_sent_bytes: u64,
    pub bridgehead_lan_over_size: f64,
}

/// A whole run's report.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub params: Params,
    pub hosts: Vec<HostRow>,
    pub idcs: Vec<IdcRow>,
    /// GIS requests served in each second of the run.
    pub gis_requests_per_s: Vec<u64>,
    /// Simulated seconds, events handled.
    pub sim_s: f64,
    pub events: u64,
    /// Fetching hosts, and how many finished.
    pub fetching_hosts: usize,
    pub done_hosts: usize,
    /// Chunk answers by kind and by who sent them to whom.
    pub answers: BTreeMap<String, u64>,
}

/// Where a run stands, for a progress display.
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    pub sim_s: f64,
    pub done: usize,
    pub fetching: usize,
    pub events: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Bridgehead,
    Host,
}

struct Fetch {
    start: f64,
    reply: Option<oneshot::Receiver<Result<watch::Receiver<FetchProgress>, String>>>,
    progress: Option<watch::Receiver<FetchProgress>>,
    done: Option<f64>,
}

struct Node {
    core: NodeCore,
    /// What its core was made from, to make it again after a restart.
    cfg: CoreConfig,
    peer: PeerId,
    idc: usize,
    index_in_idc: usize,
    kind: Kind,
    up: LinkId,
    down: LinkId,
    alive: bool,
    fetch: Option<Fetch>,
    store: Arc<SimStore>,
    /// Subscribed to the bridgeheads' topic.
    bridgeheads_topic: bool,
    lan_sent: u64,
    wan_sent: u64,
    lan_recv: u64,
    wan_recv: u64,
}

struct IdcInfo {
    name: Idc,
    provider: bool,
    up: LinkId,
    down: LinkId,
    nodes: Vec<usize>,
    wan_in: u64,
}

/// A chunk's bytes on their way.
struct Transfer {
    from: usize,
    to: usize,
    key: ReqKey,
    resp: ChunkResponse,
}

enum Ev {
    Tick(usize),
    Start(usize),
    Connected {
        a: usize,
        b: usize,
    },
    Hello {
        to: usize,
        from: usize,
        hello: Hello,
    },
    HelloReply {
        to: usize,
        from: usize,
        reply: HelloReply,
    },
    ChunkReq {
        to: usize,
        from: usize,
        req: ChunkRequest,
        key: ReqKey,
    },
    ChunkResp {
        to: usize,
        from: usize,
        key: ReqKey,
        resp: ChunkResponse,
    },
    Prepared {
        node: usize,
        manifest: Arc<Manifest>,
        times: (Instant, Instant),
    },
    Gossip {
        from: usize,
        bytes: Arc<Vec<u8>>,
        to: Vec<usize>,
        remote: bool,
    },
    GisReq {
        from: usize,
        key: GisKey,
        req: GisRequest,
    },
    GisResp {
        to: usize,
        key: GisKey,
        resp: GisResponse,
    },
    GisDial(usize),
    GisExpire,
    Fault(usize),
    GisBack,
    Restart(usize),
}

/// The simulation.
pub struct World {
    p: Params,
    base: Instant,
    now: f64,
    rng: StdRng,
    net: FlowNet,
    nodes: Vec<Node>,
    idcs: Vec<IdcInfo>,
    by_peer: HashMap<PeerId, usize>,
    index: Index,
    gis_up: bool,
    gis_requests: Vec<u64>,
    manifest: Arc<Manifest>,
    image: ImageId,
    zeros: Bytes,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    events: HashMap<u64, Ev>,
    seq: u64,
    handled: u64,
    flows: HashMap<FlowId, Transfer>,
    /// Inbound requests by token: who asked, and its key for them.
    tokens: HashMap<Token, (usize, ReqKey)>,
    hello_tokens: HashMap<Token, usize>,
    next_token: u64,
    conns: BTreeSet<(usize, usize)>,
    /// Chunk requests not answered yet: (requester, key) → server.
    pending: BTreeMap<(usize, ReqKey), usize>,
    /// Messages by kind, for the report.
    counts: BTreeMap<String, u64>,
    /// Nodes stopped that will start again.
    restarts: usize,
}

fn keypair(tag: u8, n: u64) -> Keypair {
    let mut seed = [0u8; 32];
    seed[0] = tag;
    seed[1..9].copy_from_slice(&n.to_le_bytes());
    // Ed25519 takes any 32 bytes as a secret key.
    Keypair::ed25519_from_bytes(seed).expect("32 bytes are an ed25519 secret key")
}

/// A manifest for a synthetic image of `size` bytes: its chunk hashes are made up (the
/// simulator never hashes), none is all zeros.
pub fn synthetic_manifest(size: u64, chunk_size: u32) -> Result<Manifest, String> {
    if chunk_size == 0 {
        return Err("the chunk size must be above 0".into());
    }
    let n = size.div_ceil(chunk_size as u64);
    let chunks = (0..n)
        .map(|i| {
            let mut sha256 = [0u8; 32];
            sha256[..8].copy_from_slice(&i.to_le_bytes());
            sha256[31] = 1;
            ChunkInfo {
                sha256,
                md5: [0u8; 16],
                zero: false,
            }
        })
        .collect();
    let m = Manifest {
        name: "sim-image".into(),
        version: "1".into(),
        base: None,
        kind: ObjectKind::Image,
        size,
        chunk_size,
        chunks,
    };
    // The same checks a node applies to a manifest from the network.
    Manifest::from_bytes(&m.to_bytes()).map_err(|e| e.to_string())
}

impl World {
    /// Builds the world: IDCs, hosts, links, the GIS; nothing has happened yet.
    pub fn new(p: Params) -> Result<World, String> {
        if p.idcs == 0 || p.hosts_per_idc == 0 {
            return Err("at least one fetching IDC with one host is needed".into());
        }
        if p.providers == 0 || p.provider_hosts == 0 {
            return Err("at least one provider IDC with one host is needed".into());
        }
        if !(p.wan_mbit > 0.0 && p.lan_mbit > 0.0) {
            return Err("link rates must be above 0".into());
        }
        if p.tick_ms <= 0.0 {
            return Err("the tick must be above 0 ms".into());
        }
        let manifest = Arc::new(synthetic_manifest(p.size, p.chunk_size)?);
        let image = manifest.id();
        let admin = keypair(1, 0);
        let gis_key = keypair(2, 0);
        let gis_peer = gis_key.public().to_peer_id();
        let gis_addr: Multiaddr = format!("/ip4/10.255.255.1/tcp/4000/p2p/{gis_peer}")
            .parse()
            .map_err(|e| format!("GIS address: {e}"))?;
        let mut index_cfg = IndexConfig::new(admin.public().to_peer_id(), p.policy);
        index_cfg.heartbeat_timeout = Duration::from_secs(10);
        let index = Index::new(index_cfg);
        let base = Instant::now();
        let mut net = FlowNet::new();
        if p.share_quantum_ms.is_nan() || p.share_quantum_ms < 0.0 {
            return Err("the sharing quantum must be 0 ms or more".into());
        }
        net.set_quantum(p.share_quantum_ms / 1000.0);
        let wan = p.wan_mbit * 1e6 / 8.0;
        let lan = p.lan_mbit * 1e6 / 8.0;
        let zeros = Bytes::from(vec![0u8; p.chunk_size as usize]);
        let mut w = World {
            rng: StdRng::seed_from_u64(p.seed),
            base,
            now: 0.0,
            net: FlowNet::new(),
            nodes: Vec::new(),
            idcs: Vec::new(),
            by_peer: HashMap::new(),
            index,
            gis_up: true,
            gis_requests: Vec::new(),
            manifest,
            image,
            zeros,
            queue: BinaryHeap::new(),
            events: HashMap::new(),
            seq: 0,
            handled: 0,
            flows: HashMap::new(),
            tokens: HashMap::new(),
            hello_tokens: HashMap::new(),
            next_token: 0,
            conns: BTreeSet::new(),
            pending: BTreeMap::new(),
            counts: BTreeMap::new(),
            restarts: 0,
            p: p.clone(),
        };
        let layout: Vec<(bool, usize)> = (0..p.providers)
            .map(|_| (true, p.provider_hosts))
            .chain((0..p.idcs).map(|_| (false, p.hosts_per_idc)))
            .collect();
        let mut serial = 0u64;
        for (k, (provider, hosts)) in layout.into_iter().enumerate() {
            let name = if provider {
                format!("prov{k}")
            } else {
                format!("idc{}", k - p.providers)
            };
            let idc_name = Idc::new(&name)?;
            let up = net.add_link(wan);
            let down = net.add_link(wan);
            let mut members = Vec::new();
            for h in 0..hosts {
                let n = w.nodes.len();
                let key = keypair(3, n as u64);
                let peer = key.public().to_peer_id();
                let kind = if h == 0 { Kind::Bridgehead } else { Kind::Host };
                let addr: Multiaddr =
                    format!("/ip4/10.{}.{}.{}/tcp/4001", k % 250, h / 250, h % 250 + 1)
                        .parse()
                        .map_err(|e| format!("host address: {e}"))?;
                let mut cfg = NodeConfig::new(
                    key,
                    idc_name.clone(),
                    gis_addr.clone(),
                    "simulated".into(),
                    admin.public().to_peer_id(),
                );
                cfg.policy = p.policy;
                if kind == Kind::Bridgehead {
                    serial += 1;
                    cfg.cert = Some(cert(&admin, peer, &idc_name, serial)?);
                }
                let core_cfg = CoreConfig::of(
                    &cfg,
                    vec![addr
                        .with_p2p(peer)
                        .map_err(|a| format!("cannot name {peer} in {a}"))?],
                )?;
                let kept = core_cfg.clone();
                let store = Arc::new(SimStore::new());
                if provider {
                    store.hold_all(&w.manifest);
                }
                let seed = w.rng.gen();
                let core = NodeCore::new(core_cfg, store.clone(), None, base, WALL0_MS, seed)?;
                w.by_peer.insert(peer, n);
                w.nodes.push(Node {
                    core,
                    cfg: kept,
                    peer,
                    idc: k,
                    index_in_idc: h,
                    kind,
                    up: net.add_link(lan),
                    down: net.add_link(lan),
                    alive: true,
                    fetch: None,
                    store,
                    bridgeheads_topic: false,
                    lan_sent: 0,
                    wan_sent: 0,
                    lan_recv: 0,
                    wan_recv: 0,
                });
                members.push(n);
            }
            w.idcs.push(IdcInfo {
                name: idc_name,
                provider,
                up,
                down,
                nodes: members,
                wan_in: 0,
            });
        }
        w.net = net;
        Ok(w)
    }

    fn instant(&self, t: f64) -> Instant {
        self.base + Duration::from_secs_f64(t.max(0.0))
    }

    fn wall_ms(&self) -> i64 {
        WALL0_MS + (self.now * 1000.0) as i64
    }

    fn at(&mut self, t: f64, ev: Ev) {
        self.seq += 1;
        let ns = (t.max(self.now) * 1e9) as u64;
        self.queue.push(Reverse((ns, self.seq)));
        self.events.insert(self.seq, ev);
    }

    /// One-way delay between two nodes.
    fn delay(&self, a: usize, b: usize) -> f64 {
        if self.nodes[a].idc == self.nodes[b].idc {
            self.p.lan_delay_ms / 1000.0
        } else {
            self.p.delay_ms / 1000.0
        }
    }

    fn gis_delay(&self) -> f64 {
        self.p.delay_ms / 1000.0
    }

    fn count(&mut self, what: &str) {
        *self.counts.entry(what.to_string()).or_default() += 1;
    }

    /// What a node is, for counting.
    fn role(&self, n: usize) -> &'static str {
        match (self.idcs[self.nodes[n].idc].provider, self.nodes[n].kind) {
            (true, Kind::Bridgehead) => "provider-bridgehead",
            (true, Kind::Host) => "provider-host",
            (false, Kind::Bridgehead) => "bridgehead",
            (false, Kind::Host) => "host",
        }
    }

    /// Runs to the end (every fetching host done, or the time limit); `progress` is called
    /// now and then.
    pub fn run(mut self, mut progress: impl FnMut(Progress)) -> Report {
        let tick = self.p.tick_ms / 1000.0;
        for n in 0..self.nodes.len() {
            let now = self.instant(0.0);
            self.nodes[n].core.start(now);
            self.drain(n);
            let phase = self.rng.gen::<f64>() * tick;
            self.at(phase, Ev::Tick(n));
        }
        self.at(GIS_EXPIRE_EVERY, Ev::GisExpire);
        // Fetches start once providers could have registered and published.
        let settle = 4.0 * self.gis_delay() + 0.5;
        let fetching: Vec<usize> = (0..self.nodes.len())
            .filter(|&n| !self.idcs[self.nodes[n].idc].provider)
            .collect();
        for &n in &fetching {
            let jitter = self.p.jitter_ms / 1000.0;
            let start = if self.nodes[n].kind == Kind::Bridgehead && !self.p.bridgehead_random {
                0.0
            } else {
                self.rng.gen::<f64>() * jitter
            };
            self.at(settle + start, Ev::Start(n));
        }
        for (i, f) in self.p.faults.clone().iter().enumerate() {
            self.at(settle + f.at(), Ev::Fault(i));
        }
        let total = fetching.len();
        let mut done = 0usize;
        let mut last_report = 0.0;
        loop {
            let next_ev = self.queue.peek().map(|Reverse((ns, _))| *ns as f64 / 1e9);
            let next_flow = self.net.next_time();
            let flow_first = match (next_ev, next_flow) {
                (_, None) => false,
                (None, Some(_)) => true,
                (Some(te), Some(tf)) => tf <= te,
            };
            if flow_first {
                let Some(tf) = next_flow else { break };
                self.now = tf.max(self.now);
                for f in self.net.advance(self.now) {
                    self.flow_done(f);
                }
            } else {
                let Some(Reverse((ns, seq))) = self.queue.pop() else {
                    break;
                };
                self.now = (ns as f64 / 1e9).max(self.now);
                if let Some(ev) = self.events.remove(&seq) {
                    self.handle(ev);
                }
            }
            self.handled += 1;
            if self.now > self.p.time_limit_s {
                break;
            }
            if self.handled.is_multiple_of(4096) || self.now - last_report > 1.0 {
                done = self.count_done();
                last_report = self.now;
                progress(Progress {
                    sim_s: self.now,
                    done,
                    fetching: total,
                    events: self.handled,
                });
                if self.finished() {
                    break;
                }
            }
        }
        done = done.max(self.count_done());
        progress(Progress {
            sim_s: self.now,
            done,
            fetching: total,
            events: self.handled,
        });
        self.report()
    }

    fn count_done(&mut self) -> usize {
        for n in 0..self.nodes.len() {
            self.check_fetch(n);
        }
        self.nodes
            .iter()
            .filter(|n| n.fetch.as_ref().is_some_and(|f| f.done.is_some()))
            .count()
    }

    /// Whether nothing more can happen that the report would show: every fetching host
    /// that runs is done, and none will start again.
    fn finished(&self) -> bool {
        self.restarts == 0
            && self.nodes.iter().all(|n| {
                !n.alive
                    || self.idcs[n.idc].provider
                    || n.fetch.as_ref().is_some_and(|f| f.done.is_some())
            })
    }

    /// Looks at a fetch's progress: done, failed (started again a moment later), or on.
    fn check_fetch(&mut self, n: usize) {
        let now = self.now;
        let mut retry = false;
        let Some(f) = self.nodes[n].fetch.as_mut() else {
            return;
        };
        if f.done.is_some() {
            return;
        }
        if let Some(rx) = f.reply.as_mut() {
            match rx.try_recv() {
                Ok(Ok(p)) => {
                    f.progress = Some(p);
                    f.reply = None;
                }
                Ok(Err(_)) | Err(oneshot::error::TryRecvError::Closed) => {
                    f.reply = None;
                    retry = true;
                }
                Err(oneshot::error::TryRecvError::Empty) => {}
            }
        }
        if let Some(p) = &f.progress {
            let state = p.borrow().done.clone();
            match state {
                Some(Ok(_)) => f.done = Some(now),
                Some(Err(_)) => {
                    f.progress = None;
                    retry = true;
                }
                None => {}
            }
        }
        if retry && self.nodes[n].alive {
            self.at(now + RETRY_AFTER, Ev::Start(n));
        }
    }

    fn handle(&mut self, ev: Ev) {
        let now = self.instant(self.now);
        match ev {
            Ev::Tick(n) => {
                if !self.nodes[n].alive {
                    return;
                }
                self.nodes[n].core.handle_tick(now);
                self.drain(n);
                let next = self.now + self.p.tick_ms / 1000.0;
                self.at(next, Ev::Tick(n));
            }
            Ev::Start(n) => {
                if !self.nodes[n].alive {
                    return;
                }
                let (tx, rx) = oneshot::channel();
                let start = match &self.nodes[n].fetch {
                    Some(f) => f.start,
                    None => self.now,
                };
                self.nodes[n].fetch = Some(Fetch {
                    start,
                    reply: Some(rx),
                    progress: None,
                    done: None,
                });
                let q = ImageQuery::Id(self.image);
                self.nodes[n].core.handle_fetch(now, q, Some(tx));
                self.drain(n);
            }
            Ev::Connected { a, b } => {
                if !(self.nodes[a].alive && self.nodes[b].alive) {
                    if self.nodes[a].alive {
                        let pb = self.nodes[b].peer;
                        self.nodes[a].core.handle_dial_failed(now, pb);
                        self.drain(a);
                    }
                    return;
                }
                let key = (a.min(b), a.max(b));
                let first = self.conns.insert(key);
                let (pa, pb) = (self.nodes[a].peer, self.nodes[b].peer);
                if self.nodes[a].core.handle_connected(now, pb, true, first) {
                    let hello = self.nodes[a].core.my_hello();
                    let d = self.delay(a, b);
                    self.at(
                        self.now + d,
                        Ev::Hello {
                            to: b,
                            from: a,
                            hello,
                        },
                    );
                }
                self.drain(a);
                self.nodes[b].core.handle_connected(now, pa, false, first);
                self.drain(b);
            }
            Ev::Hello { to, from, hello } => {
                if !self.alive_pair(to, from) {
                    return;
                }
                self.next_token += 1;
                let token = Token(self.next_token);
                self.hello_tokens.insert(token, from);
                let pf = self.nodes[from].peer;
                self.nodes[to].core.handle_hello(now, pf, hello, token);
                self.drain(to);
            }
            Ev::HelloReply { to, from, reply } => {
                if !self.alive_pair(to, from) {
                    return;
                }
                let pf = self.nodes[from].peer;
                self.nodes[to].core.handle_hello_reply(now, pf, reply);
                self.drain(to);
            }
            Ev::ChunkReq { to, from, req, key } => {
                if !self.nodes[from].alive {
                    return;
                }
                if !self.nodes[to].alive {
                    self.fail_request(from, to, key);
                    return;
                }
                self.next_token += 1;
                let token = Token(self.next_token);
                self.tokens.insert(token, (from, key));
                let pf = self.nodes[from].peer;
                self.nodes[to]
                    .core
                    .handle_chunk_request(now, pf, req, token);
                self.drain(to);
            }
            Ev::ChunkResp {
                to,
                from,
                key,
                resp,
            } => {
                if self.pending.remove(&(to, key)).is_none() || !self.nodes[to].alive {
                    return;
                }
                let pf = self.nodes[from].peer;
                self.nodes[to]
                    .core
                    .handle_chunk_response(now, pf, key, resp);
                self.drain(to);
                self.check_fetch(to);
            }
            Ev::Prepared {
                node,
                manifest,
                times,
            } => {
                if !self.nodes[node].alive {
                    return;
                }
                // The engine's preparation: the store records the manifest.
                let result = prepare_download(&*self.nodes[node].store, &manifest);
                self.nodes[node]
                    .core
                    .handle_prepared(now, manifest, times, result);
                self.drain(node);
            }
            Ev::Gossip {
                from,
                bytes,
                to,
                remote,
            } => {
                let pf = self.nodes[from].peer;
                for n in to {
                    if self.nodes[n].alive {
                        self.nodes[n]
                            .core
                            .handle_announcement(now, pf, &bytes, remote);
                        self.drain(n);
                    }
                }
            }
            Ev::GisReq { from, key, req } => {
                if !self.gis_up {
                    return;
                }
                let sec = self.now as usize;
                if self.gis_requests.len() <= sec {
                    self.gis_requests.resize(sec + 1, 0);
                }
                self.gis_requests[sec] += 1;
                let peer = self.nodes[from].peer;
                let resp = self.index.handle(peer, req, self.wall_ms());
                let d = self.gis_delay();
                self.at(
                    self.now + d,
                    Ev::GisResp {
                        to: from,
                        key,
                        resp,
                    },
                );
            }
            Ev::GisResp { to, key, resp } => {
                if !self.nodes[to].alive || !self.gis_up {
                    return;
                }
                self.nodes[to].core.handle_gis_response(now, key, resp);
                self.drain(to);
            }
            Ev::GisDial(n) => {
                if !self.nodes[n].alive {
                    return;
                }
                if self.gis_up {
                    self.nodes[n].core.handle_gis_connected(now);
                } else {
                    let cause = "connection refused (the GIS is down)";
                    self.nodes[n].core.handle_gis_dial_failed(now, cause);
                }
                self.drain(n);
            }
            Ev::GisExpire => {
                if self.gis_up {
                    self.index.expire(self.wall_ms());
                }
                self.at(self.now + GIS_EXPIRE_EVERY, Ev::GisExpire);
            }
            Ev::Fault(i) => self.fault(i),
            Ev::Restart(n) => self.restart(n),
            Ev::GisBack => self.gis_back(),
        }
    }
}

fn cert(admin: &Keypair, peer: PeerId, idc: &Idc, serial: u64) -> Result<BridgeheadCert, String> {
    let now = WALL0_MS / 1000;
    BridgeheadCert::issue(
        admin,
        CertBody {
            peer,
            idc: idc.clone(),
            db_id: format!("sim-{serial}"),
            serial,
            not_before: now - 3600,
            not_after: now + 365 * 86_400,
            issuer: peer,
        },
    )
}
