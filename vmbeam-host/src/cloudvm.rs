//! Cloud VMs, as the primary cloud's libvirt describes them: which running domains are
//! VMBeam's, which virtual IaaS cloud each belongs to, where its host channel is, which
//! VMBeam devices it already holds, which PCI slots are taken and how large its 64-bit PCI
//! window is.
//!
//! A cloud VM is VMBeam's when its domain XML carries VMBeam's `<cloud-vm>` metadata
//! ([`vmbeam_core::CloudVmMetadata`], written by the primary cloud's operator). It must
//! then also have the host channel, a virtio-serial port bound by libvirt:
//!
//! ```xml
//! <channel type='unix'>
//!   <source mode='bind' path='/var/lib/libvirt/qemu/channel/target/domain-3-cvm1/org.vmbeam.host.0'/>
//!   <target type='virtio' name='org.vmbeam.host.0'/>
//! </channel>
//! ```
//!
//! and be an i440FX (`pc`) machine: VMBeam hot-plugs its devices into slots of the PCI root
//! bus, which q35's PCIe root complex does not offer (it would need free
//! `pcie-root-port`s; not implemented). A domain without the metadata is ignored; one with
//! metadata that cannot be used gets one [`CloudVmError`] naming it.
//!
//! The cloud VM's identity is its domain UUID ([`CloudVmId`]): inside the cloud VM it is the
//! SMBIOS system UUID, which its libvirtd reports as the host UUID of its capabilities, so a
//! cloud VM can name a peer it only knows through a libvirt connection.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use vmbeam_core::domain::parse_memory_kib;
use vmbeam_core::ids::IdError;
use vmbeam_core::metadata::MetadataError;
use vmbeam_core::xml::{self, Element};
use vmbeam_core::{CloudId, CloudVmMetadata, DomainUuid, XmlError};

use crate::device::{
    largest_fitting_bar, BadName, GuestKey, PciAddress, CONTROL_PAGE, PC_DEFAULT_HOLE64,
};

// The channel's name and the cloud VM's id are the protocol's (`vmbeam_core::host_protocol`).
pub use vmbeam_core::host_protocol::{CloudVmId, HOST_CHANNEL};

/// A running domain as libvirt lists it: its name (from the API, so that an error can name a
/// domain whose XML is unreadable) and its live XML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainXml {
    /// `virDomainGetName`.
    pub name: String,
    /// `virDomainGetXMLDesc(0)` of the running domain.
    pub xml: String,
}

/// A VMBeam device found in a cloud VM's live XML.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachedShmem {
    /// Whose memory (from the device's name).
    pub guest: GuestKey,
    /// `<size>` in bytes.
    pub bar_size: u64,
    /// `<address>`.
    pub addr: PciAddress,
}

/// A running cloud VM of this host that VMBeam may use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloudVm {
    /// Its domain UUID.
    pub id: CloudVmId,
    /// Its domain name (for people; never used to identify it).
    pub name: String,
    /// libvirt's id of the running QEMU (`<domain id=…>`): a new id is a restarted cloud VM.
    pub domain_id: Option<u32>,
    /// The virtual IaaS cloud it belongs to.
    pub cloud: CloudId,
    /// The host channel's unix socket (libvirt binds it; `vmbeam-host` connects).
    pub channel: PathBuf,
    /// The size of its 64-bit PCI window in bytes.
    pub window: u64,
    /// Whether the window was declared (`<pcihole64>`) rather than QEMU's default.
    pub window_declared: bool,
    /// Slots of PCI bus 0 that any device uses (VMBeam's included).
    pub used_slots: BTreeSet<u8>,
    /// VMBeam's devices attached now.
    pub shmems: Vec<AttachedShmem>,
}

impl CloudVm {
    /// The largest guest RAM (bytes) a new device could take in this cloud VM's window,
    /// next to the VMBeam devices it shows now.
    pub fn largest_new_guest(&self) -> Option<u64> {
        let bars: Vec<u64> = self.shmems.iter().map(|s| s.bar_size).collect();
        largest_fitting_bar(&bars, self.window).map(|bar| bar - CONTROL_PAGE)
    }
}

