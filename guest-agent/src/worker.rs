//! The memory worker: the one thread that owns the filled memory and its generation table.
//!
//! It alternates dirty ticks (every [`TICK`], dirtying as many pages as the target rate
//! asks for) with verification chunks (an on-demand `CHECK` pass if one is pending, else
//! the background walk), and serves requests from a channel between chunks. Because only
//! this thread touches the memory, verification never races with dirtying.
//!
//! A page picked for dirtying is verified before it is rewritten, so corruption is caught
//! even on a page that would otherwise be overwritten before the walk reaches it.

use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::memory::{phys_addr, GuestMemory};
use crate::pattern::{fill_page, first_mismatch, verify_page};
use crate::stats::{opt, Stats};

/// Dirty tick period.
pub const TICK: Duration = Duration::from_millis(10);
/// Pages verified between looks at the clock and the request channel.
const CHUNK: u64 = 16;
/// Byte of a page that `CORRUPT` flips (past the header, in the pseudo-random part).
pub const CORRUPT_OFFSET: usize = 2048;
/// At most this many bad-page events are reported (the counters keep counting).
const MAX_BAD_EVENTS: u64 = 64;

/// Which verifier found a bad page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The continuous background walk.
    Background,
    /// An on-demand `CHECK` pass.
    Check,
    /// The verification done just before a page is dirtied.
    Dirty,
}

impl Source {
    /// Its name in protocol lines.
    pub fn name(self) -> &'static str {
        match self {
            Source::Background => "background",
            Source::Check => "check",
            Source::Dirty => "dirty",
        }
    }
}

/// A page found bad for the first time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadEvent {
    pub page: u64,
    pub generation: u32,
    pub source: Source,
    /// First differing byte, expected and actual value.
    pub mismatch: Option<(usize, u8, u8)>,
}

impl BadEvent {
    /// `BAD page=.. gen=.. by=.. offset=.. want=.. got=..`
    pub fn describe(&self) -> String {
        let m = match self.mismatch {
            Some((o, w, g)) => format!(" offset={o} want=0x{w:02x} got=0x{g:02x}"),
            None => String::new(),
        };
        format!(
            "BAD page={} gen={} by={}{m}",
            self.page,
            self.generation,
            self.source.name()
        )
    }
}

/// The outcome of one complete verification pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckReport {
    pub boot_id: String,
    pub pages: u64,
    /// Pages this pass found bad.
    pub bad: u64,
    /// The first page this pass found bad.
    pub first_bad: Option<u64>,
    /// Distinct pages found bad since the agent started, by any verifier (at the pass end).
    pub ever_bad: u64,
    /// The first page ever found bad.
    pub ever_first_bad: Option<u64>,
    /// Distinct bad pages that this pass's walk did not discover itself (found earlier by
    /// the background walk, a previous CHECK, or the pre-dirty verification).
    pub other_bad: u64,
    /// Pages dirtied since start.
    pub dirtied: u64,
    /// How long the pass took.
    pub ms: u64,
    /// Witness windows that ever saw a write the agent did not make (a second running copy
    /// of the guest over the same memory, or a lost page).
    pub foreign_writes: u64,
}

impl CheckReport {
    /// PASS only if this pass found nothing and nothing was ever found bad before.
    pub fn pass(&self) -> bool {
        self.bad == 0 && self.ever_bad == 0 && self.foreign_writes == 0
    }

