//! The host daemon's event loop: the one task that owns the libp2p `Swarm`. It registers with
//! the GIS, gates connections (hello + certificates), serves chunks, drives downloads through
//! the sans-IO scheduler, relays chunks as a bridgehead (cut-through, deferred requests) and
//! announces what it gains on its IDC's gossipsub topic. Disk work and hashing run on the
//! blocking pool; their results come back as internal events.

use crate::accounting::{Accounting, PeerKind};
use crate::admin_gate::AdminGate;
use crate::announcer::Announcer;
use crate::cadence::{Cadence, Pace};
use crate::config::NodeConfig;
use crate::gate::{self, Link, RefusalReason};
use crate::gis_session::{self, Connected, GisSession, Step, Unreachable};
use crate::metrics::NodeMetrics;
use crate::payload_cache::PayloadCache;
use crate::peers::{Early, Peers, HELLO_TIMEOUT};
use crate::ratelimit::DownloadBudget;
use crate::scheduler::{Download, Failure, SourceKind};
use crate::seeding::{LanSeeder, Verdict};
use crate::serving::{self, Serve};
use crate::startup::{Startup, StartupReport};
use crate::store::{Store, StoreError};
use crate::transport::{self, TransportOptions};
use crate::uploads::Uploads;
use bids_protocols::admin::{self as adminp, AdminRequest, AdminResponse, HostCommand};
use bids_protocols::cert::{BridgeheadCert, Revocations};
use bids_protocols::chunk::{self, ChunkRequest, ChunkResponse, Encoding};
use bids_protocols::gis::{
    self as gisp, Counters, ErrorKind, GisRequest, GisResponse, Holding, HostEntry, HostList,
    HostSettings, ImageQuery,
};
use bids_protocols::gossip::{self, Announcement, Have};
use bids_protocols::hello::{self, Hello, HelloReply};
use bids_protocols::{ChunkIndex, Idc, ImageId, ImageRef, Manifest, Policy, Role};
use bytes::Bytes;
use futures::StreamExt;
use libp2p::request_response::{self as rr, OutboundRequestId, ProtocolSupport, ResponseChannel};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{gossipsub, identify, ping, Multiaddr, PeerId, Swarm};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn, Instrument};

/// How often the loop ticks to drive schedulers, expire requests and flush announcements.
const TICK: Duration = Duration::from_millis(20);
/// While this node's bridgehead certificate is about to expire, the warning repeats this often.
const CERT_WARN_EVERY: Duration = Duration::from_secs(86_400);
/// Chunk reads or writes in flight on the blocking pool before we answer Busy.
const MAX_SERVING: usize = 256;
/// The topic on which bridgeheads of all IDCs announce what they hold, so fetching IDCs can
/// trade chunks among themselves instead of each pulling everything from the origin.
const BRIDGEHEAD_TOPIC: &str = "bids/bridgeheads/chunks";
/// Chunks of one download received and not yet verified and stored, at most: the network
/// keeps its pipeline full while the CPU hashes and writes, within bounded memory.
pub const MAX_WRITING: usize = 16;
/// How long a bridgehead that starts pulling an image waits for the LAN peers the GIS listed
/// to say hello before it tells remote bridgeheads that its IDC lacks a chunk.
const LAN_DISCOVERY_GRACE: Duration = Duration::from_secs(2);
/// How often the metrics' gauges are sampled from the engine's state (readiness follows).
const METRICS_SAMPLE: Duration = Duration::from_millis(200);
/// Compressed payloads kept for reuse (bytes) (a bridgehead serves one chunk to many hosts).
const PAYLOAD_CACHE_BYTES: usize = 32 * 1024 * 1024;

#[derive(NetworkBehaviour)]
pub(crate) struct Behaviour {
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    gossipsub: gossipsub::Behaviour,
    hello: rr::Behaviour<hello::Codec>,
    chunk: rr::Behaviour<chunk::Codec>,
    gis: rr::Behaviour<gisp::Codec>,
    /// Signed admin commands relayed by the GIS (`crate::admin`).
    admin: rr::Behaviour<adminp::Codec>,
}

/// Progress of one download, as watchers see it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FetchProgress {
    pub image: ImageRef,
    pub id: ImageId,
    pub held: u32,
    pub total: u32,
    pub size: u64,
    /// `Some(Ok(seconds))` when complete and verified, `Some(Err(reason))` when failed.
    pub done: Option<Result<f64, String>>,
    /// Where the start-up went, once the first chunk data has arrived.
    #[serde(default)]
    pub startup: Option<StartupReport>,
}

/// One image as `bids image status` shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ImageReport {
    pub image: ImageRef,
    pub id: ImageId,
    pub size: u64,
    pub chunk_size: u32,
    pub held: u32,
    pub total: u32,
    pub complete: bool,
    pub fetching: bool,
    pub counters: Counters,
}

/// The node as a whole.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeStatus {
    pub peer: PeerId,
    pub idc: Idc,
    pub role: Role,
    pub policy: Policy,
    pub listen: Vec<Multiaddr>,
    pub gis_connected: bool,
    /// The GIS accepted our registration.
    pub registered: bool,
    pub connected_peers: usize,
    /// Bridgeheads of other IDCs whose hello we accepted (a bridgehead under BIDS keeps
    /// these links open).
    #[serde(default)]
    pub wan_links: usize,
    pub images: Vec<ImageReport>,
    pub total: Counters,
    pub refusals: u64,
    pub bad_chunks_served_to_us: u64,
    /// Peers banned node-wide for serving corrupt chunks, with the seconds left on the ban.
    #[serde(default)]
    pub banned_peers: Vec<(PeerId, u64)>,
    /// Rate limits and sharing now.
    pub settings: HostSettings,
    /// When this node's bridgehead certificate expires (unix seconds); `None` without one.
    #[serde(default)]
    pub cert_expires_at: Option<i64>,
    /// It expires within the configured warning period (`--cert-warn-days`).
    #[serde(default)]
    pub cert_expiring: bool,
}

/// Requests to the event loop.
pub(crate) enum Command {
    Fetch {
        image: ImageQuery,
        reply: oneshot::Sender<Result<watch::Receiver<FetchProgress>, String>>,
    },
    Status {
        reply: oneshot::Sender<NodeStatus>,
    },
    /// The store gained a complete image (imported through the control socket): publish it.
    Imported {
        id: ImageId,
    },
    /// An image was removed from the store: tell the GIS.
    Removed {
        id: ImageId,
    },
    SetLimits {
        upload_bps: u64,
        download_bps: u64,
    },
    SetSharing {
        enabled: bool,
    },
    /// Take (or, with `None`, drop) a bridgehead certificate and re-register; replies with
    /// the role the GIS granted.
    SetCert {
        cert: Option<Box<BridgeheadCert>>,
        reply: oneshot::Sender<Result<Role, String>>,
    },
    /// Any GIS request, sent over the node's own GIS connection.
    Gis {
        req: Box<GisRequest>,
        reply: oneshot::Sender<Result<GisResponse, String>>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

/// Results of work done off the loop.
enum Internal {
    /// The store is ready for a new download of `manifest` (or why not): the host lists
    /// that waited for it are taken now.
    Prepared {
        manifest: Arc<Manifest>,
        /// When the fetch was asked and when the GIS answered (the download's start-up).
        times: (Instant, Instant),
        result: Result<Prepared, String>,
    },
    /// An admin command was carried out (by the executor above the engine): answer the GIS.
    AdminDone {
        channel: ResponseChannel<AdminResponse>,
        response: AdminResponse,
    },
    Stored {
        image: ImageId,
        idx: ChunkIndex,
        peer: PeerId,
        result: Result<(Encoding, Bytes), StoreFail>,
    },
    Served {
        channel: ResponseChannel<ChunkResponse>,
        peer: PeerId,
        image: ImageId,
        index: ChunkIndex,
        response: ChunkResponse,
    },
}

/// Aborts a task when dropped (a helper task lives exactly as long as the engine).
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Why a received chunk was not stored: the sender's fault, or ours.
#[derive(Debug)]
enum StoreFail {
    /// The data does not decode, has the wrong length or fails its SHA-256: the sender is
    /// penalised.
    Corrupt(String),
    /// The chunk verified but our store could not keep it (a full disk, an I/O error): no
    /// sender is to blame, and the download stops.
    Local(crate::store::StoreError),
}

/// What the store says about an image it just prepared for a download.
struct Prepared {
    held: Vec<bool>,
    held_chunks: u32,
}

/// Where a fetch's progress is sent once its download exists (or why it does not).
type FetchReply = oneshot::Sender<Result<watch::Receiver<FetchProgress>, String>>;

/// Checks the room for `m`, creates its sparse file and records it (file create, sled
/// transaction, flush): blocking work, run off the event loop.
fn prepare_download(store: &Store, m: &Manifest) -> Result<Prepared, String> {
    if let Err(e) = store.check_space(m) {
        warn!(image = %m.image_ref(), error = %e, "not starting a download");
        return Err(e.to_string());
    }
    store
        .add_manifest(m)
        .map_err(|e| format!("cannot prepare the store: {e}"))?;
    let id = m.id();
    Ok(Prepared {
        held: store.held(&id).unwrap_or_default(),
        held_chunks: store.status(&id).map(|s| s.held).unwrap_or(0),
    })
}

/// A chunk request from a peer whose hello exchange is still pending. We dialled it and
/// sent our hello; it accepted us and asked for chunks at once (0-RTT stream negotiation),
/// so a request can arrive just before its welcome. Served once the welcome is judged,
/// refused if the peer is (`crate::peers`).
type EarlyRequest = (ChunkRequest, ResponseChannel<ChunkResponse>);

/// A chunk response waiting for its turn to one peer.
type QueuedResponse = (ResponseChannel<ChunkResponse>, ImageId, ChunkResponse, Link);
/// A deferred chunk request: the channel to answer and who asked.
type Waiter = (ResponseChannel<ChunkResponse>, PeerId);

/// Why a download runs.
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
    /// Where the first second went (lookup, first source, first request, first byte).
    startup: Startup,
    /// Whether our IDC held a chunk we lacked at the last look, and when that was
    /// (`Engine::note_lan_availability`).
    lan_available: (bool, Instant),
}

enum GisPurpose {
    Register,
    /// A registration someone waits for (a certificate change): the granted role or why not.
    RegisterFor(oneshot::Sender<Result<Role, String>>),
    Heartbeat,
    Publish,
    Unpublish,
    Lookup {
        image: ImageQuery,
        for_fetch: Option<oneshot::Sender<Result<watch::Receiver<FetchProgress>, String>>>,
        /// When the fetch (or refresh) was asked: a download's start-up counts from it.
        asked: Instant,
    },
    /// A request made on behalf of a caller of `NodeHandle::gis_request`.
    Caller(oneshot::Sender<Result<GisResponse, String>>),
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

/// An admin command the engine admitted, for the executor above it (`crate::admin`); the
/// answer goes back on `reply` and from there to the GIS.
pub(crate) struct AdminJob {
    pub(crate) cmd: HostCommand,
    pub(crate) reply: oneshot::Sender<AdminResponse>,
}

/// Admitted admin commands waiting for the executor; more are answered "failed, busy".
pub(crate) const ADMIN_QUEUE: usize = 64;

/// A handle that keeps neither the node running (its command channel closes when the last
/// `NodeHandle` goes) nor its store open (a restarted node reopens the same directory).
#[derive(Clone)]
pub(crate) struct WeakNodeHandle {
    tx: mpsc::WeakSender<Command>,
    peer: PeerId,
    listen: Vec<Multiaddr>,
    store: std::sync::Weak<Store>,
    metrics_addr: Option<std::net::SocketAddr>,
}

impl WeakNodeHandle {
    /// The node, if it still has a handle somewhere.
    pub(crate) fn upgrade(&self) -> Option<NodeHandle> {
        Some(NodeHandle {
            tx: self.tx.upgrade()?,
            peer: self.peer,
            listen: self.listen.clone(),
            store: self.store.upgrade()?,
            metrics_addr: self.metrics_addr,
        })
    }
}

/// A running node: a cheap handle to its event loop.
#[derive(Clone)]
pub struct NodeHandle {
    tx: mpsc::Sender<Command>,
    peer: PeerId,
    listen: Vec<Multiaddr>,
    store: Arc<Store>,
    metrics_addr: Option<std::net::SocketAddr>,
}

impl NodeHandle {
    pub(crate) fn downgrade(&self) -> WeakNodeHandle {
        WeakNodeHandle {
            tx: self.tx.downgrade(),
            peer: self.peer,
            listen: self.listen.clone(),
            store: Arc::downgrade(&self.store),
            metrics_addr: self.metrics_addr,
        }
    }

