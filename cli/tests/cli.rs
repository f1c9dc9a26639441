//! End-to-end tests of the `bids` binary: real processes (GIS, nodes) on 127.0.0.1, the
//! commands a user types, their exit codes and outputs.

use bids_protocols::cert::{BridgeheadCert, CertBody};
use bids_protocols::Idc;
use libp2p::identity::Keypair;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn bids() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_bids"));
    c.env("RUST_LOG", "warn");
    c
}

fn run(args: &[&str]) -> Output {
    bids().args(args).output().expect("bids runs")
}

fn ok(args: &[&str]) -> String {
    let o = run(args);
    assert!(
        o.status.success(),
        "bids {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).expect("utf-8 output")
}

fn fails(args: &[&str]) -> String {
    let o = run(args);
    assert!(!o.status.success(), "bids {args:?} should fail");
    String::from_utf8(o.stderr).expect("utf-8 output")
}

/// A daemon child that is killed when the test ends, however it ends.
struct Daemon {
    child: Child,
    first_line: String,
}

impl Daemon {
    fn start(args: &[&str]) -> Daemon {
        let mut c = bids();
        c.args(args).stderr(Stdio::null());
        Daemon::spawn(c)
    }

    /// Runs `cmd` (arguments, environment and stderr as the caller set them) and waits for
    /// the first line it prints.
    fn spawn(mut cmd: Command) -> Daemon {
        let mut child = cmd.stdout(Stdio::piped()).spawn().expect("daemon starts");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("daemon prints its address");
        Daemon {
            child,
            first_line: line.trim().to_string(),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn p(dir: &Path, name: &str) -> String {
    dir.join(name).display().to_string()
}

/// A GIS on a free loopback port with `d/gis.key` and data in `d/gis-data`; its first line is
/// its address.
fn start_gis(d: &Path, admin: &str) -> Daemon {
    Daemon::start(&[
        "gis",
        "--key",
        &p(d, "gis.key"),
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--data",
        &p(d, "gis-data"),
        "--admin-peer",
        admin,
    ])
}

fn write_random(path: &Path, size: usize, seed: u8) {
    let mut f = std::fs::File::create(path).unwrap();
    let mut x: u32 = (seed as u32).wrapping_mul(2654435761).wrapping_add(1);
    let mut buf = Vec::with_capacity(size);
    for _ in 0..size {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        buf.push((x >> 8) as u8);
    }
    f.write_all(&buf).unwrap();
}

#[test]
fn key_and_cert_commands() {
    let dir = tempfile::tempdir().unwrap();
    let admin = ok(&["key", "gen", "--out", &p(dir.path(), "admin.key")])
        .trim()
        .to_string();
    let peer = ok(&["key", "gen", "--out", &p(dir.path(), "db.key")])
        .trim()
        .to_string();
    assert!(
        admin.starts_with("12D3Koo"),
        "peer id alone on stdout: {admin}"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("admin.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(
        ok(&["key", "peer-id", &p(dir.path(), "admin.key")]).trim(),
        admin
    );
    assert!(fails(&["key", "gen", "--out", &p(dir.path(), "admin.key")]).contains("already exists"));
    // The GIS replicas' shared key: 64 hex digits, mode 0600, never overwritten.
    let cluster = p(dir.path(), "cluster.key");
    ok(&["key", "cluster", "--out", &cluster]);
    let text = std::fs::read_to_string(&cluster).unwrap();
    assert_eq!(text.trim().len(), 64, "{text}");
    assert!(text.trim().chars().all(|c| c.is_ascii_hexdigit()), "{text}");
    let mode = std::fs::metadata(&cluster).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(fails(&["key", "cluster", "--out", &cluster]).contains("already exists"));
    assert_eq!(std::fs::read_to_string(&cluster).unwrap(), text);

    let cert = p(dir.path(), "db.cert");
    ok(&[
        "cert",
        "issue",
        "--admin-key",
        &p(dir.path(), "admin.key"),
        "--peer",
        &peer,
        "--idc",
        "B",
        "--db-id",
        "b1",
        "--days",
        "30",
        "--out",
        &cert,
    ]);
    ok(&[
        "cert",
        "verify",
        &cert,
        "--admin-peer",
        &admin,
        "--peer",
        &peer,
        "--idc",
        "B",
    ]);
    assert!(ok(&["cert", "show", &cert]).contains("idc:        B"));

    // Wrong admin.
    let e = fails(&["cert", "verify", &cert, "--admin-peer", &peer]);
    assert!(e.contains("not by the admin"), "{e}");
    assert_eq!(e.trim().lines().count(), 1, "one-line reason: {e}");
    // Other peer, other IDC.
    assert!(fails(&[
        "cert",
        "verify",
        &cert,
        "--admin-peer",
        &admin,
        "--peer",
        &admin
    ])
    .contains("is for peer"));
    assert!(fails(&[
        "cert",
        "verify",
        &cert,
        "--admin-peer",
        &admin,
        "--idc",
        "C"
    ])
    .contains("IDC B"));
    // Tampered bytes: flip one byte of the signature.
    let mut bytes = std::fs::read(&cert).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x40;
    let tampered = p(dir.path(), "tampered.cert");
    std::fs::write(&tampered, &bytes).unwrap();
    let e = fails(&["cert", "verify", &tampered, "--admin-peer", &admin]);
    assert!(
        e.contains("tampered") || e.contains("not a bridgehead certificate"),
        "{e}"
    );
    // Revoked, through a revocation list.
    let c = BridgeheadCert::from_bytes(&std::fs::read(&cert).unwrap()).unwrap();
    let revoked = p(dir.path(), "revoked.txt");
    std::fs::write(&revoked, format!("# revoked serials\n{}\n", c.body.serial)).unwrap();
    assert!(fails(&[
        "cert",
        "verify",
        &cert,
        "--admin-peer",
        &admin,
        "--revoked",
        &revoked
    ])
    .contains("revoked"));
    // Expired and not yet valid: made with the library, checked by the CLI.
    let admin_key =
        Keypair::from_protobuf_encoding(&std::fs::read(dir.path().join("admin.key")).unwrap())
            .unwrap();
    let now = bids_protocols::unix_now();
    for (name, nb, na, want) in [
        ("old.cert", now - 1000, now - 10, "expired"),
        ("future.cert", now + 1000, now + 2000, "not valid before"),
    ] {
        let body = CertBody {
            peer: peer.parse().unwrap(),
            idc: Idc::new("B").unwrap(),
            db_id: "b1".into(),
            serial: 9,
            not_before: nb,
            not_after: na,
            issuer: admin.parse().unwrap(),
        };
        let c = BridgeheadCert::issue(&admin_key, body).unwrap();
        std::fs::write(dir.path().join(name), c.to_bytes()).unwrap();
        let e = fails(&[
            "cert",
            "verify",
            &p(dir.path(), name),
            "--admin-peer",
            &admin,
        ]);
        assert!(e.contains(want), "{name}: {e}");
    }
}

#[test]
fn image_store_round_trip_without_a_node() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("img.raw");
    write_random(&src, 3 * 65536 + 77, 3);
    let store = p(dir.path(), "store");
    let out = ok(&[
        "image",
        "add",
        &src.display().to_string(),
        "--name",
        "deb",
        "--version",
        "1",
        "--store",
        &store,
        "--chunk-size",
        "64KiB",
    ]);
    assert!(out.contains("deb:1"), "{out}");
    let ls = ok(&["image", "ls", "--store", &store, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&ls).unwrap();
    assert_eq!(v[0]["chunks_total"], 4);
    assert_eq!(v[0]["chunks_held"], 4);
    let back = dir.path().join("back.raw");
    ok(&[
        "image",
        "export",
        "deb:1",
        "--store",
        &store,
        "--out",
        &back.display().to_string(),
    ]);
    assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&back).unwrap());
    assert!(
        fails(&["image", "export", "deb:2", "--store", &store, "--out", "x"])
            .contains("not in store")
    );
    assert!(fails(&[
        "image",
        "add",
        "/nonexistent",
        "--name",
        "a",
        "--version",
        "1",
        "--store",
        &store
    ])
    .contains("nonexistent"));
}

/// `bids delta build --json` / `info --json` / `apply` on files: a version 4 delta whose
/// frame is compressed against the old version (the new file holds an edited copy of
/// old bytes at another offset), rebuilt bit-exactly; a wrong base is refused.
#[test]
fn delta_build_info_apply_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_random(&d.join("v1"), 2 << 20, 7);
    write_random(&d.join("other"), 2 << 20, 8);
    let v1 = std::fs::read(d.join("v1")).unwrap();
    let mut v2 = std::fs::read(d.join("other")).unwrap()[..1 << 20].to_vec();
    let mut edited = v1[100_000..100_000 + (256 << 10)].to_vec();
    for i in (0..edited.len()).step_by(1000) {
        edited[i] ^= 0x33;
    }
    v2.extend_from_slice(&edited);
    std::fs::write(d.join("v2"), &v2).unwrap();
    let out = ok(&[
        "delta",
        "build",
        "--from",
        &p(d, "v1"),
        "--to",
        &p(d, "v2"),
        "--out",
        &p(d, "v1-v2.delta"),
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    for key in [
        "delta_size",
        "literal_bytes",
        "literal_stored_bytes",
        "own_bytes",
        "referenced_frames",
        "reference_bytes",
        "output_reference_bytes",
    ] {
        assert!(v[key].is_u64(), "{key} missing in {out}");
    }
    assert!(v["referenced_frames"].as_u64().unwrap() >= 1, "{out}");
    // The edited copy costs its edits, not its 256 KiB.
    let size = v["delta_size"].as_u64().unwrap();
    assert!(size < (1 << 20) + (64 << 10), "{out}");
    let info = ok(&["delta", "info", &p(d, "v1-v2.delta"), "--json"]);
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["version"], 4, "{info}");
    ok(&[
        "delta",
        "apply",
        "--base",
        &p(d, "v1"),
        "--delta",
        &p(d, "v1-v2.delta"),
        "--out",
        &p(d, "v2-again"),
    ]);
    assert_eq!(std::fs::read(d.join("v2-again")).unwrap(), v2);
    let err = fails(&[
        "delta",
        "apply",
        "--base",
        &p(d, "other"),
        "--delta",
        &p(d, "v1-v2.delta"),
        "--out",
        &p(d, "wrong"),
    ]);
    assert!(err.contains("base"), "{err}");
    assert!(!d.join("wrong").exists());
}

/// Issue 18 item 4: `bids image verify` re-hashes every chunk in one pass, reports all bad
/// ones (JSON with --json), marks them missing and exits non-zero without --repair; on a
/// store without a node, --repair says what fetches them.
#[test]
fn image_verify_finds_every_bad_chunk_without_a_node() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("img.raw");
    write_random(&src, 4 * 65536, 5);
    let store = p(dir.path(), "store");
    ok(&[
        "image",
        "add",
        &src.display().to_string(),
        "--name",
        "deb",
        "--version",
        "1",
        "--store",
        &store,
        "--chunk-size",
        "64KiB",
    ]);
    let clean = ok(&["image", "verify", "deb:1", "--store", &store, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&clean).unwrap();
    assert_eq!(
        (v["checked"].as_u64(), v["missing"].as_u64()),
        (Some(4), Some(0)),
        "{v}"
    );
    let img = std::fs::read_dir(Path::new(&store).join("images"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "img"))
        .expect("the stored image");
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    for k in [1u64, 3] {
        f.write_all_at(b"rot", k * 65536 + 100).unwrap();
    }
    let o = run(&["image", "verify", "deb:1", "--store", &store, "--json"]);
    assert!(!o.status.success(), "bad chunks must fail the command");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["bad"], serde_json::json!([1, 3]), "{v}");
    assert_eq!(v["missing"], 2);
    assert!(String::from_utf8_lossy(&o.stderr).contains("--repair"));
    let human = ok(&["image", "verify", "deb:1", "--store", &store]);
    assert!(
        human.contains("2 of 4 chunks re-hashed") && human.contains("2 missing"),
        "{human}"
    );
    let o = run(&["image", "verify", "deb:1", "--store", &store, "--repair"]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no node runs"));
}

/// Runs `cmd` to its end, killing it (and failing the test) if it takes longer than `within`.
fn output_within(cmd: &mut Command, within: Duration) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("bids runs");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(within) {
        Ok(out) => out.expect("bids output"),
        Err(_) => {
            // SAFETY: kill only sends a signal to our own child.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            panic!("{cmd:?} did not end within {within:?}");
        }
    }
}

fn wait_for(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < within, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn gis_nodes_lookup_and_fetch() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let admin = ok(&["key", "gen", "--out", &p(d, "admin.key")])
        .trim()
        .to_string();
    ok(&["key", "gen", "--out", &p(d, "gis.key")]);
    ok(&["key", "gen", "--out", &p(d, "a1.key")]);
    ok(&["key", "gen", "--out", &p(d, "a2.key")]);
    let gis = start_gis(d, &admin);
    let gis_addr = gis.first_line.clone();
    assert!(
        gis_addr.contains("/p2p/"),
        "GIS prints its address: {gis_addr}"
    );

    // A holder with an image imported before the node starts, and an empty host.
    let src = d.join("img.raw");
    write_random(&src, 700_000, 5);
    let s1 = p(d, "a1");
    let s2 = p(d, "a2");
    ok(&[
        "image",
        "add",
        &src.display().to_string(),
        "--name",
        "deb",
        "--version",
        "1",
        "--store",
        &s1,
        "--chunk-size",
        "64KiB",
    ]);
    // Settings through a TOML file and the environment as well as flags.
    let conf = d.join("a1.toml");
    std::fs::write(&conf, format!("idc = \"A\"\ngis = \"{gis_addr}\"\nadmin_peer = \"{admin}\"\nlisten = \"/ip4/127.0.0.1/tcp/0\"\n")).unwrap();
    let _n1 = {
        let mut c = bids();
        c.args([
            "node",
            "--config",
            &conf.display().to_string(),
            "--store",
            &s1,
        ])
        .env("BIDS_KEY", p(d, "a1.key"))
        .stderr(Stdio::null());
        Daemon::spawn(c)
    };
    let n2_log = d.join("a2.log");
    let n2_args = [
        "node",
        "--key",
        &p(d, "a2.key"),
        "--idc",
        "A",
        "--gis",
        &gis_addr,
        "--store",
        &s2,
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--admin-peer",
        &admin,
    ];
    let mut n2 = {
        let mut c = bids();
        c.args(n2_args)
            .stderr(std::fs::File::create(&n2_log).unwrap());
        Daemon::spawn(c)
    };

    // The GIS lists the holder once it has published.
    let mut lookup = serde_json::Value::Null;
    wait_for("the holder to be listed", Duration::from_secs(20), || {
        let o = run(&["lookup", "deb:1", "--gis", &gis_addr, "--idc", "A"]);
        if !o.status.success() {
            return false;
        }
        lookup = serde_json::from_slice(&o.stdout).unwrap();
        lookup["level0"]
            .as_array()
            .is_some_and(|l| l.iter().any(|e| e["complete"] == true))
    });
    assert_eq!(lookup["image"]["name"], "deb");
    assert_eq!(lookup["image"]["size"], 700_000);
    assert_eq!(lookup["image"]["chunk_size"], 65536);
    for key in ["peer", "idc", "role", "addrs"] {
        assert!(lookup["level0"][0].get(key).is_some(), "entry has {key}");
    }
    assert!(lookup["level1"].as_array().unwrap().is_empty());
    assert!(lookup["level2"].as_array().unwrap().is_empty());
    let e = fails(&["lookup", "deb:9", "--gis", &gis_addr, "--idc", "A"]);
    assert!(e.contains("not known"), "{e}");

    // Fetch through the running node; its control socket reports progress and counters.
    wait_for("node 2's control socket", Duration::from_secs(10), || {
        Path::new(&s2).join("control.sock").exists()
    });
    let out = d.join("fetched.raw");
    ok(&[
        "image",
        "fetch",
        "deb:1",
        "--store",
        &s2,
        "--out",
        &out.display().to_string(),
    ]);
    assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&out).unwrap());
    let st: serde_json::Value =
        serde_json::from_str(&ok(&["image", "status", "deb:1", "--store", &s2, "--json"])).unwrap();
    assert_eq!(st["complete"], true);
    assert!(st["counters"]["lan_recv_bytes"].as_u64().unwrap() >= 700_000);
    assert_eq!(st["counters"]["wan_recv_bytes"], 0);
    assert!(ok(&["image", "ls", "--store", &s2]).contains("deb"));
    // No source: a clear error, non-zero exit.
    assert!(fails(&["image", "fetch", "nope:1", "--store", &s2]).contains("not known"));
    // The commands above probe the control socket (connect, close) before they use it; a
    // probe is not a malformed request and leaves no warning in the node's log.
    // (The node logs at `warn`, the level of that warning.)
    let log = std::fs::read_to_string(&n2_log).unwrap();
    assert!(!log.contains("malformed control request"), "{log}");

    // Issue 18, item 8: the counters are kept in the store. Stop the node (SIGTERM, as an
    // init system would), start it again on the same store: status shows the same.
    // SAFETY: kill only sends a signal to our own child.
    unsafe { libc::kill(n2.child.id() as libc::pid_t, libc::SIGTERM) };
    let t = Instant::now();
    while n2.child.try_wait().unwrap().is_none() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "node 2 stops on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let _n2 = {
        let mut c = bids();
        c.args(n2_args).stderr(Stdio::null());
        Daemon::spawn(c)
    };
    let mut again = serde_json::Value::Null;
    wait_for("node 2 to answer again", Duration::from_secs(20), || {
        let o = run(&["image", "status", "deb:1", "--store", &s2, "--json"]);
        if !o.status.success() {
            return false;
        }
        again = serde_json::from_slice(&o.stdout).unwrap();
        true
    });
    assert_eq!(
        again["counters"], st["counters"],
        "counters after a restart"
    );
}

