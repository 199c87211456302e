"""VMBeam's OpenStack Nova compute driver (see driver.VMBeamLibvirtDriver)."""
