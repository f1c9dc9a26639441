//! Three GIS replicas in one Raft group, in process, over real TCP on 127.0.0.1: writes
//! through the leader (or forwarded by a follower) reach every replica; the leader is
//! stopped in the middle of a two-IDC distribution and a new one is elected within 5 s
//! without losing a committed write; the old leader restarts from its data dir and catches
//! up; a replaced replica with an empty data dir joins from a snapshot.

mod common;

use bids_gis::cluster::{
    raft_config, Applied, ClusterConfig, ClusterKey, Command, NodeId, Replica,
};
use bids_gis::index::{HostView, ImageView};
use bids_gis::{IndexConfig, SledStorage};
use bids_protocols::gis::{GisRequest, GisResponse, ImageQuery};
use bids_protocols::{ImageId, Policy};
use common::*;
use libp2p::identity::Keypair;
use libp2p::PeerId;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

const ELECTION_LIMIT: Duration = Duration::from_secs(5);
/// One clock reading for the whole test: it is about replication, not expiry.
fn now_ms() -> i64 {
    static NOW: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    *NOW.get_or_init(|| bids_protocols::unix_now() * 1000)
}

struct Member {
    id: NodeId,
    addr: SocketAddr,
    dir: PathBuf,
}

fn index_cfg(admin: PeerId) -> IndexConfig {
    let mut cfg = IndexConfig::new(admin, Policy::Bids);
    cfg.replicated_liveness = true;
    cfg
}

fn test_raft_config() -> openraft::Config {
    openraft::Config {
        // Keep no log behind a snapshot, so a replaced replica must take the snapshot.
        max_in_snapshot_log_to_keep: 0,
        ..raft_config()
    }
}

async fn start(
    m: &Member,
    listener: TcpListener,
    members: &BTreeMap<NodeId, SocketAddr>,
    admin: PeerId,
    join: bool,
) -> Replica {
    start_with(m, listener, members, admin, join, test_raft_config()).await
}

async fn start_with(
    m: &Member,
    listener: TcpListener,
    members: &BTreeMap<NodeId, SocketAddr>,
    admin: PeerId,
    join: bool,
    raft: openraft::Config,
) -> Replica {
    start_keyed(m, listener, members, admin, join, raft, group_key()).await
}

async fn start_keyed(
    m: &Member,
    listener: TcpListener,
    members: &BTreeMap<NodeId, SocketAddr>,
    admin: PeerId,
    join: bool,
    raft: openraft::Config,
    key: ClusterKey,
) -> Replica {
    let storage = open_storage(&m.dir.join("gis.sled")).await;
    let cfg = ClusterConfig {
        node_id: m.id,
        raft_listen: m.addr,
        members: members.clone(),
        join,
        replaces: None,
        key,
    };
    Replica::start_on(
        listener,
        &cfg,
        &m.dir,
        index_cfg(admin),
        Box::new(storage),
        raft,
    )
    .await
    .unwrap()
}

/// Three replicas of one group on 127.0.0.1, each with a data dir under `dir`, started
/// with `raft`: their members, the group's addresses, and the running replicas.
async fn three_replicas(
    dir: &Path,
    admin: PeerId,
    raft: openraft::Config,
) -> (
    Vec<Member>,
    BTreeMap<NodeId, SocketAddr>,
    BTreeMap<NodeId, Replica>,
) {
    let (members_v, listeners, members) = bind_members(dir).await;
    let mut replicas = BTreeMap::new();
    for (m, l) in members_v.iter().zip(listeners) {
        let r = start_with(m, l, &members, admin, false, raft.clone()).await;
        replicas.insert(m.id, r);
    }
    (members_v, members, replicas)
}

/// Three members on free 127.0.0.1 ports, each with a data dir under `dir`: the members,
/// their bound listeners and the group's addresses.
async fn bind_members(dir: &Path) -> (Vec<Member>, Vec<TcpListener>, BTreeMap<NodeId, SocketAddr>) {
    let mut listeners = Vec::new();
    let mut members_v = Vec::new();
    for id in 1..=3u64 {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let dir = dir.join(format!("gis{id}"));
        std::fs::create_dir_all(&dir).unwrap();
        members_v.push(Member { id, addr, dir });
        listeners.push(l);
    }
    let members = members_v.iter().map(|m| (m.id, m.addr)).collect();
    (members_v, listeners, members)
}

