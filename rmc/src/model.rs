//! The JSON the console's API speaks (documented in `rmc/openapi.yaml`): views built from the
//! admin wire types of `bids_protocols::admin`, with peer ids and image ids as strings and
//! every field named for an operator. The wire types stay free to change; these are the API.

use crate::history::{History, HostRates, IdcRates, RoleEvent};
use bids_protocols::admin::{
    CertInfo, CertStatus, CommandOutcome, GcItem, GcReport, HostInfo, ImageHolders, Stats,
};
use bids_protocols::gis::Counters;
use bids_protocols::gis::ProvisionTime;
use bids_protocols::ObjectKind;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Bytes/s, 0 = unlimited.
    pub upload_bps: u64,
    /// Bytes/s, 0 = unlimited.
    pub download_bps: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CertView {
    pub serial: u64,
    pub db_id: String,
    pub not_before: i64,
    pub not_after: i64,
    /// valid, not-yet-valid, expired or revoked.
    pub status: CertStatus,
}

impl From<&CertInfo> for CertView {
    fn from(c: &CertInfo) -> Self {
        CertView {
            serial: c.serial,
            db_id: c.db_id.clone(),
            not_before: c.not_before,
            not_after: c.not_after,
            status: c.status,
        }
    }
}

/// `GET /api/hosts` item.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HostView {
    pub peer: String,
    pub idc: String,
    /// host or bridgehead.
    pub role: String,
    pub alive: bool,
    /// Connected to the GIS, so commands reach it.
    pub connected: bool,
    pub last_seen_ms: Option<i64>,
    pub addrs: Vec<String>,
    /// `null` until the host has reported them in a heartbeat.
    pub limits: Option<Limits>,
    pub sharing: Option<bool>,
    pub counters: Counters,
    /// Bytes/s over the last few seconds; `null` until the console has two samples.
    pub rates: Option<HostRates>,
    pub refusals: u64,
    /// Images it holds any part of.
    pub images: u32,
    pub cert: Option<CertView>,
    /// Its certificate is valid but ends within the console's warning period.
    pub cert_expiring: bool,
    /// Seconds until its certificate ends (negative once it ended).
    pub cert_expires_in_s: Option<i64>,
    /// The last time the console saw it stop being a bridgehead, and why.
    pub demoted: Option<RoleEvent>,
    /// How long each image it downloaded took, as the host measured it.
    pub provisions: Vec<HostProvisionView>,
}

/// One image's provision time on a host (`GET /api/hosts`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HostProvisionView {
    /// Image id (hex).
    pub id: String,
    /// From the start of the download to its last chunk verified and stored.
    pub seconds: f64,
    pub completed_ms: i64,
}

/// Seconds of a provision time.
pub fn seconds(t: &ProvisionTime) -> f64 {
    t.millis as f64 / 1000.0
}

impl HostView {
    /// The view of `h` at `now_s` (unix seconds), warning of certificates that end within
    /// `cert_warn_s`; rates and demotions come from the history, when there is one.
    pub fn new(h: &HostInfo, now_s: i64, cert_warn_s: i64, history: Option<&History>) -> Self {
        let peer = h.peer.to_string();
        let cert_expires_in_s = h.cert.as_ref().map(|c| c.not_after.saturating_sub(now_s));
        let cert_expiring = h
            .cert
            .as_ref()
            .is_some_and(|c| c.status == CertStatus::Valid)
            && cert_expires_in_s.is_some_and(|s| s <= cert_warn_s);
        HostView {
            rates: history.and_then(|hi| hi.host_rates(&peer)),
            demoted: history.and_then(|hi| hi.last_demotion(&peer).cloned()),
            peer,
            idc: h.idc.to_string(),
            role: h.role.to_string(),
            alive: h.alive,
            connected: h.connected,
            last_seen_ms: h.last_seen_ms,
            addrs: h.addrs.iter().map(|a| a.to_string()).collect(),
            limits: h.settings.map(|s| Limits {
                upload_bps: s.upload_bps,
                download_bps: s.download_bps,
            }),
            sharing: h.settings.map(|s| s.sharing),
            counters: h.counters,
            refusals: h.refusals,
            images: h.images,
            cert: h.cert.as_ref().map(CertView::from),
            cert_expiring,
            cert_expires_in_s,
            provisions: h
                .provisions
                .iter()
                .map(|p| HostProvisionView {
                    id: p.id.to_hex(),
                    seconds: seconds(&p.time),
                    completed_ms: p.time.completed_ms,
                })
                .collect(),
        }
    }
}

/// A certificate an operator should look at: ending soon, ended, or revoked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CertAlert {
    pub peer: String,
    pub idc: String,
    pub serial: u64,
    pub db_id: String,
    /// Unix seconds.
    pub not_after: i64,
    /// expiring (valid, ends within the warning period), expired or revoked.
    pub state: String,
    pub expires_in_s: i64,
}

