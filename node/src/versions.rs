//! Versions of an image on a node (DESIGN.md §7): publishing a new version together with
//! the delta file from the version it derives from, and getting a version through the
//! cheapest path the GIS knows (a chain of deltas applied to a held version, or the whole
//! image). Deltas travel as ordinary objects through the engine (chunked, verified, LAN
//! sharing, bridgehead rule); this module only orchestrates, through `NodeHandle`, and
//! leaves the delta format to `bids_delta` and path choice to the GIS.
//!
//! Naming: the delta from `N:OLD` to `N:V` is stored and published as `N:OLD-to-V`
//! ([`delta_ref`]); its manifest has `base = N:OLD` and `kind = Delta { from, to }` (ids),
//! which is what the GIS indexes. After an upgrade the store keeps the base image, every
//! delta it fetched and the merged image whole, so it holds one image file per merged
//! version plus the series of delta files (and shares all of them).

use crate::engine::{FetchProgress, NodeHandle};
use crate::store::{Store, StoreError};
use bids_delta::{ApplyOptions, BuildOptions, DeltaError};
use bids_protocols::gis::{GisRequest, GisResponse, Holding, ImageQuery, UpgradePath, MAX_HAVE};
use bids_protocols::{ImageId, ImageRef, Manifest, ObjectKind};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::watch;
use tracing::{info, warn};

/// Why publishing or upgrading a version failed. Each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum VersionError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Delta(#[from] DeltaError),
    #[error("{image} is not complete in this store; import or fetch it first")]
    NotHeld { image: String },
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("the GIS refused or failed: {0}")]
    Gis(String),
    #[error("fetching {what} failed: {reason}")]
    Fetch { what: String, reason: String },
    #[error("the upgrade path from the GIS is inconsistent: {0}")]
    BadPath(String),
    #[error(
        "applying the deltas to get {image} gave manifest {actual}, the GIS publishes {expected}; \
         the deltas are wrong, nothing was kept: fetch {image} whole"
    )]
    IdMismatch {
        image: ImageRef,
        expected: ImageId,
        actual: ImageId,
    },
    #[error("the node stopped")]
    NodeStopped,
    #[error("a worker task failed: {0}")]
    Task(String),
}

/// What `publish` / `import_version` produced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewVersion {
    pub image: ImageRef,
    pub id: ImageId,
    pub size: u64,
    pub chunks: u32,
    pub from: ImageRef,
    pub from_id: ImageId,
    pub delta: ImageRef,
    pub delta_id: ImageId,
    /// Size of the delta file in bytes.
    pub delta_size: u64,
    /// Bytes of the new version taken from the old one (same offset or moved).
    pub copied_bytes: u64,
    /// Bytes of the new version carried as literals in the delta.
    pub literal_bytes: u64,
    pub import_ms: u64,
    pub build_ms: u64,
    /// Both objects were accepted by the GIS (false when imported without a node: the
    /// node publishes them when it starts on the store).
    pub published: bool,
}

/// How a version was obtained.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Route {
    /// Fetched whole (or it was already held).
    Whole,
    /// Rebuilt from the held version `base` with these deltas, moving `bytes`.
    Deltas {
        base: ImageId,
        steps: Vec<ImageId>,
        bytes: u64,
        full_bytes: u64,
    },
}

/// The result of [`fetch_version`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Fetched {
    pub id: ImageId,
    pub route: Route,
    pub seconds: f64,
}

/// The name a delta file gets: `NAME:OLD-to-NEW` (`NAME:OLDNAME.OLD-to-NEW` across names),
/// or `NAME:delta-<from>-to-<to>` with short ids when that would be too long.
pub fn delta_ref(from: &ImageRef, from_id: &ImageId, to: &ImageRef, to_id: &ImageId) -> ImageRef {
    let version = if from.name == to.name {
        format!("{}-to-{}", from.version, to.version)
    } else {
        format!("{}.{}-to-{}", from.name, from.version, to.version)
    };
    ImageRef::new(&to.name, &version).unwrap_or_else(|_| ImageRef {
        name: to.name.clone(),
        version: format!("delta-{}-to-{}", from_id.short(), to_id.short()),
    })
}

