//! Raft RPCs between GIS replicas: one TCP connection per peer, each message a 4-byte
//! big-endian length then CBOR (the `bids_protocols::codec` framing) with a size limit
//! checked before anything is allocated. Every connection proves the group's cluster key
//! both ways and tags every message (`super::channel`). Also carries writes a follower
//! forwards to the leader. Raft itself decides what to send; this module only moves it.

use super::channel::{Channel, ClusterKey, HANDSHAKE_TIMEOUT};
use super::{Applied, Command, GisRaft, NodeId, SharedState, TypeConfig, WriteError};
use bids_protocols::codec::encode_frame;
use bids_protocols::gis::HostStats;
use bids_protocols::gis::MAX_RESPONSE_BYTES;
use libp2p::PeerId;
use openraft::error::{
    ClientWriteError, InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError,
    RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, ClientWriteResponse, InstallSnapshotRequest,
    InstallSnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::{Deserialize, Serialize};
use std::io;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// Largest Raft message either way. A single replicated entry can carry a manifest as large
/// as a GIS request may be, and a forwarded write's answer a host list as large as a GIS
/// response; batches of entries that would not fit are split (`PayloadTooLarge`).
pub const MAX_FRAME: usize = 2 * MAX_RESPONSE_BYTES;
/// How long a connection attempt to a peer replica may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A message to a replica's Raft listener.
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftRpc {
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<NodeId>),
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
    /// A write a follower forwards to the leader.
    Write(Command),
    /// Heartbeats a follower received, for the leader, which alone decides liveness.
    Heartbeats(Vec<(PeerId, HostStats)>),
    /// A new replica (started with `join`) asks to be added, in place of `replaces`.
    Join {
        id: NodeId,
        addr: SocketAddr,
        replaces: Option<NodeId>,
    },
}

/// Why a replica did not add a joining one.
#[derive(Debug, Serialize, Deserialize)]
pub enum JoinRefused {
    /// Only the leader changes the membership; ask it (at this Raft address, when known).
    NotLeader(Option<String>),
    Failed(String),
}

type WriteResult =
    Result<ClientWriteResponse<TypeConfig>, RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>>;

/// The listener's answer to a [`RaftRpc`], variant for variant.
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftReply {
    AppendEntries(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    InstallSnapshot(
        Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>,
    ),
    Write(WriteResult),
    Heartbeats,
    Joined(Result<(), JoinRefused>),
}

/// A connection to another replica's Raft listener.
type Conn = Channel<TcpStream>;

/// Opens an authenticated connection to the replica at `addr`, the TCP connect within
/// `CONNECT_TIMEOUT`.
async fn connect(addr: &str, key: &ClusterKey) -> io::Result<Conn> {
    let s = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    s.set_nodelay(true)?;
    Channel::client(s, key)
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("Raft connection to {addr}: {e}")))
}

/// Serves Raft RPCs on `listener` until the task is aborted; aborting it also ends every
/// connection it accepted (they live in its `JoinSet`).
pub async fn serve(listener: TcpListener, raft: GisRaft, state: SharedState) {
    let key = state.forwarder().key().clone();
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, from)) => {
                    let _ = stream.set_nodelay(true);
                    let raft = raft.clone();
                    let state = state.clone();
                    let key = key.clone();
                    connections.spawn(async move {
                        let shaken =
                            tokio::time::timeout(HANDSHAKE_TIMEOUT, Channel::server(stream, &key))
                                .await
                                .unwrap_or_else(|_| {
                                    Err(io::Error::new(io::ErrorKind::TimedOut, "no handshake"))
                                });
                        let conn = match shaken {
                            Ok(c) => c,
                            Err(e) => {
                                warn!(%from, error = %e, "Raft connection refused");
                                return;
                            }
                        };
                        if let Err(e) = serve_connection(conn, raft, state).await {
                            if e.kind() != io::ErrorKind::UnexpectedEof {
                                debug!(%from, error = %e, "Raft connection closed");
                            }
                        }
                    });
                }
                Err(e) => {
                    warn!(error = %e, "Raft listener could not accept a connection");
                    // Out of descriptors: give the other connections time to finish.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn serve_connection(mut conn: Conn, raft: GisRaft, state: SharedState) -> io::Result<()> {
    loop {
        let rpc: RaftRpc = conn.recv(MAX_FRAME).await?;
        let reply = match rpc {
            RaftRpc::AppendEntries(r) => RaftReply::AppendEntries(raft.append_entries(r).await),
            RaftRpc::Vote(r) => RaftReply::Vote(raft.vote(r).await),
            RaftRpc::InstallSnapshot(r) => {
                RaftReply::InstallSnapshot(raft.install_snapshot(r).await)
            }
            RaftRpc::Write(cmd) => RaftReply::Write(raft.client_write(cmd).await),
            RaftRpc::Heartbeats(beats) => {
                let now = crate::server::unix_ms();
                for (peer, stats) in beats {
                    state.heartbeat_at_leader(&raft, peer, stats, now);
                }
                RaftReply::Heartbeats
            }
            RaftRpc::Join { id, addr, replaces } => {
                let me = raft.metrics().borrow().id;
                RaftReply::Joined(match leader_of(&raft) {
                    Some((leader, _)) if leader == me => {
                        super::add_member(&raft, id, addr, replaces)
                            .await
                            .map_err(|e| JoinRefused::Failed(e.to_string()))
                    }
                    other => Err(JoinRefused::NotLeader(other.map(|(_, a)| a))),
                })
            }
        };
        conn.send(&reply, MAX_FRAME).await?;
    }
}

