//! vmbeamd's command line (clap): parsed by the binary, and rendered into vmbeamd(8) by
//! `packaging/gen` through [`command()`].

use std::path::PathBuf;

use clap::{CommandFactory, Parser};

/// vmbeamd's arguments.
#[derive(Parser, Debug)]
#[command(
    name = "vmbeamd",
    version,
    about = "VMBeam's D-Bus service (system bus)"
)]
pub struct Args {
    /// The cloud VM's VMBeam configuration
    #[arg(long, default_value = "/etc/vmbeam/vmbeam.conf")]
    pub config: PathBuf,
    /// The local libvirt
    #[arg(long, default_value = "qemu:///system")]
    pub libvirt_uri: String,
    /// qemu.conf's memory_backing_dir
    #[arg(long, default_value = "/var/lib/libvirt/qemu/ram")]
    pub memory_backing_dir: PathBuf,
    /// Directory of the private QMP sockets
    #[arg(long, default_value = vmbeam_core::domain::DEFAULT_QMP_DIR)]
    pub qmp_dir: PathBuf,
    /// Daemon state for this boot (the ticket replay cache)
    #[arg(long, default_value = "/run/vmbeam/state")]
    pub state_dir: PathBuf,
    /// Daemon state that outlives a reboot (the host-device pool's records)
    #[arg(long, default_value = "/var/lib/vmbeam")]
    pub persistent_dir: PathBuf,
    /// How long to wait for a destination's answer through the pool, in ms
    #[arg(long, default_value_t = 1500)]
    pub rendezvous_timeout_ms: u64,
    /// Bound on handling one hook event, in seconds
    #[arg(long, default_value_t = 20)]
    pub hook_timeout_secs: u64,
}

/// vmbeamd's command, as clap builds it (for its man page).
pub fn command() -> clap::Command {
    Args::command()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent_and_defaults_to_the_installed_paths() {
        command().debug_assert();
        let a = Args::try_parse_from(["vmbeamd"]).unwrap();
        assert_eq!(a.config, PathBuf::from("/etc/vmbeam/vmbeam.conf"));
        assert_eq!(a.libvirt_uri, "qemu:///system");
        assert_eq!(a.hook_timeout_secs, 20);
        assert_eq!(a.state_dir, PathBuf::from("/run/vmbeam/state"));
        assert_eq!(a.persistent_dir, PathBuf::from("/var/lib/vmbeam"));
    }
}
