//! Issue 21: the `bids` binary behaves like the tools operators already run — quiet by
//! default and without colour in files, complete help with completions and manual pages,
//! errors that say what is wrong, a closed stdout ends it quietly, one JSON shape, no silent
//! overwrite of a certificate, and nodes that say what they are. Real processes on
//! 127.0.0.1, as a user runs them.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// `bids` with no RUST_LOG and no BIDS_… settings from the environment of the test run.
fn bids() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_bids"));
    c.env_remove("RUST_LOG").env_remove("NO_COLOR");
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("BIDS_") {
            c.env_remove(k);
        }
    }
    c
}

fn ok(args: &[&str]) -> String {
    let o = bids().args(args).output().expect("bids runs");
    assert!(
        o.status.success(),
        "bids {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).expect("utf-8 output")
}

fn fails(args: &[&str]) -> String {
    let o = bids().args(args).output().expect("bids runs");
    assert!(!o.status.success(), "bids {args:?} should fail");
    String::from_utf8(o.stderr).expect("utf-8 output")
}

fn p(dir: &Path, name: &str) -> String {
    dir.join(name).display().to_string()
}

/// Runs `cmd` to its end, killing it (and failing the test) if it takes longer than `within`.
fn output_within(cmd: &mut Command, within: Duration) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("bids runs");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
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

/// A daemon killed when the test ends; its stderr lines arrive on `log` with their time.
struct Daemon {
    child: Child,
    first_line: String,
    log: mpsc::Receiver<(Instant, String)>,
}

impl Daemon {
    fn start(mut cmd: Command) -> Daemon {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("daemon starts");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, log) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        let stdout = child.stdout.take().expect("stdout");
        let mut first_line = String::new();
        BufReader::new(stdout)
            .read_line(&mut first_line)
            .expect("daemon prints its address");
        Daemon {
            child,
            first_line: first_line.trim().to_string(),
            log,
        }
    }

    /// The log lines until `until`.
    fn lines_until(&self, until: Instant) -> Vec<(Instant, String)> {
        let mut out = Vec::new();
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match self.log.recv_timeout(left) {
                Ok(l) => out.push(l),
                Err(_) => return out,
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn gis_cmd(d: &Path, admin: &str) -> Command {
    let mut c = bids();
    c.args([
        "gis",
        "--key",
        &p(d, "gis.key"),
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--data",
        &p(d, "gis-data"),
        "--admin-peer",
        admin,
    ]);
    c
}

fn node_cmd(d: &Path, key: &str, gis: &str, store: &str, admin: &str) -> Command {
    let mut c = bids();
    c.args([
        "node",
        "--key",
        &p(d, key),
        "--idc",
        "A",
        "--gis",
        gis,
        "--store",
        &p(d, store),
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--admin-peer",
        admin,
    ]);
    c
}

fn keys(d: &Path) -> (String, String) {
    let admin = ok(&["key", "gen", "--out", &p(d, "admin.key")])
        .trim()
        .to_string();
    let gis = ok(&["key", "gen", "--out", &p(d, "gis.key")])
        .trim()
        .to_string();
    (admin, gis)
}

fn add_image(d: &Path, store: &str) {
    let src = d.join("img.raw");
    let bytes: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + i / 13) as u8).collect();
    std::fs::write(&src, bytes).unwrap();
    ok(&[
        "image",
        "add",
        &src.display().to_string(),
        "--name",
        "deb",
        "--version",
        "1",
        "--store",
        &p(d, store),
        "--chunk-size",
        "64KiB",
    ]);
}

/// Item 2: the demo prints its results, warnings only and no INFO lines unless -v, and
/// says how to get the full log; no ANSI colour codes when stderr is not a terminal.
#[test]
fn the_demo_is_quiet_and_uncoloured_unless_asked() {
    let args = [
        "demo", "--idcs", "2", "--hosts", "1", "--size", "1MiB", "--mode", "bids",
    ];
    let o = output_within(bids().args(args), Duration::from_secs(120));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !err.contains(" INFO "),
        "the demo logs INFO by default:\n{err}"
    );
    assert!(!err.contains('\u{1b}'), "ANSI codes in a redirected stderr");
    assert!(
        err.contains("--log-file"),
        "where the full log goes:\n{err}"
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("provision max"));

    let dir = tempfile::tempdir().unwrap();
    let log = p(dir.path(), "demo.log");
    let o = output_within(
        bids().args(args).args(["-v", "--log-file", &log]),
        Duration::from_secs(120),
    );
    assert!(o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(" INFO "), "-v shows INFO:\n{err}");
    assert!(!err.contains('\u{1b}'));
    assert!(err.contains(&format!("full log: {log}")), "{err}");
    let kept = std::fs::read_to_string(&log).unwrap();
    assert!(kept.contains(" INFO ") && !kept.contains('\u{1b}'));
}

