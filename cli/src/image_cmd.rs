//! `bids image …`: import, list, export, status, fetch and remove images. When a node runs on
//! the store, the commands go through its control socket (the node owns the store); otherwise
//! they open the store directly.

use crate::progress::Progress;
use anyhow::{bail, Context, Result};
use bids_node::control::{self, ControlReply, ControlRequest};
use bids_node::store::Store;
use bids_protocols::{ImageRef, ObjectKind, DEFAULT_CHUNK_SIZE};
use clap::Subcommand;
use std::path::{Path, PathBuf};

#[derive(Subcommand, Debug)]
pub enum ImageCmd {
    /// Import a file as image NAME:VERSION.
    Add {
        /// The image file (a raw disk image, or a block device).
        file: PathBuf,
        /// The image's name, e.g. debian.
        #[arg(long)]
        name: String,
        /// The image's version, e.g. 12.1.
        #[arg(long)]
        version: String,
        /// Chunk store directory (the one a `bids node --store` runs on, if any).
        #[arg(long)]
        store: PathBuf,
        /// Chunk size (bytes, or with KiB/MiB suffix); a multiple of 4 KiB.
        #[arg(long, value_parser = crate::parse_size)]
        chunk_size: Option<u64>,
        /// The version this one derives from (NAME:VERSION).
        #[arg(long)]
        base: Option<String>,
    },
    /// List the images of a store.
    Ls {
        /// Chunk store directory (the one a `bids node --store` runs on, if any).
        #[arg(long)]
        store: PathBuf,
        /// Print JSON (image ids in hex; see docs/json.md).
        #[arg(long)]
        json: bool,
    },
    /// Write an image out, bit-exact (sparse where it has zero chunks).
    Export {
        /// The image, NAME:VERSION.
        image: String,
        /// Chunk store directory (the one a `bids node --store` runs on, if any).
        #[arg(long)]
        store: PathBuf,
        /// The file to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Progress and LAN/WAN transfer counters of one image.
    Status {
        /// The image, NAME:VERSION.
        image: String,
        /// Chunk store directory (the one a `bids node --store` runs on, if any).
        #[arg(long)]
        store: PathBuf,
        /// Print JSON (image id in hex; see docs/json.md).
        #[arg(long)]
        json: bool,
    },
    /// Ask the node running on the store to download an image (as delta files applied to
    /// a version it holds, when the GIS finds that moves fewer bytes).
    Fetch {
        /// The image, NAME:VERSION.
        image: String,
        /// Chunk store directory (the one a `bids node --store` runs on, if any).
        #[arg(long)]
        store: PathBuf,
        /// Also export the image to this file when complete.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Import a new version of an image held in the store, build the delta from the old
    /// version and publish both (the delta is stored as NAME:OLD-to-VERSION).
    Publish(crate::delta_cmd::PublishArgs),
    /// Re-hash every chunk of an image in one pass; chunks that no longer match are marked
    /// missing (and withdrawn from the GIS and the IDC by the running node). With --repair
    /// the node then fetches all of them in one download.
    Verify {
        /// The image, NAME:VERSION.
        image: String,
        /// Chunk store directory (the one a `bids node --store` runs on, if any).
        #[arg(long)]
        store: PathBuf,
        /// Fetch the bad chunks again (needs the node running on the store).
        #[arg(long)]
        repair: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove an image from the store (and tell the GIS).
    Rm {
        /// The image, NAME:VERSION.
        image: String,
        /// Chunk store directory (the one a `bids node --store` runs on, if any).
        #[arg(long)]
        store: PathBuf,
    },
}

fn image_ref(s: &str) -> Result<ImageRef> {
    s.parse::<ImageRef>().map_err(anyhow::Error::msg)
}

fn open_store(dir: &Path) -> Result<Store> {
    Store::open(dir).with_context(|| format!("opening store {}", dir.display()))
}

async fn via_node(store: &Path, req: ControlRequest) -> Result<Vec<ControlReply>> {
    let mut out = Vec::new();
    control::request(store, &req, |r| out.push(r))
        .await
        .with_context(|| format!("talking to the node on {}", store.display()))?;
    Ok(out)
}

fn fail_on_error(replies: &[ControlReply]) -> Result<()> {
    for r in replies {
        if let ControlReply::Error(e) = r {
            bail!("{e}");
        }
    }
    Ok(())
}

/// A byte count for people: `512 B`, `1.5 MiB`, … (also used by `bids delta`).
pub(crate) fn human(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

pub async fn run(cmd: ImageCmd) -> Result<()> {
    match cmd {
        ImageCmd::Add {
            file,
            name,
            version,
            store,
            chunk_size,
            base,
        } => {
            let image = ImageRef::new(&name, &version).map_err(anyhow::Error::msg)?;
            let base = base.as_deref().map(image_ref).transpose()?;
            let chunk_size = u32::try_from(chunk_size.unwrap_or(DEFAULT_CHUNK_SIZE as u64))
                .context("--chunk-size is too large")?;
            let file = std::fs::canonicalize(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            if control::node_running(&store).await {
                let replies = via_node(
                    &store,
                    ControlRequest::Add {
                        file,
                        image,
                        chunk_size,
                        base,
                    },
                )
                .await?;
                fail_on_error(&replies)?;
                for r in replies {
                    if let ControlReply::Added {
                        id,
                        image,
                        size,
                        chunks,
                    } = r
                    {
                        outln!("{image} {id} {size} bytes, {chunks} chunks (published by the running node)");
                    }
                }
                return Ok(());
            }
            let s = open_store(&store)?;
            // The store measures the source (a block device's metadata says 0 bytes) and
            // refuses what is no image; the bar learns the size from the first report.
            let mut p = Progress::new(&format!("importing {image}"), 0, true);
            let m = tokio::task::block_in_place(|| {
                s.import(
                    &file,
                    &image,
                    chunk_size,
                    base,
                    ObjectKind::Image,
                    &mut |d, t| p.set(d, t),
                )
            })?;
            p.finish();
            outln!(
                "{} {} {} bytes, {} chunks ({} all-zero)",
                m.image_ref(),
                m.id(),
                m.size,
                m.chunk_count(),
                m.chunk_count() - m.data_chunks()
            );
            Ok(())
        }
        ImageCmd::Ls { store, json } => {
            let rows: Vec<(String, String, String, u64, u32, u32)> =
                if control::node_running(&store).await {
                    let replies = via_node(&store, ControlRequest::Status).await?;
                    fail_on_error(&replies)?;
                    let mut rows = Vec::new();
                    for r in replies {
                        if let ControlReply::Status(s) = r {
                            for i in s.images {
                                rows.push((
                                    i.image.name,
                                    i.image.version,
                                    i.id.to_hex(),
                                    i.size,
                                    i.held,
                                    i.total,
                                ));
                            }
                        }
                    }
                    rows
                } else {
                    open_store(&store)?
                        .list()
                        .into_iter()
                        .map(|i| {
                            (
                                i.image.name,
                                i.image.version,
                                i.id.to_hex(),
                                i.size,
                                i.held,
                                i.total,
                            )
                        })
                        .collect()
                };
            if json {
                let v: Vec<serde_json::Value> = rows
                    .iter()
                    .map(|(n, v, id, size, held, total)| {
                        serde_json::json!({"name": n, "version": v, "id": id, "size": size, "chunks_held": held, "chunks_total": total})
                    })
                    .collect();
                outln!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                outln!(
                    "{:<20} {:<12} {:<16} {:>12} {:>15}",
                    "NAME",
                    "VERSION",
                    "ID",
                    "SIZE",
                    "CHUNKS"
                );
                for (n, v, id, size, held, total) in rows {
                    outln!(
                        "{n:<20} {v:<12} {:<16} {:>12} {:>15}",
                        &id[..12],
                        human(size),
                        format!("{held}/{total}")
                    );
                }
            }
            Ok(())
        }
        ImageCmd::Verify {
            image,
            store,
            repair,
            json,
        } => {
            let image = image_ref(&image)?;
            let report = if control::node_running(&store).await {
                let replies = via_node(&store, ControlRequest::Verify { image, repair }).await?;
                fail_on_error(&replies)?;
                replies
                    .into_iter()
                    .find_map(|r| match r {
                        ControlReply::Verified(r) => Some(*r),
                        _ => None,
                    })
                    .context("the node sent no verification report")?
            } else {
                let s = open_store(&store)?;
                let r = tokio::task::block_in_place(|| bids_node::repair::check(&s, &image))
                    .with_context(|| format!("verifying {image} in store {}", store.display()))?;
                if repair && r.missing > 0 {
                    eprintln!(
                        "no node runs on {}: the {} missing chunk(s) are fetched by `bids image fetch {image}` once one does",
                        store.display(),
                        r.missing
                    );
                }
                r
            };
            if json {
                outln!("{}", serde_json::to_string(&report)?);
            } else {
                let bad = if report.bad.is_empty() {
                    "none bad".to_string()
                } else {
                    let list: Vec<String> = report.bad.iter().map(|i| i.to_string()).collect();
                    format!(
                        "{} bad (chunks {}), marked missing",
                        report.bad.len(),
                        list.join(", ")
                    )
                };
                outln!(
                    "{} {}: {} of {} chunks re-hashed in {:.2} s, {bad}; {} missing",
                    report.image,
                    report.id,
                    report.checked,
                    report.total,
                    report.check_secs,
                    report.missing
                );
                if let (Some(n), Some(secs)) = (report.repaired, report.repair_secs) {
                    outln!("repaired: {n} chunk(s) fetched again in one download ({secs:.2} s)");
                }
            }
            if !repair && !report.bad.is_empty() {
                bail!(
                    "{} chunk(s) of {} were bad; run `bids image verify {} --store {} --repair`",
                    report.bad.len(),
                    report.image,
                    report.image,
                    store.display()
                );
            }
            Ok(())
        }
        ImageCmd::Export { image, store, out } => {
            let image = image_ref(&image)?;
            if control::node_running(&store).await {
                let out = absolute(&out)?;
                fail_on_error(&via_node(&store, ControlRequest::Export { image, out }).await?)?;
                return Ok(());
            }
            let s = open_store(&store)?;
            let whole = s
                .resolve(&image)
                .filter(|id| s.status(id).is_some_and(|st| st.complete));
            let Some(id) = whole else {
                // Not held whole: rebuilt from a held base and its delta files, if any.
                let from =
                    tokio::task::block_in_place(|| bids_node::versions::export(&s, &image, &out))
                        .map_err(|e| match e {
                        bids_node::versions::VersionError::NotHeld { .. } => anyhow::anyhow!(
                            "image {image} is not in store {}: {e}",
                            store.display()
                        ),
                        e => anyhow::Error::new(e).context(format!(
                            "rebuilding {image} from its base and delta files in store {}",
                            store.display()
                        )),
                    })?;
                eprintln!("exported {image}: {from:?}");
                return Ok(());
            };
            let mut p = Progress::new(&format!("exporting {image}"), 0, true);
            tokio::task::block_in_place(|| s.export(&id, &out, &mut |d, t| p.set(d, t)))?;
            p.finish();
            Ok(())
        }
        ImageCmd::Status { image, store, json } => {
            let image = image_ref(&image)?;
            if !control::node_running(&store).await {
                let s = open_store(&store)?;
                let id = s.resolve(&image).with_context(|| {
                    format!("image {image} is not in store {}", store.display())
                })?;
                let st = s.status(&id).context("image vanished")?;
                if json {
                    let v = status_json(
                        &image,
                        &id,
                        st.size,
                        st.chunk_size,
                        (st.held, st.total, st.complete),
                        None,
                    );
                    outln!("{}", serde_json::to_string_pretty(&v)?);
                } else {
                    outln!("{image} {id}\n  chunks: {}/{}{}\n  (no node runs on this store: no transfer counters)", st.held, st.total, if st.complete { " complete" } else { "" });
                }
                return Ok(());
            }
            let replies = via_node(&store, ControlRequest::Status).await?;
            fail_on_error(&replies)?;
            for r in replies {
                if let ControlReply::Status(s) = r {
                    let Some(i) = s.images.iter().find(|i| i.image == image) else {
                        bail!("image {image} is not in store {}", store.display());
                    };
                    if json {
                        let v = status_json(
                            &i.image,
                            &i.id,
                            i.size,
                            i.chunk_size,
                            (i.held, i.total, i.complete),
                            Some((i, &s)),
                        );
                        outln!("{}", serde_json::to_string_pretty(&v)?);
                    } else {
                        let c = &i.counters;
                        outln!("{} {}", i.image, i.id);
                        outln!(
                            "  chunks:   {}/{}{}{}",
                            i.held,
                            i.total,
                            if i.complete { " complete" } else { "" },
                            if i.fetching { " (fetching)" } else { "" }
                        );
                        outln!(
                            "  LAN:      received {} in {} chunks, sent {} in {} chunks",
                            human(c.lan_recv_bytes),
                            c.lan_recv_chunks,
                            human(c.lan_sent_bytes),
                            c.lan_sent_chunks
                        );
                        outln!(
                            "  WAN:      received {} in {} chunks, sent {} in {} chunks",
                            human(c.wan_recv_bytes),
                            c.wan_recv_chunks,
                            human(c.wan_sent_bytes),
                            c.wan_sent_chunks
                        );
                        outln!(
                            "  by peer:  our IDC's bridgeheads: received {}, sent {}; \
                             hosts of our IDC: received {}, sent {}",
                            human(c.bridgehead_recv_bytes),
                            human(c.bridgehead_sent_bytes),
                            human(c.hosts_recv_bytes),
                            human(c.hosts_sent_bytes)
                        );
                        if c.lan_available_ms > 0 {
                            outln!(
                                "  LAN rate while our IDC held chunks we lacked: {:.1} Mbit/s \
                                 over {:.2} s",
                                c.lan_available_recv_bytes as f64 * 8.0
                                    / c.lan_available_ms as f64
                                    / 1000.0,
                                c.lan_available_ms as f64 / 1000.0
                            );
                        }
                        outln!("  bad chunks received: {}", c.bad_chunks);
                        outln!(
                            "  node: {} IDC {} role {} refusals {}",
                            s.peer,
                            s.idc,
                            s.role,
                            s.refusals
                        );
                        if let Some(at) = s.cert_expires_at {
                            outln!(
                                "  bridgehead certificate expires {}{}",
                                bids_protocols::cert::fmt_time(at),
                                if s.cert_expiring {
                                    " (soon: ask the admin for a new one, then send SIGHUP)"
                                } else {
                                    ""
                                }
                            );
                        }
                    }
                }
            }
            Ok(())
        }
        ImageCmd::Fetch { image, store, out } => {
            let image = image_ref(&image)?;
            if !control::node_running(&store).await {
                bail!(
                    "no node runs on store {}; start one with `bids node --store {} …`",
                    store.display(),
                    store.display()
                );
            }
            let mut p: Option<Progress> = None;
            let mut result: Option<Result<f64, String>> = None;
            let mut startup = None;
            let mut err = None;
            control::request(
                &store,
                &ControlRequest::Fetch {
                    image: image.clone(),
                },
                |r| match r {
                    ControlReply::Progress(pr) => {
                        let bar = p.get_or_insert_with(|| {
                            Progress::new(&format!("fetching {image}"), pr.total as u64, false)
                        });
                        bar.set(pr.held as u64, pr.total as u64);
                        if pr.startup.is_some() {
                            startup = pr.startup;
                        }
                        if let Some(d) = pr.done {
                            result = Some(d);
                        }
                    }
                    ControlReply::Error(e) => err = Some(e),
                    _ => {}
                },
            )
            .await
            .with_context(|| format!("talking to the node on {}", store.display()))?;
            if let Some(p) = &p {
                p.finish();
            }
            if let Some(e) = err {
                bail!("{e}");
            }
            match result {
                Some(Ok(secs)) => {
                    eprintln!("{image}: complete and verified in {secs:.2} s");
                    if let Some(s) = startup {
                        eprintln!("{image}: start-up: {s}");
                    }
                }
                Some(Err(e)) => bail!("fetching {image} failed: {e}"),
                None => bail!("the node stopped before {image} was complete"),
            }
            if let Some(out) = out {
                let out = absolute(&out)?;
                fail_on_error(&via_node(&store, ControlRequest::Export { image, out }).await?)?;
            }
            Ok(())
        }
        ImageCmd::Publish(a) => crate::delta_cmd::publish(a).await,
        ImageCmd::Rm { image, store } => {
            let image = image_ref(&image)?;
            if control::node_running(&store).await {
                return fail_on_error(&via_node(&store, ControlRequest::Remove { image }).await?);
            }
            let s = open_store(&store)?;
            let id = s
                .resolve(&image)
                .with_context(|| format!("image {image} is not in store {}", store.display()))?;
            s.remove(&id)?;
            Ok(())
        }
    }
}

/// `bids image status --json`, one shape with or without a running node (docs/json.md): the
/// image as `name:version` and its parts, the id in hex as `image ls --json` has it; with a
/// node also the transfer counters and the node's certificate expiry (operators watch it
/// from the same command).
fn status_json(
    image: &ImageRef,
    id: &bids_protocols::ImageId,
    size: u64,
    chunk_size: u32,
    (held, total, complete): (u32, u32, bool),
    node: Option<(&bids_node::ImageReport, &bids_node::NodeStatus)>,
) -> serde_json::Value {
    let mut v = serde_json::json!({
        "image": image.to_string(),
        "name": image.name,
        "version": image.version,
        "id": id.to_hex(),
        "size": size,
        "chunk_size": chunk_size,
        "held": held,
        "total": total,
        "complete": complete,
        "node_running": node.is_some(),
    });
    if let (Some((i, s)), Some(o)) = (node, v.as_object_mut()) {
        o.insert("fetching".into(), i.fetching.into());
        o.insert(
            "counters".into(),
            serde_json::to_value(i.counters).unwrap_or_default(),
        );
        o.insert("cert_expires_at".into(), s.cert_expires_at.into());
        o.insert("cert_expiring".into(), s.cert_expiring.into());
    }
    v
}

fn absolute(p: &Path) -> Result<PathBuf> {
    if p.is_absolute() {
        Ok(p.to_path_buf())
    } else {
        Ok(std::env::current_dir()?.join(p))
    }
}
