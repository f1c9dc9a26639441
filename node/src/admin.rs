//! The host's leg of the admin control path, above the event loop: carries out the
//! commands the engine admitted (`crate::admin_gate` decides which) through the
//! `NodeHandle` and the store, and hands each answer back to the engine, which sends it to
//! the GIS. Garbage collection planning is pure and lives here too.

use crate::engine::{AdminJob, NodeHandle, WeakNodeHandle};
use crate::store::ImageStatus;
use crate::versions;
use bids_protocols::admin::{
    AdminErrorKind, AdminResponse, CommandOutcome, GcItem, GcPolicy, GcReport, GcRequest,
    HostCommand,
};
use bids_protocols::gis::ImageQuery;
use bids_protocols::{ImageId, ObjectKind};
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::path::PathBuf;
use tokio::sync::mpsc;
use tracing::{info, warn};

/// Carries out the admitted commands the engine sends until it stops: each in a task of
/// its own (an import or a GC may take a while), its answer back on the job's reply. The
/// node is reached through a weak handle, so this loop does not keep a node alive.
pub(crate) async fn serve(node: WeakNodeHandle, mut jobs: mpsc::Receiver<AdminJob>) {
    while let Some(job) = jobs.recv().await {
        let Some(node) = node.upgrade() else {
            return;
        };
        tokio::spawn(async move {
            let response = execute(node, job.cmd).await;
            let _ = job.reply.send(response);
        });
    }
}

/// Carries out an admitted command and returns the answer for the admin.
pub(crate) async fn execute(node: NodeHandle, cmd: HostCommand) -> AdminResponse {
    let what = cmd.describe();
    let result = run(&node, cmd).await;
    match &result {
        Ok(o) => info!(command = %what, outcome = ?o, "admin command carried out"),
        Err((kind, e)) => warn!(command = %what, ?kind, error = %e, "admin command failed"),
    }
    match result {
        Ok(o) => AdminResponse::Outcome(o),
        Err((kind, message)) => AdminResponse::Error { kind, message },
    }
}

type RunResult = Result<CommandOutcome, (AdminErrorKind, String)>;

fn failed(e: impl std::fmt::Display) -> (AdminErrorKind, String) {
    (AdminErrorKind::Failed, e.to_string())
}

async fn settings(node: &NodeHandle) -> RunResult {
    let s = node.status().await.map_err(failed)?;
    Ok(CommandOutcome::Settings(s.settings))
}

async fn run(node: &NodeHandle, cmd: HostCommand) -> RunResult {
    match cmd {
        HostCommand::SetLimits {
            upload_bps,
            download_bps,
        } => {
            node.set_limits(upload_bps, download_bps)
                .await
                .map_err(failed)?;
            // Commands reach the loop in order, so this status already shows the change.
            settings(node).await
        }
        HostCommand::SetSharing { enabled } => {
            node.set_sharing(enabled).await.map_err(failed)?;
            settings(node).await
        }
        HostCommand::Fetch { image } => {
            let rx = versions::fetch(node, ImageQuery::Ref(image.clone()))
                .await
                .map_err(failed)?;
            let id = rx.borrow().id;
            Ok(CommandOutcome::Fetching { image, id })
        }
        HostCommand::Publish {
            file,
            image,
            from,
            chunk_size,
        } => publish(node, PathBuf::from(file), image, from, chunk_size).await,
        HostCommand::Remove { image } => {
            let id = node.store().resolve(&image).ok_or_else(|| {
                (
                    AdminErrorKind::BadRequest,
                    format!("image {image} is not on this host"),
                )
            })?;
            remove(node, id).await?;
            Ok(CommandOutcome::Removed { image, id })
        }
        HostCommand::SetCert { cert } => {
            let serial = cert.body.serial;
            let role = node
                .set_cert(Some(cert))
                .await
                .map_err(|e| (AdminErrorKind::BadRequest, e))?;
            Ok(CommandOutcome::Role {
                role,
                serial: Some(serial),
            })
        }
        HostCommand::DropCert => {
            let role = node.set_cert(None).await.map_err(failed)?;
            Ok(CommandOutcome::Role { role, serial: None })
        }
        HostCommand::Gc(req) => gc(node, req).await.map(CommandOutcome::Gc),
    }
}

async fn publish(
    node: &NodeHandle,
    file: PathBuf,
    image: bids_protocols::ImageRef,
    from: Option<bids_protocols::ImageRef>,
    chunk_size: u32,
) -> RunResult {
    if let Some(from) = from {
        let nv = versions::publish(node, file, image, from, chunk_size)
            .await
            .map_err(failed)?;
        return Ok(CommandOutcome::Published {
            image: nv.image,
            id: nv.id,
            delta: Some(nv.delta_id),
        });
    }
    let store = node.store().clone();
    let r = image.clone();
    let m = tokio::task::spawn_blocking(move || {
        store.import(
            &file,
            &r,
            chunk_size,
            None,
            ObjectKind::Image,
            &mut |_, _| {},
        )
    })
    .await
    .map_err(failed)?
    .map_err(failed)?;
    let id = m.id();
    node.imported(id).await.map_err(failed)?;
    Ok(CommandOutcome::Published {
        image,
        id,
        delta: None,
    })
}

async fn remove(node: &NodeHandle, id: ImageId) -> Result<(), (AdminErrorKind, String)> {
    let store = node.store().clone();
    tokio::task::spawn_blocking(move || store.remove(&id))
        .await
        .map_err(failed)?
        .map_err(failed)?;
    // Tells the GIS, which forgets this host as a holder.
    node.removed(id).await.map_err(failed)
}

