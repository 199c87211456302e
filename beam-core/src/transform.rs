//! The domain-XML rewrites behind `vmbeam enable` and `vmbeam disable`.
//!
//! [`enable`] makes a domain ready for zero-copy migration:
//! - `<memoryBacking>` gets `<source type='file'/>` and `<access mode='shared'/>` (memfd,
//!   anonymous and private are replaced), `<discard/>` and `<allocation mode='immediate'/>`
//!   are removed (one punches the RAM out of the shared file on teardown, the other makes a
//!   destination QEMU touch every page of memory the source guest is running on);
//! - `<qemu:commandline>` gets VMBeam's private monitor,
//!   `-qmp unix:<qmp_dir>/<uuid>.sock,server=on,wait=off` (and `<domain>` the `qemu`
//!   namespace declaration when it lacks one);
//! - `<metadata>` gets VMBeam's element, replacing any previous one.
//!
//! [`disable`] takes the file/shared backing, the monitor and the metadata out again.
//!
//! Both stream the document through quick-xml's reader and writer: everything they do not
//! touch (other elements, attributes, quoting, comments, whitespace) is copied byte for
//! byte. Hugepages and guest NUMA cells are refused: hugepage memory lives on hugetlbfs, not
//! in the beam pool, and NUMA cells get one RAM file each, which VMBeam does not link.

use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use quick_xml::escape::escape;
use quick_xml::events::{BytesStart, BytesText, Event};
use quick_xml::{NsReader, Writer};

use crate::domain::{
    private_qmp_path, qmp_arg_value, qmp_socket_path, DomainError, DomainFacts, MemoryAccess,
    MemorySource, QEMU_NAMESPACE,
};
use crate::ids::DomainUuid;
use crate::metadata::{BeamMetadata, MetadataError, NAMESPACE, PREFIX};
use crate::xml::{self, owned_ns};

/// Why a domain XML could not be rewritten.
#[derive(Debug, thiserror::Error)]
pub enum TransformError {
    /// The domain XML is malformed or lacks what VMBeam needs.
    #[error("invalid domain XML")]
    Domain(#[from] DomainError),
    /// The metadata to write is unusable.
    #[error("invalid VMBeam metadata")]
    Metadata(#[from] MetadataError),
    /// The domain's memory is on hugepages.
    #[error("memory is backed by hugepages, which cannot live in the beam pool; remove <hugepages> first")]
    Hugepages,
    /// The domain has a guest NUMA topology.
    #[error("guest NUMA topology ({0} cells) is not supported: each cell has its own RAM file")]
    Numa(usize),
    /// The `qemu` prefix on `<domain>` is taken by another namespace.
    #[error("prefix 'qemu' on <domain> is bound to '{0}', not libvirt's QEMU namespace")]
    PrefixClash(String),
    /// The QMP directory cannot be put in a `-qmp unix:` argument.
    #[error("QMP directory {0:?} must be an absolute path without ','")]
    BadQmpDir(PathBuf),
    /// quick-xml failed while streaming.
    #[error("XML rewrite failed near byte {position}")]
    Xml {
        /// Byte offset where the error was detected.
        position: u64,
        /// The parser's error.
        #[source]
        source: quick_xml::Error,
    },
    /// Writing the output failed.
    #[error("cannot write XML")]
    Write(#[from] std::io::Error),
}

/// One thing a rewrite changed, for telling the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// `<source type='file'/>` set (previous type, if any).
    SetMemorySource(Option<MemorySource>),
    /// `<access mode='shared'/>` set (previous mode, if any).
    SetMemoryAccess(Option<MemoryAccess>),
    /// `<discard/>` removed.
    RemovedDiscard,
    /// `<allocation mode='immediate'/>` removed.
    RemovedImmediateAllocation,
    /// `xmlns:qemu` declared on `<domain>`.
    AddedQemuNamespace,
    /// The private QMP monitor argument added (or its path changed).
    AddedPrivateQmp(PathBuf),
    /// VMBeam's metadata element written (it was absent or different).
    SetMetadata,
    /// `<source type='file'/>` removed.
    RemovedMemorySource,
    /// `<access mode='shared'/>` removed.
    RemovedMemoryAccess,
    /// The private QMP monitor argument removed.
    RemovedPrivateQmp,
    /// VMBeam's metadata element removed.
    RemovedMetadata,
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::SetMemorySource(None) => write!(f, "memory source set to a file"),
            Self::SetMemorySource(Some(old)) => {
                write!(f, "memory source changed from {old} to a file")
            }
            Self::SetMemoryAccess(None) => write!(f, "memory access set to shared"),
            Self::SetMemoryAccess(Some(old)) => {
                write!(f, "memory access changed from {old} to shared")
            }
            Self::RemovedDiscard => write!(f, "<discard/> removed from <memoryBacking>"),
            Self::RemovedImmediateAllocation => {
                write!(
                    f,
                    "memory preallocation (allocation mode immediate) removed"
                )
            }
            Self::AddedQemuNamespace => write!(f, "qemu namespace declared on <domain>"),
            Self::AddedPrivateQmp(p) => {
                write!(f, "private QMP monitor added at {}", p.display())
            }
            Self::SetMetadata => write!(f, "VMBeam metadata written"),
            Self::RemovedMemorySource => write!(f, "file memory source removed"),
            Self::RemovedMemoryAccess => write!(f, "shared memory access removed"),
            Self::RemovedPrivateQmp => write!(f, "private QMP monitor removed"),
            Self::RemovedMetadata => write!(f, "VMBeam metadata removed"),
        }
    }
}

/// The rewritten XML and what changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewrite {
    /// The new domain XML.
    pub xml: String,
    /// What changed; empty when the domain was already in the requested state.
    pub changes: Vec<Change>,
}

/// Rewrites `domain_xml` for zero-copy migration (see the module docs); `qmp_dir` is where
/// the private monitor socket goes (normally [`crate::domain::DEFAULT_QMP_DIR`]).
pub fn enable(
    domain_xml: &str,
    metadata: &BeamMetadata,
    qmp_dir: &Path,
) -> Result<Rewrite, TransformError> {
    if !qmp_dir.is_absolute() || qmp_dir.to_string_lossy().contains(',') {
        return Err(TransformError::BadQmpDir(qmp_dir.to_path_buf()));
    }
    let pre = Prepass::new(domain_xml)?;
    if pre.facts.memory_backing.hugepages {
        return Err(TransformError::Hugepages);
    }
    if pre.facts.numa_cells > 0 {
        return Err(TransformError::Numa(pre.facts.numa_cells));
    }
    let socket = qmp_socket_path(qmp_dir, &pre.facts.uuid);
    let mode = Mode::Enable {
        metadata,
        metadata_unchanged: pre.metadata.as_ref() == Some(metadata),
        qmp_value: qmp_arg_value(&socket),
        socket,
    };
    Rewriter::new(mode, pre).run(domain_xml)
}

