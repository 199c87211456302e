"""The ``[vmbeam]`` section of nova.conf."""

from oslo_config import cfg

vmbeam_group = cfg.OptGroup(
    "vmbeam",
    title="VMBeam zero-copy live migration",
    help="Options of the VMBeam compute driver (compute_driver = "
    "vmbeam.VMBeamLibvirtDriver), a LibvirtDriver that beam-enables guests "
    "and runs live migrations between co-located cloud VMs through vmbeamd.",
)

opts = [
    cfg.BoolOpt(
        "enable_all",
        default=False,
        help="Beam-enable every guest this host spawns (shared file memory in "
        "the beam pool, vmbeamd's private QMP monitor, VMBeam metadata), not "
        "only those whose flavor (extra spec vmbeam:enabled=true) or image "
        "(property vmbeam_enabled=true) ask for it. An explicit false in the "
        "flavor or image still opts a guest out.",
    ),
    cfg.StrOpt(
        "live_migration",
        default="auto",
        choices=[
            ("auto", "zero-copy through vmbeamd when the guest is beam-enabled "
             "and vmbeamd proves the destination co-located; Nova's own "
             "libvirt migration otherwise"),
            ("off", "always Nova's own libvirt migration"),
        ],
        help="How live migrations are run.",
    ),
    cfg.StrOpt(
        "qmp_dir",
        default="/run/vmbeam/qmp",
        help="Where vmbeamd's private QMP sockets are (<qmp_dir>/<uuid>.sock); "
        "must match vmbeamd's.",
    ),
    cfg.StrOpt(
        "identity_file",
        default="/etc/vmbeam/vmbeam.conf",
        help="vmbeamd's configuration, read for this host's id, cloud and "
        "beam pool when vmbeamd itself cannot be asked while spawning a guest.",
    ),
    cfg.FloatOpt(
        "dbus_timeout",
        default=60.0,
        min=1.0,
        help="Seconds to wait for one answer from vmbeamd (proving co-location "
        "through the pool takes up to vmbeamd's rendezvous timeout).",
    ),
    cfg.FloatOpt(
        "poll_interval",
        default=0.1,
        min=0.01,
        help="Seconds between two reads of a running vmbeamd job.",
    ),
]


def register_opts(conf):
    conf.register_group(vmbeam_group)
    conf.register_opts(opts, group=vmbeam_group)


def list_opts():
    """For oslo-config-generator (entry point oslo.config.opts)."""
    return {vmbeam_group: opts}
