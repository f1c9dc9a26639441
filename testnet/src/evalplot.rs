//! The plots of the netns evaluation (`bids testnet eval-plot`): reads the `runs.csv` that
//! `testnet/eval.sh` writes and draws the paper's Fig. 6 (provision time vs WAN bandwidth),
//! Fig. 7 (chunks entering the requester IDC over the WAN), Fig. 8 (provision time vs
//! delay) and, beyond the paper, the last host against the number of hosts per IDC (LAN
//! swarming) as PNGs, one panel per image size. Running the experiment is left to the script.
//!
//! Text is drawn with `ab_glyph` from a TrueType file read at run time (DejaVu Sans by
//! default), so the binary needs no fontconfig or system font library.

use plotters::prelude::*;
use plotters::style::FontStyle;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} line {line}: {why}")]
    Csv {
        path: PathBuf,
        line: usize,
        why: String,
    },
    #[error(
        "no TrueType font found (tried {tried}); install fonts-dejavu-core or pass --font FILE"
    )]
    NoFont { tried: String },
    #[error("font {0} is not a usable TrueType/OpenType font")]
    BadFont(PathBuf),
    #[error("drawing {path}: {why}")]
    Draw { path: PathBuf, why: String },
}

/// One row of `runs.csv` (the columns the plots need; others are ignored).
#[derive(Clone, Debug, PartialEq)]
pub struct Run {
    pub mode: String,
    /// `bw` (Fig. 6/7), `delay` (Fig. 8), or empty (all figures).
    pub sweep: String,
    pub image_bytes: u64,
    pub chunk_bytes: u64,
    pub wan_mbit: f64,
    pub delay_ms: f64,
    pub hosts: u32,
    pub provision_s_mean: f64,
    pub provision_s_max: f64,
    pub wan_in_bytes_kernel: u64,
    pub wan_in_bytes_nodes: u64,
    /// Every copy bit-exact and every fetch done (`verified` column; true when absent).
    pub verified: bool,
}

/// Parses `runs.csv` (comma-separated, a header line naming the columns, no quoting).
pub fn parse_runs(text: &str, path: &Path) -> Result<Vec<Run>, PlotError> {
    let err = |line: usize, why: String| PlotError::Csv {
        path: path.to_path_buf(),
        line,
        why,
    };
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    let Some((_, header)) = lines.next() else {
        return Err(err(1, "empty file".into()));
    };
    let cols: Vec<&str> = header.split(',').map(str::trim).collect();
    let col = |name: &str| cols.iter().position(|c| *c == name);
    let need = |name: &str| col(name).ok_or_else(|| err(1, format!("no column {name:?}")));
    let (mode, image, wan, delay, hosts, mean, max, kern, nodes) = (
        need("mode")?,
        need("image_bytes")?,
        need("wan_mbit")?,
        need("delay_ms")?,
        need("hosts")?,
        need("provision_s_mean")?,
        need("provision_s_max")?,
        need("wan_in_bytes_kernel")?,
        need("wan_in_bytes_nodes")?,
    );
    let (sweep, chunk, verified) = (col("sweep"), col("chunk_bytes"), col("verified"));
    let mut runs = Vec::new();
    for (i, l) in lines {
        let f: Vec<&str> = l.split(',').map(str::trim).collect();
        let get = |c: usize| {
            f.get(c)
                .copied()
                .ok_or_else(|| err(i + 1, format!("missing field {}", cols[c])))
        };
        let num = |c: usize| -> Result<f64, PlotError> {
            let v = get(c)?;
            v.parse::<f64>()
                .ok()
                .filter(|x| x.is_finite())
                .ok_or_else(|| err(i + 1, format!("{} = {v:?} is not a number", cols[c])))
        };
        runs.push(Run {
            mode: get(mode)?.to_string(),
            sweep: match sweep {
                Some(c) => get(c)?.to_string(),
                None => String::new(),
            },
            image_bytes: num(image)? as u64,
            chunk_bytes: match chunk {
                Some(c) => num(c)? as u64,
                None => 0,
            },
            wan_mbit: num(wan)?,
            delay_ms: num(delay)?,
            hosts: num(hosts)? as u32,
            provision_s_mean: num(mean)?,
            provision_s_max: num(max)?,
            wan_in_bytes_kernel: num(kern)? as u64,
            wan_in_bytes_nodes: num(nodes)? as u64,
            verified: match verified {
                Some(c) => num(c)? != 0.0,
                None => true,
            },
        });
    }
    Ok(runs)
}

