//! The driver's blocking duties, on any [`ChunkStore`]: what it does for [`super::Action::Prepare`]
//! and [`super::Action::Store`] before it tells the core how they went.

use super::{Prepared, StoreFail};
use crate::store::ChunkStore;
use bids_protocols::chunk::{self, Encoding};
use bids_protocols::{ChunkIndex, ImageId, Manifest};
use bytes::Bytes;
use tracing::warn;

/// What a driver does for [`super::Action::Prepare`]: checks the room for `m`, records it in the
/// store (for `Store`: a sparse file created, a sled transaction, a flush) and says what is
/// held already. Blocking work: off the event loop.
pub fn prepare_download(store: &dyn ChunkStore, m: &Manifest) -> Result<Prepared, String> {
    if let Err(e) = store.check_space(m) {
        warn!(image = %m.image_ref(), error = %e, "not starting a download");
        return Err(e.to_string());
    }
    store
        .add_manifest(m)
        .map_err(|e| format!("cannot prepare the store: {e}"))?;
    let id = m.id();
    Ok(Prepared {
        held: store.held(&id).unwrap_or_default(),
        held_chunks: store.status(&id).map(|s| s.held).unwrap_or(0),
    })
}

/// What a driver does for [`super::Action::Store`]: decodes, verifies (SHA-256 of the raw chunk,
/// once) and stores a received chunk; returns the encoded payload for relaying. Blocking.
pub fn verify_and_store(
    store: &dyn ChunkStore,
    m: &Manifest,
    image: &ImageId,
    idx: ChunkIndex,
    encoding: Encoding,
    payload: Bytes,
) -> Result<(Encoding, Bytes), StoreFail> {
    let info = m
        .chunks
        .get(idx as usize)
        .ok_or_else(|| StoreFail::Corrupt(format!("chunk {idx} is past the end")))?;
    let want = m.chunk_len(idx);
    let raw = match encoding {
        Encoding::Raw => {
            if payload.len() != want {
                return Err(StoreFail::Corrupt(format!(
                    "chunk {idx} is {} bytes, expected {want}",
                    payload.len()
                )));
            }
            payload.clone()
        }
        Encoding::Zstd => chunk::decode_payload(encoding, payload.clone(), want)
            .map_err(|e| StoreFail::Corrupt(e.to_string()))?,
    };
    if bids_protocols::manifest::sha256(&raw) != info.sha256 {
        return Err(StoreFail::Corrupt(format!(
            "chunk {idx} does not match its SHA-256"
        )));
    }
    store
        .write_verified_chunk(image, idx, &raw)
        .map_err(StoreFail::Local)?;
    Ok((encoding, payload))
}
