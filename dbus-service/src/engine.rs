//! The source side of a migration: plan it (zero-copy only with proof), issue the ticket,
//! set `x-ignore-shared` for exactly the migration's duration, run it as libvirt's own job,
//! and settle the pool file's ownership by how libvirt says it ended.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::libvirt_conn::Conn;
use tracing::{error, info, info_span, warn};
use virt::connect::Connect;
use virt::domain::Domain;
use virt::sys;
use vmbeam_bus::BeamError;
use vmbeam_core::backend::BackendError;
use vmbeam_core::carrier;
use vmbeam_core::job::MigrateOptions;
use vmbeam_core::plan::{self, BackendCapabilities, MigrationMode, PlanInput, RequestedMode};
use vmbeam_core::pool::{self, BeamPool, OwnerState, RecordStatus};
use vmbeam_core::ticket::{Ticket, TicketFields};
use vmbeam_core::{BeamMetadata, DomainFacts, Phase, Progress};

use crate::hooks::{now_secs, RAN_SUFFIX};
use crate::libvirt_job::{self, Flags, Request};
use crate::rendezvous;
use crate::state::{Outgoing, SharedCtx};

/// What a job's observers see; updated by the job, read by the D-Bus job object.
#[derive(Debug, Clone)]
pub struct JobView {
    pub domain: String,
    pub destination: String,
    pub phase: Phase,
    pub progress: u32,
    pub bytes_transferred: u64,
    pub downtime_ms: u64,
    pub total_ms: u64,
    pub mode: String,
    pub mode_reason: String,
    pub error: String,
    pub error_name: String,
    pub finished: Option<bool>,
    /// Milliseconds since the job started at which each step began (where the time goes).
    pub timeline: Vec<(String, u64)>,
}

impl Default for JobView {
    fn default() -> Self {
        JobView {
            domain: String::new(),
            destination: String::new(),
            phase: Phase::Queued,
            progress: 0,
            bytes_transferred: 0,
            downtime_ms: 0,
            total_ms: 0,
            mode: String::new(),
            mode_reason: String::new(),
            error: String::new(),
            error_name: String::new(),
            finished: None,
            timeline: Vec::new(),
        }
    }
}

/// A running job's shared handle.
pub struct JobHandle {
    pub id: u64,
    pub view: Mutex<JobView>,
    tracker: Mutex<Progress>,
    started: Instant,
    pub cancelled: AtomicBool,
    /// Called after every change (the D-Bus side emits PropertiesChanged).
    pub notify: Box<dyn Fn() + Send + Sync>,
}

impl JobHandle {
    /// A new job.
    pub fn new(
        id: u64,
        domain: &str,
        destination: &str,
        notify: Box<dyn Fn() + Send + Sync>,
    ) -> Self {
        JobHandle {
            id,
            view: Mutex::new(JobView {
                domain: domain.into(),
                destination: destination.into(),
                ..Default::default()
            }),
            tracker: Mutex::new(Progress::new()),
            started: Instant::now(),
            cancelled: AtomicBool::new(false),
            notify,
        }
    }

    fn update(&self, f: impl FnOnce(&mut JobView)) {
        f(&mut self.view.lock().expect("lock"));
        (self.notify)();
    }

    /// Marks a step of the timeline.
    pub fn mark(&self, what: &str) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.update(|v| v.timeline.push((what.to_string(), ms)));
    }

    fn phase(&self, p: Phase) {
        self.mark(p.as_str());
        let pct = {
            let mut t = self.tracker.lock().expect("lock");
            let _ = t.enter(p);
            t.percent()
        };
        info!(phase = p.as_str(), "phase");
        self.update(|v| {
            v.phase = p;
            v.progress = v.progress.max(pct.round() as u32);
        });
    }

    fn ratio(&self, done: u64, total: u64) {
        let pct = self.tracker.lock().expect("lock").update_ratio(done, total);
        self.update(|v| {
            v.progress = v.progress.max(pct.floor() as u32);
            v.bytes_transferred = done;
        });
    }
}

fn lv(e: virt::error::Error) -> BeamError {
    BeamError::Libvirt(e.message().to_string())
}

