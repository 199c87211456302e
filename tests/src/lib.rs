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
                .collect(),
            files,
            processes,
        }
    }
}
