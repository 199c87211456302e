//! `vmbeam migrate` (virsh migrate's syntax) and the other commands that talk to the local
//! vmbeamd: `enable`, `disable`, `status`, `colocation`. The CLI is a thin D-Bus client; the
//! daemon does the work and owns the state.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use vmbeam_bus::{BeamError, JobProxyBlocking, ManagerProxyBlocking};
use vmbeam_cli::MigrateArgs;
use zbus::zvariant::{OwnedValue, Value};

use crate::{exit, Coded};

/// Connects to vmbeamd on the system bus.
pub fn bus() -> anyhow::Result<zbus::blocking::Connection> {
    zbus::blocking::Connection::system()
        .context("cannot reach the system bus; is dbus running?")
        .context(Coded(exit::NOT_READY))
}

/// Maps a typed D-Bus error to an exit code and a clear message.
pub fn daemon_err(e: BeamError) -> anyhow::Error {
    let code = match &e {
        BeamError::ZeroCopyRefused(_)
        | BeamError::TicketRefused(_)
        | BeamError::NotAuthorized(_) => exit::REFUSED,
        BeamError::NoSuchDomain(_)
        | BeamError::InvalidArgs(_)
        | BeamError::NotBeamEnabled(_)
        | BeamError::Busy(_) => exit::BAD_INPUT,
        BeamError::ZBus(zbus::Error::MethodError(name, _, _))
            if name.as_str() == "org.freedesktop.DBus.Error.ServiceUnknown" =>
        {
            return anyhow!(
                "vmbeamd is not running on this host (org.vmbeam.VMBeam1 is not on the system bus)"
            )
            .context(Coded(exit::NOT_READY));
        }
        _ => exit::FAILED,
    };
    let text = match &e {
        BeamError::ZBus(z) => z.to_string(),
        other => format!("{other}"),
    };
    anyhow!(strip_name(&text)).context(Coded(code))
}

/// The exit code for a typed VMBeam error name.
fn code_for_name(name: &str) -> u8 {
    match name.rsplit('.').next().unwrap_or("") {
        "ZeroCopyRefused" | "TicketRefused" | "NotAuthorized" => exit::REFUSED,
        "NoSuchDomain" | "InvalidArgs" | "NotBeamEnabled" | "Busy" => exit::BAD_INPUT,
        _ => exit::FAILED,
    }
}

/// zbus prints typed errors as `Name: text`; users want the text.
fn strip_name(s: &str) -> String {
    s.split_once(": ")
        .map(|(_, t)| t.to_string())
        .unwrap_or_else(|| s.to_string())
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
    let mut opts: HashMap<String, OwnedValue> = HashMap::new();
    let mode = if a.zero_copy {
        "zero-copy"
    } else if a.no_zero_copy {
        "traditional"
    } else {
        "auto"
    };
    let ov = |v: Value<'_>| OwnedValue::try_from(v).expect("plain values convert");
    opts.insert("mode".into(), ov(Value::from(mode)));
    opts.insert("live".into(), ov(Value::from(a.live)));
    opts.insert("persistent".into(), ov(Value::from(a.persistent)));
    opts.insert("undefine-source".into(), ov(Value::from(a.undefinesource)));
    opts.insert("tls".into(), ov(Value::from(a.tls)));
    if let Some(u) = &a.migrateuri {
        opts.insert("migrate-uri".into(), ov(Value::from(u.as_str())));
    }
    if let Some(t) = a.timeout {
        opts.insert("timeout".into(), ov(Value::from(t)));
    }
    let started = Instant::now();
    let path = mgr
        .migrate(&a.domain, &a.desturi, opts)
        .map_err(daemon_err)?;
    // Uncached: every read is a real Get, so a job that ends before the proxy has subscribed
    // to its PropertiesChanged is still seen to end.
    let job = JobProxyBlocking::builder(&conn)
        .path(path.clone())?
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()?;
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
    let mut last_phase = String::new();
    let mut last_line = Instant::now();
    let mut shown = 0u32;
    let phase = loop {
        let phase = job
            .phase()
            .map_err(|e| anyhow!("lost contact with vmbeamd while following {path}: {e}"))?;
        // The daemon's progress never goes backwards; the display keeps that promise too.
        shown = shown.max(job.progress().unwrap_or(0));
        if let Some(b) = &bar {
            b.set_message(phase.clone());
            b.set_position(shown as u64);
        } else if a.verbose
            && (phase != last_phase || last_line.elapsed() >= Duration::from_secs(1))
        {
            eprintln!("{phase}: {shown}%");
            last_line = Instant::now();
        }
        if phase != last_phase && phase == "migrating" && a.verbose {
            let m = job.mode().unwrap_or_default();
            let r = job.mode_reason().unwrap_or_default();
            if let Some(b) = &bar {
                b.println(format!("mode: {m} ({r})"));
            } else {
                eprintln!("mode: {m} ({r})");
            }
        }
        last_phase = phase.clone();
        if matches!(phase.as_str(), "completed" | "failed" | "cancelled") {
            break phase;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let total = started.elapsed().as_millis();
    if phase != "completed" {
        let err = job
            .error()
            .unwrap_or_else(|e| format!("(cannot read the job's error: {e})"));
        let code = code_for_name(&job.error_name().unwrap_or_default());
        return Err(anyhow!("migration of {} {phase}: {err}", a.domain).context(Coded(code)));
    }
    let mode = job.mode().unwrap_or_default();
    println!("Migration: {} -> {} completed", a.domain, a.desturi);
    println!(
        "  mode:           {mode} ({})",
        job.mode_reason().unwrap_or_default()
    );
    println!("  total time:     {total} ms");
    println!("  downtime:       {} ms", job.downtime().unwrap_or(0));
    let bytes = job.bytes_transferred().unwrap_or(0);
    println!("  bytes on wire:  {bytes} ({})", human_bytes(bytes));
    println!("  job:            {path}");
    if a.verbose {
        let steps: Vec<String> = job
            .timeline()
            .unwrap_or_default()
            .into_iter()
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
    for (k, v) in st.iter().filter(|(k, _)| k != "pool-file" && k != "job") {
        println!("{k:<18} {v}");
    }
    let doms = mgr.list_domains().map_err(daemon_err)?;
    println!("beam domains:");
    if doms.is_empty() {
        println!("  (none)");
    }
    for (name, uuid, state, owner, file, generation) in doms {
        println!("  {name:<16} {state:<9} owner={owner} gen={generation} file={file} uuid={uuid}");
    }
    println!("pool files:");
    let files: Vec<_> = st.iter().filter(|(k, _)| k == "pool-file").collect();
    if files.is_empty() {
        println!("  (none)");
    }
    for (_, v) in files {
        println!("  {v}");
    }
    println!("jobs:");
    let jobs: Vec<_> = st.iter().filter(|(k, _)| k == "job").collect();
    if jobs.is_empty() {
        println!("  (none)");
    }
    for (_, v) in jobs {
        println!("  {v}");
    }
    Ok(())
}
