//! The node's protocol logic as one sans-IO state machine: the GIS session (registration,
//! heartbeats, lookups, publications), the hello exchange's judging and the certificates,
//! serving chunks, downloading them through the scheduler, relaying as a bridgehead
//! (deferred requests, LAN seeding), host lists and announcements, bans, upload and
//! download limits, admitting admin commands.
//!
//! In the style of quinn-proto: the caller feeds events through `handle_*` methods, each
//! with the time it happened, and drains what to do with [`NodeCore::poll_action`]. The
//! core never reads a clock, never touches the network and never blocks on the disk: it
//! asks for a chunk read, a verified write or a download's store preparation with an
//! [`Action`] and hears the result as an event. Inbound requests and outbound requests are
//! named by numbers ([`Token`], [`ReqKey`]); the driver keeps what they stand for (libp2p
//! response channels, request ids). The engine (`crate::engine`) is the driver over
//! libp2p; a simulator can drive the same core over a modelled network.
//!
//! The files: `control.rs` runs the GIS session, hellos and certificates, `serve.rs`
//! answers chunk requests, `fetch.rs` runs downloads and takes host lists, `gossip.rs`
//! announces holdings and runs the periodic work.

mod control;
mod duties;
mod fetch;
mod gossip;
mod serve;

pub use duties::{prepare_download, verify_and_store};

use crate::accounting::{Accounting, PeerKind};
use crate::admin_gate::AdminGate;
use crate::announcer::Announcer;
use crate::cadence::Cadence;
use crate::gate::Link;
use crate::gis_session::{self, GisSession, Unreachable};
use crate::metrics::NodeMetrics;
use crate::payload_cache::PayloadCache;
use crate::peers::Peers;
use crate::ratelimit::DownloadBudget;
use crate::scheduler::{Download, SchedulerConfig, SourceKind};
use crate::seeding::LanSeeder;
use crate::startup::Startup;
use crate::store::{ChunkStore, StoreError};
use crate::uploads::Uploads;
use crate::FetchProgress;
use bids_protocols::admin::{AdminResponse, HostCommand};
use bids_protocols::cert::{BridgeheadCert, Revocations};
use bids_protocols::chunk::{ChunkRequest, ChunkResponse, Encoding};
use bids_protocols::gis::{Counters, GisRequest, GisResponse, HostList, ImageQuery};
use bids_protocols::hello::{Hello, HelloReply};
use bids_protocols::{ChunkIndex, Idc, ImageId, Manifest, Policy, Role};
use bytes::Bytes;
use libp2p::{Multiaddr, PeerId};
use rand::{rngs::StdRng, SeedableRng};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, watch};

/// Chunk reads or writes in flight on the blocking pool before we answer Busy.
const MAX_SERVING: usize = 256;
/// Chunks of one download received and not yet verified and stored, at most: the network
/// keeps its pipeline full while the CPU hashes and writes, within bounded memory.
pub const MAX_WRITING: usize = 16;
/// How long a bridgehead that starts pulling an image waits for the LAN peers the GIS listed
/// to say hello before it tells remote bridgeheads that its IDC lacks a chunk.
const LAN_DISCOVERY_GRACE: Duration = Duration::from_secs(2);
/// Payloads kept for reuse (bytes): a chunk is asked of its holder mostly in the moments
/// after it landed (`crate::payload_cache`). 32 MiB served a 32-host IDC no faster than 16
/// and raised `bids bench rss` from 69 to 90 MiB (goal 100).
const PAYLOAD_CACHE_BYTES: usize = 16 * 1024 * 1024;

/// An inbound chunk request, as the driver names it: the core answers it with
/// [`Action::Respond`] (or [`Action::Read`] first) carrying the same token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Token(pub u64);

/// An outbound chunk request, as the core names it: the driver reports its answer or
/// failure with the same key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReqKey(pub u64);

/// A request to the GIS, as the core names it: the driver reports its answer or failure
/// with the same key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GisKey(pub u64);

type GisSessionOf = GisSession<GisPurpose, GisKey>;

/// Where a fetch's progress is sent once its download exists (or why it does not).
pub type FetchReply = oneshot::Sender<Result<watch::Receiver<FetchProgress>, String>>;