pub fn read_runs(path: &Path) -> Result<Vec<Run>, PlotError> {
    let text = std::fs::read_to_string(path).map_err(|source| PlotError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_runs(&text, path)
}

/// Where Debian, Fedora and Arch put DejaVu Sans.
const FONT_CANDIDATES: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

/// Registers the font plotters draws all text with (`sans-serif`).
pub fn load_font(explicit: Option<&Path>) -> Result<PathBuf, PlotError> {
    let tried: Vec<PathBuf> = match explicit {
        Some(p) => vec![p.to_path_buf()],
        None => FONT_CANDIDATES.iter().map(PathBuf::from).collect(),
    };
    let Some(path) = tried.iter().find(|p| p.is_file()).cloned() else {
        return Err(PlotError::NoFont {
            tried: tried
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        });
    };
    let bytes = std::fs::read(&path).map_err(|source| PlotError::Read {
        path: path.clone(),
        source,
    })?;
    // plotters keeps fonts for the life of the process; one leaked font file is that.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| PlotError::BadFont(path.clone()))?;
    Ok(path)
}

/// A series of one figure panel: a line through its points (dashed for a reference).
pub struct Series {
    pub label: String,
    pub color: RGBColor,
    pub dashed: bool,
    pub points: Vec<(f64, f64)>,
}

/// One panel of a figure.
pub struct Panel {
    pub title: String,
    pub x_label: &'static str,
    pub y_label: &'static str,
    pub log_x: bool,
    pub series: Vec<Series>,
}

pub const BIDS_COLOR: RGBColor = RGBColor(31, 119, 180);
pub const BASE_COLOR: RGBColor = RGBColor(214, 39, 40);
pub const REF_COLOR: RGBColor = RGBColor(110, 110, 110);

/// The colour of a mode's series (`bids` or `baseline`).
pub fn mode_color(mode: &str) -> RGBColor {
    if mode.eq_ignore_ascii_case("bids") {
        BIDS_COLOR
    } else {
        BASE_COLOR
    }
}

/// How a mode is named in legends.
pub fn mode_label(mode: &str) -> String {
    if mode.eq_ignore_ascii_case("bids") {
        "BIDS".into()
    } else if mode.eq_ignore_ascii_case("baseline") {
        "Baseline".into()
    } else {
        mode.to_string()
    }
}

fn size_label(bytes: u64) -> String {
    format!("{:.1} MB image", bytes as f64 / 1e6)
}

/// Rows of one sweep grouped by image size, then mode; points sorted by `x`.
fn grouped<'a>(runs: &'a [Run], sweep: &str) -> BTreeMap<u64, BTreeMap<String, Vec<&'a Run>>> {
    let mut g: BTreeMap<u64, BTreeMap<String, Vec<&Run>>> = BTreeMap::new();
    for r in runs
        .iter()
        .filter(|r| r.sweep.is_empty() || r.sweep == sweep)
    {
        g.entry(r.image_bytes)
            .or_default()
            .entry(r.mode.to_ascii_lowercase())
            .or_default()
            .push(r);
    }
    g
}

/// The series of `rows` as (x, y) sorted by x; repeated runs at one x become their mean.
fn points(rows: &[&Run], x: impl Fn(&Run) -> f64, y: impl Fn(&Run) -> f64) -> Vec<(f64, f64)> {
    let mut p: Vec<(f64, f64)> = rows.iter().map(|r| (x(r), y(r))).collect();
    p.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut out: Vec<(f64, f64, usize)> = Vec::new();
    for (px, py) in p {
        match out.last_mut() {
            Some((lx, sum, n)) if *lx == px => {
                *sum += py;
                *n += 1;
            }
            _ => out.push((px, py, 1)),
        }
    }
    out.into_iter()
        .map(|(x, sum, n)| (x, sum / n as f64))
        .collect()
}