/// sled locks its files; a stopped replica's handles may take a moment to be dropped by the
/// tasks that held them.
async fn open_storage(path: &Path) -> SledStorage {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match SledStorage::open(path) {
            Ok(s) => return s,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "GIS storage still locked");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("GIS storage at {} does not open: {e}", path.display()),
        }
    }
}

async fn bind_again(addr: SocketAddr) -> TcpListener {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match TcpListener::bind(addr).await {
            Ok(l) => return l,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "Raft address still in use");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("cannot bind {addr} again: {e}"),
        }
    }
}

/// Waits until every replica in `rs` names the same leader, one of `rs`.
async fn agreed_leader(rs: &[&Replica], within: Duration) -> NodeId {
    let ids: Vec<NodeId> = rs.iter().map(|r| r.node_id).collect();
    let first = rs[0]
        .raft
        .wait(Some(within))
        .metrics(
            |m| m.current_leader.is_some_and(|l| ids.contains(&l)),
            "a leader among the running replicas",
        )
        .await
        .unwrap()
        .current_leader
        .unwrap();
    for r in rs {
        r.raft
            .wait(Some(within))
            .current_leader(first, "every replica agrees on the leader")
            .await
            .unwrap();
    }
    first
}

/// What a replica's applied state says, for comparing replicas.
fn state_of(r: &Replica) -> (Vec<HostView>, Vec<ImageView>, Vec<u64>) {
    let st = r.state.lock();
    (
        st.index.hosts(now_ms()),
        st.index.images(now_ms()),
        st.index.revocations().serials.iter().copied().collect(),
    )
}

/// Waits until `r` applied at least up to `index`.
async fn caught_up(r: &Replica, index: u64) {
    r.raft
        .wait(Some(TIMEOUT))
        .applied_index_at_least(Some(index), "replica caught up")
        .await
        .unwrap();
}

fn applied_of(r: &Replica) -> u64 {
    r.raft
        .metrics()
        .borrow()
        .last_applied
        .map(|l| l.index)
        .unwrap_or(0)
}

fn request(peer: PeerId, req: GisRequest) -> Command {
    Command::Request {
        peer,
        req,
        now_ms: now_ms(),
    }
}

fn expect_ack(a: &Applied) {
    assert!(
        matches!(a, Applied::Response(GisResponse::Ack { .. })),
        "expected an Ack, got {a:?}"
    );
}

fn holding_of(r: &Replica, image: ImageId, peer: PeerId) -> Option<u32> {
    let st = r.state.lock();
    st.index
        .images(now_ms())
        .into_iter()
        .find(|i| i.info.id == image)?
        .holders
        .into_values()
        .flatten()
        .find(|h| h.peer == peer)
        .map(|h| h.chunks_held)
}