/// Sends one RPC on a fresh connection and waits for its reply.
async fn call_once(
    addr: &str,
    key: &ClusterKey,
    rpc: &RaftRpc,
    ttl: Duration,
) -> io::Result<RaftReply> {
    Ok(exchange(None, addr, key, rpc, ttl).await?.1)
}

/// Sends `rpc` on `stream` (or a new connection to `addr`) and reads the reply, within
/// `ttl`; returns the connection for reuse.
async fn exchange(
    stream: Option<Conn>,
    addr: &str,
    key: &ClusterKey,
    rpc: &RaftRpc,
    ttl: Duration,
) -> io::Result<(Conn, RaftReply)> {
    tokio::time::timeout(ttl, async {
        let mut stream = match stream {
            Some(s) => s,
            None => connect(addr, key).await?,
        };
        stream.send(rpc, MAX_FRAME).await?;
        let reply = stream.recv(MAX_FRAME).await?;
        Ok((stream, reply))
    })
    .await
    .map_err(|_| {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer from {addr} within {ttl:?}"),
        )
    })?
}

/// Idle connections to the leader a replica keeps for the writes it forwards.
const MAX_IDLE_FORWARDS: usize = 64;

/// The connections a follower keeps to the leader's Raft listener for the writes it
/// forwards. A write takes one (or opens one) and puts it back once answered, so a
/// registration or publication that reaches a follower does not cost a TCP connection to
/// the leader each. Connections to an address that is no longer the leader's are dropped.
#[derive(Clone)]
pub struct Forwarder {
    key: ClusterKey,
    idle: std::sync::Arc<std::sync::Mutex<(String, Vec<Conn>)>>,
}

impl Forwarder {
    /// Forwards over connections authenticated with `key`.
    pub fn new(key: ClusterKey) -> Self {
        Forwarder {
            key,
            idle: Default::default(),
        }
    }

    /// The group's cluster key.
    pub fn key(&self) -> &ClusterKey {
        &self.key
    }

    async fn call(&self, addr: &str, rpc: &RaftRpc, ttl: Duration) -> io::Result<RaftReply> {
        let started = Instant::now();
        if let Some(kept) = self.take(addr) {
            match exchange(Some(kept), addr, &self.key, rpc, ttl).await {
                Ok((stream, reply)) => {
                    self.put(addr, stream);
                    return Ok(reply);
                }
                // The leader closed it meanwhile (a restart, say): once more on a new one.
                // Writes are idempotent, so one that did arrive does no harm sent again.
                Err(e) => {
                    debug!(%addr, error = %e, "a kept connection to the leader failed; opening a new one")
                }
            }
        }
        let left = ttl.saturating_sub(started.elapsed());
        let (stream, reply) = exchange(None, addr, &self.key, rpc, left).await?;
        self.put(addr, stream);
        Ok(reply)
    }

    fn take(&self, addr: &str) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.0 != addr {
            *idle = (addr.to_string(), Vec::new());
        }
        idle.1.pop()
    }

    fn put(&self, addr: &str, stream: Conn) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.0 == addr && idle.1.len() < MAX_IDLE_FORWARDS {
            idle.1.push(stream);
        }
    }
}

/// Creates one [`PeerClient`] per peer replica, each authenticating with the group's key.
pub struct Network(pub ClusterKey);

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerClient {
        PeerClient {
            target,
            addr: node.addr.clone(),
            key: self.0.clone(),
            conn: None,
        }
    }
}

/// The connection to one peer replica, opened on first use and again after an error.
pub struct PeerClient {
    target: NodeId,
    addr: String,
    key: ClusterKey,
    conn: Option<Conn>,
}

