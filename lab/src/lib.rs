//! The VMBeam lab: a virtual IaaS cloud on one machine.
//!
//! `up` makes N cloud VMs, each a network namespace plus private mount and UTS namespaces
//! with its own libvirt directories, hostname and libvirtd (at `qemu+tcp://ADDR/system`),
//! all sharing one beam pool on tmpfs, joined by a cloud network (optionally shaped) and a
//! guest network that a load-generator namespace also sits on. Everything it creates is
//! recorded in [`state::LabState`] as it is made; `down` removes exactly that.

pub mod agent;
pub mod cvm;
pub mod guest;
pub mod image;
pub mod nested;
pub mod net;
pub mod probe;
pub mod state;
pub mod sys;
pub mod tls;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use state::{CloudVm, LabState, Resource, Shaping, CACHE_DIR, LAB_ROOT};

/// Where every cloud VM sees the shared beam pool (VMBeam's default pool directory).
pub const POOL_DIR: &str = "/var/lib/vmbeam/pool";

/// Programs the lab needs on the host.
pub const REQUIRED_PROGRAMS: &[&str] = &[
    "ip",
    "tc",
    "unshare",
    "nsenter",
    "mount",
    "umount",
    "libvirtd",
    "qemu-system-x86_64",
    "dpkg",
    "apt-get",
];

/// A lab operation failed. Each message says what is wrong and, where it can, what to do.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("no lab is up: run `vmbeam-lab up` first")]
    NotUp,
    #[error("a lab with {running} cloud VM(s) is already up; `vmbeam-lab down` first to change it to {wanted}")]
    AlreadyUp { running: usize, wanted: u32 },
    #[error("{0}; if it is a leftover of an earlier lab, remove it by hand (nothing was changed)")]
    Conflict(String),
    #[error("unknown cloud VM '{name}' (this lab has: {})", known.join(", "))]
    UnknownCloudVm { name: String, known: Vec<String> },
    #[error("unknown lab guest '{name}' (this lab has: {})", if known.is_empty() { "none".to_string() } else { known.join(", ") })]
    UnknownGuest { name: String, known: Vec<String> },
    #[error("guest '{0}' is not running on any cloud VM")]
    GuestNotRunning(String),
    #[error("guest '{name}' did not boot in time: {detail}")]
    GuestBoot { name: String, detail: String },
    #[error("{0}")]
    BadInput(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("lab set-up failed: {0}")]
    Setup(String),
    #[error("must run as root (the lab creates namespaces, mounts and daemons)")]
    NotRoot,
    #[error("libvirt: {0}")]
    Libvirt(String),
    #[error(transparent)]
    Sys(#[from] sys::SysError),
    #[error(transparent)]
    Image(#[from] image::ImageError),
    #[error(transparent)]
    Agent(#[from] agent::AgentError),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl LabError {
    /// An I/O error with what was being done.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        LabError::Io {
            what: what.into(),
            source,
        }
    }
}

impl From<std::io::Error> for LabError {
    fn from(e: std::io::Error) -> Self {
        LabError::io(format!("lab state in {LAB_ROOT}"), e)
    }
}

/// An exclusive lock on the lab (one `up`/`down`/guest change at a time).
pub struct Lock(#[allow(dead_code)] nix::fcntl::Flock<File>);

impl Lock {
    /// Takes the lock, waiting for another lab command to finish.
    pub fn take() -> Result<Lock, LabError> {
        let path = Path::new("/run/vmbeam-lab.lock");
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| LabError::io(format!("open {}", path.display()), e))?;
        nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
            .map(Lock)
            .map_err(|(_, e)| LabError::io("lock the lab", e.into()))
    }
}

/// The recorded lab, or [`LabError::NotUp`].
pub fn require_state() -> Result<LabState, LabError> {
    match LabState::load()? {
        Some(s) if s.complete => Ok(s),
        _ => Err(LabError::NotUp),
    }
}