/// Disk space an image file occupies (its holes take none).
fn disk_bytes(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| m.blocks().saturating_mul(512))
        .unwrap_or(0)
}

async fn gc(node: &NodeHandle, req: GcRequest) -> Result<GcReport, (AdminErrorKind, String)> {
    let status = node.status().await.map_err(failed)?;
    let fetching: HashSet<ImageId> = status
        .images
        .iter()
        .filter(|i| i.fetching)
        .map(|i| i.id)
        .collect();
    let store = node.store().clone();
    let items = tokio::task::spawn_blocking(move || {
        store
            .list()
            .into_iter()
            .map(|s| {
                let bytes = disk_bytes(&store.image_path(&s.id));
                (s, bytes)
            })
            .collect::<Vec<_>>()
    })
    .await
    .map_err(failed)?;
    let plan = plan_gc(items, &fetching, &req);
    if !req.dry_run {
        for item in &plan.removed {
            remove(node, item.id).await?;
        }
    }
    Ok(plan)
}

/// Chooses what a gc removes: candidates (every image not being downloaded) in policy
/// order, removed while more than `keep` images would remain or until `free_target` bytes
/// are freed. Deterministic for a given store state and seed.
pub fn plan_gc(
    items: Vec<(ImageStatus, u64)>,
    fetching: &HashSet<ImageId>,
    req: &GcRequest,
) -> GcReport {
    let total = items.len();
    let mut candidates: Vec<(ImageStatus, u64)> = items
        .into_iter()
        .filter(|(s, _)| !fetching.contains(&s.id))
        .collect();
    match req.policy {
        GcPolicy::Oldest => candidates.sort_by_key(|(s, _)| (s.added_at, s.id)),
        GcPolicy::Lru => candidates.sort_by_key(|(s, _)| (s.last_used, s.uses, s.id)),
        GcPolicy::Random => candidates.sort_by_cached_key(|(s, _)| {
            let mut h = Sha256::new();
            h.update(req.seed.to_be_bytes());
            h.update(s.id.0);
            <[u8; 32]>::from(h.finalize())
        }),
    }
    let mut removed = Vec::new();
    let mut freed: u64 = 0;
    for (s, bytes) in candidates {
        let remaining = total - removed.len();
        let over_keep = req.keep.is_some_and(|k| remaining > k as usize);
        let short_of_target = req.free_target.is_some_and(|t| freed < t);
        if !over_keep && !short_of_target {
            break;
        }
        freed = freed.saturating_add(bytes);
        removed.push(GcItem {
            image: s.image,
            id: s.id,
            kind: s.kind,
            disk_bytes: bytes,
            added_at: s.added_at,
            last_used: s.last_used,
        });
    }
    GcReport {
        dry_run: req.dry_run,
        kept: u32::try_from(total - removed.len()).unwrap_or(u32::MAX),
        removed,
        freed_bytes: freed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bids_protocols::ImageRef;

    fn status(n: u8, added_at: i64, last_used: i64) -> ImageStatus {
        ImageStatus {
            id: ImageId([n; 32]),
            image: ImageRef::new("img", &n.to_string()).unwrap(),
            base: None,
            kind: ObjectKind::Image,
            size: 1 << 20,
            chunk_size: 4096,
            held: 256,
            total: 256,
            complete: true,
            added_at,
            last_used,
            uses: 1,
        }
    }

    fn req(policy: GcPolicy, keep: Option<u32>, free_target: Option<u64>) -> GcRequest {
        GcRequest {
            policy,
            keep,
            free_target,
            dry_run: true,
            seed: 1,
        }
    }

    fn ids(r: &GcReport) -> Vec<u8> {
        r.removed.iter().map(|i| i.id.0[0]).collect()
    }

    #[test]
    fn gc_orders_by_policy_and_stops_at_keep_or_target() {
        // Image n was added at 10*n and last used at 100 - n: oldest is 1, least recent is 4.
        let items = || {
            (1..=4)
                .map(|n| (status(n, 10 * n as i64, 100 - n as i64), 1000))
                .collect::<Vec<_>>()
        };
        let none = HashSet::new();
        let r = plan_gc(items(), &none, &req(GcPolicy::Oldest, Some(2), None));
        assert_eq!(ids(&r), vec![1, 2]);
        assert_eq!((r.kept, r.freed_bytes), (2, 2000));
        let r = plan_gc(items(), &none, &req(GcPolicy::Lru, Some(3), None));
        assert_eq!(ids(&r), vec![4]);
        let r = plan_gc(items(), &none, &req(GcPolicy::Oldest, None, Some(2500)));
        assert_eq!(ids(&r), vec![1, 2, 3]);
        // Both: whichever removes more.
        let r = plan_gc(items(), &none, &req(GcPolicy::Oldest, Some(3), Some(1500)));
        assert_eq!(ids(&r), vec![1, 2]);
        // An image being downloaded is never removed but still counts as kept.
        let busy: HashSet<ImageId> = [ImageId([1; 32])].into();
        let r = plan_gc(items(), &busy, &req(GcPolicy::Oldest, Some(1), None));
        assert_eq!(ids(&r), vec![2, 3, 4]);
        assert_eq!(r.kept, 1);
        // Random: fixed by the seed, a permutation of the candidates.
        let a = plan_gc(items(), &none, &req(GcPolicy::Random, Some(0), None));
        let b = plan_gc(items(), &none, &req(GcPolicy::Random, Some(0), None));
        assert_eq!(ids(&a), ids(&b));
        let mut sorted = ids(&a);
        sorted.sort();
        assert_eq!(sorted, vec![1, 2, 3, 4]);
    }
}
