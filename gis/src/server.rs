//! The GIS as a libp2p peer: tcp + noise + yamux, identify, ping and the GIS
//! request-response protocol, and GIS sessions (a long-lived stream per host carrying all its
//! requests, `crate::session`). One event loop owns the swarm and the `Index`; it turns each
//! request, however it came, into an `Index` call. A committer thread owns the `Storage`: a request that changed
//! the index is answered once its changes are durable (group commit: while one flush runs, the
//! next batch gathers), a request that changed nothing (lookups, heartbeats) at once, so a
//! slow disk delays writers only. What the answers mean is the index's business.

use crate::admin::{AdminDesk, AdminReply, HOST_COMMAND_TIMEOUT};
use crate::cluster::ClusterConfig;
use crate::index::{Index, IndexConfig, DEFAULT_HEARTBEATS_PER_S, DEFAULT_HEARTBEAT_TIMEOUT};
use crate::metrics::{self as gis_metrics, GisMetrics};
use crate::session::{Inbox, Incoming, Reply, Sessions};
use crate::storage::{Change, SledStorage, Storage, StorageError};
use anyhow::Context;
use bids_protocols::admin::{self, AdminRequest, AdminResponse};
use bids_protocols::gis::{self, GisRequest, GisResponse};
use bids_protocols::Policy;
use futures::{FutureExt, StreamExt};
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{identify, ping, Multiaddr, PeerId, Swarm};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{debug, error, info, trace, warn};

/// The identify protocol version BIDS peers announce.
pub const IDENTIFY_PROTOCOL: &str = "/bids/id/1";
/// Hosts stay connected to the GIS between heartbeats; keep idle connections this long.
const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(3600);
/// How often the GIS pings each connected host (it answers their pings whatever this is).
const GIS_PING_EVERY: Duration = Duration::from_secs(300);
/// How often dead hosts are looked for.
pub(crate) const EXPIRE_EVERY: Duration = Duration::from_secs(1);
/// Most swarm events handled in one go before replies go out: bounds how long a reply waits.
pub(crate) const MAX_BATCH: usize = 256;
/// At most one listener-error warning per this long. Out of file descriptors, libp2p-tcp
/// reports a failed accept every 100 ms for as long as it lasts.
pub(crate) const LISTENER_WARN_EVERY: Duration = Duration::from_secs(10);
/// sled's directory inside the GIS data dir.
const DB_DIR: &str = "gis.sled";

/// Everything a GIS process needs.
#[derive(Clone, Debug)]
pub struct GisConfig {
    pub keypair: Keypair,
    pub listen: Multiaddr,
    /// Holds the sled database (`gis.sled/`).
    pub data_dir: PathBuf,
    /// The admin identity: its key signs bridgehead certificates; only it may revoke.
    pub admin_peer: PeerId,
    pub policy: Policy,
    /// How long after its last heartbeat a host counts as dead, with few hosts.
    pub heartbeat_timeout: Duration,
    /// Heartbeats per second the GIS asks of all hosts together: the interval (and the
    /// timeout) grow with the number of live hosts beyond `heartbeats_per_s` × a fifth of
    /// `heartbeat_timeout`. 0: fixed.
    pub heartbeats_per_s: u32,
    /// Serve Prometheus metrics, `/healthz` and `/readyz` on this address (off by default).
    pub metrics: Option<SocketAddr>,
    /// Run as one replica of a Raft group (`crate::cluster`); `None`: a single GIS.
    pub cluster: Option<ClusterConfig>,
}

impl GisConfig {
    /// Defaults: policy `bids`, heartbeat timeout 10 s.
    pub fn new(keypair: Keypair, listen: Multiaddr, data_dir: PathBuf, admin_peer: PeerId) -> Self {
        GisConfig {
            keypair,
            listen,
            data_dir,
            admin_peer,
            policy: Policy::Bids,
            heartbeat_timeout: DEFAULT_HEARTBEAT_TIMEOUT,
            heartbeats_per_s: DEFAULT_HEARTBEATS_PER_S,
            metrics: None,
            cluster: None,
        }
    }
}

