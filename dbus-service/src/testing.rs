//! Test doubles for the engine's and the hook handlers' unit tests: a fake hypervisor backend
//! that records what it is asked, and the daemons of cloud VMs sharing one temporary pool.
//! No libvirt, no QEMU, no bus.

use std::cell::{Cell, RefCell};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmbeam_core::backend::{Armed, Backend, BackendError};
use vmbeam_core::plan::BackendCapabilities;
use vmbeam_core::ticket::FileReplayCache;
use vmbeam_core::{CloudId, DomainFacts, DomainUuid, HostId, Identity, TicketKey};

use vmbeam_core::recover::Local;

use crate::config::DaemonConfig;
use crate::error::DaemonError;
use crate::recover::{LocalDomains, Observed};
use crate::state::{Ctx, SharedCtx, Tables};

/// The cloud every test host is in.
pub const CLOUD: &str = "acme";
/// The test domain.
pub const UUID: &str = "6e3b1e9a-1b2c-4d5e-8f90-0123456789ab";
/// The test domain's memory (4 MiB), which its pool file must hold.
pub const MEMORY: u64 = 4 << 20;

/// A beam-enabled domain's XML as libvirt passes it to a hook (id 7, 4 MiB, shared file
/// memory, VMBeam metadata owned by `owner` at generation 3).
pub fn domain_xml(owner: &str) -> String {
    format!(
        r#"<domain type='qemu' id='7'>
  <name>web1</name>
  <uuid>{UUID}</uuid>
  <memory unit='KiB'>4096</memory>
  <currentMemory unit='KiB'>4096</currentMemory>
  <memoryBacking>
    <source type='file'/>
    <access mode='shared'/>
  </memoryBacking>
  <metadata>
    <vmbeam:beam xmlns:vmbeam="https://vmbeam.dev/xmlns/vmbeam/1">
      <vmbeam:cloud>{CLOUD}</vmbeam:cloud>
      <vmbeam:pool>/var/lib/vmbeam/pool</vmbeam:pool>
      <vmbeam:owner>{owner}</vmbeam:owner>
      <vmbeam:generation>3</vmbeam:generation>
    </vmbeam:beam>
  </metadata>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
  </os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
  </devices>
</domain>
"#
    )
}

/// The test domain's facts.
pub fn facts() -> DomainFacts {
    DomainFacts::from_xml(&domain_xml("cvm1")).expect("test domain XML")
}

/// The test domain's UUID.
pub fn uuid() -> DomainUuid {
    DomainUuid::new(UUID).expect("uuid")
}

/// A host id.
pub fn host_id(name: &str) -> HostId {
    HostId::new(name).expect("host id")
}

/// The cloud's key.
pub fn key() -> TicketKey {
    TicketKey::from_bytes(vec![7; 32]).expect("key")
}

/// What the fake backend was asked, and how it answers.
#[derive(Default)]
pub struct FakeState {
    /// Every call, in order (`arm_source`, `disarm`, `link_ram <target>`, ...).
    pub calls: Mutex<Vec<String>>,
    /// `arm_source` refuses (as QEMU does for a domain without its private monitor).
    pub refuse_arm_source: AtomicBool,
    /// `arm_destination` reports at once that the guest runs there.
    pub guest_runs_at_once: AtomicBool,
    /// `link_ram` fails (as QEMU's backend does for a file too short).
    pub refuse_link_ram: AtomicBool,
}

impl FakeState {
    fn call(&self, what: String) {
        self.calls.lock().expect("lock").push(what);
    }

    /// The calls so far.
    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().expect("lock").clone()
    }
}

/// A hypervisor backend that does nothing but record.
pub struct FakeBackend(pub Arc<FakeState>);

struct FakeArmed(Arc<FakeState>);

impl Armed for FakeArmed {
    fn disarm(&mut self, wait: Duration) -> Result<String, BackendError> {
        self.0.call(format!("disarm {}s", wait.as_secs()));
        Ok("reset".into())
    }
}

impl Backend for FakeBackend {
    fn name(&self) -> &'static str {
        "fake"
    }

    fn capabilities(&self, _domain: &DomainFacts) -> BackendCapabilities {
        BackendCapabilities {
            ignore_shared: true,
            private_monitor: true,
        }
    }

    fn arm_source(
        &self,
        _domain: &DomainFacts,
        pool_file: &Path,
    ) -> Result<Box<dyn Armed>, BackendError> {
        self.0.call(format!("arm_source {}", file_name(pool_file)));
        if self.0.refuse_arm_source.load(Ordering::SeqCst) {
            return Err(BackendError::Refused("no private monitor (fake)".into()));
        }
        Ok(Box::new(FakeArmed(self.0.clone())))
    }

    fn link_ram(
        &self,
        _domain: &DomainFacts,
        pool_file: &Path,
        size: u64,
    ) -> Result<(), BackendError> {
        self.0
            .call(format!("link_ram {} {size}", file_name(pool_file)));
        if self.0.refuse_link_ram.load(Ordering::SeqCst) {
            return Err(BackendError::Failed(
                "cannot link the RAM path (fake)".into(),
            ));
        }
        Ok(())
    }

    fn arm_destination(
        &self,
        _domain: &DomainFacts,
        pool_file: &Path,
        on_guest_runs: Box<dyn FnOnce() + Send>,
    ) -> Result<(), BackendError> {
        self.0
            .call(format!("arm_destination {}", file_name(pool_file)));
        if self.0.guest_runs_at_once.load(Ordering::SeqCst) {
            on_guest_runs();
        }
        Ok(())
    }

    fn reset_zero_copy(&self, domain: &DomainFacts) -> Result<String, BackendError> {
        self.0.call(format!("reset_zero_copy {}", domain.name));
        Ok("reset".into())
    }
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("?")
        .to_owned()
}

