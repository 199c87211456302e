//! VMBeam's elements in a libvirt domain's `<metadata>`: a guest's [`BeamMetadata`]
//! (`<beam>`, in the cloud VM's libvirt) and a cloud VM's [`CloudVmMetadata`] (`<cloud-vm>`,
//! in the primary cloud's libvirt, read by `vmbeam-host`). Both live in [`NAMESPACE`]; libvirt
//! keeps one element per namespace, so a domain carries one or the other.
//!
//! A guest's element:
//! In a domain XML it looks like this (any prefix works; matching is by namespace URI):
//!
//! ```xml
//! <metadata>
//!   <vmbeam:beam xmlns:vmbeam="https://vmbeam.dev/xmlns/vmbeam/1">
//!     <vmbeam:cloud>acme-virtual-iaas</vmbeam:cloud>
//!     <vmbeam:pool>/var/lib/vmbeam/pool</vmbeam:pool>
//!     <vmbeam:owner>cvm1</vmbeam:owner>
//!     <vmbeam:generation>3</vmbeam:generation>
//!     <vmbeam:pool-file>6e3b1e9a-1b2c-4d5e-8f90-0123456789ab.2.ram</vmbeam:pool-file>
//!   </vmbeam:beam>
//! </metadata>
//! ```
//!
//! `virDomainGetMetadata(VIR_DOMAIN_METADATA_ELEMENT, NAMESPACE)` returns the element with
//! our namespace stripped from it and from its descendants (`<beam><cloud>…`), and
//! `virDomainSetMetadata` expects that same bare form and re-adds the namespace under the
//! key it is given ([`PREFIX`]). [`BeamMetadata::parse_metadata_element`] accepts both the
//! bare and the namespaced form; [`BeamMetadata::to_element_xml`] writes the bare form for
//! `virDomainSetMetadata`, [`BeamMetadata::to_namespaced_xml`] the form embedded in a
//! domain XML.
//!
//! Metadata is a claim made by whoever could edit the domain, never a proof of anything:
//! co-location is proven through the pool itself and agreements through tickets.

use std::path::PathBuf;

use quick_xml::escape::escape;
use serde::Deserialize;

use crate::ids::{parse_decimal, CloudId, DomainUuid, HostId, IdError};
use crate::pool;
use crate::xml::{self, Element, Node, XmlError};

/// The namespace URI of VMBeam's metadata element (version 1 of the format).
pub const NAMESPACE: &str = "https://vmbeam.dev/xmlns/vmbeam/1";
/// The namespace prefix (libvirt's metadata "key") VMBeam writes.
pub const PREFIX: &str = "vmbeam";
/// The local name of VMBeam's metadata element.
pub const ELEMENT: &str = "beam";

