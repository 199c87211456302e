//! Tests' primary cloud: the real `vmbeam-host` server in-process over its fake libvirt
//! and fake `/dev/shm` (`vmbeam_host::libvirt::fake`), with cloud VMs a1 and a2 of cloud
//! `acme` and b1 of cloud `bravo`. The fake's backing files are given real bytes in a temp
//! directory (`shm/`, created at their size, deleted with them).
//!
//! Each cloud VM's host channel is a unix socket the host serves (what libvirt's channel
//! socket is to the cloud VM's virtio-serial port). Each cloud VM's kernel is stood in for
//! by a PCI device directory (`pci-<name>/`) that a thread keeps in step with the devices
//! the fake libvirt has attached, as ACPI hot-plug does: `0000:00:SS.0/resource2` appears
//! (a hard link to the device's backing file, so that both cloud VMs' `resource2` are the
//! same bytes, as BAR 2 of one host file is) and disappears on unplug. That is a fixture
//! for a kernel interface; the host, its ledger and its protocol are the real ones.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use vmbeam_core::host_protocol::{CloudVmId, PciAddress};
use vmbeam_core::DomainUuid;
use vmbeam_host::libvirt::fake::FakeHost;
use vmbeam_host::server::{Config, Host};

use crate::devpool::DevicePool;

/// Cloud VM a1 (cloud `acme`).
pub const A1: &str = "5f0c2b5e-1a2b-4c3d-8e4f-0000000000a1";
/// Cloud VM a2 (cloud `acme`).
pub const A2: &str = "5f0c2b5e-1a2b-4c3d-8e4f-0000000000a2";
/// Cloud VM b1 (cloud `bravo`).
pub const B1: &str = "5f0c2b5e-1a2b-4c3d-8e4f-0000000000b1";
const VMS: [(&str, &str, &str); 3] = [("a1", A1, "acme"), ("a2", A2, "acme"), ("b1", B1, "bravo")];

/// A cloud VM's id.
pub fn cvm(uuid: &str) -> CloudVmId {
    CloudVmId(DomainUuid::new(uuid).expect("uuid"))
}

/// The primary cloud's host (see the module docs).
pub struct HostFixture {
    dir: tempfile::TempDir,
    /// The host's runtime and server, kept for the fixture's lifetime.
    _rt: tokio::runtime::Runtime,
    /// The fake libvirt: what is attached where.
    pub fake: Arc<FakeHost>,
    _host: Host,
    stop: Arc<AtomicBool>,
    kernel: Option<JoinHandle<()>>,
}

impl HostFixture {
    /// The host, its cloud VMs' channels listening, their kernels' hot-plug running.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let fake = Arc::new(FakeHost::default());
        for (name, uuid, cloud) in VMS {
            let chan = dir.path().join(format!("{name}.host-chan"));
            fake.add_vm(name, uuid, cloud, 64, &[], chan);
            std::fs::create_dir(dir.path().join(format!("pci-{name}"))).expect("pci dir");
        }
        let shm = dir.path().join("shm");
        std::fs::create_dir(&shm).expect("shm dir");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let config = Config {
            state_dir: dir.path().join("host-state"),
            rescan: Duration::from_secs(3600),
        };
        let host = Host::open(&config, fake.clone(), fake.clone()).expect("vmbeam-host");
        rt.block_on(host.rescan()).expect("rescan");
        for (name, uuid, _) in VMS {
            let path = dir.path().join(format!("{name}.sock"));
            let listener = {
                let _rt = rt.enter();
                tokio::net::UnixListener::bind(&path).expect("bind")
            };
            let (host, vm) = (host.clone(), cvm(uuid));
            rt.spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let (host, vm) = (host.clone(), vm.clone());
                    tokio::spawn(async move {
                        let _ = host.serve(vm, stream).await;
                    });
                }
            });
        }
        let stop = Arc::new(AtomicBool::new(false));
        let kernel = {
            let (fake, stop, root) = (fake.clone(), stop.clone(), dir.path().to_path_buf());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    hot_plug_step(&fake, &root);
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        };
        Self {
            dir,
            _rt: rt,
            fake,
            _host: host,
            stop,
            kernel: Some(kernel),
        }
    }

    fn name(uuid: &str) -> &'static str {
        VMS.iter()
            .find(|(_, u, _)| *u == uuid)
            .map(|(n, _, _)| *n)
            .expect("a fixture cloud VM")
    }

    /// Cloud VM `uuid`'s host channel.
    pub fn channel(&self, uuid: &str) -> PathBuf {
        self.dir.path().join(format!("{}.sock", Self::name(uuid)))
    }

    /// Cloud VM `uuid`'s PCI device directory.
    pub fn pci_devices(&self, uuid: &str) -> PathBuf {
        self.dir.path().join(format!("pci-{}", Self::name(uuid)))
    }

    /// The host's backing files now, with their sizes.
    pub fn files(&self) -> BTreeMap<String, u64> {
        self.fake.files()
    }

    /// The devices attached now: (cloud VM, slot).
    pub fn attached(&self) -> Vec<(String, u8)> {
        self.fake
            .attached()
            .into_iter()
            .map(|(vm, _, slot)| (vm, slot))
            .collect()
    }

    /// Cloud VM `uuid`'s vmbeamd's device pool, its state under `state_dir`.
    pub fn pool(&self, uuid: &str, state_dir: &Path) -> DevicePool {
        DevicePool::new(
            self.channel(uuid),
            self.pci_devices(uuid),
            state_dir,
            Duration::from_secs(10),
        )
        .with_plug_wait(Duration::from_secs(5))
    }
}