/// What the core asks its driver to do.
#[derive(Debug)]
pub enum Action {
    /// Connect to `peer` at `addrs` (report a failure with [`NodeCore::handle_dial_failed`]).
    Dial {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
    },
    /// Close every connection to `peer`.
    Disconnect(PeerId),
    /// Send a chunk request; its answer comes back through
    /// [`NodeCore::handle_chunk_response`] or [`NodeCore::handle_request_failed`].
    Request {
        key: ReqKey,
        peer: PeerId,
        req: ChunkRequest,
    },
    /// Answer the inbound request `token` (then report [`NodeCore::handle_response_done`]
    /// once it is written, or failed).
    Respond {
        token: Token,
        peer: PeerId,
        resp: ChunkResponse,
    },
    /// Read chunk `req` from the store, encode it and hand the answer back with
    /// [`NodeCore::handle_read`].
    Read {
        token: Token,
        peer: PeerId,
        req: ChunkRequest,
    },
    /// Decode, verify and store a received chunk, then report [`NodeCore::handle_stored`].
    Store {
        manifest: Arc<Manifest>,
        image: ImageId,
        idx: ChunkIndex,
        peer: PeerId,
        encoding: Encoding,
        payload: Bytes,
    },
    /// Check the room for a new download, create its file and record it, then report
    /// [`NodeCore::handle_prepared`].
    Prepare {
        manifest: Arc<Manifest>,
        /// When the fetch was asked and when the GIS answered (the download's start-up).
        times: (Instant, Instant),
    },
    /// Record that the image was used now (a store write).
    Touch(ImageId),
    /// Dial the GIS replica `peer` at `addr` unless connected or dialling (report a
    /// failure with [`NodeCore::handle_gis_dial_failed`]).
    DialGis {
        peer: PeerId,
        addr: Multiaddr,
    },
    /// Send a request to the GIS; its answer comes back through
    /// [`NodeCore::handle_gis_response`] or [`NodeCore::handle_gis_request_failed`].
    GisSend {
        key: GisKey,
        peer: PeerId,
        req: Box<GisRequest>,
    },
    /// Send our hello to `peer` (its answer: [`NodeCore::handle_hello_reply`], or
    /// [`NodeCore::handle_hello_failed`]).
    Hello {
        peer: PeerId,
        hello: Hello,
    },
    /// Answer the hello received as `token`.
    HelloReply {
        token: Token,
        reply: HelloReply,
    },
    /// Join, or leave, the gossip topic of all IDCs' bridgeheads.
    JoinBridgeheads,
    LeaveBridgeheads,
    /// Carry out an admitted admin command (above the engine) and answer `token` with
    /// what it gives.
    Admin {
        token: Token,
        cmd: HostCommand,
    },
    /// Answer the admin request `token`.
    AdminAnswer {
        token: Token,
        response: AdminResponse,
    },
    /// Save the transfer counters that changed (they survive a restart).
    SaveCounters(Vec<(ImageId, Counters)>),
    /// Publish an announcement on the IDC's gossip topic, and on the bridgeheads' topic too
    /// if `bridgeheads`.
    Gossip {
        bytes: Vec<u8>,
        bridgeheads: bool,
    },
}

/// Why a received chunk was not stored: the sender's fault, or ours.
#[derive(Debug)]
pub enum StoreFail {
    /// The data does not decode, has the wrong length or fails its SHA-256: the sender is
    /// penalised.
    Corrupt(String),
    /// The chunk verified but our store could not keep it (a full disk, an I/O error): no
    /// sender is to blame, and the download stops.
    Local(StoreError),
}

/// What the store says about an image it just prepared for a download.
#[derive(Debug)]
pub struct Prepared {
    pub held: Vec<bool>,
    pub held_chunks: u32,
}

/// Why a GIS request was sent: who gets its answer.
pub enum GisPurpose {
    Register,
    /// A registration someone waits for (a certificate change): the granted role or why not.
    RegisterFor(oneshot::Sender<Result<Role, String>>),
    Heartbeat,
    Publish,
    Unpublish,
    Lookup {
        image: ImageQuery,
        for_fetch: Option<FetchReply>,
        /// When the fetch (or refresh) was asked: a download's start-up counts from it.
        asked: Instant,
    },
    /// A request made on behalf of a caller of `NodeHandle::gis_request`.
    Caller(oneshot::Sender<Result<GisResponse, String>>),
}

