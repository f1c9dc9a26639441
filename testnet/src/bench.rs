//! Whole-system benchmarks behind `bids bench`: chunk transfer on bare loopback set against
//! references measured in the same run (raw TCP; a bare libp2p request-response exchange on
//! the node's own transport; that exchange with each blob checked against its SHA-256, the
//! least work a verifying fetch does), plus the storage work of that transfer without any
//! network (what the disk and the hashing cost on this machine), and the peak memory of a
//! fetching node run as its own process. Argument parsing and printing of the figures are
//! left to the CLI.

use crate::cluster::{Cluster, ClusterSpec, IdcSpec};
use crate::demo::make_image;
use anyhow::{bail, Context, Result};
use bids_node::control::{self, ControlReply, ControlRequest};
use bids_node::nodecore::MAX_WRITING;
use bids_node::scheduler::SchedulerConfig;
use bids_node::store::Store;
use bids_node::transport::{self, TransportOptions};
use bids_protocols::gis::{GisRequest, GisResponse, ImageQuery};
use bids_protocols::{Idc, ImageId, ImageRef, ObjectKind, Policy};
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, StreamExt};
use libp2p::request_response::{self as rr, ProtocolSupport};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, StreamProtocol, Swarm};
use rand::{RngCore, SeedableRng};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// The unit of every transfer: one TCP write, one request-response blob, one BIDS chunk.
pub const BLOB: usize = 1 << 20;
/// The memory goal of a fetching node, whatever the image size.
pub const RSS_GOAL_BYTES: u64 = 100 << 20;
/// No single measurement may take longer than this (a hung transfer fails the bench).
const STEP_TIMEOUT: Duration = Duration::from_secs(900);
/// Protocol id of the bare request-response reference.
const BLOB_PROTOCOL: StreamProtocol = StreamProtocol::new("/bids-bench/blob/1");

/// What `bids bench loopback` measures.
#[derive(Clone, Debug)]
pub struct LoopbackOptions {
    /// Bytes moved by each transfer (the image size for BIDS).
    pub size: u64,
    /// Requests in flight in the libp2p reference. BIDS keeps `max_inflight_lan` requests in
    /// flight to one LAN peer, so that is the default: both pipelines are equally deep.
    pub depth: usize,
    /// Seed of the random (incompressible) image.
    pub seed: u64,
}

impl Default for LoopbackOptions {
    fn default() -> Self {
        LoopbackOptions {
            size: 1 << 30,
            depth: SchedulerConfig::default().max_inflight_lan,
            seed: 1,
        }
    }
}

/// The throughputs of one run, their ratios and their CPU times.
#[derive(Clone, Debug, Serialize)]
pub struct LoopbackReport {
    pub size_bytes: u64,
    pub depth: usize,
    pub raw_tcp_bytes_per_s: f64,
    pub libp2p_rr_bytes_per_s: f64,
    pub bids_bytes_per_s: f64,
    /// BIDS / the bare libp2p exchange (the design's bar: ≥ 0.7).
    pub bids_vs_libp2p: f64,
    /// BIDS / raw TCP.
    pub bids_vs_tcp: f64,
    /// (b'): the bare exchange with every blob checked against its SHA-256 on the blocking
    /// pool, as a node checks every chunk. Bytes/s.
    pub libp2p_rr_verified_bytes_per_s: f64,
    /// (b') / (b): what checking each blob's hash alone leaves of the bare exchange. A fetch
    /// does that check and more (it also reads and writes every chunk), so on the same machine
    /// `bids_vs_libp2p` stays below about this.
    pub verified_vs_libp2p: f64,
    /// (d): the storage work of the fetch alone, in one thread and without any network: each
    /// chunk read from the seeding store, hashed, and written into a fresh store, as the
    /// serving and the fetching node do. Bytes/s.
    pub store_bytes_per_s: f64,
    /// CPU time (user + system, all threads of this process) each transfer used. On a shared
    /// machine this is steadier than the throughputs, and it says where the cost is.
    pub raw_tcp_cpu_s: f64,
    pub libp2p_rr_cpu_s: f64,
    pub libp2p_rr_verified_cpu_s: f64,
    pub bids_cpu_s: f64,
    pub store_cpu_s: f64,
}

/// Progress lines for the operator.
pub type Log<'a> = &'a mut (dyn FnMut(&str) + Send);