/// One cloud VM's daemon for tests: its context on the shared pool, and its fake backend.
pub struct Host {
    pub ctx: SharedCtx,
    pub fake: Arc<FakeState>,
}

/// Cloud VMs sharing one pool in a temporary directory (removed on drop).
pub struct Cloud {
    pub dir: tempfile::TempDir,
}

impl Cloud {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("pool")).expect("pool");
        Cloud { dir }
    }

    /// The shared pool.
    pub fn pool_dir(&self) -> PathBuf {
        self.dir.path().join("pool")
    }

    /// The names in the pool, sorted.
    pub fn pool_names(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.pool_dir())
            .expect("pool")
            .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
            .collect();
        names.sort();
        names
    }

    /// The source cvm1's pool file for the test domain (generation 3, active, its own).
    pub fn source_file(&self) -> String {
        let pool = vmbeam_core::BeamPool::new(self.pool_dir());
        pool.create_file(&uuid(), 3, MEMORY, None)
            .expect("pool file");
        let name = vmbeam_core::pool::pool_file_name(&uuid(), 3);
        pool.claim(&name, &uuid(), 3, &host_id("cvm1"))
            .expect("claim");
        name
    }

    /// The daemon of cloud VM `name` (its own state directory, the shared pool).
    pub fn host(&self, name: &str) -> Host {
        self.host_with(name, |_| crate::guest_pool::GuestPool::Directory)
    }

    /// The daemon of cloud VM `name` whose guest RAM comes from `fixture`'s host as its
    /// cloud VM `cloud_vm` (the host-device pool).
    pub fn device_host(
        &self,
        name: &str,
        fixture: &crate::host_fixture::HostFixture,
        cloud_vm: &str,
    ) -> Host {
        self.host_with(name, |cfg| {
            crate::guest_pool::GuestPool::HostDevice(Box::new(
                fixture.pool(cloud_vm, &cfg.persistent_dir),
            ))
        })
    }

    fn host_with(
        &self,
        name: &str,
        pool: impl FnOnce(&DaemonConfig) -> crate::guest_pool::GuestPool,
    ) -> Host {
        let state_dir = self.dir.path().join(name);
        let fake = Arc::new(FakeState::default());
        let cfg = DaemonConfig {
            identity: Identity {
                host_id: host_id(name),
                cloud: CloudId::new(CLOUD).expect("cloud"),
                pool_dir: self.pool_dir(),
                key_file: PathBuf::from("/nonexistent"),
                ticket_ttl_secs: 60,
                pool: vmbeam_core::identity::PoolKind::Directory,
            },
            libvirt_uri: "test:///default".into(),
            memory_backing_dir: state_dir.join("ram"),
            qmp_dir: PathBuf::from("/run/vmbeam/qmp"),
            state_dir: state_dir.clone(),
            persistent_dir: state_dir.join("persistent"),
            rendezvous_timeout: Duration::from_millis(200),
            hook_timeout: Duration::from_secs(20),
        };
        let replay = FileReplayCache::open(state_dir.join("tickets")).expect("replay cache");
        let pool = pool(&cfg);
        let ctx = Arc::new(Ctx {
            cfg,
            key: key(),
            tables: Mutex::new(Tables::default()),
            replay: Mutex::new(replay),
            libvirt_uuid: format!("00000000-0000-4000-8000-{:0>12}", name.len()),
            backend: Box::new(FakeBackend(fake.clone())),
            pool,
        });
        Host { ctx, fake }
    }
}

/// What a test's libvirt says of the test domain, and what it was asked to destroy.
pub struct FakeLibvirt {
    pub local: Cell<Local>,
    pub destroyed: RefCell<Vec<DomainUuid>>,
    /// What it was asked to undefine.
    pub undefined: RefCell<Vec<DomainUuid>>,
    /// `destroy` fails (the domain stays as it is).
    pub refuse_destroy: Cell<bool>,
    /// libvirt does not answer (libvirtd is gone).
    pub unreachable: Cell<bool>,
}

impl FakeLibvirt {
    pub fn new(local: Local) -> Self {
        FakeLibvirt {
            local: Cell::new(local),
            destroyed: RefCell::new(Vec::new()),
            undefined: RefCell::new(Vec::new()),
            refuse_destroy: Cell::new(false),
            unreachable: Cell::new(false),
        }
    }

    /// Whether the test domain was destroyed.
    pub fn fenced(&self) -> bool {
        !self.destroyed.borrow().is_empty()
    }
}

impl LocalDomains for FakeLibvirt {
    fn observe(&self, uuid: &DomainUuid) -> Result<Observed, DaemonError> {
        assert_eq!(uuid, &crate::testing::uuid());
        if self.unreachable.get() {
            return Err(DaemonError::Failed("libvirtd is gone (fake)".into()));
        }
        let local = self.local.get();
        Ok(Observed {
            local,
            facts: (local != Local::Absent).then(facts),
        })
    }

    fn destroy(&self, uuid: &DomainUuid) -> Result<(), DaemonError> {
        if self.refuse_destroy.get() || self.unreachable.get() {
            return Err(DaemonError::Failed("cannot destroy (fake)".into()));
        }
        self.destroyed.borrow_mut().push(uuid.clone());
        self.local.set(Local::Absent);
        Ok(())
    }

    fn undefine(&self, uuid: &DomainUuid) -> Result<(), DaemonError> {
        self.undefined.borrow_mut().push(uuid.clone());
        Ok(())
    }
}
