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
use crate::sys::{process_alive, process_start_time, wait_for, write_private};
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

/// The qemu.conf settings of every libvirtd the labs start (the namespace lab's cloud VMs, the
/// nested lab's host and cloud VMs): QEMU as root, no confinement, ownership changes or
/// labels, no cgroups or namespaces (a container may have neither).
pub(crate) const LAB_QEMU_CONF: &str = r#"user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
stdio_handler = "file"
cgroup_controllers = [ ]
namespaces = [ ]
"#;

fn qemu_conf(addr: &str, shared_fs: &[PathBuf]) -> String {
    let mut conf = format!(
        r#"# qemu.conf of a VMBeam lab cloud VM
{LAB_QEMU_CONF}migration_address = "{addr}"
migration_host = "{addr}"
memory_backing_dir = "/var/lib/libvirt/qemu/ram"
migrate_tls_x509_cert_dir = "{tls}"
migrate_tls_x509_verify = 1
"#,
        tls = crate::tls::CERT_DIR_INNER
    );
    if !shared_fs.is_empty() {
        // Paths were checked by `up` (absolute, existing, nothing to quote). libvirt drops
        // an entry it cannot resolve when it starts.
        let list: Vec<String> = shared_fs
            .iter()
            .map(|p| format!("\"{}\"", p.display()))
            .collect();
        conf.push_str(&format!("shared_filesystems = [ {} ]\n", list.join(", ")));
    }
    conf
}

/// What makes one cloud VM.
#[derive(Debug, Clone)]
pub struct CvmSpec {
    pub index: u32,
    pub host_uuid: String,
    /// Its virtual IaaS cloud.
    pub cloud: String,
    /// Host path of the pool it sees.
    pub pool: PathBuf,
    /// Where `vmbeamd` and `vmbeam-hook` are.
    pub bin_dir: PathBuf,
}

/// The cloud's key (one per virtual IaaS cloud of the lab), made on first use.
fn cloud_key(state: &mut LabState, cloud: &str) -> Result<PathBuf, LabError> {
    let dir = Path::new(LAB_ROOT).join("keys");
    make_dir(state, &dir)?;
    let path = dir.join(format!("{cloud}.key"));
    if !path.exists() {
        let key: [u8; 32] = rand::random();
        write_private(&path, &hex::encode(key))
            .map_err(|e| LabError::io(format!("write {}", path.display()), e))?;
    }
    Ok(path)
}

fn vmbeam_conf(host_id: &str, cloud: &str) -> String {
    format!(
        r#"# VMBeam identity of this lab cloud VM
host_id = "{host_id}"
cloud = "{cloud}"
pool_dir = "{POOL_DIR}"
key_file = "/etc/vmbeam/cloud.key"
ticket_ttl_secs = 30
"#
    )
}

/// The lab's system bus: a system-type bus whose policy lets root own VMBeam's name and
/// everyone call it (vmbeamd itself checks who may do what).
const LAB_BUS_CONF: &str = r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path=/run/dbus/system_bus_socket</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
  </policy>
  <policy user="root">
    <allow own="org.vmbeam.VMBeam1"/>
  </policy>
</busconfig>
"#;

/// Brings up one cloud VM: directories and configuration, the namespace holder, its system
/// bus, libvirtd (with VMBeam's hook installed) and vmbeamd.
pub fn create(
    state: &mut LabState,
    spec: &CvmSpec,
    ca: &crate::tls::LabCa,
) -> Result<CloudVm, LabError> {
    let i = spec.index;
    let host_uuid = spec.host_uuid.as_str();
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
    write(
        &root.join("etc-libvirt/qemu.conf"),
        &qemu_conf(&addr, &state.shared_fs),
    )?;
    // QEMU native TLS for `--tls` migrations (the encrypted baselines of `vmbeam-lab bench`).
    let pki = root.join("etc-libvirt/pki-qemu");
    make_dir(state, &pki)?;
    ca.write_host_certs(&pki, &name, &addr)?;
    // VMBeam: identity, the cloud's key, the hook (before libvirtd starts: libvirt discovers
    // hooks only at start), the bus configuration.
    write(
        &root.join("etc-vmbeam/vmbeam.conf"),
        &vmbeam_conf(&name, &spec.cloud),
    )?;
    let key = fs::read_to_string(cloud_key(state, &spec.cloud)?)
        .map_err(|e| LabError::io("read the lab cloud key", e))?;
    let cloud_key = root.join("etc-vmbeam/cloud.key");
    write_private(&cloud_key, &key)
        .map_err(|e| LabError::io(format!("write {}", cloud_key.display()), e))?;
    let hook = spec.bin_dir.join("vmbeam-hook");
    let hook_link = root.join("etc-libvirt/hooks/qemu.d/vmbeam");
    let _ = fs::remove_file(&hook_link);
    std::os::unix::fs::symlink(&hook, &hook_link)
        .map_err(|e| LabError::io(format!("install the hook {}", hook_link.display()), e))?;
    write(&root.join("run/vmbeam/lab-bus.conf"), LAB_BUS_CONF)?;
    // The mount points must exist on the host; the lab creates (and records) the missing ones.
    for (_, inner) in PRIVATE_DIRS {
        make_dir(state, Path::new(inner))?;
    }
    make_dir(state, Path::new(POOL_DIR))?;

    let (holder_pid, holder_start) = start_holder(state, &name, &ns, &root, &spec.pool)?;
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
        dbus_pid: 0,
        dbus_start: 0,
        vmbeamd_pid: 0,
        vmbeamd_start: 0,
        cloud: spec.cloud.clone(),
        pool: spec.pool.clone(),
        own_pool: spec.pool != state.pool,
        bin_dir: spec.bin_dir.clone(),
    };
    start_dbus(state, &mut cvm)?;
    start_libvirtd(state, &mut cvm)?;
    start_vmbeamd(state, &mut cvm)?;
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
    pool: &Path,
) -> Result<(u32, u64), LabError> {
    let mut script = String::from("set -e\n");
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
    // `vmbeam-lab reap` (this binary: the lab runs only inside `vmbeam-lab`) stays the
    // daemon's parent and reaps what it orphans.
    let me =
        std::env::current_exe().map_err(|e| LabError::io("locate the vmbeam-lab binary", e))?;
    Command::new(me)
        .args([
            "reap", "--", "nsenter", "-t", &holder, "-m", "-u", "-n", "--wd=/", "--", program,
        ])
        .args(args)
        .stdin(Stdio::null())
        .stdout(logf)
        .stderr(logf2)
        .env_remove("DBUS_SYSTEM_BUS_ADDRESS")
        .env_remove("DBUS_SESSION_BUS_ADDRESS")
        .env_remove("LIBVIRT_DEFAULT_URI")
        .process_group(0)
        .spawn()
        .map_err(|e| LabError::io(format!("start {program} in {}", cvm.name), e))
}