#[derive(NetworkBehaviour)]
pub(crate) struct GisBehaviour {
    pub(crate) gis: request_response::Behaviour<gis::Codec>,
    /// The admin control path: queries from the admin, commands relayed to hosts.
    pub(crate) admin: request_response::Behaviour<admin::Codec>,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    /// GIS sessions (`crate::session`).
    session: bids_protocols::gis_session::Behaviour,
}

/// Unix milliseconds now: the index's clock, read only here.
pub fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Runs the GIS until `shutdown` completes, storing its state in sled under `data_dir`.
pub async fn run(cfg: GisConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let storage = open_sled(&cfg)?;
    run_inner(cfg, Box::new(storage), shutdown, None, None, None).await
}

/// Starts the GIS on the current tokio runtime and returns once it listens.
pub async fn spawn(cfg: GisConfig) -> anyhow::Result<GisHandle> {
    let storage = open_sled(&cfg)?;
    spawn_with_storage(cfg, Box::new(storage)).await
}

/// Like [`spawn`], with any storage backend (e.g. `MemStorage` in simulations); `data_dir`
/// is then unused.
pub async fn spawn_with_storage(
    cfg: GisConfig,
    storage: Box<dyn Storage>,
) -> anyhow::Result<GisHandle> {
    let peer_id = cfg.keypair.public().to_peer_id();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (addrs_tx, mut addrs_rx) = watch::channel(Vec::new());
    let metrics_at = Arc::new(OnceLock::new());
    let raft_at = Arc::new(OnceLock::new());
    // A dropped sender also means stop, so dropping the handle stops the server.
    let shutdown = stop_rx.map(|_| ());
    let mut task = tokio::spawn(run_inner(
        cfg,
        storage,
        shutdown,
        Some(addrs_tx),
        Some(metrics_at.clone()),
        Some(raft_at.clone()),
    ));
    tokio::select! {
        ready = addrs_rx.wait_for(|a| !a.is_empty()) => {
            if ready.is_err() {
                // The loop ended before listening: report why.
                return match (&mut task).await {
                    Ok(Err(e)) => Err(e),
                    Ok(Ok(())) => Err(anyhow::anyhow!("GIS stopped before it listened")),
                    Err(e) => Err(anyhow::anyhow!("GIS task failed: {e}")),
                };
            }
        }
        res = &mut task => {
            return match res {
                Ok(Err(e)) => Err(e),
                Ok(Ok(())) => Err(anyhow::anyhow!("GIS stopped before it listened")),
                Err(e) => Err(anyhow::anyhow!("GIS task failed: {e}")),
            };
        }
    }
    Ok(GisHandle {
        peer_id,
        raft: raft_at.get().cloned(),
        metrics_addr: metrics_at.get().copied(),
        addrs: addrs_rx,
        stop: Some(stop_tx),
        task: Some(task),
    })
}

/// A GIS running in the background. Dropping it stops the server.
pub struct GisHandle {
    peer_id: PeerId,
    /// A cluster replica's Raft node (for its leader and metrics).
    raft: Option<crate::cluster::GisRaft>,
    metrics_addr: Option<SocketAddr>,
    addrs: watch::Receiver<Vec<Multiaddr>>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl GisHandle {
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// A cluster replica's Raft node: who leads, what is applied. `None` for a single GIS.
    pub fn raft(&self) -> Option<&crate::cluster::GisRaft> {
        self.raft.as_ref()
    }

    /// Where `/metrics`, `/healthz` and `/readyz` are served (`GisConfig::metrics`).
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The addresses it listens on, each ending in `/p2p/<peer id>`.
    pub fn listen_addrs(&self) -> Vec<Multiaddr> {
        self.addrs.borrow().clone()
    }

    /// Stops the server and waits for its loop to end (state is already durable).
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(task) => task.await.context("GIS task panicked")?,
            None => Ok(()),
        }
    }
}

