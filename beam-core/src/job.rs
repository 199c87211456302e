//! Jobs and operations: the one model the D-Bus daemon, the CLI and the hook share.
//!
//! Every request, whatever its transport, becomes an [`Operation`]. A migration runs as a
//! job moving through [`Phase`]s in order; its [`Progress`] never goes backwards, whatever
//! libvirt's own counters do.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::hook::HookEvent;
use crate::plan::RequestedMode;

/// Why a job transition or an operation is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    /// Phases only move forward, and nothing follows a terminal phase.
    #[error("a job cannot go from {from} to {to}")]
    IllegalTransition {
        /// The current phase.
        from: Phase,
        /// The requested phase.
        to: Phase,
    },
    /// A required field is empty.
    #[error("{0} must not be empty")]
    Empty(&'static str),
    /// A field contains control characters.
    #[error("{0} contains control characters")]
    ControlCharacters(&'static str),
    /// A URI without a scheme.
    #[error("{field} '{value}' is not a URI (scheme://...)")]
    BadUri {
        /// Which URI.
        field: &'static str,
        /// The value.
        value: String,
    },
    /// `timeout_secs` of zero.
    #[error("timeout must be at least one second")]
    ZeroTimeout,
    /// `timeout_secs` without `live`, which virsh refuses too.
    #[error("a timeout requires a live migration")]
    TimeoutWithoutLive,
    /// A persistent XML without `persistent`, which virsh refuses too.
    #[error("a persistent XML requires a persistent migration (--persistent)")]
    PersistXmlWithoutPersistent,
}

/// A job's phase, in the order a migration goes through them. `Completed`, `Failed` and
/// `Cancelled` are terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Accepted, not started.
    Queued,
    /// Deciding zero-copy or traditional.
    Planning,
    /// The destination reads the source's proof from the pool.
    ProvingColocation,
    /// Signing the agreement for the destination.
    IssuingTicket,
    /// Preparing both ends (capabilities, ownership record).
    Preparing,
    /// libvirt's migration is running.
    Migrating,
    /// The guest stops on the source and resumes on the destination.
    Switching,
    /// Confirming the destination runs and the source is gone.
    Confirming,
    /// Resetting capabilities, moving ownership, removing leftovers.
    CleaningUp,
    /// Done.
    Completed,
    /// Ended with an error.
    Failed,
    /// Ended at the user's request.
    Cancelled,
}

impl Phase {
    /// Every phase, in order.
    pub const ALL: [Phase; 12] = [
        Self::Queued,
        Self::Planning,
        Self::ProvingColocation,
        Self::IssuingTicket,
        Self::Preparing,
        Self::Migrating,
        Self::Switching,
        Self::Confirming,
        Self::CleaningUp,
        Self::Completed,
        Self::Failed,
        Self::Cancelled,
    ];

    /// The machine name (kebab-case), e.g. for D-Bus properties.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Planning => "planning",
            Self::ProvingColocation => "proving-colocation",
            Self::IssuingTicket => "issuing-ticket",
            Self::Preparing => "preparing",
            Self::Migrating => "migrating",
            Self::Switching => "switching",
            Self::Confirming => "confirming",
            Self::CleaningUp => "cleaning-up",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    /// Whether the job is over.
    pub fn is_terminal(&self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }

    /// The span of overall progress (percent) this phase covers; `None` for `Failed` and
    /// `Cancelled`, which keep whatever was reached.
    pub fn progress_range(&self) -> Option<(f64, f64)> {
        Some(match self {
            Self::Queued => (0.0, 0.0),
            Self::Planning => (0.0, 2.0),
            Self::ProvingColocation => (2.0, 5.0),
            Self::IssuingTicket => (5.0, 7.0),
            Self::Preparing => (7.0, 15.0),
            Self::Migrating => (15.0, 90.0),
            Self::Switching => (90.0, 95.0),
            Self::Confirming => (95.0, 98.0),
            Self::CleaningUp => (98.0, 100.0),
            Self::Completed => (100.0, 100.0),
            Self::Failed | Self::Cancelled => return None,
        })
    }

