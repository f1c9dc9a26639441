//! Failures in a running cluster: a host killed mid-download resumes with only its missing
//! chunks, a peer serving corrupted chunks corrupts nobody, a bridgehead that dies
//! mid-transfer is replaced by the other certified bridgehead of its IDC, and a GIS killed
//! mid-distribution is rejoined by every node once it is back; a full disk stops a download
//! without blaming the senders.

mod common;

use bids_gis::admin_client::AdminClient;
use bids_protocols::gis::ImageQuery;
use bids_protocols::{ImageId, ImageRef, ObjectKind, Policy};
use bids_testnet::cluster::{Cluster, ClusterSpec, IdcSpec};
use common::{file_hash, idc, image_file, ordinary, status, wait_for, CHUNK, MIB};
use std::collections::BTreeSet;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

/// Issue 3, test 3: on a slow LAN, a host is killed once it holds some chunks, restarted on
/// its store, and asked again: it completes bit-exact and receives only the chunks its store
/// did not hold after reopening.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_host_resumes_with_only_its_missing_chunks() {
    common::init_logs();
    let size = 16 * MIB;
    let (file, _guard) = image_file(size, 31, false);
    let mut c = Cluster::start(ClusterSpec {
        idcs: vec![IdcSpec {
            lan_bps: 8_000_000,
            ..idc("A", 2, 0)
        }],
        policy: Policy::Bids,
        shaped: true,
    })
    .await
    .expect("cluster");
    let (holder, host) = (0, 1);
    let image: ImageRef = "resume:1".parse().unwrap();
    let m = c.seed(holder, &file, &image, CHUNK).await.expect("seeding");
    let (id, total) = (m.id(), m.chunk_count());

    let progress = c.nodes[host]
        .node()
        .fetch(ImageQuery::Ref(image.clone()))
        .await
        .expect("fetch starts");
    let held_at_kill = wait_for("a quarter of the chunks", Duration::from_secs(20), || {
        let held = c.nodes[host]
            .node()
            .store()
            .status(&id)
            .map_or(0, |s| s.held);
        async move { (held >= total / 4).then_some(held) }
    })
    .await;
    assert!(
        held_at_kill < total,
        "the download finished before the kill ({held_at_kill} of {total}); slow the LAN down"
    );
    drop(progress);
    c.kill_node(host).await;

    c.start_node(host).await.expect("restart");
    c.wait_registered(Duration::from_secs(10))
        .await
        .expect("registered again");
    let held_at_restart = c.nodes[host]
        .node()
        .store()
        .status(&id)
        .expect("the store remembers the image")
        .held;
    assert!(
        held_at_restart > 0 && held_at_restart < total,
        "after reopening the store holds {held_at_restart} of {total} chunks"
    );
    let missing = (total - held_at_restart) as u64;
    // The node keeps its counters in the store across restarts: count from here.
    let t0 = status(&c, host).await.total;
    let before = t0.lan_recv_chunks + t0.wan_recv_chunks;

    c.fetch_all(&[host], &image, Duration::from_secs(30))
        .await
        .expect("the restarted host completes");
    assert_eq!(
        file_hash(&c.nodes[host].node().store().image_path(&id)),
        file_hash(&file),
        "the resumed copy is not bit-exact"
    );
    let t = status(&c, host).await.total;
    let received = t.lan_recv_chunks + t.wan_recv_chunks - before;
    eprintln!(
        "killed holding {held_at_kill} of {total} chunks, {held_at_restart} after reopening; \
         received {received} after the restart"
    );
    assert!(
        received >= missing && received <= missing + 2,
        "received {received} chunks after the restart, {missing} were missing"
    );
    c.shutdown().await;
}

