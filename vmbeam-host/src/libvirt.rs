//! The host's I/O behind two traits: the primary cloud's libvirt ([`HostLibvirt`]: list the
//! running domains, hot-plug and hot-unplug a device) and the backing files in `/dev/shm`
//! ([`BackingFiles`]), with their real implementations ([`VirtLibvirt`] over the `virt`
//! crate, [`ShmDir`]) and [`run`], which executes a ledger [`Transition`]'s steps.
//!
//! Both traits are blocking: the server calls them on tokio's blocking threads. The unit
//! tests run the ledger and the server against a fake (`libvirt::fake`, tests and the
//! `test-support` feature only); the real implementations against a real libvirt with real
//! cloud VMs are exercised by the nested lab's end-to-end tests.
//!
//! libvirt domain events are not used: the `virt` 0.4 binding does not wrap
//! `virConnectDomainEventRegisterAny` (that would need libvirt's event loop and unsafe
//! callbacks). The server rescans instead, and [`VirtLibvirt::detach_live`] waits for a
//! removal by reading the live XML, which libvirt documents as the alternative to the
//! `DEVICE_REMOVED` event (see [`crate::device`] for how libvirt signals removal).

use std::collections::BTreeSet;
use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virt::connect::Connect;
use virt::domain::Domain;
use virt::sys;

use crate::cloudvm::{shmem_names, CloudVmId, DomainXml};
use crate::device::{GuestKey, ShmemDevice, SHMEM_PREFIX};
use crate::ledger::{Outcome, Step, StepError, Transition};

/// A libvirt call that failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LibvirtError {
    /// The call failed (libvirt's message).
    #[error("{what}: {message}")]
    Call {
        /// What was being done.
        what: String,
        /// libvirt's error.
        message: String,
    },
    /// A device was not gone within the unplug timeout.
    #[error("{name} was still in cloud VM {cloud_vm} {secs} s after the unplug request")]
    Timeout {
        /// The device.
        name: String,
        /// The cloud VM.
        cloud_vm: CloudVmId,
        /// The timeout.
        secs: u64,
    },
}

impl LibvirtError {
    fn call(what: impl Into<String>, e: impl std::fmt::Display) -> Self {
        Self::Call {
            what: what.into(),
            message: e.to_string(),
        }
    }
}

/// The primary cloud's libvirt, as `vmbeam-host` uses it.
pub trait HostLibvirt: Send + Sync {
    /// Every running domain with its live XML.
    fn running_domains(&self) -> Result<Vec<DomainXml>, LibvirtError>;
    /// Hot-plugs `device` into the running `cloud_vm` (live only: a restarted cloud VM has
    /// none of VMBeam's devices).
    fn attach_live(&self, cloud_vm: &CloudVmId, device: &ShmemDevice) -> Result<(), LibvirtError>;
    /// Hot-unplugs `device` from `cloud_vm` and returns once libvirt no longer shows it.
    fn detach_live(&self, cloud_vm: &CloudVmId, device: &ShmemDevice) -> Result<(), LibvirtError>;
}

/// A backing-file operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The file to create exists.
    #[error("{0} exists")]
    Exists(PathBuf),
    /// A name that is not one of VMBeam's plain file names.
    #[error("'{0}' is not a VMBeam backing file name")]
    BadName(String),
    /// A file-system call failed.
    #[error("cannot {op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// The system's error.
        #[source]
        source: io::Error,
    },
}

/// The backing files of VMBeam's devices (`/dev/shm/<name>`, where libvirt points QEMU).
pub trait BackingFiles: Send + Sync {
    /// Creates `name`: new (never an existing file), sparse, `size` bytes, private to QEMU.
    fn create(&self, name: &str, size: u64) -> Result<(), FileError>;
    /// Deletes `name` (gone already is fine).
    fn remove(&self, name: &str) -> Result<(), FileError>;
    /// The guests whose backing file exists.
    fn list(&self) -> Result<BTreeSet<GuestKey>, FileError>;
}

