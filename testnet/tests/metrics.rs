//! The node's metrics endpoint on a real download between two IDCs: `/readyz` turns ready
//! only once the GIS is reachable, `/metrics` parses and counts what moved.

mod common;

use bids_metrics::text::{self, Scrape};
use bids_protocols::gis::ImageQuery;
use bids_protocols::{ImageRef, Policy};
use bids_testnet::cluster::{Cluster, ClusterSpec};
use common::{idc, image_file, wait_for, CHUNK, MIB};
use std::net::SocketAddr;
use std::time::Duration;

async fn scrape(addr: SocketAddr) -> Scrape {
    let (code, body) = bids_metrics::get(addr, "/metrics").await.expect("scrape");
    assert_eq!(code, 200, "{body}");
    text::parse(&body).unwrap_or_else(|e| panic!("exposition does not parse: {e}"))
}

async fn readyz(addr: SocketAddr) -> (u16, String) {
    bids_metrics::get(addr, "/readyz").await.expect("readyz")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_metrics_count_a_real_download_and_readiness_follows_the_gis() {
    common::init_logs();
    let spec = ClusterSpec {
        idcs: vec![idc("A", 1, 1), idc("B", 1, 1)],
        policy: Policy::Bids,
        shaped: false,
    };
    let mut c = Cluster::start(spec).await.unwrap();
    let src = common::ordinary(&c, &c.idc_nodes("A"))[0];
    let host = common::ordinary(&c, &c.idc_nodes("B"))[0];
    let bridgehead = c
        .idc_nodes("B")
        .into_iter()
        .find(|&i| c.nodes[i].is_bridgehead())
        .unwrap();

    // With the GIS down, restart B's host and bridgehead with metrics: alive, not ready.
    c.kill_gis().await;
    let local: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mut addrs = Vec::new();
    for i in [host, bridgehead] {
        // A warning period longer than the testnet's 90-day certificates: the bridgehead's
        // is "expiring" from the start.
        c.restart_node_with(i, |cfg| {
            cfg.metrics = Some(local);
            cfg.cert_warn = Duration::from_secs(120 * 86_400);
        })
        .await
        .unwrap();
        let addr = c.nodes[i].node().metrics_addr().expect("metrics address");
        assert_eq!(bids_metrics::get(addr, "/healthz").await.unwrap().0, 200);
        // Sampled every 200 ms: give it a few rounds to notice there is no GIS.
        tokio::time::sleep(Duration::from_millis(600)).await;
        let (code, body) = readyz(addr).await;
        assert_eq!(code, 503, "ready without a GIS: {body}");
        assert!(body.contains("GIS"), "{body}");
        addrs.push(addr);
    }
    let (host_m, bh_m) = (addrs[0], addrs[1]);

    c.start_gis_at_same_address().await.unwrap();
    for addr in [host_m, bh_m] {
        wait_for(
            "readyz to turn ready",
            Duration::from_secs(15),
            || async move { (readyz(addr).await.0 == 200).then_some(()) },
        )
        .await;
    }
    c.wait_bridgeheads_linked(Duration::from_secs(10))
        .await
        .unwrap();

    let size = 3 * MIB + 4321;
    let (file, _guard) = image_file(size, 21, false);
    let image: ImageRef = "metrics:1".parse().unwrap();
    let m = c.seed(src, &file, &image, CHUNK).await.unwrap();
    let chunks = m.chunks.len() as f64;
    let took = c.nodes[host]
        .node()
        .fetch_and_wait(ImageQuery::Ref(image.clone()))
        .await
        .unwrap();
    assert!(took > 0.0);

    let img = image.to_string();
    // Gauges are sampled from the node's state every 200 ms.
    let h = wait_for(
        "the download to leave the active gauge",
        Duration::from_secs(5),
        || async move {
            let s = scrape(host_m).await;
            (s.value("bids_node_downloads_active", &[]) == Some(0.0)).then_some(s)
        },
    )
    .await;
    // The host got every byte over its LAN (from its bridgehead), none over the WAN.
    let lan_in = h.sum(
        "bids_node_transfer_bytes_total",
        &[("image", &img), ("link", "lan"), ("direction", "in")],
    );
    assert!(lan_in >= size as f64, "host LAN in {lan_in} < image {size}");
    assert_eq!(
        h.sum(
            "bids_node_transfer_bytes_total",
            &[("link", "wan"), ("direction", "in")]
        ),
        0.0
    );
    assert_eq!(
        h.value("bids_node_chunks_total", &[("outcome", "verified")]),
        Some(chunks)
    );
    assert_eq!(
        h.value("bids_node_downloads_total", &[("outcome", "done")]),
        Some(1.0)
    );
    assert_eq!(h.value("bids_node_provision_seconds_count", &[]), Some(1.0));
    let sum = h.value("bids_node_provision_seconds_sum", &[]).unwrap();
    assert!(
        (sum - took).abs() < 0.5,
        "histogram sum {sum} vs took {took}"
    );
    // Peers by kind: every kind has its series (how many are connected now varies).
    for kind in ["bridgehead", "host", "remote", "pending"] {
        assert!(
            h.value("bids_node_peers", &[("kind", kind)]).is_some(),
            "{kind}"
        );
    }
    assert!(h.value("bids_node_store_used_bytes", &[]).unwrap() >= size as f64 * 0.9);
    assert!(h.value("bids_node_store_free_bytes", &[]).unwrap() > 0.0);
    assert_eq!(h.value("bids_node_gis_registered", &[]), Some(1.0));
    assert_eq!(
        h.value("bids_node_cert_expiry_timestamp_seconds", &[]),
        Some(0.0)
    );
    assert_eq!(
        h.types
            .get("bids_node_provision_seconds")
            .map(String::as_str),
        Some("histogram")
    );
    // libp2p's own metrics share the registry: transport bytes at least the chunk bytes.
    assert!(h.sum("libp2p_bandwidth_bytes_total", &[("direction", "Inbound")]) >= lan_in);
    assert!(h.sum("libp2p_swarm_connections_established_total", &[]) >= 1.0);
    assert!(
        h.sum(
            "bids_node_request_response_events_total",
            &[("protocol", "chunk")]
        ) >= chunks
    );
    assert!(h.types.keys().any(|k| k.starts_with("libp2p_gossipsub_")));

    // B's bridgehead pulled the image over the WAN and passed it into its LAN. It met A's
    // bridgehead moments ago (the whole transfer can fit in one 200 ms sampling period):
    // wait for a sample that has seen it.
    let b = wait_for(
        "the bridgehead's remote peer in a sample",
        Duration::from_secs(5),
        || async move {
            let s = scrape(bh_m).await;
            (s.value("bids_node_peers", &[("kind", "remote")])
                .unwrap_or(0.0)
                >= 1.0)
                .then_some(s)
        },
    )
    .await;
    let wan_in = b.sum(
        "bids_node_transfer_bytes_total",
        &[("image", &img), ("link", "wan"), ("direction", "in")],
    );
    assert!(
        wan_in >= size as f64,
        "bridgehead WAN in {wan_in} < image {size}"
    );
    assert!(
        b.sum(
            "bids_node_transfer_bytes_total",
            &[("image", &img), ("link", "lan"), ("direction", "out")]
        ) > 0.0
    );
    let expiry = b
        .value("bids_node_cert_expiry_timestamp_seconds", &[])
        .unwrap();
    let st = common::status(&c, bridgehead).await;
    assert_eq!(Some(expiry as i64), st.cert_expires_at);
    assert!(expiry > bids_protocols::unix_now() as f64);
    // The testnet's certificates last 90 days, inside the 120-day warning period set above.
    assert!(st.cert_expiring);
    assert_eq!(b.value("bids_node_cert_expiring", &[]), Some(1.0));

    // A stopped node's endpoint goes away with it.
    c.stop_node(host).await;
    assert!(bids_metrics::get(host_m, "/healthz").await.is_err());
    c.shutdown().await;
}
