//! The chunk store's data path as a trait, [`ChunkStore`]: what the event loop and its
//! blocking tasks ask of a store (manifests, bitmaps, verified chunk writes, reads, space,
//! bookkeeping). [`Store`] implements it on disk, [`super::MemStore`] in memory, so the
//! engine's logic can be tested without a file system. Importing, exporting and deltas
//! work on image files and stay with [`Store`].

use super::{ImageStatus, Store, StoreError};
use bids_protocols::gis::Counters;
use bids_protocols::manifest::Manifest;
use bids_protocols::{ChunkIndex, ImageId, ImageRef};
use std::sync::Arc;

/// A chunk store: images known by their manifests, chunks verified against them before
/// they count as held. Object safe, so a node can hold an `Arc<dyn ChunkStore>`.
///
/// "Memory only" below means the call reads in-memory state (for [`Store`], at most
/// sled's page cache) and may run on the event loop; "blocking" means it may wait on the
/// disk and belongs on the blocking pool (`spawn_blocking`).
pub trait ChunkStore: Send + Sync {
    /// Registers a manifest learnt before downloading; its all-zero chunks count as held
    /// at once. Idempotent for the same manifest; another manifest under the same
    /// `name:version` is [`StoreError::VersionExists`]. Blocking.
    fn add_manifest(&self, m: &Manifest) -> Result<(), StoreError>;

    /// The manifest of an image, if known. Memory only.
    fn manifest(&self, id: &ImageId) -> Option<Arc<Manifest>>;

    /// The id of `name:version`, if known. Memory only.
    fn resolve(&self, r: &ImageRef) -> Option<ImageId>;

    /// Every image, ordered by name, version, id. Memory only.
    fn list(&self) -> Vec<ImageStatus>;

    /// What the store knows about one image. Memory only.
    fn status(&self, id: &ImageId) -> Option<ImageStatus>;

    /// One flag per chunk: held or not (None for an unknown image). Memory only.
    fn held(&self, id: &ImageId) -> Option<Vec<bool>>;

    /// Held chunks as sorted half-open ranges `[start, end)`, the gossip `Have` form.
    /// Memory only.
    fn held_ranges(&self, id: &ImageId) -> Option<Vec<(ChunkIndex, ChunkIndex)>>;

    /// Chunks still to fetch, ascending; all-zero chunks are never missing. Memory only.
    fn missing(&self, id: &ImageId) -> Option<Vec<ChunkIndex>>;

    /// Whether chunk `idx` is held (false for an unknown image or index). Memory only.
    fn has_chunk(&self, id: &ImageId, idx: ChunkIndex) -> bool;

    /// A copy of a held chunk; all-zero chunks come back as zeros. A chunk whose stored
    /// bytes no longer match the manifest is marked missing, named by
    /// [`ChunkStore::take_lost`] and reported as [`StoreError::Corrupt`]; one not held is
    /// [`StoreError::NotHeld`]. Blocking.
    fn read_chunk(&self, id: &ImageId, idx: ChunkIndex) -> Result<Vec<u8>, StoreError>;

    /// Re-hashes one held data chunk at rest (the background scrub); a mismatch is marked
    /// missing as by [`ChunkStore::read_chunk`]. Returns the bytes hashed (0 for a chunk
    /// not held or all-zero) and whether the chunk was corrupt. Blocking.
    fn check_chunk(&self, id: &ImageId, idx: ChunkIndex) -> Result<(u64, bool), StoreError>;

