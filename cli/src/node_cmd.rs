//! `bids node` and `bids gis`: the two daemons, configured from flags, `BIDS_…` variables and
//! an optional TOML file.

use crate::{cert_cmd, keys, settings};
use anyhow::{Context, Result};
use bids_protocols::{Idc, Policy};
use clap::Args;
use libp2p::Multiaddr;
use serde::Deserialize;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Args, Debug)]
pub struct NodeArgs {
    /// TOML file with any of the settings below (flags win over it, BIDS_… variables in between).
    #[arg(long)]
    config: Option<PathBuf>,
    /// This node's keypair file (`bids key gen`); its peer id is the node's identity.
    #[arg(long)]
    key: Option<PathBuf>,
    /// The IDC (data center) this host is in, e.g. B; hosts share chunks only within it.
    #[arg(long)]
    idc: Option<String>,
    /// GIS address ending in /p2p/<peer id>, as `bids gis` prints it,
    /// e.g. /ip4/10.0.0.1/tcp/7000/p2p/12D3KooW…. Repeat it once per replica of a GIS Raft
    /// group (in a config file: comma-separated): the node uses one and moves on to the
    /// next when it stops answering.
    #[arg(long)]
    gis: Vec<String>,
    /// Chunk store directory (images, their chunk bitmaps, the control socket); one node
    /// per store.
    #[arg(long)]
    store: Option<PathBuf>,
    /// Listen address(es), comma-separated (default /ip4/0.0.0.0/tcp/0).
    #[arg(long)]
    listen: Option<String>,
    /// Bridgehead certificate (makes this host a bridgehead candidate of its IDC). SIGHUP
    /// reloads it (a renewed certificate takes effect without a restart).
    #[arg(long)]
    cert: Option<PathBuf>,
    /// Warn this many days before the bridgehead certificate expires (default 14).
    #[arg(long)]
    cert_warn_days: Option<u64>,
    /// Peer id of the admin (`bids key peer-id admin.key`). The admin's key signs bridgehead
    /// certificates: this node trusts a bridgehead of another IDC (and its own --cert) only if
    /// the admin signed it, and obeys only commands the admin signed (sent from the console
    /// through the GIS). Every node, GIS and console of one deployment uses the same one.
    #[arg(long)]
    admin_peer: Option<String>,
    /// bids (default: the IDC rule, only bridgeheads cross the WAN) or baseline (any host
    /// dials any host; for the evaluation only). Must match the GIS's.
    #[arg(long)]
    policy: Option<String>,
    /// Upload limit in bytes/s (0 = unlimited).
    #[arg(long)]
    upload_bps: Option<u64>,
    /// Download limit in bytes/s (0 = unlimited).
    #[arg(long)]
    download_bps: Option<u64>,
    /// Chunk requests kept in flight over the WAN: enough for this many milliseconds at the
    /// rate chunks arrive over it (default 300; 0 = only the per-peer limit). Fewer chunks
    /// in flight land sooner, so the IDC's hosts can trade them sooner.
    #[arg(long)]
    wan_window_ms: Option<u64>,
    /// Re-hash the held chunks in the background at this many MB/s (bit rot found is
    /// marked missing and withdrawn); off by default (0).
    #[arg(long, value_name = "MBYTES_PER_S")]
    scrub_rate: Option<f64>,
    /// How long a peer that served corrupt chunks stays banned, node-wide (default 3600).
    #[arg(long)]
    ban_secs: Option<u64>,
    /// Serve chunks without re-hashing them as they are read (saves the CPU of one SHA-256
    /// per chunk sent; a chunk rotted at rest then reaches the receivers, which check it,
    /// ban this node and fetch it elsewhere). Off by default: each chunk is re-hashed and
    /// one found bad is withdrawn.
    #[arg(long)]
    no_verify_reads: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics, with /healthz and /readyz beside
    /// them (IP:PORT, e.g. 127.0.0.1:9100; off by default).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
}

