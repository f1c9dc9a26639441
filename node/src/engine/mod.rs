//! The host daemon's event loop: the one task that owns the libp2p `Swarm`. It drives the
//! node's sans-IO core (`crate::nodecore`), which makes every protocol decision: swarm
//! events go in as the core's events, each with the time it was read, and the loop carries
//! out the actions the core gives back. Disk work and hashing run on the blocking pool;
//! their results come back as internal events.

mod disk;
mod gis_link;
mod handle;
mod swarm;

pub(crate) use handle::{AdminJob, Command, WeakNodeHandle, ADMIN_QUEUE};
pub use handle::{FetchProgress, ImageReport, NodeHandle, NodeStatus};
pub(crate) use swarm::{Behaviour, BehaviourEvent};

use crate::config::NodeConfig;
use crate::metrics::NodeMetrics;
use crate::nodecore::prepare_download;
use crate::nodecore::{Action, CoreConfig, GisKey, NodeCore, Prepared, ReqKey, StoreFail, Token};
use crate::scheduler::Failure;
use crate::store::Store;
use bids_protocols::admin::{self as adminp, AdminRequest, AdminResponse};
use bids_protocols::chunk::{ChunkRequest, ChunkResponse, Encoding};
use bids_protocols::gis::{self as gisp};
use bids_protocols::gis_session;
use bids_protocols::gossip;
use bids_protocols::hello::{Hello, HelloReply};
use bids_protocols::{ChunkIndex, Idc, ImageId, Manifest, Policy};
use bytes::Bytes;
use disk::{counter_saver, verify_and_store, Counters};
use futures::StreamExt;
use libp2p::request_response::{self as rr, OutboundRequestId, ResponseChannel};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::SwarmEvent;
use libp2p::{gossipsub, identify, PeerId, Swarm};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn, Instrument};

/// How often the loop ticks to drive schedulers, expire requests and flush announcements.
const TICK: Duration = Duration::from_millis(20);
/// The topic on which bridgeheads of all IDCs announce what they hold, so fetching IDCs can
/// trade chunks among themselves instead of each pulling everything from the origin.
const BRIDGEHEAD_TOPIC: &str = "bids/bridgeheads/chunks";

