//! The migration planner: zero-copy or traditional, and why.
//!
//! [`plan`] is a pure function of what the caller gathered: the requested mode, the
//! domain's facts and VMBeam metadata, this host's identity, what the destination reported
//! about itself (including the co-location proof it ran on its view of the pool) and what
//! the hypervisor backend can do. Zero-copy needs every condition; the first one that fails
//! is the reason given. Metadata alone is a claim: without a proof read from the pool by the
//! destination, the answer is traditional.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::domain::{AllocationMode, DomainFacts, MemoryAccess, MemorySource};
use crate::identity::Identity;
use crate::ids::FileIdentity;
use crate::ids::{CloudId, HostId};
use crate::metadata::BeamMetadata;
use crate::pool::PoolError;

/// What the user asked for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RequestedMode {
    /// Zero-copy where co-location is proven, traditional otherwise (the default).
    #[default]
    Auto,
    /// Zero-copy or nothing (`--zero-copy`).
    RequireZeroCopy,
    /// Traditional even when zero-copy is possible (`--no-zero-copy`).
    ForceTraditional,
}

impl RequestedMode {
    /// The wire name (D-Bus option `mode`, Nova's configuration): `auto`, `zero-copy`,
    /// `traditional`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::RequireZeroCopy => "zero-copy",
            Self::ForceTraditional => "traditional",
        }
    }
}

impl std::str::FromStr for RequestedMode {
    type Err = UnknownName;

    fn from_str(s: &str) -> Result<Self, UnknownName> {
        [Self::Auto, Self::RequireZeroCopy, Self::ForceTraditional]
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| UnknownName::new("mode", s, "auto, zero-copy, traditional"))
    }
}

/// A name that is not one of a closed set (a mode or phase read from the wire).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} '{got}' is not one of: {known}")]
pub struct UnknownName {
    what: &'static str,
    got: String,
    known: &'static str,
}

impl UnknownName {
    /// `got` is not a valid `what` (one of `known`).
    pub fn new(what: &'static str, got: &str, known: &'static str) -> Self {
        Self {
            what,
            got: got.to_owned(),
            known,
        }
    }
}

/// How a migration will move the guest's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationMode {
    /// The destination maps the source's pool file; only device state crosses the wire.
    ZeroCopy,
    /// An ordinary live migration copying the memory; the destination gets a fresh pool
    /// file.
    Traditional,
}

impl fmt::Display for MigrationMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::ZeroCopy => "zero-copy",
            Self::Traditional => "traditional",
        })
    }
}

impl std::str::FromStr for MigrationMode {
    type Err = UnknownName;

    /// The inverse of `Display` (what the Job's `Mode` property carries).
    fn from_str(s: &str) -> Result<Self, UnknownName> {
        match s {
            "zero-copy" => Ok(Self::ZeroCopy),
            "traditional" => Ok(Self::Traditional),
            _ => Err(UnknownName::new(
                "migration mode",
                s,
                "zero-copy, traditional",
            )),
        }
    }
}

/// The outcome of the destination's attempt to read the source's proof file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProofStatus {
    /// The destination read the proof from its view of the pool: co-located.
    Proven,
    /// No proof was run (for instance, the source could not write one).
    NotAttempted,
    /// The proof file was not in the destination's view of the pool.
    Unreadable,
    /// The destination found the file with other content.
    ContentMismatch,
    /// The destination's file has another device/inode than the source's.
    IdentityMismatch,
    /// The proof could not be run (the message says why).
    Error(String),
}

impl ProofStatus {
    /// Maps the result of [`crate::pool::read_proof`] run at the destination.
    pub fn from_read(result: &Result<(), PoolError>) -> Self {
        match result {
            Ok(()) => Self::Proven,
            Err(PoolError::ProofMissing(_)) => Self::Unreadable,
            Err(PoolError::ProofMismatch(_)) => Self::ContentMismatch,
            Err(PoolError::ProofIdentityMismatch { .. }) => Self::IdentityMismatch,
            Err(other) => Self::Error(other.to_string()),
        }
    }
}

