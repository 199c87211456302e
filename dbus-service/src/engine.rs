//! The source side of a migration: plan it (zero-copy only with proof), issue the ticket,
//! set `x-ignore-shared` for exactly the migration's duration, run it as libvirt's own job,
//! and settle the pool file's ownership by how libvirt says it ended.
//!
//! [`run`] is the only step that talks to libvirt; the zero-copy steps it calls
//! (`zero_copy_xml`, `arm_zero_copy`, `settle_outcome`) work on the pool, the daemon's
//! tables and the backend only, so the split-brain fence is unit-tested without libvirt.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::DaemonError;
use crate::fault;
use crate::libvirt_conn::{self, Conn};
use tracing::{error, info, info_span, warn};
use virt::domain::Domain;
use virt::sys;
use vmbeam_core::backend::Armed;
use vmbeam_core::carrier;
use vmbeam_core::job::MigrateOptions;
use vmbeam_core::plan::{self, BackendCapabilities, MigrationMode, PlanInput, RequestedMode};
use vmbeam_core::pool::{self, BeamPool, OwnerState, RecordStatus};
use vmbeam_core::recover::Local;
use vmbeam_core::ticket::{Ticket, TicketFields};
use vmbeam_core::{BeamMetadata, DomainFacts, DomainUuid, HostId, Phase, Progress};

use crate::libvirt_job::{self, Flags, Request};
use crate::recover::{LibvirtView, LocalDomains};
use crate::rendezvous;
use crate::state::{now_secs, Ctx, Outgoing, SharedCtx, UndefineAfterHandOver};

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
    /// Once planned.
    pub mode: Option<MigrationMode>,
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
            mode: None,
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

fn lv(e: virt::error::Error) -> DaemonError {
    DaemonError::libvirt(e)
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
) -> Result<Colocation, DaemonError> {
    let dest_uuid = {
        let dconn = Conn::open(dest_uri).map_err(|source| DaemonError::Libvirt {
            context: format!("connect to {dest_uri}: "),
            source,
        })?;
        libvirt_conn::host_uuid(&dconn)?
    };
    if dest_uuid == ctx.libvirt_uuid {
        return Err(DaemonError::InvalidArgs(format!("{dest_uri} is this host")));
    }
    if ctx.pool.device().is_some() {
        // The device kind's share, control-page proof, release and withdraw exist
        // (`devpool`) but the engine does not run them yet: no proof, so a copy.
        return Ok(Colocation {
            report: None,
            detail: Some(
                "host-device pool: zero-copy through the primary cloud's devices is not wired into the migration engine yet".into(),
            ),
        });
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
            detail: Some(e.chain()),
        }),
    }
}

/// Runs one migration to its end. `Ok` carries the one-line outcome.
///
/// The steps: `plan_migration` (zero-copy only with proof), then for zero-copy
/// `zero_copy_xml` (the ticket and the XMLs libvirt takes), `arm_zero_copy` (the
/// outgoing entry, the hand-over, the backend's arming), libvirt's own job, and
/// `settle_outcome` (success, fence or abort).
pub fn run(
    ctx: &SharedCtx,
    job: &Arc<JobHandle>,
    domain: &str,
    dest_uri: &str,
    opts: &MigrateOptions,
) -> Result<String, DaemonError> {
    let span = info_span!("migration", job = job.id, domain = %domain, dest = %dest_uri);
    let _g = span.enter();
    let started = Instant::now();
    job.phase(Phase::Planning);
    fault::hold("planning");
    let conn = Conn::open(&ctx.cfg.libvirt_uri).map_err(lv)?;
    let dom = Domain::lookup_by_name(&conn, domain)
        .map_err(|_| DaemonError::NoSuchDomain(domain.into()))?;
    if !dom.is_active().map_err(lv)? {
        return Err(DaemonError::InvalidArgs(format!(
            "domain {domain} is not running"
        )));
    }
    let was_paused = matches!(dom.get_state(), Ok((sys::VIR_DOMAIN_PAUSED, _)));
    let xml = dom.get_xml_desc(0).map_err(lv)?;
    let planned = plan_migration(ctx, job, &xml, dest_uri, opts)?;
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
        // A copy takes the caller's XMLs as they are (libvirt checks the guest ABI).
        dest_xml: opts.dest_xml.clone(),
        persist_xml: opts.persist_xml.clone(),
        suspend_after: opts.timeout_secs.map(Duration::from_secs),
    };
    let progress = |p: libvirt_job::Progress| job.ratio(p.processed, p.total);
    let Some(zc) = planned else {
        job.phase(Phase::Migrating);
        let done = libvirt_job::migrate(&req, Duration::from_millis(200), progress)
            .map_err(DaemonError::Job)?;
        job.mark("libvirt-returned");
        return Ok(finish(job, &done, started, "traditional"));
    };

    // Zero-copy.
    job.phase(Phase::IssuingTicket);
    // The caller's destination XML (already checked to keep what zero-copy needs) carries
    // the ticket; without one, the source's migratable XML.
    let migratable = match &opts.dest_xml {
        Some(x) => x.clone(),
        None => dom
            .get_xml_desc(sys::VIR_DOMAIN_XML_MIGRATABLE)
            .map_err(lv)?,
    };
    let inactive = if !opts.persistent {
        None
    } else if let Some(x) = &opts.persist_xml {
        Some(x.clone())
    } else if dom.is_persistent().unwrap_or(false) {
        Some(
            dom.get_xml_desc(sys::VIR_DOMAIN_XML_INACTIVE | sys::VIR_DOMAIN_XML_MIGRATABLE)
                .map_err(lv)?,
        )
    } else {
        Some(migratable.clone())
    };
    let xmls = zero_copy_xml(ctx, &zc, &migratable, inactive.as_deref())?;
    req.dest_xml = Some(xmls.dest_xml);
    req.persist_xml = xmls.persist_xml;
    let flight = arm_zero_copy(ctx, job.id, &zc)?;
    fault::hold("ticket");
    info!(
        backend = ctx.backend.name(),
        "source armed; ticket issued; migrating"
    );
    job.phase(Phase::Migrating);
    let result = libvirt_job::migrate(&req, Duration::from_millis(100), progress);
    job.phase(Phase::Confirming);
    fault::hold("settling");
    settle_outcome(
        ctx,
        job,
        &zc,
        flight,
        xmls.generation,
        result,
        started,
        &LibvirtView::new(&ctx.cfg.libvirt_uri),
        was_paused,
        opts.undefine_source,
    )
}

