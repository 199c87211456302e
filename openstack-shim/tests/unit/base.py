"""The shared set-up: Nova's NoDBTestCase with Nova's LibvirtFixture
(fakelibvirt), a private bus and (by default) a fake vmbeamd on it."""

import fixtures
import nova.conf
import os_vif
from nova import context, objects, test, thread_pool_factory
from nova.network import model as network_model
from nova.tests import fixtures as nova_fixtures
from nova.tests.fixtures import libvirt as fakelibvirt
from nova.virt import fake
from nova.virt.libvirt import blockinfo
from nova.virt.libvirt import guest as libvirt_guest
from oslo_utils.fixture import uuidsentinel as uuids

from vmbeam_nova import bus
from vmbeam_nova.driver import VMBeamLibvirtDriver

from . import fakes

CONF = nova.conf.CONF

DEST = "cvm2"
DEST_URI = "qemu+tcp://cvm2/system"


def make_instance(extra_specs=None, system_metadata=None, name="m1.small"):
    flavor = objects.Flavor(
        memory_mb=512,
        swap=0,
        vcpu_weight=None,
        root_gb=1,
        id=2,
        name=name,
        ephemeral_gb=0,
        rxtx_factor=1.0,
        flavorid="1",
        vcpus=1,
        extra_specs=dict(extra_specs or {}),
    )
    sysmeta = {"image_base_image_ref": uuids.image, "image_disk_format": "raw"}
    sysmeta.update(system_metadata or {})
    return objects.Instance(
        id=1,
        uuid=uuids.instance,
        memory_kb="524288",
        display_name="web1",
        vcpus=1,
        project_id="fake",
        user_id="fake",
        image_ref=uuids.image,
        root_gb=1,
        ephemeral_gb=0,
        system_metadata=sysmeta,
        instance_type_id=flavor.id,
        flavor=flavor,
        new_flavor=None,
        old_flavor=None,
        pci_devices=objects.PciDeviceList(),
        numa_topology=None,
        config_drive=None,
        vm_mode=None,
        vm_state="active",
        kernel_id=None,
        ramdisk_id=None,
        os_type="linux",
        ephemeral_key_uuid=None,
        vcpu_model=None,
        host="cvm1",
        node="cvm1",
        task_state=None,
        trusted_certs=None,
        resources=None,
        migration_context=None,
    )


class DriverTestCase(test.NoDBTestCase):
    REQUIRES_LOCKING = True
    #: Whether a (fake) vmbeamd serves on the private bus.
    WITH_VMBEAMD = True

    def setUp(self):
        super().setUp()
        self.context = context.get_admin_context()
        self.flags(instances_path=self.useFixture(fixtures.TempDir()).path)
        self.flags(virt_type="kvm", group="libvirt")
        self.libvirt = self.useFixture(nova_fixtures.LibvirtFixture())
        self.useFixture(nova_fixtures.CGroupsFixture())
        os_vif.initialize()
        self.bus = self.useFixture(fakes.PrivateBus())
        self.vmbeamd = self.useFixture(fakes.FakeVMBeamd()) if self.WITH_VMBEAMD else None
        self.drvr = VMBeamLibvirtDriver(fake.FakeVirtAPI(), False)
        # What init_host does with nova.conf's migration options.
        self.drvr._parse_migration_flags()
        # And the delayed lifecycle events of Host._init_events: under native
        # threading a domain's STOPPED event reaches Host at once (with no
        # delay here: the driver has no compute manager to give it to).
        host = self.drvr._host
        if host._delayed_executor is None:
            host._delayed_executor = thread_pool_factory.StaticallyDelayingCancellableTaskExecutorWrapper(
                delay=0, executor=thread_pool_factory.get_executor(thread_pool_factory.ExecutorType.DEFAULT)
            )
            self.addCleanup(host._delayed_executor.shutdown, wait=True)

    def guest_config(self, instance):
        image_meta = objects.ImageMeta.from_dict({"disk_format": "raw"})
        disk_info = blockinfo.get_disk_info(CONF.libvirt.virt_type, instance, image_meta)
        return self.drvr._get_guest_config(
            instance, network_model.NetworkInfo([]), image_meta, disk_info
        )

    def running_guest(self, instance):
        """A running fake libvirt domain defined from the XML the driver made
        for `instance` (fakelibvirt keeps no XML of its own, so XMLDesc is
        made to return it)."""
        xml = self.guest_config(instance).to_xml()
        conn = self.drvr._host.get_connection()
        dom = conn.defineXML(xml)
        dom.create()
        # A running domain with no job (Nova 33's fakelibvirt starts every
        # domain with an unbounded job, Nova 34's with none).
        getattr(dom, "_obj", dom)._job_type = fakelibvirt.VIR_DOMAIN_JOB_NONE
        self.useFixture(
            fixtures.MockPatchObject(fakelibvirt.Domain, "XMLDesc", lambda s, flags=0: xml)
        )
        return libvirt_guest.Guest(dom), xml

    def migrate_data(self, **kw):
        args = dict(
            # What the destination's pre-checks report for a default nova.conf.
            graphics_listen_addr_vnc=CONF.vnc.server_listen,
            graphics_listen_addr_spice=CONF.spice.server_listen,
            serial_listen_addr="127.0.0.1",
            serial_listen_ports=[],
            target_connect_addr=None,
            bdms=[],
            block_migration=False,
        )
        args.update(kw)
        return objects.LibvirtLiveMigrateData(**args)

    def log(self):
        return self.stdlog.logger.output

    def beam_guest(self, follow_domain=True):
        inst = make_instance(extra_specs={"vmbeam:enabled": "true"})
        guest, xml = self.running_guest(inst)
        if follow_domain:
            # The (fake) libvirt domain follows vmbeamd's job, as the real
            # one follows the real job: a libvirt job while migrating, gone
            # from the source when completed.
            # (The driver's domains are eventlet tpool proxies; the state
            # lives in the fake domain behind.)
            dom = getattr(guest._domain, "_obj", guest._domain)

            def on_phase(job, phase):
                if phase == "migrating":
                    dom._job_type = fakelibvirt.VIR_DOMAIN_JOB_UNBOUNDED
                elif phase in bus.FINAL_PHASES:
                    dom._job_type = fakelibvirt.VIR_DOMAIN_JOB_NONE
                    if phase == "completed":
                        dom.destroy()

            self.vmbeamd.on_phase = on_phase
        return inst, guest
