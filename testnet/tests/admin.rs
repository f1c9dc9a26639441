//! The admin control path end to end (admin client → GIS → host) in the in-process cluster:
//! commands reach hosts and take effect, only the admin's signed commands relayed by the GIS
//! are obeyed, a bridgehead change takes effect and the old certificate is refused, and a
//! gc dry run lists what the real run removes (after which the GIS forgets the holder).

mod common;

use bids_gis::admin_client::{AdminClient, AdminError};
use bids_protocols::admin::{
    AdminErrorKind, CertStatus, CommandOutcome, GcPolicy, GcRequest, HostCommand, HostInfo,
    SignedCommand,
};
use bids_protocols::gis::{ErrorKind, GisRequest, GisResponse, ImageQuery};
use bids_protocols::{ImageId, ImageRef, Policy, Role};
use bids_testnet::cluster::{issue_cert, Cluster, ClusterSpec};
use common::*;
use libp2p::identity::Keypair;
use libp2p::PeerId;
use std::time::{Duration, Instant};

const WITHIN: Duration = Duration::from_secs(20);

async fn cluster(a_hosts: usize, b_hosts: usize) -> Cluster {
    init_logs();
    Cluster::start(ClusterSpec {
        idcs: vec![idc("A", a_hosts, 1), idc("B", b_hosts, 1)],
        policy: Policy::Bids,
        shaped: false,
    })
    .await
    .expect("cluster")
}

async fn admin_client(c: &Cluster) -> AdminClient {
    AdminClient::connect(c.gis_addr.clone(), c.admin.clone())
        .await
        .expect("admin client connects")
}

/// The GIS's view of one host.
async fn host_info(a: &AdminClient, peer: PeerId) -> HostInfo {
    a.hosts()
        .await
        .expect("hosts")
        .into_iter()
        .find(|h| h.peer == peer)
        .unwrap_or_else(|| panic!("the GIS does not list {peer}"))
}

