//! The engine's disk work, run on the blocking pool or a thread of its own, never on the
//! event loop: reading a chunk to serve, verifying and storing a received one, preparing a
//! download, saving transfer counters.

use crate::nodecore::StoreFail;
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

/// The core's [`crate::nodecore::verify_and_store`], a full disk reported with how much
/// the rest of the image needs and how much is free.
pub(super) fn verify_and_store(
    store: &Store,
    m: &Manifest,
    image: &ImageId,
    idx: ChunkIndex,
    encoding: Encoding,
    payload: Bytes,
) -> Result<(Encoding, Bytes), StoreFail> {
    crate::nodecore::verify_and_store(store, m, image, idx, encoding, payload).map_err(
        |f| match f {
            StoreFail::Local(e) => StoreFail::Local(room_for_the_rest(store, m, e)),
            corrupt => corrupt,
        },
    )
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
