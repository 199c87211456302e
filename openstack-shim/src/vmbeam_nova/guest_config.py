"""What a beam-enabled guest's libvirt XML carries, built with Nova's own
guest-config objects (nova.virt.libvirt.config), never by editing XML text.

It is what ``vmbeam enable`` (vmbeamd's ``Manager.Enable``, the Rust
``vmbeam_core::transform::enable``) writes:

- ``<memoryBacking>``: ``<source type='file'/>`` and ``<access mode='shared'/>``
  (the guest's RAM is a file in the beam pool, which the destination cloud VM
  maps too), without ``<discard/>`` (it would punch the RAM out of the shared
  file at teardown) and ``<allocation mode='immediate'/>`` (the destination's
  QEMU would touch every page the source guest is running on);
- ``<qemu:commandline>``: vmbeamd's private monitor,
  ``-qmp unix:<qmp_dir>/<uuid>.sock,server=on,wait=off``;
- ``<metadata>``: VMBeam's element (namespace https://vmbeam.dev/xmlns/vmbeam/1)
  with the cloud, the pool, the owner (this host) and the generation.

Hugepages and guest NUMA cells are refused, as vmbeamd refuses them: hugepage
memory lives on hugetlbfs, not in the pool, and each NUMA cell gets a RAM file
of its own, which VMBeam does not link.
"""

import dataclasses
import tomllib

from lxml import etree
from nova.virt.libvirt import config as vconfig
from oslo_utils import strutils

NAMESPACE = "https://vmbeam.dev/xmlns/vmbeam/1"
PREFIX = "vmbeam"
QEMU_NAMESPACE = "http://libvirt.org/schemas/domain/qemu/1.0"

#: Flavor extra spec and image property that ask for a beam-enabled guest.
EXTRA_SPEC = "vmbeam:enabled"
IMAGE_PROPERTY = "vmbeam_enabled"


class CannotEnable(Exception):
    """The guest cannot be beam-enabled as Nova configured it."""


@dataclasses.dataclass(frozen=True)
class BeamIdentity:
    """This cloud VM as vmbeamd knows it."""

    host_id: str
    cloud: str
    pool: str


def read_identity_file(path):
    """host_id, cloud and pool_dir from vmbeamd's own configuration file."""
    with open(path, "rb") as f:
        doc = tomllib.load(f)
    try:
        return BeamIdentity(
            host_id=str(doc["host_id"]),
            cloud=str(doc["cloud"]),
            pool=str(doc.get("pool_dir", "/var/lib/vmbeam/pool")),
        )
    except KeyError as e:
        raise ValueError("%s has no %s" % (path, e)) from e


def parse_flag(value):
    """True, False, or None for "not said"; ValueError for anything else."""
    if value is None:
        return None
    # Exactly what Nova's extra spec validation accepts for a boolean.
    return strutils.bool_from_string(str(value).strip(), strict=True)


def beam_requested(instance, enable_all):
    """Whether this instance should be beam-enabled, and why.

    The flavor's extra spec decides when it is set, else the image property
    (Nova keeps every image property in the instance's system metadata as
    ``image_<name>``), else the host's ``[vmbeam] enable_all``.
    """
    flavor = instance.flavor
    specs = (flavor.extra_specs or {}) if flavor is not None else {}
    try:
        f = parse_flag(specs.get(EXTRA_SPEC))
    except ValueError as e:
        return False, "flavor extra spec %s: %s" % (EXTRA_SPEC, e)
    if f is not None:
        return f, "flavor %s has %s=%s" % (flavor.name, EXTRA_SPEC, specs[EXTRA_SPEC])
    sysmeta = instance.system_metadata or {}
    key = "image_" + IMAGE_PROPERTY
    try:
        i = parse_flag(sysmeta.get(key))
    except ValueError as e:
        return False, "image property %s: %s" % (IMAGE_PROPERTY, e)
    if i is not None:
        return i, "image has %s=%s" % (IMAGE_PROPERTY, sysmeta[key])
    if enable_all:
        return True, "[vmbeam] enable_all is set on this host"
    return False, "neither flavor (%s) nor image (%s) asks for it and [vmbeam] enable_all is off" % (
        EXTRA_SPEC,
        IMAGE_PROPERTY,
    )


class LibvirtConfigVMBeamMetadata(vconfig.LibvirtConfigObject):
    """VMBeam's element in ``<metadata>`` (beam-core/src/metadata.rs)."""

    def __init__(self, **kwargs):
        super().__init__(root_name="beam", ns_prefix=PREFIX, ns_uri=NAMESPACE, **kwargs)
        self.cloud = None
        self.pool = None
        self.owner = None
        self.generation = 0
        self.pool_file = None

    def format_dom(self):
        root = super().format_dom()
        root.append(self._text_node("cloud", self.cloud))
        root.append(self._text_node("pool", self.pool))
        root.append(self._text_node("owner", self.owner))
        root.append(self._text_node("generation", int(self.generation)))
        if self.pool_file:
            root.append(self._text_node("pool-file", self.pool_file))
        return root

    def parse_dom(self, xmldoc):
        # Matched by namespace URI, whatever the prefix (as vmbeamd does).
        if xmldoc.tag != "{%s}beam" % NAMESPACE:
            raise ValueError("not VMBeam's metadata element: %s" % xmldoc.tag)
        for c in xmldoc:
            if not isinstance(c.tag, str):
                continue
            name = etree.QName(c).localname
            text = (c.text or "").strip()
            if name == "cloud":
                self.cloud = text
            elif name == "pool":
                self.pool = text
            elif name == "owner":
                self.owner = text
            elif name == "generation":
                self.generation = int(text)
            elif name == "pool-file":
                self.pool_file = text


