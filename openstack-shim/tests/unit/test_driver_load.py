"""Nova loads the driver by name, the package installs into Nova's own
namespace without touching Nova's files, and Nova's API knows our extra spec."""

import importlib.metadata

from nova import exception
from nova.api.validation.extra_specs import validators
from nova.virt import driver as virt_driver
from nova.virt import fake
from nova.virt.libvirt import driver as libvirt_driver

from vmbeam_nova.driver import VMBeamLibvirtDriver

from . import base


class DriverLoadTest(base.DriverTestCase):
    WITH_VMBEAMD = False

    def test_compute_driver_option_loads_it(self):
        self.flags(compute_driver="vmbeam.VMBeamLibvirtDriver")
        drv = virt_driver.load_compute_driver(fake.FakeVirtAPI())
        self.assertIsInstance(drv, VMBeamLibvirtDriver)
        self.assertIsInstance(drv, libvirt_driver.LibvirtDriver)
        self.assertIn("Loading compute driver 'vmbeam.VMBeamLibvirtDriver'", self.log())
        # It is a LibvirtDriver in every respect Nova asks about.
        self.assertTrue(drv.capabilities["supports_evacuate"])

    def test_the_package_ships_only_its_own_files_into_nova(self):
        files = {str(f) for f in importlib.metadata.files("vmbeam-nova")}
        self.assertIn("nova/virt/vmbeam/__init__.py", files)
        ours_in_nova = sorted(f for f in files if f.startswith("nova/") and "__pycache__" not in f)
        self.assertEqual(["nova/virt/vmbeam/__init__.py"], ours_in_nova)
        reqs = importlib.metadata.requires("vmbeam-nova")
        self.assertIn("nova<35,>=34.0.0", reqs)

    def test_nova_validates_the_flavor_extra_spec(self):
        validators.validate("vmbeam:enabled", "true")
        validators.validate("vmbeam:enabled", "False")
        self.assertRaises(exception.ValidationError, validators.validate, "vmbeam:enabled", "maybe")
        # Our namespace is now Nova's: a typo is refused too.
        self.assertRaises(exception.ValidationError, validators.validate, "vmbeam:enable", "true")
