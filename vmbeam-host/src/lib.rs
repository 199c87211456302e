//! `vmbeam-host`: the primary cloud's side of VMBeam. A daemon on the physical host that runs
//! the cloud VMs under its libvirt: it gives a guest's memory to the cloud VM that starts the
//! guest, shares it with a co-located cloud VM of the same virtual IaaS cloud when the guest
//! migrates there, and takes it back from the source once the guest left (the paper's
//! "inter-guest memory sharing, then release at the source").
//!
//! The memory is one sparse file per guest in `/dev/shm`, hot-plugged into each cloud VM that
//! holds it as an `ivshmem-plain` PCI device whose BAR 2 the cloud VM's QEMU uses as the
//! guest's RAM (the mechanism of `shared/design/nested-feasibility.md`).
//!
//! - [`cloudvm`]: the cloud VMs from the host's libvirt (metadata, host channel, VMBeam's
//!   devices, PCI slots, the 64-bit PCI window).
//! - [`device`]: the shared device: names, BAR size, layout, slot, window, libvirt's XML, and
//!   what libvirt does with `<shmem>`.
//! - [`protocol`]: the line protocol on each cloud VM's host channel; it lives in
//!   `vmbeam_core::host_protocol` (pure, shared with vmbeamd's client `hostlink`) and is
//!   re-exported here under its old name.
//! - [`ledger`]: the pure state machine of which guest is attached where.
//! - [`libvirt`]: the host's I/O behind traits (libvirt, backing files), and their real
//!   implementations.
//! - [`state`]: the state directory (the ledger and the status snapshot on disk).
//! - [`status`]: what `vmbeam-host status` prints.
//! - [`server`]: the daemon: discovery, channels, requests.

pub mod cloudvm;
pub mod device;
pub mod ledger;
pub mod libvirt;
pub mod server;
pub mod state;
pub mod status;

pub use vmbeam_core::host_protocol as protocol;

/// An error and its sources, joined with ": " (for logs, answers and the command line).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
