//! VMBeam's lab guest agent: runs as the main process of a tiny Linux guest, fills memory
//! with a verifiable per-page pattern, dirties it at a set rate, verifies it continuously
//! and on demand, and answers a line protocol on a serial port and HTTP.
//!
//! The pattern ([`pattern`]) is a pure function of (page index, generation); the
//! memory ([`memory`]) and its generation table are owned by one worker thread
//! ([`worker`]), which alternates dirty ticks with verification chunks, so verification
//! never races with dirtying. See `README.md` for the protocol.

pub mod channel;
pub mod config;
pub mod http;
pub mod memory;
pub mod pattern;
pub mod protocol;
pub mod qga;
pub mod stats;
pub mod witness;
pub mod worker;

use std::fs::OpenOptions;
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::channel::Outbox;
use crate::config::{ChanSpec, Config, ConsoleSpec};
use crate::memory::GuestMemory;
use crate::pattern::PAGE_SIZE;
use crate::protocol::{parse_line, Command};
use crate::stats::Stats;
use crate::worker::{Engine, Request, CORRUPT_OFFSET};

/// A random id for this agent run, as hex (32 digits).
///
/// Uniqueness is all it needs, not secrecy, so it asks the kernel with GRND_INSECURE:
/// early in boot, before the kernel's RNG is seeded, reading /dev/urandom makes a 6.1
/// kernel first generate jitter entropy, which costs about a second under TCG.
pub fn new_boot_id() -> String {
    let mut b = [0u8; 16];
    // SAFETY: b is a writable buffer of the length passed.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), libc::GRND_INSECURE) };
    let ok = n == b.len() as isize
        || std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut b))
            .is_ok();
    if !ok {
        // Neither worked (should not happen): time and pid.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        b = (t ^ (u128::from(std::process::id()) << 64)).to_le_bytes();
    }
    b.iter().map(|v| format!("{v:02x}")).collect()
}

/// `MemTotal` and `MemAvailable` from /proc/meminfo, in KiB.
pub fn meminfo() -> Option<(u64, u64)> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let get = |key: &str| -> Option<u64> {
        s.lines()
            .find_map(|l| l.strip_prefix(key))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    };
    Some((get("MemTotal:")?, get("MemAvailable:")?))
}

/// Memory the guest kernel needs to keep free besides the filled memory (page tables,
/// per-CPU and network buffers, watermarks), KiB.
pub const KERNEL_HEADROOM_KIB: u64 = 24 << 10;

/// The console: READY, status and diagnostic lines for the human and the host's log.
pub struct Console {
    out: Mutex<Box<dyn Write + Send>>,
}

impl Console {
    /// Opens the console (falls back to stderr if the device cannot be opened).
    pub fn open(spec: &ConsoleSpec) -> Self {
        let out: Box<dyn Write + Send> = match spec {
            ConsoleSpec::Stderr => Box::new(io::stderr()),
            ConsoleSpec::Path(p) => match OpenOptions::new()
                .append(true)
                .create(false)
                .custom_flags(libc::O_NOCTTY)
                .open(p)
            {
                Ok(f) => Box::new(f),
                Err(e) => {
                    eprintln!(
                        "VMBEAM-AGENT cannot open console {}: {e}; using stderr",
                        p.display()
                    );
                    Box::new(io::stderr())
                }
            },
        };
        Self {
            out: Mutex::new(out),
        }
    }

    /// Writes one line (errors are ignored: the console is best effort).
    pub fn line(&self, s: &str) {
        let mut o = self.out.lock().unwrap_or_else(|p| p.into_inner());
        let _ = o
            .write_all(format!("{s}\n").as_bytes())
            .and_then(|()| o.flush());
    }
}

