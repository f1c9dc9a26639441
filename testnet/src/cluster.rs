//! The in-process cluster: one GIS and several IDCs of real BIDS nodes (real libp2p, real
//! stores) in one process. IDC k lives on 127.0.k.0/24 so the shaper can tell links apart;
//! the GIS sits on 127.0.0.1, outside every IDC. Tests, `bids demo` and quick experiments
//! use it; production code never does.

use crate::shaping::Topology;
use anyhow::{Context, Result};
use bids_gis::server::{GisConfig, GisHandle};
use bids_node::store::{Store, StoreError};
use bids_node::{NodeConfig, NodeHandle};
use bids_protocols::cert::CertBody;
use bids_protocols::gis::{GisRequest, GisResponse, HostList, ImageQuery};
use bids_protocols::{BridgeheadCert, Idc, ImageRef, Manifest, ObjectKind, Policy, Role};
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// One IDC of the cluster.
#[derive(Clone, Debug)]
pub struct IdcSpec {
    pub name: String,
    /// Ordinary hosts.
    pub hosts: usize,
    /// Certified bridgeheads.
    pub bridgeheads: usize,
    /// WAN uplink, bytes/s each way (0 = unlimited).
    pub wan_bps: u64,
    /// One-way WAN delay of this IDC's uplink.
    pub wan_delay: Duration,
    /// Per-host LAN link, bytes/s each way (0 = unlimited).
    pub lan_bps: u64,
}

#[derive(Clone, Debug)]
pub struct ClusterSpec {
    pub idcs: Vec<IdcSpec>,
    pub policy: Policy,
    /// Shape links (rates and delays) or leave loopback bare.
    pub shaped: bool,
}

/// One node of the cluster and what is needed to restart it.
pub struct ClusterNode {
    pub idc: String,
    pub ip: IpAddr,
    pub key: Keypair,
    pub cert: Option<BridgeheadCert>,
    pub store_dir: PathBuf,
    pub handle: Option<NodeHandle>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl ClusterNode {
    pub fn peer_id(&self) -> PeerId {
        self.key.public().to_peer_id()
    }

    pub fn is_bridgehead(&self) -> bool {
        self.cert.is_some()
    }

    /// The running node; panics in tests that use a stopped one by mistake.
    pub fn node(&self) -> &NodeHandle {
        self.handle.as_ref().expect("node is stopped")
    }
}

pub struct Cluster {
    pub spec: ClusterSpec,
    pub admin: Keypair,
    pub gis: Option<GisHandle>,
    pub gis_addr: Multiaddr,
    /// Further GIS replicas the nodes are given (after `gis_addr`).
    pub gis_replicas: Vec<Multiaddr>,
    pub nodes: Vec<ClusterNode>,
    pub topology: Arc<Topology>,
    gis_key: Keypair,
    gis_dir: PathBuf,
    _dir: tempfile::TempDir,
}

/// The loopback address of host `h` of IDC number `k` (both from 0).
pub fn host_ip(k: usize, h: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, (k + 1) as u8, (h + 1) as u8))
}

/// Issues a bridgehead certificate (the admin's job, done here at set-up).
pub fn issue_cert(
    admin: &Keypair,
    peer: PeerId,
    idc: &str,
    db_id: &str,
    serial: u64,
    valid: Duration,
) -> Result<BridgeheadCert> {
    let now = bids_protocols::unix_now();
    BridgeheadCert::issue(
        admin,
        CertBody {
            peer,
            idc: Idc::new(idc).map_err(anyhow::Error::msg)?,
            db_id: db_id.to_string(),
            serial,
            not_before: now - 60,
            not_after: now + valid.as_secs() as i64,
            issuer: peer,
        },
    )
    .map_err(anyhow::Error::msg)
}

impl Cluster {
    /// Starts the GIS and every node, and waits until all have registered.
    pub async fn start(spec: ClusterSpec) -> Result<Cluster> {
        Self::start_inner(spec, None).await
    }

