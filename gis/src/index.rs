//! The GIS's knowledge as a pure state machine: hosts, IDCs, bridgehead certificates, images,
//! who holds what, revocations, and the hierarchical host lists built from them. No I/O and
//! no clock: every call that depends on time takes `now_ms` (Unix milliseconds). State changes
//! are queued as `Change`s for the caller to persist (`take_changes`) before it replies.

use crate::storage::{Change, Snapshot, StoredHolding, StoredHost, StoredImage};
use bids_protocols::cert::{BridgeheadCert, Revocations};
use bids_protocols::gis::{
    ErrorKind, GisRequest, GisResponse, Holding, HostEntry, HostList, HostStats, ImageInfo,
    ImageQuery, MAX_ADDRS, MAX_LEVEL_HOSTS,
};
use bids_protocols::manifest::ManifestError;
use bids_protocols::{Idc, ImageId, ImageRef, Manifest, ObjectKind, Policy, Role};
use libp2p::{Multiaddr, PeerId};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;
use tracing::{debug, info, warn};

/// Default time after the last register/heartbeat when a host counts as dead.
pub const DEFAULT_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default heartbeats per second the GIS asks of all its hosts together: up to 4,000 live
/// hosts heartbeat every 2 s (a fifth of the default timeout); beyond, the interval grows
/// with the number of live hosts (20,000 hosts: 10 s, 100,000: 50 s) and the timeout with
/// it, so the heartbeat load stays flat as the cloud grows.
pub const DEFAULT_HEARTBEATS_PER_S: u32 = 2000;

/// GIS-wide settings the index needs.
#[derive(Clone, Debug)]
pub struct IndexConfig {
    /// The admin identity: signs bridgehead certificates and alone may revoke them.
    pub admin: PeerId,
    pub policy: Policy,
    /// The timeout with few hosts; a fifth of it is the shortest heartbeat interval.
    pub heartbeat_timeout: Duration,
    /// Heartbeats per second from all hosts together that the announced interval aims at
    /// (0: the interval stays a fifth of `heartbeat_timeout` however many hosts there are).
    pub heartbeats_per_s: u32,
    /// Set on the replicas of a GIS cluster: a host is alive exactly while the last replicated
    /// liveness record says so (`set_liveness`), not by this replica's clock, because only the
    /// leader sees heartbeats and every replica must answer lookups alike.
    pub replicated_liveness: bool,
}

impl IndexConfig {
    pub fn new(admin: PeerId, policy: Policy) -> Self {
        IndexConfig {
            admin,
            policy,
            heartbeat_timeout: DEFAULT_HEARTBEAT_TIMEOUT,
            heartbeats_per_s: DEFAULT_HEARTBEATS_PER_S,
            replicated_liveness: false,
        }
    }
}

/// The heartbeat interval the index announces, and the longest one announced lately, which
/// sets the timeout: a host told a long interval keeps it until its next answer tells it
/// otherwise, so the timeout shrinks only once every such host has heard the shorter one.
#[derive(Clone, Copy, Debug)]
struct Pace {
    interval_ms: u64,
    longest_ms: u64,
    /// When `longest_ms` was last announced, plus the timeout it implies.
    longest_until_ms: i64,
}

/// A refused request: the wire error kind plus a message that says what to do.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct GisError {
    pub kind: ErrorKind,
    pub message: String,
}

impl GisError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        GisError {
            kind,
            message: message.into(),
        }
    }
}

impl From<GisError> for GisResponse {
    fn from(e: GisError) -> Self {
        GisResponse::Error {
            kind: e.kind,
            message: e.message,
        }
    }
}

/// What a publish did, for the caller's log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Published {
    pub info: ImageInfo,
    /// The image was not known before this publish.
    pub new_image: bool,
}

/// State of a host's bridgehead certificate at some instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CertState {
    Valid,
    NotYetValid,
    Expired,
    Revoked,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CertView {
    pub serial: u64,
    pub db_id: String,
    pub not_before: i64,
    pub not_after: i64,
    pub state: CertState,
}

/// A host as the console shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HostView {
    pub peer: PeerId,
    pub idc: Idc,
    /// `Bridgehead` only while its certificate is valid.
    pub role: Role,
    pub alive: bool,
    pub addrs: Vec<Multiaddr>,
    /// As of its last heartbeat since the GIS started (volatile).
    pub stats: HostStats,
    /// Unix ms of the last register/heartbeat since the GIS started.
    pub last_seen_ms: Option<i64>,
    pub registered_ms: i64,
    pub cert: Option<CertView>,
    /// Images it holds (any part of).
    pub images: usize,
}

/// One holder of an image, for the console.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HolderView {
    pub peer: PeerId,
    pub alive: bool,
    pub chunks_held: u32,
    pub complete: bool,
    pub fetching: bool,
}

/// An image with its holders grouped by IDC.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ImageView {
    pub info: ImageInfo,
    pub kind: ObjectKind,
    pub base: Option<ImageRef>,
    pub chunks: u32,
    pub publisher: PeerId,
    pub published_ms: i64,
    pub holders: BTreeMap<Idc, Vec<HolderView>>,
}

/// An IDC with host counts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct IdcView {
    pub idc: Idc,
    pub hosts: usize,
    pub live_hosts: usize,
    /// Hosts with a currently valid certificate.
    pub bridgeheads: usize,
    pub live_bridgeheads: usize,
}

#[derive(Clone, Debug)]
struct HostState {
    rec: StoredHost,
    last_seen_ms: Option<i64>,
    /// `expire` already reported this host dead; cleared by register/heartbeat.
    reported_dead: bool,
    stats: HostStats,
}

impl HostState {
    /// Its last-seen time unless it is marked dead (the replicated liveness).
    fn alive_since(&self) -> Option<i64> {
        self.last_seen_ms.filter(|_| !self.reported_dead)
    }
}

#[derive(Clone, Debug)]
struct ImageState {
    stored: StoredImage,
    info: ImageInfo,
    kind: ObjectKind,
    base: Option<ImageRef>,
    chunks: u32,
    /// Bytes of its non-zero chunks: what fetching it whole moves.
    data_bytes: u64,
}