/// Why VMBeam metadata could not be read.
#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    /// The input is not well-formed XML.
    #[error("malformed XML")]
    Xml(#[from] XmlError),
    /// A full domain XML was expected.
    #[error("root element is <{0}>, not <domain>")]
    NotADomain(String),
    /// The element belongs to another namespace.
    #[error("element <{local}> is in namespace '{ns}', not VMBeam's")]
    ForeignElement {
        /// The element's namespace URI.
        ns: String,
        /// The element's local name.
        local: String,
    },
    /// The element is in our namespace (or none) but is not the one expected.
    #[error("expected <{expected}>, found <{found}>")]
    WrongElement {
        /// The element expected (`beam`, `cloud-vm`).
        expected: &'static str,
        /// The element found.
        found: String,
    },
    /// The domain carries more than one element in VMBeam's namespace.
    #[error("more than one VMBeam metadata element")]
    Duplicate,
    /// A field element contains child elements.
    #[error("<{0}> must contain text only")]
    NestedElement(String),
    /// Non-blank text directly inside the element.
    #[error("unexpected text inside <{0}>")]
    UnexpectedText(&'static str),
    /// A required field is missing, duplicated or otherwise not in the expected shape.
    #[error("VMBeam metadata does not have the expected fields")]
    Shape(#[source] quick_xml::DeError),
    /// An identifier field is invalid.
    #[error("invalid <{field}>")]
    BadId {
        /// The field's element name.
        field: &'static str,
        /// Why the identifier is invalid.
        #[source]
        source: IdError,
    },
    /// A field has a value of the wrong form.
    #[error("invalid <{field}> '{value}': {expected}")]
    BadValue {
        /// The field's element name.
        field: &'static str,
        /// The value found.
        value: String,
        /// What was expected instead.
        expected: &'static str,
    },
    /// The generation counter cannot be incremented.
    #[error("generation counter exhausted")]
    GenerationOverflow,
}

/// VMBeam's per-domain record: which cloud and pool the domain's memory lives in and which
/// cloud VM owns the pool file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BeamMetadata {
    /// The virtual IaaS cloud the domain belongs to.
    pub cloud: CloudId,
    /// The beam pool directory (absolute path, as seen by the owner).
    pub pool: PathBuf,
    /// The cloud VM that owns the pool file.
    pub owner: HostId,
    /// Bumped at every ownership change.
    pub generation: u64,
    /// The pool file's name inside `pool`, when it is not the default
    /// `<uuid>.<generation>.ram` (after a zero-copy migration the file keeps the name it
    /// was created with).
    pub pool_file: Option<String>,
}

/// The serde shape of the bare element; values are validated afterwards.
#[derive(Deserialize)]
struct RawBeam {
    cloud: String,
    pool: String,
    owner: String,
    generation: String,
    #[serde(rename = "pool-file")]
    pool_file: Option<String>,
}

impl BeamMetadata {
    /// Parses the bare metadata element, as `virDomainGetMetadata(ELEMENT, NAMESPACE)`
    /// returns it (`<beam><cloud>…</cloud>…</beam>`), or the namespaced form with any
    /// prefix. Child elements in other namespaces are ignored.
    pub fn parse_metadata_element(xml: &str) -> Result<Self, MetadataError> {
        let root = xml::parse(xml)?;
        Self::from_element(&root)
    }

    /// Finds and parses VMBeam's element in a full domain XML.
    ///
    /// Returns `Ok(None)` when the domain carries no element in [`NAMESPACE`] (other
    /// applications' metadata is ignored) or carries a cloud VM's [`CloudVmMetadata`]
    /// instead, and an error when the XML is malformed, is not a `<domain>`, or our
    /// element is malformed or duplicated.
    pub fn from_domain_xml(domain_xml: &str) -> Result<Option<Self>, MetadataError> {
        let root = xml::parse(domain_xml)?;
        Self::from_domain_root(&root)
    }

    pub(crate) fn from_domain_root(root: &Element) -> Result<Option<Self>, MetadataError> {
        match our_element(root)? {
            // A cloud VM's element: that domain is a cloud VM, not a guest.
            Some(el) if el.local == CLOUD_VM_ELEMENT => Ok(None),
            Some(el) => Self::from_element(el).map(Some),
            None => Ok(None),
        }
    }

    fn from_element(el: &Element) -> Result<Self, MetadataError> {
        let bare = bare_form(el, ELEMENT)?;
        let raw: RawBeam = quick_xml::de::from_str(&bare).map_err(MetadataError::Shape)?;
        Self::from_raw(raw)
    }

    fn from_raw(raw: RawBeam) -> Result<Self, MetadataError> {
        let cloud = CloudId::new(raw.cloud.trim()).map_err(|source| MetadataError::BadId {
            field: "cloud",
            source,
        })?;
        let owner = HostId::new(raw.owner.trim()).map_err(|source| MetadataError::BadId {
            field: "owner",
            source,
        })?;
        let pool_str = raw.pool.trim();
        let pool = PathBuf::from(pool_str);
        if !pool.is_absolute() || pool_str.contains('\0') {
            return Err(MetadataError::BadValue {
                field: "pool",
                value: pool_str.to_owned(),
                expected: "an absolute path",
            });
        }
        let gen_str = raw.generation.trim();
        let generation = parse_decimal(gen_str).ok_or_else(|| MetadataError::BadValue {
            field: "generation",
            value: gen_str.to_owned(),
            expected: "a non-negative decimal integer",
        })?;
        let pool_file = match raw.pool_file {
            None => None,
            Some(name) => {
                let name = name.trim();
                if !pool::is_plain_file_name(name) {
                    return Err(MetadataError::BadValue {
                        field: "pool-file",
                        value: name.to_owned(),
                        expected: "a file name without '/'",
                    });
                }
                Some(name.to_owned())
            }
        };
        Ok(Self {
            cloud,
            pool,
            owner,
            generation,
            pool_file,
        })
    }

    /// The bare element for `virDomainSetMetadata(VIR_DOMAIN_METADATA_ELEMENT, xml,
    /// PREFIX, NAMESPACE)`; libvirt adds the namespace itself.
    pub fn to_element_xml(&self) -> String {
        self.write_xml(None, Some(""))
    }

    /// The element with its namespace declaration, for embedding in a domain XML's
    /// `<metadata>`.
    pub fn to_namespaced_xml(&self) -> String {
        self.write_xml(Some(PREFIX), Some(""))
    }

    /// Writes the element; with `indent`, one field per line, each line after the first
    /// starting with `indent` (plus two spaces for fields); without, on one line.
    pub(crate) fn write_xml(&self, prefix: Option<&str>, indent: Option<&str>) -> String {
        let (nl, indent, step) = match indent {
            Some(indent) => ("\n", indent, "  "),
            None => ("", "", ""),
        };
        let p = prefix.map(|p| format!("{p}:")).unwrap_or_default();
        let decl = match prefix {
            Some(prefix) => format!(" xmlns:{prefix}=\"{NAMESPACE}\""),
            None => String::new(),
        };
        let mut out = format!("<{p}{ELEMENT}{decl}>");
        let mut field = |name: &str, value: &str| {
            out.push_str(&format!(
                "{nl}{indent}{step}<{p}{name}>{}</{p}{name}>",
                escape(value)
            ));
        };
        field("cloud", self.cloud.as_str());
        field("pool", &self.pool.to_string_lossy());
        field("owner", self.owner.as_str());
        field("generation", &self.generation.to_string());
        if let Some(file) = &self.pool_file {
            field("pool-file", file);
        }
        out.push_str(&format!("{nl}{indent}</{p}{ELEMENT}>"));
        out
    }

    /// The pool file's name: `pool_file` when set, otherwise the default name for this
    /// generation (see [`pool::pool_file_name`]).
    pub fn pool_file_name(&self, uuid: &DomainUuid) -> String {
        match &self.pool_file {
            Some(name) => name.clone(),
            None => pool::pool_file_name(uuid, self.generation),
        }
    }

    /// The pool file's path: [`Self::pool_file_name`] inside `pool`.
    pub fn pool_file_path(&self, uuid: &DomainUuid) -> PathBuf {
        self.pool.join(self.pool_file_name(uuid))
    }

    /// The record after the domain is handed to `new_owner` (a migration's destination):
    /// the same record with that owner and the generation bumped. The one place the
    /// generation moves: the source's persistent definition for the destination and its
    /// owner record after the hand-over, and the destination's incoming XML all use it.
    pub fn handed_to(&self, new_owner: HostId) -> Result<Self, MetadataError> {
        Ok(Self {
            owner: new_owner,
            generation: self
                .generation
                .checked_add(1)
                .ok_or(MetadataError::GenerationOverflow)?,
            ..self.clone()
        })
    }
}

/// The one element in VMBeam's namespace inside a domain's `<metadata>`, if any. libvirt
/// keeps one element per namespace (`virDomainSetMetadata` replaces it), so a second one
/// was written by hand and is refused.
fn our_element(root: &Element) -> Result<Option<&Element>, MetadataError> {
    if !root.is(None, "domain") {
        return Err(MetadataError::NotADomain(root.local.clone()));
    }
    let mut ours = root
        .children_named(None, "metadata")
        .flat_map(|m| m.elements())
        .filter(|e| e.ns.as_deref() == Some(NAMESPACE));
    let first = ours.next();
    if ours.next().is_some() {
        return Err(MetadataError::Duplicate);
    }
    Ok(first)
}

/// `el` (which must be `<expected>` in our namespace or none) normalised to its bare form:
/// children in our namespace or none, text only, trimmed and escaped; children in other
/// namespaces dropped. Serde then maps it onto a struct: missing and duplicated fields are
/// its errors.
fn bare_form(el: &Element, expected: &'static str) -> Result<String, MetadataError> {
    match el.ns.as_deref() {
        None | Some(NAMESPACE) => {}
        Some(other) => {
            return Err(MetadataError::ForeignElement {
                ns: other.to_owned(),
                local: el.local.clone(),
            })
        }
    }
    if el.local != expected {
        return Err(MetadataError::WrongElement {
            expected,
            found: el.local.clone(),
        });
    }
    let mut bare = format!("<{expected}>");
    for node in &el.children {
        match node {
            Node::Text(t) if t.trim().is_empty() => {}
            Node::Text(_) => return Err(MetadataError::UnexpectedText(expected)),
            Node::Element(child) => {
                if !matches!(child.ns.as_deref(), None | Some(NAMESPACE)) {
                    continue;
                }
                if child.elements().next().is_some() {
                    return Err(MetadataError::NestedElement(child.local.clone()));
                }
                bare.push_str(&format!(
                    "<{0}>{1}</{0}>",
                    child.local,
                    escape(child.text().trim())
                ));
            }
        }
    }
    bare.push_str(&format!("</{expected}>"));
    Ok(bare)
}

/// The local name of a cloud VM's metadata element.
pub const CLOUD_VM_ELEMENT: &str = "cloud-vm";

/// VMBeam's element in a *cloud VM's* domain XML, in the primary cloud's libvirt (where
/// `vmbeam-host` reads it): the virtual IaaS cloud the cloud VM belongs to. A domain
/// without it is not VMBeam's business there.
///
/// ```xml
/// <metadata>
///   <vmbeam:cloud-vm xmlns:vmbeam="https://vmbeam.dev/xmlns/vmbeam/1">
///     <vmbeam:cloud>acme-virtual-iaas</vmbeam:cloud>
///   </vmbeam:cloud-vm>
/// </metadata>
/// ```
///
/// Unlike [`BeamMetadata`], which a guest's administrator can edit, this element is written
/// by the primary cloud's operator into the cloud VM's definition; the cloud VM itself never
/// sees or changes it, so the cloud it names is trusted for the shares between cloud VMs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CloudVmMetadata {
    /// The virtual IaaS cloud the cloud VM belongs to.
    pub cloud: CloudId,
}

