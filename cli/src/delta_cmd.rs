//! `bids delta build|apply|info` and `bids image publish`: delta files between two versions
//! of an image, from local files or from images of a store (`NAME:VERSION` with `--store`),
//! and publishing a new version with its delta. Progress and timings go to stderr, results
//! to stdout; the work itself is `bids_delta`'s and `bids_node::versions`'.

use crate::image_cmd::human;
use crate::progress::Progress;
use anyhow::{bail, Context, Result};
use bids_delta::{BuildOptions, DeltaHeader};
use bids_node::control::{self, ControlReply, ControlRequest};
use bids_node::store::Store;
use bids_node::versions::{self, NewVersion};
use bids_protocols::ImageRef;
use clap::{Args, Subcommand};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Subcommand, Debug)]
pub enum DeltaCmd {
    /// Build the delta file that turns FROM into TO.
    Build {
        /// The old version: a file, or NAME:VERSION of an image in --store.
        #[arg(long)]
        from: String,
        /// The new version: a file, or NAME:VERSION of an image in --store.
        #[arg(long)]
        to: String,
        /// The delta file to write.
        #[arg(long)]
        out: PathBuf,
        /// Store whose images NAME:VERSION arguments name.
        #[arg(long)]
        store: Option<PathBuf>,
        /// Block size the old version is indexed by (power of two, 512 B to 1 MiB).
        #[arg(long, value_parser = crate::parse_size)]
        block_size: Option<u64>,
        /// zstd level of the literal data (1..=22): higher is smaller and slower
        /// (default 18).
        #[arg(long)]
        level: Option<i32>,
        /// Threads compressing the literal data in parallel (default 2).
        #[arg(long)]
        threads: Option<usize>,
        /// Skip the byte-wise search for content shifted by less than a block.
        #[arg(long)]
        no_rolling: bool,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Rebuild the new version from BASE and a delta (checked with SHA-256 both ways).
    Apply {
        /// The old version: a file, or NAME:VERSION of an image in --store.
        #[arg(long)]
        base: String,
        /// The delta: a file, or NAME:VERSION of a delta object in --store.
        #[arg(long)]
        delta: String,
        /// The file to write the new version to.
        #[arg(long)]
        out: PathBuf,
        /// Store whose objects NAME:VERSION arguments name.
        #[arg(long)]
        store: Option<PathBuf>,
    },
    /// Show a delta file's header, after checking the whole file.
    Info {
        /// The delta file.
        delta: PathBuf,
        /// Read the header only, without checking the file's checksum.
        #[arg(long)]
        quick: bool,
        /// Print the header as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `bids image publish`.
#[derive(Args, Debug)]
pub struct PublishArgs {
    /// The new version's image file.
    pub file: PathBuf,
    /// The image's name (that of the version it derives from).
    #[arg(long)]
    pub name: String,
    /// The new version, e.g. 12.2.
    #[arg(long)]
    pub version: String,
    /// The version it derives from, held in the store: NAME:VERSION (or VERSION of NAME).
    #[arg(long)]
    pub from: String,
    /// Chunk store directory holding the old version (a running node's, if any).
    #[arg(long)]
    pub store: PathBuf,
    /// Chunk size (default: the old version's).
    #[arg(long, value_parser = crate::parse_size)]
    pub chunk_size: Option<u64>,
}

/// Where the bytes of an argument live.
struct Input {
    path: PathBuf,
    label: String,
}

/// A file path as is; otherwise `NAME:VERSION` of a complete object of `store`, read from
/// its image file (through the node's control socket when a node owns the store).
async fn resolve_input(spec: &str, store: Option<&Path>, what: &str) -> Result<Input> {
    let p = Path::new(spec);
    if p.exists() {
        return Ok(Input {
            path: p.to_path_buf(),
            label: spec.to_string(),
        });
    }
    let Some(store) = store else {
        bail!("{what} {spec:?} is not a file; to name an image NAME:VERSION, give --store DIR");
    };
    let r: ImageRef = spec.parse().map_err(|e: String| {
        anyhow::anyhow!("{what} {spec:?} is neither a file nor an image NAME:VERSION: {e}")
    })?;
    let path = if control::node_running(store).await {
        let mut found = None;
        let mut err = None;
        control::request(store, &ControlRequest::Status, |reply| match reply {
            ControlReply::Status(s) => {
                found = s
                    .images
                    .into_iter()
                    .find(|i| i.image == r)
                    .map(|i| (i.id, i.complete))
            }
            ControlReply::Error(e) => err = Some(e),
            _ => {}
        })
        .await
        .with_context(|| format!("talking to the node on {}", store.display()))?;
        if let Some(e) = err {
            bail!("{e}");
        }
        match found {
            Some((id, true)) => versions::image_file(store, &id),
            Some((_, false)) => bail!(
                "{r} is not complete in store {}; fetch it first",
                store.display()
            ),
            None => bail!("{r} is not in store {}", store.display()),
        }
    } else {
        let s = Store::open(store).with_context(|| format!("opening store {}", store.display()))?;
        let id = s
            .resolve(&r)
            .with_context(|| format!("{r} is not in store {}", store.display()))?;
        if !s.status(&id).is_some_and(|st| st.complete) {
            bail!(
                "{r} is not complete in store {}; fetch it first",
                store.display()
            );
        }
        s.image_path(&id)
    };
    Ok(Input {
        path,
        label: r.to_string(),
    })
}

fn rate(bytes: u64, secs: f64) -> String {
    if secs <= 0.0 {
        return "-".into();
    }
    format!("{}/s", human((bytes as f64 / secs) as u64))
}

fn header_json(h: &DeltaHeader) -> serde_json::Value {
    serde_json::json!({
        "version": h.version,
        "block_size": h.block_size,
        "from_size": h.from_size,
        "to_size": h.to_size,
        "from_sha256": h.from_hex(),
        "to_sha256": h.to_hex(),
        "body_len": h.body_len,
        "file_len": h.file_len(),
    })
}

pub async fn run(cmd: DeltaCmd) -> Result<()> {
    match cmd {
        DeltaCmd::Build {
            from,
            to,
            out,
            store,
            block_size,
            level,
            threads,
            no_rolling,
            json,
        } => {
            let a = resolve_input(&from, store.as_deref(), "--from").await?;
            let b = resolve_input(&to, store.as_deref(), "--to").await?;
            let mut opts = BuildOptions::default();
            if let Some(bs) = block_size {
                opts.block_size = usize::try_from(bs).context("--block-size is too large")?;
            }
            if let Some(l) = level {
                opts.level = l;
            }
            if let Some(t) = threads {
                opts.threads = t;
            }
            opts.rolling = !no_rolling;
            bids_delta::keep_large_buffers_out_of_malloc_arenas();
            eprintln!("building the delta {} → {} …", a.label, b.label);
            let st =
                tokio::task::block_in_place(|| bids_delta::build(&a.path, &b.path, &out, &opts))
                    .with_context(|| format!("building the delta {} → {}", a.label, b.label))?;
            let secs = st.elapsed.as_secs_f64();
            eprintln!(
                "built in {secs:.2} s ({} of the new version): {} same offset, {} moved ({} of them repeating the new version's own bytes), {} zero, {} literal stored in {}",
                rate(st.to_size, secs),
                human(st.same_offset_bytes),
                human(st.moved_bytes),
                human(st.own_bytes),
                human(st.zero_bytes),
                human(st.literal_bytes),
                human(st.literal_stored_bytes)
            );
            if json {
                outln!(
                    "{}",
                    serde_json::json!({
                        "out": out.display().to_string(),
                        "from_size": st.from_size,
                        "to_size": st.to_size,
                        "delta_size": st.delta_size,
                        "same_offset_bytes": st.same_offset_bytes,
                        "moved_bytes": st.moved_bytes,
                        "own_bytes": st.own_bytes,
                        "zero_bytes": st.zero_bytes,
                        "literal_bytes": st.literal_bytes,
                        "literal_stored_bytes": st.literal_stored_bytes,
                        "referenced_frames": st.referenced_frames,
                        "reference_bytes": st.reference_bytes,
                        "output_reference_bytes": st.output_reference_bytes,
                        "ops": st.ops,
                        "elapsed_ms": st.elapsed.as_millis() as u64,
                    })
                );
            } else {
                let pct = if st.to_size == 0 {
                    0.0
                } else {
                    100.0 * st.delta_size as f64 / st.to_size as f64
                };
                outln!(
                    "{} {} bytes ({pct:.2} % of the new version's {} bytes)",
                    out.display(),
                    st.delta_size,
                    st.to_size
                );
            }
            Ok(())
        }
        DeltaCmd::Apply {
            base,
            delta,
            out,
            store,
        } => {
            let a = resolve_input(&base, store.as_deref(), "--base").await?;
            let d = resolve_input(&delta, store.as_deref(), "--delta").await?;
            eprintln!("applying {} to {} …", d.label, a.label);
            let st = tokio::task::block_in_place(|| bids_delta::apply(&a.path, &d.path, &out))
                .with_context(|| format!("applying {} to {}", d.label, a.label))?;
            let secs = st.elapsed.as_secs_f64();
            eprintln!(
                "applied and verified in {secs:.2} s ({}): {} copied, {} zero, {} literal",
                rate(st.to_size, secs),
                human(st.copied_bytes),
                human(st.zero_bytes),
                human(st.literal_bytes)
            );
            outln!("{} {} bytes", out.display(), st.to_size);
            Ok(())
        }
        DeltaCmd::Info { delta, quick, json } => {
            let t0 = Instant::now();
            let h = if quick {
                bids_delta::read_header(&delta)
            } else {
                tokio::task::block_in_place(|| bids_delta::verify(&delta))
            }
            .with_context(|| format!("reading {}", delta.display()))?;
            if !quick {
                eprintln!("checksum verified in {:.2} s", t0.elapsed().as_secs_f64());
            }
            if json {
                outln!("{}", serde_json::to_string_pretty(&header_json(&h))?);
            } else {
                outln!("delta format {} (block size {})", h.version, h.block_size);
                outln!("from   {} bytes  sha256 {}", h.from_size, h.from_hex());
                outln!("to     {} bytes  sha256 {}", h.to_size, h.to_hex());
                outln!(
                    "size   {} bytes ({} body){}",
                    h.file_len(),
                    h.body_len,
                    if quick { "" } else { ", checksum ok" }
                );
            }
            Ok(())
        }
    }
}

fn print_new_version(nv: &NewVersion) {
    eprintln!(
        "imported {} in {} ms, delta built in {} ms: {} copied from {}, {} literal",
        nv.image,
        nv.import_ms,
        nv.build_ms,
        human(nv.copied_bytes),
        nv.from,
        human(nv.literal_bytes)
    );
    outln!(
        "{} {} {} bytes, {} chunks",
        nv.image,
        nv.id,
        nv.size,
        nv.chunks
    );
    outln!(
        "{} {} {} bytes (delta {} → {})",
        nv.delta,
        nv.delta_id,
        nv.delta_size,
        nv.from,
        nv.image
    );
}

/// `bids image publish FILE --name N --version V --from [N:]OLD --store DIR`.
pub async fn publish(a: PublishArgs) -> Result<()> {
    let image = ImageRef::new(&a.name, &a.version).map_err(anyhow::Error::msg)?;
    let from: ImageRef = if a.from.contains(':') {
        a.from.parse().map_err(anyhow::Error::msg)?
    } else {
        ImageRef::new(&a.name, &a.from).map_err(anyhow::Error::msg)?
    };
    let chunk_size =
        u32::try_from(a.chunk_size.unwrap_or(0)).context("--chunk-size is too large")?;
    let file =
        std::fs::canonicalize(&a.file).with_context(|| format!("reading {}", a.file.display()))?;
    if control::node_running(&a.store).await {
        eprintln!("importing {image} and building the delta from {from} on the running node …");
        let req = ControlRequest::Publish {
            file,
            image,
            from,
            chunk_size,
        };
        let mut out = None;
        let mut err = None;
        control::request(&a.store, &req, |r| match r {
            ControlReply::Published(nv) => out = Some(nv),
            ControlReply::Error(e) => err = Some(e),
            _ => {}
        })
        .await
        .with_context(|| format!("talking to the node on {}", a.store.display()))?;
        if let Some(e) = err {
            bail!("{e}");
        }
        let nv = out.context("the node ended the connection without an answer")?;
        print_new_version(&nv);
        eprintln!("both published to the GIS by the running node");
        return Ok(());
    }
    let store =
        Store::open(&a.store).with_context(|| format!("opening store {}", a.store.display()))?;
    // The store measures the source and refuses what is no image (see `image add`).
    let mut p = Progress::new(&format!("importing {image}"), 0, true);
    // This process's main job is now the delta build.
    bids_delta::keep_large_buffers_out_of_malloc_arenas();
    let nv = tokio::task::block_in_place(|| {
        versions::import_version(
            &store,
            &file,
            &image,
            &from,
            chunk_size,
            &BuildOptions::default(),
            &mut |d, t| p.set(d, t),
        )
    })?;
    p.finish();
    print_new_version(&nv);
    eprintln!(
        "no node runs on store {}: both objects are stored, and a node started on it publishes them",
        a.store.display()
    );
    Ok(())
}
