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