/// The image file of `id` in the store at `dir` (the layout documented in `store`), for
/// tools that read a store a running node owns: they cannot open its index.
pub fn image_file(dir: &Path, id: &ImageId) -> PathBuf {
    dir.join("images").join(format!("{}.img", id.to_hex()))
}

/// Scratch files of deltas and merges live in `DIR/tmp`, on the store's file system.
static SCRATCH: AtomicU64 = AtomicU64::new(0);

/// A scratch file removed when dropped (kept files are disarmed with `keep`).
struct Scratch(PathBuf);

impl Scratch {
    fn new(store: &Store, what: &str) -> Result<Scratch, VersionError> {
        let dir = store.dir().join("tmp");
        std::fs::create_dir_all(&dir).map_err(|e| {
            VersionError::Store(StoreError::Io {
                path: dir.clone(),
                source: e,
            })
        })?;
        let n = SCRATCH.fetch_add(1, Ordering::Relaxed);
        Ok(Scratch(
            dir.join(format!(".{what}-{}-{n}.tmp", std::process::id())),
        ))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn complete_id(store: &Store, r: &ImageRef) -> Result<ImageId, VersionError> {
    store
        .resolve(r)
        .filter(|id| store.status(id).is_some_and(|s| s.complete))
        .ok_or_else(|| VersionError::NotHeld {
            image: r.to_string(),
        })
}

/// Imports `file` as `image` (base `from`, which the store must hold completely), builds
/// the delta `from` → `image` from the two image files and imports it as an object of kind
/// `Delta`. Blocking. Idempotent: running it again with the same inputs returns the same
/// ids. `chunk_size` 0 takes `from`'s chunk size (the delta gets the same).
pub fn import_version(
    store: &Store,
    file: &Path,
    image: &ImageRef,
    from: &ImageRef,
    chunk_size: u32,
    opts: &BuildOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<NewVersion, VersionError> {
    if image == from {
        return Err(VersionError::Invalid(format!(
            "{image} cannot derive from itself; name the version it derives from"
        )));
    }
    let from_id = complete_id(store, from)?;
    let cs = match chunk_size {
        0 => store
            .manifest(&from_id)
            .map(|m| m.chunk_size)
            .ok_or_else(|| VersionError::NotHeld {
                image: from.to_string(),
            })?,
        c => c,
    };
    let t0 = Instant::now();
    let m = store.import(
        file,
        image,
        cs,
        Some(from.clone()),
        ObjectKind::Image,
        progress,
    )?;
    let id = m.id();
    let import_ms = t0.elapsed().as_millis() as u64;
    let t1 = Instant::now();
    let scratch = Scratch::new(store, "delta")?;
    let stats = bids_delta::build(
        &store.image_path(&from_id),
        &store.image_path(&id),
        &scratch.0,
        opts,
    )?;
    let build_ms = t1.elapsed().as_millis() as u64;
    let dref = delta_ref(from, &from_id, image, &id);
    let dm = store.import(
        &scratch.0,
        &dref,
        cs,
        Some(from.clone()),
        ObjectKind::Delta {
            from: from_id,
            to: id,
        },
        &mut |_, _| {},
    )?;
    info!(image = %image, from = %from, delta = %dref, delta_size = stats.delta_size,
          size = m.size, import_ms, build_ms, "new version imported with its delta");
    Ok(NewVersion {
        image: image.clone(),
        id,
        size: m.size,
        chunks: m.chunk_count(),
        from: from.clone(),
        from_id,
        delta: dref,
        delta_id: dm.id(),
        delta_size: dm.size,
        copied_bytes: stats.same_offset_bytes + stats.moved_bytes,
        literal_bytes: stats.literal_bytes,
        import_ms,
        build_ms,
        published: false,
    })
}

/// Publishes one complete object of the store to the GIS and waits for the answer.
async fn publish_object(node: &NodeHandle, id: &ImageId) -> Result<(), VersionError> {
    let store = node.store();
    let (Some(m), Some(st)) = (store.manifest(id), store.status(id)) else {
        return Err(VersionError::Store(StoreError::UnknownImage(*id)));
    };
    let req = GisRequest::Publish {
        holding: Holding {
            image: *id,
            chunks_held: st.held,
            complete: st.complete,
            fetching: false,
        },
        manifest: m.to_bytes(),
    };
    match node.gis_request(req).await.map_err(VersionError::Gis)? {
        GisResponse::Ack { .. } => Ok(()),
        GisResponse::Error { message, .. } => Err(VersionError::Gis(format!(
            "{} was imported but not published: {message}",
            m.image_ref()
        ))),
        other => Err(VersionError::Gis(format!(
            "unexpected answer to a publish: {other:?}"
        ))),
    }
}

/// `import_version` on the node's store, then publishes the new version and its delta
/// (in that order, each acknowledged by the GIS).
pub async fn publish(
    node: &NodeHandle,
    file: PathBuf,
    image: ImageRef,
    from: ImageRef,
    chunk_size: u32,
) -> Result<NewVersion, VersionError> {
    let store = Arc::clone(node.store());
    let mut nv = tokio::task::spawn_blocking(move || {
        import_version(
            &store,
            &file,
            &image,
            &from,
            chunk_size,
            &BuildOptions::default(),
            &mut |_, _| {},
        )
    })
    .await
    .map_err(|e| VersionError::Task(e.to_string()))??;
    publish_object(node, &nv.id).await?;
    publish_object(node, &nv.delta_id).await?;
    nv.published = true;
    Ok(nv)
}

/// The complete image versions of the store that a delta path could start from (those of
/// the same name first when `want` is a name), at most [`MAX_HAVE`].
fn bases(node: &NodeHandle, want: &ImageQuery) -> Vec<ImageId> {
    let mut held: Vec<_> = node
        .store()
        .list()
        .into_iter()
        .filter(|s| s.complete && s.kind == ObjectKind::Image)
        .collect();
    if let ImageQuery::Ref(r) = want {
        held.sort_by_key(|s| s.image.name != r.name);
    }
    held.iter().take(MAX_HAVE).map(|s| s.id).collect()
}

/// Asks the GIS for the cheapest way to `want` from the versions in `have`.
pub async fn plan(
    node: &NodeHandle,
    have: Vec<ImageId>,
    want: &ImageQuery,
) -> Result<UpgradePath, VersionError> {
    let req = GisRequest::UpgradePath {
        have,
        want: want.clone(),
    };
    match node.gis_request(req).await.map_err(VersionError::Gis)? {
        GisResponse::UpgradePath(p) => Ok(*p),
        GisResponse::Error { message, .. } => Err(VersionError::Gis(message)),
        other => Err(VersionError::Gis(format!(
            "unexpected answer to an upgrade path request: {other:?}"
        ))),
    }
}

/// What to do for a request.
enum Choice {
    Whole(ImageQuery),
    Deltas(UpgradePath),
}

async fn choose(node: &NodeHandle, want: &ImageQuery) -> Choice {
    let store = node.store();
    let local = match want {
        ImageQuery::Id(id) => Some(*id),
        ImageQuery::Ref(r) => store.resolve(r),
    };
    // Held already, or partly downloaded: the engine finishes (or reports) it.
    if local.is_some_and(|id| store.status(&id).is_some()) {
        return Choice::Whole(want.clone());
    }
    let have = bases(node, want);
    if have.is_empty() {
        // No complete image to apply a delta to: the whole image it is, without a round
        // trip to the GIS to hear so (the engine's own lookup follows either way).
        return Choice::Whole(want.clone());
    }
    match plan(node, have, want).await {
        Ok(p) if !p.steps.is_empty() => Choice::Deltas(p),
        Ok(p) => Choice::Whole(ImageQuery::Id(p.target.id)),
        Err(e) => {
            // The engine's own lookup reports unknown images; a GIS without upgrade
            // paths still serves whole images.
            info!(error = %e, "no upgrade path; fetching whole");
            Choice::Whole(want.clone())
        }
    }
}

fn chunks_of(size: u64, chunk_size: u32) -> u32 {
    size.div_ceil(u64::from(chunk_size.max(1))) as u32
}

/// Waits for a download to end, reporting its progress through `on`.
async fn wait(
    mut rx: watch::Receiver<FetchProgress>,
    what: &str,
    mut on: impl FnMut(&FetchProgress),
) -> Result<f64, VersionError> {
    loop {
        let p = rx.borrow_and_update().clone();
        on(&p);
        match p.done {
            Some(Ok(s)) => return Ok(s),
            Some(Err(reason)) => {
                return Err(VersionError::Fetch {
                    what: what.to_string(),
                    reason,
                })
            }
            None => {}
        }
        if rx.changed().await.is_err() {
            return Err(VersionError::NodeStopped);
        }
    }
}

/// Carries out a delta path: fetches each delta with the engine, applies them in order to
/// the held base, imports the result as the target (its chunk size and base) and checks
/// its id is the GIS's; then publishes it. On a wrong result nothing is kept: neither the
/// image nor the deltas fetched for it. Progress goes to `progress` (chunks of the deltas).
pub async fn upgrade(
    node: &NodeHandle,
    path: &UpgradePath,
    progress: &watch::Sender<FetchProgress>,
) -> Result<Manifest, VersionError> {
    let target = Manifest::from_bytes_with_id(&path.manifest, path.target.id)
        .map_err(|e| VersionError::BadPath(format!("target manifest: {e}")))?;
    let tref = target.image_ref();
    let Some(base) = path.base else {
        return Err(VersionError::BadPath("no base version".into()));
    };
    if path.steps.is_empty() || target.kind != ObjectKind::Image {
        return Err(VersionError::BadPath(format!(
            "{tref}: no deltas to apply, or the target is not an image"
        )));
    }
    let store = Arc::clone(node.store());
    if !store.status(&base).is_some_and(|s| s.complete) {
        return Err(VersionError::NotHeld {
            image: base.to_hex(),
        });
    }
    let t0 = Instant::now();
    // Fetch every delta (already held ones return at once).
    let mut fetched_now = Vec::new();
    let mut done_before = 0u32;
    for step in &path.steps {
        let had = store.status(&step.id).is_some_and(|s| s.complete);
        let rx = node
            .fetch(ImageQuery::Id(step.id))
            .await
            .map_err(|reason| VersionError::Fetch {
                what: format!("delta {}:{}", step.name, step.version),
                reason,
            })?;
        if !had {
            fetched_now.push(step.id);
        }
        let what = format!("delta {}:{}", step.name, step.version);
        wait(rx, &what, |p| {
            progress.send_modify(|o| o.held = done_before + p.held);
        })
        .await?;
        done_before += chunks_of(step.size, step.chunk_size);
    }
    let fetch_s = t0.elapsed().as_secs_f64();
    let result = merge(&store, path, base, &target).await;
    match &result {
        Err(e) => {
            warn!(image = %tref, error = %e, "delta path failed; dropping the deltas fetched for it");
            for d in &fetched_now {
                if store.remove(d).is_ok() {
                    let _ = node.removed(*d).await;
                }
            }
        }
        Ok(_) => {
            node.imported(target.id())
                .await
                .map_err(|_| VersionError::NodeStopped)?;
            info!(image = %tref, steps = path.steps.len(), bytes = path.bytes, full_bytes = path.full_bytes,
                  fetch_s, total_s = t0.elapsed().as_secs_f64(), "version rebuilt from deltas");
        }
    }
    result
}

/// Checks the chain, applies it and imports the result (blocking work off the runtime).
async fn merge(
    store: &Arc<Store>,
    path: &UpgradePath,
    base: ImageId,
    target: &Manifest,
) -> Result<Manifest, VersionError> {
    let mut cur = base;
    let mut deltas = Vec::new();
    for step in &path.steps {
        let m = store
            .manifest(&step.id)
            .ok_or(StoreError::UnknownImage(step.id))?;
        match m.kind {
            ObjectKind::Delta { from, to } if from == cur => cur = to,
            _ => {
                return Err(VersionError::BadPath(format!(
                    "{} does not start from {}",
                    m.image_ref(),
                    cur.short()
                )))
            }
        }
        deltas.push(store.image_path(&step.id));
    }
    if cur != path.target.id {
        return Err(VersionError::BadPath(format!(
            "the deltas lead to {}, not to {}",
            cur.short(),
            path.target.id.short()
        )));
    }
    let store = Arc::clone(store);
    let target = target.clone();
    tokio::task::spawn_blocking(move || apply_and_import(&store, base, &deltas, &target))
        .await
        .map_err(|e| VersionError::Task(e.to_string()))?
}

/// Applies `deltas` in turn to the file `base`. Each step but the last writes an unsynced
/// scratch file (only an input of the next step, removed once used). The last step writes
/// `out` (synced) when given and returns None; else it writes one more scratch file, which
/// is returned (None also when `deltas` is empty).
fn apply_chain(
    store: &Store,
    base: PathBuf,
    deltas: &[PathBuf],
    out: Option<&Path>,
    what: &str,
) -> Result<Option<Scratch>, VersionError> {
    let mut input = base;
    let mut current: Option<Scratch> = None;
    for (i, d) in deltas.iter().enumerate() {
        if let (true, Some(out)) = (i + 1 == deltas.len(), out) {
            bids_delta::apply(&input, d, out)?;
            return Ok(None);
        }
        let next = Scratch::new(store, what)?;
        bids_delta::apply_with(&input, d, &next.0, &ApplyOptions { sync: false })?;
        input = next.0.clone();
        // The previous scratch file is dropped (removed) here: it was only an input.
        current = Some(next);
    }
    Ok(current)
}

fn apply_and_import(
    store: &Store,
    base: ImageId,
    deltas: &[PathBuf],
    target: &Manifest,
) -> Result<Manifest, VersionError> {
    let t0 = Instant::now();
    let tref = target.image_ref();
    let expected = target.id();
    // A version known under the target's name but with other content cannot be replaced.
    if let Some(existing) = store.resolve(&tref) {
        if existing != expected {
            return Err(VersionError::IdMismatch {
                image: tref,
                expected,
                actual: existing,
            });
        }
    }
    // The merge never writes over the store's files: it reads the base, writes scratch
    // files (none is synced: the import copies the last one anyway).
    let Some(merged) = apply_chain(store, store.image_path(&base), deltas, None, "merge")? else {
        return Err(VersionError::BadPath("no deltas to apply".into()));
    };
    let apply_ms = t0.elapsed().as_millis() as u64;
    let existed = store.resolve(&tref).is_some();
    let m = store.import(
        &merged.0,
        &tref,
        target.chunk_size,
        target.base.clone(),
        ObjectKind::Image,
        &mut |_, _| {},
    )?;
    let actual = m.id();
    if actual != expected {
        if !existed {
            store.remove(&actual)?;
        }
        return Err(VersionError::IdMismatch {
            image: tref,
            expected,
            actual,
        });
    }
    info!(image = %tref, apply_ms, total_ms = t0.elapsed().as_millis() as u64, "deltas merged");
    Ok(m)
}

/// Gets `want` the cheapest way and waits: by deltas when the GIS finds a cheaper chain
/// from a held version, else whole. No fallback: an error of the delta path is returned
/// (tests and tools that must know which path ran).
pub async fn fetch_version(node: &NodeHandle, want: ImageQuery) -> Result<Fetched, VersionError> {
    let t0 = Instant::now();
    match choose(node, &want).await {
        Choice::Whole(q) => {
            let rx = node
                .fetch(q.clone())
                .await
                .map_err(|reason| VersionError::Fetch {
                    what: label(&q),
                    reason,
                })?;
            wait(rx, &label(&q), |_| {}).await?;
            let id = match &q {
                ImageQuery::Id(id) => Some(*id),
                ImageQuery::Ref(r) => node.store().resolve(r),
            }
            .ok_or_else(|| VersionError::Invalid(format!("{} vanished", label(&q))))?;
            Ok(Fetched {
                id,
                route: Route::Whole,
                seconds: t0.elapsed().as_secs_f64(),
            })
        }
        Choice::Deltas(p) => {
            let (tx, _rx) = watch::channel(initial_progress(&p));
            let m = upgrade(node, &p, &tx).await?;
            Ok(Fetched {
                id: m.id(),
                route: route_of(&p),
                seconds: t0.elapsed().as_secs_f64(),
            })
        }
    }
}

/// As `NodeHandle::fetch`, but by the cheapest path: the control socket's `Fetch`. A delta
/// path that fails falls back to fetching the image whole (and says so in the log).
pub async fn fetch(
    node: &NodeHandle,
    want: ImageQuery,
) -> Result<watch::Receiver<FetchProgress>, String> {
    let p = match choose(node, &want).await {
        Choice::Whole(q) => return node.fetch(q).await,
        Choice::Deltas(p) => p,
    };
    let (tx, rx) = watch::channel(initial_progress(&p));
    let node = node.clone();
    tokio::spawn(async move {
        let t0 = Instant::now();
        let err = match upgrade(&node, &p, &tx).await {
            Ok(_) => {
                let secs = t0.elapsed().as_secs_f64();
                tx.send_modify(|o| {
                    o.held = o.total;
                    o.done = Some(Ok(secs));
                });
                return;
            }
            Err(e) => e,
        };
        warn!(image = %p.target.name, version = %p.target.version, error = %err, "delta path failed; fetching the image whole");
        let result = match node.fetch(ImageQuery::Id(p.target.id)).await {
            Ok(rx) => {
                let what = format!("{}:{}", p.target.name, p.target.version);
                wait(rx, &what, |q| {
                    tx.send_modify(|o| {
                        o.held = q.held;
                        o.total = q.total;
                    })
                })
                .await
                .map(|_| t0.elapsed().as_secs_f64())
                .map_err(|e| e.to_string())
            }
            Err(e) => Err(e),
        };
        tx.send_modify(|o| {
            o.done =
                Some(result.map_err(|e| format!("delta path failed ({err}); whole fetch: {e}")));
        });
    });
    Ok(rx)
}

fn initial_progress(p: &UpgradePath) -> FetchProgress {
    FetchProgress {
        image: ImageRef {
            name: p.target.name.clone(),
            version: p.target.version.clone(),
        },
        id: p.target.id,
        held: 0,
        total: p
            .steps
            .iter()
            .map(|s| chunks_of(s.size, s.chunk_size))
            .sum(),
        size: p.target.size,
        done: None,
        startup: None,
    }
}

fn route_of(p: &UpgradePath) -> Route {
    Route::Deltas {
        base: p.base.unwrap_or(p.target.id),
        steps: p.steps.iter().map(|s| s.id).collect(),
        bytes: p.bytes,
        full_bytes: p.full_bytes,
    }
}

fn label(q: &ImageQuery) -> String {
    match q {
        ImageQuery::Ref(r) => r.to_string(),
        ImageQuery::Id(id) => id.to_hex(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_file(path: &Path, data: &[u8]) {
        std::fs::write(path, data).unwrap();
    }

    fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn delta_names() {
        let a: ImageRef = "deb:12.1".parse().unwrap();
        let b: ImageRef = "deb:12.2".parse().unwrap();
        let c: ImageRef = "app:1".parse().unwrap();
        let (ia, ib) = (ImageId([1; 32]), ImageId([2; 32]));
        assert_eq!(delta_ref(&a, &ia, &b, &ib).to_string(), "deb:12.1-to-12.2");
        assert_eq!(delta_ref(&a, &ia, &c, &ib).to_string(), "app:deb.12.1-to-1");
        let long = ImageRef::new("deb", &"9".repeat(100)).unwrap();
        let long2 = ImageRef::new("deb", &"8".repeat(100)).unwrap();
        let r = delta_ref(&long, &ia, &long2, &ib);
        assert!(r.validate().is_ok());
        assert_eq!(r.version, format!("delta-{}-to-{}", ia.short(), ib.short()));
    }

    #[test]
    fn image_file_matches_the_store_layout() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let id = ImageId([3; 32]);
        assert_eq!(image_file(dir.path(), &id), store.image_path(&id));
    }

    #[test]
    fn import_version_stores_the_image_and_its_delta() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        let v1 = pseudo_random(1 << 20, 7);
        let mut v2 = v1.clone();
        v2[100_000..104_096].copy_from_slice(&pseudo_random(4096, 9));
        v2.extend(pseudo_random(64 << 10, 11));
        let (f1, f2) = (dir.path().join("v1"), dir.path().join("v2"));
        write_file(&f1, &v1);
        write_file(&f2, &v2);
        let r1: ImageRef = "os:1".parse().unwrap();
        let r2: ImageRef = "os:2".parse().unwrap();
        let opts = BuildOptions::default();
        // The base must be held first.
        let e = import_version(&store, &f2, &r2, &r1, 0, &opts, &mut |_, _| {}).unwrap_err();
        assert!(matches!(e, VersionError::NotHeld { .. }), "{e}");
        let m1 = store
            .import(&f1, &r1, 64 << 10, None, ObjectKind::Image, &mut |_, _| {})
            .unwrap();
        let nv = import_version(&store, &f2, &r2, &r1, 0, &opts, &mut |_, _| {}).unwrap();
        assert_eq!(nv.from_id, m1.id());
        assert_eq!(nv.delta.to_string(), "os:1-to-2");
        assert!(
            nv.delta_size < 100 << 10,
            "delta of {} bytes",
            nv.delta_size
        );
        let m2 = store.manifest(&nv.id).unwrap();
        assert_eq!(m2.base, Some(r1.clone()));
        assert_eq!(m2.chunk_size, 64 << 10);
        let dm = store.manifest(&nv.delta_id).unwrap();
        assert_eq!(
            dm.kind,
            ObjectKind::Delta {
                from: m1.id(),
                to: nv.id
            }
        );
        assert_eq!(dm.base, Some(r1.clone()));
        // The stored delta rebuilds v2 from the stored v1, bit-exactly.
        let out = dir.path().join("rebuilt");
        bids_delta::apply(
            &store.image_path(&m1.id()),
            &store.image_path(&nv.delta_id),
            &out,
        )
        .unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), v2);
        // Idempotent, and no scratch file is left behind.
        let again = import_version(&store, &f2, &r2, &r1, 0, &opts, &mut |_, _| {}).unwrap();
        assert_eq!((again.id, again.delta_id), (nv.id, nv.delta_id));
        let left: Vec<_> = std::fs::read_dir(store.dir().join("tmp"))
            .unwrap()
            .collect();
        assert!(left.is_empty(), "scratch files left: {left:?}");
        // A version cannot derive from itself.
        let e = import_version(&store, &f2, &r1, &r1, 0, &opts, &mut |_, _| {}).unwrap_err();
        assert!(matches!(e, VersionError::Invalid(_)), "{e}");
    }

    #[test]
    fn a_merge_that_does_not_give_the_published_id_keeps_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        let v1 = pseudo_random(256 << 10, 3);
        let mut v2 = v1.clone();
        v2[0..4096].copy_from_slice(&pseudo_random(4096, 5));
        let mut other = v1.clone();
        other[8192..12288].copy_from_slice(&pseudo_random(4096, 6));
        let (f1, fo) = (dir.path().join("v1"), dir.path().join("other"));
        write_file(&f1, &v1);
        write_file(&fo, &other);
        let r1: ImageRef = "os:1".parse().unwrap();
        let m1 = store
            .import(&f1, &r1, 64 << 10, None, ObjectKind::Image, &mut |_, _| {})
            .unwrap();
        // The published target is v2, but the delta rebuilds `other`.
        let target = Manifest {
            name: "os".into(),
            version: "2".into(),
            base: Some(r1.clone()),
            kind: ObjectKind::Image,
            size: v2.len() as u64,
            chunk_size: 64 << 10,
            chunks: v2
                .chunks(64 << 10)
                .map(bids_protocols::manifest::chunk_info)
                .collect(),
        };
        let delta = dir.path().join("d");
        bids_delta::build(&f1, &fo, &delta, &BuildOptions::default()).unwrap();
        let e = apply_and_import(&store, m1.id(), &[delta], &target).unwrap_err();
        assert!(matches!(e, VersionError::IdMismatch { .. }), "{e}");
        assert_eq!(store.resolve(&"os:2".parse().unwrap()), None);
        assert_eq!(store.list().len(), 1);
        let left: Vec<_> = std::fs::read_dir(store.dir().join("tmp"))
            .unwrap()
            .collect();
        assert!(left.is_empty(), "scratch files left: {left:?}");
    }
}

