//! How a ticket travels: as one element in the domain XML's `<metadata>`, in a namespace of
//! its own (libvirt keeps one metadata element per namespace), inside the XML the source
//! hands to `migrateToURI3` (`VIR_MIGRATE_PARAM_DEST_XML`). The destination's hook takes it
//! out again at `migrate begin`, so it never reaches a persistent definition.
//!
//! A zero-copy migration through the host-device pool carries a second element beside the
//! ticket, the signed device share (`crate::device_share`), in its own namespace, travelling
//! and taken out the same way.

use quick_xml::events::Event;
use quick_xml::name::ResolveResult;
use quick_xml::NsReader;

/// Namespace of the ticket element.
pub const TICKET_NAMESPACE: &str = "https://vmbeam.dev/xmlns/vmbeam-ticket/1";
/// Namespace of the device share element (the host-device pool's part of a ticket).
pub const DEVICE_SHARE_NAMESPACE: &str = "https://vmbeam.dev/xmlns/vmbeam-device-share/1";

/// The ticket element could not be placed or read.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum CarrierError {
    /// The domain XML has no `<metadata>` element (beam-enabled domains always have one).
    #[error("the domain XML has no <metadata> element")]
    NoMetadata,
    /// The domain XML is malformed.
    #[error("malformed domain XML: {0}")]
    Malformed(String),
    /// More than one ticket element.
    #[error("the domain XML carries more than one VMBeam ticket")]
    Duplicate,
    /// More than one device share element.
    #[error("the domain XML carries more than one VMBeam device share")]
    DuplicateDeviceShare,
}

/// One of VMBeam's carried elements: its namespace, how it is written, and the error for
/// two of them.
struct Element {
    ns: &'static str,
    prefix: &'static str,
    local: &'static str,
    duplicate: CarrierError,
}

const TICKET: Element = Element {
    ns: TICKET_NAMESPACE,
    prefix: "vmbeamt",
    local: "ticket",
    duplicate: CarrierError::Duplicate,
};

const DEVICE_SHARE: Element = Element {
    ns: DEVICE_SHARE_NAMESPACE,
    prefix: "vmbeamds",
    local: "device-share",
    duplicate: CarrierError::DuplicateDeviceShare,
};

/// Returns `domain_xml` with `share` (an encoded device share) added to its `<metadata>`
/// (replacing one already there).
pub fn insert_device_share(domain_xml: &str, share: &str) -> Result<String, CarrierError> {
    insert(&DEVICE_SHARE, domain_xml, share)
}

/// Splits a domain XML into (the XML without the device share element, its text if any).
pub fn extract_device_share(domain_xml: &str) -> Result<(String, Option<String>), CarrierError> {
    extract(&DEVICE_SHARE, domain_xml)
}

/// Returns `domain_xml` with `ticket` (an encoded ticket) added to its `<metadata>`.
pub fn insert_ticket(domain_xml: &str, ticket: &str) -> Result<String, CarrierError> {
    insert(&TICKET, domain_xml, ticket)
}

fn insert(el: &Element, domain_xml: &str, text: &str) -> Result<String, CarrierError> {
    let (without, _) = extract(el, domain_xml)?;
    let pos = without
        .rfind("</metadata>")
        .ok_or(CarrierError::NoMetadata)?;
    let Element {
        ns, prefix, local, ..
    } = el;
    let elem = format!("  <{prefix}:{local} xmlns:{prefix}=\"{ns}\">{text}</{prefix}:{local}>\n  ");
    let mut out = String::with_capacity(without.len() + elem.len());
    out.push_str(&without[..pos]);
    out.push_str(&elem);
    out.push_str(&without[pos..]);
    Ok(out)
}

/// Splits a domain XML into (the XML without our ticket element, the ticket text if any).
/// Matching is by namespace URI, whatever the prefix.
pub fn extract_ticket(domain_xml: &str) -> Result<(String, Option<String>), CarrierError> {
    extract(&TICKET, domain_xml)
}