/// Runs the loopback measurements back to back. The BIDS cluster and its image are
/// set up (and flushed to disk) first, so that no set-up work overlaps a measurement.
pub async fn loopback(o: &LoopbackOptions, log: Log<'_>) -> Result<LoopbackReport> {
    if o.size == 0 {
        bail!("the transfer size must be positive");
    }
    if o.depth == 0 {
        bail!("the pipelining depth must be at least 1");
    }
    log(&format!(
        "preparing a {} random image on a GIS and two nodes of one IDC",
        human_bytes(o.size)
    ));
    let setup = BidsSetup::start(o.size, o.seed).await?;
    let result = measure_all(o, &setup, log).await;
    setup.shutdown().await;
    result
}

async fn measure_all(
    o: &LoopbackOptions,
    setup: &BidsSetup,
    log: Log<'_>,
) -> Result<LoopbackReport> {
    log("(a) raw TCP");
    let (tcp, tcp_cpu) = measured(raw_tcp(o.size), "the raw TCP transfer").await?;
    log(&format!("    {}", human_rate(tcp)));
    log(&format!(
        "(b) libp2p request-response, tcp+noise+yamux, {} in flight",
        o.depth
    ));
    let (rr, rr_cpu) = measured(libp2p_rr(o.size, o.depth, false), "the libp2p exchange").await?;
    log(&format!("    {}", human_rate(rr)));
    log("(b') the same, each blob checked against its SHA-256 as a node checks a chunk");
    let (verified, verified_cpu) = measured(
        libp2p_rr(o.size, o.depth, true),
        "the verifying libp2p exchange",
    )
    .await?;
    log(&format!("    {}", human_rate(verified)));
    log("(c) BIDS fetch, hashing and disk included");
    let (bids, bids_cpu) = measured(setup.fetch(), "the BIDS fetch").await?;
    log(&format!("    {}; checking the copy", human_rate(bids)));
    setup.check_copy().await?;
    log("(d) the same storage work without the network: read, SHA-256, write");
    let (store, store_cpu) = measured(setup.store_only(), "the storage pass").await?;
    log(&format!("    {}", human_rate(store)));
    Ok(LoopbackReport {
        size_bytes: o.size,
        depth: o.depth,
        raw_tcp_bytes_per_s: tcp,
        libp2p_rr_bytes_per_s: rr,
        bids_bytes_per_s: bids,
        bids_vs_libp2p: bids / rr,
        bids_vs_tcp: bids / tcp,
        libp2p_rr_verified_bytes_per_s: verified,
        verified_vs_libp2p: verified / rr,
        raw_tcp_cpu_s: tcp_cpu,
        libp2p_rr_cpu_s: rr_cpu,
        libp2p_rr_verified_cpu_s: verified_cpu,
        bids_cpu_s: bids_cpu,
        store_bytes_per_s: store,
        store_cpu_s: store_cpu,
    })
}

/// CPU time this process has used so far, in seconds.
fn process_cpu_s() -> Result<f64> {
    // SAFETY: getrusage writes one rusage struct, which we own, and reads nothing else.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_SELF, &mut ru) != 0 {
            return Err(std::io::Error::last_os_error()).context("getrusage");
        }
        ru
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok(tv(ru.ru_utime) + tv(ru.ru_stime))
}

/// Runs one timed transfer (see [`within`]); returns what it reports (bytes/s) and the CPU
/// time this process spent meanwhile.
async fn measured(
    f: impl std::future::Future<Output = Result<f64>>,
    what: &str,
) -> Result<(f64, f64)> {
    let cpu = process_cpu_s()?;
    let rate = within(f, what).await?;
    Ok((rate, process_cpu_s()? - cpu))
}

async fn within<T>(f: impl std::future::Future<Output = Result<T>>, what: &str) -> Result<T> {
    tokio::time::timeout(STEP_TIMEOUT, f)
        .await
        .with_context(|| format!("{what} did not finish within {STEP_TIMEOUT:?}"))?
}

/// A random block of `BLOB` bytes: what the references send.
fn random_blob(seed: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOB];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut b);
    b
}

// ------------------------------------------------------------------------- (a) raw TCP

