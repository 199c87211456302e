//! Tests against real QEMU processes (no mocks).
//!
//! Each test makes a private directory (under /dev/shm when it exists, so the "pool" is
//! tmpfs as in production), starts its QEMUs through [`QemuProcess`] (killed by pid and
//! reaped on drop, even when the test fails) and removes everything on exit. The tests run
//! one at a time (a global lock) so the timings they print are not distorted by each other.
//!
//! Run with `cargo test -p vmbeam-qemu --features qemu-tests --test qemu` (scripts/test.sh's
//! qemu tier); a plain `cargo test` leaves them out. No root needed. Measurements are printed
//! on lines starting with `MEASURE`; add `-- --nocapture` to see them.
//!
//! If QEMU is missing the tests fail, unless `VMBEAM_SKIP_QEMU_TESTS=1` is set.

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vmbeam_qemu::caps::{
    set_ignore_shared_incoming, IgnoreSharedGuard, ResetOutcome, X_IGNORE_SHARED,
};
use vmbeam_qemu::launcher::{
    QemuProcess, QemuSpec, RamBackend, DEFAULT_QEMU_BINARY, QEMU_BINARY_ENV,
};
use vmbeam_qemu::qmp::{BackendKind, MigrationStatus, QmpClient, QmpError, RunState};
use vmbeam_qemu::ramlink::{
    link_ram_path, verify_memdev_backing, verify_process_maps_file, RamLinkError,
    LIBVIRT_DEFAULT_RAM_FILE,
};
use vmbeam_qemu::CapsError;

const MIB: u64 = 1 << 20;
const PAGE: usize = 4096;
const GUEST: u64 = 256 * MIB;
const READY: Duration = Duration::from_secs(20);
/// A guest-physical address (= RAM file offset below 4 GiB on `pc`) firmware never touches.
const MARKER_ADDR: u64 = 200 * MIB;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// False (skip) only when QEMU is missing and VMBEAM_SKIP_QEMU_TESTS=1.
fn qemu_available() -> bool {
    let bin = std::env::var_os(QEMU_BINARY_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_QEMU_BINARY));
    if bin.exists() {
        return true;
    }
    if std::env::var("VMBEAM_SKIP_QEMU_TESTS").as_deref() == Ok("1") {
        eprintln!(
            "SKIP: {} not found and VMBEAM_SKIP_QEMU_TESTS=1",
            bin.display()
        );
        return false;
    }
    panic!(
        "{} not found: install qemu-system-x86 (or set {QEMU_BINARY_ENV}, or VMBEAM_SKIP_QEMU_TESTS=1)",
        bin.display()
    );
}

struct Lab {
    dir: tempfile::TempDir,
}

