//! What VMBeam reads from libvirt's host capabilities XML (`virConnectGetCapabilities`,
//! `virsh capabilities`): the libvirt host UUID, which names a cloud VM's libvirt in the
//! co-location rendezvous (requests are addressed to it).

use crate::xml::{self, XmlError};

/// Why the capabilities XML did not give a host UUID.
#[derive(Debug, thiserror::Error)]
pub enum CapabilitiesError {
    /// The input is not well-formed XML.
    #[error("malformed capabilities XML")]
    Xml(#[from] XmlError),
    /// Another document than libvirt's capabilities.
    #[error("root element is <{0}>, not <capabilities>")]
    NotCapabilities(String),
    /// No `<host><uuid>`, or an empty one.
    #[error("capabilities without a host UUID")]
    NoHostUuid,
}

/// The libvirt host UUID in a capabilities XML (`<capabilities><host><uuid>`), trimmed and
/// lowercase.
pub fn host_uuid(capabilities_xml: &str) -> Result<String, CapabilitiesError> {
    let root = xml::parse(capabilities_xml)?;
    if !root.is(None, "capabilities") {
        return Err(CapabilitiesError::NotCapabilities(root.local.clone()));
    }
    let uuid = root
        .child(None, "host")
        .and_then(|host| host.child(None, "uuid"))
        .map(|uuid| uuid.text().trim().to_ascii_lowercase())
        .unwrap_or_default();
    if uuid.is_empty() {
        return Err(CapabilitiesError::NoHostUuid);
    }
    Ok(uuid)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Abridged from libvirt 11.3's `virsh capabilities` (a guest's `<uuid>`-like elements
    /// and the security model's labels come after the host's).
    const CAPS: &str = r#"<capabilities>

  <host>
    <uuid>5F0C2B5E-1A2B-4C3D-8E4F-00000000000A</uuid>
    <cpu>
      <arch>x86_64</arch>
      <model>qemu64</model>
      <topology sockets='1' dies='1' clusters='1' cores='2' threads='1'/>
    </cpu>
    <migration_features>
      <live/>
      <uri_transports>
        <uri_transport>tcp</uri_transport>
        <uri_transport>rdma</uri_transport>
      </uri_transports>
    </migration_features>
    <secmodel>
      <model>none</model>
      <doi>0</doi>
    </secmodel>
  </host>

  <guest>
    <os_type>hvm</os_type>
    <arch name='x86_64'>
      <wordsize>64</wordsize>
      <emulator>/usr/bin/qemu-system-x86_64</emulator>
      <machine maxCpus='255'>pc-i440fx-10.0</machine>
      <domain type='qemu'/>
    </arch>
  </guest>

</capabilities>
"#;

    #[test]
    fn reads_the_host_uuid() {
        assert_eq!(
            host_uuid(CAPS).unwrap(),
            "5f0c2b5e-1a2b-4c3d-8e4f-00000000000a"
        );
    }

    #[test]
    fn only_the_hosts_uuid_counts() {
        // A <uuid> elsewhere (before the host's, or in a comment) is not the host's.
        let caps = "<capabilities><!-- <uuid>nope</uuid> --><guest><uuid>guest</uuid></guest>\
                    <host><uuid> abc </uuid></host></capabilities>";
        assert_eq!(host_uuid(caps).unwrap(), "abc");
        for missing in [
            "<capabilities><host/></capabilities>",
            "<capabilities><host><uuid>  </uuid></host></capabilities>",
            "<capabilities><guest><uuid>x</uuid></guest></capabilities>",
        ] {
            assert!(
                matches!(host_uuid(missing), Err(CapabilitiesError::NoHostUuid)),
                "{missing}"
            );
        }
    }

    #[test]
    fn refuses_other_documents() {
        assert!(matches!(
            host_uuid("<domain><uuid>x</uuid></domain>"),
            Err(CapabilitiesError::NotCapabilities(r)) if r == "domain"
        ));
        assert!(matches!(
            host_uuid("<capabilities><host><uuid>x</host>"),
            Err(CapabilitiesError::Xml(_))
        ));
        assert!(matches!(host_uuid(""), Err(CapabilitiesError::Xml(_))));
    }
}