    /// Where `/metrics`, `/healthz` and `/readyz` are served (`NodeConfig::metrics`).
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics_addr
    }

    pub fn peer_id(&self) -> PeerId {
        self.peer
    }

    /// Addresses the node listens on (with real ports), each ending in `/p2p/<peer id>`.
    pub fn listen_addrs(&self) -> &[Multiaddr] {
        &self.listen
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Starts (or joins) a download and returns a watch on its progress.
    pub async fn fetch(&self, image: ImageQuery) -> Result<watch::Receiver<FetchProgress>, String> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Fetch { image, reply }).await?;
        rx.await.map_err(|_| "node stopped".to_string())?
    }

    /// Fetches and waits for the end; returns the provision time in seconds.
    pub async fn fetch_and_wait(&self, image: ImageQuery) -> Result<f64, String> {
        let mut rx = self.fetch(image).await?;
        loop {
            if let Some(done) = rx.borrow().done.clone() {
                return done;
            }
            if rx.changed().await.is_err() {
                return Err("node stopped during the download".into());
            }
        }
    }

    pub async fn status(&self) -> Result<NodeStatus, String> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Status { reply }).await?;
        rx.await.map_err(|_| "node stopped".to_string())
    }

    pub async fn imported(&self, id: ImageId) -> Result<(), String> {
        self.send(Command::Imported { id }).await
    }

    pub async fn removed(&self, id: ImageId) -> Result<(), String> {
        self.send(Command::Removed { id }).await
    }

    pub async fn set_limits(&self, upload_bps: u64, download_bps: u64) -> Result<(), String> {
        self.send(Command::SetLimits {
            upload_bps,
            download_bps,
        })
        .await
    }

    pub async fn set_sharing(&self, enabled: bool) -> Result<(), String> {
        self.send(Command::SetSharing { enabled }).await
    }

    /// Becomes a bridgehead with `cert` (or an ordinary host with `None`) and re-registers;
    /// returns the role the GIS granted.
    pub async fn set_cert(&self, cert: Option<BridgeheadCert>) -> Result<Role, String> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::SetCert {
            cert: cert.map(Box::new),
            reply,
        })
        .await?;
        rx.await.map_err(|_| "node stopped".to_string())?
    }

    /// Sends any request to the GIS over the node's connection and returns the answer.
    pub async fn gis_request(&self, req: GisRequest) -> Result<GisResponse, String> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Gis {
            req: Box::new(req),
            reply,
        })
        .await?;
        rx.await.map_err(|_| "node stopped".to_string())?
    }

    /// Stops the node and waits until its store is flushed.
    pub async fn shutdown(&self) {
        let (reply, rx) = oneshot::channel();
        if self.send(Command::Shutdown { reply }).await.is_ok() {
            let _ = rx.await;
        }
    }

    async fn send(&self, c: Command) -> Result<(), String> {
        self.tx
            .send(c)
            .await
            .map_err(|_| "node stopped".to_string())
    }
}

/// Keeps chunk-sized buffers inside glibc's malloc arenas instead of handing them back to the
/// kernel after every chunk.
///
/// By default glibc serves blocks above a dynamic threshold with fresh `mmap`s and trims an
/// arena (`madvise`) once about 2 × 1 MiB sits free at its top. Chunk buffers (read,
/// encoded, framed, decrypted) are allocated and freed on different threads, so with the
/// defaults every chunk costs hundreds of page faults and page clears: `bids bench loopback`
/// measured a fifth of a node's CPU time there. Fixed thresholds stop that; what an arena
/// keeps is bounded by the buffers once in flight at the same time, not by image sizes
/// (`bids bench rss`: about +4 MiB peak). Process-wide, set once.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        /// Above the largest buffer of a default 1 MiB chunk and its framing.
        const MMAP_THRESHOLD: libc::c_int = 4 << 20;
        /// Free memory an arena may keep at its top.
        const TRIM_THRESHOLD: libc::c_int = 32 << 20;
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            // SAFETY: mallopt only changes allocator parameters (under glibc's own locks);
            // it touches no memory of ours.
            let ok = unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                    && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
            };
            if !ok {
                debug!("malloc thresholds not changed; chunk buffers may be re-faulted");
            }
        });
    }
}

/// Starts a node's event loop: opens the store, binds, connects to the GIS; returns once
/// listening. Admitted admin commands go out on `admin_jobs` (`crate::start` wires them to
/// their executor).
pub(crate) async fn start(
    cfg: NodeConfig,
    admin_jobs: mpsc::Sender<AdminJob>,
) -> anyhow::Result<(NodeHandle, tokio::task::JoinHandle<()>)> {
    use anyhow::Context;
    cfg.validate().map_err(anyhow::Error::msg)?;
    tune_allocator();
    let store_dir = cfg.store_dir.clone();
    let verify_reads = cfg.verify_reads;
    let store = Arc::new(
        tokio::task::spawn_blocking(move || {
            Store::open_with(
                &store_dir,
                crate::store::StoreOptions {
                    verify_reads,
                    ..Default::default()
                },
            )
        })
        .await
        .context("store task")?
        .with_context(|| format!("opening store {}", cfg.store_dir.display()))?,
    );
    let gis_peers = cfg.gis_replicas().map_err(anyhow::Error::msg)?;
    let me = cfg.keypair.public().to_peer_id();

    let topic = gossipsub::IdentTopic::new(match cfg.policy {
        Policy::Bids => gossip::topic_name(&cfg.idc),
        // Baseline: the IDC rule is off, so everyone shares one availability topic.
        Policy::Baseline => "bids/baseline/chunks".to_string(),
    });
    let topts = TransportOptions {
        bind_ip: cfg.bind_ip,
        shaper: cfg.shaper.clone(),
        ..Default::default()
    };
    let keypair = cfg.keypair.clone();
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(NodeMetrics::new(&mut registry, store.clone()));
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair.clone())
        .with_tokio()
        .with_other_transport(|k| {
            transport::build(k, topts)
                .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
        })
        .context("building transport")?
        .with_bandwidth_metrics(&mut registry)
        .with_behaviour(|k| {
            let gcfg = gossipsub::ConfigBuilder::default()
                .heartbeat_interval(Duration::from_millis(500))
                .mesh_n(6)
                .mesh_n_low(1)
                .mesh_n_high(12)
                .mesh_outbound_min(0)
                .flood_publish(true)
                .max_transmit_size(gossip::MAX_ANNOUNCE_BYTES)
                .validation_mode(gossipsub::ValidationMode::Strict)
                .build()
                .map_err(|e| format!("gossipsub config: {e}"))?;
            let gossipsub =
                gossipsub::Behaviour::new(gossipsub::MessageAuthenticity::Signed(k.clone()), gcfg)?
                    .with_metrics(
                        registry.sub_registry_with_prefix("libp2p_gossipsub"),
                        Default::default(),
                    );
            let chunk_cfg = rr::Config::default()
                .with_request_timeout(Duration::from_secs(180))
                .with_max_concurrent_streams(1024);
            Ok(Behaviour {
                identify: identify::Behaviour::new(
                    identify::Config::new("/bids/id/1".into(), k.public())
                        .with_agent_version(crate::transport::agent_version()),
                ),
                ping: ping::Behaviour::default(),
                gossipsub,
                hello: rr::Behaviour::with_codec(
                    hello::codec(),
                    [(hello::PROTOCOL, ProtocolSupport::Full)],
                    rr::Config::default().with_request_timeout(HELLO_TIMEOUT),
                ),
                chunk: rr::Behaviour::with_codec(
                    chunk::codec(),
                    [(chunk::PROTOCOL, ProtocolSupport::Full)],
                    chunk_cfg,
                ),
                gis: rr::Behaviour::with_codec(
                    gisp::codec(),
                    [(gisp::PROTOCOL, ProtocolSupport::Outbound)],
                    rr::Config::default().with_request_timeout(Duration::from_secs(30)),
                ),
                admin: rr::Behaviour::with_codec(
                    adminp::codec(),
                    [(adminp::PROTOCOL, ProtocolSupport::Inbound)],
                    rr::Config::default().with_request_timeout(Duration::from_secs(110)),
                ),
            })
        })
        .map_err(|e| anyhow::anyhow!("building behaviours: {e}"))?
        // 0-RTT stream negotiation (see `bids_protocols::STREAM_NEGOTIATION`).
        .with_swarm_config(|c| {
            c.with_idle_connection_timeout(Duration::from_secs(3600))
                .with_substream_upgrade_protocol_override(bids_protocols::STREAM_NEGOTIATION)
        })
        .build();

    swarm
        .behaviour_mut()
        .gossipsub
        .subscribe(&topic)
        .map_err(|e| anyhow::anyhow!("subscribing to {topic}: {e:?}"))?;
    for addr in &cfg.listen {
        swarm
            .listen_on(addr.clone())
            .with_context(|| format!("listening on {addr}"))?;
    }
    // Wait for the listeners to bind, so callers learn the real ports.
    let mut listen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while listen.len() < cfg.listen.len() {
        match tokio::time::timeout_at(deadline, swarm.select_next_some()).await {
            Ok(SwarmEvent::NewListenAddr { address, .. }) => {
                listen.push(address.with_p2p(me).unwrap_or_else(|a| a));
            }
            Ok(SwarmEvent::ListenerError { error, .. })
            | Ok(SwarmEvent::ListenerClosed {
                reason: Err(error), ..
            }) => {
                anyhow::bail!("listening failed: {error}");
            }
            Ok(_) => {}
            Err(_) => anyhow::bail!("listening on {:?} did not succeed within 10 s", cfg.listen),
        }
    }
    for (peer, addr) in &gis_peers {
        swarm.add_peer_address(*peer, addr.clone());
    }
    let metrics_server = match cfg.metrics {
        Some(addr) => Some(bids_metrics::serve(addr, metrics.endpoint(Arc::new(registry))).await?),
        None => None,
    };
    let (tx, rx) = mpsc::channel(256);
    let (itx, irx) = mpsc::channel(1024);
    let handle = NodeHandle {
        tx,
        peer: me,
        listen: listen.clone(),
        store: store.clone(),
        metrics_addr: metrics_server.as_ref().map(|m| m.local_addr()),
    };
    let download = DownloadBudget::new(cfg.download_bps, Instant::now());
    let sharing = cfg.sharing;
    let cfg_scrub_bps = cfg.scrub_bps;
    let admin_gate = AdminGate::new(
        cfg.admin_peer,
        gis_peers.iter().map(|(p, _)| *p).collect(),
        me,
    );
    let engine = Engine {
        admin_gate,
        admin_jobs,
        swarm,
        store,
        me,
        gis_peers: gis_peers.clone(),
        topic,
        bridgehead_topic: gossipsub::IdentTopic::new(BRIDGEHEAD_TOPIC),
        role: Role::Host,
        cert: cfg.cert.clone(),
        preparing: HashMap::new(),
        gis: GisSession::new(
            gis_peers.iter().map(|(_, a)| a.to_string()).collect(),
            Instant::now(),
        ),
        revocations: Revocations::default(),
        wan_cert_ends: HashMap::new(),
        cert_warned: None,
        peers: Peers::default(),
        addrs: HashMap::new(),
        downloads: HashMap::new(),
        waiters: HashMap::new(),
        inflight: HashMap::new(),
        acct: Accounting::restore(handle.store.saved_counters()),
        cmd_rx: rx,
        itx,
        irx,
        serving: 0,
        payload_cache: PayloadCache::new(PAYLOAD_CACHE_BYTES),
        last_heartbeat: Instant::now(),
        announcer: Announcer::new(Instant::now()),
        now: Instant::now(),
        bans: HashMap::new(),
        _scrub: (cfg_scrub_bps > 0).then(|| {
            AbortOnDrop(
                tokio::spawn(crate::repair::scrub(handle.store.clone(), cfg_scrub_bps))
                    .abort_handle(),
            )
        }),
        uploads: Uploads::new(cfg.upload_bps, Instant::now()),
        download,
        sharing,
        listen,
        dialing: HashSet::new(),
        seeder: LanSeeder::default(),
        metrics,
        _metrics_server: metrics_server,
        last_metrics_sample: Instant::now(),
        cfg,
    };
    // Every line this node logs names it: many nodes share one process in testnets.
    let me = engine.me.to_string();
    let span = tracing::info_span!(
        "node",
        idc = %engine.cfg.idc,
        peer = %me.get(me.len().saturating_sub(6)..).unwrap_or(&me)
    );
    let task = tokio::spawn(engine.run().instrument(span));
    Ok((handle, task))
}

