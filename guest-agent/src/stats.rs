//! Counters shared between the memory worker (the only writer of most of them) and the
//! channel, HTTP and status threads (readers).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Instant;

/// "No page" in the atomic page fields.
const NONE: u64 = u64::MAX;

/// The agent's shared counters.
pub struct Stats {
    /// Random id of this agent run (hex).
    pub boot_id: String,
    /// When the agent started.
    pub started: Instant,
    /// Pages of filled memory.
    pub pages: u64,
    /// Memory size in MiB.
    pub mem_mib: u64,
    /// Target dirty rate, pages/s (set by `RATE`).
    pub target_rate: AtomicU64,
    /// Target background verify rate, pages/s; 0 = as fast as the CPU allows.
    pub verify_rate: AtomicU64,
    /// Pages dirtied since start.
    pub dirtied: AtomicU64,
    /// Dirty rate achieved over the last second, pages/s.
    pub achieved_1s: AtomicU64,
    /// Uptime (ms) at which dirtying started (the end of the fill).
    pub dirty_start_ms: AtomicU64,
    /// Full verification passes completed (background and on-demand).
    pub passes: AtomicU64,
    /// Page verifications done (any verifier).
    pub verified: AtomicU64,
    /// Distinct pages found bad since start (by any verifier).
    pub bad: AtomicU64,
    /// The first page found bad, or NONE.
    first_bad: AtomicU64,
    /// Time the initial fill took, ms.
    pub fill_ms: AtomicU64,
    /// Whether the memory is mlocked.
    pub mlocked: AtomicBool,
    /// Whether the memory is filled and the agent serves.
    pub ready: AtomicBool,
    /// The HTTP port actually bound (0 = none).
    pub http_port: AtomicU64,
    /// Witness windows that saw a write this agent did not make (see [`crate::witness`]).
    pub foreign_writes: AtomicU64,
}

/// A consistent-enough copy of the counters at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub boot_id: String,
    pub uptime_ms: u64,
    pub pages: u64,
    pub mem_mib: u64,
    pub target_rate: u64,
    pub achieved_rate: u64,
    pub achieved_rate_1s: u64,
    pub dirtied: u64,
    pub passes: u64,
    pub verified: u64,
    pub bad: u64,
    pub first_bad: Option<u64>,
    pub fill_ms: u64,
    pub mlocked: bool,
    pub verify_rate: u64,
    pub foreign_writes: u64,
}

impl Stats {
    /// New counters for `pages` pages.
    pub fn new(
        boot_id: String,
        mem_mib: u64,
        pages: u64,
        target_rate: u64,
        verify_rate: u64,
    ) -> Self {
        Self {
            boot_id,
            started: Instant::now(),
            pages,
            mem_mib,
            target_rate: AtomicU64::new(target_rate),
            verify_rate: AtomicU64::new(verify_rate),
            dirtied: AtomicU64::new(0),
            achieved_1s: AtomicU64::new(0),
            dirty_start_ms: AtomicU64::new(0),
            passes: AtomicU64::new(0),
            verified: AtomicU64::new(0),
            bad: AtomicU64::new(0),
            first_bad: AtomicU64::new(NONE),
            fill_ms: AtomicU64::new(0),
            mlocked: AtomicBool::new(false),
            ready: AtomicBool::new(false),
            http_port: AtomicU64::new(0),
            foreign_writes: AtomicU64::new(0),
        }
    }

    /// Milliseconds since the agent started.
    pub fn uptime_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Records the first bad page (only the first call has an effect).
    pub fn note_first_bad(&self, page: u64) {
        let _ = self
            .first_bad
            .compare_exchange(NONE, page, Relaxed, Relaxed);
    }

    /// The first page ever found bad.
    pub fn first_bad(&self) -> Option<u64> {
        match self.first_bad.load(Relaxed) {
            NONE => None,
            p => Some(p),
        }
    }

    /// Dirty rate achieved since dirtying started, pages/s.
    pub fn achieved_rate(&self) -> u64 {
        let now = self.uptime_ms();
        let start = self.dirty_start_ms.load(Relaxed);
        let span = now.saturating_sub(start);
        self.dirtied
            .load(Relaxed)
            .saturating_mul(1000)
            .checked_div(span)
            .unwrap_or(0)
    }

    /// The counters now.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            boot_id: self.boot_id.clone(),
            uptime_ms: self.uptime_ms(),
            pages: self.pages,
            mem_mib: self.mem_mib,
            target_rate: self.target_rate.load(Relaxed),
            achieved_rate: self.achieved_rate(),
            achieved_rate_1s: self.achieved_1s.load(Relaxed),
            dirtied: self.dirtied.load(Relaxed),
            passes: self.passes.load(Relaxed),
            verified: self.verified.load(Relaxed),
            bad: self.bad.load(Relaxed),
            first_bad: self.first_bad(),
            fill_ms: self.fill_ms.load(Relaxed),
            mlocked: self.mlocked.load(Relaxed),
            verify_rate: self.verify_rate.load(Relaxed),
            foreign_writes: self.foreign_writes.load(Relaxed),
        }
    }
}

/// `none` or the number.
pub fn opt(v: Option<u64>) -> String {
    v.map_or_else(|| "none".to_string(), |v| v.to_string())
}

/// JSON `null` or the number.
pub fn opt_json(v: Option<u64>) -> String {
    v.map_or_else(|| "null".to_string(), |v| v.to_string())
}

impl Snapshot {
    /// The `key=value` fields of a `STATS` answer (after `STATS `).
    pub fn to_fields(&self) -> String {
        format!(
            "boot_id={} uptime_ms={} pages={} target_rate={} achieved_rate={} achieved_rate_1s={} \
             dirtied={} passes={} bad={} first_bad={} verified={} mem_mib={} fill_ms={} mlocked={} verify_rate={} foreign_writes={}",
            self.boot_id,
            self.uptime_ms,
            self.pages,
            self.target_rate,
            self.achieved_rate,
            self.achieved_rate_1s,
            self.dirtied,
            self.passes,
            self.bad,
            opt(self.first_bad),
            self.verified,
            self.mem_mib,
            self.fill_ms,
            u8::from(self.mlocked),
            self.verify_rate,
            self.foreign_writes,
        )
    }

    /// The same facts as a JSON object.
    pub fn to_json(&self) -> String {
        format!(
            "{{\"boot_id\":\"{}\",\"uptime_ms\":{},\"pages\":{},\"target_rate\":{},\"achieved_rate\":{},\
             \"achieved_rate_1s\":{},\"dirtied\":{},\"passes\":{},\"bad\":{},\"first_bad\":{},\"verified\":{},\
             \"mem_mib\":{},\"fill_ms\":{},\"mlocked\":{},\"verify_rate\":{},\"foreign_writes\":{}}}",
            self.boot_id,
            self.uptime_ms,
            self.pages,
            self.target_rate,
            self.achieved_rate,
            self.achieved_rate_1s,
            self.dirtied,
            self.passes,
            self.bad,
            opt_json(self.first_bad),
            self.verified,
            self.mem_mib,
            self.fill_ms,
            self.mlocked,
            self.verify_rate,
            self.foreign_writes,
        )
    }
}