/// Answers one channel line; long operations are handed to the worker and answered when
/// it finishes, so the channel keeps reading meanwhile.
pub fn handle_line(line: &str, stats: &Stats, worker: &Sender<Request>, out: &Outbox) {
    let (id, cmd) = match parse_line(line) {
        Ok(v) => v,
        Err(e) => {
            if let Some(r) = e.reply() {
                out.send(r);
            }
            return;
        }
    };
    let dead = |id: &str| format!("{id} ERR the memory worker is not running");
    match cmd {
        Command::Ping => out.send(format!(
            "{id} PONG boot_id={} uptime_ms={}",
            stats.boot_id,
            stats.uptime_ms()
        )),
        Command::Stats => out.send(format!("{id} STATS {}", stats.snapshot().to_fields())),
        Command::Rate(n) => {
            stats.target_rate.store(n, Relaxed);
            out.send(format!("{id} OK rate={n}"));
        }
        Command::Check => {
            let (o, i) = (out.clone(), id.clone());
            let req = Request::Check(Box::new(move |r| o.send(format!("{i} {}", r.to_line()))));
            if worker.send(req).is_err() {
                out.send(dead(&id));
            }
        }
        Command::Corrupt(page) => {
            let (o, i) = (out.clone(), id.clone());
            let req = Request::Corrupt(
                page,
                Box::new(move |r| {
                    o.send(match r {
                        Ok(p) => format!("{i} OK corrupted={p} offset={CORRUPT_OFFSET}"),
                        Err(e) => format!("{i} ERR {e}"),
                    })
                }),
            );
            if worker.send(req).is_err() {
                out.send(dead(&id));
            }
        }
        Command::Phys(page) => {
            let (o, i) = (out.clone(), id.clone());
            let req = Request::Phys(
                page,
                Box::new(move |r| {
                    o.send(match r {
                        Ok(p) => format!("{i} PHYS page={} addr=0x{:x}", p.page, p.addr),
                        Err(e) => format!("{i} ERR {e}"),
                    })
                }),
            );
            if worker.send(req).is_err() {
                out.send(dead(&id));
            }
        }
    }
}

/// Answers one line of a QGA channel ([`qga`]): libvirt's sync and ping, and the agent's
/// own commands carried in `vmbeam-command`, each answered with one JSON line.
pub fn handle_qga_line(line: &str, stats: &Stats, worker: &Sender<Request>, out: &Outbox) {
    if !qga::is_request(line) {
        // Not JSON: what a client wrote before syncing; libvirt's sync skips it too.
        return;
    }
    match qga::parse(line) {
        qga::QgaRequest::Sync(id) => out.send(qga::sync_reply(id)),
        qga::QgaRequest::Ping => out.send(qga::empty_reply()),
        qga::QgaRequest::Command(cmd) => {
            const ID: &str = "qga";
            let json = out.mapped(|answer: String| {
                qga::line_reply(answer.strip_prefix("qga ").unwrap_or(&answer))
            });
            handle_line(&format!("{ID} {cmd}"), stats, worker, &json);
        }
        qga::QgaRequest::Unknown(name) => out.send(qga::not_found(&name)),
    }
}