fn extract(el: &Element, domain_xml: &str) -> Result<(String, Option<String>), CarrierError> {
    let mut reader = NsReader::from_str(domain_xml);
    let mut found: Option<(usize, usize, String)> = None;
    let mut depth_in_ticket = 0usize;
    let mut start = 0usize;
    let mut text = String::new();
    loop {
        let before = reader.buffer_position() as usize;
        let (res, ev) = reader
            .read_resolved_event()
            .map_err(|e| CarrierError::Malformed(e.to_string()))?;
        let ours = matches!(res, ResolveResult::Bound(ns) if ns.as_ref() == el.ns.as_bytes());
        match ev {
            Event::Start(_) if depth_in_ticket > 0 => depth_in_ticket += 1,
            Event::Start(_) if ours => {
                if found.is_some() {
                    return Err(el.duplicate.clone());
                }
                depth_in_ticket = 1;
                start = before;
                text.clear();
            }
            Event::Empty(_) if ours && depth_in_ticket == 0 => {
                if found.is_some() {
                    return Err(el.duplicate.clone());
                }
                found = Some((before, reader.buffer_position() as usize, String::new()));
            }
            Event::Text(t) if depth_in_ticket == 1 => {
                let t = t
                    .unescape()
                    .map_err(|e| CarrierError::Malformed(e.to_string()))?;
                text.push_str(&t);
            }
            Event::End(_) if depth_in_ticket > 0 => {
                depth_in_ticket -= 1;
                if depth_in_ticket == 0 {
                    found = Some((
                        start,
                        reader.buffer_position() as usize,
                        text.trim().to_string(),
                    ));
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    match found {
        None => Ok((domain_xml.to_string(), None)),
        Some((s, e, t)) => {
            // Drop the indentation and newline that `insert_ticket` added around it.
            let line_start = domain_xml[..s].trim_end_matches([' ', '\t']).len();
            let mut end = e;
            let rest = &domain_xml[e..];
            let trimmed = rest.trim_start_matches([' ', '\t']);
            if trimmed.starts_with('\n') {
                end = e + (rest.len() - trimmed.len()) + 1;
            }
            let s = if domain_xml[..line_start].ends_with('\n') {
                line_start
            } else {
                s
            };
            let mut out = String::with_capacity(domain_xml.len());
            out.push_str(&domain_xml[..s]);
            out.push_str(&domain_xml[end..]);
            Ok((out, Some(t)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const XML: &str = "<domain type='qemu'>\n  <name>g</name>\n  <metadata>\n    <vmbeam:beam xmlns:vmbeam=\"https://vmbeam.dev/xmlns/vmbeam/1\"><vmbeam:cloud>c</vmbeam:cloud></vmbeam:beam>\n  </metadata>\n</domain>\n";

    #[test]
    fn insert_then_extract_round_trips() {
        let with = insert_ticket(XML, "vmbt1.abc").unwrap();
        assert!(with.contains("vmbt1.abc"));
        let (without, t) = extract_ticket(&with).unwrap();
        assert_eq!(t.as_deref(), Some("vmbt1.abc"));
        assert_eq!(without, XML);
    }

    #[test]
    fn any_prefix_matches_and_other_namespaces_do_not() {
        let x = XML.replace(
            "</metadata>",
            &format!("<t:ticket xmlns:t='{TICKET_NAMESPACE}'>T1</t:ticket><o:ticket xmlns:o='urn:other'>X</o:ticket></metadata>"),
        );
        let (without, t) = extract_ticket(&x).unwrap();
        assert_eq!(t.as_deref(), Some("T1"));
        assert!(without.contains("urn:other") && !without.contains("T1"));
    }

    #[test]
    fn errors_are_clear() {
        assert_eq!(
            insert_ticket("<domain/>", "x"),
            Err(CarrierError::NoMetadata)
        );
        let two = insert_ticket(XML, "a").unwrap().replace(
            "</metadata>",
            &format!("<t:ticket xmlns:t='{TICKET_NAMESPACE}'>b</t:ticket></metadata>"),
        );
        assert_eq!(extract_ticket(&two), Err(CarrierError::Duplicate));
        assert!(matches!(
            extract_ticket("<domain><a></domain>"),
            Err(CarrierError::Malformed(_))
        ));
        assert_eq!(extract_ticket(XML).unwrap(), (XML.to_string(), None));
    }

    #[test]
    fn a_device_share_travels_beside_the_ticket_and_each_comes_out_alone() {
        let with = insert_device_share(&insert_ticket(XML, "T").unwrap(), "S1").unwrap();
        let with = insert_device_share(&with, "S2").unwrap();
        let (no_share, share) = extract_device_share(&with).unwrap();
        assert_eq!(share.as_deref(), Some("S2"), "insert replaces");
        assert_eq!(
            extract_ticket(&no_share).unwrap(),
            (XML.to_string(), Some("T".into()))
        );
        let (no_ticket, ticket) = extract_ticket(&with).unwrap();
        assert_eq!(ticket.as_deref(), Some("T"));
        assert_eq!(extract_device_share(&no_ticket).unwrap().0, XML);
        let two = with.replace(
            "</metadata>",
            &format!(
                "<d:device-share xmlns:d='{DEVICE_SHARE_NAMESPACE}'>x</d:device-share></metadata>"
            ),
        );
        assert_eq!(
            extract_device_share(&two),
            Err(CarrierError::DuplicateDeviceShare)
        );
    }

    #[test]
    fn insert_replaces_an_existing_ticket() {
        let once = insert_ticket(XML, "old").unwrap();
        let twice = insert_ticket(&once, "new").unwrap();
        let (_, t) = extract_ticket(&twice).unwrap();
        assert_eq!(t.as_deref(), Some("new"));
    }
}
