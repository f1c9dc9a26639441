//! Durable GIS state: the records the `Index` asks to keep (hosts, images, holdings,
//! revocations) behind a small `Storage` trait, with sled as the default backend and an
//! in-memory one for tests. Liveness and heartbeat statistics are volatile and never stored;
//! what the records mean is the `Index`'s business, not this module's.

use bids_protocols::cert::BridgeheadCert;
use bids_protocols::gis::Holding;
use bids_protocols::{Idc, ImageId};
use libp2p::{Multiaddr, PeerId};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// The persisted part of a host: who it is and where, never whether it is alive.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredHost {
    pub peer: PeerId,
    pub idc: Idc,
    pub addrs: Vec<Multiaddr>,
    /// Kept only if it verified when the host registered.
    pub cert: Option<BridgeheadCert>,
    /// Unix milliseconds of the first registration.
    pub registered_ms: i64,
}

/// A published image (or delta file): its canonical manifest bytes. Everything else about
/// it is derived from them again when loaded, so a damaged record cannot lie about its id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredImage {
    pub id: ImageId,
    #[serde(with = "serde_bytes")]
    pub manifest: Vec<u8>,
    /// The host that published it first.
    pub publisher: PeerId,
    /// Unix milliseconds of the first publication.
    pub published_ms: i64,
}

/// One host's holding of one image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredHolding {
    pub peer: PeerId,
    pub holding: Holding,
}

/// One state change of the `Index`, to be made durable before the reply that caused it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Boxed: a host record (with its certificate) is much larger than the other changes.
    PutHost(Box<StoredHost>),
    DeleteHost(PeerId),
    PutImage(StoredImage),
    DeleteImage(ImageId),
    PutHolding(StoredHolding),
    DeleteHolding {
        peer: PeerId,
        image: ImageId,
    },
    PutRevocation(u64),
}

/// Everything a storage holds, as loaded at start.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub hosts: Vec<StoredHost>,
    pub images: Vec<StoredImage>,
    pub holdings: Vec<StoredHolding>,
    pub revocations: BTreeSet<u64>,
    /// Records that could not be decoded and were left out (each is also logged).
    pub skipped: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("GIS database error: {0}")]
    Sled(#[from] sled::Error),
    #[error("the GIS commit thread stopped; the GIS stops too (its log says why)")]
    CommitThread,
    #[error("could not encode a GIS record: {0}")]
    Encode(String),
    #[error("GIS database at {path} has format version {found:?}, this GIS understands {expected}; use a matching release or a new data dir")]
    Format {
        path: String,
        found: String,
        expected: u32,
    },
}

/// Where the GIS keeps its records. Writes may be buffered until `flush`; `commit` is what
/// the server calls once per batch of requests, before it replies.
pub trait Storage: Send {
    fn load(&self) -> Result<Snapshot, StorageError>;
    fn put_host(&mut self, host: &StoredHost) -> Result<(), StorageError>;
    fn delete_host(&mut self, peer: &PeerId) -> Result<(), StorageError>;
    fn put_image(&mut self, image: &StoredImage) -> Result<(), StorageError>;
    fn delete_image(&mut self, id: &ImageId) -> Result<(), StorageError>;
    fn put_holding(&mut self, holding: &StoredHolding) -> Result<(), StorageError>;
    fn delete_holding(&mut self, peer: &PeerId, image: &ImageId) -> Result<(), StorageError>;
    fn put_revocation(&mut self, serial: u64) -> Result<(), StorageError>;
    /// Makes every write so far durable (survives SIGKILL and power loss as far as the
    /// backend can promise).
    fn flush(&mut self) -> Result<(), StorageError>;

    /// Applies `changes` in order and flushes. Backends that can should make the batch
    /// atomic.
    fn commit(&mut self, changes: &[Change]) -> Result<(), StorageError> {
        for c in changes {
            match c {
                Change::PutHost(h) => self.put_host(h)?,
                Change::DeleteHost(p) => self.delete_host(p)?,
                Change::PutImage(i) => self.put_image(i)?,
                Change::DeleteImage(id) => self.delete_image(id)?,
                Change::PutHolding(h) => self.put_holding(h)?,
                Change::DeleteHolding { peer, image } => self.delete_holding(peer, image)?,
                Change::PutRevocation(s) => self.put_revocation(*s)?,
            }
        }
        self.flush()
    }
}