impl Lab {
    fn new(tag: &str) -> Self {
        let shm = Path::new("/dev/shm");
        let base = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let dir = tempfile::Builder::new()
            .prefix(&format!("vmbeam-qemu-{tag}-"))
            .tempdir_in(base)
            .expect("tempdir");
        Lab { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A sparse file: reads as zeros.
    fn sparse_file(&self, name: &str, size: u64) -> PathBuf {
        let p = self.path(name);
        fs::File::create(&p)
            .and_then(|f| f.set_len(size))
            .expect("sparse file");
        p
    }

    /// A file whose every page is non-zero: byte 0x5A, the first 8 bytes the page number.
    fn pattern_file(&self, name: &str, size: u64) -> PathBuf {
        let p = self.path(name);
        let mut f = fs::File::create(&p).expect("create");
        let mut chunk = vec![0x5Au8; MIB as usize];
        for m in 0..size / MIB {
            for pg in 0..(MIB as usize / PAGE) {
                let n = m * (MIB / PAGE as u64) + pg as u64;
                chunk[pg * PAGE..pg * PAGE + 8].copy_from_slice(&n.to_le_bytes());
            }
            f.write_all(&chunk).expect("fill");
        }
        p
    }

    fn spec(&self, name: &str, mem: &Path, size: u64) -> QemuSpec {
        QemuSpec::new(mem, size, self.path(&format!("{name}.qmp")))
    }
}

fn write_at(path: &Path, off: u64, bytes: &[u8]) {
    let mut f = fs::OpenOptions::new().write(true).open(path).expect("open");
    f.seek(SeekFrom::Start(off)).expect("seek");
    f.write_all(bytes).expect("write");
}

fn read_at(path: &Path, off: u64, len: usize) -> Vec<u8> {
    let mut f = fs::File::open(path).expect("open");
    f.seek(SeekFrom::Start(off)).expect("seek");
    let mut b = vec![0; len];
    f.read_exact(&mut b).expect("read");
    b
}

/// Guest-physical 8-byte word through HMP `xp` (what the guest sees).
fn guest_u64(q: &mut QmpClient, addr: u64) -> u64 {
    let out = q
        .human_monitor_command(&format!("xp /1xg {addr:#x}"))
        .expect("xp");
    let word = out
        .split(':')
        .nth(1)
        .map(str::trim)
        .and_then(|w| w.strip_prefix("0x"))
        .unwrap_or_else(|| panic!("unexpected xp output {out:?}"));
    u64::from_str_radix(word, 16).expect("hex")
}

/// Page-by-page comparison: (pages differing, first few differing guest addresses).
fn diff_pages(a: &Path, b: &Path) -> (usize, Vec<u64>) {
    let mut fa = fs::File::open(a).expect("open a");
    let mut fb = fs::File::open(b).expect("open b");
    assert_eq!(
        fa.metadata().expect("md").len(),
        fb.metadata().expect("md").len()
    );
    let (mut ba, mut bb) = (vec![0u8; MIB as usize], vec![0u8; MIB as usize]);
    let (mut n, mut first, mut off) = (0usize, Vec::new(), 0u64);
    loop {
        let ra = fa.read(&mut ba).expect("read a");
        if ra == 0 {
            break;
        }
        fb.read_exact(&mut bb[..ra]).expect("read b");
        for (i, (pa, pb)) in ba[..ra].chunks(PAGE).zip(bb[..ra].chunks(PAGE)).enumerate() {
            if pa != pb {
                n += 1;
                if first.len() < 8 {
                    first.push(off + (i * PAGE) as u64);
                }
            }
        }
        off += ra as u64;
    }
    (n, first)
}

fn ready(p: &mut QemuProcess) -> (QmpClient, Duration) {
    let c = p.connect_qmp(READY).expect("QMP ready");
    (c, p.launched_at().elapsed())
}

fn wait_state(q: &mut QmpClient, want: RunState, timeout: Duration) -> RunState {
    let deadline = Instant::now() + timeout;
    loop {
        let s = q.query_status().expect("query-status");
        if s == want || Instant::now() >= deadline {
            return s;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[test]
fn qmp_against_real_qemu() {
    let _s = serial();
    if !qemu_available() {
        return;
    }
    let lab = Lab::new("qmp");
    let ram = lab.sparse_file("ram", 64 * MIB);
    let mut qemu = QemuProcess::launch(lab.spec("a", &ram, 64 * MIB)).expect("launch");
    let (mut q, t_ready) = ready(&mut qemu);
    println!(
        "MEASURE launch->QMP ready (running source, 64 MiB): {:.1} ms",
        ms(t_ready)
    );
    assert!(q.greeting().version.major >= 7, "{:?}", q.greeting());

    assert_eq!(q.query_status().expect("status"), RunState::Running);
    q.stop().expect("stop");
    assert_eq!(q.query_status().expect("status"), RunState::Paused);
    q.cont().expect("cont");
    let info = q.query_status_info().expect("status");
    assert!(info.running && info.status == RunState::Running);
    let names: Vec<_> = q.events().iter().map(|e| e.name.as_str()).collect();
    assert!(
        names.windows(2).any(|w| w == ["STOP", "RESUME"]),
        "{names:?}"
    );
    // Waiting for an event: recorded ones are found first, later ones are read.
    q.take_events();
    q.stop().expect("stop");
    let ev = q
        .wait_event(|e| e.name == "STOP", Duration::from_secs(5))
        .expect("STOP event");
    assert!(ev.timestamp.is_some());
    q.cont().expect("cont");
    let _ = q.pump_events(Duration::from_millis(20)).expect("pump");
    q.wait_event(|e| e.name == "RESUME", Duration::from_secs(5))
        .expect("RESUME event");
    assert!(matches!(
        q.wait_event(|e| e.name == "NEVER", Duration::from_millis(50)),
        Err(QmpError::Timeout { .. })
    ));

    // Memory backend as QEMU reports it, completed with qom-get.
    let m = q.query_memdev().expect("query-memdev");
    assert_eq!(m.len(), 1, "{m:?}");
    assert_eq!(m[0].id.as_deref(), Some("ram"));
    assert_eq!(m[0].kind, BackendKind::File);
    assert_eq!(m[0].share, Some(true));
    assert!(!m[0].prealloc);
    assert_eq!(m[0].size, 64 * MIB);
    assert_eq!(m[0].mem_path.as_deref(), Some(ram.as_path()));
    verify_memdev_backing(&m, "ram", &ram).expect("file-backed, shared");
    assert_eq!(
        verify_process_maps_file(qemu.pid(), &ram).expect("mapped"),
        64 * MIB
    );
    assert_eq!(
        q.qom_get("/objects/ram", "size").expect("qom-get"),
        serde_json::json!(64 * MIB)
    );

    // Migration state and capabilities of an idle QEMU.
    assert_eq!(
        q.query_migrate().expect("qm").status(),
        MigrationStatus::None
    );
    let caps = q.query_migrate_capabilities().expect("caps");
    assert_eq!(caps.get(X_IGNORE_SHARED), Some(&false), "{caps:?}");
    q.set_capability(X_IGNORE_SHARED, true).expect("on");
    assert!(q.migrate_capability(X_IGNORE_SHARED).expect("get"));
    q.set_capability(X_IGNORE_SHARED, false).expect("off");
    assert!(!q.migrate_capability(X_IGNORE_SHARED).expect("get"));

    // Typed QEMU errors.
    match q.set_capability("no-such-capability", true) {
        Err(QmpError::Qmp { class, desc, .. }) => {
            assert_eq!(class, "GenericError");
            assert!(desc.contains("does not accept value"), "{desc}");
        }
        other => panic!("unexpected {other:?}"),
    }
    match q.execute("no-such-command", None) {
        Err(QmpError::Qmp { class, .. }) => assert_eq!(class, "CommandNotFound"),
        other => panic!("unexpected {other:?}"),
    }
    // Still usable after errors.
    assert_eq!(q.query_status().expect("status"), RunState::Running);

    // quit: the process exits cleanly, the connection is then gone.
    q.quit().expect("quit");
    let st = qemu.wait_exit(Duration::from_secs(10)).expect("wait");
    assert!(st.is_some_and(|s| s.success()), "{st:?}");
    let e = q.query_status().expect_err("gone");
    assert!(e.is_gone(), "{e:?}");

    // -S: prelaunch.
    let mut p2 =
        QemuProcess::launch(lab.spec("b", &ram, 64 * MIB).start_paused(true)).expect("launch -S");
    let (mut q2, _) = ready(&mut p2);
    assert_eq!(q2.query_status().expect("status"), RunState::Prelaunch);
}

#[test]
fn backing_checks_refuse_memfd_and_private_and_follow_ram_link() {
    let _s = serial();
    if !qemu_available() {
        return;
    }
    let lab = Lab::new("backing");

    // memfd: anonymous, cannot be handed to another QEMU by path.
    let mut p = QemuProcess::launch(
        lab.spec("memfd", Path::new("/unused"), 32 * MIB)
            .backend(RamBackend::Memfd),
    )
    .expect("launch memfd");
    let (mut q, _) = ready(&mut p);
    let m = q.query_memdev().expect("memdev");
    assert_eq!(m[0].kind, BackendKind::Memfd);
    let e = verify_memdev_backing(&m, "ram", &lab.sparse_file("x", 32 * MIB))
        .expect_err("memfd refused");
    assert!(matches!(e, RamLinkError::NotFileBacked { .. }), "{e}");
    drop(q);
    drop(p);

    // share=off: a private copy-on-write mapping; guest writes never reach the file.
    let priv_ram = lab.sparse_file("priv", 32 * MIB);
    let mut p = QemuProcess::launch(lab.spec("priv", &priv_ram, 32 * MIB).backend(
        RamBackend::File {
            path: priv_ram.clone(),
            share: false,
        },
    ))
    .expect("launch private");
    let (mut q, _) = ready(&mut p);
    let m = q.query_memdev().expect("memdev");
    assert_eq!(m[0].share, Some(false));
    let e = verify_memdev_backing(&m, "ram", &priv_ram).expect_err("private refused");
    assert!(matches!(e, RamLinkError::NotShared { .. }), "{e}");
    let e = verify_process_maps_file(p.pid(), &priv_ram).expect_err("not shared");
    assert!(
        matches!(
            e,
            RamLinkError::NotMappedShared {
                private_only: true,
                ..
            }
        ),
        "{e}"
    );
    drop(q);
    drop(p);

    // The libvirt flow: QEMU is given <domain dir>/pc.ram, which is our link to the pool.
    let pool = lab.pattern_file("pool-file", 64 * MIB);
    write_at(&pool, 60 * MIB, b"VMBEAM-POOL");
    let domdir = lab.path("1-guest");
    fs::create_dir(&domdir).expect("mkdir");
    let link_path = domdir.join(LIBVIRT_DEFAULT_RAM_FILE);
    let link = link_ram_path(&link_path, &pool, 64 * MIB).expect("link");
    let mut p = QemuProcess::launch(lab.spec("linked", &link_path, 64 * MIB)).expect("launch");
    let (mut q, _) = ready(&mut p);
    let m = q.query_memdev().expect("memdev");
    assert_eq!(m[0].mem_path.as_deref(), Some(link_path.as_path()));
    assert_eq!(
        verify_memdev_backing(&m, "ram", &pool).expect("resolves to pool"),
        link.file
    );
    verify_process_maps_file(p.pid(), &pool).expect("QEMU maps the pool file shared");
    // QEMU kept the existing content, and sees it as guest memory.
    assert_eq!(read_at(&pool, 60 * MIB, 11), b"VMBEAM-POOL");
    assert_eq!(
        guest_u64(&mut q, 60 * MIB),
        u64::from_le_bytes(*b"VMBEAM-P")
    );
    // A different pool file is told apart even with identical content.
    let copy = lab.path("pool-copy");
    fs::copy(&pool, &copy).expect("copy");
    let e = verify_memdev_backing(&m, "ram", &copy).expect_err("other file");
    assert!(matches!(e, RamLinkError::NotSameFile { .. }), "{e}");
    assert!(verify_process_maps_file(p.pid(), &copy).is_err());
}

fn a_step_that_fails() -> Result<(), String> {
    Err("something went wrong".to_owned())
}

/// Enables the guard, then fails: the guard must reset on the early return.
fn enable_then_fail(q: &mut QmpClient) -> Result<(), String> {
    let mut g = IgnoreSharedGuard::enable(q).map_err(|e| e.to_string())?;
    assert!(g
        .migrate_capability(X_IGNORE_SHARED)
        .map_err(|e| e.to_string())?);
    a_step_that_fails()?;
    g.reset().map_err(|e| e.to_string())?;
    Ok(())
}

#[test]
fn ignore_shared_guard_resets_on_every_path() {
    let _s = serial();
    if !qemu_available() {
        return;
    }
    let lab = Lab::new("guard");
    let ram = lab.sparse_file("ram", 32 * MIB);
    let mut p = QemuProcess::launch(lab.spec("a", &ram, 32 * MIB)).expect("launch");
    let (mut q, _) = ready(&mut p);

    // explicit reset, idempotent
    {
        let mut g = IgnoreSharedGuard::enable(&mut q).expect("enable");
        assert!(g.is_armed());
        assert!(g.migrate_capability(X_IGNORE_SHARED).expect("get"));
        assert_eq!(g.reset().expect("reset"), ResetOutcome::Reset);
        assert_eq!(g.reset().expect("again"), ResetOutcome::AlreadyReset);
        assert!(!g.is_armed());
    }
    assert!(!q.migrate_capability(X_IGNORE_SHARED).expect("get"));

    // drop
    {
        let g = IgnoreSharedGuard::enable(&mut q).expect("enable");
        drop(g);
    }
    assert!(!q.migrate_capability(X_IGNORE_SHARED).expect("get"));

    // early return through `?`
    assert!(enable_then_fail(&mut q).is_err());
    assert!(!q.migrate_capability(X_IGNORE_SHARED).expect("get"));

    // a panic unwinding through the guard
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _g = IgnoreSharedGuard::enable(&mut q).expect("enable");
        panic!("expected panic: unwinding through an armed guard");
    }));
    assert!(r.is_err());
    assert!(!q.migrate_capability(X_IGNORE_SHARED).expect("get"));

    // a left-over `on` is taken over and reset too
    q.set_capability(X_IGNORE_SHARED, true).expect("on");
    drop(IgnoreSharedGuard::enable(&mut q).expect("enable"));
    assert!(!q.migrate_capability(X_IGNORE_SHARED).expect("get"));

    // owned client; then the QEMU goes away: the reset is moot, not an error
    let mut g = IgnoreSharedGuard::enable(q).expect("enable owned");
    p.kill().expect("kill");
    assert_eq!(g.reset().expect("moot"), ResetOutcome::QemuGone);
    drop(g);

    // enabling on a dead QEMU is an error
    let mut p = QemuProcess::launch(lab.spec("b", &ram, 32 * MIB)).expect("launch");
    let (q, _) = ready(&mut p);
    p.kill().expect("kill");
    let e = IgnoreSharedGuard::enable(q).err().expect("dead");
    assert!(matches!(e, CapsError::QemuGone { .. }), "{e}");
}

/// A copying migration kept slow (private RAM is never skipped by x-ignore-shared, and the
/// bandwidth is capped) to observe what happens to capability changes while it is in flight.
#[test]
fn ignore_shared_reset_refused_while_migrating_then_done_after() {
    let _s = serial();
    if !qemu_available() {
        return;
    }
    let lab = Lab::new("inflight");
    let size = 64 * MIB;
    let src_ram = lab.pattern_file("src-ram", size);
    let dst_ram = lab.sparse_file("dst-ram", size);
    let private = |p: &Path| RamBackend::File {
        path: p.to_path_buf(),
        share: false,
    };
    let observer = lab.path("src-observer.qmp");
    let mut src = QemuProcess::launch(
        lab.spec("src", &src_ram, size)
            .backend(private(&src_ram))
            .extra_qmp(&observer),
    )
    .expect("src");
    let mut dst = QemuProcess::launch(
        lab.spec("dst", &dst_ram, size)
            .backend(private(&dst_ram))
            .incoming_defer(true),
    )
    .expect("dst");
    let (mut sq, _) = ready(&mut src);
    let (mut dq, _) = ready(&mut dst);
    let mut obs = src.connect_qmp_at(&observer, READY).expect("observer");

    let mig = lab.path("mig.sock");
    let uri = format!("unix:{}", mig.display());
    let mut dg = IgnoreSharedGuard::enable(&mut dq).expect("dst on");
    dg.migrate_incoming(&uri).expect("incoming");
    let mut sg = IgnoreSharedGuard::enable(&mut sq)
        .expect("src on")
        .with_drop_wait(Duration::from_secs(20));
    sg.set_migrate_parameters(serde_json::json!({"max-bandwidth": 16 * MIB}))
        .expect("bandwidth");
    sg.migrate(&uri).expect("migrate");
    let deadline = Instant::now() + Duration::from_secs(5);
    while sg.query_migrate().expect("qm").status() != MigrationStatus::Active {
        assert!(Instant::now() < deadline, "migration never became active");
        std::thread::sleep(Duration::from_millis(5));
    }
    // Incoming side reports its own status too.
    let d_status = dg.query_migrate().expect("dst qm").status();
    assert_eq!(d_status, MigrationStatus::Active);

    // QEMU's own answers (QEMU 7.2): the source refuses any capability change while
    // migrating; the destination accepts one even mid-stream (we re-set the value it already
    // has, so nothing changes) -- which is why the guard checks the status itself.
    match sg.set_capability(X_IGNORE_SHARED, true) {
        Err(QmpError::Qmp { class, desc, .. }) => {
            assert_eq!(class, "GenericError");
            assert_eq!(desc, "There's a migration process in progress");
        }
        other => panic!("source accepted a capability change mid-migration: {other:?}"),
    }
    let dst_accepts = dg.set_capability(X_IGNORE_SHARED, true).is_ok();
    println!(
        "OBSERVED destination accepts migrate-set-capabilities during incoming: {dst_accepts}"
    );
    // The destination's own check refuses once the stream loads.
    match set_ignore_shared_incoming(dg.client(), true) {
        Err(CapsError::MigrationActive { status, .. }) => {
            assert_eq!(status, MigrationStatus::Active)
        }
        other => panic!("destination armed mid-stream: {other:?}"),
    }

    // The guard refuses on both ends and stays armed.
    for (who, r) in [("src", sg.reset()), ("dst", dg.reset())] {
        match r {
            Err(CapsError::MigrationActive { status, .. }) => {
                assert_eq!(status, MigrationStatus::Active, "{who}")
            }
            other => panic!("{who}: reset mid-migration gave {other:?}"),
        }
    }
    assert!(sg.is_armed() && dg.is_armed());
    assert!(obs.migrate_capability(X_IGNORE_SHARED).expect("get"));

    // Dropping the source guard waits for the migration to end: cancel it 300 ms from now
    // through the second monitor.
    let canceller = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        obs.migrate_cancel().expect("cancel");
        obs
    });
    let t = Instant::now();
    drop(sg);
    let waited = t.elapsed();
    let mut obs = canceller.join().expect("canceller");
    assert!(waited >= Duration::from_millis(250), "{waited:?}");
    println!(
        "OBSERVED guard drop waited {:.0} ms for the cancel",
        ms(waited)
    );
    assert!(!obs.migrate_capability(X_IGNORE_SHARED).expect("get"));
    assert_eq!(
        obs.query_migrate().expect("qm").status(),
        MigrationStatus::Cancelled
    );
    // QEMU resumed the cancelled source by itself.
    assert_eq!(
        wait_state(&mut obs, RunState::Running, Duration::from_secs(5)),
        RunState::Running
    );

