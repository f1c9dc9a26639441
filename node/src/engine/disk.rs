//! The engine's disk work, run on the blocking pool or a thread of its own, never on the
//! event loop: reading a chunk to serve, verifying and storing a received one, preparing a
//! download, saving transfer counters.

use crate::nodecore::{Prepared, StoreFail};
use crate::store::{Store, StoreError};
use bids_protocols::chunk::{self, ChunkRequest, ChunkResponse, Encoding};
use bids_protocols::gis as gisp;
use bids_protocols::{ChunkIndex, ImageId, Manifest};
use bytes::Bytes;
use std::sync::Arc;
use tracing::warn;

/// The answer to a chunk request from what the store holds: the encoded data, or NotHeld
/// (a chunk found corrupt at rest was logged and marked missing by the store).
pub(super) fn read_response(store: &Store, req: &ChunkRequest) -> ChunkResponse {
    match store.read_chunk(&req.image, req.index) {
        Ok(raw) => {
            let (encoding, payload) = chunk::encode_payload(raw);
            ChunkResponse::Data { encoding, payload }
        }
        Err(StoreError::Corrupt { .. }) => ChunkResponse::NotHeld,
        Err(e) => {
            warn!(image = %req.image.short(), idx = req.index, error = %e, "reading a chunk failed");
            ChunkResponse::NotHeld
        }
    }
}

/// Transfer counters to save, per image.
pub(super) type Counters = Vec<(ImageId, gisp::Counters)>;

/// Starts the thread that saves transfer counters into `store`, in the order sent, until
/// the queue closes.
pub(super) fn counter_saver(
    store: Arc<Store>,
) -> std::io::Result<(
    std::sync::mpsc::Sender<Counters>,
    std::thread::JoinHandle<()>,
)> {
    let (tx, rx) = std::sync::mpsc::channel::<Counters>();
    let saver = std::thread::Builder::new()
        .name("bids-counters".into())
        .spawn(move || {
            for batch in rx {
                for (id, c) in batch {
                    if let Err(e) = store.save_counters(&id, &c) {
                        warn!(image = %id.short(), error = %e, "could not save the transfer counters");
                    }
                }
            }
        })?;
    Ok((tx, saver))
}

/// Checks the room for `m`, creates its sparse file and records it (file create, sled
/// transaction, flush): blocking work, run off the event loop.
pub(super) fn prepare_download(store: &Store, m: &Manifest) -> Result<Prepared, String> {
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

/// Decodes, verifies (SHA-256 of the raw chunk, once) and stores a received chunk. Returns the
/// encoded payload for relaying.
pub(super) fn verify_and_store(
    store: &Store,
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
        .map_err(|e| StoreFail::Local(room_for_the_rest(store, m, e)))?;
    Ok((encoding, payload))
}

/// A full disk is reported with how much the rest of the image needs and how much is free.
fn room_for_the_rest(store: &Store, m: &Manifest, e: StoreError) -> StoreError {
    let StoreError::DiskFull { .. } = e else {
        return e;
    };
    match store.free_space() {
        Ok(free) => StoreError::NoSpace {
            dir: store.dir().to_path_buf(),
            needed: store.bytes_needed(m),
            free,
        },
        Err(_) => e,
    }
}
