//! What an operator of a large network meets in the console's API: 2,000 hosts registered
//! with a real GIS and listed page by page, searched and sorted; bad input answered with a
//! JSON 400 that says what is accepted; a bridgehead certificate flagged before it ends and
//! the bridgehead shown demoted once it has. Everything goes RMC → GIS (→ host) over libp2p.

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

const IDLE: usize = 2000;

fn peers(v: &Value) -> Vec<String> {
    v.as_array()
        .expect("an array of hosts")
        .iter()
        .map(|h| h["peer"].as_str().expect("peer").to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_hosts_are_paged_searched_and_sorted() {
    let env = start(vec![idc("A", 1, 1), idc("B", 1, 1)]).await;
    let mut http = env.http.clone();
    assert_eq!(http.login(PASSWORD).await.status, 200);
    let idcs = vec![
        bids_protocols::Idc::new("A").expect("idc"),
        bids_protocols::Idc::new("B").expect("idc"),
    ];
    let t = Instant::now();
    let idle = bids_testnet::crowd::register_idle_hosts(
        &env.cluster.gis_addr,
        &idcs,
        env.cluster.spec.policy,
        IDLE,
    )
    .await
    .expect("registering the idle hosts");
    eprintln!("{IDLE} hosts registered in {:?}", t.elapsed());
    let total = IDLE + 4;

    // Every host once, page by page, in peer order.
    let t = Instant::now();
    let first = http.get("/api/hosts?sort=peer&limit=100").await;
    eprintln!("one page of {total} hosts in {:?}", t.elapsed());
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(
        first.header("x-total-count"),
        Some(total.to_string().as_str())
    );
    let mut seen = peers(&first.json());
    for offset in (100..total).step_by(100) {
        let r = http
            .get(&format!("/api/hosts?sort=peer&limit=100&offset={offset}"))
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
        seen.extend(peers(&r.json()));
    }
    assert_eq!(seen.len(), total);
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "pages out of order");
    let all: BTreeSet<String> = seen.iter().cloned().collect();
    assert!(idle.iter().all(|p| all.contains(&p.to_string())));
    // Past the end: an empty page, the same total.
    let r = http.get("/api/hosts?limit=10&offset=5000").await;
    assert_eq!(r.json(), json!([]));
    assert_eq!(r.header("x-total-count"), Some(total.to_string().as_str()));

    // Search by a piece of a peer id finds that host.
    let one = idle[1234].to_string();
    let r = http
        .get_json(&format!("/api/hosts?q={}", &one[one.len() - 12..]))
        .await;
    assert_eq!(peers(&r), vec![one]);
    // Filters: B's certified bridgehead alone; the live testnet hosts first by liveness.
    let r = http
        .get_json("/api/hosts?idc=B&role=bridgehead&limit=5")
        .await;
    assert_eq!(r.as_array().map(Vec::len), Some(1), "{r}");
    let live: Vec<String> = env
        .cluster
        .nodes
        .iter()
        .map(|n| n.peer_id().to_string())
        .collect();
    let r = wait_for(
        "the idle hosts to count as down",
        Duration::from_secs(30),
        || {
            let http = http.clone();
            async move {
                let r = http
                    .get_json("/api/hosts?sort=alive&order=desc&limit=5")
                    .await;
                let arr = r.as_array()?;
                (arr[..4].iter().all(|h| h["alive"] == true) && arr[4]["alive"] == false)
                    .then_some(r)
            }
        },
    )
    .await;
    let mut top = peers(&r)[..4].to_vec();
    top.sort();
    let mut want = live;
    want.sort();
    assert_eq!(top, want);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_json_400() {
    let env = start(vec![idc("A", 1, 1)]).await;
    let mut http = env.http.clone();
    assert_eq!(http.login(PASSWORD).await.status, 200);
    let peer = env.cluster.nodes[1].peer_id().to_string();
    let error = |r: &Reply| {
        r.json()["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no JSON error in {}", r.body))
            .to_string()
    };

    let r = http
        .post(
            &format!("/api/hosts/{peer}/limits"),
            json!({"upload_bps": -1, "download_bps": 0}),
        )
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(
        error(&r),
        "upload_bps must be a whole number of bytes/s (0 = unlimited) from 0 to 1000000000000, got -1"
    );
    let r = http
        .post(
            &format!("/api/hosts/{peer}/limits"),
            json!({"upload_bps": 1.5, "download_bps": 0}),
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.body);
    let r = http
        .post(
            &format!("/api/hosts/{peer}/limits"),
            json!({"upload_bps": 1}),
        )
        .await;
    assert_eq!(r.status, 400);
    assert!(error(&r).contains("download_bps"), "{}", r.body);
    let r = http
        .post("/api/gc", json!({"policy": "oldest", "keep": -2}))
        .await;
    assert_eq!(r.status, 400);
    assert!(
        error(&r).starts_with("keep must be a whole number"),
        "{}",
        r.body
    );
    let r = http
        .post(
            &format!("/api/hosts/{peer}/fetch"),
            json!({"image": "no-version"}),
        )
        .await;
    assert_eq!(r.status, 400);
    assert!(error(&r).contains("name:version"), "{}", r.body);
    // Not JSON at all.
    let r = http
        .raw(
            "POST",
            &format!("/api/hosts/{peer}/sharing"),
            Some(&json!("on")),
            true,
        )
        .await;
    assert_eq!(r.status, 400);
    assert!(error(&r).starts_with("bad request body"), "{}", r.body);

    for (q, want) in [
        (
            "limit=-1",
            "limit must be a whole number from 1 to 1000, got \"-1\"",
        ),
        ("limit=abc", "limit must be a whole number"),
        ("offset=-5", "offset must be a whole number"),
        ("sort=colour", "sort must be one of"),
        ("order=sideways", "order must be asc or desc"),
        ("alive=maybe", "alive must be true or false"),
        ("bogus=1", "unknown query parameter \"bogus\""),
    ] {
        let r = http.get(&format!("/api/hosts?{q}")).await;
        assert_eq!(r.status, 400, "{q}: {}", r.body);
        assert!(
            r.header("content-type")
                .is_some_and(|c| c.starts_with("application/json")),
            "{q}"
        );
        assert!(error(&r).contains(want), "{q}: {}", r.body);
    }
    // The host's limits did not change through any of it.
    let hosts = http.get_json("/api/hosts").await;
    let l = &host(&hosts, &peer)["limits"];
    assert!(l.is_null() || l["upload_bps"] == 0, "{hosts}");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ending_certificate_is_flagged_then_the_bridgehead_shown_demoted() {
    const VALID: Duration = Duration::from_secs(8);
    let env = start_with(vec![idc("A", 1, 1), idc("B", 1, 0)], |c| {
        c.cert_validity = VALID;
    })
    .await;
    let mut http = env.http.clone();
    assert_eq!(http.login(PASSWORD).await.status, 200);
    let stats = http.get_json("/api/stats").await;
    assert_eq!(stats["policy"], "bids", "{}", stats["policy"]);
    let b = env.cluster.idc_nodes("B")[0];
    let peer = env.cluster.nodes[b].peer_id().to_string();

    // The console makes B's host a bridgehead with a certificate that ends in 8 s: well
    // inside the 14-day warning period.
    let r = http
        .put("/api/idcs/B/bridgeheads", json!({"peers": [peer]}))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["issued"][0]["role"], "bridgehead", "{}", r.body);
    let serial = r.json()["issued"][0]["serial"].clone();
    let hosts = http.get_json(&format!("/api/hosts?q={peer}")).await;
    let h = host(&hosts, &peer);
    assert_eq!(h["role"], "bridgehead");
    assert_eq!(h["cert_expiring"], true, "{h}");
    let left = h["cert_expires_in_s"].as_i64().expect("seconds left");
    assert!((0..=8).contains(&left), "{left}");
    let stats = http.get_json("/api/stats").await;
    let alert = stats["cert_alerts"]
        .as_array()
        .and_then(|a| a.iter().find(|a| a["peer"] == peer.as_str()))
        .unwrap_or_else(|| panic!("no alert for {peer}: {}", stats["cert_alerts"]));
    assert_eq!(alert["state"], "expiring");
    assert_eq!(alert["serial"], serial);

    // The certificate ends; the node drops it and registers again as a host. The GIS then
    // no longer knows it was a bridgehead, the console does.
    let ev = wait_for(
        "the console to record the demotion",
        VALID + Duration::from_secs(20),
        || {
            let http = http.clone();
            let peer = peer.clone();
            async move {
                let s = http.get_json("/api/stats").await;
                s["history"]["events"]
                    .as_array()?
                    .iter()
                    .find(|e| e["peer"] == peer.as_str() && e["change"] == "demoted")
                    .cloned()
            }
        },
    )
    .await;
    assert_eq!(ev["reason"], "certificate expired", "{ev}");
    assert_eq!(ev["serial"], serial, "{ev}");
    assert_eq!(ev["idc"], "B");
    let hosts = http.get_json(&format!("/api/hosts?q={peer}")).await;
    let h = host(&hosts, &peer);
    assert_eq!(h["role"], "host", "{h}");
    assert_eq!(h["demoted"]["reason"], "certificate expired", "{h}");
    assert_eq!(h["cert_expiring"], false, "{h}");
    env.stop().await;
}
