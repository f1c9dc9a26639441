//! Helpers of the console's API tests: an in-process testnet with a console attached, a
//! minimal HTTP/1.1 client (one request per connection, so the server's real TCP path is
//! what is tested), and bounded polling.
#![allow(dead_code)]

use bids_rmc::{RmcConfig, RmcHandle};
use bids_testnet::cluster::{Cluster, ClusterSpec, IdcSpec};
use serde_json::Value;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const PASSWORD: &str = "correct horse battery staple";
pub const MIB: u64 = 1024 * 1024;
pub const CHUNK: u32 = 256 * 1024;

pub fn idc(name: &str, hosts: usize, bridgeheads: usize) -> IdcSpec {
    IdcSpec {
        name: name.into(),
        hosts,
        bridgeheads,
        wan_bps: 0,
        wan_delay: Duration::ZERO,
        lan_bps: 0,
    }
}

pub struct Env {
    pub cluster: Cluster,
    pub rmc: RmcHandle,
    pub http: Http,
}

/// Starts a cluster of `idcs` and a console on 127.0.0.1, port 0, connected to its GIS as
/// the cluster's admin.
pub async fn start(idcs: Vec<IdcSpec>) -> Env {
    start_with(idcs, |_| {}).await
}

/// Like [`start`], with the console's configuration adjusted by `tune` before it starts.
pub async fn start_with(idcs: Vec<IdcSpec>, tune: impl FnOnce(&mut RmcConfig)) -> Env {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
    let cluster = Cluster::start(ClusterSpec {
        idcs,
        policy: Default::default(),
        shaped: false,
    })
    .await
    .expect("starting the cluster");
    let link = bids_rmc::gis_link::connect(cluster.gis_addr.clone(), cluster.admin.clone())
        .await
        .expect("connecting to the GIS as the admin");
    let mut cfg = RmcConfig::new(cluster.admin.clone(), PASSWORD.into());
    cfg.listen = "127.0.0.1:0".parse().expect("address");
    cfg.sample_interval = Duration::from_millis(200);
    tune(&mut cfg);
    let rmc = bids_rmc::start(cfg, link)
        .await
        .expect("starting the console");
    let http = Http::new(rmc.local_addr());
    Env { cluster, rmc, http }
}

impl Env {
    pub async fn stop(self) {
        self.rmc.shutdown().await.expect("console stopped cleanly");
        self.cluster.shutdown().await;
    }
}

#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.body))
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A client that keeps the session cookie and CSRF token like the pages do.
#[derive(Clone)]
pub struct Http {
    addr: SocketAddr,
    pub cookie: Option<String>,
    pub csrf: Option<String>,
}

impl Http {
    pub fn new(addr: SocketAddr) -> Self {
        Http {
            addr,
            cookie: None,
            csrf: None,
        }
    }

    /// One request; `csrf` adds the stored token header.
    pub async fn raw(&self, method: &str, path: &str, body: Option<&Value>, csrf: bool) -> Reply {
        let mut s = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::net::TcpStream::connect(self.addr),
        )
        .await
        .expect("connect timeout")
        .expect("connect");
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
            self.addr
        );
        if !body.is_empty() {
            req.push_str("Content-Type: application/json\r\n");
        }
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
        if let Some(c) = &self.cookie {
            req.push_str(&format!("Cookie: {c}\r\n"));
        }
        if csrf {
            if let Some(t) = &self.csrf {
                req.push_str(&format!("X-CSRF-Token: {t}\r\n"));
            }
        }
        req.push_str("\r\n");
        req.push_str(&body);
        s.write_all(req.as_bytes()).await.expect("write");
        let mut buf = Vec::new();
        // Commands such as a bridgehead change take a few round trips; allow for them.
        tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut buf))
            .await
            .expect("response timeout")
            .expect("read");
        let text = String::from_utf8_lossy(&buf).to_string();
        let (head, body) = text.split_once("\r\n\r\n").expect("HTTP head");
        let mut lines = head.lines();
        let status: u16 = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|c| c.parse().ok())
            .expect("status line");
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        Reply {
            status,
            headers,
            body: body.to_string(),
        }
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.raw("GET", path, None, false).await
    }

    pub async fn post(&self, path: &str, body: Value) -> Reply {
        self.raw("POST", path, Some(&body), true).await
    }

    pub async fn put(&self, path: &str, body: Value) -> Reply {
        self.raw("PUT", path, Some(&body), true).await
    }

    /// Logs in and keeps the cookie and CSRF token.
    pub async fn login(&mut self, password: &str) -> Reply {
        let r = self
            .raw(
                "POST",
                "/api/login",
                Some(&serde_json::json!({"user": "admin", "password": password})),
                false,
            )
            .await;
        if r.status == 200 {
            let set = r.header("set-cookie").expect("login sets a cookie");
            self.cookie = set.split(';').next().map(str::to_string);
            self.csrf = r.json()["csrf_token"].as_str().map(str::to_string);
        }
        r
    }

    /// GET that must succeed, as JSON.
    pub async fn get_json(&self, path: &str) -> Value {
        let r = self.get(path).await;
        assert_eq!(r.status, 200, "GET {path}: {}", r.body);
        r.json()
    }
}

/// Polls `f` every 50 ms until it yields `Some`, panicking after `within` with `what`.
pub async fn wait_for<T, F, Fut>(what: &str, within: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The `/api/hosts` entry of `peer`.
pub fn host<'a>(hosts: &'a Value, peer: &str) -> &'a Value {
    hosts
        .as_array()
        .and_then(|a| a.iter().find(|h| h["peer"] == peer))
        .unwrap_or_else(|| panic!("{peer} not in /api/hosts: {hosts}"))
}
