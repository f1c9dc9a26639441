//! Versions and delta files across IDCs: a new version published with its delta in one IDC
//! reaches the hosts of another IDC that hold the old version as (about) one delta over the
//! WAN, rebuilt bit-exactly; a delta that rebuilds something else is refused.

use bids_node::versions::{self, Route, VersionError};
use bids_node::NodeHandle;
use bids_protocols::gis::{GisRequest, GisResponse, Holding, ImageQuery};
use bids_protocols::{ImageId, ImageRef, ObjectKind, Policy};
use bids_testnet::cluster::{Cluster, ClusterSpec, IdcSpec};
use rand::{Rng, RngCore, SeedableRng};
use sha2::Digest;
use std::path::{Path, PathBuf};
use std::time::Duration;

const MIB: usize = 1 << 20;
const CHUNK: u32 = 256 * 1024;
const BLOCK: usize = 4096;

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

/// v1: 16 MiB of random bytes. v2: v1 with a few rewritten and moved 4 KiB blocks and
/// 1 MiB appended, as a package update changes a disk image.
fn make_versions(dir: &Path) -> (PathBuf, PathBuf, Vec<u8>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut v1 = vec![0u8; 16 * MIB];
    rng.fill_bytes(&mut v1);
    let mut v2 = v1.clone();
    let blocks = v1.len() / BLOCK;
    for _ in 0..8 {
        let b = rng.gen_range(0..blocks) * BLOCK;
        rng.fill_bytes(&mut v2[b..b + BLOCK]);
    }
    for _ in 0..4 {
        let (from, to) = (rng.gen_range(0..blocks), rng.gen_range(0..blocks));
        v2.copy_within(from * BLOCK..(from + 1) * BLOCK, to * BLOCK);
    }
    let mut tail = vec![0u8; MIB];
    rng.fill_bytes(&mut tail);
    v2.extend_from_slice(&tail);
    let (f1, f2) = (dir.join("v1.img"), dir.join("v2.img"));
    std::fs::write(&f1, &v1).unwrap();
    std::fs::write(&f2, &v2).unwrap();
    (f1, f2, v2)
}

fn sha(p: &Path) -> Vec<u8> {
    sha2::Sha256::digest(std::fs::read(p).unwrap()).to_vec()
}

async fn import(node: &NodeHandle, file: &Path, image: &str, base: Option<&str>) -> ImageId {
    let store = node.store().clone();
    let (f, r) = (file.to_path_buf(), image.parse::<ImageRef>().unwrap());
    let base = base.map(|b| b.parse::<ImageRef>().unwrap());
    let m = tokio::task::spawn_blocking(move || {
        store.import(&f, &r, CHUNK, base, ObjectKind::Image, &mut |_, _| {})
    })
    .await
    .unwrap()
    .unwrap();
    node.imported(m.id()).await.unwrap();
    m.id()
}

