//! A typed view of the parts of a libvirt domain XML that VMBeam decides on: identity, memory
//! size, memory backing and VMBeam's private QMP monitor.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::ids::{parse_decimal, DomainUuid, IdError};
use crate::xml::{self, Element, XmlError};

/// The namespace of libvirt's QEMU passthrough elements (`<qemu:commandline>`).
pub const QEMU_NAMESPACE: &str = "http://libvirt.org/schemas/domain/qemu/1.0";
/// Where VMBeam's private QMP sockets live.
pub const DEFAULT_QMP_DIR: &str = "/run/vmbeam/qmp";

/// The path of a domain's private QMP socket: `<qmp_dir>/<uuid>.sock`.
pub fn qmp_socket_path(qmp_dir: &Path, uuid: &DomainUuid) -> PathBuf {
    qmp_dir.join(format!("{uuid}.sock"))
}

/// The value of the `-qmp` argument for a socket path.
pub fn qmp_arg_value(socket: &Path) -> String {
    format!("unix:{},server=on,wait=off", socket.display())
}

/// Why a domain XML could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DomainError {
    /// The input is not well-formed XML.
    #[error("malformed XML")]
    Xml(#[from] XmlError),
    /// The root element is not `<domain>`.
    #[error("root element is <{0}>, not <domain>")]
    NotADomain(String),
    /// A required element is missing.
    #[error("domain XML has no <{0}>")]
    Missing(&'static str),
    /// An element that may appear once appears more than once.
    #[error("domain XML has more than one <{0}>")]
    Repeated(&'static str),
    /// The UUID is malformed.
    #[error("invalid <uuid>")]
    BadUuid(#[source] IdError),
    /// An element or attribute has a value VMBeam does not understand.
    #[error("invalid {what} '{value}'")]
    BadValue {
        /// Which element or attribute.
        what: &'static str,
        /// The value found.
        value: String,
    },
    /// The memory size does not fit in 64 bits.
    #[error("memory size overflows")]
    MemoryOverflow,
}

/// Where the guest's RAM comes from (`<memoryBacking><source type=…>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemorySource {
    /// A file in libvirt's `memory_backing_dir` (what VMBeam needs).
    File,
    /// Anonymous memory (libvirt's default).
    Anonymous,
    /// A memfd (cannot be opened by another process by path).
    Memfd,
}

impl fmt::Display for MemorySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::File => "file",
            Self::Anonymous => "anonymous",
            Self::Memfd => "memfd",
        })
    }
}

/// Whether the RAM mapping is shared (`share=on`) or private (`share=off`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemoryAccess {
    /// `<access mode='shared'/>`.
    Shared,
    /// `<access mode='private'/>` (libvirt's default).
    Private,
}

impl fmt::Display for MemoryAccess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Shared => "shared",
            Self::Private => "private",
        })
    }
}

/// When the guest's RAM is allocated (`<allocation mode=…>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AllocationMode {
    /// Preallocated at start: QEMU touches every page, which on a zero-copy destination
    /// would write into the memory the source guest is running on.
    Immediate,
    /// Allocated on first use.
    Ondemand,
}

/// The `<memoryBacking>` settings VMBeam cares about. Absent elements are `None`/`false`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryBacking {
    /// `<source type=…/>`.
    pub source: Option<MemorySource>,
    /// `<access mode=…/>`.
    pub access: Option<MemoryAccess>,
    /// `<discard/>` is present (it punches the RAM out of the file on teardown).
    pub discard: bool,
    /// `<hugepages>` is present (RAM then lives on hugetlbfs, not in the beam pool).
    pub hugepages: bool,
    /// `<allocation mode=…/>`.
    pub allocation: Option<AllocationMode>,
}

impl MemoryBacking {
    /// The source QEMU will actually use: libvirt's default is anonymous memory.
    pub fn effective_source(&self) -> MemorySource {
        self.source.unwrap_or(MemorySource::Anonymous)
    }

    /// The access mode QEMU will actually use: libvirt's default is private.
    pub fn effective_access(&self) -> MemoryAccess {
        self.access.unwrap_or(MemoryAccess::Private)
    }
}

