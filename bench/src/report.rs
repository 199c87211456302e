//! The Markdown report: machine and settings, tables of the runs, ratios against zero-copy,
//! links to the plots.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::Path;

use crate::memtraffic::{OurModel, PaperModel};
use crate::model::{Experiment, RunRecord, System};
use crate::plot::{runs_for, variant_label, variants_in};
use crate::stats::{degradation_percent, median, ratio};
use crate::{io_err, Result};

/// Human-readable bytes (binary units).
pub fn human_bytes(b: f64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{v:.0} B")
    } else {
        format!("{v:.2} {}", U[i])
    }
}

/// Human-readable milliseconds (`713 ms`, `20.1 s`, `20.6 min` from 10 minutes on).
pub fn human_ms(ms: f64) -> String {
    if ms < 1000.0 {
        format!("{ms:.0} ms")
    } else if ms >= 600_000.0 {
        format!("{:.1} min", ms / 60_000.0)
    } else {
        format!("{:.1} s", ms / 1000.0)
    }
}

fn med(runs: &[&RunRecord], f: impl Fn(&RunRecord) -> Option<f64>) -> Option<f64> {
    median(&runs.iter().filter_map(|r| f(r)).collect::<Vec<_>>())
}

fn cell(v: Option<f64>, fmt: impl Fn(f64) -> String) -> String {
    v.map(fmt).unwrap_or_else(|| "—".to_string())
}

fn ratio_cell(r: Option<f64>) -> String {
    cell(r, |r| {
        if r >= 10.0 {
            format!("{r:.0}x")
        } else {
            format!("{r:.2}x")
        }
    })
}

