//! VMBeam's D-Bus contract, shared by vmbeamd (the server), `vmbeam` and the libvirt hook
//! (clients). Modelled on UDisks2: a versioned well-known name, a manager object, one
//! object per job with properties that emit PropertiesChanged, `Cancel` and `Completed`.
//!
//! The machine-readable contract is `org.vmbeam.VMBeam1.xml` beside this crate (D-Bus
//! introspection; a vmbeamd unit test holds the server to it, and the Nova shim's tests
//! hold its client to it). Front ends translate into `vmbeam_core`'s operation model
//! ([`vmbeam_core::job::MigrateOptions`]) and cross the bus in the typed shapes here:
//! [`MigrateOptionsDict`] in, [`JobStatus`] and [`DaemonStatus`] out, [`BeamError`] with its
//! [`ExitClass`] for failures.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use vmbeam_core::job::{MigrateOptions, Phase};
use vmbeam_core::plan::{MigrationMode, RequestedMode};
use zbus::zvariant::{as_value, OwnedObjectPath, OwnedValue, Type};

/// The introspection XML of every interface vmbeamd serves (the contract other languages
/// read).
pub const INTROSPECTION_XML: &str = include_str!("../org.vmbeam.VMBeam1.xml");

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

/// What kind of failure an error is, for exit codes and for "fall back or give up".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitClass {
    /// VMBeam said no (zero-copy impossible, ticket refused, not authorized).
    Refused,
    /// The request was wrong (no such domain, bad options, busy).
    BadInput,
    /// Nothing to ask: no system bus or no vmbeamd on it.
    NotReady,
    /// It was tried and failed.
    Failed,
}

/// Bus errors that mean "no vmbeamd here" rather than "vmbeamd said no".
const UNAVAILABLE: &[&str] = &[
    "org.freedesktop.DBus.Error.ServiceUnknown",
    "org.freedesktop.DBus.Error.NameHasNoOwner",
    "org.freedesktop.DBus.Error.NoServer",
    "org.freedesktop.DBus.Error.Disconnected",
];

impl BeamError {
    /// The error's kind.
    pub fn class(&self) -> ExitClass {
        match self {
            Self::ZeroCopyRefused(_) | Self::TicketRefused(_) | Self::NotAuthorized(_) => {
                ExitClass::Refused
            }
            Self::NoSuchDomain(_)
            | Self::InvalidArgs(_)
            | Self::NotBeamEnabled(_)
            | Self::CannotEnable(_)
            | Self::Busy(_)
            | Self::NoSuchJob(_) => ExitClass::BadInput,
            Self::ZBus(zbus::Error::MethodError(name, _, _)) => {
                if UNAVAILABLE.contains(&name.as_str()) {
                    ExitClass::NotReady
                } else if name.as_str() == "org.freedesktop.DBus.Error.InvalidArgs" {
                    // zbus's own answer to arguments that do not deserialize (an unknown
                    // option, a wrong type).
                    ExitClass::BadInput
                } else {
                    ExitClass::Failed
                }
            }
            Self::ZBus(zbus::Error::InputOutput(_) | zbus::Error::Address(_)) => {
                ExitClass::NotReady
            }
            Self::ZBus(_) | Self::Libvirt(_) | Self::MigrationFailed(_) | Self::Failed(_) => {
                ExitClass::Failed
            }
        }
    }

    /// The message alone, without the D-Bus error name.
    pub fn text(&self) -> String {
        match self {
            Self::ZBus(zbus::Error::MethodError(_, Some(text), _)) => text.clone(),
            Self::ZBus(z) => z.to_string(),
            Self::NoSuchDomain(s)
            | Self::NotBeamEnabled(s)
            | Self::CannotEnable(s)
            | Self::ZeroCopyRefused(s)
            | Self::TicketRefused(s)
            | Self::InvalidArgs(s)
            | Self::NotAuthorized(s)
            | Self::Busy(s)
            | Self::Libvirt(s)
            | Self::MigrationFailed(s)
            | Self::NoSuchJob(s)
            | Self::Failed(s) => s.clone(),
        }
    }