/// Imports `file` into node `i`'s store and flips one byte in every data chunk of the stored
/// copy (the store does not re-hash what it serves), then publishes it.
async fn seed_corrupted(
    c: &Cluster,
    i: usize,
    file: &std::path::Path,
    image: &ImageRef,
) -> ImageId {
    let h = c.nodes[i].node().clone();
    let store = h.store().clone();
    let (f, r) = (file.to_path_buf(), image.clone());
    let m = tokio::task::spawn_blocking(move || {
        store.import(&f, &r, CHUNK, None, ObjectKind::Image, &mut |_, _| {})
    })
    .await
    .unwrap()
    .expect("import");
    let id = m.id();
    let stored = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(h.store().image_path(&id))
        .expect("opening the stored image");
    for idx in (0..m.chunk_count()).filter(|&x| !m.chunks[x as usize].zero) {
        let at = m.chunk_offset(idx) + m.chunk_len(idx) as u64 / 2;
        let mut b = [0u8; 1];
        stored.read_exact_at(&mut b, at).unwrap();
        stored.write_all_at(&[!b[0]], at).unwrap();
    }
    drop(stored);
    let served = h.store().read_chunk(&id, 0).unwrap();
    assert_ne!(
        bids_protocols::manifest::sha256(&served),
        m.chunks[0].sha256,
        "tampering did not change what the node serves"
    );
    h.imported(id).await.unwrap();
    c.wait_listed(i, &ImageQuery::Id(id), Duration::from_secs(20))
        .await
        .expect("the corrupt holder is listed");
    id
}

/// Issue 3, test 4: the only source at first serves corrupted chunks; the hosts detect them,
/// penalise it, and complete bit-exact from an honest holder that appears later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_chunks_are_detected_and_fetched_elsewhere() {
    common::init_logs();
    let size = 8 * MIB;
    let (file, _guard) = image_file(size, 41, false);
    let c = Cluster::start(ClusterSpec {
        idcs: vec![idc("A", 5, 0)],
        policy: Policy::Bids,
        shaped: false,
    })
    .await
    .expect("cluster");
    let (bad, honest, fetchers) = (0, 1, vec![2, 3, 4]);
    let image: ImageRef = "corrupt:1".parse().unwrap();
    let id = seed_corrupted(&c, bad, &file, &image).await;

    let mut tasks = Vec::new();
    for &i in &fetchers {
        let n = c.nodes[i].node().clone();
        let q = ImageQuery::Ref(image.clone());
        tasks.push((i, tokio::spawn(async move { n.fetch_and_wait(q).await })));
    }
    // With the corrupt holder as the only source, every fetcher must see bad chunks.
    for &i in &fetchers {
        wait_for("a bad chunk detected", Duration::from_secs(15), || async {
            (status(&c, i).await.total.bad_chunks > 0).then_some(())
        })
        .await;
    }
    // An honest holder appears; the hosts find it through the GIS and complete.
    c.seed(honest, &file, &image, CHUNK)
        .await
        .expect("seeding the honest holder");
    for (i, t) in tasks {
        tokio::time::timeout(Duration::from_secs(30), t)
            .await
            .unwrap_or_else(|_| panic!("node {i} did not finish"))
            .unwrap()
            .unwrap_or_else(|e| panic!("node {i} failed: {e}"));
    }
    let want = file_hash(&file);
    let mut bad_chunks = 0;
    for &i in &fetchers {
        assert_eq!(
            file_hash(&c.nodes[i].node().store().image_path(&id)),
            want,
            "node {i} is not bit-exact"
        );
        bad_chunks += status(&c, i).await.total.bad_chunks;
    }
    let honest_sent = status(&c, honest).await.total.lan_sent_chunks;
    eprintln!("{bad_chunks} corrupt chunks detected; the honest holder served {honest_sent}");
    assert!(honest_sent > 0, "the honest holder served nothing");
    // The corrupt holder still holds bad data: the good copies came from elsewhere.
    assert_ne!(
        file_hash(&c.nodes[bad].node().store().image_path(&id)),
        want
    );
    c.shutdown().await;
}

