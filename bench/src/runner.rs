//! `vmbeam-lab bench`: runs the [`crate::plan::Plan`] on a lab it brings up (two cloud VMs) and
//! tears down, and writes the results, the plots and the report.
//!
//! Every migration goes through the product's own path: `vmbeam migrate` run inside the
//! source cloud VM (`vmbeam-lab exec`), talking to that cloud VM's vmbeamd, which drives its
//! libvirtd. Zero-copy is `--zero-copy`; the baselines are `--no-zero-copy`, encrypted with
//! QEMU's native TLS (`--tls`, certificates made by the lab) where the plan says so, over the
//! cloud network shaped with `tc` (token bucket) on both cloud VMs' links.
//!
//! Measured per run: the migration time and downtime as vmbeamd reports them (libvirt's job
//! statistics), the bytes through the source cloud VM's interface (both directions, read from
//! `/proc/PID/net/dev` of a process in its namespace), the whole host's CPU time from
//! `/proc/stat` (all cloud VMs, their libvirtd and QEMU, the encryption), the guest's achieved
//! dirty rate (its agent), and for experiment g the guest's web throughput from the load
//! namespace. A migration still running at the cap is aborted (`virsh domjobabort`) and
//! recorded as not converged with the time spent.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vmbeam_lab::state::{CloudVm, Shaping};
use vmbeam_lab::{guest, net, LabError};

use crate::measure::{self, HostCpu, Sampler};
use crate::memtraffic::OurModel;
use crate::model::{self, Accel, Encryption, Machine, Outcome, RunMetadata, RunRecord, System};
use crate::plan::{Args, PlannedRun};
use crate::plot::{self, RunSeries};
use crate::webload::WebLoad;
use crate::{Error, Result};

/// What `vmbeam-lab bench` needs from its installation.
#[derive(Debug, Clone)]
pub struct Tools {
    /// The `vmbeam-lab` binary (its `exec` runs commands inside the cloud VMs).
    pub lab: PathBuf,
    /// The product's `vmbeam` binary (run inside the cloud VMs for each migration).
    pub vmbeam: PathBuf,
    /// The statically linked guest agent.
    pub agent_binary: PathBuf,
    /// Where vmbeamd and vmbeam-hook are.
    pub bin_dir: PathBuf,
}

/// What a bench invocation produced.
#[derive(Debug, Clone)]
pub struct BenchSummary {
    /// Rows written.
    pub runs: usize,
    /// Wall time, s.
    pub duration_s: f64,
    /// `runs.csv`, `runs.json`, `series.json`, `report.md`, then the plots (PNG, SVG).
    pub files: Vec<PathBuf>,
}

/// Web clients of experiment g.
const WEB_CLIENTS: u32 = 4;
/// The cloud VMs' link to the cloud network.
const CLOUD_DEV: &str = "eth0";
/// Environment variable of the bench's test hook: a system name (`plain`, ...). The guest
/// is killed after the first run of that system that passed its check and is not its
/// guest's last; the bench must blame that run and go on.
pub const BREAK_GUEST_ENV: &str = "VMBEAM_BENCH_BREAK_GUEST_AFTER";

/// What became of one planned run.
enum Attempt {
    /// It ran (whatever its outcome: failed, not converged, guest lost are results).
    Done(Box<RunRecord>, Option<RunSeries>),
    /// It could not start: the guest no longer answers (why). The previous run of this
    /// guest broke it.
    GuestGone(String),
}

/// Sampling interval of the time series (c, d).
const SAMPLE_EVERY: Duration = Duration::from_millis(200);

fn run_err(msg: impl Into<String>) -> Error {
    Error::Run(msg.into())
}

/// Brings the lab down when dropped (also on error and panic).
struct LabUp;

impl Drop for LabUp {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("VMBEAM_BENCH_KEEP_LAB").is_some() {
            eprintln!("bench: the lab is left up for inspection; `vmbeam-lab down` removes it");
            return;
        }
        match vmbeam_lab::down() {
            Ok(r) => eprintln!(
                "bench: lab down ({} processes, {} namespaces removed)",
                r.processes, r.namespaces
            ),
            Err(e) => eprintln!("bench: lab down failed: {e}; run `vmbeam-lab down`"),
        }
    }
}

