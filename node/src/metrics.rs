//! The node's Prometheus metrics: what the engine counts (bytes per image and link, chunks
//! verified and failed, downloads and their provision time, refusals by reason) and what it
//! samples (peers by kind, GIS connection, certificate expiry), plus libp2p's own swarm,
//! identify, ping, gossipsub and transport-bandwidth metrics in the same registry. The
//! engine calls one method per event; serving them is `bids_metrics`' business.
//!
//! Labels stay bounded: an image as `name:version`, a link as `lan`/`wan`, fixed sets of
//! kinds and reasons; never a peer id.

use crate::accounting::PeerKind;
use crate::engine::BehaviourEvent;
use crate::gate::{Link, RefusalReason};
use crate::store::Store;
use bids_metrics::{Endpoint, ReadyFn, RefreshFn};
use bids_protocols::ImageId;
use libp2p::metrics::Recorder;
use libp2p::request_response as rr;
use libp2p::swarm::SwarmEvent;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransferLabels {
    image: String,
    link: &'static str,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    protocol: &'static str,
    event: &'static str,
}

/// What the engine samples about itself (`NodeMetrics::sample`).
#[derive(Clone, Debug, Default)]
pub struct Sample {
    pub gis_connected: bool,
    pub registered: bool,
    pub downloads_active: usize,
    pub bridgeheads: usize,
    pub hosts: usize,
    pub remotes: usize,
    pub pending: usize,
    /// Our bridgehead certificate's not-after (unix seconds).
    pub cert_expires_at: Option<i64>,
    pub cert_expiring: bool,
}

/// Every metric a node exposes. Cheap to update from the engine's loop: counters and gauges
/// are atomics.
pub struct NodeMetrics {
    p2p: libp2p::metrics::Metrics,
    transfer: Family<TransferLabels, Counter>,
    chunks: Family<OutcomeLabel, Counter>,
    downloads: Family<OutcomeLabel, Counter>,
    downloads_active: Gauge,
    provision: Histogram,
    peers: Family<KindLabel, Gauge>,
    refusals: Family<ReasonLabel, Counter>,
    requests: Family<RequestLabels, Counter>,
    store_used: Gauge,
    store_free: Gauge,
    store_open: Gauge,
    cert_expiry: Gauge,
    cert_expiring: Gauge,
    gis_connected: Gauge,
    registered: Gauge,
    store: Arc<Store>,
    /// `name:version` of each image seen, resolved once through the store.
    names: Mutex<HashMap<ImageId, String>>,
}