// Key layout of the single sled tree. One tree (not one per record kind) so that a batch of
// changes is applied atomically with `apply_batch`.
const FORMAT_KEY: &[u8] = b"v";
const FORMAT_VERSION: u32 = 1;
const HOST: u8 = b'h';
const IMAGE: u8 = b'i';
const HOLDING: u8 = b'o';
const REVOCATION: u8 = b'r';

fn host_key(peer: &PeerId) -> Vec<u8> {
    let mut k = vec![HOST];
    k.extend(peer.to_bytes());
    k
}
fn image_key(id: &ImageId) -> Vec<u8> {
    let mut k = vec![IMAGE];
    k.extend(id.0);
    k
}
fn holding_key(peer: &PeerId, image: &ImageId) -> Vec<u8> {
    let mut k = vec![HOLDING];
    k.extend(image.0);
    k.extend(peer.to_bytes());
    k
}
fn revocation_key(serial: u64) -> Vec<u8> {
    let mut k = vec![REVOCATION];
    k.extend(serial.to_be_bytes());
    k
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, StorageError> {
    serde_cbor::to_vec(v).map_err(|e| StorageError::Encode(e.to_string()))
}

/// Decodes every record under `prefix`; undecodable ones are counted and logged, not fatal,
/// so one damaged record cannot keep the GIS from starting.
fn load_prefix<T: serde::de::DeserializeOwned>(
    db: &sled::Db,
    prefix: u8,
    what: &str,
    skipped: &mut usize,
) -> Result<Vec<T>, StorageError> {
    let mut out = Vec::new();
    for item in db.scan_prefix([prefix]) {
        let (key, value) = item?;
        match serde_cbor::from_slice(&value) {
            Ok(v) => out.push(v),
            Err(e) => {
                *skipped += 1;
                tracing::warn!(key = %hex::encode(&key), error = %e, "skipping undecodable {what} record");
            }
        }
    }
    Ok(out)
}

/// The default backend: one sled database in the GIS data dir.
pub struct SledStorage {
    db: sled::Db,
}

impl SledStorage {
    /// Opens (or creates) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, StorageError> {
        let db = sled::open(path)?;
        match db.get(FORMAT_KEY)? {
            None => {
                db.insert(FORMAT_KEY, FORMAT_VERSION.to_string().as_bytes())?;
                db.flush()?;
            }
            Some(v) if v.as_ref() == FORMAT_VERSION.to_string().as_bytes() => {}
            Some(v) => {
                return Err(StorageError::Format {
                    path: path.display().to_string(),
                    found: String::from_utf8_lossy(&v).into_owned(),
                    expected: FORMAT_VERSION,
                })
            }
        }
        Ok(SledStorage { db })
    }

    fn batch_op(batch: &mut sled::Batch, c: &Change) -> Result<(), StorageError> {
        match c {
            Change::PutHost(h) => batch.insert(host_key(&h.peer), encode(h.as_ref())?),
            Change::DeleteHost(p) => batch.remove(host_key(p)),
            Change::PutImage(i) => batch.insert(image_key(&i.id), encode(i)?),
            Change::DeleteImage(id) => batch.remove(image_key(id)),
            Change::PutHolding(h) => {
                batch.insert(holding_key(&h.peer, &h.holding.image), encode(h)?)
            }
            Change::DeleteHolding { peer, image } => batch.remove(holding_key(peer, image)),
            Change::PutRevocation(s) => batch.insert(revocation_key(*s), &[] as &[u8]),
        }
        Ok(())
    }
}

impl Storage for SledStorage {
    fn load(&self) -> Result<Snapshot, StorageError> {
        let mut skipped = 0;
        let hosts = load_prefix(&self.db, HOST, "host", &mut skipped)?;
        let images = load_prefix(&self.db, IMAGE, "image", &mut skipped)?;
        let holdings = load_prefix(&self.db, HOLDING, "holding", &mut skipped)?;
        let mut revocations = BTreeSet::new();
        for item in self.db.scan_prefix([REVOCATION]) {
            let (key, _) = item?;
            match <[u8; 8]>::try_from(&key[1..]) {
                Ok(b) => {
                    revocations.insert(u64::from_be_bytes(b));
                }
                Err(_) => {
                    skipped += 1;
                    tracing::warn!(key = %hex::encode(&key), "skipping malformed revocation record");
                }
            }
        }
        Ok(Snapshot {
            hosts,
            images,
            holdings,
            revocations,
            skipped,
        })
    }

