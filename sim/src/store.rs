//! The store of a simulated host: which chunks it holds, not their bytes. Ten thousand
//! hosts each holding a 4 GiB image do not fit in memory, and the node core never looks at
//! chunk bytes (hashing and writing are its driver's work): it asks what is held, and the
//! simulator marks a chunk held where the engine would have verified and written it.

use bids_node::store::{ChunkStore, ImageStatus, StoreError};
use bids_protocols::gis::Counters;
use bids_protocols::manifest::Manifest;
use bids_protocols::{ChunkIndex, ImageId, ImageRef};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

struct Image {
    manifest: Arc<Manifest>,
    held: Vec<bool>,
    count: u32,
}

/// Manifests and held-chunk flags, in memory.
#[derive(Default)]
pub struct SimStore {
    images: Mutex<BTreeMap<ImageId, Image>>,
}

impl SimStore {
    pub fn new() -> Self {
        SimStore::default()
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<ImageId, Image>> {
        // A panic while holding it (a bug) leaves the flags as they were: still usable.
        self.images.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds `m` with every chunk held (a seed).
    pub fn hold_all(&self, m: &Arc<Manifest>) {
        let n = m.chunk_count();
        self.lock().insert(
            m.id(),
            Image {
                manifest: m.clone(),
                held: vec![true; n as usize],
                count: n,
            },
        );
    }

    /// Marks chunk `idx` of `id` held; false if unknown or held already.
    pub fn mark(&self, id: &ImageId, idx: ChunkIndex) -> bool {
        let mut images = self.lock();
        let Some(img) = images.get_mut(id) else {
            return false;
        };
        match img.held.get_mut(idx as usize) {
            Some(h) if !*h => {
                *h = true;
                img.count += 1;
                true
            }
            _ => false,
        }
    }

    /// Forgets everything (a host whose disk is lost).
    pub fn clear(&self) {
        self.lock().clear();
    }

    fn status_of(id: &ImageId, img: &Image) -> ImageStatus {
        let m = &img.manifest;
        ImageStatus {
            id: *id,
            image: m.image_ref(),
            base: m.base.clone(),
            kind: m.kind.clone(),
            size: m.size,
            chunk_size: m.chunk_size,
            held: img.count,
            total: m.chunk_count(),
            complete: img.count == m.chunk_count(),
            added_at: 0,
            last_used: 0,
            uses: 0,
        }
    }
}

fn no_bytes() -> StoreError {
    StoreError::Io {
        path: "simulated store".into(),
        source: std::io::Error::other("a simulated store keeps no chunk bytes"),
    }
}

impl ChunkStore for SimStore {
    fn add_manifest(&self, m: &Manifest) -> Result<(), StoreError> {
        let id = m.id();
        let mut images = self.lock();
        if images.contains_key(&id) {
            return Ok(());
        }
        let held: Vec<bool> = m.chunks.iter().map(|c| c.zero).collect();
        let count = held.iter().filter(|h| **h).count() as u32;
        images.insert(
            id,
            Image {
                manifest: Arc::new(m.clone()),
                held,
                count,
            },
        );
        Ok(())
    }

    fn manifest(&self, id: &ImageId) -> Option<Arc<Manifest>> {
        self.lock().get(id).map(|i| i.manifest.clone())
    }

    fn resolve(&self, r: &ImageRef) -> Option<ImageId> {
        self.lock()
            .iter()
            .find(|(_, i)| &i.manifest.image_ref() == r)
            .map(|(id, _)| *id)
    }

    fn list(&self) -> Vec<ImageStatus> {
        self.lock()
            .iter()
            .map(|(id, i)| Self::status_of(id, i))
            .collect()
    }

    fn status(&self, id: &ImageId) -> Option<ImageStatus> {
        self.lock().get(id).map(|i| Self::status_of(id, i))
    }

    fn held(&self, id: &ImageId) -> Option<Vec<bool>> {
        self.lock().get(id).map(|i| i.held.clone())
    }

    fn held_ranges(&self, id: &ImageId) -> Option<Vec<(ChunkIndex, ChunkIndex)>> {
        let images = self.lock();
        let img = images.get(id)?;
        let mut out = Vec::new();
        let mut start: Option<u32> = None;
        for (i, h) in img.held.iter().enumerate() {
            match (h, start) {
                (true, None) => start = Some(i as u32),
                (false, Some(s)) => {
                    out.push((s, i as u32));
                    start = None;
                }
                _ => {}
            }
        }
        if let Some(s) = start {
            out.push((s, img.held.len() as u32));
        }
        Some(out)
    }

    fn missing(&self, id: &ImageId) -> Option<Vec<ChunkIndex>> {
        self.lock().get(id).map(|i| {
            i.held
                .iter()
                .enumerate()
                .filter(|(_, h)| !**h)
                .map(|(k, _)| k as u32)
                .collect()
        })
    }

    fn has_chunk(&self, id: &ImageId, idx: ChunkIndex) -> bool {
        self.lock()
            .get(id)
            .and_then(|i| i.held.get(idx as usize).copied())
            .unwrap_or(false)
    }

    fn read_chunk(&self, _id: &ImageId, _idx: ChunkIndex) -> Result<Vec<u8>, StoreError> {
        Err(no_bytes())
    }

    fn check_chunk(&self, _id: &ImageId, _idx: ChunkIndex) -> Result<(u64, bool), StoreError> {
        Ok((0, false))
    }

    fn verify(
        &self,
        _id: &ImageId,
        _progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Vec<ChunkIndex>, StoreError> {
        Ok(Vec::new())
    }

    fn write_chunk(&self, id: &ImageId, idx: ChunkIndex, _data: &[u8]) -> Result<bool, StoreError> {
        Ok(self.mark(id, idx))
    }

    fn write_verified_chunk(
        &self,
        id: &ImageId,
        idx: ChunkIndex,
        _data: &[u8],
    ) -> Result<bool, StoreError> {
        Ok(self.mark(id, idx))
    }

    fn take_lost(&self) -> Vec<(ImageId, ChunkIndex)> {
        Vec::new()
    }

    fn touch(&self, _id: &ImageId) {}

    fn remove(&self, id: &ImageId) -> Result<(), StoreError> {
        self.lock().remove(id);
        Ok(())
    }

    fn bytes_needed(&self, m: &Manifest) -> u64 {
        let held = self.held(&m.id()).unwrap_or_default();
        (0..m.chunk_count())
            .filter(|&i| !held.get(i as usize).copied().unwrap_or(false))
            .map(|i| m.chunk_len(i) as u64)
            .sum()
    }

    fn free_space(&self) -> Result<u64, StoreError> {
        Ok(u64::MAX)
    }

    fn check_space(&self, _m: &Manifest) -> Result<(), StoreError> {
        Ok(())
    }

    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn save_counters(&self, _id: &ImageId, _c: &Counters) -> Result<(), StoreError> {
        Ok(())
    }

    fn saved_counters(&self) -> Vec<(ImageId, Counters)> {
        Vec::new()
    }
}
