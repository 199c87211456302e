//! The ledger: which guest's file is attached to which cloud VM, at which address, in which
//! role, and which operation is in flight. Pure: [`Ledger::decide`] turns a request into a
//! refusal, an immediate answer or a [`Transition`] (the libvirt and file steps to run) and
//! marks the guest busy; the caller runs the steps ([`crate::libvirt::run`]) and reports
//! the [`Outcome`] to [`Ledger::finish`], which commits or rolls back so that the ledger
//! says what libvirt has. [`Ledger::reconcile`] brings it in line with the cloud VMs' live
//! XML (devices libvirt shows win); files nobody holds are reported, never deleted.
//!
//! Invariants ([`Ledger::violations`], held by the property tests under any sequence of
//! requests, failures and rescans):
//! - every guest has one or two holders, exactly one of them its owner, until FREE (a guest
//!   whose ALLOC is in flight has none yet);
//! - every holder belongs to the guest's cloud, which is part of the guest's name;
//! - at most one operation per guest is in flight, and a guest is shared with at most one
//!   destination at a time (SHARE needs a sole owner; RELEASE, WITHDRAW or UNSHARE settles
//!   it);
//! - only the owner's UNSHARE unplugs a share from its destination, and only while the
//!   destination has not ACCEPTed it ([`Holder::accepted`]; why that is the safe moment:
//!   `vmbeam_core::host_protocol`, "Who takes a share back");
//! - no two guests at one PCI address of one cloud VM, and none on a slot another device
//!   uses;
//! - the VMBeam BARs of each cloud VM fit its 64-bit window ([`crate::device::window_fits`]).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::cloudvm::{CloudVm, CloudVmId, Topology};
use crate::device::{
    bar_size, choose_slot, window_fits, GuestKey, PciAddress, ShmemDevice, SizeError,
};
use crate::protocol::{ErrorCode, NoReason, Op, Placement, Reply};

/// A holder's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// The cloud VM the guest runs (or last ran) on: it allocated the guest or received it.
    Owner,
    /// The destination of a share in place (between SHARE and RELEASE or WITHDRAW).
    Destination,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Owner => "owner",
            Self::Destination => "destination",
        })
    }
}

/// One cloud VM's hold on a guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// The device's address in that cloud VM.
    pub addr: PciAddress,
    /// Its role.
    pub role: Role,
    /// For a share's destination: whether it ACCEPTed the share (it may map the device from
    /// then on, so only it takes the share back, by WITHDRAW). `false` only between SHARE and
    /// ACCEPT, when nothing in the destination maps the device and the owner may UNSHARE it.
    /// A destination the ledger cannot vouch for (adopted from libvirt's view, or loaded
    /// from a ledger written before ACCEPT existed) counts as accepted. Always `true` for an
    /// owner.
    pub accepted: bool,
}

impl Holder {
    /// `Ok` if this holder has `role`; else the `wrong-role` refusal with `hint`.
    fn must_be(
        &self,
        role: Role,
        uuid: &vmbeam_core::DomainUuid,
        hint: &'static str,
    ) -> Result<(), Refusal> {
        if self.role == role {
            return Ok(());
        }
        Err(Refusal::WrongRole {
            guest: uuid.clone(),
            role: self.role,
            hint,
        })
    }
}

/// What kind of operation a transition is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OpKind {
    /// ALLOC.
    Alloc,
    /// SHARE.
    Share,
    /// RELEASE.
    Release,
    /// WITHDRAW.
    Withdraw,
    /// UNSHARE (unplugs from the share's destination, asked by the owner).
    Unshare,
    /// FREE.
    Free,
}

impl fmt::Display for OpKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Alloc => "ALLOC",
            Self::Share => "SHARE",
            Self::Release => "RELEASE",
            Self::Withdraw => "WITHDRAW",
            Self::Unshare => "UNSHARE",
            Self::Free => "FREE",
        })
    }
}

/// An operation in flight on a guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    /// The transition's id.
    pub op: u64,
    /// What it does.
    pub kind: OpKind,
    /// The cloud VM it plugs into or unplugs from.
    pub target: CloudVmId,
    /// The address it plugs at (ALLOC, SHARE), reserved until it finishes.
    pub reserved: Option<PciAddress>,
}

/// A guest's entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Guest {
    /// BAR and file size.
    pub bar_size: u64,
    /// RAM size as ALLOC gave it; unknown for a guest adopted from libvirt.
    pub ram_bytes: Option<u64>,
    /// The cloud VMs that have its device now.
    pub holders: BTreeMap<CloudVmId, Holder>,
    /// The operation in flight.
    pub pending: Option<Pending>,
}

impl Guest {
    fn owner(&self) -> Option<&CloudVmId> {
        self.holders
            .iter()
            .find(|(_, h)| h.role == Role::Owner)
            .map(|(id, _)| id)
    }
}

/// One libvirt or file step of a transition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Create the backing file (sparse, exactly `size` bytes).
    CreateFile {
        /// The file's name in the shm directory.
        name: String,
        /// Its size.
        size: u64,
    },
    /// Hot-plug the device into a cloud VM.
    Attach {
        /// Where.
        cloud_vm: CloudVmId,
        /// What.
        device: ShmemDevice,
    },
    /// Hot-unplug the device from a cloud VM and wait until it is gone.
    Detach {
        /// Where.
        cloud_vm: CloudVmId,
        /// What.
        device: ShmemDevice,
    },
    /// Delete the backing file.
    RemoveFile {
        /// The file's name in the shm directory.
        name: String,
    },
}

/// A decided operation: the steps to run and, once they ran, what to commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    /// Its id (the guest's [`Pending::op`]).
    pub op: u64,
    /// What it does.
    pub kind: OpKind,
    /// The guest.
    pub guest: GuestKey,
    /// The cloud VM it plugs into (ALLOC: the asker; SHARE: the peer) or unplugs from (the
    /// asker; UNSHARE: the share's destination).
    pub target: CloudVmId,
    /// The device in `target`.
    pub device: ShmemDevice,
}

impl Transition {
    /// The steps, in order.
    pub fn steps(&self) -> Vec<Step> {
        let attach = Step::Attach {
            cloud_vm: self.target.clone(),
            device: self.device.clone(),
        };
        let detach = Step::Detach {
            cloud_vm: self.target.clone(),
            device: self.device.clone(),
        };
        match self.kind {
            OpKind::Alloc => vec![
                Step::CreateFile {
                    name: self.device.name(),
                    size: self.device.bar_size,
                },
                attach,
            ],
            OpKind::Share => vec![attach],
            OpKind::Release | OpKind::Withdraw | OpKind::Unshare => vec![detach],
            OpKind::Free => vec![
                detach,
                Step::RemoveFile {
                    name: self.device.name(),
                },
            ],
        }
    }

    /// What undoes the first `done` steps after step `done` failed: an ALLOC whose attach
    /// failed removes the file it created.
    pub fn compensation(&self, done: usize) -> Vec<Step> {
        match (self.kind, done) {
            (OpKind::Alloc, 1) => vec![Step::RemoveFile {
                name: self.device.name(),
            }],
            _ => Vec::new(),
        }
    }

    /// The answer after all steps ran.
    pub fn reply(&self) -> Reply {
        match self.kind {
            OpKind::Alloc | OpKind::Share => {
                Reply::Placed(Placement::new(self.device.addr, self.device.bar_size))
            }
            OpKind::Release | OpKind::Withdraw | OpKind::Unshare | OpKind::Free => Reply::Done,
        }
    }
}

/// Why a step failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StepError {
    /// The file to create exists.
    #[error("{0} exists")]
    FileExists(String),
    /// An unplug libvirt did not confirm in time: it may still complete.
    #[error("{0}")]
    Unsettled(String),
    /// Any other failure, libvirt's or the file system's, as text.
    #[error("{0}")]
    Failed(String),
}

/// What running a transition's steps did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every step succeeded.
    Done,
    /// Step `done` failed (the steps before it succeeded; compensation ran).
    Failed {
        /// How many steps succeeded.
        done: usize,
        /// Why the next one failed.
        error: StepError,
    },
}