/// What a zero-copy migration works with, as planned.
pub(crate) struct ZeroCopyPlan {
    /// The domain, from its live XML.
    pub facts: DomainFacts,
    /// Its metadata, the owner set to this host (the pool's owner record says so).
    pub meta: BeamMetadata,
    /// The pool file this host's domain runs on.
    pub pool_file: String,
    /// The destination cloud VM, as it proved itself through the pool.
    pub dest: HostId,
}

/// Plans the migration of the domain whose live XML is `xml` to `dest_uri`: proves
/// co-location through the pool (unless forced traditional), asks the backend what it
/// offers and lets the planner decide. `Ok(None)` is a traditional migration; a refused
/// `--zero-copy` is an error. The job's mode and reason are set.
fn plan_migration(
    ctx: &SharedCtx,
    job: &JobHandle,
    xml: &str,
    dest_uri: &str,
    opts: &MigrateOptions,
) -> Result<Option<ZeroCopyPlan>, DaemonError> {
    let id = &ctx.cfg.identity;
    let facts = DomainFacts::from_xml(xml).map_err(|e| DaemonError::Failed(e.to_string()))?;
    let mut meta =
        BeamMetadata::from_domain_xml(xml).map_err(|e| DaemonError::InvalidArgs(e.to_string()))?;
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
        fault::hold("proving");
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
            return Err(DaemonError::ZeroCopyRefused(with_detail(r.to_string())));
        }
    };
    let reason = with_detail(planned.reason.to_string());
    let zero_copy = planned.mode == MigrationMode::ZeroCopy;
    info!(mode = %planned.mode, %reason, "planned");
    job.update(|v| {
        v.mode = Some(planned.mode);
        v.mode_reason = reason.clone();
    });
    // The caller's destination XML must keep what zero-copy needs; what else it changes
    // (interfaces, listen addresses) is libvirt's to check.
    let dest_differs = match &opts.dest_xml {
        Some(dest) if zero_copy => vmbeam_core::destination::zero_copy_differences(xml, dest)
            .map_err(|e| DaemonError::InvalidArgs(e.to_string()))?,
        _ => Vec::new(),
    };
    let zero_copy = if dest_differs.is_empty() {
        zero_copy
    } else {
        let why = format!(
            "the destination XML changes what zero-copy needs: {}",
            dest_differs.join("; ")
        );
        if opts.mode == RequestedMode::RequireZeroCopy {
            return Err(DaemonError::ZeroCopyRefused(why));
        }
        info!(%why, "planned again: traditional");
        job.update(|v| {
            v.mode = Some(MigrationMode::Traditional);
            v.mode_reason = why.clone();
        });
        false
    };
    if !zero_copy {
        // A copy must carry all of RAM: a source whose `x-ignore-shared` a crashed daemon
        // left on would send none of the shared memory.
        if meta.is_some() && facts.private_qmp.is_some() {
            let outcome = ctx.backend.reset_zero_copy(&facts).map_err(|e| {
                DaemonError::Failed(format!(
                    "cannot make sure the source sends all of its memory (x-ignore-shared off): {e}"
                ))
            })?;
            info!(%outcome, "x-ignore-shared off for a copying migration");
        }
        return Ok(None);
    }
    match (colo.report, pool_file, meta) {
        (Some(report), Some(pool_file), Some(meta)) => Ok(Some(ZeroCopyPlan {
            facts,
            meta,
            pool_file,
            dest: report.host_id,
        })),
        _ => Err(DaemonError::Failed(
            "zero-copy planned without a destination report or pool file".into(),
        )),
    }
}

