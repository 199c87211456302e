//! The `x-ignore-shared` capability, scoped by a guard.
//!
//! Invariant: `x-ignore-shared` is on only while a zero-copy migration is in flight, on both
//! ends, and is reset on every exit path. Left on, it makes the next ordinary migration fail
//! ("Capability x-ignore-shared is off, but received capability is on") and makes
//! `virsh save`, managed save and memory snapshots silently omit guest RAM.
//!
//! QEMU 7.2 behaviour this module is built around (observed, see the crate's tests):
//! - On a migration *source* QEMU refuses `migrate-set-capabilities` while a migration is in
//!   flight: `GenericError: There's a migration process in progress`.
//! - On a *destination* QEMU accepts the change even while the incoming stream is being
//!   loaded; changing it then would desynchronise the RAM section of the stream. So this
//!   guard checks `query-migrate` (which reports the incoming status on a destination) itself
//!   and refuses while any migration is in flight.
//! - QEMU >= 10 reports a destination's incoming migration as `setup` as soon as it listens
//!   (`migrate-incoming`), before any of the stream arrived; QEMU 7.2 says `none` there. The
//!   source-side check takes `setup` for a migration in flight, so a destination waiting for
//!   its stream is armed through [`set_ignore_shared_incoming`], which accepts it.
//! - A destination whose incoming migration failed exits: then the reset is moot, and is
//!   reported as [`ResetOutcome::QemuGone`], not as an error.

use std::borrow::BorrowMut;
use std::ops::{Deref, DerefMut};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::qmp::{MigrationStatus, QmpClient, QmpError};

/// The capability's QAPI name.
pub const X_IGNORE_SHARED: &str = "x-ignore-shared";

/// How long [`Drop`] waits for an in-flight migration to end before giving up on the reset.
pub const DEFAULT_DROP_WAIT: Duration = Duration::from_secs(10);

/// Errors of capability handling.
#[derive(Debug, thiserror::Error)]
pub enum CapsError {
    /// A migration is in flight on this QEMU (outgoing or incoming): capabilities must not
    /// change now. Retry after it completed, failed or was cancelled.
    #[error("cannot change {capability} on the QEMU at {socket}: a migration is in flight (status {status})")]
    MigrationActive {
        /// The QMP socket of that QEMU.
        socket: PathBuf,
        /// The capability.
        capability: &'static str,
        /// The migration status seen.
        status: MigrationStatus,
    },
    /// This QEMU does not have the capability.
    #[error("the QEMU at {socket} does not support the migration capability {capability}")]
    Unsupported {
        /// The QMP socket of that QEMU.
        socket: PathBuf,
        /// The capability.
        capability: &'static str,
    },
    /// QEMU accepted the change but reports another value.
    #[error("{capability} on the QEMU at {socket} reads {actual} after setting it to {wanted}")]
    NotApplied {
        /// The QMP socket of that QEMU.
        socket: PathBuf,
        /// The capability.
        capability: &'static str,
        /// What was set.
        wanted: bool,
        /// What QEMU reports.
        actual: bool,
    },
    /// The QEMU is gone (enable only: for a reset that is success).
    #[error("the QEMU at {socket} is gone: {source}")]
    QemuGone {
        /// The QMP socket of that QEMU.
        socket: PathBuf,
        /// What showed it.
        #[source]
        source: QmpError,
    },
    /// Any other QMP failure.
    #[error(transparent)]
    Qmp(#[from] QmpError),
}

/// How a reset ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetOutcome {
    /// The capability is now off (verified with `query-migrate-capabilities`).
    Reset,
    /// The QEMU is gone (its monitor closed and the socket refuses connections): nothing to
    /// reset.
    QemuGone,
    /// This guard had already reset it.
    AlreadyReset,
}

/// The QMP error QEMU 7.2 gives for a capability change during an outgoing migration.
fn is_migration_active_error(e: &QmpError) -> bool {
    matches!(e.qmp_class(), Some((_, desc)) if desc.contains("migration process in progress"))
}

fn is_unknown_capability_error(e: &QmpError) -> bool {
    matches!(e.qmp_class(), Some((_, desc)) if desc.contains("does not accept value"))
}

/// Whether a destination QEMU's incoming migration in `status` has not started to load the
/// stream: no migration (`none`, QEMU 7.2 while it listens), listening (`setup`, QEMU >= 10),
/// or over (`completed`, `failed`, `cancelled`). Anything else (`active` and later, unknown
/// states) is a stream being loaded, where a capability change would corrupt it.
pub fn incoming_not_started(status: &MigrationStatus) -> bool {
    !status.is_in_flight() || *status == MigrationStatus::Setup
}

