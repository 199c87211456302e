//! Starting bare QEMU processes, for tests only (`cfg(test)` or the `testing` feature).
//!
//! The machine is the smallest that behaves like a libvirt guest for migration purposes:
//! `-accel tcg -machine pc`, RAM from one explicit memory backend (`-machine
//! memory-backend=ID`, as libvirt does), no default devices, no display, a QMP socket, and
//! optionally `-incoming defer` and `-S`. No guest kernel: SeaBIOS runs, finds nothing to
//! boot and idles, which is enough to have a running guest that migrates.

use std::fs;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::qmp::{QmpClient, QmpError, QmpOptions};

/// Environment variable naming the QEMU binary (default [`DEFAULT_QEMU_BINARY`]).
pub const QEMU_BINARY_ENV: &str = "VMBEAM_QEMU";
/// The QEMU binary used unless [`QEMU_BINARY_ENV`] says otherwise.
pub const DEFAULT_QEMU_BINARY: &str = "/usr/bin/qemu-system-x86_64";

/// Errors of the launcher.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// Invalid specification.
    #[error("invalid QEMU spec: {0}")]
    Invalid(String),
    /// An operating-system error.
    #[error("{op}: {source}")]
    Io {
        /// What was being done.
        op: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// QEMU exited while it was expected to run.
    #[error("QEMU (pid {pid}) exited with {status}; its output:\n{log}")]
    Exited {
        /// Its pid.
        pid: u32,
        /// How it exited.
        status: ExitStatus,
        /// Its stdout and stderr.
        log: String,
    },
    /// QMP failure.
    #[error(transparent)]
    Qmp(#[from] QmpError),
}

/// The guest RAM backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RamBackend {
    /// `memory-backend-file,mem-path=PATH,share=on|off`.
    File {
        /// The file (or a symlink to it).
        path: PathBuf,
        /// MAP_SHARED (`true`) or private copy-on-write (`false`).
        share: bool,
    },
    /// `memory-backend-memfd` (anonymous; shown only to test refusals).
    Memfd,
}

/// What to start.
#[derive(Debug, Clone)]
pub struct QemuSpec {
    /// The QEMU binary.
    pub binary: PathBuf,
    /// Guest RAM in bytes; a positive multiple of 1 MiB.
    pub ram_size: u64,
    /// Memory backend id (also the RAMBlock id: both ends of a migration must agree).
    pub backend_id: String,
    /// The RAM backend.
    pub backend: RamBackend,
    /// The QMP socket to create.
    pub qmp_socket: PathBuf,
    /// More QMP sockets (a QMP socket serves one client at a time: a second observer needs
    /// its own, like VMBeam's private monitor next to libvirt's).
    pub extra_qmp_sockets: Vec<PathBuf>,
    /// `-incoming defer`: wait for `migrate-incoming`.
    pub incoming_defer: bool,
    /// `-S`: do not start the vCPUs.
    pub start_paused: bool,
    /// Where QEMU's stdout and stderr go (default: the QMP socket path plus `.log`).
    pub log_file: Option<PathBuf>,
    /// Kill QEMU (SIGKILL) when the *thread* that launched it exits (`PR_SET_PDEATHSIG`), so
    /// a test that dies leaves no QEMU behind. Note it is the launching thread, not process.
    pub die_with_launching_thread: bool,
    /// Further arguments.
    pub extra_args: Vec<String>,
}