    /// Rebuilds a typed error from its D-Bus name and text (a Job's `ErrorName` and
    /// `Error`); an unknown name is `Failed`.
    pub fn from_name(name: &str, text: String) -> Self {
        let short = name.strip_prefix("org.vmbeam.VMBeam1.Error.").unwrap_or("");
        match short {
            "NoSuchDomain" => Self::NoSuchDomain(text),
            "NotBeamEnabled" => Self::NotBeamEnabled(text),
            "CannotEnable" => Self::CannotEnable(text),
            "ZeroCopyRefused" => Self::ZeroCopyRefused(text),
            "TicketRefused" => Self::TicketRefused(text),
            "InvalidArgs" => Self::InvalidArgs(text),
            "NotAuthorized" => Self::NotAuthorized(text),
            "Busy" => Self::Busy(text),
            "Libvirt" => Self::Libvirt(text),
            "MigrationFailed" => Self::MigrationFailed(text),
            "NoSuchJob" => Self::NoSuchJob(text),
            _ => Self::Failed(text),
        }
    }
}

/// `Migrate`'s options on the wire (`a{sv}`; every key optional, unknown keys refused by
/// the daemon with `org.freedesktop.DBus.Error.InvalidArgs`). Keys: `mode` (s: `auto`,
/// `zero-copy`, `traditional`), `live`, `persistent`, `undefine-source`, `tls` (b),
/// `migrate-uri` (s), `timeout` (u: seconds before the guest is suspended), `dest-xml` (s:
/// the domain XML for the destination, virsh's `--xml`), `persist-xml` (s: the persistent
/// definition there, virsh's `--persistent-xml`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, Type)]
#[zvariant(signature = "a{sv}")]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct MigrateOptionsDict {
    #[serde(with = "as_value::optional", skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    #[serde(with = "as_value::optional", skip_serializing_if = "Option::is_none")]
    pub live: Option<bool>,
    #[serde(with = "as_value::optional", skip_serializing_if = "Option::is_none")]
    pub persistent: Option<bool>,
    #[serde(with = "as_value::optional", skip_serializing_if = "Option::is_none")]
    pub undefine_source: Option<bool>,
    #[serde(with = "as_value::optional", skip_serializing_if = "Option::is_none")]
    pub tls: Option<bool>,
    #[serde(with = "as_value::optional", skip_serializing_if = "Option::is_none")]
    pub migrate_uri: Option<String>,
    #[serde(with = "as_value::optional", skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u32>,
    #[serde(with = "as_value::optional", skip_serializing_if = "Option::is_none")]
    pub dest_xml: Option<String>,
    #[serde(with = "as_value::optional", skip_serializing_if = "Option::is_none")]
    pub persist_xml: Option<String>,
}

impl From<&MigrateOptions> for MigrateOptionsDict {
    fn from(o: &MigrateOptions) -> Self {
        Self {
            mode: Some(o.mode.as_str().to_owned()),
            live: Some(o.live),
            persistent: Some(o.persistent),
            undefine_source: Some(o.undefine_source),
            tls: Some(o.tls),
            migrate_uri: o.migrate_uri.clone(),
            timeout: o.timeout_secs.map(|t| u32::try_from(t).unwrap_or(u32::MAX)),
            dest_xml: o.dest_xml.clone(),
            persist_xml: o.persist_xml.clone(),
        }
    }
}

impl TryFrom<MigrateOptionsDict> for MigrateOptions {
    type Error = BeamError;

    fn try_from(d: MigrateOptionsDict) -> Result<Self, BeamError> {
        let mode = match d.mode.as_deref() {
            None => RequestedMode::Auto,
            Some(m) => m.parse().map_err(|e: vmbeam_core::plan::UnknownName| {
                BeamError::InvalidArgs(e.to_string())
            })?,
        };
        Ok(Self {
            mode,
            live: d.live.unwrap_or(false),
            persistent: d.persistent.unwrap_or(false),
            undefine_source: d.undefine_source.unwrap_or(false),
            tls: d.tls.unwrap_or(false),
            migrate_uri: d.migrate_uri,
            timeout_secs: d.timeout.map(u64::from),
            dest_xml: d.dest_xml,
            persist_xml: d.persist_xml,
        })
    }
}

/// One pool file as `Status` reports it: (file name, size in bytes or -1 when missing,
/// owner record in words).
pub type PoolFileRow = (String, i64, String);

/// One job as `Status` reports it: (object path, domain, destination, phase, progress,
/// mode).
pub type JobRow = (String, String, String, String, u32, String);

/// The daemon's view, as `Status` returns it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, Type)]
pub struct DaemonStatus {
    pub host: String,
    pub cloud: String,
    pub pool: String,
    pub libvirt_host_uuid: String,
    pub pool_files: Vec<PoolFileRow>,
    pub jobs: Vec<JobRow>,
}