/// Runs `t`'s steps in order; on the first failure, runs its compensation (best effort:
/// what it cannot undo is left for the operator, and reported by the next rescan) and
/// returns how far it got.
pub fn run(t: &Transition, libvirt: &dyn HostLibvirt, files: &dyn BackingFiles) -> Outcome {
    let perform = |step: &Step| -> Result<(), StepError> {
        let failed = |e: &dyn std::error::Error| StepError::Failed(crate::error_chain(e));
        match step {
            Step::CreateFile { name, size } => files.create(name, *size).map_err(|e| match e {
                FileError::Exists(p) => StepError::FileExists(p.display().to_string()),
                other => failed(&other),
            }),
            Step::Attach { cloud_vm, device } => libvirt
                .attach_live(cloud_vm, device)
                .map_err(|e| failed(&e)),
            Step::Detach { cloud_vm, device } => {
                libvirt.detach_live(cloud_vm, device).map_err(|e| match e {
                    LibvirtError::Timeout { .. } => StepError::Unsettled(e.to_string()),
                    other => failed(&other),
                })
            }
            Step::RemoveFile { name } => files.remove(name).map_err(|e| failed(&e)),
        }
    };
    for (done, step) in t.steps().iter().enumerate() {
        tracing::debug!(?step, "step");
        if let Err(error) = perform(step) {
            tracing::warn!(%error, ?step, "step failed");
            for undo in t.compensation(done) {
                if let Err(e) = perform(&undo) {
                    tracing::error!(error = %e, step = ?undo, "could not undo a step: left for the operator");
                }
            }
            return Outcome::Failed { done, error };
        }
    }
    Outcome::Done
}

/// A libvirt connection that is closed when dropped (`virt` 0.4's `Connect` never closes
/// itself; vmbeamd's `libvirt_conn` has the same wrapper).
struct Conn(Connect);

impl Drop for Conn {
    fn drop(&mut self) {
        // Nothing useful to do if closing fails.
        let _ = self.0.close();
    }
}

/// [`HostLibvirt`] over libvirt (`virt` crate), with one connection shared by all
/// threads (libvirt connections are thread-safe), reopened after it died.
pub struct VirtLibvirt {
    uri: String,
    conn: Mutex<Option<Arc<Conn>>>,
    unplug_timeout: Duration,
}

/// How often a detach looks whether the device is gone.
const UNPLUG_POLL: Duration = Duration::from_millis(50);

impl VirtLibvirt {
    /// A client of `uri` (e.g. `qemu:///system`) that waits at most `unplug_timeout` for an
    /// unplug. Connects on first use.
    pub fn new(uri: impl Into<String>, unplug_timeout: Duration) -> Self {
        Self {
            uri: uri.into(),
            conn: Mutex::new(None),
            unplug_timeout,
        }
    }

    fn conn(&self) -> Result<Arc<Conn>, LibvirtError> {
        let mut slot = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = slot.as_ref() {
            if c.0.is_alive().unwrap_or(false) {
                return Ok(c.clone());
            }
        }
        let c = Arc::new(Conn(Connect::open(Some(&self.uri)).map_err(|e| {
            LibvirtError::call(format!("connect to {}", self.uri), e)
        })?));
        *slot = Some(c.clone());
        Ok(c)
    }

    fn domain(&self, conn: &Conn, cloud_vm: &CloudVmId) -> Result<Domain, LibvirtError> {
        Domain::lookup_by_uuid_string(&conn.0, cloud_vm.0.as_str())
            .map_err(|e| LibvirtError::call(format!("look up cloud VM {cloud_vm}"), e))
    }

    fn has_device(dom: &Domain, cloud_vm: &CloudVmId, name: &str) -> Result<bool, LibvirtError> {
        let xml = dom
            .get_xml_desc(0)
            .map_err(|e| LibvirtError::call(format!("read cloud VM {cloud_vm}'s XML"), e))?;
        let names = shmem_names(&xml)
            .map_err(|e| LibvirtError::call(format!("read cloud VM {cloud_vm}'s XML"), e))?;
        Ok(names.iter().any(|n| n == name))
    }
}

