//! `bids`: the one binary of BIDS. It parses arguments, loads configuration and wires the
//! crates together; the logic lives in the library crates.

/// `println!` for results on stdout; ends the process quietly when stdout is closed
/// (`bids image ls | head -1`) instead of panicking, see `output`.
macro_rules! outln {
    () => { $crate::output::write(format_args!("\n")) };
    ($($t:tt)*) => { $crate::output::write(format_args!("{}\n", format_args!($($t)*))) };
}

/// `print!` with the same rule as `outln!`.
macro_rules! out {
    ($($t:tt)*) => { $crate::output::write(format_args!($($t)*)) };
}

mod bench_cmd;
mod cert_cmd;
mod delta_cmd;
mod demo_cmd;
mod gis_cluster;
mod image_cmd;
mod keys;
mod limits;
mod lookup_cmd;
mod node_cmd;
mod output;
mod progress;
mod rmc_cmd;
mod settings;
mod sim_cmd;
mod testnet_cmd;

use anyhow::{Context, Result};
use clap::{CommandFactory, Parser, Subcommand};
use std::io::IsTerminal;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "bids",
    version,
    about = "Bridgehead-employed VM image distribution"
)]
struct Cli {
    /// More log output: -v shows what happens (info), -vv debugging detail. RUST_LOG, when
    /// set, decides instead (e.g. RUST_LOG=bids_node=debug).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Also write the full log (info, or what -v/RUST_LOG ask for) to this file, appending,
    /// whatever stderr shows.
    #[arg(long, global = true, value_name = "FILE")]
    log_file: Option<PathBuf>,
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
    /// Simulate a distribution over a modelled network with the node's real logic and the
    /// real GIS index (thousands of hosts, in seconds); --validate compares with netns runs.
    Sim(Box<sim_cmd::SimArgs>),
    /// Helpers of the netns testnet scripts: WAN link emulator, evaluation plots.
    #[command(subcommand, hide = true)]
    Testnet(testnet_cmd::TestnetCmd),
    /// Print a shell completion script: `bids completions bash > /etc/bash_completion.d/bids`.
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the manual pages (bids.1, bids-node.1, …) into a directory.
    Man {
        /// Directory to write the pages into (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum KeyCmd {
    /// Generate a keypair file (mode 0600) and print its peer id.
    Gen {
        /// The key file to create; an existing file is never overwritten.
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the peer id of a keypair file.
    PeerId {
        /// The key file (from `bids key gen`).
        file: PathBuf,
    },
    /// Generate the key the replicas of one GIS Raft group share (64 hex digits, mode
    /// 0600); give the same file to every replica with `bids gis --cluster-key FILE`.
    Cluster {
        /// The key file to create; an existing file is never overwritten.
        #[arg(long)]
        out: PathBuf,
    },
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

/// Daemons log what they do (info) by default; one-shot commands, the demo included, only
/// warnings, so their results are not lost among log lines.
fn is_daemon(cmd: &Cmd) -> bool {
    matches!(
        cmd,
        Cmd::Gis(_) | Cmd::Node(_) | Cmd::Rmc(_) | Cmd::Testnet(_)
    )
}

/// The log filter: RUST_LOG if set, else by kind of command and -v.
fn log_filter(daemon: bool, verbose: u8) -> String {
    if let Ok(f) = std::env::var("RUST_LOG") {
        if !f.trim().is_empty() {
            return f;
        }
    }
    let ours = match (daemon, verbose) {
        (false, 0) => return "warn".into(),
        (true, 0) | (false, 1) => "info",
        (_, 1) | (_, 2) => "debug",
        _ => return "debug".into(),
    };
    format!("warn,bids={ours},bids_node={ours},bids_gis={ours},bids_rmc={ours},bids_testnet={ours},bids_delta={ours}")
}

/// Logs to stderr (ANSI colours only on a terminal, and not with NO_COLOR) and, with
/// `--log-file`, the full log to that file too.
fn init_logging(daemon: bool, verbose: u8, log_file: Option<&std::path::Path>) -> Result<()> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{EnvFilter, Layer};
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let filter = log_filter(daemon, verbose);
    let stderr = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .with_filter(EnvFilter::new(&filter));
    let file = match log_file {
        Some(path) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening the log file {}", path.display()))?;
            // The file keeps at least what a daemon logs, whatever stderr shows.
            let full = if verbose == 0 && std::env::var_os("RUST_LOG").is_none() {
                log_filter(true, 0)
            } else {
                filter.clone()
            };
            Some(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .with_writer(std::sync::Mutex::new(f))
                    .with_filter(EnvFilter::new(full)),
            )
        }
        None => None,
    };
    let _ = tracing_subscriber::registry()
        .with(stderr)
        .with(file)
        .try_init();
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = init_logging(is_daemon(&cli.cmd), cli.verbose, cli.log_file.as_deref()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
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
            outln!("{}", k.public().to_peer_id());
            Ok(())
        }
        Cmd::Key(KeyCmd::PeerId { file }) => {
            outln!("{}", keys::load(&file)?.public().to_peer_id());
            Ok(())
        }
        Cmd::Key(KeyCmd::Cluster { out }) => {
            keys::generate_cluster(&out)?;
            outln!("{}", out.display());
            Ok(())
        }
        Cmd::Cert(c) => cert_cmd::run(c),
        Cmd::Gis(a) => node_cmd::run_gis(a).await,
        Cmd::Node(a) => node_cmd::run_node(a).await,
        Cmd::Image(c) => image_cmd::run(c).await,
        Cmd::Delta(c) => delta_cmd::run(c).await,
        Cmd::Lookup(a) => lookup_cmd::run(a).await,
        Cmd::Demo(a) => demo_cmd::run(a, cli.log_file.as_deref()).await,
        Cmd::Bench(c) => bench_cmd::run(c).await,
        Cmd::Rmc(a) => rmc_cmd::run(a).await,
        Cmd::Testnet(c) => testnet_cmd::run(c).await,
        Cmd::Sim(a) => sim_cmd::run(*a),
        Cmd::Completions { shell } => {
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "bids", &mut buf);
            output::write_bytes(&buf);
            Ok(())
        }
        Cmd::Man { out } => {
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            clap_mangen::generate_to(Cli::command(), &out)
                .with_context(|| format!("writing the manual pages into {}", out.display()))?;
            outln!("manual pages written to {}", out.display());
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;
    use clap::CommandFactory;

    /// Every argument of every subcommand, hidden ones included, has a help line (the
    /// generated --help, completions and manual pages all show it).
    #[test]
    fn every_argument_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            let path = format!("{path} {}", cmd.get_name());
            if cmd.get_about().is_none() && cmd.get_name() != "help" {
                missing.push(format!("{path} (the command itself)"));
            }
            for a in cmd.get_arguments() {
                if a.get_help().is_none() && a.get_long_help().is_none() {
                    missing.push(format!("{path} {}", a.get_id()));
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &path, missing);
            }
        }
        let mut cmd = super::Cli::command();
        cmd.build();
        let mut missing = Vec::new();
        walk(&cmd, "", &mut missing);
        assert!(missing.is_empty(), "arguments without help: {missing:#?}");
    }

    #[test]
    fn the_demo_is_quiet_and_daemons_are_not() {
        // RUST_LOG would decide instead; the tests of this crate run without it.
        if std::env::var_os("RUST_LOG").is_some() {
            return;
        }
        assert_eq!(super::log_filter(false, 0), "warn");
        assert!(super::log_filter(false, 1).contains("bids_node=info"));
        assert!(super::log_filter(true, 0).contains("bids_node=info"));
        assert!(super::log_filter(true, 1).contains("bids_node=debug"));
    }

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