/// A job's properties, typed: what the CLI (and, by the same names, the Nova shim) reads.
#[derive(Debug, Clone, PartialEq)]
pub struct JobStatus {
    pub domain: String,
    pub destination: String,
    pub phase: Phase,
    /// 0..=100, never decreasing.
    pub progress: u32,
    pub bytes_transferred: u64,
    pub downtime_ms: u64,
    pub total_ms: u64,
    /// Once planned.
    pub mode: Option<MigrationMode>,
    pub mode_reason: String,
    /// When it failed or was cancelled.
    pub error: Option<BeamError>,
    pub timeline: Vec<(String, u64)>,
}

impl JobStatus {
    /// Parses a job's `GetAll` answer.
    pub fn from_properties(p: &HashMap<String, OwnedValue>) -> Result<Self, BeamError> {
        fn get<T>(p: &HashMap<String, OwnedValue>, k: &str) -> Result<T, BeamError>
        where
            T: TryFrom<OwnedValue>,
        {
            let v = p
                .get(k)
                .ok_or_else(|| BeamError::Failed(format!("the job has no property {k}")))?;
            T::try_from(
                v.try_clone()
                    .map_err(|e| BeamError::Failed(e.to_string()))?,
            )
            .map_err(|_| BeamError::Failed(format!("the job's property {k} has a wrong type")))
        }
        let bad = |e: vmbeam_core::plan::UnknownName| BeamError::Failed(format!("the job's {e}"));
        let phase: Phase = get::<String>(p, "Phase")?.parse().map_err(bad)?;
        let mode = match get::<String>(p, "Mode")?.as_str() {
            "" => None,
            m => Some(m.parse().map_err(bad)?),
        };
        let error_name: String = get(p, "ErrorName")?;
        let error_text: String = get(p, "Error")?;
        let error = (!error_name.is_empty() || !error_text.is_empty())
            .then(|| BeamError::from_name(&error_name, error_text));
        Ok(Self {
            domain: get(p, "Domain")?,
            destination: get(p, "Destination")?,
            phase,
            progress: get(p, "Progress")?,
            bytes_transferred: get(p, "BytesTransferred")?,
            downtime_ms: get(p, "Downtime")?,
            total_ms: get(p, "TotalTime")?,
            mode,
            mode_reason: get(p, "ModeReason")?,
            error,
            timeline: get::<Vec<(String, u64)>>(p, "Timeline")?,
        })
    }

    /// Reads every property of the job at `path` in one call (no cache: a job that ended
    /// before a client subscribed is still seen to end).
    pub fn read(
        conn: &zbus::blocking::Connection,
        path: &OwnedObjectPath,
    ) -> Result<Self, BeamError> {
        let props = zbus::blocking::fdo::PropertiesProxy::builder(conn)
            .destination(BUS_NAME)
            .map_err(BeamError::ZBus)?
            .path(path.clone())
            .map_err(BeamError::ZBus)?
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .map_err(BeamError::ZBus)?;
        let iface = zbus::names::InterfaceName::try_from(JOB_IFACE)
            .map_err(|e| BeamError::ZBus(e.into()))?;
        let all = props
            .get_all(iface)
            .map_err(|e| BeamError::ZBus(e.into()))?;
        Self::from_properties(&all)
    }
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
    /// Starts a migration; returns the job object. Options: [`MigrateOptionsDict`].
    fn migrate(
        &self,
        domain: &str,
        dest_uri: &str,
        options: MigrateOptionsDict,
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

    /// The daemon's view: identity, pool files, jobs.
    fn status(&self) -> Result<DaemonStatus, BeamError>;

    /// Paths of the jobs this daemon knows.
    #[zbus(property)]
    fn jobs(&self) -> zbus::Result<Vec<OwnedObjectPath>>;

    /// This cloud VM's host id.
    #[zbus(property)]
    fn host_id(&self) -> zbus::Result<String>;

    /// Its virtual IaaS cloud.
    #[zbus(property)]
    fn cloud(&self) -> zbus::Result<String>;

    /// The beam pool directory, as this cloud VM sees it.
    #[zbus(property)]
    fn pool_dir(&self) -> zbus::Result<String>;
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

#[cfg(test)]
mod prop_tests {
    use proptest::prelude::*;
    use vmbeam_core::proptest_support::proptest_config;
    use zbus::zvariant::serialized::{Context, Data};
    use zbus::zvariant::{to_bytes, LE};

    use super::*;

    fn mode_name() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("auto".to_owned()),
            Just("zero-copy".to_owned()),
            Just("traditional".to_owned()),
            any::<String>(),
        ]
    }

