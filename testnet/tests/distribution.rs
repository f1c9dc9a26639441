//! Whole-system distribution across three IDCs, in process: BIDS brings every chunk into each
//! receiving IDC over the WAN once (through its bridgehead) and Baseline does not; a sparse,
//! compressible image travels compressed and stays sparse on every receiving host.

mod common;

use bids_protocols::{ImageId, ImageRef, Policy};
use bids_testnet::cluster::{Cluster, ClusterSpec};
use common::{allocated, file_hash, idc, image_file, ordinary, status, CHUNK, KIB, MIB};
use std::path::Path;
use std::time::Duration;

/// WAN payload bytes received by the nodes of each receiving IDC in one run.
struct Run {
    /// (IDC, WAN bytes received by its nodes).
    wan_in: Vec<(String, u64)>,
    /// WAN bytes received by each ordinary host of the receiving IDCs.
    host_wan: Vec<(usize, u64)>,
}

/// A holds the image (one holder, one bridgehead); B and C (one bridgehead and three hosts
/// each) fetch it on every node at once. Every copy is checked bit-exact.
async fn three_idcs(policy: Policy, file: &Path, size: u64) -> Run {
    common::init_logs();
    let c = Cluster::start(ClusterSpec {
        idcs: vec![idc("A", 1, 1), idc("B", 3, 1), idc("C", 3, 1)],
        policy,
        shaped: false,
    })
    .await
    .expect("cluster");
    // Before any image: under BIDS each bridgehead keeps a link to the other two IDCs'
    // bridgeheads (the GIS lists them in its answers to heartbeats); ordinary hosts, and
    // everyone under Baseline, have none.
    for i in 0..c.nodes.len() {
        let st = status(&c, i).await;
        let want = if policy == Policy::Bids && c.nodes[i].is_bridgehead() {
            2
        } else {
            0
        };
        assert_eq!(
            st.wan_links, want,
            "{policy}: WAN links of node {i} ({})",
            st.idc
        );
    }
    let holder = ordinary(&c, &c.idc_nodes("A"))[0];
    let image: ImageRef = "dist:1".parse().unwrap();
    let m = c.seed(holder, file, &image, CHUNK).await.expect("seeding");
    assert_eq!(m.size, size);
    let receivers: Vec<usize> = ["B", "C"].iter().flat_map(|i| c.idc_nodes(i)).collect();
    c.fetch_all(&receivers, &image, Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("{policy}: {e}"));
    let want = file_hash(file);
    let mut run = Run {
        wan_in: Vec::new(),
        host_wan: Vec::new(),
    };
    for name in ["B", "C"] {
        let mut wan = 0;
        for i in c.idc_nodes(name) {
            let n = c.nodes[i].node();
            assert_eq!(
                file_hash(&n.store().image_path(&m.id())),
                want,
                "{policy}: node {i} of IDC {name} is not bit-exact"
            );
            let st = status(&c, i).await;
            wan += st.total.wan_recv_bytes;
            if !c.nodes[i].is_bridgehead() {
                run.host_wan.push((i, st.total.wan_recv_bytes));
            }
        }
        run.wan_in.push((name.to_string(), wan));
    }
    c.shutdown().await;
    run
}

/// Issue 3, test 1: three IDCs under BIDS, then the same topology under Baseline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bids_enters_each_idc_once_and_baseline_costs_more_wan() {
    let size = 8 * MIB + 4321;
    let (file, _guard) = image_file(size, 21, false);

    let bids = three_idcs(Policy::Bids, &file, size).await;
    for (name, wan) in &bids.wan_in {
        let ratio = *wan as f64 / size as f64;
        assert!(
            (0.99..=1.02).contains(&ratio),
            "BIDS: WAN bytes into IDC {name}: {wan} = {ratio:.3} x the image of {size}"
        );
    }
    for (i, wan) in &bids.host_wan {
        assert_eq!(*wan, 0, "BIDS: ordinary host {i} received {wan} WAN bytes");
    }

    let baseline = three_idcs(Policy::Baseline, &file, size).await;
    let total = |r: &Run| r.wan_in.iter().map(|(_, w)| w).sum::<u64>();
    let (b, z) = (total(&bids), total(&baseline));
    eprintln!(
        "WAN bytes into B and C: BIDS {b} ({:.2} x image), Baseline {z} ({:.2} x image)",
        b as f64 / size as f64,
        z as f64 / size as f64
    );
    assert!(
        z > b,
        "Baseline moved {z} WAN bytes into B and C, BIDS {b}: Baseline should cost more"
    );
}

/// Issue 3, test 6: a sparse, compressible image moves bit-exact, travels compressed (WAN
/// payload far below its size) and its zero chunks stay holes on every receiving host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sparse_image_travels_compressed_and_stays_sparse() {
    common::init_logs();
    let size = 16 * MIB;
    let (file, _guard) = image_file(size, 22, true);
    let c = Cluster::start(ClusterSpec {
        idcs: vec![idc("A", 1, 1), idc("B", 3, 1)],
        policy: Policy::Bids,
        shaped: false,
    })
    .await
    .expect("cluster");
    let holder = ordinary(&c, &c.idc_nodes("A"))[0];
    let image: ImageRef = "sparse:1".parse().unwrap();
    let m = c.seed(holder, &file, &image, CHUNK).await.expect("seeding");
    let id: ImageId = m.id();
    let nonzero: u64 = (0..m.chunk_count())
        .filter(|&i| !m.chunks[i as usize].zero)
        .map(|i| m.chunk_len(i) as u64)
        .sum();
    assert!(
        nonzero < size / 2,
        "the test image should be mostly zeros: {nonzero} of {size} bytes are not"
    );
    let source_alloc = allocated(&c.nodes[holder].node().store().image_path(&id));

    let receivers = c.idc_nodes("B");
    c.fetch_all(&receivers, &image, Duration::from_secs(60))
        .await
        .expect("fetch");
    let want = file_hash(&file);
    let mut wan = 0;
    for &i in &receivers {
        let path = c.nodes[i].node().store().image_path(&id);
        assert_eq!(file_hash(&path), want, "node {i} is not bit-exact");
        let alloc = allocated(&path);
        // Holes stay holes: no more than the non-zero chunks (plus filesystem slack), and no
        // more than the holder's own sparse copy (plus 10 %).
        assert!(
            alloc <= nonzero + 256 * KIB,
            "node {i} allocates {alloc} bytes for {nonzero} non-zero bytes"
        );
        assert!(
            alloc as f64 <= 1.1 * source_alloc as f64 + (64 * KIB) as f64,
            "node {i} allocates {alloc} bytes, the holder {source_alloc}"
        );
        wan += status(&c, i).await.total.wan_recv_bytes;
    }
    eprintln!(
        "sparse image of {size} bytes ({nonzero} non-zero, holder allocates {source_alloc}): \
         {wan} WAN payload bytes into B"
    );
    assert!(wan > 0, "nothing crossed the WAN into B");
    assert!(
        (wan as f64) < 0.5 * size as f64,
        "WAN payload into B: {wan} bytes for a sparse image of {size}"
    );
    c.shutdown().await;
}
