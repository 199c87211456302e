//! The shared device: one `ivshmem-plain` PCI device per guest, backed by one host file,
//! hot-plugged into every cloud VM that holds the guest's memory.
//!
//! ```xml
//! <shmem name='vmbeam-acme-6e3b1e9a-1b2c-4d5e-8f90-0123456789ab'>
//!   <model type='ivshmem-plain'/>
//!   <size unit='M'>2048</size>
//!   <address type='pci' domain='0x0000' bus='0x00' slot='0x1f' function='0x0'/>
//! </shmem>
//! ```
//!
//! # Names
//!
//! The device's name is `vmbeam-<cloud>-<guest-uuid>` ([`GuestKey::shmem_name`]): guests are
//! named by their UUID *within their virtual IaaS cloud*, so two clouds that pick the same
//! guest UUID never meet in one file, and a cloud VM can neither squat nor probe another
//! cloud's guest names. The UUID is the last 36 characters, so the cloud id may contain `-`.
//!
//! # Size
//!
//! The BAR (and the file) is the smallest power of two that holds the guest's RAM plus one
//! 4 KiB control page ([`bar_size`]), at least 1 MiB (libvirt's `<size unit='M'>`). QEMU's
//! `pci_register_bar` asserts that a BAR is a power of two: a hot-plug of any other size
//! aborts the whole cloud VM (`hw/pci/pci.c: pci_register_bar: Assertion
//! 'is_power_of_2(size)' failed`, seen on QEMU 7.2 in the nested feasibility run). The guest's
//! RAM starts at offset 0; the control page, where co-location proofs are written, is the
//! BAR's last page ([`control_page_offset`]), always past the guest's RAM. The file is sparse
//! on tmpfs: the rounding costs guest-physical address space in the cloud VM's 64-bit PCI
//! window, never memory. It does cost a lot of window: a guest of exactly 4 GiB gets an
//! 8 GiB BAR.
//!
//! # The 64-bit PCI window
//!
//! Hot-plugged BARs are placed by the cloud VM's kernel inside the root bus's 64-bit window,
//! QEMU's `pci-hole64` (2 GiB by default on `pc` machines; libvirt sets it with
//! `<controller type='pci' model='pci-root'><pcihole64 unit='GiB'>64</pcihole64>`). A BAR of
//! size S must sit at an S-aligned address, and the window starts at a 1 GiB-aligned address
//! only, so a BAR above 1 GiB may waste up to S - 1 GiB before it. [`window_fits`] asks for
//! the sum of all VMBeam BARs in the cloud VM plus that worst-case slack: a 2 GiB BAR never
//! fits the default 2 GiB window (the feasibility run saw exactly that: `BAR 2 [mem size
//! 0x80000000 64bit pref]: can't assign; no space`). The check is necessary, not
//! sufficient: other devices' 64-bit BARs and fragmentation left by earlier unplugs can still
//! make the cloud VM's kernel refuse a BAR, so the cloud VM must check that `resource2`
//! was assigned and WITHDRAW (or FREE) the device otherwise.
//!
//! # What libvirt does with `<shmem>` (read in libvirt's source, 11.x)
//!
//! - Backing: without `<server>`, `qemuBuildShmemBackendMemProps` (src/qemu/qemu_command.c)
//!   makes `-object memory-backend-file,id=shmmem-<alias>,mem-path=/dev/shm/<name>,
//!   size=<size>,share=on` and `-device ivshmem-plain,id=<alias>,memdev=shmmem-<alias>,
//!   bus=pci.0,addr=<slot>` (test data: tests/qemuxmlconfdata/
//!   shmem-plain-doorbell.x86_64-latest.args). The path is always `/dev/shm/<name>`; the name
//!   may not contain `/` (domaincommon.rng: pattern `[^/]*`).
//! - libvirt neither creates nor deletes that file, nor labels or chowns it: QEMU opens it
//!   (creating it, with QEMU's umask, if it is missing) and the file outlives the device.
//!   So `vmbeam-host` creates it itself (0600, owned by QEMU's user, sparse, exactly the
//!   BAR's size: QEMU refuses an existing file of another size) and deletes it at FREE.
//! - Hot-plug: `qemuDomainAttachShmemDevice` (src/qemu/qemu_hotplug.c) supports
//!   `ivshmem-plain` and `ivshmem-doorbell` (validation rejects the legacy `ivshmem`): it
//!   ensures the PCI address (ours, given explicitly), `object-add`s the backend, then
//!   `device_add`s; a failure of either rolls both back. It is synchronous: when
//!   `virDomainAttachDeviceFlags(VIR_DOMAIN_AFFECT_LIVE)` returns 0 the device is in QEMU
//!   and in the live XML (the cloud VM's kernel sees it a moment later, after the ACPI
//!   hot-plug event: 0.18-0.23 s in the feasibility run).
//! - Hot-unplug: `qemuDomainDetachDeviceLive` (same file) accepts `ivshmem-plain` and
//!   `ivshmem-doorbell` (`qemuDomainDetachPrepShmem`; the legacy model fails with "live
//!   detach of shmem model ... is not supported"), refuses multifunction addresses, sends
//!   `device_del` and waits for QEMU's `DEVICE_DELETED` for at most 5 s
//!   (`qemuDomainWaitForDeviceRemoval`, `QEMU_UNPLUG_TIMEOUT`). If the event came,
//!   `qemuDomainRemoveShmemDevice` `object-del`s the backend, drops the device from the live
//!   definition and emits `VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED`, all before the call returns.
//!   If not, the call still returns 0 and the removal finishes whenever the guest lets go,
//!   with the same event then. A guest that refuses fails the call ("unplug of device was
//!   rejected by the guest"). So success of `virDomainDetachDeviceFlags` does not mean
//!   removed: `vmbeam-host` waits until the device is gone from the live XML
//!   (libvirt's documented alternative to the event), with its own timeout.
//! - Matching on detach: libvirt finds the device to detach by comparing the given XML's
//!   name, model, size, server and address with the live ones, so the detach XML is the
//!   attach XML.
//! - Unplug does not wait for the BAR's users: in the feasibility run a process in the
//!   cloud VM kept writing to an mmapped `resource2` after `device_del` and read zeroes, no
//!   SIGBUS. The protocol's RELEASE therefore comes from the cloud VM after its QEMU exited.
//! - No `role` is set, so QEMU's `master=off`: a cloud VM holding a VMBeam device cannot be
//!   live-migrated by the primary cloud (QEMU blocks it), which is what sharing needs.