/// Runs the bench described by `args`.
pub fn run(args: &Args, tools: &Tools) -> Result<BenchSummary> {
    let t0 = Instant::now();
    crate::plot::ensure_font()?;
    if args.render_only {
        let files = render(&args.out)?;
        return Ok(BenchSummary {
            runs: model::read_json(&args.out.join("runs.json"))?.len(),
            duration_s: t0.elapsed().as_secs_f64(),
            files,
        });
    }
    if matches!(vmbeam_lab::state::LabState::load(), Ok(Some(_))) {
        return Err(Error::Lab(LabError::BadInput(
            "a lab is already up; `vmbeam-lab bench` makes and removes its own: run `vmbeam-lab down` first"
                .into(),
        )));
    }
    let plan = args.plan(Encryption::Tls);
    std::fs::create_dir_all(&args.out).map_err(crate::io_err(&args.out))?;
    eprintln!(
        "bench: {} migrations in {} runs (experiments {}), results in {}",
        plan.migrations(),
        plan.runs.len(),
        plan.experiments.iter().map(|e| e.id()).collect::<String>(),
        args.out.display()
    );
    let opts = vmbeam_lab::UpOptions {
        cloud_vms: 2,
        shaping: Shaping::default(),
        agent_binary: tools.agent_binary.clone(),
        bin_dir: tools.bin_dir.clone(),
        other_clouds: Vec::new(),
        own_pools: Vec::new(),
        shared_fs: Vec::new(),
    };
    let _ = vmbeam_lab::up(&opts)?;
    let _lab = LabUp;
    let state = vmbeam_lab::require_state()?;
    let cvms = [state.cloud_vms[0].clone(), state.cloud_vms[1].clone()];
    let meta = metadata(&state)?;
    let image = vmbeam_lab::guest_image(&tools.agent_binary)?;
    let ctx = Ctx {
        tools,
        cvms: &cvms,
        meta,
        shaping: std::cell::Cell::new(None),
        web_seconds: plan.sizes.web_seconds,
    };

    // One guest per memory size, reused by every run at that size (fewer boots and fills).
    let mut order: Vec<&PlannedRun> = plan.runs.iter().collect();
    order.sort_by_key(|r| guest_mib(r.settings.memory_mib));
    let total: u32 = plan.migrations();
    let mut records: Vec<RunRecord> = Vec::new();
    // Test hook: kill the guest (as a late guest crash would) right after the first run of
    // this system that passed its check and is followed by another run of the same guest.
    let mut break_after = std::env::var(BREAK_GUEST_ENV).ok();
    let mut series: Vec<RunSeries> = Vec::new();
    let mut done = 0u32;
    let mut i = 0;
    while i < order.len() {
        let mib = guest_mib(order[i].settings.memory_mib);
        let group: Vec<&PlannedRun> = order[i..]
            .iter()
            .take_while(|r| guest_mib(r.settings.memory_mib) == mib)
            .copied()
            .collect();
        i += group.len();
        let name = format!("bench{mib}");
        let mut rec = ctx.create_guest(&name, mib, &image)?;
        let mut at = 0usize;
        // The record of this guest's latest run, blamed if the guest turns out dead later.
        let mut last_of_guest: Option<usize> = None;
        let group_runs: u32 = group.iter().map(|r| r.repetitions).sum();
        let mut in_group = 0u32;
        for run in group {
            for rep in 0..run.repetitions {
                in_group += 1;
                done += 1;
                let mut rebooted = false;
                let (record, s) = loop {
                    match ctx.one(run, rep, &rec, &mut at)? {
                        Attempt::Done(record, s) => break (*record, s),
                        Attempt::GuestGone(why) if !rebooted => {
                            // It passed its check after its latest run and broke afterwards
                            // (a page lost by a copying migration can take a while to hit):
                            // that run broke it. Record so, reboot, run this one again.
                            eprintln!("bench: {name} is gone before run {done}: {why}");
                            if let Some(prev) = last_of_guest.and_then(|i| records.get_mut(i)) {
                                prev.outcome.guest_intact = false;
                                prev.outcome.guest_note =
                                    Some(format!("guest broke after passing its check: {why}"));
                                model::write_results(&args.out, &records)?;
                            }
                            guest::destroy(&name)?;
                            rec = ctx.create_guest(&name, mib, &image)?;
                            at = 0;
                            last_of_guest = None;
                            rebooted = true;
                        }
                        Attempt::GuestGone(why) => {
                            return Err(run_err(format!(
                                "{name}, freshly booted, does not answer: {why}"
                            )))
                        }
                    }
                };
                eprintln!("bench: [{done}/{total}] {}", line(&record));
                if let Some(s) = s {
                    series.push(s);
                }
                let lost = !record.outcome.guest_intact;
                records.push(record);
                last_of_guest = Some(records.len() - 1);
                // Written after every run: an interrupted bench keeps what it measured.
                model::write_results(&args.out, &records)?;
                if !lost
                    && in_group < group_runs
                    && break_after.as_deref() == Some(run.system.name())
                {
                    break_after = None;
                    eprintln!("bench: killing {name}'s QEMU on purpose ({BREAK_GUEST_ENV})");
                    ctx.kill_guest(&name, &ctx.cvms[at])?;
                }
                if lost {
                    // The run is recorded as it happened; the next one needs a live guest.
                    guest::destroy(&name)?;
                    rec = ctx.create_guest(&name, mib, &image)?;
                    at = 0;
                    last_of_guest = None;
                }
            }
        }
        guest::destroy(&name)?;
    }
    ctx.shape(None)?;
    drop(_lab);

    let duration_s = t0.elapsed().as_secs_f64();
    model::write_results(&args.out, &records)?;
    let series_path = args.out.join("series.json");
    std::fs::write(&series_path, serde_json::to_vec_pretty(&series)?)
        .map_err(crate::io_err(&series_path))?;
    let info = args.out.join("run-info.json");
    std::fs::write(
        &info,
        serde_json::to_vec_pretty(&serde_json::json!({ "duration_s": duration_s }))?,
    )
    .map_err(crate::io_err(&info))?;
    let files = render(&args.out)?;
    Ok(BenchSummary {
        runs: records.len(),
        duration_s,
        files,
    })
}

