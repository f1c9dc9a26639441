//! `bids bench` end to end, at sizes small enough for a test: the loopback bench measures five
//! positive throughputs (four transfers and the storage pass) and prints the documented JSON
//! object; the memory bench reads a peak RSS from a real child node for each size. Ratios are
//! not asserted (machines are noisy).

use std::process::Command;

fn bids(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_bids"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("running bids");
    assert!(
        out.status.success(),
        "bids {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("bids {args:?} printed no JSON object ({e}):\n{stdout}"))
}

#[test]
fn loopback_bench_measures_five_positive_throughputs() {
    let v = bids(&["bench", "loopback", "--size", "32MiB", "--json"]);
    assert_eq!(v["size_bytes"].as_u64(), Some(32 << 20));
    for k in [
        "raw_tcp_bytes_per_s",
        "libp2p_rr_bytes_per_s",
        "libp2p_rr_verified_bytes_per_s",
        "bids_bytes_per_s",
        "store_bytes_per_s",
    ] {
        let x = v[k]
            .as_f64()
            .unwrap_or_else(|| panic!("{k} missing in {v}"));
        assert!(x > 0.0 && x.is_finite(), "{k} = {x}");
    }
    for k in ["bids_vs_libp2p", "bids_vs_tcp", "verified_vs_libp2p"] {
        let x = v[k]
            .as_f64()
            .unwrap_or_else(|| panic!("{k} missing in {v}"));
        assert!(x > 0.0 && x.is_finite(), "{k} = {x}");
    }
    // CPU time of each transfer; the storage pass reads, hashes and writes every byte, so it
    // cannot have cost nothing.
    for k in [
        "raw_tcp",
        "libp2p_rr",
        "libp2p_rr_verified",
        "bids",
        "store",
    ] {
        let x = v["cpu_s"][k]
            .as_f64()
            .unwrap_or_else(|| panic!("cpu_s.{k} missing in {v}"));
        assert!(x >= 0.0 && x.is_finite(), "cpu_s.{k} = {x}");
    }
    assert!(v["cpu_s"]["store"].as_f64() > Some(0.0), "{v}");
    let obj = v.as_object().expect("an object");
    assert_eq!(obj.len(), 10, "exactly the documented fields: {v}");
}

#[test]
fn rss_bench_reads_the_peak_of_a_child_node_per_size() {
    let v = bids(&["bench", "rss", "--size", "4MiB,8MiB", "--json"]);
    let samples = v["samples"].as_array().expect("samples");
    assert_eq!(samples.len(), 2);
    for (s, size) in samples.iter().zip([4u64 << 20, 8 << 20]) {
        assert_eq!(s["size_bytes"].as_u64(), Some(size));
        let hwm = s["vm_hwm_bytes"].as_u64().expect("vm_hwm_bytes");
        // A running node maps at least its own code; anything near zero is a misread.
        assert!(hwm > 1 << 20, "peak RSS of {hwm} bytes is implausible");
        assert!(s["fetch_s"].as_f64().is_some_and(|t| t >= 0.0));
    }
}

#[test]
fn gis_bench_registers_every_virtual_host_and_serves_lookups_over_the_real_protocol() {
    let v = bids(&[
        "bench",
        "gis",
        "--hosts",
        "200",
        "--idcs",
        "10",
        "--images",
        "50",
        "--lookups-per-s",
        "200,400",
        "--duration",
        "5",
        "--json",
    ]);
    assert_eq!(v["hosts"].as_u64(), Some(200), "{v}");
    let reg = &v["registration"];
    assert_eq!(reg["registered"].as_u64(), Some(200), "{v}");
    assert_eq!(reg["failed"].as_u64(), Some(0), "{v}");
    assert!(
        reg["all_registered_s"].as_f64().is_some_and(|t| t > 0.0),
        "{v}"
    );
    assert_eq!(reg["register"]["count"].as_u64(), Some(200), "{v}");
    // Every host published its 5 holdings.
    assert_eq!(reg["publish"]["count"].as_u64(), Some(1000), "{v}");
    // 20 certified bridgeheads (2 per IDC) were accepted as such.
    assert_eq!(v["bridgeheads"].as_u64(), Some(20), "{v}");
    // The GIS told the hosts the node's default heartbeat interval.
    assert_eq!(v["heartbeat_s"].as_f64(), Some(2.0), "{v}");
    let phases = v["phases"].as_array().expect("phases");
    assert_eq!(phases.len(), 2, "{v}");
    for (p, rate) in phases.iter().zip([200u64, 400]) {
        assert_eq!(p["offered_lookups_per_s"].as_u64(), Some(rate));
        // Open loop: (almost) every offered lookup was answered with a host list.
        let served = p["lookups_per_s"].as_f64().expect("lookups_per_s");
        assert!(
            served > 0.5 * rate as f64,
            "served {served} of {rate}/s: {v}"
        );
        let l = &p["lookup"];
        assert!(l["count"].as_u64() >= Some(rate * 5 * 9 / 10), "{v}");
        let (p50, p99, p999) = (
            l["p50_ms"].as_f64().expect("p50"),
            l["p99_ms"].as_f64().expect("p99"),
            l["p999_ms"].as_f64().expect("p999"),
        );
        assert!(p50 > 0.0 && p50 <= p99 && p99 <= p999, "{v}");
        // 200 hosts every 2 s: about 100 heartbeats/s.
        let hb = p["heartbeats_per_s"].as_f64().expect("heartbeats_per_s");
        assert!(hb > 50.0 && hb < 150.0, "heartbeats/s {hb}: {v}");
        assert!(p["gis_cpu_s"].as_f64().is_some_and(|c| c > 0.0), "{v}");
    }
    assert_eq!(v["lookups_per_s"], phases[1]["lookups_per_s"]);
    // The spawned GIS's process was read: it ran and held some memory.
    assert_eq!(v["gis_spawned"].as_bool(), Some(true));
    assert!(v["gis"]["cpu_s"].as_f64().is_some_and(|c| c > 0.0), "{v}");
    assert!(v["gis"]["peak_rss_bytes"].as_u64() > Some(1 << 20), "{v}");
    assert!(
        v["nofile"]["limit"].as_u64() >= v["nofile"]["needed"].as_u64(),
        "{v}"
    );
    let errors = v["errors"].as_object().expect("errors");
    assert!(errors.is_empty(), "no errors on loopback: {v}");
}

#[test]
fn gis_bench_starts_a_raft_group_and_spreads_the_hosts_over_its_replicas() {
    let v = bids(&[
        "bench",
        "gis",
        "--replicas",
        "3",
        "--hosts",
        "90",
        "--idcs",
        "3",
        "--images",
        "20",
        "--lookups-per-s",
        "100",
        "--duration",
        "3",
        "--json",
    ]);
    assert_eq!(v["gis_processes"].as_u64(), Some(3), "{v}");
    assert_eq!(v["gis_addrs"].as_array().map(Vec::len), Some(3), "{v}");
    let reg = &v["registration"];
    // Registrations and publications go through the group's leader, whichever replica
    // a host talks to; the heartbeat that follows a registration is accepted at once.
    assert_eq!(reg["registered"].as_u64(), Some(90), "{v}");
    assert_eq!(reg["publish"]["count"].as_u64(), Some(450), "{v}");
    let served = v["lookups_per_s"].as_f64().expect("lookups_per_s");
    assert!(served > 50.0, "served {served} of 100/s: {v}");
    // CPU and memory are those of the three processes together.
    assert!(v["gis"]["cpu_s"].as_f64().is_some_and(|c| c > 0.0), "{v}");
    assert!(v["gis"]["peak_rss_bytes"].as_u64() > Some(3 << 20), "{v}");
    let errors = v["errors"].as_object().expect("errors");
    assert!(errors.is_empty(), "no errors on loopback: {v}");
}

/// `--cores-per-gis` puts each GIS the bench starts on a CPU quota and says so in the JSON;
/// the cap itself is proven on a busy loop in `bids_gis::loadgen::cpucap`'s tests. Where no
/// cgroup cpu controller is writable, the bench must refuse with a clear error instead.
#[test]
fn gis_bench_caps_each_gis_process_it_starts() {
    let args = [
        "bench",
        "gis",
        "--replicas",
        "1",
        "--cores-per-gis",
        "0.3",
        "--hosts",
        "60",
        "--idcs",
        "3",
        "--images",
        "10",
        "--lookups-per-s",
        "200",
        "--duration",
        "2",
        "--json",
    ];
    let out = Command::new(env!("CARGO_BIN_EXE_bids"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("running bids");
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        assert!(
            stderr.contains("cgroup"),
            "a failed cap must name the cgroup it needed: {stderr}"
        );
        eprintln!("no writable cgroup cpu controller here; checked the error");
        return;
    }
    let v: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).expect("JSON");
    assert_eq!(v["cores_per_gis"].as_f64(), Some(0.3), "{v}");
    assert_eq!(v["registration"]["registered"].as_u64(), Some(60), "{v}");
    assert!(
        v["lookups_per_s"].as_f64().is_some_and(|l| l > 100.0),
        "{v}"
    );
    for p in v["phases"].as_array().expect("phases") {
        let cores = p["gis_cores"].as_f64().expect("gis_cores");
        assert!(
            cores <= 0.35,
            "the GIS used {cores} cores under a 0.3 cap: {v}"
        );
    }

    // Refused before anything starts: a cap on a GIS the bench does not start, and a cap
    // below what the kernel accepts.
    let gis = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWBXybYQmWJNpjD4gtfw1YiLg8GRewsTPvMZ1hsVYknVky";
    for (cap, extra, says) in [
        ("0.3", vec!["--gis", gis], "leave --gis out"),
        ("0.05", vec![], "at least 0.1"),
    ] {
        let mut a: Vec<&str> = args
            .iter()
            .map(|x| if *x == "0.3" { cap } else { x })
            .collect();
        a.extend(extra);
        let out = Command::new(env!("CARGO_BIN_EXE_bids"))
            .args(&a)
            .env("RUST_LOG", "warn")
            .output()
            .expect("running bids");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{a:?} must fail");
        assert!(stderr.contains(says), "{a:?}: {stderr}");
    }
}
