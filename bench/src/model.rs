//! The result model: one [`RunRecord`] per migration run, written as CSV and JSON.

use std::fmt;
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{io_err, Error, Result};

/// The experiments of issue 4 (the paper's Figures 2 to 7).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
#[value(rename_all = "lowercase")]
pub enum Experiment {
    /// Migration time vs guest memory (Fig. 2a).
    A,
    /// Downtime vs guest memory (Fig. 2b).
    B,
    /// Network load: bytes on the wire and bandwidth over time (Fig. 3).
    C,
    /// CPU load of the whole host and utilisation over time (Fig. 4).
    D,
    /// Memory traffic of the migration (Fig. 5).
    E,
    /// Dirty-rate sweep: time and downtime (Fig. 6).
    F,
    /// Guest impact: web throughput normal vs during migration (Fig. 7).
    G,
}

impl Experiment {
    /// All experiments, in order.
    pub const ALL: [Experiment; 7] = [
        Experiment::A,
        Experiment::B,
        Experiment::C,
        Experiment::D,
        Experiment::E,
        Experiment::F,
        Experiment::G,
    ];

    /// The one-letter id (`a`..`g`).
    pub fn id(self) -> char {
        match self {
            Experiment::A => 'a',
            Experiment::B => 'b',
            Experiment::C => 'c',
            Experiment::D => 'd',
            Experiment::E => 'e',
            Experiment::F => 'f',
            Experiment::G => 'g',
        }
    }

    /// Parses `a`..`g` (case-insensitive).
    pub fn from_id(s: &str) -> Option<Experiment> {
        let s = s.trim().to_ascii_lowercase();
        Experiment::ALL
            .into_iter()
            .find(|e| s.len() == 1 && s.starts_with(e.id()))
    }

    /// What it measures, for the report.
    pub fn title(self) -> &'static str {
        match self {
            Experiment::A => "Migration time vs guest memory",
            Experiment::B => "Downtime vs guest memory",
            Experiment::C => "Network load (bytes on the wire, bandwidth over time)",
            Experiment::D => "CPU load of the host",
            Experiment::E => "Memory traffic",
            Experiment::F => "Dirty-rate sweep",
            Experiment::G => "Guest web throughput, normal vs during migration",
        }
    }

    /// The paper's figure it reproduces.
    pub fn figure(self) -> &'static str {
        match self {
            Experiment::A => "2a",
            Experiment::B => "2b",
            Experiment::C => "3",
            Experiment::D => "4",
            Experiment::E => "5",
            Experiment::F => "6",
            Experiment::G => "7",
        }
    }
}

impl fmt::Display for Experiment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.id())
    }
}

/// The systems compared, all on the same guest and cloud VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum System {
    /// VMBeam zero-copy migration.
    ZeroCopy,
    /// Traditional migration over a 100 Mbit/s encrypted network (as Xen-Nest).
    NestedLike,
    /// Traditional migration over a fast (300 Mbit/s or unshaped) encrypted network (as Xen-Blanket).
    BlanketLike,
    /// Traditional migration, unshaped, unencrypted: the best case for copying.
    Plain,
}

impl System {
    /// All systems, zero-copy first.
    pub const ALL: [System; 4] = [
        System::ZeroCopy,
        System::NestedLike,
        System::BlanketLike,
        System::Plain,
    ];

    /// The name used in files and tables.
    pub fn name(self) -> &'static str {
        match self {
            System::ZeroCopy => "zero-copy",
            System::NestedLike => "nested-like",
            System::BlanketLike => "blanket-like",
            System::Plain => "plain",
        }
    }

    /// Whether the migration copies guest memory (everything but zero-copy).
    pub fn is_traditional(self) -> bool {
        self != System::ZeroCopy
    }
}

impl fmt::Display for System {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How the migration stream is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Encryption {
    /// Clear text (zero-copy carries only device state; `plain` by definition).
    None,
    /// libvirt/QEMU native TLS (`--tls`).
    Tls,
    /// An SSH tunnel (`qemu+ssh://`, `--tunnelled`), as the paper's baselines.
    SshTunnel,
}

impl Encryption {
    /// The name used in files and tables.
    pub fn name(self) -> &'static str {
        match self {
            Encryption::None => "none",
            Encryption::Tls => "tls",
            Encryption::SshTunnel => "ssh-tunnel",
        }
    }
}

