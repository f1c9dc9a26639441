//! Progress display: an indicatif bar on a terminal, plain lines otherwise (logs, CI).

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

pub struct Progress {
    bar: Option<ProgressBar>,
    what: String,
    last_line: Instant,
    last_pct: u64,
}

impl Progress {
    pub fn new(what: &str, total: u64, unit_bytes: bool) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let pb = ProgressBar::new(total);
            let tmpl = if unit_bytes {
                "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}"
            } else {
                "{msg} [{bar:40}] {pos}/{len} chunks {per_sec} eta {eta}"
            };
            if let Ok(style) = ProgressStyle::with_template(tmpl) {
                pb.set_style(style.progress_chars("=> "));
            }
            pb.set_message(what.to_string());
            pb
        });
        Progress {
            bar,
            what: what.to_string(),
            last_line: Instant::now(),
            last_pct: 0,
        }
    }

    /// A count of `unit` (hosts done, say) rather than bytes or chunks.
    pub fn counting(what: &str, total: u64, unit: &str) -> Self {
        let mut p = Progress::new(what, total, false);
        if let Some(b) = &p.bar {
            let tmpl = format!("{{msg}} [{{bar:40}}] {{pos}}/{{len}} {unit} {{elapsed}}");
            if let Ok(style) = ProgressStyle::with_template(&tmpl) {
                b.set_style(style.progress_chars("=> "));
            }
        }
        p.what = what.to_string();
        p
    }

    /// Changes the message shown beside the bar.
    pub fn message(&self, msg: String) {
        if let Some(b) = &self.bar {
            b.set_message(msg);
        }
    }

    pub fn set(&mut self, done: u64, total: u64) {
        match &self.bar {
            Some(b) => {
                b.set_length(total);
                b.set_position(done);
            }
            None => {
                let pct = (done * 100).checked_div(total).unwrap_or(100);
                if pct >= self.last_pct + 10
                    || (self.last_line.elapsed() > Duration::from_secs(2) && pct != self.last_pct)
                {
                    eprintln!("{}: {done}/{total} ({pct}%)", self.what);
                    self.last_pct = pct;
                    self.last_line = Instant::now();
                }
            }
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish();
        }
    }
}