#[derive(Deserialize, Debug, Default)]
struct NodeSettings {
    key: Option<PathBuf>,
    idc: Option<String>,
    gis: Option<String>,
    store: Option<PathBuf>,
    listen: Option<String>,
    cert: Option<PathBuf>,
    cert_warn_days: Option<u64>,
    admin_peer: Option<String>,
    policy: Option<String>,
    heartbeat_secs: Option<u64>,
    upload_bps: Option<u64>,
    download_bps: Option<u64>,
    wan_window_ms: Option<u64>,
    external_addr: Option<String>,
    scrub_rate: Option<f64>,
    ban_secs: Option<u64>,
    verify_reads: Option<bool>,
    metrics: Option<String>,
}

/// The `gis` setting: one address, or one per replica of a GIS Raft group (`--gis` given
/// several times, or comma-separated in a file or `BIDS_GIS`). Returns the first and the
/// others.
fn gis_replicas(setting: &str) -> Result<(Multiaddr, Vec<Multiaddr>)> {
    let mut all: Vec<Multiaddr> = setting
        .split(',')
        .filter(|g| !g.trim().is_empty())
        .map(settings::gis_addr)
        .collect::<Result<_>>()?;
    if all.is_empty() {
        anyhow::bail!("--gis is empty: give the GIS's address (once per replica)");
    }
    let first = all.remove(0);
    Ok((first, all))
}

fn s(p: &Option<PathBuf>) -> Option<String> {
    p.as_ref().map(|p| p.display().to_string())
}

pub async fn run_node(a: NodeArgs) -> Result<()> {
    let st: NodeSettings = settings::load(
        a.config.as_deref(),
        &[
            ("key", s(&a.key)),
            ("idc", a.idc.clone()),
            ("gis", (!a.gis.is_empty()).then(|| a.gis.join(","))),
            ("store", s(&a.store)),
            ("listen", a.listen.clone()),
            ("cert", s(&a.cert)),
            ("cert_warn_days", a.cert_warn_days.map(|v| v.to_string())),
            ("admin_peer", a.admin_peer.clone()),
            ("policy", a.policy.clone()),
            ("upload_bps", a.upload_bps.map(|v| v.to_string())),
            ("download_bps", a.download_bps.map(|v| v.to_string())),
            ("wan_window_ms", a.wan_window_ms.map(|v| v.to_string())),
            ("scrub_rate", a.scrub_rate.map(|v| v.to_string())),
            ("ban_secs", a.ban_secs.map(|v| v.to_string())),
            (
                "verify_reads",
                a.no_verify_reads.then(|| "false".to_string()),
            ),
            ("metrics", a.metrics.clone()),
        ],
    )?;
    let key = keys::load(&settings::required(st.key, "key", "--key")?)?;
    let idc = Idc::new(&settings::required(st.idc, "idc", "--idc")?).map_err(anyhow::Error::msg)?;
    let (gis, replicas) = gis_replicas(&settings::required(st.gis, "gis", "--gis")?)?;
    let store = settings::required(st.store, "store", "--store")?;
    let admin = keys::parse_peer(&settings::required(
        st.admin_peer,
        "admin_peer",
        "--admin-peer",
    )?)?;
    let mut cfg = bids_node::NodeConfig::new(key, idc, gis, store, admin);
    cfg.gis_replicas = replicas;
    if let Some(l) = st.listen {
        cfg.listen = l
            .split(',')
            .map(|x| {
                x.trim()
                    .parse::<Multiaddr>()
                    .with_context(|| format!("listen address {x:?}"))
            })
            .collect::<Result<_>>()?;
    }
    if let Some(e) = st.external_addr {
        cfg.external_addrs = vec![e.parse().context("external_addr is not a multiaddr")?];
    }
    if let Some(c) = &st.cert {
        cfg.cert = Some(cert_cmd::read_cert(c)?);
    }
    if let Some(d) = st.cert_warn_days {
        cfg.cert_warn = settings::days(d);
    }
    if let Some(p) = st.policy {
        cfg.policy = p.parse::<Policy>().map_err(anyhow::Error::msg)?;
    }
    if let Some(h) = st.heartbeat_secs {
        cfg.heartbeat = Duration::from_secs(h.max(1));
    }
    if let Some(r) = st.scrub_rate {
        if !(r.is_finite() && r >= 0.0) {
            anyhow::bail!("--scrub-rate must be a number of MB/s, 0 or more (got {r})");
        }
        cfg.scrub_bps = (r * 1e6) as u64;
    }
    if let Some(b) = st.ban_secs {
        cfg.ban_duration = Duration::from_secs(b);
    }
    if let Some(v) = st.verify_reads {
        cfg.verify_reads = v;
    }
    cfg.upload_bps = st.upload_bps.unwrap_or(0);
    cfg.download_bps = st.download_bps.unwrap_or(0);
    if let Some(w) = st.wan_window_ms {
        cfg.scheduler.wan_window = Duration::from_millis(w);
    }
    cfg.metrics = metrics_addr(st.metrics.as_deref())?;
    // Listen for SIGHUP before anything can send it: its default action ends the process.
    let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("listening for SIGHUP (certificate reloads)")?;
    crate::limits::raise_open_files("peer connections");
    let (node, task) = bids_node::start(cfg).await?;
    let reload = tokio::spawn(reload_cert_on_sighup(hup, node.clone(), st.cert.clone()));
    for a in node.listen_addrs() {
        crate::output::announce(&a.to_string());
    }
    announce_metrics(node.metrics_addr());
    let control = tokio::spawn(bids_node::control::serve(node.clone()));
    tokio::select! {
        _ = shutdown_signal() => {
            node.shutdown().await;
        }
        r = control => {
            node.shutdown().await;
            r.context("control socket task")?.context("control socket")?;
        }
        _ = task => {}
    }
    reload.abort();
    Ok(())
}