use std::collections::BTreeSet;
use std::fmt;

use quick_xml::escape::escape;
use serde::{Deserialize, Serialize};
use vmbeam_core::{CloudId, DomainUuid};

// The pieces both ends of the host channel agree on live in `vmbeam_core::host_protocol`.
pub use vmbeam_core::host_protocol::{control_page_offset, BadAddress, PciAddress, CONTROL_PAGE};

/// Prefix of every VMBeam shmem device name (and backing file name).
pub const SHMEM_PREFIX: &str = "vmbeam-";
/// The smallest BAR VMBeam makes (libvirt's size is written in MiB).
pub const MIN_BAR: u64 = 1 << 20;
/// The largest guest RAM VMBeam accepts (1 TiB): its BAR is 2 TiB.
pub const MAX_GUEST_RAM: u64 = 1 << 40;
/// QEMU aligns the start of `pci-hole64` on `pc` machines to 1 GiB, no more.
pub const HOLE64_ALIGN: u64 = 1 << 30;
/// QEMU's default `pci-hole64-size` on `pc` (i440FX) machines.
pub const PC_DEFAULT_HOLE64: u64 = 2 << 30;
/// The PCI slots on bus 0 VMBeam may use: 0 is the host bridge, 1 the PIIX3 and 2 is kept
/// by libvirt for the primary video device on `pc` machines.
pub const SLOTS: std::ops::RangeInclusive<u8> = 0x03..=0x1f;

/// A guest, named as `vmbeam-host` knows it: its virtual IaaS cloud and its UUID there.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct GuestKey {
    /// The cloud of the cloud VMs that hold it.
    pub cloud: CloudId,
    /// The guest domain's UUID.
    pub uuid: DomainUuid,
}

impl GuestKey {
    /// The shmem device's (and backing file's) name: `vmbeam-<cloud>-<uuid>`.
    pub fn shmem_name(&self) -> String {
        format!("{SHMEM_PREFIX}{}-{}", self.cloud, self.uuid)
    }

    /// The key in a shmem name: `None` when the name is not VMBeam's (no prefix),
    /// `Some(Err)` when it has the prefix but not the shape.
    pub fn from_shmem_name(name: &str) -> Option<Result<Self, BadName>> {
        let rest = name.strip_prefix(SHMEM_PREFIX)?;
        let bad = || BadName(name.to_owned());
        let parsed = (|| {
            let split = rest.len().checked_sub(37).ok_or_else(bad)?;
            let cloud = rest.get(..split).ok_or_else(bad)?;
            let uuid = rest.get(split..).ok_or_else(bad)?;
            let uuid = uuid.strip_prefix('-').ok_or_else(bad)?;
            Ok(Self {
                cloud: CloudId::new(cloud).map_err(|_| bad())?,
                uuid: DomainUuid::new(uuid).map_err(|_| bad())?,
            })
        })();
        Some(parsed)
    }
}

impl fmt::Display for GuestKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.cloud, self.uuid)
    }
}