    // The destination's incoming migration failed: QEMU 7.2 exits. Its reset is moot.
    let st = dst.wait_exit(Duration::from_secs(10)).expect("wait");
    assert!(st.is_some_and(|s| !s.success()), "{st:?}");
    assert_eq!(dg.reset().expect("moot"), ResetOutcome::QemuGone);
    println!(
        "OBSERVED destination after a cancelled incoming migration: exited with {st:?}; log: {}",
        dst.log().trim()
    );
}

struct Measured {
    transferred: u64,
    total: u64,
    normal_pages: u64,
    qemu_total_ms: u64,
    downtime_ms: u64,
    setup_ms: u64,
    wall_completed: Duration,
    wall_dst_running: Duration,
}

/// Runs one migration between already started QEMUs (destination `-incoming defer`),
/// to completion; asserts both ends' final run states.
fn migrate(sq: &mut QmpClient, dq: &mut QmpClient, uri: &str) -> Measured {
    dq.migrate_incoming(uri).expect("migrate-incoming");
    assert_eq!(dq.query_status().expect("st"), RunState::InMigrate);
    let t0 = Instant::now();
    sq.migrate(uri).expect("migrate");
    let info = sq
        .wait_migration(Duration::from_secs(120), Duration::from_millis(1))
        .expect("wait");
    let wall_completed = t0.elapsed();
    assert_eq!(info.status(), MigrationStatus::Completed, "{info:?}");
    let st = wait_state(dq, RunState::Running, Duration::from_secs(10));
    let wall_dst_running = t0.elapsed();
    assert_eq!(st, RunState::Running, "destination did not run");
    // The source must stay paused for good (resuming it now would be a split brain).
    assert_eq!(sq.query_status().expect("st"), RunState::PostMigrate);
    let ram = info.ram.clone().unwrap_or_default();
    Measured {
        transferred: ram.transferred,
        total: ram.total,
        normal_pages: ram.normal,
        qemu_total_ms: info.total_time.unwrap_or(0),
        downtime_ms: info.downtime.unwrap_or(0),
        setup_ms: info.setup_time.unwrap_or(0),
        wall_completed,
        wall_dst_running,
    }
}

