//! The host-device pool: guest RAM from shared memory devices that the primary cloud's
//! `vmbeam-host` hot-plugs into this cloud VM (one `ivshmem-plain` device per guest, its BAR 2
//! at `<pci_devices_dir>/<ADDR>/resource2`), asked for over the host channel
//! ([`crate::hostlink`]). The second kind of beam pool beside the shared directory
//! (`vmbeam_core::pool::BeamPool`); `pool_kind` in vmbeam.conf selects it, and
//! [`crate::guest_pool::GuestPool`] puts both behind one interface.
//!
//! What this cloud VM holds is remembered in vmbeamd's persistent directory
//! (`/var/lib/vmbeam`), one record per guest (`device-pool/<uuid>.json`: role, placement,
//! share), written before anything relies on it and removed once the host took the device
//! back, so a restarted vmbeamd knows what it holds (the protocol has no listing). Not
//! under `/run`: the devices are plugged into this cloud VM's domain on the primary cloud's
//! host, and a reboot inside the cloud VM keeps them there, held in the host's ledger;
//! with the records gone, nothing here would ever give that memory back. Kept, the records
//! let recovery give back the memory of guests that died with the reboot (a FREE or
//! WITHDRAW the host answers `not-holder` or `unknown-guest`, when the cloud VM was powered
//! off and its devices went with it, counts as done). Records an earlier vmbeamd kept in
//! the runtime state directory are moved over at start ([`DevicePool::take_over_records`]).
//!
//! The paper's two steps and their order:
//! - [`DevicePool::alloc`] (guest start): ALLOC, then wait for the kernel to show the
//!   device (ACPI hot-plug; BAR 2's file at the full BAR size) before QEMU may map it; a
//!   device that does not show is given back.
//! - [`DevicePool::share`] and [`DevicePool::prove`] (source): the guest's device plugged
//!   into the destination too, then a fresh proof record written into the control page
//!   through this side's mapping; [`DevicePool::accept_share`] (destination) waits for the
//!   device and checks the record through *its* mapping (`vmbeam_core::control_page`).
//! - [`DevicePool::accept_share`] says ACCEPT to the host before it first maps the device,
//!   and until then the source may take the share back itself with [`DevicePool::unshare`]
//!   (a migration that failed before the destination's `migrate begin`: nothing there maps
//!   the device, and only the host knows whether ACCEPT came first; see
//!   `vmbeam_core::host_protocol`, "Who takes a share back").
//! - [`DevicePool::release`] (source, after success) and [`DevicePool::withdraw`]
//!   (destination, after failure) only once no process here maps the device
//!   ([`mappers`]: QEMU has exited): the host's unplug does not wait for users, and a
//!   process still mapping the BAR would silently read zeroes.
//! - [`DevicePool::free`] (guest destroyed): the same check, then FREE; nothing is left on
//!   the host.
//! - The `.ran` marker's counterpart: [`DevicePool::mark_ran`] (destination, once the guest
//!   runs there: a record naming the migration's proof at `RAN_OFFSET` of the control page,
//!   and ownership adopted) and [`DevicePool::has_ran`] (source, through its own mapping).
//!   The hand-over record is the owner's `shared_with` (and `proof`), closed by
//!   [`DevicePool::close_hand_over`] or gone with RELEASE.

use std::fs;
use std::io;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};
use vmbeam_core::control_page::{
    self, ControlProof, ControlToken, ProofMismatch, PROOF_LEN, RAN_LEN, RAN_OFFSET,
};
use vmbeam_core::host_protocol::{CloudVmId, ErrorCode, PciAddress, Placement};
use vmbeam_core::{DomainUuid, FileIdentity, Nonce};

use crate::hostlink::{Colocation, HostLink, HostLinkError};

/// How long [`DevicePool::alloc`] and [`DevicePool::accept_share`] wait for the kernel to
/// show a hot-plugged device unless told otherwise (it took 0.18-0.23 s by hand, 2.35 s for
/// a 4 GiB BAR under TCG).
pub const DEFAULT_PLUG_WAIT: Duration = Duration::from_secs(15);

/// How often the waits look again.
const POLL: Duration = Duration::from_millis(10);

/// This cloud VM's part in a guest's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// It runs (or ran) the guest and owns its memory.
    Owner,
    /// A migration's destination: the owner shared the memory with it.
    Destination,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Owner => "owner",
            Self::Destination => "destination",
        })
    }
}

/// What this cloud VM holds of one guest (its record in the state directory).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holding {
    /// The guest.
    pub guest: DomainUuid,
    /// This cloud VM's role.
    pub role: Role,
    /// The device's PCI address here.
    pub addr: String,
    /// BAR 2's size.
    pub bar_size: u64,
    /// The control page's offset in the BAR.
    pub control_offset: u64,
    /// The cloud VM the owner shared the guest with (a migration in flight): the
    /// hand-over record, until the migration settled.
    pub shared_with: Option<String>,
    /// The nonce of the migration's control-page proof (the source's last `prove`, the
    /// destination's accepted one): the ran record in the control page names it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proof: Option<Nonce>,
}

impl Holding {
    fn new(guest: &DomainUuid, role: Role, p: &Placement) -> Self {
        Self {
            guest: guest.clone(),
            role,
            addr: p.addr.to_string(),
            bar_size: p.bar_size,
            control_offset: p.control_offset,
            shared_with: None,
            proof: None,
        }
    }
}

/// A guest's RAM in this cloud VM: the file QEMU maps, and where the host put it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceBacking {
    /// BAR 2's file (`<pci_devices_dir>/<ADDR>/resource2`).
    pub path: PathBuf,
    /// The host's placement.
    pub placement: Placement,
}

