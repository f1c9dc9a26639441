//! `bids`: the one binary of BIDS. It parses arguments, loads configuration and wires the
//! crates together; the logic lives in the library crates.

mod cert_cmd;
mod keys;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(name = "bids", version, about = "Bridgehead-employed VM image distribution")]
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

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,bids=info,bids_node=info,bids_gis=info,bids_rmc=info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

fn main() {
    init_logging();
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
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
    }
}
