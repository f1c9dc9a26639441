//! `bids bench gis`: a load generator on the GIS's real protocol. Thousands of virtual hosts,
//! each with its own identity and its own tcp + noise + yamux connection from its own
//! 127.x.y.z source address, register (bridgeheads with admin-signed certificates), publish
//! their holdings, heartbeat at the interval the GIS tells them, and look images up at a given
//! total rate. It reports the latencies, the lookups served, errors by kind, and the CPU and
//! memory of the GIS (when it knows its process) and of itself.
//!
//! What the answers mean is the index's business; this module only checks each answer has the
//! expected shape. The GIS under test is either given (`gis`) or started as a child process.

pub mod conn;
pub mod cpucap;
pub mod stats;

use anyhow::{bail, Context};
use bids_protocols::cert::{BridgeheadCert, CertBody};
use bids_protocols::gis::{
    Counters, GisRequest, GisResponse, Holding, HostSettings, HostStats, ImageQuery,
};
use bids_protocols::manifest::{ChunkInfo, Manifest, ObjectKind};
use bids_protocols::{Idc, ImageId, ImageRef, Policy};
use conn::{Conn, Done};
use libp2p::identity::Keypair;
use libp2p::Multiaddr;
use rand::rngs::StdRng;
use rand::seq::index::sample;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use stats::{proc_sample, Kind, Latency, ProcSample, Recorder};
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncBufReadExt;
use tokio::sync::{mpsc, Notify, Semaphore};

/// Dial, noise and yamux together.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// One request, queueing for a stream included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Lookups queued at one virtual host before the generator counts it as behind.
const HOST_QUEUE: usize = 64;
/// File descriptors the generator needs besides one per virtual host.
const RESERVED_FDS: u64 = 512;
/// How long a phase waits for its last lookups to come back.
const DRAIN: Duration = Duration::from_secs(5);
/// Names of the GIS children's temporary directories and CPU caps, before the generator's
/// pid.
const CHILD_PREFIX: &str = "bids-bench-gis-";
/// Chunk size of the synthetic images (1 MiB, the default).
const CHUNK_SIZE: u32 = 1 << 20;

/// What to run.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// GIS addresses (each ending in `/p2p/<peer id>`); virtual hosts are spread over them.
    /// Empty: start one with `spawn_program`.
    pub gis: Vec<Multiaddr>,
    /// The `bids` executable, to start a GIS (`bids gis`) as a child when `gis` is empty.
    pub spawn_program: Option<PathBuf>,
    /// GIS processes to start when `gis` is empty: 1, a lone GIS; more, the replicas of one
    /// Raft group on 127.0.0.1, with the hosts spread over them.
    pub replicas: usize,
    /// Cap each GIS process started for the run at this many cores (a cgroup CPU quota), as
    /// if each ran on a machine of its own. `None`: no cap.
    pub cores_per_gis: Option<f64>,
    pub hosts: usize,
    pub idcs: usize,
    pub images: usize,
    /// Images each host holds (complete or partly).
    pub holdings_per_host: usize,
    /// Chunks of each synthetic image (its manifest travels in each lookup answer).
    pub chunks_per_image: u32,
    /// Total lookups per second, one phase per rate, in order (0: heartbeats only).
    pub lookup_rates: Vec<u64>,
    /// Length of each phase.
    pub duration: Duration,
    /// Heartbeat interval; `None`: what the GIS says when a host registers (as nodes do).
    pub heartbeat: Option<Duration>,
    /// One stream per request (the fallback protocol) instead of one GIS session per host
    /// (what nodes use), to compare the two.
    pub per_request_streams: bool,
    /// Hosts connecting and registering at the same time.
    pub register_concurrency: usize,
    /// Certified bridgeheads per IDC (needs `admin`, or a spawned GIS).
    pub bridgeheads_per_idc: usize,
    /// The admin key the GIS trusts, to certify bridgeheads. A spawned GIS gets a new one.
    pub admin: Option<Keypair>,
    pub seed: u64,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            gis: Vec::new(),
            spawn_program: None,
            replicas: 1,
            cores_per_gis: None,
            hosts: 1000,
            idcs: 10,
            images: 100,
            holdings_per_host: 5,
            chunks_per_image: 64,
            lookup_rates: vec![1000],
            duration: Duration::from_secs(10),
            heartbeat: None,
            register_concurrency: 256,
            bridgeheads_per_idc: 2,
            admin: None,
            seed: 1,
            per_request_streams: false,
        }
    }
}

