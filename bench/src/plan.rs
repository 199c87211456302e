//! `vmbeam-lab bench [--quick] [--out DIR] [EXPERIMENT...]`: the arguments and the experiment
//! plan (which runs each experiment needs, at which sizes) as pure data. Nothing here runs.

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::model::{Encryption, Experiment, Settings, System};

/// Arguments of `vmbeam-lab bench`. Derives `Parser` (so also `clap::Args`): the CLI can use it
/// as a subcommand's arguments.
#[derive(Debug, Clone, PartialEq, Eq, clap::Parser)]
#[command(
    name = "vmbeam-lab bench",
    about = "Reproduce the paper's experiments on a lab: zero-copy vs traditional migration"
)]
pub struct Args {
    /// Small sizes and few points (under 5 minutes): the smoke test.
    #[arg(long)]
    pub quick: bool,
    /// Where to write runs.csv, runs.json, the plots and report.md.
    #[arg(long, value_name = "DIR", default_value = "bench-results")]
    pub out: PathBuf,
    /// Run nothing: re-render the plots and the report from the results already in --out.
    #[arg(long, conflicts_with_all = ["quick", "experiments"])]
    pub render_only: bool,
    /// Experiments to run, a..g (default: all): a time vs memory, b downtime vs memory,
    /// c network load, d CPU load, e memory traffic, f dirty-rate sweep, g web throughput.
    #[arg(value_name = "EXPERIMENT", value_enum, ignore_case = true)]
    pub experiments: Vec<Experiment>,
}

impl Args {
    /// The selected experiments, sorted, without repeats; all when none was named.
    pub fn selected(&self) -> Vec<Experiment> {
        if self.experiments.is_empty() {
            return Experiment::ALL.to_vec();
        }
        let set: BTreeSet<Experiment> = self.experiments.iter().copied().collect();
        set.into_iter().collect()
    }

    /// The plan for these arguments with the chosen baseline encryption.
    pub fn plan(&self, encryption: Encryption) -> Plan {
        Plan::new(&self.selected(), self.quick, encryption)
    }
}

/// Experiments measured by the same runs: a and b (one memory sweep gives time and
/// downtime), c, d and e (one large migration, sampled for network, CPU and memory traffic).
pub fn run_group(e: Experiment) -> &'static [Experiment] {
    match e {
        Experiment::A | Experiment::B => &[Experiment::A, Experiment::B],
        Experiment::C | Experiment::D | Experiment::E => {
            &[Experiment::C, Experiment::D, Experiment::E]
        }
        Experiment::F => &[Experiment::F],
        Experiment::G => &[Experiment::G],
    }
}

/// One system with its network: blanket-like appears twice (300 Mbit/s and unshaped).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Variant {
    /// The system.
    pub system: System,
    /// Bandwidth cap, Mbit/s; `None` = unshaped.
    pub bandwidth_mbit: Option<u32>,
    /// Stream encryption.
    pub encryption: Encryption,
}

/// The five variants compared, given the encryption chosen for the baselines.
pub fn variants(baseline_encryption: Encryption) -> Vec<Variant> {
    let v = |system, bandwidth_mbit, encryption| Variant {
        system,
        bandwidth_mbit,
        encryption,
    };
    vec![
        v(System::ZeroCopy, None, Encryption::None),
        v(System::NestedLike, Some(100), baseline_encryption),
        v(System::BlanketLike, Some(300), baseline_encryption),
        v(System::BlanketLike, None, baseline_encryption),
        v(System::Plain, None, Encryption::None),
    ]
}

/// What to record during a run besides its outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Probes {
    /// Sample interface counters and host CPU over time (experiments c, d).
    pub time_series: bool,
    /// Record `/proc/PID/io` of QEMU, libvirtd, ssh (experiment e).
    pub process_io: bool,
    /// Run the guest web server and the load generator (experiment g).
    pub web_load: bool,
}

/// One run to make (`repetitions` times).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlannedRun {
    /// The experiment the rows are tagged with (the first selected of its [`run_group`]).
    pub experiment: Experiment,
    /// The system.
    pub system: System,
    /// The settings.
    pub settings: Settings,
    /// How many times.
    pub repetitions: u32,
    /// What to record.
    pub probes: Probes,
    /// Whether the guest's memory is filled with non-zero (random) data before migrating.
    pub fill_memory: bool,
}