/// Issue 3, test 5: IDC B has two certified bridgeheads; the one the GIS chose for the image
/// dies mid-transfer over a slow WAN, and the other takes over: B's hosts complete bit-exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_bridgehead_is_replaced_by_another() {
    common::init_logs();
    let size = 16 * MIB;
    let (file, _guard) = image_file(size, 51, false);
    let wan = |spec: IdcSpec| IdcSpec {
        wan_bps: 4_000_000,
        wan_delay: Duration::from_millis(5),
        ..spec
    };
    let mut c = Cluster::start(ClusterSpec {
        idcs: vec![wan(idc("A", 1, 1)), wan(idc("B", 3, 2))],
        policy: Policy::Bids,
        shaped: true,
    })
    .await
    .expect("cluster");
    let holder = ordinary(&c, &c.idc_nodes("A"))[0];
    let image: ImageRef = "failover:1".parse().unwrap();
    let m = c.seed(holder, &file, &image, CHUNK).await.expect("seeding");
    let (id, total) = (m.id(), m.chunk_count());
    let b = c.idc_nodes("B");
    let hosts = ordinary(&c, &b);
    let bridgeheads: Vec<usize> = b
        .iter()
        .copied()
        .filter(|&i| c.nodes[i].is_bridgehead())
        .collect();
    assert_eq!(bridgeheads.len(), 2);

    // The bridgehead the GIS chose for this image in B.
    let list = c.lookup("B", &ImageQuery::Id(id)).await.expect("lookup");
    let chosen = list.level1.first().expect("B has a chosen bridgehead").peer;
    let dead = *bridgeheads
        .iter()
        .find(|&&i| c.nodes[i].peer_id() == chosen)
        .expect("the chosen bridgehead is one of B's");
    let survivor = *bridgeheads.iter().find(|&&i| i != dead).unwrap();

    let mut tasks = Vec::new();
    for &i in &hosts {
        let n = c.nodes[i].node().clone();
        let q = ImageQuery::Ref(image.clone());
        tasks.push((i, tokio::spawn(async move { n.fetch_and_wait(q).await })));
    }
    // Kill it once it has pulled a fifth of the image over the WAN.
    wait_for(
        "the chosen bridgehead to pull a fifth",
        Duration::from_secs(20),
        || async {
            let st = status(&c, dead).await;
            (st.total.wan_recv_bytes >= size / 5).then_some(())
        },
    )
    .await;
    let mut most = 0;
    for &i in &hosts {
        most = most.max(c.nodes[i].node().store().status(&id).map_or(0, |s| s.held));
    }
    assert!(
        most < total,
        "a host completed before the bridgehead died; slow the WAN down"
    );
    c.kill_node(dead).await;

    common::fetched_bit_exact(&c, tasks, &id, &file, Duration::from_secs(45)).await;
    for &i in &hosts {
        assert_eq!(
            status(&c, i).await.total.wan_recv_bytes,
            0,
            "host {i} crossed the WAN itself"
        );
    }
    let st = status(&c, survivor).await;
    eprintln!(
        "bridgehead {dead} died holding {most} chunks at the best host; survivor {survivor} \
         pulled {} WAN bytes",
        st.total.wan_recv_bytes
    );
    assert!(
        st.total.wan_recv_bytes > 0,
        "the surviving bridgehead never crossed the WAN: nobody took over"
    );
    c.shutdown().await;
}

/// Chunks of `id` held by `nodes`, summed.
fn held(c: &Cluster, nodes: &[usize], id: &ImageId) -> u32 {
    nodes
        .iter()
        .map(|&i| c.nodes[i].node().store().status(id).map_or(0, |s| s.held))
        .sum()
}

