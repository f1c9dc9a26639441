//! [`MemStore`]: a [`ChunkStore`] that keeps manifests, bitmaps and chunk bytes in memory,
//! with the same verification, errors and space accounting as the disk [`super::Store`],
//! so tests and simulations drive the engine's data path without a file system. A
//! capacity in bytes stands in for the disk, so a full disk can be simulated too.
//! Durability is not modelled: nothing survives the value.

use super::{ChunkStore, ImageStatus, StoreError};
use bids_protocols::gis::Counters;
use bids_protocols::manifest::{is_zero, sha256, Manifest};
use bids_protocols::{ChunkIndex, ImageId, ImageRef};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use tracing::{info, warn};

/// What a [`MemStore`] calls its "directory" in errors: there is no path to name.
const MEM_DIR: &str = "(in-memory store)";

/// One image: its manifest, which chunks are held, and the bytes of its data chunks.
struct Image {
    manifest: Arc<Manifest>,
    held: Vec<bool>,
    held_count: u32,
    /// Bytes of held data chunks; an all-zero one has no entry and reads as zeros, as a
    /// hole of the disk store does.
    chunks: HashMap<ChunkIndex, Vec<u8>>,
    added_at: i64,
    last_used: i64,
    uses: u64,
    counters: Option<Counters>,
}

impl Image {
    /// A new image whose all-zero chunks are held from the start.
    fn new(manifest: Arc<Manifest>) -> Self {
        let held: Vec<bool> = manifest.chunks.iter().map(|c| c.zero).collect();
        let now = bids_protocols::unix_now();
        Image {
            held_count: held.iter().filter(|&&h| h).count() as u32,
            held,
            manifest,
            chunks: HashMap::new(),
            added_at: now,
            last_used: now,
            uses: 0,
            counters: None,
        }
    }

    fn total(&self) -> u32 {
        self.held.len() as u32
    }

    fn is_held(&self, idx: ChunkIndex) -> bool {
        self.held.get(idx as usize).copied().unwrap_or(false)
    }

    /// Bytes the image's stored chunks take of the capacity.
    fn stored_bytes(&self) -> u64 {
        self.chunks.values().map(|c| c.len() as u64).sum()
    }

    /// The held chunk's bytes as stored (zeros where nothing is stored).
    fn stored(&self, idx: ChunkIndex) -> Vec<u8> {
        match self.chunks.get(&idx) {
            Some(b) => b.clone(),
            None => vec![0; self.manifest.chunk_len(idx)],
        }
    }

    fn status(&self, id: ImageId) -> ImageStatus {
        let m = &self.manifest;
        ImageStatus {
            id,
            image: m.image_ref(),
            base: m.base.clone(),
            kind: m.kind.clone(),
            size: m.size,
            chunk_size: m.chunk_size,
            held: self.held_count,
            total: self.total(),
            complete: self.held_count == self.total(),
            added_at: self.added_at,
            last_used: self.last_used,
            uses: self.uses,
        }
    }
}

#[derive(Default)]
struct State {
    /// Ordered by id, so [`ChunkStore::saved_counters`] comes out as the disk store's does.
    images: BTreeMap<ImageId, Image>,
    by_ref: HashMap<ImageRef, ImageId>,
    /// Bytes of stored chunk data, at most the capacity.
    used: u64,
    lost: Vec<(ImageId, ChunkIndex)>,
}

impl State {
    fn image(&self, id: &ImageId) -> Result<&Image, StoreError> {
        self.images.get(id).ok_or(StoreError::UnknownImage(*id))
    }

    /// A held chunk proved bad: it is no longer held, its bytes are dropped, and it is
    /// queued for [`ChunkStore::take_lost`]. Nothing if it is not held (any more).
    fn found_corrupt(&mut self, id: &ImageId, idx: ChunkIndex, how: &str) {
        let Some(img) = self.images.get_mut(id) else {
            return;
        };
        if !img.is_held(idx) {
            return;
        }
        warn!(image = %img.manifest.image_ref(), id = %id.short(), index = idx, when = how,
              "stored chunk no longer matches its SHA-256; marked missing, no longer served or announced");
        img.held[idx as usize] = false;
        img.held_count -= 1;
        if let Some(b) = img.chunks.remove(&idx) {
            self.used -= b.len() as u64;
        }
        self.lost.push((*id, idx));
    }
}