/// On every SIGHUP, reads the `--cert` file again and hands it to the node, which checks it
/// and registers again: a renewed certificate takes effect without a restart. A file that
/// is missing or refused leaves the node as it is, with the reason in the log.
async fn reload_cert_on_sighup(
    mut hup: tokio::signal::unix::Signal,
    node: bids_node::NodeHandle,
    cert: Option<PathBuf>,
) {
    while hup.recv().await.is_some() {
        let Some(path) = &cert else {
            tracing::warn!(
                "SIGHUP: this node runs without --cert; there is no certificate to reload"
            );
            continue;
        };
        let c = match cert_cmd::read_cert(path) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "SIGHUP: the certificate was not reloaded; the node keeps its current one"
                );
                continue;
            }
        };
        let (serial, not_after) = (c.body.serial, c.body.not_after);
        match node.set_cert(Some(c)).await {
            Ok(role) => {
                tracing::info!(file = %path.display(), serial, not_after, %role, "SIGHUP: bridgehead certificate reloaded")
            }
            Err(e) => {
                tracing::warn!(file = %path.display(), serial, error = %e, "SIGHUP: the reloaded certificate was refused")
            }
        }
    }
}

#[derive(Args, Debug)]
pub struct GisArgs {
    /// TOML file with any of the settings below (flags win over it, BIDS_… variables in between).
    #[arg(long)]
    config: Option<PathBuf>,
    /// The GIS's keypair file (`bids key gen`); its peer id ends the address nodes use.
    #[arg(long)]
    key: Option<PathBuf>,
    /// Listen address, e.g. /ip4/127.0.0.1/tcp/7000.
    #[arg(long)]
    listen: Option<String>,
    /// Data directory (sled).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Peer id of the admin (`bids key peer-id admin.key`). The GIS lists a bridgehead only if
    /// its certificate is signed by this admin, and accepts console requests (host lists,
    /// commands, revocations) only from this identity.
    #[arg(long)]
    admin_peer: Option<String>,
    /// bids (default: per-IDC host lists, bridgeheads across the WAN) or baseline (holders
    /// from every IDC; for the evaluation only).
    #[arg(long)]
    policy: Option<String>,
    /// Heartbeats per second the GIS asks of all its hosts together (default 2000): beyond
    /// 2000 × a fifth of the heartbeat timeout live hosts, the heartbeat interval and the
    /// timeout grow with their number (20,000 hosts: every 10 s, dead after 50 s). 0: the
    /// interval stays a fifth of the timeout.
    #[arg(long)]
    heartbeats_per_s: Option<u32>,
    /// Serve Prometheus metrics at http://ADDR/metrics, with /healthz and /readyz beside
    /// them (IP:PORT, e.g. 127.0.0.1:9100; off by default).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
    #[command(flatten)]
    cluster: crate::gis_cluster::ClusterArgs,
}