/// Options of `lab up`.
#[derive(Debug, Clone)]
pub struct UpOptions {
    pub cloud_vms: u32,
    pub shaping: Shaping,
    /// The statically linked guest agent to put in the guest image.
    pub agent_binary: PathBuf,
    /// Where `vmbeamd` and `vmbeam-hook` are (installed in every cloud VM).
    pub bin_dir: PathBuf,
    /// Cloud VMs put in another virtual IaaS cloud (own id and key): (cloud VM, cloud).
    pub other_clouds: Vec<(String, String)>,
    /// Cloud VMs given a pool of their own (not shared: not co-located for VMBeam).
    pub own_pools: Vec<String>,
    /// Directories every cloud VM's libvirt is told are shared storage (absolute, existing).
    pub shared_fs: Vec<PathBuf>,
}

/// The virtual IaaS cloud every lab cloud VM belongs to unless told otherwise.
pub const DEFAULT_CLOUD: &str = "lab-cloud";

/// What `up` did.
#[derive(Debug)]
pub enum UpOutcome {
    /// A new lab was made.
    Created(LabState),
    /// The same lab was already up (and healthy, or repaired).
    AlreadyUp {
        state: LabState,
        repaired: Vec<String>,
    },
}

fn check_root() -> Result<(), LabError> {
    if !nix::unistd::Uid::effective().is_root() {
        return Err(LabError::NotRoot);
    }
    Ok(())
}

/// Checks the host has what the lab needs, with the packages to install if not.
pub fn preflight() -> Result<(), LabError> {
    check_root()?;
    sys::require_programs(REQUIRED_PROGRAMS)?;
    if nix::unistd::User::from_name("libvirt-qemu")
        .ok()
        .flatten()
        .is_none()
    {
        return Err(LabError::Setup(
            "the libvirt-qemu user is missing (libvirtd refuses to start): apt-get install libvirt-daemon-system, or useradd --system libvirt-qemu".into(),
        ));
    }
    Ok(())
}

/// Builds (or reuses) the guest image.
pub fn guest_image(agent_binary: &Path) -> Result<image::GuestImage, LabError> {
    std::fs::create_dir_all(CACHE_DIR)
        .map_err(|e| LabError::io(format!("create {CACHE_DIR}"), e))?;
    Ok(image::build_image(&image::ImageSpec {
        cache_dir: PathBuf::from(CACHE_DIR),
        agent_binary: agent_binary.to_path_buf(),
    })?)
}

/// Brings the lab up (idempotent: the same lab already up is reported, and repaired if a
/// daemon died). On failure everything made so far is removed again.
pub fn up(opts: &UpOptions) -> Result<UpOutcome, LabError> {
    preflight()?;
    sys::cloexec_inherited_fds();
    if opts.cloud_vms == 0 || opts.cloud_vms > 16 {
        return Err(LabError::BadInput(format!(
            "--cloud-vms {} is out of range: use 1 to 16",
            opts.cloud_vms
        )));
    }
    if opts.shaping.bandwidth_mbit == Some(0) {
        return Err(LabError::BadInput(
            "--bandwidth must be at least 1 Mbit/s".into(),
        ));
    }
    check_shared_fs(&opts.shared_fs)?;
    let _lock = Lock::take()?;
    if let Some(mut s) = LabState::load()? {
        if !s.complete {
            // A crashed `up`: roll it back first, then make a fresh lab.
            teardown(&mut s);
        } else if s.cloud_vms.len() as u32 != opts.cloud_vms
            || s.shaping != opts.shaping
            || s.shared_fs != opts.shared_fs
            || s.cloud_vms.iter().any(|c| {
                c.cloud != cloud_of(opts, &c.name) || c.own_pool != opts.own_pools.contains(&c.name)
            })
        {
            return Err(LabError::AlreadyUp {
                running: s.cloud_vms.len(),
                wanted: opts.cloud_vms,
            });
        } else {
            let repaired = repair(&mut s)?;
            return Ok(UpOutcome::AlreadyUp { state: s, repaired });
        }
    }
    for name in [net::HUB_NS, net::LOAD_NS]
        .into_iter()
        .map(String::from)
        .chain((1..=opts.cloud_vms).map(net::cvm_netns))
    {
        if net::netns_exists(&name) {
            return Err(LabError::Conflict(format!(
                "network namespace {name} exists but no lab is recorded in {LAB_ROOT} (another lab, or a leftover: `ip netns del {name}`)"
            )));
        }
    }
    let image = guest_image(&opts.agent_binary)?;
    std::fs::create_dir_all(LAB_ROOT).map_err(|e| LabError::io(format!("create {LAB_ROOT}"), e))?;
    let mut state = LabState {
        version: 1,
        shaping: opts.shaping,
        pool: Path::new(LAB_ROOT).join("pool"),
        shared_fs: opts.shared_fs.clone(),
        ..Default::default()
    };
    state.save()?;
    match build(&mut state, opts, &image) {
        Ok(()) => Ok(UpOutcome::Created(state)),
        Err(e) => {
            teardown(&mut state);
            Err(e)
        }
    }
}

