//! vmbeamd: VMBeam's system-bus service.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tracing::info;
use vmbeam_bus::{BUS_NAME, MANAGER_PATH};
use vmbeam_core::ticket::FileReplayCache;
use vmbeam_core::Identity;
use vmbeamd::cli::Args;
use vmbeamd::config::DaemonConfig;
use vmbeamd::service::{HookObj, Manager};
use vmbeamd::state::{Ctx, Tables};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VMBEAM_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    virt::error::clear_error_callback();
    let a = Args::parse();
    let identity = Identity::load(&a.config)
        .with_context(|| format!("configuration {}", a.config.display()))?;
    let cfg = DaemonConfig {
        identity,
        libvirt_uri: a.libvirt_uri,
        memory_backing_dir: a.memory_backing_dir,
        qmp_dir: a.qmp_dir,
        state_dir: a.state_dir,
        persistent_dir: a.persistent_dir,
        rendezvous_timeout: Duration::from_millis(a.rendezvous_timeout_ms),
        hook_timeout: Duration::from_secs(a.hook_timeout_secs),
    };
    let key = cfg.key().context("the cloud's key")?;
    std::fs::create_dir_all(&cfg.qmp_dir)
        .with_context(|| format!("create {}", cfg.qmp_dir.display()))?;
    let replay =
        FileReplayCache::open(cfg.state_dir.join("tickets")).context("ticket replay cache")?;
    let uri = cfg.libvirt_uri.clone();
    let libvirt_uuid = tokio::task::spawn_blocking(move || -> anyhow::Result<String> {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            match vmbeamd::libvirt_conn::Conn::open(&uri) {
                Ok(c) => {
                    return vmbeamd::libvirt_conn::host_uuid(&c)
                        .map_err(|e| anyhow::anyhow!("{e:?}"));
                }
                Err(e) if std::time::Instant::now() >= deadline => {
                    return Err(anyhow::anyhow!("libvirt at {uri}: {}", e.message()))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    })
    .await??;
    let backend = Box::new(vmbeam_qemu::backend::QemuBackend::new(
        cfg.memory_backing_dir.clone(),
    ));
    let pool = vmbeamd::guest_pool::GuestPool::for_config(&cfg);
    info!(kind = pool.kind(), "beam pool");
    let ctx = Arc::new(Ctx {
        pool,
        cfg,
        key,
        tables: Mutex::new(Tables::default()),
        replay: Mutex::new(replay),
        libvirt_uuid,
        backend,
    });
    let manager = Manager {
        ctx: ctx.clone(),
        jobs: Arc::new(Mutex::new(BTreeMap::new())),
        next_job: AtomicU64::new(1),
    };
    // Objects first, then the name (clients never see a name without its objects).
    let _conn = zbus::connection::Builder::system()?
        .serve_at(MANAGER_PATH, manager)?
        .serve_at(MANAGER_PATH, HookObj { ctx: ctx.clone() })?
        .name(BUS_NAME)?
        .build()
        .await
        .context("connect to the system bus and own org.vmbeam.VMBeam1")?;
    info!(host = %ctx.cfg.identity.host_id, cloud = %ctx.cfg.identity.cloud, libvirt_uuid = %ctx.libvirt_uuid, "vmbeamd ready");
    vmbeamd::hooks::report_leftovers(&ctx);
    if ctx.pool.device().is_some() {
        // Greet the host at start: a missing or refusing vmbeam-host shows in the log now,
        // not at the first guest start.
        let greeting = ctx.clone();
        std::thread::Builder::new()
            .name("host-hello".into())
            .spawn(move || vmbeamd::guest_pool::greet_host(&greeting.pool))
            .context("start the host greeting thread")?;
    }
    // Settle hand-overs a dead daemon left half done, now and for the daemon's lifetime.
    let recovering = ctx.clone();
    std::thread::Builder::new()
        .name("recovery".into())
        .spawn(move || vmbeamd::recover::serve_forever(recovering))
        .context("start the recovery thread")?;
    // Answer co-location requests addressed to this host, through the pool.
    tokio::spawn(vmbeamd::rendezvous::serve_forever(ctx.clone()));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: exiting"),
        _ = tokio::signal::ctrl_c() => info!("interrupted: exiting"),
    }
    Ok(())
}