fn fig6(runs: &[Run]) -> Vec<Panel> {
    grouped(runs, "bw")
        .into_iter()
        .map(|(size, modes)| {
            let mut series = Vec::new();
            let mut bws: Vec<f64> = Vec::new();
            for (mode, rows) in &modes {
                let c = mode_color(mode);
                bws.extend(rows.iter().map(|r| r.wan_mbit));
                series.push(Series {
                    label: format!("{} mean", mode_label(mode)),
                    color: c,
                    dashed: false,
                    points: points(rows, |r| r.wan_mbit, |r| r.provision_s_mean),
                });
                series.push(Series {
                    label: format!("{} last host", mode_label(mode)),
                    color: c,
                    dashed: true,
                    points: points(rows, |r| r.wan_mbit, |r| r.provision_s_max),
                });
            }
            bws.sort_by(f64::total_cmp);
            bws.dedup();
            series.push(Series {
                label: "S / B_wan".into(),
                color: REF_COLOR,
                dashed: true,
                points: bws
                    .iter()
                    .map(|b| (*b, size as f64 * 8.0 / (b * 1e6)))
                    .collect(),
            });
            Panel {
                title: size_label(size),
                x_label: "WAN bandwidth (Mbit/s, log)",
                y_label: "provision time (s)",
                log_x: true,
                series,
            }
        })
        .collect()
}

fn fig7(runs: &[Run]) -> Vec<Panel> {
    grouped(runs, "bw")
        .into_iter()
        .map(|(size, modes)| {
            let chunk = modes
                .values()
                .flatten()
                .map(|r| r.chunk_bytes)
                .find(|c| *c > 0);
            // Chunks when the chunk size is known, otherwise image copies.
            let (unit, y_label) = match chunk {
                Some(c) => (c as f64, "chunks into requester IDC over WAN"),
                None => (size as f64, "image copies into requester IDC over WAN"),
            };
            let mut series = Vec::new();
            let mut bws: Vec<f64> = Vec::new();
            for (mode, rows) in &modes {
                let c = mode_color(mode);
                bws.extend(rows.iter().map(|r| r.wan_mbit));
                series.push(Series {
                    label: format!("{} (nodes' payload)", mode_label(mode)),
                    color: c,
                    dashed: false,
                    points: points(rows, |r| r.wan_mbit, |r| r.wan_in_bytes_nodes as f64 / unit),
                });
                series.push(Series {
                    label: format!("{} (kernel, WAN link)", mode_label(mode)),
                    color: c,
                    dashed: true,
                    points: points(
                        rows,
                        |r| r.wan_mbit,
                        |r| r.wan_in_bytes_kernel as f64 / unit,
                    ),
                });
            }
            bws.sort_by(f64::total_cmp);
            bws.dedup();
            series.push(Series {
                label: "one image".into(),
                color: REF_COLOR,
                dashed: true,
                points: bws.iter().map(|b| (*b, size as f64 / unit)).collect(),
            });
            Panel {
                title: size_label(size),
                x_label: "WAN bandwidth (Mbit/s, log)",
                y_label,
                log_x: true,
                series,
            }
        })
        .collect()
}

fn fig8(runs: &[Run]) -> Vec<Panel> {
    grouped(runs, "delay")
        .into_iter()
        .map(|(size, modes)| {
            let mut series = Vec::new();
            let mut bw = None;
            for (mode, rows) in &modes {
                let c = mode_color(mode);
                bw = bw.or(rows.first().map(|r| r.wan_mbit));
                series.push(Series {
                    label: format!("{} mean", mode_label(mode)),
                    color: c,
                    dashed: false,
                    points: points(rows, |r| r.delay_ms, |r| r.provision_s_mean),
                });
                series.push(Series {
                    label: format!("{} last host", mode_label(mode)),
                    color: c,
                    dashed: true,
                    points: points(rows, |r| r.delay_ms, |r| r.provision_s_max),
                });
            }
            Panel {
                title: match bw {
                    Some(b) => format!("{}, WAN {b} Mbit/s", size_label(size)),
                    None => size_label(size),
                },
                x_label: "WAN delay between IDCs, one-way (ms)",
                y_label: "provision time (s)",
                log_x: false,
                series,
            }
        })
        .collect()
}