/// The summary: one column per system, the headline rows of the paper's figures (the largest
/// guest of the memory sweep, the dirty-rate sweep's 10,000 and highest rates, web throughput,
/// integrity), medians over repetitions. `report.md` opens with it; the README quotes it.
pub fn summary_table(runs: &[RunRecord]) -> String {
    let all: Vec<&RunRecord> = runs.iter().collect();
    let variants = variants_in(&all);
    if variants.is_empty() {
        return String::new();
    }
    let of = |v: &str, pred: &dyn Fn(&RunRecord) -> bool| -> Vec<&RunRecord> {
        runs.iter()
            .filter(|r| variant_label(r) == v && pred(r))
            .collect()
    };
    let mut out = format!(
        "| | {} |\n|---|{}\n",
        variants.join(" | "),
        "---|".repeat(variants.len())
    );
    let mut row = |label: String, f: &dyn Fn(&str) -> String| {
        let cells: Vec<String> = variants.iter().map(|v| f(v)).collect();
        let _ = writeln!(out, "| {label} | {} |", cells.join(" | "));
    };
    // The largest idle guest moved (a/b, c/d/e).
    let sized = |r: &RunRecord| {
        matches!(
            r.experiment,
            Experiment::A | Experiment::B | Experiment::C | Experiment::D | Experiment::E
        ) && r.settings.dirty_pages_per_s == 0
    };
    if let Some(big) = runs
        .iter()
        .filter(|r| sized(r))
        .map(|r| r.settings.memory_mib)
        .max()
    {
        let at = |v: &str| of(v, &|r| sized(r) && r.settings.memory_mib == big);
        let zc_total = med(
            &of("zero-copy", &|r| sized(r) && r.settings.memory_mib == big),
            |r| r.outcome.converged.then_some(r.outcome.total_ms),
        );
        let size = human_bytes((big << 20) as f64).replace(".00", "");
        row(format!("{size} guest: migration time"), &|v| {
            cell(
                med(&at(v), |r| {
                    r.outcome.converged.then_some(r.outcome.total_ms)
                }),
                human_ms,
            )
        });
        row(format!("{size}: time / zero-copy"), &|v| {
            if v == "zero-copy" {
                "1x".into()
            } else {
                ratio_cell(ratio(
                    med(&at(v), |r| {
                        r.outcome.converged.then_some(r.outcome.total_ms)
                    }),
                    zc_total,
                ))
            }
        });
        row(format!("{size}: downtime"), &|v| {
            cell(med(&at(v), |r| r.outcome.downtime_ms), human_ms)
        });
        row(format!("{size}: on the wire"), &|v| {
            cell(
                med(&at(v), |r| Some(r.outcome.wire_bytes as f64)),
                human_bytes,
            )
        });
        row(format!("{size}: host CPU time"), &|v| {
            cell(med(&at(v), |r| Some(r.outcome.cpu_seconds)), |c| {
                format!("{c:.1} s")
            })
        });
        row(
            format!("{size}: guest RAM touched at the destination"),
            &|v| {
                cell(
                    med(&at(v), |r| r.outcome.ram_written_bytes.map(|b| b as f64)),
                    human_bytes,
                )
            },
        );
    }
    // The dirty-rate sweep: 10,000 pages/s (the paper's highest) and the highest measured.
    let dirty: BTreeSet<u64> = runs
        .iter()
        .filter(|r| r.experiment == Experiment::F)
        .map(|r| r.settings.dirty_pages_per_s)
        .collect();
    let picks: BTreeSet<u64> = [dirty.range(..=10_000).next_back(), dirty.iter().next_back()]
        .into_iter()
        .flatten()
        .copied()
        .collect();
    for rate in picks {
        let at = |v: &str| {
            of(v, &|r| {
                r.experiment == Experiment::F && r.settings.dirty_pages_per_s == rate
            })
        };
        let mib = runs
            .iter()
            .find(|r| r.experiment == Experiment::F)
            .map_or(0, |r| r.settings.memory_mib);
        row(
            format!("{mib} MiB at {rate} pages/s: time (downtime)"),
            &|v| {
                let rs = at(v);
                let done: Vec<&RunRecord> =
                    rs.iter().copied().filter(|r| r.outcome.converged).collect();
                if rs.is_empty() {
                    "—".into()
                } else if done.is_empty() {
                    if rs.iter().any(|r| r.outcome.error.is_some()) {
                        "failed".into()
                    } else {
                        format!("not converged ({})", human_ms(rs[0].settings.cap_ms as f64))
                    }
                } else {
                    format!(
                        "{} ({})",
                        cell(med(&done, |r| Some(r.outcome.total_ms)), human_ms),
                        cell(med(&done, |r| r.outcome.downtime_ms), human_ms)
                    )
                }
            },
        );
    }
    // Web throughput (g).
    if runs.iter().any(|r| r.experiment == Experiment::G) {
        row("web throughput lost during migration".into(), &|v| {
            let rs = of(v, &|r| r.experiment == Experiment::G);
            let n = med(&rs, |r| r.outcome.web_rps_normal);
            let d = med(&rs, |r| r.outcome.web_rps_migrating);
            cell(n.zip(d).and_then(|(n, d)| degradation_percent(n, d)), |p| {
                format!("{p:.0}%")
            })
        });
    }
    row("runs that failed or broke the guest".into(), &|v| {
        let rs = of(v, &|_| true);
        let bad = rs
            .iter()
            .filter(|r| !r.outcome.guest_intact || r.outcome.error.is_some())
            .count();
        format!("{bad} of {}", rs.len())
    });
    out
}

/// Groups runs by (variant, memory, dirty rate) in a stable order.
fn points(runs: &[&RunRecord]) -> Vec<(String, u64, u64)> {
    let mut keys: Vec<(String, u64, u64)> = Vec::new();
    for v in variants_in(runs) {
        let mut k: Vec<(u64, u64)> = runs
            .iter()
            .filter(|r| variant_label(r) == v)
            .map(|r| (r.settings.memory_mib, r.settings.dirty_pages_per_s))
            .collect();
        k.sort();
        k.dedup();
        keys.extend(k.into_iter().map(|(m, d)| (v.clone(), m, d)));
    }
    keys
}

