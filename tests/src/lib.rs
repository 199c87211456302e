//! Shared helpers for VMBeam's end-to-end tests: they drive the real `vmbeam` binary (inside
//! the cloud VMs) against a real lab that the `vmbeam-lab` binary runs (namespaces,
//! libvirtd, QEMU, the guest agent), and clean up on every path.

use std::path::PathBuf;
use std::process::{Command, Output};

/// The workspace's target directory for the running test's profile (`target/<profile>`).
pub fn target_dir() -> PathBuf {
    // The test binary lives in target/<profile>/deps/.
    let exe = std::env::current_exe().expect("test exe");
    exe.parent()
        .and_then(|p| p.parent())
        .expect("target dir")
        .to_path_buf()
}

/// Path to a binary built in the target directory (`vmbeam`, `vmbeam-lab`, ...).
fn built(name: &str) -> PathBuf {
    let p = target_dir().join(name);
    assert!(
        p.is_file(),
        "{} is not built: run scripts/test.sh (it builds the binaries and the static guest agent first)",
        p.display()
    );
    p
}

/// Path to the built `vmbeam` binary (the product's command line).
pub fn vmbeam_bin() -> PathBuf {
    built("vmbeam")
}

/// Path to the built `vmbeam-lab` binary (the lab and the bench).
pub fn vmbeam_lab_bin() -> PathBuf {
    built("vmbeam-lab")
}

/// Runs `vmbeam ARGS` on the host, returning its output.
pub fn vmbeam(args: &[&str]) -> Output {
    Command::new(vmbeam_bin())
        .args(args)
        .output()
        .expect("run vmbeam")
}

/// Runs `virsh -c URI ARGS` on the host, returning its output.
pub fn virsh(uri: &str, args: &[&str]) -> Output {
    Command::new("virsh")
        .arg("-c")
        .arg(uri)
        .args(args)
        .output()
        .expect("virsh")
}

/// Runs `vmbeam-lab ARGS`, returning its output.
pub fn lab(args: &[&str]) -> Output {
    Command::new(vmbeam_lab_bin())
        .args(args)
        .output()
        .expect("run vmbeam-lab")
}

