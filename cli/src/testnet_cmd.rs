//! `bids testnet …` (hidden): helpers of the netns testnet scripts in `testnet/` — the WAN
//! link emulator that runs in the router namespace and the plots of the evaluation.

use anyhow::{bail, Context, Result};
use bids_testnet::{evalplot, linkemu, tcpref};
use clap::Subcommand;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Subcommand, Debug)]
pub enum TestnetCmd {
    /// Emulate WAN links between TUN devices: rate and one-way delay per link, drop-tail
    /// queue. Run it inside the router namespace; prints `ready` once every device exists,
    /// and the links' counters (JSON, one line each) when stopped.
    Linkemu {
        /// ns=NETNS,dev=DEV,peer=DEV,mbit=RATE,delay_ms=MS[,queue_kib=KIB]: DEV is created in
        /// NETNS (the IDC side), peer DEV in this process's namespace (the router side).
        #[arg(long = "link", required = true)]
        links: Vec<String>,
    },
    /// Draw Fig. 6/7/8 (PNG) from the runs.csv of testnet/eval.sh.
    EvalPlot {
        /// The runs.csv written by testnet/eval.sh.
        #[arg(long)]
        csv: PathBuf,
        /// Directory to write the PNG figures into.
        #[arg(long)]
        out: PathBuf,
        /// TrueType font for the text (default: DejaVu Sans from the usual places).
        #[arg(long)]
        font: Option<PathBuf>,
    },
    /// The raw-TCP reference of an evaluation run: plain TCP transfers over the same path as
    /// a fetch, with no encryption, hashing or disk. `--serve` answers each connection with
    /// the number of bytes it asks for; `--fetch` pulls `--bytes` split evenly over the
    /// servers given, all at once, and prints the time taken (JSON).
    TcpRef {
        /// Serve on this address until stopped (prints `ready` once listening).
        #[arg(long, conflicts_with = "fetch")]
        serve: Option<SocketAddr>,
        /// A server to pull from (repeat for several; the bytes are split evenly).
        #[arg(long, requires = "bytes")]
        fetch: Vec<SocketAddr>,
        /// Bytes to pull in all (with --fetch).
        #[arg(long)]
        bytes: Option<u64>,
    },
}

pub async fn run(cmd: TestnetCmd) -> Result<()> {
    match cmd {
        TestnetCmd::Linkemu { links } => {
            let specs = links
                .iter()
                .map(|l| linkemu::LinkSpec::parse(l))
                .collect::<Result<Vec<_>, _>>()?;
            let (stats, tasks) = linkemu::start(&specs)?;
            crate::output::announce("ready");
            std::io::stdout().flush()?;
            let mut tasks = futures::future::select_all(tasks);
            let failed = tokio::select! {
                _ = crate::node_cmd::shutdown_signal() => None,
                (r, _, _) = &mut tasks => Some(r),
            };
            for s in &stats {
                outln!("{s}");
            }
            match failed {
                None => Ok(()),
                Some(Ok(Ok(()))) => bail!("a link pump stopped"),
                Some(Ok(Err(e))) => Err(e).context("link emulator"),
                Some(Err(e)) => Err(e).context("link pump task"),
            }
        }
        TestnetCmd::TcpRef {
            serve,
            fetch,
            bytes,
        } => {
            if let Some(addr) = serve {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on {addr}"))?;
                crate::output::announce("ready");
                std::io::stdout().flush()?;
                return tokio::select! {
                    _ = crate::node_cmd::shutdown_signal() => Ok(()),
                    r = tcpref::serve(listener) => r,
                };
            }
            let Some(bytes) = bytes else {
                bail!("give --serve ADDR, or --fetch ADDR... with --bytes N");
            };
            let t = tcpref::fetch(&fetch, bytes).await?;
            outln!("{}", serde_json::to_string(&t)?);
            Ok(())
        }
        TestnetCmd::EvalPlot { csv, out, font } => {
            let runs = evalplot::read_runs(&csv)?;
            if runs.is_empty() {
                bail!("{} has no runs", csv.display());
            }
            evalplot::load_font(font.as_deref())?;
            for f in evalplot::plot_all(&runs, &out)? {
                outln!("{}", f.display());
            }
            Ok(())
        }
    }
}