/// Issue 18, items 6 and 7: `image add` names what its source is when that is no image
/// (a directory, a pipe, a character device) and refuses an empty file, whose fetch would
/// never end; nothing is added to the store.
#[test]
fn image_add_refuses_what_is_no_image() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let store = p(d, "store");
    let add = |src: &str| {
        let o = output_within(
            bids().args([
                "image",
                "add",
                src,
                "--name",
                "x",
                "--version",
                "1",
                "--store",
                &store,
            ]),
            Duration::from_secs(20),
        );
        assert!(!o.status.success(), "adding {src} should fail");
        let e = String::from_utf8(o.stderr).unwrap();
        assert_eq!(e.trim().lines().count(), 1, "one-line reason: {e}");
        e
    };
    let e = add(&p(d, "."));
    assert!(e.contains("is a directory"), "{e}");
    assert!(!e.contains("9223372036854775807"), "{e}");
    let fifo = d.join("pipe");
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mkfifo reads the NUL-terminated path only.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    // No writer ever opens the pipe: `image add` must answer, not wait for one.
    let e = add(&fifo.display().to_string());
    assert!(e.contains("is a named pipe"), "{e}");
    assert!(add("/dev/null").contains("is a character device"));
    let empty = d.join("empty.raw");
    std::fs::write(&empty, b"").unwrap();
    let e = add(&empty.display().to_string());
    assert!(e.contains("is empty"), "{e}");
    let ls: serde_json::Value =
        serde_json::from_str(&ok(&["image", "ls", "--store", &store, "--json"])).unwrap();
    assert_eq!(ls, serde_json::json!([]), "nothing was added");
}

