//! The fault matrix: a fault injected at a phase of a zero-copy migration of a dirtying
//! guest, on the real lab. Faults: kill -9 of the source's or the destination's QEMU,
//! libvirtd or vmbeamd, the cloud network cut (the source's link down), `virsh domjobabort`.
//! Phases: planning, proving co-location, ticket (source armed, record `handing-over`, no
//! libvirt job yet), Prepare (destination QEMU up, waiting for the stream), streaming
//! (the source QEMU's migration `active`), Confirm (the source QEMU gone, its `release` hook
//! running inside libvirt's Confirm), settling (libvirt's job returned, the file not yet
//! settled).
//!
//! Injection points come from the product's own phase events (the job's `Phase`, read with
//! `vmbeam status`), from QEMU's state (its witness monitor: `query-migrate`) and from the
//! processes present, never from sleeps; vmbeamd holds at a point while the test's hold file
//! is there (`dbus-service/src/fault.rs`), and the test removes it once the fault is in.
//!
//! After each fault the daemons are brought back as a service manager would
//! (`vmbeam-lab restart`), and then: the guest runs on exactly one side with its memory check
//! passing and its boot unchanged, or (only where its QEMU was killed) runs nowhere with its
//! memory file kept and `vmbeam status` saying so; no two QEMUs ever ran it (the split-brain
//! watch); the pool holds nothing but the guest's file and record; the failure message never
//! says the guest runs on the source when it does not; and a following zero-copy migration
//! succeeds.
//!
//! The suite runs one cell per fault (`suite_cells`); the whole matrix runs with
//! `VMBEAM_FAULT_MATRIX=full` (scripts/fault-matrix.sh), printing the cell-by-cell table.

use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use vmbeam_tests::*;

const GUEST: &str = "victim";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    KillSourceQemu,
    KillDestQemu,
    KillSourceLibvirtd,
    KillDestLibvirtd,
    KillSourceVmbeamd,
    KillDestVmbeamd,
    CutLink,
    Abort,
}