/// The open-file limit the generator needs and has.
#[derive(Clone, Debug, Serialize)]
pub struct NoFile {
    pub needed: u64,
    pub limit: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct RegistrationReport {
    pub registered: usize,
    pub failed: usize,
    /// From the first dial until every host registered (`None` if some never did).
    pub all_registered_s: Option<f64>,
    /// When the registration stretch ended: every host registered and published, or gave
    /// up (a failed connect, a refused or timed-out registration), or the deadline passed.
    pub ended_s: f64,
    /// Until every host also published all its holdings.
    pub all_published_s: Option<f64>,
    /// Dial + noise + yamux.
    pub connect: Latency,
    pub register: Latency,
    pub publish: Latency,
    pub errors: BTreeMap<String, u64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct PhaseReport {
    pub offered_lookups_per_s: u64,
    pub duration_s: f64,
    /// Successful lookups over the phase (its drain included).
    pub lookups_per_s: f64,
    pub lookup: Latency,
    /// Lookups from the moment the virtual host wrote them: `lookup` less the generator's
    /// own lag.
    pub lookup_sent: Latency,
    pub heartbeats_per_s: f64,
    pub heartbeat: Latency,
    pub gis_cpu_s: Option<f64>,
    /// `gis_cpu_s` over the phase's wall time: cores busy.
    pub gis_cores: Option<f64>,
    pub generator_cpu_s: Option<f64>,
    pub generator_cores: Option<f64>,
    pub errors: BTreeMap<String, u64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub hosts: usize,
    pub idcs: usize,
    pub images: usize,
    pub holdings_per_host: usize,
    pub bridgeheads: usize,
    pub heartbeat_s: Option<f64>,
    /// How requests travel: `session` (one GIS session per host, as nodes do) or
    /// `per_request_streams`.
    pub protocol: &'static str,
    pub gis_addrs: Vec<String>,
    pub gis_spawned: bool,
    /// GIS processes started for the run (0 with `--gis`): 1, or the replicas of a Raft
    /// group. `gis` and each phase's GIS CPU are summed over them.
    pub gis_processes: usize,
    /// The CPU cap of each GIS process started for the run, in cores (`None`: uncapped).
    pub cores_per_gis: Option<f64>,
    pub nofile: NoFile,
    pub registration: RegistrationReport,
    pub phases: Vec<PhaseReport>,
    /// Of the last phase.
    pub lookups_per_s: f64,
    /// Of the last phase.
    pub lookup: Latency,
    /// Of the registration stretch.
    pub register: Latency,
    /// The GIS process over the whole run (`None` when it is not ours to read).
    pub gis: Option<ProcSample>,
    pub generator: Option<ProcSample>,
    /// Every error of the run, by kind.
    pub errors: BTreeMap<String, u64>,
}

/// One synthetic image.
struct ImageSpec {
    r: ImageRef,
    id: ImageId,
    manifest: Vec<u8>,
    chunks: u32,
}

/// The `i`-th synthetic image of the benchmark: `chunks` chunks of 1 MiB with distinct
/// made-up hashes, named `bench-NNNNN:1`.
pub fn synthetic_manifest(i: usize, chunks: u32) -> Manifest {
    Manifest {
        name: format!("bench-{i:05}"),
        version: "1".into(),
        base: None,
        kind: ObjectKind::Image,
        size: u64::from(chunks) * u64::from(CHUNK_SIZE),
        chunk_size: CHUNK_SIZE,
        chunks: (0..chunks)
            .map(|c| {
                let mut seed = (i as u64).to_be_bytes().to_vec();
                seed.extend(c.to_be_bytes());
                let sha256 = bids_protocols::manifest::sha256(&seed);
                let mut md5 = [0u8; 16];
                md5.copy_from_slice(&sha256[..16]);
                ChunkInfo {
                    sha256,
                    md5,
                    zero: false,
                }
            })
            .collect(),
    }
}

fn synthetic_image(i: usize, chunks: u32) -> ImageSpec {
    let m = synthetic_manifest(i, chunks);
    ImageSpec {
        r: m.image_ref(),
        id: m.id(),
        manifest: m.to_bytes(),
        chunks,
    }
}

struct HostSpec {
    key: Keypair,
    idc: Idc,
    src: IpAddr,
    gis: Multiaddr,
    cert: Option<BridgeheadCert>,
    holdings: Vec<Holding>,
}

/// Host `i`'s own source address: 127.(1 + i / 65536).(i / 256 % 256).(i % 256).
fn source_addr(i: usize) -> IpAddr {
    let b = 1 + (i / 65536).min(254);
    IpAddr::V4(Ipv4Addr::new(
        127,
        b as u8,
        (i / 256 % 256) as u8,
        (i % 256) as u8,
    ))
}

/// State shared by the virtual hosts and the driver.
struct Shared {
    rec: Mutex<Recorder>,
    images: Vec<ImageSpec>,
    heartbeat: Option<Duration>,
    per_request_streams: bool,
    register_limit: Semaphore,
    registered: AtomicUsize,
    published: AtomicUsize,
    failed: AtomicUsize,
    /// Lookups sent and not yet answered.
    outstanding: AtomicI64,
    /// The heartbeat interval the GIS announced, in ms (0: none yet).
    announced_heartbeat_ms: AtomicUsize,
    progress: Notify,
}

impl Shared {
    fn record(&self, f: impl FnOnce(&mut Recorder)) {
        let mut r = self.rec.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut r);
    }
    fn take(&self) -> Recorder {
        std::mem::take(&mut *self.rec.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// A lookup to send: which image, and when it was due.
struct LookupCmd {
    image: usize,
    due: Instant,
}

#[derive(Clone, Copy, Debug)]
enum Tag {
    Register,
    Publish,
    Heartbeat,
    Lookup,
}

impl Tag {
    fn kind(self) -> Kind {
        match self {
            Tag::Register => Kind::Register,
            Tag::Publish => Kind::Publish,
            Tag::Heartbeat => Kind::Heartbeat,
            Tag::Lookup => Kind::Lookup,
        }
    }
}

fn heartbeat_request(h: &HostSpec) -> GisRequest {
    let per_image = Counters {
        lan_recv_bytes: 64 << 20,
        lan_recv_chunks: 64,
        lan_sent_bytes: 32 << 20,
        lan_sent_chunks: 32,
        ..Default::default()
    };
    let mut total = Counters::default();
    let mut images = BTreeMap::new();
    for hd in &h.holdings {
        total.add(&per_image);
        images.insert(hd.image, per_image);
    }
    GisRequest::Heartbeat {
        stats: HostStats {
            total,
            images,
            refusals: 0,
            settings: Some(HostSettings {
                upload_bps: 0,
                download_bps: 0,
                sharing: true,
            }),
            provisions: BTreeMap::new(),
            banned: Vec::new(),
        },
    }
}

/// Checks the shape of an answer and records it.
fn on_done(shared: &Shared, d: Done<Tag>) -> Option<GisResponse> {
    let kind = d.tag.kind();
    if matches!(d.tag, Tag::Lookup) {
        shared.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
    match d.result {
        Err(e) => {
            shared.record(|r| r.error(format!("{}: {e}", kind.name())));
            None
        }
        Ok(GisResponse::Error { kind: k, .. }) => {
            shared.record(|r| r.error(format!("{}: gis {k:?}", kind.name())));
            None
        }
        Ok(resp) => {
            let fits = matches!(
                (&d.tag, &resp),
                (Tag::Register, GisResponse::Registered { .. })
                    | (Tag::Publish, GisResponse::Ack { .. })
                    | (Tag::Heartbeat, GisResponse::Ack { .. })
                    | (Tag::Lookup, GisResponse::HostList(_))
            );
            if fits {
                let took = d.due.elapsed();
                let wire = d.sent.elapsed();
                shared.record(|r| {
                    r.ok(kind, took);
                    if kind == Kind::Lookup {
                        r.ok(Kind::LookupSent, wire);
                    }
                });
                Some(resp)
            } else {
                shared.record(|r| r.error(format!("{}: unexpected answer", kind.name())));
                None
            }
        }
    }
}

/// One virtual host: connect, register, publish, then heartbeat and look up until its
/// command channel closes.
async fn host_task(h: HostSpec, shared: Arc<Shared>, mut cmds: mpsc::Receiver<LookupCmd>) {
    let gave_up = |shared: &Shared| {
        shared.failed.fetch_add(1, Ordering::Relaxed);
        shared.progress.notify_one();
    };
    let permit = match shared.register_limit.acquire().await {
        Ok(p) => p,
        Err(_) => return gave_up(&shared),
    };
    let dial = Instant::now();
    let mut conn: Conn<Tag> = match conn::connect(
        &h.key,
        h.src,
        &h.gis,
        CONNECT_TIMEOUT,
        !shared.per_request_streams,
    )
    .await
    {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(src = %h.src, error = %e, "virtual host could not connect");
            shared.record(|r| r.error(e.kind()));
            return gave_up(&shared);
        }
    };
    let connected = Instant::now();
    shared.record(|r| r.ok(Kind::Connect, connected - dial));
    conn.send(
        Tag::Register,
        connected,
        GisRequest::Register {
            idc: h.idc.clone(),
            addrs: vec![format!("/ip4/{}/tcp/4001", h.src)
                .parse()
                .unwrap_or_else(|_| Multiaddr::empty())],
            cert: h.cert.clone(),
            policy: Policy::Bids,
        },
    );
    // Register, then publish every holding. (Per-request streams time out by themselves;
    // session requests by the outer timeout.)
    let first = match tokio::time::timeout(REQUEST_TIMEOUT, conn.next_done(REQUEST_TIMEOUT)).await {
        Ok(done) => done,
        Err(_) => Ok(Done {
            tag: Tag::Register,
            due: connected,
            sent: connected,
            result: Err("timeout".to_string()),
        }),
    };
    let every = match first {
        Ok(d) => match on_done(&shared, d) {
            Some(GisResponse::Registered { heartbeat_secs, .. }) => shared
                .heartbeat
                .unwrap_or(Duration::from_secs(u64::from(heartbeat_secs.max(1)))),
            _ => return gave_up(&shared),
        },
        Err(e) => {
            shared.record(|r| r.error(e.kind()));
            return gave_up(&shared);
        }
    };
    drop(permit);
    shared
        .announced_heartbeat_ms
        .store(every.as_millis() as usize, Ordering::Relaxed);
    shared.registered.fetch_add(1, Ordering::Relaxed);
    shared.progress.notify_one();
    let now = Instant::now();
    for hd in &h.holdings {
        let manifest = shared
            .images
            .iter()
            .find(|s| s.id == hd.image)
            .map(|s| s.manifest.clone())
            .unwrap_or_default();
        conn.send(
            Tag::Publish,
            now,
            GisRequest::Publish {
                holding: hd.clone(),
                manifest,
            },
        );
    }
    let mut publishing = h.holdings.len();
    if publishing == 0 {
        shared.published.fetch_add(1, Ordering::Relaxed);
        shared.progress.notify_one();
    }
    // Heartbeats spread evenly over the interval, as independent nodes' would be.
    let offset = rand::thread_rng().gen_range(Duration::ZERO..every);
    let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + offset, every);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let heartbeat = heartbeat_request(&h);
    let mut every = every;
    let mut on_answer = |d: Done<Tag>| {
        let publish = matches!(d.tag, Tag::Publish);
        let answer = on_done(&shared, d);
        if publish {
            publishing -= 1;
            if publishing == 0 {
                shared.published.fetch_add(1, Ordering::Relaxed);
                shared.progress.notify_one();
            }
        }
        answer
    };
    loop {
        tokio::select! {
            done = conn.next_done(REQUEST_TIMEOUT) => match done {
                Ok(d) => {
                    // The GIS may ask for another pace as hosts come and go; nodes follow.
                    if let Some(GisResponse::Ack { heartbeat_secs, .. }) = on_answer(d) {
                        let asked = Duration::from_secs(u64::from(heartbeat_secs));
                        if shared.heartbeat.is_none() && heartbeat_secs > 0 && asked != every {
                            every = asked;
                            beat = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                            beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                            shared.announced_heartbeat_ms.store(every.as_millis() as usize, Ordering::Relaxed);
                        }
                    }
                }
                Err(e) => {
                    shared.record(|r| r.error(e.kind()));
                    // Lookups still queued here will never come back.
                    let lost = conn.in_flight() as i64;
                    shared.outstanding.fetch_sub(lost.min(shared.outstanding.load(Ordering::Relaxed)), Ordering::Relaxed);
                    return gave_up(&shared);
                }
            },
            _ = beat.tick() => {
                for d in conn.expired(REQUEST_TIMEOUT) {
                    let _ = on_answer(d);
                }
                conn.send(Tag::Heartbeat, Instant::now(), heartbeat.clone());
            }
            cmd = cmds.recv() => match cmd {
                Some(LookupCmd { image, due }) => {
                    let r = shared.images.get(image).map(|s| s.r.clone());
                    if let Some(r) = r {
                        conn.send(Tag::Lookup, due, GisRequest::Lookup { image: ImageQuery::Ref(r), idc: None });
                    }
                }
                None => break,
            },
        }
    }
    conn.close().await;
}

/// Raises RLIMIT_NOFILE to at least `needed` if it can (root may raise the hard limit).
fn raise_nofile(needed: u64) -> NoFile {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return NoFile { needed, limit: 0 };
    }
    if lim.rlim_cur < needed {
        let want = libc::rlimit {
            rlim_cur: needed.max(lim.rlim_cur),
            rlim_max: needed.max(lim.rlim_max),
        };
        // SAFETY: setrlimit reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } == 0 {
            lim = want;
        } else {
            let soft = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            // SAFETY: as above.
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &soft) } == 0 {
                lim = soft;
            }
        }
    }
    NoFile {
        needed,
        limit: lim.rlim_cur,
    }
}