/// The settings of one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// Guest memory, MiB.
    pub memory_mib: u64,
    /// Pages per second the guest dirties during the migration (0: idle, memory pre-filled).
    pub dirty_pages_per_s: u64,
    /// Cloud-network bandwidth cap, Mbit/s; `None` = unshaped.
    pub bandwidth_mbit: Option<u32>,
    /// Protection of the migration stream.
    pub encryption: Encryption,
    /// Time cap for a migration that may not converge, ms.
    pub cap_ms: u64,
}

impl Settings {
    /// `100 Mbit/s` or `unshaped`.
    pub fn bandwidth_label(&self) -> String {
        match self.bandwidth_mbit {
            Some(m) => format!("{m} Mbit/s"),
            None => "unshaped".to_string(),
        }
    }
}

/// What one run measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    /// Whether the migration finished within the cap.
    pub converged: bool,
    /// From start to the guest running on the destination with the source gone; if not
    /// converged, the time spent until the run was stopped. ms.
    pub total_ms: f64,
    /// Guest paused time, ms (`None` when not converged or not reported).
    pub downtime_ms: Option<f64>,
    /// Bytes on the cloud network measured on the cloud VMs' interfaces (tx of the source).
    pub wire_bytes: u64,
    /// Bytes libvirt's job statistics report as transferred (`None` if unavailable).
    pub libvirt_bytes: Option<u64>,
    /// CPU seconds of the whole host during the migration.
    pub cpu_seconds: f64,
    /// Guest memory read and written by the migration, bytes (measured where possible,
    /// else from [`crate::memtraffic`]).
    pub memory_traffic_bytes: Option<u64>,
    /// Guest web throughput without migration, requests/s (experiment g).
    pub web_rps_normal: Option<f64>,
    /// Guest web throughput during migration, requests/s (experiment g).
    pub web_rps_migrating: Option<f64>,
    /// Dirty rate the guest achieved just before the migration, pages/s (the agent's own
    /// count; under TCG a guest may not reach the rate asked for).
    #[serde(default)]
    pub dirty_achieved_pages_per_s: Option<u64>,
    /// Guest RAM the migration touched at the destination, bytes: measured as the growth of
    /// the destination's pool file allocation (tmpfs blocks). A copying migration writes every
    /// page it receives into a fresh sparse file and reads the ones sent as zero (which
    /// allocates them on tmpfs); zero-copy touches none.
    #[serde(default)]
    pub ram_written_bytes: Option<u64>,
    /// Whether the guest was intact after the run: running, and its agent's full memory check
    /// passed (a converged migration on the destination, an aborted one on the source).
    #[serde(default = "intact_default")]
    pub guest_intact: bool,
    /// What went wrong with the guest when it was not intact (its console's last fatal line).
    #[serde(default)]
    pub guest_note: Option<String>,
    /// Why the migration failed before its cap, if it did (`converged` is then false).
    #[serde(default)]
    pub error: Option<String>,
}

fn intact_default() -> bool {
    true
}

impl Default for Outcome {
    /// Nothing measured yet; the guest presumed intact.
    fn default() -> Self {
        Outcome {
            converged: false,
            total_ms: 0.0,
            downtime_ms: None,
            wire_bytes: 0,
            libvirt_bytes: None,
            cpu_seconds: 0.0,
            memory_traffic_bytes: None,
            web_rps_normal: None,
            web_rps_migrating: None,
            dirty_achieved_pages_per_s: None,
            ram_written_bytes: None,
            guest_intact: intact_default(),
            guest_note: None,
            error: None,
        }
    }
}

/// The machine a run was made on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Machine {
    /// Logical CPUs.
    pub cores: u32,
    /// Physical memory, MiB.
    pub memory_mib: u64,
    /// Kernel release (`uname -r`).
    pub kernel: String,
}