/// A replica started with another cluster key is refused by the others both ways: it never
/// votes, never learns a leader nor any entry, and cannot have a write committed; the two
/// replicas with the group's key form a majority and go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_without_the_groups_key_gets_nothing_in_and_nothing_out() {
    let tmp = tempfile::tempdir().unwrap();
    let admin = Keypair::generate_ed25519();
    let admin_peer = peer_of(&admin);
    let (members_v, listeners, members) = bind_members(tmp.path()).await;
    let mut replicas = Vec::new();
    for (m, l) in members_v.iter().zip(listeners) {
        let key = if m.id == 3 {
            ClusterKey::generate()
        } else {
            group_key()
        };
        let r = start_keyed(m, l, &members, admin_peer, false, test_raft_config(), key).await;
        replicas.push(r);
    }
    let leader = agreed_leader(&[&replicas[0], &replicas[1]], ELECTION_LIMIT).await;
    let host = Keypair::generate_ed25519();
    let a = replicas[leader as usize - 1]
        .write(request(peer_of(&host), register("east", None)))
        .await
        .unwrap();
    assert!(
        matches!(a, Applied::Response(GisResponse::Registered { .. })),
        "{a:?}"
    );
    let committed = applied_of(&replicas[leader as usize - 1]);
    for r in &replicas[..2] {
        caught_up(r, committed).await;
    }
    // Long enough for several election rounds of the outsider.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let outsider = &replicas[2];
    assert_eq!(applied_of(outsider), 0, "the outsider applied entries");
    assert_ne!(outsider.raft.metrics().borrow().current_leader, Some(3));
    assert_ne!(
        outsider.raft.metrics().borrow().current_leader,
        Some(leader)
    );
    assert!(state_of(outsider).0.is_empty());
    for r in &replicas[..2] {
        assert_eq!(r.raft.metrics().borrow().current_leader, Some(leader));
    }
    // A write handed to the outsider finds no leader it can reach.
    let other = Keypair::generate_ed25519();
    assert!(tokio::time::timeout(
        Duration::from_secs(20),
        outsider.write(request(peer_of(&other), register("east", None)))
    )
    .await
    .map_or(true, |r| r.is_err()));
    assert!(replicas[..2].iter().all(|r| state_of(r).0.len() == 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_loss_in_a_distribution_keeps_every_committed_write() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let tmp = tempfile::tempdir().unwrap();
    let admin = Keypair::generate_ed25519();
    let admin_peer = peer_of(&admin);

    let (members_v, members, mut replicas) =
        three_replicas(tmp.path(), admin_peer, test_raft_config()).await;
    let all: Vec<&Replica> = replicas.values().collect();
    let leader = agreed_leader(&all, ELECTION_LIMIT).await;
    let follower = *replicas.keys().find(|id| **id != leader).unwrap();

    // Two IDCs, one certified bridgehead and two hosts each.
    let keys: Vec<(Keypair, &str, bool)> = ["east", "east", "east", "west", "west", "west"]
        .into_iter()
        .enumerate()
        .map(|(i, idc)| (Keypair::generate_ed25519(), idc, i % 3 == 0))
        .collect();
    for (n, (k, idc, bridgehead)) in keys.iter().enumerate() {
        let cert = bridgehead.then(|| cert(&admin, peer_of(k), idc, 10 + n as u64));
        // Half of the registrations go through a follower, which forwards them.
        let via = if n % 2 == 0 { leader } else { follower };
        let a = replicas[&via]
            .write(request(peer_of(k), register(idc, cert)))
            .await
            .unwrap();
        assert!(
            matches!(a, Applied::Response(GisResponse::Registered { .. })),
            "registration refused: {a:?}"
        );
    }
    let (manifest_bytes, image) = manifest("ubuntu", "24.04", 64);
    let publisher = peer_of(&keys[0].0);
    expect_ack(
        &replicas[&leader]
            .write(request(
                publisher,
                publish(image, &manifest_bytes, 64, true),
            ))
            .await
            .unwrap(),
    );

    // The distribution: every other host reports progress, through the follower, while
    // the leader is stopped half-way.
    let others: Vec<PeerId> = keys[1..].iter().map(|(k, _, _)| peer_of(k)).collect();
    let mut acked: BTreeMap<PeerId, u32> = BTreeMap::new();
    for chunks in [8u32, 16, 24] {
        for p in &others {
            let a = replicas[&follower]
                .write(request(*p, publish(image, &[], chunks, false)))
                .await
                .unwrap();
            expect_ack(&a);
            acked.insert(*p, chunks);
        }
    }
    let before = applied_of(&replicas[&leader]);
    for r in replicas.values() {
        caught_up(r, before).await;
    }
    let reference = state_of(&replicas[&leader]);
    for r in replicas.values() {
        assert_eq!(state_of(r), reference, "replica {} differs", r.node_id);
    }

    // Stop the leader; keep writing through the follower meanwhile.
    let old = replicas.remove(&leader).unwrap();
    let stopped_at = Instant::now();
    let writer = replicas[&follower].raft.clone();
    let forwarder = replicas[&follower].state.forwarder().clone();
    let writes = {
        let others = others.clone();
        tokio::spawn(async move {
            let mut acked = BTreeMap::new();
            for chunks in [32u32, 40, 48, 64] {
                for p in &others {
                    let cmd = request(*p, publish(image, &[], chunks, chunks == 64));
                    let a = bids_gis::cluster::net::write_via_leader(
                        &writer,
                        &forwarder,
                        cmd,
                        Duration::from_secs(10),
                    )
                    .await
                    .unwrap();
                    assert!(
                        matches!(a, Applied::Response(GisResponse::Ack { .. })),
                        "{a:?}"
                    );
                    acked.insert(*p, chunks);
                }
            }
            acked
        })
    };
    old.shutdown().await;
    let rest: Vec<&Replica> = replicas.values().collect();
    let new_leader = agreed_leader(&rest, ELECTION_LIMIT).await;
    let failover = stopped_at.elapsed();
    eprintln!("new leader {new_leader} elected {failover:?} after the old leader {leader} stopped");
    assert_ne!(new_leader, leader);
    assert!(failover < ELECTION_LIMIT, "failover took {failover:?}");
    let late = tokio::time::timeout(Duration::from_secs(20), writes)
        .await
        .expect("writes finish after the failover")
        .unwrap();
    acked.extend(late);

    // A revocation committed under the new leader.
    let bh_west = &keys[3];
    let a = replicas[&follower]
        .write(Command::Revoke {
            requester: admin_peer,
            serial: 13,
        })
        .await
        .unwrap();
    assert_eq!(a, Applied::Revoked(Ok(vec![peer_of(&bh_west.0)])));

    // The old leader restarts from its data dir and catches up.
    let m = members_v.iter().find(|m| m.id == leader).unwrap();
    let restarted = start(m, bind_again(m.addr).await, &members, admin_peer, false).await;
    replicas.insert(leader, restarted);
    let target = applied_of(&replicas[&new_leader]);
    for r in replicas.values() {
        caught_up(r, target).await;
    }
    let reference = state_of(&replicas[&new_leader]);
    for r in replicas.values() {
        assert_eq!(state_of(r), reference, "replica {} differs", r.node_id);
        for (p, chunks) in &acked {
            assert_eq!(
                holding_of(r, image, *p),
                Some(*chunks),
                "replica {} lost an acknowledged holding of {p}",
                r.node_id
            );
        }
        assert_eq!(
            reference.2,
            vec![13],
            "the revocation is on replica {}",
            r.node_id
        );
        // Lookups are answered from each replica's own applied state.
        let st = r.state.lock();
        let list = st
            .index
            .lookup(others[0], &ImageQuery::Id(image), now_ms())
            .unwrap();
        assert!(
            !list.level0.is_empty(),
            "replica {} lists no host",
            r.node_id
        );
    }

    // Replace a follower whose disk is lost by a new replica with an empty data dir: it
    // joins from a snapshot (the leader keeps no log behind its snapshot).
    let leader_now = agreed_leader(&replicas.values().collect::<Vec<_>>(), ELECTION_LIMIT).await;
    let l = &replicas[&leader_now];
    l.raft.trigger().snapshot().await.unwrap();
    let snap = l
        .raft
        .wait(Some(TIMEOUT))
        .metrics(|m| m.snapshot.is_some(), "leader built a snapshot")
        .await
        .unwrap()
        .snapshot
        .unwrap();
    l.raft
        .wait(Some(TIMEOUT))
        .metrics(
            |m| m.purged.is_some_and(|p| p.index >= snap.index),
            "leader purged its log",
        )
        .await
        .unwrap();
    let lost = *replicas.keys().find(|id| **id != leader_now).unwrap();
    replicas.remove(&lost).unwrap().shutdown().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let new = Member {
        id: 4,
        addr: listener.local_addr().unwrap(),
        dir: tmp.path().join("gis4"),
    };
    std::fs::create_dir_all(&new.dir).unwrap();
    let fresh = start(
        &new,
        listener,
        &BTreeMap::from([(new.id, new.addr)]),
        admin_peer,
        true,
    )
    .await;
    replicas[&leader_now]
        .replace_member(lost, new.id, new.addr)
        .await
        .unwrap();
    fresh
        .raft
        .wait(Some(TIMEOUT))
        .metrics(
            |m| m.snapshot.is_some_and(|s| s.index >= snap.index),
            "the new replica installed the snapshot",
        )
        .await
        .unwrap();
    fresh
        .raft
        .wait(Some(TIMEOUT))
        .metrics(
            |m| {
                let voters: Vec<NodeId> = m.membership_config.membership().voter_ids().collect();
                voters.contains(&new.id) && !voters.contains(&lost)
            },
            "the new replica votes in place of the lost one",
        )
        .await
        .unwrap();
    caught_up(&fresh, snap.index).await;
    assert_eq!(state_of(&fresh), reference, "the new replica differs");
    replicas.insert(new.id, fresh);
    for (_, r) in replicas {
        r.shutdown().await;
    }
}

/// With the GIS's own Raft settings, a follower that was away while thousands of writes
/// were committed (and a snapshot was taken meanwhile) catches up from the log, not from
/// a snapshot: installing one locks the replica's state for seconds at 20,000 hosts, and
/// with only 1,000 entries kept behind a snapshot a follower busy installing one fell
/// behind again during a registration storm and was sent snapshot after snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_away_for_thousands_of_writes_catches_up_from_the_log() {
    const WRITES: u32 = 3000;
    let tmp = tempfile::tempdir().unwrap();
    let admin = Keypair::generate_ed25519();
    let admin_peer = peer_of(&admin);
    let (members_v, members, mut replicas) =
        three_replicas(tmp.path(), admin_peer, raft_config()).await;
    let all: Vec<&Replica> = replicas.values().collect();
    let leader = agreed_leader(&all, ELECTION_LIMIT).await;
    let away = *replicas.keys().find(|id| **id != leader).unwrap();

    let hosts: Vec<Keypair> = (0..10).map(|_| Keypair::generate_ed25519()).collect();
    for k in &hosts {
        let a = replicas[&leader]
            .write(request(peer_of(k), register("east", None)))
            .await
            .unwrap();
        assert!(
            matches!(a, Applied::Response(GisResponse::Registered { .. })),
            "{a:?}"
        );
    }
    let (manifest_bytes, image) = manifest("ubuntu", "24.04", 4096);
    expect_ack(
        &replicas[&leader]
            .write(request(
                peer_of(&hosts[0]),
                publish(image, &manifest_bytes, 4096, true),
            ))
            .await
            .unwrap(),
    );
    let before = applied_of(&replicas[&leader]);
    for r in replicas.values() {
        caught_up(r, before).await;
    }

    // One follower goes away; the others commit thousands of progress reports.
    let gone = replicas.remove(&away).unwrap();
    gone.shutdown().await;
    let l = &replicas[&leader];
    let mut n = 0u32;
    'writes: for chunks in 1..4096u32 {
        let batch = hosts[1..]
            .iter()
            .map(|k| l.write(request(peer_of(k), publish(image, &[], chunks, false))));
        for a in futures::future::join_all(batch).await {
            expect_ack(&a.unwrap());
            n += 1;
            if n >= WRITES {
                break 'writes;
            }
        }
    }
    // A snapshot in between, as the policy takes them: the log behind it is purged down to
    // what the settings keep.
    l.raft.trigger().snapshot().await.unwrap();
    let last = applied_of(l);
    l.raft
        .wait(Some(TIMEOUT))
        .metrics(
            |m| m.snapshot.is_some_and(|s| s.index >= last),
            "the leader built a snapshot",
        )
        .await
        .unwrap();

    let m = members_v.iter().find(|m| m.id == away).unwrap();
    let back = start_with(
        m,
        bind_again(m.addr).await,
        &members,
        admin_peer,
        false,
        raft_config(),
    )
    .await;
    caught_up(&back, last).await;
    let snapshot = back.raft.metrics().borrow().snapshot;
    assert!(
        snapshot.is_none(),
        "the follower away for {WRITES} writes was sent a snapshot ({snapshot:?}) instead of the log"
    );
    assert_eq!(state_of(&back), state_of(&replicas[&leader]));
    back.shutdown().await;
    for (_, r) in replicas {
        r.shutdown().await;
    }
}