impl fmt::Display for ProofStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Proven => write!(f, "destination read the nonce from its pool view"),
            Self::NotAttempted => write!(f, "no proof was attempted"),
            Self::Unreadable => {
                write!(f, "destination could not read the nonce from its pool view")
            }
            Self::ContentMismatch => write!(
                f,
                "destination found a different nonce file in its pool view"
            ),
            Self::IdentityMismatch => write!(
                f,
                "destination's pool view holds a different file (device/inode differ)"
            ),
            Self::Error(msg) => write!(f, "destination could not run the proof: {msg}"),
        }
    }
}

/// What the destination's VMBeam daemon reported about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DestinationReport {
    /// The destination cloud VM.
    pub host_id: HostId,
    /// Its virtual IaaS cloud.
    pub cloud: CloudId,
    /// The co-location proof it ran.
    pub proof: ProofStatus,
    /// The pool file's identity in its view, if it could stat it.
    pub pool_identity: Option<FileIdentity>,
}

/// What the hypervisor backend can do for zero-copy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendCapabilities {
    /// The migration capability `x-ignore-shared` (QEMU) or its equivalent.
    pub ignore_shared: bool,
    /// The private monitor answers (VMBeam's QMP socket is reachable).
    pub private_monitor: bool,
}

/// A backend capability zero-copy needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Capability {
    /// `x-ignore-shared`.
    IgnoreShared,
    /// The private monitor.
    PrivateMonitor,
}

/// Everything the planner decides on.
#[derive(Debug, Clone, Copy)]
pub struct PlanInput<'a> {
    /// What the user asked for.
    pub requested: RequestedMode,
    /// The domain, from its live XML.
    pub domain: &'a DomainFacts,
    /// Its VMBeam metadata, if enabled.
    pub metadata: Option<&'a BeamMetadata>,
    /// This host.
    pub local: &'a Identity,
    /// The pool file's identity as this host sees it, if known.
    pub local_pool_identity: Option<FileIdentity>,
    /// The destination's report; `None` when no VMBeam daemon answered there.
    pub destination: Option<&'a DestinationReport>,
    /// The backend's capabilities.
    pub backend: BackendCapabilities,
}

