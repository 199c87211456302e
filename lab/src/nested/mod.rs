//! The nested lab: cloud VMs that are real QEMU VMs under a libvirtd of the lab's own on the
//! host, with `vmbeam-host` beside it (the paper's topology; issue 13, item 3).
//!
//! `nested up` makes, recording each thing in [`NestedState`] as it is made:
//! - a network namespace `vbn-host` with the cloud network's bridge `vbn-br0`
//!   (198.18.128.1/20) in it, so nothing is added to the host's own network;
//! - a *private* host libvirtd: a holder process in that namespace with a private mount
//!   namespace whose /etc/libvirt, /var/lib/libvirt, /var/cache/libvirt, /var/log/libvirt and
//!   /run are directories of the nested lab (the host's default libvirtd, its paths and its
//!   system bus are never used); its socket is reachable from the host at
//!   [`host_socket`], its URI is [`host_uri`];
//! - the cloud VM image ([`image`]): the full Debian kernel and an initramfs that boots the
//!   host's root over 9p read-only (`multidevs=remap`) under a tmpfs overlay;
//! - the packages' file tree ([`pkgroot`]), laid out as `packaging/install-tree.sh` lays it
//!   out, which every cloud VM links into its root before it starts anything;
//! - `vmbeam-host`, against the private libvirtd;
//! - N cloud VMs defined and started through that libvirtd ([`domain_xml`]): TCG unless the
//!   boot probe finds that Linux boots under KVM, VMBeam's `<cloud-vm>` metadata, the
//!   `org.vmbeam.host.0` virtio-serial channel, a 64 GiB 64-bit PCI window, a NIC on the
//!   cloud network. Inside, the start script ([`start_script`]) brings up the cloud VM's own
//!   system bus, libvirtd (at `qemu+tcp://ADDR/system`) and vmbeamd (`pool_kind =
//!   "host-device"`), then writes `VMBEAM-NESTED-READY` on its serial console, which the host
//!   waits for.
//!
//! `nested down` removes exactly what the state file records.

pub mod guest;
pub mod image;

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmbeam_core::CloudVmMetadata;

use crate::cvm::LAB_QEMU_CONF;
use crate::state::{AccelChoice, Resource};
use crate::sys::{self, process_alive, process_start_time, wait_for, write_private};
use crate::LabError;

/// The nested lab's run directory (state file, lock, the host libvirtd's /run).
pub const RUN_ROOT: &str = "/run/vmbeam-nested";
/// The nested lab's state directory (the host libvirtd's directories, the cloud VMs'
/// directories, the packages' tree, vmbeam-host's state).
pub const LIB_ROOT: &str = "/var/lib/vmbeam-nested";
/// Cache for the cloud VM image and the accelerator probe (kept across labs).
pub const CACHE_DIR: &str = "/var/cache/vmbeam-nested";
/// The network namespace of the host libvirtd and the cloud network.
pub const HOST_NETNS: &str = "vbn-host";
/// The cloud network's bridge (in [`HOST_NETNS`]).
pub const BRIDGE: &str = "vbn-br0";
/// The bridge's address (the host's, on the cloud network).
pub const BRIDGE_ADDR: &str = "198.18.128.1/20";
/// The virtual IaaS cloud of the nested cloud VMs.
pub const CLOUD: &str = "nested-cloud";
/// A second virtual IaaS cloud on the same host (`nested up --other-cloud N`): its cloud
/// VMs have their own cloud key, and vmbeam-host never shares a device across clouds.
pub const OTHER_CLOUD: &str = "nested-other";
/// Memory of one cloud VM.
pub const CVM_MEMORY_MIB: u64 = 1024;
/// How long one cloud VM may take to say it is ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(300);
/// The cloud VM's ready marker on its serial console.
pub const READY_MARKER: &str = "VMBEAM-NESTED-READY";
/// The cloud VM's failure marker on its serial console.
pub const FAILED_MARKER: &str = "VMBEAM-NESTED-FAILED";
/// The virtio-serial port of the lab's exec channel (a lab tool, not the product's).
pub const EXEC_PORT: &str = "org.vmbeam.lab.exec.0";
/// The line that ends a command's output on the exec channel, before its exit status.
pub const EXEC_END: &str = "VMBEAM-EXEC-END rc=";
/// How long one [`exec`] may take.
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(300);

/// The host libvirtd's private directories: (name under `LIB_ROOT/host`, mount point).
/// `/run` comes last (its backing directory is under [`RUN_ROOT`], which it hides).
const HOST_PRIVATE_DIRS: &[(&str, &str)] = &[
    ("etc-libvirt", "/etc/libvirt"),
    ("var-lib-libvirt", "/var/lib/libvirt"),
    ("var-cache-libvirt", "/var/cache/libvirt"),
    ("var-log-libvirt", "/var/log/libvirt"),
];

/// Programs the nested lab needs on the host.
pub const REQUIRED_PROGRAMS: &[&str] = &[
    "ip",
    "unshare",
    "nsenter",
    "libvirtd",
    "qemu-system-x86_64",
    "dbus-daemon",
    "dpkg",
    "apt-get",
];

/// The cloud VM's address on the cloud network.
pub fn cvm_addr(i: u32) -> String {
    format!("198.18.128.{}", 10 + i)
}

/// The private host libvirtd's socket, as the host sees it.
pub fn host_socket() -> PathBuf {
    Path::new(RUN_ROOT).join("host-run/libvirt/libvirt-sock")
}

/// The private host libvirtd's URI.
pub fn host_uri() -> String {
    format!("qemu+unix:///system?socket={}", host_socket().display())
}

/// One nested cloud VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NestedCvm {
    /// `cvm1`, ...: its hostname and VMBeam host id.
    pub name: String,
    pub index: u32,
    /// Its domain name in the host libvirtd.
    pub domain: String,
    /// Its domain UUID (the SMBIOS UUID inside, and vmbeam-host's id of it).
    pub uuid: String,
    /// Its address on the cloud network.
    pub addr: String,
    /// Its virtual IaaS cloud ([`CLOUD`], or [`OTHER_CLOUD`] for `--other-cloud` ones).
    #[serde(default = "default_cloud")]
    pub cloud: String,
    /// Its libvirtd's URI (reachable from [`HOST_NETNS`]).
    pub uri: String,
    /// Its writable directory (host path, mounted at the same path inside).
    pub dir: PathBuf,
    /// Its serial console log on the host.
    pub console: PathBuf,
    /// The host channel's socket on the host.
    pub channel: PathBuf,
    /// The lab's exec channel's socket on the host ([`exec`]).
    pub exec: PathBuf,
    /// Seconds from `virDomainCreate` to its ready marker.
    pub ready_secs: f64,
}

fn default_cloud() -> String {
    CLOUD.to_string()
}

/// A recorded process (PID and start time).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Proc {
    pub pid: u32,
    pub start: u64,
}

impl Proc {
    fn alive(&self) -> bool {
        self.pid != 0 && process_alive(self.pid, self.start)
    }
}

/// The nested lab, as made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct NestedState {
    pub version: u32,
    /// Everything created, in order.
    pub resources: Vec<Resource>,
    pub cloud_vms: Vec<NestedCvm>,
    pub accel: Option<AccelChoice>,
    pub holder: Proc,
    pub libvirtd: Proc,
    pub vmbeam_host: Proc,
    /// vmbeam-host's state directory.
    pub host_state_dir: PathBuf,
    /// vmbeam-host's log.
    pub host_log: PathBuf,
    /// Whether `up` completed.
    pub complete: bool,
}

impl NestedState {
    /// The state file.
    pub fn path() -> PathBuf {
        Path::new(RUN_ROOT).join("state.json")
    }