fn refusal(r: Result<CommandOutcome, AdminError>) -> AdminErrorKind {
    match r {
        Err(AdminError::Refused { kind, .. }) => kind,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// An ordinary host of IDC `name`.
fn ordinary_of(c: &Cluster, name: &str, nth: usize) -> usize {
    ordinary(c, &c.idc_nodes(name))[nth]
}

fn bridgehead_of(c: &Cluster, name: &str) -> usize {
    *c.idc_nodes(name)
        .iter()
        .find(|&&i| c.nodes[i].is_bridgehead())
        .expect("a bridgehead")
}

/// Limits, sharing, fetch and publish ordered through the GIS take effect on the host, the
/// GIS reports the new settings, and a download limit slows the host's download to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_reach_hosts_and_take_effect() {
    let c = cluster(2, 1).await;
    let admin = admin_client(&c).await;
    let (seeder, target) = (ordinary_of(&c, "A", 0), ordinary_of(&c, "A", 1));
    let peer = c.nodes[target].peer_id();

    // Every host is listed, alive, connected, with the settings it reports.
    let hosts = admin.hosts().await.unwrap();
    assert_eq!(hosts.len(), c.nodes.len());
    let h = wait_for("settings in a heartbeat", WITHIN, || async {
        let h = host_info(&admin, peer).await;
        h.settings.is_some().then_some(h)
    })
    .await;
    assert!(h.alive && h.connected);
    assert_eq!(h.idc.to_string(), "A");
    assert_eq!(h.role, Role::Host);
    assert!(h.settings.unwrap().sharing);

    // Limits: applied on the host at once, reported to the GIS at the next heartbeat.
    let rate = 1024 * 1024;
    match admin
        .command(
            peer,
            HostCommand::SetLimits {
                upload_bps: 0,
                download_bps: rate,
            },
        )
        .await
        .unwrap()
    {
        CommandOutcome::Settings(s) => assert_eq!((s.upload_bps, s.download_bps), (0, rate)),
        other => panic!("{other:?}"),
    }
    assert_eq!(status(&c, target).await.settings.download_bps, rate);
    wait_for("the GIS to report the new limit", WITHIN, || async {
        let s = host_info(&admin, peer).await.settings?;
        (s.download_bps == rate).then_some(())
    })
    .await;

    // The host's download follows the limit: 3 MiB of incompressible data at 1 MiB/s.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("limited.raw");
    bids_testnet::demo::make_image(&file, 3 * MIB, 21, false).unwrap();
    let limited: ImageRef = "limited:1".parse().unwrap();
    c.seed(seeder, &file, &limited, CHUNK).await.unwrap();
    let t0 = Instant::now();
    match admin
        .command(
            peer,
            HostCommand::Fetch {
                image: limited.clone(),
            },
        )
        .await
        .unwrap()
    {
        CommandOutcome::Fetching { image, .. } => assert_eq!(image, limited),
        other => panic!("{other:?}"),
    }
    wait_for("the ordered download to complete", WITHIN, || async {
        let st = status(&c, target).await;
        st.images
            .iter()
            .any(|i| i.image == limited && i.complete)
            .then_some(())
    })
    .await;
    let secs = t0.elapsed().as_secs_f64();
    // The token bucket allows a small burst and a chunk of overshoot: well over 2 s still.
    assert!(
        secs >= 1.8,
        "3 MiB at a 1 MiB/s download limit took only {secs:.2} s"
    );

    // Sharing off: the host reports it and serves nothing.
    match admin
        .command(peer, HostCommand::SetSharing { enabled: false })
        .await
        .unwrap()
    {
        CommandOutcome::Settings(s) => assert!(!s.sharing),
        other => panic!("{other:?}"),
    }
    assert!(!status(&c, target).await.settings.sharing);

    // Publish a file that lies on the host.
    let pfile = dir.path().join("published.raw");
    bids_testnet::demo::make_image(&pfile, 512 * KIB, 22, false).unwrap();
    let published: ImageRef = "ordered:1".parse().unwrap();
    let id = match admin
        .command(
            peer,
            HostCommand::Publish {
                file: pfile.display().to_string(),
                image: published.clone(),
                from: None,
                chunk_size: CHUNK,
            },
        )
        .await
        .unwrap()
    {
        CommandOutcome::Published { image, id, delta } => {
            assert_eq!((image, delta), (published.clone(), None));
            id
        }
        other => panic!("{other:?}"),
    };
    wait_for("the GIS to list the published image", WITHIN, || async {
        let imgs = admin.images().await.ok()?;
        let img = imgs.iter().find(|i| i.info.id == id)?;
        img.holders
            .values()
            .flatten()
            .any(|h| h.peer == peer && h.complete)
            .then_some(())
    })
    .await;
    // Publishing a file the host does not have fails on the host, with the reason.
    let r = admin
        .command(
            peer,
            HostCommand::Publish {
                file: dir.path().join("missing.raw").display().to_string(),
                image: "ordered:2".parse().unwrap(),
                from: None,
                chunk_size: 0,
            },
        )
        .await;
    assert_eq!(refusal(r), AdminErrorKind::Failed);

    // Statistics count the WAN/LAN split per IDC from heartbeats.
    let stats = wait_for("LAN bytes in the stats", WITHIN, || async {
        let s = admin.stats().await.ok()?;
        let a = s.idcs.iter().find(|i| i.idc.to_string() == "A")?;
        (a.counters.lan_recv_bytes >= 3 * MIB).then_some(s)
    })
    .await;
    assert_eq!(stats.hosts as usize, c.nodes.len());
    assert_eq!(stats.idcs.len(), 2);
    c.shutdown().await;
}

/// Only the admin may use the control path, and a host obeys only fresh commands signed by
/// the admin and relayed by its GIS: not a stranger's, not a forgery, not a replay, not one
/// sent to it directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_admin_forged_replayed_and_direct_commands_are_refused() {
    let c = cluster(1, 1).await;
    let admin = admin_client(&c).await;
    let target = ordinary_of(&c, "A", 0);
    let peer = c.nodes[target].peer_id();
    let off = HostCommand::SetSharing { enabled: false };

    // A stranger connects fine but is refused everything.
    let stranger = AdminClient::connect(c.gis_addr.clone(), Keypair::generate_ed25519())
        .await
        .unwrap();
    match stranger.hosts().await {
        Err(AdminError::Refused { kind, .. }) => assert_eq!(kind, AdminErrorKind::Forbidden),
        other => panic!("a non-admin listed hosts: {other:?}"),
    }
    assert_eq!(
        refusal(stranger.command(peer, off.clone()).await),
        AdminErrorKind::Forbidden
    );
    match stranger.revoke(1001).await {
        Err(AdminError::Refused { kind, .. }) => assert_eq!(kind, AdminErrorKind::Forbidden),
        other => panic!("a non-admin revoked a certificate: {other:?}"),
    }

    // A command signed by another key that claims to be the admin's.
    let mut forged = SignedCommand::sign(
        &Keypair::generate_ed25519(),
        peer,
        off.clone(),
        bids_protocols::unix_now(),
        1,
    )
    .unwrap();
    forged.body.issuer = admin.admin_peer();
    assert_eq!(
        refusal(admin.signed_command(forged).await),
        AdminErrorKind::BadSignature
    );

    // A genuine command replayed: the host remembers its nonce.
    let genuine =
        SignedCommand::sign(&c.admin, peer, off.clone(), bids_protocols::unix_now(), 7).unwrap();
    admin.signed_command(genuine.clone()).await.unwrap();
    assert_eq!(
        refusal(admin.signed_command(genuine).await),
        AdminErrorKind::Stale
    );

    // A genuine command sent straight to the host, bypassing the GIS.
    c.nodes[target].node().set_sharing(true).await.unwrap();
    let direct = AdminClient::connect(
        c.nodes[target].node().listen_addrs()[0].clone(),
        c.admin.clone(),
    )
    .await
    .unwrap();
    assert_eq!(
        refusal(direct.command(peer, off).await),
        AdminErrorKind::Forbidden
    );
    // None of the refused commands changed anything.
    assert!(status(&c, target).await.settings.sharing);

    // An unregistered target.
    assert_eq!(
        refusal(admin.command(PeerId::random(), HostCommand::DropCert).await),
        AdminErrorKind::UnknownHost
    );
    c.shutdown().await;
}