/// What VMBeam needs to know about a domain, read from its XML.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainFacts {
    /// `<domain type=…>`: `kvm`, `qemu`, `xen`…
    pub hypervisor: String,
    /// `<name>`.
    pub name: String,
    /// `<uuid>`.
    pub uuid: DomainUuid,
    /// `<domain id=…>`, present while the domain runs.
    pub id: Option<u32>,
    /// `<memory>` in KiB (the `unit` attribute honoured, bytes rounded up as libvirt does).
    pub memory_kib: u64,
    /// `<memoryBacking>`.
    pub memory_backing: MemoryBacking,
    /// Number of guest NUMA cells (`<cpu><numa><cell>`); each gets its own RAM backend.
    pub numa_cells: usize,
    /// The socket of VMBeam's private QMP monitor, when the domain's `<qemu:commandline>`
    /// has the argument pair `-qmp unix:…/<uuid>.sock,…`.
    pub private_qmp: Option<PathBuf>,
}

impl DomainFacts {
    /// Reads the facts from a domain XML (as `virDomainGetXMLDesc` returns it or as a user
    /// wrote it).
    pub fn from_xml(domain_xml: &str) -> Result<Self, DomainError> {
        let root = xml::parse(domain_xml)?;
        Self::from_root(&root)
    }

    pub(crate) fn from_root(root: &Element) -> Result<Self, DomainError> {
        if !root.is(None, "domain") {
            return Err(DomainError::NotADomain(root.local.clone()));
        }
        let hypervisor = root
            .attr("type")
            .ok_or(DomainError::Missing("domain type"))?
            .to_owned();
        let name = single(root, "name")?
            .ok_or(DomainError::Missing("name"))?
            .text()
            .trim()
            .to_owned();
        if name.is_empty() {
            return Err(DomainError::Missing("name"));
        }
        let uuid_text = single(root, "uuid")?
            .ok_or(DomainError::Missing("uuid"))?
            .text();
        let uuid = DomainUuid::new(uuid_text.trim()).map_err(DomainError::BadUuid)?;
        let id = match root.attr("id") {
            None => None,
            Some(v) => Some(
                parse_decimal(v.trim())
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| DomainError::BadValue {
                        what: "domain id",
                        value: v.to_owned(),
                    })?,
            ),
        };
        let memory = single(root, "memory")?.ok_or(DomainError::Missing("memory"))?;
        let memory_kib = parse_memory_kib(&memory.text(), memory.attr("unit"))?;
        let memory_backing = match single(root, "memoryBacking")? {
            Some(mb) => parse_memory_backing(mb)?,
            None => MemoryBacking::default(),
        };
        let numa_cells = root
            .children_named(None, "cpu")
            .flat_map(|cpu| cpu.children_named(None, "numa"))
            .flat_map(|numa| numa.children_named(None, "cell"))
            .count();
        let private_qmp = find_private_qmp(root, &uuid);
        Ok(Self {
            hypervisor,
            name,
            uuid,
            id,
            memory_kib,
            memory_backing,
            numa_cells,
            private_qmp,
        })
    }

    /// The memory size in bytes (what a pool file must hold).
    pub fn memory_bytes(&self) -> Result<u64, DomainError> {
        self.memory_kib
            .checked_mul(1024)
            .ok_or(DomainError::MemoryOverflow)
    }
}

/// The single child `<local>` (no namespace) of `root`, refusing repeats.
fn single<'a>(root: &'a Element, local: &'static str) -> Result<Option<&'a Element>, DomainError> {
    let mut it = root.children_named(None, local);
    let first = it.next();
    if it.next().is_some() {
        return Err(DomainError::Repeated(local));
    }
    Ok(first)
}

