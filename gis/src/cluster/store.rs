//! The Raft log and state machine of a GIS replica, on sled (`raft.sled/` in the data dir:
//! tree `log` for entries by index, tree `meta` for the vote, commit, purge point, applied
//! position, membership and the latest snapshot, tree `live` for the replicated liveness,
//! one record per live host). Applying an entry is the
//! `Index`'s business (`GisState`); this module only orders, persists and snapshots.
// openraft's trait methods return its `StorageError` by value; the helpers here return the
// same type so `?` needs no conversion. Boxing it would only add an allocation per error.
#![allow(clippy::result_large_err)]

use super::{Applied, Command, NodeId, SharedState, TypeConfig};
use crate::index::{Index, IndexConfig};
use crate::storage::{StoredHolding, StoredHost, StoredImage};
use bids_protocols::gis::GisRequest;
use libp2p::PeerId;
use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    AnyError, BasicNode, Entry, EntryPayload, LogId, OptionalSend, RaftLogReader,
    RaftSnapshotBuilder, SnapshotMeta, StorageError, StorageIOError, StoredMembership, Vote,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use tracing::{info, warn};

/// The Raft database's directory inside the GIS data dir.
pub const RAFT_DIR: &str = "raft.sled";
/// Largest snapshot a replica accepts: the GIS's state is records of hosts, images and
/// holdings, far below this for any real site.
pub const MAX_SNAPSHOT_BYTES: usize = 1 << 30;

const VOTE: &[u8] = b"vote";
const COMMITTED: &[u8] = b"committed";
const PURGED: &[u8] = b"purged";
const APPLIED: &[u8] = b"applied";
const MEMBERSHIP: &[u8] = b"membership";
/// Older stores kept every live host in one record of `meta`, written whole by each apply
/// that registered a host: read once at open and moved into the `live` tree.
const LEGACY_LIVE: &[u8] = b"live";
/// The tree of live hosts: peer id bytes → the last-seen time the leader replicated.
const LIVE_TREE: &str = "live";
const SNAPSHOT: &[u8] = b"snapshot";

type Membership = StoredMembership<NodeId, BasicNode>;
type Result<T> = std::result::Result<T, StorageError<NodeId>>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("Raft database error: {0}; check the data dir's disk and permissions")]
    Sled(#[from] sled::Error),
    #[error("Raft database record {key} does not decode: {message}; the replica's raft.sled is damaged, remove the data dir and let the replica join again from a snapshot")]
    Decode { key: String, message: String },
}

/// The replicated GIS state at one log position: what a snapshot carries.
#[derive(Debug, Default, Serialize, Deserialize)]
struct SnapshotData {
    hosts: Vec<StoredHost>,
    images: Vec<StoredImage>,
    holdings: Vec<StoredHolding>,
    revocations: Vec<u64>,
    /// Hosts not marked dead, with the last-seen time the leader replicated.
    live: Vec<(PeerId, i64)>,
}

/// A snapshot as kept in `meta`: its Raft metadata and its bytes.
#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, BasicNode>,
    #[serde(with = "serde_bytes")]
    data: Vec<u8>,
}

fn encode<T: Serialize>(v: &T) -> std::result::Result<Vec<u8>, AnyError> {
    serde_cbor::to_vec(v).map_err(|e| AnyError::new(&e))
}

fn get<T: DeserializeOwned>(
    tree: &sled::Tree,
    key: &[u8],
) -> std::result::Result<Option<T>, StoreError> {
    match tree.get(key)? {
        None => Ok(None),
        Some(v) => serde_cbor::from_slice(&v)
            .map(Some)
            .map_err(|e| StoreError::Decode {
                key: String::from_utf8_lossy(key).into_owned(),
                message: e.to_string(),
            }),
    }
}

/// The live hosts recorded in the `live` tree.
fn read_live(tree: &sled::Tree) -> std::result::Result<Vec<(PeerId, i64)>, StoreError> {
    tree.iter()
        .map(|kv| {
            let (k, v) = kv?;
            let bad = |message: String| StoreError::Decode {
                key: format!("{LIVE_TREE}/{}", hex::encode(&k)),
                message,
            };
            let peer = PeerId::from_bytes(&k).map_err(|e| bad(e.to_string()))?;
            let at = <[u8; 8]>::try_from(v.as_ref())
                .map_err(|_| bad(format!("{} bytes, not 8", v.len())))?;
            Ok((peer, i64::from_be_bytes(at)))
        })
        .collect()
}

