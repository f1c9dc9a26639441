//! The node core without a network: three cores of one IDC and the GIS's real `Index`,
//! driven by a loop in this test that carries their actions (messages delivered at once,
//! stores in memory). Real bytes: every copy is read back and compared.

use bids_gis::{Index, IndexConfig};
use bids_node::nodecore::{
    prepare_download, verify_and_store, Action, CoreConfig, NodeCore, ReqKey, Token,
};
use bids_node::store::{ChunkStore, MemStore};
use bids_node::{FetchProgress, NodeConfig};
use bids_protocols::chunk::{self, ChunkResponse};
use bids_protocols::gis::{GisRequest, GisResponse, ImageQuery};
use bids_protocols::manifest::{chunk_info, Manifest, ObjectKind};
use bids_protocols::{Idc, Policy};
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, watch};

const CHUNK: usize = 64 * 1024;

struct Node {
    core: NodeCore,
    store: Arc<MemStore>,
    peer: PeerId,
}

/// What is on its way between the cores.
enum Msg {
    Connected {
        a: usize,
        b: usize,
    },
    Hello {
        to: usize,
        from: usize,
        hello: bids_protocols::hello::Hello,
    },
    HelloReply {
        to: usize,
        from: usize,
        reply: bids_protocols::hello::HelloReply,
    },
    Request {
        to: usize,
        from: usize,
        req: chunk::ChunkRequest,
        key: ReqKey,
    },
    Response {
        to: usize,
        from: usize,
        key: ReqKey,
        resp: ChunkResponse,
    },
    Gossip {
        to: usize,
        from: usize,
        bytes: Vec<u8>,
    },
}

struct Net {
    nodes: Vec<Node>,
    index: Index,
    base: Instant,
    ms: u64,
    queue: VecDeque<Msg>,
    tokens: BTreeMap<Token, (usize, ReqKey)>,
    hellos: BTreeMap<Token, usize>,
    next: u64,
    /// Every chunk request sent: (from, to, chunk, ms).
    requests: Vec<(usize, usize, u32, u64)>,
    /// Chunk answers to this core are delivered one per this many ms (a slow download).
    slow: Option<(usize, u64)>,
    held_back: VecDeque<Msg>,
    /// Every heartbeat the index got: (from, ms).
    heartbeats: Vec<(usize, u64)>,
    /// Every refresh the index got and what it answered.
    refreshes: Vec<Refresh>,
    /// Every dial: (from, to, ms).
    dials: Vec<(usize, usize, u64)>,
}

/// A refresh of a host list and its answer.
#[derive(Debug)]
struct Refresh {
    from: usize,
    ms: u64,
    known: Option<u64>,
    /// `None`: answered "unchanged"; otherwise the hosts listed.
    listed: Option<Vec<PeerId>>,
}

impl Net {
    fn now(&self) -> Instant {
        self.base + Duration::from_millis(self.ms)
    }

    fn of(&self, peer: &PeerId) -> usize {
        self.nodes
            .iter()
            .position(|n| n.peer == *peer)
            .expect("a known peer")
    }

    fn token(&mut self) -> Token {
        self.next += 1;
        Token(self.next)
    }