impl HostLibvirt for VirtLibvirt {
    fn running_domains(&self) -> Result<Vec<DomainXml>, LibvirtError> {
        let conn = self.conn()?;
        let domains = conn
            .0
            .list_all_domains(sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE)
            .map_err(|e| LibvirtError::call("list the running domains", e))?;
        let mut out = Vec::new();
        for dom in domains {
            // A domain that stops between the listing and these calls is simply not listed.
            if let (Ok(name), Ok(xml)) = (dom.get_name(), dom.get_xml_desc(0)) {
                out.push(DomainXml { name, xml });
            }
        }
        Ok(out)
    }

    fn attach_live(&self, cloud_vm: &CloudVmId, device: &ShmemDevice) -> Result<(), LibvirtError> {
        let conn = self.conn()?;
        let dom = self.domain(&conn, cloud_vm)?;
        match dom.attach_device_flags(&device.xml(), sys::VIR_DOMAIN_AFFECT_LIVE) {
            Ok(_) => Ok(()),
            // The call can fail after QEMU took the device (a connection lost on the way
            // back): libvirt's live XML says what happened.
            Err(e) if Self::has_device(&dom, cloud_vm, &device.name()).unwrap_or(false) => {
                tracing::warn!(error = %e, "attach reported a failure but the device is there");
                Ok(())
            }
            Err(e) => Err(LibvirtError::call(
                format!("attach {} to cloud VM {cloud_vm}", device.name()),
                e,
            )),
        }
    }

    fn detach_live(&self, cloud_vm: &CloudVmId, device: &ShmemDevice) -> Result<(), LibvirtError> {
        let conn = self.conn()?;
        let dom = self.domain(&conn, cloud_vm)?;
        let name = device.name();
        if let Err(e) = dom.detach_device_flags(&device.xml(), sys::VIR_DOMAIN_AFFECT_LIVE) {
            if Self::has_device(&dom, cloud_vm, &name)? {
                return Err(LibvirtError::call(
                    format!("detach {name} from cloud VM {cloud_vm}"),
                    e,
                ));
            }
            tracing::warn!(error = %e, "detach reported a failure but the device is gone");
            return Ok(());
        }
        // libvirt returns after at most 5 s even when QEMU has not removed the device yet
        // (then it finishes later): wait until the live XML no longer shows it.
        let deadline = Instant::now() + self.unplug_timeout;
        while Self::has_device(&dom, cloud_vm, &name)? {
            if Instant::now() >= deadline {
                return Err(LibvirtError::Timeout {
                    name,
                    cloud_vm: cloud_vm.clone(),
                    secs: self.unplug_timeout.as_secs(),
                });
            }
            std::thread::sleep(UNPLUG_POLL);
        }
        Ok(())
    }
}

/// [`BackingFiles`] in a directory (`/dev/shm`, where libvirt's QEMU opens
/// `/dev/shm/<name>`), owned by QEMU's user.
pub struct ShmDir {
    dir: PathBuf,
    owner: Option<(u32, u32)>,
}

impl ShmDir {
    /// Files in `dir`, handed to `owner` (uid, gid) when given (QEMU's user and group, from
    /// libvirt's `qemu.conf`; otherwise they stay the daemon's).
    pub fn new(dir: impl Into<PathBuf>, owner: Option<(u32, u32)>) -> Self {
        Self {
            dir: dir.into(),
            owner,
        }
    }

    fn path(&self, name: &str) -> Result<PathBuf, FileError> {
        let plain =
            name.starts_with(SHMEM_PREFIX) && !name.contains(['/', '\0']) && name.len() <= 255;
        if !plain {
            return Err(FileError::BadName(name.to_owned()));
        }
        Ok(self.dir.join(name))
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> FileError + 'a {
    move |source| FileError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

impl BackingFiles for ShmDir {
    fn create(&self, name: &str, size: u64) -> Result<(), FileError> {
        let path = self.path(name)?;
        // create_new: never an existing file, never through a symlink; 0600: guest memory is
        // nobody else's business.
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| match e.kind() {
                io::ErrorKind::AlreadyExists => FileError::Exists(path.clone()),
                _ => io_err("create", &path)(e),
            })?;
        let finish = || -> Result<(), FileError> {
            file.set_len(size).map_err(io_err("size", &path))?;
            if let Some((uid, gid)) = self.owner {
                std::os::unix::fs::fchown(&file, Some(uid), Some(gid))
                    .map_err(io_err("chown", &path))?;
            }
            Ok(())
        };
        finish().inspect_err(|_| {
            let _ = fs::remove_file(&path);
        })
    }

    fn remove(&self, name: &str) -> Result<(), FileError> {
        let path = self.path(name)?;
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err("remove", &path)(e)),
            _ => Ok(()),
        }
    }

    fn list(&self) -> Result<BTreeSet<GuestKey>, FileError> {
        let mut out = BTreeSet::new();
        for entry in fs::read_dir(&self.dir).map_err(io_err("list", &self.dir))? {
            let entry = entry.map_err(io_err("list", &self.dir))?;
            let is_file = entry.file_type().is_ok_and(|t| t.is_file());
            if let (true, Some(name)) = (is_file, entry.file_name().to_str()) {
                if let Some(Ok(key)) = GuestKey::from_shmem_name(name) {
                    out.insert(key);
                }
            }
        }
        Ok(out)
    }
}