/// One tokio `TcpStream` on 127.0.0.1 sends `bytes` in `BLOB`-sized writes to a reader in
/// another task. Returns bytes/s, from the first write to the reader holding the last byte.
pub async fn raw_tcp(bytes: u64) -> Result<f64> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding a loopback TCP listener")?;
    let addr = listener.local_addr()?;
    let reader = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.context("accepting")?;
        let mut buf = vec![0u8; BLOB];
        let mut got = 0u64;
        while got < bytes {
            let n = s.read(&mut buf).await.context("reading")?;
            if n == 0 {
                bail!("the writer closed after {got} of {bytes} bytes");
            }
            got += n as u64;
        }
        Ok::<Instant, anyhow::Error>(Instant::now())
    });
    let mut w = tokio::net::TcpStream::connect(addr)
        .await
        .context("connecting on loopback")?;
    let block = random_blob(7);
    let start = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(BLOB as u64) as usize;
        w.write_all(&block[..n]).await.context("writing")?;
        left -= n as u64;
    }
    w.flush().await?;
    let end = reader.await.context("reader task")??;
    Ok(rate(bytes, end.duration_since(start)))
}

fn rate(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64().max(1e-9)
}

// ------------------------------------------------------------ (b) bare request-response

/// The least a blob protocol can be: the request is a 4-byte index, the response 4 bytes of
/// length then the bytes. No CBOR, no hashing, no disk.
#[derive(Clone)]
struct BlobCodec;

async fn read_len<T: AsyncRead + Unpin + Send>(io: &mut T) -> std::io::Result<usize> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    Ok(u32::from_be_bytes(len) as usize)
}

impl rr::Codec for BlobCodec {
    type Protocol = StreamProtocol;
    type Request = u32;
    /// Shared on the server (every response is the same blob, never copied), owned on the
    /// client.
    type Response = Arc<Vec<u8>>;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> std::io::Result<u32>
    where
        T: AsyncRead + Unpin + Send,
    {
        let mut b = [0u8; 4];
        io.read_exact(&mut b).await?;
        Ok(u32::from_be_bytes(b))
    }

    async fn read_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> std::io::Result<Arc<Vec<u8>>>
    where
        T: AsyncRead + Unpin + Send,
    {
        let len = read_len(io).await?;
        if len > BLOB {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("a {len}-byte blob is larger than {BLOB}"),
            ));
        }
        let mut buf = vec![0u8; len];
        io.read_exact(&mut buf).await?;
        Ok(Arc::new(buf))
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: u32,
    ) -> std::io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        io.write_all(&req.to_be_bytes()).await?;
        io.flush().await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Arc<Vec<u8>>,
    ) -> std::io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        io.write_all(&(res.len() as u32).to_be_bytes()).await?;
        io.write_all(&res).await?;
        io.flush().await
    }
}

type BlobBehaviour = rr::Behaviour<BlobCodec>;

/// A swarm on the node's own transport (`transport::build` with default options: tcp with
/// nodelay, noise, yamux) with nothing but the blob protocol.
fn blob_swarm(depth: usize) -> Result<Swarm<BlobBehaviour>> {
    let key = libp2p::identity::Keypair::generate_ed25519();
    let swarm = libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_other_transport(|k| {
            transport::build(k, TransportOptions::default())
                .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
        })
        .context("building the transport")?
        .with_behaviour(|_| {
            rr::Behaviour::with_codec(
                BlobCodec,
                [(BLOB_PROTOCOL, ProtocolSupport::Full)],
                rr::Config::default()
                    .with_request_timeout(Duration::from_secs(60))
                    .with_max_concurrent_streams(depth.max(1) * 4),
            )
        })
        .map_err(|e| anyhow::anyhow!("building the behaviour: {e}"))?
        // Negotiated as the nodes do, so the reference pays no round trip they do not.
        .with_swarm_config(|c| {
            c.with_idle_connection_timeout(Duration::from_secs(60))
                .with_substream_upgrade_protocol_override(bids_protocols::STREAM_NEGOTIATION)
        })
        .build();
    Ok(swarm)
}

