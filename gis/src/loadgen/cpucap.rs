//! A CPU cap for the GIS processes the benchmark starts: a cgroup of the kernel's `cpu`
//! controller with a CFS quota. Capping every GIS process at the same share of a core lets a
//! machine with few cores compare one GIS with a group of replicas as if each ran on a
//! machine of its own, instead of the replicas sharing the cores the lone GIS had to itself.
//!
//! Both cgroup versions are handled: a v2 hierarchy whose root offers the `cpu` controller
//! (`cpu.max`), or a v1 hierarchy with `cpu` mounted (`cpu.cfs_period_us` and
//! `cpu.cfs_quota_us`). Creating a cgroup needs the right to write there (root, as a rule).

use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The CFS period. Short, so that a capped process waits at most this long for its share
/// again: with the kernel's default of 100 ms a GIS at a third of a core would stall for
/// 67 ms in every 100, which is latency the benchmark would then measure.
const PERIOD_US: u64 = 10_000;
/// The smallest cap: a quota of 1 ms per period is the least the kernel accepts.
const MIN_CORES: f64 = 0.1;

/// Which cgroup interface a cap was made with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Version {
    V1,
    V2,
}

/// A cgroup with a CPU quota; removed when dropped (once the processes in it have exited).
#[derive(Debug)]
pub struct CpuCap {
    dir: PathBuf,
    cores: f64,
}

impl CpuCap {
    /// Creates the cgroup `name` with a quota of `cores` cores (at least 0.1).
    pub fn create(name: &str, cores: f64) -> anyhow::Result<CpuCap> {
        if !(cores.is_finite() && cores >= MIN_CORES) {
            bail!("a CPU cap must be at least {MIN_CORES} cores, not {cores}");
        }
        let (root, version) = find_cpu_hierarchy()?;
        let dir = root.join(name);
        std::fs::create_dir(&dir).with_context(|| {
            format!(
                "creating the cgroup {} (a CPU cap needs a writable cgroup cpu controller: run as root)",
                dir.display()
            )
        })?;
        let cap = CpuCap { dir, cores };
        let quota = (cores * PERIOD_US as f64).round() as u64;
        match version {
            Version::V2 => cap.write("cpu.max", &format!("{quota} {PERIOD_US}"))?,
            Version::V1 => {
                cap.write("cpu.cfs_period_us", &PERIOD_US.to_string())?;
                cap.write("cpu.cfs_quota_us", &quota.to_string())?;
            }
        }
        Ok(cap)
    }

    /// Removes the empty cgroups named `{prefix}{pid}-…` whose process `pid` is gone: those
    /// of a run that was killed before it could remove its own. Returns how many it removed.
    pub fn remove_orphans(prefix: &str) -> usize {
        let Ok((root, _)) = find_cpu_hierarchy() else {
            return 0;
        };
        let Ok(entries) = std::fs::read_dir(&root) else {
            return 0;
        };
        let mut removed = 0;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = name
                .strip_prefix(prefix)
                .and_then(|rest| rest.split('-').next())
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            // A cgroup that still has processes is refused by the kernel, so only empty
            // ones go, whatever happened to the pid.
            if !Path::new(&format!("/proc/{pid}")).exists() && std::fs::remove_dir(e.path()).is_ok()
            {
                removed += 1;
            }
        }
        removed
    }

    /// Moves the process `pid`, all its threads, into the cgroup.
    pub fn add(&self, pid: u32) -> anyhow::Result<()> {
        self.write("cgroup.procs", &pid.to_string())
    }

    /// The cap, in cores.
    pub fn cores(&self) -> f64 {
        self.cores
    }

    fn write(&self, file: &str, value: &str) -> anyhow::Result<()> {
        let path = self.dir.join(file);
        std::fs::write(&path, value)
            .with_context(|| format!("writing {value:?} to {}", path.display()))
    }
}