    /// Re-hashes every held chunk of an image; mismatches are marked missing and returned.
    /// Calls `progress(bytes_done, total)`. Blocking.
    fn verify(
        &self,
        id: &ImageId,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Vec<ChunkIndex>, StoreError>;

    /// Checks `data` against the manifest (length, then SHA-256) and stores it. Nothing is
    /// written on [`StoreError::WrongLength`] or [`StoreError::BadChunk`] (the sender is
    /// penalised either way, so the hash is checked even for a chunk held already).
    /// Ok(false) if the chunk was held already. A full disk is [`StoreError::DiskFull`].
    /// Blocking.
    fn write_chunk(&self, id: &ImageId, idx: ChunkIndex, data: &[u8]) -> Result<bool, StoreError>;

    /// As [`ChunkStore::write_chunk`] for data whose SHA-256 the caller checked already
    /// (the engine hashes a received chunk once, before relaying it); the length is still
    /// checked. Blocking.
    fn write_verified_chunk(
        &self,
        id: &ImageId,
        idx: ChunkIndex,
        data: &[u8],
    ) -> Result<bool, StoreError>;

    /// Chunks found corrupt at rest and marked missing since the last call, oldest first,
    /// so the node stops announcing them. Memory only.
    fn take_lost(&self) -> Vec<(ImageId, ChunkIndex)>;

    /// Records a use of the image now, for GC policies; unknown images are ignored.
    /// Blocking.
    fn touch(&self, id: &ImageId);

    /// Removes the image, its chunks and its records (counters included). Blocking.
    fn remove(&self, id: &ImageId) -> Result<(), StoreError>;

    /// Bytes of `m`'s data chunks not held yet: at most what downloading it still writes.
    /// Memory only.
    fn bytes_needed(&self, m: &Manifest) -> u64;

    /// Bytes the store may still write. A system call for [`Store`]; cheap.
    fn free_space(&self) -> Result<u64, StoreError>;

    /// Refuses a download that cannot fit: [`StoreError::NoSpace`] says how much is needed
    /// and how much is free. A system call for [`Store`]; cheap.
    fn check_space(&self, m: &Manifest) -> Result<(), StoreError>;

    /// Makes every held chunk's mark durable. Blocking (fsync).
    fn flush(&self) -> Result<(), StoreError>;

    /// Keeps an image's transfer counters for [`ChunkStore::saved_counters`]; ignored for
    /// an image not held. Blocking.
    fn save_counters(&self, id: &ImageId, c: &Counters) -> Result<(), StoreError>;

    /// The saved counters of the images held, ordered by id. Blocking (read at start-up).
    fn saved_counters(&self) -> Vec<(ImageId, Counters)>;
}

/// Each method calls the inherent one of the same name: existing callers of [`Store`]
/// are unchanged, and the trait adds no second code path to keep in step.
impl ChunkStore for Store {
    fn add_manifest(&self, m: &Manifest) -> Result<(), StoreError> {
        Store::add_manifest(self, m)
    }
    fn manifest(&self, id: &ImageId) -> Option<Arc<Manifest>> {
        Store::manifest(self, id)
    }
    fn resolve(&self, r: &ImageRef) -> Option<ImageId> {
        Store::resolve(self, r)
    }
    fn list(&self) -> Vec<ImageStatus> {
        Store::list(self)
    }
    fn status(&self, id: &ImageId) -> Option<ImageStatus> {
        Store::status(self, id)
    }
    fn held(&self, id: &ImageId) -> Option<Vec<bool>> {
        Store::held(self, id)
    }
    fn held_ranges(&self, id: &ImageId) -> Option<Vec<(ChunkIndex, ChunkIndex)>> {
        Store::held_ranges(self, id)
    }
    fn missing(&self, id: &ImageId) -> Option<Vec<ChunkIndex>> {
        Store::missing(self, id)
    }
    fn has_chunk(&self, id: &ImageId, idx: ChunkIndex) -> bool {
        Store::has_chunk(self, id, idx)
    }
    fn read_chunk(&self, id: &ImageId, idx: ChunkIndex) -> Result<Vec<u8>, StoreError> {
        Store::read_chunk(self, id, idx)
    }
    fn check_chunk(&self, id: &ImageId, idx: ChunkIndex) -> Result<(u64, bool), StoreError> {
        Store::check_chunk(self, id, idx)
    }
    fn verify(
        &self,
        id: &ImageId,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Vec<ChunkIndex>, StoreError> {
        Store::verify(self, id, progress)
    }
    fn write_chunk(&self, id: &ImageId, idx: ChunkIndex, data: &[u8]) -> Result<bool, StoreError> {
        Store::write_chunk(self, id, idx, data)
    }
    fn write_verified_chunk(
        &self,
        id: &ImageId,
        idx: ChunkIndex,
        data: &[u8],
    ) -> Result<bool, StoreError> {
        Store::write_verified_chunk(self, id, idx, data)
    }
    fn take_lost(&self) -> Vec<(ImageId, ChunkIndex)> {
        Store::take_lost(self)
    }
    fn touch(&self, id: &ImageId) {
        Store::touch(self, id)
    }
    fn remove(&self, id: &ImageId) -> Result<(), StoreError> {
        Store::remove(self, id)
    }
    fn bytes_needed(&self, m: &Manifest) -> u64 {
        Store::bytes_needed(self, m)
    }
    fn free_space(&self) -> Result<u64, StoreError> {
        Store::free_space(self)
    }
    fn check_space(&self, m: &Manifest) -> Result<(), StoreError> {
        Store::check_space(self, m)
    }
    fn flush(&self) -> Result<(), StoreError> {
        Store::flush(self)
    }
    fn save_counters(&self, id: &ImageId, c: &Counters) -> Result<(), StoreError> {
        Store::save_counters(self, id, c)
    }
    fn saved_counters(&self) -> Vec<(ImageId, Counters)> {
        Store::saved_counters(self)
    }
}
