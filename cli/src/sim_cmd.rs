//! `bids sim`: runs the discrete-event simulator (`bids_sim`) and writes what it found: a
//! JSON report per run, CSV tables per host and per IDC, and PNG plots. `--validate`
//! compares the simulator with the runs the netns evaluation recorded.

use crate::parse_size;
use crate::progress::Progress;
use anyhow::{bail, Context, Result};
use bids_protocols::Policy;
use bids_sim::validate::{self, Comparison};
use bids_sim::{Fault, Params, Report, World};
use bids_testnet::evalplot::{self, Panel, Series};
use clap::Args;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

#[derive(Args, Debug)]
pub struct SimArgs {
    /// Fetching IDCs (each with a certified bridgehead as its first host).
    #[arg(long, default_value_t = 100)]
    idcs: usize,
    /// Hosts in each fetching IDC, the bridgehead included; a comma-separated list runs
    /// each (the plot of the last host against hosts per IDC needs several).
    #[arg(long, default_value = "100", value_delimiter = ',')]
    hosts_per_idc: Vec<usize>,
    /// IDCs that hold the image from the start.
    #[arg(long, default_value_t = 1)]
    providers: usize,
    /// Hosts in each of those IDCs (every one holds the image; the first is certified).
    #[arg(long, default_value_t = 1)]
    provider_hosts: usize,
    /// Image size (KiB, MiB, GiB suffixes).
    #[arg(long, default_value = "4GiB", value_parser = parse_size)]
    size: u64,
    /// Chunk size.
    #[arg(long, default_value = "4MiB", value_parser = parse_size)]
    chunk_size: u64,
    /// Each IDC's WAN link, each direction.
    #[arg(long, default_value_t = 100.0)]
    wan_mbit: f64,
    /// Each host's LAN link, each direction.
    #[arg(long, default_value_t = 1000.0)]
    lan_mbit: f64,
    /// One-way delay between IDCs (and to the GIS).
    #[arg(long, default_value_t = 15.0)]
    delay_ms: f64,
    /// One-way delay inside an IDC.
    #[arg(long, default_value_t = 0.1)]
    lan_delay_ms: f64,
    /// bids or baseline; a comma-separated list runs each.
    #[arg(long, default_value = "bids", value_delimiter = ',')]
    mode: Vec<String>,
    /// Seeds the start times, the order of ties and every core's random draws: the same
    /// seed gives the same report.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Fetches start at random times within this span (the bridgeheads at once).
    #[arg(long, default_value_t = 2000.0)]
    jitter_ms: f64,
    /// The bridgeheads start at random times too.
    #[arg(long)]
    bridgehead_random: bool,
    /// How often each node's core ticks (the engine's is 20 ms).
    #[arg(long, default_value_t = 20.0)]
    tick_ms: f64,
    /// Share the links' rates again at most once per this many ms (0: at every transfer
    /// that starts or ends, exact but slow with thousands of concurrent transfers); a new
    /// transfer waits up to this long for its share
    #[arg(long, default_value_t = 1.0)]
    share_quantum_ms: f64,
    /// Wire bytes per payload byte beyond the payload (TCP/IP, noise and yamux framing).
    #[arg(long, default_value_t = 0.04)]
    wire_overhead: f64,
    /// Simulated seconds after which the run stops, finished or not.
    #[arg(long, default_value_t = 3600.0)]
    time_limit_s: f64,
    /// A failure, repeatable: `bridgehead:IDC@T[+D]`, `host:IDC/HOST@T[+D]` or `gis@T+D`
    /// (seconds after the fetches may start; +D restarts it D seconds later).
    #[arg(long = "fail", value_name = "SPEC")]
    fail: Vec<String>,
    /// Where the reports, tables and plots go.
    #[arg(long, default_value = "sim-out")]
    out: PathBuf,
    /// No PNG plots (they need a TrueType font).
    #[arg(long)]
    no_plots: bool,
    /// The font for the plots (DejaVu Sans is looked for by default).
    #[arg(long)]
    font: Option<PathBuf>,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Instead of one run: simulate every parameter set of this netns `runs.csv` with 8
    /// hosts and compare with what was recorded.
    #[arg(long, value_name = "RUNS_CSV")]
    validate: Option<PathBuf>,
    /// Seeds per parameter set with --validate.
    #[arg(long, default_value_t = 3)]
    validate_seeds: u64,
}