class LibvirtConfigQemuCommandline(vconfig.LibvirtConfigObject):
    """``<qemu:commandline>`` with ``<qemu:arg value=.../>`` children."""

    def __init__(self, **kwargs):
        super().__init__(
            root_name="commandline", ns_prefix="qemu", ns_uri=QEMU_NAMESPACE, **kwargs
        )
        self.args = []

    def format_dom(self):
        root = super().format_dom()
        for a in self.args:
            root.append(self._new_node("arg", value=a))
        return root


class VMBeamLibvirtConfigGuest(vconfig.LibvirtConfigGuest):
    """Nova's guest config plus ``<qemu:commandline>`` (which Nova's object
    model has no place for); the ``qemu`` namespace is declared on
    ``<domain>``, as libvirt writes it."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.qemu_commandline = None

    @classmethod
    def from_guest(cls, guest):
        new = cls.__new__(cls)
        new.__dict__.update(guest.__dict__)
        new.qemu_commandline = getattr(guest, "qemu_commandline", None)
        return new

    def format_dom(self):
        root = super().format_dom()
        if self.qemu_commandline is None:
            return root
        nsmap = dict(root.nsmap)
        nsmap["qemu"] = QEMU_NAMESPACE
        new = etree.Element(root.tag, attrib=dict(root.attrib), nsmap=nsmap)
        new.text = root.text
        new.extend(list(root))
        new.append(self.qemu_commandline.format_dom())
        return new


def qmp_socket(qmp_dir, uuid):
    return "%s/%s.sock" % (qmp_dir.rstrip("/"), uuid)


def qmp_arg_value(qmp_dir, uuid):
    return "unix:%s,server=on,wait=off" % qmp_socket(qmp_dir, uuid)


def beam_enable(guest, identity, qmp_dir, generation=0):
    """Returns (beam-enabled guest config, what changed), or raises CannotEnable."""
    if not qmp_dir.startswith("/") or "," in qmp_dir:
        raise CannotEnable("[vmbeam] qmp_dir %r must be an absolute path without ','" % qmp_dir)
    mb = guest.membacking
    if mb is not None and mb.hugepages:
        raise CannotEnable(
            "memory is backed by hugepages, which cannot live in the beam pool"
        )
    if guest.cpu is not None and guest.cpu.numa is not None and guest.cpu.numa.cells:
        raise CannotEnable(
            "guest NUMA topology (%d cells) is not supported: each cell has its own RAM file"
            % len(guest.cpu.numa.cells)
        )
    changes = []
    if mb is None:
        mb = vconfig.LibvirtConfigGuestMemoryBacking()
        guest.membacking = mb
    if not mb.filesource:
        mb.filesource = True
        changes.append("memory source set to a file")
    if not mb.sharedaccess:
        mb.sharedaccess = True
        changes.append("memory access set to shared")
    if mb.discard:
        mb.discard = False
        changes.append("<discard/> removed from <memoryBacking>")
    if mb.allocateimmediate:
        mb.allocateimmediate = False
        changes.append("memory preallocation (allocation mode immediate) removed")

    out = VMBeamLibvirtConfigGuest.from_guest(guest)
    value = qmp_arg_value(qmp_dir, guest.uuid)
    cl = out.qemu_commandline or LibvirtConfigQemuCommandline()
    if value not in cl.args:
        cl.args.extend(["-qmp", value])
        changes.append("private QMP monitor added at %s" % qmp_socket(qmp_dir, guest.uuid))
    out.qemu_commandline = cl

    meta = LibvirtConfigVMBeamMetadata()
    meta.cloud = identity.cloud
    meta.pool = identity.pool
    meta.owner = identity.host_id
    meta.generation = generation
    out.metadata = [m for m in out.metadata if not isinstance(m, LibvirtConfigVMBeamMetadata)]
    out.metadata.append(meta)
    changes.append("VMBeam metadata written (cloud %s, owner %s)" % (identity.cloud, identity.host_id))
    return out, changes


def metadata_of_domain_xml(xml):
    """VMBeam's metadata of a domain XML, or None when it has none."""
    root = etree.fromstring(xml.encode() if isinstance(xml, str) else xml)
    found = root.findall("./metadata/{%s}beam" % NAMESPACE)
    if not found:
        return None
    meta = LibvirtConfigVMBeamMetadata()
    meta.parse_dom(found[0])
    return meta


def private_qmp_of_domain_xml(xml, uuid):
    """The private QMP socket path of a domain XML, or None."""
    root = etree.fromstring(xml.encode() if isinstance(xml, str) else xml)
    args = [
        a.get("value")
        for a in root.findall("./{%s}commandline/{%s}arg" % (QEMU_NAMESPACE, QEMU_NAMESPACE))
    ]
    for flag, value in zip(args, args[1:], strict=False):
        if flag == "-qmp" and value and value.startswith("unix:"):
            path = value[len("unix:"):].split(",", 1)[0]
            if path.startswith("/") and path.rsplit("/", 1)[-1] == "%s.sock" % uuid:
                return path
    return None