    /// Starts every node against a GIS that runs elsewhere (say, the replicas of a GIS Raft
    /// group) at `gis_addr`, with `admin` as its admin, and waits until all registered. The
    /// cluster then has no GIS of its own: `gis` stays `None`, and the GIS restart and kill
    /// helpers are not for it.
    pub async fn start_with_gis(
        spec: ClusterSpec,
        admin: Keypair,
        gis_addr: Multiaddr,
    ) -> Result<Cluster> {
        Self::start_inner(spec, Some((admin, vec![gis_addr]))).await
    }

    /// As [`Cluster::start_with_gis`], with every node given all the replicas of a GIS
    /// Raft group (`--gis` once per replica), the first in use first.
    pub async fn start_with_gis_replicas(
        spec: ClusterSpec,
        admin: Keypair,
        replicas: Vec<Multiaddr>,
    ) -> Result<Cluster> {
        anyhow::ensure!(!replicas.is_empty(), "no GIS replica given");
        Self::start_inner(spec, Some((admin, replicas))).await
    }

    async fn start_inner(
        spec: ClusterSpec,
        external_gis: Option<(Keypair, Vec<Multiaddr>)>,
    ) -> Result<Cluster> {
        let dir = tempfile::Builder::new()
            .prefix("bids-testnet-")
            .tempdir()
            .context("temp dir")?;
        let (admin, external_addr) = match external_gis {
            Some((admin, addr)) => (admin, Some(addr)),
            None => (Keypair::generate_ed25519(), None),
        };
        let gis_key = Keypair::generate_ed25519();
        let gis_dir = dir.path().join("gis");
        let mut topo = Topology::new();
        for (k, idc) in spec.idcs.iter().enumerate() {
            let (wan, lan) = if spec.shaped {
                (idc.wan_bps, idc.lan_bps)
            } else {
                (0, 0)
            };
            let delay = if spec.shaped {
                idc.wan_delay
            } else {
                Duration::ZERO
            };
            topo.add_idc(&idc.name, wan, delay)?;
            for h in 0..idc.hosts + idc.bridgeheads {
                topo.add_host(host_ip(k, h), &idc.name, lan)?;
            }
        }
        let topology = Arc::new(topo);
        let mut gcfg = GisConfig::new(
            gis_key.clone(),
            "/ip4/127.0.0.1/tcp/0".parse()?,
            gis_dir.clone(),
            admin.public().to_peer_id(),
        );
        gcfg.policy = spec.policy;
        gcfg.heartbeat_timeout = Duration::from_secs(4);
        let (gis, gis_addr, gis_replicas) = match external_addr {
            Some(mut addrs) => {
                let first = addrs.remove(0);
                (None, first, addrs)
            }
            None => {
                let gis = bids_gis::server::spawn(gcfg).await?;
                let addr = gis
                    .listen_addrs()
                    .into_iter()
                    .next()
                    .context("GIS has no address")?;
                (Some(gis), addr, Vec::new())
            }
        };
        let mut nodes = Vec::new();
        let mut serial = 1000;
        for (k, idc) in spec.idcs.iter().enumerate() {
            // Bridgeheads first: host numbers 0..bridgeheads.
            for h in 0..idc.hosts + idc.bridgeheads {
                let key = Keypair::generate_ed25519();
                let cert = if h < idc.bridgeheads {
                    serial += 1;
                    let db_id = format!("{}-db{}", idc.name, h + 1);
                    Some(issue_cert(
                        &admin,
                        key.public().to_peer_id(),
                        &idc.name,
                        &db_id,
                        serial,
                        // Beyond the nodes' 14-day expiry warning: a testnet's (and the
                        // demo's) log stays free of it.
                        Duration::from_secs(90 * 86_400),
                    )?)
                } else {
                    None
                };
                let store_dir = dir.path().join(format!("{}-{}", idc.name, h));
                nodes.push(ClusterNode {
                    idc: idc.name.clone(),
                    ip: host_ip(k, h),
                    key,
                    cert,
                    store_dir,
                    handle: None,
                    task: None,
                });
            }
        }
        let mut c = Cluster {
            spec,
            admin,
            gis,
            gis_addr,
            gis_replicas,
            nodes,
            topology,
            gis_key,
            gis_dir,
            _dir: dir,
        };
        for i in 0..c.nodes.len() {
            c.start_node(i).await?;
        }
        c.wait_registered(Duration::from_secs(20)).await?;
        c.wait_bridgeheads_linked(Duration::from_secs(5)).await?;
        Ok(c)
    }