/// Checks that the migration status on `qmp` (outgoing or incoming) is one `allowed` says
/// a capability may change in.
fn ensure_status(
    qmp: &mut QmpClient,
    capability: &'static str,
    allowed: fn(&MigrationStatus) -> bool,
) -> Result<(), CapsError> {
    let status = qmp.query_migrate()?.status();
    if !allowed(&status) {
        return Err(CapsError::MigrationActive {
            socket: qmp.socket_path().to_path_buf(),
            capability,
            status,
        });
    }
    Ok(())
}

/// Sets `x-ignore-shared` to `state` after checking no migration is in flight, and verifies
/// QEMU reports the new value.
pub fn set_ignore_shared_checked(qmp: &mut QmpClient, state: bool) -> Result<(), CapsError> {
    set_checked(qmp, state, |s| !s.is_in_flight())
}

/// Destination: sets `x-ignore-shared` to `state` on a QEMU started with `-incoming` that
/// waits for its stream, after checking the stream has not started to load
/// ([`incoming_not_started`]), and verifies QEMU reports the new value.
///
/// Why not [`set_ignore_shared_checked`]: QEMU >= 10 reports a listening destination as
/// `setup`, which that check (made for the source, where `setup` is an outgoing migration
/// starting) refuses. On a destination `setup` is the pre-stream state, and QEMU itself
/// accepts the change there (it checks only its outgoing state). `active` and later are
/// still refused: the stream's RAM section would no longer match.
pub fn set_ignore_shared_incoming(qmp: &mut QmpClient, state: bool) -> Result<(), CapsError> {
    set_checked(qmp, state, incoming_not_started)
}

fn set_checked(
    qmp: &mut QmpClient,
    state: bool,
    allowed: fn(&MigrationStatus) -> bool,
) -> Result<(), CapsError> {
    let socket = qmp.socket_path().to_path_buf();
    ensure_status(qmp, X_IGNORE_SHARED, allowed)?;
    if let Err(e) = qmp.set_capability(X_IGNORE_SHARED, state) {
        if is_migration_active_error(&e) {
            // Lost a race with a `migrate` issued by someone else.
            let status = qmp
                .query_migrate()
                .map(|i| i.status())
                .unwrap_or(MigrationStatus::Other("unknown".into()));
            return Err(CapsError::MigrationActive {
                socket,
                capability: X_IGNORE_SHARED,
                status,
            });
        }
        if is_unknown_capability_error(&e) {
            return Err(CapsError::Unsupported {
                socket,
                capability: X_IGNORE_SHARED,
            });
        }
        return Err(e.into());
    }
    let actual = qmp.migrate_capability(X_IGNORE_SHARED)?;
    if actual != state {
        return Err(CapsError::NotApplied {
            socket,
            capability: X_IGNORE_SHARED,
            wanted: state,
            actual,
        });
    }
    Ok(())
}

/// Turns `x-ignore-shared` on for its lifetime and guarantees it is turned off again.
///
/// Holds the QMP client (owned or `&mut`) and derefs to it, so the migration is driven
/// through the guard. Call [`IgnoreSharedGuard::reset`] once the migration reached a
/// terminal state to see errors; on drop, a still-armed guard resets best effort: if a
/// migration is still in flight it polls for up to [`IgnoreSharedGuard::drop_wait`] for it to
/// end (it never cancels a migration: whether to cancel is the caller's decision, because
/// QEMU resumes a cancelled source), and it logs through `tracing` what it could not do.
pub struct IgnoreSharedGuard<C: BorrowMut<QmpClient>> {
    client: C,
    armed: bool,
    drop_wait: Duration,
}

impl<C: BorrowMut<QmpClient>> IgnoreSharedGuard<C> {
    /// Turns `x-ignore-shared` on. Refuses while a migration is in flight. If it was already
    /// on (left over by a crash), that is logged, and it will still be reset to off.
    /// On error nothing is left on (a partial enable is rolled back best effort).
    pub fn enable(mut client: C) -> Result<Self, CapsError> {
        let qmp = client.borrow_mut();
        let socket = qmp.socket_path().to_path_buf();
        let caps = match qmp.query_migrate_capabilities() {
            Ok(caps) => caps,
            Err(e) if e.is_gone() => return Err(CapsError::QemuGone { socket, source: e }),
            Err(e) => return Err(e.into()),
        };
        match caps.get(X_IGNORE_SHARED) {
            None => {
                return Err(CapsError::Unsupported {
                    socket,
                    capability: X_IGNORE_SHARED,
                })
            }
            Some(true) => tracing::warn!(
                socket = %socket.display(),
                "x-ignore-shared was already on (left over?); it will be reset when this guard ends"
            ),
            Some(false) => {}
        }
        match set_ignore_shared_checked(qmp, true) {
            Ok(()) => {
                tracing::info!(socket = %socket.display(), "x-ignore-shared on");
                Ok(IgnoreSharedGuard {
                    client,
                    armed: true,
                    drop_wait: DEFAULT_DROP_WAIT,
                })
            }
            Err(e) => {
                // If it got set but verification failed, try to undo. Ignore a second error.
                if matches!(e, CapsError::NotApplied { .. } | CapsError::Qmp(_)) {
                    let _ = qmp.set_capability(X_IGNORE_SHARED, false);
                }
                Err(e)
            }
        }
    }