/// Results of work done off the loop.
enum Internal {
    /// The store is ready for a new download of `manifest` (or why not).
    Prepared {
        manifest: Arc<Manifest>,
        /// When the fetch was asked and when the GIS answered (the download's start-up).
        times: (Instant, Instant),
        result: Result<Prepared, String>,
    },
    /// An admin command was carried out (by the executor above the engine): answer the GIS.
    AdminDone {
        token: Token,
        response: AdminResponse,
    },
    /// A received chunk was verified and stored (or not).
    Stored {
        image: ImageId,
        idx: ChunkIndex,
        peer: PeerId,
        result: Result<(Encoding, Bytes), StoreFail>,
    },
    /// A chunk was read for the inbound request `token`.
    Read {
        token: Token,
        peer: PeerId,
        req: ChunkRequest,
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

/// What the core's numbers stand for: libp2p's response channels and request ids.
#[derive(Default)]
struct Channels {
    next_token: u64,
    /// Inbound chunk requests not answered yet: who asked, and the channel.
    chunk: HashMap<Token, (PeerId, ResponseChannel<ChunkResponse>)>,
    hello: HashMap<Token, ResponseChannel<HelloReply>>,
    admin: HashMap<Token, ResponseChannel<AdminResponse>>,
    /// Outbound requests in flight, by the swarm's id: the core's key.
    requests: HashMap<OutboundRequestId, ReqKey>,
    gis: HashMap<OutboundRequestId, GisKey>,
}

impl Channels {
    fn token(&mut self) -> Token {
        self.next_token += 1;
        Token(self.next_token)
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
    swarm::tune_allocator();
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
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(NodeMetrics::new(&mut registry, store.clone()));
    let (mut swarm, listen) = swarm::build(&cfg, &mut registry, &topic).await?;
    for (peer, addr) in &gis_peers {
        swarm.add_peer_address(*peer, addr.clone());
    }
    let metrics_server = match cfg.metrics {
        Some(addr) => Some(bids_metrics::serve(addr, metrics.endpoint(Arc::new(registry))).await?),
        None => None,
    };
    let (tx, rx) = mpsc::channel(256);
    let (itx, irx) = mpsc::channel(1024);
    let (ltx, lrx) = mpsc::channel(256);
    let handle = NodeHandle {
        tx,
        peer: me,
        listen: listen.clone(),
        store: store.clone(),
        metrics_addr: metrics_server.as_ref().map(|m| m.local_addr()),
    };
    let now = Instant::now();
    let core = NodeCore::new(
        CoreConfig::of(&cfg, listen).map_err(anyhow::Error::msg)?,
        store.clone(),
        Some(metrics.clone()),
        now,
        bids_protocols::unix_now().saturating_mul(1000),
        rand::random(),
    )
    .map_err(anyhow::Error::msg)?;
    let scrub_bps = cfg.scrub_bps;
    let saver = counter_saver(store.clone()).context("starting the counters' saver")?;
    let engine = Engine {
        admin_jobs,
        swarm,
        core,
        channels: Channels::default(),
        store,
        me,
        topic,
        bridgehead_topic: gossipsub::IdentTopic::new(BRIDGEHEAD_TOPIC),
        cmd_rx: rx,
        itx,
        irx,
        gis_links: gis_link::GisLinks::default(),
        ltx,
        lrx,
        now,
        _scrub: (scrub_bps > 0).then(|| {
            AbortOnDrop(
                tokio::spawn(crate::repair::scrub(handle.store.clone(), scrub_bps)).abort_handle(),
            )
        }),
        saver: Some(saver),
        metrics,
        _metrics_server: metrics_server,
        idc: cfg.idc.clone(),
        policy: cfg.policy,
        keypair: cfg.keypair.clone(),
        // Above any number a previous run of this node used (one a nanosecond at most).
        gossip_seq: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    };
    // Every line this node logs names it: many nodes share one process in testnets.
    let me = engine.me.to_string();
    let span = tracing::info_span!(
        "node",
        idc = %engine.idc,
        peer = %me.get(me.len().saturating_sub(6)..).unwrap_or(&me)
    );
    let task = tokio::spawn(engine.run().instrument(span));
    Ok((handle, task))
}

/// The driver of a [`NodeCore`] over libp2p: it owns the swarm, turns its events into the
/// core's and carries out the core's actions.
struct Engine {
    /// The time of the event being handled: read once per event by the loop, so every
    /// decision made for one event sees the same instant.
    now: Instant,
    swarm: Swarm<Behaviour>,
    core: NodeCore,
    channels: Channels,
    /// Admitted admin commands, to their executor above the engine.
    admin_jobs: mpsc::Sender<AdminJob>,
    store: Arc<Store>,
    me: PeerId,
    idc: Idc,
    policy: Policy,
    topic: gossipsub::IdentTopic,
    bridgehead_topic: gossipsub::IdentTopic,
    /// Signs our announcements (`gossip::seal`).
    keypair: libp2p::identity::Keypair,
    /// The sequence number of our next announcement.
    gossip_seq: u64,
    cmd_rx: mpsc::Receiver<Command>,
    itx: mpsc::Sender<Internal>,
    irx: mpsc::Receiver<Internal>,
    /// GIS sessions, and what their tasks report.
    gis_links: gis_link::GisLinks,
    ltx: mpsc::Sender<gis_link::LinkEvent>,
    lrx: mpsc::Receiver<gis_link::LinkEvent>,
    /// The background scrub (`--scrub-rate`), stopped with the engine.
    _scrub: Option<AbortOnDrop>,
    /// The thread that saves transfer counters (`save_counters`), and its queue.
    saver: Option<(
        std::sync::mpsc::Sender<Counters>,
        std::thread::JoinHandle<()>,
    )>,
    metrics: Arc<NodeMetrics>,
    /// Serves `metrics` while the loop runs (`--metrics`); stops when dropped.
    _metrics_server: Option<bids_metrics::MetricsServer>,
}

impl Engine {
    async fn run(mut self) {
        info!(peer = %self.me, idc = %self.idc, policy = %self.policy, "node started");
        // Registration follows once the connection is up.
        self.now = Instant::now();
        self.core.start(self.now);
        self.execute();
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
                Some(ev) = self.lrx.recv() => {
                    self.now = Instant::now();
                    self.on_link(ev);
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
                    for key in self.gis_links.timed_out(self.now) {
                        self.core.handle_gis_request_failed(self.now, key, "timeout".into());
                    }
                    self.core.handle_tick(self.now);
                }
            }
            self.execute();
        }
    }

    fn stop(&mut self) {
        self.metrics.stopped();
        let dirty = self.core.take_counters();
        self.save_counters(dirty);
        // The saver writes what it was sent, in order, and ends; the store is flushed after.
        if let Some((tx, saver)) = self.saver.take() {
            drop(tx);
            if saver.join().is_err() {
                warn!("the transfer counters' saver panicked");
            }
        }
        if let Err(e) = self.store.flush() {
            warn!(error = %e, "flushing the store at shutdown failed");
        }
        info!(peer = %self.me, "node stopped");
    }

    /// Per-image counters survive a restart. They are saved off the loop by one thread, in
    /// the order they were taken, so a late save never puts older totals over newer ones.
    fn save_counters(&mut self, dirty: Vec<(ImageId, gisp::Counters)>) {
        if dirty.is_empty() {
            return;
        }
        if let Some((tx, _)) = &self.saver {
            if tx.send(dirty).is_ok() {
                return;
            }
        }
        warn!("the transfer counters' saver is gone; these counters are not saved");
    }

    // ---------------------------------------------------------------- the core's actions

    /// Carries out what the core asked for, until it has nothing more.
    fn execute(&mut self) {
        while let Some(a) = self.core.poll_action() {
            match a {
                Action::Dial { peer, addrs } => {
                    let opts = DialOpts::peer_id(peer).addresses(addrs).build();
                    if let Err(e) = self.swarm.dial(opts) {
                        debug!(%peer, error = %e, "dial not started");
                        self.core.handle_dial_failed(self.now, peer);
                    }
                }
                Action::DialGis { peer, addr } => {
                    let opts = DialOpts::peer_id(peer)
                        .addresses(vec![addr])
                        .condition(PeerCondition::DisconnectedAndNotDialing)
                        .build();
                    if let Err(e) = self.swarm.dial(opts) {
                        let cause = crate::gis_watch::dial_cause(&e);
                        self.core.handle_gis_dial_failed(self.now, &cause);
                    }
                }
                Action::Disconnect(peer) => {
                    let _ = self.swarm.disconnect_peer_id(peer);
                }
                Action::Request { key, peer, req } => {
                    let rid = self.swarm.behaviour_mut().chunk.send_request(&peer, req);
                    self.channels.requests.insert(rid, key);
                }
                Action::Respond { token, peer, resp } => {
                    let sent = self.channels.chunk.remove(&token).is_some_and(|(_, ch)| {
                        self.swarm
                            .behaviour_mut()
                            .chunk
                            .send_response(ch, resp)
                            .is_ok()
                    });
                    if !sent {
                        // The peer is gone: nothing is being written to it.
                        self.core.handle_response_done(self.now, peer);
                    }
                }
                Action::Read { token, peer, req } => self.read(token, peer, req),
                Action::Store {
                    manifest,
                    image,
                    idx,
                    peer,
                    encoding,
                    payload,
                } => {
                    let (store, itx) = (self.store.clone(), self.itx.clone());
                    tokio::task::spawn_blocking(move || {
                        let result =
                            verify_and_store(&store, &manifest, &image, idx, encoding, payload);
                        let _ = itx.blocking_send(Internal::Stored {
                            image,
                            idx,
                            peer,
                            result,
                        });
                    });
                }
                Action::Prepare { manifest, times } => self.prepare(manifest, times),
                Action::Touch(id) => {
                    // A sled write: off the loop.
                    let store = self.store.clone();
                    tokio::task::spawn_blocking(move || store.touch(&id));
                }
                Action::SaveCounters(dirty) => self.save_counters(dirty),
                Action::GisSend { key, peer, req } => {
                    if let Some((req, open)) = self.gis_links.send(peer, key, *req, self.now) {
                        if open {
                            self.swarm.behaviour_mut().session.open(peer);
                        }
                        let rid = self.swarm.behaviour_mut().gis.send_request(&peer, req);
                        self.channels.gis.insert(rid, key);
                    }
                }
                Action::Hello { peer, hello } => {
                    self.swarm.behaviour_mut().hello.send_request(&peer, hello);
                }
                Action::HelloReply { token, reply } => {
                    if let Some(ch) = self.channels.hello.remove(&token) {
                        let _ = self.swarm.behaviour_mut().hello.send_response(ch, reply);
                    }
                }
                Action::Gossip { bytes, bridgeheads } => self.gossip(bytes, bridgeheads),
                Action::JoinBridgeheads => {
                    let g = &mut self.swarm.behaviour_mut().gossipsub;
                    if let Err(e) = g.subscribe(&self.bridgehead_topic) {
                        warn!(error = ?e, "cannot join the bridgehead topic");
                    }
                }
                Action::LeaveBridgeheads => {
                    let g = &mut self.swarm.behaviour_mut().gossipsub;
                    g.unsubscribe(&self.bridgehead_topic);
                }
                Action::Admin { token, cmd } => self.admin(token, cmd),
                Action::AdminAnswer { token, response } => self.answer_admin(token, response),
            }
        }
    }

    /// Reads a chunk for the inbound request `token` on the blocking pool.
    fn read(&mut self, token: Token, peer: PeerId, req: ChunkRequest) {
        let (store, itx) = (self.store.clone(), self.itx.clone());
        tokio::task::spawn_blocking(move || {
            let response = disk::read_response(&store, &req);
            let _ = itx.blocking_send(Internal::Read {
                token,
                peer,
                req,
                response,
            });
        });
    }

    /// Prepares the store for a new download on the blocking pool.
    fn prepare(&mut self, manifest: Arc<Manifest>, times: (Instant, Instant)) {
        let (store, itx) = (self.store.clone(), self.itx.clone());
        tokio::spawn(async move {
            let m = manifest.clone();
            let result = tokio::task::spawn_blocking(move || prepare_download(&*store, &m))
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
    }

    fn gossip(&mut self, bytes: Vec<u8>, bridgeheads: bool) {
        let topics = [
            bridgeheads.then(|| self.bridgehead_topic.clone()),
            Some(self.topic.clone()),
        ];
        for topic in topics.into_iter().flatten() {
            self.gossip_seq = self.gossip_seq.wrapping_add(1);
            let sealed = gossip::seal(
                &self.keypair,
                &topic.to_string(),
                self.gossip_seq,
                bytes.clone(),
            );
            let sent = sealed.and_then(|m| {
                let g = &mut self.swarm.behaviour_mut().gossipsub;
                g.publish(topic.clone(), m)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            });
            if let Err(e) = sent {
                debug!(%topic, error = %e, "announcement not sent");
            }
        }
    }

    /// Hands an admitted admin command to the executor above the engine; its answer comes
    /// back as `Internal::AdminDone`.
    fn admin(&mut self, token: Token, cmd: adminp::HostCommand) {
        let (reply, answer) = oneshot::channel();
        match self.admin_jobs.try_send(AdminJob { cmd, reply }) {
            Ok(()) => {
                let itx = self.itx.clone();
                tokio::spawn(async move {
                    if let Ok(response) = answer.await {
                        let _ = itx.send(Internal::AdminDone { token, response }).await;
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
                self.answer_admin(token, busy);
            }
            // The executor is gone: the node is stopping.
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.channels.admin.remove(&token);
            }
        }
    }

    fn answer_admin(&mut self, token: Token, response: AdminResponse) {
        let Some(ch) = self.channels.admin.remove(&token) else {
            return;
        };
        if self
            .swarm
            .behaviour_mut()
            .admin
            .send_response(ch, response)
            .is_err()
        {
            debug!("the GIS went away before an admin command's answer");
        }
    }

    /// A GIS session's answer or end.
    fn on_link(&mut self, ev: gis_link::LinkEvent) {
        let now = self.now;
        match ev {
            gis_link::LinkEvent::Answer { peer, id, response } => {
                if let Some(key) = self.gis_links.answer(peer, id) {
                    self.core.handle_gis_response(now, key, response);
                }
            }
            gis_link::LinkEvent::Ended {
                peer,
                generation,
                error,
            } => {
                for key in self.gis_links.ended(peer, generation, &error) {
                    self.core.handle_gis_request_failed(now, key, error.clone());
                }
            }
        }
    }

    fn on_internal(&mut self, i: Internal) {
        let now = self.now;
        match i {
            Internal::AdminDone { token, response } => self.answer_admin(token, response),
            Internal::Read {
                token,
                peer,
                req,
                response,
            } => self.core.handle_read(now, token, peer, req, response),
            Internal::Stored {
                image,
                idx,
                peer,
                result,
            } => self.core.handle_stored(now, image, idx, peer, result),
            Internal::Prepared {
                manifest,
                times,
                result,
            } => self.core.handle_prepared(now, manifest, times, result),
        }
    }

    fn on_command(&mut self, c: Command) {
        let now = self.now;
        match c {
            Command::Fetch { image, reply } => self.core.handle_fetch(now, image, Some(reply)),
            Command::Status { reply } => {
                let _ = reply.send(self.core.status());
            }
            Command::Imported { id } => self.core.handle_imported(now, id),
            Command::Removed { id } => self.core.handle_removed(now, id),
            Command::SetLimits {
                upload_bps,
                download_bps,
            } => {
                info!(upload_bps, download_bps, "rate limits changed");
                self.core.set_limits(now, upload_bps, download_bps);
            }
            Command::SetSharing { enabled } => {
                info!(enabled, "sharing switched");
                self.core.set_sharing(enabled);
            }
            Command::SetCert { cert, reply } => {
                self.core.handle_set_cert(now, cert.map(|c| *c), reply)
            }
            Command::Gis { req, reply } => self.core.handle_gis_call(now, *req, reply),
            Command::Shutdown { .. } => unreachable!("handled in the loop"),
        }
    }

    // ---------------------------------------------------------------- swarm events

    fn on_swarm(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        self.metrics.record(&ev);
        let now = self.now;
        match ev {
            SwarmEvent::ConnectionEstablished {
                peer_id,
                endpoint,
                num_established,
                ..
            } => {
                if self.core.is_gis(&peer_id) {
                    return self.core.handle_gis_connected(now);
                }
                let first = num_established.get() == 1;
                if self
                    .core
                    .handle_connected(now, peer_id, endpoint.is_dialer(), first)
                {
                    let h = self.core.my_hello();
                    self.swarm.behaviour_mut().hello.send_request(&peer_id, h);
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                if self.core.is_gis(&peer_id) {
                    self.gis_links.disconnected(peer_id);
                    return self.core.handle_gis_disconnected(now);
                }
                // Requests it made can no longer be answered.
                self.channels.chunk.retain(|_, (p, _)| *p != peer_id);
                self.core.handle_closed(now, peer_id);
            }
            SwarmEvent::OutgoingConnectionError {
                peer_id: Some(p),
                error,
                ..
            } => {
                if self.core.is_gis_dial(&p) {
                    let cause = crate::gis_watch::dial_cause(&error);
                    self.core.handle_gis_dial_failed(now, &cause);
                } else if !self.core.is_gis(&p) {
                    debug!(peer = %p, %error, "dial failed");
                    self.core.handle_dial_failed(now, p);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => self.core.handle_addrs(peer_id, info.listen_addrs),
            SwarmEvent::Behaviour(BehaviourEvent::Session(ev)) => match ev {
                gis_session::Event::Opened { peer, stream } => {
                    self.gis_links.opened(peer, stream, self.ltx.clone())
                }
                gis_session::Event::OpenFailed { peer, error } => {
                    self.gis_links.open_failed(peer, &error)
                }
                // Nodes accept no sessions; the behaviour offers none.
                gis_session::Event::Inbound { .. } => {}
            },
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message,
                ..
            })) => {
                let Some(src) = message.source else { return };
                let remote = message.topic == self.bridgehead_topic.hash();
                // Checked only when passed on by someone else than its author.
                let direct = propagation_source == src;
                match gossip::open(&message.data, message.topic.as_str(), &src, direct) {
                    Ok(body) => self.core.handle_announcement(now, src, &body, remote),
                    Err(e) => {
                        debug!(peer = %src, via = %propagation_source, error = %e, "announcement refused")
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Hello(ev)) => self.on_hello(ev),
            SwarmEvent::Behaviour(BehaviourEvent::Admin(ev)) => self.on_admin(ev),
            SwarmEvent::Behaviour(BehaviourEvent::Chunk(ev)) => self.on_chunk(ev),
            SwarmEvent::Behaviour(BehaviourEvent::Gis(ev)) => self.on_gis(ev),
            _ => {}
        }
    }

    fn on_chunk(&mut self, ev: rr::Event<ChunkRequest, ChunkResponse>) {
        let now = self.now;
        match ev {
            rr::Event::Message {
                peer,
                message:
                    rr::Message::Request {
                        request, channel, ..
                    },
                ..
            } => {
                let token = self.channels.token();
                self.channels.chunk.insert(token, (peer, channel));
                self.core.handle_chunk_request(now, peer, request, token);
            }
            rr::Event::Message {
                peer,
                message:
                    rr::Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                if let Some(key) = self.channels.requests.remove(&request_id) {
                    self.core.handle_chunk_response(now, peer, key, response);
                }
            }
            rr::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                let why = match error {
                    rr::OutboundFailure::Timeout => Failure::Timeout,
                    rr::OutboundFailure::UnsupportedProtocols => Failure::Refused,
                    _ => Failure::Disconnected,
                };
                if let Some(key) = self.channels.requests.remove(&request_id) {
                    debug!(%peer, %error, "chunk request failed");
                    self.core.handle_request_failed(now, peer, key, why);
                }
            }
            rr::Event::InboundFailure { peer, error, .. } => {
                debug!(%peer, %error, "inbound chunk request failed");
                self.core.handle_response_done(now, peer);
            }
            rr::Event::ResponseSent { peer, .. } => self.core.handle_response_done(now, peer),
        }
    }

    fn on_hello(&mut self, ev: rr::Event<Hello, HelloReply>) {
        let now = self.now;
        match ev {
            rr::Event::Message {
                peer,
                message:
                    rr::Message::Request {
                        request, channel, ..
                    },
                ..
            } => {
                let token = self.channels.token();
                self.channels.hello.insert(token, channel);
                self.core.handle_hello(now, peer, request, token);
            }
            rr::Event::Message {
                peer,
                message: rr::Message::Response { response, .. },
                ..
            } => self.core.handle_hello_reply(now, peer, response),
            rr::Event::OutboundFailure { peer, error, .. } => {
                debug!(%peer, %error, "hello failed");
                self.core.handle_hello_failed(now, peer);
            }
            _ => {}
        }
    }

    /// An admin request relayed by the GIS: the core admits it or not.
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
        let token = self.channels.token();
        self.channels.admin.insert(token, channel);
        self.core.handle_admin(self.now, peer, request, token);
    }

    fn on_gis(&mut self, ev: rr::Event<gisp::GisRequest, gisp::GisResponse>) {
        let now = self.now;
        match ev {
            rr::Event::Message {
                message:
                    rr::Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                if let Some(key) = self.channels.gis.remove(&request_id) {
                    self.core.handle_gis_response(now, key, response);
                }
            }
            rr::Event::OutboundFailure {
                request_id, error, ..
            } => {
                if let Some(key) = self.channels.gis.remove(&request_id) {
                    self.core
                        .handle_gis_request_failed(now, key, error.to_string());
                }
            }
            _ => {}
        }
    }
}
