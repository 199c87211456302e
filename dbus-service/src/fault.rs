//! Fault-injection points for the fault-matrix tests. At each point vmbeamd looks for
//! `/run/vmbeam/fault-hold-<point>-ms`; if it holds a number, vmbeamd waits there up to that
//! many milliseconds (at most a minute), or until the file is removed, whichever comes first.
//! A test sets the file, waits until the job reports the phase (its own phase events, the
//! `Phase` property), injects the fault, and removes the file. In production the file does
//! not exist: one failed `stat` per point.
//!
//! Points: `planning`, `proving` and `ticket` (the source's job, at those phases; `ticket`
//! is after the source is armed and the record is `handing-over`, before libvirt's job),
//! `settling` (the source's job, after libvirt's job returned, before the pool file is
//! settled), `started` (the destination's hook, QEMU up and waiting for the stream: libvirt's
//! Prepare) and `release` (any host's `release` hook: on the source, inside libvirt's
//! Confirm).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tracing::warn;

/// Where the hold files are.
pub const FAULT_DIR: &str = "/run/vmbeam";

/// The hold file of `point`.
pub fn hold_file(point: &str) -> PathBuf {
    PathBuf::from(FAULT_DIR).join(format!("fault-hold-{point}-ms"))
}

/// Holds at `point` while its hold file asks for it (see the module's documentation).
pub fn hold(point: &str) {
    let path = hold_file(point);
    let Some(ms) = std::fs::read_to_string(&path)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
    else {
        return;
    };
    warn!(ms, point, "fault injection: holding");
    let deadline = Instant::now() + Duration::from_millis(ms.min(60_000));
    while Instant::now() < deadline && path.exists() {
        std::thread::sleep(Duration::from_millis(10));
    }
    warn!(point, "fault injection: released");
}