/// Why a request is refused. Nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The asker is not (any more) a usable VMBeam cloud VM.
    #[error("this cloud VM is not a usable VMBeam cloud VM of this host right now")]
    NotReady,
    /// The peer is not a VMBeam cloud VM running on this host.
    #[error("cloud VM {0} is not a cloud VM of your cloud on this host")]
    NotColocated(CloudVmId),
    /// The peer runs here but belongs to another cloud (told to the asker as
    /// [`Refusal::NotColocated`]).
    #[error("cloud VM {0} belongs to another cloud")]
    OtherCloud(CloudVmId),
    /// The peer is the asker.
    #[error("the peer is this cloud VM itself")]
    SelfPeer,
    /// No such guest in the asker's cloud.
    #[error("your cloud has no guest {0} on this host")]
    UnknownGuest(vmbeam_core::DomainUuid),
    /// The asker does not hold the guest.
    #[error("this cloud VM does not hold guest {0}")]
    NotHolder(vmbeam_core::DomainUuid),
    /// The asker holds the guest in the other role.
    #[error("this cloud VM is the {role} of guest {guest}: {hint}")]
    WrongRole {
        /// The guest.
        guest: vmbeam_core::DomainUuid,
        /// The asker's role.
        role: Role,
        /// What it may do instead.
        hint: &'static str,
    },
    /// RELEASE by the only holder.
    #[error("this cloud VM is the only holder of guest {0}: FREE it instead")]
    LastHolder(vmbeam_core::DomainUuid),
    /// An operation on the guest is in flight.
    #[error("{kind} of guest {guest} is in progress")]
    InFlight {
        /// The guest.
        guest: vmbeam_core::DomainUuid,
        /// The operation.
        kind: OpKind,
    },
    /// The guest is shared with a destination.
    #[error("guest {guest} is shared with {with}: the share must be released or withdrawn first")]
    Shared {
        /// The guest.
        guest: vmbeam_core::DomainUuid,
        /// The destination.
        with: CloudVmId,
    },
    /// UNSHARE of a share its destination has accepted: it may map the device, so only it
    /// takes the share back (WITHDRAW, once nothing there maps it).
    #[error("cloud VM {with} has accepted the share of guest {guest} and may map its device: only it takes the share back (WITHDRAW, once nothing there maps it)")]
    Accepted {
        /// The guest.
        guest: vmbeam_core::DomainUuid,
        /// The share's destination.
        with: CloudVmId,
    },
    /// ALLOC of a guest that exists (held by a cloud VM of its cloud, or by the asker at
    /// another size). The host keeps one device per guest, so the destination of a copy
    /// (a migration that is not zero-copy) between two cloud VMs of one cloud on this host
    /// gets this too.
    #[error("guest {0}'s memory exists on this host already (one device per guest: a copy between two cloud VMs of one cloud on one host cannot get a second; migrate it zero-copy)")]
    Exists(vmbeam_core::DomainUuid),
    /// The device would not fit the window.
    #[error("a {bar} byte BAR does not fit the 64-bit PCI window of {window} bytes of cloud VM {cloud_vm} next to VMBeam's {used} bytes (raise <pcihole64>)")]
    WindowFull {
        /// The cloud VM.
        cloud_vm: CloudVmId,
        /// The new BAR.
        bar: u64,
        /// VMBeam's BARs there now.
        used: u64,
        /// The window.
        window: u64,
    },
    /// No free slot.
    #[error("cloud VM {0} has no free PCI slot on bus 0")]
    NoFreeSlot(CloudVmId),
    /// The RAM size cannot get a device.
    #[error(transparent)]
    BadSize(#[from] SizeError),
}

impl Refusal {
    /// The wire code; another cloud's cloud VM is told apart from no cloud VM at all only in
    /// the host's own log.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::NotReady => ErrorCode::NotReady,
            Self::NotColocated(_) | Self::OtherCloud(_) | Self::SelfPeer => ErrorCode::NotColocated,
            Self::UnknownGuest(_) => ErrorCode::UnknownGuest,
            Self::NotHolder(_) => ErrorCode::NotHolder,
            Self::WrongRole { .. } => ErrorCode::WrongRole,
            Self::LastHolder(_) => ErrorCode::LastHolder,
            Self::InFlight { .. } | Self::Shared { .. } => ErrorCode::Busy,
            Self::Accepted { .. } => ErrorCode::Accepted,
            Self::Exists(_) => ErrorCode::Exists,
            Self::WindowFull { .. } => ErrorCode::WindowFull,
            Self::NoFreeSlot(_) => ErrorCode::NoFreeSlot,
            Self::BadSize(_) => ErrorCode::BadSize,
        }
    }

    /// The text the asker gets.
    pub fn wire_text(&self) -> String {
        match self {
            Self::OtherCloud(peer) => Self::NotColocated(peer.clone()).to_string(),
            other => other.to_string(),
        }
    }

    /// COLOCATED's "no": its reason on the wire.
    pub fn no_reason(&self) -> NoReason {
        match self {
            Self::SelfPeer => NoReason::SelfPeer,
            _ => NoReason::NotColocated,
        }
    }
}

/// What [`Ledger::decide`] says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Answer at once; nothing to run, nothing changed (COLOCATED, a repeated ALLOC, SHARE,
    /// ACCEPT or UNSHARE).
    Answer(Reply),
    /// Answer at once; nothing to run, but the ledger changed: save it first (ACCEPT).
    Recorded(Reply),
    /// Run this transition, then [`Ledger::finish`] it.
    Run(Transition),
}

/// One thing [`Ledger::reconcile`] found or changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// A VMBeam device libvirt shows that the ledger did not know: adopted.
    Adopted {
        /// The guest.
        guest: GuestKey,
        /// Where.
        cloud_vm: CloudVmId,
        /// In which role.
        role: Role,
    },
    /// A holder whose device libvirt does not show (any more): dropped.
    Dropped {
        /// The guest.
        guest: GuestKey,
        /// Where it was.
        cloud_vm: CloudVmId,
    },
    /// The owner's device is gone; the destination is the owner now.
    Promoted {
        /// The guest.
        guest: GuestKey,
        /// The new owner.
        cloud_vm: CloudVmId,
    },
    /// A device that libvirt shows at another address or size than the ledger had: libvirt's
    /// taken.
    Corrected {
        /// The guest.
        guest: GuestKey,
        /// Where.
        cloud_vm: CloudVmId,
    },
    /// A guest left without any holder: forgotten (its file, if any, is an orphan now).
    Forgotten(GuestKey),
    /// A VMBeam device the ledger cannot take (another cloud's guest in this cloud VM, a
    /// third holder, or a size other than the guest's): reported, left alone.
    Foreign {
        /// The guest its name names.
        guest: GuestKey,
        /// Where.
        cloud_vm: CloudVmId,
    },
    /// A backing file without any holder: reported, not deleted.
    OrphanFile(GuestKey),
    /// A guest whose backing file is missing (a new SHARE of it would fail).
    MissingFile(GuestKey),
}

impl Finding {
    /// Whether the finding changed the ledger.
    pub fn changes_ledger(&self) -> bool {
        !matches!(
            self,
            Self::Foreign { .. } | Self::OrphanFile(_) | Self::MissingFile(_)
        )
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Adopted { guest, cloud_vm, role } => {
                write!(f, "adopted guest {guest}'s device in cloud VM {cloud_vm} as its {role}")
            }
            Self::Dropped { guest, cloud_vm } => {
                write!(f, "cloud VM {cloud_vm} no longer has guest {guest}'s device")
            }
            Self::Promoted { guest, cloud_vm } => write!(
                f,
                "guest {guest}'s owner lost its device: cloud VM {cloud_vm} owns it now"
            ),
            Self::Corrected { guest, cloud_vm } => write!(
                f,
                "guest {guest}'s device in cloud VM {cloud_vm} is not where the ledger had it: libvirt's address and size taken"
            ),
            Self::Forgotten(guest) => write!(f, "guest {guest} has no holder left"),
            Self::Foreign { guest, cloud_vm } => write!(
                f,
                "cloud VM {cloud_vm} has a device of guest {guest} that VMBeam does not manage (another cloud's, a third holder or another size): detach it"
            ),
            Self::OrphanFile(guest) => write!(
                f,
                "the backing file {} has no holder: delete it once nothing needs its memory",
                guest.shmem_name()
            ),
            Self::MissingFile(guest) => {
                write!(f, "guest {guest}'s backing file {} is missing", guest.shmem_name())
            }
        }
    }
}

/// The ledger.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ledger {
    guests: BTreeMap<GuestKey, Guest>,
    /// Bumped at every change; [`Ledger::reconcile`] leaves alone what changed after its
    /// listing was taken.
    clock: u64,
    touched: BTreeMap<GuestKey, u64>,
}

/// The context of one decision.
struct Ask<'a> {
    topo: &'a Topology,
    me: &'a CloudVm,
}

impl Ledger {
    /// The guests.
    pub fn guests(&self) -> &BTreeMap<GuestKey, Guest> {
        &self.guests
    }

    /// The current time of the ledger's clock: take it before listing libvirt's domains and
    /// give it to [`Ledger::reconcile`].
    pub fn clock(&self) -> u64 {
        self.clock
    }

    fn touch(&mut self, key: &GuestKey) {
        self.clock += 1;
        self.touched.insert(key.clone(), self.clock);
    }

