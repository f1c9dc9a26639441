//! Helpers shared by the multi-IDC test binaries: cluster specs, test images, file hashes
//! and bounded polling. Each test binary compiles this module in; not every binary uses
//! every helper.
#![allow(dead_code)]

use bids_node::NodeStatus;
use bids_protocols::ImageId;
use bids_testnet::cluster::{Cluster, IdcSpec};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;
/// Chunk size of every test image: small, so small images still have many chunks.
pub const CHUNK: u32 = 256 * 1024;

/// An unshaped IDC with `hosts` ordinary hosts and `bridgeheads` certified bridgeheads.
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

/// A test image file in its own temporary directory (kept alive by the returned guard).
pub fn image_file(size: u64, seed: u64, sparse: bool) -> (PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("image.raw");
    bids_testnet::demo::make_image(&file, size, seed, sparse).expect("writing the test image");
    (file, dir)
}

/// SHA-256 of a whole file.
pub fn file_hash(p: &Path) -> [u8; 32] {
    use sha2::Digest;
    let data = std::fs::read(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()));
    sha2::Sha256::digest(data).into()
}

/// Polls `f` every 20 ms until it yields `Some`, panicking after `within` with `what`.
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
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The status of running node `i`.
pub async fn status(c: &Cluster, i: usize) -> NodeStatus {
    c.nodes[i]
        .node()
        .status()
        .await
        .unwrap_or_else(|e| panic!("status of node {i}: {e}"))
}

/// Fetch tasks of `NodeHandle::fetch_and_wait`, by node index.
pub type FetchTasks = Vec<(usize, tokio::task::JoinHandle<Result<f64, String>>)>;

/// Waits for each fetch task (each within `within`), failing on a timeout or an error, then
/// checks every fetching node's copy of `id` is bit-exact with `file`.
pub async fn fetched_bit_exact(
    c: &Cluster,
    tasks: FetchTasks,
    id: &ImageId,
    file: &Path,
    within: Duration,
) {
    let mut nodes = Vec::new();
    for (i, t) in tasks {
        tokio::time::timeout(within, t)
            .await
            .unwrap_or_else(|_| panic!("host {i} did not finish"))
            .unwrap()
            .unwrap_or_else(|e| panic!("host {i} failed: {e}"));
        nodes.push(i);
    }
    let want = file_hash(file);
    for i in nodes {
        assert_eq!(
            file_hash(&c.nodes[i].node().store().image_path(id)),
            want,
            "host {i} is not bit-exact"
        );
    }
}

/// The ordinary (uncertified) hosts among `nodes`.
pub fn ordinary(c: &Cluster, nodes: &[usize]) -> Vec<usize> {
    nodes
        .iter()
        .copied()
        .filter(|&i| !c.nodes[i].is_bridgehead())
        .collect()
}

/// Bytes actually allocated on disk for a file (sparse files allocate less than their length).
pub fn allocated(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("stat {}: {e}", p.display()))
        .blocks()
        * 512
}

/// Logs to stderr when `RUST_LOG` is set (e.g. `RUST_LOG=bids_node=debug`), for debugging a
/// failing test; silent otherwise.
pub fn init_logs() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

/// A tmpfs of a given size mounted on a fresh temporary directory, unmounted on drop: a real
/// small file system for a node's store to fill. Mounting needs root (as in CI).
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// None, after saying why `test` is skipped, where this process may not mount.
    pub fn mount(bytes: u64, test: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().expect("temp dir");
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("SKIPPED {test}: cannot mount a tmpfs here (needs root)");
            return None;
        }
        Some(Tmpfs { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}
