//! GIS replicas as one Raft group (openraft): every state change of the `Index` is a
//! replicated [`Command`] that each replica applies, in log order, to its own `Index` and
//! `Storage`; lookups read the local applied state. Consensus itself is openraft's.
//!
//! - [`store`]: the Raft log and the state machine on sled (a `raft.sled` next to the
//!   GIS's own database), with snapshots so a replaced replica joins from one.
//! - [`net`]: Raft RPCs between replicas over TCP with length-prefixed CBOR frames, plus
//!   writes and heartbeats a follower hands to the leader.
//! - [`server`]: the GIS event loop of a replica: reads from the local applied state,
//!   writes through Raft.
//!
//! The transport is a plain TCP listener, not the GIS's libp2p swarm: Raft heartbeats and
//! elections then never queue behind node requests in the swarm's event loop, and a replica
//! can be tested without a GIS server around it.

pub mod channel;
pub mod net;
pub mod server;
pub mod store;

pub use channel::ClusterKey;

use crate::index::{Index, IndexConfig};
use crate::storage::Storage;
use bids_protocols::gis::{GisRequest, GisResponse, HostStats};
use libp2p::PeerId;
use openraft::{BasicNode, Raft};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Cursor;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tracing::{info, warn};

/// A replica's id in the Raft group (unique in the group, chosen by the operator).
pub type NodeId = u64;

openraft::declare_raft_types!(
    /// The GIS's Raft types: replicated commands, their results, replicas addressed by the
    /// socket address of their Raft listener.
    pub TypeConfig:
        D = Command,
        R = Applied,
        NodeId = NodeId,
        Node = BasicNode,
);

/// The running Raft node of one replica.
pub type GisRaft = Raft<TypeConfig>;

/// One replicated state change. Applying the same commands in the same order to the same
/// `Index` gives the same `Index` on every replica: the leader's clock travels in `now_ms`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
// Like `GisRequest` itself: decoded once and applied at once; boxing buys nothing.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// A node's request that may change state (register, publish, unpublish, revoke), as
    /// the leader was asked it.
    Request {
        peer: PeerId,
        req: GisRequest,
        now_ms: i64,
    },
    /// The leader decided that a host died (no heartbeat within the timeout) or came back.
    Liveness {
        peer: PeerId,
        alive: bool,
        now_ms: i64,
    },
    /// The admin revoked a certificate serial through the admin control path.
    Revoke { requester: PeerId, serial: u64 },
}

/// What applying a [`Command`] answered; the leader hands it back to whoever proposed it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Applied {
    /// Blank and membership entries.
    Nothing,
    /// The `Index`'s answer to a `Command::Request`.
    Response(GisResponse),
    /// `Liveness`: whether the host was known.
    Known(bool),
    /// `Revoke`: the hosts whose certificate carried the serial, or the refusal.
    Revoked(Result<Vec<PeerId>, String>),
}

/// The replicated state of one replica: its `Index` and the `Storage` that keeps the
/// index's records. The state machine writes it; lookups read it.
pub struct GisState {
    pub index: Index,
    /// Written only by the state machine, which applies in log order. A lock of its own: a
    /// commit (sled, with its flush) runs after the state is unlocked, so lookups on this
    /// replica do not wait for the disk.
    storage: SharedStorage,
    /// The last log entry applied: the index and storage reflect exactly the log up to it.
    applied: Option<openraft::LogId<NodeId>>,
    membership: openraft::StoredMembership<NodeId, BasicNode>,
}

impl GisState {
    /// Restores the index from `storage`, as a single GIS does at start.
    pub fn open(
        cfg: IndexConfig,
        storage: Box<dyn Storage>,
    ) -> Result<Self, crate::storage::StorageError> {
        let snapshot = storage.load()?;
        let index = Index::restore(cfg, snapshot);
        Ok(GisState {
            index,
            storage: Arc::new(Mutex::new(storage)),
            applied: None,
            membership: Default::default(),
        })
    }

