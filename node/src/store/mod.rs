//! Chunk store: images as sparse files whose chunks are read through memmap2 one chunk
//! region at a time (the paper's buffer management / file pipe) and written with `pwrite`
//! or the same maps (see [`StoreOptions::mmap_writes`]), manifests and a persistent chunk
//! bitmap in sled, so a partial download survives a crash and only missing chunks are
//! fetched again. It verifies chunks against manifests; which chunk to fetch from whom is
//! the scheduler's business, and the wire format is the protocols crate's.
//!
//! Layout of a store directory `DIR`:
//! - `DIR/index.sled/`: sled trees `manifests` (id → canonical manifest bytes), `refs`
//!   ("name:version" → id), `bitmaps` (id → packed bitmap of durable chunks), `meta`
//!   (id → CBOR [`Meta`]: added / last used, for GC policies), `counters` (id → CBOR
//!   transfer counters, saved by the node so they survive a restart);
//! - `DIR/images/<hex id>.img`: the image, created at full length and sparse; all-zero
//!   chunks are never written and stay holes.
//!
//! Durability: a chunk is marked held in memory right after its bytes are in the file
//! (page cache), so it can be served at once. Marks reach sled in *commits*: the image
//! file is fsynced first, then the bitmap is written and sled flushed, so a persisted mark
//! never points at bytes that a power loss could take away. Commits run every
//! [`StoreOptions::commit_interval`], when [`StoreOptions::commit_batch`] chunks wait, when
//! an image completes, on [`Store::flush`] and when the store is dropped. A crash loses at
//! most the uncommitted marks (those chunks are fetched again), never correctness.
//!
//! The data path the node uses is the [`ChunkStore`] trait, implemented here and by the
//! in-memory [`MemStore`] for tests and simulations.

mod api;
mod bits;
mod import;
mod mem;
mod region;

pub use api::ChunkStore;
pub use mem::MemStore;

use bids_protocols::gis::Counters;
use bids_protocols::manifest::{chunk_info, is_zero, sha256, ChunkInfo, Manifest, ObjectKind};
use bids_protocols::{
    ChunkIndex, ImageId, ImageRef, DEFAULT_CHUNK_SIZE, MAX_CHUNKS, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE,
};
use bits::{packed_get, packed_len, packed_set, AtomicBits};
use md5::Digest;
use region::io_err;
use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};
use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// Errors of the chunk store. Each says what failed, on what, and what to do.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("image {0} is not in the store; add its manifest (fetch it) or import it first")]
    UnknownImage(ImageId),
    #[error("chunk {index} is past the end of image {image}, which has {count} chunks")]
    BadIndex {
        image: ImageId,
        index: ChunkIndex,
        count: u32,
    },
    #[error("chunk {index} of image {image} is not held here yet; fetch it from another peer")]
    NotHeld { image: ImageId, index: ChunkIndex },
    #[error(
        "chunk {index} of image {image} does not match the manifest's SHA-256; nothing was \
         written: fetch it from another peer"
    )]
    BadChunk { image: ImageId, index: ChunkIndex },
    #[error(
        "chunk {index} of image {image} is {got} bytes but the manifest says {want}; nothing \
         was written: fetch it from another peer"
    )]
    WrongLength {
        image: ImageId,
        index: ChunkIndex,
        got: usize,
        want: usize,
    },
    #[error(
        "image {image} is incomplete ({held} of {total} chunks held); finish the download first"
    )]
    Incomplete {
        image: ImageId,
        held: u32,
        total: u32,
    },
    #[error(
        "{count} stored chunk(s) of image {image} no longer match their SHA-256 (disk damage or \
         a crash; the first is chunk {index}); they are marked missing: repair the image with \
         `bids image verify NAME:VERSION --repair` (or fetch it again)"
    )]
    Corrupt {
        image: ImageId,
        index: ChunkIndex,
        count: u32,
    },
    #[error(
        "image {image} already exists as {existing} with different content ({detail}); versions \
         are immutable, import under a new version"
    )]
    VersionExists {
        image: ImageRef,
        existing: ImageId,
        detail: String,
    },
    #[error("invalid manifest: {0}")]
    InvalidManifest(String),
    /// The import source is not something an image can be read from (a directory, a pipe,
    /// a character device, a socket) or holds nothing.
    #[error("{} {detail}", path.display())]
    BadSource { path: PathBuf, detail: String },
    #[error("invalid input: {0}")]
    Invalid(String),
    #[error(
        "{path} changed while it was being imported ({detail}); import it again once it is stable"
    )]
    SourceChanged { path: PathBuf, detail: String },
    #[error("disk full writing {path}; free some space (e.g. remove old images) and retry")]
    DiskFull { path: PathBuf },
    /// The store's file system has less room than an image's missing data chunks need.
    #[error(
        "disk full on {}: needs {needed} more bytes, {free} free; free some space (e.g. \
         remove old images) and retry",
        dir.display()
    )]
    NoSpace {
        dir: PathBuf,
        needed: u64,
        free: u64,
    },
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the store at {dir} is in use by another process (is a bids node already running on \
         it?): {detail}"
    )]
    Locked { dir: PathBuf, detail: String },
    #[error("store index (sled) error: {0}")]
    Db(#[from] sled::Error),
}

/// What the store knows about one image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageStatus {
    pub id: ImageId,
    pub image: ImageRef,
    pub base: Option<ImageRef>,
    pub kind: ObjectKind,
    pub size: u64,
    pub chunk_size: u32,
    /// Chunks held, all-zero chunks included (they are held from the start).
    pub held: u32,
    /// Chunks in the image.
    pub total: u32,
    pub complete: bool,
    /// Unix seconds when the image entered the store.
    pub added_at: i64,
    /// Unix seconds of the last [`Store::touch`] (or `added_at`).
    pub last_used: i64,
    /// How many times the image was touched.
    pub uses: u64,
}