/// The admin moves IDC A's bridgehead role from its bridgehead to an ordinary host: a new
/// certificate pushed to the host, the old serial revoked, the old bridgehead demoted. The
/// GIS shows the change, the old certificate is refused from then on, and A's next download
/// from B enters through the new bridgehead only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridgehead_change_takes_effect_and_old_cert_is_refused() {
    let c = cluster(2, 1).await;
    let admin = admin_client(&c).await;
    let old = bridgehead_of(&c, "A");
    let new = ordinary_of(&c, "A", 0);
    let fetcher = ordinary_of(&c, "A", 1);
    let old_cert = c.nodes[old].cert.clone().unwrap();
    let (old_peer, new_peer) = (c.nodes[old].peer_id(), c.nodes[new].peer_id());

    // New certificate, pushed to the new bridgehead.
    let cert = issue_cert(
        &c.admin,
        new_peer,
        "A",
        "A-db9",
        9001,
        Duration::from_secs(3600),
    )
    .unwrap();
    match admin
        .command(new_peer, HostCommand::SetCert { cert })
        .await
        .unwrap()
    {
        CommandOutcome::Role { role, serial } => {
            assert_eq!((role, serial), (Role::Bridgehead, Some(9001)))
        }
        other => panic!("{other:?}"),
    }
    // Old serial revoked, old bridgehead demoted.
    admin.revoke(old_cert.body.serial).await.unwrap();
    match admin
        .command(old_peer, HostCommand::DropCert)
        .await
        .unwrap()
    {
        CommandOutcome::Role { role, serial } => assert_eq!((role, serial), (Role::Host, None)),
        other => panic!("{other:?}"),
    }

    let hosts = admin.hosts().await.unwrap();
    let get = |p: PeerId| hosts.iter().find(|h| h.peer == p).unwrap();
    assert_eq!(get(new_peer).role, Role::Bridgehead);
    assert_eq!(
        get(new_peer).cert.as_ref().unwrap().status,
        CertStatus::Valid
    );
    assert_eq!(get(old_peer).role, Role::Host);
    assert!(get(old_peer).cert.is_none());
    assert_eq!(status(&c, new).await.role, Role::Bridgehead);
    assert_eq!(status(&c, old).await.role, Role::Host);

    // The old certificate is refused: by the old bridgehead itself if the admin pushed it
    // again, and by the GIS at registration (asked here under the old bridgehead's identity,
    // after the push, since this second connection of the same peer would race with it).
    assert_eq!(
        refusal(
            admin
                .command(
                    old_peer,
                    HostCommand::SetCert {
                        cert: old_cert.clone()
                    }
                )
                .await
        ),
        AdminErrorKind::BadRequest
    );

    let again = bids_gis::client::request_once(
        c.nodes[old].key.clone(),
        c.gis_addr.clone(),
        GisRequest::Register {
            idc: bids_protocols::Idc::new("A").unwrap(),
            addrs: vec![],
            cert: Some(old_cert.clone()),
            policy: Policy::Bids,
        },
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    match again {
        GisResponse::Error { kind, message } => {
            assert_eq!(kind, ErrorKind::BadCert);
            assert!(message.contains("revoked"), "{message}");
        }
        other => panic!("a revoked certificate was accepted: {other:?}"),
    }
    // An image that only B holds enters A through the new bridgehead.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("b.raw");
    bids_testnet::demo::make_image(&file, 2 * MIB, 31, false).unwrap();
    let image: ImageRef = "from-b:1".parse().unwrap();
    let b_host = ordinary_of(&c, "B", 0);
    c.seed(b_host, &file, &image, CHUNK).await.unwrap();
    c.fetch_all(&[fetcher], &image, WITHIN).await.unwrap();
    let new_wan = status(&c, new).await.total.wan_recv_bytes;
    let old_wan = status(&c, old).await.total.wan_recv_bytes;
    assert!(
        new_wan >= 2 * MIB,
        "the new bridgehead received {new_wan} WAN bytes"
    );
    assert_eq!(old_wan, 0, "the demoted bridgehead still received WAN data");
    c.shutdown().await;
}