    /// Applies one command to the index; its changes stay queued in the index until
    /// [`GisState::persist`].
    fn apply(&mut self, cmd: Command) -> Applied {
        match cmd {
            Command::Request { peer, req, now_ms } => {
                Applied::Response(self.index.handle(peer, req, now_ms))
            }
            Command::Liveness {
                peer,
                alive,
                now_ms,
            } => Applied::Known(self.index.set_liveness(&peer, alive, now_ms)),
            Command::Revoke { requester, serial } => {
                Applied::Revoked(self.index.revoke(requester, serial).map_err(|e| e.message))
            }
        }
    }

    /// The last log position applied to this replica (None before the first).
    pub fn applied_index(&self) -> Option<u64> {
        self.applied.map(|l| l.index)
    }

    /// Takes the changes applied so far, to be made durable with [`Pending::commit`] once
    /// the state is unlocked.
    fn take_pending(&mut self) -> Pending {
        Pending {
            changes: self.index.take_changes(),
            storage: self.storage.clone(),
        }
    }

    /// Makes the changes applied so far durable (with the state locked; tests).
    #[cfg(test)]
    fn persist(&mut self) -> Result<(), crate::storage::StorageError> {
        self.take_pending().commit()
    }
}

type SharedStorage = Arc<Mutex<Box<dyn Storage>>>;

/// Locks the storage, even if a thread panicked while holding it.
fn lock_storage(s: &SharedStorage) -> MutexGuard<'_, Box<dyn Storage>> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

/// Applied changes not yet written to the GIS storage.
#[must_use = "the changes are durable only once committed"]
struct Pending {
    changes: Vec<crate::storage::Change>,
    storage: SharedStorage,
}

impl Pending {
    fn commit(self) -> Result<(), crate::storage::StorageError> {
        if self.changes.is_empty() {
            return Ok(());
        }
        lock_storage(&self.storage).commit(&self.changes)
    }
}

/// The applied state, shared by the state machine (writer) and the GIS server (reader).
/// Locked only for synchronous work, never across an `.await`.
#[derive(Clone)]
pub struct SharedState {
    state: Arc<Mutex<GisState>>,
    /// Hosts whose liveness record this replica is proposing: one proposal per host at a
    /// time, however many heartbeats or expiry ticks ask for it meanwhile.
    proposing: Arc<Mutex<BTreeSet<PeerId>>>,
    /// Connections to the leader for the writes this replica forwards.
    forwarder: net::Forwarder,
}

impl SharedState {
    /// The applied state of a replica whose group shares `key`.
    pub fn new(state: GisState, key: ClusterKey) -> Self {
        SharedState {
            state: Arc::new(Mutex::new(state)),
            proposing: Arc::default(),
            forwarder: net::Forwarder::new(key),
        }
    }

    /// Connections to the leader for the writes this replica forwards.
    pub fn forwarder(&self) -> &net::Forwarder {
        &self.forwarder
    }

    /// The state, even if a thread panicked while holding it (the index is rebuilt from
    /// the log on restart anyway; a poisoned lock must not stop the lookups).
    pub fn lock(&self) -> MutexGuard<'_, GisState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replicates that `peer` is alive or dead, unless such a proposal is under way.
    pub fn propose_liveness(&self, raft: &GisRaft, peer: PeerId, alive: bool, now_ms: i64) {
        {
            let mut p = self.proposing.lock().unwrap_or_else(|p| p.into_inner());
            if !p.insert(peer) {
                return;
            }
        }
        let raft = raft.clone();
        let proposing = self.proposing.clone();
        let forwarder = self.forwarder.clone();
        tokio::spawn(async move {
            let cmd = Command::Liveness {
                peer,
                alive,
                now_ms,
            };
            if let Err(e) = net::write_via_leader(&raft, &forwarder, cmd, WRITE_TIMEOUT).await {
                warn!(%peer, alive, error = %e, "could not replicate a host's liveness; the next heartbeat or expiry retries");
            }
            proposing
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&peer);
        });
    }

    /// A heartbeat, as the leader sees it (its own or relayed by a follower). One from a
    /// live host only refreshes the leader's clock and counters and writes nothing; one
    /// from a host marked dead replicates that it is alive again. Unknown hosts: ignored
    /// here (the replica they talk to refuses them).
    pub fn heartbeat_at_leader(&self, raft: &GisRaft, peer: PeerId, stats: HostStats, now_ms: i64) {
        let revive = {
            let mut st = self.lock();
            if !st.index.is_registered(&peer) {
                return;
            }
            if st.index.marked_alive(&peer) {
                let _ = st.index.heartbeat(peer, stats, now_ms);
                false
            } else {
                true
            }
        };
        if revive {
            self.propose_liveness(raft, peer, true, now_ms);
        }
    }
}