impl std::fmt::Debug for GisPurpose {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            GisPurpose::Register => "Register",
            GisPurpose::RegisterFor(_) => "RegisterFor",
            GisPurpose::Heartbeat => "Heartbeat",
            GisPurpose::Publish => "Publish",
            GisPurpose::Unpublish => "Unpublish",
            GisPurpose::Lookup { .. } => "Lookup",
            GisPurpose::Caller(_) => "Caller",
        };
        f.write_str(name)
    }
}

impl gis_session::Purpose for GisPurpose {
    /// While the GIS is unreachable nothing is sent to it (each request would make the
    /// swarm dial it again). What repeats on its own is dropped (registering again
    /// re-publishes everything); a download's refresh fails (it asks again later); what
    /// someone waits for is held.
    fn when_unreachable(&self) -> Unreachable {
        match self {
            GisPurpose::Register | GisPurpose::Heartbeat | GisPurpose::Publish => Unreachable::Drop,
            GisPurpose::Lookup {
                for_fetch: None, ..
            } => Unreachable::Fail,
            _ => Unreachable::Hold,
        }
    }

    /// Lookups and callers' requests: on a slow or saturated link a GIS answer can time
    /// out, and one lost answer must not fail a download (registrations, heartbeats and
    /// publications repeat on their own).
    fn resent(&self) -> bool {
        matches!(self, GisPurpose::Lookup { .. } | GisPurpose::Caller(_))
    }
}

/// What the core needs of the node's configuration.
#[derive(Clone, Debug)]
pub struct CoreConfig {
    pub me: PeerId,
    pub idc: Idc,
    pub policy: Policy,
    /// The addresses we listen on (registered with the GIS unless `external_addrs`).
    pub listen: Vec<Multiaddr>,
    pub external_addrs: Vec<Multiaddr>,
    /// The GIS, or each replica of its Raft group: peer id and address.
    pub gis: Vec<(PeerId, Multiaddr)>,
    pub admin_peer: PeerId,
    /// The bridgehead certificate the node starts with.
    pub cert: Option<BridgeheadCert>,
    pub heartbeat: Duration,
    pub cert_warn: Duration,
    pub scheduler: SchedulerConfig,
    pub lookup_refresh: Duration,
    pub no_source_timeout: Duration,
    pub ban_duration: Duration,
    pub upload_bps: u64,
    pub download_bps: u64,
    pub sharing: bool,
}

impl CoreConfig {
    /// The core's share of `cfg`, for a node listening on `listen` (the GIS replicas as
    /// the configuration names them).
    pub fn of(cfg: &crate::NodeConfig, listen: Vec<Multiaddr>) -> Result<CoreConfig, String> {
        Ok(CoreConfig {
            me: cfg.keypair.public().to_peer_id(),
            idc: cfg.idc.clone(),
            policy: cfg.policy,
            listen,
            external_addrs: cfg.external_addrs.clone(),
            gis: cfg.gis_replicas()?,
            admin_peer: cfg.admin_peer,
            cert: cfg.cert.clone(),
            heartbeat: cfg.heartbeat,
            cert_warn: cfg.cert_warn,
            scheduler: cfg.scheduler.clone(),
            lookup_refresh: cfg.lookup_refresh,
            no_source_timeout: cfg.no_source_timeout,
            ban_duration: cfg.ban_duration,
            upload_bps: cfg.upload_bps,
            download_bps: cfg.download_bps,
            sharing: cfg.sharing,
        })
    }
}

/// A chunk request from a peer whose hello exchange is still pending. We dialled it and
/// sent our hello; it accepted us and asked for chunks at once (0-RTT stream negotiation),
/// so a request can arrive just before its welcome. Served once the welcome is judged,
/// refused if the peer is (`crate::peers`).
type EarlyRequest = (ChunkRequest, Token);
/// A chunk response waiting for its turn to one peer.
type QueuedResponse = (Token, ImageId, ChunkResponse, Link);
/// A deferred chunk request: the request to answer and who asked.
type Waiter = (Token, PeerId);