fn print_measure(what: &str, m: &Measured) {
    println!(
        "MEASURE {what}: transferred {} B ({:.2} MiB), ram.total {} B, normal pages {}, \
         QEMU total-time {} ms, downtime {} ms, setup-time {} ms, \
         migrate->completed (wall, 1 ms polling) {:.1} ms, migrate->destination running {:.1} ms",
        m.transferred,
        m.transferred as f64 / MIB as f64,
        m.total,
        m.normal_pages,
        m.qemu_total_ms,
        m.downtime_ms,
        m.setup_ms,
        ms(m.wall_completed),
        ms(m.wall_dst_running)
    );
}

#[test]
fn zero_copy_migration_between_two_qemus_sharing_one_file() {
    let _s = serial();
    if !qemu_available() {
        return;
    }
    let lab = Lab::new("zerocopy");
    // Non-zero content everywhere, so that "little was sent" cannot come from zero pages.
    let ram = lab.pattern_file("pool-ram", GUEST);
    let mut src = QemuProcess::launch(lab.spec("src", &ram, GUEST)).expect("src");
    let (mut sq, t_src) = ready(&mut src);
    // The running guest's memory *is* the file: a write into the file is seen by the guest.
    write_at(&ram, MARKER_ADDR, &0x5EED_0000_0000_0001u64.to_le_bytes());
    assert_eq!(guest_u64(&mut sq, MARKER_ADDR), 0x5EED_0000_0000_0001);

    let mut dst =
        QemuProcess::launch(lab.spec("dst", &ram, GUEST).incoming_defer(true)).expect("dst");
    let (mut dq, t_dst) = ready(&mut dst);
    println!(
        "MEASURE launch->QMP ready, 256 MiB: source {:.1} ms, destination (-incoming defer) {:.1} ms",
        ms(t_src),
        ms(t_dst)
    );
    verify_process_maps_file(dst.pid(), &ram).expect("destination maps the same file");

    let uri = format!("unix:{}", lab.path("mig.sock").display());
    let mut dg = IgnoreSharedGuard::enable(&mut dq).expect("dst on");
    let mut sg = IgnoreSharedGuard::enable(&mut sq).expect("src on");
    let m = migrate(&mut sg, &mut dg, &uri);
    print_measure("zero-copy 256 MiB", &m);
    assert!(m.transferred < MIB, "sent {} bytes", m.transferred);
    assert!(m.total < MIB, "ram.total {}", m.total);

    // Capabilities reset on both ends once the migration is over.
    assert_eq!(sg.reset().expect("src reset"), ResetOutcome::Reset);
    assert_eq!(dg.reset().expect("dst reset"), ResetOutcome::Reset);
    drop((sg, dg));
    assert!(!sq.migrate_capability(X_IGNORE_SHARED).expect("get"));
    assert!(!dq.migrate_capability(X_IGNORE_SHARED).expect("get"));

    // The destination's guest memory is the same file: it sees the marker the source's
    // guest had, and sees a write into the file made after the migration.
    assert_eq!(guest_u64(&mut dq, MARKER_ADDR), 0x5EED_0000_0000_0001);
    write_at(
        &ram,
        MARKER_ADDR + 8,
        &0x5EED_0000_0000_0002u64.to_le_bytes(),
    );
    assert_eq!(guest_u64(&mut dq, MARKER_ADDR + 8), 0x5EED_0000_0000_0002);
    // Events tell the run-state story on each end. QEMU stamps them with the host's wall
    // clock, so the two ends compare: the source's vCPUs stopped before the destination's
    // started (never both running: with one shared RAM that would be two CPUs writing it).
    let story = |q: &QmpClient| -> Vec<String> {
        q.events()
            .iter()
            .map(|e| match e.migration_status() {
                Some(s) => format!("MIGRATION({s})"),
                None => e.name.clone(),
            })
            .collect()
    };
    println!("OBSERVED source events: {:?}", story(&sq));
    println!("OBSERVED destination events: {:?}", story(&dq));
    let stamp = |q: &QmpClient, name: &str| {
        q.events()
            .iter()
            .rev()
            .find(|e| e.name == name)
            .and_then(|e| e.timestamp)
            .unwrap_or_else(|| panic!("no {name} event"))
    };
    let (stop, resume) = (stamp(&sq, "STOP"), stamp(&dq, "RESUME"));
    assert!(
        stop <= resume,
        "destination resumed before the source stopped"
    );
    println!(
        "MEASURE zero-copy switchover by event timestamps (source STOP -> destination RESUME): {:.3} ms",
        ms(resume - stop)
    );
    assert_eq!(sq.query_status().expect("st"), RunState::PostMigrate);
}

