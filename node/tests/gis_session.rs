//! Real nodes and a real GIS on loopback: each node carries its GIS requests over one GIS
//! session (counted by the GIS's metrics), not over a stream per request.

use bids_gis::server::{spawn, GisConfig};
use bids_node::NodeConfig;
use bids_protocols::Idc;
use libp2p::identity::Keypair;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_talk_to_the_gis_over_one_session_each() {
    let dir = tempfile::tempdir().unwrap();
    let admin = Keypair::generate_ed25519().public().to_peer_id();
    let mut cfg = GisConfig::new(
        Keypair::generate_ed25519(),
        "/ip4/127.0.0.1/tcp/0".parse().unwrap(),
        dir.path().join("gis"),
        admin,
    );
    cfg.metrics = Some("127.0.0.1:0".parse().unwrap());
    let gis = spawn(cfg).await.unwrap();
    let metrics = gis.metrics_addr().unwrap();
    let gis_addr = gis.listen_addrs()[0].clone();
    let mut nodes = Vec::new();
    for k in 0..2 {
        let mut c = NodeConfig::new(
            Keypair::generate_ed25519(),
            Idc::new("A").unwrap(),
            gis_addr.clone(),
            dir.path().join(format!("node{k}")),
            admin,
        );
        c.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
        nodes.push(bids_node::start(c).await.unwrap());
    }
    // Registered, then a heartbeat every 2 s (the GIS's pace): three each over sessions.
    let deadline = Instant::now() + Duration::from_secs(20);
    let scrape = loop {
        let (code, body) = bids_metrics::get(metrics, "/metrics").await.unwrap();
        assert_eq!(code, 200);
        let s = bids_metrics::text::parse(&body).unwrap();
        let on_sessions = s
            .value(
                "bids_gis_requests_by_transport_total",
                &[("transport", "session")],
            )
            .unwrap_or(0.0);
        if on_sessions >= 6.0 {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "{on_sessions} requests on sessions:\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(scrape.value("bids_gis_sessions", &[]), Some(2.0));
    // Only what a node sends before its session is open goes on streams of its own: its
    // first registration (and at most a publication or two).
    let alone = scrape
        .value(
            "bids_gis_requests_by_transport_total",
            &[("transport", "stream")],
        )
        .unwrap_or(0.0);
    assert!(alone <= 4.0, "{alone} requests on streams of their own");
    for (n, _) in &nodes {
        assert!(n.status().await.unwrap().registered);
        n.shutdown().await;
    }
    // Their sessions end with them.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = bids_metrics::get(metrics, "/metrics").await.unwrap();
        let s = bids_metrics::text::parse(&body).unwrap();
        if s.value("bids_gis_sessions", &[]) == Some(0.0) {
            break;
        }
        assert!(Instant::now() < deadline, "sessions still open:\n{body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    gis.shutdown().await.unwrap();
}