/// The last host's provision time ÷ S/B_wan against the hosts of the requester IDC (the
/// `hosts` sweep), BIDS and Baseline, with the goal (1.3) as a reference line. Failed runs
/// (a fetch that never finished has no provision time) are left out.
fn fig_hosts(runs: &[Run]) -> Vec<Panel> {
    let done: Vec<Run> = runs.iter().filter(|r| r.verified).cloned().collect();
    grouped(&done, "hosts")
        .into_iter()
        .filter(|(_, modes)| modes.values().flatten().any(|r| r.sweep == "hosts"))
        .map(|(size, modes)| {
            let mut series = Vec::new();
            let (mut xs, mut bw) = (Vec::new(), None);
            for (mode, rows) in &modes {
                bw = bw.or(rows.first().map(|r| r.wan_mbit));
                xs.extend(rows.iter().map(|r| r.hosts as f64));
                series.push(Series {
                    label: format!("{} last host", mode_label(mode)),
                    color: mode_color(mode),
                    dashed: false,
                    points: points(
                        rows,
                        |r| r.hosts as f64,
                        |r| r.provision_s_max / (r.image_bytes as f64 * 8.0 / (r.wan_mbit * 1e6)),
                    ),
                });
            }
            xs.sort_by(f64::total_cmp);
            xs.dedup();
            series.push(Series {
                label: "goal 1.3".into(),
                color: REF_COLOR,
                dashed: true,
                points: xs.iter().map(|x| (*x, 1.3)).collect(),
            });
            Panel {
                title: match bw {
                    Some(b) => format!("{}, WAN {b} Mbit/s", size_label(size)),
                    None => size_label(size),
                },
                x_label: "hosts in the requester IDC",
                y_label: "last host / (S / B_wan)",
                log_x: false,
                series,
            }
        })
        .collect()
}

fn bounds(panel: &Panel) -> ((f64, f64), (f64, f64)) {
    let pts = panel.series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y1) = (f64::MAX, f64::MIN, 0.0f64);
    for (x, y) in pts {
        x0 = x0.min(*x);
        x1 = x1.max(*x);
        y1 = y1.max(*y);
    }
    if x0 > x1 {
        (x0, x1) = (1.0, 10.0);
    }
    if panel.log_x {
        (x0, x1) = (x0.max(1e-3) / 1.25, x1.max(1e-3) * 1.25);
    } else {
        let pad = ((x1 - x0) * 0.08).max(1.0);
        (x0, x1) = (x0 - pad, x1 + pad);
    }
    ((x0, x1), (0.0, if y1 > 0.0 { y1 * 1.15 } else { 1.0 }))
}

fn draw_series<'a, DB: DrawingBackend + 'a, X: Ranged<ValueType = f64>>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<X, plotters::coord::types::RangedCoordf64>>,
    s: &Series,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let style = s.color.stroke_width(2);
    let anno = if s.dashed {
        chart.draw_series(DashedLineSeries::new(s.points.iter().copied(), 6, 4, style))?
    } else {
        chart.draw_series(LineSeries::new(s.points.iter().copied(), style))?
    };
    let c = s.color;
    // A dashed sample has a gap in the middle; coordinates are relative to the anchor.
    let gap = if s.dashed { 4 } else { 0 };
    anno.label(s.label.clone()).legend(move |(x, y)| {
        EmptyElement::at((x, y))
            + PathElement::new(vec![(0, 0), (9 - gap, 0)], c.stroke_width(2))
            + PathElement::new(vec![(9 + gap, 0), (18, 0)], c.stroke_width(2))
    });
    let fill = s.color.filled();
    chart.draw_series(
        s.points
            .iter()
            .map(move |p| Circle::new(*p, if s.dashed { 2 } else { 3 }, fill)),
    )?;
    Ok(())
}