/// Runs the agent: fill, serve, report. Returns only on a setup error.
pub fn run(cfg: Config) -> Result<std::convert::Infallible, String> {
    let console = Console::open(&cfg.console);
    let boot_id = new_boot_id();
    let pages = cfg
        .mem_mib
        .checked_mul(1 << 20)
        .map(|b| b / PAGE_SIZE as u64)
        .ok_or("mem_mib is too large")?;
    let (total_kib, avail_kib) = meminfo().unwrap_or((0, 0));
    console.line(&format!(
        "VMBEAM-AGENT start boot_id={boot_id} mem_mib={} pages={pages} dirty_rate={} pid={} \
         mem_total_mib={} mem_available_mib={}",
        cfg.mem_mib,
        cfg.dirty_rate,
        std::process::id(),
        total_kib >> 10,
        avail_kib >> 10
    ));
    // Filling more than the kernel can give makes a guest without swap hang in reclaim
    // (init cannot be OOM-killed), so refuse up front, saying what to change.
    if avail_kib > 0 && (cfg.mem_mib << 10) + KERNEL_HEADROOM_KIB > avail_kib {
        return Err(format!(
            "mem_mib={} does not fit: the guest has {} MiB available and the kernel needs \
             about {} MiB more; give the guest more RAM or fill at most {} MiB",
            cfg.mem_mib,
            avail_kib >> 10,
            KERNEL_HEADROOM_KIB >> 10,
            avail_kib.saturating_sub(KERNEL_HEADROOM_KIB) >> 10
        ));
    }
    let stats = Arc::new(Stats::new(
        boot_id.clone(),
        cfg.mem_mib,
        pages,
        cfg.dirty_rate,
        cfg.verify_rate,
    ));
    let mem = GuestMemory::new(pages as usize)
        .map_err(|e| format!("cannot map {} MiB: {e}", cfg.mem_mib))?;
    let (ev_tx, ev_rx) = mpsc::sync_channel(128);
    let mut engine = Engine::new(mem, Arc::clone(&stats), Some(ev_tx));
    let t0 = Instant::now();
    engine.fill_all();
    let fill_ms = t0.elapsed().as_millis() as u64;
    stats.fill_ms.store(fill_ms, Relaxed);
    if cfg.mlock {
        if let Err(e) = engine.mlock() {
            console.line(&format!(
                "VMBEAM-AGENT mlock failed (continuing unlocked): {e}"
            ));
        }
    }
    let (wtx, wrx) = mpsc::channel();
    std::thread::Builder::new()
        .name("memory".into())
        .spawn(move || worker::run(engine, wrx))
        .map_err(|e| format!("cannot start the memory worker: {e}"))?;

    if let Err(e) = witness::start(Arc::clone(&stats)) {
        console.line(&format!(
            "VMBEAM-AGENT witness failed to start (continuing without): {e}"
        ));
    }

    if let Some(port) = cfg.http_port {
        match http::start(cfg.http_addr, port, Arc::clone(&stats), wtx.clone()) {
            Ok(p) => stats.http_port.store(u64::from(p), Relaxed),
            Err(e) => console.line(&format!(
                "VMBEAM-AGENT HTTP on {}:{port} failed (continuing without): {e}",
                cfg.http_addr
            )),
        }
    }

    let (outbox, out_rx) = Outbox::new();
    {
        let (stats, wtx, outbox) = (Arc::clone(&stats), wtx.clone(), outbox.clone());
        let qga = matches!(cfg.chan, ChanSpec::Qga(_));
        channel::start(
            cfg.chan.clone(),
            out_rx,
            Arc::new(move |l| {
                if qga {
                    handle_qga_line(l, &stats, &wtx, &outbox)
                } else {
                    handle_line(l, &stats, &wtx, &outbox)
                }
            }),
        );
    }

    stats.ready.store(true, Relaxed);
    let http_port = stats.http_port.load(Relaxed);
    outbox.send(format!(
        "* READY boot_id={boot_id} mem_mib={} pages={pages} fill_ms={fill_ms} http_port={http_port}",
        cfg.mem_mib
    ));
    console.line(&format!(
        "VMBEAM-AGENT READY boot_id={boot_id} mem_mib={} pages={pages} fill_ms={fill_ms} mlocked={} http_port={http_port}",
        cfg.mem_mib,
        u8::from(stats.mlocked.load(Relaxed))
    ));

    // The main thread reports: bad pages as they are found, a status line every second.
    let mut next = Instant::now() + Duration::from_secs(1);
    loop {
        match ev_rx.recv_timeout(next.saturating_duration_since(Instant::now())) {
            Ok(ev) => {
                let d = ev.describe();
                outbox.send(format!("* {d}"));
                console.line(&format!("VMBEAM-AGENT {d}"));
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                std::thread::sleep(next.saturating_duration_since(Instant::now()))
            }
        }
        if Instant::now() >= next {
            let s = stats.snapshot();
            console.line(&format!(
                "VMBEAM-AGENT status boot_id={} uptime_ms={} target_rate={} achieved_rate_1s={} dirtied={} passes={} verified={} bad={}",
                s.boot_id, s.uptime_ms, s.target_rate, s.achieved_rate_1s, s.dirtied, s.passes, s.verified, s.bad
            ));
            next += Duration::from_secs(1);
            if next < Instant::now() {
                next = Instant::now() + Duration::from_secs(1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qga_lines_get_json_answers_and_carry_the_agents_commands() {
        let stats = Stats::new("b00t".into(), 1, 256, 0, 0);
        let (out, rx) = Outbox::new();
        // A worker that is gone: CHECK's answer is the agent's own error, framed as JSON.
        let (wtx, wrx) = mpsc::channel();
        drop(wrx);
        let ask = |line: &str| {
            handle_qga_line(line, &stats, &wtx, &out);
            rx.try_recv().ok()
        };
        assert_eq!(
            ask(r#"{"execute":"guest-sync", "arguments":{"id":77}}"#).as_deref(),
            Some(r#"{"return": 77}"#)
        );
        assert_eq!(
            ask(r#"{"execute":"guest-ping"}"#).as_deref(),
            Some(r#"{"return": {}}"#)
        );
        let pong = ask(r#"{"execute":"vmbeam-command","arguments":{"line":"PING"}}"#).unwrap();
        assert!(
            pong.starts_with(r#"{"return": {"line": "PONG boot_id=b00t uptime_ms="#),
            "{pong}"
        );
        assert_eq!(
            ask(r#"{"execute":"vmbeam-command","arguments":{"line":"CHECK"}}"#).as_deref(),
            Some(r#"{"return": {"line": "ERR the memory worker is not running"}}"#)
        );
        assert!(ask(r#"{"execute":"guest-fsfreeze-freeze"}"#)
            .unwrap()
            .contains("CommandNotFound"));
        // Not JSON (what a client wrote before its sync): no answer at all.
        assert_eq!(ask("1 PING"), None);
    }
}
