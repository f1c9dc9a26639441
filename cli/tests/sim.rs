//! `bids sim` from the command line: runs, tables, plots, JSON summary, validation.

use std::process::Command;

fn bids() -> Command {
    Command::new(env!("CARGO_BIN_EXE_bids"))
}

#[test]
fn a_simulation_writes_reports_tables_and_plots_and_prints_its_summary() {
    let dir = tempfile::tempdir().unwrap();
    let out = bids()
        .args([
            "sim",
            "--idcs",
            "2",
            "--hosts-per-idc",
            "4,6",
            "--mode",
            "bids,baseline",
            "--providers",
            "2",
            "--provider-hosts",
            "2",
            "--size",
            "1MiB",
            "--chunk-size",
            "128KiB",
            "--wan-mbit",
            "20",
            "--lan-mbit",
            "200",
            "--fail",
            "gis@0.2+1",
            "--json",
            "--out",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let runs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let runs = runs.as_array().unwrap();
    assert_eq!(runs.len(), 4);
    for r in runs {
        assert_eq!(r["done_hosts"], r["fetching_hosts"], "{r}");
        if r["mode"] == "bids" {
            assert!(r["worst_wan_in_over_size"].as_f64().unwrap() <= 1.02, "{r}");
        }
    }
    for f in [
        "report-bids-4.json",
        "report-baseline-6.json",
        "hosts.csv",
        "idcs.csv",
        "provision_cdf.png",
        "last_host_vs_hosts.png",
        "wan_bytes_per_idc.png",
        "bridgehead_lan_upload.png",
    ] {
        let p = dir.path().join(f);
        let bytes = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        if f.ends_with(".png") {
            assert_eq!(&bytes[..4], b"\x89PNG", "{f}");
        }
    }
    let idcs = std::fs::read_to_string(dir.path().join("idcs.csv")).unwrap();
    // A header, and per run 2 provider and 2 fetching IDCs.
    assert_eq!(idcs.lines().count(), 1 + 4 * 4);
    assert!(
        stderr.contains("worst IDC: last host / (S/B_wan)"),
        "{stderr}"
    );
}

#[test]
fn bad_simulation_options_are_refused_with_how_to_say_it() {
    let out = bids()
        .args(["sim", "--fail", "disk:0@1", "--no-plots", "--out"])
        .arg(tempfile::tempdir().unwrap().path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("use bridgehead:IDC@T"), "{stderr}");
    let out = bids()
        .args(["sim", "--mode", "torrent", "--no-plots", "--out"])
        .arg(tempfile::tempdir().unwrap().path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("use bids or baseline"));
}

#[test]
fn validation_compares_with_recorded_netns_runs() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("runs.csv");
    std::fs::write(
        &csv,
        "mode,image_bytes,wan_mbit,delay_ms,hosts,provision_s_mean,provision_s_max,wan_in_bytes_kernel,wan_in_bytes_nodes,sweep,chunk_bytes,providers\n\
         bids,4500000,10,15,8,3.255,3.800,4741781,4500000,bw,258048,4\n\
         bids,4500000,10,15,16,3.9,4.4,4741781,4500000,hosts,258048,4\n",
    )
    .unwrap();
    let out = bids()
        .args(["sim", "--validate"])
        .arg(&csv)
        .args(["--validate-seeds", "2", "--json", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let cs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // Only the run with 8 hosts is compared.
    assert_eq!(cs.as_array().unwrap().len(), 1);
    let c = &cs[0];
    assert_eq!(c["runs"], 1);
    assert_eq!(c["seeds"], 2);
    let ratio = c["sim_mean_s"].as_f64().unwrap() / c["netns_mean_s"].as_f64().unwrap();
    assert!((ratio - 1.0).abs() < 0.15, "{c}");
    assert!(dir.path().join("validation.json").is_file());
    assert!(stderr.contains("bids: 1 parameter sets"), "{stderr}");
}
