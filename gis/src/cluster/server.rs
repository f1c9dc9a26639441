//! The GIS event loop of one replica of a Raft group. The swarm is the single GIS's (same
//! protocols, same handling of connections and admin queries); what differs is where
//! answers come from:
//! - lookups, refreshes and upgrade paths: this replica's applied state, at once;
//! - registrations, publications, unpublications, revocations (node or admin): proposed
//!   through Raft (a follower forwards them to the leader's Raft listener) and answered
//!   with what applying them answered, once committed;
//! - heartbeats: answered at once; only the leader keeps the clock of who heartbeats, so a
//!   follower relays them to it. The leader replicates a liveness record only when a host
//!   dies (no heartbeat within the timeout) or comes back; other heartbeats write nothing.

use super::{net, raft_config, Applied, ClusterConfig, Command, GisRaft, Replica, SharedState};
use crate::admin::{AdminDesk, AdminReply};
use crate::index::IndexConfig;
use crate::metrics::{self as gis_metrics, GisMetrics};
use crate::server::{
    busy, open_swarm, send_replies, unix_ms, Collected, Ctx, GisConfig, Input, Opened, Released,
    WarnThrottle, EXPIRE_EVERY, LISTENER_WARN_EVERY,
};
use crate::session::Reply;
use crate::storage::Storage;
use anyhow::Context;
use bids_protocols::admin::{AdminErrorKind, AdminRequest, AdminResponse};
use bids_protocols::gis::{ErrorKind, GisRequest, GisResponse, HostStats};
use futures::StreamExt;
use libp2p::request_response;
use libp2p::{Multiaddr, PeerId};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Instant;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

/// Heartbeats a follower may hold for the leader before it drops new ones (the next
/// heartbeat of the same host carries the same news).
const RELAY_QUEUE: usize = 16 * 1024;
/// Writes under way at once; more wait in the swarm's queues (backpressure on the nodes).
const MAX_WRITES_IN_FLIGHT: usize = 4096;

/// A finished write, back to the loop that owns the swarm.
enum Done {
    Gis(Reply, GisResponse),
    Admin(AdminReply),
}

fn unavailable(e: impl std::fmt::Display) -> GisResponse {
    crate::index::GisError::new(
        ErrorKind::Internal,
        format!("the GIS cluster could not commit the request: {e}"),
    )
    .into()
}

/// Runs a cluster replica until `shutdown` completes.
pub(crate) async fn run(
    cfg: GisConfig,
    cluster: ClusterConfig,
    storage: Box<dyn Storage>,
    shutdown: impl Future<Output = ()>,
    addrs: Option<watch::Sender<Vec<Multiaddr>>>,
    metrics_at: Option<Arc<OnceLock<SocketAddr>>>,
    raft_at: Option<Arc<OnceLock<GisRaft>>>,
) -> anyhow::Result<()> {
    let index_cfg = IndexConfig {
        admin: cfg.admin_peer,
        policy: cfg.policy,
        heartbeat_timeout: cfg.heartbeat_timeout,
        heartbeats_per_s: cfg.heartbeats_per_s,
        replicated_liveness: true,
    };
    let replica = Replica::start(&cluster, &cfg.data_dir, index_cfg, storage, raft_config())
        .await
        .with_context(|| {
            format!(
                "starting GIS replica {} (Raft listener {})",
                cluster.node_id, cluster.raft_listen
            )
        })?;
    if let Some(at) = raft_at {
        let _ = at.set(replica.raft.clone());
    }
    let result = serve(&cfg, &replica, shutdown, addrs, metrics_at).await;
    replica.shutdown().await;
    result
}