/// Converts a libvirt scaled integer to KiB, following `virScaleInteger` and
/// `virDomainParseMemory`: no unit means KiB; `b`/`byte`/`bytes` are bytes; `k`, `KiB`, `M`,
/// `MiB`… are powers of 1024; `KB`, `MB`… powers of 1000 (case-insensitive); bytes are
/// rounded up to whole KiB.
pub fn parse_memory_kib(value: &str, unit: Option<&str>) -> Result<u64, DomainError> {
    let value = value.trim();
    let number = parse_decimal(value).ok_or_else(|| DomainError::BadValue {
        what: "memory size",
        value: value.to_owned(),
    })?;
    let bad_unit = || DomainError::BadValue {
        what: "memory unit",
        value: unit.unwrap_or_default().to_owned(),
    };
    let scale: u64 = match unit.map(str::trim) {
        None | Some("") => 1024,
        Some(u)
            if ["b", "byte", "bytes"]
                .iter()
                .any(|b| u.eq_ignore_ascii_case(b)) =>
        {
            1
        }
        Some(u) => {
            let mut chars = u.chars();
            let first = chars.next().ok_or_else(bad_unit)?;
            let rest = chars.as_str();
            let base: u64 = if rest.is_empty() || rest.eq_ignore_ascii_case("ib") {
                1024
            } else if rest.eq_ignore_ascii_case("b") {
                1000
            } else {
                return Err(bad_unit());
            };
            let power = match first.to_ascii_lowercase() {
                'k' => 1,
                'm' => 2,
                'g' => 3,
                't' => 4,
                'p' => 5,
                'e' => 6,
                _ => return Err(bad_unit()),
            };
            base.checked_pow(power).ok_or(DomainError::MemoryOverflow)?
        }
    };
    let bytes = number
        .checked_mul(scale)
        .ok_or(DomainError::MemoryOverflow)?;
    Ok(bytes.div_ceil(1024))
}

fn parse_memory_backing(mb: &Element) -> Result<MemoryBacking, DomainError> {
    let source = match single(mb, "source")? {
        None => None,
        Some(s) => Some(match s.attr("type") {
            Some("file") => MemorySource::File,
            Some("anonymous") => MemorySource::Anonymous,
            Some("memfd") => MemorySource::Memfd,
            other => {
                return Err(DomainError::BadValue {
                    what: "memoryBacking source type",
                    value: other.unwrap_or_default().to_owned(),
                })
            }
        }),
    };
    let access = match single(mb, "access")? {
        None => None,
        Some(a) => Some(match a.attr("mode") {
            Some("shared") => MemoryAccess::Shared,
            Some("private") => MemoryAccess::Private,
            other => {
                return Err(DomainError::BadValue {
                    what: "memoryBacking access mode",
                    value: other.unwrap_or_default().to_owned(),
                })
            }
        }),
    };
    let allocation = match single(mb, "allocation")? {
        None => None,
        Some(a) => match a.attr("mode") {
            None => None,
            Some("immediate") => Some(AllocationMode::Immediate),
            Some("ondemand") => Some(AllocationMode::Ondemand),
            Some(other) => {
                return Err(DomainError::BadValue {
                    what: "memoryBacking allocation mode",
                    value: other.to_owned(),
                })
            }
        },
    };
    Ok(MemoryBacking {
        source,
        access,
        discard: single(mb, "discard")?.is_some(),
        hugepages: single(mb, "hugepages")?.is_some(),
        allocation,
    })
}

/// The `value`s of every `<qemu:commandline><qemu:arg>`, in order.
pub(crate) fn qemu_args(root: &Element) -> Vec<String> {
    root.children_named(Some(QEMU_NAMESPACE), "commandline")
        .flat_map(|c| c.children_named(Some(QEMU_NAMESPACE), "arg"))
        .filter_map(|a| a.attr("value").map(str::to_owned))
        .collect()
}

/// If `value` is a `-qmp` argument for this domain's private socket (`unix:PATH[,opts]`
/// with PATH's file name `<uuid>.sock`), its PATH.
pub(crate) fn private_qmp_path(value: &str, uuid: &DomainUuid) -> Option<PathBuf> {
    let path = value.strip_prefix("unix:")?.split(',').next()?;
    let path = Path::new(path);
    let expected = format!("{uuid}.sock");
    (path.is_absolute() && path.file_name()? == expected.as_str()).then(|| path.to_path_buf())
}