impl ImageState {
    fn from_stored(stored: StoredImage) -> Result<Self, ManifestError> {
        let m = Manifest::from_bytes_with_id(&stored.manifest, stored.id)?;
        Ok(Self::new(stored, m))
    }
    fn new(stored: StoredImage, m: Manifest) -> Self {
        ImageState {
            info: ImageInfo {
                name: m.name.clone(),
                version: m.version.clone(),
                id: stored.id,
                size: m.size,
                chunk_size: m.chunk_size,
            },
            chunks: m.chunk_count(),
            data_bytes: versions::data_bytes(&m),
            kind: m.kind,
            base: m.base,
            stored,
        }
    }
}

/// A holding worth listing: the host has some data or is fetching it (LAN peers that fetch
/// at the same time trade chunks as they arrive).
fn listable(h: &Holding) -> bool {
    h.complete || h.chunks_held > 0 || h.fetching
}

/// Holds at least one chunk.
fn has_data(h: &Holding) -> bool {
    h.complete || h.chunks_held > 0
}

/// Rendezvous (highest-random-weight) score of a bridgehead for an image: each image gets
/// its own ranking of an IDC's bridgeheads, so images spread evenly and, when the top one
/// dies, only its images move to the next one.
fn rendezvous_score(peer: &PeerId, image: &ImageId) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(peer.to_bytes());
    h.update(image.0);
    h.finalize().into()
}

fn ms_to_secs(ms: i64) -> i64 {
    ms.div_euclid(1000)
}

fn image_label(q: &ImageQuery) -> String {
    match q {
        ImageQuery::Ref(r) => r.to_string(),
        ImageQuery::Id(id) => id.to_hex(),
    }
}

/// The GIS index. Deterministic: the same calls with the same `now_ms` give the same answers.
pub struct Index {
    cfg: IndexConfig,
    hosts: BTreeMap<PeerId, HostState>,
    /// IDC → its registered hosts.
    idcs: BTreeMap<Idc, BTreeSet<PeerId>>,
    /// IDC → its hosts that registered with a certificate (validity is checked when used,
    /// since certificates expire and get revoked).
    certified: BTreeMap<Idc, BTreeSet<PeerId>>,
    images: BTreeMap<ImageId, ImageState>,
    by_ref: BTreeMap<ImageRef, ImageId>,
    holders: BTreeMap<ImageId, BTreeMap<PeerId, Holding>>,
    /// The same holders grouped by their host's IDC: a lookup reads the requester's IDC
    /// and each other IDC's, not every holder of the image (kept by `hold`, `unhold`).
    holders_by_idc: BTreeMap<ImageId, BTreeMap<Idc, BTreeSet<PeerId>>>,
    /// Delta files by the version they start from: `from` → delta ids (see `versions`).
    deltas: BTreeMap<ImageId, BTreeSet<ImageId>>,
    revocations: Revocations,
    changes: Vec<Change>,
    pace: Pace,
}

impl Index {
    pub fn new(cfg: IndexConfig) -> Self {
        let base = Self::base_interval_ms(&cfg);
        Index {
            pace: Pace {
                interval_ms: base,
                longest_ms: base,
                longest_until_ms: i64::MIN,
            },
            cfg,
            hosts: BTreeMap::new(),
            idcs: BTreeMap::new(),
            certified: BTreeMap::new(),
            images: BTreeMap::new(),
            by_ref: BTreeMap::new(),
            holders: BTreeMap::new(),
            holders_by_idc: BTreeMap::new(),
            deltas: BTreeMap::new(),
            revocations: Revocations::default(),
            changes: Vec::new(),
        }
    }

    /// Rebuilds the index from stored records. Every host starts dead until it registers or
    /// heartbeats again. Records that no longer check out (a manifest that does not hash to
    /// its id, a certificate the configured admin did not sign, a holding of an unknown image
    /// or host) are left out with a warning.
    pub fn restore(cfg: IndexConfig, snapshot: Snapshot) -> Self {
        let mut ix = Index::new(cfg);
        ix.revocations.serials = snapshot.revocations;
        for stored in snapshot.images {
            let id = stored.id;
            match ImageState::from_stored(stored) {
                Ok(st) => {
                    let r = ImageRef {
                        name: st.info.name.clone(),
                        version: st.info.version.clone(),
                    };
                    if let Some(other) = ix.by_ref.get(&r) {
                        warn!(image = %r, id = %id.short(), other = %other.short(), "two stored images share a name:version; keeping the first");
                    } else {
                        ix.by_ref.insert(r, id);
                    }
                    ix.images.insert(id, st);
                    ix.index_delta(&id);
                }
                Err(e) => {
                    warn!(id = %id.short(), error = %e, "dropping stored image whose manifest does not check out")
                }
            }
        }
        for mut rec in snapshot.hosts {
            if let Err(e) = rec.idc.validate() {
                warn!(peer = %rec.peer, error = %e, "dropping stored host with an invalid IDC");
                continue;
            }
            if let Some(cert) = &rec.cert {
                // Time and revocation are checked whenever the cert is used; here only that
                // it is still the configured admin's signature for this peer and IDC.
                let at = cert.body.not_before;
                if let Err(e) = cert.verify_for(
                    &ix.cfg.admin,
                    &rec.peer,
                    &rec.idc,
                    at,
                    &Revocations::default(),
                ) {
                    warn!(peer = %rec.peer, error = %e, "stored bridgehead certificate no longer verifies; the host is restored as an ordinary host");
                    rec.cert = None;
                }
            }
            ix.index_host(&rec);
            ix.hosts.insert(
                rec.peer,
                HostState {
                    rec,
                    last_seen_ms: None,
                    reported_dead: true,
                    stats: HostStats::default(),
                },
            );
        }
        for StoredHolding { peer, holding } in snapshot.holdings {
            if !ix.hosts.contains_key(&peer) || !ix.images.contains_key(&holding.image) {
                warn!(%peer, image = %holding.image.short(), "dropping stored holding of an unknown host or image");
                continue;
            }
            let image = holding.image;
            ix.holders.entry(image).or_default().insert(peer, holding);
            ix.hold(image, peer);
        }
        info!(
            hosts = ix.hosts.len(),
            images = ix.images.len(),
            revocations = ix.revocations.serials.len(),
            skipped = snapshot.skipped,
            "GIS index restored"
        );
        ix
    }