/// Why a device-pool step failed. Each says what is left.
#[derive(Debug, thiserror::Error)]
pub enum DevicePoolError {
    /// The host channel failed or the host refused (it changed nothing on a refusal).
    #[error(transparent)]
    Host(#[from] HostLinkError),
    /// The host placed the device but the kernel did not show it in time; the device was
    /// given back (or the text of `given_back` says why not).
    #[error("the device for guest {guest} did not appear at {} within {waited:?} ({given_back})", path.display())]
    NotPlugged {
        /// The guest.
        guest: DomainUuid,
        /// Where BAR 2 was expected.
        path: PathBuf,
        /// How long it was waited for.
        waited: Duration,
        /// What became of the device.
        given_back: String,
    },
    /// Something of another size is where the device should be.
    #[error("{} has {size} bytes, but the host placed a BAR of {bar_size} there", path.display())]
    WrongSize {
        /// BAR 2's file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The BAR's size in the host's answer.
        bar_size: u64,
    },
    /// Processes here still map the device: unplugging it would pull the memory from under
    /// them. Nothing was asked of the host.
    #[error("{} is still mapped by process {pids:?}; not giving it back to the host", path.display())]
    StillMapped {
        /// BAR 2's file.
        path: PathBuf,
        /// The processes mapping it.
        pids: Vec<u32>,
    },
    /// This cloud VM holds nothing of the guest.
    #[error("this cloud VM holds no device of guest {0}")]
    NotHeld(DomainUuid),
    /// This cloud VM holds the guest, in the other role.
    #[error("this cloud VM holds guest {guest} as {held}, the step needs the {wanted}")]
    WrongRole {
        /// The guest.
        guest: DomainUuid,
        /// The role held.
        held: Role,
        /// The role the step needs.
        wanted: Role,
    },
    /// The control page does not prove that both cloud VMs see the same memory.
    #[error("the control page of {} does not prove the shared device", path.display())]
    Proof {
        /// BAR 2's file.
        path: PathBuf,
        /// Why.
        #[source]
        source: ProofMismatch,
    },
    /// A file operation failed.
    #[error("{op} {}", path.display())]
    Io {
        /// What was done.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// UNSHARE refused: the share's destination has accepted it (it may map the device), so
    /// only it takes the share back (WITHDRAW at its `release end`). Nothing changed.
    #[error("cloud VM {with} has accepted the share of guest {guest}: it withdraws the share itself once nothing there maps the device")]
    ShareAccepted {
        /// The guest.
        guest: DomainUuid,
        /// The share's destination.
        with: String,
        /// The host's refusal.
        #[source]
        source: HostLinkError,
    },
    /// ACCEPT refused: the host holds no share of the guest for this cloud VM (the owner took
    /// it back, or never made it). Nothing here maps the device; the record is gone.
    #[error("the primary cloud's host has no share of guest {guest} for this cloud VM (the source took it back, or never shared it)")]
    ShareGone {
        /// The guest.
        guest: DomainUuid,
        /// The host's refusal.
        #[source]
        source: HostLinkError,
    },
    /// The step needs the migration's proof, and the record has none.
    #[error("guest {0}'s record names no control-page proof (no zero-copy migration of it)")]
    NoProof(DomainUuid),
    /// A record in the state directory is unreadable.
    #[error("record {} is not a device-pool record", path.display())]
    Record {
        /// The record.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
}

/// An error and its sources, joined with ": " (for logs and the daemon's errors).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> DevicePoolError + 'a {
    move |source| DevicePoolError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// The host-device pool of this cloud VM (see the module docs). One link to the host,
/// calls serialised on it (a virtio-serial port has one opener); a dead link is replaced at
/// the next call.
#[derive(Debug)]
pub struct DevicePool {
    channel: PathBuf,
    pci_devices: PathBuf,
    records: PathBuf,
    timeout: Duration,
    plug_wait: Duration,
    link: Mutex<Option<HostLink>>,
}

impl DevicePool {
    /// The pool behind the host channel `channel`, devices under `pci_devices`, records in
    /// `state_dir/device-pool` (vmbeamd's persistent directory, see the module docs); each
    /// host call waits at most `timeout`.
    pub fn new(
        channel: impl Into<PathBuf>,
        pci_devices: impl Into<PathBuf>,
        state_dir: &Path,
        timeout: Duration,
    ) -> Self {
        Self {
            channel: channel.into(),
            pci_devices: pci_devices.into(),
            records: state_dir.join("device-pool"),
            timeout,
            plug_wait: DEFAULT_PLUG_WAIT,
            link: Mutex::new(None),
        }
    }

    /// The host channel this pool asks the host over.
    pub fn channel(&self) -> &Path {
        &self.channel
    }

    /// Waits up to `wait` for hot-plugged devices to show.
    pub fn with_plug_wait(mut self, wait: Duration) -> Self {
        self.plug_wait = wait;
        self
    }

    /// BAR 2's file of the device at `addr`.
    pub fn resource_path(&self, addr: &PciAddress) -> PathBuf {
        self.pci_devices.join(addr.to_string()).join("resource2")
    }

    fn resource_of(&self, h: &Holding) -> PathBuf {
        self.pci_devices.join(&h.addr).join("resource2")
    }

    /// BAR 2's file of the device this cloud VM holds of `guest` in `role`, if it does.
    pub fn held_path(&self, guest: &DomainUuid, role: Role) -> Option<PathBuf> {
        self.holding(guest)
            .ok()
            .flatten()
            .filter(|h| h.role == role)
            .map(|h| self.resource_of(&h))
    }

    /// One call on the link, opening it first if there is none; a link that died is
    /// dropped (the next call opens a new one).
    fn call<T>(
        &self,
        f: impl FnOnce(&mut HostLink) -> Result<T, HostLinkError>,
    ) -> Result<T, HostLinkError> {
        let mut slot = self.link.lock().expect("lock");
        if slot.is_none() {
            *slot = Some(HostLink::open(&self.channel, self.timeout)?);
        }
        let link = slot.as_mut().expect("opened above");
        let out = f(link);
        if let Err(e) = &out {
            if e.needs_reconnect() {
                *slot = None;
            }
        }
        out
    }

    /// This cloud VM's id, as the host knows it (HELLO's answer).
    pub fn cloud_vm(&self) -> Result<CloudVmId, DevicePoolError> {
        Ok(self.call(|l| Ok(l.cloud_vm().clone()))?)
    }

    /// Whether `peer` is a cloud VM of this one's cloud on the same host (the host's
    /// answer; confirmed before any zero-copy step by [`Self::prove`]).
    pub fn colocated(&self, peer: &CloudVmId) -> Result<Colocation, DevicePoolError> {
        Ok(self.call(|l| l.colocated(peer))?)
    }

    // ---- records ----

    /// Moves the records an earlier vmbeamd kept under `old_state_dir/device-pool` (the
    /// runtime state directory, `/run/vmbeam/state`) into this pool's directory; a record
    /// already there wins. Best effort, logged: returns how many moved.
    pub fn take_over_records(&self, old_state_dir: &Path) -> usize {
        let old = old_state_dir.join("device-pool");
        if old == self.records {
            return 0;
        }
        let Ok(entries) = fs::read_dir(&old) else {
            return 0;
        };
        let mut moved = 0;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(guest) = name
                .strip_suffix(".json")
                .and_then(|u| DomainUuid::new(u).ok())
            else {
                continue;
            };
            let from = e.path();
            let take = || -> Result<(), DevicePoolError> {
                if self.holding(&guest)?.is_none() {
                    let bytes = fs::read(&from).map_err(io_err("read", &from))?;
                    let h: Holding = serde_json::from_slice(&bytes).map_err(|source| {
                        DevicePoolError::Record {
                            path: from.clone(),
                            source,
                        }
                    })?;
                    self.remember(&h)?;
                }
                fs::remove_file(&from).map_err(io_err("remove", &from))
            };
            match take() {
                Ok(()) => moved += 1,
                Err(e) => {
                    warn!(%guest, error = %error_chain(&e), "cannot move an old device-pool record")
                }
            }
        }
        if moved > 0 {
            info!(moved, from = %old.display(), to = %self.records.display(), "device-pool records moved to the persistent directory");
        }
        moved
    }

    fn record_path(&self, guest: &DomainUuid) -> PathBuf {
        self.records.join(format!("{}.json", guest.as_str()))
    }

    /// What this cloud VM holds of `guest`, if anything.
    pub fn holding(&self, guest: &DomainUuid) -> Result<Option<Holding>, DevicePoolError> {
        let path = self.record_path(guest);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| DevicePoolError::Record { path, source }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("read", &path)(e)),
        }
    }

