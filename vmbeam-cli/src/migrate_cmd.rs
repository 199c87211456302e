//! `vmbeam migrate`: virsh migrate's syntax.

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::{anyhow, Context};
use clap::Args;
use vmbeamd::libvirt_job::{self, Flags};

#[derive(Args, Debug)]
pub struct MigrateArgs {
    /// Require zero-copy migration; fail if the destination is not co-located and proven
    #[arg(long, conflicts_with = "no_zero_copy")]
    pub zero_copy: bool,
    /// Force a traditional (copying) migration
    #[arg(long)]
    pub no_zero_copy: bool,
    /// Live migration
    #[arg(long)]
    pub live: bool,
    /// Peer-to-peer migration (the default for VMBeam; accepted for virsh compatibility)
    #[arg(long)]
    pub p2p: bool,
    /// Persist the domain on the destination
    #[arg(long)]
    pub persistent: bool,
    /// Undefine the domain on the source
    #[arg(long)]
    pub undefinesource: bool,
    /// Print progress
    #[arg(long)]
    pub verbose: bool,
    /// Suspend the guest after S seconds of live migration (virsh --timeout)
    #[arg(long, value_name = "S")]
    pub timeout: Option<u64>,
    /// Domain name
    pub domain: String,
    /// Destination libvirt URI, e.g. qemu+tcp://cvm2/system
    pub desturi: String,
    /// Migration data URI, e.g. tcp://198.18.0.12
    pub migrateuri: Option<String>,
}

pub fn run(connect: Option<String>, a: MigrateArgs) -> anyhow::Result<()> {
    if a.zero_copy {
        return Err(anyhow!(
            "--zero-copy is not available yet in this build (traditional migration only)"
        ))
        .context(crate::Coded(crate::exit::REFUSED));
    }
    let src = connect
        .or_else(|| std::env::var("LIBVIRT_DEFAULT_URI").ok())
        .unwrap_or_else(|| "qemu:///system".into());
    let flags = Flags {
        live: a.live,
        p2p: true,
        persistent: a.persistent,
        undefine_source: a.undefinesource,
    };
    let tty = std::io::stderr().is_terminal();
    let bar = (tty && a.verbose).then(|| {
        let b = indicatif::ProgressBar::new(100);
        b.set_style(
            indicatif::ProgressStyle::with_template("{msg:>12} [{bar:40}] {pos:>3}%")
                .expect("valid template")
                .progress_chars("=> "),
        );
        b.set_message("migrating");
        b
    });
    let mut shown = 0u64;
    let mut last_line = std::time::Instant::now();
    let req = libvirt_job::Request {
        src_uri: src,
        domain: a.domain.clone(),
        dest_uri: a.desturi.clone(),
        migrate_uri: a.migrateuri.clone(),
        flags,
        suspend_after: a.timeout.map(Duration::from_secs),
        ..Default::default()
    };
    let done = libvirt_job::migrate(&req, Duration::from_millis(250), |p| {
        if p.total == 0 {
            return;
        }
        // Progress never goes backwards: re-sent dirty pages grow "remaining" again.
        let pct = (100 * p.processed.min(p.total) / p.total).min(99);
        shown = shown.max(pct);
        if let Some(b) = &bar {
            b.set_position(shown);
        } else if a.verbose && last_line.elapsed() >= Duration::from_secs(1) {
            eprintln!("migrating: {shown}% ({} MiB sent)", p.processed >> 20);
            last_line = std::time::Instant::now();
        }
    })
    .with_context(|| format!("migrating {} to {}", a.domain, a.desturi))?;
    if let Some(b) = bar {
        b.set_position(100);
        b.finish_with_message("done");
    }
    println!("Migration: {} -> {} completed", a.domain, a.desturi);
    println!("  mode:            traditional (copying)");
    println!("  total time:      {} ms", done.total_ms);
    if let Some(j) = done.job_ms {
        println!("  libvirt job:     {j} ms");
    }
    match done.downtime_ms {
        Some(d) => println!("  downtime:        {d} ms"),
        None => println!("  downtime:        unknown"),
    }
    println!(
        "  bytes on wire:   {} ({:.1} MiB)",
        done.bytes_transferred,
        done.bytes_transferred as f64 / 1048576.0
    );
    Ok(())
}