    /// Carries out node `n`'s actions.
    fn drain(&mut self, n: usize) {
        let now = self.now();
        while let Some(a) = self.nodes[n].core.poll_action() {
            match a {
                Action::DialGis { .. } => self.nodes[n].core.handle_gis_connected(now),
                Action::GisSend { key, req, .. } => {
                    if matches!(*req, GisRequest::Heartbeat { .. }) {
                        self.heartbeats.push((n, self.ms));
                    }
                    let peer = self.nodes[n].peer;
                    let known = match &*req {
                        GisRequest::Refresh { known, .. } => Some(*known),
                        _ => None,
                    };
                    let resp = self
                        .index
                        .handle(peer, *req, 1_800_000_000_000 + self.ms as i64);
                    if let Some(known) = known {
                        let listed = match &resp {
                            GisResponse::Unchanged => None,
                            GisResponse::HostList(l) => {
                                Some(l.level0.iter().chain(&l.level1).map(|e| e.peer).collect())
                            }
                            other => panic!("a refresh answered {other:?}"),
                        };
                        self.refreshes.push(Refresh {
                            from: n,
                            ms: self.ms,
                            known,
                            listed,
                        });
                    }
                    self.nodes[n].core.handle_gis_response(now, key, resp);
                }
                Action::Dial { peer, .. } => {
                    let b = self.of(&peer);
                    self.dials.push((n, b, self.ms));
                    self.queue.push_back(Msg::Connected { a: n, b });
                }
                Action::Hello { peer, hello } => {
                    let to = self.of(&peer);
                    self.queue.push_back(Msg::Hello { to, from: n, hello });
                }
                Action::HelloReply { token, reply } => {
                    let to = self.hellos.remove(&token).expect("a hello to answer");
                    self.queue.push_back(Msg::HelloReply { to, from: n, reply });
                }
                Action::Request { key, peer, req } => {
                    let to = self.of(&peer);
                    self.requests.push((n, to, req.index, self.ms));
                    self.queue.push_back(Msg::Request {
                        to,
                        from: n,
                        req,
                        key,
                    });
                }
                Action::Respond { token, peer, resp } => {
                    let (to, key) = self.tokens.remove(&token).expect("a request to answer");
                    self.nodes[n].core.handle_response_done(now, peer);
                    self.queue.push_back(Msg::Response {
                        to,
                        from: n,
                        key,
                        resp,
                    });
                }
                Action::Read { token, peer, req } => {
                    let resp = match self.nodes[n].store.read_chunk(&req.image, req.index) {
                        Ok(raw) => {
                            let (encoding, payload) = chunk::encode_payload(raw);
                            ChunkResponse::Data { encoding, payload }
                        }
                        Err(_) => ChunkResponse::NotHeld,
                    };
                    self.nodes[n].core.handle_read(now, token, peer, req, resp);
                }
                Action::Store {
                    manifest,
                    image,
                    idx,
                    peer,
                    encoding,
                    payload,
                } => {
                    let store = &*self.nodes[n].store;
                    let result = verify_and_store(store, &manifest, &image, idx, encoding, payload);
                    self.nodes[n]
                        .core
                        .handle_stored(now, image, idx, peer, result);
                }
                Action::Prepare { manifest, times } => {
                    let result = prepare_download(&*self.nodes[n].store, &manifest);
                    self.nodes[n]
                        .core
                        .handle_prepared(now, manifest, times, result);
                }
                Action::Gossip { bytes, .. } => {
                    for to in (0..self.nodes.len()).filter(|&m| m != n) {
                        let bytes = bytes.clone();
                        self.queue.push_back(Msg::Gossip { to, from: n, bytes });
                    }
                }
                Action::Disconnect(_)
                | Action::Touch(_)
                | Action::SaveCounters(_)
                | Action::JoinBridgeheads
                | Action::LeaveBridgeheads
                | Action::Admin { .. }
                | Action::AdminAnswer { .. } => {}
            }
        }
    }

    fn deliver(&mut self, m: Msg) {
        let now = self.now();
        let n = match m {
            Msg::Connected { a, b } => {
                let (pa, pb) = (self.nodes[a].peer, self.nodes[b].peer);
                if self.nodes[a].core.handle_connected(now, pb, true, true) {
                    let hello = self.nodes[a].core.my_hello();
                    self.queue.push_back(Msg::Hello {
                        to: b,
                        from: a,
                        hello,
                    });
                }
                self.drain(a);
                self.nodes[b].core.handle_connected(now, pa, false, true);
                b
            }
            Msg::Hello { to, from, hello } => {
                let token = self.token();
                self.hellos.insert(token, from);
                let pf = self.nodes[from].peer;
                self.nodes[to].core.handle_hello(now, pf, hello, token);
                to
            }
            Msg::HelloReply { to, from, reply } => {
                let pf = self.nodes[from].peer;
                self.nodes[to].core.handle_hello_reply(now, pf, reply);
                to
            }
            Msg::Request { to, from, req, key } => {
                let token = self.token();
                self.tokens.insert(token, (from, key));
                let pf = self.nodes[from].peer;
                self.nodes[to]
                    .core
                    .handle_chunk_request(now, pf, req, token);
                to
            }
            Msg::Response {
                to,
                from,
                key,
                resp,
            } => {
                let pf = self.nodes[from].peer;
                self.nodes[to]
                    .core
                    .handle_chunk_response(now, pf, key, resp);
                to
            }
            Msg::Gossip { to, from, bytes } => {
                let pf = self.nodes[from].peer;
                self.nodes[to]
                    .core
                    .handle_announcement(now, pf, &bytes, false);
                to
            }
        };
        self.drain(n);
    }

