"""Validation of VMBeam's flavor extra spec by Nova's API (entry point
``nova.api.extra_spec_validators``): ``openstack flavor set --property
vmbeam:enabled=maybe`` is refused instead of silently meaning "no"."""

from nova.api.validation.extra_specs import base

from vmbeam_nova.guest_config import EXTRA_SPEC

EXTRA_SPEC_VALIDATORS = [
    base.ExtraSpecValidator(
        name=EXTRA_SPEC,
        description=(
            "Beam-enable guests of this flavor on VMBeam hosts: their memory "
            "is a shared file in the beam pool, so a live migration to a "
            "co-located cloud VM moves no memory (zero-copy). Only honoured by "
            "the vmbeam.VMBeamLibvirtDriver compute driver."
        ),
        value={
            "type": bool,
            "description": "Whether guests of this flavor are beam-enabled.",
        },
    ),
]


def register():
    return EXTRA_SPEC_VALIDATORS
