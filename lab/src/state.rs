//! What a running lab is made of, recorded on disk as it is made, so that `lab down`
//! removes exactly that (and a failed `lab up` rolls back exactly that).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where the lab keeps its state and per-cloud-VM directories on the host.
pub const LAB_ROOT: &str = "/run/vmbeam-lab";
/// The state file inside [`LAB_ROOT`].
pub const STATE_FILE: &str = "state.json";
/// Cache for the guest image and the accelerator probe (kept across labs).
pub const CACHE_DIR: &str = "/var/cache/vmbeam-lab";

/// One thing the lab created, in creation order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Resource {
    /// A directory the lab created (removed with its contents only if under the lab root,
    /// otherwise only if empty).
    Dir { path: PathBuf },
    /// A mount the lab made on the host.
    Mount { path: PathBuf },
    /// A network namespace (`ip netns add`).
    Netns { name: String },
    /// A network link in the host namespace (links inside lab namespaces go with them).
    HostLink { name: String },
    /// A process, identified by PID and start time.
    Process {
        pid: u32,
        start_time: u64,
        what: String,
    },
}

/// One cloud VM of the lab.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloudVm {
    /// Its name, also its hostname and VMBeam host id (`cvm1`, ...).
    pub name: String,
    /// Its index, 1-based.
    pub index: u32,
    /// Its network namespace.
    pub netns: String,
    /// Its address on the cloud network.
    pub addr: String,
    /// Its libvirt URI (`qemu+tcp://ADDR/system`).
    pub uri: String,
    /// libvirt's host UUID for this instance (distinct per cloud VM).
    pub host_uuid: String,
    /// Host directory that backs its private directories.
    pub root: PathBuf,
    /// PID of the process holding its mount and UTS namespaces.
    pub holder_pid: u32,
    /// Start time of that process.
    pub holder_start: u64,
    /// PID of its libvirtd.
    pub libvirtd_pid: u32,
    /// Start time of its libvirtd.
    pub libvirtd_start: u64,
    /// PID and start time of its system bus (a dbus-daemon of its own).
    pub dbus_pid: u32,
    pub dbus_start: u64,
    /// PID and start time of its vmbeamd.
    pub vmbeamd_pid: u32,
    pub vmbeamd_start: u64,
    /// Its virtual IaaS cloud.
    pub cloud: String,
    /// Host path of the pool it sees (the shared one unless it has one of its own).
    pub pool: PathBuf,
    /// Whether that pool is its own (not shared).
    pub own_pool: bool,
    /// Where the VMBeam binaries it runs live.
    pub bin_dir: PathBuf,
}

impl CloudVm {
    /// The host path of a path as seen inside this cloud VM's private `/run`.
    pub fn host_run_path(&self, inner: &str) -> PathBuf {
        self.root
            .join("run")
            .join(inner.trim_start_matches("/run/"))
    }
}

/// The accelerator the lab's guests use, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccelChoice {
    /// `kvm` or `tcg`.
    pub accel: String,
    /// libvirt domain type: `kvm` or `qemu`.
    pub domain_type: String,
    /// Why (the probe's findings).
    pub reason: String,
    /// Boot time to init measured by the probe with the chosen accelerator, in ms.
    pub boot_ms: u64,
}

/// A guest the lab created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestRecord {
    pub name: String,
    pub uuid: String,
    pub memory_mib: u64,
    pub fill_mib: u64,
    pub dirty_rate: u64,
    /// Virtual CPUs (threads of one core when more than one).
    #[serde(default = "one_vcpu")]
    pub vcpus: u32,
    pub ip: String,
    pub mac: String,
    /// Cloud VM it was created on.
    pub created_on: String,
}

fn one_vcpu() -> u32 {
    1
}

/// Link shaping requested for the cloud VMs' links.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Shaping {
    pub bandwidth_mbit: Option<u32>,
    pub latency_ms: Option<u32>,
}

/// The whole lab.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct LabState {
    /// Format version of this file.
    pub version: u32,
    /// Everything created, in order.
    pub resources: Vec<Resource>,
    pub cloud_vms: Vec<CloudVm>,
    pub shaping: Shaping,
    /// Host path of the shared beam pool (a tmpfs), seen as [`crate::POOL_DIR`] inside every cloud VM.
    pub pool: PathBuf,
    pub accel: Option<AccelChoice>,
    pub guests: Vec<GuestRecord>,
    /// Network namespace of the load generator.
    pub loadgen_netns: Option<String>,
    /// Whether `up` completed.
    pub complete: bool,
    /// Directories every cloud VM's libvirt treats as shared storage (`shared_filesystems`
    /// of its qemu.conf): the host's file system, which every cloud VM sees, is shared storage
    /// libvirt cannot detect (e.g. Nova's instances directory in the OpenStack test).
    #[serde(default)]
    pub shared_fs: Vec<PathBuf>,
}

impl LabState {
    /// The state file's path.
    pub fn path() -> PathBuf {
        Path::new(LAB_ROOT).join(STATE_FILE)
    }

    /// Loads the state, `Ok(None)` when no lab is recorded.
    pub fn load() -> std::io::Result<Option<LabState>> {
        match std::fs::read(Self::path()) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Saves the state atomically (write to a temp file, then rename).
    pub fn save(&self) -> std::io::Result<()> {
        let path = Self::path();
        let tmp = path.with_extension("json.tmp");
        std::fs::write(
            &tmp,
            serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?,
        )?;
        std::fs::rename(tmp, path)
    }

    /// Records a resource and saves immediately, so a crash mid-`up` still leaves a record.
    pub fn record(&mut self, r: Resource) -> std::io::Result<()> {
        self.resources.push(r);
        self.save()
    }

    /// The cloud VM with this name.
    pub fn cloud_vm(&self, name: &str) -> Option<&CloudVm> {
        self.cloud_vms.iter().find(|c| c.name == name)
    }

    /// The guest with this name.
    pub fn guest(&self, name: &str) -> Option<&GuestRecord> {
        self.guests.iter().find(|g| g.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips() {
        let mut s = LabState {
            version: 1,
            ..Default::default()
        };
        s.resources.push(Resource::Netns {
            name: "vmbeam-cvm1".into(),
        });
        s.resources.push(Resource::Process {
            pid: 42,
            start_time: 7,
            what: "libvirtd".into(),
        });
        let j = serde_json::to_string(&s).unwrap();
        assert!(j.contains("\"kind\":\"netns\""));
        let back: LabState = serde_json::from_str(&j).unwrap();
        assert_eq!(back, s);
    }
}