/// Why a plan is what it is. `Display` gives a sentence for the user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "reason")]
pub enum Reason {
    /// Every condition for zero-copy holds.
    ColocationProven {
        /// The destination.
        dest: HostId,
    },
    /// The user forced a traditional migration.
    Forced,
    /// The domain has no VMBeam metadata.
    NotEnabled,
    /// The domain is enabled for another cloud than this host's.
    DomainInOtherCloud {
        /// The cloud in the metadata.
        domain_cloud: CloudId,
        /// This host's cloud.
        local_cloud: CloudId,
    },
    /// Another host owns the pool file.
    NotOwner {
        /// The owner in the metadata.
        owner: HostId,
        /// This host.
        local: HostId,
    },
    /// The metadata names another pool than this host's.
    OtherPool {
        /// The pool in the metadata.
        domain_pool: PathBuf,
        /// This host's pool.
        local_pool: PathBuf,
    },
    /// The RAM is not in a file.
    MemoryNotFile {
        /// The actual source.
        source: MemorySource,
    },
    /// The RAM mapping is private.
    MemoryPrivate,
    /// `<discard/>` is set.
    MemoryDiscard,
    /// Hugepages back the RAM.
    Hugepages,
    /// The RAM is preallocated.
    Preallocated,
    /// The guest has NUMA cells.
    Numa {
        /// How many.
        cells: usize,
    },
    /// The domain lacks VMBeam's private QMP monitor.
    NoPrivateMonitor,
    /// The backend lacks a capability.
    BackendLacks {
        /// Which.
        capability: Capability,
    },
    /// No VMBeam daemon answered at the destination.
    DestinationUnknown,
    /// The destination is this host.
    SameHost {
        /// This host.
        host: HostId,
    },
    /// The destination is in another cloud.
    OtherCloud {
        /// The destination.
        dest: HostId,
        /// Its cloud.
        dest_cloud: CloudId,
        /// This host's cloud.
        local_cloud: CloudId,
    },
    /// The destination did not prove co-location.
    NotColocated {
        /// What the proof found.
        proof: ProofStatus,
    },
    /// Both ends see different pool files.
    PoolFileMismatch {
        /// Identity here.
        local: FileIdentity,
        /// Identity at the destination.
        dest: FileIdentity,
    },
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ColocationProven { dest } => write!(
                f,
                "destination {dest} shares the beam pool with this host (co-location proven)"
            ),
            Self::Forced => write!(f, "forced by --no-zero-copy"),
            Self::NotEnabled => write!(
                f,
                "the domain is not enabled for VMBeam (no VMBeam metadata; run vmbeam enable)"
            ),
            Self::DomainInOtherCloud {
                domain_cloud,
                local_cloud,
            } => write!(
                f,
                "the domain is enabled for virtual IaaS cloud '{domain_cloud}', but this host is in '{local_cloud}'"
            ),
            Self::NotOwner { owner, local } => write!(
                f,
                "the domain's pool file is owned by {owner}, not by this host {local}"
            ),
            Self::OtherPool {
                domain_pool,
                local_pool,
            } => write!(
                f,
                "the domain's memory is in pool {}, not in this host's pool {}",
                domain_pool.display(),
                local_pool.display()
            ),
            Self::MemoryNotFile { source } => {
                write!(f, "memory backing is {source}, not a shared file")
            }
            Self::MemoryPrivate => write!(
                f,
                "memory access mode is private (share=off), not shared"
            ),
            Self::MemoryDiscard => write!(
                f,
                "memory backing has <discard/>, which would punch the memory out of the pool file"
            ),
            Self::Hugepages => write!(
                f,
                "memory is backed by hugepages, which do not live in the beam pool"
            ),
            Self::Preallocated => write!(
                f,
                "memory is preallocated, which would make the destination write the shared pages"
            ),
            Self::Numa { cells } => write!(
                f,
                "the guest has {cells} NUMA cells, which zero-copy does not support"
            ),
            Self::NoPrivateMonitor => write!(
                f,
                "the domain has no VMBeam QMP monitor (run vmbeam enable and restart it)"
            ),
            Self::BackendLacks {
                capability: Capability::IgnoreShared,
            } => write!(f, "the hypervisor does not support x-ignore-shared"),
            Self::BackendLacks {
                capability: Capability::PrivateMonitor,
            } => write!(f, "the domain's VMBeam QMP monitor does not answer"),
            Self::DestinationUnknown => {
                write!(f, "no verified answer from a VMBeam daemon at the destination")
            }
            Self::SameHost { host } => write!(f, "destination {host} is this host"),
            Self::OtherCloud {
                dest,
                dest_cloud,
                local_cloud,
            } => write!(
                f,
                "destination {dest} is in virtual IaaS cloud '{dest_cloud}', not '{local_cloud}'"
            ),
            Self::NotColocated { proof } => write!(f, "co-location not proven: {proof}"),
            Self::PoolFileMismatch { local, dest } => write!(
                f,
                "the destination sees another pool file ({dest}) than this host ({local})"
            ),
        }
    }
}

/// The planner's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// How the memory will move.
    pub mode: MigrationMode,
    /// Why.
    pub reason: Reason,
}

impl Plan {
    /// Whether the plan is zero-copy.
    pub fn is_zero_copy(&self) -> bool {
        self.mode == MigrationMode::ZeroCopy
    }
}

/// Why no plan could be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// Zero-copy was required but a condition fails.
    #[error("zero-copy migration refused: {0}")]
    ZeroCopyRefused(Reason),
}