/// A GIS started for the run, as a child `bids gis`; killed when dropped.
struct ChildGis {
    child: tokio::process::Child,
    dir: PathBuf,
    addr: Multiaddr,
    /// Dropped after the kill in `drop`: the cgroup goes once the process has exited.
    _cap: Option<cpucap::CpuCap>,
}

impl ChildGis {
    /// Starts `bids gis`; `raft`: this replica's id, every replica's Raft address (by id
    /// from 1) and the group's cluster key.
    async fn start(
        program: &std::path::Path,
        admin: &Keypair,
        raft: Option<(usize, &[std::net::SocketAddr], &crate::cluster::ClusterKey)>,
        cores: Option<f64>,
    ) -> anyhow::Result<ChildGis> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let name = format!(
            "{CHILD_PREFIX}{}-{nanos}-{}",
            std::process::id(),
            raft.map_or(0, |(id, _, _)| id)
        );
        let cap = cores
            .map(|c| cpucap::CpuCap::create(&name, c))
            .transpose()
            .context("capping the GIS's CPU (--cores-per-gis)")?;
        let dir = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let key = dir.join("gis.key");
        let bytes = Keypair::generate_ed25519()
            .to_protobuf_encoding()
            .context("encoding the GIS key")?;
        std::fs::write(&key, bytes).with_context(|| format!("writing {}", key.display()))?;
        let mut raft_args = Vec::new();
        if let Some((id, addrs, cluster_key)) = raft {
            let file = dir.join("cluster.key");
            std::fs::write(&file, cluster_key.to_hex())
                .with_context(|| format!("writing {}", file.display()))?;
            raft_args.extend(["--cluster-key".to_string(), file.display().to_string()]);
            raft_args.extend(["--raft-id".to_string(), id.to_string()]);
            raft_args.extend(["--raft-listen".to_string(), addrs[id - 1].to_string()]);
            for (i, a) in addrs.iter().enumerate().filter(|(i, _)| i + 1 != id) {
                raft_args.extend(["--peer".to_string(), format!("{}@{a}", i + 1)]);
            }
        }
        let log = std::fs::File::create(dir.join("gis.log")).context("creating the GIS log")?;
        let mut cmd = tokio::process::Command::new(program);
        cmd.arg("gis")
            .arg("--key")
            .arg(&key)
            .args(["--listen", "/ip4/127.0.0.1/tcp/0", "--admin-peer"])
            .arg(admin.public().to_peer_id().to_string())
            .arg("--data")
            .arg(dir.join("data"))
            .args(&raft_args)
            .env(
                "RUST_LOG",
                std::env::var("BIDS_BENCH_GIS_LOG").unwrap_or("warn".into()),
            )
            .stdout(std::process::Stdio::piped())
            .stderr(log)
            .kill_on_drop(true);
        // SAFETY: the closure runs in the forked child before exec and only calls prctl,
        // which is async-signal-safe. The GIS dies with the benchmark, even one killed by a
        // signal, whose drops never run.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {} gis", program.display()))?;
        if let Some(cap) = &cap {
            let pid = child.id().context("the GIS exited at once")?;
            cap.add(pid)
                .context("moving the GIS into its CPU cap's cgroup")?;
        }
        let stdout = child.stdout.take().context("the GIS's stdout")?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await;
        let addr = match first {
            Ok(Ok(Some(line))) => line
                .trim()
                .parse::<Multiaddr>()
                .with_context(|| format!("the GIS printed {line:?}, not its address"))?,
            _ => bail!(
                "the GIS did not print its address within 30 s; see {}",
                dir.join("gis.log").display()
            ),
        };
        Ok(ChildGis {
            child,
            dir,
            addr,
            _cap: cap,
        })
    }

    fn pid(&self) -> Option<u32> {
        self.child.id()
    }
}