/// A gc dry run lists what would go and removes nothing; the real run removes exactly that
/// and the GIS no longer lists the host as a holder of those images.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_dry_run_lists_then_real_run_removes_and_gis_forgets() {
    let c = cluster(1, 0).await;
    let admin = admin_client(&c).await;
    let host = ordinary_of(&c, "A", 0);
    let peer = c.nodes[host].peer_id();
    let dir = tempfile::tempdir().unwrap();
    let mut ids: Vec<ImageId> = Vec::new();
    for n in 1..=3u64 {
        let file = dir.path().join(format!("{n}.raw"));
        bids_testnet::demo::make_image(&file, 256 * KIB, 40 + n, false).unwrap();
        let r: ImageRef = format!("gc:{n}").parse().unwrap();
        ids.push(c.seed(host, &file, &r, CHUNK).await.unwrap().id());
    }
    let gc = |dry_run| {
        HostCommand::Gc(GcRequest {
            policy: GcPolicy::Oldest,
            keep: Some(1),
            free_target: None,
            dry_run,
            seed: 0,
        })
    };

    let dry = match admin.command(peer, gc(true)).await.unwrap() {
        CommandOutcome::Gc(r) => r,
        other => panic!("{other:?}"),
    };
    assert!(dry.dry_run);
    assert_eq!(dry.removed.len(), 2);
    assert_eq!(dry.kept, 1);
    assert!(dry.freed_bytes > 0);
    let listed: Vec<ImageId> = dry.removed.iter().map(|i| i.id).collect();
    assert!(listed.iter().all(|id| ids.contains(id)));
    assert_eq!(
        status(&c, host).await.images.len(),
        3,
        "a dry run removed images"
    );

    let real = match admin.command(peer, gc(false)).await.unwrap() {
        CommandOutcome::Gc(r) => r,
        other => panic!("{other:?}"),
    };
    assert!(!real.dry_run);
    let removed: Vec<ImageId> = real.removed.iter().map(|i| i.id).collect();
    assert_eq!(
        removed, listed,
        "the real run removed something else than the dry run listed"
    );
    let left: Vec<ImageId> = status(&c, host).await.images.iter().map(|i| i.id).collect();
    assert_eq!(left.len(), 1);
    assert!(!removed.contains(&left[0]));

    wait_for("the GIS to forget the removed holdings", WITHIN, || async {
        let imgs = admin.images().await.ok()?;
        let holds = |id: &ImageId| {
            imgs.iter()
                .filter(|i| i.info.id == *id)
                .flat_map(|i| i.holders.values().flatten())
                .any(|h| h.peer == peer)
        };
        (removed.iter().all(|id| !holds(id)) && holds(&left[0])).then_some(())
    })
    .await;
    // A lookup no longer offers the host for a removed image.
    let list = c.lookup("A", &ImageQuery::Id(removed[0])).await.unwrap();
    assert!(list.level0.iter().all(|e| e.peer != peer));
    c.shutdown().await;
}
