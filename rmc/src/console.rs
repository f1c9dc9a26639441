//! The console's service layer: every operation the API offers, as plain async methods over
//! an [`AdminGis`]. It owns the history sampler's state, certificate serials and the
//! bridgehead-change flow (issue with the admin key, push, revoke, demote); the HTTP layer in
//! `api` only parses, authenticates and maps errors.

use crate::gis_link::{AdminGis, GisCallError};
use crate::history::{CertSample, History, HostSample, Provision};
use crate::model::{self, GcHostView, GcView, HostView, ImageView, StatsView};
use crate::query::HostQuery;
use bids_protocols::admin::{CertStatus, CommandOutcome, GcPolicy, GcRequest, HostCommand};
use bids_protocols::cert::CertBody;
use bids_protocols::{BridgeheadCert, Idc, ImageRef, Role};
use libp2p::identity::Keypair;
use libp2p::PeerId;
use serde::Serialize;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Why an operation failed, in terms the API maps to HTTP statuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConsoleError {
    #[error("{0}")]
    BadInput(String),
    #[error("{0}")]
    NotFound(String),
    #[error(transparent)]
    Gis(#[from] GisCallError),
    #[error("{0}")]
    Internal(String),
}

/// One bridgehead certificate issued by a change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Issued {
    pub peer: String,
    pub serial: u64,
    pub db_id: String,
    pub not_after: i64,
    /// The role the GIS granted after the host re-registered with it.
    pub role: Option<String>,
    pub error: Option<String>,
}

/// One bridgehead dropped by a change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Dropped {
    pub peer: String,
    pub serial: u64,
    /// The GIS refuses the serial from now on.
    pub revoked: bool,
    /// The host dropped its certificate and is an ordinary host again.
    pub demoted: bool,
    pub error: Option<String>,
}

/// `PUT /api/idcs/{idc}/bridgeheads` answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BridgeheadChange {
    pub idc: String,
    pub issued: Vec<Issued>,
    pub dropped: Vec<Dropped>,
    /// Requested bridgeheads that already held a valid certificate.
    pub unchanged: Vec<String>,
}

/// A gc over many hosts.
#[derive(Clone, Debug)]
pub struct GcOrder {
    pub policy: GcPolicy,
    pub keep: Option<u32>,
    pub free_target: Option<u64>,
    pub dry_run: bool,
    pub seed: Option<u64>,
    /// Only hosts of this IDC.
    pub idc: Option<String>,
    /// Only these hosts.
    pub peers: Option<Vec<PeerId>>,
}

pub struct Console {
    gis: Arc<dyn AdminGis>,
    admin: Keypair,
    history: Mutex<History>,
    last_serial: AtomicU64,
    cert_validity: Duration,
    cert_warn: Duration,
}

/// Certificates ending within this long are flagged; a node warns in its log from the same
/// point by default (`--cert-warn-days`).
pub const DEFAULT_CERT_WARN: Duration = Duration::from_secs(14 * 86_400);

fn unix_ms() -> i64 {
    bids_gis::server::unix_ms()
}

impl Console {
    pub fn new(
        gis: Arc<dyn AdminGis>,
        admin: Keypair,
        sample_interval: Duration,
        cert_validity: Duration,
    ) -> Self {
        // An hour of samples at the default interval, whatever the interval is.
        let interval_ms = sample_interval.as_millis().max(1) as u64;
        Console {
            gis,
            admin,
            history: Mutex::new(History::new(interval_ms, 3600, 2000)),
            last_serial: AtomicU64::new(0),
            cert_validity,
            cert_warn: DEFAULT_CERT_WARN,
        }
    }

    /// Flags certificates that end within `d` (14 days by default).
    pub fn with_cert_warn(mut self, d: Duration) -> Self {
        self.cert_warn = d;
        self
    }

    fn cert_warn_s(&self) -> i64 {
        i64::try_from(self.cert_warn.as_secs()).unwrap_or(i64::MAX)
    }

    pub fn gis(&self) -> &Arc<dyn AdminGis> {
        &self.gis
    }

