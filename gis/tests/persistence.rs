//! Crash safety: a GIS running as a separate process is killed with SIGKILL right after it
//! acknowledged a publish; restarted on the same data dir it still knows every host, image,
//! holding and revocation. The child process is this test binary itself, re-executed with
//! an environment variable that makes `gis_child_process` run the server.

mod common;

use bids_protocols::gis::{ErrorKind, GisRequest, GisResponse, HostStats, ImageQuery};
use common::*;
use libp2p::identity::Keypair;
use libp2p::Multiaddr;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const ENV_DIR: &str = "BIDS_GIS_TEST_CHILD_DIR";
const ENV_KEY: &str = "BIDS_GIS_TEST_CHILD_KEY";
const ENV_ADMIN: &str = "BIDS_GIS_TEST_CHILD_ADMIN";
const LISTEN_MARK: &str = "BIDS_GIS_LISTEN ";

/// Not a test: the entry point of the child GIS process. Ignored so that a normal run skips
/// it; the parent runs it with `--ignored --exact` and the environment set.
#[test]
#[ignore = "entry point of the child GIS process started by crash_right_after_publish_loses_nothing"]
fn gis_child_process() {
    let Ok(dir) = std::env::var(ENV_DIR) else {
        return;
    };
    let key = hex::decode(std::env::var(ENV_KEY).expect("key env"))
        .ok()
        .and_then(|b| Keypair::from_protobuf_encoding(&b).ok())
        .expect("GIS key");
    let admin = std::env::var(ENV_ADMIN)
        .expect("admin env")
        .parse()
        .expect("admin peer id");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async move {
        let cfg = bids_gis::GisConfig::new(
            key,
            "/ip4/127.0.0.1/tcp/0".parse().expect("addr"),
            dir.into(),
            admin,
        );
        let g = bids_gis::spawn(cfg).await.expect("GIS starts");
        println!("{LISTEN_MARK}{}", g.listen_addrs()[0]);
        // Runs until the parent kills this process.
        std::future::pending::<()>().await;
    });
}

/// Kills the child on drop, so a failing assertion never leaves a GIS behind.
struct ChildGis(Child);

impl Drop for ChildGis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_child(dir: &Path, key: &Keypair, admin: &Keypair) -> (ChildGis, Multiaddr) {
    let exe = std::env::current_exe().unwrap();
    // The child's stderr goes to a file so a failure to start can be explained.
    let log_path = dir.join("child-stderr.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = Command::new(exe)
        .args([
            "--ignored",
            "--exact",
            "gis_child_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ENV_DIR, dir)
        .env(ENV_KEY, hex::encode(key.to_protobuf_encoding().unwrap()))
        .env(ENV_ADMIN, peer_of(admin).to_string())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            // libtest prints "test gis_child_process ... " on the same line first.
            if let Some((_, a)) = line.split_once(LISTEN_MARK) {
                let _ = tx.send(a.trim().to_string());
            }
        }
    });
    let child = ChildGis(child);
    let addr = match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(a) => a.parse().unwrap(),
        Err(e) => panic!(
            "the child GIS did not report its address ({e}); its stderr:\n{}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        ),
    };
    (child, addr)
}

fn kill(mut c: ChildGis) {
    // std's Child::kill sends SIGKILL on Unix: no shutdown code runs in the child.
    c.0.kill().unwrap();
    let status = c.0.wait().unwrap();
    assert!(!status.success(), "the child must have died by the signal");
}