    /// The records the index holds, as `restore` takes them: what storage holds once every
    /// change is written. Copied from memory, so a replica's snapshot does not read the
    /// database while its state is locked.
    pub fn records(&self) -> Snapshot {
        Snapshot {
            hosts: self.hosts.values().map(|h| h.rec.clone()).collect(),
            images: self.images.values().map(|i| i.stored.clone()).collect(),
            holdings: self
                .holders
                .values()
                .flat_map(|by_peer| {
                    by_peer.iter().map(|(peer, holding)| StoredHolding {
                        peer: *peer,
                        holding: holding.clone(),
                    })
                })
                .collect(),
            revocations: self.revocations.serials.clone(),
            skipped: 0,
        }
    }

    pub fn config(&self) -> &IndexConfig {
        &self.cfg
    }

    /// The changes made since the last call, in order; persist them before replying.
    pub fn take_changes(&mut self) -> Vec<Change> {
        std::mem::take(&mut self.changes)
    }

    /// Changes queued since the last `take_changes`: a request that grew this changed state.
    pub fn pending_changes(&self) -> usize {
        self.changes.len()
    }

    pub fn revocations(&self) -> &Revocations {
        &self.revocations
    }

    /// How often hosts should heartbeat: a fifth of the timeout with few hosts (a host
    /// survives a few lost heartbeats), longer with many (see [`Index::pace`]).
    pub fn heartbeat_secs(&self) -> u32 {
        (self.pace.interval_ms / 1000).clamp(1, u32::MAX as u64) as u32
    }

    fn base_interval_ms(cfg: &IndexConfig) -> u64 {
        (cfg.heartbeat_timeout.as_secs() / 5).max(1) * 1000
    }

    /// Sets the heartbeat interval from the number of live hosts, so that all of them
    /// together send about `heartbeats_per_s` (never shorter than a fifth of the configured
    /// timeout; whole seconds). Called once a second by the server, before `expire`.
    pub fn pace(&mut self, now_ms: i64) {
        let base = Self::base_interval_ms(&self.cfg);
        let want = match u64::from(self.cfg.heartbeats_per_s) {
            0 => base,
            per_s => {
                let live = self.hosts.values().filter(|h| !h.reported_dead).count() as u64;
                base.max(live.div_ceil(per_s) * 1000)
            }
        };
        if want != self.pace.interval_ms {
            info!(
                interval_s = want / 1000,
                timeout_s = 5 * want.max(self.pace.longest_ms) / 1000,
                "heartbeat interval changed with the number of live hosts"
            );
        }
        self.pace.interval_ms = want;
        if want >= self.pace.longest_ms || now_ms > self.pace.longest_until_ms {
            self.pace.longest_ms = want;
        }
        if want == self.pace.longest_ms {
            let timeout = i64::try_from(5 * want).unwrap_or(i64::MAX);
            self.pace.longest_until_ms = now_ms.saturating_add(timeout);
        }
    }

    pub fn is_registered(&self, peer: &PeerId) -> bool {
        self.hosts.contains_key(peer)
    }

    /// Answers one wire request from `peer`. Refusals are logged and become `Error`
    /// responses; this never panics on any input.
    pub fn handle(&mut self, peer: PeerId, req: GisRequest, now_ms: i64) -> GisResponse {
        let result = match req {
            GisRequest::Register {
                idc,
                addrs,
                cert,
                policy,
            } => self
                .register(peer, idc, addrs, cert, policy, now_ms)
                .map(|role| GisResponse::Registered {
                    role,
                    heartbeat_secs: self.heartbeat_secs(),
                    revocations: self.revocations.clone(),
                    bridgeheads: self.other_bridgeheads(&peer, now_ms),
                }),
            GisRequest::Heartbeat { stats } => {
                self.heartbeat(peer, stats, now_ms)
                    .map(|()| GisResponse::Ack {
                        revocations: self.revocations.clone(),
                        bridgeheads: self.other_bridgeheads(&peer, now_ms),
                        heartbeat_secs: self.heartbeat_secs(),
                    })
            }
            GisRequest::Publish { holding, manifest } => self
                .publish(peer, holding, &manifest, now_ms)
                .map(|_| self.ack()),
            GisRequest::Unpublish { image } => self.unpublish(peer, image).map(|()| self.ack()),
            GisRequest::Lookup { image, idc } => self
                .lookup_request(peer, &image, idc, now_ms)
                .map(|l| GisResponse::HostList(Box::new(l))),
            GisRequest::Refresh { image, known } => self
                .lookup(peer, &ImageQuery::Id(image), now_ms)
                .map(|mut l| {
                    // Most refreshes of a swarm find the list as the host last took it;
                    // at 64 hosts per IDC the lists were most of the WAN bytes that
                    // were not chunks.
                    if known.is_some_and(|k| k == l.digest()) {
                        GisResponse::Unchanged
                    } else {
                        l.manifest = Vec::new();
                        GisResponse::HostList(Box::new(l))
                    }
                }),
            GisRequest::Revoke { serial } => self.revoke(peer, serial).map(|_| self.ack()),
            GisRequest::UpgradePath { have, want } => self
                .upgrade_path(&have, &want, now_ms)
                .map(|p| GisResponse::UpgradePath(Box::new(p))),
        };
        result.unwrap_or_else(|e| {
            // Asking for an image that is not published yet is routine (tools poll for it).
            if e.kind == ErrorKind::UnknownImage {
                debug!(%peer, "request refused: {}", e.message);
            } else {
                warn!(%peer, kind = ?e.kind, "request refused: {}", e.message);
            }
            e.into()
        })
    }

    fn ack(&self) -> GisResponse {
        GisResponse::Ack {
            revocations: self.revocations.clone(),
            bridgeheads: Vec::new(),
            heartbeat_secs: self.heartbeat_secs(),
        }
    }