#[derive(Debug, thiserror::Error)]
#[error("replica {target} at {addr} answered a {sent} request with something else")]
struct WrongReply {
    target: NodeId,
    addr: String,
    sent: &'static str,
}

impl PeerClient {
    async fn call(&mut self, rpc: &RaftRpc, ttl: Duration) -> io::Result<RaftReply> {
        let result = tokio::time::timeout(ttl, async {
            if self.conn.is_none() {
                self.conn = Some(connect(&self.addr, &self.key).await?);
            }
            let Some(stream) = self.conn.as_mut() else {
                return Err(io::Error::other("no connection"));
            };
            stream.send(rpc, MAX_FRAME).await?;
            stream.recv(MAX_FRAME).await
        })
        .await
        .unwrap_or_else(|_| {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer within {ttl:?}"),
            ))
        });
        if result.is_err() {
            // The stream may hold half a message; start clean next time.
            self.conn = None;
        }
        result
    }

    fn wrong_reply<E: std::error::Error>(
        &self,
        sent: &'static str,
    ) -> RPCError<NodeId, BasicNode, E> {
        RPCError::Network(NetworkError::new(&WrongReply {
            target: self.target,
            addr: self.addr.clone(),
            sent,
        }))
    }
}

fn unreachable<E: std::error::Error>(e: io::Error) -> RPCError<NodeId, BasicNode, E> {
    RPCError::Unreachable(Unreachable::new(&e))
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        let entries = rpc.entries.len() as u64;
        let rpc = RaftRpc::AppendEntries(rpc);
        if entries > 1 && encode_frame(&rpc, MAX_FRAME).is_err() {
            // Too large for one frame: ask Raft to send fewer entries at a time.
            return Err(RPCError::PayloadTooLarge(
                PayloadTooLarge::new_entries_hint(entries / 2),
            ));
        }
        match self
            .call(&rpc, option.hard_ttl())
            .await
            .map_err(unreachable)?
        {
            RaftReply::AppendEntries(r) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            _ => Err(self.wrong_reply("append-entries")),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        match self
            .call(&RaftRpc::InstallSnapshot(rpc), option.hard_ttl())
            .await
            .map_err(unreachable)?
        {
            RaftReply::InstallSnapshot(r) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            _ => Err(self.wrong_reply("install-snapshot")),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        match self
            .call(&RaftRpc::Vote(rpc), option.hard_ttl())
            .await
            .map_err(unreachable)?
        {
            RaftReply::Vote(r) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            _ => Err(self.wrong_reply("vote")),
        }
    }
}

/// The leader's id and Raft address as `raft` knows them.
pub fn leader_of(raft: &GisRaft) -> Option<(NodeId, String)> {
    let m = raft.metrics();
    let m = m.borrow();
    m.current_leader.and_then(|id| {
        m.membership_config
            .nodes()
            .find(|(n, _)| **n == id)
            .map(|(_, node)| (id, node.addr.clone()))
    })
}

/// Most heartbeats relayed in one message.
const MAX_RELAY_BATCH: usize = 1024;

/// On a follower: hands the heartbeats its hosts send it to the leader, in batches over one
/// connection. Heartbeats that arrive while no leader is known are dropped: the next ones
/// (every few seconds per host) carry the same news.
pub async fn relay_heartbeats(
    raft: GisRaft,
    state: SharedState,
    mut rx: tokio::sync::mpsc::Receiver<(PeerId, HostStats)>,
) {
    let key = state.forwarder().key().clone();
    let mut conn: Option<(NodeId, Conn)> = None;
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_RELAY_BATCH {
            match rx.try_recv() {
                Ok(b) => batch.push(b),
                Err(_) => break,
            }
        }
        let Some((leader, addr)) = leader_of(&raft) else {
            debug!(
                heartbeats = batch.len(),
                "no GIS leader known; heartbeats not relayed"
            );
            continue;
        };
        if leader == raft.metrics().borrow().id {
            // Leadership came here meanwhile: these are the leader's own now.
            let now = crate::server::unix_ms();
            for (peer, stats) in batch {
                state.heartbeat_at_leader(&raft, peer, stats, now);
            }
            continue;
        }
        if conn.as_ref().is_some_and(|(id, _)| *id != leader) {
            conn = None;
        }
        let rpc = RaftRpc::Heartbeats(batch);
        let sent = async {
            if conn.is_none() {
                conn = Some((leader, connect(&addr, &key).await?));
            }
            let Some((_, s)) = conn.as_mut() else {
                return Err(io::Error::other("no connection"));
            };
            s.send(&rpc, MAX_FRAME).await?;
            s.recv::<RaftReply>(MAX_FRAME).await
        };
        match tokio::time::timeout(Duration::from_secs(5), sent).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                debug!(leader, %addr, error = %e, "relaying heartbeats to the GIS leader failed");
                conn = None;
            }
            Err(_) => {
                debug!(leader, %addr, "relaying heartbeats to the GIS leader timed out");
                conn = None;
            }
        }
    }
}

