//! The console's side of the admin control path: a long-lived libp2p client with the admin
//! identity that asks the GIS for hosts, images and statistics, signs host commands with the
//! admin key and sends them through the GIS. A cheap, cloneable handle talks to one event loop
//! that alone owns the swarm; the web layer (the `rmc` crate) is the caller's business.

use bids_protocols::admin::{
    self, AdminErrorKind, AdminRequest, AdminResponse, CommandOutcome, HostCommand, HostInfo,
    ImageHolders, SignedCommand, Stats,
};
use futures::StreamExt;
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self as rr, OutboundRequestId, ProtocolSupport};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, Swarm};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

/// How long `connect` waits for the first connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one request may take end to end. Host commands such as `Publish` import a file
/// on the host first, so this is generous; the GIS gives up on the host a little earlier.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Requests queued for the event loop before callers wait (backpressure).
const QUEUE: usize = 64;

type Behaviour = rr::Behaviour<admin::Codec>;

/// Why an admin call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdminError {
    #[error("GIS address {0} must end with /p2p/<peer id> (as `bids gis` prints it)")]
    Address(Multiaddr),
    #[error("could not connect to the GIS at {addr}: {reason}")]
    Connect { addr: Multiaddr, reason: String },
    #[error("the GIS did not answer: {0}")]
    Transport(String),
    /// The GIS or the host refused; `kind` says why (map it to an HTTP status, for one).
    #[error("refused ({kind:?}): {message}")]
    Refused {
        kind: AdminErrorKind,
        message: String,
    },
    #[error("unexpected answer from the GIS: {0}")]
    Unexpected(String),
    #[error("could not sign the command: {0}")]
    Sign(String),
    #[error("the admin client has stopped")]
    Stopped,
}

struct Call {
    req: AdminRequest,
    reply: oneshot::Sender<Result<AdminResponse, AdminError>>,
}

/// A connection to the GIS as the admin. Clone it freely: every clone shares one event loop,
/// which ends when the last clone is dropped.
#[derive(Clone)]
pub struct AdminClient {
    tx: mpsc::Sender<Call>,
    admin: Keypair,
    gis: PeerId,
    /// Nonces: a random start per client, then a counter, so they never repeat within the
    /// window in which hosts remember them.
    nonce: Arc<AtomicU64>,
}

impl AdminClient {
    /// Connects to the GIS at `gis` (ending in `/p2p/<gis peer id>`) with the admin keypair
    /// and returns once the connection is up. Later requests redial if it drops.
    pub async fn connect(gis: Multiaddr, admin: Keypair) -> Result<Self, AdminError> {
        let gis_peer = match gis.iter().last() {
            Some(Protocol::P2p(p)) => p,
            _ => return Err(AdminError::Address(gis)),
        };
        let mut dial_addr = gis.clone();
        dial_addr.pop();
        let connect_err = |reason: String| AdminError::Connect {
            addr: gis.clone(),
            reason,
        };
        let mut swarm = build_swarm(&admin).map_err(connect_err)?;
        swarm.add_peer_address(gis_peer, dial_addr.clone());
        swarm
            .dial(
                libp2p::swarm::dial_opts::DialOpts::peer_id(gis_peer)
                    .addresses(vec![dial_addr.clone()])
                    .build(),
            )
            .map_err(|e| connect_err(e.to_string()))?;
        let wait = async {
            loop {
                match swarm.select_next_some().await {
                    SwarmEvent::ConnectionEstablished { peer_id, .. } if peer_id == gis_peer => {
                        return Ok(())
                    }
                    SwarmEvent::OutgoingConnectionError { error, .. } => {
                        return Err(error.to_string())
                    }
                    _ => {}
                }
            }
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, wait).await {
            Ok(Ok(())) => {}
            Ok(Err(reason)) => return Err(connect_err(reason)),
            Err(_) => {
                return Err(connect_err(format!(
                    "no connection within {CONNECT_TIMEOUT:?}"
                )))
            }
        }
        info!(gis = %gis_peer, admin = %admin.public().to_peer_id(), "admin client connected to the GIS");
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(event_loop(swarm, gis_peer, dial_addr, rx));
        Ok(AdminClient {
            tx,
            admin,
            gis: gis_peer,
            nonce: Arc::new(AtomicU64::new(rand::random::<u64>() >> 1)),
        })
    }

    /// The admin identity this client speaks as.
    pub fn admin_peer(&self) -> PeerId {
        self.admin.public().to_peer_id()
    }

    /// The admin keypair (the console issues bridgehead certificates with it).
    pub fn keypair(&self) -> &Keypair {
        &self.admin
    }

    pub fn gis_peer(&self) -> PeerId {
        self.gis
    }

