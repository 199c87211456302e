//! One cloud VM: a network namespace, private mount and UTS namespaces whose libvirt
//! directories, /etc/vmbeam and /run are the cloud VM's own, the shared beam pool, and a
//! libvirtd listening on the cloud network.

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::net::{cvm_addr, cvm_netns};
use crate::state::{CloudVm, LabState, Resource, LAB_ROOT};
use crate::sys::{process_alive, process_start_time, wait_for};
use crate::{LabError, POOL_DIR};

/// The directories a cloud VM has privately: (name of the backing dir, path inside the cloud VM).
/// `/run` comes last: it hides the lab root, so every other bind must be made before it.
pub const PRIVATE_DIRS: &[(&str, &str)] = &[
    ("etc-libvirt", "/etc/libvirt"),
    ("var-lib-libvirt", "/var/lib/libvirt"),
    ("var-cache-libvirt", "/var/cache/libvirt"),
    ("var-log-libvirt", "/var/log/libvirt"),
    ("etc-vmbeam", "/etc/vmbeam"),
    ("run", "/run"),
];

/// Subdirectories created in the cloud VM's private /run.
const RUN_SUBDIRS: &[&str] = &[
    "libvirt",
    "vmbeam",
    "vmbeam/lab",
    "vmbeam/qmp",
    "dbus",
    "lock",
];

/// Creates a directory (and missing parents), recording each one created.
pub fn make_dir(state: &mut LabState, path: &Path) -> Result<(), LabError> {
    let mut missing = Vec::new();
    let mut p = Some(path);
    while let Some(d) = p {
        if d.exists() {
            break;
        }
        missing.push(d.to_path_buf());
        p = d.parent();
    }
    for d in missing.into_iter().rev() {
        fs::create_dir(&d).map_err(|e| LabError::io(format!("create {}", d.display()), e))?;
        state.record(Resource::Dir { path: d })?;
    }
    Ok(())
}

fn libvirtd_conf(addr: &str, host_uuid: &str) -> String {
    format!(
        r#"# libvirtd.conf of a VMBeam lab cloud VM (lab only: TCP without authentication)
listen_tls = 0
listen_tcp = 1
listen_addr = "{addr}"
auth_tcp = "none"
auth_unix_rw = "none"
unix_sock_group = "root"
host_uuid = "{host_uuid}"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
max_clients = 100
max_workers = 20
keepalive_interval = 5
"#
    )
}

fn qemu_conf(addr: &str) -> String {
    format!(
        r#"# qemu.conf of a VMBeam lab cloud VM
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
stdio_handler = "file"
cgroup_controllers = [ ]
namespaces = [ ]
migration_address = "{addr}"
migration_host = "{addr}"
memory_backing_dir = "/var/lib/libvirt/qemu/ram"
"#
    )
}

/// Brings up cloud VM `i`: directories and configuration, the namespace holder, libvirtd.
pub fn create(state: &mut LabState, i: u32, host_uuid: &str) -> Result<CloudVm, LabError> {
    let name = format!("cvm{i}");
    let ns = cvm_netns(i);
    let addr = cvm_addr(i);
    let root = Path::new(LAB_ROOT).join(&name);
    make_dir(state, &root)?;
    for (dir, _) in PRIVATE_DIRS {
        make_dir(state, &root.join(dir))?;
    }
    for sub in RUN_SUBDIRS {
        make_dir(state, &root.join("run").join(sub))?;
    }
    for sub in ["qemu", "hooks", "hooks/qemu.d"] {
        make_dir(state, &root.join("etc-libvirt").join(sub))?;
    }
    make_dir(state, &root.join("var-log-libvirt/qemu"))?;
    write(
        &root.join("etc-libvirt/libvirtd.conf"),
        &libvirtd_conf(&addr, host_uuid),
    )?;
    write(&root.join("etc-libvirt/qemu.conf"), &qemu_conf(&addr))?;
    // The mount points must exist on the host; the lab creates (and records) the missing ones.
    for (_, inner) in PRIVATE_DIRS {
        make_dir(state, Path::new(inner))?;
    }
    make_dir(state, Path::new(POOL_DIR))?;

    let (holder_pid, holder_start) = start_holder(state, &name, &ns, &root)?;
    let mut cvm = CloudVm {
        name,
        index: i,
        netns: ns,
        addr: addr.clone(),
        uri: format!("qemu+tcp://{addr}/system"),
        host_uuid: host_uuid.into(),
        root,
        holder_pid,
        holder_start,
        libvirtd_pid: 0,
        libvirtd_start: 0,
    };
    start_libvirtd(state, &mut cvm)?;
    Ok(cvm)
}

fn write(path: &Path, content: &str) -> Result<(), LabError> {
    fs::write(path, content).map_err(|e| LabError::io(format!("write {}", path.display()), e))
}