fn table_for(out: &mut String, runs: &[&RunRecord]) {
    out.push_str(
        "| system | guest | dirty pages/s | runs | total (median) | min–max | downtime | on the wire | libvirt bytes | CPU s | converged | guest intact | time / zero-copy | wire / zero-copy |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for (v, mem, dirty) in points(runs) {
        let mine: Vec<&RunRecord> = runs
            .iter()
            .copied()
            .filter(|r| {
                variant_label(r) == v
                    && r.settings.memory_mib == mem
                    && r.settings.dirty_pages_per_s == dirty
            })
            .collect();
        let zc: Vec<&RunRecord> = runs
            .iter()
            .copied()
            .filter(|r| {
                r.system == System::ZeroCopy
                    && r.settings.memory_mib == mem
                    && r.settings.dirty_pages_per_s == dirty
            })
            .collect();
        let total = med(&mine, |r| Some(r.outcome.total_ms));
        let totals: Vec<f64> = mine.iter().map(|r| r.outcome.total_ms).collect();
        let conv = mine.iter().filter(|r| r.outcome.converged).count();
        let wire = med(&mine, |r| Some(r.outcome.wire_bytes as f64));
        let (t_ratio, w_ratio) = if mine.first().is_some_and(|r| r.system == System::ZeroCopy) {
            (None, None)
        } else {
            (
                ratio(total, med(&zc, |r| Some(r.outcome.total_ms))),
                ratio(wire, med(&zc, |r| Some(r.outcome.wire_bytes as f64))),
            )
        };
        let failed = mine.iter().filter(|r| r.outcome.error.is_some()).count();
        let not_conv = if failed > 0 {
            format!("{conv}/{} ({failed} failed)", mine.len())
        } else if conv < mine.len() {
            format!(
                "{}/{} (stopped at {})",
                conv,
                mine.len(),
                human_ms(mine[0].settings.cap_ms as f64)
            )
        } else {
            format!("{conv}/{}", mine.len())
        };
        let intact = mine.iter().filter(|r| r.outcome.guest_intact).count();
        let _ = writeln!(
            out,
            "| {v} | {mem} MiB | {dirty} | {} | {} | {} | {} | {} | {} | {} | {not_conv} | {intact}/{} | {} | {} |",
            mine.len(),
            cell(total, human_ms),
            match (crate::stats::min(&totals), crate::stats::max(&totals)) {
                (Some(a), Some(b)) => format!("{}–{}", human_ms(a), human_ms(b)),
                _ => "—".into(),
            },
            cell(med(&mine, |r| r.outcome.downtime_ms), human_ms),
            cell(wire, human_bytes),
            cell(med(&mine, |r| r.outcome.libvirt_bytes.map(|b| b as f64)), human_bytes),
            cell(med(&mine, |r| Some(r.outcome.cpu_seconds)), |v| format!("{v:.1}")),
            mine.len(),
            ratio_cell(t_ratio),
            ratio_cell(w_ratio),
        );
    }
}

