//! The destination XML a caller brings (`virsh migrate --xml`, Nova's rewritten guest XML):
//! what in it must stay as the running domain has it for a zero-copy migration. Everything
//! else (interfaces rebuilt for the destination's ports, VNC and serial listen addresses,
//! volume paths) is the caller's and libvirt's business: libvirt checks the guest ABI.

use crate::domain::{DomainError, DomainFacts};
use crate::metadata::{BeamMetadata, MetadataError};

/// Why a destination XML cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum DestinationXmlError {
    /// Not a domain XML VMBeam can read.
    #[error("the destination XML: {0}")]
    Domain(#[from] DomainError),
    /// Its VMBeam metadata does not parse.
    #[error("the destination XML's VMBeam metadata: {0}")]
    Metadata(#[from] MetadataError),
}

/// What differs between the running domain's XML and the destination XML in the ways that
/// matter to a zero-copy migration (the same memory, in the same pool, mapped the same way,
/// and VMBeam's metadata that makes the destination's hooks take the ticket). Empty: the
/// destination XML can carry the ticket.
pub fn zero_copy_differences(
    live_xml: &str,
    dest_xml: &str,
) -> Result<Vec<String>, DestinationXmlError> {
    let live = DomainFacts::from_xml(live_xml)?;
    let dest = DomainFacts::from_xml(dest_xml)?;
    let mut out = Vec::new();
    let mut differ = |what: &str, a: String, b: String| {
        if a != b {
            out.push(format!("{what} is {b} there, {a} here"));
        }
    };
    differ(
        "the domain UUID",
        live.uuid.to_string(),
        dest.uuid.to_string(),
    );
    differ(
        "the domain type",
        live.hypervisor.clone(),
        dest.hypervisor.clone(),
    );
    differ(
        "the memory size (KiB)",
        live.memory_kib.to_string(),
        dest.memory_kib.to_string(),
    );
    let (lb, db) = (&live.memory_backing, &dest.memory_backing);
    differ(
        "the memory backing's source",
        format!("{:?}", lb.effective_source()),
        format!("{:?}", db.effective_source()),
    );
    differ(
        "the memory access mode",
        format!("{:?}", lb.effective_access()),
        format!("{:?}", db.effective_access()),
    );
    differ(
        "the memory allocation mode",
        format!("{:?}", lb.allocation),
        format!("{:?}", db.allocation),
    );
    differ(
        "<discard/> in the memory backing",
        lb.discard.to_string(),
        db.discard.to_string(),
    );
    differ(
        "<hugepages/>",
        lb.hugepages.to_string(),
        db.hugepages.to_string(),
    );
    differ(
        "the number of guest NUMA cells",
        live.numa_cells.to_string(),
        dest.numa_cells.to_string(),
    );
    match (
        BeamMetadata::from_domain_xml(live_xml)?,
        BeamMetadata::from_domain_xml(dest_xml)?,
    ) {
        (Some(l), Some(d)) => {
            differ("VMBeam's cloud", l.cloud.to_string(), d.cloud.to_string());
            differ(
                "VMBeam's pool",
                l.pool.display().to_string(),
                d.pool.display().to_string(),
            );
        }
        (Some(_), None) => out.push("VMBeam's metadata is missing there".into()),
        (None, _) => {}
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIVE: &str = r#"<domain type='qemu' id='3'>
  <name>web1</name>
  <uuid>6e3b1e9a-1b2c-4d5e-8f90-0123456789ab</uuid>
  <memory unit='KiB'>262144</memory>
  <memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>
  <metadata>
    <vmbeam:beam xmlns:vmbeam="https://vmbeam.dev/xmlns/vmbeam/1">
      <vmbeam:cloud>acme</vmbeam:cloud>
      <vmbeam:pool>/var/lib/vmbeam/pool</vmbeam:pool>
      <vmbeam:owner>cvm1</vmbeam:owner>
      <vmbeam:generation>3</vmbeam:generation>
    </vmbeam:beam>
  </metadata>
  <devices>
    <graphics type='vnc' listen='198.18.0.1'/>
    <interface type='bridge'><source bridge='br0'/><target dev='tap1'/></interface>
  </devices>
</domain>"#;

    #[test]
    fn what_nova_rewrites_for_the_destination_does_not_matter() {
        let dest = LIVE
            .replace("listen='198.18.0.1'", "listen='198.18.0.2'")
            .replace(
                "<source bridge='br0'/><target dev='tap1'/>",
                "<source bridge='br-int'/><target dev='tap9'/>",
            )
            .replace(" id='3'", "");
        assert_eq!(
            zero_copy_differences(LIVE, &dest).unwrap(),
            Vec::<String>::new()
        );
    }

    #[test]
    fn every_difference_that_matters_is_named() {
        let cases = [
            (
                "<source type='file'/>",
                "",
                "the memory backing's source is Anonymous there, File here",
            ),
            ("<access mode='shared'/>", "", "access mode"),
            (
                "262144",
                "524288",
                "the memory size (KiB) is 524288 there, 262144 here",
            ),
            (
                "<access mode='shared'/>",
                "<access mode='shared'/><allocation mode='immediate'/><discard/>",
                "allocation mode",
            ),
            (
                "<vmbeam:cloud>acme</vmbeam:cloud>",
                "<vmbeam:cloud>other</vmbeam:cloud>",
                "VMBeam's cloud",
            ),
            ("6e3b1e9a", "7e3b1e9a", "the domain UUID"),
        ];
        for (from, to, named) in cases {
            let dest = LIVE.replace(from, to);
            let d = zero_copy_differences(LIVE, &dest).unwrap();
            assert!(d.iter().any(|x| x.contains(named)), "{from} -> {to}: {d:?}");
        }
        let start = LIVE.find("<metadata>").unwrap();
        let end = LIVE.find("</metadata>").unwrap() + "</metadata>".len();
        let bare = format!("{}{}", &LIVE[..start], &LIVE[end..]);
        assert_eq!(
            zero_copy_differences(LIVE, &bare).unwrap(),
            vec!["VMBeam's metadata is missing there".to_string()]
        );
    }

    #[test]
    fn a_destination_xml_that_does_not_parse_is_an_error() {
        assert!(zero_copy_differences(LIVE, "<domain").is_err());
        assert!(zero_copy_differences(LIVE, "<network/>").is_err());
    }
}
