//! The console's link to several GIS replicas: when the replica in use stops answering,
//! queries and revocations go to the next one that answers, and it stays in use. Two real
//! GIS servers on 127.0.0.1 stand in for the replicas (they hold different hosts, so the
//! answers show which one spoke).

use bids_gis::server::{spawn, GisConfig};
use bids_protocols::gis::{GisRequest, GisResponse};
use bids_protocols::{Idc, Policy};
use bids_rmc::gis_link::{AdminGis, FailoverGis};
use libp2p::identity::Keypair;
use std::time::Duration;

#[tokio::test]
async fn queries_and_revocations_move_to_the_replica_that_answers() {
    let dir = tempfile::tempdir().unwrap();
    let admin = Keypair::generate_ed25519();
    let admin_peer = admin.public().to_peer_id();
    let gis = |n: &str| {
        GisConfig::new(
            Keypair::generate_ed25519(),
            "/ip4/127.0.0.1/tcp/0".parse().unwrap(),
            dir.path().join(n),
            admin_peer,
        )
    };
    let g1 = spawn(gis("g1")).await.unwrap();
    let g2 = spawn(gis("g2")).await.unwrap();
    let a1 = g1.listen_addrs()[0].clone();
    let a2 = g2.listen_addrs()[0].clone();

    // A host known to the second GIS only.
    let host = Keypair::generate_ed25519();
    let r = bids_gis::client::request_once(
        host.clone(),
        a2.clone(),
        GisRequest::Register {
            idc: Idc::new("A").unwrap(),
            addrs: vec!["/ip4/127.0.0.1/tcp/4001".parse().unwrap()],
            cert: None,
            policy: Policy::Bids,
        },
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert!(matches!(r, GisResponse::Registered { .. }), "{r:?}");

    let link = FailoverGis::connect(vec![a1.clone(), a2.clone()], admin.clone())
        .await
        .unwrap();
    assert!(
        link.hosts().await.unwrap().is_empty(),
        "the first GIS answers first"
    );
    g1.shutdown().await.unwrap();
    let hosts = link.hosts().await.unwrap();
    assert_eq!(hosts.len(), 1, "the second GIS answered");
    assert_eq!(hosts[0].peer, host.public().to_peer_id());
    link.revoke(7).await.unwrap();

    // Started while the first is down: the second is used from the start.
    let link = FailoverGis::connect(vec![a1, a2], admin).await.unwrap();
    assert_eq!(link.stats().await.unwrap().hosts, 1);
    g2.shutdown().await.unwrap();
}
