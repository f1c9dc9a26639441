//! `bids demo`: the paper's experiment in one process. IDC A holds a random image; every
//! other IDC has one certified bridgehead and some hosts that all ask for it at once. The
//! run is repeated under BIDS and under Baseline on the same topology, and the provision
//! times and WAN bytes entering each IDC are reported.

use crate::cluster::{Cluster, ClusterSpec, IdcSpec};
use anyhow::{bail, Context, Result};
use bids_protocols::gis::{GisRequest, GisResponse, ImageQuery};
use bids_protocols::{Idc, ImageId, ImageRef, ObjectKind, Policy};
use rand::{RngCore, SeedableRng};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Bids,
    Baseline,
}

impl Mode {
    fn policy(self) -> Policy {
        match self {
            Mode::Bids => Policy::Bids,
            Mode::Baseline => Policy::Baseline,
        }
    }
}

#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Number of IDCs (the first one holds the image).
    pub idcs: usize,
    /// Ordinary hosts per receiving IDC (each also has one bridgehead).
    pub hosts: usize,
    pub size: u64,
    pub wan_mbit: f64,
    pub lan_mbit: f64,
    pub delay_ms: u64,
    pub chunk_size: u32,
    pub modes: Vec<Mode>,
    pub seed: u64,
    /// A sparse, compressible image (zero runs and text) instead of random bytes.
    pub sparse: bool,
    /// Distribute this file (e.g. a real VM disk image) instead of a generated one.
    pub image: Option<std::path::PathBuf>,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            idcs: 3,
            hosts: 4,
            size: 64 << 20,
            wan_mbit: 100.0,
            lan_mbit: 1000.0,
            delay_ms: 20,
            chunk_size: bids_protocols::WAN_CHUNK_SIZE,
            modes: vec![Mode::Bids, Mode::Baseline],
            seed: 1,
            sparse: false,
            image: None,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct IdcResult {
    pub idc: String,
    pub hosts: usize,
    pub provision_s_mean: f64,
    pub provision_s_max: f64,
    /// Chunk payload bytes that entered the IDC over the WAN, counted by its nodes.
    pub wan_in_bytes: u64,
    /// Bytes that crossed the IDC's emulated WAN link inbound (transport framing included).
    pub wan_in_bytes_link: u64,
    pub refusals: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct RunResult {
    pub mode: Mode,
    /// Bytes that left the origin IDC (A) over its WAN link.
    pub origin_wan_out_bytes: u64,
    pub idcs: Vec<IdcResult>,
    pub all_verified: bool,
    pub wall_s: f64,
    /// Largest disk usage (allocated blocks) of a receiving host's copy ÷ the source file's.
    pub disk_usage_ratio_max: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct DemoReport {
    pub image_bytes: u64,
    /// What the image costs to move: bytes of its non-zero chunks.
    pub payload_bytes: u64,
    pub wan_mbit: f64,
    pub lan_mbit: f64,
    pub delay_ms: u64,
    pub chunk_size: u32,
    /// S / B_wan: the least time a whole image needs through one IDC's WAN link.
    pub bound_s: f64,
    pub runs: Vec<RunResult>,
}

/// Writes a test image: random bytes, or (sparse) a mix of zero runs, text and random data.
pub fn make_image(path: &Path, size: u64, seed: u64, sparse: bool) -> Result<()> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
    );
    let mut left = size;
    let mut block = vec![0u8; 1 << 20];
    let mut n = 0u64;
    while left > 0 {
        let len = left.min(block.len() as u64) as usize;
        let b = &mut block[..len];
        if !sparse {
            rng.fill_bytes(b);
        } else {
            match n % 4 {
                0 | 1 => b.fill(0),
                2 => {
                    let text = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit; /usr/lib/x86_64-linux-gnu\n";
                    for (i, x) in b.iter_mut().enumerate() {
                        *x = text[(i + n as usize) % text.len()];
                    }
                }
                _ => {
                    rng.fill_bytes(&mut b[..len / 4]);
                    b[len / 4..].fill(0);
                }
            }
        }
        f.write_all(b)?;
        left -= len as u64;
        n += 1;
    }
    f.flush()?;
    Ok(())
}