/// Draws `panels` side by side into the PNG `path`, under `title`. A font must have been
/// registered with [`load_font`] first.
pub fn draw_figure(path: &Path, title: &str, panels: &[Panel]) -> Result<(), PlotError> {
    let derr = |e: String| PlotError::Draw {
        path: path.to_path_buf(),
        why: e,
    };
    let n = panels.len().max(1) as u32;
    // No minor grid lines (white on white): they cost most of the PNG size.
    let root = BitMapBackend::new(path, (480 * n, 400)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| derr(e.to_string()))?;
    let root = root
        .titled(title, ("sans-serif", 22))
        .map_err(|e| derr(e.to_string()))?;
    let areas = root.split_evenly((1, n as usize));
    for (i, (panel, area)) in panels.iter().zip(areas.iter()).enumerate() {
        let ((x0, x1), (y0, y1)) = bounds(panel);
        let caption = format!("({}) {}", (b'a' + i as u8) as char, panel.title);
        let mut b = ChartBuilder::on(area);
        b.caption(caption, ("sans-serif", 17))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(58);
        if panel.log_x {
            let mut chart = b
                .build_cartesian_2d((x0..x1).log_scale(), y0..y1)
                .map_err(|e| derr(e.to_string()))?;
            // A log axis's own ticks crowd together near each power of ten: label 1, 2, 5 × 10^k.
            let fmt = |v: &f64| {
                let m = v / 10f64.powf(v.log10().floor());
                if [1.0, 2.0, 5.0].iter().any(|x| (m - x).abs() < 0.01) {
                    format!("{v:.0}")
                } else {
                    String::new()
                }
            };
            chart
                .configure_mesh()
                .x_desc(panel.x_label)
                .y_desc(panel.y_label)
                .light_line_style(WHITE)
                .x_labels(30)
                .x_label_formatter(&fmt)
                .y_label_formatter(&|v| format!("{v:.0}"))
                .draw()
                .map_err(|e| derr(e.to_string()))?;
            for s in &panel.series {
                draw_series(&mut chart, s).map_err(|e| derr(e.to_string()))?;
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .position(SeriesLabelPosition::UpperRight)
                .label_font(("sans-serif", 12))
                .draw()
                .map_err(|e| derr(e.to_string()))?;
        } else {
            let mut chart = b
                .build_cartesian_2d(x0..x1, y0..y1)
                .map_err(|e| derr(e.to_string()))?;
            chart
                .configure_mesh()
                .x_desc(panel.x_label)
                .y_desc(panel.y_label)
                .light_line_style(WHITE)
                .y_label_formatter(&|v| format!("{v:.1}"))
                .draw()
                .map_err(|e| derr(e.to_string()))?;
            for s in &panel.series {
                draw_series(&mut chart, s).map_err(|e| derr(e.to_string()))?;
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .position(SeriesLabelPosition::LowerRight)
                .label_font(("sans-serif", 12))
                .draw()
                .map_err(|e| derr(e.to_string()))?;
        }
    }
    root.present().map_err(|e| derr(e.to_string()))?;
    Ok(())
}

/// Draws the figures that `runs` has data for into `out`; returns the files written.
/// A font must have been registered with [`load_font`] first.
pub fn plot_all(runs: &[Run], out: &Path) -> Result<Vec<PathBuf>, PlotError> {
    std::fs::create_dir_all(out).map_err(|source| PlotError::Read {
        path: out.to_path_buf(),
        source,
    })?;
    let figs: [(&str, &str, Vec<Panel>); 4] = [
        (
            "fig6_provision_vs_bandwidth.png",
            "Fig. 6: provision time vs WAN bandwidth",
            fig6(runs),
        ),
        (
            "fig7_wan_chunks_vs_bandwidth.png",
            "Fig. 7: WAN consumption of the requester IDC",
            fig7(runs),
        ),
        (
            "fig8_provision_vs_delay.png",
            "Fig. 8: provision time vs WAN delay",
            fig8(runs),
        ),
        (
            "fig_hosts_last_host_vs_hosts.png",
            "LAN swarming: last host against hosts per IDC",
            fig_hosts(runs),
        ),
    ];
    let mut written = Vec::new();
    for (file, title, panels) in figs {
        if panels.is_empty() {
            continue;
        }
        let path = out.join(file);
        draw_figure(&path, title, &panels)?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CSV: &str = "mode,image_bytes,wan_mbit,delay_ms,hosts,provision_s_mean,provision_s_max,wan_in_bytes_kernel,wan_in_bytes_nodes,sweep,chunk_bytes\n\
bids,1048576,10,15,8,1.5,2.0,1100000,1048576,bw,262144\n\
baseline,1048576,10,15,8,6.0,9.0,5000000,4800000,bw,262144\n\
bids,1048576,34,15,8,0.6,0.8,1100000,1048576,bw,262144\n\
baseline,1048576,34,15,8,2.0,3.0,3000000,2900000,bw,262144\n\
bids,1048576,10,10,8,1.5,2.0,1100000,1048576,delay,262144\n\
bids,1048576,10,50,8,1.6,2.1,1100000,1048576,delay,262144\n\
bids,1048576,34,15,8,0.3,0.33,1100000,1048576,hosts,262144\n\
bids,1048576,34,15,16,0.3,0.35,1100000,1048576,hosts,262144\n\
baseline,1048576,34,15,8,0.5,0.6,3000000,2900000,hosts,262144\n";
    /// The same with a `verified` column: the failed run (0) is left out of the hosts figure.
    const CSV_VERIFIED: &str = "mode,image_bytes,wan_mbit,delay_ms,hosts,provision_s_mean,provision_s_max,wan_in_bytes_kernel,wan_in_bytes_nodes,sweep,chunk_bytes,verified\n\
bids,1048576,34,15,8,0.3,0.33,1100000,1048576,hosts,262144,1\n\
bids,1048576,34,15,32,0.0,0.0,1100000,1048576,hosts,262144,0\n";

    #[test]
    fn parses_by_column_name() {
        let runs = parse_runs(CSV, Path::new("runs.csv")).unwrap();
        assert_eq!(runs.len(), 9);
        assert_eq!(runs[1].mode, "baseline");
        assert_eq!(runs[1].wan_in_bytes_kernel, 5_000_000);
        assert_eq!(runs[5].sweep, "delay");
        assert_eq!(runs[5].chunk_bytes, 262_144);
        // Column order is free; optional columns may be absent.
        let swapped = "hosts,mode,image_bytes,wan_mbit,delay_ms,provision_s_mean,provision_s_max,wan_in_bytes_kernel,wan_in_bytes_nodes\n8,bids,10,1,2,3,4,5,6\n";
        let r = parse_runs(swapped, Path::new("x")).unwrap();
        assert_eq!(
            (r[0].hosts, r[0].image_bytes, r[0].sweep.as_str()),
            (8, 10, "")
        );
        assert!(parse_runs("mode,image_bytes\nbids,1\n", Path::new("x")).is_err());
        let bad = CSV.replace("1.5,2.0,1100000", "fast,2.0,1100000");
        assert!(parse_runs(&bad, Path::new("x")).is_err());
    }

    #[test]
    fn figures_take_their_sweeps() {
        let runs = parse_runs(CSV, Path::new("runs.csv")).unwrap();
        let f6 = fig6(&runs);
        assert_eq!(f6.len(), 1);
        // BIDS mean/max, Baseline mean/max, and the S/B reference.
        assert_eq!(f6[0].series.len(), 5);
        let bids_mean = f6[0]
            .series
            .iter()
            .find(|s| s.label == "BIDS mean")
            .unwrap();
        assert_eq!(bids_mean.points, vec![(10.0, 1.5), (34.0, 0.6)]);
        let f7 = fig7(&runs);
        let base_nodes = f7[0]
            .series
            .iter()
            .find(|s| s.label.starts_with("Baseline (nodes"))
            .unwrap();
        // 4 800 000 bytes in 256 KiB chunks.
        assert!((base_nodes.points[0].1 - 4_800_000.0 / 262_144.0).abs() < 1e-9);
        let f8 = fig8(&runs);
        assert_eq!(f8[0].series[0].points, vec![(10.0, 1.5), (50.0, 1.6)]);
        let fh = fig_hosts(&runs);
        assert_eq!(fh.len(), 1);
        let bids = &fh[0].series[1];
        assert_eq!(bids.label, "BIDS last host");
        let bound = 1048576.0 * 8.0 / 34e6;
        assert_eq!(bids.points.len(), 2);
        assert!(
            (bids.points[1].1 - 0.35 / bound).abs() < 1e-9,
            "{:?}",
            bids.points
        );
        assert_eq!(bids.points[1].0, 16.0);
        let v = parse_runs(CSV_VERIFIED, Path::new("runs.csv")).unwrap();
        assert!(v[0].verified && !v[1].verified);
        assert_eq!(
            fig_hosts(&v)[0].series[0].points.len(),
            1,
            "the failed run is left out"
        );
        // Repeated runs at one delay are averaged into one point.
        let mut rep = runs.clone();
        rep.push(Run {
            provision_s_mean: 1.8,
            ..runs[5].clone()
        });
        let f8 = fig8(&rep);
        let p = &f8[0].series[0].points;
        assert_eq!(p.len(), 2);
        assert!((p[1].1 - 1.7).abs() < 1e-9, "{p:?}");
    }

    #[test]
    fn draws_pngs_when_a_font_is_installed() {
        // Machines without DejaVu cannot draw text; the parsing tests above still run there.
        if load_font(None).is_err() {
            eprintln!("skipping: no DejaVu Sans font installed");
            return;
        }
        let runs = parse_runs(CSV, Path::new("runs.csv")).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let files = plot_all(&runs, dir.path()).unwrap();
        assert_eq!(files.len(), 4);
        for f in files {
            let bytes = std::fs::read(&f).unwrap();
            assert_eq!(&bytes[1..4], b"PNG", "{}", f.display());
            assert!(bytes.len() > 5_000, "{} is suspiciously small", f.display());
        }
    }
}