    /// The configuration node `i` runs with.
    pub fn node_config(&self, i: usize) -> Result<NodeConfig> {
        let n = &self.nodes[i];
        let mut cfg = NodeConfig::new(
            n.key.clone(),
            Idc::new(&n.idc).map_err(anyhow::Error::msg)?,
            self.gis_addr.clone(),
            n.store_dir.clone(),
            self.admin.public().to_peer_id(),
        );
        cfg.gis_replicas = self.gis_replicas.clone();
        cfg.listen = vec![format!("/ip4/{}/tcp/0", n.ip).parse()?];
        cfg.bind_ip = Some(n.ip);
        cfg.cert = n.cert.clone();
        cfg.policy = self.spec.policy;
        cfg.heartbeat = Duration::from_millis(500);
        cfg.control_socket = false;
        cfg.no_source_timeout = Duration::from_secs(10);
        if self.spec.shaped {
            cfg.shaper = Some(self.topology.shaper());
        }
        Ok(cfg)
    }

    /// Starts (or restarts) node `i` on its store.
    pub async fn start_node(&mut self, i: usize) -> Result<()> {
        let cfg = self.node_config(i)?;
        let (h, task) = bids_node::start(cfg)
            .await
            .with_context(|| format!("starting node {i}"))?;
        self.nodes[i].handle = Some(h);
        self.nodes[i].task = Some(task);
        Ok(())
    }

    /// Starts node `i` with a modified configuration (tests: a forged certificate, …).
    pub async fn start_node_with(
        &mut self,
        i: usize,
        f: impl FnOnce(&mut NodeConfig),
    ) -> Result<()> {
        let mut cfg = self.node_config(i)?;
        f(&mut cfg);
        let (h, task) = bids_node::start(cfg).await?;
        self.nodes[i].handle = Some(h);
        self.nodes[i].task = Some(task);
        Ok(())
    }

    /// Stops node `i` gracefully and starts it again, same identity, store and address, with
    /// a modified configuration (tests: a corrupting peer, a short ban, a scrub, …).
    pub async fn restart_node_with(
        &mut self,
        i: usize,
        f: impl FnOnce(&mut NodeConfig),
    ) -> Result<()> {
        self.stop_node(i).await;
        self.start_node_with(i, f).await
    }

    /// Stops node `i` gracefully.
    pub async fn stop_node(&mut self, i: usize) {
        if let Some(h) = self.nodes[i].handle.take() {
            h.shutdown().await;
        }
        if let Some(t) = self.nodes[i].task.take() {
            let _ = t.await;
        }
    }