/// Issue 18, item 1: the GIS is killed during a two-IDC distribution over a slow WAN and
/// restarted 5 s later on the same address and data dir. Downloads go on meanwhile from the
/// peers they know; once the GIS is back every node redials, registers and publishes again
/// (all listed alive, B's hosts as holders, within 10 s); every copy is bit-exact and a
/// host started afterwards fetches the image.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_rejoin_a_restarted_gis_and_downloads_go_on() {
    common::init_logs();
    let size = 12 * MIB;
    let (file, _guard) = image_file(size, 61, false);
    let wan = |spec: IdcSpec| IdcSpec {
        wan_bps: 1_000_000,
        wan_delay: Duration::from_millis(5),
        ..spec
    };
    let mut c = Cluster::start(ClusterSpec {
        idcs: vec![wan(idc("A", 1, 1)), wan(idc("B", 3, 1))],
        policy: Policy::Bids,
        shaped: true,
    })
    .await
    .expect("cluster");
    let holder = ordinary(&c, &c.idc_nodes("A"))[0];
    let image: ImageRef = "gis-restart:1".parse().unwrap();
    let m = c.seed(holder, &file, &image, CHUNK).await.expect("seeding");
    let (id, total) = (m.id(), m.chunk_count());
    let b = c.idc_nodes("B");
    let hosts = ordinary(&c, &b);

    let mut tasks = Vec::new();
    for &i in &hosts {
        let n = c.nodes[i].node().clone();
        let q = ImageQuery::Ref(image.clone());
        tasks.push((i, tokio::spawn(async move { n.fetch_and_wait(q).await })));
    }
    wait_for(
        "B to hold a sixth of the image",
        Duration::from_secs(20),
        || {
            let h = held(&c, &[b[0]], &id);
            async move { (h >= total / 6).then_some(()) }
        },
    )
    .await;
    c.kill_gis().await;
    let held_at_kill = held(&c, &b, &id);
    assert!(
        held_at_kill < total * b.len() as u32,
        "B completed before the GIS died; slow the WAN down"
    );
    // The GIS stays down for 5 s, as in the report (a deliberate outage, not a wait).
    tokio::time::sleep(Duration::from_secs(5)).await;
    let held_in_outage = held(&c, &b, &id);
    assert!(
        held_in_outage > held_at_kill,
        "no chunk moved while the GIS was down ({held_at_kill} chunks held in B at the kill)"
    );
    c.start_gis_at_same_address()
        .await
        .expect("GIS restarts on its address");
    let restarted = Instant::now();

    // Every node is registered (alive) again, and B's hosts are listed as holders.
    let admin = AdminClient::connect(c.gis_addr.clone(), c.admin.clone())
        .await
        .expect("admin client connects");
    let everyone: BTreeSet<_> = c.nodes.iter().map(|n| n.peer_id()).collect();
    wait_for(
        "every node alive at the GIS again",
        Duration::from_secs(10),
        || async {
            let alive: BTreeSet<_> = admin
                .hosts()
                .await
                .ok()?
                .into_iter()
                .filter(|h| h.alive)
                .map(|h| h.peer)
                .collect();
            everyone.is_subset(&alive).then_some(())
        },
    )
    .await;
    let b_peers: BTreeSet<_> = b.iter().map(|&i| c.nodes[i].peer_id()).collect();
    wait_for(
        "B's nodes listed as holders again",
        Duration::from_secs(10).saturating_sub(restarted.elapsed()),
        || async {
            let list = c.lookup("B", &ImageQuery::Id(id)).await.ok()?;
            let listed: BTreeSet<_> = list.level0.iter().map(|e| e.peer).collect();
            b_peers.is_subset(&listed).then_some(())
        },
    )
    .await;
    eprintln!(
        "all nodes back {:?} after the GIS restarted; B held {held_at_kill} chunks at the \
         kill, {held_in_outage} at the restart",
        restarted.elapsed()
    );

    common::fetched_bit_exact(&c, tasks, &id, &file, Duration::from_secs(30)).await;
    // A host that joins now finds the image through the restarted GIS.
    let fresh = c.add_node("B").expect("a new host");
    c.start_node(fresh).await.expect("the new host starts");
    c.fetch_all(&[fresh], &image, Duration::from_secs(20))
        .await
        .expect("the new host fetches");
    assert_eq!(
        file_hash(&c.nodes[fresh].node().store().image_path(&id)),
        file_hash(&file),
        "the new host is not bit-exact"
    );
    c.shutdown().await;
}

