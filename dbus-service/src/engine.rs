//! The source side of a migration: plan it (zero-copy only with proof), issue the ticket,
//! set `x-ignore-shared` for exactly the migration's duration, run it as libvirt's own job,
//! and settle the pool file's ownership by how libvirt says it ended.
//!
//! [`run`] is the only step that talks to libvirt; the zero-copy steps it calls
//! (`zero_copy_xml`, `arm_zero_copy`, `settle_outcome`) work on the pool, the daemon's
//! tables and the backend only, so the split-brain fence is unit-tested without libvirt.
//!
//! In the host-device pool (`pool_kind = "host-device"`) the same steps run on the
//! primary cloud's devices: co-location is the host's COLOCATED answer for the
//! destination's cloud-VM id (`probe_device`), the planner's zero-copy is followed by SHARE
//! and the control-page proof (`share_with_destination`), the ticket travels with a signed
//! device share (`vmbeam_core::device_share`), and settling releases the source's device
//! once its QEMU let go, or fences by the control page's ran record (`settle_device`).

use std::path::Path;
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
use vmbeam_core::control_page::ControlToken;
use vmbeam_core::device_share::DeviceShare;
use vmbeam_core::host_protocol::{CloudVmId, NoReason, Placement};
use vmbeam_core::job::MigrateOptions;
use vmbeam_core::plan::{self, BackendCapabilities, MigrationMode, PlanInput, RequestedMode};
use vmbeam_core::pool::{self, BeamPool, OwnerState, RecordStatus};
use vmbeam_core::recover::Local;
use vmbeam_core::ticket::{Ticket, TicketFields};
use vmbeam_core::{BeamMetadata, DomainFacts, DomainUuid, HostId, Phase, Progress};

