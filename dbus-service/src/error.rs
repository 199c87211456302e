//! vmbeamd's own error for migration jobs and hook events: the kind the wire will carry,
//! and the cause where there is one (libvirt's error, the pool's, the ticket's, the
//! backend's, libvirt's job), so that logs keep the chain. `service.rs` converts it into
//! the wire's `BeamError` exactly once; the text the user reads is this error's `Display`.

use vmbeam_core::backend::BackendError;
use vmbeam_core::pool::PoolError;
use vmbeam_core::ticket::TicketError;

use crate::libvirt_job::JobError;

/// Why a migration job or a hook event failed.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// No domain of that name on this host.
    #[error("{0}")]
    NoSuchDomain(String),
    /// The request cannot be carried out as asked.
    #[error("{0}")]
    InvalidArgs(String),
    /// ... because an input does not parse (domain XML, VMBeam metadata, hook arguments).
    #[error("{context}{source}")]
    BadInput {
        context: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The domain cannot be beam-enabled as it is.
    #[error("{0}")]
    CannotEnable(String),
    /// Zero-copy was required and is not possible.
    #[error("{0}")]
    ZeroCopyRefused(String),
    /// The destination refused the migration ticket.
    #[error("{0}")]
    TicketRefused(String),
    /// ... because the ticket itself failed a check.
    #[error(transparent)]
    Ticket(#[from] TicketError),
    /// Another migration of the domain is in flight.
    #[error("{0}")]
    Busy(String),
    /// libvirt failed (`context` says at what, ending in ": " when not empty).
    #[error("{context}{}", .source.message())]
    Libvirt {
        context: String,
        #[source]
        source: virt::error::Error,
    },
    /// libvirt's migration job failed.
    #[error(transparent)]
    Job(#[from] JobError),
    /// The migration failed (the text says where the guest is).
    #[error("{0}")]
    MigrationFailed(String),
    /// The pool could not do what was asked.
    #[error("{context}{source}")]
    Pool {
        context: String,
        #[source]
        source: PoolError,
    },
    /// The hypervisor backend refused or failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// Anything else (the host's state, or a bug).
    #[error("{0}")]
    Failed(String),
}

impl DaemonError {
    /// libvirt's error, without context.
    pub fn libvirt(source: virt::error::Error) -> Self {
        Self::Libvirt {
            context: String::new(),
            source,
        }
    }

    /// An input that does not parse, `context` (e.g. "VMBeam metadata: ") before its error.
    pub fn bad_input(
        context: &'static str,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self::BadInput {
            context,
            source: Box::new(source),
        }
    }

    /// A pool error, `context` (e.g. "hand-over of X: ") before it.
    pub fn pool(context: impl Into<String>, source: PoolError) -> Self {
        Self::Pool {
            context: context.into(),
            source,
        }
    }
}