/// One client requests `BLOB`-sized blobs, `depth` in flight, from one server that answers
/// from memory, until `bytes` have arrived. Client and server run in tasks of their own, as
/// two BIDS nodes do. With `verify`, the client checks each blob against its SHA-256 on the
/// blocking pool, at most [`MAX_WRITING`] at once, as a node checks chunks, and fails on a
/// mismatch. Returns bytes/s, from the first request to the last response (and check).
pub async fn libp2p_rr(bytes: u64, depth: usize, verify: bool) -> Result<f64> {
    let mut server = blob_swarm(depth)?;
    server.listen_on("/ip4/127.0.0.1/tcp/0".parse()?)?;
    let addr = loop {
        match tokio::time::timeout(Duration::from_secs(10), server.select_next_some()).await {
            Ok(SwarmEvent::NewListenAddr { address, .. }) => break address,
            Ok(_) => {}
            Err(_) => bail!("the blob server did not start listening within 10 s"),
        }
    };
    let server_peer = *server.local_peer_id();
    let blob = Arc::new(random_blob(11));
    let digest = verify.then(|| bids_protocols::manifest::sha256(&blob));
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server_task = tokio::spawn(async move {
        loop {
            tokio::select! {
                ev = server.select_next_some() => {
                    if let SwarmEvent::Behaviour(rr::Event::Message {
                        message: rr::Message::Request { channel, .. },
                        ..
                    }) = ev
                    {
                        let _ = server.behaviour_mut().send_response(channel, blob.clone());
                    }
                }
                _ = &mut stop_rx => return,
            }
        }
    });
    let client = tokio::spawn(run_blob_client(
        addr.with_p2p(server_peer).unwrap_or_else(|a| a),
        bytes,
        depth,
        digest,
    ));
    let result = client.await.context("blob client task");
    let _ = stop_tx.send(());
    let _ = server_task.await;
    result?
}

async fn run_blob_client(
    server: Multiaddr,
    bytes: u64,
    depth: usize,
    digest: Option<[u8; 32]>,
) -> Result<f64> {
    let mut swarm = blob_swarm(depth)?;
    swarm
        .dial(server.clone())
        .context("dialling the blob server")?;
    let peer = loop {
        match tokio::time::timeout(Duration::from_secs(10), swarm.select_next_some()).await {
            Ok(SwarmEvent::ConnectionEstablished { peer_id, .. }) => break peer_id,
            Ok(SwarmEvent::OutgoingConnectionError { error, .. }) => {
                bail!("cannot connect to the blob server {server}: {error}")
            }
            Ok(_) => {}
            Err(_) => bail!("no connection to the blob server within 10 s"),
        }
    };
    let wanted = bytes.div_ceil(BLOB as u64);
    let start = Instant::now();
    let mut sent = 0u64;
    let mut done = 0u64;
    let mut got = 0u64;
    let mut checks = tokio::task::JoinSet::new();
    while sent < wanted.min(depth as u64) {
        swarm.behaviour_mut().send_request(&peer, sent as u32);
        sent += 1;
    }
    while done < wanted {
        match swarm.select_next_some().await {
            SwarmEvent::Behaviour(rr::Event::Message {
                message: rr::Message::Response { response, .. },
                ..
            }) => {
                got += response.len() as u64;
                done += 1;
                if let Some(want) = digest {
                    if checks.len() >= MAX_WRITING {
                        blob_checked(checks.join_next().await)?;
                    }
                    checks.spawn_blocking(move || {
                        bids_protocols::manifest::sha256(&response) == want
                    });
                }
                if sent < wanted {
                    swarm.behaviour_mut().send_request(&peer, sent as u32);
                    sent += 1;
                }
            }
            SwarmEvent::Behaviour(rr::Event::OutboundFailure { error, .. }) => {
                bail!("a blob request failed: {error}")
            }
            SwarmEvent::ConnectionClosed { cause, .. } => {
                bail!("the connection to the blob server closed: {cause:?}")
            }
            _ => {}
        }
    }
    while !checks.is_empty() {
        blob_checked(checks.join_next().await)?;
    }
    Ok(rate(got, start.elapsed()))
}

/// The outcome of one blob's SHA-256 check in the verifying reference.
fn blob_checked(r: Option<Result<bool, tokio::task::JoinError>>) -> Result<()> {
    match r {
        Some(Ok(true)) | None => Ok(()),
        Some(Ok(false)) => bail!("a blob did not match its SHA-256"),
        Some(Err(e)) => bail!("a blob check failed: {e}"),
    }
}

// ------------------------------------------------------------------------------ (c) BIDS

/// A GIS and two hosts of IDC A on bare loopback; host 0 holds a random image.
struct BidsSetup {
    cluster: Cluster,
    image: ImageRef,
    id: ImageId,
    source: PathBuf,
    dir: tempfile::TempDir,
}