fn sha256_file(path: &Path) -> Result<[u8; 32]> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().into())
}

fn idc_name(k: usize) -> String {
    let letters = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ";
    if k < letters.len() {
        (letters[k] as char).to_string()
    } else {
        format!("I{k}")
    }
}

fn spec(o: &DemoOptions, mode: Mode) -> ClusterSpec {
    let wan_bps = (o.wan_mbit * 1e6 / 8.0) as u64;
    let lan_bps = (o.lan_mbit * 1e6 / 8.0) as u64;
    let idcs = (0..o.idcs)
        .map(|k| IdcSpec {
            name: idc_name(k),
            // The source IDC: one holder and one bridgehead.
            hosts: if k == 0 { 1 } else { o.hosts },
            bridgeheads: 1,
            wan_bps,
            wan_delay: Duration::from_millis(o.delay_ms),
            lan_bps,
        })
        .collect();
    ClusterSpec {
        idcs,
        policy: mode.policy(),
        shaped: true,
    }
}

/// Waits until the GIS lists a holder of the image.
async fn wait_published(c: &Cluster, image: &ImageRef, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let req = GisRequest::Lookup {
            image: ImageQuery::Ref(image.clone()),
            idc: Some(Idc::new("A").map_err(anyhow::Error::msg)?),
        };
        let key = libp2p::identity::Keypair::generate_ed25519();
        if let Ok(GisResponse::HostList(l)) =
            bids_gis::client::request_once(key, c.gis_addr.clone(), req, Duration::from_secs(5))
                .await
        {
            if l.level0.iter().any(|e| e.complete) {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("the GIS did not list the source of {image} within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs one mode on a fresh cluster.
pub async fn run_mode(
    o: &DemoOptions,
    mode: Mode,
    image_file: &Path,
    log: &mut dyn FnMut(&str),
    hook: Option<&dyn DemoHook>,
) -> Result<RunResult> {
    let cluster = Cluster::start(spec(o, mode)).await?;
    let guard = match hook {
        Some(h) => match h.attach(&cluster).await {
            Ok(g) => Some(g),
            Err(e) => {
                cluster.shutdown().await;
                return Err(e);
            }
        },
        None => None,
    };
    let result = run_on(&cluster, o, mode, image_file, log).await;
    if let (Some(h), Ok(r)) = (hook, &result) {
        h.hold(&cluster, r).await;
    }
    drop(guard);
    cluster.shutdown().await;
    result
}

/// Lets the caller attach something to a run's cluster (the CLI attaches the console) and
/// keep the cluster up after the run (`bids demo --hold`). Only the last mode gets it.
pub trait DemoHook: Send + Sync {
    /// Called once the cluster is up, before the run; the guard lives until the cluster stops.
    fn attach<'a>(
        &'a self,
        c: &'a Cluster,
    ) -> futures::future::BoxFuture<'a, Result<Box<dyn std::any::Any + Send>>>;
    /// Called after a successful run, before the cluster stops.
    fn hold<'a>(&'a self, c: &'a Cluster, r: &'a RunResult) -> futures::future::BoxFuture<'a, ()>;
}

async fn run_on(
    c: &Cluster,
    o: &DemoOptions,
    mode: Mode,
    image_file: &Path,
    log: &mut dyn FnMut(&str),
) -> Result<RunResult> {
    let image = ImageRef::new("demo", "1").map_err(anyhow::Error::msg)?;
    // The holder is host 1 of IDC A (host 0 is A's bridgehead).
    let holder = c
        .idc_nodes("A")
        .into_iter()
        .find(|&i| !c.nodes[i].is_bridgehead())
        .context("IDC A has no holder")?;
    let h = c.nodes[holder].node().clone();
    let store = h.store().clone();
    let (file, img, cs) = (image_file.to_path_buf(), image.clone(), o.chunk_size);
    let m = tokio::task::spawn_blocking(move || {
        store.import(&file, &img, cs, None, ObjectKind::Image, &mut |_, _| {})
    })
    .await??;
    let id: ImageId = m.id();
    h.imported(id).await.map_err(anyhow::Error::msg)?;
    wait_published(c, &image, Duration::from_secs(20)).await?;
    // The generated image and the import left tens of MiB of dirty pages: write them out
    // now, or the first fsync of a fetching node (its new manifest) pays for them inside
    // the measured provision time (~90 ms for 64 MiB here), which no long-running
    // cluster would.
    tokio::task::spawn_blocking(|| {
        // SAFETY: sync(2) takes no arguments and cannot fail.
        unsafe { libc::sync() }
    })
    .await?;
    c.topology.reset_counters();
    log(&format!(
        "{mode:?}: {} hosts in {} IDCs request {image} at once",
        c.nodes.len() - 2,
        o.idcs - 1
    ));

    let started = Instant::now();
    let sampler = spawn_wan_sampler(c, o.idcs);
    let mut tasks = Vec::new();
    for (i, n) in c.nodes.iter().enumerate() {
        if n.idc == "A" {
            continue;
        }
        let node = n.node().clone();
        let q = ImageQuery::Ref(image.clone());
        tasks.push((i, tokio::spawn(async move { node.fetch_and_wait(q).await })));
    }
    let mut times: Vec<(usize, f64)> = Vec::new();
    let mut failures = Vec::new();
    for (i, t) in tasks {
        match tokio::time::timeout(Duration::from_secs(1800), t).await {
            Ok(Ok(Ok(secs))) => times.push((i, secs)),
            Ok(Ok(Err(e))) => failures.push(format!("node {i} ({}): {e}", c.nodes[i].idc)),
            Ok(Err(e)) => failures.push(format!("node {i}: task failed: {e}")),
            Err(_) => failures.push(format!("node {i}: no result within 30 minutes")),
        }
    }
    let wall_s = started.elapsed().as_secs_f64();
    sampler.abort();
    if !failures.is_empty() {
        bail!("{mode:?} run failed: {}", failures.join("; "));
    }
    // Every copy must be bit-exact: hash each node's image file against the source.
    let want = sha256_file(image_file)?;
    let mut all_verified = true;
    let src_blocks = allocated(image_file)?.max(1);
    let mut disk_usage_ratio_max: f64 = 0.0;
    for (i, _) in &times {
        let path = c.nodes[*i].node().store().image_path(&id);
        if sha256_file(&path)? != want {
            all_verified = false;
        }
        disk_usage_ratio_max =
            disk_usage_ratio_max.max(allocated(&path)? as f64 / src_blocks as f64);
    }
    let mut idcs = Vec::new();
    for k in 1..o.idcs {
        let name = idc_name(k);
        let members = c.idc_nodes(&name);
        let t: Vec<f64> = times
            .iter()
            .filter(|(i, _)| members.contains(i))
            .map(|(_, s)| *s)
            .collect();
        let mut wan_in = 0;
        let mut refusals = 0;
        for &i in &members {
            let st = c.nodes[i]
                .node()
                .status()
                .await
                .map_err(anyhow::Error::msg)?;
            wan_in += st.total.wan_recv_bytes;
            refusals += st.refusals;
        }
        idcs.push(IdcResult {
            idc: name.clone(),
            hosts: members.len(),
            provision_s_mean: t.iter().sum::<f64>() / t.len().max(1) as f64,
            provision_s_max: t.iter().cloned().fold(0.0, f64::max),
            wan_in_bytes: wan_in,
            wan_in_bytes_link: c.topology.wan_in_bytes(&name),
            refusals,
        });
    }
    let origin_wan_out_bytes = c.topology.wan_out_bytes("A");
    Ok(RunResult {
        mode,
        origin_wan_out_bytes,
        idcs,
        all_verified,
        wall_s,
        disk_usage_ratio_max,
    })
}

/// Logs (debug) the bytes each IDC's WAN link carried in and out every 250 ms, to see how
/// well a run fills the links: `RUST_LOG=bids_testnet=debug bids demo`.
fn spawn_wan_sampler(c: &Cluster, idcs: usize) -> tokio::task::JoinHandle<()> {
    let topology = c.topology.clone();
    let names: Vec<String> = (0..idcs).map(idc_name).collect();
    tokio::spawn(async move {
        let started = Instant::now();
        let mut last: Vec<(u64, u64)> = vec![(0, 0); names.len()];
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tick.tick().await;
            let mut line = format!("t={:5.2}s", started.elapsed().as_secs_f64());
            for (k, name) in names.iter().enumerate() {
                let now = (topology.wan_in_bytes(name), topology.wan_out_bytes(name));
                line += &format!(
                    " {name}: in {:5.1} out {:5.1} MB/s",
                    (now.0 - last[k].0.min(now.0)) as f64 * 4.0 / 1e6,
                    (now.1 - last[k].1.min(now.1)) as f64 * 4.0 / 1e6
                );
                last[k] = now;
            }
            tracing::debug!("{line}");
        }
    })
}

/// Runs the whole demo.
pub async fn run(o: &DemoOptions, log: &mut dyn FnMut(&str)) -> Result<DemoReport> {
    run_with(o, log, None).await
}

/// [`run`] with a hook on the last mode's cluster.
pub async fn run_with(
    o: &DemoOptions,
    log: &mut dyn FnMut(&str),
    hook: Option<&dyn DemoHook>,
) -> Result<DemoReport> {
    if o.idcs < 2 {
        bail!("--idcs must be at least 2 (one holds the image)");
    }
    if o.hosts == 0 {
        bail!("--hosts must be at least 1");
    }
    if o.wan_mbit <= 0.0 || o.lan_mbit <= 0.0 {
        bail!("--wan-mbit and --lan-mbit must be positive");
    }
    let dir = tempfile::Builder::new().prefix("bids-demo-").tempdir()?;
    let (file, size) = match &o.image {
        Some(f) => {
            let len = std::fs::metadata(f)
                .with_context(|| format!("reading {}", f.display()))?
                .len();
            (f.clone(), len)
        }
        None => {
            let file = dir.path().join("image.raw");
            make_image(&file, o.size, o.seed, o.sparse)?;
            (file, o.size)
        }
    };
    let payload_bytes = if o.sparse || o.image.is_some() {
        // Non-zero chunks only.
        let m = bids_protocols::manifest::is_zero;
        let mut f = std::fs::File::open(&file)?;
        let mut buf = vec![0u8; o.chunk_size as usize];
        let mut n = 0u64;
        loop {
            let r = read_full(&mut f, &mut buf)?;
            if r == 0 {
                break;
            }
            if !m(&buf[..r]) {
                n += r as u64;
            }
        }
        n
    } else {
        o.size
    };
    let mut runs = Vec::new();
    for (k, &mode) in o.modes.iter().enumerate() {
        let last = k + 1 == o.modes.len();
        runs.push(run_mode(o, mode, &file, log, hook.filter(|_| last)).await?);
    }
    Ok(DemoReport {
        image_bytes: size,
        payload_bytes,
        wan_mbit: o.wan_mbit,
        lan_mbit: o.lan_mbit,
        delay_ms: o.delay_ms,
        chunk_size: o.chunk_size,
        bound_s: size as f64 / (o.wan_mbit * 1e6 / 8.0),
        runs,
    })
}

/// Bytes a file really occupies on disk (holes excluded).
fn allocated(path: &Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .blocks()
        * 512)
}

fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        let r = f.read(&mut buf[n..])?;
        if r == 0 {
            break;
        }
        n += r;
    }
    Ok(n)
}

/// The human-readable table.
pub fn render(r: &DemoReport) -> String {
    let mut s = String::new();
    let mib = r.image_bytes as f64 / (1 << 20) as f64;
    s += &format!(
        "image {mib:.1} MiB in chunks of {} KiB; WAN {} Mbit/s per IDC uplink, {} ms one-way; LAN {} Mbit/s per host\n",
        r.chunk_size / 1024,
        r.wan_mbit,
        r.delay_ms,
        r.lan_mbit
    );
    s += &format!(
        "bound S/B_wan = {:.2} s (the whole image through one WAN uplink)\n\n",
        r.bound_s
    );
    for run in &r.runs {
        s += &format!(
            "== {:?} ({}; wall {:.1} s) ==\n",
            run.mode,
            if run.all_verified {
                "every copy verified bit-exact"
            } else {
                "VERIFICATION FAILED"
            },
            run.wall_s
        );
        s += "IDC  hosts  provision mean  provision max  max/bound  WAN in/size (nodes)  WAN in/size (link)  refusals\n";
        for i in &run.idcs {
            s += &format!(
                "{:<4} {:>5}  {:>12.2} s  {:>11.2} s  {:>9.2}  {:>19.3}  {:>18.3}  {:>8}\n",
                i.idc,
                i.hosts,
                i.provision_s_mean,
                i.provision_s_max,
                i.provision_s_max / r.bound_s,
                i.wan_in_bytes as f64 / r.image_bytes as f64,
                i.wan_in_bytes_link as f64 / r.image_bytes as f64,
                i.refusals
            );
        }
        s += &format!(
            "origin IDC A sent {:.2} x the image over its WAN uplink; largest copy uses {:.3} x the source's disk space\n\n",
            run.origin_wan_out_bytes as f64 / r.image_bytes as f64,
            run.disk_usage_ratio_max
        );
    }
    let bids = r.runs.iter().find(|x| x.mode == Mode::Bids);
    let base = r.runs.iter().find(|x| x.mode == Mode::Baseline);
    if let (Some(b), Some(z)) = (bids, base) {
        s += "Baseline/BIDS provision time (max per IDC): ";
        let parts: Vec<String> = b
            .idcs
            .iter()
            .zip(&z.idcs)
            .map(|(x, y)| {
                format!(
                    "{} {:.2}x",
                    x.idc,
                    y.provision_s_max / x.provision_s_max.max(1e-9)
                )
            })
            .collect();
        s += &parts.join(", ");
        s += "\n";
        let wb: u64 = b.idcs.iter().map(|i| i.wan_in_bytes).sum();
        let wz: u64 = z.idcs.iter().map(|i| i.wan_in_bytes).sum();
        s += &format!(
            "WAN bytes into receiving IDCs: BIDS {:.2} x image, Baseline {:.2} x image\n",
            wb as f64 / r.image_bytes as f64,
            wz as f64 / r.image_bytes as f64
        );
    }
    s
}

/// The JSON document of `bids demo --json`.
pub fn to_json(r: &DemoReport) -> serde_json::Value {
    let mut v = serde_json::to_value(r).unwrap_or(serde_json::Value::Null);
    let bids = r.runs.iter().find(|x| x.mode == Mode::Bids);
    let base = r.runs.iter().find(|x| x.mode == Mode::Baseline);
    if let (Some(b), Some(z), Some(obj)) = (bids, base, v.as_object_mut()) {
        let mb = b.idcs.iter().map(|i| i.provision_s_max).fold(0.0, f64::max);
        let mz = z.idcs.iter().map(|i| i.provision_s_max).fold(0.0, f64::max);
        obj.insert("speedup".into(), serde_json::json!(mz / mb.max(1e-9)));
    }
    v
}
