//! What `vmbeam-host status` prints: the daemon writes a [`StatusSnapshot`] to its state
//! directory after every rescan and every operation; the command reads and renders it (so
//! it needs neither libvirt nor a socket to the daemon, and says when the daemon is gone).

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use vmbeam_core::CloudId;

use crate::cloudvm::{CloudVmId, Topology};
use crate::device::{GuestKey, PciAddress};
use crate::ledger::{Ledger, Role};

/// One cloud VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloudVmStatus {
    /// Its name.
    pub name: String,
    /// Its domain UUID.
    pub id: CloudVmId,
    /// Its cloud.
    pub cloud: CloudId,
    /// Its host channel's socket.
    pub channel: PathBuf,
    /// Whether the daemon is connected to it.
    pub connected: bool,
    /// Its 64-bit PCI window in bytes.
    pub window: u64,
    /// Whether the window is declared (`<pcihole64>`) or QEMU's default.
    pub window_declared: bool,
    /// VMBeam's BARs in it, in bytes, as libvirt shows them.
    pub vmbeam_bars: u64,
    /// The largest guest RAM a new device could take there.
    pub largest_new_guest: Option<u64>,
}

/// One holder of a guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HolderStatus {
    /// The cloud VM.
    pub cloud_vm: CloudVmId,
    /// Its name, if it runs.
    pub name: Option<String>,
    /// Its role.
    pub role: Role,
    /// The device's address there.
    pub addr: PciAddress,
}

/// One guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestStatus {
    /// The guest.
    pub guest: GuestKey,
    /// BAR and file size.
    pub bar_size: u64,
    /// RAM size, if known.
    pub ram_bytes: Option<u64>,
    /// Its holders.
    pub holders: Vec<HolderStatus>,
    /// The operation in flight, e.g. `SHARE to 5f0c…`.
    pub pending: Option<String>,
}

/// The daemon's view, as of one moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusSnapshot {
    /// The daemon's process id.
    pub pid: u32,
    /// When it was written (seconds since the epoch).
    pub written_unix: u64,
    /// The cloud VMs.
    pub cloud_vms: Vec<CloudVmStatus>,
    /// The guests.
    pub guests: Vec<GuestStatus>,
    /// What the last rescan found wrong.
    pub problems: Vec<String>,
}

impl StatusSnapshot {
    /// The snapshot of `ledger` and `topo` now.
    pub fn new(
        ledger: &Ledger,
        topo: &Topology,
        connected: &BTreeSet<CloudVmId>,
        problems: &[String],
        written_unix: u64,
    ) -> Self {
        let cloud_vms = topo
            .cloud_vms
            .values()
            .map(|vm| CloudVmStatus {
                name: vm.name.clone(),
                id: vm.id.clone(),
                cloud: vm.cloud.clone(),
                channel: vm.channel.clone(),
                connected: connected.contains(&vm.id),
                window: vm.window,
                window_declared: vm.window_declared,
                vmbeam_bars: vm.shmems.iter().map(|s| s.bar_size).sum(),
                largest_new_guest: vm.largest_new_guest(),
            })
            .collect();
        let guests = ledger
            .guests()
            .iter()
            .map(|(key, g)| GuestStatus {
                guest: key.clone(),
                bar_size: g.bar_size,
                ram_bytes: g.ram_bytes,
                holders: g
                    .holders
                    .iter()
                    .map(|(id, h)| HolderStatus {
                        cloud_vm: id.clone(),
                        name: topo.cloud_vms.get(id).map(|vm| vm.name.clone()),
                        role: h.role,
                        addr: h.addr,
                    })
                    .collect(),
                pending: g.pending.as_ref().map(|p| {
                    let name = topo
                        .cloud_vms
                        .get(&p.target)
                        .map_or_else(|| p.target.to_string(), |vm| vm.name.clone());
                    format!("{} in {name}", p.kind)
                }),
            })
            .collect();
        Self {
            pid: std::process::id(),
            written_unix,
            cloud_vms,
            guests,
            problems: problems.to_vec(),
        }
    }

    /// The text `vmbeam-host status` prints, `now_unix` being the time now and
    /// `daemon_running` whether the process that wrote it still runs.
    pub fn render(&self, now_unix: u64, daemon_running: bool) -> String {
        let mut out = String::new();
        let age = now_unix.saturating_sub(self.written_unix);
        let _ = writeln!(
            out,
            "vmbeam-host (pid {}): {}, state as of {age} s ago",
            self.pid,
            if daemon_running {
                "running"
            } else {
                "NOT RUNNING"
            }
        );
        let _ = writeln!(out, "\ncloud VMs ({}):", self.cloud_vms.len());
        for vm in &self.cloud_vms {
            let window = format!(
                "{}{}",
                size(vm.window),
                if vm.window_declared {
                    ""
                } else {
                    " (QEMU's default)"
                }
            );
            let largest = vm.largest_new_guest.map_or_else(|| "none".to_owned(), size);
            let _ = writeln!(
                out,
                "  {} {} cloud={} channel={} window={window} vmbeam-bars={} largest-new-guest={largest}",
                vm.name,
                vm.id,
                vm.cloud,
                if vm.connected { "connected" } else { "not connected" },
                size(vm.vmbeam_bars),
            );
        }
        let _ = writeln!(out, "\nguests ({}):", self.guests.len());
        for g in &self.guests {
            let ram = g.ram_bytes.map_or_else(|| "unknown".to_owned(), size);
            let _ = writeln!(out, "  {} ram={ram} bar={}", g.guest, size(g.bar_size));
            for h in &g.holders {
                let name = h.name.as_deref().unwrap_or("(not running)");
                let _ = writeln!(out, "    {} {name} {} at {}", h.role, h.cloud_vm, h.addr);
            }
            if let Some(p) = &g.pending {
                let _ = writeln!(out, "    in progress: {p}");
            }
        }
        if !self.problems.is_empty() {
            let _ = writeln!(out, "\nproblems ({}):", self.problems.len());
            for p in &self.problems {
                let _ = writeln!(out, "  - {p}");
            }
        }
        out
    }
}

/// A byte count for people: whole GiB or MiB when exact, bytes otherwise.
fn size(bytes: u64) -> String {
    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;
    match bytes {
        0 => "0".to_owned(),
        b if b % GIB == 0 => format!("{} GiB", b / GIB),
        b if b % MIB == 0 => format!("{} MiB", b / MIB),
        b => format!("{b} bytes"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_well() {
        assert_eq!(size(0), "0");
        assert_eq!(size(2 << 30), "2 GiB");
        assert_eq!(size(512 << 20), "512 MiB");
        assert_eq!(size((1 << 30) - 4096), "1073737728 bytes");
    }
}