/// Tuning of the store's durability.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Longest time a written chunk waits before its mark is made durable.
    pub commit_interval: Duration,
    /// Commit as soon as this many written chunks wait. 1 (or 0) commits inside every
    /// `write_chunk` before it returns: exact after a crash, but an fsync per chunk.
    pub commit_batch: usize,
    /// Bound on sled's page cache, in bytes.
    pub cache_bytes: u64,
    /// Write chunks through a map of their region (the paper's file pipe) instead of
    /// `pwrite`. Off by default: on ext4 a write fault on a shared file map costs a
    /// journal handle per 4 KiB page, about ten times slower than `pwrite` (measured
    /// 150–280 MiB/s against about 2 GiB/s). Reads always go through maps.
    pub mmap_writes: bool,
    /// Once a commit has made downloaded chunks durable, ask the kernel to drop their
    /// (now clean) pages from the page cache, one commit later so that peers asking for
    /// fresh chunks still read them from memory. A download then recycles a bounded set
    /// of page-cache pages instead of growing the cache by the image's size: a host that
    /// fetches images for VMs keeps its memory for them, and on a VM whose host reclaims
    /// freed guest memory (free page reporting) every new page costs a fault in the
    /// hypervisor, measured at ~1.4 CPU-s per GiB written here. Imported images stay
    /// cached: their next readers are the peers this node serves.
    pub release_written_pages: bool,
    /// Re-hash every data chunk read for serving ([`Store::read_chunk`]) and mark one that
    /// no longer matches its SHA-256 missing at once (bit rot at rest is then never served
    /// and never announced again). On by default; a SHA-256 costs about 0.5 ms per MiB with
    /// the CPU's SHA extensions, and payloads served again come from the node's cache.
    pub verify_reads: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            commit_interval: Duration::from_secs(1),
            commit_batch: 64,
            cache_bytes: 64 * 1024 * 1024,
            mmap_writes: false,
            release_written_pages: true,
            verify_reads: true,
        }
    }
}

/// GC bookkeeping of one image, as stored in the `meta` tree.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
struct Meta {
    added_at: i64,
    last_used: i64,
    uses: u64,
}

impl Meta {
    fn now() -> Self {
        let t = bids_protocols::unix_now();
        Meta {
            added_at: t,
            last_used: t,
            uses: 0,
        }
    }
    fn to_bytes(self) -> Vec<u8> {
        serde_cbor::to_vec(&self).unwrap_or_default()
    }
    fn from_bytes(b: &[u8]) -> Option<Self> {
        serde_cbor::from_slice(b).ok()
    }
}

/// One image in memory: its manifest, its open file and its chunk bitmaps.
struct Entry {
    id: ImageId,
    manifest: Arc<Manifest>,
    path: PathBuf,
    file: File,
    /// Chunks whose bytes are in the file: readable and servable.
    held: AtomicBits,
    held_count: AtomicU32,
    /// Chunks some thread is writing right now (one writer per chunk).
    writing: AtomicBits,
    /// Held while bytes are written to `file` (see `Inner::write`).
    write_lock: Mutex<()>,
    /// Packed bitmap as last written to sled (only changed under the commit lock).
    persisted: Mutex<Vec<u8>>,
    /// Set (under the commit lock) once the image is removed: its marks are dropped.
    removed: AtomicBool,
}

impl Entry {
    /// An entry whose held chunks are the zero chunks plus those set in `bitmap`.
    fn new(manifest: Arc<Manifest>, path: PathBuf, file: File, bitmap: Option<&[u8]>) -> Self {
        let n = manifest.chunk_count();
        let held = AtomicBits::new(n);
        let mut persisted = vec![0u8; packed_len(n)];
        for (i, c) in manifest.chunks.iter().enumerate() {
            let i = i as u32;
            if c.zero || bitmap.is_some_and(|b| packed_get(b, i)) {
                held.set(i);
                packed_set(&mut persisted, i, true);
            }
        }
        Entry {
            id: manifest.id(),
            held_count: AtomicU32::new(held.count()),
            held,
            writing: AtomicBits::new(n),
            write_lock: Mutex::new(()),
            persisted: Mutex::new(persisted),
            removed: AtomicBool::new(false),
            manifest,
            path,
            file,
        }
    }

    fn total(&self) -> u32 {
        self.held.len()
    }

    fn complete(&self) -> bool {
        self.held_count.load(Ordering::Acquire) == self.total()
    }

    fn check_index(&self, index: ChunkIndex) -> Result<(), StoreError> {
        if index >= self.total() {
            return Err(StoreError::BadIndex {
                image: self.id,
                index,
                count: self.total(),
            });
        }
        Ok(())
    }

    fn mark_held(&self, index: ChunkIndex) -> bool {
        let changed = self.held.set(index);
        if changed {
            self.held_count.fetch_add(1, Ordering::AcqRel);
        }
        changed
    }

    fn unmark_held(&self, index: ChunkIndex) {
        if self.held.clear(index) {
            self.held_count.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Exclusive right to write one chunk; released on drop, whatever happens.
struct Claim<'a> {
    entry: &'a Entry,
    index: ChunkIndex,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.entry.writing.clear(self.index);
    }
}

#[derive(Default)]
struct Images {
    by_id: HashMap<ImageId, Arc<Entry>>,
    by_ref: HashMap<ImageRef, ImageId>,
}

enum Msg {
    /// Enough chunks wait (or an image completed): commit now.
    Nudge,
    Stop,
}

struct Inner {
    dir: PathBuf,
    images_dir: PathBuf,
    db: sled::Db,
    manifests: sled::Tree,
    refs: sled::Tree,
    bitmaps: sled::Tree,
    meta: sled::Tree,
    counters: sled::Tree,
    images: RwLock<Images>,
    /// Serialises adding and removing images (never held while hashing chunk data).
    structure: Mutex<()>,
    /// Serialises commits, and bitmap changes that bypass them. Holds the downloaded
    /// chunks that the last commit made durable, whose pages the next one releases.
    commit_lock: Mutex<Vec<(Arc<Entry>, ChunkIndex)>>,
    /// Chunks written but whose marks are not durable yet, each with whether its pages
    /// are released once it is durable (see [`StoreOptions::release_written_pages`]).
    pending: Mutex<Vec<(Arc<Entry>, ChunkIndex, bool)>>,
    nudge: SyncSender<Msg>,
    opts: StoreOptions,
    tmp_counter: AtomicU64,
    /// Chunks found corrupt at rest and marked missing since the owner last asked
    /// ([`Store::take_lost`]): the node stops announcing them.
    lost: Mutex<Vec<(ImageId, ChunkIndex)>>,
}

/// The chunk store. `Send + Sync`; share it as `Arc<Store>`.
pub struct Store {
    inner: Arc<Inner>,
    committer: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.inner.dir)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere never leaves our guarded data half-updated in a way that matters
    // more than stopping the node would, so poisoning is ignored.
    m.lock().unwrap_or_else(|e| e.into_inner())
}
fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}
fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