/// `--shared-fs` paths go into qemu.conf as they are: absolute, existing directories with
/// nothing to quote (libvirt silently drops an entry it cannot resolve).
fn check_shared_fs(paths: &[PathBuf]) -> Result<(), LabError> {
    for p in paths {
        let text = p.to_str().unwrap_or("");
        if !p.is_absolute() || text.is_empty() || text.contains(['"', '\\', '\n']) {
            return Err(LabError::BadInput(format!(
                "--shared-fs {}: expected an absolute path with no quote, backslash or newline",
                p.display()
            )));
        }
        if !p.is_dir() {
            return Err(LabError::BadInput(format!(
                "--shared-fs {}: no such directory (create it first: libvirt ignores a path it cannot resolve)",
                p.display()
            )));
        }
    }
    Ok(())
}

fn build(
    state: &mut LabState,
    opts: &UpOptions,
    image: &image::GuestImage,
) -> Result<(), LabError> {
    for (name, _) in &opts.other_clouds {
        check_cvm_name(opts, name)?;
    }
    for name in &opts.own_pools {
        check_cvm_name(opts, name)?;
    }
    let accel = probe::choose_accel(image, Path::new(CACHE_DIR))?;
    state.accel = Some(accel);
    let pool = state.pool.clone();
    mount_pool(state, &pool, "vmbeam-lab-pool")?;
    net::create_hub(state)?;
    net::create_loadgen(state)?;
    let ca = tls::LabCa::new()?;
    for i in 1..=opts.cloud_vms {
        net::create_cvm_net(state, i, opts.shaping)?;
        let host_uuid = format!(
            "00000000-0000-4000-8000-{:012x}",
            0xbea0_0000u64 + i as u64 + rand_suffix()
        );
        let name = format!("cvm{i}");
        let pool = if opts.own_pools.contains(&name) {
            let p = Path::new(LAB_ROOT).join(format!("pool-{name}"));
            mount_pool(state, &p, &format!("vmbeam-lab-pool-{name}"))?;
            p
        } else {
            state.pool.clone()
        };
        let spec = cvm::CvmSpec {
            index: i,
            host_uuid,
            cloud: cloud_of(opts, &name),
            pool,
            bin_dir: opts.bin_dir.clone(),
        };
        let c = cvm::create(state, &spec, &ca)?;
        state.cloud_vms.push(c);
        state.save()?;
    }
    state.complete = true;
    state.save()?;
    Ok(())
}

fn cloud_of(opts: &UpOptions, cvm: &str) -> String {
    opts.other_clouds
        .iter()
        .find(|(c, _)| c == cvm)
        .map(|(_, cloud)| cloud.clone())
        .unwrap_or_else(|| DEFAULT_CLOUD.to_string())
}