/// Asserts `o` (of `program ARGS`) succeeded, returning stdout.
#[track_caller]
fn expect_ok(program: &str, args: &[&str], o: Output) -> String {
    assert!(
        o.status.success(),
        "{program} {} failed ({}):\nstdout: {}\nstderr: {}",
        args.join(" "),
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Asserts `o` (of `program ARGS`) failed with a one-line message `program: ...`; returns
/// (code, stderr).
#[track_caller]
fn expect_err(program: &str, args: &[&str], o: Output) -> (i32, String) {
    let err = String::from_utf8_lossy(&o.stderr).trim().to_string();
    assert!(
        !o.status.success(),
        "{program} {} should have failed; stdout: {}",
        args.join(" "),
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(
        err.starts_with(&format!("{program}: ")),
        "error should be one clear line, got: {err}"
    );
    assert_eq!(
        err.lines().count(),
        1,
        "error should be one line, got: {err}"
    );
    (o.status.code().unwrap_or(-1), err)
}

/// Runs `vmbeam ARGS` and asserts success, returning stdout.
#[track_caller]
pub fn vmbeam_ok(args: &[&str]) -> String {
    expect_ok("vmbeam", args, vmbeam(args))
}

/// Runs `vmbeam ARGS` and asserts failure with a one-line message; returns (code, stderr).
#[track_caller]
pub fn vmbeam_err(args: &[&str]) -> (i32, String) {
    expect_err("vmbeam", args, vmbeam(args))
}

/// Runs `vmbeam-lab ARGS` and asserts success, returning stdout.
#[track_caller]
pub fn lab_ok(args: &[&str]) -> String {
    expect_ok("vmbeam-lab", args, lab(args))
}

/// Runs `vmbeam-lab ARGS` and asserts failure with a one-line message; returns (code, stderr).
#[track_caller]
pub fn lab_err(args: &[&str]) -> (i32, String) {
    expect_err("vmbeam-lab", args, lab(args))
}

/// A lab for one test: `up` on creation, `down` on drop (also when the test panics).
pub struct LabGuard;

impl LabGuard {
    /// Brings up a lab with `n` cloud VMs (after taking down any leftover from a failed run).
    pub fn up(n: u32, extra: &[&str]) -> LabGuard {
        assert!(
            nix_is_root(),
            "the end-to-end tests need root (they create namespaces and daemons)"
        );
        // Expected look-up misses are errors we handle, not output.
        virt::error::clear_error_callback();
        if std::path::Path::new("/run/vmbeam-lab/state.json").exists() {
            let _ = lab(&["down"]);
        }
        let n = n.to_string();
        let mut args = vec!["up", "--cloud-vms", n.as_str()];
        args.extend_from_slice(extra);
        lab_ok(&args);
        LabGuard
    }
}

/// Where a failed test's lab logs are kept: `target/test-logs/lab-<test>-<unix time>/`.
fn keep_lab_logs() {
    let test = std::thread::current()
        .name()
        .unwrap_or("test")
        .replace("::", "-");
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let dest = target_dir()
        .parent()
        .map(|t| t.join("test-logs").join(format!("lab-{test}-{secs}")))
        .expect("target dir");
    let Ok(rd) = std::fs::read_dir("/run/vmbeam-lab") else {
        return;
    };
    if let Err(e) = std::fs::create_dir_all(&dest) {
        eprintln!("cannot keep the lab logs in {}: {e}", dest.display());
        return;
    }
    for cvm in rd.flatten() {
        let logs = cvm.path().join("var-log-libvirt");
        if !logs.is_dir() {
            continue;
        }
        let to = dest.join(cvm.file_name());
        let _ = Command::new("cp").arg("-r").arg(&logs).arg(&to).status();
    }
    eprintln!("lab logs of the failed test kept in {}", dest.display());
}

impl Drop for LabGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // Before `down` removes them: the daemons' and QEMUs' own account of the failure.
            keep_lab_logs();
        }
        let o = lab(&["down"]);
        if !o.status.success() && !std::thread::panicking() {
            panic!("lab down failed: {}", String::from_utf8_lossy(&o.stderr));
        }
    }
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// What the lab could leave behind on the host: its namespaces, mounts, links and files, and
/// its processes. Compared before `up` and after `down`. Only what the lab itself names: the
/// machine is shared, and other software (another job's namespaces, a build whose command line
/// mentions `vmbeam-lab`, files in `/dev/shm`) comes and goes meanwhile.
#[derive(Debug, PartialEq, Eq)]
pub struct Residue {
    pub netns: Vec<String>,
    pub mounts: Vec<String>,
    pub links: Vec<String>,
    pub files: Vec<String>,
    pub processes: Vec<String>,
}

fn lines_of(cmd: &str, args: &[&str]) -> Vec<String> {
    let o = Command::new(cmd).args(args).output().expect("run");
    let mut v: Vec<String> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(String::from)
        .collect();
    v.sort();
    v
}

impl Residue {
    /// Takes a snapshot.
    pub fn snapshot() -> Residue {
        let mounts = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_whitespace().nth(4).map(String::from))
            // Only what the lab could have made (other software mounts things too).
            .filter(|m: &String| m.contains("vmbeam") || m.contains("libvirt"))
            .collect();
        let mut files = Vec::new();
        for d in [
            vmbeam_lab::state::LAB_ROOT,
            "/var/lib/vmbeam",
            "/etc/vmbeam",
        ] {
            if let Ok(rd) = std::fs::read_dir(d) {
                for e in rd.flatten() {
                    files.push(e.path().display().to_string());
                }
            } else if std::path::Path::new(d).exists() {
                files.push(d.to_string());
            }
        }
        files.sort();
        let mut processes: Vec<String> = Vec::new();
        if let Ok(rd) = std::fs::read_dir("/proc") {
            for e in rd.flatten() {
                let raw = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
                let cmd = String::from_utf8_lossy(&raw).to_string();
                let args: Vec<&str> = cmd.split('\0').filter(|a| !a.is_empty()).collect();
                if is_lab_process(&args) {
                    processes.push(args.join(" "));
                }
            }
        }
        processes.sort();
        Residue {
            netns: lines_of("ip", &["netns", "list"])
                .into_iter()
                .filter(|n| {
                    let name = n.split_whitespace().next().unwrap_or("");
                    name == vmbeam_lab::net::HUB_NS
                        || name == vmbeam_lab::net::LOAD_NS
                        || name.starts_with("vmbeam-cvm")
                })
                .collect(),
            mounts,
            links: lines_of("ip", &["-o", "link", "show"])
                .into_iter()
                .filter_map(|l| l.split(':').nth(1).map(|s| s.trim().to_string()))
                .filter(|l| l.starts_with("vmbeam") || l.starts_with("vbr"))
                .collect(),
            files,
            processes,
        }
    }
}

