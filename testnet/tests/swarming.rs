//! LAN swarming inside a receiving IDC, in process: the bridgehead sends each chunk into its
//! LAN about once and the hosts trade the rest among themselves, even when host links are
//! only twice the WAN rate and the IDC has many hosts.

mod common;

use bids_protocols::gis::ImageQuery;
use bids_protocols::{ImageRef, Policy};
use bids_testnet::cluster::{Cluster, ClusterSpec, IdcSpec};
use common::{file_hash, idc, image_file, ordinary, status, CHUNK, MIB};
use std::time::Duration;

/// A (one holder, one bridgehead) and B (`hosts` hosts and one bridgehead) under BIDS, every
/// WAN uplink `wan` bytes/s each way with 5 ms of delay, every host link `lan`.
async fn two_idcs(wan: u64, lan: u64, hosts: usize) -> Cluster {
    let shaped = |spec: IdcSpec| IdcSpec {
        wan_bps: wan,
        wan_delay: Duration::from_millis(5),
        lan_bps: lan,
        ..spec
    };
    Cluster::start(ClusterSpec {
        idcs: vec![shaped(idc("A", 1, 1)), shaped(idc("B", hosts, 1))],
        policy: Policy::Bids,
        shaped: true,
    })
    .await
    .expect("cluster")
}

/// Issue 17, test: A (one holder, one bridgehead) serves B (one bridgehead and 12 hosts) over
/// a 2 MB/s WAN; every B link is 4 MB/s each way. All of B fetches at once. Every copy is
/// bit-exact and B's bridgehead uploads at most 1.5 × the image into its LAN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridgehead_sends_each_chunk_into_its_lan_about_once() {
    common::init_logs();
    let size = 8 * MIB;
    let (file, _guard) = image_file(size, 71, false);
    let wan = 2_000_000;
    let c = two_idcs(wan, 2 * wan, 12).await;
    let holder = ordinary(&c, &c.idc_nodes("A"))[0];
    let image: ImageRef = "swarm:1".parse().unwrap();
    let m = c.seed(holder, &file, &image, CHUNK).await.expect("seeding");
    let b = c.idc_nodes("B");
    let bridgehead = *b
        .iter()
        .find(|&&i| c.nodes[i].is_bridgehead())
        .expect("B has a bridgehead");
    let started = std::time::Instant::now();
    let times = c
        .fetch_all(&b, &image, Duration::from_secs(90))
        .await
        .expect("every node of B fetches");
    let took = started.elapsed().as_secs_f64();

    let want = file_hash(&file);
    // What B's hosts sent, and received from their bridgehead and from each other.
    let (mut sent, mut from_bridgehead, mut from_hosts) = (0, 0, 0);
    for &i in &b {
        assert_eq!(
            file_hash(&c.nodes[i].node().store().image_path(&m.id())),
            want,
            "node {i} of B is not bit-exact"
        );
        if i != bridgehead {
            let t = status(&c, i).await.total;
            assert_eq!(t.wan_recv_bytes, 0, "host {i} crossed the WAN");
            assert_eq!(
                t.lan_recv_bytes,
                t.bridgehead_recv_bytes + t.hosts_recv_bytes,
                "host {i}: LAN bytes by kind of peer do not add up"
            );
            sent += t.lan_sent_bytes;
            from_bridgehead += t.bridgehead_recv_bytes;
            from_hosts += t.hosts_recv_bytes;
        }
    }
    let st = status(&c, bridgehead).await.total;
    let upload = st.lan_sent_bytes as f64 / size as f64;
    let bound = size as f64 / wan as f64;
    let last = times.iter().copied().fold(0.0, f64::max);
    let x = |n: u64| n as f64 / size as f64;
    eprintln!(
        "B's bridgehead LAN upload {upload:.2} x S; B's hosts sent {:.2} x S, received {:.2} x S \
         from the bridgehead and {:.2} x S from each other; WAN into B {:.3} x S; last host \
         {last:.1} s = {:.2} x S/B_wan ({took:.1} s in all); the bridgehead received {:.2} x S from \
         hosts",
        x(sent),
        x(from_bridgehead),
        x(from_hosts),
        x(st.wan_recv_bytes),
        last / bound,
        x(st.hosts_recv_bytes),
    );
    assert_eq!(
        st.lan_sent_bytes, st.hosts_sent_bytes,
        "the bridgehead's LAN upload all went to ordinary hosts"
    );
    assert_eq!(
        from_bridgehead, st.lan_sent_bytes,
        "what the hosts received from their bridgehead is what it sent them"
    );
    assert!(
        upload <= 1.5,
        "B's bridgehead uploaded {upload:.2} x the image into its LAN (goal <= 1.5)"
    );
    let q = ImageQuery::Id(m.id());
    let list = c.lookup("B", &q).await.expect("lookup");
    assert!(
        list.level0.len() >= b.len() - 1,
        "B's hosts are listed as holders"
    );
    c.shutdown().await;
}

/// Hosts of one IDC that start fetching together are in none of each other's first host
/// lists (each asks the GIS before the others have said they are fetching), and gossip names
/// an announcing peer but not its address. A host that hears a LAN peer it cannot reach
/// asks the GIS again at once: here the hosts refresh their host lists only every 10
/// minutes, and still every host of B ends up linked to every other node of B and takes
/// chunks from the other hosts, not only from its bridgehead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_that_start_together_find_each_other() {
    common::init_logs();
    let size = 4 * MIB;
    let (file, _guard) = image_file(size, 72, false);
    let wan = 2_000_000;
    let mut c = two_idcs(wan, 4 * wan, 8).await;
    let b = c.idc_nodes("B");
    let hosts = ordinary(&c, &b);
    for &i in &hosts {
        c.restart_node_with(i, |cfg| cfg.lookup_refresh = Duration::from_secs(600))
            .await
            .expect("restarting a host");
    }
    c.wait_registered(Duration::from_secs(20))
        .await
        .expect("registered");
    let holder = ordinary(&c, &c.idc_nodes("A"))[0];
    let image: ImageRef = "together:1".parse().unwrap();
    let m = c.seed(holder, &file, &image, CHUNK).await.expect("seeding");
    c.fetch_all(&b, &image, Duration::from_secs(60))
        .await
        .expect("every node of B fetches");
    let want = file_hash(&file);
    for &i in &hosts {
        assert_eq!(
            file_hash(&c.nodes[i].node().store().image_path(&m.id())),
            want,
            "host {i} of B is not bit-exact"
        );
        let st = status(&c, i).await;
        assert_eq!(
            st.connected_peers,
            b.len() - 1,
            "host {i} is linked to {} of the {} other nodes of B",
            st.connected_peers,
            b.len() - 1
        );
        assert!(
            st.total.hosts_recv_bytes > 0,
            "host {i} took nothing from the other hosts of B"
        );
    }
    c.shutdown().await;
}