    /// Whether a job in this phase may move to `next`: forward only, never out of a
    /// terminal phase. Phases may be skipped (a traditional migration skips the proof).
    pub fn can_advance_to(&self, next: Phase) -> bool {
        !self.is_terminal() && next > *self
    }
}

impl std::str::FromStr for Phase {
    type Err = crate::plan::UnknownName;

    /// The inverse of [`Phase::as_str`] (what the Job's `Phase` property carries).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| {
                crate::plan::UnknownName::new("phase", s, "a job phase (queued ... cancelled)")
            })
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Queued => "queued",
            Self::Planning => "planning",
            Self::ProvingColocation => "proving co-location",
            Self::IssuingTicket => "issuing ticket",
            Self::Preparing => "preparing",
            Self::Migrating => "migrating",
            Self::Switching => "switching over",
            Self::Confirming => "confirming",
            Self::CleaningUp => "cleaning up",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        })
    }
}

/// A job's phase and overall progress (0–100 %), which never decreases.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    phase: Phase,
    percent: f64,
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

impl Progress {
    /// A queued job at 0 %.
    pub fn new() -> Self {
        Self {
            phase: Phase::Queued,
            percent: 0.0,
        }
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Overall progress in percent.
    pub fn percent(&self) -> f64 {
        self.percent
    }

    /// Overall progress as a fraction in `0.0..=1.0` (UDisks2.Job style).
    pub fn fraction(&self) -> f64 {
        self.percent / 100.0
    }

    /// Moves to `phase`; progress jumps to the start of its range (or to 100 % on
    /// completion) if that is ahead. Re-entering the current phase is a no-op.
    pub fn enter(&mut self, phase: Phase) -> Result<f64, JobError> {
        if phase == self.phase {
            return Ok(self.percent);
        }
        if !self.phase.can_advance_to(phase) {
            return Err(JobError::IllegalTransition {
                from: self.phase,
                to: phase,
            });
        }
        self.phase = phase;
        if let Some((start, _)) = phase.progress_range() {
            self.percent = self.percent.max(start);
        }
        Ok(self.percent)
    }

    /// Reports progress within the current phase (`phase_percent` in 0–100, clamped; NaN
    /// ignored) and returns the effective overall percentage, which never goes down.
    pub fn update(&mut self, phase_percent: f64) -> f64 {
        if phase_percent.is_nan() {
            return self.percent;
        }
        if let Some((start, end)) = self.phase.progress_range() {
            let p = phase_percent.clamp(0.0, 100.0);
            let overall = start + (end - start) * p / 100.0;
            self.percent = self.percent.max(overall);
        }
        self.percent
    }

    /// Reports progress within the current phase as `done` of `total` units (e.g. bytes);
    /// a zero `total` counts as no progress.
    pub fn update_ratio(&mut self, done: u64, total: u64) -> f64 {
        if total == 0 {
            return self.percent;
        }
        // Precision loss is irrelevant for a percentage.
        self.update(done.min(total) as f64 * 100.0 / total as f64)
    }
}

/// Options of a migration, named after `virsh migrate`'s. VMBeam always migrates
/// peer-to-peer (libvirt's own job), so there is no `p2p`; `--verbose` is the client's.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrateOptions {
    /// `--zero-copy` / `--no-zero-copy` / automatic.
    pub mode: RequestedMode,
    /// `--live`.
    pub live: bool,
    /// `--persistent`.
    pub persistent: bool,
    /// `--undefinesource`.
    pub undefine_source: bool,
    /// `--timeout`: seconds before the guest is suspended to let a live migration converge.
    pub timeout_secs: Option<u64>,
    /// `--tls`: the migration stream goes through QEMU's native TLS (libvirt's
    /// `migrate_tls_x509_cert_dir` certificates on both hosts).
    pub tls: bool,
    /// virsh's `migrateuri`: where QEMU's stream goes, e.g. `tcp://198.18.0.2`; default:
    /// libvirt's choice.
    pub migrate_uri: Option<String>,
    /// `--xml`: the domain XML for the destination (Nova rewrites interfaces and listen
    /// addresses there); default: the source's migratable XML. Zero-copy carries its ticket
    /// in it, and needs it to keep the memory and VMBeam's metadata as they are
    /// (`destination::zero_copy_differences`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dest_xml: Option<String>,
    /// `--persistent-xml`: the persistent definition for the destination (with
    /// `--persistent`); default: the source's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persist_xml: Option<String>,
}