/// Item 3: completions for three shells, manual pages, and --admin-peer explained.
#[test]
fn completions_man_pages_and_help() {
    let bash = ok(&["completions", "bash"]);
    assert!(
        bash.contains("_bids") && bash.contains("--admin-peer"),
        "{bash}"
    );
    assert!(ok(&["completions", "zsh"]).contains("#compdef bids"));
    assert!(ok(&["completions", "fish"]).contains("complete -c bids"));
    assert!(!fails(&["completions", "tcsh-2000"]).is_empty());

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("man");
    ok(&["man", "--out", &out.display().to_string()]);
    for page in ["bids.1", "bids-node.1", "bids-gis.1", "bids-cert-issue.1"] {
        assert!(out.join(page).exists(), "{page} written");
    }
    let node = std::fs::read_to_string(out.join("bids-node.1")).unwrap();
    assert!(node.contains("admin") && node.contains("signs bridgehead"));

    let help = ok(&["node", "--help"]);
    assert!(help.contains("Peer id of the admin"), "{help}");
    let help = ok(&["image", "status", "--help"]);
    assert!(help.contains("Chunk store directory"), "{help}");
}

/// Item 4: one rule for --gis (ends in /p2p/<peer id>), with an example, wherever it is taken.
#[test]
fn gis_addresses_follow_one_rule() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (admin, _) = keys(d);
    ok(&["key", "gen", "--out", &p(d, "n.key")]);
    let bare = "/ip4/127.0.0.1/tcp/7000";
    let lookup = fails(&["lookup", "deb:1", "--gis", bare, "--idc", "A"]);
    let mut node = node_cmd(d, "n.key", bare, "s", &admin);
    let node = output_within(&mut node, Duration::from_secs(20));
    assert!(!node.status.success());
    let node = String::from_utf8_lossy(&node.stderr).to_string();
    let mut rmc = bids();
    rmc.args([
        "rmc",
        "--gis",
        bare,
        "--admin-key",
        &p(d, "admin.key"),
        "--listen",
        "127.0.0.1:0",
    ]);
    let rmc = output_within(&mut rmc, Duration::from_secs(20));
    assert!(!rmc.status.success());
    let rmc = String::from_utf8_lossy(&rmc.stderr).to_string();
    for e in [&lookup, &node, &rmc] {
        assert!(
            e.contains("must end in /p2p/<peer id>") && e.contains("e.g. --gis /ip4/"),
            "{e}"
        );
    }
}