    /// The recorded nested lab, `Ok(None)` if there is none.
    pub fn load() -> Result<Option<Self>, LabError> {
        match fs::read(Self::path()) {
            Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
                LabError::io(
                    format!("read {}", Self::path().display()),
                    std::io::Error::new(std::io::ErrorKind::InvalidData, e),
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(LabError::io(format!("read {}", Self::path().display()), e)),
        }
    }

    fn save(&self) -> Result<(), LabError> {
        let path = Self::path();
        let tmp = path.with_extension("json.tmp");
        let body = serde_json::to_vec_pretty(self)
            .map_err(|e| LabError::io("encode the nested lab state", std::io::Error::other(e)))?;
        fs::write(&tmp, body)
            .and_then(|()| fs::rename(&tmp, &path))
            .map_err(|e| LabError::io(format!("write {}", path.display()), e))
    }

    /// Records a resource and saves at once, so that a crash mid-`up` leaves a record.
    fn record(&mut self, r: Resource) -> Result<(), LabError> {
        self.resources.push(r);
        self.save()
    }

    fn record_process(&mut self, pid: u32, what: &str) -> Result<Proc, LabError> {
        let start = process_start_time(pid).unwrap_or(0);
        self.record(Resource::Process {
            pid,
            start_time: start,
            what: what.into(),
        })?;
        Ok(Proc { pid, start })
    }
}

/// An exclusive lock on the nested lab (one `up`/`down` at a time).
struct NestedLock(#[allow(dead_code)] nix::fcntl::Flock<fs::File>);

fn lock() -> Result<NestedLock, LabError> {
    let path = Path::new("/run/vmbeam-nested.lock");
    let f = fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| LabError::io(format!("open {}", path.display()), e))?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
        .map(NestedLock)
        .map_err(|(_, e)| LabError::io("lock the nested lab", e.into()))
}

/// Options of `nested up`.
#[derive(Debug, Clone)]
pub struct NestedUpOptions {
    pub cloud_vms: u32,
    /// How many of them (the last ones) belong to [`OTHER_CLOUD`] instead of [`CLOUD`].
    pub other_cloud: u32,
    /// Where `vmbeamd`, `vmbeam`, `vmbeam-hook` and `vmbeam-host` are.
    pub bin_dir: PathBuf,
    /// The `vmbeam-lab` binary: its `reap` is the parent of the host libvirtd and PID 1's
    /// last word in every cloud VM.
    pub lab_binary: PathBuf,
}

/// Creates a directory and its missing parents, recording each one created.
fn make_dir(st: &mut NestedState, path: &Path) -> Result<(), LabError> {
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
        st.record(Resource::Dir { path: d })?;
    }
    Ok(())
}

fn write(path: &Path, content: &str) -> Result<(), LabError> {
    fs::write(path, content).map_err(|e| LabError::io(format!("write {}", path.display()), e))
}

/// The host libvirtd's libvirtd.conf: a unix socket only (in its private /run).
pub fn host_libvirtd_conf() -> String {
    r#"# libvirtd.conf of the VMBeam nested lab's host libvirtd (lab only)
listen_tls = 0
listen_tcp = 0
unix_sock_group = "root"
auth_unix_rw = "none"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
"#
    .to_string()
}

/// The host libvirtd's qemu.conf: QEMU as root, no confinement (the cloud VMs export the
/// host's root over 9p), no cgroups or namespaces (a container may have neither).
pub fn host_qemu_conf() -> String {
    format!("# qemu.conf of the VMBeam nested lab's host libvirtd\n{LAB_QEMU_CONF}")
}

/// A cloud VM's libvirtd.conf: TCP without authentication on its cloud network address
/// (lab only).
pub fn cvm_libvirtd_conf(addr: &str, log: &Path) -> String {
    format!(
        r#"# libvirtd.conf of a VMBeam nested lab cloud VM (lab only: TCP without authentication)
listen_tls = 0
listen_tcp = 1
listen_addr = "{addr}"
auth_tcp = "none"
auth_unix_rw = "none"
unix_sock_group = "root"
log_outputs = "3:file:{log}"
"#,
        log = log.display()
    )
}

/// A cloud VM's qemu.conf.
pub fn cvm_qemu_conf(addr: &str) -> String {
    format!(
        r#"# qemu.conf of a VMBeam nested lab cloud VM
{LAB_QEMU_CONF}migration_address = "{addr}"
migration_host = "{addr}"
memory_backing_dir = "/var/lib/libvirt/qemu/ram"
"#
    )
}

/// A cloud VM's /etc/vmbeam/vmbeam.conf: guest RAM from the host's devices.
pub fn cvm_vmbeam_conf(host_id: &str, cloud: &str) -> String {
    format!(
        r#"# VMBeam identity of this nested lab cloud VM
host_id = "{host_id}"
cloud = "{cloud}"
pool_dir = "{pool}"
key_file = "/etc/vmbeam/cloud.key"
ticket_ttl_secs = 30
pool_kind = "host-device"
"#,
        pool = crate::POOL_DIR
    )
}

/// The packages' file tree (see `packaging/install-tree.sh`): the programs and the files
/// the product reads at run time. (Manual pages, completions, units and the polkit policy
/// are left out: nothing in a cloud VM reads them.)
pub fn pkgroot_files() -> Vec<(&'static str, PkgFile)> {
    vec![
        ("usr/sbin/vmbeamd", PkgFile::Binary("vmbeamd")),
        ("usr/bin/vmbeam", PkgFile::Binary("vmbeam")),
        (
            "usr/libexec/vmbeam/vmbeam-hook",
            PkgFile::Binary("vmbeam-hook"),
        ),
        (
            "etc/libvirt/hooks/qemu.d/vmbeam",
            PkgFile::Symlink("/usr/libexec/vmbeam/vmbeam-hook"),
        ),
        (
            "usr/share/dbus-1/system.d/org.vmbeam.VMBeam1.conf",
            PkgFile::Text(include_str!(
                "../../../packaging/files/org.vmbeam.VMBeam1.conf"
            )),
        ),
    ]
}