    /// Everything this cloud VM holds (an unreadable record is an error: it names a
    /// device the daemon would otherwise forget).
    pub fn holdings(&self) -> Result<Vec<Holding>, DevicePoolError> {
        let entries = match fs::read_dir(&self.records) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err("list", &self.records)(e)),
        };
        let mut out = Vec::new();
        for e in entries {
            let e = e.map_err(io_err("list", &self.records))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(uuid) = name.strip_suffix(".json") else {
                continue;
            };
            let Ok(guest) = DomainUuid::new(uuid) else {
                continue;
            };
            if let Some(h) = self.holding(&guest)? {
                out.push(h);
            }
        }
        out.sort_by(|a, b| a.guest.as_str().cmp(b.guest.as_str()));
        Ok(out)
    }

    /// Writes `h` atomically (aside, synced, renamed into place).
    fn remember(&self, h: &Holding) -> Result<(), DevicePoolError> {
        use std::io::Write as _;
        fs::create_dir_all(&self.records).map_err(io_err("create", &self.records))?;
        let path = self.record_path(&h.guest);
        let tmp = self.records.join(format!(".{}.tmp", h.guest.as_str()));
        let bytes = serde_json::to_vec(h).expect("a holding serializes");
        let write = || -> io::Result<()> {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)
        };
        write().map_err(|e| {
            let _ = fs::remove_file(&tmp);
            io_err("write", &path)(e)
        })
    }

    fn forget(&self, guest: &DomainUuid) -> Result<(), DevicePoolError> {
        let path = self.record_path(guest);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err("remove", &path)(e)),
            _ => Ok(()),
        }
    }

    fn held_as(&self, guest: &DomainUuid, wanted: Role) -> Result<Holding, DevicePoolError> {
        let h = self
            .holding(guest)?
            .ok_or_else(|| DevicePoolError::NotHeld(guest.clone()))?;
        if h.role != wanted {
            return Err(DevicePoolError::WrongRole {
                guest: guest.clone(),
                held: h.role,
                wanted,
            });
        }
        Ok(h)
    }

    // ---- the kernel's side ----

    /// Waits until the device of `p` shows with BAR 2 at its full size.
    fn wait_plugged(&self, p: &Placement) -> Result<PathBuf, (PathBuf, Option<DevicePoolError>)> {
        let path = self.resource_path(&p.addr);
        let deadline = Instant::now() + self.plug_wait;
        loop {
            match fs::metadata(&path) {
                Ok(md) if md.len() == p.bar_size => return Ok(path),
                Ok(md) if md.len() != 0 => {
                    let e = DevicePoolError::WrongSize {
                        path: path.clone(),
                        size: md.len(),
                        bar_size: p.bar_size,
                    };
                    return Err((path, Some(e)));
                }
                // Not there yet (or BAR 2 not assigned yet: size 0).
                _ => {}
            }
            if Instant::now() >= deadline {
                return Err((path, None));
            }
            std::thread::sleep(POLL);
        }
    }

    /// Fails with [`DevicePoolError::StillMapped`] while a process here maps `path`.
    fn ensure_unmapped(path: &Path) -> Result<(), DevicePoolError> {
        let pids = mappers(path).map_err(io_err("look for processes mapping", path))?;
        if pids.is_empty() {
            Ok(())
        } else {
            Err(DevicePoolError::StillMapped {
                path: path.to_path_buf(),
                pids,
            })
        }
    }

    // ---- the steps ----

    /// Guest start: the guest's memory (`ram_bytes`) from the host, remembered, and shown
    /// by the kernel; the file QEMU is to map. Asked again for a guest this cloud VM owns
    /// (a restart), the host answers with the same placement.
    pub fn alloc(
        &self,
        guest: &DomainUuid,
        ram_bytes: u64,
    ) -> Result<DeviceBacking, DevicePoolError> {
        if let Some(h) = self.holding(guest)? {
            if h.role != Role::Owner {
                return Err(DevicePoolError::WrongRole {
                    guest: guest.clone(),
                    held: h.role,
                    wanted: Role::Owner,
                });
            }
        }
        let placement = self.call(|l| l.alloc(guest, ram_bytes))?;
        if let Err(e) = self.remember(&Holding::new(guest, Role::Owner, &placement)) {
            let back = self.give_back(guest);
            warn!(%guest, error = %e, given_back = %back, "could not remember the guest's device");
            return Err(e);
        }
        match self.wait_plugged(&placement) {
            Ok(path) => {
                info!(%guest, addr = %placement.addr, bar_size = placement.bar_size, "guest memory from the host");
                Ok(DeviceBacking { path, placement })
            }
            Err((path, e)) => {
                let given_back = self.give_back(guest);
                Err(e.unwrap_or(DevicePoolError::NotPlugged {
                    guest: guest.clone(),
                    path,
                    waited: self.plug_wait,
                    given_back,
                }))
            }
        }
    }

    /// FREE for a device nothing here can be using yet; what became of it.
    fn give_back(&self, guest: &DomainUuid) -> String {
        match self.call(|l| l.free(guest)) {
            Ok(()) => {
                let _ = self.forget(guest);
                "given back".into()
            }
            Err(e) => format!("not given back, still recorded: {e}"),
        }
    }

    /// Guest destroyed for good: the memory goes back to the host (device unplugged, file
    /// deleted) once nothing here maps it. `Ok(false)`: this cloud VM held nothing of it.
    pub fn free(&self, guest: &DomainUuid) -> Result<bool, DevicePoolError> {
        let Some(h) = self.holding(guest)? else {
            return Ok(false);
        };
        if h.role != Role::Owner {
            return Err(DevicePoolError::WrongRole {
                guest: guest.clone(),
                held: h.role,
                wanted: Role::Owner,
            });
        }
        Self::ensure_unmapped(&self.resource_of(&h))?;
        self.done(guest, "FREE", |l| l.free(guest))?;
        info!(%guest, "guest memory given back to the host");
        Ok(true)
    }

    /// Runs a RELEASE, WITHDRAW or FREE and forgets the guest once the host no longer
    /// counts this cloud VM as a holder (also when a repeated request finds it done).
    fn done(
        &self,
        guest: &DomainUuid,
        verb: &'static str,
        f: impl FnOnce(&mut HostLink) -> Result<(), HostLinkError>,
    ) -> Result<(), DevicePoolError> {
        match self.call(f) {
            Ok(()) => {}
            Err(e)
                if matches!(
                    e.code(),
                    Some(ErrorCode::NotHolder | ErrorCode::UnknownGuest)
                ) =>
            {
                warn!(%guest, verb, error = %e, "the host holds nothing of the guest for this cloud VM any more: forgetting it");
            }
            Err(e) => return Err(e.into()),
        }
        self.forget(guest)
    }

    /// [`Self::free`] for a guest this cloud VM owns (recovery).
    pub fn free_held(&self, guest: &DomainUuid) -> Result<(), DevicePoolError> {
        if self.free(guest)? {
            Ok(())
        } else {
            Err(DevicePoolError::NotHeld(guest.clone()))
        }
    }

    /// How long ago `guest`'s record was last written; `None` without one.
    pub fn age(&self, guest: &DomainUuid) -> Option<Duration> {
        let modified = fs::metadata(self.record_path(guest))
            .ok()?
            .modified()
            .ok()?;
        Some(modified.elapsed().unwrap_or_default())
    }

    /// Source, before libvirt's Prepare: the guest's memory plugged into `peer` too; where
    /// it sits there (the destination needs it, with [`Self::prove`]'s token).
    pub fn share(
        &self,
        guest: &DomainUuid,
        peer: &CloudVmId,
    ) -> Result<Placement, DevicePoolError> {
        let mut h = self.held_as(guest, Role::Owner)?;
        let there = self.call(|l| l.share(guest, peer))?;
        h.shared_with = Some(peer.to_string());
        self.remember(&h)?;
        info!(%guest, %peer, addr = %there.addr, "guest memory shared with the destination");
        Ok(there)
    }

    /// Source: a fresh proof record written into the guest's control page through this
    /// side's mapping; the token the destination checks it with.
    pub fn prove(&self, guest: &DomainUuid) -> Result<ControlToken, DevicePoolError> {
        let mut h = self.held_as(guest, Role::Owner)?;
        let proof = ControlProof::fresh();
        let path = self.resource_of(&h);
        h.proof = Some(proof.token().nonce);
        self.remember(&h)?;
        ControlPage::map(&path, h.control_offset)?.write_at(0, proof.record());
        Ok(proof.token())
    }

    /// Destination, before its QEMU starts: the shared device at `placement` shown by the
    /// kernel and remembered, and its control page checked against the source's `token`.
    /// A device that does not prove stays recorded (the source's failure path withdraws it
    /// through [`Self::withdraw`]).
    pub fn accept_share(
        &self,
        guest: &DomainUuid,
        placement: &Placement,
        token: &ControlToken,
    ) -> Result<DeviceBacking, DevicePoolError> {
        match self.holding(guest)? {
            Some(h) if h.role == Role::Owner => {
                return Err(DevicePoolError::WrongRole {
                    guest: guest.clone(),
                    held: Role::Owner,
                    wanted: Role::Destination,
                })
            }
            _ => self.remember(&Holding {
                proof: Some(token.nonce),
                ..Holding::new(guest, Role::Destination, placement)
            })?,
        }
        // ACCEPT before the first mapping: from now on the source cannot UNSHARE it.
        match self.call(|l| l.accept(guest)) {
            Ok(()) => {}
            Err(e)
                if matches!(
                    e.code(),
                    Some(ErrorCode::NotHolder | ErrorCode::UnknownGuest)
                ) =>
            {
                self.forget(guest)?;
                return Err(DevicePoolError::ShareGone {
                    guest: guest.clone(),
                    source: e,
                });
            }
            Err(e) => return Err(e.into()),
        }
        let path = match self.wait_plugged(placement) {
            Ok(path) => path,
            Err((path, e)) => {
                return Err(e.unwrap_or(DevicePoolError::NotPlugged {
                    guest: guest.clone(),
                    path,
                    waited: self.plug_wait,
                    given_back: "still recorded: withdraw it".into(),
                }))
            }
        };
        let mut page = [0u8; PROOF_LEN];
        ControlPage::map(&path, placement.control_offset)?.read_at(0, &mut page);
        token
            .check(&page)
            .map_err(|source| DevicePoolError::Proof {
                path: path.clone(),
                source,
            })?;
        info!(%guest, addr = %placement.addr, "shared guest memory proven through its control page");
        Ok(DeviceBacking {
            path,
            placement: *placement,
        })
    }

    /// Source, after a migration that failed before the destination accepted the share
    /// (its `migrate begin` never ran, or refused before ACCEPT): the share taken back (the
    /// host unplugs the device from the destination) and the hand-over record closed.
    /// Nothing in the destination can map the device before ACCEPT, which the host orders
    /// against this request; once the destination accepted,
    /// [`DevicePoolError::ShareAccepted`] (nothing changed: the destination withdraws it).
    /// A guest with no share in place on the host is taken back already.
    pub fn unshare(&self, guest: &DomainUuid) -> Result<(), DevicePoolError> {
        let mut h = self.held_as(guest, Role::Owner)?;
        match self.call(|l| l.unshare(guest)) {
            Ok(()) => {}
            Err(e) if e.code() == Some(ErrorCode::Accepted) => {
                return Err(DevicePoolError::ShareAccepted {
                    guest: guest.clone(),
                    with: h.shared_with.unwrap_or_else(|| "the destination".into()),
                    source: e,
                })
            }
            Err(e) => return Err(e.into()),
        }
        let with = h.shared_with.take();
        self.remember(&h)?;
        info!(%guest, with = with.as_deref().unwrap_or("-"), "unaccepted share taken back from the destination");
        Ok(())
    }

    /// Source, after a successful migration, once its QEMU has exited: the device taken
    /// out of this cloud VM; the destination owns the guest. Refused while anything here
    /// maps it.
    pub fn release(&self, guest: &DomainUuid) -> Result<(), DevicePoolError> {
        let h = self.held_as(guest, Role::Owner)?;
        Self::ensure_unmapped(&self.resource_of(&h))?;
        self.done(guest, "RELEASE", |l| l.release(guest))?;
        info!(%guest, "guest memory released here: the destination owns it");
        Ok(())
    }

    /// Destination, after a failed migration, once its QEMU has exited: the share taken
    /// back; the guest goes on at the source. Refused while anything here maps it.
    pub fn withdraw(&self, guest: &DomainUuid) -> Result<(), DevicePoolError> {
        let h = self.held_as(guest, Role::Destination)?;
        Self::ensure_unmapped(&self.resource_of(&h))?;
        self.done(guest, "WITHDRAW", |l| l.withdraw(guest))?;
        info!(%guest, "shared guest memory withdrawn: the guest stays at the source");
        Ok(())
    }

    /// Destination, after a successful migration whose source released: this cloud VM
    /// owns the guest now.
    pub fn adopt(&self, guest: &DomainUuid) -> Result<(), DevicePoolError> {
        let mut h = self.held_as(guest, Role::Destination)?;
        h.role = Role::Owner;
        self.remember(&h)
    }

    /// Destination, once the guest runs here: the ran record (naming the accepted proof)
    /// written into the control page, where the source sees it through its own mapping
    /// (its failure path fences instead of resuming), and this cloud VM takes ownership
    /// ([`Self::adopt`]): the guest last ran here.
    pub fn mark_ran(&self, guest: &DomainUuid) -> Result<(), DevicePoolError> {
        let h = self.held_as(guest, Role::Destination)?;
        let nonce = h
            .proof
            .ok_or_else(|| DevicePoolError::NoProof(guest.clone()))?;
        ControlPage::map(&self.resource_of(&h), h.control_offset)?
            .write_at(RAN_OFFSET, &control_page::ran_record(&nonce));
        self.adopt(guest)?;
        info!(%guest, "the guest runs here: ran record left in the control page, ownership taken");
        Ok(())
    }

    /// Source: whether the destination of the migration this cloud VM last proved ran the
    /// guest (its ran record in the control page, read through this side's mapping).
    pub fn has_ran(&self, guest: &DomainUuid) -> Result<bool, DevicePoolError> {
        let h = self.held_as(guest, Role::Owner)?;
        let nonce = h
            .proof
            .ok_or_else(|| DevicePoolError::NoProof(guest.clone()))?;
        let mut record = [0u8; RAN_LEN];
        ControlPage::map(&self.resource_of(&h), h.control_offset)?.read_at(RAN_OFFSET, &mut record);
        Ok(control_page::has_ran(&record, &nonce))
    }

    /// Source, after a failed migration whose guest goes on here: the hand-over record is
    /// closed (the destination withdraws its share when its QEMU has exited).
    pub fn close_hand_over(&self, guest: &DomainUuid) -> Result<(), DevicePoolError> {
        let mut h = self.held_as(guest, Role::Owner)?;
        h.shared_with = None;
        self.remember(&h)
    }

    /// The guest is gone from this cloud VM for good: what this cloud VM holds of it goes
    /// back to the host once nothing maps it (waiting up to `wait`). The owner FREEs; a
    /// share's destination WITHDRAWs, unless the host counts it as the owner already (the
    /// source released after a migration whose guest never ran here, a paused one): then
    /// it adopts and FREEs. `Ok(false)`: nothing held.
    pub fn let_go(&self, guest: &DomainUuid, wait: Duration) -> Result<bool, DevicePoolError> {
        let Some(h) = self.holding(guest)? else {
            return Ok(false);
        };
        if h.role == Role::Owner {
            return self.free(guest);
        }
        match self.when_unmapped(guest, wait, Self::withdraw) {
            Err(DevicePoolError::Host(e)) if e.code() == Some(ErrorCode::WrongRole) => {
                info!(%guest, "the host counts this cloud VM as the owner already: adopting, then freeing");
                self.adopt(guest)?;
                self.free(guest)
            }
            other => other.map(|()| true),
        }
    }

    /// Waits up to `wait` until nothing here maps `guest`'s device (QEMU exiting after a
    /// migration), then runs `step` ([`Self::release`] or [`Self::withdraw`]).
    pub fn when_unmapped(
        &self,
        guest: &DomainUuid,
        wait: Duration,
        step: impl Fn(&Self, &DomainUuid) -> Result<(), DevicePoolError>,
    ) -> Result<(), DevicePoolError> {
        let deadline = Instant::now() + wait;
        loop {
            match step(self, guest) {
                Err(DevicePoolError::StillMapped { .. }) if Instant::now() < deadline => {
                    std::thread::sleep(POLL)
                }
                other => return other,
            }
        }
    }
}