impl Machine {
    /// Reads cores, memory and kernel from `root` (`/` on a real machine):
    /// `proc/cpuinfo`, `proc/meminfo`, `proc/sys/kernel/osrelease`.
    pub fn detect(root: &Path) -> Result<Machine> {
        let read = |rel: &str| {
            let p = root.join(rel);
            std::fs::read_to_string(&p).map_err(io_err(p))
        };
        let cpuinfo = read("proc/cpuinfo")?;
        let cores = cpuinfo
            .lines()
            .filter(|l| l.split(':').next().map(str::trim) == Some("processor"))
            .count() as u32;
        let meminfo = read("proc/meminfo")?;
        let kib = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .ok_or_else(|| Error::Parse {
                what: "proc/meminfo".into(),
                detail: "no MemTotal".into(),
            })?;
        let kernel = read("proc/sys/kernel/osrelease")?.trim().to_string();
        Ok(Machine {
            cores: cores.max(1),
            memory_mib: kib / 1024,
            kernel,
        })
    }
}

/// How the guests were run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualisation.
    Kvm,
    /// QEMU's emulator.
    Tcg,
}

/// Where, when and with what a run was made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunMetadata {
    /// The machine.
    pub machine: Machine,
    /// KVM or TCG.
    pub accel: Accel,
    /// QEMU version.
    pub qemu_version: String,
    /// libvirt version.
    pub libvirt_version: String,
    /// VMBeam version.
    pub vmbeam_version: String,
    /// When the run started, UTC, RFC 3339 (`2026-11-25T10:00:00Z`).
    pub timestamp: String,
}

/// One migration run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// Which experiment.
    pub experiment: Experiment,
    /// Which system.
    pub system: System,
    /// Repetition number within the same experiment, system and settings (0-based).
    pub repetition: u32,
    /// The settings.
    pub settings: Settings,
    /// What was measured.
    pub outcome: Outcome,
    /// Where, when and with what.
    pub meta: RunMetadata,
}