    /// Delivers everything on its way, then ticks every core 20 ms later.
    fn step(&mut self) {
        while let Some(m) = self.queue.pop_front() {
            match (&m, self.slow) {
                (Msg::Response { to, .. }, Some((slow, _))) if *to == slow => {
                    self.held_back.push_back(m)
                }
                _ => self.deliver(m),
            }
        }
        if let Some((_, period)) = self.slow {
            if self.ms.is_multiple_of(period) {
                if let Some(m) = self.held_back.pop_front() {
                    self.deliver(m);
                }
            }
        }
        self.ms += 20;
        let now = self.now();
        for n in 0..self.nodes.len() {
            self.nodes[n].core.handle_tick(now);
            self.drain(n);
        }
    }
}

fn keypair(n: u8) -> Keypair {
    Keypair::ed25519_from_bytes([n; 32]).expect("32 bytes")
}

fn image(chunks: usize) -> (Manifest, Vec<u8>) {
    let data: Vec<u8> = (0..chunks * CHUNK)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1])
        .collect();
    let m = Manifest {
        name: "core-test".into(),
        version: "1".into(),
        base: None,
        kind: ObjectKind::Image,
        size: data.len() as u64,
        chunk_size: CHUNK as u32,
        chunks: data.chunks(CHUNK).map(chunk_info).collect(),
    };
    (m, data)
}

/// `count` cores of one IDC and the GIS's index, started; core 0 holds `m` whole.
fn build_net(m: &Manifest, data: &[u8], count: u8) -> Net {
    let admin = keypair(1);
    let gis = keypair(2).public().to_peer_id();
    let gis_addr: Multiaddr = format!("/ip4/10.0.0.1/tcp/1/p2p/{gis}").parse().unwrap();
    let idc = Idc::new("x").unwrap();
    let base = Instant::now();
    let mut nodes = Vec::new();
    for k in 0..count {
        let key = keypair(10 + k);
        let peer = key.public().to_peer_id();
        let cfg = NodeConfig::new(
            key,
            idc.clone(),
            gis_addr.clone(),
            "unused".into(),
            admin.public().to_peer_id(),
        );
        let listen: Multiaddr = format!("/ip4/10.0.1.{}/tcp/1/p2p/{peer}", k + 1)
            .parse()
            .unwrap();
        let store = Arc::new(MemStore::new(1 << 30));
        if k == 0 {
            store.add_manifest(m).unwrap();
            for (i, c) in data.chunks(CHUNK).enumerate() {
                store.write_chunk(&m.id(), i as u32, c).unwrap();
            }
        }
        let core_cfg = CoreConfig::of(&cfg, vec![listen]).unwrap();
        let core = NodeCore::new(
            core_cfg,
            store.clone(),
            None,
            base,
            1_800_000_000_000,
            k as u64,
        )
        .unwrap();
        nodes.push(Node { core, store, peer });
    }
    let mut net = Net {
        nodes,
        index: Index::new(IndexConfig::new(admin.public().to_peer_id(), Policy::Bids)),
        base,
        ms: 0,
        queue: VecDeque::new(),
        tokens: BTreeMap::new(),
        hellos: BTreeMap::new(),
        next: 0,
        requests: Vec::new(),
        slow: None,
        held_back: VecDeque::new(),
        heartbeats: Vec::new(),
        refreshes: Vec::new(),
        dials: Vec::new(),
    };
    for n in 0..net.nodes.len() {
        let now = net.now();
        net.nodes[n].core.start(now);
        net.drain(n);
    }
    net.step();
    net
}

type Started = oneshot::Receiver<Result<watch::Receiver<FetchProgress>, String>>;

/// Core `n` is asked to fetch `m`.
fn fetch(net: &mut Net, n: usize, m: &Manifest) -> Started {
    let (tx, rx) = oneshot::channel();
    let now = net.now();
    net.nodes[n]
        .core
        .handle_fetch(now, ImageQuery::Id(m.id()), Some(tx));
    net.drain(n);
    rx
}

#[test]
fn three_cores_and_the_real_index_distribute_an_image_without_a_network() {
    let (m, data) = image(12);
    let mut net = build_net(&m, &data, 3);
    // Both others fetch at once.
    let mut fetches: Vec<Started> = (1..3).map(|n| fetch(&mut net, n, &m)).collect();
    let mut progress: Vec<Option<watch::Receiver<FetchProgress>>> = vec![None, None];
    for _ in 0..500 {
        net.step();
        for (k, rx) in fetches.iter_mut().enumerate() {
            if let Ok(r) = rx.try_recv() {
                progress[k] = Some(r.expect("the fetch started"));
            }
        }
        let done = progress
            .iter()
            .all(|p| p.as_ref().is_some_and(|p| p.borrow().done.is_some()));
        if done {
            break;
        }
    }
    for (k, p) in progress.iter().enumerate() {
        let p = p.as_ref().expect("the fetch started");
        assert!(
            matches!(p.borrow().done, Some(Ok(_))),
            "node {}: {:?}",
            k + 1,
            p.borrow()
        );
        let store = &net.nodes[k + 1].store;
        for (i, c) in data.chunks(CHUNK).enumerate() {
            assert_eq!(store.read_chunk(&m.id(), i as u32).unwrap(), c, "chunk {i}");
        }
    }
    // The holder served each chunk at least once; the GIS saw both register.
    let served = net.nodes[0]
        .core
        .accounting()
        .image(&m.id())
        .lan_sent_chunks;
    assert!(served >= 12, "{served}");
    let status = net.nodes[1].core.status();
    assert!(status.registered && status.gis_connected, "{status:?}");
}

