//! `vmbeam-host`: the daemon on the primary cloud's host (`vmbeam-host --connect
//! qemu:///system --state-dir /var/lib/vmbeam-host`) and `vmbeam-host status`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};
use vmbeam_host::libvirt::{ShmDir, VirtLibvirt};
use vmbeam_host::server::{Config, Host};
use vmbeam_host::state::StateDir;

/// Where libvirt's QEMU opens `<shmem name=X>`'s memory: `/dev/shm/X`, always.
const SHM_DIR: &str = "/dev/shm";

#[derive(Parser)]
#[command(
    name = "vmbeam-host",
    version,
    about = "VMBeam's primary-cloud daemon: shares guests' memory between co-located cloud VMs"
)]
struct Cli {
    /// The host's libvirt.
    #[arg(long, default_value = "qemu:///system")]
    connect: String,
    /// Where the ledger and the status snapshot live.
    #[arg(long, default_value = "/var/lib/vmbeam-host", global = true)]
    state_dir: PathBuf,
    /// QEMU's user and group (`user`/`group` of libvirt's qemu.conf), USER[:GROUP]; they
    /// own the backing files. `-` keeps the daemon's own.
    #[arg(long, default_value = "libvirt-qemu:libvirt-qemu")]
    qemu_owner: String,
    /// Milliseconds between two rescans of the host's domains.
    #[arg(long, default_value_t = 2000)]
    rescan_ms: u64,
    /// Seconds a hot-unplug may take before it is reported as failed.
    #[arg(long, default_value_t = 10)]
    unplug_timeout_secs: u64,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Prints the cloud VMs, their clouds and the guests' shares as the daemon last saw them.
    Status {
        /// Prints the snapshot as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// The uid and gid of `USER[:GROUP]` (`None` for `-`).
fn owner(spec: &str) -> anyhow::Result<Option<(u32, u32)>> {
    if spec == "-" {
        return Ok(None);
    }
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let user = nix::unistd::User::from_name(user)
        .with_context(|| format!("cannot look up user '{user}'"))?
        .with_context(|| format!("no user '{user}' (see --qemu-owner)"))?;
    let gid = match group {
        None => user.gid,
        Some(g) => {
            nix::unistd::Group::from_name(g)
                .with_context(|| format!("cannot look up group '{g}'"))?
                .with_context(|| format!("no group '{g}' (see --qemu-owner)"))?
                .gid
        }
    };
    Ok(Some((user.uid.as_raw(), gid.as_raw())))
}

fn status(state_dir: PathBuf, json: bool) -> anyhow::Result<ExitCode> {
    let store = StateDir::at(&state_dir);
    let Some(snapshot) = store.load_status()? else {
        bail!(
            "no status in {}: vmbeam-host has not run with this state directory",
            state_dir.display()
        );
    };
    let running = PathBuf::from(format!("/proc/{}", snapshot.pid)).exists();
    if json {
        println!("{}", serde_json::to_string_pretty(&snapshot)?);
    } else {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        print!("{}", snapshot.render(now, running));
    }
    Ok(if running {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    })
}

async fn daemon(cli: Cli) -> anyhow::Result<ExitCode> {
    let owner = owner(&cli.qemu_owner)?;
    let libvirt = Arc::new(VirtLibvirt::new(
        cli.connect.clone(),
        Duration::from_secs(cli.unplug_timeout_secs),
    ));
    let files = Arc::new(ShmDir::new(SHM_DIR, owner));
    let config = Config {
        state_dir: cli.state_dir.clone(),
        rescan: Duration::from_millis(cli.rescan_ms.max(100)),
    };
    let host = Host::open(&config, libvirt, files)
        .with_context(|| format!("cannot start with {}", cli.state_dir.display()))?;
    tracing::info!(uri = %cli.connect, state_dir = %cli.state_dir.display(), "vmbeam-host started");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        () = host.run() => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("vmbeam-host stopped");
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Some(Command::Status { json }) => status(cli.state_dir, json),
        None => tokio::runtime::Runtime::new()
            .context("cannot start the async runtime")
            .and_then(|rt| rt.block_on(daemon(cli))),
    };
    result.unwrap_or_else(|e| {
        eprintln!("vmbeam-host: {e:#}");
        ExitCode::FAILURE
    })
}