impl BidsSetup {
    async fn start(size: u64, seed: u64) -> Result<BidsSetup> {
        let dir = tempfile::Builder::new().prefix("bids-bench-").tempdir()?;
        let source = dir.path().join("image.raw");
        let (p, s) = (source.clone(), size);
        tokio::task::spawn_blocking(move || make_image(&p, s, seed, false))
            .await
            .context("image task")??;
        let cluster = Cluster::start(one_idc(2)).await?;
        let image = ImageRef::new("bench", "1").map_err(anyhow::Error::msg)?;
        let id = seed_image(&cluster, 0, &source, &image).await?;
        wait_listed(&cluster, &image, Duration::from_secs(20)).await?;
        Ok(BidsSetup {
            cluster,
            image,
            id,
            source,
            dir,
        })
    }

    /// Host 1 fetches the image from host 0; bytes/s from the request to the verified
    /// completion (GIS lookup, transfer, SHA-256 of every chunk and the writes included).
    async fn fetch(&self) -> Result<f64> {
        let node = self.cluster.nodes[1].node().clone();
        let size = self.cluster.nodes[0]
            .node()
            .store()
            .manifest(&self.id)
            .context("the seeding node lost its manifest")?
            .size;
        let start = Instant::now();
        node.fetch_and_wait(ImageQuery::Ref(self.image.clone()))
            .await
            .map_err(|e| anyhow::anyhow!("fetching {}: {e}", self.image))?;
        Ok(rate(size, start.elapsed()))
    }

    /// The fetch's storage work on its own, in one thread: every chunk read from the seeding
    /// node's store (as it serves), checked against its SHA-256 and written into a fresh
    /// store with the nodes' options (as the fetching node stores it). Bytes/s, up to the
    /// last write, as the fetch is timed up to the last verified chunk; the fresh store is
    /// removed afterwards.
    async fn store_only(&self) -> Result<f64> {
        let src = self.cluster.nodes[0].node().store().clone();
        let dir = self.dir.path().join("store-only");
        let id = self.id;
        tokio::task::spawn_blocking(move || -> Result<f64> {
            let m = src
                .manifest(&id)
                .context("the seeding node lost its manifest")?;
            let dst = Store::open(&dir)?;
            dst.add_manifest(&m)?;
            let start = Instant::now();
            for idx in 0..m.chunk_count() {
                if m.chunks[idx as usize].zero {
                    continue;
                }
                // `write_chunk` checks the SHA-256 before it writes, as the fetching node does.
                dst.write_chunk(&id, idx, &src.read_chunk(&id, idx)?)?;
            }
            let took = start.elapsed();
            drop(dst);
            std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
            Ok(rate(m.size, took))
        })
        .await
        .context("storage task")?
    }

    /// After the timing: the fetched copy must be the source, bit for bit.
    async fn check_copy(&self) -> Result<()> {
        let node = self.cluster.nodes[1].node();
        let (a, b) = (self.source.clone(), node.store().image_path(&self.id));
        let same = tokio::task::spawn_blocking(move || -> Result<bool> {
            Ok(sha256_file(&a)? == sha256_file(&b)?)
        })
        .await
        .context("hash task")??;
        if !same {
            bail!("the fetched image differs from the source");
        }
        Ok(())
    }

    async fn shutdown(self) {
        self.cluster.shutdown().await;
    }
}

fn one_idc(hosts: usize) -> ClusterSpec {
    ClusterSpec {
        idcs: vec![IdcSpec {
            name: "A".into(),
            hosts,
            bridgeheads: 0,
            wan_bps: 0,
            wan_delay: Duration::ZERO,
            lan_bps: 0,
        }],
        policy: Policy::Bids,
        shaped: false,
    }
}

/// Imports `file` into node `i` as `image`, publishes it, and flushes the copy to disk so
/// that no writeback of the set-up competes with the measurement.
async fn seed_image(c: &Cluster, i: usize, file: &Path, image: &ImageRef) -> Result<ImageId> {
    let h = c.nodes[i].node().clone();
    let store = h.store().clone();
    let (f, img) = (file.to_path_buf(), image.clone());
    let id = tokio::task::spawn_blocking(move || -> Result<ImageId> {
        let m = store.import(
            &f,
            &img,
            BLOB as u32,
            None,
            ObjectKind::Image,
            &mut |_, _| {},
        )?;
        let id = m.id();
        std::fs::File::open(store.image_path(&id))?.sync_all()?;
        std::fs::File::open(&f)?.sync_all()?;
        Ok(id)
    })
    .await
    .context("import task")??;
    h.imported(id).await.map_err(anyhow::Error::msg)?;
    Ok(id)
}