/// The processes that map `path` (by its device and inode, so through any path or mount
/// namespace), from `/proc/*/maps`; none when `path` is gone. Processes that end or cannot
/// be read meanwhile are skipped (vmbeamd runs as root and reads every one).
pub fn mappers(path: &Path) -> io::Result<Vec<u32>> {
    let id = match fs::metadata(path) {
        Ok(md) => FileIdentity::from_metadata(&md),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut pids = Vec::new();
    for e in fs::read_dir("/proc")? {
        let Ok(e) = e else { continue };
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(maps) = fs::read_to_string(e.path().join("maps")) else {
            continue;
        };
        let (shared, private) = vmbeam_qemu::ramlink::scan_maps(&maps, id);
        if shared + private > 0 {
            pids.push(pid);
        }
    }
    pids.sort_unstable();
    Ok(pids)
}

/// One control page, mapped shared from BAR 2's file for as long as the value lives (a
/// sysfs `resource2` of a memory BAR can only be mapped, not read or written).
struct ControlPage {
    ptr: std::ptr::NonNull<std::ffi::c_void>,
    len: NonZeroUsize,
}

impl ControlPage {
    const LEN: usize = vmbeam_core::host_protocol::CONTROL_PAGE as usize;

    fn map(path: &Path, offset: u64) -> Result<Self, DevicePoolError> {
        use nix::sys::mman::{mmap, MapFlags, ProtFlags};
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_err("open", path))?;
        let len = NonZeroUsize::new(Self::LEN).expect("a page");
        let offset = i64::try_from(offset).map_err(|_| {
            io_err("map", path)(io::Error::new(
                io::ErrorKind::InvalidInput,
                "control page offset out of range",
            ))
        })?;
        // SAFETY: a fresh shared mapping at an address the kernel chooses, of a file we
        // opened read-write; it aliases no Rust object, and it is only touched through
        // `read`/`write` below (volatile copies, since another cloud VM writes it too) and
        // unmapped in `drop`. The file may be shorter than `offset + LEN` only if the device
        // changed under us; then the access faults, which the mapping's size check in the
        // callers (`wait_plugged`) rules out for our own devices.
        let ptr = unsafe {
            mmap(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                &file,
                offset,
            )
        }
        .map_err(|e| io_err("map", path)(e.into()))?;
        Ok(Self { ptr, len })
    }

    fn write_at(&self, at: usize, bytes: &[u8]) {
        assert!(at + bytes.len() <= Self::LEN);
        let base = self.ptr.as_ptr().cast::<u8>();
        for (i, b) in bytes.iter().enumerate() {
            // SAFETY: `at + i < at + bytes.len() <= LEN`, inside the live mapping of `LEN`
            // bytes.
            unsafe { base.add(at + i).write_volatile(*b) };
        }
    }

    fn read_at(&self, at: usize, out: &mut [u8]) {
        assert!(at + out.len() <= Self::LEN);
        let base = self.ptr.as_ptr().cast::<u8>();
        for (i, b) in out.iter_mut().enumerate() {
            // SAFETY: `at + i < at + out.len() <= LEN`, inside the live mapping of `LEN`
            // bytes.
            *b = unsafe { base.add(at + i).read_volatile() };
        }
    }
}

