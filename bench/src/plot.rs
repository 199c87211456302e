//! The figures, as PNG and SVG, with plotters.
//!
//! Text is drawn with a TrueType font registered at run time through plotters' `ab_glyph`
//! feature: no fontconfig or freetype needed. The font is `$VMBEAM_BENCH_FONT` or
//! [`DEFAULT_FONT`] (Debian package `fonts-dejavu-core`).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::model::{Experiment, RunRecord, System};
use crate::plan::run_group;
use crate::stats::{degradation_percent, median};
use crate::{Error, Result};

/// The font used when `VMBEAM_BENCH_FONT` is not set.
pub const DEFAULT_FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

const FAMILY: &str = "sans-serif";
const SIZE: (u32, u32) = (1000, 620);

static FONT: OnceLock<std::result::Result<(), String>> = OnceLock::new();

/// Registers the plot font once per process (`$VMBEAM_BENCH_FONT`, else [`DEFAULT_FONT`]).
pub fn ensure_font() -> Result<()> {
    let path = std::env::var_os("VMBEAM_BENCH_FONT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_FONT));
    FONT.get_or_init(|| register_font_file(&path))
        .clone()
        .map_err(|detail| Error::Font { path, detail })
}

fn register_font_file(path: &Path) -> std::result::Result<(), String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    // plotters keeps the font for the whole process: leak it once (guarded by FONT).
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font(FAMILY, FontStyle::Normal, bytes)
        .map_err(|_| "not a TrueType/OpenType font".to_string())
}

/// One named line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Series {
    /// Legend text.
    pub name: String,
    /// (x, y) points, in x order.
    pub points: Vec<(f64, f64)>,
}

/// Lines over a numeric x axis.
#[derive(Debug, Clone, PartialEq)]
pub struct LineChart {
    /// Title.
    pub title: String,
    /// X axis label.
    pub x_label: String,
    /// Y axis label.
    pub y_label: String,
    /// The lines.
    pub series: Vec<Series>,
}

/// Grouped bars: one group of bars per category, one bar per group name.
#[derive(Debug, Clone, PartialEq)]
pub struct BarChart {
    /// Title.
    pub title: String,
    /// Y axis label.
    pub y_label: String,
    /// Categories along x.
    pub categories: Vec<String>,
    /// (legend, one value per category; NaN = no bar).
    pub groups: Vec<(String, Vec<f64>)>,
}

/// A figure.
#[derive(Debug, Clone, PartialEq)]
pub enum Chart {
    /// Lines.
    Line(LineChart),
    /// Bars.
    Bar(BarChart),
}

fn colour(i: usize) -> RGBColor {
    const C: [RGBColor; 6] = [
        RGBColor(0, 114, 178),
        RGBColor(213, 94, 0),
        RGBColor(0, 158, 115),
        RGBColor(204, 121, 167),
        RGBColor(86, 86, 86),
        RGBColor(230, 159, 0),
    ];
    C[i % C.len()]
}

fn finite_max(vals: impl Iterator<Item = f64>) -> f64 {
    vals.filter(|v| v.is_finite()).fold(0.0, f64::max)
}

type DrawResult = std::result::Result<(), String>;

fn draw_line<DB: DrawingBackend>(c: &LineChart, root: &DrawingArea<DB, Shift>) -> DrawResult {
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(e)?;
    let pts = || c.series.iter().flat_map(|s| s.points.iter());
    let x_min = pts()
        .map(|p| p.0)
        .filter(|v| v.is_finite())
        .fold(f64::INFINITY, f64::min);
    let x_min = if x_min.is_finite() {
        x_min.min(0.0)
    } else {
        0.0
    };
    let mut x_max = finite_max(pts().map(|p| p.0));
    if x_max <= x_min {
        x_max = x_min + 1.0;
    }
    let y_max = finite_max(pts().map(|p| p.1)).max(1e-9) * 1.1;
    let mut chart = ChartBuilder::on(root)
        .caption(&c.title, (FAMILY, 26))
        .margin(15)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d(x_min..x_max, 0.0..y_max)
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc(&c.x_label)
        .y_desc(&c.y_label)
        .label_style((FAMILY, 16))
        .axis_desc_style((FAMILY, 18))
        .draw()
        .map_err(e)?;
    for (i, s) in c.series.iter().enumerate() {
        let col = colour(i);
        let pts: Vec<(f64, f64)> = s
            .points
            .iter()
            .copied()
            .filter(|p| p.0.is_finite() && p.1.is_finite())
            .collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), col.stroke_width(2)))
            .map_err(e)?
            .label(s.name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], col.stroke_width(2)));
        if pts.len() <= 40 {
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 4, col.filled())))
                .map_err(e)?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font((FAMILY, 16))
        .draw()
        .map_err(e)?;
    root.present().map_err(e)
}