    /// Changes how long drop waits for an in-flight migration before giving up.
    pub fn with_drop_wait(mut self, wait: Duration) -> Self {
        self.drop_wait = wait;
        self
    }

    /// How long drop waits for an in-flight migration before giving up.
    pub fn drop_wait(&self) -> Duration {
        self.drop_wait
    }

    /// True until a reset succeeded (or found the QEMU gone).
    pub fn is_armed(&self) -> bool {
        self.armed
    }

    /// The QMP client.
    pub fn client(&mut self) -> &mut QmpClient {
        self.client.borrow_mut()
    }

    /// Turns `x-ignore-shared` off. Call it after the migration reached `completed`,
    /// `failed` or `cancelled`.
    ///
    /// - [`CapsError::MigrationActive`] if a migration is still in flight: the guard stays
    ///   armed; retry later (or let drop retry).
    /// - `Ok(ResetOutcome::QemuGone)` if the QEMU is gone (monitor closed and a reconnect is
    ///   refused): moot, not an error. If the connection broke but QEMU still answers a fresh
    ///   connection, the reset is done through it.
    /// - Idempotent: `Ok(ResetOutcome::AlreadyReset)` once done.
    pub fn reset(&mut self) -> Result<ResetOutcome, CapsError> {
        if !self.armed {
            return Ok(ResetOutcome::AlreadyReset);
        }
        let outcome = reset_ignore_shared(self.client.borrow_mut())?;
        self.armed = false;
        Ok(outcome)
    }

    /// Resets, waiting up to `wait` (polling every 20 ms) for an in-flight migration to end.
    pub fn reset_waiting(&mut self, wait: Duration) -> Result<ResetOutcome, CapsError> {
        let deadline = Instant::now() + wait;
        loop {
            match self.reset() {
                Err(CapsError::MigrationActive { .. }) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                other => return other,
            }
        }
    }
}

/// Turns `x-ignore-shared` off on `qmp` (see [`IgnoreSharedGuard::reset`] for the outcomes).
pub fn reset_ignore_shared(qmp: &mut QmpClient) -> Result<ResetOutcome, CapsError> {
    match set_ignore_shared_checked(qmp, false) {
        Ok(()) => {}
        Err(CapsError::Qmp(e)) if e.is_gone() || matches!(e, QmpError::Protocol(_)) => {
            // The connection is gone or unusable: find out whether QEMU is.
            match qmp.reconnect() {
                Err(e2) if e2.is_gone() => {
                    tracing::info!(
                        socket = %qmp.socket_path().display(),
                        error = %e,
                        "QEMU gone; x-ignore-shared reset is moot"
                    );
                    return Ok(ResetOutcome::QemuGone);
                }
                Err(e2) => return Err(e2.into()),
                Ok(()) => set_ignore_shared_checked(qmp, false)?,
            }
        }
        Err(e) => return Err(e),
    }
    tracing::info!(socket = %qmp.socket_path().display(), "x-ignore-shared off");
    Ok(ResetOutcome::Reset)
}

impl<C: BorrowMut<QmpClient>> Deref for IgnoreSharedGuard<C> {
    type Target = QmpClient;
    fn deref(&self) -> &QmpClient {
        self.client.borrow()
    }
}

impl<C: BorrowMut<QmpClient>> DerefMut for IgnoreSharedGuard<C> {
    fn deref_mut(&mut self) -> &mut QmpClient {
        self.client.borrow_mut()
    }
}

impl<C: BorrowMut<QmpClient>> Drop for IgnoreSharedGuard<C> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let wait = self.drop_wait;
        match self.reset_waiting(wait) {
            Ok(outcome) => {
                tracing::debug!(?outcome, "x-ignore-shared reset on drop")
            }
            Err(e) => tracing::error!(
                socket = %self.client.borrow().socket_path().display(),
                error = %e,
                "x-ignore-shared could NOT be reset on drop; it is still on"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_destination_may_be_armed_only_before_its_stream_loads() {
        use MigrationStatus as S;
        for ok in [S::None, S::Setup, S::Completed, S::Failed, S::Cancelled] {
            assert!(incoming_not_started(&ok), "{ok}");
        }
        for refused in [
            S::Active,
            S::Device,
            S::PostcopyActive,
            S::PreSwitchover,
            S::Cancelling,
            S::Other("brand-new".into()),
        ] {
            assert!(!incoming_not_started(&refused), "{refused}");
        }
        // The source-side check refuses `setup` (an outgoing migration starting).
        assert!(S::Setup.is_in_flight());
    }
}