impl Drop for HostFixture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(k) = self.kernel.take() {
            let _ = k.join();
        }
    }
}

/// One pass of the cloud VMs' kernels: every attached device shows its `resource2`, every
/// unplugged one is gone.
fn hot_plug_step(fake: &FakeHost, root: &Path) {
    let shm = root.join("shm");
    let files = fake.files();
    for (name, size) in &files {
        let path = shm.join(name);
        if !path.exists() {
            if let Ok(f) = std::fs::File::create(&path) {
                let _ = f.set_len(*size);
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(&shm) {
        for e in entries.flatten() {
            if !files.contains_key(&*e.file_name().to_string_lossy()) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let attached = fake.attached();
    for (name, uuid, _) in VMS {
        let pci = root.join(format!("pci-{name}"));
        let want: BTreeMap<String, String> = attached
            .iter()
            .filter(|(vm, _, _)| vm == uuid)
            .map(|(_, dev, slot)| (PciAddress::root_slot(*slot).to_string(), dev.clone()))
            .collect();
        for (addr, dev) in &want {
            let dir = pci.join(addr);
            if !dir.join("resource2").exists() {
                let _ = std::fs::create_dir_all(&dir);
                let _ = std::fs::hard_link(root.join("shm").join(dev), dir.join("resource2"));
            }
        }
        if let Ok(entries) = std::fs::read_dir(&pci) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !want.contains_key(&name) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    }
}

/// A mapping of a device's BAR held as QEMU holds it (by this process, for as long as the
/// value lives). It can be moved to another thread, which ends it as a QEMU exits.
pub struct QemuMapping(usize, std::num::NonZeroUsize);

impl QemuMapping {
    /// Maps the first page of `path` shared.
    pub fn new(path: &Path) -> Self {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .expect("open the BAR");
        let len = std::num::NonZeroUsize::new(4096).expect("a page");
        // SAFETY: a fresh shared mapping at an address the kernel chooses; the test never
        // dereferences it, and it is unmapped once, in drop.
        let p = unsafe {
            nix::sys::mman::mmap(
                None,
                len,
                nix::sys::mman::ProtFlags::PROT_READ,
                nix::sys::mman::MapFlags::MAP_SHARED,
                &f,
                0,
            )
        }
        .expect("map the BAR");
        Self(p.as_ptr() as usize, len)
    }
}

impl Drop for QemuMapping {
    fn drop(&mut self) {
        let p = std::ptr::NonNull::new(self.0 as *mut std::ffi::c_void).expect("mapped");
        // SAFETY: the mapping made in `new`, unmapped only here.
        unsafe { nix::sys::mman::munmap(p, self.1.get()) }.expect("unmap");
    }
}
