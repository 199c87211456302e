//! vmbeamd's configuration: the cloud VM's identity (`/etc/vmbeam/vmbeam.conf`, shared with
//! the CLI and hook) plus where libvirt and QEMU keep things on this host.

use std::path::PathBuf;
use std::time::Duration;

use vmbeam_core::ticket::TicketKey;
use vmbeam_core::Identity;

/// Everything vmbeamd needs to know about its host.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// This cloud VM: host id, virtual IaaS cloud, pool, key file, ticket lifetime.
    pub identity: Identity,
    /// The local libvirt (never a remote one: the daemon serves its own host).
    pub libvirt_uri: String,
    /// qemu.conf's `memory_backing_dir` (libvirt's default: /var/lib/libvirt/qemu/ram).
    pub memory_backing_dir: PathBuf,
    /// Where the private QMP sockets live (as put in the domain XML by `enable`).
    pub qmp_dir: PathBuf,
    /// Where the daemon keeps its own state for the life of this boot (the replay cache of
    /// tickets; `/run/vmbeam/state`).
    pub state_dir: PathBuf,
    /// Where the daemon keeps what must outlive a reboot of this cloud VM (`/var/lib/vmbeam`,
    /// systemd's `StateDirectory`): the host-device pool's records (`device-pool/`). The
    /// devices they name are the primary cloud's host's, plugged into this cloud VM's
    /// domain there; a reboot inside this cloud VM keeps them plugged and counted as held,
    /// so records lost with `/run` would leave that memory held on the host for good.
    pub persistent_dir: PathBuf,
    /// How long to wait for a destination's answer through the pool.
    pub rendezvous_timeout: Duration,
    /// How long a hook event may take before the daemon gives up (and libvirt fails the
    /// operation cleanly).
    pub hook_timeout: Duration,
}

impl DaemonConfig {
    /// The cloud's HMAC key.
    pub fn key(&self) -> Result<TicketKey, vmbeam_core::identity::IdentityError> {
        self.identity.load_key()
    }
}