    /// Who saw bad pages: `check`, `background` or `check+background`.
    pub fn cause(&self) -> &'static str {
        match (self.bad > 0, self.other_bad > 0) {
            (true, true) => "check+background",
            (true, false) => "check",
            (false, true) => "background",
            (false, false) => "second-writer",
        }
    }

    /// The answer after the id: `CHECK PASS ...` or `CHECK FAIL ...`.
    pub fn to_line(&self) -> String {
        if self.pass() {
            format!(
                "CHECK PASS pages={} boot_id={} dirtied={} ms={}",
                self.pages, self.boot_id, self.dirtied, self.ms
            )
        } else {
            format!(
                "CHECK FAIL bad={} first_bad={} pages={} boot_id={} dirtied={} ever_bad={} cause={} foreign_writes={} ms={}",
                self.bad,
                opt(self.first_bad.or(self.ever_first_bad)),
                self.pages,
                self.boot_id,
                self.dirtied,
                self.ever_bad,
                self.cause(),
                self.foreign_writes,
                self.ms
            )
        }
    }

    /// The same facts as JSON.
    pub fn to_json(&self) -> String {
        format!(
            "{{\"result\":\"{}\",\"pages\":{},\"bad\":{},\"first_bad\":{},\"ever_bad\":{},\"cause\":{},\
             \"boot_id\":\"{}\",\"dirtied\":{},\"ms\":{}}}",
            if self.pass() { "PASS" } else { "FAIL" },
            self.pages,
            self.bad,
            crate::stats::opt_json(self.first_bad.or(self.ever_first_bad)),
            self.ever_bad,
            if self.pass() {
                "null".to_string()
            } else {
                format!("\"{}\"", self.cause())
            },
            self.boot_id,
            self.dirtied,
            self.ms
        )
    }
}

/// Where the physical address of a page was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PhysInfo {
    pub page: u64,
    pub addr: u64,
}

/// A callback that receives the answer.
pub type Reply<T> = Box<dyn FnOnce(T) + Send>;

/// A request to the worker.
pub enum Request {
    /// A complete verification pass; answered when it finishes.
    Check(Reply<CheckReport>),
    /// Flip one byte of a page without touching the bookkeeping.
    Corrupt(u64, Reply<Result<u64, String>>),
    /// The guest-physical address of a page.
    Phys(u64, Reply<Result<PhysInfo, String>>),
}

/// Turns a target rate into whole pages per tick, carrying fractions, with at most 100 ms
/// of backlog (a stall, e.g. a paused VM, does not cause a burst afterwards).
#[derive(Debug)]
pub struct Pacer {
    last: Instant,
    credit: f64,
}

impl Pacer {
    /// A pacer starting at `now` with no credit.
    pub fn new(now: Instant) -> Self {
        Self {
            last: now,
            credit: 0.0,
        }
    }

    /// Pages due at `now` for `rate` pages/s, at most `max`.
    pub fn take(&mut self, rate: u64, now: Instant, max: u64) -> u64 {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        if rate == 0 {
            self.credit = 0.0;
            return 0;
        }
        let cap = (rate as f64 * 0.1).max(1.0);
        self.credit = (self.credit + rate as f64 * dt).min(cap);
        let n = (self.credit.floor() as u64).min(max);
        self.credit -= n as f64;
        n
    }

    /// Gives back `n` pages taken but not done (still subject to the backlog cap).
    pub fn refund(&mut self, n: u64) {
        self.credit += n as f64;
    }
}

/// The dirty rate over the last second.
#[derive(Debug, Default)]
pub struct RateWindow {
    samples: VecDeque<(Instant, u64)>,
}

impl RateWindow {
    /// Records `total` pages dirtied at `now`; returns pages/s over about the last second.
    pub fn record(&mut self, now: Instant, total: u64) -> u64 {
        self.samples.push_back((now, total));
        // Keep the newest sample that is at least 1 s old as the base.
        while self.samples.len() > 2
            && now.duration_since(self.samples[1].0) >= Duration::from_secs(1)
        {
            self.samples.pop_front();
        }
        let (t0, n0) = self.samples[0];
        let span = now.duration_since(t0).as_secs_f64();
        if span <= 0.0 {
            0
        } else {
            ((total - n0) as f64 / span).round() as u64
        }
    }
}

/// An on-demand pass in progress.
struct CheckRun {
    next: u64,
    bad: u64,
    first_bad: Option<u64>,
    new_distinct: u64,
    started: Instant,
    waiters: Vec<Reply<CheckReport>>,
}

/// The memory, its generation table and the verifiers' bookkeeping.
pub struct Engine {
    mem: GuestMemory,
    gens: Vec<u32>,
    bad_map: Vec<u64>,
    stats: Arc<Stats>,
    rng: u64,
    bg_next: u64,
    events: Option<SyncSender<BadEvent>>,
}