const FAULTS: [Fault; 8] = [
    Fault::KillSourceQemu,
    Fault::KillDestQemu,
    Fault::KillSourceLibvirtd,
    Fault::KillDestLibvirtd,
    Fault::KillSourceVmbeamd,
    Fault::KillDestVmbeamd,
    Fault::CutLink,
    Fault::Abort,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum At {
    Planning,
    Proving,
    Ticket,
    Prepare,
    Streaming,
    Confirm,
    Settling,
}

const PHASES: [At; 7] = [
    At::Planning,
    At::Proving,
    At::Ticket,
    At::Prepare,
    At::Streaming,
    At::Confirm,
    At::Settling,
];

/// A migration's two ends (cloud VM numbers).
#[derive(Debug, Clone, Copy)]
struct Move {
    from: u32,
    to: u32,
}

impl Move {
    fn src(self) -> String {
        format!("cvm{}", self.from)
    }
    fn dst(self) -> String {
        format!("cvm{}", self.to)
    }
}

impl At {
    /// The hold point, and whether the source (else the destination) holds there.
    fn hold(self) -> Option<(bool, &'static str)> {
        match self {
            At::Planning => Some((true, "planning")),
            At::Proving => Some((true, "proving")),
            At::Ticket => Some((true, "ticket")),
            At::Prepare => Some((false, "started")),
            At::Streaming => None,
            At::Confirm => Some((true, "release")),
            At::Settling => Some((true, "settling")),
        }
    }
}

fn hold_path(cvm: u32, point: &str) -> String {
    format!("/run/vmbeam-lab/cvm{cvm}/run/vmbeam/fault-hold-{point}-ms")
}

fn release_holds() {
    for cvm in 1..=2 {
        for point in [
            "planning", "proving", "ticket", "started", "release", "settling",
        ] {
            let _ = std::fs::remove_file(hold_path(cvm, point));
        }
    }
}

/// Removes every hold file, also when a cell panics.
struct Holds;

impl Drop for Holds {
    fn drop(&mut self) {
        release_holds();
    }
}

/// The phase of the guest's job on the source, from `vmbeam status` (the job's `Phase`
/// property).
fn job_phase(m: Move) -> Option<String> {
    let o = vmbeam_in(&m.src(), &["status"]);
    let out = String::from_utf8_lossy(&o.stdout);
    // The latest job of the guest (the daemon keeps finished jobs; they are listed by id).
    out.lines()
        .rev()
        .find(|l| l.contains(&format!(" {GUEST} -> ")))
        .and_then(|l| l.split_whitespace().find_map(|w| w.strip_prefix("phase=")))
        .map(str::to_owned)
}

#[track_caller]
fn wait(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("injection point not reached: {what}");
}

/// Waits until the migration reached `at` (holding there where a hold point exists).
/// `false` when the point passed before it could be seen (only streaming, which has no hold).
fn reach(at: At, m: Move) -> bool {
    let t = Duration::from_secs(60);
    match at {
        At::Planning => wait("planning", t, || {
            job_phase(m).as_deref() == Some("planning")
        }),
        At::Proving => wait("proving", t, || {
            job_phase(m).as_deref() == Some("proving-colocation")
        }),
        At::Ticket => wait("ticket", t, || {
            job_phase(m).as_deref() == Some("issuing-ticket")
                && pool_files().iter().any(|f| f.ends_with(".ram.owner"))
                && std::fs::read_dir("/run/vmbeam-lab/pool")
                    .into_iter()
                    .flatten()
                    .flatten()
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".ram.owner"))
                    .any(|e| {
                        std::fs::read_to_string(e.path()).is_ok_and(|t| t.contains("handing-over"))
                    })
        }),
        At::Prepare => wait("Prepare (destination QEMU up)", t, || {
            !qemu_pids(&m.dst()).is_empty()
        }),
        At::Confirm => wait("Confirm (source QEMU gone)", t, || {
            qemu_pids(&m.src()).is_empty() && !qemu_pids(&m.dst()).is_empty()
        }),
        At::Settling => wait("settling", t, || {
            job_phase(m).as_deref() == Some("confirming")
        }),
        At::Streaming => {
            // Held at Prepare first, then released: the stream starts at once. QEMU's own
            // monitors are taken (the split-brain watch holds the witness, vmbeamd the
            // private one), so libvirt's job statistics say when data flows.
            wait("Prepare", t, || !qemu_pids(&m.dst()).is_empty());
            release_holds();
            let deadline = Instant::now() + t;
            while Instant::now() < deadline {
                let o = virsh(&cvm_uri(m.from), &["domjobinfo", GUEST]);
                let text = String::from_utf8_lossy(&o.stdout);
                if !o.status.success() || text.contains("Job type:         None") {
                    // No job any more: the stream ended before it could be seen.
                    return false;
                }
                let processed = text
                    .lines()
                    .find(|l| l.starts_with("Data processed:"))
                    .and_then(|l| l.split_whitespace().nth(2))
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or(0.0);
                if processed > 0.0 {
                    return true;
                }
            }
            return false;
        }
    }
    true
}

fn inject(fault: Fault, m: Move) {
    match fault {
        Fault::KillSourceQemu | Fault::KillDestQemu => {
            let cvm = if fault == Fault::KillSourceQemu {
                m.src()
            } else {
                m.dst()
            };
            for pid in qemu_pids(&cvm) {
                let _ = nix_kill(pid);
            }
        }
        Fault::KillSourceLibvirtd => {
            lab_ok(&["crash", &m.src(), "libvirtd"]);
        }
        Fault::KillDestLibvirtd => {
            lab_ok(&["crash", &m.dst(), "libvirtd"]);
        }
        Fault::KillSourceVmbeamd => {
            lab_ok(&["crash", &m.src(), "vmbeamd"]);
        }
        Fault::KillDestVmbeamd => {
            lab_ok(&["crash", &m.dst(), "vmbeamd"]);
        }
        Fault::CutLink => {
            let ns = format!("vmbeam-{}", m.src());
            let o = Command::new("ip")
                .args(["-n", &ns, "link", "set", "eth0", "down"])
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        }
        Fault::Abort => {
            // No libvirt job before Prepare or after the stream: then there is nothing to
            // abort, which virsh says; the cell checks the migration goes on unharmed.
            let _ = virsh(&cvm_uri(m.from), &["domjobabort", GUEST]);
        }
    }
}

