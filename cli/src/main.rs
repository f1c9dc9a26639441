//! `bids`: the one binary of BIDS. It parses arguments, loads configuration and wires the
//! crates together; the logic lives in the library crates.

mod bench_cmd;
mod cert_cmd;
mod delta_cmd;
mod demo_cmd;
mod image_cmd;
mod keys;
mod limits;
mod lookup_cmd;
mod node_cmd;
mod progress;
mod rmc_cmd;
mod settings;
mod testnet_cmd;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "bids",
    version,
    about = "Bridgehead-employed VM image distribution"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Keypairs: every process has an ed25519 identity.
    #[command(subcommand)]
    Key(KeyCmd),
    /// Bridgehead certificates (admin).
    #[command(subcommand)]
    Cert(cert_cmd::CertCmd),
    /// Run the General Index Server.
    Gis(node_cmd::GisArgs),
    /// Run a host daemon (a bridgehead when given a certificate).
    Node(node_cmd::NodeArgs),
    /// Images in a store: add, ls, export, status, fetch, rm.
    #[command(subcommand)]
    Image(image_cmd::ImageCmd),
    /// Delta files between two versions of an image: build, apply, info.
    #[command(subcommand)]
    Delta(delta_cmd::DeltaCmd),
    /// Ask the GIS for an image's hierarchical host list (JSON).
    Lookup(lookup_cmd::LookupArgs),
    /// Run a local multi-IDC testnet: distribute an image under BIDS and Baseline, print the figures.
    Demo(demo_cmd::DemoArgs),
    /// Run the Remote Management Console (web UI and JSON API) against a GIS, as the admin.
    Rmc(rmc_cmd::RmcArgs),
    /// Benchmarks: loopback transfer against raw TCP and bare libp2p; a node's peak memory.
    #[command(subcommand)]
    Bench(bench_cmd::BenchCmd),
    /// Helpers of the netns testnet scripts: WAN link emulator, evaluation plots.
    #[command(subcommand, hide = true)]
    Testnet(testnet_cmd::TestnetCmd),
}

#[derive(Subcommand, Debug)]
enum KeyCmd {
    /// Generate a keypair file (mode 0600) and print its peer id.
    Gen {
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the peer id of a keypair file.
    PeerId { file: PathBuf },
}

/// Parses a size with an optional KiB/MiB/GiB (or K/M/G) suffix.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" | "kb" => 1 << 10,
        "m" | "mib" | "mb" => 1 << 20,
        "g" | "gib" | "gb" => 1 << 30,
        other => {
            return Err(format!(
                "unknown size unit {other:?} in {s:?} (use KiB, MiB or GiB)"
            ))
        }
    };
    let v: f64 = num.parse().map_err(|_| format!("{s:?} is not a size"))?;
    if !(v >= 0.0 && v.is_finite()) {
        return Err(format!("{s:?} is not a size"));
    }
    Ok((v * mult as f64).round() as u64)
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(
            "warn,bids=info,bids_node=info,bids_gis=info,bids_rmc=info",
        )
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn main() {
    init_logging();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(cli)) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Key(KeyCmd::Gen { out }) => {
            let k = keys::generate(&out)?;
            println!("{}", k.public().to_peer_id());
            Ok(())
        }
        Cmd::Key(KeyCmd::PeerId { file }) => {
            println!("{}", keys::load(&file)?.public().to_peer_id());
            Ok(())
        }
        Cmd::Cert(c) => cert_cmd::run(c),
        Cmd::Gis(a) => node_cmd::run_gis(a).await,
        Cmd::Node(a) => node_cmd::run_node(a).await,
        Cmd::Image(c) => image_cmd::run(c).await,
        Cmd::Delta(c) => delta_cmd::run(c).await,
        Cmd::Lookup(a) => lookup_cmd::run(a).await,
        Cmd::Demo(a) => demo_cmd::run(a).await,
        Cmd::Bench(c) => bench_cmd::run(c).await,
        Cmd::Rmc(a) => rmc_cmd::run(a).await,
        Cmd::Testnet(c) => testnet_cmd::run(c).await,
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("1.5 GiB"), Ok(3 << 29));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("2k"), Ok(2048));
        assert!(parse_size("3 parsecs").is_err());
        assert!(parse_size("").is_err());
    }
}