/// Where a replica sits in its group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterConfig {
    /// This replica's id; unique in the group.
    pub node_id: NodeId,
    /// Where this replica's Raft listener binds.
    pub raft_listen: SocketAddr,
    /// Every replica of the group, this one included: id → address of its Raft listener.
    /// Used to form the group the first time; afterwards the membership lives in the log.
    pub members: BTreeMap<NodeId, SocketAddr>,
    /// This replica replaces a lost one (a new id, an empty data dir): it never proposes a
    /// membership of its own and waits for the leader to add it ([`Replica::replace_member`]),
    /// which sends it a snapshot.
    pub join: bool,
    /// With `join`: the lost replica this one takes the place of (its vote goes away).
    pub replaces: Option<NodeId>,
    /// The secret every replica of the group holds: Raft connections prove it both ways
    /// and every message carries a tag under it (`channel`).
    pub key: ClusterKey,
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("Raft store: {0}")]
    Store(#[from] store::StoreError),
    #[error("GIS storage: {0}")]
    Storage(#[from] crate::storage::StorageError),
    #[error("could not bind the Raft listener on {addr}: {source}; pick a free address for this replica")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("replica {node_id} is not among the cluster members {members:?}; list every replica, this one included")]
    NotAMember {
        node_id: NodeId,
        members: Vec<NodeId>,
    },
    #[error("Raft could not start: {0}")]
    Fatal(String),
}

/// Raft timing for replicas on one site's network. openraft lets a follower stand for
/// election only after the leader's lease (`election_timeout_max`) plus its own election
/// timeout (drawn once in [min, max)), and a candidate that lost on a shorter log waits
/// another 2 × max. With 400–800 ms, 20 SIGKILLs of the leader were each followed by a new
/// leader in 1.30–1.61 s (600–1200 ms gave 1.9–2.3 s). A kill within a moment of a
/// replica's rejoining is slower (3–5 s measured): the rejoined replica stands first on a
/// log one entry short and loses.
pub fn raft_config() -> openraft::Config {
    openraft::Config {
        cluster_name: "bids-gis".into(),
        heartbeat_interval: 100,
        election_timeout_min: 400,
        election_timeout_max: 800,
        // A few entries per append: one entry may carry a manifest of megabytes, and the
        // transport splits batches that would not fit one frame anyway.
        max_payload_entries: 64,
        // Snapshot after this many applied entries, so a replaced replica catches up from
        // a snapshot instead of an endless log; and keep as many behind it, so a follower
        // that lagged (restarted, or busy) catches up from the log. Installing a snapshot
        // of 19,400 hosts took a replica 2-3 s, during which a registration storm (about
        // 600 entries a second through three replicas) committed more than the 1,000
        // entries then kept: the follower was sent snapshot after snapshot (gis/RESULTS.md,
        // "Snapshots during a registration storm"). The cost is disk: 10,000 entries of
        // registrations and publications, a few KB each where a manifest travels.
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(10_000),
        max_in_snapshot_log_to_keep: 10_000,
        snapshot_max_chunk_size: 1024 * 1024,
        ..Default::default()
    }
}

/// A running replica: its Raft node, its applied state, its Raft listener.
pub struct Replica {
    pub node_id: NodeId,
    pub raft: GisRaft,
    pub state: SharedState,
    /// Where the Raft listener is bound (useful when configured with port 0).
    pub raft_addr: SocketAddr,
    listener: tokio::task::JoinHandle<()>,
    /// A joining replica's requests to be added, until the leader added it.
    joiner: Option<tokio::task::JoinHandle<()>>,
}

impl Replica {
    /// Starts a replica: binds its Raft listener on `cfg.raft_listen`, then as
    /// [`Replica::start_on`].
    pub async fn start(
        cfg: &ClusterConfig,
        data_dir: &Path,
        index_cfg: IndexConfig,
        storage: Box<dyn Storage>,
        raft_cfg: openraft::Config,
    ) -> Result<Replica, ClusterError> {
        let listener = tokio::net::TcpListener::bind(cfg.raft_listen)
            .await
            .map_err(|source| ClusterError::Bind {
                addr: cfg.raft_listen,
                source,
            })?;
        Self::start_on(listener, cfg, data_dir, index_cfg, storage, raft_cfg).await
    }

    /// Starts a replica on an already bound Raft listener: opens the Raft store under
    /// `data_dir` and, if this replica's log is empty, proposes the initial membership
    /// (every fresh member does; Raft keeps one). The log is applied to `storage` and the
    /// index restored from it.
    pub async fn start_on(
        listener: tokio::net::TcpListener,
        cfg: &ClusterConfig,
        data_dir: &Path,
        index_cfg: IndexConfig,
        storage: Box<dyn Storage>,
        raft_cfg: openraft::Config,
    ) -> Result<Replica, ClusterError> {
        if !cfg.members.contains_key(&cfg.node_id) {
            return Err(ClusterError::NotAMember {
                node_id: cfg.node_id,
                members: cfg.members.keys().copied().collect(),
            });
        }
        let state = SharedState::new(GisState::open(index_cfg.clone(), storage)?, cfg.key.clone());
        let (log_store, state_machine) =
            store::open(&data_dir.join(store::RAFT_DIR), index_cfg, state.clone())?;
        let raft_addr = listener.local_addr().map_err(|source| ClusterError::Bind {
            addr: cfg.raft_listen,
            source,
        })?;
        let raft_cfg = raft_cfg
            .validate()
            .map_err(|e| ClusterError::Fatal(e.to_string()))?;
        let raft = Raft::new(
            cfg.node_id,
            Arc::new(raft_cfg),
            net::Network(cfg.key.clone()),
            log_store,
            state_machine,
        )
        .await
        .map_err(|e| ClusterError::Fatal(e.to_string()))?;
        let listener = tokio::spawn(net::serve(listener, raft.clone(), state.clone()));
        let members: BTreeMap<NodeId, BasicNode> = cfg
            .members
            .iter()
            .map(|(id, addr)| (*id, BasicNode::new(addr.to_string())))
            .collect();
        // Only a founding replica with an empty log initialises; one that already holds a log
        // (a restart, or a replica that joined) keeps the membership it has.
        match raft.is_initialized().await {
            Ok(true) => info!(node = cfg.node_id, "Raft replica restarted from its log"),
            Ok(false) if cfg.join => {
                info!(node = cfg.node_id, %raft_addr, replaces = ?cfg.replaces, "Raft replica asks the group to add it");
            }
            Ok(false) => match raft.initialize(members).await {
                Ok(()) => info!(node = cfg.node_id, %raft_addr, "Raft group initialised"),
                Err(e) => {
                    warn!(node = cfg.node_id, error = %e, "Raft group not initialised here (another replica did)")
                }
            },
            Err(e) => return Err(ClusterError::Fatal(e.to_string())),
        }
        let joiner = match raft.is_initialized().await {
            Ok(false) if cfg.join => {
                let peers: Vec<SocketAddr> = cfg
                    .members
                    .iter()
                    .filter(|(id, _)| **id != cfg.node_id)
                    .map(|(_, a)| *a)
                    .collect();
                Some(tokio::spawn(net::ask_to_join(
                    raft.clone(),
                    cfg.key.clone(),
                    cfg.node_id,
                    raft_addr,
                    cfg.replaces,
                    peers,
                )))
            }
            _ => None,
        };
        info!(node = cfg.node_id, %raft_addr, "GIS replica started");
        Ok(Replica {
            node_id: cfg.node_id,
            raft,
            state,
            raft_addr,
            listener,
            joiner,
        })
    }

    /// The leader's id as this replica knows it.
    pub fn leader(&self) -> Option<NodeId> {
        self.raft.metrics().borrow().current_leader
    }

    /// Proposes `cmd` through the leader and returns what applying it answered. A follower
    /// forwards it to the leader's Raft listener.
    pub async fn write(&self, cmd: Command) -> Result<Applied, WriteError> {
        net::write_via_leader(&self.raft, self.state.forwarder(), cmd, WRITE_TIMEOUT).await
    }

    /// On the leader: replaces the lost replica `old` by `new` (started with `join`, its Raft
    /// listener at `addr`). `new` first follows as a learner until it caught up (from a
    /// snapshot when the log it lacks is purged), then takes `old`'s vote.
    pub async fn replace_member(
        &self,
        old: NodeId,
        new: NodeId,
        addr: SocketAddr,
    ) -> Result<(), WriteError> {
        add_member(&self.raft, new, addr, Some(old)).await
    }

    /// Stops Raft and the listener (the sled files stay, for a restart).
    pub async fn shutdown(mut self) {
        if let Some(j) = &self.joiner {
            j.abort();
        }
        self.listener.abort();
        // Connections still open hold the Raft handle; wait for the listener task (and its
        // connection set) to be gone before Raft is asked to stop.
        let _ = (&mut self.listener).await;
        if let Err(e) = self.raft.shutdown().await {
            warn!(node = self.node_id, error = %e, "Raft shut down with an error");
        }
        info!(node = self.node_id, "GIS replica stopped");
    }
}

impl Drop for Replica {
    /// A replica dropped without `shutdown` (its task aborted) still closes its listener;
    /// Raft stops once its last handle is gone.
    fn drop(&mut self) {
        self.listener.abort();
        if let Some(j) = &self.joiner {
            j.abort();
        }
    }
}

/// On the leader: adds replica `new` (its Raft listener at `addr`) as a learner, waits until
/// it caught up (from a snapshot when the log it lacks is purged), then makes it a voter in
/// place of `replaces` (or beside the others).
pub async fn add_member(
    raft: &GisRaft,
    new: NodeId,
    addr: SocketAddr,
    replaces: Option<NodeId>,
) -> Result<(), WriteError> {
    info!(new, %addr, ?replaces, "adding a GIS replica; it catches up as a learner first");
    raft.add_learner(new, BasicNode::new(addr.to_string()), true)
        .await
        .map_err(|e| WriteError::Raft(e.to_string()))?;
    let voters: BTreeSet<NodeId> = raft
        .metrics()
        .borrow()
        .membership_config
        .membership()
        .voter_ids()
        .filter(|id| Some(*id) != replaces)
        .chain([new])
        .collect();
    raft.change_membership(voters.clone(), false)
        .await
        .map_err(|e| WriteError::Raft(e.to_string()))?;
    info!(new, %addr, ?replaces, ?voters, "GIS replica added");
    Ok(())
}

/// How long a write may wait for a leader and its commit.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("no GIS leader is known right now (election under way or no quorum); retry in a few seconds")]
    NoLeader,
    #[error("the GIS leader did not commit the write within {0:?}; retry, and check that a majority of replicas runs")]
    Timeout(Duration),
    #[error("forwarding the write to the GIS leader failed: {0}")]
    Forward(String),
    #[error("Raft refused the write: {0}")]
    Raft(String),
}
