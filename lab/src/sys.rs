//! Small, checked wrappers around the system tools the lab drives (`ip`, `tc`, `mount`, ...)
//! and around processes it starts: every one is recorded by PID and start time so that
//! `lab down` kills exactly what the lab started, never a process that reused the PID.

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// A system command failed.
#[derive(Debug, thiserror::Error)]
pub enum SysError {
    /// The program is not installed.
    #[error("`{program}` is not installed: {hint}")]
    Missing { program: String, hint: String },
    /// The program ran and failed.
    #[error("`{cmdline}` failed: {stderr}")]
    Failed { cmdline: String, stderr: String },
    /// The program could not be started.
    #[error("cannot run `{cmdline}`")]
    Spawn {
        cmdline: String,
        #[source]
        source: std::io::Error,
    },
}

fn cmdline_of(program: &str, args: &[&OsStr]) -> String {
    let mut s = program.to_string();
    for a in args {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Writes `content` to a new file at `path` readable only by its owner (mode 0600), replacing
/// any file there: keys and certificates' private halves.
pub fn write_private(path: &Path, content: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(content.as_bytes())
}

/// Runs `program args...`, returning its stdout; a non-zero exit is an error carrying stderr.
pub fn run<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Result<String, SysError> {
    let args: Vec<&OsStr> = args.iter().map(|a| a.as_ref()).collect();
    let cmdline = cmdline_of(program, &args);
    let out = Command::new(program)
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                SysError::Missing {
                    program: program.to_string(),
                    hint: package_hint(program),
                }
            } else {
                SysError::Spawn {
                    cmdline: cmdline.clone(),
                    source,
                }
            }
        })?;
    if !out.status.success() {
        return Err(SysError::Failed {
            cmdline,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Like [`run`] but inside network namespace `ns` (through `ip netns exec`).
pub fn run_in_ns<S: AsRef<OsStr>>(ns: &str, program: &str, args: &[S]) -> Result<String, SysError> {
    let mut full: Vec<&OsStr> = vec![
        OsStr::new("netns"),
        OsStr::new("exec"),
        OsStr::new(ns),
        OsStr::new(program),
    ];
    full.extend(args.iter().map(|a| a.as_ref()));
    run("ip", &full)
}

/// The Debian package that provides a program the lab needs.
pub fn package_hint(program: &str) -> String {
    let pkg = match program {
        "ip" | "tc" => "iproute2",
        "libvirtd" => "libvirt-daemon libvirt-daemon-driver-qemu",
        "virsh" => "libvirt-clients",
        "qemu-system-x86_64" => "qemu-system-x86",
        "dbus-daemon" => "dbus-daemon",
        "busybox" => "busybox-static",
        "cpio" => "cpio",
        "unshare" | "nsenter" | "mount" | "umount" => "util-linux mount",
        other => other,
    };
    format!("apt-get install {pkg}")
}

/// Checks that every program is on PATH (or at the given absolute path).
pub fn require_programs(programs: &[&str]) -> Result<(), SysError> {
    for p in programs {
        if !program_exists(p) {
            return Err(SysError::Missing {
                program: (*p).to_string(),
                hint: package_hint(
                    Path::new(p)
                        .file_name()
                        .and_then(|f| f.to_str())
                        .unwrap_or(p),
                ),
            });
        }
    }
    Ok(())
}

/// Whether a program can be found (absolute path or on PATH).
pub fn program_exists(p: &str) -> bool {
    if p.starts_with('/') {
        return Path::new(p).exists();
    }
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(p).is_file()))
        .unwrap_or(false)
}

/// The start time of a process (field 22 of /proc/PID/stat, in clock ticks since boot), which
/// together with the PID identifies one process for its whole life.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The children of process `pid` (of its main thread), in the kernel's order.
pub fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Whether process `pid` is the one that started at `start_time` and has not exited
/// (a zombie counts as gone).
pub fn process_alive(pid: u32, start_time: u64) -> bool {
    if process_start_time(pid) != Some(start_time) {
        return false;
    }
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rfind(')').map(|i| s[i + 2..i + 3].to_string()));
    !matches!(state.as_deref(), Some("Z") | Some("X") | None)
}

