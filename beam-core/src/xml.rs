//! A small, namespace-aware element tree built with quick-xml's `NsReader`, for the read-only
//! views of domain XML (the rewrite in `transform` streams instead). Public so that other
//! crates reading libvirt XML (`vmbeam-host`'s cloud VMs) share one parser and its limits.
//!
//! Domain XML is small (kilobytes), so a tree keeps the fact extraction simple. Every element
//! carries its resolved namespace URI; prefixes are not kept, so lookups match by URI.

use quick_xml::events::{BytesStart, Event};
use quick_xml::name::ResolveResult;
use quick_xml::NsReader;

/// Deepest element nesting accepted; libvirt domain XML stays under ten levels.
const MAX_DEPTH: usize = 64;

/// Why a document could not be read as XML.
#[derive(Debug, thiserror::Error)]
pub enum XmlError {
    /// quick-xml rejected the input.
    #[error("XML syntax error near byte {position}")]
    Syntax {
        /// Byte offset where the error was detected.
        position: u64,
        /// The parser's error.
        #[source]
        source: quick_xml::Error,
    },
    /// A prefix is used that no `xmlns:` declaration in scope binds.
    #[error("undeclared namespace prefix '{0}'")]
    UnknownPrefix(String),
    /// The document has no element.
    #[error("no root element")]
    NoRoot,
    /// The document has a second top-level element or top-level text.
    #[error("content after the root element")]
    TrailingContent,
    /// The input ended inside an element.
    #[error("unclosed element <{0}>")]
    Unclosed(String),
    /// Nesting deeper than the limit (64 levels).
    #[error("elements nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
}

/// One element: its namespace URI (if any), local name, attributes and children.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element {
    /// The namespace URI the element's name resolves to, `None` when unbound.
    pub ns: Option<String>,
    /// The local part of the name.
    pub local: String,
    /// Attributes as (qualified name, unescaped value), in document order; `xmlns`
    /// declarations included.
    pub attrs: Vec<(String, String)>,
    /// Child nodes in document order (comments and processing instructions dropped).
    pub children: Vec<Node>,
}

/// A child node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    /// A child element.
    Element(Element),
    /// Character data (text or CDATA), unescaped.
    Text(String),
}

impl Element {
    /// True when the element is `local` in namespace `ns` (`None`: no namespace).
    pub fn is(&self, ns: Option<&str>, local: &str) -> bool {
        self.ns.as_deref() == ns && self.local == local
    }

    /// The unprefixed attribute `name`.
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Child elements.
    pub fn elements(&self) -> impl Iterator<Item = &Element> {
        self.children.iter().filter_map(|n| match n {
            Node::Element(e) => Some(e),
            Node::Text(_) => None,
        })
    }

    /// Child elements named `local` in namespace `ns`.
    pub fn children_named<'a>(
        &'a self,
        ns: Option<&'a str>,
        local: &'a str,
    ) -> impl Iterator<Item = &'a Element> + 'a {
        self.elements().filter(move |e| e.is(ns, local))
    }

    /// The first child element named `local` in namespace `ns`.
    pub fn child(&self, ns: Option<&str>, local: &str) -> Option<&Element> {
        self.elements().find(|e| e.is(ns, local))
    }

    /// The concatenated text of the direct text children.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for n in &self.children {
            if let Node::Text(t) = n {
                out.push_str(t);
            }
        }
        out
    }
}

fn syntax(reader: &NsReader<&[u8]>, source: quick_xml::Error) -> XmlError {
    XmlError::Syntax {
        position: reader.error_position(),
        source,
    }
}

/// The namespace URI a name resolved to, owned (the resolver's result borrows the reader).
pub(crate) fn owned_ns(resolved: ResolveResult<'_>) -> Result<Option<String>, XmlError> {
    match resolved {
        ResolveResult::Bound(ns) => Ok(Some(String::from_utf8_lossy(ns.as_ref()).into_owned())),
        ResolveResult::Unbound => Ok(None),
        ResolveResult::Unknown(prefix) => Err(XmlError::UnknownPrefix(
            String::from_utf8_lossy(&prefix).into_owned(),
        )),
    }
}

fn make_element(
    reader: &NsReader<&[u8]>,
    ns: Result<Option<String>, XmlError>,
    start: &BytesStart<'_>,
) -> Result<Element, XmlError> {
    let ns = ns?;
    let local = String::from_utf8_lossy(start.local_name().as_ref()).into_owned();
    let mut attrs = Vec::new();
    for attr in start.attributes() {
        let attr = attr.map_err(|e| syntax(reader, e.into()))?;
        let key = String::from_utf8_lossy(attr.key.as_ref()).into_owned();
        let value = attr
            .unescape_value()
            .map_err(|e| syntax(reader, e))?
            .into_owned();
        attrs.push((key, value));
    }
    Ok(Element {
        ns,
        local,
        attrs,
        children: Vec::new(),
    })
}

