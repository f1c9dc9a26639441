//! Three GIS servers as one Raft group, in process, on 127.0.0.1: hosts talk libp2p to any
//! replica; writes go through the leader, lookups are answered by each replica from its own
//! applied state, liveness is decided by the leader and replicated, heartbeats of live hosts
//! write nothing, and the group survives the loss of its leader.

mod common;

use bids_gis::cluster::{ClusterConfig, GisRaft, NodeId};
use bids_gis::server::{spawn, GisConfig, GisHandle};
use bids_protocols::gis::{ErrorKind, GisRequest, GisResponse, HostStats, ImageQuery};
use common::*;
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

const ELECTION_LIMIT: Duration = Duration::from_secs(5);
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(2);

/// Free loopback ports for the Raft listeners (each replica must know the others' before
/// it starts).
fn free_addrs(n: usize) -> Vec<SocketAddr> {
    let ls: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    ls.iter().map(|l| l.local_addr().unwrap()).collect()
}

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
    cfg.heartbeat_timeout = HEARTBEAT_TIMEOUT;
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

fn raft(g: &GisHandle) -> &GisRaft {
    g.raft().expect("a cluster replica has a Raft node")
}

async fn agreed_leader(gs: &BTreeMap<NodeId, GisHandle>) -> NodeId {
    let ids: Vec<NodeId> = gs.keys().copied().collect();
    let first = gs.values().next().unwrap();
    let leader = raft(first)
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

/// Waits until every replica applied what the leader applied.
async fn settled(gs: &BTreeMap<NodeId, GisHandle>, leader: NodeId) {
    let idx = raft(&gs[&leader])
        .metrics()
        .borrow()
        .last_applied
        .map(|l| l.index);
    for g in gs.values() {
        raft(g)
            .wait(Some(TIMEOUT))
            .applied_index_at_least(idx, "replica applied what the leader did")
            .await
            .unwrap();
    }
}

fn addr(g: &GisHandle) -> Multiaddr {
    g.listen_addrs()[0].clone()
}

fn last_log(g: &GisHandle) -> u64 {
    raft(g).metrics().borrow().last_log_index.unwrap_or(0)
}

async fn listed(key: &Keypair, g: &GisHandle, image: bids_protocols::ImageId) -> Vec<PeerId> {
    let req = GisRequest::Lookup {
        image: ImageQuery::Id(image),
        idc: None,
    };
    match ask(key, &addr(g), req).await {
        GisResponse::HostList(l) => l.level0.iter().map(|h| h.peer).collect(),
        other => panic!("lookup failed: {other:?}"),
    }
}

fn heartbeat() -> GisRequest {
    GisRequest::Heartbeat {
        stats: HostStats::default(),
    }
}

/// Three replicas of one group in `dir`, once they agree on a leader (returned too).
async fn three_replicas(dir: &Path) -> (BTreeMap<NodeId, GisHandle>, NodeId) {
    let admin = Keypair::generate_ed25519();
    let addrs = free_addrs(3);
    let members: BTreeMap<NodeId, SocketAddr> = (1..=3).zip(addrs).collect();
    let mut gs = BTreeMap::new();
    for id in 1..=3 {
        gs.insert(id, replica(dir, id, &members, peer_of(&admin)).await);
    }
    let leader = agreed_leader(&gs).await;
    (gs, leader)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_serve_hosts_and_survive_the_leader() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut gs, leader) = three_replicas(tmp.path()).await;
    let followers: Vec<NodeId> = gs.keys().copied().filter(|id| *id != leader).collect();
    let (f1, f2) = (followers[0], followers[1]);

    // Hosts of IDC "east" register and publish through followers; the writes reach all.
    let (bytes, image) = manifest("debian", "12", 8);
    let a = Keypair::generate_ed25519();
    let b = Keypair::generate_ed25519();
    assert!(matches!(
        ask(&a, &addr(&gs[&f1]), register("east", None)).await,
        GisResponse::Registered { .. }
    ));
    assert!(matches!(
        ask(&b, &addr(&gs[&f2]), register("east", None)).await,
        GisResponse::Registered { .. }
    ));
    assert_ack(&ask(&a, &addr(&gs[&f1]), publish(image, &bytes, 8, true)).await);
    assert_ack(&ask(&b, &addr(&gs[&leader]), publish(image, &[], 3, false)).await);
    settled(&gs, leader).await;
    for g in gs.values() {
        // Each replica answers from its own state (a lookup never lists the requester).
        assert_eq!(listed(&b, g, image).await, vec![peer_of(&a)]);
        assert_eq!(listed(&a, g, image).await, vec![peer_of(&b)]);
    }

    // Heartbeats of live hosts write nothing, wherever they arrive.
    let before = last_log(&gs[&leader]);
    for g in gs.values() {
        assert_ack(&ask(&a, &addr(g), heartbeat()).await);
    }
    let stranger = Keypair::generate_ed25519();
    match ask(&stranger, &addr(&gs[&f1]), heartbeat()).await {
        GisResponse::Error { kind, .. } => assert_eq!(kind, ErrorKind::NotRegistered),
        other => panic!("an unknown host's heartbeat was accepted: {other:?}"),
    }
    assert_eq!(
        last_log(&gs[&leader]),
        before,
        "heartbeats wrote to the log"
    );

    // Host b stops heartbeating; a keeps on through a follower, which relays to the leader.
    // The leader replicates b's death: no replica lists it any more.
    let dead_seen = Instant::now();
    let deadline = dead_seen + 4 * HEARTBEAT_TIMEOUT;
    loop {
        assert_ack(&ask(&a, &addr(&gs[&f2]), heartbeat()).await);
        settled(&gs, leader).await;
        let mut gone_everywhere = true;
        for g in gs.values() {
            gone_everywhere &= !listed(&a, g, image).await.contains(&peer_of(&b));
        }
        if gone_everywhere {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "b never went dead on every replica"
        );
        // Heartbeat pace of a real host: a fifth of the timeout.
        tokio::time::sleep(HEARTBEAT_TIMEOUT / 5).await;
    }
    for g in gs.values() {
        assert_eq!(
            listed(&b, g, image).await,
            vec![peer_of(&a)],
            "a stayed alive"
        );
    }
    // b comes back with a heartbeat to a follower: the leader replicates its return.
    let dead_at = last_log(&gs[&leader]);
    assert_ack(&ask(&b, &addr(&gs[&f1]), heartbeat()).await);
    raft(&gs[&leader])
        .wait(Some(TIMEOUT))
        .metrics(
            |m| m.last_applied.is_some_and(|l| l.index > dead_at),
            "b's return replicated",
        )
        .await
        .unwrap();
    settled(&gs, leader).await;
    for g in gs.values() {
        assert!(
            listed(&a, g, image).await.contains(&peer_of(&b)),
            "b is back"
        );
    }

    // The leader stops; a new one is elected within 5 s and serves writes; nothing
    // committed before is lost.
    let old = gs.remove(&leader).unwrap();
    let stopped = Instant::now();
    old.shutdown().await.unwrap();
    let new_leader = agreed_leader(&gs).await;
    let failover = stopped.elapsed();
    eprintln!("GIS replica {new_leader} leads {failover:?} after replica {leader} stopped");
    assert!(failover < ELECTION_LIMIT, "failover took {failover:?}");
    let c = Keypair::generate_ed25519();
    assert!(matches!(
        ask(&c, &addr(&gs[&f1]), register("west", None)).await,
        GisResponse::Registered { .. }
    ));
    assert_ack(&ask(&c, &addr(&gs[&f2]), publish(image, &[], 8, true)).await);
    settled(&gs, new_leader).await;
    for g in gs.values() {
        assert_eq!(listed(&a, g, image).await, vec![peer_of(&b)]);
        assert_eq!(listed(&b, g, image).await, vec![peer_of(&a)]);
    }
    for (_, g) in gs {
        g.shutdown().await.unwrap();
    }
}