async fn serve(
    cfg: &GisConfig,
    replica: &Replica,
    shutdown: impl Future<Output = ()>,
    addrs: Option<watch::Sender<Vec<Multiaddr>>>,
    metrics_at: Option<Arc<OnceLock<SocketAddr>>>,
) -> anyhow::Result<()> {
    let raft = replica.raft.clone();
    let state = replica.state.clone();
    let me = replica.node_id;
    let Opened {
        mut swarm,
        metrics,
        metrics_server: _metrics_server,
        mut inbox,
    } = open_swarm(cfg, &metrics_at, true).await?;
    let sessions = inbox.sessions(metrics.clone());
    let local = *swarm.local_peer_id();
    metrics.sample(&state.lock().index, unix_ms());
    metrics.set_open(true);
    info!(peer = %local, listen = %cfg.listen, replica = me, raft = %replica.raft_addr, policy = %cfg.policy, admin = %cfg.admin_peer, "GIS replica starting");

    let (relay_tx, relay_rx) = mpsc::channel::<(PeerId, HostStats)>(RELAY_QUEUE);
    let _relay = AbortOnDrop(tokio::spawn(net::relay_heartbeats(
        raft.clone(),
        state.clone(),
        relay_rx,
    )));
    let (done_tx, mut done_rx) = mpsc::channel::<Done>(MAX_WRITES_IN_FLIGHT);
    let writes = Arc::new(tokio::sync::Semaphore::new(MAX_WRITES_IN_FLIGHT));
    let mut raft_metrics = raft.metrics();
    let mut leading = raft_metrics.borrow_and_update().current_leader == Some(me);
    if leading {
        state.lock().index.restart_liveness_clock(unix_ms());
    }
    let mut listening: Vec<Multiaddr> = Vec::new();
    let mut expire = tokio::time::interval(EXPIRE_EVERY);
    expire.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut shutdown = std::pin::pin!(shutdown);
    let mut replies: Vec<(Reply, GisResponse)> = Vec::new();
    let mut waiting: Vec<(Reply, GisResponse)> = Vec::new();
    let mut collected: Vec<Collected> = Vec::new();
    let mut desk = AdminDesk::new();
    let mut admin_events: Vec<request_response::Event<AdminRequest, AdminResponse>> = Vec::new();
    let mut admin_replies: Vec<AdminReply> = Vec::new();
    let mut listener_warn = WarnThrottle::new(LISTENER_WARN_EVERY);

    let r = Routes {
        raft: &raft,
        state: &state,
        done: &done_tx,
        writes: &writes,
        relay: &relay_tx,
        metrics: &metrics,
    };
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = expire.tick() => {
                let started = Instant::now();
                let now = unix_ms();
                state.lock().index.pace(now);
                if leading {
                    let overdue = state.lock().index.overdue(now);
                    for peer in overdue {
                        info!(%peer, "host went dead (no heartbeat within the timeout); replicating");
                        state.propose_liveness(&raft, peer, false, now);
                    }
                }
                metrics.sample(&state.lock().index, now);
                metrics.sample_raft(&raft_metrics.borrow());
                busy(&metrics, "liveness", started);
            }
            changed = raft_metrics.changed() => {
                if changed.is_err() {
                    anyhow::bail!("the Raft node of GIS replica {me} stopped; its log says why");
                }
                let leader = raft_metrics.borrow().current_leader;
                let now_leading = leader == Some(me);
                if now_leading && !leading {
                    // This replica saw no heartbeats while it followed: every live host
                    // gets a full timeout from now before it can be declared dead.
                    state.lock().index.restart_liveness_clock(unix_ms());
                    info!(replica = me, "this GIS replica is now the leader");
                } else if leading && !now_leading {
                    info!(replica = me, ?leader, "this GIS replica no longer leads");
                }
                leading = now_leading;
            }
            Some(done) = done_rx.recv() => {
                let mut released = Released::default();
                match done {
                    Done::Gis(c, resp) => released.gis.push((c, resp)),
                    Done::Admin(a) => released.admin.push(a),
                }
                send_replies(&mut swarm, released);
            }
            input = next_input(&mut swarm, &mut inbox) => {
                let started = Instant::now();
                {
                    let mut st = state.lock();
                    let mut ctx = Ctx { index: &mut st.index, collect: Some(&mut collected), replies: &mut replies, waiting: &mut waiting, admin_events: &mut admin_events, listening: &mut listening, addrs: addrs.as_ref(), local, listener_warn: &mut listener_warn, metrics: &metrics, sessions: &sessions };
                    ctx.on_input(input);
                    ctx.take_ready(&mut swarm, &mut inbox);
                }
                let now = unix_ms();
                for (peer, req, reply) in collected.drain(..) {
                    if let Some(resp) = r.gis_request(peer, req, reply, now, leading) {
                        replies.push(resp);
                    }
                }
                for ev in admin_events.drain(..) {
                    let Some(ev) = r.admin_write(ev, cfg.admin_peer) else { continue };
                    let mut st = state.lock();
                    desk.on_event(ev, &mut st.index, &mut swarm.behaviour_mut().admin, now, &mut admin_replies);
                    // Every state change of a replica comes from the log: admin queries and
                    // relayed host commands change nothing.
                    let stray = st.index.take_changes();
                    if !stray.is_empty() {
                        warn!(changes = stray.len(), "an admin request changed the index outside Raft; the changes are dropped");
                    }
                }
                send_replies(&mut swarm, Released { gis: std::mem::take(&mut replies), admin: std::mem::take(&mut admin_replies) });
                debug_assert!(waiting.is_empty(), "a replica answers nothing after a local commit");
                busy(&metrics, "batch", started);
            }
        }
    }
    metrics.set_open(false);
    info!(peer = %local, replica = me, "GIS replica stopped");
    Ok(())
}

/// The next swarm event or session request, whichever comes first.
async fn next_input(
    swarm: &mut libp2p::Swarm<crate::server::GisBehaviour>,
    inbox: &mut crate::session::Inbox,
) -> Input {
    tokio::select! {
        event = swarm.select_next_some() => Input::Swarm(event),
        Some(incoming) = inbox.recv() => Input::Session(incoming),
    }
}

/// Ends a background task when the loop that owns it ends, however it ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Where one replica sends what its hosts ask.
struct Routes<'a> {
    raft: &'a GisRaft,
    state: &'a SharedState,
    done: &'a mpsc::Sender<Done>,
    writes: &'a Arc<tokio::sync::Semaphore>,
    relay: &'a mpsc::Sender<(PeerId, HostStats)>,
    metrics: &'a Arc<GisMetrics>,
}