/// Renders the plots and the report from the results in `dir` (`runs.json`, `series.json`,
/// `run-info.json` if there): what `vmbeam-lab bench` does at the end, and `--render-only`.
/// Returns every file of the results, the plots last.
pub fn render(dir: &Path) -> Result<Vec<PathBuf>> {
    let runs_path = dir.join("runs.json");
    let records = model::read_json(&runs_path)?;
    if records.is_empty() {
        return Err(Error::Data(format!("{} has no runs", runs_path.display())));
    }
    let series_path = dir.join("series.json");
    let mut series: Vec<RunSeries> = match std::fs::read(&series_path) {
        Ok(b) => serde_json::from_slice(&b)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(crate::io_err(&series_path)(e)),
    };
    // One curve per system: its last sampled run (experiment c's large migration; results of
    // 2026-12-02 sampled every run, before the plan limited sampling to c).
    let mut seen = std::collections::BTreeSet::new();
    series.reverse();
    series.retain(|s| seen.insert(s.variant.clone()));
    series.reverse();
    let duration_s = std::fs::read(dir.join("run-info.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["duration_s"].as_f64());
    let plots = plot::render_all(&records, &series, &dir.join("plots"))?;
    let report = crate::report::write_report(dir, &records, &plots, duration_s)?;
    let mut files = vec![dir.join("runs.csv"), runs_path, series_path, report];
    for (_, png, svg) in plots {
        files.push(png);
        files.push(svg);
    }
    Ok(files)
}

/// Lab guests need at least [`guest::MIN_MEMORY_MIB`] (the paper's 128 MiB point runs at 160).
fn guest_mib(planned: u64) -> u64 {
    planned.max(guest::MIN_MEMORY_MIB)
}

fn line(r: &RunRecord) -> String {
    let o = &r.outcome;
    format!(
        "{} {:<26} {:>5} MiB {:>6} pages/s: {}{}, downtime {}, {} on the wire, {:.1} CPU s{}{}",
        r.experiment.id(),
        format!(
            "{} ({})",
            plot::variant_label(r),
            r.settings.encryption.name()
        ),
        r.settings.memory_mib,
        r.settings.dirty_pages_per_s,
        crate::report::human_ms(o.total_ms),
        if o.converged {
            ""
        } else {
            " NOT CONVERGED (aborted at the cap)"
        },
        o.downtime_ms.map_or("-".into(), crate::report::human_ms),
        crate::report::human_bytes(o.wire_bytes as f64),
        o.cpu_seconds,
        match (o.web_rps_normal, o.web_rps_migrating) {
            (Some(n), Some(m)) => format!(", web {n:.0} -> {m:.0} req/s"),
            _ => String::new(),
        },
        match (&o.guest_intact, &o.guest_note) {
            (true, _) => String::new(),
            (false, n) => format!(", GUEST LOST: {}", n.as_deref().unwrap_or("?")),
        }
    )
}

fn metadata(state: &vmbeam_lab::state::LabState) -> Result<RunMetadata> {
    let first_line = |prog: &str| -> String {
        vmbeam_lab::sys::run(prog, &["--version"])
            .map(|o| o.lines().next().unwrap_or("").trim().to_string())
            .unwrap_or_else(|e| format!("unknown ({e})"))
    };
    Ok(RunMetadata {
        machine: Machine::detect(Path::new("/"))?,
        accel: match state.accel.as_ref().map(|a| a.accel.as_str()) {
            Some("kvm") => Accel::Kvm,
            _ => Accel::Tcg,
        },
        qemu_version: first_line("qemu-system-x86_64"),
        libvirt_version: first_line("libvirtd"),
        vmbeam_version: env!("CARGO_PKG_VERSION").to_string(),
        timestamp: model::now_rfc3339(),
    })
}

struct Ctx<'a> {
    tools: &'a Tools,
    cvms: &'a [CloudVm; 2],
    meta: RunMetadata,
    /// The shaping in force on both links (`None` inside = unshaped; outer `None` = unknown).
    shaping: std::cell::Cell<Option<Option<u32>>>,
    /// Length of the normal-load phase of experiment g, s.
    web_seconds: u32,
}

/// The output of one `vmbeam migrate`.
struct Migrated {
    converged: bool,
    /// The migration failed before the cap (vmbeam migrate's message).
    failed: Option<String>,
    total_ms: f64,
    downtime_ms: Option<f64>,
    libvirt_bytes: Option<u64>,
}

fn summary_field(out: &str, key: &str) -> Option<String> {
    out.lines()
        .find_map(|l| l.trim().strip_prefix(key))
        .map(|v| v.trim().to_string())
}

fn leading_number(s: &str) -> Option<f64> {
    s.split_whitespace().next()?.parse().ok()
}

/// Allocated bytes (tmpfs blocks) of each of `uuid`'s pool files, by generation.
fn pool_allocation(pool: &Path, uuid: &str) -> Result<Vec<(u64, u64)>> {
    use std::os::unix::fs::MetadataExt;
    let mut v = Vec::new();
    let rd = std::fs::read_dir(pool).map_err(crate::io_err(pool))?;
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(gen) = name
            .strip_prefix(uuid)
            .and_then(|r| r.strip_prefix('.'))
            .and_then(|r| r.strip_suffix(".ram"))
            .and_then(|g| g.parse::<u64>().ok())
        else {
            continue;
        };
        if let Ok(m) = e.metadata() {
            v.push((gen, m.blocks() * 512));
        }
    }
    v.sort();
    Ok(v)
}

