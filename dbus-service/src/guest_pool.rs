//! One interface over the two kinds of beam pool a cloud VM takes guest RAM from
//! (`pool_kind` in vmbeam.conf, `vmbeam_core::identity::PoolKind`):
//!
//! - [`GuestPool::Directory`]: the shared directory (`vmbeam_core::pool::BeamPool`, one
//!   kernel: the namespace lab): a fresh `<uuid>.<generation>.ram` file claimed by this
//!   host at start, deleted by its owner when the domain is gone for good.
//! - [`GuestPool::HostDevice`]: a device per guest from the primary cloud's `vmbeam-host`
//!   ([`crate::devpool::DevicePool`]): ALLOC at start (the RAM is BAR 2's `resource2`),
//!   FREE when the domain is gone for good.
//!
//! The hooks take memory for a start ([`GuestPool::take`]), undo that when the start fails
//! before QEMU ran ([`GuestPool::undo_take`]), and give it back when the domain is gone
//! ([`GuestPool::give_back`]); they never ask which kind it is. In the device kind a
//! zero-copy destination's share is given back too (WITHDRAW after a failed migration,
//! once its QEMU exited: [`DevicePool::let_go`]); the migration's own steps (share, proof,
//! release) are the engine's and the destination hooks'.

use std::path::PathBuf;

use tracing::{info, warn};
use vmbeam_core::identity::PoolKind;
use vmbeam_core::pool::{BeamPool, OwnerState};
use vmbeam_core::DomainUuid;

use crate::config::DaemonConfig;
use crate::devpool::{DevicePool, DevicePoolError};
use crate::error::DaemonError;

/// Memory taken for a domain's start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Taken {
    /// The file the domain's RAM path is linked to.
    pub path: PathBuf,
    /// What the daemon remembers it by (the pool file's name; for a device, `path`).
    pub name: String,
}

/// The beam pool of this cloud VM (see the module docs).
#[derive(Debug)]
pub enum GuestPool {
    /// The shared directory `pool_dir`.
    Directory,
    /// Devices from the primary cloud's host.
    HostDevice(Box<DevicePool>),
}

fn device_err(e: DevicePoolError) -> DaemonError {
    DaemonError::Failed(format!(
        "host-device pool: {}",
        crate::devpool::error_chain(&e)
    ))
}

/// Says HELLO to the primary cloud's host through the host-device pool, once it answers:
/// every 2 s until the host does, a warning at the first failure and every minute after.
/// Returns at once in the directory kind. Run on a thread of its own.
pub fn greet_host(pool: &GuestPool) {
    let Some(device) = pool.device() else { return };
    let mut failures = 0u64;
    loop {
        match device.cloud_vm() {
            Ok(id) => {
                info!(cloud_vm = %id, after_failures = failures, "host channel: HELLO answered");
                return;
            }
            Err(e) => {
                if failures.is_multiple_of(30) {
                    warn!(error = %crate::devpool::error_chain(&e), "host channel: no HELLO answer yet; trying again every 2 s");
                }
                failures += 1;
            }
        }
        std::thread::sleep(std::time::Duration::from_secs(2));
    }
}

impl GuestPool {
    /// The pool `cfg` selects. Host calls and the wait for a hot-plugged device are bounded
    /// so that a hook still answers within `hook_timeout`.
    pub fn for_config(cfg: &DaemonConfig) -> Self {
        match &cfg.identity.pool {
            PoolKind::Directory => Self::Directory,
            PoolKind::HostDevice {
                channel,
                pci_devices,
            } => {
                // The records live in the persistent directory (see
                // `DaemonConfig::persistent_dir`); records an earlier vmbeamd kept under the
                // runtime state directory move there.
                let pool = DevicePool::new(
                    channel,
                    pci_devices,
                    &cfg.persistent_dir,
                    cfg.hook_timeout / 2,
                )
                .with_plug_wait(cfg.hook_timeout / 3);
                pool.take_over_records(&cfg.state_dir);
                Self::HostDevice(Box::new(pool))
            }
        }
    }