    fn history(&self) -> std::sync::MutexGuard<'_, History> {
        self.history
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn host_views(&self, hosts: &[bids_protocols::admin::HostInfo]) -> Vec<HostView> {
        let now_s = bids_protocols::unix_now();
        let warn = self.cert_warn_s();
        let history = self.history();
        hosts
            .iter()
            .map(|h| HostView::new(h, now_s, warn, Some(&history)))
            .collect()
    }

    pub async fn hosts(&self) -> Result<Vec<HostView>, ConsoleError> {
        Ok(self.host_views(&self.gis.hosts().await?))
    }

    /// The hosts `q` selects, one page of them, and how many matched before paging.
    pub async fn hosts_page(&self, q: &HostQuery) -> Result<(usize, Vec<HostView>), ConsoleError> {
        Ok(q.apply(self.hosts().await?))
    }

    async fn plain_images(&self) -> Result<Vec<ImageView>, ConsoleError> {
        Ok(self
            .gis
            .images()
            .await?
            .iter()
            .map(ImageView::from)
            .collect())
    }

    /// Images with their holders, and what each bridgehead moved for each.
    pub async fn images(&self) -> Result<Vec<ImageView>, ConsoleError> {
        let hosts = async { self.gis.hosts().await.map_err(ConsoleError::from) };
        let (hosts, mut images) = tokio::try_join!(hosts, self.plain_images())?;
        model::add_bridgehead_uploads(&mut images, &hosts);
        Ok(images)
    }

    pub async fn stats(&self) -> Result<StatsView, ConsoleError> {
        let stats = async { self.gis.stats().await.map_err(ConsoleError::from) };
        let hosts = async { self.gis.hosts().await.map_err(ConsoleError::from) };
        let (stats, images, hosts) = tokio::try_join!(stats, self.plain_images(), hosts)?;
        let names = model::image_names(&images);
        let views = self.host_views(&hosts);
        let history = self.history();
        let rates = history.idc_rates();
        let mut idcs = model::idc_views(&stats, &names);
        for i in &mut idcs {
            i.rates = rates.get(&i.idc).copied().unwrap_or_default();
        }
        let mut transfers = model::transfers(&images);
        for t in &mut transfers {
            t.bytes_per_s = history.download_rate(&t.peer, &t.id);
            let left = if t.chunks == 0 {
                0.0
            } else {
                t.size as f64 * f64::from(t.chunks.saturating_sub(t.chunks_held))
                    / f64::from(t.chunks)
            };
            t.eta_s = t.bytes_per_s.filter(|r| *r > 0.0).map(|r| left / r);
        }
        Ok(StatsView {
            now_ms: stats.now_ms,
            policy: stats.policy.map(|p| p.to_string()),
            cert_alerts: model::cert_alerts(&views),
            cert_warn_s: self.cert_warn_s(),
            hosts: stats.hosts,
            alive: stats.live_hosts,
            images: stats.images,
            idcs,
            transfers,
            history: history.view(),
        })
    }

    /// Takes one sample of the GIS's counters, roles and the hosts' provision times and
    /// downloads into the history.
    pub async fn sample(&self) -> Result<(), ConsoleError> {
        let hosts = async { self.gis.hosts().await.map_err(ConsoleError::from) };
        let (hosts, images) = tokio::try_join!(hosts, self.plain_images())?;
        let names = model::image_names(&images);
        let fetching: std::collections::HashSet<(String, String)> = images
            .iter()
            .flat_map(|i| {
                i.holders
                    .iter()
                    .filter(|h| h.fetching && !h.complete)
                    .map(|h| (h.peer.clone(), i.id.clone()))
            })
            .collect();
        let hs: Vec<HostSample> = hosts
            .iter()
            .map(|h| {
                let peer = h.peer.to_string();
                let downloads = h
                    .image_counters
                    .iter()
                    .map(|c| (c.id.to_hex(), c.counters))
                    .filter(|(id, _)| fetching.contains(&(peer.clone(), id.clone())))
                    .map(|(id, c)| (id, c.lan_recv_bytes + c.wan_recv_bytes))
                    .collect();
                HostSample {
                    idc: h.idc.to_string(),
                    counters: h.counters,
                    bridgehead: h.role == Role::Bridgehead,
                    cert: h.cert.as_ref().map(|c| CertSample {
                        serial: c.serial,
                        not_after: c.not_after,
                        status: c.status,
                    }),
                    downloads,
                    peer,
                }
            })
            .collect();
        let provisions: Vec<Provision> = hosts
            .iter()
            .flat_map(|h| {
                let names = &names;
                h.provisions.iter().map(move |p| {
                    model::provision(
                        h.peer.to_string(),
                        h.idc.to_string(),
                        p.id.to_hex(),
                        &p.time,
                        names,
                    )
                })
            })
            .collect();
        self.history().record(unix_ms(), &hs, &provisions);
        Ok(())
    }