/// Guest RAM the migration wrote at the destination: the allocation of the newest pool file
/// now, minus what that same file held before (zero-copy: the same file, nothing new;
/// copying: a fresh file the incoming stream filled).
fn ram_written(before: &[(u64, u64)], after: &[(u64, u64)]) -> Option<u64> {
    let &(gen, now) = after.last()?;
    let was = before
        .iter()
        .find(|(g, _)| *g == gen)
        .map_or(0, |&(_, b)| b);
    Some(now.saturating_sub(was))
}

/// The line of a guest console that tells why the guest died last, if it did: the first line
/// of the last crash report (the console file is appended to across boots of a guest of the
/// same name, so earlier crashes are skipped).
fn fatal_console_line(console: &str) -> Option<String> {
    const FIRST: [&str; 3] = ["BUG:", "general protection fault", "Oops"];
    let all: Vec<&str> = console.lines().collect();
    // The latest boot only (the guest's init announces each boot).
    let boot = all
        .iter()
        .rposition(|l| l.contains("VMBEAM-INIT"))
        .unwrap_or(0);
    let lines = &all[boot..];
    let panic_at = lines.iter().rposition(|l| l.contains("Kernel panic"));
    let upto = panic_at.map_or(lines.len(), |i| i + 1);
    let l = lines[..upto]
        .iter()
        .rev()
        .find(|l| FIRST.iter().any(|m| l.contains(m)))
        .or(panic_at.map(|i| &lines[i]))?;
    let l = l.trim();
    // Drop the kernel's "[   21.0] " timestamp.
    Some(l.split_once("] ").map_or(l, |(_, r)| r).to_string())
}