fn tx_err(e: TransactionError<()>) -> StoreError {
    match e {
        TransactionError::Storage(e) => StoreError::Db(e),
        // Our transactions never abort on their own.
        TransactionError::Abort(()) => {
            StoreError::Db(sled::Error::Unsupported("transaction aborted".into()))
        }
    }
}

/// How long an open waits for the index's lock. sled gives its lock file back only when
/// the last of its internal references goes, and some of them live on in its background
/// threads for a moment after a `Store` in this process is dropped; a lock held by
/// another running node stays held and is reported after this wait.
const LOCK_WAIT: Duration = Duration::from_secs(3);

/// Opens the sled index, waiting up to [`LOCK_WAIT`] for its lock.
fn open_index(dir: &Path, db_path: &Path, cache_bytes: u64) -> Result<sled::Db, StoreError> {
    let start = Instant::now();
    loop {
        match sled::Config::new()
            .path(db_path)
            .cache_capacity(cache_bytes)
            .open()
        {
            Ok(db) => return Ok(db),
            // sled's text ends in the raw `Os { code: 11, … }`: say it in words.
            Err(sled::Error::Io(io)) if io.to_string().contains("could not acquire lock") => {
                if start.elapsed() >= LOCK_WAIT {
                    return Err(StoreError::Locked {
                        dir: dir.to_path_buf(),
                        detail: format!("its index {} is locked", db_path.display()),
                    });
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(other) => return Err(StoreError::Db(other)),
        }
    }
}

fn ref_key(r: &ImageRef) -> Vec<u8> {
    r.to_string().into_bytes()
}

impl Store {
    /// Opens (creating if missing) the store in `dir` with default options.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        Self::open_with(dir, StoreOptions::default())
    }

    /// Opens the store with explicit durability options.
    pub fn open_with(dir: &Path, opts: StoreOptions) -> Result<Store, StoreError> {
        let images_dir = dir.join("images");
        fs::create_dir_all(&images_dir).map_err(|e| io_err(&images_dir, e))?;
        let db_path = dir.join("index.sled");
        let db = open_index(dir, &db_path, opts.cache_bytes)?;
        let (nudge, rx) = mpsc::sync_channel(1);
        let inner = Arc::new(Inner {
            dir: dir.to_path_buf(),
            images_dir,
            manifests: db.open_tree("manifests")?,
            refs: db.open_tree("refs")?,
            bitmaps: db.open_tree("bitmaps")?,
            meta: db.open_tree("meta")?,
            counters: db.open_tree("counters")?,
            db,
            images: RwLock::new(Images::default()),
            structure: Mutex::new(()),
            commit_lock: Mutex::new(Vec::new()),
            pending: Mutex::new(Vec::new()),
            nudge,
            opts,
            tmp_counter: AtomicU64::new(0),
            lost: Mutex::new(Vec::new()),
        });
        inner.load()?;
        let worker = Arc::clone(&inner);
        let committer = std::thread::Builder::new()
            .name("bids-store-commit".into())
            .spawn(move || worker.commit_loop(rx))
            .map_err(|e| io_err(dir, e))?;
        Ok(Store {
            inner,
            committer: Some(committer),
        })
    }

    /// The store directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Streams `file` in: one pass, chunk by chunk (`chunk_size` 0 means
    /// [`DEFAULT_CHUNK_SIZE`]), SHA-256 + MD5 per chunk, all-zero chunks marked and left as
    /// holes, the others written into a sparse image file (with `pwrite`, or through maps
    /// with [`StoreOptions::mmap_writes`]). Holes of a sparse source are skipped without
    /// reading. Calls `progress(bytes_done, total)`. The image is complete on return; its
    /// marks become durable with the next commit, like downloaded chunks.
    ///
    /// If `image` exists already: same content returns the existing manifest (and fills
    /// any chunks it still missed), different content is an error.
    pub fn import(
        &self,
        file: &Path,
        image: &ImageRef,
        chunk_size: u32,
        base: Option<ImageRef>,
        kind: ObjectKind,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Manifest, StoreError> {
        self.inner
            .import(file, image, chunk_size, base, kind, progress)
    }

    /// Registers a manifest learnt before downloading: creates the full-length sparse file;
    /// all-zero chunks count as held at once. Idempotent (an existing bitmap is kept).
    pub fn add_manifest(&self, m: &Manifest) -> Result<(), StoreError> {
        self.inner.add_manifest(m)
    }

    /// The manifest of an image (cached in memory).
    pub fn manifest(&self, id: &ImageId) -> Option<Arc<Manifest>> {
        self.inner.get(id).map(|e| Arc::clone(&e.manifest))
    }

    /// The id of `name:version`, if the store knows it.
    pub fn resolve(&self, r: &ImageRef) -> Option<ImageId> {
        read(&self.inner.images).by_ref.get(r).copied()
    }

    /// All images, ordered by name, version, id.
    pub fn list(&self) -> Vec<ImageStatus> {
        let entries: Vec<Arc<Entry>> = read(&self.inner.images).by_id.values().cloned().collect();
        let mut out: Vec<ImageStatus> = entries.iter().map(|e| self.inner.status(e)).collect();
        out.sort_by(|a, b| (&a.image, a.id).cmp(&(&b.image, b.id)));
        out
    }

    pub fn status(&self, id: &ImageId) -> Option<ImageStatus> {
        self.inner.get(id).map(|e| self.inner.status(&e))
    }

    /// One flag per chunk: held or not.
    pub fn held(&self, id: &ImageId) -> Option<Vec<bool>> {
        self.inner.get(id).map(|e| e.held.to_bools())
    }

    /// Held chunks as sorted half-open ranges `[start, end)` (the gossip `Have` form).
    pub fn held_ranges(&self, id: &ImageId) -> Option<Vec<(ChunkIndex, ChunkIndex)>> {
        let e = self.inner.get(id)?;
        let mut out: Vec<(ChunkIndex, ChunkIndex)> = Vec::new();
        for i in (0..e.total()).filter(|&i| e.held.get(i)) {
            match out.last_mut() {
                Some((_, end)) if *end == i => *end = i + 1,
                _ => out.push((i, i + 1)),
            }
        }
        Some(out)
    }

    /// Chunks still to fetch, ascending (all-zero chunks are never missing).
    pub fn missing(&self, id: &ImageId) -> Option<Vec<ChunkIndex>> {
        let e = self.inner.get(id)?;
        Some((0..e.total()).filter(|&i| !e.held.get(i)).collect())
    }

    pub fn has_chunk(&self, id: &ImageId, idx: ChunkIndex) -> bool {
        self.inner.get(id).is_some_and(|e| e.held.get(idx))
    }

    /// Copies chunk `idx` out; an all-zero chunk is returned as zeros without touching the
    /// disk. Error if not held. With [`StoreOptions::verify_reads`] the data is re-hashed:
    /// a chunk that no longer matches is marked missing (one warning line) and reported as
    /// [`StoreError::Corrupt`], and [`Store::take_lost`] names it.
    pub fn read_chunk(&self, id: &ImageId, idx: ChunkIndex) -> Result<Vec<u8>, StoreError> {
        let e = self.inner.entry(id)?;
        e.check_index(idx)?;
        if !e.held.get(idx) {
            return Err(StoreError::NotHeld {
                image: *id,
                index: idx,
            });
        }
        let m = &e.manifest;
        let len = m.chunk_len(idx);
        let info = &m.chunks[idx as usize];
        if info.zero {
            return Ok(vec![0; len]);
        }
        let data = region::read_region(&e.file, &e.path, m.chunk_offset(idx), len)?;
        if self.inner.opts.verify_reads && sha256(&data) != info.sha256 {
            self.inner.found_corrupt(&e, idx, "read")?;
            return Err(StoreError::Corrupt {
                image: *id,
                index: idx,
                count: 1,
            });
        }
        Ok(data)
    }

    /// Re-hashes one held data chunk at rest; a chunk that no longer matches is marked
    /// missing (as by [`Store::read_chunk`]). Returns the bytes hashed (0 for a chunk not
    /// held or all-zero) and whether the chunk was found corrupt.
    pub fn check_chunk(&self, id: &ImageId, idx: ChunkIndex) -> Result<(u64, bool), StoreError> {
        let e = self.inner.entry(id)?;
        e.check_index(idx)?;
        let m = &e.manifest;
        let (info, len) = (&m.chunks[idx as usize], m.chunk_len(idx));
        if info.zero || !e.held.get(idx) {
            return Ok((0, false));
        }
        let ok = region::with_region(&e.file, &e.path, m.chunk_offset(idx), len, |b| {
            sha256(b) == info.sha256
        })?;
        if !ok {
            self.inner.found_corrupt(&e, idx, "scrubbed")?;
        }
        Ok((len as u64, !ok))
    }

    /// Chunks found corrupt at rest (by reads, exports, verification or scrubbing) and
    /// marked missing since the last call, oldest first.
    pub fn take_lost(&self) -> Vec<(ImageId, ChunkIndex)> {
        std::mem::take(&mut *lock(&self.inner.lost))
    }

    /// Verifies `data` against the manifest's SHA-256 (nothing is written otherwise),
    /// writes it through a map of its region, then marks it held. Ok(false) if it was held
    /// already (nothing written).
    pub fn write_chunk(
        &self,
        id: &ImageId,
        idx: ChunkIndex,
        data: &[u8],
    ) -> Result<bool, StoreError> {
        let e = self.inner.entry(id)?;
        self.inner.write(&e, idx, data, true)
    }

    /// As [`Store::write_chunk`], for data whose SHA-256 the caller already checked.
    pub fn write_verified_chunk(
        &self,
        id: &ImageId,
        idx: ChunkIndex,
        data: &[u8],
    ) -> Result<bool, StoreError> {
        let e = self.inner.entry(id)?;
        self.inner.write(&e, idx, data, false)
    }

    /// Writes the image to `out` bit-exact, re-checking each chunk's SHA-256 on the way;
    /// all-zero chunks become holes, so the output is sparse too. Error if the image is
    /// incomplete; a partial output is removed. `out` is not fsynced.
    pub fn export(
        &self,
        id: &ImageId,
        out: &Path,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<(), StoreError> {
        let e = self.inner.entry(id)?;
        if !e.complete() {
            return Err(StoreError::Incomplete {
                image: *id,
                held: e.held_count.load(Ordering::Acquire),
                total: e.total(),
            });
        }
        let result = self.inner.export(&e, out, progress);
        if result.is_err() {
            let _ = fs::remove_file(out);
        }
        result
    }

    /// Re-hashes every held chunk; chunks that no longer match are marked missing (so
    /// they are fetched again) and returned. Calls `progress(bytes_done, total)`.
    pub fn verify(
        &self,
        id: &ImageId,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Vec<ChunkIndex>, StoreError> {
        let e = self.inner.entry(id)?;
        let m = &e.manifest;
        let mut bad = Vec::new();
        for idx in 0..e.total() {
            let (info, len) = (&m.chunks[idx as usize], m.chunk_len(idx));
            if !info.zero && e.held.get(idx) {
                let ok = region::with_region(&e.file, &e.path, m.chunk_offset(idx), len, |b| {
                    sha256(b) == info.sha256
                })?;
                if !ok {
                    self.inner.found_corrupt(&e, idx, "verified")?;
                    bad.push(idx);
                }
            }
            progress(m.chunk_offset(idx) + len as u64, m.size);
        }
        Ok(bad)
    }

    /// Removes the image: its file and all its records.
    pub fn remove(&self, id: &ImageId) -> Result<(), StoreError> {
        self.inner.remove(id)
    }

    /// Records a use of the image now (for least-recently / least-used GC policies).
    pub fn touch(&self, id: &ImageId) {
        let inner = &self.inner;
        let Some(e) = inner.get(id) else { return };
        let _s = lock(&inner.structure);
        if e.removed.load(Ordering::Acquire) {
            return;
        }
        let mut meta = inner.meta_of(id);
        meta.last_used = bids_protocols::unix_now();
        meta.uses += 1;
        if let Err(err) = inner.meta.insert(id.0, meta.to_bytes()) {
            warn!(image = %id, error = %err, "could not record the image's last use");
        }
    }

    /// Saves an image's transfer counters (the node's accounting; the store only keeps
    /// them). Durable with the next commit or flush; ignored for an image not held.
    pub fn save_counters(&self, id: &ImageId, c: &Counters) -> Result<(), StoreError> {
        let inner = &self.inner;
        let _s = lock(&inner.structure);
        if inner
            .get(id)
            .is_none_or(|e| e.removed.load(Ordering::Acquire))
        {
            return Ok(());
        }
        let bytes = serde_cbor::to_vec(c)
            .map_err(|e| StoreError::Invalid(format!("encoding counters: {e}")))?;
        inner.counters.insert(id.0, bytes)?;
        Ok(())
    }

    /// The saved transfer counters of the images held; unreadable records are skipped.
    pub fn saved_counters(&self) -> Vec<(ImageId, Counters)> {
        let inner = &self.inner;
        let images = read(&inner.images);
        inner
            .counters
            .iter()
            .filter_map(|kv| kv.ok())
            .filter_map(|(k, v)| {
                let id = ImageId(<[u8; 32]>::try_from(k.as_ref()).ok()?);
                if !images.by_id.contains_key(&id) {
                    return None;
                }
                match serde_cbor::from_slice::<Counters>(&v) {
                    Ok(c) => Some((id, c)),
                    Err(e) => {
                        warn!(image = %id, error = %e, "skipping unreadable saved counters");
                        None
                    }
                }
            })
            .collect()
    }

    /// Path of the image's sparse file (read it via mmap; only the store writes it).
    pub fn image_path(&self, id: &ImageId) -> PathBuf {
        self.inner.image_path(id)
    }

    /// Bytes an unprivileged writer may still put on the store's file system (`statvfs`).
    pub fn free_space(&self) -> Result<u64, StoreError> {
        region::free_space(&self.inner.dir).map_err(|e| io_err(&self.inner.dir, e))
    }

    /// Bytes of `m`'s data chunks this store does not hold yet: what a download of it still
    /// writes at most (all-zero chunks never are; partly zero pages may end up as holes, so
    /// this is an upper bound).
    pub fn bytes_needed(&self, m: &Manifest) -> u64 {
        let e = self.inner.get(&m.id());
        (0..m.chunk_count())
            .filter(|&i| !m.chunks[i as usize].zero && !e.as_ref().is_some_and(|e| e.held.get(i)))
            .map(|i| m.chunk_len(i) as u64)
            .sum()
    }

    /// Checks the file system has room for `m`'s missing data chunks; the error says how
    /// much is needed and how much is free ([`StoreError::NoSpace`]).
    pub fn check_space(&self, m: &Manifest) -> Result<(), StoreError> {
        let needed = self.bytes_needed(m);
        let free = self.free_space()?;
        if needed > free {
            return Err(StoreError::NoSpace {
                dir: self.inner.dir.clone(),
                needed,
                free,
            });
        }
        Ok(())
    }

    /// Makes every held chunk's mark durable (fsync of the data, then of the index).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.inner.commit()?;
        self.inner.db.flush()?;
        Ok(())
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        if let Some(h) = self.committer.take() {
            // The committer drains the channel, so this send returns promptly.
            let _ = self.inner.nudge.send(Msg::Stop);
            let _ = h.join();
        }
        if let Err(e) = self.inner.commit() {
            warn!(dir = %self.inner.dir.display(), error = %e, "final commit of the chunk store failed; uncommitted chunks will be fetched again");
        }
    }
}

impl Inner {
    fn image_path(&self, id: &ImageId) -> PathBuf {
        self.images_dir.join(format!("{}.img", id.to_hex()))
    }

    fn get(&self, id: &ImageId) -> Option<Arc<Entry>> {
        read(&self.images).by_id.get(id).cloned()
    }

    fn entry(&self, id: &ImageId) -> Result<Arc<Entry>, StoreError> {
        self.get(id).ok_or(StoreError::UnknownImage(*id))
    }

    fn meta_of(&self, id: &ImageId) -> Meta {
        match self.meta.get(id.0) {
            Ok(Some(b)) => Meta::from_bytes(&b).unwrap_or_else(Meta::now),
            _ => Meta::now(),
        }
    }

    fn status(&self, e: &Entry) -> ImageStatus {
        let m = &e.manifest;
        let meta = self.meta_of(&e.id);
        let held = e.held_count.load(Ordering::Acquire);
        ImageStatus {
            id: e.id,
            image: m.image_ref(),
            base: m.base.clone(),
            kind: m.kind.clone(),
            size: m.size,
            chunk_size: m.chunk_size,
            held,
            total: e.total(),
            complete: held == e.total(),
            added_at: meta.added_at,
            last_used: meta.last_used,
            uses: meta.uses,
        }
    }

    /// Loads every image record, repairs what a crash can leave behind (missing or short
    /// files, orphan files and records), and fills the in-memory maps.
    fn load(&self) -> Result<(), StoreError> {
        let mut images = Images::default();
        for kv in self.manifests.iter() {
            let (k, v) = kv?;
            let Ok(raw) = <[u8; 32]>::try_from(k.as_ref()) else {
                warn!(key = ?k, "skipping a manifest record with a malformed key");
                continue;
            };
            let id = ImageId(raw);
            let m = match Manifest::from_bytes_with_id(&v, id) {
                Ok(m) => Arc::new(m),
                Err(e) => {
                    warn!(image = %id, error = %e, "skipping an unreadable manifest record");
                    continue;
                }
            };
            let entry = self.load_entry(id, m)?;
            let r = entry.manifest.image_ref();
            if self.refs.get(ref_key(&r))?.as_deref() != Some(&id.0[..]) {
                self.refs.insert(ref_key(&r), &id.0)?;
            }
            images.by_ref.insert(r, id);
            images.by_id.insert(id, Arc::new(entry));
        }
        // Records whose manifest is gone belong to a removal a crash interrupted.
        for tree in [&self.bitmaps, &self.meta, &self.counters] {
            for k in tree.iter().keys() {
                let k = k?;
                let known = <[u8; 32]>::try_from(k.as_ref())
                    .is_ok_and(|raw| images.by_id.contains_key(&ImageId(raw)));
                if !known {
                    tree.remove(k)?;
                }
            }
        }
        for kv in self.refs.iter() {
            let (k, v) = kv?;
            let known = <[u8; 32]>::try_from(v.as_ref())
                .is_ok_and(|raw| images.by_id.contains_key(&ImageId(raw)));
            if !known {
                self.refs.remove(k)?;
            }
        }
        self.remove_orphan_files(&images)?;
        self.db.flush()?;
        info!(dir = %self.dir.display(), images = images.by_id.len(), "chunk store opened");
        *write(&self.images) = images;
        Ok(())
    }

    fn load_entry(&self, id: ImageId, m: Arc<Manifest>) -> Result<Entry, StoreError> {
        let path = self.image_path(&id);
        let n = m.chunk_count();
        let mut bitmap = match self.bitmaps.get(id.0)? {
            Some(b) if b.len() == packed_len(n) => Some(b.to_vec()),
            Some(_) => {
                warn!(image = %id, "bitmap record has the wrong length; only all-zero chunks count as held");
                None
            }
            None => None,
        };
        let file = match File::options().read(true).write(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                warn!(image = %id, path = %path.display(), "image file is missing; its chunks will be fetched again");
                bitmap = None;
                File::options()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&path)
                    .map_err(|e| io_err(&path, e))?
            }
            Err(e) => return Err(io_err(&path, e)),
        };
        let len = file.metadata().map_err(|e| io_err(&path, e))?.len();
        if len != m.size {
            // A file of the wrong length would make maps of its tail fault (SIGBUS): fix
            // the length, and forget the chunks that were cut off.
            warn!(image = %id, path = %path.display(), len, size = m.size, "image file has the wrong length; fixing it");
            file.set_len(m.size).map_err(|e| io_err(&path, e))?;
            if let Some(b) = bitmap.as_mut() {
                for i in 0..n {
                    if m.chunk_offset(i) + m.chunk_len(i) as u64 > len {
                        packed_set(b, i, false);
                    }
                }
            }
        }
        let entry = Entry::new(m, path, file, bitmap.as_deref());
        let persisted = lock(&entry.persisted).clone();
        if self.bitmaps.get(id.0)?.as_deref() != Some(&persisted[..]) {
            self.bitmaps.insert(id.0, persisted)?;
        }
        if self.meta.get(id.0)?.is_none() {
            self.meta.insert(id.0, Meta::now().to_bytes())?;
        }
        Ok(entry)
    }

    /// Deletes leftovers of interrupted imports and of interrupted adds or removals.
    fn remove_orphan_files(&self, images: &Images) -> Result<(), StoreError> {
        let dir = &self.images_dir;
        for de in fs::read_dir(dir).map_err(|e| io_err(dir, e))? {
            let de = de.map_err(|e| io_err(dir, e))?;
            let name = de.file_name();
            let Some(name) = name.to_str() else { continue };
            let orphan = if name.starts_with(".import-") && name.ends_with(".tmp") {
                true
            } else if let Some(hex) = name.strip_suffix(".img") {
                hex.parse::<ImageId>()
                    .is_ok_and(|id| !images.by_id.contains_key(&id))
            } else {
                false
            };
            if orphan {
                debug!(file = %de.path().display(), "removing an orphan file");
                fs::remove_file(de.path()).map_err(|e| io_err(&de.path(), e))?;
            }
        }
        Ok(())
    }

    fn add_manifest(&self, m: &Manifest) -> Result<(), StoreError> {
        m.validate()
            .map_err(|e| StoreError::InvalidManifest(e.to_string()))?;
        let id = m.id();
        let r = m.image_ref();
        let _s = lock(&self.structure);
        {
            let images = read(&self.images);
            if images.by_id.contains_key(&id) {
                return Ok(());
            }
            if let Some(existing) = images.by_ref.get(&r) {
                return Err(StoreError::VersionExists {
                    image: r,
                    existing: *existing,
                    detail: format!("a manifest with id {id} was offered"),
                });
            }
        }
        let path = self.image_path(&id);
        // Truncating first also clears whatever an interrupted earlier attempt left.
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| io_err(&path, e))?;
        file.set_len(m.size).map_err(|e| io_err(&path, e))?;
        let entry = Entry::new(Arc::new(m.clone()), path.clone(), file, None);
        let bitmap = lock(&entry.persisted).clone();
        if let Err(e) = self.insert_records(m, id, &bitmap) {
            let _ = fs::remove_file(&path);
            return Err(e);
        }
        info!(image = %r, id = %id, chunks = m.chunk_count(), "manifest added");
        let mut images = write(&self.images);
        images.by_ref.insert(r, id);
        images.by_id.insert(id, Arc::new(entry));
        Ok(())
    }

    fn insert_records(&self, m: &Manifest, id: ImageId, bitmap: &[u8]) -> Result<(), StoreError> {
        let key = ref_key(&m.image_ref());
        let mbytes = m.to_bytes();
        let meta = Meta::now().to_bytes();
        (&self.manifests, &self.refs, &self.bitmaps, &self.meta)
            .transaction(|(mt, rt, bt, et)| {
                mt.insert(&id.0, mbytes.as_slice())?;
                rt.insert(key.as_slice(), &id.0)?;
                bt.insert(&id.0, bitmap)?;
                et.insert(&id.0, meta.as_slice())?;
                Ok::<(), ConflictableTransactionError<()>>(())
            })
            .map_err(tx_err)?;
        self.db.flush()?;
        Ok(())
    }

    fn remove(&self, id: &ImageId) -> Result<(), StoreError> {
        let _s = lock(&self.structure);
        let entry = self.entry(id)?;
        let r = entry.manifest.image_ref();
        {
            let _c = lock(&self.commit_lock);
            entry.removed.store(true, Ordering::Release);
            let key = ref_key(&r);
            let res = (
                &self.manifests,
                &self.refs,
                &self.bitmaps,
                &self.meta,
                &self.counters,
            )
                .transaction(|(mt, rt, bt, et, ct)| {
                    mt.remove(&id.0)?;
                    if rt.get(key.as_slice())?.as_deref() == Some(&id.0[..]) {
                        rt.remove(key.as_slice())?;
                    }
                    bt.remove(&id.0)?;
                    et.remove(&id.0)?;
                    ct.remove(&id.0)?;
                    Ok::<(), ConflictableTransactionError<()>>(())
                })
                .map_err(tx_err)
                .and_then(|()| self.db.flush().map_err(StoreError::Db));
            if let Err(e) = res {
                entry.removed.store(false, Ordering::Release);
                return Err(e);
            }
            let mut images = write(&self.images);
            images.by_id.remove(id);
            if images.by_ref.get(&r) == Some(id) {
                images.by_ref.remove(&r);
            }
        }
        match fs::remove_file(&entry.path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            // The records are gone; the next open deletes the orphan file.
            Err(e) => return Err(io_err(&entry.path, e)),
        }
        info!(image = %r, id = %id, "image removed");
        Ok(())
    }

    fn write(
        &self,
        e: &Arc<Entry>,
        idx: ChunkIndex,
        data: &[u8],
        verify: bool,
    ) -> Result<bool, StoreError> {
        e.check_index(idx)?;
        let m = &e.manifest;
        let want = m.chunk_len(idx);
        if data.len() != want {
            return Err(StoreError::WrongLength {
                image: e.id,
                index: idx,
                got: data.len(),
                want,
            });
        }
        // Hash before looking at the bitmap, so bad data is reported even for a chunk we
        // hold already (the sender deserves its penalty either way).
        if verify && sha256(data) != m.chunks[idx as usize].sha256 {
            return Err(StoreError::BadChunk {
                image: e.id,
                index: idx,
            });
        }
        let _claim = loop {
            if e.held.get(idx) {
                return Ok(false);
            }
            if e.writing.set(idx) {
                break Claim {
                    entry: e,
                    index: idx,
                };
            }
            // Another thread is writing this very chunk (a duplicate fetch); it takes
            // about as long as a memcpy of one chunk.
            std::thread::yield_now();
        };
        if e.held.get(idx) {
            return Ok(false);
        }
        {
            // One writer per file at a time: the file system serialises buffered writes to
            // one file anyway (inode lock), and its waiters spin on the CPU; ours sleep,
            // leaving the core to the hashing and the network.
            let _one = lock(&e.write_lock);
            let off = m.chunk_offset(idx);
            if let Err(err) =
                region::write_region(&e.file, &e.path, off, data, self.opts.mmap_writes)
            {
                // Nothing half-written counts as held (the chunk stays missing); give back
                // the blocks a partial write took, so a full disk is not fuller for it.
                region::discard(&e.file, off, data.len());
                return Err(err);
            }
        }
        // The bytes are in the file: only now may the chunk count as held.
        e.mark_held(idx);
        drop(_claim);
        self.queue_commit(e, &[idx], self.opts.release_written_pages)?;
        Ok(true)
    }

    /// Queues the marks of chunks just written (and marked held) for the next commit,
    /// and triggers it as the options say.
    fn queue_commit(
        &self,
        e: &Arc<Entry>,
        idxs: &[ChunkIndex],
        release: bool,
    ) -> Result<(), StoreError> {
        let waiting = {
            let mut p = lock(&self.pending);
            p.extend(idxs.iter().map(|&i| (Arc::clone(e), i, release)));
            p.len()
        };
        if self.opts.commit_batch <= 1 {
            self.commit()?;
        } else if waiting >= self.opts.commit_batch || e.complete() {
            // Full is fine: a nudge is already queued.
            let _ = self.nudge.try_send(Msg::Nudge);
        }
        Ok(())
    }

    /// Makes pending marks durable: fsync the image files, then write their bitmaps and
    /// flush sled. On failure the marks stay pending and are retried.
    fn commit(&self) -> Result<(), StoreError> {
        let mut last = lock(&self.commit_lock);
        release_pages(std::mem::take(&mut *last));
        let items = std::mem::take(&mut *lock(&self.pending));
        if items.is_empty() {
            return Ok(());
        }
        let mut groups: HashMap<ImageId, (Arc<Entry>, Vec<ChunkIndex>)> = HashMap::new();
        for (e, idx, _) in &items {
            if !e.removed.load(Ordering::Acquire) {
                groups
                    .entry(e.id)
                    .or_insert_with(|| (Arc::clone(e), Vec::new()))
                    .1
                    .push(*idx);
            }
        }
        let res = (|| {
            for (e, _) in groups.values() {
                e.file.sync_data().map_err(|err| io_err(&e.path, err))?;
            }
            for (e, idxs) in groups.values() {
                let mut persisted = lock(&e.persisted);
                for &i in idxs {
                    // A chunk found corrupt since it was written is no longer held.
                    if e.held.get(i) {
                        packed_set(&mut persisted, i, true);
                    }
                }
                self.bitmaps.insert(e.id.0, persisted.as_slice())?;
            }
            self.db.flush()?;
            Ok(())
        })();
        if let Err(err) = res {
            let mut p = lock(&self.pending);
            let mut items = items;
            items.append(&mut p);
            *p = items;
            return Err(err);
        }
        debug!(
            chunks = items.len(),
            images = groups.len(),
            "chunk marks committed"
        );
        *last = items
            .into_iter()
            .filter(|(_, _, release)| *release)
            .map(|(e, i, _)| (e, i))
            .collect();
        Ok(())
    }

    fn commit_loop(&self, rx: mpsc::Receiver<Msg>) {
        loop {
            match rx.recv_timeout(self.opts.commit_interval) {
                Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => return,
                Ok(Msg::Nudge) | Err(RecvTimeoutError::Timeout) => {
                    if let Err(e) = self.commit() {
                        warn!(dir = %self.dir.display(), error = %e, "committing chunk marks failed; will retry");
                    }
                }
            }
        }
    }

    /// A held chunk's stored bytes proved bad when `how` (read, exported, …): one warning
    /// line, the chunk marked missing durably, and queued for [`Store::take_lost`].
    fn found_corrupt(&self, e: &Entry, idx: ChunkIndex, how: &str) -> Result<(), StoreError> {
        if !e.held.get(idx) {
            // Another reader found it first.
            return Ok(());
        }
        warn!(image = %e.manifest.image_ref(), id = %e.id.short(), index = idx, when = how,
              "stored chunk no longer matches its SHA-256 (bit rot?); marked missing, no longer served or announced");
        self.unmark(e, idx)?;
        lock(&self.lost).push((e.id, idx));
        Ok(())
    }

    /// Marks a held chunk missing again (its stored bytes proved bad), durably.
    fn unmark(&self, e: &Entry, idx: ChunkIndex) -> Result<(), StoreError> {
        let _c = lock(&self.commit_lock);
        e.unmark_held(idx);
        if e.removed.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut persisted = lock(&e.persisted);
        packed_set(&mut persisted, idx, false);
        self.bitmaps.insert(e.id.0, persisted.as_slice())?;
        self.db.flush()?;
        Ok(())
    }

    fn export(
        &self,
        e: &Entry,
        out: &Path,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<(), StoreError> {
        let m = &e.manifest;
        let file = File::options()
            .write(true)
            .create(true)
            .truncate(true)
            .open(out)
            .map_err(|err| io_err(out, err))?;
        progress(0, m.size);
        // After a bad chunk the export is lost, but the other chunks are still checked, so
        // one pass finds (and marks missing) every bad chunk, and one download repairs all.
        let mut bad: Vec<ChunkIndex> = Vec::new();
        for idx in 0..e.total() {
            let (off, len) = (m.chunk_offset(idx), m.chunk_len(idx));
            let info = &m.chunks[idx as usize];
            if !info.zero {
                let written = region::with_region(&e.file, &e.path, off, len, |b| {
                    if sha256(b) != info.sha256 {
                        return Ok(false);
                    }
                    if !bad.is_empty() {
                        return Ok(true);
                    }
                    write_skipping_zero_pages(&file, b, off).map(|()| true)
                })?;
                match written {
                    Ok(true) => {}
                    Ok(false) => {
                        self.found_corrupt(e, idx, "exported")?;
                        bad.push(idx);
                    }
                    Err(err) => return Err(io_err(out, err)),
                }
            }
            progress(off + len as u64, m.size);
        }
        if let Some(&first) = bad.first() {
            return Err(StoreError::Corrupt {
                image: e.id,
                index: first,
                count: bad.len() as u32,
            });
        }
        // Trailing zero chunks were skipped: the length makes them a hole.
        file.set_len(m.size).map_err(|err| io_err(out, err))?;
        Ok(())
    }
}

/// Drops the page-cache pages of durable downloaded chunks, one call per run of
/// consecutive chunks of an image (see [`StoreOptions::release_written_pages`]). Advice
/// only: the kernel keeps pages that are dirty, mapped or under writeback, so nothing
/// can be lost, and a failure costs only memory.
fn release_pages(mut chunks: Vec<(Arc<Entry>, ChunkIndex)>) {
    chunks.retain(|(e, i)| {
        !e.removed.load(Ordering::Acquire) && !e.manifest.chunks[*i as usize].zero
    });
    chunks.sort_unstable_by_key(|(e, i)| (e.id, *i));
    let mut k = 0;
    while k < chunks.len() {
        let (e, first) = (&chunks[k].0, chunks[k].1);
        let mut last = first;
        k += 1;
        while k < chunks.len() && chunks[k].0.id == e.id && chunks[k].1 == last + 1 {
            last = chunks[k].1;
            k += 1;
        }
        let m = &e.manifest;
        let off = m.chunk_offset(first);
        let end = m.chunk_offset(last) + m.chunk_len(last) as u64;
        if let Err(err) = region::release_pages(&e.file, off, end - off) {
            debug!(path = %e.path.display(), error = %err, "releasing written pages failed");
        }
    }
}

/// Writes `data` at `off` of a freshly truncated file, leaving all-zero 4 KiB pages as
/// holes: disk images have many partly zero chunks, and the output stays as sparse as
/// the content allows.
fn write_skipping_zero_pages(out: &File, data: &[u8], off: u64) -> io::Result<()> {
    const PAGE: usize = 4096;
    let mut run: Option<usize> = None; // start of the current run of non-zero pages
    for (p, page) in data.chunks(PAGE).enumerate() {
        let start = p * PAGE;
        match (is_zero(page), run) {
            (false, None) => run = Some(start),
            (true, Some(s)) => {
                out.write_all_at(&data[s..start], off + s as u64)?;
                run = None;
            }
            _ => {}
        }
    }
    if let Some(s) = run {
        out.write_all_at(&data[s..], off + s as u64)?;
    }
    Ok(())
}

#[cfg(test)]
mod contract_tests;
#[cfg(test)]
mod tests;
