//! The hypervisor backend: what a zero-copy migration needs from the hypervisor, whatever it
//! is. vmbeamd drives migrations through libvirt and asks the backend only for the parts
//! libvirt knows nothing of. QEMU implements it in `qemu-backend/` (private QMP socket,
//! `x-ignore-shared`, libvirt's `pc.ram` path); the Xen backend (`xen-driver-ext/`) will
//! implement the same trait for libxl.

use std::path::Path;
use std::time::Duration;

use crate::domain::DomainFacts;
use crate::plan::BackendCapabilities;

/// A backend step failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// Zero-copy is not possible for this domain as it runs (wrong backing, no monitor, ...).
    #[error("{0}")]
    Refused(String),
    /// The step failed.
    #[error("{0}")]
    Failed(String),
}

/// A hypervisor's part in zero-copy migration.
pub trait Backend: Send + Sync {
    /// A short name (`qemu`, `xen`).
    fn name(&self) -> &'static str;

    /// Source: what the hypervisor running `domain` offers for zero-copy.
    fn capabilities(&self, domain: &DomainFacts) -> BackendCapabilities;

    /// Source, just before libvirt's migration: checks the guest's RAM is `pool_file`
    /// (mapped shared), then makes the hypervisor leave shared RAM out of the stream. The
    /// handle undoes that; it must be disarmed on every exit path.
    fn arm_source(
        &self,
        domain: &DomainFacts,
        pool_file: &Path,
    ) -> Result<Box<dyn Armed>, BackendError>;

    /// Destination (or any start), before the hypervisor starts: points the domain's RAM at
    /// `pool_file`, which exists with at least `size` bytes.
    fn link_ram(
        &self,
        domain: &DomainFacts,
        pool_file: &Path,
        size: u64,
    ) -> Result<(), BackendError>;

    /// Destination of a zero-copy migration, hypervisor up and waiting for the stream: checks
    /// it maps `pool_file`, makes it expect shared RAM to be left out, and undoes that when
    /// the incoming migration has ended. `on_guest_runs` is called once the guest runs here.
    fn arm_destination(
        &self,
        domain: &DomainFacts,
        pool_file: &Path,
        on_guest_runs: Box<dyn FnOnce() + Send>,
    ) -> Result<(), BackendError>;

    /// Either side, no migration in flight: makes the hypervisor running `domain` send its
    /// shared RAM again in any later migration (undoes what [`Backend::arm_source`] or
    /// [`Backend::arm_destination`] turned on), for a daemon that lost their handles (crash
    /// recovery) and before a migration that copies memory. Returns what happened ("reset",
    /// "hypervisor gone"); fails while a migration is in flight.
    fn reset_zero_copy(&self, domain: &DomainFacts) -> Result<String, BackendError>;
}

/// The source's armed state for one migration.
pub trait Armed: Send {
    /// Undoes [`Backend::arm_source`], waiting up to `wait` for a migration still in flight
    /// to end. Returns what happened (e.g. "reset", "hypervisor gone").
    fn disarm(&mut self, wait: Duration) -> Result<String, BackendError>;
}
