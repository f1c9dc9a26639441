//! `bids rmc`: the Remote Management Console, configured from flags, `BIDS_…` variables and an
//! optional TOML file. The password comes from `BIDS_RMC_PASSWORD` or `rmc_password` in the
//! file; without one, a fresh one-time token is made at each start and printed once (the
//! first successful login spends it).

use crate::{keys, node_cmd, settings};
use anyhow::{Context, Result};
use clap::Args;
use libp2p::Multiaddr;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Args, Debug)]
pub struct RmcArgs {
    /// TOML file with any of the settings below plus `rmc_password` (flags win over it,
    /// BIDS_… variables in between).
    #[arg(long)]
    config: Option<PathBuf>,
    /// GIS address ending in /p2p/<peer id>, as `bids gis` prints it. Repeat it once per
    /// replica of a GIS Raft group: the console uses the first that answers and moves to
    /// another when it stops answering. Replaces `gis` of the config file.
    #[arg(long)]
    gis: Vec<String>,
    /// The admin keypair (the one whose peer id the GIS got as --admin-peer): the console
    /// speaks to the GIS as the admin and signs commands and certificates with it.
    #[arg(long)]
    admin_key: Option<PathBuf>,
    /// Web server address, IP:PORT (default 127.0.0.1:8080); put TLS in front of it when it
    /// listens beyond loopback.
    #[arg(long)]
    listen: Option<String>,
    /// Flag bridgehead certificates that end within this many days (default 14, as the
    /// nodes' --cert-warn-days).
    #[arg(long)]
    cert_warn_days: Option<u64>,
    /// Serve Prometheus metrics at http://ADDR/metrics, with /healthz and /readyz beside
    /// them (IP:PORT, e.g. 127.0.0.1:9100; off by default).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
}

/// `gis` in the config file: one address, or a list of the replicas' addresses.
#[derive(Deserialize, Debug)]
#[serde(untagged)]
enum GisSetting {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, Debug, Default)]
struct RmcSettings {
    gis: Option<GisSetting>,
    admin_key: Option<PathBuf>,
    listen: Option<String>,
    rmc_password: Option<String>,
    rmc_sample_ms: Option<u64>,
    rmc_cert_days: Option<u64>,
    cert_warn_days: Option<u64>,
    metrics: Option<String>,
}

/// The password to require, and whether it was made up here (then it must be shown).
pub fn password_or_token(configured: Option<String>) -> (String, bool) {
    match configured.filter(|p| !p.is_empty()) {
        Some(p) => (p, false),
        None => (bids_rmc::auth::random_token(), true),
    }
}

