//! `bids demo`: the README's main job — a local multi-IDC testnet that distributes an image
//! under BIDS and Baseline and prints what happened.

use anyhow::{Context, Result};
use bids_testnet::demo::{self, DemoOptions, Mode};
use clap::Args;

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Number of IDCs; the first holds the image.
    #[arg(long, default_value_t = 3)]
    idcs: usize,
    /// Ordinary hosts per receiving IDC (each also has one certified bridgehead).
    #[arg(long, default_value_t = 4)]
    hosts: usize,
    /// Image size (KiB/MiB/GiB suffixes).
    #[arg(long, default_value = "64MiB", value_parser = crate::parse_size)]
    size: u64,
    /// WAN uplink rate of each IDC, Mbit/s.
    #[arg(long, default_value_t = 100.0)]
    wan_mbit: f64,
    /// LAN link rate of each host, Mbit/s.
    #[arg(long, default_value_t = 1000.0)]
    lan_mbit: f64,
    /// One-way delay of each IDC's WAN uplink, ms.
    #[arg(long, default_value_t = 20)]
    delay_ms: u64,
    /// Chunk size of the image; the default fits a chunk response into one yamux stream
    /// window, so each chunk crosses the WAN in one round trip.
    #[arg(long, default_value = "252KiB", value_parser = crate::parse_size)]
    chunk_size: u64,
    /// bids, baseline or both.
    #[arg(long, default_value = "both")]
    mode: String,
    /// A sparse, compressible image (zero runs and text) instead of random bytes.
    #[arg(long)]
    sparse: bool,
    /// Distribute this file (e.g. a real raw VM disk image) instead of a generated one.
    #[arg(long, conflicts_with_all = ["size", "sparse"])]
    image: Option<std::path::PathBuf>,
    /// Seed of the generated image's content.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// Attach the web console (IP:PORT; port 0 takes a free one, printed when it starts) to
    /// the last mode's testnet; log in as admin with BIDS_RMC_PASSWORD, or with the token
    /// printed at start.
    #[arg(long)]
    rmc: Option<std::net::SocketAddr>,
    /// Keep the last mode's testnet (and console) running after the run, until Ctrl-C.
    #[arg(long, requires = "rmc")]
    hold: bool,
    /// With --hold: register this many more idle hosts (no images, spread over the IDCs)
    /// with the GIS before holding, to see the console with thousands of hosts.
    #[arg(long, default_value_t = 0, requires = "hold")]
    extra_hosts: usize,
    /// The console flags bridgehead certificates that end within this many days (default
    /// 14; the demo's certificates last 90 days, so more than 90 shows the warning).
    #[arg(long, requires = "rmc")]
    cert_warn_days: Option<u64>,
}

/// `log_file`: where `--log-file` keeps the full log, told to the reader at the end.
pub async fn run(a: DemoArgs, log_file: Option<&std::path::Path>) -> Result<()> {
    let modes = match a.mode.as_str() {
        "bids" => vec![Mode::Bids],
        "baseline" => vec![Mode::Baseline],
        "both" => vec![Mode::Bids, Mode::Baseline],
        other => anyhow::bail!("--mode must be bids, baseline or both, not {other:?}"),
    };
    let o = DemoOptions {
        idcs: a.idcs,
        hosts: a.hosts,
        size: a.size,
        wan_mbit: a.wan_mbit,
        lan_mbit: a.lan_mbit,
        delay_ms: a.delay_ms,
        chunk_size: u32::try_from(a.chunk_size).context("--chunk-size too large")?,
        modes,
        seed: a.seed,
        sparse: a.sparse,
        image: a.image,
    };
    let quiet = a.json;
    let mut log = |s: &str| {
        if !quiet {
            eprintln!("{s}");
        }
    };
    let console = a.rmc.map(|addr| {
        crate::rmc_cmd::DemoConsole::new(addr, a.hold, a.extra_hosts, a.cert_warn_days)
    });
    let hook = console.as_ref().map(|c| c as &dyn demo::DemoHook);
    let report = demo::run_with(&o, &mut log, hook).await?;
    if a.json {
        outln!("{}", serde_json::to_string_pretty(&demo::to_json(&report))?);
    } else {
        out!("{}", demo::render(&report));
    }
    if !a.json {
        match log_file {
            Some(f) => eprintln!("full log: {}", f.display()),
            None => eprintln!(
                "(the log shows warnings only: -v or RUST_LOG=info for all of it, --log-file FILE to keep it)"
            ),
        }
    }
    Ok(())
}