/// Waits until the GIS lists a complete holder of `image` in IDC A.
async fn wait_listed(c: &Cluster, image: &ImageRef, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    // One identity for every attempt: a stranger asking, as a new host of IDC A would.
    let key = libp2p::identity::Keypair::generate_ed25519();
    loop {
        let req = GisRequest::Lookup {
            image: ImageQuery::Ref(image.clone()),
            idc: Some(Idc::new("A").map_err(anyhow::Error::msg)?),
        };
        let answer = bids_gis::client::request_once(
            key.clone(),
            c.gis_addr.clone(),
            req,
            Duration::from_secs(5),
        )
        .await;
        if let Ok(GisResponse::HostList(l)) = answer {
            if l.level0.iter().any(|e| e.complete) {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("the GIS did not list the holder of {image} within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn sha256_file(path: &Path) -> Result<[u8; 32]> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; BLOB];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().into())
}

// ------------------------------------------------------------------------------ memory

/// What `bids bench rss` measures.
#[derive(Clone, Debug)]
pub struct RssOptions {
    /// One fetch (by a fresh process) per size.
    pub sizes: Vec<u64>,
    /// The `bids` executable: the fetching node runs as `bids node …`.
    pub program: PathBuf,
    pub seed: u64,
}

/// The peak memory of one fetching process.
#[derive(Clone, Debug, Serialize)]
pub struct RssSample {
    pub size_bytes: u64,
    /// `VmHWM` of the node process after the fetch completed (its peak resident set).
    pub vm_hwm_bytes: u64,
    /// Request to verified completion, as the control socket reported it.
    pub fetch_s: f64,
}

/// For each size, a fresh `bids node` process of IDC A fetches a random image of that size
/// from a seeding node (GIS and seeder run in this process); its peak RSS is read from
/// `/proc/<pid>/status` once the fetch has completed, before it is stopped.
pub async fn rss(o: &RssOptions, log: Log<'_>) -> Result<Vec<RssSample>> {
    if o.sizes.is_empty() {
        bail!("give at least one image size");
    }
    let dir = tempfile::Builder::new()
        .prefix("bids-bench-rss-")
        .tempdir()?;
    let cluster = Cluster::start(one_idc(1)).await?;
    let result = rss_on(&cluster, o, dir.path(), log).await;
    cluster.shutdown().await;
    result
}

async fn rss_on(c: &Cluster, o: &RssOptions, dir: &Path, log: Log<'_>) -> Result<Vec<RssSample>> {
    let mut out = Vec::new();
    for (n, &size) in o.sizes.iter().enumerate() {
        log(&format!("preparing a {} random image", human_bytes(size)));
        let file = dir.join(format!("image-{n}.raw"));
        let (p, seed) = (file.clone(), o.seed + n as u64);
        tokio::task::spawn_blocking(move || make_image(&p, size, seed, false))
            .await
            .context("image task")??;
        let image = ImageRef::new("rss", &format!("{n}")).map_err(anyhow::Error::msg)?;
        seed_image(c, 0, &file, &image).await?;
        wait_listed(c, &image, Duration::from_secs(20)).await?;
        // The source file is not needed any more (the seeder has its own copy).
        let _ = std::fs::remove_file(&file);
        log(&format!(
            "a separate `bids node` process fetches {}",
            human_bytes(size)
        ));
        let child_dir = dir.join(format!("node-{n}"));
        let sample = within(
            fetch_in_child(c, o, &child_dir, &image, size),
            "the child's fetch",
        )
        .await?;
        log(&format!(
            "    peak RSS {} ({:.1} s)",
            human_bytes(sample.vm_hwm_bytes),
            sample.fetch_s
        ));
        out.push(sample);
    }
    Ok(out)
}

/// Stops the child process when dropped, whatever happened.
struct ChildGuard(tokio::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.start_kill();
    }
}

async fn fetch_in_child(
    c: &Cluster,
    o: &RssOptions,
    dir: &Path,
    image: &ImageRef,
    size: u64,
) -> Result<RssSample> {
    let store = dir.join("store");
    std::fs::create_dir_all(&store)?;
    let key = dir.join("node.key");
    write_key(&key)?;
    let log_path = dir.join("node.log");
    let log_file = std::fs::File::create(&log_path)?;
    let mut cmd = tokio::process::Command::new(&o.program);
    cmd.arg("node")
        .arg("--key")
        .arg(&key)
        .args(["--idc", "A"])
        .arg("--gis")
        .arg(c.gis_addr.to_string())
        .arg("--store")
        .arg(&store)
        .arg("--admin-peer")
        .arg(c.admin.public().to_peer_id().to_string())
        .args(["--listen", "/ip4/127.0.0.1/tcp/0"])
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log_file)
        .kill_on_drop(true);
    // The operator's BIDS_… settings must not reach the measured node.
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("BIDS_") {
            cmd.env_remove(k);
        }
    }
    // SAFETY: the closure runs in the forked child before exec and only calls prctl, which
    // is async-signal-safe. It makes the node die with this process, even if we are killed.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = ChildGuard(
        cmd.spawn()
            .with_context(|| format!("starting {} node", o.program.display()))?,
    );
    let pid = child.0.id().context("the node process has no pid")?;
    let child_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    // Wait for its control socket and its registration with the GIS.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.0.try_wait()? {
            bail!(
                "the node process exited ({status}) before fetching:\n{}",
                child_log()
            );
        }
        let mut registered = false;
        if control::node_running(&store).await {
            let _ = control::request(&store, &ControlRequest::Status, |r| {
                if let ControlReply::Status(s) = r {
                    registered = s.registered;
                }
            })
            .await;
        }
        if registered {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "the node process did not register within 30 s:\n{}",
                child_log()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut done: Option<Result<f64, String>> = None;
    control::request(
        &store,
        &ControlRequest::Fetch {
            image: image.clone(),
        },
        |r| match r {
            ControlReply::Progress(p) if p.done.is_some() => done = p.done,
            ControlReply::Error(e) => done = Some(Err(e)),
            _ => {}
        },
    )
    .await
    .context("talking to the node's control socket")?;
    let fetch_s = match done {
        Some(Ok(s)) => s,
        Some(Err(e)) => bail!("the node's fetch failed: {e}\n{}", child_log()),
        None => bail!(
            "the node ended the fetch without a result:\n{}",
            child_log()
        ),
    };
    let vm_hwm_bytes = vm_hwm(pid)?;
    let _ = child.0.start_kill();
    let _ = child.0.wait().await;
    Ok(RssSample {
        size_bytes: size,
        vm_hwm_bytes,
        fetch_s,
    })
}

