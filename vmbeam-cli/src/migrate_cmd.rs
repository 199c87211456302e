//! `vmbeam migrate` (virsh migrate's syntax) and the other commands that talk to the local
//! vmbeamd: `enable`, `disable`, `status`, `colocation`. The CLI is a thin D-Bus client; the
//! daemon does the work and owns the state.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use vmbeam_bus::{BeamError, ExitClass, JobStatus, ManagerProxyBlocking, MigrateOptionsDict};
use vmbeam_cli::MigrateArgs;
use vmbeam_core::job::{MigrateOptions, Phase};
use vmbeam_core::plan::RequestedMode;

use vmbeam_cli::{exit, Coded};

/// Connects to vmbeamd on the system bus.
pub fn bus() -> anyhow::Result<zbus::blocking::Connection> {
    zbus::blocking::Connection::system()
        .context("cannot reach the system bus; is dbus running?")
        .context(Coded(exit::NOT_READY))
}

/// The exit code for a kind of error.
fn code_of(class: ExitClass) -> u8 {
    match class {
        ExitClass::Refused => exit::REFUSED,
        ExitClass::BadInput => exit::BAD_INPUT,
        ExitClass::NotReady => exit::NOT_READY,
        ExitClass::Failed => exit::FAILED,
    }
}

/// Maps a typed D-Bus error to an exit code and a clear message.
pub fn daemon_err(e: BeamError) -> anyhow::Error {
    let code = code_of(e.class());
    if code == exit::NOT_READY {
        return anyhow!(
            "vmbeamd is not running on this host (org.vmbeam.VMBeam1 is not on the system bus): {}",
            e.text()
        )
        .context(Coded(code));
    }
    anyhow!(e.text()).context(Coded(code))
}

/// virsh's arguments in the operation model.
/// Reads an XML file named on the command line (`--xml`, `--persistent-xml`).
fn read_xml(what: &str, path: &Option<std::path::PathBuf>) -> anyhow::Result<Option<String>> {
    path.as_ref()
        .map(|p| {
            std::fs::read_to_string(p)
                .with_context(|| format!("{what} {}", p.display()))
                .context(Coded(exit::BAD_INPUT))
        })
        .transpose()
}

fn options_of(a: &MigrateArgs) -> anyhow::Result<MigrateOptions> {
    Ok(MigrateOptions {
        dest_xml: read_xml("--xml", &a.xml)?,
        persist_xml: read_xml("--persistent-xml", &a.persistent_xml)?,
        mode: if a.zero_copy {
            RequestedMode::RequireZeroCopy
        } else if a.no_zero_copy {
            RequestedMode::ForceTraditional
        } else {
            RequestedMode::Auto
        },
        live: a.live,
        persistent: a.persistent,
        undefine_source: a.undefinesource,
        timeout_secs: a.timeout.map(u64::from),
        tls: a.tls,
        migrate_uri: a.migrateuri.clone(),
    })
}

fn human_bytes(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
    } else if b >= 1 << 20 {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    } else {
        format!("{:.1} KiB", b as f64 / 1024.0)
    }
}