    /// For a bridgehead under the BIDS policy: the live bridgeheads of every other IDC, so
    /// it keeps its cross-IDC links open before an image needs them. Empty otherwise.
    pub fn other_bridgeheads(&self, peer: &PeerId, now_ms: i64) -> Vec<HostEntry> {
        if self.cfg.policy != Policy::Bids {
            return Vec::new();
        }
        let Some(me) = self.hosts.get(peer) else {
            return Vec::new();
        };
        if self.role_of(me, now_ms) != Role::Bridgehead {
            return Vec::new();
        }
        self.certified
            .iter()
            .filter(|(idc, _)| **idc != me.rec.idc)
            .flat_map(|(_, peers)| peers.iter())
            .filter_map(|p| self.hosts.get(p))
            .filter(|h| {
                self.is_listable_host(h, now_ms) && self.role_of(h, now_ms) == Role::Bridgehead
            })
            .take(MAX_LEVEL_HOSTS)
            .map(|h| self.entry(h, None, now_ms))
            .collect()
    }

    fn index_host(&mut self, rec: &StoredHost) {
        self.idcs
            .entry(rec.idc.clone())
            .or_default()
            .insert(rec.peer);
        if rec.cert.is_some() {
            self.certified
                .entry(rec.idc.clone())
                .or_default()
                .insert(rec.peer);
        }
    }

    fn unindex_host(&mut self, rec: &StoredHost) {
        for map in [&mut self.idcs, &mut self.certified] {
            if let Some(set) = map.get_mut(&rec.idc) {
                set.remove(&rec.peer);
                if set.is_empty() {
                    map.remove(&rec.idc);
                }
            }
        }
    }

    /// Files `peer` among the holders of `image` of its IDC.
    fn hold(&mut self, image: ImageId, peer: PeerId) {
        let Some(h) = self.hosts.get(&peer) else {
            return;
        };
        self.holders_by_idc
            .entry(image)
            .or_default()
            .entry(h.rec.idc.clone())
            .or_default()
            .insert(peer);
    }

    /// Takes `peer` (of `idc`) out of the holders of `image` of its IDC.
    fn unhold(&mut self, image: &ImageId, peer: &PeerId, idc: &Idc) {
        let Some(by_idc) = self.holders_by_idc.get_mut(image) else {
            return;
        };
        if let Some(set) = by_idc.get_mut(idc) {
            set.remove(peer);
            if set.is_empty() {
                by_idc.remove(idc);
            }
        }
        if by_idc.is_empty() {
            self.holders_by_idc.remove(image);
        }
    }