impl Routes<'_> {
    /// Answers `req` now (returned) or later through `done` (a write committed by Raft).
    fn gis_request(
        &self,
        peer: PeerId,
        req: GisRequest,
        channel: Reply,
        now: i64,
        leading: bool,
    ) -> Option<(Reply, GisResponse)> {
        let kind = gis_metrics::request_kind(&req);
        let started = Instant::now();
        match req {
            GisRequest::Lookup { .. }
            | GisRequest::Refresh { .. }
            | GisRequest::UpgradePath { .. } => {
                let resp = self.state.lock().index.handle(peer, req, now);
                self.metrics.request(kind, &resp, started.elapsed());
                Some((channel, resp))
            }
            GisRequest::Heartbeat { stats } => {
                let resp = self.heartbeat(peer, stats, now, leading);
                self.metrics.request(kind, &resp, started.elapsed());
                Some((channel, resp))
            }
            GisRequest::Register { .. }
            | GisRequest::Publish { .. }
            | GisRequest::Unpublish { .. }
            | GisRequest::Revoke { .. } => {
                let cmd = Command::Request {
                    peer,
                    req,
                    now_ms: now,
                };
                let raft = self.raft.clone();
                let forwarder = self.state.forwarder().clone();
                let done = self.done.clone();
                let metrics = self.metrics.clone();
                let writes = self.writes.clone();
                tokio::spawn(async move {
                    let Ok(_permit) = writes.acquire_owned().await else {
                        return;
                    };
                    let resp =
                        match net::write_via_leader(&raft, &forwarder, cmd, super::WRITE_TIMEOUT)
                            .await
                        {
                            Ok(Applied::Response(resp)) => resp,
                            Ok(other) => unavailable(format!("unexpected answer {other:?}")),
                            Err(e) => {
                                warn!(%peer, kind, error = %e, "GIS write not committed");
                                unavailable(e)
                            }
                        };
                    metrics.request(kind, &resp, started.elapsed());
                    let _ = done.send(Done::Gis(channel, resp)).await;
                });
                None
            }
        }
    }

    /// Answers a heartbeat from the applied state; the leader notes it (and replicates a
    /// host's return), a follower relays it to the leader.
    fn heartbeat(&self, peer: PeerId, stats: HostStats, now: i64, leading: bool) -> GisResponse {
        let resp = {
            let mut st = self.state.lock();
            if !st.index.is_registered(&peer) {
                // The index's own refusal; it changes nothing for an unknown host.
                return st.index.handle(peer, GisRequest::Heartbeat { stats }, now);
            }
            GisResponse::Ack {
                revocations: st.index.revocations().clone(),
                bridgeheads: st.index.other_bridgeheads(&peer, now),
                heartbeat_secs: st.index.heartbeat_secs(),
            }
        };
        if leading {
            self.state.heartbeat_at_leader(self.raft, peer, stats, now);
        } else {
            {
                // Counters for this replica's admin views; liveness stays the leader's.
                let mut st = self.state.lock();
                if st.index.marked_alive(&peer) {
                    let _ = st.index.heartbeat(peer, stats.clone(), now);
                }
            }
            if self.relay.try_send((peer, stats)).is_err() {
                debug!(%peer, "heartbeat relay queue full; this heartbeat is not relayed");
            }
        }
        resp
    }

    /// Takes an admin revocation out of `ev` and proposes it through Raft (the answer goes
    /// out once committed); everything else is returned for the admin desk.
    fn admin_write(
        &self,
        ev: request_response::Event<AdminRequest, AdminResponse>,
        admin: PeerId,
    ) -> Option<request_response::Event<AdminRequest, AdminResponse>> {
        match ev {
            request_response::Event::Message {
                peer,
                message:
                    request_response::Message::Request {
                        request: AdminRequest::Revoke { serial },
                        channel,
                        ..
                    },
                ..
            } if peer == admin => {
                info!(admin = %peer, serial, "admin revokes a certificate; replicating");
                let raft = self.raft.clone();
                let forwarder = self.state.forwarder().clone();
                let done = self.done.clone();
                tokio::spawn(async move {
                    let cmd = Command::Revoke {
                        requester: peer,
                        serial,
                    };
                    let resp =
                        match net::write_via_leader(&raft, &forwarder, cmd, super::WRITE_TIMEOUT)
                            .await
                        {
                            Ok(Applied::Revoked(Ok(hosts))) => AdminResponse::Revoked { hosts },
                            Ok(Applied::Revoked(Err(message))) => AdminResponse::Error {
                                kind: AdminErrorKind::Forbidden,
                                message,
                            },
                            Ok(other) => AdminResponse::Error {
                                kind: AdminErrorKind::Failed,
                                message: format!("unexpected answer to a revocation: {other:?}"),
                            },
                            Err(e) => AdminResponse::Error {
                                kind: AdminErrorKind::Unreachable,
                                message: format!(
                                    "the GIS cluster could not commit the revocation: {e}"
                                ),
                            },
                        };
                    let _ = done.send(Done::Admin((channel, resp))).await;
                });
                None
            }
            other => Some(other),
        }
    }
}