/// A fake primary-cloud host for the unit tests: cloud VMs rendered as libvirt would print
/// them, devices checked as libvirt and QEMU would (free slot, existing file of the right
/// size), files in memory, and failures on demand. Other crates' tests (vmbeamd's
/// `hostlink`, which drives the real server over it) get it with the `test-support` feature.
#[cfg(any(test, feature = "test-support"))]
pub mod fake {
    use std::collections::BTreeMap;

    use super::*;
    use crate::device::PciAddress;

    /// Which call fails next.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum FailOn {
        Attach,
        Detach,
        /// The unplug is not confirmed in time, and completes later.
        DetachTimeout,
        Create,
        Remove,
        List,
    }

    #[derive(Debug, Clone)]
    struct FakeVm {
        name: String,
        uuid: String,
        domain_id: u32,
        cloud: String,
        window_gib: u64,
        channel: PathBuf,
        base_slots: Vec<u8>,
        attached: BTreeMap<String, ShmemDevice>,
    }

    impl FakeVm {
        fn xml(&self) -> String {
            let mut devices = String::new();
            for slot in &self.base_slots {
                devices.push_str(&format!(
                    "<controller type='usb' index='{slot}' model='piix3-uhci'><address type='pci' domain='0x0000' bus='0x00' slot='{slot:#04x}' function='0x0'/></controller>"
                ));
            }
            for d in self.attached.values() {
                devices.push_str(&d.xml().replace("<model", "<alias name='shmemX'/><model"));
            }
            format!(
                "<domain type='kvm' id='{id}'><name>{name}</name><uuid>{uuid}</uuid>\
                 <metadata><vmbeam:cloud-vm xmlns:vmbeam='https://vmbeam.dev/xmlns/vmbeam/1'><vmbeam:cloud>{cloud}</vmbeam:cloud></vmbeam:cloud-vm></metadata>\
                 <os><type arch='x86_64' machine='pc-i440fx-10.0'>hvm</type></os>\
                 <devices><controller type='pci' index='0' model='pci-root'><pcihole64 unit='GiB'>{w}</pcihole64></controller>\
                 <channel type='unix'><source mode='bind' path='{chan}'/><target type='virtio' name='org.vmbeam.host.0'/></channel>\
                 {devices}</devices></domain>",
                id = self.domain_id,
                name = self.name,
                uuid = self.uuid,
                cloud = self.cloud,
                w = self.window_gib,
                chan = self.channel.display(),
            )
        }
    }

    #[derive(Debug, Default)]
    struct State {
        vms: BTreeMap<String, FakeVm>,
        others: Vec<DomainXml>,
        files: BTreeMap<String, u64>,
        fail: Vec<FailOn>,
        calls: Vec<String>,
    }

    #[derive(Debug, Default)]
    pub struct FakeHost {
        state: Mutex<State>,
    }

    impl FakeHost {
        fn state(&self) -> std::sync::MutexGuard<'_, State> {
            self.state.lock().unwrap()
        }

        /// Adds a running cloud VM: slots 1 and 2 taken, plus `extra_slots`.
        pub fn add_vm(
            &self,
            name: &str,
            uuid: &str,
            cloud: &str,
            window_gib: u64,
            extra_slots: &[u8],
            channel: PathBuf,
        ) {
            let mut base_slots = vec![1, 2];
            base_slots.extend_from_slice(extra_slots);
            self.state().vms.insert(
                uuid.to_owned(),
                FakeVm {
                    name: name.to_owned(),
                    uuid: uuid.to_owned(),
                    domain_id: 1,
                    cloud: cloud.to_owned(),
                    window_gib,
                    channel,
                    base_slots,
                    attached: BTreeMap::new(),
                },
            );
        }

        /// A running domain that is not a VMBeam cloud VM (or a malformed one).
        pub fn add_other(&self, name: &str, xml: &str) {
            self.state().others.push(DomainXml {
                name: name.to_owned(),
                xml: xml.to_owned(),
            });
        }

        /// The cloud VM restarts: its hot-plugged devices are gone, its domain id is new.
        pub fn restart_vm(&self, uuid: &str) {
            let mut st = self.state();
            let vm = st.vms.get_mut(uuid).unwrap();
            vm.attached.clear();
            vm.domain_id += 1;
        }

        /// Makes the next call of that kind fail.
        pub fn fail_next(&self, on: FailOn) {
            self.state().fail.push(on);
        }

        /// Forgets failures that no call consumed.
        pub fn clear_failures(&self) {
            self.state().fail.clear();
        }

        fn failing(&self, on: FailOn) -> bool {
            let mut st = self.state();
            match st.fail.iter().position(|f| *f == on) {
                Some(i) => {
                    st.fail.remove(i);
                    true
                }
                None => false,
            }
        }

        /// The devices attached now: (cloud VM uuid, device name, slot).
        pub fn attached(&self) -> BTreeSet<(String, String, u8)> {
            self.state()
                .vms
                .values()
                .flat_map(|vm| {
                    vm.attached
                        .values()
                        .map(|d| (vm.uuid.clone(), d.name(), d.addr.slot))
                        .collect::<Vec<_>>()
                })
                .collect()
        }

        /// The backing files now, with their sizes.
        pub fn files(&self) -> BTreeMap<String, u64> {
            self.state().files.clone()
        }

        /// Puts a file there behind VMBeam's back.
        pub fn plant_file(&self, name: &str, size: u64) {
            self.state().files.insert(name.to_owned(), size);
        }

        /// Attaches a device behind VMBeam's back (an operator's virsh).
        pub fn plant_device(&self, uuid: &str, device: ShmemDevice) {
            self.state()
                .vms
                .get_mut(uuid)
                .unwrap()
                .attached
                .insert(device.name(), device);
        }

        /// The calls made so far.
        pub fn calls(&self) -> Vec<String> {
            self.state().calls.clone()
        }

        fn used_slot(vm: &FakeVm, addr: PciAddress) -> bool {
            vm.base_slots.contains(&addr.slot) || vm.attached.values().any(|d| d.addr == addr)
        }
    }

    fn err(what: &str, message: &str) -> LibvirtError {
        LibvirtError::Call {
            what: what.to_owned(),
            message: message.to_owned(),
        }
    }

    impl HostLibvirt for FakeHost {
        fn running_domains(&self) -> Result<Vec<DomainXml>, LibvirtError> {
            if self.failing(FailOn::List) {
                return Err(err("list the running domains", "injected"));
            }
            let st = self.state();
            let mut out: Vec<DomainXml> = st
                .vms
                .values()
                .map(|vm| DomainXml {
                    name: vm.name.clone(),
                    xml: vm.xml(),
                })
                .collect();
            out.extend(st.others.iter().cloned());
            Ok(out)
        }

        fn attach_live(
            &self,
            cloud_vm: &CloudVmId,
            device: &ShmemDevice,
        ) -> Result<(), LibvirtError> {
            let failing = self.failing(FailOn::Attach);
            let mut st = self.state();
            st.calls.push(format!(
                "attach {} {cloud_vm} {}",
                device.name(),
                device.addr
            ));
            if failing {
                return Err(err("attach", "injected"));
            }
            match st.files.get(&device.name()) {
                None => {
                    return Err(err(
                        "attach",
                        "can't open backing store: No such file or directory",
                    ))
                }
                Some(&size) if size != device.bar_size => {
                    return Err(err(
                        "attach",
                        "backing store size does not match 'size' option",
                    ))
                }
                Some(_) => {}
            }
            let vm = st
                .vms
                .get_mut(cloud_vm.0.as_str())
                .ok_or_else(|| err("look up", "Domain not found"))?;
            if Self::used_slot(vm, device.addr) {
                return Err(err("attach", "Attempted double use of PCI Address"));
            }
            if vm.attached.contains_key(&device.name()) {
                return Err(err("attach", "shmem already exists"));
            }
            vm.attached.insert(device.name(), device.clone());
            Ok(())
        }

        fn detach_live(
            &self,
            cloud_vm: &CloudVmId,
            device: &ShmemDevice,
        ) -> Result<(), LibvirtError> {
            let failing = self.failing(FailOn::Detach);
            let late = self.failing(FailOn::DetachTimeout);
            let mut st = self.state();
            st.calls
                .push(format!("detach {} {cloud_vm}", device.name()));
            if failing {
                return Err(err("detach", "injected"));
            }
            let vm = st
                .vms
                .get_mut(cloud_vm.0.as_str())
                .ok_or_else(|| err("look up", "Domain not found"))?;
            match vm.attached.get(&device.name()) {
                Some(d) if d == device => {
                    vm.attached.remove(&device.name());
                    if late {
                        return Err(LibvirtError::Timeout {
                            name: device.name(),
                            cloud_vm: cloud_vm.clone(),
                            secs: 10,
                        });
                    }
                    Ok(())
                }
                _ => Err(err("detach", "device not present in domain configuration")),
            }
        }
    }

    impl BackingFiles for FakeHost {
        fn create(&self, name: &str, size: u64) -> Result<(), FileError> {
            let failing = self.failing(FailOn::Create);
            let mut st = self.state();
            st.calls.push(format!("create {name} {size}"));
            if failing {
                return Err(FileError::Io {
                    op: "create",
                    path: PathBuf::from(name),
                    source: io::Error::other("injected"),
                });
            }
            if st.files.contains_key(name) {
                return Err(FileError::Exists(PathBuf::from("/dev/shm").join(name)));
            }
            st.files.insert(name.to_owned(), size);
            Ok(())
        }

        fn remove(&self, name: &str) -> Result<(), FileError> {
            let failing = self.failing(FailOn::Remove);
            let mut st = self.state();
            st.calls.push(format!("remove {name}"));
            if failing {
                return Err(FileError::Io {
                    op: "remove",
                    path: PathBuf::from(name),
                    source: io::Error::other("injected"),
                });
            }
            st.files.remove(name);
            Ok(())
        }

        fn list(&self) -> Result<BTreeSet<GuestKey>, FileError> {
            Ok(self
                .state()
                .files
                .keys()
                .filter_map(|n| GuestKey::from_shmem_name(n).and_then(Result::ok))
                .collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    use super::*;
    use crate::device::PciAddress;
    use crate::ledger::OpKind;
    use fake::{FailOn, FakeHost};
    use vmbeam_core::{CloudId, DomainUuid};

    const VM: &str = "5f0c2b5e-1a2b-4c3d-8e4f-00000000000a";

    fn key() -> GuestKey {
        GuestKey {
            cloud: CloudId::new("acme").unwrap(),
            uuid: DomainUuid::new("6e3b1e9a-1b2c-4d5e-8f90-0123456789ab").unwrap(),
        }
    }

    fn alloc() -> Transition {
        Transition {
            op: 1,
            kind: OpKind::Alloc,
            guest: key(),
            target: CloudVmId(DomainUuid::new(VM).unwrap()),
            device: ShmemDevice {
                guest: key(),
                bar_size: 1 << 20,
                addr: PciAddress::root_slot(0x1f),
            },
        }
    }

    #[test]
    fn shm_dir_creates_private_sparse_files_once_and_lists_vmbeams() {
        let dir = tempfile::tempdir().unwrap();
        let shm = ShmDir::new(dir.path(), None);
        let name = key().shmem_name();
        shm.create(&name, 1 << 30).unwrap();
        let meta = fs::metadata(dir.path().join(&name)).unwrap();
        assert_eq!(meta.len(), 1 << 30);
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert!(meta.blocks() < 16, "sparse: {} blocks", meta.blocks());
        assert!(matches!(
            shm.create(&name, 1 << 20),
            Err(FileError::Exists(_))
        ));
        // Never through a symlink.
        let other = GuestKey {
            uuid: DomainUuid::new("6e3b1e9a-1b2c-4d5e-8f90-0123456789ac").unwrap(),
            ..key()
        };
        std::os::unix::fs::symlink(
            dir.path().join("target"),
            dir.path().join(other.shmem_name()),
        )
        .unwrap();
        assert!(matches!(
            shm.create(&other.shmem_name(), 4096),
            Err(FileError::Exists(_))
        ));
        assert!(!dir.path().join("target").exists());
        fs::write(dir.path().join("looking-glass"), "x").unwrap();
        fs::write(dir.path().join("vmbeam-garbage"), "x").unwrap();
        assert_eq!(shm.list().unwrap(), [key()].into());
        shm.remove(&name).unwrap();
        shm.remove(&name).unwrap();
        assert!(shm.list().unwrap().is_empty());
        for bad in ["../x", "vmbeam-a/b", "other"] {
            assert!(
                matches!(shm.create(bad, 4096), Err(FileError::BadName(_))),
                "{bad}"
            );
        }
    }

    /// The real adapter against libvirt's own test driver (`test:///default`: in-process,
    /// no daemon, no QEMU, one running domain called "test"). The test driver cannot
    /// hot-plug a `<shmem>`, so a successful attach and detach are left to the nested lab.
    #[test]
    fn the_real_adapter_lists_domains_and_reports_libvirts_refusals() {
        let lv = VirtLibvirt::new("test:///default", Duration::from_secs(1));
        let domains = lv.running_domains().unwrap();
        assert_eq!(
            domains.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(),
            ["test"]
        );
        let d = crate::cloudvm::discover(&domains);
        assert!(d.topology.cloud_vms.is_empty() && d.errors.is_empty());
        let root = vmbeam_core::xml::parse(&domains[0].xml).unwrap();
        let uuid = root.child(None, "uuid").unwrap().text();
        let vm = CloudVmId(DomainUuid::new(uuid.trim()).unwrap());
        let e = lv.attach_live(&vm, &alloc().device).unwrap_err();
        let text = e.to_string();
        assert!(
            text.starts_with(&format!("attach {} to cloud VM {vm}: ", key().shmem_name())),
            "{text}"
        );
        assert!(text.contains("not supported"), "{text}");
        // A device that is not there is gone: a detach of it succeeds.
        lv.detach_live(&vm, &alloc().device).unwrap();
        let absent = CloudVmId(DomainUuid::new("00000000-0000-0000-0000-000000000001").unwrap());
        assert!(lv
            .attach_live(&absent, &alloc().device)
            .unwrap_err()
            .to_string()
            .starts_with("look up cloud VM"));
        let nowhere = VirtLibvirt::new("nosuchdriver:///x", Duration::from_secs(1));
        assert!(nowhere
            .running_domains()
            .unwrap_err()
            .to_string()
            .starts_with("connect to nosuchdriver:///x"));
    }

    #[test]
    fn run_stops_at_the_first_failure_and_undoes_what_it_must() {
        let host = FakeHost::default();
        host.add_vm("cvm1", VM, "acme", 64, &[], "/x".into());
        let t = alloc();
        host.fail_next(FailOn::Attach);
        let out = run(&t, &host, &host);
        assert!(matches!(out, Outcome::Failed { done: 1, .. }), "{out:?}");
        assert!(
            host.files().is_empty(),
            "the file ALLOC created is removed again"
        );
        assert_eq!(run(&t, &host, &host), Outcome::Done);
        assert_eq!(host.attached().len(), 1);
        // A second ALLOC of the same file: its creation fails, nothing is undone.
        let out = run(&t, &host, &host);
        assert!(
            matches!(
                out,
                Outcome::Failed {
                    done: 0,
                    error: StepError::FileExists(_)
                }
            ),
            "{out:?}"
        );
        assert_eq!(host.files().len(), 1);
        assert_eq!(host.attached().len(), 1);
    }
}