#[test]
fn copying_migration_transfers_all_ram() {
    let _s = serial();
    if !qemu_available() {
        return;
    }
    let lab = Lab::new("copying");
    let uri = format!("unix:{}", lab.path("mig.sock").display());

    // Source RAM full of non-zero pages. The destination gets a fresh file of its own
    // (invariant 2: only a zero-copy migration may share the source's file; a copying one
    // writing into the file the running source uses corrupts the guest).
    let ram = lab.pattern_file("src-ram", GUEST);
    write_at(&ram, MARKER_ADDR, b"COPIED!!");
    let dst_ram = lab.sparse_file("dst-ram", GUEST);
    let mut src = QemuProcess::launch(lab.spec("src", &ram, GUEST)).expect("src");
    let mut dst =
        QemuProcess::launch(lab.spec("dst", &dst_ram, GUEST).incoming_defer(true)).expect("dst");
    let (mut sq, _) = ready(&mut src);
    let (mut dq, _) = ready(&mut dst);
    let m = migrate(&mut sq, &mut dq, &uri);
    print_measure("copying 256 MiB, non-zero RAM", &m);
    assert!(
        m.transferred >= GUEST * 95 / 100,
        "sent only {}",
        m.transferred
    );
    assert!(m.normal_pages >= (GUEST / PAGE as u64) * 95 / 100);
    // The destination's own file now holds the copy.
    assert_eq!(read_at(&dst_ram, MARKER_ADDR, 8), b"COPIED!!");
    drop((sq, dq, src, dst));

    // Why the fill matters: the same copying migration of a fresh (zero) file sends almost
    // nothing, because QEMU sends zero pages as a flag only ("duplicate"), and firmware
    // touches only a little RAM.
    let zero = lab.sparse_file("zero-ram", GUEST);
    let zero_dst = lab.sparse_file("zero-dst", GUEST);
    let mut src = QemuProcess::launch(lab.spec("zsrc", &zero, GUEST)).expect("src");
    let mut dst =
        QemuProcess::launch(lab.spec("zdst", &zero_dst, GUEST).incoming_defer(true)).expect("dst");
    let (mut sq, _) = ready(&mut src);
    let (mut dq, _) = ready(&mut dst);
    let uri = format!("unix:{}", lab.path("mig2.sock").display());
    let m = migrate(&mut sq, &mut dq, &uri);
    print_measure("copying 256 MiB, zero RAM (firmware only)", &m);
    assert!(m.transferred < 16 * MIB, "sent {}", m.transferred);
}