    fn put_host(&mut self, host: &StoredHost) -> Result<(), StorageError> {
        self.db.insert(host_key(&host.peer), encode(host)?)?;
        Ok(())
    }
    fn delete_host(&mut self, peer: &PeerId) -> Result<(), StorageError> {
        self.db.remove(host_key(peer))?;
        Ok(())
    }
    fn put_image(&mut self, image: &StoredImage) -> Result<(), StorageError> {
        self.db.insert(image_key(&image.id), encode(image)?)?;
        Ok(())
    }
    fn delete_image(&mut self, id: &ImageId) -> Result<(), StorageError> {
        self.db.remove(image_key(id))?;
        Ok(())
    }
    fn put_holding(&mut self, holding: &StoredHolding) -> Result<(), StorageError> {
        self.db.insert(
            holding_key(&holding.peer, &holding.holding.image),
            encode(holding)?,
        )?;
        Ok(())
    }
    fn delete_holding(&mut self, peer: &PeerId, image: &ImageId) -> Result<(), StorageError> {
        self.db.remove(holding_key(peer, image))?;
        Ok(())
    }
    fn put_revocation(&mut self, serial: u64) -> Result<(), StorageError> {
        self.db.insert(revocation_key(serial), &[] as &[u8])?;
        Ok(())
    }
    fn flush(&mut self) -> Result<(), StorageError> {
        self.db.flush()?;
        Ok(())
    }

    /// One atomic batch, then an fsync: a GIS killed right after replying loses nothing.
    fn commit(&mut self, changes: &[Change]) -> Result<(), StorageError> {
        let mut batch = sled::Batch::default();
        for c in changes {
            Self::batch_op(&mut batch, c)?;
        }
        self.db.apply_batch(batch)?;
        self.db.flush()?;
        Ok(())
    }
}

#[derive(Default, Debug)]
struct MemState {
    hosts: BTreeMap<PeerId, StoredHost>,
    images: BTreeMap<ImageId, StoredImage>,
    holdings: BTreeMap<(ImageId, PeerId), StoredHolding>,
    revocations: BTreeSet<u64>,
    flushes: u64,
}

/// In-memory backend for tests and simulations. Clones share the same state, so a test can
/// keep one clone and "restart" an `Index` from it.
#[derive(Clone, Default, Debug)]
pub struct MemStorage {
    state: Arc<Mutex<MemState>>,
}

impl MemStorage {
    pub fn new() -> Self {
        Self::default()
    }

    /// How many times `flush` (or `commit`) ran: lets tests check that changes were made
    /// durable.
    pub fn flushes(&self) -> u64 {
        self.with(|s| s.flushes)
    }

    fn with<R>(&self, f: impl FnOnce(&mut MemState) -> R) -> R {
        // A poisoned lock only means another test thread panicked mid-update; the maps are
        // still usable for the remaining assertions.
        let mut guard = match self.state.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&mut guard)
    }
}