/// Parses one `--fail` spec.
pub fn parse_fault(spec: &str) -> Result<Fault, String> {
    let bad =
        || format!("--fail {spec:?}: use bridgehead:IDC@T[+D], host:IDC/HOST@T[+D] or gis@T+D");
    let (what, when) = spec.split_once('@').ok_or_else(bad)?;
    let (at, dur) = match when.split_once('+') {
        Some((a, d)) => (a, Some(d)),
        None => (when, None),
    };
    let num = |s: &str| {
        s.trim()
            .parse::<f64>()
            .ok()
            .filter(|v| *v >= 0.0 && v.is_finite())
    };
    let at_s = num(at).ok_or_else(bad)?;
    let for_s = match dur {
        Some(d) => num(d).ok_or_else(bad)?,
        None => 0.0,
    };
    let idx = |s: &str| s.trim().parse::<usize>().map_err(|_| bad());
    match what.split_once(':') {
        Some(("bridgehead", idc)) => Ok(Fault::Bridgehead {
            idc: idx(idc)?,
            at_s,
            for_s,
        }),
        Some(("host", spot)) => {
            let (idc, host) = spot.split_once('/').ok_or_else(bad)?;
            Ok(Fault::Host {
                idc: idx(idc)?,
                host: idx(host)?,
                at_s,
                for_s,
            })
        }
        None if what == "gis" && for_s > 0.0 => Ok(Fault::Gis { at_s, for_s }),
        _ => Err(bad()),
    }
}

fn policy(mode: &str) -> Result<Policy> {
    match mode {
        "bids" => Ok(Policy::Bids),
        "baseline" => Ok(Policy::Baseline),
        other => bail!("--mode {other:?}: use bids or baseline"),
    }
}

pub fn run(a: SimArgs) -> Result<()> {
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    if let Some(csv) = &a.validate {
        return run_validate(&a, csv);
    }
    let faults = a
        .fail
        .iter()
        .map(|s| parse_fault(s))
        .collect::<Result<Vec<_>, _>>()
        .map_err(anyhow::Error::msg)?;
    let chunk_size = u32::try_from(a.chunk_size).context("--chunk-size is too large")?;
    let mut reports = Vec::new();
    for mode in &a.mode {
        for &hosts in &a.hosts_per_idc {
            let p = Params {
                idcs: a.idcs,
                hosts_per_idc: hosts,
                providers: a.providers,
                provider_hosts: a.provider_hosts,
                size: a.size,
                chunk_size,
                wan_mbit: a.wan_mbit,
                lan_mbit: a.lan_mbit,
                delay_ms: a.delay_ms,
                lan_delay_ms: a.lan_delay_ms,
                policy: policy(mode)?,
                seed: a.seed,
                jitter_ms: a.jitter_ms,
                bridgehead_random: a.bridgehead_random,
                tick_ms: a.tick_ms,
                share_quantum_ms: a.share_quantum_ms,
                wire_overhead: a.wire_overhead,
                time_limit_s: a.time_limit_s,
                faults: faults.clone(),
            };
            let started = std::time::Instant::now();
            let world = World::new(p).map_err(anyhow::Error::msg)?;
            let what = format!("sim {mode}, {} IDCs x {hosts} hosts", a.idcs);
            let total = (a.idcs * hosts) as u64;
            let mut bar = Progress::counting(&what, total, "hosts done");
            let report = world.run(|p| {
                bar.message(format!("{what}, t = {:.1} s", p.sim_s));
                bar.set(p.done as u64, p.fetching as u64);
            });
            bar.finish();
            let wall = started.elapsed().as_secs_f64();
            let name = format!("{mode}-{hosts}");
            let path = a.out.join(format!("report-{name}.json"));
            std::fs::write(&path, serde_json::to_vec_pretty(&report)?)
                .with_context(|| format!("writing {}", path.display()))?;
            eprintln!("{}", summary_line(mode, hosts, &report, wall));
            reports.push((mode.clone(), hosts, report, wall));
        }
    }
    write_tables(&a.out, &reports)?;
    if !a.no_plots {
        evalplot::load_font(a.font.as_deref())?;
        for p in plot(&a.out, &reports)? {
            eprintln!("wrote {}", p.display());
        }
    }
    if a.json {
        let s: Vec<serde_json::Value> = reports
            .iter()
            .map(|(mode, hosts, r, wall)| summary_json(mode, *hosts, r, *wall))
            .collect();
        outln!("{}", serde_json::to_string_pretty(&s)?);
    }
    Ok(())
}