fn check_cvm_name(opts: &UpOptions, name: &str) -> Result<(), LabError> {
    let known: Vec<String> = (1..=opts.cloud_vms).map(|i| format!("cvm{i}")).collect();
    if !known.iter().any(|k| k == name) {
        return Err(LabError::UnknownCloudVm {
            name: name.into(),
            known,
        });
    }
    Ok(())
}

/// Mounts a tmpfs pool at `path` (recording the directory and the mount).
fn mount_pool(state: &mut LabState, path: &Path, source: &str) -> Result<(), LabError> {
    cvm::make_dir(state, path)?;
    sys::run(
        "mount",
        &[
            "-t",
            "tmpfs",
            "-o",
            "mode=0700,size=75%",
            source,
            &path.to_string_lossy(),
        ],
    )?;
    state.record(Resource::Mount {
        path: path.to_path_buf(),
    })?;
    Ok(())
}

fn rand_suffix() -> u64 {
    (rand::random::<u32>() as u64) << 16
}

/// Restarts what died in a recorded lab; returns what it restarted.
fn repair(state: &mut LabState) -> Result<Vec<String>, LabError> {
    let mut repaired = Vec::new();
    for i in 0..state.cloud_vms.len() {
        let c = &state.cloud_vms[i];
        if !sys::process_alive(c.holder_pid, c.holder_start) {
            return Err(LabError::Setup(format!(
                "{}'s namespaces are gone: run `vmbeam-lab down` and `vmbeam-lab up` again",
                c.name
            )));
        }
        let mut c = c.clone();
        let mut changed = false;
        if !sys::process_alive(c.dbus_pid, c.dbus_start) {
            cvm::start_dbus(state, &mut c)?;
            repaired.push(format!("{}: restarted its system bus", c.name));
            changed = true;
        }
        if !sys::process_alive(c.libvirtd_pid, c.libvirtd_start) {
            cvm::start_libvirtd(state, &mut c)?;
            repaired.push(format!("{}: restarted libvirtd", c.name));
            changed = true;
        }
        if changed || !sys::process_alive(c.vmbeamd_pid, c.vmbeamd_start) {
            if sys::process_alive(c.vmbeamd_pid, c.vmbeamd_start) {
                sys::terminate(c.vmbeamd_pid, c.vmbeamd_start, Duration::from_secs(5));
            }
            cvm::start_vmbeamd(state, &mut c)?;
            repaired.push(format!("{}: restarted vmbeamd", c.name));
            changed = true;
        }
        if changed {
            state.cloud_vms[i] = c;
            state.save()?;
        }
    }
    Ok(repaired)
}

/// A daemon of a cloud VM, as fault tests name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Daemon {
    Libvirtd,
    Vmbeamd,
}

impl std::str::FromStr for Daemon {
    type Err = LabError;

    fn from_str(s: &str) -> Result<Self, LabError> {
        match s {
            "libvirtd" => Ok(Daemon::Libvirtd),
            "vmbeamd" => Ok(Daemon::Vmbeamd),
            other => Err(LabError::BadInput(format!(
                "unknown daemon '{other}' (libvirtd or vmbeamd)"
            ))),
        }
    }
}