fn heal(fault: Fault, m: Move) {
    if fault == Fault::CutLink {
        let ns = format!("vmbeam-{}", m.src());
        let _ = Command::new("ip")
            .args(["-n", &ns, "link", "set", "eth0", "up"])
            .status();
    }
}

fn nix_kill(pid: u32) -> bool {
    Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success())
}

/// What a QEMU of the guest leaves on cloud VM `cvm`: VMBeam's private monitor socket and
/// libvirt's per-domain RAM directory (where vmbeamd links `pc.ram` into the pool).
fn qemu_residue_on(cvm: u32, uuid: &str) -> Vec<String> {
    let root = format!("/run/vmbeam-lab/cvm{cvm}");
    let mut v: Vec<String> = Vec::new();
    let sock = format!("{root}/run/vmbeam/qmp/{uuid}.sock");
    if std::fs::symlink_metadata(&sock).is_ok() {
        v.push(sock);
    }
    let ram = format!("{root}/var-lib-libvirt/qemu/ram/libvirt/qemu");
    for e in std::fs::read_dir(&ram).into_iter().flatten().flatten() {
        if e.file_name()
            .to_string_lossy()
            .ends_with(&format!("-{GUEST}"))
        {
            v.push(e.path().display().to_string());
        }
    }
    v
}

/// Whether libvirt on cloud VM `cvm` knows the guest at all (running or only defined).
fn defined_on(cvm: u32) -> bool {
    virsh(&cvm_uri(cvm), &["domstate", GUEST]).status.success()
}

fn active_on(cvm: u32) -> bool {
    let o = virsh(&cvm_uri(cvm), &["domstate", GUEST]);
    let s = String::from_utf8_lossy(&o.stdout);
    o.status.success() && (s.contains("running") || s.contains("paused"))
}

/// Whether `vmbeam status` on either cloud VM shows a pool file of `uuid` in doubt.
fn in_doubt(uuid: &str) -> bool {
    (1..=2).any(|c| {
        String::from_utf8_lossy(&vmbeam_in(&format!("cvm{c}"), &["status"]).stdout)
            .lines()
            .any(|l| l.contains(uuid) && l.contains("in doubt"))
    })
}

fn owner_records() -> Vec<(String, String)> {
    records_of("")
}

/// The guest's UUID (lab guests get a new one when made anew).
fn guest_uuid() -> String {
    vmbeam_lab::require_state()
        .unwrap()
        .guest(GUEST)
        .unwrap()
        .uuid
        .clone()
}

/// The pool's files of the domain with `uuid` (its pool files are `<uuid>.<gen>.ram`).
fn pool_of(uuid: &str) -> Vec<String> {
    pool_files()
        .into_iter()
        .filter(|f| f.starts_with(uuid))
        .collect()
}

/// Asserts the pool holds nothing but pool files and their records: no marker, proof,
/// rendezvous message or temporary file left behind.
#[track_caller]
fn assert_no_leftovers(context: &str) {
    let other: Vec<String> = pool_files()
        .into_iter()
        .filter(|f| !f.ends_with(".ram") && !f.ends_with(".ram.owner"))
        .collect();
    assert!(other.is_empty(), "left in the pool: {other:?}\n{context}");
}