/// Writes a fresh ed25519 keypair as `bids node --key` reads it (protobuf encoding, 0600).
fn write_key(path: &Path) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let bytes = libp2p::identity::Keypair::generate_ed25519()
        .to_protobuf_encoding()
        .context("encoding a keypair")?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(&bytes)?;
    Ok(())
}

/// The peak resident set (`VmHWM`) of process `pid`, in bytes.
pub fn vm_hwm(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let s = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_vm_hwm(&s).with_context(|| format!("{path} has no VmHWM line"))
}

fn parse_vm_hwm(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let mut it = line["VmHWM:".len()..].split_whitespace();
    let n: u64 = it.next()?.parse().ok()?;
    match it.next() {
        Some("kB") | None => Some(n * 1024),
        _ => None,
    }
}

// ----------------------------------------------------------------------------- output

/// `1.00 GiB`, `256.0 MiB`, …
pub fn human_bytes(b: u64) -> String {
    let b = b as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else if b >= (1u64 << 20) as f64 {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    } else {
        format!("{:.1} KiB", b / 1024.0)
    }
}

/// A rate in MB/s (10^6, as link speeds are quoted) and Gbit/s.
pub fn human_rate(bps: f64) -> String {
    format!("{:.0} MB/s ({:.2} Gbit/s)", bps / 1e6, bps * 8.0 / 1e9)
}