pub async fn run(a: RmcArgs) -> Result<()> {
    let st: RmcSettings = settings::load(
        a.config.as_deref(),
        &[
            (
                "admin_key",
                a.admin_key.as_ref().map(|p| p.display().to_string()),
            ),
            ("listen", a.listen.clone()),
            ("cert_warn_days", a.cert_warn_days.map(|d| d.to_string())),
            ("metrics", a.metrics.clone()),
        ],
    )?;
    let gis: Vec<String> = match (a.gis.is_empty(), st.gis) {
        (false, _) => a.gis.clone(),
        (true, Some(GisSetting::One(g))) => vec![g],
        (true, Some(GisSetting::Many(gs))) => gs,
        (true, None) => Vec::new(),
    };
    if gis.is_empty() {
        settings::required(None::<String>, "gis", "--gis")?;
    }
    let gis: Vec<Multiaddr> = gis
        .iter()
        .map(|g| settings::gis_addr(g))
        .collect::<Result<_>>()?;
    let gis_list = gis
        .iter()
        .map(|g| g.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let admin = keys::load(&settings::required(
        st.admin_key,
        "admin_key",
        "--admin-key",
    )?)?;
    let listen: SocketAddr = st
        .listen
        .as_deref()
        .unwrap_or("127.0.0.1:8080")
        .parse()
        .context("--listen must be IP:PORT, e.g. 127.0.0.1:8080")?;
    let (password, generated) = password_or_token(st.rmc_password);
    let mut cfg = bids_rmc::RmcConfig::new(admin.clone(), password.clone());
    cfg.auth.single_use = generated;
    cfg.listen = listen;
    cfg.metrics = node_cmd::metrics_addr(st.metrics.as_deref())?;
    if let Some(ms) = st.rmc_sample_ms {
        cfg.sample_interval = Duration::from_millis(ms.max(100));
    }
    if let Some(d) = st.rmc_cert_days {
        cfg.cert_validity = settings::days(d.max(1));
    }
    if let Some(d) = st.cert_warn_days {
        cfg.cert_warn = settings::days(d);
    }
    let link = bids_rmc::gis_link::connect_any(gis, admin)
        .await
        .with_context(|| format!("connecting to the GIS at {gis_list} as the admin"))?;
    let rmc = bids_rmc::start(cfg, link).await?;
    crate::output::announce(&announce(rmc.local_addr(), &password, generated));
    node_cmd::announce_metrics(rmc.metrics_addr());
    node_cmd::shutdown_signal().await;
    rmc.shutdown().await?;
    Ok(())
}

/// Tells the operator where the console is and how to log in.
pub fn announce(addr: SocketAddr, password: &str, generated: bool) -> String {
    let how = if generated {
        format!("log in as admin with this one-time token (made for this start, refused once a login with it succeeded; set BIDS_RMC_PASSWORD to choose a password): {password}")
    } else {
        "log in as admin with the configured password".to_string()
    };
    format!("console: http://{addr}/\n{how}")
}

/// `bids demo --rmc ADDR [--hold] [--extra-hosts N]`: a console attached to the demo's
/// testnet, as its admin.
pub struct DemoConsole {
    /// Where to listen; port 0 takes a free port, announced once bound.
    addr: SocketAddr,
    /// Where the console listens once started.
    bound: std::sync::Mutex<Option<SocketAddr>>,
    hold: bool,
    /// Certificates ending within this long are flagged.
    cert_warn: Option<Duration>,
    /// Idle hosts to register with the GIS before holding.
    extra_hosts: usize,
}

impl DemoConsole {
    pub fn new(
        addr: SocketAddr,
        hold: bool,
        extra_hosts: usize,
        cert_warn_days: Option<u64>,
    ) -> Self {
        DemoConsole {
            addr,
            bound: std::sync::Mutex::new(None),
            hold,
            cert_warn: cert_warn_days.map(settings::days),
            extra_hosts,
        }
    }
}

impl bids_testnet::demo::DemoHook for DemoConsole {
    fn attach<'a>(
        &'a self,
        c: &'a bids_testnet::cluster::Cluster,
    ) -> futures::future::BoxFuture<'a, Result<Box<dyn std::any::Any + Send>>> {
        Box::pin(async move {
            let configured = std::env::var("BIDS_RMC_PASSWORD").ok();
            let (password, generated) = password_or_token(configured);
            let mut cfg = bids_rmc::RmcConfig::new(c.admin.clone(), password.clone());
            cfg.auth.single_use = generated;
            cfg.listen = self.addr;
            if let Some(w) = self.cert_warn {
                cfg.cert_warn = w;
            }
            let link = bids_rmc::gis_link::connect(c.gis_addr.clone(), c.admin.clone())
                .await
                .context("connecting the console to the demo's GIS")?;
            let rmc = bids_rmc::start(cfg, link).await?;
            if let Ok(mut b) = self.bound.lock() {
                *b = Some(rmc.local_addr());
            }
            // stderr: the demo's stdout may carry its JSON report.
            eprintln!("{}", announce(rmc.local_addr(), &password, generated));
            // Dropping the handle when the cluster stops stops the console too.
            Ok(Box::new(rmc) as Box<dyn std::any::Any + Send>)
        })
    }

    fn hold<'a>(
        &'a self,
        c: &'a bids_testnet::cluster::Cluster,
        _r: &'a bids_testnet::demo::RunResult,
    ) -> futures::future::BoxFuture<'a, ()> {
        Box::pin(async move {
            if self.hold && self.extra_hosts > 0 {
                let idcs: Vec<bids_protocols::Idc> = c
                    .spec
                    .idcs
                    .iter()
                    .filter_map(|i| bids_protocols::Idc::new(&i.name).ok())
                    .collect();
                let started = std::time::Instant::now();
                match bids_testnet::crowd::register_idle_hosts(
                    &c.gis_addr,
                    &idcs,
                    c.spec.policy,
                    self.extra_hosts,
                )
                .await
                {
                    Ok(ps) => eprintln!(
                        "registered {} idle hosts with the GIS in {:.1} s",
                        ps.len(),
                        started.elapsed().as_secs_f64()
                    ),
                    Err(e) => eprintln!("registering the idle hosts failed: {e:#}"),
                }
            }
            if self.hold {
                let addr = self.bound.lock().ok().and_then(|b| *b).unwrap_or(self.addr);
                eprintln!(
                    "holding the testnet with the console at http://{addr}/ ; Ctrl-C to stop"
                );
                node_cmd::shutdown_signal().await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// deploy/rmc.toml holds only settings the console reads.
    #[test]
    fn deploy_example_holds_known_settings() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/rmc.toml");
        let st: RmcSettings = settings::load(Some(&path), &[]).unwrap();
        let RmcSettings {
            gis,
            admin_key,
            listen,
            rmc_password,
            rmc_sample_ms,
            rmc_cert_days,
            cert_warn_days,
            metrics,
        } = st;
        let set = [
            ("gis", gis.is_some()),
            ("admin_key", admin_key.is_some()),
            ("listen", listen.is_some()),
            ("rmc_password", rmc_password.is_some()),
            ("rmc_sample_ms", rmc_sample_ms.is_some()),
            ("rmc_cert_days", rmc_cert_days.is_some()),
            ("cert_warn_days", cert_warn_days.is_some()),
            ("metrics", metrics.is_some()),
        ];
        let t: toml::Table = toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        for k in t.keys() {
            assert!(
                set.iter().any(|(n, s)| n == k && *s),
                "rmc.toml: `{k}` is no console setting"
            );
        }
    }

    #[test]
    fn gis_may_be_one_address_or_a_list() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("rmc.toml");
        std::fs::write(
            &f,
            "gis = [\"/ip4/127.0.0.1/tcp/1\", \"/ip4/127.0.0.1/tcp/2\"]\n",
        )
        .unwrap();
        let st: RmcSettings = settings::load(Some(&f), &[]).unwrap();
        assert!(
            matches!(st.gis, Some(GisSetting::Many(ref g)) if g.len() == 2),
            "{st:?}"
        );
        std::fs::write(&f, "gis = \"/ip4/127.0.0.1/tcp/1\"\n").unwrap();
        let st: RmcSettings = settings::load(Some(&f), &[]).unwrap();
        assert!(matches!(st.gis, Some(GisSetting::One(_))), "{st:?}");
    }

    #[test]
    fn configured_password_wins_else_a_fresh_token() {
        assert_eq!(
            password_or_token(Some("pw".into())),
            ("pw".to_string(), false)
        );
        let (t1, g1) = password_or_token(None);
        let (t2, _) = password_or_token(Some(String::new()));
        assert!(g1);
        assert_eq!(t1.len(), 64);
        assert_ne!(t1, t2);
    }
}