/// Writes the report. `plots` are `(stem, png, svg)` as returned by
/// [`crate::plot::render_all`]; links are made relative to `report_dir`.
pub fn render_markdown(
    runs: &[RunRecord],
    plots: &[(String, std::path::PathBuf, std::path::PathBuf)],
    report_dir: &Path,
    duration_s: Option<f64>,
) -> String {
    let mut out = String::from("# VMBeam bench report\n\n");
    if let Some(m) = runs.first().map(|r| &r.meta) {
        let _ = writeln!(
            out,
            "Run on {} ({} cores, {} MiB, kernel {}), {}, QEMU {}, libvirt {}, VMBeam {}.{}\n",
            m.timestamp,
            m.machine.cores,
            m.machine.memory_mib,
            m.machine.kernel,
            match m.accel {
                crate::model::Accel::Kvm => "KVM",
                crate::model::Accel::Tcg =>
                    "TCG (no KVM: absolute times are slow, ratios still tell)",
            },
            m.qemu_version,
            m.libvirt_version,
            m.vmbeam_version,
            duration_s
                .map(|d| format!(" The whole run took {}.", human_ms(d * 1000.0)))
                .unwrap_or_default(),
        );
    }
    out.push_str(
        "Systems: **zero-copy** (VMBeam); **nested-like** (traditional, 100 Mbit/s, encrypted, as \
         Xen-Nest); **blanket-like** (traditional, 300 Mbit/s and unshaped, encrypted, as \
         Xen-Blanket); **plain** (traditional, unshaped, unencrypted). \"On the wire\" is measured \
         on the cloud VMs' interfaces; ratios are traditional / zero-copy medians at the same \
         guest size and dirty rate.\n\n",
    );
    let enc: Vec<&str> = {
        let mut e: Vec<&str> = runs.iter().map(|r| r.settings.encryption.name()).collect();
        e.sort();
        e.dedup();
        e
    };
    let _ = writeln!(
        out,
        "Encryption used: {}. The encrypted baselines use libvirt/QEMU native TLS \
         (`VIR_MIGRATE_TLS`, gnutls in both QEMUs, certificates in each cloud VM's \
         `migrate_tls_x509_cert_dir`), not an SSH tunnel as the paper's `xl migrate` did.\n",
        enc.join(", ")
    );
    let _ = writeln!(out, "## Summary\n\n{}", summary_table(runs));
    let mut done: Vec<Experiment> = Vec::new();
    for e in Experiment::ALL {
        let rs = runs_for(runs, e);
        if rs.is_empty() {
            continue;
        }
        let _ = writeln!(out, "## {} ({}): {}\n", e, e.figure(), e.title());
        let group = crate::plan::run_group(e);
        if let Some(first) = done.iter().find(|d| group.contains(d)) {
            let _ = writeln!(out, "Same runs as experiment {first} (table there).\n");
        } else {
            table_for(&mut out, &rs);
            out.push('\n');
        }
        done.push(e);
        match e {
            Experiment::E => {
                out.push_str(
                    "| system | stream bytes | guest RAM touched at the destination (measured) | our model (factor) | estimate | paper's counterpart |\n|---|---|---|---|---|---|\n",
                );
                for v in variants_in(&rs) {
                    let mine: Vec<&RunRecord> = rs
                        .iter()
                        .copied()
                        .filter(|r| variant_label(r) == v)
                        .collect();
                    let Some(r) = mine.first() else { continue };
                    let model = OurModel::for_run(r.system, r.settings.encryption);
                    let stream = med(&mine, |r| {
                        Some(r.outcome.libvirt_bytes.unwrap_or(r.outcome.wire_bytes) as f64)
                    });
                    let est = med(&mine, |r| r.outcome.memory_traffic_bytes.map(|b| b as f64))
                        .or(stream.map(|s| model.estimate(s as u64) as f64));
                    let paper = PaperModel::counterpart(r.system)
                        .map(|p| format!("{:?} {}x", p, p.factor()))
                        .unwrap_or_else(|| "—".into());
                    let written = med(&mine, |r| r.outcome.ram_written_bytes.map(|b| b as f64));
                    let _ = writeln!(
                        out,
                        "| {v} | {} | {} | {:?} ({}x) | {} | {paper} |",
                        cell(stream, human_bytes),
                        cell(written, human_bytes),
                        model,
                        model.factor(),
                        cell(est, human_bytes)
                    );
                }
                out.push_str(
                    "\nMeasured: the guest RAM the incoming migration touched at the destination, as the \
                     growth of the destination's pool-file allocation: a copying migration fills a \
                     fresh, sparse file with every page it receives, and reads the pages sent as \
                     zero to check them, which allocates them on tmpfs too (so this is the whole \
                     guest, not just the stream); zero-copy maps the same file and touches none. \
                     Modelled: every other read and write on the way (see `vmbeam-bench`'s \
                     `memtraffic` module: plain 6x, TLS 10x, SSH tunnel 22x the stream; \
                     zero-copy touches no guest RAM).\n\n",
                );
            }
            Experiment::G => {
                out.push_str("| system | normal req/s | during migration req/s | loss |\n|---|---|---|---|\n");
                for v in variants_in(&rs) {
                    let mine: Vec<&RunRecord> = rs
                        .iter()
                        .copied()
                        .filter(|r| variant_label(r) == v)
                        .collect();
                    let n = med(&mine, |r| r.outcome.web_rps_normal);
                    let d = med(&mine, |r| r.outcome.web_rps_migrating);
                    let loss = n.zip(d).and_then(|(n, d)| degradation_percent(n, d));
                    let _ = writeln!(
                        out,
                        "| {v} | {} | {} | {} |",
                        cell(n, |v| format!("{v:.0}")),
                        cell(d, |v| format!("{v:.0}")),
                        cell(loss, |v| format!("{v:.0}%"))
                    );
                }
                out.push('\n');
            }
            _ => {}
        }
    }
    let lost: Vec<&RunRecord> = runs
        .iter()
        .filter(|r| !r.outcome.guest_intact || r.outcome.error.is_some())
        .collect();
    out.push_str("## Guest integrity\n\n");
    if lost.is_empty() {
        let _ = writeln!(
            out,
            "The guest's agent verified every page after each of the {} runs: all intact.\n",
            runs.len()
        );
    } else {
        let _ = writeln!(
            out,
            "The guest's agent verifies every page after each run; {} of {} runs failed or left \
             the guest broken (the run is kept as measured, a broken guest is rebooted for the \
             next one):\n",
            lost.len(),
            runs.len()
        );
        for r in lost {
            let o = &r.outcome;
            let _ = writeln!(
                out,
                "- {} {}, {} MiB, {} pages/s: {}{}",
                r.experiment.id(),
                variant_label(r),
                r.settings.memory_mib,
                r.settings.dirty_pages_per_s,
                o.error
                    .as_ref()
                    .map(|e| format!("migration failed: {e}; "))
                    .unwrap_or_default(),
                if o.guest_intact {
                    "guest intact".to_string()
                } else {
                    o.guest_note
                        .clone()
                        .unwrap_or_else(|| "guest broken".into())
                }
            );
        }
        out.push('\n');
    }
    if !plots.is_empty() {
        out.push_str("## Plots\n\n");
        for (stem, png, svg) in plots {
            let rel = |p: &Path| {
                p.strip_prefix(report_dir)
                    .unwrap_or(p)
                    .display()
                    .to_string()
            };
            let _ = writeln!(out, "![{stem}]({}) ([SVG]({}))\n", rel(png), rel(svg));
        }
    }
    out.push_str("Raw results: `runs.csv`, `runs.json` (one row per run).\n");
    out
}