fn find_private_qmp(root: &Element, uuid: &DomainUuid) -> Option<PathBuf> {
    let args = qemu_args(root);
    args.windows(2)
        .filter(|w| w[0] == "-qmp")
        .find_map(|w| private_qmp_path(&w[1], uuid))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A test case's expectation on the error.
    type Check = fn(&DomainError) -> bool;

    /// A domain as libvirt 9.0 prints it for a running KVM guest (trimmed).
    pub(crate) const RUNNING: &str = r#"<domain type='kvm' id='7' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>web1</name>
  <uuid>6e3b1e9a-1b2c-4d5e-8f90-0123456789ab</uuid>
  <metadata>
    <libosinfo:libosinfo xmlns:libosinfo="http://libosinfo.org/xmlns/libvirt/domain/1.0">
      <libosinfo:os id="http://debian.org/debian/12"/>
    </libosinfo:libosinfo>
  </metadata>
  <memory unit='KiB'>2097152</memory>
  <currentMemory unit='KiB'>2097152</currentMemory>
  <memoryBacking>
    <source type='file'/>
    <access mode='shared'/>
  </memoryBacking>
  <vcpu placement='static'>1</vcpu>
  <resource>
    <partition>/machine</partition>
  </resource>
  <os>
    <type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type>
    <boot dev='hd'/>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <serial type='file'>
      <source path='/var/log/vmbeam/web1.log' append='on'/>
      <target type='isa-serial' port='0'/>
    </serial>
  </devices>
  <seclabel type='none' model='none'/>
  <qemu:commandline>
    <qemu:arg value='-qmp'/>
    <qemu:arg value='unix:/run/vmbeam/qmp/6e3b1e9a-1b2c-4d5e-8f90-0123456789ab.sock,server=on,wait=off'/>
  </qemu:commandline>
</domain>
"#;

    #[test]
    fn reads_running_domain() {
        let f = DomainFacts::from_xml(RUNNING).unwrap();
        assert_eq!(f.hypervisor, "kvm");
        assert_eq!(f.name, "web1");
        assert_eq!(f.uuid.as_str(), "6e3b1e9a-1b2c-4d5e-8f90-0123456789ab");
        assert_eq!(f.id, Some(7));
        assert_eq!(f.memory_kib, 2 * 1024 * 1024);
        assert_eq!(f.memory_bytes().unwrap(), 2 << 30);
        assert_eq!(
            f.memory_backing,
            MemoryBacking {
                source: Some(MemorySource::File),
                access: Some(MemoryAccess::Shared),
                discard: false,
                hugepages: false,
                allocation: None,
            }
        );
        assert_eq!(f.numa_cells, 0);
        assert_eq!(
            f.private_qmp.as_deref(),
            Some(Path::new(
                "/run/vmbeam/qmp/6e3b1e9a-1b2c-4d5e-8f90-0123456789ab.sock"
            ))
        );
    }

    #[test]
    fn reads_plain_inactive_domain() {
        let xml = "<domain type='qemu'><name>a</name><uuid>6E3B1E9A-1B2C-4D5E-8F90-0123456789AB</uuid><memory>1024</memory></domain>";
        let f = DomainFacts::from_xml(xml).unwrap();
        assert_eq!(f.id, None);
        assert_eq!(f.memory_kib, 1024);
        assert_eq!(f.uuid.as_str(), "6e3b1e9a-1b2c-4d5e-8f90-0123456789ab");
        assert_eq!(f.memory_backing.effective_source(), MemorySource::Anonymous);
        assert_eq!(f.memory_backing.effective_access(), MemoryAccess::Private);
        assert_eq!(f.private_qmp, None);
    }

    #[test]
    fn qemu_namespace_matched_by_uri_and_other_qmp_ignored() {
        // A different prefix, declared on the element itself, and a user's own QMP socket.
        let xml = r#"<domain type='kvm'><name>a</name><uuid>6e3b1e9a-1b2c-4d5e-8f90-0123456789ab</uuid><memory>1</memory>
          <q:commandline xmlns:q="http://libvirt.org/schemas/domain/qemu/1.0">
            <q:arg value='-qmp'/><q:arg value='unix:/tmp/user.sock,server=on,wait=off'/>
            <q:arg value='-qmp'/><q:arg value='unix:/run/x/6e3b1e9a-1b2c-4d5e-8f90-0123456789ab.sock,server=on,wait=off'/>
          </q:commandline>
          <other:commandline xmlns:other="urn:not-qemu"><other:arg value='-qmp'/><other:arg value='unix:/y/6e3b1e9a-1b2c-4d5e-8f90-0123456789ab.sock'/></other:commandline>
        </domain>"#;
        let f = DomainFacts::from_xml(xml).unwrap();
        assert_eq!(
            f.private_qmp.as_deref(),
            Some(Path::new(
                "/run/x/6e3b1e9a-1b2c-4d5e-8f90-0123456789ab.sock"
            ))
        );
        let only_foreign = xml.replace(
            "http://libvirt.org/schemas/domain/qemu/1.0",
            "urn:not-qemu-either",
        );
        assert_eq!(
            DomainFacts::from_xml(&only_foreign).unwrap().private_qmp,
            None
        );
    }

    #[test]
    fn memory_backing_variants() {
        let wrap = |mb: &str| {
            format!("<domain type='kvm'><name>a</name><uuid>6e3b1e9a-1b2c-4d5e-8f90-0123456789ab</uuid><memory unit='GiB'>1</memory>{mb}<cpu><numa><cell id='0' cpus='0' memory='512' unit='MiB'/><cell id='1' cpus='1' memory='512' unit='MiB'/></numa></cpu></domain>")
        };
        let f = DomainFacts::from_xml(&wrap(
            "<memoryBacking><hugepages><page size='2048' unit='KiB'/></hugepages><source type='memfd'/><access mode='private'/><allocation mode='immediate'/><discard/></memoryBacking>",
        ))
        .unwrap();
        assert_eq!(f.memory_kib, 1024 * 1024);
        assert_eq!(f.numa_cells, 2);
        assert_eq!(
            f.memory_backing,
            MemoryBacking {
                source: Some(MemorySource::Memfd),
                access: Some(MemoryAccess::Private),
                discard: true,
                hugepages: true,
                allocation: Some(AllocationMode::Immediate),
            }
        );
        for bad in [
            "<memoryBacking><source type='tmpfs'/></memoryBacking>",
            "<memoryBacking><source/></memoryBacking>",
            "<memoryBacking><access mode='yes'/></memoryBacking>",
            "<memoryBacking><allocation mode='lazy'/></memoryBacking>",
        ] {
            assert!(
                matches!(
                    DomainFacts::from_xml(&wrap(bad)),
                    Err(DomainError::BadValue { .. })
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            DomainFacts::from_xml(&wrap(
                "<memoryBacking><source type='file'/><source type='file'/></memoryBacking>"
            )),
            Err(DomainError::Repeated("source"))
        ));
    }

    #[test]
    fn memory_units() {
        let kib = |v: &str, u: Option<&str>| parse_memory_kib(v, u).unwrap();
        assert_eq!(kib("1024", None), 1024);
        assert_eq!(kib("1024", Some("KiB")), 1024);
        assert_eq!(kib("1024", Some("k")), 1024);
        assert_eq!(kib("1000", Some("KB")), 977); // 1,000,000 bytes rounded up
        assert_eq!(kib("2", Some("MiB")), 2048);
        assert_eq!(kib("2", Some("m")), 2048);
        assert_eq!(kib("1", Some("MB")), 977);
        assert_eq!(kib("2", Some("GiB")), 2 * 1024 * 1024);
        assert_eq!(kib("2", Some("G")), 2 * 1024 * 1024);
        assert_eq!(kib("1", Some("TiB")), 1 << 30);
        assert_eq!(kib("1", Some("bytes")), 1);
        assert_eq!(kib("1025", Some("b")), 2);
        assert_eq!(kib("0", Some("b")), 0);
        assert_eq!(kib(" 8 ", Some("gib")), 8 << 20);
        for (v, u) in [
            ("1", Some("X")),
            ("1", Some("KiBB")),
            ("-1", None),
            ("1.5", None),
            ("", None),
            ("1", Some("Mi")),
        ] {
            assert!(
                matches!(parse_memory_kib(v, u), Err(DomainError::BadValue { .. })),
                "{v} {u:?}"
            );
        }
        assert!(matches!(
            parse_memory_kib("18446744073709551615", Some("EiB")),
            Err(DomainError::MemoryOverflow)
        ));
    }

    #[test]
    fn errors() {
        let cases: &[(&str, Check)] = &[
            ("<domain", |e| matches!(e, DomainError::Xml(_))),
            ("", |e| matches!(e, DomainError::Xml(_))),
            ("<network/>", |e| matches!(e, DomainError::NotADomain(_))),
            ("<d:domain xmlns:d='urn:x' type='kvm'/>", |e| {
                matches!(e, DomainError::NotADomain(_))
            }),
            ("<domain><name>a</name></domain>", |e| {
                matches!(e, DomainError::Missing("domain type"))
            }),
            ("<domain type='kvm'><uuid>6e3b1e9a-1b2c-4d5e-8f90-0123456789ab</uuid><memory>1</memory></domain>", |e| {
                matches!(e, DomainError::Missing("name"))
            }),
            ("<domain type='kvm'><name>a</name><name>b</name></domain>", |e| {
                matches!(e, DomainError::Repeated("name"))
            }),
            ("<domain type='kvm'><name>a</name><memory>1</memory></domain>", |e| {
                matches!(e, DomainError::Missing("uuid"))
            }),
            ("<domain type='kvm'><name>a</name><uuid>nope</uuid><memory>1</memory></domain>", |e| {
                matches!(e, DomainError::BadUuid(_))
            }),
            ("<domain type='kvm'><name>a</name><uuid>6e3b1e9a-1b2c-4d5e-8f90-0123456789ab</uuid></domain>", |e| {
                matches!(e, DomainError::Missing("memory"))
            }),
            ("<domain type='kvm' id='-1'><name>a</name><uuid>6e3b1e9a-1b2c-4d5e-8f90-0123456789ab</uuid><memory>1</memory></domain>", |e| {
                matches!(e, DomainError::BadValue { what: "domain id", .. })
            }),
            ("<domain type='kvm'><name>a</name><uuid>6e3b1e9a-1b2c-4d5e-8f90-0123456789ab</uuid><memory unit='furlong'>1</memory></domain>", |e| {
                matches!(e, DomainError::BadValue { what: "memory unit", .. })
            }),
        ];
        for (xml, check) in cases {
            let err = DomainFacts::from_xml(xml).unwrap_err();
            assert!(check(&err), "{xml}: {err:?}");
        }
    }

    #[test]
    fn qmp_helpers() {
        let uuid = DomainUuid::new("6e3b1e9a-1b2c-4d5e-8f90-0123456789ab").unwrap();
        let p = qmp_socket_path(Path::new(DEFAULT_QMP_DIR), &uuid);
        assert_eq!(
            qmp_arg_value(&p),
            "unix:/run/vmbeam/qmp/6e3b1e9a-1b2c-4d5e-8f90-0123456789ab.sock,server=on,wait=off"
        );
        assert_eq!(private_qmp_path(&qmp_arg_value(&p), &uuid), Some(p));
        assert_eq!(
            private_qmp_path(
                "unix:relative/6e3b1e9a-1b2c-4d5e-8f90-0123456789ab.sock",
                &uuid
            ),
            None
        );
        assert_eq!(private_qmp_path("tcp:localhost:4444", &uuid), None);
    }
}

#[cfg(test)]
mod prop_tests {
    use proptest::prelude::*;

    use super::*;
    use crate::proptest_support::{mutate_text, proptest_config};

    proptest! {
        #![proptest_config(proptest_config())]

        #[test]
        fn prop_domain_arbitrary_text_never_panics(s in any::<String>()) {
            let _ = DomainFacts::from_xml(&s);
        }

        #[test]
        fn prop_domain_xmlish_text_never_panics(s in "[<>/=a-z:'\" \n&;!?-]{0,200}") {
            let _ = DomainFacts::from_xml(&s);
        }

        #[test]
        fn prop_domain_mutated_xml_never_panics(
            mode in any::<u8>(),
            pos in any::<prop::sample::Index>(),
            b in any::<u8>(),
        ) {
            let xml = mutate_text(tests::RUNNING, mode, pos, b);
            if let Ok(facts) = DomainFacts::from_xml(&xml) {
                let _ = facts.memory_bytes();
                let mb = &facts.memory_backing;
                let _ = (mb.effective_source(), mb.effective_access());
            }
            let _ = crate::transform::disable(&xml);
        }

        #[test]
        fn prop_domain_memory_size_never_panics(value in ".{0,30}", unit in proptest::option::of(".{0,8}")) {
            let _ = parse_memory_kib(&value, unit.as_deref());
        }

        #[test]
        fn prop_domain_memory_size_decimal_kib(n in any::<u64>()) {
            let got = parse_memory_kib(&n.to_string(), Some("KiB"));
            if n.checked_mul(1024).is_some() {
                prop_assert_eq!(got.unwrap(), n);
            } else {
                prop_assert!(matches!(got, Err(DomainError::MemoryOverflow)), "{:?}", got);
            }
        }
    }
}