impl QemuSpec {
    /// A running guest of `ram_size` bytes whose RAM is `mem_path`, mapped shared.
    pub fn new(
        mem_path: impl Into<PathBuf>,
        ram_size: u64,
        qmp_socket: impl Into<PathBuf>,
    ) -> Self {
        QemuSpec {
            binary: std::env::var_os(QEMU_BINARY_ENV)
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_QEMU_BINARY)),
            ram_size,
            backend_id: "ram".into(),
            backend: RamBackend::File {
                path: mem_path.into(),
                share: true,
            },
            qmp_socket: qmp_socket.into(),
            extra_qmp_sockets: Vec::new(),
            incoming_defer: false,
            start_paused: false,
            log_file: None,
            die_with_launching_thread: true,
            extra_args: Vec::new(),
        }
    }

    /// Sets `-incoming defer`.
    pub fn incoming_defer(mut self, on: bool) -> Self {
        self.incoming_defer = on;
        self
    }

    /// Sets `-S`.
    pub fn start_paused(mut self, on: bool) -> Self {
        self.start_paused = on;
        self
    }

    /// Replaces the RAM backend.
    pub fn backend(mut self, backend: RamBackend) -> Self {
        self.backend = backend;
        self
    }

    /// Adds a second QMP socket.
    pub fn extra_qmp(mut self, socket: impl Into<PathBuf>) -> Self {
        self.extra_qmp_sockets.push(socket.into());
        self
    }

    fn log_path(&self) -> PathBuf {
        self.log_file.clone().unwrap_or_else(|| {
            let mut p = self.qmp_socket.clone().into_os_string();
            p.push(".log");
            PathBuf::from(p)
        })
    }

    /// The command line (without the binary).
    pub fn args(&self) -> Result<Vec<String>, LaunchError> {
        const MIB: u64 = 1 << 20;
        if self.ram_size == 0 || self.ram_size & (MIB - 1) != 0 {
            return Err(LaunchError::Invalid(format!(
                "RAM size {} is not a positive multiple of 1 MiB",
                self.ram_size
            )));
        }
        if self.backend_id.is_empty() || self.backend_id.contains([',', '=']) {
            return Err(LaunchError::Invalid(format!(
                "bad backend id {:?}",
                self.backend_id
            )));
        }
        let size = self.ram_size;
        let id = &self.backend_id;
        let object = match &self.backend {
            RamBackend::File { path, share } => format!(
                "memory-backend-file,id={id},size={size},mem-path={},share={}",
                opt_path(path)?,
                if *share { "on" } else { "off" }
            ),
            RamBackend::Memfd => format!("memory-backend-memfd,id={id},size={size},share=on"),
        };
        let mut a: Vec<String> = vec![
            "-accel".into(),
            "tcg".into(),
            "-machine".into(),
            "pc".into(),
            "-m".into(),
            format!("{}M", size / MIB),
            "-object".into(),
            object,
            "-machine".into(),
            format!("memory-backend={id}"),
            "-nodefaults".into(),
            "-nographic".into(),
            "-display".into(),
            "none".into(),
        ];
        for sock in std::iter::once(&self.qmp_socket).chain(&self.extra_qmp_sockets) {
            a.push("-qmp".into());
            a.push(format!("unix:{},server=on,wait=off", opt_path(sock)?));
        }
        if self.incoming_defer {
            a.push("-incoming".into());
            a.push("defer".into());
        }
        if self.start_paused {
            a.push("-S".into());
        }
        a.extend(self.extra_args.iter().cloned());
        Ok(a)
    }
}

/// A path as a QEMU option value: UTF-8, commas doubled.
fn opt_path(p: &Path) -> Result<String, LaunchError> {
    let s = p
        .to_str()
        .ok_or_else(|| LaunchError::Invalid(format!("path {} is not UTF-8", p.display())))?;
    Ok(s.replace(',', ",,"))
}

/// A QEMU process started by [`QemuProcess::launch`]; killed (by its pid) and reaped on drop,
/// its QMP sockets and default log removed.
#[derive(Debug)]
pub struct QemuProcess {
    child: Child,
    pid: u32,
    spec: QemuSpec,
    log_path: PathBuf,
    launched_at: Instant,
    exit: Option<ExitStatus>,
}