    /// Sends one command to one host.
    pub async fn command(
        &self,
        peer: PeerId,
        cmd: HostCommand,
    ) -> Result<CommandOutcome, ConsoleError> {
        cmd.validate().map_err(ConsoleError::BadInput)?;
        Ok(self.gis.command(peer, cmd).await?)
    }

    /// A serial no other certificate of this admin has: the time in ms, kept increasing
    /// within this process and above every serial the GIS reports.
    fn next_serial(&self, floor: u64) -> u64 {
        let now = u64::try_from(unix_ms()).unwrap_or(0);
        let mut cur = self.last_serial.load(Ordering::Relaxed);
        loop {
            let next = now.max(cur + 1).max(floor + 1);
            match self
                .last_serial
                .compare_exchange(cur, next, Ordering::SeqCst, Ordering::Relaxed)
            {
                Ok(_) => return next,
                Err(seen) => cur = seen,
            }
        }
    }

    /// Makes `peers` the bridgeheads of `idc`: each one without a valid certificate gets a
    /// new one (issued here with the admin key, pushed with `SetCert`); each current
    /// bridgehead not in `peers` has its serial revoked at the GIS and is told to drop its
    /// certificate. Revocation comes before demotion so a host that cannot be reached is
    /// refused all the same.
    pub async fn set_bridgeheads(
        &self,
        idc: &str,
        peers: &[PeerId],
    ) -> Result<BridgeheadChange, ConsoleError> {
        let idc_v = Idc::new(idc).map_err(ConsoleError::BadInput)?;
        let hosts = self.gis.hosts().await?;
        let members: Vec<_> = hosts.iter().filter(|h| h.idc == idc_v).collect();
        if members.is_empty() {
            return Err(ConsoleError::NotFound(format!(
                "IDC {idc} has no registered host"
            )));
        }
        let wanted: BTreeSet<PeerId> = peers.iter().copied().collect();
        for p in &wanted {
            if !members.iter().any(|h| &h.peer == p) {
                return Err(ConsoleError::BadInput(format!(
                    "{p} is not a registered host of IDC {idc}; a bridgehead must belong to the IDC it serves"
                )));
            }
        }
        let floor = hosts
            .iter()
            .filter_map(|h| h.cert.as_ref().map(|c| c.serial))
            .max()
            .unwrap_or(0);
        let mut change = BridgeheadChange {
            idc: idc.to_string(),
            issued: Vec::new(),
            dropped: Vec::new(),
            unchanged: Vec::new(),
        };
        for h in &members {
            let valid = h.cert.as_ref().filter(|c| c.status == CertStatus::Valid);
            if wanted.contains(&h.peer) {
                if valid.is_some() && h.role == Role::Bridgehead {
                    change.unchanged.push(h.peer.to_string());
                    continue;
                }
                change
                    .issued
                    .push(self.promote(h.peer, &idc_v, floor).await);
            } else if let Some(c) = &h.cert {
                if c.status == CertStatus::Revoked {
                    continue;
                }
                change.dropped.push(self.demote(h.peer, c.serial).await);
            }
        }
        tracing::info!(
            idc,
            issued = change.issued.len(),
            dropped = change.dropped.len(),
            "bridgeheads changed"
        );
        Ok(change)
    }