fn host_list(r: GisResponse) -> Box<bids_protocols::gis::HostList> {
    match r {
        GisResponse::HostList(l) => l,
        other => panic!("expected a host list, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_right_after_publish_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let gis_key = Keypair::generate_ed25519();
    let admin = Keypair::generate_ed25519();
    let (h1, h2, db, revoked_db) = (
        Keypair::generate_ed25519(),
        Keypair::generate_ed25519(),
        Keypair::generate_ed25519(),
        Keypair::generate_ed25519(),
    );
    let (x_bytes, x) = manifest("debian", "12", 5);
    let (y_bytes, y) = manifest("debian", "13", 7);
    let revoked_cert = cert(&admin, peer_of(&revoked_db), "B", 8);

    let (child, addr) = start_child(dir.path(), &gis_key, &admin);
    assert!(matches!(
        ask(&h1, &addr, register("A", None)).await,
        GisResponse::Registered { .. }
    ));
    assert!(matches!(
        ask(&h2, &addr, register("A", None)).await,
        GisResponse::Registered { .. }
    ));
    assert!(matches!(
        ask(
            &db,
            &addr,
            register("B", Some(cert(&admin, peer_of(&db), "B", 7)))
        )
        .await,
        GisResponse::Registered { .. }
    ));
    assert!(matches!(
        ask(
            &revoked_db,
            &addr,
            register("B", Some(revoked_cert.clone()))
        )
        .await,
        GisResponse::Registered { .. }
    ));
    assert_ack(&ask(&admin, &addr, GisRequest::Revoke { serial: 8 }).await);
    assert_ack(&ask(&h1, &addr, publish(x, &x_bytes, 5, true)).await);
    // The last acknowledged request before the crash.
    assert_ack(&ask(&h2, &addr, publish(y, &y_bytes, 3, false)).await);
    kill(child);

    let (child, addr2) = start_child(dir.path(), &gis_key, &admin);
    // Same identity, new port.
    assert_eq!(addr2.iter().last(), addr.iter().last());
    let addr = addr2;

    // Both images are known by name and by id; nobody is alive, so the levels are empty.
    let l = host_list(
        ask(
            &h1,
            &addr,
            GisRequest::Lookup {
                image: ImageQuery::Ref("debian:12".parse().unwrap()),
                idc: None,
            },
        )
        .await,
    );
    assert_eq!(l.image.id, x);
    assert_eq!(l.manifest, x_bytes);
    assert!(l.level0.is_empty() && l.level1.is_empty() && l.level2.is_empty());
    let l = host_list(
        ask(
            &h1,
            &addr,
            GisRequest::Lookup {
                image: ImageQuery::Id(y),
                idc: None,
            },
        )
        .await,
    );
    assert_eq!(
        (
            l.image.name.as_str(),
            l.image.version.as_str(),
            l.image.size
        ),
        ("debian", "13", 7 * CHUNK as u64)
    );
    assert!(l.level0.is_empty());

    // The revocation survived: heartbeats carry it and the revoked bridgehead is refused.
    match ask(
        &h1,
        &addr,
        GisRequest::Heartbeat {
            stats: HostStats::default(),
        },
    )
    .await
    {
        GisResponse::Ack { revocations, .. } => assert!(revocations.is_revoked(8)),
        other => panic!("{other:?}"),
    }
    match ask(&revoked_db, &addr, register("B", Some(revoked_cert))).await {
        GisResponse::Error { kind, .. } => assert_eq!(kind, ErrorKind::BadCert),
        other => panic!("{other:?}"),
    }

    // The holding of the last publish survived: once h2 heartbeats it is listed with it.
    assert_ack(
        &ask(
            &h2,
            &addr,
            GisRequest::Heartbeat {
                stats: HostStats::default(),
            },
        )
        .await,
    );
    let l = host_list(
        ask(
            &h1,
            &addr,
            GisRequest::Lookup {
                image: ImageQuery::Id(y),
                idc: None,
            },
        )
        .await,
    );
    assert_eq!(l.level0.len(), 1);
    assert_eq!(l.level0[0].peer, peer_of(&h2));
    assert_eq!((l.level0[0].chunks_held, l.level0[0].complete), (3, false));
    // The certified bridgehead of B survived too: once alive it is B's level 1 for Y.
    assert_ack(
        &ask(
            &db,
            &addr,
            GisRequest::Heartbeat {
                stats: HostStats::default(),
            },
        )
        .await,
    );
    let tool = Keypair::generate_ed25519();
    let l = host_list(
        ask(
            &tool,
            &addr,
            GisRequest::Lookup {
                image: ImageQuery::Id(y),
                idc: Some(idc("B")),
            },
        )
        .await,
    );
    assert_eq!(
        l.level1.iter().map(|e| e.peer).collect::<Vec<_>>(),
        vec![peer_of(&db)]
    );
    kill(child);
}