impl Engine {
    /// An engine over `mem` (not yet filled: call [`Engine::fill_all`]).
    pub fn new(mem: GuestMemory, stats: Arc<Stats>, events: Option<SyncSender<BadEvent>>) -> Self {
        let pages = mem.pages();
        Self {
            mem,
            gens: vec![0; pages],
            bad_map: vec![0; pages.div_ceil(64)],
            rng: 0x853c_49e6_748f_ea9b ^ (stats.started.elapsed().as_nanos() as u64) | 1,
            stats,
            bg_next: 0,
            events,
        }
    }

    /// Number of pages.
    pub fn pages(&self) -> u64 {
        self.mem.pages() as u64
    }

    /// Fills every page with generation 0.
    pub fn fill_all(&mut self) {
        for i in 0..self.mem.pages() {
            self.gens[i] = 0;
            fill_page(self.mem.page_mut(i), i as u64, 0);
        }
    }

    /// Locks the memory (best effort); returns the error if it failed.
    pub fn mlock(&mut self) -> std::io::Result<()> {
        let r = self.mem.mlock();
        self.stats.mlocked.store(self.mem.is_mlocked(), Relaxed);
        r
    }

    fn next_random(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }

    /// Marks page `i` bad; returns true if it was not known bad before.
    fn record_bad(&mut self, i: u64, source: Source) -> bool {
        let (w, b) = ((i / 64) as usize, 1u64 << (i % 64));
        if self.bad_map[w] & b != 0 {
            return false;
        }
        self.bad_map[w] |= b;
        let n = self.stats.bad.fetch_add(1, Relaxed) + 1;
        self.stats.note_first_bad(i);
        if n <= MAX_BAD_EVENTS {
            if let Some(tx) = &self.events {
                let generation = self.gens[i as usize];
                let mismatch = first_mismatch(self.mem.page(i as usize), i, generation);
                // Never block the worker on a slow consumer.
                let _ = tx.try_send(BadEvent {
                    page: i,
                    generation,
                    source,
                    mismatch,
                });
            }
        }
        true
    }

    /// Verifies page `i`; returns `(ok, newly known bad)`.
    fn verify_one(&mut self, i: u64, source: Source) -> (bool, bool) {
        let ok = verify_page(self.mem.page(i as usize), i, self.gens[i as usize]);
        self.stats.verified.fetch_add(1, Relaxed);
        if ok {
            (true, false)
        } else {
            (false, self.record_bad(i, source))
        }
    }

    /// Dirties `n` pseudo-randomly chosen pages (verify, bump generation, rewrite).
    pub fn dirty(&mut self, n: u64) {
        let pages = self.pages();
        for _ in 0..n {
            let i = ((u128::from(self.next_random()) * u128::from(pages)) >> 64) as u64;
            self.verify_one(i, Source::Dirty);
            let g = self.gens[i as usize].wrapping_add(1);
            self.gens[i as usize] = g;
            fill_page(self.mem.page_mut(i as usize), i, g);
        }
        self.stats.dirtied.fetch_add(n, Relaxed);
    }

    /// Dirties up to `n` pages, in chunks, stopping early once `deadline` has passed;
    /// returns how many it dirtied.
    pub fn dirty_until(&mut self, n: u64, deadline: Instant) -> u64 {
        let mut done = 0;
        while done < n {
            let k = (n - done).min(CHUNK);
            self.dirty(k);
            done += k;
            if Instant::now() >= deadline {
                break;
            }
        }
        done
    }

    /// Continues the background walk by `n` pages.
    pub fn background_step(&mut self, n: u64) {
        let pages = self.pages();
        for _ in 0..n {
            let i = self.bg_next;
            self.verify_one(i, Source::Background);
            self.bg_next += 1;
            if self.bg_next == pages {
                self.bg_next = 0;
                self.stats.passes.fetch_add(1, Relaxed);
            }
        }
    }

    fn start_check(&self, waiters: Vec<Reply<CheckReport>>) -> CheckRun {
        CheckRun {
            next: 0,
            bad: 0,
            first_bad: None,
            new_distinct: 0,
            started: Instant::now(),
            waiters,
        }
    }