/// Publishes a complete object of the node's store and waits for the GIS's answer.
async fn publish_now(node: &NodeHandle, id: ImageId) {
    let m = node.store().manifest(&id).unwrap();
    let req = GisRequest::Publish {
        holding: Holding {
            image: id,
            chunks_held: m.chunk_count(),
            complete: true,
            fetching: false,
        },
        manifest: m.to_bytes(),
    };
    match node.gis_request(req).await.unwrap() {
        GisResponse::Ack { .. } => {}
        other => panic!("publish refused: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_version_crosses_the_wan_as_one_delta() {
    let spec = ClusterSpec {
        idcs: vec![idc("A", 1, 1), idc("B", 3, 1)],
        policy: Policy::Bids,
        shaped: false,
    };
    let c = Cluster::start(spec).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (f1, f2, v2) = make_versions(dir.path());
    let publisher = c
        .idc_nodes("A")
        .into_iter()
        .find(|&i| !c.nodes[i].is_bridgehead())
        .unwrap();
    let pnode = c.nodes[publisher].node().clone();
    let v1_id = import(&pnode, &f1, "os:1", None).await;
    let b_nodes = c.idc_nodes("B");
    for &i in &b_nodes {
        assert_eq!(import(c.nodes[i].node(), &f1, "os:1", None).await, v1_id);
    }

    let nv = versions::publish(
        &pnode,
        f2.clone(),
        "os:2".parse().unwrap(),
        "os:1".parse().unwrap(),
        0,
    )
    .await
    .unwrap();
    assert!(nv.published);
    assert_eq!(
        (nv.from_id, nv.delta.to_string()),
        (v1_id, "os:1-to-2".to_string())
    );
    assert!(
        (nv.delta_size as usize) < v2.len() / 10,
        "delta of {} bytes for an image of {}",
        nv.delta_size,
        v2.len()
    );

    let mut tasks = Vec::new();
    for &i in &b_nodes {
        let n = c.nodes[i].node().clone();
        let q = ImageQuery::Ref("os:2".parse().unwrap());
        tasks.push(tokio::spawn(
            async move { versions::fetch_version(&n, q).await },
        ));
    }
    for t in tasks {
        let got = tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("upgrade timed out")
            .unwrap()
            .expect("upgrade failed");
        assert_eq!(got.id, nv.id);
        match got.route {
            Route::Deltas { base, steps, .. } => {
                assert_eq!(base, v1_id);
                assert_eq!(steps, vec![nv.delta_id]);
            }
            Route::Whole => panic!("a host fetched the whole image instead of the delta"),
        }
    }

    let want = sha2::Sha256::digest(&v2).to_vec();
    let mut wan = 0u64;
    for &i in &b_nodes {
        let n = c.nodes[i].node();
        let store = n.store();
        let st = store.status(&nv.id).expect("v2 is in the store");
        assert!(st.complete, "node {i}: v2 incomplete");
        assert_eq!(st.base, Some("os:1".parse().unwrap()));
        assert_eq!(sha(&store.image_path(&nv.id)), want, "node {i}: v2 differs");
        // The store keeps v1, the delta and v2 whole.
        assert!(store.status(&nv.delta_id).is_some_and(|s| s.complete));
        assert!(store.status(&v1_id).is_some_and(|s| s.complete));
        wan += n.status().await.unwrap().total.wan_recv_bytes;
    }
    // Exported like any image.
    let out = dir.path().join("export.img");
    let n0 = c.nodes[b_nodes[0]].node();
    n0.store().export(&nv.id, &out, &mut |_, _| {}).unwrap();
    assert_eq!(sha(&out), want);
    // Kept as one image file and a delta file only: v2 is rebuilt from v1 and the delta.
    let v2_ref: ImageRef = "os:2".parse().unwrap();
    n0.store().remove(&nv.id).unwrap();
    assert!(n0.store().resolve(&v2_ref).is_none());
    let out2 = dir.path().join("export-from-deltas.img");
    let from = bids_node::versions::export(n0.store(), &v2_ref, &out2).unwrap();
    assert_eq!(
        from,
        bids_node::versions::ExportSource::Deltas {
            base: "os:1".parse().unwrap(),
            deltas: vec![delta_ref_of(n0.store(), &nv.delta_id)],
        }
    );
    assert_eq!(sha(&out2), want);
    // Without the base nothing can be rebuilt: a clear error, no file.
    let out3 = dir.path().join("no-base.img");
    n0.store().remove(&v1_id).unwrap();
    let err = bids_node::versions::export(n0.store(), &v2_ref, &out3).unwrap_err();
    assert!(err.to_string().contains("os:2"), "{err}");
    assert!(!out3.exists());

    let ratio = wan as f64 / nv.delta_size as f64;
    println!(
        "WAN bytes into B: {wan} for a delta of {} bytes (ratio {ratio:.4}); v2 is {} bytes ({:.2} % of it crossed)",
        nv.delta_size,
        v2.len(),
        100.0 * wan as f64 / v2.len() as f64
    );
    assert!(
        wan as f64 <= 1.05 * nv.delta_size as f64 + 16.0 * 1024.0,
        "WAN bytes into B: {wan} for a delta of {}",
        nv.delta_size
    );
    assert!(
        wan > 0,
        "nothing crossed the WAN: the delta cannot have arrived"
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delta_that_rebuilds_another_image_is_refused() {
    let spec = ClusterSpec {
        idcs: vec![idc("A", 2, 0)],
        policy: Policy::Bids,
        shaped: false,
    };
    let c = Cluster::start(spec).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (f1, f2, v2) = make_versions(dir.path());
    // `other` is v2 with one more block changed: the delta below rebuilds it, not v2.
    let mut other = v2.clone();
    other[4096..8192].fill(7);
    let fo = dir.path().join("other.img");
    std::fs::write(&fo, &other).unwrap();

    let (a, b) = (c.nodes[0].node().clone(), c.nodes[1].node().clone());
    let v1_id = import(&a, &f1, "os:1", None).await;
    assert_eq!(import(&b, &f1, "os:1", None).await, v1_id);
    let v2_id = import(&a, &f2, "os:2", Some("os:1")).await;
    publish_now(&a, v2_id).await;
    // A delta labelled v1 → v2 whose content rebuilds `other`.
    let bad = dir.path().join("bad.delta");
    bids_delta::build(&f1, &fo, &bad, &Default::default()).unwrap();
    let store = a.store().clone();
    let dm = tokio::task::spawn_blocking(move || {
        store.import(
            &bad,
            &"os:1-to-2".parse().unwrap(),
            CHUNK,
            Some("os:1".parse().unwrap()),
            ObjectKind::Delta {
                from: v1_id,
                to: v2_id,
            },
            &mut |_, _| {},
        )
    })
    .await
    .unwrap()
    .unwrap();
    publish_now(&a, dm.id()).await;

    let e = tokio::time::timeout(
        Duration::from_secs(60),
        versions::fetch_version(&b, ImageQuery::Ref("os:2".parse().unwrap())),
    )
    .await
    .expect("upgrade timed out")
    .unwrap_err();
    match &e {
        VersionError::IdMismatch {
            expected, actual, ..
        } => {
            assert_eq!(*expected, v2_id);
            assert_ne!(*actual, v2_id);
        }
        other => panic!("expected an id mismatch, got {other}"),
    }
    // Nothing kept: neither v2 nor the bad delta, no scratch files.
    let sb = b.store();
    assert_eq!(sb.resolve(&"os:2".parse().unwrap()), None);
    assert!(sb.status(&dm.id()).is_none());
    assert_eq!(sb.list().len(), 1);
    let scratch: Vec<_> = std::fs::read_dir(sb.dir().join("tmp"))
        .map(|d| d.collect())
        .unwrap_or_default();
    assert!(scratch.is_empty(), "scratch files left: {scratch:?}");

    // The control socket's path falls back to the whole image and gets v2 right.
    let mut rx = versions::fetch(&b, ImageQuery::Ref("os:2".parse().unwrap()))
        .await
        .unwrap();
    let done = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if let Some(d) = rx.borrow().done.clone() {
                return d;
            }
            if rx.changed().await.is_err() {
                return Err("node stopped".to_string());
            }
        }
    })
    .await
    .expect("fallback fetch timed out");
    done.expect("fallback fetch failed");
    assert_eq!(
        sha(&sb.image_path(&v2_id)),
        sha2::Sha256::digest(&v2).to_vec()
    );
    c.shutdown().await;
}

fn delta_ref_of(store: &bids_node::store::Store, id: &ImageId) -> ImageRef {
    store.status(id).expect("the delta is held").image
}