/// Sizes of a full or quick run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sizes {
    /// Guest memory sizes of a/b, MiB.
    pub memory_sweep_mib: Vec<u64>,
    /// Guest memory of c/d/e, MiB.
    pub load_mib: u64,
    /// Guest memory of f, MiB.
    pub dirty_mib: u64,
    /// Dirty rates of f, pages/s.
    pub dirty_rates: Vec<u64>,
    /// Guest memory of g, MiB.
    pub web_mib: u64,
    /// Longest cap on one migration, ms (a run past its cap is stopped and reported as not
    /// converged); see [`Sizes::cap_for`].
    pub cap_ms: u64,
    /// Shortest cap, ms.
    pub cap_floor_ms: u64,
    /// Repetitions of zero-copy and plain runs (cheap); the shaped baselines run once.
    pub repetitions: u32,
    /// Whether blanket-like also runs unshaped (besides 300 Mbit/s).
    pub blanket_unshaped: bool,
    /// How long the web load runs in each phase (normal, during migration) of g, seconds.
    pub web_seconds: u32,
}

/// Link rate assumed for an unshaped traditional run when sizing its cap, Mbit/s (the lab's
/// unshaped veth moves 1.5-3 Gbit/s of migration stream: 1 Gbit/s leaves room).
const UNSHAPED_MBIT_FOR_CAP: f64 = 1000.0;

impl Sizes {
    /// The cap of one migration of a `memory_mib` guest over a link of `bandwidth_mbit`
    /// (`None`: unshaped): the time to send the guest's memory twice at the link rate (QEMU
    /// never stops iterating on its own, and a migration that has not finished after two full
    /// passes is not converging: the guest dirties faster than the link drains), within
    /// `cap_floor_ms..=cap_ms`.
    pub fn cap_for(&self, memory_mib: u64, bandwidth_mbit: Option<u32>) -> u64 {
        let mbit = bandwidth_mbit.map_or(UNSHAPED_MBIT_FOR_CAP, f64::from);
        let one_pass_ms = memory_mib as f64 * 8.0 * 1_048_576.0 / (mbit * 1e6) * 1000.0;
        ((2.0 * one_pass_ms) as u64).clamp(self.cap_floor_ms, self.cap_ms)
    }

    /// The full run: the paper's sizes (128 MiB to 4 GiB; 1,000 to 100,000 pages/s).
    pub fn full() -> Sizes {
        Sizes {
            memory_sweep_mib: vec![128, 256, 512, 1024, 2048, 4096],
            load_mib: 4096,
            dirty_mib: 2048,
            dirty_rates: vec![1_000, 5_000, 10_000, 100_000],
            web_mib: 1024,
            cap_ms: 600_000,
            cap_floor_ms: 60_000,
            repetitions: 3,
            blanket_unshaped: true,
            web_seconds: 30,
        }
    }

    /// `--quick`: small guests, two points per sweep, a short cap.
    pub fn quick() -> Sizes {
        Sizes {
            memory_sweep_mib: vec![128, 256],
            load_mib: 128,
            dirty_mib: 128,
            dirty_rates: vec![1_000, 10_000],
            web_mib: 128,
            cap_ms: 30_000,
            cap_floor_ms: 20_000,
            repetitions: 1,
            blanket_unshaped: false,
            web_seconds: 5,
        }
    }
}

/// The runs of a bench invocation, in execution order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// The experiments selected.
    pub experiments: Vec<Experiment>,
    /// `--quick`.
    pub quick: bool,
    /// The sizes used.
    pub sizes: Sizes,
    /// The runs.
    pub runs: Vec<PlannedRun>,
}