use crate::devpool::{error_chain, DevicePool, DevicePoolError, Role};
use crate::hostlink::Colocation as HostColocation;

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
    if let Some(device) = ctx.pool.device() {
        // The device this cloud VM owns of the guest (BAR 2's file, an absolute path).
        return device
            .held_path(&facts.uuid, Role::Owner)
            .map(|p| p.display().to_string());
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
    if let Some(device) = ctx.pool.device() {
        return Ok(probe_device(ctx, device, &dest_uuid));
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

/// Co-location in the host-device pool: the destination cloud VM is known by its libvirt
/// host UUID (its SMBIOS UUID, its id to the primary cloud's host), and the host says
/// whether it is a cloud VM of this one's cloud on the same host (COLOCATED). Changes
/// nothing: the share and the content proof come once the planner says zero-copy
/// ([`share_with_destination`]); the proof is checked at the destination's Prepare.
pub(crate) fn probe_device(ctx: &Ctx, device: &DevicePool, dest_uuid: &str) -> Colocation {
    let none = |detail: String| Colocation {
        report: None,
        detail: Some(detail),
    };
    let Ok(peer) = DomainUuid::new(dest_uuid).map(CloudVmId) else {
        return none(format!(
            "the destination's host UUID '{dest_uuid}' is not a cloud VM id the primary cloud's host knows"
        ));
    };
    match device.colocated(&peer) {
        Ok(HostColocation::Yes) => match HostId::new(peer.to_string()) {
            Ok(host_id) => Colocation {
                report: Some(plan::DestinationReport {
                    host_id,
                    // The host answers yes only for a cloud VM of this one's cloud.
                    cloud: ctx.cfg.identity.cloud.clone(),
                    proof: plan::ProofStatus::Proven,
                    pool_identity: None,
                }),
                detail: None,
            },
            Err(e) => none(format!("cloud VM id {peer}: {e}")),
        },
        Ok(HostColocation::No(NoReason::NotColocated)) => none(format!(
            "not co-located: the primary cloud's host says cloud VM {peer} is not on this host in this cloud (another host, or another cloud: the host tells nothing of other clouds)"
        )),
        Ok(HostColocation::No(NoReason::SelfPeer)) => {
            none(format!("the primary cloud's host says cloud VM {peer} is this one"))
        }
        Err(e) => none(format!(
            "the primary cloud's host could not be asked about co-location: {}",
            error_chain(&e)
        )),
    }
}

/// Zero-copy in the host-device pool, before the ticket: the guest's memory plugged into
/// the destination cloud VM too (SHARE; the source's record names it: the hand-over
/// record) and a fresh proof written into the control page through this side's mapping.
/// What the destination needs travels in the ticket's device share. A refusal names the
/// reason (the host's code: `not-colocated` for another host or cloud, `busy` for a share
/// in place, ...).
pub(crate) fn share_with_destination(
    ctx: &Ctx,
    guest: &DomainUuid,
    dest: &HostId,
) -> Result<DeviceHandOver, String> {
    let device = ctx
        .pool
        .device()
        .ok_or("this cloud VM's beam pool is not host-device")?;
    let peer = DomainUuid::new(dest.as_str())
        .map(CloudVmId)
        .map_err(|e| format!("destination {dest} is not a cloud VM id: {e}"))?;
    let placement = device.share(guest, &peer).map_err(|e| {
        format!(
            "the primary cloud's host did not share the guest's memory with cloud VM {peer}: {}",
            error_chain(&e)
        )
    })?;
    let proof = match device.prove(guest) {
        Ok(p) => p,
        Err(e) => {
            // Nobody at the destination knows of the share yet: take it back here.
            let back = take_back_share(device, guest);
            return Err(format!(
                "the control-page proof could not be written: {}; {back}",
                error_chain(&e)
            ));
        }
    };
    info!(%peer, addr = %placement.addr, proof = %proof.nonce, "guest memory shared with the destination; proof written");
    Ok(DeviceHandOver {
        dest: peer,
        placement,
        proof,
    })
}

/// The host-device pool, a zero-copy migration failed after SHARE: the share taken back
/// by the source (UNSHARE) unless the destination accepted it (then it withdraws it at its
/// `release end`, and the hand-over record closes here); what became of it, in words.
/// Another failure leaves the hand-over record open: recovery tries again.
fn take_back_share(device: &DevicePool, guest: &DomainUuid) -> String {
    let _s = info_span!("unshare", %guest).entered();
    match device.unshare(guest) {
        Ok(()) => "the share was taken back from the destination, which never accepted it".into(),
        Err(DevicePoolError::ShareAccepted { with, .. }) => {
            if let Err(e) = device.close_hand_over(guest) {
                warn!(error = %error_chain(&e), "could not close the device's hand-over record");
            }
            format!("{with} accepted the share and withdraws it once its QEMU has exited")
        }
        Err(e) => {
            warn!(error = %error_chain(&e), "the unaccepted share could not be taken back: recovery tries again");
            format!(
                "the share could not be taken back yet ({}): vmbeamd's recovery tries again",
                error_chain(&e)
            )
        }
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
    // Recovery keeps off the domain from here on: planning may already SHARE its memory.
    let _migrating = match dom.get_uuid_string().map(|u| DomainUuid::new(&u)) {
        Ok(Ok(uuid)) => Some(MigratingClaim::take(ctx, &uuid, job.id)?),
        _ => None,
    };
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

    // Zero-copy. Until libvirt's job starts, no destination hook has seen the device
    // share: a failure takes the share back (UNSHARE) before it is reported.
    let (flight, generation) = match ready_zero_copy(ctx, job, &dom, &zc, opts, &mut req) {
        Ok(ready) => ready,
        Err(e) => {
            if let Some(device) = ctx.pool.device().filter(|_| zc.device.is_some()) {
                let back = take_back_share(device, &zc.facts.uuid);
                info!(%back, "zero-copy failed before libvirt's job");
            }
            return Err(e);
        }
    };
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
        generation,
        result,
        started,
        &LibvirtView::new(&ctx.cfg.libvirt_uri),
        was_paused,
        opts.undefine_source,
    )
}

/// Zero-copy, before libvirt's job: the ticket and the XMLs libvirt takes (into `req`),
/// then the source armed; the armed flight and the generation the destination gets.
fn ready_zero_copy<'a>(
    ctx: &'a SharedCtx,
    job: &JobHandle,
    dom: &Domain,
    zc: &ZeroCopyPlan,
    opts: &MigrateOptions,
    req: &mut Request,
) -> Result<(InFlight<'a>, u64), DaemonError> {
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
    let xmls = zero_copy_xml(ctx, zc, &migratable, inactive.as_deref())?;
    req.dest_xml = Some(xmls.dest_xml);
    req.persist_xml = xmls.persist_xml;
    let flight = arm_zero_copy(ctx, job.id, zc)?;
    Ok((flight, xmls.generation))
}

/// What a zero-copy migration works with, as planned.
pub(crate) struct ZeroCopyPlan {
    /// The domain, from its live XML.
    pub facts: DomainFacts,
    /// Its metadata, the owner set to this host (the pool's owner record says so).
    pub meta: BeamMetadata,
    /// The pool file this host's domain runs on.
    pub pool_file: String,
    /// The destination cloud VM, as it proved itself through the pool (in the host-device
    /// pool: its cloud VM id).
    pub dest: HostId,
    /// The host-device pool's part: the share at the destination and the proof.
    pub device: Option<DeviceHandOver>,
}

/// A zero-copy migration's device part (the host-device pool).
#[derive(Debug, Clone)]
pub(crate) struct DeviceHandOver {
    /// The destination cloud VM.
    pub dest: CloudVmId,
    /// Where the host plugged the guest's memory there.
    pub placement: Placement,
    /// The control-page proof's token.
    pub proof: ControlToken,
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
    plan_with_probe(ctx, job, xml, opts, |pool_file| {
        probe_destination(ctx, dest_uri, pool_file)
    })
}

/// [`plan_migration`] with the co-location probe given (tests ask the host about a
/// cloud VM of their choice without a destination libvirt).
fn plan_with_probe(
    ctx: &SharedCtx,
    job: &JobHandle,
    xml: &str,
    opts: &MigrateOptions,
    probe: impl FnOnce(Option<&str>) -> Result<Colocation, DaemonError>,
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
        colo = probe(pool_file.as_deref())?;
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
    // The host-device pool: the share and the proof, now that zero-copy is planned.
    let mut device = None;
    let zero_copy = match (&colo.report, zero_copy && ctx.pool.device().is_some()) {
        (Some(report), true) => match share_with_destination(ctx, &facts.uuid, &report.host_id) {
            Ok(d) => {
                device = Some(d);
                true
            }
            Err(why) => {
                if opts.mode == RequestedMode::RequireZeroCopy {
                    return Err(DaemonError::ZeroCopyRefused(why));
                }
                info!(%why, "planned again: traditional");
                job.update(|v| {
                    v.mode = Some(MigrationMode::Traditional);
                    v.mode_reason = why.clone();
                });
                false
            }
        },
        _ => zero_copy,
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
            device,
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
    // In the host-device pool the ticket names no pool file (the device share says where
    // the memory is at the destination, and the control page proves it).
    let (pool_file, identity) = match &zc.device {
        Some(_) => (String::new(), vmbeam_core::FileIdentity { dev: 0, ino: 0 }),
        None => {
            let pool_path = id.pool_dir.join(&zc.pool_file);
            let identity = pool::file_identity(&pool_path).map_err(|e| DaemonError::pool("", e))?;
            (zc.pool_file.clone(), identity)
        }
    };
    let ticket = Ticket::issue(
        &ctx.key,
        TicketFields {
            cloud: id.cloud.clone(),
            domain_uuid: zc.facts.uuid.clone(),
            domain_name: zc.facts.name.clone(),
            pool_file,
            pool_identity: identity,
            source_host: id.host_id.clone(),
            dest_host: zc.dest.clone(),
            ttl_secs: id.ticket_ttl_secs,
        },
        now_secs(),
    )
    .map_err(|e| DaemonError::Failed(e.to_string()))?;
    let encoded = ticket
        .encode()
        .map_err(|e| DaemonError::Failed(e.to_string()))?;
    let mut dest_xml = carrier::insert_ticket(migratable, &encoded)
        .map_err(|e| DaemonError::Failed(e.to_string()))?;
    if let Some(d) = &zc.device {
        let share = DeviceShare {
            guest: zc.facts.uuid.clone(),
            dest: d.dest.clone(),
            ticket_nonce: ticket.nonce,
            placement: d.placement,
            proof: d.proof,
        };
        dest_xml = carrier::insert_device_share(&dest_xml, &share.encode(&ctx.key))
            .map_err(|e| DaemonError::Failed(e.to_string()))?;
    }
    // The record once the destination has it: the persistent definition there says so, and
    // the pool's owner record gets the same generation when libvirt reports success.
    let moved = BeamMetadata {
        pool_file: zc.device.is_none().then(|| zc.pool_file.clone()),
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
/// A domain entered in `Tables::migrating` for one job; removed on drop.
pub(crate) struct MigratingClaim<'a> {
    ctx: &'a Ctx,
    uuid: DomainUuid,
    job: u64,
}

impl<'a> MigratingClaim<'a> {
    /// Enters `uuid` for job `job`. Refused (nothing changed) while recovery settles an
    /// interrupted hand-over of it or another job migrates it.
    pub fn take(ctx: &'a Ctx, uuid: &DomainUuid, job: u64) -> Result<Self, DaemonError> {
        let mut t = ctx.tables.lock().expect("lock");
        if t.recovering.contains(uuid) {
            return Err(DaemonError::Busy(format!(
                "vmbeamd is recovering an interrupted hand-over of domain {uuid}'s memory; try again shortly"
            )));
        }
        if let Some(other) = t.migrating.get(uuid).filter(|j| **j != job) {
            return Err(DaemonError::Busy(format!(
                "job {other} is migrating domain {uuid}"
            )));
        }
        t.migrating.insert(uuid.clone(), job);
        Ok(Self {
            ctx,
            uuid: uuid.clone(),
            job,
        })
    }
}

impl Drop for MigratingClaim<'_> {
    fn drop(&mut self) {
        let mut t = self.ctx.tables.lock().unwrap_or_else(|p| p.into_inner());
        if t.migrating.get(&self.uuid) == Some(&self.job) {
            t.migrating.remove(&self.uuid);
        }
    }
}

pub(crate) struct OutgoingEntry<'a> {
    ctx: &'a Ctx,
    uuid: DomainUuid,
    job: u64,
    pool_file: String,
    /// Leave the destination's ran marker on drop (a fence that failed: recovery finishes it).
    keep_marker: bool,
    /// The pool file is in the shared directory (its ran marker is there); the host-device
    /// pool's ran record lives in the control page and is never cleared.
    directory: bool,
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
            directory: true,
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
        if self.keep_marker || !self.directory {
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
    let mut entry = OutgoingEntry::register(
        ctx,
        &zc.facts.uuid,
        Outgoing {
            job: job_id,
            pool_file: zc.pool_file.clone(),
            dest: zc.dest.clone(),
        },
    )?;
    if zc.device.is_some() {
        // The host-device pool: the hand-over record is the device record's share (written
        // by `share`), the ran record names this migration's proof, so nothing stale can
        // count: only the backend is armed.
        entry.directory = false;
        return match ctx.backend.arm_source(&zc.facts, Path::new(&zc.pool_file)) {
            Ok(armed) => Ok(InFlight { entry, armed }),
            Err(e) => Err(DaemonError::Backend(e)),
        };
    }
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
    if let Some(device) = ctx.pool.device().filter(|_| zc.device.is_some()) {
        return settle_device(
            ctx,
            device,
            job,
            zc,
            flight,
            result,
            started,
            source,
            was_paused,
            undefine_source,
        );
    }
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

/// How long the source waits for its QEMU to let go of the device before RELEASE (libvirt
/// ends the source QEMU in Confirm, or the fence destroyed it); past that, recovery
/// releases it.
const RELEASE_WAIT: Duration = Duration::from_secs(30);

/// [`settle_outcome`] in the host-device pool: the same decisions, with the device
/// pool's records and the control page's ran record.
///
/// - Success: the source is disarmed and RELEASEs the device once nothing here maps it
///   (its QEMU exited); the destination adopted it when the guest ran there.
/// - Failure after the destination ran the guest (its ran record names this migration's
///   proof, or no way to tell): the source is fenced, then releases; the memory is the
///   destination's. A failed fence leaves the hand-over record for recovery.
/// - Failure before: the source is disarmed; libvirt showing the guest back here closes the
///   hand-over record (the destination WITHDRAWs its share once its QEMU exited, at its
///   `release end`); otherwise recovery settles it.
#[allow(clippy::too_many_arguments)]
fn settle_device(
    ctx: &Ctx,
    device: &DevicePool,
    job: &JobHandle,
    zc: &ZeroCopyPlan,
    flight: InFlight<'_>,
    result: Result<libvirt_job::Completed, libvirt_job::JobError>,
    started: Instant,
    source: &dyn LocalDomains,
    was_paused: bool,
    undefine_source: bool,
) -> Result<String, DaemonError> {
    let InFlight { entry, mut armed } = flight;
    let guest = &zc.facts.uuid;
    let release = || match device.when_unmapped(guest, RELEASE_WAIT, DevicePool::release) {
        Ok(()) => {
            info!(dest = %zc.dest, "device released here: the destination owns the guest's memory")
        }
        Err(e) => {
            error!(error = %error_chain(&e), "the device could not be released yet: recovery releases it")
        }
    };
    let e = match result {
        Ok(done) => {
            job.phase(Phase::Confirming);
            match armed.disarm(Duration::from_secs(2)) {
                Ok(o) => info!(outcome = %o, "source disarmed after success"),
                Err(e) => warn!(error = %e, "source disarm"),
            }
            drop(entry);
            release();
            return Ok(finish(job, &done, started, "zero-copy"));
        }
        Err(e) => e,
    };
    job.phase(Phase::CleaningUp);
    let ran = device.has_ran(guest).unwrap_or_else(|e| {
        error!(error = %error_chain(&e), "cannot tell whether the guest ran on the destination: fencing the source");
        true
    });
    let where_ = if ran {
        error!("migration failed after the guest ran on the destination: destroying the source");
        let _ = armed.disarm(Duration::from_secs(1));
        match source.destroy(guest) {
            Ok(()) => {
                if undefine_source {
                    if let Err(e) = source.undefine(guest) {
                        warn!(error = %e, "could not remove the fenced source's definition");
                    }
                }
                release();
                format!(
                    "the guest had already run on {}, so the source was destroyed (fenced), not resumed; its memory is {}'s",
                    zc.dest, zc.dest
                )
            }
            Err(e) => {
                error!(error = %e, "the source could not be destroyed: the hand-over stays open and recovery fences it again");
                if undefine_source {
                    if let Err(e) = UndefineAfterHandOver(&ctx.cfg).insert(guest) {
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
        let observed = source.observe(guest).map(|o| o.local);
        let back = match observed {
            Ok(Local::Running) => Some("the guest keeps running on the source"),
            Ok(Local::Paused) if was_paused => Some("the guest stays paused on the source"),
            _ => None,
        };
        match back {
            Some(text) => {
                // Unaccepted (libvirt never reached the destination's `migrate begin`, or it
                // refused before ACCEPT): taken back here; accepted: the destination
                // withdraws it once its QEMU has exited.
                format!("{text}; {}", take_back_share(device, guest))
            }
            None => {
                if undefine_source {
                    if let Err(e) = UndefineAfterHandOver(&ctx.cfg).insert(guest) {
                        warn!(error = %e, "cannot remember to undefine the source");
                    }
                }
                let seen = match observed {
                    Ok(l) => format!("libvirt says it is {l}"),
                    Err(e) => format!("the source's libvirt cannot say ({e})"),
                };
                warn!(%seen, "the guest is not back on the source: the hand-over is left to recovery");
                format!(
                    "the guest is not running on the source: {seen}; its memory is kept and the hand-over to {} stays open until vmbeamd observes where the guest is (see `vmbeam status`)",
                    zc.dest
                )
            }
        }
    };
    drop(entry);
    let what = if job.cancelled.load(Ordering::SeqCst) {
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
            device: None,
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

    /// The host-device pool: the real `vmbeam-host` over its fake libvirt, cloud VMs a1
    /// (source) and a2 (destination) of cloud acme, b1 of cloud bravo; the hooks run as
    /// libvirt would run them, QEMU's mappings are the test's.
    mod device {
        use std::sync::atomic::AtomicBool;

        use super::*;
        use crate::host_fixture::{cvm, HostFixture, QemuMapping, A1, A2, B1};
        use crate::testing::key;

        fn args(op: &str, sub: &str) -> Vec<String> {
            ["web1", op, sub, "-"].map(String::from).to_vec()
        }

        struct World {
            host: HostFixture,
            src: Host,
            dst: Host,
            _cloud: Cloud,
        }

        /// The guest started on a1 (its memory from the host).
        fn world() -> World {
            let host = HostFixture::new();
            let cloud = Cloud::new();
            let src = cloud.device_host("cvm1", &host, A1);
            let dst = cloud.device_host("cvm2", &host, A2);
            crate::hooks::handle(&src.ctx, &args("start", "begin"), &domain_xml("cvm1")).unwrap();
            World {
                host,
                src,
                dst,
                _cloud: cloud,
            }
        }

        fn dev(h: &Host) -> &DevicePool {
            h.ctx.pool.device().unwrap()
        }

        /// The source's side up to the ticket: COLOCATED, SHARE, the proof.
        fn planned(w: &World) -> ZeroCopyPlan {
            let colo = probe_device(&w.src.ctx, dev(&w.src), A2);
            let report = colo.report.expect("a2 is co-located");
            assert_eq!(report.host_id.as_str(), A2);
            let device = share_with_destination(&w.src.ctx, &uuid(), &report.host_id).unwrap();
            ZeroCopyPlan {
                facts: facts(),
                meta: BeamMetadata::from_domain_xml(&domain_xml("cvm1"))
                    .unwrap()
                    .unwrap(),
                pool_file: current_pool_file(&w.src.ctx, &facts()).unwrap(),
                dest: report.host_id,
                device: Some(device),
            }
        }

        /// The destination's hooks for `zc`'s XML: migrate begin, start begin, started
        /// begin; the incoming XML.
        fn arrive(w: &World, zc: &ZeroCopyPlan) -> String {
            let x = zero_copy_xml(&w.src.ctx, zc, &domain_xml("cvm1"), None).unwrap();
            let incoming =
                crate::hooks::handle(&w.dst.ctx, &args("migrate", "begin"), &x.dest_xml).unwrap();
            crate::hooks::handle(&w.dst.ctx, &args("start", "begin"), &incoming).unwrap();
            crate::hooks::handle(&w.dst.ctx, &args("started", "begin"), &incoming).unwrap();
            incoming
        }

        fn src_path(w: &World) -> std::path::PathBuf {
            dev(&w.src).held_path(&uuid(), Role::Owner).unwrap()
        }

        fn only_on(w: &World, vm: &str) {
            let attached = w.host.attached();
            assert_eq!(attached.len(), 1, "{attached:?}");
            assert_eq!(attached[0].0, vm, "{attached:?}");
        }

        #[test]
        fn the_source_shares_and_proves_and_the_ticket_carries_the_proof_to_the_destination() {
            let w = world();
            // Another cloud's cloud VM: refused with the host's reason, nothing shared.
            let other = probe_device(&w.src.ctx, dev(&w.src), B1);
            assert!(other.report.is_none());
            assert!(other.detail.unwrap().contains("not co-located"));
            let refused =
                share_with_destination(&w.src.ctx, &uuid(), &HostId::new(B1).unwrap()).unwrap_err();
            assert!(
                refused.contains("did not share") && refused.contains("not-colocated"),
                "{refused}"
            );
            only_on(&w, A1);

            let zc = planned(&w);
            // The host's ledger: the guest's memory in both cloud VMs, one file.
            let mut vms: Vec<String> = w.host.attached().into_iter().map(|(vm, _)| vm).collect();
            vms.sort();
            assert_eq!(vms, [A1, A2]);
            assert_eq!(w.host.files().len(), 1);
            let held = dev(&w.src).holding(&uuid()).unwrap().unwrap();
            assert_eq!(
                held.shared_with.as_deref(),
                Some(A2),
                "the hand-over record"
            );
            let d = zc.device.clone().unwrap();
            assert_eq!(held.proof, Some(d.proof.nonce));

            // The ticket's device share carries the placement and the proof, signed.
            let x = zero_copy_xml(&w.src.ctx, &zc, &domain_xml("cvm1"), None).unwrap();
            let (_, share) = carrier::extract_device_share(&x.dest_xml).unwrap();
            let share = DeviceShare::decode(&share.unwrap(), &key()).unwrap();
            assert_eq!(
                (share.dest, share.placement, share.proof),
                (cvm(A2), d.placement, d.proof)
            );
            let (_, ticket) = carrier::extract_ticket(&x.dest_xml).unwrap();
            let ticket = Ticket::decode(&ticket.unwrap()).unwrap();
            assert_eq!(
                (ticket.dest_host.as_str(), ticket.nonce),
                (A2, share.ticket_nonce)
            );

            // The destination accepts it, strips both, and links the RAM path to its
            // view of the shared device.
            let incoming =
                crate::hooks::handle(&w.dst.ctx, &args("migrate", "begin"), &x.dest_xml).unwrap();
            assert_eq!(carrier::extract_ticket(&incoming).unwrap().1, None);
            assert_eq!(carrier::extract_device_share(&incoming).unwrap().1, None);
            let at_dst = dev(&w.dst).holding(&uuid()).unwrap().unwrap();
            assert_eq!(
                (at_dst.role, at_dst.proof),
                (Role::Destination, Some(d.proof.nonce))
            );
            crate::hooks::handle(&w.dst.ctx, &args("start", "begin"), &incoming).unwrap();
            assert_eq!(w.dst.fake.calls(), [format!("link_ram resource2 {MEMORY}")]);
            let running = w.dst.ctx.tables.lock().unwrap().running[&uuid()].clone();
            assert!(running.zero_copy);
            assert_eq!(
                std::path::PathBuf::from(&running.pool_file),
                w.host
                    .pci_devices(A2)
                    .join(d.placement.addr.to_string())
                    .join("resource2")
            );
            // The same ticket again: replayed.
            let again = crate::hooks::handle(&w.dst.ctx, &args("migrate", "begin"), &x.dest_xml);
            assert!(matches!(again, Err(DaemonError::Ticket(_))), "{again:?}");
        }

        #[test]
        fn success_releases_at_the_source_only_after_its_qemu_exited_and_the_destination_owns_it() {
            let w = world();
            let zc = planned(&w);
            w.dst.fake.guest_runs_at_once.store(true, Ordering::SeqCst);
            arrive(&w, &zc);
            // The guest ran at the destination: its ran record, and it owns the memory.
            assert!(dev(&w.src).has_ran(&uuid()).unwrap());
            assert_eq!(
                dev(&w.dst).holding(&uuid()).unwrap().unwrap().role,
                Role::Owner
            );

            let qemu = QemuMapping::new(&src_path(&w));
            let flight = arm_zero_copy(&w.src.ctx, 1, &zc).unwrap();
            assert_eq!(outgoing_job(&w.src), Some(1));
            let exited = Arc::new(AtomicBool::new(false));
            let exiting = {
                let exited = exited.clone();
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(300));
                    exited.store(true, Ordering::SeqCst);
                    drop(qemu);
                })
            };
            let out = settle_outcome(
                &w.src.ctx,
                &job(1),
                &zc,
                flight,
                4,
                Ok(Completed::default()),
                Instant::now(),
                &FakeLibvirt::new(Local::Absent),
                false,
                true,
            );
            assert!(out.unwrap().starts_with("zero-copy migration completed"));
            assert!(
                exited.load(Ordering::SeqCst),
                "released only after the source QEMU exited"
            );
            exiting.join().unwrap();
            only_on(&w, A2);
            assert!(dev(&w.src).holdings().unwrap().is_empty());
            assert_eq!(outgoing_job(&w.src), None);
            assert_eq!(
                w.src.fake.calls(),
                [
                    format!("link_ram resource2 {MEMORY}"),
                    "arm_source resource2".into(),
                    "disarm 2s".into()
                ]
            );
            // The destination owns it: destroyed there, nothing is left on the host.
            crate::hooks::handle(&w.dst.ctx, &args("release", "end"), &domain_xml("cvm2")).unwrap();
            assert!(w.host.attached().is_empty());
            assert!(w.host.files().is_empty());
        }

        #[test]
        fn a_failure_before_the_guest_ran_keeps_the_source_and_the_destination_withdraws() {
            let w = world();
            let zc = planned(&w);
            arrive(&w, &zc);
            assert!(!dev(&w.src).has_ran(&uuid()).unwrap());
            let libvirt = FakeLibvirt::new(Local::Running);
            let flight = arm_zero_copy(&w.src.ctx, 1, &zc).unwrap();
            let m = failure_text(settle_outcome(
                &w.src.ctx,
                &job(1),
                &zc,
                flight,
                4,
                libvirt_failed(),
                Instant::now(),
                &libvirt,
                false,
                true,
            ));
            assert!(
                m.contains("boom") && m.contains("keeps running on the source"),
                "{m}"
            );
            assert!(!libvirt.fenced());
            let held = dev(&w.src).holding(&uuid()).unwrap().unwrap();
            assert_eq!((held.role, held.shared_with), (Role::Owner, None));
            // libvirt ends the destination's QEMU; its release hook withdraws the share
            // once that QEMU's mapping is gone.
            let dest_path = w.host.pci_devices(A2);
            let dest_path = std::fs::read_dir(dest_path)
                .unwrap()
                .next()
                .unwrap()
                .unwrap()
                .path()
                .join("resource2");
            let qemu = QemuMapping::new(&dest_path);
            let exited = Arc::new(AtomicBool::new(false));
            let exiting = {
                let exited = exited.clone();
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(300));
                    exited.store(true, Ordering::SeqCst);
                    drop(qemu);
                })
            };
            crate::hooks::handle(&w.dst.ctx, &args("release", "end"), &domain_xml("cvm2")).unwrap();
            assert!(
                exited.load(Ordering::SeqCst),
                "withdrawn only after the QEMU exited"
            );
            exiting.join().unwrap();
            only_on(&w, A1);
            assert!(dev(&w.dst).holdings().unwrap().is_empty());
            // The guest goes on at the source, which can give its memory back later.
            crate::hooks::handle(&w.src.ctx, &args("release", "end"), &domain_xml("cvm1")).unwrap();
            assert!(w.host.files().is_empty());
        }

        /// libvirt's job failed before the destination's `migrate begin` ran (its vmbeamd
        /// refused, the job never reached Prepare): the source takes the unaccepted share
        /// back, and the host is left with no share.
        #[test]
        fn a_failure_before_the_destination_accepted_takes_the_share_back_at_the_source() {
            let w = world();
            let zc = planned(&w);
            assert_eq!(w.host.attached().len(), 2);
            let libvirt = FakeLibvirt::new(Local::Running);
            let flight = arm_zero_copy(&w.src.ctx, 1, &zc).unwrap();
            let m = failure_text(settle_outcome(
                &w.src.ctx,
                &job(1),
                &zc,
                flight,
                4,
                libvirt_failed(),
                Instant::now(),
                &libvirt,
                false,
                false,
            ));
            assert!(
                m.contains("keeps running on the source") && m.contains("never accepted"),
                "{m}"
            );
            assert!(!libvirt.fenced());
            only_on(&w, A1);
            let held = dev(&w.src).holding(&uuid()).unwrap().unwrap();
            assert_eq!((held.role, held.shared_with), (Role::Owner, None));
            assert!(dev(&w.dst).holdings().unwrap().is_empty());
            // A destination hook that comes late finds nothing to accept: Prepare fails.
            let x = zero_copy_xml(&w.src.ctx, &zc, &domain_xml("cvm1"), None).unwrap();
            let late = crate::hooks::handle(&w.dst.ctx, &args("migrate", "begin"), &x.dest_xml)
                .unwrap_err()
                .to_string();
            assert!(late.contains("no share"), "{late}");
            only_on(&w, A1);
            assert!(dev(&w.dst).holdings().unwrap().is_empty());
            // The source shares again for the next migration, to any cloud VM.
            let again = share_with_destination(&w.src.ctx, &uuid(), &zc.dest).unwrap();
            assert_eq!(again.dest, cvm(A2));
        }

        /// The planner with the host's COLOCATED answered "no" (a cloud VM of another cloud,
        /// or one not on this host: the host answers both alike): automatic mode plans a
        /// copy with the reason, `--zero-copy` is refused with one typed error, and nothing
        /// is shared.
        #[test]
        fn not_colocated_per_the_host_plans_a_copy_or_refuses_zero_copy_and_shares_nothing() {
            const ELSEWHERE: &str = "5f0c2b5e-1a2b-4c3d-8e4f-0000000000ff";
            for peer in [B1, ELSEWHERE] {
                not_colocated(peer);
            }
        }

        fn not_colocated(peer: &str) {
            let w = world();
            // Everything zero-copy needs but the co-location: the metadata names this cloud
            // VM's pool and the private QMP monitor is there, as `enable` leaves them.
            let xml = domain_xml("cvm1")
                .replace(
                    "/var/lib/vmbeam/pool",
                    &w.src.ctx.cfg.identity.pool_dir.display().to_string(),
                )
                .replace(
                    "<domain type='qemu' id='7'>",
                    "<domain type='qemu' id='7' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>",
                )
                .replace(
                    "</domain>",
                    &format!(
                        "<qemu:commandline><qemu:arg value='-qmp'/><qemu:arg value='unix:/run/vmbeam/qmp/{}.sock,server=on,wait=off'/></qemu:commandline></domain>",
                        uuid()
                    ),
                );
            let probe = |_: Option<&str>| Ok(probe_device(&w.src.ctx, dev(&w.src), peer));
            let auto = job(1);
            let planned =
                plan_with_probe(&w.src.ctx, &auto, &xml, &MigrateOptions::default(), probe)
                    .unwrap();
            assert!(planned.is_none(), "a copy");
            let view = auto.view.lock().unwrap().clone();
            assert_eq!(view.mode, Some(MigrationMode::Traditional));
            assert!(
                view.mode_reason
                    .starts_with(&plan::Reason::DestinationUnknown.to_string())
                    && view.mode_reason.contains("not co-located"),
                "{}",
                view.mode_reason
            );
            // A copy carries all of RAM: x-ignore-shared made sure off.
            assert!(w
                .src
                .fake
                .calls()
                .contains(&"reset_zero_copy web1".to_string()));
            let required = MigrateOptions {
                mode: RequestedMode::RequireZeroCopy,
                ..MigrateOptions::default()
            };
            match plan_with_probe(&w.src.ctx, &job(2), &xml, &required, probe) {
                Err(DaemonError::ZeroCopyRefused(why)) => assert!(
                    why.starts_with(&plan::Reason::DestinationUnknown.to_string())
                        && why.contains("not co-located"),
                    "{why}"
                ),
                Err(e) => panic!("{e}"),
                Ok(p) => panic!("planned: zero-copy {}", p.is_some()),
            }
            only_on(&w, A1);
            let held = dev(&w.src).holding(&uuid()).unwrap().unwrap();
            assert_eq!((held.role, held.shared_with), (Role::Owner, None));
        }

        /// Before libvirt's job: a failure after SHARE (here: the proof cannot be written)
        /// takes the share back at once.
        #[test]
        fn a_share_whose_proof_cannot_be_written_is_taken_back() {
            let w = world();
            // The record names an address where this kernel shows no device: no proof.
            let mut rec = dev(&w.src).holding(&uuid()).unwrap().unwrap();
            let real = rec.clone();
            rec.addr = "0000:00:05.0".into();
            let record = w
                .src
                .ctx
                .cfg
                .persistent_dir
                .join("device-pool")
                .join(format!("{}.json", uuid().as_str()));
            let write = |h: &crate::devpool::Holding| {
                std::fs::write(&record, serde_json::to_vec(h).unwrap()).unwrap()
            };
            write(&rec);
            let why =
                share_with_destination(&w.src.ctx, &uuid(), &HostId::new(A2).unwrap()).unwrap_err();
            assert!(
                why.contains("proof could not be written") && why.contains("taken back"),
                "{why}"
            );
            only_on(&w, A1);
            assert_eq!(
                dev(&w.src).holding(&uuid()).unwrap().unwrap().shared_with,
                None
            );
            write(&real);
            assert_eq!(
                src_path(&w),
                dev(&w.src).held_path(&uuid(), Role::Owner).unwrap()
            );
        }

        #[test]
        fn a_failure_after_the_guest_ran_fences_the_source_and_releases_its_device() {
            let w = world();
            let zc = planned(&w);
            w.dst.fake.guest_runs_at_once.store(true, Ordering::SeqCst);
            arrive(&w, &zc);
            let libvirt = FakeLibvirt::new(Local::Running);
            let flight = arm_zero_copy(&w.src.ctx, 1, &zc).unwrap();
            let m = failure_text(settle_outcome(
                &w.src.ctx,
                &job(1),
                &zc,
                flight,
                4,
                libvirt_failed(),
                Instant::now(),
                &libvirt,
                false,
                true,
            ));
            assert!(libvirt.fenced(), "destroyed, never resumed");
            assert!(m.contains("fenced") && !m.contains("keeps running"), "{m}");
            only_on(&w, A2);
            assert!(dev(&w.src).holdings().unwrap().is_empty());
            assert_eq!(
                dev(&w.dst).holding(&uuid()).unwrap().unwrap().role,
                Role::Owner
            );
        }

        #[test]
        fn a_proof_against_the_wrong_device_or_a_forged_share_is_refused_with_its_reason() {
            let w = world();
            let g2 = DomainUuid::new("6e3b1e9a-1b2c-4d5e-8f90-0123456789ac").unwrap();
            let wrong = dev(&w.dst).alloc(&g2, MEMORY).unwrap();
            let zc = planned(&w);
            // The share names g2's device at the destination (same size), not the guest's.
            let mut lie = zc.device.clone().unwrap();
            lie.placement.addr = wrong.placement.addr;
            let lying = ZeroCopyPlan {
                device: Some(lie),
                ..planned(&w)
            };
            let x = zero_copy_xml(&w.src.ctx, &lying, &domain_xml("cvm1"), None).unwrap();
            let r = crate::hooks::handle(&w.dst.ctx, &args("migrate", "begin"), &x.dest_xml);
            let Err(DaemonError::TicketRefused(m)) = r else {
                panic!("{r:?}")
            };
            assert!(
                m.contains("does not prove") && m.contains("no proof record"),
                "{m}"
            );
            assert!(m.contains("withdrawn"), "{m}");
            // Nothing of the guest is left at the destination; g2 is untouched.
            let held = dev(&w.dst).holdings().unwrap();
            assert_eq!(held.len(), 1);
            assert_eq!(held[0].guest, g2);
            assert!(w.dst.ctx.tables.lock().unwrap().incoming.is_empty());

            // Signed with another cloud's key: refused before anything is asked of the host.
            let forged = DeviceShare {
                guest: uuid(),
                dest: cvm(A2),
                ticket_nonce: vmbeam_core::Nonce::random(),
                placement: zc.device.as_ref().unwrap().placement,
                proof: zc.device.as_ref().unwrap().proof,
            }
            .encode(&vmbeam_core::TicketKey::from_bytes(vec![9; 32]).unwrap());
            let good = zero_copy_xml(&w.src.ctx, &zc, &domain_xml("cvm1"), None).unwrap();
            let tampered = carrier::insert_device_share(&good.dest_xml, &forged).unwrap();
            let r = crate::hooks::handle(&w.dst.ctx, &args("migrate", "begin"), &tampered);
            let Err(DaemonError::TicketRefused(m)) = r else {
                panic!("{r:?}")
            };
            assert!(m.contains("signature is invalid"), "{m}");
            assert_eq!(dev(&w.dst).holdings().unwrap().len(), 1);
            // A directory-kind destination refuses a device share with its reason.
            let plain = Cloud::new().host("cvm3");
            let r = crate::hooks::handle(&plain.ctx, &args("migrate", "begin"), &good.dest_xml);
            let Err(DaemonError::TicketRefused(m)) = r else {
                panic!("{r:?}")
            };
            assert!(m.contains("beam pool is a directory"), "{m}");
        }
    }
}