fn draw_bar<DB: DrawingBackend>(c: &BarChart, root: &DrawingArea<DB, Shift>) -> DrawResult {
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(e)?;
    let n = c.categories.len().max(1);
    let y_max = finite_max(c.groups.iter().flat_map(|g| g.1.iter().copied())).max(1e-9) * 1.15;
    let mut chart = ChartBuilder::on(root)
        .caption(&c.title, (FAMILY, 26))
        .margin(15)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d(-0.5..(n as f64 - 0.5), 0.0..y_max)
        .map_err(e)?;
    let cats: Vec<String> = c.categories.iter().map(|c| short_label(c)).collect();
    let fmt = move |x: &f64| {
        let r = x.round();
        if (x - r).abs() < 1e-6 && r >= 0.0 {
            cats.get(r as usize).cloned().unwrap_or_default()
        } else {
            String::new()
        }
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n)
        .x_label_formatter(&fmt)
        .y_desc(&c.y_label)
        .label_style((FAMILY, 16))
        .axis_desc_style((FAMILY, 18))
        .draw()
        .map_err(e)?;
    let g = c.groups.len().max(1) as f64;
    let w = 0.8 / g;
    for (gi, (name, vals)) in c.groups.iter().enumerate() {
        let col = colour(gi);
        let x0 = -0.4 + w * gi as f64;
        let bars = vals
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_finite())
            .map(move |(ci, &v)| {
                let l = ci as f64 + x0;
                Rectangle::new([(l, 0.0), (l + w * 0.95, v)], col.filled())
            });
        chart
            .draw_series(bars)
            .map_err(e)?
            .label(name.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], col.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font((FAMILY, 16))
        .draw()
        .map_err(e)?;
    root.present().map_err(e)
}

fn draw<DB: DrawingBackend>(chart: &Chart, root: DrawingArea<DB, Shift>) -> DrawResult {
    match chart {
        Chart::Line(c) => draw_line(c, &root),
        Chart::Bar(c) => draw_bar(c, &root),
    }
}

/// Renders `chart` to `DIR/STEM.png` and `DIR/STEM.svg`; returns both paths.
pub fn render(chart: &Chart, dir: &Path, stem: &str) -> Result<(PathBuf, PathBuf)> {
    ensure_font()?;
    std::fs::create_dir_all(dir).map_err(crate::io_err(dir))?;
    let png = dir.join(format!("{stem}.png"));
    let svg = dir.join(format!("{stem}.svg"));
    let perr = |detail: String| Error::Plot {
        name: stem.to_string(),
        detail,
    };
    draw(chart, BitMapBackend::new(&png, SIZE).into_drawing_area()).map_err(perr)?;
    draw(chart, SVGBackend::new(&svg, SIZE).into_drawing_area()).map_err(perr)?;
    Ok((png, svg))
}

/// Shortens a variant label for bar-chart axes (`blanket-like 300 Mbit/s` -> `blanket 300M`).
pub fn short_label(label: &str) -> String {
    label
        .replace("blanket-like ", "blanket ")
        .replace(" Mbit/s", "M")
}

/// The label of a run's system with its network where that tells variants apart
/// (`blanket-like 300 Mbit/s`, `blanket-like unshaped`).
pub fn variant_label(r: &RunRecord) -> String {
    match r.system {
        System::BlanketLike => format!("blanket-like {}", r.settings.bandwidth_label()),
        s => s.name().to_string(),
    }
}

