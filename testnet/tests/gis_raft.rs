//! A multi-IDC distribution with the GIS run as three Raft replicas, in process: every node
//! is given all three (`--gis` once per replica) and talks to the leader, the leader is
//! stopped in the middle of the distribution, a new leader is elected within 5 s, the nodes
//! move on to a surviving replica and register there, every copy is bit-exact, no committed
//! registration, publication or revocation is lost, and the old leader restarts from its
//! data dir and catches up.

mod common;

use bids_gis::cluster::{ClusterConfig, ClusterKey, GisRaft, NodeId};
use bids_gis::server::{spawn, GisConfig, GisHandle};
use bids_protocols::gis::{GisRequest, GisResponse, HostStats, ImageQuery};
use bids_protocols::{ImageRef, Policy};
use bids_testnet::cluster::{Cluster, ClusterSpec, IdcSpec};
use common::{fetched_bit_exact, file_hash, idc, image_file, status, wait_for, CHUNK, MIB};
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

const ELECTION_LIMIT: Duration = Duration::from_secs(5);
const TIMEOUT: Duration = Duration::from_secs(20);
/// A serial no node uses: revoking it must survive the failover without disturbing anyone.
const REVOKED: u64 = 9;

async fn replica(
    dir: &Path,
    id: NodeId,
    members: &BTreeMap<NodeId, SocketAddr>,
    admin: PeerId,
) -> GisHandle {
    let mut cfg = GisConfig::new(
        Keypair::generate_ed25519(),
        "/ip4/127.0.0.1/tcp/0".parse().unwrap(),
        dir.join(format!("gis{id}")),
        admin,
    );
    // As the testnet's own GIS.
    cfg.heartbeat_timeout = Duration::from_secs(4);
    cfg.cluster = Some(ClusterConfig {
        node_id: id,
        raft_listen: members[&id],
        members: members.clone(),
        join: false,
        replaces: None,
        key: group_key(),
    });
    spawn(cfg).await.unwrap()
}

/// The key the replicas of these tests share (one group per test, on its own ports).
fn group_key() -> ClusterKey {
    ClusterKey::from_hex(&"5a".repeat(32)).unwrap()
}

fn raft(g: &GisHandle) -> &GisRaft {
    g.raft().expect("a replica has a Raft node")
}

async fn agreed_leader(gs: &BTreeMap<NodeId, GisHandle>) -> NodeId {
    let ids: Vec<NodeId> = gs.keys().copied().collect();
    let leader = raft(gs.values().next().unwrap())
        .wait(Some(ELECTION_LIMIT))
        .metrics(
            |m| m.current_leader.is_some_and(|l| ids.contains(&l)),
            "a leader among the running replicas",
        )
        .await
        .unwrap()
        .current_leader
        .unwrap();
    for g in gs.values() {
        raft(g)
            .wait(Some(ELECTION_LIMIT))
            .current_leader(leader, "every replica agrees on the leader")
            .await
            .unwrap();
    }
    leader
}

fn addr(g: &GisHandle) -> Multiaddr {
    g.listen_addrs()[0].clone()
}

/// The complete holders of `image` an ordinary host of `idc` is told about by `gis`.
async fn complete_holders(gis: &Multiaddr, idc: &str, image: &ImageRef) -> Vec<PeerId> {
    let req = GisRequest::Lookup {
        image: ImageQuery::Ref(image.clone()),
        idc: Some(bids_protocols::Idc::new(idc).unwrap()),
    };
    match bids_gis::client::request_once(Keypair::generate_ed25519(), gis.clone(), req, TIMEOUT)
        .await
        .unwrap()
    {
        GisResponse::HostList(l) => {
            let mut v: Vec<PeerId> = l
                .level0
                .iter()
                .filter(|e| e.complete)
                .map(|e| e.peer)
                .collect();
            v.sort();
            v
        }
        other => panic!("lookup at {gis}: {other:?}"),
    }
}