/// The XMLs libvirt takes for a zero-copy migration.
pub(crate) struct ZeroCopyXml {
    /// The destination's XML: the migratable XML with the ticket in its `<metadata>`.
    pub dest_xml: String,
    /// The persistent definition for the destination (`--persistent`): the domain's
    /// metadata as it will be there.
    pub persist_xml: Option<String>,
    /// The generation once the destination has the domain (the owner record's too).
    pub generation: u64,
}

/// Zero-copy, step 1: issues the ticket for the destination and writes it into the
/// migratable XML; rewrites the `inactive` definition (when persisting) to say the
/// destination owns the domain. Changes nothing anywhere.
fn zero_copy_xml(
    ctx: &Ctx,
    zc: &ZeroCopyPlan,
    migratable: &str,
    inactive: Option<&str>,
) -> Result<ZeroCopyXml, DaemonError> {
    let id = &ctx.cfg.identity;
    let pool_path = id.pool_dir.join(&zc.pool_file);
    let identity = pool::file_identity(&pool_path).map_err(|e| DaemonError::pool("", e))?;
    let ticket = Ticket::issue(
        &ctx.key,
        TicketFields {
            cloud: id.cloud.clone(),
            domain_uuid: zc.facts.uuid.clone(),
            domain_name: zc.facts.name.clone(),
            pool_file: zc.pool_file.clone(),
            pool_identity: identity,
            source_host: id.host_id.clone(),
            dest_host: zc.dest.clone(),
            ttl_secs: id.ticket_ttl_secs,
        },
        now_secs(),
    )
    .and_then(|t| t.encode())
    .map_err(|e| DaemonError::Failed(e.to_string()))?;
    let dest_xml = carrier::insert_ticket(migratable, &ticket)
        .map_err(|e| DaemonError::Failed(e.to_string()))?;
    // The record once the destination has it: the persistent definition there says so, and
    // the pool's owner record gets the same generation when libvirt reports success.
    let moved = BeamMetadata {
        pool_file: Some(zc.pool_file.clone()),
        ..zc.meta
            .handed_to(zc.dest.clone())
            .map_err(|e| DaemonError::Failed(format!("VMBeam metadata: {e}")))?
    };
    let persist_xml = match inactive {
        Some(inactive) => Some(
            vmbeam_core::transform::enable(inactive, &moved, &ctx.cfg.qmp_dir)
                .map_err(|e| DaemonError::Failed(e.to_string()))?
                .xml,
        ),
        None => None,
    };
    Ok(ZeroCopyXml {
        dest_xml,
        persist_xml,
        generation: moved.generation,
    })
}

/// This job's entry in the outgoing table for the migration's duration: while it is there,
/// the source's `release` hook leaves the pool file alone (libvirt runs it inside the
/// migration's Confirm, or when the source is destroyed). Dropping the entry removes it
/// only while it is still this job's, and then the destination's ran marker, which has
/// served once the job settled: it never touches another job's entry or marker.
pub(crate) struct OutgoingEntry<'a> {
    ctx: &'a Ctx,
    uuid: DomainUuid,
    job: u64,
    pool_file: String,
    /// Leave the destination's ran marker on drop (a fence that failed: recovery finishes it).
    keep_marker: bool,
}

impl<'a> OutgoingEntry<'a> {
    /// Enters `out` for `uuid`. Refused (and nothing changed) while another job's entry is
    /// there.
    pub fn register(ctx: &'a Ctx, uuid: &DomainUuid, out: Outgoing) -> Result<Self, DaemonError> {
        let mut t = ctx.tables.lock().expect("lock");
        if t.recovering.contains(uuid) {
            return Err(DaemonError::Busy(format!(
                "vmbeamd is recovering an interrupted hand-over of this domain's pool file {}",
                out.pool_file
            )));
        }
        if let Some(other) = t.outgoing.get(uuid).filter(|o| o.job != out.job) {
            return Err(DaemonError::Busy(format!(
                "job {} is migrating this domain (pool file {})",
                other.job, other.pool_file
            )));
        }
        let entry = OutgoingEntry {
            ctx,
            uuid: uuid.clone(),
            job: out.job,
            pool_file: out.pool_file.clone(),
            keep_marker: false,
        };
        t.outgoing.insert(uuid.clone(), out);
        Ok(entry)
    }
}

impl Drop for OutgoingEntry<'_> {
    fn drop(&mut self) {
        let ours = {
            let mut t = self.ctx.tables.lock().unwrap_or_else(|p| p.into_inner());
            let ours = t
                .outgoing
                .get(&self.uuid)
                .is_some_and(|o| o.job == self.job);
            if ours {
                t.outgoing.remove(&self.uuid);
            }
            ours
        };
        if !ours {
            warn!(
                job = self.job,
                "the outgoing entry is no longer this job's: left alone, with the ran marker"
            );
            return;
        }
        if self.keep_marker {
            return;
        }
        let pool = BeamPool::new(&self.ctx.cfg.identity.pool_dir);
        if let Err(e) = pool.clear_ran(&self.pool_file) {
            warn!(error = %e, "could not delete the destination's ran marker");
        }
    }
}

/// A zero-copy migration armed on the source: its outgoing entry and the backend's handle.
pub(crate) struct InFlight<'a> {
    entry: OutgoingEntry<'a>,
    armed: Box<dyn Armed>,
}