/// Runs measured for experiment `e` (those tagged with any experiment of its run group).
pub fn runs_for(runs: &[RunRecord], e: Experiment) -> Vec<&RunRecord> {
    let group = run_group(e);
    runs.iter()
        .filter(|r| group.contains(&r.experiment))
        .collect()
}

/// The variants present, in a stable order (zero-copy first).
pub fn variants_in(runs: &[&RunRecord]) -> Vec<String> {
    let mut v: Vec<(System, Option<u32>, String)> = runs
        .iter()
        .map(|r| (r.system, r.settings.bandwidth_mbit, variant_label(r)))
        .collect();
    v.sort_by_key(|(s, b, _)| (*s, b.map_or(u32::MAX, |b| b)));
    v.dedup_by(|a, b| a.2 == b.2);
    v.into_iter().map(|x| x.2).collect()
}

/// Median over repetitions of `value` per (variant, x), as line series.
fn median_lines(
    runs: &[&RunRecord],
    x: impl Fn(&RunRecord) -> f64,
    value: impl Fn(&RunRecord) -> Option<f64>,
) -> Vec<Series> {
    variants_in(runs)
        .into_iter()
        .map(|name| {
            let mine: Vec<&&RunRecord> = runs.iter().filter(|r| variant_label(r) == name).collect();
            let mut xs: Vec<f64> = mine.iter().map(|r| x(r)).collect();
            xs.sort_by(f64::total_cmp);
            xs.dedup();
            let points = xs
                .into_iter()
                .filter_map(|xv| {
                    let vals: Vec<f64> = mine
                        .iter()
                        .filter(|r| x(r) == xv)
                        .filter_map(|r| value(r))
                        .collect();
                    median(&vals).map(|m| (xv, m))
                })
                .collect();
            Series { name, points }
        })
        .collect()
}

fn median_bars(
    runs: &[&RunRecord],
    value: impl Fn(&RunRecord) -> Option<f64>,
) -> (Vec<String>, Vec<f64>) {
    let names = variants_in(runs);
    let vals = names
        .iter()
        .map(|n| {
            let v: Vec<f64> = runs
                .iter()
                .filter(|r| &variant_label(r) == n)
                .filter_map(|r| value(r))
                .collect();
            median(&v).unwrap_or(f64::NAN)
        })
        .collect();
    (names, vals)
}

/// Time series recorded during one run of experiments c/d (bandwidth and CPU over time).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSeries {
    /// The variant ([`variant_label`]).
    pub variant: String,
    /// (s, Mbit/s) on the cloud network.
    pub bandwidth_mbit: Vec<(f64, f64)>,
    /// (s, % of the whole host busy).
    pub cpu_percent: Vec<(f64, f64)>,
}

const MIB: f64 = 1_048_576.0;