impl Drop for ControlPage {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are the mapping `map` made, unmapped only here, and no
        // reference into it outlives `self`.
        if let Err(e) = unsafe { nix::sys::mman::munmap(self.ptr, self.len.get()) } {
            warn!(error = %e, "could not unmap a control page");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;
    use crate::host_fixture::{cvm, HostFixture, A1, A2, B1};

    const G: &str = "6e3b1e9a-1b2c-4d5e-8f90-0123456789ab";
    const MIB: u64 = 1 << 20;

    fn guest() -> DomainUuid {
        DomainUuid::new(G).unwrap()
    }

    /// A mapping of a device's BAR held as QEMU holds it (by this process, for as long as
    /// the value lives).
    mod memmap {
        use std::num::NonZeroUsize;
        use std::path::Path;
        use std::ptr::NonNull;

        /// The mapping's address (as a number, so that a test thread can end it) and length.
        pub struct Map(usize, NonZeroUsize);

        impl Map {
            pub fn new(path: &Path) -> Self {
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(path)
                    .unwrap();
                let len = NonZeroUsize::new(4096).unwrap();
                // SAFETY: a fresh shared mapping the test never dereferences; unmapped in drop.
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
                .unwrap();
                Self(p.as_ptr() as usize, len)
            }
        }

        impl Drop for Map {
            fn drop(&mut self) {
                let p = NonNull::new(self.0 as *mut std::ffi::c_void).unwrap();
                // SAFETY: the mapping made in `new`, unmapped once.
                unsafe { nix::sys::mman::munmap(p, self.1.get()) }.unwrap();
            }
        }
    }

    #[test]
    fn alloc_gives_the_bar_the_kernel_shows_and_free_leaves_nothing_on_the_host() {
        let h = HostFixture::new();
        let state = tempfile::tempdir().unwrap();
        let pool = h.pool(A1, state.path());
        assert_eq!(pool.cloud_vm().unwrap(), cvm(A1));

        let b = pool.alloc(&guest(), 256 * MIB).unwrap();
        assert_eq!(b.placement.bar_size, 512 * MIB);
        assert_eq!(
            b.path,
            h.pci_devices(A1)
                .join(b.placement.addr.to_string())
                .join("resource2")
        );
        assert_eq!(fs::metadata(&b.path).unwrap().len(), 512 * MIB);
        assert_eq!(h.attached(), [(A1.to_owned(), b.placement.addr.slot)]);
        assert_eq!(h.files().len(), 1);
        let held = pool.holdings().unwrap();
        assert_eq!(held.len(), 1);
        assert_eq!((held[0].role, held[0].bar_size), (Role::Owner, 512 * MIB));

        // The guest's RAM written through this cloud VM's BAR is the host file's.
        let file = fs::OpenOptions::new().write(true).open(&b.path).unwrap();
        file.write_all_at(b"guest page", 4096).unwrap();
        let (name, _) = h.files().into_iter().next().unwrap();
        assert!(name.contains(G));

        // A restarted vmbeamd asks again: same placement, nothing new on the host.
        let again = h.pool(A1, state.path());
        assert_eq!(again.alloc(&guest(), 256 * MIB).unwrap(), b);
        assert_eq!(h.attached().len(), 1);

        // QEMU still maps it: not given back, nothing changed.
        let qemu = memmap::Map::new(&b.path);
        assert_eq!(mappers(&b.path).unwrap(), [std::process::id()]);
        match again.free(&guest()) {
            Err(DevicePoolError::StillMapped { pids, .. }) => {
                assert_eq!(pids, [std::process::id()])
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(h.attached().len(), 1);
        assert_eq!(again.holdings().unwrap().len(), 1);
        drop(qemu);

        assert!(again.free(&guest()).unwrap());
        assert!(h.attached().is_empty());
        assert!(h.files().is_empty(), "nothing left on the host");
        assert!(again.holdings().unwrap().is_empty());
        // Nothing held: nothing to give back.
        assert!(!again.free(&guest()).unwrap());
    }

    /// Records an earlier vmbeamd kept under /run move to the persistent directory; one
    /// already there wins.
    #[test]
    fn records_of_the_runtime_state_directory_move_to_the_persistent_one() {
        let h = HostFixture::new();
        let (run, lib) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let old = h.pool(A1, run.path());
        let b = old.alloc(&guest(), 64 * MIB).unwrap();
        let g2 = DomainUuid::new("6e3b1e9a-1b2c-4d5e-8f90-0123456789ac").unwrap();
        old.remember(&Holding::new(&g2, Role::Destination, &b.placement))
            .unwrap();
        let new = h.pool(A1, lib.path());
        new.remember(&Holding::new(&g2, Role::Owner, &b.placement))
            .unwrap();
        assert_eq!(new.take_over_records(run.path()), 2);
        assert!(old.holdings().unwrap().is_empty());
        let held = new.holdings().unwrap();
        assert_eq!(held.len(), 2);
        assert_eq!(
            new.holding(&guest()).unwrap().unwrap().addr,
            b.placement.addr.to_string()
        );
        assert_eq!(new.holding(&g2).unwrap().unwrap().role, Role::Owner);
        assert_eq!(new.take_over_records(run.path()), 0);
        new.forget(&g2).unwrap();
        assert!(new.free(&guest()).unwrap());
        assert!(h.files().is_empty());
    }

    #[test]
    fn a_device_the_kernel_never_shows_is_given_back() {
        let h = HostFixture::new();
        let state = tempfile::tempdir().unwrap();
        // This cloud VM's kernel looks elsewhere: the device never shows where it looks.
        let pool = DevicePool::new(
            h.channel(A1),
            state.path().join("no-such-pci"),
            state.path(),
            Duration::from_secs(10),
        )
        .with_plug_wait(Duration::from_millis(200));
        match pool.alloc(&guest(), 64 * MIB) {
            Err(DevicePoolError::NotPlugged { given_back, .. }) => {
                assert_eq!(given_back, "given back")
            }
            other => panic!("{other:?}"),
        }
        assert!(h.attached().is_empty());
        assert!(h.files().is_empty());
        assert!(pool.holdings().unwrap().is_empty());
    }

    #[test]
    fn a_refused_alloc_records_nothing() {
        let h = HostFixture::new();
        let state = tempfile::tempdir().unwrap();
        let pool = h.pool(A1, state.path());
        match pool.alloc(&guest(), 0) {
            Err(DevicePoolError::Host(e)) => assert_eq!(e.code(), Some(ErrorCode::BadSize)),
            other => panic!("{other:?}"),
        }
        assert!(pool.holdings().unwrap().is_empty());
        assert!(h.attached().is_empty());
    }

    /// The paper's two steps: share with the destination, content proof through the
    /// control page, the source's QEMU exits, the source releases; the destination owns it.
    #[test]
    fn share_prove_then_release_after_the_source_qemu_exited() {
        let h = HostFixture::new();
        let (sa, sb) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (src, dst) = (h.pool(A1, sa.path()), h.pool(A2, sb.path()));
        let here = src.alloc(&guest(), 64 * MIB).unwrap();
        let source_qemu = memmap::Map::new(&here.path);

        let there = src.share(&guest(), &cvm(A2)).unwrap();
        assert_eq!(
            src.holding(&guest()).unwrap().unwrap().shared_with,
            Some(A2.to_owned())
        );
        let token = src.prove(&guest()).unwrap();
        let at_dst = dst.accept_share(&guest(), &there, &token).unwrap();
        assert_eq!(
            dst.holding(&guest()).unwrap().unwrap().role,
            Role::Destination
        );
        // An old token does not prove the device any more.
        let fresh = src.prove(&guest()).unwrap();
        assert!(matches!(
            dst.accept_share(&guest(), &there, &token),
            Err(DevicePoolError::Proof {
                source: ProofMismatch::OtherNonce { .. },
                ..
            })
        ));
        dst.accept_share(&guest(), &there, &fresh).unwrap();
        // The proof's own mappings are gone: only QEMU maps the device.
        assert_eq!(mappers(&here.path).unwrap(), [std::process::id()]);

        // libvirt's job moved the guest; the source QEMU has not exited yet. (Both cloud
        // VMs are this one process here, so the destination QEMU's mapping, which a real
        // source cloud VM cannot see, is left out until the source released.)
        assert!(matches!(
            src.release(&guest()),
            Err(DevicePoolError::StillMapped { .. })
        ));
        assert_eq!(
            h.attached().len(),
            2,
            "nothing unplugged under a running QEMU"
        );
        let exiting = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            drop(source_qemu);
        });
        src.when_unmapped(&guest(), Duration::from_secs(5), DevicePool::release)
            .unwrap();
        exiting.join().unwrap();
        assert_eq!(h.attached(), [(A2.to_owned(), there.addr.slot)]);
        assert!(src.holdings().unwrap().is_empty());
        dst.adopt(&guest()).unwrap();
        assert_eq!(dst.holding(&guest()).unwrap().unwrap().role, Role::Owner);

        // The destination owns it now: destroyed there, nothing is left on the host.
        let dest_qemu = memmap::Map::new(&at_dst.path);
        assert!(matches!(
            dst.free(&guest()),
            Err(DevicePoolError::StillMapped { .. })
        ));
        drop(dest_qemu);
        assert!(dst.free(&guest()).unwrap());
        assert!(h.attached().is_empty());
        assert!(h.files().is_empty());
    }

    #[test]
    fn a_destination_that_never_ran_the_guest_lets_go_as_the_owner_the_host_made_it() {
        // A paused guest's migration succeeded: the source released, but no ran record
        // made the destination adopt. Its `release end` cannot WITHDRAW (the host counts it
        // as the owner now): it adopts and FREEs, and nothing is left on the host.
        let h = HostFixture::new();
        let (sa, sb) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (src, dst) = (h.pool(A1, sa.path()), h.pool(A2, sb.path()));
        src.alloc(&guest(), 64 * MIB).unwrap();
        let there = src.share(&guest(), &cvm(A2)).unwrap();
        let token = src.prove(&guest()).unwrap();
        dst.accept_share(&guest(), &there, &token).unwrap();
        src.release(&guest()).unwrap();
        assert_eq!(
            dst.holding(&guest()).unwrap().unwrap().role,
            Role::Destination
        );
        assert!(dst.let_go(&guest(), Duration::from_secs(1)).unwrap());
        assert!(h.attached().is_empty());
        assert!(h.files().is_empty());
        assert!(dst.holdings().unwrap().is_empty());
        assert!(!dst.let_go(&guest(), Duration::from_secs(1)).unwrap());
    }

    #[test]
    fn the_ran_record_names_the_proof_and_only_the_destination_leaves_it() {
        let h = HostFixture::new();
        let (sa, sb) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (src, dst) = (h.pool(A1, sa.path()), h.pool(A2, sb.path()));
        src.alloc(&guest(), 64 * MIB).unwrap();
        // No migration proved yet: nothing to tell.
        assert!(matches!(
            src.has_ran(&guest()),
            Err(DevicePoolError::NoProof(_))
        ));
        let there = src.share(&guest(), &cvm(A2)).unwrap();
        let token = src.prove(&guest()).unwrap();
        dst.accept_share(&guest(), &there, &token).unwrap();
        assert!(!src.has_ran(&guest()).unwrap());
        assert!(matches!(
            src.mark_ran(&guest()),
            Err(DevicePoolError::WrongRole { .. })
        ));
        dst.mark_ran(&guest()).unwrap();
        assert!(src.has_ran(&guest()).unwrap());
        assert_eq!(dst.holding(&guest()).unwrap().unwrap().role, Role::Owner);
        // A later migration's proof: the earlier record does not count for it.
        src.prove(&guest()).unwrap();
        assert!(!src.has_ran(&guest()).unwrap());
    }

    #[test]
    fn a_failed_migration_withdraws_the_destinations_share_after_its_qemu_exited() {
        let h = HostFixture::new();
        let (sa, sb) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (src, dst) = (h.pool(A1, sa.path()), h.pool(A2, sb.path()));
        let here = src.alloc(&guest(), 64 * MIB).unwrap();
        let there = src.share(&guest(), &cvm(A2)).unwrap();
        let token = src.prove(&guest()).unwrap();
        let at_dst = dst.accept_share(&guest(), &there, &token).unwrap();
        // Roles are checked here before the host is asked.
        assert!(matches!(
            dst.release(&guest()),
            Err(DevicePoolError::WrongRole { .. })
        ));
        assert!(matches!(
            src.withdraw(&guest()),
            Err(DevicePoolError::WrongRole { .. })
        ));
        let dest_qemu = memmap::Map::new(&at_dst.path);
        assert!(matches!(
            dst.withdraw(&guest()),
            Err(DevicePoolError::StillMapped { .. })
        ));
        drop(dest_qemu);
        dst.withdraw(&guest()).unwrap();
        assert_eq!(h.attached(), [(A1.to_owned(), here.placement.addr.slot)]);
        assert!(dst.holdings().unwrap().is_empty());
        // The guest goes on at the source, whose memory is untouched by all this.
        assert_eq!(src.holding(&guest()).unwrap().unwrap().role, Role::Owner);
        assert!(src.free(&guest()).unwrap());
        assert!(h.files().is_empty());
    }

    /// The owner-side cancel: a share the destination never accepted goes back at the
    /// source's word; once accepted it is the destination's to withdraw, and UNSHARE is
    /// refused with one typed error that changes nothing.
    #[test]
    fn the_source_takes_back_a_share_its_destination_never_accepted() {
        let h = HostFixture::new();
        let (sa, sb) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (src, dst) = (h.pool(A1, sa.path()), h.pool(A2, sb.path()));
        let here = src.alloc(&guest(), 64 * MIB).unwrap();
        let there = src.share(&guest(), &cvm(A2)).unwrap();
        let token = src.prove(&guest()).unwrap();
        assert_eq!(h.attached().len(), 2);

        // Not the owner: the destination holds no record yet; and one that claims to own
        // it is the destination to the host, which refuses.
        assert!(matches!(
            dst.unshare(&guest()),
            Err(DevicePoolError::NotHeld(_))
        ));
        dst.remember(&Holding::new(&guest(), Role::Owner, &there))
            .unwrap();
        match dst.unshare(&guest()) {
            Err(DevicePoolError::Host(e)) => assert_eq!(e.code(), Some(ErrorCode::WrongRole)),
            other => panic!("{other:?}"),
        }
        dst.forget(&guest()).unwrap();
        // An unknown guest.
        let g2 = DomainUuid::new("6e3b1e9a-1b2c-4d5e-8f90-0123456789ac").unwrap();
        src.remember(&Holding::new(&g2, Role::Owner, &here.placement))
            .unwrap();
        match src.unshare(&g2) {
            Err(DevicePoolError::Host(e)) => assert_eq!(e.code(), Some(ErrorCode::UnknownGuest)),
            other => panic!("{other:?}"),
        }
        src.forget(&g2).unwrap();
        assert_eq!(h.attached().len(), 2, "no refusal changed anything");

        // The owner, before the destination accepted: the device leaves the destination.
        src.unshare(&guest()).unwrap();
        assert_eq!(h.attached(), [(A1.to_owned(), here.placement.addr.slot)]);
        let rec = src.holding(&guest()).unwrap().unwrap();
        assert_eq!((rec.role, rec.shared_with), (Role::Owner, None));
        // The destination's hook comes late: nothing to accept, nothing recorded, nothing
        // mapped.
        assert!(matches!(
            dst.accept_share(&guest(), &there, &token),
            Err(DevicePoolError::ShareGone { .. })
        ));
        assert!(dst.holdings().unwrap().is_empty());

        // Shared again and accepted: refused, nothing changes.
        let there = src.share(&guest(), &cvm(A2)).unwrap();
        let token = src.prove(&guest()).unwrap();
        dst.accept_share(&guest(), &there, &token).unwrap();
        match src.unshare(&guest()) {
            Err(DevicePoolError::ShareAccepted { with, source, .. }) => {
                assert_eq!(with, A2);
                assert_eq!(source.code(), Some(ErrorCode::Accepted));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(h.attached().len(), 2);
        assert_eq!(
            src.holding(&guest()).unwrap().unwrap().shared_with,
            Some(A2.to_owned())
        );
        dst.withdraw(&guest()).unwrap();
        assert!(src.free(&guest()).unwrap());
        assert!(h.files().is_empty());
    }

    #[test]
    fn another_clouds_cloud_vm_gets_nothing_and_a_wrong_device_does_not_prove() {
        let h = HostFixture::new();
        let (sa, sb, sc) = (
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
        );
        let (src, dst, other) = (
            h.pool(A1, sa.path()),
            h.pool(A2, sb.path()),
            h.pool(B1, sc.path()),
        );
        assert!(src.colocated(&cvm(A2)).unwrap().is_yes());
        assert!(!src.colocated(&cvm(B1)).unwrap().is_yes());
        src.alloc(&guest(), 64 * MIB).unwrap();
        match src.share(&guest(), &cvm(B1)) {
            Err(DevicePoolError::Host(e)) => assert_eq!(e.code(), Some(ErrorCode::NotColocated)),
            x => panic!("{x:?}"),
        }
        assert_eq!(src.holding(&guest()).unwrap().unwrap().shared_with, None);
        assert!(other.holdings().unwrap().is_empty());

        // The destination has another guest's device where the source says: no proof.
        let g2 = DomainUuid::new("6e3b1e9a-1b2c-4d5e-8f90-0123456789ac").unwrap();
        let wrong = dst.alloc(&g2, 64 * MIB).unwrap();
        let token = src.prove(&guest()).unwrap();
        let there = src.share(&guest(), &cvm(A2)).unwrap();
        assert_ne!(there.addr, wrong.placement.addr);
        let mut lie = there;
        lie.addr = wrong.placement.addr;
        assert!(matches!(
            dst.accept_share(&guest(), &lie, &token),
            Err(DevicePoolError::Proof {
                source: ProofMismatch::NoRecord,
                ..
            })
        ));
    }
}