/// A request, whatever front end it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "operation")]
pub enum Operation {
    /// Migrate `domain` to the libvirt at `dest_uri`.
    Migrate {
        /// Domain name, id or UUID (as virsh accepts).
        domain: String,
        /// The destination libvirt URI, e.g. `qemu+tcp://cvm2/system`.
        dest_uri: String,
        /// Options (the stream's URI among them).
        options: MigrateOptions,
    },
    /// Prepare a domain for zero-copy migration.
    Enable {
        /// Domain name, id or UUID.
        domain: String,
    },
    /// Undo [`Operation::Enable`].
    Disable {
        /// Domain name, id or UUID.
        domain: String,
    },
    /// List domains with their VMBeam state.
    ListDomains,
    /// Check whether the libvirt at `dest_uri` is co-located with this host.
    CoLocation {
        /// The destination libvirt URI.
        dest_uri: String,
    },
    /// Report the daemon's state and jobs.
    Status,
    /// A libvirt hook invocation.
    HookEvent {
        /// The hook arguments.
        event: HookEvent,
        /// The domain XML libvirt passed on stdin.
        domain_xml: String,
    },
}

impl Operation {
    /// A short name for logs and authorization (`migrate`, `enable`…).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Migrate { .. } => "migrate",
            Self::Enable { .. } => "enable",
            Self::Disable { .. } => "disable",
            Self::ListDomains => "list-domains",
            Self::CoLocation { .. } => "co-location",
            Self::Status => "status",
            Self::HookEvent { .. } => "hook-event",
        }
    }

    /// Whether the operation may change domains or the pool (what authorization guards);
    /// the others only read.
    pub fn is_mutating(&self) -> bool {
        matches!(
            self,
            Self::Migrate { .. }
                | Self::Enable { .. }
                | Self::Disable { .. }
                | Self::HookEvent { .. }
        )
    }

    /// Checks the fields every front end must fill in correctly.
    pub fn validate(&self) -> Result<(), JobError> {
        match self {
            Self::Migrate {
                domain,
                dest_uri,
                options,
            } => {
                check_text("domain", domain)?;
                check_uri("destination URI", dest_uri)?;
                if let Some(uri) = &options.migrate_uri {
                    check_uri("migration URI", uri)?;
                }
                for (field, xml) in [
                    ("destination XML", &options.dest_xml),
                    ("persistent XML", &options.persist_xml),
                ] {
                    if xml.as_deref().is_some_and(|x| x.trim().is_empty()) {
                        return Err(JobError::Empty(field));
                    }
                }
                if options.persist_xml.is_some() && !options.persistent {
                    return Err(JobError::PersistXmlWithoutPersistent);
                }
                match options.timeout_secs {
                    Some(0) => return Err(JobError::ZeroTimeout),
                    Some(_) if !options.live => return Err(JobError::TimeoutWithoutLive),
                    _ => {}
                }
                Ok(())
            }
            Self::Enable { domain } | Self::Disable { domain } => check_text("domain", domain),
            Self::CoLocation { dest_uri } => check_uri("destination URI", dest_uri),
            Self::ListDomains | Self::Status => Ok(()),
            Self::HookEvent { event, .. } => check_text("hook object", &event.object),
        }
    }
}