impl Drop for CpuCap {
    fn drop(&mut self) {
        // The processes were killed just before; the kernel refuses to remove a cgroup until
        // the last of them has exited, which takes a moment.
        let until = Instant::now() + Duration::from_secs(2);
        loop {
            match std::fs::remove_dir(&self.dir) {
                Ok(()) => return,
                Err(e) if Instant::now() >= until => {
                    tracing::warn!(cgroup = %self.dir.display(), error = %e, "could not remove the CPU cap's cgroup");
                    return;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

/// The root of a cgroup hierarchy that has the `cpu` controller, from /proc/self/mountinfo.
fn find_cpu_hierarchy() -> anyhow::Result<(PathBuf, Version)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")
        .context("reading /proc/self/mountinfo to find the cgroup cpu controller")?;
    let mut v1 = None;
    let mut v2 = None;
    for line in info.lines() {
        // Fields: id parent major:minor root mount-point options [optional...] - fstype source super-options
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let Some(mount_point) = left.split(' ').nth(4) else {
            continue;
        };
        let mut r = right.split(' ');
        let fstype = r.next().unwrap_or("");
        let super_options = r.nth(1).unwrap_or("");
        let point = PathBuf::from(unescape(mount_point));
        match fstype {
            "cgroup2" if v2.is_none() && offers_cpu_v2(&point) => v2 = Some(point),
            "cgroup" if v1.is_none() && super_options.split(',').any(|o| o == "cpu") => {
                v1 = Some(point)
            }
            _ => {}
        }
    }
    match (v2, v1) {
        (Some(p), _) => Ok((p, Version::V2)),
        (None, Some(p)) => Ok((p, Version::V1)),
        (None, None) => bail!(
            "no cgroup hierarchy with the cpu controller is mounted (looked for cgroup2 with cpu \
             in cgroup.subtree_control, and cgroup v1 mounted with -o cpu)"
        ),
    }
}

/// Whether a cgroup v2 root hands the `cpu` controller to the cgroups below it.
fn offers_cpu_v2(root: &Path) -> bool {
    let has = |file: &str| {
        std::fs::read_to_string(root.join(file))
            .map(|s| s.split_whitespace().any(|c| c == "cpu"))
            .unwrap_or(false)
    };
    if has("cgroup.subtree_control") {
        return true;
    }
    // Available but not enabled below the root: try to enable it.
    has("cgroup.controllers") && std::fs::write(root.join("cgroup.subtree_control"), "+cpu").is_ok()
}

/// Mount points in mountinfo escape space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && b[i + 1..i + 4].iter().all(|d| (b'0'..=b'7').contains(d))
        {
            let v = b[i + 1..i + 4]
                .iter()
                .fold(0u32, |v, d| v * 8 + u32::from(d - b'0'));
            if let Ok(v) = u8::try_from(v) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_are_unescaped() {
        assert_eq!(unescape(r"/sys/fs/cgroup/a\040b"), "/sys/fs/cgroup/a b");
        assert_eq!(unescape(r"/plain"), "/plain");
        assert_eq!(unescape(r"/odd\04"), r"/odd\04");
    }

    /// A busy loop in a cgroup capped at 0.2 cores gets about 0.2 CPU seconds a second.
    /// Where no cgroup cpu controller is writable, the cap must say so instead.
    #[test]
    fn a_capped_busy_loop_gets_its_share_and_no_more() {
        let name = format!("bids-test-cpucap-{}", std::process::id());
        let cap = match CpuCap::create(&name, 0.2) {
            Ok(cap) => cap,
            Err(e) => {
                let msg = format!("{e:#}");
                assert!(msg.contains("cgroup"), "unclear error: {msg}");
                eprintln!("no writable cgroup cpu controller here, checked the error: {msg}");
                return;
            }
        };
        assert_eq!(cap.cores(), 0.2);
        let mut child = std::process::Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .spawn()
            .expect("starting sh");
        let added = cap.add(child.id());
        let t0 = Instant::now();
        std::thread::sleep(Duration::from_millis(1500));
        let cpu = super::super::stats::proc_sample(Some(child.id())).map(|s| s.cpu_s);
        let wall = t0.elapsed().as_secs_f64();
        let _ = child.kill();
        let _ = child.wait();
        added.expect("moving the busy loop into the cgroup");
        let cpu = cpu.expect("reading the busy loop's CPU time");
        // 0.2 of the wall time, plus a tick of accounting and the moment before the move.
        assert!(
            cpu <= 0.2 * wall + 0.08,
            "capped at 0.2 cores, used {cpu:.2} s in {wall:.2} s"
        );
        assert!(cpu >= 0.02, "the busy loop hardly ran: {cpu:.2} s");
        drop(cap);
        assert!(
            !find_cpu_hierarchy()
                .expect("hierarchy")
                .0
                .join(&name)
                .exists(),
            "cgroup left behind"
        );
    }

    /// A run killed before its drops leaves an empty cgroup; the next run removes it, and
    /// leaves alone those of a process that is still running.
    #[test]
    fn cgroups_of_killed_runs_are_removed() {
        let mut gone = std::process::Command::new("true")
            .spawn()
            .expect("starting true");
        let _ = gone.wait();
        let dead = format!("bids-test-orphan-{}-1", gone.id());
        let alive = format!("bids-test-orphan-{}-1", std::process::id());
        let Ok(orphan) = CpuCap::create(&dead, 0.5) else {
            eprintln!("no writable cgroup cpu controller here");
            return;
        };
        let kept = CpuCap::create(&alive, 0.5).expect("a second cgroup");
        let root = find_cpu_hierarchy().expect("hierarchy").0;
        std::mem::forget(orphan);
        assert_eq!(CpuCap::remove_orphans("bids-test-orphan-"), 1);
        assert!(!root.join(&dead).exists());
        assert!(root.join(&alive).exists());
        drop(kept);
        assert!(!root.join(&alive).exists());
    }

    #[test]
    fn caps_below_the_kernels_least_are_refused() {
        for c in [0.0, 0.05, -1.0, f64::NAN, f64::INFINITY] {
            assert!(CpuCap::create("bids-test-never-made", c).is_err(), "{c}");
        }
    }
}
