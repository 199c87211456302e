"""Neutron stand-in: the part of Neutron's API v2.0 that Nova 34 uses, and nothing else.

Not neutron-server (why: scripts/openstack/README.md, "Neutron stand-in"). One WSGI
application, served by scripts/openstack.sh with gunicorn at ADDR:9696 behind
keystonemiddleware's auth_token (GET / answers without a token, as Neutron's does).

- networks, subnets (IPv4; allocation pools, gateway), ports (MAC fa:16:3e:xx:xx:xx, fixed
  IPs allocated from the network's subnets, device_id/device_owner, security_groups);
- port binding ("binding": binding:host_id, vif_type, vif_details, vnic_type, profile)
  and multiple bindings ("binding-extended": /ports/P/bindings[/HOST[/activate]]);
  a port bound to a host is bound at once, vif_type "tap", and ACTIVE: there is no
  agent and no dataplane to wait for;
- a default security group per project (no rules, nothing enforced), floating IPs (always
  none), quotas (unlimited), the extension list and the version documents;
- network-vif-plugged events to Nova (os-server-external-events, as the neutron service
  user), as Neutron's nova notifier sends them: when a compute port becomes ACTIVE (bound
  to a host), when the destination of a live migration says it has wired the port
  (binding:profile migrating_to, Neutron's notify_port_active_direct), and when a binding
  is activated.

State: one JSON file, read under a file lock by every request and rewritten atomically
(os.replace) by every request that changes something; a failed request writes nothing.

    VMBEAM_NEUTRON_STANDIN_CONF=/path/neutron.conf gunicorn neutron_standin:application

neutron.conf: [DEFAULT] state_file; [keystone_authtoken] (keystonemiddleware); [nova]
keystoneauth options of the user that sends events (none: no events) and region_name.
"""

import copy
import datetime
import fcntl
import ipaddress
import json
import logging
import os
import queue
import random
import re
import threading
import uuid

import webob

LOG = logging.getLogger("neutron-standin")

VIF_TYPE = "tap"  # nova.network.model.VIF_TYPE_TAP: <interface type='ethernet'>, tap made by privsep
VIF_DETAILS = {"port_filter": False, "connectivity": "l2"}
MTU = 1500
EXTENSIONS = {
    "binding": ("Port Binding", "binding:* attributes of ports"),
    "binding-extended": ("Port Bindings Extended", "several bindings per port (live migration)"),
    "security-group": ("security-group", "a default group per project; no rules are enforced"),
    "quotas": ("Quota management support", "unlimited"),
    "net-mtu": ("Network MTU", "mtu of networks (1500)"),
    "external-net": ("Neutron external network", "router:external (always false)"),
    "project-id": ("project_id field enabled", "project_id beside tenant_id"),
}
# Attributes a client may set: on create (POST) and on update (PUT).
CREATE = {
    "network": {"name", "description", "admin_state_up", "shared", "tenant_id", "project_id", "router:external"},
    "subnet": {"name", "description", "network_id", "cidr", "ip_version", "gateway_ip", "allocation_pools",
               "enable_dhcp", "dns_nameservers", "host_routes", "tenant_id", "project_id"},
    "port": {"name", "description", "network_id", "admin_state_up", "mac_address", "fixed_ips", "device_id",
             "device_owner", "security_groups", "tenant_id", "project_id", "binding:host_id", "binding:profile",
             "binding:vnic_type"},
}
UPDATE = {
    "network": {"name", "description", "admin_state_up", "shared"},
    "subnet": {"name", "description", "enable_dhcp", "dns_nameservers"},
    "port": {"name", "description", "admin_state_up", "device_id", "device_owner", "security_groups",
             "binding:host_id", "binding:profile", "binding:vnic_type"},
}
PAGING = {"fields", "limit", "marker", "sort_key", "sort_dir", "page_reverse"}
# What a list can be filtered by: the attributes of each kind's view.
_COMMON = {"id", "name", "description", "tenant_id", "project_id", "created_at", "updated_at", "revision_number",
           "tags"}
ATTRS = {
    "network": _COMMON | {"mtu", "status", "subnets", "shared", "admin_state_up", "router:external"},
    "subnet": _COMMON | {"cidr", "gateway_ip", "ip_version", "network_id", "enable_dhcp", "allocation_pools",
                         "dns_nameservers", "host_routes", "ipv6_address_mode", "ipv6_ra_mode", "subnetpool_id"},
    "port": _COMMON | {"status", "admin_state_up", "mac_address", "fixed_ips", "allowed_address_pairs", "network_id",
                       "device_id", "device_owner", "security_groups", "binding:host_id", "binding:profile",
                       "binding:vnic_type", "binding:vif_type", "binding:vif_details"},
    "security_group": _COMMON | {"security_group_rules", "stateful", "shared"},
    "binding": {"host", "vif_type", "vif_details", "vnic_type", "profile", "status"},
}