/// A host that writes through a follower sees its write there at once: its heartbeat right
/// after its registration is accepted, and its lookup right after it published a new image
/// finds the image. Before, the follower answered as soon as the leader committed, and the
/// next request could reach it before it applied the write (`NotRegistered`,
/// `UnknownImage`): 2 to 20 of these 2,200 reads, in 3 of 4 runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_answers_a_write_only_once_it_applied_it() {
    const HOSTS: usize = 200;
    const IMAGES: usize = 10;
    let tmp = tempfile::tempdir().unwrap();
    let (gs, leader) = three_replicas(tmp.path()).await;
    let follower = *gs.keys().find(|id| **id != leader).unwrap();
    let at = addr(&gs[&follower]);
    // Each host: register, heartbeat, then publish a new image and look it up, IMAGES times.
    let hosts: Vec<_> = (0..HOSTS)
        .map(|i| {
            let key = Keypair::generate_ed25519();
            let mut reqs = vec![register("east", None), heartbeat()];
            for j in 0..IMAGES {
                let (bytes, image) = manifest(&format!("own-{i}"), &format!("{j}"), 4);
                reqs.push(publish(image, &bytes, 4, true));
                reqs.push(GisRequest::Lookup {
                    image: ImageQuery::Id(image),
                    idc: None,
                });
            }
            let at = at.clone();
            tokio::spawn(async move {
                bids_gis::client::request_many(key, at, reqs, TIMEOUT)
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut stale = Vec::new();
    for h in hosts {
        let answers = h.await.unwrap();
        assert_eq!(answers.len(), 2 + 2 * IMAGES);
        assert!(
            matches!(answers[0], GisResponse::Registered { .. }),
            "{:?}",
            answers[0]
        );
        for (i, a) in answers.iter().enumerate().skip(1) {
            let ok = match i {
                1 => matches!(a, GisResponse::Ack { .. }),
                i if i % 2 == 0 => matches!(a, GisResponse::Ack { .. }),
                _ => matches!(a, GisResponse::HostList(_)),
            };
            if !ok {
                stale.push(a.clone());
            }
        }
    }
    assert!(
        stale.is_empty(),
        "{} of {} reads right after a write saw a state without it, e.g. {:?}",
        stale.len(),
        HOSTS * (1 + IMAGES),
        stale.first()
    );
    for (_, g) in gs {
        g.shutdown().await.unwrap();
    }
}