/// Issue 18, item 5: a GIS or a node told to listen on a port another process listens on
/// fails at once ("address … is already in use", non-zero exit) instead of sharing the
/// port with it (libp2p-tcp's SO_REUSEPORT would let the kernel split connections).
#[test]
fn a_listen_port_in_use_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let admin = ok(&["key", "gen", "--out", &p(d, "admin.key")])
        .trim()
        .to_string();
    ok(&["key", "gen", "--out", &p(d, "gis.key")]);
    ok(&["key", "gen", "--out", &p(d, "gis2.key")]);
    ok(&["key", "gen", "--out", &p(d, "n.key")]);
    let gis = start_gis(d, &admin);
    let gis_addr = gis.first_line.clone();
    let taken: libp2p::Multiaddr = gis_addr.parse().unwrap();
    let port = taken
        .iter()
        .find_map(|p| match p {
            libp2p::multiaddr::Protocol::Tcp(port) => Some(port),
            _ => None,
        })
        .expect("a tcp port");
    let listen = format!("/ip4/127.0.0.1/tcp/{port}");
    let want = format!("address 127.0.0.1:{port} is already in use");
    let within = Duration::from_secs(30);

    let o = output_within(
        bids().args([
            "gis",
            "--key",
            &p(d, "gis2.key"),
            "--listen",
            &listen,
            "--data",
            &p(d, "gis2-data"),
            "--admin-peer",
            &admin,
        ]),
        within,
    );
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success(),
        "a second GIS on {listen} must fail: {e}"
    );
    assert!(e.contains(&want), "{e}");

    let o = output_within(
        bids().args([
            "node",
            "--key",
            &p(d, "n.key"),
            "--idc",
            "A",
            "--gis",
            &gis_addr,
            "--store",
            &p(d, "n"),
            "--listen",
            &listen,
            "--admin-peer",
            &admin,
        ]),
        within,
    );
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "a node on {listen} must fail: {e}");
    assert!(e.contains(&want), "{e}");
    // The first GIS still answers alone.
    let o = run(&["lookup", "x:1", "--gis", &gis_addr, "--idc", "A"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("not known"));
}

