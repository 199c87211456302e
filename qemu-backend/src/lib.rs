//! VMBeam's QEMU backend.
//!
//! - [`qmp`]: a synchronous, timeout-bounded QMP client for VMBeam's private monitor socket
//!   (the daemon calls it from blocking threads), with typed helpers for run state,
//!   migration status and capabilities, and memory backends.
//! - [`caps`]: [`caps::IgnoreSharedGuard`], which keeps `x-ignore-shared` on only for the
//!   duration of a zero-copy migration and resets it on every exit path.
//! - [`ramlink`]: linking libvirt's per-domain RAM path to a beam-pool file atomically, and
//!   proving a QEMU maps exactly that file, shared.
//! - `launcher` (tests, or the `testing` feature): starting bare QEMU processes.
//!
//! Facts about QEMU 7.2 and libvirt 9.0 this crate relies on are documented where they are
//! used, and each is exercised by a test against real QEMU processes: `tests/qemu.rs`, run
//! only with the `qemu-tests` feature (`cargo test -p vmbeam-qemu --features qemu-tests`),
//! so that a plain `cargo test` starts no QEMU.

pub mod backend;
pub mod caps;
pub mod qmp;
pub mod ramlink;

#[cfg(any(test, feature = "testing"))]
pub mod launcher;

pub use caps::{CapsError, IgnoreSharedGuard, ResetOutcome, X_IGNORE_SHARED};
pub use qmp::{
    MigrateInfo, MigrationStats, MigrationStatus, QmpClient, QmpError, QmpEvent, QmpOptions,
    RunState,
};
pub use ramlink::{link_ram_path, verify_memdev_backing, verify_same_file, RamLinkError};