/// The revocations `gis` reports to a registered host (a heartbeat of a live host, which
/// writes nothing).
async fn revocations(gis: &Multiaddr, host: &Keypair) -> Vec<u64> {
    let req = GisRequest::Heartbeat {
        stats: HostStats::default(),
    };
    match bids_gis::client::request_once(host.clone(), gis.clone(), req, TIMEOUT)
        .await
        .unwrap()
    {
        GisResponse::Ack { revocations, .. } => revocations.serials.iter().copied().collect(),
        other => panic!("heartbeat at {gis}: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_lost_mid_distribution_loses_nothing() {
    common::init_logs();
    let tmp = tempfile::tempdir().unwrap();
    let admin = Keypair::generate_ed25519();
    let admin_peer = admin.public().to_peer_id();
    let ports: Vec<std::net::TcpListener> = (0..3)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let members: BTreeMap<NodeId, SocketAddr> = (1..=3)
        .zip(ports.iter().map(|l| l.local_addr().unwrap()))
        .collect();
    drop(ports);
    let mut gs = BTreeMap::new();
    for id in 1..=3 {
        gs.insert(id, replica(tmp.path(), id, &members, admin_peer).await);
    }
    let leader = agreed_leader(&gs).await;
    let follower = *gs.keys().find(|id| **id != leader).unwrap();
    let other = *gs
        .keys()
        .find(|id| **id != leader && **id != follower)
        .unwrap();

    // Every node registers, heartbeats and publishes through the leader, and knows the
    // follower and the other replica to move on to.
    let wan = |spec: IdcSpec| IdcSpec {
        wan_bps: 3_000_000,
        wan_delay: Duration::from_millis(5),
        ..spec
    };
    let c = Cluster::start_with_gis_replicas(
        ClusterSpec {
            idcs: vec![
                wan(idc("A", 1, 1)),
                wan(idc("B", 2, 1)),
                wan(idc("C", 2, 1)),
            ],
            policy: Policy::Bids,
            shaped: true,
        },
        admin.clone(),
        vec![addr(&gs[&leader]), addr(&gs[&follower]), addr(&gs[&other])],
    )
    .await
    .expect("cluster");
    let size = 12 * MIB;
    let (file, _guard) = image_file(size, 19, false);
    let holder = c
        .idc_nodes("A")
        .into_iter()
        .find(|&i| !c.nodes[i].is_bridgehead())
        .unwrap();
    let image: ImageRef = "raft:1".parse().unwrap();
    let m = c.seed(holder, &file, &image, CHUNK).await.expect("seeding");
    let r = bids_gis::client::request_once(
        admin.clone(),
        addr(&gs[&follower]),
        GisRequest::Revoke { serial: REVOKED },
        TIMEOUT,
    )
    .await
    .unwrap();
    assert!(matches!(r, GisResponse::Ack { .. }), "revocation: {r:?}");

    // B and C fetch; once some host of theirs holds part of the image, the leader goes.
    let receivers: Vec<usize> = ["B", "C"].iter().flat_map(|i| c.idc_nodes(i)).collect();
    let tasks: common::FetchTasks = receivers
        .iter()
        .map(|&i| {
            let n = c.nodes[i].node().clone();
            let q = ImageQuery::Ref(image.clone());
            (i, tokio::spawn(async move { n.fetch_and_wait(q).await }))
        })
        .collect();
    let via = addr(&gs[&follower]);
    wait_for(
        "chunk data to cross the WAN while some receiver is still incomplete",
        TIMEOUT,
        || {
            let (via, image, c, receivers) = (via.clone(), image.clone(), &c, &receivers);
            async move {
                let mut wan_in = 0;
                for &i in receivers {
                    wan_in += status(c, i).await.total.wan_recv_bytes;
                }
                if wan_in < MIB {
                    return None;
                }
                let mut complete = 0;
                for idc in ["B", "C"] {
                    complete += complete_holders(&via, idc, &image).await.len();
                }
                assert!(
                    complete < receivers.len(),
                    "the distribution ended before the leader could be stopped in its middle"
                );
                Some(())
            }
        },
    )
    .await;
    let old = gs.remove(&leader).unwrap();
    let stopped = Instant::now();
    old.shutdown().await.unwrap();
    let new_leader = agreed_leader(&gs).await;
    let failover = stopped.elapsed();
    eprintln!("replica {new_leader} leads {failover:?} after the leader {leader} stopped mid-distribution");
    assert!(failover < ELECTION_LIMIT, "failover took {failover:?}");
    // The nodes lost their GIS with the leader: each moves on and registers again.
    wait_for(
        "every node registered with a surviving replica",
        ELECTION_LIMIT,
        || async {
            for i in 0..c.nodes.len() {
                if !status(&c, i).await.registered {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
    eprintln!(
        "every node registered again {:?} after the leader stopped",
        stopped.elapsed()
    );

    // Every copy bit-exact; every publication committed on both survivors.
    fetched_bit_exact(&c, tasks, &m.id(), &file, Duration::from_secs(60)).await;
    assert_eq!(
        file_hash(&file),
        file_hash(&c.nodes[holder].node().store().image_path(&m.id()))
    );
    let mut want: BTreeMap<&str, Vec<PeerId>> = BTreeMap::new();
    // Every receiver, and (at least) the holder in A: A's bridgehead may hold it as well.
    for name in ["B", "C"] {
        let mut v: Vec<PeerId> = c
            .idc_nodes(name)
            .iter()
            .map(|&i| c.nodes[i].peer_id())
            .collect();
        v.sort();
        want.insert(name, v);
    }
    for id in [follower, other] {
        let at = addr(&gs[&id]);
        for (name, peers) in &want {
            let at2 = at.clone();
            let image2 = image.clone();
            wait_for(&format!("replica {id} to list IDC {name}'s complete holders"), TIMEOUT, || {
                let (at, image) = (at2.clone(), image2.clone());
                async move { (complete_holders(&at, name, &image).await == *peers).then_some(()) }
            })
            .await;
        }
        assert!(complete_holders(&at, "A", &image)
            .await
            .contains(&c.nodes[holder].peer_id()));
        assert!(revocations(&at, &c.nodes[holder].key)
            .await
            .contains(&REVOKED));
    }

    // The old leader restarts from its data dir and catches up.
    let back = replica(tmp.path(), leader, &members, admin_peer).await;
    let target = raft(&gs[&new_leader])
        .metrics()
        .borrow()
        .last_applied
        .map(|l| l.index);
    raft(&back)
        .wait(Some(TIMEOUT))
        .applied_index_at_least(target, "the old leader caught up")
        .await
        .unwrap();
    let at = addr(&back);
    for (name, peers) in &want {
        assert_eq!(
            complete_holders(&at, name, &image).await,
            *peers,
            "old leader, IDC {name}"
        );
    }
    assert!(complete_holders(&at, "A", &image)
        .await
        .contains(&c.nodes[holder].peer_id()));
    assert!(revocations(&at, &c.nodes[holder].key)
        .await
        .contains(&REVOKED));
    c.shutdown().await;
    back.shutdown().await.unwrap();
    for (_, g) in gs {
        g.shutdown().await.unwrap();
    }
}