/// The GIS lengthens the heartbeat interval as its hosts grow in number; registered cores
/// follow what its answers say, and go back to their own pace when it shortens again.
#[test]
fn cores_heartbeat_at_the_pace_the_gis_asks() {
    let (m, data) = image(2);
    let mut net = build_net(&m, &data, 3);
    let admin = keypair(1).public().to_peer_id();
    // One heartbeat a second for the whole GIS: three hosts heartbeat every 3 s, not 2.
    let mut cfg = IndexConfig::new(admin, Policy::Bids);
    cfg.heartbeats_per_s = 1;
    net.index = Index::new(cfg);
    for n in 0..3 {
        // Registered with the new index (the old one is gone): next tick registers again.
        let now = net.now();
        net.nodes[n].core.handle_gis_disconnected(now);
        net.drain(n);
    }
    let run = |net: &mut Net, secs: u64| {
        let until = net.ms + secs * 1000;
        while net.ms < until {
            if net.ms.is_multiple_of(1000) {
                let now_ms = 1_800_000_000_000 + net.ms as i64;
                net.index.pace(now_ms);
            }
            net.step();
        }
    };
    run(&mut net, 10);
    assert_eq!(net.index.heartbeat_secs(), 3);
    let from = net.ms;
    run(&mut net, 30);
    let beats = |net: &Net, from: u64| {
        net.heartbeats
            .iter()
            .filter(|(n, ms)| *n == 0 && *ms >= from)
            .count()
    };
    let paced = beats(&net, from);
    assert!((9..=11).contains(&paced), "{paced} heartbeats in 30 s");
    // The budget goes up: the interval comes back to the node's own 2 s.
    let mut cfg = net.index.config().clone();
    cfg.heartbeats_per_s = 1000;
    let registered: Vec<_> = (0..3).map(|n| net.nodes[n].peer).collect();
    let mut index = Index::new(cfg);
    std::mem::swap(&mut net.index, &mut index);
    for n in 0..3 {
        let now = net.now();
        net.nodes[n].core.handle_gis_disconnected(now);
        net.drain(n);
    }
    run(&mut net, 10);
    assert_eq!(net.index.heartbeat_secs(), 2);
    let from = net.ms;
    run(&mut net, 30);
    let own = beats(&net, from);
    assert!((14..=16).contains(&own), "{own} heartbeats in 30 s");
    assert!(registered.iter().all(|p| net.index.is_registered(p)));
}

#[test]
fn a_host_that_starts_late_asks_the_peers_that_announced_chunks_at_once() {
    let (m, data) = image(24);
    // Core 1 downloads slowly (a chunk every 100 ms): a third done when core 2 starts.
    let mut net = build_net(&m, &data, 3);
    net.slow = Some((1, 100));
    let mut first = fetch(&mut net, 1, &m);
    let mut progress = None;
    for _ in 0..150 {
        net.step();
        if let Ok(r) = first.try_recv() {
            progress = Some(r.expect("the fetch started"));
        }
        let held = progress.as_ref().map_or(0, |p| p.borrow().held);
        if held >= 8 {
            break;
        }
    }
    let held = progress.as_ref().map_or(0, |p| p.borrow().held);
    assert!((8..24).contains(&held), "core 1 holds {held} of 24");
    // Core 2 starts 300 ms later. What core 1 announced so far was heard by core 2 before it had a
    // download to give it to; it must still know at once which chunks core 1 holds, and
    // spread its requests over both holders from the start (not only after the next full
    // announcement round, 2 s later).
    // The chunks it holds now were announced (in a batch) well before core 2 starts.
    let old: Vec<u32> = (0..24u32)
        .filter(|&i| net.nodes[1].store.read_chunk(&m.id(), i).is_ok())
        .collect();
    for _ in 0..15 {
        net.step();
    }
    let since = net.ms;
    let _late = fetch(&mut net, 2, &m);
    for _ in 0..10 {
        net.step();
    }
    let asked = |to: usize| -> Vec<u32> {
        net.requests
            .iter()
            .filter(|&&(f, t, _, ms)| f == 2 && t == to && ms >= since)
            .map(|&(_, _, idx, _)| idx)
            .collect()
    };
    let (of_core0, of_core1) = (asked(0), asked(1));
    assert!(
        of_core1.iter().any(|i| old.contains(i)),
        "in its first 200 ms core 2 asked core 1 for none of the chunks {old:?} it held before \
         (asked core 1 for {of_core1:?}, core 0 for {of_core0:?})"
    );
}