/// Undoes [`enable`]: removes `<source type='file'/>`, `<access mode='shared'/>`, the private
/// QMP monitor and VMBeam's metadata, dropping elements left empty by that.
///
/// Libvirt's defaults (anonymous, private memory) apply afterwards; a domain that needs
/// shared memory for another reason (vhost-user, virtiofs) must have it set again.
pub fn disable(domain_xml: &str) -> Result<Rewrite, TransformError> {
    let pre = Prepass::new(domain_xml)?;
    Rewriter::new(Mode::Disable, pre).run(domain_xml)
}

/// What the tree view tells before streaming.
struct Prepass {
    facts: DomainFacts,
    /// Our current metadata, if present and valid.
    metadata: Option<BeamMetadata>,
    has_metadata: bool,
    has_memory_backing: bool,
    has_commandline: bool,
    /// The prefix bound to the QEMU namespace on `<domain>`.
    root_qemu_prefix: Option<String>,
}

impl Prepass {
    fn new(domain_xml: &str) -> Result<Self, TransformError> {
        let root = xml::parse(domain_xml).map_err(DomainError::from)?;
        let facts = DomainFacts::from_root(&root)?;
        let metadata = BeamMetadata::from_domain_root(&root).ok().flatten();
        let root_qemu_prefix = root.attrs.iter().find_map(|(k, v)| {
            let prefix = k.strip_prefix("xmlns:")?;
            (v == QEMU_NAMESPACE).then(|| prefix.to_owned())
        });
        if root_qemu_prefix.is_none() {
            if let Some(other) = root.attr("xmlns:qemu") {
                return Err(TransformError::PrefixClash(other.to_owned()));
            }
        }
        Ok(Self {
            metadata,
            has_metadata: root.child(None, "metadata").is_some(),
            has_memory_backing: root.child(None, "memoryBacking").is_some(),
            has_commandline: root.child(Some(QEMU_NAMESPACE), "commandline").is_some(),
            root_qemu_prefix,
            facts,
        })
    }
}

enum Mode<'a> {
    Enable {
        metadata: &'a BeamMetadata,
        metadata_unchanged: bool,
        socket: PathBuf,
        qmp_value: String,
    },
    Disable,
}

/// libvirt's order of `<domain>` children (virDomainDefFormatInternal); new elements are
/// placed before the first existing element that comes after them.
const TOP_LEVEL_ORDER: &[&str] = &[
    "name",
    "uuid",
    "genid",
    "title",
    "description",
    "metadata",
    "maxMemory",
    "memory",
    "currentMemory",
    "blkiotune",
    "memtune",
    "memoryBacking",
    "vcpu",
    "vcpus",
    "iothreads",
    "iothreadids",
    "defaultiothread",
    "cputune",
    "numatune",
    "resource",
    "sysinfo",
    "bootloader",
    "bootloader_args",
    "os",
    "idmap",
    "features",
    "cpu",
    "clock",
    "on_poweroff",
    "on_reboot",
    "on_crash",
    "on_lockfailure",
    "pm",
    "perf",
    "devices",
    "seclabel",
    "keywrap",
    "launchSecurity",
    "throttlegroups",
];

fn rank(local: &str) -> Option<usize> {
    TOP_LEVEL_ORDER.iter().position(|n| *n == local)
}

/// A child of a captured element.
enum Item {
    /// Whitespace-only text, raw.
    Ws(String),
    /// Other text, comments, CDATA, processing instructions: kept as they are.
    Other(Event<'static>),
    /// A child element with its whole subtree.
    Elem(Child),
    /// New markup written by us.
    Raw(String),
}

struct Child {
    ns: Option<String>,
    local: String,
    start: BytesStart<'static>,
    events: Vec<Event<'static>>,
}

impl Child {
    fn attr(&self, name: &str) -> Option<String> {
        attr_value(&self.start, name)
    }
}

/// A top-level element read whole.
struct Captured {
    start: BytesStart<'static>,
    items: Vec<Item>,
}

impl Captured {
    fn has_elements(&self) -> bool {
        self.items
            .iter()
            .any(|i| matches!(i, Item::Elem(_) | Item::Raw(_)))
    }

    /// Removes the child elements matching `pred` with the whitespace before each; returns
    /// them in order.
    fn remove_where(&mut self, mut pred: impl FnMut(&Child) -> bool) -> Vec<Child> {
        let mut removed = Vec::new();
        let mut kept: Vec<Item> = Vec::with_capacity(self.items.len());
        for item in std::mem::take(&mut self.items) {
            match item {
                Item::Elem(child) if pred(&child) => {
                    if matches!(kept.last(), Some(Item::Ws(_))) {
                        kept.pop();
                    }
                    removed.push(child);
                }
                other => kept.push(other),
            }
        }
        self.items = kept;
        removed
    }

    /// The whitespace used before child elements; `None` when the element (or, for an
    /// empty one, the document: `parent_ws` is `None`) is not indented.
    fn child_ws(&self, parent_ws: Option<&str>) -> Option<String> {
        let deeper = || parent_ws.map(|p| format!("{p}  "));
        if self.items.is_empty() {
            return deeper();
        }
        let mut prev_ws: Option<&str> = None;
        for item in &self.items {
            match item {
                Item::Ws(ws) => prev_ws = Some(ws),
                Item::Elem(_) => return prev_ws.map(str::to_owned),
                _ => prev_ws = None,
            }
        }
        // Only text or comments inside: indent one step deeper than the parent.
        deeper()
    }