/// How long the leader may take to add a joining replica (it first catches up, possibly
/// from a snapshot).
const JOIN_TIMEOUT: Duration = Duration::from_secs(300);
/// Pause between rounds of asking every known replica to be added.
const JOIN_RETRY: Duration = Duration::from_secs(1);

/// A joining replica: asks the known replicas (following the leader they name) to add it,
/// until one added it or this replica already votes.
pub async fn ask_to_join(
    raft: GisRaft,
    key: ClusterKey,
    id: NodeId,
    addr: SocketAddr,
    replaces: Option<NodeId>,
    peers: Vec<SocketAddr>,
) {
    let rpc = RaftRpc::Join { id, addr, replaces };
    loop {
        let mut candidates: Vec<String> = peers.iter().map(|a| a.to_string()).collect();
        let mut i = 0;
        while i < candidates.len() {
            let target = candidates[i].clone();
            i += 1;
            if raft
                .metrics()
                .borrow()
                .membership_config
                .membership()
                .voter_ids()
                .any(|v| v == id)
            {
                return;
            }
            match call_once(&target, &key, &rpc, JOIN_TIMEOUT).await {
                Ok(RaftReply::Joined(Ok(()))) => {
                    info!(replica = id, via = %target, "this GIS replica was added to the group");
                    return;
                }
                Ok(RaftReply::Joined(Err(JoinRefused::NotLeader(Some(leader)))))
                    if candidates.len() < peers.len() + 8 =>
                {
                    debug!(via = %target, %leader, "asking the leader to add this replica");
                    candidates.insert(i, leader);
                }
                Ok(RaftReply::Joined(Err(JoinRefused::NotLeader(_)))) => {}
                Ok(RaftReply::Joined(Err(JoinRefused::Failed(e)))) => {
                    warn!(via = %target, error = %e, "the GIS leader could not add this replica; retrying");
                }
                Ok(_) => warn!(via = %target, "unexpected answer to a join request"),
                Err(e) => {
                    debug!(via = %target, error = %e, "replica did not answer a join request")
                }
            }
        }
        tokio::time::sleep(JOIN_RETRY).await;
    }
}

