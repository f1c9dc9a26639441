//! Validation against the netns evaluation: the runs `testnet/eval.sh` recorded (its
//! `runs.csv`) are simulated with the same parameters, and the simulator's mean and last
//! host provision times and WAN bytes are compared with what the real nodes did.

use crate::world::{Params, World};
use bids_protocols::Policy;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One parameter set of the recorded runs, with their means and the simulator's.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Comparison {
    pub mode: String,
    pub image_bytes: u64,
    pub wan_mbit: f64,
    pub delay_ms: f64,
    pub hosts: usize,
    /// Recorded runs of this set, and simulated seeds.
    pub runs: usize,
    pub seeds: usize,
    pub netns_mean_s: f64,
    pub netns_last_s: f64,
    pub netns_wan_bytes: f64,
    pub sim_mean_s: f64,
    pub sim_last_s: f64,
    pub sim_wan_bytes: f64,
}

impl Comparison {
    /// Simulated over recorded, for the mean, the last host and the WAN bytes.
    pub fn ratios(&self) -> (f64, f64, f64) {
        (
            self.sim_mean_s / self.netns_mean_s,
            self.sim_last_s / self.netns_last_s,
            self.sim_wan_bytes / self.netns_wan_bytes,
        )
    }
}

#[derive(Clone, Debug, PartialEq, PartialOrd)]
struct Key {
    mode: String,
    image_bytes: u64,
    wan_mbit: f64,
    delay_ms: f64,
    hosts: usize,
    chunk_bytes: u32,
    providers: usize,
    lan_mbit: f64,
}

#[derive(Default)]
struct Sums {
    n: usize,
    mean: f64,
    last: f64,
    wan: f64,
}

/// The recorded runs of `runs_csv` with `hosts` hosts, grouped by parameter set.
fn recorded(runs_csv: &str, hosts: usize) -> Result<Vec<(Key, Sums)>, String> {
    let mut lines = runs_csv.lines();
    let header: Vec<&str> = lines
        .next()
        .ok_or("runs.csv is empty")?
        .split(',')
        .collect();
    let col = |name: &str| header.iter().position(|h| *h == name);
    let need = |name: &str| col(name).ok_or(format!("runs.csv has no column {name}"));
    let (c_mode, c_size, c_wan, c_delay, c_hosts) = (
        need("mode")?,
        need("image_bytes")?,
        need("wan_mbit")?,
        need("delay_ms")?,
        need("hosts")?,
    );
    let (c_mean, c_max, c_nodes) = (
        need("provision_s_mean")?,
        need("provision_s_max")?,
        need("wan_in_bytes_nodes")?,
    );
    let (c_chunk, c_prov, c_lan, c_faults) = (
        col("chunk_bytes"),
        col("providers"),
        col("lan_mbit"),
        col("faults"),
    );
    let mut groups: Vec<(Key, Sums)> = Vec::new();
    for (i, line) in lines.enumerate() {
        let f: Vec<&str> = line.split(',').collect();
        let get = |c: usize| {
            f.get(c)
                .copied()
                .ok_or(format!("runs.csv line {}: too few fields", i + 2))
        };
        let num = |c: usize| -> Result<f64, String> {
            get(c)?
                .parse::<f64>()
                .map_err(|e| format!("runs.csv line {}: {e}", i + 2))
        };
        let opt =
            |c: Option<usize>, d: f64| c.and_then(|c| f.get(c)?.parse::<f64>().ok()).unwrap_or(d);
        if num(c_hosts)? as usize != hosts || opt(c_faults, 0.0) != 0.0 {
            continue;
        }
        let key = Key {
            mode: get(c_mode)?.to_string(),
            image_bytes: num(c_size)? as u64,
            wan_mbit: num(c_wan)?,
            delay_ms: num(c_delay)?,
            hosts,
            chunk_bytes: opt(c_chunk, 258_048.0) as u32,
            providers: opt(c_prov, 4.0) as usize,
            lan_mbit: opt(c_lan, 200.0),
        };
        let (mean, last, wan) = (num(c_mean)?, num(c_max)?, num(c_nodes)?);
        let at = match groups.iter().position(|(k, _)| *k == key) {
            Some(at) => at,
            None => {
                groups.push((key, Sums::default()));
                groups.len() - 1
            }
        };
        let s = &mut groups[at].1;
        s.n += 1;
        s.mean += mean;
        s.last += last;
        s.wan += wan;
    }
    Ok(groups)
}

/// Simulates every parameter set of `runs_csv` with `hosts` hosts (the netns
/// evaluation's are 8) over `seeds` seeds, and compares the means.
pub fn compare(
    runs_csv: &str,
    hosts: usize,
    seeds: u64,
    mut each: impl FnMut(&Comparison),
) -> Result<Vec<Comparison>, String> {
    let mut out = Vec::new();
    for (k, s) in recorded(runs_csv, hosts)? {
        let policy = match k.mode.as_str() {
            "bids" => Policy::Bids,
            "baseline" => Policy::Baseline,
            other => return Err(format!("runs.csv names an unknown mode {other:?}")),
        };
        let mut sim = Sums::default();
        for seed in 1..=seeds.max(1) {
            let p = Params {
                idcs: 1,
                hosts_per_idc: hosts + 1,
                providers: k.providers,
                provider_hosts: 2,
                size: k.image_bytes,
                chunk_size: k.chunk_bytes,
                wan_mbit: k.wan_mbit,
                lan_mbit: k.lan_mbit,
                delay_ms: k.delay_ms,
                policy,
                seed,
                ..Params::default()
            };
            let r = World::new(p)?.run(|_| {});
            let idc = r
                .idcs
                .iter()
                .find(|i| !i.provider)
                .ok_or("the simulation has no fetching IDC")?;
            sim.n += 1;
            sim.mean += idc.mean_s.unwrap_or(f64::NAN);
            sim.last += idc.last_s.unwrap_or(f64::NAN);
            sim.wan += idc.wan_in_bytes as f64;
        }
        let (rn, sn) = (s.n as f64, sim.n as f64);
        let c = Comparison {
            mode: k.mode.clone(),
            image_bytes: k.image_bytes,
            wan_mbit: k.wan_mbit,
            delay_ms: k.delay_ms,
            hosts,
            runs: s.n,
            seeds: sim.n,
            netns_mean_s: s.mean / rn,
            netns_last_s: s.last / rn,
            netns_wan_bytes: s.wan / rn,
            sim_mean_s: sim.mean / sn,
            sim_last_s: sim.last / sn,
            sim_wan_bytes: sim.wan / sn,
        };
        each(&c);
        out.push(c);
    }
    Ok(out)
}

/// Parameter sets by mode, for a summary line.
pub fn by_mode(cs: &[Comparison]) -> BTreeMap<String, Vec<&Comparison>> {
    let mut m: BTreeMap<String, Vec<&Comparison>> = BTreeMap::new();
    for c in cs {
        m.entry(c.mode.clone()).or_default().push(c);
    }
    m
}
