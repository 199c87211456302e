"""Guests are beam-enabled (through Nova's own config objects) exactly when
the flavor, the image or the host asks for it."""

from lxml import etree

from vmbeam_nova import guest_config as gc

from . import base

QEMU = "{%s}" % gc.QEMU_NAMESPACE
VMB = "{%s}" % gc.NAMESPACE


def beam_parts(xml):
    root = etree.fromstring(xml.encode())
    mb = root.find("./memoryBacking")
    return {
        "source": None if mb is None or mb.find("./source") is None else mb.find("./source").get("type"),
        "access": None if mb is None or mb.find("./access") is None else mb.find("./access").get("mode"),
        "discard": mb is not None and mb.find("./discard") is not None,
        "allocation": None if mb is None or mb.find("./allocation") is None else mb.find("./allocation").get("mode"),
        "qemu_args": [a.get("value") for a in root.findall("./%scommandline/%sarg" % (QEMU, QEMU))],
        "metadata": root.find("./metadata/%sbeam" % VMB),
        "nova_metadata": root.find("./metadata/{http://openstack.org/xmlns/libvirt/nova/1.1}instance"),
        "qemu_ns_on_domain": root.nsmap.get("qemu"),
    }


class GuestConfigTest(base.DriverTestCase):
    def test_flavor_extra_spec_beam_enables_the_guest(self):
        inst = base.make_instance(extra_specs={"vmbeam:enabled": "true"})
        cfg = self.guest_config(inst)
        p = beam_parts(cfg.to_xml())
        self.assertEqual("file", p["source"])
        self.assertEqual("shared", p["access"])
        self.assertEqual(
            ["-qmp", "unix:/run/vmbeam/qmp/%s.sock,server=on,wait=off" % inst.uuid],
            p["qemu_args"],
        )
        self.assertEqual(gc.QEMU_NAMESPACE, p["qemu_ns_on_domain"])
        meta = p["metadata"]
        self.assertIsNotNone(meta)
        fields = {etree.QName(c).localname: c.text for c in meta}
        self.assertEqual(
            {"cloud": "acme-virtual-iaas", "pool": "/var/lib/vmbeam/pool", "owner": "cvm1", "generation": "0"},
            fields,
        )
        # Nova's own metadata is still there, next to ours.
        self.assertIsNotNone(p["nova_metadata"])
        self.assertIn("guest is beam-enabled (flavor m1.small has vmbeam:enabled=true; this host from vmbeamd)", self.log())
        self.assertIn("private QMP monitor added at /run/vmbeam/qmp/%s.sock" % inst.uuid, self.log())
        # The identity came from vmbeamd over the bus.
        asked = [c[2][1] for c in self.vmbeamd.methods("Get")]
        self.assertEqual(["HostId", "Cloud", "PoolDir"], asked)

    def test_plain_flavor_gives_a_plain_guest(self):
        inst = base.make_instance()
        p = beam_parts(self.guest_config(inst).to_xml())
        self.assertIsNone(p["source"])
        self.assertIsNone(p["access"])
        self.assertEqual([], p["qemu_args"])
        self.assertIsNone(p["metadata"])
        self.assertIsNone(p["qemu_ns_on_domain"])
        self.assertIn("guest is not beam-enabled: neither flavor (vmbeam:enabled) nor image", self.log())
        self.assertEqual([], self.vmbeamd.calls)

    def test_image_property_beam_enables_the_guest(self):
        # Nova keeps the image's properties in the system metadata as image_*.
        inst = base.make_instance(system_metadata={"image_vmbeam_enabled": "yes"})
        p = beam_parts(self.guest_config(inst).to_xml())
        self.assertEqual(("file", "shared"), (p["source"], p["access"]))
        self.assertIsNotNone(p["metadata"])
        self.assertIn("image has vmbeam_enabled=yes", self.log())

    def test_host_enable_all_and_an_explicit_opt_out(self):
        self.flags(enable_all=True, group="vmbeam")
        p = beam_parts(self.guest_config(base.make_instance()).to_xml())
        self.assertIsNotNone(p["metadata"])
        self.assertIn("[vmbeam] enable_all is set on this host", self.log())
        p = beam_parts(self.guest_config(base.make_instance(extra_specs={"vmbeam:enabled": "false"})).to_xml())
        self.assertIsNone(p["metadata"])
        self.assertEqual([], p["qemu_args"])

    def test_file_backed_memory_loses_discard_and_preallocation(self):
        # Nova's own file-backed memory sets discard and immediate allocation,
        # which must not be on a beam pool file.
        self.flags(file_backed_memory=1024, group="libvirt")
        self.flags(ram_allocation_ratio=1.0)
        inst = base.make_instance(extra_specs={"vmbeam:enabled": "true"})
        p = beam_parts(self.guest_config(inst).to_xml())
        self.assertEqual(("file", "shared"), (p["source"], p["access"]))
        self.assertFalse(p["discard"])
        self.assertIsNone(p["allocation"])
        self.assertIn("<discard/> removed from <memoryBacking>", self.log())

    def test_numa_guest_is_refused_and_stays_plain(self):
        inst = base.make_instance(extra_specs={"vmbeam:enabled": "true", "hw:numa_nodes": "1"})
        from nova.virt import hardware

        inst.numa_topology = hardware.numa_get_constraints(inst.flavor, base.objects.ImageMeta.from_dict({}))
        p = beam_parts(self.guest_config(inst).to_xml())
        self.assertIsNone(p["metadata"])
        self.assertIn("guest NUMA topology (1 cells) is not supported", self.log())

    def test_identity_from_the_config_file_when_vmbeamd_is_away(self):
        self.vmbeamd.stop()
        path = self.useFixture(base.fixtures.TempDir()).path + "/vmbeam.conf"
        with open(path, "w") as f:
            f.write('host_id = "cvm7"\ncloud = "other"\npool_dir = "/srv/pool"\nkey_file = "/k"\n')
        self.flags(identity_file=path, group="vmbeam")
        inst = base.make_instance(extra_specs={"vmbeam:enabled": "1"})
        meta = beam_parts(self.guest_config(inst).to_xml())["metadata"]
        fields = {etree.QName(c).localname: c.text for c in meta}
        self.assertEqual(("other", "/srv/pool", "cvm7"), (fields["cloud"], fields["pool"], fields["owner"]))
        self.assertIn("this host from %s" % path, self.log())

    def test_no_identity_at_all_gives_a_plain_guest_and_says_why(self):
        self.vmbeamd.stop()
        self.flags(identity_file="/nonexistent/vmbeam.conf", group="vmbeam")
        inst = base.make_instance(extra_specs={"vmbeam:enabled": "true"})
        p = beam_parts(self.guest_config(inst).to_xml())
        self.assertIsNone(p["metadata"])
        self.assertIn("guest is not beam-enabled although flavor m1.small has vmbeam:enabled=true", self.log())
        self.assertIn("/nonexistent/vmbeam.conf cannot be read", self.log())

    def test_the_generation_of_an_existing_domain_is_kept(self):
        inst = base.make_instance(extra_specs={"vmbeam:enabled": "true"})
        guest, xml = self.running_guest(inst)
        moved = xml.replace("<vmbeam:generation>0<", "<vmbeam:generation>4<")
        self.assertNotEqual(xml, moved)
        self.useFixture(
            base.fixtures.MockPatchObject(base.fakelibvirt.Domain, "XMLDesc", lambda s, flags=0: moved)
        )
        meta = beam_parts(self.guest_config(inst).to_xml())["metadata"]
        self.assertEqual("4", meta.find("./%sgeneration" % VMB).text)

    def test_a_bad_flavor_value_is_not_a_yes(self):
        inst = base.make_instance(extra_specs={"vmbeam:enabled": "maybe"})
        self.assertIsNone(beam_parts(self.guest_config(inst).to_xml())["metadata"])
        self.assertIn("flavor extra spec vmbeam:enabled: Unrecognized value 'maybe'", self.log())