fn expect_failed_migration(q: &mut QmpClient, uri: &str, src_on: bool, dst_on: bool) {
    q.migrate(uri).expect("migrate accepted");
    let info = q
        .wait_migration(Duration::from_secs(30), Duration::from_millis(1))
        .expect("wait");
    assert_eq!(info.status(), MigrationStatus::Failed, "{info:?}");
    println!(
        "OBSERVED mismatch src={src_on} dst={dst_on}: source error-desc {:?}",
        info.error_desc
    );
    // The source never stopped: it keeps running the guest.
    assert_eq!(q.query_status().expect("st"), RunState::Running);
}

#[test]
fn capability_mismatch_fails_cleanly_and_source_keeps_running() {
    let _s = serial();
    if !qemu_available() {
        return;
    }
    let lab = Lab::new("mismatch");
    let ram = lab.pattern_file("pool-ram", GUEST);
    let mut src = QemuProcess::launch(lab.spec("src", &ram, GUEST)).expect("src");
    let (mut sq, _) = ready(&mut src);

    for (i, (src_on, dst_on)) in [(true, false), (false, true)].into_iter().enumerate() {
        let mut dst = QemuProcess::launch(
            lab.spec(&format!("dst{i}"), &ram, GUEST)
                .incoming_defer(true),
        )
        .expect("dst");
        let (mut dq, _) = ready(&mut dst);
        let uri = format!("unix:{}", lab.path(&format!("mig{i}.sock")).display());
        // As the `started` hook does (`arm_destination`): listen first, then set the
        // capability through the destination's check. Not through `IgnoreSharedGuard`:
        // QEMU >= 10 reports a listening destination's incoming migration as `setup` in
        // query-migrate, which the guard (made for the source) takes for a migration in
        // flight; QEMU itself accepts the change there (it checks only the outgoing state).
        dq.migrate_incoming(&uri).expect("incoming");
        println!(
            "OBSERVED listening destination's status: {}",
            dq.query_migrate().expect("qm").status()
        );
        if dst_on {
            set_ignore_shared_incoming(&mut dq, true).expect("dst on");
            assert!(dq.migrate_capability(X_IGNORE_SHARED).expect("get"));
        }
        if src_on {
            let mut sg = IgnoreSharedGuard::enable(&mut sq).expect("src on");
            expect_failed_migration(&mut sg, &uri, src_on, dst_on);
            assert_eq!(
                sg.reset().expect("reset after failure"),
                ResetOutcome::Reset
            );
        } else {
            expect_failed_migration(&mut sq, &uri, src_on, dst_on);
        }
        assert!(!sq.migrate_capability(X_IGNORE_SHARED).expect("get"));
        // The destination refused the stream and exited (QEMU 7.2 exits on a failed
        // incoming migration).
        let st = dst.wait_exit(Duration::from_secs(10)).expect("wait");
        assert!(st.is_some_and(|s| !s.success()), "{st:?}");
        let log = dst.log();
        assert!(
            log.contains("Capability x-ignore-shared is"),
            "destination log: {log}"
        );
        println!(
            "OBSERVED destination log: {}",
            log.trim().replace('\n', " | ")
        );
    }

    // And a retry with both ends on succeeds.
    let mut dst =
        QemuProcess::launch(lab.spec("dst-retry", &ram, GUEST).incoming_defer(true)).expect("dst");
    let (mut dq, _) = ready(&mut dst);
    let mut dg = IgnoreSharedGuard::enable(&mut dq).expect("dst on");
    let mut sg = IgnoreSharedGuard::enable(&mut sq).expect("src on");
    let uri = format!("unix:{}", lab.path("mig-retry.sock").display());
    let m = migrate(&mut sg, &mut dg, &uri);
    assert!(m.transferred < MIB);
}