/// What an apply changed in the replicated liveness.
enum LiveUpdate {
    /// These hosts' records: alive since the time given, or not alive (`None`).
    Hosts(Vec<(PeerId, Option<i64>)>),
    /// Every live host (an installed snapshot): the tree is replaced.
    All(Vec<(PeerId, i64)>),
}

fn read_err(e: StoreError) -> StorageError<NodeId> {
    StorageIOError::read(AnyError::new(&e)).into()
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

/// sled's page cache for the Raft database (its default is 1 GiB). The log is appended and
/// read near its end, and a snapshot is read whole once in a while: with the 10,000 entries
/// kept behind a snapshot (`raft_config`), the default made the peak RSS of three replicas
/// registering 19,400 hosts 3.67-3.72 GiB in all; with this cache, 3.35 GiB.
const RAFT_DB_CACHE_BYTES: u64 = 64 << 20;

/// Opens the Raft database at `path` and the state machine over `state`. The state's index
/// was restored from the GIS storage; the liveness replicated before the last stop is put
/// back here (the GIS storage keeps no liveness).
pub fn open(
    path: &Path,
    index_cfg: IndexConfig,
    state: SharedState,
) -> std::result::Result<(LogStore, StateMachine), StoreError> {
    let db = sled::Config::new()
        .path(path)
        .cache_capacity(RAFT_DB_CACHE_BYTES)
        .open()?;
    let log = db.open_tree("log")?;
    let meta = db.open_tree("meta")?;
    let live_tree = db.open_tree(LIVE_TREE)?;
    let applied: Option<LogId<NodeId>> = get(&meta, APPLIED)?.flatten();
    let membership: Membership = get(&meta, MEMBERSHIP)?.unwrap_or_default();
    if let Some(legacy) = get::<Vec<(PeerId, i64)>>(&meta, LEGACY_LIVE)? {
        let mut batch = sled::Batch::default();
        for (peer, at) in &legacy {
            batch.insert(peer.to_bytes(), at.to_be_bytes().to_vec());
        }
        live_tree.apply_batch(batch)?;
        meta.remove(LEGACY_LIVE)?;
        db.flush()?;
        info!(
            hosts = legacy.len(),
            "Raft store: liveness moved to one record per host"
        );
    }
    let live = read_live(&live_tree)?;
    {
        let mut st = state.lock();
        for (peer, at) in &live {
            st.index.set_liveness(peer, true, *at);
        }
        st.applied = applied;
        st.membership = membership;
    }
    info!(path = %path.display(), applied = ?applied.map(|l| l.index), live = live.len(), "Raft store opened");
    Ok((
        LogStore {
            db: db.clone(),
            log,
            meta: meta.clone(),
        },
        StateMachine {
            db,
            meta,
            live: live_tree,
            state,
            index_cfg,
        },
    ))
}

/// The Raft log: entries by index in tree `log`, vote and purge point in `meta`.
#[derive(Clone)]
pub struct LogStore {
    db: sled::Db,
    log: sled::Tree,
    meta: sled::Tree,
}

impl LogStore {
    async fn put_meta<T: Serialize>(&self, key: &[u8], v: &T) -> std::result::Result<(), AnyError> {
        self.meta
            .insert(key, encode(v)?)
            .map_err(|e| AnyError::new(&e))?;
        self.db.flush_async().await.map_err(|e| AnyError::new(&e))?;
        Ok(())
    }

    fn decode_entry(key: &[u8], value: &[u8]) -> Result<Entry<TypeConfig>> {
        serde_cbor::from_slice(value).map_err(|e| {
            StorageIOError::read_logs(AnyError::error(format!(
                "log entry {} does not decode: {e}",
                hex::encode(key)
            )))
            .into()
        })
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>> {
        let start = match range.start_bound() {
            Bound::Included(x) => *x,
            Bound::Excluded(x) => x.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let mut out = Vec::new();
        for item in self.log.range(index_key(start)..) {
            let (k, v) = item.map_err(|e| StorageIOError::read_logs(AnyError::new(&e)))?;
            let entry = Self::decode_entry(&k, &v)?;
            if !range.contains(&entry.log_id.index) {
                break;
            }
            out.push(entry);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>> {
        let last_purged_log_id: Option<LogId<NodeId>> =
            get(&self.meta, PURGED).map_err(read_err)?.flatten();
        let last = match self
            .log
            .last()
            .map_err(|e| StorageIOError::read_logs(AnyError::new(&e)))?
        {
            Some((k, v)) => Some(Self::decode_entry(&k, &v)?.log_id),
            None => None,
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id: last.or(last_purged_log_id),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<()> {
        self.put_meta(VOTE, vote)
            .await
            .map_err(|e| StorageIOError::write_vote(e).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>> {
        get(&self.meta, VOTE).map_err(read_err)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<()> {
        self.put_meta(COMMITTED, &committed)
            .await
            .map_err(|e| StorageIOError::write(e).into())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>> {
        Ok(get(&self.meta, COMMITTED).map_err(read_err)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = sled::Batch::default();
        for entry in entries {
            let bytes = encode(&entry).map_err(StorageIOError::write_logs)?;
            batch.insert(&index_key(entry.log_id.index), bytes);
        }
        self.log
            .apply_batch(batch)
            .map_err(|e| StorageIOError::write_logs(AnyError::new(&e)))?;
        // Raft may count the entries only once they are on disk.
        let flushed = self.db.flush_async().await;
        callback.log_io_completed(flushed.map(|_| ()).map_err(std::io::Error::other));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<()> {
        let mut batch = sled::Batch::default();
        for item in self.log.range(index_key(log_id.index)..) {
            let (k, _) = item.map_err(|e| StorageIOError::write_logs(AnyError::new(&e)))?;
            batch.remove(k);
        }
        self.log
            .apply_batch(batch)
            .map_err(|e| StorageIOError::write_logs(AnyError::new(&e)))?;
        self.db
            .flush_async()
            .await
            .map_err(|e| StorageIOError::write_logs(AnyError::new(&e)))?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<()> {
        // The purge point first: a crash between the two leaves entries Raft will purge
        // again, never a hole it does not know of.
        self.put_meta(PURGED, &Some(log_id))
            .await
            .map_err(StorageIOError::write_logs)?;
        let mut batch = sled::Batch::default();
        for item in self.log.range(..=index_key(log_id.index)) {
            let (k, _) = item.map_err(|e| StorageIOError::write_logs(AnyError::new(&e)))?;
            batch.remove(k);
        }
        self.log
            .apply_batch(batch)
            .map_err(|e| StorageIOError::write_logs(AnyError::new(&e)))?;
        Ok(())
    }
}

/// Applies committed entries to the replica's `GisState` and keeps its snapshots.
pub struct StateMachine {
    db: sled::Db,
    meta: sled::Tree,
    live: sled::Tree,
    state: SharedState,
    index_cfg: IndexConfig,
}

impl StateMachine {
    /// Persists the liveness records an apply changed, then the applied position and
    /// membership. In that order: after a crash between the two, the entries are applied
    /// again and write the same records.
    async fn save_applied(
        &self,
        applied: Option<LogId<NodeId>>,
        membership: &Membership,
        live: LiveUpdate,
    ) -> std::result::Result<(), AnyError> {
        let mut hosts = sled::Batch::default();
        match live {
            LiveUpdate::Hosts(changed) => {
                for (peer, since) in changed {
                    match since {
                        Some(at) => hosts.insert(peer.to_bytes(), at.to_be_bytes().to_vec()),
                        None => hosts.remove(peer.to_bytes()),
                    }
                }
            }
            LiveUpdate::All(all) => {
                // One batch, so that a crash leaves the old records or the new, never none:
                // the records of hosts not in `all` are removed in it.
                let keep: std::collections::BTreeSet<Vec<u8>> =
                    all.iter().map(|(peer, _)| peer.to_bytes()).collect();
                for key in self.live.iter().keys() {
                    let key = key.map_err(|e| AnyError::new(&e))?;
                    if !keep.contains(key.as_ref()) {
                        hosts.remove(key);
                    }
                }
                for (peer, at) in all {
                    hosts.insert(peer.to_bytes(), at.to_be_bytes().to_vec());
                }
            }
        }
        self.live
            .apply_batch(hosts)
            .map_err(|e| AnyError::new(&e))?;
        let mut batch = sled::Batch::default();
        batch.insert(APPLIED, encode(&applied)?);
        batch.insert(MEMBERSHIP, encode(membership)?);
        self.meta
            .apply_batch(batch)
            .map_err(|e| AnyError::new(&e))?;
        self.db.flush_async().await.map_err(|e| AnyError::new(&e))?;
        Ok(())
    }

    fn current_snapshot(&self) -> Result<Option<StoredSnapshot>> {
        get(&self.meta, SNAPSHOT).map_err(read_err)
    }
}

/// Builds a snapshot of the state at its applied position.
pub struct SnapshotBuilder {
    db: sled::Db,
    meta: sled::Tree,
    state: SharedState,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>> {
        // One lock: the records, liveness and position all describe the same instant. The
        // records are copied from the index in memory, not read from the database: the
        // lock stops lookups and applies on this replica while it is held (reading 19,400
        // hosts back from sled held it for seconds, every few thousand entries).
        let (data, applied, membership) = {
            let st = self.state.lock();
            let stored = st.index.records();
            let data = SnapshotData {
                hosts: stored.hosts,
                images: stored.images,
                holdings: stored.holdings,
                revocations: stored.revocations.into_iter().collect(),
                live: st.index.live_hosts(),
            };
            (data, st.applied, st.membership.clone())
        };
        let bytes = encode(&data).map_err(StorageIOError::read_state_machine)?;
        let snapshot_id = match applied {
            Some(l) => format!("{}-{}-{}", l.leader_id, l.index, bytes.len()),
            None => format!("empty-{}", bytes.len()),
        };
        let meta = SnapshotMeta {
            last_log_id: applied,
            last_membership: membership,
            snapshot_id,
        };
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: bytes,
        };
        let enc = encode(&stored)
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), e))?;
        self.meta.insert(SNAPSHOT, enc).map_err(|e| {
            StorageIOError::write_snapshot(Some(meta.signature()), AnyError::new(&e))
        })?;
        self.db.flush_async().await.map_err(|e| {
            StorageIOError::write_snapshot(Some(meta.signature()), AnyError::new(&e))
        })?;
        info!(id = %meta.snapshot_id, hosts = data.hosts.len(), images = data.images.len(), "Raft snapshot built");
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId<NodeId>>, Membership)> {
        let st = self.state.lock();
        Ok((st.applied, st.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Applied>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut out = Vec::new();
        let (applied, membership, live, pending) = {
            let mut st = self.state.lock();
            // Hosts whose liveness the entries may set: registered or decided on. Only their
            // records are written, not every live host's again.
            let mut touched = Vec::new();
            for entry in entries {
                st.applied = Some(entry.log_id);
                match entry.payload {
                    EntryPayload::Blank => out.push(Applied::Nothing),
                    EntryPayload::Normal(cmd) => {
                        match &cmd {
                            Command::Liveness { peer, .. }
                            | Command::Request {
                                peer,
                                req: GisRequest::Register { .. },
                                ..
                            } => touched.push(*peer),
                            _ => {}
                        }
                        out.push(st.apply(cmd));
                    }
                    EntryPayload::Membership(m) => {
                        st.membership = StoredMembership::new(Some(entry.log_id), m);
                        out.push(Applied::Nothing);
                    }
                }
            }
            let pending = st.take_pending();
            touched.sort_unstable();
            touched.dedup();
            let live = touched
                .into_iter()
                .map(|peer| (peer, st.index.alive_since(&peer)))
                .collect();
            (
                st.applied,
                st.membership.clone(),
                LiveUpdate::Hosts(live),
                pending,
            )
        };
        // Written with the state unlocked: lookups go on meanwhile. Nothing else writes the
        // storage, and it is read only at start.
        pending
            .commit()
            .map_err(|e| StorageIOError::write_state_machine(AnyError::new(&e)))?;
        self.save_applied(applied, &membership, live)
            .await
            .map_err(StorageIOError::write_state_machine)?;
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            db: self.db.clone(),
            meta: self.meta.clone(),
            state: self.state.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<()> {
        let sig = || Some(meta.signature());
        let bytes = snapshot.into_inner();
        if bytes.len() > MAX_SNAPSHOT_BYTES {
            return Err(StorageIOError::read_snapshot(
                sig(),
                AnyError::error(format!(
                    "snapshot of {} bytes exceeds the limit of {MAX_SNAPSHOT_BYTES}",
                    bytes.len()
                )),
            )
            .into());
        }
        let data: SnapshotData = serde_cbor::from_slice(&bytes)
            .map_err(|e| StorageIOError::read_snapshot(sig(), AnyError::new(&e)))?;
        let live = data.live.clone();
        // The new index is built before the state is locked: lookups go on being answered
        // from the old state meanwhile.
        let mut index = Index::restore(
            self.index_cfg.clone(),
            crate::storage::Snapshot {
                hosts: data.hosts.clone(),
                images: data.images.clone(),
                holdings: data.holdings.clone(),
                revocations: data.revocations.iter().copied().collect(),
                skipped: 0,
            },
        );
        for (peer, at) in &live {
            index.set_liveness(peer, true, *at);
        }
        // Restoring queues no changes; the storage will hold the snapshot's records.
        let _ = index.take_changes();
        // The storage is rewritten with the state unlocked as well; only the swap holds it.
        let storage = self.state.lock().storage.clone();
        replace_storage(&mut **super::lock_storage(&storage), &data)
            .map_err(|e| StorageIOError::write_state_machine(AnyError::new(&e)))?;
        {
            let mut st = self.state.lock();
            st.index = index;
            st.applied = meta.last_log_id;
            st.membership = meta.last_membership.clone();
        }
        self.save_applied(
            meta.last_log_id,
            &meta.last_membership,
            LiveUpdate::All(live),
        )
        .await
        .map_err(StorageIOError::write_state_machine)?;
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: bytes,
        };
        let enc = encode(&stored).map_err(|e| StorageIOError::write_snapshot(sig(), e))?;
        self.meta
            .insert(SNAPSHOT, enc)
            .map_err(|e| StorageIOError::write_snapshot(sig(), AnyError::new(&e)))?;
        self.db
            .flush_async()
            .await
            .map_err(|e| StorageIOError::write_snapshot(sig(), AnyError::new(&e)))?;
        info!(id = %meta.snapshot_id, "Raft snapshot installed");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>> {
        Ok(self.current_snapshot()?.map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data)),
        }))
    }
}

/// Makes the GIS storage hold exactly the snapshot's records.
fn replace_storage(
    storage: &mut dyn crate::storage::Storage,
    data: &SnapshotData,
) -> std::result::Result<(), crate::storage::StorageError> {
    let old = storage.load()?;
    if old.skipped > 0 {
        warn!(
            skipped = old.skipped,
            "undecodable GIS records are replaced by the snapshot's"
        );
    }
    for h in &old.holdings {
        storage.delete_holding(&h.peer, &h.holding.image)?;
    }
    for i in &old.images {
        storage.delete_image(&i.id)?;
    }
    for h in &old.hosts {
        storage.delete_host(&h.peer)?;
    }
    for h in &data.hosts {
        storage.put_host(h)?;
    }
    for i in &data.images {
        storage.put_image(i)?;
    }
    for h in &data.holdings {
        storage.put_holding(h)?;
    }
    for s in &data.revocations {
        storage.put_revocation(*s)?;
    }
    storage.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{ClusterKey, GisState};
    use crate::storage::MemStorage;
    use bids_protocols::{Idc, Policy};
    use libp2p::identity::Keypair;

    fn index_cfg() -> IndexConfig {
        let mut cfg = IndexConfig::new(
            Keypair::generate_ed25519().public().to_peer_id(),
            Policy::Bids,
        );
        cfg.replicated_liveness = true;
        cfg
    }

    fn state(cfg: &IndexConfig, storage: &MemStorage) -> SharedState {
        let st = GisState::open(cfg.clone(), Box::new(storage.clone())).expect("state");
        SharedState::new(st, ClusterKey::from_hex(&"5a".repeat(32)).expect("key"))
    }

    fn entry(index: u64, cmd: Command) -> Entry<TypeConfig> {
        Entry {
            log_id: openraft::testing::log_id(1, 1, index),
            payload: EntryPayload::Normal(cmd),
        }
    }

    fn register(peer: PeerId, now_ms: i64) -> Command {
        Command::Request {
            peer,
            req: GisRequest::Register {
                idc: Idc::new("idc-a").expect("idc"),
                addrs: vec!["/ip4/10.0.0.1/tcp/4001".parse().expect("addr")],
                cert: None,
                policy: Policy::Bids,
            },
            now_ms,
        }
    }

    fn fresh_peers(n: usize) -> Vec<PeerId> {
        (0..n)
            .map(|_| Keypair::generate_ed25519().public().to_peer_id())
            .collect()
    }

    fn live(s: &SharedState) -> Vec<(PeerId, i64)> {
        let mut v = s.lock().index.live_hosts();
        v.sort();
        v
    }

    /// Registrations and liveness decisions write one record per host, and a replica that
    /// restarts from its data dir has exactly the liveness it had applied.
    #[tokio::test]
    async fn liveness_survives_a_restart_one_record_per_host() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(RAFT_DIR);
        let cfg = index_cfg();
        let storage = MemStorage::new();
        let peers = fresh_peers(4);
        let before = {
            let s = state(&cfg, &storage);
            let (_log, mut sm) = open(&path, cfg.clone(), s.clone()).expect("open");
            let mut entries: Vec<_> = peers
                .iter()
                .enumerate()
                .map(|(i, p)| entry(i as u64 + 1, register(*p, 1_000 + i as i64)))
                .collect();
            sm.apply(entries.drain(..))
                .await
                .expect("apply registrations");
            let decisions = vec![
                entry(
                    5,
                    Command::Liveness {
                        peer: peers[1],
                        alive: false,
                        now_ms: 2_000,
                    },
                ),
                entry(
                    6,
                    Command::Liveness {
                        peer: peers[2],
                        alive: true,
                        now_ms: 3_000,
                    },
                ),
            ];
            sm.apply(decisions).await.expect("apply liveness");
            assert_eq!(sm.live.len(), 3, "one record per live host");
            live(&s)
        };
        let mut expected = vec![(peers[0], 1_000), (peers[2], 3_000), (peers[3], 1_003)];
        expected.sort();
        assert_eq!(before, expected);
        let s = state(&cfg, &storage);
        let (_log, sm) = open(&path, cfg.clone(), s.clone()).expect("reopen");
        assert_eq!(live(&s), expected);
        let (applied, _) = {
            let st = s.lock();
            (st.applied, st.membership.clone())
        };
        assert_eq!(applied.map(|l| l.index), Some(6));
        drop(sm);
    }

    /// A snapshot's liveness replaces the records in one batch: hosts it does not list lose
    /// theirs, the others get the snapshot's times.
    #[tokio::test]
    async fn a_snapshots_liveness_replaces_the_records() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = index_cfg();
        let s = state(&cfg, &MemStorage::new());
        let (_log, mut sm) = open(&dir.path().join(RAFT_DIR), cfg, s).expect("open");
        let peers = fresh_peers(3);
        let regs: Vec<_> = peers
            .iter()
            .enumerate()
            .map(|(i, p)| entry(i as u64 + 1, register(*p, 100)))
            .collect();
        sm.apply(regs).await.expect("apply");
        assert_eq!(sm.live.len(), 3);
        let applied = Some(openraft::testing::log_id(1, 1, 3));
        sm.save_applied(
            applied,
            &Membership::default(),
            LiveUpdate::All(vec![(peers[2], 900), (peers[0], 700)]),
        )
        .await
        .expect("save");
        let mut expected = vec![(peers[0], 700), (peers[2], 900)];
        expected.sort();
        let mut got = read_live(&sm.live).expect("read");
        got.sort();
        assert_eq!(got, expected);
    }

    /// A store written by the older code kept all live hosts in one `meta` record; it opens
    /// with the same liveness and the record moves into the tree.
    #[test]
    fn the_older_single_record_is_read_and_moved() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(RAFT_DIR);
        let cfg = index_cfg();
        let storage = MemStorage::new();
        let peers = fresh_peers(2);
        {
            // The index must know the hosts for their liveness to apply.
            let s = state(&cfg, &storage);
            let mut st = s.lock();
            for (i, p) in peers.iter().enumerate() {
                let Command::Request { peer, req, now_ms } = register(*p, i as i64) else {
                    unreachable!()
                };
                st.index.handle(peer, req, now_ms);
            }
            st.persist().expect("persist");
        }
        {
            let db = sled::open(&path).expect("sled");
            let meta = db.open_tree("meta").expect("meta");
            let legacy = vec![(peers[0], 7_000i64), (peers[1], 8_000)];
            meta.insert(LEGACY_LIVE, serde_cbor::to_vec(&legacy).expect("cbor"))
                .expect("insert");
            db.flush().expect("flush");
        }
        let s = state(&cfg, &storage);
        let (_log, sm) = open(&path, cfg.clone(), s.clone()).expect("open");
        let mut expected = vec![(peers[0], 7_000), (peers[1], 8_000)];
        expected.sort();
        assert_eq!(live(&s), expected);
        assert_eq!(sm.live.len(), 2);
        assert!(sm.meta.get(LEGACY_LIVE).expect("get").is_none());
    }
}