/// A process the lab started: the lab program itself, or one whose arguments name the lab's
/// directories, a cloud VM's libvirtd configuration or a cloud VM's namespace.
fn is_lab_process(args: &[&str]) -> bool {
    let Some(first) = args.first() else {
        return false;
    };
    first.rsplit('/').next() == Some("vmbeam-lab")
        || args.iter().any(|a| {
            a.starts_with(vmbeam_lab::state::LAB_ROOT)
                || a.contains("/etc/libvirt/libvirtd.conf")
                || a.contains("vmbeam-cvm")
        })
}

/// Runs `vmbeam ARGS` inside a cloud VM (where its vmbeamd and system bus are), through
/// `vmbeam-lab exec`.
pub fn vmbeam_in(cvm: &str, args: &[&str]) -> Output {
    let vm = vmbeam_bin().to_string_lossy().into_owned();
    let mut full = vec!["exec", cvm, vm.as_str()];
    full.extend_from_slice(args);
    lab(&full)
}

/// The libvirt URI of lab cloud VM `i`.
pub fn cvm_uri(i: u32) -> String {
    format!("qemu+tcp://198.18.0.{}/system", 10 + i)
}

/// Zero-copy (or other) migration through `vmbeam migrate` on the source cloud VM.
pub fn migrate(from: u32, to: u32, domain: &str, mode: &[&str]) -> Output {
    let from = format!("cvm{from}");
    let dest = cvm_uri(to);
    let mut args = vec!["migrate"];
    args.extend_from_slice(mode);
    args.extend_from_slice(&["--live", "--persistent", "--undefinesource", domain, &dest]);
    vmbeam_in(&from, &args)
}

/// A field of `vmbeam migrate`'s summary (`bytes on wire`, `downtime`, `mode`, ...).
pub fn summary_field(out: &str, key: &str) -> Option<String> {
    out.lines()
        .find(|l| l.trim_start().starts_with(&format!("{key}:")))
        .map(|l| {
            l.split_once(':')
                .map(|x| x.1)
                .unwrap_or("")
                .trim()
                .to_string()
        })
}

/// Host path of the lab's witness QMP monitor of `domain`'s QEMU on cloud VM `i` (see
/// [`vmbeam_lab::guest::witness_socket_inner`]).
pub fn witness_socket(i: u32, domain: &str) -> PathBuf {
    PathBuf::from(format!(
        "/run/vmbeam-lab/cvm{i}{}",
        vmbeam_lab::guest::witness_socket_inner(domain)
    ))
}

/// One cloud VM's QEMU of the watched guest, as seen through its witness monitor.
struct Witness {
    sock: PathBuf,
    client: Option<vmbeam_qemu::qmp::QmpClient>,
    /// Counts connections, so that two answers can be told to come from one QEMU process.
    connection: u64,
}

impl Witness {
    /// QEMU's own answer to "do your vCPUs run?" (`query-status`), with the connection it
    /// came from; `None` when there is no QEMU (or it did not answer).
    fn running(&mut self) -> Option<(bool, u64)> {
        if self.client.is_none() {
            let opts = vmbeam_qemu::qmp::QmpOptions {
                connect_timeout: std::time::Duration::ZERO,
                io_timeout: std::time::Duration::from_secs(2),
                ..Default::default()
            };
            self.client = vmbeam_qemu::qmp::QmpClient::connect(&self.sock, &opts).ok();
            self.connection += 1;
        }
        match self.client.as_mut()?.query_status_info() {
            Ok(s) => Some((s.running, self.connection)),
            Err(_) => {
                self.client = None;
                None
            }
        }
    }
}