impl Drop for ChildGis {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts one GIS, or `replicas` of them as one Raft group (Raft listeners on free
/// 127.0.0.1 ports).
async fn start_gis(
    program: &std::path::Path,
    admin: &Keypair,
    replicas: usize,
    cores: Option<f64>,
) -> anyhow::Result<Vec<ChildGis>> {
    if replicas <= 1 {
        return Ok(vec![ChildGis::start(program, admin, None, cores).await?]);
    }
    let raft: Vec<std::net::SocketAddr> = {
        let ls = (0..replicas)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
            .collect::<std::io::Result<Vec<_>>>()
            .context("finding free ports for the Raft listeners")?;
        ls.iter()
            .map(|l| l.local_addr())
            .collect::<std::io::Result<_>>()
            .context("finding free ports for the Raft listeners")?
    };
    let key = crate::cluster::ClusterKey::generate();
    let mut children = Vec::with_capacity(replicas);
    for id in 1..=replicas {
        children.push(ChildGis::start(program, admin, Some((id, &raft, &key)), cores).await?);
    }
    Ok(children)
}

/// The GIS processes together: CPU seconds, resident and peak resident bytes summed
/// (`None` if there are none or one is unreadable).
fn sum_samples(pids: &[u32]) -> Option<ProcSample> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().try_fold(ProcSample::default(), |acc, p| {
        let s = proc_sample(Some(*p))?;
        Some(ProcSample {
            cpu_s: acc.cpu_s + s.cpu_s,
            rss_bytes: acc.rss_bytes + s.rss_bytes,
            peak_rss_bytes: acc.peak_rss_bytes + s.peak_rss_bytes,
        })
    })
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Runs the whole benchmark. `log` receives progress lines.
pub async fn run(o: &LoadOptions, log: &mut dyn FnMut(&str)) -> anyhow::Result<Report> {
    if o.hosts == 0 || o.idcs == 0 || o.images == 0 {
        bail!("--hosts, --idcs and --images must be at least 1");
    }
    if o.hosts > 254 * 65536 {
        bail!(
            "at most {} virtual hosts (one loopback address each)",
            254 * 65536
        );
    }
    if !o.gis.is_empty() && o.replicas > 1 {
        bail!("--replicas starts a GIS group of its own; leave --gis out, or give every replica's address with --gis");
    }
    if o.replicas == 0 {
        bail!("--replicas must be at least 1");
    }
    if !o.gis.is_empty() && o.cores_per_gis.is_some() {
        bail!("--cores-per-gis caps the GIS processes the benchmark starts; leave --gis out");
    }
    let needed = o.hosts as u64 + RESERVED_FDS;
    let nofile = raise_nofile(needed);
    log(&format!(
        "open files: need {} (one per virtual host + {RESERVED_FDS}){}, limit {}",
        nofile.needed,
        if o.gis.is_empty() {
            ", the same again for the GIS children together"
        } else {
            ""
        },
        nofile.limit
    ));
    if nofile.limit < needed {
        log(&format!(
            "warning: the open-file limit {} is below the {needed} needed; raise it (ulimit -n, as root) or expect connect errors",
            nofile.limit
        ));
    }
    let (admin, children) = if o.gis.is_empty() {
        let program = o
            .spawn_program
            .as_ref()
            .context("no --gis given and no bids executable to start one")?;
        let admin = o.admin.clone().unwrap_or_else(Keypair::generate_ed25519);
        if o.cores_per_gis.is_some() {
            let n = cpucap::CpuCap::remove_orphans(CHILD_PREFIX);
            if n > 0 {
                log(&format!(
                    "removed {n} CPU-cap cgroup(s) left by killed runs"
                ));
            }
        }
        let children = start_gis(program, &admin, o.replicas, o.cores_per_gis).await?;
        for c in &children {
            log(&format!(
                "started a GIS at {} (pid {:?}){}",
                c.addr,
                c.pid(),
                o.cores_per_gis
                    .map_or(String::new(), |c| format!(", capped at {c} cores"))
            ));
        }
        (Some(admin), children)
    } else {
        (o.admin.clone(), Vec::new())
    };
    let gis_addrs: Vec<Multiaddr> = if children.is_empty() {
        o.gis.clone()
    } else {
        children.iter().map(|c| c.addr.clone()).collect()
    };
    let gis_pids: Vec<u32> = children.iter().filter_map(ChildGis::pid).collect();
    let gis_sample = || sum_samples(&gis_pids);

    let images: Vec<ImageSpec> = (0..o.images)
        .map(|i| synthetic_image(i, o.chunks_per_image.max(1)))
        .collect();
    let mut rng = StdRng::seed_from_u64(o.seed);
    let now_s = time::OffsetDateTime::now_utc().unix_timestamp();
    let mut specs = Vec::with_capacity(o.hosts);
    let mut bridgeheads = 0;
    for i in 0..o.hosts {
        let key = Keypair::generate_ed25519();
        let idc = Idc::new(&format!("idc-{:03}", i % o.idcs)).map_err(anyhow::Error::msg)?;
        let cert = match &admin {
            Some(a) if i / o.idcs < o.bridgeheads_per_idc => {
                bridgeheads += 1;
                Some(
                    BridgeheadCert::issue(
                        a,
                        CertBody {
                            peer: key.public().to_peer_id(),
                            idc: idc.clone(),
                            db_id: format!("db{}", i / o.idcs),
                            serial: i as u64 + 1,
                            not_before: now_s - 3600,
                            not_after: now_s + 30 * 86400,
                            issuer: a.public().to_peer_id(),
                        },
                    )
                    .map_err(anyhow::Error::msg)?,
                )
            }
            _ => None,
        };
        let k = o.holdings_per_host.min(o.images);
        let holdings = sample(&mut rng, o.images, k)
            .into_iter()
            .map(|j| {
                let chunks = images[j].chunks;
                if rng.gen_bool(0.8) {
                    Holding {
                        image: images[j].id,
                        chunks_held: chunks,
                        complete: true,
                        fetching: false,
                    }
                } else {
                    Holding {
                        image: images[j].id,
                        chunks_held: rng.gen_range(0..chunks),
                        complete: false,
                        fetching: true,
                    }
                }
            })
            .collect();
        specs.push(HostSpec {
            key,
            idc,
            src: source_addr(i),
            gis: gis_addrs[i % gis_addrs.len()].clone(),
            cert,
            holdings,
        });
    }
    let shared = Arc::new(Shared {
        rec: Mutex::new(Recorder::default()),
        images,
        heartbeat: o.heartbeat,
        per_request_streams: o.per_request_streams,
        register_limit: Semaphore::new(o.register_concurrency.max(1)),
        registered: AtomicUsize::new(0),
        published: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
        outstanding: AtomicI64::new(0),
        announced_heartbeat_ms: AtomicUsize::new(0),
        progress: Notify::new(),
    });
    let gis_start = gis_sample();
    let gen_start = proc_sample(None);

    // Registration from cold.
    log(&format!(
        "{} virtual hosts in {} IDCs ({bridgeheads} bridgeheads) registering with {} GIS address(es), {} at a time",
        o.hosts,
        o.idcs,
        gis_addrs.len(),
        o.register_concurrency
    ));
    let started = Instant::now();
    let mut senders = Vec::with_capacity(o.hosts);
    let mut tasks = tokio::task::JoinSet::new();
    for h in specs {
        let (tx, rx) = mpsc::channel(HOST_QUEUE);
        senders.push(tx);
        tasks.spawn(host_task(h, shared.clone(), rx));
    }
    let deadline = started + Duration::from_secs(60 + o.hosts as u64 / 100);
    let mut all_registered = None;
    let mut all_published = None;
    let mut last_log = Instant::now();
    loop {
        let failed = shared.failed.load(Ordering::Relaxed);
        let registered = shared.registered.load(Ordering::Relaxed);
        let published = shared.published.load(Ordering::Relaxed);
        if all_registered.is_none() && registered == o.hosts {
            all_registered = Some(started.elapsed());
        }
        if all_published.is_none() && published == o.hosts {
            all_published = Some(started.elapsed());
        }
        if published + failed >= o.hosts || Instant::now() > deadline {
            break;
        }
        if last_log.elapsed() > Duration::from_secs(5) {
            last_log = Instant::now();
            log(&format!(
                "  {:.0} s: {registered} registered, {published} published, {failed} failed",
                secs(started.elapsed())
            ));
        }
        let _ = tokio::time::timeout(Duration::from_millis(200), shared.progress.notified()).await;
    }
    let mut rec = shared.take();
    let registration = RegistrationReport {
        registered: shared.registered.load(Ordering::Relaxed),
        failed: shared.failed.load(Ordering::Relaxed),
        all_registered_s: all_registered.map(secs),
        ended_s: secs(started.elapsed()),
        all_published_s: all_published.map(secs),
        connect: rec.summary(Kind::Connect),
        register: rec.summary(Kind::Register),
        publish: rec.summary(Kind::Publish),
        errors: rec.errors.clone(),
    };
    log(&format!(
        "registered {} of {} in {}; register p50 {:.1} ms p99 {:.1} ms; connect p99 {:.1} ms",
        registration.registered,
        o.hosts,
        all_registered.map_or("(not all)".into(), |d| format!("{:.1} s", secs(d))),
        registration.register.p50_ms,
        registration.register.p99_ms,
        registration.connect.p99_ms
    ));
    let mut errors = registration.errors.clone();
    let heartbeat_ms = shared.announced_heartbeat_ms.load(Ordering::Relaxed);

    // One phase per lookup rate.
    let mut phases = Vec::new();
    for &rate in &o.lookup_rates {
        let gis0 = gis_sample();
        let gen0 = proc_sample(None);
        let t0 = Instant::now();
        drive_lookups(&shared, &senders, rate, o.duration, o.seed ^ rate).await;
        let drain_until = Instant::now() + DRAIN;
        while shared.outstanding.load(Ordering::Relaxed) > 0 && Instant::now() < drain_until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let wall = t0.elapsed();
        let mut rec = shared.take();
        let cpu = |a: Option<ProcSample>, b: Option<ProcSample>| match (a, b) {
            (Some(a), Some(b)) => Some(b.cpu_s - a.cpu_s),
            _ => None,
        };
        let gis_cpu = cpu(gis0, gis_sample());
        let gen_cpu = cpu(gen0, proc_sample(None));
        let lookup = rec.summary(Kind::Lookup);
        let lookup_sent = rec.summary(Kind::LookupSent);
        let heartbeat = rec.summary(Kind::Heartbeat);
        let p = PhaseReport {
            offered_lookups_per_s: rate,
            duration_s: secs(wall),
            lookups_per_s: lookup.count as f64 / secs(wall),
            heartbeats_per_s: heartbeat.count as f64 / secs(wall),
            lookup,
            lookup_sent,
            heartbeat,
            gis_cpu_s: gis_cpu,
            gis_cores: gis_cpu.map(|c| c / secs(wall)),
            generator_cpu_s: gen_cpu,
            generator_cores: gen_cpu.map(|c| c / secs(wall)),
            errors: rec.errors.clone(),
        };
        log(&format!(
            "offered {rate:>6} lookups/s: served {:>8.0}/s p50 {:>6.2} ms p99 {:>7.2} ms p999 {:>7.2} ms (from the write: p99 {:>7.2} ms) | heartbeats {:>6.0}/s p99 {:>7.2} ms | GIS {} cores, generator {} cores | errors {}",
            p.lookups_per_s,
            p.lookup.p50_ms,
            p.lookup.p99_ms,
            p.lookup.p999_ms,
            p.lookup_sent.p99_ms,
            p.heartbeats_per_s,
            p.heartbeat.p99_ms,
            p.gis_cores.map_or("?".into(), |c| format!("{c:.2}")),
            p.generator_cores.map_or("?".into(), |c| format!("{c:.2}")),
            p.errors.values().sum::<u64>()
        ));
        for (k, v) in &p.errors {
            *errors.entry(k.clone()).or_default() += v;
        }
        phases.push(p);
    }

    let gis_end = gis_sample();
    let gen_end = proc_sample(None);
    // Stop: closing the command channels ends every virtual host.
    drop(senders);
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.abort_all();
    drop(children);
    let whole = |a: Option<ProcSample>, b: Option<ProcSample>| match (a, b) {
        (Some(a), Some(b)) => Some(ProcSample {
            cpu_s: b.cpu_s - a.cpu_s,
            ..b
        }),
        _ => None,
    };
    let last = phases.last();
    Ok(Report {
        hosts: o.hosts,
        idcs: o.idcs,
        images: o.images,
        holdings_per_host: o.holdings_per_host.min(o.images),
        bridgeheads,
        heartbeat_s: (heartbeat_ms > 0).then(|| heartbeat_ms as f64 / 1000.0),
        protocol: if o.per_request_streams {
            "per_request_streams"
        } else {
            "session"
        },
        gis_addrs: gis_addrs.iter().map(|a| a.to_string()).collect(),
        gis_spawned: !gis_pids.is_empty(),
        gis_processes: gis_pids.len(),
        cores_per_gis: o.cores_per_gis.filter(|_| !gis_pids.is_empty()),
        nofile,
        lookups_per_s: last.map_or(0.0, |p| p.lookups_per_s),
        lookup: last.map(|p| p.lookup.clone()).unwrap_or_default(),
        register: registration.register.clone(),
        registration,
        phases,
        gis: whole(gis_start, gis_end),
        generator: whole(gen_start, gen_end),
        errors,
    })
}

/// Sends `rate` lookups per second for `duration`, each to a random virtual host for a random
/// image, on a fixed schedule (open loop: a slow GIS does not slow the offered load).
async fn drive_lookups(
    shared: &Shared,
    senders: &[mpsc::Sender<LookupCmd>],
    rate: u64,
    duration: Duration,
    seed: u64,
) {
    let t0 = Instant::now();
    if rate == 0 {
        tokio::time::sleep(duration).await;
        return;
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let total = (rate as f64 * secs(duration)) as u64;
    let mut sent = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let images = shared.images.len();
    while sent < total {
        tick.tick().await;
        let due_count = ((secs(t0.elapsed()) * rate as f64) as u64).min(total);
        while sent < due_count {
            // The instant this lookup was due on the schedule.
            let due = t0 + Duration::from_secs_f64(sent as f64 / rate as f64);
            sent += 1;
            let host = rng.gen_range(0..senders.len());
            let image = rng.gen_range(0..images);
            match senders[host].try_send(LookupCmd { image, due }) {
                Ok(()) => {
                    shared.outstanding.fetch_add(1, Ordering::Relaxed);
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    shared.record(|r| r.error("lookup: virtual host backlog full"))
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    shared.record(|r| r.error("lookup: virtual host gone"))
                }
            }
        }
    }
}

/// The report as a human-readable table.
pub fn render(r: &Report) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let reg = &r.registration;
    let _ = writeln!(
        s,
        "GIS bench: {} hosts in {} IDCs ({} bridgeheads), {} images, {} holdings per host, heartbeat every {}, requests over {}",
        r.hosts,
        r.idcs,
        r.bridgeheads,
        r.images,
        r.holdings_per_host,
        r.heartbeat_s.map_or("?".into(), |h| format!("{h} s")),
        if r.protocol == "session" { "one GIS session per host" } else { "a stream per request" }
    );
    let _ = writeln!(
        s,
        "registration: {} of {} in {} (all published in {}; stretch ended after {:.1} s); register p50 {:.2} / p99 {:.2} / p999 {:.2} ms; connect p99 {:.2} ms; publish p99 {:.2} ms",
        reg.registered,
        r.hosts,
        reg.all_registered_s.map_or("(not all)".into(), |t| format!("{t:.1} s")),
        reg.all_published_s.map_or("(not all)".into(), |t| format!("{t:.1} s")),
        reg.ended_s,
        reg.register.p50_ms,
        reg.register.p99_ms,
        reg.register.p999_ms,
        reg.connect.p99_ms,
        reg.publish.p99_ms
    );
    let _ = writeln!(
        s,
        "{:>9} {:>9} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9} {:>7}",
        "offered/s",
        "served/s",
        "p50 ms",
        "p99 ms",
        "p999 ms",
        "hb/s",
        "hb p99",
        "GIS cores",
        "gen cores"
    );
    for p in &r.phases {
        let _ = writeln!(
            s,
            "{:>9} {:>9.0} {:>8.2} {:>8.2} {:>8.2} {:>8.0} {:>9.2} {:>9} {:>7}",
            p.offered_lookups_per_s,
            p.lookups_per_s,
            p.lookup.p50_ms,
            p.lookup.p99_ms,
            p.lookup.p999_ms,
            p.heartbeats_per_s,
            p.heartbeat.p99_ms,
            p.gis_cores.map_or("?".into(), |c| format!("{c:.2}")),
            p.generator_cores.map_or("?".into(), |c| format!("{c:.2}")),
        );
    }
    match &r.gis {
        Some(g) => {
            let _ = writeln!(
                s,
                "{}: {:.1} CPU s over the run, peak RSS {:.1} MiB",
                match (r.gis_processes > 1, r.cores_per_gis) {
                    (true, None) => format!("GIS processes ({} replicas, summed)", r.gis_processes),
                    (true, Some(c)) => format!(
                        "GIS processes ({} replicas, each capped at {c} cores, summed)",
                        r.gis_processes
                    ),
                    (false, None) => "GIS process".to_string(),
                    (false, Some(c)) => format!("GIS process (capped at {c} cores)"),
                },
                g.cpu_s,
                g.peak_rss_bytes as f64 / (1 << 20) as f64
            );
        }
        None => {
            let _ = writeln!(s, "GIS process: not ours, CPU and memory not read");
        }
    }
    if let Some(g) = &r.generator {
        let _ = writeln!(
            s,
            "generator: {:.1} CPU s over the run, peak RSS {:.1} MiB",
            g.cpu_s,
            g.peak_rss_bytes as f64 / (1 << 20) as f64
        );
    }
    let _ = writeln!(
        s,
        "open files: needed {}, limit {}",
        r.nofile.needed, r.nofile.limit
    );
    if r.errors.is_empty() {
        let _ = writeln!(s, "errors: none");
    } else {
        let _ = writeln!(s, "errors:");
        for (k, v) in &r.errors {
            let _ = writeln!(s, "  {k}: {v}");
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_images_are_valid_manifests_with_distinct_ids() {
        let a = synthetic_image(0, 64);
        let b = synthetic_image(1, 64);
        assert_ne!(a.id, b.id);
        let m = Manifest::from_bytes_with_id(&a.manifest, a.id).expect("valid manifest");
        assert_eq!(m.chunk_count(), 64);
    }

    #[test]
    fn source_addresses_are_distinct_loopback_addresses() {
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..70_000 {
            let a = source_addr(i);
            assert!(a.is_loopback());
            assert_ne!(a, IpAddr::V4(Ipv4Addr::LOCALHOST));
            assert!(seen.insert(a));
        }
    }
}