    prop_compose! {
        fn dict()(
            mode in proptest::option::of(mode_name()),
            live in any::<Option<bool>>(),
            persistent in any::<Option<bool>>(),
            undefine_source in any::<Option<bool>>(),
            tls in any::<Option<bool>>(),
            migrate_uri in proptest::option::of(any::<String>()),
            timeout in any::<Option<u32>>(),
            dest_xml in proptest::option::of(any::<String>()),
            persist_xml in proptest::option::of(any::<String>()),
        ) -> MigrateOptionsDict {
            MigrateOptionsDict {
                mode, live, persistent, undefine_source, tls, migrate_uri, timeout, dest_xml,
                persist_xml,
            }
        }
    }

    prop_compose! {
        fn options()(
            mode in prop_oneof![
                Just(RequestedMode::Auto),
                Just(RequestedMode::RequireZeroCopy),
                Just(RequestedMode::ForceTraditional),
            ],
            live in any::<bool>(),
            persistent in any::<bool>(),
            undefine_source in any::<bool>(),
            tls in any::<bool>(),
            migrate_uri in proptest::option::of(any::<String>()),
            timeout_secs in proptest::option::of(0..=u64::from(u32::MAX)),
            dest_xml in proptest::option::of(any::<String>()),
            persist_xml in proptest::option::of(any::<String>()),
        ) -> MigrateOptions {
            MigrateOptions {
                mode, live, persistent, undefine_source, tls, migrate_uri, timeout_secs,
                dest_xml, persist_xml,
            }
        }
    }

    fn ctxt() -> Context {
        Context::new_dbus(LE, 0)
    }

    proptest! {
        #![proptest_config(proptest_config())]

        #[test]
        fn prop_bus_options_from_arbitrary_dict(d in dict()) {
            let known = matches!(d.mode.as_deref(), None | Some("auto" | "zero-copy" | "traditional"));
            match MigrateOptions::try_from(d.clone()) {
                Ok(o) => {
                    prop_assert!(known);
                    prop_assert_eq!(o.migrate_uri.as_ref(), d.migrate_uri.as_ref());
                    prop_assert_eq!(o.timeout_secs, d.timeout.map(u64::from));
                    // Converting back and forth again is stable.
                    prop_assert_eq!(
                        MigrateOptions::try_from(MigrateOptionsDict::from(&o)).unwrap(),
                        o
                    );
                }
                Err(e) => {
                    prop_assert!(!known);
                    prop_assert!(matches!(e, BeamError::InvalidArgs(_)), "{:?}", e);
                }
            }
        }

        #[test]
        fn prop_bus_options_round_trip(o in options()) {
            let d = MigrateOptionsDict::from(&o);
            prop_assert_eq!(MigrateOptions::try_from(d.clone()).unwrap(), o);
            // And through the D-Bus encoding (a{sv}).
            let data = to_bytes(ctxt(), &d).unwrap();
            let (back, _): (MigrateOptionsDict, _) = data.deserialize().unwrap();
            prop_assert_eq!(back, d);
        }

        #[test]
        fn prop_bus_dict_wire_round_trip(d in dict()) {
            let data = to_bytes(ctxt(), &d).unwrap();
            let (back, _): (MigrateOptionsDict, _) = data.deserialize().unwrap();
            prop_assert_eq!(back, d);
        }

        #[test]
        fn prop_bus_dict_from_arbitrary_bytes_never_panics(
            bytes in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            let data = Data::new(bytes, ctxt());
            if let Ok((d, _)) = data.deserialize::<MigrateOptionsDict>() {
                let _ = MigrateOptions::try_from(d);
            }
        }

        #[test]
        fn prop_bus_mutated_dict_wire_never_panics(
            d in dict(),
            pos in any::<prop::sample::Index>(),
            b in 1u8..,
            cut in any::<bool>(),
        ) {
            let mut bytes = to_bytes(ctxt(), &d).unwrap().to_vec();
            let i = pos.index(bytes.len().max(1));
            if cut {
                bytes.truncate(i);
            } else if let Some(byte) = bytes.get_mut(i) {
                *byte ^= b;
            }
            if let Ok((d, _)) = Data::new(bytes, ctxt()).deserialize::<MigrateOptionsDict>() {
                let _ = MigrateOptions::try_from(d);
            }
        }
    }
}