impl Plan {
    /// Builds the plan for `experiments` (runs shared by a [`run_group`] are planned once).
    pub fn new(experiments: &[Experiment], quick: bool, encryption: Encryption) -> Plan {
        let sizes = if quick { Sizes::quick() } else { Sizes::full() };
        let selected: BTreeSet<Experiment> = experiments.iter().copied().collect();
        let mut runs = Vec::new();
        let mut done: BTreeSet<Experiment> = BTreeSet::new();
        for &e in &selected {
            if done.contains(&e) {
                continue;
            }
            let group = run_group(e);
            done.extend(group.iter().copied());
            let in_group = |x: Experiment| selected.contains(&x);
            let probes = Probes {
                // Only the runs of the c/d/e group (one large migration) are sampled.
                time_series: group.contains(&Experiment::C)
                    && (in_group(Experiment::C) || in_group(Experiment::D)),
                process_io: group.contains(&Experiment::E) && in_group(Experiment::E),
                web_load: e == Experiment::G,
            };
            let points: Vec<(u64, u64)> = match e {
                Experiment::A | Experiment::B => {
                    sizes.memory_sweep_mib.iter().map(|&m| (m, 0)).collect()
                }
                Experiment::C | Experiment::D | Experiment::E => vec![(sizes.load_mib, 0)],
                Experiment::F => sizes
                    .dirty_rates
                    .iter()
                    .map(|&d| (sizes.dirty_mib, d))
                    .collect(),
                Experiment::G => vec![(sizes.web_mib, 0)],
            };
            for (memory_mib, dirty) in points {
                for v in variants(encryption) {
                    if v.system == System::BlanketLike
                        && v.bandwidth_mbit.is_none()
                        && !sizes.blanket_unshaped
                    {
                        continue;
                    }
                    let cheap = matches!(v.system, System::ZeroCopy | System::Plain);
                    runs.push(PlannedRun {
                        experiment: e,
                        system: v.system,
                        settings: Settings {
                            memory_mib,
                            dirty_pages_per_s: dirty,
                            bandwidth_mbit: v.bandwidth_mbit,
                            encryption: v.encryption,
                            cap_ms: sizes.cap_for(memory_mib, v.bandwidth_mbit),
                        },
                        repetitions: if cheap { sizes.repetitions } else { 1 },
                        probes,
                        fill_memory: true,
                    });
                }
            }
        }
        Plan {
            experiments: selected.into_iter().collect(),
            quick,
            sizes,
            runs,
        }
    }

    /// Number of migrations.
    pub fn migrations(&self) -> u32 {
        self.runs.iter().map(|r| r.repetitions).sum()
    }