pub fn run(a: MigrateArgs) -> anyhow::Result<()> {
    let conn = bus()?;
    let mgr = ManagerProxyBlocking::new(&conn)?;
    let opts = MigrateOptionsDict::from(&options_of(&a)?);
    let started = Instant::now();
    let path = mgr
        .migrate(&a.domain, &a.desturi, opts)
        .map_err(daemon_err)?;
    let tty = std::io::stderr().is_terminal();
    let bar = tty.then(|| {
        let b = indicatif::ProgressBar::new(100);
        b.set_style(
            indicatif::ProgressStyle::with_template("{msg:<22} [{bar:40}] {pos:>3}%")
                .expect("valid template")
                .progress_chars("=> "),
        );
        b
    });
    let mut last_phase = None;
    let mut last_line = Instant::now();
    let mut shown = 0u32;
    let job = loop {
        // Every read is a real GetAll: a job that ends before a client could subscribe to
        // its PropertiesChanged is still seen to end.
        let job = JobStatus::read(&conn, &path).map_err(|e| {
            anyhow!(
                "lost contact with vmbeamd while following {path}: {}. libvirt's own job may \
                 go on without it (virsh domjobinfo {}); once vmbeamd is back, `vmbeam status` \
                 shows how the hand-over settled",
                e.text(),
                a.domain
            )
        })?;
        let phase = job.phase;
        // The daemon's progress never goes backwards; the display keeps that promise too.
        shown = shown.max(job.progress);
        if let Some(b) = &bar {
            b.set_message(phase.to_string());
            b.set_position(shown as u64);
        } else if a.verbose
            && (Some(phase) != last_phase || last_line.elapsed() >= Duration::from_secs(1))
        {
            eprintln!("{phase}: {shown}%");
            last_line = Instant::now();
        }
        if Some(phase) != last_phase && phase == Phase::Migrating && a.verbose {
            let m = job.mode.map(|m| m.to_string()).unwrap_or_default();
            let line = format!("mode: {m} ({})", job.mode_reason);
            match &bar {
                Some(b) => b.println(line),
                None => eprintln!("{line}"),
            }
        }
        last_phase = Some(phase);
        if phase.is_terminal() {
            break job;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let total = started.elapsed().as_millis();
    if job.phase != Phase::Completed {
        let err = job
            .error
            .unwrap_or_else(|| BeamError::Failed("(the job gave no error)".into()));
        return Err(
            anyhow!("migration of {} {}: {}", a.domain, job.phase, err.text())
                .context(Coded(code_of(err.class()))),
        );
    }
    let mode = job.mode.map(|m| m.to_string()).unwrap_or_default();
    println!("Migration: {} -> {} completed", a.domain, a.desturi);
    println!("  mode:           {mode} ({})", job.mode_reason);
    println!("  total time:     {total} ms");
    println!("  downtime:       {} ms", job.downtime_ms);
    let bytes = job.bytes_transferred;
    println!("  bytes on wire:  {bytes} ({})", human_bytes(bytes));
    println!("  job:            {path}");
    if a.verbose {
        let steps: Vec<String> = job
            .timeline
            .iter()
            .map(|(s, ms)| format!("{s}@{ms}"))
            .collect();
        println!("  timeline (ms):  {}", steps.join(" "));
    }
    Ok(())
}

/// `vmbeam enable|disable DOMAIN`.
pub fn set_enabled(domain: &str, enable: bool) -> anyhow::Result<()> {
    let conn = bus()?;
    let mgr = ManagerProxyBlocking::new(&conn)?;
    let changes = if enable {
        mgr.enable(domain)
    } else {
        mgr.disable(domain)
    }
    .map_err(daemon_err)?;
    for c in changes {
        println!("{c}");
    }
    Ok(())
}

/// `vmbeam colocation DESTURI`.
pub fn colocation(dest: &str) -> anyhow::Result<()> {
    let conn = bus()?;
    let mgr = ManagerProxyBlocking::new(&conn)?;
    let (ok, host, why) = mgr.co_location(dest).map_err(daemon_err)?;
    println!(
        "{}: {why}",
        if ok { "co-located" } else { "not co-located" }
    );
    if !host.is_empty() {
        println!("destination host: {host}");
    }
    if ok {
        Ok(())
    } else {
        Err(anyhow!("zero-copy to {dest} is not possible").context(Coded(exit::REFUSED)))
    }
}

/// `vmbeam status`: beam domains, pool files and their owners, jobs.
pub fn status() -> anyhow::Result<()> {
    let conn = bus()?;
    let mgr = ManagerProxyBlocking::new(&conn)?;
    let st = mgr.status().map_err(daemon_err)?;
    let doms = mgr.list_domains().map_err(daemon_err)?;
    print!("{}", render_status(&st, &doms));
    Ok(())
}

/// What the device rows of `Status` start with (vmbeamd's `ops::device_rows`).
const DEVICE_ROW: &str = "host-device ";

/// `vmbeam status`'s text: the daemon's view, the pool as its kind and place (vmbeamd's
/// `pool` field: `directory (DIR)` or `host-device (vmbeam-host channel PATH)`), the beam
/// domains, then the pool's files or, in a host-device cloud VM, the devices it holds
/// from the primary cloud's host (BAR 2's file, size, guest, role, share, proof), and jobs.
pub fn render_status(st: &vmbeam_bus::DaemonStatus, doms: &[vmbeam_bus::DomainRow]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    for (k, v) in [
        ("host", &st.host),
        ("cloud", &st.cloud),
        ("pool", &st.pool),
        ("libvirt-host-uuid", &st.libvirt_host_uuid),
    ] {
        let _ = writeln!(out, "{k:<18} {v}");
    }
    let _ = writeln!(out, "beam domains:");
    if doms.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    for (name, uuid, state, owner, file, generation) in doms {
        let _ = writeln!(
            out,
            "  {name:<16} {state:<9} owner={owner} gen={generation} file={file} uuid={uuid}"
        );
    }
    let host_device = st.pool.starts_with("host-device");
    let (devices, files): (Vec<_>, Vec<_>) = st
        .pool_files
        .iter()
        .partition(|(_, _, rec)| rec.starts_with(DEVICE_ROW));
    if !host_device || !files.is_empty() {
        let _ = writeln!(out, "pool files:");
        if files.is_empty() {
            let _ = writeln!(out, "  (none)");
        }
        for (file, size, record) in &files {
            let size = if *size < 0 {
                "missing".to_string()
            } else {
                size.to_string()
            };
            let _ = writeln!(out, "  {file} size={size} {record}");
        }
    }
    if host_device || !devices.is_empty() {
        let _ = writeln!(out, "host devices:");
        if devices.is_empty() {
            let _ = writeln!(out, "  (none)");
        }
        for (path, size, record) in &devices {
            let record = record.strip_prefix(DEVICE_ROW).unwrap_or(record);
            let _ = writeln!(out, "  {path} bar-size={size} {record}");
        }
    }
    let _ = writeln!(out, "jobs:");
    if st.jobs.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    for (path, domain, dest, phase, progress, mode) in &st.jobs {
        let _ = writeln!(
            out,
            "  {path} {domain} -> {dest} phase={phase} progress={progress}% mode={mode}"
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(pool: &str, rows: Vec<vmbeam_bus::PoolFileRow>) -> vmbeam_bus::DaemonStatus {
        vmbeam_bus::DaemonStatus {
            host: "cvm1".into(),
            cloud: "acme".into(),
            pool: pool.into(),
            libvirt_host_uuid: "5f0c2b5e-1a2b-4c3d-8e4f-0000000000a1".into(),
            pool_files: rows,
            jobs: Vec::new(),
        }
    }

    #[test]
    fn status_shows_the_host_device_pool_and_its_devices_not_a_directory() {
        let st = status(
            "host-device (vmbeam-host channel /dev/virtio-ports/org.vmbeam.host.0)",
            vec![(
                "/sys/bus/pci/devices/0000:00:1f.0/resource2".into(),
                536870912,
                "host-device guest=6e3b1e9a-1b2c-4d5e-8f90-0123456789ab role=owner shared-with=- proof=-".into(),
            )],
        );
        let text = render_status(&st, &[]);
        assert!(
            text.contains("pool               host-device (vmbeam-host channel /dev/virtio-ports/org.vmbeam.host.0)\n"),
            "{text}"
        );
        assert!(
            text.contains("host devices:\n  /sys/bus/pci/devices/0000:00:1f.0/resource2 bar-size=536870912 guest=6e3b1e9a-1b2c-4d5e-8f90-0123456789ab role=owner"),
            "{text}"
        );
        assert!(!text.contains("pool files:"), "{text}");
        // None held yet: said so.
        let text = render_status(&status(&st.pool, Vec::new()), &[]);
        assert!(text.contains("host devices:\n  (none)\n"), "{text}");
    }

    #[test]
    fn status_shows_the_directory_pool_and_its_files() {
        let st = status(
            "directory (/var/lib/vmbeam/pool)",
            vec![("web1.ram".into(), -1, "no owner record".into())],
        );
        let text = render_status(&st, &[]);
        assert!(text.contains("pool               directory (/var/lib/vmbeam/pool)\n"));
        assert!(
            text.contains("pool files:\n  web1.ram size=missing no owner record\n"),
            "{text}"
        );
        assert!(!text.contains("host devices:"), "{text}");
    }
}
