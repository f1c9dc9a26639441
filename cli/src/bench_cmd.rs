//! `bids bench`: whole-system figures, each against a reference measured in the same run.
//! The measuring lives in `bids_testnet::bench` and `bids_gis::loadgen`; this file parses
//! flags and prints.

use anyhow::{Context, Result};
use bids_testnet::bench::{self, LoopbackOptions, RssOptions};
use clap::{Args, Subcommand};

#[derive(Subcommand, Debug)]
pub enum BenchCmd {
    /// Chunk transfer on unshaped loopback: raw TCP, a bare libp2p request-response exchange,
    /// that exchange with each blob checked against its SHA-256, and a BIDS fetch (hashing and
    /// disk included), with the ratios; then the fetch's storage work alone (read, SHA-256,
    /// write), to tell its cost from the network's.
    Loopback(LoopbackArgs),
    /// Peak RSS of a `bids node` process fetching images of the given sizes.
    Rss(RssArgs),
    /// Load on a GIS over its real protocol: virtual hosts (one identity and one tcp + noise +
    /// yamux connection each, from their own 127.x.y.z address) register, publish holdings,
    /// heartbeat at the interval the GIS announces and look images up at the given rates.
    /// Without --gis it starts a `bids gis` child and reads its CPU time and peak RSS.
    Gis(GisArgs),
}

