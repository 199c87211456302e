//! [`vmbeam_core::backend::Backend`] for QEMU under libvirt: the private QMP socket VMBeam adds
//! to beam-enabled domains, the `x-ignore-shared` migration capability, and libvirt's
//! per-domain RAM path (`<memory_backing_dir>/libvirt/qemu/<id>-<name>/pc.ram`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::{info, info_span, warn};
use vmbeam_core::backend::{Armed, Backend, BackendError};
use vmbeam_core::plan::BackendCapabilities;
use vmbeam_core::DomainFacts;

use crate::caps::{self, IgnoreSharedGuard};
use crate::qmp::{QmpClient, QmpOptions, RunState};
use crate::ramlink;

/// QEMU, driven by libvirt's QEMU driver.
#[derive(Debug, Clone)]
pub struct QemuBackend {
    /// qemu.conf's `memory_backing_dir`.
    pub memory_backing_dir: PathBuf,
}

impl QemuBackend {
    /// A backend for a libvirt whose `memory_backing_dir` is this.
    pub fn new(memory_backing_dir: impl Into<PathBuf>) -> Self {
        QemuBackend {
            memory_backing_dir: memory_backing_dir.into(),
        }
    }

    fn monitor(domain: &DomainFacts, timeout: Duration) -> Result<QmpClient, BackendError> {
        let sock = domain.private_qmp.as_ref().ok_or_else(|| {
            BackendError::Refused(format!(
                "{} has no private QMP socket (run vmbeam enable)",
                domain.name
            ))
        })?;
        let opts = QmpOptions {
            connect_timeout: timeout,
            ..QmpOptions::default()
        };
        QmpClient::connect(sock, &opts)
            .map_err(|e| BackendError::Failed(format!("private QMP {}: {e}", sock.display())))
    }

    fn verify_backing(q: &mut QmpClient, pool_file: &Path, side: &str) -> Result<(), BackendError> {
        let devs = q
            .query_memdev()
            .map_err(|e| BackendError::Failed(e.to_string()))?;
        ramlink::verify_memdev_backing(&devs, ramlink::LIBVIRT_DEFAULT_RAM_FILE, pool_file)
            .map(|_| ())
            .map_err(|e| BackendError::Refused(format!("{side} QEMU's RAM backing: {e}")))
    }
}

impl Backend for QemuBackend {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn capabilities(&self, domain: &DomainFacts) -> BackendCapabilities {
        let mut caps = BackendCapabilities::default();
        if let Ok(mut q) = Self::monitor(domain, Duration::from_secs(3)) {
            caps.private_monitor = true;
            caps.ignore_shared = q
                .query_migrate_capabilities()
                .map(|c| c.contains_key("x-ignore-shared"))
                .unwrap_or(false);
        }
        caps
    }

    fn arm_source(
        &self,
        domain: &DomainFacts,
        pool_file: &Path,
    ) -> Result<Box<dyn Armed>, BackendError> {
        let mut q = Self::monitor(domain, Duration::from_secs(3))?;
        Self::verify_backing(&mut q, pool_file, "source")?;
        let guard = IgnoreSharedGuard::enable(q)
            .map_err(|e| BackendError::Failed(format!("x-ignore-shared on the source: {e}")))?;
        info!("x-ignore-shared on (source)");
        Ok(Box::new(SourceGuard(guard)))
    }

    fn link_ram(
        &self,
        domain: &DomainFacts,
        pool_file: &Path,
        size: u64,
    ) -> Result<(), BackendError> {
        let id = domain
            .id
            .ok_or_else(|| BackendError::Failed("the domain XML at start has no id".into()))?;
        if domain.numa_cells > 0 {
            return Err(BackendError::Refused(
                "guest NUMA cells are not supported by VMBeam".into(),
            ));
        }
        let link =
            ramlink::libvirt_domain_memory_dir(&self.memory_backing_dir, id as i64, &domain.name)
                .join(ramlink::LIBVIRT_DEFAULT_RAM_FILE);
        ramlink::link_ram_path(&link, pool_file, size)
            .map(|_| ())
            .map_err(|e| {
                BackendError::Failed(format!(
                    "link {} to {}: {e}",
                    link.display(),
                    pool_file.display()
                ))
            })
    }

    fn arm_destination(
        &self,
        domain: &DomainFacts,
        pool_file: &Path,
        on_guest_runs: Box<dyn FnOnce() + Send>,
    ) -> Result<(), BackendError> {
        let mut q = Self::monitor(domain, Duration::from_secs(5))?;
        Self::verify_backing(&mut q, pool_file, "destination")?;
        // The destination's check: QEMU >= 10 already reports `setup` here (listening).
        caps::set_ignore_shared_incoming(&mut q, true).map_err(|e| {
            BackendError::Failed(format!("x-ignore-shared on the destination: {e}"))
        })?;
        info!("x-ignore-shared on (destination)");
        let name = domain.name.clone();
        std::thread::Builder::new()
            .name(format!("watch-{name}"))
            .spawn(move || watch_incoming(q, &name, on_guest_runs))
            .map_err(|e| BackendError::Failed(e.to_string()))?;
        Ok(())
    }

    fn reset_zero_copy(&self, domain: &DomainFacts) -> Result<String, BackendError> {
        let mut q = Self::monitor(domain, Duration::from_secs(3))?;
        caps::reset_ignore_shared(&mut q)
            .map(|o| format!("{o:?}"))
            .map_err(|e| BackendError::Failed(format!("x-ignore-shared off: {e}")))
    }
}

/// The source's `x-ignore-shared`, owned for the migration's duration.
struct SourceGuard(IgnoreSharedGuard<QmpClient>);

impl Armed for SourceGuard {
    fn disarm(&mut self, wait: Duration) -> Result<String, BackendError> {
        self.0
            .reset_waiting(wait)
            .map(|o| format!("{o:?}"))
            .map_err(|e| BackendError::Failed(e.to_string()))
    }
}

/// Follows a destination QEMU until its incoming migration is over: when the stream has
/// ended it resets `x-ignore-shared`; once the guest runs here it calls `on_guest_runs` (from
/// then on the source must never run the guest again). If QEMU goes away (a failed
/// migration), there is nothing to reset.
fn watch_incoming(mut q: QmpClient, name: &str, on_guest_runs: Box<dyn FnOnce() + Send>) {
    let span = info_span!("watch", domain = %name);
    let _g = span.enter();
    let deadline = Instant::now() + Duration::from_secs(24 * 3600);
    let mut reset = false;
    while Instant::now() < deadline {
        let state = match q.query_status() {
            Ok(s) => s,
            Err(e) if e.is_gone() => {
                info!(reset, "destination QEMU is gone");
                return;
            }
            Err(_) => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
        };
        if !reset && state != RunState::InMigrate {
            let over = q
                .query_migrate()
                .map(|m| !m.status().is_in_flight())
                .unwrap_or(false);
            if over {
                match caps::reset_ignore_shared(&mut q) {
                    Ok(o) => info!(outcome = ?o, "incoming stream over; x-ignore-shared reset"),
                    Err(e) => warn!(error = %e, "could not reset x-ignore-shared"),
                }
                reset = true;
            }
        }
        if reset && state == RunState::Running {
            on_guest_runs();
            info!("guest runs on the destination");
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}
