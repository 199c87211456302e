//! VMBeam's D-Bus contract, shared by vmbeamd (the server), `vmbeam` and the libvirt hook
//! (clients). Modelled on UDisks2: a versioned well-known name, a manager object, one
//! object per job with properties that emit PropertiesChanged, `Cancel` and `Completed`.

use std::collections::HashMap;

use zbus::zvariant::{OwnedObjectPath, OwnedValue};

/// The well-known bus name (versioned).
pub const BUS_NAME: &str = "org.vmbeam.VMBeam1";
/// The manager object.
pub const MANAGER_PATH: &str = "/org/vmbeam/VMBeam1";
/// Jobs live under this path (`.../jobs/N`).
pub const JOBS_PATH: &str = "/org/vmbeam/VMBeam1/jobs";
/// The manager interface.
pub const MANAGER_IFACE: &str = "org.vmbeam.VMBeam1.Manager";
/// The job interface.
pub const JOB_IFACE: &str = "org.vmbeam.VMBeam1.Job";
/// The hook interface (root only, used by the libvirt hook).
pub const HOOK_IFACE: &str = "org.vmbeam.VMBeam1.Hook";

/// Typed errors of the VMBeam D-Bus API (`org.vmbeam.VMBeam1.Error.*`).
#[derive(Debug, Clone, PartialEq, zbus::DBusError)]
#[zbus(prefix = "org.vmbeam.VMBeam1.Error")]
pub enum BeamError {
    /// A D-Bus transport error.
    #[zbus(error)]
    ZBus(zbus::Error),
    /// No such domain on this host.
    NoSuchDomain(String),
    /// The domain is not beam-enabled (run `vmbeam enable`).
    NotBeamEnabled(String),
    /// The domain cannot be beam-enabled as it is (hugepages, NUMA, ...).
    CannotEnable(String),
    /// Zero-copy was required and is not possible; the reason says why.
    ZeroCopyRefused(String),
    /// The destination refused the migration ticket (forged, expired, replayed, other cloud).
    TicketRefused(String),
    /// An argument is malformed.
    InvalidArgs(String),
    /// The caller may not do this.
    NotAuthorized(String),
    /// Another operation on this domain is in progress.
    Busy(String),
    /// libvirt reported an error.
    Libvirt(String),
    /// The migration failed; the guest keeps running on the source.
    MigrationFailed(String),
    /// No such job.
    NoSuchJob(String),
    /// An internal error (a bug or the host's state).
    Failed(String),
}

/// One beam-enabled domain as `ListDomains` reports it:
/// (name, uuid, state, owner host, pool file, generation).
pub type DomainRow = (String, String, String, String, String, u64);

/// The manager: start migrations, enable domains, ask about co-location.
#[zbus::proxy(
    interface = "org.vmbeam.VMBeam1.Manager",
    default_service = "org.vmbeam.VMBeam1",
    default_path = "/org/vmbeam/VMBeam1"
)]
pub trait Manager {
    /// Starts a migration; returns the job object. Options (all optional): `mode` (s:
    /// "auto", "zero-copy", "traditional"), `live`, `persistent`, `undefine-source` (b),
    /// `migrate-uri` (s), `timeout` (u: seconds before the guest is suspended).
    fn migrate(
        &self,
        domain: &str,
        dest_uri: &str,
        options: HashMap<String, OwnedValue>,
    ) -> Result<OwnedObjectPath, BeamError>;

    /// Makes a domain beam-enabled (persistent definition; applies at its next start).
    /// Returns the changes made, one sentence each.
    fn enable(&self, domain: &str) -> Result<Vec<String>, BeamError>;

    /// Reverts `enable`.
    fn disable(&self, domain: &str) -> Result<Vec<String>, BeamError>;

    /// The beam-enabled domains of this host.
    fn list_domains(&self) -> Result<Vec<DomainRow>, BeamError>;

    /// Whether a zero-copy migration to `dest_uri` is possible, proven through the pool:
    /// (co-located, destination host id, reason).
    fn co_location(&self, dest_uri: &str) -> Result<(bool, String, String), BeamError>;

    /// The daemon's view as key/value lines: identity, pool files, running jobs.
    fn status(&self) -> Result<Vec<(String, String)>, BeamError>;

    /// Paths of the jobs this daemon knows.
    #[zbus(property)]
    fn jobs(&self) -> zbus::Result<Vec<OwnedObjectPath>>;

    /// This cloud VM's host id.
    #[zbus(property)]
    fn host_id(&self) -> zbus::Result<String>;

    /// Its virtual IaaS cloud.
    #[zbus(property)]
    fn cloud(&self) -> zbus::Result<String>;
}

/// One migration job.
#[zbus::proxy(
    interface = "org.vmbeam.VMBeam1.Job",
    default_service = "org.vmbeam.VMBeam1"
)]
pub trait Job {
    /// Cancels the migration (libvirt's job abort); the guest keeps running on the source.
    fn cancel(&self) -> Result<(), BeamError>;

    /// Emitted once when the job ends.
    #[zbus(signal)]
    fn completed(&self, success: bool, message: &str) -> zbus::Result<()>;

    #[zbus(property)]
    fn domain(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn destination(&self) -> zbus::Result<String>;
    /// Current phase (`planning`, `migrating`, ..., `completed`, `failed`, `cancelled`).
    #[zbus(property)]
    fn phase(&self) -> zbus::Result<String>;
    /// 0..=100, never decreasing.
    #[zbus(property)]
    fn progress(&self) -> zbus::Result<u32>;
    #[zbus(property)]
    fn bytes_transferred(&self) -> zbus::Result<u64>;
    /// Downtime in milliseconds (0 until known).
    #[zbus(property)]
    fn downtime(&self) -> zbus::Result<u64>;
    /// Total time in milliseconds (0 until done).
    #[zbus(property)]
    fn total_time(&self) -> zbus::Result<u64>;
    /// `zero-copy` or `traditional` (empty while planning).
    #[zbus(property)]
    fn mode(&self) -> zbus::Result<String>;
    /// Why that mode.
    #[zbus(property)]
    fn mode_reason(&self) -> zbus::Result<String>;
    /// The error, if it failed.
    #[zbus(property)]
    fn error(&self) -> zbus::Result<String>;
    /// Milliseconds since the job started at which each step began (where the time goes).
    #[zbus(property)]
    fn timeline(&self) -> zbus::Result<Vec<(String, u64)>>;
    /// The typed D-Bus name of that error (e.g. `org.vmbeam.VMBeam1.Error.ZeroCopyRefused`).
    #[zbus(property)]
    fn error_name(&self) -> zbus::Result<String>;
}

/// The libvirt hook's entry point (root only).
#[zbus::proxy(
    interface = "org.vmbeam.VMBeam1.Hook",
    default_service = "org.vmbeam.VMBeam1",
    default_path = "/org/vmbeam/VMBeam1"
)]
pub trait Hook {
    /// One hook invocation: argv (object, op, sub-op, extra) and the domain XML from stdin.
    /// Returns the XML the hook must print (only meaningful for `migrate`), or an error that
    /// makes libvirt fail the operation.
    fn hook_event(&self, args: Vec<String>, xml: &str) -> Result<String, BeamError>;
}