/// Issue 18, item 9: a GIS started under a low soft limit of open files raises it to the
/// hard limit and says so, with how many hosts that admits.
#[test]
fn gis_raises_its_open_file_limit() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let admin = ok(&["key", "gen", "--out", &p(d, "admin.key")])
        .trim()
        .to_string();
    ok(&["key", "gen", "--out", &p(d, "gis.key")]);
    let hard = std::fs::read_to_string("/proc/self/limits")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4).map(str::to_string))
        .unwrap();
    if hard != "unlimited" && hard.parse::<u64>().unwrap() <= 64 {
        eprintln!("hard limit {hard}: nothing to raise, not checked");
        return;
    }
    let log = d.join("gis.log");
    let mut c = Command::new("sh");
    c.args([
        "-c",
        "ulimit -S -n 64 && exec \"$0\" \"$@\"",
        env!("CARGO_BIN_EXE_bids"),
        "gis",
        "--key",
        &p(d, "gis.key"),
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--data",
        &p(d, "gis-data"),
        "--admin-peer",
        &admin,
    ])
    .env("RUST_LOG", "info")
    .stderr(std::fs::File::create(&log).unwrap());
    let gis = Daemon::spawn(c);
    assert!(gis.first_line.contains("/p2p/"), "{}", gis.first_line);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", gis.child.id())).unwrap();
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3).map(str::to_string))
        .unwrap();
    assert_eq!(soft, hard, "soft limit raised to the hard one: {limits}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("raised from 64") && text.contains("connected hosts"),
        "{text}"
    );
}