impl NodeMetrics {
    /// Registers the node's metrics (prefix `bids_node_`) and libp2p's (prefix `libp2p_`).
    pub fn new(registry: &mut Registry, store: Arc<Store>) -> Self {
        let m = NodeMetrics {
            p2p: libp2p::metrics::Metrics::new(registry),
            transfer: Family::default(),
            chunks: Family::default(),
            downloads: Family::default(),
            downloads_active: Gauge::default(),
            // 0.1 s .. about 55 min.
            provision: Histogram::new(exponential_buckets(0.1, 2.0, 16)),
            peers: Family::default(),
            refusals: Family::default(),
            requests: Family::default(),
            store_used: Gauge::default(),
            store_free: Gauge::default(),
            store_open: Gauge::default(),
            cert_expiry: Gauge::default(),
            cert_expiring: Gauge::default(),
            gis_connected: Gauge::default(),
            registered: Gauge::default(),
            store,
            names: Mutex::new(HashMap::new()),
        };
        let r = registry.sub_registry_with_prefix("bids_node");
        r.register(
            "transfer_bytes",
            "Chunk payload bytes moved, by image (name:version), link (lan: own IDC, wan: another IDC) and direction (in, out)",
            m.transfer.clone(),
        );
        r.register(
            "chunks",
            "Received chunks by verification outcome (verified: SHA-256 matched and stored; failed: corrupt, sender penalised)",
            m.chunks.clone(),
        );
        r.register(
            "downloads",
            "Downloads ended, by outcome (done, failed)",
            m.downloads.clone(),
        );
        r.register(
            "downloads_active",
            "Downloads in progress",
            m.downloads_active.clone(),
        );
        r.register(
            "provision_seconds",
            "Provision time of completed downloads (first lookup to last chunk verified)",
            m.provision.clone(),
        );
        r.register(
            "peers",
            "Connected peers by kind (host, bridgehead: of our IDC; remote: another IDC; pending: hello not yet judged)",
            m.peers.clone(),
        );
        r.register(
            "refusals",
            "Peers or requests refused, by reason",
            m.refusals.clone(),
        );
        r.register(
            "request_response_events",
            "Request-response events by protocol (hello, chunk, gis, admin) and event",
            m.requests.clone(),
        );
        r.register(
            "store_used_bytes",
            "Disk space the store's files occupy (allocated blocks: sparse holes are free)",
            m.store_used.clone(),
        );
        r.register(
            "store_free_bytes",
            "Space left for the store on its file system",
            m.store_free.clone(),
        );
        r.register(
            "store_open",
            "1 while the chunk store is open",
            m.store_open.clone(),
        );
        r.register(
            "cert_expiry_timestamp_seconds",
            "When this node's bridgehead certificate expires (unix seconds; 0 without one)",
            m.cert_expiry.clone(),
        );
        r.register(
            "cert_expiring",
            "1 when the bridgehead certificate expires within the warning period (--cert-warn-days)",
            m.cert_expiring.clone(),
        );
        r.register(
            "gis_connected",
            "1 while connected to the GIS",
            m.gis_connected.clone(),
        );
        r.register(
            "gis_registered",
            "1 while the GIS has accepted this node's registration",
            m.registered.clone(),
        );
        m.store_open.set(1);
        m
    }

    /// The endpoint to serve: ready once registered with the GIS and while the store is open;
    /// disk figures refreshed at each scrape.
    pub fn endpoint(self: &Arc<Self>, registry: Arc<Registry>) -> Endpoint {
        let me = self.clone();
        let ready: ReadyFn = Arc::new(move || me.ready());
        let me = self.clone();
        let refresh: RefreshFn = Arc::new(move || me.refresh_store());
        Endpoint {
            registry,
            ready,
            refresh: Some(refresh),
        }
    }

    fn ready(&self) -> Result<(), String> {
        if self.store_open.get() != 1 {
            return Err("the store is closed".into());
        }
        if self.gis_connected.get() != 1 {
            return Err("not connected to the GIS".into());
        }
        if self.registered.get() != 1 {
            return Err("connected to the GIS, registration not yet accepted".into());
        }
        Ok(())
    }

    fn refresh_store(&self) {
        let dir = self.store.dir();
        self.store_used
            .set(i64::try_from(allocated_bytes(dir)).unwrap_or(i64::MAX));
        match rustix::fs::statvfs(dir) {
            Ok(s) => {
                let free = s.f_bavail.saturating_mul(s.f_frsize);
                self.store_free.set(i64::try_from(free).unwrap_or(i64::MAX));
            }
            Err(e) => tracing::debug!(error = %e, "statvfs of the store failed"),
        }
    }