/// Kills a cloud VM's daemon itself with SIGKILL, as a crash would (the lab records the
/// `vmbeam-lab reap` parent each daemon runs under; the daemon is its one child), and waits
/// until it is gone. Nothing is restarted: [`restart_dead`] does that, as a service manager
/// would. Returns the killed PID.
pub fn crash(cvm_name: &str, daemon: Daemon) -> Result<u32, LabError> {
    check_root()?;
    let _lock = Lock::take()?;
    let state = require_state()?;
    let c = state
        .cloud_vms
        .iter()
        .find(|c| c.name == cvm_name)
        .ok_or_else(|| LabError::UnknownCloudVm {
            name: cvm_name.to_owned(),
            known: state.cloud_vms.iter().map(|c| c.name.clone()).collect(),
        })?;
    let (reaper, start) = match daemon {
        Daemon::Libvirtd => (c.libvirtd_pid, c.libvirtd_start),
        Daemon::Vmbeamd => (c.vmbeamd_pid, c.vmbeamd_start),
    };
    let child = sys::process_alive(reaper, start)
        .then(|| sys::children(reaper).into_iter().next())
        .flatten()
        .ok_or_else(|| LabError::Setup(format!("{cvm_name}: its {daemon:?} is not running")))?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .map_err(|e| LabError::io(format!("kill {child}"), e.into()))?;
    sys::wait_for(Duration::from_secs(10), Duration::from_millis(10), || {
        (!sys::process_alive(reaper, start)).then_some(())
    })
    .ok_or_else(|| LabError::Setup(format!("{cvm_name}: {daemon:?} (pid {child}) did not die")))?;
    Ok(child)
}

/// Starts again every daemon of the lab that is not running (as a service manager would
/// after a crash); returns what it restarted.
pub fn restart_dead() -> Result<Vec<String>, LabError> {
    check_root()?;
    let _lock = Lock::take()?;
    let mut state = require_state()?;
    repair(&mut state)
}

/// What `down` removed.
#[derive(Debug, Default)]
pub struct DownReport {
    pub domains: usize,
    pub processes: usize,
    pub namespaces: usize,
    pub mounts: usize,
    pub links: usize,
    pub dirs: usize,
    pub problems: Vec<String>,
}

/// Takes the lab down: every domain, process, mount, link, namespace and directory it made.
pub fn down() -> Result<DownReport, LabError> {
    check_root()?;
    let _lock = Lock::take()?;
    let mut s = LabState::load()?.ok_or(LabError::NotUp)?;
    let report = teardown(&mut s);
    Ok(report)
}

fn teardown(s: &mut LabState) -> DownReport {
    let mut r = DownReport::default();
    // 1. Guests: destroy them through libvirt while it is still there.
    for c in &s.cloud_vms {
        if !sys::process_alive(c.libvirtd_pid, c.libvirtd_start) {
            continue;
        }
        if let Ok(mut conn) = virt::connect::Connect::open(Some(&c.uri)) {
            if let Ok(doms) = conn.list_all_domains(0) {
                for d in doms {
                    if d.is_active().unwrap_or(false) && d.destroy().is_ok() {
                        r.domains += 1;
                    }
                    let _ = d.undefine();
                }
            }
            let _ = conn.close();
        }
    }
    // 2. Recorded processes (newest first), then anything else left in a cloud VM's namespace
    //    (QEMUs whose libvirtd died, helpers the lab started there).
    for res in s.resources.iter().rev() {
        if let Resource::Process {
            pid, start_time, ..
        } = res
        {
            if sys::process_alive(*pid, *start_time) {
                r.processes += 1;
            }
            sys::terminate(*pid, *start_time, Duration::from_secs(5));
        }
    }
    for res in s.resources.iter() {
        if let Resource::Netns { name } = res {
            for pid in sys::pids_in_netns(&Path::new("/run/netns").join(name)) {
                if let Some(st) = sys::process_start_time(pid) {
                    r.processes += 1;
                    sys::terminate(pid, st, Duration::from_secs(3));
                }
            }
        }
    }
    // 3. Everything else, in reverse order of creation.
    for res in s.resources.iter().rev() {
        match res {
            Resource::Process { .. } => {}
            Resource::Mount { path } => {
                if sys::is_mount_point(path) {
                    match sys::run("umount", &[path]) {
                        Ok(_) => r.mounts += 1,
                        Err(e) => r.problems.push(e.to_string()),
                    }
                }
            }
            Resource::HostLink { name } => {
                if Path::new("/sys/class/net").join(name).exists() {
                    match sys::run("ip", &["link", "del", name]) {
                        Ok(_) => r.links += 1,
                        Err(e) => r.problems.push(e.to_string()),
                    }
                }
            }
            Resource::Netns { name } => {
                if net::netns_exists(name) {
                    match sys::run("ip", &["netns", "del", name]) {
                        Ok(_) => r.namespaces += 1,
                        Err(e) => r.problems.push(e.to_string()),
                    }
                }
            }
            Resource::Dir { path } => {
                let res = if path.starts_with(LAB_ROOT) {
                    std::fs::remove_dir_all(path)
                } else {
                    std::fs::remove_dir(path)
                };
                match res {
                    Ok(()) => r.dirs += 1,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => r.problems.push(format!("remove {}: {e}", path.display())),
                }
            }
        }
    }
    let _ = std::fs::remove_file(LabState::path());
    let _ = std::fs::remove_file(LabState::path().with_extension("json.tmp"));
    let _ = std::fs::remove_dir(LAB_ROOT);
    r
}