    /// Of `holders`, the listable ones not banned by the requester whose hosts are alive,
    /// with their host records.
    fn live_holders<'a>(
        &'a self,
        holders: impl Iterator<Item = (&'a PeerId, &'a Holding)>,
        banned: &[PeerId],
        now_ms: i64,
    ) -> Vec<(&'a HostState, &'a Holding)> {
        holders
            .filter(|(p, hd)| listable(hd) && !banned.contains(p))
            .filter_map(|(p, hd)| self.hosts.get(p).map(|h| (h, hd)))
            .filter(|(h, _)| self.is_listable_host(h, now_ms))
            .collect()
    }

    /// The holders of `image` in `idc`, with their holdings.
    fn holders_in<'a>(
        &'a self,
        image: &ImageId,
        idc: &Idc,
    ) -> impl Iterator<Item = (&'a PeerId, &'a Holding)> + 'a {
        let holders = self.holders.get(image);
        self.holders_by_idc
            .get(image)
            .and_then(|m| m.get(idc))
            .into_iter()
            .flatten()
            .filter_map(move |p| holders.and_then(|h| h.get(p)).map(|hd| (p, hd)))
    }

    fn require_host(&self, peer: &PeerId) -> Result<&HostState, GisError> {
        self.hosts.get(peer).ok_or_else(|| {
            GisError::new(
                ErrorKind::NotRegistered,
                format!("peer {peer} has not registered with the GIS; send Register first"),
            )
        })
    }

    /// A host joins or rejoins. With a certificate it becomes a bridgehead, but only if the
    /// certificate verifies for this peer and IDC now; a bad certificate refuses the whole
    /// registration and changes nothing.
    pub fn register(
        &mut self,
        peer: PeerId,
        idc: Idc,
        addrs: Vec<Multiaddr>,
        cert: Option<BridgeheadCert>,
        policy: Policy,
        now_ms: i64,
    ) -> Result<Role, GisError> {
        idc.validate()
            .map_err(|e| GisError::new(ErrorKind::BadRequest, e))?;
        if addrs.len() > MAX_ADDRS {
            return Err(GisError::new(
                ErrorKind::BadRequest,
                format!(
                    "{} addresses registered, at most {MAX_ADDRS} are accepted",
                    addrs.len()
                ),
            ));
        }
        if policy != self.cfg.policy {
            return Err(GisError::new(
                ErrorKind::BadRequest,
                format!(
                    "this GIS runs policy {}, the host asked for policy {policy}; start the node with --policy {}",
                    self.cfg.policy, self.cfg.policy
                ),
            ));
        }
        if let Some(c) = &cert {
            c.verify_for(
                &self.cfg.admin,
                &peer,
                &idc,
                ms_to_secs(now_ms),
                &self.revocations,
            )
            .map_err(|e| GisError::new(ErrorKind::BadCert, e.to_string()))?;
        }
        let role = if cert.is_some() {
            Role::Bridgehead
        } else {
            Role::Host
        };
        let previous = self.hosts.remove(&peer);
        let registered_ms = previous.as_ref().map_or(now_ms, |p| p.rec.registered_ms);
        let mut moved: Vec<ImageId> = Vec::new();
        if let Some(p) = &previous {
            self.unindex_host(&p.rec);
            if p.rec.idc != idc {
                // Its holdings now count for its new IDC.
                moved = self
                    .holders
                    .iter()
                    .filter(|(_, hs)| hs.contains_key(&peer))
                    .map(|(id, _)| *id)
                    .collect();
                for id in &moved {
                    self.unhold(id, &peer, &p.rec.idc);
                }
            }
        }
        let rec = StoredHost {
            peer,
            idc: idc.clone(),
            addrs,
            cert,
            registered_ms,
        };
        self.index_host(&rec);
        self.changes.push(Change::PutHost(Box::new(rec.clone())));
        info!(%peer, %idc, %role, addrs = rec.addrs.len(), rejoin = previous.is_some(), "host registered");
        self.hosts.insert(
            peer,
            HostState {
                rec,
                last_seen_ms: Some(now_ms),
                reported_dead: false,
                stats: previous.map(|p| p.stats).unwrap_or_default(),
            },
        );
        for id in moved {
            self.hold(id, peer);
        }
        Ok(role)
    }

    /// Liveness plus counters. Counters are kept in memory only: nodes report totals since
    /// they started, so the next heartbeat after a GIS restart restores them.
    pub fn heartbeat(
        &mut self,
        peer: PeerId,
        stats: HostStats,
        now_ms: i64,
    ) -> Result<(), GisError> {
        self.require_host(&peer)?;
        if let Some(h) = self.hosts.get_mut(&peer) {
            if h.reported_dead {
                info!(%peer, idc = %h.rec.idc, "host is alive again");
            }
            h.last_seen_ms = Some(now_ms);
            h.reported_dead = false;
            for bad in stats.banned.iter().filter(|b| !h.stats.banned.contains(b)) {
                warn!(reporter = %peer, idc = %h.rec.idc, peer = %bad, "a host banned a peer for serving it corrupt chunks; that peer is no longer listed to it");
            }
            h.stats = stats;
        }
        Ok(())
    }

    /// A host holds (part of) an image. The manifest bytes must hash to `holding.image`;
    /// for an image the GIS already knows they may be empty (progress updates need not
    /// resend the manifest).
    pub fn publish(
        &mut self,
        peer: PeerId,
        mut holding: Holding,
        manifest: &[u8],
        now_ms: i64,
    ) -> Result<Published, GisError> {
        self.require_host(&peer)?;
        let id = holding.image;
        let (new_image, chunks) = match self.images.get(&id) {
            Some(known) => {
                // Same bytes as stored: they hash to the id already. Other non-empty bytes
                // must still prove themselves.
                if !manifest.is_empty() && manifest != known.stored.manifest.as_slice() {
                    decode_manifest(manifest, id)?;
                }
                (None, known.chunks)
            }
            None => {
                if manifest.is_empty() {
                    return Err(GisError::new(
                        ErrorKind::UnknownImage,
                        format!(
                            "image {} is not known to the GIS; publish it with its manifest",
                            id.to_hex()
                        ),
                    ));
                }
                let m = decode_manifest(manifest, id)?;
                self.check_lineage(&m)?;
                let r = m.image_ref();
                if let Some(other) = self.by_ref.get(&r) {
                    return Err(GisError::new(
                        ErrorKind::BadRequest,
                        format!(
                            "image {r} is already published as {}; a version is immutable, publish the new content under a new version",
                            other.to_hex()
                        ),
                    ));
                }
                // Keep the canonical encoding, whatever encoding the publisher sent.
                let stored = StoredImage {
                    id,
                    manifest: m.to_bytes(),
                    publisher: peer,
                    published_ms: now_ms,
                };
                let st = ImageState::new(stored, m);
                let chunks = st.chunks;
                (Some((r, st)), chunks)
            }
        };
        if holding.chunks_held > chunks {
            return Err(GisError::new(
                ErrorKind::BadRequest,
                format!(
                    "holding claims {} chunks of image {}, which has only {chunks}",
                    holding.chunks_held,
                    id.short()
                ),
            ));
        }
        // One truth for "complete": all chunks held.
        if holding.complete || holding.chunks_held == chunks {
            holding.complete = true;
            holding.chunks_held = chunks;
        }
        let is_new = new_image.is_some();
        if let Some((r, st)) = new_image {
            info!(%peer, image = %r, id = %id.short(), size = st.info.size, chunks, "image published");
            self.changes.push(Change::PutImage(st.stored.clone()));
            self.by_ref.insert(r, id);
            self.images.insert(id, st);
            self.index_delta(&id);
        }
        let holders = self.holders.entry(id).or_default();
        if holders.get(&peer) != Some(&holding) {
            debug!(%peer, id = %id.short(), chunks = holding.chunks_held, complete = holding.complete, fetching = holding.fetching, "holding updated");
            let new_holder = holders.insert(peer, holding.clone()).is_none();
            self.changes
                .push(Change::PutHolding(StoredHolding { peer, holding }));
            if new_holder {
                self.hold(id, peer);
            }
        }
        let info = self
            .images
            .get(&id)
            .map(|st| st.info.clone())
            .ok_or_else(|| GisError::new(ErrorKind::Internal, "published image vanished"))?;
        Ok(Published {
            info,
            new_image: is_new,
        })
    }

    /// The host no longer holds an image. Idempotent.
    pub fn unpublish(&mut self, peer: PeerId, image: ImageId) -> Result<(), GisError> {
        self.require_host(&peer)?;
        if !self.images.contains_key(&image) {
            return Err(unknown_image(&ImageQuery::Id(image)));
        }
        if let Some(h) = self.holders.get_mut(&image) {
            if h.remove(&peer).is_some() {
                if h.is_empty() {
                    self.holders.remove(&image);
                }
                if let Some(idc) = self.hosts.get(&peer).map(|h| h.rec.idc.clone()) {
                    self.unhold(&image, &peer, &idc);
                }
                info!(%peer, id = %image.short(), "image unpublished");
                self.changes.push(Change::DeleteHolding { peer, image });
            }
        }
        Ok(())
    }

    /// Admin only: revoke a certificate serial. Returns the registered hosts whose
    /// certificate it was; they stop being bridgeheads at once and are no longer listed.
    pub fn revoke(&mut self, requester: PeerId, serial: u64) -> Result<Vec<PeerId>, GisError> {
        if requester != self.cfg.admin {
            return Err(GisError::new(
                ErrorKind::Forbidden,
                format!(
                    "only the admin {} may revoke certificates, not {requester}",
                    self.cfg.admin
                ),
            ));
        }
        let affected: Vec<PeerId> = self
            .hosts
            .values()
            .filter(|h| h.rec.cert.as_ref().is_some_and(|c| c.body.serial == serial))
            .map(|h| h.rec.peer)
            .collect();
        if self.revocations.serials.insert(serial) {
            warn!(serial, hosts = ?affected, "certificate revoked");
            self.changes.push(Change::PutRevocation(serial));
        }
        Ok(affected)
    }

    /// Removes a host and its holdings for good (a decommissioned machine). Returns whether
    /// it was known.
    pub fn forget_host(&mut self, peer: &PeerId) -> bool {
        let Some(h) = self.hosts.remove(peer) else {
            return false;
        };
        self.unindex_host(&h.rec);
        let mut emptied = Vec::new();
        let mut dropped = Vec::new();
        for (image, holders) in self.holders.iter_mut() {
            if holders.remove(peer).is_some() {
                self.changes.push(Change::DeleteHolding {
                    peer: *peer,
                    image: *image,
                });
                dropped.push(*image);
                if holders.is_empty() {
                    emptied.push(*image);
                }
            }
        }
        for image in emptied {
            self.holders.remove(&image);
        }
        for image in dropped {
            self.unhold(&image, peer, &h.rec.idc);
        }
        self.changes.push(Change::DeleteHost(*peer));
        info!(%peer, idc = %h.rec.idc, "host forgotten");
        true
    }

    /// Removes an image record and every holding of it. Returns whether it was known.
    pub fn forget_image(&mut self, id: &ImageId) -> bool {
        let Some(st) = self.images.remove(id) else {
            return false;
        };
        self.unindex_delta(id, &st.kind);
        let r = ImageRef {
            name: st.info.name.clone(),
            version: st.info.version.clone(),
        };
        if self.by_ref.get(&r) == Some(id) {
            self.by_ref.remove(&r);
        }
        self.holders_by_idc.remove(id);
        for peer in self.holders.remove(id).unwrap_or_default().into_keys() {
            self.changes
                .push(Change::DeleteHolding { peer, image: *id });
        }
        self.changes.push(Change::DeleteImage(*id));
        info!(image = %r, id = %id.short(), "image forgotten");
        true
    }

    /// Marks hosts whose last register/heartbeat is older than the timeout as dead and
    /// returns those that just died (each is reported once).
    pub fn expire(&mut self, now_ms: i64) -> Vec<PeerId> {
        let timeout = self.timeout_ms();
        let mut died = Vec::new();
        for h in self.hosts.values_mut() {
            if h.reported_dead {
                continue;
            }
            let dead = h
                .last_seen_ms
                .is_none_or(|t| now_ms.saturating_sub(t) > timeout);
            if dead {
                h.reported_dead = true;
                died.push(h.rec.peer);
            }
        }
        died
    }

    /// Cluster mode, on the leader: live hosts whose last register/heartbeat here is older
    /// than the timeout. Changes nothing; the leader replicates `set_liveness(.., false)`.
    pub fn overdue(&self, now_ms: i64) -> Vec<PeerId> {
        let timeout = self.timeout_ms();
        self.hosts
            .values()
            .filter(|h| !h.reported_dead)
            .filter(|h| {
                h.last_seen_ms
                    .is_none_or(|t| now_ms.saturating_sub(t) > timeout)
            })
            .map(|h| h.rec.peer)
            .collect()
    }

    /// Whether the host is registered and not marked dead (cluster mode: the replicated
    /// liveness). A heartbeat from such a host changes no replicated state.
    pub fn marked_alive(&self, peer: &PeerId) -> bool {
        self.hosts.get(peer).is_some_and(|h| !h.reported_dead)
    }

    /// Applies a liveness decision (cluster mode: a replicated record). Returns whether the
    /// host is known. Deterministic: the leader's clock comes in `now_ms`.
    pub fn set_liveness(&mut self, peer: &PeerId, alive: bool, now_ms: i64) -> bool {
        let Some(h) = self.hosts.get_mut(peer) else {
            return false;
        };
        if alive {
            if h.reported_dead {
                info!(%peer, idc = %h.rec.idc, "host is alive again");
            }
            h.last_seen_ms = Some(now_ms);
            h.reported_dead = false;
        } else {
            if !h.reported_dead {
                info!(%peer, idc = %h.rec.idc, "host marked dead");
            }
            h.reported_dead = true;
        }
        true
    }

    /// The last-seen time of a host not marked dead; `None` for a dead or unknown host. One
    /// host's part of `live_hosts`.
    pub fn alive_since(&self, peer: &PeerId) -> Option<i64> {
        self.hosts.get(peer).and_then(HostState::alive_since)
    }

    /// The hosts not marked dead with their last-seen time: the liveness part of a cluster
    /// snapshot (the stored records hold the rest).
    pub fn live_hosts(&self) -> Vec<(PeerId, i64)> {
        self.hosts
            .values()
            .filter_map(|h| h.alive_since().map(|t| (h.rec.peer, t)))
            .collect()
    }

    /// A replica that just became leader has seen no heartbeats: give every live host a full
    /// timeout from now before `overdue` reports it.
    pub fn restart_liveness_clock(&mut self, now_ms: i64) {
        for h in self.hosts.values_mut().filter(|h| !h.reported_dead) {
            h.last_seen_ms = Some(now_ms);
        }
    }

    /// The configured timeout, or five of the longest interval announced lately if longer.
    fn timeout_ms(&self) -> i64 {
        let configured = self.cfg.heartbeat_timeout.as_millis();
        let paced = u128::from(5 * self.pace.longest_ms);
        i64::try_from(configured.max(paced)).unwrap_or(i64::MAX)
    }

    fn is_alive(&self, h: &HostState, now_ms: i64) -> bool {
        if self.cfg.replicated_liveness {
            return !h.reported_dead && h.last_seen_ms.is_some();
        }
        h.last_seen_ms
            .is_some_and(|t| now_ms.saturating_sub(t) <= self.timeout_ms())
    }

    fn cert_state(&self, cert: &BridgeheadCert, now_ms: i64) -> CertState {
        // The signature, peer and IDC were verified when the certificate was accepted (at
        // register or restore) and cannot change; only time and revocation can.
        let now = ms_to_secs(now_ms);
        if self.revocations.is_revoked(cert.body.serial) {
            CertState::Revoked
        } else if now < cert.body.not_before {
            CertState::NotYetValid
        } else if now > cert.body.not_after {
            CertState::Expired
        } else {
            CertState::Valid
        }
    }

    fn role_of(&self, h: &HostState, now_ms: i64) -> Role {
        match &h.rec.cert {
            Some(c) if self.cert_state(c, now_ms) == CertState::Valid => Role::Bridgehead,
            _ => Role::Host,
        }
    }

    /// A host whose certificate the admin revoked is distrusted: never listed at all.
    fn is_banned(&self, h: &HostState) -> bool {
        h.rec
            .cert
            .as_ref()
            .is_some_and(|c| self.revocations.is_revoked(c.body.serial))
    }

    /// Alive and not banned: may appear in a host list.
    fn is_listable_host(&self, h: &HostState, now_ms: i64) -> bool {
        self.is_alive(h, now_ms) && !self.is_banned(h)
    }

    /// The bridgehead of `idc` chosen for `image`: the live host of that IDC with a valid
    /// certificate that ranks highest by rendezvous hashing.
    pub fn chosen_bridgehead(&self, idc: &Idc, image: &ImageId, now_ms: i64) -> Option<PeerId> {
        self.certified
            .get(idc)?
            .iter()
            .filter_map(|p| self.hosts.get(p))
            .filter(|h| self.is_alive(h, now_ms) && self.role_of(h, now_ms) == Role::Bridgehead)
            .max_by_key(|h| (rendezvous_score(&h.rec.peer, image), h.rec.peer))
            .map(|h| h.rec.peer)
    }

    fn entry(&self, h: &HostState, holding: Option<&Holding>, now_ms: i64) -> HostEntry {
        HostEntry {
            peer: h.rec.peer,
            idc: h.rec.idc.clone(),
            role: self.role_of(h, now_ms),
            addrs: h.rec.addrs.clone(),
            chunks_held: holding.map_or(0, |x| x.chunks_held),
            complete: holding.is_some_and(|x| x.complete),
            idc_complete: false,
        }
    }

    fn resolve(&self, query: &ImageQuery) -> Result<&ImageState, GisError> {
        let id = match query {
            ImageQuery::Ref(r) => {
                r.validate()
                    .map_err(|e| GisError::new(ErrorKind::BadRequest, e))?;
                *self.by_ref.get(r).ok_or_else(|| unknown_image(query))?
            }
            ImageQuery::Id(id) => *id,
        };
        self.images.get(&id).ok_or_else(|| unknown_image(query))
    }

    /// The hierarchical host list for `requester` and an image (see the module docs of the
    /// crate for the levels).
    pub fn lookup(
        &self,
        requester: PeerId,
        query: &ImageQuery,
        now_ms: i64,
    ) -> Result<HostList, GisError> {
        let me = self.require_host(&requester)?;
        self.host_list(&me.rec.idc, Some(requester), query, now_ms)
    }

    /// The host list an ordinary host of `idc` would get (levels 0 and 1, never 2), for a
    /// peer that is not a registered host: tools and the console.
    pub fn lookup_for_idc(
        &self,
        idc: &Idc,
        query: &ImageQuery,
        now_ms: i64,
    ) -> Result<HostList, GisError> {
        idc.validate()
            .map_err(|e| GisError::new(ErrorKind::BadRequest, e))?;
        self.host_list(idc, None, query, now_ms)
    }

    /// A wire `Lookup`: registered hosts get their own view, others must name an IDC.
    fn lookup_request(
        &self,
        peer: PeerId,
        query: &ImageQuery,
        idc: Option<Idc>,
        now_ms: i64,
    ) -> Result<HostList, GisError> {
        match (self.hosts.get(&peer), idc) {
            (Some(me), Some(idc)) if idc != me.rec.idc => Err(GisError::new(
                ErrorKind::BadRequest,
                format!(
                    "host {peer} is registered in IDC {}, it cannot look up as a host of IDC {idc}; leave the IDC out",
                    me.rec.idc
                ),
            )),
            (Some(_), _) => self.lookup(peer, query, now_ms),
            (None, Some(idc)) => self.lookup_for_idc(&idc, query, now_ms),
            (None, None) => self.lookup(peer, query, now_ms),
        }
    }

    /// Builds the host list seen from `my_idc` by `requester` (`None`: an outside observer,
    /// treated as an ordinary host that holds nothing).
    fn host_list(
        &self,
        my_idc: &Idc,
        requester: Option<PeerId>,
        query: &ImageQuery,
        now_ms: i64,
    ) -> Result<HostList, GisError> {
        let image = self.resolve(query)?;
        let id = image.info.id;
        let empty = BTreeMap::new();
        let holders = self.holders.get(&id).unwrap_or(&empty);
        // Peers the requester banned for serving it corrupt chunks are not listed to it.
        let banned: &[PeerId] = requester
            .and_then(|r| self.hosts.get(&r))
            .map_or(&[], |h| h.stats.banned.as_slice());
        let best_first = |a: &(&HostState, &Holding), b: &(&HostState, &Holding)| {
            b.1.complete
                .cmp(&a.1.complete)
                .then(b.1.chunks_held.cmp(&a.1.chunks_held))
                .then(a.0.rec.peer.cmp(&b.0.rec.peer))
        };
        let mut level0: Vec<(&HostState, &Holding)>;
        let mut level1 = Vec::new();
        let mut level2 = Vec::new();
        match self.cfg.policy {
            Policy::Baseline => {
                let live = self.live_holders(holders.iter(), banned, now_ms);
                level0 = live
                    .iter()
                    .filter(|(h, _)| Some(h.rec.peer) != requester)
                    .copied()
                    .collect();
                level0.sort_by(|a, b| {
                    (b.0.rec.idc == *my_idc)
                        .cmp(&(a.0.rec.idc == *my_idc))
                        .then(best_first(a, b))
                });
            }
            Policy::Bids => {
                // Only this IDC's holders and, below, each other IDC's are read.
                let mine = self.live_holders(self.holders_in(&id, my_idc), banned, now_ms);
                level0 = mine
                    .iter()
                    .filter(|(h, _)| Some(h.rec.peer) != requester)
                    .copied()
                    .collect();
                level0.sort_by(best_first);
                let complete_here = mine.iter().any(|(_, hd)| hd.complete);
                if !complete_here {
                    let chosen = self.chosen_bridgehead(my_idc, &id, now_ms);
                    match chosen {
                        Some(db) if Some(db) != requester => {
                            if let Some(h) = self.hosts.get(&db) {
                                level1.push(self.entry(h, holders.get(&db), now_ms));
                            }
                        }
                        // Only the chosen bridgehead crosses the WAN for this image; any
                        // other bridgehead behaves as an ordinary host for it.
                        Some(_) => {
                            level2 = self.remote_bridgeheads(my_idc, &id, holders, banned, now_ms)
                        }
                        None => {}
                    }
                }
            }
        }
        let level0: Vec<HostEntry> = level0
            .into_iter()
            .take(MAX_LEVEL_HOSTS)
            .map(|(h, hd)| self.entry(h, Some(hd), now_ms))
            .collect();
        level2.truncate(MAX_LEVEL_HOSTS);
        debug!(requester = ?requester, idc = %my_idc, image = %image.info.name, version = %image.info.version, level0 = level0.len(), level1 = level1.len(), level2 = level2.len(), "lookup served");
        Ok(HostList {
            image: image.info.clone(),
            manifest: image.stored.manifest.clone(),
            level0,
            level1,
            level2,
        })
    }

    /// Level 2: for every other IDC that holds (part of) the image, or whose chosen
    /// bridgehead is fetching it, that chosen bridgehead. IDCs with a complete copy first.
    fn remote_bridgeheads(
        &self,
        my_idc: &Idc,
        id: &ImageId,
        holders: &BTreeMap<PeerId, Holding>,
        banned: &[PeerId],
        now_ms: i64,
    ) -> Vec<HostEntry> {
        let mut found = Vec::new();
        for idc in self.certified.keys().filter(|i| *i != my_idc) {
            let Some(db) = self.chosen_bridgehead(idc, id, now_ms) else {
                continue;
            };
            let live = self.live_holders(self.holders_in(id, idc), banned, now_ms);
            let in_idc = live.iter().filter(|(_, hd)| has_data(hd));
            let complete = in_idc.clone().any(|(_, hd)| hd.complete);
            let most = in_idc.map(|(_, hd)| hd.chunks_held).max();
            let db_holding = holders.get(&db);
            let db_fetching = db_holding.is_some_and(listable);
            if most.is_none() && !db_fetching {
                continue;
            }
            if let Some(h) = self.hosts.get(&db) {
                let mut e = self.entry(h, db_holding, now_ms);
                e.idc_complete = complete;
                found.push((complete, most.unwrap_or(0), e));
            }
        }
        found.sort_by(|a, b| {
            b.0.cmp(&a.0)
                .then(b.1.cmp(&a.1))
                .then(a.2.idc.cmp(&b.2.idc))
        });
        found.into_iter().map(|(_, _, e)| e).collect()
    }

    /// How many images and delta files are known.
    pub fn image_count(&self) -> usize {
        self.images.len()
    }

    /// Every registered host, for the console.
    pub fn hosts(&self, now_ms: i64) -> Vec<HostView> {
        self.hosts
            .values()
            .map(|h| HostView {
                peer: h.rec.peer,
                idc: h.rec.idc.clone(),
                role: self.role_of(h, now_ms),
                alive: self.is_alive(h, now_ms),
                addrs: h.rec.addrs.clone(),
                stats: h.stats.clone(),
                last_seen_ms: h.last_seen_ms,
                registered_ms: h.rec.registered_ms,
                cert: h.rec.cert.as_ref().map(|c| CertView {
                    serial: c.body.serial,
                    db_id: c.body.db_id.clone(),
                    not_before: c.body.not_before,
                    not_after: c.body.not_after,
                    state: self.cert_state(c, now_ms),
                }),
                images: self
                    .holders
                    .values()
                    .filter(|m| m.get(&h.rec.peer).is_some_and(listable))
                    .count(),
            })
            .collect()
    }

    /// Every known image with its holders per IDC, for the console.
    pub fn images(&self, now_ms: i64) -> Vec<ImageView> {
        self.images
            .values()
            .map(|st| {
                let mut holders: BTreeMap<Idc, Vec<HolderView>> = BTreeMap::new();
                for (p, hd) in self.holders.get(&st.info.id).into_iter().flatten() {
                    let Some(h) = self.hosts.get(p) else { continue };
                    holders
                        .entry(h.rec.idc.clone())
                        .or_default()
                        .push(HolderView {
                            peer: *p,
                            alive: self.is_alive(h, now_ms),
                            chunks_held: hd.chunks_held,
                            complete: hd.complete,
                            fetching: hd.fetching,
                        });
                }
                ImageView {
                    info: st.info.clone(),
                    kind: st.kind.clone(),
                    base: st.base.clone(),
                    chunks: st.chunks,
                    publisher: st.stored.publisher,
                    published_ms: st.stored.published_ms,
                    holders,
                }
            })
            .collect()
    }

    /// Every IDC that has registered hosts, with counts. One pass over the hosts: the
    /// server samples this every second, and looking each member up in `hosts` took
    /// several milliseconds of the event loop at 20,000 hosts.
    pub fn idcs(&self, now_ms: i64) -> Vec<IdcView> {
        let mut views: Vec<IdcView> = self
            .idcs
            .keys()
            .map(|idc| IdcView {
                idc: idc.clone(),
                hosts: 0,
                live_hosts: 0,
                bridgeheads: 0,
                live_bridgeheads: 0,
            })
            .collect();
        let at: HashMap<&Idc, usize> = self.idcs.keys().enumerate().map(|(i, k)| (k, i)).collect();
        for h in self.hosts.values() {
            let Some(v) = at.get(&h.rec.idc).and_then(|&i| views.get_mut(i)) else {
                continue;
            };
            let alive = self.is_alive(h, now_ms);
            let db = self.role_of(h, now_ms) == Role::Bridgehead;
            v.hosts += 1;
            v.live_hosts += usize::from(alive);
            v.bridgeheads += usize::from(db);
            v.live_bridgeheads += usize::from(db && alive);
        }
        views
    }
}

fn unknown_image(q: &ImageQuery) -> GisError {
    GisError::new(
        ErrorKind::UnknownImage,
        format!(
            "image {} is not known to the GIS; publish it first",
            image_label(q)
        ),
    )
}

fn decode_manifest(bytes: &[u8], id: ImageId) -> Result<Manifest, GisError> {
    Manifest::from_bytes_with_id(bytes, id).map_err(|e| match e {
        ManifestError::IdMismatch { .. } => GisError::new(
            ErrorKind::ManifestMismatch,
            format!("{e}; the manifest must be the one the image id was computed from"),
        ),
        other => GisError::new(
            ErrorKind::BadRequest,
            format!("manifest of image {} refused: {other}", id.short()),
        ),
    })
}

#[cfg(test)]
mod tests;
mod versions;
