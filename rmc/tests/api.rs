//! The console's JSON API against an in-process testnet: login and CSRF rules, live rate
//! limits, bridgehead changes, image gc. Everything goes RMC → GIS → host over libp2p, as
//! in production.

mod common;

use bids_protocols::gis::{ErrorKind, GisRequest, GisResponse, ImageQuery};
use bids_protocols::{Idc, ImageRef, Policy};
use common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

fn image(size: u64, seed: u64) -> (std::path::PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let f = dir.path().join("image.raw");
    bids_testnet::demo::make_image(&f, size, seed, false).expect("writing the test image");
    (f, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_is_required_and_wrong_password_refused() {
    let env = start(vec![idc("A", 2, 1)]).await;
    let mut http = env.http.clone();
    let peer = env.cluster.nodes[1].peer_id().to_string();

    // No session: every API route answers 401, the pages themselves load.
    for path in ["/api/hosts", "/api/images", "/api/stats", "/api/session"] {
        assert_eq!(http.get(path).await.status, 401, "GET {path}");
    }
    let limits = json!({"upload_bps": 1, "download_bps": 1});
    let r = http
        .post(&format!("/api/hosts/{peer}/limits"), limits.clone())
        .await;
    assert_eq!(r.status, 401);
    let r = http
        .put("/api/idcs/A/bridgeheads", json!({"peers": []}))
        .await;
    assert_eq!(r.status, 401);
    let r = http
        .post(
            "/api/gc",
            json!({"policy": "oldest", "keep": 0, "dry_run": true}),
        )
        .await;
    assert_eq!(r.status, 401);
    let page = http.get("/").await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("Remote Management Console"));
    assert!(page.header("content-security-policy").is_some());

    // Wrong password, wrong user: 401 and no cookie.
    let r = http.login("not the password").await;
    assert_eq!(r.status, 401);
    assert!(r.header("set-cookie").is_none());
    let r = http
        .raw(
            "POST",
            "/api/login",
            Some(&json!({"user": "root", "password": PASSWORD})),
            false,
        )
        .await;
    assert_eq!(r.status, 401);
    assert!(http.cookie.is_none());

    // The right one: a HttpOnly, SameSite=Strict cookie with an expiry, and a CSRF token.
    let r = http.login(PASSWORD).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let cookie = r.header("set-cookie").unwrap_or_default().to_string();
    assert!(cookie.contains("HttpOnly"), "{cookie}");
    assert!(cookie.contains("SameSite=Strict"), "{cookie}");
    assert!(cookie.contains("Max-Age="), "{cookie}");
    let hosts = http.get_json("/api/hosts").await;
    assert_eq!(hosts.as_array().map(Vec::len), Some(3), "{hosts}");
    let h = host(&hosts, &peer);
    assert_eq!(h["idc"], "A");
    assert_eq!(h["role"], "host");
    assert_eq!(h["alive"], true);
    assert!(h["counters"]["lan_recv_bytes"].is_u64(), "{h}");
    let bh = host(&hosts, &env.cluster.nodes[0].peer_id().to_string());
    assert_eq!(bh["role"], "bridgehead");
    assert_eq!(bh["cert"]["status"], "valid");
    assert_eq!(http.get_json("/api/session").await["user"], "admin");

    // A state-changing request without the CSRF header, or with a wrong one, is refused
    // even with the session cookie.
    let path = format!("/api/hosts/{peer}/limits");
    let r = http.raw("POST", &path, Some(&limits), false).await;
    assert_eq!(r.status, 403, "{}", r.body);
    let mut forged = http.clone();
    forged.csrf = Some("0".repeat(64));
    assert_eq!(forged.post(&path, limits.clone()).await.status, 403);
    // A made-up session cookie is no session.
    let mut stranger = http.clone();
    stranger.cookie = Some(format!("bids_rmc_session={}", "a".repeat(64)));
    assert_eq!(stranger.get("/api/hosts").await.status, 401);

    // Logging out ends the session.
    assert_eq!(http.post("/api/logout", json!({})).await.status, 200);
    assert_eq!(http.get("/api/hosts").await.status, 401);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_set_through_the_api_is_observed_in_throughput() {
    let env = start(vec![idc("A", 3, 0)]).await;
    let mut http = env.http.clone();
    assert_eq!(http.login(PASSWORD).await.status, 200);
    let size = 16 * MIB;
    let (file, _d) = image(size, 7);
    let img: ImageRef = "limited:1".parse().expect("ref");
    env.cluster
        .seed(0, &file, &img, CHUNK)
        .await
        .expect("seeding");
    let slow = env.cluster.nodes[1].peer_id().to_string();

    // 3 MB/s download limit on host 1, applied live and reported back.
    let limit: u64 = 3_000_000;
    let r = http
        .post(
            &format!("/api/hosts/{slow}/limits"),
            json!({"upload_bps": 0, "download_bps": limit}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let o = r.json();
    assert_eq!(o["outcome"]["settings"]["download_bps"], limit, "{o}");
    // The GIS learns the new settings from the next heartbeat.
    wait_for("the limit in /api/hosts", Duration::from_secs(10), || {
        let http = http.clone();
        let slow = slow.clone();
        async move {
            let hosts = http.get_json("/api/hosts").await;
            (host(&hosts, &slow)["limits"]["download_bps"] == limit).then_some(())
        }
    })
    .await;

    // Ordered through the console, the download runs at the limit from its first request: the
    // host charges its limit as chunk requests leave, so its pipeline (8 chunks, 2 MiB) cannot
    // run ahead of it. Measured on the host's own byte counter while the download runs.
    let node = env.cluster.nodes[1].node().clone();
    let t0 = Instant::now();
    let r = http
        .post(
            &format!("/api/hosts/{slow}/fetch"),
            json!({"image": "limited:1"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let holder_complete = |peer: String| {
        let http = http.clone();
        async move {
            let images = http.get_json("/api/images").await;
            let done = images.as_array()?.iter().any(|i| {
                i["name"] == "limited"
                    && i["holders"].as_array().is_some_and(|hs| {
                        hs.iter()
                            .any(|h| h["peer"] == peer && h["complete"] == true)
                    })
            });
            done.then_some(())
        }
    };
    let received = |node: bids_node::NodeHandle| async move {
        node.status()
            .await
            .map(|s| s.total.lan_recv_bytes)
            .unwrap_or(0)
    };
    // Bytes received at one instant: the counter only grows, so reading it a moment late
    // can only overstate what arrived by then.
    tokio::time::sleep_until((t0 + Duration::from_secs(1)).into()).await;
    let first_second = received(node.clone()).await;
    eprintln!("first second: {first_second} B received, limit {limit} B/s + one chunk {CHUNK} B");
    assert!(
        first_second <= limit + u64::from(CHUNK),
        "{first_second} bytes in the first second under a {limit} B/s limit"
    );
    let (ta, got_a) = wait_for("the first chunks", Duration::from_secs(30), || {
        let n = node.clone();
        async move {
            let b = received(n).await;
            (b > 0).then(|| (Instant::now(), b))
        }
    })
    .await;
    let (tb, got_b) = wait_for("the end of the download", Duration::from_secs(30), || {
        let n = node.clone();
        async move {
            let b = received(n).await;
            (b >= size - u64::from(CHUNK)).then(|| (Instant::now(), b))
        }
    })
    .await;
    let rate = (got_b - got_a) as f64 / (tb - ta).as_secs_f64();
    let ratio = rate / limit as f64;
    eprintln!(
        "throughput {rate:.0} B/s over {:.2} s = {ratio:.3} x the limit",
        (tb - ta).as_secs_f64()
    );
    assert!(
        (0.8..=1.2).contains(&ratio),
        "limited to {limit} B/s, the host received {rate:.0} B/s ({ratio:.3} x)"
    );
    wait_for("the limited download", Duration::from_secs(30), || {
        holder_complete(slow.clone())
    })
    .await;
    let limited_s = t0.elapsed().as_secs_f64();
    // The console shows the same through the GIS once the host's next heartbeat lands.
    wait_for(
        "the received bytes in /api/hosts",
        Duration::from_secs(10),
        || {
            let http = http.clone();
            let slow = slow.clone();
            async move {
                let hosts = http.get_json("/api/hosts").await;
                let recv = host(&hosts, &slow)["counters"]["lan_recv_bytes"]
                    .as_u64()
                    .unwrap_or(0);
                (recv >= size).then_some(())
            }
        },
    )
    .await;

    // An unlimited host fetches the same image much faster.
    let fast = env.cluster.nodes[2].peer_id().to_string();
    let t1 = Instant::now();
    let r = http
        .post(
            &format!("/api/hosts/{fast}/fetch"),
            json!({"image": "limited:1"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    wait_for("the unlimited download", Duration::from_secs(30), || {
        holder_complete(fast.clone())
    })
    .await;
    let free_s = t1.elapsed().as_secs_f64();
    assert!(
        free_s < limited_s / 2.0,
        "unlimited {free_s:.2} s vs limited {limited_s:.2} s"
    );
    // Lifting the limit is reported too.
    let r = http
        .post(
            &format!("/api/hosts/{slow}/limits"),
            json!({"upload_bps": 0, "download_bps": 0}),
        )
        .await;
    assert_eq!(r.json()["outcome"]["settings"]["download_bps"], 0);
    env.stop().await;
}

fn bridgeheads_of(hosts: &Value, idc: &str) -> Vec<String> {
    hosts
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|h| h["idc"] == idc && h["role"] == "bridgehead")
                .filter_map(|h| h["peer"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridgehead_change_takes_effect_and_old_cert_is_refused() {
    let mut env = start(vec![idc("A", 1, 1), idc("B", 2, 1)]).await;
    let mut http = env.http.clone();
    assert_eq!(http.login(PASSWORD).await.status, 200);
    let b = env.cluster.idc_nodes("B");
    let (old_i, new_i, user_i) = (b[0], b[1], b[2]);
    let old = env.cluster.nodes[old_i].peer_id().to_string();
    let new = env.cluster.nodes[new_i].peer_id().to_string();
    let old_cert = env.cluster.nodes[old_i]
        .cert
        .clone()
        .expect("B's first node is a bridgehead");
    let old_serial = old_cert.body.serial;
    assert_eq!(
        bridgeheads_of(&http.get_json("/api/hosts").await, "B"),
        vec![old.clone()]
    );

    // A peer of another IDC cannot become B's bridgehead.
    let a_peer = env.cluster.nodes[0].peer_id().to_string();
    let r = http
        .put("/api/idcs/B/bridgeheads", json!({"peers": [a_peer]}))
        .await;
    assert_eq!(r.status, 400, "{}", r.body);

    let r = http
        .put("/api/idcs/B/bridgeheads", json!({"peers": [new]}))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let c = r.json();
    assert_eq!(c["issued"][0]["peer"], new, "{c}");
    assert_eq!(c["issued"][0]["role"], "bridgehead", "{c}");
    assert!(c["issued"][0]["error"].is_null(), "{c}");
    assert_eq!(c["dropped"][0]["peer"], old, "{c}");
    assert_eq!(c["dropped"][0]["serial"], old_serial, "{c}");
    assert_eq!(c["dropped"][0]["revoked"], true, "{c}");
    assert_eq!(c["dropped"][0]["demoted"], true, "{c}");
    let hosts = http.get_json("/api/hosts").await;
    assert_eq!(bridgeheads_of(&hosts, "B"), vec![new.clone()], "{hosts}");

    // The old bridgehead comes back with its old certificate (still in its configuration):
    // the GIS refuses the certificate, so the node drops it and registers as an ordinary
    // host of B instead of retrying with it forever.
    env.cluster.stop_node(old_i).await;
    let restarted_ms = bids_gis::server::unix_ms();
    env.cluster
        .start_node(old_i)
        .await
        .expect("restarting the old bridgehead");
    let node = env.cluster.nodes[old_i].node().clone();
    wait_for(
        "the old bridgehead to register as a host",
        Duration::from_secs(10),
        || {
            let node = node.clone();
            async move {
                node.status()
                    .await
                    .ok()
                    .filter(|s| s.registered && s.role == bids_protocols::Role::Host)
                    .map(|_| ())
            }
        },
    )
    .await;
    // The console lists it alive, as a host without a certificate, heartbeating since the
    // restart (a node refused at registration never heartbeats).
    let hosts = wait_for(
        "the old bridgehead alive as a host in /api/hosts",
        Duration::from_secs(10),
        || {
            let http = http.clone();
            let old = old.clone();
            async move {
                let hosts = http.get_json("/api/hosts").await;
                let h = host(&hosts, &old);
                let fresh = h["last_seen_ms"].as_i64().is_some_and(|t| t > restarted_ms);
                (h["alive"] == true && h["role"] == "host" && h["cert"].is_null() && fresh)
                    .then_some(hosts)
            }
        },
    )
    .await;
    assert_eq!(bridgeheads_of(&hosts, "B"), vec![new.clone()], "{hosts}");
    // The GIS still refuses the old certificate (asked over the node's own connection).
    let again = node
        .gis_request(GisRequest::Register {
            idc: Idc::new("B").expect("IDC name"),
            addrs: Vec::new(),
            cert: Some(old_cert.clone()),
            policy: Policy::Bids,
        })
        .await
        .expect("the GIS answers");
    match again {
        GisResponse::Error { kind, message } => {
            assert_eq!(kind, ErrorKind::BadCert, "{message}");
            assert!(message.contains("revoked"), "{message}");
        }
        other => panic!("the revoked serial {old_serial} was accepted: {other:?}"),
    }
    let st = node.status().await.expect("status");
    assert!(st.registered && st.role == bids_protocols::Role::Host);

    // The change takes effect on the data path: B's lookups name the new bridgehead, and an
    // image from A reaches a host of B through it.
    let (file, _d) = image(2 * MIB, 3);
    let img: ImageRef = "across:1".parse().expect("ref");
    env.cluster
        .seed(1, &file, &img, CHUNK)
        .await
        .expect("seeding in A");
    let list = env
        .cluster
        .lookup("B", &ImageQuery::Ref(img.clone()))
        .await
        .expect("lookup");
    let level1: Vec<String> = list.level1.iter().map(|e| e.peer.to_string()).collect();
    assert_eq!(level1, vec![new.clone()]);
    env.cluster
        .fetch_all(&[user_i], &img, Duration::from_secs(30))
        .await
        .expect("a host of B gets the image through the new bridgehead");
    // The old bridgehead, now an ordinary host, still takes part in its LAN, never the WAN.
    env.cluster
        .fetch_all(&[old_i], &img, Duration::from_secs(30))
        .await
        .expect("the demoted host fetches within B");
    let st = node.status().await.expect("status");
    assert!(st.total.lan_recv_bytes > 0, "{:?}", st.total);
    assert_eq!(st.total.wan_recv_bytes, 0, "{:?}", st.total);
    // Its counters reach the console with its next heartbeat.
    wait_for(
        "WAN bytes at the new bridgehead",
        Duration::from_secs(10),
        || {
            let http = http.clone();
            let new = new.clone();
            async move {
                let hosts = http.get_json("/api/hosts").await;
                let wan_in = host(&hosts, &new)["counters"]["wan_recv_bytes"]
                    .as_u64()
                    .unwrap_or(0);
                (wan_in > 0).then_some(())
            }
        },
    )
    .await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_dry_run_lists_then_real_run_removes_and_gis_forgets() {
    let env = start(vec![idc("A", 2, 0)]).await;
    let mut http = env.http.clone();
    assert_eq!(http.login(PASSWORD).await.status, 200);
    let mut files = Vec::new();
    for v in 1..=3 {
        let (f, d) = image(MIB, v);
        let img: ImageRef = format!("gc:{v}").parse().expect("ref");
        env.cluster.seed(0, &f, &img, CHUNK).await.expect("seeding");
        files.push(d);
    }
    let peer = env.cluster.nodes[0].peer_id().to_string();
    let holders_of = |images: &Value, version: &str| -> Vec<String> {
        images
            .as_array()
            .and_then(|a| {
                a.iter()
                    .find(|i| i["name"] == "gc" && i["version"] == version)
            })
            .and_then(|i| i["holders"].as_array())
            .map(|hs| {
                hs.iter()
                    .filter_map(|h| h["peer"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };

    let order = json!({"policy": "oldest", "keep": 1, "dry_run": true, "peers": [peer]});
    let r = http.post("/api/gc", order).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let dry = r.json();
    assert_eq!(dry["dry_run"], true);
    let mut listed: Vec<String> = dry["hosts"][0]["removed"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|i| i["image"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    // The three were added within the same second, so "oldest" may pick any two of them.
    listed.sort();
    listed.dedup();
    assert_eq!(listed.len(), 2, "{dry}");
    assert!(
        listed
            .iter()
            .all(|i| ["gc:1", "gc:2", "gc:3"].contains(&i.as_str())),
        "{dry}"
    );
    let kept = ["1", "2", "3"]
        .into_iter()
        .find(|v| !listed.contains(&format!("gc:{v}")))
        .unwrap_or("none");
    let gone: Vec<&str> = ["1", "2", "3"].into_iter().filter(|v| *v != kept).collect();
    // Nothing went.
    let images = http.get_json("/api/images").await;
    for v in ["1", "2", "3"] {
        assert_eq!(
            holders_of(&images, v),
            vec![peer.clone()],
            "gc:{v} after the dry run"
        );
    }

    let order = json!({"policy": "oldest", "keep": 1, "dry_run": false, "peers": [peer]});
    let r = http.post("/api/gc", order).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let real = r.json();
    assert_eq!(real["dry_run"], false);
    assert_eq!(
        real["hosts"][0]["removed"], dry["hosts"][0]["removed"],
        "{real}"
    );
    assert_eq!(real["hosts"][0]["kept"], 1);
    // The GIS forgets the holder of what went, and keeps it for what stayed.
    wait_for(
        "the GIS to forget the removed holdings",
        Duration::from_secs(10),
        || {
            let http = http.clone();
            let peer = peer.clone();
            let gone = gone.clone();
            async move {
                let images = http.get_json("/api/images").await;
                let forgotten = gone.iter().all(|v| !holders_of(&images, v).contains(&peer));
                forgotten.then_some(())
            }
        },
    )
    .await;
    let images = http.get_json("/api/images").await;
    assert_eq!(holders_of(&images, kept), vec![peer.clone()]);
    // And the host's store agrees.
    let left = env.cluster.nodes[0].node().store().list();
    assert_eq!(left.len(), 1, "{left:?}");

    // Bad orders are refused before anything is sent.
    let r = http
        .post("/api/gc", json!({"policy": "newest", "keep": 1}))
        .await;
    assert_eq!(r.status, 400);
    let r = http.post("/api/gc", json!({"policy": "lru"})).await;
    assert_eq!(r.status, 400);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provision_time_is_the_hosts_own_measure() {
    let env = start(vec![idc("A", 2, 0)]).await;
    let mut http = env.http.clone();
    assert_eq!(http.login(PASSWORD).await.status, 200);
    let (file, _d) = image(4 * MIB, 21);
    let img: ImageRef = "timed:1".parse().expect("ref");
    env.cluster
        .seed(0, &file, &img, CHUNK)
        .await
        .expect("seeding");
    let publisher = env.cluster.nodes[0].peer_id().to_string();
    let peer = env.cluster.nodes[1].peer_id().to_string();

    // The test's own wall clock: from before the order until the console shows the copy
    // complete, which contains the host's download from its start to its verified end.
    let t0 = Instant::now();
    let r = http
        .post(
            &format!("/api/hosts/{peer}/fetch"),
            json!({"image": "timed:1"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let id = wait_for("the fetched copy complete", Duration::from_secs(30), || {
        let http = http.clone();
        let peer = peer.clone();
        async move {
            let images = http.get_json("/api/images").await;
            let i = images.as_array()?.iter().find(|i| i["name"] == "timed")?;
            let done = i["holders"]
                .as_array()?
                .iter()
                .any(|h| h["peer"] == peer && h["complete"] == true);
            done.then(|| i["id"].as_str().map(str::to_string))?
        }
    })
    .await;
    let wall = t0.elapsed().as_secs_f64();

    // The host reports it with its next heartbeat; /api/hosts shows it.
    let seconds = wait_for(
        "the provision time in /api/hosts",
        Duration::from_secs(10),
        || {
            let http = http.clone();
            let (peer, id) = (peer.clone(), id.clone());
            async move {
                let hosts = http.get_json("/api/hosts").await;
                let p = host(&hosts, &peer)["provisions"]
                    .as_array()?
                    .iter()
                    .find(|p| p["id"] == id.as_str())?
                    .clone();
                p["seconds"].as_f64()
            }
        },
    )
    .await;
    eprintln!("provision time reported {seconds:.3} s, observed wall time {wall:.3} s");
    assert!(
        seconds > 0.0 && seconds <= wall,
        "reported {seconds} s, the test saw {wall} s"
    );
    // The publisher imported the image: it downloaded nothing and reports no time.
    let hosts = http.get_json("/api/hosts").await;
    assert_eq!(host(&hosts, &publisher)["provisions"], json!([]), "{hosts}");

    // /api/stats carries it per IDC and in the history the provision chart draws.
    let stats = wait_for(
        "the provision in the sampled history",
        Duration::from_secs(10),
        || {
            let http = http.clone();
            let id = id.clone();
            async move {
                let stats = http.get_json("/api/stats").await;
                let sampled = stats["history"]["provisions"]
                    .as_array()?
                    .iter()
                    .any(|p| p["id"] == id.as_str());
                sampled.then_some(stats)
            }
        },
    )
    .await;
    let find = |list: &Value| -> Value {
        list.as_array()
            .and_then(|a| a.iter().find(|p| p["id"] == id.as_str()))
            .cloned()
            .unwrap_or_else(|| panic!("{id} not in {list}"))
    };
    let idc_a = stats["idcs"]
        .as_array()
        .and_then(|a| a.iter().find(|i| i["idc"] == "A"))
        .expect("IDC A in /api/stats");
    for p in [
        find(&idc_a["provisions"]),
        find(&stats["history"]["provisions"]),
    ] {
        assert_eq!(p["peer"], peer.as_str(), "{p}");
        assert_eq!(p["idc"], "A", "{p}");
        assert_eq!(p["image"], "timed:1", "{p}");
        assert_eq!(p["seconds"].as_f64(), Some(seconds), "{p}");
        let (start, end) = (p["started_ms"].as_i64(), p["completed_ms"].as_i64());
        assert!(matches!((start, end), (Some(s), Some(e)) if s < e), "{p}");
    }
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_token_is_refused_once_it_was_used() {
    // As `bids rmc` without a configured password: the secret is a token printed at start.
    let env = start_with(vec![idc("A", 1, 0)], |cfg| cfg.auth.single_use = true).await;
    let mut http = env.http.clone();
    // A wrong guess neither logs in nor spends the token.
    assert_eq!(http.login("not the token").await.status, 401);
    let r = http.login(PASSWORD).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        http.get_json("/api/hosts").await.as_array().map(Vec::len),
        Some(1)
    );

    // A second login with it is refused, and says why; the session it opened lives on.
    let mut other = Http::new(env.rmc.local_addr());
    let r = other.login(PASSWORD).await;
    assert_eq!(r.status, 401, "{}", r.body);
    assert!(r.body.contains("already used"), "{}", r.body);
    assert!(r.header("set-cookie").is_none());
    assert_eq!(other.get("/api/hosts").await.status, 401);
    assert_eq!(http.get("/api/hosts").await.status, 200);

    // Logging out does not make it valid again.
    assert_eq!(http.post("/api/logout", json!({})).await.status, 200);
    assert_eq!(http.login(PASSWORD).await.status, 401);
    env.stop().await;
}
