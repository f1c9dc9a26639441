//! Issue 20's validation: the simulator against the netns evaluation's recorded runs at 8
//! hosts (testnet/results/full-3/runs.csv: the 21 BIDS parameter sets of `eval.sh --full`,
//! recorded with the code whose core the simulator drives; full-2 holds the Baseline sets).
//!
//! Asserted: for BIDS, WAN bytes within 2 % in every set, and mean and last-host provision
//! times within 15 % in every set with WAN up to 34 Mbit/s. Not asserted, because they miss
//! (reported in sim/RESULTS.md): BIDS at 100 Mbit/s, where the recorded runs are slower
//! than the model, and Baseline.

use bids_sim::validate::compare;

#[test]
fn the_simulator_matches_the_recorded_netns_runs_of_bids() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../testnet/results/full-3/runs.csv"
    );
    let csv = std::fs::read_to_string(path).expect("the recorded netns runs");
    let cs = compare(&csv, 8, 3, |_| {}).expect("every set simulates");
    let bids: Vec<_> = cs.iter().filter(|c| c.mode == "bids").collect();
    assert_eq!(bids.len(), 21);
    let mut checked = 0;
    for c in bids {
        let (mean, last, wan) = c.ratios();
        eprintln!(
            "{} B at {} Mbit/s, {} ms: mean x{mean:.2}, last x{last:.2}, WAN x{wan:.3}",
            c.image_bytes, c.wan_mbit, c.delay_ms
        );
        assert!((wan - 1.0).abs() <= 0.02, "{c:?}");
        if c.wan_mbit <= 34.0 {
            assert!((mean - 1.0).abs() <= 0.15, "{c:?}");
            assert!((last - 1.0).abs() <= 0.15, "{c:?}");
            checked += 1;
        }
    }
    assert_eq!(checked, 18);
}