#[test]
fn destination_start_does_not_write_into_shared_ram() {
    let _s = serial();
    if !qemu_available() {
        return;
    }
    let lab = Lab::new("nowrite");
    let ram = lab.pattern_file("pool-ram", GUEST);
    let mut src = QemuProcess::launch(lab.spec("src", &ram, GUEST)).expect("src");
    let (mut sq, _) = ready(&mut src);
    // Let the firmware run a little, then pause the source: its RAM is now still.
    std::thread::sleep(Duration::from_millis(300));
    sq.stop().expect("stop");
    let snapshot = lab.path("snapshot");
    fs::copy(&ram, &snapshot).expect("snapshot");

    // 1. A destination that is launched, answers QMP, listens for the stream, and is killed.
    let mut launch_ms = Vec::new();
    for i in 0..3 {
        let mut dst = QemuProcess::launch(
            lab.spec(&format!("dst{i}"), &ram, GUEST)
                .incoming_defer(true),
        )
        .expect("dst");
        let (mut dq, t) = ready(&mut dst);
        launch_ms.push(ms(t));
        assert_eq!(dq.query_status().expect("st"), RunState::InMigrate);
        verify_process_maps_file(dst.pid(), &ram).expect("mapped");
        dq.migrate_incoming(&format!(
            "unix:{}",
            lab.path(&format!("in{i}.sock")).display()
        ))
        .expect("listen");
        std::thread::sleep(Duration::from_millis(200));
        if i == 2 {
            dq.quit().expect("quit"); // the graceful way out, too
            dst.wait_exit(Duration::from_secs(10)).expect("wait");
        } else {
            dst.kill().expect("kill");
        }
        let (n, first) = diff_pages(&snapshot, &ram);
        println!(
            "RESULT destination start #{i} ({}) changed {n} pages of the shared RAM {first:x?}",
            if i == 2 { "quit" } else { "SIGKILL" }
        );
        assert_eq!(
            n, 0,
            "the destination's start wrote into the shared RAM: {first:x?}"
        );
    }
    println!("MEASURE launch->QMP ready, destination -incoming defer, 256 MiB: {launch_ms:.1?} ms");

    // 2. Controls, each on its own copy of the snapshot, showing the comparison does see
    //    writes: a QEMU started normally (firmware runs) writes into its RAM file; one
    //    started with -S only (machine reset, no -incoming) is reported either way.
    for (name, paused) in [("normal", false), ("paused", true)] {
        let copy = lab.path(&format!("copy-{name}"));
        fs::copy(&snapshot, &copy).expect("copy");
        let mut p =
            QemuProcess::launch(lab.spec(name, &copy, GUEST).start_paused(paused)).expect("launch");
        let (mut q, _) = ready(&mut p);
        std::thread::sleep(Duration::from_millis(300));
        let _ = q.query_status();
        p.kill().expect("kill");
        let (n, first) = diff_pages(&snapshot, &copy);
        println!("RESULT control start without -incoming ({name}) changed {n} pages {first:x?}");
        if !paused {
            assert!(
                n > 0,
                "a normally started QEMU should have written into its RAM"
            );
        }
        fs::remove_file(&copy).expect("rm");
    }
}