fn check_text(field: &'static str, value: &str) -> Result<(), JobError> {
    if value.trim().is_empty() {
        return Err(JobError::Empty(field));
    }
    if value.chars().any(char::is_control) {
        return Err(JobError::ControlCharacters(field));
    }
    Ok(())
}

fn check_uri(field: &'static str, value: &str) -> Result<(), JobError> {
    check_text(field, value)?;
    let scheme_ok = value.split_once("://").is_some_and(|(scheme, _)| {
        !scheme.is_empty()
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    });
    if !scheme_ok || value.chars().any(char::is_whitespace) {
        return Err(JobError::BadUri {
            field,
            value: value.to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::MigrationMode;

    #[test]
    fn phases_are_ordered() {
        for pair in Phase::ALL.windows(2) {
            assert!(pair[0] < pair[1]);
        }
        assert!(Phase::Queued.can_advance_to(Phase::Planning));
        assert!(Phase::Planning.can_advance_to(Phase::Migrating)); // skipping is fine
        assert!(Phase::Migrating.can_advance_to(Phase::Failed));
        assert!(Phase::Queued.can_advance_to(Phase::Cancelled));
        assert!(!Phase::Migrating.can_advance_to(Phase::Planning));
        assert!(!Phase::Migrating.can_advance_to(Phase::Migrating));
        for terminal in [Phase::Completed, Phase::Failed, Phase::Cancelled] {
            assert!(terminal.is_terminal());
            for next in Phase::ALL {
                assert!(!terminal.can_advance_to(next));
            }
        }
        assert_eq!(Phase::ProvingColocation.to_string(), "proving co-location");
        assert_eq!(
            serde_json::to_string(&Phase::ProvingColocation).unwrap(),
            format!("\"{}\"", Phase::ProvingColocation.as_str())
        );
    }

    #[test]
    fn ranges_are_contiguous() {
        let mut last_end = 0.0;
        for p in Phase::ALL {
            if let Some((start, end)) = p.progress_range() {
                assert!(start <= end);
                assert_eq!(start, last_end, "{p}");
                last_end = end;
            }
        }
        assert_eq!(last_end, 100.0);
    }

    #[test]
    fn progress_never_goes_backwards() {
        let mut p = Progress::new();
        assert_eq!(p.percent(), 0.0);
        assert_eq!(p.enter(Phase::Planning).unwrap(), 0.0);
        assert_eq!(p.update(50.0), 1.0);
        p.enter(Phase::Migrating).unwrap();
        assert_eq!(p.percent(), 15.0);
        assert_eq!(p.update(40.0), 45.0);
        // libvirt's remaining/total jumps back when the guest dirties memory.
        assert_eq!(p.update(20.0), 45.0);
        assert_eq!(p.update(f64::NAN), 45.0);
        assert_eq!(p.update(-5.0), 45.0);
        assert_eq!(p.update(1000.0), 90.0);
        assert_eq!(p.update_ratio(1, 2), 90.0);
        p.enter(Phase::Switching).unwrap();
        assert_eq!(p.percent(), 90.0);
        assert_eq!(p.update_ratio(1, 2), 92.5);
        assert_eq!(p.update_ratio(5, 0), 92.5);
        assert!(matches!(
            p.enter(Phase::Planning),
            Err(JobError::IllegalTransition { .. })
        ));
        p.enter(Phase::Completed).unwrap();
        assert_eq!(p.percent(), 100.0);
        assert_eq!(p.fraction(), 1.0);
        assert!(p.enter(Phase::Failed).is_err());
    }

    #[test]
    fn failure_keeps_progress() {
        let mut p = Progress::default();
        p.enter(Phase::Migrating).unwrap();
        p.update(50.0);
        let before = p.percent();
        p.enter(Phase::Failed).unwrap();
        assert_eq!(p.percent(), before);
        assert_eq!(p.update(100.0), before);
        assert_eq!(p.enter(Phase::Failed).unwrap(), before);
    }

    fn migrate(options: MigrateOptions) -> Operation {
        Operation::Migrate {
            domain: "web1".into(),
            dest_uri: "qemu+tcp://198.18.0.2/system".into(),
            options: MigrateOptions {
                migrate_uri: Some("tcp://198.18.0.2".into()),
                ..options
            },
        }
    }

    #[test]
    fn operations_validate() {
        let live = MigrateOptions {
            live: true,
            timeout_secs: Some(30),
            ..MigrateOptions::default()
        };
        migrate(live.clone()).validate().unwrap();
        assert_eq!(
            migrate(MigrateOptions {
                timeout_secs: Some(30),
                ..MigrateOptions::default()
            })
            .validate(),
            Err(JobError::TimeoutWithoutLive)
        );
        assert_eq!(
            migrate(MigrateOptions {
                timeout_secs: Some(0),
                ..live.clone()
            })
            .validate(),
            Err(JobError::ZeroTimeout)
        );
        let bad = [
            Operation::Migrate {
                domain: " ".into(),
                dest_uri: "qemu:///system".into(),
                options: MigrateOptions::default(),
            },
            Operation::Migrate {
                domain: "web1".into(),
                dest_uri: "cvm2".into(),
                options: MigrateOptions::default(),
            },
            Operation::Migrate {
                domain: "web1".into(),
                dest_uri: "qemu+tcp://cvm2/system".into(),
                options: MigrateOptions {
                    migrate_uri: Some("tcp:// x".into()),
                    ..MigrateOptions::default()
                },
            },
            Operation::Enable {
                domain: "we\nb1".into(),
            },
            Operation::Disable { domain: "".into() },
            Operation::CoLocation {
                dest_uri: "://x".into(),
            },
        ];
        for op in bad {
            assert!(op.validate().is_err(), "{op:?}");
        }
        Operation::ListDomains.validate().unwrap();
        Operation::Status.validate().unwrap();
        Operation::CoLocation {
            dest_uri: "qemu+ssh://root@cvm2/system".into(),
        }
        .validate()
        .unwrap();
    }

    #[test]
    fn operation_names_and_serde() {
        let hook = Operation::HookEvent {
            event: HookEvent::from_args(&["web1", "migrate", "begin", "-"]).unwrap(),
            domain_xml: "<domain/>".into(),
        };
        hook.validate().unwrap();
        assert!(hook.is_mutating());
        assert_eq!(hook.name(), "hook-event");
        assert!(!Operation::ListDomains.is_mutating());
        let op = migrate(MigrateOptions {
            mode: RequestedMode::RequireZeroCopy,
            live: true,
            ..MigrateOptions::default()
        });
        assert_eq!(op.name(), "migrate");
        for op in [op, hook, Operation::Status] {
            let json = serde_json::to_string(&op).unwrap();
            assert_eq!(serde_json::from_str::<Operation>(&json).unwrap(), op);
        }
    }

    #[test]
    fn wire_names_parse_back() {
        for p in Phase::ALL {
            assert_eq!(p.as_str().parse::<Phase>().unwrap(), p);
        }
        assert!("done".parse::<Phase>().is_err());
        for m in [
            RequestedMode::Auto,
            RequestedMode::RequireZeroCopy,
            RequestedMode::ForceTraditional,
        ] {
            assert_eq!(m.as_str().parse::<RequestedMode>().unwrap(), m);
        }
        let e = "fast".parse::<RequestedMode>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "mode 'fast' is not one of: auto, zero-copy, traditional"
        );
        for m in [MigrationMode::ZeroCopy, MigrationMode::Traditional] {
            assert_eq!(m.to_string().parse::<MigrationMode>().unwrap(), m);
        }
    }
}