/// One running download.
struct DownloadState {
    manifest: Arc<Manifest>,
    sched: Download,
    started: Instant,
    progress: watch::Sender<FetchProgress>,
    /// Sources from host lists and announcements that are not (yet) hello-accepted.
    candidates: HashMap<PeerId, (SourceKind, bool)>,
    /// Ranges announced by peers not yet added to the scheduler.
    pending_haves: HashMap<PeerId, Vec<(u32, u32)>>,
    /// Peers added to the scheduler.
    active: HashSet<PeerId>,
    /// When it asks the GIS again, publishes its progress, gives up for want of a source.
    cadence: Cadence,
    /// `HostList::digest` of the last host list taken, sent with each refresh so the GIS
    /// can answer "unchanged" instead of the list; `None` when a candidate was dropped
    /// since (the next answer is a whole list that offers it again).
    list_digest: Option<u64>,
    /// Where the first second went (lookup, first source, first request, first byte).
    startup: Startup,
    /// Whether our IDC held a chunk we lacked at the last look, and when that was
    /// (`NodeCore::note_lan_availability`).
    lan_available: (bool, Instant),
}

/// The node's data plane (see the module's documentation).
pub struct NodeCore {
    cfg: CoreConfig,
    /// The time of the event being handled: every decision made for one event sees it.
    now: Instant,
    /// A wall-clock reading (unix ms) and the instant it was taken: wall times the core
    /// reports (a completed download's) are derived from `now`, not read.
    wall: (Instant, i64),
    rng: StdRng,
    /// Queried for what it holds (memory reads); reads and writes go out as actions.
    store: Arc<dyn ChunkStore>,
    /// The node's Prometheus metrics (none in a simulation).
    metrics: Option<Arc<NodeMetrics>>,
    /// The role the GIS granted at the last registration.
    role: Role,
    actions: VecDeque<Action>,
    /// The GIS replicas (the session says which is in use).
    gis_peers: Vec<(PeerId, Multiaddr)>,
    /// Connected and registered or not, redials, held and pending requests.
    gis: GisSessionOf,
    next_gis_key: u64,
    /// The bridgehead certificate this node presents now. It starts as the configuration's;
    /// an admin's `set_cert`, its expiry or the GIS refusing it change it here.
    cert: Option<BridgeheadCert>,
    revocations: Revocations,
    /// When the certificates of the bridgeheads of other IDCs we accepted end (unix seconds,
    /// from their hellos): their connections close then.
    wan_cert_ends: HashMap<PeerId, i64>,
    /// When we last warned that our own certificate is about to expire.
    cert_warned: Option<Instant>,
    admin_gate: AdminGate,
    last_heartbeat: Instant,
    /// The heartbeat interval the GIS asked for last (it grows with the hosts it serves);
    /// heartbeats go out at this or `cfg.heartbeat`, whichever is longer.
    gis_heartbeat: Duration,
    last_metrics_sample: Instant,
    /// Connected peers and where each stands in the hello exchange.
    peers: Peers<EarlyRequest>,
    /// Peers with at least one connection, and those being dialled.
    connected: HashSet<PeerId>,
    dialing: HashSet<PeerId>,
    addrs: HashMap<PeerId, Vec<Multiaddr>>,
    downloads: HashMap<ImageId, DownloadState>,
    /// Downloads whose store is being prepared, with the host lists (and the fetches) that
    /// wait for it.
    preparing: HashMap<ImageId, Vec<(HostList, Option<FetchReply>)>>,
    /// Deferred chunk requests (a bridgehead answers when the chunk arrives).
    waiters: HashMap<(ImageId, ChunkIndex), Vec<Waiter>>,
    inflight: HashMap<ReqKey, (ImageId, ChunkIndex, PeerId)>,
    next_key: u64,
    acct: Accounting,
    /// Chunk reads in flight.
    serving: usize,
    payload_cache: PayloadCache,
    /// When to tell the IDC what we hold (`crate::announcer`).
    announcer: Announcer,
    /// Peers banned node-wide for serving corrupt chunks, until when: no download asks them
    /// for anything and no chunk from them is accepted; reported to the GIS.
    bans: HashMap<PeerId, Instant>,
    /// Chunk responses being written to each peer, those waiting for their turn or for the
    /// upload limit (`crate::uploads`).
    uploads: Uploads<QueuedResponse>,
    /// Charged as chunk requests leave, settled by their answers (`crate::ratelimit`).
    download: DownloadBudget<ReqKey>,
    sharing: bool,
    /// Which host of our IDC each chunk we relayed went to (a bridgehead sends each chunk
    /// into its LAN about once; see `crate::seeding`).
    seeder: LanSeeder,
    /// WAN super-seeding: which fetching IDC's bridgehead got each chunk of an image we
    /// hold whole.
    wan_seeder: LanSeeder,
    /// What peers announced of images we are not downloading (a download starts with it).
    heard: crate::heard::Heard,
}