/// Starts the process that holds the cloud VM's mount and UTS namespaces. It makes the
/// private bind mounts, sets the hostname, says `ready` and then sleeps for the lab's life.
fn start_holder(
    state: &mut LabState,
    name: &str,
    ns: &str,
    root: &Path,
) -> Result<(u32, u64), LabError> {
    let mut script = String::from("set -e\n");
    let pool = Path::new(LAB_ROOT).join("pool");
    for (dir, inner) in PRIVATE_DIRS {
        if *inner == "/run" {
            // The pool is bound before /run hides the lab root.
            script.push_str(&format!("mount --bind '{}' '{POOL_DIR}'\n", pool.display()));
        }
        script.push_str(&format!(
            "mount --bind '{}' '{inner}'\n",
            root.join(dir).display()
        ));
    }
    script.push_str(&format!(
        "hostname '{name}'\necho ready\nexec sleep infinity </dev/null >/dev/null 2>&1\n"
    ));
    let mut child = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "unshare",
            "--mount",
            "--uts",
            "--propagation",
            "private",
            "sh",
            "-c",
        ])
        .arg(&script)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| LabError::io("start the namespace holder (ip netns exec ... unshare)", e))?;
    let pid = child.id();
    let start = process_start_time(pid).unwrap_or(0);
    state.record(Resource::Process {
        pid,
        start_time: start,
        what: format!("{name} namespace holder"),
    })?;
    let mut line = String::new();
    let stdout = child.stdout.take().expect("piped stdout");
    BufReader::new(stdout).read_line(&mut line).ok();
    if line.trim() != "ready" {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            use std::io::Read;
            let _ = e.read_to_string(&mut err);
        }
        let _ = child.wait();
        return Err(LabError::Setup(format!(
            "{name}: namespace set-up failed: {}",
            err.trim()
        )));
    }
    // The holder now sleeps; it is not waited for (lab down kills it by PID).
    std::mem::forget(child);
    Ok((pid, start))
}

/// Runs `program args` inside the cloud VM (its network, mount and UTS namespaces),
/// returning the child process.
pub fn spawn_in(
    cvm: &CloudVm,
    program: &str,
    args: &[&str],
    log: &Path,
) -> Result<std::process::Child, LabError> {
    let logf = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| LabError::io(format!("open {}", log.display()), e))?;
    let logf2 = logf.try_clone().map_err(|e| LabError::io("dup log", e))?;
    let holder = cvm.holder_pid.to_string();
    Command::new("nsenter")
        .args(["-t", &holder, "-m", "-u", "-n", "--wd=/", "--", program])
        .args(args)
        .stdin(Stdio::null())
        .stdout(logf)
        .stderr(logf2)
        .process_group(0)
        .spawn()
        .map_err(|e| LabError::io(format!("start {program} in {}", cvm.name), e))
}

/// Runs a command inside the cloud VM and waits for it, returning stdout.
pub fn run_in(cvm: &CloudVm, program: &str, args: &[&str]) -> Result<String, LabError> {
    let holder = cvm.holder_pid.to_string();
    let mut full = vec![
        "-t",
        holder.as_str(),
        "-m",
        "-u",
        "-n",
        "--wd=/",
        "--",
        program,
    ];
    full.extend_from_slice(args);
    Ok(crate::sys::run("nsenter", &full)?)
}

/// Starts (or restarts) the cloud VM's libvirtd and waits until it accepts connections.
pub fn start_libvirtd(state: &mut LabState, cvm: &mut CloudVm) -> Result<(), LabError> {
    let log = cvm.root.join("var-log-libvirt/libvirtd.stderr");
    let child = spawn_in(
        cvm,
        "libvirtd",
        &[
            "-f",
            "/etc/libvirt/libvirtd.conf",
            "--listen",
            "--pid-file",
            "/run/libvirt/libvirtd.pid",
        ],
        &log,
    )?;
    let pid = child.id();
    std::mem::forget(child);
    let start = process_start_time(pid).unwrap_or(0);
    state.record(Resource::Process {
        pid,
        start_time: start,
        what: format!("{} libvirtd", cvm.name),
    })?;
    cvm.libvirtd_pid = pid;
    cvm.libvirtd_start = start;
    let uri = cvm.uri.clone();
    let ok = wait_for(Duration::from_secs(30), Duration::from_millis(100), || {
        if !process_alive(pid, start) {
            return Some(false);
        }
        virt::connect::Connect::open(Some(&uri)).ok().map(|mut c| {
            let _ = c.close();
            true
        })
    });
    if ok != Some(true) {
        let tail = fs::read_to_string(&log).unwrap_or_default();
        let tail: Vec<&str> = tail.lines().rev().take(5).collect();
        return Err(LabError::Setup(format!(
            "{}: libvirtd did not come up at {uri}: {}",
            cvm.name,
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        )));
    }
    Ok(())
}

/// Whether the cloud VM's holder and libvirtd are alive.
pub fn healthy(cvm: &CloudVm) -> bool {
    process_alive(cvm.holder_pid, cvm.holder_start)
        && process_alive(cvm.libvirtd_pid, cvm.libvirtd_start)
}

/// The host path of the cloud VM's private directory `inner` (e.g. `/etc/vmbeam`).
pub fn host_path(cvm: &CloudVm, inner: &str) -> PathBuf {
    for (dir, mp) in PRIVATE_DIRS {
        if let Some(rest) = inner.strip_prefix(mp) {
            return cvm.root.join(dir).join(rest.trim_start_matches('/'));
        }
    }
    PathBuf::from(inner)
}