impl GisHandle {
    /// Kills the server as a crash would: its loop is aborted mid-flight (no graceful stop;
    /// what sled has not yet written may be lost) and its connections drop. Returns once the
    /// loop is gone. For fault tests.
    pub async fn abort(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for GisHandle {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

pub(crate) fn open_sled(cfg: &GisConfig) -> anyhow::Result<SledStorage> {
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating GIS data dir {}", cfg.data_dir.display()))?;
    let path = cfg.data_dir.join(DB_DIR);
    SledStorage::open(&path).with_context(|| {
        format!(
            "opening the GIS database {} (is another GIS using this data dir?)",
            path.display()
        )
    })
}

/// What the event loop of a lone GIS or of a Raft replica serves.
pub(crate) struct Opened {
    pub(crate) swarm: Swarm<GisBehaviour>,
    pub(crate) metrics: Arc<GisMetrics>,
    /// The metrics server; it stops when dropped.
    pub(crate) metrics_server: Option<bids_metrics::MetricsServer>,
    /// Requests arriving on GIS sessions.
    pub(crate) inbox: Inbox,
}

/// The GIS's swarm, listening on `cfg.listen`, with its metrics registered and served on
/// `cfg.metrics` if set (its address also put in `metrics_at`), accepting GIS sessions; the
/// same for a lone GIS and a Raft replica.
pub(crate) async fn open_swarm(
    cfg: &GisConfig,
    metrics_at: &Option<Arc<OnceLock<SocketAddr>>>,
    replicated: bool,
) -> anyhow::Result<Opened> {
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(GisMetrics::new(&mut registry, replicated));
    let mut swarm = build_swarm(&cfg.keypair, &mut registry)?;
    let inbox = Inbox::new();
    ensure_port_free(&cfg.listen).with_context(|| format!("listening on {}", cfg.listen))?;
    swarm
        .listen_on(cfg.listen.clone())
        .with_context(|| format!("listening on {}", cfg.listen))?;
    let server = match cfg.metrics {
        Some(addr) => {
            let srv = bids_metrics::serve(addr, metrics.endpoint(Arc::new(registry))).await?;
            if let Some(at) = metrics_at {
                let _ = at.set(srv.local_addr());
            }
            Some(srv)
        }
        None => None,
    };
    Ok(Opened {
        swarm,
        metrics,
        metrics_server: server,
        inbox,
    })
}

pub(crate) fn build_swarm(
    keypair: &Keypair,
    registry: &mut prometheus_client::registry::Registry,
) -> anyhow::Result<Swarm<GisBehaviour>> {
    let swarm = libp2p::SwarmBuilder::with_existing_identity(keypair.clone())
        .with_tokio()
        .with_tcp(
            libp2p::tcp::Config::default().nodelay(true),
            libp2p::noise::Config::new,
            libp2p::yamux::Config::default,
        )
        .context("building the tcp/noise/yamux transport")?
        .with_bandwidth_metrics(registry)
        .with_behaviour(|key| GisBehaviour {
            gis: request_response::Behaviour::with_codec(
                gis::codec(),
                [(gis::PROTOCOL, ProtocolSupport::Inbound)],
                request_response::Config::default(),
            ),
            admin: request_response::Behaviour::with_codec(
                admin::codec(),
                [(admin::PROTOCOL, ProtocolSupport::Full)],
                request_response::Config::default().with_request_timeout(HOST_COMMAND_TIMEOUT),
            ),
            identify: identify::Behaviour::new(
                identify::Config::new(IDENTIFY_PROTOCOL.to_string(), key.public())
                    .with_agent_version(format!("bids-gis/{}", env!("CARGO_PKG_VERSION"))),
            ),
            // Liveness comes from heartbeats; the GIS only answers the hosts' pings and pings
            // rarely itself: at the default 15 s, 20,000 hosts cost it 1,300 stream exchanges
            // a second, as much as 2,600 hosts' heartbeats.
            ping: ping::Behaviour::new(ping::Config::new().with_interval(GIS_PING_EVERY)),
            session: bids_protocols::gis_session::Behaviour::new(true),
        })
        .context("building the GIS behaviour")?
        // Host commands open streams to nodes: 0-RTT negotiation, as the nodes do.
        .with_swarm_config(|c| {
            c.with_idle_connection_timeout(IDLE_CONNECTION_TIMEOUT)
                .with_substream_upgrade_protocol_override(bids_protocols::STREAM_NEGOTIATION)
        })
        .build();
    Ok(swarm)
}

/// Fails with "address A is already in use" if some socket listens on the TCP address of
/// `listen` (port 0 or no TCP address: nothing to check).
///
/// libp2p-tcp binds every listening socket with `SO_REUSEPORT`, and Linux lets any number
/// of sockets of one user bind a port that way: a second GIS on a taken port would start
/// without error, and the kernel would split new connections between the two (lookups
/// then alternate between answers and "Unexpected peer ID"). A socket bound with
/// `SO_REUSEADDR` only is refused by any listener on the port, so one is bound first,
/// without listening, and dropped. The node's transport has the same check
/// (`bids_node::transport::ensure_port_free`); the two crates share no transport.
pub fn ensure_port_free(listen: &Multiaddr) -> std::io::Result<()> {
    let mut ip = None;
    let mut port = None;
    for p in listen.iter() {
        match p {
            Protocol::Ip4(a) => ip = Some(std::net::IpAddr::from(a)),
            Protocol::Ip6(a) => ip = Some(std::net::IpAddr::from(a)),
            Protocol::Tcp(p) => port = Some(p),
            _ => {}
        }
    }
    let (Some(ip), Some(port)) = (ip, port) else {
        return Ok(());
    };
    if port == 0 {
        return Ok(());
    }
    let addr = std::net::SocketAddr::new(ip, port);
    let probe = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    probe.set_reuseaddr(true)?;
    match probe.bind(addr) {
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            format!(
                "address {addr} is already in use (another process listens on it); stop that \
                 process or choose another --listen port"
            ),
        )),
        // Any other failure (say, an address that is not local) is libp2p's to report.
        _ => Ok(()),
    }
}

/// Lets a repeated warning through at most once per `every`, counting what it holds back
/// so the next one can say how many were suppressed. Sans-IO: the caller passes `now`.
#[derive(Debug)]
pub struct WarnThrottle {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl WarnThrottle {
    pub fn new(every: Duration) -> Self {
        WarnThrottle {
            every,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(n)` if the warning should be logged now, `n` being how many were suppressed
    /// since the last one logged; `None` (and one more suppressed) otherwise.
    pub fn admit(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.saturating_duration_since(last) < self.every => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// A single GIS, or a cluster replica when `cfg.cluster` is set (`raft_at` then receives
/// its Raft node before it listens).
async fn run_inner(
    cfg: GisConfig,
    storage: Box<dyn Storage>,
    shutdown: impl Future<Output = ()>,
    addrs: Option<watch::Sender<Vec<Multiaddr>>>,
    metrics_at: Option<Arc<OnceLock<SocketAddr>>>,
    raft_at: Option<Arc<OnceLock<crate::cluster::GisRaft>>>,
) -> anyhow::Result<()> {
    match cfg.cluster.clone() {
        Some(cluster) => {
            crate::cluster::server::run(cfg, cluster, storage, shutdown, addrs, metrics_at, raft_at)
                .await
        }
        None => run_with_storage(cfg, storage, shutdown, addrs, metrics_at).await,
    }
}

/// The event loop. `addrs` (if given) receives the listen addresses as they appear;
/// `metrics_at` the address of the metrics listener, before them.
async fn run_with_storage(
    cfg: GisConfig,
    storage: Box<dyn Storage>,
    shutdown: impl Future<Output = ()>,
    addrs: Option<watch::Sender<Vec<Multiaddr>>>,
    metrics_at: Option<Arc<OnceLock<SocketAddr>>>,
) -> anyhow::Result<()> {
    let snapshot = storage.load().context("loading the GIS state")?;
    let mut index = Index::restore(
        IndexConfig {
            admin: cfg.admin_peer,
            policy: cfg.policy,
            heartbeat_timeout: cfg.heartbeat_timeout,
            heartbeats_per_s: cfg.heartbeats_per_s,
            replicated_liveness: false,
        },
        snapshot,
    );
    let Opened {
        mut swarm,
        metrics,
        metrics_server: _metrics_server,
        mut inbox,
    } = open_swarm(&cfg, &metrics_at, false).await?;
    let sessions = inbox.sessions(metrics.clone());
    let local = *swarm.local_peer_id();
    metrics.sample(&index, unix_ms());
    metrics.set_open(true);
    info!(peer = %local, listen = %cfg.listen, policy = %cfg.policy, admin = %cfg.admin_peer, "GIS starting");

    let mut listening: Vec<Multiaddr> = Vec::new();
    let mut expire = tokio::time::interval(EXPIRE_EVERY);
    expire.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut shutdown = std::pin::pin!(shutdown);
    let mut replies: Vec<(Reply, GisResponse)> = Vec::new();
    let mut waiting: Vec<(Reply, GisResponse)> = Vec::new();
    let mut desk = AdminDesk::new();
    let mut admin_events: Vec<request_response::Event<AdminRequest, AdminResponse>> = Vec::new();
    let mut admin_replies: Vec<AdminReply> = Vec::new();
    let mut listener_warn = WarnThrottle::new(LISTENER_WARN_EVERY);
    let mut committer = Committer::start(storage, metrics.clone());

    loop {
        let first = tokio::select! {
            _ = &mut shutdown => break,
            _ = expire.tick() => {
                let started = Instant::now();
                index.pace(unix_ms());
                for peer in index.expire(unix_ms()) {
                    info!(%peer, "host went dead (no heartbeat within the timeout)");
                }
                metrics.sample(&index, unix_ms());
                busy(&metrics, "liveness", started);
                None
            }
            done = committer.done() => {
                let released = match done {
                    Ok(r) => r,
                    Err(e) => {
                        metrics.set_open(false);
                        return Err(anyhow::Error::new(e).context("persisting GIS state"));
                    }
                };
                send_replies(&mut swarm, released);
                None
            }
            event = swarm.select_next_some() => Some(Input::Swarm(event)),
            Some(incoming) = inbox.recv() => Some(Input::Session(incoming)),
        };
        if let Some(first) = first {
            let started = Instant::now();
            let mut ctx = Ctx {
                index: &mut index,
                collect: None,
                replies: &mut replies,
                waiting: &mut waiting,
                admin_events: &mut admin_events,
                listening: &mut listening,
                addrs: addrs.as_ref(),
                local,
                listener_warn: &mut listener_warn,
                metrics: &metrics,
                sessions: &sessions,
            };
            ctx.on_input(first);
            // Take whatever else is ready: one commit for all of it.
            ctx.take_ready(&mut swarm, &mut inbox);
            // Admin requests may change the index (revocations): before the commit.
            for ev in admin_events.drain(..) {
                desk.on_event(
                    ev,
                    &mut index,
                    &mut swarm.behaviour_mut().admin,
                    unix_ms(),
                    &mut admin_replies,
                );
            }
            let changes = index.take_changes();
            if changes.is_empty() && committer.idle() {
                // Nothing waits for the disk: admin replies go out with the rest.
                send_replies(
                    &mut swarm,
                    Released {
                        gis: std::mem::take(&mut waiting),
                        admin: std::mem::take(&mut admin_replies),
                    },
                );
            } else {
                committer.add(
                    changes,
                    Released {
                        gis: std::mem::take(&mut waiting),
                        admin: std::mem::take(&mut admin_replies),
                    },
                );
            }
            // Requests that changed nothing are answered now, from the index as it is.
            send_replies(
                &mut swarm,
                Released {
                    gis: std::mem::take(&mut replies),
                    admin: Vec::new(),
                },
            );
            busy(&metrics, "batch", started);
        }
        committer.kick();
    }
    // What was answered is durable; make the rest durable too before stopping.
    let rest = committer.finish().await;
    metrics.set_open(false);
    send_replies(&mut swarm, rest.context("persisting GIS state")?);
    info!(peer = %local, "GIS stopped");
    Ok(())
}

/// Longest the event loop may spend on one piece of work before it says so: every request
/// waits meanwhile.
const SLOW_WORK: Duration = Duration::from_millis(100);

/// Records how long the loop spent on `work` since `started`; warns if that held everything
/// else up.
pub(crate) fn busy(metrics: &GisMetrics, work: &'static str, started: Instant) {
    let took = started.elapsed();
    metrics.busy(work, took);
    if took > SLOW_WORK {
        warn!(
            work,
            ?took,
            "the GIS event loop was busy this long; requests waited"
        );
    }
}

/// Replies held until the changes made before them are durable.
#[derive(Default)]
pub(crate) struct Released {
    pub(crate) gis: Vec<(Reply, GisResponse)>,
    pub(crate) admin: Vec<AdminReply>,
}

impl Released {
    fn append(&mut self, mut other: Released) {
        self.gis.append(&mut other.gis);
        self.admin.append(&mut other.admin);
    }
}

pub(crate) fn send_replies(swarm: &mut Swarm<GisBehaviour>, r: Released) {
    for (reply, response) in r.gis {
        if !reply.send(&mut swarm.behaviour_mut().gis, response) {
            debug!("requester went away before its reply");
        }
    }
    for (channel, response) in r.admin {
        if swarm
            .behaviour_mut()
            .admin
            .send_response(channel, response)
            .is_err()
        {
            debug!("admin went away before its reply");
        }
    }
}

/// Group commit on a thread of its own: the storage's flush (an fsync) never blocks the event
/// loop. At most one commit runs; changes that arrive meanwhile gather into the next one.
struct Committer {
    /// Changes and replies not yet handed to the thread.
    gathered: Vec<Change>,
    gathered_replies: Released,
    /// Replies of the commit in progress.
    in_flight: Option<Released>,
    /// `None` once dropped: the thread then ends and closes the storage.
    to_thread: Option<std::sync::mpsc::Sender<Vec<Change>>>,
    from_thread: tokio::sync::mpsc::UnboundedReceiver<Result<(), StorageError>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Committer {
    /// Ends the thread and waits for it, so the storage (sled's lock on the data dir) is
    /// released when the event loop ends, even when it was aborted. At most one commit is
    /// running: the wait is one flush at worst.
    fn drop(&mut self) {
        self.to_thread = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Committer {
    fn start(mut storage: Box<dyn Storage>, metrics: Arc<GisMetrics>) -> Committer {
        let (to_thread, batches) = std::sync::mpsc::channel::<Vec<Change>>();
        let (done, from_thread) = tokio::sync::mpsc::unbounded_channel();
        let spawned = std::thread::Builder::new()
            .name("gis-commit".into())
            .spawn(move || {
                while let Ok(changes) = batches.recv() {
                    let started = Instant::now();
                    let result = storage.commit(&changes);
                    metrics.committed(started.elapsed());
                    debug!(changes = changes.len(), took = ?started.elapsed(), "state committed");
                    if done.send(result).is_err() {
                        break;
                    }
                }
            });
        let thread = match spawned {
            Ok(t) => Some(t),
            Err(e) => {
                // Without the thread every commit reports failure and the GIS stops.
                error!(error = %e, "cannot start the commit thread");
                None
            }
        };
        Committer {
            gathered: Vec::new(),
            gathered_replies: Released::default(),
            in_flight: None,
            to_thread: Some(to_thread),
            from_thread,
            thread,
        }
    }

    fn idle(&self) -> bool {
        self.in_flight.is_none() && self.gathered.is_empty()
    }

    /// Queues `changes`; `replies` go out once they (and every change before them) are durable.
    fn add(&mut self, mut changes: Vec<Change>, replies: Released) {
        self.gathered.append(&mut changes);
        self.gathered_replies.append(replies);
    }

    /// Starts a commit of what gathered, unless one is running.
    fn kick(&mut self) {
        if self.in_flight.is_some()
            || (self.gathered.is_empty()
                && self.gathered_replies.gis.is_empty()
                && self.gathered_replies.admin.is_empty())
        {
            return;
        }
        let changes = std::mem::take(&mut self.gathered);
        self.in_flight = Some(std::mem::take(&mut self.gathered_replies));
        let sent = self.to_thread.as_ref().map(|t| t.send(changes));
        if !matches!(sent, Some(Ok(()))) {
            error!("the commit thread is gone");
        }
    }

    /// The replies the finished commit releases; an error if it failed (memory and disk
    /// would then disagree: the GIS stops rather than answer from state a restart would lose).
    async fn done(&mut self) -> Result<Released, StorageError> {
        if self.in_flight.is_none() {
            return std::future::pending().await;
        }
        let result = match self.from_thread.recv().await {
            Some(r) => r,
            None => Err(StorageError::CommitThread),
        };
        let released = self.in_flight.take().unwrap_or_default();
        if let Err(e) = &result {
            error!(error = %e, "could not persist GIS state; stopping");
        }
        result.map(|()| released)
    }

    /// Waits for the running commit, commits what gathered, and returns every held reply.
    async fn finish(mut self) -> Result<Released, StorageError> {
        let mut all = Released::default();
        loop {
            if self.in_flight.is_some() {
                all.append(self.done().await?);
            }
            self.kick();
            if self.in_flight.is_none() {
                return Ok(all);
            }
        }
    }
}

/// A GIS request taken out of the swarm or a session for the caller to answer (cluster
/// replicas).
pub(crate) type Collected = (PeerId, GisRequest, Reply);

/// What woke the event loop with work for `Ctx`. Short-lived, one at a time: boxing the
/// swarm event would cost an allocation per event for nothing.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Input {
    Swarm(SwarmEvent<GisBehaviourEvent>),
    Session(Incoming),
}

/// What handling one swarm event may touch.
pub(crate) struct Ctx<'a> {
    pub(crate) index: &'a mut Index,
    /// Set on a cluster replica: GIS requests go here instead of to `index`.
    pub(crate) collect: Option<&'a mut Vec<Collected>>,
    /// Answers to requests that changed nothing: sent at the end of the batch.
    pub(crate) replies: &'a mut Vec<(Reply, GisResponse)>,
    /// Answers to requests that changed the index: sent once the changes are durable.
    pub(crate) waiting: &'a mut Vec<(Reply, GisResponse)>,
    /// Handled after the batch, where the admin behaviour is at hand.
    pub(crate) admin_events: &'a mut Vec<request_response::Event<AdminRequest, AdminResponse>>,
    pub(crate) listening: &'a mut Vec<Multiaddr>,
    pub(crate) addrs: Option<&'a watch::Sender<Vec<Multiaddr>>>,
    pub(crate) local: PeerId,
    pub(crate) listener_warn: &'a mut WarnThrottle,
    pub(crate) metrics: &'a GisMetrics,
    /// Where sessions hosts open are started.
    pub(crate) sessions: &'a Sessions,
}

impl Ctx<'_> {
    pub(crate) fn on_input(&mut self, input: Input) {
        match input {
            Input::Swarm(event) => self.on_event(event),
            Input::Session(Incoming {
                peer,
                request,
                reply,
            }) => self.on_request(peer, request, reply),
        }
    }

    /// Handles what else is ready in the swarm and the sessions, at most `MAX_BATCH` of
    /// each, so replies do not wait long for the end of the batch.
    pub(crate) fn take_ready(&mut self, swarm: &mut Swarm<GisBehaviour>, inbox: &mut Inbox) {
        for _ in 1..MAX_BATCH {
            match swarm.next().now_or_never() {
                Some(Some(event)) => self.on_event(event),
                _ => break,
            }
        }
        for _ in 1..MAX_BATCH {
            match inbox.try_recv() {
                Some(incoming) => self.on_input(Input::Session(incoming)),
                None => break,
            }
        }
    }

    pub(crate) fn on_event(&mut self, event: SwarmEvent<GisBehaviourEvent>) {
        self.record(&event);
        match event {
            SwarmEvent::Behaviour(GisBehaviourEvent::Gis(ev)) => self.on_gis(ev),
            SwarmEvent::Behaviour(GisBehaviourEvent::Admin(ev)) => self.admin_events.push(ev),
            SwarmEvent::Behaviour(GisBehaviourEvent::Session(
                bids_protocols::gis_session::Event::Inbound { peer, stream },
            )) => self.sessions.start(peer, stream),
            SwarmEvent::Behaviour(GisBehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                debug!(peer = %peer_id, agent = %info.agent_version, protocol = %info.protocol_version, "identified peer");
            }
            SwarmEvent::Behaviour(GisBehaviourEvent::Identify(_))
            | SwarmEvent::Behaviour(GisBehaviourEvent::Ping(_)) => {}
            SwarmEvent::NewListenAddr { address, .. } => {
                let full = address.with(Protocol::P2p(self.local));
                info!(addr = %full, "GIS listening");
                self.listening.push(full);
                self.publish_addrs();
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                let full = address.with(Protocol::P2p(self.local));
                info!(addr = %full, "GIS no longer listening");
                self.listening.retain(|a| *a != full);
                self.publish_addrs();
            }
            SwarmEvent::ListenerError { error, .. } => {
                // Out of file descriptors this repeats every 100 ms: warn once per
                // LISTENER_WARN_EVERY, saying how many were held back.
                if let Some(suppressed) = self.listener_warn.admit(Instant::now()) {
                    warn!(%error, suppressed, "listener error (at most one such warning per {LISTENER_WARN_EVERY:?}; `suppressed` counts those not logged since the last one)");
                } else {
                    debug!(%error, "listener error");
                }
            }
            SwarmEvent::ConnectionEstablished {
                peer_id, endpoint, ..
            } => {
                debug!(peer = %peer_id, addr = %endpoint.get_remote_address(), "connection established");
            }
            SwarmEvent::ConnectionClosed { peer_id, cause, .. } => {
                debug!(peer = %peer_id, cause = ?cause, "connection closed");
            }
            SwarmEvent::IncomingConnectionError {
                send_back_addr,
                error,
                ..
            } => {
                debug!(from = %send_back_addr, %error, "incoming connection failed");
            }
            other => trace!(?other, "swarm event"),
        }
    }

    /// libp2p's metrics of the swarm and of identify and ping.
    fn record(&self, event: &SwarmEvent<GisBehaviourEvent>) {
        self.metrics.record(event);
        match event {
            SwarmEvent::Behaviour(GisBehaviourEvent::Identify(e)) => {
                self.metrics.record_identify(e)
            }
            SwarmEvent::Behaviour(GisBehaviourEvent::Ping(e)) => self.metrics.record_ping(e),
            _ => {}
        }
    }

    fn publish_addrs(&self) {
        if let Some(tx) = self.addrs {
            tx.send_replace(self.listening.clone());
        }
    }

    /// A GIS request, from its own stream or a session.
    fn on_request(&mut self, peer: PeerId, request: GisRequest, reply: Reply) {
        self.metrics.received(matches!(reply, Reply::Session(_)));
        if let Some(collect) = self.collect.as_mut() {
            collect.push((peer, request, reply));
            return;
        }
        let kind = gis_metrics::request_kind(&request);
        let started = Instant::now();
        let before = self.index.pending_changes();
        let response = self.index.handle(peer, request, unix_ms());
        self.metrics.request(kind, &response, started.elapsed());
        if self.index.pending_changes() > before {
            self.waiting.push((reply, response));
        } else {
            self.replies.push((reply, response));
        }
    }

    fn on_gis(&mut self, ev: request_response::Event<GisRequest, GisResponse>) {
        match ev {
            request_response::Event::Message {
                peer,
                message:
                    request_response::Message::Request {
                        request, channel, ..
                    },
                ..
            } => self.on_request(peer, request, Reply::Stream(channel)),
            request_response::Event::Message {
                peer,
                message: request_response::Message::Response { .. },
                ..
            } => warn!(%peer, "unexpected GIS response from a peer; the GIS sends no requests"),
            request_response::Event::InboundFailure { peer, error, .. } => {
                // Malformed CBOR, oversized frames and timeouts end here: the stream is closed,
                // nothing else is affected.
                warn!(%peer, %error, "bad or failed GIS request");
            }
            request_response::Event::OutboundFailure { peer, error, .. } => {
                debug!(%peer, %error, "outbound GIS failure");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warn_throttle_lets_one_through_per_period_and_counts_the_rest() {
        let mut t = WarnThrottle::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(t.admit(t0), Some(0));
        // Every 100 ms for 10 s: all held back.
        for i in 1..100 {
            assert_eq!(t.admit(t0 + Duration::from_millis(100 * i)), None);
        }
        assert_eq!(t.admit(t0 + Duration::from_secs(10)), Some(99));
        assert_eq!(t.admit(t0 + Duration::from_secs(11)), None);
        assert_eq!(t.admit(t0 + Duration::from_secs(30)), Some(1));
    }
}