/// A domain that carries VMBeam's cloud VM metadata but cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("cloud VM '{domain}' cannot be used by VMBeam")]
pub struct CloudVmError {
    /// The domain's name.
    pub domain: String,
    /// The domain's UUID, when it could be read.
    pub id: Option<CloudVmId>,
    /// What is wrong.
    #[source]
    pub kind: CloudVmErrorKind,
}

/// What is wrong with a VMBeam cloud VM's XML.
#[derive(Debug, thiserror::Error)]
pub enum CloudVmErrorKind {
    /// The domain XML is not well-formed.
    #[error("its domain XML is malformed")]
    Xml(#[from] XmlError),
    /// VMBeam's metadata element is malformed.
    #[error("its VMBeam metadata is malformed")]
    Metadata(#[source] MetadataError),
    /// No `<uuid>`, or a malformed one.
    #[error("its <uuid> is missing or malformed")]
    Uuid(#[source] Option<IdError>),
    /// No host channel.
    #[error("it has no <channel type='unix'> with <target type='virtio' name='{HOST_CHANNEL}'/>")]
    NoChannel,
    /// More than one host channel.
    #[error("it has more than one {HOST_CHANNEL} channel")]
    DuplicateChannel,
    /// The host channel is not a unix socket that libvirt binds.
    #[error("its {HOST_CHANNEL} channel must be type='unix' with <source mode='bind' path=…>")]
    ChannelNotBound,
    /// Not an i440FX machine.
    #[error("its machine type '{0}' is not an i440FX ('pc') machine")]
    Machine(String),
    /// `<pcihole64>` cannot be read.
    #[error("its <pcihole64> is malformed")]
    Pcihole64(#[source] vmbeam_core::domain::DomainError),
    /// A device named as VMBeam's that is not in VMBeam's shape.
    #[error("its shmem device '{name}' {problem}")]
    Shmem {
        /// The device's name.
        name: String,
        /// What is wrong with it.
        problem: String,
    },
}

impl CloudVmErrorKind {
    fn shmem(name: &str, problem: impl Into<String>) -> Self {
        Self::Shmem {
            name: name.to_owned(),
            problem: problem.into(),
        }
    }
}

/// Reads a running domain: `Ok(None)` when it is not VMBeam's (no cloud VM metadata).
pub fn parse(domain: &DomainXml) -> Result<Option<CloudVm>, CloudVmError> {
    let mut id = None;
    let fail = |id: Option<CloudVmId>, kind| CloudVmError {
        domain: domain.name.clone(),
        id,
        kind,
    };
    let root = xml::parse(&domain.xml).map_err(|e| fail(None, e.into()))?;
    let metadata = CloudVmMetadata::from_domain_root(&root);
    if let Some(uuid) = root.child(None, "uuid") {
        id = DomainUuid::new(uuid.text().trim()).ok().map(CloudVmId);
    }
    let metadata = match metadata {
        Ok(None) => return Ok(None),
        Ok(Some(m)) => m,
        Err(e) => return Err(fail(id, CloudVmErrorKind::Metadata(e))),
    };
    read_cloud_vm(&root, &domain.name, metadata.cloud)
        .map(Some)
        .map_err(|(kind, read_id)| fail(read_id.or(id), kind))
}

type Failure = (CloudVmErrorKind, Option<CloudVmId>);

fn read_cloud_vm(root: &Element, name: &str, cloud: CloudId) -> Result<CloudVm, Failure> {
    let uuid_text = root
        .child(None, "uuid")
        .map(|u| u.text())
        .ok_or((CloudVmErrorKind::Uuid(None), None))?;
    let id = CloudVmId(
        DomainUuid::new(uuid_text.trim()).map_err(|e| (CloudVmErrorKind::Uuid(Some(e)), None))?,
    );
    let with_id = |kind| (kind, Some(id.clone()));
    let machine = root
        .child(None, "os")
        .and_then(|os| os.child(None, "type"))
        .and_then(|t| t.attr("machine"))
        .unwrap_or_default();
    if !(machine == "pc" || machine.starts_with("pc-i440fx-")) {
        return Err(with_id(CloudVmErrorKind::Machine(machine.to_owned())));
    }
    let devices = root.child(None, "devices");
    let channel = host_channel(devices).map_err(with_id)?;
    let (window, window_declared) = match pcihole64(devices).map_err(with_id)? {
        Some(bytes) => (bytes, true),
        None => (PC_DEFAULT_HOLE64, false),
    };
    let mut used_slots = BTreeSet::new();
    if let Some(devices) = devices {
        collect_root_slots(devices, &mut used_slots);
    }
    let shmems = vmbeam_shmems(devices).map_err(with_id)?;
    Ok(CloudVm {
        domain_id: root.attr("id").and_then(|v| v.trim().parse().ok()),
        name: name.to_owned(),
        id,
        cloud,
        channel,
        window,
        window_declared,
        used_slots,
        shmems,
    })
}

fn host_channel(devices: Option<&Element>) -> Result<PathBuf, CloudVmErrorKind> {
    let mut found = devices
        .into_iter()
        .flat_map(|d| d.children_named(None, "channel"))
        .filter(|c| {
            c.child(None, "target").is_some_and(|t| {
                t.attr("type") == Some("virtio") && t.attr("name") == Some(HOST_CHANNEL)
            })
        });
    let channel = found.next().ok_or(CloudVmErrorKind::NoChannel)?;
    if found.next().is_some() {
        return Err(CloudVmErrorKind::DuplicateChannel);
    }
    let source = channel.child(None, "source");
    match (channel.attr("type"), source) {
        (Some("unix"), Some(src)) if src.attr("mode") == Some("bind") => src
            .attr("path")
            .filter(|p| p.starts_with('/'))
            .map(PathBuf::from)
            .ok_or(CloudVmErrorKind::ChannelNotBound),
        _ => Err(CloudVmErrorKind::ChannelNotBound),
    }
}

/// `<controller type='pci' model='pci-root'><pcihole64 unit=…>` in bytes.
fn pcihole64(devices: Option<&Element>) -> Result<Option<u64>, CloudVmErrorKind> {
    let Some(hole) = devices
        .into_iter()
        .flat_map(|d| d.children_named(None, "controller"))
        .filter(|c| c.attr("type") == Some("pci") && c.attr("model") == Some("pci-root"))
        .find_map(|c| c.child(None, "pcihole64"))
    else {
        return Ok(None);
    };
    let kib =
        parse_memory_kib(&hole.text(), hole.attr("unit")).map_err(CloudVmErrorKind::Pcihole64)?;
    kib.checked_mul(1024)
        .map(Some)
        .ok_or(CloudVmErrorKind::Pcihole64(
            vmbeam_core::domain::DomainError::MemoryOverflow,
        ))
}

/// A number as libvirt writes address attributes: `0x…` hexadecimal, or decimal.
fn address_number(value: Option<&str>) -> Option<u32> {
    match value.map(str::trim) {
        None => Some(0),
        Some(v) => match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
            Some(hex) => u32::from_str_radix(hex, 16).ok(),
            None => v.parse().ok(),
        },
    }
}

/// The PCI address in `<address type='pci' …>`, if the element is one (absent domain, bus
/// and function are 0, as in libvirt).
fn pci_address(address: &Element) -> Option<PciAddress> {
    if address.attr("type") != Some("pci") {
        return None;
    }
    let domain = address_number(address.attr("domain"))?;
    let bus = address_number(address.attr("bus"))?;
    let slot = address_number(address.attr("slot"))?;
    let function = address_number(address.attr("function"))?;
    (domain <= 0xffff && bus <= 0xff && slot <= 0x1f && function <= 7).then_some(PciAddress {
        domain: domain as u16,
        bus: bus as u8,
        slot: slot as u8,
        function: function as u8,
    })
}

/// Every slot of domain 0, bus 0 that an `<address type='pci'>` below `el` uses.
fn collect_root_slots(el: &Element, used: &mut BTreeSet<u8>) {
    for child in el.elements() {
        if child.is(None, "address") {
            if let Some(a) = pci_address(child).filter(|a| a.domain == 0 && a.bus == 0) {
                used.insert(a.slot);
            }
        } else {
            collect_root_slots(child, used);
        }
    }
}

fn vmbeam_shmems(devices: Option<&Element>) -> Result<Vec<AttachedShmem>, CloudVmErrorKind> {
    let mut out = Vec::new();
    for shmem in devices
        .into_iter()
        .flat_map(|d| d.children_named(None, "shmem"))
    {
        let name = shmem.attr("name").unwrap_or_default();
        let guest = match GuestKey::from_shmem_name(name) {
            None => continue,
            Some(Ok(guest)) => guest,
            Some(Err(BadName(_))) => {
                return Err(CloudVmErrorKind::shmem(
                    name,
                    "has VMBeam's prefix but not vmbeam-<cloud>-<guest-uuid>",
                ))
            }
        };
        let model = shmem.child(None, "model").and_then(|m| m.attr("type"));
        if model != Some("ivshmem-plain") {
            return Err(CloudVmErrorKind::shmem(name, "is not model ivshmem-plain"));
        }
        let size = shmem
            .child(None, "size")
            .and_then(|s| parse_memory_kib(&s.text(), s.attr("unit")).ok())
            .and_then(|kib| kib.checked_mul(1024))
            .filter(|b| b.is_power_of_two())
            .ok_or_else(|| CloudVmErrorKind::shmem(name, "has no size that is a power of two"))?;
        let addr = shmem
            .child(None, "address")
            .and_then(pci_address)
            .filter(|a| a.domain == 0 && a.bus == 0 && a.function == 0)
            .ok_or_else(|| {
                CloudVmErrorKind::shmem(name, "is not at function 0 of a slot of PCI bus 0")
            })?;
        out.push(AttachedShmem {
            guest,
            bar_size: size,
            addr,
        });
    }
    Ok(out)
}

/// The names of every `<shmem>` device in a domain XML (the libvirt adapter's check that a
/// device is there or gone).
pub fn shmem_names(domain_xml: &str) -> Result<Vec<String>, XmlError> {
    let root = xml::parse(domain_xml)?;
    Ok(root
        .children_named(None, "devices")
        .flat_map(|d| d.children_named(None, "shmem"))
        .filter_map(|s| s.attr("name").map(str::to_owned))
        .collect())
}

/// The cloud VMs of this host, as of one listing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Topology {
    /// The usable VMBeam cloud VMs, by id.
    pub cloud_vms: BTreeMap<CloudVmId, CloudVm>,
    /// Running VMBeam cloud VMs whose XML could not be used: their devices are neither
    /// trusted nor forgotten.
    pub unusable: BTreeSet<CloudVmId>,
}

/// What one listing of the running domains found.
#[derive(Debug, Default)]
pub struct Discovery {
    /// The cloud VMs.
    pub topology: Topology,
    /// One error per VMBeam domain that cannot be used.
    pub errors: Vec<CloudVmError>,
}

/// Reads every running domain (see [`parse`]).
pub fn discover(domains: &[DomainXml]) -> Discovery {
    let mut out = Discovery::default();
    for domain in domains {
        match parse(domain) {
            Ok(Some(vm)) => {
                out.topology.cloud_vms.insert(vm.id.clone(), vm);
            }
            Ok(None) => {}
            Err(e) => {
                if let Some(id) = &e.id {
                    out.topology.unusable.insert(id.clone());
                }
                out.errors.push(e);
            }
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::error_chain;

    pub(crate) const CVM_UUID: &str = "5f0c2b5e-1a2b-4c3d-8e4f-00000000000a";
    const GUEST: &str = "6e3b1e9a-1b2c-4d5e-8f90-0123456789ab";

    /// A cloud VM as libvirt 11.3 prints a running i440FX domain (abridged), with VMBeam's
    /// metadata, the host channel, a 64 GiB window and one VMBeam device at slot 0x1f.
    pub(crate) const CVM: &str = r#"<domain type='kvm' id='3'>
  <name>cvm1</name>
  <uuid>5f0c2b5e-1a2b-4c3d-8e4f-00000000000a</uuid>
  <metadata>
    <vmbeam:cloud-vm xmlns:vmbeam="https://vmbeam.dev/xmlns/vmbeam/1">
      <vmbeam:cloud>acme</vmbeam:cloud>
    </vmbeam:cloud-vm>
  </metadata>
  <memory unit='KiB'>1310720</memory>
  <os>
    <type arch='x86_64' machine='pc-i440fx-10.0'>hvm</type>
  </os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <controller type='usb' index='0' model='piix3-uhci'>
      <alias name='usb'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x01' function='0x2'/>
    </controller>
    <controller type='pci' index='0' model='pci-root'>
      <pcihole64 unit='KiB'>67108864</pcihole64>
      <alias name='pci.0'/>
    </controller>
    <controller type='pci' index='1' model='pci-bridge'>
      <model name='pci-bridge'/>
      <target chassisNr='1'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x05' function='0x0'/>
    </controller>
    <controller type='virtio-serial' index='0'>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x04' function='0x0'/>
    </controller>
    <interface type='network'>
      <mac address='52:54:00:12:c8:11'/>
      <source network='default'/>
      <model type='virtio'/>
      <address type='pci' domain='0x0000' bus='0x01' slot='0x1e' function='0x0'/>
    </interface>
    <channel type='unix'>
      <source mode='bind' path='/var/lib/libvirt/qemu/channel/target/domain-3-cvm1/org.qemu.guest_agent.0'/>
      <target type='virtio' name='org.qemu.guest_agent.0' state='disconnected'/>
      <address type='virtio-serial' controller='0' bus='0' port='1'/>
    </channel>
    <channel type='unix'>
      <source mode='bind' path='/var/lib/libvirt/qemu/channel/target/domain-3-cvm1/org.vmbeam.host.0'/>
      <target type='virtio' name='org.vmbeam.host.0' state='connected'/>
      <alias name='channel1'/>
      <address type='virtio-serial' controller='0' bus='0' port='2'/>
    </channel>
    <video>
      <model type='cirrus' vram='16384' heads='1' primary='yes'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x02' function='0x0'/>
    </video>
    <shmem name='looking-glass'>
      <model type='ivshmem-plain'/>
      <size unit='M'>32</size>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x06' function='0x0'/>
    </shmem>
    <shmem name='vmbeam-acme-6e3b1e9a-1b2c-4d5e-8f90-0123456789ab'>
      <model type='ivshmem-plain'/>
      <size unit='M'>2048</size>
      <alias name='shmem1'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x1f' function='0x0'/>
    </shmem>
  </devices>
</domain>
"#;

    fn dom(xml: &str) -> DomainXml {
        DomainXml {
            name: "cvm1".into(),
            xml: xml.into(),
        }
    }

    /// A test case's expectation on the error.
    type Check = fn(&CloudVmErrorKind) -> bool;

    fn err(xml: &str) -> CloudVmError {
        parse(&dom(xml)).unwrap_err()
    }

    #[test]
    fn reads_a_cloud_vm() {
        let vm = parse(&dom(CVM)).unwrap().unwrap();
        assert_eq!(vm.id.to_string(), CVM_UUID);
        assert_eq!(vm.name, "cvm1");
        assert_eq!(vm.domain_id, Some(3));
        assert_eq!(vm.cloud.as_str(), "acme");
        assert_eq!(
            vm.channel,
            PathBuf::from("/var/lib/libvirt/qemu/channel/target/domain-3-cvm1/org.vmbeam.host.0")
        );
        assert_eq!((vm.window, vm.window_declared), (64 << 30, true));
        // Bus 0 only: the NIC behind the bridge (bus 1, slot 0x1e) takes no root slot.
        assert_eq!(vm.used_slots, [1, 2, 4, 5, 6, 0x1f].into());
        assert_eq!(
            vm.shmems,
            vec![AttachedShmem {
                guest: GuestKey::from_shmem_name(&format!("vmbeam-acme-{GUEST}"))
                    .unwrap()
                    .unwrap(),
                bar_size: 2 << 30,
                addr: PciAddress::root_slot(0x1f),
            }]
        );
        // 64 GiB with one 2 GiB BAR: a 16 GiB BAR fits, a 32 GiB one not (2 + 32 + 31 of slack).
        assert_eq!(vm.largest_new_guest(), Some((16 << 30) - 4096));
    }

    #[test]
    fn without_metadata_a_domain_is_not_ours() {
        let plain = CVM.replace(
            r#"<vmbeam:cloud-vm xmlns:vmbeam="https://vmbeam.dev/xmlns/vmbeam/1">
      <vmbeam:cloud>acme</vmbeam:cloud>
    </vmbeam:cloud-vm>"#,
            "",
        );
        assert!(parse(&dom(&plain)).unwrap().is_none());
        // Not even a q35 machine or a missing channel matters then.
        let q35 = plain.replace("pc-i440fx-10.0", "pc-q35-10.0");
        assert!(parse(&dom(&q35)).unwrap().is_none());
    }

    #[test]
    fn default_window_and_plain_pc_machine() {
        let xml = CVM
            .replace("<pcihole64 unit='KiB'>67108864</pcihole64>", "")
            .replace("pc-i440fx-10.0", "pc");
        let vm = parse(&dom(&xml)).unwrap().unwrap();
        assert_eq!((vm.window, vm.window_declared), (2 << 30, false));
        // Its one 2 GiB BAR already overflows it (as libvirt would show it, reality wins).
        assert_eq!(vm.largest_new_guest(), None);
        let gib = CVM.replace(
            "<pcihole64 unit='KiB'>67108864</pcihole64>",
            "<pcihole64 unit='GiB'>8</pcihole64>",
        );
        assert_eq!(parse(&dom(&gib)).unwrap().unwrap().window, 8 << 30);
    }

    #[test]
    fn every_unusable_cloud_vm_gets_one_error_naming_it() {
        let cases: Vec<(String, Check)> = vec![
            ("<domain".into(), |k| matches!(k, CloudVmErrorKind::Xml(_))),
            (
                CVM.replace("<vmbeam:cloud>acme</vmbeam:cloud>", "<vmbeam:cloud>a b</vmbeam:cloud>"),
                |k| matches!(k, CloudVmErrorKind::Metadata(_)),
            ),
            (
                CVM.replace("5f0c2b5e-1a2b-4c3d-8e4f-00000000000a", "nope"),
                |k| matches!(k, CloudVmErrorKind::Uuid(Some(_))),
            ),
            (
                CVM.replace("name='org.vmbeam.host.0'", "name='org.other.0'"),
                |k| matches!(k, CloudVmErrorKind::NoChannel),
            ),
            (
                CVM.replace(
                    "<video>",
                    "<channel type='unix'><source mode='bind' path='/x'/><target type='virtio' name='org.vmbeam.host.0'/></channel><video>",
                ),
                |k| matches!(k, CloudVmErrorKind::DuplicateChannel),
            ),
            (
                CVM.replace(
                    "<source mode='bind' path='/var/lib/libvirt/qemu/channel/target/domain-3-cvm1/org.vmbeam.host.0'/>",
                    "<source mode='connect' path='/run/x'/>",
                ),
                |k| matches!(k, CloudVmErrorKind::ChannelNotBound),
            ),
            (
                CVM.replace("pc-i440fx-10.0", "pc-q35-10.0"),
                |k| matches!(k, CloudVmErrorKind::Machine(m) if m == "pc-q35-10.0"),
            ),
            (
                CVM.replace("<pcihole64 unit='KiB'>67108864</pcihole64>", "<pcihole64 unit='parsec'>1</pcihole64>"),
                |k| matches!(k, CloudVmErrorKind::Pcihole64(_)),
            ),
            (
                CVM.replace("vmbeam-acme-6e3b", "vmbeam-acme-XXXX"),
                |k| matches!(k, CloudVmErrorKind::Shmem { .. }),
            ),
            (
                CVM.replace("<size unit='M'>2048</size>", "<size unit='M'>96</size>"),
                |k| matches!(k, CloudVmErrorKind::Shmem { problem, .. } if problem.contains("power of two")),
            ),
            (
                CVM.replace("bus='0x00' slot='0x1f'", "bus='0x01' slot='0x1f'"),
                |k| matches!(k, CloudVmErrorKind::Shmem { problem, .. } if problem.contains("bus 0")),
            ),
        ];
        for (xml, check) in cases {
            let e = err(&xml);
            assert!(check(&e.kind), "{:?}", e.kind);
            let text = error_chain(&e);
            assert!(
                text.starts_with("cloud VM 'cvm1' cannot be used by VMBeam: "),
                "{text}"
            );
        }
        // The UUID is kept when it was readable, so its devices are not forgotten.
        let q35 = err(&CVM.replace("pc-i440fx-10.0", "pc-q35-10.0"));
        assert_eq!(q35.id.unwrap().to_string(), CVM_UUID);
    }

    #[test]
    fn discovery_sorts_domains_into_cloud_vms_unusable_ones_and_others() {
        let other = CVM
            .replace(
                "5f0c2b5e-1a2b-4c3d-8e4f-00000000000a",
                "5f0c2b5e-1a2b-4c3d-8e4f-00000000000b",
            )
            .replace("pc-i440fx-10.0", "pc-q35-10.0");
        let d = discover(&[
            dom(CVM),
            dom(&other),
            DomainXml {
                name: "web".into(),
                xml: "<domain type='kvm'><name>web</name></domain>".into(),
            },
        ]);
        assert_eq!(d.topology.cloud_vms.len(), 1);
        assert_eq!(d.errors.len(), 1);
        assert_eq!(
            d.topology
                .unusable
                .iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>(),
            vec!["5f0c2b5e-1a2b-4c3d-8e4f-00000000000b".to_owned()]
        );
    }

    #[test]
    fn shmem_names_lists_every_shmem() {
        assert_eq!(
            shmem_names(CVM).unwrap(),
            vec!["looking-glass".to_owned(), format!("vmbeam-acme-{GUEST}")]
        );
        assert!(shmem_names("<domain").is_err());
    }
}

#[cfg(test)]
mod prop_tests {
    use proptest::prelude::*;
    use vmbeam_core::proptest_support::{mutate_text, proptest_config};

    use super::tests::CVM;
    use super::*;

    proptest! {
        #![proptest_config(proptest_config())]

        #[test]
        fn prop_cloudvm_mutated_xml_never_panics(
            mode in any::<u8>(),
            pos in any::<prop::sample::Index>(),
            b in any::<u8>(),
        ) {
            let xml = mutate_text(CVM, mode, pos, b);
            let d = DomainXml { name: "cvm1".into(), xml };
            if let Ok(Some(vm)) = parse(&d) {
                // Whatever parses is consistent: VMBeam's devices sit in used slots.
                for s in &vm.shmems {
                    prop_assert!(vm.used_slots.contains(&s.addr.slot));
                }
            }
        }

        #[test]
        fn prop_cloudvm_arbitrary_text_never_panics(s in "[<>/=a-z:'\" \n&;!?-]{0,300}") {
            let _ = parse(&DomainXml { name: "x".into(), xml: s.clone() });
            let _ = shmem_names(&s);
        }
    }
}