/// Formats seconds since the Unix epoch as RFC 3339 UTC (`YYYY-MM-DDTHH:MM:SSZ`).
pub fn rfc3339_utc(unix_s: u64) -> String {
    let days = (unix_s / 86_400) as i64;
    let secs = unix_s % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Now, as [`rfc3339_utc`].
pub fn now_rfc3339() -> String {
    let s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    rfc3339_utc(s)
}

/// The CSV columns, in order.
pub const CSV_HEADER: [&str; 30] = [
    "experiment",
    "system",
    "repetition",
    "memory_mib",
    "dirty_pages_per_s",
    "bandwidth_mbit",
    "encryption",
    "cap_ms",
    "converged",
    "total_ms",
    "downtime_ms",
    "wire_bytes",
    "libvirt_bytes",
    "cpu_seconds",
    "memory_traffic_bytes",
    "web_rps_normal",
    "web_rps_migrating",
    "dirty_achieved_pages_per_s",
    "ram_written_bytes",
    "guest_intact",
    "guest_note",
    "error",
    "cores",
    "host_memory_mib",
    "kernel",
    "accel",
    "qemu_version",
    "libvirt_version",
    "vmbeam_version",
    "timestamp",
];

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_default()
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

impl RunRecord {
    /// The row's fields in [`CSV_HEADER`] order (empty = not measured; bandwidth empty = unshaped).
    pub fn csv_fields(&self) -> Vec<String> {
        let s = &self.settings;
        let o = &self.outcome;
        let m = &self.meta;
        vec![
            self.experiment.id().to_string(),
            self.system.name().to_string(),
            self.repetition.to_string(),
            s.memory_mib.to_string(),
            s.dirty_pages_per_s.to_string(),
            opt(s.bandwidth_mbit),
            s.encryption.name().to_string(),
            s.cap_ms.to_string(),
            o.converged.to_string(),
            format!("{:.3}", o.total_ms),
            opt(o.downtime_ms.map(|v| format!("{v:.3}"))),
            o.wire_bytes.to_string(),
            opt(o.libvirt_bytes),
            format!("{:.3}", o.cpu_seconds),
            opt(o.memory_traffic_bytes),
            opt(o.web_rps_normal.map(|v| format!("{v:.2}"))),
            opt(o.web_rps_migrating.map(|v| format!("{v:.2}"))),
            opt(o.dirty_achieved_pages_per_s),
            opt(o.ram_written_bytes),
            o.guest_intact.to_string(),
            o.guest_note.clone().unwrap_or_default(),
            o.error.clone().unwrap_or_default(),
            m.machine.cores.to_string(),
            m.machine.memory_mib.to_string(),
            m.machine.kernel.clone(),
            serde_json::to_value(m.accel)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            m.qemu_version.clone(),
            m.libvirt_version.clone(),
            m.vmbeam_version.clone(),
            m.timestamp.clone(),
        ]
    }
}

/// Writes the runs as CSV (header, then one row per run).
pub fn write_csv<W: Write>(mut w: W, runs: &[RunRecord]) -> std::io::Result<()> {
    writeln!(w, "{}", CSV_HEADER.join(","))?;
    for r in runs {
        let row: Vec<String> = r.csv_fields().iter().map(|f| csv_field(f)).collect();
        writeln!(w, "{}", row.join(","))?;
    }
    Ok(())
}

/// Writes the runs as a JSON array, one object per run.
pub fn write_json<W: Write>(w: W, runs: &[RunRecord]) -> Result<()> {
    serde_json::to_writer_pretty(w, runs)?;
    Ok(())
}

/// Writes `runs.csv` and `runs.json` into `dir` (created if missing); returns their paths.
pub fn write_results(
    dir: &Path,
    runs: &[RunRecord],
) -> Result<(std::path::PathBuf, std::path::PathBuf)> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let csv = dir.join("runs.csv");
    let json = dir.join("runs.json");
    let f = std::fs::File::create(&csv).map_err(io_err(&csv))?;
    let mut bw = std::io::BufWriter::new(f);
    write_csv(&mut bw, runs).map_err(io_err(&csv))?;
    bw.flush().map_err(io_err(&csv))?;
    let f = std::fs::File::create(&json).map_err(io_err(&json))?;
    let mut bw = std::io::BufWriter::new(f);
    write_json(&mut bw, runs)?;
    bw.flush().map_err(io_err(&json))?;
    Ok((csv, json))
}