struct Engine {
    /// The time of the event being handled: read once per event by the loop, so every
    /// decision made for one event sees the same instant.
    now: Instant,
    swarm: Swarm<Behaviour>,
    admin_gate: AdminGate,
    /// Admitted admin commands, to their executor above the engine.
    admin_jobs: mpsc::Sender<AdminJob>,
    store: Arc<Store>,
    cfg: NodeConfig,
    me: PeerId,
    /// The GIS, or each replica of its Raft group: peer id and address (the session says
    /// which is in use).
    gis_peers: Vec<(PeerId, Multiaddr)>,
    topic: gossipsub::IdentTopic,
    bridgehead_topic: gossipsub::IdentTopic,
    /// The role the GIS granted at the last registration.
    role: Role,
    /// Downloads whose store is being prepared off the loop, with the host lists (and the
    /// fetches) that wait for it.
    preparing: HashMap<ImageId, Vec<(HostList, Option<FetchReply>)>>,
    /// The bridgehead certificate this node presents now. It starts as the configuration's;
    /// an admin's `set_cert`, its expiry or the GIS refusing it change it here, and the
    /// configuration stays as it was loaded.
    cert: Option<BridgeheadCert>,
    /// Connected and registered or not, redials, held and pending requests.
    gis: GisSession<GisPurpose, OutboundRequestId>,
    revocations: Revocations,
    /// When the certificates of the bridgeheads of other IDCs we accepted end (unix seconds,
    /// from their hellos): their connections close then.
    wan_cert_ends: HashMap<PeerId, i64>,
    /// When we last warned that our own certificate is about to expire.
    cert_warned: Option<Instant>,
    /// Connected peers and where each stands in the hello exchange.
    peers: Peers<EarlyRequest>,
    addrs: HashMap<PeerId, Vec<Multiaddr>>,
    downloads: HashMap<ImageId, DownloadState>,
    /// Deferred chunk requests (a bridgehead answers when the chunk arrives).
    waiters: HashMap<(ImageId, ChunkIndex), Vec<Waiter>>,
    inflight: HashMap<OutboundRequestId, (ImageId, ChunkIndex, PeerId)>,
    acct: Accounting,
    cmd_rx: mpsc::Receiver<Command>,
    itx: mpsc::Sender<Internal>,
    irx: mpsc::Receiver<Internal>,
    serving: usize,
    payload_cache: PayloadCache,
    last_heartbeat: Instant,
    /// When to tell the IDC what we hold (`crate::announcer`).
    announcer: Announcer,
    /// Peers banned node-wide for serving corrupt chunks, until when: no download asks them
    /// for anything and no chunk from them is accepted; reported to the GIS.
    bans: HashMap<PeerId, Instant>,
    /// The background scrub (`--scrub-rate`), stopped with the engine.
    _scrub: Option<AbortOnDrop>,
    /// Chunk responses being written to each peer, those waiting for their turn or for the
    /// upload limit (`crate::uploads`).
    uploads: Uploads<QueuedResponse>,
    /// Charged as chunk requests leave, settled by their answers (`crate::ratelimit`).
    download: DownloadBudget<OutboundRequestId>,
    sharing: bool,
    listen: Vec<Multiaddr>,
    dialing: HashSet<PeerId>,
    /// Which host of our IDC each chunk we relayed went to (a bridgehead sends each chunk
    /// into its LAN about once; see `crate::seeding`).
    seeder: LanSeeder,
    metrics: Arc<NodeMetrics>,
    /// Serves `metrics` while the loop runs (`--metrics`); stops when dropped.
    _metrics_server: Option<bids_metrics::MetricsServer>,
    last_metrics_sample: Instant,
}