/// A download refreshes its host list every few seconds; while the hosts it could use stay
/// the same, the GIS answers "unchanged" instead of the list (at 64 hosts an IDC's lists
/// were most of the WAN bytes besides chunks). A host that starts holding the image is
/// news: the next refresh gets the whole list, and the download takes it.
#[test]
fn refreshes_get_unchanged_until_the_hosts_change() {
    let (m, data) = image(24);
    let mut net = build_net(&m, &data, 3);
    // Core 1 gets a chunk every 800 ms: about 19 s for the image, so it refreshes often.
    net.slow = Some((1, 800));
    let mut first = fetch(&mut net, 1, &m);
    let mut progress = None;
    let run = |net: &mut Net,
               progress: &mut Option<watch::Receiver<FetchProgress>>,
               first: &mut Started,
               ms: u64| {
        let until = net.ms + ms;
        while net.ms < until {
            net.step();
            if let Ok(r) = first.try_recv() {
                *progress = Some(r.expect("the fetch started"));
            }
        }
    };
    run(&mut net, &mut progress, &mut first, 7_000);
    let before: Vec<&Refresh> = net.refreshes.iter().filter(|r| r.from == 1).collect();
    assert!(before.len() >= 2, "{before:?}");
    assert!(
        before
            .iter()
            .all(|r| r.known.is_some() && r.listed.is_none()),
        "nothing changed, yet: {before:?}"
    );
    // Core 1's link to core 0 closes: the next refresh, answered "unchanged", tries it
    // again, as the whole list would have.
    let closed = net.ms;
    let now = net.now();
    let (p0, p1) = (net.nodes[0].peer, net.nodes[1].peer);
    net.nodes[0].core.handle_closed(now, p1);
    net.nodes[1].core.handle_closed(now, p0);
    net.drain(0);
    net.drain(1);
    run(&mut net, &mut progress, &mut first, 3_200);
    let refreshed = net
        .refreshes
        .iter()
        .find(|r| r.from == 1 && r.ms > closed)
        .map(|r| (r.ms, r.listed.is_none()));
    assert!(matches!(refreshed, Some((_, true))), "{refreshed:?}");
    let redial = net
        .dials
        .iter()
        .find(|&&(f, t, ms)| f == 1 && t == 0 && ms > closed)
        .map(|&(_, _, ms)| ms);
    assert_eq!(
        redial,
        refreshed.map(|(ms, _)| ms),
        "dials: {:?}",
        net.dials
    );
    // Core 2 starts fetching: it publishes a holding, so core 1's list changes.
    let since = net.ms;
    let _second = fetch(&mut net, 2, &m);
    let core2 = net.nodes[2].peer;
    run(&mut net, &mut progress, &mut first, 8_000);
    let after: Vec<&Refresh> = net
        .refreshes
        .iter()
        .filter(|r| r.from == 1 && r.ms >= since)
        .collect();
    let full = after
        .iter()
        .position(|r| r.listed.as_ref().is_some_and(|l| l.contains(&core2)));
    let Some(full) = full else {
        panic!("core 1 never got a list naming core 2: {after:?}")
    };
    // Core 2 completes soon (it is not slow): one list more at most, then "unchanged"
    // again, with the new list's digest.
    let lists = after[full + 1..]
        .iter()
        .filter(|r| r.listed.is_some())
        .count();
    assert!(lists <= 1, "{after:?}");
    assert!(
        after[full + 1..].iter().any(|r| r.listed.is_none()),
        "{after:?}"
    );
    run(&mut net, &mut progress, &mut first, 20_000);
    let p = progress.expect("the fetch started");
    assert!(matches!(p.borrow().done, Some(Ok(_))), "{:?}", p.borrow());
    for (i, c) in data.chunks(CHUNK).enumerate() {
        let got = net.nodes[1].store.read_chunk(&m.id(), i as u32).unwrap();
        assert_eq!(got, c, "chunk {i}");
    }
}