/// (owner, state) of the owner records of files whose name starts with `prefix`.
fn records_of(prefix: &str) -> Vec<(String, String)> {
    std::fs::read_dir("/run/vmbeam-lab/pool")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.starts_with(prefix) && n.ends_with(".ram.owner")
        })
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter_map(|t| serde_json::from_str::<vmbeam_core::pool::OwnerRecord>(&t).ok())
        .map(|r| (r.owner.to_string(), r.state.to_string()))
        .collect()
}

/// One cell's outcome, for the table.
struct Outcome {
    fault: Fault,
    at: At,
    result: String,
    ended: String,
}

fn create_guest(on: u32) -> String {
    let on = format!("cvm{on}");
    lab_ok(&[
        "guest",
        "create",
        GUEST,
        "--memory",
        "256",
        "--dirty-rate",
        "1000",
        "--on",
        &on,
    ]);
    boot_of(GUEST)
}

fn boot_of(name: &str) -> String {
    let st = vmbeam_lab::require_state().unwrap();
    let (_, mut a) = vmbeam_lab::guest::agent(&st, name).unwrap();
    a.ping(Duration::from_secs(10)).unwrap()
}

/// Runs one cell on a fresh lab; panics (with the lab's logs kept) if an invariant breaks.
fn cell(fault: Fault, at: At) -> Outcome {
    let _lab = LabGuard::up(2, &[]);
    let boot = create_guest(1);
    faulted_migration(fault, at, Move { from: 1, to: 2 }, &boot).0
}