/// Builds every figure the data supports: `(file stem, chart)`.
pub fn figures(runs: &[RunRecord], series: &[RunSeries]) -> Vec<(String, Chart)> {
    let mut out = Vec::new();
    let ab = runs_for(runs, Experiment::A);
    if !ab.is_empty() {
        let mem = |r: &RunRecord| r.settings.memory_mib as f64;
        out.push((
            "fig2a-time-vs-memory".into(),
            Chart::Line(LineChart {
                title: "Migration time vs guest memory (Fig. 2a)".into(),
                x_label: "guest memory (MiB)".into(),
                y_label: "migration time (s)".into(),
                series: median_lines(&ab, mem, |r| {
                    r.outcome.converged.then_some(r.outcome.total_ms / 1000.0)
                }),
            }),
        ));
        out.push((
            "fig2b-downtime-vs-memory".into(),
            Chart::Line(LineChart {
                title: "Downtime vs guest memory (Fig. 2b)".into(),
                x_label: "guest memory (MiB)".into(),
                y_label: "downtime (ms)".into(),
                series: median_lines(&ab, mem, |r| r.outcome.downtime_ms),
            }),
        ));
    }
    let cde = runs_for(runs, Experiment::C);
    if !series.is_empty() {
        out.push((
            "fig3a-bandwidth-over-time".into(),
            Chart::Line(LineChart {
                title: "Cloud-network bandwidth during migration (Fig. 3a)".into(),
                x_label: "time (s)".into(),
                y_label: "bandwidth (Mbit/s)".into(),
                series: series
                    .iter()
                    .map(|s| Series {
                        name: s.variant.clone(),
                        points: s.bandwidth_mbit.clone(),
                    })
                    .collect(),
            }),
        ));
        out.push((
            "fig4a-cpu-over-time".into(),
            Chart::Line(LineChart {
                title: "Host CPU utilisation during migration (Fig. 4a)".into(),
                x_label: "time (s)".into(),
                y_label: "CPU utilisation (% of host)".into(),
                series: series
                    .iter()
                    .map(|s| Series {
                        name: s.variant.clone(),
                        points: s.cpu_percent.clone(),
                    })
                    .collect(),
            }),
        ));
    }
    if !cde.is_empty() {
        let bar = |title: &str, y: &str, groups: Vec<(String, Vec<f64>)>, cats: Vec<String>| {
            Chart::Bar(BarChart {
                title: title.into(),
                y_label: y.into(),
                categories: cats,
                groups,
            })
        };
        let (cats, wire) = median_bars(&cde, |r| Some(r.outcome.wire_bytes as f64 / MIB));
        let (_, lv) = median_bars(&cde, |r| r.outcome.libvirt_bytes.map(|b| b as f64 / MIB));
        out.push((
            "fig3b-total-bytes".into(),
            bar(
                "Bytes transferred (Fig. 3b)",
                "MiB",
                vec![
                    ("on the wire (interfaces)".into(), wire),
                    ("libvirt job stats".into(), lv),
                ],
                cats.clone(),
            ),
        ));
        let (_, cpu) = median_bars(&cde, |r| Some(r.outcome.cpu_seconds));
        out.push((
            "fig4b-total-cpu".into(),
            bar(
                "Host CPU time of the migration (Fig. 4b)",
                "CPU seconds",
                vec![("host CPU time".into(), cpu)],
                cats.clone(),
            ),
        ));
        let (_, mt) = median_bars(&cde, |r| {
            r.outcome
                .memory_traffic_bytes
                .map(|b| b as f64 / MIB / 1024.0)
        });
        out.push((
            "fig5-memory-traffic".into(),
            bar(
                "Memory traffic of the migration (Fig. 5)",
                "GiB read + written",
                vec![("memory traffic".into(), mt)],
                cats,
            ),
        ));
    }
    let f = runs_for(runs, Experiment::F);
    if !f.is_empty() {
        let rate = |r: &RunRecord| r.settings.dirty_pages_per_s as f64;
        out.push((
            "fig6a-time-vs-dirty-rate".into(),
            Chart::Line(LineChart {
                title: "Migration time vs dirty rate (Fig. 6a; not converged = time spent)".into(),
                x_label: "dirty rate (pages/s)".into(),
                y_label: "migration time (s)".into(),
                series: median_lines(&f, rate, |r| Some(r.outcome.total_ms / 1000.0)),
            }),
        ));
        out.push((
            "fig6b-downtime-vs-dirty-rate".into(),
            Chart::Line(LineChart {
                title: "Downtime vs dirty rate (Fig. 6b)".into(),
                x_label: "dirty rate (pages/s)".into(),
                y_label: "downtime (ms)".into(),
                series: median_lines(&f, rate, |r| r.outcome.downtime_ms),
            }),
        ));
    }
    let g = runs_for(runs, Experiment::G);
    if !g.is_empty() {
        let (cats, normal) = median_bars(&g, |r| r.outcome.web_rps_normal);
        let (_, during) = median_bars(&g, |r| r.outcome.web_rps_migrating);
        let loss: Vec<String> = cats
            .iter()
            .zip(normal.iter().zip(&during))
            .map(|(c, (n, d))| match degradation_percent(*n, *d) {
                Some(p) => format!("{c} (-{p:.0}%)"),
                None => c.clone(),
            })
            .collect();
        out.push((
            "fig7-web-throughput".into(),
            Chart::Bar(BarChart {
                title: "Guest web throughput (Fig. 7)".into(),
                y_label: "requests/s".into(),
                categories: loss,
                groups: vec![
                    ("normal".into(), normal),
                    ("during migration".into(), during),
                ],
            }),
        ));
    }
    out
}