class Fault(Exception):
    """A NeutronError answer: HTTP status, Neutron's exception type name, message."""

    def __init__(self, status, kind, message):
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message

    def response(self):
        body = {"NeutronError": {"type": self.kind, "message": self.message, "detail": ""}}
        return webob.Response(status=self.status, json_body=body, charset="utf-8")


def bad(message):
    return Fault(400, "HTTPBadRequest", message)


def invalid(message):
    return Fault(400, "InvalidInput", f"Invalid input for operation: {message}.")


def not_found(kind, rid):
    words = {"network": "Network", "subnet": "Subnet", "port": "Port"}
    if kind == "security_group":
        return Fault(404, "SecurityGroupNotFound", f"Security group {rid} does not exist")
    return Fault(404, f"{words[kind]}NotFound", f"{words[kind]} {rid} could not be found.")


def now():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def boolean(name, value):
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise invalid(f"'{value}' is not a valid boolean value for {name}")


def text(name, value):
    if not isinstance(value, str) or len(value) > 255:
        raise invalid(f"'{value}' is not a valid string for {name}")
    return value


class Store:
    """The JSON state file, under an exclusive lock for the length of one request."""

    EMPTY = {"networks": {}, "subnets": {}, "ports": {}, "security_groups": {}}

    def __init__(self, path):
        self.path = path
        self.mutex = threading.Lock()

    def __enter__(self):
        self.mutex.acquire()
        self.lockf = open(self.path + ".lock", "a")
        fcntl.flock(self.lockf, fcntl.LOCK_EX)
        try:
            with open(self.path) as f:
                self.data = json.load(f)
        except FileNotFoundError:
            self.data = copy.deepcopy(self.EMPTY)
        self.before = json.dumps(self.data, sort_keys=True)
        return self.data

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None and json.dumps(self.data, sort_keys=True) != self.before:
                tmp = f"{self.path}.tmp.{os.getpid()}"
                with open(tmp, "w") as f:
                    json.dump(self.data, f, indent=1, sort_keys=True)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
        finally:
            fcntl.flock(self.lockf, fcntl.LOCK_UN)
            self.lockf.close()
            self.mutex.release()


class NovaNotifier:
    """Sends os-server-external-events to Nova from a thread of its own, as Neutron's
    nova notifier does (without its 2 s batching)."""

    def __init__(self, session, region):
        self.session, self.region = session, region
        self.q = queue.Queue()
        threading.Thread(target=self._run, name="nova-notifier", daemon=True).start()

    def __call__(self, events):
        self.q.put(events)

    def _run(self):
        while True:
            events = self.q.get()
            try:
                r = self.session.post(
                    "/os-server-external-events", json={"events": events}, raise_exc=False,
                    endpoint_filter={"service_type": "compute", "interface": "public", "region_name": self.region})
                answer = r.json().get("events", r.text) if r.headers.get("content-type", "").startswith(
                    "application/json") else r.text
                LOG.info("nova events %s: HTTP %s %s", events, r.status_code, answer)
            except Exception:  # noqa: BLE001 - a lost event is logged, as Neutron does
                LOG.exception("sending events %s to Nova failed", events)