/// A name with VMBeam's prefix that is not `vmbeam-<cloud>-<uuid>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{0}' has VMBeam's prefix but is not vmbeam-<cloud>-<guest-uuid>")]
pub struct BadName(pub String);

/// Why a guest's RAM size cannot get a device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    /// Zero, or not a whole number of 4 KiB pages.
    #[error("{0} bytes of RAM is not a positive multiple of 4096")]
    NotPages(u64),
    /// More than [`MAX_GUEST_RAM`].
    #[error("{0} bytes of RAM is more than the 1 TiB VMBeam accepts")]
    TooLarge(u64),
}

/// The BAR (and file) size for a guest of `ram_bytes`: the smallest power of two holding
/// the RAM and the control page, at least [`MIN_BAR`].
pub fn bar_size(ram_bytes: u64) -> Result<u64, SizeError> {
    if ram_bytes == 0 || ram_bytes % CONTROL_PAGE != 0 {
        return Err(SizeError::NotPages(ram_bytes));
    }
    if ram_bytes > MAX_GUEST_RAM {
        return Err(SizeError::TooLarge(ram_bytes));
    }
    Ok((ram_bytes + CONTROL_PAGE).next_power_of_two().max(MIN_BAR))
}

/// Whether VMBeam BARs of `sizes` (powers of two) fit a 64-bit window of `window` bytes,
/// under the worst-case alignment of the window's start (see the module docs).
pub fn window_fits(sizes: impl IntoIterator<Item = u64>, window: u64) -> bool {
    let (mut sum, mut largest) = (0u64, 0u64);
    for size in sizes {
        sum = sum.saturating_add(size);
        largest = largest.max(size);
    }
    sum.saturating_add(largest.saturating_sub(HOLE64_ALIGN)) <= window
}

/// The largest BAR that still fits next to `existing` in `window`, if any.
pub fn largest_fitting_bar(existing: &[u64], window: u64) -> Option<u64> {
    let mut bar = MAX_GUEST_RAM * 2;
    while bar >= MIN_BAR {
        if window_fits(existing.iter().copied().chain([bar]), window) {
            return Some(bar);
        }
        bar /= 2;
    }
    None
}

/// The slot for a new device: the highest slot in [`SLOTS`] that no device uses (libvirt
/// fills slots from the bottom when it assigns addresses itself).
pub fn choose_slot(used: &BTreeSet<u8>) -> Option<u8> {
    SLOTS.rev().find(|slot| !used.contains(slot))
}

/// One guest's device in one cloud VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShmemDevice {
    /// Whose memory.
    pub guest: GuestKey,
    /// BAR and file size in bytes (a power of two, at least [`MIN_BAR`]).
    pub bar_size: u64,
    /// Where it sits in that cloud VM.
    pub addr: PciAddress,
}

impl ShmemDevice {
    /// The device's name (see [`GuestKey::shmem_name`]).
    pub fn name(&self) -> String {
        self.guest.shmem_name()
    }