impl NodeCore {
    /// A core that starts at `now`; `wall_ms` is the unix time at `now`, `seed` seeds its
    /// random draws (the schedulers' tie-breaking, backoff jitter). Call [`NodeCore::start`]
    /// next.
    pub fn new(
        cfg: CoreConfig,
        store: Arc<dyn ChunkStore>,
        metrics: Option<Arc<NodeMetrics>>,
        now: Instant,
        wall_ms: i64,
        seed: u64,
    ) -> Result<NodeCore, String> {
        if cfg.gis.is_empty() {
            return Err("no GIS address is configured".into());
        }
        let gis_ids: Vec<PeerId> = cfg.gis.iter().map(|(p, _)| *p).collect();
        Ok(NodeCore {
            gis: GisSession::new(cfg.gis.iter().map(|(_, a)| a.to_string()).collect(), now),
            gis_peers: cfg.gis.clone(),
            next_gis_key: 0,
            cert: cfg.cert.clone(),
            revocations: Revocations::default(),
            wan_cert_ends: HashMap::new(),
            cert_warned: None,
            admin_gate: AdminGate::new(cfg.admin_peer, gis_ids, cfg.me),
            last_heartbeat: now,
            gis_heartbeat: Duration::ZERO,
            last_metrics_sample: now,
            acct: Accounting::restore(store.saved_counters()),
            uploads: Uploads::new(cfg.upload_bps, now),
            download: DownloadBudget::new(cfg.download_bps, now),
            sharing: cfg.sharing,
            announcer: Announcer::new(now),
            now,
            wall: (now, wall_ms),
            rng: StdRng::seed_from_u64(seed),
            store,
            metrics,
            role: Role::Host,
            actions: VecDeque::new(),
            peers: Peers::default(),
            connected: HashSet::new(),
            dialing: HashSet::new(),
            addrs: HashMap::new(),
            downloads: HashMap::new(),
            preparing: HashMap::new(),
            waiters: HashMap::new(),
            inflight: HashMap::new(),
            next_key: 0,
            serving: 0,
            payload_cache: PayloadCache::new(PAYLOAD_CACHE_BYTES),
            bans: HashMap::new(),
            seeder: LanSeeder::default(),
            wan_seeder: LanSeeder::with_resend(crate::seeding::WAN_RESEND_AFTER),
            heard: crate::heard::Heard::default(),
            cfg,
        })
    }