/// Whether one sample proves that two QEMUs ran the guest at one instant. `reads` are in the
/// order they were made: (cloud VM, running, connection). The sample reads the cloud VMs
/// 1..n and back n-1..1, so that every pair is read as X, Y, X. If X's QEMU (one connection,
/// so one process) answered "running" before and after Y's QEMU answered "running", both ran
/// at the instant of Y's answer: a QEMU whose vCPUs stop for a migration does not run them
/// again unless the migration failed and the source was resumed, and a resumed source
/// after its destination ran is itself the corruption this check is for. Two "running"
/// answers read one after the other prove nothing (the first may have stopped in between):
/// that was the old check's mistake.
pub fn sample_overlap(reads: &[(u32, bool, u64)]) -> Option<(u32, u32)> {
    for (i, &(x, run_x, conn)) in reads.iter().enumerate() {
        if !run_x {
            continue;
        }
        let Some(j) = reads[i + 1..]
            .iter()
            .position(|&(c, r, k)| c == x && r && k == conn)
            .map(|p| p + i + 1)
        else {
            continue;
        };
        if let Some(&(y, _, _)) = reads[i + 1..j].iter().find(|&&(c, r, _)| c != x && r) {
            return Some((x, y));
        }
    }
    None
}

/// Watches one domain on every cloud VM, all the time, through QEMU's own run state (the
/// lab's witness QMP monitor of each QEMU, not libvirt's bookkeeping, which can say
/// "running" for a QEMU that already stopped), and records every sample that proves two
/// QEMUs ran the guest at one instant (with shared RAM, two CPUs writing one memory). See
/// [`sample_overlap`] for why the reading order makes the proof sound.
pub struct SplitBrainWatch {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<WatchReport>>,
}

/// What a watch saw.
#[derive(Debug, Default)]
pub struct WatchReport {
    /// Samples taken.
    pub samples: u64,
    /// Samples in which some cloud VM's QEMU answered "running".
    pub running_samples: u64,
    /// Cloud VMs whose QEMU ever answered "running".
    pub ran_on: std::collections::BTreeSet<u32>,
    /// Proven overlaps.
    pub violations: Vec<String>,
}

