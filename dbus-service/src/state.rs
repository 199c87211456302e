//! What vmbeamd remembers between hook events and jobs. The durable truth about pool files
//! is their owner records in the pool; this is the in-flight part.

use std::collections::{HashMap, HashSet};

use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use vmbeam_core::ticket::FileReplayCache;
use vmbeam_core::{DomainUuid, HostId, TicketKey};

use crate::config::DaemonConfig;

/// An incoming zero-copy migration the destination accepted at `migrate begin`.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub pool_file: String,
    pub source: HostId,
    /// Unix time after which the acceptance is void (the ticket's expiry).
    pub expires_at: u64,
}

/// A domain this host started, and the pool file its RAM path links to.
#[derive(Debug, Clone)]
pub struct Running {
    pub pool_file: String,
    /// Started as the destination of a zero-copy migration.
    pub zero_copy: bool,
}

/// An outgoing zero-copy migration in flight (the source keeps its hands off the pool
/// file until libvirt says how it ended).
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub job: u64,
    pub pool_file: String,
    pub dest: HostId,
}

/// The daemon's shared state.
#[derive(Default, Debug)]
pub struct Tables {
    pub incoming: HashMap<DomainUuid, Incoming>,
    pub running: HashMap<DomainUuid, Running>,
    pub outgoing: HashMap<DomainUuid, Outgoing>,
    /// Domains a migration job of this daemon works on, by job id: from before its first
    /// step on the guest's memory (the host-device pool's SHARE comes at planning, before
    /// `outgoing` is entered) to the job's end. Recovery keeps its hands off them.
    pub migrating: HashMap<DomainUuid, u64>,
    /// Domains whose interrupted hand-over a recovery pass is settling (no job may start
    /// on them meanwhile; see `recover`).
    pub recovering: HashSet<DomainUuid>,
    /// Pool files whose interrupted hand-over recovery cannot settle yet, with what the
    /// operator is told (`Status` shows it).
    pub in_doubt: HashMap<String, String>,
}

/// Domains whose job asked for `--undefinesource` but left its hand-over to recovery
/// (libvirt's Confirm, which would have undefined the source, did not finish): recovery
/// removes the source's definition once it hands the file over. Kept in the state
/// directory (`undefine-after-hand-over/<uuid>`), since vmbeamd may be restarted with
/// libvirtd before recovery can act.
pub struct UndefineAfterHandOver<'a>(pub &'a DaemonConfig);

impl UndefineAfterHandOver<'_> {
    fn path(&self, uuid: &DomainUuid) -> std::path::PathBuf {
        self.0
            .state_dir
            .join("undefine-after-hand-over")
            .join(uuid.as_str())
    }

    /// Remembers that `uuid`'s source definition goes once its hand-over completes.
    pub fn insert(&self, uuid: &DomainUuid) -> std::io::Result<()> {
        let p = self.path(uuid);
        if let Some(dir) = p.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(p, b"")
    }

    /// Whether `uuid` was remembered; forgets it.
    pub fn take(&self, uuid: &DomainUuid) -> bool {
        std::fs::remove_file(self.path(uuid)).is_ok()
    }
}

/// Everything the hook handlers and jobs share.
pub struct Ctx {
    pub cfg: DaemonConfig,
    pub key: TicketKey,
    pub tables: Mutex<Tables>,
    pub replay: Mutex<FileReplayCache>,
    /// This host's libvirt host UUID (answers co-location requests addressed to it).
    pub libvirt_uuid: String,
    /// The hypervisor backend (QEMU; Xen's libxl later).
    pub backend: Box<dyn vmbeam_core::backend::Backend>,
    /// Where guest RAM comes from (the shared directory, or the primary cloud's devices).
    pub pool: crate::guest_pool::GuestPool,
}

/// Shared handle.
pub type SharedCtx = Arc<Ctx>;

/// The time as Unix seconds (tickets, rendezvous requests and acceptances expire by it).
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