/// Migrates the guest (booted as `boot`, running on `m.from`) zero-copy with `fault` injected
/// at `at`, brings the daemons back, checks every invariant (panicking if one breaks), and
/// checks that a following zero-copy migration succeeds. Returns the outcome and where the
/// guest runs at the end with its boot id (a guest whose QEMU was killed is made anew).
fn faulted_migration(fault: Fault, at: At, m: Move, boot: &str) -> (Outcome, u32, String) {
    let _holds = Holds;
    let watch = SplitBrainWatch::start(GUEST, 2);
    match at.hold() {
        Some((true, point)) => std::fs::write(hold_path(m.from, point), "60000").unwrap(),
        Some((false, point)) => std::fs::write(hold_path(m.to, point), "60000").unwrap(),
        None => std::fs::write(hold_path(m.to, "started"), "60000").unwrap(),
    }
    if at == At::Streaming {
        // A zero-copy stream (device state only) lasts tens of milliseconds: slowed to
        // 1 MiB/s it lasts about a second, long enough to be seen.
        let o = virsh(&cvm_uri(m.from), &["migrate-setspeed", GUEST, "1"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(migrate(m.from, m.to, GUEST, &["--zero-copy"]));
    });
    let reached = reach(at, m);
    if reached {
        inject(fault, m);
    }
    release_holds();
    let o = rx
        .recv_timeout(Duration::from_secs(240))
        .expect("the migrate command must end");
    heal(fault, m);
    let restarted = lab_ok(&["restart"]);
    if at == At::Streaming {
        for c in [m.from, m.to] {
            let _ = virsh(&cvm_uri(c), &["migrate-setspeed", GUEST, "0"]);
        }
    }
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    let result = if !reached {
        "point passed unseen".to_string()
    } else if o.status.success() {
        "migrated".to_string()
    } else {
        stderr.split_whitespace().collect::<Vec<_>>().join(" ")
    };
    // Recovery settles what it can observe, and says what it holds in doubt.
    let uuid = guest_uuid();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline
        && records_of(&uuid)
            .iter()
            .any(|(_, state)| state == "handing-over")
        && !in_doubt(&uuid)
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    let report = watch.finish();
    let on: Vec<u32> = (1..=2).filter(|&c| active_on(c)).collect();
    let qemus: Vec<usize> = (1..=2)
        .map(|c| qemu_pids(&format!("cvm{c}")).len())
        .collect();
    let context = format!(
        "{fault:?} at {at:?} ({m:?}): migrate said {result:?}; restarted {restarted:?}; active on {on:?}; QEMUs {qemus:?}; records {:?}; pool {:?}; watch {} samples",
        owner_records(),
        pool_files(),
        report.samples
    );
    assert!(on.len() <= 1, "{context}");
    assert!(qemus.iter().sum::<usize>() <= 1, "{context}");
    let (ended, now_on, now_boot) = match on.first() {
        Some(&c) => {
            let cvm = format!("cvm{c}");
            if !o.status.success() && c == m.to {
                assert!(
                    !stderr.contains("keeps running on the source"),
                    "the message must say where the guest is: {context}"
                );
            }
            let check = lab_ok(&["guest", "check", GUEST]);
            assert!(
                check.starts_with(&format!("PASS {GUEST} on {cvm}")),
                "{check}\n{context}"
            );
            assert_eq!(boot_of(GUEST), boot, "rebooted: {context}");
            assert_eq!(
                records_of(&uuid),
                vec![(cvm.clone(), "active".to_string())],
                "{context}"
            );
            assert_eq!(
                pool_of(&uuid).len(),
                2,
                "one file and its record: {context}"
            );
            assert_no_leftovers(&context);
            // The migrations are --persistent --undefinesource: the guest is defined where it
            // runs and nowhere else (no domain left behind on the other side).
            assert!(
                !defined_on(3 - c),
                "a domain left on cvm{}: {context}",
                3 - c
            );
            let left = qemu_residue_on(3 - c, &uuid);
            assert!(left.is_empty(), "left on cvm{}: {left:?}\n{context}", 3 - c);
            (format!("runs on {cvm}, intact"), c, boot.to_string())
        }
        None => {
            assert!(
                matches!(fault, Fault::KillSourceQemu | Fault::KillDestQemu),
                "the guest runs nowhere although no QEMU was killed: {context}"
            );
            assert!(
                !stderr.contains("keeps running on the source"),
                "the message must not say the guest runs: {context}"
            );
            // Either the hand-over is in doubt, its memory file kept and `vmbeam status`
            // saying what it waits for, or the owner released a guest that died on it
            // (nothing is left: a killed QEMU's memory cannot be resumed without its device
            // state).
            let ram = pool_of(&uuid)
                .iter()
                .filter(|f| f.ends_with(".ram"))
                .count();
            for c in 1..=2 {
                let left = qemu_residue_on(c, &uuid);
                assert!(left.is_empty(), "left on cvm{c}: {left:?}\n{context}");
            }
            assert_no_leftovers(&context);
            let ended = if ram == 1 {
                assert!(
                    in_doubt(&uuid) || records_of(&uuid).iter().all(|r| r.1 == "active"),
                    "a kept memory file must be explained: {context}"
                );
                "stopped (its QEMU was killed); memory file kept, in doubt".to_string()
            } else {
                assert_eq!(pool_of(&uuid), Vec::<String>::new(), "{context}");
                "stopped (its QEMU was killed); released by its owner".to_string()
            };
            // The guest is made anew where it was.
            lab_ok(&["guest", "destroy", GUEST]);
            let boot = create_guest(m.from);
            (ended, m.from, boot)
        }
    };
    // And a following zero-copy migration succeeds.
    let next = 3 - now_on;
    let n = migrate(now_on, next, GUEST, &["--zero-copy"]);
    assert!(
        n.status.success(),
        "the next migration failed: {}\n{context}",
        String::from_utf8_lossy(&n.stderr)
    );
    let check = lab_ok(&["guest", "check", GUEST]);
    assert!(
        check.starts_with(&format!("PASS {GUEST} on cvm{next}")),
        "{check}\n{context}"
    );
    (
        Outcome {
            fault,
            at,
            result,
            ended: format!("{ended}; next migration ok"),
        },
        next,
        now_boot,
    )
}

fn print_table(rows: &[Outcome]) {
    println!("| fault | phase | the migrate command said | where the guest ended |");
    println!("|---|---|---|---|");
    for r in rows {
        println!(
            "| {:?} | {:?} | {} | {} |",
            r.fault,
            r.at,
            r.result.replace('|', "/"),
            r.ended
        );
    }
}

/// One cell per fault: the phase most likely to break for it.
fn suite_cells() -> Vec<(Fault, At)> {
    vec![
        (Fault::KillSourceQemu, At::Prepare),
        (Fault::KillDestQemu, At::Confirm),
        (Fault::KillSourceLibvirtd, At::Confirm),
        (Fault::KillDestLibvirtd, At::Confirm),
        (Fault::KillSourceVmbeamd, At::Ticket),
        (Fault::KillDestVmbeamd, At::Prepare),
        (Fault::CutLink, At::Prepare),
        (Fault::Abort, At::Prepare),
    ]
}

#[test]
fn fault_matrix() {
    // One named cell (VMBEAM_FAULT_CELL=Fault@Phase) is looked up in the whole matrix.
    let full = std::env::var("VMBEAM_FAULT_MATRIX").is_ok_and(|v| v == "full")
        || std::env::var("VMBEAM_FAULT_CELL").is_ok();
    let cells: Vec<(Fault, At)> = if full {
        FAULTS
            .iter()
            .flat_map(|&f| PHASES.iter().map(move |&a| (f, a)))
            .collect()
    } else {
        suite_cells()
    };
    let only = std::env::var("VMBEAM_FAULT_CELL").ok();
    let mut rows = Vec::new();
    let mut failed = Vec::new();
    for (f, a) in cells {
        if only.as_deref().is_some_and(|o| o != format!("{f:?}@{a:?}")) {
            continue;
        }
        eprintln!("=== cell {f:?} at {a:?}");
        // Every cell runs even when one fails (its lab is taken down as it unwinds).
        match std::panic::catch_unwind(|| cell(f, a)) {
            Ok(row) => rows.push(row),
            Err(e) => {
                let why = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                failed.push(format!("{f:?} at {a:?}"));
                rows.push(Outcome {
                    fault: f,
                    at: a,
                    result: "FAILED".into(),
                    ended: why.lines().next().unwrap_or("").to_string(),
                });
            }
        }
        print_table(&rows);
    }
    assert!(
        !rows.is_empty(),
        "no cell matched VMBEAM_FAULT_CELL={only:?}"
    );
    assert!(failed.is_empty(), "failed cells: {failed:?}");
}

/// A daemon's resident memory (KiB) and open descriptors, by the PID of the `vmbeam-lab
/// reap` process it runs under (the daemon is its one child).
fn usage_under(reaper: u32) -> Option<(u64, usize)> {
    let pid = *vmbeam_lab::sys::children(reaper).first()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
    Some((rss, fds))
}

/// (cloud VM, daemon, RSS KiB, descriptors) of every lab vmbeamd and libvirtd.
fn daemon_usage() -> Vec<(String, &'static str, u64, usize)> {
    let st = vmbeam_lab::require_state().unwrap();
    let mut v = Vec::new();
    for c in &st.cloud_vms {
        for (what, reaper) in [("vmbeamd", c.vmbeamd_pid), ("libvirtd", c.libvirtd_pid)] {
            if let Some((rss, fds)) = usage_under(reaper) {
                v.push((c.name.clone(), what, rss, fds));
            }
        }
    }
    v
}

/// xorshift64*: the soak's choice of fault and phase, reproducible from its seed.
fn next_random(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The soak benchmark (scripts/soak.sh; not part of the suite): `VMBEAM_SOAK_MIGRATIONS`
/// (300) zero-copy migrations of a dirtying guest back and forth, a fault of the matrix at a
/// random phase every `VMBEAM_SOAK_FAULT_EVERY` (10) of them (seed `VMBEAM_SOAK_SEED`), every
/// invariant checked after each fault and the memory after every tenth migration. Reports
/// migrations done, faults injected, guests lost (the goal: none; an invariant broken stops
/// the run), files left, and each daemon's memory and descriptors before and after.
#[test]
#[ignore = "the soak benchmark: scripts/soak.sh"]
fn soak() {
    let total = env_number("VMBEAM_SOAK_MIGRATIONS", 300);
    let every = env_number("VMBEAM_SOAK_FAULT_EVERY", 10).max(2);
    let seed = env_number(
        "VMBEAM_SOAK_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(1),
    )
    .max(1);
    println!("soak: {total} migrations, a fault every {every}, seed {seed}");
    let _lab = LabGuard::up(2, &[]);
    let mut rng = seed;
    let mut boot = create_guest(1);
    let mut on = 1u32;
    let before = daemon_usage();
    let started = Instant::now();
    let (mut done, mut faults, mut remade) = (0u64, Vec::new(), 0u64);
    while done < total {
        if (done + 1) % every == 0 {
            let f = FAULTS[(next_random(&mut rng) % FAULTS.len() as u64) as usize];
            let a = PHASES[(next_random(&mut rng) % PHASES.len() as u64) as usize];
            let uuid = guest_uuid();
            let (o, now_on, now_boot) = faulted_migration(
                f,
                a,
                Move {
                    from: on,
                    to: 3 - on,
                },
                &boot,
            );
            if guest_uuid() != uuid {
                remade += 1;
            }
            println!(
                "soak: after {done} migrations: {:?} at {:?}: {} / {}",
                o.fault, o.at, o.result, o.ended
            );
            faults.push((f, a));
            on = now_on;
            boot = now_boot;
            done += 2;
        } else {
            let m = migrate(on, 3 - on, GUEST, &["--zero-copy"]);
            assert!(
                m.status.success(),
                "migration {done} failed: {}",
                String::from_utf8_lossy(&m.stderr)
            );
            on = 3 - on;
            done += 1;
            if done % 10 == 0 {
                let check = lab_ok(&["guest", "check", GUEST]);
                assert!(
                    check.starts_with(&format!("PASS {GUEST} on cvm{on}")),
                    "{check}"
                );
                assert_eq!(boot_of(GUEST), boot, "rebooted after {done} migrations");
            }
        }
    }
    let after = daemon_usage();
    let in_doubt_files = records_of("")
        .iter()
        .filter(|r| r.1 == "handing-over")
        .count();
    println!(
        "\n## Soak ({} s, seed {seed})\n",
        started.elapsed().as_secs()
    );
    println!("| | |\n|---|---|");
    println!("| migrations done | {done} |");
    println!("| faults injected | {} |", faults.len());
    println!("| guests lost (an invariant broken) | 0 |");
    println!("| guests made anew after their QEMU was killed | {remade} |");
    println!("| memory files kept in doubt | {in_doubt_files} |");
    println!("| other files left in the pool | 0 (checked after every fault) |");
    println!("\n| cloud VM | daemon | RSS KiB before | after | descriptors before | after |");
    println!("|---|---|---|---|---|---|");
    for (cvm, what, rss, fds) in &after {
        let b = before.iter().find(|b| &b.0 == cvm && b.1 == *what);
        println!(
            "| {cvm} | {what} | {} | {rss} | {} | {fds} |",
            b.map(|b| b.2.to_string()).unwrap_or("-".into()),
            b.map(|b| b.3.to_string()).unwrap_or("-".into()),
        );
    }
    println!("\n(a daemon killed by a fault was restarted: its \"before\" is the old process's)");
    let mut kinds: Vec<String> = faults.iter().map(|(f, a)| format!("{f:?}@{a:?}")).collect();
    kinds.sort();
    println!("\nfaults: {}", kinds.join(" "));
}
