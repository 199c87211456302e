//! The second-writer witness: notices a write to guest memory that this agent did not make.
//!
//! With zero-copy migration both cloud VMs map one guest memory. If two QEMUs ever ran the
//! guest at once (a split brain), two copies of this agent would run over that one memory.
//! Everything the agent keeps in memory is then shared by both copies, its own bookkeeping
//! too, so comparing memory with memory can never tell them apart; only what sits in a vCPU's
//! registers differs. So a window is: write a value unique to this instant into one word,
//! then spin re-reading the word with the value held in a register; if the word changes
//! under the spin, someone else wrote it. Once a window saw that, `foreign_writes` counts
//! it and every later `CHECK` fails (`cause=second-writer`).
//!
//! What it can and cannot see: it catches a second writer whose store lands inside one of
//! this agent's windows (well under 1 ms of spinning in every ~20 ms, so a few percent of
//! the time per store: a split brain lasting seconds is caught almost surely, a short one
//! only with some luck; the QMP witness of the tests is the sound check). It cannot produce a false alarm: the word is written
//! only by windows, each with a fresh value. A lost page (a copying migration that dropped
//! the witness word's last write) also shows up, which is a real corruption as well.

use std::hint::spin_loop;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::stats::Stats;

/// Time between windows.
pub const PERIOD: Duration = Duration::from_millis(19);

/// Re-reads per window (a fraction of a millisecond under TCG, less under KVM): a few
/// percent of one vCPU.
pub const SPINS: u32 = 5_000;

/// A value for one window: the wall clock in nanoseconds, which two copies of the agent in
/// two QEMUs never read at the same instant. Never 0 (the word's initial value).
pub fn unique_value() -> u64 {
    let ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    ns | 1
}

/// One window: stores `mine` into `word` and re-reads it up to `spins` times. True if the
/// word changed under the spin (another writer).
#[inline(never)]
pub fn window(word: &AtomicU64, mine: u64, spins: u32) -> bool {
    word.store(mine, SeqCst);
    for _ in 0..spins {
        if word.load(SeqCst) != mine {
            return true;
        }
        spin_loop();
    }
    false
}

/// Starts the witness thread; it runs for the agent's life.
pub fn start(stats: Arc<Stats>) -> std::io::Result<()> {
    let word = Box::new(AtomicU64::new(0));
    std::thread::Builder::new()
        .name("witness".into())
        .spawn(move || loop {
            std::thread::sleep(PERIOD);
            if window(&word, unique_value(), SPINS) {
                stats.foreign_writes.fetch_add(1, SeqCst);
            }
        })
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_alone_sees_nothing() {
        let w = AtomicU64::new(0);
        for _ in 0..100 {
            assert!(!window(&w, unique_value(), 1000));
        }
    }

    #[test]
    fn a_window_sees_a_second_writer() {
        // The other "copy" waits until this window has stored its value, then writes its
        // own, as a second QEMU running the same guest would.
        let w = Arc::new(AtomicU64::new(0));
        let other = Arc::clone(&w);
        let writer = std::thread::spawn(move || {
            while other.load(SeqCst) == 0 {
                spin_loop();
            }
            other.store(unique_value().wrapping_add(2), SeqCst);
        });
        // Spins long enough for the writer to be scheduled, however busy the machine.
        assert!(window(&w, unique_value(), u32::MAX));
        writer.join().unwrap();
    }

    #[test]
    fn values_are_never_zero_and_change() {
        let a = unique_value();
        std::thread::sleep(Duration::from_millis(1));
        let b = unique_value();
        assert!(a != 0 && b != 0 && a != b);
    }
}