/// The libvirt host UUID a connection reports (`<host><uuid>` of the capabilities).
pub fn host_uuid(conn: &Connect) -> Result<String, BeamError> {
    let caps = conn.get_capabilities().map_err(lv)?;
    let start = caps
        .find("<uuid>")
        .ok_or_else(|| BeamError::Libvirt("capabilities without a host UUID".into()))?;
    let rest = &caps[start + 6..];
    let end = rest
        .find("</uuid>")
        .ok_or_else(|| BeamError::Libvirt("malformed capabilities".into()))?;
    Ok(rest[..end].trim().to_ascii_lowercase())
}

/// The pool file this host's domain runs on: the running table, else the pool's records.
pub fn current_pool_file(ctx: &SharedCtx, facts: &DomainFacts) -> Option<String> {
    if let Some(r) = ctx.tables.lock().expect("lock").running.get(&facts.uuid) {
        return Some(r.pool_file.clone());
    }
    let pool = BeamPool::new(&ctx.cfg.identity.pool_dir);
    pool.list()
        .ok()?
        .into_iter()
        .filter(|e| e.domain_uuid == facts.uuid)
        .filter(|e| matches!(&e.record, RecordStatus::Valid(r) if r.owner == ctx.cfg.identity.host_id && r.state == OwnerState::Active))
        .max_by_key(|e| e.generation)
        .map(|e| e.file_name)
}

/// The co-location verdict for `dest_uri` (used by `CoLocation` and the planner).
pub struct Colocation {
    pub report: Option<plan::DestinationReport>,
    pub detail: Option<String>,
}

/// Proves co-location with the destination through the pool.
pub fn probe_destination(
    ctx: &SharedCtx,
    dest_uri: &str,
    pool_file: Option<&str>,
) -> Result<Colocation, BeamError> {
    let dest_uuid = {
        let dconn = Conn::open(dest_uri)
            .map_err(|e| BeamError::Libvirt(format!("connect to {dest_uri}: {}", e.message())))?;
        host_uuid(&dconn)?
    };
    if dest_uuid == ctx.libvirt_uuid {
        return Err(BeamError::InvalidArgs(format!("{dest_uri} is this host")));
    }
    match rendezvous::probe(
        &ctx.cfg.identity,
        &ctx.key,
        &dest_uuid,
        pool_file,
        ctx.cfg.rendezvous_timeout,
    ) {
        Ok(r) => Ok(Colocation {
            report: Some(r),
            detail: None,
        }),
        Err(e) => Ok(Colocation {
            report: None,
            detail: Some(e.to_string()),
        }),
    }
}