/// Where [`export`] took a version from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExportSource {
    /// The store holds the version whole.
    Whole,
    /// The store holds a base version whole and a chain of delta files from it: the
    /// paper's "one image file and a series of delta files".
    Deltas {
        base: ImageRef,
        deltas: Vec<ImageRef>,
    },
}

/// The longest delta chain [`export`] follows (lineages are short; this bounds a walk over a
/// store whose records loop).
const MAX_CHAIN: usize = 64;

/// Writes version `image` to `out` (blocking): its image file when the store holds it whole,
/// else the base it holds whole with the chain of held delta files applied in turn. Each
/// delta checks the SHA-256 of its input and of its output, so a wrong chain writes
/// nothing; scratch files are removed and `out` appears only when complete.
pub fn export(store: &Store, image: &ImageRef, out: &Path) -> Result<ExportSource, VersionError> {
    if let Ok(id) = complete_id(store, image) {
        store.export(&id, out, &mut |_, _| {})?;
        return Ok(ExportSource::Whole);
    }
    let (base, chain) = delta_chain(store, image)?;
    let deltas: Vec<PathBuf> = chain.iter().map(|d| store.image_path(&d.id)).collect();
    apply_chain(
        store,
        store.image_path(&base.id),
        &deltas,
        Some(out),
        "export",
    )?;
    info!(%image, base = %base.image, deltas = chain.len(), "exported from a base and deltas");
    Ok(ExportSource::Deltas {
        base: base.image,
        deltas: chain.into_iter().map(|d| d.image).collect(),
    })
}