#[derive(Args, Debug)]
pub struct GisArgs {
    /// Virtual hosts, each its own identity and connection.
    #[arg(long, default_value_t = 1000)]
    hosts: usize,
    /// IDCs the hosts are spread over.
    #[arg(long, default_value_t = 10)]
    idcs: usize,
    /// Images (synthetic manifests) the hosts hold and look up.
    #[arg(long, default_value_t = 100)]
    images: usize,
    /// Total lookups per second; several (comma-separated) run one after another, for a
    /// latency-against-load curve. 0: heartbeats only.
    #[arg(long, value_delimiter = ',', default_value = "1000")]
    lookups_per_s: Vec<u64>,
    /// Seconds each lookup rate runs.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// The GIS to load (repeatable: hosts are spread over the addresses). Default: start one.
    #[arg(long)]
    gis: Vec<String>,
    /// Without --gis: start this many `bids gis` replicas as one Raft group (on 127.0.0.1)
    /// instead of one GIS, and spread the hosts over them. Their CPU and memory are summed.
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// Without --gis: cap each GIS process started at this many cores (a cgroup CPU quota,
    /// at least 0.1), as if each ran on a machine of its own. With it, one GIS and a group of
    /// replicas compare on a machine with fewer cores than they would have. Needs a writable
    /// cgroup cpu controller (root).
    #[arg(long)]
    cores_per_gis: Option<f64>,
    /// Images each host holds.
    #[arg(long, default_value_t = 5)]
    holdings_per_host: usize,
    /// Chunks of each synthetic image (1 MiB each; the manifest is ~60 bytes a chunk and
    /// travels in every lookup answer).
    #[arg(long, default_value_t = 64)]
    chunks: u32,
    /// Heartbeat interval in seconds (default: what the GIS announces, as nodes do).
    #[arg(long)]
    heartbeat_secs: Option<f64>,
    /// Hosts connecting and registering at once.
    #[arg(long, default_value_t = 256)]
    register_concurrency: usize,
    /// Certified bridgeheads per IDC (with --gis, only if --admin-key is given).
    #[arg(long, default_value_t = 2)]
    bridgeheads_per_idc: usize,
    /// The admin key the GIS under test trusts, to certify bridgeheads.
    #[arg(long)]
    admin_key: Option<std::path::PathBuf>,
    /// Seed of the virtual hosts' choices (which images they hold, what they look up).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Send each request on a stream of its own (the protocol nodes fall back to with a GIS
    /// that has no sessions) instead of one GIS session per host, as nodes do: to compare.
    #[arg(long)]
    per_request_streams: bool,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct LoopbackArgs {
    /// Bytes per transfer, the image size for BIDS (KiB/MiB/GiB suffixes).
    #[arg(long, default_value = "1GiB", value_parser = crate::parse_size)]
    size: u64,
    /// Requests in flight in the libp2p reference (default: what BIDS keeps in flight to one
    /// LAN peer).
    #[arg(long)]
    depth: Option<usize>,
    /// Seed of the random image.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct RssArgs {
    /// Image sizes, one fetch by a fresh process each (repeat or separate with commas).
    #[arg(long = "size", value_delimiter = ',', default_value = "256MiB,1GiB", value_parser = crate::parse_size)]
    sizes: Vec<u64>,
    /// Seed of the random images.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

pub async fn run(c: BenchCmd) -> Result<()> {
    match c {
        BenchCmd::Loopback(a) => loopback(a).await,
        BenchCmd::Rss(a) => rss(a).await,
        BenchCmd::Gis(a) => gis(a).await,
    }
}

async fn gis(a: GisArgs) -> Result<()> {
    let gis = a
        .gis
        .iter()
        .map(|s| {
            s.parse::<libp2p::Multiaddr>()
                .with_context(|| format!("--gis {s:?} is not a multiaddr"))
        })
        .collect::<Result<Vec<_>>>()?;
    if !(a.duration > 0.0 && a.duration.is_finite()) {
        anyhow::bail!("--duration must be a positive number of seconds");
    }
    let admin = match &a.admin_key {
        Some(p) => Some(crate::keys::load(p)?),
        None => None,
    };
    let o = bids_gis::loadgen::LoadOptions {
        spawn_program: if gis.is_empty() {
            Some(std::env::current_exe().context("finding the bids executable")?)
        } else {
            None
        },
        gis,
        replicas: a.replicas,
        cores_per_gis: a.cores_per_gis,
        hosts: a.hosts,
        idcs: a.idcs,
        images: a.images,
        holdings_per_host: a.holdings_per_host,
        chunks_per_image: a.chunks,
        lookup_rates: a.lookups_per_s,
        duration: std::time::Duration::from_secs_f64(a.duration),
        heartbeat: a
            .heartbeat_secs
            .filter(|h| *h > 0.0 && h.is_finite())
            .map(std::time::Duration::from_secs_f64),
        register_concurrency: a.register_concurrency,
        bridgeheads_per_idc: a.bridgeheads_per_idc,
        admin,
        seed: a.seed,
        per_request_streams: a.per_request_streams,
    };
    let quiet = a.json;
    let mut log = |s: &str| {
        if !quiet {
            eprintln!("{s}");
        }
    };
    let r = bids_gis::loadgen::run(&o, &mut log).await?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        print!("{}", bids_gis::loadgen::render(&r));
    }
    Ok(())
}

async fn loopback(a: LoopbackArgs) -> Result<()> {
    let mut o = LoopbackOptions {
        size: a.size,
        seed: a.seed,
        ..Default::default()
    };
    if let Some(d) = a.depth {
        o.depth = d;
    }
    let quiet = a.json;
    let mut log = |s: &str| {
        if !quiet {
            eprintln!("{s}");
        }
    };
    let r = bench::loopback(&o, &mut log).await?;
    if a.json {
        outln!("{}", serde_json::to_string(&bench::loopback_json(&r))?);
    } else {
        out!("{}", bench::render_loopback(&r));
    }
    Ok(())
}

async fn rss(a: RssArgs) -> Result<()> {
    let program = std::env::current_exe().context("finding the bids executable")?;
    let o = RssOptions {
        sizes: a.sizes,
        program,
        seed: a.seed,
    };
    let quiet = a.json;
    let mut log = |s: &str| {
        if !quiet {
            eprintln!("{s}");
        }
    };
    let samples = bench::rss(&o, &mut log).await?;
    if a.json {
        outln!("{}", serde_json::to_string(&bench::rss_json(&samples))?);
    } else {
        out!("{}", bench::render_rss(&samples));
    }
    Ok(())
}