/// Zero-copy, step 2: enters the outgoing migration, moves the pool file's owner record to
/// `handing-over` and arms the source (QEMU: verifies the backing, `x-ignore-shared` on).
/// On failure everything is undone (the record is taken back, the entry removed).
fn arm_zero_copy<'a>(
    ctx: &'a Ctx,
    job_id: u64,
    zc: &ZeroCopyPlan,
) -> Result<InFlight<'a>, DaemonError> {
    let id = &ctx.cfg.identity;
    let bpool = BeamPool::new(&id.pool_dir);
    let entry = OutgoingEntry::register(
        ctx,
        &zc.facts.uuid,
        Outgoing {
            job: job_id,
            pool_file: zc.pool_file.clone(),
            dest: zc.dest.clone(),
        },
    )?;
    if let Err(e) = bpool.begin_hand_over(&zc.pool_file, &id.host_id, &zc.dest) {
        drop(entry);
        return Err(DaemonError::pool(
            format!("hand-over of {}: ", zc.pool_file),
            e,
        ));
    }
    // A marker left by an earlier job whose daemon died before settling would fence this
    // job's failure although its destination never ran the guest. No destination can run
    // it before libvirt's job starts, so any marker now is stale: clear it, or do not go on.
    if let Err(e) = bpool.clear_ran(&zc.pool_file) {
        let _ = bpool.abort_hand_over(&zc.pool_file, &id.host_id);
        drop(entry);
        return Err(DaemonError::pool(
            format!("a stale ran marker of {} cannot be cleared: ", zc.pool_file),
            e,
        ));
    }
    match ctx
        .backend
        .arm_source(&zc.facts, &id.pool_dir.join(&zc.pool_file))
    {
        Ok(armed) => Ok(InFlight { entry, armed }),
        Err(e) => {
            let _ = bpool.abort_hand_over(&zc.pool_file, &id.host_id);
            drop(entry);
            Err(DaemonError::Backend(e))
        }
    }
}