/// The alerts among `hosts`, soonest end first.
pub fn cert_alerts(hosts: &[HostView]) -> Vec<CertAlert> {
    let mut out: Vec<CertAlert> = hosts
        .iter()
        .filter_map(|h| {
            let c = h.cert.as_ref()?;
            let state = match c.status {
                CertStatus::Valid if h.cert_expiring => "expiring",
                CertStatus::Expired => "expired",
                CertStatus::Revoked => "revoked",
                _ => return None,
            };
            Some(CertAlert {
                peer: h.peer.clone(),
                idc: h.idc.clone(),
                serial: c.serial,
                db_id: c.db_id.clone(),
                not_after: c.not_after,
                state: state.into(),
                expires_in_s: h.cert_expires_in_s.unwrap_or(0),
            })
        })
        .collect();
    out.sort_by_key(|a| a.not_after);
    out
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HolderView {
    pub peer: String,
    pub idc: String,
    pub alive: bool,
    pub chunks_held: u32,
    pub complete: bool,
    pub fetching: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct IdcHolding {
    pub complete: u32,
    pub partial: u32,
    pub fetching: u32,
}

/// `GET /api/images` item: an image version or a delta file.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ImageView {
    pub name: String,
    pub version: String,
    pub id: String,
    /// image or delta.
    pub kind: String,
    /// For a delta: the image ids it turns `from` into `to`.
    pub delta_from: Option<String>,
    pub delta_to: Option<String>,
    /// The version it derives from (`name:version`).
    pub base: Option<String>,
    pub size: u64,
    pub chunk_size: u32,
    pub chunks: u32,
    pub publisher: String,
    pub published_ms: i64,
    pub holders: Vec<HolderView>,
    /// Holders counted per IDC.
    pub idcs: BTreeMap<String, IdcHolding>,
    /// What each bridgehead moved for this image (filled by the console from the hosts'
    /// per-image counters).
    pub bridgeheads: Vec<BridgeheadUpload>,
}

/// One bridgehead's traffic for one image, and its ratios to the image size: the LAN upload
/// ratio tells whether the IDC's hosts swarmed (about 1) or all fetched from it (about the
/// number of hosts).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BridgeheadUpload {
    pub peer: String,
    pub idc: String,
    /// Sent to hosts of its own IDC.
    pub lan_sent_bytes: u64,
    /// `lan_sent_bytes` ÷ the image size.
    pub lan_upload_ratio: f64,
    /// Received from other IDCs.
    pub wan_recv_bytes: u64,
    /// `wan_recv_bytes` ÷ the image size.
    pub wan_in_ratio: f64,
}

/// Fills each image's `bridgeheads` from the per-image counters of the hosts that are (or
/// hold a certificate to be) bridgeheads.
pub fn add_bridgehead_uploads(images: &mut [ImageView], hosts: &[HostInfo]) {
    let ratio = |b: u64, size: u64| {
        if size == 0 {
            0.0
        } else {
            b as f64 / size as f64
        }
    };
    for im in images.iter_mut() {
        im.bridgeheads = hosts
            .iter()
            .filter(|h| h.role == bids_protocols::Role::Bridgehead || h.cert.is_some())
            .filter_map(|h| {
                let c = h
                    .image_counters
                    .iter()
                    .find(|c| c.id.to_hex() == im.id)?
                    .counters;
                Some(BridgeheadUpload {
                    peer: h.peer.to_string(),
                    idc: h.idc.to_string(),
                    lan_sent_bytes: c.lan_sent_bytes,
                    lan_upload_ratio: ratio(c.lan_sent_bytes, im.size),
                    wan_recv_bytes: c.wan_recv_bytes,
                    wan_in_ratio: ratio(c.wan_recv_bytes, im.size),
                })
            })
            .collect();
        im.bridgeheads
            .sort_by(|a, b| (&a.idc, &a.peer).cmp(&(&b.idc, &b.peer)));
    }
}