/// Decides how to migrate. See the module documentation.
pub fn plan(input: &PlanInput<'_>) -> Result<Plan, PlanError> {
    if input.requested == RequestedMode::ForceTraditional {
        return Ok(Plan {
            mode: MigrationMode::Traditional,
            reason: Reason::Forced,
        });
    }
    match zero_copy_check(input) {
        Ok(dest) => Ok(Plan {
            mode: MigrationMode::ZeroCopy,
            reason: Reason::ColocationProven { dest },
        }),
        Err(reason) if input.requested == RequestedMode::RequireZeroCopy => {
            Err(PlanError::ZeroCopyRefused(reason))
        }
        Err(reason) => Ok(Plan {
            mode: MigrationMode::Traditional,
            reason,
        }),
    }
}

/// The destination when zero-copy is possible, otherwise the first reason it is not.
fn zero_copy_check(input: &PlanInput<'_>) -> Result<HostId, Reason> {
    let local = input.local;
    // The domain's own state first: it is what the user can fix with `vmbeam enable`.
    let Some(meta) = input.metadata else {
        return Err(Reason::NotEnabled);
    };
    if meta.cloud != local.cloud {
        return Err(Reason::DomainInOtherCloud {
            domain_cloud: meta.cloud.clone(),
            local_cloud: local.cloud.clone(),
        });
    }
    if meta.owner != local.host_id {
        return Err(Reason::NotOwner {
            owner: meta.owner.clone(),
            local: local.host_id.clone(),
        });
    }
    if meta.pool != local.pool_dir {
        return Err(Reason::OtherPool {
            domain_pool: meta.pool.clone(),
            local_pool: local.pool_dir.clone(),
        });
    }
    let mb = &input.domain.memory_backing;
    if mb.hugepages {
        return Err(Reason::Hugepages);
    }
    let source = mb.effective_source();
    if source != MemorySource::File {
        return Err(Reason::MemoryNotFile { source });
    }
    if mb.effective_access() != MemoryAccess::Shared {
        return Err(Reason::MemoryPrivate);
    }
    if mb.discard {
        return Err(Reason::MemoryDiscard);
    }
    if mb.allocation == Some(AllocationMode::Immediate) {
        return Err(Reason::Preallocated);
    }
    if input.domain.numa_cells > 0 {
        return Err(Reason::Numa {
            cells: input.domain.numa_cells,
        });
    }
    if input.domain.private_qmp.is_none() {
        return Err(Reason::NoPrivateMonitor);
    }
    // Then whether the destination answered at all: without an answer the backend is not
    // asked (its capabilities are all false), and "no x-ignore-shared" would hide why.
    let Some(dest) = input.destination else {
        return Err(Reason::DestinationUnknown);
    };
    // Then the backend.
    if !input.backend.ignore_shared {
        return Err(Reason::BackendLacks {
            capability: Capability::IgnoreShared,
        });
    }
    if !input.backend.private_monitor {
        return Err(Reason::BackendLacks {
            capability: Capability::PrivateMonitor,
        });
    }
    // Then the rest of the destination's answer.
    if dest.host_id == local.host_id {
        return Err(Reason::SameHost {
            host: dest.host_id.clone(),
        });
    }
    if dest.cloud != local.cloud {
        return Err(Reason::OtherCloud {
            dest: dest.host_id.clone(),
            dest_cloud: dest.cloud.clone(),
            local_cloud: local.cloud.clone(),
        });
    }
    if dest.proof != ProofStatus::Proven {
        return Err(Reason::NotColocated {
            proof: dest.proof.clone(),
        });
    }
    if let (Some(l), Some(d)) = (input.local_pool_identity, dest.pool_identity) {
        if l != d {
            return Err(Reason::PoolFileMismatch { local: l, dest: d });
        }
    }
    Ok(dest.host_id.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::MemoryBacking;
    use crate::ids::DomainUuid;
    use std::path::Path;

    struct World {
        domain: DomainFacts,
        metadata: Option<BeamMetadata>,
        local: Identity,
        local_pool_identity: Option<FileIdentity>,
        destination: Option<DestinationReport>,
        backend: BackendCapabilities,
    }

    fn cloud(s: &str) -> CloudId {
        CloudId::new(s).unwrap()
    }
    fn host(s: &str) -> HostId {
        HostId::new(s).unwrap()
    }
    const ID: FileIdentity = FileIdentity { dev: 1, ino: 2 };

    /// A world where zero-copy is possible.
    fn good() -> World {
        World {
            domain: DomainFacts {
                hypervisor: "kvm".into(),
                name: "web1".into(),
                uuid: DomainUuid::new("6e3b1e9a-1b2c-4d5e-8f90-0123456789ab").unwrap(),
                id: Some(3),
                memory_kib: 1 << 20,
                memory_backing: MemoryBacking {
                    source: Some(MemorySource::File),
                    access: Some(MemoryAccess::Shared),
                    ..MemoryBacking::default()
                },
                numa_cells: 0,
                private_qmp: Some(PathBuf::from("/run/vmbeam/qmp/x.sock")),
            },
            metadata: Some(BeamMetadata {
                cloud: cloud("acme"),
                pool: PathBuf::from("/pool"),
                owner: host("cvm1"),
                generation: 1,
                pool_file: None,
            }),
            local: Identity {
                host_id: host("cvm1"),
                cloud: cloud("acme"),
                pool_dir: PathBuf::from("/pool"),
                key_file: PathBuf::from("/etc/vmbeam/key"),
                ticket_ttl_secs: 30,
                pool: crate::identity::PoolKind::Directory,
            },
            local_pool_identity: Some(ID),
            destination: Some(DestinationReport {
                host_id: host("cvm2"),
                cloud: cloud("acme"),
                proof: ProofStatus::Proven,
                pool_identity: Some(ID),
            }),
            backend: BackendCapabilities {
                ignore_shared: true,
                private_monitor: true,
            },
        }
    }

    fn run(w: &World, requested: RequestedMode) -> Result<Plan, PlanError> {
        plan(&PlanInput {
            requested,
            domain: &w.domain,
            metadata: w.metadata.as_ref(),
            local: &w.local,
            local_pool_identity: w.local_pool_identity,
            destination: w.destination.as_ref(),
            backend: w.backend,
        })
    }

    #[test]
    fn zero_copy_when_everything_holds() {
        let w = good();
        for mode in [RequestedMode::Auto, RequestedMode::RequireZeroCopy] {
            let p = run(&w, mode).unwrap();
            assert!(p.is_zero_copy());
            assert_eq!(p.reason, Reason::ColocationProven { dest: host("cvm2") });
        }
        assert_eq!(
            run(&w, RequestedMode::Auto).unwrap().reason.to_string(),
            "destination cvm2 shares the beam pool with this host (co-location proven)"
        );
    }

    #[test]
    fn forced_traditional_wins_even_when_possible() {
        let p = run(&good(), RequestedMode::ForceTraditional).unwrap();
        assert_eq!(p.mode, MigrationMode::Traditional);
        assert_eq!(p.reason.to_string(), "forced by --no-zero-copy");
        // And when impossible too.
        let mut w = good();
        w.metadata = None;
        assert_eq!(
            run(&w, RequestedMode::ForceTraditional).unwrap().reason,
            Reason::Forced
        );
    }

    /// Each broken condition, the reason it must give, and its sentence.
    fn broken_worlds() -> Vec<(World, Reason, &'static str)> {
        let mut cases = Vec::new();
        let mut case = |f: &dyn Fn(&mut World), reason: Reason, text: &'static str| {
            let mut w = good();
            f(&mut w);
            cases.push((w, reason, text));
        };
        case(
            &|w| w.metadata = None,
            Reason::NotEnabled,
            "the domain is not enabled for VMBeam (no VMBeam metadata; run vmbeam enable)",
        );
        case(
            &|w| w.metadata.as_mut().unwrap().cloud = cloud("other"),
            Reason::DomainInOtherCloud {
                domain_cloud: cloud("other"),
                local_cloud: cloud("acme"),
            },
            "the domain is enabled for virtual IaaS cloud 'other', but this host is in 'acme'",
        );
        case(
            &|w| w.metadata.as_mut().unwrap().owner = host("cvm9"),
            Reason::NotOwner {
                owner: host("cvm9"),
                local: host("cvm1"),
            },
            "the domain's pool file is owned by cvm9, not by this host cvm1",
        );
        case(
            &|w| w.metadata.as_mut().unwrap().pool = PathBuf::from("/elsewhere"),
            Reason::OtherPool {
                domain_pool: PathBuf::from("/elsewhere"),
                local_pool: PathBuf::from("/pool"),
            },
            "the domain's memory is in pool /elsewhere, not in this host's pool /pool",
        );
        case(
            &|w| w.domain.memory_backing.hugepages = true,
            Reason::Hugepages,
            "memory is backed by hugepages, which do not live in the beam pool",
        );
        case(
            &|w| w.domain.memory_backing.source = Some(MemorySource::Memfd),
            Reason::MemoryNotFile {
                source: MemorySource::Memfd,
            },
            "memory backing is memfd, not a shared file",
        );
        case(
            &|w| w.domain.memory_backing.source = None,
            Reason::MemoryNotFile {
                source: MemorySource::Anonymous,
            },
            "memory backing is anonymous, not a shared file",
        );
        case(
            &|w| w.domain.memory_backing.access = Some(MemoryAccess::Private),
            Reason::MemoryPrivate,
            "memory access mode is private (share=off), not shared",
        );
        case(
            &|w| w.domain.memory_backing.access = None,
            Reason::MemoryPrivate,
            "memory access mode is private (share=off), not shared",
        );
        case(
            &|w| w.domain.memory_backing.discard = true,
            Reason::MemoryDiscard,
            "memory backing has <discard/>, which would punch the memory out of the pool file",
        );
        case(
            &|w| w.domain.memory_backing.allocation = Some(AllocationMode::Immediate),
            Reason::Preallocated,
            "memory is preallocated, which would make the destination write the shared pages",
        );
        case(
            &|w| w.domain.numa_cells = 2,
            Reason::Numa { cells: 2 },
            "the guest has 2 NUMA cells, which zero-copy does not support",
        );
        case(
            &|w| w.domain.private_qmp = None,
            Reason::NoPrivateMonitor,
            "the domain has no VMBeam QMP monitor (run vmbeam enable and restart it)",
        );
        case(
            &|w| w.backend.ignore_shared = false,
            Reason::BackendLacks {
                capability: Capability::IgnoreShared,
            },
            "the hypervisor does not support x-ignore-shared",
        );
        case(
            &|w| w.backend.private_monitor = false,
            Reason::BackendLacks {
                capability: Capability::PrivateMonitor,
            },
            "the domain's VMBeam QMP monitor does not answer",
        );
        case(
            &|w| w.destination = None,
            Reason::DestinationUnknown,
            "no verified answer from a VMBeam daemon at the destination",
        );
        // Without an answer the engine does not ask the backend (all capabilities false):
        // the refusal names the missing answer, not the hypervisor (an unauthenticated
        // answer was once reported as "the hypervisor does not support x-ignore-shared").
        case(
            &|w| {
                w.destination = None;
                w.backend = BackendCapabilities::default();
            },
            Reason::DestinationUnknown,
            "no verified answer from a VMBeam daemon at the destination",
        );
        case(
            &|w| w.destination.as_mut().unwrap().host_id = host("cvm1"),
            Reason::SameHost { host: host("cvm1") },
            "destination cvm1 is this host",
        );
        case(
            &|w| {
                let d = w.destination.as_mut().unwrap();
                d.host_id = host("cvm3");
                d.cloud = cloud("other");
            },
            Reason::OtherCloud {
                dest: host("cvm3"),
                dest_cloud: cloud("other"),
                local_cloud: cloud("acme"),
            },
            "destination cvm3 is in virtual IaaS cloud 'other', not 'acme'",
        );
        case(
            &|w| w.destination.as_mut().unwrap().proof = ProofStatus::Unreadable,
            Reason::NotColocated {
                proof: ProofStatus::Unreadable,
            },
            "co-location not proven: destination could not read the nonce from its pool view",
        );
        case(
            &|w| w.destination.as_mut().unwrap().proof = ProofStatus::NotAttempted,
            Reason::NotColocated {
                proof: ProofStatus::NotAttempted,
            },
            "co-location not proven: no proof was attempted",
        );
        case(
            &|w| w.destination.as_mut().unwrap().proof = ProofStatus::ContentMismatch,
            Reason::NotColocated {
                proof: ProofStatus::ContentMismatch,
            },
            "co-location not proven: destination found a different nonce file in its pool view",
        );
        case(
            &|w| w.destination.as_mut().unwrap().proof = ProofStatus::IdentityMismatch,
            Reason::NotColocated {
                proof: ProofStatus::IdentityMismatch,
            },
            "co-location not proven: destination's pool view holds a different file (device/inode differ)",
        );
        case(
            &|w| w.destination.as_mut().unwrap().proof = ProofStatus::Error("EIO".into()),
            Reason::NotColocated {
                proof: ProofStatus::Error("EIO".into()),
            },
            "co-location not proven: destination could not run the proof: EIO",
        );
        case(
            &|w| {
                w.destination.as_mut().unwrap().pool_identity =
                    Some(FileIdentity { dev: 1, ino: 3 })
            },
            Reason::PoolFileMismatch {
                local: ID,
                dest: FileIdentity { dev: 1, ino: 3 },
            },
            "the destination sees another pool file (dev 0:1 inode 3) than this host (dev 0:1 inode 2)",
        );
        cases
    }

    #[test]
    fn every_blocker_gives_its_reason() {
        for (w, reason, text) in broken_worlds() {
            let auto = run(&w, RequestedMode::Auto).unwrap();
            assert_eq!(auto.mode, MigrationMode::Traditional, "{text}");
            assert_eq!(auto.reason, reason);
            assert_eq!(auto.reason.to_string(), text);
            let required = run(&w, RequestedMode::RequireZeroCopy).unwrap_err();
            assert_eq!(required, PlanError::ZeroCopyRefused(reason));
            assert_eq!(
                required.to_string(),
                format!("zero-copy migration refused: {text}")
            );
        }
    }

    #[test]
    fn identities_compared_only_when_both_known() {
        let mut w = good();
        w.local_pool_identity = None;
        assert!(run(&w, RequestedMode::Auto).unwrap().is_zero_copy());
        let mut w = good();
        w.destination.as_mut().unwrap().pool_identity = None;
        assert!(run(&w, RequestedMode::Auto).unwrap().is_zero_copy());
    }

    #[test]
    fn domain_problems_reported_before_destination_problems() {
        let mut w = good();
        w.domain.memory_backing.source = Some(MemorySource::Memfd);
        w.destination = None;
        assert_eq!(
            run(&w, RequestedMode::Auto).unwrap().reason,
            Reason::MemoryNotFile {
                source: MemorySource::Memfd
            }
        );
    }

    #[test]
    fn proof_status_from_pool_results() {
        let p = Path::new("/pool/x.proof").to_path_buf();
        assert_eq!(ProofStatus::from_read(&Ok(())), ProofStatus::Proven);
        assert_eq!(
            ProofStatus::from_read(&Err(PoolError::ProofMissing(p.clone()))),
            ProofStatus::Unreadable
        );
        assert_eq!(
            ProofStatus::from_read(&Err(PoolError::ProofMismatch(p.clone()))),
            ProofStatus::ContentMismatch
        );
        assert_eq!(
            ProofStatus::from_read(&Err(PoolError::ProofIdentityMismatch {
                path: p.clone(),
                expected: ID,
                found: ID
            })),
            ProofStatus::IdentityMismatch
        );
        assert!(matches!(
            ProofStatus::from_read(&Err(PoolError::NotRegular(p))),
            ProofStatus::Error(_)
        ));
    }

    #[test]
    fn plan_serialises() {
        let p = run(&good(), RequestedMode::Auto).unwrap();
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<Plan>(&json).unwrap(), p);
    }
}