/// Item 4: a node whose GIS is unreachable, or answers with another peer id, warns within
/// 5 s with the address and the cause, then with growing gaps, not at every redial.
#[test]
fn an_unreachable_gis_is_reported_at_once_then_with_backoff() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (admin, gis_peer) = keys(d);
    ok(&["key", "gen", "--out", &p(d, "n.key")]);

    // A port nobody listens on: connection refused.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let addr = format!("/ip4/127.0.0.1/tcp/{port}/p2p/{gis_peer}");
    let mut c = node_cmd(d, "n.key", &addr, "s1", &admin);
    c.env("RUST_LOG", "warn");
    let t0 = Instant::now();
    let n = Daemon::start(c);
    let lines = n.lines_until(t0 + Duration::from_secs(13));
    let warns: Vec<_> = lines
        .iter()
        .filter(|(_, l)| l.contains("WARN") && l.contains("GIS"))
        .collect();
    let (first_at, first) = warns.first().expect("a warning about the GIS");
    assert!(
        first_at.duration_since(t0) < Duration::from_secs(5),
        "{first}"
    );
    assert!(
        first.contains(&addr) && first.contains("Connection refused"),
        "{first}"
    );
    assert!(!first.contains('\u{1b}'));
    // At once, then after 5 s and 15 s: not one warning per redial (every 2.5 s or less).
    assert!(
        (2..=4).contains(&warns.len()),
        "warnings in 13 s: {warns:#?}"
    );
    drop(n);

    // A GIS with another peer id at that address.
    let gis = Daemon::start(gis_cmd(d, &admin));
    let other = ok(&["key", "peer-id", &p(d, "admin.key")])
        .trim()
        .to_string();
    let wrong = gis.first_line.replace(&gis_peer, &other);
    let mut c = node_cmd(d, "n.key", &wrong, "s2", &admin);
    c.env("RUST_LOG", "warn");
    let t0 = Instant::now();
    let n = Daemon::start(c);
    let lines = n.lines_until(t0 + Duration::from_secs(5));
    let first = lines
        .iter()
        .map(|(_, l)| l)
        .find(|l| l.contains("WARN") && l.contains("GIS"))
        .expect("a warning within 5 s");
    assert!(
        first.contains(&gis_peer) && first.contains("not the GIS named in --gis"),
        "{first}"
    );
    drop(n);
    drop(gis);

    // A port that accepts and never answers: reported within 5 s, the dial still hanging.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    silent.set_nonblocking(true).unwrap();
    let held = std::thread::spawn(move || {
        // Accepts what comes for 8 s, holds it open and says nothing.
        let mut conns = Vec::new();
        let until = Instant::now() + Duration::from_secs(8);
        while Instant::now() < until {
            if let Ok(c) = silent.accept() {
                conns.push(c);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let addr = format!("/ip4/127.0.0.1/tcp/{port}/p2p/{gis_peer}");
    let mut c = node_cmd(d, "n.key", &addr, "s3", &admin);
    c.env("RUST_LOG", "warn");
    let t0 = Instant::now();
    let n = Daemon::start(c);
    let lines = n.lines_until(t0 + Duration::from_millis(6500));
    let first = lines
        .iter()
        .map(|(_, l)| l)
        .find(|l| l.contains("WARN") && l.contains("GIS"))
        .unwrap_or_else(|| panic!("a warning within 6.5 s of start: {lines:#?}"));
    assert!(
        first.contains(&addr) && first.contains("no answer yet"),
        "{first}"
    );
    drop(n);
    let _ = held.join();
}

/// Item 4: `bids rmc` with a key that is not the GIS's admin refuses at start.
#[test]
fn a_console_without_the_admin_key_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (admin, _) = keys(d);
    let not_admin = ok(&["key", "gen", "--out", &p(d, "other.key")])
        .trim()
        .to_string();
    let gis = Daemon::start(gis_cmd(d, &admin));
    let mut c = bids();
    c.args([
        "rmc",
        "--gis",
        &gis.first_line,
        "--admin-key",
        &p(d, "other.key"),
        "--listen",
        "127.0.0.1:0",
    ]);
    let o = output_within(&mut c, Duration::from_secs(30));
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains(&format!("refuses {not_admin} as its admin")) && e.contains("--admin-peer"),
        "{e}"
    );
    assert!(o.stdout.is_empty(), "no console announced");
}

/// Item 4: a second node on a store in use gets a plain message, without sled's raw tail.
#[test]
fn a_store_in_use_is_said_in_words() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (admin, _) = keys(d);
    ok(&["key", "gen", "--out", &p(d, "n.key")]);
    let gis = Daemon::start(gis_cmd(d, &admin));
    let _n1 = Daemon::start(node_cmd(d, "n.key", &gis.first_line, "s", &admin));
    let o = output_within(
        &mut node_cmd(d, "n.key", &gis.first_line, "s", &admin),
        Duration::from_secs(20),
    );
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("is in use by another process"), "{e}");
    assert!(!e.contains("Os {") && !e.contains("code: 11"), "{e}");
}

