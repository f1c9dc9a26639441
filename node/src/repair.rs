//! `bids image verify NAME:VERSION [--repair]`: one pass re-hashes every data chunk of an
//! image held here (bad ones are marked missing, and the node withdraws them from the GIS
//! and its IDC); a repair then fetches every missing chunk in one download. The store does
//! the hashing, the engine the download.

use crate::engine::NodeHandle;
use crate::store::{Store, StoreError};
use bids_protocols::gis::ImageQuery;
use bids_protocols::{ChunkIndex, ImageId, ImageRef};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// What a verification found (and a repair did), as `bids image verify --json` prints it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct VerifyReport {
    pub image: ImageRef,
    pub id: ImageId,
    /// Chunks in the image.
    pub total: u32,
    /// Data chunks re-hashed (held, not all-zero).
    pub checked: u32,
    /// Chunks that no longer matched their SHA-256, now marked missing.
    pub bad: Vec<ChunkIndex>,
    /// Chunks missing after the check (the bad ones and any never fetched).
    pub missing: u32,
    /// With a repair: chunks fetched again, all in one download.
    pub repaired: Option<u32>,
    /// Seconds the check took.
    pub check_secs: f64,
    /// Seconds the repair's download took.
    pub repair_secs: Option<f64>,
}

/// Re-hashes every held data chunk of `image` in `store` (blocking; one pass).
pub fn check(store: &Store, image: &ImageRef) -> Result<VerifyReport, StoreError> {
    let id = store
        .resolve(image)
        .ok_or_else(|| StoreError::Invalid(format!("image {image} is not in this store")))?;
    let m = store.manifest(&id).ok_or(StoreError::UnknownImage(id))?;
    let held = store.held(&id).ok_or(StoreError::UnknownImage(id))?;
    let checked = (0..m.chunk_count())
        .filter(|&i| held[i as usize] && !m.chunks[i as usize].zero)
        .count() as u32;
    let t = Instant::now();
    let bad = store.verify(&id, &mut |_, _| {})?;
    let st = store.status(&id).ok_or(StoreError::UnknownImage(id))?;
    Ok(VerifyReport {
        image: image.clone(),
        id,
        total: st.total,
        checked,
        bad,
        missing: st.total - st.held,
        repaired: None,
        check_secs: t.elapsed().as_secs_f64(),
        repair_secs: None,
    })
}

/// Checks `image` on the running node and, with `repair`, fetches every missing chunk in one
/// download.
pub async fn verify(
    node: &NodeHandle,
    image: &ImageRef,
    repair: bool,
) -> Result<VerifyReport, String> {
    let store = node.store().clone();
    let r = image.clone();
    let mut report = tokio::task::spawn_blocking(move || check(&store, &r))
        .await
        .map_err(|e| format!("verification task failed: {e}"))?
        .map_err(|e| e.to_string())?;
    if repair && report.missing > 0 {
        let secs = node
            .fetch_and_wait(ImageQuery::Id(report.id))
            .await
            .map_err(|e| {
                format!(
                    "{} bad chunk(s) found and marked missing, but the repair failed: {e}",
                    report.bad.len()
                )
            })?;
        report.repaired = Some(report.missing);
        report.repair_secs = Some(secs);
    }
    Ok(report)
}

/// The background scrub: re-hashes every held data chunk of every image, one chunk at a
/// time on the blocking pool, paced to `bytes_per_sec`, pass after pass. A chunk found bad
/// is marked missing by the store and withdrawn by the engine ([`Store::take_lost`]). Runs
/// until aborted (the engine aborts it when it stops).
pub async fn scrub(store: Arc<Store>, bytes_per_sec: u64) {
    let rate = bytes_per_sec.max(1) as f64;
    info!(
        mb_per_s = rate / 1e6,
        "background scrub of the stored chunks started"
    );
    loop {
        let started = Instant::now();
        let (mut bytes, mut bad) = (0u64, 0u32);
        for st in store.list() {
            for idx in 0..st.total {
                let s = Arc::clone(&store);
                let id = st.id;
                match tokio::task::spawn_blocking(move || s.check_chunk(&id, idx)).await {
                    Ok(Ok((n, corrupt))) => {
                        bytes += n;
                        bad += u32::from(corrupt);
                        if n > 0 {
                            tokio::time::sleep(Duration::from_secs_f64(n as f64 / rate)).await;
                        }
                    }
                    // Removed meanwhile.
                    Ok(Err(StoreError::UnknownImage(_))) => break,
                    Ok(Err(e)) => {
                        warn!(image = %st.image, index = idx, error = %e, "scrubbing a chunk failed");
                        break;
                    }
                    Err(_) => return,
                }
            }
        }
        debug!(
            bytes,
            bad,
            secs = started.elapsed().as_secs_f64(),
            "scrub pass done"
        );
        if bytes == 0 {
            // Nothing held yet: look again later.
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}