impl Ctx<'_> {
    /// Boots the bench guest of `mib` on the first cloud VM, beam-enabled, memory filled.
    fn create_guest(
        &self,
        name: &str,
        mib: u64,
        image: &vmbeam_lab::image::GuestImage,
    ) -> Result<vmbeam_lab::state::GuestRecord> {
        let tg = Instant::now();
        let rec = guest::create(
            &guest::GuestSpec {
                name: name.to_string(),
                memory_mib: mib,
                fill_mib: None,
                dirty_rate: 0,
                vcpus: 1,
                on: self.cvms[0].name.clone(),
                beam: true,
            },
            image,
        )?;
        eprintln!(
            "bench: guest {name} ({mib} MiB, {} MiB filled with non-zero data) ready in {:.1} s",
            rec.fill_mib,
            tg.elapsed().as_secs_f64()
        );
        Ok(rec)
    }

    /// Whether the guest is intact where it should be (`on`): running there and its full
    /// memory check passes. When not, why (the console's fatal line, or the check's).
    fn verify(&self, name: &str, on: &CloudVm) -> (bool, Option<String>) {
        match guest::check(name) {
            Ok((_, c)) if c.pass => (true, None),
            Ok((_, c)) => (false, Some(format!("memory check failed: {}", c.line))),
            Err(LabError::GuestNotRunning(_)) => (
                false,
                Some(self.console_reason(name, on, "guest not running")),
            ),
            Err(e) => (
                false,
                Some(self.console_reason(name, on, &format!("guest unreachable: {e}"))),
            ),
        }
    }

    /// Kills the guest's QEMU on `on` (`virsh destroy`; the definition stays).
    fn kill_guest(&self, name: &str, on: &CloudVm) -> Result<()> {
        let o = Command::new(&self.tools.lab)
            .args(["exec", &on.name, "virsh", "-q", "destroy", name])
            .output()
            .map_err(|e| run_err(format!("virsh destroy: {e}")))?;
        if !o.status.success() {
            return Err(run_err(format!(
                "destroy {name} on {}: {}",
                on.name,
                String::from_utf8_lossy(&o.stderr).trim()
            )));
        }
        Ok(())
    }

    /// Why a guest on `on` stopped answering: the fatal line of its latest boot's console
    /// (a kernel oops or panic), else `otherwise`.
    fn console_reason(&self, name: &str, on: &CloudVm, otherwise: &str) -> String {
        let console = vmbeam_lab::cvm::host_path(on, &guest::console_inner(name));
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        fatal_console_line(&text)
            .map(|l| format!("guest died on {}: {l}", on.name))
            .unwrap_or_else(|| format!("{otherwise} on {} after the run", on.name))
    }

    /// Shapes both cloud VMs' links to `mbit` (`None`: unshaped), if not already so.
    fn shape(&self, mbit: Option<u32>) -> Result<()> {
        if self.shaping.get() == Some(mbit) {
            return Ok(());
        }
        for c in self.cvms {
            net::apply_shaping(
                &c.netns,
                CLOUD_DEV,
                Shaping {
                    bandwidth_mbit: mbit,
                    latency_ms: None,
                },
            )?;
        }
        self.shaping.set(Some(mbit));
        Ok(())
    }

    fn set_rate(&self, guest_name: &str, rate: u64) -> Result<Option<u64>> {
        let state = vmbeam_lab::require_state()?;
        let (_, mut agent) = guest::agent(&state, guest_name)?;
        let t = Duration::from_secs(10);
        let a = agent
            .request(&format!("RATE {rate}"), t)
            .map_err(|e| run_err(format!("set the dirty rate of {guest_name}: {e}")))?;
        if !a.starts_with("OK") {
            return Err(run_err(format!("agent refused RATE {rate}: {a}")));
        }
        if rate == 0 {
            return Ok(None);
        }
        // Let the rate settle over two of the agent's one-second windows.
        std::thread::sleep(Duration::from_millis(2200));
        let stats = agent
            .stats(t)
            .map_err(|e| run_err(format!("read {guest_name}'s agent: {e}")))?;
        Ok(stats
            .iter()
            .find(|(k, _)| k == "achieved_rate_1s")
            .and_then(|(_, v)| v.parse().ok()))
    }

    fn migrate(
        &self,
        run: &PlannedRun,
        dom: &str,
        from: &CloudVm,
        to: &CloudVm,
    ) -> Result<Migrated> {
        let mut cmd = Command::new(&self.tools.lab);
        cmd.args(["exec", &from.name])
            .arg(&self.tools.vmbeam)
            .args([
                "migrate",
                "--live",
                "--p2p",
                "--persistent",
                "--undefinesource",
            ])
            .arg(if run.system == System::ZeroCopy {
                "--zero-copy"
            } else {
                "--no-zero-copy"
            });
        if run.settings.encryption == Encryption::Tls {
            cmd.arg("--tls");
        }
        cmd.args([dom, &to.uri])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let t0 = Instant::now();
        let mut child = cmd
            .spawn()
            .map_err(|e| run_err(format!("start vmbeam migrate: {e}")))?;
        let cap = Duration::from_millis(run.settings.cap_ms);
        let mut aborted = false;
        loop {
            if child
                .try_wait()
                .map_err(|e| run_err(format!("wait for vmbeam migrate: {e}")))?
                .is_some()
            {
                break;
            }
            if !aborted && t0.elapsed() > cap {
                aborted = true;
                let o = Command::new(&self.tools.lab)
                    .args(["exec", &from.name, "virsh", "-q", "domjobabort", dom])
                    .output()
                    .map_err(|e| run_err(format!("virsh domjobabort: {e}")))?;
                if !o.status.success() {
                    eprintln!(
                        "bench: domjobabort at the cap: {}",
                        String::from_utf8_lossy(&o.stderr).trim()
                    );
                }
            }
            if aborted && t0.elapsed() > cap + Duration::from_secs(120) {
                let _ = child.kill();
                return Err(run_err(format!(
                    "migration of {dom} did not stop within 120 s of domjobabort"
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let spent = t0.elapsed();
        let out = child
            .wait_with_output()
            .map_err(|e| run_err(format!("read vmbeam migrate's output: {e}")))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if aborted && !out.status.success() {
            return Ok(Migrated {
                converged: false,
                failed: None,
                total_ms: spent.as_secs_f64() * 1000.0,
                downtime_ms: None,
                libvirt_bytes: None,
            });
        }
        if !out.status.success() {
            // A failed migration is a result (recorded, the guest checked where it should
            // still be), not the end of the bench.
            let msg = stderr
                .lines()
                .rev()
                .find(|l| l.starts_with("vmbeam: "))
                .unwrap_or(stderr.trim())
                .trim_start_matches("vmbeam: ")
                .to_string();
            return Ok(Migrated {
                converged: false,
                failed: Some(format!("{msg}{}", stdout.trim())),
                total_ms: spent.as_secs_f64() * 1000.0,
                downtime_ms: None,
                libvirt_bytes: None,
            });
        }
        let mode = summary_field(&stdout, "mode:").unwrap_or_default();
        let want = if run.system == System::ZeroCopy {
            "zero-copy"
        } else {
            "traditional"
        };
        if !mode.starts_with(want) {
            return Err(run_err(format!(
                "{dom}: expected a {want} migration, vmbeamd did '{mode}'"
            )));
        }
        Ok(Migrated {
            converged: true,
            failed: None,
            total_ms: summary_field(&stdout, "total time:")
                .and_then(|v| leading_number(&v))
                .unwrap_or(spent.as_secs_f64() * 1000.0),
            downtime_ms: summary_field(&stdout, "downtime:").and_then(|v| leading_number(&v)),
            libvirt_bytes: summary_field(&stdout, "bytes on wire:")
                .and_then(|v| leading_number(&v))
                .map(|b| b as u64),
        })
    }

    /// One migration of `guest` from where it is (`at`) to the other cloud VM.
    fn one(
        &self,
        run: &PlannedRun,
        rep: u32,
        guest: &vmbeam_lab::state::GuestRecord,
        at: &mut usize,
    ) -> Result<Attempt> {
        let (from, to) = (&self.cvms[*at], &self.cvms[1 - *at]);
        self.shape(run.settings.bandwidth_mbit)?;
        // The first words with the guest since its latest check: a guest that broke after
        // it (or never came back) is not a reason to stop the bench.
        let achieved = match self.set_rate(&guest.name, run.settings.dirty_pages_per_s) {
            Ok(a) => a,
            Err(e) => {
                return Ok(Attempt::GuestGone(self.console_reason(
                    &guest.name,
                    from,
                    &e.to_string(),
                )))
            }
        };
        let load_ns = Path::new("/run/netns").join(net::LOAD_NS);
        let web_addr: SocketAddr = format!("{}:80", guest.ip)
            .parse()
            .map_err(|e| run_err(format!("guest address {}: {e}", guest.ip)))?;
        let web_normal = if run.probes.web_load {
            let r = WebLoad::run_for(
                &load_ns,
                web_addr,
                "/",
                WEB_CLIENTS,
                Duration::from_secs(u64::from(self.web_seconds)),
            )?;
            if r.rps() == 0.0 && self.set_rate(&guest.name, 0).is_err() {
                // Not one answer from its web server, and its agent is silent too.
                return Ok(Attempt::GuestGone(self.console_reason(
                    &guest.name,
                    from,
                    "no answer from its web server or agent",
                )));
            }
            Some(r.rps())
        } else {
            None
        };
        let pid = from.holder_pid;
        let proc = Path::new("/proc");
        let net_now = move || {
            measure::read_netns_counters(proc, pid, CLOUD_DEV).map(|c| c.rx_bytes + c.tx_bytes)
        };
        let sample = run.probes.time_series && rep == 0;
        let samplers = sample.then(|| {
            (
                Sampler::start(SAMPLE_EVERY, net_now),
                Sampler::start(SAMPLE_EVERY, move || measure::read_host_cpu(proc)),
            )
        });
        let load = if run.probes.web_load {
            Some(WebLoad::start(&load_ns, web_addr, "/", WEB_CLIENTS)?)
        } else {
            None
        };
        let pool = vmbeam_lab::require_state()?.pool;
        let pool0 = pool_allocation(&pool, &guest.uuid)?;
        let net0 = net_now()?;
        let cpu0: HostCpu = measure::read_host_cpu(proc)?;
        let m = self.migrate(run, &guest.name, from, to)?;
        let cpu1 = measure::read_host_cpu(proc)?;
        let net1 = net_now()?;
        let written = if m.converged {
            ram_written(&pool0, &pool_allocation(&pool, &guest.uuid)?)
        } else {
            None
        };
        let web_during = load.map(|l| l.stop().rps());
        let series = match samplers {
            Some((n, c)) => {
                let n = n.stop()?;
                let c = c.stop()?;
                Some(RunSeries {
                    variant: plot::variant_label(&RunRecord {
                        experiment: run.experiment,
                        system: run.system,
                        repetition: rep,
                        settings: run.settings.clone(),
                        outcome: Outcome::default(),
                        meta: self.meta.clone(),
                    }),
                    bandwidth_mbit: measure::rates(&n)
                        .into_iter()
                        .map(|(t, bps)| (t, bps * 8.0 / 1e6))
                        .collect(),
                    cpu_percent: measure::utilisation_percent(&c),
                })
            }
            None => None,
        };
        let now_on = if m.converged { to } else { from };
        let (mut intact, mut note) = self.verify(&guest.name, now_on);
        if m.converged {
            *at = 1 - *at;
        }
        if intact && run.settings.dirty_pages_per_s > 0 {
            if let Err(e) = self.set_rate(&guest.name, 0) {
                intact = false;
                note = Some(self.console_reason(
                    &guest.name,
                    now_on,
                    &format!("passed its check, then stopped answering: {e}"),
                ));
            }
        }
        let stream = m.libvirt_bytes.unwrap_or(net1.saturating_sub(net0));
        let mut settings = run.settings.clone();
        settings.memory_mib = guest_mib(settings.memory_mib);
        let record = RunRecord {
            experiment: run.experiment,
            system: run.system,
            repetition: rep,
            settings,
            outcome: Outcome {
                converged: m.converged,
                total_ms: m.total_ms,
                downtime_ms: m.downtime_ms,
                wire_bytes: net1.saturating_sub(net0),
                libvirt_bytes: m.libvirt_bytes,
                cpu_seconds: cpu1.busy_seconds_since(&cpu0),
                memory_traffic_bytes: Some(
                    OurModel::for_run(run.system, run.settings.encryption).estimate(stream),
                ),
                web_rps_normal: web_normal,
                web_rps_migrating: web_during,
                dirty_achieved_pages_per_s: achieved,
                ram_written_bytes: written,
                guest_intact: intact,
                guest_note: note,
                error: m.failed,
            },
            meta: RunMetadata {
                timestamp: model::now_rfc3339(),
                ..self.meta.clone()
            },
        };
        Ok(Attempt::Done(Box::new(record), series))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_lines_of_vmbeam_migrate_are_read() {
        let out = "Migration: g1 -> qemu+tcp://198.18.0.12/system completed
  mode:           zero-copy (destination cvm2 shares the beam pool)
  total time:     766 ms
  downtime:       13 ms
  bytes on wire:  456408 (445.7 KiB)
  job:            /org/vmbeam/VMBeam1/jobs/1
";
        assert!(summary_field(out, "mode:")
            .unwrap()
            .starts_with("zero-copy"));
        assert_eq!(
            summary_field(out, "total time:").and_then(|v| leading_number(&v)),
            Some(766.0)
        );
        assert_eq!(
            summary_field(out, "downtime:").and_then(|v| leading_number(&v)),
            Some(13.0)
        );
        assert_eq!(
            summary_field(out, "bytes on wire:").and_then(|v| leading_number(&v)),
            Some(456_408.0)
        );
        assert_eq!(summary_field(out, "nothing:"), None);
    }

    #[test]
    fn ram_written_is_the_newest_pool_file_growth() {
        // Zero-copy: the same file (generation 3) before and after.
        assert_eq!(ram_written(&[(3, 1000)], &[(3, 1200)]), Some(200));
        // Copying: a fresh file (generation 4) beside the source's.
        assert_eq!(ram_written(&[(3, 1000)], &[(3, 1000), (4, 900)]), Some(900));
        assert_eq!(ram_written(&[(3, 1000)], &[]), None);
        // Pool files of the guest are found by name, others ignored.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("u1.2.ram"), vec![1u8; 8192]).unwrap();
        std::fs::write(dir.path().join("u1.10.ram"), b"").unwrap();
        std::fs::write(dir.path().join("u2.1.ram"), b"x").unwrap();
        std::fs::write(dir.path().join("u1.proof"), b"x").unwrap();
        let v = pool_allocation(dir.path(), "u1").unwrap();
        assert_eq!(v.iter().map(|(g, _)| *g).collect::<Vec<_>>(), vec![2, 10]);
        assert!(v[0].1 >= 8192);
    }

    #[test]
    fn the_fatal_console_line_is_the_last_crash() {
        let console =
            "VMBEAM-INIT boot 1\n[ 3.0] BUG: kernel NULL pointer dereference, address: 20\n\
                       [ 3.1] Kernel panic - not syncing: Fatal exception\n\
                       VMBEAM-INIT boot 2\nVMBEAM-AGENT status ok\n\
                       [ 9.0] general protection fault, probably for non-canonical address\n\
                       [ 9.1] Oops: 0000 [#1] PREEMPT SMP NOPTI\n\
                       [ 9.2] Kernel panic - not syncing: Fatal exception in interrupt\n";
        assert_eq!(
            fatal_console_line(console).as_deref(),
            Some("Oops: 0000 [#1] PREEMPT SMP NOPTI")
        );
        // A later boot without a crash report: the earlier crash is not reported.
        let clean =
            "VMBEAM-INIT boot 1\n[ 3.1] Kernel panic - not syncing: x\nVMBEAM-INIT boot 2\n";
        assert_eq!(fatal_console_line(clean), None);
    }

    #[test]
    fn the_fatal_console_line_is_found() {
        let console = "VMBEAM-AGENT status ok\n[   21.036744] ---[ end trace 0 ]---\n\
                       [   21.038547] Kernel panic - not syncing: Fatal exception in interrupt\n";
        assert_eq!(
            fatal_console_line(console).as_deref(),
            Some("Kernel panic - not syncing: Fatal exception in interrupt")
        );
        assert_eq!(fatal_console_line("VMBEAM-AGENT status ok\n"), None);
    }

    #[test]
    fn paper_sizes_below_the_lab_minimum_run_at_the_minimum() {
        assert_eq!(guest_mib(128), guest::MIN_MEMORY_MIB);
        assert_eq!(guest_mib(4096), 4096);
    }
}