/// The serde shape of the bare `<cloud-vm>` element.
#[derive(Deserialize)]
struct RawCloudVm {
    cloud: String,
}

impl CloudVmMetadata {
    /// Parses the bare element (`<cloud-vm><cloud>…</cloud></cloud-vm>`, as
    /// `virDomainGetMetadata` returns it) or the namespaced form with any prefix.
    pub fn parse_metadata_element(xml: &str) -> Result<Self, MetadataError> {
        let root = xml::parse(xml)?;
        Self::from_element(&root)
    }

    /// Finds and parses the element in a full domain XML: `Ok(None)` when the domain
    /// carries no element in [`NAMESPACE`] or a guest's [`BeamMetadata`] instead.
    pub fn from_domain_xml(domain_xml: &str) -> Result<Option<Self>, MetadataError> {
        let root = xml::parse(domain_xml)?;
        Self::from_domain_root(&root)
    }

    /// [`Self::from_domain_xml`] on an already parsed domain.
    pub fn from_domain_root(root: &Element) -> Result<Option<Self>, MetadataError> {
        match our_element(root)? {
            Some(el) if el.local == ELEMENT => Ok(None),
            Some(el) => Self::from_element(el).map(Some),
            None => Ok(None),
        }
    }

    fn from_element(el: &Element) -> Result<Self, MetadataError> {
        let bare = bare_form(el, CLOUD_VM_ELEMENT)?;
        let raw: RawCloudVm = quick_xml::de::from_str(&bare).map_err(MetadataError::Shape)?;
        let cloud = CloudId::new(raw.cloud.trim()).map_err(|source| MetadataError::BadId {
            field: "cloud",
            source,
        })?;
        Ok(Self { cloud })
    }