/// Writes `DIR/report.md`; returns its path.
pub fn write_report(
    dir: &Path,
    runs: &[RunRecord],
    plots: &[(String, std::path::PathBuf, std::path::PathBuf)],
    duration_s: Option<f64>,
) -> Result<std::path::PathBuf> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let p = dir.join("report.md");
    std::fs::write(&p, render_markdown(runs, plots, dir, duration_s)).map_err(io_err(&p))?;
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plot::tests::synthetic;

    #[test]
    fn summary_has_a_column_per_system_and_the_headline_rows() {
        use crate::model::tests::run;
        let mut runs = vec![
            run(Experiment::A, System::ZeroCopy, 4096, 0, 700.0),
            run(Experiment::A, System::ZeroCopy, 4096, 0, 720.0),
            run(Experiment::A, System::NestedLike, 4096, 0, 350_000.0),
            run(Experiment::A, System::ZeroCopy, 128, 0, 690.0),
            run(Experiment::F, System::ZeroCopy, 2048, 10_000, 710.0),
            run(Experiment::F, System::NestedLike, 2048, 10_000, 343_000.0),
            run(Experiment::F, System::ZeroCopy, 2048, 100_000, 715.0),
            run(Experiment::F, System::NestedLike, 2048, 100_000, 20_000.0),
        ];
        runs[5].outcome.converged = false;
        runs[7].outcome.converged = false;
        runs[7].outcome.error = Some("guest crashed".into());
        runs[7].outcome.guest_intact = false;
        let t = summary_table(&runs);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "| | zero-copy | nested-like |");
        let find = |p: &str| {
            *lines
                .iter()
                .find(|l| l.starts_with(p))
                .unwrap_or_else(|| panic!("{p}: {t}"))
        };
        // The largest guest of the sweep only, medians.
        assert_eq!(
            find("| 4 GiB guest: migration time"),
            "| 4 GiB guest: migration time | 710 ms | 350.0 s |"
        );
        assert_eq!(
            find("| 4 GiB: time / zero-copy"),
            "| 4 GiB: time / zero-copy | 1x | 493x |"
        );
        assert!(
            find("| 2048 MiB at 10000 pages/s").ends_with("| not converged (10.0 min) |"),
            "{t}"
        );
        assert!(
            find("| 2048 MiB at 100000 pages/s").ends_with("| failed |"),
            "{t}"
        );
        assert_eq!(
            find("| runs that failed"),
            "| runs that failed or broke the guest | 0 of 5 | 1 of 3 |"
        );
        assert!(summary_table(&[]).is_empty());
    }

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(446.0 * 1024.0), "446.00 KiB");
        assert_eq!(human_bytes(12.0), "12 B");
        assert_eq!(human_ms(713.0), "713 ms");
        assert_eq!(human_ms(20_100.0), "20.1 s");
        assert_eq!(human_ms(1_290_000.0), "21.5 min");
    }

    #[test]
    fn report_on_synthetic_data_has_tables_ratios_and_links() {
        let (runs, series) = synthetic();
        let dir = tempfile::tempdir().unwrap();
        let plots = crate::plot::render_all(&runs, &series, &dir.path().join("plots")).unwrap();
        crate::model::write_results(dir.path(), &runs).unwrap();
        let p = write_report(dir.path(), &runs, &plots, Some(1234.0)).unwrap();
        let md = std::fs::read_to_string(p).unwrap();
        assert!(md.contains("2 cores, 7936 MiB, kernel 6.1.0-test"));
        assert!(md.contains("TCG"));
        assert!(md.contains("The whole run took 20.6 min"));
        for e in [
            "## a (2a)",
            "## b (2b)",
            "## c (3)",
            "## d (4)",
            "## e (5)",
            "## f (6)",
            "## g (7)",
        ] {
            assert!(md.contains(e), "missing {e}");
        }
        assert!(md.contains("Same runs as experiment a"));
        assert!(md.contains("Same runs as experiment c"));
        // Zero-copy 4 GiB: 710 ms median; nested-like: 700 + 8/100*4096*1.05*1000 ms.
        let nested_4g = 700.0 + 1000.0 * 0.08 * 4096.0 * 1.05;
        let want = format!("{:.0}x", nested_4g / 710.0);
        let row = md
            .lines()
            .find(|l| l.starts_with("| nested-like | 4096 MiB | 0 | 1 |"))
            .unwrap();
        assert!(row.contains(&want), "{row} lacks {want}");
        // Wire ratio: 4 GiB over 446 KiB.
        assert!(row.contains(&format!("{:.0}x", 4096.0 * 1024.0 / 446.0)));
        assert!(md.contains("0/1 (stopped at 10.0 min)"));
        assert!(md.contains("| zero-copy | 1000 | 900 | 10% |"));
        assert!(md.contains("XenNest 14x"));
        assert!(md.contains("![fig2a-time-vs-memory](plots/fig2a-time-vs-memory.png) ([SVG](plots/fig2a-time-vs-memory.svg))"));
        // Every link points at a file that exists.
        for l in md.lines().filter(|l| l.starts_with("![")) {
            let target = l.split("](").nth(1).unwrap().split(')').next().unwrap();
            assert!(dir.path().join(target).is_file(), "{target}");
        }
    }

    #[test]
    fn empty_report_is_still_a_report() {
        let md = render_markdown(&[], &[], Path::new("."), None);
        assert!(md.starts_with("# VMBeam bench report"));
    }
}
