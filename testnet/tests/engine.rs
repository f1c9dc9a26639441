//! In-process multi-IDC tests of the distribution engine: real nodes, real GIS, loopback.

use bids_protocols::gis::ImageQuery;
use bids_protocols::{ImageId, ImageRef, ObjectKind, Policy};
use bids_testnet::cluster::{Cluster, ClusterSpec, IdcSpec};
use bids_testnet::demo::make_image;
use std::time::Duration;

fn idc(name: &str, hosts: usize, bridgeheads: usize) -> IdcSpec {
    IdcSpec {
        name: name.into(),
        hosts,
        bridgeheads,
        wan_bps: 0,
        wan_delay: Duration::ZERO,
        lan_bps: 0,
    }
}

async fn seed(
    c: &Cluster,
    node: usize,
    size: u64,
    chunk: u32,
    sparse: bool,
) -> (ImageRef, ImageId, std::path::PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("img");
    make_image(&file, size, 7, sparse).unwrap();
    let image: ImageRef = "test:1".parse().unwrap();
    let h = c.nodes[node].node().clone();
    let store = h.store().clone();
    let (f, i) = (file.clone(), image.clone());
    let m = tokio::task::spawn_blocking(move || {
        store.import(&f, &i, chunk, None, ObjectKind::Image, &mut |_, _| {})
    })
    .await
    .unwrap()
    .unwrap();
    h.imported(m.id()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    (image, m.id(), file, dir)
}

/// Waits for every fetch (60 s at most each); each must succeed.
async fn wait_fetches(tasks: Vec<tokio::task::JoinHandle<Result<f64, String>>>) {
    for t in tasks {
        let r = tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("fetch timed out")
            .unwrap();
        r.expect("fetch failed");
    }
}

fn file_hash(p: &std::path::Path) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(std::fs::read(p).unwrap()).to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bids_distributes_through_bridgeheads() {
    let spec = ClusterSpec {
        idcs: vec![idc("A", 1, 1), idc("B", 3, 1)],
        policy: Policy::Bids,
        shaped: false,
    };
    let c = Cluster::start(spec).await.unwrap();
    let holder = c
        .idc_nodes("A")
        .into_iter()
        .find(|&i| !c.nodes[i].is_bridgehead())
        .unwrap();
    let size = 6 * 1024 * 1024 + 123;
    let (image, id, file, _d) = seed(&c, holder, size, 256 * 1024, false).await;
    let want = file_hash(&file);
    let mut tasks = Vec::new();
    for i in c.idc_nodes("B") {
        let n = c.nodes[i].node().clone();
        let q = ImageQuery::Ref(image.clone());
        tasks.push(tokio::spawn(async move { n.fetch_and_wait(q).await }));
    }
    wait_fetches(tasks).await;
    let mut wan = 0;
    for i in c.idc_nodes("B") {
        let n = c.nodes[i].node();
        assert_eq!(
            file_hash(&n.store().image_path(&id)),
            want,
            "node {i} differs"
        );
        let st = n.status().await.unwrap();
        wan += st.total.wan_recv_bytes;
        if !c.nodes[i].is_bridgehead() {
            assert_eq!(
                st.total.wan_recv_bytes, 0,
                "an ordinary host received over the WAN"
            );
        }
    }
    assert!(
        wan as f64 <= 1.02 * size as f64,
        "WAN bytes into B: {wan} for an image of {size}"
    );
    assert!(
        wan as f64 >= 0.99 * size as f64,
        "WAN bytes into B: {wan} for an image of {size}"
    );
    c.shutdown().await;
}

/// Several fetches of one image on one node at the same moment: the store is prepared for
/// the download once, off the event loop, and every fetch (those whose host lists arrived
/// while it was being prepared too) follows the same download to the same bit-exact copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetches_that_arrive_while_the_store_is_prepared_share_one_download() {
    let spec = ClusterSpec {
        idcs: vec![idc("A", 3, 0)],
        policy: Policy::Bids,
        shaped: false,
    };
    let c = Cluster::start(spec).await.unwrap();
    let a = c.idc_nodes("A");
    let size = 3 * 1024 * 1024 + 7;
    let (image, id, file, _d) = seed(&c, a[0], size, 256 * 1024, false).await;
    let want = file_hash(&file);
    let n = c.nodes[a[1]].node().clone();
    let mut tasks = Vec::new();
    for k in 0..4 {
        let n = n.clone();
        let q = if k % 2 == 0 {
            ImageQuery::Ref(image.clone())
        } else {
            ImageQuery::Id(id)
        };
        tasks.push(tokio::spawn(async move { n.fetch_and_wait(q).await }));
    }
    wait_fetches(tasks).await;
    assert_eq!(file_hash(&n.store().image_path(&id)), want);
    let st = n.status().await.unwrap();
    assert!(
        st.total.lan_recv_bytes <= size + size / 50,
        "one download, not several: {} bytes received for an image of {size}",
        st.total.lan_recv_bytes
    );
    c.shutdown().await;
}