/// One cloud VM as `status` shows it.
#[derive(Debug, Clone)]
pub struct CvmStatus {
    pub cvm: CloudVm,
    pub healthy: bool,
    /// (domain name, state) of every domain on it.
    pub domains: Vec<(String, String)>,
    pub error: Option<String>,
}

/// The lab as `status` shows it.
#[derive(Debug, Clone)]
pub struct LabStatus {
    pub state: LabState,
    pub cloud_vms: Vec<CvmStatus>,
    /// (file name, size in bytes, bytes resident) of each file in the pool.
    pub pool_files: Vec<(String, u64, u64)>,
}

fn state_name(s: u32) -> &'static str {
    match s {
        1 => "running",
        2 => "blocked",
        3 => "paused",
        4 => "shutting down",
        5 => "shut off",
        6 => "crashed",
        7 => "suspended",
        _ => "unknown",
    }
}

/// The lab's status: cloud VMs, their domains, the pool.
pub fn status() -> Result<LabStatus, LabError> {
    let state = require_state()?;
    let mut cvms = Vec::new();
    for c in &state.cloud_vms {
        let healthy = cvm::healthy(c);
        let mut domains = Vec::new();
        let mut error = None;
        match virt::connect::Connect::open(Some(&c.uri)) {
            Ok(mut conn) => {
                if let Ok(doms) = conn.list_all_domains(0) {
                    for d in doms {
                        let name = d.get_name().unwrap_or_default();
                        let st = d
                            .get_state()
                            .map(|(s, _)| state_name(s))
                            .unwrap_or("unknown");
                        domains.push((name, st.to_string()));
                    }
                }
                let _ = conn.close();
            }
            Err(e) => error = Some(e.to_string()),
        }
        cvms.push(CvmStatus {
            cvm: c.clone(),
            healthy,
            domains,
            error,
        });
    }
    let mut pool_files = Vec::new();
    if let Ok(rd) = std::fs::read_dir(&state.pool) {
        use std::os::unix::fs::MetadataExt;
        for e in rd.flatten() {
            if let Ok(m) = e.metadata() {
                pool_files.push((
                    e.file_name().to_string_lossy().into_owned(),
                    m.len(),
                    m.blocks() * 512,
                ));
            }
        }
    }
    pool_files.sort();
    Ok(LabStatus {
        state,
        cloud_vms: cvms,
        pool_files,
    })
}

#[cfg(test)]
mod shared_fs_tests {
    use super::*;

    #[test]
    fn shared_fs_must_be_an_existing_absolute_directory_with_nothing_to_quote() {
        let dir = tempfile::tempdir().unwrap();
        assert!(check_shared_fs(&[dir.path().to_path_buf()]).is_ok());
        for bad in [
            PathBuf::from("relative/dir"),
            dir.path().join("missing"),
            dir.path().join("a\"b"),
        ] {
            let e = check_shared_fs(std::slice::from_ref(&bad)).unwrap_err();
            assert!(
                matches!(&e, LabError::BadInput(m) if m.contains("--shared-fs")),
                "{bad:?}: {e}"
            );
        }
    }
}