/// Zero-copy, step 3: settles the pool file by how libvirt's job ended. `source` is this
/// host's libvirt (a fresh connection: the job's may have died with libvirtd), asked where
/// the guest is rather than assuming it.
///
/// - Success: the destination runs the guest on this file: the owner record moves to it
///   (at `generation`), and the source is disarmed.
/// - Failure after the destination ran the guest (its ran marker, or no way to tell):
///   resuming the source would have two CPUs write one memory. The source is fenced
///   (destroyed), never resumed, and the file is handed over: the destination is where the
///   guest last ran. If the fence failed, the record stays `handing-over` with the marker,
///   and recovery (`recover`) fences again and then hands over.
/// - Failure before: the source is disarmed; if libvirt shows the guest back as it was on
///   the source (running, or paused when it was paused before), the source takes the file
///   back. Otherwise (the source's QEMU died, libvirtd is gone, the guest is left paused)
///   nothing is assumed: the record stays `handing-over` and recovery settles it once it
///   can observe where the guest is (`vmbeam status` says what it waits for).
///
/// Then the outgoing entry goes (and the marker, once it has served).
#[allow(clippy::too_many_arguments)]
fn settle_outcome(
    ctx: &Ctx,
    job: &JobHandle,
    zc: &ZeroCopyPlan,
    flight: InFlight<'_>,
    generation: u64,
    result: Result<libvirt_job::Completed, libvirt_job::JobError>,
    started: Instant,
    source: &dyn LocalDomains,
    was_paused: bool,
    undefine_source: bool,
) -> Result<String, DaemonError> {
    let id = &ctx.cfg.identity;
    let bpool = BeamPool::new(&id.pool_dir);
    let InFlight {
        mut entry,
        mut armed,
    } = flight;
    let pool_file = &zc.pool_file;
    let e = match result {
        Ok(done) => {
            job.phase(Phase::Confirming);
            // libvirt reported success: the destination runs the guest on this file.
            if let Err(e) = bpool.complete_hand_over(pool_file, &id.host_id, &zc.dest, generation) {
                error!(error = %e, "could not record the hand-over of the pool file");
            }
            match armed.disarm(Duration::from_secs(2)) {
                Ok(o) => info!(outcome = %o, "source disarmed after success"),
                Err(e) => warn!(error = %e, "source disarm"),
            }
            drop(entry);
            return Ok(finish(job, &done, started, "zero-copy"));
        }
        Err(e) => e,
    };
    job.phase(Phase::CleaningUp);
    let uuid = &zc.facts.uuid;
    let ran = bpool.has_ran(pool_file).unwrap_or_else(|e| {
        error!(error = %e, "cannot tell whether the guest ran on the destination: fencing the source");
        true
    });
    let where_ = if ran {
        // The destination already ran guest code on this memory: resuming the source would
        // have two CPUs write one memory. Fence the source.
        error!("migration failed after the guest ran on the destination: destroying the source");
        let _ = armed.disarm(Duration::from_secs(1));
        match source.destroy(uuid) {
            Ok(()) => {
                if undefine_source {
                    if let Err(e) = source.undefine(uuid) {
                        warn!(error = %e, "could not remove the fenced source's definition");
                    }
                }
                match bpool.complete_hand_over(pool_file, &id.host_id, &zc.dest, generation) {
                    Ok(_) => {
                        info!(dest = %zc.dest, "source fenced; the pool file is the destination's, where the guest last ran")
                    }
                    Err(e) => {
                        error!(error = %e, "could not hand the pool file over after the fence")
                    }
                }
                format!(
                    "the guest had already run on {}, so the source was destroyed (fenced), not resumed; the memory file is {}'s",
                    zc.dest, zc.dest
                )
            }
            Err(e) => {
                error!(error = %e, "the source could not be destroyed: the hand-over stays open and recovery fences it again");
                entry.keep_marker = true;
                if undefine_source {
                    if let Err(e) = UndefineAfterHandOver(&ctx.cfg).insert(uuid) {
                        warn!(error = %e, "cannot remember to undefine the source");
                    }
                }
                format!(
                    "the guest had already run on {}, and destroying the source failed ({e}); vmbeamd keeps trying (see `vmbeam status`)",
                    zc.dest
                )
            }
        }
    } else {
        match armed.disarm(Duration::from_secs(10)) {
            Ok(o) => info!(outcome = %o, "source disarmed"),
            Err(e) => error!(error = %e, "source disarm failed"),
        }
        let observed = source.observe(uuid).map(|o| o.local);
        let back = match observed {
            Ok(Local::Running) => Some("the guest keeps running on the source"),
            Ok(Local::Paused) if was_paused => Some("the guest stays paused on the source"),
            _ => None,
        };
        match back {
            Some(text) => {
                if let Err(e) = bpool.abort_hand_over(pool_file, &id.host_id) {
                    warn!(error = %e, "could not take the pool file back");
                }
                text.to_owned()
            }
            None => {
                // Where the guest is cannot be observed here: leave it to recovery, with the
                // marker the destination may still leave.
                entry.keep_marker = true;
                if undefine_source {
                    if let Err(e) = UndefineAfterHandOver(&ctx.cfg).insert(uuid) {
                        warn!(error = %e, "cannot remember to undefine the source");
                    }
                }
                let seen = match observed {
                    Ok(l) => format!("libvirt says it is {l}"),
                    Err(e) => format!("the source's libvirt cannot say ({e})"),
                };
                warn!(%seen, "the guest is not back on the source: the hand-over is left to recovery");
                format!(
                    "the guest is not running on the source: {seen}; its memory file is kept and the hand-over to {} stays open until vmbeamd observes where the guest is (see `vmbeam status`)",
                    zc.dest
                )
            }
        }
    };
    drop(entry);
    let cancelled = job.cancelled.load(Ordering::SeqCst);
    let what = if cancelled {
        format!("cancelled: {e}")
    } else {
        e.to_string()
    };
    Err(DaemonError::MigrationFailed(format!("{what}; {where_}")))
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

#[cfg(test)]
mod tests {
    //! The source's settle and fence decisions, without libvirt: a fake backend, a temporary
    //! pool, libvirt's outcome given.

    use vmbeam_core::pool::{pool_file_name, OwnerRecord};

    use super::*;
    use crate::libvirt_job::{Completed, JobError};
    use crate::testing::{domain_xml, facts, host_id, uuid, Cloud, FakeLibvirt, Host, MEMORY};

    /// The source cvm1 runs the test domain on its pool file (generation 3, active, its own).
    fn source(cloud: &Cloud) -> (Host, String) {
        (cloud.host("cvm1"), cloud.source_file())
    }

    fn plan_to_cvm2(pool_file: &str) -> ZeroCopyPlan {
        ZeroCopyPlan {
            facts: facts(),
            meta: BeamMetadata::from_domain_xml(&domain_xml("cvm1"))
                .unwrap()
                .unwrap(),
            pool_file: pool_file.into(),
            dest: host_id("cvm2"),
        }
    }

    fn job(id: u64) -> JobHandle {
        JobHandle::new(id, "web1", "qemu+tcp://cvm2/system", Box::new(|| {}))
    }

    fn record(cloud: &Cloud, file: &str) -> OwnerRecord {
        BeamPool::new(cloud.pool_dir())
            .read_owner(file)
            .unwrap()
            .unwrap()
    }

    fn outgoing_job(h: &Host) -> Option<u64> {
        h.ctx
            .tables
            .lock()
            .unwrap()
            .outgoing
            .get(&uuid())
            .map(|o| o.job)
    }

    fn libvirt_failed() -> Result<Completed, JobError> {
        Err(JobError::Migration("operation failed: boom".into()))
    }

    /// Arms job `id` and settles it with `result`, libvirt on the source saying `after` (and
    /// the guest running before); returns the outcome and whether the source was fenced.
    fn settle_with(
        h: &Host,
        zc: &ZeroCopyPlan,
        id: u64,
        before_settle: impl FnOnce(),
        result: Result<Completed, JobError>,
        libvirt: &FakeLibvirt,
    ) -> Result<String, DaemonError> {
        let job = job(id);
        let flight = arm_zero_copy(&h.ctx, id, zc).unwrap();
        assert_eq!(outgoing_job(h), Some(id));
        before_settle();
        settle_outcome(
            &h.ctx,
            &job,
            zc,
            flight,
            4,
            result,
            Instant::now(),
            libvirt,
            false,
            // As Nova and the lab migrate: --persistent --undefinesource.
            true,
        )
    }

    /// [`settle_with`] where libvirt shows the guest running on the source after a failure
    /// (it resumes the source when its job fails).
    fn arm_and_settle(
        h: &Host,
        zc: &ZeroCopyPlan,
        id: u64,
        before_settle: impl FnOnce(),
        result: Result<Completed, JobError>,
    ) -> (Result<String, DaemonError>, bool) {
        let libvirt = FakeLibvirt::new(Local::Running);
        let out = settle_with(h, zc, id, before_settle, result, &libvirt);
        (out, libvirt.fenced())
    }

    fn failure_text(out: Result<String, DaemonError>) -> String {
        match out {
            Err(DaemonError::MigrationFailed(m)) => m,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_failed_job_after_the_guest_ran_on_the_destination_fences_the_source() {
        let cloud = Cloud::new();
        let (src, file) = source(&cloud);
        let zc = plan_to_cvm2(&file);
        let pool = BeamPool::new(cloud.pool_dir());
        let (out, fenced) = arm_and_settle(
            &src,
            &zc,
            1,
            || pool.mark_ran(&file).unwrap(),
            libvirt_failed(),
        );
        assert!(fenced, "the source must be destroyed, never resumed");
        let Err(DaemonError::MigrationFailed(m)) = out else {
            panic!("{out:?}")
        };
        assert!(m.contains("boom") && m.contains("fenced"), "{m}");
        assert!(!m.contains("keeps running on the source"), "{m}");
        // The file is not taken back: it is the destination's, where the guest last ran (so
        // a later migration from there is not refused).
        let r = record(&cloud, &file);
        assert_eq!(
            (r.state, r.owner, r.generation),
            (OwnerState::Active, host_id("cvm2"), 4)
        );
        assert_eq!(
            src.fake.calls(),
            [format!("arm_source {file}"), "disarm 1s".into()]
        );
        // The job settled: its entry and the marker (which has served) are gone.
        assert_eq!(outgoing_job(&src), None);
        assert!(!pool.has_ran(&file).unwrap());
    }

    #[test]
    fn a_fence_that_fails_leaves_the_hand_over_and_the_marker_for_recovery() {
        let cloud = Cloud::new();
        let (src, file) = source(&cloud);
        let zc = plan_to_cvm2(&file);
        let pool = BeamPool::new(cloud.pool_dir());
        let libvirt = FakeLibvirt::new(Local::Paused);
        libvirt.refuse_destroy.set(true);
        let m = failure_text(settle_with(
            &src,
            &zc,
            1,
            || pool.mark_ran(&file).unwrap(),
            libvirt_failed(),
            &libvirt,
        ));
        assert!(m.contains("destroying the source failed"), "{m}");
        let r = record(&cloud, &file);
        assert_eq!(
            (r.state, r.owner),
            (OwnerState::HandingOver, host_id("cvm1"))
        );
        assert!(pool.has_ran(&file).unwrap(), "recovery needs the marker");
        assert_eq!(outgoing_job(&src), None);
        assert!(libvirt.undefined.borrow().is_empty());
        // libvirtd is back: recovery fences, hands over, and does what --undefinesource
        // would have done in libvirt's Confirm.
        libvirt.refuse_destroy.set(false);
        crate::recover::reconcile(&src.ctx, &libvirt);
        assert!(libvirt.fenced());
        assert_eq!(*libvirt.undefined.borrow(), vec![uuid()]);
        let r = record(&cloud, &file);
        assert_eq!((r.state, r.owner), (OwnerState::Active, host_id("cvm2")));
        assert!(
            !UndefineAfterHandOver(&src.ctx.cfg).take(&uuid()),
            "forgotten once done"
        );
    }

    #[test]
    fn a_guest_not_back_on_the_source_is_not_said_to_run_there_and_is_left_to_recovery() {
        // The source's QEMU died, libvirtd is gone, or the guest was left paused although
        // it ran before: where the guest is cannot be observed, so nothing is taken back.
        for (local, unreachable, seen) in [
            (Local::Absent, false, "not running here"),
            (Local::Paused, false, "paused here"),
            (Local::Running, true, "cannot say"),
        ] {
            let cloud = Cloud::new();
            let (src, file) = source(&cloud);
            let zc = plan_to_cvm2(&file);
            let libvirt = FakeLibvirt::new(local);
            libvirt.unreachable.set(unreachable);
            let m = failure_text(settle_with(&src, &zc, 1, || {}, libvirt_failed(), &libvirt));
            assert!(!m.contains("keeps running"), "{local:?}: {m}");
            assert!(
                m.contains("not running on the source") && m.contains(seen),
                "{local:?}: {m}"
            );
            assert!(!libvirt.fenced(), "{local:?}");
            let r = record(&cloud, &file);
            assert_eq!(
                (r.state, r.owner),
                (OwnerState::HandingOver, host_id("cvm1")),
                "{local:?}"
            );
            assert_eq!(outgoing_job(&src), None);
            // Recovery settles it once the guest is seen back (here: resumed on the source).
            libvirt.unreachable.set(false);
            libvirt.local.set(Local::Running);
            crate::recover::reconcile(&src.ctx, &libvirt);
            assert_eq!(record(&cloud, &file).state, OwnerState::Active, "{local:?}");
        }
    }

    #[test]
    fn a_guest_paused_before_and_after_is_taken_back_paused() {
        let cloud = Cloud::new();
        let (src, file) = source(&cloud);
        let zc = plan_to_cvm2(&file);
        let libvirt = FakeLibvirt::new(Local::Paused);
        let flight = arm_zero_copy(&src.ctx, 1, &zc).unwrap();
        let out = settle_outcome(
            &src.ctx,
            &job(1),
            &zc,
            flight,
            4,
            libvirt_failed(),
            Instant::now(),
            &libvirt,
            true,
            false,
        );
        assert!(failure_text(out).contains("stays paused on the source"));
        assert_eq!(record(&cloud, &file).state, OwnerState::Active);
    }

    #[test]
    fn a_failed_job_before_the_guest_ran_takes_the_file_back_and_keeps_the_source() {
        let cloud = Cloud::new();
        let (src, file) = source(&cloud);
        let zc = plan_to_cvm2(&file);
        let (out, fenced) = arm_and_settle(&src, &zc, 1, || {}, libvirt_failed());
        assert!(!fenced);
        let Err(DaemonError::MigrationFailed(m)) = out else {
            panic!("{out:?}")
        };
        assert!(m.contains("keeps running on the source"), "{m}");
        let r = record(&cloud, &file);
        assert_eq!(
            (r.state, r.owner, r.generation),
            (OwnerState::Active, host_id("cvm1"), 3)
        );
        assert_eq!(
            src.fake.calls(),
            [format!("arm_source {file}"), "disarm 10s".into()]
        );
        assert_eq!(outgoing_job(&src), None);
    }

    #[test]
    fn a_stale_ran_marker_does_not_fence_a_later_job_whose_destination_never_ran() {
        let cloud = Cloud::new();
        let (src, file) = source(&cloud);
        let zc = plan_to_cvm2(&file);
        let pool = BeamPool::new(cloud.pool_dir());
        // Left by an earlier job whose daemon died before it settled.
        pool.mark_ran(&file).unwrap();
        let (out, fenced) = arm_and_settle(&src, &zc, 1, || {}, libvirt_failed());
        assert!(!fenced, "a stale marker must not destroy the source");
        let Err(DaemonError::MigrationFailed(m)) = out else {
            panic!("{out:?}")
        };
        assert!(m.contains("keeps running on the source"), "{m}");
        assert_eq!(record(&cloud, &file).state, OwnerState::Active);
    }

    #[test]
    fn a_cancelled_job_says_so() {
        let cloud = Cloud::new();
        let (src, file) = source(&cloud);
        let zc = plan_to_cvm2(&file);
        let job = job(1);
        job.cancelled.store(true, Ordering::SeqCst);
        let flight = arm_zero_copy(&src.ctx, 1, &zc).unwrap();
        let out = settle_outcome(
            &src.ctx,
            &job,
            &zc,
            flight,
            4,
            libvirt_failed(),
            Instant::now(),
            &FakeLibvirt::new(Local::Running),
            false,
            false,
        );
        assert!(
            matches!(&out, Err(DaemonError::MigrationFailed(m)) if m.starts_with("cancelled: ")),
            "{out:?}"
        );
        assert_eq!(record(&cloud, &file).state, OwnerState::Active);
    }

    #[test]
    fn success_hands_the_file_over_at_the_next_generation() {
        let cloud = Cloud::new();
        let (src, file) = source(&cloud);
        let zc = plan_to_cvm2(&file);
        let pool = BeamPool::new(cloud.pool_dir());
        // The destination ran the guest (as it does on success): the marker has served.
        let (out, fenced) = arm_and_settle(
            &src,
            &zc,
            1,
            || pool.mark_ran(&file).unwrap(),
            Ok(Completed::default()),
        );
        assert!(!fenced);
        assert!(out.unwrap().starts_with("zero-copy migration completed"));
        let r = record(&cloud, &file);
        assert_eq!(
            (r.state, r.owner, r.generation),
            (OwnerState::Active, host_id("cvm2"), 4)
        );
        assert_eq!(
            src.fake.calls(),
            [format!("arm_source {file}"), "disarm 2s".into()]
        );
        assert_eq!(outgoing_job(&src), None);
        assert!(!pool.has_ran(&file).unwrap());
        assert_eq!(cloud.pool_names(), [file.clone(), format!("{file}.owner")]);
    }

    #[test]
    fn a_second_job_leaves_the_first_jobs_entry_record_and_marker_alone() {
        let cloud = Cloud::new();
        let (src, file) = source(&cloud);
        let zc = plan_to_cvm2(&file);
        let pool = BeamPool::new(cloud.pool_dir());
        let first = arm_zero_copy(&src.ctx, 1, &zc).unwrap();
        pool.mark_ran(&file).unwrap();
        // A second job of the same domain cannot enter: nothing of the first changes (before,
        // its failure path removed the first job's entry and marker and so disarmed the fence).
        let second = arm_zero_copy(&src.ctx, 2, &zc);
        assert!(
            matches!(second, Err(DaemonError::Busy(_))),
            "{:?}",
            second.err()
        );
        assert_eq!(outgoing_job(&src), Some(1));
        assert!(pool.has_ran(&file).unwrap());
        assert_eq!(record(&cloud, &file).state, OwnerState::HandingOver);
        assert_eq!(src.fake.calls(), [format!("arm_source {file}")]);
        // The first job's failure then sees the marker and fences.
        let libvirt = FakeLibvirt::new(Local::Running);
        let out = settle_outcome(
            &src.ctx,
            &job(1),
            &zc,
            first,
            4,
            libvirt_failed(),
            Instant::now(),
            &libvirt,
            false,
            false,
        );
        assert!(out.is_err());
        assert!(libvirt.fenced());
    }

    #[test]
    fn an_entry_only_removes_itself() {
        // Whatever put another job's entry in its place, dropping this job's entry leaves
        // that one and the marker alone.
        let cloud = Cloud::new();
        let (src, file) = source(&cloud);
        let pool = BeamPool::new(cloud.pool_dir());
        let out = |job| Outgoing {
            job,
            pool_file: file.clone(),
            dest: host_id("cvm2"),
        };
        let entry = OutgoingEntry::register(&src.ctx, &uuid(), out(2)).unwrap();
        src.ctx
            .tables
            .lock()
            .unwrap()
            .outgoing
            .insert(uuid(), out(1));
        pool.mark_ran(&file).unwrap();
        drop(entry);
        assert_eq!(outgoing_job(&src), Some(1));
        assert!(pool.has_ran(&file).unwrap());
        // Its own entry it removes, with the marker; registering again is fine then.
        let again = OutgoingEntry::register(&src.ctx, &uuid(), out(1)).unwrap();
        drop(again);
        assert_eq!(outgoing_job(&src), None);
        assert!(!pool.has_ran(&file).unwrap());
    }

    #[test]
    fn a_refused_arm_takes_the_file_back() {
        let cloud = Cloud::new();
        let (src, file) = source(&cloud);
        src.fake.refuse_arm_source.store(true, Ordering::SeqCst);
        let r = arm_zero_copy(&src.ctx, 1, &plan_to_cvm2(&file));
        assert!(
            matches!(
                r,
                Err(DaemonError::Backend(
                    vmbeam_core::backend::BackendError::Refused(_)
                ))
            ),
            "{:?}",
            r.err()
        );
        let rec = record(&cloud, &file);
        assert_eq!(
            (rec.state, rec.owner),
            (OwnerState::Active, host_id("cvm1"))
        );
        assert_eq!(outgoing_job(&src), None);
    }

    #[test]
    fn a_hand_over_that_cannot_begin_changes_nothing() {
        // The record says another host owns the file: no hand-over, no arming, no entry.
        let cloud = Cloud::new();
        let src = cloud.host("cvm1");
        let pool = BeamPool::new(cloud.pool_dir());
        pool.create_file(&uuid(), 3, MEMORY, None).unwrap();
        let file = pool_file_name(&uuid(), 3);
        pool.claim(&file, &uuid(), 3, &host_id("cvm3")).unwrap();
        let before = record(&cloud, &file);
        let r = arm_zero_copy(&src.ctx, 1, &plan_to_cvm2(&file));
        assert!(
            matches!(&r, Err(e @ DaemonError::Pool { .. }) if e.to_string().contains("hand-over")),
            "{:?}",
            r.err()
        );
        assert_eq!(record(&cloud, &file), before);
        assert!(src.fake.calls().is_empty());
        assert_eq!(outgoing_job(&src), None);
    }

    #[test]
    fn the_destination_accepts_the_sources_ticket_and_owns_the_domain_one_generation_later() {
        let cloud = Cloud::new();
        let (src, file) = source(&cloud);
        let dst = cloud.host("cvm2");
        let zc = plan_to_cvm2(&file);
        let xml = domain_xml("cvm1");
        let x = zero_copy_xml(&src.ctx, &zc, &xml, Some(&xml)).unwrap();
        assert_eq!(x.generation, 4);
        // The persistent definition for the destination says it owns the domain.
        let persisted = BeamMetadata::from_domain_xml(x.persist_xml.as_deref().unwrap())
            .unwrap()
            .unwrap();
        assert_eq!(
            (persisted.owner, persisted.generation, persisted.pool_file),
            (host_id("cvm2"), 4, Some(file.clone()))
        );
        // The destination's migrate hook accepts the ticket and says the same.
        let args = ["web1", "migrate", "begin", "-"].map(String::from);
        let incoming = crate::hooks::handle(&dst.ctx, &args, &x.dest_xml).unwrap();
        let meta = BeamMetadata::from_domain_xml(&incoming).unwrap().unwrap();
        assert_eq!(
            (meta.owner, meta.generation, meta.pool_file),
            (host_id("cvm2"), 4, Some(file))
        );
        assert!(carrier::extract_ticket(&incoming).unwrap().1.is_none());
    }
}