    /// Every swarm event: libp2p's own metrics, and ours of the request-response protocols.
    pub(crate) fn record(&self, ev: &SwarmEvent<BehaviourEvent>) {
        self.p2p.record(ev);
        match ev {
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(e)) => self.p2p.record(e),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(e)) => self.p2p.record(e),
            SwarmEvent::Behaviour(BehaviourEvent::Ping(e)) => self.p2p.record(e),
            SwarmEvent::Behaviour(BehaviourEvent::Hello(e)) => self.rr("hello", e),
            SwarmEvent::Behaviour(BehaviourEvent::Chunk(e)) => self.rr("chunk", e),
            SwarmEvent::Behaviour(BehaviourEvent::Gis(e)) => self.rr("gis", e),
            SwarmEvent::Behaviour(BehaviourEvent::Admin(e)) => self.rr("admin", e),
            _ => {}
        }
    }

    fn rr<Q, S>(&self, protocol: &'static str, ev: &rr::Event<Q, S>) {
        let event = match ev {
            rr::Event::Message {
                message: rr::Message::Request { .. },
                ..
            } => "inbound_request",
            rr::Event::Message {
                message: rr::Message::Response { .. },
                ..
            } => "outbound_response",
            rr::Event::OutboundFailure { .. } => "outbound_failure",
            rr::Event::InboundFailure { .. } => "inbound_failure",
            rr::Event::ResponseSent { .. } => "response_sent",
        };
        self.requests
            .get_or_create(&RequestLabels { protocol, event })
            .inc();
    }

    fn image(&self, id: &ImageId) -> String {
        let Ok(mut names) = self.names.lock() else {
            return id.short();
        };
        names
            .entry(*id)
            .or_insert_with(|| match self.store.manifest(id) {
                Some(m) => m.image_ref().to_string(),
                None => id.short(),
            })
            .clone()
    }

    fn transfer(&self, id: &ImageId, link: Link, direction: &'static str, bytes: u64) {
        let link = match link {
            Link::Lan => "lan",
            Link::Wan => "wan",
        };
        self.transfer
            .get_or_create(&TransferLabels {
                image: self.image(id),
                link,
                direction,
            })
            .inc_by(bytes);
    }

    /// Chunk payload bytes served to a peer.
    pub fn sent(&self, id: &ImageId, link: Link, bytes: u64) {
        self.transfer(id, link, "out", bytes);
    }

    /// Chunk payload bytes received from an accepted peer.
    pub fn received(&self, id: &ImageId, from: PeerKind, bytes: u64) {
        let link = if from == PeerKind::Remote {
            Link::Wan
        } else {
            Link::Lan
        };
        self.transfer(id, link, "in", bytes);
    }

    pub fn chunk_verified(&self) {
        self.chunks
            .get_or_create(&OutcomeLabel {
                outcome: "verified",
            })
            .inc();
    }

    pub fn chunk_failed(&self) {
        self.chunks
            .get_or_create(&OutcomeLabel { outcome: "failed" })
            .inc();
    }

    /// A download completed and verified after `took`.
    pub fn download_done(&self, took: Duration) {
        self.downloads
            .get_or_create(&OutcomeLabel { outcome: "done" })
            .inc();
        self.provision.observe(took.as_secs_f64());
    }

    pub fn download_failed(&self) {
        self.downloads
            .get_or_create(&OutcomeLabel { outcome: "failed" })
            .inc();
    }

    pub fn refused(&self, reason: RefusalReason) {
        self.refusals
            .get_or_create(&ReasonLabel {
                reason: reason.as_str(),
            })
            .inc();
    }

    /// The engine's periodic view of itself.
    pub fn sample(&self, s: &Sample) {
        self.gis_connected.set(i64::from(s.gis_connected));
        self.registered.set(i64::from(s.registered));
        self.downloads_active
            .set(i64::try_from(s.downloads_active).unwrap_or(i64::MAX));
        for (kind, n) in [
            ("bridgehead", s.bridgeheads),
            ("host", s.hosts),
            ("remote", s.remotes),
            ("pending", s.pending),
        ] {
            self.peers
                .get_or_create(&KindLabel { kind })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        self.cert_expiry.set(s.cert_expires_at.unwrap_or(0));
        self.cert_expiring.set(i64::from(s.cert_expiring));
    }

    /// The node stopped: the store is closed, the GIS link gone.
    pub fn stopped(&self) {
        self.store_open.set(0);
        self.gis_connected.set(0);
        self.registered.set(0);
    }
}

/// Bytes the files under `dir` occupy on disk (their allocated blocks).
fn allocated_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0u64;
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(md) = e.metadata() else { continue };
            if md.is_dir() {
                todo.push(e.path());
            } else {
                total = total.saturating_add(md.blocks().saturating_mul(512));
            }
        }
    }
    total
}
