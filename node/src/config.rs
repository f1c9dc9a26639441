//! Node configuration: everything a host daemon needs to start, validated before start-up.
//! The CLI builds it from flags, a TOML file and `BIDS_…` variables.

use crate::scheduler::SchedulerConfig;
use crate::transport::LinkShaper;
use bids_protocols::{BridgeheadCert, Idc, Policy};
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone)]
pub struct NodeConfig {
    pub keypair: Keypair,
    pub idc: Idc,
    /// The GIS address, ending in `/p2p/<gis peer id>`.
    pub gis: Multiaddr,
    /// The other replicas of the GIS's Raft group, if it has several (same form): when the
    /// GIS in use stops answering, the node moves on to the next, in turn.
    pub gis_replicas: Vec<Multiaddr>,
    pub store_dir: PathBuf,
    pub listen: Vec<Multiaddr>,
    /// Addresses to register with the GIS instead of the listen addresses (e.g. behind NAT).
    pub external_addrs: Vec<Multiaddr>,
    pub cert: Option<BridgeheadCert>,
    pub admin_peer: PeerId,
    pub policy: Policy,
    pub heartbeat: Duration,
    pub scheduler: SchedulerConfig,
    /// Serve the local control socket (`<store>/control.sock`).
    pub control_socket: bool,
    /// Outgoing connections bind to this IP (the in-process testnet gives each IDC its own
    /// 127.0.k.0/24).
    pub bind_ip: Option<IpAddr>,
    /// Link emulation hook (testnets only).
    pub shaper: Option<Arc<dyn LinkShaper>>,
    /// How long a download may find no source before it fails.
    pub no_source_timeout: Duration,
    /// Upload (serving) rate limit in bytes/s, 0 = unlimited.
    pub upload_bps: u64,
    /// Download rate limit in bytes/s, 0 = unlimited.
    pub download_bps: u64,
    /// Serve chunks to others at all.
    pub sharing: bool,
    /// Warn this long before the bridgehead certificate expires (in the log at start and
    /// daily, and in the status as `cert_expiring`).
    pub cert_warn: Duration,
    /// A peer banned for serving corrupt chunks stays banned, for every download of this
    /// node, this long.
    pub ban_duration: Duration,
    /// Background scrub: re-hash the held chunks at this many bytes/s, over and over (bit
    /// rot found is marked missing and withdrawn like any chunk found bad). 0 = off.
    pub scrub_bps: u64,
    /// Re-hash each chunk read for serving and withdraw one found bad (the store's
    /// `verify_reads`). On by default; off, the node serves whatever its disk holds and
    /// leaves the check to the receivers (the tests use that to play a corrupting peer).
    pub verify_reads: bool,
    /// Serve Prometheus metrics, `/healthz` and `/readyz` on this address (off by default).
    pub metrics: Option<std::net::SocketAddr>,
    /// An ordinary host's download asks the GIS for a fresh host list this often (sooner
    /// when a LAN peer it cannot reach announces chunks; a bridgehead asks sooner early in a
    /// download). Each lookup is one GIS request per downloading host.
    pub lookup_refresh: Duration,
}

/// Default of [`NodeConfig::ban_duration`]: one hour.
pub const DEFAULT_BAN: Duration = Duration::from_secs(3600);

/// Default of [`NodeConfig::lookup_refresh`]: 3 s.
pub const DEFAULT_LOOKUP_REFRESH: Duration = Duration::from_secs(3);

/// Default of [`NodeConfig::cert_warn`]: 14 days.
pub const DEFAULT_CERT_WARN: Duration = Duration::from_secs(14 * 86_400);

impl NodeConfig {
    /// A configuration with defaults for everything but identity, IDC, GIS, store and admin.
    pub fn new(
        keypair: Keypair,
        idc: Idc,
        gis: Multiaddr,
        store_dir: PathBuf,
        admin_peer: PeerId,
    ) -> Self {
        NodeConfig {
            keypair,
            idc,
            gis,
            gis_replicas: Vec::new(),
            store_dir,
            listen: vec!["/ip4/0.0.0.0/tcp/0".parse().expect("static multiaddr")],
            external_addrs: Vec::new(),
            cert: None,
            admin_peer,
            policy: Policy::Bids,
            heartbeat: Duration::from_secs(2),
            scheduler: SchedulerConfig::default(),
            control_socket: true,
            bind_ip: None,
            shaper: None,
            no_source_timeout: Duration::from_secs(15),
            upload_bps: 0,
            download_bps: 0,
            sharing: true,
            cert_warn: DEFAULT_CERT_WARN,
            ban_duration: DEFAULT_BAN,
            scrub_bps: 0,
            verify_reads: true,
            metrics: None,
            lookup_refresh: DEFAULT_LOOKUP_REFRESH,
        }
    }

    /// The GIS peer id, taken from the `/p2p/` suffix of its address.
    pub fn gis_peer(&self) -> Result<PeerId, String> {
        peer_of(&self.gis)
    }

    /// Every GIS replica, the configured GIS first: peer id and address.
    pub fn gis_replicas(&self) -> Result<Vec<(PeerId, Multiaddr)>, String> {
        std::iter::once(&self.gis)
            .chain(&self.gis_replicas)
            .map(|a| Ok((peer_of(a)?, a.clone())))
            .collect()
    }

    /// Checks what can be checked before start-up.
    pub fn validate(&self) -> Result<(), String> {
        self.gis_replicas()?;
        if let Some(c) = &self.cert {
            let me = self.keypair.public().to_peer_id();
            c.verify_for(
                &self.admin_peer,
                &me,
                &self.idc,
                bids_protocols::unix_now(),
                &Default::default(),
            )
            .map_err(|e| format!("this node's bridgehead certificate is not usable: {e}"))?;
        }
        if self.listen.is_empty() {
            return Err("at least one listen address is needed".into());
        }
        Ok(())
    }
}

/// The peer id at the end of a GIS address.
fn peer_of(addr: &Multiaddr) -> Result<PeerId, String> {
    match addr.iter().last() {
        Some(libp2p::multiaddr::Protocol::P2p(p)) => Ok(p),
        _ => Err(format!(
            "GIS address {addr} must end with /p2p/<peer id> (as `bids gis` prints it)"
        )),
    }
}