class StandIn:
    def __init__(self, state_file, notify=None):
        self.store = Store(state_file)
        self.notify = notify or (lambda events: LOG.info("no Nova notifier: events %s not sent", events))

    # ---- WSGI

    def __call__(self, environ, start_response):
        req = webob.Request(environ)
        events = []
        try:
            resp = self.dispatch(req, events)
        except Fault as f:
            resp = f.response()
        except Exception:  # noqa: BLE001
            LOG.exception("%s %s", req.method, req.path_qs)
            resp = Fault(500, "HTTPInternalServerError", "Request Failed: internal server error while "
                         "processing your request.").response()
        else:
            if events:
                self.notify(events)
        LOG.info("%s %s -> %s", req.method, req.path_qs, resp.status)
        return resp(environ, start_response)

    ROUTES = [
        (r"", "versions"),
        (r"/v2\.0", "resources"),
        (r"/v2\.0/extensions", "extensions"),
        (r"/v2\.0/extensions/(?P<alias>[^/]+)", "extension"),
        (r"/v2\.0/(?P<coll>networks|subnets|ports)", "collection"),
        (r"/v2\.0/(?P<coll>networks|subnets|ports)/(?P<rid>[^/]+)", "member"),
        (r"/v2\.0/ports/(?P<rid>[^/]+)/bindings", "bindings"),
        (r"/v2\.0/ports/(?P<rid>[^/]+)/bindings/(?P<host>[^/]+)", "binding"),
        (r"/v2\.0/ports/(?P<rid>[^/]+)/bindings/(?P<host>[^/]+)/activate", "activate"),
        (r"/v2\.0/security-groups", "security_groups"),
        (r"/v2\.0/security-groups/(?P<rid>[^/]+)", "security_group"),
        (r"/v2\.0/floatingips", "floatingips"),
        (r"/v2\.0/quotas/(?P<project>[^/]+)", "quota"),
    ]
    METHODS = {"collection": ("GET", "POST"), "member": ("GET", "PUT", "DELETE"), "bindings": ("GET", "POST"),
               "binding": ("GET", "DELETE"), "activate": ("PUT",)}

    def dispatch(self, req, events):
        path = req.path_info.rstrip("/")
        if path.endswith(".json"):
            path = path[:-5]
        m, name = next(((m, n) for m, n in ((re.fullmatch(p, path), n) for p, n in self.ROUTES) if m), (None, None))
        if m is None:
            raise Fault(404, "HTTPNotFound", "The resource could not be found.")
        if req.method not in self.METHODS.get(name, ("GET",)):
            raise Fault(405, "HTTPMethodNotAllowed", f"The method {req.method} is not allowed for this resource.")
        args = m.groupdict()
        if name == "versions":
            return self.json(self.versions(req))
        if name == "resources":
            base = req.host_url + "/v2.0/"
            return self.json({"resources": [{"name": c[:-1], "collection": c, "links": [
                {"href": base + c, "rel": "self"}]} for c in ("networks", "subnets", "ports", "security-groups")]})
        if name == "extensions":
            return self.json({"extensions": [self.extension_doc(a) for a in EXTENSIONS]})
        if name == "extension":
            if args["alias"] not in EXTENSIONS:
                raise Fault(404, "HTTPNotFound", f"Extension with alias {args['alias']} does not exist")
            return self.json({"extension": self.extension_doc(args["alias"])})
        if name == "floatingips":
            return self.json({"floatingips": []})
        if name == "quota":
            return self.json({"quota": {k: -1 for k in ("network", "subnet", "port", "security_group",
                                                         "security_group_rule")}})
        ctx = self.context(req)
        body = self.body(req) if req.method in ("POST", "PUT") and name != "activate" else None
        with self.store as st:
            st.setdefault("security_groups", {})
            if name == "collection":
                kind = args["coll"][:-1]
                if req.method == "GET":
                    items = [self.view(kind, r, st) for r in st[args["coll"]].values() if self.visible(ctx, r)]
                    return self.json({args["coll"]: self.select(items, req, kind)})
                item = getattr(self, "create_" + kind)(st, ctx, self.resource(body, kind, CREATE[kind]), events)
                return self.json({kind: self.view(kind, item, st)}, 201)
            if name == "member":
                kind = args["coll"][:-1]
                item = self.get(st, ctx, kind, args["rid"])
                if req.method == "GET":
                    return self.json({kind: self.project(self.view(kind, item, st), req)})
                if req.method == "DELETE":
                    getattr(self, "delete_" + kind)(st, item)
                    return webob.Response(status=204)
                getattr(self, "update_" + kind)(st, item, self.resource(body, kind, UPDATE[kind], "PUT"), events)
                self.touch(item)
                return self.json({kind: self.view(kind, item, st)})
            if name in ("security_groups", "security_group"):
                self.default_group(st, ctx["project"])
                groups = [g for g in st["security_groups"].values() if self.visible(ctx, g)]
                if name == "security_groups":
                    return self.json({"security_groups": self.select(groups, req, "security_group")})
                group = self.get(st, ctx, "security_group", args["rid"])
                return self.json({"security_group": self.project(group, req)})
            port = self.get(st, ctx, "port", args["rid"])
            return getattr(self, "port_" + name)(port, args.get("host"), body, req, events)

    # ---- helpers

    @staticmethod
    def json(body, status=200):
        return webob.Response(status=status, json_body=body, charset="utf-8")

    @staticmethod
    def versions(req):
        return {"versions": [{"id": "v2.0", "status": "CURRENT",
                              "links": [{"href": req.host_url + "/v2.0/", "rel": "self"}]}]}

    @staticmethod
    def extension_doc(alias):
        name, desc = EXTENSIONS[alias]
        return {"alias": alias, "name": name, "description": desc, "updated": "2026-12-02T00:00:00-00:00",
                "links": []}

    @staticmethod
    def context(req):
        """Who asks (keystonemiddleware's headers): the project, and whether it sees all."""
        roles = {r.strip().lower() for r in req.headers.get("X-Roles", "").split(",") if r.strip()}
        project = req.headers.get("X-Project-Id") or "standin-project"
        admin = bool(roles & {"admin", "service"}) or "X-Roles" not in req.headers
        return {"project": project, "admin": admin}

    @staticmethod
    def visible(ctx, item):
        return ctx["admin"] or item.get("tenant_id") == ctx["project"] or item.get("shared")

    def get(self, st, ctx, kind, rid):
        item = st[kind + "s"].get(rid)
        if item is None or not self.visible(ctx, item):
            raise not_found(kind, rid)
        return item

    @staticmethod
    def body(req):
        try:
            body = json.loads(req.body or b"null")
        except ValueError:
            raise bad("Malformed request body") from None
        if not isinstance(body, dict):
            raise bad("Malformed request body: a JSON object is expected")
        return body

    @staticmethod
    def resource(body, kind, allowed, method="POST"):
        if not isinstance(body.get(kind), dict) or len(body) != 1:
            raise bad(f"Resource body required: {{\"{kind}\": {{...}}}} (bulk requests are not supported)")
        attrs = body[kind]
        unknown = sorted(set(attrs) - allowed)
        readonly = {"id", "status", "subnets", "mtu", "revision_number", "tenant_id", "project_id", "network_id",
                    "created_at", "updated_at", "binding:vif_type", "binding:vif_details"}
        if set(unknown) & readonly:
            raise bad(f"Cannot update read-only attribute(s) {', '.join(sorted(set(unknown) & readonly))}")
        if method == "PUT" and set(unknown) & CREATE[kind]:
            raise bad(f"The Neutron stand-in does not update {', '.join(sorted(set(unknown) & CREATE[kind]))} "
                      f"of a {kind}")
        if unknown:
            raise bad(f"Unrecognized attribute(s) '{', '.join(unknown)}'")
        return attrs

    @staticmethod
    def project(item, req):
        fields = req.GET.getall("fields")
        return {k: v for k, v in item.items() if k in fields} if fields else item

    def select(self, items, req, kind):
        """Neutron's list filters: ?attr=value (repeated: any of), fixed_ips=ip_address=A|subnet_id=S."""
        for key in set(req.GET.keys()) - PAGING:
            values = req.GET.getall(key)
            if key == "fixed_ips" and kind == "port":
                want = [tuple(v.split("=", 1)) for v in values]
                if any(len(w) != 2 or w[0] not in ("ip_address", "subnet_id") for w in want):
                    raise bad(f"Invalid fixed_ips filter {values}: ip_address=A or subnet_id=S")
                items = [i for i in items if any(ip.get(a) == v for a, v in want for ip in i["fixed_ips"])]
                continue
            if key not in ATTRS[kind]:
                raise bad(f"[{key}] is invalid attribute for filtering")

            def match(v, want=values):
                if isinstance(v, bool):
                    return str(v).lower() in [w.lower() for w in want]
                if isinstance(v, list):
                    return any(str(x) in want for x in v)
                return ("" if v is None else str(v)) in want

            items = [i for i in items if match(i.get(key))]
        return [self.project(i, req) for i in items]

    @staticmethod
    def new(ctx, attrs, **fields):
        project = attrs.get("project_id") or attrs.get("tenant_id") or ctx["project"]
        if attrs.get("project_id") and attrs.get("tenant_id") and attrs["project_id"] != attrs["tenant_id"]:
            raise invalid("tenant_id and project_id differ")
        t = now()
        item = {"id": str(uuid.uuid4()), "name": text("name", attrs.get("name", "")),
                "description": text("description", attrs.get("description", "")),
                "tenant_id": text("project_id", project), "created_at": t, "updated_at": t,
                "revision_number": 0, "tags": []}
        item.update(fields)
        return item

    @staticmethod
    def touch(item):
        item["updated_at"] = now()
        item["revision_number"] += 1

    def view(self, kind, item, st):
        out = {k: v for k, v in item.items() if not k.startswith("_")}
        out["project_id"] = item["tenant_id"]
        if kind == "network":
            out["subnets"] = [s["id"] for s in st["subnets"].values() if s["network_id"] == item["id"]]
        return out

    # ---- networks

    def create_network(self, st, ctx, attrs, events):
        if boolean("router:external", attrs.get("router:external", False)):
            raise invalid("the Neutron stand-in has no external networks")
        net = self.new(ctx, attrs, admin_state_up=boolean("admin_state_up", attrs.get(
            "admin_state_up", True)), shared=boolean("shared", attrs.get("shared", False)), status="ACTIVE",
            mtu=MTU, **{"router:external": False})
        st["networks"][net["id"]] = net
        return net

    def update_network(self, st, net, attrs, events):
        for k in ("name", "description"):
            if k in attrs:
                net[k] = text(k, attrs[k])
        for k in ("admin_state_up", "shared"):
            if k in attrs:
                net[k] = boolean(k, attrs[k])

    def delete_network(self, st, net):
        if any(p["network_id"] == net["id"] for p in st["ports"].values()):
            raise Fault(409, "NetworkInUse", f"Unable to complete operation on network {net['id']}. "
                        "There are one or more ports still in use on the network.")
        for sid in [s["id"] for s in st["subnets"].values() if s["network_id"] == net["id"]]:
            del st["subnets"][sid]
        del st["networks"][net["id"]]

    # ---- subnets

    def create_subnet(self, st, ctx, attrs, events):
        if "network_id" not in attrs or "cidr" not in attrs:
            raise bad("Failed to parse request. Required attributes network_id and cidr")
        net = self.get(st, ctx, "network", attrs["network_id"])
        if attrs.get("ip_version", 4) not in (4, "4"):
            raise invalid("the Neutron stand-in has IPv4 subnets only (ip_version 4)")
        try:
            cidr = ipaddress.IPv4Network(text("cidr", attrs["cidr"]))
        except ValueError:
            raise invalid(f"'{attrs['cidr']}' is not a valid IPv4 subnet (address/prefix length)") from None
        if cidr.num_addresses < 4:
            raise invalid(f"subnet {cidr} has no room for addresses (a prefix length of at most 30 is needed)")
        for other in st["subnets"].values():
            if other["network_id"] == net["id"] and ipaddress.IPv4Network(other["cidr"]).overlaps(cidr):
                raise invalid(f"Requested subnet with cidr: {cidr} for network: {net['id']} overlaps with "
                              "another subnet")
        hosts = list(cidr.hosts())
        gw = attrs.get("gateway_ip", str(hosts[0]))
        if gw is not None and (not self.is_ip(gw) or ipaddress.IPv4Address(gw) not in cidr):
            raise invalid(f"Gateway ip {gw} is not an address of subnet {cidr}")
        if "allocation_pools" in attrs:
            pools = attrs["allocation_pools"]
            if not isinstance(pools, list) or not all(isinstance(p, dict) and self.is_ip(p.get("start"))
                                                       and self.is_ip(p.get("end")) for p in pools):
                raise invalid("allocation_pools must be a list of {\"start\": IP, \"end\": IP}")
            for p in pools:
                s, e = ipaddress.IPv4Address(p["start"]), ipaddress.IPv4Address(p["end"])
                if not (s in cidr and e in cidr and s <= e and s != cidr.network_address
                        and e != cidr.broadcast_address) or (gw and s <= ipaddress.IPv4Address(gw) <= e):
                    raise invalid(f"allocation pool {p['start']}-{p['end']} is not inside {cidr} without "
                                  "its network, broadcast and gateway addresses")
            pools = [{"start": p["start"], "end": p["end"]} for p in pools]
        else:
            free = [h for h in hosts if str(h) != gw]
            pools = [{"start": str(free[0]), "end": str(free[-1])}]
            if gw and free[0] < ipaddress.IPv4Address(gw) < free[-1]:
                pools = [{"start": str(free[0]), "end": str(ipaddress.IPv4Address(gw) - 1)},
                         {"start": str(ipaddress.IPv4Address(gw) + 1), "end": str(free[-1])}]
        dns = attrs.get("dns_nameservers", [])
        if not isinstance(dns, list) or not all(self.is_ip(d) for d in dns):
            raise invalid("dns_nameservers must be a list of IPv4 addresses")
        if attrs.get("host_routes"):
            raise invalid("the Neutron stand-in has no host routes")
        subnet = self.new(ctx, attrs, network_id=net["id"], ip_version=4, cidr=str(cidr),
                          gateway_ip=gw, allocation_pools=pools, enable_dhcp=boolean(
                              "enable_dhcp", attrs.get("enable_dhcp", True)), dns_nameservers=dns,
                          host_routes=[], ipv6_address_mode=None, ipv6_ra_mode=None, subnetpool_id=None)
        st["subnets"][subnet["id"]] = subnet
        return subnet

    def update_subnet(self, st, subnet, attrs, events):
        for k in ("name", "description"):
            if k in attrs:
                subnet[k] = text(k, attrs[k])
        if "enable_dhcp" in attrs:
            subnet["enable_dhcp"] = boolean("enable_dhcp", attrs["enable_dhcp"])
        if "dns_nameservers" in attrs:
            if not isinstance(attrs["dns_nameservers"], list) or not all(
                    self.is_ip(d) for d in attrs["dns_nameservers"]):
                raise invalid("dns_nameservers must be a list of IPv4 addresses")
            subnet["dns_nameservers"] = attrs["dns_nameservers"]

    def delete_subnet(self, st, subnet):
        if any(ip["subnet_id"] == subnet["id"] for p in st["ports"].values() for ip in p["fixed_ips"]):
            raise Fault(409, "SubnetInUse", f"Unable to complete operation on subnet {subnet['id']}: "
                        "One or more ports have an IP allocation from this subnet.")
        del st["subnets"][subnet["id"]]

    @staticmethod
    def is_ip(value):
        try:
            ipaddress.IPv4Address(value)
            return True
        except (ValueError, TypeError):
            return False

    # ---- security groups

    def default_group(self, st, project):
        for g in st["security_groups"].values():
            if g["tenant_id"] == project and g["name"] == "default":
                return g
        t = now()
        g = {"id": str(uuid.uuid4()), "name": "default", "description": "Default security group",
             "tenant_id": project, "project_id": project, "security_group_rules": [], "stateful": True,
             "shared": False, "tags": [], "created_at": t, "updated_at": t, "revision_number": 0}
        st["security_groups"][g["id"]] = g
        return g

    def security_group_ids(self, st, ctx, value):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise invalid("security_groups must be a list of security group IDs")
        for sg in value:
            if sg not in st["security_groups"] or not self.visible(ctx, st["security_groups"][sg]):
                raise not_found("security_group", sg)
        return value

    # ---- ports

    def create_port(self, st, ctx, attrs, events):
        if "network_id" not in attrs:
            raise bad("Failed to parse request. Required attribute 'network_id' not specified")
        net = self.get(st, ctx, "network", attrs["network_id"])
        port = self.new(ctx, attrs, network_id=net["id"], admin_state_up=boolean(
            "admin_state_up", attrs.get("admin_state_up", True)), status="DOWN", device_id=text(
            "device_id", attrs.get("device_id", "")), device_owner=text("device_owner", attrs.get(
                "device_owner", "")), allowed_address_pairs=[], **{"binding:vnic_type": "normal"})
        port["mac_address"] = self.mac(st, net, attrs.get("mac_address"))
        port["fixed_ips"] = self.allocate(st, net, attrs.get("fixed_ips"))
        sgs = attrs.get("security_groups")
        port["security_groups"] = ([self.default_group(st, port["tenant_id"])["id"]] if sgs is None
                                   else self.security_group_ids(st, ctx, sgs))
        port["_inactive"] = {}
        self.set_active(port, "", {}, "normal")
        self.update_port(st, port, {k: v for k, v in attrs.items() if k.startswith("binding:")}, events)
        st["ports"][port["id"]] = port
        return port

    def mac(self, st, net, want):
        taken = {p["mac_address"] for p in st["ports"].values() if p["network_id"] == net["id"]}
        if want is None:
            while True:
                mac = "fa:16:3e:%02x:%02x:%02x" % tuple(random.randrange(256) for _ in range(3))
                if mac not in taken:
                    return mac
        if not isinstance(want, str) or not re.fullmatch(r"([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}", want) or int(
                want[:2], 16) & 1:
            raise invalid(f"'{want}' is not a valid unicast MAC address")
        if want.lower() in taken:
            raise Fault(409, "MacAddressInUse", f"Unable to complete operation for network {net['id']}. "
                        f"The mac address {want} is in use.")
        return want.lower()

    def allocate(self, st, net, requested):
        subnets = [s for s in st["subnets"].values() if s["network_id"] == net["id"]]
        used = {ip["ip_address"] for p in st["ports"].values() for ip in p["fixed_ips"]
                if p["network_id"] == net["id"]}

        def free(subnet):
            for pool in subnet["allocation_pools"]:
                a, e = ipaddress.IPv4Address(pool["start"]), ipaddress.IPv4Address(pool["end"])
                while a <= e:
                    if str(a) not in used:
                        return str(a)
                    a += 1
            return None

        if requested is None:
            for s in subnets:
                ip = free(s)
                if ip:
                    return [{"subnet_id": s["id"], "ip_address": ip}]
            if subnets:
                raise Fault(409, "IpAddressGenerationFailure",
                            f"No more IP addresses available on network {net['id']}.")
            return []
        if not isinstance(requested, list) or not all(isinstance(r, dict) and r and set(r) <= {
                "subnet_id", "ip_address"} for r in requested):
            raise invalid("fixed_ips must be a list of {\"subnet_id\": ID, \"ip_address\": IP}")
        out = []
        for r in requested:
            ip, sid = r.get("ip_address"), r.get("subnet_id")
            if sid is not None and not any(s["id"] == sid for s in subnets):
                raise Fault(400, "InvalidInput", f"Invalid input for operation: Failed to create port on "
                            f"network {net['id']}, because fixed_ips included invalid subnet {sid}.")
            if ip is None:
                subnet = next(s for s in subnets if s["id"] == sid)
                ip = free(subnet)
                if ip is None:
                    raise Fault(409, "IpAddressGenerationFailure",
                                f"No more IP addresses available for subnet {sid}.")
            else:
                if not self.is_ip(ip):
                    raise invalid(f"'{ip}' is not a valid IP address")
                inside = [s for s in subnets if ipaddress.IPv4Address(ip) in ipaddress.IPv4Network(s["cidr"])
                          and (sid is None or s["id"] == sid)]
                if not inside:
                    raise Fault(400, "InvalidIpForNetwork", f"IP address {ip} is not a valid IP for any of the "
                                "subnets on the specified network.")
                subnet = inside[0]
                if ip in used or ip in (subnet["gateway_ip"], str(ipaddress.IPv4Network(subnet["cidr"])[0]),
                                        str(ipaddress.IPv4Network(subnet["cidr"])[-1])):
                    raise Fault(409, "IpAddressAlreadyAllocated",
                                f"IP address {ip} already allocated in subnet {subnet['id']}")
            used.add(ip)
            out.append({"subnet_id": subnet["id"], "ip_address": ip})
        return out

    @staticmethod
    def set_active(port, host, profile, vnic_type):
        port["binding:host_id"] = host
        port["binding:profile"] = profile
        port["binding:vnic_type"] = vnic_type
        port["binding:vif_type"] = VIF_TYPE if host else "unbound"
        port["binding:vif_details"] = dict(VIF_DETAILS) if host else {}
        port["status"] = "ACTIVE" if host else "DOWN"

    @staticmethod
    def binding_args(attrs, profile, vnic_type):
        if "binding:profile" in attrs or "profile" in attrs:
            profile = attrs.get("binding:profile", attrs.get("profile")) or {}
            if not isinstance(profile, dict):
                raise invalid("binding:profile must be a JSON object")
        vnic = attrs.get("binding:vnic_type", attrs.get("vnic_type", vnic_type))
        if vnic != "normal":
            raise invalid(f"vnic_type '{vnic}': the Neutron stand-in binds vnic_type normal only")
        return profile, vnic

    @staticmethod
    def plugged(port):
        if port["device_id"] and port["device_owner"].startswith("compute:"):
            return [{"name": "network-vif-plugged", "server_uuid": port["device_id"], "tag": port["id"],
                     "status": "completed"}]
        return []

    def update_port(self, st, port, attrs, events):
        for k in ("name", "description", "device_id", "device_owner"):
            if k in attrs:
                port[k] = text(k, attrs[k] if attrs[k] is not None else "")
        if "admin_state_up" in attrs:
            port["admin_state_up"] = boolean("admin_state_up", attrs["admin_state_up"])
        if "security_groups" in attrs:
            port["security_groups"] = self.security_group_ids(st, {"admin": True}, attrs["security_groups"])
        was, old_host, old_profile = port["status"], port["binding:host_id"], port["binding:profile"]
        profile, vnic = self.binding_args(attrs, port["binding:profile"], port["binding:vnic_type"])
        host = port["binding:host_id"]
        if "binding:host_id" in attrs:
            host = text("binding:host_id", attrs["binding:host_id"] or "")
            if host and host in port["_inactive"]:
                raise Fault(409, "PortBindingAlreadyExists", f"Binding for port {port['id']} on host {host} "
                            "already exists (inactive): activate it instead.")
        self.set_active(port, host, profile, vnic)
        if port["status"] == "ACTIVE" and (was == "DOWN" or host != old_host):
            events += self.plugged(port)  # the "agent" of the host reports the device up at once
        elif port["status"] == "ACTIVE" and profile.get("migrating_to") and profile.get(
                "migrating_to") != old_profile.get("migrating_to"):
            # The live migration's destination has plugged its VIFs (Nova's pre_live_migration
            # calls setup_networks_on_host after plug_vifs): what Neutron reports with
            # notify_port_active_direct when the destination's agent sees the device.
            events += self.plugged(port)

    def delete_port(self, st, port):
        del st["ports"][port["id"]]

    # ---- port bindings (binding-extended)

    @staticmethod
    def binding_view(host, b, status):
        return {"host": host, "vif_type": b["vif_type"], "vif_details": b["vif_details"],
                "vnic_type": b["vnic_type"], "profile": b["profile"], "status": status}

    def active_binding(self, port):
        return self.binding_view(port["binding:host_id"], {
            "vif_type": port["binding:vif_type"], "vif_details": port["binding:vif_details"],
            "vnic_type": port["binding:vnic_type"], "profile": port["binding:profile"]}, "ACTIVE")

    def port_bindings(self, port, host, body, req, events):
        if req.method == "GET":
            found = ([self.active_binding(port)] if port["binding:host_id"] else []) + [
                self.binding_view(h, b, "INACTIVE") for h, b in port["_inactive"].items()]
            return self.json({"bindings": self.select(found, req, "binding")})
        attrs = body.get("binding") if len(body) == 1 else None
        if not isinstance(attrs, dict) or set(attrs) - {"host", "vnic_type", "profile"}:
            raise bad("Resource body required: {\"binding\": {\"host\": H, \"vnic_type\": V, \"profile\": P}}")
        host = text("host", attrs.get("host"))
        if not host:
            raise invalid("a binding needs a host")
        if host == port["binding:host_id"] or host in port["_inactive"]:
            raise Fault(409, "PortBindingAlreadyExists",
                        f"Binding for port {port['id']} on host {host} already exists.")
        profile, vnic = self.binding_args(attrs, {}, "normal")
        port["_inactive"][host] = {"vif_type": VIF_TYPE, "vif_details": dict(VIF_DETAILS), "vnic_type": vnic,
                                   "profile": profile}
        self.touch(port)
        return self.json({"binding": self.binding_view(host, port["_inactive"][host], "INACTIVE")}, 201)

    def binding_not_found(self, port, host):
        return Fault(404, "PortBindingNotFound", f"Binding for port {port['id']} for host {host} could not "
                     "be found.")

    def port_binding(self, port, host, body, req, events):
        if req.method == "GET":
            if host == port["binding:host_id"]:
                return self.json({"binding": self.project(self.active_binding(port), req)})
            if host in port["_inactive"]:
                return self.json({"binding": self.project(self.binding_view(
                    host, port["_inactive"][host], "INACTIVE"), req)})
            raise self.binding_not_found(port, host)
        if host in port["_inactive"]:
            del port["_inactive"][host]
        elif host == port["binding:host_id"]:
            self.set_active(port, "", {}, port["binding:vnic_type"])  # as ML2: the port is left unbound
        else:
            raise self.binding_not_found(port, host)
        self.touch(port)
        return webob.Response(status=204)

    def port_activate(self, port, host, body, req, events):
        if host == port["binding:host_id"]:
            raise Fault(409, "PortBindingAlreadyActive",
                        f"Binding for port {port['id']} on host {host} is already active.")
        if host not in port["_inactive"]:
            raise self.binding_not_found(port, host)
        new = port["_inactive"].pop(host)
        if port["binding:host_id"]:
            old = self.active_binding(port)
            port["_inactive"][old["host"]] = {k: old[k] for k in ("vif_type", "vif_details", "vnic_type",
                                                                  "profile")}
        self.set_active(port, host, new["profile"], new["vnic_type"])
        self.touch(port)
        events += self.plugged(port)  # the "agent" of the new host reports the device up at once
        return self.json({"binding": self.active_binding(port)})