/// A version the store holds whole and the held, complete delta files that lead from it to
/// `image`, in the order to apply them. The first hop is found by name (the target itself
/// may be gone from the store: its delta is named `N:OLD-to-V`), the others by id.
fn delta_chain(
    store: &Store,
    image: &ImageRef,
) -> Result<(crate::store::ImageStatus, Vec<crate::store::ImageStatus>), VersionError> {
    let held = store.list();
    let suffix = format!("-to-{}", image.version);
    let deltas: Vec<_> = held
        .iter()
        .filter(|s| s.complete && matches!(s.kind, ObjectKind::Delta { .. }))
        .collect();
    let whole = |id: &ImageId| {
        held.iter()
            .find(|s| s.id == *id && s.complete && s.kind == ObjectKind::Image)
    };
    let from_of = |s: &crate::store::ImageStatus| match s.kind {
        ObjectKind::Delta { from, .. } => Some(from),
        ObjectKind::Image => None,
    };
    let not_held = || VersionError::NotHeld {
        image: format!("{image} (neither whole nor as a held base plus delta files)"),
    };
    // Depth-first from each delta that ends in the target; a visited set stops loops.
    for last in deltas
        .iter()
        .filter(|s| s.image.name == image.name && s.image.version.ends_with(&suffix))
    {
        let mut chain = vec![(*last).clone()];
        let mut seen = std::collections::HashSet::from([last.id]);
        while chain.len() <= MAX_CHAIN {
            let Some(from) = chain.last().and_then(from_of) else {
                break;
            };
            if let Some(b) = whole(&from) {
                chain.reverse();
                return Ok((b.clone(), chain));
            }
            let prev = deltas.iter().find(|s| {
                matches!(s.kind, ObjectKind::Delta { to, .. } if to == from)
                    && !seen.contains(&s.id)
            });
            match prev {
                Some(p) => {
                    seen.insert(p.id);
                    chain.push((*p).clone());
                }
                None => break,
            }
        }
    }
    Err(not_held())
}