    /// VMBeam's devices in `cloud_vm` per the ledger (committed and reserved): (guest,
    /// address, BAR size).
    fn devices_in<'a>(
        &'a self,
        cloud_vm: &'a CloudVmId,
    ) -> impl Iterator<Item = (&'a GuestKey, PciAddress, u64)> + 'a {
        self.guests.iter().flat_map(move |(key, g)| {
            let held = g.holders.get(cloud_vm).map(|h| (key, h.addr, g.bar_size));
            let reserved = g
                .pending
                .as_ref()
                .filter(|p| &p.target == cloud_vm)
                .and_then(|p| p.reserved)
                .map(|addr| (key, addr, g.bar_size));
            held.into_iter().chain(reserved)
        })
    }

    /// Where `guest`'s new device of `bar` bytes would go in `vm`, or why it cannot. The
    /// window holds the ledger's devices there and every other VMBeam device libvirt
    /// showed at the last rescan (one VMBeam does not manage, or one just unplugged: counted
    /// until the next rescan, never the guest's own).
    fn place(&self, vm: &CloudVm, guest: &GuestKey, bar: u64) -> Result<PciAddress, Refusal> {
        let ours: Vec<(&GuestKey, PciAddress, u64)> = self.devices_in(&vm.id).collect();
        let mut sizes: Vec<u64> = ours.iter().map(|d| d.2).collect();
        sizes.extend(
            vm.shmems
                .iter()
                .filter(|s| &s.guest != guest && !ours.iter().any(|d| d.0 == &s.guest))
                .map(|s| s.bar_size),
        );
        if !window_fits(sizes.iter().copied().chain([bar]), vm.window) {
            return Err(Refusal::WindowFull {
                cloud_vm: vm.id.clone(),
                bar,
                used: sizes.iter().sum(),
                window: vm.window,
            });
        }
        let mut slots = vm.used_slots.clone();
        slots.extend(ours.iter().map(|d| d.1.slot));
        choose_slot(&slots)
            .map(PciAddress::root_slot)
            .ok_or_else(|| Refusal::NoFreeSlot(vm.id.clone()))
    }

    /// Decides `op` from `asker` against the cloud VMs of `topo`. A [`Decision::Run`] marks
    /// the guest busy until [`Ledger::finish`].
    pub fn decide(
        &mut self,
        topo: &Topology,
        asker: &CloudVmId,
        op: &Op,
    ) -> Result<Decision, Refusal> {
        let me = topo.cloud_vms.get(asker).ok_or(Refusal::NotReady)?;
        let ask = Ask { topo, me };
        match op {
            Op::Colocated { peer } => {
                ask.peer(peer)?;
                Ok(Decision::Answer(Reply::Colocated(Ok(()))))
            }
            Op::Alloc { guest, ram_bytes } => self.alloc(&ask, guest, *ram_bytes),
            Op::Share { guest, peer } => self.share(&ask, guest, peer),
            Op::Accept { guest } => self.accept(&ask, guest),
            Op::Unshare { guest } => self.unshare(&ask, guest),
            Op::Release { guest } => self.unplug(&ask, guest, OpKind::Release),
            Op::Withdraw { guest } => self.unplug(&ask, guest, OpKind::Withdraw),
            Op::Free { guest } => self.unplug(&ask, guest, OpKind::Free),
        }
    }

    fn begin(
        &mut self,
        kind: OpKind,
        key: GuestKey,
        target: &CloudVmId,
        device: ShmemDevice,
    ) -> Decision {
        self.clock += 1;
        let op = self.clock;
        let reserved = matches!(kind, OpKind::Alloc | OpKind::Share).then_some(device.addr);
        if let Some(g) = self.guests.get_mut(&key) {
            g.pending = Some(Pending {
                op,
                kind,
                target: target.clone(),
                reserved,
            });
        }
        self.touched.insert(key.clone(), op);
        Decision::Run(Transition {
            op,
            kind,
            guest: key,
            target: target.clone(),
            device,
        })
    }

    fn alloc(
        &mut self,
        ask: &Ask<'_>,
        uuid: &vmbeam_core::DomainUuid,
        ram: u64,
    ) -> Result<Decision, Refusal> {
        let key = ask.key(uuid);
        let bar = bar_size(ram)?;
        if let Some(g) = self.guests.get(&key) {
            if let Some(p) = &g.pending {
                return Err(Refusal::InFlight {
                    guest: uuid.clone(),
                    kind: p.kind,
                });
            }
            // A repeated ALLOC (its answer was lost) gets the same answer.
            return match g.holders.get(&ask.me.id) {
                Some(h) if g.holders.len() == 1 && g.bar_size == bar => {
                    Ok(Decision::Answer(Reply::Placed(Placement::new(h.addr, bar))))
                }
                _ => Err(Refusal::Exists(uuid.clone())),
            };
        }
        let addr = self.place(ask.me, &key, bar)?;
        self.guests.insert(
            key.clone(),
            Guest {
                bar_size: bar,
                ram_bytes: Some(ram),
                holders: BTreeMap::new(),
                pending: None,
            },
        );
        let device = ShmemDevice {
            guest: key.clone(),
            bar_size: bar,
            addr,
        };
        Ok(self.begin(OpKind::Alloc, key, &ask.me.id, device))
    }

    /// The guest as seen by its holder `ask.me`: refuses unknown guests, guests in flight and
    /// non-holders.
    fn held(
        &self,
        ask: &Ask<'_>,
        uuid: &vmbeam_core::DomainUuid,
    ) -> Result<(&Guest, Holder), Refusal> {
        let g = self
            .guests
            .get(&ask.key(uuid))
            .ok_or_else(|| Refusal::UnknownGuest(uuid.clone()))?;
        if let Some(p) = &g.pending {
            return Err(Refusal::InFlight {
                guest: uuid.clone(),
                kind: p.kind,
            });
        }
        let holder = *g
            .holders
            .get(&ask.me.id)
            .ok_or_else(|| Refusal::NotHolder(uuid.clone()))?;
        Ok((g, holder))
    }

    fn share(
        &mut self,
        ask: &Ask<'_>,
        uuid: &vmbeam_core::DomainUuid,
        peer: &CloudVmId,
    ) -> Result<Decision, Refusal> {
        let (g, holder) = self.held(ask, uuid)?;
        holder.must_be(Role::Owner, uuid, "only the owner shares a guest")?;
        let peer_vm = ask.peer(peer)?;
        if let Some((with, h)) = g.holders.iter().find(|(id, _)| *id != &ask.me.id) {
            // A repeated SHARE (its answer was lost) gets the same answer.
            if with == peer {
                return Ok(Decision::Answer(Reply::Placed(Placement::new(
                    h.addr, g.bar_size,
                ))));
            }
            return Err(Refusal::Shared {
                guest: uuid.clone(),
                with: with.clone(),
            });
        }
        let bar = g.bar_size;
        let key = ask.key(uuid);
        let addr = self.place(peer_vm, &key, bar)?;
        let device = ShmemDevice {
            guest: key.clone(),
            bar_size: bar,
            addr,
        };
        Ok(self.begin(OpKind::Share, key, peer, device))
    }

    /// ACCEPT: the share's destination takes the share before it maps the device; the
    /// owner's UNSHARE is refused from then on. A repeated ACCEPT gets the same answer.
    fn accept(
        &mut self,
        ask: &Ask<'_>,
        uuid: &vmbeam_core::DomainUuid,
    ) -> Result<Decision, Refusal> {
        let (_, holder) = self.held(ask, uuid)?;
        holder.must_be(
            Role::Destination,
            uuid,
            "only a share's destination ACCEPTs it",
        )?;
        if holder.accepted {
            return Ok(Decision::Answer(Reply::Done));
        }
        let key = ask.key(uuid);
        if let Some(h) = self
            .guests
            .get_mut(&key)
            .and_then(|g| g.holders.get_mut(&ask.me.id))
        {
            h.accepted = true;
        }
        self.touch(&key);
        Ok(Decision::Recorded(Reply::Done))
    }

    /// UNSHARE: the owner takes back a share its destination has not ACCEPTed (unplugged
    /// from the destination). Safe only before ACCEPT, since the destination ACCEPTs before
    /// it maps the device and the host decides one operation per guest at a time; see
    /// `vmbeam_core::host_protocol`, "Who takes a share back". The owner of a guest with no
    /// share in place gets `OK` (a repeated UNSHARE whose answer was lost, or a share its
    /// destination already withdrew): there is nothing to take back.
    fn unshare(
        &mut self,
        ask: &Ask<'_>,
        uuid: &vmbeam_core::DomainUuid,
    ) -> Result<Decision, Refusal> {
        let (g, holder) = self.held(ask, uuid)?;
        holder.must_be(
            Role::Owner,
            uuid,
            "only the owner UNSHAREs; the share's destination WITHDRAWs",
        )?;
        let Some((with, dest)) = g.holders.iter().find(|(id, _)| *id != &ask.me.id) else {
            return Ok(Decision::Answer(Reply::Done));
        };
        if dest.accepted {
            return Err(Refusal::Accepted {
                guest: uuid.clone(),
                with: with.clone(),
            });
        }
        let (with, addr) = (with.clone(), dest.addr);
        let key = ask.key(uuid);
        let device = ShmemDevice {
            guest: key.clone(),
            bar_size: g.bar_size,
            addr,
        };
        Ok(self.begin(OpKind::Unshare, key, &with, device))
    }

    fn unplug(
        &mut self,
        ask: &Ask<'_>,
        uuid: &vmbeam_core::DomainUuid,
        kind: OpKind,
    ) -> Result<Decision, Refusal> {
        let (g, holder) = self.held(ask, uuid)?;
        let other = g.holders.keys().find(|id| *id != &ask.me.id).cloned();
        match (kind, holder.role, other) {
            (OpKind::Release, Role::Owner, None) => return Err(Refusal::LastHolder(uuid.clone())),
            (OpKind::Release, Role::Owner, Some(_)) | (OpKind::Withdraw, Role::Destination, _) => {}
            (OpKind::Free, Role::Owner, None) => {}
            (OpKind::Free, Role::Owner, Some(with)) => {
                return Err(Refusal::Shared {
                    guest: uuid.clone(),
                    with,
                })
            }
            (OpKind::Withdraw, role, _) => {
                return Err(Refusal::WrongRole {
                    guest: uuid.clone(),
                    role,
                    hint: "the owner RELEASEs (after a migration) or FREEs, it does not WITHDRAW",
                })
            }
            (_, role, _) => {
                return Err(Refusal::WrongRole {
                    guest: uuid.clone(),
                    role,
                    hint: "the share's destination WITHDRAWs (after a failed migration)",
                })
            }
        }
        let key = ask.key(uuid);
        let device = ShmemDevice {
            guest: key.clone(),
            bar_size: g.bar_size,
            addr: holder.addr,
        };
        Ok(self.begin(kind, key, &ask.me.id, device))
    }

    /// Commits `t` (its steps ran with `outcome`) or rolls it back, so that the ledger says
    /// what libvirt has: a failed attach added nothing, a failed detach removed nothing, a
    /// FREE whose file could not be deleted still lost its device.
    pub fn finish(&mut self, t: &Transition, outcome: &Outcome) {
        let Some(g) = self.guests.get_mut(&t.guest) else {
            return;
        };
        if g.pending.as_ref().map(|p| p.op) != Some(t.op) {
            return;
        }
        g.pending = None;
        let done = matches!(outcome, Outcome::Done);
        let removed_device = match outcome {
            Outcome::Done => true,
            Outcome::Failed { done, .. } => *done >= 1 && t.kind == OpKind::Free,
        };
        let holder = |role| Holder {
            addr: t.device.addr,
            role,
            // A new share waits for its destination's ACCEPT.
            accepted: role == Role::Owner,
        };
        match t.kind {
            OpKind::Alloc if done => {
                g.holders.insert(t.target.clone(), holder(Role::Owner));
            }
            OpKind::Alloc => {
                self.guests.remove(&t.guest);
            }
            OpKind::Share if done => {
                g.holders
                    .insert(t.target.clone(), holder(Role::Destination));
            }
            OpKind::Release | OpKind::Withdraw | OpKind::Unshare if done => {
                g.holders.remove(&t.target);
                for h in g.holders.values_mut() {
                    h.role = Role::Owner;
                    h.accepted = true;
                }
            }
            OpKind::Free if removed_device => {
                self.guests.remove(&t.guest);
            }
            OpKind::Share | OpKind::Release | OpKind::Withdraw | OpKind::Unshare | OpKind::Free => {
            }
        }
        self.touch(&t.guest);
    }

    /// Brings the ledger in line with what libvirt shows (`topo`, listed after the ledger's
    /// clock read `since`) and reports backing files (`files`) nobody holds. Guests with an
    /// operation in flight, or changed after the clock read `since`, are left alone: the
    /// listing may predate their change. Cloud VMs in `topo.unusable` keep their holders (their devices cannot be
    /// read); cloud VMs absent from `topo` are not running, and hot-plugged devices do not
    /// survive a restart.
    pub fn reconcile(
        &mut self,
        topo: &Topology,
        files: &BTreeSet<GuestKey>,
        since: u64,
    ) -> Vec<Finding> {
        let mut out = Vec::new();
        let touched = std::mem::take(&mut self.touched);
        let settled = |key: &GuestKey, g: Option<&Guest>| {
            g.map_or(true, |g| g.pending.is_none())
                && touched.get(key).map_or(true, |&t| t <= since)
        };
        let keys: Vec<GuestKey> = self
            .guests
            .iter()
            .filter(|(k, g)| settled(k, Some(g)))
            .map(|(k, _)| k.clone())
            .collect();
        let mut changed = BTreeSet::new();
        // Holders libvirt no longer shows, and addresses it shows differently.
        for key in &keys {
            let g = self.guests.get_mut(key).expect("listed above");
            let ids: Vec<CloudVmId> = g.holders.keys().cloned().collect();
            for id in ids {
                if topo.unusable.contains(&id) {
                    continue;
                }
                let shown = topo
                    .cloud_vms
                    .get(&id)
                    .and_then(|vm| vm.shmems.iter().find(|s| &s.guest == key));
                match shown {
                    None => {
                        g.holders.remove(&id);
                        out.push(Finding::Dropped {
                            guest: key.clone(),
                            cloud_vm: id,
                        });
                        changed.insert(key.clone());
                    }
                    Some(s) => {
                        let h = g.holders.get_mut(&id).expect("listed above");
                        if h.addr != s.addr || g.bar_size != s.bar_size {
                            h.addr = s.addr;
                            g.bar_size = s.bar_size;
                            out.push(Finding::Corrected {
                                guest: key.clone(),
                                cloud_vm: id,
                            });
                            changed.insert(key.clone());
                        }
                    }
                }
            }
            if !g.holders.is_empty() && g.owner().is_none() {
                let (id, h) = g.holders.iter_mut().next().expect("not empty");
                h.role = Role::Owner;
                h.accepted = true;
                out.push(Finding::Promoted {
                    guest: key.clone(),
                    cloud_vm: id.clone(),
                });
                changed.insert(key.clone());
            }
            if g.holders.is_empty() {
                self.guests.remove(key);
                out.push(Finding::Forgotten(key.clone()));
            }
        }
        // Devices libvirt shows that the ledger does not know.
        for vm in topo.cloud_vms.values() {
            for s in &vm.shmems {
                let key = &s.guest;
                if !settled(key, self.guests.get(key)) {
                    continue;
                }
                if key.cloud != vm.cloud {
                    out.push(Finding::Foreign {
                        guest: key.clone(),
                        cloud_vm: vm.id.clone(),
                    });
                    continue;
                }
                let g = self.guests.entry(key.clone()).or_insert_with(|| Guest {
                    bar_size: s.bar_size,
                    ram_bytes: None,
                    holders: BTreeMap::new(),
                    pending: None,
                });
                if g.holders.contains_key(&vm.id) {
                    continue;
                }
                if g.holders.len() >= 2 || g.bar_size != s.bar_size {
                    out.push(Finding::Foreign {
                        guest: key.clone(),
                        cloud_vm: vm.id.clone(),
                    });
                    continue;
                }
                let role = if g.holders.is_empty() {
                    Role::Owner
                } else {
                    Role::Destination
                };
                // A share found in libvirt's view: the ledger cannot tell whether its
                // destination accepted it, so it counts as accepted (no UNSHARE).
                g.holders.insert(
                    vm.id.clone(),
                    Holder {
                        addr: s.addr,
                        role,
                        accepted: true,
                    },
                );
                out.push(Finding::Adopted {
                    guest: key.clone(),
                    cloud_vm: vm.id.clone(),
                    role,
                });
                changed.insert(key.clone());
            }
        }
        for key in files {
            if !self.guests.contains_key(key) && settled(key, None) {
                out.push(Finding::OrphanFile(key.clone()));
            }
        }
        for (key, g) in &self.guests {
            if !files.contains(key) && !changed.contains(key) && settled(key, Some(g)) {
                out.push(Finding::MissingFile(key.clone()));
            }
        }
        self.touched = touched;
        self.touched.retain(|_, &mut t| t > since);
        for key in &changed {
            self.touch(key);
        }
        out
    }

    /// The invariants that do not hold (empty when all hold). The window and the slots are
    /// checked against `topo`'s cloud VMs.
    pub fn violations(&self, topo: &Topology) -> Vec<String> {
        let mut out = Vec::new();
        for (key, g) in &self.guests {
            let alloc_in_flight = g.pending.as_ref().is_some_and(|p| p.kind == OpKind::Alloc);
            let owners = g.holders.values().filter(|h| h.role == Role::Owner).count();
            if g.holders.is_empty() && !alloc_in_flight {
                out.push(format!("guest {key} has no holder"));
            }
            if g.holders.len() > 2 || (!g.holders.is_empty() && owners != 1) {
                out.push(format!(
                    "guest {key} has {} holders and {owners} owners",
                    g.holders.len()
                ));
            }
            if !g.bar_size.is_power_of_two() {
                out.push(format!("guest {key}'s BAR is not a power of two"));
            }
            let targets = g.holders.keys().chain(g.pending.iter().map(|p| &p.target));
            for id in targets {
                if let Some(vm) = topo.cloud_vms.get(id) {
                    if vm.cloud != key.cloud {
                        out.push(format!(
                            "guest {key} is in cloud VM {id} of cloud {}",
                            vm.cloud
                        ));
                    }
                }
            }
        }
        for (id, vm) in &topo.cloud_vms {
            let devices: Vec<(&GuestKey, PciAddress, u64)> = self.devices_in(id).collect();
            let vmbeam_slots: BTreeSet<u8> = vm.shmems.iter().map(|s| s.addr.slot).collect();
            let mut seen = BTreeMap::new();
            for (key, addr, _) in &devices {
                if let Some(other) = seen.insert(*addr, *key) {
                    if other != *key {
                        out.push(format!(
                            "guests {other} and {key} share {addr} in cloud VM {id}"
                        ));
                    }
                }
                if vm.used_slots.contains(&addr.slot) && !vmbeam_slots.contains(&addr.slot) {
                    out.push(format!(
                        "guest {key} sits on {addr} of another device in cloud VM {id}"
                    ));
                }
            }
            if !window_fits(devices.iter().map(|d| d.2), vm.window) {
                out.push(format!("VMBeam's BARs overflow cloud VM {id}'s window"));
            }
        }
        out
    }

    /// The ledger as persisted: committed holders only (an operation in flight is recorded
    /// as not having happened; a restart reconciles it with libvirt).
    pub fn to_saved(&self) -> SavedLedger {
        SavedLedger {
            version: SAVED_VERSION,
            guests: self
                .guests
                .iter()
                .filter(|(_, g)| !g.holders.is_empty())
                .map(|(key, g)| SavedGuest {
                    guest: key.clone(),
                    bar_size: g.bar_size,
                    ram_bytes: g.ram_bytes,
                    holders: g
                        .holders
                        .iter()
                        .map(|(id, h)| SavedHolder {
                            cloud_vm: id.clone(),
                            addr: h.addr,
                            role: h.role,
                            awaiting_accept: !h.accepted,
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    /// The ledger from its persisted form, checked.
    pub fn from_saved(saved: SavedLedger) -> Result<Self, SavedError> {
        if saved.version != SAVED_VERSION {
            return Err(SavedError::Version(saved.version));
        }
        let mut guests = BTreeMap::new();
        for s in saved.guests {
            let bad = |why: &str| SavedError::Guest(s.guest.clone(), why.to_owned());
            if !s.bar_size.is_power_of_two() {
                return Err(bad("BAR size is not a power of two"));
            }
            let holders: BTreeMap<CloudVmId, Holder> = s
                .holders
                .iter()
                .map(|h| {
                    (
                        h.cloud_vm.clone(),
                        Holder {
                            addr: h.addr,
                            role: h.role,
                            accepted: h.role == Role::Owner || !h.awaiting_accept,
                        },
                    )
                })
                .collect();
            let owners = holders.values().filter(|h| h.role == Role::Owner).count();
            if holders.len() != s.holders.len()
                || holders.is_empty()
                || holders.len() > 2
                || owners != 1
            {
                return Err(bad("needs one owner and at most one destination"));
            }
            let guest = Guest {
                bar_size: s.bar_size,
                ram_bytes: s.ram_bytes,
                holders,
                pending: None,
            };
            if guests.insert(s.guest.clone(), guest).is_some() {
                return Err(bad("listed twice"));
            }
        }
        Ok(Self {
            guests,
            ..Self::default()
        })
    }
}

impl Ask<'_> {
    fn key(&self, uuid: &vmbeam_core::DomainUuid) -> GuestKey {
        GuestKey {
            cloud: self.me.cloud.clone(),
            uuid: uuid.clone(),
        }
    }

    /// The peer, if it is a cloud VM of the asker's cloud on this host.
    fn peer(&self, peer: &CloudVmId) -> Result<&CloudVm, Refusal> {
        if peer == &self.me.id {
            return Err(Refusal::SelfPeer);
        }
        match self.topo.cloud_vms.get(peer) {
            Some(vm) if vm.cloud == self.me.cloud => Ok(vm),
            Some(_) => Err(Refusal::OtherCloud(peer.clone())),
            None => Err(Refusal::NotColocated(peer.clone())),
        }
    }
}

/// The persisted ledger's format version.
pub const SAVED_VERSION: u32 = 1;

/// The persisted ledger (`ledger.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedLedger {
    /// [`SAVED_VERSION`].
    pub version: u32,
    /// The guests.
    pub guests: Vec<SavedGuest>,
}

/// A persisted guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedGuest {
    /// Its name.
    pub guest: GuestKey,
    /// BAR and file size.
    pub bar_size: u64,
    /// RAM size, when known.
    pub ram_bytes: Option<u64>,
    /// Its holders.
    pub holders: Vec<SavedHolder>,
}

/// A persisted holder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedHolder {
    /// The cloud VM.
    pub cloud_vm: CloudVmId,
    /// The device's address there.
    pub addr: PciAddress,
    /// Its role.
    pub role: Role,
    /// A share's destination that has not ACCEPTed yet (absent: accepted, as in ledgers
    /// written before ACCEPT existed, which cannot vouch for their destinations).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub awaiting_accept: bool,
}

/// A persisted ledger that cannot be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SavedError {
    /// Another format version.
    #[error("ledger format version {0} is not {SAVED_VERSION}")]
    Version(u32),
    /// A guest entry that breaks the invariants.
    #[error("guest {0}: {1}")]
    Guest(GuestKey, String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cloudvm::AttachedShmem;
    use vmbeam_core::{CloudId, DomainUuid};

    const GIB: u64 = 1 << 30;
    const A1: &str = "5f0c2b5e-1a2b-4c3d-8e4f-0000000000a1";
    const A2: &str = "5f0c2b5e-1a2b-4c3d-8e4f-0000000000a2";
    const B1: &str = "5f0c2b5e-1a2b-4c3d-8e4f-0000000000b1";
    const G: &str = "6e3b1e9a-1b2c-4d5e-8f90-0123456789ab";
    const H: &str = "6e3b1e9a-1b2c-4d5e-8f90-0123456789ac";

    fn id(s: &str) -> CloudVmId {
        CloudVmId(DomainUuid::new(s).unwrap())
    }

    fn uuid(s: &str) -> DomainUuid {
        DomainUuid::new(s).unwrap()
    }

    fn key(cloud: &str, g: &str) -> GuestKey {
        GuestKey {
            cloud: CloudId::new(cloud).unwrap(),
            uuid: uuid(g),
        }
    }

    fn vm(uuid: &str, cloud: &str, window: u64, used: &[u8]) -> CloudVm {
        CloudVm {
            id: id(uuid),
            name: format!("cvm-{}", &uuid[34..]),
            domain_id: Some(1),
            cloud: CloudId::new(cloud).unwrap(),
            channel: "/x".into(),
            window,
            window_declared: true,
            used_slots: used.iter().copied().collect(),
            shmems: Vec::new(),
        }
    }

    fn topo() -> Topology {
        let mut t = Topology::default();
        for v in [
            vm(A1, "acme", 64 * GIB, &[1, 2]),
            vm(A2, "acme", 2 * GIB, &[1, 2, 0x1f]),
            vm(B1, "bravo", 64 * GIB, &[1, 2]),
        ] {
            t.cloud_vms.insert(v.id.clone(), v);
        }
        t
    }

    fn alloc(g: &str, ram: u64) -> Op {
        Op::Alloc {
            guest: uuid(g),
            ram_bytes: ram,
        }
    }

    fn run_ok(l: &mut Ledger, topo: &Topology, asker: &str, op: Op) -> Transition {
        match l.decide(topo, &id(asker), &op) {
            Ok(Decision::Run(t)) => {
                l.finish(&t, &Outcome::Done);
                t
            }
            other => panic!("{op:?}: {other:?}"),
        }
    }

    fn refused(l: &mut Ledger, topo: &Topology, asker: &str, op: Op) -> Refusal {
        let before = l.clone();
        let r = l.decide(topo, &id(asker), &op).expect_err("a refusal");
        assert_eq!(*l, before, "a refusal changes nothing");
        r
    }

    fn failed(done: usize) -> Outcome {
        Outcome::Failed {
            done,
            error: StepError::Failed("injected".into()),
        }
    }

    #[test]
    fn alloc_places_at_the_top_free_slot_and_keeps_the_guest_busy_until_it_finishes() {
        let topo = topo();
        let mut l = Ledger::default();
        let Ok(Decision::Run(t)) = l.decide(&topo, &id(A1), &alloc(G, GIB)) else {
            panic!()
        };
        assert_eq!(t.device.addr, PciAddress::root_slot(0x1f));
        assert_eq!(t.device.bar_size, 2 * GIB);
        assert_eq!(
            t.steps(),
            vec![
                Step::CreateFile {
                    name: format!("vmbeam-acme-{G}"),
                    size: 2 * GIB
                },
                Step::Attach {
                    cloud_vm: id(A1),
                    device: t.device.clone()
                }
            ]
        );
        // In flight: every other request on the guest is busy, and its slot is reserved.
        let r = refused(&mut l, &topo, A1, alloc(G, GIB));
        assert_eq!(r.code(), ErrorCode::Busy);
        let Ok(Decision::Run(t2)) = l.decide(&topo, &id(A1), &alloc(H, GIB)) else {
            panic!()
        };
        assert_eq!(t2.device.addr, PciAddress::root_slot(0x1e));
        assert!(l.violations(&topo).is_empty());
        l.finish(&t, &Outcome::Done);
        l.finish(&t2, &failed(1));
        assert_eq!(
            t2.compensation(1),
            vec![Step::RemoveFile {
                name: format!("vmbeam-acme-{H}")
            }]
        );
        assert!(
            !l.guests().contains_key(&key("acme", H)),
            "a failed ALLOC leaves nothing"
        );
        // Repeated ALLOC: the same answer, nothing to run.
        assert_eq!(
            l.decide(&topo, &id(A1), &alloc(G, GIB)).unwrap(),
            Decision::Answer(Reply::Placed(Placement::new(
                PciAddress::root_slot(0x1f),
                2 * GIB
            )))
        );
        // Another size, or the same guest from another cloud VM: it exists.
        assert_eq!(
            refused(&mut l, &topo, A1, alloc(G, 4096)),
            Refusal::Exists(uuid(G))
        );
        assert_eq!(
            refused(&mut l, &topo, A2, alloc(G, 4096)),
            Refusal::Exists(uuid(G))
        );
        // The same UUID in another cloud is another guest.
        run_ok(&mut l, &topo, B1, alloc(G, GIB));
        assert_eq!(l.guests().len(), 2);
        assert!(l.violations(&topo).is_empty());
    }

    #[test]
    fn shares_stay_within_one_cloud_and_tell_nothing_of_others() {
        let topo = topo();
        let mut l = Ledger::default();
        run_ok(&mut l, &topo, A1, alloc(G, 4096));
        let share = |peer: &str| Op::Share {
            guest: uuid(G),
            peer: id(peer),
        };
        let r = refused(&mut l, &topo, A1, share(B1));
        assert_eq!(r, Refusal::OtherCloud(id(B1)));
        assert_eq!(r.code(), ErrorCode::NotColocated);
        assert!(
            !r.wire_text().contains("another cloud"),
            "{}",
            r.wire_text()
        );
        assert_eq!(
            r.wire_text(),
            Refusal::NotColocated(id(B1)).wire_text(),
            "another cloud's cloud VM looks like no cloud VM"
        );
        assert_eq!(refused(&mut l, &topo, A1, share(A1)), Refusal::SelfPeer);
        // B1 cannot touch acme's guest: for bravo it does not exist.
        assert_eq!(
            refused(&mut l, &topo, B1, Op::Release { guest: uuid(G) }),
            Refusal::UnknownGuest(uuid(G))
        );
        let t = run_ok(&mut l, &topo, A1, share(A2));
        // A2's slot 0x1f is taken by another device.
        assert_eq!(t.device.addr, PciAddress::root_slot(0x1e));
        assert_eq!(
            l.decide(&topo, &id(A1), &share(A2)).unwrap(),
            Decision::Answer(Reply::Placed(Placement::new(
                PciAddress::root_slot(0x1e),
                MIN
            )))
        );
        let colocated =
            |l: &mut Ledger, peer| l.decide(&topo, &id(A1), &Op::Colocated { peer: id(peer) });
        assert_eq!(
            colocated(&mut l, A2),
            Ok(Decision::Answer(Reply::Colocated(Ok(()))))
        );
        assert_eq!(
            colocated(&mut l, B1).unwrap_err().no_reason(),
            NoReason::NotColocated
        );
        assert_eq!(
            colocated(&mut l, A1).unwrap_err().no_reason(),
            NoReason::SelfPeer
        );
        assert_eq!(
            refused(
                &mut l,
                &topo,
                "5f0c2b5e-1a2b-4c3d-8e4f-0000000000ff",
                share(A2)
            ),
            Refusal::NotReady
        );
    }

    const MIN: u64 = crate::device::MIN_BAR;

    #[test]
    fn roles_decide_who_may_release_withdraw_and_free() {
        let topo = topo();
        let mut l = Ledger::default();
        let g = || uuid(G);
        run_ok(&mut l, &topo, A1, alloc(G, 4096));
        assert_eq!(
            refused(&mut l, &topo, A1, Op::Release { guest: g() }),
            Refusal::LastHolder(g())
        );
        assert_eq!(
            refused(&mut l, &topo, A1, Op::Withdraw { guest: g() }).code(),
            ErrorCode::WrongRole
        );
        assert_eq!(
            refused(&mut l, &topo, A2, Op::Free { guest: g() }),
            Refusal::NotHolder(g())
        );
        run_ok(
            &mut l,
            &topo,
            A1,
            Op::Share {
                guest: g(),
                peer: id(A2),
            },
        );
        assert_eq!(
            refused(&mut l, &topo, A2, Op::Release { guest: g() }).code(),
            ErrorCode::WrongRole
        );
        assert_eq!(
            refused(&mut l, &topo, A2, Op::Free { guest: g() }).code(),
            ErrorCode::WrongRole
        );
        assert_eq!(
            refused(&mut l, &topo, A1, Op::Free { guest: g() }),
            Refusal::Shared {
                guest: g(),
                with: id(A2)
            }
        );
        assert_eq!(
            refused(
                &mut l,
                &topo,
                A2,
                Op::Share {
                    guest: g(),
                    peer: id(A1)
                }
            )
            .code(),
            ErrorCode::WrongRole
        );
        // A failed release changes nothing; a successful one hands the guest over.
        let Ok(Decision::Run(t)) = l.decide(&topo, &id(A1), &Op::Release { guest: g() }) else {
            panic!()
        };
        l.finish(&t, &failed(0));
        assert_eq!(l.guests()[&key("acme", G)].holders.len(), 2);
        run_ok(&mut l, &topo, A1, Op::Release { guest: g() });
        let holders = &l.guests()[&key("acme", G)].holders;
        assert_eq!(holders.keys().collect::<Vec<_>>(), vec![&id(A2)]);
        assert_eq!(holders[&id(A2)].role, Role::Owner);
        // Back to A1, which withdraws: A2 keeps it.
        run_ok(
            &mut l,
            &topo,
            A2,
            Op::Share {
                guest: g(),
                peer: id(A1),
            },
        );
        run_ok(&mut l, &topo, A1, Op::Withdraw { guest: g() });
        assert_eq!(
            l.guests()[&key("acme", G)].holders[&id(A2)].role,
            Role::Owner
        );
        // FREE whose file removal failed still lost its device.
        let Ok(Decision::Run(t)) = l.decide(&topo, &id(A2), &Op::Free { guest: g() }) else {
            panic!()
        };
        l.finish(&t, &failed(1));
        assert!(l.guests().is_empty());
    }

    /// UNSHARE: the owner's, before the destination ACCEPTed; refused with one typed error
    /// and nothing changed otherwise.
    #[test]
    fn only_the_owner_unshares_and_only_before_the_destination_accepts() {
        let topo = topo();
        let mut l = Ledger::default();
        let g = || uuid(G);
        let unshare = || Op::Unshare { guest: g() };
        let accept = || Op::Accept { guest: g() };
        let share = || Op::Share {
            guest: g(),
            peer: id(A2),
        };
        assert_eq!(
            refused(&mut l, &topo, A1, unshare()),
            Refusal::UnknownGuest(g())
        );
        run_ok(&mut l, &topo, A1, alloc(G, 4096));
        let owner_only = l.guests()[&key("acme", G)].clone();
        run_ok(&mut l, &topo, A1, share());
        let dest = l.guests()[&key("acme", G)].holders[&id(A2)];
        assert_eq!((dest.role, dest.accepted), (Role::Destination, false));
        // Not the owner: the destination, a cloud VM holding nothing, another cloud's.
        assert_eq!(
            refused(&mut l, &topo, A2, unshare()).code(),
            ErrorCode::WrongRole
        );
        assert_eq!(
            refused(&mut l, &topo, B1, unshare()),
            Refusal::UnknownGuest(g())
        );
        // Only the destination accepts.
        assert_eq!(
            refused(&mut l, &topo, A1, accept()).code(),
            ErrorCode::WrongRole
        );
        // The owner, before ACCEPT: the device is unplugged from the destination.
        let t = run_ok(&mut l, &topo, A1, unshare());
        assert_eq!((t.kind, &t.target), (OpKind::Unshare, &id(A2)));
        assert_eq!(
            t.steps(),
            [Step::Detach {
                cloud_vm: id(A2),
                device: t.device.clone()
            }]
        );
        assert_eq!(
            l.guests()[&key("acme", G)].holders,
            owner_only.holders,
            "back to owner-only"
        );
        // Repeated: nothing to take back. The late destination has nothing to accept.
        assert!(matches!(
            l.decide(&topo, &id(A1), &unshare()),
            Ok(Decision::Answer(Reply::Done))
        ));
        assert_eq!(
            refused(&mut l, &topo, A2, accept()),
            Refusal::NotHolder(g())
        );
        // A failed unplug keeps the share.
        run_ok(&mut l, &topo, A1, share());
        let Ok(Decision::Run(t)) = l.decide(&topo, &id(A1), &unshare()) else {
            panic!()
        };
        l.finish(&t, &failed(0));
        assert_eq!(l.guests()[&key("acme", G)].holders.len(), 2);
        // Accepted (and saved so across a restart): the share is the destination's to take
        // back.
        assert!(matches!(
            l.decide(&topo, &id(A2), &accept()),
            Ok(Decision::Recorded(Reply::Done))
        ));
        assert!(matches!(
            l.decide(&topo, &id(A2), &accept()),
            Ok(Decision::Answer(Reply::Done))
        ));
        let reloaded = Ledger::from_saved(l.to_saved()).unwrap();
        assert!(reloaded.guests()[&key("acme", G)].holders[&id(A2)].accepted);
        assert_eq!(
            refused(&mut l, &topo, A1, unshare()),
            Refusal::Accepted {
                guest: g(),
                with: id(A2)
            }
        );
        assert_eq!(
            Refusal::Accepted {
                guest: g(),
                with: id(A2)
            }
            .code(),
            ErrorCode::Accepted
        );
        run_ok(&mut l, &topo, A2, Op::Withdraw { guest: g() });
        assert_eq!(l.guests()[&key("acme", G)].holders, owner_only.holders);
        assert!(l.violations(&topo).is_empty());
    }

    #[test]
    fn windows_and_slots_are_checked_before_anything_runs() {
        let mut topo = topo();
        let mut l = Ledger::default();
        // A2: 2 GiB window. A 1 GiB BAR fits; a 2 GiB one does not fit next to it, nor
        // would it alone (1 GiB of alignment slack).
        run_ok(&mut l, &topo, A2, alloc(G, GIB - 4096));
        assert_eq!(
            refused(&mut l, &topo, A2, alloc(H, GIB)),
            Refusal::WindowFull {
                cloud_vm: id(A2),
                bar: 2 * GIB,
                used: GIB,
                window: 2 * GIB
            }
        );
        // Pending reservations count: a second 1 GiB BAR fits exactly, a third not.
        let Ok(Decision::Run(_)) = l.decide(&topo, &id(A2), &alloc(H, GIB - 4096)) else {
            panic!()
        };
        let third = "6e3b1e9a-1b2c-4d5e-8f90-0123456789ad";
        assert!(matches!(
            refused(&mut l, &topo, A2, alloc(third, 4096)),
            Refusal::WindowFull { .. }
        ));
        // A1 with every slot taken.
        topo.cloud_vms.get_mut(&id(A1)).unwrap().used_slots = (0..=0x1f).collect();
        let fourth = "6e3b1e9a-1b2c-4d5e-8f90-0123456789ae";
        assert_eq!(
            refused(&mut l, &topo, A1, alloc(fourth, 4096)),
            Refusal::NoFreeSlot(id(A1))
        );
        assert_eq!(
            refused(&mut l, &topo, A1, alloc(fourth, 0)).code(),
            ErrorCode::BadSize
        );
    }

    #[test]
    fn the_window_counts_devices_libvirt_shows_but_the_ledger_does_not_manage() {
        let mut topo = topo();
        let a2 = topo.cloud_vms.get_mut(&id(A2)).unwrap();
        // Another cloud's device and a stale one of G itself (unplugged since the rescan).
        for (cloud, g, slot) in [("bravo", H, 0x10), ("acme", G, 0x11)] {
            a2.shmems.push(AttachedShmem {
                guest: key(cloud, g),
                bar_size: GIB,
                addr: PciAddress::root_slot(slot),
            });
        }
        let mut l = Ledger::default();
        // G's own stale device is not counted: bravo's 1 GiB and G's 1 GiB fill 2 GiB.
        run_ok(&mut l, &topo, A2, alloc(G, GIB - 4096));
        assert_eq!(
            refused(&mut l, &topo, A2, alloc(H, 4096)),
            Refusal::WindowFull {
                cloud_vm: id(A2),
                bar: MIN,
                used: 2 * GIB,
                window: 2 * GIB
            }
        );
    }

    #[test]
    fn reconcile_takes_what_libvirt_shows() {
        let mut topo = topo();
        let mut l = Ledger::default();
        run_ok(&mut l, &topo, A1, alloc(G, 4096));
        run_ok(
            &mut l,
            &topo,
            A1,
            Op::Share {
                guest: uuid(G),
                peer: id(A2),
            },
        );
        let show = |topo: &mut Topology, vm: &str, g: &str, cloud: &str, slot: u8| {
            topo.cloud_vms
                .get_mut(&id(vm))
                .unwrap()
                .shmems
                .push(AttachedShmem {
                    guest: key(cloud, g),
                    bar_size: MIN,
                    addr: PciAddress::root_slot(slot),
                });
        };
        show(&mut topo, A1, G, "acme", 0x1f);
        show(&mut topo, A2, G, "acme", 0x1e);
        let files: BTreeSet<GuestKey> = [key("acme", G)].into();
        // Changed after the listing's clock: left alone.
        let since = l.clock() - 1;
        assert_eq!(l.reconcile(&Topology::default(), &files, since), vec![]);
        // Agreement: nothing to say.
        assert_eq!(l.reconcile(&topo, &files, l.clock()), vec![]);

        // The owner's cloud VM restarted: the destination owns the guest now.
        topo.cloud_vms.get_mut(&id(A1)).unwrap().shmems.clear();
        let found = l.reconcile(&topo, &files, l.clock());
        assert_eq!(
            found,
            vec![
                Finding::Dropped {
                    guest: key("acme", G),
                    cloud_vm: id(A1)
                },
                Finding::Promoted {
                    guest: key("acme", G),
                    cloud_vm: id(A2)
                }
            ]
        );
        assert!(l.violations(&topo).is_empty());

        // An unknown device is adopted (with its file missing), another cloud's is not, an
        // unusable cloud VM keeps its holders, a file nobody holds is an orphan.
        show(&mut topo, A1, H, "acme", 0x10);
        show(&mut topo, A1, G, "bravo", 0x11);
        let orphan = key("acme", "6e3b1e9a-1b2c-4d5e-8f90-0123456789ad");
        let files: BTreeSet<GuestKey> = [key("acme", G), orphan.clone()].into();
        let found = l.reconcile(&topo, &files, l.clock());
        assert!(found.contains(&Finding::Adopted {
            guest: key("acme", H),
            cloud_vm: id(A1),
            role: Role::Owner
        }));
        assert!(found.contains(&Finding::Foreign {
            guest: key("bravo", G),
            cloud_vm: id(A1)
        }));
        assert!(found.contains(&Finding::OrphanFile(orphan)));
        let found = l.reconcile(&topo, &files, l.clock());
        assert_eq!(
            found,
            vec![
                Finding::Foreign {
                    guest: key("bravo", G),
                    cloud_vm: id(A1)
                },
                Finding::OrphanFile(key("acme", "6e3b1e9a-1b2c-4d5e-8f90-0123456789ad")),
                Finding::MissingFile(key("acme", H)),
            ]
        );
        let a2 = topo.cloud_vms.remove(&id(A2)).unwrap();
        topo.unusable.insert(a2.id);
        let found = l.reconcile(&topo, &files, l.clock());
        assert!(!found.iter().any(|f| f.changes_ledger()), "{found:?}");
        assert!(l.guests()[&key("acme", G)].holders.contains_key(&id(A2)));
        // And a cloud VM that stopped loses them.
        topo.unusable.clear();
        let found = l.reconcile(&topo, &files, l.clock());
        assert!(found.contains(&Finding::Forgotten(key("acme", G))));
        for f in &found {
            assert!(!f.to_string().is_empty());
        }
    }

    #[test]
    fn the_saved_ledger_round_trips_and_is_checked() {
        let topo = topo();
        let mut l = Ledger::default();
        run_ok(&mut l, &topo, A1, alloc(G, 4096));
        run_ok(
            &mut l,
            &topo,
            A1,
            Op::Share {
                guest: uuid(G),
                peer: id(A2),
            },
        );
        // An ALLOC in flight is not saved.
        let Ok(Decision::Run(_)) = l.decide(&topo, &id(A1), &alloc(H, 4096)) else {
            panic!()
        };
        let saved = l.to_saved();
        assert_eq!(saved.guests.len(), 1);
        let json = serde_json::to_string(&saved).unwrap();
        let back = Ledger::from_saved(serde_json::from_str(&json).unwrap()).unwrap();
        assert_eq!(
            back.guests()[&key("acme", G)],
            Guest {
                pending: None,
                ..l.guests()[&key("acme", G)].clone()
            }
        );
        // The share awaits its destination's ACCEPT, also after a reload; a ledger written
        // before ACCEPT existed cannot vouch for its destinations: accepted.
        assert!(json.contains("\"awaiting_accept\":true"));
        assert!(!back.guests()[&key("acme", G)].holders[&id(A2)].accepted);
        let old = json.replace(",\"awaiting_accept\":true", "");
        let old = Ledger::from_saved(serde_json::from_str(&old).unwrap()).unwrap();
        assert!(old.guests()[&key("acme", G)].holders[&id(A2)].accepted);
        let mut two_owners = saved.clone();
        two_owners.guests[0].holders[1].role = Role::Owner;
        assert!(matches!(
            Ledger::from_saved(two_owners),
            Err(SavedError::Guest(..))
        ));
        let mut twice = saved.clone();
        twice.guests.push(twice.guests[0].clone());
        assert!(matches!(
            Ledger::from_saved(twice),
            Err(SavedError::Guest(..))
        ));
        assert!(
            serde_json::from_str::<SavedLedger>(r#"{"version":1,"guests":[],"extra":1}"#).is_err()
        );
    }
}

/// The ledger under any sequence of requests from any cloud VMs, with libvirt and file
/// failures injected, cloud VMs restarting and rescans in between, run against the fake
/// host (cloud VMs rendered as libvirt XML and read back through [`crate::cloudvm`]). The
/// fake stands in for libvirt and `/dev/shm` on purpose: the real ones, with real cloud VMs,
/// are exercised by the nested lab's end-to-end tests; these need no root, libvirtd or QEMU.
#[cfg(test)]
mod prop_tests {
    use proptest::prelude::*;
    use vmbeam_core::proptest_support::check;
    use vmbeam_core::DomainUuid;

    use super::*;
    use crate::cloudvm::discover;
    use crate::libvirt::fake::{FailOn, FakeHost};
    use crate::libvirt::{run, BackingFiles, HostLibvirt};

    const VMS: [(&str, &str, &str, u64, u8); 4] = [
        ("a1", "5f0c2b5e-1a2b-4c3d-8e4f-0000000000a1", "acme", 8, 0),
        // Three free slots and a 4 GiB window.
        (
            "a2",
            "5f0c2b5e-1a2b-4c3d-8e4f-0000000000a2",
            "acme",
            4,
            0x1c,
        ),
        ("a3", "5f0c2b5e-1a2b-4c3d-8e4f-0000000000a3", "acme", 64, 0),
        ("b1", "5f0c2b5e-1a2b-4c3d-8e4f-0000000000b1", "bravo", 8, 0),
    ];
    const ABSENT: &str = "5f0c2b5e-1a2b-4c3d-8e4f-0000000000ff";
    const GUESTS: [&str; 3] = [
        "6e3b1e9a-1b2c-4d5e-8f90-000000000001",
        "6e3b1e9a-1b2c-4d5e-8f90-000000000002",
        "6e3b1e9a-1b2c-4d5e-8f90-000000000003",
    ];
    /// Mostly guests that fit anywhere, some that fill or overflow a window, one bad size.
    const RAMS: [u64; 8] = [
        4096,
        4096,
        256 << 20,
        256 << 20,
        (1 << 30) - 4096,
        1 << 30,
        3 << 30,
        1000,
    ];

    /// A request, its asker and peer given as indices the run interprets against the
    /// current state, so that sequences reach deep states (a guest shared, then released)
    /// as often as shallow refusals.
    #[derive(Debug, Clone)]
    struct Ask {
        /// Ask as one of the guest's holders (if it has any) rather than any cloud VM.
        by_holder: bool,
        asker: usize,
        verb: u8,
        guest: usize,
        /// VMS's index, or VMS.len() for a cloud VM that is not on this host.
        peer: usize,
        ram: usize,
        fail: Option<FailOn>,
    }

    #[derive(Debug, Clone)]
    enum Action {
        One(Ask),
        /// Two requests decided before either runs (two cloud VMs at once).
        Two(Ask, Ask),
        Rescan,
        /// A cloud VM restarts (its devices are gone), then a rescan.
        Restart(usize),
    }

    fn ask() -> impl Strategy<Value = Ask> {
        let fail = prop_oneof![
            8 => Just(None),
            1 => Just(Some(FailOn::Attach)),
            1 => Just(Some(FailOn::Detach)),
            1 => Just(Some(FailOn::Create)),
            1 => Just(Some(FailOn::Remove)),
            1 => Just(Some(FailOn::DetachTimeout)),
        ];
        // ALLOC, COLOCATED, SHARE, RELEASE, WITHDRAW, FREE.
        let verb = prop_oneof![3 => Just(0u8), 1 => Just(1), 3 => Just(2), 2 => Just(3), 2 => Just(4), 1 => Just(5), 2 => Just(6), 2 => Just(7)];
        (
            proptest::bool::weighted(0.8),
            0..VMS.len(),
            verb,
            0..GUESTS.len(),
            0..=VMS.len(),
            0..RAMS.len(),
            fail,
        )
            .prop_map(|(by_holder, asker, verb, guest, peer, ram, fail)| Ask {
                by_holder,
                asker,
                verb,
                guest,
                peer,
                ram,
                fail,
            })
    }

    fn action() -> impl Strategy<Value = Action> {
        prop_oneof![
            8 => ask().prop_map(Action::One),
            2 => (ask(), ask()).prop_map(|(a, b)| Action::Two(a, b)),
            1 => Just(Action::Rescan),
            1 => (0..VMS.len()).prop_map(Action::Restart),
        ]
    }

    /// The asker: when asked so and the guest has holders, the holder in the role the verb
    /// wants (the owner shares, releases and frees; the destination withdraws), or any
    /// holder; otherwise any cloud VM.
    fn asker(a: &Ask, l: &Ledger) -> CloudVmId {
        let holders: Vec<(&CloudVmId, &Holder)> = l
            .guests()
            .iter()
            .filter(|(k, _)| k.uuid.as_str() == GUESTS[a.guest])
            .flat_map(|(_, g)| g.holders.iter())
            .collect();
        if !a.by_holder || holders.is_empty() {
            return vm_id(a.asker);
        }
        let wanted = match a.verb {
            2 | 3 | 5 | 7 => Some(Role::Owner),
            4 | 6 => Some(Role::Destination),
            _ => None,
        };
        holders
            .iter()
            .find(|(_, h)| Some(h.role) == wanted)
            .unwrap_or(&holders[a.asker % holders.len()])
            .0
            .clone()
    }

    fn vm_id(i: usize) -> CloudVmId {
        let uuid = VMS.get(i).map_or(ABSENT, |v| v.1);
        CloudVmId(DomainUuid::new(uuid).unwrap())
    }

    fn op(a: &Ask) -> Op {
        let guest = DomainUuid::new(GUESTS[a.guest]).unwrap();
        match a.verb {
            0 => Op::Alloc {
                guest,
                ram_bytes: RAMS[a.ram],
            },
            1 => Op::Colocated {
                peer: vm_id(a.peer),
            },
            2 => Op::Share {
                guest,
                peer: vm_id(a.peer),
            },
            3 => Op::Release { guest },
            4 => Op::Withdraw { guest },
            6 => Op::Accept { guest },
            7 => Op::Unshare { guest },
            _ => Op::Free { guest },
        }
    }

    fn host() -> FakeHost {
        let host = FakeHost::default();
        for (name, uuid, cloud, window, busy_to) in VMS {
            let extra: Vec<u8> = (3..=busy_to).collect();
            host.add_vm(
                name,
                uuid,
                cloud,
                window,
                &extra,
                format!("/run/{name}.sock").into(),
            );
        }
        host
    }

    fn topology(host: &FakeHost) -> Topology {
        let d = discover(&host.running_domains().unwrap());
        assert!(d.errors.is_empty(), "{:?}", d.errors);
        d.topology
    }

    /// What the ledger and the host must agree on after every action.
    fn agree(l: &Ledger, host: &FakeHost, topo: &Topology) -> Result<(), TestCaseError> {
        let violations = l.violations(topo);
        prop_assert!(violations.is_empty(), "{:?}", violations);
        let mut ours = BTreeSet::new();
        for (k, g) in l.guests() {
            prop_assert!(g.pending.is_none(), "nothing left in flight");
            for (id, h) in &g.holders {
                ours.insert((id.to_string(), k.shmem_name(), h.addr.slot));
            }
        }
        prop_assert_eq!(ours, host.attached(), "the ledger says what libvirt has");
        let files = host.files();
        for (k, g) in l.guests() {
            prop_assert_eq!(
                files.get(&k.shmem_name()),
                Some(&g.bar_size),
                "{}'s file",
                k
            );
        }
        Ok(())
    }

    /// What the runs did, over all cases: a property that never got a guest shared and
    /// released would prove little.
    type Tally = std::sync::Mutex<BTreeMap<String, u64>>;

    fn count(tally: &Tally, what: String) {
        *tally.lock().unwrap().entry(what).or_default() += 1;
    }

    /// Decides one request; a refusal or an immediate answer changes nothing.
    fn decide(
        l: &mut Ledger,
        topo: &Topology,
        a: &Ask,
        tally: &Tally,
    ) -> Result<Option<Transition>, TestCaseError> {
        let before = l.clone();
        match l.decide(topo, &asker(a, l), &op(a)) {
            Ok(Decision::Run(t)) => Ok(Some(t)),
            Ok(Decision::Answer(_)) => {
                prop_assert_eq!(&*l, &before);
                count(tally, format!("{} answered at once", op(a).verb()));
                Ok(None)
            }
            Ok(Decision::Recorded(_)) => {
                // ACCEPT: only the asker's hold changed, from awaiting to accepted.
                let asker = asker(a, l);
                let changed: Vec<_> = l
                    .guests()
                    .iter()
                    .flat_map(|(k, g)| g.holders.iter().map(move |(id, h)| (k, id, *h)))
                    .filter(|(k, id, h)| before.guests()[*k].holders[*id] != *h)
                    .collect();
                prop_assert_eq!(changed.len(), 1);
                let (_, id, h) = changed[0];
                prop_assert!(id == &asker && h.role == Role::Destination && h.accepted);
                count(tally, format!("{} recorded", op(a).verb()));
                Ok(None)
            }
            Err(r) => {
                prop_assert_eq!(&*l, &before);
                count(tally, format!("refused {}", r.code().as_str()));
                Ok(None)
            }
        }
    }

    /// Runs `t` with `fail` injected and finishes it; true when an unplug was left
    /// unconfirmed (then the ledger agrees with libvirt only after a rescan).
    fn execute(
        l: &mut Ledger,
        host: &FakeHost,
        t: &Transition,
        fail: Option<FailOn>,
        tally: &Tally,
    ) -> bool {
        if let Some(f) = fail {
            host.fail_next(f);
        }
        let outcome = run(t, host, host);
        host.clear_failures();
        l.finish(t, &outcome);
        let how = match &outcome {
            Outcome::Done => "done".to_owned(),
            Outcome::Failed {
                error: StepError::Unsettled(_),
                ..
            } => "unconfirmed".to_owned(),
            Outcome::Failed { done, .. } => format!("failed after {done} steps"),
        };
        count(tally, format!("{} {how}", t.kind));
        matches!(
            outcome,
            Outcome::Failed {
                error: StepError::Unsettled(_),
                ..
            }
        )
    }

    fn rescan(
        l: &mut Ledger,
        host: &FakeHost,
        expect_agreement: bool,
    ) -> Result<Topology, TestCaseError> {
        let since = l.clock();
        let topo = topology(host);
        let files = host.list().unwrap();
        let found = l.reconcile(&topo, &files, since);
        if expect_agreement {
            let changes: Vec<&Finding> = found.iter().filter(|f| f.changes_ledger()).collect();
            prop_assert!(changes.is_empty(), "nothing to reconcile: {:?}", changes);
        }
        Ok(topo)
    }

    #[test]
    fn prop_ledger_any_request_sequence_keeps_the_invariants() {
        let tally = Tally::default();
        check(
            "prop_ledger_any_request_sequence_keeps_the_invariants",
            proptest::collection::vec(action(), 1..40),
            |actions| {
                let host = host();
                let mut l = Ledger::default();
                let mut topo = topology(&host);
                for action in &actions {
                    let mut unsettled = false;
                    match action {
                        Action::One(a) => {
                            if let Some(t) = decide(&mut l, &topo, a, &tally)? {
                                unsettled |= execute(&mut l, &host, &t, a.fail, &tally);
                            }
                        }
                        Action::Two(a, b) => {
                            let ta = decide(&mut l, &topo, a, &tally)?;
                            let tb = decide(&mut l, &topo, b, &tally)?;
                            if let (Some(ta), Some(tb)) = (&ta, &tb) {
                                prop_assert_ne!(&ta.guest, &tb.guest, "one operation per guest");
                                if ta.target == tb.target {
                                    prop_assert_ne!(ta.device.addr, tb.device.addr);
                                }
                            }
                            // Finish in the other order than decided.
                            if let Some(t) = tb {
                                unsettled |= execute(&mut l, &host, &t, b.fail, &tally);
                            }
                            if let Some(t) = ta {
                                unsettled |= execute(&mut l, &host, &t, a.fail, &tally);
                            }
                        }
                        Action::Rescan => {
                            topo = rescan(&mut l, &host, true)?;
                        }
                        Action::Restart(i) => {
                            host.restart_vm(VMS[*i].1);
                            unsettled = true;
                        }
                    }
                    if unsettled {
                        topo = rescan(&mut l, &host, false)?;
                    }
                    agree(&l, &host, &topo)?;
                }
                // A saved and reloaded ledger is the same ledger.
                let back = Ledger::from_saved(l.to_saved())
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(back.guests(), l.guests());
                Ok(())
            },
        );
        let tally = tally.into_inner().unwrap();
        eprintln!("prop_ledger_any_request_sequence_keeps_the_invariants: {tally:?}");
        for kind in ["ALLOC", "SHARE", "RELEASE", "WITHDRAW", "FREE"] {
            let done = tally.get(&format!("{kind} done")).copied().unwrap_or(0);
            assert!(done > 0, "no {kind} ever succeeded: {tally:?}");
        }
        for code in [
            "busy",
            "window-full",
            "not-colocated",
            "last-holder",
            "wrong-role",
        ] {
            assert!(
                tally.contains_key(&format!("refused {code}")),
                "never refused {code}: {tally:?}"
            );
        }
    }
}