impl SplitBrainWatch {
    /// Starts watching `domain` on cloud VMs `1..=n`.
    pub fn start(domain: &str, n: u32) -> SplitBrainWatch {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s2 = stop.clone();
        let domain = domain.to_string();
        let handle = std::thread::spawn(move || {
            let mut w: Vec<Witness> = (1..=n)
                .map(|i| Witness {
                    sock: witness_socket(i, &domain),
                    client: None,
                    connection: 0,
                })
                .collect();
            // 1, 2, ..., n, n-1, ..., 1
            let order: Vec<u32> = (1..=n).chain((1..n).rev()).collect();
            let mut report = WatchReport::default();
            let mut reads = Vec::with_capacity(order.len());
            loop {
                // One last sample after the stop: the caller stops the watch once the
                // guest runs where it should, so the watch always sees it run there.
                let last = s2.load(Ordering::SeqCst);
                reads.clear();
                for &i in &order {
                    if let Some((running, conn)) = w[(i - 1) as usize].running() {
                        reads.push((i, running, conn));
                    }
                }
                report.samples += 1;
                let running: Vec<u32> = reads.iter().filter(|r| r.1).map(|r| r.0).collect();
                if !running.is_empty() {
                    report.running_samples += 1;
                    report.ran_on.extend(running);
                }
                if let Some((x, y)) = sample_overlap(&reads) {
                    report.violations.push(format!(
                        "sample {}: cvm{x}'s QEMU ran before and after cvm{y}'s said running",
                        report.samples
                    ));
                }
                if last {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            report
        });
        SplitBrainWatch {
            stop,
            handle: Some(handle),
        }
    }

    /// Stops and asserts that at no sampled instant two QEMUs ran the guest, and that the
    /// watch really saw the guest run (so a broken witness cannot pass silently).
    #[track_caller]
    pub fn finish(mut self) -> WatchReport {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let r = self
            .handle
            .take()
            .expect("running")
            .join()
            .expect("watch thread");
        assert!(r.violations.is_empty(), "split brain: {:?}", r.violations);
        assert!(
            r.samples > 10,
            "the watch sampled too little ({})",
            r.samples
        );
        assert!(
            r.running_samples > 0,
            "the watch never saw the guest's QEMU running ({} samples): is the witness monitor there?",
            r.samples
        );
        r
    }
}

impl Drop for SplitBrainWatch {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Files in the shared lab pool.
pub fn pool_files() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/run/vmbeam-lab/pool")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Asserts the pool holds exactly one RAM file (and its owner record) per listed running
/// beam guest, and nothing else: no proof, rendezvous, marker or temporary files.
#[track_caller]
pub fn assert_pool_clean(guests: usize) {
    let files = pool_files();
    let ram = files.iter().filter(|f| f.ends_with(".ram")).count();
    let owners = files.iter().filter(|f| f.ends_with(".ram.owner")).count();
    assert_eq!(
        (ram, owners, files.len()),
        (guests, guests, 2 * guests),
        "pool: {files:?}"
    );
}

/// Whether `x-ignore-shared` is on in the QEMU running `uuid` on cloud VM `cvm`, asked over
/// its private QMP socket.
pub fn ignore_shared_on(cvm: &str, uuid: &str) -> bool {
    let sock = format!("/run/vmbeam-lab/{cvm}/run/vmbeam/qmp/{uuid}.sock");
    let mut q = vmbeam_qemu::qmp::QmpClient::connect_default(&sock).expect("private QMP");
    q.migrate_capability("x-ignore-shared").expect("query caps")
}

/// PIDs of the QEMU processes of cloud VM `cvm` (processes in its network namespace).
pub fn qemu_pids(cvm: &str) -> Vec<u32> {
    let ns = format!("/run/netns/vmbeam-{cvm}");
    vmbeam_lab::sys::pids_in_netns(std::path::Path::new(&ns))
        .into_iter()
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm"))
                .map(|c| c.starts_with("qemu-system"))
                .unwrap_or(false)
        })
        .collect()
}

/// Client connections to libvirtd (any cloud VM's, port 16509) that `process` holds in cloud
/// VM `cvm`'s network namespace now: a daemon that leaks them makes libvirtd stop answering.
pub fn libvirt_clients_of(cvm: &str, process: &str) -> Vec<String> {
    let o = Command::new("ip")
        .args([
            "netns",
            "exec",
            &format!("vmbeam-{cvm}"),
            "ss",
            "-tnpH",
            "state",
            "established",
            "( dport = :16509 )",
        ])
        .output()
        .expect("run ss");
    assert!(
        o.status.success(),
        "ss: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter(|l| l.contains(&format!("((\"{process}\"")))
        .map(String::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::sample_overlap;

    #[test]
    fn a_switchover_between_reads_is_not_an_overlap() {
        // Forward 1 -> 2: 1 stops right after its first read, 2 starts before its read.
        assert_eq!(
            sample_overlap(&[(1, true, 1), (2, true, 1), (1, false, 1)]),
            None
        );
        // Backward 2 -> 1 read the same way.
        assert_eq!(
            sample_overlap(&[(1, true, 1), (2, true, 1), (1, true, 1)]),
            Some((1, 2))
        );
        assert_eq!(
            sample_overlap(&[(1, false, 1), (2, true, 1), (1, true, 1)]),
            None
        );
    }

    #[test]
    fn two_runs_around_another_are_an_overlap_only_on_one_connection() {
        assert_eq!(
            sample_overlap(&[(1, true, 1), (2, true, 4), (1, true, 2)]),
            None
        );
        assert_eq!(
            sample_overlap(&[
                (1, true, 1),
                (2, false, 1),
                (3, true, 1),
                (2, false, 1),
                (1, true, 1)
            ]),
            Some((1, 3))
        );
        assert_eq!(
            sample_overlap(&[
                (1, false, 1),
                (2, true, 1),
                (3, true, 1),
                (2, true, 1),
                (1, false, 1)
            ]),
            Some((2, 3))
        );
        assert_eq!(sample_overlap(&[(1, true, 1), (1, true, 1)]), None);
        assert_eq!(sample_overlap(&[]), None);
    }
}