/// An in-memory chunk store of a fixed capacity. `Send + Sync`; share it as an
/// `Arc<MemStore>` or `Arc<dyn ChunkStore>`. One lock guards all its state; chunk data
/// is hashed outside it, so writers of different chunks do not wait on each other's
/// hashing.
pub struct MemStore {
    capacity: u64,
    state: Mutex<State>,
}

impl std::fmt::Debug for MemStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemStore")
            .field("capacity", &self.capacity)
            .field("used", &self.lock().used)
            .finish_non_exhaustive()
    }
}

fn check_index(m: &Manifest, id: &ImageId, idx: ChunkIndex) -> Result<(), StoreError> {
    if idx >= m.chunk_count() {
        return Err(StoreError::BadIndex {
            image: *id,
            index: idx,
            count: m.chunk_count(),
        });
    }
    Ok(())
}

impl MemStore {
    /// An empty store that may hold `capacity` bytes of chunk data (all-zero chunks take
    /// none): a write past it fails as on a full disk.
    pub fn new(capacity: u64) -> Self {
        MemStore {
            capacity,
            state: Mutex::new(State::default()),
        }
    }

    /// Simulates bit rot at rest: flips a byte of a held data chunk's stored bytes, which
    /// reads, scrubs and verification then find. For tests of the repair path. False
    /// (nothing changed) for an unknown image or a chunk with no stored bytes (not held,
    /// or all zeros).
    pub fn damage(&self, id: &ImageId, idx: ChunkIndex) -> bool {
        let mut st = self.lock();
        let bytes = st
            .images
            .get_mut(id)
            .and_then(|img| img.chunks.get_mut(&idx))
            .and_then(|b| b.first_mut());
        match bytes {
            Some(b) => {
                *b ^= 0xff;
                true
            }
            None => false,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere never leaves the maps half-updated in a way that matters more
        // than stopping would, so poisoning is ignored (as the disk store does).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Checks `data` (index, length, then SHA-256 if `verify`) outside the lock, then
    /// keeps it. See [`ChunkStore::write_chunk`].
    fn write(
        &self,
        id: &ImageId,
        idx: ChunkIndex,
        data: &[u8],
        verify: bool,
    ) -> Result<bool, StoreError> {
        let m = self.manifest(id).ok_or(StoreError::UnknownImage(*id))?;
        check_data(&m, id, idx, data, verify)?;
        // All-zero data takes no space, as a hole on disk does not.
        let bytes = (!is_zero(data)).then(|| data.to_vec());
        self.keep(id, idx, bytes)
    }

    /// Marks a checked chunk held and keeps its bytes (None: all zeros). Ok(false) if it
    /// was held already; [`StoreError::DiskFull`] past the capacity.
    fn keep(
        &self,
        id: &ImageId,
        idx: ChunkIndex,
        bytes: Option<Vec<u8>>,
    ) -> Result<bool, StoreError> {
        let mut st = self.lock();
        let State { images, used, .. } = &mut *st;
        // Removed while the data was hashed.
        let img = images.get_mut(id).ok_or(StoreError::UnknownImage(*id))?;
        if img.is_held(idx) {
            return Ok(false);
        }
        if let Some(bytes) = bytes {
            let len = bytes.len() as u64;
            if len > self.capacity.saturating_sub(*used) {
                return Err(StoreError::DiskFull {
                    path: PathBuf::from(format!("{MEM_DIR}/{}.img", id.to_hex())),
                });
            }
            *used += len;
            img.chunks.insert(idx, bytes);
        }
        img.held[idx as usize] = true;
        img.held_count += 1;
        Ok(true)
    }
}

/// What the disk store checks before writing a chunk: the index, the length, and (if
/// `verify`) the SHA-256, before the bitmap is looked at, so bad data is reported even
/// for a chunk held already (the sender deserves its penalty either way).
fn check_data(
    m: &Manifest,
    id: &ImageId,
    idx: ChunkIndex,
    data: &[u8],
    verify: bool,
) -> Result<(), StoreError> {
    check_index(m, id, idx)?;
    let want = m.chunk_len(idx);
    if data.len() != want {
        return Err(StoreError::WrongLength {
            image: *id,
            index: idx,
            got: data.len(),
            want,
        });
    }
    if verify && sha256(data) != m.chunks[idx as usize].sha256 {
        return Err(StoreError::BadChunk {
            image: *id,
            index: idx,
        });
    }
    Ok(())
}

impl ChunkStore for MemStore {
    fn add_manifest(&self, m: &Manifest) -> Result<(), StoreError> {
        m.validate()
            .map_err(|e| StoreError::InvalidManifest(e.to_string()))?;
        let (id, r) = (m.id(), m.image_ref());
        let mut st = self.lock();
        if st.images.contains_key(&id) {
            return Ok(());
        }
        if let Some(existing) = st.by_ref.get(&r) {
            return Err(StoreError::VersionExists {
                image: r,
                existing: *existing,
                detail: format!("a manifest with id {id} was offered"),
            });
        }
        info!(image = %r, id = %id, chunks = m.chunk_count(), "manifest added (in memory)");
        st.by_ref.insert(r, id);
        st.images.insert(id, Image::new(Arc::new(m.clone())));
        Ok(())
    }

    fn manifest(&self, id: &ImageId) -> Option<Arc<Manifest>> {
        self.lock()
            .images
            .get(id)
            .map(|img| Arc::clone(&img.manifest))
    }

    fn resolve(&self, r: &ImageRef) -> Option<ImageId> {
        self.lock().by_ref.get(r).copied()
    }

    fn list(&self) -> Vec<ImageStatus> {
        let st = self.lock();
        let mut out: Vec<ImageStatus> = st.images.iter().map(|(id, img)| img.status(*id)).collect();
        out.sort_by(|a, b| (&a.image, a.id).cmp(&(&b.image, b.id)));
        out
    }

    fn status(&self, id: &ImageId) -> Option<ImageStatus> {
        self.lock().images.get(id).map(|img| img.status(*id))
    }

    fn held(&self, id: &ImageId) -> Option<Vec<bool>> {
        self.lock().images.get(id).map(|img| img.held.clone())
    }

    fn held_ranges(&self, id: &ImageId) -> Option<Vec<(ChunkIndex, ChunkIndex)>> {
        let st = self.lock();
        let img = st.images.get(id)?;
        let mut out: Vec<(ChunkIndex, ChunkIndex)> = Vec::new();
        for i in (0..img.total()).filter(|&i| img.is_held(i)) {
            match out.last_mut() {
                Some((_, end)) if *end == i => *end = i + 1,
                _ => out.push((i, i + 1)),
            }
        }
        Some(out)
    }

    fn missing(&self, id: &ImageId) -> Option<Vec<ChunkIndex>> {
        let st = self.lock();
        let img = st.images.get(id)?;
        Some((0..img.total()).filter(|&i| !img.is_held(i)).collect())
    }

    fn has_chunk(&self, id: &ImageId, idx: ChunkIndex) -> bool {
        self.lock()
            .images
            .get(id)
            .is_some_and(|img| img.is_held(idx))
    }

    /// Always re-hashes the data, as the disk store does by default
    /// ([`super::StoreOptions::verify_reads`]); only [`MemStore::damage`] makes it fail.
    fn read_chunk(&self, id: &ImageId, idx: ChunkIndex) -> Result<Vec<u8>, StoreError> {
        let (data, want) = {
            let st = self.lock();
            let img = st.image(id)?;
            check_index(&img.manifest, id, idx)?;
            if !img.is_held(idx) {
                return Err(StoreError::NotHeld {
                    image: *id,
                    index: idx,
                });
            }
            let info = &img.manifest.chunks[idx as usize];
            if info.zero {
                return Ok(vec![0; img.manifest.chunk_len(idx)]);
            }
            (img.stored(idx), info.sha256)
        };
        if sha256(&data) != want {
            self.lock().found_corrupt(id, idx, "read");
            return Err(StoreError::Corrupt {
                image: *id,
                index: idx,
                count: 1,
            });
        }
        Ok(data)
    }

    fn check_chunk(&self, id: &ImageId, idx: ChunkIndex) -> Result<(u64, bool), StoreError> {
        let (data, want) = {
            let st = self.lock();
            let img = st.image(id)?;
            check_index(&img.manifest, id, idx)?;
            let info = &img.manifest.chunks[idx as usize];
            if info.zero || !img.is_held(idx) {
                return Ok((0, false));
            }
            (img.stored(idx), info.sha256)
        };
        let bad = sha256(&data) != want;
        if bad {
            self.lock().found_corrupt(id, idx, "scrubbed");
        }
        Ok((data.len() as u64, bad))
    }

    fn verify(
        &self,
        id: &ImageId,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Vec<ChunkIndex>, StoreError> {
        let m = self.manifest(id).ok_or(StoreError::UnknownImage(*id))?;
        let mut bad = Vec::new();
        for idx in 0..m.chunk_count() {
            if self.check_chunk(id, idx)?.1 {
                bad.push(idx);
            }
            progress(m.chunk_offset(idx) + m.chunk_len(idx) as u64, m.size);
        }
        Ok(bad)
    }

    fn write_chunk(&self, id: &ImageId, idx: ChunkIndex, data: &[u8]) -> Result<bool, StoreError> {
        self.write(id, idx, data, true)
    }

    fn write_verified_chunk(
        &self,
        id: &ImageId,
        idx: ChunkIndex,
        data: &[u8],
    ) -> Result<bool, StoreError> {
        self.write(id, idx, data, false)
    }

    fn take_lost(&self) -> Vec<(ImageId, ChunkIndex)> {
        std::mem::take(&mut self.lock().lost)
    }

    fn touch(&self, id: &ImageId) {
        if let Some(img) = self.lock().images.get_mut(id) {
            img.last_used = bids_protocols::unix_now();
            img.uses += 1;
        }
    }

    fn remove(&self, id: &ImageId) -> Result<(), StoreError> {
        let mut st = self.lock();
        let img = st.images.remove(id).ok_or(StoreError::UnknownImage(*id))?;
        st.used -= img.stored_bytes();
        let r = img.manifest.image_ref();
        if st.by_ref.get(&r) == Some(id) {
            st.by_ref.remove(&r);
        }
        info!(image = %r, id = %id, "image removed (in memory)");
        Ok(())
    }

    fn bytes_needed(&self, m: &Manifest) -> u64 {
        let st = self.lock();
        let img = st.images.get(&m.id());
        (0..m.chunk_count())
            .filter(|&i| !m.chunks[i as usize].zero && !img.is_some_and(|img| img.is_held(i)))
            .map(|i| m.chunk_len(i) as u64)
            .sum()
    }

    fn free_space(&self) -> Result<u64, StoreError> {
        Ok(self.capacity.saturating_sub(self.lock().used))
    }

    fn check_space(&self, m: &Manifest) -> Result<(), StoreError> {
        let needed = self.bytes_needed(m);
        let free = self.free_space()?;
        if needed > free {
            return Err(StoreError::NoSpace {
                dir: PathBuf::from(MEM_DIR),
                needed,
                free,
            });
        }
        Ok(())
    }

    /// Nothing to make durable: the store lives and dies with the process.
    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn save_counters(&self, id: &ImageId, c: &Counters) -> Result<(), StoreError> {
        if let Some(img) = self.lock().images.get_mut(id) {
            img.counters = Some(*c);
        }
        Ok(())
    }

    fn saved_counters(&self) -> Vec<(ImageId, Counters)> {
        self.lock()
            .images
            .iter()
            .filter_map(|(id, img)| img.counters.map(|c| (*id, c)))
            .collect()
    }
}
