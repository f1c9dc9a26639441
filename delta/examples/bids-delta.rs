//! Stand-alone front end of the delta crate (`bids-delta build|apply|info`), used by
//! `delta/bench/real-images.sh` when the `bids` binary has no `delta` subcommand.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "bids-delta",
    about = "Build and apply BIDS delta files between image versions"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Write a delta that turns FROM into TO.
    Build {
        from: PathBuf,
        to: PathBuf,
        out: PathBuf,
        /// zstd level of literal frames (default: the library's).
        #[arg(long, default_value_t = bids_delta::DEFAULT_LEVEL)]
        level: i32,
        /// Threads compressing literal frames.
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// Uncompressed size of a literal frame.
        #[arg(long, default_value_t = bids_delta::BuildOptions::default().frame_size)]
        frame_size: usize,
        /// Block size A is indexed by.
        #[arg(long, default_value_t = 4096)]
        block_size: usize,
        /// Skip the byte-wise rolling search for shifted content.
        #[arg(long)]
        no_rolling: bool,
        /// Longest literal run searched byte-wise.
        #[arg(long, default_value_t = 4 << 20)]
        rolling_max_run: usize,
        /// Most bytes of FROM a literal frame is compressed against (0: none).
        #[arg(long, default_value_t = bids_delta::BuildOptions::default().reference_max)]
        reference_max: usize,
    },
    /// Rebuild the target from BASE and DELTA into OUT.
    Apply {
        base: PathBuf,
        delta: PathBuf,
        out: PathBuf,
        /// Do not fsync the output before renaming it into place.
        #[arg(long)]
        no_sync: bool,
    },
    /// Print a delta's header (and check its trailer).
    Info { delta: PathBuf },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Build {
            from,
            to,
            out,
            level,
            block_size,
            no_rolling,
            rolling_max_run,
            threads,
            frame_size,
            reference_max,
        } => {
            let opts = bids_delta::BuildOptions {
                level,
                threads,
                frame_size,
                block_size,
                rolling: !no_rolling,
                rolling_max_run,
                reference_max,
            };
            bids_delta::keep_large_buffers_out_of_malloc_arenas();
            let st = bids_delta::build(&from, &to, &out, &opts)
                .with_context(|| format!("building {} -> {}", from.display(), to.display()))?;
            println!("{st:#?}");
        }
        Cmd::Apply {
            base,
            delta,
            out,
            no_sync,
        } => {
            let opts = bids_delta::ApplyOptions { sync: !no_sync };
            let st = bids_delta::apply_with(&base, &delta, &out, &opts)
                .with_context(|| format!("applying {} to {}", delta.display(), base.display()))?;
            println!("{st:#?}");
        }
        Cmd::Info { delta } => {
            let h = bids_delta::verify(&delta)
                .with_context(|| format!("checking {}", delta.display()))?;
            println!("version     {}", h.version);
            println!("block size  {}", h.block_size);
            println!("from        {} ({} bytes)", h.from_hex(), h.from_size);
            println!("to          {} ({} bytes)", h.to_hex(), h.to_size);
            println!("body        {} bytes", h.body_len);
        }
    }
    Ok(())
}