/// Renders every figure into `dir`; returns `(stem, png, svg)` per figure.
pub fn render_all(
    runs: &[RunRecord],
    series: &[RunSeries],
    dir: &Path,
) -> Result<Vec<(String, PathBuf, PathBuf)>> {
    figures(runs, series)
        .into_iter()
        .map(|(stem, chart)| {
            let (png, svg) = render(&chart, dir, &stem)?;
            Ok((stem, png, svg))
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::tests::run;

    /// A synthetic full result set: every experiment, every variant.
    pub(crate) fn synthetic() -> (Vec<RunRecord>, Vec<RunSeries>) {
        let mut runs = Vec::new();
        let systems = [
            (System::ZeroCopy, None),
            (System::NestedLike, Some(100)),
            (System::BlanketLike, Some(300)),
            (System::BlanketLike, None),
            (System::Plain, None),
        ];
        let speed = |s: System, b: Option<u32>| match (s, b) {
            (System::ZeroCopy, _) => 0.0,
            (_, Some(m)) => 8.0 / m as f64,
            _ => 8.0 / 1500.0,
        };
        for &mem in &[128u64, 512, 1024, 4096] {
            for &(s, b) in &systems {
                for rep in 0..if s == System::ZeroCopy { 3 } else { 1 } {
                    let t = 700.0 + rep as f64 * 10.0 + 1000.0 * speed(s, b) * mem as f64 * 1.05;
                    let mut r = run(Experiment::A, s, mem, 0, t);
                    r.settings.bandwidth_mbit = b;
                    r.repetition = rep;
                    runs.push(r);
                }
            }
        }
        for &(s, b) in &systems {
            let mut r = run(Experiment::C, s, 4096, 0, 0.0);
            r.settings.bandwidth_mbit = b;
            r.outcome.total_ms = 700.0 + 1000.0 * speed(s, b) * 4096.0;
            r.outcome.cpu_seconds = if s == System::ZeroCopy {
                0.4
            } else {
                r.outcome.total_ms / 800.0
            };
            let model = crate::memtraffic::OurModel::for_run(s, r.settings.encryption);
            r.outcome.memory_traffic_bytes = Some(model.estimate(r.outcome.wire_bytes));
            runs.push(r);
            for &d in &[1_000u64, 10_000, 100_000] {
                let mut r = run(Experiment::F, s, 2048, d, 0.0);
                r.settings.bandwidth_mbit = b;
                let base = 700.0 + 1000.0 * speed(s, b) * 2048.0;
                r.outcome.total_ms = base * (1.0 + d as f64 / 20_000.0);
                if s == System::NestedLike && d == 100_000 {
                    r.outcome.converged = false;
                    r.outcome.total_ms = 600_000.0;
                    r.outcome.downtime_ms = None;
                }
                runs.push(r);
            }
            let mut r = run(Experiment::G, s, 1024, 0, 2000.0);
            r.settings.bandwidth_mbit = b;
            r.outcome.web_rps_normal = Some(1000.0);
            r.outcome.web_rps_migrating = Some(if s == System::ZeroCopy { 900.0 } else { 600.0 });
            runs.push(r);
        }
        let series = systems
            .iter()
            .map(|&(s, b)| {
                let mut r = run(Experiment::C, s, 4096, 0, 0.0);
                r.settings.bandwidth_mbit = b;
                let peak = match (s, b) {
                    (System::ZeroCopy, _) => 1.0,
                    (_, Some(m)) => m as f64,
                    _ => 1500.0,
                };
                RunSeries {
                    variant: variant_label(&r),
                    bandwidth_mbit: (0..40)
                        .map(|i| (i as f64 * 0.5, peak * (1.0 - (i as f64 / 40.0).powi(8))))
                        .collect(),
                    cpu_percent: (0..40)
                        .map(|i| {
                            (
                                i as f64 * 0.5,
                                if s == System::ZeroCopy {
                                    5.0
                                } else {
                                    60.0 + (i % 5) as f64
                                },
                            )
                        })
                        .collect(),
                }
            })
            .collect();
        (runs, series)
    }

    fn check_png(p: &Path) {
        let b = std::fs::read(p).unwrap();
        assert_eq!(&b[..8], b"\x89PNG\r\n\x1a\n", "{}", p.display());
        assert!(b.len() > 10_000, "{} only {} bytes", p.display(), b.len());
        // IHDR width/height.
        let w = u32::from_be_bytes(b[16..20].try_into().unwrap());
        let h = u32::from_be_bytes(b[20..24].try_into().unwrap());
        assert_eq!((w, h), SIZE);
    }

    fn check_svg(p: &Path, must_contain: &str) {
        let t = std::fs::read_to_string(p).unwrap();
        assert!(
            t.starts_with("<svg") || t.starts_with("<?xml"),
            "{}",
            p.display()
        );
        assert!(t.trim_end().ends_with("</svg>"));
        assert!(t.len() > 3_000);
        assert!(t.contains("<text"), "no text in {}", p.display());
        assert!(
            t.contains(must_contain),
            "{} lacks {must_contain:?}",
            p.display()
        );
    }

    #[test]
    fn every_figure_renders_to_valid_png_and_svg() {
        let (runs, series) = synthetic();
        let dir = tempfile::tempdir().unwrap();
        let out = render_all(&runs, &series, dir.path()).unwrap();
        let stems: Vec<&str> = out.iter().map(|o| o.0.as_str()).collect();
        assert_eq!(
            stems,
            [
                "fig2a-time-vs-memory",
                "fig2b-downtime-vs-memory",
                "fig3a-bandwidth-over-time",
                "fig4a-cpu-over-time",
                "fig3b-total-bytes",
                "fig4b-total-cpu",
                "fig5-memory-traffic",
                "fig6a-time-vs-dirty-rate",
                "fig6b-downtime-vs-dirty-rate",
                "fig7-web-throughput"
            ]
        );
        for (_, png, svg) in &out {
            check_png(png);
            check_svg(svg, "zero-copy");
        }
        check_svg(
            &dir.path().join("fig7-web-throughput.svg"),
            "during migration",
        );
        if let Ok(keep) = std::env::var("VMBEAM_BENCH_KEEP_PLOTS") {
            for (_, png, svg) in &out {
                for p in [png, svg] {
                    std::fs::copy(p, Path::new(&keep).join(p.file_name().unwrap())).unwrap();
                }
            }
        }
    }

    #[test]
    fn only_the_figures_the_data_supports() {
        let (runs, _) = synthetic();
        let g: Vec<RunRecord> = runs
            .into_iter()
            .filter(|r| r.experiment == Experiment::G)
            .collect();
        let f = figures(&g, &[]);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].0, "fig7-web-throughput");
        assert!(figures(&[], &[]).is_empty());
    }

    #[test]
    fn medians_per_variant_and_point() {
        let (runs, _) = synthetic();
        let ab = runs_for(&runs, Experiment::B);
        assert_eq!(
            variants_in(&ab),
            [
                "zero-copy",
                "nested-like",
                "blanket-like 300 Mbit/s",
                "blanket-like unshaped",
                "plain"
            ]
        );
        let lines = median_lines(
            &ab,
            |r| r.settings.memory_mib as f64,
            |r| Some(r.outcome.total_ms),
        );
        // zero-copy: 700, 710, 720 -> 710 at every size.
        assert_eq!(lines[0].points[0], (128.0, 710.0));
        assert_eq!(lines[0].points.len(), 4);
    }

    #[test]
    fn degenerate_data_still_renders() {
        let dir = tempfile::tempdir().unwrap();
        let chart = Chart::Line(LineChart {
            title: "empty".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            series: vec![Series {
                name: "none".into(),
                points: vec![(1.0, f64::NAN)],
            }],
        });
        render(&chart, dir.path(), "empty").unwrap();
        let chart = Chart::Bar(BarChart {
            title: "no bars".into(),
            y_label: "y".into(),
            categories: vec![],
            groups: vec![],
        });
        render(&chart, dir.path(), "nobars").unwrap();
    }
}