    /// The next thing to do, if any. Drain after every `handle_*` call.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    fn push(&mut self, a: Action) {
        self.actions.push_back(a);
    }

    fn at(&mut self, now: Instant) {
        self.now = now;
    }

    /// Unix milliseconds at `self.now`, from the reading the core was given.
    fn wall_ms(&self) -> i64 {
        let since = self.now.saturating_duration_since(self.wall.0);
        self.wall
            .1
            .saturating_add(i64::try_from(since.as_millis()).unwrap_or(i64::MAX))
    }

    // ---------------------------------------------------------------- role and settings

    pub fn set_limits(&mut self, now: Instant, upload_bps: u64, download_bps: u64) {
        self.at(now);
        self.uploads.set_rate(upload_bps, now);
        self.download.set_rate(download_bps, now);
    }

    pub fn set_sharing(&mut self, enabled: bool) {
        self.sharing = enabled;
    }

    pub fn settings(&self) -> bids_protocols::gis::HostSettings {
        bids_protocols::gis::HostSettings {
            upload_bps: self.uploads.rate(),
            download_bps: self.download.rate(),
            sharing: self.sharing,
        }
    }

    /// The transfer counters (for heartbeats, status and saving).
    pub fn accounting(&self) -> &Accounting {
        &self.acct
    }

    /// The per-image counters changed since the last call (to save: they survive a restart).
    pub fn take_counters(&mut self) -> Vec<(ImageId, Counters)> {
        self.acct.take_dirty()
    }

    /// Banned peers and how long each ban still lasts.
    pub fn bans(&self) -> Vec<(PeerId, Duration)> {
        self.bans
            .iter()
            .map(|(p, until)| (*p, until.saturating_duration_since(self.now)))
            .collect()
    }

    fn link_of(&self, peer: &PeerId) -> Option<Link> {
        self.peers.link_of(peer)
    }

    /// Whom bytes exchanged with an accepted peer count for.
    fn kind_of(&self, peer: &PeerId) -> Option<PeerKind> {
        self.peers.kind_of(peer)
    }

    // ---------------------------------------------------------------- connections

    /// A connection to `peer` is up (the GIS's connections are not the core's business).
    /// True if our hello should be sent now.
    pub fn handle_connected(
        &mut self,
        now: Instant,
        peer: PeerId,
        dialer: bool,
        first: bool,
    ) -> bool {
        self.at(now);
        self.dialing.remove(&peer);
        self.connected.insert(peer);
        (first || self.peers.contains(&peer)) && self.peers.connected(peer, now, dialer)
    }

    /// The last connection to `peer` closed.
    pub fn handle_closed(&mut self, now: Instant, peer: PeerId) {
        self.at(now);
        self.connected.remove(&peer);
        // Requests held for it can no longer be answered, nor responses delivered (the
        // driver forgets their tokens).
        self.peers.closed(&peer);
        self.wan_cert_ends.remove(&peer);
        self.seeder.forget_host(&peer);
        self.wan_seeder.forget_host(&peer);
        self.heard.forget_peer(&peer);
        self.uploads.closed(&peer);
        for d in self.downloads.values_mut() {
            if d.active.remove(&peer) {
                d.sched.remove_peer(&peer);
            }
        }
    }

    /// A dial of `peer` failed: it is no candidate source any more.
    pub fn handle_dial_failed(&mut self, now: Instant, peer: PeerId) {
        self.at(now);
        self.dialing.remove(&peer);
        for d in self.downloads.values_mut() {
            if d.candidates.remove(&peer).is_some() {
                d.list_digest = None;
            }
        }
    }

    /// Addresses `peer` says it listens on.
    pub fn handle_addrs(&mut self, peer: PeerId, addrs: Vec<Multiaddr>) {
        let addrs = addrs
            .into_iter()
            .take(bids_protocols::gis::MAX_ADDRS)
            .collect();
        self.addrs.insert(peer, addrs);
    }

    /// `peer`'s hello was judged and accepted on `link`.
    fn accepted(&mut self, peer: PeerId, link: Link, certified: bool) {
        let now = self.now;
        let early = self.peers.accept(peer, link, certified);
        if link == Link::Wan && !self.downloads.is_empty() {
            // A bridgehead of another IDC that trades with us missed our incremental
            // announcements while unconnected: repeat the full ones now (a moment later,
            // once gossipsub has swapped subscriptions), not at the next periodic round.
            self.announcer.remote_joined(now);
        }
        // Sources waiting for this peer's hello join their downloads now.
        let ids: Vec<ImageId> = self.downloads.keys().copied().collect();
        for id in ids {
            self.activate(&id, &peer);
        }
        self.release_early(peer, early);
    }

    /// Chunk requests held while `peer`'s hello was pending go through the usual door now
    /// that it is settled: served if the peer was accepted, refused (and counted) if it was
    /// refused, gone, or its hello timed out.
    fn release_early(&mut self, peer: PeerId, early: Vec<EarlyRequest>) {
        for (req, token) in early {
            self.handle_chunk_request(self.now, peer, req, token);
        }
    }

    // ---------------------------------------------------------------- commands

    /// An image was imported into the store: the GIS hears of it.
    pub fn handle_imported(&mut self, now: Instant, id: ImageId) {
        self.at(now);
        self.publish(&id, false);
    }

    /// An image was removed from the store.
    pub fn handle_removed(&mut self, now: Instant, id: ImageId) {
        self.at(now);
        self.downloads.remove(&id);
        self.acct.forget(&id);
        self.seeder.forget(&id);
        self.wan_seeder.forget(&id);
        self.payload_cache.forget(&id);
        self.gis_request(GisRequest::Unpublish { image: id }, GisPurpose::Unpublish);
    }

    /// What the node reports of each image in its store.
    pub fn image_reports(&self) -> Vec<crate::ImageReport> {
        self.store
            .list()
            .into_iter()
            .map(|s| crate::ImageReport {
                counters: self.acct.image(&s.id),
                fetching: self.downloads.contains_key(&s.id),
                image: s.image,
                id: s.id,
                size: s.size,
                chunk_size: s.chunk_size,
                held: s.held,
                total: s.total,
                complete: s.complete,
            })
            .collect()
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.len() <= n {
        s.to_string()
    } else {
        let mut end = n;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &s[..end])
    }
}