/// One file of [`pkgroot_files`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PkgFile {
    /// A program from the binaries directory.
    Binary(&'static str),
    /// A symbolic link.
    Symlink(&'static str),
    /// A file shipped as is.
    Text(&'static str),
}

/// Lays out the packages' tree in `root` from the binaries in `bin_dir`.
pub fn pkgroot(root: &Path, bin_dir: &Path) -> Result<(), LabError> {
    for (rel, f) in pkgroot_files() {
        let dst = root.join(rel);
        let parent = dst.parent().expect("a file in a directory");
        fs::create_dir_all(parent)
            .map_err(|e| LabError::io(format!("create {}", parent.display()), e))?;
        let _ = fs::remove_file(&dst);
        let r = match f {
            PkgFile::Binary(b) => {
                let src = bin_dir.join(b);
                if !src.is_file() {
                    return Err(LabError::Setup(format!(
                        "{} is missing: build it first (cargo build -p vmbeamd -p vmbeam-cli -p vmbeam-hook -p vmbeam-host), or pass --bin-dir",
                        src.display()
                    )));
                }
                fs::hard_link(&src, &dst).or_else(|_| fs::copy(&src, &dst).map(|_| ()))
            }
            PkgFile::Symlink(t) => std::os::unix::fs::symlink(t, &dst),
            PkgFile::Text(t) => fs::write(&dst, t),
        };
        r.map_err(|e| LabError::io(format!("install {}", dst.display()), e))?;
    }
    Ok(())
}

/// The cloud VM's start script, PID 1 in its (overlaid) copy of the host's root.
pub fn start_script(cvm: &NestedCvm, pkgroot: &Path, reaper: &Path) -> String {
    let d = cvm.dir.display();
    format!(
        r#"#!/bin/sh
# Start script of nested lab cloud VM {name} (generated by vmbeam-lab nested up).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
D={d}
say() {{ echo "VMBEAM-NESTED $*"; }}
fail() {{ echo "{FAILED_MARKER} {name}: $*"; sleep 2; echo o > /proc/sysrq-trigger; }}
waitfor() {{ n=0; while ! eval "$1" >/dev/null 2>&1; do n=$((n+1)); [ $n -gt $2 ] && return 1; sleep 0.2; done; }}
hostname {name}
ip link set lo up
waitfor "test -e /sys/class/net/eth0" 50 || fail "no eth0"
ip addr add {addr}/20 dev eth0 && ip link set eth0 up || fail "eth0"
# udev's names for virtio-serial ports (there is no udev here).
mkdir -p /dev/virtio-ports
for p in /sys/class/virtio-ports/*; do
    [ -e "$p/name" ] && ln -sf "../$(basename "$p")" "/dev/virtio-ports/$(cat "$p/name")"
done
# Fresh state and configuration directories: the lower layer is the host libvirtd's view,
# whose /etc/libvirt holds the cloud VMs' own definitions.
for m in /etc/libvirt /var/lib/libvirt /var/cache/libvirt /var/log/libvirt /etc/vmbeam /var/lib/vmbeam; do
    mkdir -p "$m" && mount -t tmpfs -o mode=0755 tmpfs "$m" || fail "tmpfs on $m"
done
# The packages' files, where the packages install them; then this cloud VM's configuration.
cp -rs {pkgroot}/. / || fail "install the packages' files"
# Their symbolic links as the packages make them (cp -rs would point them into the tree).
(cd {pkgroot} && find . -type l) | while read -r l; do
    ln -sfn "$(readlink "{pkgroot}/$l")" "/${{l#./}}" || fail "link /${{l#./}}"
done
mkdir -p /etc/vmbeam {pool} /var/lib/vmbeam /run/dbus /run/libvirt /var/lib/libvirt/qemu/ram /var/log/libvirt "$D/log"
cp "$D/conf/vmbeam.conf" /etc/vmbeam/vmbeam.conf
cp "$D/conf/cloud.key" /etc/vmbeam/cloud.key && chmod 600 /etc/vmbeam/cloud.key
cp "$D/conf/libvirtd.conf" "$D/conf/qemu.conf" /etc/libvirt/
say "{name} installed uptime=$(cut -d' ' -f1 /proc/uptime)"
dbus-daemon --system --fork --nopidfile >>"$D/log/dbus.log" 2>&1 || fail "dbus-daemon"
waitfor "test -S /run/dbus/system_bus_socket" 100 || fail "no system bus"
libvirtd -d --listen -f /etc/libvirt/libvirtd.conf >>"$D/log/libvirtd.stderr" 2>&1 || fail "libvirtd"
waitfor "virsh -c qemu:///system uri" 300 || fail "libvirtd does not answer"
say "{name} libvirtd up uptime=$(cut -d' ' -f1 /proc/uptime)"
vmbeamd --config /etc/vmbeam/vmbeam.conf >>"$D/log/vmbeamd.log" 2>&1 &
waitfor "grep -q 'vmbeamd ready' $D/log/vmbeamd.log" 600 || fail "vmbeamd did not start"
# The lab's exec channel: one base64-encoded command line in, its output, then the end
# line with its exit status out (one command at a time; the host side is `nested exec`).
# The port stays open: Linux's virtio_console discards what arrives for a port no one
# has open, so a request written between one command's answer and reopening the port
# would be lost (a `head -n1 port` per request did lose them).
(
    exec 3<>/dev/virtio-ports/{EXEC_PORT}
    while :; do
        IFS= read -r line <&3 || {{ sleep 0.5; continue; }}
        [ -n "$line" ] || continue
        cmd=$(printf '%s' "$line" | base64 -d 2>/dev/null) || cmd="echo 'exec: bad request' >&2; exit 2"
        (cd / && sh -c "$cmd") </dev/null >/run/vmbeam-exec.out 2>&1 3>&-
        rc=$?
        {{ cat /run/vmbeam-exec.out; echo "{EXEC_END}$rc"; }} >&3
    done
) &
echo "{READY_MARKER} {name} uptime=$(cut -d' ' -f1 /proc/uptime)"
exec {reaper} reap -- sleep infinity
"#,
        name = cvm.name,
        addr = cvm.addr,
        pkgroot = pkgroot.display(),
        pool = crate::POOL_DIR,
        reaper = reaper.display(),
    )
}

/// The cloud VM's domain XML for the host libvirtd.
pub fn domain_xml(cvm: &NestedCvm, image: &crate::image::GuestImage, domain_type: &str) -> String {
    let meta = CloudVmMetadata {
        cloud: vmbeam_core::CloudId::new(&cvm.cloud).expect("a valid cloud id"),
    }
    .to_namespaced_xml();
    let mac = format!("52:54:00:c8:80:{:02x}", cvm.index);
    format!(
        r#"<domain type='{domain_type}'>
  <name>{domain}</name>
  <uuid>{uuid}</uuid>
  <metadata>{meta}</metadata>
  <memory unit='MiB'>{CVM_MEMORY_MIB}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 panic=-1 mitigations=off vmbeam.nested.dir={dir} vmbeam.nested.init={dir}/conf/start.sh</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <controller type='pci' index='0' model='pci-root'>
      <pcihole64 unit='GiB'>64</pcihole64>
    </controller>
    <filesystem type='mount' accessmode='passthrough' multidevs='remap'>
      <source dir='/'/>
      <target dir='{hostroot}'/>
      <readonly/>
    </filesystem>
    <filesystem type='mount' accessmode='passthrough'>
      <source dir='{dir}'/>
      <target dir='{cvmdata}'/>
    </filesystem>
    <interface type='bridge'>
      <source bridge='{BRIDGE}'/>
      <mac address='{mac}'/>
      <model type='virtio'/>
    </interface>
    <serial type='file'>
      <source path='{console}' append='off'/>
      <target port='0'/>
    </serial>
    <controller type='virtio-serial' index='0'/>
    <channel type='unix'>
      <source mode='bind' path='{channel}'/>
      <target type='virtio' name='{chan_name}'/>
    </channel>
    <channel type='unix'>
      <source mode='bind' path='{exec}'/>
      <target type='virtio' name='{EXEC_PORT}'/>
    </channel>
    <memballoon model='none'/>
  </devices>
</domain>
"#,
        domain = cvm.domain,
        uuid = cvm.uuid,
        kernel = image.kernel.display(),
        initrd = image.initrd.display(),
        dir = cvm.dir.display(),
        hostroot = image::HOSTROOT_TAG,
        cvmdata = image::CVMDATA_TAG,
        console = cvm.console.display(),
        channel = cvm.channel.display(),
        exec = cvm.exec.display(),
        chan_name = vmbeam_core::host_protocol::HOST_CHANNEL,
    )
}

/// What `nested up` did, with its timings.
#[derive(Debug, Clone)]
pub struct NestedUp {
    pub state: NestedState,
    pub image_secs: f64,
    pub host_secs: f64,
    pub total_secs: f64,
}

/// Brings the nested lab up. On failure everything made so far is removed again.
pub fn up(opts: &NestedUpOptions) -> Result<NestedUp, LabError> {
    if opts.cloud_vms == 0 || opts.cloud_vms > 8 {
        return Err(LabError::BadInput(format!(
            "--cloud-vms {} is out of range: use 1 to 8",
            opts.cloud_vms
        )));
    }
    if opts.other_cloud >= opts.cloud_vms {
        return Err(LabError::BadInput(format!(
            "--other-cloud {} leaves no cloud VM in {CLOUD}: use fewer than --cloud-vms ({})",
            opts.other_cloud, opts.cloud_vms
        )));
    }
    if !nix::unistd::Uid::effective().is_root() {
        return Err(LabError::NotRoot);
    }
    sys::require_programs(REQUIRED_PROGRAMS)?;
    let reaper = opts.lab_binary.clone();
    if !reaper.is_file() {
        return Err(LabError::BadInput(format!(
            "{} is missing: build vmbeam-lab first",
            reaper.display()
        )));
    }
    for b in ["vmbeamd", "vmbeam", "vmbeam-hook", "vmbeam-host"] {
        if !opts.bin_dir.join(b).is_file() {
            return Err(LabError::BadInput(format!(
                "{} is missing: build it first (cargo build -p vmbeamd -p vmbeam-cli -p vmbeam-hook -p vmbeam-host), or pass --bin-dir",
                opts.bin_dir.join(b).display()
            )));
        }
    }
    sys::cloexec_inherited_fds();
    let _lock = lock()?;
    if let Some(s) = NestedState::load()? {
        return Err(if s.complete {
            LabError::BadInput(format!(
                "a nested lab with {} cloud VM(s) is already up: `vmbeam-lab nested down` first",
                s.cloud_vms.len()
            ))
        } else {
            LabError::Conflict(format!(
                "a half-made nested lab is recorded in {}: run `vmbeam-lab nested down`",
                NestedState::path().display()
            ))
        });
    }
    for (what, exists) in [
        (
            format!("network namespace {HOST_NETNS}"),
            crate::net::netns_exists(HOST_NETNS),
        ),
        (LIB_ROOT.to_string(), Path::new(LIB_ROOT).exists()),
    ] {
        if exists {
            return Err(LabError::Conflict(format!("{what} already exists")));
        }
    }
    let t0 = Instant::now();
    let image = image::build(Path::new(CACHE_DIR))?;
    let accel = crate::probe::choose_accel(&image, Path::new(CACHE_DIR))?;
    let image_secs = t0.elapsed().as_secs_f64();
    tracing::info!(accel = %accel.accel, reason = %accel.reason, "cloud VM accelerator");

    fs::create_dir_all(RUN_ROOT).map_err(|e| LabError::io(format!("create {RUN_ROOT}"), e))?;
    let mut st = NestedState {
        version: 1,
        accel: Some(accel),
        ..Default::default()
    };
    st.record(Resource::Dir {
        path: RUN_ROOT.into(),
    })?;
    match build(&mut st, opts, &image, &reaper, t0) {
        Ok(host_secs) => {
            st.complete = true;
            st.save()?;
            Ok(NestedUp {
                state: st,
                image_secs,
                host_secs,
                total_secs: t0.elapsed().as_secs_f64(),
            })
        }
        Err(e) => {
            tracing::warn!(error = %e, "nested up failed: removing what it made");
            let r = teardown(&mut st);
            if !r.problems.is_empty() {
                tracing::warn!(problems = ?r.problems, "the roll-back left problems");
            }
            Err(e)
        }
    }
}

fn build(
    st: &mut NestedState,
    opts: &NestedUpOptions,
    image: &crate::image::GuestImage,
    reaper: &Path,
    t0: Instant,
) -> Result<f64, LabError> {
    let lib = Path::new(LIB_ROOT);
    make_dir(st, lib)?;
    // The cloud network, in a namespace of its own.
    sys::run("ip", &["netns", "add", HOST_NETNS])?;
    st.record(Resource::Netns {
        name: HOST_NETNS.into(),
    })?;
    for args in [
        vec!["link", "set", "lo", "up"],
        vec!["link", "add", BRIDGE, "type", "bridge"],
        vec!["addr", "add", BRIDGE_ADDR, "dev", BRIDGE],
        vec!["link", "set", BRIDGE, "up"],
    ] {
        sys::run_in_ns(HOST_NETNS, "ip", &args)?;
    }
    // The host libvirtd's private directories and configuration.
    let host = lib.join("host");
    for (d, _) in HOST_PRIVATE_DIRS {
        make_dir(st, &host.join(d))?;
    }
    let host_run = Path::new(RUN_ROOT).join("host-run");
    make_dir(st, &host_run.join("libvirt"))?;
    make_dir(st, &host.join("etc-libvirt/qemu"))?;
    write(
        &host.join("etc-libvirt/libvirtd.conf"),
        &host_libvirtd_conf(),
    )?;
    write(&host.join("etc-libvirt/qemu.conf"), &host_qemu_conf())?;
    for (_, mp) in HOST_PRIVATE_DIRS {
        make_dir(st, Path::new(mp))?;
    }
    let holder = start_holder(st, &host, &host_run)?;
    st.holder = holder;
    let log = host.join("var-log-libvirt/libvirtd.stderr");
    let child = spawn_logged(
        reaper,
        &[
            "reap",
            "--",
            "nsenter",
            "-t",
            &holder.pid.to_string(),
            "-m",
            "-n",
            "--wd=/",
            "--",
            "libvirtd",
            "-f",
            "/etc/libvirt/libvirtd.conf",
            "--pid-file",
            "/run/libvirt/libvirtd.pid",
        ],
        &log,
    )?;
    st.libvirtd = st.record_process(child, "nested host libvirtd")?;
    let uri = host_uri();
    let libvirtd = st.libvirtd;
    let ok = wait_for(Duration::from_secs(60), Duration::from_millis(200), || {
        if !libvirtd.alive() {
            return Some(false);
        }
        virt::connect::Connect::open(Some(&uri)).ok().map(|mut c| {
            let _ = c.close();
            true
        })
    });
    if ok != Some(true) {
        return Err(LabError::Setup(format!(
            "the nested host libvirtd did not come up at {uri}: {}",
            tail(&log, 4)
        )));
    }
    // The packages' tree and the cloud's key.
    let pkg = lib.join("pkgroot");
    make_dir(st, &pkg)?;
    pkgroot(&pkg, &opts.bin_dir)?;
    // One key per virtual IaaS cloud (tickets of one cloud mean nothing in another).
    let key = hex::encode(rand::random::<[u8; 32]>());
    let other_key = hex::encode(rand::random::<[u8; 32]>());
    // vmbeam-host, against the private libvirtd.
    let hs = lib.join("vmbeam-host");
    make_dir(st, &hs)?;
    st.host_state_dir = hs.join("state");
    st.host_log = hs.join("vmbeam-host.log");
    let chan = lib.join("chan");
    make_dir(st, &chan)?;
    let vh = opts.bin_dir.join("vmbeam-host");
    // Started directly (not under `vmbeam-lab reap`): it is in the host's namespaces, so
    // `down` finds it only by its own PID.
    let child = spawn_logged(
        &vh,
        &[
            "--connect",
            &uri,
            "--state-dir",
            &st.host_state_dir.to_string_lossy(),
            "--qemu-owner",
            "-",
        ],
        &st.host_log.clone(),
    )?;
    st.vmbeam_host = st.record_process(child, "vmbeam-host")?;
    let host_secs = t0.elapsed().as_secs_f64();

    // The cloud VMs: defined and started together, then waited for.
    let conn = virt::connect::Connect::open(Some(&uri))
        .map_err(|e| LabError::Libvirt(format!("{uri}: {e}")))?;
    let domain_type = st
        .accel
        .as_ref()
        .map_or("qemu".to_string(), |a| a.domain_type.clone());
    let mut started = Vec::new();
    for i in 1..=opts.cloud_vms {
        let name = format!("cvm{i}");
        let dir = lib.join(&name);
        make_dir(st, &dir.join("conf"))?;
        make_dir(st, &dir.join("log"))?;
        let addr = cvm_addr(i);
        let other = i > opts.cloud_vms - opts.other_cloud;
        let cvm = NestedCvm {
            cloud: (if other { OTHER_CLOUD } else { CLOUD }).to_string(),
            domain: format!("vmbeam-nested-{name}"),
            uuid: uuid_v4(),
            uri: format!("qemu+tcp://{addr}/system"),
            console: dir.join("log/console.log"),
            channel: chan.join(format!("{name}.sock")),
            exec: chan.join(format!("{name}.exec")),
            dir: dir.clone(),
            addr: addr.clone(),
            name: name.clone(),
            index: i,
            ready_secs: 0.0,
        };
        let conf = dir.join("conf");
        write(
            &conf.join("vmbeam.conf"),
            &cvm_vmbeam_conf(&name, &cvm.cloud),
        )?;
        write_private(
            &conf.join("cloud.key"),
            if other { &other_key } else { &key },
        )
        .map_err(|e| LabError::io(format!("write {}", conf.join("cloud.key").display()), e))?;
        write(
            &conf.join("libvirtd.conf"),
            &cvm_libvirtd_conf(&addr, &dir.join("log/libvirtd.log")),
        )?;
        write(&conf.join("qemu.conf"), &cvm_qemu_conf(&addr))?;
        write(&conf.join("start.sh"), &start_script(&cvm, &pkg, reaper))?;
        let xml = domain_xml(&cvm, image, &domain_type);
        let dom = virt::domain::Domain::define_xml(&conn, &xml)
            .map_err(|e| LabError::Libvirt(format!("define {}: {e}", cvm.domain)))?;
        st.cloud_vms.push(cvm);
        st.save()?;
        dom.create().map_err(|e| {
            LabError::Libvirt(format!(
                "start {}: {e}",
                st.cloud_vms.last().map_or("", |c| c.domain.as_str())
            ))
        })?;
        started.push(Instant::now());
    }
    let deadline = Instant::now() + READY_TIMEOUT;
    for (k, t) in started.iter().enumerate() {
        let cvm = st.cloud_vms[k].clone();
        let secs = wait_ready(&cvm, *t, deadline)?;
        st.cloud_vms[k].ready_secs = secs;
        st.save()?;
        tracing::info!(cvm = %cvm.name, secs, "cloud VM ready");
    }
    Ok(host_secs)
}

fn wait_ready(cvm: &NestedCvm, started: Instant, deadline: Instant) -> Result<f64, LabError> {
    loop {
        let text = fs::read_to_string(&cvm.console).unwrap_or_default();
        if text.contains(READY_MARKER) {
            return Ok(started.elapsed().as_secs_f64());
        }
        if let Some(line) = text.lines().find(|l| l.contains(FAILED_MARKER)) {
            return Err(LabError::Setup(format!(
                "cloud VM {} failed to start: {} (console: {})",
                cvm.name,
                line.trim(),
                cvm.console.display()
            )));
        }
        if Instant::now() >= deadline {
            return Err(LabError::Setup(format!(
                "cloud VM {} was not ready within {} s; its console ends: {}",
                cvm.name,
                READY_TIMEOUT.as_secs(),
                tail(&cvm.console, 3)
            )));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

pub(crate) fn uuid_v4() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(n).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

/// Starts `program args` in its own process group with stdout and stderr to `log`.
fn spawn_logged(program: &Path, args: &[&str], log: &Path) -> Result<u32, LabError> {
    let f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| LabError::io(format!("open {}", log.display()), e))?;
    let f2 = f.try_clone().map_err(|e| LabError::io("dup log", e))?;
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(f)
        .stderr(f2)
        .env_remove("DBUS_SYSTEM_BUS_ADDRESS")
        .env_remove("DBUS_SESSION_BUS_ADDRESS")
        .env_remove("LIBVIRT_DEFAULT_URI")
        .process_group(0)
        .spawn()
        .map_err(|e| LabError::io(format!("start {}", program.display()), e))?;
    let pid = child.id();
    // Not waited for here: `nested down` ends it by PID and start time.
    std::mem::forget(child);
    Ok(pid)
}

/// Starts the process that holds the host libvirtd's mount namespace (in [`HOST_NETNS`]):
/// it binds the private directories, says `ready`, then sleeps for the lab's life.
fn start_holder(st: &mut NestedState, host: &Path, host_run: &Path) -> Result<Proc, LabError> {
    let mut script = String::from("set -e\n");
    for (d, mp) in HOST_PRIVATE_DIRS {
        script.push_str(&format!(
            "mount --bind '{}' '{mp}'\n",
            host.join(d).display()
        ));
    }
    script.push_str(&format!("mount --bind '{}' /run\n", host_run.display()));
    script.push_str("echo ready\nexec sleep infinity </dev/null >/dev/null 2>&1\n");
    let mut child = Command::new("ip")
        .args([
            "netns",
            "exec",
            HOST_NETNS,
            "unshare",
            "--mount",
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
        .map_err(|e| LabError::io("start the host libvirtd's namespace holder", e))?;
    let p = st.record_process(child.id(), "nested host libvirtd namespace holder")?;
    let mut line = String::new();
    let stdout = child.stdout.take().expect("piped stdout");
    use std::io::BufRead as _;
    std::io::BufReader::new(stdout).read_line(&mut line).ok();
    if line.trim() != "ready" {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            use std::io::Read as _;
            let _ = e.read_to_string(&mut err);
        }
        let _ = child.wait();
        return Err(LabError::Setup(format!(
            "the host libvirtd's namespace set-up failed: {}",
            err.trim()
        )));
    }
    // The holder sleeps now; `nested down` ends it by PID.
    std::mem::forget(child);
    Ok(p)
}

/// What `nested down` removed.
#[derive(Debug, Default, Clone)]
pub struct NestedDown {
    pub domains: usize,
    pub processes: usize,
    pub namespaces: usize,
    pub dirs: usize,
    /// vmbeam-host's backing files left in /dev/shm.
    pub files: usize,
    pub problems: Vec<String>,
}

/// Removes the nested lab (exactly what its state file records).
pub fn down() -> Result<NestedDown, LabError> {
    if !nix::unistd::Uid::effective().is_root() {
        return Err(LabError::NotRoot);
    }
    let _lock = lock()?;
    let Some(mut st) = NestedState::load()? else {
        return Err(LabError::BadInput(
            "no nested lab is up (nothing recorded in /run/vmbeam-nested)".into(),
        ));
    };
    Ok(teardown(&mut st))
}

fn teardown(st: &mut NestedState) -> NestedDown {
    let mut r = NestedDown::default();
    // 1. The cloud VMs, through the host libvirtd while it is there.
    if st.libvirtd.alive() {
        if let Ok(mut conn) = virt::connect::Connect::open(Some(&host_uri())) {
            for c in &st.cloud_vms {
                if let Ok(d) = virt::domain::Domain::lookup_by_name(&conn, &c.domain) {
                    if d.is_active().unwrap_or(false) && d.destroy().is_ok() {
                        r.domains += 1;
                    }
                    let _ = d.undefine();
                }
            }
            let _ = conn.close();
        }
    }
    // 2. Recorded processes, newest first; then whatever is left in the lab's namespace
    //    (QEMUs whose libvirtd died).
    for res in st.resources.iter().rev() {
        if let Resource::Process {
            pid, start_time, ..
        } = res
        {
            if process_alive(*pid, *start_time) {
                r.processes += 1;
            }
            sys::terminate(*pid, *start_time, Duration::from_secs(5));
        }
    }
    for res in &st.resources {
        if let Resource::Netns { name } = res {
            for pid in sys::pids_in_netns(&Path::new("/run/netns").join(name)) {
                if let Some(t) = process_start_time(pid) {
                    r.processes += 1;
                    sys::terminate(pid, t, Duration::from_secs(3));
                }
            }
        }
    }
    // 3. The backing files vmbeam-host made for the nested cloud's guests and could not
    //    give back (the cloud VMs went before their guests): `/dev/shm/vmbeam-CLOUD-*`, a
    //    name only this lab's cloud has.
    let prefix = format!("vmbeam-{CLOUD}-");
    for e in fs::read_dir("/dev/shm").into_iter().flatten().flatten() {
        if e.file_name().to_string_lossy().starts_with(&prefix) {
            match fs::remove_file(e.path()) {
                Ok(()) => r.files += 1,
                Err(err) => r
                    .problems
                    .push(format!("remove {}: {err}", e.path().display())),
            }
        }
    }
    // 4. The rest, newest first.
    for res in st.resources.iter().rev() {
        match res {
            Resource::Process { .. } | Resource::Mount { .. } | Resource::HostLink { .. } => {}
            Resource::Netns { name } => {
                if crate::net::netns_exists(name) {
                    match sys::run("ip", &["netns", "del", name]) {
                        Ok(_) => r.namespaces += 1,
                        Err(e) => r.problems.push(e.to_string()),
                    }
                }
            }
            Resource::Dir { path } => {
                let ours = path.starts_with(LIB_ROOT) || path.starts_with(RUN_ROOT);
                if ours && path.as_path() == Path::new(RUN_ROOT) {
                    // The state file goes last, below.
                    continue;
                }
                let res = if ours {
                    fs::remove_dir_all(path)
                } else {
                    fs::remove_dir(path)
                };
                match res {
                    Ok(()) => r.dirs += 1,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => r.problems.push(format!("remove {}: {e}", path.display())),
                }
            }
        }
    }
    if r.problems.is_empty() {
        let _ = fs::remove_dir_all(RUN_ROOT);
    } else {
        st.complete = false;
        let _ = st.save();
    }
    r
}

/// Runs `command` (a program and its arguments) inside cloud VM `cvm` through the lab's
/// exec channel, as root in the cloud VM's root directory; returns its exit status and its
/// output (stdout and stderr together). A lab tool: the product never uses this channel.
pub fn exec(cvm: &str, command: &[String]) -> Result<(i32, String), LabError> {
    use base64::Engine as _;
    use std::io::{BufRead as _, Write as _};
    let Some(st) = NestedState::load()?.filter(|s| s.complete) else {
        return Err(LabError::BadInput(
            "no nested lab is up: run `vmbeam-lab nested up`".into(),
        ));
    };
    let Some(c) = st.cloud_vms.iter().find(|c| c.name == cvm) else {
        return Err(LabError::UnknownCloudVm {
            name: cvm.into(),
            known: st.cloud_vms.iter().map(|c| c.name.clone()).collect(),
        });
    };
    if command.is_empty() {
        return Err(LabError::BadInput("exec: no command given".into()));
    }
    let line = shell_words(command);
    let mut sock = std::os::unix::net::UnixStream::connect(&c.exec).map_err(|e| {
        LabError::io(
            format!("connect to {}'s exec channel {}", c.name, c.exec.display()),
            e,
        )
    })?;
    sock.set_read_timeout(Some(EXEC_TIMEOUT))
        .map_err(|e| LabError::io("set the exec channel's timeout", e))?;
    let req = base64::engine::general_purpose::STANDARD.encode(line.as_bytes());
    sock.write_all(format!("{req}\n").as_bytes())
        .map_err(|e| LabError::io(format!("write to {}'s exec channel", c.name), e))?;
    let mut out = String::new();
    let mut r = std::io::BufReader::new(sock);
    loop {
        let mut l = String::new();
        let n = r.read_line(&mut l).map_err(|e| {
            LabError::io(
                format!("read {}'s exec channel (command: {line})", c.name),
                e,
            )
        })?;
        if n == 0 {
            return Err(LabError::Setup(format!(
                "{}'s exec channel closed before `{line}` ended",
                c.name
            )));
        }
        if let Some(rc) = l.trim_end().strip_prefix(EXEC_END) {
            let rc = rc.parse().map_err(|_| {
                LabError::Setup(format!(
                    "{}'s exec channel sent a bad end line: {l:?}",
                    c.name
                ))
            })?;
            return Ok((rc, out));
        }
        out.push_str(&l);
    }
}

/// `command` as one POSIX shell command line (each word single-quoted where it needs it).
pub fn shell_words(command: &[String]) -> String {
    command
        .iter()
        .map(|w| {
            if !w.is_empty()
                && w.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c))
            {
                w.clone()
            } else {
                format!("'{}'", w.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// One cloud VM as `nested status` shows it.
#[derive(Debug, Clone)]
pub struct CvmStatus {
    pub cvm: NestedCvm,
    /// Its domain's state in the host libvirtd.
    pub domain_state: String,
    /// Its libvirtd's answer (`virConnectGetHostname`) or the error.
    pub libvirtd: Result<String, String>,
    /// Whether vmbeam-host shows its channel connected.
    pub host_connected: bool,
    /// Whether vmbeam-host answered a HELLO from it.
    pub hello: bool,
}

/// The nested lab as `nested status` shows it.
#[derive(Debug, Clone)]
pub struct NestedStatus {
    pub state: NestedState,
    pub libvirtd_alive: bool,
    pub vmbeam_host_alive: bool,
    pub cloud_vms: Vec<CvmStatus>,
}

/// Asks every part of the nested lab how it is. A cloud VM's libvirtd is asked from the
/// cloud network's namespace (`virsh -c qemu+tcp://ADDR/system hostname`).
pub fn status() -> Result<NestedStatus, LabError> {
    let Some(st) = NestedState::load()? else {
        return Err(LabError::BadInput(
            "no nested lab is up: run `vmbeam-lab nested up`".into(),
        ));
    };
    let snapshot: serde_json::Value = fs::read(st.host_state_dir.join("status.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let host_log = fs::read_to_string(&st.host_log).unwrap_or_default();
    let conn = virt::connect::Connect::open(Some(&host_uri())).ok();
    let mut cvms = Vec::new();
    for c in &st.cloud_vms {
        let domain_state = conn
            .as_ref()
            .and_then(|k| virt::domain::Domain::lookup_by_name(k, &c.domain).ok())
            .and_then(|d| d.get_state().ok())
            .map_or("unknown".to_string(), |(s, _)| {
                if s == virt::sys::VIR_DOMAIN_RUNNING {
                    "running".to_string()
                } else {
                    format!("state {s}")
                }
            });
        let libvirtd = sys::run_in_ns(HOST_NETNS, "virsh", &["-c", c.uri.as_str(), "hostname"])
            .map(|s| s.trim().to_string())
            .map_err(|e| e.to_string());
        let host_connected = snapshot["cloud_vms"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|v| v["id"].as_str() == Some(c.uuid.as_str()) && v["connected"] == true);
        let hello = host_log
            .lines()
            .any(|l| l.contains("HELLO answered") && l.contains(&c.uuid));
        cvms.push(CvmStatus {
            cvm: c.clone(),
            domain_state,
            libvirtd,
            host_connected,
            hello,
        });
    }
    if let Some(mut k) = conn {
        let _ = k.close();
    }
    Ok(NestedStatus {
        libvirtd_alive: st.libvirtd.alive(),
        vmbeam_host_alive: st.vmbeam_host.alive(),
        state: st,
        cloud_vms: cvms,
    })
}

/// Waits until every cloud VM's libvirtd answers and vmbeam-host has answered a HELLO from
/// every cloud VM's vmbeamd; returns the last status.
pub fn wait_healthy(timeout: Duration) -> Result<NestedStatus, LabError> {
    let deadline = Instant::now() + timeout;
    loop {
        let s = status()?;
        let ok = s.libvirtd_alive
            && s.vmbeam_host_alive
            && s.cloud_vms
                .iter()
                .all(|c| c.libvirtd.is_ok() && c.hello && c.host_connected);
        if ok || Instant::now() >= deadline {
            return Ok(s);
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// For `std::io::Write` users of the status (the CLI prints it).
pub fn render_status(s: &NestedStatus, out: &mut impl std::io::Write) -> std::io::Result<()> {
    writeln!(
        out,
        "host libvirtd: {} ({})   vmbeam-host: {}   accel: {}",
        if s.libvirtd_alive { "running" } else { "DEAD" },
        host_uri(),
        if s.vmbeam_host_alive {
            "running"
        } else {
            "DEAD"
        },
        s.state.accel.as_ref().map_or("?", |a| a.accel.as_str()),
    )?;
    for c in &s.cloud_vms {
        writeln!(
            out,
            "{:<5} {:<15} domain {:<8} libvirtd {:<28} host channel {:<12} HELLO {}",
            c.cvm.name,
            c.cvm.addr,
            c.domain_state,
            match &c.libvirtd {
                Ok(h) => format!("answers ({h})"),
                Err(_) => "NOT ANSWERING".to_string(),
            },
            if c.host_connected {
                "connected"
            } else {
                "not connected"
            },
            if c.hello { "yes" } else { "no" },
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cvm() -> NestedCvm {
        NestedCvm {
            name: "cvm1".into(),
            index: 1,
            domain: "vmbeam-nested-cvm1".into(),
            uuid: "6f1c6d2e-0b9a-4c1e-9a37-1d2c3b4a5f60".into(),
            addr: cvm_addr(1),
            cloud: CLOUD.into(),
            uri: format!("qemu+tcp://{}/system", cvm_addr(1)),
            dir: PathBuf::from("/var/lib/vmbeam-nested/cvm1"),
            console: PathBuf::from("/var/lib/vmbeam-nested/cvm1/log/console.log"),
            channel: PathBuf::from("/var/lib/vmbeam-nested/chan/cvm1.sock"),
            exec: PathBuf::from("/var/lib/vmbeam-nested/chan/cvm1.exec"),
            ready_secs: 0.0,
        }
    }

    fn img() -> crate::image::GuestImage {
        crate::image::GuestImage {
            kernel: "/var/cache/vmbeam-nested/images/cvm-x/vmlinuz".into(),
            initrd: "/var/cache/vmbeam-nested/images/cvm-x/initrd.cpio".into(),
            kernel_version: "6.1.0-57-amd64".into(),
            id: "x".into(),
        }
    }

    #[test]
    fn addresses_stay_in_the_nested_range() {
        assert_eq!(cvm_addr(1), "198.18.128.11");
        assert_eq!(cvm_addr(8), "198.18.128.18");
        assert!(BRIDGE_ADDR.starts_with("198.18.128."));
        assert!(BRIDGE.starts_with("vbn-") && HOST_NETNS.starts_with("vbn-"));
    }

    #[test]
    fn the_domain_is_a_cloud_vm_vmbeam_host_can_use() {
        let xml = domain_xml(&cvm(), &img(), "qemu");
        // vmbeam-host's own reading of a cloud VM's XML.
        let meta = CloudVmMetadata::from_domain_xml(&xml).unwrap().unwrap();
        assert_eq!(meta.cloud.as_str(), CLOUD);
        assert!(xml.contains("<type arch='x86_64' machine='pc'>hvm</type>"));
        assert!(xml.contains("<pcihole64 unit='GiB'>64</pcihole64>"));
        assert!(xml.contains(
            "<source mode='bind' path='/var/lib/vmbeam-nested/chan/cvm1.sock'/>\n      <target type='virtio' name='org.vmbeam.host.0'/>"
        ));
        assert!(xml.contains("multidevs='remap'>\n      <source dir='/'/>\n      <target dir='hostroot'/>\n      <readonly/>"));
        assert!(xml.contains("<source bridge='vbn-br0'/>"));
        assert!(xml.contains("vmbeam.nested.init=/var/lib/vmbeam-nested/cvm1/conf/start.sh"));
        assert!(xml.starts_with("<domain type='qemu'>"));
    }

    #[test]
    fn the_cloud_vm_uses_the_host_device_pool() {
        let c = cvm_vmbeam_conf("cvm1", CLOUD);
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("vmbeam.conf");
        fs::write(&conf, &c).unwrap();
        let key = dir.path().join("cloud.key");
        write_private(&key, &"ab".repeat(32)).unwrap();
        let c = c.replace("/etc/vmbeam/cloud.key", &key.to_string_lossy());
        fs::write(&conf, c).unwrap();
        let id = vmbeam_core::identity::Identity::load(&conf).unwrap();
        assert_eq!(id.pool.name(), "host-device");
    }

    #[test]
    fn the_start_script_installs_before_it_starts_and_marks_ready_last() {
        let s = start_script(
            &cvm(),
            Path::new("/var/lib/vmbeam-nested/pkgroot"),
            Path::new("/x/vmbeam-lab"),
        );
        let fresh = s.find("mount -t tmpfs -o mode=0755 tmpfs \"$m\"").unwrap();
        let install = s.find("cp -rs /var/lib/vmbeam-nested/pkgroot/. /").unwrap();
        assert!(fresh < install);
        let bus = s.find("dbus-daemon --system").unwrap();
        let lv = s.find("libvirtd -d --listen").unwrap();
        let vd = s.find("vmbeamd --config /etc/vmbeam/vmbeam.conf").unwrap();
        let ready = s.find("echo \"VMBEAM-NESTED-READY cvm1").unwrap();
        assert!(install < bus && bus < lv && lv < vd && vd < ready);
        assert!(s.contains("ip addr add 198.18.128.11/20 dev eth0"));
        assert!(s.ends_with("exec /x/vmbeam-lab reap -- sleep infinity\n"));
    }

    #[test]
    fn the_packages_tree_matches_install_tree_sh() {
        let script = include_str!("../../../packaging/install-tree.sh");
        for (rel, f) in pkgroot_files() {
            match f {
                PkgFile::Binary(b) => {
                    assert!(script.contains(&format!("\"$bin/{b}\" /{rel}")), "{rel}")
                }
                PkgFile::Symlink(t) => {
                    assert!(script.contains(&format!("hook={t}")), "{rel}");
                    assert!(script.contains(&format!("\"$dest/{rel}\"")), "{rel}");
                }
                PkgFile::Text(_) => assert!(script.contains(&format!(" /{rel}")), "{rel}"),
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let bins = dir.path().join("bin");
        fs::create_dir(&bins).unwrap();
        for b in ["vmbeamd", "vmbeam", "vmbeam-hook"] {
            fs::write(bins.join(b), b).unwrap();
        }
        let root = dir.path().join("root");
        pkgroot(&root, &bins).unwrap();
        assert_eq!(fs::read(root.join("usr/sbin/vmbeamd")).unwrap(), b"vmbeamd");
        assert_eq!(
            fs::read_link(root.join("etc/libvirt/hooks/qemu.d/vmbeam")).unwrap(),
            Path::new("/usr/libexec/vmbeam/vmbeam-hook")
        );
        fs::remove_file(bins.join("vmbeam")).unwrap();
        let e = pkgroot(&dir.path().join("root2"), &bins).unwrap_err();
        assert!(e.to_string().contains("vmbeam is missing"), "{e}");
    }

    #[test]
    fn a_cloud_vm_count_out_of_range_is_refused_before_anything_is_made() {
        for n in [0, 9] {
            let e = up(&NestedUpOptions {
                cloud_vms: n,
                other_cloud: 0,
                bin_dir: PathBuf::from("/nonexistent"),
                lab_binary: PathBuf::from("/nonexistent/vmbeam-lab"),
            })
            .unwrap_err();
            assert!(matches!(e, LabError::BadInput(_)), "{e}");
            assert!(e
                .to_string()
                .contains(&format!("--cloud-vms {n} is out of range")));
        }
        let e = up(&NestedUpOptions {
            cloud_vms: 2,
            other_cloud: 2,
            bin_dir: PathBuf::from("/nonexistent"),
            lab_binary: PathBuf::from("/nonexistent/vmbeam-lab"),
        })
        .unwrap_err();
        assert!(
            e.to_string().contains("--other-cloud 2 leaves no cloud VM"),
            "{e}"
        );
    }

    #[test]
    fn exec_quotes_each_word_for_the_shell() {
        let w = |v: &[&str]| shell_words(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(w(&["vmbeam", "status"]), "vmbeam status");
        assert_eq!(
            w(&["echo", "a b", "it's", "", "$HOME"]),
            "echo 'a b' 'it'\\''s' '' '$HOME'"
        );
        // What sh makes of it: the words back.
        let out = Command::new("sh")
            .args([
                "-c",
                &format!("printf '[%s]' {}", w(&["a b", "it's", "", "$X;`y`"])),
            ])
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "[a b][it's][][$X;`y`]"
        );
    }

    #[test]
    fn uuids_are_version_4() {
        let u = uuid_v4();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert_ne!(u, uuid_v4());
    }
}

/// The nested lab for real: root, QEMU, libvirtd, and the workspace's binaries built
/// (`cargo build -p vmbeamd -p vmbeam-cli -p vmbeam-hook -p vmbeam-host -p vmbeam-lab-cli`).
/// Behind the `nested-tests` feature, which no tier of scripts/test.sh turns on yet (about
/// a minute under TCG on two cores): `cargo test -p vmbeam-lab --features nested-tests
/// nested_e2e -- --nocapture`.
#[cfg(all(test, feature = "nested-tests"))]
mod nested_e2e {
    use super::*;

    /// `target/<profile>`, where the binaries are built beside this test's `deps/`.
    fn bin_dir() -> PathBuf {
        let exe = std::env::current_exe().unwrap();
        let dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
        for b in [
            "vmbeam-lab",
            "vmbeamd",
            "vmbeam",
            "vmbeam-hook",
            "vmbeam-host",
        ] {
            assert!(
                dir.join(b).is_file(),
                "{} is not built: cargo build -p vmbeamd -p vmbeam-cli -p vmbeam-hook -p vmbeam-host -p vmbeam-lab-cli",
                dir.join(b).display()
            );
        }
        dir
    }

    fn lab(args: &[&str]) -> (bool, String) {
        let out = Command::new(bin_dir().join("vmbeam-lab"))
            .args(args)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("$ vmbeam-lab {}\n{text}", args.join(" "));
        (out.status.success(), text)
    }

    /// Tears the nested lab down if the test panics half-way.
    struct Down;
    impl Drop for Down {
        fn drop(&mut self) {
            if NestedState::path().exists() {
                let _ = lab(&["nested", "down"]);
            }
        }
    }

    /// Processes whose command line names the nested lab's directories or namespace.
    fn leftover_processes() -> Vec<String> {
        let mut v = Vec::new();
        for e in fs::read_dir("/proc").unwrap().flatten() {
            if e.file_name().to_string_lossy().parse::<u32>().is_err() {
                continue;
            }
            let cmd = fs::read(e.path().join("cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(RUN_ROOT) || cmd.contains(LIB_ROOT) || cmd.contains(HOST_NETNS) {
                v.push(format!("{}: {cmd}", e.file_name().to_string_lossy()));
            }
        }
        v
    }

    #[test]
    fn nested_up_reaches_every_cloud_vm_and_down_leaves_nothing() {
        assert!(
            NestedState::load().unwrap().is_none(),
            "a nested lab is already up: vmbeam-lab nested down"
        );
        let _guard = Down;
        let t = Instant::now();
        let (ok, text) = lab(&["nested", "up", "--cloud-vms", "2"]);
        assert!(ok, "nested up failed:\n{text}");
        let up_secs = t.elapsed().as_secs_f64();

        let st = NestedState::load().unwrap().expect("recorded");
        assert!(st.complete);
        // A second `up` is refused and changes nothing.
        let (ok, text) = lab(&["nested", "up"]);
        assert!(!ok && text.contains("already up"), "{text}");
        assert_eq!(NestedState::load().unwrap().as_ref(), Some(&st));
        assert_eq!(st.cloud_vms.len(), 2);
        let s = status().unwrap();
        assert!(s.libvirtd_alive && s.vmbeam_host_alive);
        for c in &s.cloud_vms {
            // Its own libvirtd, over the cloud network, is the cloud VM itself: its host
            // UUID is the domain's UUID in the host libvirtd (SMBIOS).
            assert_eq!(
                c.libvirtd.as_deref(),
                Ok(c.cvm.name.as_str()),
                "{}",
                c.cvm.name
            );
            let caps =
                sys::run_in_ns(HOST_NETNS, "virsh", &["-c", &c.cvm.uri, "capabilities"]).unwrap();
            assert!(
                caps.contains(&format!("<uuid>{}</uuid>", c.cvm.uuid)),
                "{}",
                c.cvm.name
            );
            // A fresh libvirt: none of the host libvirtd's definitions (its /etc/libvirt
            // is in the cloud VM's lower layer).
            let doms = sys::run_in_ns(
                HOST_NETNS,
                "virsh",
                &["-c", &c.cvm.uri, "list", "--all", "--name"],
            )
            .unwrap();
            assert_eq!(doms.trim(), "", "{}", c.cvm.name);
            assert!(
                c.host_connected,
                "{}: vmbeam-host has no channel",
                c.cvm.name
            );
            assert!(c.hello, "{}: no HELLO in vmbeam-host's log", c.cvm.name);
            // The hook and the configuration are where the packages put them.
            let log = fs::read_to_string(c.cvm.dir.join("log/vmbeamd.log")).unwrap();
            assert!(log.contains("beam pool kind=\"host-device\""), "{log}");
            assert!(log.contains("host channel: HELLO answered"), "{log}");
        }
        // The lab's exec channel: output, exit status, the product's CLI against vmbeamd.
        assert_eq!(
            exec("cvm2", &["hostname".to_string()]).unwrap(),
            (0, "cvm2\n".to_string())
        );
        assert_eq!(exec("cvm1", &["false".to_string()]).unwrap().0, 1);
        let (ok, text) = lab(&[
            "nested",
            "exec",
            "cvm1",
            "--",
            "sh",
            "-c",
            "readlink /etc/libvirt/hooks/qemu.d/vmbeam; cat /etc/vmbeam/vmbeam.conf",
        ]);
        assert!(ok, "{text}");
        assert!(text.contains("/usr/libexec/vmbeam/vmbeam-hook"), "{text}");
        assert!(text.contains("pool_kind = \"host-device\""), "{text}");
        let (ok, text) = lab(&["nested", "exec", "cvm1", "--", "vmbeam", "status"]);
        assert!(ok, "vmbeam status in cvm1:\n{text}");
        // vmbeam-host's own view: both cloud VMs, in the nested cloud, channel connected.
        let out = Command::new(bin_dir().join("vmbeam-host"))
            .args(["status", "--json", "--state-dir"])
            .arg(&st.host_state_dir)
            .output()
            .unwrap();
        assert!(out.status.success());
        let snap: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let cvms = snap["cloud_vms"].as_array().unwrap();
        assert_eq!(cvms.len(), 2, "{snap}");
        assert!(cvms
            .iter()
            .all(|c| c["cloud"] == CLOUD && c["connected"] == true));

        let t = Instant::now();
        let (ok, text) = lab(&["nested", "down"]);
        assert!(ok, "nested down failed:\n{text}");
        let down_secs = t.elapsed().as_secs_f64();
        let (ok, text) = lab(&["nested", "down"]);
        assert!(!ok && text.contains("no nested lab is up"), "{text}");
        assert!(!Path::new(RUN_ROOT).exists());
        assert!(!Path::new(LIB_ROOT).exists());
        assert!(!crate::net::netns_exists(HOST_NETNS));
        let prefix = format!("vmbeam-{CLOUD}-");
        assert!(!fs::read_dir("/dev/shm")
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with(&prefix)));
        for r in &st.resources {
            if let Resource::Process {
                pid,
                start_time,
                what,
            } = r
            {
                assert!(
                    !process_alive(*pid, *start_time),
                    "{what} ({pid}) still runs"
                );
            }
        }
        assert_eq!(leftover_processes(), Vec::<String>::new());
        eprintln!(
            "nested up {up_secs:.1} s (cloud VMs ready in {:?} s), down {down_secs:.1} s",
            st.cloud_vms
                .iter()
                .map(|c| c.ready_secs)
                .collect::<Vec<_>>()
        );
    }
}