    /// Appends new child markup before the closing tag, following the element's indentation.
    fn append(&mut self, markup: Vec<String>, parent_ws: Option<&str>) {
        let child_ws = self.child_ws(parent_ws);
        let trailing = match self.items.last() {
            Some(Item::Ws(_)) => self.items.pop(),
            _ if self.items.is_empty() => parent_ws.map(|p| Item::Ws(p.to_owned())),
            _ => None,
        };
        for m in markup {
            if let Some(ws) = &child_ws {
                self.items.push(Item::Ws(ws.clone()));
            }
            self.items.push(Item::Raw(m));
        }
        if let Some(t) = trailing {
            self.items.push(t);
        }
    }
}

fn attr_value(start: &BytesStart<'_>, name: &str) -> Option<String> {
    start
        .attributes()
        .flatten()
        .find(|a| a.key.as_ref() == name.as_bytes())
        .and_then(|a| a.unescape_value().ok().map(|v| v.into_owned()))
}

/// The prefix of a qualified name (`qemu` in `qemu:commandline`).
fn prefix_of(start: &BytesStart<'_>) -> Option<String> {
    start
        .name()
        .prefix()
        .map(|p| String::from_utf8_lossy(p.as_ref()).into_owned())
}

/// The text after the last newline: the column a line starts at.
fn line_indent(ws: &str) -> &str {
    ws.rsplit('\n').next().unwrap_or("")
}

struct Rewriter<'a> {
    mode: Mode<'a>,
    pre: Prepass,
    writer: Writer<Vec<u8>>,
    changes: Vec<Change>,
    /// Whitespace before the next top-level element, held back so a removed element can
    /// take it along.
    pending_ws: Option<String>,
    /// The whitespace between top-level elements (`"\n  "` in libvirt's output).
    top_ws: Option<String>,
    inserted_metadata: bool,
    inserted_memory_backing: bool,
    /// Our metadata / monitor were written (into the first of repeated elements only).
    wrote_metadata: bool,
    wrote_qmp: bool,
}

impl<'a> Rewriter<'a> {
    fn new(mode: Mode<'a>, pre: Prepass) -> Self {
        let enabling = matches!(mode, Mode::Enable { .. });
        Self {
            inserted_metadata: !enabling || pre.has_metadata,
            inserted_memory_backing: !enabling || pre.has_memory_backing,
            mode,
            pre,
            writer: Writer::new(Vec::new()),
            changes: Vec::new(),
            pending_ws: None,
            top_ws: None,
            wrote_metadata: false,
            wrote_qmp: false,
        }
    }

    fn run(mut self, input: &str) -> Result<Rewrite, TransformError> {
        let mut reader = NsReader::from_str(input);
        let mut depth = 0usize;
        loop {
            let (ns, event) = match reader.read_resolved_event() {
                Ok((resolved, event)) => (owned_ns(resolved).ok().flatten(), event),
                Err(source) => {
                    return Err(TransformError::Xml {
                        position: reader.error_position(),
                        source,
                    })
                }
            };
            match event {
                Event::Start(start) if depth == 0 => {
                    let start = self.root_start(start.into_owned());
                    self.writer.write_event(Event::Start(start))?;
                    depth = 1;
                }
                Event::Start(start) if depth == 1 => {
                    self.top_level(&mut reader, ns, start.into_owned(), false)?;
                }
                Event::Empty(start) if depth == 1 => {
                    self.top_level(&mut reader, ns, start.into_owned(), true)?;
                }
                Event::Start(start) => {
                    self.writer.write_event(Event::Start(start))?;
                    depth += 1;
                }
                Event::End(end) => {
                    if depth == 1 {
                        self.finish_root()?;
                    }
                    self.writer.write_event(Event::End(end))?;
                    depth = depth.saturating_sub(1);
                }
                Event::Text(text) if depth == 1 && is_blank(&text) => {
                    self.flush_ws()?;
                    let ws = String::from_utf8_lossy(&text).into_owned();
                    if self.top_ws.is_none() {
                        self.top_ws = Some(ws.clone());
                    }
                    self.pending_ws = Some(ws);
                }
                Event::Eof => break,
                other => {
                    if depth == 1 {
                        self.flush_ws()?;
                    }
                    self.writer.write_event(other)?;
                }
            }
        }
        let xml = String::from_utf8(self.writer.into_inner())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        Ok(Rewrite {
            xml,
            changes: self.changes,
        })
    }

    fn flush_ws(&mut self) -> Result<(), TransformError> {
        if let Some(ws) = self.pending_ws.take() {
            self.writer.get_mut().write_all(ws.as_bytes())?;
        }
        Ok(())
    }

    fn raw(&mut self, s: &str) -> Result<(), TransformError> {
        self.writer.get_mut().write_all(s.as_bytes())?;
        Ok(())
    }