/// The worst fetching IDC's figures against the goals.
struct Worst {
    last_over_bound: Option<f64>,
    makespan_over_bound: Option<f64>,
    wan: f64,
    bridgehead_lan: f64,
    peak_gis: u64,
}

fn worst(r: &Report) -> Worst {
    let fetching: Vec<_> = r.idcs.iter().filter(|i| !i.provider).collect();
    let max = |v: Vec<Option<f64>>| -> Option<f64> {
        v.into_iter()
            .try_fold(0.0f64, |m, x| x.map(|x| m.max(x)))
            .filter(|_| !fetching.is_empty())
    };
    Worst {
        last_over_bound: max(fetching.iter().map(|i| i.last_over_bound).collect()),
        makespan_over_bound: max(fetching
            .iter()
            .map(|i| i.makespan_s.map(|m| m / i.bound_s))
            .collect()),
        wan: fetching
            .iter()
            .map(|i| i.wan_in_over_size)
            .fold(0.0, f64::max),
        bridgehead_lan: fetching
            .iter()
            .map(|i| i.bridgehead_lan_over_size)
            .fold(0.0, f64::max),
        peak_gis: r.gis_requests_per_s.iter().copied().max().unwrap_or(0),
    }
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map_or("not all done".into(), |v| format!("{v:.2}"))
}

fn summary_line(mode: &str, hosts: usize, r: &Report, wall: f64) -> String {
    let w = worst(r);
    format!(
        "{mode}, {hosts} hosts per IDC: {}/{} hosts done in {:.1} simulated s ({} events, {wall:.1} s wall); worst IDC: last host / (S/B_wan) {}, makespan / (S/B_wan) {}, WAN bytes in / S {:.3}, bridgehead LAN upload / S {:.2}; GIS peak {} requests/s",
        r.done_hosts,
        r.fetching_hosts,
        r.sim_s,
        r.events,
        fmt_opt(w.last_over_bound),
        fmt_opt(w.makespan_over_bound),
        w.wan,
        w.bridgehead_lan,
        w.peak_gis
    )
}

fn summary_json(mode: &str, hosts: usize, r: &Report, wall: f64) -> serde_json::Value {
    let w = worst(r);
    serde_json::json!({
        "mode": mode,
        "hosts_per_idc": hosts,
        "idcs": r.params.idcs,
        "fetching_hosts": r.fetching_hosts,
        "done_hosts": r.done_hosts,
        "sim_s": r.sim_s,
        "events": r.events,
        "wall_s": wall,
        "worst_last_over_bound": w.last_over_bound,
        "worst_makespan_over_bound": w.makespan_over_bound,
        "worst_wan_in_over_size": w.wan,
        "worst_bridgehead_lan_over_size": w.bridgehead_lan,
        "gis_peak_requests_per_s": w.peak_gis,
    })
}

fn opt(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.4}")).unwrap_or_default()
}