impl Storage for MemStorage {
    fn load(&self) -> Result<Snapshot, StorageError> {
        Ok(self.with(|s| Snapshot {
            hosts: s.hosts.values().cloned().collect(),
            images: s.images.values().cloned().collect(),
            holdings: s.holdings.values().cloned().collect(),
            revocations: s.revocations.clone(),
            skipped: 0,
        }))
    }
    fn put_host(&mut self, host: &StoredHost) -> Result<(), StorageError> {
        self.with(|s| s.hosts.insert(host.peer, host.clone()));
        Ok(())
    }
    fn delete_host(&mut self, peer: &PeerId) -> Result<(), StorageError> {
        self.with(|s| s.hosts.remove(peer));
        Ok(())
    }
    fn put_image(&mut self, image: &StoredImage) -> Result<(), StorageError> {
        self.with(|s| s.images.insert(image.id, image.clone()));
        Ok(())
    }
    fn delete_image(&mut self, id: &ImageId) -> Result<(), StorageError> {
        self.with(|s| s.images.remove(id));
        Ok(())
    }
    fn put_holding(&mut self, holding: &StoredHolding) -> Result<(), StorageError> {
        self.with(|s| {
            s.holdings
                .insert((holding.holding.image, holding.peer), holding.clone())
        });
        Ok(())
    }
    fn delete_holding(&mut self, peer: &PeerId, image: &ImageId) -> Result<(), StorageError> {
        self.with(|s| s.holdings.remove(&(*image, *peer)));
        Ok(())
    }
    fn put_revocation(&mut self, serial: u64) -> Result<(), StorageError> {
        self.with(|s| s.revocations.insert(serial));
        Ok(())
    }
    fn flush(&mut self) -> Result<(), StorageError> {
        self.with(|s| s.flushes += 1);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::identity::Keypair;

    fn sample() -> Vec<Change> {
        let peer = Keypair::generate_ed25519().public().to_peer_id();
        let id = ImageId([3; 32]);
        vec![
            Change::PutHost(Box::new(StoredHost {
                peer,
                idc: Idc::new("A").unwrap(),
                addrs: vec!["/ip4/127.0.0.1/tcp/1".parse().unwrap()],
                cert: None,
                registered_ms: 5,
            })),
            Change::PutImage(StoredImage {
                id,
                manifest: vec![1, 2, 3],
                publisher: peer,
                published_ms: 6,
            }),
            Change::PutHolding(StoredHolding {
                peer,
                holding: Holding {
                    image: id,
                    chunks_held: 2,
                    complete: false,
                    fetching: true,
                },
            }),
            Change::PutRevocation(77),
            Change::PutRevocation(3),
        ]
    }

    fn check_backend(mut s: impl Storage, reopen: impl Fn() -> Box<dyn Storage>) {
        let changes = sample();
        s.commit(&changes).unwrap();
        let snap = reopen().load().unwrap();
        assert_eq!(snap.hosts.len(), 1);
        assert_eq!(snap.images.len(), 1);
        assert_eq!(snap.holdings.len(), 1);
        assert_eq!(snap.revocations, BTreeSet::from([3, 77]));
        assert_eq!(snap.skipped, 0);
        let Change::PutHolding(h) = &changes[2] else {
            unreachable!()
        };
        let Change::PutHost(host) = &changes[0] else {
            unreachable!()
        };
        assert_eq!(&snap.holdings[0], h);
        assert_eq!(&snap.hosts[0], host.as_ref());
        s.commit(&[
            Change::DeleteHolding {
                peer: h.peer,
                image: h.holding.image,
            },
            Change::DeleteImage(h.holding.image),
            Change::DeleteHost(h.peer),
        ])
        .unwrap();
        let snap = reopen().load().unwrap();
        assert!(snap.hosts.is_empty() && snap.images.is_empty() && snap.holdings.is_empty());
        assert_eq!(snap.revocations.len(), 2);
    }

    #[test]
    fn mem_storage_round_trip() {
        let m = MemStorage::new();
        let shared = m.clone();
        let view = m.clone();
        check_backend(m, move || Box::new(view.clone()));
        assert_eq!(shared.flushes(), 2);
    }

    #[test]
    fn sled_storage_round_trip_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let s = SledStorage::open(&path).unwrap();
        // sled allows one open handle per path, so this view shares the handle; the test
        // below closes and really reopens the database.
        let db = s.db.clone();
        check_backend(s, move || Box::new(SledStorage { db: db.clone() }));
    }

    #[test]
    fn sled_storage_survives_close_and_skips_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            let mut s = SledStorage::open(&path).unwrap();
            s.commit(&sample()).unwrap();
            s.db.insert(host_key(&PeerId::random()), &b"not cbor"[..])
                .unwrap();
            s.db.flush().unwrap();
        }
        let s = SledStorage::open(&path).unwrap();
        let snap = s.load().unwrap();
        assert_eq!(snap.hosts.len(), 1);
        assert_eq!(snap.skipped, 1);
    }

    #[test]
    fn sled_refuses_other_format_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            let s = SledStorage::open(&path).unwrap();
            s.db.insert(FORMAT_KEY, &b"99"[..]).unwrap();
            s.db.flush().unwrap();
        }
        let err = SledStorage::open(&path).err().unwrap();
        assert!(err.to_string().contains("format version"), "{err}");
    }
}