/// The table of `bids bench loopback`.
pub fn render_loopback(r: &LoopbackReport) -> String {
    let mut s = format!(
        "unshaped loopback, {} per transfer, 1 MiB units, {} requests in flight\n\n",
        human_bytes(r.size_bytes),
        r.depth
    );
    s += &format!(
        "{:<48} {:>8} {:>9} {:>8}\n",
        "transfer", "MB/s", "seconds", "CPU s"
    );
    let rows = [
        (
            "(a) raw TCP, one tokio stream",
            r.raw_tcp_bytes_per_s,
            r.raw_tcp_cpu_s,
        ),
        (
            "(b) libp2p request-response (tcp+noise+yamux)",
            r.libp2p_rr_bytes_per_s,
            r.libp2p_rr_cpu_s,
        ),
        (
            "(b') (b), each blob checked against its SHA-256",
            r.libp2p_rr_verified_bytes_per_s,
            r.libp2p_rr_verified_cpu_s,
        ),
        (
            "(c) BIDS fetch (GIS, hashing, disk)",
            r.bids_bytes_per_s,
            r.bids_cpu_s,
        ),
        (
            "(d) its storage alone (read, SHA-256, write)",
            r.store_bytes_per_s,
            r.store_cpu_s,
        ),
    ];
    for (name, bps, cpu) in rows {
        s += &format!(
            "{:<48} {:>8.0} {:>9.2} {:>8.2}\n",
            name,
            bps / 1e6,
            r.size_bytes as f64 / bps.max(1e-9),
            cpu
        );
    }
    s += &format!(
        "\n(c)/(a) = {:.2}   (c)/(b) = {:.2}   (goal: (c)/(b) >= 0.70)\n",
        r.bids_vs_tcp, r.bids_vs_libp2p
    );
    s += &format!(
        "(b')/(b) = {:.2}: what the SHA-256 check of each chunk alone leaves of (b)\n",
        r.verified_vs_libp2p
    );
    let network_cpu = r.bids_cpu_s - r.store_cpu_s;
    s += &format!(
        "CPU of (c) without its storage work (c) - (d) = {:.2} s, {:.2} x that of (b)\n",
        network_cpu,
        network_cpu / r.libp2p_rr_cpu_s.max(1e-9)
    );
    s
}

/// The JSON object of `bids bench loopback --json`.
pub fn loopback_json(r: &LoopbackReport) -> serde_json::Value {
    serde_json::json!({
        "size_bytes": r.size_bytes,
        "raw_tcp_bytes_per_s": r.raw_tcp_bytes_per_s,
        "libp2p_rr_bytes_per_s": r.libp2p_rr_bytes_per_s,
        "bids_bytes_per_s": r.bids_bytes_per_s,
        "bids_vs_libp2p": r.bids_vs_libp2p,
        "bids_vs_tcp": r.bids_vs_tcp,
        "libp2p_rr_verified_bytes_per_s": r.libp2p_rr_verified_bytes_per_s,
        "verified_vs_libp2p": r.verified_vs_libp2p,
        "store_bytes_per_s": r.store_bytes_per_s,
        "cpu_s": {
            "raw_tcp": r.raw_tcp_cpu_s,
            "libp2p_rr": r.libp2p_rr_cpu_s,
            "libp2p_rr_verified": r.libp2p_rr_verified_cpu_s,
            "bids": r.bids_cpu_s,
            "store": r.store_cpu_s,
        },
    })
}

/// The table of `bids bench rss`.
pub fn render_rss(samples: &[RssSample]) -> String {
    let mut s = format!("{:>12} {:>14} {:>10}\n", "image", "peak RSS", "fetch s");
    for x in samples {
        s += &format!(
            "{:>12} {:>14} {:>10.2}\n",
            human_bytes(x.size_bytes),
            human_bytes(x.vm_hwm_bytes),
            x.fetch_s
        );
    }
    let max = samples.iter().map(|x| x.vm_hwm_bytes).max().unwrap_or(0);
    s += &format!(
        "\nlargest peak {} against the goal of {}: {}\n",
        human_bytes(max),
        human_bytes(RSS_GOAL_BYTES),
        if max < RSS_GOAL_BYTES {
            "met"
        } else {
            "NOT met"
        }
    );
    s
}

/// The JSON object of `bids bench rss --json`.
pub fn rss_json(samples: &[RssSample]) -> serde_json::Value {
    serde_json::json!({
        "samples": samples,
        "goal_bytes": RSS_GOAL_BYTES,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_hwm_is_read_in_bytes() {
        let status = "Name:\tbids\nVmPeak:\t  900000 kB\nVmHWM:\t   51200 kB\nVmRSS:\t 40000 kB\n";
        assert_eq!(parse_vm_hwm(status), Some(50 << 20));
        assert_eq!(parse_vm_hwm("Name:\tx\n"), None);
        assert_eq!(parse_vm_hwm("VmHWM:\tlots kB\n"), None);
    }

    #[test]
    fn own_peak_rss_is_positive() {
        assert!(vm_hwm(std::process::id()).unwrap() > 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn references_move_every_byte() {
        assert!(raw_tcp(3 * BLOB as u64 + 5).await.unwrap() > 0.0);
        assert!(libp2p_rr(4 * BLOB as u64, 2, false).await.unwrap() > 0.0);
        assert!(libp2p_rr(20 * BLOB as u64, 3, true).await.unwrap() > 0.0);
    }
}