    /// The configuration's name of the kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Directory => "directory",
            Self::HostDevice(_) => "host-device",
        }
    }

    /// The device pool, in the host-device kind.
    pub fn device(&self) -> Option<&DevicePool> {
        match self {
            Self::Directory => None,
            Self::HostDevice(d) => Some(d),
        }
    }

    /// A domain's start (not a zero-copy destination's): `size` bytes of fresh memory, this
    /// host's.
    pub fn take(
        &self,
        cfg: &DaemonConfig,
        uuid: &DomainUuid,
        size: u64,
    ) -> Result<Taken, DaemonError> {
        let id = &cfg.identity;
        match self {
            Self::Directory => {
                let pool = BeamPool::new(&id.pool_dir);
                let generation = next_generation(&pool, uuid)?;
                pool.create_file(uuid, generation, size, None)
                    .map_err(|e| DaemonError::pool("", e))?;
                let name = vmbeam_core::pool::pool_file_name(uuid, generation);
                pool.claim(&name, uuid, generation, &id.host_id)
                    .map_err(|e| DaemonError::pool("", e))?;
                Ok(Taken {
                    path: id.pool_dir.join(&name),
                    name,
                })
            }
            Self::HostDevice(d) => {
                let b = d.alloc(uuid, size).map_err(device_err)?;
                Ok(Taken {
                    name: b.path.display().to_string(),
                    path: b.path,
                })
            }
        }
    }

    /// Undoes [`Self::take`] for a start that failed before QEMU ran.
    pub fn undo_take(&self, cfg: &DaemonConfig, uuid: &DomainUuid, taken: &Taken) {
        let undone = match self {
            Self::Directory => BeamPool::new(&cfg.identity.pool_dir)
                .release(&taken.name, &cfg.identity.host_id)
                .map_err(|e| e.to_string()),
            Self::HostDevice(d) => d
                .free(uuid)
                .map(|_| ())
                .map_err(|e| crate::devpool::error_chain(&e)),
        };
        if let Err(e) = undone {
            warn!(memory = %taken.name, error = %e, "could not give back the memory of a failed start");
        }
    }

    /// The domain is gone from this host for good (no zero-copy job of it in flight):
    /// what this host owns of its memory goes. `known` is the memory the daemon remembers
    /// it ran on.
    pub fn give_back(&self, cfg: &DaemonConfig, uuid: &DomainUuid, known: Option<String>) {
        let id = &cfg.identity;
        match self {
            Self::Directory => {
                let pool = BeamPool::new(&id.pool_dir);
                let mut files: Vec<String> = known.into_iter().collect();
                if let Ok(list) = pool.list() {
                    for e in list {
                        if &e.domain_uuid == uuid && !files.contains(&e.file_name) {
                            files.push(e.file_name);
                        }
                    }
                }
                for f in files {
                    match pool.read_owner(&f) {
                        Ok(Some(r)) if r.owner == id.host_id && r.state == OwnerState::Active => {
                            match pool.release(&f, &id.host_id) {
                                Ok(()) => {
                                    if let Err(e) = pool.clear_ran(&f) {
                                        warn!(pool_file = %f, error = %e, "could not delete the pool file's ran marker");
                                    }
                                    info!(pool_file = %f, "domain gone for good here: pool file deleted")
                                }
                                Err(e) => {
                                    warn!(pool_file = %f, error = %e, "could not delete pool file")
                                }
                            }
                        }
                        Ok(Some(r)) => {
                            info!(pool_file = %f, owner = %r.owner, state = %r.state, "pool file kept (not ours to delete)")
                        }
                        Ok(None) => {}
                        Err(e) => warn!(pool_file = %f, error = %e, "unreadable owner record"),
                    }
                }
            }
            Self::HostDevice(d) => match d.let_go(uuid, cfg.hook_timeout / 3) {
                Ok(true) => info!("domain gone for good here: its memory given back to the host"),
                Ok(false) => {}
                Err(e) => {
                    warn!(error = %crate::devpool::error_chain(&e), "could not give the domain's memory back to the host (kept, recorded)")
                }
            },
        }
    }
}

fn next_generation(pool: &BeamPool, uuid: &DomainUuid) -> Result<u64, DaemonError> {
    let max = pool
        .list()
        .map_err(|e| DaemonError::pool("", e))?
        .into_iter()
        .filter(|e| &e.domain_uuid == uuid)
        .map(|e| e.generation)
        .max()
        .unwrap_or(0);
    Ok(max + 1)
}