    /// The `<shmem>` element for `virDomainAttachDeviceFlags` and, unchanged,
    /// `virDomainDetachDeviceFlags` (libvirt matches name, model, size and address).
    pub fn xml(&self) -> String {
        format!(
            "<shmem name='{name}'><model type='ivshmem-plain'/><size unit='M'>{mib}</size>\
             <address type='pci' domain='0x{domain:04x}' bus='0x{bus:02x}' slot='0x{slot:02x}' function='0x{function:x}'/></shmem>",
            name = escape(self.name()),
            mib = self.bar_size >> 20,
            domain = self.addr.domain,
            bus = self.addr.bus,
            slot = self.addr.slot,
            function = self.addr.function,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;
    const UUID: &str = "6e3b1e9a-1b2c-4d5e-8f90-0123456789ab";

    fn key(cloud: &str) -> GuestKey {
        GuestKey {
            cloud: CloudId::new(cloud).unwrap(),
            uuid: DomainUuid::new(UUID).unwrap(),
        }
    }

    #[test]
    fn names_carry_the_cloud_and_parse_back() {
        for cloud in ["acme", "acme-virtual-iaas", "a.b_c-d", "x"] {
            let k = key(cloud);
            assert_eq!(k.shmem_name(), format!("vmbeam-{cloud}-{UUID}"));
            assert_eq!(GuestKey::from_shmem_name(&k.shmem_name()), Some(Ok(k)));
        }
        assert_eq!(GuestKey::from_shmem_name("looking-glass"), None);
        for bad in [
            "vmbeam-",
            "vmbeam-acme",
            &format!("vmbeam-{UUID}"),
            &format!("vmbeam--{UUID}"),
            &format!("vmbeam-acme_{UUID}"),
            &format!("vmbeam-acme-{}", &UUID[..35]),
            &format!("vmbeam-ac/me-{UUID}"),
            "vmbeam-é-6e3b1e9a-1b2c-4d5e-8f90-0123456789ab",
        ] {
            assert!(
                matches!(GuestKey::from_shmem_name(bad), Some(Err(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn bar_sizes_are_powers_of_two_with_room_for_the_control_page() {
        assert_eq!(bar_size(4096), Ok(MIN_BAR));
        assert_eq!(bar_size(256 << 20), Ok(512 << 20));
        assert_eq!(bar_size((256 << 20) - 4096), Ok(256 << 20));
        assert_eq!(bar_size(GIB), Ok(2 * GIB));
        assert_eq!(bar_size(3 * GIB), Ok(4 * GIB));
        assert_eq!(bar_size(MAX_GUEST_RAM), Ok(2 * MAX_GUEST_RAM));
        assert_eq!(bar_size(0), Err(SizeError::NotPages(0)));
        assert_eq!(bar_size(1000), Err(SizeError::NotPages(1000)));
        assert_eq!(
            bar_size(MAX_GUEST_RAM + 4096),
            Err(SizeError::TooLarge(MAX_GUEST_RAM + 4096))
        );
        assert_eq!(control_page_offset(2 * GIB), 2 * GIB - 4096);
    }

    #[test]
    fn windows_count_the_alignment_slack_of_large_bars() {
        // The feasibility run: a 2 GiB BAR in QEMU's default 2 GiB window failed.
        assert!(!window_fits([2 * GIB], PC_DEFAULT_HOLE64));
        assert!(window_fits([GIB], PC_DEFAULT_HOLE64));
        assert!(window_fits([GIB, 512 << 20, 512 << 20], PC_DEFAULT_HOLE64));
        assert!(!window_fits([GIB, GIB, 4096], PC_DEFAULT_HOLE64));
        // And with a 64 GiB hole, a 4 GiB BAR that worked: 4 + 3 of slack.
        assert!(window_fits([4 * GIB], 64 * GIB));
        assert!(window_fits([32 * GIB], 64 * GIB));
        assert!(window_fits([16 * GIB, 8 * GIB, 4 * GIB, 2 * GIB], 64 * GIB));
        // Conservative: the worst-case slack of the largest BAR is counted even where
        // smaller BARs could fill it.
        assert!(!window_fits([32 * GIB, 16 * GIB], 64 * GIB));
        assert!(window_fits([], 0));
        assert_eq!(largest_fitting_bar(&[], PC_DEFAULT_HOLE64), Some(GIB));
        assert_eq!(largest_fitting_bar(&[GIB], PC_DEFAULT_HOLE64), Some(GIB));
        assert_eq!(largest_fitting_bar(&[], 64 * GIB), Some(32 * GIB));
        assert_eq!(largest_fitting_bar(&[GIB, GIB], PC_DEFAULT_HOLE64), None);
    }

    #[test]
    fn slots_come_from_the_top_and_skip_used_ones() {
        assert_eq!(choose_slot(&BTreeSet::new()), Some(0x1f));
        assert_eq!(choose_slot(&[0x1f, 0x1e].into()), Some(0x1d));
        let all: BTreeSet<u8> = SLOTS.collect();
        assert_eq!(choose_slot(&all), None);
        let mut almost = all.clone();
        almost.remove(&0x03);
        assert_eq!(choose_slot(&almost), Some(0x03));
    }

    #[test]
    fn addresses_print_and_parse_as_sysfs_names_them() {
        let a = PciAddress::root_slot(0x1f);
        assert_eq!(a.to_string(), "0000:00:1f.0");
        assert_eq!("0000:00:1f.0".parse(), Ok(a));
        assert_eq!(
            "0001:02:03.7".parse(),
            Ok(PciAddress {
                domain: 1,
                bus: 2,
                slot: 3,
                function: 7
            })
        );
        for bad in [
            "",
            "0000:00:1f",
            "00:1f.0",
            "0000:00:20.0",
            "0000:00:1f.8",
            "0000:0:1f.0",
            "000g:00:1f.0",
            "0000:00:1f.0 ",
            "+000:00:1f.0",
        ] {
            assert!(bad.parse::<PciAddress>().is_err(), "{bad}");
        }
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(json, "\"0000:00:1f.0\"");
        assert_eq!(serde_json::from_str::<PciAddress>(&json).unwrap(), a);
    }

    #[test]
    fn device_xml_is_what_libvirt_expects() {
        let d = ShmemDevice {
            guest: key("acme"),
            bar_size: 2 * GIB,
            addr: PciAddress::root_slot(0x1f),
        };
        assert_eq!(
            d.xml(),
            format!(
                "<shmem name='vmbeam-acme-{UUID}'><model type='ivshmem-plain'/><size unit='M'>2048</size>\
                 <address type='pci' domain='0x0000' bus='0x00' slot='0x1f' function='0x0'/></shmem>"
            )
        );
    }
}