impl Engine {
    async fn run(mut self) {
        info!(peer = %self.me, idc = %self.cfg.idc, policy = %self.cfg.policy, "node started");
        // Registration follows once the connection is up (`on_gis_connected`).
        self.now = Instant::now();
        self.dial_gis();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                ev = self.swarm.select_next_some() => {
                    self.now = Instant::now();
                    self.on_swarm(ev);
                }
                Some(i) = self.irx.recv() => {
                    self.now = Instant::now();
                    self.on_internal(i);
                }
                cmd = self.cmd_rx.recv() => {
                    self.now = Instant::now();
                    match cmd {
                        Some(Command::Shutdown { reply }) => {
                            self.stop();
                            let _ = reply.send(());
                            return;
                        }
                        Some(c) => self.on_command(c),
                        None => { self.stop(); return; }
                    }
                }
                _ = tick.tick() => {
                    self.now = Instant::now();
                    self.on_tick();
                }
            }
        }
    }

    fn stop(&mut self) {
        self.metrics.stopped();
        self.save_counters();
        if let Err(e) = self.store.flush() {
            warn!(error = %e, "flushing the store at shutdown failed");
        }
        info!(peer = %self.me, "node stopped");
    }

    /// Per-image counters survive a restart: saved with each heartbeat and at stop. On the
    /// loop, in order: a sled insert lands in sled's memory (its own threads write it out),
    /// and a save that ran late off the loop could put older totals over newer ones.
    fn save_counters(&mut self) {
        for (id, c) in self.acct.take_dirty() {
            if let Err(e) = self.store.save_counters(&id, &c) {
                warn!(image = %id.short(), error = %e, "could not save the transfer counters");
            }
        }
    }

    fn now_secs() -> i64 {
        bids_protocols::unix_now()
    }

    // ---------------------------------------------------------------- GIS

    /// The GIS replica in use.
    fn gis_peer(&self) -> PeerId {
        self.gis_peers[self.gis.replica()].0
    }

    fn gis_request(&mut self, req: GisRequest, purpose: GisPurpose) {
        self.gis_request_attempt(req, purpose, 0);
    }

    fn gis_request_attempt(&mut self, req: GisRequest, purpose: GisPurpose, attempt: u32) {
        if let Some(step) = self.gis.submit(req, purpose, attempt, self.now) {
            self.gis_step(step);
        }
    }

    /// Carries out what the GIS session says: a request sent, or failed to whoever waits.
    fn gis_step(&mut self, step: Step<GisPurpose>) {
        match step {
            Step::Send {
                req,
                purpose,
                attempt,
            } => {
                let kept = GisSession::<GisPurpose, OutboundRequestId>::keep(&req, &purpose);
                let gis = self.gis_peer();
                let id = self.swarm.behaviour_mut().gis.send_request(&gis, *req);
                self.gis.sent(id, kept, purpose, attempt);
            }
            Step::Fail { purpose, why } => self.on_gis_failure(purpose, why),
        }
    }

    /// Dials the GIS at its configured address. The address is given with every dial: the
    /// swarm forgets a peer's address after a failed dial, and the GIS is worth redialling.
    fn dial_gis(&mut self) {
        let (peer, addr) = self.gis_peers[self.gis.replica()].clone();
        let opts = DialOpts::peer_id(peer)
            .addresses(vec![addr])
            .condition(PeerCondition::DisconnectedAndNotDialing)
            .build();
        match self.swarm.dial(opts) {
            Ok(()) => self.gis.dial_started(),
            Err(e) => self.gis_dial_failed(&crate::gis_watch::dial_cause(&e)),
        }
    }

    fn gis_dial_failed(&mut self, error: &str) {
        let (wait, report) = self.gis.dial_failed(self.now, error, rand::random());
        if report {
            warn!(gis = %self.gis.name(), cause = %error, "cannot reach the GIS; redialling with backoff (reminders follow while it stays out of reach)");
        } else {
            debug!(gis = %self.gis.name(), cause = %error, attempt = self.gis.failed_dials(), retry_in = ?wait, "cannot reach the GIS; redialling");
        }
    }

    fn on_gis_connected(&mut self) {
        match self.gis.on_connected(self.now) {
            Connected::Already => return,
            Connected::First => info!("connected to the GIS"),
            Connected::Again { failed_dials } => {
                info!(gis = %self.gis.name(), failed_dials, "reconnected to the GIS; registering again")
            }
        }
        self.register();
    }

    fn on_gis_disconnected(&mut self) {
        // A restarted GIS has forgotten that we are alive: register again once back.
        if let Some(wait) = self.gis.on_disconnected(self.now, rand::random()) {
            warn!(gis = %self.gis.name(), retry_in = ?wait, "connection to the GIS lost; redialling with backoff (downloads go on with the peers they know)");
        }
    }

    fn register(&mut self) {
        self.register_for(GisPurpose::Register);
    }

    fn register_for(&mut self, purpose: GisPurpose) {
        let addrs = if self.cfg.external_addrs.is_empty() {
            self.listen
                .iter()
                .map(|a| {
                    let mut a = a.clone();
                    if matches!(a.iter().last(), Some(libp2p::multiaddr::Protocol::P2p(_))) {
                        a.pop();
                    }
                    a
                })
                .collect()
        } else {
            self.cfg.external_addrs.clone()
        };
        let req = GisRequest::Register {
            idc: self.cfg.idc.clone(),
            addrs,
            cert: self.cert.clone(),
            policy: self.cfg.policy,
        };
        self.gis_request(req, purpose);
    }

    fn publish(&mut self, id: &ImageId, fetching: bool) {
        let (Some(m), Some(st)) = (self.store.manifest(id), self.store.status(id)) else {
            return;
        };
        let holding = Holding {
            image: *id,
            chunks_held: st.held,
            complete: st.complete,
            fetching,
        };
        // Progress of a download: the GIS knows the image (we got its manifest from it).
        let manifest = if fetching && self.downloads.contains_key(id) {
            Vec::new()
        } else {
            m.to_bytes()
        };
        self.gis_request(
            GisRequest::Publish { holding, manifest },
            GisPurpose::Publish,
        );
    }

    fn publish_all(&mut self) {
        let ids: Vec<ImageId> = self.store.list().into_iter().map(|s| s.id).collect();
        for id in ids {
            let fetching = self.downloads.contains_key(&id);
            self.publish(&id, fetching);
        }
    }

    fn on_gis_response(&mut self, purpose: GisPurpose, resp: GisResponse) {
        if let GisPurpose::Caller(reply) = purpose {
            let _ = reply.send(Ok(resp));
            return;
        }
        let purpose = match purpose {
            GisPurpose::RegisterFor(reply) => {
                let _ = reply.send(match &resp {
                    GisResponse::Registered { role, .. } => Ok(*role),
                    GisResponse::Error { message, .. } => {
                        Err(format!("the GIS refused the registration: {message}"))
                    }
                    other => Err(format!(
                        "unexpected GIS answer to a registration: {other:?}"
                    )),
                });
                GisPurpose::Register
            }
            p => p,
        };
        match (purpose, resp) {
            (
                GisPurpose::Register,
                GisResponse::Registered {
                    role,
                    revocations,
                    bridgeheads,
                    ..
                },
            ) => {
                info!(role = %role, "registered with the GIS");
                self.role = role;
                if role == Role::Bridgehead && self.cfg.policy == Policy::Bids {
                    if let Err(e) = self
                        .swarm
                        .behaviour_mut()
                        .gossipsub
                        .subscribe(&self.bridgehead_topic)
                    {
                        warn!(error = ?e, "cannot join the bridgehead topic");
                    }
                }
                self.gis.on_registered();
                self.set_revocations(revocations);
                self.link_bridgeheads(bridgeheads);
                self.publish_all();
            }
            (
                _,
                GisResponse::Ack {
                    revocations,
                    bridgeheads,
                },
            ) => {
                self.set_revocations(revocations);
                self.link_bridgeheads(bridgeheads);
            }
            (
                GisPurpose::Lookup {
                    image,
                    for_fetch,
                    asked,
                },
                GisResponse::HostList(list),
            ) => {
                self.on_host_list(image, *list, for_fetch, asked);
            }
            (
                GisPurpose::Lookup {
                    image, for_fetch, ..
                },
                GisResponse::Error { kind, message },
            ) => {
                debug!(?kind, %message, "lookup refused");
                self.lookup_failed(&image, for_fetch, message);
            }
            (GisPurpose::Register, GisResponse::Error { kind, message })
                if kind == ErrorKind::BadCert && self.cert.is_some() =>
            {
                self.bridgehead_cert_refused(&message);
            }
            (p, GisResponse::Error { kind, message }) => {
                if kind == ErrorKind::NotRegistered && !matches!(p, GisPurpose::Register) {
                    // The GIS restarted or forgot us: register again.
                    self.gis.on_unregistered();
                    self.register();
                } else if kind == ErrorKind::BadCert {
                    // A registration sent before the certificate was dropped: already handled.
                    debug!(%message, "a registration with the dropped certificate was refused");
                } else {
                    warn!(?kind, %message, "GIS request failed");
                }
            }
            (_, other) => debug!(?other, "unexpected GIS response"),
        }
    }

    /// A lookup got no host list: the download may ask again; a waiting fetch gets the reason.
    fn lookup_failed(
        &mut self,
        image: &ImageQuery,
        for_fetch: Option<oneshot::Sender<Result<watch::Receiver<FetchProgress>, String>>>,
        reason: String,
    ) {
        let id = match image {
            ImageQuery::Id(id) => Some(*id),
            ImageQuery::Ref(r) => self.store.resolve(r),
        };
        if let Some(d) = id.and_then(|id| self.downloads.get_mut(&id)) {
            d.cadence.lookup_failed();
        }
        if let Some(reply) = for_fetch {
            let _ = reply.send(Err(reason));
        }
    }

    fn on_gis_failure(&mut self, purpose: GisPurpose, error: String) {
        let purpose = match purpose {
            GisPurpose::RegisterFor(reply) => {
                let _ = reply.send(Err(format!("the GIS did not answer: {error}")));
                GisPurpose::Register
            }
            p => p,
        };
        match purpose {
            GisPurpose::Caller(reply) => {
                let _ = reply.send(Err(format!("the GIS did not answer: {error}")));
            }
            GisPurpose::Lookup {
                image, for_fetch, ..
            } => {
                self.lookup_failed(
                    &image,
                    for_fetch,
                    format!("the GIS did not answer: {error}"),
                );
            }
            GisPurpose::Register => {
                debug!(%error, "register failed; retrying at next heartbeat");
                self.gis.on_unregistered();
            }
            _ => debug!(%error, "GIS request failed"),
        }
    }

    fn set_revocations(&mut self, r: Revocations) {
        if r == self.revocations {
            return;
        }
        self.revocations = r;
        // A revoked bridgehead's links close at once.
        let now = Self::now_secs();
        let mut drop_peers = Vec::new();
        if let Some(c) = &self.cert {
            if self.revocations.is_revoked(c.body.serial) {
                warn!("this node's bridgehead certificate was revoked; cross-IDC links close");
                self.cert = None;
                self.role = Role::Host;
                if self.cfg.policy == Policy::Bids {
                    drop_peers = self.peers.wan_peers();
                }
            }
        }
        let _ = now;
        for p in drop_peers {
            let _ = self.swarm.disconnect_peer_id(p);
        }
    }

    // ---------------------------------------------------------------- swarm events

    fn on_swarm(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        self.metrics.record(&ev);
        match ev {
            SwarmEvent::ConnectionEstablished {
                peer_id,
                endpoint,
                num_established,
                ..
            } => {
                self.dialing.remove(&peer_id);
                if peer_id == self.gis_peer() {
                    self.on_gis_connected();
                    return;
                }
                if (num_established.get() == 1 || self.peers.contains(&peer_id))
                    && self
                        .peers
                        .connected(peer_id, self.now, endpoint.is_dialer())
                {
                    let h = self.my_hello();
                    self.swarm.behaviour_mut().hello.send_request(&peer_id, h);
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                if peer_id == self.gis_peer() {
                    self.on_gis_disconnected();
                    return;
                }
                // Requests held for it can no longer be answered, nor responses delivered.
                self.peers.closed(&peer_id);
                self.seeder.forget_host(&peer_id);
                self.wan_cert_ends.remove(&peer_id);
                self.uploads.closed(&peer_id);
                for d in self.downloads.values_mut() {
                    if d.active.remove(&peer_id) {
                        d.sched.remove_peer(&peer_id);
                    }
                }
            }
            SwarmEvent::OutgoingConnectionError {
                peer_id: Some(p),
                error,
                ..
            } if p == self.gis_peer() && !self.gis.connected() => {
                self.gis_dial_failed(&crate::gis_watch::dial_cause(&error));
            }
            SwarmEvent::OutgoingConnectionError {
                peer_id: Some(p),
                error,
                ..
            } => {
                self.dialing.remove(&p);
                debug!(peer = %p, %error, "dial failed");
                for d in self.downloads.values_mut() {
                    d.candidates.remove(&p);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                let addrs: Vec<Multiaddr> = info
                    .listen_addrs
                    .into_iter()
                    .take(gisp::MAX_ADDRS)
                    .collect();
                self.addrs.insert(peer_id, addrs);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                message,
                ..
            })) => {
                if let Some(src) = message.source {
                    let remote = message.topic == self.bridgehead_topic.hash();
                    self.on_announcement(src, &message.data, remote);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Hello(ev)) => self.on_hello(ev),
            SwarmEvent::Behaviour(BehaviourEvent::Admin(ev)) => self.on_admin(ev),
            SwarmEvent::Behaviour(BehaviourEvent::Chunk(ev)) => self.on_chunk_event(ev),
            SwarmEvent::Behaviour(BehaviourEvent::Gis(ev)) => match ev {
                rr::Event::Message {
                    message:
                        rr::Message::Response {
                            request_id,
                            response,
                        },
                    ..
                } => {
                    if let Some(purpose) = self.gis.answered(&request_id) {
                        self.on_gis_response(purpose, response);
                    }
                }
                rr::Event::OutboundFailure {
                    request_id, error, ..
                } => {
                    if let Some(step) = self.gis.failed(&request_id, error.to_string(), self.now) {
                        self.gis_step(step);
                    }
                }
                _ => {}
            },
            _ => {}
        }
    }

    fn my_hello(&self) -> Hello {
        Hello {
            idc: self.cfg.idc.clone(),
            policy: self.cfg.policy,
            cert: self.cert.clone(),
        }
    }

    fn judge(&self, peer: &PeerId, h: &Hello) -> Result<Link, gate::Refusal> {
        let us = gate::Us {
            peer: &self.me,
            idc: &self.cfg.idc,
            policy: self.cfg.policy,
            cert: self.cert.as_ref(),
            admin: &self.cfg.admin_peer,
            revocations: &self.revocations,
            now: Self::now_secs(),
        };
        gate::judge(&us, peer, h)
    }

    fn accept(&mut self, peer: PeerId, h: &Hello, link: Link) {
        debug!(%peer, idc = %h.idc, ?link, "peer accepted");
        let early = self.peers.accept(peer, link, h.cert.is_some());
        if let (Link::Wan, Policy::Bids, Some(c)) = (link, self.cfg.policy, &h.cert) {
            self.wan_cert_ends.insert(peer, c.body.not_after);
        }
        if link == Link::Wan && !self.downloads.is_empty() {
            // A bridgehead of another IDC that trades with us missed our incremental
            // announcements while unconnected: repeat the full ones now (a moment later,
            // once gossipsub has swapped subscriptions), not at the next periodic round.
            self.announcer.remote_joined(self.now);
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
        for (req, channel) in early {
            self.on_chunk_request(peer, req, channel);
        }
    }

    fn refuse(&mut self, peer: PeerId, why: RefusalReason, reason: &str) {
        warn!(%peer, %reason, "connection refused");
        self.acct.refused();
        self.metrics.refused(why);
        let early = self.peers.drop_peer(&peer);
        self.release_early(peer, early);
        let _ = self.swarm.disconnect_peer_id(peer);
    }

    fn on_hello(&mut self, ev: rr::Event<Hello, HelloReply>) {
        match ev {
            rr::Event::Message {
                peer,
                message:
                    rr::Message::Request {
                        request, channel, ..
                    },
                ..
            } => match self.judge(&peer, &request) {
                Ok(link) => {
                    let reply = HelloReply::Welcome(self.my_hello());
                    let _ = self
                        .swarm
                        .behaviour_mut()
                        .hello
                        .send_response(channel, reply);
                    self.accept(peer, &request, link);
                }
                Err(reason) => {
                    let _ = self
                        .swarm
                        .behaviour_mut()
                        .hello
                        .send_response(channel, HelloReply::Refused(reason.message.clone()));
                    // Closing now would drop the refusal before the peer reads it; the tick
                    // closes the connection after REFUSAL_GRACE. It gets no data meanwhile.
                    warn!(%peer, %reason, "connection refused");
                    self.acct.refused();
                    self.metrics.refused(reason.reason);
                    let early = self.peers.refuse(peer, self.now);
                    self.release_early(peer, early);
                }
            },
            rr::Event::Message {
                peer,
                message: rr::Message::Response { response, .. },
                ..
            } => match response {
                HelloReply::Welcome(h) => match self.judge(&peer, &h) {
                    Ok(link) => self.accept(peer, &h, link),
                    Err(r) => self.refuse(peer, r.reason, &r.message),
                },
                HelloReply::Refused(reason) => {
                    let reason = format!("peer refused us: {}", truncate(&reason, 300));
                    self.refuse(peer, RefusalReason::RefusedByPeer, &reason);
                }
            },
            rr::Event::OutboundFailure { peer, error, .. } => {
                debug!(%peer, %error, "hello failed");
                if self.peers.is_pending(&peer) {
                    let early = self.peers.drop_peer(&peer);
                    self.release_early(peer, early);
                    let _ = self.swarm.disconnect_peer_id(peer);
                }
            }
            _ => {}
        }
    }

    /// Whom bytes exchanged with an accepted peer count for.
    fn kind_of(&self, peer: &PeerId) -> Option<PeerKind> {
        self.peers.kind_of(peer)
    }

    fn link_of(&self, peer: &PeerId) -> Option<Link> {
        self.peers.link_of(peer)
    }

    // ---------------------------------------------------------------- serving

    fn on_chunk_event(&mut self, ev: rr::Event<ChunkRequest, ChunkResponse>) {
        match ev {
            rr::Event::Message {
                peer,
                message:
                    rr::Message::Request {
                        request, channel, ..
                    },
                ..
            } => self.on_chunk_request(peer, request, channel),
            rr::Event::Message {
                peer,
                message:
                    rr::Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => self.on_chunk_response(peer, request_id, response),
            rr::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                self.download.answered(&request_id, 0, self.now);
                if let Some((image, idx, _)) = self.inflight.remove(&request_id) {
                    let why = match error {
                        rr::OutboundFailure::Timeout => Failure::Timeout,
                        rr::OutboundFailure::UnsupportedProtocols => Failure::Refused,
                        _ => Failure::Disconnected,
                    };
                    debug!(%peer, idx, %error, "chunk request failed");
                    if let Some(d) = self.downloads.get_mut(&image) {
                        d.sched.on_failure(&peer, idx, why, self.now);
                    }
                }
            }
            rr::Event::InboundFailure { peer, error, .. } => {
                debug!(%peer, %error, "inbound chunk request failed");
                self.response_done(peer);
            }
            rr::Event::ResponseSent { peer, .. } => self.response_done(peer),
        }
    }

    fn respond(&mut self, peer: PeerId, channel: ResponseChannel<ChunkResponse>, r: ChunkResponse) {
        if self
            .swarm
            .behaviour_mut()
            .chunk
            .send_response(channel, r)
            .is_ok()
        {
            self.uploads.started(peer);
        }
    }

    /// A response to `peer` was written out (or failed): the next queued ones may go.
    fn response_done(&mut self, peer: PeerId) {
        for q in self.uploads.done(peer, self.now) {
            self.send_data(peer, q);
        }
    }

    fn on_chunk_request(
        &mut self,
        peer: PeerId,
        req: ChunkRequest,
        channel: ResponseChannel<ChunkResponse>,
    ) {
        let Some(link) = self.link_of(&peer) else {
            let idx = req.index;
            let channel = match self.peers.early_request(&peer, (req, channel)) {
                Early::Held => {
                    debug!(%peer, idx, "holding a chunk request until the peer's hello is judged");
                    return;
                }
                Early::Busy((_, channel)) => {
                    self.respond(peer, channel, ChunkResponse::Busy);
                    return;
                }
                Early::Refuse((_, channel)) => channel,
            };
            // No image data before an accepted hello.
            self.acct.refused();
            self.metrics.refused(RefusalReason::NoHello);
            warn!(%peer, "chunk request before an accepted hello refused");
            self.respond(
                peer,
                channel,
                ChunkResponse::Refused("say hello first (or you were refused)".into()),
            );
            return;
        };
        let facts = serving::Facts {
            link,
            sharing: self.sharing,
            busy: self.serving >= MAX_SERVING,
            chunks: self.store.manifest(&req.image).map(|m| m.chunk_count()),
            index: req.index,
            held: self.store.has_chunk(&req.image, req.index),
            may_relay: self.may_relay(&peer),
            downloading: self
                .downloads
                .get(&req.image)
                .map(|d| d.sched.lan_available(req.index)),
        };
        match serving::decide(&facts) {
            Serve::Read => {}
            Serve::Refused(why) => {
                return self.respond(peer, channel, ChunkResponse::Refused(why.into()))
            }
            Serve::Busy => return self.respond(peer, channel, ChunkResponse::Busy),
            Serve::UnknownImage => return self.respond(peer, channel, ChunkResponse::UnknownImage),
            Serve::BadIndex => return self.respond(peer, channel, ChunkResponse::BadIndex),
            Serve::NotHeld { fetch } => {
                if fetch {
                    self.ensure_download(ImageQuery::Id(req.image), None);
                }
                return self.respond(peer, channel, ChunkResponse::NotHeld);
            }
            Serve::Defer { fetch } => {
                if fetch {
                    self.ensure_download(ImageQuery::Id(req.image), None);
                }
                debug!(%peer, idx = req.index, "deferring a request until the chunk arrives");
                self.waiters
                    .entry((req.image, req.index))
                    .or_default()
                    .push((channel, peer));
                if let Some(d) = self.downloads.get_mut(&req.image) {
                    d.sched.prioritize(req.index);
                }
                return;
            }
        }
        if link == Link::Lan
            && self.seeds_lan()
            && self.seeder.on_request(req.image, req.index, peer, self.now) == Verdict::Elsewhere
        {
            // Another host of our IDC got it from us a moment ago: take it from there.
            self.respond(peer, channel, ChunkResponse::NotHeld);
            return;
        }
        // A payload compressed before is served again without recompressing it.
        if let Some(p) = self.payload_cache.get(&req.image, req.index) {
            let resp = ChunkResponse::Data {
                encoding: p.0,
                payload: p.1.clone(),
            };
            self.finish_serve(channel, peer, req.image, resp, link);
            return;
        }
        self.serving += 1;
        let store = self.store.clone();
        let itx = self.itx.clone();
        tokio::task::spawn_blocking(move || {
            let response = match store.read_chunk(&req.image, req.index) {
                Ok(raw) => {
                    let (encoding, payload) = chunk::encode_payload(raw);
                    ChunkResponse::Data { encoding, payload }
                }
                // Found corrupt at rest: the store logged it and marked it missing.
                Err(StoreError::Corrupt { .. }) => ChunkResponse::NotHeld,
                Err(e) => {
                    warn!(image = %req.image.short(), idx = req.index, error = %e, "reading a chunk failed");
                    ChunkResponse::NotHeld
                }
            };
            let _ = itx.blocking_send(Internal::Served {
                channel,
                peer,
                image: req.image,
                index: req.index,
                response,
            });
        });
    }

    /// May we pull an image on `peer`'s behalf? Only a bridgehead, for its own IDC's hosts or
    /// for another IDC's bridgehead, under the BIDS policy.
    fn may_relay(&self, peer: &PeerId) -> bool {
        self.cfg.policy == Policy::Bids
            && self.role == Role::Bridgehead
            && self.cert.is_some()
            && self.peers.is_accepted(peer)
    }

    /// A bridgehead under BIDS sends each chunk into its LAN about once (super-seeding).
    fn seeds_lan(&self) -> bool {
        self.cfg.policy == Policy::Bids && self.role == Role::Bridgehead
    }

    fn finish_serve(
        &mut self,
        channel: ResponseChannel<ChunkResponse>,
        peer: PeerId,
        image: ImageId,
        resp: ChunkResponse,
        link: Link,
    ) {
        let ChunkResponse::Data { payload, .. } = &resp else {
            return self.respond(peer, channel, resp);
        };
        let n = payload.len() as u64;
        let q = (channel, image, resp, link);
        if let Some(q) = self.uploads.offer(peer, q, n, self.now) {
            self.send_data(peer, q);
        }
    }

    /// Writes a data response the upload queues released, and counts its bytes.
    fn send_data(&mut self, peer: PeerId, (channel, image, resp, link): QueuedResponse) {
        if let ChunkResponse::Data { payload, .. } = &resp {
            let n = payload.len() as u64;
            let kind = self.kind_of(&peer).unwrap_or(PeerKind::of(link, false));
            self.acct.sent(image, kind, n);
            self.metrics.sent(&image, link, n);
        }
        self.respond(peer, channel, resp);
    }

    // ---------------------------------------------------------------- downloading

    fn on_chunk_response(
        &mut self,
        peer: PeerId,
        request_id: OutboundRequestId,
        resp: ChunkResponse,
    ) {
        let arrived = match &resp {
            ChunkResponse::Data { payload, .. } => payload.len() as u64,
            _ => 0,
        };
        self.download.answered(&request_id, arrived, self.now);
        let Some((image, idx, _)) = self.inflight.remove(&request_id) else {
            return;
        };
        self.handle_chunk_response(peer, image, idx, resp);
        // The answer freed a request slot (data goes on to verification without holding
        // it): fill it now.
        self.pump(&image, self.now);
    }

    fn handle_chunk_response(
        &mut self,
        peer: PeerId,
        image: ImageId,
        idx: ChunkIndex,
        resp: ChunkResponse,
    ) {
        let now = self.now;
        let kind = self.kind_of(&peer);
        let Some(d) = self.downloads.get_mut(&image) else {
            return;
        };
        match resp {
            ChunkResponse::Data { payload, .. } if self.bans.contains_key(&peer) => {
                // Its requests were released when it was banned: this answer was already on
                // its way. Not one more chunk from it is trusted.
                debug!(%peer, idx, bytes = payload.len(), "dropping a chunk from a peer banned for corrupt chunks");
            }
            ChunkResponse::Data { encoding, payload } => {
                if let Some(kind) = kind {
                    self.metrics.received(&image, kind, payload.len() as u64);
                }
                let stored = self.store.has_chunk(&image, idx);
                if stored || d.sched.is_verifying(idx) {
                    // A late endgame duplicate: count the bytes, drop the data.
                    if let Some(kind) = kind {
                        self.acct.received(image, kind, payload.len() as u64);
                    }
                    if stored {
                        d.sched.on_chunk(&peer, idx, now);
                    } else {
                        // The first copy is still being verified: only free this slot.
                        d.sched.on_arrived(&peer, idx, now);
                    }
                    return;
                }
                if let Some(kind) = kind {
                    self.acct.received(image, kind, payload.len() as u64);
                }
                let lan_bytes = match kind {
                    Some(PeerKind::Bridgehead | PeerKind::Host) => payload.len() as u64,
                    _ => 0,
                };
                debug!(%peer, idx, bytes = payload.len(), "chunk arrived");
                if d.startup.data_arrived(now) {
                    let startup = d.startup.report();
                    info!(image = %d.manifest.image_ref(), %startup, "first chunk data arrived");
                    d.progress.send_modify(|p| p.startup = Some(startup));
                }
                d.sched.on_arrived(&peer, idx, now);
                let m = d.manifest.clone();
                self.note_lan_availability(&image, now, lan_bytes);
                let store = self.store.clone();
                let itx = self.itx.clone();
                tokio::task::spawn_blocking(move || {
                    let result = verify_and_store(&store, &m, &image, idx, encoding, payload);
                    let _ = itx.blocking_send(Internal::Stored {
                        image,
                        idx,
                        peer,
                        result,
                    });
                });
            }
            ChunkResponse::NotHeld => {
                debug!(%peer, idx, "peer does not hold the chunk");
                d.sched.on_failure(&peer, idx, Failure::NotHeld, now)
            }
            ChunkResponse::Busy => d.sched.on_failure(&peer, idx, Failure::Busy, now),
            ChunkResponse::UnknownImage => {
                debug!(%peer, idx, "peer does not know the image");
                d.sched.on_failure(&peer, idx, Failure::UnknownImage, now)
            }
            ChunkResponse::BadIndex => d.sched.on_failure(&peer, idx, Failure::Refused, now),
            ChunkResponse::Refused(reason) => {
                warn!(%peer, reason = %truncate(&reason, 200), "peer refused a chunk request");
                d.sched.on_failure(&peer, idx, Failure::Refused, now);
            }
        }
    }

    fn on_internal(&mut self, i: Internal) {
        match i {
            Internal::AdminDone { channel, response } => {
                if self
                    .swarm
                    .behaviour_mut()
                    .admin
                    .send_response(channel, response)
                    .is_err()
                {
                    debug!("the GIS went away before an admin command's answer");
                }
            }
            Internal::Served {
                channel,
                peer,
                image,
                index,
                response,
            } => {
                self.serving = self.serving.saturating_sub(1);
                if let ChunkResponse::Data {
                    encoding: Encoding::Zstd,
                    payload,
                } = &response
                {
                    self.payload_cache
                        .insert(image, index, (Encoding::Zstd, payload.clone()));
                }
                let link = self.link_of(&peer).unwrap_or(Link::Lan);
                self.finish_serve(channel, peer, image, response, link);
            }
            Internal::Stored {
                image,
                idx,
                peer,
                result,
            } => self.on_stored(image, idx, peer, result),
            Internal::Prepared {
                manifest,
                times,
                result,
            } => self.on_prepared(manifest, times, result),
        }
    }

    fn on_stored(
        &mut self,
        image: ImageId,
        idx: ChunkIndex,
        peer: PeerId,
        result: Result<(Encoding, Bytes), StoreFail>,
    ) {
        let now = self.now;
        let Some(d) = self.downloads.get_mut(&image) else {
            return;
        };
        match result {
            Ok((encoding, payload)) => {
                self.metrics.chunk_verified();
                d.sched.on_chunk(&peer, idx, now);
                self.announcer.gained(image, idx);
                // Deferred requests for this chunk are answered now (cut-through relay),
                // all from the one received buffer.
                // Of the hosts of our IDC waiting, one gets it; the others take it from that
                // host once it announces it (`crate::seeding`).
                if let Some(ws) = self.waiters.remove(&(image, idx)) {
                    debug!(idx, waiters = ws.len(), "answering deferred requests");
                    let seeds = self.seeds_lan();
                    let lan: Vec<PeerId> = ws
                        .iter()
                        .map(|(_, p)| *p)
                        .filter(|p| self.link_of(p) == Some(Link::Lan))
                        .collect();
                    let taker = if seeds && !lan.is_empty() {
                        self.seeder
                            .pick_taker(image, idx, &lan, now)
                            .and_then(|k| lan.get(k).copied())
                    } else {
                        None
                    };
                    for (channel, p) in ws {
                        let link = self.link_of(&p).unwrap_or(Link::Lan);
                        if seeds && link == Link::Lan && Some(p) != taker {
                            self.respond(p, channel, ChunkResponse::NotHeld);
                            continue;
                        }
                        let resp = ChunkResponse::Data {
                            encoding,
                            payload: payload.clone(),
                        };
                        self.finish_serve(channel, p, image, resp, link);
                    }
                }
                self.payload_cache.insert(image, idx, (encoding, payload));
                self.update_progress(&image);
            }
            Err(StoreFail::Corrupt(e)) if self.bans.contains_key(&peer) => {
                // Arrived before the ban, verified after: it changes nothing.
                debug!(%peer, idx, error = %e, "another corrupt chunk from a banned peer");
                d.sched.on_failure(&peer, idx, Failure::Corrupt, now);
            }
            Err(StoreFail::Corrupt(e)) => {
                warn!(%peer, image = %image.short(), idx, error = %e, "chunk failed verification; penalising the sender");
                self.acct.bad_chunk(image);
                self.metrics.chunk_failed();
                d.sched.on_failure(&peer, idx, Failure::Corrupt, now);
                if d.sched.is_banned(&peer) && !self.bans.contains_key(&peer) {
                    self.ban(peer, now);
                }
            }
            Err(StoreFail::Local(e)) => {
                // Our disk, not the sender: nobody is penalised, and fetching more only
                // fails the same way, so the download stops (the chunk stays missing).
                let reason = match e {
                    StoreError::DiskFull { .. } => {
                        let needed = self.store.bytes_needed(&d.manifest);
                        match self.store.free_space() {
                            Ok(free) => StoreError::NoSpace {
                                dir: self.store.dir().to_path_buf(),
                                needed,
                                free,
                            }
                            .to_string(),
                            Err(_) => e.to_string(),
                        }
                    }
                    e => format!(
                        "storing chunk {idx} of {} failed: {e} (a local fault; no sender is blamed)",
                        d.manifest.image_ref()
                    ),
                };
                self.fail_download(image, reason);
                return;
            }
        }
        self.pump(&image, now);
    }

    fn update_progress(&mut self, image: &ImageId) {
        let Some(d) = self.downloads.get_mut(image) else {
            return;
        };
        let held = self.store.status(image).map(|s| s.held).unwrap_or(0);
        let complete = d.sched.is_complete() && d.sched.verifying() == 0;
        d.progress.send_modify(|p| p.held = held);
        if complete {
            let took = d.started.elapsed();
            let secs = took.as_secs_f64();
            info!(image = %d.manifest.image_ref(), id = %image.short(), secs = format!("{secs:.2}"), "download complete and verified");
            // Counted before watchers learn of it: what they scrape then includes it.
            self.metrics.download_done(took);
            d.progress.send_modify(|p| p.done = Some(Ok(secs)));
            // The host's own measure of the provision time, for the GIS and the console.
            self.acct.provisioned(
                *image,
                gisp::ProvisionTime {
                    millis: u64::try_from(took.as_micros().div_ceil(1000)).unwrap_or(u64::MAX),
                    completed_ms: unix_ms(),
                },
            );
            let fresh = self.announcer.take_fresh(image);
            self.downloads.remove(image);
            self.announcer.completed(*image, self.now);
            self.announce(*image, &fresh, true);
            self.publish(image, false);
            // A sled write: off the loop.
            let (store, id) = (self.store.clone(), *image);
            tokio::task::spawn_blocking(move || store.touch(&id));
            // Anyone still waiting on us gets what we now hold.
            let keys: Vec<(ImageId, ChunkIndex)> = self
                .waiters
                .keys()
                .filter(|(i, _)| i == image)
                .copied()
                .collect();
            for k in keys {
                if let Some(ws) = self.waiters.remove(&k) {
                    for (channel, p) in ws {
                        self.on_chunk_request(
                            p,
                            ChunkRequest {
                                image: k.0,
                                index: k.1,
                            },
                            channel,
                        );
                    }
                }
            }
        }
    }

    fn ensure_download(
        &mut self,
        image: ImageQuery,
        reply: Option<oneshot::Sender<Result<watch::Receiver<FetchProgress>, String>>>,
    ) {
        let known = match &image {
            ImageQuery::Id(id) => Some(*id),
            ImageQuery::Ref(r) => self.store.resolve(r),
        };
        if let Some(id) = known {
            if let Some(d) = self.downloads.get(&id) {
                if let Some(r) = reply {
                    let _ = r.send(Ok(d.progress.subscribe()));
                }
                return;
            }
            if let (Some(m), Some(st)) = (self.store.manifest(&id), self.store.status(&id)) {
                if st.complete {
                    if let Some(r) = reply {
                        let (_tx, rx) = watch::channel(FetchProgress {
                            image: m.image_ref(),
                            id,
                            held: st.held,
                            total: st.total,
                            size: m.size,
                            done: Some(Ok(0.0)),
                            startup: None,
                        });
                        let _ = r.send(Ok(rx));
                    }
                    return;
                }
            }
        }
        self.gis_request(
            GisRequest::Lookup {
                image: image.clone(),
                idc: None,
            },
            GisPurpose::Lookup {
                image,
                for_fetch: Some(reply.unwrap_or_else(|| oneshot::channel().0)),
                asked: self.now,
            },
        );
        // Mark a pending id so repeated requests for it do not each start a lookup.
        if let Some(id) = known {
            if let Some(d) = self.downloads.get_mut(&id) {
                d.cadence.lookup_sent();
            }
        }
    }

    fn on_host_list(
        &mut self,
        query: ImageQuery,
        list: HostList,
        reply: Option<oneshot::Sender<Result<watch::Receiver<FetchProgress>, String>>>,
        asked: Instant,
    ) {
        let id = list.image.id;
        let known = match self.downloads.get(&id) {
            // A refresh's answer carries no manifest: the download has it.
            Some(d) if list.manifest.is_empty() => Some(d.manifest.clone()),
            // Only refreshes go without a reply, and their answers without a manifest: this
            // one comes after its download ended (completed or given up), and is moot.
            None if list.manifest.is_empty() && reply.is_none() => {
                debug!(image = %id.short(), "a refresh answered after its download ended");
                return;
            }
            _ => None,
        };
        let manifest = match known.map_or_else(
            || Manifest::from_bytes_with_id(&list.manifest, id).map(Arc::new),
            Ok,
        ) {
            Ok(m) => m,
            Err(e) => {
                warn!(error = %e, "the GIS sent a manifest that does not verify");
                if let Some(r) = reply {
                    let _ = r.send(Err(format!("manifest from the GIS does not verify: {e}")));
                }
                return;
            }
        };
        if let ImageQuery::Ref(r) = &query {
            if &manifest.image_ref() != r {
                if let Some(r) = reply {
                    let _ = r.send(Err("the GIS answered for another image".into()));
                }
                return;
            }
        }
        if !self.downloads.contains_key(&id) {
            if self.store.status(&id).is_some_and(|s| s.complete) {
                if let Some(r) = reply {
                    let (_tx, rx) = watch::channel(FetchProgress {
                        image: manifest.image_ref(),
                        id,
                        held: manifest.chunk_count(),
                        total: manifest.chunk_count(),
                        size: manifest.size,
                        done: Some(Ok(0.0)),
                        startup: None,
                    });
                    let _ = r.send(Ok(rx));
                }
                return;
            }
            let sources = list.level0.len() + list.level1.len() + list.level2.len();
            if sources == 0 && reply.is_some() && !self.may_relay_any() {
                if let Some(r) = reply {
                    let _ = r.send(Err(format!(
                        "no source for {}: no live host of IDC {} holds it and no bridgehead can fetch it",
                        manifest.image_ref(),
                        self.cfg.idc
                    )));
                }
                return;
            }
            // The store's part (a file created, a sled transaction) runs off the loop; the
            // lists that arrive meanwhile wait with this one.
            if let Some(waiting) = self.preparing.get_mut(&id) {
                waiting.push((list, reply));
                return;
            }
            self.preparing.insert(id, vec![(list, reply)]);
            let (store, itx) = (self.store.clone(), self.itx.clone());
            let times = (asked, self.now);
            tokio::spawn(async move {
                let m = manifest.clone();
                let result = tokio::task::spawn_blocking(move || prepare_download(&store, &m))
                    .await
                    .unwrap_or_else(|e| Err(format!("the store task failed: {e}")));
                let _ = itx
                    .send(Internal::Prepared {
                        manifest,
                        times,
                        result,
                    })
                    .await;
            });
            return;
        }
        self.take_host_list(id, list, reply);
    }

    /// The store is ready (or not) for the download of `manifest`: the download starts and
    /// takes the host lists that waited, or each waiting fetch gets the error.
    fn on_prepared(
        &mut self,
        manifest: Arc<Manifest>,
        (asked, answered): (Instant, Instant),
        result: Result<Prepared, String>,
    ) {
        let id = manifest.id();
        let lists = self.preparing.remove(&id).unwrap_or_default();
        let prepared = match result {
            Ok(p) => p,
            Err(e) => {
                for (_, reply) in lists {
                    if let Some(r) = reply {
                        let _ = r.send(Err(e.clone()));
                    }
                }
                return;
            }
        };
        if !self.downloads.contains_key(&id) {
            let (level0, level1, level2) = lists.first().map_or((0, 0, 0), |(l, _)| {
                (l.level0.len(), l.level1.len(), l.level2.len())
            });
            let held = prepared.held;
            let mut sched = Download::new(
                manifest.chunk_count(),
                |i| held.get(i as usize).copied().unwrap_or(false),
                self.cfg.scheduler.clone(),
                rand::random(),
            );
            sched.set_identity(self.me);
            let (tx, _) = watch::channel(FetchProgress {
                image: manifest.image_ref(),
                id,
                held: prepared.held_chunks,
                total: manifest.chunk_count(),
                size: manifest.size,
                done: None,
                startup: None,
            });
            info!(image = %manifest.image_ref(), id = %id.short(), chunks = manifest.chunk_count(),
                  level0, level1, level2, prepare_ms = answered.elapsed().as_millis() as u64, "download started");
            if self.downloads.is_empty() {
                // No saved-up burst: the download limit holds from the first request.
                self.download.start_fresh(self.now);
            }
            let mut startup = Startup::new(asked);
            startup.lookup_answered(answered);
            self.downloads.insert(
                id,
                DownloadState {
                    manifest: manifest.clone(),
                    sched,
                    started: self.now,
                    progress: tx,
                    candidates: HashMap::new(),
                    pending_haves: HashMap::new(),
                    active: HashSet::new(),
                    cadence: Cadence::new(self.now),
                    startup,
                    lan_available: (false, self.now),
                },
            );
            self.publish(&id, true);
        }
        for (list, reply) in lists {
            self.take_host_list(id, list, reply);
        }
    }

    /// Takes a host list into the running download of `id`: its peers become candidates.
    fn take_host_list(&mut self, id: ImageId, list: HostList, reply: Option<FetchReply>) {
        let Some(d) = self.downloads.get_mut(&id) else {
            return;
        };
        d.cadence.lookup_answered(self.now);
        if let Some(r) = reply {
            let _ = r.send(Ok(d.progress.subscribe()));
        }
        let bids = self.cfg.policy == Policy::Bids;
        let mut entries: Vec<(HostEntry, SourceKind)> = Vec::new();
        for e in list.level0 {
            entries.push((e, SourceKind::Lan));
        }
        for e in list.level1 {
            entries.push((
                e,
                if bids {
                    SourceKind::LocalBridgehead
                } else {
                    SourceKind::Lan
                },
            ));
        }
        if bids && self.role == Role::Bridgehead {
            for e in list.level2 {
                entries.push((e, SourceKind::RemoteBridgehead));
            }
        }
        for (e, kind) in entries {
            if e.peer == self.me {
                continue;
            }
            // A remote bridgehead whose IDC holds the image supplies everything; one that is
            // itself fetching supplies what it announces.
            let complete = if kind == SourceKind::RemoteBridgehead {
                e.idc_complete || e.complete
            } else {
                e.complete
            };
            if bids && e.idc != self.cfg.idc && kind != SourceKind::RemoteBridgehead {
                // Ordinary hosts never dial another IDC.
                continue;
            }
            let addrs: Vec<Multiaddr> = e.addrs.into_iter().take(gisp::MAX_ADDRS).collect();
            if !addrs.is_empty() {
                self.addrs.insert(e.peer, addrs);
            }
            if let Some(d) = self.downloads.get_mut(&id) {
                d.candidates.insert(e.peer, (kind, complete));
            }
            self.activate(&id, &e.peer);
        }
    }

    /// A bridgehead under BIDS keeps links to the other IDCs' bridgeheads (the GIS lists
    /// them in its answers to our heartbeats) open: the first image they trade then does
    /// not wait for TCP, noise and hello round trips over the WAN.
    fn link_bridgeheads(&mut self, list: Vec<HostEntry>) {
        if self.role != Role::Bridgehead || self.cfg.policy != Policy::Bids {
            return;
        }
        for e in list {
            if e.peer == self.me || e.idc == self.cfg.idc || e.role != Role::Bridgehead {
                continue;
            }
            let addrs: Vec<Multiaddr> = e.addrs.into_iter().take(gisp::MAX_ADDRS).collect();
            if addrs.is_empty() {
                continue;
            }
            self.addrs.insert(e.peer, addrs.clone());
            if self.swarm.is_connected(&e.peer) || self.dialing.contains(&e.peer) {
                continue;
            }
            let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(e.peer)
                .addresses(addrs)
                .build();
            if self.swarm.dial(opts).is_ok() {
                debug!(peer = %e.peer, idc = %e.idc, "linking to a bridgehead of another IDC");
                self.dialing.insert(e.peer);
            }
        }
    }

    fn may_relay_any(&self) -> bool {
        self.cfg.policy == Policy::Bids && self.role == Role::Bridgehead
    }

    /// Adds a candidate source to its download once its hello is accepted; dials it otherwise.
    fn activate(&mut self, image: &ImageId, peer: &PeerId) {
        if self.bans.contains_key(peer) {
            return;
        }
        let accepted = self.peers.is_accepted(peer);
        let connected = self.swarm.is_connected(peer);
        let Some(d) = self.downloads.get_mut(image) else {
            return;
        };
        let Some(&(kind, complete)) = d.candidates.get(peer) else {
            return;
        };
        if accepted {
            if d.active.insert(*peer) {
                d.startup.source_ready(self.now);
                if kind == SourceKind::RemoteBridgehead && !complete {
                    d.sched.add_fetching_bridgehead(*peer);
                } else {
                    d.sched.add_peer(*peer, kind, complete);
                }
                if let Some(r) = d.pending_haves.remove(peer) {
                    d.sched.peer_has(peer, &r);
                }
            } else if complete {
                d.sched.peer_complete(peer);
            }
        } else if !connected && !self.dialing.contains(peer) {
            if let Some(addrs) = self.addrs.get(peer).cloned() {
                let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(*peer)
                    .addresses(addrs)
                    .build();
                if self.swarm.dial(opts).is_ok() {
                    self.dialing.insert(*peer);
                }
            } else if let Some(d) = self.downloads.get_mut(image) {
                // Known only from an announcement: the GIS has its address.
                d.cadence.unknown_announcer();
            }
        }
    }

    fn on_announcement(&mut self, src: PeerId, data: &[u8], remote: bool) {
        if src == self.me {
            return;
        }
        // A bridgehead announcement from another IDC counts only for a bridgehead linked to it.
        if remote && (self.role != Role::Bridgehead || self.link_of(&src) != Some(Link::Wan)) {
            return;
        }
        let a = match Announcement::from_bytes(data) {
            Ok(a) => a,
            Err(e) => {
                debug!(peer = %src, error = %e, "bad announcement ignored");
                return;
            }
        };
        for h in a.haves {
            let Some(d) = self.downloads.get_mut(&h.image) else {
                continue;
            };
            if !h.lost.is_empty() {
                d.sched.peer_lost(&src, &h.lost);
                if let Some(c) = d.candidates.get_mut(&src) {
                    c.1 = false;
                }
            }
            if d.active.contains(&src) {
                if h.complete {
                    d.sched.peer_complete(&src);
                } else {
                    d.sched.peer_has(&src, &h.ranges);
                }
                continue;
            }
            let kind = if remote {
                SourceKind::RemoteBridgehead
            } else {
                SourceKind::Lan
            };
            let entry = d.candidates.entry(src).or_insert((kind, false));
            if h.complete {
                entry.1 = true;
            }
            d.pending_haves
                .entry(src)
                .or_default()
                .extend(h.ranges.iter().copied());
            let image = h.image;
            self.activate(&image, &src);
        }
    }

    fn announce(&mut self, image: ImageId, fresh: &[ChunkIndex], complete: bool) {
        let mut idx: Vec<ChunkIndex> = fresh.to_vec();
        idx.sort_unstable();
        idx.dedup();
        let msg = Announcement {
            haves: vec![Have {
                image,
                ranges: gossip::to_ranges(&idx),
                complete,
                lost: Vec::new(),
            }],
        };
        self.publish_gossip(msg);
    }

    fn publish_gossip(&mut self, msg: Announcement) {
        let bytes = msg.to_bytes();
        if bytes.len() > gossip::MAX_ANNOUNCE_BYTES {
            // Split: announce halves (only happens for very fragmented partial images).
            if msg.haves.len() == 1 && msg.haves[0].ranges.len() > 1 {
                let h = &msg.haves[0];
                let mid = h.ranges.len() / 2;
                let a = Have {
                    image: h.image,
                    ranges: h.ranges[..mid].to_vec(),
                    complete: false,
                    lost: Vec::new(),
                };
                let b = Have {
                    image: h.image,
                    ranges: h.ranges[mid..].to_vec(),
                    complete: h.complete,
                    lost: h.lost.clone(),
                };
                self.publish_gossip(Announcement { haves: vec![a] });
                self.publish_gossip(Announcement { haves: vec![b] });
            }
            return;
        }
        if self.role == Role::Bridgehead && self.cfg.policy == Policy::Bids {
            if let Err(e) = self
                .swarm
                .behaviour_mut()
                .gossipsub
                .publish(self.bridgehead_topic.clone(), bytes.clone())
            {
                debug!(error = %e, "bridgehead announcement not sent");
            }
        }
        if let Err(e) = self
            .swarm
            .behaviour_mut()
            .gossipsub
            .publish(self.topic.clone(), bytes)
        {
            debug!(error = %e, "announcement not sent");
        }
    }

    /// Bans `peer` node-wide for serving corrupt chunks: every download drops it (its
    /// in-flight requests go elsewhere; answers still on their way are dropped), no new one
    /// takes it until the ban expires, and the GIS hears of it at once.
    fn ban(&mut self, peer: PeerId, now: Instant) {
        let until = now + self.cfg.ban_duration;
        self.bans.insert(peer, until);
        warn!(%peer, secs = self.cfg.ban_duration.as_secs(), "peer banned node-wide for serving corrupt chunks; reported to the GIS");
        for d in self.downloads.values_mut() {
            d.sched.ban(&peer);
            d.active.remove(&peer);
            d.candidates.remove(&peer);
        }
        if self.gis.registered() {
            self.send_heartbeat();
        }
    }

    fn send_heartbeat(&mut self) {
        let mut stats = self.acct.snapshot();
        stats.settings = Some(self.settings());
        stats.banned = self.bans.keys().copied().collect();
        self.gis_request(GisRequest::Heartbeat { stats }, GisPurpose::Heartbeat);
    }

    /// Chunks the store found corrupt at rest (serving, export, verification, scrubbing) and
    /// marked missing are withdrawn: the IDC's peers learn it by gossip (they stop asking us
    /// for them), the GIS by a publish (we no longer count as a complete holder), and a
    /// download of the image fetches them again.
    fn withdraw_lost(&mut self) {
        let lost = self.store.take_lost();
        if lost.is_empty() {
            return;
        }
        let mut by_image: HashMap<ImageId, Vec<ChunkIndex>> = HashMap::new();
        for (id, idx) in lost {
            by_image.entry(id).or_default().push(idx);
        }
        for (id, mut idx) in by_image {
            idx.sort_unstable();
            idx.dedup();
            self.announcer.no_longer_complete(&id);
            if let Some(d) = self.downloads.get_mut(&id) {
                for &i in &idx {
                    d.sched.unmark_held(i);
                }
            }
            info!(image = %id.short(), chunks = idx.len(), "withdrawing chunks found corrupt at rest from the GIS and the IDC's peers");
            self.publish_gossip(Announcement {
                haves: vec![Have {
                    image: id,
                    ranges: Vec::new(),
                    complete: false,
                    lost: gossip::to_ranges(&idx),
                }],
            });
            let fetching = self.downloads.contains_key(&id);
            self.publish(&id, fetching);
        }
    }

    // ---------------------------------------------------------------- the tick

    fn on_tick(&mut self) {
        let now = self.now;
        let gis = self.gis.tick(now);
        if gis.dial {
            self.dial_gis();
        }
        if let Some(r) = gis.reminder {
            let cause = r.cause.as_deref().unwrap_or("a dial is under way, no answer yet (packets dropped on the way, or the port is not the GIS's?)");
            warn!(gis = %self.gis.name(), down_for = ?r.down_for, %cause, next_reminder_in = ?r.next_in, "still no connection to the GIS");
        }
        for step in gis.steps {
            self.gis_step(step);
        }
        self.check_cert_ends(now);
        self.sample_metrics(now);
        if now.duration_since(self.last_heartbeat) >= self.cfg.heartbeat {
            self.last_heartbeat = now;
            self.save_counters();
            if !self.gis.registered() {
                self.register();
            } else {
                self.send_heartbeat();
            }
        }
        // Peers that never said hello, or were refused and had time to read why, are dropped.
        for (p, early) in self.peers.expire(now) {
            self.release_early(p, early);
            let _ = self.swarm.disconnect_peer_id(p);
        }
        for (peer, q) in self.uploads.tick(now) {
            self.send_data(peer, q);
        }
        self.withdraw_lost();
        let expired: Vec<PeerId> = self
            .bans
            .iter()
            .filter(|(_, until)| **until <= now)
            .map(|(p, _)| *p)
            .collect();
        let lifted = !expired.is_empty();
        for p in expired {
            self.bans.remove(&p);
            info!(peer = %p, "ban for corrupt chunks expired");
        }
        // The GIS hears of a lifted ban at once, as of a new one: it lists the peer again.
        if lifted && self.gis.registered() {
            self.send_heartbeat();
        }
        self.release_stuck_waiters();
        self.drive_downloads(now);
        let due = self.announcer.tick(now);
        for (id, fresh) in due.fresh {
            if self.downloads.contains_key(&id) {
                self.announce(id, &fresh, false);
            }
        }
        if let Some(completed) = due.full {
            let mut haves = Vec::new();
            for id in self.downloads.keys() {
                if let Some(held) = self.store.held(id) {
                    let idx: Vec<ChunkIndex> = held
                        .iter()
                        .enumerate()
                        .filter(|(_, h)| **h)
                        .map(|(i, _)| i as u32)
                        .collect();
                    if !idx.is_empty() {
                        haves.push(Have {
                            image: *id,
                            ranges: gossip::to_ranges(&idx),
                            complete: false,
                            lost: Vec::new(),
                        });
                    }
                }
            }
            for id in completed {
                haves.push(Have {
                    image: id,
                    ranges: Vec::new(),
                    complete: true,
                    lost: Vec::new(),
                });
            }
            for h in haves {
                self.publish_gossip(Announcement { haves: vec![h] });
            }
        }
    }

    /// Gauges the engine's state: peers by kind, downloads, GIS link, certificate expiry.
    fn sample_metrics(&mut self, now: Instant) {
        if now.duration_since(self.last_metrics_sample) < METRICS_SAMPLE {
            return;
        }
        self.last_metrics_sample = now;
        let mut s = crate::metrics::Sample {
            gis_connected: self.gis.connected(),
            registered: self.gis.registered(),
            downloads_active: self.downloads.len(),
            cert_expires_at: self.cert.as_ref().map(|c| c.body.not_after),
            cert_expiring: self.cert_expiring(Self::now_secs()),
            ..Default::default()
        };
        let census = self.peers.census();
        (s.bridgeheads, s.hosts, s.remotes, s.pending) = (
            census.bridgeheads,
            census.hosts,
            census.remotes,
            census.pending,
        );
        self.metrics.sample(&s);
    }

    /// Certificates end at their not-after, as if revoked then: ours (this node becomes an
    /// ordinary host of its IDC and registers again as one) and those of the bridgeheads of
    /// other IDCs we accepted (their connections close; the other end closes too). A
    /// certificate about to expire is warned about at start and daily.
    fn check_cert_ends(&mut self, now: Instant) {
        let secs = Self::now_secs();
        if let Some(c) = &self.cert {
            let (serial, not_after) = (c.body.serial, c.body.not_after);
            let expires = bids_protocols::cert::fmt_time(not_after);
            if secs >= not_after {
                warn!(serial, %expires, "this node's bridgehead certificate expired: cross-IDC links close and the node goes on as an ordinary host of IDC {}; ask the admin for a new certificate and reload it (SIGHUP reloads --cert)", self.cfg.idc);
                self.cert = None;
                self.cert_warned = None;
                self.leave_bridgehead_role();
                self.register();
            } else if self.cert_expiring(secs)
                && self
                    .cert_warned
                    .is_none_or(|t| now.duration_since(t) >= CERT_WARN_EVERY)
            {
                self.cert_warned = Some(now);
                let days_left = (not_after - secs) as f64 / 86_400.0;
                warn!(serial, %expires, days_left = format!("{days_left:.1}"), "this node's bridgehead certificate expires soon; ask the admin for a new one and reload it (SIGHUP reloads --cert) before then");
            }
        }
        let ended: Vec<PeerId> = self
            .wan_cert_ends
            .iter()
            .filter(|(_, end)| secs >= **end)
            .map(|(p, _)| *p)
            .collect();
        for p in ended {
            self.wan_cert_ends.remove(&p);
            warn!(peer = %p, "the bridgehead certificate of this peer of another IDC expired; closing the connection");
            self.peers.drop_peer(&p);
            let _ = self.swarm.disconnect_peer_id(p);
        }
    }

    /// Our certificate ends within the warning period.
    fn cert_expiring(&self, secs: i64) -> bool {
        let warn = i64::try_from(self.cfg.cert_warn.as_secs()).unwrap_or(i64::MAX);
        self.cert
            .as_ref()
            .is_some_and(|c| secs.saturating_add(warn) >= c.body.not_after)
    }

    /// Remote bridgeheads that asked before we knew what our IDC holds are answered NotHeld
    /// for chunks no LAN peer of ours has (they fetch them elsewhere), so no two bridgeheads
    /// ever wait on each other.
    fn release_stuck_waiters(&mut self) {
        let now = self.now;
        let mut release = Vec::new();
        for ((image, idx), ws) in &self.waiters {
            let Some(d) = self.downloads.get(image) else {
                continue;
            };
            // Until the LAN peers the GIS listed have said hello, we do not know yet what our
            // IDC holds (a bridgehead that lacks an image learns it only then).
            let discovering = now.duration_since(d.started) < LAN_DISCOVERY_GRACE
                && d.candidates
                    .iter()
                    .any(|(p, (kind, _))| !kind.is_wan() && !d.active.contains(p));
            if discovering {
                continue;
            }
            if d.sched.lan_available(*idx) || d.sched.is_held(*idx) {
                continue;
            }
            for (i, (_, p)) in ws.iter().enumerate() {
                if self.link_of(p) == Some(Link::Wan) {
                    release.push(((*image, *idx), i));
                }
            }
        }
        // Remove from the back so indexes stay valid.
        let mut answer = Vec::new();
        for ((image, idx), i) in release.into_iter().rev() {
            let Some(ws) = self.waiters.get_mut(&(image, idx)) else {
                continue;
            };
            if i < ws.len() {
                answer.push((idx, ws.remove(i)));
            }
            if ws.is_empty() {
                self.waiters.remove(&(image, idx));
            }
        }
        for (idx, (ch, p)) in answer {
            debug!(peer = %p, idx, "remote bridgehead's request answered NotHeld (not in our IDC)");
            self.respond(p, ch, ChunkResponse::NotHeld);
        }
    }

    /// Counts the time since the last look as time the IDC could have kept us busy over
    /// the LAN if it held a chunk we lacked then (with the LAN bytes that arrived by `now`),
    /// and looks again. Called on every tick and every chunk that arrives.
    fn note_lan_availability(&mut self, id: &ImageId, now: Instant, lan_bytes: u64) {
        let Some(d) = self.downloads.get_mut(id) else {
            return;
        };
        let (was, since) = d.lan_available;
        d.lan_available = (d.sched.idc_holds_missing(), now);
        if was {
            self.acct
                .lan_available(*id, now.saturating_duration_since(since), lan_bytes);
        }
    }

    /// Sends the requests the scheduler wants now (called on every event that frees a slot,
    /// not only on the tick, so the pipeline never waits for the clock).
    fn pump(&mut self, id: &ImageId, now: Instant) {
        if !self.download.may_send(now) {
            return;
        }
        let Some(d) = self.downloads.get_mut(id) else {
            return;
        };
        if d.sched.verifying() >= MAX_WRITING {
            // Verification and the disk lag behind the network: received chunks wait in
            // memory, so no more are asked for until some are stored (bounded memory).
            return;
        }
        let reqs = d.sched.next_requests(now);
        for (peer, idx) in reqs {
            // Over the download limit the rest wait for a later pump: requests are charged
            // as they leave, so the pipeline cannot run ahead of the limit.
            if !self.download.may_send(now) {
                d.sched.cancel(&peer, idx);
                continue;
            }
            debug!(%peer, idx, "requesting chunk");
            let rid = self.swarm.behaviour_mut().chunk.send_request(
                &peer,
                ChunkRequest {
                    image: *id,
                    index: idx,
                },
            );
            d.startup.request_sent(now);
            self.download
                .sent(rid, d.manifest.chunk_len(idx) as u64, now);
            self.inflight.insert(rid, (*id, idx, peer));
        }
    }

    fn drive_downloads(&mut self, now: Instant) {
        let ids: Vec<ImageId> = self.downloads.keys().copied().collect();
        for id in ids {
            let Some(d) = self.downloads.get_mut(&id) else {
                continue;
            };
            for (peer, idx) in d.sched.expire(now) {
                debug!(%peer, idx, "chunk request timed out");
            }
            self.note_lan_availability(&id, now, 0);
            self.pump(&id, now);
            let Some(d) = self.downloads.get_mut(&id) else {
                continue;
            };
            let pace = Pace {
                lookup_refresh: self.cfg.lookup_refresh,
                no_source_timeout: self.cfg.no_source_timeout,
            };
            let due = d.cadence.tick(now, self.role, d.sched.is_stalled(), &pace);
            let (lookup, publish) = (due.lookup, due.publish);
            let failed = due.no_source_for.map(|for_| {
                format!(
                    "no source for {} for {for_:?}: {} of {} chunks missing and no reachable host or bridgehead holds them",
                    d.manifest.image_ref(),
                    d.sched.missing(),
                    d.manifest.chunk_count()
                )
            });
            if let Some(reason) = failed {
                self.fail_download(id, reason);
                continue;
            }
            if lookup {
                self.gis_request(
                    GisRequest::Refresh { image: id },
                    GisPurpose::Lookup {
                        image: ImageQuery::Id(id),
                        for_fetch: None,
                        asked: now,
                    },
                );
            }
            if publish {
                self.publish(&id, true);
            }
        }
    }

    /// Ends a download with `reason`: its watchers learn why, requests deferred on it are
    /// answered NotHeld, and the GIS learns what we hold now.
    fn fail_download(&mut self, id: ImageId, reason: String) {
        self.metrics.download_failed();
        warn!(image = %id.short(), %reason, "download failed");
        if let Some(d) = self.downloads.remove(&id) {
            d.progress
                .send_modify(|p| p.done = Some(Err(reason.clone())));
        }
        let keys: Vec<(ImageId, ChunkIndex)> = self
            .waiters
            .keys()
            .filter(|(i, _)| *i == id)
            .copied()
            .collect();
        for k in keys {
            for (ch, p) in self.waiters.remove(&k).unwrap_or_default() {
                self.respond(p, ch, ChunkResponse::NotHeld);
            }
        }
        self.publish(&id, false);
    }

    // ---------------------------------------------------------------- commands

    fn on_command(&mut self, c: Command) {
        match c {
            Command::Fetch { image, reply } => self.ensure_download(image, Some(reply)),
            Command::Status { reply } => {
                let _ = reply.send(self.status());
            }
            Command::Imported { id } => self.publish(&id, false),
            Command::Removed { id } => {
                self.downloads.remove(&id);
                self.acct.forget(&id);
                self.seeder.forget(&id);
                self.gis_request(GisRequest::Unpublish { image: id }, GisPurpose::Unpublish);
            }
            Command::SetLimits {
                upload_bps,
                download_bps,
            } => {
                info!(upload_bps, download_bps, "rate limits changed");
                self.uploads.set_rate(upload_bps, self.now);
                self.download.set_rate(download_bps, self.now);
            }
            Command::SetSharing { enabled } => {
                info!(enabled, "sharing switched");
                self.sharing = enabled;
            }
            Command::SetCert { cert, reply } => self.set_cert(cert.map(|c| *c), reply),
            Command::Gis { req, reply } => self.gis_request(*req, GisPurpose::Caller(reply)),
            Command::Shutdown { .. } => unreachable!("handled in the loop"),
        }
    }

    fn settings(&self) -> HostSettings {
        HostSettings {
            upload_bps: self.uploads.rate(),
            download_bps: self.download.rate(),
            sharing: self.sharing,
        }
    }

    /// An admin request relayed by the GIS: admitted ones run as a task (they may import
    /// files or wait for the GIS), whose answer comes back as `Internal::AdminDone`.
    fn on_admin(&mut self, ev: rr::Event<AdminRequest, AdminResponse>) {
        let rr::Event::Message {
            peer,
            message: rr::Message::Request {
                request, channel, ..
            },
            ..
        } = ev
        else {
            return;
        };
        let cmd = match self.admin_gate.admit(peer, request, Self::now_secs()) {
            Ok(cmd) => cmd,
            Err(refusal) => {
                self.answer_admin(channel, refusal);
                return;
            }
        };
        let (reply, answer) = oneshot::channel();
        match self.admin_jobs.try_send(AdminJob { cmd, reply }) {
            Ok(()) => {
                let itx = self.itx.clone();
                tokio::spawn(async move {
                    if let Ok(response) = answer.await {
                        let _ = itx.send(Internal::AdminDone { channel, response }).await;
                    }
                });
            }
            Err(mpsc::error::TrySendError::Full(job)) => {
                warn!(command = %job.cmd.describe(), "admin command refused: {ADMIN_QUEUE} others wait");
                let busy = AdminResponse::Error {
                    kind: adminp::AdminErrorKind::Failed,
                    message: format!(
                        "this host has {ADMIN_QUEUE} admin commands waiting; try again later"
                    ),
                };
                self.answer_admin(channel, busy);
            }
            // The executor is gone: the node is stopping.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    fn answer_admin(&mut self, channel: ResponseChannel<AdminResponse>, response: AdminResponse) {
        let _ = self
            .swarm
            .behaviour_mut()
            .admin
            .send_response(channel, response);
    }

    /// Takes or drops a bridgehead certificate, then re-registers so the GIS grants the role.
    fn set_cert(
        &mut self,
        cert: Option<BridgeheadCert>,
        reply: oneshot::Sender<Result<Role, String>>,
    ) {
        if let Some(c) = &cert {
            let checked = c.verify_for(
                &self.cfg.admin_peer,
                &self.me,
                &self.cfg.idc,
                Self::now_secs(),
                &self.revocations,
            );
            if let Err(e) = checked {
                let _ = reply.send(Err(format!("certificate refused: {e}")));
                return;
            }
        }
        if cert.is_none() && self.cert.is_some() {
            info!("bridgehead certificate dropped; cross-IDC links close");
            self.leave_bridgehead_role();
        } else if let Some(c) = &cert {
            info!(serial = c.body.serial, db_id = %c.body.db_id, not_after = %bids_protocols::cert::fmt_time(c.body.not_after), "bridgehead certificate set");
        }
        self.cert = cert;
        self.cert_warned = None;
        // Bridgeheads of other IDCs still linked to us know our old certificate's end and
        // would close then: tell them the new one.
        if self.cert.is_some() {
            let wan: Vec<PeerId> = self.wan_cert_ends.keys().copied().collect();
            for p in wan {
                let h = self.my_hello();
                self.swarm.behaviour_mut().hello.send_request(&p, h);
            }
        }
        self.register_for(GisPurpose::RegisterFor(reply));
    }

    /// Becomes an ordinary host: off the bridgehead topic, cross-IDC links closed.
    fn leave_bridgehead_role(&mut self) {
        self.role = Role::Host;
        self.swarm
            .behaviour_mut()
            .gossipsub
            .unsubscribe(&self.bridgehead_topic);
        for p in self.peers.wan_peers() {
            self.peers.drop_peer(&p);
            self.wan_cert_ends.remove(&p);
            let _ = self.swarm.disconnect_peer_id(p);
        }
    }

    /// The GIS refused to register us with our bridgehead certificate (revoked, expired, not
    /// signed by its admin). Presenting it again would be refused forever and leave the host
    /// unregistered, so it is dropped once and the node registers as an ordinary host of its
    /// IDC: it keeps serving and fetching over the LAN.
    fn bridgehead_cert_refused(&mut self, message: &str) {
        let serial = self.cert.as_ref().map(|c| c.body.serial);
        warn!(?serial, %message, "the GIS refused this node's bridgehead certificate; dropping it and registering as an ordinary host");
        self.cert = None;
        self.leave_bridgehead_role();
        self.register();
    }

    fn status(&self) -> NodeStatus {
        let images = self
            .store
            .list()
            .into_iter()
            .map(|s| ImageReport {
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
            .collect();
        let census = self.peers.census();
        NodeStatus {
            peer: self.me,
            idc: self.cfg.idc.clone(),
            role: self.role,
            policy: self.cfg.policy,
            listen: self.listen.clone(),
            gis_connected: self.gis.connected(),
            registered: self.gis.registered(),
            connected_peers: census.connected,
            wan_links: census.wan_links,
            images,
            total: self.acct.total(),
            refusals: self.acct.refusals(),
            bad_chunks_served_to_us: self.acct.total().bad_chunks,
            banned_peers: {
                let now = self.now;
                self.bans
                    .iter()
                    .map(|(p, until)| (*p, until.saturating_duration_since(now).as_secs()))
                    .collect()
            },
            settings: self.settings(),
            cert_expires_at: self.cert.as_ref().map(|c| c.body.not_after),
            cert_expiring: self.cert_expiring(Self::now_secs()),
        }
    }
}

/// Decodes, verifies (SHA-256 of the raw chunk, once) and stores a received chunk. Returns the
/// encoded payload for relaying.
fn verify_and_store(
    store: &Store,
    m: &Manifest,
    image: &ImageId,
    idx: ChunkIndex,
    encoding: Encoding,
    payload: Bytes,
) -> Result<(Encoding, Bytes), StoreFail> {
    let info = m
        .chunks
        .get(idx as usize)
        .ok_or_else(|| StoreFail::Corrupt(format!("chunk {idx} is past the end")))?;
    let want = m.chunk_len(idx);
    let raw = match encoding {
        Encoding::Raw => {
            if payload.len() != want {
                return Err(StoreFail::Corrupt(format!(
                    "chunk {idx} is {} bytes, expected {want}",
                    payload.len()
                )));
            }
            payload.clone()
        }
        Encoding::Zstd => chunk::decode_payload(encoding, payload.clone(), want)
            .map_err(|e| StoreFail::Corrupt(e.to_string()))?,
    };
    if bids_protocols::manifest::sha256(&raw) != info.sha256 {
        return Err(StoreFail::Corrupt(format!(
            "chunk {idx} does not match its SHA-256"
        )));
    }
    store
        .write_verified_chunk(image, idx, &raw)
        .map_err(StoreFail::Local)?;
    Ok((encoding, payload))
}

/// Unix milliseconds now (0 if the clock is before 1970).
fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
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
