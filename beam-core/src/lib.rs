//! VMBeam's transport-independent core: the model the D-Bus daemon, the CLI and the libvirt
//! hook share. Nothing here talks to libvirt or QEMU; file-system access is limited to the
//! beam pool, the replay cache and the configuration.
//!
//! - [`ids`]: validated host, cloud and domain identifiers, nonces, file identities.
//! - [`metadata`]: VMBeam's elements in a domain's `<metadata>` (a guest's, a cloud VM's).
//! - [`xml`]: the namespace-aware element tree every XML reader here uses.
//! - [`domain`]: the facts VMBeam reads from a domain XML.
//! - [`destination`]: what a caller's destination XML must keep for zero-copy.
//! - [`transform`]: the domain-XML rewrites behind `vmbeam enable` / `disable`.
//! - [`identity`]: this cloud VM's identity (`/etc/vmbeam/vmbeam.conf`).
//! - [`ticket`]: signed agreements between source and destination, replay protection.
//! - [`pool`]: the beam pool: RAM files, ownership records, the co-location proof.
//! - [`rendezvous`]: the co-location proof's request and answer (messages, MAC, file names).
//! - [`plan`]: zero-copy or traditional, and why.
//! - [`job`]: phases, monotonic progress, statistics, and the [`job::Operation`] every front
//!   end translates into.
//! - [`hook`]: libvirt hook arguments.
//! - [`host`]: libvirt's host capabilities (the host UUID).
//! - [`host_protocol`]: the line protocol between a cloud VM (vmbeamd's `hostlink`) and the
//!   primary cloud's `vmbeam-host` on the `org.vmbeam.host.0` channel; pure, no I/O.
//! - [`control_page`]: the content proof through a shared device's control page (the
//!   host-device pool's confirmation of co-location); pure.
//! - [`recover`]: what a restarted vmbeamd does with hand-overs a dead daemon left half done.

mod b64;
pub mod backend;
pub mod carrier;
pub mod control_page;
pub mod destination;
pub mod device_share;
pub mod domain;
pub mod hook;
pub mod host;
pub mod host_protocol;
pub mod identity;
pub mod ids;
pub mod job;
pub mod metadata;
pub mod plan;
pub mod pool;
pub mod recover;
pub mod rendezvous;
pub mod ticket;
pub mod transform;
pub mod xml;

#[cfg(any(test, feature = "proptest-support"))]
pub mod proptest_support;

pub use domain::DomainFacts;
pub use hook::HookEvent;
pub use identity::Identity;
pub use ids::{CloudId, DomainUuid, FileIdentity, HostId, Nonce};
pub use job::{Operation, Phase, Progress};
pub use metadata::{BeamMetadata, CloudVmMetadata};
pub use plan::{MigrationMode, Plan, Reason, RequestedMode};
pub use pool::{BeamPool, ProofToken};
pub use ticket::{Ticket, TicketKey};
pub use xml::XmlError;
