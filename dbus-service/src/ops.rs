//! vmbeamd's operations, transport-free: what `Enable`, `Disable`, `ListDomains`,
//! `CoLocation` and `Status` do, with their own typed error ([`OpError`], sources kept).
//! `service.rs` authorizes, translates the wire into [`vmbeam_core::Operation`] and back,
//! and converts [`OpError`] into the wire error exactly once. Migrations and hook events
//! run in `engine` and `hooks`.

use std::collections::HashSet;

use tracing::warn;
use virt::domain::Domain;
use virt::sys;
use vmbeam_bus::{DaemonStatus, DomainRow, JobRow, PoolFileRow};
use vmbeam_core::metadata::MetadataError;
use vmbeam_core::plan::ProofStatus;
use vmbeam_core::pool::{BeamPool, PoolError, RecordStatus};
use vmbeam_core::transform::TransformError;
use vmbeam_core::{BeamMetadata, DomainFacts};

use crate::engine::{self, JobView};
use crate::hooks;
use crate::libvirt_conn::Conn;
use crate::state::SharedCtx;

/// Why an operation failed, with its cause.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// The request itself is wrong (validated against the operation model).
    #[error(transparent)]
    Invalid(#[from] vmbeam_core::job::JobError),
    /// No domain of that name on this host.
    #[error("no domain '{0}' on this host")]
    NoSuchDomain(String),
    /// Only persistent domains can be enabled (the change applies at their next start).
    #[error("{0} is transient: define it first (virsh define)")]
    Transient(String),
    /// The domain's VMBeam metadata does not parse.
    #[error("{domain}'s VMBeam metadata: {source}")]
    Metadata {
        domain: String,
        #[source]
        source: MetadataError,
    },
    /// The domain cannot be (un)enabled as it is.
    #[error(transparent)]
    CannotEnable(#[from] TransformError),
    /// libvirt failed.
    #[error("libvirt ({what}): {source}")]
    Libvirt {
        what: &'static str,
        #[source]
        source: virt::error::Error,
    },
    /// The pool could not be read.
    #[error("beam pool: {0}")]
    Pool(#[from] PoolError),
    /// Probing the destination failed.
    #[error(transparent)]
    Engine(#[from] crate::error::DaemonError),
}

fn libvirt(what: &'static str) -> impl FnOnce(virt::error::Error) -> OpError {
    move |source| OpError::Libvirt { what, source }
}

/// `Enable` (`enable = true`) or `Disable`: rewrites the persistent definition; returns
/// the changes made, one sentence each.
pub fn set_enabled(ctx: &SharedCtx, domain: &str, enable: bool) -> Result<Vec<String>, OpError> {
    let conn = Conn::open(&ctx.cfg.libvirt_uri).map_err(libvirt("connect"))?;
    let dom =
        Domain::lookup_by_name(&conn, domain).map_err(|_| OpError::NoSuchDomain(domain.into()))?;
    if !dom.is_persistent().map_err(libvirt("is-persistent"))? {
        return Err(OpError::Transient(domain.into()));
    }
    let xml = dom
        .get_xml_desc(sys::VIR_DOMAIN_XML_INACTIVE)
        .map_err(libvirt("dumpxml --inactive"))?;
    let id = &ctx.cfg.identity;
    let rewrite = if enable {
        let existing = BeamMetadata::from_domain_xml(&xml).map_err(|source| OpError::Metadata {
            domain: domain.into(),
            source,
        })?;
        let meta = BeamMetadata {
            cloud: id.cloud.clone(),
            pool: id.pool_dir.clone(),
            owner: id.host_id.clone(),
            generation: existing.map(|m| m.generation).unwrap_or(0),
            pool_file: None,
        };
        vmbeam_core::transform::enable(&xml, &meta, &ctx.cfg.qmp_dir)?
    } else {
        vmbeam_core::transform::disable(&xml)?
    };
    if rewrite.changes.is_empty() {
        let state = if enable {
            "beam-enabled"
        } else {
            "not beam-enabled"
        };
        return Ok(vec![format!("{domain} is already {state}")]);
    }
    Domain::define_xml(&conn, &rewrite.xml).map_err(libvirt("define"))?;
    let mut out: Vec<String> = rewrite.changes.iter().map(|c| c.to_string()).collect();
    if dom.is_active().unwrap_or(false) {
        out.push(format!(
            "{domain} is running: the change applies at its next start"
        ));
    }
    Ok(out)
}

/// `ListDomains`: the beam-enabled domains of this host (and a warning in the log for
/// pool files owned here whose domain is gone).
pub fn list_domains(ctx: &SharedCtx) -> Result<Vec<DomainRow>, OpError> {
    let conn = Conn::open(&ctx.cfg.libvirt_uri).map_err(libvirt("connect"))?;
    let pool = BeamPool::new(&ctx.cfg.identity.pool_dir);
    let mut rows = Vec::new();
    let mut live = HashSet::new();
    for d in conn.list_all_domains(0).map_err(libvirt("list"))? {
        let Ok(xml) = d.get_xml_desc(0) else { continue };
        let Ok(Some(meta)) = BeamMetadata::from_domain_xml(&xml) else {
            continue;
        };
        let Ok(facts) = DomainFacts::from_xml(&xml) else {
            continue;
        };
        live.insert(facts.uuid.clone());
        let state = if d.is_active().unwrap_or(false) {
            "running"
        } else {
            "shut off"
        };
        let file = engine::current_pool_file(ctx, &facts).unwrap_or_default();
        let owner = if file.is_empty() {
            meta.owner.to_string()
        } else {
            match pool.read_owner(&file) {
                Ok(Some(r)) => r.owner.to_string(),
                _ => meta.owner.to_string(),
            }
        };
        rows.push((
            facts.name,
            facts.uuid.to_string(),
            state.into(),
            owner,
            file,
            meta.generation,
        ));
    }
    let orphans = hooks::orphan_report(ctx, &live);
    if !orphans.is_empty() {
        warn!(?orphans, "pool files owned here whose domain is gone");
    }
    Ok(rows)
}

/// `CoLocation`'s answer: whether zero-copy to the destination is possible, its host id
/// (empty without an answer) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoLocation {
    pub co_located: bool,
    pub host: String,
    pub reason: String,
}

/// `CoLocation`: asks the destination through the pool (the same probe a migration runs).
pub fn co_location(ctx: &SharedCtx, dest_uri: &str) -> Result<CoLocation, OpError> {
    let c = engine::probe_destination(ctx, dest_uri, None).map_err(OpError::Engine)?;
    let id = &ctx.cfg.identity;
    Ok(match (c.report, c.detail) {
        (Some(r), _) => {
            let same_cloud = r.cloud == id.cloud;
            let co_located = same_cloud && r.proof == ProofStatus::Proven;
            let reason = if !same_cloud {
                format!(
                    "{} is in virtual IaaS cloud '{}', not '{}'",
                    r.host_id, r.cloud, id.cloud
                )
            } else if co_located && ctx.pool.device().is_some() {
                format!(
                    "the primary cloud's host says cloud VM {} is co-located (each migration proves the shared device through its control page)",
                    r.host_id
                )
            } else if co_located {
                format!("{} shares the beam pool (proven)", r.host_id)
            } else {
                format!("{} answered but the proof failed: {:?}", r.host_id, r.proof)
            };
            CoLocation {
                co_located,
                host: r.host_id.to_string(),
                reason,
            }
        }
        (None, d) => CoLocation {
            co_located: false,
            host: String::new(),
            reason: d.unwrap_or_else(|| "no answer".into()),
        },
    })
}

/// `Status`'s rows for the devices this cloud VM holds (host-device pool): BAR 2's file,
/// the BAR's size, and the record in words (guest, role, the hand-over's destination and
/// proof while one is open, what recovery waits for).
fn device_rows(
    device: &crate::devpool::DevicePool,
    in_doubt: &std::collections::HashMap<String, String>,
) -> Result<Vec<PoolFileRow>, OpError> {
    let holdings = device.holdings().map_err(|e| {
        OpError::Engine(crate::error::DaemonError::Failed(format!(
            "host-device pool: {}",
            crate::devpool::error_chain(&e)
        )))
    })?;
    Ok(holdings
        .into_iter()
        .map(|h| {
            let mut rec = format!("host-device guest={} role={}", h.guest, h.role);
            if let Some(to) = &h.shared_with {
                rec.push_str(&format!(" shared-with={to}"));
            }
            if let Some(p) = &h.proof {
                rec.push_str(&format!(" proof={p}"));
            }
            if let Some(advice) = in_doubt.get(h.guest.as_str()) {
                rec = format!("{rec}; {advice}");
            }
            let path = device
                .held_path(&h.guest, h.role)
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| h.addr.clone());
            (path, h.bar_size as i64, rec)
        })
        .collect())
}

/// What `Status` says the pool is: its kind and where it is (`directory (/var/lib/vmbeam/pool)`,
/// `host-device (vmbeam-host channel /dev/virtio-ports/org.vmbeam.host.0)`). The directory
/// alone (the `PoolDir` property) says nothing in a host-device cloud VM.
pub fn pool_description(ctx: &SharedCtx) -> String {
    match ctx.pool.device() {
        Some(device) => format!(
            "host-device (vmbeam-host channel {})",
            device.channel().display()
        ),
        None => format!("directory ({})", ctx.cfg.identity.pool_dir.display()),
    }
}

/// `Status`: identity, the pool (kind and place, [`pool_description`]), its files with
/// their owner records and the devices held from the host, and `jobs` (object path, view)
/// as the face's job table has them.
pub fn status(ctx: &SharedCtx, jobs: Vec<(String, JobView)>) -> Result<DaemonStatus, OpError> {
    let id = &ctx.cfg.identity;
    let pool = BeamPool::new(&id.pool_dir);
    let in_doubt = ctx.tables.lock().expect("lock").in_doubt.clone();
    // In the host-device pool the shared directory may not exist: its files are listed
    // when it does, and the devices this cloud VM holds follow.
    let files = match (pool.list(), ctx.pool.device()) {
        (Ok(files), _) => files,
        (Err(_), Some(_)) => Vec::new(),
        (Err(e), None) => return Err(e.into()),
    };
    let mut pool_files: Vec<PoolFileRow> = files
        .into_iter()
        .map(|e| -> PoolFileRow {
            let mut rec = match &e.record {
                RecordStatus::Valid(r) => format!(
                    "owner={} state={}{}",
                    r.owner,
                    r.state,
                    r.handing_over_to
                        .as_ref()
                        .map(|t| format!(" to={t}"))
                        .unwrap_or_default()
                ),
                RecordStatus::Missing => "no owner record".into(),
                RecordStatus::Corrupt(c) => format!("corrupt record: {c}"),
            };
            if let Some(advice) = in_doubt.get(&e.file_name) {
                rec = format!("{rec}; {advice}");
            }
            let size = e.size.map(|s| s as i64).unwrap_or(-1);
            (e.file_name, size, rec)
        })
        .collect();
    if let Some(device) = ctx.pool.device() {
        pool_files.extend(device_rows(device, &in_doubt)?);
    }
    let jobs = jobs
        .into_iter()
        .map(|(p, v)| -> JobRow {
            (
                p,
                v.domain,
                v.destination,
                v.phase.as_str().to_owned(),
                v.progress,
                v.mode.map(|m| m.to_string()).unwrap_or_default(),
            )
        })
        .collect();
    Ok(DaemonStatus {
        host: id.host_id.to_string(),
        cloud: id.cloud.to_string(),
        pool: pool_description(ctx),
        libvirt_host_uuid: ctx.libvirt_uuid.clone(),
        pool_files,
        jobs,
    })
}
