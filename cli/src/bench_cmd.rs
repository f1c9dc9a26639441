//! `bids bench`: whole-system figures, each against a reference measured in the same run.
//! The measuring lives in `bids_testnet::bench`; this file parses flags and prints.

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
    }
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