/// Issue 18 item 3: a host whose store lives on a 20 MiB tmpfs is asked for a 32 MiB image:
/// the fetch fails at once with "disk full on <store>: needs N more bytes, M free", nothing is
/// requested and nobody is blamed. A 12 MiB image passes that check, and the disk is filled
/// by another writer mid-download: the download stops with the same kind of message, no
/// chunk counts as bad, no holder is penalised, what the store holds verifies, and the node,
/// still up, completes the image bit-exact from the same holders once space is freed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_stops_the_download_without_blaming_the_senders() {
    common::init_logs();
    let Some(tmpfs) = common::Tmpfs::mount(20 * MIB, "full_disk_stops_the_download") else {
        return;
    };
    let (big_file, _g1) = image_file(32 * MIB, 61, false);
    let (file, _g2) = image_file(12 * MIB, 62, false);
    let mut c = Cluster::start(ClusterSpec {
        idcs: vec![idc("A", 3, 0)],
        policy: Policy::Bids,
        shaped: false,
    })
    .await
    .expect("cluster");
    let (holders, host) = ([0, 1], 2);
    let big: ImageRef = "img32:1".parse().unwrap();
    let image: ImageRef = "img12:1".parse().unwrap();
    let mut id = None;
    for h in holders {
        c.seed(h, &big_file, &big, CHUNK).await.expect("seeding");
        id = Some(c.seed(h, &file, &image, CHUNK).await.expect("seeding").id());
    }
    let id = id.unwrap();
    let store_dir = tmpfs.path().join("store");
    c.stop_node(host).await;
    let sd = store_dir.clone();
    c.start_node_with(host, move |cfg| cfg.store_dir = sd)
        .await
        .expect("restart on the tmpfs");
    c.wait_registered(Duration::from_secs(10))
        .await
        .expect("registered");
    let node = c.nodes[host].node().clone();

    // Up front.
    let err = node
        .fetch_and_wait(ImageQuery::Ref(big.clone()))
        .await
        .expect_err("32 MiB cannot fit in 20 MiB");
    eprintln!("up front: {err}");
    let want = format!(
        "disk full on {}: needs {} more bytes, ",
        store_dir.display(),
        32 * MIB
    );
    assert!(err.starts_with(&want), "{err}");
    let st = status(&c, host).await;
    assert_eq!(st.total.bad_chunks, 0);
    assert_eq!(st.total.lan_recv_chunks, 0, "chunks were fetched anyway");

    // Mid-download: slow the download, then let another writer fill the disk.
    node.set_limits(0, 3_000_000).await.unwrap();
    let mut progress = node
        .fetch(ImageQuery::Ref(image.clone()))
        .await
        .expect("12 MiB passes the check");
    wait_for("some chunks", Duration::from_secs(20), || {
        let held = node.store().status(&id).map_or(0, |s| s.held);
        async move { (held >= 8).then_some(()) }
    })
    .await;
    let filler = tmpfs.path().join("filler");
    {
        let free = node.store().free_space().unwrap();
        let f = std::fs::File::create(&filler).unwrap();
        let block = vec![0xa5u8; 64 * 1024];
        let mut left = free.saturating_sub(CHUNK as u64 / 2);
        let mut off = 0;
        while left > 0 {
            let n = left.min(block.len() as u64) as usize;
            if f.write_all_at(&block[..n], off).is_err() {
                break;
            }
            off += n as u64;
            left -= n as u64;
        }
    }
    let reason = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Some(done) = progress.borrow_and_update().done.clone() {
                return done;
            }
            progress.changed().await.expect("node alive");
        }
    })
    .await
    .expect("the download stops")
    .expect_err("the disk is full");
    eprintln!("mid-download: {reason}");
    assert!(
        reason.starts_with(&format!("disk full on {}: needs ", store_dir.display()))
            && reason.contains(" more bytes, ")
            && reason.contains(" free"),
        "{reason}"
    );
    let st = status(&c, host).await;
    assert_eq!(st.total.bad_chunks, 0, "a full disk counted as bad chunks");
    assert_eq!(st.bad_chunks_served_to_us, 0);
    let held = node.store().status(&id).unwrap();
    assert!(!held.complete && held.held > 0, "{held:?}");
    let s = node.store().clone();
    let bad = tokio::task::spawn_blocking(move || s.verify(&id, &mut |_, _| {}))
        .await
        .unwrap()
        .unwrap();
    assert!(
        bad.is_empty(),
        "half-written chunks counted as held: {bad:?}"
    );

    // Space again: the same node finishes from the same holders (none was banned).
    std::fs::remove_file(&filler).unwrap();
    node.set_limits(0, 0).await.unwrap();
    let n = node.clone();
    let q = ImageQuery::Ref(image.clone());
    let t = tokio::spawn(async move { n.fetch_and_wait(q).await });
    common::fetched_bit_exact(&c, vec![(host, t)], &id, &file, Duration::from_secs(30)).await;
    c.shutdown().await;
}