    async fn promote(&self, peer: PeerId, idc: &Idc, floor: u64) -> Issued {
        let serial = self.next_serial(floor);
        let db_id = format!("{idc}-db-{serial}");
        let now = bids_protocols::unix_now();
        let not_after =
            now.saturating_add(i64::try_from(self.cert_validity.as_secs()).unwrap_or(i64::MAX / 2));
        let mut out = Issued {
            peer: peer.to_string(),
            serial,
            db_id: db_id.clone(),
            not_after,
            role: None,
            error: None,
        };
        let cert = match BridgeheadCert::issue(
            &self.admin,
            CertBody {
                peer,
                idc: idc.clone(),
                db_id,
                serial,
                // A minute of slack for hosts whose clock runs a little behind.
                not_before: now - 60,
                not_after,
                issuer: self.admin.public().to_peer_id(),
            },
        ) {
            Ok(c) => c,
            Err(e) => {
                out.error = Some(format!("issuing the certificate failed: {e}"));
                return out;
            }
        };
        match self.gis.command(peer, HostCommand::SetCert { cert }).await {
            Ok(CommandOutcome::Role { role, .. }) => out.role = Some(role.to_string()),
            Ok(other) => out.error = Some(format!("unexpected answer {other:?}")),
            Err(e) => out.error = Some(e.to_string()),
        }
        out
    }

    async fn demote(&self, peer: PeerId, serial: u64) -> Dropped {
        let mut out = Dropped {
            peer: peer.to_string(),
            serial,
            revoked: false,
            demoted: false,
            error: None,
        };
        match self.gis.revoke(serial).await {
            Ok(()) => out.revoked = true,
            Err(e) => {
                out.error = Some(format!("revoking serial {serial} failed: {e}"));
                return out;
            }
        }
        match self.gis.command(peer, HostCommand::DropCert).await {
            Ok(_) => out.demoted = true,
            Err(e) => {
                out.error = Some(format!(
                    "serial {serial} is revoked, but the host did not drop its certificate: {e}"
                ))
            }
        }
        out
    }

    /// Runs a gc on every matching connected host at once.
    pub async fn gc(&self, o: GcOrder) -> Result<GcView, ConsoleError> {
        let seed = o.seed.unwrap_or_else(rand::random);
        let req = GcRequest {
            policy: o.policy,
            keep: o.keep,
            free_target: o.free_target,
            dry_run: o.dry_run,
            seed,
        };
        HostCommand::Gc(req.clone())
            .validate()
            .map_err(ConsoleError::BadInput)?;
        let idc = match &o.idc {
            Some(s) => Some(Idc::new(s).map_err(ConsoleError::BadInput)?),
            None => None,
        };
        let hosts = self.gis.hosts().await?;
        let targets: Vec<_> = hosts
            .iter()
            .filter(|h| idc.as_ref().is_none_or(|i| &h.idc == i))
            .filter(|h| o.peers.as_ref().is_none_or(|ps| ps.contains(&h.peer)))
            .filter(|h| h.connected)
            .collect();
        let runs = targets.iter().map(|h| {
            let cmd = HostCommand::Gc(req.clone());
            async move { (h, self.gis.command(h.peer, cmd).await) }
        });
        let results = futures::future::join_all(runs).await;
        let mut out = Vec::new();
        for (h, r) in results {
            let (peer, idc) = (h.peer.to_string(), h.idc.to_string());
            out.push(match r {
                Ok(CommandOutcome::Gc(rep)) => GcHostView::from_report(peer, idc, &rep),
                Ok(other) => GcHostView {
                    peer,
                    idc,
                    removed: Vec::new(),
                    freed_bytes: 0,
                    kept: 0,
                    error: Some(format!("unexpected answer {other:?}")),
                },
                Err(e) => GcHostView {
                    peer,
                    idc,
                    removed: Vec::new(),
                    freed_bytes: 0,
                    kept: 0,
                    error: Some(e.to_string()),
                },
            });
        }
        Ok(GcView {
            dry_run: o.dry_run,
            policy: o.policy.as_str().to_string(),
            seed,
            hosts: out,
        })
    }
}

/// Parses `name:version`, or a bare version of image `name`.
pub fn image_ref(s: &str, name: Option<&str>) -> Result<ImageRef, ConsoleError> {
    if s.contains(':') {
        return s.parse().map_err(ConsoleError::BadInput);
    }
    match name {
        Some(n) => ImageRef::new(n, s).map_err(ConsoleError::BadInput),
        None => Err(ConsoleError::BadInput(format!(
            "image {s:?} must be written name:version"
        ))),
    }
}