    /// Sends one request and returns the answer; `Error` answers become `AdminError::Refused`.
    pub async fn request(&self, req: AdminRequest) -> Result<AdminResponse, AdminError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Call { req, reply })
            .await
            .map_err(|_| AdminError::Stopped)?;
        match rx.await.map_err(|_| AdminError::Stopped)?? {
            AdminResponse::Error { kind, message } => Err(AdminError::Refused { kind, message }),
            other => Ok(other),
        }
    }

    /// Every host the GIS knows.
    pub async fn hosts(&self) -> Result<Vec<HostInfo>, AdminError> {
        match self.request(AdminRequest::Hosts).await? {
            AdminResponse::Hosts(h) => Ok(h),
            other => Err(unexpected(&other)),
        }
    }

    /// Every image, version and delta with holders per IDC.
    pub async fn images(&self) -> Result<Vec<ImageHolders>, AdminError> {
        match self.request(AdminRequest::Images).await? {
            AdminResponse::Images(i) => Ok(i),
            other => Err(unexpected(&other)),
        }
    }

    /// Totals per IDC.
    pub async fn stats(&self) -> Result<Stats, AdminError> {
        match self.request(AdminRequest::Stats).await? {
            AdminResponse::Stats(s) => Ok(s),
            other => Err(unexpected(&other)),
        }
    }

    /// Signs `cmd` for `peer` with the admin key and has the GIS deliver it; returns what the
    /// host did.
    pub async fn command(
        &self,
        peer: PeerId,
        cmd: HostCommand,
    ) -> Result<CommandOutcome, AdminError> {
        let nonce = self.nonce.fetch_add(1, Ordering::Relaxed);
        let signed = SignedCommand::sign(&self.admin, peer, cmd, bids_protocols::unix_now(), nonce)
            .map_err(|e| AdminError::Sign(e.to_string()))?;
        self.signed_command(signed).await
    }

    /// Sends an already signed command (tests use it to send forged or replayed ones).
    pub async fn signed_command(&self, cmd: SignedCommand) -> Result<CommandOutcome, AdminError> {
        match self.request(AdminRequest::Command(cmd)).await? {
            AdminResponse::Outcome(o) => Ok(o),
            other => Err(unexpected(&other)),
        }
    }

    /// Revokes a certificate serial at the GIS; the hosts that held it are no longer
    /// bridgeheads and are never listed again.
    pub async fn revoke(&self, serial: u64) -> Result<(), AdminError> {
        match self.request(AdminRequest::Revoke { serial }).await? {
            AdminResponse::Revoked { hosts } => {
                info!(serial, ?hosts, "certificate revoked");
                Ok(())
            }
            other => Err(unexpected(&other)),
        }
    }
}

fn unexpected(r: &AdminResponse) -> AdminError {
    let name = match r {
        AdminResponse::Hosts(_) => "Hosts",
        AdminResponse::Images(_) => "Images",
        AdminResponse::Stats(_) => "Stats",
        AdminResponse::Outcome(_) => "Outcome",
        AdminResponse::Revoked { .. } => "Revoked",
        AdminResponse::Error { .. } => "Error",
    };
    AdminError::Unexpected(format!("a {name} answer to another request"))
}

fn build_swarm(admin: &Keypair) -> Result<Swarm<Behaviour>, String> {
    Ok(libp2p::SwarmBuilder::with_existing_identity(admin.clone())
        .with_tokio()
        .with_tcp(
            libp2p::tcp::Config::default().nodelay(true),
            libp2p::noise::Config::new,
            libp2p::yamux::Config::default,
        )
        .map_err(|e| format!("building the tcp/noise/yamux transport: {e}"))?
        .with_behaviour(|_| {
            Behaviour::with_codec(
                admin::codec(),
                [(admin::PROTOCOL, ProtocolSupport::Outbound)],
                rr::Config::default()
                    .with_request_timeout(REQUEST_TIMEOUT)
                    .with_max_concurrent_streams(QUEUE),
            )
        })
        .map_err(|e| format!("building the admin behaviour: {e}"))?
        // The console polls every few seconds; keep the connection between polls.
        // One protocol per stream: 0-RTT negotiation (V1 waits a round trip per request).
        .with_swarm_config(|c| {
            c.with_idle_connection_timeout(Duration::from_secs(3600))
                .with_substream_upgrade_protocol_override(bids_protocols::STREAM_NEGOTIATION)
        })
        .build())
}

type Pending = HashMap<OutboundRequestId, oneshot::Sender<Result<AdminResponse, AdminError>>>;

/// Owns the swarm: sends queued calls, routes answers back by request id. Ends when every
/// `AdminClient` clone is gone.
async fn event_loop(
    mut swarm: Swarm<Behaviour>,
    gis: PeerId,
    addr: Multiaddr,
    mut rx: mpsc::Receiver<Call>,
) {
    let mut pending: Pending = HashMap::new();
    loop {
        tokio::select! {
            call = rx.recv() => match call {
                Some(Call { req, reply }) => {
                    // Redials the GIS if the connection dropped meanwhile.
                    let id = swarm.behaviour_mut().send_request_with_addresses(&gis, req, vec![addr.clone()]);
                    pending.insert(id, reply);
                }
                None => break,
            },
            ev = swarm.select_next_some() => match ev {
                SwarmEvent::Behaviour(rr::Event::Message {
                    message: rr::Message::Response { request_id, response },
                    ..
                }) => {
                    if let Some(reply) = pending.remove(&request_id) {
                        let _ = reply.send(Ok(response));
                    }
                }
                SwarmEvent::Behaviour(rr::Event::OutboundFailure { request_id, error, .. }) => {
                    debug!(%error, "admin request failed");
                    if let Some(reply) = pending.remove(&request_id) {
                        let _ = reply.send(Err(AdminError::Transport(error.to_string())));
                    }
                }
                SwarmEvent::ConnectionClosed { peer_id, num_established: 0, cause, .. } if peer_id == gis => {
                    warn!(?cause, "connection to the GIS closed; the next request redials");
                }
                _ => {}
            },
        }
    }
    debug!("admin client stopped");
}