/// Reads runs back from a JSON file written by [`write_json`].
pub fn read_json(path: &Path) -> Result<Vec<RunRecord>> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    Ok(serde_json::from_str(&text)?)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn meta() -> RunMetadata {
        RunMetadata {
            machine: Machine {
                cores: 2,
                memory_mib: 7936,
                kernel: "6.1.0-test".into(),
            },
            accel: Accel::Tcg,
            qemu_version: "7.2.0".into(),
            libvirt_version: "9.0.0".into(),
            vmbeam_version: "0.1.0".into(),
            timestamp: "2026-11-25T10:00:00Z".into(),
        }
    }

    pub(crate) fn run(
        experiment: Experiment,
        system: System,
        memory_mib: u64,
        dirty: u64,
        total_ms: f64,
    ) -> RunRecord {
        let traditional = system.is_traditional();
        RunRecord {
            experiment,
            system,
            repetition: 0,
            settings: Settings {
                memory_mib,
                dirty_pages_per_s: dirty,
                bandwidth_mbit: match system {
                    System::NestedLike => Some(100),
                    System::BlanketLike => Some(300),
                    _ => None,
                },
                encryption: match system {
                    System::NestedLike | System::BlanketLike => Encryption::Tls,
                    _ => Encryption::None,
                },
                cap_ms: 600_000,
            },
            outcome: Outcome {
                converged: true,
                total_ms,
                downtime_ms: Some(if traditional { 150.0 } else { 18.0 }),
                wire_bytes: if traditional {
                    memory_mib * 1024 * 1024
                } else {
                    446 * 1024
                },
                libvirt_bytes: Some(if traditional {
                    memory_mib * 1024 * 1024
                } else {
                    400 * 1024
                }),
                cpu_seconds: total_ms / 1000.0,
                ..Outcome::default()
            },
            meta: meta(),
        }
    }

    #[test]
    fn experiment_ids_round_trip() {
        for e in Experiment::ALL {
            assert_eq!(Experiment::from_id(&e.id().to_string()), Some(e));
        }
        assert_eq!(Experiment::from_id("A"), Some(Experiment::A));
        assert_eq!(Experiment::from_id("h"), None);
        assert_eq!(Experiment::from_id("ab"), None);
        assert_eq!(Experiment::from_id(""), None);
    }

    #[test]
    fn json_round_trips_and_uses_the_issue_names() {
        let runs = vec![
            run(Experiment::A, System::ZeroCopy, 1024, 0, 700.0),
            run(Experiment::A, System::NestedLike, 1024, 0, 90_000.0),
        ];
        let mut buf = Vec::new();
        write_json(&mut buf, &runs).unwrap();
        let text = String::from_utf8(buf).unwrap();
        assert!(text.contains("\"zero-copy\""));
        assert!(text.contains("\"nested-like\""));
        assert!(text.contains("\"experiment\": \"a\""));
        assert!(text.contains("\"accel\": \"tcg\""));
        let back: Vec<RunRecord> = serde_json::from_str(&text).unwrap();
        assert_eq!(back, runs);
    }

    #[test]
    fn csv_has_one_row_per_run_with_header_width() {
        let mut r = run(Experiment::F, System::BlanketLike, 2048, 10_000, 5_000.0);
        r.meta.kernel_with_comma_for_test();
        r.outcome.converged = false;
        r.outcome.downtime_ms = None;
        let runs = vec![run(Experiment::A, System::Plain, 128, 0, 1000.0), r];
        let mut buf = Vec::new();
        write_csv(&mut buf, &runs).unwrap();
        let text = String::from_utf8(buf).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0].split(',').count(), CSV_HEADER.len());
        assert!(lines[1].starts_with("a,plain,0,128,0,,none,"));
        assert!(lines[2].contains("f,blanket-like,0,2048,10000,300,tls,600000,false,5000.000,,"));
        assert!(lines[2].contains("\"6.1.0, \"\"odd\"\"\""));
    }

    impl RunMetadata {
        fn kernel_with_comma_for_test(&mut self) {
            self.machine.kernel = "6.1.0, \"odd\"".into();
        }
    }

    #[test]
    fn write_results_writes_both_files_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let runs = vec![run(Experiment::B, System::ZeroCopy, 512, 0, 710.0)];
        let (csv, json) = write_results(&dir.path().join("out"), &runs).unwrap();
        assert!(std::fs::read_to_string(csv).unwrap().lines().count() == 2);
        assert_eq!(read_json(&json).unwrap(), runs);
    }

    #[test]
    fn machine_is_read_from_a_root() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        std::fs::create_dir_all(p.join("proc/sys/kernel")).unwrap();
        std::fs::write(
            p.join("proc/cpuinfo"),
            "processor\t: 0\nmodel name\t: X\n\nprocessor\t: 1\nmodel name\t: X\n",
        )
        .unwrap();
        std::fs::write(
            p.join("proc/meminfo"),
            "MemTotal:        8126464 kB\nMemFree: 1 kB\n",
        )
        .unwrap();
        std::fs::write(p.join("proc/sys/kernel/osrelease"), "6.1.0-28-amd64\n").unwrap();
        let m = Machine::detect(p).unwrap();
        assert_eq!(
            m,
            Machine {
                cores: 2,
                memory_mib: 7936,
                kernel: "6.1.0-28-amd64".into()
            }
        );
        assert!(Machine::detect(&p.join("nope")).is_err());
    }

    #[test]
    fn machine_detect_works_on_this_host() {
        let m = Machine::detect(Path::new("/")).unwrap();
        assert!(m.cores >= 1 && m.memory_mib > 0 && !m.kernel.is_empty());
    }

    #[test]
    fn rfc3339_is_right() {
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339_utc(1_764_064_800), "2025-11-25T10:00:00Z");
        assert!(now_rfc3339().ends_with('Z'));
    }
}
