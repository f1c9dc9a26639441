//! What callers of a running node hold: [`NodeHandle`] and the commands it sends to the
//! event loop, and the reports it gets back (progress, status).

use crate::startup::StartupReport;
use crate::store::Store;
use bids_protocols::admin::{AdminResponse, HostCommand};
use bids_protocols::cert::BridgeheadCert;
use bids_protocols::gis::{Counters, GisRequest, GisResponse, HostSettings, ImageQuery};
use bids_protocols::{Idc, ImageId, ImageRef, Policy, Role};
use libp2p::{Multiaddr, PeerId};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, watch};

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
    pub(super) tx: mpsc::Sender<Command>,
    pub(super) peer: PeerId,
    pub(super) listen: Vec<Multiaddr>,
    pub(super) store: Arc<Store>,
    pub(super) metrics_addr: Option<std::net::SocketAddr>,
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
