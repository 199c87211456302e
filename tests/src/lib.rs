//! Shared helpers for VMBeam's end-to-end tests: they drive the real `vmbeam` binary against
//! a real lab (namespaces, libvirtd, QEMU, the guest agent) and clean up on every path.

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

/// Path to the built `vmbeam` binary.
pub fn vmbeam_bin() -> PathBuf {
    let p = target_dir().join("vmbeam");
    assert!(
        p.is_file(),
        "{} is not built: run scripts/test.sh (it builds the binaries and the static guest agent first)",
        p.display()
    );
    p
}

/// Runs `vmbeam ARGS`, returning its output.
pub fn vmbeam(args: &[&str]) -> Output {
    Command::new(vmbeam_bin())
        .args(args)
        .output()
        .expect("run vmbeam")
}

/// Runs `vmbeam ARGS` and asserts success, returning stdout.
#[track_caller]
pub fn vmbeam_ok(args: &[&str]) -> String {
    let o = vmbeam(args);
    assert!(
        o.status.success(),
        "vmbeam {} failed ({}):\nstdout: {}\nstderr: {}",
        args.join(" "),
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs `vmbeam ARGS` and asserts failure with a one-line message; returns (code, stderr).
#[track_caller]
pub fn vmbeam_err(args: &[&str]) -> (i32, String) {
    let o = vmbeam(args);
    let err = String::from_utf8_lossy(&o.stderr).trim().to_string();
    assert!(
        !o.status.success(),
        "vmbeam {} should have failed; stdout: {}",
        args.join(" "),
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(
        err.starts_with("vmbeam: "),
        "error should be one clear line, got: {err}"
    );
    assert_eq!(
        err.lines().count(),
        1,
        "error should be one line, got: {err}"
    );
    (o.status.code().unwrap_or(-1), err)
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
            let _ = vmbeam(&["lab", "down"]);
        }
        let n = n.to_string();
        let mut args = vec!["lab", "up", "--cloud-vms", n.as_str()];
        args.extend_from_slice(extra);
        vmbeam_ok(&args);
        LabGuard
    }
}

impl Drop for LabGuard {
    fn drop(&mut self) {
        let o = vmbeam(&["lab", "down"]);
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

/// What the lab could leave behind on the host: namespaces, mounts, links, lab files,
/// processes whose command line mentions the lab. Compared before `up` and after `down`.
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
            "/run/vmbeam-lab",
            "/var/lib/vmbeam",
            "/etc/vmbeam",
            "/dev/shm",
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
                let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
                let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
                if cmd.contains("vmbeam-lab")
                    || cmd.contains("/etc/libvirt/libvirtd.conf")
                    || cmd.contains("vmbeam-cvm")
                {
                    processes.push(cmd);
                }
            }
        }
        processes.sort();
        Residue {
            netns: lines_of("ip", &["netns", "list"]),
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

/// Runs `vmbeam ARGS` inside a cloud VM (where its vmbeamd and system bus are).
pub fn vmbeam_in(cvm: &str, args: &[&str]) -> Output {
    let mut full = vec!["lab", "exec", cvm, "vmbeam"];
    full.extend_from_slice(args);
    vmbeam(&full)
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

/// Polls the run state of one domain on every cloud VM, all the time, and records any
/// instant at which more than one runs it (with shared RAM that would be two CPUs writing
/// one memory).
pub struct SplitBrainWatch {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<(u64, Vec<String>)>>,
}

impl SplitBrainWatch {
    /// Starts watching `domain` on cloud VMs `1..=n`.
    pub fn start(domain: &str, n: u32) -> SplitBrainWatch {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s2 = stop.clone();
        let domain = domain.to_string();
        let handle = std::thread::spawn(move || {
            let conns: Vec<virt::connect::Connect> = (1..=n)
                .map(|i| virt::connect::Connect::open(Some(&cvm_uri(i))).expect("connect"))
                .collect();
            let mut samples = 0u64;
            let mut violations = Vec::new();
            while !s2.load(Ordering::SeqCst) {
                let running: Vec<usize> = conns
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| {
                        virt::domain::Domain::lookup_by_name(c, &domain)
                            .ok()
                            .and_then(|d| d.get_state().ok())
                            .map(|(st, _)| st == virt::sys::VIR_DOMAIN_RUNNING)
                            .unwrap_or(false)
                    })
                    .map(|(i, _)| i + 1)
                    .collect();
                samples += 1;
                if running.len() > 1 {
                    violations.push(format!("sample {samples}: running on cvm{running:?}"));
                }
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            (samples, violations)
        });
        SplitBrainWatch {
            stop,
            handle: Some(handle),
        }
    }

    /// Stops and asserts that at no sampled instant two cloud VMs ran the guest.
    #[track_caller]
    pub fn finish(mut self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let (samples, v) = self
            .handle
            .take()
            .expect("running")
            .join()
            .expect("watch thread");
        assert!(v.is_empty(), "split brain: {v:?}");
        assert!(samples > 10, "the watch sampled too little ({samples})");
        samples
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