#[derive(Deserialize, Debug, Default)]
struct GisSettings {
    key: Option<PathBuf>,
    listen: Option<String>,
    data: Option<PathBuf>,
    admin_peer: Option<String>,
    policy: Option<String>,
    heartbeat_timeout_secs: Option<u64>,
    heartbeats_per_s: Option<u32>,
    metrics: Option<String>,
    /// Replica settings (`[cluster]`); see `crate::gis_cluster`.
    cluster: Option<crate::gis_cluster::ClusterSettings>,
}

pub async fn run_gis(a: GisArgs) -> Result<()> {
    let st: GisSettings = settings::load(
        a.config.as_deref(),
        &[
            ("key", s(&a.key)),
            ("listen", a.listen.clone()),
            ("data", s(&a.data)),
            ("admin_peer", a.admin_peer.clone()),
            ("policy", a.policy.clone()),
            (
                "heartbeats_per_s",
                a.heartbeats_per_s.map(|n| n.to_string()),
            ),
            ("metrics", a.metrics.clone()),
        ],
    )?;
    let keypair = keys::load(&settings::required(st.key, "key", "--key")?)?;
    let listen: Multiaddr = st
        .listen
        .unwrap_or_else(|| "/ip4/127.0.0.1/tcp/7000".into())
        .parse()
        .context("--listen is not a multiaddr")?;
    let data_dir = settings::required(st.data, "data", "--data")?;
    let admin_peer = keys::parse_peer(&settings::required(
        st.admin_peer,
        "admin_peer",
        "--admin-peer",
    )?)?;
    let policy = st
        .policy
        .as_deref()
        .unwrap_or("bids")
        .parse::<Policy>()
        .map_err(anyhow::Error::msg)?;
    let cfg = bids_gis::server::GisConfig {
        keypair,
        listen,
        data_dir,
        admin_peer,
        policy,
        heartbeat_timeout: Duration::from_secs(st.heartbeat_timeout_secs.unwrap_or(10)),
        heartbeats_per_s: st
            .heartbeats_per_s
            .unwrap_or(bids_gis::index::DEFAULT_HEARTBEATS_PER_S),
        metrics: metrics_addr(st.metrics.as_deref())?,
        cluster: crate::gis_cluster::config(&a.cluster, st.cluster)?,
    };
    crate::limits::raise_open_files("connected hosts (one connection each)");
    let gis = bids_gis::server::spawn(cfg).await?;
    for a in gis.listen_addrs() {
        crate::output::announce(&a.to_string());
    }
    announce_metrics(gis.metrics_addr());
    shutdown_signal().await;
    gis.shutdown().await?;
    Ok(())
}

/// The `--metrics` address, if one is set.
pub fn metrics_addr(v: Option<&str>) -> Result<Option<std::net::SocketAddr>> {
    v.map(|v| {
        v.parse()
            .with_context(|| format!("--metrics {v:?} must be IP:PORT, e.g. 127.0.0.1:9100"))
    })
    .transpose()
}

/// Says where the metrics are (stderr: stdout carries the daemon's addresses).
pub fn announce_metrics(addr: Option<std::net::SocketAddr>) {
    if let Some(a) = addr {
        eprintln!("metrics: http://{a}/metrics (health: /healthz, readiness: /readyz)");
    }
}

/// Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(t) => t,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gis_is_one_address_or_one_per_replica() {
        let a = "/ip4/10.0.0.1/tcp/7000/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN";
        let b = "/ip4/10.0.0.2/tcp/7000/p2p/12D3KooWLRPJAA5o6P7ULCGK4kgFfXszR54LdCZzFbDPfZDnQdGq";
        let (first, others) = gis_replicas(a).unwrap();
        assert_eq!((first.to_string(), others.len()), (a.to_string(), 0));
        let (first, others) = gis_replicas(&format!("{a},{b}")).unwrap();
        assert_eq!(first.to_string(), a);
        assert_eq!(
            others.iter().map(|m| m.to_string()).collect::<Vec<_>>(),
            vec![b]
        );
        assert!(gis_replicas(",").is_err());
        // Each replica's address needs its peer id.
        assert!(gis_replicas(&format!("{a},/ip4/10.0.0.2/tcp/7000")).is_err());
    }

    fn deploy(file: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy")
            .join(file)
    }

    /// Every key of the example files in deploy/ is a setting the daemon reads (a misspelt
    /// key would be ignored silently), and the required ones are there.
    #[test]
    fn deploy_examples_hold_known_settings() {
        let keys = |file: &str| -> Vec<String> {
            let text = std::fs::read_to_string(deploy(file)).unwrap();
            let t: toml::Table = toml::from_str(&text).unwrap();
            t.keys().cloned().collect()
        };
        for file in ["node.toml", "bridgehead.toml"] {
            let st: NodeSettings = settings::load(Some(&deploy(file)), &[]).unwrap();
            let NodeSettings {
                key,
                idc,
                gis,
                store,
                listen,
                cert,
                cert_warn_days,
                admin_peer,
                policy,
                heartbeat_secs,
                upload_bps,
                download_bps,
                wan_window_ms,
                scrub_rate,
                ban_secs,
                verify_reads,
                metrics,
                external_addr,
            } = st;
            let set = [
                ("key", key.is_some()),
                ("idc", idc.is_some()),
                ("gis", gis.is_some()),
                ("store", store.is_some()),
                ("listen", listen.is_some()),
                ("cert", cert.is_some()),
                ("cert_warn_days", cert_warn_days.is_some()),
                ("admin_peer", admin_peer.is_some()),
                ("policy", policy.is_some()),
                ("heartbeat_secs", heartbeat_secs.is_some()),
                ("upload_bps", upload_bps.is_some()),
                ("download_bps", download_bps.is_some()),
                ("wan_window_ms", wan_window_ms.is_some()),
                ("scrub_rate", scrub_rate.is_some()),
                ("ban_secs", ban_secs.is_some()),
                ("verify_reads", verify_reads.is_some()),
                ("metrics", metrics.is_some()),
                ("external_addr", external_addr.is_some()),
            ];
            for k in keys(file) {
                assert!(
                    set.iter().any(|(n, s)| *n == k && *s),
                    "{file}: `{k}` is no node setting"
                );
            }
            for required in ["key", "idc", "gis", "store", "admin_peer"] {
                assert!(
                    set.iter().any(|(n, s)| *n == required && *s),
                    "{file}: {required}"
                );
            }
        }
        let st: GisSettings = settings::load(Some(&deploy("gis.toml")), &[]).unwrap();
        let GisSettings {
            key,
            listen,
            data,
            admin_peer,
            policy,
            heartbeat_timeout_secs,
            heartbeats_per_s,
            metrics,
            cluster,
        } = st;
        let set = [
            ("key", key.is_some()),
            ("listen", listen.is_some()),
            ("data", data.is_some()),
            ("admin_peer", admin_peer.is_some()),
            ("policy", policy.is_some()),
            ("heartbeat_timeout_secs", heartbeat_timeout_secs.is_some()),
            ("heartbeats_per_s", heartbeats_per_s.is_some()),
            ("metrics", metrics.is_some()),
            ("cluster", cluster.is_some()),
        ];
        for k in keys("gis.toml") {
            assert!(
                set.iter().any(|(n, s)| *n == k && *s),
                "gis.toml: `{k}` is no GIS setting"
            );
        }
    }
}