/// hosts.csv and idcs.csv, one row per host (IDC) of every run.
fn write_tables(out: &Path, reports: &[(String, usize, Report, f64)]) -> Result<()> {
    let mut hosts = String::from(
        "mode,hosts_per_idc,idc,host,role,fetching,alive,start_s,provision_s,lan_recv_bytes,wan_recv_bytes,lan_sent_bytes,wan_sent_bytes,lan_rate_while_available_bytes_per_s\n",
    );
    let mut idcs = String::from(
        "mode,hosts_per_idc,idc,provider,hosts,done,mean_s,last_s,bridgehead_s,makespan_s,bound_s,last_over_bound,wan_in_bytes,wan_in_over_size,bridgehead_lan_sent_bytes,bridgehead_lan_over_size\n",
    );
    for (mode, n, r, _) in reports {
        for h in &r.hosts {
            let _ = writeln!(
                hosts,
                "{mode},{n},{},{},{},{},{},{},{},{},{},{},{},{}",
                h.idc,
                h.host,
                h.role,
                h.fetching,
                h.alive,
                opt(h.start_s),
                opt(h.provision_s),
                h.lan_recv_bytes,
                h.wan_recv_bytes,
                h.lan_sent_bytes,
                h.wan_sent_bytes,
                opt(h.lan_rate_while_available)
            );
        }
        for i in &r.idcs {
            let _ = writeln!(
                idcs,
                "{mode},{n},{},{},{},{},{},{},{},{},{:.4},{},{},{:.4},{},{:.4}",
                i.idc,
                i.provider,
                i.hosts,
                i.done,
                opt(i.mean_s),
                opt(i.last_s),
                opt(i.bridgehead_s),
                opt(i.makespan_s),
                i.bound_s,
                opt(i.last_over_bound),
                i.wan_in_bytes,
                i.wan_in_over_size,
                i.bridgehead_lan_sent_bytes,
                i.bridgehead_lan_over_size
            );
        }
    }
    for (name, text) in [("hosts.csv", hosts), ("idcs.csv", idcs)] {
        let path = out.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn series(label: String, mode: &str, points: Vec<(f64, f64)>) -> Series {
    Series {
        label,
        color: evalplot::mode_color(mode),
        dashed: false,
        points,
    }
}

fn goal(label: &str, y: f64, xs: &[f64]) -> Series {
    Series {
        label: label.into(),
        color: evalplot::REF_COLOR,
        dashed: true,
        points: xs.iter().map(|x| (*x, y)).collect(),
    }
}

/// The four figures of the issue; returns the files written.
fn plot(out: &Path, reports: &[(String, usize, Report, f64)]) -> Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    // Provision-time CDF, one series per run.
    let mut cdf = Vec::new();
    for (mode, n, r, _) in reports {
        let mut t: Vec<f64> = r.hosts.iter().filter_map(|h| h.provision_s).collect();
        t.sort_by(f64::total_cmp);
        let k = t.len().max(1) as f64;
        let pts = t
            .iter()
            .enumerate()
            .map(|(i, x)| (*x, (i + 1) as f64 / k))
            .collect();
        cdf.push(series(
            format!("{}, {n} hosts/IDC", evalplot::mode_label(mode)),
            mode,
            pts,
        ));
    }
    let panels = vec![Panel {
        title: "provision time of every host".into(),
        x_label: "provision time (s)",
        y_label: "fraction of hosts",
        log_x: false,
        series: cdf,
    }];
    let path = out.join("provision_cdf.png");
    evalplot::draw_figure(&path, "Provision-time CDF", &panels)?;
    written.push(path);
    // Last host / bound against hosts per IDC, one series per mode.
    let mut by_mode: Vec<Series> = Vec::new();
    let mut xs = Vec::new();
    for mode in reports
        .iter()
        .map(|r| r.0.clone())
        .collect::<std::collections::BTreeSet<_>>()
    {
        let pts: Vec<(f64, f64)> = reports
            .iter()
            .filter(|r| r.0 == mode)
            .filter_map(|(_, n, r, _)| worst(r).last_over_bound.map(|y| (*n as f64, y)))
            .collect();
        xs.extend(pts.iter().map(|p| p.0));
        by_mode.push(series(evalplot::mode_label(&mode), &mode, pts));
    }
    xs.sort_by(f64::total_cmp);
    xs.dedup();
    by_mode.push(goal("goal 1.3", 1.3, &xs));
    let panels = vec![Panel {
        title: "worst IDC".into(),
        x_label: "hosts per IDC",
        y_label: "last host / (S / B_wan)",
        log_x: false,
        series: by_mode,
    }];
    let path = out.join("last_host_vs_hosts.png");
    evalplot::draw_figure(&path, "Last host against hosts per IDC", &panels)?;
    written.push(path);
    // Per IDC: WAN bytes in, bridgehead LAN upload.
    for (file, title, y_label, goal_y, get) in [
        (
            "wan_bytes_per_idc.png",
            "WAN bytes into each IDC",
            "WAN bytes in / S",
            1.02,
            (|i: &bids_sim::IdcRow| i.wan_in_over_size) as fn(&bids_sim::IdcRow) -> f64,
        ),
        (
            "bridgehead_lan_upload.png",
            "Bridgehead LAN upload",
            "bridgehead LAN upload / S",
            1.5,
            |i: &bids_sim::IdcRow| i.bridgehead_lan_over_size,
        ),
    ] {
        let mut s = Vec::new();
        let mut xs = Vec::new();
        for (mode, n, r, _) in reports {
            let pts: Vec<(f64, f64)> = r
                .idcs
                .iter()
                .filter(|i| !i.provider)
                .enumerate()
                .map(|(k, i)| (k as f64, get(i)))
                .collect();
            xs.extend(pts.iter().map(|p| p.0));
            s.push(series(
                format!("{}, {n} hosts/IDC", evalplot::mode_label(mode)),
                mode,
                pts,
            ));
        }
        xs.sort_by(f64::total_cmp);
        xs.dedup();
        s.push(goal(&format!("goal {goal_y}"), goal_y, &xs));
        let panels = vec![Panel {
            title: "each fetching IDC".into(),
            x_label: "IDC",
            y_label,
            log_x: false,
            series: s,
        }];
        let path = out.join(file);
        evalplot::draw_figure(&path, title, &panels)?;
        written.push(path);
    }
    Ok(written)
}

fn run_validate(a: &SimArgs, csv: &Path) -> Result<()> {
    let text =
        std::fs::read_to_string(csv).with_context(|| format!("reading {}", csv.display()))?;
    let cs = validate::compare(&text, 8, a.validate_seeds, |c| {
        let (m, l, w) = c.ratios();
        eprintln!(
            "{} {} B, WAN {} Mbit/s, {} ms: mean {:.2} s (netns {:.2}, x{m:.2}), last {:.2} s (netns {:.2}, x{l:.2}), WAN bytes x{w:.3}",
            c.mode, c.image_bytes, c.wan_mbit, c.delay_ms, c.sim_mean_s, c.netns_mean_s,
            c.sim_last_s, c.netns_last_s
        );
    })
    .map_err(anyhow::Error::msg)?;
    if cs.is_empty() {
        bail!("{} has no run with 8 hosts to compare with", csv.display());
    }
    let path = a.out.join("validation.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&cs)?)
        .with_context(|| format!("writing {}", path.display()))?;
    for (mode, rows) in validate::by_mode(&cs) {
        let within = |f: fn(&Comparison) -> f64, tol: f64| {
            rows.iter().filter(|c| (f(c) - 1.0).abs() <= tol).count()
        };
        eprintln!(
            "{mode}: {} parameter sets; mean within 15 %: {}, last host within 15 %: {}, WAN bytes within 2 %: {}",
            rows.len(),
            within(|c| c.ratios().0, 0.15),
            within(|c| c.ratios().1, 0.15),
            within(|c| c.ratios().2, 0.02)
        );
    }
    if a.json {
        outln!("{}", serde_json::to_string_pretty(&cs)?);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_specs_parse_and_bad_ones_say_how() {
        assert_eq!(
            parse_fault("bridgehead:3@10+5"),
            Ok(Fault::Bridgehead {
                idc: 3,
                at_s: 10.0,
                for_s: 5.0
            })
        );
        assert_eq!(
            parse_fault("host:0/7@2.5"),
            Ok(Fault::Host {
                idc: 0,
                host: 7,
                at_s: 2.5,
                for_s: 0.0
            })
        );
        assert_eq!(
            parse_fault("gis@1+4"),
            Ok(Fault::Gis {
                at_s: 1.0,
                for_s: 4.0
            })
        );
        for bad in [
            "gis@1",
            "host:0@1",
            "disk:0@1",
            "bridgehead:x@1",
            "bridgehead:1@-2",
        ] {
            let e = parse_fault(bad).unwrap_err();
            assert!(e.contains("use bridgehead:IDC@T"), "{bad}: {e}");
        }
    }
}
