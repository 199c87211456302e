"""Nova loads ``compute_driver = vmbeam.VMBeamLibvirtDriver`` from here
(``nova.virt.<compute_driver>``); the code is in the vmbeam_nova package."""

from vmbeam_nova.driver import VMBeamLibvirtDriver

__all__ = ["VMBeamLibvirtDriver"]