/// Runs one migration to its end. `Ok` carries the one-line outcome.
pub fn run(
    ctx: &SharedCtx,
    job: &Arc<JobHandle>,
    domain: &str,
    dest_uri: &str,
    opts: &MigrateOptions,
) -> Result<String, BeamError> {
    let span = info_span!("migration", job = job.id, domain = %domain, dest = %dest_uri);
    let _g = span.enter();
    let started = Instant::now();
    job.phase(Phase::Planning);
    let id = &ctx.cfg.identity;
    let conn = Conn::open(&ctx.cfg.libvirt_uri).map_err(lv)?;
    let dom = Domain::lookup_by_name(&conn, domain)
        .map_err(|_| BeamError::NoSuchDomain(domain.into()))?;
    if !dom.is_active().map_err(lv)? {
        return Err(BeamError::InvalidArgs(format!(
            "domain {domain} is not running"
        )));
    }
    let xml = dom.get_xml_desc(0).map_err(lv)?;
    let facts = DomainFacts::from_xml(&xml).map_err(|e| BeamError::Failed(e.to_string()))?;
    let mut meta =
        BeamMetadata::from_domain_xml(&xml).map_err(|e| BeamError::InvalidArgs(e.to_string()))?;
    let pool_file = meta.as_ref().and_then(|_| current_pool_file(ctx, &facts));
    // The metadata's owner is a claim; the pool's owner record is the truth. A domain whose
    // pool file this host owns is this host's, whatever a stale definition says.
    if let (Some(m), Some(_)) = (meta.as_mut(), &pool_file) {
        m.owner = id.host_id.clone();
    }

    // Co-location, proven through the pool (skipped when forced traditional).
    let mut colo = Colocation {
        report: None,
        detail: None,
    };
    if opts.mode != RequestedMode::ForceTraditional && meta.is_some() {
        job.phase(Phase::ProvingColocation);
        colo = probe_destination(ctx, dest_uri, pool_file.as_deref())?;
    }
    // The backend's part (QEMU: the private monitor and x-ignore-shared).
    let caps = if colo.report.is_some() {
        ctx.backend.capabilities(&facts)
    } else {
        BackendCapabilities::default()
    };
    let local_identity = pool_file
        .as_deref()
        .and_then(|f| pool::file_identity(&id.pool_dir.join(f)).ok());
    let planned = plan::plan(&PlanInput {
        requested: opts.mode,
        domain: &facts,
        metadata: meta.as_ref(),
        local: id,
        local_pool_identity: local_identity,
        destination: colo.report.as_ref(),
        backend: caps,
    });
    let with_detail = |r: String| match &colo.detail {
        Some(d) => format!("{r}: {d}"),
        None => r,
    };
    let planned = match planned {
        Ok(p) => p,
        Err(plan::PlanError::ZeroCopyRefused(r)) => {
            return Err(BeamError::ZeroCopyRefused(with_detail(r.to_string())));
        }
    };
    let reason = with_detail(planned.reason.to_string());
    let zero_copy = planned.mode == MigrationMode::ZeroCopy;
    info!(mode = if zero_copy { "zero-copy" } else { "traditional" }, %reason, "planned");
    job.update(|v| {
        v.mode = if zero_copy {
            "zero-copy"
        } else {
            "traditional"
        }
        .into();
        v.mode_reason = reason.clone();
    });
    let flags = Flags {
        live: opts.live,
        p2p: true,
        persistent: opts.persistent,
        undefine_source: opts.undefine_source,
        tls: opts.tls,
    };
    let mut req = Request {
        src_uri: ctx.cfg.libvirt_uri.clone(),
        domain: domain.into(),
        dest_uri: dest_uri.into(),
        migrate_uri: opts.migrate_uri.clone(),
        flags,
        dest_xml: None,
        persist_xml: None,
        suspend_after: opts.timeout_secs.map(Duration::from_secs),
    };
    let progress = |p: libvirt_job::Progress| job.ratio(p.processed, p.total);
    if !zero_copy {
        job.phase(Phase::Migrating);
        let done = libvirt_job::migrate(&req, Duration::from_millis(200), progress)
            .map_err(|e| BeamError::MigrationFailed(e.to_string()))?;
        job.mark("libvirt-returned");
        return Ok(finish(job, &done, started, "traditional"));
    }

    // Zero-copy.
    let (report, pool_file) = match (colo.report, pool_file) {
        (Some(r), Some(f)) => (r, f),
        _ => {
            return Err(BeamError::Failed(
                "zero-copy planned without a destination report or pool file".into(),
            ))
        }
    };
    let pool_path = id.pool_dir.join(&pool_file);
    job.phase(Phase::IssuingTicket);
    let dest = report.host_id.clone();
    let bpool = BeamPool::new(&id.pool_dir);
    let identity = pool::file_identity(&pool_path).map_err(|e| BeamError::Failed(e.to_string()))?;
    let ticket = Ticket::issue(
        &ctx.key,
        TicketFields {
            cloud: id.cloud.clone(),
            domain_uuid: facts.uuid.clone(),
            domain_name: facts.name.clone(),
            pool_file: pool_file.clone(),
            pool_identity: identity,
            source_host: id.host_id.clone(),
            dest_host: dest.clone(),
            ttl_secs: id.ticket_ttl_secs,
        },
        now_secs(),
    )
    .and_then(|t| t.encode())
    .map_err(|e| BeamError::Failed(e.to_string()))?;
    let migratable = dom
        .get_xml_desc(sys::VIR_DOMAIN_XML_MIGRATABLE)
        .map_err(lv)?;
    req.dest_xml = Some(
        carrier::insert_ticket(&migratable, &ticket)
            .map_err(|e| BeamError::Failed(e.to_string()))?,
    );
    if opts.persistent {
        let meta = meta.expect("zero-copy implies metadata");
        let moved = BeamMetadata {
            owner: dest.clone(),
            generation: meta.generation + 1,
            pool_file: Some(pool_file.clone()),
            ..meta
        };
        let inactive = if dom.is_persistent().unwrap_or(false) {
            dom.get_xml_desc(sys::VIR_DOMAIN_XML_INACTIVE | sys::VIR_DOMAIN_XML_MIGRATABLE)
                .map_err(lv)?
        } else {
            migratable.clone()
        };
        let rewritten = vmbeam_core::transform::enable(&inactive, &moved, &ctx.cfg.qmp_dir)
            .map_err(|e| BeamError::Failed(e.to_string()))?;
        req.persist_xml = Some(rewritten.xml);
    }
    ctx.tables.lock().expect("lock").outgoing.insert(
        facts.uuid.clone(),
        Outgoing {
            job: job.id,
            pool_file: pool_file.clone(),
            dest: dest.clone(),
        },
    );
    // The job no longer holds the pool file; the destination's "ran" marker has served.
    let settle = || {
        ctx.tables
            .lock()
            .expect("lock")
            .outgoing
            .remove(&facts.uuid);
        let _ = std::fs::remove_file(id.pool_dir.join(format!("{pool_file}{RAN_SUFFIX}")));
    };
    if let Err(e) = bpool.begin_hand_over(&pool_file, &id.host_id, &dest) {
        settle();
        return Err(BeamError::Failed(format!("hand-over of {pool_file}: {e}")));
    }
    let mut armed = match ctx.backend.arm_source(&facts, &pool_path) {
        Ok(a) => a,
        Err(e) => {
            let _ = bpool.abort_hand_over(&pool_file, &id.host_id);
            settle();
            return Err(match e {
                BackendError::Refused(m) => BeamError::ZeroCopyRefused(m),
                BackendError::Failed(m) => BeamError::Failed(m),
            });
        }
    };
    info!(
        backend = ctx.backend.name(),
        "source armed; ticket issued; migrating"
    );
    job.phase(Phase::Migrating);
    let result = libvirt_job::migrate(&req, Duration::from_millis(100), progress);
    match result {
        Ok(done) => {
            job.phase(Phase::Confirming);
            // libvirt reported success: the destination runs the guest on this file.
            if let Err(e) =
                bpool.complete_hand_over(&pool_file, &id.host_id, &dest, meta_generation(&xml) + 1)
            {
                error!(error = %e, "could not record the hand-over of the pool file");
            }
            match armed.disarm(Duration::from_secs(2)) {
                Ok(o) => info!(outcome = %o, "source disarmed after success"),
                Err(e) => warn!(error = %e, "source disarm"),
            }
            settle();
            Ok(finish(job, &done, started, "zero-copy"))
        }
        Err(e) => {
            job.phase(Phase::CleaningUp);
            let ran = id
                .pool_dir
                .join(format!("{pool_file}{RAN_SUFFIX}"))
                .exists();
            if ran {
                // The destination already ran guest code on this memory: resuming the source
                // would have two CPUs write one memory. Fence the source.
                error!("migration failed after the guest ran on the destination: destroying the source");
                let _ = armed.disarm(Duration::from_secs(1));
                let _ = dom.destroy();
            } else {
                match armed.disarm(Duration::from_secs(10)) {
                    Ok(o) => info!(outcome = %o, "source disarmed"),
                    Err(e) => error!(error = %e, "source disarm failed"),
                }
                if let Err(e) = bpool.abort_hand_over(&pool_file, &id.host_id) {
                    warn!(error = %e, "could not take the pool file back");
                }
            }
            settle();
            let cancelled = job.cancelled.load(Ordering::SeqCst);
            Err(if cancelled {
                BeamError::MigrationFailed(format!(
                    "cancelled: {e}; the guest keeps running on the source"
                ))
            } else {
                BeamError::MigrationFailed(format!("{e}; the guest keeps running on the source"))
            })
        }
    }
}

fn meta_generation(xml: &str) -> u64 {
    BeamMetadata::from_domain_xml(xml)
        .ok()
        .flatten()
        .map(|m| m.generation)
        .unwrap_or(0)
}

fn finish(job: &JobHandle, done: &libvirt_job::Completed, started: Instant, mode: &str) -> String {
    let total = started.elapsed().as_millis() as u64;
    job.mark("done");
    job.update(|v| {
        v.bytes_transferred = done.bytes_transferred;
        v.downtime_ms = done.downtime_ms.unwrap_or(0);
        v.total_ms = total;
    });
    format!(
        "{mode} migration completed in {total} ms, downtime {} ms, {} bytes over the network",
        done.downtime_ms
            .map(|d| d.to_string())
            .unwrap_or_else(|| "?".into()),
        done.bytes_transferred
    )
}