    /// Advances an on-demand pass by up to `n` pages; true when it is complete.
    fn check_step(&mut self, run: &mut CheckRun, n: u64) -> bool {
        let end = (run.next + n).min(self.pages());
        for i in run.next..end {
            let (ok, new) = self.verify_one(i, Source::Check);
            if !ok {
                run.bad += 1;
                run.first_bad.get_or_insert(i);
                run.new_distinct += u64::from(new);
            }
        }
        run.next = end;
        end == self.pages()
    }

    fn finish_check(&self, run: &CheckRun) -> CheckReport {
        self.stats.passes.fetch_add(1, Relaxed);
        let ever_bad = self.stats.bad.load(Relaxed);
        CheckReport {
            boot_id: self.stats.boot_id.clone(),
            pages: self.pages(),
            bad: run.bad,
            first_bad: run.first_bad,
            ever_bad,
            ever_first_bad: self.stats.first_bad(),
            other_bad: ever_bad.saturating_sub(run.new_distinct),
            dirtied: self.stats.dirtied.load(Relaxed),
            ms: run.started.elapsed().as_millis() as u64,
            foreign_writes: self.stats.foreign_writes.load(Relaxed),
        }
    }

    /// A complete verification pass now, without interleaved dirtying.
    pub fn full_check(&mut self) -> CheckReport {
        let mut run = self.start_check(Vec::new());
        while !self.check_step(&mut run, u64::MAX) {}
        self.finish_check(&run)
    }

    /// Flips byte [`CORRUPT_OFFSET`] of page `page`, bypassing all bookkeeping.
    pub fn corrupt(&mut self, page: u64) -> Result<u64, String> {
        self.check_index(page)?;
        self.mem.corrupt(page as usize, CORRUPT_OFFSET);
        Ok(page)
    }

    /// The guest-physical address of page `page`.
    pub fn phys(&self, page: u64) -> Result<PhysInfo, String> {
        self.check_index(page)?;
        let vaddr = self.mem.page_addr(page as usize);
        match phys_addr(vaddr) {
            Ok(Some(addr)) => Ok(PhysInfo { page, addr }),
            Ok(None) => Err(format!("page {page} is not present in RAM")),
            Err(e) => Err(format!("cannot read /proc/self/pagemap: {e}")),
        }
    }

    fn check_index(&self, page: u64) -> Result<(), String> {
        if page < self.pages() {
            Ok(())
        } else {
            Err(format!("page {page} out of range (pages={})", self.pages()))
        }
    }

    /// The generation of page `i` (for tests and diagnostics).
    pub fn generation(&self, i: u64) -> u32 {
        self.gens[i as usize]
    }
}

fn handle(
    engine: &mut Engine,
    req: Request,
    check: &mut Option<CheckRun>,
    queued: &mut Vec<Reply<CheckReport>>,
) {
    match req {
        Request::Check(reply) => {
            if check.is_none() {
                *check = Some(engine.start_check(vec![reply]));
            } else {
                // Answered by a pass that starts after this request arrived.
                queued.push(reply);
            }
        }
        Request::Corrupt(page, reply) => reply(engine.corrupt(page)),
        Request::Phys(page, reply) => reply(engine.phys(page)),
    }
}

