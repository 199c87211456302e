"""vmbeamd's D-Bus contract as the server is held to it: the introspection XML
checked in at bus-api/org.vmbeam.VMBeam1.xml (a vmbeamd unit test compares it
with what the daemon serves). The fake daemon checks every call against it, so
a client call the real daemon would refuse fails the unit tests too."""

import os
import xml.etree.ElementTree as ET

XML_PATH = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "bus-api", "org.vmbeam.VMBeam1.xml"
)
STANDARD = ("org.freedesktop.DBus.Properties", "org.freedesktop.DBus.Introspectable", "org.freedesktop.DBus.Peer")


def load():
    """{interface: {"methods": {name: in-signature}, "properties": {name: type}}}."""
    root = ET.parse(XML_PATH).getroot()
    out = {}
    for iface in root.findall("interface"):
        methods = {
            m.get("name"): "".join(a.get("type") for a in m.findall("arg") if a.get("direction", "in") == "in")
            for m in iface.findall("method")
        }
        props = {p.get("name"): p.get("type") for p in iface.findall("property")}
        out[iface.get("name")] = {"methods": methods, "properties": props}
    return out


CONTRACT = load()


class ContractError(AssertionError):
    pass


def check_call(iface, member, signature):
    if iface in STANDARD:
        return
    methods = CONTRACT.get(iface, {}).get("methods")
    if methods is None:
        raise ContractError("vmbeamd serves no interface %s" % iface)
    if member not in methods:
        raise ContractError("%s has no method %s" % (iface, member))
    if methods[member] != signature:
        raise ContractError("%s.%s takes (%s), not (%s)" % (iface, member, methods[member], signature))


def check_property(iface, name):
    if name not in CONTRACT.get(iface, {}).get("properties", {}):
        raise ContractError("%s has no property %s" % (iface, name))
