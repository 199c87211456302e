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

use std::process::{Command, Output};
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

impl At {
    /// The hold point and the cloud VM that holds there.
    fn hold(self) -> Option<(u32, &'static str)> {
        match self {
            At::Planning => Some((1, "planning")),
            At::Proving => Some((1, "proving")),
            At::Ticket => Some((1, "ticket")),
            At::Prepare => Some((2, "started")),
            At::Streaming => None,
            At::Confirm => Some((1, "release")),
            At::Settling => Some((1, "settling")),
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

fn virsh(uri: &str, args: &[&str]) -> Output {
    Command::new("virsh")
        .arg("-c")
        .arg(uri)
        .args(args)
        .output()
        .expect("virsh")
}

/// The phase of the guest's job on cvm1, from `vmbeam status` (the job's `Phase` property).
fn job_phase() -> Option<String> {
    let o = vmbeam_in("cvm1", &["status"]);
    let out = String::from_utf8_lossy(&o.stdout);
    out.lines()
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

/// The source QEMU's migration status through its witness monitor.
fn source_migration_status(client: &mut Option<vmbeam_qemu::qmp::QmpClient>) -> Option<String> {
    if client.is_none() {
        *client = vmbeam_qemu::qmp::QmpClient::connect_default(witness_socket(1, GUEST)).ok();
    }
    let q = client.as_mut()?;
    match q.query_migrate() {
        Ok(m) => Some(m.status().as_str().to_owned()),
        Err(_) => {
            *client = None;
            None
        }
    }
}

/// Waits until the migration reached `at` (holding there where a hold point exists).
/// `false` when the point passed before it could be seen (only streaming, which has no hold).
fn reach(at: At) -> bool {
    let t = Duration::from_secs(60);
    match at {
        At::Planning => wait("planning", t, || job_phase().as_deref() == Some("planning")),
        At::Proving => wait("proving", t, || {
            job_phase().as_deref() == Some("proving-colocation")
        }),
        At::Ticket => wait("ticket", t, || {
            job_phase().as_deref() == Some("issuing-ticket")
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
            !qemu_pids("cvm2").is_empty()
        }),
        At::Confirm => wait("Confirm (source QEMU gone)", t, || {
            qemu_pids("cvm1").is_empty() && !qemu_pids("cvm2").is_empty()
        }),
        At::Settling => wait("settling", t, || {
            job_phase().as_deref() == Some("confirming")
        }),
        At::Streaming => {
            // Held at Prepare first, then released: the stream starts at once.
            wait("Prepare", t, || !qemu_pids("cvm2").is_empty());
            let mut client = None;
            let _ = source_migration_status(&mut client);
            release_holds();
            let deadline = Instant::now() + t;
            while Instant::now() < deadline {
                match source_migration_status(&mut client).as_deref() {
                    // The stream is on (RAM, then device state, then the switchover).
                    Some("active" | "device" | "pre-switchover") => return true,
                    Some("completed") => return false,
                    _ => std::hint::spin_loop(),
                }
            }
            return false;
        }
    }
    true
}

fn inject(fault: Fault) {
    match fault {
        Fault::KillSourceQemu | Fault::KillDestQemu => {
            let cvm = if fault == Fault::KillSourceQemu {
                "cvm1"
            } else {
                "cvm2"
            };
            for pid in qemu_pids(cvm) {
                let _ = nix_kill(pid);
            }
        }
        Fault::KillSourceLibvirtd => {
            lab_ok(&["crash", "cvm1", "libvirtd"]);
        }
        Fault::KillDestLibvirtd => {
            lab_ok(&["crash", "cvm2", "libvirtd"]);
        }
        Fault::KillSourceVmbeamd => {
            lab_ok(&["crash", "cvm1", "vmbeamd"]);
        }
        Fault::KillDestVmbeamd => {
            lab_ok(&["crash", "cvm2", "vmbeamd"]);
        }
        Fault::CutLink => {
            let o = Command::new("ip")
                .args(["-n", "vmbeam-cvm1", "link", "set", "eth0", "down"])
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        }
        Fault::Abort => {
            // No libvirt job before Prepare or after the stream: then there is nothing to
            // abort, which virsh says; the cell checks the migration goes on unharmed.
            let _ = virsh(&cvm_uri(1), &["domjobabort", GUEST]);
        }
    }
}

fn heal(fault: Fault) {
    if fault == Fault::CutLink {
        let _ = Command::new("ip")
            .args(["-n", "vmbeam-cvm1", "link", "set", "eth0", "up"])
            .status();
    }
}

fn nix_kill(pid: u32) -> bool {
    Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success())
}

fn active_on(cvm: u32) -> bool {
    let o = virsh(&cvm_uri(cvm), &["domstate", GUEST]);
    let s = String::from_utf8_lossy(&o.stdout);
    o.status.success() && (s.contains("running") || s.contains("paused"))
}

/// Whether `vmbeam status` on either cloud VM mentions `what`.
fn status_says(what: &str) -> bool {
    (1..=2).any(|c| {
        String::from_utf8_lossy(&vmbeam_in(&format!("cvm{c}"), &["status"]).stdout).contains(what)
    })
}

fn owner_records() -> Vec<(String, String)> {
    std::fs::read_dir("/run/vmbeam-lab/pool")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".ram.owner"))
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

/// Runs one cell on a fresh lab; panics (with the lab's logs kept) if an invariant breaks.
fn cell(fault: Fault, at: At) -> Outcome {
    let _lab = LabGuard::up(2, &[]);
    let _holds = Holds;
    lab_ok(&[
        "guest",
        "create",
        GUEST,
        "--memory",
        "256",
        "--dirty-rate",
        "1000",
        "--on",
        "cvm1",
    ]);
    let boot = {
        let st = vmbeam_lab::require_state().unwrap();
        let (_, mut a) = vmbeam_lab::guest::agent(&st, GUEST).unwrap();
        a.ping(Duration::from_secs(10)).unwrap()
    };
    let watch = SplitBrainWatch::start(GUEST, 2);
    if let Some((cvm, point)) = at.hold() {
        std::fs::write(hold_path(cvm, point), "60000").unwrap();
    } else {
        std::fs::write(hold_path(2, "started"), "60000").unwrap();
    }
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(migrate(1, 2, GUEST, &["--zero-copy"]));
    });
    let reached = reach(at);
    if reached {
        inject(fault);
    }
    release_holds();
    let o = rx
        .recv_timeout(Duration::from_secs(240))
        .expect("the migrate command must end");
    heal(fault);
    let restarted = lab_ok(&["restart"]);
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    let result = if !reached {
        "point passed unseen".to_string()
    } else if o.status.success() {
        "migrated".to_string()
    } else {
        stderr.split_whitespace().collect::<Vec<_>>().join(" ")
    };
    // Recovery settles what it can observe, and says what it holds in doubt.
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline
        && owner_records()
            .iter()
            .any(|(_, state)| state == "handing-over")
        && !status_says("in doubt")
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    let report = watch.finish();
    let on: Vec<u32> = (1..=2).filter(|&c| active_on(c)).collect();
    let qemus: Vec<usize> = (1..=2)
        .map(|c| qemu_pids(&format!("cvm{c}")).len())
        .collect();
    let context = format!(
        "{fault:?} at {at:?}: migrate said {result:?}; restarted {restarted:?}; active on {on:?}; QEMUs {qemus:?}; records {:?}; pool {:?}; watch {} samples",
        owner_records(),
        pool_files(),
        report.samples
    );
    assert!(on.len() <= 1, "{context}");
    assert!(qemus.iter().sum::<usize>() <= 1, "{context}");
    let ended = match on.first() {
        Some(&c) => {
            let cvm = format!("cvm{c}");
            if !o.status.success() && c == 2 {
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
            let st = vmbeam_lab::require_state().unwrap();
            let (_, mut a) = vmbeam_lab::guest::agent(&st, GUEST).unwrap();
            assert_eq!(
                a.ping(Duration::from_secs(10)).unwrap(),
                boot,
                "rebooted: {context}"
            );
            assert_eq!(
                owner_records(),
                vec![(cvm.clone(), "active".to_string())],
                "{context}"
            );
            assert_pool_clean(1);
            // And a following zero-copy migration succeeds.
            let back = 3 - c;
            let m = migrate(c, back, GUEST, &["--zero-copy"]);
            assert!(
                m.status.success(),
                "the next migration failed: {}\n{context}",
                String::from_utf8_lossy(&m.stderr)
            );
            let check = lab_ok(&["guest", "check", GUEST]);
            assert!(
                check.starts_with(&format!("PASS {GUEST} on cvm{back}")),
                "{check}\n{context}"
            );
            format!("runs on {cvm}, intact; next migration ok")
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
            let ram = pool_files().iter().filter(|f| f.ends_with(".ram")).count();
            let ended = if ram == 1 {
                assert!(
                    status_says("in doubt") || owner_records().iter().all(|r| r.1 == "active"),
                    "a kept memory file must be explained: {context}"
                );
                "stopped (its QEMU was killed); memory file kept, in doubt".to_string()
            } else {
                assert_eq!(pool_files(), Vec::<String>::new(), "{context}");
                "stopped (its QEMU was killed); released by its owner".to_string()
            };
            // And a following zero-copy migration (of a new guest) succeeds.
            for c in 1..=2 {
                let _ = virsh(&cvm_uri(c), &["destroy", GUEST]);
                let _ = virsh(&cvm_uri(c), &["undefine", GUEST]);
            }
            lab_ok(&["guest", "create", "next", "--memory", "160", "--on", "cvm1"]);
            let m = migrate(1, 2, "next", &["--zero-copy"]);
            assert!(
                m.status.success(),
                "the next migration failed: {}\n{context}",
                String::from_utf8_lossy(&m.stderr)
            );
            let check = lab_ok(&["guest", "check", "next"]);
            assert!(check.starts_with("PASS next on cvm2"), "{check}\n{context}");
            ended
        }
    };
    Outcome {
        fault,
        at,
        result,
        ended,
    }
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
    let full = std::env::var("VMBEAM_FAULT_MATRIX").is_ok_and(|v| v == "full");
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