impl QemuProcess {
    /// Starts QEMU. Returns as soon as the process exists; use
    /// [`QemuProcess::connect_qmp`] to wait until it answers.
    pub fn launch(spec: QemuSpec) -> Result<Self, LaunchError> {
        let args = spec.args()?;
        let log_path = spec.log_path();
        let log = fs::File::create(&log_path).map_err(|source| LaunchError::Io {
            op: format!("create {}", log_path.display()),
            source,
        })?;
        let log2 = log.try_clone().map_err(|source| LaunchError::Io {
            op: "dup log file".into(),
            source,
        })?;
        for s in std::iter::once(&spec.qmp_socket).chain(&spec.extra_qmp_sockets) {
            // A stale socket file from an earlier run would make a client connect to nothing.
            let _ = fs::remove_file(s);
        }
        let mut cmd = Command::new(&spec.binary);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        if spec.die_with_launching_thread {
            // SAFETY: the closure runs in the child between fork and exec; it only makes the
            // prctl(2) system call, which is async-signal-safe, and allocates nothing.
            unsafe {
                cmd.pre_exec(|| {
                    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                        .map_err(io::Error::from)
                });
            }
        }
        let launched_at = Instant::now();
        let child = cmd.spawn().map_err(|source| LaunchError::Io {
            op: format!("spawn {}", spec.binary.display()),
            source,
        })?;
        let pid = child.id();
        tracing::debug!(pid, ?args, "QEMU launched");
        Ok(QemuProcess {
            child,
            pid,
            spec,
            log_path,
            launched_at,
            exit: None,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// What was started.
    pub fn spec(&self) -> &QemuSpec {
        &self.spec
    }

    /// The QMP socket.
    pub fn qmp_socket(&self) -> &Path {
        &self.spec.qmp_socket
    }

    /// When `spawn` was called.
    pub fn launched_at(&self) -> Instant {
        self.launched_at
    }

    /// QEMU's output so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Connects to the main QMP socket, retrying until `timeout`, failing early with
    /// [`LaunchError::Exited`] if QEMU dies meanwhile.
    pub fn connect_qmp(&mut self, timeout: Duration) -> Result<QmpClient, LaunchError> {
        let sock = self.spec.qmp_socket.clone();
        self.connect_qmp_at(&sock, timeout)
    }

    /// Like [`QemuProcess::connect_qmp`] for one of the sockets of this QEMU.
    pub fn connect_qmp_at(
        &mut self,
        socket: &Path,
        timeout: Duration,
    ) -> Result<QmpClient, LaunchError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Err(LaunchError::Exited {
                    pid: self.pid,
                    status,
                    log: self.log(),
                });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let opts = QmpOptions {
                connect_timeout: left.min(Duration::from_millis(50)),
                retry_interval: Duration::from_millis(2),
                ..QmpOptions::default()
            };
            match QmpClient::connect(socket, &opts) {
                Ok(c) => return Ok(c),
                Err(QmpError::Timeout { .. }) if !left.is_zero() => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Non-blocking check whether QEMU exited.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, LaunchError> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().map_err(|source| LaunchError::Io {
                op: format!("wait for pid {}", self.pid),
                source,
            })?;
        }
        Ok(self.exit)
    }

    /// Waits up to `timeout` for QEMU to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Option<ExitStatus>, LaunchError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait()? {
                return Ok(Some(s));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGKILL to this pid (if still running) and reap it.
    pub fn kill(&mut self) -> Result<ExitStatus, LaunchError> {
        if let Some(s) = self.try_wait()? {
            return Ok(s);
        }
        // Child::kill sends SIGKILL to exactly this child's pid.
        if let Err(e) = self.child.kill() {
            if e.kind() != io::ErrorKind::InvalidInput {
                return Err(LaunchError::Io {
                    op: format!("kill pid {}", self.pid),
                    source: e,
                });
            }
        }
        let s = self.child.wait().map_err(|source| LaunchError::Io {
            op: format!("reap pid {}", self.pid),
            source,
        })?;
        self.exit = Some(s);
        Ok(s)
    }
}

impl Drop for QemuProcess {
    fn drop(&mut self) {
        if let Err(e) = self.kill() {
            tracing::error!(pid = self.pid, error = %e, "could not kill QEMU");
        }
        for s in std::iter::once(&self.spec.qmp_socket).chain(&self.spec.extra_qmp_sockets) {
            let _ = fs::remove_file(s);
        }
        if self.spec.log_file.is_none() {
            let _ = fs::remove_file(&self.log_path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line() {
        let s = QemuSpec::new("/shm/a,b", 256 << 20, "/t/q.sock")
            .incoming_defer(true)
            .start_paused(true);
        let a = s.args().expect("args").join(" ");
        assert!(a.contains("-m 256M"), "{a}");
        assert!(a.contains("memory-backend-file,id=ram,size=268435456,mem-path=/shm/a,,b,share=on"));
        assert!(a.contains("-machine memory-backend=ram"));
        assert!(a.contains("-qmp unix:/t/q.sock,server=on,wait=off"));
        assert!(a.ends_with("-incoming defer -S"));
        assert!(QemuSpec::new("/a", 1000, "/q").args().is_err());
        assert!(QemuSpec::new("/a", 0, "/q").args().is_err());
    }
}