/// Proposes `cmd` on this replica if it leads, else forwards it to the leader; retries
/// across an election until `timeout`.
pub async fn write_via_leader(
    raft: &GisRaft,
    forwarder: &Forwarder,
    cmd: Command,
    timeout: Duration,
) -> Result<Applied, WriteError> {
    let deadline = Instant::now() + timeout;
    let mut metrics = raft.metrics();
    loop {
        let leader = leader_of(raft);
        let outcome = match &leader {
            Some((id, _)) if *id == raft.metrics().borrow().id => {
                Some(raft.client_write(cmd.clone()).await)
            }
            Some((id, addr)) => {
                let left = deadline.saturating_duration_since(Instant::now());
                match forwarder
                    .call(addr, &RaftRpc::Write(cmd.clone()), left)
                    .await
                {
                    Ok(RaftReply::Write(r)) => Some(r),
                    Ok(_) => {
                        return Err(WriteError::Forward(format!(
                            "leader {id} at {addr} answered a forwarded write with something else"
                        )))
                    }
                    Err(e) => {
                        info!(leader = id, %addr, error = %e, "could not forward a write to the GIS leader; waiting for the next leader");
                        None
                    }
                }
            }
            None => None,
        };
        match outcome {
            Some(Ok(resp)) => {
                // Committed. Answer once this replica has applied it too, so that what the
                // writer asks this replica next (a heartbeat after its registration, a
                // lookup after its publication) sees its own write. A replica that lags
                // past the deadline answers anyway: the write is committed.
                let index = resp.log_id.index;
                let left = deadline.saturating_duration_since(Instant::now());
                if let Err(e) = raft
                    .wait(Some(left))
                    .applied_index_at_least(Some(index), "a write made through this replica")
                    .await
                {
                    debug!(index, error = %e, "answering a committed write this replica has not applied yet");
                }
                return Ok(resp.data);
            }
            Some(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) | None => {}
            Some(Err(e)) => return Err(WriteError::Raft(e.to_string())),
        }
        // Leadership is moving: wait for Raft to report a change, or retry shortly anyway
        // (the old leader may still be listed while it is unreachable).
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(if leader.is_none() {
                WriteError::NoLeader
            } else {
                WriteError::Timeout(timeout)
            });
        }
        let _ = tokio::time::timeout(left.min(Duration::from_millis(200)), metrics.changed()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bids_protocols::codec::{decode_body, read_frame};

    use bids_protocols::gis::HostStats;
    use libp2p::PeerId;
    use proptest::prelude::*;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
    }

    #[test]
    fn an_oversized_length_is_refused_before_reading_the_body() {
        // Announces 1 GiB and sends nothing more: the limit must trip, not a read.
        let frame = (1u32 << 30).to_be_bytes();
        let r: io::Result<RaftRpc> = runtime().block_on(read_frame(&mut &frame[..], MAX_FRAME));
        let e = r.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("limit"), "{e}");
    }

    #[test]
    fn a_forwarded_write_survives_the_frame() {
        let cmd = Command::Request {
            peer: PeerId::random(),
            req: bids_protocols::gis::GisRequest::Heartbeat {
                stats: HostStats::default(),
            },
            now_ms: 42,
        };
        let frame = encode_frame(&RaftRpc::Write(cmd.clone()), MAX_FRAME).unwrap();
        let back: RaftRpc = runtime()
            .block_on(read_frame(&mut &frame[..], MAX_FRAME))
            .unwrap();
        match back {
            RaftRpc::Write(c) => assert_eq!(c, cmd),
            other => panic!("decoded {other:?}"),
        }
    }

    /// A stand-in leader listener: answers `Heartbeats` with `Heartbeats`, counts the
    /// connections it accepted, and closes each after `per_conn` answers.
    async fn counting_listener(
        per_conn: usize,
        key: ClusterKey,
    ) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (s, _) = l.accept().await.unwrap();
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let key = key.clone();
                tokio::spawn(async move {
                    let Ok(mut s) = Channel::server(s, &key).await else {
                        return;
                    };
                    for _ in 0..per_conn {
                        let Ok(RaftRpc::Heartbeats(_)) = s.recv(MAX_FRAME).await else {
                            return;
                        };
                        s.send(&RaftReply::Heartbeats, MAX_FRAME).await.unwrap();
                    }
                });
            }
        });
        (addr, accepted)
    }

    #[test]
    fn forwarded_writes_reuse_one_connection_and_survive_its_close() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let ttl = Duration::from_secs(5);
            let rpc = RaftRpc::Heartbeats(Vec::new());
            // Before, every forwarded write opened a connection of its own.
            let key = ClusterKey::generate();
            let (addr, accepted) = counting_listener(usize::MAX, key.clone()).await;
            let f = Forwarder::new(key.clone());
            for _ in 0..10 {
                assert!(matches!(
                    f.call(&addr, &rpc, ttl).await,
                    Ok(RaftReply::Heartbeats)
                ));
            }
            assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
            // A leader that closes the connection after each answer: the next write notices
            // the dead kept connection and goes out on a new one.
            let (addr, accepted) = counting_listener(1, key.clone()).await;
            for _ in 0..3 {
                assert!(matches!(
                    f.call(&addr, &rpc, ttl).await,
                    Ok(RaftReply::Heartbeats)
                ));
            }
            assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 3);
            // A leader of another group (another key): refused, nothing forwarded.
            let (addr, _) = counting_listener(usize::MAX, ClusterKey::generate()).await;
            let e = f.call(&addr, &rpc, ttl).await.unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
        });
    }

    proptest! {
        /// Any bytes from the network decode to a message or an error, never a panic, and
        /// a frame never yields more than its limit allows.
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let _ = decode_body::<RaftRpc>(&bytes, MAX_FRAME);
            let _ = decode_body::<RaftReply>(&bytes, MAX_FRAME);
            let r: io::Result<RaftRpc> = runtime().block_on(read_frame(&mut &bytes[..], 1024));
            if bytes.len() >= 4 {
                let len = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
                if len > 1024 {
                    prop_assert!(r.is_err());
                }
            }
        }

        /// Liveness records round-trip through a frame for any host and clock.
        #[test]
        fn liveness_round_trips(alive in any::<bool>(), now_ms in any::<i64>()) {
            let cmd = Command::Liveness { peer: PeerId::random(), alive, now_ms };
            let frame = encode_frame(&RaftRpc::Write(cmd.clone()), MAX_FRAME).unwrap();
            let back: RaftRpc = decode_body(&frame[4..], MAX_FRAME).unwrap();
            prop_assert!(matches!(back, RaftRpc::Write(c) if c == cmd));
        }
    }
}
