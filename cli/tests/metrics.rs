//! `--metrics` on the real `bids gis` binary: the listener answers, the scrape parses and
//! counts a lookup in its latency histogram; a taken address is refused with a clear error.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn bids() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_bids"));
    c.env("RUST_LOG", "warn");
    c
}

fn p(d: &std::path::Path, f: &str) -> String {
    d.join(f).display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gis_serves_metrics_and_counts_lookups() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let admin = bids()
        .args(["key", "gen", "--out", &p(d, "admin.key")])
        .output()
        .unwrap();
    let admin = String::from_utf8(admin.stdout).unwrap().trim().to_string();
    assert!(bids()
        .args(["key", "gen", "--out", &p(d, "gis.key")])
        .output()
        .unwrap()
        .status
        .success());
    let gis_args = |metrics: &str, data: &str| {
        vec![
            "gis".to_string(),
            "--key".into(),
            p(d, "gis.key"),
            "--listen".into(),
            "/ip4/127.0.0.1/tcp/0".into(),
            "--data".into(),
            p(d, data),
            "--admin-peer".into(),
            admin.clone(),
            "--metrics".into(),
            metrics.into(),
        ]
    };
    let mut child = bids()
        .args(gis_args("127.0.0.1:0", "gis-data"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let _gis = Daemon(child);
    let mut addr_line = String::new();
    BufReader::new(stdout).read_line(&mut addr_line).unwrap();
    let gis_addr = addr_line.trim().to_string();
    assert!(gis_addr.contains("/p2p/"), "{gis_addr}");
    let metrics: SocketAddr = BufReader::new(stderr)
        .lines()
        .map_while(Result::ok)
        .find_map(|l| {
            l.strip_prefix("metrics: http://")
                .and_then(|r| r.split('/').next())
                .map(|a| a.parse().unwrap())
        })
        .expect("the GIS announces its metrics address");

    assert_eq!(bids_metrics::get(metrics, "/healthz").await.unwrap().0, 200);
    assert_eq!(bids_metrics::get(metrics, "/readyz").await.unwrap().0, 200);

    // A lookup of an unknown image: answered with an error, timed all the same.
    let o = bids()
        .args(["lookup", "nope:1", "--gis", &gis_addr, "--idc", "A"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let (code, body) = bids_metrics::get(metrics, "/metrics").await.unwrap();
    assert_eq!(code, 200);
    let s = bids_metrics::text::parse(&body).unwrap();
    assert_eq!(s.value("bids_gis_index_open", &[]), Some(1.0));
    // A lone GIS has no Raft group to report.
    assert_eq!(s.value("bids_gis_raft_term", &[]), None);
    assert_eq!(
        s.value(
            "bids_gis_requests_total",
            &[("request", "lookup"), ("outcome", "error")]
        ),
        Some(1.0)
    );
    assert_eq!(s.value("bids_gis_lookup_seconds_count", &[]), Some(1.0));
    assert!(s.sum("libp2p_swarm_connections_established_total", &[]) >= 1.0);

    // A second GIS on the same metrics address stops at once, naming it.
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::task::spawn_blocking({
            let args = gis_args(&metrics.to_string(), "gis-data-2");
            move || bids().args(args).output().unwrap()
        }),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("cannot listen for metrics on {metrics}")),
        "{err}"
    );
    // And a malformed one is refused with an example.
    let out = bids()
        .args(gis_args("localhost", "gis-data-3"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("127.0.0.1:9100"));
}