/// Item 5: a reader that closes stdout early (`| head -1`) ends the command quietly with
/// status 0, never a panic. The pipe is closed before the command writes anything, so
/// every run hits it (with `head` it happened in 7 of 20 runs).
#[test]
fn a_closed_stdout_ends_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(&["key", "gen", "--out", &p(d, "k.key")]);
    add_image(d, "s");
    let store = p(d, "s");
    for args in [
        vec!["image", "status", "deb:1", "--store", &store],
        vec!["image", "status", "deb:1", "--store", &store, "--json"],
        vec!["image", "ls", "--store", &store],
        vec!["key", "peer-id", &p(d, "k.key")],
        vec!["completions", "bash"],
    ] {
        let (r, w) = std::io::pipe().unwrap();
        drop(r);
        let o = bids()
            .args(&args)
            .stdout(w)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(
            !e.contains("panicked") && !e.contains("Broken pipe"),
            "{args:?}: {e}"
        );
        assert_eq!(o.status.code(), Some(0), "{args:?}: {e}");
    }
}

/// Items 6 and 8: `image status --json` gives the image id in hex, as `image ls --json`
/// does, with a node running and without; a node announces `bids-node/<version>` in
/// identify (the GIS logs it).
#[test]
fn hex_ids_everywhere_and_the_node_says_what_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (admin, _) = keys(d);
    ok(&["key", "gen", "--out", &p(d, "n.key")]);
    add_image(d, "s");
    let store = p(d, "s");
    let json = |args: &[&str]| -> serde_json::Value {
        serde_json::from_str(&ok(args)).expect("JSON output")
    };
    let ls = json(&["image", "ls", "--store", &store, "--json"]);
    let id = ls[0]["id"]
        .as_str()
        .expect("ls: id as a string")
        .to_string();
    assert!(
        id.len() == 64 && id.chars().all(|c| c.is_ascii_hexdigit()),
        "{id}"
    );
    let offline = json(&["image", "status", "deb:1", "--store", &store, "--json"]);
    assert_eq!(offline["id"], id.as_str());
    assert_eq!(offline["image"], "deb:1");
    assert_eq!(offline["node_running"], false);

    let mut g = gis_cmd(d, &admin);
    g.env("RUST_LOG", "bids_gis=debug");
    let gis = Daemon::start(g);
    let _node = Daemon::start(node_cmd(d, "n.key", &gis.first_line, "s", &admin));
    let deadline = Instant::now() + Duration::from_secs(20);
    let online = loop {
        let o = bids()
            .args(["image", "status", "deb:1", "--store", &store, "--json"])
            .output()
            .unwrap();
        if o.status.success() {
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            if v["node_running"] == true {
                break v;
            }
        }
        assert!(Instant::now() < deadline, "the node answers on its store");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(online["id"], id.as_str(), "{online}");
    assert_eq!(online["image"], "deb:1");
    assert!(online["counters"]["lan_recv_bytes"].is_u64(), "{online}");
    // Same keys as without a node, plus the node's.
    for k in offline.as_object().unwrap().keys() {
        assert!(online.get(k).is_some(), "{k} missing with a node: {online}");
    }

    let want = format!("agent=bids-node/{}", env!("CARGO_PKG_VERSION"));
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    while !seen.iter().any(|l: &String| l.contains(&want)) {
        assert!(
            Instant::now() < deadline,
            "the GIS never saw {want}: {seen:#?}"
        );
        if let Ok((_, l)) = gis.log.recv_timeout(Duration::from_millis(200)) {
            seen.push(l);
        }
    }
}

/// Item 7: `cert issue --out` keeps an existing file unless --force.
#[test]
fn cert_issue_does_not_overwrite_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_, _) = keys(d);
    let peer = ok(&["key", "gen", "--out", &p(d, "db.key")])
        .trim()
        .to_string();
    let out = p(d, "db.cert");
    let admin_key = p(d, "admin.key");
    let issue = |extra: &[&str]| {
        let mut a = vec![
            "cert",
            "issue",
            "--admin-key",
            &admin_key,
            "--peer",
            &peer,
            "--idc",
            "A",
            "--db-id",
            "a1",
            "--out",
            &out,
        ];
        a.extend_from_slice(extra);
        a.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let args = issue(&[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(&args);
    let first = std::fs::read(&out).unwrap();
    let e = fails(&args);
    assert!(e.contains("already exists") && e.contains("--force"), "{e}");
    assert_eq!(std::fs::read(&out).unwrap(), first, "kept as it was");
    let forced = issue(&["--force"]);
    let forced: Vec<&str> = forced.iter().map(String::as_str).collect();
    ok(&forced);
    assert_ne!(std::fs::read(&out).unwrap(), first, "replaced with --force");
}