/// Terminates a recorded process: SIGTERM, then SIGKILL after `grace`; does nothing if the PID
/// now belongs to another process.
pub fn terminate(pid: u32, start_time: u64, grace: Duration) {
    if !process_alive(pid, start_time) {
        return;
    }
    let p = Pid::from_raw(pid as i32);
    let _ = kill(p, Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        reap(pid);
        if !process_alive(pid, start_time) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = kill(p, Signal::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && process_alive(pid, start_time) {
        reap(pid);
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reaps `pid` if it is our exited child (no-op otherwise).
fn reap(pid: u32) {
    use nix::sys::wait::{waitpid, WaitPidFlag};
    let _ = waitpid(Pid::from_raw(pid as i32), Some(WaitPidFlag::WNOHANG));
}

/// The PIDs of every process whose network namespace is the one at `ns_path`
/// (e.g. `/run/netns/vmbeam-cvm1`): all processes of one cloud VM, whatever started them.
pub fn pids_in_netns(ns_path: &Path) -> Vec<u32> {
    use std::os::unix::fs::MetadataExt;
    let Ok(target) = std::fs::metadata(ns_path) else {
        return Vec::new();
    };
    let me = std::process::id();
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        if let Ok(m) = std::fs::metadata(format!("/proc/{pid}/ns/net")) {
            if m.ino() == target.ino() && m.dev() == target.dev() {
                out.push(pid);
            }
        }
    }
    out
}

/// Whether `path` is a mount point (listed in /proc/self/mountinfo).
pub fn is_mount_point(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.to_string_lossy();
    info.lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .any(|mp| mp == want)
}

/// Waits until `f` returns `Some`, polling every `every`, up to `timeout`.
pub fn wait_for<T>(
    timeout: Duration,
    every: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(every);
    }
}

/// Runs `cmd` as a child of this process, which becomes a child subreaper: every process
/// orphaned below it (QEMU, which libvirtd daemonizes) is reparented here and reaped at
/// once, as a real host's init would. (Some containers' init reaps late; libvirt then waits
/// for a zombie QEMU after a migration.) Exits with the child's status.
pub fn reap_for(cmd: &[String]) -> i32 {
    use nix::sys::wait::{waitpid, WaitStatus};
    if cmd.is_empty() {
        return 2;
    }
    let _ = nix::sys::prctl::set_child_subreaper(true);
    let child = match std::process::Command::new(&cmd[0]).args(&cmd[1..]).spawn() {
        Ok(c) => c.id() as i32,
        Err(e) => {
            eprintln!("vmbeam-lab reap: cannot run {}: {e}", cmd[0]);
            return 127;
        }
    };
    // How the daemon ended goes to its log (our stderr): nobody waits for this process,
    // and a daemon that vanished mid-test must leave a trace.
    loop {
        match waitpid(None, None) {
            Ok(WaitStatus::Exited(pid, code)) if pid.as_raw() == child => {
                eprintln!(
                    "vmbeam-lab reap: {} (pid {child}) exited with status {code}",
                    cmd.join(" ")
                );
                return code;
            }
            Ok(WaitStatus::Signaled(pid, sig, core)) if pid.as_raw() == child => {
                eprintln!(
                    "vmbeam-lab reap: {} (pid {child}) killed by {sig}{}",
                    cmd.join(" "),
                    if core { " (core dumped)" } else { "" }
                );
                return 128 + sig as i32;
            }
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return 0,
        }
    }
}

/// Marks every descriptor above stderr close-on-exec, so the daemons the lab starts do not
/// inherit what the caller left open (a `flock` lock, a pipe a wrapper waits on), as a
/// service manager would not pass them.
pub fn cloexec_inherited_fds() {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<i32> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2)
        .collect();
    for fd in fds {
        // A descriptor closed meanwhile (the directory's own) just fails: nothing to do.
        let _ = fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_private_makes_an_owner_only_file_and_replaces_an_old_one() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("key");
        std::fs::write(&p, "old, world-readable").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_private(&p, "secret").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "secret");
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn start_time_identifies_this_process() {
        let me = std::process::id();
        let st = process_start_time(me).expect("own start time");
        assert!(process_alive(me, st));
        assert!(!process_alive(me, st + 1));
    }

    #[test]
    fn run_reports_stderr_and_missing_programs() {
        let err = run("sh", &["-c", "echo boom >&2; exit 3"]).unwrap_err();
        assert!(err.to_string().contains("boom"), "{err}");
        let err = run("definitely-not-a-program-vmbeam", &["x"]).unwrap_err();
        assert!(matches!(err, SysError::Missing { .. }), "{err}");
    }

    #[test]
    fn wait_for_times_out() {
        let r: Option<()> = wait_for(Duration::from_millis(30), Duration::from_millis(5), || None);
        assert!(r.is_none());
    }
}