    /// The bare element for `virDomainSetMetadata(VIR_DOMAIN_METADATA_ELEMENT, xml,
    /// PREFIX, NAMESPACE)`.
    pub fn to_element_xml(&self) -> String {
        format!(
            "<{CLOUD_VM_ELEMENT}><cloud>{}</cloud></{CLOUD_VM_ELEMENT}>",
            escape(self.cloud.as_str())
        )
    }

    /// The element with its namespace declaration, for a domain XML's `<metadata>`.
    pub fn to_namespaced_xml(&self) -> String {
        format!(
            "<{PREFIX}:{CLOUD_VM_ELEMENT} xmlns:{PREFIX}=\"{NAMESPACE}\"><{PREFIX}:cloud>{}</{PREFIX}:cloud></{PREFIX}:{CLOUD_VM_ELEMENT}>",
            escape(self.cloud.as_str())
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A test case's expectation on the error.
    type Check = fn(&MetadataError) -> bool;

    const UUID: &str = "6e3b1e9a-1b2c-4d5e-8f90-0123456789ab";

    fn sample() -> BeamMetadata {
        BeamMetadata {
            cloud: CloudId::new("acme-virtual-iaas").unwrap(),
            pool: PathBuf::from("/var/lib/vmbeam/pool"),
            owner: HostId::new("cvm1").unwrap(),
            generation: 3,
            pool_file: Some(format!("{UUID}.2.ram")),
        }
    }

    /// What libvirt's virDomainGetMetadata(ELEMENT) returns: namespace stripped.
    const LIBVIRT_BARE: &str = "<beam>\n  <cloud>acme-virtual-iaas</cloud>\n  <pool>/var/lib/vmbeam/pool</pool>\n  <owner>cvm1</owner>\n  <generation>3</generation>\n  <pool-file>6e3b1e9a-1b2c-4d5e-8f90-0123456789ab.2.ram</pool-file>\n</beam>\n";

    #[test]
    fn parses_libvirt_bare_form() {
        assert_eq!(
            BeamMetadata::parse_metadata_element(LIBVIRT_BARE).unwrap(),
            sample()
        );
    }

    #[test]
    fn parses_namespaced_forms_with_any_prefix() {
        let prefixed = r#"<vmbeam:beam xmlns:vmbeam="https://vmbeam.dev/xmlns/vmbeam/1">
              <vmbeam:cloud>acme-virtual-iaas</vmbeam:cloud>
              <vmbeam:pool>/var/lib/vmbeam/pool</vmbeam:pool>
              <vmbeam:owner> cvm1 </vmbeam:owner>
              <vmbeam:generation>3</vmbeam:generation>
              <vmbeam:pool-file>6e3b1e9a-1b2c-4d5e-8f90-0123456789ab.2.ram</vmbeam:pool-file>
            </vmbeam:beam>"#;
        assert_eq!(
            BeamMetadata::parse_metadata_element(prefixed).unwrap(),
            sample()
        );
        let other_prefix = prefixed
            .replace("vmbeam:", "vb:")
            .replace("xmlns:vmbeam", "xmlns:vb");
        assert_eq!(
            BeamMetadata::parse_metadata_element(&other_prefix).unwrap(),
            sample()
        );
        let default_ns = r#"<beam xmlns="https://vmbeam.dev/xmlns/vmbeam/1"><cloud>acme-virtual-iaas</cloud><pool>/var/lib/vmbeam/pool</pool><owner>cvm1</owner><generation>3</generation><pool-file>6e3b1e9a-1b2c-4d5e-8f90-0123456789ab.2.ram</pool-file></beam>"#;
        assert_eq!(
            BeamMetadata::parse_metadata_element(default_ns).unwrap(),
            sample()
        );
    }

    #[test]
    fn round_trips_both_forms() {
        let m = sample();
        assert_eq!(
            BeamMetadata::parse_metadata_element(&m.to_element_xml()).unwrap(),
            m
        );
        assert_eq!(
            BeamMetadata::parse_metadata_element(&m.to_namespaced_xml()).unwrap(),
            m
        );
        let no_file = BeamMetadata {
            pool_file: None,
            ..m
        };
        let xml = no_file.to_element_xml();
        assert!(!xml.contains("pool-file"));
        assert!(!xml.contains("xmlns"));
        assert_eq!(BeamMetadata::parse_metadata_element(&xml).unwrap(), no_file);
    }

    #[test]
    fn escapes_values() {
        let m = BeamMetadata {
            pool: PathBuf::from("/pool/a&b<c>"),
            ..sample()
        };
        let xml = m.to_namespaced_xml();
        assert!(xml.contains("/pool/a&amp;b&lt;c&gt;"));
        assert_eq!(BeamMetadata::parse_metadata_element(&xml).unwrap(), m);
    }

    #[test]
    fn ignores_foreign_children_and_unknown_fields() {
        let xml = r#"<beam xmlns:x="urn:other"><cloud>acme-virtual-iaas</cloud><x:cloud>evil</x:cloud><pool>/var/lib/vmbeam/pool</pool><owner>cvm1</owner><generation>3</generation><future-field>1</future-field></beam>"#;
        let m = BeamMetadata::parse_metadata_element(xml).unwrap();
        assert_eq!(m.cloud.as_str(), "acme-virtual-iaas");
        assert_eq!(m.pool_file, None);
    }

    #[test]
    fn rejects_bad_elements() {
        let cases: &[(&str, Check)] = &[
            ("<beam>", |e| matches!(e, MetadataError::Xml(_))),
            ("<x:beam xmlns:x='urn:other'/>", |e| {
                matches!(e, MetadataError::ForeignElement { .. })
            }),
            ("<bean/>", |e| {
                matches!(e, MetadataError::WrongElement { expected: "beam", found } if found == "bean")
            }),
            ("<beam><cloud>a</cloud></beam>", |e| {
                matches!(e, MetadataError::Shape(_))
            }),
            (
                "<beam><cloud>a</cloud><cloud>b</cloud><pool>/p</pool><owner>o</owner><generation>1</generation></beam>",
                |e| matches!(e, MetadataError::Shape(_)),
            ),
            (
                "<beam><cloud><b>a</b></cloud><pool>/p</pool><owner>o</owner><generation>1</generation></beam>",
                |e| matches!(e, MetadataError::NestedElement(n) if n == "cloud"),
            ),
            (
                "<beam>hello<cloud>a</cloud><pool>/p</pool><owner>o</owner><generation>1</generation></beam>",
                |e| matches!(e, MetadataError::UnexpectedText("beam")),
            ),
            (
                "<beam><cloud>a b</cloud><pool>/p</pool><owner>o</owner><generation>1</generation></beam>",
                |e| matches!(e, MetadataError::BadId { field: "cloud", .. }),
            ),
            (
                "<beam><cloud>a</cloud><pool>/p</pool><owner>../x</owner><generation>1</generation></beam>",
                |e| matches!(e, MetadataError::BadId { field: "owner", .. }),
            ),
            (
                "<beam><cloud>a</cloud><pool>relative</pool><owner>o</owner><generation>1</generation></beam>",
                |e| matches!(e, MetadataError::BadValue { field: "pool", .. }),
            ),
            (
                "<beam><cloud>a</cloud><pool>/p</pool><owner>o</owner><generation>-1</generation></beam>",
                |e| matches!(e, MetadataError::BadValue { field: "generation", .. }),
            ),
            (
                "<beam><cloud>a</cloud><pool>/p</pool><owner>o</owner><generation>99999999999999999999999</generation></beam>",
                |e| matches!(e, MetadataError::BadValue { field: "generation", .. }),
            ),
            (
                "<beam><cloud>a</cloud><pool>/p</pool><owner>o</owner><generation>1</generation><pool-file>../../etc/shadow</pool-file></beam>",
                |e| matches!(e, MetadataError::BadValue { field: "pool-file", .. }),
            ),
        ];
        for (xml, check) in cases {
            let err = BeamMetadata::parse_metadata_element(xml).unwrap_err();
            assert!(check(&err), "{xml}: {err:?}");
            // Messages are sentences, never empty.
            assert!(!err.to_string().is_empty());
        }
    }

    const DOMAIN: &str = r#"<domain type='kvm' id='4'>
  <name>web1</name>
  <uuid>6e3b1e9a-1b2c-4d5e-8f90-0123456789ab</uuid>
  <metadata>
    <libosinfo:libosinfo xmlns:libosinfo="http://libosinfo.org/xmlns/libvirt/domain/1.0">
      <libosinfo:os id="http://debian.org/debian/12"/>
    </libosinfo:libosinfo>
    <nova:instance xmlns:nova="http://openstack.org/xmlns/libvirt/nova/1.1">
      <nova:owner><nova:user uuid="u">admin</nova:user></nova:owner>
    </nova:instance>
    VMBEAM
  </metadata>
  <memory unit='KiB'>1048576</memory>
</domain>"#;

    #[test]
    fn finds_element_in_domain_xml() {
        let with = DOMAIN.replace("VMBEAM", &sample().to_namespaced_xml());
        assert_eq!(
            BeamMetadata::from_domain_xml(&with).unwrap(),
            Some(sample())
        );
        let without = DOMAIN.replace("VMBEAM", "");
        assert_eq!(BeamMetadata::from_domain_xml(&without).unwrap(), None);
        let no_metadata = "<domain type='kvm'><name>a</name></domain>";
        assert_eq!(BeamMetadata::from_domain_xml(no_metadata).unwrap(), None);
    }

    #[test]
    fn bare_beam_in_domain_metadata_is_not_ours() {
        // Without our namespace it is someone else's (or nobody's) element.
        let with = DOMAIN.replace("VMBEAM", &sample().to_element_xml());
        assert_eq!(BeamMetadata::from_domain_xml(&with).unwrap(), None);
    }

    #[test]
    fn domain_errors() {
        let malformed = DOMAIN.replace(
            "VMBEAM",
            "<vmbeam:beam xmlns:vmbeam='https://vmbeam.dev/xmlns/vmbeam/1'><vmbeam:cloud>x</vmbeam:cloud></vmbeam:beam>",
        );
        assert!(matches!(
            BeamMetadata::from_domain_xml(&malformed),
            Err(MetadataError::Shape(_))
        ));
        let twice = DOMAIN.replace(
            "VMBEAM",
            &format!(
                "{}{}",
                sample().to_namespaced_xml(),
                sample().to_namespaced_xml()
            ),
        );
        assert!(matches!(
            BeamMetadata::from_domain_xml(&twice),
            Err(MetadataError::Duplicate)
        ));
        assert!(matches!(
            BeamMetadata::from_domain_xml("<network><name>x</name></network>"),
            Err(MetadataError::NotADomain(n)) if n == "network"
        ));
        assert!(matches!(
            BeamMetadata::from_domain_xml("<domain>"),
            Err(MetadataError::Xml(_))
        ));
    }

    fn acme() -> CloudVmMetadata {
        CloudVmMetadata {
            cloud: CloudId::new("acme-virtual-iaas").unwrap(),
        }
    }

    #[test]
    fn cloud_vm_element_parses_in_every_form_and_round_trips() {
        let bare = "<cloud-vm>\n  <cloud> acme-virtual-iaas </cloud>\n</cloud-vm>\n";
        assert_eq!(
            CloudVmMetadata::parse_metadata_element(bare).unwrap(),
            acme()
        );
        let prefixed = r#"<vb:cloud-vm xmlns:vb="https://vmbeam.dev/xmlns/vmbeam/1" xmlns:x="urn:x"><vb:cloud>acme-virtual-iaas</vb:cloud><x:cloud>evil</x:cloud><vb:future/></vb:cloud-vm>"#;
        assert_eq!(
            CloudVmMetadata::parse_metadata_element(prefixed).unwrap(),
            acme()
        );
        let m = acme();
        assert_eq!(
            CloudVmMetadata::parse_metadata_element(&m.to_element_xml()).unwrap(),
            m
        );
        assert_eq!(
            CloudVmMetadata::parse_metadata_element(&m.to_namespaced_xml()).unwrap(),
            m
        );
        assert_eq!(
            m.to_namespaced_xml(),
            r#"<vmbeam:cloud-vm xmlns:vmbeam="https://vmbeam.dev/xmlns/vmbeam/1"><vmbeam:cloud>acme-virtual-iaas</vmbeam:cloud></vmbeam:cloud-vm>"#
        );
    }

    #[test]
    fn cloud_vm_element_errors() {
        let cases: Vec<(&str, Check)> = vec![
            ("<cloud-vm/>", |e| matches!(e, MetadataError::Shape(_))),
            (
                "<cloud-vm><cloud>a</cloud><cloud>b</cloud></cloud-vm>",
                |e| matches!(e, MetadataError::Shape(_)),
            ),
            ("<cloud-vm><cloud>../x</cloud></cloud-vm>", |e| {
                matches!(e, MetadataError::BadId { field: "cloud", .. })
            }),
            ("<cloud-vm>text<cloud>a</cloud></cloud-vm>", |e| {
                matches!(e, MetadataError::UnexpectedText("cloud-vm"))
            }),
            (
                "<cloud-vm><cloud><b/></cloud></cloud-vm>",
                |e| matches!(e, MetadataError::NestedElement(n) if n == "cloud"),
            ),
            (
                "<beam><cloud>a</cloud></beam>",
                |e| matches!(e, MetadataError::WrongElement { expected: "cloud-vm", found } if found == "beam"),
            ),
            (
                "<x:cloud-vm xmlns:x='urn:x'><x:cloud>a</x:cloud></x:cloud-vm>",
                |e| matches!(e, MetadataError::ForeignElement { .. }),
            ),
        ];
        for (xml, check) in cases {
            let err = CloudVmMetadata::parse_metadata_element(xml).unwrap_err();
            assert!(check(&err), "{xml}: {err:?}");
        }
    }

    #[test]
    fn a_domain_is_a_guest_or_a_cloud_vm_never_both() {
        let cloud_vm = DOMAIN.replace("VMBEAM", &acme().to_namespaced_xml());
        assert_eq!(
            CloudVmMetadata::from_domain_xml(&cloud_vm).unwrap(),
            Some(acme())
        );
        assert_eq!(BeamMetadata::from_domain_xml(&cloud_vm).unwrap(), None);
        let guest = DOMAIN.replace("VMBEAM", &sample().to_namespaced_xml());
        assert_eq!(CloudVmMetadata::from_domain_xml(&guest).unwrap(), None);
        let neither = DOMAIN.replace("VMBEAM", "");
        assert_eq!(CloudVmMetadata::from_domain_xml(&neither).unwrap(), None);
        let both = DOMAIN.replace(
            "VMBEAM",
            &format!(
                "{}{}",
                acme().to_namespaced_xml(),
                sample().to_namespaced_xml()
            ),
        );
        assert!(matches!(
            CloudVmMetadata::from_domain_xml(&both),
            Err(MetadataError::Duplicate)
        ));
        assert!(matches!(
            BeamMetadata::from_domain_xml(&both),
            Err(MetadataError::Duplicate)
        ));
        let broken = DOMAIN.replace(
            "VMBEAM",
            "<vmbeam:cloud-vm xmlns:vmbeam='https://vmbeam.dev/xmlns/vmbeam/1'/>",
        );
        assert!(matches!(
            CloudVmMetadata::from_domain_xml(&broken),
            Err(MetadataError::Shape(_))
        ));
    }

    #[test]
    fn handed_to_bumps_the_generation_once() {
        let m = sample();
        let cvm2 = HostId::new("cvm2").unwrap();
        let h = m.handed_to(cvm2.clone()).unwrap();
        assert_eq!(h.generation, m.generation + 1);
        assert_eq!(h.owner, cvm2);
        assert_eq!(
            (&h.cloud, &h.pool, &h.pool_file),
            (&m.cloud, &m.pool, &m.pool_file)
        );
        assert_eq!(
            h.handed_to(m.owner.clone()).unwrap().generation,
            m.generation + 2
        );
        let max = BeamMetadata {
            generation: u64::MAX,
            ..sample()
        };
        assert!(matches!(
            max.handed_to(cvm2),
            Err(MetadataError::GenerationOverflow)
        ));
    }
}

#[cfg(test)]
mod prop_tests {
    use std::path::Path;

    use proptest::prelude::*;

    use super::*;
    use crate::domain::tests::RUNNING;
    use crate::proptest_support::{mutate_text, proptest_config};

    prop_compose! {
        fn metadata()(
            cloud in "[a-zA-Z0-9][a-zA-Z0-9._-]{0,30}",
            owner in "[a-zA-Z0-9][a-zA-Z0-9._-]{0,30}",
            pool in "(/[a-zA-Z0-9 _.<>&'\"-]{0,12}[a-zA-Z0-9_.<>&'\"-]){1,4}",
            generation in any::<u64>(),
            pool_file in proptest::option::of("[a-zA-Z0-9_.<>&'\"-][a-zA-Z0-9 _.<>&'\"-]{0,40}[a-zA-Z0-9_<>&'\"-]"),
        ) -> BeamMetadata {
            BeamMetadata {
                cloud: CloudId::new(cloud).unwrap(),
                pool: PathBuf::from(pool),
                owner: HostId::new(owner).unwrap(),
                generation,
                pool_file,
            }
        }
    }

    fn enabled(m: &BeamMetadata) -> String {
        crate::transform::enable(RUNNING, m, Path::new("/run/vmbeam/qmp"))
            .unwrap()
            .xml
    }

    proptest! {
        #![proptest_config(proptest_config())]

        #[test]
        fn prop_metadata_arbitrary_text_never_panics(s in any::<String>()) {
            let _ = BeamMetadata::from_domain_xml(&s);
            let _ = BeamMetadata::parse_metadata_element(&s);
        }

        #[test]
        fn prop_metadata_xmlish_text_never_panics(s in "[<>/=a-z:'\" \n&;!?-]{0,200}") {
            let _ = BeamMetadata::from_domain_xml(&s);
            let _ = BeamMetadata::parse_metadata_element(&s);
        }

        #[test]
        fn prop_metadata_element_round_trip(m in metadata()) {
            prop_assert_eq!(BeamMetadata::parse_metadata_element(&m.to_element_xml()).unwrap(), m.clone());
            prop_assert_eq!(BeamMetadata::parse_metadata_element(&m.to_namespaced_xml()).unwrap(), m.clone());
            prop_assert_eq!(BeamMetadata::parse_metadata_element(&m.write_xml(None, None)).unwrap(), m);
        }

        #[test]
        fn prop_metadata_domain_round_trip(m in metadata()) {
            prop_assert_eq!(BeamMetadata::from_domain_xml(&enabled(&m)).unwrap(), Some(m));
        }

        #[test]
        fn prop_cloud_vm_metadata_arbitrary_text_never_panics(s in "[<>/=a-z:'\" \n&;!?-]{0,200}") {
            let _ = CloudVmMetadata::from_domain_xml(&s);
            let _ = CloudVmMetadata::parse_metadata_element(&s);
        }

        #[test]
        fn prop_cloud_vm_metadata_round_trip(cloud in "[a-zA-Z0-9][a-zA-Z0-9._-]{0,127}") {
            let m = CloudVmMetadata { cloud: CloudId::new(cloud).unwrap() };
            prop_assert_eq!(CloudVmMetadata::parse_metadata_element(&m.to_element_xml()).unwrap(), m.clone());
            prop_assert_eq!(CloudVmMetadata::parse_metadata_element(&m.to_namespaced_xml()).unwrap(), m);
        }

        #[test]
        fn prop_metadata_mutated_domain_never_panics(
            m in metadata(),
            mode in any::<u8>(),
            pos in any::<prop::sample::Index>(),
            b in any::<u8>(),
        ) {
            let xml = mutate_text(&enabled(&m), mode, pos, b);
            if let Ok(Some(parsed)) = BeamMetadata::from_domain_xml(&xml) {
                // Whatever parses is consistent: it writes back to itself.
                prop_assert_eq!(
                    BeamMetadata::parse_metadata_element(&parsed.to_element_xml()).unwrap(),
                    parsed
                );
            }
        }
    }
}