/// Issue 18, item 2 (d, e): a bridgehead's certificate file is replaced by a renewed one and
/// the node is sent SIGHUP: it keeps running and takes the new certificate without a restart;
/// `bids image status --json` shows when the certificate expires and whether that is within
/// the warning period (`--cert-warn-days`).
#[test]
fn sighup_reloads_a_renewed_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let admin = ok(&["key", "gen", "--out", &p(d, "admin.key")])
        .trim()
        .to_string();
    ok(&["key", "gen", "--out", &p(d, "gis.key")]);
    let db = ok(&["key", "gen", "--out", &p(d, "db.key")])
        .trim()
        .to_string();
    let issue = |days: &str, out: &str| {
        ok(&[
            "cert",
            "issue",
            "--admin-key",
            &p(d, "admin.key"),
            "--peer",
            &db,
            "--idc",
            "A",
            "--db-id",
            "a1",
            "--days",
            days,
            "--out",
            &p(d, out),
        ]);
        BridgeheadCert::from_bytes(&std::fs::read(d.join(out)).unwrap())
            .unwrap()
            .body
            .not_after
    };
    let old_end = issue("30", "db.cert");
    let gis = start_gis(d, &admin);
    let src = d.join("img.raw");
    write_random(&src, 100_000, 7);
    let store = p(d, "db");
    ok(&[
        "image",
        "add",
        &src.display().to_string(),
        "--name",
        "deb",
        "--version",
        "1",
        "--store",
        &store,
    ]);
    let mut node = {
        let mut c = bids();
        c.args([
            "node",
            "--key",
            &p(d, "db.key"),
            "--idc",
            "A",
            "--gis",
            &gis.first_line,
            "--store",
            &store,
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--admin-peer",
            &admin,
            "--cert",
            &p(d, "db.cert"),
            "--cert-warn-days",
            "40",
        ])
        .stderr(Stdio::null());
        Daemon::spawn(c)
    };
    let cert_status = || -> Option<(i64, bool)> {
        let o = run(&["image", "status", "deb:1", "--store", &store, "--json"]);
        if !o.status.success() {
            return None;
        }
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
        Some((
            v["cert_expires_at"].as_i64()?,
            v["cert_expiring"].as_bool()?,
        ))
    };
    wait_for("the node's status", Duration::from_secs(20), || {
        Path::new(&store).join("control.sock").exists() && cert_status().is_some()
    });
    // 30 days left, warned about 40 days ahead: expiring.
    assert_eq!(cert_status(), Some((old_end, true)));

    // The admin renews it for a year; the operator replaces the file and sends SIGHUP.
    let new_end = issue("365", "renewed.cert");
    std::fs::rename(d.join("renewed.cert"), d.join("db.cert")).unwrap();
    let pid = node.child.id().to_string();
    let hup = Command::new("kill").args(["-HUP", &pid]).status().unwrap();
    assert!(hup.success());
    wait_for("the renewed certificate", Duration::from_secs(10), || {
        cert_status() == Some((new_end, false))
    });
    assert!(
        node.child.try_wait().unwrap().is_none(),
        "the node exited on SIGHUP"
    );
}
