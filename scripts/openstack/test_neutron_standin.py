"""Tests of the Neutron stand-in (neutron_standin.py), with no lab and no Keystone.

    $(scripts/openstack.sh --venv-path)/bin/python -m unittest scripts/openstack/test_neutron_standin.py -v

The stand-in's inner application is served by wsgiref on 127.0.0.1 and driven by the
client Nova itself uses (python-neutronclient) and, where possible, by Nova 34's own code
(nova.network.neutron.API) with its get_client() pointed at that server: the calls Nova
makes to boot a guest with a pre-created port or on a network, refresh its network info
cache, live-migrate it with port bindings, and unbind or delete its ports.
"""

import json
import logging
import os
import sys
import tempfile
import threading
import types
import unittest
import urllib.error
import urllib.request
import uuid
import warnings
from wsgiref.simple_server import WSGIRequestHandler, make_server

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
warnings.simplefilter("ignore", DeprecationWarning)
warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")
logging.basicConfig(level=logging.WARNING)
logging.getLogger("neutronclient").setLevel(logging.ERROR)
logging.getLogger("keystonemiddleware").setLevel(logging.ERROR)

import neutron_standin  # noqa: E402
from neutronclient.common import exceptions as nexc  # noqa: E402
from neutronclient.v2_0 import client as nclient  # noqa: E402

from nova import context as nova_context  # noqa: E402
from nova import objects  # noqa: E402
from nova.network import neutron as nova_neutron  # noqa: E402

objects.register_all()


class Quiet(WSGIRequestHandler):
    def log_message(self, *args):
        pass


def identity(app, project="p-admin", roles="admin,member"):
    """What keystonemiddleware's auth_token puts in front of the stand-in for an admin's token
    (a request that brings its own headers keeps them)."""

    def wrapped(environ, start_response):
        environ.setdefault("HTTP_X_PROJECT_ID", project)
        environ.setdefault("HTTP_X_ROLES", roles)
        return app(environ, start_response)

    return wrapped


class StandInTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        self.state = os.path.join(self.dir.name, "state.json")
        self.events = []
        self.app = neutron_standin.StandIn(self.state, notify=self.events.extend)
        self.server = make_server("127.0.0.1", 0, identity(self.app), handler_class=Quiet)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.client = nclient.Client(endpoint_url=self.url, token="no-auth-in-this-test")
        # Nova's API object, its clients pointed at the stand-in.
        self.nova = nova_neutron.API()
        wrapper = nova_neutron.ClientWrapper
        self.patch(nova_neutron, "get_client", lambda context, admin=False: wrapper(self.client, admin=True))
        self.patch(self.nova, "get_vifs_by_instance", lambda context, instance: [])
        self.ctx = nova_context.RequestContext(user_id="admin", project_id="p-admin", is_admin=True)

    def tearDown(self):
        self.server.shutdown()
        self.server.server_close()
        self.dir.cleanup()

    def patch(self, obj, name, value):
        old = getattr(obj, name)
        setattr(obj, name, value)
        self.addCleanup(setattr, obj, name, old)

    # ---- helpers

    def network(self, cidr="198.18.64.0/24"):
        net = self.client.create_network({"network": {"name": "n1"}})["network"]
        sub = self.client.create_subnet({"subnet": {"network_id": net["id"], "cidr": cidr, "ip_version": 4,
                                                    "name": "s1", "enable_dhcp": False}})["subnet"]
        return net, sub

    def instance(self, host, nw_info=None):
        inst = types.SimpleNamespace(uuid=str(uuid.uuid4()), project_id="p-admin", host=host,
                                     availability_zone="nova", hostname="guest")
        inst.nw_info = nw_info or []
        inst.get_network_info = lambda: inst.nw_info
        return inst

    def nw_info(self, inst):
        """What _heal_instance_info_cache builds (get_instance_nw_info, force_refresh=True)."""
        return self.nova._build_network_info_model(self.ctx, inst, force_refresh=True)

    def boot(self, port_id, host="cvm1"):
        """Nova's allocate_for_instance for a port: _update_ports_for_instance's update."""
        inst = self.instance(host)
        body = {"port": {"device_id": inst.uuid, "device_owner": "compute:nova"}}
        self.nova._populate_neutron_extension_values(self.ctx, inst, None, body, network={},
                                                     neutron=self.client, bind_host_id=host)
        port = self.nova._update_port(self.client, inst, port_id, body)
        inst.nw_info = self.nw_info(inst)
        return inst, port

    def raw(self, method, path, body=None, headers=None):
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def state_bytes(self):
        with open(self.state, "rb") as f:
            return f.read()

    # ---- tests

    def test_versions_and_extensions(self):
        status, doc = self.raw("GET", "/")
        self.assertEqual(200, status)
        self.assertEqual("v2.0", doc["versions"][0]["id"])
        self.assertEqual(self.url + "/v2.0/", doc["versions"][0]["links"][0]["href"])
        aliases = {e["alias"] for e in self.client.list_extensions()["extensions"]}
        self.assertLessEqual({"binding", "binding-extended", "security-group", "quotas"}, aliases)
        self.assertTrue(self.nova.has_port_binding_extension(client=self.client))
        self.assertFalse(self.nova.has_dns_extension(client=self.client))
        self.assertFalse(self.nova.has_extended_resource_request_extension(client=self.client))
        self.assertFalse(self.nova.has_multi_provider_extension(client=self.client))
        self.assertEqual(-1, self.client.show_quota("p-admin")["quota"]["port"])
        self.assertEqual([], self.client.list_floatingips(fixed_ip_address="198.18.64.2", port_id="x")["floatingips"])

    def test_network_subnet_port(self):
        net, sub = self.network()
        self.assertEqual([sub["id"]], self.client.show_network(net["id"])["network"]["subnets"])
        self.assertEqual("198.18.64.1", sub["gateway_ip"])
        self.assertEqual([{"start": "198.18.64.2", "end": "198.18.64.254"}], sub["allocation_pools"])
        p1 = self.client.create_port({"port": {"network_id": net["id"], "name": "p1"}})["port"]
        self.assertEqual([{"subnet_id": sub["id"], "ip_address": "198.18.64.2"}], p1["fixed_ips"])
        self.assertRegex(p1["mac_address"], r"^fa:16:3e(:[0-9a-f]{2}){3}$")
        self.assertEqual(("unbound", "DOWN", ""), (p1["binding:vif_type"], p1["status"], p1["binding:host_id"]))
        default = self.client.list_security_groups(name="default")["security_groups"]
        self.assertEqual([g["id"] for g in default], p1["security_groups"])
        self.assertEqual([], default[0]["security_group_rules"])
        p2 = self.client.create_port({"port": {"network_id": net["id"], "fixed_ips": [
            {"ip_address": "198.18.64.77"}], "mac_address": "fa:16:3e:00:00:77"}})["port"]
        self.assertEqual("198.18.64.77", p2["fixed_ips"][0]["ip_address"])
        self.assertEqual([p2["id"]], [p["id"] for p in self.client.list_ports(
            fixed_ips="ip_address=198.18.64.77")["ports"]])
        self.assertEqual({p1["id"], p2["id"]}, {p["id"] for p in self.client.list_ports(network_id=net["id"])["ports"]})
        self.assertEqual([{"id": p1["id"]}], self.client.list_ports(name="p1", fields=["id"])["ports"])
        self.assertEqual([net["id"]], [n["id"] for n in self.client.list_networks(
            id=[net["id"]], shared=False, admin_state_up=True)["networks"]])
        # What Nova checks before a boot on this network (--nic net-id).
        reqs = objects.NetworkRequestList(objects=[objects.NetworkRequest(network_id=net["id"])])
        self.assertEqual(3, self.nova.validate_networks(self.ctx, reqs, 3))
        # ...and on a pre-created port (--nic port-id): none needed, the port is usable.
        reqs = objects.NetworkRequestList(objects=[objects.NetworkRequest(port_id=p1["id"])])
        self.assertEqual(0, self.nova._ports_needed_per_instance(self.ctx, self.client, reqs))
        self.client.delete_port(p2["id"])
        p3 = self.client.create_port({"port": {"network_id": net["id"]}})["port"]
        self.assertEqual("198.18.64.3", p3["fixed_ips"][0]["ip_address"])

    def test_boot_with_port_heal_and_delete(self):
        net, sub = self.network()
        port = self.client.create_port({"port": {"network_id": net["id"]}})["port"]
        inst, bound = self.boot(port["id"])
        self.assertEqual(("tap", "ACTIVE", "cvm1"), (bound["binding:vif_type"], bound["status"],
                                                     bound["binding:host_id"]))
        self.assertEqual([{"name": "network-vif-plugged", "server_uuid": inst.uuid, "tag": port["id"],
                           "status": "completed"}], self.events)
        [vif] = inst.nw_info
        self.assertEqual((port["id"], port["mac_address"], "tap", True), (vif["id"], vif["address"], vif["type"],
                                                                          vif["active"]))
        self.assertEqual("tap" + port["id"][:11], vif["devname"])
        self.assertEqual(["198.18.64.2"], [ip["address"] for ip in vif.fixed_ips()])
        self.assertEqual("198.18.64.0/24", vif["network"]["subnets"][0]["cidr"])
        self.assertEqual(1500, vif["network"]["meta"]["mtu"])
        # The port is in use now: Nova refuses it for another server.
        reqs = objects.NetworkRequestList(objects=[objects.NetworkRequest(port_id=port["id"])])
        with self.assertRaises(Exception) as e:
            self.nova._ports_needed_per_instance(self.ctx, self.client, reqs)
        self.assertEqual("PortInUse", type(e.exception).__name__)
        # Server delete with a pre-existing port: unbound, kept.
        self.nova._unbind_ports(self.ctx, [port["id"]], self.client, self.client)
        kept = self.client.show_port(port["id"])["port"]
        self.assertEqual(("", "", "", "unbound", "DOWN"), (kept["device_id"], kept["device_owner"],
                         kept["binding:host_id"], kept["binding:vif_type"], kept["status"]))
        self.assertEqual([], self.nw_info(inst))

    def test_boot_on_network(self):
        net, sub = self.network()
        inst = self.instance("cvm1")
        created = self.nova._create_port_minimal(self.ctx, self.client, inst, net["id"])
        self.assertEqual((inst.uuid, "p-admin"), (created["device_id"], created["tenant_id"]))
        inst2, bound = self.boot(created["id"])
        self.assertEqual("ACTIVE", bound["status"])
        self.assertEqual([created["id"]], [p["id"] for p in self.client.list_ports(
            device_id=inst2.uuid, tenant_id="p-admin")["ports"]])
        # Server delete: Nova deletes the ports it made.
        self.nova._delete_ports(self.client, inst2, [created["id"]], raise_if_fail=True)
        self.assertEqual([], self.client.list_ports()["ports"])
        self.client.delete_network(net["id"])
        self.assertEqual([], self.client.list_subnets()["subnets"])

    def test_live_migration_with_port_bindings(self):
        net, sub = self.network()
        port = self.client.create_port({"port": {"network_id": net["id"]}})["port"]
        inst, _ = self.boot(port["id"], "cvm1")
        self.events.clear()
        # Conductor: bind on the destination (inactive binding).
        bindings = self.nova.bind_ports_to_host(self.ctx, inst, "cvm2")
        self.assertEqual(("cvm2", "INACTIVE", "tap", "normal"), tuple(bindings[port["id"]][k] for k in (
            "host", "status", "vif_type", "vnic_type")))
        with self.assertRaises(nexc.Conflict):
            self.client.create_port_binding(port["id"], {"binding": {"host": "cvm2"}})
        # Destination's pre_live_migration: setup_networks_on_host -> migrating_to -> the event
        # the source waits for.
        self.nova.setup_networks_on_host(self.ctx, inst, "cvm2")
        self.assertEqual({"migrating_to": "cvm2"}, self.client.show_port(port["id"])["port"]["binding:profile"])
        self.assertEqual(["network-vif-plugged"], [e["name"] for e in self.events])
        # Source's post_live_migration: activate the destination's binding.
        migration = objects.Migration(source_compute="cvm1", dest_compute="cvm2", migration_type="live-migration")
        self.nova.migrate_instance_start(self.ctx, inst, migration)
        shown = self.client.show_port(port["id"])["port"]
        self.assertEqual(("cvm2", {}, "ACTIVE"), (shown["binding:host_id"], shown["binding:profile"], shown["status"]))
        self.assertEqual({("cvm2", "ACTIVE"), ("cvm1", "INACTIVE")}, {
            (b["host"], b["status"]) for b in self.client.list_port_bindings(port["id"])["bindings"]})
        with self.assertRaises(nexc.Conflict):
            self.client.activate_port_binding(port["id"], "cvm2")
        self.nova.migrate_instance_start(self.ctx, inst, migration)  # already active: a no-op for Nova
        # Destination: migrate_instance_finish, then the source's binding torn down.
        self.nova.migrate_instance_finish(self.ctx, inst, migration, None)
        inst.host = "cvm2"
        self.nova.setup_networks_on_host(self.ctx, inst, "cvm1", teardown=True)
        self.assertEqual(["cvm2"], [b["host"] for b in self.client.list_port_bindings(port["id"])["bindings"]])
        with self.assertRaises(nexc.NotFound):
            self.client.show_port_binding(port["id"], "cvm1")
        # A rolled-back migration: the destination's inactive binding removed.
        self.nova.bind_ports_to_host(self.ctx, inst, "cvm3")
        self.nova.setup_networks_on_host(self.ctx, inst, "cvm3", teardown=True)
        self.assertEqual(["cvm2"], [b["host"] for b in self.client.list_port_bindings(port["id"])["bindings"]])
        self.nova.cleanup_instance_network_on_host(self.ctx, inst, "cvm9")  # 404s ignored by Nova
        # Two events: the destination's migrating_to, the activation; none for the rest.
        self.assertEqual(2, len(self.events))

    def test_guest_without_nic(self):
        inst = self.instance("cvm1")
        migration = objects.Migration(source_compute="cvm1", dest_compute="cvm2", migration_type="live-migration")
        self.assertEqual([], self.nw_info(inst))
        self.assertEqual({}, self.nova.bind_ports_to_host(self.ctx, inst, "cvm2"))
        self.nova.setup_networks_on_host(self.ctx, inst, "cvm2")
        self.nova.migrate_instance_start(self.ctx, inst, migration)
        self.nova.migrate_instance_finish(self.ctx, inst, migration, None)
        self.nova.setup_networks_on_host(self.ctx, inst, "cvm1", teardown=True)
        self.nova.cleanup_instance_network_on_host(self.ctx, inst, "cvm2")
        self.assertEqual({"ports": []}, self.client.list_ports(device_id=inst.uuid, fields=["id", "resource_request"]))
        self.assertEqual([], self.events)

    def test_bad_input_changes_nothing(self):
        net, sub = self.network()
        port = self.client.create_port({"port": {"network_id": net["id"]}})["port"]
        before = self.state_bytes()
        cases = [
            (nexc.IpAddressAlreadyAllocatedClient, lambda: self.client.create_port(
                {"port": {"network_id": net["id"], "fixed_ips": [{"ip_address": "198.18.64.2"}]}})),
            (nexc.InvalidIpForNetworkClient, lambda: self.client.create_port(
                {"port": {"network_id": net["id"], "fixed_ips": [{"ip_address": "10.0.0.5"}]}})),
            (nexc.MacAddressInUseClient, lambda: self.client.create_port(
                {"port": {"network_id": net["id"], "mac_address": port["mac_address"]}})),
            (nexc.BadRequest, lambda: self.client.create_port({"port": {"network_id": net["id"],
                                                                      "mac_address": "zz"}})),
            (nexc.NetworkNotFoundClient, lambda: self.client.create_port({"port": {"network_id": "nope"}})),
            (nexc.PortNotFoundClient, lambda: self.client.show_port("nope")),
            (nexc.BadRequest, lambda: self.client.create_port({"port": {"network_id": net["id"], "colour": "red"}})),
            (nexc.BadRequest, lambda: self.client.update_port(port["id"], {"port": {"status": "ACTIVE"}})),
            (nexc.BadRequest, lambda: self.client.update_port(port["id"], {"port": {"binding:vnic_type": "direct",
                                                                                      "binding:host_id": "h"}})),
            (nexc.BadRequest, lambda: self.client.create_subnet({"subnet": {"network_id": net["id"],
                                                                            "cidr": "198.18.64.128/25"}})),
            (nexc.BadRequest, lambda: self.client.create_subnet({"subnet": {"network_id": net["id"],
                                                                            "cidr": "198.18.65.1/24"}})),
            (nexc.BadRequest, lambda: self.client.create_subnet({"subnet": {"network_id": net["id"],
                                                                            "cidr": "fd00::/64", "ip_version": 6}})),
            (nexc.NetworkInUseClient, lambda: self.client.delete_network(net["id"])),
            (nexc.Conflict, lambda: self.client.delete_subnet(sub["id"])),
            (nexc.NotFound, lambda: self.client.activate_port_binding(port["id"], "nohost")),
            (nexc.NotFound, lambda: self.client.delete_port_binding(port["id"], "nohost")),
            (nexc.BadRequest, lambda: self.client.create_port_binding(port["id"], {"binding": {}})),
            (nexc.BadRequest, lambda: self.client.list_ports(colour="red")),
            (nexc.NotFound, lambda: self.client.create_port({"port": {"network_id": net["id"],
                                                                      "security_groups": ["nope"]}})),
        ]
        for exc, call in cases:
            with self.subTest(exc=exc.__name__), self.assertRaises(exc) as e:
                call()
            self.assertTrue(str(e.exception))
        self.assertEqual(before, self.state_bytes())
        status, body = self.raw("POST", "/v2.0/ports", b"{not json")
        self.assertEqual((400, "HTTPBadRequest"), (status, body["NeutronError"]["type"]))
        status, body = self.raw("POST", "/v2.0/ports", {"ports": [{"network_id": net["id"]}]})
        self.assertEqual((400, "HTTPBadRequest"), (status, body["NeutronError"]["type"]))
        status, body = self.raw("GET", "/v2.0/routers")
        self.assertEqual((404, "HTTPNotFound", ""), (status, body["NeutronError"]["type"],
                                                     body["NeutronError"]["detail"]))
        status, body = self.raw("DELETE", "/v2.0/networks")
        self.assertEqual((405, "HTTPMethodNotAllowed"), (status, body["NeutronError"]["type"]))
        self.assertEqual(before, self.state_bytes())
        self.assertEqual([], self.events)

    def test_state_survives_a_restart_and_projects_are_separate(self):
        net, sub = self.network()
        port = self.client.create_port({"port": {"network_id": net["id"]}})["port"]
        again = neutron_standin.StandIn(self.state)
        status, body = 0, None
        server = make_server("127.0.0.1", 0, identity(again), handler_class=Quiet)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            c = nclient.Client(endpoint_url=f"http://127.0.0.1:{server.server_port}", token="t")
            self.assertEqual(port, c.show_port(port["id"])["port"])
            status, body = self.raw("GET", f"/v2.0/ports/{port['id']}",
                                    headers={"X-Roles": "member", "X-Project-Id": "p-other"})
            self.assertEqual((404, "PortNotFound"), (status, body["NeutronError"]["type"]))
            status, body = self.raw("GET", "/v2.0/networks", headers={"X-Roles": "member", "X-Project-Id": "p-other"})
            self.assertEqual([], body["networks"])
        finally:
            server.shutdown()
            server.server_close()

    def test_served_app_wants_a_token_except_for_versions(self):
        conf = os.path.join(self.dir.name, "neutron.conf")
        with open(conf, "w") as f:
            f.write(f"[DEFAULT]\nstate_file = {self.state}\n\n[keystone_authtoken]\n"
                    "www_authenticate_uri = http://127.0.0.1:9/v3\nauth_url = http://127.0.0.1:9/v3\n"
                    "auth_type = password\nusername = neutron\npassword = x\nproject_name = service\n"
                    "user_domain_name = Default\nproject_domain_name = Default\n")
        app = neutron_standin.make_app(conf)
        server = make_server("127.0.0.1", 0, app, handler_class=Quiet)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            base = f"http://127.0.0.1:{server.server_port}"
            with urllib.request.urlopen(base + "/") as r:
                self.assertEqual("v2.0", json.load(r)["versions"][0]["id"])
            with self.assertRaises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(base + "/v2.0/networks")
            self.assertEqual(401, e.exception.code)
        finally:
            server.shutdown()
            server.server_close()


if __name__ == "__main__":
    unittest.main()