/// Parses a whole document (or a single element) into its root element.
///
/// Accepts an XML declaration, comments, processing instructions, a doctype and whitespace
/// around exactly one root element.
pub fn parse(xml: &str) -> Result<Element, XmlError> {
    let mut reader = NsReader::from_str(xml);
    let mut stack: Vec<Element> = Vec::new();
    let mut root: Option<Element> = None;
    loop {
        let (resolved, event) = match reader.read_resolved_event() {
            Ok((resolved, event)) => (owned_ns(resolved), event),
            Err(e) => return Err(syntax(&reader, e)),
        };
        match event {
            Event::Start(_) | Event::Empty(_) if root.is_some() && stack.is_empty() => {
                return Err(XmlError::TrailingContent);
            }
            Event::Start(start) => {
                if stack.len() >= MAX_DEPTH {
                    return Err(XmlError::TooDeep);
                }
                let el = make_element(&reader, resolved, &start)?;
                stack.push(el);
            }
            Event::Empty(start) => {
                if stack.len() >= MAX_DEPTH {
                    return Err(XmlError::TooDeep);
                }
                let el = make_element(&reader, resolved, &start)?;
                match stack.last_mut() {
                    Some(parent) => parent.children.push(Node::Element(el)),
                    None => root = Some(el),
                }
            }
            Event::End(_) => {
                // quick-xml checks that end names match their start.
                let Some(el) = stack.pop() else {
                    return Err(XmlError::TrailingContent);
                };
                match stack.last_mut() {
                    Some(parent) => parent.children.push(Node::Element(el)),
                    None => root = Some(el),
                }
            }
            Event::Text(text) => {
                let text = text.unescape().map_err(|e| syntax(&reader, e))?;
                match stack.last_mut() {
                    Some(parent) => parent.children.push(Node::Text(text.into_owned())),
                    None if text.trim().is_empty() => {}
                    None => return Err(XmlError::TrailingContent),
                }
            }
            Event::CData(data) => {
                let data = data
                    .decode()
                    .map_err(|e| syntax(&reader, e.into()))?
                    .into_owned();
                match stack.last_mut() {
                    Some(parent) => parent.children.push(Node::Text(data)),
                    None => return Err(XmlError::TrailingContent),
                }
            }
            Event::Comment(_) | Event::PI(_) | Event::Decl(_) | Event::DocType(_) => {}
            Event::Eof => break,
        }
    }
    if let Some(open) = stack.last() {
        return Err(XmlError::Unclosed(open.local.clone()));
    }
    root.ok_or(XmlError::NoRoot)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_namespaces_by_uri() {
        let el = parse(
            r#"<?xml version="1.0"?>
            <!-- c -->
            <a xmlns:x="urn:x"><x:b v="1 &amp; 2"/><c xmlns="urn:y">t&lt;<![CDATA[<raw>]]></c></a>"#,
        )
        .unwrap();
        assert!(el.is(None, "a"));
        let b = el.child(Some("urn:x"), "b").unwrap();
        assert_eq!(b.attr("v"), Some("1 & 2"));
        let c = el.child(Some("urn:y"), "c").unwrap();
        assert_eq!(c.text(), "t<<raw>");
    }

    #[test]
    fn errors() {
        assert!(matches!(parse(""), Err(XmlError::NoRoot)));
        assert!(matches!(parse("  <!-- x -->  "), Err(XmlError::NoRoot)));
        assert!(matches!(parse("<a>"), Err(XmlError::Unclosed(_))));
        assert!(matches!(parse("<a></b>"), Err(XmlError::Syntax { .. })));
        assert!(matches!(parse("<a/><b/>"), Err(XmlError::TrailingContent)));
        assert!(matches!(parse("<a/>text"), Err(XmlError::TrailingContent)));
        assert!(matches!(parse("<p:a/>"), Err(XmlError::UnknownPrefix(p)) if p == "p"));
        assert!(matches!(
            parse("<a x='1' x='2'/>"),
            Err(XmlError::Syntax { .. })
        ));
        assert!(matches!(
            parse("<a>&bogus;</a>"),
            Err(XmlError::Syntax { .. })
        ));
        let deep = "<a>".repeat(100) + &"</a>".repeat(100);
        assert!(matches!(parse(&deep), Err(XmlError::TooDeep)));
    }
}