/// Starts a daemon inside the cloud VM and records it; returns (pid, start time).
fn start_daemon(
    state: &mut LabState,
    cvm: &CloudVm,
    what: &str,
    program: &str,
    args: &[&str],
    log: &Path,
) -> Result<(u32, u64), LabError> {
    let child = spawn_in(cvm, program, args, log)?;
    let pid = child.id();
    std::mem::forget(child);
    let start = process_start_time(pid).unwrap_or(0);
    state.record(Resource::Process {
        pid,
        start_time: start,
        what: format!("{} {what}", cvm.name),
    })?;
    Ok((pid, start))
}

fn log_tail(log: &Path) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let tail: Vec<&str> = text.lines().rev().take(4).collect();
    tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

/// Starts the cloud VM's own system bus (its /run/dbus is private).
pub fn start_dbus(state: &mut LabState, cvm: &mut CloudVm) -> Result<(), LabError> {
    let log = cvm.root.join("var-log-libvirt/dbus-daemon.log");
    let _ = fs::remove_file(cvm.root.join("run/dbus/system_bus_socket"));
    let (pid, start) = start_daemon(
        state,
        cvm,
        "dbus-daemon",
        "dbus-daemon",
        &[
            "--config-file=/run/vmbeam/lab-bus.conf",
            "--nofork",
            "--nopidfile",
            "--nosyslog",
        ],
        &log,
    )?;
    cvm.dbus_pid = pid;
    cvm.dbus_start = start;
    let sock = cvm.root.join("run/dbus/system_bus_socket");
    let ok = wait_for(Duration::from_secs(10), Duration::from_millis(20), || {
        if !process_alive(pid, start) {
            return Some(false);
        }
        sock.exists().then_some(true)
    });
    if ok != Some(true) {
        return Err(LabError::Setup(format!(
            "{}: its system bus did not start: {}",
            cvm.name,
            log_tail(&log)
        )));
    }
    Ok(())
}

/// Starts the cloud VM's vmbeamd and waits until it owns its bus name.
pub fn start_vmbeamd(state: &mut LabState, cvm: &mut CloudVm) -> Result<(), LabError> {
    let log = cvm.root.join("var-log-libvirt/vmbeamd.log");
    let bin = cvm.bin_dir.join("vmbeamd");
    let before = fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
    let (pid, start) = start_daemon(
        state,
        cvm,
        "vmbeamd",
        &bin.to_string_lossy(),
        &["--config", "/etc/vmbeam/vmbeam.conf"],
        &log,
    )?;
    cvm.vmbeamd_pid = pid;
    cvm.vmbeamd_start = start;
    let ok = wait_for(Duration::from_secs(30), Duration::from_millis(20), || {
        if !process_alive(pid, start) {
            return Some(false);
        }
        let text = fs::read(&log).unwrap_or_default();
        let new =
            String::from_utf8_lossy(text.get(before as usize..).unwrap_or_default()).into_owned();
        new.contains("vmbeamd ready").then_some(true)
    });
    if ok != Some(true) {
        return Err(LabError::Setup(format!(
            "{}: vmbeamd did not start: {}",
            cvm.name,
            log_tail(&log)
        )));
    }
    Ok(())
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
    let (pid, start) = start_daemon(
        state,
        cvm,
        "libvirtd",
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
        && process_alive(cvm.dbus_pid, cvm.dbus_start)
        && process_alive(cvm.vmbeamd_pid, cvm.vmbeamd_start)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_conf_is_the_lab_settings_then_this_cloud_vm_s() {
        assert_eq!(
            qemu_conf("198.18.0.11", &[]),
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
migration_address = "198.18.0.11"
migration_host = "198.18.0.11"
memory_backing_dir = "/var/lib/libvirt/qemu/ram"
migrate_tls_x509_cert_dir = "{}"
migrate_tls_x509_verify = 1
"#,
                crate::tls::CERT_DIR_INNER
            )
        );
    }

    #[test]
    fn qemu_conf_declares_shared_filesystems_only_when_asked() {
        let plain = qemu_conf("198.18.0.11", &[]);
        assert!(plain.contains("migration_address = \"198.18.0.11\""));
        assert!(!plain.contains("shared_filesystems"));
        let shared = qemu_conf(
            "198.18.0.11",
            &[
                PathBuf::from("/var/lib/vmbeam-openstack/x/instances"),
                PathBuf::from("/srv/nfs"),
            ],
        );
        assert!(shared.ends_with(
            "shared_filesystems = [ \"/var/lib/vmbeam-openstack/x/instances\", \"/srv/nfs\" ]\n"
        ));
    }
}