    /// Adds `xmlns:qemu` to `<domain>` when enabling needs a new `<qemu:commandline>`.
    fn root_start(&mut self, mut start: BytesStart<'static>) -> BytesStart<'static> {
        if matches!(self.mode, Mode::Enable { .. })
            && !self.pre.has_commandline
            && self.pre.root_qemu_prefix.is_none()
        {
            start.push_attribute(("xmlns:qemu", QEMU_NAMESPACE));
            self.pre.root_qemu_prefix = Some("qemu".to_owned());
            self.changes.push(Change::AddedQemuNamespace);
        }
        start
    }

    fn top_level(
        &mut self,
        reader: &mut NsReader<&[u8]>,
        ns: Option<String>,
        start: BytesStart<'static>,
        empty: bool,
    ) -> Result<(), TransformError> {
        let local = String::from_utf8_lossy(start.local_name().as_ref()).into_owned();
        if ns.is_none() {
            if let Some(r) = rank(&local) {
                self.insert_missing_before(r)?;
            }
        }
        let handled = match (ns.as_deref(), local.as_str()) {
            (None, "metadata") => Some(Target::Metadata),
            (None, "memoryBacking") => Some(Target::MemoryBacking),
            (Some(QEMU_NAMESPACE), "commandline") => Some(Target::Commandline),
            _ => None,
        };
        let Some(target) = handled else {
            self.flush_ws()?;
            if empty {
                self.writer.write_event(Event::Empty(start))?;
            } else {
                self.writer.write_event(Event::Start(start))?;
                // Copy the subtree through unchanged.
                self.copy_subtree(reader)?;
            }
            return Ok(());
        };
        let mut captured = capture(reader, start, empty)?;
        let parent_ws = self
            .pending_ws
            .as_ref()
            .or(self.top_ws.as_ref())
            .map(|ws| format!("\n{}", line_indent(ws)));
        let parent_ws = parent_ws.as_deref();
        let keep = match target {
            Target::Metadata => self.edit_metadata(&mut captured, parent_ws),
            Target::MemoryBacking => self.edit_memory_backing(&mut captured, parent_ws),
            Target::Commandline => self.edit_commandline(&mut captured, parent_ws),
        };
        if keep {
            self.flush_ws()?;
            self.emit(captured)?;
        } else {
            self.pending_ws = None;
        }
        Ok(())
    }

    fn copy_subtree(&mut self, reader: &mut NsReader<&[u8]>) -> Result<(), TransformError> {
        let mut depth = 1usize;
        while depth > 0 {
            let event = reader.read_event().map_err(|source| TransformError::Xml {
                position: reader.error_position(),
                source,
            })?;
            match &event {
                Event::Start(_) => depth += 1,
                Event::End(_) => depth -= 1,
                Event::Eof => return Ok(()),
                _ => {}
            }
            self.writer.write_event(event)?;
        }
        Ok(())
    }

    fn emit(&mut self, captured: Captured) -> Result<(), TransformError> {
        if captured.items.is_empty() {
            self.writer.write_event(Event::Empty(captured.start))?;
            return Ok(());
        }
        let end = captured.start.to_end().into_owned();
        self.writer.write_event(Event::Start(captured.start))?;
        for item in captured.items {
            match item {
                Item::Ws(ws) => self.raw(&ws)?,
                Item::Raw(markup) => self.raw(&markup)?,
                Item::Other(event) => self.writer.write_event(event)?,
                Item::Elem(child) => {
                    for event in child.events {
                        self.writer.write_event(event)?;
                    }
                }
            }
        }
        self.writer.write_event(Event::End(end))?;
        Ok(())
    }

    /// Inserts the new `<metadata>` / `<memoryBacking>` that belong before an element of
    /// rank `r`.
    fn insert_missing_before(&mut self, r: usize) -> Result<(), TransformError> {
        if !self.inserted_metadata && rank("metadata").is_some_and(|m| r > m) {
            self.inserted_metadata = true;
            self.insert_top_level(Target::Metadata)?;
        }
        if !self.inserted_memory_backing && rank("memoryBacking").is_some_and(|m| r > m) {
            self.inserted_memory_backing = true;
            self.insert_top_level(Target::MemoryBacking)?;
        }
        Ok(())
    }

    /// Before `</domain>`: whatever was not placed yet.
    fn finish_root(&mut self) -> Result<(), TransformError> {
        if !self.inserted_metadata {
            self.inserted_metadata = true;
            self.insert_top_level(Target::Metadata)?;
        }
        if !self.inserted_memory_backing {
            self.inserted_memory_backing = true;
            self.insert_top_level(Target::MemoryBacking)?;
        }
        if matches!(self.mode, Mode::Enable { .. }) && !self.pre.has_commandline {
            self.insert_top_level(Target::Commandline)?;
        }
        self.flush_ws()
    }

    /// Writes a new top-level element where the next one would go, followed by the same
    /// whitespace again so the following element keeps its place. In a document without
    /// whitespace between elements, the new element is written compactly too.
    fn insert_top_level(&mut self, target: Target) -> Result<(), TransformError> {
        let parent_ws = self
            .top_ws
            .as_ref()
            .map(|ws| format!("\n{}", line_indent(ws)));
        if let Some(ws) = &parent_ws {
            // Before `</domain>` the pending whitespace is the closing one ("\n"): indent
            // with the children's whitespace and leave the pending one for the closing tag.
            if self.pending_ws.as_ref() == Some(ws) {
                self.flush_ws()?;
                self.pending_ws = Some(ws.clone());
            } else {
                self.raw(ws)?;
            }
        }
        let start_name = match target {
            Target::Metadata => "metadata".to_owned(),
            Target::MemoryBacking => "memoryBacking".to_owned(),
            Target::Commandline => format!("{}:commandline", self.qemu_prefix()),
        };
        let mut captured = Captured {
            start: BytesStart::new(start_name),
            items: Vec::new(),
        };
        let parent_ws = parent_ws.as_deref();
        match target {
            Target::Metadata => self.edit_metadata(&mut captured, parent_ws),
            Target::MemoryBacking => self.edit_memory_backing(&mut captured, parent_ws),
            Target::Commandline => self.edit_commandline(&mut captured, parent_ws),
        };
        self.emit(captured)
    }

    fn qemu_prefix(&self) -> String {
        self.pre
            .root_qemu_prefix
            .clone()
            .unwrap_or_else(|| "qemu".to_owned())
    }

    /// Returns whether the element stays.
    fn edit_metadata(&mut self, el: &mut Captured, parent_ws: Option<&str>) -> bool {
        let removed = el.remove_where(|c| c.ns.as_deref() == Some(NAMESPACE));
        match &self.mode {
            Mode::Enable {
                metadata,
                metadata_unchanged,
                ..
            } if !self.wrote_metadata => {
                self.wrote_metadata = true;
                let child_ws = el.child_ws(parent_ws);
                let markup = metadata.write_xml(Some(PREFIX), child_ws.as_deref().map(line_indent));
                if !(*metadata_unchanged && removed.len() == 1) {
                    self.changes.push(Change::SetMetadata);
                }
                el.append(vec![markup], parent_ws);
                true
            }
            Mode::Enable { .. } => true,
            Mode::Disable => {
                if !removed.is_empty() {
                    self.changes.push(Change::RemovedMetadata);
                }
                keeps_content(el)
            }
        }
    }

    fn edit_memory_backing(&mut self, el: &mut Captured, parent_ws: Option<&str>) -> bool {
        let plain = |c: &Child, name: &str| c.ns.is_none() && c.local == name;
        match &self.mode {
            Mode::Enable { .. } => {
                let mut changes = Vec::new();
                if !el.remove_where(|c| plain(c, "discard")).is_empty() {
                    changes.push(Change::RemovedDiscard);
                }
                let immediate = el.remove_where(|c| {
                    plain(c, "allocation") && c.attr("mode").as_deref() == Some("immediate")
                });
                if !immediate.is_empty() {
                    changes.push(Change::RemovedImmediateAllocation);
                }
                let mut add = Vec::new();
                let wrong_source = el.remove_where(|c| {
                    plain(c, "source") && c.attr("type").as_deref() != Some("file")
                });
                let has_source = el
                    .items
                    .iter()
                    .any(|i| matches!(i, Item::Elem(c) if plain(c, "source")));
                if !has_source {
                    let old = wrong_source
                        .first()
                        .and_then(|c| match c.attr("type").as_deref() {
                            Some("anonymous") => Some(MemorySource::Anonymous),
                            Some("memfd") => Some(MemorySource::Memfd),
                            _ => None,
                        });
                    changes.push(Change::SetMemorySource(old));
                    add.push("<source type='file'/>".to_owned());
                }
                let wrong_access = el.remove_where(|c| {
                    plain(c, "access") && c.attr("mode").as_deref() != Some("shared")
                });
                let has_access = el
                    .items
                    .iter()
                    .any(|i| matches!(i, Item::Elem(c) if plain(c, "access")));
                if !has_access {
                    let old = wrong_access
                        .first()
                        .and_then(|c| match c.attr("mode").as_deref() {
                            Some("private") => Some(MemoryAccess::Private),
                            _ => None,
                        });
                    changes.push(Change::SetMemoryAccess(old));
                    add.push("<access mode='shared'/>".to_owned());
                }
                if !add.is_empty() {
                    el.append(add, parent_ws);
                }
                self.changes.extend(changes);
                true
            }
            Mode::Disable => {
                if !el
                    .remove_where(|c| {
                        plain(c, "source") && c.attr("type").as_deref() == Some("file")
                    })
                    .is_empty()
                {
                    self.changes.push(Change::RemovedMemorySource);
                }
                if !el
                    .remove_where(|c| {
                        plain(c, "access") && c.attr("mode").as_deref() == Some("shared")
                    })
                    .is_empty()
                {
                    self.changes.push(Change::RemovedMemoryAccess);
                }
                keeps_content(el)
            }
        }
    }

    fn edit_commandline(&mut self, el: &mut Captured, parent_ws: Option<&str>) -> bool {
        let removed = remove_private_qmp(el, &self.pre.facts.uuid);
        match &self.mode {
            Mode::Enable {
                socket, qmp_value, ..
            } if !self.wrote_qmp => {
                self.wrote_qmp = true;
                let prefix = prefix_of(&el.start)
                    .map(|p| format!("{p}:"))
                    .unwrap_or_default();
                if removed.as_deref() != Some(qmp_value.as_str()) {
                    self.changes.push(Change::AddedPrivateQmp(socket.clone()));
                }
                el.append(
                    vec![
                        format!("<{prefix}arg value='-qmp'/>"),
                        format!("<{prefix}arg value='{}'/>", escape(qmp_value.as_str())),
                    ],
                    parent_ws,
                );
                true
            }
            // A second <qemu:commandline>: ours was moved into the first one.
            Mode::Enable { .. } => keeps_content(el),
            Mode::Disable => {
                if removed.is_some() {
                    self.changes.push(Change::RemovedPrivateQmp);
                }
                keeps_content(el)
            }
        }
    }
}

/// Whether an element still has content worth keeping (elements, text or comments).
fn keeps_content(el: &Captured) -> bool {
    el.has_elements() || el.items.iter().any(|i| matches!(i, Item::Other(_)))
}

#[derive(Clone, Copy)]
enum Target {
    Metadata,
    MemoryBacking,
    Commandline,
}

/// Removes every `-qmp <our socket>` argument pair (with the whitespace before each
/// argument); returns the last removed socket argument.
fn remove_private_qmp(el: &mut Captured, uuid: &DomainUuid) -> Option<String> {
    let is_arg = |c: &Child| c.ns.as_deref() == Some(QEMU_NAMESPACE) && c.local == "arg";
    // (index into items, value) of each argument element, in order.
    let args: Vec<(usize, Option<String>)> = el
        .items
        .iter()
        .enumerate()
        .filter_map(|(i, item)| match item {
            Item::Elem(c) if is_arg(c) => Some((i, c.attr("value"))),
            _ => None,
        })
        .collect();
    let mut doomed = Vec::new();
    let mut value = None;
    let mut k = 0;
    while k + 1 < args.len() {
        let ours = args[k].1.as_deref() == Some("-qmp")
            && args[k + 1]
                .1
                .as_deref()
                .is_some_and(|v| private_qmp_path(v, uuid).is_some());
        if ours {
            doomed.extend([args[k].0, args[k + 1].0]);
            value.clone_from(&args[k + 1].1);
            k += 2;
        } else {
            k += 1;
        }
    }
    if doomed.is_empty() {
        return None;
    }
    let mut kept: Vec<Item> = Vec::with_capacity(el.items.len());
    for (i, item) in std::mem::take(&mut el.items).into_iter().enumerate() {
        if doomed.contains(&i) {
            if matches!(kept.last(), Some(Item::Ws(_))) {
                kept.pop();
            }
        } else {
            kept.push(item);
        }
    }
    el.items = kept;
    value
}

fn is_blank(text: &BytesText<'_>) -> bool {
    text.iter().all(|b| b.is_ascii_whitespace())
}

/// Reads the rest of an element whose start was just read, splitting its children.
fn capture(
    reader: &mut NsReader<&[u8]>,
    start: BytesStart<'static>,
    empty: bool,
) -> Result<Captured, TransformError> {
    let mut captured = Captured {
        start,
        items: Vec::new(),
    };
    if empty {
        return Ok(captured);
    }
    let xml_err = |reader: &NsReader<&[u8]>, source| TransformError::Xml {
        position: reader.error_position(),
        source,
    };
    loop {
        let (ns, event) = match reader.read_resolved_event() {
            Ok((resolved, event)) => (owned_ns(resolved).ok().flatten(), event),
            Err(e) => return Err(xml_err(reader, e)),
        };
        match event {
            Event::End(_) => return Ok(captured),
            Event::Eof => return Ok(captured),
            Event::Text(t) if is_blank(&t) => {
                captured
                    .items
                    .push(Item::Ws(String::from_utf8_lossy(&t).into_owned()));
            }
            Event::Empty(s) => {
                let s = s.into_owned();
                captured.items.push(Item::Elem(Child {
                    ns,
                    local: String::from_utf8_lossy(s.local_name().as_ref()).into_owned(),
                    events: vec![Event::Empty(s.clone())],
                    start: s,
                }));
            }
            Event::Start(s) => {
                let s = s.into_owned();
                let mut events = vec![Event::Start(s.clone())];
                let mut depth = 1usize;
                while depth > 0 {
                    let ev = reader.read_event().map_err(|e| xml_err(reader, e))?;
                    match &ev {
                        Event::Start(_) => depth += 1,
                        Event::End(_) => depth -= 1,
                        Event::Eof => break,
                        _ => {}
                    }
                    events.push(ev.into_owned());
                }
                captured.items.push(Item::Elem(Child {
                    ns,
                    local: String::from_utf8_lossy(s.local_name().as_ref()).into_owned(),
                    start: s,
                    events,
                }));
            }
            other => captured.items.push(Item::Other(other.into_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A test case's expectation on the error.
    type Check = fn(&TransformError) -> bool;
    use crate::domain::{tests::RUNNING, AllocationMode, MemoryBacking};
    use crate::ids::{CloudId, HostId};

    const UUID: &str = "6e3b1e9a-1b2c-4d5e-8f90-0123456789ab";
    const QMP_DIR: &str = "/run/vmbeam/qmp";

    fn meta() -> BeamMetadata {
        BeamMetadata {
            cloud: CloudId::new("acme").unwrap(),
            pool: PathBuf::from("/var/lib/vmbeam/pool"),
            owner: HostId::new("cvm1").unwrap(),
            generation: 1,
            pool_file: None,
        }
    }

    fn socket() -> PathBuf {
        PathBuf::from(format!("{QMP_DIR}/{UUID}.sock"))
    }

    fn on(xml: &str) -> Rewrite {
        enable(xml, &meta(), Path::new(QMP_DIR)).unwrap()
    }

    /// Checks what every enabled domain must look like, and returns its facts.
    fn assert_enabled(xml: &str) -> DomainFacts {
        let facts = DomainFacts::from_xml(xml).unwrap();
        assert_eq!(facts.memory_backing.source, Some(MemorySource::File));
        assert_eq!(facts.memory_backing.access, Some(MemoryAccess::Shared));
        assert!(!facts.memory_backing.discard);
        assert_ne!(
            facts.memory_backing.allocation,
            Some(AllocationMode::Immediate)
        );
        assert_eq!(facts.private_qmp, Some(socket()));
        assert_eq!(BeamMetadata::from_domain_xml(xml).unwrap(), Some(meta()));
        facts
    }

    fn assert_disabled(xml: &str) -> DomainFacts {
        let facts = DomainFacts::from_xml(xml).unwrap();
        assert_ne!(facts.memory_backing.source, Some(MemorySource::File));
        assert_ne!(facts.memory_backing.access, Some(MemoryAccess::Shared));
        assert_eq!(facts.private_qmp, None);
        assert_eq!(BeamMetadata::from_domain_xml(xml).unwrap(), None);
        facts
    }

    /// A domain as `virsh dumpxml --inactive` prints one that was never enabled.
    const PLAIN: &str = "<domain type='kvm'>
  <name>web1</name>
  <uuid>6e3b1e9a-1b2c-4d5e-8f90-0123456789ab</uuid>
  <memory unit='KiB'>1048576</memory>
  <currentMemory unit='KiB'>1048576</currentMemory>
  <vcpu placement='static'>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type>
  </os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <source file='/var/lib/libvirt/images/web1.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
  </devices>
</domain>
";

    #[test]
    fn enables_plain_domain() {
        let r = on(PLAIN);
        assert_enabled(&r.xml);
        assert_eq!(
            r.changes,
            vec![
                Change::AddedQemuNamespace,
                Change::SetMetadata,
                Change::SetMemorySource(None),
                Change::SetMemoryAccess(None),
                Change::AddedPrivateQmp(socket()),
            ]
        );
        // New elements sit where libvirt puts them, indented like their neighbours.
        assert!(r.xml.contains(
            "  <uuid>6e3b1e9a-1b2c-4d5e-8f90-0123456789ab</uuid>\n  <metadata>\n    <vmbeam:beam xmlns:vmbeam=\"https://vmbeam.dev/xmlns/vmbeam/1\">\n      <vmbeam:cloud>acme</vmbeam:cloud>"
        ));
        assert!(r.xml.contains(
            "<currentMemory unit='KiB'>1048576</currentMemory>\n  <memoryBacking>\n    <source type='file'/>\n    <access mode='shared'/>\n  </memoryBacking>\n  <vcpu placement='static'>1</vcpu>"
        ));
        assert!(r.xml.contains(&format!(
            "  </devices>\n  <qemu:commandline>\n    <qemu:arg value='-qmp'/>\n    <qemu:arg value='unix:{QMP_DIR}/{UUID}.sock,server=on,wait=off'/>\n  </qemu:commandline>\n</domain>\n"
        )));
        assert!(r.xml.starts_with(
            "<domain type='kvm' xmlns:qemu=\"http://libvirt.org/schemas/domain/qemu/1.0\">\n"
        ));
        // Everything else is untouched, byte for byte.
        let devices = &PLAIN[PLAIN.find("  <os>").unwrap()..PLAIN.find("</domain>").unwrap()];
        assert!(r.xml.contains(devices));
    }

    #[test]
    fn enable_is_idempotent_and_disable_undoes_it() {
        for original in [PLAIN, RUNNING] {
            let first = on(original);
            let second = on(&first.xml);
            assert_eq!(second.xml, first.xml);
            assert_eq!(second.changes, vec![]);

            let off = disable(&first.xml).unwrap();
            assert_disabled(&off.xml);
            assert!(off.changes.contains(&Change::RemovedMetadata));
            assert!(off.changes.contains(&Change::RemovedPrivateQmp));
            // Back to the original, except the namespace declaration on <domain> (libvirt
            // drops unused ones when it stores the definition).
            let expected = if original == PLAIN {
                original.replacen(
                    "<domain type='kvm'>",
                    "<domain type='kvm' xmlns:qemu=\"http://libvirt.org/schemas/domain/qemu/1.0\">",
                    1,
                )
            } else {
                // RUNNING was enabled already but without metadata; disabling takes out the
                // backing and the monitor too.
                disable(original).unwrap().xml
            };
            assert_eq!(off.xml, expected);
            let again = disable(&off.xml).unwrap();
            assert_eq!(again.xml, off.xml);
            assert_eq!(again.changes, vec![]);
        }
    }

    #[test]
    fn disable_of_never_enabled_domain_changes_nothing() {
        let r = disable(PLAIN).unwrap();
        assert_eq!(r.xml, PLAIN);
        assert!(r.changes.is_empty());
    }

    #[test]
    fn replaces_memfd_and_drops_discard_and_prealloc() {
        let xml = PLAIN.replace(
            "  <vcpu",
            "  <memoryBacking>
    <nosharepages/>
    <source type='memfd'/>
    <access mode='private'/>
    <allocation mode='immediate' threads='4'/>
    <discard/>
    <locked/>
  </memoryBacking>
  <vcpu",
        );
        let r = on(&xml);
        assert_enabled(&r.xml);
        assert!(r.xml.contains(
            "  <memoryBacking>
    <nosharepages/>
    <locked/>
    <source type='file'/>
    <access mode='shared'/>
  </memoryBacking>"
        ));
        for change in [
            Change::RemovedDiscard,
            Change::RemovedImmediateAllocation,
            Change::SetMemorySource(Some(MemorySource::Memfd)),
            Change::SetMemoryAccess(Some(MemoryAccess::Private)),
        ] {
            assert!(r.changes.contains(&change), "{change}");
        }
        // Disable keeps the user's other settings.
        let off = disable(&r.xml).unwrap();
        let facts = assert_disabled(&off.xml);
        assert_eq!(facts.memory_backing, MemoryBacking::default());
        assert!(off
            .xml
            .contains("  <memoryBacking>\n    <nosharepages/>\n    <locked/>\n  </memoryBacking>"));
    }

    #[test]
    fn keeps_ondemand_allocation_and_anonymous_is_replaced() {
        let xml = PLAIN.replace(
            "  <vcpu",
            "  <memoryBacking>\n    <source type='anonymous'/>\n    <allocation mode='ondemand'/>\n  </memoryBacking>\n  <vcpu",
        );
        let r = on(&xml);
        let facts = assert_enabled(&r.xml);
        assert_eq!(
            facts.memory_backing.allocation,
            Some(AllocationMode::Ondemand)
        );
        assert!(r
            .changes
            .contains(&Change::SetMemorySource(Some(MemorySource::Anonymous))));
    }

    #[test]
    fn refuses_hugepages_and_numa() {
        let huge = PLAIN.replace(
            "  <vcpu",
            "  <memoryBacking>\n    <hugepages>\n      <page size='2048' unit='KiB'/>\n    </hugepages>\n  </memoryBacking>\n  <vcpu",
        );
        let err = enable(&huge, &meta(), Path::new(QMP_DIR)).unwrap_err();
        assert!(matches!(err, TransformError::Hugepages));
        assert!(err.to_string().contains("hugepages"));
        let numa = PLAIN.replace(
            "  <os>",
            "  <cpu>\n    <numa>\n      <cell id='0' cpus='0' memory='1048576' unit='KiB'/>\n    </numa>\n  </cpu>\n  <os>",
        );
        assert!(matches!(
            enable(&numa, &meta(), Path::new(QMP_DIR)),
            Err(TransformError::Numa(1))
        ));
    }

    #[test]
    fn existing_commandline_and_other_prefix() {
        // The qemu namespace under another prefix, a commandline with the user's own
        // arguments (including their own QMP socket) and a stale VMBeam monitor path.
        let xml = format!(
            "<domain type='kvm' xmlns:q='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>web1</name>
  <uuid>{UUID}</uuid>
  <memory>1048576</memory>
  <q:commandline>
    <q:arg value='-qmp'/>
    <q:arg value='unix:/tmp/user.sock,server=on,wait=off'/>
    <q:arg value='-qmp'/>
    <q:arg value='unix:/old/dir/{UUID}.sock,server=on,wait=off'/>
    <q:arg value='-global'/>
    <q:arg value='kvm-pit.lost_tick_policy=discard'/>
    <q:env name='A' value='b'/>
  </q:commandline>
</domain>"
        );
        let r = on(&xml);
        assert_enabled(&r.xml);
        assert!(!r.changes.contains(&Change::AddedQemuNamespace));
        assert!(!r.xml.contains("xmlns:qemu"));
        assert!(r.xml.contains(&format!(
            "  <q:commandline>
    <q:arg value='-qmp'/>
    <q:arg value='unix:/tmp/user.sock,server=on,wait=off'/>
    <q:arg value='-global'/>
    <q:arg value='kvm-pit.lost_tick_policy=discard'/>
    <q:env name='A' value='b'/>
    <q:arg value='-qmp'/>
    <q:arg value='unix:{QMP_DIR}/{UUID}.sock,server=on,wait=off'/>
  </q:commandline>"
        )));
        // Disable leaves the user's arguments.
        let off = disable(&r.xml).unwrap();
        assert_disabled(&off.xml);
        assert!(off.xml.contains("unix:/tmp/user.sock"));
        assert!(off.xml.contains("<q:env name='A' value='b'/>"));
    }

    #[test]
    fn repeated_commandlines_get_one_monitor() {
        let xml = format!(
            "<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>\n  <name>a</name>\n  <uuid>{UUID}</uuid>\n  <memory>1024</memory>\n  <qemu:commandline>\n    <qemu:arg value='-S'/>\n  </qemu:commandline>\n  <qemu:commandline>\n    <qemu:arg value='-qmp'/>\n    <qemu:arg value='unix:/old/{UUID}.sock'/>\n  </qemu:commandline>\n</domain>"
        );
        let r = on(&xml);
        assert_enabled(&r.xml);
        assert_eq!(r.xml.matches("value='-qmp'").count(), 1);
        // The second element held only our old monitor and is gone.
        assert_eq!(r.xml.matches("<qemu:commandline>").count(), 1);
        assert_eq!(on(&r.xml).xml, r.xml);
    }

    #[test]
    fn commandline_with_locally_declared_namespace() {
        let xml = format!(
            "<domain type='kvm'><name>a</name><uuid>{UUID}</uuid><memory>1024</memory><qemu:commandline xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'><qemu:arg value='-S'/></qemu:commandline></domain>"
        );
        let r = on(&xml);
        assert_enabled(&r.xml);
        // The existing element's own declaration is used; <domain> gets none.
        assert!(r.xml.starts_with("<domain type='kvm'>"));
        assert!(r.xml.contains("<qemu:arg value='-S'/>"));
        assert_eq!(on(&r.xml).xml, r.xml);
    }

    #[test]
    fn replaces_our_metadata_and_keeps_foreign_metadata() {
        let old = BeamMetadata {
            owner: HostId::new("cvm7").unwrap(),
            generation: 9,
            ..meta()
        };
        let xml = RUNNING.replace(
            "    </libosinfo:libosinfo>\n",
            &format!(
                "    </libosinfo:libosinfo>\n    {}\n    <nova:instance xmlns:nova='http://openstack.org/xmlns/libvirt/nova/1.1'/>\n",
                old.write_xml(Some("vb"), Some("    "))
            ),
        );
        assert_eq!(BeamMetadata::from_domain_xml(&xml).unwrap(), Some(old));
        let r = on(&xml);
        assert_enabled(&r.xml);
        assert_eq!(r.changes, vec![Change::SetMetadata]);
        assert!(r.xml.contains("libosinfo:os id="));
        assert!(r.xml.contains("<nova:instance"));
        assert!(!r.xml.contains("vb:"));
        // Disable keeps <metadata> for the others.
        let off = disable(&r.xml).unwrap();
        assert!(off.xml.contains("<metadata>"));
        assert!(off.xml.contains("<nova:instance"));
        // A metadata element holding only ours goes away entirely.
        let only_ours = disable(&on(PLAIN).xml).unwrap();
        assert!(!only_ours.xml.contains("<metadata"));
    }

    #[test]
    fn malformed_existing_metadata_is_replaced() {
        let xml = PLAIN.replace(
            "  <memory",
            "  <metadata>\n    <vmbeam:beam xmlns:vmbeam='https://vmbeam.dev/xmlns/vmbeam/1'><vmbeam:cloud>x</vmbeam:cloud></vmbeam:beam>\n  </metadata>\n  <memory",
        );
        assert!(BeamMetadata::from_domain_xml(&xml).is_err());
        let r = on(&xml);
        assert_enabled(&r.xml);
        assert!(r.changes.contains(&Change::SetMetadata));
    }

    #[test]
    fn expands_empty_elements() {
        let xml = format!(
            "<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>\n  <name>a</name>\n  <uuid>{UUID}</uuid>\n  <metadata/>\n  <memory>1024</memory>\n  <memoryBacking/>\n  <qemu:commandline/>\n</domain>"
        );
        let r = on(&xml);
        assert_enabled(&r.xml);
        assert!(r.xml.contains("  <metadata>\n    <vmbeam:beam"));
        assert!(r.xml.contains(
            "  <memoryBacking>\n    <source type='file'/>\n    <access mode='shared'/>\n  </memoryBacking>"
        ));
        assert!(r
            .xml
            .contains("  <qemu:commandline>\n    <qemu:arg value='-qmp'/>"));
        let off = disable(&r.xml).unwrap();
        assert_disabled(&off.xml);
        assert!(!off.xml.contains("<metadata"));
        assert!(!off.xml.contains("<memoryBacking"));
        assert!(!off.xml.contains("commandline"));
    }

    #[test]
    fn compact_document_and_prolog_preserved() {
        let xml = format!(
            "<?xml version=\"1.0\"?>\n<!-- defined by hand -->\n<domain type='qemu'><name>a</name><uuid>{UUID}</uuid><!-- memory --><memory unit='MiB'>64</memory><devices><console type='pty'/></devices></domain>\n"
        );
        let r = on(&xml);
        let facts = assert_enabled(&r.xml);
        assert_eq!(facts.memory_kib, 64 * 1024);
        assert!(r
            .xml
            .starts_with("<?xml version=\"1.0\"?>\n<!-- defined by hand -->\n<domain"));
        // Nothing had whitespace, so the new elements have none either.
        assert!(r.xml.contains(&format!(
            "<uuid>{UUID}</uuid><!-- memory --><metadata><vmbeam:beam xmlns:vmbeam=\"https://vmbeam.dev/xmlns/vmbeam/1\"><vmbeam:cloud>acme</vmbeam:cloud>"
        )));
        assert!(r.xml.contains(
            "</metadata><memory unit='MiB'>64</memory><memoryBacking><source type='file'/><access mode='shared'/></memoryBacking><devices>"
        ));
        assert!(r
            .xml
            .contains("</devices><qemu:commandline><qemu:arg value='-qmp'/><qemu:arg"));
        assert!(r.xml.ends_with("</domain>\n"));
        assert_eq!(on(&r.xml).changes, vec![]);
        let off = disable(&r.xml).unwrap();
        assert_disabled(&off.xml);
    }

    #[test]
    fn unknown_elements_do_not_move_insertions() {
        // An element libvirt does not know (or a foreign namespace one) is not an anchor.
        let xml = format!(
            "<domain type='kvm'>\n  <name>a</name>\n  <uuid>{UUID}</uuid>\n  <x:thing xmlns:x='urn:x'/>\n  <memory>1024</memory>\n</domain>"
        );
        let r = on(&xml);
        assert_enabled(&r.xml);
        let thing = r.xml.find("<x:thing").unwrap();
        let metadata = r.xml.find("<metadata>").unwrap();
        let memory = r.xml.find("<memory>").unwrap();
        assert!(thing < metadata && metadata < memory);
    }

    #[test]
    fn errors() {
        let cases: Vec<(String, Check)> = vec![
            ("<domain".into(), |e| {
                matches!(e, TransformError::Domain(DomainError::Xml(_)))
            }),
            ("<network/>".into(), |e| {
                matches!(e, TransformError::Domain(DomainError::NotADomain(_)))
            }),
            (
                "<domain type='kvm'><name>a</name><memory>1</memory></domain>".into(),
                |e| matches!(e, TransformError::Domain(DomainError::Missing("uuid"))),
            ),
            (
                PLAIN.replace(
                    "<domain type='kvm'>",
                    "<domain type='kvm' xmlns:qemu='urn:other'>",
                ),
                |e| matches!(e, TransformError::PrefixClash(ns) if ns == "urn:other"),
            ),
        ];
        for (xml, check) in cases {
            let err = enable(&xml, &meta(), Path::new(QMP_DIR)).unwrap_err();
            assert!(check(&err), "{xml}: {err:?}");
        }
        for dir in ["relative/qmp", "/run/a,b"] {
            assert!(matches!(
                enable(PLAIN, &meta(), Path::new(dir)),
                Err(TransformError::BadQmpDir(_))
            ));
        }
        assert!(matches!(
            disable("<domain><name>x"),
            Err(TransformError::Domain(_))
        ));
    }

    #[test]
    fn change_messages() {
        assert_eq!(
            Change::SetMemorySource(Some(MemorySource::Memfd)).to_string(),
            "memory source changed from memfd to a file"
        );
        assert_eq!(
            Change::AddedPrivateQmp(socket()).to_string(),
            format!("private QMP monitor added at {QMP_DIR}/{UUID}.sock")
        );
    }
}