impl From<&ImageHolders> for ImageView {
    fn from(i: &ImageHolders) -> Self {
        let (kind, delta_from, delta_to) = match &i.kind {
            ObjectKind::Image => ("image", None, None),
            ObjectKind::Delta { from, to } => ("delta", Some(from.to_hex()), Some(to.to_hex())),
        };
        let mut holders = Vec::new();
        let mut idcs = BTreeMap::new();
        for (idc, hs) in &i.holders {
            let c: &mut IdcHolding = idcs.entry(idc.to_string()).or_default();
            for h in hs {
                if h.complete {
                    c.complete += 1;
                } else {
                    c.partial += 1;
                }
                if h.fetching {
                    c.fetching += 1;
                }
                holders.push(HolderView {
                    peer: h.peer.to_string(),
                    idc: idc.to_string(),
                    alive: h.alive,
                    chunks_held: h.chunks_held,
                    complete: h.complete,
                    fetching: h.fetching,
                });
            }
        }
        ImageView {
            name: i.info.name.clone(),
            version: i.info.version.clone(),
            id: i.info.id.to_hex(),
            kind: kind.to_string(),
            delta_from,
            delta_to,
            base: i.base.as_ref().map(|b| b.to_string()),
            size: i.info.size,
            chunk_size: i.info.chunk_size,
            chunks: i.chunks,
            publisher: i.publisher.to_string(),
            published_ms: i.published_ms,
            holders,
            idcs,
            bridgeheads: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct IdcView {
    pub idc: String,
    pub hosts: u32,
    pub alive: u32,
    pub bridgeheads: u32,
    pub live_bridgeheads: u32,
    /// Sums of its hosts' counters; `wan_recv_bytes` is what entered the IDC over the WAN.
    pub counters: Counters,
    /// Bytes/s over the last few seconds of the console's samples.
    pub rates: IdcRates,
    /// Provision times its hosts report now (an image removed from a host leaves this list;
    /// the history keeps it).
    pub provisions: Vec<crate::history::Provision>,
}

/// A host downloading an image now.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TransferView {
    pub peer: String,
    pub idc: String,
    /// `name:version`.
    pub image: String,
    pub id: String,
    pub chunks_held: u32,
    pub chunks: u32,
    pub percent: f64,
    /// Image size in bytes.
    pub size: u64,
    /// Bytes/s the host receives for this image over the last few seconds; `null` until the
    /// console has two samples of the download.
    pub bytes_per_s: Option<f64>,
    /// Seconds left at that rate (the bytes of the chunks it lacks ÷ the rate); `null` while
    /// the rate is unknown or zero.
    pub eta_s: Option<f64>,
}

/// The live transfers in a list of images.
pub fn transfers(images: &[ImageView]) -> Vec<TransferView> {
    let mut out = Vec::new();
    for i in images {
        for h in i.holders.iter().filter(|h| h.fetching && !h.complete) {
            let percent = if i.chunks == 0 {
                100.0
            } else {
                100.0 * f64::from(h.chunks_held.min(i.chunks)) / f64::from(i.chunks)
            };
            out.push(TransferView {
                peer: h.peer.clone(),
                idc: h.idc.clone(),
                image: format!("{}:{}", i.name, i.version),
                id: i.id.clone(),
                chunks_held: h.chunks_held,
                chunks: i.chunks,
                percent,
                size: i.size,
                bytes_per_s: None,
                eta_s: None,
            });
        }
    }
    out
}

/// `GET /api/stats`.
#[derive(Clone, Debug, Serialize)]
pub struct StatsView {
    /// The GIS's clock (unix ms) when it answered.
    pub now_ms: i64,
    /// The distribution policy the GIS runs: `bids` or `baseline` (`null` from a GIS too
    /// old to say).
    pub policy: Option<String>,
    /// Certificates ending within `cert_warn_s`, ended or revoked.
    pub cert_alerts: Vec<CertAlert>,
    /// The warning period for certificates, in seconds.
    pub cert_warn_s: i64,
    pub hosts: u32,
    pub alive: u32,
    pub images: u32,
    pub idcs: Vec<IdcView>,
    pub transfers: Vec<TransferView>,
    pub history: crate::history::HistoryView,
}

/// `name:version` of each image id (hex) in a list of images.
pub fn image_names(images: &[ImageView]) -> BTreeMap<String, String> {
    images
        .iter()
        .map(|i| (i.id.clone(), format!("{}:{}", i.name, i.version)))
        .collect()
}

/// One provision as the API shows it; `names` maps image ids to `name:version` (an image
/// the GIS no longer knows shows its id).
pub fn provision(
    peer: String,
    idc: String,
    id: String,
    t: &ProvisionTime,
    names: &BTreeMap<String, String>,
) -> crate::history::Provision {
    let ms = i64::try_from(t.millis).unwrap_or(i64::MAX);
    crate::history::Provision {
        peer,
        idc,
        image: names.get(&id).cloned().unwrap_or_else(|| id.clone()),
        id,
        started_ms: t.completed_ms.saturating_sub(ms),
        completed_ms: t.completed_ms,
        seconds: seconds(t),
    }
}

pub fn idc_views(s: &Stats, names: &BTreeMap<String, String>) -> Vec<IdcView> {
    s.idcs
        .iter()
        .map(|i| {
            let mut provisions: Vec<_> = i
                .provisions
                .iter()
                .map(|p| {
                    provision(
                        p.peer.to_string(),
                        i.idc.to_string(),
                        p.id.to_hex(),
                        &p.time,
                        names,
                    )
                })
                .collect();
            provisions.sort_by_key(|p| p.completed_ms);
            IdcView {
                idc: i.idc.to_string(),
                hosts: i.hosts,
                alive: i.live_hosts,
                bridgeheads: i.bridgeheads,
                live_bridgeheads: i.live_bridgeheads,
                counters: i.counters,
                rates: IdcRates::default(),
                provisions,
            }
        })
        .collect()
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GcItemView {
    /// `name:version`.
    pub image: String,
    pub id: String,
    pub kind: String,
    /// Disk space it took.
    pub bytes: u64,
    pub added_at: i64,
    pub last_used: i64,
}

impl From<&GcItem> for GcItemView {
    fn from(g: &GcItem) -> Self {
        GcItemView {
            image: g.image.to_string(),
            id: g.id.to_hex(),
            kind: match g.kind {
                ObjectKind::Image => "image".into(),
                ObjectKind::Delta { .. } => "delta".into(),
            },
            bytes: g.disk_bytes,
            added_at: g.added_at,
            last_used: g.last_used,
        }
    }
}

/// One host's part of a `POST /api/gc` answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GcHostView {
    pub peer: String,
    pub idc: String,
    pub removed: Vec<GcItemView>,
    pub freed_bytes: u64,
    pub kept: u32,
    /// Why this host did not run the gc (unreachable, refused, …).
    pub error: Option<String>,
}

impl GcHostView {
    pub fn from_report(peer: String, idc: String, r: &GcReport) -> Self {
        GcHostView {
            peer,
            idc,
            removed: r.removed.iter().map(GcItemView::from).collect(),
            freed_bytes: r.freed_bytes,
            kept: r.kept,
            error: None,
        }
    }
}

/// `POST /api/gc` answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GcView {
    pub dry_run: bool,
    pub policy: String,
    /// The seed of the random order; pass it again to make the real run pick what the dry
    /// run showed.
    pub seed: u64,
    pub hosts: Vec<GcHostView>,
}

/// What a host answered to a command, as JSON.
pub fn outcome_json(o: &CommandOutcome) -> serde_json::Value {
    use serde_json::json;
    match o {
        CommandOutcome::Settings(s) => json!({
            "settings": {"upload_bps": s.upload_bps, "download_bps": s.download_bps, "sharing": s.sharing}
        }),
        CommandOutcome::Fetching { image, id } => {
            json!({"fetching": {"image": image.to_string(), "id": id.to_hex()}})
        }
        CommandOutcome::Published { image, id, delta } => json!({
            "published": {"image": image.to_string(), "id": id.to_hex(), "delta": delta.map(|d| d.to_hex())}
        }),
        CommandOutcome::Removed { image, id } => {
            json!({"removed": {"image": image.to_string(), "id": id.to_hex()}})
        }
        CommandOutcome::Role { role, serial } => {
            json!({"role": {"role": role.to_string(), "serial": serial}})
        }
        CommandOutcome::Gc(r) => json!({
            "gc": {
                "dry_run": r.dry_run,
                "removed": r.removed.iter().map(GcItemView::from).collect::<Vec<_>>(),
                "freed_bytes": r.freed_bytes,
                "kept": r.kept,
            }
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bids_protocols::admin::Holder;
    use bids_protocols::gis::ImageInfo;
    use bids_protocols::{Idc, ImageId};
    use libp2p::PeerId;

    #[test]
    fn image_view_counts_holders_per_idc_and_lists_transfers() {
        let (p1, p2, p3) = (PeerId::random(), PeerId::random(), PeerId::random());
        let holder = |peer, chunks_held, complete, fetching| Holder {
            peer,
            alive: true,
            chunks_held,
            complete,
            fetching,
        };
        let mut holders = BTreeMap::new();
        holders.insert(Idc::new("A").unwrap(), vec![holder(p1, 8, true, false)]);
        holders.insert(
            Idc::new("B").unwrap(),
            vec![holder(p2, 2, false, true), holder(p3, 8, true, false)],
        );
        let i = ImageHolders {
            info: ImageInfo {
                name: "deb".into(),
                version: "12".into(),
                id: ImageId([1; 32]),
                size: 8 << 20,
                chunk_size: 1 << 20,
            },
            kind: ObjectKind::Image,
            base: None,
            chunks: 8,
            publisher: p1,
            published_ms: 5,
            holders,
        };
        let v = ImageView::from(&i);
        assert_eq!(v.kind, "image");
        assert_eq!(v.holders.len(), 3);
        assert_eq!(
            v.idcs["B"],
            IdcHolding {
                complete: 1,
                partial: 1,
                fetching: 1
            }
        );
        let t = transfers(&[v]);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].peer, p2.to_string());
        assert_eq!(t[0].image, "deb:12");
        assert_eq!(t[0].percent, 25.0);
    }
}