def make_app(conf_file):
    """The served application: GET / without a token, everything else behind auth_token."""
    from keystoneauth1 import loading as ks_loading
    from keystonemiddleware import auth_token
    from oslo_config import cfg

    conf = cfg.ConfigOpts()
    conf.register_opts([cfg.StrOpt("state_file", required=True, help="the stand-in's JSON state")])
    conf.register_opts([cfg.StrOpt("region_name")], group="nova")
    ks_loading.register_session_conf_options(conf, "nova")
    ks_loading.register_auth_conf_options(conf, "nova")
    conf(args=[], project="neutron", default_config_files=[conf_file])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(process)d %(levelname)s %(name)s %(message)s")
    notify = None
    auth = ks_loading.load_auth_from_conf_options(conf, "nova")
    if auth is not None:
        session = ks_loading.load_session_from_conf_options(conf, "nova", auth=auth)
        notify = NovaNotifier(session, conf.nova.region_name)
    inner = StandIn(conf.state_file, notify)
    outer = auth_token.AuthProtocol(inner, {"oslo_config_config": conf})

    def application(environ, start_response):
        if environ.get("PATH_INFO", "") in ("", "/"):
            return inner(environ, start_response)
        return outer(environ, start_response)

    LOG.info("Neutron stand-in: state %s, events to Nova %s", conf.state_file, "on" if notify else "off")
    return application


if os.environ.get("VMBEAM_NEUTRON_STANDIN_CONF"):
    application = make_app(os.environ["VMBEAM_NEUTRON_STANDIN_CONF"])