    /// Kills node `i` abruptly, as a crash would (no flush, connections dropped). Returns
    /// once its store can be opened again, so the node can be restarted at once.
    pub async fn kill_node(&mut self, i: usize) {
        self.nodes[i].handle = None;
        if let Some(t) = self.nodes[i].task.take() {
            t.abort();
            let _ = t.await;
        }
        // Blocking tasks that still hold the store finish quickly; the store's lock frees
        // when the last of them ends. Wait for that by opening the store (bounded); a restart
        // reports any other failure itself.
        let dir = self.nodes[i].store_dir.clone();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let d = dir.clone();
            let opened = tokio::task::spawn_blocking(move || Store::open(&d).map(drop)).await;
            match opened {
                Ok(Err(StoreError::Locked { .. })) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                _ => break,
            }
        }
    }

    /// Adds an ordinary host to IDC `idc` (fresh identity, own store, next address of the
    /// IDC) without starting it; returns its index. Start it with [`Cluster::start_node`] or
    /// [`Cluster::start_node_with`] (after setting its `cert`, for instance). Its address is
    /// not in the link topology, so its own LAN link is not shaped.
    pub fn add_node(&mut self, idc: &str) -> Result<usize> {
        let k = self
            .spec
            .idcs
            .iter()
            .position(|s| s.name == idc)
            .with_context(|| format!("IDC {idc} is not in the cluster"))?;
        let h = self.idc_nodes(idc).len();
        anyhow::ensure!(h < 254, "IDC {idc} has no free address left");
        let i = self.nodes.len();
        self.nodes.push(ClusterNode {
            idc: idc.to_string(),
            ip: host_ip(k, h),
            key: Keypair::generate_ed25519(),
            cert: None,
            store_dir: self._dir.path().join(format!("{idc}-{h}")),
            handle: None,
            task: None,
        });
        Ok(i)
    }

    /// Imports `file` as `image` (chunks of `chunk_size` bytes) into node `i`'s store,
    /// publishes it, and waits until the GIS lists node `i` as a complete holder.
    pub async fn seed(
        &self,
        i: usize,
        file: &Path,
        image: &ImageRef,
        chunk_size: u32,
    ) -> Result<Manifest> {
        let h = self.nodes[i].node().clone();
        let store = h.store().clone();
        let (f, r) = (file.to_path_buf(), image.clone());
        let m = tokio::task::spawn_blocking(move || {
            store.import(&f, &r, chunk_size, None, ObjectKind::Image, &mut |_, _| {})
        })
        .await
        .context("import task")?
        .with_context(|| format!("importing {} into node {i}", file.display()))?;
        h.imported(m.id()).await.map_err(anyhow::Error::msg)?;
        self.wait_listed(i, &ImageQuery::Id(m.id()), Duration::from_secs(20))
            .await?;
        Ok(m)
    }

    /// Waits until the GIS lists node `i` as a complete holder of `image` (as seen by an
    /// ordinary host of its IDC).
    pub async fn wait_listed(&self, i: usize, image: &ImageQuery, within: Duration) -> Result<()> {
        let peer = self.nodes[i].peer_id();
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Ok(list) = self.lookup(&self.nodes[i].idc, image).await {
                if list.level0.iter().any(|e| e.peer == peer && e.complete) {
                    return Ok(());
                }
            }
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!(
                    "the GIS did not list node {i} as a holder of {image:?} within {within:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The host list an ordinary host of `idc` gets for `image` (asked by an outside
    /// identity, as `bids lookup` does).
    pub async fn lookup(&self, idc: &str, image: &ImageQuery) -> Result<HostList> {
        let req = GisRequest::Lookup {
            image: image.clone(),
            idc: Some(Idc::new(idc).map_err(anyhow::Error::msg)?),
        };
        let key = Keypair::generate_ed25519();
        match bids_gis::client::request_once(
            key,
            self.gis_addr.clone(),
            req,
            Duration::from_secs(5),
        )
        .await?
        {
            GisResponse::HostList(l) => Ok(*l),
            other => anyhow::bail!("lookup of {image:?} for IDC {idc} answered {other:?}"),
        }
    }

    /// Starts downloads of `image` on `nodes` at once and waits for all of them; returns each
    /// node's provision time in seconds, or the first failures.
    pub async fn fetch_all(
        &self,
        nodes: &[usize],
        image: &ImageRef,
        within: Duration,
    ) -> Result<Vec<f64>> {
        let mut tasks = Vec::new();
        for &i in nodes {
            let n = self.nodes[i].node().clone();
            let q = ImageQuery::Ref(image.clone());
            tasks.push((i, tokio::spawn(async move { n.fetch_and_wait(q).await })));
        }
        let deadline = tokio::time::Instant::now() + within;
        let mut times = Vec::new();
        let mut failures = Vec::new();
        for (i, t) in tasks {
            match tokio::time::timeout_at(deadline, t).await {
                Ok(Ok(Ok(secs))) => times.push(secs),
                Ok(Ok(Err(e))) => failures.push(format!("node {i}: {e}")),
                Ok(Err(e)) => failures.push(format!("node {i}: task failed: {e}")),
                Err(_) => failures.push(format!("node {i}: not done within {within:?}")),
            }
        }
        if !failures.is_empty() {
            anyhow::bail!("fetching {image} failed: {}", failures.join("; "));
        }
        Ok(times)
    }

    /// Restarts the GIS on its data dir (same identity, same address family, new port).
    pub async fn restart_gis(&mut self) -> Result<()> {
        if let Some(g) = self.gis.take() {
            g.shutdown().await?;
        }
        let mut gcfg = GisConfig::new(
            self.gis_key.clone(),
            "/ip4/127.0.0.1/tcp/0".parse()?,
            self.gis_dir.clone(),
            self.admin.public().to_peer_id(),
        );
        gcfg.policy = self.spec.policy;
        gcfg.heartbeat_timeout = Duration::from_secs(4);
        let g = bids_gis::server::spawn(gcfg).await?;
        self.gis_addr = g
            .listen_addrs()
            .into_iter()
            .next()
            .context("GIS has no address")?;
        self.gis = Some(g);
        Ok(())
    }

    /// Kills the GIS abruptly, as a crash would (its task is aborted: no graceful stop,
    /// connections dropped). Restart it with [`Cluster::start_gis_at_same_address`].
    pub async fn kill_gis(&mut self) {
        if let Some(g) = self.gis.take() {
            g.abort().await;
        }
    }

    /// Starts the GIS again on its data dir, identity and address (same port): nodes know
    /// only the address they were configured with. Retries for a few seconds while the
    /// killed GIS's port or database are still being released.
    pub async fn start_gis_at_same_address(&mut self) -> Result<()> {
        let mut listen = self.gis_addr.clone();
        if matches!(
            listen.iter().last(),
            Some(libp2p::multiaddr::Protocol::P2p(_))
        ) {
            listen.pop();
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let mut gcfg = GisConfig::new(
                self.gis_key.clone(),
                listen.clone(),
                self.gis_dir.clone(),
                self.admin.public().to_peer_id(),
            );
            gcfg.policy = self.spec.policy;
            gcfg.heartbeat_timeout = Duration::from_secs(4);
            match bids_gis::server::spawn(gcfg).await {
                Ok(g) => {
                    self.gis = Some(g);
                    return Ok(());
                }
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!(error = %e, "GIS restart on {listen} failed; retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e.context(format!("restarting the GIS on {listen}"))),
            }
        }
    }

    /// Indexes of the nodes of an IDC.
    pub fn idc_nodes(&self, idc: &str) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].idc == idc)
            .collect()
    }

    /// Waits until every running node is registered with the GIS.
    pub async fn wait_registered(&self, within: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + within;
        for (i, n) in self.nodes.iter().enumerate() {
            let Some(h) = &n.handle else { continue };
            loop {
                let st = h.status().await.map_err(anyhow::Error::msg)?;
                if st.registered {
                    break;
                }
                if tokio::time::Instant::now() > deadline {
                    anyhow::bail!(
                        "node {i} ({}) did not register with the GIS within {within:?}",
                        n.idc
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }

    /// Under BIDS, waits (at most `within`) until every bridgehead has a link open to a
    /// bridgehead of each other IDC that has one, as a cluster that has been up a while
    /// has. Returns without error when they are not linked by then (a test may start
    /// bridgeheads with bad certificates on purpose); the downloads then link on demand.
    pub async fn wait_bridgeheads_linked(&self, within: Duration) -> Result<()> {
        if self.spec.policy != Policy::Bids {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let mut statuses = Vec::new();
            for n in &self.nodes {
                if let Some(h) = &n.handle {
                    statuses.push(h.status().await.map_err(anyhow::Error::msg)?);
                }
            }
            let idcs_with_db: std::collections::BTreeSet<&Idc> = statuses
                .iter()
                .filter(|s| s.role == Role::Bridgehead)
                .map(|s| &s.idc)
                .collect();
            let linked = statuses
                .iter()
                .filter(|s| s.role == Role::Bridgehead)
                .all(|s| s.wan_links + 1 >= idcs_with_db.len());
            if linked {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                tracing::debug!("bridgeheads not all linked across IDCs yet; going on");
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops everything.
    pub async fn shutdown(mut self) {
        for i in 0..self.nodes.len() {
            self.stop_node(i).await;
        }
        if let Some(g) = self.gis.take() {
            let _ = g.shutdown().await;
        }
    }
}