    /// A rough estimate of the wall time, seconds, under stated assumptions: per migration
    /// `overhead_s` (guest boot and memory fill) plus the guest's memory (1.3x with dirtying,
    /// for re-sends) over the bandwidth (unshaped: `unshaped_mbit`), capped at the run's cap;
    /// zero-copy 1 s; web runs add two load phases. Used to keep `--quick` under 5 minutes.
    pub fn estimated_seconds(&self, overhead_s: f64, unshaped_mbit: f64) -> f64 {
        self.runs
            .iter()
            .map(|r| {
                let s = &r.settings;
                let migrate = if r.system == System::ZeroCopy {
                    1.0
                } else {
                    let bits = s.memory_mib as f64 * 8.0 * 1_048_576.0;
                    let resend = if s.dirty_pages_per_s > 0 { 1.3 } else { 1.0 };
                    let mbit = s.bandwidth_mbit.map_or(unshaped_mbit, f64::from);
                    (bits * resend / (mbit * 1e6)).min(s.cap_ms as f64 / 1000.0)
                };
                let web = if r.probes.web_load {
                    2.0 * f64::from(self.sizes.web_seconds)
                } else {
                    0.0
                };
                f64::from(r.repetitions) * (overhead_s + migrate + web)
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("vmbeam-bench").chain(args.iter().copied()))
    }

    #[test]
    fn args_parse_and_validate_experiments() {
        let a = parse(&[]).unwrap();
        assert!(!a.quick);
        assert_eq!(a.out, PathBuf::from("bench-results"));
        assert_eq!(a.selected(), Experiment::ALL.to_vec());
        let a = parse(&["--quick", "--out", "/tmp/x", "f", "A", "a", "c"]).unwrap();
        assert!(a.quick);
        assert_eq!(a.out, PathBuf::from("/tmp/x"));
        assert_eq!(
            a.selected(),
            vec![Experiment::A, Experiment::C, Experiment::F]
        );
        let err = parse(&["h"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::InvalidValue);
        assert!(parse(&["ab"]).is_err());
        assert!(parse(&["--nope"]).is_err());
        // Usable as a subcommand's arguments.
        #[derive(clap::Parser)]
        enum Cli {
            Bench(Args),
        }
        let Cli::Bench(b) = Cli::try_parse_from(["vmbeam-lab", "bench", "--quick", "g"]).unwrap();
        assert_eq!(b.selected(), vec![Experiment::G]);
        <Args as clap::CommandFactory>::command().debug_assert();
    }

    #[test]
    fn full_plan_covers_every_experiment_and_system() {
        let p = Plan::new(&Experiment::ALL, false, Encryption::Tls);
        // a/b share one memory sweep, c/d/e share one 4 GiB run.
        let tags: BTreeSet<Experiment> = p.runs.iter().map(|r| r.experiment).collect();
        assert_eq!(
            tags,
            [Experiment::A, Experiment::C, Experiment::F, Experiment::G].into()
        );
        assert_eq!(p.runs.len(), 5 * (6 + 1 + 4 + 1));
        let a: Vec<u64> = p
            .runs
            .iter()
            .filter(|r| r.experiment == Experiment::A && r.system == System::ZeroCopy)
            .map(|r| r.settings.memory_mib)
            .collect();
        assert_eq!(a, vec![128, 256, 512, 1024, 2048, 4096]);
        let c: Vec<&PlannedRun> = p
            .runs
            .iter()
            .filter(|r| r.experiment == Experiment::C)
            .collect();
        assert!(c
            .iter()
            .all(|r| r.settings.memory_mib == 4096 && r.probes.time_series && r.probes.process_io));
        let f_max = p
            .runs
            .iter()
            .filter(|r| r.experiment == Experiment::F)
            .map(|r| r.settings.dirty_pages_per_s)
            .max();
        assert_eq!(f_max, Some(100_000));
        assert!(p
            .runs
            .iter()
            .filter(|r| r.experiment == Experiment::G)
            .all(|r| r.probes.web_load));
        // Only the c/d/e runs are sampled over time.
        for r in &p.runs {
            assert_eq!(
                r.probes.time_series,
                r.experiment == Experiment::C,
                "{:?}",
                r.experiment
            );
        }
        for r in &p.runs {
            assert!(r.fill_memory);
            match r.system {
                System::ZeroCopy | System::Plain => {
                    assert_eq!(r.settings.encryption, Encryption::None);
                    assert_eq!(r.settings.bandwidth_mbit, None);
                    assert_eq!(r.repetitions, 3);
                }
                System::NestedLike => {
                    assert_eq!(r.settings.bandwidth_mbit, Some(100));
                    assert_eq!(r.settings.encryption, Encryption::Tls);
                    assert_eq!(r.repetitions, 1);
                }
                System::BlanketLike => {
                    assert!(matches!(r.settings.bandwidth_mbit, Some(300) | None));
                    assert_eq!(r.settings.encryption, Encryption::Tls);
                }
            }
        }
    }

    #[test]
    fn caps_allow_two_passes_at_the_link_rate_within_bounds() {
        let full = Sizes::full();
        // 2 GiB at 100 Mbit/s: one pass 171.8 s, cap 343.6 s.
        assert_eq!(full.cap_for(2048, Some(100)), 343_597);
        // 4 GiB at 100 Mbit/s would be 687 s: the ceiling.
        assert_eq!(full.cap_for(4096, Some(100)), 600_000);
        // Small or fast: the floor.
        assert_eq!(full.cap_for(160, None), 60_000);
        let quick = Sizes::quick();
        assert_eq!(quick.cap_for(128, Some(100)), 21_474);
        assert_eq!(quick.cap_for(128, None), 20_000);
    }

    #[test]
    fn group_members_alone_still_get_their_runs() {
        let p = Plan::new(&[Experiment::B, Experiment::E], true, Encryption::SshTunnel);
        let tags: BTreeSet<Experiment> = p.runs.iter().map(|r| r.experiment).collect();
        assert_eq!(tags, [Experiment::B, Experiment::E].into());
        let e = p
            .runs
            .iter()
            .find(|r| r.experiment == Experiment::E)
            .unwrap();
        assert!(e.probes.process_io && !e.probes.time_series);
        assert!(p
            .runs
            .iter()
            .any(|r| r.settings.encryption == Encryption::SshTunnel));
    }

    #[test]
    fn quick_plan_is_small_and_fits_five_minutes_on_paper() {
        let p = Plan::new(&Experiment::ALL, true, Encryption::Tls);
        assert!(p.runs.iter().all(|r| r.settings.memory_mib <= 256));
        assert!(p
            .runs
            .iter()
            .all(|r| (20_000..=30_000).contains(&r.settings.cap_ms)));
        assert_eq!(p.migrations(), 4 * (2 + 1 + 2 + 1));
        assert!(!p
            .runs
            .iter()
            .any(|r| r.system == System::BlanketLike && r.settings.bandwidth_mbit.is_none()));
        // Assumptions: 5 s per migration for boot and fill, 1 Gbit/s unshaped under TCG.
        let est = p.estimated_seconds(5.0, 1000.0);
        assert!(est < 300.0, "quick plan estimated at {est:.0} s");
        let full = Plan::new(&Experiment::ALL, false, Encryption::Tls);
        assert!(full.estimated_seconds(5.0, 1000.0) > 1800.0);
    }
}