/// Runs the worker loop until every request sender is dropped.
pub fn run(mut engine: Engine, rx: Receiver<Request>) {
    let stats = Arc::clone(&engine.stats);
    let now = Instant::now();
    stats.dirty_start_ms.store(stats.uptime_ms(), Relaxed);
    let mut dirty_pacer = Pacer::new(now);
    let mut verify_pacer = Pacer::new(now);
    let mut window = RateWindow::default();
    let mut next_tick = now;
    let mut check: Option<CheckRun> = None;
    let mut queued: Vec<Reply<CheckReport>> = Vec::new();

    loop {
        loop {
            match rx.try_recv() {
                Ok(req) => handle(&mut engine, req, &mut check, &mut queued),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return,
            }
        }
        let now = Instant::now();
        if now >= next_tick {
            // Dirtying may not starve verification when the target rate is more than the
            // CPU can do: each tick gets a time budget and verification a guaranteed gap
            // (half of the time while a CHECK is pending).
            let (budget, gap) = if check.is_some() {
                (TICK / 2, TICK / 2)
            } else {
                (TICK * 9 / 10, TICK / 10)
            };
            let n = dirty_pacer.take(stats.target_rate.load(Relaxed), now, u64::MAX);
            let done = engine.dirty_until(n, now + budget);
            dirty_pacer.refund(n - done);
            let after = Instant::now();
            let r = window.record(after, stats.dirtied.load(Relaxed));
            stats.achieved_1s.store(r, Relaxed);
            next_tick = (next_tick + TICK).max(after + gap);
            continue;
        }
        if let Some(run) = check.as_mut() {
            if engine.check_step(run, CHUNK) {
                let run = check.take().expect("a pass in progress");
                let report = engine.finish_check(&run);
                for w in run.waiters {
                    w(report.clone());
                }
                if !queued.is_empty() {
                    check = Some(engine.start_check(std::mem::take(&mut queued)));
                }
            }
            continue;
        }
        let vr = stats.verify_rate.load(Relaxed);
        let n = if vr == 0 {
            verify_pacer = Pacer::new(now);
            CHUNK
        } else {
            verify_pacer.take(vr, now, CHUNK)
        };
        if n > 0 {
            engine.background_step(n);
            continue;
        }
        match rx.recv_timeout(next_tick.saturating_duration_since(now)) {
            Ok(req) => handle(&mut engine, req, &mut check, &mut queued),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn engine(
        pages: usize,
        rate: u64,
        verify_rate: u64,
    ) -> (Engine, Arc<Stats>, mpsc::Receiver<BadEvent>) {
        let stats = Arc::new(Stats::new(
            "00ff".into(),
            1,
            pages as u64,
            rate,
            verify_rate,
        ));
        let (etx, erx) = mpsc::sync_channel(16);
        let mut e = Engine::new(
            GuestMemory::new(pages).unwrap(),
            Arc::clone(&stats),
            Some(etx),
        );
        e.fill_all();
        (e, stats, erx)
    }

    #[test]
    fn clean_memory_passes_and_dirtying_keeps_it_clean() {
        let (mut e, stats, _) = engine(64, 0, 0);
        let r = e.full_check();
        assert!(r.pass(), "{}", r.to_line());
        assert_eq!(
            r.to_line(),
            format!("CHECK PASS pages=64 boot_id=00ff dirtied=0 ms={}", r.ms)
        );
        e.dirty(500);
        assert_eq!(stats.dirtied.load(Relaxed), 500);
        assert!((0..64).map(|i| e.generation(i)).sum::<u32>() == 500);
        e.background_step(64 * 3);
        assert_eq!(stats.passes.load(Relaxed), 1 + 3);
        assert!(e.full_check().pass());
        assert_eq!(stats.bad.load(Relaxed), 0);
    }

    #[test]
    fn a_corrupted_page_fails_check() {
        let (mut e, stats, erx) = engine(32, 0, 0);
        assert_eq!(e.corrupt(7), Ok(7));
        assert!(e.corrupt(32).is_err());
        let r = e.full_check();
        assert!(!r.pass());
        assert_eq!(
            (r.bad, r.first_bad, r.ever_bad, r.cause()),
            (1, Some(7), 1, "check")
        );
        assert!(r
            .to_line()
            .starts_with("CHECK FAIL bad=1 first_bad=7 pages=32 boot_id=00ff"));
        let ev = erx.try_recv().unwrap();
        assert_eq!((ev.page, ev.source), (7, Source::Check));
        assert_eq!(ev.mismatch.map(|m| m.0), Some(CORRUPT_OFFSET));
        // Found again by the next pass, but counted once as a distinct page.
        let r = e.full_check();
        assert_eq!((r.bad, r.ever_bad, r.cause()), (1, 1, "check+background"));
        assert_eq!(stats.bad.load(Relaxed), 1);
        assert!(erx.try_recv().is_err(), "one event per distinct page");
    }

    #[test]
    fn corruption_healed_by_dirtying_still_fails_check() {
        let (mut e, _, erx) = engine(1, 0, 0);
        e.corrupt(0).unwrap();
        // The only page gets dirtied: verified first, then rewritten with a new generation.
        e.dirty(1);
        assert_eq!(erx.try_recv().unwrap().source, Source::Dirty);
        let r = e.full_check();
        assert_eq!((r.bad, r.ever_bad), (0, 1));
        assert!(!r.pass());
        assert!(r.to_line().contains("cause=background"), "{}", r.to_line());
        assert!(r.to_line().contains("first_bad=0"), "{}", r.to_line());
    }

    #[test]
    fn pacer_carries_fractions_and_caps_backlog() {
        let t0 = Instant::now();
        let mut p = Pacer::new(t0);
        // 50 pages/s in 10 ms ticks: half a page per tick.
        let total: u64 = (1..=100).map(|k| p.take(50, t0 + TICK * k, u64::MAX)).sum();
        assert_eq!(total, 50);
        // A 10 s stall yields at most 100 ms worth.
        let mut p = Pacer::new(t0);
        assert_eq!(p.take(1000, t0 + Duration::from_secs(10), u64::MAX), 100);
        // max limits one take, the rest stays as credit.
        let mut p = Pacer::new(t0);
        assert_eq!(p.take(1000, t0 + Duration::from_millis(50), 16), 16);
        assert_eq!(p.take(1000, t0 + Duration::from_millis(50), 100), 34);
        assert_eq!(p.take(0, t0 + Duration::from_millis(60), 100), 0);
    }

    #[test]
    fn worker_achieves_a_small_rate_and_answers_requests() {
        let (e, stats, _) = engine(256, 200, 2000);
        let (tx, rx) = mpsc::channel();
        let t = std::thread::spawn(move || run(e, rx));
        std::thread::sleep(Duration::from_millis(1500));
        let dirtied = stats.dirtied.load(Relaxed);
        // 1.5 s at 200 pages/s = 300; generous bounds for a loaded CI machine.
        assert!((150..=330).contains(&dirtied), "dirtied {dirtied}");
        let r1s = stats.achieved_1s.load(Relaxed);
        assert!((100..=260).contains(&r1s), "achieved_1s {r1s}");
        assert!(
            stats.passes.load(Relaxed) >= 1,
            "background walk at 2000 pages/s"
        );

        let (ctx, crx) = mpsc::channel();
        tx.send(Request::Check(Box::new(move |r| ctx.send(r).unwrap())))
            .unwrap();
        let r = crx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(r.pass(), "{}", r.to_line());

        let (ctx, crx) = mpsc::channel();
        tx.send(Request::Corrupt(3, Box::new(move |r| ctx.send(r).unwrap())))
            .unwrap();
        assert_eq!(crx.recv_timeout(Duration::from_secs(10)).unwrap(), Ok(3));
        // Stop dirtying so the corrupted page cannot be healed before the pass sees it,
        // then ask for two passes at once: both answered.
        stats.target_rate.store(0, Relaxed);
        let (ctx, crx) = mpsc::channel();
        for _ in 0..2 {
            let ctx = ctx.clone();
            tx.send(Request::Check(Box::new(move |r| ctx.send(r).unwrap())))
                .unwrap();
        }
        for _ in 0..2 {
            let r = crx.recv_timeout(Duration::from_secs(10)).unwrap();
            assert!(!r.pass());
            assert_eq!(r.ever_first_bad, Some(3));
        }
        drop(tx);
        t.join().unwrap();
    }

    #[test]
    fn check_completes_even_when_the_dirty_rate_is_unreachable() {
        let (e, stats, _) = engine(2048, 100_000_000, 0);
        let (tx, rx) = mpsc::channel();
        let t = std::thread::spawn(move || run(e, rx));
        std::thread::sleep(Duration::from_millis(100));
        let (ctx, crx) = mpsc::channel();
        tx.send(Request::Check(Box::new(move |r| ctx.send(r).unwrap())))
            .unwrap();
        let r = crx
            .recv_timeout(Duration::from_secs(20))
            .expect("CHECK starved by dirtying");
        assert!(r.pass(), "{}", r.to_line());
        assert!(stats.dirtied.load(Relaxed) > 0);
        drop(tx);
        t.join().unwrap();
    }
}
